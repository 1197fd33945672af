/* All decoder layers of one decode step in one call (dsvl2.model.native): the blocks of
   layers.c, mla.c, bf16.c and int4.c strung together in the module path's order, for
   models whose every block has a native version: MHA attention with a float32 cache or
   MLA attention with a float32 or bf16 cache; any router (greedy, group-limited greedy,
   noaux_tc) with a bf16 gate; bf16, int8 or int4 MLP / expert weights; bf16 norms.
   model/decode_plan.py decides when.

   Why: with every block native, a batch-1 step of the real tiny model still spent ~7-10 ms
   of its ~76 ms in Python between the ~60 calls (module calls, wrappers, residual adds);
   base (30 layers) returned to Python ~8 times a layer. Run between weight streams, that
   code runs with cold caches.

   Numbers: the same calls in the same order as the module path (language.py DecoderLayer,
   attention.py MHA / MLA, moe.py MoE, ops.py RMSNorm / gated_mlp), and the residual adds as
   single float32 adds (x + attn; routed + shared, then x + that), so the result equals the
   module path's bit for bit (tests/test_decode_plan.py). */

#include <stdint.h>

#include "products.h"

/* one decoder layer */
typedef struct {
    const uint16_t *ln1, *ln2;         /* bf16 RMSNorm weights [D] before attention / MLP */
    const dsvl2_mla *mla;              /* MLA attention; NULL: MHA with the weights below */
    const uint16_t *wq, *wk, *wv, *wo; /* MHA, bf16: [H hd, D], [Hk hd, D], [Hk hd, D], [D, H hd] */
    const float *bq, *bk, *bv, *bo;    /* MHA float32 biases, or NULL */
    const uint16_t *gate;              /* router, bf16 [E, D]; NULL: a dense MLP layer */
    const float *bias;                 /* noaux_tc's float32 correction bias [E], else NULL */
    dsvl2_mlp mlp, shared;             /* routed experts (a dense layer: its MLP), shared experts */
} dsvl2_layer;

/* the model: its layers and what every layer shares */
typedef struct {
    const dsvl2_layer *layers;
    int64_t nl, D, H, Hk, hd;  /* H, Hk, hd: the MHA heads (MLA layers carry their own sizes) */
    int64_t k, method, G, topk_group, sigmoid, norm; /* routing, as dsvl2_route */
    int64_t Emax, Fmax;        /* the largest E and F of any layer's MLPs, shared experts included */
    float eps, scale, scaling; /* RMSNorm eps, MHA softmax scale, routed_scaling_factor */
} dsvl2_decoder;

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* float32 scratch of dsvl2_decode_layers for B rows reading up to S positions */
int64_t dsvl2_decode_scratch(const dsvl2_decoder *M, int64_t B, int64_t S) {
    /* the routed experts' call and the shared experts' beside it (mlp_call) */
    int64_t need = mlp_scratch(B, max64(M->k, 1), M->D, M->Fmax) + mlp_scratch(B, 1, M->D, M->Fmax);
    for (int64_t i = 0; i < M->nl; i++) {
        const dsvl2_mla *a = M->layers[i].mla;
        need = max64(need, a ? dsvl2_mla_scratch(B, a->H, a->dn, a->dr, a->dv, a->r, a->qr, S)
                             : dsvl2_mha_scratch(B, M->H, M->Hk, M->hd, S));
    }
    return 3 * B * M->D + B * M->Emax + need;
}

/* int64 scratch of dsvl2_decode_layers (the experts' sort: the routed call's, the shared one's) */
int64_t dsvl2_decode_order(int64_t B, int64_t k, int64_t Emax) {
    return mlp_order(B, max64(k, 1), Emax) + mlp_order(B, 1, 1);
}

/* x [B, D] (float32, in place): the embeddings in, the last layer's output out.
   caches: MHA: 2 nl pointers, layer i's float32 key / value block pools [NB, BS, Hk, hd] at
   2i / 2i + 1; MLA: nl pointers, layer i's block pool [NB, BS, r + dr], float32 or bf16
   (cache_bf16). cos / sin [B, hd] (MHA) or [B, dr] (MLA), table [B, W], pos [B]: as
   dsvl2_mha_decode / dsvl2_mla_decode. Layer i's routing goes to idx / wt [nl, B, k]
   (dense layers' entries are left as they are). scratch: dsvl2_decode_scratch(M, B, W BS)
   floats; order: dsvl2_decode_order(B, k, Emax) int64s.
   Returns 0, or with the layer in *failed: -1 (positions or block ids out of range), -2
   (sizes the attention cannot take), -3 (routing parameters the router refuses, or an
   expert id out of range: neither happens for a plan decode_plan.py built). */
int dsvl2_decode_layers(const dsvl2_decoder *M, float *x, int64_t B, void *const *caches, int cache_bf16,
                        const float *cos, const float *sin, int64_t NB, int64_t BS, const int64_t *table, int64_t W,
                        const int64_t *pos, int64_t *idx, float *wt, float *scratch, int64_t *order,
                        int64_t *failed) {
    const int64_t D = M->D, k = M->k;
    float *h = scratch, *a = h + B * D, *sh = a + B * D, *logits = sh + B * D, *rest = logits + B * M->Emax;
    for (int64_t i = 0; i < M->nl; i++) {
        const dsvl2_layer *L = M->layers + i;
        int rc;
        *failed = i;
        dsvl2_rmsnorm(x, B, D, L->ln1, 1, M->eps, h);
        if (L->mla)
            rc = dsvl2_mla_decode(L->mla, h, B, cos, sin, caches[i], cache_bf16, NB, BS, table, W, pos, a, rest);
        else
            rc = dsvl2_mha_decode(h, B, D, M->H, M->Hk, M->hd, L->wq, L->wk, L->wv, L->wo, L->bq, L->bk, L->bv,
                                  L->bo, cos, sin, caches[2 * i], caches[2 * i + 1], NB, BS, table, W, pos, M->scale,
                                  a, rest);
        if (rc) return rc;
        for (int64_t j = 0; j < B * D; j++) x[j] = x[j] + a[j];
        dsvl2_rmsnorm(x, B, D, L->ln2, 1, M->eps, h);
        if (L->gate) {
            int64_t *li = idx + i * B * k;
            float *lw = wt + i * B * k;
            dsvl2_linear(h, B, D, L->gate, L->mlp.E, NULL, logits);
            if (dsvl2_route(logits, B, L->mlp.E, k, (int)M->method, (int)M->sigmoid, L->bias, M->G, M->topk_group,
                            (int)M->norm, M->scaling, li, lw))
                return -3;
            if (dsvl2_run_mlps(&L->mlp, h, B, D, li, lw, k, a, &L->shared, sh, rest, order)) return -3;
            if (L->shared.F)
                for (int64_t j = 0; j < B * D; j++) a[j] = a[j] + sh[j];
        } else {
            dsvl2_run_mlps(&L->mlp, h, B, D, NULL, NULL, 1, a, NULL, NULL, rest, order);
        }
        for (int64_t j = 0; j < B * D; j++) x[j] = x[j] + a[j];
    }
    *failed = -1;
    return 0;
}
