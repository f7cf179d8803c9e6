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
#endif
