// dev/cuda/gemv_bench.cu: the decode GEMV (csrc/cuda/matmul.cu) against the device's copy
// bandwidth, on Qwen2.5-7B's matrix shapes, with cuBLAS as the peer, all in one run.
//
//   build: after `python3 setup.py build_ext --inplace` (which compiles csrc/cuda/*.cu), as
//     dev/cuda/run_device.sh does: link the backend's objects and fl_common.c.
//   run:   /tmp/gemv_bench [dtype: bf16|f16] [timed replays, default 9]
//
// Method (METHOD.md): the ceiling is a 1 GiB cudaMemcpy device-to-device, counting bytes read +
// written. Every variant is validated against cuBLAS (float32 accumulation) before it is timed.
// Weights rotate over enough copies to exceed the L2 several times, so no launch reads a matrix
// the previous one left in L2. Per configuration: 10 launches captured in a CUDA graph (as a
// graph-replayed decode step runs them), 3 warm-up replays, then 9 timed replays between
// events; the median / 10 is the time per launch. Bytes per launch = W (R*C) + x (n*C) +
// y (n*R) elements.
//
// NOTES (measurements that set default_rpw in matmul.cu) are kept in dev/cuda/NOTES.md.
#include <algorithm>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <vector>

#include "cuda/cuda_common.cuh"
#include "cuda/matmul.cuh"
#include "bench_util.cuh"

#define CKB(x)                                                                                      \
    do {                                                                                            \
        cublasStatus_t s_ = (x);                                                                    \
        if (s_ != CUBLAS_STATUS_SUCCESS) { fprintf(stderr, "%s failed: %s\n", #x, cublasGetStatusString(s_)); return 1; } \
    } while (0)

template <typename T>
__global__ void fill_kernel(T *p, size_t n, uint32_t seed, float scale) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13; h *= 3266489917u; h ^= h >> 16;
        p[i] = fl_from_f32<T>(((float)(h & 0xffffff) / 16777216.0f * 2.0f - 1.0f) * scale);
    }
}

template <typename T>
__global__ void widen_kernel(float *dst, const T *src, size_t n) {
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = fl_to_f32(src[i]);
}

struct Shape { const char *name; int64_t R, C; };

template <typename T>
static int run(fl_dtype act, int batches) {
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cublasHandle_t blas;
    CKB(cublasCreate(&blas));
    CKB(cublasSetStream(blas, st));
    void *ws;
    CK(cudaMalloc(&ws, 32 << 20));
    CKB(cublasSetWorkspace(blas, ws, 32 << 20));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, %d SMs, L2 %.0f MB, dtype %s\n", prop.name, prop.multiProcessorCount, prop.l2CacheSize / 1e6,
           fl_cuda_dtype_name(act));

    // ---- ceiling: device-to-device copy of 1 GiB (read + write) ----
    float copy_ms = 0;
    const double copy_gbs = copy_ceiling_gbs(st, e0, e1, &copy_ms);
    if (copy_gbs < 0) return 1;
    printf("copy D2D 1 GiB: %.3f ms median -> %.0f GB/s (read + write)\n\n", copy_ms, copy_gbs);

    const Shape shapes[] = {{"qkv", 4608, 3584}, {"o_proj", 3584, 3584}, {"gate|up", 37888, 3584},
                            {"down", 3584, 18944}, {"lm_head", 152064, 3584}};
    const int ns[] = {1, 2, 4, 8};
    const int variants[] = {FL_GEMV_AUTO, FL_GEMV_FMA1, FL_GEMV_FMA1_SERIAL, FL_GEMV_FMA2,
                            FL_GEMV_FMA4, FL_GEMV_FMA2_U8, FL_GEMV_MMA8};
    const char *vnames[] = {"fma1", "fma1s", "fma2", "fma4", "fma2x8", "mma8"};
    const int NV = 7;
    const cudaDataType_t ct_ = act == FL_F16 ? CUDA_R_16F : CUDA_R_16BF;
    printf("%-8s %6s %6s %2s | %7s %6s |", "shape", "R", "C", "n", "GB/s", "%copy");
    for (int vi = 1; vi < NV; vi++) printf(" %7s", vnames[vi - 1]);
    printf(" | %7s %6s | %s\n", "cuBLAS", "%copy", "max rel-L2 vs cuBLAS");
    int failures = 0;
    for (const Shape &s : shapes) {
        const size_t welems = (size_t)s.R * s.C, wbytes = welems * sizeof(T);
        const int copies = (int)std::max<size_t>(2, ((size_t)512 << 20) / wbytes + 1);
        std::vector<T *> W(copies);
        for (int k = 0; k < copies; k++) {
            CK(cudaMalloc(&W[k], wbytes));
            fill_kernel<T><<<4096, 256, 0, st>>>(W[k], welems, 1234u + k, 1.0f / sqrtf((float)s.C) * 1.7f);
        }
        T *x, *y, *yref;
        float *y32, *r32;
        CK(cudaMalloc(&x, 8 * s.C * sizeof(T)));
        CK(cudaMalloc(&y, 8 * s.R * sizeof(T)));
        CK(cudaMalloc(&yref, 8 * s.R * sizeof(T)));
        CK(cudaMalloc(&y32, 8 * s.R * sizeof(float)));
        CK(cudaMalloc(&r32, 8 * s.R * sizeof(float)));
        fill_kernel<T><<<256, 256, 0, st>>>(x, 8 * s.C, 99u, 1.0f);
        CK(cudaGetLastError());
        std::vector<float> hy(8 * s.R), hr(8 * s.R);
        for (int n : ns) {
            const double bytes = (double)(welems + (size_t)n * s.C + (size_t)n * s.R) * sizeof(T);
            double gbs[9] = {0, 0, 0, 0, 0, 0, 0, 0, 0}, max_err = 0;
            for (int vi = 0; vi < NV; vi++) {
                const int rpw = variants[vi];
                // validate against cuBLAS on copy 0
                const float one = 1.f, zero = 0.f;
                CKB(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)s.R, n, (int)s.C, &one, W[0], ct_, (int)s.C, x, ct_,
                                 (int)s.C, &zero, yref, ct_, (int)s.R, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
                CK(cudaMemsetAsync(y, 0xff, n * s.R * sizeof(T), st));
                // variant 0: fl_cuda_matmul's own routing (GEMV or cuBLAS), what the model runs
                auto launch = [&](const T *w) -> fl_status {
                    return rpw ? fl_cuda_gemv(st, act, y, x, n, w, s.R, s.C, NULL, rpw)
                               : fl_cuda_matmul(st, blas, act, y, x, n, w, s.R, s.C, NULL, -1, FL_GEMV_AUTO);
                };
                CKF(launch(W[0]));
                widen_kernel<T><<<1024, 256, 0, st>>>(y32, y, (size_t)n * s.R);
                widen_kernel<T><<<1024, 256, 0, st>>>(r32, yref, (size_t)n * s.R);
                CK(cudaMemcpyAsync(hy.data(), y32, n * s.R * 4, cudaMemcpyDeviceToHost, st));
                CK(cudaMemcpyAsync(hr.data(), r32, n * s.R * 4, cudaMemcpyDeviceToHost, st));
                CK(cudaStreamSynchronize(st));
                double num = 0, den = 0;
                bool finite = true;
                for (size_t i = 0; i < (size_t)n * s.R; i++) {
                    if (!std::isfinite(hy[i])) finite = false;
                    num += (double)(hy[i] - hr[i]) * (hy[i] - hr[i]);
                    den += (double)hr[i] * hr[i];
                }
                const double err = finite ? sqrt(num / (den > 0 ? den : 1)) : INFINITY;
                max_err = std::max(max_err, err);
                if (!(err < 1e-2)) failures++;
                // time
                const float ms = time_graph(st, e0, e1, batches, [&](int i) {
                    return (int)launch(W[i % copies]);
                });
                if (ms < 0) { fprintf(stderr, "timing the GEMV failed\n"); return 1; }
                gbs[vi] = bytes / (ms * 1e-3) / 1e9;
            }
            // peer: cuBLAS on the same rotation (its workspace is set, so it can be captured)
            const float one = 1.f, zero = 0.f;
            const float bms = time_graph(st, e0, e1, batches, [&](int i) {
                return (int)(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)s.R, n, (int)s.C, &one, W[i % copies], ct_,
                                          (int)s.C, x, ct_, (int)s.C, &zero, yref, ct_, (int)s.R, CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT) != CUBLAS_STATUS_SUCCESS);
            });
            if (bms < 0) { fprintf(stderr, "timing cuBLAS failed\n"); return 1; }
            const double blas_gbs = bytes / (bms * 1e-3) / 1e9;
            printf("%-8s %6lld %6lld %2d | %7.0f %5.1f%% |", s.name, (long long)s.R, (long long)s.C, n, gbs[0],
                   100 * gbs[0] / copy_gbs);
            for (int vi = 1; vi < NV; vi++) printf(" %7.0f", gbs[vi]);
            printf(" | %7.0f %5.1f%% | %.2e%s\n", blas_gbs, 100 * blas_gbs / copy_gbs, max_err, max_err < 1e-2 ? "" : "  FAIL");
        }
        for (int k = 0; k < copies; k++) CK(cudaFree(W[k]));
        CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(yref)); CK(cudaFree(y32)); CK(cudaFree(r32));
    }
    CK(cudaDeviceSynchronize());
    printf("\nGB/s: fl_cuda_matmul as the model calls it (GEMV up to n = %d, cuBLAS above); fmaK: FMA kernel, K rows per warp; mmaW: tensor cores, W warps per\n16 rows; cuBLAS: cublasGemmEx, the peer; %%copy against the D2D copy above. Bytes = W + x + y.\n", FL_MATMUL_GEMV_UP_TO);
    if (failures) printf("VALIDATION FAILURES: %d\n", failures);
    return failures ? 2 : 0;
}

int main(int argc, char **argv) {
    const char *dt = argc > 1 ? argv[1] : "bf16";
    const int batches = argc > 2 ? atoi(argv[2]) : 9;
    if (!strcmp(dt, "f16")) return run<__half>(FL_F16, batches);
    return run<__nv_bfloat16>(FL_BF16, batches);
}
