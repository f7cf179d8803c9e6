/* quant_ref.c: the reference side of fastload's quantised weight format (csrc/quant.h):
 * layout checks and sizes, the layout of quantisation at load, the reference dequantisation every
 * kernel is tested against, and the host quantiser that the CUDA quantiser matches bit for bit.
 *
 * Reference dequantisation (fl_q_dequant_rows), per code q of column c, g = c / group_size:
 *   min form        w = fmaf(q, s, m)                       (one rounding)
 *   symmetric       w = s * (q - 2^(bits-1))                (one rounding; equals fmaf(q, s, -s * 2^(bits-1)))
 *   NF4             w = s * nf4[q], or fmaf(nf4[q], s, m) with offsets
 *
 * Quantisation at load (fl_q_quantize_rows), all in float32 on the source widened exactly; per group:
 *   int8  amax = max|x|; s = f32(fp16(amax / 127)); q = s == 0 ? 128 : clamp(rintf(x / s), -127, 127) + 128
 *   int4  a search over 12 (scale, offset) candidates, the one with the least squared error kept:
 *         mn = min x, mx = max x (a zero min / max is +0 when any element is +0, else -0);
 *         candidate 0 (round to nearest): s = f32(fp16((mx - mn) / 15)), m = f32(fp16(mn)); if s == 0 every
 *           code is 0 and that is the result (no search);
 *         codes for (s, m): q = clamp(rintf((x - m) * i), 0, 15), i = 1.0f / s (also the codes stored);
 *         a group sum S(f) is strided: partial p[j] (j < 32, from +0) takes the elements c = j, j + 32, .. in
 *           that order, then for o = 16, 8, 4, 2, 1: p[j] = p[j] + p[j + o] for j < o; S = p[0];
 *         E(s, m) = S with p[j] = fmaf(e, e, p[j]), e = fmaf(q, s, m) - x;
 *         sx = S with p[j] = p[j] + x; r = mx - mn;
 *         candidates k = 1..11 (llama.cpp's make_qkx2_quants, unweighted): is = ((float)(69 + k) / 5) / r
 *           (step counts 14.0, 14.2, .. 16.0 over the range); l = clamp(rintf((x - mn) * is), 0, 15);
 *           sl = sum l, sl2 = sum l * l (exact integers), sxl = S with p[j] = fmaf(x, l, p[j]);
 *           D = G * sl2 - sl * sl (int64); skipped when D <= 0; with Gf, slf, sl2f, Df = (float) of each:
 *           s = f32(fp16(fmaf(Gf, sxl, -(sx * slf)) / Df)), m = f32(fp16(fmaf(sl2f, sx, -(slf * sxl)) / Df))
 *           (the least-squares fit of x ~ s * l + m); skipped unless 0 < s <= 65504 and |m| <= 65504;
 *         the kept candidate is the first with the least E (a later one must be strictly smaller; a NaN E
 *           never wins, and a NaN E of candidate 0 keeps candidate 0).
 *   nf4   amax = max|x|; s = f32(fp16(amax)); v = s == 0 ? 0 : x / s; q = #{i < 15 : v > mid[i]},
 *         mid[i] = (nf4[i] + nf4[i + 1]) * 0.5f; the sign of s is searched (the code book is not symmetric: 8
 *         levels above 0, 7 below): when s != 0, -s is kept if E(-s) < E(s) (strictly; a NaN E never wins), E(t) the
 *         strided sum (as int4's) of e * e, e = fmaf(nf4[q(t)], t, -x), q(t) the codes for scale t.
 * max / min / clamp are fmaxf / fminf (a NaN operand loses: NaN inputs do not poison a group's scale,
 * a NaN value clamps to the low end), rintf rounds half to even (the default rounding mode). Every
 * multiply-add that decides a code or a choice is an explicit fmaf (the compiler may not contract others);
 * the CUDA quantiser (qquantize_kernel) computes the same values with IEEE PTX, lane j of a warp taking partial j. */
#include "quant.h"
#include <math.h>
#include <stdlib.h>

const float fl_nf4_table[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f,
};

fl_status fl_q_check(const fl_qlayout *L, int64_t rows, int64_t cols) {
    if (rows < 0 || cols <= 0)
        return fl_err(FL_E_VALUE, "quantised weight shape [%lld, %lld] is not valid", (long long)rows, (long long)cols);
    if (L->bits != 4 && L->bits != 8 && L->bits != 5 && L->bits != 6)
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: bits %d is not supported (4 or 8; 5 or 6 split)", L->bits);
    if ((L->bits == 5 || L->bits == 6) && (L->code != FL_QCODE_INT || cols % (L->bits == 6 ? 128 : 256)))
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: %d-bit split codes need integer codes and cols a multiple of %d "
                      "(code %d, cols %lld)", L->bits, L->bits == 6 ? 128 : 256, L->code, (long long)cols);
    if (L->code != FL_QCODE_INT && L->code != FL_QCODE_NF4)
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: code %d is not supported (0 = integer, 1 = NF4)", L->code);
    if (L->code == FL_QCODE_NF4 && L->bits != 4)
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: the NF4 code book needs bits 4, not %d", L->bits);
    if (L->sdtype != FL_F16 && L->sdtype != FL_F32 && L->sdtype != FL_I8)
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: scale dtype %d is not supported (float16, float32 or K scales)",
                      (int)L->sdtype);
    if (L->sdtype == FL_I8 && (L->code != FL_QCODE_INT || (L->group_size != 16 && L->group_size != 32) || cols % FL_KS_SUPER))
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: K scales need integer codes, group 16 or 32 and cols a multiple of "
                      "%d (code %d, group %d, cols %lld)", FL_KS_SUPER, L->code, L->group_size, (long long)cols);
    if (L->group_size <= 0)
        return fl_err(FL_E_VALUE, "quantised weight: group_size %d is not positive", L->group_size);
    if (cols % L->group_size)
        return fl_err(FL_E_VALUE, "quantised weight: group_size %d does not divide cols %lld", L->group_size,
                      (long long)cols);
    if (L->group_size % 16)
        return fl_err(FL_E_UNSUPPORTED, "quantised weight: group_size %d is not a multiple of 16", L->group_size);
    return FL_OK;
}

fl_status fl_q_sizes(const fl_qlayout *L, int64_t rows, int64_t cols, size_t *data, size_t *scales, size_t *zeros,
                     size_t *perm) {
    FL_TRY(fl_q_check(L, rows, cols));
    size_t d, s, p = 0;
    if ((size_t)cols > SIZE_MAX / 8 || !fl_mul_size((size_t)rows, (size_t)cols * (size_t)L->bits / 8, &d) ||
        !fl_mul_size((size_t)rows, fl_q_srow_bytes(cols, L->group_size, L->sdtype), &s) ||
        (L->has_perm && !fl_mul_size((size_t)cols, 4, &p)))
        return fl_err(FL_E_VALUE, "quantised weight [%lld, %lld]: size overflows", (long long)rows, (long long)cols);
    if (data) *data = d;
    if (scales) *scales = s;
    if (zeros) *zeros = L->has_zeros ? s : 0;
    if (perm) *perm = p;
    return FL_OK;
}

fl_qlayout fl_q_layout_of(const fl_weight *w) {
    return (fl_qlayout){.bits = w->bits, .group_size = w->group_size, .sdtype = w->sdtype,
                        .has_zeros = w->zeros_d != NULL, .code = w->code, .has_perm = w->perm_d != NULL};
}

fl_weight fl_weight_rows(const fl_weight *w, int64_t row0, int64_t rows) {
    /* an interleaved weight (the CPU's rows by 8) gives the same offsets for row0 a multiple of 8, which is all
     * fl_model_interleave lets it be cut at */
    fl_weight v = *w;
    v.rows = rows;
    if (w->dtype != FL_QUANT) {
        v.data_d = (char *)w->data_d + (size_t)row0 * (size_t)w->cols * (size_t)fl_dtype_size(w->dtype);
        return v;
    }
    const size_t cb = (size_t)w->cols * (size_t)w->bits / 8;
    const size_t sb = fl_q_srow_bytes(w->cols, w->group_size, w->sdtype);
    v.data_d = (char *)w->data_d + (size_t)row0 * cb;
    v.scales_d = (char *)w->scales_d + (size_t)row0 * sb;
    v.zeros_d = w->zeros_d ? (char *)w->zeros_d + (size_t)row0 * sb : NULL;
    v.perm_d = NULL;
    return v;
}

static const char *scheme_name(int scheme) {
    switch (scheme) {
    case FL_QS_INT8: return "int8";
    case FL_QS_INT4: return "int4";
    case FL_QS_NF4: return "nf4";
    case FL_QS_NONE: return "none";
    default: return "?";
    }
}

/* Default groups: int8 per channel (cols), int4 128, nf4 64. When the default does not divide cols
 * (SmolLM2's 576 columns and int4's 128), the largest multiple of 16 below it that divides cols is
 * used (576: 96). An explicit group_size must divide cols. */
fl_status fl_q_layout_for_scheme(int scheme, int group_size, int64_t cols, fl_qlayout *out) {
    fl_qlayout L = {.sdtype = FL_F16, .code = FL_QCODE_INT};
    int dflt;
    switch (scheme) {
    case FL_QS_INT8: L.bits = 8; dflt = 0; break;
    case FL_QS_INT4: L.bits = 4; L.has_zeros = 1; dflt = 128; break;
    case FL_QS_NF4: L.bits = 4; L.code = FL_QCODE_NF4; dflt = 64; break;
    default: return fl_err(FL_E_VALUE, "quantisation scheme %d is not int8, int4 or nf4", scheme);
    }
    if (cols <= 0 || cols > INT32_MAX)
        return fl_err(FL_E_VALUE, "%s quantisation: cols %lld is not valid", scheme_name(scheme), (long long)cols);
    if (group_size < 0)
        return fl_err(FL_E_VALUE, "%s quantisation: group_size %d is negative", scheme_name(scheme), group_size);
    if (group_size > 0) L.group_size = group_size;
    else if (dflt == 0) L.group_size = (int)cols;
    else {
        if (cols % 16)
            return fl_err(FL_E_VALUE, "%s quantisation: cols %lld is not a multiple of 16", scheme_name(scheme),
                          (long long)cols);
        int g = dflt;
        while (g > 16 && cols % g) g -= 16;
        L.group_size = g;
    }
    fl_status st = fl_q_check(&L, 1, cols);
    if (st != FL_OK) return fl_err_prefix(st, "%s quantisation", scheme_name(scheme));
    *out = L;
    return FL_OK;
}

static inline void sstore(void *p, fl_dtype t, size_t i, float v) {
    if (t == FL_F32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = fl_f32_to_f16(v);
}

fl_status fl_q_dequant_rows(const fl_weight *w, int64_t r0, int64_t n, float *out) {
    if (w->dtype != FL_QUANT) return fl_err(FL_E_INTERNAL, "fl_q_dequant_rows: weight is not quantised");
    const fl_qlayout L = fl_q_layout_of(w);
    FL_TRY(fl_q_check(&L, w->rows, w->cols));
    if (r0 < 0 || n < 0 || r0 + n > w->rows)
        return fl_err(FL_E_VALUE, "fl_q_dequant_rows: rows [%lld, %lld) outside [0, %lld)", (long long)r0,
                      (long long)(r0 + n), (long long)w->rows);
    const int64_t C = w->cols, rowbytes = C * L.bits / 8;
    const float off = -(float)(1 << (L.bits - 1));
    for (int64_t i = 0; i < n; i++) {
        const int64_t r = r0 + i;
        const uint8_t *q = (const uint8_t *)w->data_d + (size_t)r * (size_t)rowbytes;
        float *o = out + (size_t)i * (size_t)C;
        for (int64_t c = 0; c < C; c++) {
            const unsigned code = w->interleaved ? fl_qi_code(w->data_d, C, L.bits, r, c) : fl_q_code(q, L.bits, C, c);
            const int64_t g = c / L.group_size;
            const float s = fl_q_wsget(w, w->scales_d, r, g);
            float v;
            if (L.code == FL_QCODE_NF4)
                v = w->zeros_d ? fmaf(fl_nf4_table[code], s, fl_q_wsget(w, w->zeros_d, r, g)) : s * fl_nf4_table[code];
            else if (w->zeros_d) v = fmaf((float)code, s, fl_q_wsget(w, w->zeros_d, r, g));
            else v = s * ((float)code + off);
            o[c] = v;
        }
    }
    return FL_OK;
}

static inline float src_val(const void *p, fl_dtype t, size_t i) {
    switch (t) {
    case FL_F16: return fl_f16_to_f32(((const uint16_t *)p)[i]);
    case FL_BF16: return fl_bf16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

/* int4's search (the rules at the top). Sums over a group are strided over 32 partials combined in a fixed tree,
 * the order of the CUDA quantiser's warp (lane j takes partial j); the partial loops vectorise. */
#define Q4_P 32
/* clamp(v, 0, 15) as fminf(fmaxf(v, 0), 15) gives it (a NaN gives 0), written so that the loops vectorise */
static inline float clamp15(float v) {
    const float t = v > 0.0f ? v : 0.0f;
    return t < 15.0f ? t : 15.0f;
}
static float tree32(float *p) {
    for (int o = Q4_P / 2; o > 0; o >>= 1)
        for (int j = 0; j < o; j++) p[j] = p[j] + p[j + o];
    return p[0];
}

/* E(s, m) of a group x[0..G-1] (s != 0) */
static float int4_err(const float *x, int64_t G, float s, float m) {
    float p[Q4_P] = {0};
    const float inv = 1.0f / s;
    int64_t c = 0;
    for (; c + Q4_P <= G; c += Q4_P)
        for (int j = 0; j < Q4_P; j++) {
            const float q = clamp15(rintf((x[c + j] - m) * inv));
            const float e = fmaf(q, s, m) - x[c + j];
            p[j] = fmaf(e, e, p[j]);
        }
    for (int j = 0; c + j < G; j++) {
        const float q = clamp15(rintf((x[c + j] - m) * inv));
        const float e = fmaf(q, s, m) - x[c + j];
        p[j] = fmaf(e, e, p[j]);
    }
    return tree32(p);
}

/* candidates 1..FL_Q4_CANDIDATES: *s, *m come in as candidate 0 and leave as the kept one */
static void int4_search(const float *x, int64_t G, float mn, float mx, float *s, float *m) {
    float best = int4_err(x, G, *s, *m);
    if (best != best) return;
    float p[Q4_P] = {0};
    for (int64_t c = 0; c < G; c++) p[c % Q4_P] = p[c % Q4_P] + x[c];
    const float sx = tree32(p), r = mx - mn, Gf = (float)G;
    for (int k = 1; k <= FL_Q4_CANDIDATES; k++) {
        const float is = ((float)(69 + k) / 5.0f) / r;
        /* sl, sl2 are exact integers: partials held as floats are exact while G * 225 / 32 < 2^24 (the loop then
         * vectorises), int64 partials beyond that */
        float fl[Q4_P] = {0}, fl2[Q4_P] = {0}, pxl[Q4_P] = {0};
        int64_t sl = 0, sl2 = 0;
        int64_t c = 0;
        if (G <= (1 << 21)) {
            for (; c + Q4_P <= G; c += Q4_P)
                for (int j = 0; j < Q4_P; j++) {
                    const float l = clamp15(rintf((x[c + j] - mn) * is));
                    fl[j] += l;
                    fl2[j] = fmaf(l, l, fl2[j]);
                    pxl[j] = fmaf(x[c + j], l, pxl[j]);
                }
        }
        for (; c < G; c++) {
            const int j = (int)(c % Q4_P);
            const float l = clamp15(rintf((x[c] - mn) * is));
            sl += (int64_t)l;
            sl2 += (int64_t)l * (int64_t)l;
            pxl[j] = fmaf(x[c], l, pxl[j]);
        }
        for (int j = 0; j < Q4_P; j++) {
            sl += (int64_t)fl[j];
            sl2 += (int64_t)fl2[j];
        }
        const float sxl = tree32(pxl);
        const int64_t D = G * sl2 - sl * sl;
        if (D <= 0) continue;
        const float Df = (float)D, slf = (float)sl, sl2f = (float)sl2;
        const float p1 = sx * slf, p2 = slf * sxl;
        const float cs = fl_f16_to_f32(fl_f32_to_f16(fmaf(Gf, sxl, -p1) / Df));
        const float cm = fl_f16_to_f32(fl_f32_to_f16(fmaf(sl2f, sx, -p2) / Df));
        if (!(cs > 0.0f && cs <= 65504.0f && cm >= -65504.0f && cm <= 65504.0f)) continue;
        const float e = int4_err(x, G, cs, cm);
        if (e < best) {
            best = e;
            *s = cs;
            *m = cm;
        }
    }
}

/* nf4's E(t) of a group x[0..G-1] (t != 0) */
static float nf4_err(const float *x, int64_t G, float t, const float *mid) {
    float p[Q4_P] = {0};
    for (int64_t c = 0; c < G; c++) {
        const float v = x[c] / t;
        unsigned k = 0;
        for (int i = 0; i < 15; i++) k += v > mid[i];
        const float e = fmaf(fl_nf4_table[k], t, -x[c]);
        p[c % Q4_P] = fmaf(e, e, p[c % Q4_P]);
    }
    return tree32(p);
}

/* A group whose float16 scale (or int4 offset) would be infinite: every logit would be NaN. Refused, not clipped (a
 * weight of that size is the checkpoint's, and clipping it would silently change the model). */
static fl_status scale_overflow(int scheme, int64_t r, int64_t g, float amax) {
    return fl_err(FL_E_VALUE, "quantisation at load (%s): row %lld, group %lld holds values up to %g, beyond what its "
                  "float16 scale can express (int8: |w| < ~8.3e6, nf4: |w| <= 65504, int4: a range < ~9.8e5 and "
                  "|w| <= 65504); load this model without quantisation at load", scheme_name(scheme), (long long)r,
                  (long long)g, (double)amax);
}

fl_status fl_q_quantize_rows(const fl_weight *w, int scheme, int64_t r0, int64_t n, const void *src, fl_dtype st) {
    if (w->dtype != FL_QUANT) return fl_err(FL_E_INTERNAL, "fl_q_quantize_rows: weight is not quantised");
    if (st != FL_F32 && st != FL_F16 && st != FL_BF16)
        return fl_err(FL_E_UNSUPPORTED, "quantisation at load: source dtype %d is not float32, float16 or bfloat16",
                      (int)st);
    const fl_qlayout L = fl_q_layout_of(w);
    FL_TRY(fl_q_check(&L, w->rows, w->cols));
    fl_qlayout want;
    FL_TRY(fl_q_layout_for_scheme(scheme, L.group_size, w->cols, &want));
    if (L.bits != want.bits || L.code != want.code || L.has_zeros != want.has_zeros)
        return fl_err(FL_E_INTERNAL, "fl_q_quantize_rows: the weight's layout (bits %d, code %d, zeros %d) is not %s's",
                      L.bits, L.code, L.has_zeros, scheme_name(scheme));
    if (L.has_perm) return fl_err(FL_E_INTERNAL, "fl_q_quantize_rows: quantisation at load has no column order");
    if (r0 < 0 || n < 0 || r0 + n > w->rows)
        return fl_err(FL_E_VALUE, "fl_q_quantize_rows: rows [%lld, %lld) outside [0, %lld)", (long long)r0,
                      (long long)(r0 + n), (long long)w->rows);
    const int64_t C = w->cols, G = L.group_size, ng = C / G, rowbytes = C * L.bits / 8;
    float mid[15];
    for (int i = 0; i < 15; i++) mid[i] = (fl_nf4_table[i] + fl_nf4_table[i + 1]) * 0.5f;
    float *xb = NULL;  /* int4 / nf4: a group widened to float32 (not needed for a float32 source) */
    if (scheme != FL_QS_INT8 && st != FL_F32 && n > 0 && !(xb = (float *)malloc((size_t)G * sizeof(float))))
        return fl_err(FL_E_NOMEM, "quantisation at load: %lld floats for a group", (long long)G);
    fl_status bad = FL_OK;
    for (int64_t i = 0; i < n && bad == FL_OK; i++) {
        const int64_t r = r0 + i;
        uint8_t *q = (uint8_t *)w->data_d + (size_t)r * (size_t)rowbytes;
        const size_t sb = (size_t)i * (size_t)C;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t c0 = g * G;
            const size_t gi = (size_t)r * (size_t)ng + (size_t)g;
            if (scheme == FL_QS_INT4) {
                const float *x = xb;
                if (st == FL_F32) x = (const float *)src + sb + (size_t)c0;
                else
                    for (int64_t c = 0; c < G; c++) xb[c] = src_val(src, st, sb + (size_t)(c0 + c));
                float mn = x[0], mx = mn;
                int pos_zero = 0;
                for (int64_t c = 0; c < G; c++) {
                    pos_zero |= x[c] == 0.0f && !signbit(x[c]);
                    /* fminf / fmaxf: a NaN element is skipped (also at x[0]), as the CUDA quantiser's IEEE
                     * min.f32 / max.f32; only a group of NaNs gives a NaN min / max (then scale and offset NaN) */
                    mn = fminf(mn, x[c]);
                    mx = fmaxf(mx, x[c]);
                }
                /* The sign of a zero min / max is stated, not left to fminf / fmaxf (either zero may come back):
                 * +0 when any element of the group is +0, else -0. The CUDA quantiser restates it the same way
                 * (a row of mixed-sign zeros gave scale -0 here and +0 there in the first H200 run). */
                if (mn == 0.0f) mn = pos_zero ? 0.0f : -0.0f;
                if (mx == 0.0f) mx = pos_zero ? 0.0f : -0.0f;
                float s = fl_f16_to_f32(fl_f32_to_f16((mx - mn) / 15.0f));
                float m = fl_f16_to_f32(fl_f32_to_f16(mn));
                if (s != 0.0f) int4_search(x, G, mn, mx, &s, &m);
                if (isinf(s) || isinf(m)) bad = scale_overflow(scheme, r, g, fmaxf(fabsf(mn), fabsf(mx)));
                sstore(w->scales_d, L.sdtype, gi, s);
                sstore(w->zeros_d, L.sdtype, gi, m);
                const float inv = s == 0.0f ? 0.0f : 1.0f / s;
                for (int64_t c = 0; c < G; c++) {
                    const unsigned v = s == 0.0f ? 0u : (unsigned)fminf(fmaxf(rintf((x[c] - m) * inv), 0.0f), 15.0f);
                    const int64_t cc = c0 + c;
                    if (cc & 1) q[cc >> 1] = (uint8_t)((q[cc >> 1] & 15u) | (v << 4));
                    else q[cc >> 1] = (uint8_t)v;
                }
            } else {
                float amax = 0.0f;
                for (int64_t c = c0; c < c0 + G; c++) amax = fmaxf(amax, fabsf(src_val(src, st, sb + (size_t)c)));
                if (scheme == FL_QS_INT8) {
                    const float s = fl_f16_to_f32(fl_f32_to_f16(amax / 127.0f));
                    if (isinf(s)) bad = scale_overflow(scheme, r, g, amax);
                    sstore(w->scales_d, L.sdtype, gi, s);
                    for (int64_t c = c0; c < c0 + G; c++) {
                        const float x = src_val(src, st, sb + (size_t)c);
                        q[c] = s == 0.0f ? 128 : (uint8_t)((int)fminf(fmaxf(rintf(x / s), -127.0f), 127.0f) + 128);
                    }
                } else { /* nf4 */
                    float s = fl_f16_to_f32(fl_f32_to_f16(amax));
                    if (isinf(s)) bad = scale_overflow(scheme, r, g, amax);
                    if (s != 0.0f) {
                        const float *x = xb;
                        if (st == FL_F32) x = (const float *)src + sb + (size_t)c0;
                        else
                            for (int64_t c = 0; c < G; c++) xb[c] = src_val(src, st, sb + (size_t)(c0 + c));
                        const float ep = nf4_err(x, G, s, mid), en = nf4_err(x, G, -s, mid);
                        if (en < ep) s = -s;
                    }
                    sstore(w->scales_d, L.sdtype, gi, s);
                    for (int64_t c = c0; c < c0 + G; c++) {
                        const float v = s == 0.0f ? 0.0f : src_val(src, st, sb + (size_t)c) / s;
                        unsigned k = 0;
                        for (int j = 0; j < 15; j++) k += v > mid[j];
                        if (c & 1) q[c >> 1] = (uint8_t)((q[c >> 1] & 15u) | (k << 4));
                        else q[c >> 1] = (uint8_t)k;
                    }
                }
            }
        }
    }
    free(xb);
    return bad;
}
