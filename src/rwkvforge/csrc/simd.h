/* rwkvforge: what the SIMD kernels (wkv_cpu.c, softmax_cpu.c) share: the clone attribute
 * that builds AVX-512 / AVX2 / baseline versions picked at load time (GCC, clang >= 14 on
 * x86-64), the 16-lane vector types (GCC / clang vector extensions), a two-vector shuffle
 * both compilers take, and the bf16 -> fp32 widening. native.py hashes
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

#endif
