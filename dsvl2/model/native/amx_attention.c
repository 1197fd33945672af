/* Prefill and vision attention on Intel AMX tiles, with the numbers of attention.c:

     out[b, h, i, :] = sum_j p_ij v[b, hk, j, :],  p_ij = softmax_j(scale * q_i . k_j + mask[b, i, j])

   q . k summed in float32 by the tile unit from bf16 q and k; the softmax in float32 over
   the row's visible keys (``softmax_row``, products.h: the same function attention.c
   runs); the unnormalised weights exp(s - max) rounded to bf16 for the product with v,
   summed in float32 by the tile unit; the float32 sum of the unrounded weights divides at
   the end. Only the order of the float32 sums differs from attention.c. Arguments,
   strides, mask and limits as ``dsvl2_attention_bf16`` (attention.c) takes them.

   Why: with the big products on AMX, the vision tower's attention (7 tiles of 729 patches,
   16 heads of 72) took a third of a tower block on torch's fused kernel, which runs near
   the AVX-512 rate, not the tiles' (an Intel Xeon with AMX, 2 threads).

   Layout, per (b, h, block of 32 query rows): q's rows copied into a zero-padded A buffer
   [32, dkp] (dkp: dk rounded up to 32); k packed once a unit into B tiles ([16 pairs of
   dims, 16 keys], dims past dk and keys past S zero); scores C [32 queries, 32 keys] in
   four tiles, a block of keys at a time, stored to a float32 row buffer; the softmax per
   row into bf16 weights [32, keys] (zeros past each row's visible keys, to a multiple of
   32); the weights as A tiles against v packed as B tiles ([16 pairs of keys, 16 value
   columns], dv rounded up to 16 with zeros), 32 columns at a time; then divided by the
   sums and written. Causal rows: key blocks past the block's last visible key skipped.

   Work: one (b, h, run of query blocks) a unit, units shared among the OpenMP team
   (dynamic); each thread's buffers are its part of the caller's kept work memory (amx.h). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx.h"
#include "products.h"

#ifdef DSVL2_AMX

#define QR 32 /* query rows a block */
#define KB 32 /* keys a block of scores (and of weights in the product with v) */

/* k rows [S, dk] (row stride ks) -> B tiles of q . k: key tile jt (16 keys), dim slice s
   (32 dims) at kp + (jt * DS + s) * 512, its row r the pairs of dims (32s + 2r, + 1) of the
   16 keys; dims past dk and keys past S (to nkt tiles) zero */
static AMX void pack_k(const uint16_t *k, int64_t ks, int64_t S, int64_t dk, int64_t nkt, uint16_t *kp) {
    const int64_t DS = (dk + 31) / 32;
    for (int64_t jt = 0; jt < nkt; jt++)
        for (int64_t s = 0; s < DS; s++) {
            const int64_t left = dk - 32 * s;
            const __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
            __m512i r[16];
            for (int i = 0; i < 16; i++) {
                const int64_t j = 16 * jt + i;
                r[i] = j < S ? _mm512_maskz_loadu_epi16(m, k + j * ks + 32 * s) : _mm512_setzero_si512();
            }
            transpose16(r);
            uint16_t *tile = kp + (jt * DS + s) * 512;
            for (int i = 0; i < 16; i++) _mm512_storeu_si512(tile + 32 * i, r[i]);
        }
}

/* v rows [S, dv] (row stride vs) -> vp [np pairs of keys][dvp columns][2]: keys 2p and
   2p + 1 side by side in each column (B tiles of the weights' product: 16 pairs x 16
   columns, row stride 4 dvp bytes); columns past dv and keys past S zero */
static AMX void pack_v(const uint16_t *v, int64_t vs, int64_t S, int64_t dv, int64_t dvp, int64_t np, uint16_t *vp) {
    /* lanes 2i, 2i + 1 of the result = element i of a, element i of b (lo: i < 16, hi: 16 + i) */
    __m512i lo_idx, hi_idx;
    {
        uint16_t lo[32], hi[32];
        for (int i = 0; i < 16; i++) lo[2 * i] = i, lo[2 * i + 1] = 32 + i, hi[2 * i] = 16 + i, hi[2 * i + 1] = 48 + i;
        lo_idx = _mm512_loadu_si512(lo);
        hi_idx = _mm512_loadu_si512(hi);
    }
    for (int64_t p = 0; p < np; p++) {
        uint16_t *dst = vp + p * dvp * 2;
        const int64_t j = 2 * p;
        for (int64_t c = 0; c < dvp; c += 32) {
            const int64_t left = dv - c;
            const __mmask32 m = left >= 32 ? (__mmask32)0xffffffffu : left > 0 ? (__mmask32)((1u << left) - 1) : 0;
            const __m512i a = j < S ? _mm512_maskz_loadu_epi16(m, v + j * vs + c) : _mm512_setzero_si512();
            const __m512i b = j + 1 < S ? _mm512_maskz_loadu_epi16(m, v + (j + 1) * vs + c) : _mm512_setzero_si512();
            _mm512_storeu_si512(dst + 2 * c, _mm512_permutex2var_epi16(a, lo_idx, b));
            if (c + 16 < dvp) _mm512_storeu_si512(dst + 2 * c + 32, _mm512_permutex2var_epi16(a, hi_idx, b));
        }
    }
}

/* scores of the 32 query rows in qt ([32, dkp] bf16; rows past the block zero) against key
   blocks [0, nkb): sc[r * ss + j] = q_r . k_j, float32; two: rows 16-31 too */
static inline __attribute__((always_inline)) AMX void scores(const uint16_t *qt, int64_t dkp, const uint16_t *kp,
                                                             int64_t nkb, float *sc, int64_t ss, int two) {
    const int64_t DS = dkp / 32;
    for (int64_t jb = 0; jb < nkb; jb++) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
        const uint16_t *b0 = kp + 2 * jb * DS * 512, *b1 = b0 + DS * 512;
        for (int64_t s = 0; s < DS; s++) {
            _tile_loadd(4, qt + 32 * s, dkp * 2);
            _tile_loadd(6, b0 + s * 512, 64);
            _tile_loadd(7, b1 + s * 512, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
            if (two) {
                _tile_loadd(5, qt + 16 * dkp + 32 * s, dkp * 2);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
        }
        _tile_stored(0, sc + KB * jb, ss * 4);
        _tile_stored(1, sc + KB * jb + 16, ss * 4);
        if (two) {
            _tile_stored(2, sc + 16 * ss + KB * jb, ss * 4);
            _tile_stored(3, sc + 16 * ss + KB * jb + 16, ss * 4);
        }
    }
}

/* the weights pt ([32, ps] bf16, zero past each row's keys) of key blocks [0, nkb) times
   vp: columns c0 .. c0 + 15 (and c0 + 16 .. c0 + 31 where cols2) into ct [32, 32] float32;
   two: rows 16-31 too */
static inline __attribute__((always_inline)) AMX void weighted(const uint16_t *pt, int64_t ps, const uint16_t *vp,
                                                               int64_t dvp, int64_t nkb, int64_t c0, int cols2,
                                                               int two, float *ct) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t jb = 0; jb < nkb; jb++) {
        const uint16_t *b = vp + (KB / 2 * jb * dvp + c0) * 2;
        _tile_loadd(4, pt + KB * jb, ps * 2);
        _tile_loadd(6, b, dvp * 4);
        _tile_dpbf16ps(0, 4, 6);
        if (cols2) {
            _tile_loadd(7, b + 32, dvp * 4);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (two) {
            _tile_loadd(5, pt + 16 * ps + KB * jb, ps * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (cols2) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, ct, 128);
    _tile_stored(1, ct + 16, 128);
    _tile_stored(2, ct + 512, 128);
    _tile_stored(3, ct + 528, 128);
}

typedef struct {
    const uint16_t *q, *k, *v;
    void *out;
    int obf16;
    int64_t B, H, Hk, T, S, dk, dv;
    float scale;
    const float *mask;
    const int32_t *limit;
    const int64_t *st;
    int64_t dkp, dvp, spad, per, chunks;
    char *mem;
    size_t each; /* bytes of work memory a thread */
} job;

/* one query block (rows i0 .. i0 + rows - 1) of unit (b, h): scores, softmax, weighted v */
static AMX void query_block(const job *J, int64_t b, int64_t h, int64_t i0, const uint16_t *kp, const uint16_t *vp,
                            uint16_t *qt, float *sc, uint16_t *pt, float *ct) {
    const int64_t *st = J->st, T = J->T, S = J->S, spad = J->spad, dkp = J->dkp, dvp = J->dvp, dv = J->dv;
    const int rows = T - i0 < QR ? (int)(T - i0) : QR, two = rows > 16;
    const uint16_t *qh = J->q + b * st[0] + h * st[1];
    int64_t n[QR], nmax = 0;
    for (int r = 0; r < QR; r++) {
        if (r < rows) {
            memcpy(qt + r * dkp, qh + (i0 + r) * st[2], J->dk * 2);
            memset(qt + r * dkp + J->dk, 0, (dkp - J->dk) * 2);
            n[r] = J->limit ? J->limit[b * T + i0 + r] : S;
            if (n[r] <= 0 || n[r] > S) n[r] = S;
            if (n[r] > nmax) nmax = n[r];
        } else
            memset(qt + r * dkp, 0, dkp * 2);
    }
    const int64_t nkb = (nmax + KB - 1) / KB;
    scores(qt, dkp, kp, nkb, sc, spad, two);
    float inv[QR];
    for (int r = 0; r < rows; r++) {
        const float *mrow = J->mask ? J->mask + b * st[12] + (i0 + r) * st[13] : NULL;
        inv[r] = 1.0f / softmax_row(sc + r * spad, mrow, n[r], KB * nkb, J->scale, pt + r * spad);
    }
    const int64_t ob = b * st[9] + h * st[10];
    for (int64_t c0 = 0; c0 < dvp; c0 += 32) {
        const int cols2 = c0 + 16 < dvp;
        weighted(pt, spad, vp, dvp, nkb, c0, cols2, two, ct);
        for (int r = 0; r < rows; r++) {
            const __m512 vi = _mm512_set1_ps(inv[r]);
            for (int half = 0; half < 1 + cols2; half++) {
                const int64_t c = c0 + 16 * half;
                if (c >= dv) break;
                const __mmask16 m = dv - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (dv - c)) - 1);
                const __m512 o = _mm512_mul_ps(_mm512_loadu_ps(ct + r * 32 + 16 * half), vi);
                const int64_t at = ob + (i0 + r) * st[11] + c;
                if (J->obf16) _mm256_mask_storeu_epi16((uint16_t *)J->out + at, m, _mm512_cvtepi32_epi16(round_bf16_16(o)));
                else _mm512_mask_storeu_ps((float *)J->out + at, m, o);
            }
        }
    }
}

/* one thread's part (inside the parallel region: the outlined region does not take the
   target attributes, so the tile instructions live here) */
static AMX void attention_team(const job *J) {
    const int64_t spad = J->spad, dkp = J->dkp, dvp = J->dvp, nqb = (J->T + QR - 1) / QR;
    char *at = J->mem + (size_t)omp_get_thread_num() * J->each;
    uint16_t *kp = (uint16_t *)at;
    uint16_t *vp = (uint16_t *)(at += lines((size_t)spad * dkp * 2));
    float *sc = (float *)(at += lines((size_t)spad * dvp * 2));
    uint16_t *pt = (uint16_t *)(at += lines((size_t)QR * spad * 4));
    uint16_t *qt = (uint16_t *)(at += lines((size_t)QR * spad * 2));
    float *ct = (float *)(at + lines((size_t)QR * dkp * 2));
    const int64_t *st = J->st, group = J->H / J->Hk, units = J->B * J->H * J->chunks;
    configure();
#pragma omp for schedule(dynamic, 1)
    for (int64_t u = 0; u < units; u++) {
        const int64_t b = u / (J->H * J->chunks), h = u / J->chunks % J->H, c = u % J->chunks, hk = h / group;
        pack_k(J->k + b * st[3] + hk * st[4], st[5], J->S, J->dk, spad / 16, kp);
        pack_v(J->v + b * st[6] + hk * st[7], st[8], J->S, J->dv, dvp, spad / 2, vp);
        for (int64_t qb = c * J->per; qb < (c + 1) * J->per && qb < nqb; qb++)
            query_block(J, b, h, qb * QR, kp, vp, qt, sc, pt, ct);
    }
    _tile_release();
}

/* As dsvl2_attention_bf16 (attention.c): q [B, H, T, dk], k [B, Hk, S, dk], v [B, Hk, S, dv]
   bf16, out [B, H, T, dv] float32 (obf16 0) or bf16, strides st[0..13] (q, k, v, out: b, h,
   row; mask: b, row), mask float32 or NULL, limit int32 [B, T] or NULL; dk, dv even.
   Returns 0; -1 where AMX is not usable; -2 for a shape it does not take; -3 where memory
   ran out (nothing written then). */
int dsvl2_amx_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, void *out, int obf16, int64_t B,
                        int64_t H, int64_t Hk, int64_t T, int64_t S, int64_t dk, int64_t dv, float scale,
                        const float *mask, const int32_t *limit, const int64_t *st) {
    if (!dsvl2_amx_usable()) return -1;
    if (B <= 0 || H <= 0 || Hk <= 0 || H % Hk || T <= 0 || S <= 0 || dk <= 0 || dv <= 0 || dk % 2 || dv % 2)
        return -2;
    const int nt = omp_get_max_threads();
    job J = {q, k, v, out, obf16, B, H, Hk, T, S, dk, dv, scale, mask, limit, st};
    J.dkp = (dk + 31) / 32 * 32, J.dvp = (dv + 15) / 16 * 16, J.spad = (S + KB - 1) / KB * KB;
    const int64_t nqb = (T + QR - 1) / QR;
    /* query blocks a unit: enough units for every thread, few enough to pack k / v rarely */
    J.per = nqb;
    while (J.per > 1 && B * H * ((nqb + J.per - 1) / J.per) < 4 * nt) J.per = (J.per + 1) / 2;
    J.chunks = (nqb + J.per - 1) / J.per;
    J.each = lines((size_t)J.spad * J.dkp * 2) + lines((size_t)J.spad * J.dvp * 2) + lines((size_t)QR * J.spad * 4) +
             lines((size_t)QR * J.spad * 2) + lines((size_t)QR * J.dkp * 2) + QR * 32 * 4;
    J.mem = scratch(J.each * nt);
    if (!J.mem) return -3;
#pragma omp parallel num_threads(nt)
    attention_team(&J);
    return 0;
}

#else /* no AMX in this build */

int dsvl2_amx_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, void *out, int obf16, int64_t B,
                        int64_t H, int64_t Hk, int64_t T, int64_t S, int64_t dk, int64_t dv, float scale,
                        const float *mask, const int32_t *limit, const int64_t *st) {
    (void)q, (void)k, (void)v, (void)out, (void)obf16, (void)B, (void)H, (void)Hk, (void)T, (void)S, (void)dk;
    (void)dv, (void)scale, (void)mask, (void)limit, (void)st;
    return -1;
}

#endif
