/* A whole MLA attention block of a decode step in one call (dsvl2.model.native): the
   DeepSeek-V2 multi-head latent attention of model/attention.py (class MLA), absorbed form.

   Legend: B rows, D width, H heads, dn / dr / dv the nope / rope / value head sizes, r the
   kv_lora_rank, qr the q_lora_rank (0: a plain q_proj), Lk = r + dr the cached values per
   token, S a row's positions.

     q      = x Wq^T, or q_b(RMSNorm(x Wqa^T + bqa))        [B, H, dn + dr]
     kv     = x Wkva^T + bkva = [latent (r) | k_pe (dr)]     [B, Lk]
     latent = RMSNorm(latent) (kv_a_layernorm); RoPE (interleaved) on q_pe and k_pe
     [latent | k_pe] written into the block pool [NB, BS, Lk] (float32 or bf16) at the
     row's position, through its block table
     q_lat[h] = W_uk[h]^T q_nope[h]   (W_uk[h] = kv_b rows h (dn + dv) .. + dn, [dn, r])
     p_s      = softmax_s((q_lat[h] . latent_s + q_pe[h] . k_pe_s) * scale) over 0 .. pos
     o[h]     = W_uv[h] (sum_s p_s latent_s)   (W_uv[h] = the next dv rows of kv_b, [dv, r])
     out      = o Wo^T (+ bo)                                  [B, D]

   Why: decode attention over the compressed cache reads Lk = 576 values per token and
   layer (the point of MLA), but as torch ops it is ~40 small calls per layer (splits,
   casts, two batched bf16 matmuls with their rounding, an index write, a gather of the
   whole cache into a new tensor, SDPA); here it is one call that reads the cache in place
   through the block table, and each weight once for all rows.

   Weights: q / q_a / q_b / kv_a / o float32, bf16 or int8 with bf16 per-row scales (the
   products of bf16.c, float32 ones here with the same operation sequence); kv_b float32
   or bf16 (quantised checkpoints keep it float); norms float32 or bf16.

   Numbers: float32 throughout. The products, the RMSNorms (dsvl2_rmsnorm), RoPE and the
   cache write are the module path's operations where that path runs them natively (bf16
   or int8 weights, bf16 norms), so the values written into the cache are the module
   path's bits. The absorbed products and the attention are float32 here (the module path
   rounds q and o to bf16 around its bf16 matmuls), sums in a fixed order of our own: a
   row's results never depend on the other rows of its batch nor on where its blocks lie
   (tests/test_native_mla.py). */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "products.h"

#define CHUNK 64 /* positions per attention work unit: a unit's rows (64 x 2304 B) stay in L2 */

static inline __m256 widen8(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* float32 -> bf16, round to nearest even (torch's conversion; NaN -> a quiet NaN) */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ---- products with float32 weights -------------------------------------------------------
   Per (row, output) the sequence of bf16.c: one 8-lane FMA accumulator over the K blocks of
   8, hsum8, then the K tail in order; R <= 4 rows x C <= 2 weight rows per tile. */
static inline __attribute__((always_inline)) void tile_f32(const float *x, int64_t ldx, const int R,
                                                           const float *w, int64_t K, const int C, float *y,
                                                           int64_t ldy) {
    const int64_t K8 = K & ~(int64_t)7;
    __m256 acc[4][2];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K8; k += 8) {
        __m256 wv[2];
        for (int c = 0; c < C; c++) wv[c] = _mm256_loadu_ps(w + c * K + k);
        for (int r = 0; r < R; r++) {
            const __m256 xv = _mm256_loadu_ps(x + r * ldx + k);
            for (int c = 0; c < C; c++) acc[r][c] = _mm256_fmadd_ps(xv, wv[c], acc[r][c]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) {
            float s = hsum8(acc[r][c]);
            for (int64_t t = K8; t < K; t++) s = fmaf(x[r * ldx + t], w[c * K + t], s);
            y[r * ldy + c] = s;
        }
}

static void rows_f32(const float *x, int64_t ldx, int64_t M, int64_t K, const float *w, int64_t n0, int64_t n1,
                     float *y, int64_t ldy) {
    for (int64_t n = n0; n < n1; n += 2) {
        const float *wn = w + n * K;
        for (int64_t m = 0; m < M; m += 4) {
            const float *xm = x + m * ldx;
            float *ym = y + m * ldy + n;
            const int64_t R = M - m < 4 ? M - m : 4;
            if (n + 1 < n1) {
                if (R == 4) tile_f32(xm, ldx, 4, wn, K, 2, ym, ldy);
                else if (R == 3) tile_f32(xm, ldx, 3, wn, K, 2, ym, ldy);
                else if (R == 2) tile_f32(xm, ldx, 2, wn, K, 2, ym, ldy);
                else tile_f32(xm, ldx, 1, wn, K, 2, ym, ldy);
            } else {
                if (R == 4) tile_f32(xm, ldx, 4, wn, K, 1, ym, ldy);
                else if (R == 3) tile_f32(xm, ldx, 3, wn, K, 1, ym, ldy);
                else if (R == 2) tile_f32(xm, ldx, 2, wn, K, 1, ym, ldy);
                else tile_f32(xm, ldx, 1, wn, K, 1, ym, ldy);
            }
        }
    }
}

/* y[m, n] for n in [n0, n1), all M rows, whatever the weight's kind */
static void product_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const dsvl2_mla_weight *w, int64_t n0,
                         int64_t n1, float *y, int64_t ldy) {
    if (w->kind == W_F32) rows_f32(x, ldx, M, K, (const float *)w->w, n0, n1, y, ldy);
    else dsvl2_any_rows(x, ldx, M, K, w->w, w->kind == W_INT8 ? w->scale : NULL, n0, n1, y, ldy);
}

/* [0, N) shared out among the calling team in chunks (as dsvl2_team_rows, products.h team_chunk) */
static void team_product(const float *x, int64_t ldx, int64_t M, int64_t K, const dsvl2_mla_weight *w, int64_t N,
                         float *y, int64_t ldy) {
    const int64_t ch = team_chunk(N, omp_get_num_threads());
#pragma omp for schedule(dynamic, 1) nowait
    for (int64_t n0 = 0; n0 < N; n0 += ch) product_rows(x, ldx, M, K, w, n0, n0 + ch < N ? n0 + ch : N, y, ldy);
}

/* interleaved RoPE of one rope part (the reference de-interleaves (2i, 2i + 1) -> evens
   then odds and rotates half-split: out[i] = x[2i] cos[i] - x[2i+1] sin[i], out[i + d/2]
   = x[2i+1] cos[i + d/2] + x[2i] sin[i + d/2], apply_rope's operations and rounding) */
static void rope_interleaved(const float *x, const float *cos, const float *sin, int64_t d, float *out) {
    const int64_t h = d / 2;
    for (int64_t i = 0; i < h; i++) {
        const float a = x[2 * i], b = x[2 * i + 1];
        out[i] = a * cos[i] - b * sin[i];
        out[i + h] = b * cos[i + h] + a * sin[i + h];
    }
}

/* qc[b, h, 0:r] = W_uk[h]^T q_nope[b, h] for every row: per output the sum over i in
   order, one FMA each, starting from zero. W_uk[h] [dn, r] is read row after row, as it
   lies (a walk down its columns, 32 outputs at a time in registers, read it at ~13 GB/s:
   4.3 ms of a small int8 decode step), each row's values widened once for all B rows; the
   outputs accumulate in place (B r floats, in L1 / L2). */
#define DEFINE_ABSORB(NAME, WT, LOAD8, LOAD1)                                                                         \
static void NAME(const WT *wuk, int64_t r, int64_t dn, const float *qn, int64_t ldq, int64_t B, float *qc,            \
                 int64_t ldc) {                                                                                       \
    const int64_t r32 = r & ~(int64_t)31, r8 = r & ~(int64_t)7;                                                       \
    for (int64_t b = 0; b < B; b++) memset(qc + b * ldc, 0, r * sizeof(float));                                       \
    for (int64_t i = 0; i < dn; i++) {                                                                                \
        const WT *w = wuk + i * r;                                                                                    \
        int64_t j = 0;                                                                                                \
        for (; j < r32; j += 32) {                                                                                    \
            const __m256 w0 = LOAD8(w + j), w1 = LOAD8(w + j + 8), w2 = LOAD8(w + j + 16), w3 = LOAD8(w + j + 24);   \
            for (int64_t b = 0; b < B; b++) {                                                                         \
                const __m256 qv = _mm256_set1_ps(qn[b * ldq + i]);                                                    \
                float *o = qc + b * ldc + j;                                                                          \
                _mm256_storeu_ps(o, _mm256_fmadd_ps(qv, w0, _mm256_loadu_ps(o)));                                     \
                _mm256_storeu_ps(o + 8, _mm256_fmadd_ps(qv, w1, _mm256_loadu_ps(o + 8)));                             \
                _mm256_storeu_ps(o + 16, _mm256_fmadd_ps(qv, w2, _mm256_loadu_ps(o + 16)));                           \
                _mm256_storeu_ps(o + 24, _mm256_fmadd_ps(qv, w3, _mm256_loadu_ps(o + 24)));                           \
            }                                                                                                         \
        }                                                                                                             \
        for (; j < r8; j += 8) {                                                                                      \
            const __m256 w0 = LOAD8(w + j);                                                                           \
            for (int64_t b = 0; b < B; b++) {                                                                         \
                float *o = qc + b * ldc + j;                                                                          \
                _mm256_storeu_ps(o, _mm256_fmadd_ps(_mm256_set1_ps(qn[b * ldq + i]), w0, _mm256_loadu_ps(o)));        \
            }                                                                                                         \
        }                                                                                                             \
        for (; j < r; j++)                                                                                            \
            for (int64_t b = 0; b < B; b++) qc[b * ldc + j] = fmaf(qn[b * ldq + i], LOAD1(w[j]), qc[b * ldc + j]);    \
    }                                                                                                                 \
}

static inline float id1(float v) { return v; }
DEFINE_ABSORB(absorb_f32, float, _mm256_loadu_ps, id1)
DEFINE_ABSORB(absorb_bf16, uint16_t, widen8, bf16_to_f32)

/* Attention of one row's heads [h0, h1) over its positions [s0, s1) (one work unit):
   scores sc[h, s - s0] = (qc[h] . row_s) * scale, m[h] their max, p = exp(score - m) in
   place, l[h] the sum of p in position order, o[h] = sum of p_s latent_s (unnormalised;
   positions in order, one FMA each). row_s: the pool's slot of position s, found through the block
   table tab once per unit. Score tiles: 4 heads x 2 positions (a head's q stays in L1
   while the unit's rows stream from L2); per (head, position) one 8-lane FMA accumulator
   over the Lk values, hsum8, the tail in order, whatever tile it falls in. */
#define DEFINE_ATTEND(NAME, CT, LOAD8, LOAD1)                                                                         \
static inline __attribute__((always_inline)) void score_tile_##NAME(const float *q, int64_t Lk, const int NH,         \
        const CT *k0, const CT *k1, const int NS, float scale, float *sc, int64_t ldsc) {                             \
    const int64_t L8 = Lk & ~(int64_t)7;                                                                              \
    __m256 acc[2][4];                                                                                                 \
    for (int t = 0; t < NS; t++)                                                                                      \
        for (int g = 0; g < NH; g++) acc[t][g] = _mm256_setzero_ps();                                                 \
    for (int64_t j = 0; j < L8; j += 8) {                                                                             \
        const __m256 kv0 = LOAD8(k0 + j), kv1 = NS == 2 ? LOAD8(k1 + j) : kv0;                                        \
        for (int g = 0; g < NH; g++) {                                                                                \
            const __m256 qv = _mm256_loadu_ps(q + g * Lk + j);                                                        \
            acc[0][g] = _mm256_fmadd_ps(qv, kv0, acc[0][g]);                                                          \
            if (NS == 2) acc[1][g] = _mm256_fmadd_ps(qv, kv1, acc[1][g]);                                             \
        }                                                                                                             \
    }                                                                                                                 \
    for (int t = 0; t < NS; t++) {                                                                                    \
        const CT *k = t ? k1 : k0;                                                                                    \
        for (int g = 0; g < NH; g++) {                                                                                \
            float s = hsum8(acc[t][g]);                                                                               \
            for (int64_t j = L8; j < Lk; j++) s = fmaf(q[g * Lk + j], LOAD1(k[j]), s);                                \
            sc[g * ldsc + t] = s * scale;                                                                             \
        }                                                                                                             \
    }                                                                                                                 \
}                                                                                                                     \
/* o[g, j .. j + 16) = sum over the unit's positions i of p[g, i] row_i[j ..] for NH heads */                         \
static inline __attribute__((always_inline)) void o_tile_##NAME(const CT *const *rows, int64_t n, int64_t j,          \
        const float *p, const int NH, float *o, int64_t r) {                                                          \
    __m256 acc[4][2];                                                                                                 \
    for (int g = 0; g < NH; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();                                         \
    for (int64_t i = 0; i < n; i++) {                                                                                 \
        const __m256 v0 = LOAD8(rows[i] + j), v1 = LOAD8(rows[i] + j + 8);                                            \
        for (int g = 0; g < NH; g++) {                                                                                \
            const __m256 pv = _mm256_set1_ps(p[g * CHUNK + i]);                                                       \
            acc[g][0] = _mm256_fmadd_ps(pv, v0, acc[g][0]);                                                           \
            acc[g][1] = _mm256_fmadd_ps(pv, v1, acc[g][1]);                                                           \
        }                                                                                                             \
    }                                                                                                                 \
    for (int g = 0; g < NH; g++) {                                                                                    \
        _mm256_storeu_ps(o + g * r + j, acc[g][0]);                                                                   \
        _mm256_storeu_ps(o + g * r + j + 8, acc[g][1]);                                                               \
    }                                                                                                                 \
}                                                                                                                     \
static void NAME(const float *qc, int64_t h0, int64_t h1, int64_t r, int64_t Lk, float scale, const CT *pool,         \
                 const int64_t *tab, int64_t BS, int64_t s0, int64_t s1, float *sc, float *m, float *l, float *o) {   \
    const CT *rows[CHUNK];                                                                                            \
    const int64_t n = s1 - s0;                                                                                        \
    for (int64_t s = s0; s < s1; s++) rows[s - s0] = pool + (tab[s / BS] * BS + s % BS) * Lk;                         \
    for (int64_t h = h0; h < h1; h += 4) {                                                                            \
        const int64_t nh = h1 - h < 4 ? h1 - h : 4;                                                                   \
        for (int64_t i = 0; i < n; i += 2) {                                                                          \
            if (h == h0) /* the first pass brings the unit's rows in: the next pair ahead */                          \
                for (int64_t t = i + 2; t < i + 4 && t < n; t++)                                                      \
                    for (int64_t c = 0; c < Lk * (int64_t)sizeof(CT); c += 64)                                        \
                        _mm_prefetch((const char *)rows[t] + c, _MM_HINT_T0);                                         \
            float *sp = sc + h * CHUNK + i;                                                                           \
            const CT *k0 = rows[i], *k1 = i + 1 < n ? rows[i + 1] : NULL;                                             \
            const float *qh = qc + h * Lk;                                                                            \
            if (nh == 4 && k1) score_tile_##NAME(qh, Lk, 4, k0, k1, 2, scale, sp, CHUNK);                             \
            else if (nh == 4) score_tile_##NAME(qh, Lk, 4, k0, k0, 1, scale, sp, CHUNK);                              \
            else                                                                                                      \
                for (int64_t g = 0; g < nh; g++) {                                                                    \
                    if (k1) score_tile_##NAME(qh + g * Lk, Lk, 1, k0, k1, 2, scale, sp + g * CHUNK, CHUNK);           \
                    else score_tile_##NAME(qh + g * Lk, Lk, 1, k0, k0, 1, scale, sp + g * CHUNK, CHUNK);              \
                }                                                                                                     \
        }                                                                                                             \
    }                                                                                                                 \
    for (int64_t h = h0; h < h1; h++) {                                                                               \
        float *sh = sc + h * CHUNK, mx = -INFINITY, sum = 0.0f;                                                       \
        for (int64_t i = 0; i < n; i++) mx = sh[i] > mx ? sh[i] : mx;                                                 \
        for (int64_t i = 0; i < n; i++) sum += (sh[i] = expf(sh[i] - mx));                                            \
        m[h] = mx, l[h] = sum;                                                                                        \
    }                                                                                                                 \
    /* o: 16 latent values x 4 heads in registers over the unit's positions (o_tile); the                             \
       16 values of all positions stay in L1 for the head groups */                                                   \
    int64_t j = 0;                                                                                                    \
    for (; j + 16 <= r; j += 16)                                                                                      \
        for (int64_t h = h0; h < h1; h += 4) {                                                                        \
            if (h1 - h >= 4) o_tile_##NAME(rows, n, j, sc + h * CHUNK, 4, o + h * r, r);                              \
            else                                                                                                      \
                for (int64_t g = h; g < h1; g++) o_tile_##NAME(rows, n, j, sc + g * CHUNK, 1, o + g * r, r);          \
        }                                                                                                             \
    for (; j + 8 <= r; j += 8)                                                                                        \
        for (int64_t h = h0; h < h1; h++) {                                                                           \
            __m256 acc = _mm256_setzero_ps();                                                                         \
            for (int64_t i = 0; i < n; i++)                                                                           \
                acc = _mm256_fmadd_ps(_mm256_set1_ps(sc[h * CHUNK + i]), LOAD8(rows[i] + j), acc);                    \
            _mm256_storeu_ps(o + h * r + j, acc);                                                                     \
        }                                                                                                             \
    for (; j < r; j++)                                                                                                \
        for (int64_t h = h0; h < h1; h++) {                                                                           \
            float acc = 0.0f;                                                                                         \
            for (int64_t i = 0; i < n; i++) acc = fmaf(sc[h * CHUNK + i], LOAD1(rows[i][j]), acc);                    \
            o[h * r + j] = acc;                                                                                       \
        }                                                                                                             \
}

DEFINE_ATTEND(attend_f32, float, _mm256_loadu_ps, id1)
DEFINE_ATTEND(attend_bf16, uint16_t, widen8, bf16_to_f32)

/* float32 scratch of dsvl2_mla_decode for B rows of up to S positions each */
int64_t dsvl2_mla_scratch(int64_t B, int64_t H, int64_t dn, int64_t dr, int64_t dv, int64_t r, int64_t qr,
                          int64_t S) {
    const int64_t Lk = r + dr;
    return B * H * (dn + dr) + 2 * B * qr + 2 * B * Lk + B * H * (Lk + r + dv)
           + B * ((S + CHUNK - 1) / CHUNK) * H * (CHUNK + r + 2);
}

/* One MLA decode step for B rows (one new token each) as described at the top: x [B, D]
   (normalised); cos / sin [B, dr]; pool [NB, BS, r + dr] float32 (cache_bf16 = 0) or bf16,
   row b's token written at position pos[b] (block table[b, pos[b] / BS], slot pos[b] %
   BS; table [B, W] int64) and attending over its positions 0 .. pos[b]; out [B, D].
   Attention in units of CHUNK positions of one row and some of its heads (any thread),
   merged per row and head in position order.
   scratch: dsvl2_mla_scratch(B, H, dn, dr, dv, r, qr, W * BS) floats.
   Returns -1 when a position or block id is out of range, -2 for sizes it cannot take
   (dr odd, a size < 1, kv_b int8); nothing is written then. */
int dsvl2_mla_decode(const dsvl2_mla *L, const float *x, int64_t B, const float *cos, const float *sin, void *pool,
                     int cache_bf16, int64_t NB, int64_t BS, const int64_t *table, int64_t W, const int64_t *pos,
                     float *out, float *scratch) {
    const int64_t D = L->D, H = L->H, dn = L->dn, dr = L->dr, dv = L->dv, r = L->r, qr = L->qr, Lk = r + dr;
    if (D < 1 || H < 1 || dn < 1 || dr < 2 || dr % 2 || dv < 1 || r < 1 || qr < 0 || L->kv_b.kind == W_INT8)
        return -2;
    if (dsvl2_check_tables(B, NB, BS, table, W, pos)) return -1;
    const int64_t nq = H * (dn + dr), per_unit = H * (CHUNK + r + 2);
    float *q = scratch, *qa = q + B * nq, *qn = qa + B * qr, *kva = qn + B * qr, *ckv = kva + B * Lk;
    float *qc = ckv + B * Lk, *lat = qc + B * H * Lk, *att = lat + B * H * r, *parts = att + B * H * dv;
    int64_t ustart[B + 1]; /* row b's units: ustart[b] .. ustart[b + 1] - 1 */
    ustart[0] = 0;
    for (int64_t b = 0; b < B; b++) ustart[b + 1] = ustart[b] + (pos[b] + CHUNK) / CHUNK;
    /* fewer units than 4 a thread (a short context, few rows): each unit's heads in groups
       of hg (a multiple of the score tiles' 4 heads, so every (head, position) still falls
       in the same tile) taken apart; small int8, one row of ~80 positions: two units of
       64 and 16 positions, one thread waited for the other's */
    const int64_t ng = ustart[B] >= 4 * omp_get_max_threads() ? 1 : (H + 3) / 4, hg = ng == 1 ? H : 4;
#pragma omp parallel
    {
        team_product(x, D, B, D, &L->kv_a, Lk, kva, Lk);
        if (qr) {
            team_product(x, D, B, D, &L->q_a, qr, qa, qr);
#pragma omp barrier
#pragma omp single
            for (int64_t b = 0; b < B; b++) {
                for (int64_t i = 0; L->b_q_a && i < qr; i++) qa[b * qr + i] += L->b_q_a[i];
                dsvl2_rmsnorm(qa + b * qr, 1, qr, L->q_norm, (int)L->q_norm_bf16, L->q_eps, qn + b * qr);
            }
            /* implicit barrier */
            team_product(qn, qr, B, qr, &L->q_b, nq, q, nq);
        } else {
            team_product(x, D, B, D, &L->q, nq, q, nq);
        }
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            float *kb = kva + b * Lk, *cb = ckv + b * Lk;
            for (int64_t i = 0; L->b_kv_a && i < Lk; i++) kb[i] += L->b_kv_a[i];
            dsvl2_rmsnorm(kb, 1, r, L->kv_norm, (int)L->kv_norm_bf16, L->kv_eps, cb);
            rope_interleaved(kb + r, cos + b * dr, sin + b * dr, dr, cb + r);
            const int64_t at = (table[b * W + pos[b] / BS] * BS + pos[b] % BS) * Lk;
            if (cache_bf16)
                for (int64_t i = 0; i < Lk; i++) ((uint16_t *)pool)[at + i] = f32_to_bf16(cb[i]);
            else memcpy((float *)pool + at, cb, Lk * sizeof(float));
            for (int64_t h = 0; h < H; h++)
                rope_interleaved(q + b * nq + h * (dn + dr) + dn, cos + b * dr, sin + b * dr, dr,
                                 qc + (b * H + h) * Lk + r);
        }
        /* implicit barrier: the pool holds this step's tokens */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) { /* q_lat: W_uk[h] read once for all rows */
            const int64_t row0 = h * (dn + dv);
            if (L->kv_b.kind == W_F32)
                absorb_f32((const float *)L->kv_b.w + row0 * r, r, dn, q + h * (dn + dr), nq, B, qc + h * Lk, H * Lk);
            else
                absorb_bf16((const uint16_t *)L->kv_b.w + row0 * r, r, dn, q + h * (dn + dr), nq, B, qc + h * Lk,
                            H * Lk);
        }
        /* implicit barrier */
#pragma omp for schedule(dynamic, 1)
        for (int64_t v = 0; v < ustart[B] * ng; v++) {
            const int64_t u = v / ng, h0 = (v % ng) * hg, h1 = h0 + hg < H ? h0 + hg : H;
            int64_t b = 0;
            while (ustart[b + 1] <= u) b++;
            const int64_t s0 = (u - ustart[b]) * CHUNK, n = pos[b] + 1, s1 = s0 + CHUNK < n ? s0 + CHUNK : n;
            float *part = parts + u * per_unit, *sc = part, *m = sc + H * CHUNK, *l = m + H, *o = l + H;
            if (cache_bf16)
                attend_bf16(qc + b * H * Lk, h0, h1, r, Lk, L->scale, (const uint16_t *)pool, table + b * W, BS, s0,
                            s1, sc, m, l, o);
            else
                attend_f32(qc + b * H * Lk, h0, h1, r, Lk, L->scale, (const float *)pool, table + b * W, BS, s0, s1,
                           sc, m, l, o);
        }
        /* implicit barrier */
#pragma omp for schedule(static)
        for (int64_t h = 0; h < H; h++) { /* merge the units in position order, then W_uv[h] for all rows */
            for (int64_t b = 0; b < B; b++) {
                float mx = -INFINITY, sum = 0.0f, *ol = lat + (b * H + h) * r;
                for (int64_t u = ustart[b]; u < ustart[b + 1]; u++) {
                    const float m = parts[u * per_unit + H * CHUNK + h];
                    mx = m > mx ? m : mx;
                }
                memset(ol, 0, r * sizeof(float));
                for (int64_t u = ustart[b]; u < ustart[b + 1]; u++) {
                    const float *part = parts + u * per_unit, *o = part + H * CHUNK + 2 * H + h * r;
                    const float w = expf(part[H * CHUNK + h] - mx);
                    sum = fmaf(w, part[H * CHUNK + H + h], sum);
                    const __m256 wv = _mm256_set1_ps(w);
                    int64_t i = 0;
                    for (; i + 8 <= r; i += 8)
                        _mm256_storeu_ps(ol + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(o + i), _mm256_loadu_ps(ol + i)));
                    for (; i < r; i++) ol[i] = fmaf(w, o[i], ol[i]);
                }
                for (int64_t i = 0; i < r; i++) ol[i] /= sum;
            }
            const int64_t row0 = h * (dn + dv) + dn;
            dsvl2_mla_weight uv = L->kv_b;
            uv.w = L->kv_b.kind == W_F32 ? (const void *)((const float *)L->kv_b.w + row0 * r)
                                         : (const void *)((const uint16_t *)L->kv_b.w + row0 * r);
            product_rows(lat + h * r, H * r, B, r, &uv, 0, dv, att + h * dv, H * dv);
        }
        /* implicit barrier */
        team_product(att, H * dv, B, H * dv, &L->o, D, out, D);
    }
    for (int64_t b = 0; L->b_o && b < B; b++)
        for (int64_t i = 0; i < D; i++) out[b * D + i] += L->b_o[i];
    return 0;
}
