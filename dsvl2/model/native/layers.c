/* The small parts of a decode step, in C (dsvl2.model.native): RMSNorm, the router (greedy,
   group-limited greedy, noaux_tc) and a whole MHA attention block (q / k / v, RoPE, cache
   write, attention over the cached keys, o_proj).

   Why: with the products in native code (bf16.c), a batch-1 decode step of the real tiny
   model spent ~25 ms of its ~95 ms in ~1200 small torch ops (norms: 8 ops each, RoPE: 10,
   the router: 6, attention with its transposes, casts and index writes) and the Python
   around them. Here each of those blocks is one call.

   Numbers: float32 throughout (the activations' dtype). RoPE, the RMSNorm scaling and the
   router's arithmetic are the reference's operations in the reference's order; sums
   (squares, scores, softmax denominators) are formed in a fixed order of our own, so
   results equal torch's to rounding (tests/test_native_layers.py and, for the router,
   tests/test_native_router.py compare with the torch path).
   A row's results never depend on the other rows of its batch. */

#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "products.h"

/* sum of a[0..n) * b[0..n) in a fixed order: 8 lanes over blocks of 8, lanes added
   (hsum8), then the tail in order. pf: memory to prefetch alongside (the same offsets of
   the next cached key, one prefetch per cache line), or NULL; the same operations. */
static inline float dot_pf(const float *a, const float *b, const float *pf, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (pf && !(i & 15)) _mm_prefetch((const char *)(pf + i), _MM_HINT_T0);
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    }
    float s = hsum8(acc);
    for (; i < n; i++) s = fmaf(a[i], b[i], s);
    return s;
}
static inline float dot(const float *a, const float *b, int64_t n) { return dot_pf(a, b, NULL, n); }

/* y[0..n) += a * x[0..n), one FMA per element; pf prefetched as in dot_pf */
static inline void axpy_pf(float a, const float *x, const float *pf, float *y, int64_t n) {
    const __m256 va = _mm256_set1_ps(a);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (pf && !(i & 15)) _mm_prefetch((const char *)(pf + i), _MM_HINT_T0);
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    }
    for (; i < n; i++) y[i] = fmaf(a, x[i], y[i]);
}
static inline void axpy(float a, const float *x, float *y, int64_t n) { axpy_pf(a, x, NULL, y, n); }

/* row m of dsvl2_rmsnorm */
static inline void rmsnorm_row(const float *x, int64_t m, int64_t D, const void *weight, int wbf16, float eps,
                               float *y) {
    const float *xr = x + m * D;
    float *yr = y + m * D;
    float r = 1.0f / sqrtf(dot(xr, xr, D) / (float)D + eps);
    for (int64_t d = 0; d < D; d++) {
        float w = wbf16 ? bf16_to_f32(((const uint16_t *)weight)[d]) : ((const float *)weight)[d];
        yr[d] = w * (xr[d] * r);
    }
}

/* y [M, D] = weight * (x * rsqrt(mean(x^2) + eps)), weight float32 or bf16 (wbf16 = 1); rows
   shared among the threads from 32 rows on (a prefill's [1,431, 2,048]), one row's bits
   whatever the split; fewer rows (decode steps, inside their parallel regions) serially,
   without entering the OpenMP runtime */
void dsvl2_rmsnorm(const float *x, int64_t M, int64_t D, const void *weight, int wbf16, float eps, float *y) {
    if (M >= 32) {
#pragma omp parallel for schedule(static)
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x, m, D, weight, wbf16, eps, y);
    } else {
        for (int64_t m = 0; m < M; m++) rmsnorm_row(x, m, D, weight, wbf16, eps, y);
    }
}

/* one row's logits s[0..E) -> its scores in place: sigmoid, or softmax (sigmoid = 0) */
static void route_scores(float *s, int64_t E, int sigmoid) {
    if (sigmoid) {
        for (int64_t e = 0; e < E; e++) s[e] = 1.0f / (1.0f + expf(-s[e]));
    } else {
        float mx = s[0], sum = 0.0f;
        for (int64_t e = 1; e < E; e++) mx = s[e] > mx ? s[e] : mx;
        for (int64_t e = 0; e < E; e++) sum += (s[e] = expf(s[e] - mx));
        for (int64_t e = 0; e < E; e++) s[e] = s[e] / sum;
    }
}

/* one row's k weights in place: / (their sum + 1e-20) when norm (k > 1), then * scaling */
static void route_weights(float *wr, int64_t k, int norm, float scaling) {
    if (norm && k > 1) {
        float sum = 0.0f;
        for (int64_t j = 0; j < k; j++) sum += wr[j];
        for (int64_t j = 0; j < k; j++) wr[j] = wr[j] / (sum + 1e-20f);
    }
    for (int64_t j = 0; j < k; j++) wr[j] = wr[j] * scaling;
}

/* Greedy router over E experts for T tokens: logits [T, E] (float32, from the gate
   product), scores = softmax (sigmoid = 0) or sigmoid (1); the k largest scores (ties to
   the lower expert id), their scores as weights, divided by their sum + 1e-20 when
   norm (k > 1), times scaling. idx [T, k] int64 in descending score order, wt [T, k]. */
void dsvl2_route_greedy(float *logits, int64_t T, int64_t E, int64_t k, int sigmoid, int norm, float scaling,
                        int64_t *idx, float *wt) {
    for (int64_t t = 0; t < T; t++) {
        float *s = logits + t * E;
        route_scores(s, E, sigmoid);
        int64_t *ir = idx + t * k;
        float *wr = wt + t * k;
        for (int64_t j = 0; j < k; j++) { /* selection: k passes over E (k, E small) */
            int64_t best = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t i = 0; i < j; i++) taken |= ir[i] == e;
                if (!taken && (best < 0 || s[e] > s[best])) best = e;
            }
            ir[j] = best;
            wr[j] = s[best];
        }
        route_weights(wr, k, norm, scaling);
    }
}

/* the k largest of v[0..n) into top[0..k) (k <= n), in descending order; an exact tie goes
   to the lower index (a later value enters only when strictly larger than an entry, so
   the earlier of two equal values stays ahead), a NaN never outranks a number */
static inline int above(float a, float b) { return a > b || (b != b && a == a); }
static void top_k(const float *v, int64_t n, int64_t k, int64_t *top) {
    int64_t have = 0;
    for (int64_t i = 0; i < n; i++) {
        if (have == k && !above(v[i], v[top[k - 1]])) continue;
        int64_t p = have < k ? have++ : k - 1; /* slot freed at the end (the smallest drops out) */
        while (p > 0 && above(v[i], v[top[p - 1]])) {
            top[p] = top[p - 1];
            p--;
        }
        top[p] = i;
    }
}

/* Router over E experts for T tokens, every method of the reference's MoEGate:
     method 0 (greedy): dsvl2_route_greedy;
     method 1 (group_limited_greedy): choice = scores; group score = the group's maximum;
     method 2 (noaux_tc): choice = scores + bias[E]; group score = the sum of the group's
       two largest choices (largest + second);
   for methods 1 / 2, E experts in G groups of E / G consecutive ids: the topk_group
   groups of the largest group scores are kept, the other groups' choices become 0.0 (not
   -inf: with negative biased choices a dropped expert can still be chosen, as in the
   reference), the k largest choices are chosen and their UNBIASED scores are the weights;
   then as dsvl2_route_greedy: divided by their sum + 1e-20 when norm (k > 1), times
   scaling. logits [T, E] (float32, from the gate product) are overwritten with the scores.
   idx [T, k] int64 in descending choice order, wt [T, k] float32.
   Ties: an exact tie (group scores or choices) goes to the lower group / expert id, so the
   result is a function of the row alone. torch.topk, the reference, breaks exact ties in
   an order of its own (not by id); outside exact ties the choice is the reference's.
   Returns -1 (nothing written) for a method other than 0..2, k outside [1, E], or, for
   methods 1 / 2, G not dividing E, topk_group outside [1, G], groups of fewer than 2
   experts (noaux_tc) or a missing bias (noaux_tc). */
int dsvl2_route(float *logits, int64_t T, int64_t E, int64_t k, int method, int sigmoid, const float *bias,
                int64_t G, int64_t topk_group, int norm, float scaling, int64_t *idx, float *wt) {
    if (method < 0 || method > 2 || k < 1 || k > E) return -1;
    if (method == 0) {
        dsvl2_route_greedy(logits, T, E, k, sigmoid, norm, scaling, idx, wt);
        return 0;
    }
    if (G < 1 || E % G || topk_group < 1 || topk_group > G) return -1;
    if (method == 2 && (!bias || E / G < 2)) return -1;
    const int64_t size = E / G;
    float choice[E], gscore[G];
    int64_t keep[topk_group], two[2];
    unsigned char kept[G];
    for (int64_t t = 0; t < T; t++) {
        float *s = logits + t * E;
        route_scores(s, E, sigmoid);
        for (int64_t e = 0; e < E; e++) choice[e] = method == 2 ? s[e] + bias[e] : s[e];
        for (int64_t g = 0; g < G; g++) {
            const float *c = choice + g * size;
            if (method == 2) {
                top_k(c, size, 2, two);
                gscore[g] = c[two[0]] + c[two[1]];
            } else {
                float mx = c[0];
                for (int64_t i = 1; i < size; i++) mx = c[i] > mx ? c[i] : mx;
                gscore[g] = mx;
            }
        }
        top_k(gscore, G, topk_group, keep);
        memset(kept, 0, (size_t)G);
        for (int64_t j = 0; j < topk_group; j++) kept[keep[j]] = 1;
        for (int64_t e = 0; e < E; e++)
            if (!kept[e / size]) choice[e] = 0.0f;
        int64_t *ir = idx + t * k;
        float *wr = wt + t * k;
        top_k(choice, E, k, ir);
        for (int64_t j = 0; j < k; j++) wr[j] = s[ir[j]];
        route_weights(wr, k, norm, scaling);
    }
    return 0;
}

/* half-split RoPE of one head in place: out[i] = x[i] cos[i] - x[i + d/2] sin[i] for
   i < d/2, x[i] cos[i] + x[i - d/2] sin[i] above (the reference's x * cos +
   rotate_half(x) * sin, operation for operation) */
static void rope_half(float *x, const float *cos, const float *sin, int64_t d) {
    float tmp[1024];
    int64_t h = d / 2;
    for (int64_t i = 0; i < d; i++) {
        float rot = i < h ? -x[i + h] : x[i - h];
        tmp[i] = x[i] * cos[i] + rot * sin[i];
    }
    memcpy(x, tmp, d * sizeof(float));
}

#define CHUNK 128 /* cached slots per attention work unit */

/* Heads 0..H of one row over its cached positions [s0, s1): per head the largest score m,
   the sum l of exp(score - m) and the unnormalised o = sum of exp(score - m) v (sc: H x
   CHUNK scores). Position s lives in block tab[s / BS], slot s % BS of the pools kc / vc
   (nkv floats a slot); the next position's key / value are prefetched while one is used
   (the hardware prefetcher does not cross from one block to another). */
static void attend_chunk(const float *q, const float *kc, const float *vc, const int64_t *tab, int64_t BS,
                         int64_t nkv, int64_t H, int64_t group, int64_t hd, float scale, int64_t s0, int64_t s1,
                         float *sc, float *m, float *l, float *o) {
#define SLOT(s) ((tab[(s) / BS] * BS + (s) % BS) * nkv)
    for (int64_t h = 0; h < H; h++) m[h] = -INFINITY, l[h] = 0.0f;
    for (int64_t s = s0; s < s1; s++) {
        const float *ks = kc + SLOT(s), *kn = s + 1 < s1 ? kc + SLOT(s + 1) : ks;
        for (int64_t h = 0; h < H; h++) {
            float v = dot_pf(q + h * hd, ks + (h / group) * hd, kn + (h / group) * hd, hd) * scale;
            sc[h * CHUNK + s - s0] = v;
            m[h] = v > m[h] ? v : m[h];
        }
    }
    for (int64_t h = 0; h < H; h++) {
        for (int64_t s = 0; s < s1 - s0; s++) l[h] += (sc[h * CHUNK + s] = expf(sc[h * CHUNK + s] - m[h]));
        for (int64_t i = 0; i < hd; i++) o[h * hd + i] = 0.0f;
    }
    for (int64_t s = s0; s < s1; s++) {
        const float *vs = vc + SLOT(s), *vn = s + 1 < s1 ? vc + SLOT(s + 1) : vs;
        for (int64_t h = 0; h < H; h++)
            axpy_pf(sc[h * CHUNK + s - s0], vs + (h / group) * hd, vn + (h / group) * hd, o + h * hd, hd);
    }
#undef SLOT
}

/* float32 scratch that dsvl2_mha_decode needs for B rows, H / Hk heads of hd, S positions */
int64_t dsvl2_mha_scratch(int64_t B, int64_t H, int64_t Hk, int64_t hd, int64_t S) {
    return B * (2 * H + 2 * Hk) * hd + B * ((S + CHUNK - 1) / CHUNK) * H * (CHUNK + hd + 2);
}

/* Check a decode step's block tables before anything is read or written: row b's
   positions 0 .. pos[b] must lie in its W table entries, each a block of the pool. */
int dsvl2_check_tables(int64_t B, int64_t NB, int64_t BS, const int64_t *table, int64_t W, const int64_t *pos) {
    if (BS < 1 || W < 1) return -1;
    for (int64_t b = 0; b < B; b++) {
        if (pos[b] < 0 || pos[b] / BS >= W) return -1;
        for (int64_t j = 0; j <= pos[b] / BS; j++)
            if (table[b * W + j] < 0 || table[b * W + j] >= NB) return -1;
    }
    return 0;
}

/* One MHA decode step for B rows (one new token each):
     q, k, v = x Wq^T (+bq), x Wk^T (+bk), x Wv^T (+bv)      x [B, D], bf16 weights
     RoPE (half-split, cos / sin [B, hd]) on q and k; k, v written into the float32 block
     pools (kc / vc [NB, BS, Hk, hd]) at row b's position pos[b], i.e. block
     table[b, pos[b] / BS], slot pos[b] % BS (table [B, W] int64)
     head h of row b attends over its positions 0 .. pos[b] of kv head h / (H / Hk):
       softmax(q . k_s * scale) . v_s
     out [B, D] = attn Wo^T (+bo)
   Attention in units of CHUNK positions (any thread), merged per row in position order:
   a row's result depends on its length, never on the other rows or on where its blocks lie.
   scratch: dsvl2_mha_scratch(B, H, Hk, hd, W * BS) floats.
   Returns -1 when a position or block id is out of range, -2 for hd > 1024 or H not a
   multiple of Hk (nothing is written then). */
int dsvl2_mha_decode(const float *x, int64_t B, int64_t D, int64_t H, int64_t Hk, int64_t hd,
                     const uint16_t *wq, const uint16_t *wk, const uint16_t *wv, const uint16_t *wo,
                     const float *bq, const float *bk, const float *bv, const float *bo,
                     const float *cos, const float *sin, float *kc, float *vc, int64_t NB, int64_t BS,
                     const int64_t *table, int64_t W, const int64_t *pos, float scale, float *out, float *scratch) {
    if (hd > 1024 || H % Hk) return -2;
    if (dsvl2_check_tables(B, NB, BS, table, W, pos)) return -1;
    const int64_t nq = H * hd, nkv = Hk * hd, group = H / Hk, per_unit = H * (CHUNK + hd + 2);
    float *q = scratch, *k = q + B * nq, *v = k + B * nkv, *att = v + B * nkv, *parts = att + B * nq;
    int64_t ustart[B + 1]; /* row b's units: ustart[b] .. ustart[b + 1] - 1 */
    ustart[0] = 0;
    for (int64_t b = 0; b < B; b++) ustart[b + 1] = ustart[b] + (pos[b] + CHUNK) / CHUNK;
#pragma omp parallel
    {
        dsvl2_team_rows(x, D, B, D, wq, NULL, nq, q, nq);
        dsvl2_team_rows(x, D, B, D, wk, NULL, nkv, k, nkv);
        dsvl2_team_rows(x, D, B, D, wv, NULL, nkv, v, nkv);
#pragma omp barrier
#pragma omp single
        for (int64_t b = 0; b < B; b++) {
            float *qb = q + b * nq, *kb = k + b * nkv, *vb = v + b * nkv;
            for (int64_t i = 0; bq && i < nq; i++) qb[i] += bq[i];
            for (int64_t i = 0; bk && i < nkv; i++) kb[i] += bk[i];
            for (int64_t i = 0; bv && i < nkv; i++) vb[i] += bv[i];
            for (int64_t h = 0; h < H; h++) rope_half(qb + h * hd, cos + b * hd, sin + b * hd, hd);
            for (int64_t h = 0; h < Hk; h++) rope_half(kb + h * hd, cos + b * hd, sin + b * hd, hd);
            int64_t at = (table[b * W + pos[b] / BS] * BS + pos[b] % BS) * nkv;
            memcpy(kc + at, kb, nkv * sizeof(float));
            memcpy(vc + at, vb, nkv * sizeof(float));
        }
        /* implicit barrier */
        /* work unit: CHUNK consecutive positions of one row, all heads (whole blocks of
           the pools when BS divides CHUNK); the units of a row are merged afterwards in
           position order */
#pragma omp for schedule(dynamic, 1)
        for (int64_t u = 0; u < ustart[B]; u++) {
            int64_t b = 0;
            while (ustart[b + 1] <= u) b++;
            const int64_t c = u - ustart[b], s0 = c * CHUNK, n = pos[b] + 1, s1 = s0 + CHUNK < n ? s0 + CHUNK : n;
            float *part = parts + u * per_unit;
            attend_chunk(q + b * nq, kc, vc, table + b * W, BS, nkv, H, group, hd, scale, s0, s1, part,
                         part + H * CHUNK, part + H * CHUNK + H, part + H * CHUNK + 2 * H);
        }
        /* implicit barrier */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            const int64_t b = bh / H, h = bh % H;
            float mx = -INFINITY, l = 0.0f, *o = att + b * nq + h * hd;
            for (int64_t u = ustart[b]; u < ustart[b + 1]; u++) {
                const float m = parts[u * per_unit + H * CHUNK + h];
                mx = m > mx ? m : mx;
            }
            for (int64_t i = 0; i < hd; i++) o[i] = 0.0f;
            for (int64_t u = ustart[b]; u < ustart[b + 1]; u++) {
                const float *part = parts + u * per_unit;
                const float w = expf(part[H * CHUNK + h] - mx);
                l = fmaf(w, part[H * CHUNK + H + h], l);
                axpy(w, part + H * CHUNK + 2 * H + h * hd, o, hd);
            }
            for (int64_t i = 0; i < hd; i++) o[i] /= l;
        }
        /* implicit barrier */
        dsvl2_team_rows(att, nq, B, nq, wo, NULL, D, out, D);
    }
    for (int64_t b = 0; bo && b < B; b++)
        for (int64_t i = 0; i < D; i++) out[b * D + i] += bo[i];
    return 0;
}
