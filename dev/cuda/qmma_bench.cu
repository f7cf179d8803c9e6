// dev/cuda/qmma_bench.cu: the quantised GEMV at 1..8 token rows (batched decode) on Qwen2.5-7B's int4 shapes (group
// 128, with offsets, f16 scales), against the device's copy bandwidth: the f16 / bf16 tensor-core kernel
// (qgemv_mma_kernel, "mma"), the integer tensor-core kernel with its x prep (qgemv_imma8_kernel + qx_prep_kernel in the
// FL_QMX form, "imma8", the library's configuration per shape; the prep alone "prep"; then each configuration alone, w<warps>u<chunks a
// warp>t<16-row tiles a block>, r<ring stages>, b<blocks an SM the registers must allow>), and the backend as the model
// calls it ("backend": dp2a at n <= 2, then imma8 by default). imma8 is validated against mma (largest |difference| over
// largest |y|, both float-close to the exact dot); NF4 shapes (no f16 mma kernel) against the backend.
//   QMMA_SHAPES=gate_up,down QMMA_N=8 QMMA_CFGS=w8u2t2,...: a subset; QMMA_PROFILE=1: each kernel once, untimed (ncu).
//   build (after a CUDA build_ext, so build/temp*/cuda/*.o exist): dev/cuda/qgemv_bench.sh dev/cuda/qmma_bench.cu     run: /tmp/qmma_bench [reps]
// Method as qgemv_bench.cu: weights rotate over > 512 MB of copies (no launch finds its matrix in L2), 10 launches
// captured in a CUDA graph, 3 warm-up replays, median of the timed replays / 10; bytes = codes + scales + offsets.
#include "../../csrc/cuda/qmatmul.cu"
#include "bench_util.cuh"
#include <algorithm>
#include <string>
#include <vector>

struct Shape { const char *name; int64_t R, C; int bits, gs; bool zeros; int code = FL_QCODE_INT; };

int main(int argc, char **argv) {
    const int batches = argc > 1 ? atoi(argv[1]) : 9;
    QBench qb;  // backend, stream, events, copy ceiling (bench_util.cuh)
    if (qbench_setup(qb)) return 1;
    fl_backend *be = qb.be;
    fl_cuda_impl *c = qb.c;
    cudaStream_t st = qb.st;
    cudaEvent_t e0 = qb.e0, e1 = qb.e1;
    printf("%% of copy for the weight bytes, microseconds per launch\n");
    // imma8 configurations (warps, chunks a warp, 16-row tiles a block), the GEMV alone on the prepared x
    typedef fl_status (*CfgFn)(cudaStream_t, __nv_bfloat16 *, const __nv_bfloat16 *, int, const fl_qw &,
                               const __nv_bfloat16 *, uint4 *, float2 *, bool);
    struct Cfg { const char *name; CfgFn f; };
    // r<k>: the codes through a ring of k steps a warp in shared memory (cp.async), else in registers; b<k>: registers capped for k blocks an SM (__launch_bounds__)
    const Cfg cfgs[] = {
        {"w8u2t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 2, 2, false, false, 0, 1>},
        {"w8u2t2b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 2, 2, false, false, 0, 2>},
        {"w8u4t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 4, 1, false, false, 0, 1>},
        {"w8u4t1b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 4, 1, false, false, 0, 2>},
        {"w8u4t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 4, 2, false, false, 0, 1>},
        {"w8u4t2b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 4, 2, false, false, 0, 2>},
        {"w16u2t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 16, 2, 2, false, false, 0, 1>},
        {"w8u2t4", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 2, 4, false, false, 0, 1>},
        {"w8u1t4b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 1, 4, false, false, 0, 2>},
        {"w8u2t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 2, 1, false, false, 0, 1>},
        {"w8u2t1b3", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 2, 1, false, false, 0, 3>},
        {"w16u2t1b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 16, 2, 1, false, false, 0, 2>},
        {"w8u1t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 1, 2, false, false, 0, 1>},
        {"w8u1t2b3", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 1, 2, false, false, 0, 3>},
        {"w16u1t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 16, 1, 2, false, false, 0, 1>},
        // one 16-row tile a block (twice the blocks: down's 3584 rows on every SM), more warps a row
        {"w16u1t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 16, 1, 1, false, false, 0, 1>},
        {"w16u2t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 16, 2, 1, false, false, 0, 1>},
        {"w8u1t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 8, 1, 1, false, false, 0, 1>},
        {"w32u1t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 32, 1, 2, false, false, 0, 1>},
        {"w32u1t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, true, 32, 1, 1, false, false, 0, 1>},
    };
    // 8-bit codes, symmetric (the LM head quantised at load: one group a row; q|k|v, gate|up in groups of 128)
    const Cfg cfgs8[] = {
        {"w8u2t2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 2, 2, false, false, 0, 1>},
        {"w8u2t2b2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 2, 2, false, false, 0, 2>},
        {"w8u4t1", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 4, 1, false, false, 0, 1>},
        {"w8u4t1b2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 4, 1, false, false, 0, 2>},
        {"w8u4t1b3", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 4, 1, false, false, 0, 3>},
        {"w8u4t2b2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 4, 2, false, false, 0, 2>},
        {"w8u8t1b2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 8, 1, false, false, 0, 2>},
        {"w16u2t2", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 16, 2, 2, false, false, 0, 1>},
        {"w8u2t1b3", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 8, 2, 1, false, false, 0, 3>},
        {"w4u4t2b4", launch_qimma8_cfg<__nv_bfloat16, __half, 8, false, 4, 4, 2, false, false, 0, 4>},
    };
    // NF4 in bitsandbytes' blocks of 64 columns, no offsets (half chunks: HALF)
    const Cfg nf_cfgs[] = {
        {"w8u4t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 4, 1, true, true, 0, 1>},
        {"w8u4t1b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 4, 1, true, true, 0, 2>},
        {"w8u2t2b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 2, 2, true, true, 0, 2>},
        {"w8u2t1", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 2, 1, true, true, 0, 1>},
        {"w8u2t1b3", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 2, 1, true, true, 0, 3>},
        {"w16u2t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 16, 2, 2, true, true, 0, 1>},
        {"w4u1t2r4", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 4, 1, 2, true, true, 4, 1>},
        {"w4u1t2r4b4", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 4, 1, 2, true, true, 4, 4>},
        {"w4u1t2r4b6", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 4, 1, 2, true, true, 4, 6>},
        {"w8u1t2r4b2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 1, 2, true, true, 4, 2>},
        {"w8u1t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 8, 1, 2, true, true, 0, 1>},
        {"w16u1t2", launch_qimma8_cfg<__nv_bfloat16, __half, 4, false, 16, 1, 2, true, true, 0, 1>},
    };
    printf("%-8s %2s %8s | %16s %16s %16s %10s | %s\n", "shape", "n", "MB", "mma", "imma8", "backend", "prep us", "imma8 vs mma");
    // int4 g128 with offsets (configurations listed for these), then int8 symmetric: g128, and per channel (the LM head
    // quantised at load)
    const Shape shapes[] = {{"qkv", 4608, 3584, 4, 128, true},      {"o", 3584, 3584, 4, 128, true},
                            {"gate_up", 37888, 3584, 4, 128, true}, {"down", 3584, 18944, 4, 128, true},
                            {"qkv8", 4608, 3584, 8, 128, false},    {"o8", 3584, 3584, 8, 128, false},
                            {"gate_up8", 37888, 3584, 8, 128, false},
                            {"down8", 3584, 18944, 8, 128, false},  {"lm_head8", 152064, 3584, 8, 3584, false},
                            {"qkv_nf4", 4608, 3584, 4, 64, false, FL_QCODE_NF4}, {"o_nf4", 3584, 3584, 4, 64, false, FL_QCODE_NF4},
                            {"gu_nf4", 37888, 3584, 4, 64, false, FL_QCODE_NF4}, {"down_nf4", 3584, 18944, 4, 64, false, FL_QCODE_NF4}};
    // QMMA_SHAPES=gate_up,down / QMMA_N=8 / QMMA_CFGS=w8u2t2,...: a subset; QMMA_PROFILE=1: each kernel once, no timing
    // (for ncu --kernel-name regex:qgemv)
    auto listed = [](const char *env, const char *name) {
        const char *v = getenv(env);
        if (!v || !*v) return true;
        const std::string l = std::string(",") + v + ",";
        return l.find(std::string(",") + name + ",") != std::string::npos;
    };
    const bool profile = getenv("QMMA_PROFILE") != nullptr;
    int failures = 0;
    for (const Shape &s : shapes) {
        if (!listed("QMMA_SHAPES", s.name)) continue;
        const int gs = s.gs;
        const int64_t rb = s.C * s.bits / 8, ng = s.C / gs;
        const size_t qbytes = (size_t)s.R * rb, sbytes = (size_t)s.R * ng * 2, wbytes = qbytes + (s.zeros ? 2 : 1) * sbytes;
        const int copies = (int)std::max<size_t>(2, ((size_t)512 << 20) / wbytes + 1);
        std::vector<fl_weight> Ws(copies);
        for (int k = 0; k < copies; k++) {
            void *q, *sc, *z;
            CK(cudaMalloc(&q, qbytes));
            CK(cudaMalloc(&sc, sbytes));
            z = nullptr;
            if (s.zeros) CK(cudaMalloc(&z, sbytes));
            fill_u32<<<4096, 256, 0, st>>>((uint32_t *)q, qbytes / 4, 77u + k);
            fill_half<<<1024, 256, 0, st>>>((__half *)sc, sbytes / 2, 5u + k, 0.001f, 0.01f);
            if (z) fill_half<<<1024, 256, 0, st>>>((__half *)z, sbytes / 2, 9u + k, -0.08f, 0.f);
            Ws[k] = fl_weight{FL_QUANT, s.R, s.C, q, sc, z, nullptr, gs, s.bits, FL_F16, s.code};
        }
        __nv_bfloat16 *x, *y, *y2;
        CK(cudaMalloc(&x, 8 * s.C * 2));
        CK(cudaMalloc(&y, 8 * s.R * 2));
        CK(cudaMalloc(&y2, 8 * s.R * 2));
        fill_act<<<64, 256, 0, st>>>(x, 8 * s.C, 3u);
        CK(cudaGetLastError());
        CKF(fl_cuda_qmatmul(be, y, x, 8, &Ws[0], nullptr));  // grows the workspaces outside capture
        uint4 *xp = (uint4 *)qdp_xq(c);
        float2 *xd = qdp_xd(c, s.C);
        const uint32_t cpg = (uint32_t)(gs / (s.bits == 4 ? 128 : 64));  // the f16 kernel's chunks a group
        const uint32_t cm = cpg > 1 ? (uint32_t)(((1ull << 32) + cpg - 1) / cpg) : 0u;
        for (int n : {1, 2, 3, 4, 6, 8}) {
            if (!listed("QMMA_N", std::to_string(n).c_str())) continue;
            const bool nf = s.code == FL_QCODE_NF4;
            auto mma = [&](int i) {  // NF4 (no f16 mma kernel): the backend, the reference for its configurations
                if (nf) return (int)fl_cuda_qmatmul(be, y, x, n, &Ws[i % copies], nullptr);
                return (int)launch_qmma_fmt<__nv_bfloat16, __half>(st, y, x, n, qw_of(&Ws[i % copies]), nullptr, cm);
            };
            auto imma = [&](int i) {
                return (int)launch_qimma8_fmt<__nv_bfloat16, __half>(st, y2, x, n, qw_of(&Ws[i % copies]), nullptr, xp, xd, c->n_sm);
            };
            auto backend = [&](int i) { return (int)fl_cuda_qmatmul(be, y2, x, n, &Ws[i % copies], nullptr); };
            auto prep = [&](int) {
                const unsigned pb = (unsigned)(((int64_t)n * (s.C / 8) + QD_THREADS - 1) / QD_THREADS);
                const __nv_bfloat16 *xb = (const __nv_bfloat16 *)x;
                const int32_t *np = nullptr;
                return s.bits == 4 ? (int)fl_launch(qx_prep_kernel<__nv_bfloat16, 4 | FL_QMX>, dim3(pb), dim3(QD_THREADS), 0,
                                                    st, (int16_t *)xp, xd, xb, np, n, (int64_t)s.C)
                                   : (int)fl_launch(qx_prep_kernel<__nv_bfloat16, 8 | FL_QMX>, dim3(pb), dim3(QD_THREADS), 0,
                                                    st, (int16_t *)xp, xd, xb, np, n, (int64_t)s.C);
            };
            // validation: imma8 against mma on copy 0
            CK(cudaMemset(y, 0, 8 * s.R * 2));
            CK(cudaMemset(y2, 0, 8 * s.R * 2));
            if (mma(0) || imma(0)) { fprintf(stderr, "launch failed: %s\n", fl_err_msg()); return 1; }
            CK(cudaStreamSynchronize(st));
            std::vector<__nv_bfloat16> h1(n * s.R), h2(n * s.R);
            CK(cudaMemcpy(h1.data(), y, n * s.R * 2, cudaMemcpyDeviceToHost));
            CK(cudaMemcpy(h2.data(), y2, n * s.R * 2, cudaMemcpyDeviceToHost));
            double md = 0, my = 0;
            for (int64_t i = 0; i < n * s.R; i++) {
                const double a = __bfloat162float(h1[i]), b = __bfloat162float(h2[i]);
                md = std::max(md, fabs(a - b));
                my = std::max(my, fabs(a));
            }
            const double rel = md / (my > 0 ? my : 1);
            if (!(rel < 2e-2)) failures++;
            if (profile) {  // the backend once more (dp2a at 1..2 rows), then each listed configuration once
                if (backend(0)) return 1;
                const Cfg *cl = nf ? nf_cfgs : s.bits == 8 ? cfgs8 : cfgs;
                const int ncl = nf ? (int)(sizeof nf_cfgs / sizeof nf_cfgs[0])
                                   : s.bits == 8 ? (int)(sizeof cfgs8 / sizeof cfgs8[0]) : (int)(sizeof cfgs / sizeof cfgs[0]);
                for (int ci = 0; ci < ncl; ci++)
                    if (listed("QMMA_CFGS", cl[ci].name) && cl[ci].f(st, y2, x, n, qw_of(&Ws[0]), nullptr, xp, xd, false)) return 1;
                CK(cudaStreamSynchronize(st));
                printf("%s n=%d profiled (rel %.2e)\n", s.name, n, rel);
                continue;
            }
            const float t_mma = time_graph(st, e0, e1, batches, mma), t_imma = time_graph(st, e0, e1, batches, imma);
            const float t_be = time_graph(st, e0, e1, batches, backend), t_prep = time_graph(st, e0, e1, batches, prep);
            auto pct = [&](float ms) { return ms > 0 ? 100.0 * wbytes / (ms * 1e-3) / 1e9 / qb.copy_gbs : -1.0; };
            printf("%-8s %2d %8.1f | %6.1f%% %6.2f us %6.1f%% %6.2f us %6.1f%% %6.2f us %7.2f us | %.2e%s\n", s.name, n,
                   wbytes / 1e6, pct(t_mma), t_mma * 1e3, pct(t_imma), t_imma * 1e3, pct(t_be), t_be * 1e3, t_prep * 1e3,
                   rel, rel < 2e-2 ? "" : "  MISMATCH");
            const Cfg *cl = nf ? nf_cfgs : s.bits == 8 ? cfgs8 : cfgs;
            const int ncl = nf ? (int)(sizeof nf_cfgs / sizeof nf_cfgs[0])
                               : s.bits == 8 ? (int)(sizeof cfgs8 / sizeof cfgs8[0]) : (int)(sizeof cfgs / sizeof cfgs[0]);
            for (int ci = 0; ci < ncl; ci++) {  // the GEMV alone (x prepared above by imma(0)'s prep); n >= 3
                const Cfg &cf = cl[ci];
                if (n < 3) break;
                if (!listed("QMMA_CFGS", cf.name)) continue;
                auto f = [&](int i) {
                    return (int)cf.f(st, y2, x, n, qw_of(&Ws[i % copies]), nullptr, xp, xd, false);
                };
                CK(cudaMemset(y2, 0, 8 * s.R * 2));
                if (imma(0) || f(0)) { fprintf(stderr, "launch %s failed: %s\n", cf.name, fl_err_msg()); return 1; }
                CK(cudaStreamSynchronize(st));
                CK(cudaMemcpy(h2.data(), y2, n * s.R * 2, cudaMemcpyDeviceToHost));
                double d2 = 0;
                for (int64_t i = 0; i < n * s.R; i++)
                    d2 = std::max(d2, (double)fabs(__bfloat162float(h1[i]) - __bfloat162float(h2[i])));
                const double r2 = d2 / (my > 0 ? my : 1);
                if (!(r2 < 2e-2)) failures++;
                const float tc = time_graph(st, e0, e1, batches, f);
                printf("    %-8s %6.1f%% %6.2f us%s\n", cf.name, pct(tc), tc * 1e3, r2 < 2e-2 ? "" : "  MISMATCH");
            }
            fflush(stdout);
        }
        for (auto &w : Ws) { cudaFree(w.data_d); cudaFree(w.scales_d); cudaFree(w.zeros_d); }
        cudaFree(x); cudaFree(y); cudaFree(y2);
    }
    printf("%s\n", failures ? "VALIDATION FAILED" : "all shapes validated");
    return failures ? 1 : 0;
}
