/* rwkvforge: row softmax of bf16 logits, in place, for the training head's cross-entropy.
 *
 * Built on first use by rwkvforge/native.py and called by train.py (_ChunkedHeadCE) on CPU
 * with bf16 autocast; torch ops on an fp32 copy are the fallback and the test oracle. For
 * each row of x (n, V) bf16 it computes, in fp32,
 *
 *     lse = max + log(sum_j exp(x_j - max))        p_j = exp(x_j - max) / sum
 *
 * writes p back over x in bf16 (round to nearest even: what the gradient matmul reads) and
 * max and sum to mx[row], sm[row] (the caller forms lse; no libm needed here). That is two
 * passes over a row that stays in L2 (the exps are kept in a per-thread fp32 row buffer)
 * where the torch path makes six passes over the whole (n, V) matrix (bf16 -> fp32 copy,
 * max, exp, sum, divide, fp32 -> bf16 copy).
 *
 * exp is a vector polynomial (x = k ln2 + f, |f| <= ln2 / 2, degree 6, Cody-Waite split of
 * ln2; inputs are <= 0 here, and below -87 give 0). tests/test_train.py holds lse to 2e-6
 * and P to one bf16 step of torch's fp32 softmax. Built with -fopenmp the rows are split over
 * an OpenMP team (torch's own when torch is loaded, see wkv_cpu.c).
 */
#include "simd.h"

ALWAYS_INLINE void narrow(uint16_t *p, v16 f) { /* 16 fp32 -> bf16, round to nearest even */
    v16u u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fffu + ((u >> 16) & 1u);
    *(v16hu *)p = __builtin_convertvector(u >> 16, v16h);
}

ALWAYS_INLINE v16 vsel(v16i mask, v16 a, v16 b) { /* mask ? a : b, lane by lane */
    v16i ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    const v16i r = (mask & ai) | (~mask & bi);
    v16 out;
    memcpy(&out, &r, sizeof out);
    return out;
}

ALWAYS_INLINE v16 vmax(v16 a, v16 b) { return vsel(a > b, a, b); }

ALWAYS_INLINE v16 vexp(v16 x) { /* exp(x) for x <= 0; 0 below -87 */
    const v16i keep = x >= -87.f;
    x = vsel(keep, x, (v16){0} - 87.f);
    /* k = round(x / ln2) (x <= 0: truncating x / ln2 - 1/2 rounds), f = x - k ln2 */
    const v16i k = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, v16i);
    const v16 kf = __builtin_convertvector(k, v16);
    const v16 f = x - kf * 0.693145751953125f - kf * 1.428606765330187045e-06f;
    v16 p = (v16){0} + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    const v16i e = (k + 127) << 23; /* 2^k; k >= -126 after the clamp */
    v16 s;
    memcpy(&s, &e, sizeof s);
    return vsel(keep, p * s, (v16){0});
}

ALWAYS_INLINE float hmax(v16 x) {
    float m = x[0];
    for (int q = 1; q < 16; q++) m = x[q] > m ? x[q] : m;
    return m;
}

ALWAYS_INLINE float hsum(v16 x) {
    float s = 0.f;
    for (int q = 0; q < 16; q++) s += x[q];
    return s;
}

/* rows r0 .. r1 - 1 of x (n, V) bf16, V a multiple of 16. Returns 0 or -1 (out of memory).
 * Inlined into the clones below: clang rejects passing 64-byte vectors by value in a
 * function that has AVX2 but not AVX-512 (the avx2 clone), even to always-inline helpers,
 * and this body, having no target of its own, is not checked that way. */
ALWAYS_INLINE int32_t rows_body(int64_t V, uint16_t *x, float *mx, float *sm, int64_t r0,
                                int64_t r1) {
    float *e = malloc((size_t)V * sizeof(float));
    if (!e) return -1;
    for (int64_t r = r0; r < r1; r++) {
        uint16_t *row = x + r * V;
        v16 m0 = (v16){0} - __builtin_inff(), m1 = m0;
        for (int64_t j = 0; j < V; j += 32) {
            const v16 a = widen(row + j), b = widen(row + j + 16);
            m0 = vmax(a, m0);
            m1 = vmax(b, m1);
        }
        const float m = hmax(vmax(m0, m1));
        v16 s0 = {0}, s1 = {0};
        for (int64_t j = 0; j < V; j += 32) {
            const v16 a = vexp(widen(row + j) - m), b = vexp(widen(row + j + 16) - m);
            *(v16fu *)(e + j) = a;
            *(v16fu *)(e + j + 16) = b;
            s0 += a;
            s1 += b;
        }
        const float sum = hsum(s0 + s1), inv = 1.f / sum;
        for (int64_t j = 0; j < V; j += 16) narrow(row + j, *(const v16fu *)(e + j) * inv);
        mx[r] = m, sm[r] = sum;
    }
    free(e);
    return 0;
}

CLONES static int32_t rows(int64_t V, uint16_t *x, float *mx, float *sm, int64_t r0,
                           int64_t r1) {
    return rows_body(V, x, mx, sm, r0, r1);
}

/* All n rows, split over `nthreads` (OpenMP when built with it, else one after the other).
 * Returns 0, -1 (out of memory) or -2 (V not a multiple of 32). */
int32_t rf_softmax_bf16(int64_t n, int64_t V, uint16_t *x, float *mx, float *sm,
                        int64_t nthreads) {
    if (V % 32) return -2;
    int32_t rc = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(min : rc)
#endif
    for (int64_t i = 0; i < nthreads; i++) {
        const int32_t e = rows(V, x, mx, sm, n * i / nthreads, n * (i + 1) / nthreads);
        rc = e < rc ? e : rc;
    }
    return rc;
}
