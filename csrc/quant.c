/* quant.c: conversions into fastload's quantised weight format (quant.h): the layout each GGUF type and each
 * GPTQ / AWQ linear layer converts into, the common layout of fused parts, and the exact repacking of ggml
 * blocks and GPTQ / AWQ tensors into rows of an FL_QUANT weight. (Layout checks and sizes, the reference
 * dequantiser and quantisation at load are in quant_ref.c.)
 *
 * Every source is first decoded, one row at a time, into one intermediate form (qrow): unsigned codes v[cols]
 * (the source's own codes, 0 .. 2^srcbits - 1), a scale s per source group, and either an offset m per group
 * (min form, w = s*v + m) or a constant centre `off` (symmetric, w = s*(v - off)). write_row then stores it in
 * the destination layout, which may be wider than the source's own (fl_q_common_layout):
 *   destination with offsets:  code = v; m as decoded, or m = -s*off for a symmetric source
 *   symmetric destination:     code = v - off + 2^(bits-1)          (the source must be symmetric)
 *   smaller destination group: the source group's s (and m) repeated
 * Why this is exact in float32: in every source s*v has at most 24 significant bits (an fp16 scale has 11, times
 * a code of at most 8 bits; a K-quant scale d*sc has 11 + 6 (Q4_K, Q5_K) or 11 + 7 (Q6_K, |sc| <= 128) bits, times
 * a 4..6-bit code), so s*v is exact and s*v + m rounds once, the same whether a kernel uses fmaf or a multiply
 * and an add; -s*off is a power-of-two multiple of s. ggml's own dequantisers (csrc/gguf.c) form the same exact
 * products and round the same sums, so fl_q_dequant_rows of a repacked row equals fl_ggml_dequant bit for bit.
 * GPTQ / AWQ: w = s*(q - z) with fp16 s and integer q, z is exact in float32 (<= 20 significant bits); it is
 * stored as m = -(s*z) (exact) and s*q + m (s*q exact, one rounding of an exactly representable value).
 * A scale or offset written as fp16 must be representable: write_row checks it and refuses otherwise.
 */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "quant.h"
#include "gguf.h"

#include <stdio.h>
#include <stdlib.h>
#if defined(__F16C__)
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h); /* exact, like the bit-level conversion */
#else
    return fl_f16_to_f32(h);
#endif
}
static inline uint16_t ld16(const void *p, size_t i) { uint16_t v; memcpy(&v, (const char *)p + 2 * i, 2); return v; }
/* Checkpoint tensors come from mappings whose data offsets need not be 4-byte aligned. */
static inline uint32_t ld32(const void *p, size_t i) { uint32_t v; memcpy(&v, (const char *)p + 4 * i, 4); return v; }

static int gcd_int(int a, int b) {
    while (b) { const int t = a % b; a = b; b = t; }
    return a;
}

/* The larger bits, the group that divides both (the smaller one when one divides the other, as for every
 * GGUF mix and every GPTQ group size), offsets if either part has them, perm if either has one. Scales are
 * fp32 if either part has fp32 scales, and also when a symmetric part lands in a layout with offsets: its
 * offset -s * 2^(bits-1) can overflow fp16 where s itself does not, and fp32 holds it exactly.
 * Both parts must have the same code book (the caller checks: model.c keeps such a fused weight in float). */
fl_qlayout fl_q_common_layout(const fl_qlayout *a, const fl_qlayout *b) {
    fl_qlayout o;
    o.bits = a->bits > b->bits ? a->bits : b->bits;
    o.group_size = gcd_int(a->group_size, b->group_size);
    o.has_zeros = a->has_zeros || b->has_zeros;
    o.sdtype = (a->sdtype == FL_F32 || b->sdtype == FL_F32 || (o.has_zeros && !(a->has_zeros && b->has_zeros))) ? FL_F32
                                                                                                                   : FL_F16;
    o.code = a->code;
    o.has_perm = a->has_perm || b->has_perm;
    return o;
}

#define FL_GGML_KEPT "Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K"

fl_status fl_q_layout_for_ggml(int t, fl_qlayout *out) {
    fl_qlayout L = {.code = FL_QCODE_INT, .has_perm = 0};
    switch (t) {
    case GGML_Q4_0: L.bits = 4; L.group_size = 32; L.sdtype = FL_F16; L.has_zeros = 0; break;
    case GGML_Q4_1: L.bits = 4; L.group_size = 32; L.sdtype = FL_F16; L.has_zeros = 1; break;
    case GGML_Q5_0: L.bits = 8; L.group_size = 32; L.sdtype = FL_F16; L.has_zeros = 0; break;
    case GGML_Q5_1: L.bits = 8; L.group_size = 32; L.sdtype = FL_F16; L.has_zeros = 1; break;
    case GGML_Q8_0: L.bits = 8; L.group_size = 32; L.sdtype = FL_F16; L.has_zeros = 0; break;
    case GGML_Q4_K: L.bits = 4; L.group_size = 32; L.sdtype = FL_F32; L.has_zeros = 1; break;
    case GGML_Q5_K: L.bits = 8; L.group_size = 32; L.sdtype = FL_F32; L.has_zeros = 1; break;
    case GGML_Q6_K: L.bits = 8; L.group_size = 16; L.sdtype = FL_F32; L.has_zeros = 0; break;
    default:
        return fl_err(FL_E_UNSUPPORTED, "ggml type %s cannot be kept quantised (supported: " FL_GGML_KEPT ")",
                      fl_ggml_type_name(t));
    }
    *out = L;
    return FL_OK;
}

/* ---- the intermediate row and its store into a destination layout ---- */

typedef struct {
    uint8_t *v;      /* [cols] source codes */
    float *s, *m;    /* [cols / group]; m NULL: symmetric around `off` */
    int group, off;
    /* K-quant sources (Q4_K, Q5_K, Q6_K) also give their two-level form (has_k), for a K-scales destination
     * (quant.h): s = ksc[g] * kd[super-block], m = kmn[g] * kdm[super-block] (kdm = -dmin, fp16 bits) */
    int8_t *ksc, *kmn;     /* [cols / group] */
    uint16_t *kd, *kdm;    /* [cols / 256] */
    int has_k;
} qrow;

static const char *sd_name(fl_dtype t) { return t == FL_F32 ? "float32" : t == FL_F16 ? "float16" : t == FL_I8 ? "K" : "?"; }

/* Can w's layout hold a source of layout P exactly (bits, group, offsets, scale type, code book)? */
static fl_status check_holds(const fl_weight *w, const fl_qlayout *P, const char *what, const char *what2) {
    if (!w || w->dtype != FL_QUANT || !w->data_d || !w->scales_d)
        return fl_err(FL_E_VALUE, "%s%s: the destination is not a quantised weight with codes and scales", what, what2);
    const int split = (w->bits == 5 || w->bits == 6) && w->cols % (w->bits == 6 ? 128 : 256) == 0;
    if ((w->bits != 4 && w->bits != 8 && !split) || w->group_size <= 0 || w->cols % w->group_size)
        return fl_err(FL_E_VALUE, "%s%s: the destination's layout (bits %d, group %d, %lld columns) is invalid", what, what2,
                      w->bits, w->group_size, (long long)w->cols);
    if (w->bits < P->bits || P->group_size % w->group_size || w->code != P->code || (P->has_zeros && !w->zeros_d) ||
        (P->sdtype == FL_F32 && w->sdtype != FL_F32 && w->sdtype != FL_I8))
        return fl_err(FL_E_VALUE, "%s%s (bits %d, group %d, %s scales%s) does not fit the destination's layout "
                      "(bits %d, group %d, %s scales%s)", what, what2, P->bits, P->group_size, sd_name(P->sdtype),
                      P->has_zeros ? ", offsets" : "", w->bits, w->group_size, sd_name(w->sdtype),
                      w->zeros_d ? ", offsets" : "");
    return FL_OK;
}

/* Store x as the scale type t at p[i]; fp16 only when exact (NaN passes: a NaN scale stays NaN). */
static inline int put_scale(fl_dtype t, void *p, size_t i, float x) {
    if (t == FL_F32) { memcpy((char *)p + 4 * i, &x, 4); return 1; }
    const uint16_t h = fl_f32_to_f16(x);
    memcpy((char *)p + 2 * i, &h, 2);
    return fl_f16_to_f32(h) == x || x != x;
}

/* A symmetric K-quant part (Q6_K: w = s (v - off), s = sc d) in a K-scales weight with offsets (Q4_K_M's q|k|v): its
 * offset m = -off s = sc * (-off d), sub-scale sc, super-scale -off d in *out. off is a power of two, so -off d is
 * exact in fp16 unless it overflows (|d| >= 2048; 0 then), and sc * (-off d) is the float32 value the float32 layout
 * stores (-(s * off), every product exact). */
static int ksym_super(uint16_t d, int off, uint16_t *out) {
    const float md = -(float)off * fl_f16_to_f32(d);
    *out = fl_f32_to_f16(md);
    return fl_f16_to_f32(*out) == md || md != md;
}

static fl_status write_row(const fl_weight *w, int64_t r, const qrow *q) {
    const int64_t C = w->cols, G = w->group_size, ng = C / G;
    const int bits = w->bits, has_z = w->zeros_d != NULL;
    if (q->group % G) return fl_err(FL_E_INTERNAL, "repack: source group %d is not a multiple of %lld", q->group, (long long)G);
    if (w->sdtype == FL_I8 && (!q->has_k || (!has_z && q->m) || C % FL_KS_SUPER))
        return fl_err(FL_E_INTERNAL, "repack: K scales hold only K-quant rows of a group multiple of the weight's, and "
                      "rows with offsets only where the weight has them");
    if (!has_z && q->m) return fl_err(FL_E_INTERNAL, "repack: a source with offsets cannot be stored symmetric");
    /* stored code = v + shift, in range by construction: the decoders give codes below 2^srcbits and check_holds
     * has made sure bits >= srcbits (a symmetric v - off lies in [-2^(srcbits-1), 2^(srcbits-1))). uint8
     * arithmetic so that the loops vectorise. */
    const uint8_t shift = (uint8_t)(has_z ? 0 : (1 << (bits - 1)) - q->off);
    uint8_t *restrict dst = (uint8_t *)w->data_d + (size_t)r * (size_t)(C * bits / 8);
    const uint8_t *restrict v = q->v;
    if (bits == 8) {
        for (int64_t c = 0; c < C; c++) dst[c] = (uint8_t)(v[c] + shift);
    } else {
        for (int64_t k = 0; k < C / 2; k++)
            dst[k] = (uint8_t)(((uint8_t)(v[2 * k] + shift) & 15u) | (uint8_t)((uint8_t)(v[2 * k + 1] + shift) << 4));
    }
    if (bits == 5 || bits == 6) { /* the high plane (quant.h: split codes) */
        uint8_t *hp = dst + C / 2;
        /* fl_q_hi_at's layout a block at a time: byte l of the span takes column 2l (l < 16) or 2(l - 16) + 1 */
        const int per = bits == 6 ? 4 : 8, hb = bits - 4;
        for (int64_t span = 0; span < C / (32 * per); span++) {
            uint8_t h[32] = {0};
            for (int j = 0; j < per; j++) {
                const uint8_t *restrict vb = v + (span * per + j) * 32;
                for (int l = 0; l < 16; l++) {
                    h[l] |= (uint8_t)(((uint8_t)(vb[2 * l] + shift) >> 4) << (hb * j));
                    h[16 + l] |= (uint8_t)(((uint8_t)(vb[2 * l + 1] + shift) >> 4) << (hb * j));
                }
            }
            memcpy(hp + span * 32, h, 32);
        }
    }
    if (w->sdtype == FL_I8) { /* the file's two-level form (quant.h: K scales) */
        const size_t sb = fl_q_srow_bytes(C, (int)G, FL_I8), nsup = (size_t)(C / FL_KS_SUPER);
        const int64_t per = q->group / G; /* 2: a group-32 part (Q4_K, Q5_K) in a group-16 weight, each value twice */
        char *sr = (char *)w->scales_d + (size_t)r * sb, *zr = has_z ? (char *)w->zeros_d + (size_t)r * sb : NULL;
        for (int64_t g = 0; g < ng; g++) sr[g] = (char)q->ksc[g / per];
        memcpy(sr + ng, q->kd, 2 * nsup);
        if (zr && q->m) {
            for (int64_t g = 0; g < ng; g++) zr[g] = (char)q->kmn[g / per];
            memcpy(zr + ng, q->kdm, 2 * nsup);
        } else if (zr) { /* a symmetric part beside parts with offsets: sub-scale sc again, super-scale -off d */
            for (int64_t g = 0; g < ng; g++) zr[g] = (char)q->ksc[g / per];
            for (size_t u = 0; u < nsup; u++) {
                uint16_t h;
                if (!ksym_super(q->kd[u], q->off, &h))
                    return fl_err(FL_E_UNSUPPORTED, "row %lld, super-block %zu: the symmetric part's offset scale "
                                  "(-%d x %g) cannot be held in float16 beside the parts with offsets "
                                  "(FASTLOAD_CPU_KSCALE=0 holds it as float32)", (long long)r, u, q->off,
                                  (double)fl_f16_to_f32(q->kd[u]));
                memcpy(zr + ng + 2 * u, &h, 2);
            }
        }
        return FL_OK;
    }
    const int64_t per = q->group / G; /* destination groups per source group */
    for (int64_t g = 0; g < ng; g++) {
        const int64_t sg = g / per;
        const float s = q->s[sg], m = q->m ? q->m[sg] : -(s * (float)q->off);
        if (!put_scale(w->sdtype, w->scales_d, (size_t)(r * ng + g), s) ||
            (has_z && !put_scale(w->sdtype, w->zeros_d, (size_t)(r * ng + g), m)))
            return fl_err(FL_E_UNSUPPORTED, "row %lld, group %lld: scale %g / offset %g cannot be held exactly in float16",
                          (long long)r, (long long)g, (double)s, (double)m);
    }
    return FL_OK;
}

/* ---- ggml block decoders (layouts as csrc/gguf.c's dq_*; nb blocks of one row) ---- */

static void dec_q4_0(const uint8_t *x, int64_t nb, qrow *o) {
    o->group = 32; o->off = 8; o->m = NULL;
    for (int64_t b = 0; b < nb; b++, x += 18) {
        o->s[b] = h2f(ld16(x, 0));
        uint8_t *v = o->v + 32 * b;
        for (int j = 0; j < 16; j++) { v[j] = x[2 + j] & 0xF; v[j + 16] = x[2 + j] >> 4; }
    }
}
static void dec_q4_1(const uint8_t *x, int64_t nb, qrow *o) {
    o->group = 32; o->off = 0;
    for (int64_t b = 0; b < nb; b++, x += 20) {
        o->s[b] = h2f(ld16(x, 0));
        o->m[b] = h2f(ld16(x, 1));
        uint8_t *v = o->v + 32 * b;
        for (int j = 0; j < 16; j++) { v[j] = x[4 + j] & 0xF; v[j + 16] = x[4 + j] >> 4; }
    }
}
static void dec_q5(const uint8_t *x, int64_t nb, qrow *o, int with_min) {
    const int bb = with_min ? 24 : 22, qo = with_min ? 8 : 6;
    o->group = 32; o->off = with_min ? 0 : 16;
    if (!with_min) o->m = NULL;
    for (int64_t b = 0; b < nb; b++, x += bb) {
        o->s[b] = h2f(ld16(x, 0));
        if (with_min) o->m[b] = h2f(ld16(x, 1));
        const uint32_t qh = ld32(x + qo - 4, 0);
        const uint8_t *q = x + qo;
        uint8_t *v = o->v + 32 * b;
        for (int j = 0; j < 16; j++) {
            v[j] = (uint8_t)((q[j] & 0xF) | (((qh >> j) << 4) & 0x10));
            v[j + 16] = (uint8_t)((q[j] >> 4) | ((qh >> (j + 12)) & 0x10));
        }
    }
}
static void dec_q8_0(const uint8_t *x, int64_t nb, qrow *o) {
    o->group = 32; o->off = 128; o->m = NULL;
    for (int64_t b = 0; b < nb; b++, x += 34) {
        o->s[b] = h2f(ld16(x, 0));
        uint8_t *v = o->v + 32 * b;
        for (int j = 0; j < 32; j++) v[j] = (uint8_t)((int)(int8_t)x[2 + j] + 128);
    }
}
/* 6-bit scale and min j of a Q4_K / Q5_K super-block (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}
/* Q4_K (with_high 0) and Q5_K (1): s = d * sc, m = -(dmin * mn) per 32 values, as ggml's d1 * q - m1. */
static void dec_qk45(const uint8_t *x, int64_t nb, qrow *o, int five) {
    o->group = 32; o->off = 0; o->has_k = 1;
    for (int64_t b = 0; b < nb; b++, x += five ? 176 : 144) {
        const float d = h2f(ld16(x, 0)), dmin = h2f(ld16(x, 1));
        o->kd[b] = ld16(x, 0);
        o->kdm[b] = (uint16_t)(ld16(x, 1) ^ 0x8000u); /* -dmin: m = mn * (-dmin) = -(dmin * mn) exactly */
        const uint8_t *sc = x + 4, *qh = x + 16, *ql = x + (five ? 48 : 16);
        uint8_t *v = o->v + 256 * b;
        float *s = o->s + 8 * b, *m = o->m + 8 * b;
        int u1 = 1, u2 = 2;
        for (int j = 0; j < 4; j++, ql += 32, v += 64, u1 <<= 2, u2 <<= 2) {
            int a, mn;
            scale_min_k4(2 * j, sc, &a, &mn);
            s[2 * j] = d * (float)a; m[2 * j] = -(dmin * (float)mn);
            o->ksc[8 * b + 2 * j] = (int8_t)a; o->kmn[8 * b + 2 * j] = (int8_t)mn;
            scale_min_k4(2 * j + 1, sc, &a, &mn);
            s[2 * j + 1] = d * (float)a; m[2 * j + 1] = -(dmin * (float)mn);
            o->ksc[8 * b + 2 * j + 1] = (int8_t)a; o->kmn[8 * b + 2 * j + 1] = (int8_t)mn;
            for (int l = 0; l < 32; l++) {
                v[l] = (uint8_t)((ql[l] & 0xF) + (five && (qh[l] & u1) ? 16 : 0));
                v[l + 32] = (uint8_t)((ql[l] >> 4) + (five && (qh[l] & u2) ? 16 : 0));
            }
        }
    }
}
int fl_q_ggml_ksym_fits(int ggml_type, const void *src, uint64_t n) {
    if (ggml_type != GGML_Q6_K) return 1;
    uint16_t h;
    for (uint64_t b = 0; b < n / 256; b++) /* dec_q6_k's layout: 210 bytes a block, d last */
        if (!ksym_super(ld16((const uint8_t *)src + b * 210 + 208, 0), 32, &h)) return 0;
    return 1;
}
/* Q6_K: 16 groups of 16 per super-block, s = d * sc (ggml evaluates d * sc * q left to right), q6 - 32. */
static void dec_q6_k(const uint8_t *x, int64_t nb, qrow *o) {
    o->group = 16; o->off = 32; o->m = NULL; o->has_k = 1;
    for (int64_t b = 0; b < nb; b++, x += 210) {
        const float d = h2f(ld16(x + 208, 0));
        const uint8_t *ql = x, *qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        o->kd[b] = ld16(x + 208, 0);
        for (int k = 0; k < 16; k++) { o->s[16 * b + k] = d * (float)sc[k]; o->ksc[16 * b + k] = sc[k]; }
        uint8_t *v = o->v + 256 * b;
        for (int n = 0; n < 2; n++, ql += 64, qh += 32, v += 128) {
            for (int l = 0; l < 32; l++) {
                v[l] = (uint8_t)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4));
                v[l + 32] = (uint8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
                v[l + 64] = (uint8_t)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
                v[l + 96] = (uint8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
            }
        }
    }
}

/* Row buffers: on the stack for rows up to STACK_COLS columns, else on the heap. */
enum { STACK_COLS = 8192 };
typedef struct {
    uint8_t v_s[STACK_COLS];
    float s_s[STACK_COLS / 16], m_s[STACK_COLS / 16];
    int8_t ksc_s[STACK_COLS / 16], kmn_s[STACK_COLS / 16];
    uint16_t kd_s[STACK_COLS / FL_KS_SUPER + 1], kdm_s[STACK_COLS / FL_KS_SUPER + 1];
    void *heap;
} rowbuf;
static fl_status rowbuf_get(rowbuf *b, int64_t cols, int64_t ngroups, qrow *q) {
    b->heap = NULL;
    q->has_k = 0;
    if (cols <= STACK_COLS && ngroups <= STACK_COLS / 16) {
        q->v = b->v_s; q->s = b->s_s; q->m = b->m_s;
        q->ksc = b->ksc_s; q->kmn = b->kmn_s; q->kd = b->kd_s; q->kdm = b->kdm_s;
        return FL_OK;
    }
    const size_t nv = ((size_t)cols + 63) & ~(size_t)63, nsup = (size_t)cols / FL_KS_SUPER + 1;
    b->heap = malloc(nv + (2 * sizeof(float) + 2) * (size_t)ngroups + 4 * nsup);
    if (!b->heap) return fl_err(FL_E_NOMEM, "repack: cannot allocate a row buffer of %lld columns", (long long)cols);
    q->v = b->heap;
    q->s = (float *)((char *)b->heap + nv);
    q->m = q->s + ngroups;
    q->kd = (uint16_t *)(q->m + ngroups);
    q->kdm = q->kd + nsup;
    q->ksc = (int8_t *)(q->kdm + nsup);
    q->kmn = q->ksc + ngroups;
    return FL_OK;
}

/* Q4_0, Q4_1 and Q8_0 into their own layout (the demo model, and most 4-/8-bit GGUF files): the same values as the
 * generic path, moved without the intermediate row. fp16 scales and offsets are copied bit for bit. */
static int own_layout_fast(const fl_weight *w, int t) {
    if (w->group_size != 32 || w->sdtype != FL_F16 || w->code != FL_QCODE_INT) return 0;
    if (t == GGML_Q4_0) return w->bits == 4 && !w->zeros_d;
    if (t == GGML_Q4_1) return w->bits == 4 && w->zeros_d;
    if (t == GGML_Q8_0) return w->bits == 8 && !w->zeros_d;
    return 0;
}
static fl_status fast_row(const fl_weight *w, int64_t r, int t, const void *src, int64_t nb) {
    const uint8_t *restrict x = src;
    const size_t cb = (size_t)w->cols * (size_t)w->bits / 8;
    uint8_t *restrict dst = (uint8_t *)w->data_d + (size_t)r * cb;
    uint16_t *sc = (uint16_t *)w->scales_d + (size_t)r * (size_t)nb, *zs = w->zeros_d ? (uint16_t *)w->zeros_d + (size_t)r * (size_t)nb : NULL;
    if (t == GGML_Q8_0) {
        for (int64_t b = 0; b < nb; b++, x += 34, dst += 32) {
            memcpy(&sc[b], x, 2);
            for (int j = 0; j < 32; j++) dst[j] = (uint8_t)(x[2 + j] ^ 0x80); /* int8 q + 128 */
        }
        return FL_OK;
    }
    const int bb = t == GGML_Q4_1 ? 20 : 18, qo = bb - 16;
    for (int64_t b = 0; b < nb; b++, x += bb, dst += 16) {
        memcpy(&sc[b], x, 2);
        if (zs) memcpy(&zs[b], x + 2, 2);
        const uint8_t *q = x + qo; /* byte j: value j in the low nibble, value j + 16 in the high one */
        for (int k = 0; k < 8; k++) dst[k] = (uint8_t)((q[2 * k] & 0xF) | (q[2 * k + 1] << 4));
        for (int k = 0; k < 8; k++) dst[8 + k] = (uint8_t)((q[2 * k] >> 4) | (q[2 * k + 1] & 0xF0));
    }
    return FL_OK;
}

/* The bits a ggml type's codes really have (fl_q_layout_for_ggml holds 5- and 6-bit ones in a byte) */
int fl_q_ggml_code_bits(int t) {
    switch (t) {
    case GGML_Q4_0: case GGML_Q4_1: case GGML_Q4_K: return 4;
    case GGML_Q5_0: case GGML_Q5_1: case GGML_Q5_K: return 5;
    case GGML_Q6_K: return 6;
    default: return 8;
    }
}

fl_status fl_q_from_ggml_row(const fl_weight *w, int64_t r, int ggml_type, const void *src, int64_t cols) {
    fl_qlayout P;
    FL_TRY(fl_q_layout_for_ggml(ggml_type, &P));
    if (w && (w->bits == 5 || w->bits == 6)) P.bits = fl_q_ggml_code_bits(ggml_type); /* split codes hold it if <= */
    FL_TRY(check_holds(w, &P, "ggml type ", fl_ggml_type_name(ggml_type)));
    const int blck = fl_ggml_block_elems(ggml_type);
    if (!src || cols != w->cols || cols <= 0 || cols % blck || r < 0 || r >= w->rows)
        return fl_err(FL_E_VALUE, "repack ggml type %s: row %lld of %lld columns does not fit the destination [%lld, %lld] "
                      "(or is not a multiple of the block size %d)", fl_ggml_type_name(ggml_type), (long long)r, (long long)cols,
                      (long long)w->rows, (long long)w->cols, blck);
    const int64_t nb = cols / blck;
    if (own_layout_fast(w, ggml_type)) return fast_row(w, r, ggml_type, src, nb);
    rowbuf buf;
    qrow q;
    FL_TRY(rowbuf_get(&buf, cols, cols / P.group_size, &q));
    const uint8_t *x = src;
    switch (ggml_type) {
    case GGML_Q4_0: dec_q4_0(x, nb, &q); break;
    case GGML_Q4_1: dec_q4_1(x, nb, &q); break;
    case GGML_Q5_0: dec_q5(x, nb, &q, 0); break;
    case GGML_Q5_1: dec_q5(x, nb, &q, 1); break;
    case GGML_Q8_0: dec_q8_0(x, nb, &q); break;
    case GGML_Q4_K: dec_qk45(x, nb, &q, 0); break;
    case GGML_Q5_K: dec_qk45(x, nb, &q, 1); break;
    case GGML_Q6_K: dec_q6_k(x, nb, &q); break;
    default: break; /* refused by fl_q_layout_for_ggml */
    }
    fl_status st = write_row(w, r, &q);
    free(buf.heap);
    return st;
}

/* ---- GPTQ / AWQ ---- */

/* AWQ's GEMM packing stores output column 8k + ORDER[i] in nibble i (ORDER = 0, 2, 4, 6, 1, 3, 5, 7);
 * column 8k + j is therefore in nibble AWQ_NIBBLE[j] (AutoAWQ's AWQ_REVERSE_ORDER). */
static const int AWQ_NIBBLE[8] = {0, 4, 1, 5, 2, 6, 3, 7};

static const char *pk_name(const fl_packed_src *p) { return p->packing == FL_PACK_AWQ ? "AWQ" : "GPTQ"; }

/* The zero point of group g, output row r, with the GPTQ v1 offset added. v1 stores zero - 1 in each field, and its
 * writers make a zero of 0 wrap: GPTQModel subtracts 0x11111111 (4 bits) / 0x01010101 (8 bits) from the whole int32,
 * so the field reads 2^bits - 1 and borrows one from the field above; AutoGPTQ stores 2^bits - 1 in it. GPTQModel's
 * reader, which transformers and optimum load v1 files through (convert_gptq_v1_to_v2_format_module), adds the same
 * constant back to the whole word: so does this, which gives back every zero either writer had (a field of 2^bits - 1
 * reads 0, carrying into the field above; the top field's carry leaves the word). A per-field + 1 read such a zero
 * as 2^bits and the field above it one too low: silently wrong weights (~13% of asymmetric v1 checkpoints' groups
 * hold a zero of 0, by GPTQModel's own count). */
static inline int packed_zero(const fl_packed_src *p, int64_t g, int64_t r) {
    const int per = 32 / p->bits;
    const uint32_t mask = (1u << p->bits) - 1;
    uint32_t word = ld32(p->qzeros, (size_t)(g * (p->rows / per) + r / per));
    if (p->packing == FL_PACK_GPTQ && p->zero_offset) word += (uint32_t)p->zero_offset * (0xFFFFFFFFu / mask); /* 1 a field */
    const int pos = p->packing == FL_PACK_AWQ ? AWQ_NIBBLE[r % 8] : (int)(r % per);
    return (int)((word >> (pos * p->bits)) & mask);
}

/* The group size actually used: the whole row for -1 (or a group wider than the row: one group). */
static int64_t packed_group(const fl_packed_src *p) {
    return p->group_size == -1 || p->group_size >= p->cols ? p->cols : p->group_size;
}

/* Scale i of a packed source as float32 (exact from float16, bfloat16 and float32). */
static inline float packed_scale(const fl_packed_src *p, size_t i) {
    if (p->scales_type == FL_F32) {
        const uint32_t u = ld32(p->scales, i);
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    if (p->scales_type == FL_BF16) {
        const uint32_t u = (uint32_t)ld16(p->scales, i) << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return h2f(ld16(p->scales, i));
}

/* g_idx that puts column c in group c / group_size is no permutation at all. */
static int gidx_trivial(const fl_packed_src *p, int64_t gs) {
    for (int64_t c = 0; c < p->cols; c++)
        if ((int64_t)(int32_t)ld32(p->g_idx, (size_t)c) != c / gs) return 0;
    return 1;
}

fl_status fl_q_layout_for_packed(const fl_packed_src *p, fl_qlayout *out) {
    if (!p || (p->packing != FL_PACK_GPTQ && p->packing != FL_PACK_AWQ))
        return fl_err(FL_E_VALUE, "packed weight: packing %d is neither GPTQ (%d) nor AWQ (%d)", p ? p->packing : -1,
                      FL_PACK_GPTQ, FL_PACK_AWQ);
    const char *pn = pk_name(p);
    if (p->packing == FL_PACK_AWQ && p->bits != 4)
        return fl_err(FL_E_UNSUPPORTED, "AWQ with bits=%d is not supported (AWQ's GEMM packing is 4-bit)", p->bits);
    if (p->bits != 4 && p->bits != 8)
        return fl_err(FL_E_UNSUPPORTED, "GPTQ with bits=%d is not supported (4 and 8 are)", p->bits);
    if (p->rows <= 0 || p->cols <= 0)
        return fl_err(FL_E_FORMAT, "%s: empty weight [%lld, %lld]", pn, (long long)p->rows, (long long)p->cols);
    if (p->group_size != -1 && p->group_size <= 0)
        return fl_err(FL_E_FORMAT, "%s: group_size=%d must be positive or -1", pn, p->group_size);
    if (p->packing == FL_PACK_GPTQ && p->zero_offset != 0 && p->zero_offset != 1)
        return fl_err(FL_E_VALUE, "GPTQ: zero_offset=%d must be 1 (v1 checkpoints) or 0 (gptq_v2)", p->zero_offset);
    if (!p->qweight || !p->qzeros || !p->scales)
        return fl_err(FL_E_VALUE, "%s: qweight, qzeros and scales are all needed", pn);
    if (p->scales_type != FL_F16 && p->scales_type != FL_BF16 && p->scales_type != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "%s: scales of dtype %d (float16, bfloat16 or float32 are read)", pn,
                      (int)p->scales_type);
    const int per = 32 / p->bits;
    const int64_t want_groups = p->group_size == -1 ? 1 : (p->cols + p->group_size - 1) / p->group_size;
    if (p->ngroups != want_groups)
        return fl_err(FL_E_FORMAT, "%s: scales / qzeros hold %lld groups, but in_features %lld with group_size %d needs %lld",
                      pn, (long long)p->ngroups, (long long)p->cols, p->group_size, (long long)want_groups);
    const int64_t gs = packed_group(p);
    if (p->cols % gs)
        return fl_err(FL_E_UNSUPPORTED, "%s: group_size %lld does not divide in_features %lld (a partial last group "
                      "cannot be stored)", pn, (long long)gs, (long long)p->cols);
    if (gs % 16)
        return fl_err(FL_E_UNSUPPORTED, "%s: group size %lld is not a multiple of 16 (fastload's groups are)", pn, (long long)gs);
    if (p->packing == FL_PACK_GPTQ && p->cols % per)
        return fl_err(FL_E_FORMAT, "GPTQ: in_features %lld is not a multiple of %d (qweight packs %d codes per int32)",
                      (long long)p->cols, per, per);
    if (p->rows % per)
        return fl_err(FL_E_FORMAT, "%s: out_features %lld is not a multiple of %d (%s packs %d codes per int32)", pn,
                      (long long)p->rows, per, p->packing == FL_PACK_AWQ ? "qweight / qzeros" : "qzeros", per);
    int has_perm = 0;
    if (p->g_idx) {
        if (p->packing == FL_PACK_AWQ) return fl_err(FL_E_FORMAT, "AWQ: g_idx given, but AWQ checkpoints have none");
        int64_t *cnt = calloc((size_t)p->ngroups, sizeof *cnt);
        if (!cnt) return fl_err(FL_E_NOMEM, "GPTQ: cannot allocate the g_idx check");
        for (int64_t c = 0; c < p->cols; c++) {
            const int32_t g = (int32_t)ld32(p->g_idx, (size_t)c);
            if (g < 0 || g >= p->ngroups) {
                free(cnt);
                return fl_err(FL_E_FORMAT, "GPTQ: g_idx[%lld] = %d is outside [0, %lld) (the groups of scales / qzeros)",
                              (long long)c, (int)g, (long long)p->ngroups);
            }
            cnt[g]++;
        }
        for (int64_t g = 0; g < p->ngroups; g++)
            if (cnt[g] != gs) {
                const int64_t n = cnt[g];
                free(cnt);
                return fl_err(FL_E_UNSUPPORTED, "GPTQ: g_idx puts %lld columns in group %lld, not group_size %lld: act-order "
                              "groups of unequal size cannot be stored as contiguous groups", (long long)n, (long long)g,
                              (long long)gs);
            }
        free(cnt);
        has_perm = !gidx_trivial(p, gs);
    }
    /* symmetric when every zero point is the centre 2^(bits-1): then no offsets are stored and float16 scales stay
     * float16; bfloat16 / float32 ones (and every asymmetric layout's) are held as float32, which holds them exactly */
    int sym = 1;
    const int centre = 1 << (p->bits - 1);
    for (int64_t g = 0; g < p->ngroups && sym; g++)
        for (int64_t r = 0; r < p->rows; r++)
            if (packed_zero(p, g, r) != centre) { sym = 0; break; }
    *out = (fl_qlayout){.bits = p->bits, .group_size = (int)gs, .sdtype = sym && p->scales_type == FL_F16 ? FL_F16 : FL_F32,
                        .has_zeros = !sym,
                        .code = FL_QCODE_INT, .has_perm = has_perm};
    return FL_OK;
}

fl_status fl_q_from_packed(const fl_weight *w, const fl_packed_src *p, int64_t r0, int64_t n) {
    fl_qlayout P;
    FL_TRY(fl_q_layout_for_packed(p, &P));
    const char *pn = pk_name(p);
    FL_TRY(check_holds(w, &P, pn, ""));
    if (w->rows != p->rows || w->cols != p->cols || r0 < 0 || n < 0 || r0 > p->rows - n)
        return fl_err(FL_E_VALUE, "%s: rows [%lld, %lld) of a [%lld, %lld] weight do not fit the destination [%lld, %lld]",
                      pn, (long long)r0, (long long)(r0 + n), (long long)p->rows, (long long)p->cols, (long long)w->rows,
                      (long long)w->cols);
    const int64_t R = p->rows, C = p->cols, gs = P.group_size, ng = p->ngroups;
    const int bits = p->bits, per = 32 / bits;
    const uint32_t mask = (1u << bits) - 1;
    /* act order: target column j holds source column perm[j]: columns sorted by group, stable */
    int32_t *perm = NULL;
    fl_status st = FL_OK;
    if (P.has_perm) {
        perm = malloc(sizeof(int32_t) * (size_t)C);
        int64_t *next = malloc(sizeof(int64_t) * (size_t)ng);
        if (!perm || !next) { free(perm); free(next); return fl_err(FL_E_NOMEM, "GPTQ: cannot allocate the permutation"); }
        for (int64_t g = 0; g < ng; g++) next[g] = g * gs; /* every group holds gs columns (checked) */
        for (int64_t c = 0; c < C; c++) perm[next[(int32_t)ld32(p->g_idx, (size_t)c)]++] = (int32_t)c;
        free(next);
    }
    if (w->perm_d && r0 == 0)
        for (int64_t j = 0; j < C; j++) w->perm_d[j] = perm ? perm[j] : (int32_t)j;
    /* codes are unpacked a tile of output rows at a time: a packed row of qweight (GPTQ) or a column's words (AWQ)
     * is then read in runs instead of one int32 per cache line */
    int64_t T = ((int64_t)1 << 22) / C;
    T = T < 1 ? 1 : T > 64 ? 64 : T;
    uint8_t *tile = malloc((size_t)(T * C));
    rowbuf buf;
    qrow q = {0};
    if (!tile) st = fl_err(FL_E_NOMEM, "%s: cannot allocate an unpacking buffer", pn);
    else st = rowbuf_get(&buf, C, ng, &q);
    if (st != FL_OK) { free(tile); free(perm); return st; }
    const int has_z = w->zeros_d != NULL;
    q.group = (int)gs;
    q.off = 1 << (bits - 1);
    float *m = q.m;
    for (int64_t ra = r0; ra < r0 + n && st == FL_OK; ra += T) {
        const int64_t rb = ra + T < r0 + n ? ra + T : r0 + n;
        if (p->packing == FL_PACK_GPTQ) {
            for (int64_t i = 0; i < C / per; i++)
                for (int64_t r = ra; r < rb; r++) {
                    const uint32_t word = ld32(p->qweight, (size_t)(i * R + r));
                    uint8_t *t = tile + (r - ra) * C + i * per;
                    for (int k = 0; k < per; k++) t[k] = (uint8_t)((word >> (k * bits)) & mask);
                }
        } else {
            for (int64_t c = 0; c < C; c++)
                for (int64_t r = ra; r < rb; r++)
                    tile[(r - ra) * C + c] = (uint8_t)((ld32(p->qweight, (size_t)(c * (R / 8) + r / 8)) >> (AWQ_NIBBLE[r % 8] * 4)) & 0xF);
        }
        for (int64_t r = ra; r < rb && st == FL_OK; r++) {
            const uint8_t *t = tile + (r - ra) * C;
            if (perm) for (int64_t j = 0; j < C; j++) q.v[j] = t[perm[j]];
            else memcpy(q.v, t, (size_t)C);
            q.m = has_z ? m : NULL;
            for (int64_t g = 0; g < ng; g++) {
                q.s[g] = packed_scale(p, (size_t)(g * R + r));
                if (has_z) m[g] = -(q.s[g] * (float)packed_zero(p, g, r));
            }
            /* symmetric destination: every zero is the centre (fl_q_layout_for_packed chose it so) and q.off applies */
            st = write_row(w, r, &q);
        }
    }
    free(buf.heap);
    free(tile);
    free(perm);
    return st;
}
