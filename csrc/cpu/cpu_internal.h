/* cpu_internal.h: helpers shared by the CPU backend's op files. Activations are float32. */
#ifndef FL_CPU_INTERNAL_H
#define FL_CPU_INTERNAL_H
#include "../fl_backend.h"
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

/* dst[0:n] = (float) src[0:n] for a weight row of dtype t. Loops the compiler vectorises. */
static inline void cpu_row_to_f32(float *restrict dst, const void *restrict src, fl_dtype t, int64_t n) {
    switch (t) {
    case FL_F32: memcpy(dst, src, (size_t)n * 4); break;
    case FL_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        uint32_t *d = (uint32_t *)dst;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) d[i] = (uint32_t)s[i] << 16;
        break;
    }
    case FL_F16: {
        const uint16_t *s = (const uint16_t *)src;
        int64_t i = 0;
#if defined(__AVX512F__)
        for (; i + 16 <= n; i += 16)
            _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(s + i))));
#elif defined(__F16C__)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + i))));
#endif
        for (; i < n; i++) dst[i] = fl_f16_to_f32(s[i]);
        break;
    }
    default: break;
    }
}

/* dst[0:n] = float16(src[0:n]), rounded to nearest even (F16C's and fl_f32_to_f16's rounding): a float16 KV cache. */
static inline void cpu_row_to_f16(uint16_t *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) dst[i] = fl_f32_to_f16(src[i]);
}

static inline float cpu_elem_f32(const void *p, fl_dtype t, int64_t i) {
    switch (t) {
    case FL_F32: return ((const float *)p)[i];
    case FL_F16: return fl_f16_to_f32(((const uint16_t *)p)[i]);
    case FL_BF16: return fl_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return 0.f;
    }
}

static inline int cpu_threads(const fl_backend *be) {
    const int t = fl_backend_threads_now(be);
    return t > 0 ? t : 1;
}

/* cpu_threads.c: threads_now follows the cores other processes leave free (threads=0 only) */
void cpu_threads_init(fl_backend *be, int adapt);
void cpu_threads_free(fl_backend *be);
int cpu_cgroup_limit(void); /* Linux: the cgroups' CPU limit, rounded up; 0 for none */

fl_status cpu_gemm(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, const fl_weight *bias);
/* quantised weights (cpu_qmatmul.c) */
fl_status cpu_qmatmul(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, const fl_weight *bias);
void cpu_q_widen(float *restrict dst, const fl_weight *W, int64_t r, int64_t k0, int kc);
fl_status cpu_q_embed(fl_backend *be, float *x, const int32_t *tokens, int n, const fl_weight *emb);
fl_status cpu_q_interleave(fl_backend *be, fl_weight *W, int *done);
int cpu_qi_takes(const fl_weight *W); /* qi_rows reads W once interleaved (cpu_qmatmul.c) */
fl_status cpu_add_lowrank(fl_backend *be, void *w_d, fl_dtype dt, int64_t rows, int64_t cols, const float *b_d,
                          const float *a_d, int r, float scale);
fl_status cpu_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src_d,
                       fl_dtype src_dtype);
fl_status cpu_matmul(fl_backend *be, void *y_d, const void *x_d, int n, const fl_weight *W, const fl_weight *bias);
fl_status cpu_rope_store(fl_backend *be, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                         int n_heads, const float *inv_freq, const fl_rope_style *style, const fl_weight *qk_norm,
                         float eps);
fl_status cpu_attention(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s,
                        const fl_kvcache *kv, int layer, int n_heads, int window, float scale,
                        const fl_weight *next);
/* Mixture of Experts (cpu_moe.c) */
fl_status cpu_moe_route(fl_backend *be, int32_t *ids, float *wts, const void *logits_d, int n, int E, int k, int norm);
fl_status cpu_moe_ffn(fl_backend *be, void *out_d, const void *x_d, int n, const int32_t *ids, const float *wts, int k,
                      int E, const fl_weight *w13, const fl_weight *w2, const fl_moe_scratch *ws, int may_sync);
#endif
