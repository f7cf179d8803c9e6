// qx.cuh: x for the quantised decode GEMVs (qmatmul.cu's qgemv_dp_kernel; FL_QMX: qgemv_imma8_kernel), written by one
// device function so
// that the GEMV's own prep kernel and the ops that produce x (RMSNorm, SwiGLU: norm.cu) give the same
// bits. One thread holds 8 consecutive columns of one token row (columns c0..c0+7, c0 % 8 == 0);
// a vector of VC columns (32 for 4-bit codes, 16 for 8-bit) is G = VC / 8 consecutive lanes,
// G-aligned. Per vector: amax = max |x| and sum = sum x (float32: each lane's 8 values in order, then
// the xor-shuffle tree over the G lanes), dx = amax / 32767, q = clamp(rint(x * 32767 / amax)).
// Stored: xq[i * C + c] int16 in the codes' column order (8-bit: natural; 4-bit: per 8 columns the
// order 0, 2, 4, 6, 1, 3, 5, 7, so one uint4 of xq meets one 32-bit word of nibbles), and
// xd[i * (C / VC) + v] = (dx, sum). Every lane of the warp must call it (inactive lanes with on =
// false and zeros), as the shuffles span the warp's G-lane groups.
// QB = bits | FL_QX8 (the int8 form, FASTLOAD_CUDA_QDOT=int8, llama.cpp's activations): amax is taken over
// blocks of 32 columns whatever the bits (4 aligned lanes; C % 32 == 0), dx = amax / 127,
// q = rint(x * 127 / amax) (the CPU backend's FASTLOAD_CPU_QDOT=int8 rule), stored as bytes at byte offset
// i * C + c in the same column order (4 | FL_QX8 | FL_QXN: natural order, for NF4 codes); xd per vector as above (sum
// over the vector's own columns).
// QB = bits | FL_QMX (x for the integer tensor-core GEMV at 3..8 token rows, qmatmul.cu's qgemv_imma8_kernel): per
// token and chunk of CPC columns (128 for 4-bit codes, 64 for 8-bit: G = CPC / 8 lanes; C % CPC == 0), amax and sum as
// above, dx = amax / 32639, q = clamp(rint(x * 32639 / amax), +-32639) split into two signed bytes q = 256 h + l
// (h = (q + 128) >> 8), one uint4 per 8 columns at uint4 index (i * C + c) / 8: {h of 0,2,4,6 | h of 1,3,5,7 | l of
// 0,2,4,6 | l of 1,3,5,7} for 4-bit codes, {h 0-3 | h 4-7 | l 0-3 | l 4-7} for 8-bit; xd[chunk * 8 + i] = (dx, sum)
// (tokens i < FL_GEMV_MAX_N_Q = 8). The GEMV's own prep (qx_prep_kernel) and the producers write it through here too.
#ifndef FL_CUDA_QX_CUH
#define FL_CUDA_QX_CUH
#include <stdint.h>
#include <type_traits>
#include <cuda_runtime.h>
#include "fl_common.h"

#define FL_QX8 16  // QB flag: x as int8 (above); QB & 15 is the codes' bits
#define FL_QMX 32  // QB flag: x as the integer tensor-core GEMV's two int8 planes (above)
#define FL_QXN 64  // QB flag with 4 | FL_QX8: the int8 bytes in natural column order (NF4's code-book lookups give them so)
#define FL_QMX_QMAX 32639.f  // |q| <= 32639: h = (q + 128) >> 8 and l = q - 256 h are both signed bytes

// Columns in a 64-byte chunk of codes, the tensor-core GEMVs' unit (and FL_QMX's x scale block): 512 / bits.
__host__ __device__ constexpr int fl_qchunk_cols(int bits) { return bits == 4 ? 128 : 64; }

// k0 = i * C + c0: the flat index of the thread's first column (C % VC == 0, so k0 / VC is the vector); C, the row's
// columns, is read by the FL_QMX form only.
template <int QB>
__device__ __forceinline__ void fl_qx_store8(int16_t *__restrict__ xq, float2 *__restrict__ xd, const float (&a)[8],
                                             int64_t k0, int64_t C, bool on) {
    constexpr int BITS = QB & 15;
    constexpr bool X8 = (QB & FL_QX8) != 0, MX = (QB & FL_QMX) != 0, NAT = (QB & FL_QXN) != 0;
    static_assert(!(X8 && MX) && (!NAT || (X8 && BITS == 4)), "one x form");
    // lanes of a vector (MX: of a chunk); lanes of an amax block
    constexpr int G = MX ? fl_qchunk_cols(BITS) / 8 : (BITS == 4 ? 32 : 16) / 8, GA = X8 ? 4 : G;
    float amax = 0.f, sum = 0.f;
#pragma unroll
    for (int e = 0; e < 8; e++) {
        amax = fmaxf(amax, fabsf(a[e]));
        sum += a[e];
    }
#pragma unroll
    for (int o = GA / 2; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o, GA));
#pragma unroll
    for (int o = G / 2; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o, G);
    if (!on) return;
    if constexpr (MX) {
        const float inv = amax > 0.f ? FL_QMX_QMAX / amax : 0.f;
        uint32_t hb[8], lb[8];
#pragma unroll
        for (int e = 0; e < 8; e++) {
            int q = __float2int_rn(a[e] * inv);
            q = max(-32639, min(32639, q));
            const int h = (q + 128) >> 8;
            hb[e] = (uint32_t)h & 0xffu;
            lb[e] = (uint32_t)(q - (h << 8)) & 0xffu;
        }
        uint4 o;
        if (BITS == 4) {
            o.x = hb[0] | hb[2] << 8 | hb[4] << 16 | hb[6] << 24;
            o.y = hb[1] | hb[3] << 8 | hb[5] << 16 | hb[7] << 24;
            o.z = lb[0] | lb[2] << 8 | lb[4] << 16 | lb[6] << 24;
            o.w = lb[1] | lb[3] << 8 | lb[5] << 16 | lb[7] << 24;
        } else {
            o.x = hb[0] | hb[1] << 8 | hb[2] << 16 | hb[3] << 24;
            o.y = hb[4] | hb[5] << 8 | hb[6] << 16 | hb[7] << 24;
            o.z = lb[0] | lb[1] << 8 | lb[2] << 16 | lb[3] << 24;
            o.w = lb[4] | lb[5] << 8 | lb[6] << 16 | lb[7] << 24;
        }
        ((uint4 *)xq)[k0 / 8] = o;
        if ((threadIdx.x & (G - 1)) == 0) {
            const int64_t i = k0 / C;
            xd[((k0 - i * C) / (G * 8)) * 8 + i] = make_float2(amax / FL_QMX_QMAX, sum);
        }
        return;
    }
    constexpr float QMAX = X8 ? 127.f : 32767.f;
    const float inv = amax > 0.f ? QMAX / amax : 0.f;
    int q[8];
#pragma unroll
    for (int e = 0; e < 8; e++) q[e] = max(-(int)QMAX, min((int)QMAX, __float2int_rn(a[e] * inv)));
    if constexpr (X8) {
        auto pk = [](int b0, int b1, int b2, int b3) {
            return (uint32_t)(uint8_t)b0 | (uint32_t)(uint8_t)b1 << 8 | (uint32_t)(uint8_t)b2 << 16 | (uint32_t)(uint8_t)b3 << 24;
        };
        const uint2 w = BITS == 4 && !NAT ? make_uint2(pk(q[0], q[2], q[4], q[6]), pk(q[1], q[3], q[5], q[7]))
                                  : make_uint2(pk(q[0], q[1], q[2], q[3]), pk(q[4], q[5], q[6], q[7]));
        *(uint2 *)((int8_t *)xq + k0) = w;
    } else {
        auto pk = [](int lo, int hi) { return (uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16); };
        const uint4 w = BITS == 4 ? make_uint4(pk(q[0], q[2]), pk(q[4], q[6]), pk(q[1], q[3]), pk(q[5], q[7]))
                                  : make_uint4(pk(q[0], q[1]), pk(q[2], q[3]), pk(q[4], q[5]), pk(q[6], q[7]));
        *(uint4 *)(xq + k0) = w;
    }
    if ((threadIdx.x & (G - 1)) == 0) xd[k0 / (G * 8)] = make_float2(amax * (1.f / QMAX), sum);
}

// The columns a producer's row must be a whole multiple of to write x form qb (a lane group of fl_qx_store8 holds an
// amax block and a vector (FL_QMX: a chunk) of one row): 32, or the chunk, 128 / 64, for FL_QMX.
__host__ __device__ constexpr int fl_qx_cols(int qb) { return qb & FL_QMX ? fl_qchunk_cols(qb & 15) : 32; }

// The x forms, once: X(qb) for each. Two places turn a runtime form into a template argument through it:
// fl_qx_dispatch (host: the kernels that write or read x take QB as a template parameter) and fl_qx_dispatch_dev
// (device: a kernel that writes x as one of several jobs, e.g. attention.cu's split kernel in its combine role).
#define FL_QX_FORMS(X) X(4) X(8) X(4 | FL_QX8) X(8 | FL_QX8) X(4 | FL_QX8 | FL_QXN) X(4 | FL_QMX) X(8 | FL_QMX)

// f(std::integral_constant<int, QB>()) for qb one of FL_QX_FORMS; what f returns, or an error naming `what` for any
// other qb.
template <typename F>
static fl_status fl_qx_dispatch(int qb, const char *what, F &&f) {
#define FL_QX_CASE_(q) \
    case q: return f(std::integral_constant<int, q>());
    switch (qb) {
    FL_QX_FORMS(FL_QX_CASE_)
    default: return fl_err(FL_E_INTERNAL, "%s: x form %d for the dp2a GEMV", what, qb);
    }
#undef FL_QX_CASE_
}

// The same on the device: f(std::integral_constant<int, QB>()) for qb one of FL_QX_FORMS, nothing for any other.
template <typename F>
__device__ __forceinline__ void fl_qx_dispatch_dev(int qb, F &&f) {
#define FL_QX_CASE_(q) \
    case q: f(std::integral_constant<int, q>()); break;
    switch (qb) {
    FL_QX_FORMS(FL_QX_CASE_)
    default: break;
    }
#undef FL_QX_CASE_
}

// Where a producer writes x for the quantised GEMV of the matmul that follows it (bits 0: do not).
struct fl_qx_dst {
    int bits;  // the QB of fl_qx_store8: 4 | 8, | FL_QX8 for int8 x (| FL_QXN for NF4), | FL_QMX for the 3..8-row GEMV's
               // planes; 0: none
    int16_t *xq;
    float2 *xd;
};
#endif
