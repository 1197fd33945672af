/* The vision tower's residual add and the LayerNorm after it, in one pass (dsvl2.model.native
   ``add_layernorm_``).

   Why: where the tower's products run in bf16, each block adds the attention's and the
   MLP's bf16 results to the float32 residual stream, LayerNorms the stream and casts the
   result to bf16 for the next product: three torch passes and three new tensors over
   [tiles x 729, 1152] each time (~3.9 ms of a 67 ms block on 4 tiles, an Intel Xeon with
   AMX, 2 threads). Here one pass a row, the stream updated in place.

   Math, per row of W values: x += y (y bf16, widened exactly; one float32 rounding, torch's
   x + y); mean = sum x / W; var = sum (x - mean)^2 / W (two passes over the row, which
   stays in L1; float32 sums in 8 lanes added in a fixed order); out = (x - mean) * rstd * w
   + b, rstd = 1 / sqrt(var + eps), as float32 or rounded to bf16 (nearest even, as torch's
   cast). A row's result does not depend on the other rows. Not torch's bits (its moments
   use another summation): tests/test_native_layernorm.py holds it to the float64
   LayerNorm. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "products.h"

/* 8 bf16 values as float32 (exact) */
static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 finite float32 values rounded to bf16 (nearest even), stored */
static inline void store_bf16x8(uint16_t *p, __m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i *)p, _mm256_castsi256_si128(packed));
}

/* x [N, W] float32 (rows contiguous, in place) += y [N, W] bf16 (NULL: nothing added); out
   [N, W] = LayerNorm(x) with float32 weight w and bias b (NULL: 1 / 0), float32 (obf16 0) or
   bf16. W a multiple of 8. */
void dsvl2_add_layernorm(float *x, const uint16_t *y, int64_t N, int64_t W, const float *w, const float *b,
                         float eps, void *out, int obf16) {
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        float *xr = x + n * W;
        __m256 s = _mm256_setzero_ps();
        if (y) {
            const uint16_t *yr = y + n * W;
            for (int64_t j = 0; j < W; j += 8) {
                const __m256 v = _mm256_add_ps(_mm256_loadu_ps(xr + j), widen8(yr + j));
                _mm256_storeu_ps(xr + j, v);
                s = _mm256_add_ps(s, v);
            }
        } else
            for (int64_t j = 0; j < W; j += 8) s = _mm256_add_ps(s, _mm256_loadu_ps(xr + j));
        const float mean = hsum8(s) / (float)W;
        const __m256 vm = _mm256_set1_ps(mean);
        __m256 q = _mm256_setzero_ps();
        for (int64_t j = 0; j < W; j += 8) {
            const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(xr + j), vm);
            q = _mm256_add_ps(q, _mm256_mul_ps(d, d));
        }
        const __m256 rstd = _mm256_set1_ps(1.0f / sqrtf(hsum8(q) / (float)W + eps));
        for (int64_t j = 0; j < W; j += 8) {
            __m256 o = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + j), vm), rstd);
            if (w) o = _mm256_mul_ps(o, _mm256_loadu_ps(w + j));
            if (b) o = _mm256_add_ps(o, _mm256_loadu_ps(b + j));
            if (obf16) store_bf16x8((uint16_t *)out + n * W + j, o);
            else _mm256_storeu_ps((float *)out + n * W + j, o);
        }
    }
}
