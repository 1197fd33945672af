/* The vision tower's tanh GELU on float32, in place (dsvl2.model.native ``gelu_tanh_``).

   Why: where the vision tower's products run in float32 (CPUs without bf16 matrix units),
   its MLP applies GELU to a [tiles x 729, 4304] float32 hidden (22 M values for a 7-tile
   photo) in every one of its 27 blocks. torch computes tanh to ~1 ulp with a long
   polynomial and writes a new tensor: 44 ms a block on 2 Zen 3 threads, ~1.2 s a photo.
   Here one pass, in place, at about the speed memory gives.

   Math: gelu(x) = x / 2 (1 + tanh(u)), u = sqrt(2 / pi) (x + 0.044715 x^3), the
   reference's formula; since (1 + tanh(u)) / 2 = 1 / (1 + e^(-2u)), it is computed from one
   exponential and one division (gelu8), without the cancellation of 1 + tanh(u) where
   tanh(u) is near -1 (torch's formula loses the small values there). e^t by the range
   reduction and Taylor polynomial of products.h's exp_neg16. Results are within a few
   float32 ulps of |x| of the exact value, as torch's are (tests/test_native_gelu.py checks
   both against float64). */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

/* e^r's Taylor coefficients, highest first: 1 / 7!, ..., 1 / 1!, 1 / 0! */
static const float TAYLOR[8] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};

/* e^t for t <= 0, 8 lanes: 2^n e^r as products.h's exp_neg16; below -87 (where 2^n would
   leave the normal floats) 0 */
static inline __m256 exp_neg8(__m256 t) {
    const __m256 lo = _mm256_set1_ps(-87.0f);
    const __m256 keep = _mm256_cmp_ps(t, lo, _CMP_GE_OQ);
    t = _mm256_max_ps(t, lo);
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(t, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), t);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(TAYLOR[0]);
#pragma GCC unroll 8
    for (int i = 1; i < 8; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(TAYLOR[i]));
    /* 2^n: n in [-126, 0], so n + 127 is a normal float's exponent */
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_and_ps(keep, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}

/* 8 lanes of gelu. With t = -2u = x (c0 + c1 x^2) (c0 = -2 sqrt(2 / pi), c1 = c0 0.044715)
   and e = e^(-|t|) <= 1: x / (1 + e) where t <= 0, x e / (1 + e) where t > 0 (the same
   value, without e^t overflowing) */
static inline __m256 gelu8(__m256 x) {
    const __m256 c0 = _mm256_set1_ps(-1.5957691216057308f), c1 = _mm256_set1_ps(-0.0713548162726009f);
    const __m256 t = _mm256_mul_ps(x, _mm256_fmadd_ps(_mm256_mul_ps(x, x), c1, c0));
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const __m256 e = exp_neg8(_mm256_xor_ps(_mm256_and_ps(t, abs_mask), _mm256_set1_ps(-0.0f)));
    const __m256 num = _mm256_blendv_ps(x, _mm256_mul_ps(x, e), _mm256_cmp_ps(t, _mm256_setzero_ps(), _CMP_GT_OQ));
    return _mm256_div_ps(num, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
}

#define CHUNK 16384 /* values a task: 64 KiB, a fork pays from a few of them */

/* x[0..n) = gelu(x[0..n)) */
void dsvl2_gelu_tanh(float *x, int64_t n) {
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (chunks >= 4)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        int64_t i = lo;
        for (; i + 8 <= hi; i += 8) _mm256_storeu_ps(x + i, gelu8(_mm256_loadu_ps(x + i)));
        if (i < hi) { /* the tail through a zero-padded vector: the same arithmetic */
            float v[8] = {0};
            for (int64_t j = i; j < hi; j++) v[j - i] = x[j];
            _mm256_storeu_ps(v, gelu8(_mm256_loadu_ps(v)));
            for (int64_t j = i; j < hi; j++) x[j] = v[j - i];
        }
    }
}

/* The tanh GELU of bf16 values by table, in place (``gelu_tanh_bf16_``).

   Why: the vision tower's fc1 result is bf16 where its products run in bf16, [tiles x
   729, 4304] of them in each of 27 blocks. A bf16 value has 65,536 bit patterns, so its
   GELU rounded to bf16 is one table read: `table` holds the GELU of every pattern (built
   by the wrapper with dsvl2_gelu_tanh above, then rounded once), read by gathers from L2
   (the table is 128 KiB): 1.5 ms for a 4-tile fc1 result on 2 threads.
   `table` has 65,537 entries: the gathers read 32 bits at a 16-bit index, the last one a
   pattern past the end. */
void dsvl2_gelu_tanh_bf16(uint16_t *x, int64_t n, const uint16_t *table) {
    const int64_t chunks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for schedule(static) if (chunks >= 4)
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * CHUNK, hi = lo + CHUNK < n ? lo + CHUNK : n;
        const __m256i low16 = _mm256_set1_epi32(0xffff);
        int64_t i = lo;
        for (; i + 16 <= hi; i += 16) {
            const __m256i v = _mm256_loadu_si256((const __m256i *)(x + i));
            const __m256i a = _mm256_i32gather_epi32((const int *)table, _mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 2);
            const __m256i b = _mm256_i32gather_epi32((const int *)table, _mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 2);
            /* packus interleaves the 128-bit lanes (a0-3 b0-3 a4-7 b4-7): the permute restores the order */
            const __m256i p = _mm256_packus_epi32(_mm256_and_si256(a, low16), _mm256_and_si256(b, low16));
            _mm256_storeu_si256((__m256i *)(x + i), _mm256_permute4x64_epi64(p, 0xD8));
        }
        for (; i < hi; i++) x[i] = table[x[i]];
    }
}
