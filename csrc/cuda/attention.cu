// attention.cu: attention over the KV cache (decode: split-K flash-decoding; prefill:
// flash-attention-2 style tiles; a simple fallback). API and semantics: attention.cuh.
//
// Notation used in the fragment comments: m16n8k16 is mma.sync's tile (A 16x16 row-major,
// B 16x8 column-major, C 16x8 fp32). In a warp, lane = 4*r + q (r = lane/4 "row group",
// q = lane%4); the C fragment of a lane holds C[r][2q..2q+1] and C[r+8][2q..2q+1], the A
// fragment A[r|r+8][2q..2q+1 | 2q+8..2q+9], the B fragment B[2q..2q+1 | 2q+8..2q+9][r]
// (PTX ISA, "Matrix Fragments for mma.m16n8k16").
#include "attention.cuh"
#include "cuda_common.cuh"
#include "qx.cuh"
#include "rope.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdint.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FL_ATT_TC 1 /* tensor-core paths (mma.sync m16n8k16 f16/bf16, cp.async): sm_80 and newer */
#else
#define FL_ATT_TC 0 /* sm_75 (and the host pass): the fast kernels compile to empty bodies */
#endif

namespace {

constexpr int ATT_THREADS = 128;   // 4 warps in every kernel below
constexpr int DEC_TILE = 16;       // decode: keys per warp step (the M of S^T = K Q^T)
constexpr int DEC_HEADS = 8;       // decode: query heads per block (the N of one mma)
constexpr int SPLIT_ALIGN = 64;    // decode: split length granularity, in keys
constexpr int MAX_SPLITS = 128;    // decode: bounds the workspace
constexpr int PF_BM = 64;          // prefill: queries per block (16 per warp)
constexpr int PF_BN = 64;          // prefill: keys per tile
constexpr float LOG2E = 1.4426950408889634f;
static_assert(DEC_TILE == 16 && DEC_HEADS == 8, "the decode fragment layout is one m16n8k16 tile per step");

// Everything a kernel needs, passed by value (one struct so the launches stay readable).
struct AttArgs {
    const void *qkv;         // [B*T, (nh + 2*nkv) * hd]
    void *out;               // [B*T, nh * hd]
    const void *kc, *vc;     // [B, max_len, nkv, hd], or a pool of pages [n_pages << page_shift, nkv, hd]
    const uint8_t *kmask;    // [B, kmask_stride] or NULL
    const int32_t *start_d;  // device start or NULL
    const int32_t *starts_d; // [B] per-row starts or NULL (fl_kv_paging)
    const int32_t *btab;     // [B, btab_stride] page ids or NULL: rectangular cache
    int btab_stride, page_shift;
    float *ws_acc;           // decode partials: [B, nh, split_stride, hd] (unnormalised)
    float *ws_ml;            // decode partials: [B, nh, split_stride, 2] (running max in log2 units, sum)
    int B, T, start, kmask_stride, max_len, nh, nkv, hd, window;
    float scale_log2;        // scale * log2(e): softmax is computed with exp2
    int units, slots, split_stride;  // decode split plan inputs (see split_plan)
    int min_waves;                   // decode: at least this many waves of blocks (tuning)
    int kv_fast;                     // decode: grid x runs over kv heads (default), else over head subgroups
    int16_t *qxq;                    // decode, T == 1: out also written as the quantised GEMV's x (qx.cuh) in form
    float2 *qxd;                     //   qbits (o_proj quantised; 0: not), by whichever combines the splits
    int qbits;
    int *sync;                       // decode: NULL (a combine kernel follows), or the split kernel's grid holds the
                                     //   combine blocks too (decode_split_kernel): [0] ticket, [1 + b*nh + h] splits
                                     //   of head (b, h) done; all zero between launches
    int n_split_blocks, gx, gy;      //   with sync: split blocks (tickets below it) and their grid's x / y extents
    const float *rope_cs;            // decode with the rope fused (decode_split_kernel's ROPE): rope_store's table
    int rope_rd, rope_inter;         //   ([B, hd] cos | sin), rotated dims, interleaved pairs
};

// ---- decode split plan (host and device must agree) --------------------------------------------
// units = blocks per split (B * nkv * head subgroups), slots = resident blocks on the device.
// Split length starts at 512 keys; when that gives under min_waves waves of blocks the splits
// shrink (to 64 keys at least, MAX_SPLITS at most) to fill min_waves waves; when it gives more
// they are resized to a whole number of waves. `cap` grows with L, so a grid sized with
// plan(max_len).cap covers every L <= max_len (CUDA-graph replays with a device start).
struct SplitPlan { int cap, splits, chunk; };
__host__ __device__ inline SplitPlan split_plan(int L, int units, int slots, int min_waves) {
    SplitPlan p = {0, 0, SPLIT_ALIGN};
    if (L <= 0 || units <= 0) return p;
    if (slots < 1) slots = 1;
    const long long base_blocks = (long long)units * ((L + 511) / 512);
    long long waves = base_blocks / slots;
    if (waves < min_waves) waves = min_waves;
    if (waves < 1) waves = 1;
    long long want = waves * slots / units;
    const long long lim = MAX_SPLITS < (L + SPLIT_ALIGN - 1) / SPLIT_ALIGN ? MAX_SPLITS : (L + SPLIT_ALIGN - 1) / SPLIT_ALIGN;
    if (want > lim) want = lim;
    if (want < 1) want = 1;
    p.cap = (int)want;
    int c = (int)((L + want - 1) / want);
    c = (c + SPLIT_ALIGN - 1) / SPLIT_ALIGN * SPLIT_ALIGN;
    p.chunk = c;
    p.splits = (L + c - 1) / c;
    return p;
}

// ---- element types ----------------------------------------------------------------------------
// Conversions and the tensor-core product come from cuda_common.cuh (fl_to_f32, fl_from_f32,
// fl_mma_16816); what is particular here is packing two floats into one 16-bit pair register.
template <typename T> __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    uint32_t r;
    if constexpr (std::is_same<T, __nv_bfloat16>::value) {
        __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
        memcpy(&r, &h, 4);
    } else {
        __half2 h = __floats2half2_rn(lo, hi);
        memcpy(&r, &h, 4);
    }
    return r;
}

// ---- warp-level helpers (sm_80 paths only) ------------------------------------------------------
#if FL_ATT_TC
// Transpose an 8x8 b16 matrix held as a C-style fragment (lane holds row r, cols 2q..2q+1).
__device__ __forceinline__ uint32_t movm_t(uint32_t x) {
    uint32_t y;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
    return y;
}
__device__ __forceinline__ void ldsm_x4(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t &r0, uint32_t &r1, uint32_t &r2, uint32_t &r3, uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3) : "r"(addr) : "memory");
}
__device__ __forceinline__ uint4 ldg16(const void *p) { return __ldg(reinterpret_cast<const uint4 *>(p)); }
#endif

// Row b's first new slot, and where its slot j is in the cache (fl_kv_paging, fl_common.h).
__device__ __forceinline__ int read_start(const AttArgs &a, int b) {
    return a.starts_d ? __ldg(a.starts_d + b) : a.start_d ? __ldg(a.start_d) : a.start;
}
__device__ __forceinline__ size_t kv_slot(const AttArgs &a, int b, int j) {
    if (!a.btab) return (size_t)b * a.max_len + j;
    const int page = __ldg(a.btab + (size_t)b * a.btab_stride + (j >> a.page_shift));
    return ((size_t)page << a.page_shift) | (size_t)(j & ((1 << a.page_shift) - 1));
}

// =================================================================================================
// Decode (T == 1): split-K flash-decoding.
//
// Block (g + nkv*sub, split, b) (or (sub, split, b*nkv + g) with kv_fast = 0): kv head g of row b,
// keys [split*chunk, +chunk) cut to the visible range, query heads g*G + sub*8 .. +8 (G = nh/nkv;
// heads past G are zero padding). Each of the 4 warps takes 16-key tiles round-robin and keeps
// its own online softmax; the block merges the warps in shared memory and writes one partial
// (max, sum, unnormalised acc) per head.
//
// The tile math is transposed so that the small dimension (query heads) is mma's N = 8:
//   S^T[16 keys, 8 heads] = K[16, hd] Q^T[hd, 8]      (A = K straight from global memory)
//   O^T[hd, 8 heads]    += V^T[hd, 16] P^T[16, 8]     (A = V^T, transposed in registers)
// Loads are 16 bytes: lane (r, q) reads K[key r | r+8][32c + 8q .. +8]. The contraction index of
// S^T (the head dim d) is permuted consistently in K and Q, so those 8 elements feed two k-steps
// directly: logical k = 2q+e <-> d = 32c + 8q + e, k = 8+2q+e <-> d = 32c + 8q + 2 + e (first
// step), +4/+6 (second). For V the register pairs are 8x8 fragments M_x[key][n] with
// d = 32c + 8(n/2) + 2x + n%2; movmatrix.trans turns them into A fragments of V^T whose row n
// is that d. P^T comes from S^T's C fragment by one movmatrix per 8 keys.
// =================================================================================================
// ---- combining the splits -----------------------------------------------------------------------
// Head (b, h): out = sum_s e^(m_s - M) acc_s / sum_s e^(m_s - M) l_s, computed by a block of NT threads: the separate
// combine kernel (NT = CMB_THREADS, one block a head) or a combine block of the split kernel's grid (NT = ATT_THREADS,
// with a.sync). The split weights are computed once a block; the sum over splits runs as CMB_SUMS interleaved partial
// sums (split s into sum s % CMB_SUMS, each in increasing s), added in order at the end: independent loads in flight,
// and the same bits for either block size (the fused and unfused decode agree exactly).
// With a.qbits the row is also written as the quantised GEMV's x for o_proj (fl_qx_store8, from the rounded outputs,
// as qx_prep_kernel would read them), which saves that GEMV its prep kernel; needs hd % fl_qx_cols(qbits) == 0 and
// hd <= 256 (the host checks).
constexpr int CMB_THREADS = 512;
constexpr int CMB_SUMS = 4;
static_assert(MAX_SPLITS <= ATT_THREADS && MAX_SPLITS <= CMB_THREADS, "one thread per split for the weights");

__device__ __forceinline__ float block_allreduce(float v, float *s_red, bool is_max) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const float o = __shfl_xor_sync(0xffffffffu, v, off);
        v = is_max ? fmaxf(v, o) : v + o;
    }
    if (lane == 0) s_red[warp] = v;
    __syncthreads();
    v = s_red[0];
    for (int w = 1; w < (int)(blockDim.x >> 5); w++) v = is_max ? fmaxf(v, s_red[w]) : v + s_red[w];
    __syncthreads();  // s_red is reused
    return v;
}

template <int NT, int HD> struct CmbSmem {
    float w[MAX_SPLITS];
    float red[NT / 32];
    float part[CMB_SUMS * HD];
};

// The splits of head bh = b * nh + h (`splits` of them, partials in a.ws_acc / a.ws_ml, read through L2: with a.sync
// other blocks of this grid wrote them). Every thread of the block calls it.
template <typename T, int HD, int NT>
__device__ __forceinline__ void combine_head(const AttArgs &a, int bh, int splits, CmbSmem<NT, HD> &sm) {
    const int tid = threadIdx.x;
    const size_t p0 = (size_t)bh * a.split_stride;
    float m = -INFINITY, l = 0.f;
    if (tid < splits) {
        m = __ldcg(a.ws_ml + 2 * (p0 + tid));
        l = __ldcg(a.ws_ml + 2 * (p0 + tid) + 1);
    }
    const float M = block_allreduce(m, sm.red, true);
    const float w = m != -INFINITY ? exp2f(m - M) : 0.f;  // empty split (acc never written): weight 0
    if (tid < MAX_SPLITS) sm.w[tid] = w;
    const float den = block_allreduce(w * l, sm.red, false);  // its barriers also publish sm.w
    constexpr int TPD = NT / HD < CMB_SUMS ? NT / HD : CMB_SUMS;  // threads on one column
    constexpr int SPT = CMB_SUMS / TPD;                           // partial sums a thread keeps
    static_assert(TPD >= 1 && CMB_SUMS % TPD == 0, "block size and head_dim");
    const int d = tid % HD, t0 = tid / HD;
    if (t0 < TPD) {
        float num[SPT];
#pragma unroll
        for (int j = 0; j < SPT; j++) num[j] = 0.f;
        const float *acc = a.ws_acc + p0 * HD + d;
#pragma unroll 4
        for (int s0 = 0; s0 < splits; s0 += CMB_SUMS) {
#pragma unroll
            for (int j = 0; j < SPT; j++) {
                const int sp = s0 + t0 + j * TPD;
                const float ws = sp < splits ? sm.w[sp] : 0.f;
                const float v = ws != 0.f ? __ldcg(acc + (size_t)sp * HD) : 0.f;  // predicated: no serial branch
                num[j] += ws * v;
            }
        }
#pragma unroll
        for (int j = 0; j < SPT; j++) sm.part[(t0 + j * TPD) * HD + d] = num[j];
    }
    __syncthreads();
    float ovf = 0.f;
    if (tid < HD) {
        float o = 0.f;
#pragma unroll
        for (int g = 0; g < CMB_SUMS; g++) o += sm.part[g * HD + tid];
        // T == 1: output row b, column block h (bh = b * nh + h)
        const T ov = fl_from_f32<T>(den > 0.f ? o / den : 0.f);
        static_cast<T *>(a.out)[(size_t)bh * HD + tid] = ov;
        ovf = fl_to_f32(ov);
    }
    if (a.qbits) {
        __syncthreads();  // every read of sm.part is done
        if (tid < HD) sm.part[tid] = ovf;
        __syncthreads();
        if (tid < 32) {  // lane t: columns 8t..8t+7 of this head (a vector's lanes are one aligned group)
            const bool on = tid < HD / 8;
            float v8[8];
#pragma unroll
            for (int e = 0; e < 8; e++) v8[e] = on ? sm.part[tid * 8 + e] : 0.f;
            fl_qx_dispatch_dev(a.qbits, [&](auto QB) {
                fl_qx_store8<decltype(QB)::value>(a.qxq, a.qxd, v8, on ? (int64_t)bh * HD + tid * 8 : 0,
                                                   (int64_t)a.nh * HD, on);
            });
        }
    }
}

// The splits a decode step of row b has (the split kernel's blocks past them exit at once).
__device__ __forceinline__ int decode_splits(const AttArgs &a, int b) {
    const int L = min(read_start(a, b) + 1, a.max_len);
    return split_plan(L, a.units, a.slots, a.min_waves).splits;
}

// ROPE: rotate one head held as a lane's vectors x[c] = elements 32c + 8q .. +8 (c < NC) exactly as rope_store does
// with its table (tab: cos of the rd/2 frequencies of this row's position, then sin). Rotate-half over the whole
// head pairs element i with i + HD/2: vectors c and c + NC/2 of the same lane. Interleaved pairs (2i, 2i + 1) lie in
// one vector; with rd % 8 == 0 a vector is rotated whole (d < rd) or passed through.
template <typename T, int NC>
__device__ __forceinline__ void rope_frag(uint4 (&x)[NC], const float *__restrict__ tab, int rd, bool inter, int q) {
    if (inter) {
        const int half = rd / 2;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d0 = 32 * c + 8 * q;
            if (d0 >= rd) continue;
            const float4 cs = __ldg(reinterpret_cast<const float4 *>(tab + d0 / 2));
            const float4 sn = __ldg(reinterpret_cast<const float4 *>(tab + half + d0 / 2));
            const float cv[4] = {cs.x, cs.y, cs.z, cs.w}, sv[4] = {sn.x, sn.y, sn.z, sn.w};
            float v[8];
            fl_vec_to_f32<T>(x[c], v);
#pragma unroll
            for (int p = 0; p < 4; p++) {
                const float2 r = fl_rope_rot(v[2 * p], v[2 * p + 1], cv[p], sv[p]);
                v[2 * p] = r.x;
                v[2 * p + 1] = r.y;
            }
            x[c] = fl_f32_to_vec<T>(v);
        }
    } else {  // rd == HD (the host checks)
        constexpr int H = 16 * NC;
#pragma unroll
        for (int c = 0; c < NC / 2; c++) {
            const int i0 = 32 * c + 8 * q;
            float cv[8], sv[8], lo[8], hi[8];
            *reinterpret_cast<float4 *>(cv) = __ldg(reinterpret_cast<const float4 *>(tab + i0));
            *reinterpret_cast<float4 *>(cv + 4) = __ldg(reinterpret_cast<const float4 *>(tab + i0 + 4));
            *reinterpret_cast<float4 *>(sv) = __ldg(reinterpret_cast<const float4 *>(tab + H + i0));
            *reinterpret_cast<float4 *>(sv + 4) = __ldg(reinterpret_cast<const float4 *>(tab + H + i0 + 4));
            fl_vec_to_f32<T>(x[c], lo);
            fl_vec_to_f32<T>(x[c + NC / 2], hi);
#pragma unroll
            for (int e = 0; e < 8; e++) {
                const float2 r = fl_rope_rot(lo[e], hi[e], cv[e], sv[e]);
                lo[e] = r.x;
                hi[e] = r.y;
            }
            x[c] = fl_f32_to_vec<T>(lo);
            x[c + NC / 2] = fl_f32_to_vec<T>(hi);
        }
    }
}

template <int NC> struct DecTile {
    uint4 k0[NC], k1[NC], v0[NC], v1[NC];  // keys r and r+8 of the tile, d = 32c + 8q .. +8
    uint32_t m0, m1;                       // key visible (mask byte, 0 past the range)
};

// ROPE (rope_store fused, a.rope_cs): q|k|v hold this step's q and k unrotated and the cache lacks the new k / v. Each
// block rotates its q heads after loading them, takes the new key (slot `start`, in the last split only) from q|k|v
// instead of the cache, rotated, and the blocks of sub-group 0 store that k and v into the cache slot: every value
// rope_store would have written, bit for bit (fl_rope_rot), one kernel (and its launch gap) fewer a layer.
template <typename T, int HD, bool ROPE>
__global__ void __launch_bounds__(ATT_THREADS, 2) decode_split_kernel(const AttArgs a) {
#if FL_ATT_TC
    constexpr int NC = HD / 32;
    constexpr int NW = ATT_THREADS / 32;
    __shared__ float s_acc[NW][DEC_HEADS][HD + 1];  // +1: conflict-free scatter of C fragments
    __shared__ float s_m[NW][DEC_HEADS], s_l[NW][DEC_HEADS];

    // Once every block has started, the kernel after this one (launched programmatically) may be
    // scheduled; it waits for this grid's completion and memory. This kernel is itself launched
    // programmatically: q|k|v, the cache and start_d come from earlier kernels.
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    // With a.sync the grid is 1-D: n_split_blocks split blocks, then one combine block a head (b, h). Roles go by a
    // ticket taken once running (after fl_pdl_wait: the previous launch on the stream is complete), so every split
    // block is running or done before any block becomes a combine block and waits for them: no deadlock whatever
    // order the blocks are scheduled in. The last ticket resets the counter for the next launch. A combine block
    // waits until its head's splits are all counted, combines them (the separate combine kernel's work, the same
    // bits) and resets the count. This takes the combine kernel, its launch and its dependency wait off the layer.
    int bx = blockIdx.x, by = blockIdx.y, bz = blockIdx.z;
    if (a.sync) {
        __shared__ int s_ticket;
        if (threadIdx.x == 0) {
            const int t = atomicAdd(a.sync, 1);
            if (t == (int)gridDim.x - 1) atomicExch(a.sync, 0);  // every block of this launch has its ticket
            s_ticket = t;
        }
        __syncthreads();
        const int t = s_ticket;
        if (t >= a.n_split_blocks) {
            static_assert(sizeof(CmbSmem<ATT_THREADS, HD>) <= sizeof(float) * NW * DEC_HEADS * (HD + 1), "smem");
            auto &sm = *reinterpret_cast<CmbSmem<ATT_THREADS, HD> *>(&s_acc[0][0][0]);
            const int bh = t - a.n_split_blocks;
            const int splits = decode_splits(a, bh / a.nh);
            int *cnt = a.sync + 1 + bh;
            if (threadIdx.x == 0) {
                // split blocks are running or done, so this ends within microseconds; a count that never comes
                // (a broken invariant) is a device error after a second, not a hang
                const unsigned long long t0 = fl_globaltimer_ns();
                while ((int)fl_ld_acquire_u32(reinterpret_cast<const unsigned *>(cnt)) < splits) {
                    __nanosleep(32);
                    if (fl_globaltimer_ns() - t0 > 1000000000ull) __trap();
                }
            }
            __syncthreads();
            combine_head<T, HD, ATT_THREADS>(a, bh, splits, sm);
            if (threadIdx.x == 0) *cnt = 0;  // every split of this launch is counted: the next launch starts at 0
            return;
        }
        bx = t % a.gx;
        by = t / a.gx % a.gy;
        bz = t / a.gx / a.gy;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, r = lane >> 2, q = lane & 3;
    const int G = a.nh / a.nkv;
    const int sub = a.kv_fast ? bx / a.nkv : bx, split = by;
    const int b = a.kv_fast ? bz : bz / a.nkv, g = a.kv_fast ? bx % a.nkv : bz % a.nkv;
    const int start = read_start(a, b);
    const int L = min(start + 1, a.max_len);  // keys [0, L); query slot i = start
    const SplitPlan plan = split_plan(L, a.units, a.slots, a.min_waves);
    if (split >= plan.splits) return;  // grid sized for max_len; the combine reads plan.splits only
    const int lo = a.window > 0 ? max(0, start - a.window + 1) : 0;
    const int k0 = max(split * plan.chunk, lo), k1 = min(split * plan.chunk + plan.chunk, L);
    const int h0 = g * G + sub * DEC_HEADS;
    const int nreal = min(DEC_HEADS, G - sub * DEC_HEADS);
    const size_t pbase = ((size_t)b * a.nh + h0) * a.split_stride + split;  // + head * split_stride
    // With a.sync: this split's partials of heads h0.. are written; count them (writes fenced before the count)
    auto publish = [&]() {
        if (a.sync) {
            __threadfence();
            __syncthreads();
            if (threadIdx.x < nreal) atomicAdd(a.sync + 1 + (size_t)b * a.nh + h0 + threadIdx.x, 1);
        }
    };
    if (k0 >= k1) {  // split entirely outside the sliding window
        if (threadIdx.x < nreal) {
            const size_t p = pbase + (size_t)threadIdx.x * a.split_stride;
            a.ws_ml[2 * p] = -INFINITY;
            a.ws_ml[2 * p + 1] = 0.f;
        }
        publish();
        return;
    }

    // Q^T as B fragments: lane holds Q[head r][32c + 8q .. +8] (zero for padding heads).
    const T *qkv = static_cast<const T *>(a.qkv);
    uint4 qf[NC];
    if (r < nreal) {
        const T *qp = qkv + (size_t)b * (a.nh + 2 * a.nkv) * HD + (size_t)(h0 + r) * HD + q * 8;
#pragma unroll
        for (int c = 0; c < NC; c++) qf[c] = ldg16(qp + c * 32);
        if constexpr (ROPE) rope_frag<T, NC>(qf, a.rope_cs + (size_t)b * HD, a.rope_rd, a.rope_inter, q);
    } else {
#pragma unroll
        for (int c = 0; c < NC; c++) qf[c] = make_uint4(0, 0, 0, 0);
    }

    const size_t kv_row = (size_t)a.nkv * HD;  // elements between consecutive slots of one kv head
    const T *kb = static_cast<const T *>(a.kc) + (size_t)g * HD + q * 8;  // + kv_slot(b, j) * kv_row
    const T *vb = static_cast<const T *>(a.vc) + (size_t)g * HD + q * 8;
    const uint8_t *km = a.kmask ? a.kmask + (size_t)b * a.kmask_stride : nullptr;
    const int ntiles = (k1 - k0 + DEC_TILE - 1) / DEC_TILE;
    // ROPE: the new key and value in q|k|v (this lane's part of them)
    const T *kn = qkv + (size_t)b * (a.nh + 2 * a.nkv) * HD + (size_t)(a.nh + g) * HD + q * 8;
    const T *vn = kn + (size_t)a.nkv * HD;

    // ROPE, the new key of a tile row: rotate k (from q|k|v), and sub-group 0 stores k and v at cache offset o
    auto new_key = [&](uint4 (&k)[NC], const uint4 (&v)[NC], size_t o) {
        rope_frag<T, NC>(k, a.rope_cs + (size_t)b * HD, a.rope_rd, a.rope_inter, q);
        if (sub == 0) {
#pragma unroll
            for (int c = 0; c < NC; c++) {
                *reinterpret_cast<uint4 *>(const_cast<T *>(kb) + o + c * 32) = k[c];
                *reinterpret_cast<uint4 *>(const_cast<T *>(vb) + o + c * 32) = v[c];
            }
        }
    };
    auto load = [&](DecTile<NC> &t, int tt) {
        const int j0 = k0 + tt * DEC_TILE + r, j1 = j0 + 8;
        const uint4 z = make_uint4(0, 0, 0, 0);
        const bool in0 = j0 < k1, in1 = j1 < k1;  // past k1: zeros (slots >= L may hold anything)
        const size_t o0 = in0 ? kv_slot(a, b, j0) * kv_row : 0, o1 = in1 ? kv_slot(a, b, j1) * kv_row : 0;
        const bool n0 = ROPE && in0 && j0 == start, n1 = ROPE && in1 && j1 == start;
        const T *k0p = n0 ? kn : kb + o0, *v0p = n0 ? vn : vb + o0, *k1p = n1 ? kn : kb + o1, *v1p = n1 ? vn : vb + o1;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            t.k0[c] = in0 ? ldg16(k0p + c * 32) : z;
            t.v0[c] = in0 ? ldg16(v0p + c * 32) : z;
            t.k1[c] = in1 ? ldg16(k1p + c * 32) : z;
            t.v1[c] = in1 ? ldg16(v1p + c * 32) : z;
        }
        t.m0 = in0 ? (km ? (uint32_t)__ldg(km + j0) : 1u) : 0u;
        t.m1 = in1 ? (km ? (uint32_t)__ldg(km + j1) : 1u) : 0u;
        if constexpr (ROPE) {
            if (n0) new_key(t.k0, t.v0, o0);
            if (n1) new_key(t.k1, t.v1, o1);
        }
    };

    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // heads 2q, 2q+1 (log2 units)
    float acc[2 * NC][4];                                       // O^T C fragments
#pragma unroll
    for (int x = 0; x < 2 * NC; x++) acc[x][0] = acc[x][1] = acc[x][2] = acc[x][3] = 0.f;
    const float sl2 = a.scale_log2;

    auto compute = [&](const DecTile<NC> &t) {
        float s[4] = {0.f, 0.f, 0.f, 0.f}, s2[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int c = 0; c < NC; c++) {
            fl_mma_16816<T>(s, t.k0[c].x, t.k1[c].x, t.k0[c].y, t.k1[c].y, qf[c].x, qf[c].y);
            fl_mma_16816<T>(s2, t.k0[c].z, t.k1[c].z, t.k0[c].w, t.k1[c].w, qf[c].z, qf[c].w);
        }
        // s[0..1]: key r, heads 2q, 2q+1; s[2..3]: key r+8
        const float x0 = t.m0 ? (s[0] + s2[0]) * sl2 : -INFINITY, x1 = t.m0 ? (s[1] + s2[1]) * sl2 : -INFINITY;
        const float x2 = t.m1 ? (s[2] + s2[2]) * sl2 : -INFINITY, x3 = t.m1 ? (s[3] + s2[3]) * sl2 : -INFINITY;
        float mx0 = fmaxf(x0, x2), mx1 = fmaxf(x1, x3);
#pragma unroll
        for (int off = 4; off < 32; off <<= 1) {  // over the 8 row groups (keys)
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float u0 = mn0 == -INFINITY ? 0.f : mn0, u1 = mn1 == -INFINITY ? 0.f : mn1;  // no inf - inf
        const float c0 = exp2f(m0 - u0), c1 = exp2f(m1 - u1);
        const float p0 = exp2f(x0 - u0), p1 = exp2f(x1 - u1), p2 = exp2f(x2 - u0), p3 = exp2f(x3 - u1);
        l0 = l0 * c0 + p0 + p2;  // lane-partial sums, reduced once at the end
        l1 = l1 * c1 + p1 + p3;
        m0 = mn0;
        m1 = mn1;
#pragma unroll
        for (int x = 0; x < 2 * NC; x++) {
            acc[x][0] *= c0; acc[x][1] *= c1; acc[x][2] *= c0; acc[x][3] *= c1;
        }
        const uint32_t pb0 = movm_t(pack2<T>(p0, p1)), pb1 = movm_t(pack2<T>(p2, p3));
#pragma unroll
        for (int c = 0; c < NC; c++) {
            fl_mma_16816<T>(acc[2 * c], movm_t(t.v0[c].x), movm_t(t.v0[c].y), movm_t(t.v1[c].x), movm_t(t.v1[c].y),
                        pb0, pb1);
            fl_mma_16816<T>(acc[2 * c + 1], movm_t(t.v0[c].z), movm_t(t.v0[c].w), movm_t(t.v1[c].z),
                        movm_t(t.v1[c].w), pb0, pb1);
        }
    };

    // Double-buffered in registers: tile tt+NW is in flight while tile tt is computed.
    DecTile<NC> ta, tb;
    int tt = warp;
    if (tt < ntiles) load(ta, tt);
    while (tt < ntiles) {
        if (tt + NW < ntiles) load(tb, tt + NW);
        compute(ta);
        tt += NW;
        if (tt >= ntiles) break;
        if (tt + NW < ntiles) load(ta, tt + NW);
        compute(tb);
        tt += NW;
    }

#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    // Scatter the warp's O^T fragments: acc[2c + y] rows r / r+8 are d = 32c + 8(r/2) + 2x + r%2
    // with x = 2y / 2y+1.
#pragma unroll
    for (int c = 0; c < NC; c++) {
#pragma unroll
        for (int y = 0; y < 2; y++) {
            const int da = 32 * c + 8 * (r >> 1) + 2 * (2 * y) + (r & 1), db = da + 2;
            s_acc[warp][2 * q][da] = acc[2 * c + y][0];
            s_acc[warp][2 * q + 1][da] = acc[2 * c + y][1];
            s_acc[warp][2 * q][db] = acc[2 * c + y][2];
            s_acc[warp][2 * q + 1][db] = acc[2 * c + y][3];
        }
    }
    if (r == 0) {
        s_m[warp][2 * q] = m0; s_m[warp][2 * q + 1] = m1;
        s_l[warp][2 * q] = l0; s_l[warp][2 * q + 1] = l1;
    }
    __syncthreads();
    for (int idx = threadIdx.x; idx < nreal * HD; idx += ATT_THREADS) {
        const int h = idx / HD, d = idx % HD;
        float M = -INFINITY;
#pragma unroll
        for (int w = 0; w < NW; w++) M = fmaxf(M, s_m[w][h]);
        float o = 0.f, l = 0.f;
        if (M != -INFINITY) {
#pragma unroll
            for (int w = 0; w < NW; w++) {
                const float e = exp2f(s_m[w][h] - M);
                o += e * s_acc[w][h][d];
                l += e * s_l[w][h];
            }
        }
        const size_t p = pbase + (size_t)h * a.split_stride;
        a.ws_acc[p * HD + d] = o;
        if (d == 0) {
            a.ws_ml[2 * p] = M;
            a.ws_ml[2 * p + 1] = l;
        }
    }
    publish();
#endif
}

// The separate combine (a.sync NULL): one block a head (b, h), launched programmatically after the split kernel.
template <typename T, int HD>
__global__ void __launch_bounds__(CMB_THREADS) decode_combine_kernel(const AttArgs a) {
    __shared__ CmbSmem<CMB_THREADS, HD> sm;
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // programmatic launch: wait for the split kernel
    const int bh = blockIdx.x;
    combine_head<T, HD, CMB_THREADS>(a, bh, decode_splits(a, bh / a.nh), sm);
}

// =================================================================================================
// Prefill (T > 1): flash-attention-2 forward. Block (head, query tile, b): 64 queries (16 per
// warp) against 64-key tiles of K and V, double-buffered in shared memory by cp.async, 16-byte
// chunks XOR-swizzled by row (conflict-free ldmatrix). S = Q K^T and O += P V on mma.sync with
// fp32 accumulators; P goes from S's C fragments to A fragments in registers. Key tiles outside
// [first visible key of the first query, last query] are never loaded (causal + sliding window);
// tiles wholly visible to every query of the block skip the element mask.
// =================================================================================================
template <int HD> __device__ __forceinline__ int swz(int row, int col) {
    return row * HD + ((((col >> 3) ^ (row & 7))) << 3) + (col & 7);
}

static_assert(PF_BM == PF_BN, "Q is staged in the second K buffer");
__host__ __device__ constexpr size_t prefill_smem_bytes(int hd, size_t elt) {
    return (size_t)(4 * PF_BN) * hd * elt + 2 * PF_BN;  // K[2], V[2], mask[2]; Q staged in K[1]
}

// MINB: blocks per SM asked of the register allocator. 2 (the default: no spills, 182 registers
// at hd 128, 8 warps per SM) or 3 (a sandbox variant: 12 warps per SM on sm_90, 168 registers
// with a few spilled; measured 2-15% slower on an H200).
template <typename T, int HD, int MINB>
__global__ void __launch_bounds__(ATT_THREADS, MINB) prefill_kernel(const AttArgs a) {
#if FL_ATT_TC
    extern __shared__ __align__(16) unsigned char smem_raw[];
    T *sK = reinterpret_cast<T *>(smem_raw);
    T *sV = sK + 2 * PF_BN * HD;
    T *sQ = sK + PF_BN * HD;  // K stage 1: free until the first prefetch, after Q is in registers
    uint8_t *sM = reinterpret_cast<uint8_t *>(sV + 2 * PF_BN * HD);
    constexpr int CH = HD / 8;  // 16-byte chunks per row

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, r = lane >> 2, q = lane & 3;
    // Grid (head, query tile, b) with x fastest: the longest (last) query tiles of every head are
    // dispatched first, the short ones fill the tail; neighbouring blocks share a kv head in L2.
    const int qt = gridDim.y - 1 - blockIdx.y;
    const int h = blockIdx.x, b = blockIdx.z, g = h / (a.nh / a.nkv);
    const int Tn = a.T;
    const int start = read_start(a, b);
    const int Lc = min(start + Tn, a.max_len);
    const int t_lo = qt * PF_BM, t_hi = min(t_lo + PF_BM, Tn) - 1;
    const int i_lo = start + t_lo, i_hi = start + t_hi;
    const int jmin = a.window > 0 ? max(0, i_lo - a.window + 1) : 0;
    const int jmax = min(i_hi, Lc - 1);
    const int kt_begin = jmin / PF_BN;
    const int n_kt = jmax >= jmin ? jmax / PF_BN - kt_begin + 1 : 0;
    const size_t qs = (size_t)(a.nh + 2 * a.nkv) * HD;
    const T *qkv = static_cast<const T *>(a.qkv);
    const T *kc = static_cast<const T *>(a.kc), *vc = static_cast<const T *>(a.vc);
    const uint8_t *km = a.kmask ? a.kmask + (size_t)b * a.kmask_stride : nullptr;

    for (int c = tid; c < PF_BM * CH; c += ATT_THREADS) {
        const int row = c / CH, col = (c % CH) * 8, t = t_lo + row;
        const bool ok = t < Tn;
        const T *src = ok ? qkv + (size_t)(b * Tn + t) * qs + (size_t)h * HD + col : qkv;
        cp_async16(smem_addr(sQ + swz<HD>(row, col)), src, ok ? 16 : 0);
    }
    auto load_kv = [&](int kt, int stage) {
        T *dk = sK + stage * PF_BN * HD, *dv = sV + stage * PF_BN * HD;
        for (int c = tid; c < PF_BN * CH; c += ATT_THREADS) {
            const int row = c / CH, col = (c % CH) * 8, j = kt * PF_BN + row;
            const bool ok = j < Lc;
            const size_t off = ok ? (kv_slot(a, b, j) * a.nkv + g) * HD + col : 0;
            cp_async16(smem_addr(dk + swz<HD>(row, col)), kc + off, ok ? 16 : 0);
            cp_async16(smem_addr(dv + swz<HD>(row, col)), vc + off, ok ? 16 : 0);
        }
        if (km && tid < PF_BN) {
            const int j = kt * PF_BN + tid;
            sM[stage * PF_BN + tid] = j < Lc ? km[j] : 0;
        }
    };
    if (n_kt > 0) load_kv(kt_begin, 0);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

    uint32_t qa[HD / 16][4];  // A fragments of the warp's 16 query rows
#pragma unroll
    for (int kk = 0; kk < HD / 16; kk++) {
        const int row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = kk * 16 + (lane >> 4) * 8;
        ldsm_x4(qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], smem_addr(sQ + swz<HD>(row, col)));
    }
    __syncthreads();  // every warp has its Q before the first prefetch overwrites K stage 1

    float o[HD / 8][4];
#pragma unroll
    for (int x = 0; x < HD / 8; x++) o[x][0] = o[x][1] = o[x][2] = o[x][3] = 0.f;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;  // rows r and r+8 of the warp
    const int row0 = t_lo + warp * 16 + r;
    const int i0 = start + row0, i1 = i0 + 8;
    const float sl2 = a.scale_log2;

    for (int it = 0; it < n_kt; it++) {
        const int kt = kt_begin + it, stage = it & 1, kbase = kt * PF_BN;
        if (it + 1 < n_kt) load_kv(kt + 1, stage ^ 1);
        cp_async_commit();
        cp_async_wait<1>();
        __syncthreads();
        const T *tK = sK + stage * PF_BN * HD, *tV = sV + stage * PF_BN * HD;
        const uint8_t *tM = sM + stage * PF_BN;

        float s[PF_BN / 8][4];
#pragma unroll
        for (int x = 0; x < PF_BN / 8; x++) s[x][0] = s[x][1] = s[x][2] = s[x][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < HD / 16; kk++) {
#pragma unroll
            for (int np = 0; np < PF_BN / 16; np++) {
                uint32_t b0, b1, b2, b3;
                const int key = np * 16 + (lane & 7) + (lane >> 4) * 8, col = kk * 16 + ((lane >> 3) & 1) * 8;
                ldsm_x4(b0, b1, b2, b3, smem_addr(tK + swz<HD>(key, col)));
                fl_mma_16816<T>(s[2 * np], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b0, b1);
                fl_mma_16816<T>(s[2 * np + 1], qa[kk][0], qa[kk][1], qa[kk][2], qa[kk][3], b2, b3);
            }
        }
        const bool full = kbase + PF_BN - 1 <= i_lo && (a.window == 0 || i_hi - kbase < a.window) && !km &&
                          kbase + PF_BN <= Lc;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; nt++) {
#pragma unroll
            for (int e = 0; e < 2; e++) {
                float x0 = s[nt][e] * sl2, x1 = s[nt][2 + e] * sl2;
                if (!full) {
                    const int jl = nt * 8 + 2 * q + e, j = kbase + jl;
                    const bool kv = j < Lc && (!km || tM[jl]);
                    if (!(kv && j <= i0 && (a.window == 0 || i0 - j < a.window))) x0 = -INFINITY;
                    if (!(kv && j <= i1 && (a.window == 0 || i1 - j < a.window))) x1 = -INFINITY;
                }
                s[nt][e] = x0;
                s[nt][2 + e] = x1;
                mx0 = fmaxf(mx0, x0);
                mx1 = fmaxf(mx1, x1);
            }
        }
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {  // the 4 lanes of a row
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
        }
        const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        const float u0 = mn0 == -INFINITY ? 0.f : mn0, u1 = mn1 == -INFINITY ? 0.f : mn1;
        const float c0 = exp2f(m0 - u0), c1 = exp2f(m1 - u1);
        m0 = mn0;
        m1 = mn1;
        float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
        for (int nt = 0; nt < PF_BN / 8; nt++) {
            s[nt][0] = exp2f(s[nt][0] - u0); s[nt][1] = exp2f(s[nt][1] - u0);
            s[nt][2] = exp2f(s[nt][2] - u1); s[nt][3] = exp2f(s[nt][3] - u1);
            rs0 += s[nt][0] + s[nt][1];
            rs1 += s[nt][2] + s[nt][3];
        }
        l0 = l0 * c0 + rs0;
        l1 = l1 * c1 + rs1;
#pragma unroll
        for (int x = 0; x < HD / 8; x++) {
            o[x][0] *= c0; o[x][1] *= c0; o[x][2] *= c1; o[x][3] *= c1;
        }
#pragma unroll
        for (int kk = 0; kk < PF_BN / 16; kk++) {  // 16 keys: C fragments of n-tiles 2kk, 2kk+1 = A fragment
            const uint32_t pa0 = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
            const uint32_t pa1 = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
            const uint32_t pa2 = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
            const uint32_t pa3 = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
            for (int dp = 0; dp < HD / 16; dp++) {
                uint32_t b0, b1, b2, b3;
                const int key = kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, col = dp * 16 + (lane >> 4) * 8;
                ldsm_x4_t(b0, b1, b2, b3, smem_addr(tV + swz<HD>(key, col)));
                fl_mma_16816<T>(o[2 * dp], pa0, pa1, pa2, pa3, b0, b1);
                fl_mma_16816<T>(o[2 * dp + 1], pa0, pa1, pa2, pa3, b2, b3);
            }
        }
        __syncthreads();  // this stage is overwritten by the next iteration's prefetch
    }
    cp_async_wait<0>();

#pragma unroll
    for (int off = 1; off < 4; off <<= 1) {
        l0 += __shfl_xor_sync(0xffffffffu, l0, off);
        l1 += __shfl_xor_sync(0xffffffffu, l1, off);
    }
    const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;  // no visible key: zeros
    T *out = static_cast<T *>(a.out);
    if (row0 < Tn) {
        T *orow = out + ((size_t)(b * Tn + row0) * a.nh + h) * HD;
#pragma unroll
        for (int x = 0; x < HD / 8; x++)
            *reinterpret_cast<uint32_t *>(orow + x * 8 + 2 * q) = pack2<T>(o[x][0] * inv0, o[x][1] * inv0);
    }
    if (row0 + 8 < Tn) {
        T *orow = out + ((size_t)(b * Tn + row0 + 8) * a.nh + h) * HD;
#pragma unroll
        for (int x = 0; x < HD / 8; x++)
            *reinterpret_cast<uint32_t *>(orow + x * 8 + 2 * q) = pack2<T>(o[x][2] * inv1, o[x][3] * inv1);
    }
#endif
}

// =================================================================================================
// Fallback: one warp per (b, t, h), keys one at a time, fp32 online softmax. Any dtype, any arch,
// head_dim <= 256 (lane holds d = lane + 32k).
// =================================================================================================
constexpr int SIMPLE_MAXK = 8;
template <typename T>
__global__ void __launch_bounds__(ATT_THREADS) simple_kernel(const AttArgs a) {
    const int lane = threadIdx.x & 31;
    const long long w = (long long)blockIdx.x * (ATT_THREADS / 32) + (threadIdx.x >> 5);
    if (w >= (long long)a.B * a.T * a.nh) return;
    const int h = (int)(w % a.nh), bt = (int)(w / a.nh), b = bt / a.T, t = bt % a.T;
    const int hd = a.hd, g = h / (a.nh / a.nkv);
    const int start = read_start(a, b);
    const int i = start + t;
    const int jend = min(i, a.max_len - 1);
    const int lo = a.window > 0 ? max(0, i - a.window + 1) : 0;
    const T *qp = static_cast<const T *>(a.qkv) + (size_t)bt * (a.nh + 2 * a.nkv) * hd + (size_t)h * hd;
    const T *kb = static_cast<const T *>(a.kc) + (size_t)g * hd, *vb = static_cast<const T *>(a.vc) + (size_t)g * hd;
    const uint8_t *km = a.kmask ? a.kmask + (size_t)b * a.kmask_stride : nullptr;
    const size_t kv_row = (size_t)a.nkv * hd;
    float qv[SIMPLE_MAXK], acc[SIMPLE_MAXK];
#pragma unroll
    for (int k = 0; k < SIMPLE_MAXK; k++) {
        const int d = lane + 32 * k;
        qv[k] = d < hd ? fl_to_f32(qp[d]) * a.scale_log2 : 0.f;
        acc[k] = 0.f;
    }
    float m = -INFINITY, l = 0.f;
    for (int j = lo; j <= jend; j++) {
        if (km && !km[j]) continue;
        const size_t o = kv_slot(a, b, j) * kv_row;
        const T *kr = kb + o, *vr = vb + o;
        float s = 0.f;
#pragma unroll
        for (int k = 0; k < SIMPLE_MAXK; k++) {
            const int d = lane + 32 * k;
            if (d < hd) s += qv[k] * fl_to_f32(kr[d]);
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const float mn = fmaxf(m, s), c = exp2f(m - mn), p = exp2f(s - mn);
        l = l * c + p;
        m = mn;
#pragma unroll
        for (int k = 0; k < SIMPLE_MAXK; k++) {
            const int d = lane + 32 * k;
            if (d < hd) acc[k] = acc[k] * c + p * fl_to_f32(vr[d]);
        }
    }
    T *op = static_cast<T *>(a.out) + (size_t)bt * a.nh * hd + (size_t)h * hd;
    const float inv = l > 0.f ? 1.f / l : 0.f;
#pragma unroll
    for (int k = 0; k < SIMPLE_MAXK; k++) {
        const int d = lane + 32 * k;
        if (d < hd) op[d] = fl_from_f32<T>(acc[k] * inv);
    }
}

// ---- host side --------------------------------------------------------------------------------
// The dtype dispatch (STYLE.md habit 4): binds `scalar_t` to the element type of `act`.
#define FL_ATT_DISPATCH_HALF(act, ...)                                                  \
    switch (act) {                                                                      \
    case FL_F16: { using scalar_t = __half; __VA_ARGS__; } break;                       \
    case FL_BF16: { using scalar_t = __nv_bfloat16; __VA_ARGS__; } break;               \
    default: return fl_err(FL_E_INTERNAL, "attention: unexpected dtype %d", (int)act);  \
    }

static bool aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

template <typename T, int HD, bool ROPE>
static fl_status launch_decode(cudaStream_t st, AttArgs a, int n_sub, void *ws, size_t ws_bytes, int sms) {
    // Resident blocks per SM, queried once per instantiation (only steers the split count).
    static const int occ = [] {
        int n = 0;
        if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, decode_split_kernel<T, HD, ROPE>, ATT_THREADS, 0) !=
            cudaSuccess) {
            cudaGetLastError();
            n = 2;
        }
        return n > 0 ? n : 1;
    }();
    a.units = a.B * a.nkv * n_sub;
    a.slots = sms * occ;
    // Graph-replayable launches size the grid for the longest cache; the kernels read the real
    // start and let splits past plan(L).splits exit.
    a.split_stride = a.start_d || a.starts_d ? split_plan(a.max_len, a.units, a.slots, a.min_waves).cap
                               : split_plan(a.start + 1, a.units, a.slots, a.min_waves).splits;
    const size_t n_part = (size_t)a.B * a.nh * a.split_stride;
    const size_t need = n_part * (size_t)(HD + 2) * sizeof(float);
    if (!ws || !aligned16(ws) || ws_bytes < need)
        return fl_err(FL_E_VALUE, "attention: decode workspace of %zu bytes at %p is too small or misaligned "
                      "(need %zu, 16-byte aligned; see fl_cuda_attention_workspace)", ws_bytes, ws, need);
    a.ws_acc = static_cast<float *>(ws);
    a.ws_ml = a.ws_acc + n_part * HD;
    const dim3 grid = a.kv_fast ? dim3(a.nkv * n_sub, a.split_stride, a.B) : dim3(n_sub, a.split_stride, a.B * a.nkv);
    const long long n_split = (long long)grid.x * grid.y * grid.z, n_all = n_split + (long long)a.B * a.nh;
    // Launches are programmatic where the device allows (fl_launch): the split kernel's launch hides under the
    // previous kernel's tail, the combine's under the split kernel's.
    if (a.sync && n_all <= 0x7fffffffLL) {  // one grid: split blocks, then combine blocks (decode_split_kernel)
        a.n_split_blocks = (int)n_split;
        a.gx = (int)grid.x;
        a.gy = (int)grid.y;
        FL_CUDA_CHECK(fl_launch(decode_split_kernel<T, HD, ROPE>, dim3((unsigned)n_all), dim3(ATT_THREADS), 0, st, a));
        return FL_OK;
    }
    a.sync = nullptr;
    FL_CUDA_CHECK(fl_launch(decode_split_kernel<T, HD, ROPE>, grid, dim3(ATT_THREADS), 0, st, a));
    FL_CUDA_CHECK(fl_launch(decode_combine_kernel<T, HD>, dim3(a.B * a.nh), dim3(CMB_THREADS), 0, st, a));
    return FL_OK;
}

template <typename T, int HD>
static fl_status launch_prefill(cudaStream_t st, const AttArgs &a, bool alt) {
    const size_t smem = prefill_smem_bytes(HD, sizeof(T));
    auto kernel = alt ? prefill_kernel<T, HD, 3> : prefill_kernel<T, HD, 2>;
    FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    kernel<<<dim3(a.nh, (a.T + PF_BM - 1) / PF_BM, a.B), ATT_THREADS, smem, st>>>(a);
    return FL_OK;
}

}  // namespace

extern "C" size_t fl_cuda_attention_workspace(int B, int n_heads, int head_dim, int max_len) {
    if (B <= 0 || n_heads <= 0 || head_dim <= 0 || max_len <= 0) return 0;
    const int by_len = (max_len + SPLIT_ALIGN - 1) / SPLIT_ALIGN;
    const size_t cap = (size_t)(by_len < MAX_SPLITS ? by_len : MAX_SPLITS);
    return (size_t)B * (size_t)n_heads * cap * ((size_t)head_dim + 2) * sizeof(float);
}

// qd: where the decode path also writes out as the dp2a GEMV's x (NULL or bits 0: nowhere); its bits are set to 0
// when the path taken does not (prefill, the fallback kernel, a head_dim the combine kernel cannot group).
static fl_status attention_impl(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T, int start,
                                const int32_t *start_d, const uint8_t *kmask, int kmask_stride, const void *kcache,
                                const void *vcache, int max_len, int n_heads, int n_kv_heads, int head_dim, int window,
                                float scale, void *workspace, size_t workspace_bytes, int path, const fl_kv_paging *pg,
                                fl_qx_dst *qd, const fl_att_rope *rope, int *sync, size_t sync_bytes) {
    const int qbits = qd ? qd->bits : 0;
    if (qd) qd->bits = 0;
    if (act != FL_F16 && act != FL_BF16 && act != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "attention: activation dtype %d is not supported (f16, bf16, f32)", (int)act);
    if (!out || !qkv || !kcache || !vcache) return fl_err(FL_E_VALUE, "attention: NULL tensor pointer");
    if (B < 1 || T < 1 || max_len < 1 || n_heads < 1 || n_kv_heads < 1 || head_dim < 1 || window < 0)
        return fl_err(FL_E_VALUE, "attention: bad sizes B=%d T=%d max_len=%d heads=%d/%d head_dim=%d window=%d", B,
                      T, max_len, n_heads, n_kv_heads, head_dim, window);
    if (n_heads % n_kv_heads)
        return fl_err(FL_E_VALUE, "attention: %d query heads are not a multiple of %d kv heads", n_heads, n_kv_heads);
    if ((long long)B * T * n_heads > 0x7fffffffLL || (long long)B * max_len > 0x7fffffffLL)
        return fl_err(FL_E_VALUE, "attention: B*T*heads or B*max_len overflows int");
    const fl_kv_paging pz = {};
    if (!pg) pg = &pz;
    if (pg->btab_d && (pg->page_shift < 0 || pg->page_shift > 20 || pg->btab_stride < 1 ||
                       (long long)pg->btab_stride << pg->page_shift < max_len))
        return fl_err(FL_E_VALUE, "attention: block table of %d pages of 2^%d slots for max_len %d", pg->btab_stride,
                      pg->page_shift, max_len);
    if (!start_d && !pg->starts_d) {  // with a device start these are the caller's contract (graph replays)
        if (start < 0 || start + T > max_len)
            return fl_err(FL_E_VALUE, "attention: slots %d..%d do not fit a cache of %d", start, start + T - 1,
                          max_len);
        if (kmask && kmask_stride < start + T)
            return fl_err(FL_E_VALUE, "attention: key mask stride %d < %d", kmask_stride, start + T);
    }
    if (kmask && kmask_stride < 1) return fl_err(FL_E_VALUE, "attention: key mask stride %d", kmask_stride);

    int dev = 0, major = 0, sms = 1, smem_optin = 0;
    FL_CUDA_CHECK(cudaGetDevice(&dev));
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));

    AttArgs a = {};
    a.qkv = qkv; a.out = out; a.kc = kcache; a.vc = vcache; a.kmask = kmask; a.start_d = start_d;
    a.starts_d = pg->starts_d; a.btab = pg->btab_d; a.btab_stride = pg->btab_stride; a.page_shift = pg->page_shift;
    a.B = B; a.T = T; a.start = start; a.kmask_stride = kmask_stride; a.max_len = max_len;
    a.nh = n_heads; a.nkv = n_kv_heads; a.hd = head_dim; a.window = window;
    a.scale_log2 = scale * LOG2E;

    const int G = n_heads / n_kv_heads, n_sub = (G + DEC_HEADS - 1) / DEC_HEADS;
    const bool fast_ok = act != FL_F32 && (head_dim == 64 || head_dim == 128) && major >= 8 && aligned16(out) &&
                         aligned16(qkv) && aligned16(kcache) && aligned16(vcache) &&
                         (T > 1 ? (size_t)smem_optin >= prefill_smem_bytes(head_dim, 2) &&
                                      B <= 65535 && (T + PF_BM - 1) / PF_BM <= 65535
                                : (long long)B * n_kv_heads <= 65535);  // grid y/z limits
    // Sandbox variants (attention.cuh): bit 0 prefill with 3 blocks/SM; bit 1 decode grid over head
    // subgroups first (kv heads first is the default: 1-2% faster at B=8, 32k on an H200); bits 2-3
    // decode min_waves 2 / 4 (slower: up to 35% at B=1). Measurements: dev/cuda/README.md.
    const int variant = path >= FL_ATT_VARIANT0 ? path - FL_ATT_VARIANT0 : 0;
    a.kv_fast = !((variant >> 1) & 1);
    a.min_waves = (variant & 8) ? 4 : (variant & 4) ? 2 : 1;
    if (path >= FL_ATT_VARIANT0) path = FL_ATT_FAST;
    if (path == FL_ATT_FAST && !fast_ok)
        return fl_err(FL_E_UNSUPPORTED, "attention: no fast path for dtype %d head_dim %d on sm_%d", (int)act,
                      head_dim, major * 10);
    fl_status s = FL_OK;
    if (rope) {  // rotated here, in the decode kernel where it can (see fl_att_rope), else by rope_store first
        const int rd = fl_rope_dims(rope->style, head_dim), inter = rope->style && rope->style->interleaved;
        if (!rope->table) return fl_err(FL_E_VALUE, "attention: rope without its cos / sin table");
        if (fast_ok && path != FL_ATT_SIMPLE && T == 1 && rd % 8 == 0 && rd > 0 && rd <= head_dim &&
            (inter || rd == head_dim)) {
            a.rope_cs = rope->table;
            a.rope_rd = rd;
            a.rope_inter = inter;
        } else {
            FL_TRY(fl_cuda_rope_store(st, act, const_cast<void *>(qkv), B, T, start, start_d, NULL, NULL,
                                      const_cast<void *>(kcache), const_cast<void *>(vcache), max_len, n_heads,
                                      n_kv_heads, head_dim, const_cast<float *>(rope->table), FL_ROPE_TABLE_READ, pg,
                                      NULL, 0.f, rope->style, NULL));
        }
    }
    if (fast_ok && path != FL_ATT_SIMPLE) {
        if (T == 1) {
            if (((qbits & 15) == 4 || (qbits & 15) == 8) && head_dim % fl_qx_cols(qbits) == 0 && head_dim <= 256) {
                a.qbits = qbits;
                a.qxq = qd->xq;
                a.qxd = qd->xd;
            }
            if (sync) {  // the combine in the split kernel's grid: a ticket and a count a head, all zero (see AttArgs)
                if (sync_bytes < (1 + (size_t)B * n_heads) * sizeof(int))
                    return fl_err(FL_E_VALUE, "attention: %zu bytes of decode counters for %d x %d heads", sync_bytes,
                                  B, n_heads);
                a.sync = sync;
            }
            if (a.rope_cs) {  // (the dispatch macro is a block: braces keep the else attached)
                FL_ATT_DISPATCH_HALF(act, s = head_dim == 64
                                                  ? launch_decode<scalar_t, 64, true>(st, a, n_sub, workspace, workspace_bytes, sms)
                                                  : launch_decode<scalar_t, 128, true>(st, a, n_sub, workspace, workspace_bytes, sms));
            } else {
                FL_ATT_DISPATCH_HALF(act, s = head_dim == 64
                                                  ? launch_decode<scalar_t, 64, false>(st, a, n_sub, workspace, workspace_bytes, sms)
                                                  : launch_decode<scalar_t, 128, false>(st, a, n_sub, workspace, workspace_bytes, sms));
            }
        } else {
            const bool alt = variant & 1;
            FL_ATT_DISPATCH_HALF(act, s = head_dim == 64 ? launch_prefill<scalar_t, 64>(st, a, alt)
                                                         : launch_prefill<scalar_t, 128>(st, a, alt));
        }
    } else {
        if (head_dim > 32 * SIMPLE_MAXK)
            return fl_err(FL_E_UNSUPPORTED, "attention: head_dim %d > %d on the fallback path", head_dim,
                          32 * SIMPLE_MAXK);
        const long long rows = (long long)B * T * n_heads;
        const unsigned blocks = (unsigned)((rows + ATT_THREADS / 32 - 1) / (ATT_THREADS / 32));
        if (act == FL_F32) simple_kernel<float><<<blocks, ATT_THREADS, 0, st>>>(a);
        else FL_ATT_DISPATCH_HALF(act, simple_kernel<scalar_t><<<blocks, ATT_THREADS, 0, st>>>(a));
    }
    if (s != FL_OK) return s;
    FL_CUDA_CHECK_LAUNCH();
    if (qd && a.qbits) qd->bits = a.qbits;
    return FL_OK;
}

extern "C" fl_status fl_cuda_attention_ex(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T,
                                          int start, const int32_t *start_d, const uint8_t *kmask, int kmask_stride,
                                          const void *kcache, const void *vcache, int max_len, int n_heads,
                                          int n_kv_heads, int head_dim, int window, float scale, void *workspace,
                                          size_t workspace_bytes, int path, const fl_kv_paging *pg) {
    return attention_impl(st, act, out, qkv, B, T, start, start_d, kmask, kmask_stride, kcache, vcache, max_len,
                          n_heads, n_kv_heads, head_dim, window, scale, workspace, workspace_bytes, path, pg, NULL, NULL,
                          NULL, 0);
}

extern "C" fl_status fl_cuda_attention(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T,
                                       int start, const int32_t *start_d, const uint8_t *kmask, int kmask_stride,
                                       const void *kcache, const void *vcache, int max_len, int n_heads,
                                       int n_kv_heads, int head_dim, int window, float scale, void *workspace,
                                       size_t workspace_bytes, const fl_kv_paging *pg) {
    return attention_impl(st, act, out, qkv, B, T, start, start_d, kmask, kmask_stride, kcache, vcache, max_len,
                          n_heads, n_kv_heads, head_dim, window, scale, workspace, workspace_bytes, FL_ATT_AUTO, pg, NULL,
                          NULL, NULL, 0);
}

fl_status fl_cuda_attention_qx(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T, int start,
                               const int32_t *start_d, const uint8_t *kmask, int kmask_stride, const void *kcache,
                               const void *vcache, int max_len, int n_heads, int n_kv_heads, int head_dim, int window,
                               float scale, void *workspace, size_t workspace_bytes, const fl_kv_paging *pg,
                               fl_qx_dst *qd, const fl_att_rope *rope, int *sync, size_t sync_bytes) {
    return attention_impl(st, act, out, qkv, B, T, start, start_d, kmask, kmask_stride, kcache, vcache, max_len,
                          n_heads, n_kv_heads, head_dim, window, scale, workspace, workspace_bytes, FL_ATT_AUTO, pg, qd,
                          rope, sync, sync_bytes);
}
