// qmatmul.cuh: the CUDA backend's ops on quantised weights (fl_weight with dtype FL_QUANT, layout in
// csrc/quant.h): matmul, embedding rows, and quantisation at load. Activations are the backend's
// `act` (float16 / bfloat16; float32 works through the generic kernels), accumulation float32.
//
//  matmul, n <= qgemv_up_to (default FL_QGEMV_UP_TO = 8): a dequantising GEMV that reads the codes,
//      scales and offsets once for all n token rows (decode; bound by those bytes).
//  matmul, larger n (prefill): W dequantised into a workspace of `act` in row chunks of at most
//      FL_QDEQ_CHUNK_BYTES, each chunk multiplied by cuBLAS (ldc = R).
//  perm_d (act-order): the GEMV gathers x[:, perm] into a small workspace first; the prefill path
//      writes the dequantised columns to their x positions instead.
// Every launcher is asynchronous on the backend's stream, reads no host value computed on the device
// and allocates only through fl_cuda_grow (which refuses during graph capture): a decode step on
// quantised weights can be captured once the same shapes ran outside capture (generate's prefill).
#ifndef FL_CUDA_QMATMUL_CUH
#define FL_CUDA_QMATMUL_CUH
#include "../fl_backend.h"

#define FL_QGEMV_UP_TO 8                               /* default: GEMV for n <= this, dequant + cuBLAS above */
#define FL_QDEQ_CHUNK_BYTES ((size_t)256 << 20)        /* dequantised rows per cuBLAS call, at most */
#define FL_QDP_UP_TO 2                                 /* auto: the dp2a GEMV for n <= this (H200: int4 b8 802 tok/s on dp, 2291 on mma) */
#define FL_GEMV_MAX_N_Q 8                              /* the quantised GEMV takes 1..8 token rows */
/* The MoE dp2a GEMV's token rows a pass for integer codes above 2 tokens (FASTLOAD_MOE_QDP_ROWS): 2, not 4, since
 * an expert holds ~top_k x tokens / experts slots, often 1-2: 4 rows a pass had half the rows a warp for rows mostly
 * unused (int4 Mixtral, H200: batch 8 4379 -> 5947 tok/s, batch 4 +12%, batch 16 +25%;
 * benchmarks/results/moe-batches-2026-12-04-h200/) */
#define FL_MOE_QDP_ROWS 2
#define FL_MOE_QDP_MAX_X 256  /* x rows (tokens, or tokens x top_k) the MoE experts' dp2a GEMV takes at decode */
/* GEMV kernel choice (FASTLOAD_QGEMV): auto = integer dot products (dp2a on int16 x) for integer codes
 * whose groups are whole 16-byte vectors of codes, then tensor cores where the layout allows (groups of
 * whole 64-byte chunks), the FMA kernel otherwise (NF4); dp / mma / fma force one where it applies;
 * generic = the fallback kernel only. */
enum { FL_QGEMV_AUTO = 0, FL_QGEMV_GENERIC = 1, FL_QGEMV_FMA = 2, FL_QGEMV_MMA = 3, FL_QGEMV_DP = 4 };

// Validate W's quantised layout (bits, group size, scale dtype, code, pointers): FL_E_VALUE /
// FL_E_UNSUPPORTED naming `op` and the value that is wrong.
fl_status fl_cuda_qcheck(const fl_weight *W, const char *op);
// y[n, W.rows] = x[n, W.cols] @ dequant(W)^T (+ bias[W.rows], in act). W->dtype == FL_QUANT.
fl_status fl_cuda_qmatmul(fl_backend *be, void *y, const void *x, int n, const fl_weight *W, const void *bias);
// Fusing the quantised GEMV's x prep into the op that produces x (RMSNorm, SwiGLU, the decode attention's combine). A
// producer about to write x[n, cols] at `x`, whose output feeds the matmul with `next` right after it, asks
// fl_cuda_qx_target: when that matmul will run the dp2a GEMV (1-2 rows) or the integer tensor-core GEMV (3..8 rows)
// (integer or NF4 codes, no act-order perm, FASTLOAD_QX_FUSE not 0), dst->bits is that GEMV's x form (fl_qx_store8's QB,
// qx.cuh) and the producer also writes x in it through fl_qx_store8 into dst (a producer that cannot, for its shape,
// leaves dst->bits 0); it then calls fl_cuda_qx_written with the form, and the matmul skips its prep if it is the very
// next op of the backend on that x, n and weight and takes that form (c->op_seq counts the ops). Any other op in
// between voids the hand-off.
struct fl_qx_dst;
fl_status fl_cuda_qx_target(fl_backend *be, const fl_weight *next, const void *x, int n, int64_t cols, fl_qx_dst *dst);
void fl_cuda_qx_written(fl_backend *be, const fl_weight *next, const void *x, int n, int qb);
// Mixture of Experts decode over quantised experts: moe.cu's fl_cuda_moe_gemv (the same offs / slot_perm / x_div
// arguments) for a stacked weight of E experts of R rows each. Graph-safe: expert ids are read on the device. x has
// n_x rows; no expert has more than per_expert slots (the tokens: a token picks an expert once). The dense decode's
// dp2a GEMV where the layout allows (FASTLOAD_MOE_QDP, qmatmul.cu's qdp_moe_ok), else a float-dequantising kernel.
// x_ready: the op before wrote x where fl_cuda_moe_qx_target said (its bits were not 0), so there is no x prep.
fl_status fl_cuda_moe_qgemv(fl_backend *be, void *y, const void *x, int n_x, int per_expert, const int32_t *slot_perm,
                            int x_div, const int32_t *offs, int E, int max_active, const fl_weight *W, int64_t R,
                            bool x_ready);
// Where the op that makes the experts' x (SwiGLU, before down_proj) writes it for fl_cuda_moe_qgemv on W (experts of
// R rows; n_x rows of x at x, at most per_expert slots an expert): as fl_cuda_qx_target; bits 0: nowhere.
fl_status fl_cuda_moe_qx_target(fl_backend *be, const fl_weight *W, int64_t R, const void *x, int n_x, int per_expert,
                                fl_qx_dst *dst);
// x[i, :] = dequant(emb)[tok[i], :] in act (a token outside [0, rows) gives zeros, like fl_cuda_embed).
fl_status fl_cuda_qembed(fl_backend *be, void *x, const int32_t *tok, int n, const fl_weight *emb);
// Rows [row0, row0 + rows) of W from src[rows, W.cols] (f32 / f16 / bf16, device memory), with the rules
// of fl_q_quantize_rows (csrc/quant.h), bit for bit.
fl_status fl_cuda_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src,
                           fl_dtype src_dtype);
#endif
