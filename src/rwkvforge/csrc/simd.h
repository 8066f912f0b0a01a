/* rwkvforge: what the SIMD kernels (wkv_cpu.c, softmax_cpu.c, decode_cpu.c) share: the clone attribute
 * that builds AVX-512 / AVX2 / baseline versions picked at load time (GCC, clang >= 14 on
 * x86-64), the 16-lane vector types (GCC / clang vector extensions), a two-vector shuffle
 * both compilers take, the bf16 -> fp32 widening and the 16-at-once lane sum. native.py hashes
 * this header into each library's cache key. */
#ifndef RWKVFORGE_SIMD_H
#define RWKVFORGE_SIMD_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__)) || \
                             (defined(__clang__) && __clang_major__ >= 14))
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))

typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));
typedef v16h v16hu __attribute__((aligned(2))); /* unaligned access */
typedef v16 v16fu __attribute__((aligned(4)));  /* unaligned access */

/* lanes of a and b (0-15 = a, 16-31 = b) picked by constant indices, in GCC and clang */
#if defined(__clang__)
#define SHUFFLE2(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE2(a, b, ...) __builtin_shuffle(a, b, (v16i){__VA_ARGS__})
#endif

ALWAYS_INLINE v16 widen(const uint16_t *p) { /* 16 bf16 -> fp32 (bf16 is fp32's upper half) */
    const v16u u = __builtin_convertvector(*(const v16hu *)p, v16u) << 16;
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* the 16 sums of 16 vectors at once: out[m] = sum of the lanes of x[m] (a transposing add
 * tree: 15 two-vector shuffles + adds per level pair instead of 16 separate reductions) */
ALWAYS_INLINE void hsum16(const v16 *restrict x, float *restrict out) {
    v16 l1[8], l2[4], l3[2];
    /* level 1: lanes 0-7 <- x[2m] halves added, lanes 8-15 <- x[2m+1] halves added */
#define LO8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define HI8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
    for (int m = 0; m < 8; m++)
        l1[m] = SHUFFLE2(x[2 * m], x[2 * m + 1], LO8) + SHUFFLE2(x[2 * m], x[2 * m + 1], HI8);
    /* level 2: 4-lane groups */
#define LO4 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27
#define HI4 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31
    for (int m = 0; m < 4; m++)
        l2[m] = SHUFFLE2(l1[2 * m], l1[2 * m + 1], LO4) + SHUFFLE2(l1[2 * m], l1[2 * m + 1], HI4);
    /* level 3: 2-lane groups */
#define LO2 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29
#define HI2 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31
    for (int m = 0; m < 2; m++)
        l3[m] = SHUFFLE2(l2[2 * m], l2[2 * m + 1], LO2) + SHUFFLE2(l2[2 * m], l2[2 * m + 1], HI2);
    /* level 4: single lanes */
#define LO1 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30
#define HI1 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31
    const v16 s = SHUFFLE2(l3[0], l3[1], LO1) + SHUFFLE2(l3[0], l3[1], HI1);
    /* lane order after the four levels: bit-reversed pairs (x0, x8, x4, x12, ...) -> undo */
    static const int order[16] = {0, 8, 4, 12, 2, 10, 6, 14, 1, 9, 5, 13, 3, 11, 7, 15};
    for (int m = 0; m < 16; m++) out[order[m]] = s[m];
#undef LO8
#undef HI8
#undef LO4
#undef HI4
#undef LO2
#undef HI2
#undef LO1
#undef HI1
}

#endif
