/* rwkvforge: the RWKV-7 recurrence (WKV-7) forward and backward on CPU, in fp32.
 *
 * Built on first use by rwkvforge/native.py and called by model/wkv.py (`wkv_impl=native`);
 * the torch kernels there are the fallback and the test oracle. Same maths and state
 * convention as the `rwkv` pip package: per head S is N x N, row i = value i, column j = key j,
 *
 *     S_t = S_{t-1} diag(w_t) + (S_{t-1} a_t) b_t^T + v_t k_t^T        y_t = S_t r_t
 *
 * The forward keeps a head's state key-major (ST[j][i] = S[i][j]) and makes a step of
 * "column" updates over the value index i with 16-wide vectors (GCC vector extensions;
 * x86-64 builds carry AVX-512 / AVX2 / baseline clones): S a, the update and S r need no
 * horizontal sums. N is 64 (every RWKV-7 head); other sizes return -2 and the caller uses
 * the torch kernel. The forward keeps the state before every K-th step; the backward
 * recomputes the K states of a segment from that checkpoint (a (K + 1) N^2 buffer,
 * L2-sized) and walks it in reverse, one pass over the state per step (rf_wkv_backward):
 *
 *     dS += dy_t r_t^T          dr_t = S_t^T dy_t
 *     dv_t = dS k_t    dk_t = dS^T v_t    dsa = dS b_t    db_t = dS^T (S_{t-1} a_t)
 *     dw_t[j] = sum_i dS[i,j] S_{t-1}[i,j]    da_t = S_{t-1}^T dsa
 *     dS <- dS diag(w_t) + dsa a_t^T      (the gradient of S_{t-1})
 *
 * The backward works value-major (row i = value i): each row of S and dS evolves on its own
 * given the step's vectors, so the five per-key gradients are vector sums over the rows and
 * only dv and dsa are row dot products (reduced 16 rows at a time). In an interleaved A/B it
 * took ~25% less time than the key-major form, which had five dot products per key.
 *
 * Packed rows: `reset` (B, T) uint8, or NULL, marks the steps that start a document. The
 * forward zeroes the state before such a step; the backward recomputes it from a zero previous
 * state (so its dw, da, db are 0) and stops the state gradient there: the leftovers it hands
 * to step t - 1 are w = 0 and dsa = 0, so G_{t-1} = dy_{t-1} r_{t-1}^T and da_t = 0.
 * With `s0` (H, N, N) value-major, or NULL (zero), a document starts from s0[h] instead (state
 * tuning over packed rows): the forward copies it in; the backward recomputes step t from it,
 * completes da_t = s0^T dsa_t at once and adds the gradient that would have gone to S_{t-1},
 * G_t diag(w_t) + dsa_t a_t^T, to ds0[bh] (BH, N, N); the caller sums ds0 over the batch rows
 * (each (b, h) pair writes its own slice: no two threads write one place).
 *
 * Tensors are (B, T, H, N) fp32 contiguous: step t of head h of batch row b starts at
 * ((b T + t) H + h) N. A call handles the (b, h) pairs bh0 .. bh1 - 1, so the caller can
 * split the heads across threads. Built with -fopenmp (native.py tries it first), the
 * rf_wkv_*_par entry points split them over an OpenMP team themselves: loaded into a process
 * where torch already holds libgomp.so.1, that is torch's own runtime and thread team, so the
 * kernel runs on the threads torch's ops just used (they spin-wait for the next parallel
 * region; threads of our own would compete with them for the cores).
 */
#include "simd.h"

#define N 64
#define NN (N * N)
#define NV (N / 16) /* vectors per row */

#define LD(p) (*(const v16fu *)(p))
#define STO(p, x) (*(v16fu *)(p) = (x))

/* one step on a key-major state: S' = S diag(w) + (S a) b^T + v k^T read from ST and written
 * to DT (the same buffer, or the next one when backward recomputes a segment); y = S' r (or
 * NULL) */
ALWAYS_INLINE void step(const float *ST, float *DT, const float *restrict r,
                        const float *restrict w, const float *restrict k,
                        const float *restrict v, const float *restrict a,
                        const float *restrict b, float *restrict y) {
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
            const float *p0 = ST + j * N + 16 * q, *p1 = p0 + N;
            const v16 x0 = LD(p0) * w[j] + b[j] * sa[q] + k[j] * V[q];
            const v16 x1 = LD(p1) * w[j + 1] + b[j + 1] * sa[q] + k[j + 1] * V[q];
            STO(DT + j * N + 16 * q, x0);
            STO(DT + (j + 1) * N + 16 * q, x1);
            if (y) { /* r may be NULL without y (a constant at each inlined call) */
                y0[q] += r[j] * x0;
                y1[q] += r[j + 1] * x1;
            }
        }
    if (y)
        for (int q = 0; q < NV; q++) STO(y + 16 * q, y0[q] + y1[q]);
}

/* the N inputs of one (t, head) at element offset o: fp32 in place, or bf16 widened into tmp
 * (bf16 is the upper half of an fp32) */
ALWAYS_INLINE const float *in_vec(const void *p, int64_t o, int64_t bf16,
                                  float *restrict tmp) {
    if (!bf16) return (const float *)p + o;
    const uint16_t *src = (const uint16_t *)p + o;
    for (int q = 0; q < NV; q++) /* whole-vector stores: later vector loads forward */
        STO(tmp + 16 * q, widen(src + 16 * q));
    return tmp;
}

ALWAYS_INLINE void transpose(float *restrict dst, const float *restrict src) {
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) dst[j * N + i] = src[i * N + j];
}

/* r, k, v, a, b: fp32, or bf16 when `bf16` is 1 (w is always fp32). reset (B, T) or NULL.
 * S (BH, N, N), value-major (row i = value i) as the API: initial state in, final out.
 * y (B, T, H, N). ckpt (BH, ceil(T/K), N, N) or NULL: the key-major state before steps 0, K,
 * 2K, ... (what backward needs). Returns 0, -1 (out of memory) or -2 (head size not 64). */
CLONES static int32_t forward_heads(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16,
                                    const void *r, const float *w, const void *k,
                                    const void *v, const void *a, const void *b, float *S,
                                    float *y, float *ckpt, const uint8_t *reset,
                                    const float *s0, int64_t bh0, int64_t bh1) {
    if (n != N) return -2;
    const int64_t st = H * N, nck = (T + K - 1) / K;
    float *ST = malloc(2 * NN * sizeof(float));
    if (!ST) return -1;
    float *S0T = ST + NN; /* s0[h] key-major: what a document starts from */
    float tmp[5][N] __attribute__((aligned(64)));
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t base = (bh / H) * T * st + (bh % H) * N;
        const uint8_t *rs = reset ? reset + (bh / H) * T : NULL; /* this row's flags */
        if (rs && s0) transpose(S0T, s0 + (bh % H) * NN);
        transpose(ST, S + bh * NN);
        for (int64_t t = 0; t < T; t++) {
            if (ckpt && t % K == 0) memcpy(ckpt + (bh * nck + t / K) * NN, ST, NN * sizeof(float));
            if (rs && rs[t]) { /* a document starts at t */
                if (s0)
                    memcpy(ST, S0T, NN * sizeof(float));
                else
                    memset(ST, 0, NN * sizeof(float));
            }
            const int64_t o = base + t * st;
            step(ST, ST, in_vec(r, o, bf16, tmp[0]), w + o, in_vec(k, o, bf16, tmp[1]),
                 in_vec(v, o, bf16, tmp[2]), in_vec(a, o, bf16, tmp[3]),
                 in_vec(b, o, bf16, tmp[4]), y + o);
        }
        transpose(S + bh * NN, ST);
    }
    free(ST);
    return 0;
}

/* Inputs as for rf_wkv_forward (fp32, or bf16 r, k, v, a, b); gradients fp32.
 * dS (BH, N, N), value-major: gradient of the final state in, of the initial state out.
 * dr .. db are (B, T, H, N); every element of the pairs bh0 .. bh1 - 1 is written once (no
 * need to zero them). Returns 0, -1 (out of memory) or -2 (head size not 64).
 *
 * Value-major inside (row i = value i, 4 vectors over the key index j), so the five
 * per-key gradients (dr, dk, db, dw, da) are vector accumulators with no horizontal sums;
 * only dsa and dv (per value) are row dot products, reduced 16 rows at a time (hsum16).
 * One pass over the state rows per step: with G_t the gradient of S_t, step t reads
 * G_{t+1}, S_t, S_{t-1} and forms G_t = G_{t+1} diag(w_{t+1}) + dsa_{t+1} a_{t+1}^T +
 * dy_t r_t^T on the fly (the update left over from step t + 1), together with
 * da_{t+1} = S_t^T dsa_{t+1} and the step's own dr, dk, db, dw, dsa, dv. The segment's
 * states are recomputed value-major from the (key-major) checkpoint, keeping each S a. */
CLONES static int32_t backward_heads(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16,
                                     const void *r, const float *restrict w, const void *k,
                                     const void *v, const void *a, const void *b,
                                     const float *restrict ckpt, const float *restrict dy,
                                     float *restrict dS, float *restrict dr,
                                     float *restrict dw, float *restrict dk,
                                     float *restrict dv, float *restrict da,
                                     float *restrict db, const uint8_t *reset,
                                     const float *s0, float *ds0, int64_t bh0, int64_t bh1) {
    if (n != N) return -2;
    const int64_t st = H * N, nck = (T + K - 1) / K;
    float *buf = aligned_alloc(64, (size_t)((K + 2) * NN + K * N) * sizeof(float));
    if (!buf) return -1;
    float *restrict sab = buf + (K + 1) * NN; /* S_{t-1} a_t of the segment's steps */
    float *zero = sab + K * N; /* the previous state of a step that starts a document */
    memset(zero, 0, NN * sizeof(float));
    float tmp[5][N] __attribute__((aligned(64))), an[N] __attribute__((aligned(64)));
    float wn[N] __attribute__((aligned(64))), dsan[N] __attribute__((aligned(64)));
    v16 rowa[16], rowb[16];
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t base = (bh / H) * T * st + (bh % H) * N;
        const uint8_t *rs = reset ? reset + (bh / H) * T : NULL; /* this row's flags */
        float *restrict G = dS + bh * NN; /* value-major, updated in place */
        const float *start = s0 ? s0 + (bh % H) * NN : zero; /* a document's first state */
        float *restrict G0 = ds0 ? ds0 + bh * NN : NULL;
        if (G0) memset(G0, 0, NN * sizeof(float));
        /* what step t + 1 left over: none yet for the last step */
        for (int j = 0; j < N; j++) wn[j] = 1.f, an[j] = 0.f, dsan[j] = 0.f;
        int64_t on = -1; /* offset of step t + 1, whose da is completed by step t */
        for (int64_t c = nck - 1; c >= 0; c--) {
            const int64_t t0 = c * K, t1 = t0 + K < T ? t0 + K : T;
            transpose(buf, ckpt + (bh * nck + c) * NN);
            for (int64_t t = t0; t < t1; t++) { /* recompute the segment's states */
                const float *restrict Sp = rs && rs[t] ? start : buf + (t - t0) * NN;
                float *restrict Sn = buf + (t - t0 + 1) * NN;
                const int64_t o = base + t * st;
                const float *restrict kt = in_vec(k, o, bf16, tmp[1]);
                const float *restrict vt = in_vec(v, o, bf16, tmp[2]);
                const float *restrict at = in_vec(a, o, bf16, tmp[3]);
                const float *restrict bt = in_vec(b, o, bf16, tmp[4]);
                const float *restrict wt = w + o;
                float *restrict sa = sab + (t - t0) * N;
                for (int ib = 0; ib < N; ib += 16) {
                    for (int ii = 0; ii < 16; ii++) {
                        const float *row = Sp + (ib + ii) * N;
                        v16 x = LD(row) * LD(at);
                        for (int q = 1; q < NV; q++) x += LD(row + 16 * q) * LD(at + 16 * q);
                        rowa[ii] = x;
                    }
                    hsum16(rowa, sa + ib);
                    for (int ii = 0; ii < 16; ii++) {
                        const int i = ib + ii;
                        for (int q = 0; q < NV; q++)
                            STO(Sn + i * N + 16 * q, LD(Sp + i * N + 16 * q) * LD(wt + 16 * q) +
                                                         sa[i] * LD(bt + 16 * q) +
                                                         vt[i] * LD(kt + 16 * q));
                    }
                }
            }
            for (int64_t t = t1 - 1; t >= t0; t--) {
                const int rst = rs && rs[t];
                const float *restrict Sc = buf + (t - t0 + 1) * NN;   /* S_t */
                const float *restrict Sp = rst ? start : Sc - NN; /* S_{t-1} as step t read it */
                const int64_t o = base + t * st;
                const float *restrict rt = in_vec(r, o, bf16, tmp[0]);
                const float *restrict kt = in_vec(k, o, bf16, tmp[1]);
                const float *restrict vt = in_vec(v, o, bf16, tmp[2]);
                const float *restrict bt = in_vec(b, o, bf16, tmp[4]);
                const float *restrict sa = sab + (t - t0) * N;
                const float *restrict dyt = dy + o;
                v16 DA[NV] = {0}, DR[NV] = {0}, DK[NV] = {0}, DB[NV] = {0}, DW[NV] = {0};
                float dsa[N] __attribute__((aligned(64)));
                for (int ib = 0; ib < N; ib += 16) {
                    for (int ii = 0; ii < 16; ii++) {
                        const int i = ib + ii;
                        const float ds = dsan[i], y_ = dyt[i], vi = vt[i], si = sa[i];
                        v16 pa = {0}, pb = {0};
                        for (int q = 0; q < NV; q++) {
                            float *gp = G + i * N + 16 * q;
                            const v16 sc = LD(Sc + i * N + 16 * q);
                            const v16 g = LD(gp) * LD(wn + 16 * q) + ds * LD(an + 16 * q) +
                                          y_ * LD(rt + 16 * q);
                            STO(gp, g);
                            DA[q] += sc * ds;
                            DR[q] += sc * y_;
                            DK[q] += g * vi;
                            DB[q] += g * si;
                            DW[q] += g * LD(Sp + i * N + 16 * q);
                            pa += g * LD(bt + 16 * q);
                            pb += g * LD(kt + 16 * q);
                        }
                        rowa[ii] = pa, rowb[ii] = pb;
                    }
                    hsum16(rowa, dsa + ib);
                    hsum16(rowb, dv + o + ib);
                }
                for (int q = 0; q < NV; q++) {
                    if (on >= 0) STO(da + on + 16 * q, DA[q]);
                    STO(dr + o + 16 * q, DR[q]);
                    STO(dk + o + 16 * q, DK[q]);
                    STO(db + o + 16 * q, DB[q]);
                    STO(dw + o + 16 * q, DW[q]);
                }
                /* leftovers for step t - 1 (tmp is overwritten by then) */
                const float *at = in_vec(a, o, bf16, tmp[3]);
                for (int q = 0; q < NV; q++) {
                    STO(an + 16 * q, LD(at + 16 * q));
                    STO(wn + 16 * q, LD(w + o + 16 * q));
                    STO(dsan + 16 * q, LD(dsa + 16 * q));
                }
                on = o;
                if (rst && s0) { /* S_{t-1} was s0: da_t = s0^T dsa_t and its gradient, now */
                    v16 D[NV] = {0};
                    for (int i = 0; i < N; i++)
                        for (int q = 0; q < NV; q++) {
                            D[q] += LD(start + i * N + 16 * q) * dsan[i];
                            if (!G0) continue;
                            float *gp = G0 + i * N + 16 * q;
                            STO(gp, LD(gp) + LD(G + i * N + 16 * q) * LD(wn + 16 * q) +
                                        dsan[i] * LD(an + 16 * q));
                        }
                    for (int q = 0; q < NV; q++) STO(da + o + 16 * q, D[q]);
                    on = -1; /* step t - 1 does not write da_t */
                }
                if (rst) /* no gradient reaches S_{t-1} (nor a_t when its state was zero) */
                    for (int j = 0; j < N; j++) wn[j] = 0.f, dsan[j] = 0.f;
            }
        }
        /* step 0's leftovers: da_0 = S_{-1}^T dsa_0 and the gradient of the initial state */
        v16 DA[NV] = {0};
        for (int i = 0; i < N; i++)
            for (int q = 0; q < NV; q++) {
                float *gp = G + i * N + 16 * q;
                DA[q] += LD(buf + i * N + 16 * q) * dsan[i];
                STO(gp, LD(gp) * LD(wn + 16 * q) + dsan[i] * LD(an + 16 * q));
            }
        if (on >= 0) /* (-1: step 0 started a document from s0 and wrote its da) */
            for (int q = 0; q < NV; q++) STO(da + on + 16 * q, DA[q]);
    }
    free(buf);
    return 0;
}

/* The exported entry points. The clones are static functions behind them: clang 14 names a
 * target_clones function's dispatcher "<name>.ifunc" and exports no plain <name>. */
int32_t rf_wkv_forward(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16, const void *r,
                       const float *w, const void *k, const void *v, const void *a,
                       const void *b, float *S, float *y, float *ckpt, const uint8_t *reset,
                       const float *s0, int64_t bh0, int64_t bh1) {
    return forward_heads(T, H, n, K, bf16, r, w, k, v, a, b, S, y, ckpt, reset, s0, bh0, bh1);
}

int32_t rf_wkv_backward(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16,
                        const void *r, const float *w, const void *k, const void *v,
                        const void *a, const void *b, const float *ckpt, const float *dy,
                        float *dS, float *dr, float *dw, float *dk, float *dv, float *da,
                        float *db, const uint8_t *reset, const float *s0, float *ds0,
                        int64_t bh0, int64_t bh1) {
    return backward_heads(T, H, n, K, bf16, r, w, k, v, a, b, ckpt, dy, dS, dr, dw, dk, dv, da,
                          db, reset, s0, ds0, bh0, bh1);
}

/* 1 when built with OpenMP: the _par entry points below run in parallel (else serially) */
int32_t rf_wkv_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* the (b, h) pairs 0 .. BH - 1 split into `nthreads` contiguous ranges, one per thread */
int32_t rf_wkv_forward_par(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16,
                           const void *r, const float *w, const void *k, const void *v,
                           const void *a, const void *b, float *S, float *y, float *ckpt,
                           const uint8_t *reset, const float *s0, int64_t BH,
                           int64_t nthreads) {
    int32_t rc = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(min : rc)
#endif
    for (int64_t i = 0; i < nthreads; i++) {
        const int32_t e = forward_heads(T, H, n, K, bf16, r, w, k, v, a, b, S, y, ckpt, reset,
                                        s0, BH * i / nthreads, BH * (i + 1) / nthreads);
        rc = e < rc ? e : rc;
    }
    return rc;
}

int32_t rf_wkv_backward_par(int64_t T, int64_t H, int64_t n, int64_t K, int64_t bf16,
                            const void *r, const float *w, const void *k, const void *v,
                            const void *a, const void *b, const float *ckpt, const float *dy,
                            float *dS, float *dr, float *dw, float *dk, float *dv, float *da,
                            float *db, const uint8_t *reset, const float *s0, float *ds0,
                            int64_t BH, int64_t nthreads) {
    int32_t rc = 0;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(min : rc)
#endif
    for (int64_t i = 0; i < nthreads; i++) {
        const int32_t e = backward_heads(T, H, n, K, bf16, r, w, k, v, a, b, ckpt, dy, dS,
                                         dr, dw, dk, dv, da, db, reset, s0, ds0,
                                         BH * i / nthreads, BH * (i + 1) / nthreads);
        rc = e < rc ? e : rc;
    }
    return rc;
}
