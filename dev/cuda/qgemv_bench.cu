// dev/cuda/qgemv_bench.cu: the quantised decode GEMV (csrc/cuda/qmatmul.cu) on Qwen2.5-7B's shapes against the
// device's copy bandwidth and a plain read of the same bytes: the backend as the model calls it (x prep + GEMV) and
// the dp2a GEMV alone under each FASTLOAD_QDP_CFG configuration (launch_qdp_n), validated against the backend.
//
//   build (after a CUDA build_ext, so build/temp*/cuda/*.o exist):  dev/cuda/qgemv_bench.sh
//   run:   /tmp/qgemv_bench [timed replays, default 9]
//
// Method as gemv_bench.cu: ceiling = 1 GiB D2D copy (read + write); weights rotate over > 512 MB of copies so no
// launch finds its matrix in L2; 10 launches captured in a CUDA graph, 3 warm-up replays, median of the timed
// replays / 10. Bytes = codes + scales + offsets (the x and y vectors are noise at these sizes).
// qmatmul.cu is compiled into this file (its kernels and launchers are static), so do not link its object.
#include "../../csrc/cuda/qmatmul.cu"
#include "bench_util.cuh"
#include <algorithm>
#include <functional>
#include <vector>

// ------------------------------------------------------------------------------------------------
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
// a plain read of `n16` uint4 (the ceiling for this many bytes in one launch)
__global__ void __launch_bounds__(256) read_kernel(const uint4 *__restrict__ p, int64_t n16, uint32_t *out) {
    uint32_t a = 0;
    for (int64_t i = (int64_t)blockIdx.x * 256 + threadIdx.x; i < n16; i += (int64_t)gridDim.x * 256) {
        const uint4 v = fl_ld_stream(p + i);
        a ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (a == 0x12345678u) out[0] = a;
}

struct Shape { const char *name; int64_t R, C; int bits, gs; bool zeros; };

int main(int argc, char **argv) {
    const int batches = argc > 1 ? atoi(argv[1]) : 9;
    fl_backend *be;
    CKF(fl_backend_cuda_create(0, FL_BF16, &be));
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    cudaStream_t st = c->stream;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    const double copy_gbs = copy_ceiling_gbs(st, e0, e1);
    if (copy_gbs < 0) return 1;
    uint32_t *sink;
    CK(cudaMalloc(&sink, 64));
    printf("device: %s, %d SMs; copy D2D 1 GiB %.0f GB/s (read + write)\n", prop.name, prop.multiProcessorCount, copy_gbs);
    const Shape shapes[] = {
        {"qkv", 4608, 3584, 4, 128, true},     {"o", 3584, 3584, 4, 128, true},     {"gate_up", 37888, 3584, 4, 128, true},
        {"down", 3584, 18944, 4, 128, true},   {"qkv", 4608, 3584, 8, 3584, false}, {"o", 3584, 3584, 8, 3584, false},
        {"gate_up", 37888, 3584, 8, 3584, false}, {"down", 3584, 18944, 8, 18944, false},
        {"lm_head", 152064, 3584, 8, 3584, false}};
    bool first = true;
    int failures = 0;
    for (const Shape &s : shapes) {
        const int64_t rb = s.C * s.bits / 8, ng = s.C / s.gs;
        const size_t qbytes = (size_t)s.R * rb, sbytes = (size_t)s.R * ng * 2, wbytes = qbytes + sbytes * (s.zeros ? 2 : 1);
        const int copies = (int)std::max<size_t>(2, ((size_t)512 << 20) / wbytes + 1);
        std::vector<fl_weight> Ws(copies);
        for (int k = 0; k < copies; k++) {
            void *q, *sc, *z = nullptr;
            CK(cudaMalloc(&q, qbytes));
            CK(cudaMalloc(&sc, sbytes));
            fill_u32<<<4096, 256, 0, st>>>((uint32_t *)q, qbytes / 4, 77u + k);
            fill_half<<<1024, 256, 0, st>>>((__half *)sc, sbytes / 2, 5u + k, 0.001f, 0.01f);
            if (s.zeros) {
                CK(cudaMalloc(&z, sbytes));
                fill_half<<<1024, 256, 0, st>>>((__half *)z, sbytes / 2, 9u + k, -0.08f, 0.f);
            }
            Ws[k] = fl_weight{FL_QUANT, s.R, s.C, q, sc, z, nullptr, s.gs, s.bits, FL_F16, FL_QCODE_INT};
        }
        __nv_bfloat16 *x, *y, *y2;
        CK(cudaMalloc(&x, 8 * s.C * 2));
        CK(cudaMalloc(&y, 8 * s.R * 2));
        CK(cudaMalloc(&y2, 8 * s.R * 2));
        fill_act<<<64, 256, 0, st>>>(x, 8 * s.C, 3u);
        CK(cudaGetLastError());
        // the backend (x prep + dp2a GEMV), then the candidate on the x the prep left in the workspace
        CKF(fl_cuda_qmatmul(be, y, x, 1, &Ws[0], nullptr));
        const fl_qw W0 = qw_of(&Ws[0]);
        // variants: 0 read; 1 backend (prep + GEMV); then the dp2a GEMV alone per configuration
        struct V { const char *name; std::function<fl_status(const fl_qw &)> f; };
        const uint32_t vpg = (uint32_t)(s.gs / (s.bits == 4 ? 32 : 16));
        const uint32_t gm = vpg > 1 ? (uint32_t)(((1ull << 32) + vpg - 1) / vpg) : 0u;
        auto dp = [&](int cfg) {
            return [&, cfg](const fl_qw &W) -> fl_status {
                return W.m ? (W.bits == 4 ? launch_qdp_n<__nv_bfloat16, __half, 4, true, 1>(st, y2, qdp_xq(c), qdp_xd(c, W.C), W, nullptr, gm, 1, cfg)
                                          : launch_qdp_n<__nv_bfloat16, __half, 8, true, 1>(st, y2, qdp_xq(c), qdp_xd(c, W.C), W, nullptr, gm, 1, cfg))
                           : (W.bits == 4 ? launch_qdp_n<__nv_bfloat16, __half, 4, false, 1>(st, y2, qdp_xq(c), qdp_xd(c, W.C), W, nullptr, gm, 1, cfg)
                                          : launch_qdp_n<__nv_bfloat16, __half, 8, false, 1>(st, y2, qdp_xq(c), qdp_xd(c, W.C), W, nullptr, gm, 1, cfg));
            };
        };
        std::vector<V> vs = {{"auto", dp(-1)}, {"r4u2", dp(0)}, {"r4u1", dp(1)}, {"r8u1", dp(2)}, {"r2u4", dp(3)}, {"r8u1w4", dp(4)}};
        std::vector<double> errs;
        std::vector<bool> ok(vs.size(), true);
        for (size_t vi = 0; vi < vs.size(); vi++) {
            auto &v = vs[vi];
            CK(cudaMemsetAsync(y2, 0xff, s.R * 2, st));
            if (v.f(W0) != FL_OK) { fl_err_clear(); ok[vi] = false; continue; }
            std::vector<uint16_t> hy(s.R), hy2(s.R);
            CK(cudaMemcpyAsync(hy.data(), y, s.R * 2, cudaMemcpyDeviceToHost, st));
            CK(cudaMemcpyAsync(hy2.data(), y2, s.R * 2, cudaMemcpyDeviceToHost, st));
            CK(cudaStreamSynchronize(st));
            double num = 0, den = 0;
            for (int64_t i = 0; i < s.R; i++) {
                const float p = fl_bf16_to_f32(hy[i]), q = fl_bf16_to_f32(hy2[i]);
                num += (double)(p - q) * (p - q);
                den += (double)p * p;
                if (!std::isfinite(q)) num = INFINITY;
            }
            errs.push_back(sqrt(num / (den > 0 ? den : 1)));
            if (!(errs.back() < 1e-2)) { failures++; printf("  %s FAILS: rel err %.3e\n", v.name, errs.back()); }
        }
        std::vector<float> ms;
        ms.push_back(time_graph(st, e0, e1, batches, [&](int i) {
            read_kernel<<<c->n_sm * 8, 256, 0, st>>>((const uint4 *)Ws[i % copies].data_d, (int64_t)(qbytes / 16), sink);
            return 0;
        }));
        ms.push_back(time_graph(st, e0, e1, batches, [&](int i) { return (int)fl_cuda_qmatmul(be, y, x, 1, &Ws[i % copies], nullptr); }));
        for (size_t vi = 0; vi < vs.size(); vi++)
            ms.push_back(ok[vi] ? time_graph(st, e0, e1, batches, [&](int i) { return (int)vs[vi].f(qw_of(&Ws[i % copies])); }) : -1.f);
        if (first) {
            printf("%-8s %4s %7s | %6s | %6s", "shape", "bits", "MB", "read", "backend");
            for (auto &v : vs) printf(" | %10s", v.name);
            printf("   (%% of copy; read over the codes only)\n");
            first = false;
        }
        printf("%-8s %4d %7.1f | %5.1f%% | %5.1f%%", s.name, s.bits, wbytes / 1e6, 100 * (qbytes / (ms[0] * 1e-3) / 1e9) / copy_gbs,
               100 * (wbytes / (ms[1] * 1e-3) / 1e9) / copy_gbs);
        for (size_t k = 2; k < ms.size(); k++) printf(" | %9.1f%%", ms[k] > 0 ? 100 * (wbytes / (ms[k] * 1e-3) / 1e9) / copy_gbs : 0.0);
        printf("\n");
        fflush(stdout);
        for (auto &W : Ws) { cudaFree(W.data_d); cudaFree(W.scales_d); if (W.zeros_d) cudaFree(W.zeros_d); }
        CK(cudaFree(x)); CK(cudaFree(y)); CK(cudaFree(y2));
    }
    printf("%% of the copy rate: bytes of codes + scales + offsets per launch time; read: one plain streaming read of the "
           "codes; backend: fl_cuda_qmatmul n=1 (x prep + dp2a GEMV); the others: qgemv_dp_kernel alone (no prep) under "
           "launch_qdp_n's configurations (auto, then FASTLOAD_QDP_CFG's).\n");
    if (failures) printf("VALIDATION FAILURES: %d\n", failures);
    return failures ? 2 : 0;
}
