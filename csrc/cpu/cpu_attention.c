/* cpu_attention.c: RoPE fused with the KV-cache store, and grouped-query attention over the
 * cache with causal, padding and sliding-window masks, float32 throughout (KV cache f32). */
#include "cpu_internal.h"
#include <float.h>
#include <stdlib.h>

static inline void rotate(float *v, const float *cs, const float *sn, int half) {
    for (int i = 0; i < half; i++) {
        const float a = v[i], b = v[i + half];
        v[i] = a * cs[i] - b * sn[i];
        v[i + half] = b * cs[i] + a * sn[i];
    }
}

fl_status cpu_rope_store(fl_backend *be, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                         int n_heads, const float *inv_freq) {
    const int B = s->batch, T = s->n_new, hd = kv->head_dim, nkv = kv->n_kv_heads, half = hd / 2;
    const int64_t stride = (int64_t)(n_heads + 2 * nkv) * hd;
    if (s->start + T > kv->max_len)
        return fl_err(FL_E_VALUE, "KV cache holds %d positions; %d requested", kv->max_len, s->start + T);
    float *kc = (float *)kv->k_d[layer], *vc = (float *)kv->v_d[layer];
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (B * T > 1)
    for (int bt = 0; bt < B * T; bt++) {
        const int b = bt / T, t = bt % T;
        float cs[512], sn[512];
        const float p = (float)s->pos_d[bt];
        for (int i = 0; i < half; i++) {
            const float f = p * inv_freq[i]; /* float32 product, as transformers */
            cs[i] = cosf(f); sn[i] = sinf(f);
        }
        float *row = (float *)qkv_d + bt * stride;
        for (int h = 0; h < n_heads + nkv; h++) rotate(row + h * hd, cs, sn, half);
        const int64_t slot = ((int64_t)b * kv->max_len + s->start + t) * nkv * hd;
        memcpy(kc + slot, row + (int64_t)n_heads * hd, (size_t)nkv * hd * sizeof(float));
        memcpy(vc + slot, row + (int64_t)(n_heads + nkv) * hd, (size_t)nkv * hd * sizeof(float));
    }
    return FL_OK;
}

fl_status cpu_attention(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s,
                        const fl_kvcache *kv, int layer, int n_heads, int window, float scale) {
    const int B = s->batch, T = s->n_new, hd = kv->head_dim, nkv = kv->n_kv_heads;
    const int L = s->start + T, group = n_heads / nkv;
    const int64_t stride = (int64_t)(n_heads + 2 * nkv) * hd;
    const float *kc = (const float *)kv->k_d[layer], *vc = (const float *)kv->v_d[layer];
    const int nt = cpu_threads(be);
    float *scratch = fl_malloc((size_t)nt * (size_t)L * sizeof(float));
    if (!scratch) return fl_err(FL_E_NOMEM, "attention: cannot allocate %d scores", L);
    const int64_t work = (int64_t)B * T * n_heads;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 4) if (work > 1)
    for (int64_t w = 0; w < work; w++) {
#ifdef _OPENMP
        float *sc = scratch + (size_t)omp_get_thread_num() * L;
#else
        float *sc = scratch;
#endif
        const int h = (int)(w % n_heads), bt = (int)(w / n_heads), b = bt / T, t = bt % T;
        const int i = s->start + t, g = h / group;
        const float *q = (const float *)qkv_d + bt * stride + (int64_t)h * hd;
        const uint8_t *km = s->kmask_d ? s->kmask_d + (int64_t)b * s->kmask_stride : NULL;
        const float *kb = kc + ((int64_t)b * kv->max_len * nkv + g) * hd;
        const float *vb = vc + ((int64_t)b * kv->max_len * nkv + g) * hd;
        float *o = (float *)out_d + bt * (int64_t)n_heads * hd + (int64_t)h * hd;
        const int j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
        float mx = -FLT_MAX;
        int any = 0;
        for (int j = j0; j <= i; j++) {
            if (km && !km[j]) { sc[j] = -INFINITY; continue; }
            const float *k = kb + (int64_t)j * nkv * hd;
            float a = 0;
#pragma omp simd reduction(+ : a)
            for (int e = 0; e < hd; e++) a += q[e] * k[e];
            sc[j] = a * scale;
            if (sc[j] > mx) mx = sc[j];
            any = 1;
        }
        for (int e = 0; e < hd; e++) o[e] = 0.f;
        if (!any) continue; /* a fully masked (padding) query row: zeros */
        float sum = 0;
        for (int j = j0; j <= i; j++) {
            const float p = sc[j] == -INFINITY ? 0.f : expf(sc[j] - mx);
            sc[j] = p; sum += p;
        }
        const float inv = 1.0f / sum;
        for (int j = j0; j <= i; j++) {
            if (sc[j] == 0.f) continue;
            const float p = sc[j] * inv;
            const float *v = vb + (int64_t)j * nkv * hd;
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
    fl_free(scratch);
    return FL_OK;
}
