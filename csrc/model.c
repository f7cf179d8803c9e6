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
    "gate_proj", "up_proj", "down_proj",
};

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
    if (c->max_pos < 0)
        return fl_err(FL_E_FORMAT, "config: max_position_embeddings=%d must be in [0, 2^31-1]", c->max_pos);
    FL_TRY(check_pos_float("rms_norm_eps", c->rms_eps, 1));
    FL_TRY(check_pos_float("rope_theta", c->rope_theta, 0));
    if (c->rope_type < FL_ROPE_DEFAULT || c->rope_type > FL_ROPE_LLAMA3)
        return fl_err(FL_E_FORMAT, "config: unknown rope_type %d", c->rope_type);
    if (c->rope_type != FL_ROPE_DEFAULT) FL_TRY(check_pos_float("rope_scaling.factor", c->rope_factor, 0));
    if (c->rope_type == FL_ROPE_LLAMA3) {
        FL_TRY(check_pos_float("rope_scaling.low_freq_factor", c->rope_low_freq_factor, 0));
        FL_TRY(check_pos_float("rope_scaling.high_freq_factor", c->rope_high_freq_factor, 0));
        if (c->rope_orig_max_pos <= 0)
            return fl_err(FL_E_FORMAT, "config: rope_scaling.original_max_position_embeddings=%d must be in [1, 2^31-1]",
                          c->rope_orig_max_pos);
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

/* inv_freq[i] = 1 / theta^(2i/hd), then the configured scaling; float32 as transformers. */
static void rope_freqs(const fl_config *c, float *f) {
    const int half = c->head_dim / 2;
    for (int i = 0; i < half; i++) {
        const float e = (float)(2 * i) / (float)c->head_dim;
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
        out[n++] = (wdesc){&L->wo, c->d, (int64_t)c->n_heads * c->head_dim};
        out[n++] = (wdesc){&L->ffn_norm, c->d, 1};
        out[n++] = (wdesc){&L->w_gate_up, 2 * (int64_t)c->ffn, c->d};
        out[n++] = (wdesc){&L->w_down, c->d, c->ffn};
    }
    return n;
}

fl_status fl_model_create(const fl_config *cfg, fl_dtype wdtype, fl_backend *be, fl_model **out) {
    *out = NULL;
    FL_TRY(check_config(cfg));
    if (wdtype != FL_F32 && wdtype != FL_F16 && wdtype != FL_BF16)
        return fl_err(FL_E_VALUE, "weight dtype must be float32, float16 or bfloat16");
    fl_model *m = calloc(1, sizeof *m);
    if (!m) return fl_err(FL_E_NOMEM, "cannot allocate the model");
    m->cfg = *cfg;
    m->wdtype = wdtype;
    m->be = be;
    /* n_layers <= FL_MAX_LAYERS (check_config): these table sizes are small */
    m->w.layers = calloc((size_t)cfg->n_layers, sizeof(fl_layer));
    m->loaded = calloc((size_t)FL_SLOT_COUNT * (size_t)cfg->n_layers, 1);
    wdesc *ws = malloc(sizeof(wdesc) * (3 + 8 * (size_t)cfg->n_layers)); /* list_weights writes <= 3 + 7 per layer */
    fl_status st = FL_OK;
    if (!m->w.layers || !m->loaded || !ws) { st = fl_err(FL_E_NOMEM, "cannot allocate the model tables"); goto fail; }
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

/* The weight arena is allocated only once every tensor of a load has been checked against the config
 * (fl_model_load): a tiny hostile file whose config names huge dimensions costs an error, never an
 * allocation its tensors do not justify. Lays the weights out in list_weights order and writes inv_freq. */
static fl_status arena_alloc(fl_model *m) {
    if (m->arena_d) return FL_OK;
    fl_backend *be = m->be;
    const fl_config *cfg = &m->cfg;
    wdesc *ws = malloc(sizeof(wdesc) * (3 + 8 * (size_t)cfg->n_layers)); /* list_weights writes <= 3 + 7 per layer */
    if (!ws) return fl_err(FL_E_NOMEM, "cannot allocate the model tables");
    fl_status st = be->alloc(be, m->arena_bytes, &m->arena_d);
    if (st != FL_OK) {
        free(ws);
        m->arena_d = NULL;
        return fl_err_prefix(st, "allocating %.2f GiB for the weights on %s", m->arena_bytes / 1073741824.0, be->name);
    }
    const int nw = list_weights(m, ws);
    const size_t es = (size_t)fl_dtype_size(m->wdtype);
    size_t off = 0;
    for (int i = 0; i < nw; i++) {
        ws[i].w->data_d = (char *)m->arena_d + off;
        add_block(&off, ws[i].rows, ws[i].cols, es); /* cannot overflow: the same sum as arena_bytes */
    }
    free(ws);
    if (cfg->tie_embeddings) m->w.lm_head = m->w.embed;
    m->inv_freq_d = (float *)((char *)m->arena_d + off);
    float freqs[FL_MAX_HEAD_DIM / 2];
    rope_freqs(cfg, freqs);
    return be->to_backend(be, m->inv_freq_d, freqs, (size_t)(cfg->head_dim / 2) * sizeof(float));
}

static void ws_release(fl_model *m) {
    fl_backend *be = m->be;
    void **bufs[] = {&m->ws_x, &m->ws_xn, &m->ws_qkv, &m->ws_att, &m->ws_delta, &m->ws_gu, &m->ws_ff,
                     &m->ws_last, &m->ws_logits, (void **)&m->ws_tok_d, (void **)&m->ws_pos_d, (void **)&m->ws_mask_d};
    for (size_t i = 0; i < sizeof bufs / sizeof *bufs; i++) {
        if (*bufs[i]) be->free(be, *bufs[i]);
        *bufs[i] = NULL;
    }
    m->ws_tokens = 0;
}

void fl_model_free(fl_model *m) {
    if (!m) return;
    if (m->be) {
        ws_release(m);
        if (m->arena_d) m->be->free(m->be, m->arena_d);
    }
    free(m->w.layers);
    free(m->loaded);
    free(m);
}

/* Where a slot's tensor lands: the weight, its first row, and the shape expected. */
static fl_status slot_target(fl_model *m, int slot, int layer, fl_weight **w, int64_t *row0, int64_t *rows,
                             int64_t *cols, int *is_vec) {
    const fl_config *c = &m->cfg;
    const int64_t q = (int64_t)c->n_heads * c->head_dim, k = (int64_t)c->n_kv_heads * c->head_dim;
    *row0 = 0; *is_vec = 0;
    if (slot >= FL_SLOT_ATTN_NORM && (layer < 0 || layer >= c->n_layers))
        return fl_err(FL_E_VALUE, "layer %d out of range (model has %d layers)", layer, c->n_layers);
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
    case FL_SLOT_O: *w = &L->wo; *rows = c->d; *cols = q; break;
    case FL_SLOT_GATE: *w = &L->w_gate_up; *rows = c->ffn; *cols = c->d; break;
    case FL_SLOT_UP: *w = &L->w_gate_up; *row0 = c->ffn; *rows = c->ffn; *cols = c->d; break;
    case FL_SLOT_DOWN: *w = &L->w_down; *rows = c->d; *cols = c->ffn; break;
    default: return fl_err(FL_E_VALUE, "unknown weight slot %d", slot);
    }
    return FL_OK;
}

/* The weight a slot fills, its first row there and its shape: for reading weights back (Model.export). */
fl_status fl_model_slot_rows(fl_model *m, int slot, int layer, const fl_weight **w, int64_t *row0, int64_t *rows,
                             int64_t *cols, int *is_vec) {
    fl_weight *wt = NULL;
    FL_TRY(slot_target(m, slot, layer, &wt, row0, rows, cols, is_vec));
    *w = wt;
    return FL_OK;
}

static const char *src_type_name(const fl_src_tensor *s) {
    if (s->kind == FL_SRC_GGML) return fl_ggml_type_name(s->type);
    return s->type >= 0 && s->type < FL_DTYPE_PLAIN_COUNT ? fl_dtype_table[s->type].st_name : "?";
}

/* Check one item against the config and describe its destination. Errors name file and tensor. */
static fl_status plan_one(fl_model *m, const fl_load_item *it, fl_load_job *job) {
    const fl_src_tensor *s = &it->src;
    fl_weight *w = NULL; int64_t row0 = 0, rows = 0, cols = 0; int is_vec = 0;
    fl_status st = slot_target(m, it->slot, it->layer, &w, &row0, &rows, &cols, &is_vec);
    if (st != FL_OK) goto out;
    int shape_ok = is_vec ? (s->ndim == 1 && s->shape[0] == rows)
                          : (s->ndim == 2 && s->shape[0] == rows && s->shape[1] == cols);
    if (!shape_ok) {
        char got[96] = "", *p = got;
        for (int i = 0; i < s->ndim && i < 4; i++) p += snprintf(p, got + sizeof got - p, i ? ", %lld" : "%lld", (long long)s->shape[i]);
        st = is_vec ? fl_err(FL_E_FORMAT, "shape [%s] does not match the config: expected [%lld]", got, (long long)rows)
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
    const int hp = it->unpermute_heads;
    if (hp > 0 && (rows % hp || (rows / hp) % 2)) {
        st = fl_err(FL_E_VALUE, "cannot un-permute %lld rows over %d heads", (long long)rows, hp);
        goto out;
    }
    /* before the arena exists (the checking pass of fl_model_load) there is no destination yet */
    *job = (fl_load_job){.src = s, .dst_d = w->data_d ? (char *)w->data_d + (size_t)row0 * (size_t)cols * (size_t)fl_dtype_size(w->dtype) : NULL,
                         .dst_dtype = w->dtype, .rows = rows, .cols = cols, .unpermute_heads = hp};
out:
    if (st != FL_OK)
        fl_err_prefix(st, "%s: tensor '%s' (%s)", s->file ? s->file : "?", s->name ? s->name : "?",
                      it->slot >= 0 && it->slot < FL_SLOT_COUNT ? fl_slot_names[it->slot] : "?");
    return st;
}

/* Source row feeding destination row r: llama.cpp stores q/k rows of each head interleaved
 * (GGUF row h*hd + 2i + j holds Hugging Face row h*hd + j*hd/2 + i). */
static inline int64_t src_row(const fl_load_job *j, int64_t r) {
    if (j->unpermute_heads <= 0) return r;
    const int64_t hd = j->rows / j->unpermute_heads, h = r / hd, within = r % hd;
    return h * hd + 2 * (within % (hd / 2)) + within / (hd / 2);
}

/* Generic path: convert / dequantise on the host (into a staging buffer unless the backend's
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

static fl_status load_generic(fl_model *m, const fl_load_job *jobs, int n, fl_progress_fn cb, void *ud) {
    fl_status first = FL_OK;
    char errbuf[FL_ERR_MAX] = "";
    uint64_t total = 0, done = 0;
    for (int i = 0; i < n; i++) total += jobs[i].src->nbytes;
    int stop = 0, nthreads = 1;
#ifdef _OPENMP
    nthreads = m->be->n_threads > 0 ? m->be->n_threads : omp_get_max_threads();
#endif
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
    for (int i = 0; i < n; i++) {
        int skip;
#pragma omp atomic read
        skip = stop;
        if (skip) continue;
        fl_status st = convert_job(m->be, &jobs[i]);
#pragma omp critical(fl_load)
        {
            if (st != FL_OK && first == FL_OK) {
                first = st;
                snprintf(errbuf, sizeof errbuf, "%s: tensor '%s': %s", jobs[i].src->file, jobs[i].src->name, fl_err_msg());
                stop = 1;
            }
            done += jobs[i].src->nbytes;
            if (st == FL_OK && cb && !stop && cb(ud, done, total)) {
                first = FL_E_INTERRUPTED;
                snprintf(errbuf, sizeof errbuf, "loading interrupted");
                stop = 1;
            }
        }
    }
    m->stats.bytes_read += done;
    if (nthreads > m->stats.threads) m->stats.threads = nthreads; /* the backend's loader may have used more */
    if (first != FL_OK) return fl_err(first, "%s", errbuf);
    return FL_OK;
}

fl_status fl_model_load(fl_model *m, const fl_load_item *items, int n, fl_progress_fn cb, void *ud) {
    fl_load_job *jobs = calloc((size_t)(n > 0 ? n : 1), sizeof *jobs);
    if (!jobs) return fl_err(FL_E_NOMEM, "cannot allocate the load plan");
    fl_status st = FL_OK;
    /* Check every item first, then allocate the arena, then plan again with the real destinations. */
    for (int i = 0; i < n && st == FL_OK; i++) st = plan_one(m, &items[i], &jobs[i]);
    if (st == FL_OK && !m->arena_d) {
        st = arena_alloc(m);
        for (int i = 0; i < n && st == FL_OK; i++) st = plan_one(m, &items[i], &jobs[i]);
    }
    if (st == FL_OK) {
        /* Plain-dtype tensors may take the backend's pipeline; GGUF blocks are dequantised on the host. */
        if (m->be->load) {
            int np = 0;
            for (int i = 0; i < n; i++) if (jobs[i].src->kind == FL_SRC_PLAIN) { fl_load_job t = jobs[np]; jobs[np++] = jobs[i]; jobs[i] = t; }
            st = m->be->load(m->be, jobs, np, cb, ud, &m->stats);
            if (st == FL_OK && np < n) st = load_generic(m, jobs + np, n - np, cb, ud);
        } else {
            st = load_generic(m, jobs, n, cb, ud);
        }
    }
    if (st == FL_OK)
        for (int i = 0; i < n; i++)
            m->loaded[(size_t)items[i].slot * (size_t)m->cfg.n_layers + (items[i].slot >= FL_SLOT_ATTN_NORM ? items[i].layer : 0)] = 1;
    free(jobs);
    return st;
}

fl_status fl_model_check_complete(const fl_model *m) {
    const fl_config *c = &m->cfg;
    for (int s = 0; s < FL_SLOT_COUNT; s++) {
        const int global = s < FL_SLOT_ATTN_NORM;
        if (s == FL_SLOT_LM_HEAD && c->tie_embeddings) continue;
        if ((s == FL_SLOT_Q_BIAS || s == FL_SLOT_K_BIAS || s == FL_SLOT_V_BIAS) && !c->qkv_bias) continue;
        for (int l = 0; l < (global ? 1 : c->n_layers); l++)
            if (!m->loaded[(size_t)s * (size_t)c->n_layers + l]) {
                if (global) return fl_err(FL_E_FORMAT, "missing tensor for %s", fl_slot_names[s]);
                return fl_err(FL_E_FORMAT, "missing tensor for layer %d %s", l, fl_slot_names[s]);
            }
    }
    return FL_OK;
}

fl_status fl_kv_create(fl_model *m, int batch, int max_len, fl_kvcache **out) {
    const fl_config *c = &m->cfg;
    *out = NULL;
    if (!m->arena_d) return fl_err(FL_E_VALUE, "the model's weights are not loaded");
    if (batch <= 0 || max_len <= 0) return fl_err(FL_E_VALUE, "KV cache: batch and length must be positive");
    size_t per, all;
    if (!fl_mul3_size((size_t)batch, (size_t)max_len, (size_t)c->n_kv_heads, &per) ||
        !fl_mul3_size(per, (size_t)c->head_dim, (size_t)fl_dtype_size(m->be->act), &per) ||
        !fl_align_size(per, ALIGN, &per) || !fl_mul3_size(per, 2, (size_t)c->n_layers, &all))
        return fl_err(FL_E_VALUE, "KV cache for batch %d x %d positions: the size overflows", batch, max_len);
    fl_kvcache *kv = calloc(1, sizeof *kv);
    if (!kv) return fl_err(FL_E_NOMEM, "cannot allocate the KV cache table");
    *kv = (fl_kvcache){.n_layers = c->n_layers, .batch = batch, .max_len = max_len,
                       .n_kv_heads = c->n_kv_heads, .head_dim = c->head_dim, .dtype = m->be->act};
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

/* Grow the activation workspace to N tokens (and logits to n_logit rows). */
fl_status fl_model_reserve(fl_model *m, int N, int n_logit) {
    const fl_config *c = &m->cfg;
    fl_backend *be = m->be;
    const size_t a = (size_t)fl_dtype_size(be->act);
    if (N > m->ws_tokens || n_logit > m->ws_tokens) {
        int cap = N > n_logit ? N : n_logit;
        if (cap <= 0) return fl_err(FL_E_VALUE, "workspace for %d tokens: must be positive", cap);
        ws_release(m);
        const size_t qkv = ((size_t)c->n_heads + 2 * (size_t)c->n_kv_heads) * (size_t)c->head_dim; /* bounded */
        const size_t att = (size_t)c->n_heads * (size_t)c->head_dim;
        /* per-token widths (bounded by check_config); times cap with checked arithmetic */
        struct { void **p; size_t width, es; } want[] = {
            {&m->ws_x, (size_t)c->d, a}, {&m->ws_xn, (size_t)c->d, a},
            {&m->ws_qkv, qkv, a}, {&m->ws_att, att, a},
            {&m->ws_delta, (size_t)c->d, a}, {&m->ws_gu, 2 * (size_t)c->ffn, a},
            {&m->ws_ff, (size_t)c->ffn, a}, {&m->ws_last, (size_t)c->d, a},
            {&m->ws_logits, (size_t)c->vocab, a},
            {(void **)&m->ws_tok_d, 1, 4}, {(void **)&m->ws_pos_d, 1, 4},
        };
        for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
            size_t bytes;
            if (!fl_mul3_size((size_t)cap, want[i].width, want[i].es, &bytes)) {
                ws_release(m);
                return fl_err(FL_E_VALUE, "workspace for %d tokens: the size overflows", cap);
            }
            fl_status st = be->alloc(be, bytes, want[i].p);
            if (st != FL_OK) { ws_release(m); return fl_err_prefix(st, "workspace for %d tokens", cap); }
        }
        m->ws_tokens = cap;
    }
    return FL_OK;
}

fl_status fl_forward_core(fl_model *m, fl_kvcache *kv, const fl_step *step, const int32_t *tok_d, int all_logits) {
    const fl_config *c = &m->cfg;
    fl_backend *be = m->be;
    const int B = step->batch, T = step->n_new, N = B * T;
    if (N > m->ws_tokens) return fl_err(FL_E_INTERNAL, "forward_core: workspace holds %d tokens, %d needed", m->ws_tokens, N);
    const float scale = 1.0f / sqrtf((float)c->head_dim);
#define STEP(call) FL_TRY(call)
    STEP(be->embed(be, m->ws_x, tok_d, N, &m->w.embed));                     /* x: [N, d] */
    for (int l = 0; l < c->n_layers; l++) {
        const fl_layer *W = &m->w.layers[l];
        if (fl_cancel_requested()) return fl_err(FL_E_INTERRUPTED, "interrupted"); /* Ctrl-C in a long forward */
        if (l == 0) STEP(be->rmsnorm(be, m->ws_xn, m->ws_x, &W->attn_norm, N, c->rms_eps));
        else STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &W->attn_norm, N, c->rms_eps));
        STEP(be->matmul(be, m->ws_qkv, m->ws_xn, N, &W->wqkv, c->qkv_bias ? &W->bqkv : NULL)); /* [N, (nh+2nkv)hd] */
        STEP(be->rope_store(be, m->ws_qkv, step, kv, l, c->n_heads, m->inv_freq_d));
        STEP(be->attention(be, m->ws_att, m->ws_qkv, step, kv, l, c->n_heads, c->window[l], scale)); /* [N, nh*hd] */
        STEP(be->matmul(be, m->ws_delta, m->ws_att, N, &W->wo, NULL));      /* [N, d] */
        STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &W->ffn_norm, N, c->rms_eps));
        STEP(be->matmul(be, m->ws_gu, m->ws_xn, N, &W->w_gate_up, NULL));  /* [N, 2*ffn] */
        STEP(be->swiglu(be, m->ws_ff, m->ws_gu, N, c->ffn));                /* [N, ffn] */
        STEP(be->matmul(be, m->ws_delta, m->ws_ff, N, &W->w_down, NULL));   /* [N, d] */
    }
    STEP(be->add_rmsnorm(be, m->ws_xn, m->ws_x, m->ws_delta, &m->w.final_norm, N, c->rms_eps));
    if (all_logits || T == 1) {
        STEP(be->matmul(be, m->ws_logits, m->ws_xn, N, &m->w.lm_head, NULL)); /* [N, vocab] */
    } else {
        int32_t rows_s[256];
        int32_t *rows = B <= 256 ? rows_s : malloc((size_t)B * 4);
        if (!rows) return fl_err(FL_E_NOMEM, "forward: row list");
        for (int b = 0; b < B; b++) rows[b] = b * T + T - 1;
        fl_status st = be->gather_rows(be, m->ws_last, m->ws_xn, rows, B, c->d); /* [B, d] */
        if (rows != rows_s) free(rows);
        FL_TRY(st);
        STEP(be->matmul(be, m->ws_logits, m->ws_last, B, &m->w.lm_head, NULL)); /* [B, vocab] */
    }
#undef STEP
    return FL_OK;
}

fl_status fl_forward(fl_model *m, fl_kvcache *kv, int B, int T, int start, const int32_t *tokens,
                     const int32_t *pos, const uint8_t *kmask, int kmask_stride, int all_logits, float *logits_h) {
    fl_backend *be = m->be;
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
    const fl_step step = {.batch = B, .n_new = T, .start = start, .pos_d = m->ws_pos_d, .kmask_d = kmask_use,
                          .kmask_stride = kmask_stride};
    if (st == FL_OK) st = fl_forward_core(m, kv, &step, m->ws_tok_d, all_logits);
    if (st == FL_OK) st = be->logits_to_host(be, logits_h, m->ws_logits, all_logits ? N : B, m->cfg.vocab);
    if (st == FL_OK) st = be->sync(be);
    if (kmask_d) be->free(be, kmask_d);
    return st;
}
