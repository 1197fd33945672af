/* Rotary position embedding of a prefill's queries and keys in one pass (dsvl2.model.native
   ``rope``; dsvl2/model/rope.py ``apply_rope`` has the two conventions).

   Why: torch's apply_rope over q [1, 32, 1431, 64] (base's MLA rope part, a strided view)
   is seven passes and six new tensors (the de-interleave's copy alone 5 ms): ~9 ms a
   layer, ~0.27 s of a base c01's prefill on an AMX Xeon, 2 threads.

   Math, per row of D values with its position's cos / sin (float32): interleaved (MLA)
   first de-interleaves (x[2i], then x[2i + 1]: evens, then odds), then, with h = D / 2,
   out[i] = x[i] cos[i] + (-x[h + i]) sin[i] and out[h + i] = x[h + i] cos[h + i] + x[i] sin[h + i]:
   torch's x * cos + rotate_half(x) * sin with the same three roundings an element (products
   rounded, then the sum; the library is built with -ffp-contract=off), so the same bits. */

#include <omp.h>
#include <stdint.h>

/* x [B, H, T, D] float32 with strides xs[0..2] (b, h, t; the last dimension contiguous); cos /
   sin [B or 1, T, D] contiguous (cb: their batch stride, 0 where shared); out [B, H, T, D]
   contiguous. D even, at most 1024. */
void dsvl2_rope(const float *x, const int64_t *xs, int64_t B, int64_t H, int64_t T, int64_t D, const float *cos,
                const float *sin, int64_t cb, int interleaved, float *out) {
    const int64_t h = D / 2, rows = B * H * T;
#pragma omp parallel for schedule(static) if (rows * D >= (1 << 15))
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (H * T), hh = r / T % H, t = r % T;
        const float *xr = x + b * xs[0] + hh * xs[1] + t * xs[2];
        const float *c = cos + b * cb + t * D, *s = sin + b * cb + t * D;
        float v[1024];
        if (interleaved)
            for (int64_t i = 0; i < h; i++) v[i] = xr[2 * i], v[h + i] = xr[2 * i + 1];
        else
            for (int64_t i = 0; i < D; i++) v[i] = xr[i];
        float *o = out + r * D;
        for (int64_t i = 0; i < h; i++) {
            const float a = v[i] * c[i], m = -v[h + i] * s[i];
            o[i] = a + m;
        }
        for (int64_t i = 0; i < h; i++) {
            const float a = v[h + i] * c[h + i], m = v[i] * s[h + i];
            o[h + i] = a + m;
        }
    }
}
