// convert.cuh: dtype conversion on the device (weights after upload, logits before download).
#ifndef FL_CUDA_CONVERT_CUH
#define FL_CUDA_CONVERT_CUH
#include <cuda_runtime.h>
#include "../fl_common.h"

// dst[0:n] (dtype dt) = src[0:n] (dtype st), asynchronous on `st_`. Sources: float32, float16,
// bfloat16, float64; destinations: float32, float16, bfloat16. Rounding to nearest even, NaN kept
// (a quiet NaN), overflow to infinity, as fl_convert on the host. Same dtype: a device copy.
// dst and src must not overlap unless they are the same pointer with the same element size.
fl_status fl_cuda_convert(cudaStream_t st_, void *dst, fl_dtype dt, const void *src, fl_dtype st, size_t n);
#endif
