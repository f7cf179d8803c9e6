/* fl_backend.h: the interface the model code calls. One table of function pointers per
 * backend (CPU now, CUDA next). The forward pass (model.c) is written once against it.
 *
 * Conventions
 *  - Pointers named `*_d` live in backend memory (host memory for the CPU backend, device
 *    memory for CUDA). Every op may be asynchronous on the backend's stream; `sync` waits.
 *  - Activations are in the backend's activation dtype `act` (FL_F32 on the CPU backend,
 *    FL_F16/FL_BF16 on CUDA), row-major, one row per token.
 *  - Ops are at the granularity the fast paths want fused: residual add + RMSNorm, QKV
 *    projection as one matmul over a concatenated weight, RoPE fused with the KV-cache
 *    store, gate+up as one matmul followed by SwiGLU. A CUDA graph can capture a decode step
 *    because no op reads a host value computed by a previous op.
 *  - Each op returns fl_status; on failure it has called fl_err().
 */
#ifndef FL_BACKEND_H
#define FL_BACKEND_H
#include "fl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* A weight matrix W of shape [rows, cols] (out_features, in_features), row-major as in
 * Hugging Face checkpoints. dtype FL_QUANT: a quantised weight, layout in csrc/quant.h
 * (codes in data_d, per-group scales / offsets, optional act-order column permutation). */
typedef struct {
    fl_dtype dtype;
    int64_t rows, cols;
    void *data_d;       /* [rows, cols] for plain dtypes; FL_QUANT: codes uint8 [rows, cols * bits / 8] */
    void *scales_d;     /* FL_QUANT: sdtype [rows, cols / group_size] */
    void *zeros_d;      /* FL_QUANT: sdtype [rows, cols / group_size] offsets, or NULL (symmetric) */
    int32_t *perm_d;    /* FL_QUANT: int32 [cols] act-order column order, or NULL */
    int group_size, bits;
    fl_dtype sdtype;    /* FL_QUANT: FL_F16 or FL_F32 (scales and offsets) */
    int code;           /* FL_QUANT: FL_QCODE_INT / FL_QCODE_NF4 (quant.h) */
    int interleaved;    /* FL_QUANT on the CPU backend: 0 row-major (above); 8: rows interleaved in groups of 8 for
                           cpu_qmatmul.c's kernel (its header: codes, scales and offsets of rows 8g..8g+7 stay where
                           row-major puts them as a whole, reordered inside; set by the backend's interleave_weight) */
} fl_weight;

/* KV cache: per layer K and V of [rows, n_kv_heads, head_dim]. Rectangular (fl_kv_create):
 * rows = batch * max_len, row b's slot j at b * max_len + j. Paged (fl_kv_create_paged, the engine):
 * rows = n_pages << page_shift, addressed through the step's block table (fl_kv_paging); batch is
 * then 0 and max_len the longest row a block table can describe. Ops reach the cache only through
 * this struct and the step. */
typedef struct {
    int n_layers, batch, max_len, n_kv_heads, head_dim;
    fl_dtype dtype;
    void **k_d, **v_d;  /* [n_layers] pointers */
    int n_pages, page_shift; /* paged: pool size in pages, log2 slots per page; 0, 0 rectangular */
} fl_kvcache;

/* Everything attention needs to know about one forward call over a rectangular batch.
 * `start` is a host value; a CUDA graph that replays decode steps cannot see host values that
 * change, so backends read `*start_d` (device memory) instead when it is not NULL. */
typedef struct {
    int batch;               /* B sequences */
    int n_new;               /* T new tokens per sequence */
    int start;               /* cache slot of the first new token (same for every sequence) */
    const int32_t *start_d;  /* device copy of start for graph-replayed steps, or NULL */
    const int32_t *pos_d;    /* [B*T] rotary positions */
    const uint8_t *kmask_d;  /* [B, kmask_stride] 1 = key slot may be attended (padding); NULL = all */
    int kmask_stride;        /* row stride of kmask_d (>= start + T) */
    fl_kv_paging pg;         /* per-row starts and block table (zero: one start, rectangular cache) */
    fl_rope_dyn dyn;         /* dynamic NTK rope: callers set dyn.len_d; fl_forward_core fills the rest */
} fl_step;


/* Where a checkpoint tensor's bytes are (already mapped) and what they are. */
enum { FL_SRC_PLAIN = 0, FL_SRC_GGML = 1 };
/* Where a source's bytes live: mapped from `file` (loaders may read the file instead), host memory that belongs to
 * no file (fastload.from_hf: a torch tensor's storage), or backend memory of the model's own device (from_hf: a CUDA
 * tensor). Only FL_SRC_FILE sources may go through a backend's file pipeline (`load`). */
enum { FL_SRC_FILE = 0, FL_SRC_HOST = 1, FL_SRC_BACKEND = 2 };
typedef struct {
    const char *file;     /* path: for messages, and for loaders that read with pread / O_DIRECT (FL_SRC_FILE) */
    const char *name;     /* tensor name, for messages */
    const void *data;     /* mapped bytes */
    uint64_t file_offset; /* where `data` starts in the file */
    uint64_t nbytes;
    int kind;             /* FL_SRC_PLAIN: type is fl_dtype; FL_SRC_GGML: type is a ggml type id */
    int type;
    int ndim;
    int64_t shape[4];     /* outermost first, as Hugging Face writes it: [rows, cols] */
    int where;            /* FL_SRC_FILE, FL_SRC_HOST, FL_SRC_BACKEND */
} fl_src_tensor;

typedef struct {
    double seconds;
    uint64_t bytes_read;   /* checkpoint bytes consumed */
    uint64_t bytes_weights;/* bytes of weights in backend memory */
    int threads;
    int direct_io;         /* 1 if the backend's loader read some bytes with O_DIRECT (cold page cache) */
} fl_load_stats;

/* Progress: called from the loading thread with bytes done / total; returns nonzero to abort. */
typedef int (*fl_progress_fn)(void *ud, uint64_t done, uint64_t total);

/* A tensor's destination in backend memory, after the model has validated it (shape, bytes). */
typedef struct {
    const fl_src_tensor *src;
    void *dst_d;          /* first destination row in backend memory */
    fl_dtype dst_dtype;
    int64_t rows, cols;   /* destination shape (src rows are permuted when unpermute_heads > 0) */
    int unpermute_heads;
} fl_load_job;

#define FL_MOE_MAX_EXPERTS 256  /* experts per layer (the routing kernels keep a token's probabilities on chip) */
#define FL_MOE_MAX_K 16         /* experts per token */

/* Scratch of a Mixture-of-Experts FFN over n tokens with k experts each (sized by fl_model_reserve; k = top_k,
 * f = moe_ffn, E experts). A (token, choice) pair is a "slot" s = token * k + j. */
typedef struct {
    void *gu;         /* [n*k, 2f] activation dtype: gate | up of each slot (expert order on CUDA) */
    void *ff;         /* [n*k, f] silu(gate) * up */
    void *y;          /* [n*k, d] each slot's expert output */
    void *xs;         /* [n*k, d] the inputs gathered in expert order (grouped GEMM) */
    int32_t *perm;    /* [n*k] the slot at each expert-sorted position */
    int32_t *inv;     /* [n*k] the expert-sorted position of each slot */
    int32_t *offs;    /* [2E + 2]: [0, E] first sorted position of each expert (offs[E] = n*k); CUDA also keeps
                       * the experts that have slots at [E + 1, 2E] and their number at [2E + 1] */
    int32_t *offs_h;  /* [E + 1] host copy (backends that read the counts on the host for prefill) */
} fl_moe_scratch;

typedef struct fl_backend fl_backend;
struct fl_backend {
    const char *name;        /* "cpu", "cuda:0" */
    fl_dtype act;            /* activation dtype */
    int n_threads;           /* CPU: OpenMP threads (the most ops use; scratch is sized by it) */
    int threads_now;         /* CPU: threads ops use now: n_threads, fewer while other processes keep the cores busy
                              * (step_begin; threads=0 only). Outputs never depend on it. */
    int host_memory;         /* 1: backend memory is host memory (loaders write into it directly) */
    void *impl;              /* backend private state (stream, handles, scratch) */

    fl_status (*alloc)(fl_backend *, size_t bytes, void **out_d);
    void (*free)(fl_backend *, void *p_d);
    fl_status (*to_backend)(fl_backend *, void *dst_d, const void *src_h, size_t bytes);
    fl_status (*to_host)(fl_backend *, void *dst_h, const void *src_d, size_t bytes);
    fl_status (*sync)(fl_backend *);
    void (*destroy)(fl_backend *);

    /* x[n, d] = emb[tokens[i], :] (emb may be FL_QUANT: rows are dequantised) */
    fl_status (*embed)(fl_backend *, void *x_d, const int32_t *tokens_d, int n, const fl_weight *emb);
    /* out = rmsnorm(x) * w                                        x, out: [n, d]; w: [d] (weight dtype)
     * next: the weight of the matmul that reads `out` as the very next op (NULL: none or unknown); a
     * backend may use it to write `out` in that matmul's own input form as well (CUDA: the dp2a GEMV's
     * int16 x), which the matmul then takes instead of preparing it. The result is the same either way. */
    fl_status (*rmsnorm)(fl_backend *, void *out_d, const void *x_d, const fl_weight *w, int n, float eps,
                         const fl_weight *next);
    /* resid += delta; out = rmsnorm(resid) * w                     all [n, d]; next as above */
    fl_status (*add_rmsnorm)(fl_backend *, void *out_d, void *resid_d, const void *delta_d,
                             const fl_weight *w, int n, float eps, const fl_weight *next);
    /* y[n, W.rows] = x[n, W.cols] @ W^T (+ bias[W.rows] if bias != NULL). W may be FL_QUANT. */
    fl_status (*matmul)(fl_backend *, void *y_d, const void *x_d, int n, const fl_weight *W,
                        const fl_weight *bias);
    /* qkv[B*T, (nh + 2*nkv) * hd] holds q|k|v per token. Rotate q and k in place (style NULL: the
     * whole head, rotate-half layout, inv_freq[hd/2]; else as fl_rope_style says, inv_freq[dims/2])
     * and store k, v into layer `layer` of the cache at slots start..start+T-1. qk_norm (Qwen3; NULL:
     * none; only with the default style): [2 * hd] float weight, q_norm then k_norm; before the
     * rotation every q head becomes rmsnorm(head, eps) * q_norm and every k head
     * rmsnorm(head, eps) * k_norm (v untouched). */
    fl_status (*rope_store)(fl_backend *, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                            int n_heads, const float *inv_freq_d, const fl_rope_style *style,
                            const fl_weight *qk_norm, float eps);
    /* out[B*T, nh*hd] = softmax(q k^T * scale + mask) v over cache slots [0, start+T) with the
     * causal rule, key padding mask and sliding window (0 = none): key j visible from query
     * slot i iff j <= i && (window == 0 || i - j < window) && kmask[b, j]. next as for rmsnorm (the
     * o_proj weight: CUDA's decode attention then also writes its dp2a GEMV's int16 x). */
    fl_status (*attention)(fl_backend *, void *out_d, const void *qkv_d, const fl_step *s,
                           const fl_kvcache *kv, int layer, int n_heads, int window, float scale,
                           const fl_weight *next);
    /* Optional: rope_store then attention of one layer, as those two calls would do them (the same output and cache);
     * the backend may fuse them and then leave q and k in qkv unrotated (CUDA: the decode attention rotates them
     * itself). NULL: callers make the two calls (fl_rope_attention below). */
    fl_status (*rope_attention)(fl_backend *, void *out_d, void *qkv_d, const fl_step *s, fl_kvcache *kv, int layer,
                                int n_heads, const float *inv_freq_d, const fl_rope_style *style,
                                const fl_weight *qk_norm, float eps, int window, float scale, const fl_weight *next);
    /* out[n, f] = silu(gu[n, 0:f]) * gu[n, f:2f]; next as for rmsnorm */
    fl_status (*swiglu)(fl_backend *, void *out_d, const void *gu_d, int n, int f, const fl_weight *next);
    /* Optional: out[n, f] = swiglu(x[n, W.cols] @ W^T) for the fused [gate | up] weight W ([2f, cols], no bias), with
     * gu_d a [n, 2f] workspace it may use; next as for rmsnorm. The same values as matmul into gu_d followed by
     * swiglu (CUDA: decode steps run one GEMV with SwiGLU in its epilogue). NULL: callers make those two calls. */
    fl_status (*matmul_swiglu)(fl_backend *, void *out_d, void *gu_d, const void *x_d, int n, const fl_weight *W, int f,
                               const fl_weight *next);
    /* Mixture of Experts, routing: from router logits[n, E] (activation dtype), ids[n, k] and wts[n, k] (float32):
     * p = softmax(logits) in float32, the k largest p in descending order (ties: the lower expert index), divided
     * by their sum when norm (as transformers' Mixtral / Qwen MoE routers). No host value is read: graph-safe. */
    fl_status (*moe_route)(fl_backend *, int32_t *ids_d, float *wts_d, const void *logits_d, int n, int E, int k,
                           int norm);
    /* Mixture of Experts, the experts: out[n, d] = sum_j wts[i, j] * W2_e (silu(W1_e x_i) * W3_e x_i), e = ids[i, j],
     * the terms added in ascending e (transformers' index_add_ over experts). w13: [E * 2f, d] (expert e's gate
     * rows, then its up rows); w2: [E * d, f]. Only the chosen experts' weights are read. may_sync: the op may wait
     * for the device and read the expert counts on the host (prefill); 0 in steps a CUDA graph may capture. */
    fl_status (*moe_ffn)(fl_backend *, void *out_d, const void *x_d, int n, const int32_t *ids_d, const float *wts_d,
                         int k, int E, const fl_weight *w13, const fl_weight *w2, const fl_moe_scratch *ws,
                         int may_sync);
    /* dst[i, :] = src[rows[i], :] for i < n (pick last-token rows before the LM head) */
    fl_status (*gather_rows)(fl_backend *, void *dst_d, const void *src_d, const int32_t *rows_h,
                             int n, int d);
    /* logits (activation dtype) -> float32 on the host, [n, vocab] */
    fl_status (*logits_to_host)(fl_backend *, float *dst_h, const void *src_d, int n, int vocab);

    /* Quantisation at load: rows [row0, row0 + rows) of the FL_QUANT weight W (its layout from
     * fl_q_layout_for_scheme) from src_d[rows, W.cols] of dtype src_dtype (f32/f16/bf16), both in backend
     * memory. Bit-identical to fl_q_quantize_rows. */
    fl_status (*quantize)(fl_backend *, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src_d,
                          fl_dtype src_dtype);
    /* LoRA merge at load: w[rows, cols] (dtype f32/f16/bf16) += scale * (b[rows, r] @ a[r, cols]), a and b float32,
     * everything in backend memory; the product is formed in float32 (no TF32), scaled, added to the widened weight
     * and rounded once, as PEFT's merge does it in float32. FL_E_VALUE if a merged value is not finite. */
    fl_status (*add_lowrank)(fl_backend *, void *w_d, fl_dtype dtype, int64_t rows, int64_t cols, const float *b_d,
                             const float *a_d, int r, float scale);
    /* dst_d[0:n] (dtype dt) = src_d[0:n] (dtype st), both in backend memory: sources of FL_SRC_BACKEND (a CUDA torch
     * tensor handed to fastload.from_hf). NULL on host-memory backends (the generic path reads such sources). */
    fl_status (*convert_d)(fl_backend *, void *dst_d, fl_dtype dt, const void *src_d, fl_dtype st, size_t n);

    /* Optional: a backend's own loading pipeline (CUDA: pread / O_DIRECT into a pinned pool, copies
     * on several streams, conversion on the device). NULL: the generic path converts on the host
     * and calls to_backend. Must fill stats->threads (and may add to bytes_read). */
    fl_status (*load)(fl_backend *, const fl_load_job *jobs, int n, fl_progress_fn cb, void *ud, fl_load_stats *stats);

    /* Optional (CUDA): record what fn(ud) enqueues into a replayable graph (*graph), replay one (inputs it reads
     * are read afresh), free one. NULL on backends without graphs: callers run fn every time. A graph holds the
     * addresses of the buffers it touched; `scratch_epoch` counts every time a buffer a forward uses was
     * reallocated (the backend's scratch, the model's workspace), after which older graphs must not be replayed. */
    fl_status (*graph_capture)(fl_backend *, fl_status (*fn)(void *ud), void *ud, void **graph);
    fl_status (*graph_replay)(fl_backend *, void *graph);
    void (*graph_free)(fl_backend *, void *graph);
    uint64_t scratch_epoch;
    /* Optional: dst_h[i] = the index of the largest of logits row i ([n, vocab], activation dtype; the lowest
     * index among equal ones, as fl_argmax over the same logits widened to float32). Waits for the result.
     * NULL: callers take the logits to the host. */
    fl_status (*argmax_rows)(fl_backend *, int32_t *dst_h, const void *logits_d, int n, int vocab);
    /* Optional (CUDA): the engine's pipelined decode, two token slots (0, 1). argmax_async: argmax_rows' ids of rows
     * [0, n) into slot `slot`, on the device and, without waiting, on its way to host memory; argmax_wait: wait for
     * them and copy them to dst_h; argmax_feed: dst_d[0:n] = the slot's device ids, in stream order (the next step's
     * input tokens with no trip through the host). NULL: the engine waits for every step. */
    fl_status (*argmax_async)(fl_backend *, const void *logits_d, int n, int vocab, int slot);
    fl_status (*argmax_wait)(fl_backend *, int slot, int32_t *dst_h, int n);
    fl_status (*argmax_feed)(fl_backend *, int32_t *dst_d, int slot, int n);
    /* Optional (CPU): rearrange a loaded FL_QUANT weight in place into the backend's own faster layout (sets
     * W->interleaved) when its kernel has one for W's format, else leave it as it is; *done: 1 if rearranged. Called once per
     * weight after the load (fl_model_interleave); nothing may write the weight's rows afterwards. */
    fl_status (*interleave_weight)(fl_backend *, fl_weight *W, int *done);
    /* Optional (CPU): called at the start of every forward (one thread at a time: the engine's driver). The CPU
     * backend re-reads there, a few times a second, how many cores other processes leave it (threads_now). */
    void (*step_begin)(fl_backend *);

    /* Bytes currently allocated through `alloc`, and the peak since the last reset. */
    uint64_t mem_allocated, mem_peak;
    /* Matmul calls that took their input as the op before them wrote it (the `next` hint of rmsnorm /
     * swiglu; CUDA: the dp2a GEMV's int16 x) instead of preparing it themselves. Counts calls made on
     * the host (a CUDA graph replay repeats the captured ones without counting). */
    uint64_t fused_inputs;
};

/* The threads a backend's host-side parallel work should use now: threads_now where the CPU backend has lowered it
 * (other processes hold cores), else n_threads (0 on CUDA: no cap of its own). One reading for the CPU kernels
 * (cpu_threads), the engine's sampling team and info(). */
static inline int fl_backend_threads_now(const fl_backend *be) {
    return be->threads_now > 0 && be->threads_now < be->n_threads ? be->threads_now : be->n_threads;
}

/* add_lowrank on host memory (csrc/cpu/cpu_lowrank.c): the CPU backend's op, and the host-side loading paths' merge
 * into float32 rows before quantisation. b: [rows, r] (row stride r), a: [r, cols]. */
fl_status fl_lowrank_add_host(void *w, fl_dtype dtype, int64_t rows, int64_t cols, const float *b, const float *a, int r,
                              float scale);

/* Backends. fl_backend_cpu_create never fails for lack of a device. */
fl_status fl_backend_cpu_create(int n_threads, fl_backend **out);
int fl_cuda_compiled(void);                       /* 1 if built with the CUDA part */
fl_status fl_cuda_device_count(int *count);      /* FL_E_DEVICE with the driver's message */
fl_status fl_backend_cuda_create(int device, fl_dtype act, fl_backend **out);
/* Process-wide accounting of fastload's device allocations (csrc/cuda/cuda_memory.cu). */
void fl_cuda_account(int device, long long delta_bytes);
fl_status fl_cuda_memory(int device, uint64_t *allocated, uint64_t *peak);
fl_status fl_cuda_reset_peak(int device);
fl_status fl_cuda_mem_info(int device, uint64_t *free_bytes, uint64_t *total_bytes);
/* fastload.cuda's device questions (csrc/cuda/cuda_device.cu, cuda_memory.cu; cuda_stub.c without CUDA).
 * Every device byte fastload holds is one cudaMalloc / cudaFree (no caching allocator), so
 * "reserved" equals "allocated"; what fastload caches is the loader's pinned *host* pool. */
typedef struct {
    char name[256];
    uint64_t total_memory;           /* bytes */
    int major, minor;                /* compute capability */
    int multi_processor_count;
} fl_cuda_props;
fl_status fl_cuda_device_props(int device, fl_cuda_props *out); /* FL_E_VALUE: no such device */
/* The SM architectures this build has kernels for, as setup.py was given them ("90;80": SASS for each, and the
 * last one's PTX, which the driver JIT-compiles for newer GPUs); "" without CUDA. */
const char *fl_cuda_archs(void);
/* Whether fastload's kernels can run on `device`: FL_OK and the SM version of the binary the driver picked (90 for
 * sm_90 SASS or PTX JIT-compiled for it; ptx: the PTX's version where it differs, else 0), or FL_E_UNSUPPORTED naming the
 * GPU, its compute capability and the build's architectures. Creates the device's context (backend creation
 * calls it before anything else; fastload.cuda.get_device_properties does not). */
fl_status fl_cuda_kernel_check(int device, int *binary, int *ptx);
fl_status fl_cuda_synchronize(int device);        /* waits for all work fastload queued on the device */
void fl_cuda_empty_cache(void);                   /* frees the loader's kept pinned host buffers */
/* The PCIe ceiling of a load (fastload.bench load): GB/s (1e9 bytes/s) of `repeats` cudaMemcpyAsync host-to-device
 * copies of `bytes` from pinned (cudaHostAlloc) memory after one warm-up copy, timed with CUDA events. Allocates and
 * frees its own buffers. FL_E_VALUE: bad arguments or no such device; FL_E_UNSUPPORTED without CUDA. */
fl_status fl_cuda_h2d_bandwidth(int device, uint64_t bytes, int repeats, double *gb_per_s);

#ifdef __cplusplus
}
#endif
/* rope_store + attention of one layer through the backend's fused op where it has one */
static inline fl_status fl_rope_attention(fl_backend *be, void *out_d, void *qkv_d, const fl_step *s, fl_kvcache *kv,
                                          int layer, int n_heads, const float *inv_freq_d, const fl_rope_style *style,
                                          const fl_weight *qk_norm, float eps, int window, float scale,
                                          const fl_weight *next) {
    if (be->rope_attention)
        return be->rope_attention(be, out_d, qkv_d, s, kv, layer, n_heads, inv_freq_d, style, qk_norm, eps, window,
                                  scale, next);
    fl_status st = be->rope_store(be, qkv_d, s, kv, layer, n_heads, inv_freq_d, style, qk_norm, eps);
    if (st != FL_OK) return st;
    return be->attention(be, out_d, qkv_d, s, kv, layer, n_heads, window, scale, next);
}

#endif
