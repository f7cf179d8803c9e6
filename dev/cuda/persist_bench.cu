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
//   persist-tma (thirty-sixth session) one block an SM: a producer warp streams the block's slice of every step into
//               shared memory with the copy engine, running ahead across steps; consumer warps wait on a counter of
//               the step before (no grid barrier); see persist_tma_kernel and benchmarks/results/persist-tma-2026-12-06/
// Prints microseconds for the four layers and a layer, and the share of the device-to-device copy rate that the
// weight bytes alone would take. argv[3]: work per byte (0 checksum, 1 / 2 a 4-bit GEMV's arithmetic, roughly).
// Environment: PERSIST_TMA_ONLY=1 skips the grid-barrier persist rows; PERSIST_XMODE=0|1|2 what a step hands the next
// (one value; a 4096-value vector after a counter, read whole by every block, the chain too; the vector as polled
// {value, epoch} words).
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

#include "tma_util.cuh"

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
// WORK (set by argv[3]): 0 a checksum (a few instructions a 16 bytes); 1 a 4-bit GEMV's arithmetic, roughly: each
// 32-bit word split into its two nibble planes, two dp4a against x held in registers, and a float scale every 16 bytes
// (~0.7 instructions a weight; fastload's kernel has ~1.66); 2 that twice (~1.4 a weight).
__constant__ int c_work;
__device__ __forceinline__ uint32_t fold1(const uint4 &v, uint32_t acc) {
    if (c_work == 0) return acc * 31u + (v.x ^ v.y ^ v.z ^ v.w);
    const int xa = 0x01020304 + (int)threadIdx.x, xb = 0x05060708 ^ (int)threadIdx.x;
    float f = __uint_as_float((acc & 0x007fffffu) | 0x3f800000u);
    for (int r = 0; r < c_work; r++) {
        int d = 0;
        d = __dp4a((int)(v.x & 0x0f0f0f0fu), xa, d);
        d = __dp4a((int)((v.x >> 4) & 0x0f0f0f0fu), xb, d);
        d = __dp4a((int)(v.y & 0x0f0f0f0fu), xa, d);
        d = __dp4a((int)((v.y >> 4) & 0x0f0f0f0fu), xb, d);
        d = __dp4a((int)(v.z & 0x0f0f0f0fu), xa, d);
        d = __dp4a((int)((v.z >> 4) & 0x0f0f0f0fu), xb, d);
        d = __dp4a((int)(v.w & 0x0f0f0f0fu), xa, d);
        d = __dp4a((int)((v.w >> 4) & 0x0f0f0f0fu), xb, d);
        f = fmaf(1.0009765625f, (float)d, f);
    }
    return __float_as_uint(f) ^ acc;
}
__device__ __forceinline__ uint32_t fold(const uint4 (&w)[UNR], uint32_t acc) {
#pragma unroll
    for (int j = 0; j < UNR; j++) acc = fold1(w[j], acc);
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
// xin / xout (PERSIST_XMODE >= 1): the step before's 4096-value vector, read whole after the wait, and this step's,
// written in shares (block b of nb: values [b, b + 1) * 4096 / nb), as a GEMV's x and y.
__global__ void __launch_bounds__(TPB) step_kernel(const Phase ph, const uint32_t *prev, int prev_n, uint32_t *out,
                                                   const uint32_t *xin, uint32_t *xout) {
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    const int b = blockIdx.x, nb = gridDim.x;
    uint4 w[UNR];
    load_batch(ph, (uint64_t)b * TPB + threadIdx.x, (uint64_t)nb * TPB, 0, w);  // weights: before the wait
    asm volatile("griddepcontrol.wait;" ::: "memory");
    uint32_t dep = prev ? __ldcg(prev + b % prev_n) : 0u;
    if (xin)
        for (int i = threadIdx.x; i < 4096 / 4; i += TPB) {
            const uint4 v = __ldcg((const uint4 *)xin + i);
            dep ^= v.x ^ v.y ^ v.z ^ v.w;
        }
    finish(ph, b, nb, w, dep, out);
    if (xout) {
        __syncthreads();
        const uint32_t t = ((volatile uint32_t *)out)[b];
        const int lo = (int)((long)b * 4096 / nb), hi = (int)((long)(b + 1) * 4096 / nb);
        for (int i = lo + threadIdx.x; i < hi; i += TPB) xout[i] = t ^ (uint32_t)i;
    }
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

// persist-tma: one block an SM, a producer warp and NC consumer warps. The producer streams every step's bytes of this
// block (a contiguous slice of each step: block b of nb takes [b, b + 1) / nb of it) into a ring of shared-memory
// stages with the copy engine (cp.async.bulk, completion on an mbarrier a stage), running ahead across steps: weights
// do not depend on the step before, so the ring fills while the consumers wait for their dependency. The consumers
// wait for the step before (a counter a step that its working blocks add one to, red.release, after writing their
// output), read its output, fold the stages and release them (one arrival a warp on the stage's "empty" barrier).
// No grid barrier: a step waits only for the step before's working blocks (one block for a norm, 20 for attention).
constexpr int NC = 8, PT = 32 * (NC + 1);
__device__ __forceinline__ void red_release(unsigned *p, unsigned v) {
    asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void consumers_sync() { asm volatile("bar.sync 1, %0;" ::"n"(NC * 32) : "memory"); }
// the byte slice [lo, hi) of step ph for block b of nb (16-byte units)
__device__ __forceinline__ void slice(const Phase &ph, int b, int nb, uint64_t &lo, uint64_t &hi) {
    const uint64_t per = (ph.nvec + nb - 1) / nb;
    lo = min(ph.nvec, (uint64_t)b * per);
    hi = min(ph.nvec, lo + per);
}
// XMODE: what a step hands the next. 0: one value from one block of the step before (read after the counter);
// 1: a vector of XN values written in shares by the step's working blocks, every block of the next step reads all of it
// after the counter (a GEMV's x); 2: the same vector as 64-bit words {value, epoch} ("LL", as NCCL's low-latency
// protocol): no counter and no fence, the reader polls each word until its epoch is this launch's.
constexpr int XN = 4096;
__device__ __forceinline__ uint64_t ld_volatile_u64(const uint64_t *p) {
    uint64_t v;
    asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}
// DYN: a step's chunks are not a fixed slice a block but taken by the producers in tickets of two (an atomic counter
// a step, cnt[MAXPH + s]), so blocks finish a step together; a producer ends its share of a step with an empty stage
// marked END. Every block of a step then adds one to the step's counter after its END.
constexpr uint32_t END = 0xffffffffu;
__device__ __forceinline__ unsigned long long gtime() {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}
// stamps (PERSIST_STAMPS=1): per block and step, ns: [0] the consumers reach the dependency wait, [1] it is over,
// [2] the step's first stage is full, [3] the step is done (its counter released)
#define STAMP(i)                                                                                                   \
    do {                                                                                                           \
        if (stamps && ct == 0) stamps[((size_t)b * MAXPH + s) * 4 + (i)] = gtime();                               \
    } while (0)
template <int XMODE, int DYN>
__global__ void __launch_bounds__(PT, 1) persist_tma_kernel(const Plan plan, uint32_t *out, unsigned *cnt, int ch_vec,
                                                            int nst, uint32_t *xv, uint64_t *ll, unsigned epoch,
                                                            unsigned long long *stamps) {
    extern __shared__ __align__(1024) unsigned char smem[];
    uint64_t *full = (uint64_t *)smem, *empty = full + nst;
    uint32_t *ids = (uint32_t *)(empty + nst);  // DYN: the chunk in each stage (END: the block's share of a step is done)
    uint4 *ring = (uint4 *)(smem + 1024);
    const int b = blockIdx.x, G = gridDim.x, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    auto nb_of = [&](int s) { return plan.ph[s].blocks ? plan.ph[s].blocks : G; };
    if (threadIdx.x == 0) {
        for (int i = 0; i < nst; i++) {
            fl_mbar_init(full + i, 1);
            fl_mbar_init(empty + i, NC);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    if (warp == 0) {  // producer
        if (lane == 0) {
            unsigned k = 0;
            for (int s = 0; s < plan.n && DYN; s++) {
                const int nb = nb_of(s);
                if (b >= nb) continue;
                const uint32_t nch = (uint32_t)((plan.ph[s].nvec + ch_vec - 1) / ch_vec);
                for (;;) {
                    const uint32_t c0 = atomicAdd(cnt + MAXPH + s, 2u);
                    for (uint32_t c = c0; c < c0 + 2; c++, k++) {
                        const int st = (int)(k % nst);
                        if (k >= (unsigned)nst) fl_mbar_wait(empty + st, ((k / nst) & 1) ^ 1);
                        if (c >= nch) {
                            ids[st] = END;
                            fl_mbar_arrive(full + st);
                            k++;
                            goto next_step;
                        }
                        const uint64_t o = (uint64_t)c * ch_vec;
                        const uint32_t n = (uint32_t)min((uint64_t)ch_vec, plan.ph[s].nvec - o) * 16;
                        ids[st] = c;
                        fl_mbar_expect_tx(full + st, n);
                        fl_bulk_g2s(ring + (size_t)st * ch_vec, plan.ph[s].p + o, n, full + st);
                    }
                }
            next_step:;
            }
            for (int s = 0; s < plan.n && !DYN; s++) {
                const int nb = nb_of(s);
                if (b >= nb) continue;
                uint64_t lo, hi;
                slice(plan.ph[s], b, nb, lo, hi);
                for (uint64_t o = lo; o < hi; o += ch_vec, k++) {
                    const int st = (int)(k % nst);
                    if (k >= (unsigned)nst) fl_mbar_wait(empty + st, ((k / nst) & 1) ^ 1);
                    const uint32_t n = (uint32_t)min((uint64_t)ch_vec, hi - o) * 16;
                    fl_mbar_expect_tx(full + st, n);
                    fl_bulk_g2s(ring + (size_t)st * ch_vec, plan.ph[s].p + o, n, full + st);
                }
            }
        }
        return;
    }
    const int ct = threadIdx.x - 32;
    unsigned k = 0;
    __shared__ uint32_t red[NC];
    for (int s = 0; s < plan.n; s++) {
        const int nb = nb_of(s);
        if (b >= nb) continue;
        uint32_t acc = 0;
        STAMP(0);
        if (s > 0 && XMODE < 2) {
            const unsigned need = (unsigned)nb_of(s - 1);
            if (ct == 0)
                while (ld_acquire(cnt + s - 1) < need) {
                }
            consumers_sync();
            if (XMODE == 0) acc = __ldcg(out + (size_t)(s - 1) * G + b % need);
            else
                for (int i = ct; i < XN / 4; i += NC * 32) {
                    const uint4 v = __ldcg((const uint4 *)(xv + (size_t)(s - 1) * XN) + i);
                    acc ^= v.x ^ v.y ^ v.z ^ v.w;
                }
        } else if (s > 0) {
            const uint64_t *src = ll + (size_t)(s - 1) * XN;
            for (int i = ct; i < XN; i += NC * 32) {
                uint64_t v;
                while (((v = ld_volatile_u64(src + i)) >> 32) != epoch) {
                }
                acc ^= (uint32_t)v;
            }
            consumers_sync();  // the whole x in the block (a GEMV needs all of it)
        }
        STAMP(1);
        bool first = true;
        if (DYN)
            for (;; k++) {
                const int st = (int)(k % nst);
                fl_mbar_wait(full + st, (k / nst) & 1);
                if (first) STAMP(2);
                first = false;
                const uint32_t c = ids[st];
                if (c != END) {
                    const uint64_t o = (uint64_t)c * ch_vec;
                    const int n = (int)min((uint64_t)ch_vec, plan.ph[s].nvec - o);
                    const uint4 *r = ring + (size_t)st * ch_vec;
                    for (int i = ct; i < n; i += NC * 32) acc = fold1(r[i], acc);
                }
                __syncwarp();
                if (lane == 0) fl_mbar_arrive(empty + st);
                if (c == END) {
                    k++;
                    break;
                }
            }
        else {
            uint64_t lo, hi;
            slice(plan.ph[s], b, nb, lo, hi);
            for (uint64_t o = lo; o < hi; o += ch_vec, k++) {
                const int st = (int)(k % nst);
                fl_mbar_wait(full + st, (k / nst) & 1);
                if (first) STAMP(2);
                first = false;
                const int n = (int)min((uint64_t)ch_vec, hi - o);
                const uint4 *r = ring + (size_t)st * ch_vec;
                for (int i = ct; i < n; i += NC * 32) acc = fold1(r[i], acc);
                __syncwarp();
                if (lane == 0) fl_mbar_arrive(empty + st);
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (lane == 0) red[warp - 1] = acc;
        consumers_sync();
        if (XMODE == 0) {
            if (ct == 0) {
                uint32_t t = 0;
                for (int i = 0; i < NC; i++) t += red[i];
                out[(size_t)s * G + b] = t;
                red_release(cnt + s, 1u);
                STAMP(3);
            }
        } else {
            uint32_t t = 0;
            for (int i = 0; i < NC; i++) t += red[i];
            const int lo = (int)((long)b * XN / nb), hi = (int)((long)(b + 1) * XN / nb);
            for (int i = lo + ct; i < hi; i += NC * 32) {
                if (XMODE == 1) xv[(size_t)s * XN + i] = t ^ (uint32_t)i;
                else __stcg(ll + (size_t)s * XN + i, ((uint64_t)epoch << 32) | (t ^ (uint32_t)i));
            }
            if (XMODE == 1) {
                consumers_sync();  // every share written before the release (cumulative through the CTA barrier)
                if (ct == 0) red_release(cnt + s, 1u);
            }
            STAMP(3);
        }
        if (XMODE != 0) consumers_sync();  // red[] is read by all before the next step writes it
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
    const int work = argc > 3 ? atoi(argv[3]) : 0;
    CK(cudaMemcpyToSymbol(c_work, &work, sizeof work));
    printf("steps a layer: %s; work %d (%s)\n", pick, work,
           work == 0 ? "checksum" : work == 1 ? "4-bit dp4a ~0.7 instr a weight" : "4-bit dp4a x2 ~1.4 instr a weight");
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
    uint32_t *xvec = nullptr;
    if (getenv("PERSIST_XMODE") && atoi(getenv("PERSIST_XMODE")) >= 1) CK(cudaMalloc(&xvec, (size_t)nph * 4096 * 4));
    if (xvec) printf("chain hand-off: a 4096-value vector, read whole by every block\n");
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
                const uint32_t *xin = xvec && s ? xvec + (size_t)(s - 1) * 4096 : nullptr;
                uint32_t *xout = xvec ? xvec + (size_t)s * 4096 : nullptr;
                CK(cudaLaunchKernelEx(&cfg, step_kernel, pl.ph[s], s ? (const uint32_t *)(out + (size_t)(s - 1) * Gmax)
                                                                      : (const uint32_t *)nullptr,
                                      pn, out + (size_t)s * Gmax, xin, xout));
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
    // persist-tma: one block an SM, stages of ch bytes x nst in shared memory
    {
        unsigned *cnt;
        uint32_t *xv;
        uint64_t *ll;
        unsigned epoch = 0;
        CK(cudaMalloc(&cnt, (size_t)2 * MAXPH * 4));
        CK(cudaMalloc(&xv, (size_t)nph * XN * 4));
        CK(cudaMalloc(&ll, (size_t)nph * XN * 8));
        CK(cudaMemset(ll, 0, (size_t)nph * XN * 8));
        const int dyn = getenv("PERSIST_DYN") ? atoi(getenv("PERSIST_DYN")) : 0;
        const auto kern = [&](int xm) {
            return dyn ? (xm == 0 ? persist_tma_kernel<0, 1> : xm == 1 ? persist_tma_kernel<1, 1> : persist_tma_kernel<2, 1>)
                       : (xm == 0 ? persist_tma_kernel<0, 0> : xm == 1 ? persist_tma_kernel<1, 0> : persist_tma_kernel<2, 0>);
        };
        for (int xm = 0; xm < 3; xm++)
            CK(cudaFuncSetAttribute(kern(xm), cudaFuncAttributeMaxDynamicSharedMemorySize, 1024 + 200 * 1024));
        printf("persist-tma chunks: %s\n", dyn ? "taken by the producers in tickets of two (PERSIST_DYN=1)"
                                              : "a fixed slice of each step a block");
        const int xmode = getenv("PERSIST_XMODE") ? atoi(getenv("PERSIST_XMODE")) : 0;
        printf("persist-tma hand-off: %s\n", xmode == 0 ? "one value after a counter"
                                             : xmode == 1 ? "a 4096-value vector after a counter"
                                                          : "a 4096-value vector of {value, epoch} words, polled");
        // chunk bytes, stages, blocks an SM (2: half the shared memory each)
        const int cfgs[][3] = {{16384, 12, 1}, {16384, 6, 1}, {8192, 8, 1}, {32768, 6, 1},
                               {16384, 6, 2}, {8192, 12, 2}, {32768, 3, 2}};
        for (const auto &c : cfgs) {
            const int ch_vec = c[0] / 16, nst = c[1], bps = c[2];
            const size_t sm = 1024 + (size_t)c[0] * nst;
            Plan none = plan;  // no bytes: the dependency chain alone
            for (int i = 0; i < none.n; i++) none.ph[i].nvec = 0;
            for (const Plan *pl : {&plan, &gemv_only, &one, &none}) {
                if (pl == &none && (c[0] != 16384 || nst != 6)) continue;
                float us;
                CK(time_us(st, e0, e1, 3, reps, [&] { return cudaMemsetAsync(cnt, 0, (size_t)2 * MAXPH * 4, st); },
                           [&] {
                               epoch++;
                               kern(xmode)<<<n_sm * bps, PT, sm, st>>>(*pl, out, cnt, ch_vec, nst, xv, ll, epoch,
                                                                       nullptr);
                               return cudaGetLastError();
                           },
                           &us));
                char name[64];
                if (pl == &none) {
                    printf("  persist-tma dependencies only: %.2f us a step (%d steps)\n", us / nph, nph);
                    continue;
                }
                snprintf(name, sizeof name, "persist-tma %dK x%d %d/SM%s", c[0] / 1024, nst, bps,
                         pl == &plan ? "" : pl == &one ? " one step" : " GEMVs only");
                report(name, us);
            }
        }
        if (getenv("PERSIST_STAMPS")) {  // one launch of 16 KB x 6, one block an SM, stamped; steps of the third layer
            unsigned long long *d_st;
            const size_t nst_b = (size_t)n_sm * MAXPH * 4;
            CK(cudaMalloc(&d_st, nst_b * 8));
            for (const Plan *pl : {&gemv_only, &plan}) {
                std::vector<unsigned long long> h(nst_b);
                for (int rep = 0; rep < 3; rep++) {  // the last of three
                    CK(cudaMemsetAsync(cnt, 0, (size_t)2 * MAXPH * 4, st));
                    CK(cudaMemsetAsync(d_st, 0, nst_b * 8, st));
                    epoch++;
                    kern(xmode)<<<n_sm, PT, 1024 + 16384 * 6, st>>>(*pl, out, cnt, 1024, 6, xv, ll, epoch, d_st);
                    CK(cudaGetLastError());
                    CK(cudaStreamSynchronize(st));
                }
                CK(cudaMemcpy(h.data(), d_st, nst_b * 8, cudaMemcpyDeviceToHost));
                const int per_l = pl->n / LAYERS;
                printf("stamps (%s, 16K x6 1/SM), layer 3, us from the step before's last release:\n", pl == &plan ? "layer" : "GEMVs only");
                printf("  %-5s %8s %9s %9s %9s %9s %9s  (median over working blocks; ideal = bytes at the copy rate)\n",
                       "step", "blocks", "resume", "1st full", "done med", "done max", "ideal");
                auto at = [&](int blk, int s2, int i) { return h[((size_t)blk * MAXPH + s2) * 4 + i]; };
                for (int s2 = 2 * per_l; s2 < 3 * per_l; s2++) {
                    const int nbs = pl->ph[s2].blocks ? pl->ph[s2].blocks : n_sm;
                    const int nbp = pl->ph[s2 - 1].blocks ? pl->ph[s2 - 1].blocks : n_sm;
                    unsigned long long t0 = 0;
                    for (int blk = 0; blk < nbp; blk++) t0 = std::max(t0, at(blk, s2 - 1, 3));
                    std::vector<float> rs, fs, ds;
                    for (int blk = 0; blk < nbs; blk++) {
                        rs.push_back((float)((long long)(at(blk, s2, 1) - t0)) / 1e3f);
                        fs.push_back((float)((long long)(at(blk, s2, 2) - t0)) / 1e3f);
                        ds.push_back((float)((long long)(at(blk, s2, 3) - t0)) / 1e3f);
                    }
                    const float dmax = *std::max_element(ds.begin(), ds.end());
                    printf("  %-5d %8d %9.2f %9.2f %9.2f %9.2f %9.2f\n", s2, nbs, median(rs), median(fs), median(ds), dmax,
                           pl->ph[s2].nvec * 16.0 / (copy_gbs * 1e9) * 1e6);
                }
            }
            CK(cudaFree(d_st));
        }
        CK(cudaFree(cnt));
        CK(cudaFree(xv));
        CK(cudaFree(ll));
    }
    if (getenv("PERSIST_TMA_ONLY")) return 0;
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
