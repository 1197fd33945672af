/* Prefill products on Intel AMX (dsvl2.model.native): y [M, N] float32 = x [M, K] bf16 times
   W [N, K]^T, with W stored as bf16, or as int8 / int4 dequantised on the way into the tiles,
   so that no dequantised copy of the whole weight is written to memory and read again, and
   no GEMM library reorders it on every call (the quantised experts' prefill: per expert and
   matrix, a dequantisation then a oneDNN GEMM that reorders its bf16 weight first).

   Layout. A tile product TDPBF16PS computes C [16, 16] float32 += A [16, 32 bf16] B, B being
   [16 pairs of k, 16 columns] (each 32-bit lane one column's two consecutive k). The weight
   is A: 16 of its rows, 32 values of k each, loaded straight from a row-major bf16 panel
   (the weight itself when stored as bf16, else 32 rows dequantised into a per-thread panel).
   x is B: its 32-bit pairs transposed once per chunk of tokens into 1 KiB tiles (``pack_x``), rows past
   M zero. So each C tile is [16 weight rows, 16 tokens], transposed on the way out (rows of
   y written as whole 64-byte lines, streamed: no read for ownership of lines that are only
   written); the expert's gate and up results are kept as the tiles leave them (by weight
   row, ``amx_out.by_weight``), so the gated product goes straight into down's B tiles
   (``gated_tiles``: an interleave of two rows, not a transpose).

   Numbers: int8 values are exact in bf16, so each weight row's float32 sums are multiplied
   by its scale afterwards (the weight is not rounded: closer to the float32 reference than
   a bf16 GEMM of the dequantised weight); int4 values are dequantised to bf16 as
   ``dsvl2_dequant_i4`` does (a group's scale varies along k), bf16 ones taken as they are.
   Products of bf16 pairs are summed in float32 by the tile unit, in its own order, so the
   result is within float32 summation error of the float64 product of the same bf16 values
   (tests/test_amx.py), not bit for bit any other kernel's. A token's outputs do not
   depend on the other tokens.

   Split: per chunk of 256 tokens (128 for K > 3,072; their tiles and a panel stay in L2),
   the team packs the chunk's tiles, then takes panels of 32 weight rows (static: each
   thread its own run of consecutive panels, the next one prefetched while one multiplies).
   A panel goes KBLOCK values of k at a time: every token pair of the chunk passes over the
   block's A tiles (16 KiB: they stay in L1), each pair's C tiles saved and reloaded between
   blocks (float32 as they are: the same sums in the same order, the same bits).
   These three (blocks, streamed lines, gate / up by weight row) against whole panels and
   transposed gate / up results, the same bits, alternating builds on a 2-thread AMX Xeon:
   an expert at 300-1,431 rows 1.1-1.25x as fast (bf16, int4; int8 1.0-1.1x), the whole
   prefill of c01 (1,431 tokens) tiny 1.09 -> 1.01 s, small int8 5.42 -> 5.11 s.

   Built only with GCC >= 11 on x86-64; elsewhere, and where the CPU (AMX-TILE, AMX-BF16,
   AVX-512 BF16) or the kernel does not grant AMX, dsvl2_amx_usable() says 0 and the
   callers keep their path. */

#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "products.h"

#ifdef DSVL2_AMX
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* 1 where the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process use the tile
   data (Linux asks each process to request it); 0 otherwise. Asked once. */
static int amx_state = -1;

static int amx_probe(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 22) & 1)) return 0; /* AMX-TILE, AMX-BF16 */
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !((a >> 5) & 1)) return 0; /* AVX512-BF16 */
    if (!__builtin_cpu_supports("avx512f") || !__builtin_cpu_supports("avx512bw") ||
        !__builtin_cpu_supports("avx512vl") || !__builtin_cpu_supports("avx512dq"))
        return 0;
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int dsvl2_amx_usable(void) {
    if (amx_state < 0) amx_state = amx_probe();
    return amx_state;
}

/* x [M, K] bf16 (row stride ldx values) as B tiles: tile (s, t) at xp + (s * Mt + t) * 512,
   its row r holding, for each of the 16 tokens 16t..16t+15, the pair x[., 32s + 2r : +2]
   (zero past M); token m is x's row rows[m] where rows is not NULL. Tokens are split among
   the team (called inside a parallel region). */
static AMX void pack_x(const uint16_t *x, int64_t ldx, const int64_t *rows, int64_t M, int64_t K, uint16_t *xp) {
    const int64_t Mt = (M + 15) / 16, S = K / 32;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < Mt; t++)
        for (int64_t s = 0; s < S; s++) {
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t m = 16 * t + i;
                r[i] = m < M ? _mm512_loadu_si512(x + (rows ? rows[m] : m) * ldx + 32 * s) : _mm512_setzero_si512();
            }
            transpose16(r);
            uint16_t *tile = xp + (s * Mt + t) * 512;
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(tile + 32 * i, r[i]);
        }
}

/* Where a product's C tiles go: y[m, n] (row stride ld; tokens along y's rows), added to
   y[rows[m], n] where rows is not NULL; or, where by_weight, y[n, m] (weight rows along
   y's rows, tokens along its columns: the C tiles as the tile unit leaves them, no
   transpose; the expert's gate and up results) */
typedef struct {
    float *y;
    int64_t ld;
    const int64_t *rows;
    int by_weight;
} amx_out;

/* C tile ct ([16 weight rows n0.., 16 tokens m0..]) into o's y[m, n] for m < M, each weight
   row's sums times its scale sc[n] first where sc is not NULL (int8); where o->rows is not
   NULL, added to y[rows[m], n] instead (one float32 add each, as torch's index_add_) */
static inline __attribute__((always_inline)) AMX void store_c(float *ct, const float *sc, int64_t n0, int64_t m0,
                                                              int64_t M, const amx_out *o) {
    float *y = o->y;
    const int64_t ldy = o->ld, *rows = o->rows;
    __m512i r[16];
    for (int i = 0; i < 16; i++)
        r[i] = sc ? _mm512_castps_si512(_mm512_mul_ps(_mm512_loadu_ps(ct + 16 * i), _mm512_set1_ps(sc[n0 + i])))
                  : _mm512_loadu_si512(ct + 16 * i);
    transpose16(r);
    if (rows)
        for (int i = 0; i < 16 && m0 + i < M; i++) {
            float *dst = y + rows[m0 + i] * ldy + n0;
            _mm512_storeu_ps(dst, _mm512_add_ps(_mm512_loadu_ps(dst), _mm512_castsi512_ps(r[i])));
        }
    else if ((((uintptr_t)y | (uintptr_t)(ldy * 4)) & 63) == 0) /* whole lines: streamed, no read for ownership */
        for (int i = 0; i < 16 && m0 + i < M; i++) _mm512_stream_si512((__m512i *)(y + (m0 + i) * ldy + n0), r[i]);
    else
        for (int i = 0; i < 16 && m0 + i < M; i++) _mm512_storeu_si512(y + (m0 + i) * ldy + n0, r[i]);
}

/* the thread's next panel as stored (32 consecutive rows: one block of bytes), prefetched
   into L2 while this one multiplies (the tile loads and the row-by-row dequantisation leave
   the hardware prefetcher behind): line `line` of `lines` next, `per` lines a step */
typedef struct {
    const char *next;
    int64_t line, lines, per;
} ahead;

static inline __attribute__((always_inline)) void prefetch_some(ahead *f) {
    for (int64_t j = 0; j < f->per && f->line < f->lines; j++, f->line++)
        _mm_prefetch(f->next + f->line * 64, _MM_HINT_T1);
}

/* The C tiles of 32 weight rows x one or two token tiles (`two`), shared by tile_block and
   few_block (amx.c's two ways through a panel): c_zero clears them; c_step adds one K step of
   32 values: A tiles from a (32 rows, row stride lda values), B tiles b (and b + 512, the next
   token tile); c_store writes them into y from token m0 on (store_c). Called with two constant. */
static inline __attribute__((always_inline)) AMX void c_zero(int two) {
    _tile_zero(0);
    _tile_zero(1);
    if (two) {
        _tile_zero(2);
        _tile_zero(3);
    }
}

static inline __attribute__((always_inline)) AMX void c_step(const uint16_t *a, int64_t lda, const uint16_t *b,
                                                             int two) {
    _tile_loadd(4, a, 2 * lda);
    _tile_loadd(5, a + 16 * lda, 2 * lda);
    _tile_loadd(6, b, 64);
    if (two) _tile_loadd(7, b + 512, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    if (two) {
        _tile_dpbf16ps(2, 4, 7);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* C tiles 0-1 (and 2-3) from / to cc (4 KiB: tile i at cc + 256 i) */
static inline __attribute__((always_inline)) AMX void c_load(const float *cc, int two) {
    _tile_loadd(0, cc, 64);
    _tile_loadd(1, cc + 256, 64);
    if (two) {
        _tile_loadd(2, cc + 512, 64);
        _tile_loadd(3, cc + 768, 64);
    }
}

static inline __attribute__((always_inline)) AMX void c_save(float *cc, int two) {
    _tile_stored(0, cc, 64);
    _tile_stored(1, cc + 256, 64);
    if (two) {
        _tile_stored(2, cc + 512, 64);
        _tile_stored(3, cc + 768, 64);
    }
}

static inline __attribute__((always_inline)) AMX void c_store(float *ct, const float *sc, int64_t n0, int64_t m0,
                                                              int two, int64_t M, const amx_out *o) {
    if (o->by_weight) { /* y[n, m]: every token column of the tiles (past M: zero sums) */
        float *y = o->y + n0 * o->ld + m0;
        const int64_t ld = o->ld;
        if (!sc) {
            _tile_stored(0, y, ld * 4);
            _tile_stored(1, y + 16 * ld, ld * 4);
            if (two) {
                _tile_stored(2, y + 16, ld * 4);
                _tile_stored(3, y + 16 * ld + 16, ld * 4);
            }
            return;
        }
        c_save(ct, two);
        for (int t = 0; t < 2 + 2 * two; t++)
            for (int i = 0; i < 16; i++) {
                const int64_t n = 16 * (t & 1) + i;
                _mm512_storeu_ps(y + n * ld + 16 * (t >> 1),
                                 _mm512_mul_ps(_mm512_loadu_ps(ct + 256 * t + 16 * i), _mm512_set1_ps(sc[n0 + n])));
            }
        return;
    }
    c_save(ct, two);
    store_c(ct, sc, n0, m0, M, o);
    store_c(ct + 256, sc, n0 + 16, m0, M, o);
    if (two) {
        store_c(ct + 512, sc, n0, m0 + 16, M, o);
        store_c(ct + 768, sc, n0 + 16, m0 + 16, M, o);
    }
}

/* `steps` prefetch steps spread over the nb bytes at next (NULL: none) */
static inline ahead ahead_over(const char *next, int64_t nb, int64_t steps) {
    ahead f = {next, 0, next ? (nb + 63) / 64 : 0, 0};
    f.per = (f.lines + steps - 1) / steps;
    return f;
}

#define KBLOCK 256 /* values of k a block of panel() */

/* steps [s0, s1) of token tiles t (and t + 1 where two) against 32 weight rows (A tiles
   from a, row stride K): the C tiles start from zero (s0 = 0) or from cc, and end in cc,
   or, at the last step, in y (c_store). Called with two constant. */
static inline __attribute__((always_inline)) AMX void tile_block(const uint16_t *a, int64_t K, const uint16_t *xp,
                                                                 int64_t Mt, int64_t t, int two, int64_t s0,
                                                                 int64_t s1, int64_t M, int64_t n0, const float *sc,
                                                                 const amx_out *o, float *cc, ahead *f) {
    if (s0 == 0) c_zero(two);
    else c_load(cc, two);
    for (int64_t s = s0; s < s1; s++) {
        prefetch_some(f);
        c_step(a + 32 * s, K, xp + (s * Mt + t) * 512, two);
    }
    if (s1 == K / 32) c_store(cc, sc, n0, 16 * t, two, M, o);
    else c_save(cc, two);
}

/* 32 weight rows (A tiles from a, row stride K) times every token tile of xp into y, two
   token tiles at a time, KBLOCK values of k at a time: the A tiles of a block (32 x KBLOCK
   bf16) stay in L1 while every token pair passes, each pair's C tiles kept in cc (4 KiB a
   pair) between blocks (stored and loaded as they are: the sums run over k in the same
   order, so the bits do not depend on KBLOCK); the next panel's nb stored bytes at next
   (NULL: none) prefetched over the steps */
static AMX void panel(const uint16_t *a, int64_t K, const uint16_t *xp, int64_t M, int64_t n0, const float *sc,
                      const amx_out *o, float *cc, const char *next, int64_t nb) {
    const int64_t Mt = (M + 15) / 16, S = K / 32;
    ahead f = ahead_over(next, nb, S * ((Mt + 1) / 2));
    for (int64_t s0 = 0; s0 < S; s0 += KBLOCK / 32) {
        const int64_t s1 = S - s0 < KBLOCK / 32 ? S : s0 + KBLOCK / 32;
        int64_t t = 0;
        for (; t + 2 <= Mt; t += 2) tile_block(a, K, xp, Mt, t, 1, s0, s1, M, n0, sc, o, cc + t * 512, &f);
        if (t < Mt) tile_block(a, K, xp, Mt, t, 0, s0, s1, M, n0, sc, o, cc + t * 512, &f);
    }
}

/* row of K int8 values as bf16, 32 a step (exact: 8 significant bits at most, so the
   conversion's rounding never acts) */
static inline __attribute__((always_inline)) AMX void widen_i8(const int8_t *q, int64_t K, uint16_t *o) {
    for (int64_t k = 0; k < K; k += 32) {
        const __m256i b = _mm256_loadu_si256((const __m256i *)(q + k));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
        _mm512_storeu_si512(o + k, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
    }
}

/* Columns [k0, k0 + kl) (multiples of G) of 32 rows of an int4 weight [., K] (two values a
   byte, low nibble first; row r at q + r K / 2, its bf16 scales at scale + r K / G) as bf16
   into out (row stride ldo): per group of G values a table of its 16 possible values
   round_bf16((i - 8) s) (exact products, rounded as ``dsvl2_dequant_i4`` rounds them: the same
   bits), then one permute for 32 values */
static AMX void dequant_i4_panel(const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G, int64_t k0,
                                 int64_t kl, uint16_t *out, int64_t ldo) {
    const __m512 steps = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
    const __m128i nibble = _mm_set1_epi8(0x0f);
    for (int r = 0; r < 32; r++) {
        const uint8_t *qr = q + r * (K / 2);
        const uint16_t *sr = scale + r * (K / G);
        uint16_t *o = out + r * ldo - k0;
        for (int64_t g = k0 / G; g < (k0 + kl) / G; g++) {
            const __m512 v = _mm512_mul_ps(steps, _mm512_set1_ps(bf16_to_f32(sr[g])));
            const __m512i table = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(round_bf16_16(v)));
            for (int64_t j = g * G; j < (g + 1) * G; j += 32) {
                const __m128i b = _mm_loadu_si128((const __m128i *)(qr + j / 2));
                const __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
                const __m256i idx = _mm256_set_m128i(_mm_unpackhi_epi8(lo, hi), _mm_unpacklo_epi8(lo, hi));
                _mm512_storeu_si512(o + j, _mm512_permutexvar_epi16(_mm512_cvtepu8_epi16(idx), table));
            }
        }
    }
}

/* tokens a chunk: x's tiles of a chunk (CHUNK x K bf16) and a panel stay in L2; half as
   many where a chunk's tiles would pass 1.5 MiB (K > 3,072: the o_proj of base, K = 4,096,
   1,690 -> 1,870-1,960 GFLOP/s at 1,431 rows on an AMX Xeon; smaller K lose at 128) */
#define CHUNK 256

/* floats of a thread's C tile space: 4 KiB per pair of token tiles of a chunk */
#define CT_FLOATS (1024 * (CHUNK / 32))

static int64_t chunk_rows(int64_t K) { return (int64_t)CHUNK * K * 2 > (3 << 19) ? CHUNK / 2 : CHUNK; }

/* a weight [N, K] as stored: fmt 0 bf16, 1 int8 (bf16 row scales; sc: them as float32),
   2 int4 (bf16 scales per group of G along k) */
typedef struct {
    int fmt;
    const void *w;
    const uint16_t *scale;
    const float *sc;
    int64_t G, N, K;
} amx_weight;

#define KSLICE 256 /* columns of a panel slice (few_block) */

/* columns of a thread's panel buffer for weights of K columns: a whole panel row, or a slice */
static inline int64_t panel_cols(int64_t K) { return K > KSLICE ? K : KSLICE; }

/* At most 32 tokens (one or two token tiles, `two`): each A tile is used once, so the panel is
   widened / dequantised a slice of KSLICE values at a time into mine (32 x KSLICE bf16, 16 KiB:
   it stays in L1) and multiplied at once; the C tiles sum the K steps in the same order as
   tile_block, so the bits are tile_block's. int8 (fmt 1) and int4 (fmt 2, KSLICE a multiple of
   G) only. A small int8 expert ([1408, 2048] x 3, weights from memory) at 2 / 16 / 32 rows:
   0.90 / 0.95 / 1.07 -> 0.81 / 0.84 / 0.99 ms; an int8 [2048, 2048] product of 16 rows 0.32 ->
   0.24 ms (alternating builds on an AMX Xeon). */
static inline __attribute__((always_inline)) AMX void few_block(const amx_weight *W, int64_t n0, const uint16_t *xp,
                                                                int two, int64_t M, const amx_out *o, uint16_t *mine,
                                                                float *ct, ahead *f) {
    const int64_t K = W->K, Mt = two ? 2 : 1;
    c_zero(two);
    for (int64_t k0 = 0; k0 < K; k0 += KSLICE) {
        const int64_t kl = K - k0 < KSLICE ? K - k0 : KSLICE;
        if (W->fmt == 1)
            for (int i = 0; i < 32; i++) widen_i8((const int8_t *)W->w + (n0 + i) * K + k0, kl, mine + i * KSLICE);
        else
            dequant_i4_panel((const uint8_t *)W->w + n0 * K / 2, W->scale + n0 * (K / W->G), K, W->G, k0, kl, mine,
                             KSLICE);
        for (int64_t s = k0 / 32; s < (k0 + kl) / 32; s++) {
            prefetch_some(f);
            c_step(mine + 32 * s - k0, KSLICE, xp + s * Mt * 512, two);
        }
    }
    c_store(ct, W->sc, n0, 0, two, M, o);
}

/* panel p (rows 32p..32p+31) of W times the chunk's tiles xp (mc tokens) into y (row
   stride ldy); mine: this thread's panel buffer (32 x K bf16), ct: its C tile space
   (CT_FLOATS: 4 KiB a pair of token tiles, panel()'s blocks keep them there). A
   thread's panels of one weight are consecutive (static schedule): p + 1 is prefetched. */
static AMX void weight_panel(const amx_weight *W, int64_t p, const uint16_t *xp, int64_t mc, const amx_out *o,
                             uint16_t *mine, float *ct) {
    const int64_t K = W->K, n0 = 32 * p, rb = W->fmt == 0 ? 2 * K : W->fmt == 1 ? K : K / 2;
    const char *next = 32 * (p + 1) < W->N ? (const char *)W->w + (n0 + 32) * rb : NULL;
    const uint16_t *a = (const uint16_t *)W->w + n0 * K;
    if (mc <= 32 && (W->fmt == 1 || (W->fmt == 2 && KSLICE % W->G == 0))) {
        ahead f = ahead_over(next, 32 * rb, K / 32);
        if (mc > 16) few_block(W, n0, xp, 1, mc, o, mine, ct, &f);
        else few_block(W, n0, xp, 0, mc, o, mine, ct, &f);
        return;
    }
    if (W->fmt == 1) {
        for (int i = 0; i < 32; i++) widen_i8((const int8_t *)W->w + (n0 + i) * K, K, mine + i * K);
        a = mine;
    } else if (W->fmt == 2) {
        dequant_i4_panel((const uint8_t *)W->w + n0 * K / 2, W->scale + n0 * (K / W->G), K, W->G, 0, K, mine, K);
        a = mine;
    }
    panel(a, K, xp, mc, n0, W->sc, o, ct, next, 32 * rb);
}

/* one thread's part of dsvl2_amx_linear (inside its parallel region: the outlined region
   does not take the target attributes, so the tile instructions live here). Per chunk of
   tokens: x's tiles packed by the team, then each thread's panels of 32 weight rows. */
static AMX void linear_team(const uint16_t *x, int64_t ldx, int64_t M, const amx_weight *W, float *y, int64_t ldy,
                            uint16_t *xp, uint16_t *pan, float *cts) {
    const int th = omp_get_thread_num();
    uint16_t *mine = pan + (int64_t)th * 32 * panel_cols(W->K);
    configure();
    const int64_t chunk = chunk_rows(W->K);
    for (int64_t m0 = 0; m0 < M; m0 += chunk) {
        const int64_t mc = M - m0 < chunk ? M - m0 : chunk;
        pack_x(x + m0 * ldx, ldx, NULL, mc, W->K, xp); /* ends in the omp for's barrier */
        const amx_out o = {y + m0 * ldy, ldy, NULL, 0};
#pragma omp for schedule(static)
        for (int64_t p = 0; p < W->N / 32; p++) weight_panel(W, p, xp, mc, &o, mine, cts + th * CT_FLOATS);
        /* its barrier: xp is free for the next chunk */
    }
    _mm_sfence(); /* the streamed lines (store_c) before the region's end */
    _tile_release();
}

/* bf16(silu(g) * u * w) of 16 lanes, in float32: silu(g) = g / (1 + e^-g) with e^-|g|
   (exp_neg16) for either sign (g e^-|g| / (1 + e^-|g|) below 0), rounded to nearest even
   once; the bf16 bits in each 32-bit lane's low half */
static inline __attribute__((always_inline)) AMX __m512i gated16(__m512 g, __m512 u, __m512 w) {
    const __m512 t = exp_neg16(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(g)));
    const __mmask16 neg = _mm512_cmp_ps_mask(g, _mm512_setzero_ps(), _CMP_LT_OQ);
    const __m512 s = _mm512_div_ps(_mm512_mask_mul_ps(g, neg, g, t), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
    return round_bf16_16(_mm512_mul_ps(_mm512_mul_ps(s, u), w));
}

/* The down product's B tiles of slice s (values 32s .. 32s + 31 of F) from gate and up
   results by weight row (g, u [F, ld] float32: value f of token m at f ld + m, as c_store
   leaves them), the routing weights w of the chunk's mc tokens: tile (s, t) at ap + (s Mt +
   t) 512, its row r the pairs (a[m, 32s + 2r], a[m, 32s + 2r + 1]) of tokens 16t .. 16t + 15,
   a = gated16 (pack_x's layout for the [mc, F] rows a; tokens past mc zero, as there) */
static AMX void gated_tiles(const float *g, const float *u, int64_t ld, const float *w, int64_t mc, int64_t s,
                            uint16_t *ap) {
    const int64_t Mt = (mc + 15) / 16;
    for (int64_t t = 0; t < Mt; t++) {
        const int64_t left = mc - 16 * t;
        const __mmask16 m = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512 wv = _mm512_maskz_loadu_ps(m, w + 16 * t);
        uint16_t *tile = ap + (s * Mt + t) * 512;
        for (int r = 0; r < 16; r++) {
            const int64_t f = (32 * s + 2 * r) * ld + 16 * t;
            const __m512i lo = _mm512_maskz_mov_epi32(m, gated16(_mm512_loadu_ps(g + f), _mm512_loadu_ps(u + f), wv));
            const __m512i hi = _mm512_maskz_mov_epi32(
                m, gated16(_mm512_loadu_ps(g + f + ld), _mm512_loadu_ps(u + f + ld), wv));
            _mm512_storeu_si512(tile + 32 * r, _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16)));
        }
    }
}

/* one thread's part of dsvl2_amx_expert: per chunk, gate and up (their panels shared out
   as one list), the gated product rounded to bf16, its tiles, then down */
static AMX void expert_team(const uint16_t *x, const int64_t *rows, int64_t M, const amx_weight *W, const float *wt,
                            float *y, uint16_t *xp, uint16_t *ap, float *g, float *u, uint16_t *pan, int64_t pk,
                            float *cts) {
    const int th = omp_get_thread_num();
    const int64_t D = W[0].K, F = W[0].N, PF = F / 32;
    uint16_t *mine = pan + (int64_t)th * 32 * pk;
    float *ct = cts + th * CT_FLOATS;
    configure();
    for (int64_t m0 = 0; m0 < M; m0 += CHUNK) {
        const int64_t mc = M - m0 < CHUNK ? M - m0 : CHUNK;
        pack_x(rows ? x : x + m0 * D, D, rows ? rows + m0 : NULL, mc, D, xp);
        const amx_out og = {g, CHUNK, NULL, 1}, ou = {u, CHUNK, NULL, 1};
        const amx_out od = {rows ? y : y + m0 * D, D, rows ? rows + m0 : NULL, 0};
#pragma omp for schedule(static)
        for (int64_t q = 0; q < 2 * PF; q++) weight_panel(&W[q / PF], q % PF, xp, mc, q < PF ? &og : &ou, mine, ct);
#pragma omp for schedule(static)
        for (int64_t s = 0; s < F / 32; s++) gated_tiles(g, u, CHUNK, wt + m0, mc, s, ap);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < D / 32; p++) weight_panel(&W[2], p, ap, mc, &od, mine, ct);
    }
    _mm_sfence(); /* the streamed lines (store_c) before the region's end */
    _tile_release();
}

static int weight_ok(int fmt, int64_t N, int64_t K, int64_t G) {
    return N > 0 && N % 32 == 0 && K > 0 && K % 32 == 0 && fmt >= 0 && fmt <= 2 &&
           (fmt != 2 || (G > 0 && G % 32 == 0 && K % G == 0));
}

/* W's int8 row scales as float32 into sc (N of them); other formats: none */
static const float *float_scales(const amx_weight *W, float *sc) {
    if (W->fmt != 1) return NULL;
    for (int64_t n = 0; n < W->N; n++) sc[n] = bf16_to_f32(W->scale[n]);
    return sc;
}

/* y [M, N] float32 (row stride ldy) = x [M, K] bf16 (row stride ldx) times W^T, W [N, K]:
   fmt 0: bf16 values w; 1: int8 q with bf16 per-row scales [N] (each weight row's sums of
   x times q, exact bf16 values, multiplied by its scale in float32: the weight is not
   rounded); 2: int4 (two per byte, low nibble first) with bf16 scales [N, K / G] per group
   of G along k, dequantised to bf16 as ``dsvl2_dequant_i4`` does. N and K multiples of 32
   (and of G for int4, G a multiple of 32). Returns 0; -1 where AMX is not usable; -2 for a
   shape it does not take; -3 where memory ran out. Nothing written unless 0. */
int dsvl2_amx_linear(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, int fmt, const void *w,
                     const uint16_t *scale, int64_t G, int64_t N, float *y, int64_t ldy) {
    if (!dsvl2_amx_usable()) return -1;
    if (M <= 0 || !weight_ok(fmt, N, K, G) || ldx < K || ldy < N) return -2;
    const int nt = omp_get_max_threads();
    const size_t xb = lines((size_t)CHUNK * K * 2), pb = lines((size_t)nt * 32 * panel_cols(K) * 2), cb = (size_t)nt * CT_FLOATS * 4;
    char *buf = scratch(xb + pb + cb + (size_t)N * 4);
    if (!buf) return -3;
    amx_weight W = {fmt, w, scale, NULL, G, N, K};
    W.sc = float_scales(&W, (float *)(buf + xb + pb + cb));
#pragma omp parallel num_threads(nt)
    linear_team(x, ldx, M, &W, y, ldy, (uint16_t *)buf, (uint16_t *)(buf + xb), (float *)(buf + xb + pb));
    return 0;
}

/* One SiLU-gated expert on its M rows x [M, D] bf16 (contiguous), on AMX tiles:
     y [M, D] float32 = down(bf16(silu(gate x) * (up x) * wt))
   or, where rows (int64 [M]) is not NULL, on the rows rows[m] of x [T, D], each result row
   added to y[rows[m]] (y [T, D] float32; one float32 add an element, as torch's
   index_add_): the layer's gather and sum done in the kernel.
   gate / up [F, D], down [D, F], all three in format fmt (as dsvl2_amx_linear) with their
   scales gs / us / ds; int4 groups Gd along D (gate, up) and Gf along F (down). wt [M]
   float32: each row's routing weight, applied before down (F values a row, not D). SiLU
   in float32 with a vector exponential (``gated16``: a few ulps from g / (1 + e^-g)),
   times up and wt, rounded to nearest even bf16 once: the down product's input, as the
   bf16 GEMM path rounds it. One parallel region: x's tiles packed once for gate and up, whose panels the
   team shares out as one list. Returns as dsvl2_amx_linear. */
int dsvl2_amx_expert(const uint16_t *x, const int64_t *rows, int64_t M, int64_t D, int64_t F, int fmt, const void *gate,
                     const uint16_t *gs, const void *up, const uint16_t *us, const void *down, const uint16_t *ds,
                     int64_t Gd, int64_t Gf, const float *wt, float *y) {
    if (!dsvl2_amx_usable()) return -1;
    if (M <= 0 || !weight_ok(fmt, F, D, Gd) || !weight_ok(fmt, D, F, Gf)) return -2;
    const int nt = omp_get_max_threads();
    const int64_t pk = panel_cols(D > F ? D : F);
    const size_t xb = lines((size_t)CHUNK * D * 2), ab = lines((size_t)CHUNK * F * 2), gb = lines((size_t)CHUNK * F * 4),
                 pb = lines((size_t)nt * 32 * pk * 2), cb = (size_t)nt * CT_FLOATS * 4, sb = lines((size_t)(2 * F + D) * 4);
    char *buf = scratch(xb + ab + 2 * gb + pb + cb + sb);
    if (!buf) return -3;
    char *at = buf;
    uint16_t *xp = (uint16_t *)at, *ap = (uint16_t *)(at += xb);
    float *g = (float *)(at += ab), *u = (float *)(at += gb);
    uint16_t *pan = (uint16_t *)(at += gb);
    float *cts = (float *)(at += pb), *sc = (float *)(at += cb);
    amx_weight W[3] = {{fmt, gate, gs, NULL, Gd, F, D}, {fmt, up, us, NULL, Gd, F, D}, {fmt, down, ds, NULL, Gf, D, F}};
    W[0].sc = float_scales(&W[0], sc), W[1].sc = float_scales(&W[1], sc + F), W[2].sc = float_scales(&W[2], sc + 2 * F);
#pragma omp parallel num_threads(nt)
    expert_team(x, rows, M, W, wt, y, xp, ap, g, u, pan, pk, cts);
    return 0;
}

#else /* no AMX in this build */

int dsvl2_amx_usable(void) { return 0; }

int dsvl2_amx_linear(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, int fmt, const void *w,
                     const uint16_t *scale, int64_t G, int64_t N, float *y, int64_t ldy) {
    (void)x, (void)ldx, (void)M, (void)K, (void)fmt, (void)w, (void)scale, (void)G, (void)N, (void)y, (void)ldy;
    return -1;
}

int dsvl2_amx_expert(const uint16_t *x, const int64_t *rows, int64_t M, int64_t D, int64_t F, int fmt, const void *gate,
                     const uint16_t *gs, const void *up, const uint16_t *us, const void *down, const uint16_t *ds,
                     int64_t Gd, int64_t Gf, const float *wt, float *y) {
    (void)x, (void)rows, (void)M, (void)D, (void)F, (void)fmt, (void)gate, (void)gs, (void)up, (void)us, (void)down;
    (void)ds, (void)Gd, (void)Gf, (void)wt, (void)y;
    return -1;
}

#endif
