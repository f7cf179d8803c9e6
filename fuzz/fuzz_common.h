/* fuzz_common.h: helpers shared by the libFuzzer harnesses (not part of the library).
 *
 * The parsers take paths (fl_st_open, fl_gguf_open), so the input is written to one memfd per
 * process and opened as /proc/self/fd/N: no disk I/O, no temporary files left behind. */
#ifndef FL_FUZZ_COMMON_H
#define FL_FUZZ_COMMON_H
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "fl_common.h"

static int fuzz_memfd = -1;
static char fuzz_memfd_path[64];

/* Replace the memfd's contents with (a, na) followed by (b, nb); returns its path. */
static const char *fuzz_file2(const void *a, size_t na, const void *b, size_t nb) {
    if (fuzz_memfd < 0) {
        fuzz_memfd = memfd_create("fuzz-input", MFD_CLOEXEC);
        if (fuzz_memfd < 0) { perror("memfd_create"); abort(); }
        snprintf(fuzz_memfd_path, sizeof fuzz_memfd_path, "/proc/self/fd/%d", fuzz_memfd);
    }
    if (ftruncate(fuzz_memfd, 0) != 0) { perror("ftruncate"); abort(); }
    if (na && pwrite(fuzz_memfd, a, na, 0) != (ssize_t)na) { perror("pwrite"); abort(); }
    if (nb && pwrite(fuzz_memfd, b, nb, (off_t)na) != (ssize_t)nb) { perror("pwrite"); abort(); }
    return fuzz_memfd_path;
}
static const char *fuzz_file(const void *a, size_t na) { return fuzz_file2(a, na, NULL, 0); }

/* A harness invariant failed: print and abort, so that libFuzzer records a crash. */
#define FUZZ_CHECK(cond, ...) do { if (!(cond)) { \
    fprintf(stderr, "FUZZ_CHECK failed at %s:%d: %s\n  ", __FILE__, __LINE__, #cond); \
    fprintf(stderr, __VA_ARGS__); fputc('\n', stderr); abort(); } } while (0)

/* Every failure must come with a message (the binding raises it). */
static void fuzz_check_failure(fl_status st) {
    const char *m = fl_err_msg();
    FUZZ_CHECK(st > FL_OK && st <= FL_E_INTERRUPTED, "unknown status %d", (int)st);
    FUZZ_CHECK(m[0] != 0, "status %d without a message", (int)st);
    FUZZ_CHECK(strlen(m) < FL_ERR_MAX, "message not terminated");
    /* a parser never reports these for a bad file */
    FUZZ_CHECK(st != FL_E_INTERNAL && st != FL_E_DEVICE && st != FL_E_INTERRUPTED,
               "status %d for a file: %s", (int)st, m);
}
#endif
