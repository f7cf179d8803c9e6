/* safetensors.h: the safetensors format. The header is parsed and validated (size cap, checked
 * arithmetic, dtype table, tensors tiling the data region without overlap or gap) before
 * anything else; the file is then mmapped read-only. */
#ifndef FL_SAFETENSORS_H
#define FL_SAFETENSORS_H
#include "fl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

#define FL_ST_MAX_HEADER (100u << 20) /* 100 MiB, as the reference implementation */
#define FL_ST_MAX_DIMS 8

typedef struct {
    char *name;
    fl_dtype dtype;
    int ndim;
    int64_t shape[FL_ST_MAX_DIMS];
    uint64_t begin, end;      /* byte offsets within the data region (the whole file for a table file) */
    const void *data;         /* map + data_off + begin */
} fl_st_tensor;

typedef struct fl_st_file {
    char *path;
    uint8_t *map; size_t size;
    uint64_t header_len;
    uint64_t data_off;        /* file offset of the data region: 8 + header_len; 0 for a table file */
    const uint8_t *data; uint64_t data_len;
    int n;
    fl_st_tensor *t;          /* sorted by begin offset */
    char *metadata;           /* "__metadata__" as a JSON object text, or NULL */
    int n_meta;               /* "__metadata__" decoded: n_meta (key, value) pairs in file order */
    char **meta_keys, **meta_vals;
    int32_t *by_name;         /* tensor indices sorted by name (strcmp), for fl_st_find */
} fl_st_file;

fl_status fl_st_open(const char *path, fl_st_file **out);   /* errors name the file */
/* Validate a header held in memory (the `len` bytes after the 8-byte length field; data_len =
 * bytes after the header). Fills f->n, t, metadata, meta_*, by_name (t[i].data stays NULL unless
 * f->data is set); on failure frees what it allocated and leaves those fields empty. Messages
 * name the tensor but not the file (fl_st_open prefixes the path). Used by fl_st_open and tests. */
fl_status fl_st_parse_header(const char *json, uint64_t len, uint64_t data_len, fl_st_file *f);
/* Free a file from fl_st_open, or a zeroed heap fl_st_file filled by fl_st_parse_header. NULL ok. */
void fl_st_close(fl_st_file *f);
int fl_st_find(const fl_st_file *f, const char *name);     /* index or -1 */
/* A file whose tensors are given by a table instead of a header (a torch zip checkpoint located by
 * fastload/torchbin.py): t[i].name (malloc'd), dtype, ndim, shape, begin/end as absolute byte offsets
 * in the file. Each entry is checked (known dtype, shape bytes == end - begin with checked arithmetic,
 * end within the file), names must be unique; entries may overlap and need not tile the file.
 * Takes ownership of `t` (an array of n from malloc) whether it succeeds or not. */
fl_status fl_st_open_table(const char *path, fl_st_tensor *t, int n, fl_st_file **out);

#ifdef __cplusplus
}
#endif
#endif
