/* fl_common.h: status codes, the error channel, dtypes and half-precision helpers.
 *
 * Every function of the core that can fail returns fl_status. On failure it has written a
 * message with fl_err() (thread-local, so reader threads and OpenMP workers can report), and
 * the binding turns (status, message) into a Python exception. Nothing in the core calls
 * exit(), abort() or assert(): a library never ends the process (STYLE.md, habit 2). */
#ifndef FL_COMMON_H
#define FL_COMMON_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    FL_OK = 0,
    FL_E_IO,        /* open/read/mmap failed: OSError */
    FL_E_FORMAT,    /* a file's contents are malformed: fastload.CheckpointError */
    FL_E_VALUE,     /* a bad argument or config: ValueError */
    FL_E_NOMEM,     /* allocation failed: MemoryError */
    FL_E_UNSUPPORTED, /* valid but not supported (dtype, architecture): NotImplementedError */
    FL_E_DEVICE,    /* CUDA / cuBLAS error: RuntimeError */
    FL_E_INTERNAL,  /* a bug in fastload: RuntimeError */
    FL_E_INTERRUPTED, /* a callback asked to stop (KeyboardInterrupt, streamer raised) */
    FL_E_BUSY,      /* a queue is full (the engine's waiting requests): fastload.EngineBusy */
} fl_status;

#define FL_ERR_MAX 1024
/* Record a printf-style message for the current thread and return `st`. */
fl_status fl_err(fl_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
/* Prefix the current message ("context: message"), e.g. with a file or tensor name. */
fl_status fl_err_prefix(fl_status st, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 2, 3)))
#endif
    ;
const char *fl_err_msg(void);
void fl_err_clear(void);

/* Cooperative cancellation of a long core call. The thread that runs the call may publish a flag
 * (thread-local; returns the previous one, NULL = none); long loops poll fl_cancel_requested()
 * on that thread and stop with FL_E_INTERRUPTED (fl_forward between layers). */
const int *fl_cancel_flag(const int *flag);
/* A second flag, polled beside the first (thread-local; returns the previous one): one request's own flag inside a
 * job that has its own (the engine's forward request, stopped by its caller's Ctrl-C or by the job's cancellation at
 * interpreter exit, whichever comes first). */
const int *fl_cancel_flag_extra(const int *flag);
int fl_cancel_requested(void);

/* Propagate a failing status unchanged. */
#define FL_TRY(expr) do { fl_status fl_try_st_ = (expr); if (fl_try_st_ != FL_OK) return fl_try_st_; } while (0)

/* Element types. The first block is the safetensors dtype table; quantised block formats
 * (the GGUF types and, later, AWQ/GPTQ packings) follow so that weight descriptors can name
 * them without a second enum. */
typedef enum {
    FL_F32 = 0, FL_F16, FL_BF16, FL_F64,
    FL_I8, FL_U8, FL_I16, FL_U16, FL_I32, FL_U32, FL_I64, FL_U64, FL_BOOL,
    FL_F8_E4M3, FL_F8_E5M2,
    FL_DTYPE_PLAIN_COUNT, /* plain (element-wise) types end here */
    FL_QUANT = 32,        /* a quantised weight (csrc/quant.h): fl_dtype_size() is 0, the layout is in fl_weight */
    FL_DTYPE_INVALID = -1,
} fl_dtype;

typedef struct {
    const char *st_name;   /* safetensors spelling ("F16") */
    const char *np_name;   /* numpy/torch-ish spelling ("float16") */
    int size;              /* bytes per element */
} fl_dtype_info;

extern const fl_dtype_info fl_dtype_table[FL_DTYPE_PLAIN_COUNT];
fl_dtype fl_dtype_from_st_name(const char *s, size_t len); /* FL_DTYPE_INVALID if unknown */
static inline int fl_dtype_size(fl_dtype t) { return (t >= 0 && t < FL_DTYPE_PLAIN_COUNT) ? fl_dtype_table[t].size : 0; }

/* ---- half-precision scalars (bit-exact, round-to-nearest-even) ---- */
static inline float fl_bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t fl_f32_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
static inline float fl_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, u;
    if (exp == 0) {
        if (man == 0) u = sign;
        else { /* subnormal: renormalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400u)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) u = sign | 0x7f800000u | (man << 13);
    else u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t fl_f32_to_f16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);          /* overflow -> inf */
    if (a < 0x38800000u) {                                              /* subnormal or zero */
        if (a < 0x33000000u) return (uint16_t)sign;
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = a + 0xc8000fffu + ((a >> 13) & 1u); /* rebias exponent, round to nearest even */
    return (uint16_t)(sign | (r >> 13));
}

/* Convert n elements between float types (f32/f16/bf16); other pairs: FL_E_UNSUPPORTED. */
fl_status fl_convert(void *dst, fl_dtype dt, const void *src, fl_dtype st, size_t n);

/* Checked arithmetic for sizes read from files. Return 0 on overflow. */
static inline int fl_mul_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (a && b > UINT64_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int fl_add_u64(uint64_t a, uint64_t b, uint64_t *out) {
    if (b > UINT64_MAX - a) return 0;
    *out = a + b;
    return 1;
}

/* size_t and int64 variants, and products of three (a shape's rows * cols * element size).
 * Every size, offset and count that comes from a file or a config goes through these. */
static inline int fl_mul_size(size_t a, size_t b, size_t *out) {
    if (a && b > SIZE_MAX / a) return 0;
    *out = a * b;
    return 1;
}
static inline int fl_add_size(size_t a, size_t b, size_t *out) {
    if (b > SIZE_MAX - a) return 0;
    *out = a + b;
    return 1;
}
static inline int fl_mul3_size(size_t a, size_t b, size_t c, size_t *out) {
    size_t t;
    return fl_mul_size(a, b, &t) && fl_mul_size(t, c, out);
}
/* Round x up to a multiple of the power of two `al`; 0 on overflow. */
static inline int fl_align_size(size_t x, size_t al, size_t *out) {
    size_t t;
    if (!fl_add_size(x, al - 1, &t)) return 0;
    *out = t & ~(al - 1);
    return 1;
}
/* Signed 64-bit; both operands may be negative. */
static inline int fl_mul_i64(int64_t a, int64_t b, int64_t *out) {
#if defined(__GNUC__) || defined(__clang__)
    return !__builtin_mul_overflow(a, b, out);
#else
    if (a == 0 || b == 0) { *out = 0; return 1; }
    if ((a == -1 && b == INT64_MIN) || (b == -1 && a == INT64_MIN)) return 0;
    if (a > 0 ? (b > 0 ? a > INT64_MAX / b : b < INT64_MIN / a)
              : (b > 0 ? a < INT64_MIN / b : a < INT64_MAX / b)) return 0;
    *out = a * b;
    return 1;
#endif
}
static inline int fl_add_i64(int64_t a, int64_t b, int64_t *out) {
    if ((b > 0 && a > INT64_MAX - b) || (b < 0 && a < INT64_MIN - b)) return 0;
    *out = a + b;
    return 1;
}

/* Open `path` read-only, refusing anything but a regular file before a blocking open can hang
 * on it: stat() first (FIFO, device, socket, directory: FL_E_IO "not a regular file (FIFO)"),
 * then open with O_NONBLOCK (a FIFO swapped in between cannot block) and fstat the descriptor,
 * which must still be a regular file, and the same one (st_dev, st_ino). `extra_flags` are
 * or-ed into O_RDONLY | O_CLOEXEC (e.g. O_DIRECT); O_NONBLOCK is cleared again after the
 * checks. On success *fd is the descriptor and *size (if not NULL) the file size. */
fl_status fl_open_regular(const char *path, int extra_flags, int *fd, uint64_t *size);

/* Paged KV-cache addressing (continuous batching, csrc/engine.c). Without a block table a cache is
 * rectangular: row b's slot j is slot b * max_len + j of each layer's [rows, n_kv_heads, head_dim]
 * array. With one, the array is a pool of pages of (1 << page_shift) slots and row b's slot j is
 * slot btab[b * btab_stride + (j >> page_shift)] * page + (j % page); a row then holds at most
 * btab_stride pages. starts (per row) replaces the one start shared by every row. All pointers are
 * backend memory; a CUDA graph replay reads their contents afresh. */
typedef struct {
    const int32_t *starts_d;  /* [B] cache slot of each row's first new token, or NULL: the step's start */
    const int32_t *btab_d;    /* [B, btab_stride] page ids, or NULL: rectangular */
    int btab_stride;          /* pages per row in btab_d */
    int page_shift;           /* log2 of the slots per page */
} fl_kv_paging;

/* Dynamic NTK rope (transformers' rope_type "dynamic", _compute_dynamic_ntk_parameters): a row whose rope length L
 * exceeds max_pos takes its frequencies from base theta * (factor * L / max_pos - (factor - 1))^(hd / (hd - 2)),
 * float32 as transformers computes it; at most max_pos, the model's own table. L is the number of tokens the row holds
 * once this forward is done: transformers' torch.max(position_ids) + 1, a prompt's whole length while it is read in
 * chunks. factor 0: off (every other rope type). len_d: [B] in backend memory, or NULL: each token's position + 1
 * (a decode step's length). */
typedef struct {
    float theta, factor;
    int max_pos;
    const int32_t *len_d;
} fl_rope_dyn;

/* Which part of each q / k head rotary embedding turns, and how (fl_model's config; NULL: the defaults).
 * dims: rotated dimensions per head (even, 2..head_dim; 0 = head_dim); the rest of the head passes through.
 * interleaved 0: rotate-half pairs (i, i + dims/2) (Llama / NeoX); 1: adjacent pairs (2i, 2i + 1) (ChatGLM).
 * round_cs: cos / sin rounded to the activation dtype before use (ChatGLM keeps its rope cache in the model
 * dtype); a no-op for float32 activations. inv_freq then holds dims/2 frequencies. */
typedef struct {
    int dims, interleaved, round_cs;
} fl_rope_style;
static inline int fl_rope_dims(const fl_rope_style *s, int head_dim) { return s && s->dims ? s->dims : head_dim; }

void *fl_malloc(size_t n);            /* 64-byte aligned; NULL on failure (caller reports) */
void fl_free(void *p);
/* Ask the kernel for 2 MiB pages (transparent huge pages) over the whole 2 MiB-aligned part of [p, p + n), before
 * anything touches it, when FASTLOAD_HUGEPAGES (default 1) is at least `level`; 1 if the advice was taken. Level 1:
 * the CPU backend's weight arena (decode streams every weight each token; with 4 KiB pages each 4 KiB costs a TLB
 * miss, two-level in a VM). Level 2: also the CPU KV pool (long contexts stream it too), which then grows in 2 MiB
 * steps a layer's K or V region instead of 4 KiB: up to 4 MiB x layers more resident memory. */
int fl_advise_huge(void *p, size_t n, int level);
/* memcpy by up to `threads` OpenMP threads (a team of its own, from any thread) in pieces of at least 1 MiB: a
 * destination touched for the first time (a fresh numpy array) takes its page faults on several cores at once. */
void fl_copy_parallel(void *dst, const void *src, size_t n, int threads);

#ifdef __cplusplus
}
#endif
#endif
