// qmatmul.cu: quantised weights on the CUDA backend (see qmatmul.cuh; the format is csrc/quant.h).
//
// Values. Column c of row r, g = c / group_size, code q (an unsigned 4- or 8-bit integer):
//   integer codes:  w = fmaf(q, s, m), m = zeros[r, g], or -s * 2^(bits-1) without zeros (exact:
//                   a power-of-two multiple of s), which is quant.h's s * (q - 2^(bits-1));
//   NF4:            w = fmaf(nf4[q], s, m), m = zeros[r, g] or 0.
// A 16-column "sub-block" (8 bytes of 4-bit codes, 16 bytes of 8-bit codes) always lies inside one
// group (group_size is a multiple of 16), so every kernel works in sub-blocks with one (s, m) each.
// q becomes a float exactly with the magic-number trick: the byte placed in the mantissa of 2^23
// (one PRMT), minus 2^23 (one FADD).
//
// Decode GEMV (qgemv_kernel): the structure of matmul.cu's gemv_kernel. A warp owns RPW consecutive
// rows; each lane walks its rows in 16-byte vectors of codes (32 columns of 4-bit, 16 of 8-bit),
// U vectors per row in flight (loads past L1: the codes are read once), then for each 16-column
// sub-block reads (s, m) through L1 (4-bit with group 128: four lanes share one), dequantises into
// float32 registers, and accumulates against the n token rows of x (read through L1, shared by the
// block's warps and reused for the RPW rows). A warp reduction leaves output (i, r) in lane
// i*RPW + r. The group of a sub-block is a multiply-high by a magic reciprocal (exact for the sizes
// where it is used, checked on the host), not a division.
// Bytes read per token: codes + scales + offsets, once; x and y are small. Instruction budget (the
// doubt to measure first): at 4.2 TB/s an H200 can issue ~127 instructions per 16-byte vector of
// codes. The FMA kernel spends ~5 per weight at n = 1 for 4-bit (extract, FADD, FFMA for w; convert
// x, FFMA), ~160 per vector, and ~2 more per weight for each further token row: issue-bound, worse
// with n. Hence qgemv_mma_kernel (below): integer codes become exact small integers in f16/bf16
// pairs fed to mma.sync, the group's scale is applied once per 64-byte chunk of a row, ~70
// instructions per vector whatever n is. Default (FASTLOAD_QGEMV=auto): the tensor cores wherever
// the layout allows (integer codes, groups of whole chunks: 128 columns of 4-bit, 64 of 8-bit), the
// FMA kernel for smaller groups (NF4: qgemv_imma8_kernel at 3..8 rows, see there). Not yet measured on a GPU: whether the tensor-core kernel
// streams as well as the FMA one at n = 1 (matmul.cu's bf16 tensor-core GEMV did not);
// FASTLOAD_QGEMV=fma / mma force one for the A/B (dev/cuda/NOTES.md has the bf16 GEMV numbers).
// qgemv_generic_kernel: any alignment, any activation dtype, one warp per row, runtime layout; the
// fallback (float32 activations, rows of 4-bit codes that are not whole 16-byte vectors).
//
// First H200 run (benchmarks/results/issue9-2026-12-01, before the software pipelining and the
// dequantisation grid below): decode b1 int8 54%, int4 28%, nf4 24% of the roofline, flat in n
// for the tensor-core kernel (int4 batch 8 = 8.2x batch 1); prefill 2048 4.2x bf16's TTFT (mostly an
// odd-row chunk that sent cuBLAS to an align1 kernel, see the chunk size in fl_cuda_qmatmul).
//
// Prefill (n > qgemv_up_to): dequantise W into a workspace of the activation dtype, at most
// FL_QDEQ_CHUNK_BYTES at a time (the lm_head never needs a full copy), and multiply each chunk with
// cuBLAS (ldc = R), like fl_cuda_matmul. Tensor-core tiles fed directly from the codes (dequantised
// in shared memory, no workspace round trip) are the alternative; this was chosen for simplicity
// and is to be measured against the issue's target (prefill 2048 with int4 <= 1.5x bf16).
//
// Quantisation at load (qquantize_kernel): one warp per (row, group), the exact rules of
// fl_q_quantize_rows. The build uses --use_fast_math (flush-to-zero, approximate division), so the
// arithmetic that decides a code or a scale is written in PTX without .ftz: div.rn, sub.rn, min,
// max, abs, cvt.rni; fp16 rounding is __float2half_rn.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qmatmul.cuh"
#include "qcommon.cuh"
#include "qx.cuh"
#include "cuda_backend.cuh"
#include "cuda_common.cuh"
#include "../quant.h"

#define QG_THREADS 128   /* GEMV blocks: 4 warps, like matmul.cu */
#define QD_THREADS 256   /* dequant / embed / quantise blocks */

// bitsandbytes' NF4 code book, the same literals as fl_nf4_table (quant.h).
#define FL_NF4_VALUES                                                                                \
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f, \
        -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f, \
        0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,        \
        0.7229568362236023f, 1.0f
__constant__ float c_nf4[16] = {FL_NF4_VALUES};
static const float h_nf4[16] = {FL_NF4_VALUES};


static fl_qw qw_of(const fl_weight *W) {
    fl_qw w;
    w.q = (const uint8_t *)W->data_d;
    w.s = W->scales_d;
    w.m = W->zeros_d;
    w.perm = W->perm_d;
    w.R = W->rows;
    w.C = W->cols;
    w.rb = W->cols * W->bits / 8;
    w.bits = W->bits;
    w.gs = W->group_size;
    w.code = W->code;
    w.s32 = W->sdtype == FL_F32;
    w.ng = (int)(W->cols / W->group_size);
    return w;
}

// One expert's view of a stack of E experts (MoE): R rows; the kernels offset codes and scales by the expert's rows.
static fl_qw expert_view(const fl_weight *Wt, int64_t R) {
    fl_qw V = qw_of(Wt);
    V.R = R;
    return V;
}

// The multiply-high magic for i / d (d >= 1) with i * d <= 2^32 (callers check that); 0 for d == 1.
static uint32_t div_magic(uint32_t d) { return d > 1 ? (uint32_t)(((1ull << 32) + d - 1) / d) : 0u; }

fl_status fl_cuda_qcheck(const fl_weight *W, const char *op) {
    if (W->dtype != FL_QUANT) return fl_err(FL_E_INTERNAL, "CUDA %s: the weight is not quantised", op);
    if (W->bits != 4 && W->bits != 8)
        return fl_err(FL_E_UNSUPPORTED, "CUDA %s: quantised weight with bits %d (4 or 8 are supported)", op, W->bits);
    if (W->code != FL_QCODE_INT && W->code != FL_QCODE_NF4)
        return fl_err(FL_E_UNSUPPORTED, "CUDA %s: quantised weight with code %d (0 = integer, 1 = NF4)", op, W->code);
    if (W->code == FL_QCODE_NF4 && W->bits != 4)
        return fl_err(FL_E_UNSUPPORTED, "CUDA %s: the NF4 code book needs bits 4, not %d", op, W->bits);
    if (W->sdtype != FL_F16 && W->sdtype != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "CUDA %s: quantised weight with scale dtype %s (float16 or float32)", op,
                      fl_cuda_dtype_name(W->sdtype));
    if (W->rows < 0 || W->cols <= 0 || W->group_size <= 0 || W->group_size % 16 || W->cols % W->group_size)
        return fl_err(FL_E_VALUE, "CUDA %s: quantised weight [%lld, %lld] with group_size %d (a multiple of 16 that "
                      "divides the columns is needed)", op, (long long)W->rows, (long long)W->cols, W->group_size);
    if (W->cols / W->group_size > INT32_MAX)
        return fl_err(FL_E_VALUE, "CUDA %s: %lld groups per row is too many", op, (long long)(W->cols / W->group_size));
    if (W->rows > 0 && (!W->data_d || !W->scales_d))
        return fl_err(FL_E_INTERNAL, "CUDA %s: quantised weight without codes or scales", op);
    return FL_OK;
}

// ---------------------------------------------------------------------------------------------
// device helpers
// ---------------------------------------------------------------------------------------------
// Byte J of u as an exact float (the byte in the mantissa of 2^23, minus 2^23).
template <int J>
__device__ __forceinline__ float byte_f32(uint32_t u) {
    return __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7650u | J)) - 8388608.f;
}

__device__ __forceinline__ float ld_scale(const void *p, int s32, int64_t i) {
    return s32 ? __ldg((const float *)p + i) : __half2float(__ldg((const __half *)p + i));
}

// w[k] = the value of column k of a 16-column sub-block whose codes are c[0..3] (8-bit) or c[0..1]
// (4-bit: byte j holds column 2j in its low nibble, 2j + 1 in its high nibble).
template <int BITS, bool NF4>
__device__ __forceinline__ void deq16(const uint32_t *c, float s, float m, const float *tab, float *w) {
    if constexpr (BITS == 8) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            w[4 * i + 0] = fmaf(byte_f32<0>(c[i]), s, m);
            w[4 * i + 1] = fmaf(byte_f32<1>(c[i]), s, m);
            w[4 * i + 2] = fmaf(byte_f32<2>(c[i]), s, m);
            w[4 * i + 3] = fmaf(byte_f32<3>(c[i]), s, m);
        }
    } else {
#pragma unroll
        for (int i = 0; i < 2; i++) {
            const uint32_t lo = c[i] & 0x0F0F0F0Fu, hi = (c[i] >> 4) & 0x0F0F0F0Fu;
            if constexpr (NF4) {
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    w[8 * i + 2 * j] = fmaf(tab[(lo >> (8 * j)) & 15u], s, m);
                    w[8 * i + 2 * j + 1] = fmaf(tab[(hi >> (8 * j)) & 15u], s, m);
                }
            } else {
                w[8 * i + 0] = fmaf(byte_f32<0>(lo), s, m);
                w[8 * i + 1] = fmaf(byte_f32<0>(hi), s, m);
                w[8 * i + 2] = fmaf(byte_f32<1>(lo), s, m);
                w[8 * i + 3] = fmaf(byte_f32<1>(hi), s, m);
                w[8 * i + 4] = fmaf(byte_f32<2>(lo), s, m);
                w[8 * i + 5] = fmaf(byte_f32<2>(hi), s, m);
                w[8 * i + 6] = fmaf(byte_f32<3>(lo), s, m);
                w[8 * i + 7] = fmaf(byte_f32<3>(hi), s, m);
            }
        }
    }
}

__device__ __forceinline__ void deq16_rt(const fl_qw &W, const uint32_t *c, float s, float m, const float *tab,
                                         float *w) {
    if (W.bits == 8) deq16<8, false>(c, s, m, tab, w);
    else if (W.code == FL_QCODE_NF4) deq16<4, true>(c, s, m, tab, w);
    else deq16<4, false>(c, s, m, tab, w);
}

// The codes of sub-block `sub` of row r: 16-byte (8-bit) or 8-byte (4-bit) loads when the codes'
// base is 16-byte aligned (then every sub-block is: a row is C * bits / 8 bytes, C % 16 == 0),
// byte loads otherwise.
__device__ __forceinline__ void load16(const fl_qw &W, int64_t r, int64_t sub, bool vec, uint32_t *c) {
    const uint8_t *p = W.q + r * W.rb + sub * (2 * W.bits);
    c[0] = c[1] = c[2] = c[3] = 0;
    if (vec) {
        if (W.bits == 8) {
            const uint4 v = __ldg((const uint4 *)p);
            c[0] = v.x; c[1] = v.y; c[2] = v.z; c[3] = v.w;
        } else {
            const uint2 v = __ldg((const uint2 *)p);
            c[0] = v.x; c[1] = v.y;
        }
    } else {
        const int nb = 2 * W.bits;  // 8 or 16 bytes; unrolled so that c stays in registers
#pragma unroll
        for (int b = 0; b < 16; b++)
            if (b < nb) c[b >> 2] |= (uint32_t)p[b] << (8 * (b & 3));
    }
}

// (s, m) of group g of row r, with the symmetric / NF4 defaults when there are no offsets.
__device__ __forceinline__ void scale_of(const fl_qw &W, int64_t r, int64_t g, float &s, float &m) {
    const int64_t i = r * W.ng + g;
    s = ld_scale(W.s, W.s32, i);
    m = W.m ? ld_scale(W.m, W.s32, i) : W.code == FL_QCODE_NF4 ? 0.f : -s * (float)(1 << (W.bits - 1));
}

// Ask L1 for the line of p now (a hint, no register): the scales of a step are requested with its
// codes instead of one memory round trip after them.
__device__ __forceinline__ void prefetch_l1(const void *p) { asm volatile("prefetch.global.L1 [%0];" ::"l"(p)); }

__device__ __forceinline__ void load_tab(float *tab) {
    if (threadIdx.x < 16) tab[threadIdx.x] = c_nf4[threadIdx.x];
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// decode GEMV, fast path: 16-bit activations, rows of whole 16-byte vectors
// ---------------------------------------------------------------------------------------------
template <typename T, typename S, int BITS, bool NF4, int N, int RPW, int U>
__global__ void __launch_bounds__(QG_THREADS)
qgemv_kernel(T *__restrict__ y, const T *__restrict__ x, const fl_qw W, const T *__restrict__ bias, uint32_t gmagic) {
    constexpr int E = fl_vec<T>::EPV, SB = BITS == 4 ? 2 : 1;
    static_assert(N * RPW <= 32, "one output per lane");
    static_assert(16 % E == 0, "16-column sub-blocks of whole x vectors");
    __shared__ float tab[16];
    if (NF4) load_tab(tab);
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int64_t r0 = ((int64_t)blockIdx.x * (QG_THREADS / 32) + threadIdx.x / 32) * RPW;
    if (r0 >= W.R) return;  // whole warps only
    const int64_t nv = W.rb / 16, C = W.C;
    const uint4 *wrow[RPW];
    int64_t srow[RPW];
#pragma unroll
    for (int r = 0; r < RPW; r++) {
        const int64_t rr = r0 + r < W.R ? r0 + r : W.R - 1;
        wrow[r] = (const uint4 *)(W.q + rr * W.rb);
        srow[r] = rr * W.ng;
    }
    const S *sc = (const S *)W.s, *zc = (const S *)W.m;
    const uint32_t gs16 = (uint32_t)(W.gs / 16);
    constexpr float HALF = (float)(1 << (BITS - 1));

    float acc[N][RPW];
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[i][r] = 0.f;

    auto fma_vec = [&](const uint4 (&wv)[RPW], int64_t v) {
#pragma unroll
        for (int sb = 0; sb < SB; sb++) {
            const uint32_t sub = (uint32_t)(v * SB + sb);
            const uint32_t g = gs16 == 1 ? sub : __umulhi(sub, gmagic);
            float wf[RPW][16];
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                const float s = ld_s(sc, srow[r] + g);
                const float m = zc ? ld_s(zc, srow[r] + g) : NF4 ? 0.f : -s * HALF;
                uint32_t c[4];
                if (BITS == 8) {
                    c[0] = wv[r].x; c[1] = wv[r].y; c[2] = wv[r].z; c[3] = wv[r].w;
                } else if (sb == 0) {
                    c[0] = wv[r].x; c[1] = wv[r].y; c[2] = c[3] = 0;
                } else {
                    c[0] = wv[r].z; c[1] = wv[r].w; c[2] = c[3] = 0;
                }
                deq16<BITS, NF4>(c, s, m, tab, wf[r]);
            }
#pragma unroll
            for (int i = 0; i < N; i++) {
                const uint4 *xp = (const uint4 *)(x + (int64_t)i * C + (int64_t)sub * 16);
#pragma unroll
                for (int h = 0; h < 16 / E; h++) {
                    float xf[E];
                    fl_vec_to_f32<T>(__ldg(xp + h), xf);
#pragma unroll
                    for (int r = 0; r < RPW; r++)
#pragma unroll
                        for (int e = 0; e < E; e++) acc[i][r] = fmaf(wf[r][h * E + e], xf[e], acc[i][r]);
                }
            }
        }
    };

    // The scales / offsets of the vectors of one step, requested before its codes (a lane's groups
    // of a step span a few 128-byte lines; without this the scale loads were a second round trip).
    auto prefetch_scales = [&](int64_t b) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (b + 32 * u >= nv) break;
            const uint32_t sub = (uint32_t)((b + 32 * u) * SB);
            const uint32_t g = gs16 == 1 ? sub : __umulhi(sub, gmagic);
#pragma unroll
            for (int r = 0; r < RPW; r++) {
                prefetch_l1(sc + srow[r] + g);
                if (zc) prefetch_l1(zc + srow[r] + g);
            }
        }
    };

    // U vectors of each row per step, predicated past the row's end; the next step's loads are
    // issued before this step is computed (software pipelining: the first H200 run streamed at a
    // quarter of the bandwidth with load-then-compute steps, dequantisation being much more work
    // per byte than matmul.cu's 16-bit GEMV).
    const uint4 z = make_uint4(0, 0, 0, 0);
    auto load_step = [&](int64_t b, uint4 (&wv)[U][RPW]) {
        prefetch_scales(b);
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < RPW; r++) wv[u][r] = b + 32 * u < nv ? fl_ld_stream(wrow[r] + b + 32 * u) : z;
    };

    fl_pdl_wait();  // x comes from the previous kernel
    int64_t base = lane;
    uint4 w[U][RPW];
    load_step(base, w);
    for (; base + 32 * (U - 1) < nv; base += 32 * U) {  // full steps
        uint4 wn[U][RPW];
        load_step(base + 32 * U, wn);
#pragma unroll
        for (int u = 0; u < U; u++) fma_vec(w[u], base + 32 * u);
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < RPW; r++) w[u][r] = wn[u][r];
    }
    if (base < nv) {  // the row's last partial step, loaded by the last full step (or above)
#pragma unroll
        for (int u = 0; u < U; u++)
            if (base + 32 * u < nv) fma_vec(w[u], base + 32 * u);
    }

    float mine = 0.f;
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            float v = acc[i][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == i * RPW + r) mine = v;
        }
    if (lane < N * RPW) {
        const int i = lane / RPW, r = lane % RPW;
        const int64_t row = r0 + r;
        if (row < W.R) {
            if (bias) mine += fl_to_f32(bias[row]);
            y[(int64_t)i * W.R + row] = fl_from_f32<T>(mine);
        }
    }
}


// ---------------------------------------------------------------------------------------------
// decode GEMV on the tensor cores (sm_80+), integer codes: cost per weight that does not grow with n
// ---------------------------------------------------------------------------------------------
// One block per 16-row tile of W, its WARPS warps splitting the row into "chunks" of 64 bytes of codes
// per row (128 columns of 4-bit, 64 of 8-bit), U chunks in flight per warp. In a chunk, lane
// (g = lane / 4, t = lane % 4) loads 16 bytes of row g and of row g + 8 (its quarter of the chunk,
// CPL = 32 or 16 columns) and token g's x over the same columns (zeros for g >= n). The codes become
// exact integers in T pairs (4-bit: the nibble OR-ed into the mantissa of 1024 (f16) / 128 (bf16),
// minus that; 8-bit f16: the byte under 1024 the same way; 8-bit bf16: the float32 trick, packed) with
// the symmetric offset 2^(bits-1) subtracted in the same step, and mma.sync m16n8k16 (float32
// accumulators) gives the chunk's sum of q * x for 16 rows x 8 tokens. The sum over k does not care
// which column sits in which k slot as long as A and B agree: 4-bit pairs are the nibbles (p, p + 4)
// of a 32-bit word, so x is paired the same way with one PRMT per pair. A chunk lies in one group
// (the kernel is used when the group size is a multiple of the chunk's columns), so the scale is
// applied once per chunk to the partial fragment: acc += s * sum(q x) (+ m * sum(x), the second sum
// from one more mma with A = ones, min form only). The warps' fragments are summed through shared
// memory; lane (g, t) of warp 0 then holds rows g, g + 8 x tokens 2t, 2t + 1.
// NF4 and groups smaller than a chunk take other kernels (qgemv()).
template <typename T> struct qmma_k;
template <> struct qmma_k<__half> {
    static constexpr uint32_t MAGIC = 0x64006400u;  // 1024.0 in each half
    static constexpr float BASE = 1024.f;
    static constexpr uint32_t ONES = 0x3C003C00u;   // 1.0, 1.0
};
template <> struct qmma_k<__nv_bfloat16> {
    static constexpr uint32_t MAGIC = 0x43004300u;  // 128.0 in each half (mantissa step 1 in [128, 256))
    static constexpr float BASE = 128.f;
    static constexpr uint32_t ONES = 0x3F803F80u;
};

// packed a - (v, v) in T (exact here: both are small integers the type holds)
template <typename T>
__device__ __forceinline__ uint32_t qsub2(uint32_t a, float v) {
    if constexpr (std::is_same<T, __half>::value) {
        __half2 h;
        memcpy(&h, &a, 4);
        h = __hsub2(h, __float2half2_rn(v));
        memcpy(&a, &h, 4);
    } else {
        __nv_bfloat162 h;
        memcpy(&h, &a, 4);
        h = __hsub2(h, __float2bfloat162_rn(v));
        memcpy(&a, &h, 4);
    }
    return a;
}

// The pair (byte J, byte J + 1) of u minus `off` as exact integers in T, low half first.
template <typename T, int J>
__device__ __forceinline__ uint32_t qbyte_pair(uint32_t u, float off) {
    if constexpr (std::is_same<T, __half>::value) {
        // bytes under 0x64: 1024 + byte in each half
        return qsub2<T>(__byte_perm(u, 0x64646464u, J == 0 ? 0x4140u : 0x4342u), 1024.f + off);
    } else {
        const __nv_bfloat162 h = __floats2bfloat162_rn(byte_f32<J>(u) - off, byte_f32<J + 1>(u) - off);
        uint32_t r;
        memcpy(&r, &h, 4);
        return r;
    }
}

template <typename T, typename S, int BITS, bool ZEROS, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32)
qgemv_mma_kernel(T *__restrict__ y, const T *__restrict__ x, const fl_qw W, const T *__restrict__ bias, int n,
                 uint32_t cmagic, int early) {
    constexpr int CPC = fl_qchunk_cols(BITS), CPL = CPC / 4;  // columns per chunk, per lane
    constexpr float OFF = ZEROS ? 0.f : (float)(1 << (BITS - 1));
    __shared__ float red[WARPS][4][32];
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t r0 = (int64_t)blockIdx.x * 16, R = W.R;
    const int64_t ra = r0 + g < R ? r0 + g : R - 1, rb = r0 + g + 8 < R ? r0 + g + 8 : R - 1;
    const uint4 *wa = (const uint4 *)(W.q + ra * W.rb) + t, *wb = (const uint4 *)(W.q + rb * W.rb) + t;
    const S *sc = (const S *)W.s, *zc = (const S *)W.m;
    const int64_t sa = ra * W.ng, sbi = rb * W.ng;
    const int64_t nchunk = W.rb / 64;
    const uint32_t cpg = (uint32_t)(W.gs / CPC);  // chunks per group
    const bool has_x = g < n;
    const uint4 *xg = (const uint4 *)(x + (int64_t)(has_x ? g : 0) * W.C + t * CPL);  // + chunk * CPC elements
    const uint4 z = make_uint4(0, 0, 0, 0);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    // U chunks per warp and step; the next step's codes are requested before this step is computed
    // (software pipelining, see qgemv_kernel).
    auto load_step = [&](int64_t cb, uint4 (&A)[U], uint4 (&B)[U]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const bool ok = cb + u < nchunk;
            if (ok && t == 0) {  // this chunk's scales (and offsets) for rows g, g + 8, with its codes
                const uint32_t grp = cpg == 1 ? (uint32_t)(cb + u) : __umulhi((uint32_t)(cb + u), cmagic);
                prefetch_l1(sc + sa + grp);
                prefetch_l1(sc + sbi + grp);
                if (ZEROS) {
                    prefetch_l1(zc + sa + grp);
                    prefetch_l1(zc + sbi + grp);
                }
            }
            A[u] = ok ? fl_ld_stream(wa + 4 * (cb + u)) : z;
            B[u] = ok ? fl_ld_stream(wb + 4 * (cb + u)) : z;
        }
    };
    uint4 va[U], vb[U];
    if (early) load_step((int64_t)warp * U, va, vb);  // codes are weights: the first step before the wait
    fl_pdl_wait();  // x comes from the previous kernel
    if (!early) load_step((int64_t)warp * U, va, vb);
    for (int64_t c0 = (int64_t)warp * U; c0 < nchunk; c0 += WARPS * U) {
        uint4 na[U], nb[U];
        load_step(c0 + WARPS * U, na, nb);
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t ch = c0 + u;
            if (ch >= nchunk) break;  // the same for the whole warp
            uint32_t xw[CPL / 2];
#pragma unroll
            for (int h = 0; h < CPL / 8; h++) {
                const uint4 v = has_x ? __ldg(xg + ch * (CPC / 8) + h) : z;
                xw[4 * h] = v.x; xw[4 * h + 1] = v.y; xw[4 * h + 2] = v.z; xw[4 * h + 3] = v.w;
            }
            const uint32_t ca[4] = {va[u].x, va[u].y, va[u].z, va[u].w}, cb[4] = {vb[u].x, vb[u].y, vb[u].z, vb[u].w};
            float part[4] = {0.f, 0.f, 0.f, 0.f}, xs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int i = 0; i < 4; i++) {
                if constexpr (BITS == 4) {
                    // word i: nibble p is column 8i + p; pair P_p = (nibble p, nibble p + 4)
                    uint32_t pa[4], pb[4];
#pragma unroll
                    for (int p = 0; p < 4; p++) {
                        pa[p] = qsub2<T>(((ca[i] >> (4 * p)) & 0x000F000Fu) | qmma_k<T>::MAGIC, qmma_k<T>::BASE + OFF);
                        pb[p] = qsub2<T>(((cb[i] >> (4 * p)) & 0x000F000Fu) | qmma_k<T>::MAGIC, qmma_k<T>::BASE + OFF);
                    }
                    // x words 4i..4i+3 hold columns (8i, 8i+1) .. (8i+6, 8i+7)
#pragma unroll
                    for (int h = 0; h < 2; h++) {
                        const uint32_t b0 = __byte_perm(xw[4 * i + h], xw[4 * i + h + 2], 0x5410u);  // (8i+2h, 8i+2h+4)
                        const uint32_t b1 = __byte_perm(xw[4 * i + h], xw[4 * i + h + 2], 0x7632u);  // (8i+2h+1, 8i+2h+5)
                        fl_mma_16816<T>(part, pa[2 * h], pb[2 * h], pa[2 * h + 1], pb[2 * h + 1], b0, b1);
                        if (ZEROS) fl_mma_16816<T>(xs, qmma_k<T>::ONES, qmma_k<T>::ONES, qmma_k<T>::ONES, qmma_k<T>::ONES, b0, b1);
                    }
                } else {
                    // word i: columns 4i..4i+3; x words 2i, 2i+1 hold (4i, 4i+1), (4i+2, 4i+3)
                    const uint32_t a0 = qbyte_pair<T, 0>(ca[i], OFF), a2 = qbyte_pair<T, 2>(ca[i], OFF);
                    const uint32_t a1 = qbyte_pair<T, 0>(cb[i], OFF), a3 = qbyte_pair<T, 2>(cb[i], OFF);
                    fl_mma_16816<T>(part, a0, a1, a2, a3, xw[2 * i], xw[2 * i + 1]);
                    if (ZEROS) fl_mma_16816<T>(xs, qmma_k<T>::ONES, qmma_k<T>::ONES, qmma_k<T>::ONES, qmma_k<T>::ONES, xw[2 * i], xw[2 * i + 1]);
                }
            }
            const uint32_t grp = cpg == 1 ? (uint32_t)ch : __umulhi((uint32_t)ch, cmagic);
            const float s_a = ld_s(sc, sa + grp), s_b = ld_s(sc, sbi + grp);
            if (ZEROS) {
                const float m_a = ld_s(zc, sa + grp), m_b = ld_s(zc, sbi + grp);
                acc[0] = fmaf(s_a, part[0], fmaf(m_a, xs[0], acc[0]));
                acc[1] = fmaf(s_a, part[1], fmaf(m_a, xs[1], acc[1]));
                acc[2] = fmaf(s_b, part[2], fmaf(m_b, xs[2], acc[2]));
                acc[3] = fmaf(s_b, part[3], fmaf(m_b, xs[3], acc[3]));
            } else {
                acc[0] = fmaf(s_a, part[0], acc[0]);
                acc[1] = fmaf(s_a, part[1], acc[1]);
                acc[2] = fmaf(s_b, part[2], acc[2]);
                acc[3] = fmaf(s_b, part[3], acc[3]);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            va[u] = na[u];
            vb[u] = nb[u];
        }
    }
#pragma unroll
    for (int k = 0; k < 4; k++) red[warp][k][lane] = acc[k];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int w = 1; w < WARPS; w++)
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k] += red[w][k][lane];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int64_t row = r0 + g + (k >> 1) * 8;
        const int tok = 2 * t + (k & 1);
        if (row < R && tok < n) y[(int64_t)tok * R + row] = fl_from_f32<T>(acc[k] + (bias ? fl_to_f32(bias[row]) : 0.f));
    }
}

__device__ __forceinline__ void qnf8_look(uint32_t w, uint32_t &ev, uint32_t &od) {
    qnf_look(w, QNF8_0, QNF8_1, QNF8_2, QNF8_3, ev, od);
}

// ---------------------------------------------------------------------------------------------
// decode GEMV on the integer tensor cores for 3..8 token rows, 4- and 8-bit integer codes and NF4 (qgemv_imma8_kernel)
// ---------------------------------------------------------------------------------------------
// Why: at n = 8 qgemv_mma_kernel spends ~135 instructions a lane per 64-byte chunk of 16 rows (each
// nibble pair OR-ed into an f16 / bf16 mantissa and re-based: 3 ops per 2 weights; a second mma with A = ones
// for the offsets' sum(x)) and 16 m16n8k16 mma. Here the codes stay integers: a 32-bit word of 8 nibbles
// becomes two u8 words (w & 0x0F0F0F0F: columns 0, 2, 4, 6; (w >> 4) & 0x0F0F0F0F: 1, 3, 5, 7), the A operand
// of mma.sync m16n8k32 u8 x s8 as it is, and x is int16-precise in two signed byte planes (q = 256 h + l,
// |q| <= 32639, one scale per token and 128-column chunk: error at most 2^-16 of the chunk's largest |x|, the
// dp2a path's numerics), two mma a word (one per plane). sum(x) per token and chunk comes from the prep
// (exact x, float32). ~60 instructions and 8 mma (of half the tensor time each) a lane per chunk.
// The k slots of one mma: lane t's word i of its quarter of the chunk (columns 32 t + 8 i + {0,2,4,6} in slots
// 4t..4t+3, {1,3,5,7} in 16+4t..16+4t+3); x is laid out by fl_qx_store8's FL_QMX form (qx.cuh) so that one uint4
// per (lane, word) holds exactly those columns of both planes: unit u (8 columns) = {h of 0,2,4,6 | h of 1,3,5,7 |
// l of 0,2,4,6 | l of 1,3,5,7}. The scale factors out of each mma because all four lanes' columns share one chunk.
// 8-bit codes: chunks of 64 columns, the code bytes as they are (0..255, u8), words 2i, 2i + 1 of a lane's 16 bytes in
// one mma; x units in natural order, one scale per token and 64 columns.
//   xp[tok][C / 8] uint4, xd[chunk][8] float2 (dx, sum x); tokens >= n are never read (guarded).
// H200, n = 8 (benchmarks/results/qimma8-2026-12-03-h200/run4-int8): int4 q|k|v / o / gate|up / down 8.4 / 6.5 / 33.7 /
// 25.9 us against 9.8 / 6.3 / 44.1 / 28.6 for the f16 kernel; int8 q|k|v / gate|up / LM head (per channel) 10.4 / 44.8 /
// 149.4 against 12.3 / 52.7 / 191.6, but int8 down (18944 columns) 39.5 against 32.7 (then 8-bit rows of C >= 8192
// took the f16 / bf16 kernel; since the index arithmetic was cut, twenty-first session, imma8 takes them: 21.3 us).

// The group of unit i of a row (a 16-byte vector of codes, a 64-byte chunk or half chunk) for the kernels below, without
// a branch: (i * mul) >> sh in 64 bits, gp = sh << 32 | mul (qgroup_param): a power of two units a group, mul 1 and sh
// its log2; one group a row, mul 0; else mul = ceil(2^32 / units a group) and sh 32 (multiply-high), exact for every
// index when units a row * units a group <= 2^32 (the callers check).
__device__ __forceinline__ uint32_t qgroup_of(uint32_t i, uint64_t gp) {
    return (uint32_t)(((uint64_t)i * (uint32_t)gp) >> (uint32_t)(gp >> 32));
}
static uint64_t qgroup_param(int64_t upg, int64_t ng) {
    if (ng == 1) return 0;
    const uint64_t u = (uint64_t)upg;
    if ((u & (u - 1)) == 0) {
        uint64_t sh = 0;
        while ((1ull << sh) < u) sh++;
        return sh << 32 | 1u;
    }
    return 32ull << 32 | (((1ull << 32) + u - 1) / u);
}
// qgemv_imma8_kernel's units: chunks, or (HALF) half chunks of 64 columns.
static uint64_t qimma_gparam(const fl_qw &W, bool half) {
    return qgroup_param(W.gs / (half ? 64 : fl_qchunk_cols(W.bits)), W.ng);
}

// The value of p, opaque to the compiler: kept in a register instead of re-derived from the kernel parameters at each
// use (an empty asm).
template <typename P> __device__ __forceinline__ P *fl_opaque(P *p) {
    asm volatile("" : "+l"(p));
    return p;
}

// d[0..3] += A (16 x 32 u8, or s8 when SA) * B (32 x 8 s8), int32: mma.sync m16n8k32 (sm_80+; nothing below, callers
// check).
template <bool SA = false>
__device__ __forceinline__ void fl_imma_16832(int *d, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                              uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (SA)
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// WARPS warps over a row's 64-byte chunks, U chunks of each of the block's TILES 16-row tiles in flight a warp (all
// requested, then all computed: no software pipelining, whose second register buffer took the first version to 128
// registers, 16 warps an SM, and 40% of the copy rate on gate|up); each warp's x fragment of a chunk feeds TILES x 8
// mma (x is read from L1 / L2 once per TILES tiles: at n = 8 it is twice the codes' bytes for one tile). Integer
// codes, groups of whole chunks; x in the FL_QMX form (qx_prep_kernel, or the op before). Configurations measured:
// launch_qimma8 below.
// NF (BITS 4): NF4 codes, each word's 8 nibbles looked up in the int8 code book (qnf_look, QNF8_*: t8 = rint(nf4 *
// 127), error at most 3.7e-3 of the group's scale, as the 1-2-row GEMV on int8 x) into the same two words the nibble
// split gives (columns 0, 2, 4, 6 | 1, 3, 5, 7), then s8 x s8 mma; s / 127 for the scale, offsets 0 unless ZEROS.
// HALF (NF4 without offsets only): groups of an odd multiple of 64 columns (bitsandbytes' and fastload's NF4 block of
// 64), so a 128-column chunk holds two groups: lanes t = 0, 1 hold columns 0..63 of every word's mma, t = 2, 3 the
// rest, so each mma runs twice, once with the other half's A zeroed, and each half takes its own scale (x's scale is
// the chunk's for both). Offsets would need sum x per half, which the prep does not keep: those take the FMA kernel.
// STAGES > 0: the codes travel through a ring of STAGES steps per warp in shared memory (cp.async into each lane's own
// 16-byte slots, STAGES - 1 steps requested ahead of the one computed) instead of registers. MINB: blocks an SM the
// registers must allow (__launch_bounds__).
template <typename T, typename S, int BITS, bool ZEROS, int WARPS, int U, int TILES, bool NF = false, bool HALF = false,
          int STAGES = 0, int MINB = 1>
__global__ void __launch_bounds__(WARPS * 32, MINB)
qgemv_imma8_kernel(T *__restrict__ y, const uint4 *__restrict__ xp, const float2 *__restrict__ xd, const fl_qw W,
                   const T *__restrict__ bias, int n, uint64_t gp) {
    static_assert(!NF || BITS == 4, "NF4 codes are 4-bit");
    static_assert(!HALF || (NF && !ZEROS), "half-chunk groups: NF4 without offsets");
    constexpr int CPC = fl_qchunk_cols(BITS), XPL = CPC / 32;  // columns a chunk; x units (uint4) a lane and chunk
    constexpr float OFF = NF ? 0.f : (float)(1 << (BITS - 1)), SMUL = NF ? 1.f / 127.f : 1.f;
    __shared__ float red[WARPS][TILES * 4][32];
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
    const int64_t r0 = (int64_t)blockIdx.x * 16 * TILES, R = W.R;
    // Addressing (twenty-first session; index arithmetic had been ~43% of the instructions: the compiler re-derived
    // every address from the kernel parameters at each step, 64-bit, and every lane loaded, after an L1 prefetch, all
    // four scales / offsets of its rows). Now the lane's pointers are computed once and made opaque (fl_opaque), one a
    // (tile, half) to its codes and one a tile to its scale value (rows past the end: the lane's base row rgc, read
    // again, results dropped); chunk indices are 32-bit and a step's U chunks are immediate offsets; lane t of each
    // group of four loads one of the group's four scale values with the codes and __shfl_sync shares them:
    //   value j = t: integer codes, offsets: {s row a, s row b, m row a, m row b}; no offsets: {s a, s b, s a, s b};
    //   HALF: {s a first half, s b first half, s a second half, s b second half} (rows a = 16 k + g, b = a + 8).
    // A chunk's group: lane_group (a shift, or a multiply-high for groups of 3, 5, ... chunks; qgroup_of).
    const int64_t rgc = r0 + g < R ? r0 + g : R - 1;
    const uint8_t *pw[TILES][2];
    const S *ps[TILES];
    const S *vp = (ZEROS && t >= 2 ? (const S *)W.m : (const S *)W.s) + rgc * W.ng;  // this lane's scale values
#pragma unroll
    for (int k = 0; k < TILES; k++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const uint32_t ro = r0 + g + 16 * k + 8 * h < R ? (uint32_t)(16 * k + 8 * h) : 0u;
            pw[k][h] = fl_opaque((const uint8_t *)W.q + (rgc + ro) * W.rb + 16 * t);
            if (h == (t & 1)) ps[k] = fl_opaque(vp + ro * W.ng);
        }
    const int nchunk = (int)(W.rb / 64);
    auto lane_group = [&](int ch) -> uint32_t {  // the group of this lane's value in chunk ch (gp: qimma_gparam)
        return qgroup_of(HALF ? (uint32_t)(2 * ch + (t >> 1)) : (uint32_t)ch, gp);
    };
    // x of token g (lanes of tokens >= n read token 0's: their mma columns are never stored), (dx, sum x) of 2t, 2t + 1
    const uint4 *xg = fl_opaque(xp + (int64_t)(g < n ? g : 0) * (W.C / 8) + XPL * t);  // + chunk * CPC / 8
    const float2 *xdl = fl_opaque(xd + 2 * t);                                           // + chunk * 8
    const bool t0 = 2 * t < n, t1 = 2 * t + 1 < n;
    const uint4 z = make_uint4(0, 0, 0, 0);
    float acc[TILES][4];
#pragma unroll
    for (int k = 0; k < TILES; k++) acc[k][0] = acc[k][1] = acc[k][2] = acc[k][3] = 0.f;
    auto load_scales = [&](int cb, S (&sv)[U][TILES]) {
#pragma unroll
        for (int u = 0; u < U; u++) {
            const uint32_t gl = lane_group(cb + u);
#pragma unroll
            for (int k = 0; k < TILES; k++) sv[u][k] = cb + u < nchunk ? __ldg(ps[k] + gl) : S();
        }
    };
    auto load_step = [&](int cb, uint4 (&A)[U][TILES][2], S (&sv)[U][TILES]) {
#pragma unroll
        for (int k = 0; k < TILES; k++)
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const uint8_t *p = pw[k][h] + 64 * (int64_t)cb;
#pragma unroll
                for (int u = 0; u < U; u++) A[u][k][h] = cb + u < nchunk ? fl_ld_stream(p + 64 * u) : z;
            }
        load_scales(cb, sv);
    };
    auto compute = [&](int c0, const uint4 (&A)[U][TILES][2], const S (&sv)[U][TILES]) {
        const uint4 *xs = xg + (int64_t)c0 * (CPC / 8);
        const float2 *xds = xdl + (int64_t)c0 * 8;
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (c0 + u >= nchunk) break;  // the same for the whole warp
            uint4 xw[XPL];
#pragma unroll
            for (int i = 0; i < XPL; i++) xw[i] = __ldg(xs + u * (CPC / 8) + i);
            const float4 d = __ldg((const float4 *)(xds + u * 8));  // (dx, sum) of tokens 2t, 2t + 1
            const float dx0 = t0 ? d.x : 0.f, dx1 = t1 ? d.z : 0.f, x0 = t0 ? d.y : 0.f, x1 = t1 ? d.w : 0.f;
#pragma unroll
            for (int k = 0; k < TILES; k++) {
                const uint4 va = A[u][k][0], vb = A[u][k][1];
                const uint32_t ca[4] = {va.x, va.y, va.z, va.w}, cb[4] = {vb.x, vb.y, vb.z, vb.w};
                const float v = fl_to_f32(sv[u][k]);
                const int q0 = lane & ~3;
                const float v0 = __shfl_sync(0xffffffffu, v, q0), v1 = __shfl_sync(0xffffffffu, v, q0 | 1);
                if constexpr (HALF) {
                    int ih0[4] = {0, 0, 0, 0}, il0[4] = {0, 0, 0, 0}, ih1[4] = {0, 0, 0, 0}, il1[4] = {0, 0, 0, 0};
                    const bool first = t < 2;  // this lane's columns are in the chunk's first half
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        uint32_t alo, ahi, blo, bhi;
                        qnf8_look(ca[i], alo, ahi);
                        qnf8_look(cb[i], blo, bhi);
                        const uint32_t a0 = first ? alo : 0u, b0 = first ? blo : 0u, a1 = first ? ahi : 0u,
                                       b1 = first ? bhi : 0u;
                        fl_imma_16832<true>(ih0, a0, b0, a1, b1, xw[i].x, xw[i].y);
                        fl_imma_16832<true>(il0, a0, b0, a1, b1, xw[i].z, xw[i].w);
                        fl_imma_16832<true>(ih1, alo ^ a0, blo ^ b0, ahi ^ a1, bhi ^ b1, xw[i].x, xw[i].y);
                        fl_imma_16832<true>(il1, alo ^ a0, blo ^ b0, ahi ^ a1, bhi ^ b1, xw[i].z, xw[i].w);
                    }
                    const float v2 = __shfl_sync(0xffffffffu, v, q0 | 2), v3 = __shfl_sync(0xffffffffu, v, q0 | 3);
                    const float sa0 = v0 * SMUL, sb0 = v1 * SMUL, sa1 = v2 * SMUL, sb1 = v3 * SMUL;
                    acc[k][0] = fmaf(sa0, (float)(ih0[0] * 256 + il0[0]) * dx0, fmaf(sa1, (float)(ih1[0] * 256 + il1[0]) * dx0, acc[k][0]));
                    acc[k][1] = fmaf(sa0, (float)(ih0[1] * 256 + il0[1]) * dx1, fmaf(sa1, (float)(ih1[1] * 256 + il1[1]) * dx1, acc[k][1]));
                    acc[k][2] = fmaf(sb0, (float)(ih0[2] * 256 + il0[2]) * dx0, fmaf(sb1, (float)(ih1[2] * 256 + il1[2]) * dx0, acc[k][2]));
                    acc[k][3] = fmaf(sb0, (float)(ih0[3] * 256 + il0[3]) * dx1, fmaf(sb1, (float)(ih1[3] * 256 + il1[3]) * dx1, acc[k][3]));
                    continue;
                }
                int ih[4] = {0, 0, 0, 0}, il[4] = {0, 0, 0, 0};
                if constexpr (NF) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        uint32_t alo, ahi, blo, bhi;
                        qnf8_look(ca[i], alo, ahi);
                        qnf8_look(cb[i], blo, bhi);
                        fl_imma_16832<true>(ih, alo, blo, ahi, bhi, xw[i].x, xw[i].y);
                        fl_imma_16832<true>(il, alo, blo, ahi, bhi, xw[i].z, xw[i].w);
                    }
                } else if constexpr (BITS == 4) {
#pragma unroll
                    for (int i = 0; i < 4; i++) {
                        const uint32_t alo = ca[i] & 0x0F0F0F0Fu, ahi = (ca[i] >> 4) & 0x0F0F0F0Fu;
                        const uint32_t blo = cb[i] & 0x0F0F0F0Fu, bhi = (cb[i] >> 4) & 0x0F0F0F0Fu;
                        fl_imma_16832(ih, alo, blo, ahi, bhi, xw[i].x, xw[i].y);
                        fl_imma_16832(il, alo, blo, ahi, bhi, xw[i].z, xw[i].w);
                    }
                } else {  // words 2i, 2i + 1 of the lane's 16 bytes: columns 16 t + 8 i + (0-3, 4-7)
#pragma unroll
                    for (int i = 0; i < 2; i++) {
                        fl_imma_16832(ih, ca[2 * i], cb[2 * i], ca[2 * i + 1], cb[2 * i + 1], xw[i].x, xw[i].y);
                        fl_imma_16832(il, ca[2 * i], cb[2 * i], ca[2 * i + 1], cb[2 * i + 1], xw[i].z, xw[i].w);
                    }
                }
                float m_a = -OFF * v0, m_b = -OFF * v1;
                if constexpr (ZEROS) {
                    m_a = __shfl_sync(0xffffffffu, v, q0 | 2);
                    m_b = __shfl_sync(0xffffffffu, v, q0 | 3);
                }
                const float s_a = v0 * SMUL, s_b = v1 * SMUL;
                const float p0 = (float)(ih[0] * 256 + il[0]) * dx0, p1 = (float)(ih[1] * 256 + il[1]) * dx1;
                const float p2 = (float)(ih[2] * 256 + il[2]) * dx0, p3 = (float)(ih[3] * 256 + il[3]) * dx1;
                acc[k][0] = fmaf(s_a, p0, fmaf(m_a, x0, acc[k][0]));
                acc[k][1] = fmaf(s_a, p1, fmaf(m_a, x1, acc[k][1]));
                acc[k][2] = fmaf(s_b, p2, fmaf(m_b, x0, acc[k][2]));
                acc[k][3] = fmaf(s_b, p3, fmaf(m_b, x1, acc[k][3]));
            }
        }
    };
    const int cw0 = warp * U;
    if constexpr (STAGES > 0) {
        extern __shared__ uint4 qring[];  // [WARPS][STAGES][U][TILES][2][32]
        uint4 *ring = qring + (int64_t)warp * STAGES * U * TILES * 2 * 32 + lane;
        auto issue = [&](int cb, int slot) {  // one commit group a step, empty past the end
#pragma unroll
            for (int k = 0; k < TILES; k++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const uint8_t *p = pw[k][h] + 64 * (int64_t)cb;
#pragma unroll
                    for (int u = 0; u < U; u++)
                        if (cb + u < nchunk)
                            cp_async16(smem_addr(ring + (((slot * U + u) * TILES + k) * 2 + h) * 32), p + 64 * u, 16);
                }
#pragma unroll
            for (int u = 0; u < U; u++)  // this lane's scale values into L1, read when the step is computed
                if (cb + u < nchunk) {
                    const uint32_t gl = lane_group(cb + u);
#pragma unroll
                    for (int k = 0; k < TILES; k++) prefetch_l1(ps[k] + gl);
                }
            cp_async_commit();
        };
#pragma unroll
        for (int sidx = 0; sidx < STAGES - 1; sidx++) issue(cw0 + sidx * WARPS * U, sidx);
        fl_pdl_wait();  // x comes from the prep kernel
        int slot = 0;
        for (int c0 = cw0; c0 < nchunk; c0 += WARPS * U) {
            issue(c0 + (STAGES - 1) * WARPS * U, slot == 0 ? STAGES - 1 : slot - 1);
            S sv[U][TILES];
            load_scales(c0, sv);
            cp_async_wait<STAGES - 1>();
            uint4 cur[U][TILES][2];
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int k = 0; k < TILES; k++)
#pragma unroll
                    for (int h = 0; h < 2; h++) cur[u][k][h] = ring[(((slot * U + u) * TILES + k) * 2 + h) * 32];
            compute(c0, cur, sv);
            slot = slot == STAGES - 1 ? 0 : slot + 1;
        }
        cp_async_wait<0>();
    } else {
        uint4 cur[U][TILES][2];
        S sv[U][TILES];
        load_step(cw0, cur, sv);  // codes and scales are weights: the first step before the wait
        fl_pdl_wait();            // x comes from the prep kernel
        for (int c0 = cw0; c0 < nchunk; c0 += WARPS * U) {
            if (c0 != cw0) load_step(c0, cur, sv);
            compute(c0, cur, sv);
        }
    }
#pragma unroll
    for (int k = 0; k < TILES; k++)
#pragma unroll
        for (int e = 0; e < 4; e++) red[warp][4 * k + e][lane] = acc[k][e];
    __syncthreads();
    // warp w < TILES reduces tile w (one tile a warp when WARPS >= TILES)
    for (int k = warp; k < TILES; k += WARPS) {
        float v[4];
#pragma unroll
        for (int e = 0; e < 4; e++) {
            v[e] = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) v[e] += red[w][4 * k + e][lane];
        }
#pragma unroll
        for (int e = 0; e < 4; e++) {
            const int64_t row = r0 + 16 * k + g + (e >> 1) * 8;
            const int tok = 2 * t + (e & 1);
            if (row < R && tok < n) y[(int64_t)tok * R + row] = fl_from_f32<T>(v[e] + (bias ? fl_to_f32(bias[row]) : 0.f));
        }
    }
}

// The dp2a decode GEMV (qgemv_dp_kernel and its launchers) is in qdp.cuh, compiled once per activation
// dtype (qdp_f16.cu, qdp_bf16.cu: the kernel's instantiations were ~85% of this file's build time, which
// decided the whole build's; two files build side by side). Its x prep (qx_prep_kernel) stays here.


// One thread per 8 columns (one uint4 of x when there is no perm), the numerics and layout of
// fl_qx_store8 (qx.cuh), which RMSNorm and SwiGLU also call when they write x for this GEMV directly.
// (The first version, one thread per vector looping over its columns, took 3.4 us for C = 3584: on the
// critical path before each GEMV's x loads; one lane per column came next.)
template <typename T, int QB>
__global__ void __launch_bounds__(QD_THREADS)
qx_prep_kernel(int16_t *__restrict__ xq, float2 *__restrict__ xd, const T *__restrict__ x,
               const int32_t *__restrict__ perm, int n, int64_t C) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // x from the previous kernel; xq may still be read by the previous GEMV
    const int64_t total = (int64_t)n * (C / 8);  // C % VC == 0: a vector's lanes are one aligned lane group
    const int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    const bool on = t < total;
    const int64_t k0 = on ? t * 8 : 0, i = k0 / C, c0 = k0 - i * C;
    float a[8];
    if (!on) {
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = 0.f;
    } else if (perm) {
#pragma unroll
        for (int e = 0; e < 8; e++) {
            const int32_t p = perm[c0 + e];
            a[e] = p >= 0 && p < C ? fl_to_f32(x[i * C + p]) : 0.f;
        }
    } else if constexpr (fl_vec<T>::EPV == 8) {
        fl_vec_to_f32<T>(*(const uint4 *)(x + k0), a);
    } else {
#pragma unroll
        for (int e = 0; e < 8; e++) a[e] = fl_to_f32(x[k0 + e]);
    }
    fl_qx_store8<QB>(xq, xd, a, k0, C, on);
}


// ---------------------------------------------------------------------------------------------
// decode GEMV, generic: any act dtype, any alignment; one warp per row, runtime layout
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(QG_THREADS)
qgemv_generic_kernel(T *__restrict__ y, const T *__restrict__ x, const fl_qw W, const T *__restrict__ bias, int n,
                     bool vec) {
    __shared__ float tab[16];
    load_tab(tab);
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * (QG_THREADS / 32) + threadIdx.x / 32;
    if (r >= W.R) return;
    fl_pdl_wait();
    float acc[FL_GEMV_MAX_N_Q];
#pragma unroll
    for (int i = 0; i < FL_GEMV_MAX_N_Q; i++) acc[i] = 0.f;
    const int64_t nsub = W.C / 16;
    for (int64_t sub = lane; sub < nsub; sub += 32) {
        uint32_t c[4];
        load16(W, r, sub, vec, c);
        float s, m, w[16];
        scale_of(W, r, sub * 16 / W.gs, s, m);
        deq16_rt(W, c, s, m, tab, w);
#pragma unroll
        for (int i = 0; i < FL_GEMV_MAX_N_Q; i++) {
            if (i >= n) break;
            const T *xi = x + (int64_t)i * W.C + sub * 16;
#pragma unroll
            for (int k = 0; k < 16; k++) acc[i] = fmaf(w[k], fl_to_f32(xi[k]), acc[i]);
        }
    }
#pragma unroll
    for (int i = 0; i < FL_GEMV_MAX_N_Q; i++) {
        if (i >= n) break;
        float v = acc[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) y[(int64_t)i * W.R + r] = fl_from_f32<T>(v + (bias ? fl_to_f32(bias[r]) : 0.f));
    }
}

// ---------------------------------------------------------------------------------------------
// Mixture of Experts, quantised experts: moe.cu's grouped GEMV (block (bx, a): the a-th active expert, from
// device memory, so a decode step stays graph-safe; 4 warps, one of its rows each; its slots in passes of
// QMOE_NT, each row's codes read once a pass) with the generic kernel's per-sub-block dequantisation.
// Expert e's rows are rows [e * R, (e + 1) * R) of the stacked weight. Correct for every layout
// fl_cuda_qcheck accepts and any activation dtype. A lane requests QMOE_U 16-column sub-blocks (8 bytes of 4-bit
// codes, 16 of 8-bit, and their scales) before dequantising the first; x in 16-byte loads. Not tuned like the dense
// decode GEMVs (no integer dot products, no row split across warps): first H200 run, one sub-block a step and
// element loads of x, int4 Mixtral decoded at 0.52x its bf16 (169 against 324 tok/s, 11% of its roofline). Now the
// fallback: at decode the experts take qgemv_dp_kernel's MOE form where it has their layout (fl_cuda_moe_qgemv; int4
// Mixtral, 4 layers: 930 -> 2282 tok/s, benchmarks/results/moe-qdp-2026-12-04-h200/).
// ---------------------------------------------------------------------------------------------
#define QMOE_NT 8
#define QMOE_U 4  /* sub-blocks per lane in flight (codes and scales requested before any is used) */
// 16 columns of x (from column c0 of row xr) dotted with w, into acc; XV: two (16-bit) or four (float32) 16-byte
// loads, else element loads
template <typename T, bool XV>
__device__ __forceinline__ float qmoe_dot16(const T *__restrict__ xr, int64_t c0, const float *w, float acc) {
    if constexpr (XV) {
        constexpr int EPV = fl_vec<T>::EPV;
#pragma unroll
        for (int v = 0; v < 16 / EPV; v++) {
            float xf[EPV];
            fl_vec_to_f32<T>(__ldg((const uint4 *)(xr + c0) + v), xf);
#pragma unroll
            for (int i = 0; i < EPV; i++) acc = fmaf(w[v * EPV + i], xf[i], acc);
        }
    } else {
#pragma unroll
        for (int k = 0; k < 16; k++) acc = fmaf(w[k], fl_to_f32(xr[c0 + k]), acc);
    }
    return acc;
}

template <typename T, bool XV>
__global__ void __launch_bounds__(QG_THREADS)
qmoe_gemv_kernel(T *__restrict__ y, const T *__restrict__ x, const int32_t *__restrict__ slot_perm, int x_div,
                 const int32_t *__restrict__ offs, int E, const fl_qw W, int64_t R, bool vec) {
    __shared__ float tab[16];
    load_tab(tab);
    fl_pdl_wait();  // routing and grouping (offs, slot_perm) and x come from the previous kernels
    fl_pdl_launch_dependents();
    const int a = blockIdx.y;
    if (a >= offs[2 * E + 1]) return;  // fewer experts have slots than the grid allows for
    const int e = offs[E + 1 + a];
    const int p0 = offs[e], p1 = offs[e + 1];
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * (QG_THREADS / 32) + threadIdx.x / 32;
    if (r >= R) return;
    const int64_t row = (int64_t)e * R + r;
    const int nsub = (int)(W.C / 16), spg = W.gs / 16;  // sub-blocks a row, a group (C < 2^31: checked on the host)
    for (int q0 = p0; q0 < p1; q0 += QMOE_NT) {
        const int nt = min(QMOE_NT, p1 - q0);
        const T *xr[QMOE_NT];
#pragma unroll
        for (int t = 0; t < QMOE_NT; t++) {
            const int p = q0 + (t < nt ? t : 0);
            xr[t] = x + (int64_t)(slot_perm ? slot_perm[p] / x_div : p) * W.C;
        }
        float acc[QMOE_NT];
#pragma unroll
        for (int t = 0; t < QMOE_NT; t++) acc[t] = 0.f;
        auto use = [&](const uint32_t *c, float s, float m, int sub) {
            float w[16];
            deq16_rt(W, c, s, m, tab, w);
#pragma unroll
            for (int t = 0; t < QMOE_NT; t++) {
                if (t >= nt) break;
                acc[t] = qmoe_dot16<T, XV>(xr[t], (int64_t)sub * 16, w, acc[t]);
            }
        };
        int sub = lane;
        for (; sub + 32 * (QMOE_U - 1) < nsub; sub += 32 * QMOE_U) {
            uint32_t c[QMOE_U][4];
            float s[QMOE_U], m[QMOE_U];
#pragma unroll
            for (int u = 0; u < QMOE_U; u++) {
                load16(W, row, sub + 32 * u, vec, c[u]);
                scale_of(W, row, (sub + 32 * u) / spg, s[u], m[u]);
            }
#pragma unroll
            for (int u = 0; u < QMOE_U; u++) use(c[u], s[u], m[u], sub + 32 * u);
        }
        for (; sub < nsub; sub += 32) {
            uint32_t c[4];
            float s, m;
            load16(W, row, sub, vec, c);
            scale_of(W, row, sub / spg, s, m);
            use(c, s, m, sub);
        }
#pragma unroll
        for (int t = 0; t < QMOE_NT; t++) {
            float v = acc[t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && t < nt) y[(int64_t)(q0 + t) * R + r] = fl_from_f32<T>(v);
        }
    }
}

// xg[i, j] = x[i, perm[j]] (act-order weights: the GEMV then reads xg in the codes' column order)
template <typename T>
__global__ void qgather_kernel(T *__restrict__ xg, const T *__restrict__ x, const int32_t *__restrict__ perm, int n,
                               int64_t C) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // x from the previous kernel; xg may still be read by the previous GEMV
    const int64_t total = (int64_t)n * C;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x) {
        const int64_t i = k / C, j = k - i * C;
        const int32_t p = perm[j];
        xg[k] = p >= 0 && p < C ? x[i * C + p] : fl_from_f32<T>(0.f);
    }
}

// ---------------------------------------------------------------------------------------------
// dequantisation of rows [r0, r0 + rows) into out[rows, C] (act), columns scattered through perm
// ---------------------------------------------------------------------------------------------
// Thread = one 16-column sub-block (blockIdx.x, threadIdx.x), rows strided by gridDim.y: the column,
// its group and its place in a row are computed once, no 64-bit division per element.
template <typename T>
__global__ void __launch_bounds__(QD_THREADS)
qdequant_kernel(T *__restrict__ out, const fl_qw W, int64_t r0, int64_t rows, bool vec) {
    constexpr int E = fl_vec<T>::EPV;
    __shared__ float tab[16];
    load_tab(tab);
    fl_pdl_launch_dependents();
    const int64_t nsub = W.C / 16;
    const int64_t sub = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (sub >= nsub) return;
    const int64_t grp = sub / (W.gs / 16);
    fl_pdl_wait();  // `out` may still be read by the previous chunk's GEMM
    for (int64_t rl = blockIdx.y; rl < rows; rl += gridDim.y) {
        const int64_t r = r0 + rl;
        uint32_t c[4];
        load16(W, r, sub, vec, c);
        float s, m, w[16];
        scale_of(W, r, grp, s, m);
        deq16_rt(W, c, s, m, tab, w);
        T *o = out + rl * W.C;
        if (W.perm) {
#pragma unroll
            for (int e = 0; e < 16; e++) {
                const int32_t p = W.perm[sub * 16 + e];
                if (p >= 0 && p < W.C) o[p] = fl_from_f32<T>(w[e]);
            }
        } else {
            // the workspace is ours (cudaMalloc, rows of C % 16 == 0 elements): 16-byte aligned
#pragma unroll
            for (int h = 0; h < 16 / E; h++) ((uint4 *)(o + sub * 16))[h] = fl_f32_to_vec<T>(w + h * E);
        }
    }
}

template <typename T>
__global__ void qadd_bias_kernel(T *__restrict__ y, const T *__restrict__ bias, int n, int64_t R) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    const int64_t total = (int64_t)n * R;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x)
        y[k] = fl_from_f32<T>(fl_to_f32(y[k]) + fl_to_f32(bias[k % R]));
}

// ---------------------------------------------------------------------------------------------
// embedding rows: one block per token
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(QD_THREADS)
qembed_kernel(T *__restrict__ x, const int32_t *__restrict__ tok, const fl_qw W, bool vec) {
    __shared__ float tab[16];
    load_tab(tab);
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // the token ids come from the previous step's sampling
    const int64_t i = blockIdx.x;
    const int32_t t = tok[i];
    const bool ok = t >= 0 && t < W.R;
    T *xr = x + i * W.C;
    const int64_t nsub = W.C / 16;
    for (int64_t sub = threadIdx.x; sub < nsub; sub += blockDim.x) {
        float w[16];
        if (ok) {
            uint32_t c[4];
            load16(W, t, sub, vec, c);
            float s, m;
            scale_of(W, t, sub * 16 / W.gs, s, m);
            deq16_rt(W, c, s, m, tab, w);
        } else {
#pragma unroll
            for (int e = 0; e < 16; e++) w[e] = 0.f;
        }
#pragma unroll
        for (int e = 0; e < 16; e++) {
            // act-order: the code in column j is the embedding's element perm[j]
            const int64_t col = W.perm ? (int64_t)W.perm[sub * 16 + e] : sub * 16 + e;
            if (col >= 0 && col < W.C) xr[col] = fl_from_f32<T>(w[e]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// quantisation at load: one warp per (row, group); IEEE arithmetic without flush-to-zero
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float ieee_div(float a, float b) {
    float r;
    asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_sub(float a, float b) {
    float r;
    asm("sub.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_min(float a, float b) {  // a NaN operand loses, like fminf
    float r;
    asm("min.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_max(float a, float b) {
    float r;
    asm("max.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_abs(float a) {
    float r;
    asm("abs.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float ieee_rint(float a) {  // round half to even
    float r;
    asm("cvt.rni.f32.f32 %0, %1;" : "=f"(r) : "f"(a));
    return r;
}
__device__ __forceinline__ float ieee_add(float a, float b) {
    float r;
    asm("add.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_mul(float a, float b) {
    float r;
    asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
}
__device__ __forceinline__ float ieee_fma(float a, float b, float c) {
    float r;
    asm("fma.rn.f32 %0, %1, %2, %3;" : "=f"(r) : "f"(a), "f"(b), "f"(c));
    return r;
}
__device__ __forceinline__ float f16_round(float a) { return __half2float(__float2half_rn(a)); }

// int4's search (int4_search in csrc/quant_ref.c): the warp works through the candidates one after another, lane j
// taking the elements j, j + 32, .. of the group (the CPU's partial j); the butterfly of IEEE adds leaves every lane
// with the CPU's tree sum (a + b == b + a bit for bit). Errors are >= +0: their bits order like the floats, and
// a NaN error never compares below.
__device__ __forceinline__ float warp_sum32(float p) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) p = ieee_add(p, __shfl_xor_sync(0xffffffffu, p, o));
    return p;
}
__device__ __forceinline__ long long warp_isum(long long v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float clamp15(float v) {  // fminf(fmaxf(v, 0), 15): a NaN gives 0
    const float t = v > 0.0f ? v : 0.0f;
    return t < 15.0f ? t : 15.0f;
}
__device__ __forceinline__ bool err_below(float e, float best) {  // e < best, both >= +0, false with a NaN
    const unsigned eb = __float_as_uint(e), bb = __float_as_uint(best);
    return (eb & 0x7fffffffu) <= 0x7f800000u && (bb & 0x7fffffffu) <= 0x7f800000u && eb < bb;
}

template <typename ST>
__device__ float q4_err(const ST *__restrict__ x, int gs, int lane, float s, float m) {
    const float inv = ieee_div(1.0f, s);
    float p = 0.0f;
    for (int j = lane; j < gs; j += 32) {
        const float v = fl_to_f32(x[j]);
        const float q = clamp15(ieee_rint(ieee_mul(ieee_sub(v, m), inv)));
        const float e = ieee_sub(ieee_fma(q, s, m), v);
        p = ieee_fma(e, e, p);
    }
    return warp_sum32(p);
}

template <typename ST>
__device__ void q4_search(const ST *__restrict__ x, int gs, int lane, float mn, float mx, float *s, float *m) {
    float best = q4_err(x, gs, lane, *s, *m);
    if ((__float_as_uint(best) & 0x7fffffffu) > 0x7f800000u) return;  // NaN: round to nearest stays
    float p = 0.0f;
    for (int j = lane; j < gs; j += 32) p = ieee_add(p, fl_to_f32(x[j]));
    const float sx = warp_sum32(p), r = ieee_sub(mx, mn), Gf = (float)gs;
    for (int k = 1; k <= FL_Q4_CANDIDATES; k++) {
        const float is = ieee_div(ieee_div((float)(69 + k), 5.0f), r);
        int il = 0, il2 = 0;
        float pxl = 0.0f;
        for (int j = lane; j < gs; j += 32) {
            const float v = fl_to_f32(x[j]);
            const float l = clamp15(ieee_rint(ieee_mul(ieee_sub(v, mn), is)));
            const int li = (int)l;
            il += li;
            il2 += li * li;
            pxl = ieee_fma(v, l, pxl);
        }
        const long long sl = warp_isum(il), sl2 = warp_isum(il2);
        const float sxl = warp_sum32(pxl);
        const long long D = (long long)gs * sl2 - sl * sl;
        if (D <= 0) continue;
        const float Df = __ll2float_rn(D), slf = __ll2float_rn(sl), sl2f = __ll2float_rn(sl2);
        const float p1 = ieee_mul(sx, slf), p2 = ieee_mul(slf, sxl);
        const float cs = f16_round(ieee_div(ieee_fma(Gf, sxl, -p1), Df));
        const float cm = f16_round(ieee_div(ieee_fma(sl2f, sx, -p2), Df));
        if (!(cs > 0.0f && cs <= 65504.0f && cm >= -65504.0f && cm <= 65504.0f)) continue;
        const float e = q4_err(x, gs, lane, cs, cm);
        if (err_below(e, best)) {
            best = e;
            *s = cs;
            *m = cm;
        }
    }
}

struct fl_qmid { float v[15]; };  // NF4 decision points, computed on the host as the CPU does

// nf4's E(t) (nf4_err in csrc/quant_ref.c), strided like q4_err
template <typename ST>
__device__ float nf4_err(const ST *__restrict__ x, int gs, int lane, float t, const fl_qmid &mid) {
    float p = 0.0f;
    for (int j = lane; j < gs; j += 32) {
        const float v = fl_to_f32(x[j]);
        const float d = ieee_div(v, t);
        unsigned cnt = 0;
#pragma unroll
        for (int i = 0; i < 15; i++) cnt += d > mid.v[i];
        const float e = ieee_fma(c_nf4[cnt], t, -v);
        p = ieee_fma(e, e, p);
    }
    return warp_sum32(p);
}

// The first (row, group) index whose float16 scale (or int4 offset) came out infinite: every logit would be NaN. The
// host reads and resets it after each quantize call (fl_cuda_quantize) and refuses the weight, as fl_q_quantize_rows.
__device__ unsigned long long g_qoverflow = ~0ull;

template <typename ST>
__global__ void __launch_bounds__(QD_THREADS)
qquantize_kernel(uint8_t *__restrict__ q, void *scales, void *zeros, int s32, int64_t C, int gs, int scheme,
                 int64_t row0, int64_t rows, const ST *__restrict__ src, const fl_qmid mid) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // src may come from the previous kernel (a conversion on the device)
    const int lane = threadIdx.x & 31;
    const int64_t ng = C / gs;
    const int64_t wid = (int64_t)blockIdx.x * (QD_THREADS / 32) + threadIdx.x / 32;
    if (wid >= rows * ng) return;
    const int64_t rl = wid / ng, g = wid - rl * ng, r = row0 + rl, c0 = g * gs;
    const ST *x = src + rl * C + c0;
    const int64_t si = r * ng + g;
    auto sstore = [&](void *p, float v) {
        if (s32) ((float *)p)[si] = v;
        // v is already a float16 value: exact. A NaN (a group of NaN elements) as the host's fl_f32_to_f16 writes
        // it, sign | 0x7e00, where __float2half_rn gives 0x7fff
        else ((__half *)p)[si] = v != v ? __ushort_as_half((unsigned short)(((__float_as_uint(v) >> 16) & 0x8000u) | 0x7e00u))
                                        : __float2half_rn(v);
    };
    if (scheme == FL_QS_INT4) {
        const float first = fl_to_f32(x[0]);
        float mn = first, mx = first;
        bool pos_zero = false;
        for (int j = lane; j < gs; j += 32) {
            const float v = fl_to_f32(x[j]);
            mn = ieee_min(mn, v);
            mx = ieee_max(mx, v);
            pos_zero |= __float_as_uint(v) == 0u;
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            mn = ieee_min(mn, __shfl_xor_sync(0xffffffffu, mn, o));
            mx = ieee_max(mx, __shfl_xor_sync(0xffffffffu, mx, o));
        }
        // A tie of zeros: the CPU's running fminf / fmaxf (glibc 2.36) give +0 as soon as one +0 takes
        // part, -0 only when every zero is -0; the warp's order cannot follow that, so it is restated.
        pos_zero = __any_sync(0xffffffffu, pos_zero);
        if (mn == 0.0f) mn = pos_zero ? 0.0f : -0.0f;
        if (mx == 0.0f) mx = pos_zero ? 0.0f : -0.0f;
        float s = f16_round(ieee_div(ieee_sub(mx, mn), 15.0f));
        float m = f16_round(mn);
        if (s != 0.0f) q4_search(x, gs, lane, mn, mx, &s, &m);  // s, mn, mx are the same in every lane
        if (lane == 0) {
            sstore(scales, s);
            sstore(zeros, m);
            if (isinf(s) || isinf(m)) atomicMin(&g_qoverflow, (unsigned long long)si);
        }
        uint8_t *qr = q + r * (C / 2) + c0 / 2;
        const float inv = s == 0.0f ? 0.0f : ieee_div(1.0f, s);
        for (int j = 2 * lane; j < gs; j += 64) {
            unsigned v[2];
#pragma unroll
            for (int e = 0; e < 2; e++)
                v[e] = s == 0.0f ? 0u
                                 : (unsigned)ieee_min(ieee_max(ieee_rint(ieee_mul(ieee_sub(fl_to_f32(x[j + e]), m), inv)),
                                                               0.0f), 15.0f);
            qr[j / 2] = (uint8_t)(v[0] | (v[1] << 4));
        }
    } else {
        float amax = 0.0f;
        for (int j = lane; j < gs; j += 32) amax = ieee_max(amax, ieee_abs(fl_to_f32(x[j])));
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) amax = ieee_max(amax, __shfl_xor_sync(0xffffffffu, amax, o));
        if (scheme == FL_QS_INT8) {
            const float s = f16_round(ieee_div(amax, 127.0f));
            if (lane == 0) {
                sstore(scales, s);
                if (isinf(s)) atomicMin(&g_qoverflow, (unsigned long long)si);
            }
            uint8_t *qr = q + r * C + c0;
            for (int j = lane; j < gs; j += 32)
                qr[j] = s == 0.0f ? 128
                                  : (uint8_t)((int)ieee_min(ieee_max(ieee_rint(ieee_div(fl_to_f32(x[j]), s)), -127.0f),
                                                            127.0f) + 128);
        } else {  // nf4
            float s = f16_round(amax);
            if (s != 0.0f && err_below(nf4_err(x, gs, lane, -s, mid), nf4_err(x, gs, lane, s, mid))) s = -s;
            if (lane == 0) {
                sstore(scales, s);
                if (isinf(s)) atomicMin(&g_qoverflow, (unsigned long long)si);
            }
            uint8_t *qr = q + r * (C / 2) + c0 / 2;
            for (int j = 2 * lane; j < gs; j += 64) {
                unsigned k[2];
#pragma unroll
                for (int e = 0; e < 2; e++) {
                    const float v = s == 0.0f ? 0.0f : ieee_div(fl_to_f32(x[j + e]), s);
                    unsigned cnt = 0;
#pragma unroll
                    for (int t = 0; t < 15; t++) cnt += v > mid.v[t];
                    k[e] = cnt;
                }
                qr[j / 2] = (uint8_t)(k[0] | (k[1] << 4));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
static unsigned grid_for(int64_t work, int threads, int n_sm) {
    int64_t b = (work + threads - 1) / threads;
    const int64_t cap = (int64_t)(n_sm > 0 ? n_sm : 132) * 16;
    if (b > cap) b = cap;
    return (unsigned)(b > 0 ? b : 1);
}

template <typename T, typename S, int BITS, bool NF4, int N>
static fl_status launch_qgemv_n(cudaStream_t st, T *y, const T *x, const fl_qw &W, const T *bias, uint32_t gmagic) {
    // One row per warp for n <= 2 (the most warps in flight); two for larger n, which reuse each x
    // load for both rows. 8 16-byte loads of codes per lane in flight either way.
    constexpr int RPW = N <= 2 ? 1 : 2, U = 8 / RPW;
    const int64_t warps = (W.R + RPW - 1) / RPW, per_block = QG_THREADS / 32;
    const int64_t blocks = (warps + per_block - 1) / per_block;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "quantised matmul: %lld rows is too many", (long long)W.R);
    FL_LAUNCH(qgemv_kernel<T, S, BITS, NF4, N, RPW, U>, dim3((unsigned)blocks), dim3(QG_THREADS), 0, st, y, x, W,
              bias, gmagic);
    return FL_OK;
}

template <typename T, typename S, int BITS, bool NF4>
static fl_status launch_qgemv(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint32_t gm) {
    switch (n) {
    case 1: return launch_qgemv_n<T, S, BITS, NF4, 1>(st, y, x, W, bias, gm);
    case 2: return launch_qgemv_n<T, S, BITS, NF4, 2>(st, y, x, W, bias, gm);
    case 3: return launch_qgemv_n<T, S, BITS, NF4, 3>(st, y, x, W, bias, gm);
    case 4: return launch_qgemv_n<T, S, BITS, NF4, 4>(st, y, x, W, bias, gm);
    case 5: return launch_qgemv_n<T, S, BITS, NF4, 5>(st, y, x, W, bias, gm);
    case 6: return launch_qgemv_n<T, S, BITS, NF4, 6>(st, y, x, W, bias, gm);
    case 7: return launch_qgemv_n<T, S, BITS, NF4, 7>(st, y, x, W, bias, gm);
    default: return launch_qgemv_n<T, S, BITS, NF4, 8>(st, y, x, W, bias, gm);
    }
}

template <typename T, typename S>
static fl_status launch_qgemv_fmt(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias,
                                  uint32_t gm) {
    if (W.bits == 8) return launch_qgemv<T, S, 8, false>(st, y, x, n, W, bias, gm);
    if (W.code == FL_QCODE_NF4) return launch_qgemv<T, S, 4, true>(st, y, x, n, W, bias, gm);
    return launch_qgemv<T, S, 4, false>(st, y, x, n, W, bias, gm);
}

#define QMMA_WARPS 8  /* default; FASTLOAD_QMMA_WARPS=4 picks 4 */
#define QMMA_U 4

template <typename T, typename S, int BITS, bool ZEROS>
static fl_status launch_qmma(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint32_t cm) {
    const int64_t blocks = (W.R + 15) / 16;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "quantised matmul: %lld rows is too many", (long long)W.R);
    // Warps per 16-row tile: FASTLOAD_QMMA_WARPS=4|8 (read once; 16 measured slower: 227 vs 310 tok/s int4, and was dropped
    // to keep the build short). ncu on the H200 (2026-12-01): with 4 warps the
    // 16-row tiles of a 3584-row weight are 224 blocks on 132 SMs, ~10% achieved occupancy and 18% of DRAM bandwidth
    // for down_proj; more warps per tile put more of each long row in flight.
    // FASTLOAD_QMMA_EARLY=0|1 (default 1): whether each warp's first codes are requested before fl_pdl_wait, during
    // the previous kernel's tail (A/B knob, read once).
    static int warps = -1, early = 1;
    if (warps < 0) {
        const char *e = getenv("FASTLOAD_QMMA_WARPS");
        warps = e && !strcmp(e, "4") ? 4 : QMMA_WARPS;
        e = getenv("FASTLOAD_QMMA_EARLY");
        early = e && !strcmp(e, "0") ? 0 : 1;
    }
    if (warps == 4)
        FL_LAUNCH(qgemv_mma_kernel<T, S, BITS, ZEROS, 4, QMMA_U>, dim3((unsigned)blocks), dim3(4 * 32), 0, st, y, x, W,
                  bias, n, cm, early);
    else
        FL_LAUNCH(qgemv_mma_kernel<T, S, BITS, ZEROS, 8, QMMA_U>, dim3((unsigned)blocks), dim3(8 * 32), 0, st, y, x, W,
                  bias, n, cm, early);
    return FL_OK;
}

// qgemv_imma8_kernel for n in 3..8 (FASTLOAD_QMMA_INT=0 keeps qgemv_mma_kernel there): x to int16 planes (qx_prep_kernel,
// FL_QMX form; prep = false: the op before wrote them) in the dp2a workspace (c->qxq, grown by the caller), then the GEMV.
template <typename T, typename S, int BITS, bool ZEROS, int WARPS, int U, int TILES, bool NF = false, bool HALF = false,
          int STAGES = 0, int MINB = 1>
static fl_status launch_qimma8_cfg(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint4 *xp,
                               float2 *xd, bool prep = true) {
    constexpr int CPC = fl_qchunk_cols(BITS);
    const int64_t pblocks = ((int64_t)n * (W.C / 8) + QD_THREADS - 1) / QD_THREADS;  // one thread per 8 columns
    const int64_t blocks = (W.R + 16 * TILES - 1) / (16 * TILES);
    if (blocks > INT32_MAX || pblocks > INT32_MAX)
        return fl_err(FL_E_VALUE, "quantised matmul: %lld x %lld is too large", (long long)W.R, (long long)W.C);
    const uint64_t gp = qimma_gparam(W, HALF);
    if (prep)
        FL_LAUNCH((qx_prep_kernel<T, BITS | FL_QMX>), dim3((unsigned)pblocks), dim3(QD_THREADS), 0, st, (int16_t *)xp, xd,
                  x, (const int32_t *)nullptr, n, W.C);
    auto kernel = qgemv_imma8_kernel<T, S, BITS, ZEROS, WARPS, U, TILES, NF, HALF, STAGES, MINB>;
    constexpr size_t smem = (size_t)WARPS * STAGES * U * TILES * 2 * 32 * sizeof(uint4);
    if (smem > 0)  // dynamic + static past 48 KB needs it; per device, so every launch (allowed while capturing)
        FL_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    FL_LAUNCH(kernel, dim3((unsigned)blocks), dim3(WARPS * 32), smem, st, y, (const uint4 *)xp, (const float2 *)xd, W, bias,
              n, gp);
    return FL_OK;
}

// The configuration per shape: w<warps>u<chunks a warp a step>t<16-row tiles a block>, b<blocks an SM the registers
// must allow>, r<ring stages> (H200, dev/cuda/qmma_bench.cu, n = 8, us; re-measured after the index arithmetic was cut,
// twenty-first session: benchmarks/results/imma8-index-2026-12-04-h200/). The kernel is latency-bound (ncu: 0.44
// instructions issued a cycle a scheduler at 16 warps an SM, before the cut), so what counts is warps an SM and x
// fragments shared by tiles; registers decide warps an SM (a w8 kernel at 129..136 registers runs 1 block an SM instead
// of 2), hence the explicit caps (ptxas: no spills at these caps but w8u1t2b3, 16 bytes, and 8-bit w8u4t1b3, 8).
//   4-bit integer codes (Qwen2.5-7B int4 g128): rows of C >= 8192 columns: w16u1t2 (down 14.8 against 17.8 for w8u4t2);
//   fewer 32-row blocks than SMs: w16u2t2 (o 4.5 against 4.6); all 16-row blocks resident at 3 an SM: w8u2t2b2
//   (q|k|v 6.0 against 7.3 for w8u2t1b3); else w8u1t2b3 (gate|up 26.1 against 26.8 for w8u2t2b2).
//   NF4 in 64-column groups (HALF: twice the mma and accumulators): C >= 8192: w16u1t2 (down 23.1); fewer blocks than
//   SMs: w16u2t2 (o 7.0 against 7.7 for w8u4t1b2); all blocks resident at 3 an SM: w8u4t1b2 (q|k|v 10.1); else
//   w4u1t2r4b4, the codes through a 4-stage shared-memory ring (gate|up 39.8 against 41.6 for w8u2t2b2).
//   NF4 in groups of whole chunks takes the integer codes' rules (not measured apart).
//   8-bit codes: C >= 8192 or fewer blocks than SMs: w16u2t2 (down 21.3, where the f16 / bf16 kernel takes 32.6); all
//   blocks resident at 3 an SM: w8u2t2b2 (q|k|v 8.2); LM heads (over 24 waves of 16-row blocks): w8u4t1b3 (141.0
//   against 143.2 for w8u2t2); else w8u2t1b3 (gate|up 39.4 against 39.9).
// Split-K (the rows' chunks over 2..4 blocks, the last block of a row summing the partials) was slower everywhere
// (gate|up 57 / 77 us at 2 / 4 slices) and is not kept.
template <typename T, typename S, int BITS, bool ZEROS, bool NF = false, bool HALF = false>
static fl_status launch_qimma8(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint4 *xp,
                               float2 *xd, int n_sm, bool prep = true) {
    const bool few_blocks = (W.R + 31) / 32 < n_sm, one_wave = (W.R + 15) / 16 <= 3 * (int64_t)n_sm;
#define FL_QIMMA(WARPS, U, TILES, STAGES, MINB)                                                                        \
    return launch_qimma8_cfg<T, S, BITS, ZEROS, WARPS, U, TILES, NF, HALF, STAGES, MINB>(st, y, x, n, W, bias, xp, xd, \
                                                                                         prep)
    if constexpr (BITS == 8) {
        if (W.C >= 8192 || few_blocks) FL_QIMMA(16, 2, 2, 0, 1);
        if (one_wave) FL_QIMMA(8, 2, 2, 0, 2);
        if ((W.R + 15) / 16 > 24 * (int64_t)n_sm) FL_QIMMA(8, 4, 1, 0, 3);
        FL_QIMMA(8, 2, 1, 0, 3);
    } else if constexpr (HALF) {
        if (W.C >= 8192) FL_QIMMA(16, 1, 2, 0, 1);
        if (few_blocks) FL_QIMMA(16, 2, 2, 0, 1);
        if (one_wave) FL_QIMMA(8, 4, 1, 0, 2);
        FL_QIMMA(4, 1, 2, 4, 4);
    } else {
        if (W.C >= 8192) FL_QIMMA(16, 1, 2, 0, 1);
        if (few_blocks) FL_QIMMA(16, 2, 2, 0, 1);
        if (one_wave) FL_QIMMA(8, 2, 2, 0, 2);
        FL_QIMMA(8, 1, 2, 0, 3);
    }
#undef FL_QIMMA
}

template <typename T, typename S>
static fl_status launch_qimma8_fmt(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint4 *xp,
                                   float2 *xd, int n_sm, bool prep = true) {
    const bool z = W.m != nullptr;
    if (W.code == FL_QCODE_NF4) {
        if (W.gs % 128 != 0)  // groups of an odd multiple of 64 columns (no offsets: qchunk_ok checks)
            return launch_qimma8<T, S, 4, false, true, true>(st, y, x, n, W, bias, xp, xd, n_sm, prep);
        return z ? launch_qimma8<T, S, 4, true, true>(st, y, x, n, W, bias, xp, xd, n_sm, prep)
                 : launch_qimma8<T, S, 4, false, true>(st, y, x, n, W, bias, xp, xd, n_sm, prep);
    }
    if (W.bits == 8)
        return z ? launch_qimma8<T, S, 8, true>(st, y, x, n, W, bias, xp, xd, n_sm, prep)
                 : launch_qimma8<T, S, 8, false>(st, y, x, n, W, bias, xp, xd, n_sm, prep);
    return z ? launch_qimma8<T, S, 4, true>(st, y, x, n, W, bias, xp, xd, n_sm, prep)
             : launch_qimma8<T, S, 4, false>(st, y, x, n, W, bias, xp, xd, n_sm, prep);
}

template <typename T, typename S>
static fl_status launch_qmma_fmt(cudaStream_t st, T *y, const T *x, int n, const fl_qw &W, const T *bias, uint32_t cm) {
    const bool z = W.m != nullptr;
    if (W.bits == 8) return z ? launch_qmma<T, S, 8, true>(st, y, x, n, W, bias, cm) : launch_qmma<T, S, 8, false>(st, y, x, n, W, bias, cm);
    return z ? launch_qmma<T, S, 4, true>(st, y, x, n, W, bias, cm) : launch_qmma<T, S, 4, false>(st, y, x, n, W, bias, cm);
}

// The configuration of one weight's GEMV: cfg 0..6 = r4u2 r4u1 r8u1 r2u4 r8u1w4 r4u4 r2u2 (-1: auto), gpb row groups
// a block (0: the default). FASTLOAD_QDP_CFG sets them per code width (4 / 8 bits) and class of matrix (qdp_class:
// small, big = 16 MiB of codes or more, long = rows of more than 4096 bytes of codes), for measurements (cuda_backend.cu).
// 0 small (q|k|v, o), 1 big (gate|up, the LM head), 2 long rows (down_proj)
static int qdp_class(const fl_qw &W) { return W.rb > 4096 ? 2 : W.R * W.rb >= ((int64_t)16 << 20) ? 1 : 0; }
static QdpPick qdp_pick(const fl_cuda_impl *c, const fl_qw &W) {
    const int b = W.bits == 8, k = qdp_class(W);
    return {c->qdp_cfg[b][k], c->qdp_gpb[b][k]};
}

// Whether the MOE form takes expert view W in x form qb (any number of slots an expert: N at a time).
static bool qdp_moe_ok(const fl_qw &W, int qb) {
    if (W.s32 || W.perm) return false;
    if (W.code == FL_QCODE_NF4) return !W.m && qb == (4 | FL_QX8 | FL_QXN);
    if (W.bits == 4) return W.m && qb == (4 | FL_QX8);
    return W.bits == 8 && !W.m && qb == 8;
}

// The dp2a GEMV's x in c->qxq: xq [rows, C] int16 (int8 forms use its first half), then xd [rows, C / 16] float2; rows
// FL_GEMV_MAX_N_Q for the dense GEMVs, the slots' x rows for MoE experts (fl_cuda_moe_qgemv) where they are more.
static int16_t *qdp_xq(fl_cuda_impl *c) { return (int16_t *)c->qxq; }
static float2 *qdp_xd(fl_cuda_impl *c, int64_t C, int rows = FL_GEMV_MAX_N_Q) {
    return (float2 *)((char *)c->qxq + (size_t)rows * (size_t)C * 2);
}

// The x form the dp2a GEMV takes for W (fl_qx_store8's QB, which the ops that write x for it use too): int8
// (FL_QX8) for weights whose rows are whole 32-column blocks (the amax block of the int8 form; NF4 then uses its
// int8 code book, qdot_nf4_vec8, on x in natural column order, FL_QXN) when FASTLOAD_CUDA_QDOT asks for it: auto (the
// default) for 4-bit codes, int8 for all; else int16 (see FL_QX8_AUTO).
static int qdp_qb(const fl_cuda_impl *c, const fl_qw &W) {
    const bool x8 = c->qx8 == FL_QX8_ALL || (c->qx8 == FL_QX8_AUTO && W.bits == 4);
    if (!x8 || W.C % 32 != 0) return W.bits;
    return W.bits | FL_QX8 | (W.code == FL_QCODE_NF4 ? FL_QXN : 0);
}

// The dp2a GEMV's group index by multiply-high: vectors of 32 (4-bit) or 16 (8-bit) codes a group; exact because
// nv * vpg <= 2^32 (qdp_ok).
static uint32_t qdp_gmagic(const fl_qw &W) { return div_magic((uint32_t)(W.gs / (W.bits == 4 ? 32 : 16))); }

// x prepared for the dp2a GEMV in form qb (fl_qx_dispatch): n rows of W.C columns, gathered by perm when not NULL,
// into c->qxq (grown by the caller for `rows` rows, qdp_xd).
template <typename T>
static fl_status launch_qdp_prep(fl_cuda_impl *c, const fl_qw &W, int qb, const T *x, const int32_t *perm, int n,
                                 const char *what, int rows = FL_GEMV_MAX_N_Q) {
    const int64_t blocks = ((int64_t)n * (W.C / 8) + QD_THREADS - 1) / QD_THREADS;  // one thread per 8 columns
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "%s: %d x %lld is too many", what, n, (long long)W.C);
    int16_t *xq = qdp_xq(c);
    float2 *xd = qdp_xd(c, W.C, rows);
    return fl_qx_dispatch(qb, what, [&](auto QB) -> fl_status {
        FL_LAUNCH((qx_prep_kernel<T, decltype(QB)::value>), dim3((unsigned)blocks), dim3(QD_THREADS), 0, c->stream, xq,
                  xd, x, perm, n, W.C);
        return FL_OK;
    });
}

// The dp2a GEMV (see qgemv_dp_kernel): prep x (gathered by perm when the weight has one), then the GEMV.
// The caller has checked the layout (qdp_ok) and grown c->qxq (qdp_ws_bytes). x_ready: the op before
// (RMSNorm / SwiGLU through fl_cuda_qx_target) has already written x there, so there is no prep.
template <typename T>
static fl_status qgemv_dp_t(fl_cuda_impl *c, T *y, const T *x, int n, const fl_qw &W, const T *bias, bool x_ready) {
    cudaStream_t st = c->stream;
    const uint32_t gm = qdp_gmagic(W);
    int16_t *xq = qdp_xq(c);
    float2 *xd = qdp_xd(c, W.C);
    const int qb = qdp_qb(c, W);
    if (!x_ready) FL_TRY(launch_qdp_prep<T>(c, W, qb, x, W.perm, n, "quantised matmul"));
    const QdpPick pk = qdp_pick(c, W);
    return fl_qdp_gemv(st, y, xq, xd, W, bias, gm, n, pk, qb);
}

static fl_status qgemv_dp(fl_cuda_impl *c, fl_dtype act, void *y, const void *x, int n, const fl_qw &W,
                          const void *bias, bool x_ready) {
    if (act == FL_BF16)
        return qgemv_dp_t<__nv_bfloat16>(c, (__nv_bfloat16 *)y, (const __nv_bfloat16 *)x, n, W, (const __nv_bfloat16 *)bias, x_ready);
    if (act == FL_F16) return qgemv_dp_t<__half>(c, (__half *)y, (const __half *)x, n, W, (const __half *)bias, x_ready);
    return fl_err(FL_E_INTERNAL, "quantised matmul: the dp2a GEMV needs 16-bit activations");
}

static size_t qdp_ws_bytes(int64_t C, int rows = FL_GEMV_MAX_N_Q) {  // qdp_xq, qdp_xd
    return (size_t)rows * (size_t)C * 2 + (size_t)rows * (size_t)(C / 16) * sizeof(float2);
}
static fl_status qdp_grow(fl_backend *be, int64_t C, const char *what, int rows = FL_GEMV_MAX_N_Q) {
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    return fl_cuda_grow(be, &c->qxq, &c->qxq_bytes, qdp_ws_bytes(C, rows), what);
}

// Whether the dp2a GEMV takes this weight: integer codes, 16-bit activations, whole aligned 16-byte
// vectors, groups of whole vectors, the group index exact by multiply-high.
static bool qdp_ok(fl_dtype act, const fl_qw &W, const void *x) {
    const int vc = W.bits == 4 ? 32 : 16;
    return (act == FL_F16 || act == FL_BF16) && (W.code == FL_QCODE_INT || (W.code == FL_QCODE_NF4 && W.bits == 4)) &&
           W.gs % vc == 0 && W.rb % 16 == 0 &&
           fl_is_aligned16(W.q) && fl_is_aligned16(x) && fl_cuda_cc_major() >= 7 &&
           (uint64_t)(W.C / vc) * (uint64_t)(W.gs / vc) <= (1ull << 32);
}

// The dp2a GEMV's layout conditions and the kernel choice (FASTLOAD_QGEMV) allow it for this weight ...
static bool qdp_layout(const fl_cuda_impl *c, fl_dtype act, const fl_qw &W, const void *x) {
    return qdp_ok(act, W, x) && (c->qgemv_variant == FL_QGEMV_AUTO || c->qgemv_variant == FL_QGEMV_DP);
}
// ... and at this many token rows.
static bool qdp_at(const fl_cuda_impl *c, const fl_qw &W, int n) {
    const int up_to = c->qgemv_up_to < 0 ? FL_QGEMV_UP_TO : c->qgemv_up_to;
    if (W.code == FL_QCODE_NF4) return n <= up_to && n <= 2;  // NF4 kernels are built for 1 and 2 rows only
    return n <= up_to && n <= FL_GEMV_MAX_N_Q && (n <= FL_QDP_UP_TO || c->qgemv_variant == FL_QGEMV_DP);
}

// qgemv's kernel conditions (x in the codes' column order, n <= FL_GEMV_MAX_N_Q). The fast kernels: 16-bit
// activations, whole aligned 16-byte code vectors, the group index exact by multiply-high (multiply-high by
// ceil(2^32 / gs16) is floor(sub / gs16) for every sub-block index sub when (C / 16) * gs16 <= 2^32, error term below
// 1 / gs16; larger rows take the generic kernel).
static bool qgemv_fast(const fl_cuda_impl *c, fl_dtype act, const fl_qw &W, const void *x) {
    const uint32_t gs16 = (uint32_t)(W.gs / 16);
    const bool magic_ok = (uint64_t)(W.C / 16) * (uint64_t)gs16 <= (1ull << 32);
    return (act == FL_F16 || act == FL_BF16) && W.rb % 16 == 0 && fl_is_aligned16(W.q) && fl_is_aligned16(x) &&
           magic_ok && c->qgemv_variant != FL_QGEMV_GENERIC;
}
// The tensor-core kernels take codes whose groups are whole 64-byte chunks of a row (128 columns of 4-bit codes, 64 of
// 8-bit), sm_80+; NF4 without offsets in groups of an odd multiple of 64 columns (NF4's usual 64) also fit, as half
// chunks (qgemv_imma8_kernel's HALF). FASTLOAD_QGEMV=fma|generic|dp: never.
static bool qchunk_ok(const fl_cuda_impl *c, fl_dtype act, const fl_qw &W, const void *x) {
    const int cpc = fl_qchunk_cols(W.bits);
    const bool whole = W.gs % cpc == 0;
    const bool nf_half = !whole && W.code == FL_QCODE_NF4 && W.bits == 4 && !W.m && W.gs % 64 == 0;
    return qgemv_fast(c, act, W, x) && (whole || nf_half) && fl_cuda_cc_major() >= 8 &&
           (uint64_t)(whole ? W.rb / 64 : W.rb / 32) * (uint64_t)(W.gs / (whole ? cpc : 64)) <= (1ull << 32) &&
           (c->qgemv_variant == FL_QGEMV_MMA || c->qgemv_variant == FL_QGEMV_AUTO);
}
// Integer codes take the f16 / bf16 tensor-core kernel at every n (qgemv_mma_kernel) and, at 3..8 rows, the integer one
// (qgemv_imma8_kernel; FASTLOAD_QMMA_INT=0: not) when the rows are whole chunks (H200, n = 8: int8 down 21.3 us on
// imma8, 32.6 on the f16 / bf16 kernel); NF4 codes too, through the int8 code book (with FASTLOAD_QMMA_INT=0 the FMA
// kernel and its exact code book). Its x planes (FL_QMX) live in the dp2a workspace.
static bool qimma_at(const fl_cuda_impl *c, fl_dtype act, const fl_qw &W, const void *x, int n) {
    const int cpc = fl_qchunk_cols(W.bits);
    return qchunk_ok(c, act, W, x) && (W.code == FL_QCODE_INT || (W.code == FL_QCODE_NF4 && W.bits == 4)) &&
           n > FL_QDP_UP_TO && c->qmma_int && W.C % cpc == 0 &&
           W.rb < (1 << 26) && W.ng < (1 << 26);  // the kernel's chunk and group indices are 32-bit
}

fl_status fl_cuda_qx_target(fl_backend *be, const fl_weight *next, const void *x, int n, int64_t cols, fl_qx_dst *dst) {
    dst->bits = 0;
    dst->xq = NULL;
    dst->xd = NULL;
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    if (!next || next->dtype != FL_QUANT || !c->qx_fuse || n <= 0) return FL_OK;
    if (fl_cuda_qcheck(next, "matmul") != FL_OK) {  // the matmul itself will report it
        fl_err_clear();
        return FL_OK;
    }
    const fl_qw W = qw_of(next);
    if (W.perm || W.C != cols || cols % 8 != 0) return FL_OK;
    // the path fl_cuda_qmatmul will take: the dp2a GEMV, else at 3..8 rows the integer tensor-core one
    const int up_to = c->qgemv_up_to < 0 ? FL_QGEMV_UP_TO : c->qgemv_up_to;
    int qb = 0;
    if (qdp_layout(c, be->act, W, x) && qdp_at(c, W, n)) qb = qdp_qb(c, W);
    else if (n <= up_to && n <= FL_GEMV_MAX_N_Q && qimma_at(c, be->act, W, x, n)) qb = W.bits | FL_QMX;
    if (!qb) return FL_OK;
    FL_TRY(qdp_grow(be, W.C, "quantised matmul (int16 x)"));
    dst->bits = qb;
    dst->xq = qdp_xq(c);
    dst->xd = qdp_xd(c, W.C);
    return FL_OK;
}

void fl_cuda_qx_written(fl_backend *be, const fl_weight *next, const void *x, int n, int qb) {
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    c->qx_seq = c->op_seq;
    c->qx_x = x;
    c->qx_q = next->data_d;
    c->qx_n = n;
    c->qx_qb = qb;
}

static cudaDataType_t qcuda_type(fl_dtype t) { return t == FL_F16 ? CUDA_R_16F : t == FL_BF16 ? CUDA_R_16BF : CUDA_R_32F; }

// The GEMV for n in 1..FL_GEMV_MAX_N_Q; x already in the codes' column order. x_ready: the op before wrote the integer
// tensor-core GEMV's x planes (FL_QMX form, fl_cuda_qx_target), so it has no prep.
static fl_status qgemv(fl_backend *be, void *y, const void *x, int n, const fl_qw &W, const void *bias, bool x_ready) {
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    const fl_dtype act = be->act;
    cudaStream_t st = c->stream;
    const uint32_t gs16 = (uint32_t)(W.gs / 16);
    const uint32_t gm = div_magic(gs16);
    const bool fast = qgemv_fast(c, act, W, x);
    // integer codes: the f16 / bf16 tensor-core kernel at every n (FASTLOAD_QGEMV=fma: the FMA kernel), the integer
    // one at 3..8 rows (qimma_at)
    const bool use_mma = qchunk_ok(c, act, W, x) && W.code == FL_QCODE_INT;
    const bool use_imma = qimma_at(c, act, W, x, n);
    if (use_imma) FL_TRY(qdp_grow(be, W.C, "quantised matmul (int16 x)"));
    const int cpc = fl_qchunk_cols(W.bits);
    const uint32_t cpg = (uint32_t)(W.gs / cpc);
    const uint32_t cm = div_magic(cpg);  // exact: chunk indices < 2^32 / cpg
    FL_CUDA_DISPATCH(act, T, {
        T *yt = (T *)y;
        const T *xt = (const T *)x, *bt = (const T *)bias;
        if constexpr (sizeof(T) == 2) {
            if (use_imma) {
                uint4 *xp = (uint4 *)qdp_xq(c);
                float2 *xd = qdp_xd(c, W.C);
                if (W.s32) return launch_qimma8_fmt<T, float>(st, yt, xt, n, W, bt, xp, xd, c->n_sm, !x_ready);
                return launch_qimma8_fmt<T, __half>(st, yt, xt, n, W, bt, xp, xd, c->n_sm, !x_ready);
            }
            if (use_mma) {
                if (W.s32) return launch_qmma_fmt<T, float>(st, yt, xt, n, W, bt, cm);
                return launch_qmma_fmt<T, __half>(st, yt, xt, n, W, bt, cm);
            }
            if (fast) {
                if (W.s32) return launch_qgemv_fmt<T, float>(st, yt, xt, n, W, bt, gm);
                return launch_qgemv_fmt<T, __half>(st, yt, xt, n, W, bt, gm);
            }
        }
        const int64_t blocks = (W.R + QG_THREADS / 32 - 1) / (QG_THREADS / 32);
        if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "quantised matmul: %lld rows is too many", (long long)W.R);
        FL_LAUNCH(qgemv_generic_kernel<T>, dim3((unsigned)blocks), dim3(QG_THREADS), 0, st, yt, xt, W, bt, n,
                  fl_is_aligned16(W.q));
    });
    return FL_OK;
}

fl_status fl_cuda_qmatmul(fl_backend *be, void *y, const void *x, int n, const fl_weight *Wt, const void *bias) {
    FL_TRY(fl_cuda_qcheck(Wt, "matmul"));
    if (n <= 0 || Wt->rows <= 0) return FL_OK;
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    const fl_dtype act = be->act;
    if (act != FL_F16 && act != FL_BF16 && act != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "CUDA quantised matmul: activation dtype %s", fl_cuda_dtype_name(act));
    const fl_qw W = qw_of(Wt);
    // x already written for the dp2a GEMV by the op just before this one (fl_cuda_qx_target), for this weight
    // (qx_qb: the form written, which fl_cuda_qx_target chose by the same rules as the path below)
    const bool x_ready = c->qx_seq != 0 && c->qx_seq + 1 == c->op_seq && c->qx_x == x && c->qx_q == (const void *)W.q &&
                         c->qx_n == n;
    const int x_qb = x_ready ? c->qx_qb : 0;
    c->qx_seq = 0;
    const size_t es = (size_t)fl_dtype_size(act);
    const int up_to = c->qgemv_up_to < 0 ? FL_QGEMV_UP_TO : c->qgemv_up_to;
    // Act-order weights need x in the codes' column order for the GEMV. The workspace for it is grown
    // to FL_GEMV_MAX_N_Q rows whatever n is, so the prefill (n large, which does not use it) already
    // leaves it large enough for the decode steps captured after it.
    if (W.perm) {
        FL_TRY(fl_cuda_grow(be, &c->qx, &c->qx_bytes, (size_t)FL_GEMV_MAX_N_Q * (size_t)W.C * es,
                            "quantised matmul (act-order x)"));
    }
    // The dp2a GEMV (default for integer codes at n <= FL_QDP_UP_TO, the tensor-core kernel above; FASTLOAD_QGEMV=dp
    // forces it at every n, mma|fma|generic the others): its x workspace is grown at every call whatever n is.
    const bool dp = qdp_layout(c, act, W, x);
    if (dp) FL_TRY(qdp_grow(be, W.C, "quantised matmul (int16 x)"));
    if (dp && qdp_at(c, W, n)) {
        const bool ready = x_qb == qdp_qb(c, W);
        if (ready) be->fused_inputs++;
        return qgemv_dp(c, act, y, x, n, W, bias, ready);
    }
    if (n <= up_to && n <= FL_GEMV_MAX_N_Q) {
        const void *xs = x;
        if (W.perm) {
            FL_CUDA_DISPATCH(act, T, {
                FL_LAUNCH(qgather_kernel<T>, dim3(grid_for((int64_t)n * W.C, QD_THREADS, c->n_sm)), dim3(QD_THREADS), 0,
                          c->stream, (T *)c->qx, (const T *)x, W.perm, n, W.C);
            });
            xs = c->qx;
        }
        const bool ready = !W.perm && x_qb == (W.bits | FL_QMX) && qimma_at(c, act, W, xs, n);
        if (ready) be->fused_inputs++;
        return qgemv(be, y, xs, n, W, bias, ready);
    }

    // Prefill: dequantised row chunks + cuBLAS.
    if (W.R > INT32_MAX || W.C > INT32_MAX)
        return fl_err(FL_E_VALUE, "quantised matmul: %lld x %lld is beyond cuBLAS' int sizes", (long long)W.R,
                      (long long)W.C);
    const size_t row_bytes = (size_t)W.C * es;
    int64_t chunk = (int64_t)(FL_QDEQ_CHUNK_BYTES / row_bytes);
    // Whole multiples of 256 rows: a chunk of odd rows (gate|up of a 7B: 256 MiB / 7168 B = 37449) sent cuBLAS to an
    // sm75 "align1" CUTLASS kernel, 7.5 ms where the aligned GEMM takes ~0.4 ms (ncu on the H200, 2026-12-01).
    if (chunk >= 256) chunk -= chunk % 256;
    if (chunk < 1) chunk = 1;
    if (chunk > W.R) chunk = W.R;
    FL_TRY(fl_cuda_grow(be, &c->qws, &c->qws_bytes, (size_t)chunk * row_bytes, "quantised matmul (dequantised rows)"));
    const float alpha = 1.f, beta = 0.f;
    const cudaDataType_t t = qcuda_type(act);
    const bool vec = fl_is_aligned16(W.q);
    for (int64_t r0 = 0; r0 < W.R; r0 += chunk) {
        const int64_t rows = W.R - r0 < chunk ? W.R - r0 : chunk;
        const int64_t nsub = W.C / 16;
        const dim3 grid((unsigned)((nsub + QD_THREADS - 1) / QD_THREADS), (unsigned)(rows < 65535 ? rows : 65535));
        FL_CUDA_DISPATCH(act, T, {
            FL_LAUNCH(qdequant_kernel<T>, grid, dim3(QD_THREADS), 0, c->stream, (T *)c->qws, W, r0, rows, vec);
        });
        FL_CUBLAS_CHECK(cublasGemmEx(c->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)rows, n, (int)W.C, &alpha, c->qws, t,
                                     (int)W.C, x, t, (int)W.C, &beta, (char *)y + (size_t)r0 * es, t, (int)W.R,
                                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    }
    if (bias) {
        FL_CUDA_DISPATCH(act, T, {
            FL_LAUNCH(qadd_bias_kernel<T>, dim3(grid_for((int64_t)n * W.R, QD_THREADS, c->n_sm)), dim3(QD_THREADS), 0,
                      c->stream, (T *)y, (const T *)bias, n, W.R);
        });
    }
    return FL_OK;
}

// The x form the MoE dp2a path takes for expert view V (n_x rows of x at x, at most per_expert slots an expert), 0 when
// the float kernel runs instead (FASTLOAD_MOE_QDP=0, other layouts, more than FL_MOE_QDP_MAX_X x rows).
static int moe_qdp_form(const fl_cuda_impl *c, fl_dtype act, const fl_qw &V, const void *x, int n_x, int per_expert) {
    const int qb = qdp_qb(c, V);
    const bool ok = c->moe_qdp && n_x >= 1 && n_x <= FL_MOE_QDP_MAX_X && per_expert >= 1 && qdp_layout(c, act, V, x) &&
                    qdp_moe_ok(V, qb);
    return ok ? qb : 0;
}
static int moe_x_rows(int n_x) { return n_x > FL_GEMV_MAX_N_Q ? n_x : FL_GEMV_MAX_N_Q; }  // qdp_xd's rows

fl_status fl_cuda_moe_qx_target(fl_backend *be, const fl_weight *Wt, int64_t R, const void *x, int n_x, int per_expert,
                                fl_qx_dst *dst) {
    dst->bits = 0;
    dst->xq = NULL;
    dst->xd = NULL;
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    if (!c->qx_fuse || R <= 0 || fl_cuda_qcheck(Wt, "moe (quantised experts)") != FL_OK) {  // moe_qgemv reports it
        fl_err_clear();
        return FL_OK;
    }
    const fl_qw V = expert_view(Wt, R);
    const int qb = moe_qdp_form(c, be->act, V, x, n_x, per_expert);
    if (!qb || V.C % fl_qx_cols(qb) != 0) return FL_OK;
    FL_TRY(qdp_grow(be, V.C, "moe (quantised experts' x)", moe_x_rows(n_x)));
    dst->bits = qb;
    dst->xq = qdp_xq(c);
    dst->xd = qdp_xd(c, V.C, moe_x_rows(n_x));
    return FL_OK;
}

// The MoE dp2a GEMV for activation dtype T (a template: FL_CUDA_DISPATCH's float32 case names it in a discarded branch).
template <typename T>
static fl_status qdp_moe_t(fl_cuda_impl *c, T *y, const fl_qw &V, int per_expert, const QdpMoe &mo, int max_active,
                           int rows) {
    return fl_qdp_moe(c->stream, y, qdp_xq(c), qdp_xd(c, V.C, rows), V, qdp_gmagic(V), per_expert, mo, max_active,
                      c->moe_qdp_rows == 4);
}

fl_status fl_cuda_moe_qgemv(fl_backend *be, void *y, const void *x, int n_x, int per_expert, const int32_t *slot_perm,
                            int x_div, const int32_t *offs, int E, int max_active, const fl_weight *Wt, int64_t R,
                            bool x_ready) {
    FL_TRY(fl_cuda_qcheck(Wt, "moe (quantised experts)"));
    if (Wt->perm_d)
        return fl_err(FL_E_UNSUPPORTED, "CUDA moe: act-order (g_idx) expert weights are not supported");
    if (Wt->rows != (int64_t)E * R)
        return fl_err(FL_E_INTERNAL, "CUDA moe: expert weight of %lld rows does not hold %d experts of %lld",
                      (long long)Wt->rows, E, (long long)R);
    if (R <= 0 || max_active <= 0) return FL_OK;
    if (max_active > E) max_active = E;
    const int64_t bx = (R + QG_THREADS / 32 - 1) / (QG_THREADS / 32);
    if (bx > INT32_MAX || max_active > 65535 || Wt->cols > INT32_MAX)
        return fl_err(FL_E_VALUE, "CUDA moe: [%lld, %lld] experts are too large", (long long)R, (long long)Wt->cols);
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    // The dp2a GEMV (FASTLOAD_MOE_QDP=1, the default) where it has the layout: x quantised once (n_x rows, as the
    // dense decode GEMV takes it; x_ready: the op before wrote it, fl_cuda_moe_qx_target), then every active expert's
    // rows read once for its (at most per_expert) slots, N at a time (qdp.cuh's launch_qdp_moe).
    const fl_qw V = expert_view(Wt, R);
    const int qb = moe_qdp_form(c, be->act, V, x, n_x, per_expert);
    if (qb) {
        if (x_ready) be->fused_inputs++;
        const int rows = moe_x_rows(n_x);
        FL_TRY(qdp_grow(be, V.C, "moe (quantised experts' x)", rows));
        const QdpMoe mo = {offs, slot_perm, x_div, E};
        FL_CUDA_DISPATCH(be->act, T, {
            if constexpr (sizeof(T) == 2) {
                if (!x_ready)
                    FL_TRY(launch_qdp_prep<T>(c, V, qb, (const T *)x, nullptr, n_x, "moe (quantised experts)", rows));
                return qdp_moe_t(c, (T *)y, V, per_expert, mo, max_active, rows);
            }
        });
    }
    // else the float kernel on the whole stack (W: every expert's rows; R a stride)
    const fl_qw W = qw_of(Wt);
    const dim3 grid((unsigned)bx, (unsigned)max_active);
    // x rows start at multiples of C elements (C % 16 == 0: fl_cuda_qcheck), so one aligned base makes every
    // 16-column piece 16-byte aligned
    const bool xv = fl_is_aligned16(x);
    FL_CUDA_DISPATCH(be->act, T, {
        if (xv)
            FL_LAUNCH(qmoe_gemv_kernel<T, true>, grid, dim3(QG_THREADS), 0, c->stream, (T *)y, (const T *)x, slot_perm,
                      x_div, offs, E, W, R, fl_is_aligned16(W.q));
        else
            FL_LAUNCH(qmoe_gemv_kernel<T, false>, grid, dim3(QG_THREADS), 0, c->stream, (T *)y, (const T *)x, slot_perm,
                      x_div, offs, E, W, R, fl_is_aligned16(W.q));
    });
    return FL_OK;
}

fl_status fl_cuda_qembed(fl_backend *be, void *x, const int32_t *tok, int n, const fl_weight *emb) {
    FL_TRY(fl_cuda_qcheck(emb, "embed"));
    if (n <= 0) return FL_OK;
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    const fl_qw W = qw_of(emb);
    FL_CUDA_DISPATCH(be->act, T, {
        FL_LAUNCH(qembed_kernel<T>, dim3((unsigned)n), dim3(QD_THREADS), 0, c->stream, (T *)x, tok, W,
                  fl_is_aligned16(W.q));
    });
    return FL_OK;
}

fl_status fl_cuda_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src,
                           fl_dtype src_dtype) {
    FL_TRY(fl_cuda_qcheck(W, "quantize"));
    const int want_bits = scheme == FL_QS_INT8 ? 8 : 4;
    const int want_code = scheme == FL_QS_NF4 ? FL_QCODE_NF4 : FL_QCODE_INT;
    const bool want_zeros = scheme == FL_QS_INT4;
    if (scheme != FL_QS_INT8 && scheme != FL_QS_INT4 && scheme != FL_QS_NF4)
        return fl_err(FL_E_VALUE, "CUDA quantize: scheme %d is not int8 (1), int4 (2) or nf4 (3)", scheme);
    if (W->bits != want_bits || W->code != want_code || (W->zeros_d != NULL) != want_zeros || W->perm_d)
        return fl_err(FL_E_INTERNAL, "CUDA quantize: the weight's layout (bits %d, code %d, zeros %d, perm %d) is not "
                      "the scheme's", W->bits, W->code, W->zeros_d != NULL, W->perm_d != NULL);
    if (row0 < 0 || rows < 0 || row0 + rows > W->rows)
        return fl_err(FL_E_VALUE, "CUDA quantize: rows [%lld, %lld) outside [0, %lld)", (long long)row0,
                      (long long)(row0 + rows), (long long)W->rows);
    if (rows == 0) return FL_OK;
    fl_cuda_impl *c = fl_cuda_impl_of(be);
    fl_qmid mid;
    for (int i = 0; i < 15; i++) mid.v[i] = (h_nf4[i] + h_nf4[i + 1]) * 0.5f;  // as fl_q_quantize_rows
    const int64_t ng = W->cols / W->group_size, warps = rows * ng, per_block = QD_THREADS / 32;
    const int64_t blocks = (warps + per_block - 1) / per_block;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "CUDA quantize: %lld groups is too many", (long long)warps);
    const int s32 = W->sdtype == FL_F32;
    switch (src_dtype) {
    case FL_F32:
        FL_LAUNCH(qquantize_kernel<float>, dim3((unsigned)blocks), dim3(QD_THREADS), 0, c->stream, (uint8_t *)W->data_d,
                  W->scales_d, W->zeros_d, s32, W->cols, W->group_size, scheme, row0, rows, (const float *)src, mid);
        break;
    case FL_F16:
        FL_LAUNCH(qquantize_kernel<__half>, dim3((unsigned)blocks), dim3(QD_THREADS), 0, c->stream,
                  (uint8_t *)W->data_d, W->scales_d, W->zeros_d, s32, W->cols, W->group_size, scheme, row0, rows,
                  (const __half *)src, mid);
        break;
    case FL_BF16:
        FL_LAUNCH(qquantize_kernel<__nv_bfloat16>, dim3((unsigned)blocks), dim3(QD_THREADS), 0, c->stream,
                  (uint8_t *)W->data_d, W->scales_d, W->zeros_d, s32, W->cols, W->group_size, scheme, row0, rows,
                  (const __nv_bfloat16 *)src, mid);
        break;
    default:
        return fl_err(FL_E_UNSUPPORTED, "CUDA quantize: source dtype %s (float32, float16 or bfloat16)",
                      fl_cuda_dtype_name(src_dtype));
    }
    // a scale that overflowed float16: refused as on the CPU (one small read; the loader waits per batch anyway)
    unsigned long long bad = ~0ull;
    FL_CUDA_CHECK(cudaMemcpyFromSymbolAsync(&bad, g_qoverflow, sizeof bad, 0, cudaMemcpyDeviceToHost, c->stream));
    FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
    if (bad != ~0ull) {
        const unsigned long long reset = ~0ull;
        FL_CUDA_CHECK(cudaMemcpyToSymbolAsync(g_qoverflow, &reset, sizeof reset, 0, cudaMemcpyHostToDevice, c->stream));
        FL_CUDA_CHECK(cudaStreamSynchronize(c->stream));
        return fl_err(FL_E_VALUE, "quantisation at load (%s): row %lld, group %lld holds values beyond what its float16 "
                      "scale can express (int8: |w| < ~8.3e6, nf4: |w| <= 65504, int4: a range < ~9.8e5 and "
                      "|w| <= 65504); load this model without quantisation at load",
                      scheme == FL_QS_INT8 ? "int8" : scheme == FL_QS_INT4 ? "int4" : "nf4", (long long)(bad / ng),
                      (long long)(bad % ng));
    }
    return FL_OK;
}
