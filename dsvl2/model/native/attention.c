/* Prefill and vision attention with bf16 inputs, on CPUs with AVX-512 BF16 (vdpbf16ps):

     out[b, h, i, :] = sum_j p_ij v[b, hk, j, :],  p_ij = softmax_j(scale * q_i . k_j + mask[b, i, j])

   for the queries i < T and keys j < S of each (row b, head h), hk = h / (H / Hk) (grouped
   kv heads). Where the kernel policy runs the big products in bf16 (``ops``), the
   attention's two products run in bf16 too, as flash attention does on a GPU in the bf16
   reference: q . k accumulated in float32 from bf16 q and k, the softmax in float32, the
   unnormalised weights exp(s - max) rounded to bf16 for the product with v (float32
   accumulation), the sum of the float32 weights divides at the end. torch's fused CPU
   kernel computes in float32 (110-160 GFLOP/s on 2 Zen 4 cores); this one runs at the bf16
   rate (~290 GFLOP/s on vision tiles, 0.70 of the bf16 GEMM peak) and skips the hidden keys
   of causal rows: 2.1x (vision) to 3.4-4.9x (causal prefill) torch's speed
   (benchmarks/bench_attention.py).

   mask: float32, added to the scaled scores, [B, T, S] through strides (shared by the
   heads), or NULL. limit: int32 [B, T], or NULL: row i's keys from limit[b, i] on are
   hidden (masked) and skipped; where a row's limit is 0 (nothing visible) every key counts,
   as torch's softmax over a row of equal finite scores gives. The caller derives limits
   from the mask (causal and padding masks hide a row's keys from some j on).

   Layout: q [B, H, T, dk], k [B, Hk, S, dk], v [B, Hk, S, dv] bf16, out [B, H, T, dv]
   float32 (obf16 = 0) or bf16, each with its own strides (in elements) for b, h and the
   row; the last dimension contiguous. dk and dv even.

   Work: one (b, h, block of query rows) per unit, units shared among the OpenMP team;
   each unit packs its head's k and v into the layouts the product loops read (k: 32 keys'
   pairs of columns side by side; v: pairs of keys interleaved per column) in per-thread
   scratch, then runs MR query rows at a time: scores for MR x 32 keys in 16 registers,
   the softmax on a row, then MR x 32 output columns in 16 registers. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "products.h"

/* AVX-512 BF16 intrinsics (products.h: GCC 10+, clang 9+); elsewhere the entry point says so (-2) */
#ifdef DSVL2_HAVE_BF16
#define HAVE_BF16 1
#define BF16 DSVL2_BF16
#else
#define HAVE_BF16 0
#endif

/* 1 where this build has the kernel (the CPU must still have AVX-512 BF16: the caller checks) */
int dsvl2_attention_built(void) { return HAVE_BF16; }

#if HAVE_BF16

#define MR 8  /* query rows per tile */
#define KB 32 /* keys per block of scores */

/* k rows [S, dk] (row stride ks) -> kp: per block of 32 keys, dk / 2 groups of 32 words,
   word l of group d = columns (2d, 2d + 1) of key 32 jb + l; keys past S are zero */
static void pack_k(const uint16_t *k, int64_t ks, int64_t S, int64_t dk, uint32_t *kp) {
    const int64_t nb = (S + KB - 1) / KB, dp = dk / 2;
    for (int64_t jb = 0; jb < nb; jb++)
        for (int64_t l = 0; l < KB; l++) {
            const int64_t j = jb * KB + l;
            uint32_t *dst = kp + jb * dp * KB + l;
            if (j < S) {
                const uint32_t *src = (const uint32_t *)(k + j * ks);
                for (int64_t d = 0; d < dp; d++) dst[d * KB] = src[d];
            } else
                for (int64_t d = 0; d < dp; d++) dst[d * KB] = 0;
        }
}

/* v rows [S, dv] (row stride vs) -> vp [ceil(S / 2)][dvp][2]: keys 2p and 2p + 1 side by
   side in each column; columns past dv and keys past S are zero */
static void pack_v(const uint16_t *v, int64_t vs, int64_t S, int64_t dv, int64_t dvp, uint16_t *vp) {
    const int64_t np = (S + 1) / 2;
    for (int64_t p = 0; p < np; p++) {
        uint16_t *dst = vp + p * dvp * 2;
        const uint16_t *a = v + 2 * p * vs, *b = 2 * p + 1 < S ? a + vs : NULL;
        int64_t c = 0;
        for (; c < dv; c++) {
            dst[2 * c] = a[c];
            dst[2 * c + 1] = b ? b[c] : 0;
        }
        for (; c < dvp; c++) dst[2 * c] = dst[2 * c + 1] = 0;
    }
}

/* scores of MR query rows (qt: MR rows of dk bf16, contiguous) against key blocks [0, nb):
   sc[r * ss + j] = q_r . k_j (float32) */
static BF16 void scores(const uint32_t *qt, int64_t dk, const uint32_t *kp, int64_t nb, float *sc, int64_t ss) {
    const int64_t dp = dk / 2;
    for (int64_t jb = 0; jb < nb; jb++) {
        __m512 acc[MR][2];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        const uint32_t *kb = kp + jb * dp * KB;
        for (int64_t d = 0; d < dp; d++) {
            const __m512bh b0 = (__m512bh)_mm512_loadu_si512(kb + d * KB);
            const __m512bh b1 = (__m512bh)_mm512_loadu_si512(kb + d * KB + 16);
#pragma GCC unroll 8
            for (int r = 0; r < MR; r++) {
                const __m512bh a = (__m512bh)_mm512_set1_epi32((int)qt[r * dp + d]);
                acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
            }
        }
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) {
            _mm512_storeu_ps(sc + r * ss + jb * KB, acc[r][0]);
            _mm512_storeu_ps(sc + r * ss + jb * KB + 16, acc[r][1]);
        }
    }
}

/* out rows r < rows of MR: (weights pt [MR][ps] bf16) @ vp over key pairs [0, np), divided
   by the rows' sums; written as float32 or bf16 */
static BF16 void weighted(const uint32_t *pt, int64_t ps, const uint16_t *vp, int64_t np, int64_t dv, int64_t dvp,
                          const float *sum, int rows, void *out, int64_t os, int obf16) {
    for (int64_t c = 0; c < dvp; c += 32) {
        const int two = c + 16 < dvp;
        __m512 acc[MR][2];
#pragma GCC unroll 8
        for (int r = 0; r < MR; r++) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
        if (two)
            for (int64_t p = 0; p < np; p++) {
                const uint16_t *vb = vp + (p * dvp + c) * 2;
                const __m512bh b0 = (__m512bh)_mm512_loadu_si512(vb), b1 = (__m512bh)_mm512_loadu_si512(vb + 32);
#pragma GCC unroll 8
                for (int r = 0; r < MR; r++) {
                    const __m512bh a = (__m512bh)_mm512_set1_epi32((int)pt[r * ps + p]);
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
                    acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
                }
            }
        else
            for (int64_t p = 0; p < np; p++) {
                const __m512bh b0 = (__m512bh)_mm512_loadu_si512(vp + (p * dvp + c) * 2);
#pragma GCC unroll 8
                for (int r = 0; r < MR; r++)
                    acc[r][0] = _mm512_dpbf16_ps(acc[r][0], (__m512bh)_mm512_set1_epi32((int)pt[r * ps + p]), b0);
            }
        for (int r = 0; r < rows; r++) {
            const __m512 inv = _mm512_set1_ps(1.0f / sum[r]);
            for (int h = 0; h < 1 + two; h++) {
                const int64_t c0 = c + 16 * h;
                if (c0 >= dv) break;
                const __mmask16 m = dv - c0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - c0)) - 1);
                const __m512 o = _mm512_mul_ps(acc[r][h], inv);
                if (obf16) _mm256_mask_storeu_epi16((uint16_t *)out + r * os + c0, m, _mm512_cvtepi32_epi16(round_bf16_16(o)));
                else _mm512_mask_storeu_ps((float *)out + r * os + c0, m, o);
            }
        }
    }
}

/* a 64-byte aligned buffer of at least n bytes, or NULL */
static void *scratch(int64_t n) { return aligned_alloc(64, (size_t)((n + 127) / 64 * 64)); }

/* strides (elements): st[0..2] q's b, h, t; st[3..5] k's; st[6..8] v's; st[9..11] out's;
   st[12..13] mask's b, t. Returns 0; -1 where scratch could not be allocated (out is then
   incomplete); -2 where this build lacks the kernel. */
BF16 int dsvl2_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, void *out, int obf16,
                              int64_t B, int64_t H, int64_t Hk, int64_t T, int64_t S, int64_t dk, int64_t dv,
                              float scale, const float *mask, const int32_t *limit, const int64_t *st) {
    const int64_t nqb = (T + MR - 1) / MR, group = H / Hk;
    const int64_t spad = (S + KB - 1) / KB * KB, dvp = (dv + 15) / 16 * 16;
    int nt = omp_get_max_threads();
    /* query blocks per unit: enough units for every thread, few enough to pack k / v rarely */
    int64_t per = nqb;
    while (per > 1 && B * H * ((nqb + per - 1) / per) < 4 * nt) per = (per + 1) / 2;
    const int64_t chunks = (nqb + per - 1) / per, units = B * H * chunks;
    int failed = 0;
#pragma omp parallel num_threads(nt) reduction(| : failed)
    {
        uint32_t *kp = scratch(spad * dk * 2);
        uint16_t *vp = scratch(spad * dvp * 2);
        float *sc = scratch(MR * spad * 4);
        uint16_t *pt = scratch(MR * spad * 2);
        uint32_t *qt = scratch(MR * dk * 2);
        if (!kp || !vp || !sc || !pt || !qt) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < units; u++) {
            if (!kp || !vp || !sc || !pt || !qt) continue;
            const int64_t b = u / (H * chunks), h = u / chunks % H, c = u % chunks, hk = h / group;
            pack_k(k + b * st[3] + hk * st[4], st[5], S, dk, kp);
            pack_v(v + b * st[6] + hk * st[7], st[8], S, dv, dvp, vp);
            const uint16_t *qh = q + b * st[0] + h * st[1];
            for (int64_t qb = c * per; qb < (c + 1) * per && qb < nqb; qb++) {
                const int64_t i0 = qb * MR;
                const int rows = T - i0 < MR ? (int)(T - i0) : MR;
                int64_t nmax = 0, n[MR];
                for (int r = 0; r < MR; r++) {
                    if (r < rows) {
                        memcpy(qt + r * (dk / 2), qh + (i0 + r) * st[2], dk * 2);
                        n[r] = limit ? limit[b * T + i0 + r] : S;
                        if (n[r] <= 0 || n[r] > S) n[r] = S;
                    } else {
                        memset(qt + r * (dk / 2), 0, dk * 2);
                        n[r] = 0;
                    }
                    if (n[r] > nmax) nmax = n[r];
                }
                const int64_t np = (nmax + 1) / 2;
                scores(qt, dk, kp, (nmax + KB - 1) / KB, sc, spad);
                float sum[MR];
                for (int r = 0; r < MR; r++)
                    sum[r] = r < rows ? softmax_row(sc + r * spad, mask ? mask + b * st[12] + (i0 + r) * st[13] : NULL,
                                                    n[r], 2 * np, scale, pt + r * spad)
                                      : (memset(pt + r * spad, 0, 2 * np * 2), 1.0f);
                void *o = obf16 ? (void *)((uint16_t *)out + b * st[9] + h * st[10] + i0 * st[11])
                                : (void *)((float *)out + b * st[9] + h * st[10] + i0 * st[11]);
                weighted((const uint32_t *)pt, spad / 2, vp, np, dv, dvp, sum, rows, o, st[11], obf16);
            }
        }
        free(kp);
        free(vp);
        free(sc);
        free(pt);
        free(qt);
    }
    return failed ? -1 : 0;
}
#else
int dsvl2_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, void *out, int obf16, int64_t B,
                         int64_t H, int64_t Hk, int64_t T, int64_t S, int64_t dk, int64_t dv, float scale,
                         const float *mask, const int32_t *limit, const int64_t *st) {
    return -2;
}
#endif
