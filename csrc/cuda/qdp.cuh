// qdp.cuh: the dp2a decode GEMV (qgemv_dp_kernel) and its launchers, for one activation dtype FL_QDP_T (a translation
// unit defines it and includes this: qdp_f16.cu, qdp_bf16.cu). Split out of qmatmul.cu for the build: its template
// instantiations (token rows x configurations x code widths x scale dtypes x x forms) were ~85% of that file's nvcc
// time (~570 s of ~660 s for every .cu on one core of the 2-core CI machine, sm_80), so one file decided the whole
// build's wall time; one file per activation dtype builds side by side. qmatmul.cu prepares x and calls the entry
// points (qcommon.cuh).
#ifndef FL_QDP_T
#error "define FL_QDP_T (__half or __nv_bfloat16) before including qdp.cuh"
#endif
#include <type_traits>

#include "qcommon.cuh"
#include "qx.cuh"
#include "../quant.h"

// ---------------------------------------------------------------------------------------------
// decode GEMV on integer dot products (dp2a): int16 activations, the CPU backend's default numerics
// ---------------------------------------------------------------------------------------------
// Why: at n = 1 the FMA kernel spends ~5 instructions per 4-bit weight and the tensor-core kernel
// ~2 (dequantising into f16 pairs) plus mma.sync work that is 7/8 padding; an H200 streaming 4-bit
// codes at 4.2 TB/s can issue about 4 instructions per weight in all. Integer dot products do not
// dequantise at all: x is quantised once per call (qx_prep_kernel, one thread per 16-byte vector
// of codes' worth of columns) to int16 with one float scale per vector (dx = amax / 32767, error
// below 2^-15 of the vector's largest |x|, the CPU's FASTLOAD_CPU_QDOT=int16), and for each 32-bit
// word of codes the GEMV spends 3 logic ops (split the nibbles) and 4 dp2a.lo/hi (int16 pair x two
// unsigned bytes, int32 accumulate): ~0.25 instructions per weight, 16 dp2a per 16-byte vector.
// Per (row, vector, token): y += s * (dx * dot) + m * sum(x), m = the offset (or -s * 2^(bits-1)),
// sum(x) over the vector's columns in float32 (exact x, not the int16 copy). Vectors lie inside one
// group (group_size % columns-per-vector == 0, checked by the caller).
// Layout of xq (what makes one uint4 of x feed one 32-bit word of codes): 8-bit codes, natural order
// (word k = columns 4k..4k+3 pairs with int16 x[4k..4k+3], two words); 4-bit codes (byte j = columns
// 2j (low nibble), 2j+1), per 8 columns the int16 order 0, 2, 4, 6, 1, 3, 5, 7, so that the low
// nibbles (x & 0x0F0F0F0F: columns 0, 2, 4, 6) meet x words 0, 1 and the high nibbles words 2, 3.
// Act-order perm is folded into the prep (x gathered while it is quantised).
// Work split (launch_qdp_n): a warp owns a group of RPW rows (4 at n <= 2), U = 2 vectors of each per lane,
// codes and scales all loaded before fl_pdl_wait (weights): one memory latency per warp. The first version
// looped over a row in steps of a warp, each step a round trip, with the scales loaded after the codes arrived:
// rows of 112 vectors (int4, 3584 columns) made ~4 round trips per warp, and q|k|v / o_proj ran at 30-33% of the
// copy rate where a plain read of the same bytes reaches 45-52% (a launch that small never reaches the copy
// rate); loading everything at once reaches 48-51% (table at launch_qdp_n). Rows longer than 32 * U vectors are
// split over up to 16 warps of a block, partial sums reduced through shared memory. Earlier: a version with
// 1..8 warps per row group, 2 vectors per lane: gate_up 2.1 TB/s, o/qkv 0.9 TB/s under ncu
// (blocks too short-lived, 25% occupancy at 98 registers). Tried and dropped (H200, 7B-shaped, same run,
// 2026-12-01): each block first asking the copy engine for its rows in L2 (cp.async.bulk.prefetch.L2 of
// its codes and scales, before fl_pdl_wait; the same in qgemv_mma_kernel) made decode slower: int4 b1
// 476 -> 451 tok/s, int8 399 -> 367, int4 b8 285 -> 276 per sequence.
#define QDP_WARPS 4  /* warps per block of the dp2a GEMV for rows of one warp's step */

// d = c + dot(int16 pair a, byte pair of b): .lo takes b's bytes 0-1, .hi bytes 2-3; b unsigned (u32) or signed
// (the _ss forms, for NF4's high table bytes).
#define FL_DP2A(NAME, OP)                                                                  \
    __device__ __forceinline__ int NAME(uint32_t a, uint32_t b, int c) {                 \
        int d;                                                                           \
        asm(OP " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));                   \
        return d;                                                                        \
    }
FL_DP2A(dp2lo, "dp2a.lo.s32.u32")
FL_DP2A(dp2hi, "dp2a.hi.s32.u32")
FL_DP2A(dp2lo_ss, "dp2a.lo.s32.s32")
FL_DP2A(dp2hi_ss, "dp2a.hi.s32.s32")
#undef FL_DP2A

// sum over the 16-byte vector of codes c of q * xq (int32)
template <int BITS>
__device__ __forceinline__ int qdot_vec(const uint4 &c, const uint4 *xv) {
    int d = 0;
    if constexpr (BITS == 4) {
        const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
#pragma unroll
        for (int k = 0; k < 4; k++) {
            const uint32_t lo = cw[k] & 0x0F0F0F0Fu, hi = (cw[k] >> 4) & 0x0F0F0F0Fu;
            d = dp2lo(xv[k].x, lo, d);
            d = dp2hi(xv[k].y, lo, d);
            d = dp2lo(xv[k].z, hi, d);
            d = dp2hi(xv[k].w, hi, d);
        }
    } else {
        d = dp2lo(xv[0].x, c.x, d);
        d = dp2hi(xv[0].y, c.x, d);
        d = dp2lo(xv[0].z, c.y, d);
        d = dp2hi(xv[0].w, c.y, d);
        d = dp2lo(xv[1].x, c.z, d);
        d = dp2hi(xv[1].y, c.z, d);
        d = dp2lo(xv[1].z, c.w, d);
        d = dp2hi(xv[1].w, c.w, d);
    }
    return d;
}

// The same sum against int8 x (FASTLOAD_CUDA_QDOT=int8; qx.cuh's FL_QX8 layout, xv: VC bytes): dp4a of unsigned
// code bytes with signed x bytes. 4-bit: per word of codes one dp4a on the low nibbles (bytes q) and one on the
// high nibbles in place (bytes 16 q, summed apart and divided by 16 exactly at the end), against the x words of
// columns (0, 2, 4, 6) and (1, 3, 5, 7): 8 dp4a and 8 ANDs per vector of 32 codes where qdot_vec takes 16 dp2a
// and 12 logic ops, and half the x bytes. 8-bit: 4 dp4a per vector of 16 codes (8 dp2a). |sum| < 2^20.
__device__ __forceinline__ int dp4us(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
template <int BITS>
__device__ __forceinline__ int qdot_vec8(const uint4 &c, const uint4 *xv) {
    if constexpr (BITS == 4) {
        const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
        const uint32_t xw[8] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w};
        int dl = 0, dh = 0;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            dl = dp4us(cw[k] & 0x0F0F0F0Fu, xw[2 * k], dl);
            dh = dp4us(cw[k] & 0xF0F0F0F0u, xw[2 * k + 1], dh);
        }
        return dl + (dh >> 4);
    } else {
        return dp4us(c.w, xv[0].w, dp4us(c.z, xv[0].z, dp4us(c.y, xv[0].y, dp4us(c.x, xv[0].x, 0))));
    }
}

// NF4 codes on the same integer path: each code is replaced by t16 = rint(nf4 * 32767) (int16, error at most
// 1.44e-5 of the group's scale: below the int16 x's own 2^-16), held as two 16-entry byte tables (low bytes,
// unsigned; high bytes, signed) that byte permutes look up 4 nibbles at a time. dot = 256 * dot(x, hi) +
// dot(x, lo), summed in float (it can pass 2^31), and y += s / 32767 * dx * dot (+ m * sum(x) with offsets).
// 21 logic / permute ops and 8 dp2a per word of 8 codes, against 3 and 4 for integer codes.
#define QNF_LO0 0x74cbe401u
#define QNF_LO1 0x00595a98u
#define QNF_LO2 0x40809930u
#define QNF_LO3 0xff890369u
#define QNF_HI0 0xcdbca680u
#define QNF_HI1 0x00f4e8dbu
#define QNF_HI2 0x2b1f140au
#define QNF_HI3 0x7f5c4838u

// sum over the 16-byte vector of NF4 codes c of t16[q] * xq, as a float
__device__ __forceinline__ float qdot_nf4_vec(const uint4 &c, const uint4 *xv) {
    const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
    int dl = 0, dh = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        uint32_t el, ol, eh, oh;
        qnf_look(cw[k], QNF_LO0, QNF_LO1, QNF_LO2, QNF_LO3, el, ol);
        qnf_look(cw[k], QNF_HI0, QNF_HI1, QNF_HI2, QNF_HI3, eh, oh);
        dl = dp2lo(xv[k].x, el, dl);
        dl = dp2hi(xv[k].y, el, dl);
        dl = dp2lo(xv[k].z, ol, dl);
        dl = dp2hi(xv[k].w, ol, dl);
        dh = dp2lo_ss(xv[k].x, eh, dh);
        dh = dp2hi_ss(xv[k].y, eh, dh);
        dh = dp2lo_ss(xv[k].z, oh, dh);
        dh = dp2hi_ss(xv[k].w, oh, dh);
    }
    return fmaf((float)dh, 256.f, (float)dl);
}

// NF4 against int8 x (qdot_nf4_vec8): the int8 code book QNF8_* (above, with qnf_look_nat), 2 dp4a per word of 8 codes,
// x in natural column order (qx.cuh's FL_QXN, so the looked-up bytes need no even / odd split): 11 ops a word (13 with
// the split, as the first version had) against 29 for the exact int16 table.
__device__ __forceinline__ int dp4ss(uint32_t a, uint32_t b, int c) {
    int d;
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ int qdot_nf4_vec8(const uint4 &c, const uint4 *xv) {
    const uint32_t cw[4] = {c.x, c.y, c.z, c.w};
    const uint32_t xw[8] = {xv[0].x, xv[0].y, xv[0].z, xv[0].w, xv[1].x, xv[1].y, xv[1].z, xv[1].w};
    int d = 0;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        uint32_t a, b;  // columns 8k..8k+3, 8k+4..8k+7
        qnf_look_nat(cw[k], QNF8_0, QNF8_1, QNF8_2, QNF8_3, a, b);
        d = dp4ss(a, xw[2 * k], d);
        d = dp4ss(b, xw[2 * k + 1], d);
    }
    return d;
}

// One lane's work: U vectors of each of RPW rows, codes AND their scales / offsets, all loaded before
// fl_pdl_wait (they are weights), so a warp pays one memory latency before it computes; a row longer than
// 32 * U vectors is split over `split` warps of the block (partial sums through shared memory). LOOP: rows
// longer than MAXW warps' worth loop over steps (each step one latency), the rare case.
// X8: x as int8 (qdot_vec8), else int16.
// MINB > 0: registers capped for MINB blocks of MAXW warps an SM (__launch_bounds__; 0: the compiler's choice).
// MOE: Mixture of Experts decode (fl_cuda_moe_qgemv): W is one expert's view (R its rows) of a stack of experts;
// blockIdx.y is an active expert (mo.offs, from the routing on the device: read after fl_pdl_wait, so this form
// loads nothing before it), whose slots p0.. are its token rows: x row mo.slot_perm[p] / mo.x_div (or p), y row p.
// MOE = 1: at most N slots an expert (the host knows: N >= the tokens), the x rows looked up before the weights are
// requested. MOE = 2: any number, N at a time, the weights kept in registers (LOOP: loaded again a chunk, from L2 at
// these sizes), so an expert's rows are read from memory once however many tokens chose it. (Mode 2 alone for every
// count cost int4 Mixtral at batch 1 a third of its speed: 2282 -> 1574 tok/s, H200.)
template <typename T, typename S, int BITS, bool ZEROS, int N, int RPW, int U, bool NF, int MAXW, bool LOOP, bool X8,
          int MINB = 0, int MOE = 0>
__global__ void __launch_bounds__(MAXW * 32, MINB)
qgemv_dp_kernel(T *__restrict__ y, const int16_t *__restrict__ xq, const float2 *__restrict__ xd, const fl_qw W,
                const T *__restrict__ bias, uint32_t gmagic, int n, int split, QdpMoe mo) {  // n <= N token rows (not MOE)
    constexpr int VC = BITS == 4 ? 32 : 16, XV = X8 ? VC / 16 : VC / 8;  // columns per vector of codes, uint4 of x per vector
    constexpr float HALF = (float)(1 << (BITS - 1));
    __shared__ float red[MAXW][N * RPW];
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gpb = (int)(blockDim.x >> 5) / split, grp = warp / split, part = warp - grp * split;
    const int64_t R = W.R, nv = W.rb / 16, C = W.C, rstride = W.rb / 16, step = (int64_t)split * 32 * U;
    const int64_t r0 = ((int64_t)blockIdx.x * gpb + grp) * RPW;
    const uint4 *wbase = (const uint4 *)W.q;
    const S *sc = (const S *)W.s, *zc = (const S *)W.m;
    int xrow[N], p0 = 0, slots = n;  // token row i's x row (dense: i), y row p0 + i; MOE: the expert's slots
#pragma unroll
    for (int i = 0; i < N; i++) xrow[i] = i;
    auto take = [&](int q0, int m) {  // MOE: the x rows of the expert's m (<= N) slots from slot q0
#pragma unroll
        for (int i = 0; i < N; i++) {
            const int p = q0 + (i < m ? i : 0);
            xrow[i] = mo.slot_perm ? mo.slot_perm[p] / mo.x_div : p;
        }
    };
    if constexpr (MOE != 0) {
        fl_pdl_wait();  // routing and grouping (mo.offs, mo.slot_perm) come from the previous kernels
        if ((int)blockIdx.y >= mo.offs[2 * mo.E + 1]) return;  // fewer experts have slots than the grid allows for
        const int e = mo.offs[mo.E + 1 + blockIdx.y];
        p0 = mo.offs[e];
        slots = mo.offs[e + 1] - p0;
        wbase += (int64_t)e * R * rstride;
        sc += (int64_t)e * R * W.ng;
        if (ZEROS) zc += (int64_t)e * R * W.ng;
        if constexpr (MOE == 1) {
            n = min(slots, N);
            take(p0, n);
        }
    }
    uint4 w[U][RPW];
    float sr[U][RPW], mr[U][RPW];
    auto load = [&](int64_t vb) {  // rows past the end read the last row (results dropped)
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t v = vb + 32 * u;
            const bool on = v < nv;
            const uint32_t g = gmagic == 0u ? (uint32_t)v : __umulhi((uint32_t)v, gmagic);
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const int64_t row = r0 + r < R ? r0 + r : R - 1;
                w[u][r] = on ? fl_ld_stream(wbase + row * rstride + v) : make_uint4(0, 0, 0, 0);
                const int64_t si = row * W.ng + (on ? g : 0);
                sr[u][r] = NF ? ld_s(sc, si) * (X8 ? 1.f / 127.f : 1.f / 32767.f) : ld_s(sc, si);
                mr[u][r] = ZEROS ? ld_s(zc, si) : NF ? 0.f : -sr[u][r] * HALF;
            }
        }
    };
    const int64_t vfirst = (int64_t)part * 32 * U + lane;
    load(vfirst);
    fl_pdl_wait();  // xq / xd come from the prep kernel (or the RMSNorm / SwiGLU that wrote them)
    // n token rows: x rows xrow[i], y rows y0 + i; again: LOOP's registers hold the last step's weights, load the first
    auto rows = [&](int n, int y0, bool again) {
    float acc[N][RPW];
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[i][r] = 0.f;
    for (int64_t vb = vfirst; vb < nv; vb += step) {
        if (LOOP && (vb != vfirst || again)) load(vb);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t v = vb + 32 * u;
            if (v >= nv) break;
#pragma unroll
            for (int i = 0; i < N; i++) {
                if (i >= n) break;
                uint4 xv[XV];
                const uint4 *xp = X8 ? (const uint4 *)((const int8_t *)xq + (int64_t)xrow[i] * C + v * VC)
                                     : (const uint4 *)(xq + (int64_t)xrow[i] * C + v * VC);
#pragma unroll
                for (int h = 0; h < XV; h++) xv[h] = __ldg(xp + h);
                const float2 d = __ldg(xd + (int64_t)xrow[i] * nv + v);
#pragma unroll
                for (int r = 0; r < RPW; r++) {
                    if constexpr (NF) {
                        const float dot = X8 ? (float)qdot_nf4_vec8(w[u][r], xv) : qdot_nf4_vec(w[u][r], xv);
                        acc[i][r] = fmaf(sr[u][r], d.x * dot, ZEROS ? fmaf(mr[u][r], d.y, acc[i][r]) : acc[i][r]);
                    } else {
                        const int dot = X8 ? qdot_vec8<BITS>(w[u][r], xv) : qdot_vec<BITS>(w[u][r], xv);
                        acc[i][r] = fmaf(sr[u][r], d.x * (float)dot, fmaf(mr[u][r], d.y, acc[i][r]));
                    }
                }
            }
        }
        if (!LOOP) break;
    }
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            float t = acc[i][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
            acc[i][r] = t;
        }
    if (split > 1) {
        if (lane == 0)
#pragma unroll
            for (int i = 0; i < N; i++)
#pragma unroll
                for (int r = 0; r < RPW; r++) red[warp][i * RPW + r] = acc[i][r];
        __syncthreads();
        if (part != 0 || lane >= N * RPW) return;
        const int i = lane / RPW, r = lane % RPW;
        float t = 0.f;
        for (int k = 0; k < split; k++) t += red[warp + k][lane];
        const int64_t row = r0 + r;
        if (row < R && i < n) y[(int64_t)(y0 + i) * R + row] = fl_from_f32<T>(t + (bias ? fl_to_f32(bias[row]) : 0.f));
    } else if (lane == 0) {
#pragma unroll
        for (int i = 0; i < N; i++)
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const int64_t row = r0 + r;
                if (row < R && i < n) y[(int64_t)(y0 + i) * R + row] = fl_from_f32<T>(acc[i][r] + (bias ? fl_to_f32(bias[row]) : 0.f));
            }
    }
    };
    if constexpr (MOE != 2) {
        rows(n, p0, false);
    } else {
        for (int c0 = 0; c0 < slots; c0 += N) {
            const int m = min(slots - c0, N);
            take(p0 + c0, m);
            if (c0 > 0 && split > 1) __syncthreads();  // red[] is read by the chunk before
            rows(m, p0 + c0, c0 > 0);
        }
    }
}

// The launch shape: warps a row (split), whether rows loop over steps, row groups a block, blocks.
struct QdpShape {
    int64_t split, gpb, blocks;
    bool loop;
};
template <int RPW, int U, int MAXW>
static QdpShape qdp_shape(const fl_qw &W, int gpb_req) {
    QdpShape h;
    h.split = (W.rb / 16 + 32 * U - 1) / (32 * U);
    h.loop = h.split > MAXW;
    if (h.loop) h.split = MAXW;
    h.gpb = h.split >= QDP_WARPS ? 1 : QDP_WARPS / h.split;  // row groups per block
    if (gpb_req > 0 && gpb_req * h.split <= MAXW) h.gpb = gpb_req;
    h.blocks = ((W.R + RPW - 1) / RPW + h.gpb - 1) / h.gpb;
    return h;
}

// A warp per group of RPW rows, U vectors of each per lane, all loaded at once; a row of more than 32 * U vectors is
// split over up to MAXW warps of a block (one step each), longer rows loop. Short rows: QDP_WARPS row groups per block.
// gpb_req > 0: row groups per block (FASTLOAD_QDP_CFG's /gN, for measurements; at most MAXW warps a block).
template <typename T, typename S, int BITS, bool ZEROS, int N, int RPW, int U, bool NF, int MAXW, bool X8 = false,
          int MINB = 0>
static fl_status launch_qdp_cfg(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                                const T *bias, uint32_t gm, int n, int gpb_req = 0) {
    static_assert(N * RPW <= 32 && MAXW <= 32, "qgemv_dp_kernel: the split reduction takes N * RPW <= 32 lanes");
    const QdpShape h = qdp_shape<RPW, U, MAXW>(W, gpb_req);
    const int64_t split = h.split, blocks = h.blocks;
    const bool loop = h.loop;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "quantised matmul: %lld rows is too many", (long long)W.R);
    const dim3 grid((unsigned)blocks), block((unsigned)(32 * split * h.gpb));
    if (loop)
        FL_LAUNCH((qgemv_dp_kernel<T, S, BITS, ZEROS, N, RPW, U, NF, MAXW, true, X8, MINB>), grid, block, 0, st, y, xq, xd, W, bias,
                  gm, n, (int)split, QdpMoe{});
    else
        FL_LAUNCH((qgemv_dp_kernel<T, S, BITS, ZEROS, N, RPW, U, NF, MAXW, false, X8, MINB>), grid, block, 0, st, y, xq, xd, W, bias,
                  gm, n, (int)split, QdpMoe{});
    return FL_OK;
}

// Auto at 1-2 token rows:
// r4u2 (4 rows x 2 vectors per lane, loaded at once; a row split over up to 16 warps) for rows of at most 1024
// vectors, r8u1w4 (8 rows x 1 vector, a row split over 4 warps that loop) for longer ones (int8 down_proj: 1184).
// H200, one launch in a graph of 10, % of the copy rate (dev/cuda/qgemv_bench.cu, 2026-12-01;
// benchmarks/results/issue9-2026-12-01-qgemv/):
//                              int4 qkv  o     gate_up down   int8 qkv  o     gate_up down  lm_head
//   auto                       50.0      43.3  78.5    62.3   58.6      68.7  101.9   83.7  108.8
//   r4u2 everywhere            50.5      43.6  79.4    62.5   59.0      68.1  102.2   56.8  108.7
//   the first kernel (a trip per step; r4u1 for int4, r8u1 over 4 warps for int8)
//                              32.6      29.8  78.1    61.8   56.0      53.6  95.1    83.8  104.2
//   a plain read of the codes  52.2      43.9  91.7    81.6   66.7      60.3  98.6    92.3  104.6
// On int8 x (X8) at one token row every configuration can be asked for; at two rows only r4u2 / r8u1w4 exist. By
// default 4-bit matrices of 16 MiB of codes or more take r4u4 at one row (4 rows x 4 vectors a lane, 128 registers;
// H200, the GEMV alone on int8 x, us, twenty-first session, benchmarks/results/imma8-index-2026-12-04-h200/call5: int4
// gate|up 18.25 -> 17.75, down 11.40 -> 10.88; on q|k|v and o it is slower, 3.27 -> 3.72 and 3.10 -> 3.31: too few
// warps; at two rows it spills; decode int4 batch 1 610.5 -> 612.2 tok/s, within noise). Registers capped at 64 (8
// blocks of 4 warps an SM instead of 6) spill and were 10-35% slower on every shape (call5, x8-*b2).
// In the decode step, one class changed at a time (twenty-fourth session, benchmarks/results/qdp-sweep-2026-12-04-h200/,
// tok/s, two rounds): the defaults are the fastest. int4 636: down r2u4 626, r2u2 624, r4u2 626; q|k|v / o r2u2 633,
// r4u1 601; gate|up r2u4 627, r4u4 with 8 / 16 row groups a block 631 / 596. int8 447: q|k|v / o r2u2 434, r4u4 447;
// gate|up and LM head r4u4 443. nf4 516: gate|up with 16 row groups a block 465.
template <typename T, typename S, int BITS, bool ZEROS, int N, bool X8>
static fl_status launch_qdp_n(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                              const T *bias, uint32_t gm, int n, QdpPick pk) {
    int cfg = pk.cfg;
    const int g = pk.gpb;
    if constexpr (N <= 2) {
        if (cfg < 0) {
            cfg = W.rb / 16 <= 1024 ? 0 : 4;
            if (N == 1 && X8 && BITS == 4 && W.R * W.rb >= ((int64_t)16 << 20) && W.rb / 16 <= 1024) cfg = 5;
        }
        if constexpr (X8 && N == 2)  // two rows on int8 x: r4u2 or r8u1w4 (r4u4 spills there)
            return cfg == 4 ? launch_qdp_cfg<T, S, BITS, ZEROS, N, 8, 1, false, 4, X8>(st, y, xq, xd, W, bias, gm, n, g)
                            : launch_qdp_cfg<T, S, BITS, ZEROS, N, 4, 2, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        switch (cfg) {
        case 1: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 4, 1, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        case 2: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 8, 1, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        case 3: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 2, 4, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        case 4: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 8, 1, false, 4, X8>(st, y, xq, xd, W, bias, gm, n, g);
        case 5: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 4, 4, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        case 6: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 2, 2, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        default: return launch_qdp_cfg<T, S, BITS, ZEROS, N, 4, 2, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
        }
    }
    return launch_qdp_cfg<T, S, BITS, ZEROS, N, 2, 2, false, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
}

template <typename T, typename S, int BITS, bool ZEROS, bool X8>
static fl_status launch_qdp(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W, const T *bias,
                            uint32_t gm, int n, QdpPick pk) {
    if (n <= 1) return launch_qdp_n<T, S, BITS, ZEROS, 1, X8>(st, y, xq, xd, W, bias, gm, n, pk);
    if (n <= 2) return launch_qdp_n<T, S, BITS, ZEROS, 2, X8>(st, y, xq, xd, W, bias, gm, n, pk);
    if (n <= 4) return launch_qdp_n<T, S, BITS, ZEROS, 4, X8>(st, y, xq, xd, W, bias, gm, n, pk);
    return launch_qdp_n<T, S, BITS, ZEROS, 8, X8>(st, y, xq, xd, W, bias, gm, n, pk);
}

template <typename T, typename S, bool X8>
static fl_status launch_qdp_int(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                                const T *bias, uint32_t gm, int n, QdpPick pk) {
    const bool z = W.m != nullptr;
    if (W.bits == 4)
        return z ? launch_qdp<T, S, 4, true, X8>(st, y, xq, xd, W, bias, gm, n, pk)
                 : launch_qdp<T, S, 4, false, X8>(st, y, xq, xd, W, bias, gm, n, pk);
    return z ? launch_qdp<T, S, 8, true, X8>(st, y, xq, xd, W, bias, gm, n, pk)
             : launch_qdp<T, S, 8, false, X8>(st, y, xq, xd, W, bias, gm, n, pk);
}

// NF4 at one token row on int8 x without offsets (bitsandbytes' form): rows of more than 4096 bytes of codes (over 8192
// columns: down_proj) take r2u4 (2 rows x 4 vectors a lane: twice the warps of r4u4 on a matrix of few rows), other
// matrices of 16 MiB of codes or more r4u4 (4 rows x 4 vectors a lane, 128 registers), smaller ones r2u2 (48
// registers: more warps an SM for the short launches). H200, decode batch 1, Qwen2.5-7B-shaped nf4, twenty-second
// session (benchmarks/results/b1-structure-2026-12-04-h200/call6, call7): r4u2 everywhere (the old default) 480.6 /
// 480.5 and 482.9 / 482.8 tok/s, r4u4 everywhere 488.8 / 488.8 and 490.4 / 490.6, r2u2 everywhere 483.9 / 483.8, r4u4
// from 16 MiB and r2u2 below 498.6 / 498.8 (+3.3%, call7); twenty-third session, r2u4 on down_proj as well: 508.1 ->
// 516.5 tok/s in three rounds each (+1.65%, benchmarks/results/att-fuse-2026-12-04-h200/call3). FASTLOAD_QDP_CFG (cfg)
// forces r4u4 (5), r2u4 (3), r2u2 (6) or r4u2 (0, and every other value); NF4 with offsets and two token rows always
// take r4u2.
template <typename T, typename S, bool X8>
static fl_status launch_qdp_nf4(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                                const T *bias, uint32_t gm, int n, QdpPick pk) {
    const bool z = W.m != nullptr;
    const int g = pk.gpb;
    if constexpr (X8) {
        if (n <= 1 && !z) {
            const int cfg = pk.cfg >= 0 ? pk.cfg : W.rb > 4096 ? 3 : W.R * W.rb >= ((int64_t)16 << 20) ? 5 : 6;
            switch (cfg) {
            case 5: return launch_qdp_cfg<T, S, 4, false, 1, 4, 4, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
            case 3: return launch_qdp_cfg<T, S, 4, false, 1, 2, 4, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
            case 6: return launch_qdp_cfg<T, S, 4, false, 1, 2, 2, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
            default: break;
            }
        }
    }
    if (n <= 1)
        return z ? launch_qdp_cfg<T, S, 4, true, 1, 4, 2, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g)
                 : launch_qdp_cfg<T, S, 4, false, 1, 4, 2, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
    return z ? launch_qdp_cfg<T, S, 4, true, 2, 4, 2, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g)
             : launch_qdp_cfg<T, S, 4, false, 2, 4, 2, true, 16, X8>(st, y, xq, xd, W, bias, gm, n, g);
}

// qb: the x form (qdp_qb)
template <typename T, typename S>
static fl_status launch_qdp_fmt(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                                const T *bias, uint32_t gm, int n, QdpPick pk, int qb) {
    if (W.code == FL_QCODE_NF4)  // n <= 2 only (qdp_at); configurations: launch_qdp_nf4
        return qb & FL_QX8 ? launch_qdp_nf4<T, S, true>(st, y, xq, xd, W, bias, gm, n, pk)
                           : launch_qdp_nf4<T, S, false>(st, y, xq, xd, W, bias, gm, n, pk);
    if (qb & FL_QX8) return launch_qdp_int<T, S, true>(st, y, xq, xd, W, bias, gm, n, pk);
    return launch_qdp_int<T, S, false>(st, y, xq, xd, W, bias, gm, n, pk);
}

// Mixture of Experts decode on the dp2a GEMV (qgemv_dp_kernel's MOE form): one launch for every active expert
// (grid.y), the configurations the dense defaults take for the same shapes, for the layouts quantisation at load
// gives (fp16 scales; int4 with offsets and NF4 without on int8 x, int8 without offsets on int16 x: qdp_moe_ok).
template <typename T, typename S, int BITS, bool ZEROS, int N, int RPW, int U, bool NF, int MAXW, bool X8>
static fl_status launch_qdp_moe_cfg(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                                    uint32_t gm, const QdpMoe &mo, int max_active, int per_expert) {
    static_assert(N * RPW <= 32 && MAXW <= 32, "qgemv_dp_kernel: the split reduction takes N * RPW <= 32 lanes");
    const QdpShape h = qdp_shape<RPW, U, MAXW>(W, 0);
    if (h.blocks > INT32_MAX || max_active > 65535)
        return fl_err(FL_E_VALUE, "moe (quantised experts): %lld rows x %d experts is too many", (long long)W.R, max_active);
    const dim3 grid((unsigned)h.blocks, (unsigned)max_active), block((unsigned)(32 * h.split * h.gpb));
    const T *nob = nullptr;
    auto go = [&](auto LOOPC, auto MODE) -> fl_status {
        FL_LAUNCH((qgemv_dp_kernel<T, S, BITS, ZEROS, N, RPW, U, NF, MAXW, decltype(LOOPC)::value, X8, 0,
                                   decltype(MODE)::value>), grid, block, 0, st, y, xq, xd, W, nob, gm, N, (int)h.split, mo);
        return FL_OK;
    };
    using one = std::integral_constant<int, 1>;
    using chunks = std::integral_constant<int, 2>;
    if (per_expert <= N) return h.loop ? go(std::true_type(), one()) : go(std::false_type(), one());
    if constexpr (N >= 2)  // the configurations taken at more than N slots (launch_qdp_moe)
        return h.loop ? go(std::true_type(), chunks()) : go(std::false_type(), chunks());
    return fl_err(FL_E_INTERNAL, "moe (quantised experts): %d slots an expert for a one-slot configuration", per_expert);
}

// n: the most slots an expert can have (the tokens); rows4: integer codes above 2 take 4 rows a pass (else 2).
template <typename T>
static fl_status launch_qdp_moe(cudaStream_t st, T *y, const int16_t *xq, const float2 *xd, const fl_qw &W, uint32_t gm,
                                int n, const QdpMoe &mo, int max_active, bool rows4) {
    using S = __half;
    const bool big = W.R * W.rb >= ((int64_t)16 << 20), longrow = W.rb / 16 > 1024;
    if (W.code == FL_QCODE_NF4) {
        if (n > 1) return launch_qdp_moe_cfg<T, S, 4, false, 2, 4, 2, true, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        if (W.rb > 4096) return launch_qdp_moe_cfg<T, S, 4, false, 1, 2, 4, true, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        if (big) return launch_qdp_moe_cfg<T, S, 4, false, 1, 4, 4, true, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        return launch_qdp_moe_cfg<T, S, 4, false, 1, 2, 2, true, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
    }
    if (W.bits == 4) {
        if (n > 2 && rows4) return launch_qdp_moe_cfg<T, S, 4, true, 4, 2, 2, false, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        if (n > 1) return launch_qdp_moe_cfg<T, S, 4, true, 2, 4, 2, false, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        if (big && !longrow) return launch_qdp_moe_cfg<T, S, 4, true, 1, 4, 4, false, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
        return launch_qdp_moe_cfg<T, S, 4, true, 1, 4, 2, false, 16, true>(st, y, xq, xd, W, gm, mo, max_active, n);
    }
    if (n > 2 && rows4) return launch_qdp_moe_cfg<T, S, 8, false, 4, 2, 2, false, 16, false>(st, y, xq, xd, W, gm, mo, max_active, n);
    if (n > 1)
        return longrow ? launch_qdp_moe_cfg<T, S, 8, false, 2, 8, 1, false, 4, false>(st, y, xq, xd, W, gm, mo, max_active, n)
                       : launch_qdp_moe_cfg<T, S, 8, false, 2, 4, 2, false, 16, false>(st, y, xq, xd, W, gm, mo, max_active, n);
    return longrow ? launch_qdp_moe_cfg<T, S, 8, false, 1, 8, 1, false, 4, false>(st, y, xq, xd, W, gm, mo, max_active, n)
                   : launch_qdp_moe_cfg<T, S, 8, false, 1, 4, 2, false, 16, false>(st, y, xq, xd, W, gm, mo, max_active, n);
}

fl_status fl_qdp_gemv(cudaStream_t st, FL_QDP_T *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                      const FL_QDP_T *bias, uint32_t gm, int n, QdpPick pk, int qb) {
    return W.s32 ? launch_qdp_fmt<FL_QDP_T, float>(st, y, xq, xd, W, bias, gm, n, pk, qb)
                 : launch_qdp_fmt<FL_QDP_T, __half>(st, y, xq, xd, W, bias, gm, n, pk, qb);
}

fl_status fl_qdp_moe(cudaStream_t st, FL_QDP_T *y, const int16_t *xq, const float2 *xd, const fl_qw &W, uint32_t gm, int n,
                     const QdpMoe &mo, int max_active, bool rows4) {
    return launch_qdp_moe<FL_QDP_T>(st, y, xq, xd, W, gm, n, mo, max_active, rows4);
}
