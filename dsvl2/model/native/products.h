/* Shared between the kernels of dsvl2.model.native (bf16.c: products; layers.c: norms,
   attention and routing of a decode step). */
#ifndef DSVL2_PRODUCTS_H
#define DSVL2_PRODUCTS_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

/* a bf16 value as float32: exact, its 16 bits are the float's upper half */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* the 8 lanes of s added in one fixed order: halves, then pairs, then the last two */
static inline float hsum8(__m256 s) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* y[m, n] for n in [n0, n1), all M rows: bf16 weights (scale NULL) or int8 weights with
   bf16 per-row scales. Same per-(row, output) operation sequence whatever M. */
void dsvl2_any_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                    int64_t n0, int64_t n1, float *y, int64_t ldy);
/* the calling OpenMP team splits [0, N) into contiguous blocks, one per thread */
void dsvl2_team_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                     int64_t N, float *y, int64_t ldy);
#endif
