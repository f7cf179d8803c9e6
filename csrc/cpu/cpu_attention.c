/* cpu_attention.c: RoPE fused with the KV-cache store (and with Qwen3's per-head q/k RMSNorm before
 * it), and grouped-query attention over the cache with causal, padding and sliding-window masks,
 * float32 throughout (KV cache f32). */
#include "cpu_internal.h"
#include "../fl_exp.h"
#include <stdlib.h>
#include <string.h>

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
    if (kv->dtype != FL_F32 && kv->dtype != FL_F16) return fl_err(FL_E_VALUE, "rope_store: the CPU's KV cache is float32 or float16");
    const int f16 = kv->dtype == FL_F16; /* kv_cache_dtype="float16": stored rounded, read back widened */
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
        if (f16) {
            cpu_row_to_f16((uint16_t *)kv->k_d[layer] + slot, row + (int64_t)n_heads * hd, (int64_t)nkv * hd);
            cpu_row_to_f16((uint16_t *)kv->v_d[layer] + slot, row + (int64_t)(n_heads + nkv) * hd, (int64_t)nkv * hd);
        } else {
            memcpy(kc + slot, row + (int64_t)n_heads * hd, (size_t)nkv * hd * sizeof(float));
            memcpy(vc + slot, row + (int64_t)(n_heads + nkv) * hd, (size_t)nkv * hd * sizeof(float));
        }
    }
    return FL_OK;
}

typedef float fl_v8 __attribute__((vector_size(32)));
static inline fl_v8 v8_load(const float *p) { fl_v8 v; memcpy(&v, p, sizeof v); return v; }
static inline void v8_store(float *p, fl_v8 v) { memcpy(p, &v, sizeof v); }

#define ATT_KB 16   /* keys a block */
#define ATT_VW 8    /* slots a vector row of Qt: the lanes of fl_v8 (AVX2) */
#define ATT_NQP 64  /* slots at most: QT = min(8, 64 / group) positions */
#define ATT_EB 32   /* output elements a register tile */

/* Scores of the KP keys kr[0:KP] for NV vectors of slots from q0 (KP x NV <= 8, both constants at every call),
 * into S[k * NQP + q0 ...]: KP x NV independent FMA chains over the head's elements. One key's chain over a
 * single vector of slots (a decode step: 1 query x a group of 3 heads fills one vector) would wait on the FMA's
 * latency at every element: ~4x slower, and most of a long-context decode step. Each score is the same sum in the
 * same order whatever KP. */
static inline __attribute__((always_inline)) void key_scores(const float *const *kr, const float *Qt, int NQP, int hd,
                                                             int q0, float *S, const int KP, const int NV) {
    fl_v8 acc[8];
    for (int c = 0; c < KP * NV; c++) acc[c] = (fl_v8){0, 0, 0, 0, 0, 0, 0, 0};
    const float *qt = Qt + q0;
    for (int e = 0; e < hd; e++, qt += NQP) {
        fl_v8 qv[4];
        for (int v = 0; v < NV; v++) qv[v] = v8_load(qt + v * ATT_VW);
        for (int k = 0; k < KP; k++) {
            const float ke = kr[k][e];
            const fl_v8 kb = {ke, ke, ke, ke, ke, ke, ke, ke};
            for (int v = 0; v < NV; v++) acc[k * NV + v] += kb * qv[v];
        }
    }
    for (int k = 0; k < KP; k++)
        for (int v = 0; v < NV; v++) v8_store(S + (size_t)k * NQP + q0 + v * ATT_VW, acc[k * NV + v]);
}

/* One block of nk keys (rows kr, vr; key j0 the first) for the nq queries of a tile: Qt [hd][NQP] (scaled, zero past
 * nq), each slot's position posf and first key jminf (sliding window), the key mask km (or NULL). Scores, masks
 * (causal, window, key mask), the online softmax (running max m and sum l a slot, o rescaled when the max grows)
 * and o += P V; S [ATT_KB][NQP] is scratch. */
static void att_block(const float *const *kr, const float *const *vr, int nk, int j0, const uint8_t *km,
                      const float *Qt, const float *posf, const float *jminf, int NQP, int nq, int hd, float *S,
                      float *m, float *l, float *o) {
    for (int q0 = 0; q0 < NQP; q0 += 4 * ATT_VW) { /* scores of every key for up to 4 vectors of slots */
        const int nv = (NQP - q0) / ATT_VW < 4 ? (NQP - q0) / ATT_VW : 4;
        int k = 0;
        /* KP keys at once, KP x nv independent FMA chains; every call with constant KP and nv, so that the
         * accumulators stay in registers */
#define KS(KP, NV) key_scores(kr + k, Qt, NQP, hd, q0, S + (size_t)k * NQP, KP, NV)
        switch (nv) {
        case 1: for (; k + 8 <= nk; k += 8) KS(8, 1); for (; k < nk; k++) KS(1, 1); break;
        case 2: for (; k + 4 <= nk; k += 4) KS(4, 2); for (; k < nk; k++) KS(1, 2); break;
        case 3: for (; k + 2 <= nk; k += 2) KS(2, 3); for (; k < nk; k++) KS(1, 3); break;
        default: for (; k + 2 <= nk; k += 2) KS(2, 4); for (; k < nk; k++) KS(1, 4); break;
        }
#undef KS
    }
    for (int k = 0; k < nk; k++) { /* masks */
        const int j = j0 + k;
        float *sk = S + (size_t)k * NQP;
        const float jf = (float)j, off = km && !km[j] ? 1.0f : 0.0f;
#pragma omp simd
        for (int q = 0; q < NQP; q++)
            sk[q] = jf <= posf[q] && jf >= jminf[q] && off == 0.0f ? sk[q] : -INFINITY;
    }
    for (int q0 = 0; q0 < NQP; q0 += ATT_VW) { /* the online softmax, a vector of slots at a time */
        float bm[ATT_VW], mn[ATT_VW], corr[ATT_VW], ls[ATT_VW];
        for (int v = 0; v < ATT_VW; v++) bm[v] = -INFINITY;
        for (int k = 0; k < nk; k++)
#pragma omp simd
            for (int v = 0; v < ATT_VW; v++) bm[v] = S[(size_t)k * NQP + q0 + v] > bm[v] ? S[(size_t)k * NQP + q0 + v] : bm[v];
#pragma omp simd
        for (int v = 0; v < ATT_VW; v++) {
            const float mo = m[q0 + v];
            mn[v] = bm[v] > mo ? bm[v] : mo;
            corr[v] = mo == -INFINITY ? 0.f : fl_exp_nonpos(mo - mn[v]);
            m[q0 + v] = mn[v];
            ls[v] = 0.f;
        }
        for (int k = 0; k < nk; k++) {
            float *sk = S + (size_t)k * NQP + q0;
#pragma omp simd
            for (int v = 0; v < ATT_VW; v++) {
                const float p = sk[v] == -INFINITY ? 0.f : fl_exp_nonpos(sk[v] - mn[v]);
                sk[v] = p;
                ls[v] += p;
            }
        }
        for (int v = 0; v < ATT_VW; v++) {
            const int q = q0 + v;
            if (q >= nq) break;
            l[q] = l[q] * corr[v] + ls[v];
            if (corr[v] != 1.0f) {
                float *oq = o + (size_t)q * hd;
#pragma omp simd
                for (int e = 0; e < hd; e++) oq[e] *= corr[v];
            }
        }
    }
    for (int q = 0; q < nq; q++) { /* o += P V, ATT_EB outputs in registers (GCC / Clang vectors) */
        float *oq = o + (size_t)q * hd;
        int e0 = 0;
        for (; e0 + ATT_EB <= hd; e0 += ATT_EB) {
            fl_v8 acc[ATT_EB / 8];
            for (int u = 0; u < ATT_EB / 8; u++) acc[u] = v8_load(oq + e0 + 8 * u);
            for (int k = 0; k < nk; k++) {
                const float p = S[(size_t)k * NQP + q], *v = vr[k] + e0;
                const fl_v8 pv = {p, p, p, p, p, p, p, p};
                for (int u = 0; u < ATT_EB / 8; u++) acc[u] += pv * v8_load(v + 8 * u);
            }
            for (int u = 0; u < ATT_EB / 8; u++) v8_store(oq + e0 + 8 * u, acc[u]);
        }
        for (int k = 0; k < nk && e0 < hd; k++) /* head sizes not a multiple of ATT_EB: the rest */
            for (int e = e0; e < hd; e++) oq[e] += S[(size_t)k * NQP + q] * vr[k][e];
    }
}

/* A query's output: its unnormalised outputs o[hd] over its softmax sum l; a query whose keys were all masked
 * (l = 0: left padding) gives zeros. */
static inline void att_out(float *dst, const float *o, float l, int hd) {
    const float inv = l > 0.f ? 1.0f / l : 0.f;
    for (int e = 0; e < hd; e++) dst[e] = o[e] * inv;
}

/* Decode (one new token a row): a work item is one row and one chunk of its keys, for every KV head. The per-head
 * items of the general kernel read a head's 256 bytes of each key's row of all heads (3 x 256 for the demo model),
 * which the hardware prefetcher follows badly, and a batch of one row is only nkv items: at 2048 keys a decode step
 * of the demo model spent 2 / 3 of its time there, at a sixth of the memory bandwidth. Here an item reads every
 * head of a block of keys together (whole rows of the cache), and a row of n keys is cut into ceil(n / ATT_CK)
 * equal chunks (16 at most), so both cores stream; when there are fewer chunks than threads the heads are shared
 * out too. Each chunk leaves its running max, sum and unnormalised outputs, merged in chunk order after. The cut
 * depends only on the row's own length, never on the batch or the threads, so a row gives the same bits alone or
 * batched; a row of one chunk computes exactly what the general kernel does. */
#define ATT_CK 256
static fl_status attention_decode(fl_backend *be, float *out, const float *qkv, const fl_step *s, const fl_kvcache *kv,
                                  int layer, int n_heads, int window, float scale) {
    const int B = s->batch, hd = kv->head_dim, nkv = kv->n_kv_heads, group = n_heads / nkv;
    const int NQ = group, NQP = (NQ + ATT_VW - 1) / ATT_VW * ATT_VW, nt = cpu_threads(be);
    const int64_t stride = (int64_t)(n_heads + 2 * nkv) * hd;
    const float *kc = (const float *)kv->k_d[layer], *vc = (const float *)kv->v_d[layer];
    const int f16 = kv->dtype == FL_F16; /* a block's rows are widened into the thread's KB / VB first */
    /* items: row b's chunks are first[b] .. first[b + 1] - 1, of ck[b] keys from key lo[b] */
    int *first = malloc((size_t)(B + 1) * sizeof *first), *ck = malloc((size_t)B * sizeof *ck);
    int *lo = malloc((size_t)B * sizeof *lo);
    if (!first || !ck || !lo) {
        free(first); free(ck); free(lo);
        return fl_err(FL_E_NOMEM, "attention: cannot allocate its work list");
    }
    first[0] = 0;
    for (int b = 0; b < B; b++) {
        const int i = row_start(s, b), j_lo = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0, n = i - j_lo + 1;
        const int nc = (n + ATT_CK - 1) / ATT_CK < 16 ? (n + ATT_CK - 1) / ATT_CK : 16; /* equal chunks, 16 at most */
        ck[b] = ((n + nc - 1) / nc + ATT_KB - 1) / ATT_KB * ATT_KB;
        lo[b] = j_lo;
        first[b + 1] = first[b] + (n + ck[b] - 1) / ck[b];
    }
    const int items = first[B];
    /* per item and head, on cache lines of its own (two threads may hold two heads of an item): m, l [NQP],
     * o [NQ][hd]; per thread: Qt [nkv][hd][NQP], S [ATT_KB][NQP], and with a float16 cache KB, VB [ATT_KB][nkv][hd] */
    const size_t pg = (2 * (size_t)NQP + (size_t)NQ * hd + 15) / 16 * 16, part = (size_t)nkv * pg;
    const size_t kvb = f16 ? (size_t)ATT_KB * nkv * hd : 0;
    const size_t per = ((size_t)nkv * hd * NQP + (size_t)ATT_KB * NQP + 2 * kvb + 15) / 16 * 16;
    float *buf = fl_malloc(((size_t)items * part + (size_t)nt * per) * sizeof(float));
    if (!buf) {
        free(first); free(ck); free(lo);
        return fl_err(FL_E_NOMEM, "attention: cannot allocate its scratch");
    }
    /* fewer chunks than threads (short rows, a batch of one): the heads are shared out too (each head's arithmetic is
     * its own, so the bits do not depend on it) */
    const int HS = items >= nt ? 1 : (nt + items - 1) / items < nkv ? (nt + items - 1) / items : nkv;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (items * HS > 1)
    for (int wh = 0; wh < items * HS; wh++) {
#ifdef _OPENMP
        const int th = omp_get_thread_num();
#else
        const int th = 0;
#endif
        const int w = wh / HS, g_lo = (wh % HS) * nkv / HS, g_hi = (wh % HS + 1) * nkv / HS;
        int b = 0;
        while (first[b + 1] <= w) b++;
        float *Qt = buf + (size_t)items * part + (size_t)th * per, *S = Qt + (size_t)nkv * hd * NQP;
        float *KB = S + (size_t)ATT_KB * NQP, *VB = KB + kvb;
        float *const item = buf + (size_t)w * part; /* head g: m = item + g pg, l = m + NQP, o = l + NQP */
        const int i = row_start(s, b), j0 = lo[b] + (w - first[b]) * ck[b];
        const int j1 = j0 + ck[b] - 1 < i ? j0 + ck[b] - 1 : i;
        const uint8_t *km = s->kmask_d ? s->kmask_d + (int64_t)b * s->kmask_stride : NULL;
        float posf[ATT_NQP], jminf[ATT_NQP];
        for (int q = 0; q < NQP; q++) {
            posf[q] = q < NQ ? (float)i : -1.0f;
            jminf[q] = (float)lo[b];
        }
        for (int g = g_lo; g < g_hi; g++) {
            float *Qg = Qt + (size_t)g * hd * NQP;
            for (int q = 0; q < NQP; q++) {
                const float *qv = q < NQ ? qkv + (int64_t)b * stride + (int64_t)(g * group + q) * hd : NULL;
                for (int e = 0; e < hd; e++) Qg[(size_t)e * NQP + q] = qv ? qv[e] * scale : 0.f;
                item[(size_t)g * pg + q] = -INFINITY;
                item[(size_t)g * pg + NQP + q] = 0.f;
            }
        }
        for (int g = g_lo; g < g_hi; g++)
            for (size_t e = 0; e < (size_t)NQ * hd; e++) item[(size_t)g * pg + 2 * NQP + e] = 0.f;
        for (int jb = j0; jb <= j1; jb += ATT_KB) {
            const int nk = j1 - jb + 1 < ATT_KB ? j1 - jb + 1 : ATT_KB;
            const float *kr[ATT_KB], *vr[ATT_KB];
            int64_t slot[ATT_KB];
            for (int k = 0; k < nk; k++) slot[k] = kv_slot(s, kv, b, jb + k) * nkv * hd;
            if (f16) /* this item's heads of the block's rows, widened */
                for (int k = 0; k < nk; k++) {
                    const int64_t o0 = slot[k] + (int64_t)g_lo * hd, n = (int64_t)(g_hi - g_lo) * hd;
                    cpu_row_to_f32(KB + (size_t)k * nkv * hd + (size_t)g_lo * hd, (const uint16_t *)kv->k_d[layer] + o0, FL_F16, n);
                    cpu_row_to_f32(VB + (size_t)k * nkv * hd + (size_t)g_lo * hd, (const uint16_t *)kv->v_d[layer] + o0, FL_F16, n);
                }
            for (int g = g_lo; g < g_hi; g++) {
                for (int k = 0; k < nk; k++) {
                    kr[k] = f16 ? KB + (size_t)k * nkv * hd + (size_t)g * hd : kc + slot[k] + (int64_t)g * hd;
                    vr[k] = f16 ? VB + (size_t)k * nkv * hd + (size_t)g * hd : vc + slot[k] + (int64_t)g * hd;
                }
                att_block(kr, vr, nk, jb, km, Qt + (size_t)g * hd * NQP, posf, jminf, NQP, NQ, hd, S,
                          item + (size_t)g * pg, item + (size_t)g * pg + NQP, item + (size_t)g * pg + 2 * NQP);
            }
        }
        if (first[b + 1] - first[b] == 1) /* the row's only chunk: its outputs, as the general kernel */
            for (int g = g_lo; g < g_hi; g++)
                for (int q = 0; q < NQ; q++)
                    att_out(out + (int64_t)b * n_heads * hd + (int64_t)(g * group + q) * hd,
                            item + (size_t)g * pg + 2 * NQP + (size_t)q * hd, item[(size_t)g * pg + NQP + q], hd);
    }
    /* merge the chunks of longer rows, in order: M = max m_c, L = sum l_c e^(m_c - M), out = sum o_c e^(m_c - M) / L */
    const int64_t heads = items > B ? (int64_t)B * nkv : 0;
#pragma omp parallel for num_threads(nt) schedule(static) if (heads > 1)
    for (int64_t bg = 0; bg < heads; bg++) {
        const int b = (int)(bg / nkv), g = (int)(bg % nkv), nc = first[b + 1] - first[b];
        for (int q = 0; q < NQ && nc > 1; q++) {
            float *dst = out + (int64_t)b * n_heads * hd + (int64_t)(g * group + q) * hd;
            const float *p0 = buf + (size_t)first[b] * part;
            float M = -INFINITY;
            for (int c = 0; c < nc; c++) {
                const float mc = p0[(size_t)c * part + (size_t)g * pg + q];
                M = mc > M ? mc : M;
            }
            float L = 0.f;
            for (int e = 0; e < hd; e++) dst[e] = 0.f;
            for (int c = 0; c < nc && M > -INFINITY; c++) {
                const float *pc = p0 + (size_t)c * part + (size_t)g * pg;
                const float mc = pc[q];
                if (mc == -INFINITY) continue; /* a chunk whose keys were all masked */
                const float wgt = expf(mc - M), *oq = pc + 2 * NQP + (size_t)q * hd;
                L += pc[NQP + q] * wgt;
                for (int e = 0; e < hd; e++) dst[e] += oq[e] * wgt;
            }
            att_out(dst, dst, L, hd);
        }
    }
    fl_free(buf);
    free(first); free(ck); free(lo);
    return FL_OK;
}

/* Grouped-query attention, flash style. A work item is one row b, one KV head g and a tile of QT query positions: the
 * group's query heads x those positions, NQ queries in slots of a transposed tile Qt[e][slot] (made once an item, NQP =
 * NQ rounded up to ATT_VW). Keys go by in blocks of ATT_KB, each key read once for all NQ queries: its scores are
 * vector FMAs over the slots (a broadcast key element times a row of Qt), no horizontal sums; the softmax runs online
 * over the blocks (running max m and sum l a slot, the outputs rescaled when the max grows) with a vectorizable exp;
 * o += P V goes ATT_EB output elements at a time in registers. Masks as before: causal, the key mask (kmask), the
 * sliding window; a query whose keys are all masked (left padding) gives zeros. The first form (one query at a time,
 * a dot product, a block-table lookup and a libm expf a key) took 132 ms for 512 queries over 2048 keys of the demo
 * model's 9 heads (2 threads); attention was ~75% of a 2048-token prompt there. */
fl_status cpu_attention(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s,
                        const fl_kvcache *kv, int layer, int n_heads, int window, float scale,
                        const fl_weight *next) {
    (void)next; /* the CPU's matmul prepares its own input */
    const int B = s->batch, T = s->n_new, hd = kv->head_dim, nkv = kv->n_kv_heads, group = n_heads / nkv;
    FL_TRY(check_slots(s, kv));
    if (T == 1 && group <= ATT_NQP && !getenv("FASTLOAD_CPU_ATT_GENERAL"))
        return attention_decode(be, out_d, qkv_d, s, kv, layer, n_heads, window, scale);
    const int64_t stride = (int64_t)(n_heads + 2 * nkv) * hd;
    const float *kc = (const float *)kv->k_d[layer], *vc = (const float *)kv->v_d[layer];
    const int f16 = kv->dtype == FL_F16; /* a block's rows of head g are widened into the thread's KB / VB first */
    const int nt = cpu_threads(be);
    int QT = group >= ATT_NQP ? 1 : ATT_NQP / group;
    QT = QT > 8 ? 8 : QT;
    QT = QT > T ? T : QT;
    const int ntile = (T + QT - 1) / QT, NQ = group * QT, NQP = (NQ + ATT_VW - 1) / ATT_VW * ATT_VW;
    /* per thread: Qt [hd][NQP], scores / probabilities [KB][NQP], outputs [NQ][hd], m, l [NQP]; float16 cache: KB, VB
     * [ATT_KB][hd] */
    const size_t kvb = f16 ? (size_t)ATT_KB * hd : 0;
    const size_t per = (size_t)hd * NQP + (size_t)ATT_KB * NQP + (size_t)NQ * hd + 4 * (size_t)NQP + 2 * kvb;
    float *scratch = fl_malloc((size_t)nt * per * sizeof(float));
    if (!scratch) return fl_err(FL_E_NOMEM, "attention: cannot allocate its scratch");
    const int64_t work = (int64_t)B * nkv * ntile;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1) if (work > 1)
    for (int64_t w = 0; w < work; w++) {
#ifdef _OPENMP
        const int th = omp_get_thread_num();
#else
        const int th = 0;
#endif
        float *Qt = scratch + (size_t)th * per, *S = Qt + (size_t)hd * NQP, *o = S + (size_t)ATT_KB * NQP;
        float *m = o + (size_t)NQ * hd, *l = m + NQP, *KB = l + NQP, *VB = KB + kvb;
        /* a slot's position and first key (floats: compared in vectors); NQP passes ATT_NQP for groups over 64 */
        float *posf = VB + kvb, *jminf = posf + NQP;
        const int b = (int)(w / ((int64_t)nkv * ntile)), rem = (int)(w % ((int64_t)nkv * ntile));
        const int g = rem / ntile, t0 = (rem % ntile) * QT, tq = T - t0 < QT ? T - t0 : QT, nq = group * tq;
        const int start = row_start(s, b), i_lo = start + t0, i_hi = start + t0 + tq - 1;
        const uint8_t *km = s->kmask_d ? s->kmask_d + (int64_t)b * s->kmask_stride : NULL;
        for (int q = 0; q < NQP; q++) {
            const int tt = q < nq ? q % tq : 0, i = i_lo + tt;
            posf[q] = q < nq ? (float)i : -1.0f; /* padding slots: no key is <= -1 */
            jminf[q] = window > 0 && i - window + 1 > 0 ? (float)(i - window + 1) : 0.0f;
            m[q] = -INFINITY;
            l[q] = 0.f;
        }
        for (int q = 0; q < NQP; q++) {
            const float *qv = q < nq ? (const float *)qkv_d + ((int64_t)b * T + t0 + q % tq) * stride +
                                           (int64_t)(g * group + q / tq) * hd : NULL;
            for (int e = 0; e < hd; e++) Qt[(size_t)e * NQP + q] = qv ? qv[e] * scale : 0.f;
        }
        for (size_t e = 0; e < (size_t)nq * hd; e++) o[e] = 0.f;
        const int j_lo = window > 0 && i_lo - window + 1 > 0 ? i_lo - window + 1 : 0;
        for (int jb = j_lo; jb <= i_hi; jb += ATT_KB) {
            const int nk = i_hi - jb + 1 < ATT_KB ? i_hi - jb + 1 : ATT_KB;
            const float *kr[ATT_KB], *vr[ATT_KB];
            for (int k = 0; k < nk; k++) {
                const int64_t slot = kv_slot(s, kv, b, jb + k) * nkv * hd + (int64_t)g * hd;
                if (f16) {
                    cpu_row_to_f32(KB + (size_t)k * hd, (const uint16_t *)kv->k_d[layer] + slot, FL_F16, hd);
                    cpu_row_to_f32(VB + (size_t)k * hd, (const uint16_t *)kv->v_d[layer] + slot, FL_F16, hd);
                    kr[k] = KB + (size_t)k * hd;
                    vr[k] = VB + (size_t)k * hd;
                } else {
                    kr[k] = kc + slot;
                    vr[k] = vc + slot;
                }
            }
            att_block(kr, vr, nk, jb, km, Qt, posf, jminf, NQP, nq, hd, S, m, l, o);
        }
        for (int q = 0; q < nq; q++)
            att_out((float *)out_d + ((int64_t)b * T + t0 + q % tq) * (int64_t)n_heads * hd + (int64_t)(g * group + q / tq) * hd,
                    o + (size_t)q * hd, l[q], hd);
    }
    fl_free(scratch);
    return FL_OK;
}
