// sample.cu: see sample.cuh. One block of 1024 threads per row. Greedy: first maximum (torch.argmax).
// Sampling: the top-k threshold (k-th largest value) and the top-p threshold (smallest kept value
// such that the mass strictly above it is below p, i.e. transformers' "smallest prefix reaching p")
// are found by bisection over the float bit patterns (32 block reductions each), then a Gumbel-max
// draw over the kept tokens is an exact sample of their renormalised softmax.
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <curand_kernel.h>
#include <float.h>
#include "sample.cuh"

#define NT 1024

template <typename T> __device__ __forceinline__ float to_f(T v);
template <> __device__ __forceinline__ float to_f<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_f<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// Order-preserving map float <-> uint32 (for bisection over values).
__device__ __forceinline__ unsigned f2key(float f) {
    unsigned u = __float_as_uint(f);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
__device__ __forceinline__ float key2f(unsigned k) {
    unsigned u = (k & 0x80000000u) ? (k & 0x7fffffffu) : ~k;
    return __uint_as_float(u);
}

__device__ float block_sum(float v, float *sh) {
    for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < NT / 32 ? sh[threadIdx.x] : 0.f;
        for (int o = 16; o; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (threadIdx.x == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

__device__ float block_max(float v, float *sh) {
    for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) sh[threadIdx.x >> 5] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        v = threadIdx.x < NT / 32 ? sh[threadIdx.x] : -INFINITY;
        for (int o = 16; o; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
        if (threadIdx.x == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

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

template <typename T>
__global__ void __launch_bounds__(NT) sample_kernel(const T *__restrict__ logits, int V, int T0, int total,
                                                    fl_cuda_sampling p, fl_cuda_gen_state g) {
    __shared__ float shf[NT / 32];
    __shared__ int shi[NT / 32];
    const int b = blockIdx.x;
    if (g.done[b]) return;
    const int step = *g.step;
    const T *row = logits + (size_t)b * V;
    float *x = g.scratch + (size_t)b * V;
    for (int i = threadIdx.x; i < V; i += NT) x[i] = to_f(row[i]);
    __syncthreads();
    if (p.repetition_penalty != 1.f) {  // from the original logits: idempotent for repeated ids
        const int len = T0 + step;
        for (int j = threadIdx.x; j < len; j += NT) {
            const int t = g.out[(size_t)b * total + j];
            if (t >= 0 && t < V) {
                const float l = to_f(row[t]);
                x[t] = l < 0 ? l * p.repetition_penalty : l / p.repetition_penalty;
            }
        }
        __syncthreads();
    }
    if (step < p.min_new && threadIdx.x < p.n_eos) {
        const int e = p.eos[threadIdx.x];
        if (e >= 0 && e < V) x[e] = -INFINITY;
    }
    __syncthreads();
    float bv = -INFINITY;
    int bi = 0x7fffffff;
    if (!p.do_sample) {
        for (int i = threadIdx.x; i < V; i += NT) if (x[i] > bv) { bv = x[i]; bi = i; }
        block_argmax(bv, bi, shf, shi);
        if (threadIdx.x == 0) g.sampled[b] = bi;
        return;
    }
    const float invt = (p.temperature > 0 && p.temperature != 1.f) ? 1.f / p.temperature : 1.f;
    float mx = -INFINITY;
    for (int i = threadIdx.x; i < V; i += NT) { x[i] *= invt; mx = fmaxf(mx, x[i]); }
    mx = block_max(mx, shf);
    unsigned lo_key = 0;  // keep x >= key2f(lo_key)
    if (p.top_k > 0 && p.top_k < V) {
        // largest key with count(x >= key) >= k  ==  the k-th largest value
        // 64-bit bounds: with 32 bits, hi - lo + 1 overflows to 0 on the first step and never ends.
        // Search only finite keys: [key(-inf), key(+inf)] (NaN keys would break monotonicity).
        unsigned long long lo = f2key(-INFINITY), hi = f2key(INFINITY);
        while (lo < hi) {
            const unsigned long long mid = lo + (hi - lo + 1) / 2;
            const float t = key2f((unsigned)mid);
            float c = 0;
            for (int i = threadIdx.x; i < V; i += NT) c += x[i] >= t;
            c = block_sum(c, shf);
            if (c >= p.top_k) lo = mid; else hi = mid - 1;
        }
        lo_key = (unsigned)lo;
    }
    const float kth = lo_key ? key2f(lo_key) : -INFINITY;
    if (p.top_p > 0 && p.top_p < 1.f) {
        float z = 0;
        for (int i = threadIdx.x; i < V; i += NT) if (x[i] >= kth) z += __expf(x[i] - mx);
        z = block_sum(z, shf);
        // smallest key whose strictly-greater mass (among kept) is < p: tokens with x >= it are kept
        unsigned lo = lo_key, hi = f2key(mx);
        while (lo < hi) {
            const unsigned mid = lo + (hi - lo) / 2;
            const float t = key2f(mid);
            float s = 0;
            for (int i = threadIdx.x; i < V; i += NT) if (x[i] > t && x[i] >= kth) s += __expf(x[i] - mx);
            s = block_sum(s, shf) / z;
            if (s < p.top_p) hi = mid; else lo = mid + 1;
        }
        lo_key = lo;
    }
    const float thr = lo_key ? key2f(lo_key) : -INFINITY;
    curandStatePhilox4_32_10_t rs;
    curand_init(p.seed + 0x9e3779b97f4a7c15ull * (unsigned long long)b, (unsigned long long)threadIdx.x,
                (unsigned long long)step * (unsigned long long)((V + NT - 1) / NT), &rs);
    for (int i = threadIdx.x; i < V; i += NT) {
        const float u = curand_uniform(&rs);  // (0, 1]
        if (x[i] >= thr && x[i] > -INFINITY) {
            const float gv = x[i] - __logf(-__logf(u));
            if (gv > bv) { bv = gv; bi = i; }
        }
    }
    block_argmax(bv, bi, shf, shi);
    if (threadIdx.x == 0) g.sampled[b] = bi == 0x7fffffff ? 0 : bi;
}

__global__ void advance_kernel(int B, int T0, int total, fl_cuda_sampling p, fl_cuda_gen_state g) {
    const int step = *g.step;
    __shared__ int alive;
    if (threadIdx.x == 0) alive = 0;
    __syncthreads();
    for (int b = threadIdx.x; b < B; b += blockDim.x) {
        int tok = p.pad_id;
        if (!g.done[b]) {
            tok = g.sampled[b];
            for (int e = 0; e < p.n_eos; e++) if (tok == p.eos[e]) g.done[b] = 1;
        }
        if (T0 + step < total) g.out[(size_t)b * total + T0 + step] = tok;
        g.next[b] = tok;
        if (step > 0) g.pos[b] += 1;
        if (!g.done[b]) atomicAdd(&alive, 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        *g.start = T0 + step;  // the slot `next` is written to by the following forward
        *g.step = step + 1;
        *g.alive = alive;
    }
}

#define CK(x) do { cudaError_t e_ = (x); if (e_ != cudaSuccess) return fl_err(FL_E_DEVICE, "%s: %s", #x, cudaGetErrorString(e_)); } while (0)

extern "C" fl_status fl_cuda_sample(cudaStream_t st, fl_dtype act, const void *logits, int B, int V, int T, int total,
                                    const fl_cuda_sampling *p, const fl_cuda_gen_state *g) {
    switch (act) {
    case FL_F16: sample_kernel<__half><<<B, NT, 0, st>>>((const __half *)logits, V, T, total, *p, *g); break;
    case FL_BF16: sample_kernel<__nv_bfloat16><<<B, NT, 0, st>>>((const __nv_bfloat16 *)logits, V, T, total, *p, *g); break;
    case FL_F32: sample_kernel<float><<<B, NT, 0, st>>>((const float *)logits, V, T, total, *p, *g); break;
    default: return fl_err(FL_E_UNSUPPORTED, "sampling: activation dtype %d", (int)act);
    }
    CK(cudaGetLastError());
    return FL_OK;
}

extern "C" fl_status fl_cuda_advance(cudaStream_t st, int B, int T, int total, const fl_cuda_sampling *p,
                                     const fl_cuda_gen_state *g) {
    advance_kernel<<<1, 256, 0, st>>>(B, T, total, *p, *g);
    CK(cudaGetLastError());
    return FL_OK;
}

// ---- argmax of each row (the engine's greedy rows: csrc/engine.c) ------------------------------
// fl_argmax's rule over the float32 widening of the logits: the first maximum; a row with nothing
// above -inf (all -inf) gives 0.
template <typename T>
__global__ void __launch_bounds__(NT) argmax_rows_kernel(const T *__restrict__ logits, int V, int32_t *__restrict__ out) {
    __shared__ float shv[NT / 32];
    __shared__ int shi[NT / 32];
    const T *row = logits + (size_t)blockIdx.x * V;
    float v = -INFINITY;
    int i = 0x7fffffff;
    for (int j = threadIdx.x; j < V; j += NT) {
        const float x = to_f(row[j]);
        if (x > v) { v = x; i = j; }  // j rises: the first maximum of this thread's share
    }
    block_argmax(v, i, shv, shi);
    if (threadIdx.x == 0) out[blockIdx.x] = i == 0x7fffffff ? 0 : i;
}

extern "C" fl_status fl_cuda_argmax_rows(cudaStream_t st, fl_dtype act, const void *logits, int n, int V, int32_t *out) {
    if (n <= 0) return FL_OK;
    if (V <= 0) return fl_err(FL_E_VALUE, "argmax_rows: vocab %d", V);
    switch (act) {
    case FL_F32: argmax_rows_kernel<float><<<n, NT, 0, st>>>((const float *)logits, V, out); break;
    case FL_F16: argmax_rows_kernel<__half><<<n, NT, 0, st>>>((const __half *)logits, V, out); break;
    case FL_BF16: argmax_rows_kernel<__nv_bfloat16><<<n, NT, 0, st>>>((const __nv_bfloat16 *)logits, V, out); break;
    default: return fl_err(FL_E_UNSUPPORTED, "argmax_rows: dtype %d", (int)act);
    }
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return fl_err(FL_E_DEVICE, "argmax_rows: %s", cudaGetErrorString(e));
    return FL_OK;
}
