/* cpu_qmatmul.c: the CPU backend's kernels for quantised weights (csrc/quant.h's format).
 *
 *  - cpu_q_widen: columns [k0, k0 + kc) of one row dequantised to float32 (the tile-widening step of
 *    cpu_matmul.c's GEMM, used for prefill and as the portable path for every layout), equal to
 *    fl_q_dequant_rows bit for bit (w = fmaf(q, s, m), m = -s * 2^(bits-1) for the symmetric form).
 *  - cpu_q_embed: the embedding rows of tokens, dequantised (act-order perm: scattered back).
 *  - cpu_quantize: the backend's quantize op (fl_q_quantize_rows over rows split among threads).
 */
#include "cpu_internal.h"
#include "../quant.h"
#include <stdlib.h>

static inline float q_sval(const void *p, fl_dtype t, size_t i) {
    return t == FL_F32 ? ((const float *)p)[i] : fl_f16_to_f32(((const uint16_t *)p)[i]);
}

/* dst[0:kc] = dequantised W[r, k0:k0+kc]; k0 and kc are multiples of 16 (groups are), so every chunk of
 * 16 columns lies in one group. */
void cpu_q_widen(float *restrict dst, const fl_weight *W, int64_t r, int64_t k0, int kc) {
    const int64_t C = W->cols, G = W->group_size, ng = C / G;
    const int bits = W->bits;
    const uint8_t *q = (const uint8_t *)W->data_d + (size_t)r * (size_t)(C * bits / 8);
    const size_t g0 = (size_t)r * (size_t)ng;
    const float off = (float)(1 << (bits - 1));
    for (int j = 0; j < kc; j += 16) {
        const int64_t c = k0 + j;
        const size_t gi = g0 + (size_t)(c / G);
        const float s = q_sval(W->scales_d, W->sdtype, gi);
        float *d = dst + j;
        if (W->code == FL_QCODE_NF4) {
            const uint8_t *b = q + c / 2;
            if (W->zeros_d) {
                const float m = q_sval(W->zeros_d, W->sdtype, gi);
                for (int t = 0; t < 8; t++) {
                    d[2 * t] = fmaf(fl_nf4_table[b[t] & 15], s, m);
                    d[2 * t + 1] = fmaf(fl_nf4_table[b[t] >> 4], s, m);
                }
            } else
                for (int t = 0; t < 8; t++) {
                    d[2 * t] = s * fl_nf4_table[b[t] & 15];
                    d[2 * t + 1] = s * fl_nf4_table[b[t] >> 4];
                }
            continue;
        }
        const float m = W->zeros_d ? q_sval(W->zeros_d, W->sdtype, gi) : -s * off;
#if defined(__AVX2__) && defined(__FMA__)
        __m128i codes;
        if (bits == 4) {
            const __m128i b = _mm_loadl_epi64((const __m128i *)(q + c / 2)), m4 = _mm_set1_epi8(15);
            codes = _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
        } else
            codes = _mm_loadu_si128((const __m128i *)(q + c));
        const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
        _mm256_storeu_ps(d, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(codes)), vs, vm));
        _mm256_storeu_ps(d + 8, _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(codes, 8))), vs, vm));
#else
        if (bits == 4) {
            const uint8_t *b = q + c / 2;
            for (int t = 0; t < 8; t++) {
                d[2 * t] = fmaf((float)(b[t] & 15), s, m);
                d[2 * t + 1] = fmaf((float)(b[t] >> 4), s, m);
            }
        } else
            for (int t = 0; t < 16; t++) d[t] = fmaf((float)q[c + t], s, m);
#endif
    }
}

fl_status cpu_q_embed(fl_backend *be, float *x, const int32_t *tokens, int n, const fl_weight *emb) {
    const int64_t d = emb->cols;
    float *tmp = NULL;
    if (emb->perm_d) {
        for (int64_t j = 0; j < d; j++)
            if (emb->perm_d[j] < 0 || emb->perm_d[j] >= d)
                return fl_err(FL_E_VALUE, "quantised embedding: perm[%lld] = %d outside [0, %lld)", (long long)j,
                              (int)emb->perm_d[j], (long long)d);
        if (!(tmp = fl_malloc((size_t)n * (size_t)d * sizeof(float))))
            return fl_err(FL_E_NOMEM, "quantised embedding: cannot allocate %d rows", n);
    }
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 8)
    for (int i = 0; i < n; i++) {
        float *o = tmp ? tmp + (size_t)i * (size_t)d : x + (size_t)i * (size_t)d;
        for (int64_t k0 = 0; k0 < d; k0 += 4096) cpu_q_widen(o + k0, emb, tokens[i], k0, (int)(d - k0 < 4096 ? d - k0 : 4096));
        if (tmp) /* stored column j is the embedding's column perm[j] */
            for (int64_t j = 0; j < d; j++) x[(size_t)i * (size_t)d + (size_t)emb->perm_d[j]] = o[j];
    }
    fl_free(tmp);
    return FL_OK;
}

fl_status cpu_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src_d,
                       fl_dtype src_dtype) {
    /* one call on no rows validates everything (layout, scheme, range) before the threads start */
    if (rows < 0 || row0 < 0 || row0 + rows > W->rows)
        return fl_err(FL_E_VALUE, "quantize: rows [%lld, %lld) outside [0, %lld)", (long long)row0,
                      (long long)(row0 + rows), (long long)W->rows);
    FL_TRY(fl_q_quantize_rows(W, scheme, row0, 0, src_d, src_dtype));
    const size_t srow = (size_t)W->cols * (size_t)fl_dtype_size(src_dtype);
    fl_status st = FL_OK;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        fl_status s1 = fl_q_quantize_rows(W, scheme, row0 + r, 1, (const char *)src_d + (size_t)r * srow, src_dtype);
        if (s1 != FL_OK) {
#pragma omp critical(fl_cpu_quantize)
            st = s1;
        }
    }
    return st;
}

/* y[n, R] = x[n, C] @ dequant(W)^T (+ bias). Act-order weights first gather x (xg[:, j] = x[:, perm[j]]). */
fl_status cpu_qmatmul(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, const fl_weight *bias) {
    const fl_qlayout L = fl_q_layout_of(W);
    FL_TRY(fl_q_check(&L, W->rows, W->cols));
    const int64_t C = W->cols;
    float *xg = NULL;
    if (W->perm_d) {
        if (!(xg = fl_malloc((size_t)n * (size_t)C * sizeof(float))))
            return fl_err(FL_E_NOMEM, "CPU matmul: cannot allocate the gathered input (%d x %lld)", n, (long long)C);
        for (int i = 0; i < n; i++)
            for (int64_t j = 0; j < C; j++) xg[(size_t)i * (size_t)C + (size_t)j] = x[(size_t)i * (size_t)C + (size_t)W->perm_d[j]];
        x = xg;
    }
    fl_status st = cpu_gemm(be, y, x, n, W, bias);
    fl_free(xg);
    return st;
}
