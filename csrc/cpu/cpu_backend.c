/* cpu_backend.c: the CPU backend's table, memory, and element-wise ops (embedding, norms,
 * SwiGLU). Matmul and attention live in their own files. */
#include "cpu_internal.h"
#include <stdlib.h>

/* Each block carries its size in a 64-byte header so that free() can keep the counters true. */
#define HDR 64
static fl_status cpu_alloc(fl_backend *be, size_t bytes, void **out) {
    char *p = fl_malloc(bytes + HDR);
    *out = NULL;
    if (!p) return fl_err(FL_E_NOMEM, "cannot allocate %zu bytes of host memory", bytes);
    memcpy(p, &bytes, sizeof bytes);
#pragma omp atomic
    be->mem_allocated += bytes;
    if (be->mem_allocated > be->mem_peak) be->mem_peak = be->mem_allocated;
    *out = p + HDR;
    return FL_OK;
}
static void cpu_free(fl_backend *be, void *p) {
    if (!p) return;
    char *base = (char *)p - HDR;
    size_t bytes;
    memcpy(&bytes, base, sizeof bytes);
#pragma omp atomic
    be->mem_allocated -= bytes;
    fl_free(base);
}
static fl_status cpu_copy(fl_backend *be, void *dst, const void *src, size_t bytes) {
    (void)be; memcpy(dst, src, bytes); return FL_OK;
}
static fl_status cpu_sync(fl_backend *be) { (void)be; return FL_OK; }
static void cpu_destroy(fl_backend *be) {
    cpu_threads_free(be);
    free(be);
}

static fl_status cpu_embed(fl_backend *be, void *x_d, const int32_t *tokens, int n, const fl_weight *emb) {
    float *x = (float *)x_d;
    const int64_t d = emb->cols;
    for (int i = 0; i < n; i++)
        if (tokens[i] < 0 || tokens[i] >= emb->rows)
            return fl_err(FL_E_VALUE, "token id %d is outside the vocabulary [0, %lld)", (int)tokens[i], (long long)emb->rows);
    if (emb->dtype == FL_QUANT) return cpu_q_embed(be, x, tokens, n, emb); /* cpu_qmatmul.c */
    const size_t rb = (size_t)d * (size_t)fl_dtype_size(emb->dtype);
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 8)
    for (int i = 0; i < n; i++)
        cpu_row_to_f32(x + (int64_t)i * d, (const char *)emb->data_d + (size_t)tokens[i] * rb, emb->dtype, d);
    return FL_OK;
}

/* out = x * rsqrt(mean(x^2) + eps) * w, float32 as transformers' RMSNorm computes it. */
static inline void rmsnorm_row(float *restrict out, const float *restrict x, const fl_weight *w, int64_t d, float eps) {
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    switch (w->dtype) {
    case FL_F32: {
        const float *g = (const float *)w->data_d;
#pragma omp simd
        for (int64_t i = 0; i < d; i++) out[i] = g[i] * (x[i] * r);
        break;
    }
    default:
        for (int64_t i = 0; i < d; i++) out[i] = cpu_elem_f32(w->data_d, w->dtype, i) * (x[i] * r);
    }
}

/* `next` (the matmul that reads out) is a hint the CPU backend does not use: its matmuls quantise x themselves */
static fl_status cpu_rmsnorm(fl_backend *be, void *out_d, const void *x_d, const fl_weight *w, int n, float eps,
                             const fl_weight *next) {
    (void)next;
    const int64_t d = w->rows;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 4)
    for (int i = 0; i < n; i++) rmsnorm_row((float *)out_d + i * d, (const float *)x_d + i * d, w, d, eps);
    return FL_OK;
}

static fl_status cpu_add_rmsnorm(fl_backend *be, void *out_d, void *resid_d, const void *delta_d,
                                 const fl_weight *w, int n, float eps, const fl_weight *next) {
    (void)next;
    const int64_t d = w->rows;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 4)
    for (int i = 0; i < n; i++) {
        float *r = (float *)resid_d + i * d;
        const float *dl = (const float *)delta_d + i * d;
#pragma omp simd
        for (int64_t k = 0; k < d; k++) r[k] += dl[k];
        rmsnorm_row((float *)out_d + i * d, r, w, d, eps);
    }
    return FL_OK;
}

static fl_status cpu_swiglu(fl_backend *be, void *out_d, const void *gu_d, int n, int f, const fl_weight *next) {
    (void)next;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 1)
    for (int i = 0; i < n; i++) {
        const float *g = (const float *)gu_d + (int64_t)i * 2 * f, *u = g + f;
        float *o = (float *)out_d + (int64_t)i * f;
        for (int k = 0; k < f; k++) o[k] = g[k] / (1.0f + expf(-g[k])) * u[k];
    }
    return FL_OK;
}

static fl_status cpu_gather_rows(fl_backend *be, void *dst_d, const void *src_d, const int32_t *rows, int n, int d) {
    (void)be;
    for (int i = 0; i < n; i++)
        memcpy((float *)dst_d + (int64_t)i * d, (const float *)src_d + (int64_t)rows[i] * d, (size_t)d * 4);
    return FL_OK;
}

static fl_status cpu_logits_to_host(fl_backend *be, float *dst, const void *src, int n, int vocab) {
    (void)be;
    if (dst != src) memcpy(dst, src, (size_t)n * (size_t)vocab * 4);
    return FL_OK;
}

fl_status fl_backend_cpu_create(int n_threads, fl_backend **out) {
    fl_backend *be = calloc(1, sizeof *be);
    if (!be) return fl_err(FL_E_NOMEM, "cannot allocate the CPU backend");
    /* threads=0: all cores, fewer while other processes keep some busy (cpu_threads.c), unless OMP_NUM_THREADS
     * chose the count */
    const int adapt = n_threads <= 0 && !getenv("OMP_NUM_THREADS");
#ifdef _OPENMP
    if (n_threads <= 0) n_threads = omp_get_max_threads();
#else
    n_threads = 1;
#endif
    *be = (fl_backend){
        .name = "cpu", .act = FL_F32, .n_threads = n_threads, .host_memory = 1,
        .alloc = cpu_alloc, .free = cpu_free, .to_backend = cpu_copy, .to_host = cpu_copy,
        .sync = cpu_sync, .destroy = cpu_destroy,
        .embed = cpu_embed, .rmsnorm = cpu_rmsnorm, .add_rmsnorm = cpu_add_rmsnorm,
        .matmul = cpu_matmul, .rope_store = cpu_rope_store, .attention = cpu_attention,
        .swiglu = cpu_swiglu, .gather_rows = cpu_gather_rows, .logits_to_host = cpu_logits_to_host,
        .quantize = cpu_quantize, .interleave_weight = cpu_q_interleave, .add_lowrank = cpu_add_lowrank, .moe_route = cpu_moe_route, .moe_ffn = cpu_moe_ffn,
    };
    cpu_threads_init(be, adapt);
    *out = be;
    return FL_OK;
}
