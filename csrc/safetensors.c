/* safetensors.c: open a .safetensors file, validate its header, map it read-only.
 *
 * Layout: u64 little-endian N, N bytes of UTF-8 JSON, then the data region. The JSON maps each
 * tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the data
 * region) plus an optional "__metadata__" object of string -> string.
 *
 * Order of work (STYLE.md, habit 9): the length field is checked against the cap and the file
 * size before anything sized by the file is allocated; the header is parsed by the strict JSON
 * reader below (no third-party code) and validated with checked arithmetic; the tensors must tile
 * the data region exactly, as the reference implementation (huggingface/safetensors, tensor.rs)
 * requires; only then is the file mapped. Every failure is a named error whose message names the
 * file and, where there is one, the tensor. */
#define _GNU_SOURCE
#include "safetensors.h"
#include "fl_utf8.h"

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#define JSON_MAX_DEPTH 64 /* nesting allowed inside values we skip (unknown fields) */

/* ------------------------------------------------------------------------------------------
 * Showing names in messages: names come from the file, so escape control bytes and cut long
 * ones at a character boundary (the message must stay valid UTF-8 for the binding).
 * ------------------------------------------------------------------------------------------ */
typedef struct { char s[200]; } shown;

static const char *show_n(shown *b, const char *s, size_t len) {
    size_t o = 0, i = 0;
    const size_t lim = sizeof b->s - 8; /* room for "..." and the NUL */
    while (i < len) {
        unsigned char c = (unsigned char)s[i];
        size_t cl = c < 0x80 ? 1 : c >= 0xf0 ? 4 : c >= 0xe0 ? 3 : 2; /* input is valid UTF-8 */
        if (i + cl > len) cl = len - i;
        size_t need = (c < 0x20 || c == 0x7f || c == '\\') ? 4 : cl;
        if (o + need > lim) { memcpy(b->s + o, "...", 3); o += 3; break; }
        if (c < 0x20 || c == 0x7f) { snprintf(b->s + o, 5, "\\x%02x", c); o += 4; }
        else if (c == '\\') { memcpy(b->s + o, "\\\\", 2); o += 2; }
        else { memcpy(b->s + o, s + i, cl); o += cl; }
        i += cl;
    }
    b->s[o] = 0;
    return b->s;
}
static const char *show(shown *b, const char *s) { return show_n(b, s, strlen(s)); }

/* "[2, 3, 4]" */
static const char *show_shape(shown *b, const fl_st_tensor *t) {
    size_t o = 0;
    b->s[o++] = '[';
    for (int d = 0; d < t->ndim; d++)
        o += (size_t)snprintf(b->s + o, sizeof b->s - o, d ? ", %" PRId64 : "%" PRId64, t->shape[d]);
    snprintf(b->s + o, sizeof b->s - o, "]");
    return b->s;
}

/* ------------------------------------------------------------------------------------------
 * Strict JSON reader over the header bytes (already checked to be valid UTF-8).
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    const unsigned char *s;
    size_t n, i;
} jp;

static void ws(jp *p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r'))
        p->i++;
}
static int peek(const jp *p) { return p->i < p->n ? p->s[p->i] : -1; }

/* "invalid JSON in header at byte 17: expected ':'" (the offending byte is not quoted) */
static fl_status jerr(const jp *p, const char *what) {
    if (p->i >= p->n)
        return fl_err(FL_E_FORMAT, "invalid JSON in header: %s, but the header ends at byte %zu (cut short?)", what, p->n);
    return fl_err(FL_E_FORMAT, "invalid JSON in header at byte %zu: %s", p->i, what);
}

static int hexval(int c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}
static int read_hex4(jp *p, uint32_t *out) { /* p->i at the first hex digit */
    if (p->n - p->i < 4) return 0;
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        int h = hexval(p->s[p->i + k]);
        if (h < 0) return 0;
        v = v << 4 | (uint32_t)h;
    }
    p->i += 4;
    *out = v;
    return 1;
}
static size_t put_utf8(char *o, uint32_t cp) {
    if (cp < 0x80) { o[0] = (char)cp; return 1; }
    if (cp < 0x800) { o[0] = (char)(0xc0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3f)); return 2; }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | cp >> 12); o[1] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | cp >> 18); o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f)); o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}

/* Decode the string at p->i (which holds '"'). With out == NULL the string is only checked.
 * `out` must hold (raw length) bytes + 1: decoding never grows a string. NUL (\u0000) is refused:
 * names and metadata are C strings here. */
static fl_status json_string_into(jp *p, char *out, size_t *olen) {
    size_t o = 0;
    p->i++; /* opening quote */
    for (;;) {
        if (p->i >= p->n) return jerr(p, "unterminated string");
        unsigned char c = p->s[p->i];
        if (c == '"') { p->i++; break; }
        if (c < 0x20) return jerr(p, "control character inside a string (must be escaped)");
        if (c != '\\') { if (out) out[o] = (char)c; o++; p->i++; continue; }
        size_t esc_at = p->i;
        p->i++;
        if (p->i >= p->n) return jerr(p, "unterminated string");
        c = p->s[p->i++];
        char e;
        switch (c) {
        case '"': e = '"'; break;
        case '\\': e = '\\'; break;
        case '/': e = '/'; break;
        case 'b': e = '\b'; break;
        case 'f': e = '\f'; break;
        case 'n': e = '\n'; break;
        case 'r': e = '\r'; break;
        case 't': e = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (!read_hex4(p, &cp)) { p->i = esc_at; return jerr(p, "\\u must be followed by 4 hex digits"); }
            if (cp >= 0xdc00 && cp <= 0xdfff) { p->i = esc_at; return jerr(p, "lone low surrogate in \\u escape"); }
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (p->n - p->i < 2 || p->s[p->i] != '\\' || p->s[p->i + 1] != 'u') {
                    p->i = esc_at;
                    return jerr(p, "high surrogate in \\u escape not followed by a low surrogate");
                }
                p->i += 2;
                if (!read_hex4(p, &lo) || lo < 0xdc00 || lo > 0xdfff) {
                    p->i = esc_at;
                    return jerr(p, "high surrogate in \\u escape not followed by a low surrogate");
                }
                cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
            }
            if (cp == 0) { p->i = esc_at; return jerr(p, "\\u0000 (NUL) in a string is not supported"); }
            char tmp[4];
            size_t k = put_utf8(tmp, cp);
            if (out) memcpy(out + o, tmp, k);
            o += k;
            continue;
        }
        default: p->i = esc_at; return jerr(p, "invalid escape in string");
        }
        if (out) out[o] = e;
        o++;
    }
    if (out) out[o] = 0;
    if (olen) *olen = o;
    return FL_OK;
}

/* Decode the string at p->i into a new malloc'd C string. */
static fl_status json_string(jp *p, char **out) {
    *out = NULL;
    if (peek(p) != '"') return jerr(p, "expected a string");
    /* find the closing quote to size the buffer (escapes are validated by the decoder) */
    size_t j = p->i + 1;
    while (j < p->n && p->s[j] != '"') j += p->s[j] == '\\' ? 2 : 1;
    if (j >= p->n) return jerr(p, "unterminated string");
    char *buf = malloc(j - p->i); /* raw length - 1 quote + NUL */
    if (!buf) return fl_err(FL_E_NOMEM, "out of memory reading the header");
    fl_status st = json_string_into(p, buf, NULL);
    if (st != FL_OK) { free(buf); return st; }
    *out = buf;
    return FL_OK;
}

/* A JSON number. Integers are returned as magnitude + sign; anything with a fraction or an
 * exponent sets *is_int = 0; integers beyond 2^64-1 set *overflow. */
static fl_status json_number(jp *p, int *neg, int *is_int, int *overflow, uint64_t *mag) {
    *neg = 0; *is_int = 1; *overflow = 0; *mag = 0;
    if (peek(p) == '-') { *neg = 1; p->i++; }
    int c = peek(p);
    if (c < '0' || c > '9') return jerr(p, "expected a digit");
    if (c == '0') p->i++;
    else
        while ((c = peek(p)) >= '0' && c <= '9') {
            uint64_t d = (uint64_t)(c - '0');
            if (!fl_mul_u64(*mag, 10, mag) || !fl_add_u64(*mag, d, mag)) *overflow = 1;
            p->i++;
        }
    if (peek(p) == '.') {
        *is_int = 0; p->i++;
        if ((c = peek(p)) < '0' || c > '9') return jerr(p, "expected a digit after '.'");
        while ((c = peek(p)) >= '0' && c <= '9') p->i++;
    }
    if (peek(p) == 'e' || peek(p) == 'E') {
        *is_int = 0; p->i++;
        if (peek(p) == '+' || peek(p) == '-') p->i++;
        if ((c = peek(p)) < '0' || c > '9') return jerr(p, "expected a digit in the exponent");
        while ((c = peek(p)) >= '0' && c <= '9') p->i++;
    }
    return FL_OK;
}

static fl_status json_skip(jp *p, int depth);

static fl_status json_literal(jp *p, const char *lit) {
    size_t k = strlen(lit);
    if (p->n - p->i < k || memcmp(p->s + p->i, lit, k) != 0) return jerr(p, "expected a JSON value");
    p->i += k;
    return FL_OK;
}

/* Skip one value of any kind (fields we do not use), checking its syntax. */
static fl_status json_skip(jp *p, int depth) {
    if (depth > JSON_MAX_DEPTH) return jerr(p, "values nested too deeply");
    int c = peek(p);
    if (c == '"') return json_string_into(p, NULL, NULL);
    if (c == '-' || (c >= '0' && c <= '9')) {
        int neg, is_int, ovf; uint64_t mag;
        return json_number(p, &neg, &is_int, &ovf, &mag);
    }
    if (c == 't') return json_literal(p, "true");
    if (c == 'f') return json_literal(p, "false");
    if (c == 'n') return json_literal(p, "null");
    if (c == '[' || c == '{') {
        int obj = c == '{', close = obj ? '}' : ']';
        p->i++; ws(p);
        if (peek(p) == close) { p->i++; return FL_OK; }
        for (;;) {
            if (obj) {
                if (peek(p) != '"') return jerr(p, "expected a string key");
                FL_TRY(json_string_into(p, NULL, NULL));
                ws(p);
                if (peek(p) != ':') return jerr(p, "expected ':'");
                p->i++; ws(p);
            }
            FL_TRY(json_skip(p, depth + 1));
            ws(p);
            if (peek(p) == ',') { p->i++; ws(p); continue; }
            if (peek(p) == close) { p->i++; return FL_OK; }
            return jerr(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    return jerr(p, "expected a JSON value");
}

/* A non-negative integer field (a dimension, an offset). */
static fl_status json_uint(jp *p, uint64_t *v, const char *what) {
    int c = peek(p);
    if (c != '-' && (c < '0' || c > '9')) {
        if (c == '"' || c == '[' || c == '{' || c == 't' || c == 'f' || c == 'n')
            return fl_err(FL_E_FORMAT, "%s must be a non-negative integer (found %s at header byte %zu)", what,
                          c == '"' ? "a string" : c == '[' ? "an array" : c == '{' ? "an object" : "a literal", p->i);
        return jerr(p, "expected a number");
    }
    size_t at = p->i;
    int neg, is_int, ovf; uint64_t mag;
    FL_TRY(json_number(p, &neg, &is_int, &ovf, &mag));
    /* the number's text is not quoted (header byte offsets identify it) */
    if (!is_int) return fl_err(FL_E_FORMAT, "%s must be an integer (a non-integer number at header byte %zu)", what, at);
    if (neg && (mag || ovf)) return fl_err(FL_E_FORMAT, "%s is negative (header byte %zu)", what, at);
    if (ovf) return fl_err(FL_E_FORMAT, "%s is too large (more than 64 bits, header byte %zu)", what, at);
    *v = mag;
    return FL_OK;
}

/* ------------------------------------------------------------------------------------------
 * Header contents
 * ------------------------------------------------------------------------------------------ */
/* Valid safetensors dtypes that fastload has no table entry for: a clear NotImplementedError. */
static const char *const known_unsupported[] = {"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "C64", NULL};

/* Returns the index of the first byte that is not valid UTF-8, or n. */
static size_t utf8_bad_at(const unsigned char *s, size_t n) {
    size_t i = 0;
    while (i < n) {
        const size_t k = fl_utf8_len(s + i, n - i);
        if (!k) return i;
        i += k;
    }
    return n;
}

static void free_parsed(fl_st_file *f) {
    for (int i = 0; i < f->n; i++) free(f->t[i].name);
    free(f->t);
    for (int i = 0; i < f->n_meta; i++) { free(f->meta_keys[i]); free(f->meta_vals[i]); }
    free(f->meta_keys); free(f->meta_vals);
    free(f->metadata);
    free(f->by_name);
    f->n = 0; f->t = NULL; f->n_meta = 0; f->meta_keys = f->meta_vals = NULL; f->metadata = NULL; f->by_name = NULL;
}

/* Grow an array of `elem`-byte items so that it holds at least `need`: the (possibly moved)
 * array, or NULL (the old one untouched) when out of memory. */
static void *grow(void *arr, int *cap, int need, size_t elem) {
    if (need <= *cap) return arr;
    if (need > INT32_MAX / 2) return NULL;
    int nc = *cap ? *cap * 2 : 16;
    while (nc < need) nc *= 2;
    void *a = realloc(arr, (size_t)nc * elem);
    if (a) *cap = nc;
    return a;
}

/* The object {"dtype", "shape", "data_offsets"} of one tensor. Messages name the field only;
 * the caller prefixes the tensor name. */
static fl_status parse_tensor(jp *p, fl_st_tensor *t, uint64_t data_len) {
    if (peek(p) != '{')
        return peek(p) < 0 ? jerr(p, "expected a tensor entry")
                           : fl_err(FL_E_FORMAT, "entry at header byte %zu is not an object {\"dtype\", \"shape\", "
                                    "\"data_offsets\"}", p->i);
    p->i++; ws(p);
    int have_dtype = 0, have_shape = 0, have_off = 0;
    fl_status st;
    shown b1;
    if (peek(p) == '}') p->i++;
    else for (;;) {
        char *key;
        size_t key_at = p->i;
        if (peek(p) != '"') return jerr(p, "expected a field name (string)");
        FL_TRY(json_string(p, &key));
        ws(p);
        if (peek(p) != ':') { free(key); return jerr(p, "expected ':'"); }
        p->i++; ws(p);
        int which = !strcmp(key, "dtype") ? 1 : !strcmp(key, "shape") ? 2 : !strcmp(key, "data_offsets") ? 3 : 0;
        if ((which == 1 && have_dtype) || (which == 2 && have_shape) || (which == 3 && have_off)) {
            st = fl_err(FL_E_FORMAT, "field '%s' appears twice (header byte %zu)", key, key_at);
            free(key);
            return st;
        }
        free(key);
        if (which == 1) {
            char *ds;
            if (peek(p) != '"') {
                if (peek(p) < 0) return jerr(p, "expected a dtype string");
                return fl_err(FL_E_FORMAT, "'dtype' must be a string such as \"BF16\" (header byte %zu)", p->i);
            }
            FL_TRY(json_string(p, &ds));
            t->dtype = fl_dtype_from_st_name(ds, strlen(ds));
            if (t->dtype == FL_DTYPE_INVALID) {
                int valid = 0;
                for (int k = 0; known_unsupported[k]; k++) valid |= !strcmp(ds, known_unsupported[k]);
                st = valid ? fl_err(FL_E_UNSUPPORTED, "dtype '%s' is valid safetensors but not supported by fastload", ds)
                           : fl_err(FL_E_FORMAT, "unknown dtype '%s'", show(&b1, ds));
                free(ds);
                return st;
            }
            free(ds);
            have_dtype = 1;
        } else if (which == 2) {
            if (peek(p) != '[') {
                if (peek(p) < 0) return jerr(p, "expected the shape array");
                return fl_err(FL_E_FORMAT, "'shape' must be an array of integers (header byte %zu)", p->i);
            }
            p->i++; ws(p);
            t->ndim = 0;
            if (peek(p) == ']') p->i++;
            else for (;;) {
                if (t->ndim == FL_ST_MAX_DIMS)
                    return fl_err(FL_E_UNSUPPORTED, "'shape' has more than %d dimensions (fastload supports at most %d)",
                                  FL_ST_MAX_DIMS, FL_ST_MAX_DIMS);
                char what[48];
                snprintf(what, sizeof what, "'shape' dimension %d", t->ndim);
                uint64_t d;
                FL_TRY(json_uint(p, &d, what));
                if (d > (uint64_t)INT64_MAX) return fl_err(FL_E_FORMAT, "%s is too large (%" PRIu64 ")", what, d);
                t->shape[t->ndim++] = (int64_t)d;
                ws(p);
                if (peek(p) == ',') { p->i++; ws(p); continue; }
                if (peek(p) == ']') { p->i++; break; }
                return jerr(p, "expected ',' or ']' in 'shape'");
            }
            have_shape = 1;
        } else if (which == 3) {
            if (peek(p) != '[') {
                if (peek(p) < 0) return jerr(p, "expected the data_offsets array");
                return fl_err(FL_E_FORMAT, "'data_offsets' must be an array [begin, end] (header byte %zu)", p->i);
            }
            p->i++; ws(p);
            if (peek(p) == ']') return fl_err(FL_E_FORMAT, "'data_offsets' must be [begin, end], got []");
            FL_TRY(json_uint(p, &t->begin, "'data_offsets' begin"));
            ws(p);
            if (peek(p) != ',') {
                if (peek(p) == ']') return fl_err(FL_E_FORMAT, "'data_offsets' must be [begin, end], got one number");
                return jerr(p, "expected ',' in 'data_offsets'");
            }
            p->i++; ws(p);
            FL_TRY(json_uint(p, &t->end, "'data_offsets' end"));
            ws(p);
            if (peek(p) != ']') {
                if (peek(p) == ',') return fl_err(FL_E_FORMAT, "'data_offsets' must be [begin, end], got more than two numbers");
                return jerr(p, "expected ']' after 'data_offsets' end");
            }
            p->i++;
            have_off = 1;
        } else {
            FL_TRY(json_skip(p, 1)); /* unknown fields are ignored, as the reference does */
        }
        ws(p);
        if (peek(p) == ',') { p->i++; ws(p); continue; }
        if (peek(p) == '}') { p->i++; break; }
        return jerr(p, "expected ',' or '}' in the tensor entry");
    }
    if (!have_dtype) return fl_err(FL_E_FORMAT, "missing field 'dtype'");
    if (!have_shape) return fl_err(FL_E_FORMAT, "missing field 'shape'");
    if (!have_off) return fl_err(FL_E_FORMAT, "missing field 'data_offsets'");

    /* sizes, with checked arithmetic */
    if (t->begin > t->end)
        return fl_err(FL_E_FORMAT, "data_offsets [%" PRIu64 ", %" PRIu64 "] are reversed (begin > end)", t->begin, t->end);
    if (t->end > data_len)
        return fl_err(FL_E_FORMAT, "data_offsets [%" PRIu64 ", %" PRIu64 "] lie outside the data region of %" PRIu64
                      " bytes", t->begin, t->end, data_len);
    uint64_t nel = 1, nbytes;
    for (int d = 0; d < t->ndim; d++)
        if (!fl_mul_u64(nel, (uint64_t)t->shape[d], &nel))
            return fl_err(FL_E_FORMAT, "shape %s overflows 64 bits", show_shape(&b1, t));
    if (!fl_mul_u64(nel, (uint64_t)fl_dtype_size(t->dtype), &nbytes))
        return fl_err(FL_E_FORMAT, "shape %s of %s overflows 64 bits in bytes", show_shape(&b1, t),
                      fl_dtype_table[t->dtype].st_name);
    if (nbytes != t->end - t->begin)
        return fl_err(FL_E_FORMAT, "shape %s of %s needs %" PRIu64 " bytes but data_offsets [%" PRIu64 ", %" PRIu64
                      "] span %" PRIu64, show_shape(&b1, t), fl_dtype_table[t->dtype].st_name, nbytes, t->begin,
                      t->end, t->end - t->begin);
    return FL_OK;
}

/* "__metadata__": an object of string -> string (or null). */
static fl_status parse_metadata(jp *p, fl_st_file *f, int *cap) {
    if (peek(p) == 'n') return json_literal(p, "null");
    if (peek(p) != '{') {
        if (peek(p) < 0) return jerr(p, "expected the __metadata__ object");
        return fl_err(FL_E_FORMAT, "'__metadata__' must be an object of string values (header byte %zu)", p->i);
    }
    size_t start = p->i;
    p->i++; ws(p);
    shown b1;
    if (peek(p) == '}') p->i++;
    else for (;;) {
        char *k = NULL, *v = NULL;
        if (peek(p) != '"') return jerr(p, "expected a __metadata__ key (string)");
        FL_TRY(json_string(p, &k));
        ws(p);
        if (peek(p) != ':') { free(k); return jerr(p, "expected ':'"); }
        p->i++; ws(p);
        if (peek(p) != '"') {
            fl_status st = peek(p) < 0 ? jerr(p, "expected a __metadata__ value")
                                       : fl_err(FL_E_FORMAT, "'__metadata__' value of key '%s' is not a string "
                                                "(header byte %zu)", show(&b1, k), p->i);
            free(k);
            return st;
        }
        fl_status st = json_string(p, &v);
        if (st != FL_OK) { free(k); return st; }
        int oldcap = *cap; /* keys and values share the capacity */
        char **keys = grow(f->meta_keys, cap, f->n_meta + 1, sizeof(char *));
        if (!keys) { free(k); free(v); goto nomem; }
        f->meta_keys = keys;
        if (*cap != oldcap) {
            char **vals = realloc(f->meta_vals, (size_t)*cap * sizeof(char *));
            if (!vals) { free(k); free(v); goto nomem; }
            f->meta_vals = vals;
        }
        f->meta_keys[f->n_meta] = k; f->meta_vals[f->n_meta] = v; f->n_meta++;
        ws(p);
        if (peek(p) == ',') { p->i++; ws(p); continue; }
        if (peek(p) == '}') { p->i++; break; }
        return jerr(p, "expected ',' or '}' in __metadata__");
    }
    size_t len = p->i - start;
    free(f->metadata);
    f->metadata = malloc(len + 1);
    if (!f->metadata) goto nomem;
    memcpy(f->metadata, p->s + start, len);
    f->metadata[len] = 0;
    return FL_OK;
nomem:
    return fl_err(FL_E_NOMEM, "out of memory reading __metadata__");
}

typedef struct { uint64_t begin, end; int idx; } off_key;
static int cmp_off(const void *a, const void *b) {
    const off_key *x = a, *y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return (x->idx > y->idx) - (x->idx < y->idx);
}
static int cmp_name(const void *a, const void *b) { /* elements: fl_st_tensor pointers */
    const fl_st_tensor *x = *(fl_st_tensor *const *)a, *y = *(fl_st_tensor *const *)b;
    return strcmp(x->name, y->name);
}
static int cmp_str(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Sort by offsets (ties in the given order), reject duplicate names, build the name index.
 * Used by finish() (safetensors headers) and fl_st_open_table() (explicit tables). */
static fl_status sort_and_index(fl_st_file *f) {
    int n = f->n;
    shown b1;
    if (n == 0) return FL_OK;
    /* 1. order by (begin, end), ties in header order */
    off_key *keys = malloc((size_t)n * sizeof *keys);
    fl_st_tensor *sorted = malloc((size_t)n * sizeof *sorted);
    fl_st_tensor **ptrs = malloc((size_t)n * sizeof *ptrs);
    f->by_name = malloc((size_t)n * sizeof *f->by_name);
    if (!keys || !sorted || !ptrs || !f->by_name) {
        free(keys); free(sorted); free(ptrs);
        return fl_err(FL_E_NOMEM, "out of memory indexing %d tensors", n);
    }
    for (int i = 0; i < n; i++) keys[i] = (off_key){f->t[i].begin, f->t[i].end, i};
    qsort(keys, (size_t)n, sizeof *keys, cmp_off);
    for (int i = 0; i < n; i++) sorted[i] = f->t[keys[i].idx];
    free(keys);
    free(f->t);
    f->t = sorted;

    /* 2. names: sort pointers, duplicates sit side by side */
    for (int i = 0; i < n; i++) ptrs[i] = &f->t[i];
    qsort(ptrs, (size_t)n, sizeof *ptrs, cmp_name);
    for (int i = 0; i < n; i++) {
        if (i && !strcmp(ptrs[i]->name, ptrs[i - 1]->name)) {
            fl_status st = fl_err(FL_E_FORMAT, "tensor '%s' appears twice in the header (duplicate key)",
                                  show(&b1, ptrs[i]->name));
            free(ptrs);
            return st;
        }
        f->by_name[i] = (int32_t)(ptrs[i] - f->t);
    }
    free(ptrs);
    return FL_OK;
}

/* Sort by offsets, reject duplicate names, build the name index, check the exact tiling. */
static fl_status finish(fl_st_file *f, uint64_t data_len) {
    int n = f->n;
    shown b1, b2, b3;
    if (n == 0) {
        if (data_len)
            return fl_err(FL_E_FORMAT, "the header lists no tensors but %" PRIu64 " bytes follow it", data_len);
        return FL_OK;
    }
    FL_TRY(sort_and_index(f));

    /* 3. exact tiling: first at 0, each where the previous ended, the last at data_len */
    uint64_t at = 0;
    for (int i = 0; i < n; i++) {
        const fl_st_tensor *t = &f->t[i], *q = i ? &f->t[i - 1] : NULL;
        if (t->begin > at) {
            if (!q)
                return fl_err(FL_E_FORMAT, "gap of %" PRIu64 " unused bytes at the start of the data region, before "
                              "tensor '%s' (data_offsets [%" PRIu64 ", %" PRIu64 "]); tensors must start at 0",
                              t->begin, show(&b1, t->name), t->begin, t->end);
            return fl_err(FL_E_FORMAT, "gap of %" PRIu64 " unused bytes between tensor '%s' (data_offsets [%" PRIu64
                          ", %" PRIu64 "]) and tensor '%s' (data_offsets [%" PRIu64 ", %" PRIu64 "])",
                          t->begin - at, show(&b1, q->name), q->begin, q->end, show(&b2, t->name), t->begin, t->end);
        }
        if (t->begin < at) {
            /* q ended at `at` (ends are non-decreasing along the sorted walk while it tiles) */
            return fl_err(FL_E_FORMAT, "tensor '%s' (data_offsets [%" PRIu64 ", %" PRIu64 "]) overlaps tensor '%s' "
                          "(data_offsets [%" PRIu64 ", %" PRIu64 "])", show(&b1, t->name), t->begin, t->end,
                          show(&b2, q->name), q->begin, q->end);
        }
        at = t->end;
    }
    if (at != data_len) /* at < data_len: every end was checked against data_len */
        return fl_err(FL_E_FORMAT, "the data region is %" PRIu64 " bytes but the tensors cover only %" PRIu64 
                      " (%" PRIu64 " trailing bytes after tensor '%s'; truncated header or padded data?)", data_len,
                      at, data_len - at, show(&b3, f->t[n - 1].name));
    return FL_OK;
}

fl_status fl_st_parse_header(const char *json, uint64_t len, uint64_t data_len, fl_st_file *f) {
    if (!f || (!json && len)) return fl_err(FL_E_VALUE, "fl_st_parse_header: NULL argument");
    f->n = 0; f->t = NULL; f->n_meta = 0; f->meta_keys = f->meta_vals = NULL; f->metadata = NULL; f->by_name = NULL;
    if (len == 0) return fl_err(FL_E_FORMAT, "header is empty (length field is 0)");
    if (len > FL_ST_MAX_HEADER)
        return fl_err(FL_E_FORMAT, "header length field exceeds the limit of %u bytes", FL_ST_MAX_HEADER);
    const unsigned char *s = (const unsigned char *)json;
    size_t bad = utf8_bad_at(s, (size_t)len);
    /* No bytes of a header that does not parse are quoted: a file that is not a safetensors file
     * (a shard name pointing at /etc/passwd) must not show its content in the message. */
    if (bad != len) return fl_err(FL_E_FORMAT, "header is not valid UTF-8 (at header byte %zu)", bad);
    if (s[0] != '{') return fl_err(FL_E_FORMAT, "header does not start with '{': not a safetensors file");

    jp p = {s, (size_t)len, 1};
    int tcap = 0, mcap = 0, have_meta = 0;
    fl_status st = FL_OK;
    shown b1;
    ws(&p);
    if (peek(&p) == '}') p.i++;
    else for (;;) {
        char *name;
        if (peek(&p) != '"') { st = jerr(&p, "expected a tensor name (string)"); goto fail; }
        if ((st = json_string(&p, &name)) != FL_OK) goto fail;
        ws(&p);
        if (peek(&p) != ':') { free(name); st = jerr(&p, "expected ':' after a tensor name"); goto fail; }
        p.i++; ws(&p);
        if (!strcmp(name, "__metadata__")) {
            free(name);
            if (have_meta) { st = fl_err(FL_E_FORMAT, "'__metadata__' appears twice in the header"); goto fail; }
            have_meta = 1;
            if ((st = parse_metadata(&p, f, &mcap)) != FL_OK) goto fail;
        } else {
            fl_st_tensor *ts = grow(f->t, &tcap, f->n + 1, sizeof *f->t);
            if (!ts) {
                free(name);
                st = fl_err(FL_E_NOMEM, "out of memory reading the header (%d tensors)", f->n);
                goto fail;
            }
            f->t = ts;
            fl_st_tensor *t = &f->t[f->n];
            memset(t, 0, sizeof *t);
            if ((st = parse_tensor(&p, t, data_len)) != FL_OK) {
                st = fl_err_prefix(st, "tensor '%s'", show(&b1, name));
                free(name);
                goto fail;
            }
            t->name = name;
            f->n++;
        }
        ws(&p);
        if (peek(&p) == ',') { p.i++; ws(&p); continue; }
        if (peek(&p) == '}') { p.i++; break; }
        st = jerr(&p, "expected ',' or '}' after a tensor entry");
        goto fail;
    }
    ws(&p); /* trailing whitespace (writers pad the header with spaces) is allowed */
    if (p.i != p.n) { st = jerr(&p, "unexpected data after the header's JSON object"); goto fail; }
    if (f->n_meta > 1) { /* duplicate metadata keys */
        char **ks = malloc((size_t)f->n_meta * sizeof *ks);
        if (!ks) { st = fl_err(FL_E_NOMEM, "out of memory reading __metadata__"); goto fail; }
        memcpy(ks, f->meta_keys, (size_t)f->n_meta * sizeof *ks);
        qsort(ks, (size_t)f->n_meta, sizeof *ks, cmp_str);
        for (int i = 1; i < f->n_meta; i++)
            if (!strcmp(ks[i], ks[i - 1])) {
                st = fl_err(FL_E_FORMAT, "'__metadata__' key '%s' appears twice", show(&b1, ks[i]));
                break;
            }
        free(ks);
        if (st != FL_OK) goto fail;
    }
    if ((st = finish(f, data_len)) != FL_OK) goto fail;
    for (int i = 0; i < f->n; i++) f->t[i].data = f->data ? f->data + f->t[i].begin : NULL;
    return FL_OK;
fail:
    free_parsed(f);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * Files
 * ------------------------------------------------------------------------------------------ */
static fl_status pread_full(int fd, void *buf, size_t n, uint64_t off, const char *path, const char *what) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, (char *)buf + got, n - got, (off_t)(off + got));
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            char eb[128];
            return fl_err(FL_E_IO, "%s: cannot read the %s: %s", path, what, strerror_r(errno, eb, sizeof eb));
        }
        if (r == 0)
            return fl_err(FL_E_IO, "%s: file ended while reading the %s (did it change while being read?)", path, what);
        got += (size_t)r;
    }
    return FL_OK;
}

fl_status fl_st_open(const char *path, fl_st_file **out) {
    if (!out) return fl_err(FL_E_VALUE, "fl_st_open: out is NULL");
    *out = NULL;
    if (!path) return fl_err(FL_E_VALUE, "fl_st_open: path is NULL");
    char eb[128];
    int fd;
    uint64_t size;
    /* special files (a FIFO named like a checkpoint would block a plain open) are refused first */
    FL_TRY(fl_open_regular(path, 0, &fd, &size));
    fl_status st;
    char *hdr = NULL;
    fl_st_file *f = NULL;
    if (size < 8) {
        st = fl_err(FL_E_FORMAT, "%s: file is %" PRIu64 " bytes, too short for the 8-byte header length "
                    "(truncated, or not a safetensors file)", path, size);
        goto fail;
    }
    if (size > (uint64_t)SIZE_MAX) { st = fl_err(FL_E_IO, "%s: file of %" PRIu64 " bytes is too large to map", path, size); goto fail; }

    /* the length field, validated before anything sized by it is allocated */
    unsigned char lb[8];
    if ((st = pread_full(fd, lb, 8, 0, path, "header length")) != FL_OK) goto fail;
    uint64_t hlen = 0, hend;
    for (int k = 7; k >= 0; k--) hlen = hlen << 8 | lb[k];
    if (hlen > FL_ST_MAX_HEADER) {
        /* the value is the file's first 8 bytes read as a number: not printed (it may be any file's text) */
        st = fl_err(FL_E_FORMAT, "%s: header length field exceeds the limit of %u bytes (corrupt, or not a "
                    "safetensors file)", path, FL_ST_MAX_HEADER);
        goto fail;
    }
    if (!fl_add_u64(8, hlen, &hend) || hend > size) {
        st = fl_err(FL_E_FORMAT, "%s: header length %" PRIu64 " runs past the end of the file (file is %" PRIu64
                    " bytes; truncated, or not a safetensors file)", path, hlen, size);
        goto fail;
    }
    hdr = malloc(hlen ? (size_t)hlen : 1);
    f = calloc(1, sizeof *f);
    if (!hdr || !f || !(f->path = strdup(path))) {
        st = fl_err(FL_E_NOMEM, "%s: out of memory for a header of %" PRIu64 " bytes", path, hlen);
        goto fail;
    }
    if ((st = pread_full(fd, hdr, (size_t)hlen, 8, path, "header")) != FL_OK) goto fail;
    f->size = (size_t)size;
    f->header_len = hlen;
    f->data_len = size - hend;
    if ((st = fl_st_parse_header(hdr, hlen, f->data_len, f)) != FL_OK) {
        st = fl_err_prefix(st, "%s", path);
        goto fail;
    }
    free(hdr);
    hdr = NULL;

    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        st = fl_err(FL_E_IO, "%s: cannot map %" PRIu64 " bytes: %s", path, size, strerror_r(errno, eb, sizeof eb));
        goto fail;
    }
    close(fd);
    f->map = map;
    f->data_off = hend;
    f->data = f->map + hend;
    for (int i = 0; i < f->n; i++) f->t[i].data = f->data + f->t[i].begin;
    *out = f;
    return FL_OK;
fail:
    close(fd);
    free(hdr);
    fl_st_close(f);
    return st;
}

/* ------------------------------------------------------------------------------------------
 * Files described by an explicit table (torch zip checkpoints: fastload/torchbin.py finds each
 * tensor's byte range in the zip; this checks the ranges again against the file it maps).
 * Unlike a safetensors header the tensors may overlap (tied weights share a storage) and need not
 * tile the file (the zip's headers and directory lie between them).
 * ------------------------------------------------------------------------------------------ */
static fl_status check_table_entry(const fl_st_tensor *t, uint64_t size) {
    shown b1;
    if (t->dtype < 0 || t->dtype >= FL_DTYPE_PLAIN_COUNT) return fl_err(FL_E_FORMAT, "invalid dtype");
    if (t->ndim < 0 || t->ndim > FL_ST_MAX_DIMS)
        return fl_err(FL_E_FORMAT, "%d dimensions (at most %d)", t->ndim, FL_ST_MAX_DIMS);
    uint64_t nel = 1, nbytes;
    for (int d = 0; d < t->ndim; d++) {
        if (t->shape[d] < 0) return fl_err(FL_E_FORMAT, "dimension %d is negative", d);
        if (!fl_mul_u64(nel, (uint64_t)t->shape[d], &nel))
            return fl_err(FL_E_FORMAT, "shape %s overflows 64 bits", show_shape(&b1, t));
    }
    if (!fl_mul_u64(nel, (uint64_t)fl_dtype_size(t->dtype), &nbytes))
        return fl_err(FL_E_FORMAT, "shape %s of %s overflows 64 bits in bytes", show_shape(&b1, t),
                      fl_dtype_table[t->dtype].st_name);
    if (t->begin > t->end || nbytes != t->end - t->begin)
        return fl_err(FL_E_FORMAT, "shape %s of %s needs %" PRIu64 " bytes but the table gives bytes [%" PRIu64 ", %"
                      PRIu64 ")", show_shape(&b1, t), fl_dtype_table[t->dtype].st_name, nbytes, t->begin, t->end);
    if (t->end > size)
        return fl_err(FL_E_FORMAT, "bytes [%" PRIu64 ", %" PRIu64 ") lie outside the file of %" PRIu64 " bytes",
                      t->begin, t->end, size);
    return FL_OK;
}

fl_status fl_st_open_table(const char *path, fl_st_tensor *t, int n, fl_st_file **out) {
    fl_st_file *f = NULL;
    fl_status st;
    int fd = -1;
    uint64_t size = 0;
    char eb[128];
    shown b1;
    if (out) *out = NULL;
    if (!out || !path || n < 0 || (n && !t)) { st = fl_err(FL_E_VALUE, "fl_st_open_table: bad argument"); goto fail; }
    if ((st = fl_open_regular(path, 0, &fd, &size)) != FL_OK) goto fail;
    if (size == 0) { st = fl_err(FL_E_FORMAT, "%s: the file is empty", path); goto fail; }
    if (size > (uint64_t)SIZE_MAX) { st = fl_err(FL_E_IO, "%s: file of %" PRIu64 " bytes is too large to map", path, size); goto fail; }
    for (int i = 0; i < n; i++)
        if ((st = check_table_entry(&t[i], size)) != FL_OK) {
            st = fl_err_prefix(st, "%s: tensor '%s'", path, show(&b1, t[i].name ? t[i].name : "?"));
            goto fail;
        }
    f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) { st = fl_err(FL_E_NOMEM, "%s: out of memory", path); goto fail; }
    f->n = n; f->t = t; t = NULL; /* f owns the table from here */
    if ((st = sort_and_index(f)) != FL_OK) { st = fl_err_prefix(st, "%s", path); goto fail; }
    void *map = mmap(NULL, (size_t)size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (map == MAP_FAILED) {
        st = fl_err(FL_E_IO, "%s: cannot map %" PRIu64 " bytes: %s", path, size, strerror_r(errno, eb, sizeof eb));
        goto fail;
    }
    close(fd);
    f->map = map;
    f->size = (size_t)size;
    f->data_off = 0;
    f->data = f->map;
    f->data_len = size;
    for (int i = 0; i < f->n; i++) f->t[i].data = f->data + f->t[i].begin;
    *out = f;
    return FL_OK;
fail:
    if (fd >= 0) close(fd);
    if (t) {
        for (int i = 0; i < n; i++) free(t[i].name);
        free(t);
    }
    fl_st_close(f);
    return st;
}

void fl_st_close(fl_st_file *f) {
    if (!f) return;
    free_parsed(f);
    if (f->map) munmap(f->map, f->size);
    free(f->path);
    free(f);
}

int fl_st_find(const fl_st_file *f, const char *name) {
    if (!f || !name || f->n <= 0) return -1;
    if (!f->by_name) {
        for (int i = 0; i < f->n; i++)
            if (!strcmp(f->t[i].name, name)) return i;
        return -1;
    }
    int lo = 0, hi = f->n - 1;
    while (lo <= hi) {
        int mid = lo + (hi - lo) / 2, i = f->by_name[mid];
        int c = strcmp(f->t[i].name, name);
        if (!c) return i;
        if (c < 0) lo = mid + 1;
        else hi = mid - 1;
    }
    return -1;
}
