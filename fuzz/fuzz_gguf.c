/* fuzz_gguf.c: libFuzzer harness for the GGUF reader and dequantisers (csrc/gguf.c).
 *
 * Input: a whole GGUF file. fl_gguf_open takes a path, so the input is written to a memfd and
 * opened as /proc/self/fd/N. On success the harness does what the loader does with a file, with
 * bounded work per input:
 *   - every key is looked up with fl_gguf_find_kv, every tensor with fl_gguf_find_tensor;
 *   - array elements (the first and last 64 of each array) are read with fl_gguf_arr_str /
 *     fl_gguf_arr_num, and must lie inside the mapping; out-of-range indices must fail cleanly;
 *   - every tensor must lie inside the mapping, and the first rows (up to 8192 elements) of each
 *     dequantisable tensor are dequantised to f32, f16 and bf16 into exact-size heap buffers;
 *   - the well-known keys the loader reads (general.architecture, <arch>.block_count, ...) are
 *     looked up by name.
 * Every failure must carry a message and a status a bad file may produce. */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "gguf.h"

#define ARR_PEEK 64
#define DQ_MAX_ELEMS 8192

static void check_in_map(const fl_gguf *g, const void *p, uint64_t n, const char *what) {
    const uint8_t *b = p;
    FUZZ_CHECK(b >= g->map && b <= g->map + g->size && n <= (uint64_t)(g->map + g->size - b),
               "%s outside the mapping (%" PRIu64 " bytes)", what, n);
}

static void check_array(const fl_gguf *g, const fl_gguf_kv *kv) {
    volatile uint8_t sink = 0;
    for (uint64_t k = 0; k < 2 * ARR_PEEK && k < kv->n; k++) {
        uint64_t i = k < ARR_PEEK ? k : kv->n - (k - ARR_PEEK) - 1;
        if (kv->arr_type == GGUF_T_STRING) {
            const char *s = NULL; uint64_t len = 0;
            fl_status st = fl_gguf_arr_str(kv, i, &s, &len);
            FUZZ_CHECK(st == FL_OK, "arr_str(%s, %" PRIu64 "): %s", kv->key, i, fl_err_msg());
            check_in_map(g, s, len, "array string");
            if (len) sink ^= (uint8_t)(s[0] ^ s[len - 1]);
        } else {
            double v;
            fl_status st = fl_gguf_arr_num(kv, i, &v);
            FUZZ_CHECK(st == FL_OK, "arr_num(%s, %" PRIu64 "): %s", kv->key, i, fl_err_msg());
            sink ^= (uint8_t)(v == v);
        }
    }
    const char *s; uint64_t len; double v;
    fl_status st = kv->arr_type == GGUF_T_STRING ? fl_gguf_arr_str(kv, kv->n, &s, &len) : fl_gguf_arr_num(kv, kv->n, &v);
    FUZZ_CHECK(st != FL_OK, "index n accepted for %s", kv->key);
    (void)sink;
}

static void dequant_rows(const fl_gguf *g, const fl_gguf_tensor *t) {
    const int blck = fl_ggml_block_elems(t->type);
    FUZZ_CHECK(blck > 0, "tensor '%s' of unknown type %d was accepted", t->name, t->type);
    uint64_t nel = 1;
    for (int d = 0; d < 4; d++) nel *= (uint64_t)t->ne[d];
    FUZZ_CHECK(fl_ggml_nbytes(t->type, nel) == t->nbytes || nel == 0, "tensor '%s': nbytes", t->name);
    if (!fl_ggml_can_dequant(t->type) || nel == 0) return;
    /* the first rows: up to two rows of ne[0], at most DQ_MAX_ELEMS, whole blocks */
    uint64_t n = (uint64_t)t->ne[0] * (nel / (uint64_t)t->ne[0] >= 2 ? 2 : 1);
    if (n > DQ_MAX_ELEMS) n = DQ_MAX_ELEMS / (uint64_t)blck * (uint64_t)blck;
    FUZZ_CHECK(fl_ggml_nbytes(t->type, n) <= t->nbytes, "tensor '%s': rows past its bytes", t->name);
    static const fl_dtype outs[3] = {FL_F32, FL_F16, FL_BF16};
    for (int o = 0; o < 3; o++) {
        void *dst = malloc((size_t)n * (size_t)fl_dtype_size(outs[o]));
        fl_err_clear();
        fl_status st = fl_ggml_dequant(t->type, t->data, n, dst, outs[o]);
        FUZZ_CHECK(st == FL_OK, "dequant of '%s' (%s, %" PRIu64 " elements): %s", t->name,
                   fl_ggml_type_name(t->type), n, fl_err_msg());
        free(dst);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    fl_gguf *g = NULL;
    fl_err_clear();
    fl_status st = fl_gguf_open(fuzz_file(data, size), &g);
    if (st != FL_OK) {
        fuzz_check_failure(st);
        FUZZ_CHECK(st != FL_E_VALUE, "FL_E_VALUE for file contents: %s", fl_err_msg());
        FUZZ_CHECK(g == NULL, "failure returned a file");
        return 0;
    }
    FUZZ_CHECK(g != NULL, "OK without a file");
    FUZZ_CHECK(g->data_offset <= g->size, "data offset past the end");
    FUZZ_CHECK(g->alignment && !(g->alignment & (g->alignment - 1)), "alignment %" PRIu64, g->alignment);

    for (uint64_t i = 0; i < g->n_kv; i++) {
        const fl_gguf_kv *kv = &g->kv[i];
        const fl_gguf_kv *f = fl_gguf_find_kv(g, kv->key);
        FUZZ_CHECK(f && strcmp(f->key, kv->key) == 0, "fl_gguf_find_kv('%s')", kv->key);
        FUZZ_CHECK(kv->type >= 0 && kv->type < GGUF_T_COUNT, "kv type %d", kv->type);
        if (kv->type == GGUF_T_STRING) check_in_map(g, kv->str, kv->str_len, "string value");
        if (kv->type == GGUF_T_ARRAY) check_array(g, kv);
    }
    /* an absent key is not found (a file may hold this very key: libFuzzer lifts strings from the harness) */
    int holds = 0;
    for (uint64_t i = 0; i < g->n_kv; i++) holds |= strcmp(g->kv[i].key, "\x01never a key") == 0;
    FUZZ_CHECK(holds || fl_gguf_find_kv(g, "\x01never a key") == NULL, "found an absent key");

    /* keys the loader reads by name (fastload/arch.py gguf_config, gguf_tokenizer.py) */
    const fl_gguf_kv *a = fl_gguf_find_kv(g, "general.architecture");
    if (a && a->type == GGUF_T_STRING && a->str_len < 64) {
        static const char *const suffix[] = {".block_count", ".context_length", ".embedding_length",
                                             ".feed_forward_length", ".attention.head_count",
                                             ".attention.head_count_kv", ".rope.freq_base",
                                             ".attention.layer_norm_rms_epsilon", ".vocab_size"};
        char key[128];
        for (size_t k = 0; k < sizeof suffix / sizeof *suffix; k++) {
            snprintf(key, sizeof key, "%.*s%s", (int)a->str_len, a->str, suffix[k]);
            (void)fl_gguf_find_kv(g, key);
        }
    }
    static const char *const tok_keys[] = {"tokenizer.ggml.tokens", "tokenizer.ggml.scores",
                                           "tokenizer.ggml.token_type", "tokenizer.ggml.merges"};
    for (size_t k = 0; k < sizeof tok_keys / sizeof *tok_keys; k++) {
        const fl_gguf_kv *kv = fl_gguf_find_kv(g, tok_keys[k]);
        if (kv && kv->type == GGUF_T_ARRAY) check_array(g, kv);
    }

    for (uint64_t i = 0; i < g->n_tensors; i++) {
        const fl_gguf_tensor *t = &g->tensors[i];
        int64_t j = fl_gguf_find_tensor(g, t->name);
        FUZZ_CHECK(j >= 0 && strcmp(g->tensors[j].name, t->name) == 0, "fl_gguf_find_tensor('%s')", t->name);
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= 4, "ndim %d", t->ndim);
        for (int d = 0; d < 4; d++) FUZZ_CHECK(t->ne[d] >= 0, "negative ne");
        FUZZ_CHECK(t->data != NULL, "tensor '%s' without data", t->name);
        check_in_map(g, t->data, t->nbytes, "tensor data");
        FUZZ_CHECK((const uint8_t *)t->data >= g->map + g->data_offset, "tensor before the data section");
        dequant_rows(g, t);
    }
    FUZZ_CHECK(fl_gguf_find_tensor(g, "\x01never a tensor") == -1, "found an absent tensor");
    fl_gguf_close(g);
    return 0;
}
