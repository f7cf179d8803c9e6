/* cpu_qmatmul.c: the CPU backend's kernels for quantised weights (csrc/quant.h's format).
 *
 *  - cpu_q_widen: columns [k0, k0 + kc) of one row dequantised to float32 (the tile-widening step of
 *    cpu_matmul.c's GEMM, used for prefill and as the portable path for every layout), equal to
 *    fl_q_dequant_rows bit for bit (w = fmaf(q, s, m), m = -s * 2^(bits-1) for the symmetric form).
 *  - cpu_q_embed: the embedding rows of tokens, dequantised (act-order perm: scattered back).
 *  - cpu_quantize: the backend's quantize op (fl_q_quantize_rows over rows split among threads).
 */
#include "cpu_internal.h"
#include "../quant.h"
#include <stdlib.h>
#include <limits.h>

/* dst[0:kc] = dequantised W[r, k0:k0+kc]; k0 and kc are multiples of 16 (groups are), so every chunk of
 * 16 columns lies in one group. Scales and offsets are read once per group segment. */
void cpu_q_widen(float *restrict dst, const fl_weight *W, int64_t r, int64_t k0, int kc) {
    const int64_t C = W->cols, G = W->group_size;
    const int bits = W->bits, nf4 = W->code == FL_QCODE_NF4;
    const uint8_t *q = (const uint8_t *)W->data_d + (size_t)r * (size_t)(C * bits / 8);
    const float off = (float)(1 << (bits - 1));
    const int il = W->interleaved; /* 16 columns: 4-bit two 4-byte words 32 bytes apart, 8-bit four */
    uint8_t ilw[16];
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 tlo = _mm256_loadu_ps(fl_nf4_table), thi = _mm256_loadu_ps(fl_nf4_table + 8);
#endif
    for (int64_t c = k0; c < k0 + kc;) {
        const int64_t g = c / G, cend = (g + 1) * G < k0 + kc ? (g + 1) * G : k0 + kc;
        const float s = fl_q_wsget(W, W->scales_d, r, g);
        const int hz = W->zeros_d != NULL;
        const float m = hz ? fl_q_wsget(W, W->zeros_d, r, g) : nf4 ? 0.0f : -s * off;
        for (; c < cend; c += 16) {
            float *d = dst + (c - k0);
            const uint8_t *cb = bits == 8 ? q + c : q + c / 2; /* 4- / 8-bit: the codes of these 16 columns */
            if (il && (bits == 4 || bits == 8)) { /* their 4-byte words, 32 bytes apart */
                const uint8_t *w0 = (const uint8_t *)W->data_d + fl_qi_code_off(C, bits, r, c);
                for (int k = 0, nw = bits == 8 ? 4 : 2; k < nw; k++) memcpy(ilw + 4 * k, w0 + 32 * k, 4);
                cb = ilw;
            } else if (il) { /* split codes interleaved: one byte a code */
                for (int t = 0; t < 16; t++) ilw[t] = (uint8_t)fl_qi_code(W->data_d, C, bits, r, c + t);
                cb = ilw;
            }
            const int bytes = bits == 8 || (il && bits != 4); /* cb holds a byte a code */
#if defined(__AVX2__) && defined(__FMA__)
            __m128i codes;
            if (!bytes) {
                const __m128i b = _mm_loadl_epi64((const __m128i *)cb), m4 = _mm_set1_epi8(15);
                codes = _mm_unpacklo_epi8(_mm_and_si128(b, m4), _mm_and_si128(_mm_srli_epi16(b, 4), m4));
                if (bits != 4) { /* split codes (quant.h): the high plane's bytes of these 16 columns, in column order */
                    const int per = bits == 6 ? 4 : 8, h = (int)((c % 32) / 16);
                    const int64_t blk = c / 32;
                    const uint8_t *hp = q + C / 2 + (blk / per) * 32;
                    __m128i hi = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(hp + 8 * h)),
                                                   _mm_loadl_epi64((const __m128i *)(hp + 16 + 8 * h)));
                    hi = _mm_and_si128(_mm_srl_epi16(hi, _mm_cvtsi32_si128((int)((bits - 4) * (blk % per)))),
                                       _mm_set1_epi8(bits == 6 ? 3 : 1));
                    codes = _mm_or_si128(codes, _mm_slli_epi16(hi, 4));
                }
            } else
                codes = _mm_loadu_si128((const __m128i *)cb);
            const __m256 vs = _mm256_set1_ps(s), vm = _mm256_set1_ps(m);
            for (int h = 0; h < 2; h++) {
                const __m256i ci = _mm256_cvtepu8_epi32(h ? _mm_srli_si128(codes, 8) : codes);
                __m256 v;
                if (nf4) { /* table lookup: lanes of codes 8..15 (bit 3 set) take the upper half */
                    const __m256 t = _mm256_blendv_ps(_mm256_permutevar8x32_ps(tlo, ci), _mm256_permutevar8x32_ps(thi, ci),
                                                      _mm256_castsi256_ps(_mm256_slli_epi32(ci, 28)));
                    v = hz ? _mm256_fmadd_ps(t, vs, vm) : _mm256_mul_ps(vs, t);
                } else
                    v = _mm256_fmadd_ps(_mm256_cvtepi32_ps(ci), vs, vm);
                _mm256_storeu_ps(d + 8 * h, v);
            }
#else
            for (int t = 0; t < 16; t++) {
                const unsigned code = !il ? fl_q_code(q, bits, C, c + t) : bytes ? cb[t] : (unsigned)(cb[t / 2] >> (4 * (t & 1))) & 15u;
                d[t] = nf4 ? (hz ? fmaf(fl_nf4_table[code], s, m) : s * fl_nf4_table[code]) : fmaf((float)code, s, m);
            }
#endif
        }
    }
}

fl_status cpu_q_embed(fl_backend *be, float *x, const int32_t *tokens, int n, const fl_weight *emb) {
    const int64_t d = emb->cols;
    float *tmp = NULL;
    if (emb->perm_d) {
        for (int64_t j = 0; j < d; j++)
            if (emb->perm_d[j] < 0 || emb->perm_d[j] >= d)
                return fl_err(FL_E_VALUE, "quantised embedding: perm[%lld] = %d outside [0, %lld)", (long long)j,
                              (int)emb->perm_d[j], (long long)d);
        if (!(tmp = fl_malloc((size_t)n * (size_t)d * sizeof(float))))
            return fl_err(FL_E_NOMEM, "quantised embedding: cannot allocate %d rows", n);
    }
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (n > 8)
    for (int i = 0; i < n; i++) {
        float *o = tmp ? tmp + (size_t)i * (size_t)d : x + (size_t)i * (size_t)d;
        for (int64_t k0 = 0; k0 < d; k0 += 4096) cpu_q_widen(o + k0, emb, tokens[i], k0, (int)(d - k0 < 4096 ? d - k0 : 4096));
        if (tmp) /* stored column j is the embedding's column perm[j] */
            for (int64_t j = 0; j < d; j++) x[(size_t)i * (size_t)d + (size_t)emb->perm_d[j]] = o[j];
    }
    fl_free(tmp);
    return FL_OK;
}

fl_status cpu_quantize(fl_backend *be, const fl_weight *W, int scheme, int64_t row0, int64_t rows, const void *src_d,
                       fl_dtype src_dtype) {
    /* one call on no rows validates everything (layout, scheme, range) before the threads start */
    if (rows < 0 || row0 < 0 || row0 + rows > W->rows)
        return fl_err(FL_E_VALUE, "quantize: rows [%lld, %lld) outside [0, %lld)", (long long)row0,
                      (long long)(row0 + rows), (long long)W->rows);
    FL_TRY(fl_q_quantize_rows(W, scheme, row0, 0, src_d, src_dtype));
    const size_t srow = (size_t)W->cols * (size_t)fl_dtype_size(src_dtype);
    fl_status st = FL_OK;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        fl_status s1 = fl_q_quantize_rows(W, scheme, row0 + r, 1, (const char *)src_d + (size_t)r * srow, src_dtype);
        if (s1 != FL_OK) {
#pragma omp critical(fl_cpu_quantize)
            st = s1;
        }
    }
    return st;
}

/* ---- decode (n <= QDEC_N): integer dot products, as llama.cpp's ----
 *
 * One kernel (qdec_rows) with two activation modes, chosen by FASTLOAD_CPU_QDOT (qdot_mode below):
 * ACTIVATIONS ARE QUANTISED per block of 32 values of each x row, to INT16 (the default: dx_b = max|x_b| / 32767,
 * x16 = rint(x / dx_b), clamped to +-32767) or to INT8 as llama.cpp does (its Q8_0 / Q8_1 activations:
 * dx_b = max|x_b| / 127, x8 = rint(x * 127 / max|x_b|); llama.cpp rounds dx_b to fp16, here it stays float32),
 * kept with dx_b and sum(x_b) (a zero block: dx 0, codes 0). Each x value moves by at most dx_b / 2, so
 * |y - x @ W^T| <= sum_b dx_b / 2 * sum_{k in b} |w_k| (plus float32 rounding): 1.5e-5 of each block's max for int16,
 * float precision in practice; when x is already integers * dx_b the result equals the float one to float
 * rounding (tests/test_quant_ops.py and tests/test_cpu_qdecode.py check these bounds).
 * Taken when group_size % 32 == 0, and for 16-column groups of integer codes (Q6_K's) by qdec16_rows below, in the
 * INT16 mode whatever FASTLOAD_CPU_QDOT says; NF4 with 16-column groups uses the float path.
 *
 * Weight kinds (qdec_kind): 0 = 4-bit integer codes, 1 = 8-bit symmetric, 2 = 8-bit min form, 3 = NF4 (int16
 * activations in both modes: the int8 mode has no NF4 weights of its own).
 * INT16 activations, one block of 32 columns per step, madd_epi16(wa, xa) + madd_epi16(wb, xb) = 8 int32 partial
 * sums of 4 products each:
 *   4-bit: 16 code bytes -> 16 int16 lanes (_mm256_cvtepu8_epi16), low nibbles = the even columns, high = the odd
 *          ones; x16 per block: its 16 even-column values, then its 16 odd ones (at most 4 * 15 * 32767 a lane).
 *   8-bit: q' = q - 128 (xor 0x80), sign-extended 16 at a time (at most 4 * 128 * 32767 a lane); for the min form
 *          128 * sum(x16_b) added as an integer (16 * sum per lane).
 *   NF4:   w16 = T[q], T = rint(nf4 * 2^NF4_K) as int16 (NF4_K = 14: |T| <= 2^14, so a lane holds at most
 *          4 * 2^14 * 32767 = 2147418112 < 2^31), looked up 32 codes at a time with _mm256_shuffle_epi8 on the
 *          nibbles (T's low bytes and high bytes as two 16-byte tables, re-joined by unpack); w = s * T[q] / 2^14
 *          (+ m): the table's rounding moves a weight by at most s * 2^-15 (|T[q] / 2^14 - nf4[q]| <= 2^-15, the
 *          largest 1.6e-5 of s, code 10); tests/test_cpu_qdecode.py adds exactly that term to the bound.
 *          The lookup gives per 128-bit lane [low nibbles of bytes 0-7 | high nibbles of bytes 0-7] and
 *          [bytes 8-15 likewise], so x16 per block is [even columns 0-14 | odd 1-15], [even 16-30 | odd 17-31].
 * INT8 activations (llama.cpp's arithmetic): 4-bit codes (0..15, unsigned) go against x8 with
 * _mm256_maddubs_epi16 (pairs at most 15 * 127 * 2: no saturation), two blocks per step: the 32 code bytes of
 * blocks A, B give [A low nibbles | B low nibbles] = the even columns and [A high | B high] = the odd ones, so x8
 * is stored in that order (quant_x); the two maddubs are added as int16 (at most 2 * 3810) and summed to int32
 * with _mm256_madd_epi16(ones): lanes 0-3 are A's, 4-7 B's. 8-bit codes are made signed (q - 128 by xor 0x80) and
 * multiplied with llama.cpp's sign trick (maddubs(|q'|, sign(x8, q')): pairs at most 128 * 127 * 2 < 2^15).
 * Then in both modes, per block
 *   y += s * dx_b * dot_b          (an FMA on the int32 sums converted to float; s * dx_b a lane broadcast)
 *   y += m * dx_b * sum(x_b)       m = the offset (min form) or -8 s (4-bit symmetric), 8 blocks per FMA
 * and for the 8-bit min form dot_b gets 128 * sum(x_b) added as an integer (w = s * (q' + 128) + m), so no
 * float cancellation. Rows go in blocks of qdec_rr(n) so x loads are shared; threads split the row blocks
 * (one parallel region, static schedule). */
#define QDEC_N 4
#ifndef QDEC_MAX_N
#define QDEC_MAX_N 16 /* rows of x taken through qdec (in passes of QDEC_N); FASTLOAD_CPU_QDEC_MAX_N */
#endif
#define NF4_K 14

/* Which decode path, from FASTLOAD_CPU_QDOT (read on every call: a getenv per matmul is negligible, and tests
 * can switch it with os.environ):
 *   unset / "int16" (the default): int16 activations (qdec's INT16 mode), nearly the speed of the int8 path and
 *                   float-precise (error 2^-16 of each block's max): the demo model's greedy text is
 *                   transformers' answer on the dequantised weights;
 *   "int8":         int8 activations as llama.cpp (above): the fastest; on the demo model (an outlier-heavy
 *                   135M model) it gives llama.cpp's greedy text token for token instead of transformers';
 *   "exact"/"float": the float path (widen the codes, float32 GEMM), the slowest.
 * Any other value is the default. */
enum { QDOT_FLOAT = 0, QDOT_INT8 = 1, QDOT_INT16 = 2 };
static __attribute__((unused)) int qdot_mode(void) {
    const char *e = getenv("FASTLOAD_CPU_QDOT");
    if (!e || !*e) return QDOT_INT16;
    if (!strcmp(e, "int8")) return QDOT_INT8;
    if (!strcmp(e, "exact") || !strcmp(e, "float")) return QDOT_FLOAT;
    return QDOT_INT16;
}
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QDOT 1


typedef struct {
    int64_t nb, nb8;   /* blocks of 32 per row; nb rounded up to 8 (the row stride of dx and xs, zero-padded) */
    int8_t *x8;        /* INT8 mode [n][nb][32]; 4-bit weights: pairs of blocks (2p, 2p+1) hold the 16 even columns
                          of each, then the 16 odd ones of each (a lone last block: its evens, then its odds) */
    int16_t *x16;      /* INT16 mode [n][nb][32]; 4-bit weights: each block's 16 even columns, then its 16 odd
                          ones; NF4: [evens 0-14 | odds 1-15], [evens 16-30 | odds 17-31] */
    float *dx;         /* [n][nb8] */
    float *xs;         /* [n][nb8]: dx_b * sum(x_b) */
    int32_t *bs16;     /* [n][nb][8]: 16 * sum(x_b) in each of 8 lanes (8-bit min form); 16-column groups (g16):
                          [n][nb][16], 16 * the sum of columns 0-15 in lanes 0-7, of columns 16-31 in lanes 8-15 */
    float *xs2;        /* g16: [n][2 * nb8]: dx_b * the sum of block b's columns 0-15 (2b), 16-31 (2b + 1) */
    int32_t *cs;       /* an interleaved symmetric weight's int16 x (qi_rows' FOLD), else NULL: [n][nb8] (g16:
                          [n][2 * nb8], halves as xs2) -2^(bits - 1) * the block's (half's) integer x16 sum */
    int g16;           /* the weight has 16-column groups (two per block of x) */
    int pw, nr;        /* pw 0: the layouts above, row by row. An interleaved matmul's x (qi_matmul) in passes of pw rows
                          (nr in all), each pass block-major: x16 / x8 [pass][b][t][32], dx, xs, cs [pass][b][t], xs2
                          and g16's cs [pass][half block][t] (qx_at); bs16 stays row by row */
    int il;            /* an interleaved weight's bits (qi_rows: x16 per block the pairs [x(8k+s), x(8k+s+4)];
                          8-bit: [x(4k), x(4k+2)], [x(4k+1), x(4k+3)]), else 0 */
    int32_t *gidx;     /* [nb8]: qdec_gidx */
    int64_t *gq;       /* [nb8 / 8]: qdec_gidx */
    uint8_t t_lo[16], t_hi[16]; /* NF4: the low and high bytes of T[q] = rint(nf4[q] * 2^NF4_K) (int16) */
} qx_t;

/* ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): the order of the 4-row reduction in qdec_rows, so that a row's
 * result is the same bits whichever row block and batch it was computed in (the engine batches requests) */
static inline float hsum_ps(__m256 v) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(v, v), _mm256_hadd_ps(v, v));
    return _mm_cvtss_f32(_mm_add_ss(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
}

static inline int hsum_epi32(__m256i v) {
    __m128i s1 = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s1 = _mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0x4e));
    s1 = _mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0xb1));
    return _mm_cvtsi128_si32(s1);
}

/* One block of 32 floats to int8: returns dx, sets *sum; deint: even columns first, then odd ones. span_max > 0:
 * the scale from that (a larger span's max |x|) instead of the block's own (QX8_SPAN below). */
static inline float quant_block32(const float *x, int8_t *out, int *sum, int deint, float span_max, int *sum_lo) {
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
                 v3 = _mm256_loadu_ps(x + 24), sg = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sg, v0), _mm256_andnot_ps(sg, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sg, v2), _mm256_andnot_ps(sg, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = span_max > 0.0f ? span_max : _mm_cvtss_f32(m4);
    const __m256 un = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)),
                                   _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q)));
    if (_mm256_movemask_ps(un)) { /* a NaN (max_ps would drop it): the outputs of this x row become NaN */
        _mm256_storeu_si256((__m256i *)out, _mm256_setzero_si256());
        *sum = 0;
        return NAN;
    }
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
    __m256i i0 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v0, vid), rm));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v1, vid), rm));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v2, vid), rm));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v3, vid), rm));
    const __m256i s4 = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
    __m128i s1 = _mm_add_epi32(_mm256_castsi256_si128(s4), _mm256_extracti128_si256(s4, 1));
    s1 = _mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0x4e));
    s1 = _mm_add_epi32(s1, _mm_shuffle_epi32(s1, 0xb1));
    *sum = _mm_cvtsi128_si32(s1);
    if (sum_lo) *sum_lo = hsum_epi32(_mm256_add_epi32(i0, i1)); /* columns 0-15 (16-column groups) */
    /* packs work per 128-bit lane: the bytes come out as 0-3 8-11 16-19 24-27 | 4-7 12-15 20-23 28-31 */
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    b = _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    if (deint == 2) /* interleaved nibble codes (qi_dots): per 8 columns [0 1 4 5 2 3 6 7], 2-byte units swapped */
        b = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(b, 0xd8), 0xd8);
    else if (deint) { /* per lane: evens then odds; then the lanes' evens together and odds together */
        const __m256i sh = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                            0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
        b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, sh), 0xd8);
    }
    _mm256_storeu_si256((__m256i *)out, b);
    return amax / 127.0f;
}

/* One block of 32 floats to int16: returns dx, sets *sum. deint 3 (interleaved 4-bit weights): per 8 columns
 * [0 4 1 5 2 6 3 7]; 4 (interleaved 8-bit): per 4 columns [0 2 1 3]. deint 1 (NF4): per 128-bit lane the even columns, then
 * the odd ones ([0 2 .. 14 | 1 3 .. 15], [16 .. 30 | 17 .. 31]); 2 (4-bit): all 16 even columns, then the odd ones. */
static inline float quant_block16(const float *x, int16_t *out, int *sum, int *sum_lo, int deint) {
    const __m256 v0 = _mm256_loadu_ps(x), v1 = _mm256_loadu_ps(x + 8), v2 = _mm256_loadu_ps(x + 16),
                 v3 = _mm256_loadu_ps(x + 24), sg = _mm256_set1_ps(-0.0f);
    __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sg, v0), _mm256_andnot_ps(sg, v1)),
                              _mm256_max_ps(_mm256_andnot_ps(sg, v2), _mm256_andnot_ps(sg, v3)));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    const float amax = _mm_cvtss_f32(m4);
    const __m256 un = _mm256_or_ps(_mm256_or_ps(_mm256_cmp_ps(v0, v0, _CMP_UNORD_Q), _mm256_cmp_ps(v1, v1, _CMP_UNORD_Q)),
                                   _mm256_or_ps(_mm256_cmp_ps(v2, v2, _CMP_UNORD_Q), _mm256_cmp_ps(v3, v3, _CMP_UNORD_Q)));
    const int nan = _mm256_movemask_ps(un) != 0;
    if (nan || !(amax > 0.0f)) { /* a NaN (max_ps would drop it): this x row's outputs become NaN; or all zeros */
        _mm256_storeu_si256((__m256i *)out, _mm256_setzero_si256());
        _mm256_storeu_si256((__m256i *)(out + 16), _mm256_setzero_si256());
        *sum = *sum_lo = 0;
        return nan ? NAN : 0.0f;
    }
    const float d = amax / 32767.0f;
    /* the quotient clamped: with a subnormal amax, d loses precision (or is 0) and x / d could leave the range */
    const __m256 vd = _mm256_set1_ps(d), lim = _mm256_set1_ps(32767.0f), nlim = _mm256_set1_ps(-32767.0f);
    const int rm = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
#define QB16(v) _mm256_cvtps_epi32(_mm256_round_ps(_mm256_min_ps(_mm256_max_ps(_mm256_div_ps(v, vd), nlim), lim), rm))
    const __m256i i0 = QB16(v0), i1 = QB16(v1), i2 = QB16(v2), i3 = QB16(v3);
#undef QB16
    const __m256i s01 = _mm256_add_epi32(i0, i1), s23 = _mm256_add_epi32(i2, i3);
    *sum_lo = hsum_epi32(s01); /* columns 0-15 */
    *sum = *sum_lo + hsum_epi32(s23);
    /* packs per 128-bit lane: [0-3 8-11 | 4-7 12-15]; permute4x64 0xd8 puts columns 0-15 in order */
    __m256i a = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xd8);
    __m256i b = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xd8);
    if (deint == 4) { /* per 4 columns [0 2 1 3] */
        a = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(a, 0xd8), 0xd8);
        b = _mm256_shufflehi_epi16(_mm256_shufflelo_epi16(b, 0xd8), 0xd8);
    } else if (deint == 3) { /* per 8 columns [0 4 1 5 2 6 3 7]: each 128-bit lane's low and high 4 interleaved */
        a = _mm256_unpacklo_epi16(a, _mm256_srli_si256(a, 8));
        b = _mm256_unpacklo_epi16(b, _mm256_srli_si256(b, 8));
    } else if (deint) { /* per lane evens then odds; for 4-bit then [evens 0-15 | odds 0-15], [evens 16-31 | odds 16-31] */
        const __m256i sh = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                            0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
        a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(a, sh), 0xd8);
        b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(b, sh), 0xd8);
        if (deint == 2) {
            const __m256i e = _mm256_permute2x128_si256(a, b, 0x20), o = _mm256_permute2x128_si256(a, b, 0x31);
            a = e;
            b = o;
        }
    }
    _mm256_storeu_si256((__m256i *)out, a);
    _mm256_storeu_si256((__m256i *)(out + 16), b);
    return d;
}

static inline float ld_s(const void *p, size_t i, int f16) {
    return f16 ? _cvtsh_ss(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

/* 16 bytes of 4-bit codes -> 32 unsigned bytes: the low nibbles (even columns), then the high ones. */
static inline __m256i q4_expand(const uint8_t *p) {
    const __m128i b = _mm_loadu_si128((const __m128i *)p), m4 = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));
}

/* For block b < nb8 of a row: gidx[b] = min(b / bpg, ng - 1) - gq[b / 8], gq[k] = 8k / bpg (bpg = group_size / 32
 * blocks per group): the groups a chunk of 8 blocks touches are gq.. gq + 7 at most, gidx says which one block b
 * takes (0..7, nondecreasing in a chunk). Made once per matmul, so that the chunk loop has no division. */
static void qdec_gidx(int32_t *gidx, int64_t *gq, int64_t nb8, int bpg, int64_t ng) {
    for (int64_t b = 0; b < nb8; b++) {
        const int64_t g = b / bpg < ng - 1 ? b / bpg : ng - 1;
        if (!(b & 7)) gq[b / 8] = b / bpg;
        gidx[b] = (int32_t)(g - gq[b / 8]);
    }
}

/* 8 per-block values (scales or offsets) of one row from block c0 on: the (at most 8) groups chunk c0 touches,
 * from group g0 + gq[c0 / 8] (g0 the row's first), in one vector load spread over the blocks with one vpermps
 * (gidx: group 32 the identity, group 64 0 0 1 1 2 2 3 3, per channel all 0); a load past total (the end of the
 * scales: the last rows) goes through a scalar copy. cnt < 8 (a row's last chunk): lanes from cnt on are zeroed.
 * (The first version looped over the 8 blocks with a division and a scalar load each when bpg > 1: group 64
 * decoded at 1/3 of group 32's speed, benchmarks/results/cpu-qdecode-2026-12-01.) */
static inline __attribute__((always_inline)) __m256 ld_blocks(const void *p, size_t g0, int64_t c0, int cnt, int f16,
                                                              const int32_t *gidx, const int64_t *gq, size_t total) {
    const size_t i = g0 + (size_t)gq[c0 / 8];
    __m256 v;
    if (i + 8 <= total)
        v = f16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))) : _mm256_loadu_ps((const float *)p + i);
    else {
        float tmp[8] = {0};
        for (int j = 0; j <= gidx[c0 + 7]; j++) tmp[j] = ld_s(p, i + (size_t)j, f16);
        v = _mm256_loadu_ps(tmp);
    }
    v = _mm256_permutevar8x32_ps(v, _mm256_loadu_si256((const __m256i *)(gidx + c0)));
    if (cnt == 8) return v;
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
}

/* QK_INT5 / QK_INT6: split codes (quant.h), taken as QK_INT4 is (x16 as [evens | odds], the min form's offsets in
 * float) with the high plane ORed in and the symmetric form's centre subtracted as integers; INT16 activations only
 * (qhi_or16) */
enum { QK_INT4 = 0, QK_INT8 = 1, QK_INT8_MIN = 2, QK_NF4 = 3, QK_INT5 = 4, QK_INT6 = 5 };

/* K scales (quant.h): the scales of groups g .. g + 7 of a row of them (row: its first byte; ng groups), all in
 * super-block `sup`: 8 int8 sub-scales times its fp16 super-scale (the products the float32 layout stores). A chunk
 * of 8 blocks is one super-block with 32-column groups (ks8(row, ng, c0, c0 / 8)), half of one with 16-column ones. */
static inline __m256 ks8(const char *row, int64_t ng, int64_t g, int64_t sup) {
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(row + g))));
    uint16_t d;
    memcpy(&d, row + ng + 2 * sup, 2);
    return _mm256_mul_ps(sc, _mm256_set1_ps(_cvtsh_ss(d)));
}
static int qdec_kind(const fl_weight *W) {
    return W->code == FL_QCODE_NF4 ? QK_NF4 : W->bits == 4 ? QK_INT4 : W->bits == 5 ? QK_INT5 : W->bits == 6 ? QK_INT6
           : W->zeros_d ? QK_INT8_MIN : QK_INT8;
}
#define QK_LIKE4(k) ((k) == QK_INT4 || (k) == QK_INT5 || (k) == QK_INT6)
#define QK_BITS(k) ((k) == QK_INT8 || (k) == QK_INT8_MIN ? 8 : (k) == QK_INT6 ? 6 : (k) == QK_INT5 ? 5 : 4)

/* x's blocks quantised for the weight's kind: x16 (the INT16 mode) or x8, with dx, xs, bs16 */
/* QX8_SPAN (a build-time experiment, e.g. CFLAGS=-DQX8_SPAN=128; unset in every build): int8 activations take one
 * scale per QX8_SPAN columns instead of per 32, to price that coarser scale (the CUDA integer tensor-core GEMV's chunk
 * is 128 columns) on the CPU's perplexity runs. */
#ifndef QX8_SPAN
#define QX8_SPAN 32
#endif
static float span_absmax(const float *x, int64_t C, int64_t b) {
    if (QX8_SPAN <= 32) return -1.0f;
    const int64_t c0 = b * 32 / QX8_SPAN * QX8_SPAN, c1 = c0 + QX8_SPAN < C ? c0 + QX8_SPAN : C;
    float m = 0.0f;
    for (int64_t c = c0; c < c1; c++) m = fabsf(x[c]) > m ? fabsf(x[c]) : m;
    return m > 0.0f ? m : -1.0f;
}
/* Where row t's block b (of a row of `stride`) is: row by row, or in pass-major order (qx_t's pw). Pass-major, a pass's
 * rows sit at fixed offsets from one base a block, so the kernel addresses all of them from one register: the
 * interleaved kernel's prompts went 69 -> 79 tok/s (one thread, TinyLlama shape, 4-bit g32) when it stopped computing
 * a pointer a row (GCC ran out of registers for them and spilled). */
static inline size_t qx_at(int t0, int N, int t, int64_t b, int64_t stride) {
    return (size_t)t0 * (size_t)stride + (size_t)b * (size_t)N + (size_t)(t - t0);
}

/* x rows [t0, t0 + n) (x points at row t0) into X */
static void quant_x(qx_t *X, const float *x, int t0, int n, int64_t C, int kind) {
    for (int t = t0; t < t0 + n; t++) {
        /* row t's pass: its first row p0 and its rows pn (row by row: a pass of one, qx_at = t * stride + b) */
        const int p0 = X->pw ? t / X->pw * X->pw : t, pn = !X->pw ? 1 : X->nr - p0 < X->pw ? X->nr - p0 : X->pw;
        for (int64_t b = 0; b < X->nb; b++) {
            const size_t i = qx_at(p0, pn, t, b, X->nb), ib = (size_t)t * (size_t)X->nb + (size_t)b;
            const float *xb = x + (size_t)(t - t0) * (size_t)C + (size_t)b * 32;
            int sum, lo = 0;
            float d;
            if (X->x16)
                d = quant_block16(xb, X->x16 + (size_t)i * 32, &sum, &lo, X->il == 8 ? 4 : X->il ? 3 : QK_LIKE4(kind) ? 2 : kind == QK_NF4 ? 1 : 0);
            else {
                d = quant_block32(xb, X->x8 + (size_t)i * 32, &sum, X->il ? (X->il == 8 ? 0 : 2) : kind == QK_INT4,
                                  span_absmax(x + (size_t)t * (size_t)C, C, b), X->g16 ? &lo : NULL);
                if (!X->il && kind == QK_INT4 && (b & 1)) { /* [Ae|Ao], [Be|Bo] -> [Ae|Be], [Ao|Bo] */
                    __m256i *p = (__m256i *)(X->x8 + (size_t)(i - 1) * 32);
                    const __m256i A = _mm256_loadu_si256(p), B = _mm256_loadu_si256(p + 1);
                    _mm256_storeu_si256(p, _mm256_permute2x128_si256(A, B, 0x20));
                    _mm256_storeu_si256(p + 1, _mm256_permute2x128_si256(A, B, 0x31));
                }
            }
            const size_t i8 = qx_at(p0, pn, t, b, X->nb8), h0 = qx_at(p0, pn, t, 2 * b, 2 * X->nb8),
                         h1 = qx_at(p0, pn, t, 2 * b + 1, 2 * X->nb8);
            X->dx[i8] = d;
            X->xs[i8] = d * (float)sum;
            if (X->cs) { /* qi_rows' FOLD */
                const int cm = -(1 << (X->il - 1));
                if (X->g16) {
                    X->cs[h0] = cm * lo;
                    X->cs[h1] = cm * (sum - lo);
                } else
                    X->cs[i8] = cm * sum;
            }
            if (X->g16) {
                X->xs2[h0] = d * (float)lo;
                X->xs2[h1] = d * (float)(sum - lo);
                _mm256_storeu_si256((__m256i *)(X->bs16 + ib * 16), _mm256_set1_epi32(16 * lo));
                _mm256_storeu_si256((__m256i *)(X->bs16 + ib * 16 + 8), _mm256_set1_epi32(16 * (sum - lo)));
            } else
                _mm256_storeu_si256((__m256i *)(X->bs16 + ib * 8), _mm256_set1_epi32(16 * sum));
        }
    }
}

/* y[t, r0 + r] = the sum of acc[r][t] + off[r][t], for t < N, r < RR */
static inline __attribute__((always_inline)) void qdec_store(float *y, int64_t R, int64_t r0, __m256 acc[4][QDEC_N],
                                                             __m256 off[4][QDEC_N], const int N, const int RR) {
    for (int t = 0; t < N; t++) {
        float *yt = y + (size_t)t * (size_t)R + (size_t)r0;
        if (RR == 4) { /* the 4 rows' sums in one vector: two rounds of hadd, then the two halves */
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(_mm256_add_ps(acc[0][t], off[0][t]), _mm256_add_ps(acc[1][t], off[1][t])),
                                            _mm256_hadd_ps(_mm256_add_ps(acc[2][t], off[2][t]), _mm256_add_ps(acc[3][t], off[3][t])));
            _mm_storeu_ps(yt, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        } else
            for (int r = 0; r < RR; r++) yt[r] = hsum_ps(_mm256_add_ps(acc[r][t], off[r][t]));
    }
}

/* Software prefetch of the codes: at 1 thread on the Zen 3 VM the decode step was stalled on code loads
 * (perf: the cycles sat on the first use of each load); prefetching the rows that come after this block
 * measured 1.3-1.8x on the demo model's shapes (lm_head 4.6 -> 2.3 ms, process CPU time, noisy machine).
 * The chunk of 8 blocks at c0, pfrows rows on (>= 2 KB ahead in the code stream). */
static inline size_t qdec_pfrows(size_t rowbytes, int RR) {
    const size_t p = (2048 + rowbytes - 1) / rowbytes;
    return p > (size_t)RR ? p : (size_t)RR;
}
static inline void qdec_prefetch(const uint8_t *const *q, int RR, size_t pfrows, size_t rowbytes, int64_t c0, int bits,
                                 int64_t cols) {
    for (int r = 0; r < RR; r++) {
        const char *row = (const char *)(q[r] + pfrows * rowbytes);
        if (bits == 5 || bits == 6) { /* split codes: the chunk's low nibbles (128 bytes) and its high bits (1-2 spans) */
            const char *lo = row + (size_t)c0 * 16, *hi = row + cols / 2 + (size_t)(c0 / (bits == 6 ? 4 : 8)) * 32;
            _mm_prefetch(lo, _MM_HINT_T0);
            _mm_prefetch(lo + 64, _MM_HINT_T0);
            _mm_prefetch(hi, _MM_HINT_T0);
            continue;
        }
        const char *pf = row + (size_t)c0 * 32 * (size_t)bits / 8;
        for (int l = 0; l < 32 * bits; l += 64) _mm_prefetch(pf + l, _MM_HINT_T0);
    }
}

/* INT16 mode: block b of each of the N rows of x, as two vectors of 16 */
static inline __attribute__((always_inline)) void ld_x16(const qx_t *X, const int N, int64_t b, __m256i *xa, __m256i *xb) {
    for (int t = 0; t < N; t++) {
        const __m256i *xp = (const __m256i *)(X->x16 + ((size_t)t * (size_t)X->nb + (size_t)b) * 32);
        xa[t] = _mm256_loadu_si256(xp);
        xb[t] = _mm256_loadu_si256(xp + 1);
    }
}
/* 16 bytes of 4-bit codes as int16: lane k = byte k, its low nibble (column 2k) in *ca, its high one in *cb */
static inline void q4_codes16(const uint8_t *p, __m256i *ca, __m256i *cb) {
    const __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)p));
    *ca = _mm256_and_si256(c, _mm256_set1_epi16(15));
    *cb = _mm256_srli_epi16(c, 4);
}
/* 32 bytes of 8-bit codes as int16 q - 128: columns 0-15 in *ca, 16-31 in *cb */
static inline void q8_codes16(const uint8_t *p, __m256i *ca, __m256i *cb) {
    const __m256i raw = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi8((char)0x80));
    *ca = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(raw));
    *cb = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(raw, 1));
}

/* Split codes: OR the high bits of block b (high plane at hp) into q4_codes16's *ca (even columns) and *cb (odd);
 * sym: the symmetric form's centre 2^(bits-1) taken off as integers (Q6_K's q - 32 exactly, no float offset term) */
static inline void qhi_or16(const uint8_t *hp, int64_t b, const int bits, int sym, __m256i *ca, __m256i *cb) {
    const int per = bits == 6 ? 4 : 8;
    const __m256i h = _mm256_loadu_si256((const __m256i *)(hp + (b / per) * 32));
    const __m256i hb = _mm256_and_si256(_mm256_srl_epi16(h, _mm_cvtsi32_si128((int)((bits - 4) * (b % per)))),
                                        _mm256_set1_epi8(bits == 6 ? 3 : 1));
    *ca = _mm256_or_si256(*ca, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(hb)), 4));
    *cb = _mm256_or_si256(*cb, _mm256_slli_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(hb, 1)), 4));
    if (sym) {
        const __m256i c = _mm256_set1_epi16((short)(1 << (bits - 1)));
        *ca = _mm256_sub_epi16(*ca, c);
        *cb = _mm256_sub_epi16(*cb, c);
    }
}

/* y[t, r0:r0+RR] for t < N, weight kind `kind`, activations int16 (X16) or int8. Blocks go 8 at a time: their
 * scales, offsets and dx in vectors, each block's s * dx_b a lane broadcast (vpermps); INT16: one block per step;
 * INT8: 4-bit codes two blocks (32 bytes) per step. N, RR, kind, X16 are constants in each instance. */
static inline __attribute__((always_inline)) void qdec_rows(float *y, int64_t R, const fl_weight *W, int64_t r0,
                                                            const qx_t *X, const int N, const int RR, const int kind,
                                                            const int X16) {
    const int64_t nb = X->nb, ng = W->cols / W->group_size;
    const int bits = QK_BITS(kind), f16 = W->sdtype == FL_F16, ks = W->sdtype == FL_I8;
    const size_t rowbytes = (size_t)W->cols * (size_t)bits / 8, ksrow = fl_q_srow_bytes(W->cols, W->group_size, W->sdtype);
    const uint8_t *q[4];
    size_t gr[4];
    __m256 acc[4][QDEC_N], off[4][QDEC_N];
    for (int r = 0; r < RR; r++) {
        q[r] = (const uint8_t *)W->data_d + (size_t)(r0 + r) * rowbytes;
        gr[r] = (size_t)(r0 + r) * (size_t)ng;
        for (int t = 0; t < N; t++) { acc[r][t] = _mm256_setzero_ps(); off[r][t] = _mm256_setzero_ps(); }
    }
    const __m256i ones = _mm256_set1_epi16(1), x80 = _mm256_set1_epi8((char)0x80), m4b = _mm256_set1_epi8(15),
                  pairlanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1),
                  nf4sh = _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4);
    /* NF4: T's low and high bytes (qx_t), in both 128-bit lanes */
    const __m256i tlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)X->t_lo)),
                  thi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)X->t_hi));
    const size_t pfrows = qdec_pfrows(rowbytes, RR);
    /* NF4: T / 2^NF4_K folded into the scale (a power of two: exact) */
    const __m256 sfold = _mm256_set1_ps(kind == QK_NF4 ? 1.0f / (float)(1 << NF4_K) : 1.0f);
    for (int64_t c0 = 0; c0 < nb; c0 += 8) {
        const int cnt = (int)(nb - c0 < 8 ? nb - c0 : 8);
        __m256 ds[4][QDEC_N];
        qdec_prefetch(q, RR, pfrows, rowbytes, c0, bits, W->cols);
        for (int r = 0; r < RR; r++) {
            __m256 s8, m8 = _mm256_setzero_ps();
            if (ks) { /* K scales: every row is whole super-blocks, so cnt == 8 */
                const size_t o = (size_t)(r0 + r) * ksrow;
                s8 = ks8((const char *)W->scales_d + o, ng, c0, c0 / 8);
                if (W->zeros_d) m8 = ks8((const char *)W->zeros_d + o, ng, c0, c0 / 8);
            } else {
                s8 = ld_blocks(W->scales_d, gr[r], c0, cnt, f16, X->gidx, X->gq, (size_t)R * (size_t)ng);
                if (W->zeros_d) m8 = ld_blocks(W->zeros_d, gr[r], c0, cnt, f16, X->gidx, X->gq, (size_t)R * (size_t)ng);
            }
            if (!W->zeros_d && kind == QK_INT4) m8 = _mm256_mul_ps(s8, _mm256_set1_ps(-8.0f));
            if (kind == QK_NF4) s8 = _mm256_mul_ps(s8, sfold);
            for (int t = 0; t < N; t++) {
                const size_t xi = (size_t)t * (size_t)X->nb8 + (size_t)c0; /* x side: padded with zeros */
                ds[r][t] = _mm256_mul_ps(s8, _mm256_loadu_ps(X->dx + xi));
                if (kind == QK_INT4 || W->zeros_d) off[r][t] = _mm256_fmadd_ps(m8, _mm256_loadu_ps(X->xs + xi), off[r][t]);
            }
        }
        for (int j = 0; j < cnt;) {
            const int64_t b = c0 + j;
            if (X16) { /* one block: 32 int16 x, two madd_epi16 per row and token */
                const __m256i lane = _mm256_set1_epi32(j);
                __m256i xa[QDEC_N], xb[QDEC_N];
                ld_x16(X, N, b, xa, xb);
                for (int r = 0; r < RR; r++) {
                    __m256i ca, cb;
                    if (QK_LIKE4(kind)) { /* lane k = byte k: low nibble column 2k, high nibble 2k+1 */
                        q4_codes16(q[r] + b * 16, &ca, &cb);
                        if (kind != QK_INT4) qhi_or16(q[r] + W->cols / 2, b, bits, !W->zeros_d, &ca, &cb);
                    } else if (kind == QK_NF4) { /* [low nibbles | high nibbles] -> T[q] as int16 */
                        /* the 16 bytes in both lanes (a load, no shuffle), the upper lane shifted by 4 */
                        const __m256i c = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(q[r] + b * 16)));
                        const __m256i idx = _mm256_and_si256(_mm256_srlv_epi32(c, nf4sh), m4b);
                        const __m256i wl = _mm256_shuffle_epi8(tlo, idx), wh = _mm256_shuffle_epi8(thi, idx);
                        ca = _mm256_unpacklo_epi8(wl, wh);
                        cb = _mm256_unpackhi_epi8(wl, wh);
                    } else
                        q8_codes16(q[r] + b * 32, &ca, &cb);
                    for (int t = 0; t < N; t++) {
                        __m256i i32 = _mm256_add_epi32(_mm256_madd_epi16(ca, xa[t]), _mm256_madd_epi16(cb, xb[t]));
                        if (kind == QK_INT8_MIN)
                            i32 = _mm256_add_epi32(i32, _mm256_loadu_si256((const __m256i *)(X->bs16 + ((size_t)t * (size_t)nb + (size_t)b) * 8)));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(ds[r][t], lane), _mm256_cvtepi32_ps(i32), acc[r][t]);
                    }
                }
                j++;
            } else if (kind == QK_INT4 && j + 1 < cnt) { /* two blocks: 32 code bytes, x as [evens A|evens B], [odds A|odds B] */
                const __m256i lane = _mm256_add_epi32(_mm256_set1_epi32(j), pairlanes);
                __m256i xe[QDEC_N], xo[QDEC_N];
                for (int t = 0; t < N; t++) {
                    const __m256i *xp = (const __m256i *)(X->x8 + ((size_t)t * (size_t)nb + (size_t)b) * 32);
                    xe[t] = _mm256_loadu_si256(xp);
                    xo[t] = _mm256_loadu_si256(xp + 1);
                }
                for (int r = 0; r < RR; r++) {
                    const __m256i cb = _mm256_loadu_si256((const __m256i *)(q[r] + b * 16));
                    const __m256i lo = _mm256_and_si256(cb, m4b), hi = _mm256_and_si256(_mm256_srli_epi16(cb, 4), m4b);
                    for (int t = 0; t < N; t++) {
                        const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xe[t]), _mm256_maddubs_epi16(hi, xo[t]));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(ds[r][t], lane),
                                                    _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), acc[r][t]);
                    }
                }
                j += 2;
            } else { /* int8 x, one block */
                const __m256i lane = _mm256_set1_epi32(j);
                __m256i xv[QDEC_N];
                for (int t = 0; t < N; t++) xv[t] = _mm256_loadu_si256((const __m256i *)(X->x8 + ((size_t)t * (size_t)nb + (size_t)b) * 32));
                for (int r = 0; r < RR; r++) {
                    __m256i qv, qa = _mm256_setzero_si256();
                    if (kind == QK_INT4) qv = q4_expand(q[r] + b * 16);
                    else {
                        qv = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(q[r] + b * 32)), x80);
                        qa = _mm256_abs_epi8(qv);
                    }
                    for (int t = 0; t < N; t++) {
                        const __m256i p = kind == QK_INT4 ? _mm256_maddubs_epi16(qv, xv[t])
                                                          : _mm256_maddubs_epi16(qa, _mm256_sign_epi8(xv[t], qv));
                        __m256i i32 = _mm256_madd_epi16(p, ones);
                        if (kind == QK_INT8_MIN)
                            i32 = _mm256_add_epi32(i32, _mm256_loadu_si256((const __m256i *)(X->bs16 + ((size_t)t * (size_t)nb + (size_t)b) * 8)));
                        acc[r][t] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(ds[r][t], lane), _mm256_cvtepi32_ps(i32), acc[r][t]);
                    }
                }
                j++;
            }
        }
    }
    qdec_store(y, R, r0, acc, off, N, RR);
}

/* 16 values (scales or offsets) from p[i] on, n of them (lanes from n on zero), as two vectors */
static inline void ld16(const void *p, size_t i, int n, int f16, __m256 out[2]) {
    if (n == 16) {
        if (f16) {
            out[0] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
            out[1] = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i + 8)));
        } else {
            out[0] = _mm256_loadu_ps((const float *)p + i);
            out[1] = _mm256_loadu_ps((const float *)p + i + 8);
        }
        return;
    }
    float tmp[16] = {0};
    for (int j = 0; j < n; j++) tmp[j] = ld_s(p, i + (size_t)j, f16);
    out[0] = _mm256_loadu_ps(tmp);
    out[1] = _mm256_loadu_ps(tmp + 8);
}

/* 16-column groups (GGUF Q6_K, a fused weight holding a Q6_K part, GPTQ / int4 at load with group 16): INT16
 * activations only (FASTLOAD_CPU_QDOT=int8 takes this path too, as NF4 does; NF4 with 16-column groups takes the
 * float path). Each block of 32 columns of x holds two groups, lo (columns 0-15) and hi (16-31). Per chunk of 8
 * blocks the 16 groups' s * dx_b go to a small array and are broadcast from there per block:
 *   8-bit: madd(ca, xa) holds the lo columns, madd(cb, xb) the hi ones (x16 in column order): two FMAs, and for
 *          the min form 16 * the sum of each half added as an integer (bs16), as the 32-column kernel does;
 *   4-bit: madd(ca, xa) + madd(cb, xb): lanes 0-3 hold columns 0-15 and lanes 4-7 columns 16-31 (code byte k holds
 *          columns 2k and 2k + 1, x16 is [evens | odds]): one FMA with [lo x 4 | hi x 4].
 * Offsets (min form; 4-bit symmetric: -8 s): each half's m times dx_b * that half's sum (xs2), 8 halves an FMA.
 * (The first Q6_K decode, through the float path, ran 0.32x llama.cpp's speed on a 1024-wide model:
 * benchmarks/cpu_gguf_types.py.) */
static inline __attribute__((always_inline)) void qdec16_rows(float *y, int64_t R, const fl_weight *W, int64_t r0,
                                                              const qx_t *X, const int N, const int RR, const int kind) {
    const int64_t nb = X->nb, ng = W->cols / 16;
    const int bits = QK_BITS(kind), f16 = W->sdtype == FL_F16, hoff = kind == QK_INT4 || W->zeros_d;
    const size_t rowbytes = (size_t)W->cols * (size_t)bits / 8, pfrows = qdec_pfrows(rowbytes, RR),
                 ksrow = W->sdtype == FL_I8 ? fl_q_srow_bytes(W->cols, 16, FL_I8) : 0;
    const uint8_t *q[4];
    size_t gr[4];
    __m256 acc[4][QDEC_N], off[4][QDEC_N];
    float ds[4][QDEC_N][16] __attribute__((aligned(32)));
    for (int r = 0; r < RR; r++) {
        q[r] = (const uint8_t *)W->data_d + (size_t)(r0 + r) * rowbytes;
        gr[r] = (size_t)(r0 + r) * (size_t)ng;
        for (int t = 0; t < N; t++) { acc[r][t] = _mm256_setzero_ps(); off[r][t] = _mm256_setzero_ps(); }
    }
    const __m256i dup0 = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), dup1 = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
    for (int64_t c0 = 0; c0 < nb; c0 += 8) {
        const int cnt = (int)(nb - c0 < 8 ? nb - c0 : 8);
        qdec_prefetch(q, RR, pfrows, rowbytes, c0, bits, W->cols);
        for (int r = 0; r < RR; r++) {
            __m256 s[2], m[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
            if (ksrow) { /* K scales: the chunk's 16 groups are super-block c0 / 8 (whole super-blocks: cnt == 8) */
                const char *sr = (const char *)W->scales_d + (size_t)(r0 + r) * ksrow,
                           *zr = W->zeros_d ? (const char *)W->zeros_d + (size_t)(r0 + r) * ksrow : NULL;
                s[0] = ks8(sr, ng, 2 * c0, c0 / 8);
                s[1] = ks8(sr, ng, 2 * c0 + 8, c0 / 8);
                if (zr) {
                    m[0] = ks8(zr, ng, 2 * c0, c0 / 8);
                    m[1] = ks8(zr, ng, 2 * c0 + 8, c0 / 8);
                }
            } else {
                ld16(W->scales_d, gr[r] + (size_t)(2 * c0), 2 * cnt, f16, s);
                if (W->zeros_d) ld16(W->zeros_d, gr[r] + (size_t)(2 * c0), 2 * cnt, f16, m);
            }
            if (!W->zeros_d && kind == QK_INT4) {
                m[0] = _mm256_mul_ps(s[0], _mm256_set1_ps(-8.0f));
                m[1] = _mm256_mul_ps(s[1], _mm256_set1_ps(-8.0f));
            }
            for (int t = 0; t < N; t++) { /* dx and xs2 are zero past the row's last block */
                const __m256 dx = _mm256_loadu_ps(X->dx + (size_t)t * (size_t)X->nb8 + (size_t)c0);
                _mm256_store_ps(ds[r][t], _mm256_mul_ps(s[0], _mm256_permutevar8x32_ps(dx, dup0)));
                _mm256_store_ps(ds[r][t] + 8, _mm256_mul_ps(s[1], _mm256_permutevar8x32_ps(dx, dup1)));
                if (hoff) {
                    const float *x2 = X->xs2 + (size_t)t * (size_t)X->nb8 * 2 + (size_t)c0 * 2;
                    off[r][t] = _mm256_fmadd_ps(m[0], _mm256_loadu_ps(x2), off[r][t]);
                    off[r][t] = _mm256_fmadd_ps(m[1], _mm256_loadu_ps(x2 + 8), off[r][t]);
                }
            }
        }
        for (int j = 0; j < cnt; j++) {
            const int64_t b = c0 + j;
            __m256i xa[QDEC_N], xb[QDEC_N];
            ld_x16(X, N, b, xa, xb);
            for (int r = 0; r < RR; r++) {
                __m256i ca, cb;
                if (QK_LIKE4(kind)) {
                    q4_codes16(q[r] + b * 16, &ca, &cb);
                    if (kind != QK_INT4) qhi_or16(q[r] + W->cols / 2, b, bits, !W->zeros_d, &ca, &cb);
                    for (int t = 0; t < N; t++) {
                        const __m256i i32 = _mm256_add_epi32(_mm256_madd_epi16(ca, xa[t]), _mm256_madd_epi16(cb, xb[t]));
                        const __m256 sc = _mm256_set_m128(_mm_broadcast_ss(&ds[r][t][2 * j + 1]), _mm_broadcast_ss(&ds[r][t][2 * j]));
                        acc[r][t] = _mm256_fmadd_ps(sc, _mm256_cvtepi32_ps(i32), acc[r][t]);
                    }
                } else {
                    q8_codes16(q[r] + b * 32, &ca, &cb);
                    for (int t = 0; t < N; t++) {
                        __m256i ia = _mm256_madd_epi16(ca, xa[t]), ib = _mm256_madd_epi16(cb, xb[t]);
                        if (kind == QK_INT8_MIN) {
                            const int32_t *bs = X->bs16 + ((size_t)t * (size_t)nb + (size_t)b) * 16;
                            ia = _mm256_add_epi32(ia, _mm256_loadu_si256((const __m256i *)bs));
                            ib = _mm256_add_epi32(ib, _mm256_loadu_si256((const __m256i *)(bs + 8)));
                        }
                        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&ds[r][t][2 * j]), _mm256_cvtepi32_ps(ia), acc[r][t]);
                        acc[r][t] = _mm256_fmadd_ps(_mm256_broadcast_ss(&ds[r][t][2 * j + 1]), _mm256_cvtepi32_ps(ib), acc[r][t]);
                    }
                }
            }
        }
    }
    qdec_store(y, R, r0, acc, off, N, RR);
}

static int qdec_rr(int n) { return n == 1 ? 4 : n == 2 ? 2 : 1; }

/* one instance per (kind, mode) for rows [r0, r0 + RR_); NF4 has only the INT16 mode */
#define QDEC_ROWS(N_, RR_, R0_, X16_)                                                               \
    switch (kind) {                                                                                 \
    case QK_INT4: qdec_rows(y, R, W, R0_, X, N_, RR_, QK_INT4, X16_); break;                        \
    case QK_INT8: qdec_rows(y, R, W, R0_, X, N_, RR_, QK_INT8, X16_); break;                        \
    case QK_INT8_MIN: qdec_rows(y, R, W, R0_, X, N_, RR_, QK_INT8_MIN, X16_); break;                \
    case QK_INT5: if (X16_) qdec_rows(y, R, W, R0_, X, N_, RR_, QK_INT5, 1); break;                 \
    case QK_INT6: if (X16_) qdec_rows(y, R, W, R0_, X, N_, RR_, QK_INT6, 1); break;                 \
    default: if (X16_) qdec_rows(y, R, W, R0_, X, N_, RR_, QK_NF4, 1); break;                       \
    }
/* n rows of x: a full block of qdec_rr(n) rows, or a tail row by row */
#define QDEC_CASE(N_, RR_, X16_)                                                                    \
    case N_:                                                                                        \
        if (rr == RR_) {                                                                            \
            QDEC_ROWS(N_, RR_, r0, X16_)                                                            \
        } else                                                                                      \
            for (int64_t r = r0; r < r0 + rr; r++) { QDEC_ROWS(N_, 1, r, X16_) }                    \
        break;

/* rows [r0, r0 + rr) (rr == qdec_rr(n) or a tail), one function per activation mode */
#define QDEC_BLOCK(NAME_, X16_)                                                                     \
    static void NAME_(float *y, int64_t R, const fl_weight *W, int64_t r0, int rr, const qx_t *X, int n, int kind) { \
        switch (n) {                                                                                \
        QDEC_CASE(1, 4, X16_)                                                                       \
        QDEC_CASE(2, 2, X16_)                                                                       \
        QDEC_CASE(3, 1, X16_)                                                                       \
        QDEC_CASE(4, 1, X16_)                                                                       \
        default: break;                                                                             \
        }                                                                                           \
    }
QDEC_BLOCK(qdec_block8, 0)
QDEC_BLOCK(qdec_block16, 1)

/* the same for 16-column groups (qdec16_rows; no NF4) */
#define QDEC16_ROWS(N_, RR_, R0_)                                                                   \
    switch (kind) {                                                                                 \
    case QK_INT4: qdec16_rows(y, R, W, R0_, X, N_, RR_, QK_INT4); break;                            \
    case QK_INT8: qdec16_rows(y, R, W, R0_, X, N_, RR_, QK_INT8); break;                            \
    case QK_INT8_MIN: qdec16_rows(y, R, W, R0_, X, N_, RR_, QK_INT8_MIN); break;                    \
    case QK_INT5: qdec16_rows(y, R, W, R0_, X, N_, RR_, QK_INT5); break;                            \
    case QK_INT6: qdec16_rows(y, R, W, R0_, X, N_, RR_, QK_INT6); break;                            \
    default: break;                                                                                 \
    }
#define QDEC16_CASE(N_, RR_)                                                                        \
    case N_:                                                                                        \
        if (rr == RR_) {                                                                            \
            QDEC16_ROWS(N_, RR_, r0)                                                                \
        } else                                                                                      \
            for (int64_t r = r0; r < r0 + rr; r++) { QDEC16_ROWS(N_, 1, r) }                        \
        break;
static void qdec_block_g16(float *y, int64_t R, const fl_weight *W, int64_t r0, int rr, const qx_t *X, int n, int kind) {
    switch (n) {
    QDEC16_CASE(1, 4)
    QDEC16_CASE(2, 2)
    QDEC16_CASE(3, 1)
    QDEC16_CASE(4, 1)
    default: break;
    }
}

/* y[n, R] = x[n, C] @ dequant(W)^T for n <= QDEC_N; x16: INT16 activations (NF4 always: FASTLOAD_CPU_QDOT=int8
 * gives NF4 weights int16 activations too, as there is no int8 NF4 kernel), else INT8 */
static fl_status qdec(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, int x16) {
    const int64_t R = W->rows, C = W->cols;
    const int kind = qdec_kind(W), g16 = W->group_size == 16;
    if (kind == QK_NF4 || kind == QK_INT5 || kind == QK_INT6 || g16) x16 = 1;
    qx_t X = {.nb = C / 32, .g16 = g16};
    X.nb8 = (X.nb + 7) / 8 * 8;
    const size_t nbt = (size_t)n * (size_t)X.nb, nbt8 = (size_t)n * (size_t)X.nb8, xb = x16 ? 64 : 32,
                 bsb = g16 ? 64 : 32, x0 = nbt * (bsb + xb);
    /* bs16 [n][nb][8 or 16] int32, x [n][nb][32], dx and xs [n][nb8], gidx [nb8], gq [nb8 / 8], xs2 [n][2 nb8] (g16) */
    char *mem = fl_malloc(x0 + nbt8 * 12 + nbt8 / 8 * 8 + (g16 ? nbt8 * 8 : 0));
    if (!mem) return fl_err(FL_E_NOMEM, "CPU matmul: cannot allocate the quantised input (%d x %lld)", n, (long long)C);
    X.bs16 = (int32_t *)mem;
    if (x16) X.x16 = (int16_t *)(mem + nbt * bsb);
    else X.x8 = (int8_t *)(mem + nbt * bsb);
    X.dx = (float *)(mem + x0);
    X.xs = (float *)(mem + x0 + nbt8 * 4);
    X.gidx = (int32_t *)(mem + x0 + nbt8 * 8);
    X.gq = (int64_t *)(mem + x0 + nbt8 * 12);
    memset(X.dx, 0, nbt8 * 8);
    if (g16) {
        X.xs2 = (float *)(mem + x0 + nbt8 * 12 + nbt8 / 8 * 8);
        memset(X.xs2, 0, nbt8 * 8);
    } else
        qdec_gidx(X.gidx, X.gq, X.nb8, W->group_size / 32, C / W->group_size);
    for (int i = 0; i < 16; i++) { /* nf4 * 2^NF4_K is exact in float32; lrintf rounds it half to even */
        const uint16_t v = (uint16_t)(int16_t)lrintf(fl_nf4_table[i] * (float)(1 << NF4_K));
        X.t_lo[i] = (uint8_t)(v & 0xff);
        X.t_hi[i] = (uint8_t)(v >> 8);
    }
    quant_x(&X, x, 0, n, C, kind);
    const int rr = qdec_rr(n);
    const int64_t nblk = (R + rr - 1) / rr;
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        const int64_t r0 = blk * rr;
        if (g16) qdec_block_g16(y, R, W, r0, (int)(R - r0 < rr ? R - r0 : rr), &X, n, kind);
        else if (x16) qdec_block16(y, R, W, r0, (int)(R - r0 < rr ? R - r0 : rr), &X, n, kind);
        else qdec_block8(y, R, W, r0, (int)(R - r0 < rr ? R - r0 : rr), &X, n, kind);
    }
    fl_free(mem);
    return FL_OK;
}

/* ---- Interleaved weights (W->interleaved == 8; cpu_q_interleave makes them after the load) ----
 * 4-bit integer codes (symmetric or min form), groups of a multiple of 32 columns, rows a multiple of 8, float16 /
 * float32 / K scales; 8-bit codes the same way (also groups of 16); 5- / 6-bit split codes as the 4-bit layout plus a
 * high plane after each block's 128 bytes (quant.h fl_qi_code; 6-bit also groups of 16). Rows 8g..8g+7 keep the bytes
 * row-major gives them as a whole, reordered inside (quant.h: fl_qi_code_off, fl_qi_code, fl_qi_sget):
 *   codes: block b (32 columns) of the 8 rows is 128 bytes: row r's word k (columns 8k..8k+7, the 4 bytes row-major
 *          has for them, low nibble first) at b * 128 + k * 32 + r * 4: one 32-byte load is 8 rows x 8 columns;
 *   scales, offsets: group j's value of row r at [j][r] (K scales: the int8 sub-scales [j][r], then the float16
 *          super-scales [super-block][r]).
 * The kernel's lanes are the 8 rows. Per block and word k, (v >> 4s) & 0x000F000F (s = 0..3) is each row's int16 pair
 * (column 8k+s, 8k+s+4), multiplied with x16's pair for those columns broadcast to every lane (vpdpwssd; without
 * AVX512-VNNI madd + add): 16 of them give each row's integer dot for the block in its own lane, then one FMA adds
 * (s_row * dx_b) * dot for all 8 rows, and the offset term m_row * dx_b * sum(x_b) another (m = -8 s for the
 * symmetric form). So the decode, the scale and the conversion are shared by 8 rows and no horizontal sum is left;
 * the row-major kernel (qdec_rows) spends them per row and block. Measured on the dev VM (Zen 4, 1 thread, the
 * TinyLlama-1.1B Q4_0 body, 545 MB): 77 ms a token row-major, 30 ms interleaved (benchmarks/cpu_qmatmul_bench.c).
 * A row's result depends only on its own codes and x (the same bits in any batch, any number of x rows per pass);
 * it differs from the row-major kernel's by float rounding (that sums the block's lanes in another order).
 * x16 per block (quant_x, deint 3): the pairs [x(8k+s), x(8k+s+4)] for k, then s.
 * int8 x (FASTLOAD_CPU_QDOT=int8, VNNI): the same words as u8 codes, 4 a lane, against 4 int8 x (vpdpbusd): half the
 * multiply instructions of int16 x, which is what prompts (compute-bound) gain; x8 per 8 columns [0 1 4 5 2 3 6 7]
 * for nibble codes, natural for bytes (quant_block32 deint 2 / 0). */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPW(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#elif defined(__AVXVNNI__)
#define DPW(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#else
#define DPW(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#endif
/* u8 codes x s8 activations, 4 products a 32-bit lane (int8 x, FASTLOAD_CPU_QDOT=int8): VNNI only (maddubs would
 * saturate 8-bit codes' pair sums); without it the int8 mode takes the int16 kernel */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPB(acc, a, b) _mm256_dpbusd_epi32(acc, a, b)
#define QI_X8 1
#elif defined(__AVXVNNI__)
#define DPB(acc, a, b) _mm256_dpbusd_avx_epi32(acc, a, b)
#define QI_X8 1
#else
#define DPB(acc, a, b) ((void)(a), (void)(b), (acc)) /* never reached (QI_X8 0); its operands count as used */
#define QI_X8 0
#endif
#ifdef __AVX512VL__
#define QI_N 8 /* x rows per pass: 3 vectors each (dot, acc, off) in 32 registers */
#else
#define QI_N 4
#endif

/* 8 rows' values of group j (scales or offsets) of row group base p */
static inline __m256 qi_s8(const char *p, int sd, int64_t ng, int64_t j, int group_size) {
    if (sd == FL_F16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + j * 16)));
    if (sd == FL_F32) return _mm256_loadu_ps((const float *)p + j * 8);
    const __m256 sc = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + j * 8))));
    const int64_t u = j * group_size / FL_KS_SUPER;
    return _mm256_mul_ps(sc, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 8 * ng + u * 16))));
}

/* 8-bit codes (Q8_0, int8 at load, and GGUF's 5- / 6-bit codes where they are held in a byte: FASTLOAD_CPU_CODES56=0),
 * groups of a multiple of 16: block b of the 8 rows is 256 bytes, row r's word k (columns 4k..4k+3) at k * 32 + r * 4. Per word,
 * v & 0x00FF00FF is each row's int16 pair (4k, 4k+2) and (v >> 8) & 0x00FF00FF (4k+1, 4k+3): two vpdpwssd a word.
 * Codes are unsigned (the symmetric form's centre, 128, is the offset term m = -128 s, as the 4-bit kernel's -8 s).
 * G16 (16-column groups: Q6_K): each half block's dot takes its own scale and offset.
 * Split codes (BITS 5, 6; quant.h fl_qi_code): word k's high bits for the column pairs (8k + s, 8k + s + 4), moved
 * to bits 4.. of each 16-bit half, beside the low nibbles (v >> 4s) & 0x000F000F */
static inline __m256i qi_hi(__m256i h, const int HB, const int k, const int s) {
    const int at = fl_qi_hi_bit(HB, k, s); /* the pair's bit in each half of the lane (s < 4: the first half) */
    const __m256i v = at < 4 ? _mm256_slli_epi32(h, 4 - at) : at > 4 ? _mm256_srli_epi32(h, at - 4) : h;
    return _mm256_and_si256(v, _mm256_set1_epi32(HB == 2 ? 0x00300030 : 0x00100010));
}

/* One block's integer dots for words [K0, K1) of the block, every x row */
static inline __attribute__((always_inline)) void qi_dots(__m256i *dot, const uint8_t *qb, const qx_t *X, int64_t b,
                                                          const int N, const int BITS, const int K0, const int K1,
                                                          const int X8, const int CF, const int DUO, const int32_t *init) {
    const int P = BITS == 8 ? 2 : 4; /* int16 pairs a word: 4 (4- to 6-bit: nibbles), 2 (8-bit) */
    const int HB = BITS == 5 || BITS == 6 ? BITS - 4 : 0;
    const __m256i m = _mm256_set1_epi32(BITS == 8 ? 0x00FF00FF : 0x000F000F), m8 = _mm256_set1_epi32(0x0F000F00);
    const __m256i ctr = _mm256_set1_epi16((short)(1 << (BITS - 1))); /* CF: the symmetric centre, off the codes */
    const int NU = BITS == 8 ? 1 : 2; /* x8 dwords a word */
    /* init: each row's dot starts at -centre * sum(x16) (the narrow passes' FOLD: off the dependency chain's end) */
    for (int t = 0; t < N; t++) dot[t] = init ? _mm256_set1_epi32(init[t]) : _mm256_setzero_si256();
    /* DUO (passes of one or two x rows): two independent sums a row, added at the block's end (integers: the same
     * bits). Such passes were bound by the one chain of dependent dot instructions a block (16, 4-5 cycles each), not
     * by their loads. TinyLlama-shape generation, one thread, back to back: Q4_K_M 19.5-20.3 -> 21.3-22.5 tok/s,
     * Q4_0 ~24 -> ~26, Q6_K ~18.5 -> ~20, Q8_0 equal. Four sums at one row were slower than two (Q4_0 23, Q4_K_M
     * 20.7), and so were two written as an array indexed by s % 2 (GCC kept x and pointers on the stack: Q4_0 19). */
    __m256i du[2];
    if (DUO) for (int t = 0; t < N; t++) du[t] = _mm256_setzero_si256();
#define QI_WORD(k)                                                                                                     \
    do {                                                                                                               \
        const __m256i v = _mm256_loadu_si256((const __m256i *)(qb + (k) * 32));                                      \
        __m256i c[4];                                                                                                  \
        if (!X8 || HB) _Pragma("GCC unroll 4") for (int s = 0; s < P; s++) c[s] = _mm256_and_si256(s ? _mm256_srli_epi32(v, (16 / P) * s) : v, m); \
        if (HB) {                                                                                                      \
            const __m256i h = _mm256_loadu_si256((const __m256i *)(qb + 128 + ((k) / (4 / (HB ? HB : 1))) * 32));    \
            _Pragma("GCC unroll 4") for (int s = 0; s < 4; s++) c[s] = _mm256_or_si256(c[s], qi_hi(h, HB, (k), s));  \
        }                                                                                                              \
        if (CF) _Pragma("GCC unroll 4") for (int s = 0; s < P; s++) c[s] = _mm256_sub_epi16(c[s], ctr);              \
        if (X8) { /* bytes: 8-bit the word as it is; nibble forms (0 1 4 5), (2 3 6 7), x8 in that order */          \
            __m256i u[2];                                                                                              \
            if (BITS == 8) u[0] = v;                                                                                   \
            else if (BITS == 4) {                                                                                      \
                u[0] = _mm256_or_si256(_mm256_and_si256(v, m), _mm256_and_si256(_mm256_slli_epi32(v, 4), m8));      \
                u[1] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(v, 8), m), _mm256_and_si256(_mm256_srli_epi32(v, 4), m8)); \
            } else {                                                                                                   \
                u[0] = _mm256_or_si256(c[0], _mm256_slli_epi32(c[1], 8));                                             \
                u[1] = _mm256_or_si256(c[2], _mm256_slli_epi32(c[3], 8));                                             \
            }                                                                                                          \
            for (int t = 0; t < N; t++) {                                                                              \
                const int32_t *xp = (const int32_t *)(X->x8 + ((size_t)b * (size_t)N + (size_t)t) * 32) + (k) * NU; \
                _Pragma("GCC unroll 2") for (int e = 0; e < NU; e++) {                                             \
                    if (DUO && (e & 1)) du[t] = DPB(du[t], u[e], _mm256_set1_epi32(xp[e]));                         \
                    else dot[t] = DPB(dot[t], u[e], _mm256_set1_epi32(xp[e]));                                     \
                }                                                                                                      \
            }                                                                                                          \
        } else                                                                                                         \
        for (int t = 0; t < N; t++) {                                                                                  \
            const int32_t *xp = (const int32_t *)(X->x16 + ((size_t)b * (size_t)N + (size_t)t) * 32) + (k) * P;  \
            _Pragma("GCC unroll 4") for (int s = 0; s < P; s++) {                                                  \
                if (DUO && (s & 1)) du[t] = DPW(du[t], c[s], _mm256_set1_epi32(xp[s]));                             \
                else dot[t] = DPW(dot[t], c[s], _mm256_set1_epi32(xp[s]));                                         \
            }                                                                                                          \
        }                                                                                                              \
    } while (0)
    /* Words unrolled for half blocks (measured: 8-bit 16-column groups 68 -> 83 tok/s on a TinyLlama-shape Q6_K
     * prompt) and split codes (constant shifts); whole 4- / 8-bit blocks as a loop (unrolled, their g32 prompts fell
     * from ~100 to ~76 tok/s) */
    if ((K1 - K0 == 4 && BITS == 8) || HB) {
        QI_WORD(K0);
        QI_WORD(K0 + 1);
        if (K1 - K0 == 4) {
            QI_WORD(K0 + 2);
            QI_WORD(K0 + 3);
        }
    } else
        for (int k = K0; k < K1; k++) QI_WORD(k);
#undef QI_WORD
    if (DUO) for (int t = 0; t < N; t++) dot[t] = _mm256_add_epi32(dot[t], du[t]);
}

/* The interleaved kernel for BITS 4, 5, 6 or 8 (a constant in each instantiation), HZ: offsets stored (else the
 * symmetric form's m = -2^(BITS-1) s), G16: 16-column groups (the block's two halves, each its own scale). */
static inline __attribute__((always_inline)) void qi_rows(float *y, int64_t R, const fl_weight *W, int64_t g0,
                                                          int64_t g1, const qx_t *X, const int N, const int HZ,
                                                          const int BITS, const int G16, const int X8) {
    const int64_t nb = X->nb, G = W->group_size, bpg = G16 ? 1 : G / 32, ng = W->cols / G;
    const size_t bb = 32 * (size_t)BITS, gbytes = (size_t)nb * bb, sgb = 8 * fl_q_srow_bytes(W->cols, (int)G, W->sdtype);
    const int sd = W->sdtype;
    const __m256 centre = _mm256_set1_ps(-(float)(1 << (BITS - 1)));
    const int WH = BITS == 8 ? 4 : 2; /* words a half block */
    /* Symmetric codes on int16 x (FOLD): the centre 2^(BITS-1) comes off the integer dot, not as a float offset term
     * per row and group: N accumulators fewer, no cancellation between two large float terms.
     * Two exact ways to the same int32 (|dot| <= 32 * 255 * 32767): off the codes (CF: signed int16 codes, a
     * subtraction a word shared by the N rows) in wide passes; in narrow ones, where those subtractions are not
     * shared (one row: Q8_0 generation 35 -> 28 tok/s with CF), the dot starts at -centre * sum(x16) (X->cs, one
     * int32 a block broadcast; 8 lanes a block in memory instead cost ~7% at one row: more of L1 beside the
     * streaming codes). The same bits either way: a row's result does not depend on its pass. TinyLlama-shape
     * prompts, 2 threads: Q4_0 95 -> 107 tok/s, Q6_K 74 -> 82; generation equal or better (Q8_0 one thread 19.4 ->
     * 20.8). Not with int8 x: its codes are vpdpbusd's unsigned operand. */
    const int FOLD = !X8 && !HZ, CF = N >= 4;
    /* OFF2 (passes of 3+ rows): the offset term sum_b m_b * dx_b * sum(x_b) in a loop of its own after the dots, the
     * same products summed in the same order (the same bits), its N accumulators and the offsets' loads out of the
     * dots' way (TinyLlama-shape prompts with the wider passes QI_PW allows since, one thread: Q5_K_M 36 -> 40 tok/s,
     * Q4_K_M +2-4%). Not at one or two rows: re-reading the K scales in a second loop cost Q4_K_M generation 7%. */
    const int OFF2 = !FOLD && N > 2;
    for (int64_t g = g0; g < g1; g++) {
        const uint8_t *q = (const uint8_t *)W->data_d + (size_t)g * gbytes;
        const char *sp = (const char *)W->scales_d + (size_t)g * sgb,
                   *zp = HZ ? (const char *)W->zeros_d + (size_t)g * sgb : NULL;
        __m256 acc[QI_N], off[QI_N], s8 = _mm256_setzero_ps(), m8 = _mm256_setzero_ps();
        for (int t = 0; t < N; t++) { acc[t] = _mm256_setzero_ps(); off[t] = _mm256_setzero_ps(); }
        for (int64_t b = 0, j = 0, jb = 0; b < nb; b++) {
            const uint8_t *qb = q + (size_t)b * bb;
#pragma GCC unroll 4
            for (size_t o = 0; o < bb; o += 64) _mm_prefetch((const char *)qb + 8 * bb + o, _MM_HINT_T0);
            __m256i dot[QI_N];
            for (int h = 0; h < (G16 ? 2 : 1); h++) { /* G16: the block's two halves, each its own group (a constant 1 or 2 trips: GCC unrolls it without a pragma, the same code; with one it warned "ignoring loop annotation" for the one-trip forms) */
                if (G16 || jb == 0) {
                    const int64_t jj = G16 ? 2 * b + h : j;
                    s8 = qi_s8(sp, sd, ng, jj, (int)G);
                    if (!FOLD && !OFF2) m8 = HZ ? qi_s8(zp, sd, ng, jj, (int)G) : _mm256_mul_ps(s8, centre);
                }
                /* FOLD && !CF: the dots start at -centre * the block's (half's) integer x sum (quant_x's cs) */
                const int32_t *init = FOLD && !CF ? X->cs + (G16 ? 2 * (size_t)b + (size_t)h : (size_t)b) * (size_t)N : NULL;
                if (G16) qi_dots(dot, qb, X, b, N, BITS, WH * h, WH * h + WH, X8, FOLD && CF, N <= 2, init);
                else qi_dots(dot, qb, X, b, N, BITS, 0, 2 * WH, X8, FOLD && CF, N <= 2, init);
                for (int t = 0; t < N; t++) {
                    const size_t xi = (size_t)b * (size_t)N + (size_t)t; /* pass-major (qx_at) */
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(s8, _mm256_set1_ps(X->dx[xi])), _mm256_cvtepi32_ps(dot[t]), acc[t]);
                    if (!FOLD && !OFF2)
                        off[t] = _mm256_fmadd_ps(m8, _mm256_set1_ps(G16 ? X->xs2[(2 * (size_t)b + (size_t)h) * (size_t)N + (size_t)t] : X->xs[xi]), off[t]);
                }
            }
            if (!G16 && ++jb == bpg) { jb = 0; j++; }
        }
        if (FOLD) {
            for (int t = 0; t < N; t++) _mm256_storeu_ps(y + (size_t)t * (size_t)R + (size_t)g * 8, acc[t]);
            continue;
        }
        const float *xs = G16 ? X->xs2 : X->xs; /* OFF2: per block, or G16's half blocks */
        for (int64_t jj = 0; jj < (OFF2 ? (G16 ? 2 * nb : nb) : 0); jj++) {
            if (G16 || jj % bpg == 0) {
                const int64_t gj = G16 ? jj : jj / bpg;
                m8 = HZ ? qi_s8(zp, sd, ng, gj, (int)G) : _mm256_mul_ps(qi_s8(sp, sd, ng, gj, (int)G), centre);
            }
            for (int t = 0; t < N; t++) off[t] = _mm256_fmadd_ps(m8, _mm256_set1_ps(xs[(size_t)jj * (size_t)N + (size_t)t]), off[t]);
        }
        for (int t = 0; t < N; t++) _mm256_storeu_ps(y + (size_t)t * (size_t)R + (size_t)g * 8, _mm256_add_ps(acc[t], off[t]));
    }
}

/* x rows a pass (qi_matmul): 6 for 16-column groups, else 8. Measured per form (TinyLlama-shape prompts) while the
 * kernel spilled (a pointer a row of x, offsets in the dots' loop): folded Q6_K 4 -> 6 rows 76 -> 87 tok/s (8: 85),
 * Q5_0 6 -> 8 65 -> 71; with offsets or int8 x 16-column groups took 4 (Q6_K int8 x 53 -> 101 from 8) and split codes
 * 6. Since x is pass-major (qx_at) and the offsets have their own loop (OFF2), every form takes the folded widths:
 * one thread, pp128, Q5_K_M 38 -> 41 tok/s, with int8 x Q6_K 54 -> 62, Q5_K_M 61 -> 68, Q5_0 64 -> 71. */
#define QI_PW(G16_) ((G16_) ? 6 : 8)
/* HZ (offsets stored) as a constant: Q6_K's prompt was ~9% slower with it a branch where the scales are read.
 * Sanitized builds (speed does not matter there, compile time does: ~2 min for this file) take it as a value.
 * Each form is instantiated for N up to its pass width only (QI_FORM's QI_NS6 / QI_NS8, matching QI_PW: the rest
 * would be dead code, the kernel is large, and this file's compile time grows with every instantiation). */
#ifdef __SANITIZE_ADDRESS__
#define QI_HZ(N_, BITS_, G16_, X8_)                                                                  \
    do {                                                                                            \
        qi_rows(y, R, W, g0, g1, X, N_, W->zeros_d != NULL, BITS_, G16_, X8_);                      \
    } while (0)
#else
#define QI_HZ(N_, BITS_, G16_, X8_)                                                                  \
    do {                                                                                            \
        if (W->zeros_d) qi_rows(y, R, W, g0, g1, X, N_, 1, BITS_, G16_, X8_);                       \
        else qi_rows(y, R, W, g0, g1, X, N_, 0, BITS_, G16_, X8_);                                  \
    } while (0)
#endif
#if QI_X8
#define QI_RUN(N_, BITS_, G16_)                                                                     \
    do {                                                                                            \
        if (X->x8) QI_HZ(N_, BITS_, G16_, 1);                                                        \
        else QI_HZ(N_, BITS_, G16_, 0);                                                              \
    } while (0)
#else
#define QI_RUN(N_, BITS_, G16_) QI_HZ(N_, BITS_, G16_, 0)
#endif
/* n = 1 .. 8; QI_RUN picks int8 or int16 x, QI_HZ offsets or not */
#define QI_NS4(B_, G_)                                                                              \
    case 1: QI_RUN(1, B_, G_); break;                                                                \
    case 2: QI_RUN(2, B_, G_); break;                                                                \
    case 3: QI_RUN(3, B_, G_); break;                                                                \
    case 4: QI_RUN(4, B_, G_); break;
#if QI_N == 8
#define QI_NS6(B_, G_)                                                                              \
    QI_NS4(B_, G_)                                                                                  \
    case 5: QI_RUN(5, B_, G_); break;                                                                \
    case 6: QI_RUN(6, B_, G_); break;
#define QI_NS8(B_, G_)                                                                              \
    QI_NS6(B_, G_)                                                                                  \
    case 7: QI_RUN(7, B_, G_); break;                                                                \
    case 8: QI_RUN(8, B_, G_); break;
#else
#define QI_NS6 QI_NS4
#define QI_NS8 QI_NS4
#endif
/* One function a form (not one switch over all of them: a single function of ~100 inlined kernels compiled
 * super-linearly slowly, most of all sanitized) */
#define QI_FORM(B_, G_, NS_)                                                                        \
    static __attribute__((noinline)) int qi_form_##B_##_##G_(float *y, int64_t R, const fl_weight *W, int64_t g0, \
                                                             int64_t g1, const qx_t *X, int n) {   \
        switch (n) { NS_(B_, G_) default: return 0; }                                               \
        return 1;                                                                                   \
    }
QI_FORM(4, 0, QI_NS8)
QI_FORM(5, 0, QI_NS8)
QI_FORM(6, 0, QI_NS8)
QI_FORM(6, 1, QI_NS6)
QI_FORM(8, 0, QI_NS8)
QI_FORM(8, 1, QI_NS6)
/* 1, or 0 where no instantiation takes (n, W's form): qi_matmul turns that into an error */
static int qi_block(float *y, int64_t R, const fl_weight *W, int64_t g0, int64_t g1, const qx_t *X, int n) {
    switch (W->bits * 2 + (W->group_size == 16)) {
    case 8: return qi_form_4_0(y, R, W, g0, g1, X, n);
    case 10: return qi_form_5_0(y, R, W, g0, g1, X, n);
    case 12: return qi_form_6_0(y, R, W, g0, g1, X, n);
    case 13: return qi_form_6_1(y, R, W, g0, g1, X, n);
    case 16: return qi_form_8_0(y, R, W, g0, g1, X, n);
    case 17: return qi_form_8_1(y, R, W, g0, g1, X, n);
    default: return 0;
    }
}
#undef QI_FORM
#undef QI_NS4
#undef QI_NS6
#undef QI_NS8

/* x's rows from t0 on (all rows quantised) as a qx_t of their own; pass-major (pw), t0 starts a pass */
static qx_t qx_rows(const qx_t *X, int t0) {
    qx_t V = *X;
    if (X->x16) V.x16 += (size_t)t0 * (size_t)X->nb * 32;
    if (X->x8) V.x8 += (size_t)t0 * (size_t)X->nb * 32;
    V.bs16 += (size_t)t0 * (size_t)X->nb * (X->g16 ? 16 : 8);
    V.dx += (size_t)t0 * (size_t)X->nb8;
    V.xs += (size_t)t0 * (size_t)X->nb8;
    if (X->xs2) V.xs2 += (size_t)t0 * (size_t)X->nb8 * 2;
    if (X->cs) V.cs += (size_t)t0 * (size_t)X->nb8 * (X->g16 ? 2 : 1);
    return V;
}

/* y[n, R] = x[n, C] @ dequant(W)^T, W interleaved, any n: every row of x quantised first (rows split among threads
 * past 8), then each thread takes chunks of 4 row groups (32 weight rows: 32 KB of codes at 2048 columns, which stay
 * in L1 / L2) through all of x in passes of QI_N rows: the codes are read from memory once whatever n is. */
static fl_status qi_matmul(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, int x8) {
    const int64_t R = W->rows, C = W->cols;
    if (!cpu_qi_takes(W)) /* cpu_q_interleave interleaves nothing else: qi_block would skip it */
        return fl_err(FL_E_INTERNAL, "CPU matmul: an interleaved [%lld, %lld] weight of %d bits, group %d, that no kernel reads",
                      (long long)R, (long long)C, W->bits, W->group_size);
    qx_t X = {.nb = C / 32, .il = W->bits, .g16 = W->group_size == 16};
    X.nb8 = (X.nb + 7) / 8 * 8;
    const size_t nbt = (size_t)n * (size_t)X.nb, nbt8 = (size_t)n * (size_t)X.nb8, bsb = X.g16 ? 64 : 32;
    /* bs16 [n][nb][8 or 16] (quant_x writes it), x16 [n][nb][32], dx and xs [n][nb8], g16: xs2 [n][2 nb8] */
    const int fold = !(x8 && QI_X8) && !W->zeros_d; /* qi_rows' FOLD: cs [n][nb8] (g16: [n][2 nb8]) */
    const size_t xsb = nbt8 * (X.g16 ? 16 : 8);
    char *mem = fl_malloc(nbt * (bsb + 64) + xsb + (fold ? nbt8 * (X.g16 ? 8 : 4) : 0));
    if (!mem) return fl_err(FL_E_NOMEM, "CPU matmul: cannot allocate the quantised input (%d x %lld)", n, (long long)C);
    X.bs16 = (int32_t *)mem;
    if (fold) X.cs = (int32_t *)(mem + nbt * (bsb + 64) + xsb);
    if (x8 && QI_X8) X.x8 = (int8_t *)(mem + nbt * bsb); /* int8 x: the VNNI form of qi_dots */
    else X.x16 = (int16_t *)(mem + nbt * bsb);
    X.dx = (float *)(mem + nbt * (bsb + 64));
    X.xs = (float *)(mem + nbt * (bsb + 64) + nbt8 * 4);
    if (X.g16) X.xs2 = (float *)(mem + nbt * (bsb + 64) + nbt8 * 8);
    memset(X.dx, 0, nbt8 * (X.g16 ? 16 : 8));
    const int nt = cpu_threads(be);
    const int pw0 = QI_PW(X.g16), pw = pw0 < QI_N ? pw0 : QI_N; /* x rows a pass */
    X.pw = pw; /* x pass-major (qx_at) */
    X.nr = n;
#pragma omp parallel for num_threads(nt) schedule(static) if (n > 8)
    for (int t = 0; t < n; t++) quant_x(&X, x + (size_t)t * (size_t)C, t, 1, C, W->bits == 4 ? QK_INT4 : QK_INT8);
    const int64_t ngr = R / 8;
    /* row groups in chunks of 4 (32 rows) a thread at a time: few enough that 2 threads share the work evenly */
    const int64_t per = 4, nch = (ngr + per - 1) / per;
    int missed = 0;
#pragma omp parallel for num_threads(nt) schedule(static)
    for (int64_t ch = 0; ch < nch; ch++) {
        const int64_t g0 = ch * per, g1 = g0 + per < ngr ? g0 + per : ngr;
        for (int t0 = 0; t0 < n; t0 += pw) {
            const qx_t V = qx_rows(&X, t0);
            if (!qi_block(y + (size_t)t0 * (size_t)R, R, W, g0, g1, &V, n - t0 < pw ? n - t0 : pw)) {
#pragma omp atomic write
                missed = 1;
            }
        }
    }
    fl_free(mem);
    if (missed) /* cpu_qi_takes and the pass widths above disagree with qi_block's instantiations: a bug, said so */
        return fl_err(FL_E_INTERNAL, "CPU matmul: no interleaved kernel for %d bits, group %d, %s, passes of %d rows",
                      W->bits, W->group_size, W->zeros_d ? "offsets" : "symmetric", n < pw ? n : pw);
    return FL_OK;
}

#endif /* QDOT */

/* Whether qi_rows takes W's format once interleaved: integer codes of 4, 5, 6 or 8 bits, groups a multiple of 32
 * columns (also 16 for 6 and 8 bits), rows a multiple of 8, float16 / float32 / K scales */
int cpu_qi_takes(const fl_weight *W) {
#ifndef QDOT
    (void)W;
    return 0; /* the portable build has no qi_rows: row-major, which cpu_q_widen reads */
#else
    const int b = W->bits;
    return W->dtype == FL_QUANT && (b == 4 || b == 5 || b == 6 || b == 8) && W->code == FL_QCODE_INT &&
           (W->group_size % 32 == 0 || (W->group_size == 16 && (b == 6 || b == 8))) && W->cols % 32 == 0 &&
           W->rows % 8 == 0 && W->rows > 0 && (W->sdtype == FL_F16 || W->sdtype == FL_F32 || W->sdtype == FL_I8);
#endif
}

/* Split codes: one row's high bits of one block from the row-major plane (quant.h fl_q_hi_at: per span of 128 / 256
 * columns 32 bytes, byte l's bits sh.. those of column pos(l) = 2l (l < 16) or 2(l - 16) + 1 of the span's block) into
 * the interleaved plane's lanes (quant.h fl_qi_code): dst, then dst + 32 for 6-bit codes' second vector */
static inline __attribute__((always_inline)) void qi_hi_words(uint8_t *dst, const uint8_t *hp, int sh, const int HB) {
    uint32_t h[2] = {0, 0};
#pragma GCC unroll 32
    for (int l = 0; l < 32; l++) {
        const int w = l < 16 ? 2 * l : 2 * (l - 16) + 1, k = w / 8, cw = w % 8;
        h[k / (4 / HB)] |= (uint32_t)((hp[l] >> sh) & ((1 << HB) - 1)) << fl_qi_hi_bit(HB, k, cw);
    }
    for (int v = 0; v < HB; v++) memcpy(dst + (size_t)v * 32, &h[v], 4);
}

/* One row group's codes (8 rows from src, row-major) into the interleaved layout at dst */
static inline __attribute__((always_inline)) void qi_group(uint8_t *restrict dst, const uint8_t *restrict src, int64_t C,
                                                           const int BITS) {
    const int HB = BITS == 5 || BITS == 6 ? BITS - 4 : 0, WB = HB ? 4 : BITS; /* 4-byte words moved as they are */
    const size_t rowb = (size_t)C * (size_t)BITS / 8;
    for (int r = 0; r < 8; r++) {
        const uint8_t *row = src + (size_t)r * rowb;
        for (int64_t b = 0; b < C / 32; b++) {
            uint8_t *blk = dst + (size_t)b * 32 * (size_t)BITS;
            for (int k = 0; k < WB; k++) memcpy(blk + (size_t)k * 32 + (size_t)r * 4, row + (size_t)b * 4 * (size_t)WB + (size_t)k * 4, 4);
            if (HB == 2) qi_hi_words(blk + 128 + (size_t)r * 4, row + C / 2 + (b / 4) * 32, 2 * (int)(b % 4), 2);
            else if (HB == 1) qi_hi_words(blk + 128 + (size_t)r * 4, row + C / 2 + (b / 8) * 32, (int)(b % 8), 1);
        }
    }
}

/* The backend's interleave_weight: W in place to the interleaved layout when qi_rows takes its format
 * (4- or 8-bit integer codes, groups a multiple of 32 columns or 8-bit with 16, rows a multiple of 8, float16 /
 * float32 / K scales; an act-order perm only reorders x: allowed), else nothing. NF4, 5- / 6-bit split codes and 4-bit
 * 16-column groups stay row-major. A temporary of at most 64 row groups. */
fl_status cpu_q_interleave(fl_backend *be, fl_weight *W, int *done) {
    *done = 0;
    if (W->interleaved || !cpu_qi_takes(W)) return FL_OK;
    const int64_t R = W->rows, C = W->cols, ng = C / W->group_size, ngr = R / 8;
    const int bits = W->bits; /* words of 4 bytes a block of 32 columns: 4 (4-bit) or 8 (8-bit); split codes: 4 + the high plane */
    const size_t rowb = (size_t)C * (size_t)bits / 8, gb = 8 * rowb, srow = fl_q_srow_bytes(C, W->group_size, W->sdtype), sgb = 8 * srow;
    const int64_t cap = ngr < 64 ? ngr : 64; /* row groups through the temporary at a time */
    uint8_t *tmp = fl_malloc((gb + 2 * sgb) * (size_t)cap);
    if (!tmp) return fl_err(FL_E_NOMEM, "interleaving a [%lld, %lld] weight: cannot allocate its temporary",
                            (long long)R, (long long)C);
    const size_t es = W->sdtype == FL_F32 ? 4 : W->sdtype == FL_F16 ? 2 : 1;
    for (int64_t c0 = 0; c0 < ngr; c0 += cap) {
        const int64_t cn = ngr - c0 < cap ? ngr - c0 : cap;
        uint8_t *q = (uint8_t *)W->data_d + (size_t)c0 * gb;
        memcpy(tmp, q, gb * (size_t)cn);
#pragma omp parallel for num_threads(cpu_threads(be)) schedule(static)
        for (int64_t g = 0; g < cn; g++) {
            uint8_t *dst = q + (size_t)g * gb;
            const uint8_t *src = tmp + (size_t)g * gb;
            switch (bits) { /* constant word counts and shifts in each */
            case 4: qi_group(dst, src, C, 4); break;
            case 5: qi_group(dst, src, C, 5); break;
            case 6: qi_group(dst, src, C, 6); break;
            default: qi_group(dst, src, C, 8); break;
            }
        }
        for (int part = 0; part < 2; part++) {
            uint8_t *sp = (uint8_t *)(part ? W->zeros_d : W->scales_d);
            if (!sp) continue;
            sp += (size_t)c0 * sgb;
            uint8_t *st = tmp + (gb + (size_t)part * sgb) * (size_t)cap;
            memcpy(st, sp, sgb * (size_t)cn);
            for (int64_t g = 0; g < cn; g++)
                for (int r = 0; r < 8; r++) {
                    const uint8_t *row = st + (size_t)g * sgb + (size_t)r * srow;
                    uint8_t *dst = sp + (size_t)g * sgb;
                    for (int64_t j = 0; j < ng; j++) memcpy(dst + ((size_t)j * 8 + (size_t)r) * es, row + (size_t)j * es, es);
                    if (W->sdtype == FL_I8) /* the float16 super-scales after the 8 x ng sub-scales */
                        for (int64_t u = 0; u < C / FL_KS_SUPER; u++)
                            memcpy(dst + 8 * (size_t)ng + ((size_t)u * 8 + (size_t)r) * 2, row + (size_t)ng + (size_t)u * 2, 2);
                }
        }
    }
    fl_free(tmp);
    W->interleaved = 8;
    *done = 1;
    return FL_OK;
}


/* y[n, R] = x[n, C] @ dequant(W)^T (+ bias). Act-order weights first gather x (xg[:, j] = x[:, perm[j]]). */
fl_status cpu_qmatmul(fl_backend *be, float *y, const float *x, int n, const fl_weight *W, const fl_weight *bias) {
    const fl_qlayout L = fl_q_layout_of(W);
    FL_TRY(fl_q_check(&L, W->rows, W->cols));
    const int64_t C = W->cols;
    float *xg = NULL;
    if (W->perm_d) {
        if (!(xg = fl_malloc((size_t)n * (size_t)C * sizeof(float))))
            return fl_err(FL_E_NOMEM, "CPU matmul: cannot allocate the gathered input (%d x %lld)", n, (long long)C);
        for (int i = 0; i < n; i++)
            for (int64_t j = 0; j < C; j++) xg[(size_t)i * (size_t)C + (size_t)j] = x[(size_t)i * (size_t)C + (size_t)W->perm_d[j]];
        x = xg;
    }
    fl_status st;
#ifdef QDOT
    /* Up to QDEC_N rows of x per pass over the codes; more rows (the engine's decode steps batch requests) go in
     * passes of QDEC_N: the codes are read ceil(n / QDEC_N) times, not dequantised to float for a GEMM. Past
     * QDEC_MAX_N rows (prefill) the float GEMM reads them once and wins. An interleaved weight takes qi_matmul at
     * every n (its codes read once, passes of QI_N over a chunk held in cache): on the TinyLlama-1.1B Q4_0 body, 2
     * threads, 123-128 tok/s for 16-256 rows against the float GEMM's 47-93 (benchmarks/cpu_qmatmul_bench.c). */
    const int g16ok = L.group_size == 16 && C % 32 == 0 && L.code == FL_QCODE_INT; /* qdec16_rows */
    const int maxn = W->interleaved ? INT_MAX : QDEC_MAX_N;
    const int mode = n >= 1 && n <= maxn && (L.group_size % 32 == 0 || g16ok) ? qdot_mode() : QDOT_FLOAT;
    if (mode != QDOT_FLOAT && W->interleaved) { /* int8 x with VNNI, else int16 */
        const int64_t R = W->rows;
        st = qi_matmul(be, y, x, n, W, mode == QDOT_INT8);
        if (st == FL_OK && bias && bias->data_d)
            for (int i = 0; i < n; i++)
                for (int64_t r = 0; r < R; r++) y[(int64_t)i * R + r] += cpu_elem_f32(bias->data_d, bias->dtype, r);
    } else if (mode != QDOT_FLOAT) {
        const int64_t R = W->rows;
        st = FL_OK;
        for (int i0 = 0; i0 < n && st == FL_OK; i0 += QDEC_N)
            st = qdec(be, y + (size_t)i0 * (size_t)R, x + (size_t)i0 * (size_t)C, n - i0 < QDEC_N ? n - i0 : QDEC_N, W,
                      mode == QDOT_INT16);
        if (st == FL_OK && bias && bias->data_d)
            for (int i = 0; i < n; i++)
                for (int64_t r = 0; r < R; r++) y[(int64_t)i * R + r] += cpu_elem_f32(bias->data_d, bias->dtype, r);
    } else
#endif
        st = cpu_gemm(be, y, x, n, W, bias);
    fl_free(xg);
    return st;
}
