/* Shared between the kernels of dsvl2.model.native (bf16.c: products; layers.c: norms,
   attention and routing of a decode step; mla.c: the MLA attention block; int4.c: int4
   products; mlp.c: SiLU-gated MLPs and experts; step.c: all decoder layers of a step;
   dequant.c: dequantisation; attention.c and amx_attention.c: prefill attention; amx.c). */
#ifndef DSVL2_PRODUCTS_H
#define DSVL2_PRODUCTS_H
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* bytes ahead that the decode products prefetch each weight row (bf16.c: chosen per CPU) */
extern int64_t dsvl2_ahead;
extern int dsvl2_wide_streams; /* bf16.c: weight streams a thread, AVX-512 int8 / int4 products */

/* a bf16 value as float32: exact, its 16 bits are the float's upper half */
static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* a finite float32 as bf16, rounded to nearest even (as torch rounds) */
static inline uint16_t round_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

/* the same for 16 float32 lanes, by integer arithmetic (vcvtneps2bf16 would flush
   denormals), in the low 16 bits of each lane */
static inline __attribute__((target("avx512f"))) __m512i round_bf16_16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
}

/* the 8 lanes of s added in one fixed order: halves, then pairs, then the last two */
static inline float hsum8(__m256 s) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

/* the 16 lanes of s added in one fixed order: the two halves, then hsum8 */
static inline __attribute__((always_inline, target("avx512f"))) float hsum16(__m512 s) {
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(s), 1));
    return hsum8(_mm256_add_ps(_mm512_castps512_ps256(s), hi));
}

/* e^x for x <= 0 (attention.c: softmax's shifted scores; amx.c: SiLU), 16 lanes, to a few
   float32 ulps: 2^n e^r with |r| <= ln2 / 2, e^r by its Taylor polynomial to r^7; below
   -103 the result is 0 */
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp_neg16(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-103.0f);
    const __mmask16 tiny = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
    x = _mm512_max_ps(x, lo);
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_maskz_scalef_ps((__mmask16)~tiny, p, n);
}

/* 2^x for finite x <= 0, 16 lanes, to ~4 float32 ulps: 2^n 2^r with n = round(x), |r| <=
   1/2, 2^r by a degree-5 polynomial (near-minimax in relative error: 7.5e-8, 2.3e-7
   evaluated in float32); results below 2^-126 are denormal, below 2^-149 zero */
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp2_neg16_finite(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(1.327647129e-3f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(9.675541893e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.550713092e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(2.402212024e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(6.931469440e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.000000119f));
    return _mm512_scalef_ps(p, n);
}

/* the same for any x <= 0: x below -150 (-inf and NaN included) taken as -150 (a result
   of at most 2^-149) */
static inline __attribute__((always_inline, target("avx512f"))) __m512 exp2_neg16(__m512 x) {
    return exp2_neg16_finite(_mm512_max_ps(x, _mm512_set1_ps(-150.0f))); /* the second operand where x is NaN */
}

/* AVX-512 BF16 intrinsics: GCC 10+, clang 9+ (attention.c, amx_attention.c, softmax_row) */
#if (defined(__clang__) && __clang_major__ >= 9) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 10)
#define DSVL2_HAVE_BF16 1
#define DSVL2_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

/* One query row's softmax weights over keys [0, n) (attention.c, amx_attention.c): s =
   scale * sc + mask (mask NULL: 0), rounded once (a mask of zeros gives the bits of no
   mask); the unnormalised exp(s - max) = 2^((s - max) log2 e) (exp2_neg16) rounded to bf16
   (nearest even; vcvtneps2bf16 flushes a weight below 2^-126 to 0) into pr[0, n), zeros in
   [n, npad); returns the float32 sum of the unrounded weights. The scores are read twice
   (for the max, then for the weights: the same bits), not stored; the max and the sum in
   four independent vectors (the adds' latency bounded the loop, not their count), the
   sum's added in a fixed order. The vision tower's attention on 4 tiles (AMX, an Intel
   Xeon, alternating builds): 12.2-12.6 -> 9.8-10.4 ms against e^x to degree 7 and one
   accumulator; without a mask (the tower), the max of the raw scores and no clamp, the
   same bits: 10.3-10.8 -> 9.3-10.0 ms. */
static inline DSVL2_BF16 float softmax_row(const float *sc, const float *mask, int64_t n, int64_t npad, float scale,
                                           uint16_t *pr) {
    const __m512 vs = _mm512_set1_ps(scale), l2e = _mm512_set1_ps(1.44269504088896341f);
    const __mmask16 tail = (__mmask16)((1u << (n % 16)) - 1); /* 0 where 16 divides n */
    const int64_t full = n - n % 16;
#define SCORE(j, m)                                                                                          \
    (mask ? _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, sc + (j)), vs, _mm512_maskz_loadu_ps(m, mask + (j))) \
          : _mm512_mul_ps(_mm512_maskz_loadu_ps(m, sc + (j)), vs))
    /* the max: without a mask (and scale > 0), of the raw scores, scaled once after (rounding
       is monotonic, so max(round(scale sc)) = round(scale max(sc)): the same bits, one
       product fewer a score) */
    const int raw = !mask && scale > 0.0f;
#define PEAK(j, m) (raw ? _mm512_maskz_loadu_ps(m, sc + (j)) : SCORE(j, m))
    __m512 m0 = _mm512_set1_ps(-INFINITY), m1 = m0, m2 = m0, m3 = m0;
    int64_t j = 0;
    for (; j + 64 <= full; j += 64) {
        m0 = _mm512_max_ps(m0, PEAK(j, 0xffff));
        m1 = _mm512_max_ps(m1, PEAK(j + 16, 0xffff));
        m2 = _mm512_max_ps(m2, PEAK(j + 32, 0xffff));
        m3 = _mm512_max_ps(m3, PEAK(j + 48, 0xffff));
    }
    for (; j < full; j += 16) m0 = _mm512_max_ps(m0, PEAK(j, 0xffff));
    if (tail) m0 = _mm512_mask_max_ps(m0, tail, m0, PEAK(j, tail));
#undef PEAK
    float top = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(m0, m1), _mm512_max_ps(m2, m3)));
    if (raw) top *= scale;
    const __m512 mx = _mm512_set1_ps(top);
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    /* without a mask every score is finite (finite inputs): no clamp for -inf */
#define EXP2(x) (mask ? exp2_neg16(x) : exp2_neg16_finite(x))
#define WEIGHT(j, m, acc)                                                                                    \
    do {                                                                                                      \
        const __m512 e = _mm512_maskz_mov_ps(m, EXP2(_mm512_mul_ps(_mm512_sub_ps(SCORE(j, m), mx), l2e)));   \
        acc = _mm512_add_ps(acc, e);                                                                          \
        _mm256_mask_storeu_epi16(pr + (j), m, (__m256i)_mm512_cvtneps_pbh(e));                                \
    } while (0)
    for (j = 0; j + 64 <= full; j += 64) {
        WEIGHT(j, 0xffff, s0);
        WEIGHT(j + 16, 0xffff, s1);
        WEIGHT(j + 32, 0xffff, s2);
        WEIGHT(j + 48, 0xffff, s3);
    }
    for (; j < full; j += 16) WEIGHT(j, 0xffff, s0);
    if (tail) WEIGHT(j, tail, s0);
#undef WEIGHT
#undef EXP2
#undef SCORE
    for (j = n; j < npad; j++) pr[j] = 0;
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
}
#endif

/* The (token, choice) pairs p = t k + j of T tokens choosing k of E experts (idx [T k];
   NULL: every pair expert 0) sorted by expert, stable: order[0 .. P) the pairs, order[P ..
   P + E] where each expert's run starts (E + 1 entries), then E entries of scratch.
   Returns how many experts received pairs, or -1 (nothing sorted) for an id outside [0, E).
   For mlp.c. */
static inline int64_t sort_pairs(const int64_t *idx, int64_t P, int64_t E, int64_t *order) {
    for (int64_t p = 0; idx && p < P; p++)
        if (idx[p] < 0 || idx[p] >= E) return -1;
    int64_t *start = order + P, *fill = start + E + 1, used = 0;
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t p = 0; p < P; p++) start[(idx ? idx[p] : 0) + 1]++;
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    for (int64_t e = 0; e < E; e++) fill[e] = start[e];
    for (int64_t p = 0; p < P; p++) order[fill[idx ? idx[p] : 0]++] = p;
    for (int64_t e = 0; e < E; e++) used += start[e + 1] > start[e];
    return used;
}

/* Whole experts per thread (mlp.c's split when several experts are in use): thread th of nth
   takes the experts [*lo, *hi) (those among them that received pairs), a contiguous run of
   about equal cost. An expert costs its weights' stream plus its rows (cost + its pairs, in
   units of one row) and goes to the thread whose share of the total holds its cost's
   midpoint. start: sort_pairs' run starts [E + 1]. */
static inline void expert_run(const int64_t *start, int64_t E, int64_t cost, int th, int nth, int64_t *lo,
                              int64_t *hi) {
    int64_t total = 0, before = 0; /* before: cost of the experts before e */
    for (int64_t e = 0; e < E; e++)
        if (start[e + 1] > start[e]) total += cost + start[e + 1] - start[e];
    *lo = *hi = E;
    for (int64_t e = 0; e < E; e++) {
        const int64_t c = start[e + 1] - start[e];
        if (c == 0) continue;
        const int64_t mid2 = 2 * before + cost + c; /* twice the midpoint of e's cost */
        before += cost + c;
        const int64_t owner = (mid2 * nth) / (2 * total);
        if (owner > th) break; /* the owners only grow with e */
        if (owner == th) {
            if (*lo == E) *lo = e;
            *hi = e + 1;
        }
    }
}

/* out [T, D] = each token's pairs' outputs ys [P, D] (in sort_pairs' order) times their
   weights wt [P] (NULL: 1), added in ascending expert id: a token's sum does not depend on
   the other tokens nor on which thread computed each pair */
static inline void combine_pairs(const float *ys, const int64_t *order, const float *wt, int64_t T, int64_t k,
                                 int64_t D, float *out) {
    for (int64_t t = 0; t < T; t++) memset(out + t * D, 0, D * sizeof(float));
    for (int64_t i = 0; i < T * k; i++) {
        const int64_t p = order[i], t = p / k;
        const float w = wt ? wt[p] : 1.0f;
        float *o = out + t * D;
        const float *y = ys + i * D;
        for (int64_t d = 0; d < D; d++) o[d] = fmaf(w, y[d], o[d]);
    }
}

/* SiLU-gated MLP weights: E stacked experts, or one dense MLP (E = 1). gate / up [E, F, D],
   down [E, D, F]: bf16 values (scales NULL), int8 values with bf16 per-row scales ([E, F],
   [E, F], [E, D]), or int4 nibbles ([E, F, D/2], [E, D, F/2]) with bf16 per-group scales
   ([E, F, D/Gd], [E, D, F/Gf]) */
enum { MLP_BF16 = 0, MLP_INT8 = 1, MLP_INT4 = 2 };
typedef struct {
    const void *gate, *up, *down;
    const uint16_t *gs, *us, *ds;
    int64_t format, E, F, Gd, Gf; /* MLP_*; F = 0: no such MLP (shared experts); Gd / Gf: int4 only */
} dsvl2_mlp;

/* One call of an MLP m for T tokens choosing k of its experts each (idx / wt [T, k]; NULL:
   a dense MLP, k = 1) in three parts (mlp.c): mlp_begin (serial: the pairs sorted by expert,
   their inputs gathered into scratch), mlp_team (called by every thread of an OpenMP team:
   the products, bf16.c dsvl2_moe_team8 or int4.c dsvl2_moe_team4; no barrier at its end, so
   a team may go on to another call's products, as dsvl2_run_mlps does with the shared
   experts after the routed ones) and, after the team's next barrier, mlp_end (serial: each
   token's pairs summed into out). Which thread computes a pair's rows never changes their
   bits. scratch: mlp_scratch floats; order: mlp_order int64s. */
typedef struct {
    const dsvl2_mlp *m;
    const float *x, *wt;
    const int64_t *idx;
    int64_t T, D, k, used; /* used: experts that received pairs */
    float *xs, *g, *u, *ys, *out; /* scratch parts: [P, D], [P, F], [P, F], [P, D]; P = T k */
    int64_t *order;
} mlp_call;

void dsvl2_moe_gather4(const mlp_call *c); /* int4.c: the inputs prepared for its path */
void dsvl2_moe_team4(const mlp_call *c);   /* int4.c */
void dsvl2_moe_team8(const mlp_call *c);   /* bf16.c: bf16 and int8 weights */

/* the routed experts m (idx / wt: k choices a row) and, where s is not NULL and s->F > 0, the
   shared experts s (dense) for B rows of x in one team (mlp.c) */
int dsvl2_run_mlps(const dsvl2_mlp *m, const float *x, int64_t B, int64_t D, const int64_t *idx, const float *wt,
                   int64_t k, float *out, const dsvl2_mlp *s, float *sout, float *scratch, int64_t *order);

/* the floats of scratch an mlp_call of T tokens choosing k needs */
static inline int64_t mlp_scratch(int64_t T, int64_t k, int64_t D, int64_t F) { return T * k * (2 * D + 2 * F); }
/* the int64s of order it needs (sort_pairs: the pairs, E + 1 run starts, E of scratch) */
static inline int64_t mlp_order(int64_t T, int64_t k, int64_t E) { return T * k + 2 * E + 1; }

/* y[m, n] for n in [n0, n1), all M rows: bf16 weights (scale NULL) or int8 weights with
   bf16 per-row scales. Same per-(row, output) operation sequence whatever M. */
void dsvl2_any_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                    int64_t n0, int64_t n1, float *y, int64_t ldy);
/* 1 where the quantised products (int4.c, int8 in bf16.c) use AVX-512, else 0 (int4.c) */
int dsvl2_quant_wide(void);
/* The calling OpenMP team shares [0, N) out in chunks of team_chunk(N, nt) rows, each taken
   by whichever thread is free (dynamic; no barrier at the end). A static split into one
   block a thread made the faster thread wait at the next barrier for the slower one (15 %
   of a tiny decode step's samples sat in libgomp, 12 % after; small int8 decode 12.0-14.7
   -> 15.1-16.3 tok/s in an interleaved A/B on the Zen 4 machine); the chunks are large enough
   (24-384 rows, a multiple of 12 so that the parts of 3 or 4 streams stay equal) for the memory
   streams to run at speed. Which thread computes a row does not change its bits. */
static inline int64_t team_chunk(int64_t N, int nt) {
    int64_t c = N / (8 * (int64_t)(nt > 0 ? nt : 1));
    c = c < 24 ? 24 : c > 384 ? 384 : c;
    return c - c % 12;
}
void dsvl2_team_rows(const float *x, int64_t ldx, int64_t M, int64_t K, const void *w, const uint16_t *scale,
                     int64_t N, float *y, int64_t ldy);

/* one MLA layer's weights (mla.c; native/__init__.py mla_layer fills it) */
enum { W_F32 = 0, W_BF16 = 1, W_INT8 = 2 };

/* one weight [N, K]: float32, bf16, or int8 values with bf16 per-row scales [N] */
typedef struct {
    const void *w;
    const uint16_t *scale; /* int8 only, else NULL */
    int64_t kind;          /* W_F32, W_BF16, W_INT8 */
} dsvl2_mla_weight;

typedef struct {
    int64_t D, H, dn, dr, dv, r, qr;
    dsvl2_mla_weight q, q_a, q_b, kv_a, kv_b, o; /* q when qr == 0, else q_a / q_b */
    const float *b_q_a, *b_kv_a, *b_o;          /* float32 biases, or NULL */
    const void *q_norm, *kv_norm;                /* RMSNorm weights [qr] / [r] */
    int64_t q_norm_bf16, kv_norm_bf16;
    float q_eps, kv_eps, scale;
} dsvl2_mla;

/* the blocks that step.c strings together (documented where they are defined) */
void dsvl2_linear(const float *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, float *y);
int dsvl2_moe(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
              const void *gate, const void *up, const void *down, int64_t E, int64_t F,
              float *out, float *scratch, int64_t *order,
              int64_t esize, const uint16_t *gs, const uint16_t *us, const uint16_t *ds);
void dsvl2_rmsnorm(const float *x, int64_t M, int64_t D, const void *weight, int wbf16, float eps, float *y);
int dsvl2_moe_i4(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
                 const uint8_t *gq, const uint16_t *gs, const uint8_t *uq, const uint16_t *us, const uint8_t *dq,
                 const uint16_t *ds, int64_t E, int64_t F, int64_t Gd, int64_t Gf, float *out, float *scratch,
                 int64_t *order_);
int dsvl2_route(float *logits, int64_t T, int64_t E, int64_t k, int method, int sigmoid, const float *bias,
                int64_t G, int64_t topk_group, int norm, float scaling, int64_t *idx, float *wt);
int64_t dsvl2_mha_scratch(int64_t B, int64_t H, int64_t Hk, int64_t hd, int64_t S);
int dsvl2_mha_decode(const float *x, int64_t B, int64_t D, int64_t H, int64_t Hk, int64_t hd,
                     const uint16_t *wq, const uint16_t *wk, const uint16_t *wv, const uint16_t *wo,
                     const float *bq, const float *bk, const float *bv, const float *bo,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t NB, int64_t BS,
                     const int64_t *table, int64_t W, const int64_t *pos, float scale, float *out, float *scratch);
int64_t dsvl2_mla_scratch(int64_t B, int64_t H, int64_t dn, int64_t dr, int64_t dv, int64_t r, int64_t qr,
                          int64_t S);
int dsvl2_mla_decode(const dsvl2_mla *L, const float *x, int64_t B, const float *cos, const float *sin, void *pool,
                     int cache_bf16, int64_t NB, int64_t BS, const int64_t *table, int64_t W, const int64_t *pos,
                     float *out, float *scratch);
int dsvl2_check_tables(int64_t B, int64_t NB, int64_t BS, const int64_t *table, int64_t W, const int64_t *pos);
#endif
