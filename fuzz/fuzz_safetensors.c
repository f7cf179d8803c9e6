/* fuzz_safetensors.c: libFuzzer harness for the safetensors header parser (csrc/safetensors.c).
 *
 * Input: 8 bytes little-endian data_len, then the header JSON (the bytes a file holds after its
 * 8-byte length field). Inputs shorter than 8 bytes use data_len = 0 and the whole input as JSON.
 *   1. fl_st_parse_header(json, len, data_len) in memory, for any data_len (even 2^64-1);
 *   2. on success, the parsed tables are checked (tiling, sizes, name index), and when data_len is
 *      small the same header is written as a real file [len][json][data_len zero bytes] and opened
 *      with fl_st_open (length field, stat, mmap), whose tensors must point inside the mapping;
 *   3. the raw input is also opened as a whole file with fl_st_open (length-field checks).
 * Every failure must carry a message and a status a bad file may produce. */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdint.h>

#include "fuzz_common.h"
#include "safetensors.h"

#define MAX_FILE_DATA (256u << 10)

static void check_parsed(const fl_st_file *f, uint64_t data_len) {
    uint64_t at = 0;
    FUZZ_CHECK(f->n >= 0 && f->n_meta >= 0, "negative counts");
    for (int i = 0; i < f->n; i++) {
        const fl_st_tensor *t = &f->t[i];
        FUZZ_CHECK(t->name != NULL, "tensor %d without a name", i);
        FUZZ_CHECK(t->dtype >= 0 && t->dtype < FL_DTYPE_PLAIN_COUNT, "tensor %d dtype %d", i, (int)t->dtype);
        FUZZ_CHECK(t->ndim >= 0 && t->ndim <= FL_ST_MAX_DIMS, "tensor %d ndim %d", i, t->ndim);
        FUZZ_CHECK(t->begin == at, "tensor %d begins at %" PRIu64 ", expected %" PRIu64, i, t->begin, at);
        FUZZ_CHECK(t->end >= t->begin && t->end <= data_len, "tensor %d [%" PRIu64 ", %" PRIu64 "]", i, t->begin, t->end);
        uint64_t nel = 1;
        int ovf = 0;
        for (int d = 0; d < t->ndim; d++) {
            FUZZ_CHECK(t->shape[d] >= 0, "tensor %d negative dim", i);
            if (!fl_mul_u64(nel, (uint64_t)t->shape[d], &nel)) ovf = 1;
        }
        uint64_t nb = 0;
        FUZZ_CHECK(!ovf && fl_mul_u64(nel, (uint64_t)fl_dtype_size(t->dtype), &nb) && nb == t->end - t->begin,
                   "tensor %d: shape and offsets disagree", i);
        FUZZ_CHECK(strcmp(t->name, "__metadata__") != 0, "a tensor named __metadata__");
        FUZZ_CHECK(fl_st_find(f, t->name) == i, "fl_st_find('%s') != %d", t->name, i);
        at = t->end;
    }
    FUZZ_CHECK(at == data_len, "tensors cover %" PRIu64 " of %" PRIu64 " bytes", at, data_len);
    FUZZ_CHECK(fl_st_find(f, "\x01never a tensor name") == -1, "found an absent name");
    for (int i = 0; i < f->n_meta; i++)
        FUZZ_CHECK(f->meta_keys[i] && f->meta_vals[i], "metadata %d is NULL", i);
    if (f->n_meta) FUZZ_CHECK(f->metadata != NULL, "metadata pairs without the text");
}

static void open_file(const char *path, const fl_st_file *want) {
    fl_st_file *f = NULL;
    fl_err_clear();
    fl_status st = fl_st_open(path, &f);
    if (st != FL_OK) {
        fuzz_check_failure(st);
        FUZZ_CHECK(f == NULL, "fl_st_open failed but returned a file");
        FUZZ_CHECK(want == NULL, "fl_st_parse_header accepted the header but fl_st_open failed: %s", fl_err_msg());
        return;
    }
    FUZZ_CHECK(f != NULL, "fl_st_open returned OK without a file");
    if (want) FUZZ_CHECK(f->n == want->n && f->n_meta == want->n_meta, "fl_st_open and fl_st_parse_header disagree");
    check_parsed(f, f->data_len);
    FUZZ_CHECK(f->data == f->map + 8 + f->header_len, "data pointer");
    volatile uint8_t sink = 0;
    for (int i = 0; i < f->n; i++) {
        const fl_st_tensor *t = &f->t[i];
        const uint8_t *p = t->data;
        FUZZ_CHECK(p >= f->data && p + (t->end - t->begin) <= f->map + f->size, "tensor %d outside the mapping", i);
        if (t->end > t->begin) sink ^= p[0] ^ p[t->end - t->begin - 1];
    }
    (void)sink;
    fl_st_close(f);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    uint64_t data_len = 0;
    const uint8_t *json = data;
    size_t len = size;
    if (size >= 8) {
        for (int k = 7; k >= 0; k--) data_len = data_len << 8 | data[k];
        json += 8;
        len -= 8;
    }
    /* 1. in memory: an exact-size heap copy, so that ASan sees any read past the header */
    char *copy = malloc(len ? len : 1);
    if (len) memcpy(copy, json, len);
    fl_st_file *f = calloc(1, sizeof *f);
    fl_err_clear();
    fl_status st = fl_st_parse_header(len ? copy : NULL, len, data_len, f);
    if (st != FL_OK) {
        fuzz_check_failure(st);
        FUZZ_CHECK(st != FL_E_VALUE, "FL_E_VALUE for header contents: %s", fl_err_msg());
        FUZZ_CHECK(f->n == 0 && f->t == NULL && f->n_meta == 0 && f->metadata == NULL && f->by_name == NULL,
                   "failure left tables behind");
    } else {
        check_parsed(f, data_len);
        /* 2. the same header as a real file */
        if (data_len <= MAX_FILE_DATA) {
            size_t fsize = 8 + len + (size_t)data_len;
            uint8_t *file = calloc(1, fsize);
            for (int k = 0; k < 8; k++) file[k] = (uint8_t)((uint64_t)len >> (8 * k));
            memcpy(file + 8, json, len);
            open_file(fuzz_file(file, fsize), f);
            free(file);
        }
    }
    fl_st_close(f);
    free(copy);
    /* 3. the raw input as a whole file */
    open_file(fuzz_file(data, size), NULL);
    return 0;
}
