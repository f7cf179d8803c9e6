/* gguf.h: llama.cpp's GGUF format: header, metadata, tensor table, dequantisation.
 * The header and tensor table are validated against the file size before any tensor is used. */
#ifndef FL_GGUF_H
#define FL_GGUF_H
#include "fl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Limits checked before anything sized by these counts is allocated (issue 7; the Python
 * validation in fastload/ uses the same numbers). */
#define FL_GGUF_MAX_KV (1u << 20)        /* metadata entries */
#define FL_GGUF_MAX_TENSORS (1u << 20)   /* tensor infos */
#define FL_GGUF_MAX_ARRAY (1u << 24)     /* elements of one metadata array */
#define FL_GGUF_MAX_STR (1u << 24)       /* bytes of one metadata string */
#define FL_GGUF_MAX_KEY 65535u           /* bytes of a key or a tensor name */

/* GGUF metadata value types (gguf spec) */
enum {
    GGUF_T_UINT8 = 0, GGUF_T_INT8, GGUF_T_UINT16, GGUF_T_INT16, GGUF_T_UINT32, GGUF_T_INT32,
    GGUF_T_FLOAT32, GGUF_T_BOOL, GGUF_T_STRING, GGUF_T_ARRAY, GGUF_T_UINT64, GGUF_T_INT64,
    GGUF_T_FLOAT64, GGUF_T_COUNT
};

/* ggml tensor types (ggml.h numbering) */
enum {
    GGML_F32 = 0, GGML_F16 = 1, GGML_Q4_0 = 2, GGML_Q4_1 = 3, GGML_Q5_0 = 6, GGML_Q5_1 = 7,
    GGML_Q8_0 = 8, GGML_Q8_1 = 9, GGML_Q2_K = 10, GGML_Q3_K = 11, GGML_Q4_K = 12, GGML_Q5_K = 13,
    GGML_Q6_K = 14, GGML_Q8_K = 15, GGML_I8 = 24, GGML_I16 = 25, GGML_I32 = 26, GGML_I64 = 27,
    GGML_F64 = 28, GGML_BF16 = 30, GGML_TYPE_COUNT = 40
};

typedef struct {
    const char *key;
    int type;                 /* GGUF_T_* */
    int arr_type;             /* element type when type == GGUF_T_ARRAY (-1 otherwise) */
    uint64_t n;               /* array length (1 for scalars) */
    const uint8_t *raw;       /* points into the mapping at the value (after type fields): the scalar,
                                 the string's bytes, or an array's first element (after elem type + count) */
    /* decoded scalars for convenience: .u for unsigned ints and bool, .i for signed ints
       (sign-extended), .f for float32/float64 */
    union { uint64_t u; int64_t i; double f; } num;
    const char *str; uint64_t str_len; /* GGUF_T_STRING (not NUL-terminated in the file) */
    const uint64_t *str_offs; /* array of strings: offset of element i's length field from raw */
} fl_gguf_kv;

typedef struct {
    const char *name;         /* NUL-terminated copy */
    int type;                 /* GGML_* */
    int ndim;
    int64_t ne[4];            /* ggml order: ne[0] innermost */
    uint64_t offset;          /* relative to the data section */
    uint64_t nbytes;
    const void *data;         /* into the mapping */
} fl_gguf_tensor;

typedef struct fl_gguf {
    char *path;
    uint8_t *map; size_t size;
    uint32_t version;
    uint64_t n_kv, n_tensors;
    fl_gguf_kv *kv;
    fl_gguf_tensor *tensors;
    uint64_t alignment, data_offset;
    char *pool;               /* owned strings (names, keys) */
    uint64_t *str_offs;       /* backing store of every kv's str_offs */
    int64_t *tensor_by_name;  /* tensor indices sorted by name (binary search) */
    int64_t *kv_by_key;       /* kv indices sorted by key */
} fl_gguf;

fl_status fl_gguf_open(const char *path, fl_gguf **out);  /* errors name the file */
void fl_gguf_close(fl_gguf *g);
const fl_gguf_kv *fl_gguf_find_kv(const fl_gguf *g, const char *key);
int64_t fl_gguf_find_tensor(const fl_gguf *g, const char *name); /* -1 if absent */
/* Read element i of an array kv (numeric -> double, string -> pointer+len). */
fl_status fl_gguf_arr_str(const fl_gguf_kv *kv, uint64_t i, const char **s, uint64_t *len);
fl_status fl_gguf_arr_num(const fl_gguf_kv *kv, uint64_t i, double *v);

/* Block geometry: elements per block and bytes per block (0 if the type is unknown). */
int fl_ggml_block_elems(int type);
int fl_ggml_block_bytes(int type);
const char *fl_ggml_type_name(int type);
/* Bytes of n elements (n a multiple of the block size), 0 if not. */
uint64_t fl_ggml_nbytes(int type, uint64_t n);
/* Dequantise n elements (a multiple of the block size) into dst of dtype f32/f16/bf16. */
fl_status fl_ggml_dequant(int type, const void *src, uint64_t n, void *dst, fl_dtype dst_type);
/* 1 if fl_ggml_dequant handles the type (F32/F16/BF16/F64, Q4_0..Q8_0, Q2_K..Q8_K). */
int fl_ggml_can_dequant(int type);

#ifdef __cplusplus
}
#endif
#endif
