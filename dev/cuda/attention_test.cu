// attention_test.cu: sandbox, correctness tests and benchmark for csrc/cuda/attention.cu.
//
// Build and run (dev/cuda/README.md):
//   nvcc -O3 -std=c++17 --use_fast_math -arch=sm_90 -Icsrc -o attention_test \
//        dev/cuda/attention_test.cu csrc/cuda/attention.cu csrc/fl_common.c
//   ./attention_test [--log FILE] [--no-bench] [--no-test]
//
// Tests: a float64 CPU reference of the exact semantics of fl_backend.h `attention` (causal,
// key padding mask with a row stride, sliding window, GQA, fully masked rows -> zeros) on the
// same rounded inputs; fresh random inputs per problem (never zeros), cache slots past the
// valid range filled with NaN (they must never be read), outputs poisoned with NaN before every
// run; error = ||out - ref||_2 / ||ref||_2, tolerances fixed up front per dtype, NaN fails.
// Benchmark: decode GB/s (KV bytes read / time) next to the measured device-to-device copy
// bandwidth, prefill TFLOP/s; CUDA events, warm-up, median of many, caches rotated over several
// "layers" so that the L2 does not serve repeated reads.
// Exit code: 0 if every case passed, 1 otherwise, 2 on a CUDA error in the harness.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <type_traits>
#include <vector>

#include "cuda/attention.cuh"
#include "fl_common.h"

#define CK(call)                                                                                            \
    do {                                                                                                    \
        cudaError_t e_ = (call);                                                                            \
        if (e_ != cudaSuccess) {                                                                            \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));          \
            exit(2);                                                                                        \
        }                                                                                                   \
    } while (0)

// ---- tolerances, decided up front -----------------------------------------------------------------
static double tolerance(fl_dtype t) { return t == FL_F16 ? 5e-3 : t == FL_BF16 ? 2e-2 : 1e-4; }

// ---- host element access ------------------------------------------------------------------------
static float g_lut_f16[65536], g_lut_bf16[65536];
static int esize(fl_dtype t) { return t == FL_F32 ? 4 : 2; }
static const char *dname(fl_dtype t) { return t == FL_F16 ? "f16" : t == FL_BF16 ? "bf16" : "f32"; }
static inline double getv(const std::vector<uint8_t> &v, fl_dtype t, size_t i) {
    if (t == FL_F32) { float f; memcpy(&f, &v[i * 4], 4); return f; }
    uint16_t h; memcpy(&h, &v[i * 2], 2);
    return t == FL_F16 ? g_lut_f16[h] : g_lut_bf16[h];
}
static inline void setv(std::vector<uint8_t> &v, fl_dtype t, size_t i, float x) {
    if (t == FL_F32) { memcpy(&v[i * 4], &x, 4); return; }
    const uint16_t h = t == FL_F16 ? fl_f32_to_f16(x) : fl_f32_to_bf16(x);
    memcpy(&v[i * 2], &h, 2);
}
static inline void set_nan(std::vector<uint8_t> &v, fl_dtype t, size_t i) {
    if (t == FL_F32) { const uint32_t n = 0x7fc00000u; memcpy(&v[i * 4], &n, 4); return; }
    const uint16_t n = t == FL_F16 ? 0x7e00 : 0x7fc0;
    memcpy(&v[i * 2], &n, 2);
}

struct Rng {
    uint64_t s;
    uint64_t next() {
        uint64_t z = (s += 0x9E3779B97F4A7C15ull);
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        return z ^ (z >> 31);
    }
    float uni(float a) { return (float)(((next() >> 40) * (1.0 / 16777216.0)) * 2.0 - 1.0) * a; }
};

struct Shape { const char *name; int nh, nkv, hd; };

// One problem: inputs on host and device, for one (dtype, shape, B, T, start).
struct Problem {
    fl_dtype dt;
    Shape sh;
    int B, T, start, max_len, stride;
    size_t qkv_n, cache_n, out_n;
    std::vector<uint8_t> qkv, kc, vc, kmask;  // kmask: [B, stride], left padding per row
    void *d_qkv = nullptr, *d_kc = nullptr, *d_vc = nullptr, *d_out = nullptr, *d_ws = nullptr;
    uint8_t *d_kmask = nullptr;
    int32_t *d_start = nullptr;
    size_t ws_bytes = 0;
};

static void upload_cache(Problem &p) {
    CK(cudaMemcpy(p.d_kc, p.kc.data(), p.kc.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p.d_vc, p.vc.data(), p.vc.size(), cudaMemcpyHostToDevice));
}

// Cache slots [0, start) random, [start, start+T) the new tokens' k/v from qkv (as rope_store
// leaves them), [start+T, max_len) NaN unless fill_all (then random: graph replays move start).
static void make_problem(Problem &p, fl_dtype dt, Shape sh, int B, int T, int start, int max_len, int stride,
                         Rng &rng, bool fill_all) {
    p.dt = dt; p.sh = sh; p.B = B; p.T = T; p.start = start; p.max_len = max_len; p.stride = stride;
    const int nh = sh.nh, nkv = sh.nkv, hd = sh.hd, es = esize(dt), L = start + T;
    const size_t qs = (size_t)(nh + 2 * nkv) * hd;
    p.qkv_n = (size_t)B * T * qs;
    p.cache_n = (size_t)B * max_len * nkv * hd;
    p.out_n = (size_t)B * T * nh * hd;
    p.qkv.assign(p.qkv_n * es, 0);
    p.kc.assign(p.cache_n * es, 0);
    p.vc.assign(p.cache_n * es, 0);
    for (size_t r = 0; r < (size_t)B * T; r++)
        for (size_t c = 0; c < qs; c++)  // q in [-3, 3], k/v in [-1, 1]: scores of std ~1, peaky softmax
            setv(p.qkv, dt, r * qs + c, rng.uni(c < (size_t)nh * hd ? 3.f : 1.f));
    for (int b = 0; b < B; b++)
        for (int j = 0; j < max_len; j++)
            for (int g = 0; g < nkv; g++)
                for (int d = 0; d < hd; d++) {
                    const size_t i = (((size_t)b * max_len + j) * nkv + g) * hd + d;
                    if (j >= start && j < L && !fill_all) {
                        const size_t row = ((size_t)b * T + (j - start)) * qs;
                        memcpy(&p.kc[i * es], &p.qkv[(row + (size_t)(nh + g) * hd + d) * es], es);
                        memcpy(&p.vc[i * es], &p.qkv[(row + (size_t)(nh + nkv + g) * hd + d) * es], es);
                    } else if (j < L || fill_all) {
                        setv(p.kc, dt, i, rng.uni(1.f));
                        setv(p.vc, dt, i, rng.uni(1.f));
                    } else {
                        set_nan(p.kc, dt, i);
                        set_nan(p.vc, dt, i);
                    }
                }
    p.kmask.assign((size_t)B * stride, 1);
    for (int b = 0; b < B; b++) {
        const int pad = (L * (b + 1)) / (B + 2);  // different left padding per row
        for (int j = 0; j < pad && j < stride; j++) p.kmask[(size_t)b * stride + j] = 0;
    }
    CK(cudaMalloc(&p.d_qkv, p.qkv.size()));
    CK(cudaMalloc(&p.d_kc, p.kc.size()));
    CK(cudaMalloc(&p.d_vc, p.vc.size()));
    CK(cudaMalloc(&p.d_out, p.out_n * es));
    CK(cudaMalloc(&p.d_kmask, p.kmask.size()));
    CK(cudaMalloc(&p.d_start, sizeof(int32_t)));
    p.ws_bytes = fl_cuda_attention_workspace(B, nh, hd, max_len);
    CK(cudaMalloc(&p.d_ws, p.ws_bytes ? p.ws_bytes : 16));
    CK(cudaMemcpy(p.d_qkv, p.qkv.data(), p.qkv.size(), cudaMemcpyHostToDevice));
    CK(cudaMemcpy(p.d_kmask, p.kmask.data(), p.kmask.size(), cudaMemcpyHostToDevice));
    upload_cache(p);
}

static void free_problem(Problem &p) {
    cudaFree(p.d_qkv); cudaFree(p.d_kc); cudaFree(p.d_vc); cudaFree(p.d_out);
    cudaFree(p.d_kmask); cudaFree(p.d_start); cudaFree(p.d_ws);
    p = Problem();
}

// float64 reference: key j visible from query slot i iff j <= i && (window == 0 || i - j < window)
// && kmask[b*stride + j]; no visible key: zeros.
static void reference(const Problem &p, int start, int window, bool use_mask, std::vector<double> &out) {
    const int B = p.B, T = p.T, nh = p.sh.nh, nkv = p.sh.nkv, hd = p.sh.hd, G = nh / nkv, L = start + T;
    const size_t qs = (size_t)(nh + 2 * nkv) * hd;
    const double scale = (double)(1.0f / sqrtf((float)hd));
    out.assign(p.out_n, 0.0);
    std::vector<double> kd((size_t)L * hd), vd((size_t)L * hd), sc(L), q(hd);
    for (int b = 0; b < B; b++)
        for (int g = 0; g < nkv; g++) {
            const int jlo = window > 0 ? std::max(0, start - window + 1) : 0;  // smallest key any query sees
            for (int j = jlo; j < L; j++)
                for (int d = 0; d < hd; d++) {
                    const size_t i = (((size_t)b * p.max_len + j) * nkv + g) * hd + d;
                    kd[(size_t)j * hd + d] = getv(p.kc, p.dt, i);
                    vd[(size_t)j * hd + d] = getv(p.vc, p.dt, i);
                }
            for (int t = 0; t < T; t++) {
                const int i = start + t, lo = window > 0 ? std::max(0, i - window + 1) : 0;
                for (int hh = 0; hh < G; hh++) {
                    const int h = g * G + hh;
                    const size_t row = (size_t)b * T + t;
                    for (int d = 0; d < hd; d++) q[d] = getv(p.qkv, p.dt, row * qs + (size_t)h * hd + d);
                    double mx = -INFINITY;
                    for (int j = lo; j <= i; j++) {
                        if (use_mask && !p.kmask[(size_t)b * p.stride + j]) { sc[j] = -INFINITY; continue; }
                        const double *k = &kd[(size_t)j * hd];
                        double s4[4] = {0, 0, 0, 0};  // 4 chains: the reference is the test's hot loop
                        int d = 0;
                        for (; d + 4 <= hd; d += 4)
                            for (int x = 0; x < 4; x++) s4[x] += q[d + x] * k[d + x];
                        for (; d < hd; d++) s4[0] += q[d] * k[d];
                        sc[j] = ((s4[0] + s4[1]) + (s4[2] + s4[3])) * scale;
                        mx = std::max(mx, sc[j]);
                    }
                    double *o = &out[row * nh * hd + (size_t)h * hd];
                    if (mx == -INFINITY) continue;
                    double sum = 0;
                    for (int j = lo; j <= i; j++) {
                        if (sc[j] == -INFINITY) continue;
                        const double e = exp(sc[j] - mx);
                        sum += e;
                        const double *v = &vd[(size_t)j * hd];
                        for (int d = 0; d < hd; d++) o[d] += e * v[d];
                    }
                    for (int d = 0; d < hd; d++) o[d] /= sum;
                }
            }
        }
}

// ---- result bookkeeping ----------------------------------------------------------------------
struct Group { int n = 0, fails = 0; double worst = 0; };
static std::map<std::string, Group> g_groups;
static std::vector<std::string> g_failed;
static FILE *g_log = nullptr;
static int g_cases = 0, g_fails = 0;

static void record(const std::string &group, const std::string &line, double err, bool ok) {
    Group &gr = g_groups[group];
    gr.n++;
    if (!ok) { gr.fails++; g_fails++; g_failed.push_back(line); }
    if (std::isnan(err) || err > gr.worst) gr.worst = std::isnan(err) ? INFINITY : std::max(gr.worst, err);
    g_cases++;
    if (g_log) fprintf(g_log, "%s\n", line.c_str());
}

// Poison, run, compare. host_start is what the host passes (stale when start_d is used).
static void run_case(Problem &p, int start, int window, bool use_mask, bool use_sd, int path,
                     const std::vector<double> &ref, const char *group_tag) {
    const int es = esize(p.dt);
    CK(cudaMemset(p.d_out, 0xff, p.out_n * es));  // NaN in f16, bf16 and f32
    int host_start = start;
    if (use_sd) {
        CK(cudaMemcpy(p.d_start, &start, sizeof start, cudaMemcpyHostToDevice));
        host_start = start / 2;  // stale on purpose: the kernels must read *start_d
    }
    const float scale = 1.0f / sqrtf((float)p.sh.hd);
    char line[512];
    fl_err_clear();
    fl_status st = fl_cuda_attention_ex(0, p.dt, p.d_out, p.d_qkv, p.B, p.T, host_start, use_sd ? p.d_start : nullptr,
                                        use_mask ? p.d_kmask : nullptr, p.stride, p.d_kc, p.d_vc, p.max_len, p.sh.nh,
                                        p.sh.nkv, p.sh.hd, window, scale, p.d_ws, p.ws_bytes, path, nullptr);
    CK(cudaDeviceSynchronize());
    double err = NAN;
    long nans = 0;
    if (st == FL_OK) {
        std::vector<uint8_t> got(p.out_n * es);
        CK(cudaMemcpy(got.data(), p.d_out, got.size(), cudaMemcpyDeviceToHost));
        double num = 0, den = 0;
        for (size_t i = 0; i < p.out_n; i++) {
            const double g = getv(got, p.dt, i);
            if (std::isnan(g) || std::isinf(g)) { nans++; continue; }
            num += (g - ref[i]) * (g - ref[i]);
            den += ref[i] * ref[i];
        }
        err = nans ? NAN : sqrt(num / (den > 0 ? den : 1));
    }
    const bool ok = st == FL_OK && nans == 0 && err < tolerance(p.dt);
    snprintf(line, sizeof line, "%-6s %-5s %-13s B=%d T=%-3d start=%-5d win=%-4d mask=%d start_d=%d  err=%.3e %s%s%s",
             group_tag, dname(p.dt), p.sh.name, p.B, p.T, start, window, (int)use_mask, (int)use_sd, err,
             ok ? "PASS" : "FAIL", st != FL_OK ? "  status: " : (nans ? "  non-finite outputs" : ""),
             st != FL_OK ? fl_err_msg() : "");
    std::string group = std::string(group_tag) + " " + dname(p.dt) + " " + p.sh.name;
    record(group, line, err, ok);
}

struct Cfg { int B, T, start; };

// Runs every (window, mask, start_d) variant of one problem.
static void run_matrix(fl_dtype dt, Shape sh, Cfg c, const std::vector<int> &windows, const std::vector<int> &sds,
                       int path, const char *tag, Rng &rng) {
    Problem p;
    const int L = c.start + c.T;
    const int max_len = L == 32768 ? 32768 : L + 3;  // spare NaN slots past the valid range
    make_problem(p, dt, sh, c.B, c.T, c.start, max_len, L + 5, rng, false);
    std::vector<double> ref;
    for (int w : windows)
        for (int m = 0; m < 2; m++) {
            reference(p, c.start, w, m, ref);
            for (int sd : sds) run_case(p, c.start, w, m, sd, path, ref, tag);
        }
    free_problem(p);
}

// A decode step captured once in a CUDA graph (device start), replayed with other starts; slots
// past each replay's range are refilled with NaN before it.
static void graph_test(fl_dtype dt, Shape sh, int window, Rng &rng) {
    const int B = 2, max_len = 4096;
    Problem p;
    make_problem(p, dt, sh, B, 1, 100, max_len, max_len, rng, true);
    const std::vector<uint8_t> kc0 = p.kc, vc0 = p.vc;
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    int start0 = 100;
    CK(cudaMemcpy(p.d_start, &start0, sizeof start0, cudaMemcpyHostToDevice));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    const fl_status st = fl_cuda_attention(s, dt, p.d_out, p.d_qkv, B, 1, start0, p.d_start, p.d_kmask, p.stride,
                                           p.d_kc, p.d_vc, max_len, sh.nh, sh.nkv, sh.hd, window,
                                           1.0f / sqrtf((float)sh.hd), p.d_ws, p.ws_bytes, nullptr);
    CK(cudaStreamEndCapture(s, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    const int starts[] = {100, 37, 1000, 4095, 0, 2047};
    std::vector<double> ref;
    for (int start : starts) {
        p.kc = kc0; p.vc = vc0;
        for (int b = 0; b < B; b++)
            for (int j = start + 1; j < max_len; j++)
                for (int x = 0; x < sh.nkv * sh.hd; x++) {
                    const size_t i = ((size_t)b * max_len + j) * sh.nkv * sh.hd + x;
                    set_nan(p.kc, dt, i);
                    set_nan(p.vc, dt, i);
                }
        upload_cache(p);
        CK(cudaMemcpy(p.d_start, &start, sizeof start, cudaMemcpyHostToDevice));
        CK(cudaMemset(p.d_out, 0xff, p.out_n * esize(dt)));
        CK(cudaGraphLaunch(exec, s));
        CK(cudaStreamSynchronize(s));
        std::vector<uint8_t> got(p.out_n * esize(dt));
        CK(cudaMemcpy(got.data(), p.d_out, got.size(), cudaMemcpyDeviceToHost));
        reference(p, start, window, true, ref);
        double num = 0, den = 0;
        long nans = 0;
        for (size_t i = 0; i < p.out_n; i++) {
            const double g = getv(got, dt, i);
            if (!std::isfinite(g)) { nans++; continue; }
            num += (g - ref[i]) * (g - ref[i]);
            den += ref[i] * ref[i];
        }
        const double err = nans ? NAN : sqrt(num / (den > 0 ? den : 1));
        const bool ok = st == FL_OK && !nans && err < tolerance(dt);
        char line[256];
        snprintf(line, sizeof line, "graph  %-5s %-13s B=%d replay start=%-5d win=%-4d mask=1  err=%.3e %s", dname(dt),
                 sh.name, B, start, window, err, ok ? "PASS" : "FAIL");
        record(std::string("graph ") + dname(dt) + " " + sh.name, line, err, ok);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(s));
    free_problem(p);
}

// Argument errors must come back as statuses, not crashes.
static void error_tests() {
    Rng rng{7};
    Problem p;
    Shape sh = {"qwen2.5-7b", 28, 4, 128};
    make_problem(p, FL_BF16, sh, 1, 1, 10, 64, 64, rng, false);
    struct { const char *what; fl_status want; fl_status got; } t[4];
    t[0] = {"workspace too small", FL_E_VALUE,
            fl_cuda_attention(0, FL_BF16, p.d_out, p.d_qkv, 1, 1, 10, nullptr, nullptr, 0, p.d_kc, p.d_vc, 64, 28, 4,
                              128, 0, 0.1f, p.d_ws, 16, nullptr)};
    t[1] = {"start + T > max_len", FL_E_VALUE,
            fl_cuda_attention(0, FL_BF16, p.d_out, p.d_qkv, 1, 1, 64, nullptr, nullptr, 0, p.d_kc, p.d_vc, 64, 28, 4,
                              128, 0, 0.1f, p.d_ws, p.ws_bytes, nullptr)};
    t[2] = {"heads not a multiple", FL_E_VALUE,
            fl_cuda_attention(0, FL_BF16, p.d_out, p.d_qkv, 1, 1, 10, nullptr, nullptr, 0, p.d_kc, p.d_vc, 64, 28, 5,
                              128, 0, 0.1f, p.d_ws, p.ws_bytes, nullptr)};
    t[3] = {"f64 activations", FL_E_UNSUPPORTED,
            fl_cuda_attention(0, FL_F64, p.d_out, p.d_qkv, 1, 1, 10, nullptr, nullptr, 0, p.d_kc, p.d_vc, 64, 28, 4,
                              128, 0, 0.1f, p.d_ws, p.ws_bytes, nullptr)};
    CK(cudaDeviceSynchronize());
    for (auto &x : t) {
        char line[256];
        const bool ok = x.got == x.want;
        snprintf(line, sizeof line, "errors %-28s status=%d want=%d %s", x.what, (int)x.got, (int)x.want,
                 ok ? "PASS" : "FAIL");
        record("errors", line, 0, ok);
    }
    free_problem(p);
}

// ---- benchmark ---------------------------------------------------------------------------------
template <typename T> __global__ void fill_kernel(T *p, size_t n, uint64_t seed, float amp) {
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
        uint64_t z = (i + 1) * 0x9E3779B97F4A7C15ull ^ seed;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
        z ^= z >> 31;
        const float u = (float)((z >> 40) * (1.0 / 16777216.0) * 2.0 - 1.0) * amp;
        if constexpr (std::is_same<T, __half>::value) p[i] = __float2half(u);
        else p[i] = __float2bfloat16(u);
    }
}
static void fill_random(void *p, fl_dtype dt, size_t n, uint64_t seed, float amp) {
    if (dt == FL_F16) fill_kernel<__half><<<1024, 256>>>((__half *)p, n, seed, amp);
    else fill_kernel<__nv_bfloat16><<<1024, 256>>>((__nv_bfloat16 *)p, n, seed, amp);
    CK(cudaGetLastError());
}

static double median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

static double g_copy_gbs = 0;
static void bench_copy() {
    const size_t n = (size_t)1 << 30;
    void *a, *b;
    CK(cudaMalloc(&a, n));
    CK(cudaMalloc(&b, n));
    CK(cudaMemset(a, 1, n));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ts;
    for (int it = 0; it < 23; it++) {
        CK(cudaEventRecord(e0));
        CK(cudaMemcpyAsync(b, a, n, cudaMemcpyDeviceToDevice));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        if (it >= 3) ts.push_back(ms);
    }
    g_copy_gbs = 2.0 * n / (median(ts) * 1e-3) / 1e9;
    printf("device-to-device copy (1 GiB, read + write counted): %.0f GB/s\n", g_copy_gbs);
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    CK(cudaFree(a)); CK(cudaFree(b));
}

// Returns the median time per attention call in seconds; prints a line unless quiet.
static double bench_decode(fl_dtype dt, Shape sh, int B, int ctx, int max_len, bool use_sd, int path = FL_ATT_AUTO,
                           bool quiet = false) {
    const size_t layer_elems = (size_t)B * max_len * sh.nkv * sh.hd;
    const double kv_bytes = 2.0 * B * ctx * sh.nkv * sh.hd * 2;  // K and V of the visible slots
    int NL = (int)std::ceil(150e6 / kv_bytes);                   // rotate well past the L2
    NL = std::max(2, std::min(64, NL));
    void *k, *v, *qkv, *out, *ws;
    int32_t *sd;
    CK(cudaMalloc(&k, layer_elems * 2 * NL));
    CK(cudaMalloc(&v, layer_elems * 2 * NL));
    const size_t qkv_n = (size_t)B * (sh.nh + 2 * sh.nkv) * sh.hd;
    CK(cudaMalloc(&qkv, qkv_n * 2));
    CK(cudaMalloc(&out, (size_t)B * sh.nh * sh.hd * 2));
    const size_t wsb = fl_cuda_attention_workspace(B, sh.nh, sh.hd, max_len);
    CK(cudaMalloc(&ws, wsb));
    CK(cudaMalloc(&sd, 4));
    const int start = ctx - 1;
    CK(cudaMemcpy(sd, &start, 4, cudaMemcpyHostToDevice));
    fill_random(k, dt, layer_elems * NL, 11, 1.f);
    fill_random(v, dt, layer_elems * NL, 12, 1.f);
    fill_random(qkv, dt, qkv_n, 13, 3.f);
    const float scale = 1.0f / sqrtf((float)sh.hd);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    auto launch = [&](int l) {
        const fl_status st = fl_cuda_attention_ex(s, dt, out, qkv, B, 1, start, use_sd ? sd : nullptr, nullptr, 0,
                                                  (char *)k + layer_elems * 2 * l, (char *)v + layer_elems * 2 * l,
                                                  max_len, sh.nh, sh.nkv, sh.hd, 0, scale, ws, wsb, path, nullptr);
        if (st != FL_OK) { fprintf(stderr, "decode bench: %s\n", fl_err_msg()); exit(2); }
    };
    launch(0);  // outside the capture: first-call set-up (occupancy query) happens here
    CK(cudaStreamSynchronize(s));
    // One graph of NL launches (one per "layer"), as a replayed decode step issues them.
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
    for (int l = 0; l < NL; l++) launch(l);
    CK(cudaStreamEndCapture(s, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int w = 0; w < 3; w++) CK(cudaGraphLaunch(exec, s));
    std::vector<float> ts;
    const int reps = std::max(15, 400 / NL);
    for (int r = 0; r < reps; r++) {
        CK(cudaEventRecord(e0, s));
        CK(cudaGraphLaunch(exec, s));
        CK(cudaEventRecord(e1, s));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms / NL);
    }
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(s));
    const double t = median(ts) * 1e-3;
    const double gbs = kv_bytes / t / 1e9;
    if (!quiet)
        printf("  %-5s %-11s B=%d ctx=%-6d max_len=%-6d %s %9.1f us %8.0f GB/s %6.1f %% of copy\n", dname(dt),
               sh.name, B, ctx, max_len, use_sd ? "dev-start" : "host-start", t * 1e6, gbs, 100.0 * gbs / g_copy_gbs);
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(qkv)); CK(cudaFree(out)); CK(cudaFree(ws)); CK(cudaFree(sd));
    return t;
}

// A few plain (ungraphed) decode launches, for a profiler: ncu -k regex:decode ./attention_test --profile
static void profile_decode(Shape sh) {
    const int cfg[3][2] = {{1, 32768}, {1, 8192}, {8, 32768}};
    for (auto &c : cfg) {
        const int B = c[0], ctx = c[1];
        const size_t n = (size_t)B * ctx * sh.nkv * sh.hd, qkv_n = (size_t)B * (sh.nh + 2 * sh.nkv) * sh.hd;
        void *k, *v, *qkv, *out, *ws;
        const size_t wsb = fl_cuda_attention_workspace(B, sh.nh, sh.hd, ctx);
        CK(cudaMalloc(&k, n * 2)); CK(cudaMalloc(&v, n * 2)); CK(cudaMalloc(&qkv, qkv_n * 2));
        CK(cudaMalloc(&out, (size_t)B * sh.nh * sh.hd * 2)); CK(cudaMalloc(&ws, wsb));
        fill_random(k, FL_BF16, n, 1, 1.f); fill_random(v, FL_BF16, n, 2, 1.f); fill_random(qkv, FL_BF16, qkv_n, 3, 3.f);
        for (int it = 0; it < 2; it++)
            if (fl_cuda_attention(0, FL_BF16, out, qkv, B, 1, ctx - 1, nullptr, nullptr, 0, k, v, ctx, sh.nh, sh.nkv,
                                  sh.hd, 0, 0.088f, ws, wsb, nullptr) != FL_OK) { fprintf(stderr, "%s\n", fl_err_msg()); exit(2); }
        CK(cudaDeviceSynchronize());
        printf("profiled %s B=%d ctx=%d: 2 launches (KV %.1f MB)\n", sh.name, B, ctx, 4.0 * n / 1e6);
        CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(qkv)); CK(cudaFree(out)); CK(cudaFree(ws));
    }
}

static void bench_prefill(fl_dtype dt, Shape sh, int B, int T, int window, int path) {
    const size_t cache_n = (size_t)B * T * sh.nkv * sh.hd;
    const size_t qkv_n = (size_t)B * T * (sh.nh + 2 * sh.nkv) * sh.hd;
    void *k, *v, *qkv, *out;
    CK(cudaMalloc(&k, cache_n * 2));
    CK(cudaMalloc(&v, cache_n * 2));
    CK(cudaMalloc(&qkv, qkv_n * 2));
    CK(cudaMalloc(&out, (size_t)B * T * sh.nh * sh.hd * 2));
    fill_random(k, dt, cache_n, 21, 1.f);
    fill_random(v, dt, cache_n, 22, 1.f);
    fill_random(qkv, dt, qkv_n, 23, 3.f);
    const float scale = 1.0f / sqrtf((float)sh.hd);
    auto launch = [&] {
        const fl_status st = fl_cuda_attention_ex(0, dt, out, qkv, B, T, 0, nullptr, nullptr, 0, k, v, T, sh.nh,
                                                  sh.nkv, sh.hd, window, scale, nullptr, 0, path, nullptr);
        if (st != FL_OK) { fprintf(stderr, "prefill bench: %s\n", fl_err_msg()); exit(2); }
    };
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    for (int w = 0; w < 3; w++) launch();
    std::vector<float> ts;
    const int reps = path == FL_ATT_SIMPLE ? 3 : 30;
    for (int r = 0; r < reps; r++) {
        CK(cudaEventRecord(e0));
        launch();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float ms;
        CK(cudaEventElapsedTime(&ms, e0, e1));
        ts.push_back(ms);
    }
    const double t = median(ts) * 1e-3;
    double pairs = 0;  // visible (query, key) pairs
    for (int i = 0; i < T; i++) pairs += window > 0 ? std::min(i + 1, window) : i + 1;
    const double flops = 4.0 * sh.hd * sh.nh * B * pairs;
    printf("  %-5s %-11s B=%d T=%-5d win=%-4d %-6s %9.1f us %7.1f TFLOP/s\n", dname(dt), sh.name, B, T, window,
           path == FL_ATT_SIMPLE ? "simple" : path == FL_ATT_VARIANT0 + 1 ? "v1" : "fast", t * 1e6, flops / t / 1e12);
    CK(cudaEventDestroy(e0)); CK(cudaEventDestroy(e1));
    CK(cudaFree(k)); CK(cudaFree(v)); CK(cudaFree(qkv)); CK(cudaFree(out));
}

int main(int argc, char **argv) {
    const char *log_path = "attention_cases.log";
    bool do_bench = true, do_test = true, do_profile = false;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--log") && i + 1 < argc) log_path = argv[++i];
        else if (!strcmp(argv[i], "--no-bench")) do_bench = false;
        else if (!strcmp(argv[i], "--no-test")) do_test = false;
        else if (!strcmp(argv[i], "--profile")) do_profile = true, do_test = do_bench = false;
        else { fprintf(stderr, "usage: %s [--log FILE] [--no-bench] [--no-test] [--profile]\n", argv[0]); return 2; }
    }
    for (int i = 0; i < 65536; i++) {
        g_lut_f16[i] = fl_f16_to_f32((uint16_t)i);
        g_lut_bf16[i] = fl_bf16_to_f32((uint16_t)i);
    }
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s, sm_%d%d, %d SMs, %.0f MB L2\n", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
           prop.l2CacheSize / 1e6);
    g_log = do_test ? fopen(log_path, "w") : nullptr;

    const Shape qwen = {"qwen2.5-7b", 28, 4, 128}, llama = {"llama3-8b", 32, 8, 128}, smol = {"smollm2", 9, 3, 64};
    const Shape hd80 = {"hd80", 8, 2, 80}, mha = {"mha-64", 8, 8, 64}, g12 = {"g12-128", 24, 2, 128},
                g16 = {"g16-64", 32, 2, 64};
    const Cfg cfgs[] = {{1, 1, 0}, {1, 1, 37}, {3, 1, 100}, {2, 17, 0}, {2, 5, 11}, {1, 300, 0}, {1, 1, 32767}};
    const fl_dtype halfs[] = {FL_F16, FL_BF16};
    Rng rng{12345};
    if (do_profile) {
        profile_decode(qwen);
        return 0;
    }
    if (do_test) {
        // The matrix of the brief: every config x model shape x window x mask x start_d, both dtypes.
        for (fl_dtype dt : halfs)
            for (Shape sh : {qwen, llama, smol})
                for (Cfg c : cfgs) run_matrix(dt, sh, c, {0, 6, 4096}, {0, 1}, FL_ATT_AUTO, "auto", rng);
        // Head groupings the model shapes miss: MHA (G=1), G=12 and G=16 (two head subgroups in decode).
        for (fl_dtype dt : halfs)
            for (Shape sh : {mha, g12, g16})
                for (Cfg c : cfgs) run_matrix(dt, sh, c, {0, 4096}, {0, 1}, FL_ATT_AUTO, "auto", rng);
        // The fallback kernel: forced, on the model shapes, and by head_dim 80 and f32 through auto.
        for (fl_dtype dt : halfs)
            for (Shape sh : {qwen, smol})
                for (Cfg c : cfgs) run_matrix(dt, sh, c, {0, 6, 4096}, {0, 1}, FL_ATT_SIMPLE, "simple", rng);
        for (fl_dtype dt : halfs)
            for (int ci = 0; ci < 6; ci++) run_matrix(dt, hd80, cfgs[ci], {0, 6}, {0, 1}, FL_ATT_AUTO, "auto", rng);
        // The sandbox's tuning variants (attention.cu): v1 prefill at 3 blocks/SM; v2, v4, v6, v8, v10
        // decode grid order (v2: head subgroups first) and split plans (v4/v8: at least 2/4 waves).
        for (fl_dtype dt : halfs)
            for (Shape sh : {qwen, smol})
                for (int ci = 3; ci < 6; ci++)
                    run_matrix(dt, sh, cfgs[ci], {0, 6, 4096}, {0, 1}, FL_ATT_VARIANT0 + 1, "v1", rng);
        for (int v : {2, 4, 6, 8, 10}) {
            char tag[8];
            snprintf(tag, sizeof tag, "v%d", v);
            for (fl_dtype dt : halfs)
                for (Shape sh : {qwen, smol})
                    for (int ci : {0, 1, 2, 6}) run_matrix(dt, sh, cfgs[ci], {0, 6, 4096}, {0, 1}, FL_ATT_VARIANT0 + v, tag, rng);
        }
        for (Shape sh : {smol, qwen})
            for (int ci = 0; ci < 6; ci++) run_matrix(FL_F32, sh, cfgs[ci], {0, 6}, {0, 1}, FL_ATT_AUTO, "auto", rng);
        // Decode captured in a CUDA graph, replayed with other device starts.
        for (fl_dtype dt : halfs) {
            graph_test(dt, qwen, 0, rng);
            graph_test(dt, smol, 64, rng);
        }
        error_tests();

        printf("\ncorrectness: %d cases, %d failed (tolerance rel-L2 < 5e-3 f16, < 2e-2 bf16, < 1e-4 f32; "
               "per-case lines in %s)\n", g_cases, g_fails, log_path);
        printf("  %-34s %6s %6s %11s\n", "path dtype shape", "cases", "fails", "worst err");
        for (auto &kv : g_groups)
            printf("  %-34s %6d %6d %11.3e\n", kv.first.c_str(), kv.second.n, kv.second.fails, kv.second.worst);
        for (size_t i = 0; i < g_failed.size() && i < 40; i++) printf("FAILED: %s\n", g_failed[i].c_str());
    }
    if (g_log) fclose(g_log);

    if (do_bench) {
        printf("\n");
        bench_copy();
        printf("decode (T=1, no mask, window 0), KV bytes read / time:\n");
        for (Shape sh : {qwen, llama, smol})
            for (int B : {1, 8})
                for (int ctx : {1024, 8192, 32768}) bench_decode(FL_BF16, sh, B, ctx, ctx, false);
        bench_decode(FL_F16, qwen, 1, 32768, 32768, false);
        bench_decode(FL_F16, qwen, 8, 32768, 32768, false);
        for (int ctx : {1024, 8192, 32768}) bench_decode(FL_BF16, qwen, 1, ctx, 32768, true);  // graph-style grid
        bench_decode(FL_BF16, qwen, 8, 8192, 32768, true);
        printf("decode variants, us per call (bf16; v0 default; v2 subgroup-first grid; v4/v8 at least 2/4 waves; "
               "v6 = v2+v4; v10 = v2+v8):\n  %-11s %-3s %-6s", "shape", "B", "ctx");
        const int vars[] = {0, 2, 4, 6, 8, 10};
        for (int v : vars) printf(" %8s%d", "v", v);
        printf("\n");
        for (Shape sh : {qwen, llama, smol})
            for (int B : {1, 8})
                for (int ctx : {8192, 32768}) {
                    printf("  %-11s %-3d %-6d", sh.name, B, ctx);
                    for (int v : vars)
                        printf(" %9.1f", 1e6 * bench_decode(FL_BF16, sh, B, ctx, ctx, false, FL_ATT_VARIANT0 + v, true));
                    printf("\n");
                }
        printf("prefill (B=1, start 0, causal; FLOPs = 4*hd*nh*visible pairs):\n");
        for (Shape sh : {qwen, llama, smol})
            for (int T : {512, 2048})
                for (fl_dtype dt : halfs) bench_prefill(dt, sh, 1, T, 0, FL_ATT_AUTO);
        bench_prefill(FL_BF16, qwen, 1, 2048, 4096, FL_ATT_AUTO);
        bench_prefill(FL_BF16, qwen, 1, 8192, 0, FL_ATT_AUTO);
        bench_prefill(FL_BF16, qwen, 1, 8192, 1024, FL_ATT_AUTO);
        bench_prefill(FL_BF16, qwen, 4, 2048, 0, FL_ATT_AUTO);
        printf("prefill, variant v1 (3 blocks/SM, 168 registers) for comparison:\n");
        for (Shape sh : {qwen, smol})
            for (int T : {512, 2048, 8192}) bench_prefill(FL_BF16, sh, 1, T, 0, FL_ATT_VARIANT0 + 1);
        bench_prefill(FL_BF16, qwen, 1, 512, 0, FL_ATT_SIMPLE);
    }
    if (do_test) printf("\n%s: %d of %d cases failed\n", g_fails ? "FAIL" : "PASS", g_fails, g_cases);
    return g_fails ? 1 : 0;
}
