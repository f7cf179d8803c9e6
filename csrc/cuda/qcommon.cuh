// qcommon.cuh: what qmatmul.cu and the dp2a GEMV (qdp.cuh, instantiated in qdp_f16.cu and qdp_bf16.cu) share: the
// quantised weight as the kernels see it, device helpers of both, and the dp2a GEMV's entry points.
// Internal to the CUDA backend (qmatmul.cuh is the backend's interface).
#ifndef FL_CUDA_QCOMMON_CUH
#define FL_CUDA_QCOMMON_CUH
#include <stdint.h>

#include "cuda_common.cuh"

// A quantised weight as the kernels see it.
struct fl_qw {
    const uint8_t *q;      // codes [R, rb]
    const void *s, *m;     // scales, offsets (m may be NULL) [R, ng], float16 or float32
    const int32_t *perm;   // [C] or NULL
    int64_t R, C, rb;      // rows, columns, bytes of codes per row
    int bits, gs, code, s32, ng;  // s32: scales are float32; ng: groups per row
};

template <typename S> __device__ __forceinline__ float ld_s(const S *p, int64_t i) { return fl_to_f32(__ldg(p + i)); }

// The table bytes of the 8 codes of word w (byte j: column 2j in the low nibble, 2j + 1 in the high one):
// ev = columns 0, 2, 4, 6 and od = 1, 3, 5, 7 (the x layout of 4-bit codes), from table t (4 words of 4 bytes: code
// c's byte is byte c % 4 of t[c / 4]). prmt picks by each code's low 3 bits among t0|t1 and t2|t3 (idx), then by its
// bit 3 between the two (sel: selector 4..7 takes the second word); two lookups of one word share idx and sel.
// qnf_look_nat: the same bytes in natural order, a = columns 0..3, b = 4..7 (6 prmt a word; qnf_look 8).
__device__ __forceinline__ void qnf_look_nat(uint32_t w, uint32_t t0, uint32_t t1, uint32_t t2, uint32_t t3, uint32_t &a,
                                             uint32_t &b) {
    const uint32_t idx = w & 0x77777777u, sel = 0x32103210u | ((w & 0x88888888u) >> 1);
    a = __byte_perm(__byte_perm(t0, t1, idx), __byte_perm(t2, t3, idx), sel);
    b = __byte_perm(__byte_perm(t0, t1, idx >> 16), __byte_perm(t2, t3, idx >> 16), sel >> 16);
}
__device__ __forceinline__ void qnf_look(uint32_t w, uint32_t t0, uint32_t t1, uint32_t t2, uint32_t t3, uint32_t &ev,
                                         uint32_t &od) {
    uint32_t a, b;
    qnf_look_nat(w, t0, t1, t2, t3, a, b);
    ev = __byte_perm(a, b, 0x6420);
    od = __byte_perm(a, b, 0x7531);
}

// NF4 against int8 x (FASTLOAD_CUDA_QDOT=int8): the code book rounded to int8, t8 = rint(nf4 * 127) (error at most
// 3.7e-3 of the group's scale, code 12; y += s / 127 * dx * dot), one byte table (looked up by qnf_look).
#define QNF8_0 0xcebda881u
#define QNF8_1 0x00f4e9dcu
#define QNF8_2 0x2b1f140au
#define QNF8_3 0x7f5c4738u

// Mixture of Experts decode on the dp2a GEMV: where an active expert's slots and x rows are (qgemv_dp_kernel's MOE form).
struct QdpMoe {
    const int32_t *offs, *slot_perm;
    int x_div, E;
};

// The configuration of one weight's dp2a GEMV (qmatmul.cu's qdp_pick): cfg -1 auto, else the form launch_qdp_n names;
// gpb row groups a block (0: the default).
struct QdpPick {
    int cfg, gpb;
};

// The dp2a GEMV for n <= 8 token rows of x, already quantised in form qb (fl_qx_store8's QB) into xq / xd (qmatmul.cu
// prepares them); gm = qdp_gmagic(W). One overload per activation dtype, each in its own translation unit.
fl_status fl_qdp_gemv(cudaStream_t st, __half *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                      const __half *bias, uint32_t gm, int n, QdpPick pk, int qb);
fl_status fl_qdp_gemv(cudaStream_t st, __nv_bfloat16 *y, const int16_t *xq, const float2 *xd, const fl_qw &W,
                      const __nv_bfloat16 *bias, uint32_t gm, int n, QdpPick pk, int qb);
// Its MoE form: every active expert of the stack W views in one launch (n: the most slots an expert can have;
// rows4: integer codes above 2 slots take 4 rows a pass, else 2).
fl_status fl_qdp_moe(cudaStream_t st, __half *y, const int16_t *xq, const float2 *xd, const fl_qw &W, uint32_t gm, int n,
                     const QdpMoe &mo, int max_active, bool rows4);
fl_status fl_qdp_moe(cudaStream_t st, __nv_bfloat16 *y, const int16_t *xq, const float2 *xd, const fl_qw &W, uint32_t gm,
                     int n, const QdpMoe &mo, int max_active, bool rows4);
#endif
