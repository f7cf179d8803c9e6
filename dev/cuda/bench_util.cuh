// dev/cuda/bench_util.cuh: what the CUDA sandboxes' benchmarks share (gemv_bench.cu, qgemv_bench.cu): error macros
// that return 1 from main, and the timing of a CUDA graph of 10 launches (METHOD: warm-up replays, median of the
// timed ones / 10).
#ifndef FL_DEV_BENCH_UTIL_CUH
#define FL_DEV_BENCH_UTIL_CUH
#include <algorithm>
#include <stdio.h>
#include <vector>

#define CK(x)                                                                                       \
    do {                                                                                            \
        cudaError_t e_ = (x);                                                                       \
        if (e_ != cudaSuccess) { fprintf(stderr, "%s failed at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_)); return 1; } \
    } while (0)
#define CKF(x)                                                                                      \
    do {                                                                                            \
        fl_status s_ = (x);                                                                         \
        if (s_ != FL_OK) { fprintf(stderr, "%s failed: %s\n", #x, fl_err_msg()); return 1; }         \
    } while (0)

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}
template <typename F>
static float time_graph(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, int batches, F op) {
    cudaGraph_t g;
    cudaGraphExec_t ge;
    if (cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal) != cudaSuccess) return -1;
    int bad = 0;
    for (int i = 0; i < 10; i++) bad |= op(i);
    if (cudaStreamEndCapture(st, &g) != cudaSuccess || bad) { fprintf(stderr, "capture failed: %s\n", fl_err_msg()); return -1; }
    if (cudaGraphInstantiate(&ge, g, 0) != cudaSuccess) return -1;
    std::vector<float> t;
    for (int i = 0; i < 3; i++) cudaGraphLaunch(ge, st);
    for (int bt = 0; bt < batches; bt++) {
        cudaEventRecord(e0, st);
        cudaGraphLaunch(ge, st);
        cudaEventRecord(e1, st);
        if (cudaEventSynchronize(e1) != cudaSuccess) return -1;
        float ms;
        cudaEventElapsedTime(&ms, e0, e1);
        t.push_back(ms / 10);
    }
    cudaGraphExecDestroy(ge);
    cudaGraphDestroy(g);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) { fprintf(stderr, "graph: %s\n", cudaGetErrorString(e)); return -1; }
    return median(t);
}
// The ceiling: a 1 GiB device-to-device copy, counting bytes read + written; 3 untimed copies, then the median of 9
// (GB/s; < 0 on a CUDA error, with the message printed).
static double copy_ceiling_gbs(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, float *median_ms = nullptr) {
    const size_t cb = (size_t)1 << 30;
    void *a = nullptr, *b = nullptr;
    std::vector<float> ct;
    cudaError_t e = cudaMalloc(&a, cb);
    if (e == cudaSuccess) e = cudaMalloc(&b, cb);
    if (e == cudaSuccess) e = cudaMemsetAsync(a, 1, cb, st);
    for (int i = 0; i < 12 && e == cudaSuccess; i++) {
        cudaEventRecord(e0, st);
        e = cudaMemcpyAsync(b, a, cb, cudaMemcpyDeviceToDevice, st);
        cudaEventRecord(e1, st);
        if (e == cudaSuccess) e = cudaEventSynchronize(e1);
        float ms = 0;
        if (e == cudaSuccess) e = cudaEventElapsedTime(&ms, e0, e1);
        if (i >= 3) ct.push_back(ms);
    }
    cudaFree(a);
    cudaFree(b);
    if (e != cudaSuccess) { fprintf(stderr, "copy ceiling: %s\n", cudaGetErrorString(e)); return -1; }
    if (median_ms) *median_ms = median(ct);
    return 2.0 * cb / (median(ct) * 1e-3) / 1e9;
}
// Deterministic fills of device memory (hashes of the index and a seed): codes, fp16 scales in [lo, hi), bf16
// activations in [-1, 1).
__global__ void fill_u32(uint32_t *p, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = h;
    }
}
__global__ void fill_half(__half *p, size_t n, uint32_t seed, float lo, float hi) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        p[i] = __float2half(lo + (hi - lo) * (float)(h & 0xffff) / 65536.f);
    }
}
__global__ void fill_act(__nv_bfloat16 *p, size_t n, uint32_t seed) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        p[i] = __float2bfloat16((float)(h & 0xffff) / 32768.f - 1.f);
    }
}
#ifdef FL_CUDA_QMATMUL_CUH
// What the quantised-GEMV benches (qgemv_bench.cu, qmma_bench.cu: qmatmul.cu compiled in) start with: a CUDA backend
// (bf16 activations), its stream, two events and the copy ceiling, the device printed. 0 on success.
struct QBench {
    fl_backend *be;
    fl_cuda_impl *c;
    cudaStream_t st;
    cudaEvent_t e0, e1;
    double copy_gbs;
};
static int qbench_setup(QBench &b) {
    CKF(fl_backend_cuda_create(0, FL_BF16, &b.be));
    b.c = fl_cuda_impl_of(b.be);
    b.st = b.c->stream;
    CK(cudaEventCreate(&b.e0));
    CK(cudaEventCreate(&b.e1));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    b.copy_gbs = copy_ceiling_gbs(b.st, b.e0, b.e1);
    if (b.copy_gbs < 0) return 1;
    printf("device: %s, %d SMs; copy D2D 1 GiB %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount, b.copy_gbs);
    return 0;
}
#endif
#endif
