/* quant.h: fastload's one quantised weight format (issue 9) and the conversions into it.
 *
 * A quantised weight is an fl_weight with dtype == FL_QUANT. Every source (quantisation at load,
 * GGUF blocks, GPTQ, AWQ) is converted into this one layout; every kernel (CPU and CUDA) reads only it.
 *
 * Layout of W[rows, cols] (row-major like Hugging Face's [out_features, in_features]; groups run
 * along a row, so the format shards by rows freely and by columns at group boundaries, and an
 * expert of a Mixture-of-Experts layer is just another fl_weight):
 *   data_d   uint8 [rows, cols * bits / 8]  the codes q, unsigned. bits == 4: byte k of a row holds
 *                                           column 2k in its low nibble and 2k+1 in its high nibble.
 *                                           bits == 8: one byte per column.
 *   scales_d sdtype [rows, cols / group_size]   s, one per group (sdtype FL_F16 or FL_F32)
 *   zeros_d  sdtype [rows, cols / group_size]   m, the group's offset, or NULL (see below)
 *   perm_d   int32 [cols] or NULL               act-order (GPTQ g_idx): column j of this weight
 *                                               multiplies x[perm[j]] (kernels gather x first)
 * group_size divides cols and is a multiple of 16 (cols itself when the weight has one group per row:
 * "per output channel"). The value of code q in column c of row r, g = c / group_size:
 *   code == FL_QCODE_INT, zeros_d != NULL:  w = s[r,g] * q + m[r,g]                 ("min" / asymmetric form)
 *   code == FL_QCODE_INT, zeros_d == NULL:  w = s[r,g] * (q - 2^(bits-1))           (symmetric form)
 *   code == FL_QCODE_NF4 (bits 4):          w = s[r,g] * fl_nf4_table[q] (+ m[r,g] if zeros_d)
 * Arithmetic: a kernel may form w in float32 as fmaf(q, s, m) with m = -s * 2^(bits-1) for the symmetric
 * form (exact: a power-of-two multiple). fl_q_dequant_rows is the reference every kernel is tested against.
 *
 * Why scales can be float32: a product like GGUF K-quants' d * sc (fp16 * 6-bit int) or GPTQ's
 * s * zero has more significant bits than fp16 holds; float32 keeps those sources exact.
 * Sources and what they become (exact unless said otherwise):
 *   int8 at load   bits 8, symmetric, fp16 s = fp16(absmax / 127), group = cols (per channel) or given
 *   int4 at load   bits 4, asymmetric (min form), group 128, fp16 s = fp16((max - min) / 15), m = fp16(min)
 *   nf4  at load   bits 4, NF4 code book, group 64, fp16 s = fp16(absmax)        (bitsandbytes' nf4)
 *                  Quantisation at load is LOSSY by definition; the CPU and CUDA quantisers are
 *                  bit-identical (IEEE division, round-half-even), see fl_q_quantize_rows.
 *   GGUF Q4_0      bits 4, symmetric, group 32, fp16 s = d               (w = d * (q - 8))
 *   GGUF Q4_1      bits 4, min form, group 32, fp16 s = d, m = m
 *   GGUF Q8_0      bits 8, symmetric, group 32, fp16 s = d               (q + 128 stored)
 *   GGUF Q5_0      bits 8 (5-bit values in bytes), symmetric, group 32, fp16 s = d  (q5 - 16 + 128 stored)
 *   GGUF Q5_1      bits 8, min form, group 32, fp16 s = d, m = m
 *   GGUF Q4_K      bits 4, min form, group 32, fp32 s = d * sc, m = -dmin * mn
 *   GGUF Q5_K      bits 8, min form, group 32, fp32 s = d * sc, m = -dmin * mn
 *   GGUF Q6_K      bits 8, symmetric, group 16, fp32 s = d * sc          (q6 - 32 + 128 stored)
 *   GPTQ sym       bits 4/8, symmetric, the checkpoint's group, fp16 s    (only when every zero is 2^(bits-1))
 *   GPTQ / AWQ     bits 4/8, min form, fp32 s = scale, m = -scale * zero  (exact in fp32)
 *   g_idx          columns sorted by group (stable), perm_d = that order; a g_idx whose groups are not
 *                  all group_size columns is refused (it cannot be written as contiguous groups)
 * 5- and 6-bit GGUF types are stored one byte per value (exact, 8 bits plus scales per weight); the CPU holds them
 * as split codes instead (below) where it will interleave the weight.
 *
 * Split codes (bits 5 or 6; the CPU backend only: by default for the weights it interleaves, whose kernel reads them
 * at least as fast as bytes; FASTLOAD_CPU_CODES56=1 everywhere, =0 never; see model.c codes56_ok): a weight whose
 * parts are all GGUF types with codes of at most 6 bits of which some
 * have 5 or 6 (Q5_0, Q5_1, Q5_K, Q6_K, alone or fused with 4-bit parts: Q4_K_M's q|k|v with a Q6_K v) keeps them in
 * bits-per-weight instead of a byte each. Row r of data_d is the
 * low 4 bits of every code as bits == 4 packs them (cols / 2 bytes), then the high plane (cols * (bits - 4) / 8
 * bytes): for bits 6 per span of 128 columns 32 bytes, byte l's bits 2j, 2j + 1 the high bits of column pos(l) of
 * the span's block j (blocks of 32 columns, j = 0..3); for bits 5 per span of 256 columns 32 bytes, byte l's bit j
 * that of column pos(l) of block j (j = 0..7); pos(l) = 2l for l < 16, 2(l - 16) + 1 for l >= 16 (the order in
 * which a block's low nibbles unpack: even columns, then odd ones). cols a multiple of 128 (bits 6) or 256 (bits 5).
 * The values are those of the byte form (w = fmaf(q, s, m), or s * (q - 2^(bits-1)) symmetric: Q6_K's q - 32).
 *
 * K scales (sdtype FL_I8; the CPU backend only, FASTLOAD_CPU_KSCALE=0 turns them off): a weight whose parts are all
 * GGUF K-quants (Q4_K, Q5_K, Q6_K), cols a multiple of 256, keeps the file's two-level scales instead of their
 * float32 products (parts of different groups or forms, as Q4_K_M's q|k|v: the smallest group, a group-32 part's
 * values repeated, and offsets if any part has them, a symmetric part's m = -off s held as sc x (-off d), exact in
 * fp16 unless |d| >= 2048: such a weight keeps float32 scales, fl_q_ggml_ksym_fits): row r of scales_d is
 * int8 sc[cols / group_size] then fp16 d[cols / 256] (2-byte aligned: cols / group_size is even), and
 *   s[r, g] = (float)sc[g] * d[g * group_size / 256]
 * (zeros_d likewise with mn and -dmin: m = (float)mn * (-dmin)). Each product is the float32 value the FL_F32 layout
 * stores (an fp16 times an integer of at most 8 bits: exact), so a kernel computes the same bits either way;
 * the scales take 8 + 16 / 256 * group bits per group instead of 32: Q4_K 4.625 bits a weight instead of 6.0
 * (the file's 4.5), Q6_K 8.56 instead of 10 (6.56). (GGUF files of Q4_K_M held 1.43x their tensor bytes with
 * float32 scales, and CPU decode, bound by memory, ran 0.79x llama.cpp: benchmarks/cpu_gguf_types.py.)
 *
 * Several checkpoint tensors fused into one weight (q|k|v, gate|up) must share one layout. When they
 * differ (a Q4_K_M GGUF mixes Q4_K and Q6_K) the fused weight takes the common layout that holds each part
 * exactly: the larger bits, the smallest group, fp32 scales if any part has them (K scales on the CPU when
 * every part is a K-quant), offsets if any part has them (fl_q_common_layout). A fused weight mixing plain
 * float and quantised parts is dequantised to the model's float dtype.
 */
#ifndef FL_QUANT_H
#define FL_QUANT_H
#include "fl_backend.h"

#ifdef __cplusplus
extern "C" {
#endif

enum { FL_QCODE_INT = 0, FL_QCODE_NF4 = 1 };

/* bitsandbytes' NF4 code book (the 16 quantiles of N(0,1) scaled to [-1, 1]), index = code. */
extern const float fl_nf4_table[16];

/* Quantisation at load: which scheme, for which weights. */
typedef enum { FL_QS_NONE = 0, FL_QS_INT8, FL_QS_INT4, FL_QS_NF4 } fl_qscheme;
/* int4 quantisation at load: the number of searched (scale, offset) candidates after round-to-nearest
 * (the rules at fl_q_quantize_rows, csrc/quant_ref.c). */
#define FL_Q4_CANDIDATES 11
typedef struct {
    int scheme;        /* fl_qscheme for the linear layers (q/k/v/o, gate/up/down) */
    int group_size;    /* 0: the scheme's default (int8: per channel, int4: 128, nf4: 64) */
    int lm_head;       /* fl_qscheme for an untied lm_head; FL_QS_NONE keeps it in the float dtype.
                          (Embeddings and norms always stay in the float dtype.) */
    int lm_head_group; /* 0: default for that scheme */
    int gguf_dequantize; /* 1: GGUF quantised tensors are dequantised to the float dtype (the old behaviour) */
} fl_quant_cfg;

/* The layout of one quantised weight, independent of where its bytes are. */
typedef struct {
    int bits;          /* 4 or 8; 5 or 6: split codes (header comment) */
    int group_size;    /* divides cols; multiple of 16 */
    fl_dtype sdtype;   /* FL_F16, FL_F32, or FL_I8: K scales (header comment) */
    int has_zeros;     /* zeros_d present (min form) */
    int code;          /* FL_QCODE_INT / FL_QCODE_NF4 */
    int has_perm;      /* perm_d present */
} fl_qlayout;

/* Check a layout for a [rows, cols] weight; FL_E_VALUE / FL_E_UNSUPPORTED with a message naming the
 * value that is wrong (bits, group size not dividing cols, ...). */
fl_status fl_q_check(const fl_qlayout *L, int64_t rows, int64_t cols);
/* Bytes of each part: codes, scales, zeros (0 without), perm (0 without). Overflow: FL_E_VALUE. */
fl_status fl_q_sizes(const fl_qlayout *L, int64_t rows, int64_t cols, size_t *data, size_t *scales, size_t *zeros,
                     size_t *perm);
/* The layout of an fl_weight that is FL_QUANT. */
fl_qlayout fl_q_layout_of(const fl_weight *w);
/* Rows [row0, row0 + rows) of w as a weight of their own, float or quantised (codes, scales and offsets at that
 * row; no act-order permutation: a Mixture of Experts' expert, whose GPTQ / AWQ forms are refused at load).
 * Pointer arithmetic only: valid on device pointers too. */
fl_weight fl_weight_rows(const fl_weight *w, int64_t row0, int64_t rows);
/* The smallest layout holding a and b exactly (see the header comment). */
fl_qlayout fl_q_common_layout(const fl_qlayout *a, const fl_qlayout *b);
/* The bits a ggml type's codes have (4, 5, 6; 8 for Q8_0 and any other type) */
int fl_q_ggml_code_bits(int ggml_type);
/* The layout a ggml type converts into; FL_E_UNSUPPORTED (listing the supported types) otherwise. */
fl_status fl_q_layout_for_ggml(int ggml_type, fl_qlayout *out);
/* The layout quantisation at load produces for a [rows, cols] weight. */
fl_status fl_q_layout_for_scheme(int scheme, int group_size, int64_t cols, fl_qlayout *out);

/* --- host-memory operations (w's pointers are host pointers; the CPU backend's memory is host memory) --- */
/* Reference dequantisation of rows [r0, r0 + n) into out[n, cols] float32 (perm applied: out column j
 * is the weight's column j, i.e. it multiplies x[perm[j]]). */
fl_status fl_q_dequant_rows(const fl_weight *w, int64_t r0, int64_t n, float *out);
/* Quantise rows [r0, r0+n) of w (layout from fl_q_layout_for_scheme) from src[n, cols] of dtype st
 * (f32/f16/bf16). Bit-identical to the CUDA quantiser. */
fl_status fl_q_quantize_rows(const fl_weight *w, int scheme, int64_t r0, int64_t n, const void *src, fl_dtype st);
/* Repack one row of ggml blocks (cols elements) into row r of w, whose layout may be wider than the
 * type's own (fl_q_common_layout): exact in every case. */
fl_status fl_q_from_ggml_row(const fl_weight *w, int64_t r, int ggml_type, const void *src, int64_t cols);
/* Whether n elements of ggml blocks at src can go into a weight with K scales and offsets (K scales, header comment):
 * 1 for any type but the symmetric K-quant (Q6_K), whose offsets -32 d each super-block's fp16 must hold exactly
 * (not where |d| >= 2048: legal, absurd; such a weight keeps float32 scales). */
int fl_q_ggml_ksym_fits(int ggml_type, const void *src, uint64_t n);

/* GPTQ / AWQ tensors of one linear layer [out_features = rows, in_features = cols], as the checkpoint
 * stores them (see fastload/quant.py and tests/quant_fixtures.py for the packings):
 *   GPTQ: qweight int32 [cols * bits / 32, rows] (codes packed along the input dim, low bits first),
 *         qzeros int32 [ngroups, rows * bits / 32] (packed along the output dim), scales f16 [ngroups, rows],
 *         g_idx int32 [cols] or NULL. zero_offset: 1 for the AutoGPTQ / GPTQModel v1 convention (stored
 *         zero = zero - 1), 0 for v2 / gptqmodel "checkpoint_format": "gptq_v2".
 *   AWQ (GEMM): qweight int32 [cols, rows * bits / 32] packed along the output dim in the order
 *         0, 2, 4, 6, 1, 3, 5, 7; qzeros int32 [ngroups, rows * bits / 32] same order; scales f16 [ngroups, rows].
 * Writes rows [r0, r0 + n) of w: the caller has chosen w's layout with fl_q_layout_for_packed. */
enum { FL_PACK_GPTQ = 1, FL_PACK_AWQ = 2 };
typedef struct {
    int packing;               /* FL_PACK_GPTQ / FL_PACK_AWQ */
    int bits, group_size;      /* group_size -1 in the config: one group (cols) */
    int zero_offset;           /* GPTQ: 1 (v1 checkpoints) or 0 */
    const int32_t *qweight, *qzeros, *g_idx; /* host (mapped) memory; g_idx may be NULL */
    const void *scales;        /* scales_type: FL_F16 (GPTQ / AWQ's usual), FL_BF16 or FL_F32 (AutoGPTQ's pack keeps the
                                * layer's dtype): every one widens to float32 exactly */
    fl_dtype scales_type;
    int64_t rows, cols, ngroups;
} fl_packed_src;
/* Validate shapes / values (g_idx in range, groups of equal size) and choose the layout. */
fl_status fl_q_layout_for_packed(const fl_packed_src *p, fl_qlayout *out);
fl_status fl_q_from_packed(const fl_weight *w, const fl_packed_src *p, int64_t r0, int64_t n);

/* Split codes (header comment): where column c's high bits are in a row's high plane of `bits` 5 or 6: byte *at of
 * the plane, from bit *sh */
static inline void fl_q_hi_at(int64_t c, int bits, int64_t *at, int *sh) {
    const int per = bits == 6 ? 4 : 8; /* blocks of 32 columns a span */
    const int64_t blk = c / 32, w = c % 32;
    *at = (blk / per) * 32 + (w & 1 ? 16 + w / 2 : w / 2);
    *sh = (bits - 4) * (int)(blk % per);
}
/* The code of column c of a row of bits 4, 5, 6 or 8 */
static inline unsigned fl_q_code(const uint8_t *row, int bits, int64_t cols, int64_t c) {
    if (bits == 8) return row[c];
    const unsigned lo = c & 1 ? row[c >> 1] >> 4 : row[c >> 1] & 15u;
    if (bits == 4) return lo;
    int64_t at;
    int sh;
    fl_q_hi_at(c, bits, &at, &sh);
    return lo | ((row[cols / 2 + at] >> sh) & ((1u << (bits - 4)) - 1u)) << 4;
}

/* K scales (header comment): columns per super-scale, and the bytes of one row of scales or offsets in any layout */
#define FL_KS_SUPER 256
static inline size_t fl_q_srow_bytes(int64_t cols, int group_size, fl_dtype sdtype) {
    const size_t ng = (size_t)(cols / group_size);
    return sdtype == FL_I8 ? ng + 2 * (size_t)(cols / FL_KS_SUPER) : ng * (size_t)fl_dtype_size(sdtype);
}
/* The scale (or offset) of group g in row r of p (host memory), any layout */
static inline float fl_q_sget(const void *p, fl_dtype sdtype, int64_t cols, int group_size, int64_t r, int64_t g) {
    if (sdtype == FL_I8) {
        const char *row = (const char *)p + (size_t)r * fl_q_srow_bytes(cols, group_size, FL_I8);
        const int64_t ng = cols / group_size;
        uint16_t d;
        memcpy(&d, row + ng + 2 * (g * group_size / FL_KS_SUPER), 2);
        return (float)(int8_t)row[g] * fl_f16_to_f32(d);
    }
    const size_t i = (size_t)r * (size_t)(cols / group_size) + (size_t)g;
    return sdtype == FL_F32 ? ((const float *)p)[i] : fl_f16_to_f32(((const uint16_t *)p)[i]);
}

/* The CPU backend's interleaved layout (fl_weight.interleaved == 8, csrc/cpu/cpu_qmatmul.c: 4-, 5-, 6- or 8-bit codes,
 * rows a multiple of 8). Rows 8g..8g+7 keep the place row-major gives them as a whole (codes, scales and offsets),
 * reordered inside: block b (32 columns) of the 8 rows is 32 * bits bytes and holds row r's 4-byte word k (the bytes
 * row-major has for columns 8k..8k+7 at 4 bits, 4k..4k+3 at 8) at k * 32 + r * 4. The byte of row r holding column c
 * (4-bit: low nibble for even c, as row-major): */
static inline size_t fl_qi_code_off(int64_t cols, int bits, int64_t r, int64_t c) {
    const size_t rowb = (size_t)(cols * bits / 8), cpw = (size_t)(32 / bits); /* columns a word */
    return (size_t)(r / 8) * 8 * rowb + (size_t)(c / 32) * (size_t)(32 * bits) + (size_t)(c % 32) / cpw * 32 +
           (size_t)(r % 8) * 4 + (size_t)(c % 32) % cpw * (size_t)bits / 8;
}
/* Split codes (bits 5, 6) interleaved: a block's first 128 bytes are the low 4 bits of its codes as bits 4 lays them
 * out; then the high plane, 32 * (bits - 4) bytes: with hb = bits - 4 high bits a code, row r's 4-byte lane of vector
 * k / (4 / hb) (at 128 + 32 * (k / (4 / hb)) + r * 4) holds word k's high bits, column 8k + 4h + s (h = 0, 1; s =
 * 0..3) at bit 16 h + 4 hb (k % (4 / hb)) + hb s: a shift puts each column pair's bits next to its low nibbles. */
/* That bit: the high bits (hb of them) of word k's column 8k + cw (cw = 0..7) within its row's lane of vector k / (4 / hb) */
static inline int fl_qi_hi_bit(int hb, int k, int cw) { return 16 * (cw / 4) + 4 * hb * (k % (4 / hb)) + hb * (cw % 4); }
static inline unsigned fl_qi_code(const void *data, int64_t cols, int bits, int64_t r, int64_t c) {
    if (bits == 8 || bits == 4) {
        const uint8_t v = ((const uint8_t *)data)[fl_qi_code_off(cols, bits, r, c)];
        return bits == 8 ? v : (unsigned)(v >> (4 * (c & 1))) & 15u;
    }
    const uint8_t *blk = (const uint8_t *)data + (size_t)(r / 8) * 8 * (size_t)(cols * bits / 8) + (size_t)(c / 32) * (size_t)(32 * bits);
    const int k = (int)(c % 32) / 8, cw = (int)(c % 8), rr = (int)(r % 8), hb = bits - 4, wpl = 4 / hb;
    const unsigned lo = (unsigned)(blk[k * 32 + rr * 4 + cw / 2] >> (4 * (cw & 1))) & 15u;
    uint32_t h;
    memcpy(&h, blk + 128 + (k / wpl) * 32 + rr * 4, 4);
    return lo | ((h >> fl_qi_hi_bit(hb, k, cw)) & ((1u << hb) - 1u)) << 4;
}
/* The scale (or offset) of group g in row r of an interleaved weight's p: [group][row of 8]; K scales: the int8 sub-scales
 * [group][row of 8], then the float16 super-scales [super-block][row of 8] */
static inline float fl_qi_sget(const void *p, fl_dtype sdtype, int64_t cols, int group_size, int64_t r, int64_t g) {
    const int64_t ng = cols / group_size, rr = r % 8;
    const char *base = (const char *)p + (size_t)(r / 8) * 8 * fl_q_srow_bytes(cols, group_size, sdtype);
    if (sdtype == FL_I8) {
        uint16_t d;
        memcpy(&d, base + 8 * ng + ((g * group_size / FL_KS_SUPER) * 8 + rr) * 2, 2);
        return (float)(int8_t)base[g * 8 + rr] * fl_f16_to_f32(d);
    }
    const size_t i = (size_t)(g * 8 + rr);
    return sdtype == FL_F32 ? ((const float *)base)[i] : fl_f16_to_f32(((const uint16_t *)base)[i]);
}
/* The scale (p = w->scales_d) or offset (p = w->zeros_d) of group g in row r of w, either layout */
static inline float fl_q_wsget(const fl_weight *w, const void *p, int64_t r, int64_t g) {
    return w->interleaved ? fl_qi_sget(p, w->sdtype, w->cols, w->group_size, r, g)
                     : fl_q_sget(p, w->sdtype, w->cols, w->group_size, r, g);
}

#ifdef __cplusplus
}
#endif
#endif
