// cuda_backend.cu: the CUDA backend's function table (fl_backend.h): memory, transfers, sync,
// and thin adapters from the interface's structs to the op launchers (norm.cuh, rope.cuh,
// matmul.cuh, attention.cuh). Every op is asynchronous on the backend's stream, makes no host
// synchronisation and allocates nothing once its scratch has grown, so a decode step can be
// captured in a CUDA graph.
//
// Memory: `alloc`/`free` keep be->mem_allocated/mem_peak and report to the process-wide
// counters (fl_cuda_account, cuda_memory.cu), which also see the backend's own scratch (cuBLAS
// workspace, attention workspace, logits staging).
//
// dtypes: activations, KV cache and every weight are in the backend's `act` dtype (float16,
// bfloat16, or float32 through the same templates). A weight of another dtype is refused with
// FL_E_UNSUPPORTED naming the op: the model must be created with wdtype == be->act on CUDA (the
// loader converts checkpoint dtypes on the device). The exception: quantised weights (FL_QUANT,
// csrc/quant.h) in matmul and embed, which qmatmul.cu dequantises on the fly; `quantize` writes them.
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <new>

#include "cuda_backend.cuh"
#include "loader.cuh"
#include "lowrank.cuh"
#include "attention.cuh"
#include "convert.cuh"
#include "matmul.cuh"
#include "moe.cuh"
#include "../quant.h"
#include "norm.cuh"
#include "qmatmul.cuh"
#include "sample.cuh"
#include "rope.cuh"
// The loading pipeline (loader.cuh, another unit) is wired in fl_cuda_backend_init, see there.

#define IMPL(be) fl_cuda_impl_of(be)

// ---------------------------------------------------------------------------------------------
// memory and transfers
// ---------------------------------------------------------------------------------------------
static fl_status cu_alloc(fl_backend *be, size_t bytes, void **out) {
    fl_cuda_impl *c = IMPL(be);
    *out = NULL;
    FL_TRY(fl_cuda_enter(c));
    void *p = NULL;
    const cudaError_t e = cudaMalloc(&p, bytes ? bytes : 1);
    if (e != cudaSuccess) {
        cudaGetLastError();  // an allocation failure is not sticky; clear it for later calls
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        return fl_err(e == cudaErrorMemoryAllocation ? FL_E_NOMEM : FL_E_DEVICE,
                      "cudaMalloc(%zu bytes) failed at %s:%d on cuda:%d: %s (%s); %.2f GiB free of %.2f GiB",
                      bytes, __FILE__, __LINE__, c->device, cudaGetErrorString(e), cudaGetErrorName(e),
                      free_b / 1073741824.0, total_b / 1073741824.0);
    }
    {
        std::lock_guard<std::mutex> g(c->mu);
        try {
            c->blocks.push_back(fl_cuda_block{p, bytes});
        } catch (...) {
            cudaFree(p);
            return fl_err(FL_E_NOMEM, "cannot grow the CUDA allocation table");
        }
        be->mem_allocated += bytes;
        if (be->mem_allocated > be->mem_peak) be->mem_peak = be->mem_allocated;
    }
    fl_cuda_account(c->device, (long long)bytes);
    *out = p;
    return FL_OK;
}

static void cu_free(fl_backend *be, void *p) {
    if (!p) return;
    fl_cuda_impl *c = IMPL(be);
    size_t bytes = 0;
    {
        std::lock_guard<std::mutex> g(c->mu);
        for (size_t i = c->blocks.size(); i-- > 0;) {
            if (c->blocks[i].p == p) {
                bytes = c->blocks[i].bytes;
                be->mem_allocated -= bytes;
                c->blocks[i] = c->blocks.back();
                c->blocks.pop_back();
                break;
            }
        }
    }
    fl_cuda_account(c->device, -(long long)bytes);
    if (cudaSetDevice(c->device) == cudaSuccess) cudaFree(p);  // waits for pending work on p
    cudaGetLastError();  // free() cannot report; keep the error state clean for the next op
}

// From pageable host memory, cudaMemcpyAsync returns once the bytes are staged, so `src_h` may
// be reused or freed on return. From pinned memory the copy is truly asynchronous: the caller
// keeps the buffer until sync (the loading pipeline does).
static fl_status cu_to_backend(fl_backend *be, void *dst_d, const void *src_h, size_t bytes) {
    fl_cuda_impl *c = IMPL(be);
    if (!bytes) return FL_OK;
    FL_TRY(fl_cuda_enter(c));
    FL_CUDA_CHECK(cudaMemcpyAsync(dst_d, src_h, bytes, cudaMemcpyHostToDevice, c->stream));
    return FL_OK;
}

static fl_status cu_to_host(fl_backend *be, void *dst_h, const void *src_d, size_t bytes) {
    fl_cuda_impl *c = IMPL(be);
    if (!bytes) return FL_OK;
    FL_TRY(fl_cuda_enter(c));
    FL_CUDA_CHECK(cudaMemcpyAsync(dst_h, src_d, bytes, cudaMemcpyDeviceToHost, c->stream));
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return FL_OK;
}

static fl_status cu_sync(fl_backend *be) {
    fl_cuda_impl *c = IMPL(be);
    FL_TRY(fl_cuda_enter(c));
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    FL_CUDA_CHECK(cudaGetLastError());
    return FL_OK;
}

// Scratch owned by the backend: not in be->mem_allocated (which counts `alloc`), but in the
// process-wide counters (fl_cuda_account) like every device byte fastload holds.
fl_status fl_cuda_grow(fl_backend *be, void **buf, size_t *have, size_t bytes, const char *what) {
    fl_cuda_impl *c = IMPL(be);
    if (bytes <= *have) return FL_OK;
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    FL_CUDA_CHECK(cudaStreamIsCapturing(c->stream, &cs));
    if (cs != cudaStreamCaptureStatusNone)
        return fl_err(FL_E_INTERNAL, "%s needs %zu bytes of scratch on %s, which cannot be allocated while a CUDA "
                      "graph is captured: run the same shapes once before capturing", what, bytes, c->name);
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));  // the old buffer may still be in use
    be->scratch_epoch++;                               // graphs holding the old address are stale
    if (*buf) {
        FL_CUDA_CHECK(cudaFree(*buf));
        fl_cuda_account(c->device, -(long long)*have);
    }
    *buf = NULL;
    *have = 0;
    const cudaError_t e = cudaMalloc(buf, bytes);
    if (e != cudaSuccess) {
        cudaGetLastError();
        *buf = NULL;
        return fl_err(e == cudaErrorMemoryAllocation ? FL_E_NOMEM : FL_E_DEVICE, "cudaMalloc(%zu bytes) for %s failed on %s: %s",
                      bytes, what, c->name, cudaGetErrorString(e));
    }
    *have = bytes;
    fl_cuda_account(c->device, (long long)bytes);
    return FL_OK;
}

static void cu_destroy(fl_backend *be) {
    if (!be) return;
    fl_cuda_impl *c = IMPL(be);
    if (c) {
        if (cudaSetDevice(c->device) == cudaSuccess) {
            if (c->stream) cudaStreamSynchronize(c->stream);
            if (c->blas) cublasDestroy(c->blas);
            if (c->blas_ws) cudaFree(c->blas_ws);
            if (c->attn_ws) cudaFree(c->attn_ws);
            if (c->att_sync) cudaFree(c->att_sync);
            if (c->scratch) cudaFree(c->scratch);
            if (c->rope_cs) cudaFree(c->rope_cs);
            if (c->qws) cudaFree(c->qws);
            if (c->qx) cudaFree(c->qx);
            if (c->qxq) cudaFree(c->qxq);
            for (int s = 0; s < 2; s++) {
                if (c->lg_pin[s]) cudaFreeHost(c->lg_pin[s]);
                if (c->lg_ev[s]) cudaEventDestroy(c->lg_ev[s]);
                if (c->tok_d[s]) cudaFree(c->tok_d[s]);
                if (c->tok_h[s]) cudaFreeHost(c->tok_h[s]);
                if (c->tok_ev[s]) cudaEventDestroy(c->tok_ev[s]);
            }
            if (c->stream) cudaStreamDestroy(c->stream);
        }
        cudaGetLastError();
        // the counters drop whether or not the frees succeeded (a broken context holds nothing)
        if (c->blas_ws) fl_cuda_account(c->device, -(long long)FL_CUDA_BLAS_WS_BYTES);
        if (c->attn_ws) fl_cuda_account(c->device, -(long long)c->attn_ws_bytes);
        if (c->att_sync) fl_cuda_account(c->device, -(long long)c->att_sync_bytes);
        if (c->scratch) fl_cuda_account(c->device, -(long long)c->scratch_bytes);
        if (c->rope_cs) fl_cuda_account(c->device, -(long long)c->rope_cs_bytes);
        if (c->qws) fl_cuda_account(c->device, -(long long)c->qws_bytes);
        if (c->qx) fl_cuda_account(c->device, -(long long)c->qx_bytes);
        if (c->qxq) fl_cuda_account(c->device, -(long long)c->qxq_bytes);
        for (int s = 0; s < 2; s++)
            if (c->tok_d[s]) fl_cuda_account(c->device, -(long long)c->tok_cap * 4);
        delete c;
    }
    free(be);
}

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------
static fl_status need_act(const fl_backend *be, const fl_weight *w, const char *op) {
    if (w->dtype != be->act)
        return fl_err(FL_E_UNSUPPORTED, "CUDA %s: weight dtype %s differs from the activation dtype %s; on CUDA the "
                      "model's weights must be stored in the activation dtype", op, fl_cuda_dtype_name(w->dtype),
                      fl_cuda_dtype_name(be->act));
    return FL_OK;
}

static fl_status cu_embed(fl_backend *be, void *x_d, const int32_t *tokens_d, int n, const fl_weight *emb) {
    if (emb->dtype == FL_QUANT) {
        FL_TRY(fl_cuda_enter(IMPL(be)));
        return fl_cuda_qembed(be, x_d, tokens_d, n, emb);
    }
    FL_TRY(need_act(be, emb, "embed"));
    FL_TRY(fl_cuda_enter(IMPL(be)));
    return fl_cuda_embed(IMPL(be)->stream, be->act, x_d, tokens_d, n, emb->data_d, emb->rows, emb->cols);
}

// RMSNorm / SwiGLU whose output feeds the matmul with `next` (NULL: unknown) right after: for a quantised
// weight that will take the dp2a GEMV, the op also writes that GEMV's int16 x (fl_cuda_qx_target), one
// kernel fewer per matmul.
static fl_status cu_rmsnorm(fl_backend *be, void *out_d, const void *x_d, const fl_weight *w, int n, float eps,
                            const fl_weight *next) {
    FL_TRY(need_act(be, w, "rmsnorm"));
    FL_TRY(fl_cuda_enter(IMPL(be)));
    fl_qx_dst qd;
    FL_TRY(fl_cuda_qx_target(be, next, out_d, n, w->rows, &qd));
    FL_TRY(fl_cuda_rmsnorm(IMPL(be)->stream, be->act, out_d, x_d, w->data_d, n, w->rows, eps, qd));
    if (qd.bits) fl_cuda_qx_written(be, next, out_d, n, qd.bits);
    return FL_OK;
}

static fl_status cu_add_rmsnorm(fl_backend *be, void *out_d, void *resid_d, const void *delta_d, const fl_weight *w,
                                int n, float eps, const fl_weight *next) {
    FL_TRY(need_act(be, w, "add_rmsnorm"));
    FL_TRY(fl_cuda_enter(IMPL(be)));
    fl_qx_dst qd;
    FL_TRY(fl_cuda_qx_target(be, next, out_d, n, w->rows, &qd));
    FL_TRY(fl_cuda_add_rmsnorm(IMPL(be)->stream, be->act, out_d, resid_d, delta_d, w->data_d, n, w->rows, eps, qd));
    if (qd.bits) fl_cuda_qx_written(be, next, out_d, n, qd.bits);
    return FL_OK;
}

static fl_status cu_matmul(fl_backend *be, void *y_d, const void *x_d, int n, const fl_weight *W, const fl_weight *bias) {
    const void *b = bias && bias->data_d ? bias->data_d : NULL;
    if (b) FL_TRY(need_act(be, bias, "matmul (bias)"));
    fl_cuda_impl *c = IMPL(be);
    if (W->dtype == FL_QUANT) {
        FL_TRY(fl_cuda_enter(c));
        return fl_cuda_qmatmul(be, y_d, x_d, n, W, b);
    }
    FL_TRY(need_act(be, W, "matmul"));
    FL_TRY(fl_cuda_enter(c));
    return fl_cuda_matmul(c->stream, c->blas, be->act, y_d, x_d, n, W->data_d, W->rows, W->cols, b, c->gemv_up_to,
                          c->gemv_variant);
}

// rope_cs, the cos / sin table of a forward's positions: its bytes, and what a layer's rope does with it (see
// cu_rope_store: layer 0 writes it, the others read it; none when it could not be grown)
static size_t rope_table_bytes(const fl_step *s, const fl_kvcache *kv) {
    return (size_t)s->batch * (size_t)s->n_new * (size_t)kv->head_dim * sizeof(float);
}
static int rope_table_mode(const fl_cuda_impl *c, const fl_step *s, const fl_kvcache *kv, int layer) {
    return rope_table_bytes(s, kv) > c->rope_cs_bytes ? FL_ROPE_TABLE_NONE
           : layer == 0                                ? FL_ROPE_TABLE_WRITE
                                                       : FL_ROPE_TABLE_READ;
}

static fl_status cu_rope_store(fl_backend *be, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer, int n_heads,
                               const float *inv_freq_d, const fl_rope_style *style, const fl_weight *qk_norm, float eps) {
    if (kv->dtype != be->act)
        return fl_err(FL_E_UNSUPPORTED, "CUDA rope_store: KV cache dtype %s differs from the activation dtype %s",
                      fl_cuda_dtype_name(kv->dtype), fl_cuda_dtype_name(be->act));
    if (layer < 0 || layer >= kv->n_layers) return fl_err(FL_E_VALUE, "rope_store: layer %d of %d", layer, kv->n_layers);
    if (qk_norm) {  // Qwen3's q_norm | k_norm, fused into the rope kernel
        FL_TRY(need_act(be, qk_norm, "rope_store (q/k norm)"));
        if (qk_norm->rows != 2 * (int64_t)kv->head_dim || !qk_norm->data_d)
            return fl_err(FL_E_VALUE, "rope_store: the q/k norm weight has %lld rows, expected 2 x head_dim = %d",
                          (long long)qk_norm->rows, 2 * kv->head_dim);
    }
    fl_cuda_impl *c = IMPL(be);
    FL_TRY(fl_cuda_enter(c));
    const size_t need = rope_table_bytes(s, kv);
    // Layer 0 of a forward writes cos/sin of every token's position into rope_cs; the other layers
    // (same positions: one forward = one fl_step) read it. The table is grown outside capture only:
    // a captured step whose table would not fit (never seen: prefill runs first with more tokens)
    // computes cos/sin in every layer instead. The table's size only changes at layer 0, so
    // `need <= rope_cs_bytes` at a later layer means layer 0 of this forward wrote it (rope_table_mode).
    if (layer == 0 && need > c->rope_cs_bytes) {
        cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
        FL_CUDA_CHECK(cudaStreamIsCapturing(c->stream, &cs));
        if (cs == cudaStreamCaptureStatusNone)
            FL_TRY(fl_cuda_grow(be, (void **)&c->rope_cs, &c->rope_cs_bytes, need, "rope cos/sin"));
    }
    const int mode = rope_table_mode(c, s, kv, layer);
    return fl_cuda_rope_store(c->stream, be->act, qkv_d, s->batch, s->n_new, s->start, s->start_d, s->pos_d,
                              inv_freq_d, kv->k_d[layer], kv->v_d[layer], kv->max_len, n_heads, kv->n_kv_heads,
                              kv->head_dim, c->rope_cs, mode, &s->pg, qk_norm ? qk_norm->data_d : NULL, eps, style,
                              &s->dyn);
}

// With next (o_proj) quantised for the dp2a GEMV, a decode step's combine kernel also writes that GEMV's x. rope: NULL,
// or this step's rope left to the attention (fl_att_rope: the decode kernel rotates q and k and stores k / v).
static fl_status attention_rope(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s,
                                const fl_kvcache *kv, int layer, int n_heads, int window, float scale,
                                const fl_weight *next, const fl_att_rope *rope) {
    fl_cuda_impl *c = IMPL(be);
    if (kv->dtype != be->act)
        return fl_err(FL_E_UNSUPPORTED, "CUDA attention: KV cache dtype %s differs from the activation dtype %s",
                      fl_cuda_dtype_name(kv->dtype), fl_cuda_dtype_name(be->act));
    if (layer < 0 || layer >= kv->n_layers) return fl_err(FL_E_VALUE, "attention: layer %d of %d", layer, kv->n_layers);
    FL_TRY(fl_cuda_enter(c));
    const size_t need = fl_cuda_attention_workspace(s->batch, n_heads, kv->head_dim, kv->max_len);
    FL_TRY(fl_cuda_grow(be, &c->attn_ws, &c->attn_ws_bytes, need, "attention"));
    fl_qx_dst qd;
    qd.bits = 0;
    const int n = s->batch * s->n_new;
    if (s->n_new == 1) FL_TRY(fl_cuda_qx_target(be, next, out_d, n, (int64_t)n_heads * kv->head_dim, &qd));
    int *sync = NULL;
    if (c->att_fuse && s->n_new == 1) {  // decode: the combine in the split kernel's grid; its counters start at zero
        const size_t sb = (1 + (size_t)s->batch * n_heads) * sizeof(int);
        if (sb > c->att_sync_bytes) {
            FL_TRY(fl_cuda_grow(be, (void **)&c->att_sync, &c->att_sync_bytes, sb, "attention counters"));
            FL_CUDA_CHECK(cudaMemsetAsync(c->att_sync, 0, c->att_sync_bytes, c->stream));
        }
        sync = c->att_sync;
    }
    FL_TRY(fl_cuda_attention_qx(c->stream, be->act, out_d, qkv_d, s->batch, s->n_new, s->start, s->start_d, s->kmask_d,
                                s->kmask_stride, kv->k_d[layer], kv->v_d[layer], kv->max_len, n_heads, kv->n_kv_heads,
                                kv->head_dim, window, scale, c->attn_ws, c->attn_ws_bytes, &s->pg, &qd, rope, sync,
                                c->att_sync_bytes));
    if (qd.bits) fl_cuda_qx_written(be, next, out_d, n, qd.bits);
    return FL_OK;
}

static fl_status cu_attention(fl_backend *be, void *out_d, const void *qkv_d, const fl_step *s, const fl_kvcache *kv,
                              int layer, int n_heads, int window, float scale, const fl_weight *next) {
    return attention_rope(be, out_d, qkv_d, s, kv, layer, n_heads, window, scale, next, NULL);
}

// rope_store + attention of a layer. Where rope_store would read the cos / sin table (layers after the first of a
// forward) and no q/k norm is fused into it, the attention rotates q and k itself (FASTLOAD_ROPE_FUSE=1, the default;
// attention.cuh's fl_att_rope): on decode steps one kernel and its launch gap fewer a layer, the same bits.
static fl_status cu_rope_attention(fl_backend *be, void *out_d, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                                   int n_heads, const float *inv_freq_d, const fl_rope_style *style,
                                   const fl_weight *qk_norm, float eps, int window, float scale, const fl_weight *next) {
    fl_cuda_impl *c = IMPL(be);
    if (!c->rope_fuse || qk_norm || layer < 0 || layer >= kv->n_layers ||
        rope_table_mode(c, s, kv, layer) != FL_ROPE_TABLE_READ) {
        FL_TRY(cu_rope_store(be, qkv_d, s, kv, layer, n_heads, inv_freq_d, style, qk_norm, eps));
        return attention_rope(be, out_d, qkv_d, s, kv, layer, n_heads, window, scale, next, NULL);
    }
    const fl_att_rope rope = {c->rope_cs, style};
    return attention_rope(be, out_d, qkv_d, s, kv, layer, n_heads, window, scale, next, &rope);
}

static fl_status cu_swiglu(fl_backend *be, void *out_d, const void *gu_d, int n, int f, const fl_weight *next) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    fl_qx_dst qd;
    FL_TRY(fl_cuda_qx_target(be, next, out_d, n, f, &qd));
    FL_TRY(fl_cuda_swiglu(IMPL(be)->stream, be->act, out_d, gu_d, n, f, qd));
    if (qd.bits) fl_cuda_qx_written(be, next, out_d, n, qd.bits);
    return FL_OK;
}

// gate|up then SwiGLU. Decode (n within the GEMV's range, 16-bit or float32 weights, and a down_proj that does not
// take the dp2a GEMV's int16 x from SwiGLU): one GEMV with SwiGLU in its epilogue, gu_d untouched. Otherwise the
// two ops. FASTLOAD_GLU_FUSE=0 turns the fused kernel off (A/B); FASTLOAD_GLU_U=4|8 its loads a lane per row.
static fl_status cu_matmul_swiglu(fl_backend *be, void *out_d, void *gu_d, const void *x_d, int n, const fl_weight *W,
                                  int f, const fl_weight *next) {
    fl_cuda_impl *c = IMPL(be);
    const int up_to = c->gemv_up_to < 0 ? FL_MATMUL_GEMV_UP_TO : c->gemv_up_to;
    if (c->glu_u && W->dtype == be->act && W->rows == 2 * (int64_t)f && n <= up_to && n <= FL_GEMV_GLU_MAX_N &&
        (!next || next->dtype != FL_QUANT)) {
        FL_TRY(fl_cuda_enter(c));
        const fl_status st = fl_cuda_gemv_swiglu(c->stream, be->act, out_d, x_d, n, W->data_d, f, W->cols, c->glu_u);
        if (st != FL_E_UNSUPPORTED) return st;
        fl_err_clear();  // rows not whole vectors: the two ops
    }
    FL_TRY(cu_matmul(be, gu_d, x_d, n, W, NULL));
    return cu_swiglu(be, out_d, gu_d, n, f, next);
}

// Mixture of Experts (moe.cu). Routing and grouping on the device; the experts through the grouped GEMV (only
// the chosen experts' rows are read, expert ids from device memory: graph-safe), or, for a prefill (may_sync)
// with many slots outside graph capture, per-expert GEMMs (cuBLAS) after reading the expert counts on the host.
#define FL_MOE_GEMM_FROM 64  /* slots (tokens x top_k) from which a prefill takes per-expert GEMMs */
static fl_status cu_moe_route(fl_backend *be, int32_t *ids_d, float *wts_d, const void *logits_d, int n, int E, int k,
                              int norm) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    return fl_cuda_moe_route(IMPL(be)->stream, be->act, ids_d, wts_d, logits_d, n, E, k, norm);
}

static fl_status cu_moe_ffn(fl_backend *be, void *out_d, const void *x_d, int n, const int32_t *ids_d,
                            const float *wts_d, int k, int E, const fl_weight *w13, const fl_weight *w2,
                            const fl_moe_scratch *ws, int may_sync) {
    /* quantised experts (quantisation at load): the same grouping; decode through the quantised grouped GEMV,
     * prefill through fl_cuda_qmatmul on each expert's rows (its GEMV or dequantised chunks + cuBLAS) */
    const int q13 = w13->dtype == FL_QUANT, q2 = w2->dtype == FL_QUANT;
    if (!q13) FL_TRY(need_act(be, w13, "moe (gate|up experts)"));
    if (!q2) FL_TRY(need_act(be, w2, "moe (down experts)"));
    fl_cuda_impl *c = IMPL(be);
    FL_TRY(fl_cuda_enter(c));
    const int64_t d = w13->cols, f = w2->cols, nk = (int64_t)n * k;
    if (w13->rows != (int64_t)E * 2 * f || w2->rows != (int64_t)E * d)
        return fl_err(FL_E_INTERNAL, "moe: expert weights [%lld, %lld] / [%lld, %lld] do not hold %d experts",
                      (long long)w13->rows, (long long)w13->cols, (long long)w2->rows, (long long)w2->cols, E);
    if (nk > INT32_MAX) return fl_err(FL_E_VALUE, "moe: %lld slots is too many", (long long)nk);
    const size_t es = (size_t)fl_dtype_size(be->act);
    cudaStream_t st = c->stream;
    const fl_qx_dst none = {0, NULL, NULL};
    FL_TRY(fl_cuda_moe_group(st, ids_d, (int)nk, E, ws->offs, ws->perm, ws->inv));
    cudaStreamCaptureStatus cs = cudaStreamCaptureStatusNone;
    FL_CUDA_CHECK(cudaStreamIsCapturing(st, &cs));
    if (may_sync && cs == cudaStreamCaptureStatusNone && nk >= FL_MOE_GEMM_FROM && ws->offs_h) {
        FL_CUDA_CHECK(cudaMemcpyAsync(ws->offs_h, ws->offs, (size_t)(E + 1) * 4, cudaMemcpyDeviceToHost, st));
        FL_CUDA_CHECK(cudaStreamSynchronize(st));
        FL_TRY(fl_cuda_moe_gather(st, be->act, ws->xs, x_d, ws->perm, k, (int)nk, d));
        for (int pass = 0; pass < 2; pass++) { /* gate|up of each expert's slots, SwiGLU, then down */
            const fl_weight *w = pass ? w2 : w13;
            const int64_t R = pass ? d : 2 * f, C = pass ? f : d;
            char *out = (char *)(pass ? ws->y : ws->gu);
            const char *in = (const char *)(pass ? ws->ff : ws->xs);
            for (int e = 0; e < E; e++) {
                const int o = ws->offs_h[e], cnt = ws->offs_h[e + 1] - o;
                if (cnt <= 0) continue;
                const fl_weight v = fl_weight_rows(w, (int64_t)e * R, R);
                if (v.dtype == FL_QUANT)
                    FL_TRY(fl_cuda_qmatmul(be, out + (size_t)o * R * es, in + (size_t)o * C * es, cnt, &v, NULL));
                else
                    FL_TRY(fl_cuda_matmul(st, c->blas, be->act, out + (size_t)o * R * es, in + (size_t)o * C * es, cnt,
                                          v.data_d, R, C, NULL, c->gemv_up_to, c->gemv_variant));
            }
            if (!pass) FL_TRY(fl_cuda_swiglu(st, be->act, ws->ff, ws->gu, (int)nk, f, none));
        }
    } else {
        const int max_active = nk < E ? (int)nk : E;
        if (q13) FL_TRY(fl_cuda_moe_qgemv(be, ws->gu, x_d, n, n, ws->perm, k, ws->offs, E, max_active, w13, 2 * f, false));
        else FL_TRY(fl_cuda_moe_gemv(st, be->act, ws->gu, x_d, ws->perm, k, ws->offs, E, max_active, w13->data_d, 2 * f, d));
        fl_qx_dst qd = none;  // SwiGLU writes down_proj's x for the experts' dp2a GEMV where it takes it
        if (q2) FL_TRY(fl_cuda_moe_qx_target(be, w2, d, ws->ff, (int)nk, n, &qd));
        FL_TRY(fl_cuda_swiglu(st, be->act, ws->ff, ws->gu, (int)nk, f, qd));
        if (q2) FL_TRY(fl_cuda_moe_qgemv(be, ws->y, ws->ff, (int)nk, n, NULL, 1, ws->offs, E, max_active, w2, d, qd.bits != 0));
        else FL_TRY(fl_cuda_moe_gemv(st, be->act, ws->y, ws->ff, NULL, 1, ws->offs, E, max_active, w2->data_d, d, f));
    }
    return fl_cuda_moe_combine(st, be->act, out_d, ws->y, ids_d, wts_d, ws->inv, n, k, d);
}

static fl_status cu_gather_rows(fl_backend *be, void *dst_d, const void *src_d, const int32_t *rows_h, int n, int d) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    return fl_cuda_gather_rows(IMPL(be)->stream, be->act, dst_d, src_d, rows_h, n, d);
}

// The two pinned buffers and their events, made at the first call that needs them: 0 when the host will not pin
// 64 MiB more (the plain path then serves).
static int logits_pin_ready(fl_cuda_impl *c) {
    for (int s = 0; s < 2; s++) {
        if (!c->lg_pin[s] && cudaHostAlloc((void **)&c->lg_pin[s], FL_CUDA_LOGITS_PIN * 4, cudaHostAllocDefault) != cudaSuccess) {
            cudaGetLastError();
            c->lg_pin[s] = NULL;
            return 0;
        }
        if (!c->lg_ev[s] && cudaEventCreateWithFlags(&c->lg_ev[s], cudaEventDisableTiming) != cudaSuccess) {
            cudaGetLastError();
            c->lg_ev[s] = NULL;
            return 0;
        }
    }
    return 1;
}

// Many rows (a forward's logits of every position, over 2 pinned buffers' worth): through two pinned buffers in turn,
// each chunk's device-to-host copy running while the host copies the chunk before into dst_h on several threads
// (fl_copy_parallel). A copy from the device straight into pageable memory goes through the driver's own staging and
// one thread, which also takes every first-touch page fault of a fresh array: ~2.5 GB/s on an H200 host, so 4096
// positions x 152064 logits (2.5 GB) took ~1 s of a 1.15 s forward. Synchronous when it takes this path.
static fl_status logits_pinned(fl_cuda_impl *c, float *dst_h, const void *src_d, fl_dtype act, size_t total) {
    const size_t es = (size_t)fl_dtype_size(act), chunk = FL_CUDA_LOGITS_PIN;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    const int threads = ncpu >= 16 ? 8 : ncpu >= 4 ? (int)(ncpu / 2) : 1;  // half the cores, 8 at most
    size_t prev_off = 0, prev_cnt = 0;
    int k = 0;
    for (size_t off = 0; off < total; off += chunk, k ^= 1) {
        const size_t cnt = total - off < chunk ? total - off : chunk;
        if (act == FL_F32) {
            FL_CUDA_CHECK(cudaMemcpyAsync(c->lg_pin[k], (const float *)src_d + off, cnt * 4, cudaMemcpyDeviceToHost, c->stream));
        } else {
            FL_TRY(fl_cuda_convert(c->stream, c->scratch, FL_F32, (const char *)src_d + off * es, act, cnt));
            FL_CUDA_CHECK(cudaMemcpyAsync(c->lg_pin[k], c->scratch, cnt * 4, cudaMemcpyDeviceToHost, c->stream));
        }
        FL_CUDA_CHECK(cudaEventRecord(c->lg_ev[k], c->stream));
        if (prev_cnt) {  // the chunk before, in the other buffer, while this one's copy runs
            FL_CUDA_CHECK(cudaEventSynchronize(c->lg_ev[k ^ 1]));
            fl_copy_parallel(dst_h + prev_off, c->lg_pin[k ^ 1], prev_cnt * 4, threads);
        }
        prev_off = off;
        prev_cnt = cnt;
    }
    FL_CUDA_CHECK(cudaEventSynchronize(c->lg_ev[k ^ 1]));
    fl_copy_parallel(dst_h + prev_off, c->lg_pin[k ^ 1], prev_cnt * 4, threads);
    return FL_OK;
}

// Logits: widened to float32 on the device into a scratch buffer (at most
// FL_CUDA_SCRATCH_MAX_BYTES, so all-token logits of a long prompt go in chunks; stream order
// keeps a chunk's copy ahead of the next conversion), then copied to the host. The caller syncs.
static fl_status cu_logits_to_host(fl_backend *be, float *dst_h, const void *src_d, int n, int vocab) {
    fl_cuda_impl *c = IMPL(be);
    const size_t total = (size_t)(n > 0 ? n : 0) * (size_t)(vocab > 0 ? vocab : 0);
    if (!total) return FL_OK;
    FL_TRY(fl_cuda_enter(c));
    if (total > 2 * FL_CUDA_LOGITS_PIN && c->logits_pin && logits_pin_ready(c)) {
        if (be->act != FL_F32)
            FL_TRY(fl_cuda_grow(be, &c->scratch, &c->scratch_bytes, FL_CUDA_LOGITS_PIN * 4, "logits_to_host"));
        return logits_pinned(c, dst_h, src_d, be->act, total);
    }
    if (be->act == FL_F32) {
        FL_CUDA_CHECK(cudaMemcpyAsync(dst_h, src_d, total * 4, cudaMemcpyDeviceToHost, c->stream));
        return FL_OK;
    }
    size_t chunk = total * 4 < FL_CUDA_SCRATCH_MAX_BYTES ? total : FL_CUDA_SCRATCH_MAX_BYTES / 4;
    FL_TRY(fl_cuda_grow(be, &c->scratch, &c->scratch_bytes, chunk * 4, "logits_to_host"));
    const size_t es = (size_t)fl_dtype_size(be->act);
    for (size_t off = 0; off < total; off += chunk) {
        const size_t cnt = total - off < chunk ? total - off : chunk;
        FL_TRY(fl_cuda_convert(c->stream, c->scratch, FL_F32, (const char *)src_d + off * es, be->act, cnt));
        FL_CUDA_CHECK(cudaMemcpyAsync(dst_h + off, c->scratch, cnt * 4, cudaMemcpyDeviceToHost, c->stream));
    }
    return FL_OK;
}

// Quantisation at load (qmatmul.cu): rows of a dense matrix in device memory -> codes, scales, offsets.
static fl_status cu_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows,
                             const void *src_d, fl_dtype src_dtype) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    return fl_cuda_quantize(be, W, scheme, row0, rows, src_d, src_dtype);
}

// LoRA merge at load (lowrank.cu): float32 scratch of at most 64 MiB (row chunks) and a flag, both from `alloc`
// (accounted), freed before returning; waits for the result to read the flag.
static fl_status cu_add_lowrank(fl_backend *be, void *w_d, fl_dtype dt, int64_t rows, int64_t cols, const float *b_d,
                                const float *a_d, int r, float scale) {
    fl_cuda_impl *c = IMPL(be);
    FL_TRY(fl_cuda_enter(c));
    const size_t cap = (size_t)64 << 20, row = (size_t)cols * sizeof(float);
    size_t want = (size_t)rows * row;  // rows, cols bounded by the config
    if (want > cap) want = row > cap ? row : cap / row * row;
    void *buf = NULL;
    FL_TRY(cu_alloc(be, want + 256, &buf));
    int *bad = (int *)buf;
    float *tmp = (float *)((char *)buf + 256);
    fl_status st = FL_OK;
    cudaError_t e = cudaMemsetAsync(bad, 0, sizeof(int), c->stream);
    if (e != cudaSuccess) st = fl_err(FL_E_DEVICE, "cudaMemsetAsync failed on %s: %s", c->name, cudaGetErrorString(e));
    if (st == FL_OK) st = fl_cuda_add_lowrank(c->stream, c->blas, w_d, dt, rows, cols, b_d, a_d, r, scale, tmp, want / 4, bad);
    int nbad = 0;
    if (st == FL_OK) st = cu_to_host(be, &nbad, bad, sizeof nbad);
    cu_free(be, buf);
    if (st == FL_OK && nbad)
        st = fl_err(FL_E_VALUE, "LoRA merge gives non-finite %s values (scale %g): lora_alpha too large, or NaN / inf "
                    "in the adapter", fl_cuda_dtype_name(dt), (double)scale);
    return st;
}

// Tensors already in device memory (fastload.from_hf: a CUDA torch tensor): converted on the device (convert.cu).
static fl_status cu_convert_d(fl_backend *be, void *dst_d, fl_dtype dt, const void *src_d, fl_dtype st, size_t n) {
    fl_cuda_impl *c = IMPL(be);
    FL_TRY(fl_cuda_enter(c));
    return fl_cuda_convert(c->stream, dst_d, dt, src_d, st, n);
}

// Graphs for callers that replay a step many times (the engine's decode step, csrc/engine.c).
static fl_status cu_graph_capture(fl_backend *be, fl_status (*fn)(void *), void *ud, void **out) {
    fl_cuda_impl *c = IMPL(be);
    *out = NULL;
    FL_TRY(fl_cuda_enter(c));
    cudaGraph_t g = NULL;
    cudaGraphExec_t x = NULL;
    FL_CUDA_CHECK(cudaStreamBeginCapture(c->stream, cudaStreamCaptureModeThreadLocal));
    const fl_status st = fn(ud);
    const cudaError_t e = cudaStreamEndCapture(c->stream, &g);
    if (st != FL_OK) {
        if (g) cudaGraphDestroy(g);
        cudaGetLastError();
        return st;
    }
    if (e != cudaSuccess) return fl_err(FL_E_DEVICE, "capturing a CUDA graph: %s", cudaGetErrorString(e));
    const cudaError_t ie = cudaGraphInstantiate(&x, g, 0);
    cudaGraphDestroy(g);
    if (ie != cudaSuccess) return fl_err(FL_E_DEVICE, "instantiating a CUDA graph: %s", cudaGetErrorString(ie));
    *out = x;
    return FL_OK;
}
static fl_status cu_graph_replay(fl_backend *be, void *graph) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    FL_CUDA_CHECK(cudaGraphLaunch((cudaGraphExec_t)graph, IMPL(be)->stream));
    return FL_OK;
}
static void cu_graph_free(fl_backend *be, void *graph) {
    (void)be;
    if (graph) cudaGraphExecDestroy((cudaGraphExec_t)graph);
}
// The engine's pipelined decode (engine.c): a step's ids go to slot s on the device (the next step's input, fed by
// argmax_feed) and, asynchronously, to pinned host memory with an event, so the host can launch the next step
// before it reads this one's tokens. The slots grow outside graph capture only (they are never captured).
static fl_status tok_slots(fl_cuda_impl *c, int n) {
    if (n <= c->tok_cap) return FL_OK;
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    const int cap = n < 256 ? 256 : n;
    for (int s = 0; s < 2; s++) {
        if (c->tok_d[s]) { cudaFree(c->tok_d[s]); fl_cuda_account(c->device, -(long long)c->tok_cap * 4); c->tok_d[s] = NULL; }
        if (c->tok_h[s]) { cudaFreeHost(c->tok_h[s]); c->tok_h[s] = NULL; }
        if (!c->tok_ev[s]) FL_CUDA_CHECK(cudaEventCreateWithFlags(&c->tok_ev[s], cudaEventDisableTiming));
    }
    c->tok_cap = 0;
    for (int s = 0; s < 2; s++) {
        FL_CUDA_CHECK(cudaMalloc(&c->tok_d[s], (size_t)cap * 4));
        fl_cuda_account(c->device, (long long)cap * 4);
        FL_CUDA_CHECK(cudaHostAlloc(&c->tok_h[s], (size_t)cap * 4, cudaHostAllocDefault));
    }
    c->tok_cap = cap;
    return FL_OK;
}

static fl_status cu_argmax_async(fl_backend *be, const void *logits_d, int n, int vocab, int slot) {
    fl_cuda_impl *c = IMPL(be);
    if (slot < 0 || slot > 1) return fl_err(FL_E_INTERNAL, "argmax_async: slot %d", slot);
    FL_TRY(fl_cuda_enter(c));
    FL_TRY(tok_slots(c, n));
    FL_TRY(fl_cuda_argmax_rows(c->stream, be->act, logits_d, n, vocab, c->tok_d[slot]));
    FL_CUDA_CHECK(cudaMemcpyAsync(c->tok_h[slot], c->tok_d[slot], (size_t)n * 4, cudaMemcpyDeviceToHost, c->stream));
    FL_CUDA_CHECK(cudaEventRecord(c->tok_ev[slot], c->stream));
    return FL_OK;
}

static fl_status cu_argmax_wait(fl_backend *be, int slot, int32_t *dst_h, int n) {
    fl_cuda_impl *c = IMPL(be);
    if (slot < 0 || slot > 1 || n > c->tok_cap) return fl_err(FL_E_INTERNAL, "argmax_wait: slot %d, %d rows", slot, n);
    FL_TRY(fl_cuda_enter(c));
    FL_CUDA_CHECK(cudaEventSynchronize(c->tok_ev[slot]));
    FL_CUDA_CHECK(cudaGetLastError());
    memcpy(dst_h, c->tok_h[slot], (size_t)n * 4);
    return FL_OK;
}

static fl_status cu_argmax_feed(fl_backend *be, int32_t *dst_d, int slot, int n) {
    fl_cuda_impl *c = IMPL(be);
    if (slot < 0 || slot > 1 || n > c->tok_cap) return fl_err(FL_E_INTERNAL, "argmax_feed: slot %d, %d rows", slot, n);
    FL_TRY(fl_cuda_enter(c));
    FL_CUDA_CHECK(cudaMemcpyAsync(dst_d, c->tok_d[slot], (size_t)n * 4, cudaMemcpyDeviceToDevice, c->stream));
    return FL_OK;
}

static fl_status cu_argmax_rows(fl_backend *be, int32_t *dst_h, const void *logits_d, int n, int vocab) {
    fl_cuda_impl *c = IMPL(be);
    if (n <= 0) return FL_OK;
    FL_TRY(fl_cuda_enter(c));
    FL_TRY(fl_cuda_grow(be, &c->scratch, &c->scratch_bytes, (size_t)n * 4, "argmax_rows"));
    FL_TRY(fl_cuda_argmax_rows(c->stream, be->act, logits_d, n, vocab, (int32_t *)c->scratch));
    FL_CUDA_CHECK(cudaMemcpyAsync(dst_h, c->scratch, (size_t)n * 4, cudaMemcpyDeviceToHost, c->stream));
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    return FL_OK;
}

extern "C" cudaStream_t fl_cuda_stream(fl_backend *be) { return be && be->impl ? IMPL(be)->stream : (cudaStream_t)0; }

// ---------------------------------------------------------------------------------------------
// set-up
// ---------------------------------------------------------------------------------------------
// Benchmark / test knobs, read once per backend: FASTLOAD_GEMV_UP_TO=0..8 (matmul uses the GEMV
// for n up to this, cuBLAS above; default: the measured FL_MATMUL_GEMV_UP_TO) and
// FASTLOAD_GEMV_VARIANT=auto|fma1|fma2|fma4|fma2x8|fma1s|mma4|mma8 (the GEMV kernel; default auto).
// Quantised weights: FASTLOAD_QGEMV_UP_TO=0..8 (GEMV for n up to this, dequantise + cuBLAS above;
// default FL_QGEMV_UP_TO) and FASTLOAD_QGEMV=auto|dp|fma|mma|generic (the GEMV kernel: integer dot products,
// tensor cores, the FMA kernel, or the one-warp-per-row fallback everywhere; for tests and A/B measurements).
// FASTLOAD_CUDA_QDOT=int16|int8: the decode GEMV of quantised weights quantises x to int16 per vector (default,
// float-close) or to int8 per 32 values as llama.cpp and FASTLOAD_CPU_QDOT=int8 do (dp4a: faster, less precise
// next to outlier activations; NF4's code book then rounded to int8 too; qmatmul.cu's qdp_qb).
// FASTLOAD_QX_FUSE=1|0: RMSNorm / SwiGLU write the dp2a GEMV's int16 x for the matmul after them (default 1).
// FASTLOAD_GLU_FUSE=1|0 and FASTLOAD_GLU_U=4|8: gate|up's GEMV with SwiGLU in its epilogue (default on, 4).
// FASTLOAD_ROPE_FUSE=1|0: the decode attention rotates q and k and stores k / v itself (default 1; cu_rope_attention).
// FASTLOAD_ATT_FUSE=1|0: the decode attention combines its splits in the split kernel's grid (default 1; attention.cuh).
// FASTLOAD_QMMA_INT=1|0: integer-code GEMV at 3..8 token rows on the integer tensor cores (default 1; qgemv_imma8_kernel).
// FASTLOAD_MOE_QDP=1|0: quantised experts' decode GEMV on integer dot products (default 1; fl_cuda_moe_qgemv).
// FASTLOAD_MOE_QDP_ROWS=4|2: that GEMV's token rows a pass (an expert's slots taken that many at a time) for integer
// codes above 2 tokens (NF4 always 2; default FL_MOE_QDP_ROWS, qmatmul.cuh).
// An on/off knob: *v = 1 (default) unless the variable is "0"; anything but "", "0" and "1" is an error.
static fl_status knob01(const char *name, int *v) {
    const char *q = getenv(name);
    *v = 1;
    if (q && *q) {
        if (!strcmp(q, "0")) *v = 0;
        else if (strcmp(q, "1")) return fl_err(FL_E_VALUE, "%s='%s' is not 0 or 1", name, q);
    }
    return FL_OK;
}

// FASTLOAD_QDP_CFG (measurements): the dp2a GEMV's configuration at 1-2 token rows, a comma list of [4|8][small|big|
// long:]NAME[/gG]: NAME one of r4u2 r4u1 r8u1 r2u4 r8u1w4 r4u4 r2u2 (rows a warp, vectors a lane; w4: at most 4 warps a
// row), G row groups a block; the prefix limits an item to 4- or 8-bit codes and / or one class of matrix (qmatmul.cu's
// qdp_class: small q|k|v / o, big gate|up / LM head, long down_proj); a bare NAME sets every class. Later items win.
static fl_status read_qdp_cfg(fl_cuda_impl *c) {
    for (int b = 0; b < 2; b++)
        for (int k = 0; k < 3; k++) c->qdp_cfg[b][k] = -1, c->qdp_gpb[b][k] = 0;
    const char *q = getenv("FASTLOAD_QDP_CFG");
    if (!q || !*q) return FL_OK;
    static const char *names[] = {"r4u2", "r4u1", "r8u1", "r2u4", "r8u1w4", "r4u4", "r2u2"};
    static const char *classes[] = {"small", "big", "long"};
    char buf[256];
    if (strlen(q) >= sizeof buf) return fl_err(FL_E_VALUE, "FASTLOAD_QDP_CFG='%.40s...' is too long", q);
    strcpy(buf, q);
    for (char *save = NULL, *it = strtok_r(buf, ",", &save); it; it = strtok_r(NULL, ",", &save)) {
        int b0 = 0, b1 = 1, k0 = 0, k1 = 2, cfg = -1, gpb = 0;
        char *name = it, *colon = strchr(it, ':');
        if (colon) {
            *colon = 0;
            char *cls = it;
            if (*cls == '4' || *cls == '8') {
                b0 = b1 = *cls == '8';
                cls++;
            }
            if (*cls) {
                k0 = -1;
                for (int k = 0; k < 3; k++)
                    if (!strcmp(cls, classes[k])) k0 = k1 = k;
                if (k0 < 0) return fl_err(FL_E_VALUE, "FASTLOAD_QDP_CFG='%s': class '%s' is not small, big or long", q, cls);
            }
            name = colon + 1;
        }
        char *slash = strchr(name, '/');
        if (slash) {
            *slash = 0;
            char *end;
            const long g = strtol(slash + 1 + (slash[1] == 'g'), &end, 10);
            if (slash[1] != 'g' || *end || g < 1 || g > 16)
                return fl_err(FL_E_VALUE, "FASTLOAD_QDP_CFG='%s': '/%s' is not /g1../g16", q, slash + 1);
            gpb = (int)g;
        }
        for (int i = 0; i < 7; i++)
            if (!strcmp(name, names[i])) cfg = i;
        if (cfg < 0 && strcmp(name, "auto"))
            return fl_err(FL_E_VALUE, "FASTLOAD_QDP_CFG='%s': '%s' is not auto, r4u2, r4u1, r8u1, r2u4, r8u1w4, r4u4 or r2u2", q, name);
        for (int b = b0; b <= b1; b++)
            for (int k = k0; k <= k1; k++) c->qdp_cfg[b][k] = cfg, c->qdp_gpb[b][k] = gpb;
    }
    return FL_OK;
}

static fl_status read_knobs(fl_cuda_impl *c) {
    c->gemv_up_to = -1;
    c->gemv_variant = FL_GEMV_AUTO;
    c->qgemv_up_to = -1;
    c->qgemv_variant = 0;
    const char *q = getenv("FASTLOAD_QGEMV_UP_TO");
    if (q && *q) {
        char *end;
        const long v = strtol(q, &end, 10);
        if (*end || v < 0 || v > FL_GEMV_MAX_N_Q)
            return fl_err(FL_E_VALUE, "FASTLOAD_QGEMV_UP_TO='%s' is not an integer in 0..%d", q, FL_GEMV_MAX_N_Q);
        c->qgemv_up_to = (int)v;
    }
    q = getenv("FASTLOAD_QGEMV");
    if (q && *q) {
        if (!strcmp(q, "auto")) c->qgemv_variant = FL_QGEMV_AUTO;
        else if (!strcmp(q, "generic")) c->qgemv_variant = FL_QGEMV_GENERIC;
        else if (!strcmp(q, "fma")) c->qgemv_variant = FL_QGEMV_FMA;
        else if (!strcmp(q, "mma")) c->qgemv_variant = FL_QGEMV_MMA;
        else if (!strcmp(q, "dp")) c->qgemv_variant = FL_QGEMV_DP;
        else return fl_err(FL_E_VALUE, "FASTLOAD_QGEMV='%s' is not auto, dp, fma, mma or generic", q);
    }
    FL_TRY(knob01("FASTLOAD_QX_FUSE", &c->qx_fuse));
    FL_TRY(knob01("FASTLOAD_ROPE_FUSE", &c->rope_fuse));
    FL_TRY(knob01("FASTLOAD_ATT_FUSE", &c->att_fuse));
    FL_TRY(knob01("FASTLOAD_LOGITS_PIN", &c->logits_pin));
    FL_TRY(knob01("FASTLOAD_QMMA_INT", &c->qmma_int));
    FL_TRY(knob01("FASTLOAD_MOE_QDP", &c->moe_qdp));
    c->moe_qdp_rows = FL_MOE_QDP_ROWS;
    q = getenv("FASTLOAD_MOE_QDP_ROWS");
    if (q && *q) {
        if (!strcmp(q, "4") || !strcmp(q, "2")) c->moe_qdp_rows = q[0] - '0';
        else return fl_err(FL_E_VALUE, "FASTLOAD_MOE_QDP_ROWS='%s' is not 4 or 2", q);
    }
    c->qx8 = FL_QX8_AUTO;
    q = getenv("FASTLOAD_CUDA_QDOT");
    if (q && *q) {
        if (!strcmp(q, "int8")) c->qx8 = FL_QX8_ALL;
        else if (!strcmp(q, "int16")) c->qx8 = FL_QX8_NONE;
        else if (strcmp(q, "auto")) return fl_err(FL_E_VALUE, "FASTLOAD_CUDA_QDOT='%s' is not auto, int16 or int8", q);
    }
    FL_TRY(read_qdp_cfg(c));
    int glu = 1;
    FL_TRY(knob01("FASTLOAD_GLU_FUSE", &glu));
    c->glu_u = glu ? 4 : 0;
    q = getenv("FASTLOAD_GLU_U");
    if (q && *q && c->glu_u) {
        if (!strcmp(q, "8")) c->glu_u = 8;
        else if (strcmp(q, "4")) return fl_err(FL_E_VALUE, "FASTLOAD_GLU_U='%s' is not 4 or 8", q);
    }
    const char *e = getenv("FASTLOAD_GEMV_UP_TO");
    if (e && *e) {
        char *end;
        const long v = strtol(e, &end, 10);
        if (*end || v < 0 || v > FL_GEMV_MAX_N)
            return fl_err(FL_E_VALUE, "FASTLOAD_GEMV_UP_TO='%s' is not an integer in 0..%d", e, FL_GEMV_MAX_N);
        c->gemv_up_to = (int)v;
    }
    e = getenv("FASTLOAD_GEMV_VARIANT");
    if (e && *e) {
        c->gemv_variant = fl_gemv_variant_from_name(e);
        if (c->gemv_variant < 0)
            return fl_err(FL_E_VALUE, "FASTLOAD_GEMV_VARIANT='%s' is not auto, fma1, fma2, fma4, fma2x8, fma1s, mma4 or mma8", e);
    }
    return FL_OK;
}

static fl_status init_resources(fl_backend *be, fl_cuda_impl *c) {
    FL_TRY(read_knobs(c));
    FL_CUDA_CHECK(cudaSetDevice(c->device));
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&c->n_sm, cudaDevAttrMultiProcessorCount, c->device));
    FL_CUDA_CHECK(cudaStreamCreateWithFlags(&c->stream, cudaStreamNonBlocking));
    FL_CUBLAS_CHECK(cublasCreate(&c->blas));
    // cublasSetStream resets the workspace to cuBLAS' own pool, so the stream goes first. With a
    // workspace of our own, cuBLAS allocates nothing during a call and the call can be captured.
    FL_CUBLAS_CHECK(cublasSetStream(c->blas, c->stream));
    FL_CUDA_CHECK(cudaMalloc(&c->blas_ws, FL_CUDA_BLAS_WS_BYTES));
    fl_cuda_account(c->device, (long long)FL_CUDA_BLAS_WS_BYTES);
    FL_CUBLAS_CHECK(cublasSetWorkspace(c->blas, c->blas_ws, FL_CUDA_BLAS_WS_BYTES));
    (void)be;
    return FL_OK;
}

// fl_cuda_load works on the calling thread's current device: make this backend's device current
// and let nothing of ours be in flight on the arena first.
static fl_status cu_load(fl_backend *be, const fl_load_job *j, int n, fl_progress_fn cb, void *ud, fl_load_stats *st) {
    FL_TRY(fl_cuda_enter(IMPL(be)));
    FL_TRY(cu_sync(be));
    return fl_cuda_load(be, j, n, cb, ud, st);
}

fl_status fl_cuda_backend_init(fl_backend *be, int device, fl_dtype act) {
    fl_cuda_impl *c = new (std::nothrow) fl_cuda_impl();
    if (!c) return fl_err(FL_E_NOMEM, "cannot allocate the CUDA backend state");
    c->device = device;
    snprintf(c->name, sizeof c->name, "cuda:%d", device);
    *be = fl_backend{};
    be->name = c->name;
    be->act = act;
    be->n_threads = 0;  // host-side work on this backend's behalf (generic loading) uses every core
    be->impl = c;
    be->alloc = cu_alloc;
    be->free = cu_free;
    be->to_backend = cu_to_backend;
    be->to_host = cu_to_host;
    be->sync = cu_sync;
    be->destroy = cu_destroy;
    be->embed = cu_embed;
    be->rmsnorm = cu_rmsnorm;
    be->add_rmsnorm = cu_add_rmsnorm;
    be->matmul = cu_matmul;
    be->rope_store = cu_rope_store;
    be->rope_attention = cu_rope_attention;
    be->attention = cu_attention;
    be->swiglu = cu_swiglu;
    be->matmul_swiglu = cu_matmul_swiglu;
    be->gather_rows = cu_gather_rows;
    be->moe_route = cu_moe_route;
    be->moe_ffn = cu_moe_ffn;
    be->logits_to_host = cu_logits_to_host;
    be->quantize = cu_quantize;
    be->add_lowrank = cu_add_lowrank;
    be->convert_d = cu_convert_d;
    be->graph_capture = cu_graph_capture;
    be->graph_replay = cu_graph_replay;
    be->graph_free = cu_graph_free;
    be->argmax_rows = cu_argmax_rows;
    be->argmax_async = cu_argmax_async;
    be->argmax_wait = cu_argmax_wait;
    be->argmax_feed = cu_argmax_feed;
    // The loading pipeline (loader.cu): pread / O_DIRECT -> pinned pool -> streams -> device.
    be->load = cu_load;
    return init_resources(be, c);  // on failure the caller calls be->destroy(be)
}
