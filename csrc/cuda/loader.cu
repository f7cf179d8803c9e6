// loader.cu: the CUDA loading pipeline (see loader.cuh for the design and the environment).
//
// Plan (calling thread, before any thread or buffer exists):
//   jobs sorted by (file, offset) -> per file, spans of tensor bytes (gaps under 1 MiB merged) ->
//   chunks: boundaries at multiples of the chunk size in file coordinates, so O_DIRECT reads of
//   neighbouring chunks overlap in at most one page, at span ends only.
// A chunk's payload is [off, end); it is read as [off & ~4095, read_end), where read_end passes
// `end` only so far that an element of a converted tensor that starts in the chunk is whole in the
// buffer: element-wise conversion takes the elements that START in the chunk.
// Reader threads (one stream, two pinned buffers each):
//   wait for the buffer's event -> take the next chunk (atomic) -> pread it -> cudaMemcpyAsync
//   the kept-dtype pieces to dst_d, the converted ones to a staging slot + kernel -> event.
#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1  // preadv2, RWF_NOWAIT, O_DIRECT
#endif
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <new>

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "loader.cuh"

// The device-memory counters of fastload.cuda (cuda_memory.cu) when linked in (the package), so the
// staging ring shows in max_memory_allocated(); absent in the standalone probe (weak: NULL).
extern "C" __attribute__((weak)) void fl_cuda_account(int device, long long delta);

namespace {

constexpr uint64_t kPage = 4096;          // O_DIRECT alignment of offsets, sizes and buffers
constexpr uint64_t kSpanGap = 1u << 20;   // read through gaps between tensors up to this size
constexpr int kBufsPerThread = 2;         // double buffering: read chunk k+1 while k is copied
constexpr int kStageSlots = 8;            // device staging ring for converted tensors: at most 8 slots
constexpr uint64_t kStageBytes = 128u << 20;  // and at most this much device memory
constexpr int kMaxThreads = 64;

// ---- errors ---------------------------------------------------------------------------------
// One checking macro for CUDA calls in this file: statement, line and device in the message.
fl_status cuda_fail(cudaError_t e, const char *stmt, int line, int dev) {
    return fl_err(FL_E_DEVICE, "%s failed (loader.cu:%d, cuda:%d): %s (%s)", stmt, line, dev,
                  cudaGetErrorString(e), cudaGetErrorName(e));
}
#define LD_CUDA(dev, call)                                                                  \
    do {                                                                                    \
        cudaError_t ld_e_ = (call);                                                         \
        if (ld_e_ != cudaSuccess) return cuda_fail(ld_e_, #call, __LINE__, (dev));          \
    } while (0)

// ---- conversion kernels: bit-exact with fl_common.h's host conversions ------------------------
// (A shared fl_cuda_convert in convert.cuh can replace this once it exists; this one also takes
// sources that are not aligned to their element size, which safetensors allows.)
__device__ __forceinline__ uint32_t f16_to_f32bits(uint32_t h) {
    uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        if (man == 0) return sign;
        exp = 127 - 15 + 1;
        while (!(man & 0x400u)) { man <<= 1; exp--; }
        return sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
    if (exp == 31) return sign | 0x7f800000u | (man << 13);
    return sign | ((exp + 127 - 15) << 23) | (man << 13);
}
__device__ __forceinline__ uint32_t f32bits_to_bf16(uint32_t u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u >> 16) | 0x40u;
    u += 0x7fffu + ((u >> 16) & 1u);
    return u >> 16;
}
__device__ __forceinline__ uint32_t f32bits_to_f16(uint32_t u) {
    uint32_t sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a >= 0x7f800000u) return sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u);
    if (a >= 0x477ff000u) return sign | 0x7c00u;
    if (a < 0x38800000u) {
        if (a < 0x33000000u) return sign;
        uint32_t e = a >> 23, m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
        uint32_t r = m >> shift, rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1))) r++;
        return sign | r;
    }
    return sign | ((a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13);
}

template <int T> struct dt_size;
template <> struct dt_size<FL_F32> { static constexpr int v = 4; };
template <> struct dt_size<FL_F16> { static constexpr int v = 2; };
template <> struct dt_size<FL_BF16> { static constexpr int v = 2; };
template <> struct dt_size<FL_F64> { static constexpr int v = 8; };

template <int ES, bool AL> __device__ __forceinline__ uint64_t load_raw(const uint8_t *p) {
    if constexpr (AL) {
        if constexpr (ES == 2) return *(const uint16_t *)p;
        else if constexpr (ES == 4) return *(const uint32_t *)p;
        else return *(const uint64_t *)p;
    } else {
        uint64_t v = 0;
#pragma unroll
        for (int k = 0; k < ES; k++) v |= (uint64_t)p[k] << (8 * k);  // little-endian, as the file
        return v;
    }
}
template <int ES, bool AL> __device__ __forceinline__ void store_raw(uint8_t *p, uint64_t v) {
    if constexpr (AL) {
        if constexpr (ES == 2) *(uint16_t *)p = (uint16_t)v;
        else *(uint32_t *)p = (uint32_t)v;
    } else {
#pragma unroll
        for (int k = 0; k < ES; k++) p[k] = (uint8_t)(v >> (8 * k));
    }
}
template <int ST> __device__ __forceinline__ uint32_t to_f32bits(uint64_t raw) {
    if constexpr (ST == FL_F32) return (uint32_t)raw;
    else if constexpr (ST == FL_F16) return f16_to_f32bits((uint32_t)raw);
    else if constexpr (ST == FL_BF16) return (uint32_t)raw << 16;
    else {  // F64: round to nearest, no flush to zero even under --use_fast_math (as the host)
        float f;
        asm("cvt.rn.f32.f64 %0, %1;" : "=f"(f) : "d"(__longlong_as_double((long long)raw)));
        return __float_as_uint(f);
    }
}
template <int DT> __device__ __forceinline__ uint32_t from_f32bits(uint32_t u) {
    if constexpr (DT == FL_F32) return u;
    else if constexpr (DT == FL_F16) return f32bits_to_f16(u);
    else return f32bits_to_bf16(u);
}

// dst[i] = convert(src[i]) for i < n; grid-stride, one element per thread per step.
template <int ST, int DT, bool AL>
__global__ void convert_kernel(uint8_t *__restrict__ dst, const uint8_t *__restrict__ src, size_t n) {
    constexpr int SS = dt_size<ST>::v, DS = dt_size<DT>::v;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        store_raw<DS, AL>(dst + i * DS, from_f32bits<DT>(to_f32bits<ST>(load_raw<SS, AL>(src + i * SS))));
}

bool convertible(fl_dtype st, fl_dtype dt) {
    return (st == FL_F32 || st == FL_F16 || st == FL_BF16 || st == FL_F64) &&
           (dt == FL_F32 || dt == FL_F16 || dt == FL_BF16);
}

// The one dtype dispatch of this file (STYLE.md habit 4).
template <int ST, int DT>
void launch_convert_t(cudaStream_t s, void *dst, const void *src, size_t n) {
    const bool al = (uintptr_t)dst % dt_size<DT>::v == 0 && (uintptr_t)src % dt_size<ST>::v == 0;
    const unsigned block = 256, grid = (unsigned)std::min<size_t>((n + block - 1) / block, 2048);
    if (al) convert_kernel<ST, DT, true><<<grid, block, 0, s>>>((uint8_t *)dst, (const uint8_t *)src, n);
    else convert_kernel<ST, DT, false><<<grid, block, 0, s>>>((uint8_t *)dst, (const uint8_t *)src, n);
}
fl_status launch_convert(cudaStream_t s, void *dst, fl_dtype dt, const void *src, fl_dtype st, size_t n, int dev) {
    if (n == 0) return FL_OK;
#define LD_DST(S)                                                                              \
    switch (dt) {                                                                              \
    case FL_F32: launch_convert_t<S, FL_F32>(s, dst, src, n); break;                           \
    case FL_F16: launch_convert_t<S, FL_F16>(s, dst, src, n); break;                           \
    case FL_BF16: launch_convert_t<S, FL_BF16>(s, dst, src, n); break;                         \
    default: return fl_err(FL_E_INTERNAL, "loader: no conversion to dtype %d", (int)dt);       \
    }
    switch (st) {
    case FL_F32: LD_DST(FL_F32) break;
    case FL_F16: LD_DST(FL_F16) break;
    case FL_BF16: LD_DST(FL_BF16) break;
    case FL_F64: LD_DST(FL_F64) break;
    default: return fl_err(FL_E_INTERNAL, "loader: no conversion from dtype %d", (int)st);
    }
#undef LD_DST
    LD_CUDA(dev, cudaGetLastError());
    return FL_OK;
}

// ---- pinned buffers -------------------------------------------------------------------------
// Pinning is slow next to a warm read (on an H200 host cudaHostAlloc pinned ~3.5 GB/s, serialised
// across threads: 38 ms for 32 x 4 MiB; huge-page anonymous memory registered by each reader thread
// took 14 ms), so the readers' buffers are small (threads x 2 x chunk), pinned by registering
// huge-page memory (cudaHostAlloc where registering fails, or FASTLOAD_LOAD_PINNED=alloc), and by
// default kept for the next call in a process-wide cache (FASTLOAD_LOAD_KEEP_POOL=0: freed on
// return; fl_cuda_load_release_pool frees the cache).
struct pinned_buf {
    void *p = nullptr;
    size_t size = 0;     // bytes usable
    size_t map_len = 0;  // register mode: length of the mmap (0: cudaHostAlloc)
    void *map = nullptr;
};

void pinned_free(pinned_buf *b) {
    if (!b->p) return;
    if (b->map) { cudaHostUnregister(b->p); munmap(b->map, b->map_len); }
    else cudaFreeHost(b->p);
    *b = pinned_buf{};
}

// Huge-page anonymous memory, faulted in by this thread and registered. false: not possible here.
bool pinned_register(pinned_buf *b, size_t size) {
    const size_t huge = 2u << 20, len = (size + huge - 1) / huge * huge + huge;
    void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return false;
    uint8_t *p = (uint8_t *)(((uintptr_t)m + huge - 1) & ~(uintptr_t)(huge - 1));
#ifdef MADV_HUGEPAGE
    if (size >= huge) madvise(p, size / huge * huge, MADV_HUGEPAGE);  // the page-sized tail stays small
#endif
    for (size_t o = 0; o < size; o += kPage) p[o] = 0;  // fault the pages in here, in this thread
    cudaError_t e = cudaHostRegister(p, size, cudaHostRegisterPortable);
    if (e != cudaSuccess) {  // not supported here (some virtual machines, WSL)
        munmap(m, len);
        cudaGetLastError();
        return false;
    }
    *b = pinned_buf{p, size, len, m};
    return true;
}

fl_status pinned_alloc(pinned_buf *b, size_t size, bool reg, int dev) {
    if (reg && pinned_register(b, size)) return FL_OK;
    LD_CUDA(dev, cudaHostAlloc(&b->p, size, cudaHostAllocPortable));
    b->size = size;
    return FL_OK;
}

constexpr int kPoolSlots = kMaxThreads * kBufsPerThread;
struct pool_cache {
    pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
    bool busy = false;           // a load is using the cached buffers (a concurrent one makes its own)
    pinned_buf b[kPoolSlots];    // worker t, buffer k: slot t * kBufsPerThread + k
};
pool_cache g_pool;

// ---- plan -------------------------------------------------------------------------------------
struct ld_file {
    const char *path;
    int fd = -1, fd_direct = -1;        // buffered; O_DIRECT (-1: none or refused)
    uint64_t size = 0;
    uint8_t *map = nullptr;             // PROT_READ map for mincore (auto mode), or NULL
    bool mincore_ok = false;            // mincore sees the page cache (owner, root or writable)
    std::atomic<int> direct_broken{0};  // a direct read failed with EINVAL: buffered from now on
    int fd_probe = -1;                  // no mincore: RWF_NOWAIT probes, advised RANDOM
    std::atomic<int> nowait_broken{0};  // preadv2(RWF_NOWAIT) unsupported
};

struct ld_chunk {
    int file;
    int first;                  // first index into order[] whose job may overlap the chunk
    int gend;                   // end of this file's group in order[]
    uint64_t off, end, read_end;
};

struct ld_ctx;
struct ld_worker {
    ld_ctx *c = nullptr;
    pthread_t th;
    bool started = false;
    cudaStream_t stream = nullptr;
    pinned_buf *buf[kBufsPerThread] = {};   // into g_pool.b when this call owns the cache, else own[]
    pinned_buf own[kBufsPerThread];
    cudaEvent_t ev[kBufsPerThread] = {};
    bool ev_pending[kBufsPerThread] = {};
    unsigned char *mvec = nullptr;      // mincore vector, one byte a page of a chunk
    int chunk = -1;                     // index of the chunk being read and queued; -1 between chunks
};

struct ld_ctx {
    const fl_load_job *jobs = nullptr;
    int *order = nullptr;               // job indices sorted by (file, offset)
    uint64_t *pmax = nullptr;           // running max of job end within each file group, per order index
    ld_file *files = nullptr; int nfiles = 0;
    ld_chunk *chunks = nullptr; int nchunks = 0;
    uint64_t chunk = 0, buf_size = 0;
    int nthreads = 0, direct_mode = 2, dev = 0;
    bool pin_register = false;          // pinned buffers: mmap + cudaHostRegister, else cudaHostAlloc
    // staging ring (only when some job converts)
    uint8_t *stage_d = nullptr;
    int nstage = 0;
    cudaEvent_t stage_ev[kStageSlots] = {};
    pthread_mutex_t stage_mu[kStageSlots];
    std::atomic<unsigned> stage_next{0};
    // shared state
    std::atomic<int> next_chunk{0};
    std::atomic<int> stop{0};
    std::atomic<uint64_t> done{0}, direct_bytes{0};
    uint64_t total = 0;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int running = 0;
    fl_status err = FL_OK;
    int err_chunk = -1;                 // the chunk index record_error was given with err
    char errmsg[FL_ERR_MAX] = "";
};

// The failing chunk of lowest index names the error, whichever reader saw one first: chunks are taken
// in index order and a reader that took one reads and queues it to the end or to its failure, so
// every chunk before a failing one was tried and the message is the same on every run. A failure
// that is no chunk's (chunk -1: a reader's stream, buffer or event, a thread that did not start)
// comes before any chunk's; among those the first stays.
void record_error(ld_ctx *c, fl_status st, int chunk) {
    pthread_mutex_lock(&c->mu);
    if (c->err == FL_OK || chunk < c->err_chunk) {
        c->err = st;
        c->err_chunk = chunk;
        snprintf(c->errmsg, sizeof c->errmsg, "%s", fl_err_msg());
    }
    c->stop.store(1);
    pthread_mutex_unlock(&c->mu);
}

uint64_t env_size(const char *name, uint64_t dflt) {
    const char *s = getenv(name);
    if (!s || !*s) return dflt;
    char *e = nullptr;
    unsigned long long v = strtoull(s, &e, 10);
    if (e == s) return dflt;
    if (*e == 'k' || *e == 'K') v <<= 10;
    else if (*e == 'm' || *e == 'M') v <<= 20;
    else if (*e == 'g' || *e == 'G') v <<= 30;
    return v;
}

const char *job_name(const fl_load_job *j) { return j->src->name ? j->src->name : "?"; }

// Name the first tensor of a chunk in I/O messages.
const char *chunk_tensor(const ld_ctx *c, const ld_chunk *ch) {
    for (int i = ch->first; i < ch->gend; i++) {
        const fl_src_tensor *s = c->jobs[c->order[i]].src;
        if (s->file_offset + s->nbytes > ch->off) return s->name ? s->name : "?";
    }
    return "?";
}

// ---- reading ------------------------------------------------------------------------------------
fl_status pread_full(const ld_ctx *c, const ld_chunk *ch, int fd, uint8_t *dst, uint64_t len, uint64_t off) {
    const ld_file *f = &c->files[ch->file];
    uint64_t got = 0;
    while (got < len) {
        ssize_t r = pread(fd, dst + got, (size_t)(len - got), (off_t)(off + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            char eb[128];
            return fl_err(FL_E_IO, "%s: pread at offset %llu (tensor '%s'): %s", f->path,
                          (unsigned long long)(off + got), chunk_tensor(c, ch), strerror_r(errno, eb, sizeof eb));
        }
        if (r == 0)
            return fl_err(FL_E_IO, "%s: pread at offset %llu (tensor '%s'): unexpected end of file (%llu bytes; truncated?)",
                          f->path, (unsigned long long)(off + got), chunk_tensor(c, ch), (unsigned long long)f->size);
        got += (uint64_t)r;
    }
    return FL_OK;
}

// O_DIRECT read of [a0, hi) (a0 page-aligned) into dst (page-aligned), reading whole pages.
// Returns 1 in *refused when the file system refused the direct read (then nothing is read).
fl_status pread_direct(ld_ctx *c, const ld_chunk *ch, uint8_t *dst, uint64_t a0, uint64_t hi, bool *refused) {
    ld_file *f = &c->files[ch->file];
    const uint64_t need = hi - a0, want = (hi + kPage - 1) / kPage * kPage - a0;
    uint64_t got = 0;
    *refused = false;
    while (got < need) {
        ssize_t r = pread(f->fd_direct, dst + got, (size_t)(want - got), (off_t)(a0 + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            if (errno == EINVAL && got == 0) { f->direct_broken.store(1); *refused = true; return FL_OK; }
            char eb[128];
            return fl_err(FL_E_IO, "%s: pread (O_DIRECT) at offset %llu (tensor '%s'): %s", f->path,
                          (unsigned long long)(a0 + got), chunk_tensor(c, ch), strerror_r(errno, eb, sizeof eb));
        }
        if (r == 0)
            return fl_err(FL_E_IO, "%s: pread at offset %llu (tensor '%s'): unexpected end of file (%llu bytes; truncated?)",
                          f->path, (unsigned long long)(a0 + got), chunk_tensor(c, ch), (unsigned long long)f->size);
        got += (uint64_t)r;
        if (got < need && got % kPage)  // a short read off the page grid: finish it buffered
            return pread_full(c, ch, f->fd, dst + got, need - got, a0 + got);
    }
    c->direct_bytes.fetch_add(need);
    return FL_OK;
}

// Most pages of [a0, hi) in the page cache? (mincore on our own map; reads nothing)
bool resident(const ld_file *f, uint64_t a0, uint64_t hi, unsigned char *vec) {
    const uint64_t np = (hi - a0 + kPage - 1) / kPage;
    if (mincore(f->map + a0, (size_t)(hi - a0), vec) != 0) return true;  // cannot tell: buffered
    uint64_t in = 0;
    for (uint64_t i = 0; i < np; i++) in += vec[i] & 1;
    return 2 * in >= np;
}

// Read chunk `ch` ([off & ~4095, read_end)) into buf; buf[0] holds file offset (ch->off & ~4095).
fl_status read_chunk(ld_ctx *c, ld_worker *w, const ld_chunk *ch, uint8_t *buf) {
    ld_file *f = &c->files[ch->file];
    const uint64_t a0 = ch->off / kPage * kPage, hi = ch->read_end;
    const bool can_direct = f->fd_direct >= 0 && !f->direct_broken.load(std::memory_order_relaxed);
    bool refused = false;
    if (can_direct && c->direct_mode == 1) {
        FL_TRY(pread_direct(c, ch, buf, a0, hi, &refused));
        if (!refused) return FL_OK;
    } else if (can_direct && c->direct_mode == 2) {
        if (f->map) {
            if (!resident(f, a0, hi, w->mvec)) {
                FL_TRY(pread_direct(c, ch, buf, a0, hi, &refused));
                if (!refused) return FL_OK;
            }
        } else if (f->fd_probe >= 0 && !f->nowait_broken.load(std::memory_order_relaxed)) {
            // mincore cannot see the cache for this file (not its owner): read the chunk's first
            // page without waiting for the disk. A miss (EAGAIN) starts a read of that one page
            // only (the probe descriptor is advised RANDOM: no readahead window), and the chunk
            // goes O_DIRECT. (Reading the whole chunk with RWF_NOWAIT instead started readahead
            // of the chunk on every miss and halved the cold rate: 1.3 against 3.0 GB/s.)
            struct iovec iov = {buf, (size_t)kPage};
            ssize_t r;
            do r = preadv2(f->fd_probe, &iov, 1, (off_t)a0, RWF_NOWAIT); while (r < 0 && errno == EINTR);
            if (r < 0 && errno == EAGAIN) {
                FL_TRY(pread_direct(c, ch, buf, a0, hi, &refused));
                if (!refused) return FL_OK;
            } else if (r < 0) {
                f->nowait_broken.store(1);  // RWF_NOWAIT unsupported here: buffered from now on
            }
        }
    }
    return pread_full(c, ch, f->fd, buf, hi - a0, a0);
}

// ---- copies -------------------------------------------------------------------------------------
// Queue the chunk's copies (and conversions) on the worker's stream. buf[0] = file offset base.
fl_status issue_chunk(ld_ctx *c, ld_worker *w, const ld_chunk *ch, const uint8_t *buf) {
    const uint64_t base = ch->off / kPage * kPage;
    const int dev = c->dev;
    uint8_t *pd = nullptr; const uint8_t *ps = nullptr; uint64_t pl = 0;  // pending kept-dtype copy
    uint64_t conv_lo = UINT64_MAX, conv_hi = 0, payload = 0;
    for (int i = ch->first; i < ch->gend; i++) {
        const fl_load_job *j = &c->jobs[c->order[i]];
        const uint64_t o = j->src->file_offset, e = o + j->src->nbytes;
        if (o >= ch->end) break;
        if (e <= ch->off) continue;
        if ((fl_dtype)j->src->type == j->dst_dtype) {
            const uint64_t s = std::max(o, ch->off), t = std::min(e, ch->end);
            uint8_t *d = (uint8_t *)j->dst_d + (s - o);
            const uint8_t *src = buf + (s - base);
            if (pl && pd + pl == d && ps + pl == src) pl += t - s;  // contiguous in file and arena
            else {
                if (pl) LD_CUDA(dev, cudaMemcpyAsync(pd, ps, pl, cudaMemcpyHostToDevice, w->stream));
                pd = d; ps = src; pl = t - s;
            }
            payload += t - s;
        } else {
            const uint64_t es = (uint64_t)fl_dtype_size((fl_dtype)j->src->type);
            const uint64_t e0 = (std::max(o, ch->off) - o + es - 1) / es, e1 = (std::min(e, ch->end) - o + es - 1) / es;
            if (e1 > e0) {
                conv_lo = std::min(conv_lo, o + e0 * es);
                conv_hi = std::max(conv_hi, o + e1 * es);
                payload += (e1 - e0) * es;
            }
        }
    }
    if (pl) LD_CUDA(dev, cudaMemcpyAsync(pd, ps, pl, cudaMemcpyHostToDevice, w->stream));
    if (conv_hi > conv_lo) {
        // One copy of the converted range into a staging slot (16-byte aligned like the file, so
        // aligned tensors stay aligned), then one kernel per tensor piece. The slot's event, waited
        // on before and recorded after under the slot's mutex, orders its users across streams.
        const uint64_t lo16 = conv_lo & ~(uint64_t)15;
        const unsigned k = c->stage_next.fetch_add(1) % (unsigned)c->nstage;
        uint8_t *slot = c->stage_d + (size_t)k * c->buf_size;
        pthread_mutex_lock(&c->stage_mu[k]);
        fl_status st = FL_OK;
        cudaError_t e = cudaStreamWaitEvent(w->stream, c->stage_ev[k], 0);
        if (e == cudaSuccess) e = cudaMemcpyAsync(slot, buf + (lo16 - base), conv_hi - lo16, cudaMemcpyHostToDevice, w->stream);
        if (e != cudaSuccess) st = cuda_fail(e, "cudaMemcpyAsync(staging)", __LINE__, dev);
        for (int i = ch->first; i < ch->gend && st == FL_OK; i++) {
            const fl_load_job *j = &c->jobs[c->order[i]];
            const uint64_t o = j->src->file_offset, en = o + j->src->nbytes;
            if (o >= ch->end) break;
            if (en <= ch->off || (fl_dtype)j->src->type == j->dst_dtype) continue;
            const uint64_t es = (uint64_t)fl_dtype_size((fl_dtype)j->src->type);
            const uint64_t e0 = (std::max(o, ch->off) - o + es - 1) / es, e1 = (std::min(en, ch->end) - o + es - 1) / es;
            if (e1 <= e0) continue;
            st = launch_convert(w->stream, (uint8_t *)j->dst_d + e0 * (uint64_t)fl_dtype_size(j->dst_dtype), j->dst_dtype,
                                slot + (o + e0 * es - lo16), (fl_dtype)j->src->type, (size_t)(e1 - e0), dev);
        }
        if (st == FL_OK && (e = cudaEventRecord(c->stage_ev[k], w->stream)) != cudaSuccess)
            st = cuda_fail(e, "cudaEventRecord(staging)", __LINE__, dev);
        pthread_mutex_unlock(&c->stage_mu[k]);
        FL_TRY(st);
    }
    c->done.fetch_add(payload, std::memory_order_relaxed);
    return FL_OK;
}

// Wait for a buffer's copies without burning a core (cudaEventSynchronize may spin).
fl_status wait_event(cudaEvent_t ev, int dev) {
    for (int spins = 0;; spins++) {
        cudaError_t e = cudaEventQuery(ev);
        if (e == cudaSuccess) return FL_OK;
        if (e != cudaErrorNotReady) return cuda_fail(e, "cudaEventQuery(buffer)", __LINE__, dev);
        if (spins < 16) sched_yield();
        else { struct timespec ts = {0, 20000}; nanosleep(&ts, nullptr); }
    }
}

fl_status worker_run(ld_worker *w) {
    ld_ctx *c = w->c;
    const int dev = c->dev;
    LD_CUDA(dev, cudaSetDevice(dev));
    LD_CUDA(dev, cudaStreamCreateWithFlags(&w->stream, cudaStreamNonBlocking));
    if (c->direct_mode == 2) {
        w->mvec = (unsigned char *)malloc((size_t)(c->buf_size / kPage + 2));
        if (!w->mvec) return fl_err(FL_E_NOMEM, "loader: out of host memory");
    }
    for (int k = 0;; k++) {
        if (c->stop.load(std::memory_order_relaxed)) return FL_OK;
        const int b = k % kBufsPerThread;
        pinned_buf *pb = w->buf[b];
        if (pb->size != c->buf_size) {  // made here, in parallel, when each thread first needs one
            pinned_free(pb);
            FL_TRY(pinned_alloc(pb, (size_t)c->buf_size, c->pin_register, dev));
        }
        if (!w->ev[b]) LD_CUDA(dev, cudaEventCreateWithFlags(&w->ev[b], cudaEventDisableTiming));
        if (w->ev_pending[b]) FL_TRY(wait_event(w->ev[b], dev));
        w->ev_pending[b] = false;
        const int ci = c->next_chunk.fetch_add(1);
        if (ci >= c->nchunks) return FL_OK;
        const ld_chunk *ch = &c->chunks[ci];
        w->chunk = ci;  // a failure from here to the event is this chunk's
        FL_TRY(read_chunk(c, w, ch, (uint8_t *)pb->p));
        FL_TRY(issue_chunk(c, w, ch, (const uint8_t *)pb->p));
        LD_CUDA(dev, cudaEventRecord(w->ev[b], w->stream));
        w->chunk = -1;
        w->ev_pending[b] = true;
    }
}

void *worker_main(void *arg) {
    ld_worker *w = (ld_worker *)arg;
    fl_status st = worker_run(w);
    if (st != FL_OK) record_error(w->c, st, w->chunk);
    pthread_mutex_lock(&w->c->mu);
    w->c->running--;
    pthread_cond_signal(&w->c->cv);
    pthread_mutex_unlock(&w->c->mu);
    return nullptr;
}

// ---- setup and teardown -----------------------------------------------------------------------
fl_status check_jobs(const fl_load_job *jobs, int n) {
    for (int i = 0; i < n; i++) {
        const fl_load_job *j = &jobs[i];
        const fl_src_tensor *s = j->src;
        if (!s || !s->file || !j->dst_d)
            return fl_err(FL_E_INTERNAL, "loader: job %d has no source file or destination", i);
        if (s->kind != FL_SRC_PLAIN)
            return fl_err(FL_E_INTERNAL, "%s: tensor '%s': GGML blocks are dequantised on the host, not by the CUDA loader",
                          s->file, job_name(j));
        if (j->unpermute_heads > 0)
            return fl_err(FL_E_INTERNAL, "%s: tensor '%s': the CUDA loader does not un-permute heads", s->file, job_name(j));
        const fl_dtype st = (fl_dtype)s->type, dt = j->dst_dtype;
        const int ss = fl_dtype_size(st);
        if (ss == 0 || fl_dtype_size(dt) == 0 || (st != dt && !convertible(st, dt)))
            return fl_err(FL_E_UNSUPPORTED, "%s: tensor '%s': cannot load dtype %d as dtype %d on the device", s->file,
                          job_name(j), (int)st, (int)dt);
        uint64_t ne, nb;
        if (j->rows < 0 || j->cols < 0 || !fl_mul_u64((uint64_t)j->rows, (uint64_t)j->cols, &ne) ||
            !fl_mul_u64(ne, (uint64_t)ss, &nb) || nb != s->nbytes)
            return fl_err(FL_E_INTERNAL, "%s: tensor '%s': %llu bytes for %lld x %lld elements of %d bytes", s->file,
                          job_name(j), (unsigned long long)s->nbytes, (long long)j->rows, (long long)j->cols, ss);
        uint64_t end;
        if (!fl_add_u64(s->file_offset, s->nbytes, &end))
            return fl_err(FL_E_INTERNAL, "%s: tensor '%s': offset overflows", s->file, job_name(j));
    }
    return FL_OK;
}

fl_status open_file(ld_file *f, int direct_mode) {
    char eb[128];
    // special files are refused before a blocking open (fl_open_regular), here as in fl_st_open
    FL_TRY(fl_open_regular(f->path, 0, &f->fd, nullptr));
    struct stat sb;
    if (fstat(f->fd, &sb) != 0) return fl_err(FL_E_IO, "%s: fstat: %s", f->path, strerror_r(errno, eb, sizeof eb));
    f->size = (uint64_t)sb.st_size;
    if (direct_mode != 0) {
        posix_fadvise(f->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
        // -1 (tmpfs, ...): buffered; also when the path no longer names the same regular file
        struct stat sd;
        if (fl_open_regular(f->path, O_DIRECT, &f->fd_direct, nullptr) != FL_OK) f->fd_direct = -1;
        else if (fstat(f->fd_direct, &sd) != 0 || sd.st_dev != sb.st_dev || sd.st_ino != sb.st_ino) {
            close(f->fd_direct);
            f->fd_direct = -1;
        }
    } else {
        posix_fadvise(f->fd, 0, 0, POSIX_FADV_SEQUENTIAL);
    }
    if (direct_mode == 2 && f->fd_direct >= 0 && f->size > 0) {
        // mincore reports page-cache residency only to the owner, root, or a writer (Linux >= 5.0;
        // to others it says every page is resident); for other files a RWF_NOWAIT probe decides.
        f->mincore_ok = geteuid() == 0 || sb.st_uid == geteuid() || faccessat(AT_FDCWD, f->path, W_OK, AT_EACCESS) == 0;
        if (f->mincore_ok) {
            void *m = mmap(nullptr, (size_t)f->size, PROT_READ, MAP_SHARED, f->fd, 0);
            if (m != MAP_FAILED) f->map = (uint8_t *)m;
        }
        if (!f->map && fl_open_regular(f->path, 0, &f->fd_probe, nullptr) == FL_OK)
            posix_fadvise(f->fd_probe, 0, 0, POSIX_FADV_RANDOM);
        else if (!f->map)
            f->fd_probe = -1;
    }
    return FL_OK;
}

void free_plan(ld_ctx *c) {
    for (int i = 0; i < c->nfiles; i++) {
        ld_file *f = &c->files[i];
        if (f->map) munmap(f->map, (size_t)f->size);
        if (f->fd >= 0) close(f->fd);
        if (f->fd_direct >= 0) close(f->fd_direct);
        if (f->fd_probe >= 0) close(f->fd_probe);
    }
    delete[] c->files;
    free(c->order);
    free(c->pmax);
    free(c->chunks);
}

// Where a chunk ending at `end` must read to: past `end` only when an element of a converted tensor
// starts before `end` and finishes after it (a source that is off its element grid). Reading just
// [off, end) otherwise keeps O_DIRECT requests on the chunk grid (one extra page per request cost
// the cold path ~20% on a virtual disk).
uint64_t read_end(const ld_ctx *c, const fl_load_job *jobs, int first, int gend, uint64_t end) {
    uint64_t re = end;
    for (int i = first; i < gend; i++) {
        const fl_load_job *j = &jobs[c->order[i]];
        const uint64_t o = j->src->file_offset, e = o + j->src->nbytes;
        if (o >= end) break;
        if (e <= end || (fl_dtype)j->src->type == j->dst_dtype) continue;
        const uint64_t es = (uint64_t)fl_dtype_size((fl_dtype)j->src->type);
        re = std::max(re, o + (end - o + es - 1) / es * es);  // end of the element holding byte end-1
    }
    return re;
}

// Sort jobs, open files, cut chunks.
fl_status make_plan(ld_ctx *c, const fl_load_job *jobs, int n) {
    c->order = (int *)malloc(sizeof(int) * (size_t)n);
    c->pmax = (uint64_t *)malloc(sizeof(uint64_t) * (size_t)n);
    if (!c->order || !c->pmax) return fl_err(FL_E_NOMEM, "loader: out of host memory for the plan");
    for (int i = 0; i < n; i++) c->order[i] = i;
    std::sort(c->order, c->order + n, [jobs](int a, int b) {
        const fl_src_tensor *x = jobs[a].src, *y = jobs[b].src;
        int k = x->file == y->file ? 0 : strcmp(x->file, y->file);
        if (k) return k < 0;
        if (x->file_offset != y->file_offset) return x->file_offset < y->file_offset;
        return a < b;
    });
    int nf = 0;
    for (int i = 0; i < n; i++)
        if (i == 0 || strcmp(jobs[c->order[i]].src->file, jobs[c->order[i - 1]].src->file) != 0) nf++;
    c->files = new (std::nothrow) ld_file[nf > 0 ? nf : 1];
    if (!c->files) return fl_err(FL_E_NOMEM, "loader: out of host memory for the plan");
    // Two passes over the file groups: count chunks, then fill them.
    for (int pass = 0; pass < 2; pass++) {
        int fi = -1, nc = 0;
        for (int g0 = 0; g0 < n;) {
            int g1 = g0 + 1;
            const char *path = jobs[c->order[g0]].src->file;
            while (g1 < n && strcmp(jobs[c->order[g1]].src->file, path) == 0) g1++;
            fi++;
            if (pass == 0) {
                ld_file *f = &c->files[fi];
                f->path = path;
                c->nfiles = fi + 1;
                FL_TRY(open_file(f, c->direct_mode));
            }
            uint64_t run = 0;
            for (int i = g0; i < g1; i++) {
                const fl_load_job *j = &jobs[c->order[i]];
                const uint64_t e = j->src->file_offset + j->src->nbytes;
                if (pass == 0 && e > c->files[fi].size)
                    return fl_err(FL_E_IO, "%s: tensor '%s' ends at byte %llu but the file has %llu bytes (truncated?)",
                                  path, job_name(j), (unsigned long long)e, (unsigned long long)c->files[fi].size);
                run = std::max(run, e);
                c->pmax[i] = run;
            }
            // spans of tensor bytes
            int cursor = g0;
            for (int i = g0; i < g1;) {
                const fl_src_tensor *s = jobs[c->order[i]].src;
                if (s->nbytes == 0) { i++; continue; }
                uint64_t lo = s->file_offset, hi = lo + s->nbytes;
                for (i++; i < g1; i++) {
                    const fl_src_tensor *t = jobs[c->order[i]].src;
                    if (t->nbytes == 0) continue;
                    if (t->file_offset > hi + kSpanGap) break;
                    hi = std::max(hi, t->file_offset + t->nbytes);
                }
                for (uint64_t off = lo; off < hi;) {
                    const uint64_t end = std::min(hi, (off / c->chunk + 1) * c->chunk);
                    if (pass == 1) {
                        while (c->pmax[cursor] <= off) cursor++;  // pmax rises to hi > off: stops in the group
                        c->chunks[nc] = ld_chunk{fi, cursor, g1, off, end, read_end(c, jobs, cursor, g1, end)};
                    }
                    nc++;
                    off = end;
                }
            }
            g0 = g1;
        }
        if (pass == 0) {
            c->nchunks = nc;
            c->chunks = (ld_chunk *)malloc(sizeof(ld_chunk) * (size_t)(nc > 0 ? nc : 1));
            if (!c->chunks) return fl_err(FL_E_NOMEM, "loader: out of host memory for the plan");
        }
    }
    return FL_OK;
}

double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

}  // namespace

extern "C" fl_status fl_cuda_load(fl_backend *be, const fl_load_job *jobs, int n, fl_progress_fn cb, void *ud,
                                  fl_load_stats *stats) {
    (void)be;  // the backend's private state is not ours; the device is the current one
    if (n < 0 || (n > 0 && !jobs)) return fl_err(FL_E_INTERNAL, "loader: bad job list");
    FL_TRY(check_jobs(jobs, n));
    ld_ctx *c = new (std::nothrow) ld_ctx;
    if (!c) return fl_err(FL_E_NOMEM, "loader: out of host memory");
    c->jobs = jobs;
    pthread_mutex_init(&c->mu, nullptr);
    {
        pthread_condattr_t ca;
        pthread_condattr_init(&ca);
        pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
        pthread_cond_init(&c->cv, &ca);
        pthread_condattr_destroy(&ca);
    }
    for (int k = 0; k < kStageSlots; k++) pthread_mutex_init(&c->stage_mu[k], nullptr);

    // configuration
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    int threads = (int)std::min<long>(16, cores > 0 ? cores : 1);
    if (const char *s = getenv("FASTLOAD_LOAD_THREADS"); s && atoi(s) > 0) threads = std::min(atoi(s), kMaxThreads);
    uint64_t chunk = env_size("FASTLOAD_LOAD_CHUNK", 4u << 20);
    chunk = std::min<uint64_t>(std::max<uint64_t>(chunk, 64u << 10), 64u << 20);
    chunk = (chunk + kPage - 1) / kPage * kPage;
    c->chunk = chunk;
    // A read spans at most chunk + one page: [off & ~4095, read_end) rounded up to pages, where the
    // first chunk of a span starts after its grid point and read_end passes the chunk's end by less
    // than an element.
    c->buf_size = chunk + kPage;
    if (const char *s = getenv("FASTLOAD_LOAD_DIRECT"); s && *s) {
        if (!strcmp(s, "0") || !strcasecmp(s, "off") || !strcasecmp(s, "false")) c->direct_mode = 0;
        else if (!strcmp(s, "1") || !strcasecmp(s, "on") || !strcasecmp(s, "true")) c->direct_mode = 1;
    }

    bool keep_pool = true, own_pool = false;
    if (const char *s = getenv("FASTLOAD_LOAD_KEEP_POOL"); s && !strcmp(s, "0")) keep_pool = false;
    c->pin_register = true;
    if (const char *s = getenv("FASTLOAD_LOAD_PINNED"); s && !strcasecmp(s, "alloc")) c->pin_register = false;

    fl_status st = FL_OK;
    int interrupted = 0;
    ld_worker *ws = nullptr;
    bool convert = false;
    for (int i = 0; i < n; i++) {
        c->total += jobs[i].src->nbytes;
        if ((fl_dtype)jobs[i].src->type != jobs[i].dst_dtype) convert = true;
    }
    if (cudaError_t e = cudaGetDevice(&c->dev); e != cudaSuccess) {
        st = cuda_fail(e, "cudaGetDevice(&dev)", __LINE__, -1);
        goto done;
    }
    if (n > 0 && (st = make_plan(c, jobs, n)) != FL_OK) goto done;
    c->nthreads = std::max(1, std::min(threads, c->nchunks));
    if (stats) stats->threads = c->nthreads;
    if (c->nchunks == 0) goto done;

    if (convert) {
        c->nstage = (int)std::max<uint64_t>(2, std::min<uint64_t>(kStageSlots, kStageBytes / c->buf_size));
        cudaError_t e = cudaMalloc((void **)&c->stage_d, (size_t)c->buf_size * c->nstage);
        for (int k = 0; k < c->nstage && e == cudaSuccess; k++)
            e = cudaEventCreateWithFlags(&c->stage_ev[k], cudaEventDisableTiming);
        if (e != cudaSuccess) {
            st = cuda_fail(e, "cudaMalloc/cudaEventCreate(staging ring)", __LINE__, c->dev);
            goto done;
        }
        if (fl_cuda_account) fl_cuda_account(c->dev, (long long)(c->buf_size * c->nstage));
    }

    ws = new (std::nothrow) ld_worker[c->nthreads];
    if (!ws) { st = fl_err(FL_E_NOMEM, "loader: out of host memory"); goto done; }
    if (keep_pool) {
        pthread_mutex_lock(&g_pool.mu);
        if (!g_pool.busy) g_pool.busy = own_pool = true;
        pthread_mutex_unlock(&g_pool.mu);
    }
    for (int t = 0; t < c->nthreads; t++)
        for (int b = 0; b < kBufsPerThread; b++)
            ws[t].buf[b] = own_pool ? &g_pool.b[t * kBufsPerThread + b] : &ws[t].own[b];
    for (int t = 0; t < c->nthreads; t++) {
        ws[t].c = c;
        pthread_mutex_lock(&c->mu);
        c->running++;
        pthread_mutex_unlock(&c->mu);
        int rc = pthread_create(&ws[t].th, nullptr, worker_main, &ws[t]);
        if (rc != 0) {
            pthread_mutex_lock(&c->mu);
            c->running--;
            pthread_mutex_unlock(&c->mu);
            char eb[128];
            record_error(c, fl_err(FL_E_NOMEM, "loader: cannot start reader thread %d: %s", t, strerror_r(rc, eb, sizeof eb)), -1);
            break;
        }
        ws[t].started = true;
    }

    {   // progress: this thread only waits, reports, and relays a stop request
        double last = now_s();
        pthread_mutex_lock(&c->mu);
        while (c->running > 0) {
            struct timespec ts;
            clock_gettime(CLOCK_MONOTONIC, &ts);
            ts.tv_nsec += 50 * 1000 * 1000;
            if (ts.tv_nsec >= 1000000000L) { ts.tv_sec++; ts.tv_nsec -= 1000000000L; }
            pthread_cond_timedwait(&c->cv, &c->mu, &ts);
            if (cb && c->running > 0 && !c->stop.load() && now_s() - last >= 0.05) {
                pthread_mutex_unlock(&c->mu);
                if (cb(ud, std::min(c->done.load(), c->total), c->total)) {
                    interrupted = 1;
                    c->stop.store(1);
                }
                last = now_s();
                pthread_mutex_lock(&c->mu);
            }
        }
        pthread_mutex_unlock(&c->mu);
    }

done:
    if (ws) {
        for (int t = 0; t < c->nthreads; t++)
            if (ws[t].started) pthread_join(ws[t].th, nullptr);
        // Every queued copy must land before the buffers go, also after a failure.
        for (int t = 0; t < c->nthreads; t++) {
            ld_worker *w = &ws[t];
            if (w->stream) {
                cudaError_t e = cudaStreamSynchronize(w->stream);
                if (e != cudaSuccess && c->err == FL_OK) { c->err = cuda_fail(e, "cudaStreamSynchronize(reader stream)", __LINE__, c->dev); snprintf(c->errmsg, sizeof c->errmsg, "%s", fl_err_msg()); }
                cudaStreamDestroy(w->stream);
            }
            for (int b = 0; b < kBufsPerThread; b++) {
                if (w->ev[b]) cudaEventDestroy(w->ev[b]);
                if (!own_pool) pinned_free(w->buf[b]);  // (cached ones stay for the next call)
            }
            free(w->mvec);
        }
        delete[] ws;
    }
    if (own_pool) {
        pthread_mutex_lock(&g_pool.mu);
        g_pool.busy = false;
        pthread_mutex_unlock(&g_pool.mu);
    }
    for (int k = 0; k < kStageSlots; k++) {
        if (c->stage_ev[k]) cudaEventDestroy(c->stage_ev[k]);
        pthread_mutex_destroy(&c->stage_mu[k]);
    }
    if (c->stage_d) {
        cudaFree(c->stage_d);
        if (fl_cuda_account) fl_cuda_account(c->dev, -(long long)(c->buf_size * c->nstage));
    }
    free_plan(c);
    if (st == FL_OK && c->err != FL_OK) st = fl_err(c->err, "%s", c->errmsg);
    if (st == FL_OK && interrupted) st = fl_err(FL_E_INTERRUPTED, "loading interrupted");
    if (st == FL_OK && cb && c->total > 0 && cb(ud, c->total, c->total)) st = fl_err(FL_E_INTERRUPTED, "loading interrupted");
    if (stats) {
        if (st == FL_OK) stats->bytes_read += c->total;
        stats->direct_io = c->direct_bytes.load() > 0;
    }
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    delete c;
    return st;
}

extern "C" void fl_cuda_load_release_pool(void) {
    pthread_mutex_lock(&g_pool.mu);
    if (!g_pool.busy)
        for (int i = 0; i < kPoolSlots; i++) pinned_free(&g_pool.b[i]);
    pthread_mutex_unlock(&g_pool.mu);
}
