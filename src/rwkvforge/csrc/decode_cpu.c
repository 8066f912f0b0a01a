/* rwkvforge: the decode step's weight-bound products on CPU, for a few rows (streams) at once.
 *
 * Built on first use by rwkvforge/native.py and called by model/rwkv7.py (RWKV7.step and
 * RWKV7._lin) under no_grad; the torch ops they replace are the fallback and the test oracle
 * (tests/test_infer_decode.py). Decoding one token reads every weight once, so its speed is
 * the memory bandwidth divided by the bytes read; these kernels read fewer bytes, and read
 * them in one streaming pass:
 *
 *   rf_gemv_bf16    y (B,N) = x (B,K) @ W^T, W (N,K) bf16, x and y fp32, fp32 accumulation.
 *                   torch's bf16 matmul with one row runs at ~half the bandwidth of its fp32
 *                   one here, which threw away the halved bytes; this is a plain streaming
 *                   dot product per output row (bf16 widened to fp32 is exact).
 *   rf_ffn_sparse   y (B,C) = relu(k)^2 (B,F) @ WT (F,C), WT the channel-mix value weight
 *                   transposed (row j = input channel j), fp32 or bf16. After ReLU^2 many
 *                   activations are exactly 0 (about half in a random model, most in a
 *                   trained one): only the rows of channels that are non-zero in some stream
 *                   are read. Exact: a zero contributes nothing; only the fp32 summation
 *                   order differs from a dense matmul.
 *   rf_wkv_step     the time-mix's per-element work of one step for all heads in one call:
 *                   decay, kk, k', the WKV state update and read-out, ln_x, the bonus (about
 *                   25 small torch ops per layer otherwise, each a few microseconds of
 *                   dispatch for a few KB of data).
 *   rf_gemm_bf16p   y (B,N) = x (B,K) @ W^T over W packed in bf16 for decode (each weight line
 *                   read once for all rows), with the element-wise work around a product
 *                   (x*g, ReLU^2, bias, tanh / sigmoid, residual) in the same call.
 *   rf_ln_mix       LayerNorm and the token-shift mixes of a decode step.
 *   rf_decode_layer a whole bf16-mode decode layer in one call: one OpenMP team for its
 *                   products, element-wise work, WKV step and channel mix (its section below).
 *   rf_topp_cutoff  the sampler's nucleus (top-p) cutoff of each row of probabilities without
 *                   sorting them (called by sampling.py; see its section below).
 *
 * The products split the output columns, rf_wkv_step the (stream, head) pairs, rf_topp_cutoff
 * the rows, over an OpenMP team (torch's own when torch is loaded, see wkv_cpu.c): each thread
 * streams its own slice of the weight. K, C must be multiples of 16 (the caller checks; every
 * RWKV-7 width is a multiple of 64).
 */
#include <math.h>

#include "simd.h"

#define MAXB 16 /* rows per call: the caller splits larger batches (they are GEMMs, not here) */

ALWAYS_INLINE float hsum(v16 v) {
    float s = 0.f;
    for (int i = 0; i < 16; i++) s += v[i];
    return s;
}

ALWAYS_INLINE v16 bcast(float f) { return (v16){0} + f; }

/* exp of 16 lanes: 2^n * e^r with n = round(x / ln 2), |r| <= ln 2 / 2, e^r by a degree-6
 * polynomial (Cephes' expf coefficients): within 2 ulp of expf over the clamped range, where
 * glibc's scalar expf, one call per lane, cost the step more than the state update itself */
ALWAYS_INLINE v16 vclamp(v16 x, float lo, float hi) { /* (C has no vector ?:) */
    v16u u, l, h;
    const v16 lv = bcast(lo), hv = bcast(hi);
    memcpy(&u, &x, sizeof u);
    memcpy(&l, &lv, sizeof l);
    memcpy(&h, &hv, sizeof h);
    const v16u below = (v16u)(x < lv), above = (v16u)(x > hv);
    u = (u & ~below & ~above) | (l & below) | (h & above);
    memcpy(&x, &u, sizeof x);
    return x;
}

ALWAYS_INLINE v16 vexp(v16 x) {
    x = vclamp(x, -87.3f, 88.3f);
    const v16 t = x * 1.44269504f + 0.5f;
    v16i n = __builtin_convertvector(t, v16i); /* toward zero */
    n += (v16i)(t < __builtin_convertvector(n, v16)); /* -> floor (true is -1) */
    const v16 nf = __builtin_convertvector(n, v16);
    const v16 r = x - nf * 0.693359375f + nf * 2.12194440e-4f;
    v16 p = bcast(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const v16 e = p * r * r + r + 1.f;
    const v16i scale = (n + 127) << 23;
    v16 s;
    memcpy(&s, &scale, sizeof s);
    return e * s;
}

/* tanh and the logistic sigmoid from vexp: within ~1e-7 absolute of torch's */
ALWAYS_INLINE v16 vsigmoid(v16 x) { return 1.f / (1.f + vexp(-x)); }
ALWAYS_INLINE v16 vtanh(v16 x) { return 1.f - 2.f / (1.f + vexp(2.f * x)); }

/* rows n0..n1 of W (N,K) bf16 against B rows of x */
CLONES static void gemv_bf16_rows(int64_t B, int64_t K, const uint16_t *W, const float *x,
                                  float *y, int64_t N, int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; n++) {
        const uint16_t *w = W + n * K;
        if (B == 1) { /* two accumulators: independent FMA chains */
            v16 a0 = {0}, a1 = {0};
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                a0 += widen(w + k) * *(const v16fu *)(x + k);
                a1 += widen(w + k + 16) * *(const v16fu *)(x + k + 16);
            }
            for (; k < K; k += 16) a0 += widen(w + k) * *(const v16fu *)(x + k);
            y[n] = hsum(a0 + a1);
            continue;
        }
        v16 acc[MAXB];
        for (int64_t b = 0; b < B; b++) acc[b] = (v16){0};
        for (int64_t k = 0; k < K; k += 16) {
            const v16 wv = widen(w + k);
            for (int64_t b = 0; b < B; b++) acc[b] += wv * *(const v16fu *)(x + b * K + k);
        }
        for (int64_t b = 0; b < B; b++) y[b * N + n] = hsum(acc[b]);
    }
}

int32_t rf_gemv_bf16(int64_t B, int64_t N, int64_t K, const uint16_t *W, const float *x,
                     float *y, int64_t nthreads) {
    if (B < 1 || B > MAXB || K % 16) return -1;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int64_t i = 0; i < nthreads; i++)
        gemv_bf16_rows(B, K, W, x, y, N, N * i / nthreads, N * (i + 1) / nthreads);
    return 0;
}

/* ---- bf16 GEMV / small GEMM over the packed layout ----------------------------------------- */

/* W (N,K) packed as P (N/16, K/2, 16, 2) bf16: block nb holds output rows nb*16..nb*16+15,
 * and its 64-byte line kp holds W[n, 2kp] and W[n, 2kp+1] for those 16 rows side by side.
 * One line read as 16 uint32 lanes gives two fp32 vectors exactly (the even k: the low half
 * shifted up; the odd k: the high half masked), which multiply two broadcast activations of
 * every row: no horizontal sums, each weight byte read once in one sequential stream per
 * thread for all B rows, the activations stay fp32 (as rf_gemv_bf16; torch's bf16 GEMM
 * rounds them to bf16). */
typedef v16u v16uu __attribute__((aligned(4))); /* unaligned access */
/* With 8+ rows each line costs 8-16 multiply-adds, and the hardware prefetcher alone leaves
 * the product waiting on memory (0.1B shape, 16 rows, weights not cached: 8.4 GB/s, well
 * under both the bandwidth and the multiply-add rate); a software prefetch this far ahead of
 * the line being read keeps it busy (the head 148 -> 185-198 GFLOP/s, one thread; 512 / 1024 /
 * 4096 / 8192 measured slower). With 1-7 rows it slows the stream down: not used there. */
#define GEMM_PF_BYTES 2048

ALWAYS_INLINE v16 bits_f(v16u u) {
    v16 f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* n-blocks nb0..nb1 for a compile-time row count B (the accumulators stay in registers) */
ALWAYS_INLINE void gemm_p_blocks(const int B, int64_t N, int64_t K, const uint32_t *P,
                                 const float *x, float *y, int64_t nb0, int64_t nb1) {
    const int64_t K2 = K / 2;
    for (int64_t nb = nb0; nb < nb1; nb++) {
        const uint32_t *p = P + nb * K2 * 16;
        v16 acc[16], acc2[16];
        for (int b = 0; b < B; b++) acc[b] = acc2[b] = (v16){0};
        for (int64_t kp = 0; kp < K2; kp++) {
            if (B >= 8) __builtin_prefetch((const char *)(p + kp * 16) + GEMM_PF_BYTES);
            const v16u w = *(const v16uu *)(p + kp * 16);
            const v16 we = bits_f(w << 16), wo = bits_f(w & 0xffff0000u);
            for (int b = 0; b < B; b++) {
                const float *xb = x + b * K + 2 * kp;
                if (B <= 4) { /* few rows: two independent FMA chains each */
                    acc[b] += we * bcast(xb[0]);
                    acc2[b] += wo * bcast(xb[1]);
                } else {
                    acc[b] += we * bcast(xb[0]) + wo * bcast(xb[1]);
                }
            }
        }
        for (int b = 0; b < B; b++)
            *(v16fu *)(y + b * N + nb * 16) = B <= 4 ? acc[b] + acc2[b] : acc[b];
    }
}

#define GEMM_P_CASE(n) case n: gemm_p_blocks(n, N, K, P, x, y, nb0, nb1); break;
CLONES static void gemm_p(int64_t B, int64_t N, int64_t K, const uint32_t *P, const float *x,
                          float *y, int64_t nb0, int64_t nb1) {
    switch (B) {
        GEMM_P_CASE(1) GEMM_P_CASE(2) GEMM_P_CASE(3) GEMM_P_CASE(4) GEMM_P_CASE(5)
        GEMM_P_CASE(6) GEMM_P_CASE(7) GEMM_P_CASE(8) GEMM_P_CASE(9) GEMM_P_CASE(10)
        GEMM_P_CASE(11) GEMM_P_CASE(12) GEMM_P_CASE(13) GEMM_P_CASE(14) GEMM_P_CASE(15)
        GEMM_P_CASE(16)
    }
}

/* The same product with the activations rounded to bf16 (as torch's bf16 GEMM does), on CPUs
 * with AVX512-BF16: one vdpbf16ps multiplies a packed line by a row's broadcast (k, k+1)
 * activation pair and adds both products, 32 multiply-adds an instruction where the fp32 form
 * above does 16 and spends two more on widening. With 8 and more rows the fp32 form is bound
 * by its multiply-adds, this one by the bytes read. xp: the rows' bf16 activations as (k, k+1)
 * pairs, pair-major (K/2, B) (pairs_bf16 builds it): one line per kp, fixed offsets. */
#if defined(__x86_64__) && ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 10) || \
                             (defined(__clang__) && __clang_major__ >= 14))
#include <immintrin.h>
#define RF_HAVE_DPBF16 1
#define DPBF16_TARGET __attribute__((target("avx512f,avx512bf16")))

DPBF16_TARGET ALWAYS_INLINE void gemm_dp_blocks(const int B, int64_t N, int64_t K,
                                                const uint32_t *P, const uint32_t *xp, float *y,
                                                int64_t nb0, int64_t nb1) {
    const int64_t K2 = K / 2;
    for (int64_t nb = nb0; nb < nb1; nb++) {
        const uint32_t *p = P + nb * K2 * 16;
        __m512 acc[16];
        for (int b = 0; b < B; b++) acc[b] = _mm512_setzero_ps();
        for (int64_t kp = 0; kp < K2; kp++) {
            _mm_prefetch((const char *)(p + kp * 16) + GEMM_PF_BYTES, _MM_HINT_T0);
            const __m512i w = _mm512_loadu_si512((const void *)(p + kp * 16));
            for (int b = 0; b < B; b++)
                acc[b] = _mm512_dpbf16_ps(acc[b], (__m512bh)w,
                                          (__m512bh)_mm512_set1_epi32((int)xp[kp * B + b]));
        }
        for (int b = 0; b < B; b++) _mm512_storeu_ps(y + b * N + nb * 16, acc[b]);
    }
}

#define GEMM_DP_CASE(n) case n: gemm_dp_blocks(n, N, K, P, xp, y, nb0, nb1); break;
DPBF16_TARGET static void gemm_dp(int64_t B, int64_t N, int64_t K, const uint32_t *P,
                                  const uint32_t *xp, float *y, int64_t nb0, int64_t nb1) {
    switch (B) {
        GEMM_DP_CASE(1) GEMM_DP_CASE(2) GEMM_DP_CASE(3) GEMM_DP_CASE(4) GEMM_DP_CASE(5)
        GEMM_DP_CASE(6) GEMM_DP_CASE(7) GEMM_DP_CASE(8) GEMM_DP_CASE(9) GEMM_DP_CASE(10)
        GEMM_DP_CASE(11) GEMM_DP_CASE(12) GEMM_DP_CASE(13) GEMM_DP_CASE(14) GEMM_DP_CASE(15)
        GEMM_DP_CASE(16)
    }
}

/* pairs kp0..kp1 of x (B,K) fp32 -> xp (K/2, B) bf16 pairs for gemm_dp: rounded to nearest even as torch's
 * .to(bfloat16) (vcvtne2ps2bf16; it also flushes fp32 denormals, below 1.2e-38, to zero).
 * Here rather than in torch ops: their convert + transpose + copy cost the 16-stream step
 * ~5% (0.1B shape), this ~1/5 of that. */
DPBF16_TARGET static void pairs_bf16(int64_t B, int64_t K, const float *x, uint32_t *xp,
                                     int64_t kp0, int64_t kp1) {
    for (int64_t b = 0; b < B; b++) {
        const float *xb = x + b * K;
        int64_t kp = kp0;
        for (; kp + 16 <= kp1; kp += 16) {
            uint32_t t[16];
            _mm512_storeu_si512((void *)t, (__m512i)_mm512_cvtne2ps_pbh(
                _mm512_loadu_ps(xb + 2 * kp + 16), _mm512_loadu_ps(xb + 2 * kp)));
            for (int i = 0; i < 16; i++) xp[(kp + i) * B + b] = t[i];
        }
        if (kp < kp1) { /* the last 1-15 pairs (2-30 values), masked loads */
            const int64_t n = 2 * (kp1 - kp);
            const __m512 lo = _mm512_maskz_loadu_ps(
                (__mmask16)(n >= 16 ? 0xffffu : (1u << n) - 1u), xb + 2 * kp);
            const __m512 hi = _mm512_maskz_loadu_ps(
                (__mmask16)(n > 16 ? (1u << (n - 16)) - 1u : 0u), xb + 2 * kp + 16);
            uint32_t t[16];
            _mm512_storeu_si512((void *)t, (__m512i)_mm512_cvtne2ps_pbh(hi, lo));
            for (int64_t i = 0; i < kp1 - kp; i++) xp[(kp + i) * B + b] = t[i];
        }
    }
}
#endif

/* 1 when rf_gemm_bf16p can take bf16 activations (this CPU has AVX512-BF16), else 0 */
int32_t rf_gemm_bf16p_dp(void) {
#ifdef RF_HAVE_DPBF16
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") ? 1 : 0;
#else
    return 0;
#endif
}

/* columns c0..c1 of B rows: out = act(y + bias[c]) + resid[b,c] (act 1 tanh, 2 sigmoid,
 * 3 relu^2); out may be y or resid (each element is read before it is written) */
CLONES static void gemm_epilogue(int64_t B, int64_t N, const float *y, const float *bias,
                                 int64_t act, const float *resid, float *out, int64_t c0,
                                 int64_t c1) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = c0; c < c1; c += 16) {
            v16 t = *(const v16fu *)(y + b * N + c);
            if (bias) t += *(const v16fu *)(bias + c);
            if (act == 1) t = vtanh(t);
            else if (act == 2) t = vsigmoid(t);
            else if (act == 3) {
                t = vclamp(t, 0.f, 3.0e38f);
                t *= t;
            }
            if (resid) t += *(const v16fu *)(resid + b * N + c);
            *(v16fu *)(out + b * N + c) = t;
        }
}

/* x (B,K) times xmul (B,K) if given, then relu(.)^2 if relu2, into t */
CLONES static void gemm_prologue(int64_t n, const float *x, const float *xmul, int64_t relu2,
                                 float *t) {
    for (int64_t i = 0; i < n; i++) {
        float v = xmul ? x[i] * xmul[i] : x[i];
        if (relu2) {
            v = v > 0.f ? v : 0.f;
            v *= v;
        }
        t[i] = v;
    }
}

/* y (B,N) fp32 = x (B,K) @ W^T, W packed (see above). N % 16 == 0, K even, B <= 16. x: fp32
 * (B,K); xbf16 1: rounded to bf16 first (gemm_dp_blocks), only on a CPU where
 * rf_gemm_bf16p_dp() is 1. Returns -1 for shapes it does not take, -2 out of memory.
 * Also the element-wise work around a decode product, in the same call (each a
 * torch op of a few microseconds otherwise, ~10 a layer): the input x * xmul (B,K) and/or
 * relu(x)^2 first; the output + bias (N,), tanh (act 1) or sigmoid (act 2), + resid (B,N)
 * after; any of them NULL / 0 to skip. */
int32_t rf_gemm_bf16p(int64_t B, int64_t N, int64_t K, const uint16_t *P, const void *x,
                      int64_t xbf16, float *y, int64_t nthreads, const float *xmul,
                      int64_t relu2, const float *bias, int64_t act, const float *resid) {
    if (B < 1 || B > MAXB || N % 16 || K % 2) return -1;
#ifdef RF_HAVE_DPBF16
    if (xbf16 && !rf_gemm_bf16p_dp()) return -1;
#else
    if (xbf16) return -1;
#endif
    const int64_t NB = N / 16;
    if (nthreads > NB) nthreads = NB;
    if (nthreads < 1) nthreads = 1;
    float *xt = NULL;
    if (xmul || relu2) {
        xt = (float *)malloc((size_t)(B * K) * sizeof *xt);
        if (!xt) return -2;
        gemm_prologue(B * K, (const float *)x, xmul, relu2, xt);
        x = xt;
    }
    uint32_t *xp = NULL;
#ifdef RF_HAVE_DPBF16
    if (xbf16) {
        xp = (uint32_t *)malloc((size_t)(K / 2 * B) * sizeof *xp);
        if (!xp) {
            free(xt);
            return -2;
        }
        pairs_bf16(B, K, (const float *)x, xp, 0, K / 2);
    }
#endif
    const int epi = bias || act || resid;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int64_t i = 0; i < nthreads; i++) {
        const int64_t nb0 = NB * i / nthreads, nb1 = NB * (i + 1) / nthreads;
#ifdef RF_HAVE_DPBF16
        if (xp) gemm_dp(B, N, K, (const uint32_t *)P, xp, y, nb0, nb1);
        else
#endif
            gemm_p(B, N, K, (const uint32_t *)P, (const float *)x, y, nb0, nb1);
        if (epi) gemm_epilogue(B, N, y, bias, act, resid, y, nb0 * 16, nb1 * 16);
    }
    free(xp);
    free(xt);
    return 0;
}

/* The token shift's input of a decode step: ln = LayerNorm(x) per row (weight lw, bias lb),
 * and mix[m] = ln + (shift - ln) * maa[m] for the M mixing vectors (time-mix: 6, channel-mix:
 * 1). x, shift, ln (B,C); maa (M,C); mix (M,B,C). fp32; rows b0..b1 (rf_ln_mix: all, one
 * thread: a few KB). */
CLONES static void ln_mix_rows(int64_t B, int64_t C, const float *x, const float *shift,
                               const float *lw, const float *lb, float eps, const float *maa,
                               int64_t M, float *ln, float *mix, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        const float *xb = x + b * C, *sb = shift + b * C;
        float *lnb = ln + b * C;
        v16 m = {0};
        for (int64_t c = 0; c < C; c += 16) m += *(const v16fu *)(xb + c);
        const float mean = hsum(m) / (float)C;
        v16 var = {0};
        for (int64_t c = 0; c < C; c += 16) {
            const v16 d = *(const v16fu *)(xb + c) - mean;
            var += d * d;
        }
        const float rstd = 1.f / sqrtf(hsum(var) / (float)C + eps);
        for (int64_t c = 0; c < C; c += 16) {
            const v16 l = (*(const v16fu *)(xb + c) - mean) * rstd * *(const v16fu *)(lw + c)
                + *(const v16fu *)(lb + c);
            *(v16fu *)(lnb + c) = l;
            const v16 d = *(const v16fu *)(sb + c) - l;
            for (int64_t q = 0; q < M; q++)
                *(v16fu *)(mix + (q * B + b) * C + c) = l + d * *(const v16fu *)(maa + q * C + c);
        }
    }
}

int32_t rf_ln_mix(int64_t B, int64_t C, const float *x, const float *shift, const float *lw,
                  const float *lb, float eps, const float *maa, int64_t M, float *ln,
                  float *mix) {
    if (B < 1 || C % 16 || M < 1) return -1;
    ln_mix_rows(B, C, x, shift, lw, lb, eps, maa, M, ln, mix, 0, B);
    return 0;
}

/* columns c0..c1 (multiples of 16) of y = sum_j a[b,j] WT[j, :] over the listed channels: the
 * listed rows are streamed in order (each a contiguous run of this thread's columns, the row
 * PF_AHEAD listed channels on prefetched) and y's slice is accumulated in L1. (A tile of y
 * held in registers across all rows instead walks the matrix once per tile, in short strided
 * pieces: ~1.4x slower than the dense product on a random model's ~50% of rows.) */
#define PF_AHEAD 4
CLONES static void ffn_cols(int64_t B, int64_t C, int64_t bf16, const void *WT,
                            const float *act, const int32_t *nz, int64_t nnz, float *y,
                            int64_t c0, int64_t c1, int64_t F) {
    for (int64_t b = 0; b < B; b++)
        for (int64_t c = c0; c < c1; c += 16) *(v16fu *)(y + b * C + c) = (v16){0};
    const int64_t esz = bf16 ? 2 : 4;
    for (int64_t i = 0; i < nnz; i++) {
        const int64_t j = nz[i];
        if (i + PF_AHEAD < nnz) {
            const char *next = (const char *)WT + (nz[i + PF_AHEAD] * C + c0) * esz;
            for (int64_t o = 0; o < (c1 - c0) * esz; o += 64) __builtin_prefetch(next + o);
        }
        float s[MAXB];
        for (int64_t b = 0; b < B; b++) s[b] = act[b * F + j];
        if (bf16) {
            const uint16_t *row = (const uint16_t *)WT + j * C;
            for (int64_t c = c0; c < c1; c += 16) {
                const v16 r = widen(row + c);
                for (int64_t b = 0; b < B; b++) *(v16fu *)(y + b * C + c) += bcast(s[b]) * r;
            }
        } else {
            const float *row = (const float *)WT + j * C;
            for (int64_t c = c0; c < c1; c += 16) {
                const v16 r = *(const v16fu *)(row + c);
                for (int64_t b = 0; b < B; b++) *(v16fu *)(y + b * C + c) += bcast(s[b]) * r;
            }
        }
    }
}

/* k (B,F) pre-activation of the channel-mix key; overwritten with relu(k)^2. y (B,C) fp32.
 * nz: an int32 scratch of F entries. Returns the number of channels read (non-zero in some
 * row), -2 when more than max_nnz are non-zero (nothing read: rows picked one by one stream
 * at about half the rate of a dense pass, so a dense product wins there), or -1 for shapes
 * this kernel does not take (k untouched). */
int64_t rf_ffn_sparse(int64_t B, int64_t F, int64_t C, int64_t bf16, const void *WT,
                      float *k, int32_t *nz, float *y, int64_t max_nnz, int64_t nthreads) {
    if (B < 1 || B > MAXB || C % 16) return -1;
    if (nthreads < 1) nthreads = 1;
    int64_t nnz = 0;
    for (int64_t j = 0; j < F; j++) {
        int any = 0;
        for (int64_t b = 0; b < B; b++) {
            const float v = k[b * F + j];
            const float a = v > 0.f ? v * v : 0.f;
            k[b * F + j] = a;
            any |= a != 0.f;
        }
        if (any) nz[nnz++] = (int32_t)j;
    }
    if (nnz > max_nnz) return -2; /* too dense to gain: k holds relu(k)^2, y is not written */
    const int64_t blocks = C / 16;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int64_t i = 0; i < nthreads; i++)
        ffn_cols(B, C, bf16, WT, k, nz, nnz, y, 16 * (blocks * i / nthreads),
                 16 * (blocks * (i + 1) / nthreads), F);
    return nnz;
}

#define LD(p) (*(const v16fu *)(p))
#define ST(p, x) (*(v16fu *)(p) = (x))

/* One WKV-7 step for B streams, with everything around it that is per element: the decay
 * from its pre-sigmoid value, kk = normalize(k * k_k) per head, k' = k * (1 + (a - 1) k_a),
 *
 *     S' = S diag(w) + (S @ -kk) (kk * a)^T + v k'^T        y = S' r     (per head, N x N)
 *
 * then the head's GroupNorm (ln_x) and the bonus (sum r * k' * r_k) * v. The same maths as
 * RWKV7.step's torch ops in one pass per head (only the fp32 rounding order differs). S is
 * read, S2 written (the caller's state stays untouched). All (B, C) inputs fp32; S, S2
 * (B*H, N, N) with rows = value index; out (B, C). N must be a multiple of 16.
 *
 * The row dot products (S kk, S' r) are summed 16 rows at a time (hsum16): one reduction per
 * row, its 15 dependent adds, made the step bound by add latency (~4x slower at 16 streams). */
CLONES static void wkv_heads(int64_t H, int64_t N, const float *S, float *S2, const float *wr,
                             const float *k, const float *a, const float *v, const float *r,
                             const float *k_k, const float *k_a, const float *r_k,
                             const float *lw, const float *lb, float eps, float *out,
                             int64_t bh0, int64_t bh1) {
    float w[256], kk[256], kp[256], b[256], sa[256], y[256];
    const int64_t C = H * N;
    for (int64_t bh = bh0; bh < bh1; bh++) {
        const int64_t bi = bh / H, h = bh % H, o = bi * C + h * N, c0 = h * N;
        const float *kh = k + o, *ah = a + o, *rh = r + o, *vh = v + o, *wh = wr + o;
        v16 nrm = {0}, bon = {0};
        for (int64_t j = 0; j < N; j += 16) {
            const v16 kj = LD(kh + j), x = kj * LD(k_k + c0 + j);
            ST(kk + j, x);
            nrm += x * x;
            ST(w + j, vexp(-0.606531f / (1.f + vexp(-LD(wh + j)))));
            const v16 kpj = kj * (1.f + (LD(ah + j) - 1.f) * LD(k_a + c0 + j));
            ST(kp + j, kpj);
            bon += LD(rh + j) * kpj * LD(r_k + c0 + j);
        }
        const float nr = sqrtf(hsum(nrm)), bonus = hsum(bon);
        const float inv = 1.f / (nr > 1e-12f ? nr : 1e-12f);
        for (int64_t j = 0; j < N; j += 16) {
            const v16 kkj = LD(kk + j) * inv;
            ST(kk + j, kkj);
            ST(b + j, kkj * LD(ah + j));
        }
        const float *Sh = S + bh * N * N;
        float *S2h = S2 + bh * N * N;
        for (int64_t i0 = 0; i0 < N; i0 += 16) { /* sa = S kk, 16 rows at a time */
            v16 acc[16];
            for (int q = 0; q < 16; q++) {
                const float *row = Sh + (i0 + q) * N;
                v16 t = LD(row) * LD(kk);
                for (int64_t j = 16; j < N; j += 16) t += LD(row + j) * LD(kk + j);
                acc[q] = t;
            }
            hsum16(acc, sa + i0);
        }
        for (int64_t i0 = 0; i0 < N; i0 += 16) { /* S' and y = S' r */
            v16 ya[16];
            for (int q = 0; q < 16; q++) {
                const int64_t i = i0 + q;
                const float *row = Sh + i * N;
                float *row2 = S2h + i * N;
                const v16 si = bcast(-sa[i]), vi = bcast(vh[i]);
                v16 t = {0};
                for (int64_t j = 0; j < N; j += 16) {
                    const v16 s2 = LD(row + j) * LD(w + j) + si * LD(b + j) + vi * LD(kp + j);
                    ST(row2 + j, s2);
                    t += s2 * LD(rh + j);
                }
                ya[q] = t;
            }
            hsum16(ya, y + i0);
        }
        v16 m = {0};
        for (int64_t i = 0; i < N; i += 16) m += LD(y + i);
        const float mean = hsum(m) / (float)N;
        v16 var = {0};
        for (int64_t i = 0; i < N; i += 16) {
            const v16 d = LD(y + i) - mean;
            var += d * d;
        }
        const float rstd = 1.f / sqrtf(hsum(var) / (float)N + eps);
        for (int64_t i = 0; i < N; i += 16)
            ST(out + o + i, (LD(y + i) - mean) * rstd * LD(lw + c0 + i) + LD(lb + c0 + i)
                                + bonus * LD(vh + i));
    }
}

#undef LD
#undef ST

int32_t rf_wkv_step(int64_t B, int64_t H, int64_t N, const float *S, float *S2, const float *wr,
                    const float *k, const float *a, const float *v, const float *r,
                    const float *k_k, const float *k_a, const float *r_k, const float *lw,
                    const float *lb, float eps, float *out, int64_t nthreads) {
    if (N % 16 || N > 256 || B < 1) return -1;
    const int64_t BH = B * H;
    if (nthreads > BH) nthreads = BH;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int64_t i = 0; i < nthreads; i++)
        wkv_heads(H, N, S, S2, wr, k, a, v, r, k_k, k_a, r_k, lw, lb, eps, out,
                  BH * i / nthreads, BH * (i + 1) / nthreads);
    return 0;
}

/* ---- one whole layer of a bf16-mode decode step --------------------------------------- */

/* RWKV7.step's layer in bf16 mode (RWKV7._step_layer fills this; model/decode.py's Layer
 * mirrors the struct):
 * every product on the packed bf16 weights (pack_bf16 layout; the low-rank matrices packed
 * transposed), the element-wise work fused around them, the WKV step in place, the sparse
 * channel-mix where few channels are on; one OpenMP team for the whole layer instead of ~20
 * calls from Python, each with its dispatch and its team start (at one stream the 0.1B
 * shape's step spent ~2-3 ms of ~12 there). */
typedef struct {
    int64_t B, C, H, N, F, dw, da, dv, dg, layer0, bf16rows, nthreads;
    int64_t sparse_max, sparse_nnz; /* the sparse channel-mix: at most these rows, channels on */
    float ln_eps, lnx_eps;
    const float *ln1w, *ln1b, *ln2w, *ln2b, *maa, *ffn_xk, *w0, *a0, *v0, *k_k, *k_a, *r_k,
        *lnxw, *lnxb;
    const uint16_t *Wr, *Wk, *Wv, *Wo, *Wkey, *Wval, *w1, *w2, *a1, *a2, *v1, *v2, *g1, *g2;
    const uint16_t *WvalT; /* (F,C) bf16 rows for the sparse channel-mix, or NULL */
    float *x;              /* (B,C) the residual stream, updated */
    const float *att_shift, *ffn_shift; /* (B,C) last token's ln1 / ln2 outputs */
    float *att_shift_out, *ffn_shift_out;
    float *S;       /* (B,H,N,N) WKV state, updated in place */
    float *v_first; /* (B,C): layer 0 writes it, the others read it */
    float *work;    /* scratch, rf_decode_layer_work floats */
    uint32_t *xp;   /* scratch, 6 * B * max(C, F) / 2 (bf16 pairs) */
    int32_t *nz;    /* scratch, F */
    int64_t ffn_read; /* out: value rows read (F for the dense product) */
} rf_layer;

int64_t rf_decode_layer_work(int64_t B, int64_t C, int64_t F, int64_t dw, int64_t da,
                             int64_t dv, int64_t dg) {
    return B * (6 * C + 8 * C + F + dw + da + dv + dg);
}

#ifdef _OPENMP
#include <omp.h>
#define TEAM_T omp_get_thread_num()
#define TEAM_N omp_get_num_threads()
#define PRAGMA(x) _Pragma(#x)
#define TEAM(n) PRAGMA(omp parallel num_threads(n))
#define BARRIER PRAGMA(omp barrier)
#define SINGLE PRAGMA(omp single)
#else
#define TEAM_T 0
#define TEAM_N 1
#define TEAM(n)
#define BARRIER
#define SINGLE
#endif

/* thread t of T: its column blocks of y (B,N) = x @ W^T (x fp32, or xp its bf16 pairs), then
 * out = act(y + bias) + resid on the same columns (no barrier needed between products) */
static void team_product(int64_t B, int64_t N, int64_t K, const uint16_t *P, const float *x,
                         const uint32_t *xp, float *y, const float *bias, int64_t act,
                         const float *resid, float *out) {
    const int64_t T = TEAM_N, t = TEAM_T, NB = N / 16;
    const int64_t nb0 = NB * t / T, nb1 = NB * (t + 1) / T;
    if (nb0 >= nb1) return;
#ifdef RF_HAVE_DPBF16
    if (xp) gemm_dp(B, N, K, (const uint32_t *)P, xp, y, nb0, nb1);
    else
#endif
        gemm_p(B, N, K, (const uint32_t *)P, x, y, nb0, nb1);
    if (bias || act || resid || out != y)
        gemm_epilogue(B, N, y, bias, act, resid, out, nb0 * 16, nb1 * 16);
}

/* this thread's share of the bf16 pairs of x (B,K) into xp, when the layer rounds its
 * activations: a run of whole 64-byte lines of xp (pairs split in multiples of 16; split by
 * rows, two threads would write the same lines) */
static void team_pairs(const rf_layer *L, int64_t K, const float *x, uint32_t *xp) {
#ifdef RF_HAVE_DPBF16
    if (L->bf16rows) {
        const int64_t K16 = (K / 2 + 15) / 16, T = TEAM_N, t = TEAM_T;
        int64_t kp0 = 16 * (K16 * t / T), kp1 = 16 * (K16 * (t + 1) / T);
        if (kp1 > K / 2) kp1 = K / 2;
        if (kp0 < kp1) pairs_bf16(L->B, K, x, xp, kp0, kp1);
    }
#else
    (void)L, (void)K, (void)x, (void)xp;
#endif
}

/* rows of B split over the team: this thread's b0..b1 */
#define TEAM_ROWS(B, b0, b1) \
    const int64_t b0 = (B) * TEAM_T / TEAM_N, b1 = (B) * (TEAM_T + 1) / TEAM_N

/* v = torch.lerp(v, e, t), rounded as torch's CPU kernel rounds it (one fused multiply-add
 * from whichever end is nearer): the bf16 activations that follow would turn a 1-ulp
 * difference here into a flipped rounding now and then */
CLONES static void lerp_rows(int64_t n, float *v, const float *e, const float *t) {
    for (int64_t i = 0; i < n; i++) {
        const float d = e[i] - v[i];
        v[i] = fabsf(t[i]) < 0.5f ? fmaf(t[i], d, v[i]) : fmaf(t[i] - 1.f, d, e[i]);
    }
}

int32_t rf_decode_layer(rf_layer *L) {
    const int64_t B = L->B, C = L->C, F = L->F;
    if (B < 1 || B > MAXB || C % 16 || F % 16 || L->N % 16 || L->N > 256 || L->dw % 16 ||
        L->da % 16 || L->dv % 16 || L->dg % 16)
        return -1;
#ifdef RF_HAVE_DPBF16
    if (L->bf16rows && !rf_gemm_bf16p_dp()) return -1;
#else
    if (L->bf16rows) return -1;
#endif
    float *w = L->work, *mix = w, *r = mix + 6 * B * C, *k = r + B * C, *v = k + B * C,
          *dec = v + B * C, *a = dec + B * C, *g = a + B * C, *y = g + B * C, *tmp = y + B * C,
          *kk = tmp + B * C, *hw = kk + B * F, *ha = hw + B * L->dw, *hv = ha + B * L->da,
          *hg = hv + B * L->dv;
    float *xr = mix, *xw = mix + B * C, *xk = mix + 2 * B * C, *xv = mix + 3 * B * C,
          *xa = mix + 4 * B * C, *xg = mix + 5 * B * C;
    uint32_t *xp = L->xp;
    const int64_t K2max = (C > F ? C : F) / 2;
    /* one bf16-pair buffer per input of a stage (the products of a stage run unsynchronised) */
    uint32_t *p0 = xp, *p1 = p0 + B * K2max, *p2 = p1 + B * K2max, *p3 = p2 + B * K2max,
             *p4 = p3 + B * K2max, *p5 = p4 + B * K2max;
    int64_t nnz = F;
    TEAM(L->nthreads)
    {
        /* element-wise stages split the rows over the team, the bf16 conversions and the
         * products the columns (a barrier wherever the next stage reads what another thread
         * wrote; none between the products of one stage: separate buffers) */
        TEAM_ROWS(B, b0, b1);
        const uint32_t *q0 = L->bf16rows ? p0 : NULL, *q1 = L->bf16rows ? p1 : NULL,
                       *q2 = L->bf16rows ? p2 : NULL, *q3 = L->bf16rows ? p3 : NULL,
                       *q4 = L->bf16rows ? p4 : NULL, *q5 = L->bf16rows ? p5 : NULL;
        ln_mix_rows(B, C, L->x, L->att_shift, L->ln1w, L->ln1b, L->ln_eps, L->maa, 6,
                    L->att_shift_out, mix, b0, b1);
        BARRIER;
        if (L->bf16rows) { /* (a condition every thread shares) */
            for (int i = 0; i < 6; i++) team_pairs(L, C, mix + i * B * C, xp + i * B * K2max);
            BARRIER;
        }
        team_product(B, C, C, L->Wr, xr, q0, r, NULL, 0, NULL, r);
        team_product(B, L->dw, C, L->w1, xw, q1, hw, NULL, 1, NULL, hw);
        team_product(B, C, C, L->Wk, xk, q2, k, NULL, 0, NULL, k);
        team_product(B, C, C, L->Wv, xv, q3, v, NULL, 0, NULL, v);
        team_product(B, L->da, C, L->a1, xa, q4, ha, NULL, 0, NULL, ha);
        if (!L->layer0) team_product(B, L->dv, C, L->v1, xv, q3, hv, NULL, 0, NULL, hv);
        team_product(B, L->dg, C, L->g1, xg, q5, hg, NULL, 2, NULL, hg);
        BARRIER;
        if (L->bf16rows) {
            team_pairs(L, L->dw, hw, p0);
            team_pairs(L, L->da, ha, p1);
            if (!L->layer0) team_pairs(L, L->dv, hv, p2);
            team_pairs(L, L->dg, hg, p3);
            BARRIER;
        }
        team_product(B, C, L->dw, L->w2, hw, q0, dec, L->w0, 0, NULL, dec);
        team_product(B, C, L->da, L->a2, ha, q1, a, L->a0, 2, NULL, a);
        if (!L->layer0) team_product(B, C, L->dv, L->v2, hv, q2, tmp, L->v0, 2, NULL, tmp);
        team_product(B, C, L->dg, L->g2, hg, q3, g, NULL, 0, NULL, g);
        BARRIER;
        if (L->layer0) memcpy(L->v_first + b0 * C, v + b0 * C, (size_t)((b1 - b0) * C) * sizeof *v);
        else /* v = lerp(v, v_first, sigmoid(...)) */
            lerp_rows((b1 - b0) * C, v + b0 * C, L->v_first + b0 * C, tmp + b0 * C);
        BARRIER;
        {
            const int64_t BH = B * L->H, T = TEAM_N, t = TEAM_T;
            wkv_heads(L->H, L->N, L->S, L->S, dec, k, a, v, r, L->k_k, L->k_a, L->r_k, L->lnxw,
                      L->lnxb, L->lnx_eps, y, BH * t / T, BH * (t + 1) / T);
        }
        BARRIER;
        for (int64_t i = b0 * C; i < b1 * C; i++) y[i] *= g[i];
        BARRIER;
        if (L->bf16rows) {
            team_pairs(L, C, y, p0);
            BARRIER;
        }
        team_product(B, C, C, L->Wo, y, q0, tmp, NULL, 0, L->x, L->x); /* x += (y*g) Wo */
        BARRIER;
        ln_mix_rows(B, C, L->x, L->ffn_shift, L->ln2w, L->ln2b, L->ln_eps, L->ffn_xk, 1,
                    L->ffn_shift_out, mix, b0, b1);
        BARRIER;
        if (L->bf16rows) {
            team_pairs(L, C, mix, p0);
            BARRIER;
        }
        team_product(B, F, C, L->Wkey, mix, q0, kk, NULL, 3, NULL, kk); /* relu(.)^2 */
        BARRIER;
        SINGLE
        if (L->WvalT && B <= L->sparse_max) { /* the channels on in some row */
            int64_t n = 0;
            for (int64_t j = 0; j < F; j++) {
                int any = 0;
                for (int64_t b = 0; b < B; b++) any |= kk[b * F + j] != 0.f;
                if (any) L->nz[n++] = (int32_t)j;
            }
            if (n <= L->sparse_nnz) nnz = n;
        } /* (the single's barrier) */
        if (nnz < F) {
            const int64_t blocks = C / 16, T = TEAM_N, t = TEAM_T;
            const int64_t c0 = 16 * (blocks * t / T), c1 = 16 * (blocks * (t + 1) / T);
            if (c0 < c1) {
                ffn_cols(B, C, 1, L->WvalT, kk, L->nz, nnz, tmp, c0, c1, F);
                gemm_epilogue(B, C, tmp, NULL, 0, L->x, L->x, c0, c1);
            }
        } else {
            if (L->bf16rows) {
                team_pairs(L, F, kk, p0);
                BARRIER;
            }
            team_product(B, C, F, L->Wval, kk, q0, tmp, NULL, 0, L->x, L->x);
        }
    }
    L->ffn_read = nnz;
    return 0;
}

/* ---- the nucleus (top-p) cutoff without a sort ------------------------------------------ */

/* The sampler's nucleus cut (sampling.filter_probs_ref): sort the probabilities descending,
 * take the first position where their running sum (torch.cumsum: double accumulation, each
 * prefix rounded to fp32) reaches top_p, and keep every probability >= the value there. On a
 * flat distribution the nucleus holds half of a 65536-token vocabulary, and the full sort
 * costs more than the decode step's head. Here the same value is found by a three-level
 * radix select on the fp32 bit patterns (non-negative floats order as their bits): 11, 10,
 * then 10 bits, each level a histogram of probability mass walked from the top; the last
 * level's buckets are single values, so a tie group is summed whole, as the sorted prefix
 * sums reach its end. The sums match the sort's exactly: every value added is >= 2^-29 and
 * shares its bucket's exponent, so each double sum (< 2, multiples of 2^-52) is exact in any
 * order. Where that does not hold (the cut falls below 2^-29, the mass never reaches top_p,
 * a NaN) the row's cut is -1: the caller sorts that row. */
#define TOPP_MIN_BITS 0x31000000u /* 2^-29 */

static int topp_walk(const double *mass, int n, double *acc, float top_p) {
    for (int i = n - 1; i >= 0; i--) {
        if (mass[i] == 0) continue;
        if ((float)(*acc + mass[i]) >= top_p) return i;
        *acc += mass[i];
    }
    return -1;
}

static float topp_row(const float *p, int64_t V, float top_p) {
    const uint32_t *u = (const uint32_t *)p;
    double m1[2048] = {0}, m2[1024] = {0}, m3[1024] = {0}, acc = 0;
    for (int64_t i = 0; i < V; i++) {
        if (u[i] > 0x7f800000u) return -1.f; /* NaN, or a negative value */
        m1[u[i] >> 20] += p[i];
    }
    const int b1 = topp_walk(m1, 2048, &acc, top_p);
    if (b1 < 0 || ((uint32_t)b1 << 20) < TOPP_MIN_BITS) return -1.f;
    for (int64_t i = 0; i < V; i++)
        if ((u[i] >> 20) == (uint32_t)b1) m2[(u[i] >> 10) & 1023] += p[i];
    const int b2 = topp_walk(m2, 1024, &acc, top_p);
    if (b2 < 0) return -1.f; /* unreachable: the bucket's mass crossed */
    const uint32_t hi = ((uint32_t)b1 << 10) | (uint32_t)b2;
    for (int64_t i = 0; i < V; i++)
        if ((u[i] >> 10) == hi) m3[u[i] & 1023] += p[i];
    const int b3 = topp_walk(m3, 1024, &acc, top_p);
    if (b3 < 0) return -1.f;
    const uint32_t bits = (hi << 10) | (uint32_t)b3;
    float out;
    memcpy(&out, &bits, sizeof out);
    return out;
}

/* probs (B,V) fp32 rows, top_p (B,) -> cut (B,): the nucleus cutoff value of each row (keep
 * probs >= cut), or -1 where the row needs the sort (see above). Rows over an OpenMP team. */
int32_t rf_topp_cutoff(int64_t B, int64_t V, const float *probs, const float *top_p, float *cut,
                       int64_t nthreads) {
    if (B < 1 || V < 1) return -1;
    if (nthreads > B) nthreads = B;
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
#endif
    for (int64_t b = 0; b < B; b++) cut[b] = topp_row(probs + b * V, V, top_p[b]);
    return 0;
}

/* 1 when built with OpenMP: the entry points above run in parallel (else serially) */
int32_t rf_decode_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
