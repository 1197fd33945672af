/* Shared between the kernels of dsvl2.model.native (bf16.c: products; layers.c: norms,
   attention and routing of a decode step; step.c: all decoder layers of a step). */
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

/* the blocks that step.c strings together (documented where they are defined) */
void dsvl2_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y);
int dsvl2_moe(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
              const void *gate, const void *up, const void *down, int64_t E, int64_t F,
              float *out, float *scratch, int64_t *order,
              int64_t esize, const uint16_t *gs, const uint16_t *us, const uint16_t *ds);
void dsvl2_rmsnorm(const float *x, int64_t M, int64_t D, const void *weight, int wbf16, float eps, float *y);
void dsvl2_route_greedy(float *logits, int64_t T, int64_t E, int64_t k, int sigmoid, int norm, float scaling,
                        int64_t *idx, float *wt);
int64_t dsvl2_mha_scratch(int64_t B, int64_t H, int64_t Hk, int64_t hd, int64_t S);
int dsvl2_mha_decode(const float *x, int64_t B, int64_t D, int64_t H, int64_t Hk, int64_t hd,
                     const uint16_t *wq, const uint16_t *wk, const uint16_t *wv, const uint16_t *wo,
                     const float *bq, const float *bk, const float *bv, const float *bo,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t NB, int64_t BS,
                     const int64_t *table, int64_t W, const int64_t *pos, float scale, float *out, float *scratch);
int dsvl2_check_tables(int64_t B, int64_t NB, int64_t BS, const int64_t *table, int64_t W, const int64_t *pos);
#endif
