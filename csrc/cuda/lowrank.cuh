// lowrank.cuh: the LoRA merge at load, w[rows, cols] += scale * (b[rows, r] @ a[r, cols]).
// The product goes through cuBLAS in float32 (cublasSgemm: no TF32 unless the handle's math mode asks for it,
// which fastload's does not), in row chunks of at most `tmp_floats` elements of the float32 scratch `tmp`; a
// small kernel adds each chunk to the widened weight, rounds once to its dtype and counts the merged values that
// are not finite (or overflow float16) into *bad (device int, zeroed by the caller). Asynchronous on `st`.
#ifndef FL_CUDA_LOWRANK_CUH
#define FL_CUDA_LOWRANK_CUH
#include <cuda_runtime.h>
#include <cublas_v2.h>
#include "../fl_common.h"

fl_status fl_cuda_add_lowrank(cudaStream_t st, cublasHandle_t blas, void *w, fl_dtype dt, int64_t rows, int64_t cols,
                              const float *b, const float *a, int r, float scale, float *tmp, size_t tmp_floats,
                              int *bad);
#endif
