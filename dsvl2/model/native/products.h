/* Shared between the kernels of dsvl2.model.native (bf16.c: products; layers.c: norms,
   attention and routing of a decode step). */
#ifndef DSVL2_PRODUCTS_H
#define DSVL2_PRODUCTS_H
#include <stdint.h>

/* y[m, n] for n in [n0, n1), all M rows: bf16 weights (scale NULL) or int8 weights with
   bf16 per-row scales. Same per-(row, output) operation sequence whatever M. */
void dsvl2_any_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                    int64_t n0, int64_t n1, float *y, int64_t ldy);
/* the calling OpenMP team splits [0, N) into contiguous blocks, one per thread */
void dsvl2_team_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                     int64_t N, float *y, int64_t ldy);
#endif
