// matmul.cuh: y[n, R] = x[n, C] @ W[R, C]^T (+ bias[R]), every tensor in `act`, fp32 accumulation.
//  n <= gemv_up_to (default FL_MATMUL_GEMV_UP_TO): fastload's GEMV (decode): W streamed once from
//      memory with 16-byte loads, all n token rows computed from that one read. Two kernels:
//      CUDA-core FMAs (any dtype, 1/2/4 rows per warp) and tensor cores (mma.sync, f16/bf16,
//      sm_80+), for n up to FL_GEMV_MAX_N.
//  larger n: cuBLAS (cublasGemmEx, CUBLAS_COMPUTE_32F), bias in a small kernel after.
//  C not a multiple of 16 bytes (or misaligned pointers): an element-wise GEMV, correct, slow.
// The switch point and the default variants are measured (dev/cuda/gemv_bench.cu, NOTES.md):
// on an H200, cuBLAS streams W faster than both GEMV kernels from n = 5 on.
#ifndef FL_CUDA_MATMUL_CUH
#define FL_CUDA_MATMUL_CUH
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include "../fl_common.h"

#define FL_GEMV_MAX_N 8         /* the GEMV kernels take 1..8 token rows */
#define FL_MATMUL_GEMV_UP_TO 4  /* fl_cuda_matmul: GEMV up to this n by default, cuBLAS above */

// GEMV variants (0 = the tuned default for n, R and the device).
enum {
    FL_GEMV_AUTO = 0,
    FL_GEMV_FMA1 = 1, FL_GEMV_FMA2 = 2, FL_GEMV_FMA4 = 4, /* FMA kernel, 1/2/4 rows per warp, 8 loads per lane in flight */
    FL_GEMV_FMA2_U8 = 6,                                   /* 2 rows per warp, 16 loads per lane in flight */
    FL_GEMV_FMA1_SERIAL = 7,                               /* fma1 with the serial tail of the first version (A/B) */
    FL_GEMV_MMA4 = 16, FL_GEMV_MMA8 = 17,                  /* tensor cores, 4/8 warps per 16 rows */
};
// "fma1" ... "mma8" or "auto" -> variant; -1 if unknown.
int fl_gemv_variant_from_name(const char *s);

// `blas` must be bound to `st` (cublasSetStream) with a workspace set (graph capture).
// gemv_up_to: GEMV for n <= gemv_up_to (< 0: FL_MATMUL_GEMV_UP_TO; capped at FL_GEMV_MAX_N);
// gemv_variant: FL_GEMV_* for the GEMV calls (FL_GEMV_AUTO: the tuned default).
fl_status fl_cuda_matmul(cudaStream_t st, cublasHandle_t blas, fl_dtype act, void *y, const void *x, int n,
                         const void *W, int64_t R, int64_t C, const void *bias, int gemv_up_to, int gemv_variant);
// The GEMV alone, for n in 1..FL_GEMV_MAX_N.
fl_status fl_cuda_gemv(cudaStream_t st, fl_dtype act, void *y, const void *x, int n, const void *W,
                       int64_t R, int64_t C, const void *bias, int variant);
#define FL_GEMV_GLU_MAX_N 4  /* the GEMV with SwiGLU in its epilogue: 1..4 token rows (the default GEMV range) */
// out[n, F] = silu(x @ Wg^T) * (x @ Wu^T) for W = [Wg | Wu] ([2F, C], no bias), n in 1..FL_GEMV_GLU_MAX_N: the GEMV
// with SwiGLU in its epilogue (a warp reads gate row o and up row o; 2 x U 16-byte loads a lane in flight, U = 4
// or 8). Equal bit for bit to the GEMV's [n, 2F] followed by fl_cuda_swiglu. FL_E_UNSUPPORTED (nothing launched)
// when n is larger or the rows are not whole 16-byte vectors or a pointer is misaligned.
fl_status fl_cuda_gemv_swiglu(cudaStream_t st, fl_dtype act, void *y, const void *x, int n, const void *W, int64_t F,
                              int64_t C, int u);
#endif
