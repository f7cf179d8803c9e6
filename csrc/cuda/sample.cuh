// sample.cuh: next-token choice on the device, the rules of csrc/sampling.c (transformers' order:
// repetition penalty -> min_new_tokens -> temperature -> top-k -> top-p -> draw), so that a
// decode step (forward + sample + advance) can be replayed from a CUDA graph.
#pragma once
#include <cuda_runtime.h>
#include "../fl_common.h"

typedef struct {
    int do_sample;
    float temperature, top_p, repetition_penalty;
    int top_k, min_new, n_eos, pad_id;
    int32_t eos[16];
    unsigned long long seed;
} fl_cuda_sampling;

// Per-call device state of the generation loop, all in device memory.
typedef struct {
    int32_t *out;        // [B, total] prompt + generated ids (history for the repetition penalty)
    int32_t *next;       // [B] the token each row feeds next (pad when finished)
    int32_t *pos;        // [B] rotary position of `next`
    int32_t *start;      // [1] cache slot of `next` (same for every row)
    int32_t *step;       // [1] tokens sampled so far
    int32_t *alive;      // [1] rows not finished
    uint8_t *done;       // [B]
    int32_t *sampled;    // [B] this step's choice
    float *scratch;      // [B, V] float32 logits after penalties
} fl_cuda_gen_state;

#ifdef __cplusplus
extern "C" {
#endif
// Choose sampled[b] from logits [B, V] (act dtype) for each row; rows already done are skipped.
fl_status fl_cuda_sample(cudaStream_t st, fl_dtype act, const void *logits, int B, int V, int T, int total,
                         const fl_cuda_sampling *p, const fl_cuda_gen_state *g);
// out[i] = argmax of logits row i ([n, V], act dtype; first maximum; 0 for a row of -inf), on the stream.
fl_status fl_cuda_argmax_rows(cudaStream_t st, fl_dtype act, const void *logits, int n, int V, int32_t *out);
// Write sampled tokens into out[:, T + step], mark eos rows done, set next/pos/start/step/alive.
fl_status fl_cuda_advance(cudaStream_t st, int B, int T, int total, const fl_cuda_sampling *p, const fl_cuda_gen_state *g);
#ifdef __cplusplus
}
#endif
