// dev/cuda/persist_bench.cu: what a persistent decode kernel could save over a chain of kernels, measured before one
// is written (twenty-second session). A decode layer of Qwen2.5-7B int4 at batch 1 is eight dependent steps: four
// weight streams the size of its GEMVs (q|k|v 8.8 MB, o 6.8, gate|up 72.1, down 36.1) and four small steps between
// them (RMSNorm, attention, RMSNorm, SwiGLU: a few blocks reading a few KB to ~0.6 MB). Each step here streams its
// bytes (16-byte loads, 8 in flight a thread, folded into a checksum) and first reads a value the step before wrote,
// so each depends on the one before like the real ones. Four layers (496 MB of distinct buffers: nothing is reused
// from L2 between steps or replays). Run as:
//   chain-pdl   one kernel a step, programmatic dependent launch (weights of the first batch requested before
//               griddepcontrol.wait, as fastload's GEMVs do), in a CUDA graph
//   chain       the same without PDL
//   persist     one kernel for all steps, all blocks resident, a grid barrier (atomic count, acquire spin) between steps;
//               "early": each block requests its first batch of the next step's weights before the barrier
// Prints microseconds for the four layers and a layer, and the share of the device-to-device copy rate that the
// weight bytes alone would take.
//   nvcc -O3 -arch=sm_90 -o persist_bench dev/cuda/persist_bench.cu && ./persist_bench [reps [steps]]
// steps: a comma list of norm1,qkv,attention,combine,o,norm2,gate_up,swiglu,down (default all but combine), e.g.
// "qkv,attention,combine,o,gate_up,down" for a layer whose RMSNorms and SwiGLU are folded into the GEMVs.
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <algorithm>
#include <vector>

#define CK(x)                                                                                                   \
    do {                                                                                                        \
        cudaError_t e_ = (x);                                                                                   \
        if (e_ != cudaSuccess) {                                                                                \
            fprintf(stderr, "%s failed at %s:%d: %s\n", #x, __FILE__, __LINE__, cudaGetErrorString(e_));      \
            return 1;                                                                                           \
        }                                                                                                       \
    } while (0)

constexpr int TPB = 256, UNR = 8, MAXPH = 64;

struct Phase {
    const uint4 *p;  // the step's bytes
    uint64_t nvec;   // 16-byte vectors
    int blocks;      // blocks that work (0: all)
};
struct Plan {
    Phase ph[MAXPH];
    int n;
};

__device__ __forceinline__ uint4 ld_stream(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
    return v;
}
__device__ __forceinline__ unsigned ld_acquire(const unsigned *p) {
    unsigned v;
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
    return v;
}

// batch k of a block's share: vectors i0 + (k * UNR + j) * stride, j < UNR
__device__ __forceinline__ void load_batch(const Phase &ph, uint64_t i0, uint64_t stride, uint64_t k, uint4 (&w)[UNR]) {
#pragma unroll
    for (int j = 0; j < UNR; j++) {
        const uint64_t i = i0 + (k * UNR + j) * stride;
        w[j] = i < ph.nvec ? ld_stream(ph.p + i) : make_uint4(0, 0, 0, 0);
    }
}
__device__ __forceinline__ uint32_t fold(const uint4 (&w)[UNR], uint32_t acc) {
#pragma unroll
    for (int j = 0; j < UNR; j++) acc = acc * 31u + (w[j].x ^ w[j].y ^ w[j].z ^ w[j].w);
    return acc;
}
// The rest of a step after its first batch (already in w): every further batch, then the block's sum into out[b].
__device__ void finish(const Phase &ph, int b, int nb, uint4 (&w)[UNR], uint32_t acc, uint32_t *out) {
    const uint64_t stride = (uint64_t)nb * TPB, i0 = (uint64_t)b * TPB + threadIdx.x;
    acc = fold(w, acc);
    for (uint64_t k = 1; i0 + k * UNR * stride < ph.nvec; k++) {
        load_batch(ph, i0, stride, k, w);
        acc = fold(w, acc);
    }
    __shared__ uint32_t red[TPB / 32];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = acc;
    __syncthreads();
    if (threadIdx.x == 0) {
        uint32_t t = 0;
        for (int i = 0; i < TPB / 32; i++) t += red[i];
        out[b] = t;
    }
}

// chain: one step a launch. prev: the step before's outputs (nothing written by this one is read before the wait).
__global__ void __launch_bounds__(TPB) step_kernel(const Phase ph, const uint32_t *prev, int prev_n, uint32_t *out) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int b = blockIdx.x, nb = gridDim.x;
    uint4 w[UNR];
    load_batch(ph, (uint64_t)b * TPB + threadIdx.x, (uint64_t)nb * TPB, 0, w);  // weights: before the wait
    asm volatile("griddepcontrol.wait;" ::: "memory");
    const uint32_t dep = prev ? __ldcg(prev + b % prev_n) : 0u;
    finish(ph, b, nb, w, dep, out);
}

// Grid barriers. bar counts arrivals since the launch (zeroed before it); barrier k waits for k * arrivals-a-barrier.
// FLAT: every block's thread 0 adds one and spins (G atomics and G pollers on one word).
// CLUSTER: the blocks of a thread-block cluster meet at the hardware cluster barrier, its first block adds one for
// all and spins, and the cluster meets again (G / cluster atomics and pollers).
enum { BAR_FLAT = 0, BAR_CLUSTER = 1 };
__device__ __forceinline__ void cluster_sync_all() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
__device__ __forceinline__ unsigned cluster_rank() {
    unsigned r;
    asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
template <int BAR>
__device__ __forceinline__ void grid_barrier(unsigned *bar, unsigned k) {
    if constexpr (BAR == BAR_FLAT) {
        __syncthreads();
        if (threadIdx.x == 0) {
            __threadfence();
            atomicAdd(bar, 1u);
            const unsigned target = k * gridDim.x;
            while (ld_acquire(bar) < target) {
            }
        }
        __syncthreads();
    } else {
        cluster_sync_all();
        if (threadIdx.x == 0 && cluster_rank() == 0) {
            unsigned cs;
            asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(cs));
            __threadfence();
            atomicAdd(bar, 1u);
            const unsigned target = k * (gridDim.x / cs);
            while (ld_acquire(bar) < target) {
            }
        }
        cluster_sync_all();
    }
}

// persist: every step in one launch; out[s * G + b]; bar counts arrivals (zeroed before the launch).
template <int BAR>
__global__ void __launch_bounds__(TPB) persist_kernel(const Plan plan, uint32_t *out, unsigned *bar, int early) {
    const int b = blockIdx.x, G = gridDim.x;
    uint4 w[UNR];
    auto nb_of = [&](int s) { return plan.ph[s].blocks ? plan.ph[s].blocks : G; };
    bool have = false;
    for (int s = 0; s < plan.n; s++) {
        const int nb = nb_of(s);
        if (!have && b < nb) load_batch(plan.ph[s], (uint64_t)b * TPB + threadIdx.x, (uint64_t)nb * TPB, 0, w);
        have = false;
        if (s > 0) grid_barrier<BAR>(bar, (unsigned)s);
        if (b < nb) {
            const int pn = s > 0 ? nb_of(s - 1) : 1;
            const uint32_t dep = s > 0 ? __ldcg(out + (size_t)(s - 1) * G + b % pn) : 0u;
            finish(plan.ph[s], b, nb, w, dep, out + (size_t)s * G);
        }
        if (early && s + 1 < plan.n && b < nb_of(s + 1)) {  // the next step's weights, before its barrier
            load_batch(plan.ph[s + 1], (uint64_t)b * TPB + threadIdx.x, (uint64_t)nb_of(s + 1) * TPB, 0, w);
            have = true;
        }
    }
}

static float median(std::vector<float> v) {
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

// Median microseconds of `runs` timed calls of op() (after `warm` untimed ones), each between two events on st; pre()
// runs before each call, outside the timing. op and pre return cudaError_t.
template <typename Pre, typename Op>
static cudaError_t time_us(cudaStream_t st, cudaEvent_t e0, cudaEvent_t e1, int warm, int runs, Pre pre, Op op,
                           float *us) {
    std::vector<float> t;
    for (int r = 0; r < warm + runs; r++) {
        cudaError_t e;
        if ((e = pre()) != cudaSuccess || (e = cudaEventRecord(e0, st)) != cudaSuccess || (e = op()) != cudaSuccess ||
            (e = cudaEventRecord(e1, st)) != cudaSuccess || (e = cudaEventSynchronize(e1)) != cudaSuccess)
            return e;
        float ms;
        if ((e = cudaEventElapsedTime(&ms, e0, e1)) != cudaSuccess) return e;
        if (r >= warm) t.push_back(ms * 1e3f);
    }
    *us = median(t);
    return cudaSuccess;
}
static cudaError_t no_pre() { return cudaSuccess; }

int main(int argc, char **argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 20;
    int dev = 0, n_sm = 0;
    CK(cudaSetDevice(dev));
    CK(cudaDeviceGetAttribute(&n_sm, cudaDevAttrMultiProcessorCount, dev));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, dev));
    // a layer's steps (bytes, working blocks; 0 = all): argv[2] picks which, a comma list of these names (default: all
    // but "combine", run3's layer: the attention as one step). Leaving steps out prices a fusion before it is written.
    const double MB = 1e6;
    struct S { double bytes; int blocks; const char *name; };
    const S all[9] = {{16e3, 1, "norm1"},       {8.8 * MB, 0, "qkv"},     {0.6 * MB, 20, "attention"},
                      {73e3, 28, "combine"},    {6.8 * MB, 0, "o"},       {16e3, 1, "norm2"},
                      {72.1 * MB, 0, "gate_up"}, {152e3, 20, "swiglu"},   {36.1 * MB, 0, "down"}};
    const char *pick = argc > 2 ? argv[2] : "norm1,qkv,attention,o,norm2,gate_up,swiglu,down";
    S layer[9];
    int per = 0;
    for (int i = 0; i < 9; i++) {
        const size_t n = strlen(all[i].name);
        for (const char *q = pick; (q = strstr(q, all[i].name)) != nullptr; q += n)
            if ((q == pick || q[-1] == ',') && (q[n] == ',' || q[n] == 0)) {
                layer[per++] = all[i];
                break;
            }
    }
    if (per == 0) {
        fprintf(stderr, "no step of '%s' is one of norm1 qkv attention combine o norm2 gate_up swiglu down\n", pick);
        return 1;
    }
    const int LAYERS = 4, nph = per * LAYERS;
    printf("steps a layer: %s\n", pick);
    size_t total = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < per; i++) total += ((size_t)layer[i].bytes + 15) / 16 * 16;
    char *buf;
    CK(cudaMalloc(&buf, total));
    CK(cudaMemset(buf, 0x5a, total));
    Plan plan;
    plan.n = nph;
    size_t off = 0;
    double gemv_bytes = 0;
    for (int l = 0; l < LAYERS; l++)
        for (int i = 0; i < per; i++) {
            const size_t nb = ((size_t)layer[i].bytes + 15) / 16 * 16;
            plan.ph[l * per + i] = {(const uint4 *)(buf + off), nb / 16, layer[i].blocks};
            if (!layer[i].blocks) gemv_bytes += (double)nb;
            off += nb;
        }
    int occ_step = 0, occ_p = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_step, step_kernel, TPB, 0));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_p, persist_kernel<BAR_FLAT>, TPB, 0));
    uint32_t *out;
    unsigned *bar;
    const int Gmax = n_sm * std::max(occ_step, occ_p);
    CK(cudaMalloc(&out, (size_t)nph * Gmax * 4));
    CK(cudaMalloc(&bar, 4));
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    // copy rate: 256 MB device to device
    float copy_gbs = 0;
    {
        const size_t cb = (size_t)256 << 20;
        char *a, *c;
        CK(cudaMalloc(&a, cb));
        CK(cudaMalloc(&c, cb));
        float us;
        CK(time_us(st, e0, e1, 0, 7, no_pre, [&] { return cudaMemcpyAsync(c, a, cb, cudaMemcpyDeviceToDevice, st); }, &us));
        copy_gbs = (float)(2.0 * cb / (us * 1e-6) / 1e9);
        CK(cudaFree(a));
        CK(cudaFree(c));
    }
    const double ideal_us = gemv_bytes / (copy_gbs * 1e9) * 1e6;
    printf("%s, %d SMs, L2 %d MB; copy %.0f GB/s; %d layers, %.1f MB of GEMV bytes: %.1f us at the copy rate\n",
           prop.name, n_sm, prop.l2CacheSize >> 20, copy_gbs, LAYERS, gemv_bytes / MB, ideal_us);
    printf("occupancy: step_kernel %d, persist_kernel %d blocks of %d an SM\n", occ_step, occ_p, TPB);
    auto report = [&](const char *name, float us) {
        printf("%-24s %8.1f us  %7.2f us a layer  %5.1f%% of the copy rate (GEMV bytes only)\n", name, us, us / LAYERS,
               100.0 * ideal_us / us);
    };
    // the same layers with the small steps left out: what fusing them all into the GEMVs could give at best
    Plan gemv_only;
    gemv_only.n = 0;
    for (int s = 0; s < nph; s++)
        if (!plan.ph[s].blocks) gemv_only.ph[gemv_only.n++] = plan.ph[s];
    Plan one;  // every byte in one step: the stream's own ceiling (the small steps' bytes too)
    one.n = 1;
    one.ph[0] = {(const uint4 *)buf, total / 16, 0};
    // chains
    for (int pdl = 1; pdl >= 0; pdl--) {
        for (int bps : {occ_step, 4, 2, -1, -2}) {
            if (bps > occ_step || (bps < 0 && !pdl)) continue;
            const bool only = bps == -1, single = bps == -2;  // gemv_only / one step, at occ_step
            const Plan &pl = only ? gemv_only : single ? one : plan;
            if (bps < 0) bps = occ_step;
            const int np = pl.n;
            const int G = n_sm * bps;
            cudaGraph_t g;
            cudaGraphExec_t ge;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeGlobal));
            for (int s = 0; s < np; s++) {
                cudaLaunchConfig_t cfg = {};
                cfg.gridDim = dim3(pl.ph[s].blocks ? pl.ph[s].blocks : G);
                cfg.blockDim = dim3(TPB);
                cfg.stream = st;
                cudaLaunchAttribute at[1];
                at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
                at[0].val.programmaticStreamSerializationAllowed = 1;
                cfg.attrs = at;
                cfg.numAttrs = pdl ? 1 : 0;
                const int pn = s ? (pl.ph[s - 1].blocks ? pl.ph[s - 1].blocks : G) : 1;
                CK(cudaLaunchKernelEx(&cfg, step_kernel, pl.ph[s], s ? (const uint32_t *)(out + (size_t)(s - 1) * Gmax)
                                                                      : (const uint32_t *)nullptr,
                                      pn, out + (size_t)s * Gmax));
            }
            CK(cudaStreamEndCapture(st, &g));
            CK(cudaGraphInstantiate(&ge, g, 0));
            float us;
            CK(time_us(st, e0, e1, 3, reps, no_pre, [&] { return cudaGraphLaunch(ge, st); }, &us));
            char name[64];
            snprintf(name, sizeof name, "chain%s %d/SM%s", pdl ? "-pdl" : "", bps, only ? " GEMVs only" : single ? " one step" : "");
            report(name, us);
            CK(cudaGraphExecDestroy(ge));
            CK(cudaGraphDestroy(g));
        }
    }
    // persistent: launched with a cluster shape (1 = none) and without the cooperative attribute (every block fits
    // at once: G <= the resident count, nothing else runs)
    auto run_persist = [&](const Plan &pl, int bar_kind, int cluster, int G, int early, float *us) -> int {
        auto launch = [&]() -> cudaError_t {
            cudaLaunchConfig_t cfg = {};
            cfg.gridDim = dim3(G);
            cfg.blockDim = dim3(TPB);
            cfg.stream = st;
            cudaLaunchAttribute at[1];
            at[0].id = cudaLaunchAttributeClusterDimension;
            at[0].val.clusterDim.x = cluster;
            at[0].val.clusterDim.y = 1;
            at[0].val.clusterDim.z = 1;
            cfg.attrs = at;
            cfg.numAttrs = 1;
            return bar_kind == BAR_FLAT ? cudaLaunchKernelEx(&cfg, persist_kernel<BAR_FLAT>, pl, out, bar, early)
                                        : cudaLaunchKernelEx(&cfg, persist_kernel<BAR_CLUSTER>, pl, out, bar, early);
        };
        CK(time_us(st, e0, e1, 3, reps, [&] { return cudaMemsetAsync(bar, 0, 4, st); }, launch, us));
        return 0;
    };
    Plan empty = plan;
    for (int s = 0; s < nph; s++) empty.ph[s].nvec = 0;
    struct P { int bar, cluster, bps; };
    const P pcfg[] = {{BAR_FLAT, 1, 1}, {BAR_FLAT, 1, 2}, {BAR_FLAT, 1, 4}, {BAR_CLUSTER, 2, 1}, {BAR_CLUSTER, 4, 1},
                      {BAR_CLUSTER, 2, 2}, {BAR_CLUSTER, 4, 2}, {BAR_CLUSTER, 8, 2}, {BAR_CLUSTER, 4, 4},
                      {BAR_CLUSTER, 8, 4}, {BAR_CLUSTER, 16, 4}};
    for (const P &c : pcfg) {
        if (c.bps > occ_p) continue;
        // whole clusters that fit at once
        cudaLaunchConfig_t q = {};
        q.gridDim = dim3(n_sm * c.bps);
        q.blockDim = dim3(TPB);
        cudaLaunchAttribute at[1];
        at[0].id = cudaLaunchAttributeClusterDimension;
        at[0].val.clusterDim.x = c.cluster;
        at[0].val.clusterDim.y = 1;
        at[0].val.clusterDim.z = 1;
        q.attrs = at;
        q.numAttrs = 1;
        int ncl = 0;
        if (c.cluster > 8) cudaFuncSetAttribute(persist_kernel<BAR_CLUSTER>, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
        cudaError_t oe = c.bar == BAR_FLAT ? cudaOccupancyMaxActiveClusters(&ncl, persist_kernel<BAR_FLAT>, &q)
                                           : cudaOccupancyMaxActiveClusters(&ncl, persist_kernel<BAR_CLUSTER>, &q);
        if (oe != cudaSuccess || ncl <= 0) {
            cudaGetLastError();
            printf("cluster %d at %d/SM: not launchable (%s)\n", c.cluster, c.bps, cudaGetErrorString(oe));
            continue;
        }
        int G = std::min(n_sm * c.bps, ncl * c.cluster);
        G -= G % c.cluster;
        float us_bar = 0, us_full = 0, us_early = 0;
        if (run_persist(empty, c.bar, c.cluster, G, 0, &us_bar) || run_persist(plan, c.bar, c.cluster, G, 0, &us_full) ||
            run_persist(plan, c.bar, c.cluster, G, 1, &us_early))
            return 1;
        char name[64];
        snprintf(name, sizeof name, "persist %s c%d %d blk", c.bar == BAR_FLAT ? "flat" : "clus", c.cluster, G);
        report(name, us_full);
        snprintf(name, sizeof name, "  early loads");
        report(name, us_early);
        printf("  barriers only: %.2f us a step (%d barriers)\n", us_bar / nph, nph - 1);
    }
    return 0;
}
