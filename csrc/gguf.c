/* gguf.c: llama.cpp's GGUF container (v2/v3, little-endian): a bounds-checked reader over a
 * read-only mapping, and dequantisation of ggml's block formats to f32/f16/bf16.
 *
 * Reading is two passes over the header with one cursor (parse_header): the first pass only
 * walks and validates (every length is checked against the bytes left before it is trusted) and
 * counts what must be allocated; the second pass, after the allocations, fills the tables. So
 * nothing is allocated from a count that the file has not already shown it can hold.
 *
 * The dequantisers follow ggml's reference dequantize_row_* (ggml-quants.c) block layouts and
 * evaluation order. Floating-point contraction is switched off for this file so that
 * `q * d + m` rounds twice, as ggml's reference and the gguf Python package (numpy) do: the
 * results are then bit-identical to theirs, whatever -march the package is built with. */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "gguf.h"
#include "fl_utf8.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* ggml type table                                                                             */
/* ------------------------------------------------------------------------------------------ */

#define QK_K 256
/* Types numbered past GGML_TYPE_COUNT (newer ggml) are still known by size, so such files open. */
#define FL_GGML_TABLE 42

typedef struct { const char *name; int blck; int bytes; } ggml_type_info;

static const ggml_type_info ggml_types[FL_GGML_TABLE] = {
    [GGML_F32] = {"F32", 1, 4},          [GGML_F16] = {"F16", 1, 2},
    [GGML_Q4_0] = {"Q4_0", 32, 18},      [GGML_Q4_1] = {"Q4_1", 32, 20},
    [GGML_Q5_0] = {"Q5_0", 32, 22},      [GGML_Q5_1] = {"Q5_1", 32, 24},
    [GGML_Q8_0] = {"Q8_0", 32, 34},      [GGML_Q8_1] = {"Q8_1", 32, 36},
    [GGML_Q2_K] = {"Q2_K", QK_K, 84},    [GGML_Q3_K] = {"Q3_K", QK_K, 110},
    [GGML_Q4_K] = {"Q4_K", QK_K, 144},   [GGML_Q5_K] = {"Q5_K", QK_K, 176},
    [GGML_Q6_K] = {"Q6_K", QK_K, 210},   [GGML_Q8_K] = {"Q8_K", QK_K, 292},
    [16] = {"IQ2_XXS", QK_K, 66},        [17] = {"IQ2_XS", QK_K, 74},
    [18] = {"IQ3_XXS", QK_K, 98},        [19] = {"IQ1_S", QK_K, 50},
    [20] = {"IQ4_NL", 32, 18},           [21] = {"IQ3_S", QK_K, 110},
    [22] = {"IQ2_S", QK_K, 82},          [23] = {"IQ4_XS", QK_K, 136},
    [GGML_I8] = {"I8", 1, 1},            [GGML_I16] = {"I16", 1, 2},
    [GGML_I32] = {"I32", 1, 4},          [GGML_I64] = {"I64", 1, 8},
    [GGML_F64] = {"F64", 1, 8},          [29] = {"IQ1_M", QK_K, 56},
    [GGML_BF16] = {"BF16", 1, 2},        [34] = {"TQ1_0", QK_K, 54},
    [35] = {"TQ2_0", QK_K, 66},          [39] = {"MXFP4", 32, 17},
    [40] = {"NVFP4", 64, 36},            [41] = {"Q1_0", 128, 18},
};

static const ggml_type_info *type_info(int type) {
    if (type < 0 || type >= FL_GGML_TABLE || ggml_types[type].blck == 0) return NULL;
    return &ggml_types[type];
}

int fl_ggml_block_elems(int type) { const ggml_type_info *t = type_info(type); return t ? t->blck : 0; }
int fl_ggml_block_bytes(int type) { const ggml_type_info *t = type_info(type); return t ? t->bytes : 0; }
const char *fl_ggml_type_name(int type) { const ggml_type_info *t = type_info(type); return t ? t->name : "unknown"; }

uint64_t fl_ggml_nbytes(int type, uint64_t n) {
    const ggml_type_info *t = type_info(type);
    uint64_t out;
    if (!t || n % (uint64_t)t->blck) return 0;
    if (!fl_mul_u64(n / (uint64_t)t->blck, (uint64_t)t->bytes, &out)) return 0;
    return out;
}

/* ------------------------------------------------------------------------------------------ */
/* bounds-checked cursor                                                                       */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *base;
    uint64_t pos, size;
    const char *path;
} cursor;

static inline uint64_t cur_left(const cursor *c) { return c->size - c->pos; }

static fl_status cur_need(const cursor *c, uint64_t n, const char *what) {
    if (n > cur_left(c))
        return fl_err(FL_E_FORMAT, "%s: truncated file: %s at offset %" PRIu64 " needs %" PRIu64
                      " bytes but only %" PRIu64 " remain (file size %" PRIu64 ")",
                      c->path, what, c->pos, n, cur_left(c), c->size);
    return FL_OK;
}

static fl_status cur_u32(cursor *c, uint32_t *v, const char *what) {
    FL_TRY(cur_need(c, 4, what));
    memcpy(v, c->base + c->pos, 4);
    c->pos += 4;
    return FL_OK;
}

static fl_status cur_u64(cursor *c, uint64_t *v, const char *what) {
    FL_TRY(cur_need(c, 8, what));
    memcpy(v, c->base + c->pos, 8);
    c->pos += 8;
    return FL_OK;
}

/* A GGUF string: u64 length + bytes (no NUL), at most `max` bytes. Returns a pointer into the mapping. */
static fl_status cur_str(cursor *c, const char **s, uint64_t *len, uint64_t max, const char *what) {
    uint64_t n;
    FL_TRY(cur_u64(c, &n, what));
    if (n > max)
        return fl_err(FL_E_FORMAT, "%s: %s at offset %" PRIu64 " claims a length of %" PRIu64
                      " bytes, more than the limit of %" PRIu64, c->path, what, c->pos - 8, n, max);
    if (n > cur_left(c))
        return fl_err(FL_E_FORMAT, "%s: %s at offset %" PRIu64 " claims a length of %" PRIu64
                      " bytes but only %" PRIu64 " remain in the file", c->path, what, c->pos - 8, n, cur_left(c));
    *s = (const char *)(c->base + c->pos);
    *len = n;
    c->pos += n;
    return FL_OK;
}

/* A key or tensor name from the file, made safe to put in a message: valid UTF-8 is kept, other
 * bytes (and control characters) become \xNN, and long names are cut with "...". The message
 * must stay valid UTF-8 because the binding decodes it into a Python str. */
static const char *show_name(char *buf, size_t cap, const char *s, uint64_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t o = 0;
    const size_t limit = cap > 16 ? cap - 8 : 0; /* room for "...", an escape and the NUL */
    uint64_t i = 0;
    while (i < n && o < limit) {
        const unsigned c = p[i];
        /* printable ASCII, or a whole well-formed multi-byte character; control bytes are escaped */
        const size_t len = c < 0x80 ? (c >= 0x20 && c < 0x7f) : fl_utf8_len(p + i, (size_t)(n - i < 4 ? n - i : 4));
        const int ok = len > 0;
        if (ok && o + (size_t)len < limit) {
            memcpy(buf + o, p + i, (size_t)len);
            o += (size_t)len;
            i += (uint64_t)len;
        } else if (o + 4 < limit) {
            snprintf(buf + o, cap - o, "\\x%02x", c);
            o += 4;
            i++;
        } else {
            break;
        }
    }
    if (i < n && cap >= 4) { memcpy(buf + o, "...", 3); o += 3; }
    buf[o < cap ? o : cap - 1] = 0;
    return buf;
}

/* Size of one scalar of a metadata type; 0 for string/array/unknown. */
static int gguf_scalar_size(uint32_t t) {
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_INT8: case GGUF_T_BOOL: return 1;
    case GGUF_T_UINT16: case GGUF_T_INT16: return 2;
    case GGUF_T_UINT32: case GGUF_T_INT32: case GGUF_T_FLOAT32: return 4;
    case GGUF_T_UINT64: case GGUF_T_INT64: case GGUF_T_FLOAT64: return 8;
    default: return 0;
    }
}

static const char *gguf_type_str(uint32_t t) {
    static const char *const names[GGUF_T_COUNT] = {
        "uint8", "int8", "uint16", "int16", "uint32", "int32", "float32", "bool", "string",
        "array", "uint64", "int64", "float64"};
    return t < GGUF_T_COUNT ? names[t] : "unknown";
}

/* Decode one scalar at p into the kv's number union. */
static void decode_scalar(fl_gguf_kv *kv, uint32_t t, const uint8_t *p) {
    switch (t) {
    case GGUF_T_UINT8: case GGUF_T_BOOL: kv->num.u = p[0]; break;
    case GGUF_T_INT8: kv->num.i = (int8_t)p[0]; break;
    case GGUF_T_UINT16: { uint16_t v; memcpy(&v, p, 2); kv->num.u = v; break; }
    case GGUF_T_INT16: { int16_t v; memcpy(&v, p, 2); kv->num.i = v; break; }
    case GGUF_T_UINT32: { uint32_t v; memcpy(&v, p, 4); kv->num.u = v; break; }
    case GGUF_T_INT32: { int32_t v; memcpy(&v, p, 4); kv->num.i = v; break; }
    case GGUF_T_UINT64: { uint64_t v; memcpy(&v, p, 8); kv->num.u = v; break; }
    case GGUF_T_INT64: { int64_t v; memcpy(&v, p, 8); kv->num.i = v; break; }
    case GGUF_T_FLOAT32: { float v; memcpy(&v, p, 4); kv->num.f = v; break; }
    case GGUF_T_FLOAT64: { double v; memcpy(&v, p, 8); kv->num.f = v; break; }
    default: kv->num.u = 0; break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* header parsing                                                                              */
/* ------------------------------------------------------------------------------------------ */

#define GGUF_HEADER_BYTES 24u       /* magic, version, n_tensors, n_kv */
#define GGUF_MIN_KV_BYTES 13u       /* key length (8) + type (4) + a one-byte value */
#define GGUF_MIN_TENSOR_BYTES 24u   /* name length (8) + ndim (4) + type (4) + offset (8) */
#define GGUF_MAX_ALIGNMENT (1u << 30)

typedef struct {
    uint64_t pool_bytes;    /* keys and tensor names, NUL-terminated */
    uint64_t n_str_elems;   /* elements of all string arrays (offset index) */
} parse_counts;

/* Pass 1 (fill == 0): validate and count into *cnt. Pass 2 (fill == 1): fill g->kv/tensors/pool/
 * str_offs, never past the sizes pass 1 counted (the file could change under a MAP_PRIVATE
 * mapping between the passes; then pass 2 stops with an error instead of overflowing). */
static fl_status parse_header(fl_gguf *g, int fill, parse_counts *cnt) {
    cursor c = {g->map, GGUF_HEADER_BYTES, g->size, g->path};
    char *pool = g->pool;
    uint64_t pool_pos = 0, str_pos = 0;
    char what[320];

    for (uint64_t i = 0; i < g->n_kv; i++) {
        const char *key; uint64_t klen; uint32_t type;
        snprintf(what, sizeof what, "key of metadata entry %" PRIu64, i);
        FL_TRY(cur_str(&c, &key, &klen, FL_GGUF_MAX_KEY, what));
        char kname[160];
        show_name(kname, sizeof kname, key, klen);
        snprintf(what, sizeof what, "type of metadata key '%s'", kname);
        FL_TRY(cur_u32(&c, &type, what));
        snprintf(what, sizeof what, "value of metadata key '%s'", kname);
        fl_gguf_kv *kv = fill ? &g->kv[i] : NULL;
        if (fill && (klen >= cnt->pool_bytes - pool_pos))
            return fl_err(FL_E_IO, "%s: the file changed while it was being read", g->path);
        if (fill) {
            memcpy(pool + pool_pos, key, klen);
            pool[pool_pos + klen] = 0;
            kv->key = pool + pool_pos;
            kv->type = (int)type;
            kv->arr_type = -1;
            kv->n = 1;
            kv->num.u = 0;
            kv->str = NULL; kv->str_len = 0;
            kv->str_offs = NULL;
        }
        pool_pos += klen + 1;

        if (type == GGUF_T_STRING) {
            const char *s; uint64_t slen;
            FL_TRY(cur_str(&c, &s, &slen, FL_GGUF_MAX_STR, what));
            if (fill) { kv->raw = (const uint8_t *)s; kv->str = s; kv->str_len = slen; }
        } else if (type == GGUF_T_ARRAY) {
            uint32_t et; uint64_t n;
            FL_TRY(cur_u32(&c, &et, what));
            FL_TRY(cur_u64(&c, &n, what));
            if (et == GGUF_T_ARRAY)
                return fl_err(FL_E_UNSUPPORTED, "%s: metadata key '%s' is an array of arrays, which fastload does not read",
                              g->path, kname);
            if (n > FL_GGUF_MAX_ARRAY)
                return fl_err(FL_E_FORMAT, "%s: metadata key '%s' claims %" PRIu64 " elements, more than the limit of %u (2^24)",
                              g->path, kname, n, (unsigned)FL_GGUF_MAX_ARRAY);
            if (fill) { kv->arr_type = (int)et; kv->n = n; kv->raw = c.base + c.pos; }
            if (et == GGUF_T_STRING) {
                if (n > cur_left(&c) / 8)
                    return fl_err(FL_E_FORMAT, "%s: metadata key '%s' claims %" PRIu64 " strings but only %" PRIu64
                                  " bytes remain in the file", g->path, kname, n, cur_left(&c));
                if (fill && n > cnt->n_str_elems - str_pos)
                    return fl_err(FL_E_IO, "%s: the file changed while it was being read", g->path);
                if (fill) kv->str_offs = g->str_offs + str_pos;
                const uint64_t start = c.pos;
                for (uint64_t j = 0; j < n; j++) {
                    const char *s; uint64_t slen;
                    if (fill) g->str_offs[str_pos + j] = c.pos - start;
                    FL_TRY(cur_str(&c, &s, &slen, FL_GGUF_MAX_STR, what));
                }
                str_pos += n;
            } else {
                int es = gguf_scalar_size(et);
                uint64_t nb;
                if (es == 0)
                    return fl_err(FL_E_FORMAT, "%s: metadata key '%s' is an array of unknown value type %u",
                                  g->path, kname, et);
                if (!fl_mul_u64(n, (uint64_t)es, &nb) || nb > cur_left(&c))
                    return fl_err(FL_E_FORMAT, "%s: metadata key '%s' claims %" PRIu64 " elements of %s but only %"
                                  PRIu64 " bytes remain in the file", g->path, kname, n, gguf_type_str(et), cur_left(&c));
                c.pos += nb;
            }
        } else {
            int es = gguf_scalar_size(type);
            if (es == 0)
                return fl_err(FL_E_FORMAT, "%s: metadata key '%s' has unknown value type %u", g->path, kname, type);
            FL_TRY(cur_need(&c, (uint64_t)es, what));
            if (fill) { kv->raw = c.base + c.pos; decode_scalar(kv, type, c.base + c.pos); }
            c.pos += (uint64_t)es;
        }
    }

    /* tensor infos (offsets are checked against the alignment and the data section later, in validate_tables) */
    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const char *name; uint64_t nlen; uint32_t ndim, type;
        snprintf(what, sizeof what, "name of tensor %" PRIu64, i);
        FL_TRY(cur_str(&c, &name, &nlen, FL_GGUF_MAX_KEY, what));
        char tname[200];
        show_name(tname, sizeof tname, name, nlen);
        snprintf(what, sizeof what, "shape of tensor '%s'", tname);
        FL_TRY(cur_u32(&c, &ndim, what));
        if (ndim > 4)
            return fl_err(FL_E_FORMAT, "%s: tensor '%s' has %u dimensions (at most 4)", g->path, tname, ndim);
        /* nz: the product of the non-zero extents, capped so that nz elements of up to 8 bytes
         * still count in int64: a shape with a zero extent cannot smuggle in another one that
         * overflows when the shape is used (e.g. by numpy) */
        uint64_t ne[4] = {1, 1, 1, 1}, nel = 1, nz = 1;
        for (uint32_t d = 0; d < ndim; d++) {
            FL_TRY(cur_u64(&c, &ne[d], what));
            if (ne[d] > (uint64_t)INT64_MAX)
                return fl_err(FL_E_FORMAT, "%s: tensor '%s' has a negative dimension ne[%u]", g->path, tname, d);
            if (!fl_mul_u64(nz, ne[d] ? ne[d] : 1, &nz) || nz > (uint64_t)INT64_MAX / 8)
                return fl_err(FL_E_FORMAT, "%s: tensor '%s': the element count overflows", g->path, tname);
            nel *= ne[d]; /* <= nz: cannot overflow */
        }
        snprintf(what, sizeof what, "type of tensor '%s'", tname);
        FL_TRY(cur_u32(&c, &type, what));
        const ggml_type_info *ti = type_info((int)type);
        if (!ti)
            return fl_err(FL_E_FORMAT, "%s: tensor '%s' has unknown ggml type id %u", g->path, tname, type);
        if (ne[0] % (uint64_t)ti->blck)
            return fl_err(FL_E_FORMAT, "%s: tensor '%s' of type %s has ne[0] = %" PRIu64
                          ", not a multiple of the block size %d", g->path, tname, ti->name, ne[0], ti->blck);
        uint64_t nbytes = fl_ggml_nbytes((int)type, nel);
        if (nel && !nbytes)
            return fl_err(FL_E_FORMAT, "%s: tensor '%s': the byte size overflows", g->path, tname);
        uint64_t off;
        snprintf(what, sizeof what, "data offset of tensor '%s'", tname);
        FL_TRY(cur_u64(&c, &off, what));
        if (fill && nlen >= cnt->pool_bytes - pool_pos)
            return fl_err(FL_E_IO, "%s: the file changed while it was being read", g->path);
        if (fill) {
            fl_gguf_tensor *t = &g->tensors[i];
            memcpy(pool + pool_pos, name, nlen);
            pool[pool_pos + nlen] = 0;
            t->name = pool + pool_pos;
            t->type = (int)type;
            t->ndim = (int)ndim;
            for (int d = 0; d < 4; d++) t->ne[d] = (int64_t)ne[d];
            t->offset = off;
            t->nbytes = nbytes;
            t->data = NULL;
        }
        pool_pos += nlen + 1;
    }
    if (!fill) {
        cnt->pool_bytes = pool_pos;
        cnt->n_str_elems = str_pos;
    }
    g->data_offset = c.pos; /* before padding; fixed up by the caller */
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* open / close                                                                                */
/* ------------------------------------------------------------------------------------------ */

typedef struct { const char *name; uint64_t offset, nbytes; int64_t idx; } sort_ent;

static int cmp_name(const void *a, const void *b) {
    return strcmp(((const sort_ent *)a)->name, ((const sort_ent *)b)->name);
}
static int cmp_offset(const void *a, const void *b) {
    const sort_ent *x = a, *y = b;
    if (x->offset != y->offset) return x->offset < y->offset ? -1 : 1;
    return x->nbytes < y->nbytes ? -1 : x->nbytes > y->nbytes;
}

void fl_gguf_close(fl_gguf *g) {
    if (!g) return;
    if (g->map && g->size) munmap(g->map, g->size);
    free(g->kv);
    free(g->tensors);
    free(g->pool);
    free(g->str_offs);
    free(g->tensor_by_name);
    free(g->kv_by_key);
    free(g->path);
    free(g);
}

static fl_status validate_tables(fl_gguf *g) {
    const char *path = g->path;
    /* keys: duplicates */
    if (g->n_kv) {
        sort_ent *ents = malloc(g->n_kv * sizeof *ents);
        if (!ents) return fl_err(FL_E_NOMEM, "%s: out of memory for %" PRIu64 " metadata entries", path, g->n_kv);
        for (uint64_t i = 0; i < g->n_kv; i++) ents[i] = (sort_ent){g->kv[i].key, 0, 0, (int64_t)i};
        qsort(ents, g->n_kv, sizeof *ents, cmp_name);
        fl_status st = FL_OK;
        for (uint64_t i = 0; i + 1 < g->n_kv; i++)
            if (strcmp(ents[i].name, ents[i + 1].name) == 0) {
                char a[200];
                st = fl_err(FL_E_FORMAT, "%s: duplicate metadata key '%s'", path,
                            show_name(a, sizeof a, ents[i].name, strlen(ents[i].name)));
                break;
            }
        for (uint64_t i = 0; i < g->n_kv; i++) g->kv_by_key[i] = ents[i].idx;
        free(ents);
        if (st != FL_OK) return st;
    }

    /* alignment (the key index is ready now) */
    g->alignment = 32;
    const fl_gguf_kv *al = fl_gguf_find_kv(g, "general.alignment");
    if (al) {
        if (al->type != GGUF_T_UINT32 && al->type != GGUF_T_UINT64 && al->type != GGUF_T_UINT16 && al->type != GGUF_T_UINT8)
            return fl_err(FL_E_FORMAT, "%s: metadata key 'general.alignment' has type %s, expected uint32",
                          path, gguf_type_str((uint32_t)al->type));
        uint64_t a = al->num.u;
        if (a == 0 || (a & (a - 1)) || a > GGUF_MAX_ALIGNMENT)
            return fl_err(FL_E_FORMAT, "%s: general.alignment = %" PRIu64 " is not a power of two in [1, 2^30]", path, a);
        g->alignment = a;
    }
    uint64_t end_info = g->data_offset, pad;
    if (!fl_add_u64(end_info, g->alignment - 1, &pad))
        return fl_err(FL_E_FORMAT, "%s: data section offset overflows", path);
    g->data_offset = pad / g->alignment * g->alignment;
    if (g->data_offset > g->size) {
        if (g->n_tensors)
            return fl_err(FL_E_FORMAT, "%s: truncated file: the data section starts at offset %" PRIu64
                          " (after padding to %" PRIu64 ") but the file has %" PRIu64 " bytes",
                          path, g->data_offset, g->alignment, (uint64_t)g->size);
        g->data_offset = g->size;
    }
    const uint64_t data_size = g->size - g->data_offset;

    /* tensors: bounds, alignment, names, overlap */
    if (g->n_tensors) {
        sort_ent *ents = malloc(g->n_tensors * sizeof *ents);
        if (!ents) return fl_err(FL_E_NOMEM, "%s: out of memory for %" PRIu64 " tensor entries", path, g->n_tensors);
        fl_status st = FL_OK;
        for (uint64_t i = 0; i < g->n_tensors && st == FL_OK; i++) {
            fl_gguf_tensor *t = &g->tensors[i];
            uint64_t end;
            char tn[200];
            if (t->offset % g->alignment)
                st = fl_err(FL_E_FORMAT, "%s: tensor '%s' has data offset %" PRIu64 ", not a multiple of the alignment %" PRIu64,
                            path, show_name(tn, sizeof tn, t->name, strlen(t->name)), t->offset, g->alignment);
            else if (!fl_add_u64(t->offset, t->nbytes, &end) || end > data_size)
                st = fl_err(FL_E_FORMAT, "%s: tensor '%s' (%s, %" PRIu64 " bytes at data offset %" PRIu64
                            ") lies outside the data section (%" PRIu64 " bytes from file offset %" PRIu64 ")",
                            path, show_name(tn, sizeof tn, t->name, strlen(t->name)), fl_ggml_type_name(t->type),
                            t->nbytes, t->offset, data_size, g->data_offset);
            else
                t->data = g->map + g->data_offset + t->offset;
            ents[i] = (sort_ent){t->name, t->offset, t->nbytes, (int64_t)i};
        }
        if (st == FL_OK) {
            qsort(ents, g->n_tensors, sizeof *ents, cmp_offset);
            uint64_t prev_end = 0; int64_t prev = -1;
            for (uint64_t i = 0; i < g->n_tensors; i++) {
                if (ents[i].nbytes == 0) continue;
                if (prev >= 0 && ents[i].offset < prev_end) {
                    char a[200], b[200];
                    st = fl_err(FL_E_FORMAT, "%s: tensors '%s' and '%s' overlap (data offsets %" PRIu64 " + %" PRIu64
                                " bytes and %" PRIu64 ")", path,
                                show_name(a, sizeof a, g->tensors[prev].name, strlen(g->tensors[prev].name)),
                                show_name(b, sizeof b, ents[i].name, strlen(ents[i].name)),
                                g->tensors[prev].offset, g->tensors[prev].nbytes, ents[i].offset);
                    break;
                }
                prev = ents[i].idx;
                prev_end = ents[i].offset + ents[i].nbytes;
            }
        }
        if (st == FL_OK) {
            qsort(ents, g->n_tensors, sizeof *ents, cmp_name);
            for (uint64_t i = 0; i + 1 < g->n_tensors; i++)
                if (strcmp(ents[i].name, ents[i + 1].name) == 0) {
                    char a[200];
                    st = fl_err(FL_E_FORMAT, "%s: duplicate tensor name '%s'", path,
                                show_name(a, sizeof a, ents[i].name, strlen(ents[i].name)));
                    break;
                }
            for (uint64_t i = 0; i < g->n_tensors && st == FL_OK; i++) g->tensor_by_name[i] = ents[i].idx;
        }
        free(ents);
        if (st != FL_OK) return st;
    }

    return FL_OK;
}

fl_status fl_gguf_open(const char *path, fl_gguf **out) {
    *out = NULL;
    if (!path) return fl_err(FL_E_VALUE, "fl_gguf_open: path is NULL");
    fl_gguf *g = calloc(1, sizeof *g);
    if (!g) return fl_err(FL_E_NOMEM, "%s: out of memory", path);
    size_t plen = strlen(path);
    g->path = malloc(plen + 1);
    if (!g->path) { free(g); return fl_err(FL_E_NOMEM, "%s: out of memory", path); }
    memcpy(g->path, path, plen + 1);

    fl_status st = FL_OK;
    int fd;
    uint64_t fsize;
    /* special files (a FIFO named like a checkpoint would block a plain open) are refused first */
    if ((st = fl_open_regular(path, 0, &fd, &fsize)) != FL_OK) goto fail;
    if (fsize == 0) {
        st = fl_err(FL_E_FORMAT, "%s: the file is empty (0 bytes), not a GGUF file", path);
        close(fd);
        goto fail;
    }
    if (fsize > (uint64_t)SIZE_MAX) {
        st = fl_err(FL_E_IO, "%s: file too large to map", path);
        close(fd);
        goto fail;
    }
    void *m = mmap(NULL, (size_t)fsize, PROT_READ, MAP_PRIVATE, fd, 0);
    int map_errno = errno;
    close(fd);
    if (m == MAP_FAILED) {
        st = fl_err(FL_E_IO, "%s: mmap of %" PRIu64 " bytes failed: %s", path, fsize, strerror(map_errno));
        goto fail;
    }
    g->map = m;
    g->size = (size_t)fsize;

    /* fixed header */
    if (g->size < 4 || memcmp(g->map, "GGUF", 4) != 0) {
        /* the bytes found are not quoted: the file may be any file */
        st = fl_err(FL_E_FORMAT, "%s: not a GGUF file: bad magic (the file does not start with \"GGUF\")", path);
        goto fail;
    }
    if (g->size < GGUF_HEADER_BYTES) {
        st = fl_err(FL_E_FORMAT, "%s: truncated file: %zu bytes, shorter than the 24-byte GGUF header", path, g->size);
        goto fail;
    }
    memcpy(&g->version, g->map + 4, 4);
    if (g->version != 2 && g->version != 3) {
        uint32_t v = g->version, sw = (v >> 24) | ((v >> 8) & 0xff00u) | ((v << 8) & 0xff0000u) | (v << 24);
        if (sw == 2 || sw == 3)
            st = fl_err(FL_E_FORMAT, "%s: big-endian GGUF v%u files are not supported", path, sw);
        else
            st = fl_err(FL_E_FORMAT, "%s: unsupported GGUF version %u (fastload reads versions 2 and 3)", path, v);
        goto fail;
    }
    memcpy(&g->n_tensors, g->map + 8, 8);
    memcpy(&g->n_kv, g->map + 16, 8);
    if (g->n_kv > FL_GGUF_MAX_KV) {
        st = fl_err(FL_E_FORMAT, "%s: header claims %" PRIu64 " metadata entries, more than the limit of %u (2^20)",
                    path, g->n_kv, (unsigned)FL_GGUF_MAX_KV);
        goto fail;
    }
    if (g->n_tensors > FL_GGUF_MAX_TENSORS) {
        st = fl_err(FL_E_FORMAT, "%s: header claims %" PRIu64 " tensors, more than the limit of %u (2^20)",
                    path, g->n_tensors, (unsigned)FL_GGUF_MAX_TENSORS);
        goto fail;
    }
    {
        const uint64_t left = g->size - GGUF_HEADER_BYTES;
        uint64_t need_kv = 0, need_t = 0, need = 0;
        if (g->n_kv > left / GGUF_MIN_KV_BYTES ||
            !fl_mul_u64(g->n_kv, GGUF_MIN_KV_BYTES, &need_kv)) {
            st = fl_err(FL_E_FORMAT, "%s: header claims %" PRIu64 " metadata entries, impossible in the %" PRIu64
                        " bytes after the header", path, g->n_kv, left);
            goto fail;
        }
        if (g->n_tensors > left / GGUF_MIN_TENSOR_BYTES ||
            !fl_mul_u64(g->n_tensors, GGUF_MIN_TENSOR_BYTES, &need_t) || !fl_add_u64(need_kv, need_t, &need) ||
            need > left) {
            st = fl_err(FL_E_FORMAT, "%s: header claims %" PRIu64 " tensors and %" PRIu64
                        " metadata entries, impossible in the %" PRIu64 " bytes after the header",
                        path, g->n_tensors, g->n_kv, left);
            goto fail;
        }
    }

    /* pass 1: validate the structure and count */
    parse_counts cnt = {0, 0};
    if ((st = parse_header(g, 0, &cnt)) != FL_OK) goto fail;

    /* allocate: every size here is bounded by bytes the file has shown it holds */
    g->kv = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv);
    g->kv_by_key = calloc(g->n_kv ? g->n_kv : 1, sizeof *g->kv_by_key);
    g->tensors = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensors);
    g->tensor_by_name = calloc(g->n_tensors ? g->n_tensors : 1, sizeof *g->tensor_by_name);
    g->pool = malloc(cnt.pool_bytes ? cnt.pool_bytes : 1);
    g->str_offs = calloc(cnt.n_str_elems ? cnt.n_str_elems : 1, sizeof *g->str_offs);
    if (!g->kv || !g->kv_by_key || !g->tensors || !g->tensor_by_name || !g->pool || !g->str_offs) {
        st = fl_err(FL_E_NOMEM, "%s: out of memory for the header tables", path);
        goto fail;
    }

    /* pass 2: fill */
    if ((st = parse_header(g, 1, &cnt)) != FL_OK) goto fail;
    if ((st = validate_tables(g)) != FL_OK) goto fail;
    *out = g;
    return FL_OK;
fail:
    fl_gguf_close(g);
    return st;
}

const fl_gguf_kv *fl_gguf_find_kv(const fl_gguf *g, const char *key) {
    if (!g || !key || !g->n_kv || !g->kv_by_key) return NULL;
    uint64_t lo = 0, hi = g->n_kv;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int64_t idx = g->kv_by_key[mid];
        int c = strcmp(g->kv[idx].key, key);
        if (c == 0) return &g->kv[idx];
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return NULL;
}

int64_t fl_gguf_find_tensor(const fl_gguf *g, const char *name) {
    if (!g || !name || !g->n_tensors) return -1;
    uint64_t lo = 0, hi = g->n_tensors;
    while (lo < hi) {
        uint64_t mid = lo + (hi - lo) / 2;
        int64_t idx = g->tensor_by_name[mid];
        int c = strcmp(g->tensors[idx].name, name);
        if (c == 0) return idx;
        if (c < 0) lo = mid + 1; else hi = mid;
    }
    return -1;
}

fl_status fl_gguf_arr_str(const fl_gguf_kv *kv, uint64_t i, const char **s, uint64_t *len) {
    if (!kv || kv->type != GGUF_T_ARRAY || kv->arr_type != GGUF_T_STRING)
        return fl_err(FL_E_VALUE, "metadata key '%s' is not an array of strings", kv && kv->key ? kv->key : "?");
    if (i >= kv->n)
        return fl_err(FL_E_VALUE, "metadata key '%s': index %" PRIu64 " out of range (%" PRIu64 " strings)", kv->key, i, kv->n);
    const uint8_t *p = kv->raw + kv->str_offs[i];
    uint64_t n;
    memcpy(&n, p, 8);
    *s = (const char *)(p + 8);
    *len = n;
    return FL_OK;
}

fl_status fl_gguf_arr_num(const fl_gguf_kv *kv, uint64_t i, double *v) {
    if (!kv || kv->type != GGUF_T_ARRAY || kv->arr_type == GGUF_T_STRING || gguf_scalar_size((uint32_t)kv->arr_type) == 0)
        return fl_err(FL_E_VALUE, "metadata key '%s' is not a numeric array", kv && kv->key ? kv->key : "?");
    if (i >= kv->n)
        return fl_err(FL_E_VALUE, "metadata key '%s': index %" PRIu64 " out of range (%" PRIu64 " elements)", kv->key, i, kv->n);
    fl_gguf_kv tmp;
    decode_scalar(&tmp, (uint32_t)kv->arr_type, kv->raw + i * (uint64_t)gguf_scalar_size((uint32_t)kv->arr_type));
    switch (kv->arr_type) {
    case GGUF_T_FLOAT32: case GGUF_T_FLOAT64: *v = tmp.num.f; break;
    case GGUF_T_INT8: case GGUF_T_INT16: case GGUF_T_INT32: case GGUF_T_INT64: *v = (double)tmp.num.i; break;
    default: *v = (double)tmp.num.u; break;
    }
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------ */
/* dequantisation                                                                              */
/* ------------------------------------------------------------------------------------------ */

static inline float h2f(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
#if defined(__F16C__)
    return _cvtsh_ss(h); /* exact, like the bit-level conversion */
#else
    return fl_f16_to_f32(h);
#endif
}

/* Each dq_* writes nb blocks of floats to y. They take no state: safe from any thread. */
typedef void (*dq_fn)(const uint8_t *restrict x, uint64_t nb, float *restrict y);

static void dq_q4_0(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    for (uint64_t b = 0; b < nb; b++, x += 18, y += 32) {
        const float d = h2f(x);
        const uint8_t *restrict q = x + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)((int)(q[j] & 0xF) - 8) * d;
            y[j + 16] = (float)((int)(q[j] >> 4) - 8) * d;
        }
    }
}

static void dq_q4_1(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    for (uint64_t b = 0; b < nb; b++, x += 20, y += 32) {
        const float d = h2f(x), m = h2f(x + 2);
        const uint8_t *restrict q = x + 4;
        for (int j = 0; j < 16; j++) {
            y[j] = (float)(q[j] & 0xF) * d + m;
            y[j + 16] = (float)(q[j] >> 4) * d + m;
        }
    }
}

static void dq_q5_0(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    for (uint64_t b = 0; b < nb; b++, x += 22, y += 32) {
        const float d = h2f(x);
        uint32_t qh;
        memcpy(&qh, x + 2, 4);
        const uint8_t *restrict q = x + 6;
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) << 4) & 0x10;
            const int h1 = (int)(qh >> (j + 12)) & 0x10;
            y[j] = (float)(((q[j] & 0xF) | h0) - 16) * d;
            y[j + 16] = (float)(((q[j] >> 4) | h1) - 16) * d;
        }
    }
}

static void dq_q5_1(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    for (uint64_t b = 0; b < nb; b++, x += 24, y += 32) {
        const float d = h2f(x), m = h2f(x + 2);
        uint32_t qh;
        memcpy(&qh, x + 4, 4);
        const uint8_t *restrict q = x + 8;
        for (int j = 0; j < 16; j++) {
            const int h0 = (int)((qh >> j) << 4) & 0x10;
            const int h1 = (int)(qh >> (j + 12)) & 0x10;
            y[j] = (float)((q[j] & 0xF) | h0) * d + m;
            y[j + 16] = (float)((q[j] >> 4) | h1) * d + m;
        }
    }
}

static void dq_q8_0(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    for (uint64_t b = 0; b < nb; b++, x += 34, y += 32) {
        const float d = h2f(x);
        const int8_t *restrict q = (const int8_t *)(x + 2);
        for (int j = 0; j < 32; j++) y[j] = (float)q[j] * d;
    }
}

/* 6-bit scale and min j of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, int *sc, int *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static void dq_q2_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: scales[16], qs[64], d, dmin */
    for (uint64_t b = 0; b < nb; b++, x += 84) {
        const uint8_t *sc = x, *q = x + 16;
        const float d = h2f(x + 80), dmin = h2f(x + 82);
        int is = 0;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2) {
                for (int half = 0; half < 2; half++) {
                    const uint8_t s = sc[is++];
                    const float dl = d * (float)(s & 0xF), ml = dmin * (float)(s >> 4);
                    const uint8_t *qq = q + 16 * half;
                    for (int l = 0; l < 16; l++) *y++ = dl * (float)((qq[l] >> shift) & 3) - ml;
                }
            }
        }
    }
}

static void dq_q3_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: hmask[32], qs[64], scales[12], d */
    for (uint64_t b = 0; b < nb; b++, x += 110) {
        const uint8_t *hm = x, *q = x + 32, *s = x + 96;
        const float d_all = h2f(x + 108);
        int scales[16];
        for (int j = 0; j < 16; j++) {
            const int lo = j < 8 ? (s[j] & 0xF) : (s[j - 8] >> 4);
            const int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
            scales[j] = (lo | (hi << 4)) - 32;
        }
        int is = 0;
        uint8_t m = 1;
        for (int n = 0; n < QK_K; n += 128, q += 32) {
            for (int shift = 0; shift < 8; shift += 2, m = (uint8_t)(m << 1)) {
                for (int half = 0; half < 2; half++) {
                    const float dl = d_all * (float)scales[is++];
                    const uint8_t *qq = q + 16 * half, *hh = hm + 16 * half;
                    for (int l = 0; l < 16; l++)
                        *y++ = dl * (float)((int)((qq[l] >> shift) & 3) - ((hh[l] & m) ? 0 : 4));
                }
            }
        }
    }
}

static void dq_q4_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: d, dmin, scales[12], qs[128] */
    for (uint64_t b = 0; b < nb; b++, x += 144) {
        const float d = h2f(x), dmin = h2f(x + 2);
        const uint8_t *sc = x + 4, *restrict q = x + 16;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, q += 32, y += 64) {
            int s, m;
            scale_min_k4(is, sc, &s, &m);
            const float d1 = d * (float)s, m1 = dmin * (float)m;
            scale_min_k4(is + 1, sc, &s, &m);
            const float d2 = d * (float)s, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                y[l] = d1 * (float)(q[l] & 0xF) - m1;
                y[l + 32] = d2 * (float)(q[l] >> 4) - m2;
            }
        }
    }
}

static void dq_q5_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: d, dmin, scales[12], qh[32], qs[128] */
    for (uint64_t b = 0; b < nb; b++, x += 176) {
        const float d = h2f(x), dmin = h2f(x + 2);
        const uint8_t *sc = x + 4, *restrict qh = x + 16, *restrict ql = x + 48;
        int u1 = 1, u2 = 2;
        for (int j = 0, is = 0; j < QK_K; j += 64, is += 2, ql += 32, y += 64, u1 <<= 2, u2 <<= 2) {
            int s, m;
            scale_min_k4(is, sc, &s, &m);
            const float d1 = d * (float)s, m1 = dmin * (float)m;
            scale_min_k4(is + 1, sc, &s, &m);
            const float d2 = d * (float)s, m2 = dmin * (float)m;
            for (int l = 0; l < 32; l++) {
                y[l] = d1 * (float)((ql[l] & 0xF) + ((qh[l] & u1) ? 16 : 0)) - m1;
                y[l + 32] = d2 * (float)((ql[l] >> 4) + ((qh[l] & u2) ? 16 : 0)) - m2;
            }
        }
    }
}

static void dq_q6_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: ql[128], qh[64], scales[16] (int8), d */
    for (uint64_t b = 0; b < nb; b++, x += 210) {
        const float d = h2f(x + 208);
        const uint8_t *restrict ql = x, *restrict qh = x + 128;
        const int8_t *sc = (const int8_t *)(x + 192);
        for (int n = 0; n < QK_K; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int)((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int)((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l] = d * (float)sc[is] * (float)q1;
                y[l + 32] = d * (float)sc[is + 2] * (float)q2;
                y[l + 64] = d * (float)sc[is + 4] * (float)q3;
                y[l + 96] = d * (float)sc[is + 6] * (float)q4;
            }
        }
    }
}

static void dq_q8_k(const uint8_t *restrict x, uint64_t nb, float *restrict y) {
    /* layout: d (f32), qs[256] (int8), bsums[16] (int16) */
    for (uint64_t b = 0; b < nb; b++, x += 292, y += QK_K) {
        float d;
        memcpy(&d, x, 4);
        const int8_t *restrict q = (const int8_t *)(x + 4);
        for (int j = 0; j < QK_K; j++) y[j] = d * (float)q[j];
    }
}

/* Element-wise sources, one "block" = one element. */
static void dq_f32(const uint8_t *restrict x, uint64_t n, float *restrict y) { memcpy(y, x, n * 4); }
static void dq_f16(const uint8_t *restrict x, uint64_t n, float *restrict y) {
    for (uint64_t i = 0; i < n; i++) y[i] = h2f(x + 2 * i);
}
static void dq_bf16(const uint8_t *restrict x, uint64_t n, float *restrict y) {
    for (uint64_t i = 0; i < n; i++) {
        uint16_t h;
        memcpy(&h, x + 2 * i, 2);
        y[i] = fl_bf16_to_f32(h);
    }
}
static void dq_f64(const uint8_t *restrict x, uint64_t n, float *restrict y) {
    for (uint64_t i = 0; i < n; i++) {
        double v;
        memcpy(&v, x + 8 * i, 8);
        y[i] = (float)v;
    }
}

static dq_fn dequant_fn(int type) {
    switch (type) {
    case GGML_F32: return dq_f32;
    case GGML_F16: return dq_f16;
    case GGML_BF16: return dq_bf16;
    case GGML_F64: return dq_f64;
    case GGML_Q4_0: return dq_q4_0;
    case GGML_Q4_1: return dq_q4_1;
    case GGML_Q5_0: return dq_q5_0;
    case GGML_Q5_1: return dq_q5_1;
    case GGML_Q8_0: return dq_q8_0;
    case GGML_Q2_K: return dq_q2_k;
    case GGML_Q3_K: return dq_q3_k;
    case GGML_Q4_K: return dq_q4_k;
    case GGML_Q5_K: return dq_q5_k;
    case GGML_Q6_K: return dq_q6_k;
    case GGML_Q8_K: return dq_q8_k;
    default: return NULL;
    }
}

int fl_ggml_can_dequant(int type) { return dequant_fn(type) != NULL; }

static void f32_to_f16_n(const float *restrict s, uint16_t *restrict d, uint64_t n) {
    uint64_t i = 0;
#if defined(__F16C__) && defined(__AVX__)
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
#endif
    for (; i < n; i++) d[i] = fl_f32_to_f16(s[i]);
}

static void f32_to_bf16_n(const float *restrict s, uint16_t *restrict d, uint64_t n) {
    for (uint64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &s[i], 4);
        /* round to nearest even; NaN stays NaN (quiet bit set), as fl_f32_to_bf16 */
        uint32_t r = u + 0x7fffu + ((u >> 16) & 1u);
        d[i] = ((u & 0x7fffffffu) > 0x7f800000u) ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)(r >> 16);
    }
}

fl_status fl_ggml_dequant(int type, const void *src, uint64_t n, void *dst, fl_dtype dst_type) {
    const ggml_type_info *ti = type_info(type);
    if (!ti) return fl_err(FL_E_UNSUPPORTED, "unknown ggml type id %d", type);
    if (dst_type != FL_F32 && dst_type != FL_F16 && dst_type != FL_BF16)
        return fl_err(FL_E_VALUE, "dequantisation writes float32, float16 or bfloat16, not dtype %d", (int)dst_type);
    if (n % (uint64_t)ti->blck)
        return fl_err(FL_E_VALUE, "%" PRIu64 " elements of %s: not a multiple of the block size %d", n, ti->name, ti->blck);
    dq_fn fn = dequant_fn(type);
    if (!fn) return fl_err(FL_E_UNSUPPORTED, "dequantisation of ggml type %s is not supported", ti->name);
    if (n == 0) return FL_OK;
    if (!src || !dst) return fl_err(FL_E_VALUE, "fl_ggml_dequant: NULL buffer");
    const uint8_t *x = src;
    const uint64_t blck = (uint64_t)ti->blck, bbytes = (uint64_t)ti->bytes, nb = n / blck;

    if (dst_type == FL_F32) { fn(x, nb, dst); return FL_OK; }
    /* same-type 16-bit copies stay bit-exact (NaN payloads included) */
    if ((type == GGML_F16 && dst_type == FL_F16) || (type == GGML_BF16 && dst_type == FL_BF16)) {
        memcpy(dst, src, n * 2);
        return FL_OK;
    }
    /* through a small f32 buffer on the stack (cache-resident) */
    enum { TMP = 4096 };
    float tmp[TMP];
    const uint64_t per = TMP / blck; /* blocks per chunk; every block size divides 4096 */
    uint16_t *d = dst;
    for (uint64_t b = 0; b < nb; b += per) {
        const uint64_t cnt = nb - b < per ? nb - b : per;
        fn(x + b * bbytes, cnt, tmp);
        if (dst_type == FL_F16) f32_to_f16_n(tmp, d + b * blck, cnt * blck);
        else f32_to_bf16_n(tmp, d + b * blck, cnt * blck);
    }
    return FL_OK;
}
