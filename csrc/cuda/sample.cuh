// sample.cuh: next-token choice on the device: the argmax of each row, for the engine's greedy rows.
#pragma once
#include <cuda_runtime.h>
#include "../fl_common.h"

#ifdef __cplusplus
extern "C" {
#endif
// out[i] = argmax of logits row i ([n, V], act dtype; first maximum; 0 for a row of -inf), on the stream.
fl_status fl_cuda_argmax_rows(cudaStream_t st, fl_dtype act, const void *logits, int n, int V, int32_t *out);
#ifdef __cplusplus
}
#endif
