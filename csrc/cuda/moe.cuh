// moe.cuh: Mixture of Experts on the device: routing, grouping by expert, the grouped expert GEMV, the weighted
// combination. Launchers: raw device pointers, sizes and a stream; asynchronous, no allocation, no host read, so
// a decode step that uses them can be captured in a CUDA graph. `act` is the element type of activations and
// weights. A "slot" is one (token, choice) pair, s = token * k + j; slots are sorted by expert (positions p).
#ifndef FL_CUDA_MOE_CUH
#define FL_CUDA_MOE_CUH
#include <cuda_runtime.h>
#include "../fl_common.h"

// ids[n, k], wts[n, k] (float32) from router logits[n, E] (act): softmax in float32, the k largest in descending
// order (ties: the lower index), divided by their sum when norm. E <= 256, k <= 16.
fl_status fl_cuda_moe_route(cudaStream_t st, fl_dtype act, int32_t *ids, float *wts, const void *logits, int n, int E,
                            int k, int norm);
// Group the nk slots by expert. offs: [2E + 2] int32: offs[0..E] the first position of each expert (offs[E] = nk),
// then offs[E+1 .. 2E] the experts that have slots, in ascending order, and offs[2E+1] their number.
// perm[p]: the slot at position p; inv[s]: the position of slot s. One block.
fl_status fl_cuda_moe_group(cudaStream_t st, const int32_t *ids, int nk, int E, int32_t *offs, int32_t *perm,
                            int32_t *inv);
// The grouped GEMV: for every expert e with slots (max_active: an upper bound of their number, grid size),
// y[p, R] = x[row(p), C] @ W_e^T for p in [offs[e], offs[e+1]), W_e = W + e * R * C, row(p) = perm[p] / x_div when
// perm is not NULL, else p. Only the experts with slots read their weights, each once per 8 slots.
fl_status fl_cuda_moe_gemv(cudaStream_t st, fl_dtype act, void *y, const void *x, const int32_t *perm, int x_div,
                           const int32_t *offs, int E, int max_active, const void *W, int64_t R, int64_t C);
// xs[p, d] = x[perm[p] / k, d] for p < nk (the inputs in expert order, for per-expert GEMMs).
fl_status fl_cuda_moe_gather(cudaStream_t st, fl_dtype act, void *xs, const void *x, const int32_t *perm, int k,
                             int nk, int64_t d);
// out[i, d] = sum_j wts[i, j] * y[inv[i*k + j], d], the terms in ascending expert id, float32 sum, one rounding.
fl_status fl_cuda_moe_combine(cudaStream_t st, fl_dtype act, void *out, const void *y, const int32_t *ids,
                              const float *wts, const int32_t *inv, int n, int k, int64_t d);
#endif
