// sample.cu: see sample.cuh. One block of 1024 threads per row: the first maximum (torch.argmax), for the engine's
// greedy rows (sampled rows are drawn on the host, csrc/sampling.c).
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <float.h>
#include "sample.cuh"

#define NT 1024

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// (value, index) argmax with the first index winning ties.
__device__ void block_argmax(float &v, int &i, float *shv, int *shi) {
    for (int o = 16; o; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, v, o);
        int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
    }
    __syncthreads();
    if ((threadIdx.x & 31) == 0) { shv[threadIdx.x >> 5] = v; shi[threadIdx.x >> 5] = i; }
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < NT / 32 ? shv[threadIdx.x] : -INFINITY;
        i = threadIdx.x < NT / 32 ? shi[threadIdx.x] : 0x7fffffff;
        for (int o = 16; o; o >>= 1) {
            float ov = __shfl_xor_sync(0xffffffffu, v, o);
            int oi = __shfl_xor_sync(0xffffffffu, i, o);
            if (ov > v || (ov == v && oi < i)) { v = ov; i = oi; }
        }
        if (threadIdx.x == 0) { shv[0] = v; shi[0] = i; }
    }
    __syncthreads();
    v = shv[0]; i = shi[0];
    __syncthreads();
}

// ---- argmax of each row (the engine's greedy rows: csrc/engine.c) ------------------------------
// fl_argmax's rule over the float32 widening of the logits: the first maximum; a row with nothing
// above -inf (all -inf) gives 0.
// VEC: rows of whole, aligned 16-byte vectors (V * sizeof(T) % 16 == 0), each thread reading whole vectors (a
// 152k-entry bf16 row: 19 loads a thread in place of 149, 7.9 -> ~3 us on an H200, the step's last kernel).
template <typename T, bool VEC>
__global__ void __launch_bounds__(NT) argmax_rows_kernel(const T *__restrict__ logits, int V, int32_t *__restrict__ out) {
    __shared__ float shv[NT / 32];
    __shared__ int shi[NT / 32];
    const T *row = logits + (size_t)blockIdx.x * V;
    float v = -INFINITY;
    int i = 0x7fffffff;
    if (VEC) {
        constexpr int E = 16 / sizeof(T);
        const uint4 *rv = (const uint4 *)row;
        for (int k = threadIdx.x; k < V / E; k += NT) {
            const uint4 w = __ldg(rv + k);
            const T *e = (const T *)&w;
#pragma unroll
            for (int q = 0; q < E; q++) {
                const float x = to_f(e[q]);
                if (x > v) { v = x; i = k * E + q; }  // indices rise within a thread: its first maximum
            }
        }
    } else {
        for (int j = threadIdx.x; j < V; j += NT) {
            const float x = to_f(row[j]);
            if (x > v) { v = x; i = j; }  // j rises: the first maximum of this thread's share
        }
    }
    block_argmax(v, i, shv, shi);
    if (threadIdx.x == 0) out[blockIdx.x] = i == 0x7fffffff ? 0 : i;
}

template <typename T>
static void launch_argmax(cudaStream_t st, const T *logits, int n, int V, int32_t *out) {
    if ((size_t)V * sizeof(T) % 16 == 0 && ((uintptr_t)logits & 15u) == 0)
        argmax_rows_kernel<T, true><<<n, NT, 0, st>>>(logits, V, out);
    else
        argmax_rows_kernel<T, false><<<n, NT, 0, st>>>(logits, V, out);
}

extern "C" fl_status fl_cuda_argmax_rows(cudaStream_t st, fl_dtype act, const void *logits, int n, int V, int32_t *out) {
    if (n <= 0) return FL_OK;
    if (V <= 0) return fl_err(FL_E_VALUE, "argmax_rows: vocab %d", V);
    switch (act) {
    case FL_F32: launch_argmax(st, (const float *)logits, n, V, out); break;
    case FL_F16: launch_argmax(st, (const __half *)logits, n, V, out); break;
    case FL_BF16: launch_argmax(st, (const __nv_bfloat16 *)logits, n, V, out); break;
    default: return fl_err(FL_E_UNSUPPORTED, "argmax_rows: dtype %d", (int)act);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fl_err(FL_E_DEVICE, "argmax_rows: %s", cudaGetErrorString(e));
    return FL_OK;
}
