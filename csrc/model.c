/* model.c: weight layout (one arena), loading with shape checks, the forward pass.
 * The forward is written once against fl_backend; architectures differ by fl_config only. */
#include "fl_model.h"
#include "gguf.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef _OPENMP
#include <omp.h>
#endif

const char *const fl_slot_names[FL_SLOT_COUNT] = {
    "embed_tokens", "lm_head", "final_norm", "input_layernorm", "q_proj", "k_proj", "v_proj",
    "q_proj.bias", "k_proj.bias", "v_proj.bias", "o_proj", "post_attention_layernorm",
    "gate_proj", "up_proj", "down_proj", "q_norm", "k_norm", "query_key_value", "query_key_value.bias",
    "dense_h_to_4h", "moe_router", "moe_w1", "moe_w3", "moe_w2", "moe_gate_up_proj", "moe_down_proj",
};
_Static_assert(sizeof fl_slot_names / sizeof *fl_slot_names == FL_SLOT_COUNT, "a name for every slot");

static int is_moe_slot(int slot) { return slot >= FL_SLOT_MOE_ROUTER && slot <= FL_SLOT_MOE_W2_ALL; }
static int is_ffn_slot(int slot) { return slot == FL_SLOT_GATE || slot == FL_SLOT_UP || slot == FL_SLOT_DOWN; }
/* The dense FFN weights (w_gate_up, w_down) exist: a dense model (a shared expert would use them later). */
static int has_dense_ffn(const fl_config *c) { return !c->n_experts || c->shared_ffn; }

#define ALIGN 256

/* The config's values are hostile until checked (they come from config.json or GGUF metadata,
 * or straight from a caller of fastload._C.Model): every dimension is bounded here, before any
 * size is computed from it, and the limit is named in the error. With these bounds no product
 * below overflows, but the sizes are still computed with checked arithmetic (fl_mul3_size).
 * Errors are FL_E_FORMAT (fastload.CheckpointError, a ValueError): the values come from a checkpoint. */
static fl_status check_dim(const char *name, int v, int max) {
    if (v <= 0 || v > max) return fl_err(FL_E_FORMAT, "config: %s=%d must be in [1, %d]", name, v, max);
    return FL_OK;
}

static fl_status check_pos_float(const char *name, float v, int below_one) {
    if (!isfinite(v) || !(v > 0) || (below_one && !(v < 1)))
        return fl_err(FL_E_FORMAT, "config: %s=%g must be a finite number in (0, %s)", name, (double)v, below_one ? "1" : "inf");
    return FL_OK;
}

static fl_status check_config(const fl_config *c) {
    FL_TRY(check_dim("vocab_size", c->vocab, FL_MAX_VOCAB));
    FL_TRY(check_dim("hidden_size", c->d, FL_MAX_HIDDEN));
    FL_TRY(check_dim("num_hidden_layers", c->n_layers, FL_MAX_LAYERS));
    FL_TRY(check_dim("num_attention_heads", c->n_heads, FL_MAX_HEADS));
    FL_TRY(check_dim("num_key_value_heads", c->n_kv_heads, c->n_heads));
    FL_TRY(check_dim("head_dim", c->head_dim, FL_MAX_HEAD_DIM));
    FL_TRY(check_dim("intermediate_size", c->ffn, FL_MAX_FFN));
    if (c->n_heads % c->n_kv_heads)
        return fl_err(FL_E_FORMAT, "config: num_attention_heads=%d is not a multiple of num_key_value_heads=%d",
                      c->n_heads, c->n_kv_heads);
    if (c->head_dim % 2)
        return fl_err(FL_E_FORMAT, "config: head_dim=%d must be even and at most %d", c->head_dim, FL_MAX_HEAD_DIM);
    if (c->rope_dims < 0 || c->rope_dims > c->head_dim || c->rope_dims % 2)
        return fl_err(FL_E_FORMAT, "config: rotary dims %d must be even and in [0, head_dim=%d] (0: all)", c->rope_dims,
                      c->head_dim);
    if (c->qk_norm && (c->rope_dims || c->rope_interleaved))
        return fl_err(FL_E_FORMAT, "config: q/k norm goes with the default rotary style only");
    if (c->max_pos < 0)
        return fl_err(FL_E_FORMAT, "config: max_position_embeddings=%d must be in [0, 2^31-1]", c->max_pos);
    FL_TRY(check_pos_float("rms_norm_eps", c->rms_eps, 1));
    FL_TRY(check_pos_float("rope_theta", c->rope_theta, 0));
    if (c->rope_type < FL_ROPE_DEFAULT || c->rope_type > FL_ROPE_DYNAMIC)
        return fl_err(FL_E_FORMAT, "config: unknown rope_type %d", c->rope_type);
    if (c->rope_type != FL_ROPE_DEFAULT) FL_TRY(check_pos_float("rope_scaling.factor", c->rope_factor, 0));
    FL_TRY(check_pos_float("rope_scaling.attention_factor", c->rope_attn_factor, 0));
    if (c->rope_type == FL_ROPE_YARN) {
        /* the correction range [low, high] in dimensions: low >= 0, high != low (transformers adds 0.001 when
         * equal). high < low is possible (truncate false with a small original context: high = min(high, dim - 1)
         * may fall below low = max(low, 0)); transformers' ramp (i - low) / (high - low) then falls instead of rising,
         * and so does this one */
        if (!(c->rope_low_freq_factor >= 0.f) || !isfinite(c->rope_low_freq_factor) ||
            !isfinite(c->rope_high_freq_factor) || c->rope_high_freq_factor == c->rope_low_freq_factor)
            return fl_err(FL_E_FORMAT, "config: yarn correction range [%g, %g] must satisfy 0 <= low, low != high, "
                          "both finite", (double)c->rope_low_freq_factor, (double)c->rope_high_freq_factor);
    }
    if (c->rope_type == FL_ROPE_DYNAMIC && c->head_dim < 4)
        return fl_err(FL_E_FORMAT, "config: dynamic rope scaling needs head_dim >= 4 (its exponent is head_dim / (head_dim - 2)), "
                      "got %d", c->head_dim);
    if (c->rope_type == FL_ROPE_DYNAMIC && c->rope_orig_max_pos <= 0)
        return fl_err(FL_E_FORMAT, "config: dynamic rope scaling needs max_position_embeddings in [1, 2^31-1], got %d",
                      c->rope_orig_max_pos);
    if (c->rope_type == FL_ROPE_LLAMA3) {
        FL_TRY(check_pos_float("rope_scaling.low_freq_factor", c->rope_low_freq_factor, 0));
        FL_TRY(check_pos_float("rope_scaling.high_freq_factor", c->rope_high_freq_factor, 0));
        if (c->rope_orig_max_pos <= 0)
            return fl_err(FL_E_FORMAT, "config: rope_scaling.original_max_position_embeddings=%d must be in [1, 2^31-1]",
                          c->rope_orig_max_pos);
    }
    if (c->n_experts < 0 || c->n_experts > FL_MAX_EXPERTS)
        return fl_err(FL_E_FORMAT, "config: num_local_experts=%d must be in [0, %d] (0: dense)", c->n_experts, FL_MAX_EXPERTS);
    if (c->n_experts) {
        const int kmax = c->n_experts < FL_MAX_TOPK ? c->n_experts : FL_MAX_TOPK;
        if (c->top_k < 1 || c->top_k > kmax)
            return fl_err(FL_E_FORMAT, "config: num_experts_per_tok=%d must be in [1, %d] (num_local_experts=%d, at most %d)",
                          c->top_k, kmax, c->n_experts, FL_MAX_TOPK);
        FL_TRY(check_dim("moe intermediate_size", c->moe_ffn, FL_MAX_FFN));
        if (c->shared_ffn)
            return fl_err(FL_E_UNSUPPORTED, "config: a shared expert (shared_expert_intermediate_size=%d) is not "
                          "supported yet", c->shared_ffn);
    }
    for (int l = 0; l < c->n_layers; l++)
        if (c->window[l] < 0)
            return fl_err(FL_E_FORMAT, "config: sliding window of layer %d = %d must be in [0, 2^31-1]", l, c->window[l]);
    return FL_OK;
}

/* Bytes of a rows x cols x es block rounded up to ALIGN, added to *total; 0 on overflow. */
static int add_block(size_t *total, int64_t rows, int64_t cols, size_t es) {
    size_t b;
    if (rows < 0 || cols < 0) return 0;
    return fl_mul3_size((size_t)rows, (size_t)cols, es, &b) && fl_align_size(b, ALIGN, &b) &&
           fl_add_size(*total, b, total);
}

/* inv_freq[i] = 1 / theta^(2i/rd) for the rd rotated dims (rd = head_dim unless rope_dims says fewer: ChatGLM
 * rotates half of each head, its exponents over that half), then the configured scaling; float32 as transformers. */
static void rope_freqs(const fl_config *c, float *f) {
    const int rd = c->rope_dims ? c->rope_dims : c->head_dim, half = rd / 2;
    for (int i = 0; i < half; i++) {
        const float e = (float)(2 * i) / (float)rd;
        f[i] = 1.0f / powf(c->rope_theta, e);
    }
    if (c->rope_type == FL_ROPE_LINEAR) {
        for (int i = 0; i < half; i++) f[i] /= c->rope_factor;
    } else if (c->rope_type == FL_ROPE_LLAMA3) {
        const float factor = c->rope_factor, lo = c->rope_low_freq_factor, hi = c->rope_high_freq_factor;
        const float old = (float)c->rope_orig_max_pos;
        const float lo_wl = old / lo, hi_wl = old / hi;
        for (int i = 0; i < half; i++) {
            const float wl = 2.0f * (float)M_PI / f[i];
            float v = wl > lo_wl ? f[i] / factor : f[i];
            if (!(wl < hi_wl) && !(wl > lo_wl)) {
                const float sm = (old / wl - lo) / (hi - lo);
                v = (1 - sm) * v / factor + sm * v;
            }
            f[i] = v;
        }
    } else if (c->rope_type == FL_ROPE_YARN) {
        /* transformers' _compute_yarn_parameters in float32: interpolation 1 / (factor * theta^(2i/hd)) blended with
         * extrapolation 1 / theta^(2i/hd) by 1 - clamp((i - low) / (high - low), 0, 1) */
        const float lo = c->rope_low_freq_factor, span = c->rope_high_freq_factor - c->rope_low_freq_factor;
        for (int i = 0; i < half; i++) {
            const float pos = powf(c->rope_theta, (float)(2 * i) / (float)c->head_dim);
            const float extra = 1.0f / pos, inter = 1.0f / (c->rope_factor * pos);
            float ramp = ((float)i - lo) / span;
            ramp = ramp < 0.f ? 0.f : ramp > 1.f ? 1.f : ramp;
            const float ef = 1.0f - ramp;
            f[i] = inter * (1.0f - ef) + extra * ef;
        }
    }
}

typedef struct { fl_weight *w; int64_t rows, cols; } wdesc;

/* Visit every weight with its shape; used for sizing and for pointer assignment. */
static int list_weights(fl_model *m, wdesc *out) {
    const fl_config *c = &m->cfg;
    const int64_t qkv = ((int64_t)c->n_heads + 2 * (int64_t)c->n_kv_heads) * c->head_dim; /* bounded by check_config */
    int n = 0;
    out[n++] = (wdesc){&m->w.embed, c->vocab, c->d};
    out[n++] = (wdesc){&m->w.final_norm, c->d, 1};
    if (!c->tie_embeddings) out[n++] = (wdesc){&m->w.lm_head, c->vocab, c->d};
    for (int l = 0; l < c->n_layers; l++) {
        fl_layer *L = &m->w.layers[l];
        out[n++] = (wdesc){&L->attn_norm, c->d, 1};
        out[n++] = (wdesc){&L->wqkv, qkv, c->d};
        if (c->qkv_bias) out[n++] = (wdesc){&L->bqkv, qkv, 1};
        if (c->qk_norm) out[n++] = (wdesc){&L->qk_norm, 2 * (int64_t)c->head_dim, 1};
        out[n++] = (wdesc){&L->wo, c->d, (int64_t)c->n_heads * c->head_dim};
        out[n++] = (wdesc){&L->ffn_norm, c->d, 1};
        if (has_dense_ffn(c)) {
            out[n++] = (wdesc){&L->w_gate_up, 2 * (int64_t)c->ffn, c->d};
            out[n++] = (wdesc){&L->w_down, c->d, c->ffn};
        }
        if (c->n_experts) { /* bounded by check_config: E * 2 * moe_ffn < 2^29 */
            out[n++] = (wdesc){&L->moe_router, c->n_experts, c->d};
            out[n++] = (wdesc){&L->moe_w13, (int64_t)c->n_experts * 2 * c->moe_ffn, c->d};
            out[n++] = (wdesc){&L->moe_w2, (int64_t)c->n_experts * c->d, c->moe_ffn};
        }
    }
    return n;
}

fl_status fl_timing_skip_parse(const char *s, unsigned *mask) {
    /* names[i] is bit i: the order of FL_SKIP_* (fl_model.h) */
    static const char *names[] = {"norm", "qkv", "rope", "attention", "o", "gate_up", "swiglu", "down", "lm_head"};
    enum { N_NAMES = (int)(sizeof names / sizeof names[0]) };
    _Static_assert(1u << (N_NAMES - 1) == FL_SKIP_LM_HEAD, "names[] follows FL_SKIP_*");
    *mask = 0;
    if (!s) return FL_OK;
    const char *p = s;
    while (*p) {
        const char *e = strchr(p, ',');
        const size_t n = e ? (size_t)(e - p) : strlen(p);
        int k = -1;
        for (int i = 0; i < N_NAMES; i++)
            if (strlen(names[i]) == n && !strncmp(p, names[i], n)) k = i;
        if (k < 0 && n) {
            char known[128] = "";
            for (int i = 0; i < N_NAMES; i++) {
                strcat(known, i ? ", " : "");
                strcat(known, names[i]);
            }
            return fl_err(FL_E_VALUE, "FASTLOAD_TIMING_SKIP='%s': '%.*s' is not one of %s", s, (int)(n > 40 ? 40 : n), p,
                          known);
        }
        if (k >= 0) *mask |= 1u << k;
        p += n + (e ? 1 : 0);
    }
    return FL_OK;
}

fl_status fl_model_create(const fl_config *cfg, fl_dtype wdtype, fl_backend *be, fl_model **out) {
    *out = NULL;
    FL_TRY(check_config(cfg));
    unsigned skip = 0;
    FL_TRY(fl_timing_skip_parse(getenv("FASTLOAD_TIMING_SKIP"), &skip));
    if (wdtype != FL_F32 && wdtype != FL_F16 && wdtype != FL_BF16)
        return fl_err(FL_E_VALUE, "weight dtype must be float32, float16 or bfloat16");
    fl_model *m = calloc(1, sizeof *m);
    if (!m) return fl_err(FL_E_NOMEM, "cannot allocate the model");
    m->cfg = *cfg;
    m->wdtype = wdtype;
    m->be = be;
    m->timing_skip = skip;
    /* n_layers <= FL_MAX_LAYERS (check_config): these table sizes are small */
    m->w.layers = calloc((size_t)cfg->n_layers, sizeof(fl_layer));
    m->loaded = calloc((size_t)FL_SLOT_COUNT * (size_t)cfg->n_layers, 1);
    if (cfg->n_experts) m->moe_loaded = calloc((size_t)cfg->n_layers * (size_t)cfg->n_experts * 3, 1);
    wdesc *ws = malloc(sizeof(wdesc) * (3 + FL_LAYER_WEIGHTS * (size_t)cfg->n_layers)); /* list_weights writes <= that */
    fl_status st = FL_OK;
    if (!m->w.layers || !m->loaded || !ws || (cfg->n_experts && !m->moe_loaded)) { st = fl_err(FL_E_NOMEM, "cannot allocate the model tables"); goto fail; }
    const int nw = list_weights(m, ws);
    const size_t es = (size_t)fl_dtype_size(wdtype);
    const int half = cfg->head_dim / 2; /* <= 512: fits freqs[] below */
    size_t total = 0;
    for (int i = 0; i < nw; i++)
        if (!add_block(&total, ws[i].rows, ws[i].cols, es)) {
            st = fl_err(FL_E_FORMAT, "config: the weights' total size overflows (weight %d of %d: %lld x %lld)", i, nw,
                        (long long)ws[i].rows, (long long)ws[i].cols);
            goto fail;
        }
    if (!add_block(&total, half, 1, sizeof(float))) {
        st = fl_err(FL_E_FORMAT, "config: the weights' total size overflows");
        goto fail;
    }
    for (int i = 0; i < nw; i++) /* shapes now; data_d once the arena exists (arena_alloc) */
        *ws[i].w = (fl_weight){.dtype = wdtype, .rows = ws[i].rows, .cols = ws[i].cols, .data_d = NULL};
    if (cfg->tie_embeddings) m->w.lm_head = m->w.embed;
    m->arena_bytes = total;
    m->stats.bytes_weights = total;
    free(ws);
    *out = m;
    return FL_OK;
fail:
    free(ws);
    fl_model_free(m);
    return st;
}

static void ws_release(fl_model *m) {
    fl_backend *be = m->be;
    void **bufs[] = {&m->ws_x, &m->ws_xn, &m->ws_qkv, &m->ws_att, &m->ws_delta, &m->ws_gu, &m->ws_ff,
                     &m->ws_last, &m->ws_logits, (void **)&m->ws_tok_d, (void **)&m->ws_pos_d, (void **)&m->ws_mask_d,
                     &m->ws_router, (void **)&m->ws_moe_ids, (void **)&m->ws_moe_wts, &m->moe_ws.gu, &m->moe_ws.ff,
                     &m->moe_ws.y, &m->moe_ws.xs, (void **)&m->moe_ws.perm, (void **)&m->moe_ws.inv,
                     (void **)&m->moe_ws.offs};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        if (*bufs[i]) be->free(be, *bufs[i]);
        *bufs[i] = NULL;
    }
    m->ws_tokens = 0;
    m->ws_logit_rows = 0;
}

void fl_model_free(fl_model *m) {
    if (!m) return;
    if (m->be) {
        ws_release(m);
        if (m->arena_d) m->be->free(m->be, m->arena_d);
    }
    free(m->w.layers);
    free(m->loaded);
    free(m->moe_loaded);
    free(m->moe_ws.offs_h);
    free(m);
}

/* Where a slot's tensor lands: the weight, its first row, and the shape expected. */
static fl_status slot_target(fl_model *m, int slot, int layer, int expert, fl_weight **w, int64_t *row0, int64_t *rows,
                             int64_t *cols, int *is_vec) {
    const fl_config *c = &m->cfg;
    const int64_t q = (int64_t)c->n_heads * c->head_dim, k = (int64_t)c->n_kv_heads * c->head_dim;
    const int64_t f = c->moe_ffn, E = c->n_experts;
    *row0 = 0; *is_vec = 0;
    if (slot >= FL_SLOT_ATTN_NORM && (layer < 0 || layer >= c->n_layers))
        return fl_err(FL_E_VALUE, "layer %d out of range (model has %d layers)", layer, c->n_layers);
    if (is_moe_slot(slot) && !c->n_experts)
        return fl_err(FL_E_VALUE, "a Mixture-of-Experts tensor was given but the model is dense (no experts)");
    if (is_ffn_slot(slot) && !has_dense_ffn(c))
        return fl_err(FL_E_VALUE, "a dense FFN tensor was given but the model's FFN is a Mixture of Experts");
    if ((slot == FL_SLOT_MOE_W1 || slot == FL_SLOT_MOE_W3 || slot == FL_SLOT_MOE_W2) && (expert < 0 || expert >= E))
        return fl_err(FL_E_VALUE, "expert %d out of range (the model has %lld experts)", expert, (long long)E);
    fl_layer *L = slot >= FL_SLOT_ATTN_NORM ? &m->w.layers[layer] : NULL;
    switch (slot) {
    case FL_SLOT_EMBED: *w = &m->w.embed; *rows = c->vocab; *cols = c->d; break;
    case FL_SLOT_LM_HEAD:
        if (c->tie_embeddings) return fl_err(FL_E_VALUE, "lm_head given but the config ties embeddings");
        *w = &m->w.lm_head; *rows = c->vocab; *cols = c->d; break;
    case FL_SLOT_FINAL_NORM: *w = &m->w.final_norm; *rows = c->d; *cols = 1; *is_vec = 1; break;
    case FL_SLOT_ATTN_NORM: *w = &L->attn_norm; *rows = c->d; *cols = 1; *is_vec = 1; break;
    case FL_SLOT_FFN_NORM: *w = &L->ffn_norm; *rows = c->d; *cols = 1; *is_vec = 1; break;
    case FL_SLOT_Q: *w = &L->wqkv; *rows = q; *cols = c->d; break;
    case FL_SLOT_K: *w = &L->wqkv; *row0 = q; *rows = k; *cols = c->d; break;
    case FL_SLOT_V: *w = &L->wqkv; *row0 = q + k; *rows = k; *cols = c->d; break;
    case FL_SLOT_Q_BIAS: case FL_SLOT_K_BIAS: case FL_SLOT_V_BIAS:
        if (!c->qkv_bias) return fl_err(FL_E_VALUE, "a q/k/v bias was given but the architecture has none");
        *w = &L->bqkv; *is_vec = 1; *cols = 1;
        *row0 = slot == FL_SLOT_Q_BIAS ? 0 : slot == FL_SLOT_K_BIAS ? q : q + k;
        *rows = slot == FL_SLOT_Q_BIAS ? q : k;
        break;
    case FL_SLOT_Q_NORM: case FL_SLOT_K_NORM:
        if (!c->qk_norm) return fl_err(FL_E_VALUE, "a q/k norm weight was given but the architecture has none");
        *w = &L->qk_norm; *is_vec = 1; *cols = 1;
        *row0 = slot == FL_SLOT_Q_NORM ? 0 : c->head_dim;
        *rows = c->head_dim;
        break;
    case FL_SLOT_O: *w = &L->wo; *rows = c->d; *cols = q; break;
    case FL_SLOT_GATE: *w = &L->w_gate_up; *rows = c->ffn; *cols = c->d; break;
    case FL_SLOT_UP: *w = &L->w_gate_up; *row0 = c->ffn; *rows = c->ffn; *cols = c->d; break;
    case FL_SLOT_DOWN: *w = &L->w_down; *rows = c->d; *cols = c->ffn; break;
    case FL_SLOT_QKV: *w = &L->wqkv; *rows = q + 2 * k; *cols = c->d; break;
    case FL_SLOT_QKV_BIAS:
        if (!c->qkv_bias) return fl_err(FL_E_VALUE, "a q/k/v bias was given but the architecture has none");
        *w = &L->bqkv; *is_vec = 1; *cols = 1; *rows = q + 2 * k;
        break;
    case FL_SLOT_GATE_UP: *w = &L->w_gate_up; *rows = 2 * (int64_t)c->ffn; *cols = c->d; break;
    case FL_SLOT_MOE_ROUTER: *w = &L->moe_router; *rows = E; *cols = c->d; break;
    case FL_SLOT_MOE_W1: *w = &L->moe_w13; *row0 = expert * 2 * f; *rows = f; *cols = c->d; break;
    case FL_SLOT_MOE_W3: *w = &L->moe_w13; *row0 = expert * 2 * f + f; *rows = f; *cols = c->d; break;
    case FL_SLOT_MOE_W2: *w = &L->moe_w2; *row0 = expert * c->d; *rows = c->d; *cols = f; break;
    case FL_SLOT_MOE_W13_ALL: *w = &L->moe_w13; *rows = E * 2 * f; *cols = c->d; break;
    case FL_SLOT_MOE_W2_ALL: *w = &L->moe_w2; *rows = E * c->d; *cols = f; break;
    default: return fl_err(FL_E_VALUE, "unknown weight slot %d", slot);
    }
    return FL_OK;
}

/* The weight a slot fills, its first row there and its shape: for reading weights back (Model.export). */
fl_status fl_model_slot_rows(fl_model *m, int slot, int layer, int expert, const fl_weight **w, int64_t *row0,
                             int64_t *rows, int64_t *cols, int *is_vec) {
    fl_weight *wt = NULL;
    FL_TRY(slot_target(m, slot, layer, expert, &wt, row0, rows, cols, is_vec));
    *w = wt;
    return FL_OK;
}

/* ---- per-weight layouts -------------------------------------------------------------------------------------
 * Weight ids: 0 embed, 1 final_norm, 2 lm_head, then FL_LAYER_WEIGHTS per layer in fl_layer's field order. */
#define NLW FL_LAYER_WEIGHTS
_Static_assert(sizeof(fl_layer) == NLW * sizeof(fl_weight), "fl_layer holds exactly FL_LAYER_WEIGHTS fl_weight fields");
static const char *const layer_fields[NLW] = {"attn_norm", "wqkv", "bqkv", "qk_norm", "wo", "ffn_norm", "w_gate_up",
                                              "w_down", "moe_router", "moe_w13", "moe_w2"};
enum { LF_BQKV = 2, LF_QK_NORM = 3, LF_GATE_UP = 6, LF_DOWN = 7, LF_MOE_ROUTER = 8, LF_MOE_W2 = 10 }; /* optional fields */

static int n_weight_ids(const fl_model *m) { return 3 + NLW * m->cfg.n_layers; }
static int weight_id(const fl_model *m, const fl_weight *w) {
    if (w == &m->w.embed) return 0;
    if (w == &m->w.final_norm) return 1;
    if (w == &m->w.lm_head) return 2;
    const size_t off = (size_t)((const char *)w - (const char *)m->w.layers);
    return 3 + (int)(off / sizeof(fl_layer)) * NLW + (int)(off % sizeof(fl_layer) / sizeof(fl_weight));
}
static void weight_name(const fl_model *m, int id, char *buf, size_t cap) {
    if (id < 3) snprintf(buf, cap, "%s", id == 0 ? "embed" : id == 1 ? "final_norm" : "lm_head");
    else snprintf(buf, cap, "layers.%d.%s", (id - 3) / NLW, layer_fields[(id - 3) % NLW]);
}

/* Bytes of each part of a weight (float: all in *data). */
static fl_status weight_sizes(const fl_weight *w, const fl_qlayout *L, size_t *data, size_t *scales, size_t *zeros,
                              size_t *perm) {
    if (w->dtype == FL_QUANT) return fl_q_sizes(L, w->rows, w->cols, data, scales, zeros, perm);
    *scales = *zeros = *perm = 0;
    if (!fl_mul3_size((size_t)w->rows, (size_t)w->cols, (size_t)fl_dtype_size(w->dtype), data))
        return fl_err(FL_E_FORMAT, "the size of a [%lld, %lld] weight overflows", (long long)w->rows, (long long)w->cols);
    return FL_OK;
}

uint64_t fl_weight_bytes(const fl_weight *w) {
    size_t a = 0, b = 0, c = 0, d = 0;
    fl_qlayout L = {0};
    if (w->dtype == FL_QUANT) L = fl_q_layout_of(w);
    if (weight_sizes(w, &L, &a, &b, &c, &d) != FL_OK) { fl_err_clear(); return 0; }
    return (uint64_t)a + b + c + d;
}

/* The weight arena is allocated only once every tensor of a load has been checked against the config
 * (fl_model_load): a tiny hostile file whose config names huge dimensions costs an error, never an
 * allocation its tensors do not justify. Lays the weights out in list_weights order, each part (float data,
 * or codes, scales, offsets, perm of a quantised weight) ALIGN-ed, then inv_freq. lay[weight id] is the
 * layout of each FL_QUANT weight (decided by decide_layouts). */
static fl_status arena_alloc(fl_model *m, const fl_qlayout *lay) {
    if (m->arena_d) return FL_OK;
    fl_backend *be = m->be;
    const fl_config *cfg = &m->cfg;
    wdesc *ws = malloc(sizeof(wdesc) * (3 + FL_LAYER_WEIGHTS * (size_t)cfg->n_layers)); /* list_weights writes <= that */
    if (!ws) return fl_err(FL_E_NOMEM, "cannot allocate the model tables");
    const int nw = list_weights(m, ws);
    size_t total = 0;
    uint64_t qbytes = 0;
    int nq = 0;
    fl_status st = FL_OK;
    for (int i = 0; i < nw && st == FL_OK; i++) {
        const fl_weight *w = ws[i].w;
        size_t part[4];
        st = weight_sizes(w, &lay[weight_id(m, w)], &part[0], &part[1], &part[2], &part[3]);
        for (int k = 0; k < 4 && st == FL_OK; k++)
            if (part[k] && !add_block(&total, 1, (int64_t)part[k], 1))
                st = fl_err(FL_E_FORMAT, "config: the weights' total size overflows");
        if (st == FL_OK && w->dtype == FL_QUANT) { qbytes += (uint64_t)part[0] + part[1] + part[2] + part[3]; nq++; }
    }
    if (st == FL_OK && !add_block(&total, cfg->head_dim / 2, 1, sizeof(float)))
        st = fl_err(FL_E_FORMAT, "config: the weights' total size overflows");
    if (st == FL_OK) {
        st = be->alloc(be, total, &m->arena_d);
        if (st != FL_OK) {
            m->arena_d = NULL;
            st = fl_err_prefix(st, "allocating %.2f GiB for the weights on %s", total / 1073741824.0, be->name);
        }
    }
    if (st != FL_OK) { free(ws); return st; }
    if (be->host_memory) m->arena_huge = fl_advise_huge(m->arena_d, total, 1);
    m->arena_bytes = total;
    m->stats.bytes_weights = total;
    m->bytes_quant = qbytes;
    m->n_quant = nq;
    size_t off = 0;
    for (int i = 0; i < nw; i++) {
        fl_weight *w = ws[i].w;
        size_t part[4];
        weight_sizes(w, &lay[weight_id(m, w)], &part[0], &part[1], &part[2], &part[3]); /* checked above */
        void *p[4] = {NULL, NULL, NULL, NULL};
        for (int k = 0; k < 4; k++)
            if (part[k]) { p[k] = (char *)m->arena_d + off; add_block(&off, 1, (int64_t)part[k], 1); }
        w->data_d = p[0];
        if (w->dtype == FL_QUANT) { w->scales_d = p[1]; w->zeros_d = p[2]; w->perm_d = (int32_t *)p[3]; }
    }
    free(ws);
    if (cfg->tie_embeddings) m->w.lm_head = m->w.embed;
    m->inv_freq_d = (float *)((char *)m->arena_d + off);
    float freqs[FL_MAX_HEAD_DIM / 2] = {0}; /* rope_dims / 2 used; the rest zero */
    rope_freqs(cfg, freqs);
    return be->to_backend(be, m->inv_freq_d, freqs, (size_t)(cfg->head_dim / 2) * sizeof(float));
}

fl_status fl_model_set_quant(fl_model *m, const fl_quant_cfg *q) {
    if (m->arena_d) return fl_err(FL_E_VALUE, "quantisation settings must be given before the first load");
    if (q->scheme < FL_QS_NONE || q->scheme > FL_QS_NF4 || q->lm_head < FL_QS_NONE || q->lm_head > FL_QS_NF4)
        return fl_err(FL_E_VALUE, "unknown quantisation scheme %d / lm_head scheme %d", q->scheme, q->lm_head);
    if (q->group_size < 0 || q->lm_head_group < 0)
        return fl_err(FL_E_VALUE, "quantisation group size %d / lm_head group size %d must be >= 0 (0: the default)",
                      q->group_size, q->lm_head_group);
    m->quant = *q;
    return FL_OK;
}

/* Whether layer field f (index into layer_fields) exists under this config. */
static int layer_field_present(const fl_config *c, int f) {
    if (f == LF_GATE_UP || f == LF_DOWN) return has_dense_ffn(c);
    if (f >= LF_MOE_ROUTER && f <= LF_MOE_W2) return !!c->n_experts;
    return f == LF_BQKV ? !!c->qkv_bias : f == LF_QK_NORM ? !!c->qk_norm : 1;
}

static int layer_fields_present(const fl_config *c) {
    int n = 0;
    for (int f = 0; f < NLW; f++) n += layer_field_present(c, f);
    return n;
}

int fl_model_n_weights(const fl_model *m) {
    const fl_config *c = &m->cfg;
    return 2 + !c->tie_embeddings + c->n_layers * layer_fields_present(c);
}

fl_status fl_model_weight_info(fl_model *m, int i, const fl_weight **w, char *name, size_t cap, uint64_t *bytes) {
    const fl_config *c = &m->cfg;
    const int ng = 2 + !c->tie_embeddings, per = layer_fields_present(c);
    if (i < 0 || i >= fl_model_n_weights(m)) return fl_err(FL_E_VALUE, "weight %d out of range", i);
    int id;
    if (i < ng) id = i;
    else {
        const int l = (i - ng) / per;
        int k = (i - ng) % per, f = 0; /* the k-th present field */
        for (;; f++)
            if (layer_field_present(c, f) && k-- == 0) break;
        id = 3 + NLW * l + f;
    }
    const fl_weight *wt = id == 0 ? &m->w.embed : id == 1 ? &m->w.final_norm : id == 2 ? &m->w.lm_head
                                   : (const fl_weight *)&m->w.layers[(id - 3) / NLW] + (id - 3) % NLW;
    *w = wt;
    weight_name(m, id, name, cap);
    *bytes = fl_weight_bytes(wt);
    return FL_OK;
}

static const char *src_type_name(const fl_src_tensor *s) {
    if (s->kind == FL_SRC_GGML) return fl_ggml_type_name(s->type);
    return s->type >= 0 && s->type < FL_DTYPE_PLAIN_COUNT ? fl_dtype_table[s->type].st_name : "?";
}

static int ggml_is_float(int t) { return t == GGML_F32 || t == GGML_F16 || t == GGML_BF16 || t == GGML_F64; }

/* One item's plan: its job (the float path and the backend's loader use it as before), its destination weight
 * and first row, and what the source is on its own. */
enum { SRC_FLOAT = 0, SRC_QUANT, SRC_SCHEME };
typedef struct {
    fl_load_job job;
    const fl_load_item *it;
    fl_weight *w;
    int64_t row0;
    int wid;
    int kind;          /* SRC_FLOAT: float values (plain, GGUF float, or GGUF blocks to dequantise);
                          SRC_QUANT: GGUF blocks / GPTQ / AWQ kept quantised (layout L);
                          SRC_SCHEME: float values to quantise at load with `scheme` (layout L) */
    int scheme;
    fl_qlayout L;
    fl_packed_src pk;  /* GPTQ / AWQ items */
    uint64_t nbytes;   /* checkpoint bytes this item reads (progress, bytes_read) */
} qplan;

static void shape_str(const fl_src_tensor *s, char *got, size_t cap) {
    char *p = got;
    got[0] = 0;
    for (int i = 0; i < s->ndim && i < 4; i++) p += snprintf(p, (size_t)(got + cap - p), i ? ", %lld" : "%lld", (long long)s->shape[i]);
}

/* A GPTQ / AWQ companion (or qweight itself): dtype, shape [d0, d1] (d1 < 0: 1-D [d0]) and byte count. */
static fl_status check_packed_tensor(const fl_src_tensor *t, const char *role, fl_dtype dt, int64_t d0, int64_t d1,
                                     const fl_src_tensor *qw) {
    char got[96], where[600] = "";
    if (t->file && qw->file && strcmp(t->file, qw->file)) snprintf(where, sizeof where, " in %s", t->file);
    if (!t->data && t->nbytes) return fl_err(FL_E_FORMAT, "%s '%s'%s has no data", role, t->name ? t->name : "?", where);
    if (t->kind != FL_SRC_PLAIN || t->type != dt)
        return fl_err(FL_E_FORMAT, "%s '%s'%s is %s, not %s", role, t->name ? t->name : "?", where, src_type_name(t),
                      fl_dtype_table[dt].st_name);
    const int nd = d1 < 0 ? 1 : 2;
    if (t->ndim != nd || t->shape[0] != d0 || (nd == 2 && t->shape[1] != d1)) {
        shape_str(t, got, sizeof got);
        if (nd == 1)
            return fl_err(FL_E_FORMAT, "%s '%s'%s has shape [%s], expected [%lld]", role, t->name ? t->name : "?", where, got,
                          (long long)d0);
        return fl_err(FL_E_FORMAT, "%s '%s'%s has shape [%s], expected [%lld, %lld]", role, t->name ? t->name : "?", where,
                      got, (long long)d0, (long long)d1);
    }
    const uint64_t need = (uint64_t)d0 * (uint64_t)(nd == 2 ? d1 : 1) * (uint64_t)fl_dtype_size(dt); /* bounded by the config */
    if (t->nbytes != need)
        return fl_err(FL_E_FORMAT, "%s '%s'%s holds %llu bytes, its shape needs %llu (truncated?)", role, t->name ? t->name : "?",
                      where, (unsigned long long)t->nbytes, (unsigned long long)need);
    return FL_OK;
}

/* GPTQ / AWQ item: every tensor's dtype, shape and size against the config's [rows, cols] and the packing,
 * then fl_q_layout_for_packed (bits, group size, g_idx, zero points). */
static fl_status plan_packed(const fl_load_item *it, int64_t rows, int64_t cols, fl_packed_src *pk, fl_qlayout *L) {
    const char *pn = it->packing == FL_PACK_AWQ ? "AWQ" : it->packing == FL_PACK_GPTQ ? "GPTQ" : NULL;
    if (!pn) return fl_err(FL_E_VALUE, "packing %d is neither GPTQ nor AWQ", it->packing);
    const int bits = it->qbits;
    if (it->packing == FL_PACK_AWQ && bits != 4)
        return fl_err(FL_E_UNSUPPORTED, "AWQ with bits=%d is not supported (AWQ's GEMM packing is 4-bit)", bits);
    if (bits != 4 && bits != 8) return fl_err(FL_E_UNSUPPORTED, "GPTQ with bits=%d is not supported (4 and 8 are)", bits);
    const int per = 32 / bits;
    if (rows % per) return fl_err(FL_E_FORMAT, "%s: out_features %lld is not a multiple of %d", pn, (long long)rows, per);
    if (it->packing == FL_PACK_GPTQ && cols % per)
        return fl_err(FL_E_FORMAT, "GPTQ: in_features %lld is not a multiple of %d", (long long)cols, per);
    const fl_src_tensor *qw = &it->src;
    if (it->packing == FL_PACK_GPTQ) FL_TRY(check_packed_tensor(qw, "qweight", FL_I32, cols / per, rows, qw));
    else FL_TRY(check_packed_tensor(qw, "qweight", FL_I32, cols, rows / per, qw));
    /* the number of groups is what scales holds; its shape must be [ngroups, rows] */
    const int64_t ng = it->scales.ndim == 2 ? it->scales.shape[0] : -1;
    if (ng <= 0 || ng > cols) {
        char got[96];
        shape_str(&it->scales, got, sizeof got);
        return fl_err(FL_E_FORMAT, "scales '%s' has shape [%s], expected [groups, %lld] with 1 <= groups <= %lld",
                      it->scales.name ? it->scales.name : "?", got, (long long)rows, (long long)cols);
    }
    /* float16 as the packers write it; bfloat16 / float32 as AutoGPTQ's pack leaves them for such a layer */
    const fl_dtype sdt = it->scales.kind == FL_SRC_PLAIN && (it->scales.type == FL_BF16 || it->scales.type == FL_F32)
                             ? (fl_dtype)it->scales.type : FL_F16;
    if (it->scales.data && (it->scales.kind != FL_SRC_PLAIN || (sdt == FL_F16 && it->scales.type != FL_F16)))
        return fl_err(FL_E_FORMAT, "scales '%s'%s%s is %s, not F16, BF16 or F32", it->scales.name ? it->scales.name : "?",
                      it->scales.file && qw->file && strcmp(it->scales.file, qw->file) ? " in " : "",
                      it->scales.file && qw->file && strcmp(it->scales.file, qw->file) ? it->scales.file : "",
                      src_type_name(&it->scales));
    FL_TRY(check_packed_tensor(&it->scales, "scales", sdt, ng, rows, qw));
    FL_TRY(check_packed_tensor(&it->qzeros, "qzeros", FL_I32, ng, rows / per, qw));
    if (it->g_idx.data) FL_TRY(check_packed_tensor(&it->g_idx, "g_idx", FL_I32, cols, -1, qw));
    *pk = (fl_packed_src){.packing = it->packing, .bits = bits, .group_size = it->qgroup, .zero_offset = it->qzero_offset,
                          .qweight = qw->data, .qzeros = it->qzeros.data, .scales = it->scales.data, .scales_type = sdt,
                          .g_idx = it->g_idx.data,
                          .rows = rows, .cols = cols, .ngroups = ng};
    return fl_q_layout_for_packed(pk, L);
}

/* Quantised at load (fl_model_set_quant's scheme): the linear layers, experts included (not the router). */
static int is_linear_slot(int slot) {
    return slot == FL_SLOT_Q || slot == FL_SLOT_K || slot == FL_SLOT_V || slot == FL_SLOT_O || slot == FL_SLOT_GATE ||
           slot == FL_SLOT_UP || slot == FL_SLOT_DOWN || slot == FL_SLOT_QKV || slot == FL_SLOT_GATE_UP ||
           (is_moe_slot(slot) && slot != FL_SLOT_MOE_ROUTER);
}

/* A LoRA factor: a float tensor [d0, d1] whose bytes match its shape. */
static fl_status check_lora_tensor(const fl_src_tensor *t, const char *role, int64_t d0, int64_t d1, const char *d0_is,
                                   const char *d1_is) {
    char got[96];
    const char *nm = t->name ? t->name : "?", *fn = t->file ? t->file : "?";
    if (!t->data && t->nbytes) return fl_err(FL_E_FORMAT, "%s: LoRA %s '%s' has no data", fn, role, nm);
    if (t->kind != FL_SRC_PLAIN || (t->type != FL_F32 && t->type != FL_F16 && t->type != FL_BF16 && t->type != FL_F64))
        return fl_err(FL_E_FORMAT, "%s: LoRA %s '%s' is %s, not a float tensor", fn, role, nm, src_type_name(t));
    if (t->ndim != 2 || t->shape[0] != d0 || t->shape[1] != d1) {
        shape_str(t, got, sizeof got);
        return fl_err(FL_E_FORMAT, "%s: LoRA %s '%s' has shape [%s], expected [%lld, %lld] (%s, %s)", fn, role, nm, got,
                      (long long)d0, (long long)d1, d0_is, d1_is);
    }
    const uint64_t need = (uint64_t)d0 * (uint64_t)d1 * (uint64_t)fl_dtype_size((fl_dtype)t->type); /* d0, d1 bounded */
    if (t->nbytes != need)
        return fl_err(FL_E_FORMAT, "%s: LoRA %s '%s' holds %llu bytes, its shape needs %llu (truncated?)", fn, role, nm,
                      (unsigned long long)t->nbytes, (unsigned long long)need);
    return FL_OK;
}

#define FL_LORA_MAX_RANK 65536

/* A LoRA item: the factors fit the rows the item fills ([rows, cols]); the base is a plain float tensor (a GGUF's
 * blocks or a GPTQ / AWQ packing would have to be dequantised and quantised again: refused, see fastload/lora.py). */
static fl_status check_lora(const fl_load_item *it, int64_t rows, int64_t cols, int is_vec) {
    if (is_vec) return fl_err(FL_E_VALUE, "a LoRA adapter cannot target a vector (norm or bias)");
    if (it->packing) return fl_err(FL_E_UNSUPPORTED, "LoRA on a GPTQ / AWQ-quantised weight is not supported");
    if (it->src.kind != FL_SRC_PLAIN || it->unpermute_heads > 0)
        return fl_err(FL_E_UNSUPPORTED, "LoRA on a GGUF tensor is not supported");
    if (!isfinite(it->lora_scale)) return fl_err(FL_E_VALUE, "LoRA scale %g is not finite", (double)it->lora_scale);
    const int64_t r = it->lora_a.ndim == 2 ? it->lora_a.shape[0] : -1;
    if (r < 1 || r > FL_LORA_MAX_RANK) {
        char got[96];
        shape_str(&it->lora_a, got, sizeof got);
        return fl_err(FL_E_FORMAT, "%s: LoRA A '%s' has shape [%s]: expected [r, %lld] with 1 <= r <= %d",
                      it->lora_a.file ? it->lora_a.file : "?", it->lora_a.name ? it->lora_a.name : "?", got,
                      (long long)cols, FL_LORA_MAX_RANK);
    }
    FL_TRY(check_lora_tensor(&it->lora_a, "A", r, cols, "r", "in_features"));
    return check_lora_tensor(&it->lora_b, "B", rows, r, "out_features", "r");
}

/* Check one item against the config and describe its source and destination. Errors name file and tensor. */
static fl_status plan_one(fl_model *m, const fl_load_item *it, qplan *qp) {
    const fl_src_tensor *s = &it->src;
    fl_weight *w = NULL; int64_t row0 = 0, rows = 0, cols = 0; int is_vec = 0;
    memset(qp, 0, sizeof *qp);
    qp->it = it;
    fl_status st = slot_target(m, it->slot, it->layer, it->expert, &w, &row0, &rows, &cols, &is_vec);
    if (st != FL_OK) goto out;
    /* the fused expert tensors are 3-D [E, rows / E, cols] (transformers 5); every other weight 2-D or 1-D */
    const int64_t lead = it->slot == FL_SLOT_MOE_W13_ALL || it->slot == FL_SLOT_MOE_W2_ALL ? m->cfg.n_experts : 0;
    qp->w = w; qp->row0 = row0; qp->wid = weight_id(m, w);
    qp->nbytes = s->nbytes;
    const int hp = it->unpermute_heads;
    if (it->packing && is_moe_slot(it->slot)) {
        st = fl_err(FL_E_UNSUPPORTED, "GPTQ / AWQ experts of a Mixture of Experts are not supported");
        goto out;
    }
    if (it->packing) {
        if (is_vec) { st = fl_err(FL_E_VALUE, "a GPTQ / AWQ tensor cannot fill a vector (norm or bias)"); goto out; }
        if (hp > 0) { st = fl_err(FL_E_VALUE, "GPTQ / AWQ rows cannot be un-permuted"); goto out; }
        st = plan_packed(it, rows, cols, &qp->pk, &qp->L);
        if (st != FL_OK) goto out;
        qp->kind = SRC_QUANT;
        qp->nbytes += it->qzeros.nbytes + it->scales.nbytes + (qp->pk.g_idx ? it->g_idx.nbytes : 0);
    } else {
        int shape_ok = is_vec ? (s->ndim == 1 && s->shape[0] == rows)
                     : lead ? (s->ndim == 3 && s->shape[0] == lead && s->shape[1] == rows / lead && s->shape[2] == cols)
                            : (s->ndim == 2 && s->shape[0] == rows && s->shape[1] == cols);
        if (!shape_ok) {
            char got[96];
            shape_str(s, got, sizeof got);
            st = lead ? fl_err(FL_E_FORMAT, "shape [%s] does not match the config: expected [%lld, %lld, %lld]", got,
                               (long long)lead, (long long)(rows / lead), (long long)cols)
               : is_vec ? fl_err(FL_E_FORMAT, "shape [%s] does not match the config: expected [%lld]", got, (long long)rows)
                        : fl_err(FL_E_FORMAT, "shape [%s] does not match the config: expected [%lld, %lld]", got,
                                 (long long)rows, (long long)cols);
            goto out;
        }
        const uint64_t n = (uint64_t)rows * (uint64_t)cols;
        uint64_t need;
        if (s->kind == FL_SRC_GGML) {
            need = fl_ggml_nbytes(s->type, n);
            if (!need || !fl_ggml_nbytes(s->type, (uint64_t)cols)) {
                st = fl_err(FL_E_UNSUPPORTED, "GGML type %s cannot be dequantised in rows of %lld", src_type_name(s), (long long)cols);
                goto out;
            }
            if (!fl_ggml_can_dequant(s->type)) {
                st = fl_err(FL_E_UNSUPPORTED, "GGML type %s is not supported (supported: F32, F16, BF16, F64, Q4_0, Q4_1, "
                            "Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K; kept quantised: Q4_0, Q4_1, Q5_0, Q5_1, "
                            "Q8_0, Q4_K, Q5_K, Q6_K)", src_type_name(s));
                goto out;
            }
        } else {
            if (s->type != FL_F32 && s->type != FL_F16 && s->type != FL_BF16 && s->type != FL_F64) {
                st = fl_err(FL_E_UNSUPPORTED, "dtype %s cannot be a weight (floating-point types only)", src_type_name(s));
                goto out;
            }
            need = n * (uint64_t)fl_dtype_size((fl_dtype)s->type);
        }
        if (need != s->nbytes) {
            st = fl_err(FL_E_FORMAT, "holds %llu bytes, %s[%lld x %lld] needs %llu", (unsigned long long)s->nbytes,
                        src_type_name(s), (long long)rows, (long long)cols, (unsigned long long)need);
            goto out;
        }
        if (hp > 0 && (rows % hp || (rows / hp) % 2)) {
            st = fl_err(FL_E_VALUE, "cannot un-permute %lld rows over %d heads", (long long)rows, hp);
            goto out;
        }
        if (s->where != FL_SRC_FILE && (s->kind != FL_SRC_PLAIN || hp > 0)) {
            st = fl_err(FL_E_VALUE, "a tensor from memory must be a plain float tensor");
            goto out;
        }
        if (s->where == FL_SRC_BACKEND && !m->be->host_memory && !m->be->convert_d) {
            st = fl_err(FL_E_UNSUPPORTED, "%s cannot read a tensor from its own memory", m->be->name);
            goto out;
        }
        /* What the source becomes on its own (decide_layouts then settles each weight from all its parts). */
        const int gguf_blocks = s->kind == FL_SRC_GGML && !ggml_is_float(s->type);
        if (gguf_blocks && !is_vec && !m->quant.gguf_dequantize && fl_q_layout_for_ggml(s->type, &qp->L) == FL_OK) {
            qp->kind = SRC_QUANT;  /* GGUF blocks stay quantised, embeddings included (a tied model's LM head) */
        } else if (gguf_blocks) {
            fl_err_clear();
            qp->kind = SRC_FLOAT;  /* dequantised (gguf_dequantize, or a type that is not kept quantised: Q2_K, Q3_K, Q8_K) */
        } else if (!is_vec && ((is_linear_slot(it->slot) && m->quant.scheme != FL_QS_NONE) ||
                               (it->slot == FL_SLOT_LM_HEAD && m->quant.lm_head != FL_QS_NONE))) {
            qp->kind = SRC_SCHEME;
            qp->scheme = it->slot == FL_SLOT_LM_HEAD ? m->quant.lm_head : m->quant.scheme;
            st = fl_q_layout_for_scheme(qp->scheme, it->slot == FL_SLOT_LM_HEAD ? m->quant.lm_head_group : m->quant.group_size,
                                        cols, &qp->L);
            if (st != FL_OK) goto out;
        } else {
            qp->kind = SRC_FLOAT;
        }
    }
    if (it->lora_a.data && (st = check_lora(it, rows, cols, is_vec)) != FL_OK) goto out;
    if (it->lora_a.data) qp->nbytes += it->lora_a.nbytes + it->lora_b.nbytes;
    /* before the arena exists (the checking pass of fl_model_load) there is no destination yet; a quantised
     * destination's rows are addressed through w and row0, not dst_d */
    const int fdst = w->data_d && w->dtype != FL_QUANT;
    qp->job = (fl_load_job){.src = s, .dst_d = fdst ? (char *)w->data_d + (size_t)row0 * (size_t)cols * (size_t)fl_dtype_size(w->dtype) : NULL,
                            .dst_dtype = w->dtype, .rows = rows, .cols = cols, .unpermute_heads = hp};
out:
    if (st != FL_OK)
        fl_err_prefix(st, "%s: tensor '%s' (%s)", s->file ? s->file : "?", s->name ? s->name : "?",
                      it->slot >= 0 && it->slot < FL_SLOT_COUNT ? fl_slot_names[it->slot] : "?");
    return st;
}

static int layout_eq(const fl_qlayout *a, const fl_qlayout *b) {
    return a->bits == b->bits && a->group_size == b->group_size && a->sdtype == b->sdtype && a->has_zeros == b->has_zeros &&
           a->code == b->code && a->has_perm == b->has_perm;
}

/* Two parts of one fused weight with act order must permute the columns the same way (their g_idx are equal). */
static int same_gidx(const qplan *a, const qplan *b) {
    if (!a->pk.g_idx || !b->pk.g_idx || a->pk.cols != b->pk.cols || a->L.group_size != b->L.group_size) return 0;
    return !memcmp(a->pk.g_idx, b->pk.g_idx, (size_t)a->pk.cols * 4);
}

static fl_status err_item(fl_status st, const qplan *p) {
    const fl_src_tensor *s = &p->it->src;
    return fl_err_prefix(st, "%s: tensor '%s' (%s)", s->file ? s->file : "?", s->name ? s->name : "?",
                         fl_slot_names[p->it->slot]);
}

/* The ggml type of a part kept quantised from GGUF blocks, or -1 (a float part, GPTQ / AWQ, quantised at load) */
static int gguf_part_type(const qplan *p) {
    return p->kind == SRC_QUANT && !p->it->packing && p->it->src.kind == FL_SRC_GGML ? p->it->src.type : -1;
}
static int is_kquant(int t) { return t == GGML_Q4_K || t == GGML_Q5_K || t == GGML_Q6_K; }

/* K scales (csrc/quant.h) are read by the CPU backend's kernels only; FASTLOAD_CPU_KSCALE=0 keeps float32 scales */
static int kscales_ok(const fl_model *m) {
    const char *e = getenv("FASTLOAD_CPU_KSCALE");
    return m->be && m->be->name && !strcmp(m->be->name, "cpu") && !(e && !strcmp(e, "0"));
}

/* Split codes (csrc/quant.h: 5- and 6-bit GGUF codes in 5 / 6 bits), on the CPU: they hold a Q6_K / Q5_K_M file in its
 * own bytes (1.30x / 1.54x with a byte each). Row-major they decode slower than bytes, the high bits costing more
 * instructions than the bytes save (TinyLlama-1.1B shape, 2 threads: Q6_K 0.64x llama.cpp against 0.90x; 2026-12-05),
 * so by default only the weights fl_model_interleave will interleave take them: the interleaved kernel shares the
 * high-bit work among 8 rows and reads them faster than bytes (Q6_K 28.9 -> 34.9 tok/s, Q4_K_M 35.3 -> 37.3 in one
 * A/B; benchmarks/results/cpu-split-codes-2026-12-05/). FASTLOAD_CPU_CODES56=1: every eligible weight, =0: none. */
static int interleave_candidate(const fl_model *m, const fl_weight *w);
/* Whether fl_model_interleave runs at all: a backend that interleaves, and FASTLOAD_CPU_INTERLEAVE not 0 */
static int interleave_on(const fl_model *m) {
    const char *e = getenv("FASTLOAD_CPU_INTERLEAVE");
    return m->be && m->be->interleave_weight && !(e && !strcmp(e, "0"));
}
static int codes56_ok(const fl_model *m, const fl_weight *w) {
    const char *e = getenv("FASTLOAD_CPU_CODES56");
    if (!m->be || !m->be->name || strcmp(m->be->name, "cpu") || (e && !strcmp(e, "0"))) return 0;
    if (e && !strcmp(e, "1")) return 1;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) /* the CPU backend's QDOT build: qi_rows */
    /* default: split codes where the weight will be interleaved (rows a multiple of 8, not the embedding) */
    return interleave_on(m) && w->rows % 8 == 0 && interleave_candidate(m, w);
#else
    return 0;
#endif
}

/* K scales with offsets for weight wid: every GGUF part's blocks fit them (fl_q_ggml_ksym_fits: a Q6_K part's -32 d in
 * fp16), checked on the mapped bytes before anything is loaded; otherwise the weight keeps float32 scales */
static int ksym_offsets_fit(const qplan *ps, int n, int wid) {
    for (int i = 0; i < n; i++) {
        const qplan *p = &ps[i];
        if (p->wid != wid || gguf_part_type(p) < 0) continue;
        const fl_src_tensor *s = &p->it->src;
        uint64_t nw = 1;
        for (int d = 0; d < s->ndim; d++) nw *= (uint64_t)s->shape[d];
        if (!s->data || !fl_q_ggml_ksym_fits(s->type, s->data, nw)) return 0;
    }
    return 1;
}

/* First load: settle each weight's dtype / layout from the parts that fill it (lay[weight id]).
 *   any float part, scheme parts mixed with kept-quantised parts, or different code books  -> the float dtype
 *   parts quantised at load -> the scheme's layout; kept-quantised parts -> their common layout
 * Act-order permutations of fused parts must be equal. */
static fl_status decide_layouts(fl_model *m, const qplan *ps, int n, fl_qlayout *lay) {
    const int nid = n_weight_ids(m);
    typedef struct { int nfloat, nquant, nscheme, mixed, first, nk, ngguf, maxcb; } acc_t;
    acc_t *acc = calloc((size_t)nid, sizeof *acc);
    if (!acc) return fl_err(FL_E_NOMEM, "cannot allocate the load plan");
    for (int i = 0; i < nid; i++) acc[i].first = -1;
    for (int i = 0; i < n; i++) {
        const qplan *p = &ps[i];
        acc_t *a = &acc[p->wid];
        if (p->kind == SRC_FLOAT) { a->nfloat++; continue; }
        if (p->kind == SRC_QUANT) a->nquant++; else a->nscheme++;
        const int gt = gguf_part_type(p);
        if (gt >= 0) { /* split codes: the widest part */
            const int cb = fl_q_ggml_code_bits(gt);
            a->ngguf++;
            if (cb > a->maxcb) a->maxcb = cb;
        }
        if (is_kquant(gt)) a->nk++; /* K scales (quant.h) need every part a K-quant */
        if (a->first < 0) { a->first = i; lay[p->wid] = p->L; continue; }
        fl_qlayout *L = &lay[p->wid];
        if (p->kind == SRC_SCHEME) { if (!layout_eq(L, &p->L)) a->mixed = 1; }
        else if (L->code != p->L.code) a->mixed = 1;
        else *L = fl_q_common_layout(L, &p->L);
    }
    fl_status st = FL_OK;
    for (int i = 0; i < n && st == FL_OK; i++) {
        const qplan *p = &ps[i];
        const acc_t *a = &acc[p->wid];
        const int quant = !a->nfloat && !a->mixed && !(a->nquant && a->nscheme) && (a->nquant || a->nscheme);
        if (!quant) { p->w->dtype = m->wdtype; continue; }
        const fl_qlayout *L = &lay[p->wid];
        if (L->has_perm && i != a->first) {
            const qplan *f = &ps[a->first];
            if (!same_gidx(f, p)) {
                char wn[48];
                weight_name(m, p->wid, wn, sizeof wn);
                st = fl_err(FL_E_UNSUPPORTED, "%s: tensors '%s' and '%s', fused into %s, have different act-order "
                            "permutations (g_idx): fastload needs one column order per fused weight",
                            f->it->src.file ? f->it->src.file : "?", f->it->src.name ? f->it->src.name : "?",
                            p->it->src.name ? p->it->src.name : "?", wn);
                break;
            }
        }
        fl_weight *w = p->w;
        /* every part a K-quant: the file's two-level scales. Parts of different groups or forms (Q4_K_M's q|k|v: Q4_K
         * with a Q6_K v) share the common layout's smallest group (a group-32 part's scales repeated) and offsets if
         * any part has them (a symmetric part's as sub-scale x -off d: quant.c write_row); float32 scales there had
         * held such a weight in 10 bits a weight, K scales 7.1 (TinyLlama-1.1B Q4_K_M: 10 of 22 layers) */
        if (i == a->first && a->nk == a->nquant && !a->nscheme && kscales_ok(m) && w->cols % FL_KS_SUPER == 0 &&
            (!L->has_zeros || ksym_offsets_fit(ps, n, p->wid)))
            lay[p->wid].sdtype = FL_I8;
        if (i == a->first && a->ngguf == a->nquant && !a->nscheme && (a->maxcb == 5 || a->maxcb == 6) && L->bits == 8 &&
            L->code == FL_QCODE_INT && !L->has_perm && codes56_ok(m, w) && w->cols % (a->maxcb == 6 ? 128 : 256) == 0)
            lay[p->wid].bits = a->maxcb; /* GGUF parts of at most 6 bits: split codes, not a byte each */
        w->dtype = FL_QUANT;
        w->bits = L->bits;
        w->group_size = L->group_size;
        w->sdtype = L->sdtype;
        w->code = L->code;
        if ((st = fl_q_check(L, w->rows, w->cols)) != FL_OK) st = err_item(st, p);
    }
    free(acc);
    return st;
}

/* Later loads into an existing arena: the weights' layouts are fixed; each part must fit its weight. */
static fl_status check_fits(const qplan *p) {
    const fl_weight *w = p->w;
    if (w->dtype != FL_QUANT) return FL_OK; /* any source converts to the float dtype */
    const fl_qlayout W = fl_q_layout_of(w);
    int ok;
    if (p->kind == SRC_FLOAT) ok = 0;
    else if (W.sdtype == FL_I8 || W.bits == 5 || W.bits == 6) { /* K scales or split codes (quant.h): GGUF parts only */
        const int t = gguf_part_type(p), gg = t >= 0;
        fl_qlayout P = p->L;
        if (gg && (W.bits == 5 || W.bits == 6)) P.bits = fl_q_ggml_code_bits(t);
        if (W.sdtype == FL_I8) /* a K-quant part whose groups and form the weight holds (write_row checks again) */
            ok = is_kquant(t) && P.group_size % W.group_size == 0 && (!P.has_zeros || W.has_zeros) && P.bits <= W.bits;
        else {
            const fl_qlayout c = fl_q_common_layout(&W, &P);
            ok = gg && W.code == P.code && W.has_perm == P.has_perm && layout_eq(&c, &W);
        }
    }
    else if (p->kind == SRC_SCHEME) ok = layout_eq(&W, &p->L);
    else {
        const fl_qlayout c = fl_q_common_layout(&W, &p->L);
        ok = W.code == p->L.code && W.has_perm == p->L.has_perm && layout_eq(&c, &W);
    }
    if (ok) return FL_OK;
    return err_item(fl_err(FL_E_UNSUPPORTED, "the weight it fills was made %s by an earlier load and cannot hold this tensor "
                           "exactly", "quantised"), p);
}

/* Source row feeding destination row r: llama.cpp stores q/k rows of each head interleaved
 * (GGUF row h*hd + 2i + j holds Hugging Face row h*hd + j*hd/2 + i). */
static inline int64_t src_row(const fl_load_job *j, int64_t r) {
    if (j->unpermute_heads <= 0) return r;
    const int64_t hd = j->rows / j->unpermute_heads, h = r / hd, within = r % hd;
    return h * hd + 2 * (within % (hd / 2)) + within / (hd / 2);
}

/* LoRA merge at load (fl_load_item.lora_*). Why here, per item, and not as a pass over the finished model: the
 * rows an item fills are exactly the rows its adapter changes (q / k / v land in the fused wqkv at their own row
 * offsets, gate / up in w_gate_up), and at this point the weight is still float: a float destination is merged in
 * place right after it lands (the backend's add_lowrank: cuBLAS on CUDA, a C loop on the CPU); a weight quantised
 * at load is merged in float32 before the quantiser sees it (host rows in quant_job, the device scratch in
 * quantize_on_device), so int8 / int4 / nf4 quantise W + scale * B @ A, never W alone plus a float correction.
 * A post-load pass would find such weights already quantised. */

/* The item's A [r, cols] and B [rows, r] as float32 host arrays; a NaN / inf in either is an error naming it. */
static fl_status lora_host_factors(const fl_load_item *it, int64_t rows, int64_t cols, float **a_out, float **b_out) {
    const int64_t r = it->lora_a.shape[0];
    float *a = fl_malloc((size_t)(r * cols) * sizeof(float)), *b = fl_malloc((size_t)(rows * r) * sizeof(float));
    fl_status st = !a || !b ? fl_err(FL_E_NOMEM, "cannot allocate the LoRA factors") : FL_OK;
    if (st == FL_OK) st = fl_convert(a, FL_F32, it->lora_a.data, (fl_dtype)it->lora_a.type, (size_t)(r * cols));
    if (st == FL_OK) st = fl_convert(b, FL_F32, it->lora_b.data, (fl_dtype)it->lora_b.type, (size_t)(rows * r));
    for (int f = 0; f < 2 && st == FL_OK; f++) {
        const float *x = f ? b : a;
        const size_t n = (size_t)(f ? rows * r : r * cols);
        for (size_t i = 0; i < n; i++)
            if (!isfinite(x[i])) {
                const fl_src_tensor *t = f ? &it->lora_b : &it->lora_a;
                st = fl_err(FL_E_VALUE, "%s: LoRA %s '%s' holds a non-finite value (%g at element %zu)",
                            t->file ? t->file : "?", f ? "B" : "A", t->name ? t->name : "?", (double)x[i], i);
                break;
            }
    }
    if (st != FL_OK) { fl_free(a); fl_free(b); return st; }
    *a_out = a;
    *b_out = b;
    return FL_OK;
}

/* w_d: the item's rows in backend memory, dtype dt (the weight's float dtype, or float32 scratch before quantising). */
static fl_status lora_apply(fl_backend *be, const qplan *p, void *w_d, fl_dtype dt) {
    const fl_load_item *it = p->it;
    const int64_t rows = p->job.rows, cols = p->job.cols, r = it->lora_a.shape[0];
    if (!be->add_lowrank) return fl_err(FL_E_UNSUPPORTED, "%s cannot merge LoRA adapters (no add_lowrank op)", be->name);
    float *a = NULL, *b = NULL;
    fl_status st = lora_host_factors(it, rows, cols, &a, &b);
    if (st == FL_OK && be->host_memory) {
        st = be->add_lowrank(be, w_d, dt, rows, cols, b, a, (int)r, it->lora_scale);
    } else if (st == FL_OK) {
        const size_t na = (size_t)(r * cols) * sizeof(float), nb = (size_t)(rows * r) * sizeof(float);
        void *dev = NULL;
        st = be->alloc(be, na + nb, &dev);
        if (st == FL_OK) st = be->to_backend(be, dev, a, na);
        if (st == FL_OK) st = be->to_backend(be, (char *)dev + na, b, nb);
        if (st == FL_OK) st = be->add_lowrank(be, w_d, dt, rows, cols, (const float *)((char *)dev + na), (const float *)dev,
                                               (int)r, it->lora_scale);
        if (st == FL_OK) st = be->sync(be);
        if (dev) be->free(be, dev);
    }
    fl_free(a);
    fl_free(b);
    if (st != FL_OK)
        fl_err_prefix(st, "merging LoRA '%s' / '%s' (scale %g)", it->lora_a.name ? it->lora_a.name : "?",
                      it->lora_b.name ? it->lora_b.name : "?", (double)it->lora_scale);
    return st;
}

/* Generic path, float destination: convert / dequantise on the host (into a staging buffer unless the backend's
 * memory is host memory), then to_backend. Runs on worker threads. */
static fl_status convert_job(fl_backend *be, const fl_load_job *j) {
    const fl_src_tensor *s = j->src;
    const size_t es = (size_t)fl_dtype_size(j->dst_dtype), row_out = (size_t)j->cols * es;
    const uint64_t row_in = s->kind == FL_SRC_GGML ? fl_ggml_nbytes(s->type, (uint64_t)j->cols)
                                                   : (uint64_t)j->cols * (uint64_t)fl_dtype_size((fl_dtype)s->type);
    const int host_direct = be->host_memory;
    char *stage = host_direct ? j->dst_d : fl_malloc((size_t)j->rows * row_out);
    if (!stage) return fl_err(FL_E_NOMEM, "cannot allocate a staging buffer");
    fl_status st = FL_OK;
    for (int64_t r = 0; r < j->rows && st == FL_OK; r++) {
        const void *src = (const char *)s->data + (size_t)src_row(j, r) * row_in;
        void *dst = stage + (size_t)r * row_out;
        st = s->kind == FL_SRC_GGML ? fl_ggml_dequant(s->type, src, (uint64_t)j->cols, dst, j->dst_dtype)
                                    : fl_convert(dst, j->dst_dtype, src, (fl_dtype)s->type, (size_t)j->cols);
    }
    if (st == FL_OK && !host_direct) st = be->to_backend(be, j->dst_d, stage, (size_t)j->rows * row_out);
    if (!host_direct) fl_free(stage);
    return st;
}

/* Rows [row0, row0 + rows) of a quantised weight as a weight of their own (the same layout; perm only in the
 * view of row 0, so that the parts of a fused weight write it once). */
static fl_weight qview(const fl_weight *w, int64_t row0, int64_t rows) {
    fl_weight v = *w;
    const size_t cb = (size_t)w->cols * (size_t)w->bits / 8, sb = fl_q_srow_bytes(w->cols, w->group_size, w->sdtype);
    v.rows = rows;
    v.data_d = (char *)w->data_d + (size_t)row0 * cb;
    v.scales_d = (char *)w->scales_d + (size_t)row0 * sb;
    v.zeros_d = w->zeros_d ? (char *)w->zeros_d + (size_t)row0 * sb : NULL;
    v.perm_d = row0 == 0 ? w->perm_d : NULL;
    return v;
}

/* A host copy of the view's layout (staging for a backend whose memory is not host memory, or a temporary). */
static fl_status qhost_alloc(const fl_weight *v, const fl_qlayout *L, fl_weight *h, void **block, size_t part[4]) {
    FL_TRY(fl_q_sizes(L, v->rows, v->cols, &part[0], &part[1], &part[2], &part[3]));
    const size_t a[4] = {(part[0] + 63) & ~(size_t)63, (part[1] + 63) & ~(size_t)63, (part[2] + 63) & ~(size_t)63, part[3]};
    char *b = fl_malloc(a[0] + a[1] + a[2] + a[3]);
    if (!b) return fl_err(FL_E_NOMEM, "cannot allocate a staging buffer of %.1f MiB", (a[0] + a[1] + a[2] + a[3]) / 1048576.0);
    *h = *v;
    h->dtype = FL_QUANT; h->bits = L->bits; h->group_size = L->group_size; h->sdtype = L->sdtype; h->code = L->code;
    h->data_d = b;
    h->scales_d = b + a[0];
    h->zeros_d = L->has_zeros ? b + a[0] + a[1] : NULL;
    h->perm_d = L->has_perm ? (int32_t *)(b + a[0] + a[1] + a[2]) : NULL;
    *block = b;
    return FL_OK;
}

/* Float rows of a source (plain or GGUF float) as float32, un-permuted: rows [r, r + k) of the job. */
static fl_status rows_f32(const fl_load_job *j, int64_t r, int64_t k, float *out) {
    const fl_src_tensor *s = j->src;
    const uint64_t row_in = s->kind == FL_SRC_GGML ? fl_ggml_nbytes(s->type, (uint64_t)j->cols)
                                                   : (uint64_t)j->cols * (uint64_t)fl_dtype_size((fl_dtype)s->type);
    for (int64_t i = 0; i < k; i++) {
        const void *src = (const char *)s->data + (size_t)src_row(j, r + i) * row_in;
        float *dst = out + (size_t)i * (size_t)j->cols;
        FL_TRY(s->kind == FL_SRC_GGML ? fl_ggml_dequant(s->type, src, (uint64_t)j->cols, dst, FL_F32)
                                      : fl_convert(dst, FL_F32, src, (fl_dtype)s->type, (size_t)j->cols));
    }
    return FL_OK;
}

/* Quantise a float source into the host weight h (rows of the job) with fl_q_quantize_rows: straight from the
 * mapping when the rows are in order and f32 / f16 / bf16, else through float32 (exact for those dtypes: the
 * quantiser widens to float32 itself; float64 is rounded to float32 first, as on the GPU). */
static fl_status quantize_host(const fl_weight *h, int scheme, const fl_load_job *j, const fl_load_item *it) {
    const fl_src_tensor *s = j->src;
    const int lora = it && it->lora_a.data;
    if (!lora && s->kind == FL_SRC_PLAIN && j->unpermute_heads <= 0 &&
        (s->type == FL_F32 || s->type == FL_F16 || s->type == FL_BF16))
        return fl_q_quantize_rows(h, scheme, 0, j->rows, s->data, (fl_dtype)s->type);
    const int64_t chunk = 64, r_lora = lora ? it->lora_a.shape[0] : 0;
    float *tmp = fl_malloc((size_t)chunk * (size_t)j->cols * sizeof(float)), *a = NULL, *b = NULL;
    if (!tmp) return fl_err(FL_E_NOMEM, "cannot allocate a conversion buffer");
    fl_status st = lora ? lora_host_factors(it, j->rows, j->cols, &a, &b) : FL_OK;
    for (int64_t r = 0; r < j->rows && st == FL_OK; r += chunk) {
        const int64_t k = j->rows - r < chunk ? j->rows - r : chunk;
        st = rows_f32(j, r, k, tmp);
        /* LoRA: these rows become W + scale * B[r:r+k] @ A in float32, then are quantised (before, never after) */
        if (st == FL_OK && lora) {
            st = fl_lowrank_add_host(tmp, FL_F32, k, j->cols, b + (size_t)(r * r_lora), a, (int)r_lora, it->lora_scale);
            if (st != FL_OK)
                fl_err_prefix(st, "merging LoRA '%s' / '%s' (scale %g)", it->lora_a.name ? it->lora_a.name : "?",
                              it->lora_b.name ? it->lora_b.name : "?", (double)it->lora_scale);
        }
        if (st == FL_OK) st = fl_q_quantize_rows(h, scheme, r, k, tmp, FL_F32);
    }
    fl_free(a);
    fl_free(b);
    fl_free(tmp);
    return st;
}

/* A GPTQ / AWQ part of a float weight (a fused weight mixing float and quantised parts): repack into a host
 * temporary in its own layout, dequantise (fl_q_dequant_rows), undo the act-order column order, convert. */
static fl_status packed_to_float(fl_backend *be, const qplan *p) {
    const fl_load_job *j = &p->job;
    fl_weight tmp = {.dtype = FL_QUANT, .rows = j->rows, .cols = j->cols};
    void *block = NULL;
    size_t part[4];
    FL_TRY(qhost_alloc(&tmp, &p->L, &tmp, &block, part));
    const size_t es = (size_t)fl_dtype_size(j->dst_dtype), row_out = (size_t)j->cols * es;
    const int host_direct = be->host_memory;
    const int64_t chunk = 64;
    float *f = fl_malloc((size_t)chunk * (size_t)j->cols * sizeof(float) * 2);
    char *stage = host_direct ? j->dst_d : fl_malloc((size_t)j->rows * row_out);
    fl_status st = !f || !stage ? fl_err(FL_E_NOMEM, "cannot allocate a conversion buffer") : FL_OK;
    if (st == FL_OK) st = fl_q_from_packed(&tmp, &p->pk, 0, j->rows);
    for (int64_t r = 0; r < j->rows && st == FL_OK; r += chunk) {
        const int64_t k = j->rows - r < chunk ? j->rows - r : chunk;
        float *out = f, *hf = f + (size_t)chunk * (size_t)j->cols;
        st = fl_q_dequant_rows(&tmp, r, k, out);
        for (int64_t i = 0; i < k && st == FL_OK; i++) {
            const float *row = out + (size_t)i * (size_t)j->cols;
            if (tmp.perm_d) { /* out column c multiplies x[perm[c]]: it is the checkpoint's column perm[c] */
                for (int64_t c = 0; c < j->cols; c++) hf[tmp.perm_d[c]] = row[c];
                row = hf;
            }
            st = fl_convert(stage + (size_t)(r + i) * row_out, j->dst_dtype, row, FL_F32, (size_t)j->cols);
        }
    }
    if (st == FL_OK && !host_direct) st = be->to_backend(be, j->dst_d, stage, (size_t)j->rows * row_out);
    if (!host_direct) fl_free(stage);
    fl_free(f);
    fl_free(block);
    return st;
}

/* Generic path, quantised destination: GGUF rows repacked (rows move whole, so un-permuting works as for floats),
 * GPTQ / AWQ repacked, float sources quantised; written in place on a host-memory backend, else into a host
 * staging copy of the rows whose codes / scales / offsets / perm then go to the backend. */
static fl_status quant_job(fl_backend *be, const qplan *p) {
    const fl_load_job *j = &p->job;
    const fl_weight v = qview(p->w, p->row0, j->rows);
    const fl_qlayout L = fl_q_layout_of(&v);
    fl_weight h = v;
    void *block = NULL;
    size_t part[4] = {0, 0, 0, 0};
    if (!be->host_memory) FL_TRY(qhost_alloc(&v, &L, &h, &block, part));
    fl_status st = FL_OK;
    const fl_src_tensor *s = j->src;
    if (p->kind == SRC_QUANT && p->it->packing) {
        st = fl_q_from_packed(&h, &p->pk, 0, j->rows);
    } else if (p->kind == SRC_QUANT) {
        const uint64_t row_in = fl_ggml_nbytes(s->type, (uint64_t)j->cols);
        for (int64_t r = 0; r < j->rows && st == FL_OK; r++)
            st = fl_q_from_ggml_row(&h, r, s->type, (const char *)s->data + (size_t)src_row(j, r) * row_in, j->cols);
    } else {
        st = quantize_host(&h, p->scheme, j, p->it);
    }
    if (block) {
        if (st == FL_OK) st = be->to_backend(be, v.data_d, h.data_d, part[0]);
        if (st == FL_OK) st = be->to_backend(be, v.scales_d, h.scales_d, part[1]);
        if (st == FL_OK && v.zeros_d) st = be->to_backend(be, v.zeros_d, h.zeros_d, part[2]);
        if (st == FL_OK && v.perm_d) st = be->to_backend(be, v.perm_d, h.perm_d, part[3]);
        fl_free(block);
    }
    return st;
}

static fl_status run_plan(fl_backend *be, const qplan *p) {
    if (p->w->dtype == FL_QUANT) return quant_job(be, p);
    if (p->it->packing) return packed_to_float(be, p);
    FL_TRY(convert_job(be, &p->job));
    return p->it->lora_a.data ? lora_apply(be, p, p->job.dst_d, p->job.dst_dtype) : FL_OK;
}

/* Progress over the phases of one load (backend loader, quantisation batches, generic path): each phase reports
 * its own (done, total); the caller sees one count over the whole load. */
typedef struct { fl_progress_fn cb; void *ud; uint64_t base, total; } prog_t;
static int prog_cb(void *u, uint64_t done, uint64_t total) {
    prog_t *p = u;
    (void)total;
    return p->cb ? p->cb(p->ud, p->base + done, p->total) : 0;
}

static fl_status load_generic(fl_model *m, qplan *const *ps, int n, prog_t *pg) {
    fl_status first = FL_OK;
    char errbuf[FL_ERR_MAX] = "";
    uint64_t done = 0;
    /* limit: items past it are skipped (the index of the lowest failing item so far; -1 once interrupted). Items
     * before a failing one still run, so the failing item of lowest index names the error whichever thread saw a
     * failure first, and the message is the same on every run. */
    int limit = n, nthreads = 1, first_i = n;
#ifdef _OPENMP
    nthreads = m->be->n_threads > 0 ? m->be->n_threads : omp_get_max_threads();
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int i = 0; i < n; i++) {
        int lim;
#pragma omp atomic read
        lim = limit;
        if (i > lim) continue;
        fl_status st = run_plan(m->be, ps[i]);
#pragma omp critical(fl_load)
        {
            if (st != FL_OK && i < first_i) { /* first_i -1 (interrupted): the caller's interruption stands */
                first = st;
                first_i = i;
                snprintf(errbuf, sizeof errbuf, "%s: tensor '%s': %s", ps[i]->job.src->file, ps[i]->job.src->name, fl_err_msg());
#pragma omp atomic write
                limit = i;
            }
            done += ps[i]->nbytes;
            if (st == FL_OK && first == FL_OK && prog_cb(pg, done, 0)) {
                first = FL_E_INTERRUPTED;
                first_i = -1;
                snprintf(errbuf, sizeof errbuf, "loading interrupted");
#pragma omp atomic write
                limit = -1;
            }
        }
    }
    m->stats.bytes_read += done;
    pg->base += done;
    if (nthreads > m->stats.threads) m->stats.threads = nthreads; /* the backend's loader may have used more */
    if (first != FL_OK) return fl_err(first, "%s", errbuf);
    return FL_OK;
}

/* The backend's own loader (CUDA) for plain tensors. */
static fl_status backend_load(fl_model *m, const fl_load_job *jobs, int n, prog_t *pg) {
    if (n == 0) return FL_OK;
    const int direct = m->stats.direct_io, threads = m->stats.threads;
    uint64_t sum = 0;
    for (int i = 0; i < n; i++) sum += jobs[i].src->nbytes;
    fl_status st = m->be->load(m->be, jobs, n, prog_cb, pg, &m->stats);
    m->stats.direct_io |= direct;
    if (threads > m->stats.threads) m->stats.threads = threads;
    pg->base += sum;
    return st;
}

/* Quantisation at load on a backend with its own loader (CUDA): plain float tensors stream into a device scratch
 * buffer (as many as fit: 1 GiB, or the largest tensor), in their own float dtype (float64 as float32), and the
 * backend's quantize op writes each into its rows of the quantised weight; then the next batch. The float
 * weights never pass through host memory. */
/* The dtype a source takes in the quantisation scratch: its own (float64 as float32); LoRA rows float32, since the
 * delta is added there before quantising (W + scale * B @ A in float32, as on the host). */
static fl_dtype scratch_dtype(const qplan *p) {
    const fl_src_tensor *s = p->job.src;
    return s->type == FL_F64 || p->it->lora_a.data ? FL_F32 : (fl_dtype)s->type;
}

static fl_status quantize_on_device(fl_model *m, qplan **ps, int n, prog_t *pg) {
    if (n == 0) return FL_OK;
    fl_backend *be = m->be;
    if (!be->quantize)
        return fl_err(FL_E_UNSUPPORTED, "quantisation at load is not available on %s (the backend has no quantize op)", be->name);
    size_t largest = 0, total = 0;
    for (int i = 0; i < n; i++) {
        const fl_load_job *j = &ps[i]->job;
        const fl_dtype dt = scratch_dtype(ps[i]);
        size_t b = 0;
        fl_mul3_size((size_t)j->rows, (size_t)j->cols, (size_t)fl_dtype_size(dt), &b); /* bounded by the config */
        b = (b + ALIGN - 1) & ~(size_t)(ALIGN - 1);
        if (b > largest) largest = b;
        total += b;
    }
    size_t cap = total < ((size_t)1 << 30) ? total : ((size_t)1 << 30);
    if (cap < largest) cap = largest;
    void *scratch = NULL;
    fl_status st = be->alloc(be, cap, &scratch);
    if (st != FL_OK && cap > largest) { fl_err_clear(); cap = largest; st = be->alloc(be, cap, &scratch); }
    if (st != FL_OK) return fl_err_prefix(st, "a %.2f GiB buffer for quantisation at load on %s", cap / 1073741824.0, be->name);
    fl_load_job *jobs = calloc((size_t)n, sizeof *jobs);
    if (!jobs) { be->free(be, scratch); return fl_err(FL_E_NOMEM, "cannot allocate the load plan"); }
    for (int i = 0; i < n && st == FL_OK;) {
        size_t off = 0;
        int k = 0;
        while (i + k < n) {
            fl_load_job j = ps[i + k]->job;
            j.dst_dtype = scratch_dtype(ps[i + k]);
            const size_t b = ((size_t)j.rows * (size_t)j.cols * (size_t)fl_dtype_size(j.dst_dtype) + ALIGN - 1) & ~(size_t)(ALIGN - 1);
            if (k > 0 && off + b > cap) break;
            j.dst_d = (char *)scratch + off;
            jobs[k++] = j;
            off += b;
        }
        /* file sources through the backend's pipeline (in order, a prefix of the batch's jobs); tensors already in
         * backend memory (fastload.from_hf) converted there */
        int kf = 0;
        for (int t = 0; t < k; t++)
            if (jobs[t].src->where == FL_SRC_FILE) {
                const fl_load_job tmp = jobs[kf]; jobs[kf] = jobs[t]; jobs[t] = tmp;
                const qplan *tp = ps[i + kf]; ps[i + kf] = ps[i + t]; ps[i + t] = (qplan *)tp;
                kf++;
            }
        st = backend_load(m, jobs, kf, pg);
        for (int t = kf; t < k && st == FL_OK; t++) {
            st = be->convert_d(be, jobs[t].dst_d, jobs[t].dst_dtype, jobs[t].src->data, (fl_dtype)jobs[t].src->type,
                               (size_t)(jobs[t].rows * jobs[t].cols));
            if (st != FL_OK) st = err_item(st, ps[i + t]);
            else pg->base += ps[i + t]->nbytes;
        }
        for (int t = 0; t < k && st == FL_OK; t++) {
            const qplan *p = ps[i + t];
            if (p->it->lora_a.data && (st = lora_apply(be, p, jobs[t].dst_d, jobs[t].dst_dtype)) != FL_OK) {
                st = err_item(st, p);
                break;
            }
            st = be->quantize(be, p->w, p->scheme, p->row0, jobs[t].rows, jobs[t].dst_d, jobs[t].dst_dtype);
            if (st != FL_OK) st = err_item(st, p);
        }
        if (st == FL_OK) st = be->sync(be); /* the next batch overwrites the scratch */
        i += k;
    }
    free(jobs);
    be->sync(be);
    be->free(be, scratch);
    return st;
}

fl_status fl_model_load(fl_model *m, const fl_load_item *items, int n, fl_progress_fn cb, void *ud) {
    if (m->weights_final)
        return fl_err(FL_E_VALUE, "load: this model's weights were finalised (check_complete: interleaved for the backend's "
                                  "kernels); load every tensor before it");
    qplan *plans = calloc((size_t)(n > 0 ? n : 1), sizeof *plans);
    qplan **order = calloc((size_t)(n > 0 ? n : 1), sizeof *order);
    fl_load_job *fast = calloc((size_t)(n > 0 ? n : 1), sizeof *fast);
    fl_qlayout *lay = NULL;
    fl_status st = FL_OK;
    if (!plans || !order || !fast) { st = fl_err(FL_E_NOMEM, "cannot allocate the load plan"); goto done; }
    /* Check every item first, settle the layouts, allocate the arena, then plan again with the real destinations. */
    for (int i = 0; i < n && st == FL_OK; i++) st = plan_one(m, &items[i], &plans[i]);
    if (st == FL_OK && !m->arena_d) {
        lay = calloc((size_t)n_weight_ids(m), sizeof *lay);
        if (!lay) st = fl_err(FL_E_NOMEM, "cannot allocate the load plan");
        if (st == FL_OK) st = decide_layouts(m, plans, n, lay);
        if (st == FL_OK) st = arena_alloc(m, lay);
        if (st != FL_OK && !m->arena_d) { /* nothing loaded: the weights are float again, as fl_model_create left them */
            wdesc *ws = malloc(sizeof(wdesc) * (3 + FL_LAYER_WEIGHTS * (size_t)m->cfg.n_layers));
            if (ws) {
                const int nw = list_weights(m, ws);
                for (int i = 0; i < nw; i++) ws[i].w->dtype = m->wdtype;
                free(ws);
            }
        }
        for (int i = 0; i < n && st == FL_OK; i++) st = plan_one(m, &items[i], &plans[i]);
    } else {
        for (int i = 0; i < n && st == FL_OK; i++) st = check_fits(&plans[i]);
    }
    if (st != FL_OK) goto done;
    prog_t pg = {cb, ud, 0, 0};
    for (int i = 0; i < n; i++) pg.total += plans[i].nbytes;
    if (m->be->load) {
        /* Plain float tensors into float weights take the backend's pipeline (unchanged), plain float tensors into
         * quantised weights are quantised on the device while they stream, the rest converts on the host. */
        /* Sources in host memory that belong to no file (fastload.from_hf) take the generic path; sources in backend
         * memory are converted there (convert_d) or, for quantised weights, quantised from there. */
        int nf = 0, nq = 0, ng = 0, nd = 0;
        for (int i = 0; i < n; i++) {
            qplan *p = &plans[i];
            if (p->job.src->where == FL_SRC_FILE && p->job.src->kind == FL_SRC_PLAIN && !p->it->packing &&
                p->w->dtype != FL_QUANT)
                fast[nf++] = p->job;
        }
        for (int i = 0; i < n; i++) {
            qplan *p = &plans[i];
            if (p->job.src->where != FL_SRC_HOST && p->job.src->kind == FL_SRC_PLAIN && !p->it->packing &&
                p->w->dtype == FL_QUANT)
                order[nq++] = p;
        }
        for (int i = 0; i < n; i++) {
            qplan *p = &plans[i];
            const int plain = p->job.src->kind == FL_SRC_PLAIN && !p->it->packing, where = p->job.src->where;
            if (!plain || where == FL_SRC_HOST) order[nq + ng++] = p; /* not fast, not quantised on the device, not in backend memory */
        }
        st = backend_load(m, fast, nf, &pg);
        /* LoRA on float weights: merged on the device once the rows have landed (cuBLAS, before anything reads them) */
        for (int i = 0; i < n && st == FL_OK; i++) {
            qplan *p = &plans[i];
            if (p->it->lora_a.data && p->job.src->where == FL_SRC_FILE && p->job.src->kind == FL_SRC_PLAIN &&
                !p->it->packing && p->w->dtype != FL_QUANT && (st = lora_apply(m->be, p, p->job.dst_d, p->job.dst_dtype)) != FL_OK)
                st = err_item(st, p);
        }
        /* tensors already in backend memory into float weights: a conversion on the device (from_hf) */
        for (int i = 0; i < n && st == FL_OK; i++) {
            qplan *p = &plans[i];
            if (p->job.src->where != FL_SRC_BACKEND || p->w->dtype == FL_QUANT) continue;
            st = m->be->convert_d(m->be, p->job.dst_d, p->job.dst_dtype, p->job.src->data, (fl_dtype)p->job.src->type,
                                  (size_t)(p->job.rows * p->job.cols));
            if (st == FL_OK && p->it->lora_a.data) st = lora_apply(m->be, p, p->job.dst_d, p->job.dst_dtype);
            if (st != FL_OK) st = err_item(st, p);
            pg.base += p->nbytes;
            nd++;
        }
        if (st == FL_OK && nd) st = m->be->sync(m->be);
        if (st == FL_OK) st = quantize_on_device(m, order, nq, &pg);
        if (st == FL_OK) st = load_generic(m, order + nq, ng, &pg);
    } else {
        for (int i = 0; i < n; i++) order[i] = &plans[i];
        st = load_generic(m, order, n, &pg);
    }
    if (st == FL_OK)
        for (int i = 0; i < n; i++) {
            const fl_load_item *it = &items[i];
            const int sl = it->slot, l = sl >= FL_SLOT_ATTN_NORM ? it->layer : 0;
            /* a fused tensor stands for its parts (fl_model_check_complete asks for the parts) */
            const int first = sl == FL_SLOT_QKV ? FL_SLOT_Q : sl == FL_SLOT_QKV_BIAS ? FL_SLOT_Q_BIAS
                            : sl == FL_SLOT_GATE_UP ? FL_SLOT_GATE : sl;
            const int count = sl == FL_SLOT_QKV || sl == FL_SLOT_QKV_BIAS ? 3 : sl == FL_SLOT_GATE_UP ? 2 : 1;
            for (int k = 0; k < count; k++) m->loaded[(size_t)(first + k) * (size_t)m->cfg.n_layers + l] = 1;
            const int E = m->cfg.n_experts;
            if (!E || sl < FL_SLOT_MOE_W1) continue;
            uint8_t *ml = m->moe_loaded + (size_t)it->layer * (size_t)E * 3; /* [expert][w1, w3, w2] */
            for (int e = 0; e < E; e++) {
                if (sl == FL_SLOT_MOE_W13_ALL) ml[e * 3] = ml[e * 3 + 1] = 1;
                if (sl == FL_SLOT_MOE_W2_ALL) ml[e * 3 + 2] = 1;
            }
            if (sl <= FL_SLOT_MOE_W2) ml[it->expert * 3 + (sl - FL_SLOT_MOE_W1)] = 1;
        }
done:
    free(plans);
    free(order);
    free(fast);
    free(lay);
    return st;
}

/* Whether fl_model_interleave hands w to the backend (the rules in its comment) */
static int interleave_candidate(const fl_model *m, const fl_weight *w) {
    const fl_config *c = &m->cfg;
    /* the embedding only as a tied LM head: its lookup (cpu_q_embed through cpu_q_widen) reads interleaved rows too */
    if (w == &m->w.embed || (m->w.embed.data_d && w->data_d == m->w.embed.data_d)) return c->tie_embeddings;
    for (int l = 0; l < c->n_layers && c->n_experts; l++)
        if (w == &m->w.layers[l].moe_w13 || w == &m->w.layers[l].moe_w2) return c->moe_ffn % 4 == 0 && c->d % 8 == 0;
    return 1;
}

/* After the last load (the Python layer calls it right after fl_model_check_complete): hand each quantised weight
 * the layer kernels read to the backend's interleave_weight, which may rearrange it into the backend's faster layout (the
 * CPU's rows-by-8 interleave, cpu_qmatmul.c). Not an untied embedding (its rows are looked up one token at a time: nothing
 * to gain); an embedding tied to the LM head is (the LM head's matmul reads all of it every step; cpu_q_embed reads
 * interleaved rows too); a Mixture of Experts' experts only when every expert's slice starts at a multiple of
 * 8 rows (cpu_moe.c cuts them out with fl_weight_rows). FASTLOAD_CPU_INTERLEAVE=0 keeps every weight row-major (a
 * comparison switch: the same results within float rounding). Runs once; later loads are refused. */
fl_status fl_model_interleave(fl_model *m) {
    if (m->weights_final) return FL_OK;
    m->weights_final = 1;
    fl_backend *be = m->be;
    if (!interleave_on(m) || !m->arena_d) return FL_OK;
    const fl_config *c = &m->cfg;
    wdesc *ws = malloc(sizeof(wdesc) * (3 + FL_LAYER_WEIGHTS * (size_t)c->n_layers));
    if (!ws) return fl_err(FL_E_NOMEM, "cannot allocate the model tables");
    const int nw = list_weights(m, ws);
    fl_status st = FL_OK;
    for (int i = 0; i < nw && st == FL_OK; i++) {
        fl_weight *w = ws[i].w;
        if (w->dtype != FL_QUANT || !interleave_candidate(m, w)) continue;
        int done = 0;
        st = be->interleave_weight(be, w, &done);
        m->n_interleaved += done;
    }
    free(ws);
    /* a tied LM head is a copy of the embedding's fl_weight (the same bytes): it takes the new layout with them */
    if (c->tie_embeddings) m->w.lm_head = m->w.embed;
    return st;
}

fl_status fl_model_check_complete(const fl_model *m) {
    const fl_config *c = &m->cfg;
    for (int s = 0; s < FL_SLOT_COUNT; s++) {
        const int global = s < FL_SLOT_ATTN_NORM;
        if (s == FL_SLOT_LM_HEAD && c->tie_embeddings) continue;
        if ((s == FL_SLOT_Q_BIAS || s == FL_SLOT_K_BIAS || s == FL_SLOT_V_BIAS) && !c->qkv_bias) continue;
        if ((s == FL_SLOT_Q_NORM || s == FL_SLOT_K_NORM) && !c->qk_norm) continue;
        if (s == FL_SLOT_QKV || s == FL_SLOT_QKV_BIAS || s == FL_SLOT_GATE_UP) continue; /* checked as their parts */
        if (is_ffn_slot(s) && !has_dense_ffn(c)) continue;
        if (is_moe_slot(s) && s != FL_SLOT_MOE_ROUTER) continue; /* experts: per expert below, from either layout */
        if (s == FL_SLOT_MOE_ROUTER && !c->n_experts) continue;
        for (int l = 0; l < (global ? 1 : c->n_layers); l++)
            if (!m->loaded[(size_t)s * (size_t)c->n_layers + l]) {
                if (global) return fl_err(FL_E_FORMAT, "missing tensor for %s", fl_slot_names[s]);
                return fl_err(FL_E_FORMAT, "missing tensor for layer %d %s", l, fl_slot_names[s]);
            }
    }
    static const char *const part[3] = {"w1 (gate)", "w3 (up)", "w2 (down)"};
    for (int l = 0; l < c->n_layers && c->n_experts; l++)
        for (int e = 0; e < c->n_experts; e++)
            for (int p = 0; p < 3; p++)
                if (!m->moe_loaded[((size_t)l * (size_t)c->n_experts + (size_t)e) * 3 + (size_t)p])
                    return fl_err(FL_E_FORMAT, "missing tensor for layer %d expert %d %s", l, e, part[p]);
    return FL_OK;
}

fl_status fl_kv_dtype_ok(const fl_backend *be, fl_dtype dtype) {
    if (dtype == be->act) return FL_OK;
    /* the CPU backend (float32 activations) converts float16 keys and values as it stores and reads them; CUDA keeps
     * them in the activation dtype (bf16 / fp16 already, and its kernels read no other) */
    if (dtype == FL_F16 && be->host_memory && be->act == FL_F32) return FL_OK;
    const char *want = dtype >= 0 && dtype < FL_DTYPE_PLAIN_COUNT ? fl_dtype_table[dtype].np_name : "?";
    return fl_err(FL_E_VALUE, "kv_cache_dtype=%s: this backend keeps its KV cache in %s (float16 is for the CPU backend)",
                  want, fl_dtype_table[be->act].np_name);
}

fl_status fl_kv_create(fl_model *m, int batch, int max_len, fl_dtype dtype, fl_kvcache **out) {
    const fl_config *c = &m->cfg;
    *out = NULL;
    if (!m->arena_d) return fl_err(FL_E_VALUE, "the model's weights are not loaded");
    FL_TRY(fl_kv_dtype_ok(m->be, dtype));
    if (batch <= 0 || max_len <= 0) return fl_err(FL_E_VALUE, "KV cache: batch and length must be positive");
    size_t per, all;
    if (!fl_mul3_size((size_t)batch, (size_t)max_len, (size_t)c->n_kv_heads, &per) ||
        !fl_mul3_size(per, (size_t)c->head_dim, (size_t)fl_dtype_size(dtype), &per) ||
        !fl_align_size(per, ALIGN, &per) || !fl_mul3_size(per, 2, (size_t)c->n_layers, &all))
        return fl_err(FL_E_VALUE, "KV cache for batch %d x %d positions: the size overflows", batch, max_len);
    fl_kvcache *kv = calloc(1, sizeof *kv);
    if (!kv) return fl_err(FL_E_NOMEM, "cannot allocate the KV cache table");
    *kv = (fl_kvcache){.n_layers = c->n_layers, .batch = batch, .max_len = max_len,
                       .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim, .dtype = dtype};
    kv->k_d = calloc((size_t)c->n_layers, sizeof(void *));
    kv->v_d = calloc((size_t)c->n_layers, sizeof(void *));
    if (!kv->k_d || !kv->v_d) { fl_kv_free(m, kv); return fl_err(FL_E_NOMEM, "cannot allocate the KV cache table"); }
    void *base = NULL;
    fl_status st = m->be->alloc(m->be, all, &base);
    if (st != FL_OK) {
        fl_kv_free(m, kv);
        return fl_err_prefix(st, "KV cache for batch %d x %d positions (%.2f GiB)", batch, max_len,
                             per * 2.0 * c->n_layers / 1073741824.0);
    }
    m->kv_bytes_last = (uint64_t)per * 2 * (uint64_t)c->n_layers;
    for (int l = 0; l < c->n_layers; l++) {
        kv->k_d[l] = (char *)base + per * (size_t)(2 * l);
        kv->v_d[l] = (char *)base + per * (size_t)(2 * l + 1);
    }
    *out = kv;
    return FL_OK;
}

void fl_kv_free(fl_model *m, fl_kvcache *kv) {
    if (!kv) return;
    if (kv->k_d && kv->k_d[0]) m->be->free(m->be, kv->k_d[0]);
    free(kv->k_d);
    free(kv->v_d);
    free(kv);
}

/* Grow the activation workspace to N tokens and the logits to n_logit rows (the logits are [rows, vocab]: a
 * prompt of 2048 tokens of a 152k-vocabulary model would hold 600 MB of 16-bit logits if they followed N). */
static fl_status ws_grow(fl_model *m, void **p, size_t rows, size_t width, size_t es, const char *what) {
    fl_backend *be = m->be;
    size_t bytes;
    if (!fl_mul3_size(rows, width, es, &bytes))
        return fl_err(FL_E_VALUE, "workspace (%s) for %zu rows: the size overflows", what, rows);
    if (*p) be->free(be, *p);
    *p = NULL;
    be->scratch_epoch++; /* captured graphs (the engine's) that used the old buffer are stale */
    fl_status st = be->alloc(be, bytes, p);
    return st == FL_OK ? FL_OK : fl_err_prefix(st, "workspace (%s) for %zu rows", what, rows);
}

fl_status fl_model_reserve(fl_model *m, int N, int n_logit) {
    const fl_config *c = &m->cfg;
    const size_t a = (size_t)fl_dtype_size(m->be->act);
    if (N <= 0 || n_logit <= 0) return fl_err(FL_E_VALUE, "workspace for %d tokens, %d logit rows: must be positive", N, n_logit);
    if (N > m->ws_tokens) {
        const size_t qkv = ((size_t)c->n_heads + 2 * (size_t)c->n_kv_heads) * (size_t)c->head_dim; /* bounded */
        const size_t att = (size_t)c->n_heads * (size_t)c->head_dim;
        /* per-token widths (bounded by check_config); times N with checked arithmetic */
        struct { void **p; size_t width, es; } want[] = {
            {&m->ws_x, (size_t)c->d, a}, {&m->ws_xn, (size_t)c->d, a},
            {&m->ws_qkv, qkv, a}, {&m->ws_att, att, a},
            {&m->ws_delta, (size_t)c->d, a}, {&m->ws_gu, 2 * (size_t)(has_dense_ffn(c) ? c->ffn : 1), a},
            {&m->ws_ff, (size_t)(has_dense_ffn(c) ? c->ffn : 1), a},
            {(void **)&m->ws_tok_d, 1, 4}, {(void **)&m->ws_pos_d, 1, 4},
        };
        m->ws_tokens = 0;
        for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
            fl_status st = ws_grow(m, want[i].p, (size_t)N, want[i].width, want[i].es, "activations");
            if (st != FL_OK) { ws_release(m); return st; }
        }
        if (c->n_experts) { /* per token: k slots of gate|up, SwiGLU, expert output, gathered input (bounded) */
            const size_t k = (size_t)c->top_k, f = (size_t)c->moe_ffn;
            struct { void **p; size_t width, es; } moe[] = {
                {&m->ws_router, (size_t)c->n_experts, a}, {(void **)&m->ws_moe_ids, k, 4}, {(void **)&m->ws_moe_wts, k, 4},
                {&m->moe_ws.gu, k * 2 * f, a}, {&m->moe_ws.ff, k * f, a}, {&m->moe_ws.y, k * (size_t)c->d, a},
                {&m->moe_ws.xs, k * (size_t)c->d, a}, {(void **)&m->moe_ws.perm, k, 4}, {(void **)&m->moe_ws.inv, k, 4},
            };
            for (size_t i = 0; i < sizeof moe / sizeof *moe; i++) {
                fl_status st = ws_grow(m, moe[i].p, (size_t)N, moe[i].width, moe[i].es, "experts");
                if (st != FL_OK) { ws_release(m); return st; }
            }
            fl_status st = m->moe_ws.offs ? FL_OK : ws_grow(m, (void **)&m->moe_ws.offs, 2 * ((size_t)c->n_experts + 1), 1, 4, "experts");
            if (st == FL_OK && !m->moe_ws.offs_h && !(m->moe_ws.offs_h = malloc(((size_t)c->n_experts + 1) * 4)))
                st = fl_err(FL_E_NOMEM, "cannot allocate the expert counts");
            if (st != FL_OK) { ws_release(m); return st; }
        }
        m->ws_tokens = N;
    }
    if (n_logit > m->ws_logit_rows) {
        m->ws_logit_rows = 0;
        fl_status st = ws_grow(m, &m->ws_last, (size_t)n_logit, (size_t)c->d, a, "last rows");
        if (st == FL_OK) st = ws_grow(m, &m->ws_logits, (size_t)n_logit, (size_t)c->vocab, a, "logits");
        if (st != FL_OK) { ws_release(m); return st; }
        m->ws_logit_rows = n_logit;
    }
    return FL_OK;
}

fl_status fl_forward_core(fl_model *m, fl_kvcache *kv, const fl_step *step_in, const int32_t *tok_d, int all_logits) {
    const fl_config *c = &m->cfg;
    fl_backend *be = m->be;
    fl_step step_dyn = *step_in; /* dynamic NTK rope: the model's parameters; the caller gave the rows' lengths */
    if (c->rope_type == FL_ROPE_DYNAMIC) {
        step_dyn.dyn.theta = c->rope_theta;
        step_dyn.dyn.factor = c->rope_factor;
        step_dyn.dyn.max_pos = c->rope_orig_max_pos;
    } else {
        step_dyn.dyn = (fl_rope_dyn){0};
    }
    const fl_step *step = &step_dyn;
    const int B = step->batch, T = step->n_new, N = B * T;
    if (N > m->ws_tokens) return fl_err(FL_E_INTERNAL, "forward_core: workspace holds %d tokens, %d needed", m->ws_tokens, N);
    if (c->n_experts && (!be->moe_route || !be->moe_ffn))
        return fl_err(FL_E_UNSUPPORTED, "the %s backend has no Mixture-of-Experts ops", be->name);
    const int rows = all_logits || T == 1 ? N : B;  /* logit rows this forward writes */
    if (rows > m->ws_logit_rows)
        return fl_err(FL_E_INTERNAL, "forward_core: workspace holds %d logit rows, %d needed", m->ws_logit_rows, rows);
    /* YaRN scales cos and sin by rope_attn_factor; on both q and k that is its square on q.k, applied here */
    const float scale = 1.0f / sqrtf((float)c->head_dim) * c->rope_attn_factor * c->rope_attn_factor;
    const fl_rope_style rope = {.dims = c->rope_dims, .interleaved = c->rope_interleaved, .round_cs = c->rope_round};
#define STEP(call) FL_TRY(call)
#define SKIP(bit) (skip & (bit))
    const unsigned skip = T == 1 ? m->timing_skip : 0u;  /* FASTLOAD_TIMING_SKIP: decode steps only */
    if (be->step_begin) be->step_begin(be);
    STEP(be->embed(be, m->ws_x, tok_d, N, &m->w.embed));                     /* x: [N, d] */
    for (int l = 0; l < c->n_layers; l++) {
        const fl_layer *W = &m->w.layers[l];
        if (fl_cancel_requested()) return fl_err(FL_E_INTERRUPTED, "interrupted"); /* Ctrl-C in a long forward */
        if (!SKIP(FL_SKIP_NORM)) {
            if (l == 0) STEP(be->rmsnorm(be, m->ws_xn, m->ws_x, &W->attn_norm, N, c->rms_eps, &W->wqkv));
            else STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &W->attn_norm, N, c->rms_eps, &W->wqkv));
        }
        if (!SKIP(FL_SKIP_QKV))
            STEP(be->matmul(be, m->ws_qkv, m->ws_xn, N, &W->wqkv, c->qkv_bias ? &W->bqkv : NULL)); /* [N, (nh+2nkv)hd] */
        /* Qwen3: q and k heads RMS-normed (q_norm / k_norm) in the same op, before the rotation */
        if (!SKIP(FL_SKIP_ROPE | FL_SKIP_ATTENTION)) { /* [N, nh*hd]; the backend may fuse the two */
            STEP(fl_rope_attention(be, m->ws_att, m->ws_qkv, step, kv, l, c->n_heads, m->inv_freq_d, &rope,
                                   c->qk_norm ? &W->qk_norm : NULL, c->rms_eps, c->window[l], scale, &W->wo));
        } else {
            if (!SKIP(FL_SKIP_ROPE))
                STEP(be->rope_store(be, m->ws_qkv, step, kv, l, c->n_heads, m->inv_freq_d, &rope,
                                    c->qk_norm ? &W->qk_norm : NULL, c->rms_eps));
            if (!SKIP(FL_SKIP_ATTENTION))
                STEP(be->attention(be, m->ws_att, m->ws_qkv, step, kv, l, c->n_heads, c->window[l], scale, &W->wo));
        }
        if (!SKIP(FL_SKIP_O)) STEP(be->matmul(be, m->ws_delta, m->ws_att, N, &W->wo, NULL)); /* [N, d] */
        if (c->n_experts) { /* Mixture of Experts: route each token to top_k experts, only theirs are read */
            STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &W->ffn_norm, N, c->rms_eps, &W->moe_router));
            STEP(be->matmul(be, m->ws_router, m->ws_xn, N, &W->moe_router, NULL)); /* [N, E] */
            STEP(be->moe_route(be, m->ws_moe_ids, m->ws_moe_wts, m->ws_router, N, c->n_experts, c->top_k,
                               c->moe_norm_topk));                               /* [N, k] ids, weights */
            /* prefill may read the expert counts on the host (grouped GEMMs); a decode step never does (graphs) */
            STEP(be->moe_ffn(be, m->ws_delta, m->ws_xn, N, m->ws_moe_ids, m->ws_moe_wts, c->top_k, c->n_experts,
                             &W->moe_w13, &W->moe_w2, &m->moe_ws, T > 1));       /* [N, d] */
        } else {
            if (!SKIP(FL_SKIP_NORM))
                STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &W->ffn_norm, N, c->rms_eps, &W->w_gate_up));
            if (be->matmul_swiglu && !SKIP(FL_SKIP_GATE_UP | FL_SKIP_SWIGLU)) {
                STEP(be->matmul_swiglu(be, m->ws_ff, m->ws_gu, m->ws_xn, N, &W->w_gate_up, c->ffn, &W->w_down));
            } else {  /* (skipping swiglu where the GEMV fuses it: the plain gate|up GEMV, no SwiGLU) */
                if (!SKIP(FL_SKIP_GATE_UP)) STEP(be->matmul(be, m->ws_gu, m->ws_xn, N, &W->w_gate_up, NULL)); /* [N, 2*ffn] */
                if (!SKIP(FL_SKIP_SWIGLU)) STEP(be->swiglu(be, m->ws_ff, m->ws_gu, N, c->ffn, &W->w_down));  /* [N, ffn] */
            }
            if (!SKIP(FL_SKIP_DOWN)) STEP(be->matmul(be, m->ws_delta, m->ws_ff, N, &W->w_down, NULL)); /* [N, d] */
        }
    }
    const int whole = all_logits || T == 1;  /* logits of every row: the LM head reads ws_xn right after the norm */
    if (SKIP(FL_SKIP_LM_HEAD)) return FL_OK;
    STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &m->w.final_norm, N, c->rms_eps, whole ? &m->w.lm_head : NULL));
    if (whole) {
        STEP(be->matmul(be, m->ws_logits, m->ws_xn, N, &m->w.lm_head, NULL)); /* [N, vocab] */
    } else {
        int32_t rows_s[256];
        int32_t *rows = B <= 256 ? rows_s : malloc((size_t)B * 4);
        if (!rows) return fl_err(FL_E_NOMEM, "forward: row list");
        for (int b = 0; b < B; b++) rows[b] = b * T + (m->last_rows ? m->last_rows[b] : T - 1);
        fl_status st = be->gather_rows(be, m->ws_last, m->ws_xn, rows, B, c->d); /* [B, d] */
        if (rows != rows_s) free(rows);
        FL_TRY(st);
        STEP(be->matmul(be, m->ws_logits, m->ws_last, B, &m->w.lm_head, NULL)); /* [B, vocab] */
    }
#undef SKIP
#undef STEP
    return FL_OK;
}

fl_status fl_forward(fl_model *m, fl_kvcache *kv, int B, int T, int start, const int32_t *tokens,
                     const int32_t *pos, const uint8_t *kmask, int kmask_stride, int all_logits, float *logits_h) {
    return fl_forward_ld(m, kv, B, T, start, tokens, pos, kmask, kmask_stride, all_logits, logits_h, T);
}

fl_status fl_forward_ld(fl_model *m, fl_kvcache *kv, int B, int T, int start, const int32_t *tokens,
                        const int32_t *pos, const uint8_t *kmask, int kmask_stride, int all_logits, float *logits_h,
                        int logits_ld) {
    fl_backend *be = m->be;
    if (all_logits && logits_ld < T) return fl_err(FL_E_VALUE, "forward: logits row stride %d < %d", logits_ld, T);
    if (B <= 0 || T <= 0) return fl_err(FL_E_VALUE, "forward: empty batch");
    if (B != kv->batch) return fl_err(FL_E_VALUE, "forward: batch %d but the KV cache holds %d", B, kv->batch);
    if (start < 0 || (int64_t)start + T > kv->max_len)
        return fl_err(FL_E_VALUE, "forward: positions [%d, %lld) exceed the KV cache length %d", start,
                      (long long)start + T, kv->max_len);
    if (kmask && kmask_stride < start + T) return fl_err(FL_E_VALUE, "forward: key mask stride %d < %d", kmask_stride, start + T);
    if ((int64_t)B * T > INT32_MAX) return fl_err(FL_E_VALUE, "forward: batch %d x %d tokens is too many", B, T);
    const int N = B * T;
    FL_TRY(fl_model_reserve(m, N, all_logits ? N : B));
    /* The key mask: host-memory backends read the caller's array; others get a per-call copy. */
    const uint8_t *kmask_use = be->host_memory ? kmask : NULL;
    uint8_t *kmask_d = NULL;
    fl_status st = FL_OK;
    if (kmask && !be->host_memory) {
        FL_TRY(be->alloc(be, (size_t)B * (size_t)kmask_stride, (void **)&kmask_d));
        st = be->to_backend(be, kmask_d, kmask, (size_t)B * (size_t)kmask_stride);
        kmask_use = kmask_d;
    }
    if (st == FL_OK) st = be->to_backend(be, m->ws_tok_d, tokens, (size_t)N * 4);
    if (st == FL_OK) st = be->to_backend(be, m->ws_pos_d, pos, (size_t)N * 4);
    fl_step step = {.batch = B, .n_new = T, .start = start, .pos_d = m->ws_pos_d, .kmask_d = kmask_use,
                    .kmask_stride = kmask_stride};
    /* dynamic NTK rope: each row's length, its largest position + 1, as transformers' torch.max(position_ids) + 1
     * (taken per row here; transformers takes it over the batch) */
    int32_t *len_h = NULL, *len_d = NULL;
    if (st == FL_OK && m->cfg.rope_type == FL_ROPE_DYNAMIC) {
        len_h = malloc((size_t)B * 4);
        if (!len_h) st = fl_err(FL_E_NOMEM, "forward: rope lengths");
        for (int b = 0; st == FL_OK && b < B; b++) {
            int32_t mx = 0;
            for (int t = 0; t < T; t++) mx = pos[(size_t)b * T + t] + 1 > mx ? pos[(size_t)b * T + t] + 1 : mx;
            len_h[b] = mx;
        }
        if (st == FL_OK && !be->host_memory) {
            st = be->alloc(be, (size_t)B * 4, (void **)&len_d);
            if (st == FL_OK) st = be->to_backend(be, len_d, len_h, (size_t)B * 4);
        }
        step.dyn.len_d = be->host_memory ? len_h : len_d;
    }
    if (st == FL_OK) st = fl_forward_core(m, kv, &step, m->ws_tok_d, all_logits);
    if (!all_logits || logits_ld == T) {
        if (st == FL_OK) st = be->logits_to_host(be, logits_h, m->ws_logits, all_logits ? N : B, m->cfg.vocab);
    } else { /* row b's T logit rows to logits_h[b * logits_ld, +T) */
        const size_t V = (size_t)m->cfg.vocab, es = (size_t)fl_dtype_size(be->act);
        for (int b = 0; st == FL_OK && b < B; b++)
            st = be->logits_to_host(be, logits_h + (size_t)b * logits_ld * V,
                                    (const char *)m->ws_logits + (size_t)b * T * V * es, T, (int)V);
    }
    if (st == FL_OK) st = be->sync(be);
    if (kmask_d) be->free(be, kmask_d);
    if (len_d) be->free(be, len_d);
    free(len_h);
    return st;
}
