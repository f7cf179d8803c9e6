/* fl_common.c: error channel, dtype table, conversions, aligned allocation. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strerror_r returning char * */
#endif
#include "fl_common.h"
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

static _Thread_local char err_buf[FL_ERR_MAX];

fl_status fl_err(fl_status st, const char *fmt, ...) {
    va_list ap; va_start(ap, fmt);
    vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    return st;
}

fl_status fl_err_prefix(fl_status st, const char *fmt, ...) {
    char old[FL_ERR_MAX];
    memcpy(old, err_buf, sizeof old);
    va_list ap; va_start(ap, fmt);
    int n = vsnprintf(err_buf, sizeof err_buf, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n + 2 < sizeof err_buf) {
        memcpy(err_buf + n, ": ", 2);
        size_t room = sizeof err_buf - (size_t)n - 2, len = strlen(old);
        if (len >= room) len = room - 1;
        memcpy(err_buf + n + 2, old, len);
        err_buf[n + 2 + len] = 0;
    }
    return st;
}

const char *fl_err_msg(void) { return err_buf; }
void fl_err_clear(void) { err_buf[0] = 0; }

static _Thread_local const int *cancel_flag, *cancel_extra;
const int *fl_cancel_flag(const int *flag) {
    const int *old = cancel_flag;
    cancel_flag = flag;
    return old;
}
const int *fl_cancel_flag_extra(const int *flag) {
    const int *old = cancel_extra;
    cancel_extra = flag;
    return old;
}
int fl_cancel_requested(void) {
    return (cancel_flag && __atomic_load_n(cancel_flag, __ATOMIC_RELAXED)) ||
           (cancel_extra && __atomic_load_n(cancel_extra, __ATOMIC_RELAXED));
}

const fl_dtype_info fl_dtype_table[FL_DTYPE_PLAIN_COUNT] = {
    [FL_F32] = {"F32", "float32", 4},   [FL_F16] = {"F16", "float16", 2},
    [FL_BF16] = {"BF16", "bfloat16", 2}, [FL_F64] = {"F64", "float64", 8},
    [FL_I8] = {"I8", "int8", 1},        [FL_U8] = {"U8", "uint8", 1},
    [FL_I16] = {"I16", "int16", 2},     [FL_U16] = {"U16", "uint16", 2},
    [FL_I32] = {"I32", "int32", 4},     [FL_U32] = {"U32", "uint32", 4},
    [FL_I64] = {"I64", "int64", 8},     [FL_U64] = {"U64", "uint64", 8},
    [FL_BOOL] = {"BOOL", "bool", 1},
    [FL_F8_E4M3] = {"F8_E4M3", "float8_e4m3fn", 1}, [FL_F8_E5M2] = {"F8_E5M2", "float8_e5m2", 1},
};

fl_dtype fl_dtype_from_st_name(const char *s, size_t len) {
    for (int i = 0; i < FL_DTYPE_PLAIN_COUNT; i++) {
        const char *n = fl_dtype_table[i].st_name;
        if (strlen(n) == len && memcmp(n, s, len) == 0) return (fl_dtype)i;
    }
    return FL_DTYPE_INVALID;
}

static inline float load_f(const void *p, fl_dtype t, size_t i) {
    switch (t) {
    case FL_F32: return ((const float *)p)[i];
    case FL_F16: return fl_f16_to_f32(((const uint16_t *)p)[i]);
    case FL_BF16: return fl_bf16_to_f32(((const uint16_t *)p)[i]);
    case FL_F64: return (float)((const double *)p)[i];
    default: return 0.f;
    }
}

fl_status fl_convert(void *dst, fl_dtype dt, const void *src, fl_dtype st, size_t n) {
    int ok_s = st == FL_F32 || st == FL_F16 || st == FL_BF16 || st == FL_F64;
    int ok_d = dt == FL_F32 || dt == FL_F16 || dt == FL_BF16;
    if (!ok_s || !ok_d)
        return fl_err(FL_E_UNSUPPORTED, "cannot convert %s to %s (floating-point tensors only)",
                      st >= 0 && st < FL_DTYPE_PLAIN_COUNT ? fl_dtype_table[st].st_name : "?",
                      dt >= 0 && dt < FL_DTYPE_PLAIN_COUNT ? fl_dtype_table[dt].st_name : "?");
    if (dt == st) { memcpy(dst, src, n * (size_t)fl_dtype_size(st)); return FL_OK; }
    switch (dt) {
    case FL_F32: { float *d = dst; for (size_t i = 0; i < n; i++) d[i] = load_f(src, st, i); break; }
    case FL_F16: { uint16_t *d = dst; for (size_t i = 0; i < n; i++) d[i] = fl_f32_to_f16(load_f(src, st, i)); break; }
    case FL_BF16: { uint16_t *d = dst; for (size_t i = 0; i < n; i++) d[i] = fl_f32_to_bf16(load_f(src, st, i)); break; }
    default: break;
    }
    return FL_OK;
}

void *fl_malloc(size_t n) {
    void *p = NULL;
    if (n == 0) n = 64;
    n = (n + 63) & ~(size_t)63;
    if (posix_memalign(&p, 64, n) != 0) return NULL;
    return p;
}
void fl_free(void *p) { free(p); }

/* 0 where the kernel's transparent huge pages are switched off ("[never]"), 1 otherwise (also where the setting
 * cannot be read: madvise then says whether the kernel has them at all) */
static int thp_enabled(void) {
    char buf[128] = {0};
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    if (!f) return 1;
    const size_t got = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[got] = 0;
    return strstr(buf, "[never]") == NULL;
}

int fl_advise_huge(void *p, size_t n, int level) {
    const uintptr_t huge = (uintptr_t)2 << 20;
    const char *e = getenv("FASTLOAD_HUGEPAGES");
    if ((e && *e ? atoi(e) : 1) < level || !thp_enabled()) return 0;
    const uintptr_t a = ((uintptr_t)p + huge - 1) & ~(huge - 1), b = ((uintptr_t)p + n) & ~(huge - 1);
    if (b <= a) return 0;
#ifdef MADV_HUGEPAGE
    return madvise((void *)a, b - a, MADV_HUGEPAGE) == 0;
#else
    return 0;
#endif
}

void fl_copy_parallel(void *dst, const void *src, size_t n, int threads) {
    const size_t piece = (size_t)1 << 20;
    const long long k = (long long)((n + piece - 1) / piece);
    if (threads > k) threads = (int)k;
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
#endif
    for (long long i = 0; i < k; i++) {
        const size_t off = (size_t)i * piece, len = n - off < piece ? n - off : piece;
        memcpy((char *)dst + off, (const char *)src + off, len);
    }
    (void)threads;
}

static const char *file_kind(mode_t m) {
    if (S_ISFIFO(m)) return "FIFO";
    if (S_ISCHR(m)) return "character device";
    if (S_ISBLK(m)) return "block device";
    if (S_ISSOCK(m)) return "socket";
    if (S_ISDIR(m)) return "directory";
    return "special file";
}

fl_status fl_open_regular(const char *path, int extra_flags, int *fd_out, uint64_t *size) {
    char eb[128];
    struct stat before, sb;
    *fd_out = -1;
    if (!path) return fl_err(FL_E_VALUE, "fl_open_regular: path is NULL");
    if (stat(path, &before) != 0)
        return fl_err(FL_E_IO, "%s: cannot open: %s", path, strerror_r(errno, eb, sizeof eb));
    if (!S_ISREG(before.st_mode))
        return fl_err(FL_E_IO, "%s: not a regular file (%s)", path, file_kind(before.st_mode));
    int fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | extra_flags);
    if (fd < 0) return fl_err(FL_E_IO, "%s: cannot open: %s", path, strerror_r(errno, eb, sizeof eb));
    if (fstat(fd, &sb) != 0) {
        fl_status st = fl_err(FL_E_IO, "%s: cannot stat: %s", path, strerror_r(errno, eb, sizeof eb));
        close(fd);
        return st;
    }
    if (!S_ISREG(sb.st_mode)) {
        close(fd);
        return fl_err(FL_E_IO, "%s: not a regular file (%s)", path, file_kind(sb.st_mode));
    }
    if (sb.st_dev != before.st_dev || sb.st_ino != before.st_ino) {
        close(fd);
        return fl_err(FL_E_IO, "%s: the file was replaced while it was being opened", path);
    }
    const int fl = fcntl(fd, F_GETFL);
    if (fl != -1) (void)fcntl(fd, F_SETFL, fl & ~O_NONBLOCK);
    *fd_out = fd;
    if (size) *size = (uint64_t)sb.st_size;
    return FL_OK;
}
