/* Products with int4 weights in the stored format (dsvl2.model.quant), AVX2 + FMA, and
   AVX-512 where the CPU has it (chosen at run time; the library is built for AVX2).

   Weights: q uint8 [N, K/2], column 2j in the low nibble of byte j and 2j + 1 in the high
   one, each stored as v + 8 (u in 0..15); scales bf16 [N, K/G], G the group size (a
   multiple of 32 that divides K): w[n, k] = (u - 8) * scale[n, k / G]. Activations
   float32, result float32.

   Each weight row is read from memory once for all M rows: L bytes (2L columns; L = 8
   lanes for AVX2, 16 for AVX-512) at a time are widened to 32-bit lanes, split into low
   and high nibbles and dequantised in registers to (u - 8) * s, exactly (a 4-bit integer
   times an 8-bit bf16 significand fits float32's 24 bits), so a weight takes the very value
   the reference ``quant.dequantize`` gives it: AVX2 as fma(u, s, -8 s), AVX-512 by a
   16-entry table per group ((u - 8) * s for each u) that the nibbles index (vpermps).
   Products accumulate in float32 with FMA.

   The low nibbles of those L bytes hold their even columns, the high ones their odd
   columns: rather than interleave the weights, the activations are put in that "nibble
   order" once per call (per 2L columns: the L even ones, then the L odd ones; ``order``).

   Per (row, output): two L-lane accumulators, one for the even and one for the odd
   columns, over the column blocks in order, then one fixed reduction. Every path of a
   variant computes each (row, output) by exactly this sequence whatever M is and whichever
   tile it falls in, so a row's bits do not depend on the other rows (the float variants
   differ from each other and from the digits in the last bits: one variant serves a whole
   process).
   Compiled with -ffp-contract=off.

   Where G is a multiple of 128, the products take another road (variant "avx512-vnni",
   and "avx2-digits" on CPUs without AVX-512): integer digits of the activations against
   the nibbles (``tile_dig`` with AVX-512 VNNI, ``tile_dig2`` with AVX2, below; the same
   bits), within 2^-22 of each block's largest activation of the float paths' value.

   Tiles: R activation rows x C weight rows per pass (as bf16.c): a dequantised weight
   block serves R rows; a thread's weight rows are read as C streams side by side. The
   whole MoE layer (mlp.c ``dsvl2_moe_i4``, its products here: ``dsvl2_moe_team4``) follows
   ``dsvl2_moe``: pairs sorted by expert, gate / up, SiLU, down, a weighted sum in ascending
   expert id per token. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "products.h"

#define UNROLL _Pragma("GCC unroll 4")
#define AVX512 __attribute__((target("avx512f")))

/* The variant of the quantised products in use (int4 here, int8 in bf16.c), in order of
   preference: 3 = AVX-512 with VNNI (int4 products of groups of 128 by integer digits,
   below; int8 as 2), 2 = AVX-512 (floats), 1 = AVX2 with the same integer digits (int4;
   int8 as 0), 0 = AVX2 (floats), -1 = not decided yet (the CPU decides: the highest it has). */
enum { V_AVX2 = 0, V_AVX2_DIGITS = 1, V_AVX512 = 2, V_VNNI = 3 };
static int variant_ = -1;

static int cpu_variant(void) {
    if (!__builtin_cpu_supports("avx512f")) return V_AVX2_DIGITS;
    return __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") ? V_VNNI : V_AVX512;
}

static int variant(void) {
    if (variant_ < 0) variant_ = cpu_variant();
    return variant_;
}

int dsvl2_quant_wide(void) { return variant() >= V_AVX512; }

/* Which variant the quantised products use: want 3 .. 0 asks for it (or the highest below
   it the CPU has), -1 only asks. Returns the variant now in use (tests run each on one machine). */
int dsvl2_quant_variant(int want) {
    if (want >= 0) variant_ = want < cpu_variant() ? want : cpu_variant();
    return variant();
}

/* x [M, K] (row stride ldx) -> xp [M, K] in nibble order for L-lane vectors: per 2L
   columns (L bytes of a weight row), the L even columns, then the L odd ones */
static void order(const float *x, int64_t ldx, int64_t M, int64_t K, float *xp, int L) {
    for (int64_t m = 0; m < M; m++) {
        const float *r = x + m * ldx;
        float *o = xp + m * K;
        for (int64_t j = 0; j < K; j += 2 * L)
            for (int i = 0; i < L; i++) {
                o[j + i] = r[j + 2 * i];
                o[j + L + i] = r[j + 2 * i + 1];
            }
    }
}

/* AVX2: R rows of xp (nibble order, L = 8) against the C weight rows n, n + step, ... */
static inline __attribute__((always_inline)) void tile_avx2(
        const float *xp, int64_t ldx, const int R, const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G,
        int64_t n, int64_t step, const int C, int pf, float *y, int64_t ldy) {
    const int64_t kb = K / 2, ng = K / G, ahead = dsvl2_ahead;
    const uint8_t *wr[4];
    const uint16_t *sr[4];
    __m256 ev[4][4], od[4][4];
    const __m256i m15 = _mm256_set1_epi32(15);
    UNROLL for (int c = 0; c < C; c++) {
        wr[c] = q + (n + c * step) * kb;
        sr[c] = scale + (n + c * step) * ng;
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) {
        ev[r][c] = _mm256_setzero_ps();
        od[r][c] = _mm256_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m256 s[4], z[4];
        UNROLL for (int c = 0; c < C; c++) {
            const float f = bf16_to_f32(sr[c][g]);
            s[c] = _mm256_set1_ps(f);
            z[c] = _mm256_set1_ps(-8.0f * f); /* exact: a power of two */
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            if (pf && (k & 127) == 0)
                UNROLL for (int c = 0; c < C; c++) _mm_prefetch((const char *)(wr[c] + k / 2 + ahead), _MM_HINT_T0);
            UNROLL for (int c = 0; c < C; c++) {
                /* 8 bytes: their low nibbles (even columns) and high nibbles (odd columns) */
                const __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(wr[c] + k / 2)));
                const __m256 we = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, m15)), s[c], z[c]);
                const __m256 wo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), s[c], z[c]);
                UNROLL for (int r = 0; r < R; r++) {
                    ev[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx + k), we, ev[r][c]);
                    od[r][c] = _mm256_fmadd_ps(_mm256_loadu_ps(xp + r * ldx + k + 8), wo, od[r][c]);
                }
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        y[r * ldy + n + c * step] = hsum8(_mm256_add_ps(ev[r][c], od[r][c]));
}

/* AVX-512: the same with 16 lanes (L = 16); the weights come from a 16-entry table per
   group and weight row, (u - 8) * scale (exact), looked up by the nibbles (vpermps) */
static inline __attribute__((always_inline)) AVX512 void tile_512(
        const float *xp, int64_t ldx, const int R, const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G,
        int64_t n, int64_t step, const int C, int pf, float *y, int64_t ldy) {
    const int64_t kb = K / 2, ng = K / G, ahead = dsvl2_ahead;
    const uint8_t *wr[4];
    const uint16_t *sr[4];
    __m512 ev[4][4], od[4][4];
    const __m512 u8 = _mm512_set_ps(7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8); /* lane u: u - 8 */
    UNROLL for (int c = 0; c < C; c++) {
        wr[c] = q + (n + c * step) * kb;
        sr[c] = scale + (n + c * step) * ng;
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) {
        ev[r][c] = _mm512_setzero_ps();
        od[r][c] = _mm512_setzero_ps();
    }
    for (int64_t g = 0; g < ng; g++) {
        __m512 t[4];
        UNROLL for (int c = 0; c < C; c++) t[c] = _mm512_mul_ps(u8, _mm512_set1_ps(bf16_to_f32(sr[c][g])));
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
            if (pf && (k & 127) == 0)
                UNROLL for (int c = 0; c < C; c++) _mm_prefetch((const char *)(wr[c] + k / 2 + ahead), _MM_HINT_T0);
            UNROLL for (int c = 0; c < C; c++) {
                const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(wr[c] + k / 2)));
                const __m512 we = _mm512_permutexvar_ps(v, t[c]); /* vpermps reads an index's low 4 bits */
                const __m512 wo = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), t[c]);
                UNROLL for (int r = 0; r < R; r++) {
                    ev[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + r * ldx + k), we, ev[r][c]);
                    od[r][c] = _mm512_fmadd_ps(_mm512_loadu_ps(xp + r * ldx + k + 16), wo, od[r][c]);
                }
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        y[r * ldy + n + c * step] = hsum16(_mm512_add_ps(ev[r][c], od[r][c]));
}

/* Per variant: every row of xp against the C weight rows n, n + step, ... (ROWS rows a
   tile), and rows [n0, n1) of y read as STREAMS parts side by side. ROWS x STREAMS: the
   tiles that keep their accumulators in registers (16 ymm / 32 zmm). Measured on Zen 4,
   one thread, a 1536 x 2560 product: AVX2 2 x 2 (2 x 3 spills: 1.2x slower at M = 2..16);
   AVX-512 4 x 3 (1.25x faster than 3 x 2 at M = 4, 1.1x at M = 2, 16), which is 1.25x
   (M = 1) to 1.6x (M = 16) faster than AVX2. */
#define DEFINE_ROWS4(V, ATTR, ROWS, STREAMS)                                                                   \
static inline __attribute__((always_inline)) ATTR void group_##V(                                            \
        const float *xp, int64_t ldx, int64_t M, const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G, \
        int64_t n, int64_t step, const int C, float *y, int64_t ldy) {                                       \
    for (int64_t m = 0; m < M;) {                                                                            \
        const int pf = m == 0, r = M - m >= ROWS ? ROWS : (int)(M - m);                                      \
        const float *xm = xp + m * ldx;                                                                      \
        float *ym = y + m * ldy;                                                                             \
        if (ROWS >= 4 && r == 4) tile_##V(xm, ldx, 4, q, scale, K, G, n, step, C, pf, ym, ldy);              \
        else if (ROWS >= 3 && r == 3) tile_##V(xm, ldx, 3, q, scale, K, G, n, step, C, pf, ym, ldy);         \
        else if (r == 2) tile_##V(xm, ldx, 2, q, scale, K, G, n, step, C, pf, ym, ldy);                      \
        else tile_##V(xm, ldx, 1, q, scale, K, G, n, step, C, pf, ym, ldy);                                  \
        m += r;                                                                                              \
    }                                                                                                        \
}                                                                                                            \
static ATTR void rows_##V(const float *xp, int64_t M, int64_t K, int64_t G, const uint8_t *q,               \
                          const uint16_t *scale, int64_t n0, int64_t n1, float *y, int64_t ldy) {           \
    const int64_t part = (n1 - n0) / STREAMS;                                                                \
    for (int64_t i = 0; i < part; i++) group_##V(xp, K, M, q, scale, K, G, n0 + i, part, STREAMS, y, ldy);  \
    for (int64_t n = n0 + STREAMS * part; n < n1; n++) group_##V(xp, K, M, q, scale, K, G, n, 1, 1, y, ldy); \
}

DEFINE_ROWS4(avx2, , 2, 2)
DEFINE_ROWS4(512, AVX512, 4, 3)

/* AVX-512 VNNI ("digits"): where G is a multiple of 128, each row of x is written, per
   block of 128 columns, as three signed 8-bit digits per value against a block scale
   sx = max|x| / 127:  x ~ sx (d0 + d1 / 128 + d2 / 128^2),  d0 in [-127, 127], d1, d2 in
   [-64, 64] (each digit the rounded remainder of the one before: the value to within
   sx / 2^15, i.e. 2^-22 of the block's largest), and the products of the nibbles u with
   the digits are summed exactly in 32-bit integers by vpdpbusd (64 byte products per
   instruction, where the float path takes an FMA per 16 weights and two table lookups).
   Per block and output: the lanes' (sum u d0) 2^14 + (sum u d1) 2^7 + (sum u d2) less
   8 sum (d0 2^14 + d1 2^7 + d2) (the "- 8" of the stored format, precomputed per block and
   lane: at most 4e8, no overflow), converted to float32 once and times the weight's group
   scale and sx. A row's numbers depend on that row only (its digits, then one fixed
   sequence per block); they differ from the float paths by the digits' rounding
   (tests/test_quant.py holds them to the float32 product within that bound).

   A prepared row keeps the float row's size, 512 bytes a block: the digits d0 of its even
   columns (64 bytes: byte i is column 2i, the low nibbles' columns), of its odd columns,
   then d1 and d2 the same way, the 16 lanes' corrections (int32), sx 2^-14 (float32), padding. */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define DIGIT_BLOCK 128
#define DIGIT_BYTES 512
#define DIGIT_CORR 384
#define DIGIT_SCALE 448

/* 8 integer-valued floats (|v| <= 127) as 8 signed bytes at o */
static inline void store_digits8(__m256 v, uint8_t *o) {
    const __m256i i = _mm256_cvtps_epi32(v);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64((__m128i *)o, _mm_packs_epi16(w, w));
}

/* one block: 128 float32 values in column order -> its 512 prepared bytes (o may be src).
   AVX2, for both digits paths (the products read the same bytes on AVX2 and AVX-512). */
static void digits_block(const float *src, uint8_t *o) {
    float t[DIGIT_BLOCK], lanes[8];
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    __m256 a = _mm256_setzero_ps();
    int nan = 0;
    for (int i = 0; i < DIGIT_BLOCK; i += 8) {
        const __m256 v = _mm256_loadu_ps(src + i);
        _mm256_storeu_ps(t + i, v);
        a = _mm256_max_ps(a, _mm256_and_ps(v, absmask));
        nan |= _mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    _mm256_storeu_ps(lanes, a);
    float m = lanes[0], unscale = 1.0f;
    for (int i = 1; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    memset(o, 0, DIGIT_SCALE);
    if (nan || m == INFINITY || m == 0.0f) { /* no digits: a non-finite value makes every sum NaN */
        const float sx = m == 0.0f && !nan ? 0.0f : NAN;
        memcpy(o + DIGIT_SCALE, &sx, 4);
        return;
    }
    if (m < 0x1p-100f) { /* 127 / m would overflow: digits of the values times 2^100 */
        for (int i = 0; i < DIGIT_BLOCK; i++) t[i] *= 0x1p100f;
        m *= 0x1p100f;
        unscale = 0x1p-100f;
    }
    const __m256 inv = _mm256_set1_ps(127.0f / m), base = _mm256_set1_ps(128.0f);
    const int rn = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    for (int j = 0; j < DIGIT_BLOCK; j += 16) {
        const __m256 p = _mm256_loadu_ps(t + j), q = _mm256_loadu_ps(t + j + 8);
        for (int half = 0; half < 2; half++) {
            /* columns j + 2i (+1 for the odd half), i = 0..7: bytes j / 2 .. j / 2 + 7 of the half */
            const __m256 pair = half ? _mm256_shuffle_ps(p, q, _MM_SHUFFLE(3, 1, 3, 1))
                                     : _mm256_shuffle_ps(p, q, _MM_SHUFFLE(2, 0, 2, 0));
            const __m256 v = _mm256_mul_ps(
                _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(pair), _MM_SHUFFLE(3, 1, 2, 0))), inv);
            const __m256 d0 = _mm256_round_ps(v, rn);
            const __m256 r1 = _mm256_mul_ps(_mm256_sub_ps(v, d0), base); /* both steps exact */
            const __m256 d1 = _mm256_round_ps(r1, rn);
            const __m256 d2 = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(r1, d1), base), rn);
            store_digits8(d0, o + 64 * half + j / 2);
            store_digits8(d1, o + 128 + 64 * half + j / 2);
            store_digits8(d2, o + 256 + 64 * half + j / 2);
        }
    }
    /* per lane (columns 8l .. 8l + 7; bytes 4l .. 4l + 3 of each half): -8 (S0 2^14 + S1 2^7 + S2),
       Sk the lane's digits k summed */
    const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) {
        __m256i s[3];
        for (int k = 0; k < 3; k++) {
            const uint8_t *dk = o + 128 * k + 32 * h; /* digits k of the even columns; + 64: the odd */
            const __m256i e = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)dk));
            const __m256i d = _mm256_maddubs_epi16(ones8, _mm256_loadu_si256((const __m256i *)(dk + 64)));
            s[k] = _mm256_madd_epi16(_mm256_add_epi16(e, d), ones16);
        }
        const __m256i sum =
            _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(s[0], 14), _mm256_slli_epi32(s[1], 7)), s[2]);
        _mm256_storeu_si256((__m256i *)(o + DIGIT_CORR + 32 * h), _mm256_mullo_epi32(sum, _mm256_set1_epi32(-8)));
    }
    const float sx = m / 127.0f * (unscale * 0x1p-14f); /* the digits' sums are in units of 2^-14 */
    memcpy(o + DIGIT_SCALE, &sx, 4);
}

/* M rows of x (row stride ldx, K a multiple of 128) prepared into out (row stride K floats'
   bytes); out may be x when ldx = K */
static void digits(const float *x, int64_t ldx, int64_t M, int64_t K, float *out) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < K / DIGIT_BLOCK; b++)
            digits_block(x + m * ldx + b * DIGIT_BLOCK, (uint8_t *)(out + m * K) + b * DIGIT_BYTES);
}

/* R prepared rows (xp, row stride ldx floats) against the C weight rows n, n + step, ... */
static inline __attribute__((always_inline)) VNNI void tile_dig(
        const float *xp, int64_t ldx, const int R, const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G,
        int64_t n, int64_t step, const int C, int pf, float *y, int64_t ldy) {
    const int64_t kb = K / 2, ng = K / G, per = G / DIGIT_BLOCK, ahead = dsvl2_ahead;
    const uint8_t *wr[4];
    const uint16_t *sr[4];
    __m512 acc[4][4];
    const __m512i m15 = _mm512_set1_epi8(15);
    UNROLL for (int c = 0; c < C; c++) {
        wr[c] = q + (n + c * step) * kb;
        sr[c] = scale + (n + c * step) * ng;
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t b = 0; b < K / DIGIT_BLOCK; b++) {
        __m512i lo[4], hi[4];
        __m512 s[4];
        UNROLL for (int c = 0; c < C; c++) {
            if (pf) _mm_prefetch((const char *)(wr[c] + b * 64 + ahead), _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512(wr[c] + b * 64);
            lo[c] = _mm512_and_si512(w, m15);                       /* even columns */
            hi[c] = _mm512_and_si512(_mm512_srli_epi32(w, 4), m15); /* odd columns */
            s[c] = _mm512_set1_ps(bf16_to_f32(sr[c][b / per]));
        }
        UNROLL for (int r = 0; r < R; r++) {
            const uint8_t *d = (const uint8_t *)(xp + r * ldx) + b * DIGIT_BYTES;
            const __m512 sx = _mm512_set1_ps(*(const float *)(d + DIGIT_SCALE));
            UNROLL for (int c = 0; c < C; c++) {
                __m512i a0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], _mm512_loadu_si512(d));
                a0 = _mm512_dpbusd_epi32(a0, hi[c], _mm512_loadu_si512(d + 64));
                __m512i a1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo[c], _mm512_loadu_si512(d + 128));
                a1 = _mm512_dpbusd_epi32(a1, hi[c], _mm512_loadu_si512(d + 192));
                __m512i a2 = _mm512_dpbusd_epi32(_mm512_loadu_si512(d + DIGIT_CORR), lo[c], _mm512_loadu_si512(d + 256));
                a2 = _mm512_dpbusd_epi32(a2, hi[c], _mm512_loadu_si512(d + 320));
                const __m512i l = _mm512_add_epi32(_mm512_add_epi32(_mm512_slli_epi32(a0, 14), _mm512_slli_epi32(a1, 7)), a2);
                acc[r][c] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(l), s[c]), sx, acc[r][c]);
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        y[r * ldy + n + c * step] = hsum16(acc[r][c]);
}

/* 4 x 4 on Intel CPUs (dsvl2_wide_streams), 4 x 3 elsewhere: on the AMX Xeon (2 threads, a
   [1536, 2560] product from memory, 2 MiB pages, five alternating rounds, medians) one row
   19.5 -> 20.5 GB/s, four rows 8.7 -> 9.5, sixteen 2.4 -> 2.5; the same bits (a (row, output)
   is one fixed sequence whatever the tile); 3 x 4: 20.7 / 8.9 / 2.4 */
DEFINE_ROWS4(dig, VNNI, 4, 4)
#define tile_dig3 tile_dig /* the same tile, walked as three streams */
DEFINE_ROWS4(dig3, VNNI, 4, 3)

/* AVX2 ("avx2-digits"): the same digits and the same integers, 32 bytes of nibbles (lanes
   8h .. 8h + 7 of the block) at a time. Per digit, vpmaddubsw (unsigned nibbles times
   signed digits, pairs summed in 16 bits: at most 2 x 15 x 127, no saturation) for the
   even and the odd columns, their sum, and vpmaddwd by 2^14, 2^7 or 1 (the lane's 4 byte
   pairs in 32 bits) give each lane the very integer vpdpbusd gives it; then the same
   conversion, scale and FMA per lane, the two halves added before hsum8 as hsum16 adds
   them: the same bits as the AVX-512 VNNI path. 1.7x the AVX2 float path's products from
   L2 and 1.6x from memory on Zen 3 (one row, groups of 128). */
static inline __attribute__((always_inline)) void tile_dig2(
        const float *xp, int64_t ldx, const int R, const uint8_t *q, const uint16_t *scale, int64_t K, int64_t G,
        int64_t n, int64_t step, const int C, int pf, float *y, int64_t ldy) {
    const int64_t kb = K / 2, ng = K / G, per = G / DIGIT_BLOCK, ahead = dsvl2_ahead;
    const uint8_t *wr[4];
    const uint16_t *sr[4];
    __m256 acc[4][4][2];
    const __m256i m15 = _mm256_set1_epi8(15), p0 = _mm256_set1_epi16(1 << 14), p1 = _mm256_set1_epi16(1 << 7),
                  p2 = _mm256_set1_epi16(1);
    UNROLL for (int c = 0; c < C; c++) {
        wr[c] = q + (n + c * step) * kb;
        sr[c] = scale + (n + c * step) * ng;
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        acc[r][c][0] = acc[r][c][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < K / DIGIT_BLOCK; b++) {
        UNROLL for (int c = 0; c < C; c++) {
            if (pf) _mm_prefetch((const char *)(wr[c] + b * 64 + ahead), _MM_HINT_T0);
            const __m256 s = _mm256_set1_ps(bf16_to_f32(sr[c][b / per]));
            UNROLL for (int h = 0; h < 2; h++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *)(wr[c] + b * 64 + 32 * h));
                const __m256i lo = _mm256_and_si256(w, m15);                       /* even columns */
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(w, 4), m15); /* odd columns */
                UNROLL for (int r = 0; r < R; r++) {
                    const uint8_t *d = (const uint8_t *)(xp + r * ldx) + b * DIGIT_BYTES;
                    const uint8_t *dh = d + 32 * h;
#define DIGIT_PAIRS(k) _mm256_add_epi16(                                                                 \
        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(dh + 128 * (k)))),                \
        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(dh + 128 * (k) + 64))))
                    const __m256i l = _mm256_add_epi32(
                        _mm256_add_epi32(_mm256_madd_epi16(DIGIT_PAIRS(0), p0), _mm256_madd_epi16(DIGIT_PAIRS(1), p1)),
                        _mm256_add_epi32(_mm256_madd_epi16(DIGIT_PAIRS(2), p2),
                                         _mm256_loadu_si256((const __m256i *)(dh + DIGIT_CORR))));
#undef DIGIT_PAIRS
                    const __m256 sx = _mm256_set1_ps(*(const float *)(d + DIGIT_SCALE));
                    acc[r][c][h] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(l), s), sx, acc[r][c][h]);
                }
            }
        }
    }
    UNROLL for (int r = 0; r < R; r++) UNROLL for (int c = 0; c < C; c++)
        y[r * ldy + n + c * step] = hsum8(_mm256_add_ps(acc[r][c][0], acc[r][c][1]));
}

DEFINE_ROWS4(dig2, , 1, 3)

/* the path of an int4 product: floats on AVX2 or AVX-512, or integer digits (groups G a
   multiple of 128) on AVX-512 VNNI or AVX2 */
enum { P_AVX2 = 0, P_512 = 1, P_VNNI = 2, P_DIG2 = 3 };
static int path4(int v, int64_t G) {
    const int dig = G % DIGIT_BLOCK == 0;
    if (v == V_VNNI) return dig ? P_VNNI : P_512;
    if (v == V_AVX512) return P_512;
    if (v == V_AVX2_DIGITS) return dig ? P_DIG2 : P_AVX2;
    return P_AVX2;
}
static int digits_path(int p) { return p == P_VNNI || p == P_DIG2; }

/* M rows of x (row stride ldx, K wide) as path p's products read them, into xp (row stride K) */
static void prepare(int p, const float *x, int64_t ldx, int64_t M, int64_t K, float *xp) {
    if (digits_path(p)) digits(x, ldx, M, K, xp);
    else order(x, ldx, M, K, xp, p == P_512 ? 16 : 8);
}

/* rows [n0, n1) of y for all M rows of xp (prepared for path p by ``prepare``, row stride K);
   a call reads the variant once (``path4``) and passes the path down */
static void rows4(int p, const float *xp, int64_t M, int64_t K, int64_t G, const uint8_t *q, const uint16_t *scale,
                  int64_t n0, int64_t n1, float *y, int64_t ldy) {
    switch (p) {
    case P_VNNI: (dsvl2_wide_streams == 4 ? rows_dig : rows_dig3)(xp, M, K, G, q, scale, n0, n1, y, ldy); break;
    case P_DIG2: rows_dig2(xp, M, K, G, q, scale, n0, n1, y, ldy); break;
    case P_512: rows_512(xp, M, K, G, q, scale, n0, n1, y, ldy); break;
    default: rows_avx2(xp, M, K, G, q, scale, n0, n1, y, ldy);
    }
}

/* [0, N) shared out among the calling team in chunks (products.h team_chunk) */
static void team4(int w, const float *xp, int64_t M, int64_t K, int64_t G, const uint8_t *q,
                  const uint16_t *scale, int64_t N, float *y, int64_t ldy) {
    const int64_t ch = team_chunk(N, omp_get_num_threads());
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t n0 = 0; n0 < N; n0 += ch) rows4(w, xp, M, K, G, q, scale, n0, n0 + ch < N ? n0 + ch : N, y, ldy);
}

/* y [M, N] = x [M, K] . w^T, w the int4 weight (q [N, K/2], scale [N, K/G]);
   xp: float32 scratch [M, K] (x as the product's path reads it: ``prepare``) */
void dsvl2_linear_i4(const float *x, int64_t M, int64_t K, const uint8_t *q, const uint16_t *scale, int64_t G,
                     int64_t N, float *y, float *xp) {
    const int w = path4(variant(), G);
    prepare(w, x, K, M, K, xp);
    int nt = omp_get_max_threads();
    if ((int64_t)N * K < (1 << 17)) nt = 1; /* a fork costs more than the product */
#pragma omp parallel num_threads(nt)
    team4(w, xp, M, K, G, q, scale, N, y, N);
}

/* one group of G values (G / 2 bytes, a multiple of 16) of a row, 32 values a step: the 16
   bytes widened to 32-bit lanes, low and high nibbles (even and odd columns) each as
   (u - 8) * s, then put side by side in column order: as bf16 pairs in one 32-bit lane
   each, as float32 by a two-source permute. The same bits as the plain loop. */
static AVX512 void dequant_group_512(const uint8_t *b, int64_t G, float s, float *o32, uint16_t *o16) {
    const __m512 vs = _mm512_set1_ps(s);
    const __m512i mask = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
    for (int64_t j = 0; j < G / 2; j += 16) {
        const __m512i d = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(b + j)));
        const __m512 lo = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(d, mask), eight)), vs);
        const __m512 hi = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(d, 4), eight)), vs);
        if (o16)
            _mm512_storeu_si512(o16 + 2 * j, _mm512_or_si512(round_bf16_16(lo), _mm512_slli_epi32(round_bf16_16(hi), 16)));
        else {
            _mm512_storeu_ps(o32 + 2 * j, _mm512_permutex2var_ps(lo, first, hi));
            _mm512_storeu_ps(o32 + 2 * j + 16, _mm512_permutex2var_ps(lo, second, hi));
        }
    }
}

/* the same on AVX2, float32 only: 16 values a step, the low and high nibbles' lanes
   interleaved into column order by unpack and a 128-bit lane permute */
static void dequant_group_avx2(const uint8_t *b, int64_t G, float s, float *o32) {
    const __m256 vs = _mm256_set1_ps(s);
    const __m256i mask = _mm256_set1_epi32(15), eight = _mm256_set1_epi32(8);
    for (int64_t j = 0; j < G / 2; j += 8) {
        const __m256i d = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(b + j)));
        const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_and_si256(d, mask), eight)), vs);
        const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(d, 4), eight)), vs);
        const __m256 a = _mm256_unpacklo_ps(lo, hi), c = _mm256_unpackhi_ps(lo, hi); /* per 128-bit lane */
        _mm256_storeu_ps(o32 + 2 * j, _mm256_permute2f128_ps(a, c, 0x20));
        _mm256_storeu_ps(o32 + 2 * j + 8, _mm256_permute2f128_ps(a, c, 0x31));
    }
}

/* The float32 weight, or its bf16 rounding, of rows [0, N): out [N, K] float32 (obf16 = 0)
   or bf16 (obf16 = 1). For the prefill products (a block of rows dequantised into a
   reused buffer, then one GEMM). AVX-512 (the quantised products' variant, and G a
   multiple of 32), else AVX2 for float32, else (bf16 on AVX2) plain loops the compiler
   vectorises. The same bits on every path. */
void dsvl2_dequant_i4(const uint8_t *q, const uint16_t *scale, int64_t N, int64_t K, int64_t G, void *out,
                      int obf16) {
    const int64_t kb = K / 2, ng = K / G;
    const int w = dsvl2_quant_wide() && G % 32 == 0;
#pragma omp parallel for schedule(static) if (N * K >= (1 << 17))
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *b = q + n * kb;
        float *o32 = (float *)out + n * K;
        uint16_t *o16 = (uint16_t *)out + n * K;
        for (int64_t g = 0; g < ng; g++) {
            const float s = bf16_to_f32(scale[n * ng + g]);
            const int64_t j0 = g * G / 2, j1 = j0 + G / 2;
            if (w)
                dequant_group_512(b + j0, G, s, obf16 ? NULL : o32 + 2 * j0, obf16 ? o16 + 2 * j0 : NULL);
            else if (!obf16 && G % 16 == 0)
                dequant_group_avx2(b + j0, G, s, o32 + 2 * j0);
            else if (obf16)
                for (int64_t j = j0; j < j1; j++) {
                    o16[2 * j] = round_bf16((float)((b[j] & 15) - 8) * s);
                    o16[2 * j + 1] = round_bf16((float)((b[j] >> 4) - 8) * s);
                }
            else
                for (int64_t j = j0; j < j1; j++) {
                    o32[2 * j] = (float)((b[j] & 15) - 8) * s;
                    o32[2 * j + 1] = (float)((b[j] >> 4) - 8) * s;
                }
        }
    }
}

/* an expert's weight stream costs about as much as this many of its rows (work split) */
#define COST_STREAM4 2

static inline float silu_mul4(float g, float u) { return g / (1.0f + expf(-g)) * u; }

/* silu(g) * u of one pair's F values, written over g in the nibble order for L lanes */
static void silu_ordered(float *g, const float *u, int64_t F, int L) {
    for (int64_t j = 0; j < F; j += 2 * L) {
        float t[32];
        for (int i = 0; i < 2 * L; i++) t[i] = silu_mul4(g[j + i], u[j + i]);
        for (int i = 0; i < L; i++) {
            g[j + i] = t[2 * i];
            g[j + L + i] = t[2 * i + 1];
        }
    }
}

/* silu(g) * u of one pair's F values, written over g as path p's products read them */
static void silu_prepared(int p, float *g, const float *u, int64_t F) {
    if (!digits_path(p)) {
        silu_ordered(g, u, F, p == P_512 ? 16 : 8);
        return;
    }
    for (int64_t j = 0; j < F; j++) g[j] = silu_mul4(g[j], u[j]);
    digits(g, F, 1, F, g);
}

/* mlp.c dsvl2_moe_i4's inputs gathered into mc->xs, prepared for the gate / up path */
void dsvl2_moe_gather4(const mlp_call *mc) {
    const int64_t D = mc->D, k = mc->k;
    const int wd = path4(variant(), mc->m->Gd);
    for (int64_t i = 0; i < mc->T * k; i++) prepare(wd, mc->x + (mc->order[i] / k) * D, D, 1, D, mc->xs + i * D);
}

/* the products of mlp.c's dsvl2_moe_i4 (products.h mlp_call): every thread of the team calls it */
void dsvl2_moe_team4(const mlp_call *mc) {
    const dsvl2_mlp *m = mc->m;
    const int64_t E = m->E, F = m->F, D = mc->D, Gd = m->Gd, Gf = m->Gf;
    const uint8_t *gq = m->gate, *uq = m->up, *dq = m->down;
    const uint16_t *gs = m->gs, *us = m->us, *ds = m->ds;
    const int64_t *start = mc->order + mc->T * mc->k;
    float *xs = mc->xs, *g = mc->g, *u = mc->u, *ys = mc->ys;
    const int wd = path4(variant(), Gd), wf = path4(variant(), Gf); /* gate / up, down */
    const int64_t gstride = F * (D / Gd), dstride = D * (F / Gf);   /* scales per expert */
    const int th = omp_get_thread_num(), nth = omp_get_num_threads();
    if (mc->used >= 2 * nth) { /* whole experts per thread (products.h expert_run) */
        int64_t lo, hi;
        expert_run(start, E, COST_STREAM4, th, nth, &lo, &hi);
        for (int64_t e = lo; e < hi; e++) {
            int64_t s = start[e], c = start[e + 1] - s;
            if (c == 0) continue;
            rows4(wd, xs + s * D, c, D, Gd, gq + e * F * D / 2, gs + e * gstride, 0, F, g + s * F, F);
            rows4(wd, xs + s * D, c, D, Gd, uq + e * F * D / 2, us + e * gstride, 0, F, u + s * F, F);
            for (int64_t i = s; i < s + c; i++) silu_prepared(wf, g + i * F, u + i * F, F);
            rows4(wf, g + s * F, c, F, Gf, dq + e * D * F / 2, ds + e * dstride, 0, D, ys + s * D, D);
        }
        return;
    }
    for (int64_t e = 0; e < E; e++) {
        int64_t s = start[e], c = start[e + 1] - s;
        if (c == 0) continue; /* same decision in every thread */
        team4(wd, xs + s * D, c, D, Gd, gq + e * F * D / 2, gs + e * gstride, F, g + s * F, F);
        team4(wd, xs + s * D, c, D, Gd, uq + e * F * D / 2, us + e * gstride, F, u + s * F, F);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int64_t i = s; i < s + c; i++) silu_prepared(wf, g + i * F, u + i * F, F);
        /* implicit barrier */
        team4(wf, g + s * F, c, F, Gf, dq + e * D * F / 2, ds + e * dstride, D, ys + s * D, D);
    }
}
