/* Decode-step products with bf16 weights on x86 CPUs with AVX2 + FMA (dsvl2.model.native).

   y[m, n] = sum_k x[m, k] * w[n, k]: activations x float32 [M, K], weights w bf16 [N, K]
   (passed as uint16), result float32. Each weight row is read from memory once for all
   M rows (it stays in L1 while the rows use it), widened to float32 by a 16-bit shift
   (exact), and accumulated in float32 with FMA.

   Batch invariance: every (m, n) is computed by the same sequence of operations whatever
   M is and whether it is paired with another row (see ``rows``), so a row's bits do not
   depend on the other rows. Compiled with -ffp-contract=off: no FMA is formed
   behind our back. Threads: torch's OpenMP runtime (libgomp.so.1, already loaded by
   torch), so the team is torch's and follows torch.set_num_threads. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "products.h"

static inline __m256 widen8(const uint16_t *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* bf16 weights, per (row, output): one 8-lane accumulator over the K blocks of 8 (lane j
   takes the k with k mod 8 = j, in order), one fixed reduction (hsum8), then the K tail in
   order. Every tile computes each (row, output) by this sequence, so a row's bits do not
   depend on M nor on the tile it falls in. (int8 weights on AVX2: two accumulators,
   tile_i8 below.)

   Tiles: R activation rows x C weight rows per pass (R <= 3, C <= 3): each widened weight
   block serves R rows and each activation block C outputs (3 x 3: 9 accumulators, 3
   activation blocks and the weight block in registers). A thread's range of weight rows
   is read as STREAMS parts side by side (rows i, part + i, 2 part + i in one pass): the
   memory serves several sequential streams per core faster than one (two streams read
   1.1-1.3x as fast as one here, three another 1.06x); all row groups of a tile run in
   turn while its weight rows are in L1. Measured on this AVX2 machine (Zen 3, 2 threads)
   against the former layout (four accumulators per (row, output), one weight row at a
   time): same speed at one row, 1.2-1.3x at 2-4 rows, 1.5x at 16 (lm_head: 62 -> 98
   GFLOP/s); a 3 x 4 tile of adjacent weight rows was slower at 2-4 rows. */
/* Bytes ahead of the read position that each weight row is prefetched (this file's products
   and int4.c's, bf16, int8 and int4 alike), chosen at load: 512 where the CPU is not an
   Intel one (Zen 4, bf16: tiny decode 35.5 -> 39.9 tok/s at 512 against 1 KB, alternating
   two builds in one process; int8 the same at 256), 2,048 on Intel CPUs (an AMX Xeon, 2
   threads, alternating builds, median of 40 calls each: bf16 [4096, 4096] GEMV 22.5-23.3 ->
   23.7-24.6 GB/s, int8 21.6-23.0 -> 23.5-25.2, base's six int4 experts of a token
   19.0-20.6 -> 20.9-22.1, six int8 ones 21.8-22.0 -> 23.1-23.8; 4 KB was slower again).
   ``dsvl2_prefetch`` reads or sets it (the bits never depend on it). */
int64_t dsvl2_ahead = 512;
/* Weight streams a thread in the AVX-512 int8 and int4 (digits) products: 4 on Intel CPUs
   (measured: STREAMS_I8W below, int4.c rows4), 3 elsewhere (as measured on Zen 3 / Zen 4).
   ``dsvl2_streams`` reads or sets it (the bits never depend on it). */
int dsvl2_wide_streams = 3;
__attribute__((constructor)) static void choose_ahead(void) {
    __builtin_cpu_init();
    if (__builtin_cpu_is("intel")) dsvl2_ahead = 2048, dsvl2_wide_streams = 4;
}

/* 3 or 4 sets the streams of the AVX-512 int8 / int4 products; -1 only asks. Returns the
   count in use, or -2 (nothing changed) for another value. */
int dsvl2_streams(int want) {
    if (want == 3 || want == 4) dsvl2_wide_streams = want;
    else if (want != -1) return -2;
    return dsvl2_wide_streams;
}

/* bytes >= 0 (a multiple of 64, at most 16,384) sets the prefetch distance; -1 only asks.
   Returns the distance in use, or -2 (nothing changed) for a value outside those. */
int64_t dsvl2_prefetch(int64_t bytes) {
    if (bytes == -1) return dsvl2_ahead;
    if (bytes < 0 || bytes > 16384 || bytes % 64) return -2;
    return dsvl2_ahead = bytes;
}

#define STREAMS 3
#define UNROLL _Pragma("GCC unroll 4") /* the tile's small loops, so its accumulators stay in registers */

/* the products for a weight type WT widened by WIDEN (8 values) / WIDEN1 (one); FINISH
   applies a per-row scale */
#define DEFINE_ROWS(NAME, WT, WIDEN, WIDEN1, FINISH)                                                          \
/* R rows of x against the C weight rows n, n + step, ... (R, C constants once inlined) */                 \
static inline __attribute__((always_inline)) void tile_##NAME(                                               \
        const float *x, int64_t ldx, const int R, const WT *w, int64_t K, int64_t n, int64_t step,          \
        const int C, int pf, float *y, int64_t ldy, const uint16_t *scale) {                                  \
    const int64_t K32 = K & ~(int64_t)31, K8 = K & ~(int64_t)7, ahead = dsvl2_ahead;                        \
    const WT *wr[STREAMS];                                                                                   \
    __m256 acc[3][STREAMS];                                                                                  \
    UNROLL for (int c = 0; c < C; c++) wr[c] = w + (n + c * step) * K;                                       \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();  \
    int64_t k = 0;                                                                                           \
    for (; k < K32; k += 32) {                                                                               \
        if (pf) UNROLL for (int c = 0; c < C; c++) _mm_prefetch((const char *)(wr[c] + k) + ahead, _MM_HINT_T0); \
        UNROLL for (int j = k; j < k + 32; j += 8) {                                                         \
            __m256 xv[3];                                                                                    \
            UNROLL for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + r * ldx + j);                     \
            UNROLL for (int c = 0; c < C; c++) {                                                             \
                const __m256 wv = WIDEN(wr[c] + j);                                                          \
                UNROLL for (int r = 0; r < R; r++) acc[r][c] = _mm256_fmadd_ps(xv[r], wv, acc[r][c]);        \
            }                                                                                                \
        }                                                                                                    \
    }                                                                                                        \
    for (; k < K8; k += 8)                                                                                   \
        UNROLL for (int c = 0; c < C; c++) {                                                                 \
            const __m256 wv = WIDEN(wr[c] + k);                                                              \
            UNROLL for (int r = 0; r < R; r++)                                                               \
                acc[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), wv, acc[r][c]);                \
        }                                                                                                    \
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) {                                 \
        float s = hsum8(acc[r][c]);                                                                          \
        for (int64_t t = K8; t < K; t++) s = fmaf(x[r * ldx + t], WIDEN1(wr[c][t]), s);                      \
        y[r * ldy + n + c * step] = FINISH(s, n + c * step);                                                 \
    }                                                                                                        \
}                                                                                                            \
DEFINE_WALK(NAME, WT, tile_##NAME, , STREAMS)

/* The walk over a tile function TILE (R rows x C weight rows, as above), for weights WT:
   group_NAME runs every row of x, three at a time, against the C weight rows n, n + step,
   ...; NAME (DEFINE_STREAMS) computes rows [n0, n1) of y as NS streams. ATTR: a target
   attribute, or nothing. */
#define DEFINE_WALK(NAME, WT, TILE, ATTR, NS)                                                                 \
static inline __attribute__((always_inline)) ATTR void group_##NAME(                                         \
        const float *x, int64_t ldx, int64_t M, const WT *w, int64_t K, int64_t n, int64_t step,            \
        const int C, float *y, int64_t ldy, const uint16_t *scale) {                                          \
    for (int64_t m = 0; m < M; m += 3) {                                                                     \
        const float *xm = x + m * ldx;                                                                       \
        float *ym = y + m * ldy;                                                                             \
        const int pf = m == 0; /* the weight rows' first pass */                                            \
        if (M - m >= 3) TILE(xm, ldx, 3, w, K, n, step, C, pf, ym, ldy, scale);                              \
        else if (M - m == 2) TILE(xm, ldx, 2, w, K, n, step, C, pf, ym, ldy, scale);                         \
        else TILE(xm, ldx, 1, w, K, n, step, C, pf, ym, ldy, scale);                                         \
    }                                                                                                        \
}                                                                                                            \
DEFINE_STREAMS(NAME, WT, group_##NAME, ATTR, NS)

/* NAME computes rows [n0, n1) of y (row stride ldy) for all M rows of x (row stride ldx)
   with GROUP (all rows of x against C weight rows n, n + step, ...), its weight rows read
   as NS parts side by side */
#define DEFINE_STREAMS(NAME, WT, GROUP, ATTR, NS)                                                             \
static ATTR void NAME(const float *x, int64_t ldx, int64_t M, int64_t K, const WT *w, const uint16_t *scale, \
                      int64_t n0, int64_t n1, float *y, int64_t ldy) {                                       \
    const int64_t part = (n1 - n0) / (NS);                                                                   \
    for (int64_t i = 0; i < part; i++) GROUP(x, ldx, M, w, K, n0 + i, part, NS, y, ldy, scale);             \
    for (int64_t n = n0 + (NS) * part; n < n1; n++) GROUP(x, ldx, M, w, K, n, 1, 1, y, ldy, scale);         \
}

#define NO_SCALE(v, n) (v)
DEFINE_ROWS(rows, uint16_t, widen8, bf16_to_f32, NO_SCALE)

/* int8 weights, one bf16 scale per output row: y = scale[n] * sum_k x[k] q[n, k]
   (the int8 values widen exactly; the scale is applied once, after the sum).
   Per (row, output): two 8-lane accumulators, the first over the blocks of 8 at k = 0, 16,
   32, ... (and a last block of 8 at K16 where K mod 16 >= 8), the second over those at
   k = 8, 24, ..., each in order; the two added, one fixed reduction (hsum8), then the K tail
   in order, times the row's scale. The same for every M and tile, so a row's bits depend on
   that row alone. Why two: at one row a tile's three accumulators each wait for their
   previous FMA (4 cycles on Zen 3), which held the int8 product to ~18 GB/s per core; two
   per (row, output) need tiles of at most 2 rows x 3 weight rows (12 accumulators in 16
   registers). Against the former kernel (one accumulator, tiles of 3 x 3), dsvl2's
   products on 2 Zen 3 threads, medians of 8 alternating rounds: [1408, 2048] one row from
   the caches 1.23x, from memory (433 MB) 1.07-1.08x; 2 rows 1.03x, 4 rows 1.11x, 16 rows
   0.98x (tiles of 3 x 2 for 3+ rows: 0.95x and 0.87x there). Small int8 batch-1 decode
   13.45 -> 16.39 tok/s (six alternating rounds, the read 35-47 GB/s). */
static inline __m256 widen8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
#define ROW_SCALE(v, n) ((v) * bf16_to_f32(scale[n]))
static inline __attribute__((always_inline)) void tile_i8(
        const float *x, int64_t ldx, const int R, const int8_t *w, int64_t K, int64_t n, int64_t step, const int C,
        int pf, float *y, int64_t ldy, const uint16_t *scale) {
    const int64_t K32 = K & ~(int64_t)31, K16 = K & ~(int64_t)15, K8 = K & ~(int64_t)7, ahead = dsvl2_ahead;
    const int8_t *wr[STREAMS];
    __m256 acc[2][STREAMS][2];
    UNROLL for (int c = 0; c < C; c++) wr[c] = w + (n + c * step) * K;
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
        if (pf) UNROLL for (int c = 0; c < C; c++) _mm_prefetch((const char *)(wr[c] + k) + ahead, _MM_HINT_T0);
        UNROLL for (int j = 0; j < 32; j += 8) {
            const int h = (j >> 3) & 1;
            __m256 xv[2];
            UNROLL for (int r = 0; r < R; r++) xv[r] = _mm256_loadu_ps(x + r * ldx + k + j);
            UNROLL for (int c = 0; c < C; c++) {
                const __m256 wv = widen8_i8(wr[c] + k + j);
                UNROLL for (int r = 0; r < R; r++) acc[r][c][h] = _mm256_fmadd_ps(xv[r], wv, acc[r][c][h]);
            }
        }
    }
    for (; k < K8; k += 8) { /* blocks of 16 (first half, second half), then one of 8 */
        const int h = k < K16 ? (int)((k >> 3) & 1) : 0;
        UNROLL for (int c = 0; c < C; c++) {
            const __m256 wv = widen8_i8(wr[c] + k);
            UNROLL for (int r = 0; r < R; r++)
                acc[r][c][h] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * ldx + k), wv, acc[r][c][h]);
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) {
        float s = hsum8(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
        for (int64_t t = K8; t < K; t++) s = fmaf(x[r * ldx + t], (float)wr[c][t], s);
        y[r * ldy + n + c * step] = ROW_SCALE(s, n + c * step);
    }
}
/* the walk: rows two at a time (a tile of 2 x 3 holds 12 accumulators) against 3 weight streams */
static inline __attribute__((always_inline)) void group_i8(
        const float *x, int64_t ldx, int64_t M, const int8_t *w, int64_t K, int64_t n, int64_t step, const int C,
        float *y, int64_t ldy, const uint16_t *scale) {
    for (int64_t m = 0; m < M; m += 2) {
        const int pf = m == 0; /* the weight rows' first pass */
        if (M - m >= 2) tile_i8(x + m * ldx, ldx, 2, w, K, n, step, C, pf, y + m * ldy, ldy, scale);
        else tile_i8(x + m * ldx, ldx, 1, w, K, n, step, C, pf, y + m * ldy, ldy, scale);
    }
}
DEFINE_STREAMS(rows_i8, int8_t, group_i8, , STREAMS)

/* int8 weights on AVX-512 (the quantised products' variant, int4.c dsvl2_quant_variant):
   widening int8 to float32 costs two instructions per 8 weights on AVX2, which at one row
   makes the int8 GEMV as much compute as memory; 16 lanes halve that. Per (row, output):
   one 16-lane accumulator over the K blocks of 16 (lane j takes the k with k mod 16 = j,
   in order), one fixed reduction (the two halves added, then hsum8), then the K tail in
   order, times the row's scale: as the AVX2 path, a function of the row alone (the two
   variants differ from each other in the last bits). Tiles and walk as DEFINE_ROWS. */
#define AVX512 __attribute__((target("avx512f")))
/* Four weight streams a thread on Intel CPUs (dsvl2_wide_streams; 3 x 4 tiles: 12 of the
   32 zmm registers accumulate), three elsewhere (not measured there). On the AMX Xeon (2
   threads, weights in 2 MiB pages, five alternating rounds, medians) against three: [1536, 2560] one row 23.1-23.5 -> 24.3-24.7 GB/s, [2560, 2560] 27.3-27.4
   -> 28.4, [2560, 3072] 28.2-28.4 -> 28.5-29.2, one thread [1536, 2560] 12.4-13.2 ->
   12.9-14.1; six or eight streams were slower (21.0-25.2 at the same shapes). The bits do
   not depend on the stream count (each (row, output) is one fixed sequence). */
#define STREAMS_I8W 4
static inline __attribute__((always_inline)) AVX512 __m512 widen16_i8(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}
static inline __attribute__((always_inline)) AVX512 void tile_i8w(
        const float *x, int64_t ldx, const int R, const int8_t *w, int64_t K, int64_t n, int64_t step, const int C,
        int pf, float *y, int64_t ldy, const uint16_t *scale) {
    const int64_t K64 = K & ~(int64_t)63, K16 = K & ~(int64_t)15, ahead = dsvl2_ahead;
    const int8_t *wr[STREAMS_I8W];
    __m512 acc[3][STREAMS_I8W];
    UNROLL for (int c = 0; c < C; c++) wr[c] = w + (n + c * step) * K;
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K64; k += 64) {
        if (pf) UNROLL for (int c = 0; c < C; c++) _mm_prefetch((const char *)(wr[c] + k) + ahead, _MM_HINT_T0);
        UNROLL for (int64_t j = k; j < k + 64; j += 16) {
            __m512 xv[3];
            UNROLL for (int r = 0; r < R; r++) xv[r] = _mm512_loadu_ps(x + r * ldx + j);
            UNROLL for (int c = 0; c < C; c++) {
                const __m512 wv = widen16_i8(wr[c] + j);
                UNROLL for (int r = 0; r < R; r++) acc[r][c] = _mm512_fmadd_ps(xv[r], wv, acc[r][c]);
            }
        }
    }
    for (; k < K16; k += 16)
        UNROLL for (int c = 0; c < C; c++) {
            const __m512 wv = widen16_i8(wr[c] + k);
            UNROLL for (int r = 0; r < R; r++)
                acc[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(x + r * ldx + k), wv, acc[r][c]);
        }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) {
        float s = hsum16(acc[r][c]);
        for (int64_t t = K16; t < K; t++) s = fmaf(x[r * ldx + t], (float)wr[c][t], s);
        y[r * ldy + n + c * step] = ROW_SCALE(s, n + c * step);
    }
}
DEFINE_WALK(rows_i8w, int8_t, tile_i8w, AVX512, STREAMS_I8W)
DEFINE_WALK(rows_i8w3, int8_t, tile_i8w, AVX512, 3)

/* bf16 weights (scale NULL) or int8 weights with per-row bf16 scales (AVX-512 where the
   quantised products' variant is, dsvl2_quant_variant) */
void dsvl2_any_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                            int64_t n0, int64_t n1, float *y, int64_t ldy) {
    if (scale && dsvl2_quant_wide())
        (dsvl2_wide_streams == 4 ? rows_i8w : rows_i8w3)(x, ldx, M, K, (const int8_t *)w, scale, n0, n1, y, ldy);
    else if (scale) rows_i8(x, ldx, M, K, (const int8_t *)w, scale, n0, n1, y, ldy);
    else rows(x, ldx, M, K, (const uint16_t *)w, NULL, n0, n1, y, ldy);
}

/* [0, N) shared out among the team in chunks (products.h team_chunk) */
void dsvl2_team_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                      int64_t N, float *y, int64_t ldy) {
    const int64_t ch = team_chunk(N, omp_get_num_threads());
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t n0 = 0; n0 < N; n0 += ch) dsvl2_any_rows(x, ldx, M, K, w, scale, n0, n0 + ch < N ? n0 + ch : N, y, ldy);
}

/* y [M, N] = x [M, K] . w[N, K]^T (+ bias [N] float32, may be NULL) */
void dsvl2_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias,
                  float *y) {
    int nt = omp_get_max_threads();
    if ((int64_t)N * K < (1 << 16)) nt = 1; /* a fork costs more than the product */
#pragma omp parallel num_threads(nt)
    dsvl2_team_rows(x, K, M, K, w, NULL, N, y, N);
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
}

/* an expert's weight stream costs about as much as this many of its rows (work split) */
#define COST_STREAM 2

static inline float silu_mul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* the products of mlp.c's dsvl2_moe (bf16 / int8 weights; products.h mlp_call): every thread
   of the team calls it. Work split: mlp.c, above dsvl2_moe. */
void dsvl2_moe_team8(const mlp_call *mc) {
    const dsvl2_mlp *m = mc->m;
    const int64_t esize = m->format == MLP_INT8 ? 1 : 2, E = m->E, F = m->F, D = mc->D;
    const char *gb = (const char *)m->gate, *ub = (const char *)m->up, *db = (const char *)m->down;
    const uint16_t *gs = m->gs, *us = m->us, *ds = m->ds;
    const int64_t *start = mc->order + mc->T * mc->k;
    float *xs = mc->xs, *g = mc->g, *u = mc->u, *ys = mc->ys;
    const int th = omp_get_thread_num(), nth = omp_get_num_threads();
    if (mc->used >= 2 * nth) { /* whole experts per thread (products.h expert_run) */
        int64_t lo, hi;
        expert_run(start, E, COST_STREAM, th, nth, &lo, &hi);
        for (int64_t e = lo; e < hi; e++) {
            int64_t s = start[e], c = start[e + 1] - s;
            if (c == 0) continue;
            dsvl2_any_rows(xs + s * D, D, c, D, gb + e * F * D * esize, gs ? gs + e * F : NULL, 0, F, g + s * F, F);
            dsvl2_any_rows(xs + s * D, D, c, D, ub + e * F * D * esize, us ? us + e * F : NULL, 0, F, u + s * F, F);
            for (int64_t i = s; i < s + c; i++)
                for (int64_t f = 0; f < F; f++) g[i * F + f] = silu_mul(g[i * F + f], u[i * F + f]);
            dsvl2_any_rows(g + s * F, F, c, F, db + e * D * F * esize, ds ? ds + e * D : NULL, 0, D, ys + s * D, D);
        }
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t s = start[e], c = start[e + 1] - s;
        if (c == 0) continue; /* same decision in every thread */
        dsvl2_team_rows(xs + s * D, D, c, D, gb + e * F * D * esize, gs ? gs + e * F : NULL, F, g + s * F, F);
        dsvl2_team_rows(xs + s * D, D, c, D, ub + e * F * D * esize, us ? us + e * F : NULL, F, u + s * F, F);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = s * F; i < (s + c) * F; i++) g[i] = silu_mul(g[i], u[i]);
        /* implicit barrier */
        dsvl2_team_rows(g + s * F, F, c, F, db + e * D * F * esize, ds ? ds + e * D : NULL, D, ys + s * D, D);
    }
}

/* y [M, N] = x [M, K] . (scale [N] * q [N, K])^T: int8 weights, bf16 per-row scales */
void dsvl2_linear_i8(const float *x, int64_t M, int64_t K, const int8_t *q, const uint16_t *scale, int64_t N,
                     float *y) {
    int nt = omp_get_max_threads();
    if ((int64_t)N * K < (1 << 16)) nt = 1;
#pragma omp parallel num_threads(nt)
    dsvl2_team_rows(x, K, M, K, q, scale, N, y, N);
}
