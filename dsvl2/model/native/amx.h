/* Shared by the AMX kernels of dsvl2.model.native (amx.c: products with stored weights;
   amx_attention.c: prefill and vision attention): whether this build has AMX code, the
   target attribute, the tile configuration, a 16 x 16 transpose and the per-thread work
   memory. The CPU check (dsvl2_amx_usable) lives in amx.c.

   Built only with GCC >= 11 on x86-64 (DSVL2_AMX defined); elsewhere the entry points are
   stubs that say AMX is not usable. */
#ifndef DSVL2_AMX_H
#define DSVL2_AMX_H
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define DSVL2_AMX 1
#endif

/* 1 where the CPU has AMX-TILE, AMX-BF16 and AVX-512 BF16 and the kernel let this process
   use the tile data (amx.c) */
int dsvl2_amx_usable(void);

#ifdef DSVL2_AMX
#include <immintrin.h>

#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

/* palette 1, every tile used as 16 rows x 64 bytes (C: 16 x 16 float32; A: 16 x 32 bf16;
   B: 16 pairs of k x 16 columns) */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static inline AMX void configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) cfg.colsb[t] = 64, cfg.rows[t] = 16;
    _tile_loadconfig(&cfg);
}

/* the 16 x 16 32-bit lanes of r transposed in place (interleaves, then 128-bit lanes) */
static inline __attribute__((always_inline)) AMX void transpose16(__m512i r[16]) {
    __m512i a[16], b[16];
    for (int i = 0; i < 8; i++) {
        a[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        a[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) { /* b[4i + j], 128-bit lane L: column 4L + j of rows 4i..4i+3 */
        b[4 * i] = _mm512_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 1] = _mm512_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
        b[4 * i + 2] = _mm512_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
        b[4 * i + 3] = _mm512_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
    }
    for (int j = 0; j < 4; j++) {
        const __m512i c0 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0x88), c1 = _mm512_shuffle_i32x4(b[j], b[4 + j], 0xdd);
        const __m512i d0 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0x88);
        const __m512i d1 = _mm512_shuffle_i32x4(b[8 + j], b[12 + j], 0xdd);
        r[j] = _mm512_shuffle_i32x4(c0, d0, 0x88);
        r[4 + j] = _mm512_shuffle_i32x4(c1, d1, 0x88);
        r[8 + j] = _mm512_shuffle_i32x4(c0, d0, 0xdd);
        r[12 + j] = _mm512_shuffle_i32x4(c1, d1, 0xdd);
    }
}

/* The calling thread's work memory, at least n bytes, 64-byte aligned: kept for its next
   call (a fresh allocation of ~1 MiB costs its page faults every call), grown when too
   small; NULL when memory ran out. Each file including this header has its own. The team
   of a parallel region shares the caller's (each thread its own part). */
static __thread char *scratch_mem;
static __thread size_t scratch_size;

static inline char *scratch(size_t n) {
    if (n > scratch_size) {
        free(scratch_mem);
        scratch_size = 0;
        scratch_mem = aligned_alloc(64, (n + 63) / 64 * 64);
        if (!scratch_mem) return NULL;
        scratch_size = n;
    }
    return scratch_mem;
}

/* bytes rounded up to whole cache lines */
static inline size_t lines(size_t n) { return (n + 63) / 64 * 64; }

#endif /* DSVL2_AMX */
#endif
