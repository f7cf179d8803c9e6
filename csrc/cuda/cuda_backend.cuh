// cuda_backend.cuh: the CUDA backend's private state, shared by the table (cuda_backend.cu),
// device creation (cuda_device.cu) and the loading pipeline (loader.cu).
//
// One backend = one device, one non-blocking stream, one cuBLAS handle bound to that stream with
// a preallocated workspace (so cuBLAS calls can be captured in a CUDA graph), and scratch
// buffers that grow outside capture only. Every op is asynchronous on `stream`: no host
// synchronisation and no allocation once the scratch has its size.
#ifndef FL_CUDA_BACKEND_CUH
#define FL_CUDA_BACKEND_CUH

#include <atomic>
#include <mutex>
#include <vector>

#include "cuda_common.cuh"
#include "../fl_backend.h"

#define FL_CUDA_BLAS_WS_BYTES ((size_t)32 << 20)      /* cuBLAS workspace (Hopper wants 32 MiB) */
#define FL_CUDA_SCRATCH_MAX_BYTES ((size_t)64 << 20)  /* logits_to_host staging, chunked above */
#define FL_CUDA_LOGITS_PIN ((size_t)8 << 20)           /* floats in each pinned logits buffer (32 MiB; 64 MiB pinned in all) */

typedef struct {
    void *p;
    size_t bytes;
} fl_cuda_block;

/* c->qx8: the x form of the 1-2-row dp2a GEMV (FASTLOAD_CUDA_QDOT=auto|int8|int16). AUTO, the default: int8 x for
   4-bit codes (integer and NF4: +10% / +28% decode on an H200 for +0.2-0.3% word perplexity), int16 for 8-bit codes
   (their GEMVs stream near the copy rate either way, so int8 x would only cost accuracy). */
enum { FL_QX8_NONE = 0, FL_QX8_ALL = 1, FL_QX8_AUTO = 2 };

typedef struct fl_cuda_impl {
    int device;
    char name[24];              /* "cuda:N", be->name points here */
    int n_sm;                   /* multiprocessors */
    cudaStream_t stream;
    cublasHandle_t blas;
    void *blas_ws;              /* [FL_CUDA_BLAS_WS_BYTES] */
    void *attn_ws;              /* attention workspace, fl_cuda_attention_workspace() bytes */
    size_t attn_ws_bytes;
    int *att_sync;              /* decode attention's counters (fl_cuda_attention_qx's sync): zeroed when grown */
    size_t att_sync_bytes;
    int att_fuse;               /* FASTLOAD_ATT_FUSE: 1 (default) the decode combine runs in the split kernel's grid; 0 a kernel of its own */
    void *scratch;              /* float32 staging for logits_to_host */
    float *rope_cs;             /* [tokens, head_dim] cos|sin of the current forward's positions */
    size_t rope_cs_bytes;
    int gemv_up_to;             /* matmul: GEMV for n <= this (FASTLOAD_GEMV_UP_TO, default -1: tuned) */
    int gemv_variant;           /* FL_GEMV_* (FASTLOAD_GEMV_VARIANT, default auto) */
    void *qws;                  /* quantised matmul, n > qgemv_up_to: dequantised row chunk (act) */
    void *qxq;                  /* quantised matmul, dp2a GEMV: x as int16 + per-vector (scale, sum) */
    size_t qxq_bytes;
    size_t qws_bytes;
    void *qx;                   /* quantised matmul with act-order: x gathered into the codes' order */
    size_t qx_bytes;
    int qgemv_up_to;            /* quantised matmul: GEMV for n <= this (FASTLOAD_QGEMV_UP_TO, -1: default) */
    int qgemv_variant;          /* FL_QGEMV_* (FASTLOAD_QGEMV=auto|dp|fma|mma|generic) */
    int qx8;                    /* x form of the 1-2-row GEMV (FASTLOAD_CUDA_QDOT): FL_QX8_AUTO (int8 x for 4-bit codes), _ALL, _NONE */
    int qdp_cfg[2][3];          /* dp2a GEMV at n <= 2, [8-bit codes][class: small, big, long] (qmatmul.cu's qdp_pick): */
    int qdp_gpb[2][3];          /*   configuration (-1 auto) and row groups a block (0 default); FASTLOAD_QDP_CFG */
    int qmma_int;               /* integer-code GEMV at 3..8 rows on the integer tensor cores (FASTLOAD_QMMA_INT, default 1); 0: f16 / bf16 ones */
    int moe_qdp;                /* quantised experts' decode GEMV on the dp2a kernel (FASTLOAD_MOE_QDP, default 1); 0: float dequantising one */
    int moe_qdp_rows;           /* its token rows a pass for integer codes above 2 tokens (FASTLOAD_MOE_QDP_ROWS: 4 or 2) */
    size_t scratch_bytes;
    std::atomic<uint64_t> op_seq; /* backend ops entered (fl_cuda_enter): the x hand-off below is for the next op only */
    uint64_t qx_seq;            /* op_seq of the op that wrote the quantised GEMV's x into qxq (0: none pending) */
    const void *qx_x;           /* ... for the matmul on this x, */
    const void *qx_q;           /* ... this weight's codes */
    int qx_n;                   /* ... this many rows (fl_cuda_qx_target, qmatmul.cuh) */
    int qx_qb;                  /* ... in this x form (qx.cuh's QB) */
    int rope_fuse;              /* FASTLOAD_ROPE_FUSE: 1 (default) decode attention does the rope of layers > 0; 0 off */
    int qx_fuse;                /* FASTLOAD_QX_FUSE: 1 (default) RMSNorm / SwiGLU / attention write the quantised GEMV's x; 0 off */
    int glu_u;                  /* decode gate|up GEMV with SwiGLU fused: loads a lane per row (4 | 8), 0 off (FASTLOAD_GLU_*) */
    int32_t *tok_d[2];          /* argmax_async's token slots: device ids, */
    int32_t *tok_h[2];          /*   their pinned host copies, */
    cudaEvent_t tok_ev[2];      /*   recorded after each copy */
    int logits_pin;             /* FASTLOAD_LOGITS_PIN: 1 (default) many-row logits_to_host through lg_pin; 0 the plain copy */
    float *lg_pin[2];           /* logits_to_host of many rows: two pinned staging buffers of FL_CUDA_LOGITS_PIN floats, */
    cudaEvent_t lg_ev[2];       /*   an event after each one's copy (allocated at the first such call) */
    int tok_cap;                /*   rows each slot holds */
    std::mutex mu;              /* guards `blocks` and the memory counters */
    std::vector<fl_cuda_block> blocks; /* live allocations, for the counters in free() */
} fl_cuda_impl;

static inline fl_cuda_impl *fl_cuda_impl_of(fl_backend *be) { return (fl_cuda_impl *)be->impl; }

/* Make the backend's device current on the calling thread (ops may come from loader threads). */
static inline fl_status fl_cuda_enter(fl_cuda_impl *c) {
    FL_CUDA_CHECK(cudaSetDevice(c->device));
    c->op_seq++;
    return FL_OK;
}

/* The stream every op of `be` runs on (generation captures and replays its decode step there). */
extern "C" cudaStream_t fl_cuda_stream(fl_backend *be);

/* Set up `be` (already calloc'd) for `device` with activation dtype `act`: resources + table. */
fl_status fl_cuda_backend_init(fl_backend *be, int device, fl_dtype act);

/* Grow a scratch buffer to `bytes` (not in be->mem_allocated, which counts `alloc`; in the
 * process-wide fl_cuda_account counters). Refuses to allocate while the stream is being
 * captured: reserve by running the same shapes once before capturing. */
fl_status fl_cuda_grow(fl_backend *be, void **buf, size_t *have, size_t bytes, const char *what);

#endif
