/* All decoder layers of one decode step in one call (dsvl2.model.native): the blocks of
   layers.c and bf16.c strung together in the module path's order, for models whose every
   block has a native version (MHA attention with a float32 cache, greedy routing or a
   dense MLP, bf16 weights; the tiny variant). model/decode_plan.py decides when.

   Why: with every block native, a batch-1 step of the real tiny model still spent ~7-10 ms
   of its ~76 ms in Python between the ~60 calls (module calls, wrappers, residual adds);
   run between weight streams, that code runs with cold caches.

   Numbers: the same calls in the same order as the module path (language.py DecoderLayer,
   moe.py MoE, ops.py RMSNorm / GatedMLP), and the residual adds as single float32 adds
   (x + attn; routed + shared, then x + that), so the result equals the module path's bit
   for bit (tests/test_decode_plan.py). */

#include <stdint.h>

#include "products.h"

/* one decoder layer's weights (all bf16, contiguous) */
typedef struct {
    const uint16_t *ln1, *ln2;         /* RMSNorm weights [D] before attention / MLP */
    const uint16_t *wq, *wk, *wv, *wo; /* [H hd, D], [Hk hd, D], [Hk hd, D], [D, H hd] */
    const float *bq, *bk, *bv, *bo;    /* float32 biases, or NULL */
    const uint16_t *gate;              /* router [E, D]; NULL: a dense MLP layer */
    const uint16_t *mg, *mu, *md;      /* routed experts [E, F, D] x 2, [E, D, F]; dense: [F, D] x 2, [D, F] */
    const uint16_t *sg, *su, *sd;      /* shared experts [Fs, D] x 2, [D, Fs], or NULL */
    int64_t E, F, Fs;                  /* dense layer: E = 1, F its width; Fs = 0 without shared experts */
} dsvl2_layer;

/* float32 scratch of dsvl2_decode_layers for B rows reading up to S positions (Emax,
   Fmax: the largest E and F of any layer, shared experts' Fs included in Fmax) */
int64_t dsvl2_decode_scratch(int64_t B, int64_t D, int64_t H, int64_t Hk, int64_t hd, int64_t S, int64_t k,
                             int64_t Emax, int64_t Fmax) {
    int64_t p = B * (k > 1 ? k : 1);
    int64_t moe = p * (2 * D + 2 * Fmax), mha = dsvl2_mha_scratch(B, H, Hk, hd, S);
    return 3 * B * D + B * Emax + (moe > mha ? moe : mha);
}

/* int64 scratch of dsvl2_decode_layers (the experts' sort) */
int64_t dsvl2_decode_order(int64_t B, int64_t k, int64_t Emax) { return B * (k > 1 ? k : 1) + 2 * Emax + 1; }

/* x [B, D] (float32, in place): the embeddings in, the last layer's output out.
   caches: 2 nl pointers, layer i's float32 key / value block pools [NB, BS, Hk, hd] at 2i /
   2i + 1; cos / sin [B, hd], table [B, W], pos [B]: as dsvl2_mha_decode. Greedy routing
   with k experts per token (sigmoid / norm / scaling as dsvl2_route_greedy); layer i's
   choices go to idx / wt [nl, B, k] (dense layers' entries are left as they are).
   Returns 0, or what dsvl2_mha_decode / dsvl2_moe returned (-1 / -2: positions or
   block ids out of range, bad head sizes) with the layer in *failed. */
int dsvl2_decode_layers(float *x, int64_t B, int64_t D, const dsvl2_layer *layers, int64_t nl, float *const *caches,
                        int64_t H, int64_t Hk, int64_t hd, float eps, float scale, int64_t k, int sigmoid, int norm,
                        float scaling, const float *cos, const float *sin, int64_t NB, int64_t BS,
                        const int64_t *table, int64_t W, const int64_t *pos, int64_t *idx, float *wt, int64_t Emax,
                        float *scratch, int64_t *order, int64_t *failed) {
    float *h = scratch, *a = h + B * D, *sh = a + B * D, *logits = sh + B * D, *rest = logits + B * Emax;
    for (int64_t i = 0; i < nl; i++) {
        const dsvl2_layer *L = layers + i;
        int rc;
        *failed = i;
        dsvl2_rmsnorm(x, B, D, L->ln1, 1, eps, h);
        rc = dsvl2_mha_decode(h, B, D, H, Hk, hd, L->wq, L->wk, L->wv, L->wo, L->bq, L->bk, L->bv, L->bo, cos, sin,
                              caches[2 * i], caches[2 * i + 1], NB, BS, table, W, pos, scale, a, rest);
        if (rc) return rc;
        for (int64_t j = 0; j < B * D; j++) x[j] = x[j] + a[j];
        dsvl2_rmsnorm(x, B, D, L->ln2, 1, eps, h);
        if (L->gate) {
            int64_t *li = idx + i * B * k;
            float *lw = wt + i * B * k;
            dsvl2_linear(h, B, D, L->gate, L->E, NULL, logits);
            dsvl2_route_greedy(logits, B, L->E, k, sigmoid, norm, scaling, li, lw);
            rc = dsvl2_moe(h, B, D, li, lw, k, L->mg, L->mu, L->md, L->E, L->F, a, rest, order, 2, NULL, NULL, NULL);
            if (rc) return rc;
            if (L->sg) {
                rc = dsvl2_moe(h, B, D, NULL, NULL, 1, L->sg, L->su, L->sd, 1, L->Fs, sh, rest, order, 2, NULL,
                               NULL, NULL);
                if (rc) return rc;
                for (int64_t j = 0; j < B * D; j++) a[j] = a[j] + sh[j];
            }
        } else {
            rc = dsvl2_moe(h, B, D, NULL, NULL, 1, L->mg, L->mu, L->md, 1, L->F, a, rest, order, 2, NULL, NULL, NULL);
            if (rc) return rc;
        }
        for (int64_t j = 0; j < B * D; j++) x[j] = x[j] + a[j];
    }
    *failed = -1;
    return 0;
}
