/* cpu_attention.c: RoPE fused with the KV-cache store (and with Qwen3's per-head q/k RMSNorm before
 * it), and grouped-query attention over the cache with causal, padding and sliding-window masks,
 * float32 throughout (KV cache f32). */
#include "cpu_internal.h"
#include <float.h>
#include <stdlib.h>

/* The first 2 * half dims of a head: pairs (i, i + half) (rotate-half), or (2i, 2i + 1) (interleaved, ChatGLM). */
static inline void rotate(float *v, const float *cs, const float *sn, int half, int interleaved) {
    const int stride = interleaved ? 2 : 1, other = interleaved ? 1 : half;
    for (int i = 0; i < half; i++) {
        float *x = v + i * stride;
        const float a = x[0], b = x[other];
        x[0] = a * cs[i] - b * sn[i];
        x[other] = b * cs[i] + a * sn[i];
    }
}

/* v = rmsnorm(v) * w over one head, float32 as transformers' RMSNorm (and cpu_backend.c's rmsnorm_row) */
static inline void rmsnorm_head(float *v, const float *w, int hd, float eps) {
    float ss = 0.f;
    for (int i = 0; i < hd; i++) ss += v[i] * v[i];
    const float r = 1.0f / sqrtf(ss / (float)hd + eps);
    for (int i = 0; i < hd; i++) v[i] = w[i] * (v[i] * r);
}

/* Where row b's slot j lives (fl_kv_paging): rectangular or through the block table. */
static inline int row_start(const fl_step *s, int b) { return s->pg.starts_d ? s->pg.starts_d[b] : s->start; }
static inline int64_t kv_slot(const fl_step *s, const fl_kvcache *kv, int b, int j) {
    if (!s->pg.btab_d) return (int64_t)b * kv->max_len + j;
    const int sh = s->pg.page_shift;
    return ((int64_t)s->pg.btab_d[(int64_t)b * s->pg.btab_stride + (j >> sh)] << sh) | (j & ((1 << sh) - 1));
}

/* The slots a step writes must exist: rows fit max_len, and every page they touch is in the pool
 * (the tables are host memory here, so the check is cheap; the engine builds them). */
static fl_status check_slots(const fl_step *s, const fl_kvcache *kv) {
    for (int b = 0; b < s->batch; b++) {
        const int st = row_start(s, b);
        if (st < 0 || (int64_t)st + s->n_new > kv->max_len)
            return fl_err(FL_E_VALUE, "KV cache holds %d positions; row %d asks for slots [%d, %lld)", kv->max_len, b,
                          st, (long long)st + s->n_new);
        if (!s->pg.btab_d) continue;
        if (kv->n_pages <= 0 || s->pg.page_shift != kv->page_shift || (int64_t)s->pg.btab_stride << kv->page_shift < kv->max_len)
            return fl_err(FL_E_VALUE, "a block table needs a paged KV cache of the same page size");
        for (int p = 0; p <= (st + s->n_new - 1) >> kv->page_shift; p++) {
            const int32_t id = s->pg.btab_d[(int64_t)b * s->pg.btab_stride + p];
            if (id < 0 || id >= kv->n_pages)
                return fl_err(FL_E_VALUE, "block table row %d page %d names page %d of a pool of %d", b, p, (int)id, kv->n_pages);
        }
    }
    return FL_OK;
}

/* Dynamic NTK rope: the frequencies of a row of rope length L > max_pos, as transformers'
 * _compute_dynamic_ntk_parameters computes them in float32: base = theta * (factor * L / max_pos - (factor - 1))^(hd /
 * (hd - 2)), then 1 / base^(2i / hd). (C11 without -ffast-math: no contraction, each step rounded as torch's.) */
static void dyn_freqs(const fl_rope_dyn *d, int L, int hd, float *f) {
    float t = d->factor * (float)L;
    t = t / (float)d->max_pos;
    t = t - (float)((double)d->factor - 1.0);
    const float base = d->theta * powf(t, (float)((double)hd / (double)(hd - 2)));
    for (int i = 0; i < hd / 2; i++) f[i] = 1.0f / powf(base, (float)(2 * i) / (float)hd);
}

fl_status cpu_rope_store(fl_backend *be, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                         int n_heads, const float *inv_freq, const fl_rope_style *style, const fl_weight *qk_norm,
                         float eps) {
    const int B = s->batch, T = s->n_new, hd = kv->head_dim, nkv = kv->n_kv_heads;
    const int rd = fl_rope_dims(style, hd), half = rd / 2, inter = style && style->interleaved;
    const int64_t stride = (int64_t)(n_heads + 2 * nkv) * hd;
    FL_TRY(check_slots(s, kv));
    if (hd <= 0 || hd > 1024 || hd % 2) return fl_err(FL_E_VALUE, "rope_store: head_dim=%d must be even and at most 1024", hd);
    if (rd <= 0 || rd > hd || rd % 2)
        return fl_err(FL_E_VALUE, "rope_store: rotary dims %d must be even and in [2, head_dim=%d]", rd, hd);
    if (qk_norm && (rd != hd || inter)) return fl_err(FL_E_VALUE, "rope_store: q/k norm needs the default rotary style");
    /* style->round_cs: cos / sin rounded to the activation dtype, which is float32 here: nothing to do */
    float nw[2 * 1024]; /* q_norm | k_norm as float32 */
    if (qk_norm) {
        if (qk_norm->dtype != FL_F32 && qk_norm->dtype != FL_F16 && qk_norm->dtype != FL_BF16)
            return fl_err(FL_E_VALUE, "rope_store: the q/k norm weight must be float32, float16 or bfloat16");
        if (qk_norm->rows != 2 * (int64_t)hd || !qk_norm->data_d)
            return fl_err(FL_E_VALUE, "rope_store: the q/k norm weight has %lld rows, expected 2 x head_dim = %d",
                          (long long)qk_norm->rows, 2 * hd);
        cpu_row_to_f32(nw, qk_norm->data_d, qk_norm->dtype, 2 * (int64_t)hd);
    }
    float *kc = (float *)kv->k_d[layer], *vc = (float *)kv->v_d[layer];
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (B * T > 1)
    for (int bt = 0; bt < B * T; bt++) {
        const int b = bt / T, t = bt % T;
        float cs[512], sn[512], dynf[512];
        const float p = (float)s->pos_d[bt];
        const float *freq = inv_freq;
        if (s->dyn.factor > 0) { /* dynamic NTK rope: this row's length decides its frequencies */
            const int L = s->dyn.len_d ? s->dyn.len_d[b] : s->pos_d[bt] + 1;
            if (L > s->dyn.max_pos) {
                dyn_freqs(&s->dyn, L, rd, dynf);
                freq = dynf;
            }
        }
        for (int i = 0; i < half; i++) {
            const float f = p * freq[i]; /* float32 product, as transformers */
            cs[i] = cosf(f); sn[i] = sinf(f);
        }
        float *row = (float *)qkv_d + bt * stride;
        for (int h = 0; h < n_heads + nkv; h++) {
            if (qk_norm) rmsnorm_head(row + h * hd, nw + (h < n_heads ? 0 : hd), hd, eps);
            rotate(row + h * hd, cs, sn, half, inter);
        }
        const int64_t slot = kv_slot(s, kv, b, row_start(s, b) + t) * nkv * hd;
        memcpy(kc + slot, row + (int64_t)n_heads * hd, (size_t)nkv * hd * sizeof(float));
        memcpy(vc + slot, row + (int64_t)(n_heads + nkv) * hd, (size_t)nkv * hd * sizeof(float));
    }
    return FL_OK;
}

fl_status cpu_attention(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s,
                        const fl_kvcache *kv, int layer, int n_heads, int window, float scale,
                        const fl_weight *next) {
    (void)next; /* the CPU's matmul prepares its own input */
    const int B = s->batch, T = s->n_new, hd = kv->head_dim, nkv = kv->n_kv_heads;
    int L = 0, group = n_heads / nkv;
    FL_TRY(check_slots(s, kv));
    for (int b = 0; b < B; b++) if (row_start(s, b) + T > L) L = row_start(s, b) + T;
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
        const int i = row_start(s, b) + t, g = h / group;
        const float *q = (const float *)qkv_d + bt * stride + (int64_t)h * hd;
        const uint8_t *km = s->kmask_d ? s->kmask_d + (int64_t)b * s->kmask_stride : NULL;
        const float *kb = kc + (int64_t)g * hd, *vb = vc + (int64_t)g * hd; /* + kv_slot(j) rows */
        float *o = (float *)out_d + bt * (int64_t)n_heads * hd + (int64_t)h * hd;
        const int j0 = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
        float mx = -FLT_MAX;
        int any = 0;
        for (int j = j0; j <= i; j++) {
            if (km && !km[j]) { sc[j] = -INFINITY; continue; }
            const float *k = kb + kv_slot(s, kv, b, j) * nkv * hd;
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
            const float *v = vb + kv_slot(s, kv, b, j) * nkv * hd;
#pragma omp simd
            for (int e = 0; e < hd; e++) o[e] += p * v[e];
        }
    }
    fl_free(scratch);
    return FL_OK;
}
