/* SiLU-gated MLPs of a decode step (dsvl2.model.native): routed experts, shared experts and
   dense MLPs, with bf16, int8 or int4 weights, as one call each (products.h mlp_call) whose
   products bf16.c (dsvl2_moe_team8: bf16 / int8) and int4.c (dsvl2_moe_team4) compute.
   dsvl2_moe and dsvl2_moe_i4 are the calls native/__init__.py makes for one MLP;
   dsvl2_run_mlps is step.c's, the routed and the shared experts of a layer in one team.

   Numbers: each (token, expert) pair's output is computed by the same row functions
   whichever thread takes it, and a token's sum is formed afterwards in ascending expert id
   (products.h combine_pairs), so no result depends on the split, on the team or on the
   other tokens. */

#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "products.h"

/* Returns -1 (nothing else done) for an expert id outside [0, E) */
static int mlp_begin(mlp_call *c, const dsvl2_mlp *m, const float *x, int64_t T, int64_t D, const int64_t *idx,
                     const float *wt, int64_t k, float *out, float *scratch, int64_t *order) {
    const int64_t P = T * k, F = m->F;
    *c = (mlp_call){.m = m, .x = x, .wt = wt, .idx = idx, .T = T, .D = D, .k = k, .out = out, .order = order};
    c->used = sort_pairs(idx, P, m->E, order);
    if (c->used < 0) return -1;
    c->xs = scratch, c->g = c->xs + P * D, c->u = c->g + P * F, c->ys = c->u + P * F;
    if (m->format == MLP_INT4) dsvl2_moe_gather4(c);
    else
        for (int64_t i = 0; i < P; i++) memcpy(c->xs + i * D, x + (order[i] / k) * D, D * sizeof(float));
    return 0;
}

static void mlp_team(const mlp_call *c) {
    if (c->m->format == MLP_INT4) dsvl2_moe_team4(c);
    else dsvl2_moe_team8(c);
}

static void mlp_end(const mlp_call *c) { combine_pairs(c->ys, c->order, c->wt, c->T, c->k, c->D, c->out); }

/* the MLP m for T tokens start to end, its products by a new team (dsvl2_moe, dsvl2_moe_i4,
   a dense layer); -1 for an expert id outside [0, E) */
static int mlp_run(const dsvl2_mlp *m, const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt,
                   int64_t k, float *out, float *scratch, int64_t *order) {
    mlp_call c;
    if (mlp_begin(&c, m, x, T, D, idx, wt, k, out, scratch, order)) return -1;
#pragma omp parallel
    mlp_team(&c);
    mlp_end(&c);
    return 0;
}

/* Routed (or dense) SiLU-gated experts for T tokens, each choosing k of E experts:
     out[t] = sum over its choices in ascending expert id of wt[t, j] * down_e(silu(gate_e x) * up_e x)
   gate / up [E, F, D], down [E, D, F]: bf16 (esize 2, scales NULL) or int8 (esize 1) with
   bf16 per-row scales gs / us [E, F], ds [E, D]; idx int64 [T, k]; wt float32 [T, k]
   (both NULL: one dense MLP, E = k = 1). Returns -1 (and does nothing) on an expert id
   outside [0, E).
   scratch: float32 [T*k*(2D + 2F)]; order: int64 [T*k + 2E + 1] (see native/__init__.py).
   One mlp_call run start to end (mlp_run; the products: bf16.c dsvl2_moe_team8).

   Work split: with several experts in use, each thread takes whole experts (gate, up,
   SiLU and down of all of that expert's tokens) so the threads never wait for each
   other inside the layer; a single expert (a dense MLP) is split by output rows instead
   (its SiLU by values).
   Each pair's output is computed by the same code whoever computes it, and a token's
   sum is formed afterwards in ascending expert id, so it does not depend on the split
   nor on the other tokens. */
int dsvl2_moe(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
              const void *gate, const void *up, const void *down, int64_t E, int64_t F,
              float *out, float *scratch, int64_t *order,
              int64_t esize, const uint16_t *gs, const uint16_t *us, const uint16_t *ds) {
    const dsvl2_mlp m = {gate, up, down, gs, us, ds, esize == 1 ? MLP_INT8 : MLP_BF16, E, F, 0, 0};
    return mlp_run(&m, x, T, D, idx, wt, k, out, scratch, order);
}

/* Routed SiLU-gated experts with int4 weights for T tokens, each choosing k of E:
     out[t] = sum over its choices in ascending expert id of wt[t, j] * down_e(silu(gate_e x) * up_e x)
   gate / up: q [E, F, D/2], scales [E, F, D/Gd]; down: q [E, D, F/2], scales [E, D, F/Gf];
   idx int64 [T, k], wt float32 [T, k] (both NULL: one dense MLP, E = k = 1, as
   dsvl2_moe). Returns -1 (and does nothing) on an expert id outside [0, E).
   scratch: float32 [T*k*(2D + 2F)]; order: int64 [T*k + 2E + 1] (native/__init__.py).
   Work split as dsvl2_moe (the products: int4.c dsvl2_moe_team4): whole experts per thread
   when several are in use, else each expert's output rows split among the team. */
int dsvl2_moe_i4(const float *x, int64_t T, int64_t D, const int64_t *idx, const float *wt, int64_t k,
                 const uint8_t *gq, const uint16_t *gs, const uint8_t *uq, const uint16_t *us, const uint8_t *dq,
                 const uint16_t *ds, int64_t E, int64_t F, int64_t Gd, int64_t Gf, float *out, float *scratch,
                 int64_t *order_) {
    const dsvl2_mlp m = {gq, uq, dq, gs, us, ds, MLP_INT4, E, F, Gd, Gf};
    return mlp_run(&m, x, T, D, idx, wt, k, out, scratch, order_);
}

/* the MLP m for B rows of x (idx / wt: k choices a row, or NULL for a dense MLP) into out;
   with a second MLP s (shared experts: dense, F > 0) s's output into sout, both in one
   team: a thread done with its share of m's experts goes on to s's rows (the whole-expert
   split of m leaves one thread waiting for the other otherwise; small int8 decode: 70-145
   us a layer with the read in a fast spell). Returns -3 for an expert id outside [0, E). */
int dsvl2_run_mlps(const dsvl2_mlp *m, const float *x, int64_t B, int64_t D, const int64_t *idx, const float *wt,
                   int64_t k, float *out, const dsvl2_mlp *s, float *sout, float *scratch, int64_t *order) {
    if (!(s && s->F)) return mlp_run(m, x, B, D, idx, wt, k, out, scratch, order) ? -3 : 0;
    mlp_call c[2];
    if (mlp_begin(&c[0], m, x, B, D, idx, wt, k, out, scratch, order)) return -3;
    mlp_begin(&c[1], s, x, B, D, NULL, NULL, 1, sout, scratch + mlp_scratch(B, k, D, m->F),
              order + mlp_order(B, k, m->E));
#pragma omp parallel
    {
        mlp_team(&c[0]);
        mlp_team(&c[1]);
    }
    mlp_end(&c[0]);
    mlp_end(&c[1]);
    return 0;
}
