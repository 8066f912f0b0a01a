/* rwkvforge: the RWKV-7 recurrence (WKV-7) forward and backward on CPU, in fp32.
 *
 * Built on first use by rwkvforge/native.py and called by model/wkv.py (`wkv_impl=native`);
 * the torch kernels there are the fallback and the test oracle. Same maths and state
 * convention as the `rwkv` pip package: per head S is N x N, row i = value i, column j = key j,
 *
 *     S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T        y_t = S_t r_t
 *
 * Inside, a head's state is kept key-major (ST[j][i] = S[i][j]) and a step is made of
 * "column" updates over the value index i with 16-wide vectors (GCC vector extensions;
 * x86-64 builds carry AVX-512 / AVX2 / baseline clones): S a, the update and S r need no
 * horizontal sums. N is 64 (every RWKV-7 head); other sizes return -2 and the caller uses
 * the torch kernel. The forward keeps the state before every K-th step; the backward
 * recomputes the K states of a segment from that checkpoint (a (K + 1) N^2 buffer,
 * L2-sized) and walks it in reverse:
 *
 *     dS += dy_t r_t^T          dr_t = S_t^T dy_t
 *     dv_t = dS k_t    dk_t = dS^T v_t    dsa = dS b_t    db_t = dS^T (S_{t-1} a_t)
 *     dw_t[j] = sum_i dS[i,j] S_{t-1}[i,j]    da_t = S_{t-1}^T dsa
 *     dS <- dS diag(w_t) + dsa a_t^T      (the gradient of S_{t-1})
 *
 * Tensors are (B, T, H, N) fp32 contiguous: step t of head h of batch row b starts at
 * ((b T + t) H + h) N. A call handles the (b, h) pairs bh0 .. bh1 - 1, so the caller can
 * split the heads across threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
#define N 64
#define NN (N * N)
#define NV (N / 16) /* vectors per row */

typedef float v16 __attribute__((vector_size(64)));
typedef float v16u __attribute__((vector_size(64), aligned(4))); /* unaligned access */
#define LD(p) (*(const v16u *)(p))
#define STO(p, x) (*(v16u *)(p) = (x))

ALWAYS_INLINE float hsum(v16 x) {
#if defined(__GNUC__) && !defined(__clang__)
    typedef int v16i __attribute__((vector_size(64)));
    x += __builtin_shuffle(x, (v16i){8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
    x += __builtin_shuffle(x, (v16i){4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
    x += __builtin_shuffle(x, (v16i){2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
    x += __builtin_shuffle(x, (v16i){1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
    return x[0];
#else
    float s = 0.f;
    for (int q = 0; q < 16; q++) s += x[q];
    return s;
#endif
}

/* one step on a key-major state ST: S <- S diag(w) + (S a) b^T + v k^T; y = S r (or NULL) */
ALWAYS_INLINE void step(float *restrict ST, const float *restrict r, const float *restrict w,
                        const float *restrict k, const float *restrict v,
                        const float *restrict a, const float *restrict b, float *restrict y) {
    v16 sa[NV] = {0}, sb[NV] = {0}; /* two partial sums: half the dependency chain */
    for (int j = 0; j < N; j += 2)
        for (int q = 0; q < NV; q++) {
            sa[q] += a[j] * LD(ST + j * N + 16 * q);
            sb[q] += a[j + 1] * LD(ST + (j + 1) * N + 16 * q);
        }
    v16 V[NV], y0[NV] = {0}, y1[NV] = {0};
    for (int q = 0; q < NV; q++) {
        sa[q] += sb[q];
        V[q] = LD(v + 16 * q);
    }
    for (int j = 0; j < N; j += 2)
        for (int q = 0; q < NV; q++) {
            float *p0 = ST + j * N + 16 * q, *p1 = p0 + N;
            const v16 x0 = LD(p0) * w[j] + b[j] * sa[q] + k[j] * V[q];
            const v16 x1 = LD(p1) * w[j + 1] + b[j + 1] * sa[q] + k[j + 1] * V[q];
            STO(p0, x0);
            STO(p1, x1);
            y0[q] += r[j] * x0;
            y1[q] += r[j + 1] * x1;
        }
    if (y)
        for (int q = 0; q < NV; q++) STO(y + 16 * q, y0[q] + y1[q]);
}

ALWAYS_INLINE void transpose(float *restrict dst, const float *restrict src) {
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) dst[j * N + i] = src[i * N + j];
}

/* S (BH, N, N), value-major (row i = value i) as the API: initial state in, final out.
 * y (B, T, H, N). ckpt (BH, ceil(T/K), N, N) or NULL: the key-major state before steps 0, K,
 * 2K, ... (what backward needs). Returns 0, -1 (out of memory) or -2 (head size not 64). */
CLONES int32_t rf_wkv_forward(int64_t T, int64_t H, int64_t n, int64_t K, const float *r,
                              const float *w, const float *k, const float *v, const float *a,
                              const float *b, float *S, float *y, float *ckpt, int64_t bh0,
                              int64_t bh1) {
    if (n != N) return -2;
    const int64_t st = H * N, nck = (T + K - 1) / K;
    float *ST = malloc(NN * sizeof(float));
    if (!ST) return -1;
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t base = (bh / H) * T * st + (bh % H) * N;
        transpose(ST, S + bh * NN);
        for (int64_t t = 0; t < T; t++) {
            if (ckpt && t % K == 0) memcpy(ckpt + (bh * nck + t / K) * NN, ST, NN * sizeof(float));
            const int64_t o = base + t * st;
            step(ST, r + o, w + o, k + o, v + o, a + o, b + o, y + o);
        }
        transpose(S + bh * NN, ST);
    }
    free(ST);
    return 0;
}

/* dS (BH, N, N), value-major: gradient of the final state in, of the initial state out.
 * dr .. db are (B, T, H, N) and must be zero on entry (they are accumulated). Returns 0, -1
 * (out of memory) or -2 (head size not 64). */
CLONES int32_t rf_wkv_backward(int64_t T, int64_t H, int64_t n, int64_t K,
                               const float *restrict r, const float *restrict w,
                               const float *restrict k, const float *restrict v,
                               const float *restrict a, const float *restrict b,
                               const float *restrict ckpt, const float *restrict dy,
                               float *restrict dS, float *restrict dr, float *restrict dw,
                               float *restrict dk, float *restrict dv, float *restrict da,
                               float *restrict db, int64_t bh0, int64_t bh1) {
    if (n != N) return -2;
    const int64_t st = H * N, nck = (T + K - 1) / K;
    float *buf = malloc((size_t)((K + 1) * NN + NN) * sizeof(float));
    if (!buf) return -1;
    float *restrict GT = buf + (K + 1) * NN; /* key-major gradient of the state */
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t base = (bh / H) * T * st + (bh % H) * N;
        transpose(GT, dS + bh * NN);
        for (int64_t c = nck - 1; c >= 0; c--) {
            const int64_t t0 = c * K, t1 = t0 + K < T ? t0 + K : T;
            memcpy(buf, ckpt + (bh * nck + c) * NN, NN * sizeof(float));
            for (int64_t t = t0; t < t1; t++) { /* recompute the segment's states */
                float *Sn = buf + (t - t0 + 1) * NN;
                const int64_t o = base + t * st;
                memcpy(Sn, Sn - NN, NN * sizeof(float));
                step(Sn, r + o, w + o, k + o, v + o, a + o, b + o, NULL);
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {
                const float *restrict Sp = buf + (t - t0) * NN; /* S_{t-1}, key-major */
                const float *restrict Sc = Sp + NN;             /* S_t */
                const int64_t o = base + t * st;
                const float *restrict rt = r + o, *restrict wt = w + o, *restrict kt = k + o;
                const float *restrict at = a + o, *restrict bt = b + o;
                v16 DY[NV], V[NV], sa[NV] = {0}, dsa[NV] = {0}, dvv[NV] = {0};
                for (int q = 0; q < NV; q++) {
                    DY[q] = LD(dy + o + 16 * q);
                    V[q] = LD(v + o + 16 * q);
                }
                /* y_t = S_t r_t: dS += dy r^T, dr = S_t^T dy; then, for
                 * S_t = S_{t-1} diag(w) + sa b^T + v k^T with sa = S_{t-1} a: sa, dS b, dS k
                 * (one pass over the rows of dS) */
                for (int j = 0; j < N; j++) {
                    v16 p = {0};
                    for (int q = 0; q < NV; q++) {
                        float *gp = GT + j * N + 16 * q;
                        const v16 g = LD(gp) + rt[j] * DY[q];
                        STO(gp, g);
                        p += LD(Sc + j * N + 16 * q) * DY[q];
                        sa[q] += at[j] * LD(Sp + j * N + 16 * q);
                        dsa[q] += bt[j] * g;
                        dvv[q] += kt[j] * g;
                    }
                    dr[o + j] += hsum(p);
                }
                for (int q = 0; q < NV; q++) STO(dv + o + 16 * q, LD(dv + o + 16 * q) + dvv[q]);
                for (int j = 0; j < N; j++) {
                    v16 pk = {0}, pb = {0}, pw = {0}, pa = {0};
                    for (int q = 0; q < NV; q++) {
                        float *gp = GT + j * N + 16 * q;
                        const v16 g = LD(gp), s = LD(Sp + j * N + 16 * q);
                        pk += g * V[q];
                        pb += g * sa[q];
                        pw += g * s;
                        pa += s * dsa[q];
                        STO(gp, g * wt[j] + at[j] * dsa[q]);
                    }
                    dk[o + j] += hsum(pk);
                    db[o + j] += hsum(pb);
                    dw[o + j] += hsum(pw);
                    da[o + j] += hsum(pa);
                }
            }
        }
        transpose(dS + bh * NN, GT);
    }
    free(buf);
    return 0;
}
