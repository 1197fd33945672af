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

/* One weight row against rows x0 (and x1): four 8-lane accumulators per (row, weight
   row) over 32-wide K blocks (accumulator j takes k mod 32 in [8j, 8j + 8)), one fixed
   reduction, then the K tail in order. Measured on AVX2 (Zen 3, 2 threads): faster at
   one row than 2-accumulator or 1-accumulator 3 x 4 register tiles (batch 1 matters most;
   the 3 x 4 tiles were ~1.4x faster at 16 rows, slower at one).

   One activation row (batch 1): a thread's range of weight rows is read as three streams
   side by side, weight rows i, third + i and 2 third + i in the same pass (same operations
   per output; 12 accumulators + 4 widened blocks fill the 16 registers). Measured here:
   two streams read a 1 GB product at 1.1-1.3x the rate of one, at or above a plain read
   of the same buffer (more reads in flight for several sequential streams than for one);
   three streams made the real tiny's decode step another 1.06-1.07x faster than two. */
#ifndef PREFETCH
#define PREFETCH 512 /* bf16 values ahead (1 KB) */
#endif
#define BLOCK(acc, xr, k, w0, w1, w2, w3)                                   \
    acc##0 = _mm256_fmadd_ps(_mm256_loadu_ps((xr) + (k)), w0, acc##0);       \
    acc##1 = _mm256_fmadd_ps(_mm256_loadu_ps((xr) + (k) + 8), w1, acc##1);   \
    acc##2 = _mm256_fmadd_ps(_mm256_loadu_ps((xr) + (k) + 16), w2, acc##2);  \
    acc##3 = _mm256_fmadd_ps(_mm256_loadu_ps((xr) + (k) + 24), w3, acc##3);

static inline float reduce4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
    return hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}

/* rows [n0, n1) of y (row stride ldy) for all M rows of x (row stride ldx), for a weight
   type WT widened by WIDEN (8 values) / WIDEN1 (one); FINISH applies a per-row scale. */
#define DEFINE_ROWS(NAME, WT, WIDEN, WIDEN1, FINISH)                                                           \
static inline float tail_##NAME(const float *x, const WT *w, int64_t k0, int64_t K, float s) {               \
    for (int64_t k = k0; k < K; k++) s = fmaf(x[k], WIDEN1(w[k]), s);                                            \
    return s;                                                                                                   \
}                                                                                                               \
static void NAME(const float *x, int64_t ldx, int64_t M, int64_t K, const WT *w, const uint16_t *scale,       \
                 int64_t n0, int64_t n1, float *y, int64_t ldy) {                                             \
    const int64_t K32 = K & ~(int64_t)31;                                                                     \
    if (M == 1 && n1 - n0 >= 3) { /* one row: three thirds of the range streamed side by side */             \
        const int64_t third = (n1 - n0) / 3;                                                                  \
        for (int64_t i = 0; i < third; i++) {                                                                 \
            const int64_t na = n0 + i, nb = na + third, nc = nb + third;                                      \
            const WT *ra = w + na * K, *rb = w + nb * K, *rc = w + nc * K;                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;   \
            __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;                                                        \
            for (int64_t k = 0; k < K32; k += 32) {                                                           \
                _mm_prefetch((const char *)(ra + k + PREFETCH), _MM_HINT_T0);                                 \
                _mm_prefetch((const char *)(rb + k + PREFETCH), _MM_HINT_T0);                                 \
                _mm_prefetch((const char *)(rc + k + PREFETCH), _MM_HINT_T0);                                 \
                __m256 w0 = WIDEN(ra + k), w1 = WIDEN(ra + k + 8), w2 = WIDEN(ra + k + 16), w3 = WIDEN(ra + k + 24); \
                BLOCK(a, x, k, w0, w1, w2, w3)                                                                \
                w0 = WIDEN(rb + k), w1 = WIDEN(rb + k + 8), w2 = WIDEN(rb + k + 16), w3 = WIDEN(rb + k + 24);   \
                BLOCK(b, x, k, w0, w1, w2, w3)                                                                \
                w0 = WIDEN(rc + k), w1 = WIDEN(rc + k + 8), w2 = WIDEN(rc + k + 16), w3 = WIDEN(rc + k + 24);   \
                BLOCK(c, x, k, w0, w1, w2, w3)                                                                \
            }                                                                                                 \
            y[na] = FINISH(tail_##NAME(x, ra, K32, K, reduce4(a0, a1, a2, a3)), na);                          \
            y[nb] = FINISH(tail_##NAME(x, rb, K32, K, reduce4(b0, b1, b2, b3)), nb);                          \
            y[nc] = FINISH(tail_##NAME(x, rc, K32, K, reduce4(c0, c1, c2, c3)), nc);                          \
        }                                                                                                     \
        n0 += 3 * third; /* the last one or two outputs of the range: below */                               \
    }                                                                                                         \
    for (int64_t n = n0; n < n1; n++) {                                                                       \
        const WT *wr = w + n * K;                                                                             \
        int64_t m = 0;                                                                                        \
        for (; m + 3 <= M; m += 3) { /* three rows per pass: each widened block used three times */           \
            const float *x0 = x + m * ldx, *x1 = x0 + ldx, *x2 = x1 + ldx;                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;   \
            __m256 c0 = a0, c1 = a0, c2 = a0, c3 = a0;                                                        \
            for (int64_t k = 0; k < K32; k += 32) {                                                           \
                if (m == 0) _mm_prefetch((const char *)(wr + k + PREFETCH), _MM_HINT_T0);                     \
                __m256 w0 = WIDEN(wr + k), w1 = WIDEN(wr + k + 8), w2 = WIDEN(wr + k + 16), w3 = WIDEN(wr + k + 24); \
                BLOCK(a, x0, k, w0, w1, w2, w3)                                                               \
                BLOCK(b, x1, k, w0, w1, w2, w3)                                                               \
                BLOCK(c, x2, k, w0, w1, w2, w3)                                                               \
            }                                                                                                 \
            y[m * ldy + n] = FINISH(tail_##NAME(x0, wr, K32, K, reduce4(a0, a1, a2, a3)), n);                    \
            y[(m + 1) * ldy + n] = FINISH(tail_##NAME(x1, wr, K32, K, reduce4(b0, b1, b2, b3)), n);              \
            y[(m + 2) * ldy + n] = FINISH(tail_##NAME(x2, wr, K32, K, reduce4(c0, c1, c2, c3)), n);              \
        }                                                                                                     \
        if (m + 2 <= M) {                                                                                     \
            const float *x0 = x + m * ldx, *x1 = x0 + ldx;                                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;   \
            for (int64_t k = 0; k < K32; k += 32) {                                                           \
                if (m == 0) _mm_prefetch((const char *)(wr + k + PREFETCH), _MM_HINT_T0);                     \
                __m256 w0 = WIDEN(wr + k), w1 = WIDEN(wr + k + 8), w2 = WIDEN(wr + k + 16), w3 = WIDEN(wr + k + 24); \
                BLOCK(a, x0, k, w0, w1, w2, w3)                                                               \
                BLOCK(b, x1, k, w0, w1, w2, w3)                                                               \
            }                                                                                                 \
            y[m * ldy + n] = FINISH(tail_##NAME(x0, wr, K32, K, reduce4(a0, a1, a2, a3)), n);                    \
            y[(m + 1) * ldy + n] = FINISH(tail_##NAME(x1, wr, K32, K, reduce4(b0, b1, b2, b3)), n);              \
            m += 2;                                                                                           \
        }                                                                                                     \
        if (m < M) {                                                                                          \
            const float *x0 = x + m * ldx;                                                                    \
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                       \
            for (int64_t k = 0; k < K32; k += 32) {                                                           \
                if (M == 1) _mm_prefetch((const char *)(wr + k + PREFETCH), _MM_HINT_T0);                     \
                __m256 w0 = WIDEN(wr + k), w1 = WIDEN(wr + k + 8), w2 = WIDEN(wr + k + 16), w3 = WIDEN(wr + k + 24); \
                BLOCK(a, x0, k, w0, w1, w2, w3)                                                               \
            }                                                                                                 \
            y[m * ldy + n] = FINISH(tail_##NAME(x0, wr, K32, K, reduce4(a0, a1, a2, a3)), n);                    \
        }                                                                                                     \
    }                                                                                                         \
}                                                                                                             \

#define NO_SCALE(v, n) (v)
DEFINE_ROWS(rows, uint16_t, widen8, bf16_to_f32, NO_SCALE)

/* int8 weights, one bf16 scale per output row: y = scale[n] * sum_k x[k] q[n, k]
   (the int8 values widen exactly; the scale is applied once, after the sum) */
static inline __m256 widen8_i8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline float widen1_i8(int8_t v) { return (float)v; }
#define ROW_SCALE(v, n) ((v) * bf16_to_f32(scale[n]))
DEFINE_ROWS(rows_i8, int8_t, widen8_i8, widen1_i8, ROW_SCALE)

/* bf16 weights (scale NULL) or int8 weights with per-row bf16 scales */
void dsvl2_any_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                            int64_t n0, int64_t n1, float *y, int64_t ldy) {
    if (scale) rows_i8(x, ldx, M, K, (const int8_t *)w, scale, n0, n1, y, ldy);
    else rows(x, ldx, M, K, (const uint16_t *)w, NULL, n0, n1, y, ldy);
}

/* split [0, N) among the team in contiguous blocks (each thread streams its own rows) */
void dsvl2_team_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                      int64_t N, float *y, int64_t ldy) {
    int nt = omp_get_num_threads(), t = omp_get_thread_num();
    int64_t per = (N + nt - 1) / nt;
    int64_t n0 = t * per, n1 = n0 + per < N ? n0 + per : N;
    if (n0 < n1) dsvl2_any_rows(x, ldx, M, K, w, scale, n0, n1, y, ldy);
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

/* Routed (or dense) SiLU-gated experts for T tokens, each choosing k of E experts:
     out[t] = sum over its choices in ascending expert id of wt[t, j] * down_e(silu(gate_e x) * up_e x)
   gate / up [E, F, D], down [E, D, F]: bf16 (esize 2, scales NULL) or int8 (esize 1) with
   bf16 per-row scales gs / us [E, F], ds [E, D]; idx int64 [T, k]; wt float32 [T, k]
   (both NULL: one dense MLP, E = k = 1). Returns -1 (and does nothing) on an expert id
   outside [0, E).
   scratch: float32 [T*k*(2D + 2F)]; order: int64 [T*k + 2E + 1] (see native/__init__.py).

   Work split: with several experts in use, each thread takes whole experts (gate, up,
   SiLU and down of all of that expert's tokens) so the threads never wait for each
   other inside the layer; a single expert (a dense MLP) is split by output rows instead.
   Each pair's output is computed by the same code whoever computes it, and a token's
   sum is formed afterwards in ascending expert id, so it does not depend on the split
   nor on the other tokens. */
int dsvl2_moe(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
              const void *gate, const void *up, const void *down, int64_t E, int64_t F,
              float *out, float *scratch, int64_t *order,
              int64_t esize, const uint16_t *gs, const uint16_t *us, const uint16_t *ds) {
    const char *gb = (const char *)gate, *ub = (const char *)up, *db = (const char *)down;
    const int64_t P = T * k;
    /* idx == NULL: one dense MLP (E = k = 1, every weight 1) */
    for (int64_t p = 0; idx && p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    /* counting sort of the (token, choice) pairs by expert, stable */
    int64_t *start = order + P; /* E + 1 entries */
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t p = 0; p < P; p++) start[(idx ? idx[p] : 0) + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    int64_t *fill = start + E + 1; /* E entries */
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t p = 0; p < P; p++) order[fill[idx ? idx[p] : 0]++] = p;
    int64_t used = 0;
    for (int64_t e = 0; e < E; e++) used += start[e + 1] > start[e];

    float *xs = scratch;        /* [P, D]  the pairs' inputs, grouped by expert */
    float *g = xs + P * D;      /* [P, F]  gate, then silu(gate) * up */
    float *u = g + P * F;       /* [P, F]  up */
    float *ys = u + P * F;      /* [P, D]  each pair's expert output */
    for (int64_t i = 0; i < P; i++) memcpy(xs + i * D, x + (order[i] / k) * D, D * sizeof(float));

    int nt = omp_get_max_threads();
    if (used >= 2 * nt) {
        /* whole experts per thread: contiguous runs of about equal cost, an expert costing
           its weights' stream plus its rows (COST_STREAM + c, in units of one row) */
        int64_t total = 0;
        for (int64_t e = 0; e < E; e++)
            if (start[e + 1] > start[e]) total += COST_STREAM + start[e + 1] - start[e];
#pragma omp parallel num_threads(nt)
        {
            int th = omp_get_thread_num(), nth = omp_get_num_threads();
            int64_t before = 0; /* cost of the experts before e */
            for (int64_t e = 0; e < E; e++) {
                int64_t s = start[e], c = start[e + 1] - s;
                if (c == 0) continue;
                int64_t mid2 = 2 * before + COST_STREAM + c; /* twice the midpoint of e's cost */
                before += COST_STREAM + c;
                if ((mid2 * nth) / (2 * total) != th) continue;
                dsvl2_any_rows(xs + s * D, D, c, D, gb + e * F * D * esize, gs ? gs + e * F : NULL, 0, F, g + s * F, F);
                dsvl2_any_rows(xs + s * D, D, c, D, ub + e * F * D * esize, us ? us + e * F : NULL, 0, F, u + s * F, F);
                for (int64_t i = s; i < s + c; i++)
                    for (int64_t f = 0; f < F; f++) g[i * F + f] = silu_mul(g[i * F + f], u[i * F + f]);
                dsvl2_any_rows(g + s * F, F, c, F, db + e * D * F * esize, ds ? ds + e * D : NULL, 0, D, ys + s * D, D);
            }
        }
    } else {
#pragma omp parallel num_threads(nt)
        {
            for (int64_t e = 0; e < E; e++) {
                int64_t s = start[e], c = start[e + 1] - s;
                if (c == 0) continue; /* same decision in every thread */
                dsvl2_team_rows(xs + s * D, D, c, D, gb + e * F * D * esize, gs ? gs + e * F : NULL, F, g + s * F, F);
                dsvl2_team_rows(xs + s * D, D, c, D, ub + e * F * D * esize, us ? us + e * F : NULL, F, u + s * F, F);
#pragma omp barrier
#pragma omp for schedule(static)
                for (int64_t i = s; i < s + c; i++)
                    for (int64_t f = 0; f < F; f++) g[i * F + f] = silu_mul(g[i * F + f], u[i * F + f]);
                /* implicit barrier */
                dsvl2_team_rows(g + s * F, F, c, F, db + e * D * F * esize, ds ? ds + e * D : NULL, D, ys + s * D, D);
            }
        }
    }
    /* combine in ascending expert order per token: walk the sorted pairs */
    for (int64_t t = 0; t < T; t++) memset(out + t * D, 0, D * sizeof(float));
    for (int64_t i = 0; i < P; i++) {
        int64_t p = order[i], t = p / k;
        float w = wt ? wt[p] : 1.0f;
        float *o = out + t * D;
        const float *y = ys + i * D;
        for (int64_t d = 0; d < D; d++) o[d] = fmaf(w, y[d], o[d]);
    }
    return 0;
}

/* y [M, N] = x [M, K] . (scale [N] * q [N, K])^T: int8 weights, bf16 per-row scales */
void dsvl2_linear_i8(const float *x, int64_t M, int64_t K, const int8_t *q, const uint16_t *scale, int64_t N,
                     float *y) {
    int nt = omp_get_max_threads();
    if ((int64_t)N * K < (1 << 16)) nt = 1;
#pragma omp parallel num_threads(nt)
    dsvl2_team_rows(x, K, M, K, q, scale, N, y, N);
}
