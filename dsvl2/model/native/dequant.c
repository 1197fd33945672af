/* Dequantising int8 weights (dsvl2.model.quant: values int8 [N, K], bf16 per-row scales
   [N]; w = q * scale) for the prefill products: the weight is written once into a reused
   buffer, in float32 or bf16, and a GEMM (torch) runs on it. One pass over memory, where
   torch's int8 -> bf16 copy then a multiply by the scales takes two.

   Bits: q * s is exact in float32 (7 + 8 significant bits), so the float32 value is the
   reference's (``quant.dequantize``); the bf16 value is that float32 rounded to nearest
   even by integer arithmetic (as torch rounds a finite float32, whatever its size:
   vcvtneps2bf16 would flush denormals to zero), i.e. torch's ``q.to(bf16) * s``.

   AVX-512 (F + BW: 16 values a step, the 32-to-16-bit narrowing in one instruction)
   where the CPU has it, chosen at run time (the library is built for AVX2), else AVX2
   (8 values a step); the tail of a row in scalar code. Rows are split among the OpenMP
   team (torch's), unless the weight is too small for a fork to pay. */

#include <immintrin.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "products.h"

#define AVX512 __attribute__((target("avx512f,avx512bw")))

/* round_bf16 (one value) and round_bf16_16 (16 lanes): products.h; the same for 8 lanes,
   the result in the low 16 bits of each 32-bit lane */
static inline __m256i round_bf16_8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff))), 16);
}


static void row_tail(const int8_t *q, float s, int64_t k0, int64_t K, float *o32, uint16_t *o16) {
    for (int64_t k = k0; k < K; k++) {
        const float v = (float)q[k] * s;
        if (o16) o16[k] = round_bf16(v);
        else o32[k] = v;
    }
}

/* one row of K values: o32 (float32) or o16 (bf16) */
static void row_avx2(const int8_t *q, float s, int64_t K, float *o32, uint16_t *o16) {
    const __m256 vs = _mm256_set1_ps(s);
    int64_t k = 0;
    if (o16)
        for (; k + 16 <= K; k += 16) {
            const __m128i b = _mm_loadu_si128((const __m128i *)(q + k));
            const __m256 lo = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b)), vs);
            const __m256 hi = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(b, 8))), vs);
            /* packus works per 128-bit lane: [lo 0-3, hi 0-3, lo 4-7, hi 4-7], then put in order */
            const __m256i p = _mm256_packus_epi32(round_bf16_8(lo), round_bf16_8(hi));
            _mm256_storeu_si256((__m256i *)(o16 + k), _mm256_permute4x64_epi64(p, 0xd8));
        }
    else
        for (; k + 8 <= K; k += 8) {
            const __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + k)));
            _mm256_storeu_ps(o32 + k, _mm256_mul_ps(_mm256_cvtepi32_ps(v), vs));
        }
    row_tail(q, s, k, K, o32, o16);
}

static AVX512 void row_512(const int8_t *q, float s, int64_t K, float *o32, uint16_t *o16) {
    const __m512 vs = _mm512_set1_ps(s);
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
            _mm_loadu_si128((const __m128i *)(q + k)))), vs);
        if (o16) _mm256_storeu_si256((__m256i *)(o16 + k), _mm512_cvtepi32_epi16(round_bf16_16(v)));
        else _mm512_storeu_ps(o32 + k, v);
    }
    row_tail(q, s, k, K, o32, o16);
}

/* out [N, K] = q [N, K] * scale [N] (per row): float32 (obf16 = 0) or bf16 (obf16 = 1).
   variant: 1 AVX-512 (where the CPU has AVX-512 F and BW, else AVX2), 0 AVX2, -1 the best
   the CPU has. Returns the variant used (1 or 0). */
int dsvl2_dequant_i8(const int8_t *q, const uint16_t *scale, int64_t N, int64_t K, void *out, int obf16,
                     int variant) {
    const int wide = variant != 0 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
#pragma omp parallel for schedule(static) if (N * K >= (1 << 17))
    for (int64_t n = 0; n < N; n++) {
        float *o32 = obf16 ? NULL : (float *)out + n * K;
        uint16_t *o16 = obf16 ? (uint16_t *)out + n * K : NULL;
        const float s = bf16_to_f32(scale[n]);
        if (wide) row_512(q + n * K, s, K, o32, o16);
        else row_avx2(q + n * K, s, K, o32, o16);
    }
    return wide;
}
