/* cpu_matmul.c: y[n, R] = x[n, C] @ W[R, C]^T (+ bias) with W in f32/f16/bf16, fp32 accumulation.
 *
 * Threads split W by blocks of RB rows, so every weight byte is read from memory once per call
 * whatever n is (decode is bound by that read). Inside a block, a KC-column tile of RB rows is
 * widened to float32 in a small per-thread buffer (L1-resident) and dotted against every token
 * row; the RB-accumulator loop shares each x load across RB rows and vectorises. */
#include "cpu_internal.h"
#include <stdlib.h>

#define RB 8
#define KC 1024
#define GB 32   /* GEMM: rows widened per tile (GB x KC floats per thread: 128 KB, L2) */

static inline void dot_rb(float *restrict acc, const float *restrict w, const float *restrict x, int kc) {
    const float *w0 = w, *w1 = w + KC, *w2 = w + 2 * KC, *w3 = w + 3 * KC;
    const float *w4 = w + 4 * KC, *w5 = w + 5 * KC, *w6 = w + 6 * KC, *w7 = w + 7 * KC;
    float a0 = 0, a1 = 0, a2 = 0, a3 = 0, a4 = 0, a5 = 0, a6 = 0, a7 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3, a4, a5, a6, a7)
    for (int k = 0; k < kc; k++) {
        const float xv = x[k];
        a0 += w0[k] * xv; a1 += w1[k] * xv; a2 += w2[k] * xv; a3 += w3[k] * xv;
        a4 += w4[k] * xv; a5 += w5[k] * xv; a6 += w6[k] * xv; a7 += w7[k] * xv;
    }
    acc[0] += a0; acc[1] += a1; acc[2] += a2; acc[3] += a3;
    acc[4] += a4; acc[5] += a5; acc[6] += a6; acc[7] += a7;
}

static inline float dot1(const float *restrict w, const float *restrict x, int kc) {
    float a = 0;
#pragma omp simd reduction(+ : a)
    for (int k = 0; k < kc; k++) a += w[k] * x[k];
    return a;
}

/* ---- decode path (n <= 4): widen weights in registers, 4 rows x n tokens of accumulators ---- */
#define DR 4
#if defined(__AVX512F__)
#define VW 16
typedef __m512 vf;
static inline vf vload_w(const void *w, fl_dtype t, int64_t k) {
    if (t == FL_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k))), 16));
    if (t == FL_F16) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)w + k)));
    return _mm512_loadu_ps((const float *)w + k);
}
#define VZERO() _mm512_setzero_ps()
#define VLOADX(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VSUM(a) _mm512_reduce_add_ps(a)
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
typedef __m256 vf;
static inline vf vload_w(const void *w, fl_dtype t, int64_t k) {
    if (t == FL_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k))), 16));
    if (t == FL_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)w + k)));
    return _mm256_loadu_ps((const float *)w + k);
}
static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VZERO() _mm256_setzero_ps()
#define VLOADX(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VSUM(a) hsum256(a)
#endif

#ifdef VW
/* GEMM micro-kernel: acc[(i + j) * GB + r] += dot(w row r, x token i + j) for 4 rows of a widened tile
 * (row stride KC) and 3 tokens: 7 loads per 12 FMAs (dot_rb: 9 per 8), 12 accumulators in registers. */
static inline void dot_4x3(float *restrict acc, const float *restrict w, const float *restrict x, int64_t xs, int kc) {
    const float *x0 = x, *x1 = x + xs, *x2 = x + 2 * xs;
    vf a[4][3];
    for (int r = 0; r < 4; r++) for (int j = 0; j < 3; j++) a[r][j] = VZERO();
    int k = 0;
    for (; k + VW <= kc; k += VW) {
        vf xa = VLOADX(x0 + k), xb = VLOADX(x1 + k), xc = VLOADX(x2 + k);
        /* x and w in registers, each loaded once: 7 loads per 12 FMAs (GCC otherwise folds one of them into
         * every FMA as a memory operand: 16 loads per 12 FMAs) */
        __asm__("" : "+x"(xa), "+x"(xb), "+x"(xc));
        for (int r = 0; r < 4; r++) {
            vf wv = VLOADX(w + r * KC + k);
            __asm__("" : "+x"(wv));
            a[r][0] = VFMA(wv, xa, a[r][0]);
            a[r][1] = VFMA(wv, xb, a[r][1]);
            a[r][2] = VFMA(wv, xc, a[r][2]);
        }
    }
    for (int r = 0; r < 4; r++)
        for (int j = 0; j < 3; j++) {
            float t = VSUM(a[r][j]);
            for (int kk = k; kk < kc; kk++) t += w[r * KC + kk] * x[j * xs + kk];
            acc[j * GB + r] += t;
        }
}

/* dot_4x3's arithmetic for one token (dot_4x1: 4 rows; dotv: one row): per element the same FMA chain over VW lanes,
 * the same lane sum and scalar tail, so a token's result does not depend on whether the GEMM took it in a three or
 * alone (n % 3 and its place in the batch), nor a row's on whether it was in a four: the GEMM's bits are the same for
 * a row of x whatever else is in the batch (decode steps of quantised weights that take the float path, prefill
 * chunks of several requests). dot_rb / dot1 (omp simd: the compiler's order) serve builds without VW only. */
static inline void dot_4x1(float *restrict acc, const float *restrict w, const float *restrict x, int kc) {
    vf a[4];
    for (int r = 0; r < 4; r++) a[r] = VZERO();
    int k = 0;
    for (; k + VW <= kc; k += VW) {
        const vf xa = VLOADX(x + k);
        for (int r = 0; r < 4; r++) a[r] = VFMA(VLOADX(w + r * KC + k), xa, a[r]);
    }
    for (int r = 0; r < 4; r++) {
        float t = VSUM(a[r]);
        for (int kk = k; kk < kc; kk++) t += w[r * KC + kk] * x[kk];
        acc[r] += t;
    }
}

static inline float dotv(const float *restrict w, const float *restrict x, int kc) {
    vf a = VZERO();
    int k = 0;
    for (; k + VW <= kc; k += VW) a = VFMA(VLOADX(w + k), VLOADX(x + k), a);
    float t = VSUM(a);
    for (int kk = k; kk < kc; kk++) t += w[kk] * x[kk];
    return t;
}

/* y[i, r0:r0+DR] for i < n (n <= 4): every weight element is loaded once and used n times. */
static inline void decode_block(float *y, const float *x, int n, const fl_weight *W, int64_t r0, int64_t R, int64_t C) {
    const size_t es = (size_t)fl_dtype_size(W->dtype);
    const char *w0 = (const char *)W->data_d + (size_t)r0 * (size_t)C * es;
    const size_t rs = (size_t)C * es;
    vf acc[DR][4];
    for (int r = 0; r < DR; r++) for (int i = 0; i < 4; i++) acc[r][i] = VZERO();
    int64_t k = 0;
    for (; k + VW <= C; k += VW) {
        vf xv[4];
        for (int i = 0; i < n; i++) xv[i] = VLOADX(x + (int64_t)i * C + k);
        for (int r = 0; r < DR; r++) {
            const vf wv = vload_w(w0 + r * rs, W->dtype, k);
            for (int i = 0; i < n; i++) acc[r][i] = VFMA(wv, xv[i], acc[r][i]);
        }
    }
    for (int r = 0; r < DR; r++)
        for (int i = 0; i < n; i++) {
            float a = VSUM(acc[r][i]);
            for (int64_t kk = k; kk < C; kk++) a += cpu_elem_f32(w0 + r * rs, W->dtype, kk) * x[(int64_t)i * C + kk];
            y[(int64_t)i * R + r0 + r] = a;
        }
}

/* n == 1: 8 rows per block, so 8 independent FMA chains and 8 weight streams are in flight, and the
 * weight dtype is a compile-time constant of the inner loop (the wrapper switches once per block).
 * Measured single-thread on 8192x2048 bf16: 16.4 GB/s with the 4-row kernel above, 28-30 GB/s like
 * this (plain reads 37.6 GB/s). For n = 2..4 the 4-row kernel stays: specialising it the same way
 * made n = 4 slower (20 vs 23.5 GB/s on 2 threads). */
#define DR1 8
static inline void decode_block1_t(float *y, const float *x, const fl_weight *W, int64_t r0, int64_t C, const fl_dtype t) {
    const size_t es = (size_t)fl_dtype_size(t), rs = (size_t)C * es;
    const char *w0 = (const char *)W->data_d + (size_t)r0 * rs;
    vf acc[DR1];
    for (int r = 0; r < DR1; r++) acc[r] = VZERO();
    int64_t k = 0;
    for (; k + VW <= C; k += VW) {
        const vf xv = VLOADX(x + k);
        for (int r = 0; r < DR1; r++) acc[r] = VFMA(vload_w(w0 + r * rs, t, k), xv, acc[r]);
    }
    for (int r = 0; r < DR1; r++) {
        float a = VSUM(acc[r]);
        for (int64_t kk = k; kk < C; kk++) a += cpu_elem_f32(w0 + r * rs, t, kk) * x[kk];
        y[r0 + r] = a;
    }
}

/* Row r0 alone for n tokens: decode_block's arithmetic for one of its rows (a VW-wide FMA chain over the columns,
 * its horizontal sum, the scalar tail), so the rows past the last whole block of DR (a vocabulary of 50257, a router
 * of 6 experts) are the same bits in any batch too. */
static void decode_row(float *y, const float *x, int n, const fl_weight *W, int64_t r0, int64_t R, int64_t C) {
    const size_t es = (size_t)fl_dtype_size(W->dtype);
    const char *w0 = (const char *)W->data_d + (size_t)r0 * (size_t)C * es;
    for (int i = 0; i < n; i++) {
        vf acc = VZERO();
        int64_t k = 0;
        for (; k + VW <= C; k += VW) acc = VFMA(vload_w(w0, W->dtype, k), VLOADX(x + (int64_t)i * C + k), acc);
        float a = VSUM(acc);
        for (int64_t kk = k; kk < C; kk++) a += cpu_elem_f32(w0, W->dtype, kk) * x[(int64_t)i * C + kk];
        y[(int64_t)i * R + r0] = a;
    }
}

static void decode_block1(float *y, const float *x, const fl_weight *W, int64_t r0, int64_t C) {
    switch (W->dtype) {
    case FL_BF16: decode_block1_t(y, x, W, r0, C, FL_BF16); break;
    case FL_F16: decode_block1_t(y, x, W, r0, C, FL_F16); break;
    default: decode_block1_t(y, x, W, r0, C, FL_F32); break;
    }
}
#endif

fl_status cpu_matmul(fl_backend *be, void *y_d, const void *x_d, int n, const fl_weight *W, const fl_weight *bias) {
    if (W->dtype == FL_QUANT) return cpu_qmatmul(be, (float *)y_d, (const float *)x_d, n, W, bias); /* cpu_qmatmul.c */
    if (W->dtype != FL_F32 && W->dtype != FL_F16 && W->dtype != FL_BF16)
        return fl_err(FL_E_UNSUPPORTED, "CPU matmul: weight dtype %d not supported", (int)W->dtype);
    float *y = (float *)y_d;
    const float *x = (const float *)x_d;
#ifdef VW
    const int64_t R = W->rows, C = W->cols;
    const int nt = cpu_threads(be);
    /* decode: bound by reading W. Up to 16 rows of x (the engine's batched decode steps) in passes of 4, so that a
     * row's result is the same bits in any batch as alone (the GEMM's blocking is not); past 16 (prefill) the GEMM.
     * Rows past the last whole block of DR take decode_row (the same per-row arithmetic): a row count that is not a
     * multiple of 4 (a vocabulary of 50257, a router of 6 experts) took the GEMM, whose bits depend on the batch. */
    if (n <= 16) {
        const int64_t R4 = R - R % DR;
        for (int i0 = 0; i0 < n; i0 += 4) {
            const int k = n - i0 < 4 ? n - i0 : 4;
            float *yk = y + (size_t)i0 * (size_t)R;
            const float *xk = x + (size_t)i0 * (size_t)C;
            if (k == 1 && R % DR1 == 0) {
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t blk = 0; blk < R / DR1; blk++) decode_block1(yk, xk, W, blk * DR1, C);
            } else {
#pragma omp parallel for num_threads(nt) schedule(static)
                for (int64_t blk = 0; blk < R4 / DR; blk++) decode_block(yk, xk, k, W, blk * DR, R, C);
                for (int64_t r = R4; r < R; r++) decode_row(yk, xk, k, W, r, R, C);
            }
        }
        if (bias && bias->data_d)
            for (int i = 0; i < n; i++)
                for (int64_t r = 0; r < R; r++) y[(int64_t)i * R + r] += cpu_elem_f32(bias->data_d, bias->dtype, r);
        return FL_OK;
    }
#endif
    return cpu_gemm(be, y, x, n, W, bias);
}

/* The GEMM: any n, any weight dtype whose rows can be widened to float32 a KC-column tile at a time
 * (f32/f16/bf16, and FL_QUANT through cpu_q_widen; a quantised weight's x is already gathered by perm). */
fl_status cpu_gemm(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, const fl_weight *bias) {
    const int64_t R = W->rows, C = W->cols;
    const size_t esz = (size_t)fl_dtype_size(W->dtype);
    const int quant = W->dtype == FL_QUANT;
    const int nt = cpu_threads(be);
    const int64_t nblk = (R + GB - 1) / GB;
    float *wbuf = fl_malloc((size_t)nt * GB * KC * sizeof(float));
    float *accb = fl_malloc((size_t)nt * (size_t)n * GB * sizeof(float));
    if (!wbuf || !accb) {
        fl_free(wbuf); fl_free(accb);
        return fl_err(FL_E_NOMEM, "CPU matmul: cannot allocate scratch for %d rows", n);
    }
#pragma omp parallel num_threads(nt)
    {
#ifdef _OPENMP
        const int tid = omp_get_thread_num();
#else
        const int tid = 0;
#endif
        float *wb = wbuf + (size_t)tid * GB * KC;
        float *acc = accb + (size_t)tid * (size_t)n * GB;
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < nblk; blk++) {
            const int64_t r0 = blk * GB;
            const int rb = (int)(R - r0 < GB ? R - r0 : GB);
            memset(acc, 0, (size_t)n * GB * sizeof(float));
            for (int64_t k0 = 0; k0 < C; k0 += KC) {
                const int kc = (int)(C - k0 < KC ? C - k0 : KC);
                for (int r = 0; r < rb; r++)
                    if (quant) cpu_q_widen(wb + r * KC, W, r0 + r, k0, kc);
                    else cpu_row_to_f32(wb + r * KC, (const char *)W->data_d + ((size_t)(r0 + r) * (size_t)C + (size_t)k0) * esz,
                                   W->dtype, kc);
                /* tokens in threes against the tile's rows in fours (x rows stay in L1 while the tile streams
                 * from L2), then the token and row remainders */
#ifdef VW
                const int rb4 = rb & ~3;
                int i0 = 0;
                for (; i0 + 3 <= n; i0 += 3) {
                    const float *xi = x + (int64_t)i0 * C + k0;
                    for (int r = 0; r < rb4; r += 4) dot_4x3(acc + (size_t)i0 * GB + r, wb + r * KC, xi, C, kc);
                    for (int j = 0; j < 3; j++)
                        for (int r = rb4; r < rb; r++) acc[(size_t)(i0 + j) * GB + r] += dotv(wb + r * KC, xi + (int64_t)j * C, kc);
                }
                for (int i = i0; i < n; i++) { /* the tokens past the last three: dot_4x3's arithmetic a token */
                    const float *xi = x + (int64_t)i * C + k0;
                    for (int r = 0; r < rb4; r += 4) dot_4x1(acc + (size_t)i * GB + r, wb + r * KC, xi, kc);
                    for (int r = rb4; r < rb; r++) acc[(size_t)i * GB + r] += dotv(wb + r * KC, xi, kc);
                }
#else
                for (int i = 0; i < n; i++) {
                    const float *xi = x + (int64_t)i * C + k0;
                    int r = 0;
                    for (; r + RB <= rb; r += RB) dot_rb(acc + (size_t)i * GB + r, wb + r * KC, xi, kc);
                    for (; r < rb; r++) acc[(size_t)i * GB + r] += dot1(wb + r * KC, xi, kc);
                }
#endif
            }
            for (int i = 0; i < n; i++)
                for (int r = 0; r < rb; r++)
                    y[(int64_t)i * R + r0 + r] = acc[(size_t)i * GB + r] +
                        (bias && bias->data_d ? cpu_elem_f32(bias->data_d, bias->dtype, r0 + r) : 0.f);
        }
    }
    fl_free(wbuf);
    fl_free(accb);
    return FL_OK;
}
