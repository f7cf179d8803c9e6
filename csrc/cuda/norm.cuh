// norm.cuh: row-wise ops on activations (embedding gather, RMSNorm, residual add + RMSNorm,
// SwiGLU, row gather). Launchers: raw device pointers, sizes and a stream; asynchronous, no
// allocation. `act` is the element type of every tensor, weights included.
#ifndef FL_CUDA_NORM_CUH
#define FL_CUDA_NORM_CUH
#include <cuda_runtime.h>
#include "../fl_common.h"
#include "qx.cuh"

// x[n, d] = emb[tok[i], :]; emb: [vocab, d]. A token id outside [0, vocab) gives a row of zeros
// (the host cannot be told without a synchronisation; fl_forward's callers validate ids).
fl_status fl_cuda_embed(cudaStream_t st, fl_dtype act, void *x, const int32_t *tok, int n,
                        const void *emb, int64_t vocab, int64_t d);
// out[n, d] = x * rsqrt(mean(x^2) + eps) * w; w: [d]. float32 math, one rounding at the end.
// qd.bits 4 or 8 (16-bit act, d % 32 == 0, 16-byte aligned): out is also written as the dp2a GEMV's
// int16 x into qd (qx.cuh, fl_cuda_qx_target in qmatmul.cuh); qd.bits 0: not.
fl_status fl_cuda_rmsnorm(cudaStream_t st, fl_dtype act, void *out, const void *x, const void *w,
                          int n, int64_t d, float eps, const fl_qx_dst &qd);
// resid[n, d] += delta (rounded to act, as the model stores it); out = rmsnorm(resid) * w. qd as above.
fl_status fl_cuda_add_rmsnorm(cudaStream_t st, fl_dtype act, void *out, void *resid, const void *delta,
                              const void *w, int n, int64_t d, float eps, const fl_qx_dst &qd);
// out[n, f] = silu(gu[n, 0:f]) * gu[n, f:2f]; qd as above (f % 32 == 0).
fl_status fl_cuda_swiglu(cudaStream_t st, fl_dtype act, void *out, const void *gu, int n, int64_t f,
                         const fl_qx_dst &qd);
// dst[i, :] = src[rows_h[i], :] for i < n; rows_h is a host array, passed as kernel arguments
// (so a captured graph holds the row list and needs no host buffer).
fl_status fl_cuda_gather_rows(cudaStream_t st, fl_dtype act, void *dst, const void *src,
                              const int32_t *rows_h, int n, int64_t d);
#endif
