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
    uint64_t begin, end;      /* byte offsets within the data region */
    const void *data;         /* map + 8 + header_len + begin */
} fl_st_tensor;

typedef struct fl_st_file {
    char *path;
    uint8_t *map; size_t size;
    uint64_t header_len;
    const uint8_t *data; uint64_t data_len;
    int n;
    fl_st_tensor *t;          /* sorted by begin offset */
    char *metadata;           /* "__metadata__" as a JSON object text, or NULL */
} fl_st_file;

fl_status fl_st_open(const char *path, fl_st_file **out);   /* errors name the file */
/* Validate a header held in memory (file_size = total file bytes). Used by fl_st_open and tests. */
fl_status fl_st_parse_header(const char *json, uint64_t len, uint64_t data_len, fl_st_file *f);
void fl_st_close(fl_st_file *f);
int fl_st_find(const fl_st_file *f, const char *name);     /* index or -1 */

#ifdef __cplusplus
}
#endif
#endif
