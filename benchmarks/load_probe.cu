// load_probe.cu: the ceiling for checkpoint loading, fl_cuda_load against it, and a correctness check.
//
// Build (from the repository root; needs nvcc and a C compiler):
//   gcc -O2 -std=gnu11 -Icsrc -c csrc/fl_common.c -o /tmp/fl_common.o
//   gcc -O2 -std=gnu11 -Icsrc -c csrc/safetensors.c -o /tmp/safetensors.o
//   nvcc -O3 -std=c++17 -arch=sm_90 --use_fast_math -Icsrc benchmarks/load_probe.cu csrc/cuda/loader.cu
//        /tmp/fl_common.o /tmp/safetensors.o -o /tmp/load_probe
//
// Modes (DIR holds *.safetensors shards):
//   gen DIR GB SHARDS         write a Qwen2.5-7B-shaped bf16 checkpoint (as many decoder layers as
//                             fit in GB; 28 layers = 15.23 GB), random bits (never zeros)
//   rates DIR [-t T] [-c MiB] [--cold] [--no-warm] [--reg]
//                             raw ceilings: T threads pread every shard's data region into pinned
//                             buffers (warm), the same with the copies to the device overlapped,
//                             pinned H2D copy rate; --cold: the same with O_DIRECT after dropping
//                             the page cache (and a buffered cold read); --reg: cudaHostRegister of
//                             the mapped page cache, then copies (an experiment)
//   load DIR [--dtype keep|bf16|f16|f32] [--reps R] [--cold]
//                             fl_cuda_load of every tensor into one device arena, timed (wall clock
//                             around the whole call), GB/s of checkpoint bytes, sampled peak of
//                             extra device memory, host RSS
//   verify DIR [--dtype keep|bf16|f16|f32] [--errors]
//                             load, copy back, compare with the host conversion (fl_convert) bit for
//                             bit (NaN = NaN for f64 sources); --errors: interrupt, missing file,
//                             truncated file, GGML source, the lowest failing chunk naming the error,
//                             device memory released. PASS/FAIL lines.
//   alloc - [-t T] [-c MiB]   time the ways of pinning T x 2 buffers (cudaHostAlloc serial and
//                             per thread, mmap + cudaHostRegister with and without huge pages)
//   drop DIR                  drop the page cache for DIR's shards, report how and what is left
//   devices -                 exit 0 if a CUDA device is usable (3 otherwise), for the tests' skip
// The loader's own settings come from the environment (FASTLOAD_LOAD_THREADS / _CHUNK / _DIRECT).
// benchmarks/load_probe.sh runs the whole set (build, tests, data, ceilings, loads, cold loads).
//
// Measured (H200 machine, 16 cores, 15.23 GB in 4 shards, 339 tensors, 16 threads, 4 MiB chunks;
// every number from one run unless said):
//   pinned H2D 55.5 GB/s; warm pread into pinned 127.6 GB/s; warm read + copies overlapped 53.6
//   fl_cuda_load warm, bf16 kept: 0.302 s = 50.4 GB/s first call in the process (94% of the
//   ceiling), 0.286 s = 53.3 GB/s once the pinned pool is cached (99.5%); bf16 -> f16 on the device
//   0.311 / 0.297 s; cold (page cache dropped): raw O_DIRECT 2.76-2.87 GB/s, fl_cuda_load 2.97 GB/s
//   (another machine's disk: raw 4.56, loader 3.61 before O_DIRECT reads were kept on the chunk grid).
// Exit status: 0 when every check passed, 1 otherwise; numbers go to stdout as `key: value` lines.
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cuda/loader.cuh"
#include "safetensors.h"

#define CK(call)                                                                                         \
    do {                                                                                                 \
        cudaError_t e_ = (call);                                                                         \
        if (e_ != cudaSuccess) {                                                                         \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #call, cudaGetErrorString(e_));      \
            exit(2);  /* a benchmark program, not the library */                                         \
        }                                                                                                \
    } while (0)

static double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
}

static std::vector<std::string> shards(const char *dir) {
    std::vector<std::string> v;
    DIR *d = opendir(dir);
    if (!d) { perror(dir); exit(2); }
    while (struct dirent *e = readdir(d)) {
        std::string n = e->d_name;
        if (n.size() > 12 && n.substr(n.size() - 12) == ".safetensors") v.push_back(std::string(dir) + "/" + n);
    }
    closedir(d);
    std::sort(v.begin(), v.end());
    if (v.empty()) { fprintf(stderr, "%s: no .safetensors files\n", dir); exit(2); }
    return v;
}

// ---------------------------------------------------------------------------------------------------
// gen
static uint64_t splitmix(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int cmd_gen(const char *dir, double gb, int nshards) {
    const int64_t H = 3584, F = 18944, KV = 512, V = 152064;
    struct T { std::string name; std::vector<int64_t> shape; };
    std::vector<T> ts;
    const double per_layer = 2.0 * (2 * H * H + 2 * KV * H + 3 * H * F + 2 * H + H + 2 * KV), fixed = 2.0 * (2 * V * H + H);
    int L = (int)std::max(1.0, floor((gb * 1e9 - fixed) / per_layer + 0.5));
    ts.push_back({"model.embed_tokens.weight", {V, H}});
    for (int l = 0; l < L; l++) {
        std::string p = "model.layers." + std::to_string(l) + ".";
        ts.push_back({p + "input_layernorm.weight", {H}});
        ts.push_back({p + "self_attn.q_proj.weight", {H, H}});
        ts.push_back({p + "self_attn.q_proj.bias", {H}});
        ts.push_back({p + "self_attn.k_proj.weight", {KV, H}});
        ts.push_back({p + "self_attn.k_proj.bias", {KV}});
        ts.push_back({p + "self_attn.v_proj.weight", {KV, H}});
        ts.push_back({p + "self_attn.v_proj.bias", {KV}});
        ts.push_back({p + "self_attn.o_proj.weight", {H, H}});
        ts.push_back({p + "post_attention_layernorm.weight", {H}});
        ts.push_back({p + "mlp.gate_proj.weight", {F, H}});
        ts.push_back({p + "mlp.up_proj.weight", {F, H}});
        ts.push_back({p + "mlp.down_proj.weight", {H, F}});
    }
    ts.push_back({"model.norm.weight", {H}});
    ts.push_back({"lm_head.weight", {V, H}});
    uint64_t total = 0;
    for (auto &t : ts) { uint64_t n = 2; for (auto d : t.shape) n *= d; total += n; }
    mkdir(dir, 0755);
    const uint64_t per_shard = (total + nshards - 1) / nshards;
    size_t ti = 0;
    uint64_t written = 0;
    double t0 = now_s();
    for (int s = 0; s < nshards && ti < ts.size(); s++) {
        std::string hdr = "{\"__metadata__\":{\"format\":\"pt\"}";
        uint64_t off = 0;
        while (ti < ts.size() && (off < per_shard || s == nshards - 1)) {
            uint64_t n = 2; std::string shp;
            for (size_t k = 0; k < ts[ti].shape.size(); k++) { n *= ts[ti].shape[k]; shp += (k ? "," : "") + std::to_string(ts[ti].shape[k]); }
            hdr += ",\"" + ts[ti].name + "\":{\"dtype\":\"BF16\",\"shape\":[" + shp + "],\"data_offsets\":[" + std::to_string(off) + "," + std::to_string(off + n) + "]}";
            off += n;
            ti++;
        }
        hdr += "}";
        while (hdr.size() % 8) hdr += " ";
        char path[4096];
        snprintf(path, sizeof path, "%s/model-%05d-of-%05d.safetensors", dir, s + 1, nshards);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) { perror(path); return 2; }
        uint64_t hl = hdr.size();
        if (pwrite(fd, &hl, 8, 0) != 8 || pwrite(fd, hdr.data(), hl, 8) != (ssize_t)hl) { perror("write"); return 2; }
        const uint64_t base = 8 + hl, blk = 64ull << 20, nblk = (off + blk - 1) / blk;
        std::atomic<uint64_t> next{0};
        std::atomic<int> bad{0};
        std::vector<std::thread> th;
        for (int k = 0; k < 16; k++)
            th.emplace_back([&, s] {
                std::vector<uint64_t> b(blk / 8);
                for (uint64_t i; (i = next++) < nblk;) {
                    uint64_t seed = ((uint64_t)s << 40) ^ (i * 0x1234567ull) ^ 0xfeedull;
                    for (auto &x : b) x = splitmix(&seed);
                    uint64_t len = std::min(blk, off - i * blk);
                    if (pwrite(fd, b.data(), len, base + i * blk) != (ssize_t)len) bad = 1;
                }
            });
        for (auto &t : th) t.join();
        close(fd);
        if (bad) { fprintf(stderr, "%s: write failed\n", path); return 2; }
        written += base + off;
        printf("gen: %s %.3f GB\n", path, (base + off) / 1e9);
    }
    printf("gen_layers: %d\ngen_total_GB: %.3f\ngen_seconds: %.2f\n", L, written / 1e9, now_s() - t0);
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// page cache
// Fraction of the files' pages in the page cache; -1 where mincore cannot tell (not the owner:
// Linux >= 5.0 then reports every page resident).
static double resident_fraction(const std::vector<std::string> &files) {
    uint64_t in = 0, all = 0;
    for (auto &p : files) {
        int fd = open(p.c_str(), O_RDONLY);
        struct stat sb;
        fstat(fd, &sb);
        if (geteuid() != 0 && sb.st_uid != geteuid()) { close(fd); return -1; }
        void *m = mmap(nullptr, sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
        size_t np = (sb.st_size + 4095) / 4096;
        std::vector<unsigned char> v(np);
        if (m != MAP_FAILED && mincore(m, sb.st_size, v.data()) == 0)
            for (auto c : v) in += c & 1;
        all += np;
        if (m != MAP_FAILED) munmap(m, sb.st_size);
        close(fd);
    }
    return all ? (double)in / all : 0;
}

static const char *drop_cache(const std::vector<std::string> &files) {
    sync();
    const char *how = "fadvise";
    int fd = open("/proc/sys/vm/drop_caches", O_WRONLY);
    if (fd >= 0 && write(fd, "3\n", 2) == 2) how = "drop_caches";
    if (fd >= 0) close(fd);
    for (auto &p : files) {  // also (or instead): per file
        int f = open(p.c_str(), O_RDONLY);
        if (f >= 0) { fdatasync(f); posix_fadvise(f, 0, 0, POSIX_FADV_DONTNEED); close(f); }
    }
    return how;
}

static void warm_cache(const std::vector<std::string> &files) {
    std::vector<std::thread> th;
    for (auto &p : files)
        th.emplace_back([p] {
            int fd = open(p.c_str(), O_RDONLY);
            std::vector<char> b(8 << 20);
            while (read(fd, b.data(), b.size()) > 0) {}
            close(fd);
        });
    for (auto &t : th) t.join();
}

// ---------------------------------------------------------------------------------------------------
// raw rates: the same machinery as the loader without the model
struct RawChunk { int fd; uint64_t off, end, dst; };

struct Raw {
    std::vector<std::string> files;
    std::vector<int> fd, fdd;
    std::vector<RawChunk> chunks;
    uint64_t bytes = 0;
    int T;
    size_t chunk;
    std::vector<void *> bufs;  // T * 2
    std::vector<cudaStream_t> streams;
    std::vector<cudaEvent_t> evs;
    void *arena = nullptr;

    Raw(const std::vector<std::string> &f, int t, size_t c) : files(f), T(t), chunk(c) {
        for (auto &p : files) {
            fl_st_file *sf;
            if (fl_st_open(p.c_str(), &sf) != FL_OK) { fprintf(stderr, "%s\n", fl_err_msg()); exit(2); }
            uint64_t ds = 8 + sf->header_len, de = sf->size;
            fl_st_close(sf);
            fd.push_back(open(p.c_str(), O_RDONLY));
            fdd.push_back(open(p.c_str(), O_RDONLY | O_DIRECT));
            for (uint64_t o = ds; o < de;) {
                uint64_t e = std::min(de, (o / chunk + 1) * chunk);
                chunks.push_back({(int)fd.size() - 1, o, e, bytes + (o - ds)});
                o = e;
            }
            bytes += de - ds;
        }
        double t0 = now_s();
        bufs.resize(2 * T);
        for (auto &b : bufs) CK(cudaHostAlloc(&b, chunk + 3 * 4096, cudaHostAllocDefault));
        printf("pool_alloc_s[%d x %zu MiB]: %.4f\n", 2 * T, chunk >> 20, now_s() - t0);
        streams.resize(T);
        evs.resize(2 * T);
        for (auto &s : streams) CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
        for (auto &e : evs) CK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        CK(cudaMalloc(&arena, bytes));
    }
    ~Raw() {
        for (auto b : bufs) cudaFreeHost(b);
        for (auto s : streams) cudaStreamDestroy(s);
        for (auto e : evs) cudaEventDestroy(e);
        cudaFree(arena);
        for (int f : fd) close(f);
        for (int f : fdd) if (f >= 0) close(f);
    }
    // seconds for one pass
    double run(bool copy, bool direct) {
        std::atomic<size_t> next{0};
        std::atomic<int> bad{0};
        double t0 = now_s();
        std::vector<std::thread> th;
        for (int t = 0; t < T; t++)
            th.emplace_back([&, t] {
                bool pend[2] = {false, false};
                for (int k = 0;; k++) {
                    int b = k & 1;
                    if (pend[b]) CK(cudaEventSynchronize(evs[2 * t + b]));
                    pend[b] = false;
                    size_t i = next++;
                    if (i >= chunks.size()) break;
                    const RawChunk &c = chunks[i];
                    uint8_t *buf = (uint8_t *)bufs[2 * t + b];
                    uint64_t a0 = direct ? c.off / 4096 * 4096 : c.off;
                    uint64_t len = direct ? (c.end - a0 + 4095) / 4096 * 4096 : c.end - a0;
                    int f = direct ? fdd[c.fd] : fd[c.fd];
                    uint64_t got = 0;
                    while (got < c.end - a0) {
                        ssize_t r = pread(f, buf + got, len - got, a0 + got);
                        if (r <= 0) { bad = 1; break; }
                        got += r;
                    }
                    if (copy) {
                        CK(cudaMemcpyAsync((uint8_t *)arena + c.dst, buf + (c.off - a0), c.end - c.off, cudaMemcpyHostToDevice, streams[t]));
                        CK(cudaEventRecord(evs[2 * t + b], streams[t]));
                        pend[b] = true;
                    }
                }
                CK(cudaStreamSynchronize(streams[t]));
            });
        for (auto &x : th) x.join();
        double dt = now_s() - t0;
        if (bad) printf("raw: read error (%s)\n", direct ? "O_DIRECT" : "buffered");
        return dt;
    }
};

static double h2d_rate() {
    const size_t n = 256u << 20;
    void *h, *d;
    CK(cudaHostAlloc(&h, n, cudaHostAllocDefault));
    CK(cudaMalloc(&d, n));
    memset(h, 0x5a, n);
    cudaEvent_t a, b;
    CK(cudaEventCreate(&a)); CK(cudaEventCreate(&b));
    CK(cudaMemcpy(d, h, n, cudaMemcpyHostToDevice));
    CK(cudaEventRecord(a));
    for (int i = 0; i < 10; i++) CK(cudaMemcpyAsync(d, h, n, cudaMemcpyHostToDevice));
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    cudaFreeHost(h); cudaFree(d); cudaEventDestroy(a); cudaEventDestroy(b);
    return 10.0 * n / (ms * 1e-3) / 1e9;
}

// cudaHostRegister of the mapped page cache, then copies straight from it (no CPU copy).
static void reg_rate(const std::vector<std::string> &files, int T) {
    struct R { uint8_t *p; uint64_t len, dst; };
    std::vector<R> rs;
    std::vector<std::pair<void *, size_t>> maps;
    uint64_t bytes = 0;
    const uint64_t RC = 64ull << 20;
    for (auto &p : files) {
        int fd = open(p.c_str(), O_RDONLY);
        struct stat sb; fstat(fd, &sb);
        void *m = mmap(nullptr, sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
        close(fd);
        if (m == MAP_FAILED) { printf("reg: mmap failed\n"); return; }
        maps.push_back({m, (size_t)sb.st_size});
        for (uint64_t o = 0; o < (uint64_t)sb.st_size; o += RC) {
            rs.push_back({(uint8_t *)m + o, std::min<uint64_t>(RC, sb.st_size - o), bytes + o});
        }
        bytes += sb.st_size;
    }
    void *arena;
    CK(cudaMalloc(&arena, bytes));
    std::atomic<size_t> next{0};
    std::atomic<int> bad{0};
    double t0 = now_s();
    std::vector<std::thread> th;
    for (int t = 0; t < T; t++)
        th.emplace_back([&] {
            cudaStream_t s;
            CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
            for (size_t i; (i = next++) < rs.size();) {
                size_t len = (rs[i].len + 4095) / 4096 * 4096;  // the map is page-rounded
                cudaError_t e = cudaHostRegister(rs[i].p, len, cudaHostRegisterReadOnly);
                if (e != cudaSuccess) {
                    if (!bad.exchange(1)) printf("reg: cudaHostRegister: %s\n", cudaGetErrorString(e));
                    cudaGetLastError();
                    break;
                }
                CK(cudaMemcpyAsync((uint8_t *)arena + rs[i].dst, rs[i].p, rs[i].len, cudaMemcpyHostToDevice, s));
                CK(cudaStreamSynchronize(s));
                CK(cudaHostUnregister(rs[i].p));
            }
            cudaStreamDestroy(s);
        });
    for (auto &x : th) x.join();
    double dt = now_s() - t0;
    if (!bad) printf("warm_register_copy_GBps[T=%d]: %.2f\n", T, bytes / dt / 1e9);
    cudaFree(arena);
    for (auto &m : maps) munmap(m.first, m.second);
}

// Ways to pin T x 2 buffers of `chunk` bytes: what the loader pays before its first read.
static void cmd_alloc(int T, size_t chunk) {
    const int n = 2 * T;
    std::vector<void *> p(n);
    double t0 = now_s();
    for (auto &b : p) CK(cudaHostAlloc(&b, chunk, cudaHostAllocPortable));
    double t1 = now_s();
    for (auto b : p) CK(cudaFreeHost(b));
    double t2 = now_s();
    printf("pin_hostalloc_serial[%d x %zu MiB]: alloc %.4f s, free %.4f s\n", n, chunk >> 20, t1 - t0, t2 - t1);
    auto par = [&](bool reg, bool huge) {
        std::vector<void *> maps(n);
        double a = now_s();
        std::vector<std::thread> th;
        for (int t = 0; t < T; t++)
            th.emplace_back([&, t] {
                for (int k = 0; k < 2; k++) {
                    void *&b = p[2 * t + k];
                    if (!reg) { CK(cudaHostAlloc(&b, chunk, cudaHostAllocPortable)); continue; }
                    size_t len = chunk + (2u << 20);
                    void *m = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
                    maps[2 * t + k] = m;
                    uint8_t *q = (uint8_t *)(((uintptr_t)m + (2u << 20) - 1) & ~(uintptr_t)((2u << 20) - 1));
                    if (huge) madvise(q, chunk, MADV_HUGEPAGE);
                    for (size_t o = 0; o < chunk; o += 4096) q[o] = 0;
                    CK(cudaHostRegister(q, chunk, cudaHostRegisterPortable));
                    b = q;
                }
            });
        for (auto &x : th) x.join();
        double b = now_s();
        for (int i = 0; i < n; i++) {
            if (reg) { CK(cudaHostUnregister(p[i])); munmap(maps[i], chunk + (2u << 20)); }
            else CK(cudaFreeHost(p[i]));
        }
        double c = now_s();
        printf("pin_%s_parallel[%d x %zu MiB, %d threads]: alloc %.4f s, free %.4f s\n",
               reg ? (huge ? "register_thp" : "register_4k") : "hostalloc", n, chunk >> 20, T, b - a, c - b);
    };
    par(false, false);
    par(true, false);
    par(true, true);
    FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
    char line[128] = "?";
    if (f) { if (!fgets(line, sizeof line, f)) line[0] = 0; fclose(f); }
    printf("thp_enabled: %s", line);
}

static int cmd_rates(const char *dir, int T, size_t chunk, bool cold, bool reg, bool warm) {
    auto files = shards(dir);
    Raw r(files, T, chunk);
    printf("data_GB: %.3f\nfiles: %zu\nthreads: %d\nchunk_MiB: %zu\n", r.bytes / 1e9, files.size(), T, chunk >> 20);
    printf("h2d_pinned_GBps: %.2f\n", h2d_rate());
    if (warm) {
        warm_cache(files);
        printf("resident_before_warm: %.3f\n", resident_fraction(files));
        r.run(false, false);  // warm-up
        double best = 1e30;
        for (int i = 0; i < 3; i++) best = std::min(best, r.run(false, false));
        printf("warm_read_GBps[T=%d,c=%zuM]: %.2f\n", T, chunk >> 20, r.bytes / best / 1e9);
        best = 1e30;
        r.run(true, false);
        for (int i = 0; i < 3; i++) best = std::min(best, r.run(true, false));
        printf("warm_read_copy_GBps[T=%d,c=%zuM]: %.2f\n", T, chunk >> 20, r.bytes / best / 1e9);
    }
    if (reg) reg_rate(files, T);
    if (cold) {
        if (r.fdd[0] < 0) { printf("cold: O_DIRECT refused by the file system\n"); return 0; }
        const char *how = drop_cache(files);
        printf("drop_method: %s\nresident_after_drop: %.3f\n", how, resident_fraction(files));
        double t = r.run(false, true);
        printf("cold_direct_read_GBps[T=%d,c=%zuM]: %.2f\n", T, chunk >> 20, r.bytes / t / 1e9);
        drop_cache(files);
        t = r.run(true, true);
        printf("cold_direct_read_copy_GBps[T=%d,c=%zuM]: %.2f\n", T, chunk >> 20, r.bytes / t / 1e9);
        drop_cache(files);
        t = r.run(false, false);
        printf("cold_buffered_read_GBps[T=%d,c=%zuM]: %.2f\n", T, chunk >> 20, r.bytes / t / 1e9);
    }
    return 0;
}

// ---------------------------------------------------------------------------------------------------
// load / verify through fl_cuda_load
struct Ckpt {
    std::vector<fl_st_file *> sf;
    std::vector<fl_src_tensor> src;
    std::vector<fl_load_job> jobs;
    std::vector<uint64_t> dst_off;
    uint64_t src_bytes = 0, arena_bytes = 0;
    uint8_t *arena = nullptr;

    // dtype: FL_DTYPE_INVALID = keep each tensor's own
    Ckpt(const std::vector<std::string> &files, fl_dtype dtype) {
        for (auto &p : files) {
            fl_st_file *f;
            if (fl_st_open(p.c_str(), &f) != FL_OK) { fprintf(stderr, "%s\n", fl_err_msg()); exit(2); }
            sf.push_back(f);
            for (int i = 0; i < f->n; i++) {
                const fl_st_tensor *t = &f->t[i];
                if (t->dtype != FL_F32 && t->dtype != FL_F16 && t->dtype != FL_BF16 && t->dtype != FL_F64) continue;
                fl_src_tensor s = {};
                s.file = f->path; s.name = t->name; s.data = t->data;
                s.file_offset = 8 + f->header_len + t->begin; s.nbytes = t->end - t->begin;
                s.kind = FL_SRC_PLAIN; s.type = t->dtype; s.ndim = std::min(t->ndim, 4);
                for (int k = 0; k < s.ndim; k++) s.shape[k] = t->shape[k];
                src.push_back(s);
            }
        }
        jobs.resize(src.size());
        for (size_t i = 0; i < src.size(); i++) {
            const fl_src_tensor &s = src[i];
            fl_dtype dt = dtype == FL_DTYPE_INVALID ? (fl_dtype)s.type : dtype;
            int64_t ne = (int64_t)(s.nbytes / fl_dtype_size((fl_dtype)s.type));
            dst_off.push_back(arena_bytes);
            arena_bytes += ((uint64_t)ne * fl_dtype_size(dt) + 255) / 256 * 256;
            src_bytes += s.nbytes;
            jobs[i] = fl_load_job{&src[i], nullptr, dt, 1, ne, 0};
        }
        CK(cudaMalloc(&arena, arena_bytes ? arena_bytes : 256));
        for (size_t i = 0; i < jobs.size(); i++) jobs[i].dst_d = arena + dst_off[i];
    }
    ~Ckpt() {
        cudaFree(arena);
        for (auto f : sf) fl_st_close(f);
    }
};

// The loader reports its device allocations (the staging ring) through fl_cuda_account; the probe
// counts them itself. The release checks compare that count, not cudaMemGetInfo: the device is
// shared with other processes (the test suite runs in parallel), whose allocations move the
// device-wide figure.
static std::atomic<long long> g_accounted{0};
extern "C" void fl_cuda_account(int device, long long delta) { (void)device; g_accounted += delta; }

static size_t dev_used() {
    size_t fr, tot;
    CK(cudaMemGetInfo(&fr, &tot));
    return tot - fr;
}
static long rss_kb() {
    FILE *f = fopen("/proc/self/status", "r");
    char line[256];
    long v = -1;
    while (f && fgets(line, sizeof line, f))
        if (!strncmp(line, "VmRSS:", 6)) v = atol(line + 6);
    if (f) fclose(f);
    return v;
}

struct Prog { size_t base, peak; int calls; int stop_at; };
static int prog_cb(void *ud, uint64_t done, uint64_t total) {
    Prog *p = (Prog *)ud;
    p->calls++;
    p->peak = std::max(p->peak, dev_used());
    (void)done; (void)total;
    return p->stop_at > 0 && p->calls >= p->stop_at;
}

static fl_dtype parse_dtype(const char *s) {
    if (!strcmp(s, "keep")) return FL_DTYPE_INVALID;
    if (!strcmp(s, "bf16")) return FL_BF16;
    if (!strcmp(s, "f16")) return FL_F16;
    if (!strcmp(s, "f32")) return FL_F32;
    fprintf(stderr, "unknown dtype %s\n", s);
    exit(2);
}

static int cmd_load(const char *dir, const char *dts, int reps, bool cold) {
    auto files = shards(dir);
    Ckpt ck(files, parse_dtype(dts));
    printf("load_data_GB: %.3f\nload_tensors: %zu\nload_dtype: %s\n", ck.src_bytes / 1e9, ck.jobs.size(), dts);
    if (!cold) warm_cache(files);
    int rc = 0;
    for (int r = 0; r < reps; r++) {
        if (cold) {
            const char *how = drop_cache(files);
            printf("drop_method: %s resident: %.3f\n", how, resident_fraction(files));
        }
        CK(cudaDeviceSynchronize());
        Prog p = {dev_used(), 0, 0, 0};
        p.peak = p.base;
        fl_load_stats stats = {};
        double t0 = now_s();
        fl_status st = fl_cuda_load(nullptr, ck.jobs.data(), (int)ck.jobs.size(), prog_cb, &p, &stats);
        double dt = now_s() - t0;
        if (st != FL_OK) { printf("load: FAIL status %d: %s\n", st, fl_err_msg()); rc = 1; break; }
        printf("load_%s_GBps[%s]: %.2f (%.3f s, threads %d, direct_io %d, progress calls %d, extra device MiB peak %.1f, rss MiB %.0f)\n",
               cold ? "cold" : "warm", dts, ck.src_bytes / dt / 1e9, dt, stats.threads, stats.direct_io, p.calls,
               (double)(p.peak - p.base) / (1 << 20), rss_kb() / 1024.0);
    }
    return rc;
}

// host reference: fl_convert, compared bit for bit (NaN = NaN when the source is f64)
static bool compare(const Ckpt &ck, size_t i, std::vector<uint8_t> &got, std::vector<uint8_t> &ref) {
    const fl_load_job &j = ck.jobs[i];
    const size_t ne = (size_t)j.cols, ds = fl_dtype_size(j.dst_dtype), nb = ne * ds;
    got.resize(nb); ref.resize(nb);
    CK(cudaMemcpy(got.data(), j.dst_d, nb, cudaMemcpyDeviceToHost));
    if ((fl_dtype)j.src->type == j.dst_dtype) memcpy(ref.data(), j.src->data, nb);  // any dtype, kept
    else if (fl_convert(ref.data(), j.dst_dtype, j.src->data, (fl_dtype)j.src->type, ne) != FL_OK) {
        printf("verify: host conversion failed: %s\n", fl_err_msg());
        return false;
    }
    if (!memcmp(got.data(), ref.data(), nb)) return true;
    for (size_t k = 0; k < ne; k++) {
        if (!memcmp(&got[k * ds], &ref[k * ds], ds)) continue;
        if (j.src->type == FL_F64) {
            float a, b;
            if (ds == 4) { memcpy(&a, &got[k * 4], 4); memcpy(&b, &ref[k * 4], 4); }
            else {
                uint16_t x, y; memcpy(&x, &got[k * 2], 2); memcpy(&y, &ref[k * 2], 2);
                a = j.dst_dtype == FL_F16 ? fl_f16_to_f32(x) : fl_bf16_to_f32(x);
                b = j.dst_dtype == FL_F16 ? fl_f16_to_f32(y) : fl_bf16_to_f32(y);
            }
            if (isnan(a) && isnan(b)) continue;
        }
        unsigned long long gv = 0, rv = 0;
        memcpy(&gv, &got[k * ds], ds); memcpy(&rv, &ref[k * ds], ds);
        printf("verify: tensor '%s' (%s -> %s, %zu elements, file offset %llu) element %zu: got 0x%llx want 0x%llx\n",
               j.src->name, fl_dtype_table[j.src->type].st_name, fl_dtype_table[j.dst_dtype].st_name, ne,
               (unsigned long long)j.src->file_offset, k, gv, rv);
        return false;
    }
    return true;
}

static int check(bool ok, const char *what) {
    printf("%s %s\n", ok ? "PASS" : "FAIL", what);
    return ok ? 0 : 1;
}

// Several chunks that fail on every run, in several files: sysfs attributes, whose size says 4096 bytes
// while they hold a few (as a shard cut short during the load), each read from byte 1024 by one f16
// tensor. The file first in path order holds the chunk of lowest index, which must name the error on
// every run whichever reader fails first (16 readers, 200 runs). A check of the rule more than a
// detector of its absence: the loader that kept the first error in time (before 2b0b16a) named
// another file in 1 of 40 runs once on an H200 host, in none of 200 another time. Without two such
// files here: a SKIP line.
static int check_lowest_failing_chunk_names_error() {
    std::vector<std::string> paths;
    for (const char *d : {"/sys/devices/system/cpu", "/sys/kernel/mm/transparent_hugepage", "/sys/kernel"}) {
        DIR *dp = opendir(d);
        if (!dp) continue;
        for (struct dirent *e; paths.size() < 8 && (e = readdir(dp));) {
            std::string p = std::string(d) + "/" + e->d_name;
            struct stat sb;
            char b[16];
            if (stat(p.c_str(), &sb) != 0 || !S_ISREG(sb.st_mode) || sb.st_size < 2048) continue;
            int fd = open(p.c_str(), O_RDONLY | O_NONBLOCK);
            if (fd < 0) continue;
            const ssize_t head = pread(fd, b, 1, 0), past = pread(fd, b, sizeof b, 1024);
            close(fd);
            if (head == 1 && past == 0) paths.push_back(p);
        }
        closedir(dp);
    }
    if (paths.size() < 2) {
        printf("SKIP lowest failing chunk names the error: fewer than two sysfs files shorter than their size here\n");
        return 0;
    }
    std::sort(paths.begin(), paths.end());
    const size_t n = paths.size();
    std::vector<std::string> names(n);
    std::vector<fl_src_tensor> src(n);
    std::vector<fl_load_job> jobs(n);
    uint8_t *dst = nullptr;
    CK(cudaMalloc(&dst, n * 1024));
    for (size_t i = n; i-- > 0;) {  // jobs in reverse path order: the loader's sort decides the chunks
        names[i] = "t" + std::to_string(i);
        fl_src_tensor &t = src[n - 1 - i];
        t.file = paths[i].c_str(); t.name = names[i].c_str(); t.file_offset = 1024; t.nbytes = 1024;
        t.kind = FL_SRC_PLAIN; t.type = FL_F16; t.ndim = 1; t.shape[0] = 512;
        jobs[n - 1 - i] = fl_load_job{&t, dst + i * 1024, FL_F16, 1, 512, 0};
    }
    const std::string want = "tensor 't0'";
    int wrong = 0, runs = 200;
    std::string other;
    const char *env = getenv("FASTLOAD_LOAD_THREADS");
    const std::string saved = env ? env : "";
    setenv("FASTLOAD_LOAD_THREADS", "16", 1);
    for (int r = 0; r < runs; r++) {
        fl_load_stats stats = {};
        fl_status st = fl_cuda_load(nullptr, jobs.data(), (int)n, nullptr, nullptr, &stats);
        if (st != FL_E_IO || !strstr(fl_err_msg(), want.c_str()) || !strstr(fl_err_msg(), paths[0].c_str())) {
            wrong++;
            other = fl_err_msg();
        }
    }
    if (env) setenv("FASTLOAD_LOAD_THREADS", saved.c_str(), 1);
    else unsetenv("FASTLOAD_LOAD_THREADS");
    CK(cudaFree(dst));
    char what[512];
    snprintf(what, sizeof what, "lowest failing chunk names the error (%zu files failing, %d runs, %d named another)%s%s",
             n, runs, wrong, wrong ? ": " : "", wrong ? other.c_str() : "");
    printf("  files: %s .. %s\n", paths.front().c_str(), paths.back().c_str());
    return check(wrong == 0, what);
}

static int cmd_verify(const char *dir, const char *dts, bool errors) {
    auto files = shards(dir);
    int fails = 0;
    {
        Ckpt ck(files, parse_dtype(dts));
        CK(cudaMemset(ck.arena, 0xA5, ck.arena_bytes));  // poison: every byte must be written
        CK(cudaDeviceSynchronize());
        fl_load_stats stats = {};
        Prog p = {dev_used(), 0, 0, 0};
        fl_status st = fl_cuda_load(nullptr, ck.jobs.data(), (int)ck.jobs.size(), prog_cb, &p, &stats);
        char what[256];
        snprintf(what, sizeof what, "load %s as %s (%zu tensors, %.3f GB, threads %d, direct_io %d)", dir, dts,
                 ck.jobs.size(), ck.src_bytes / 1e9, stats.threads, stats.direct_io);
        if (st != FL_OK) printf("load error %d: %s\n", st, fl_err_msg());
        fails += check(st == FL_OK && stats.bytes_read == ck.src_bytes, what);
        if (st == FL_OK) {
            std::atomic<size_t> next{0};
            std::atomic<bool> ok{true};
            std::vector<std::thread> th;
            for (int t = 0; t < 16; t++)
                th.emplace_back([&] {
                    std::vector<uint8_t> got, ref;
                    for (size_t i; ok && (i = next++) < ck.jobs.size();)
                        if (!compare(ck, i, got, ref)) ok = false;
                });
            for (auto &x : th) x.join();
            snprintf(what, sizeof what, "bytes on the device equal the host conversion (%s)", dts);
            fails += check(ok, what);
        }
        if (errors) {
            const size_t base = dev_used();
            const long long acct0 = g_accounted.load();
            Prog q = {base, 0, 0, 1};  // stop at the first progress call
            st = fl_cuda_load(nullptr, ck.jobs.data(), (int)ck.jobs.size(), prog_cb, &q, &stats);
            fails += check(st == FL_E_INTERRUPTED, "progress callback returning nonzero -> FL_E_INTERRUPTED");
            fails += check(g_accounted.load() == acct0, "device memory released after an interrupted load");
            // missing file
            std::vector<fl_src_tensor> s2(ck.src.begin(), ck.src.end());
            std::vector<fl_load_job> j2(ck.jobs.begin(), ck.jobs.end());
            for (size_t i = 0; i < j2.size(); i++) j2[i].src = &s2[i];
            s2.back().file = "/nonexistent/fastload-missing.safetensors";
            st = fl_cuda_load(nullptr, j2.data(), (int)j2.size(), nullptr, nullptr, &stats);
            fails += check(st == FL_E_IO && strstr(fl_err_msg(), "fastload-missing"), "missing file -> FL_E_IO naming it");
            printf("  message: %s\n", fl_err_msg());
            // a truncated copy of the first shard: the last tensor runs past the end
            s2.back().file = ck.src.back().file;
            std::string trunc = "/tmp/fastload_probe_truncated.safetensors";
            {
                const fl_src_tensor &last = ck.src.back();
                int in = open(last.file, O_RDONLY), out = open(trunc.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
                uint64_t keep = last.file_offset + last.nbytes / 2;
                std::vector<char> b(1 << 20);
                for (uint64_t o = 0; o < keep;) {
                    ssize_t r = pread(in, b.data(), std::min<uint64_t>(b.size(), keep - o), o);
                    if (r <= 0) break;
                    if (write(out, b.data(), r) != r) break;
                    o += r;
                }
                close(in); close(out);
                const char *orig = last.file;
                for (auto &s : s2) if (!strcmp(s.file, orig)) s.file = trunc.c_str();
            }
            st = fl_cuda_load(nullptr, j2.data(), (int)j2.size(), nullptr, nullptr, &stats);
            fails += check(st == FL_E_IO && strstr(fl_err_msg(), "truncated"), "truncated file -> FL_E_IO");
            printf("  message: %s\n", fl_err_msg());
            unlink(trunc.c_str());
            for (size_t i = 0; i < s2.size(); i++) s2[i] = ck.src[i];
            s2[0].kind = FL_SRC_GGML;
            st = fl_cuda_load(nullptr, j2.data(), (int)j2.size(), nullptr, nullptr, &stats);
            fails += check(st == FL_E_INTERNAL, "GGML source -> FL_E_INTERNAL");
            s2[0].kind = FL_SRC_PLAIN;
            j2[0].unpermute_heads = 2;
            st = fl_cuda_load(nullptr, j2.data(), (int)j2.size(), nullptr, nullptr, &stats);
            fails += check(st == FL_E_INTERNAL, "unpermute_heads > 0 -> FL_E_INTERNAL");
            fails += check_lowest_failing_chunk_names_error();
            fails += check(g_accounted.load() == acct0, "device memory released after failed loads");
        }
    }
    printf("verify: %s\n", fails ? "FAIL" : "PASS");
    return fails ? 1 : 0;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s gen|rates|load|verify|drop DIR ... (see the top of load_probe.cu)\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1], *dir = argv[2];
    int T = (int)std::min<long>(16, sysconf(_SC_NPROCESSORS_ONLN)), reps = 3;
    size_t chunk = 16u << 20;
    bool cold = false, reg = false, errors = false, warm = true;
    const char *dts = "keep";
    for (int i = 3; i < argc; i++) {
        if (!strcmp(argv[i], "-t") && i + 1 < argc) T = atoi(argv[++i]);
        else if (!strcmp(argv[i], "-c") && i + 1 < argc) chunk = (size_t)atoi(argv[++i]) << 20;
        else if (!strcmp(argv[i], "--dtype") && i + 1 < argc) dts = argv[++i];
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--cold")) cold = true;
        else if (!strcmp(argv[i], "--no-warm")) warm = false;
        else if (!strcmp(argv[i], "--reg")) reg = true;
        else if (!strcmp(argv[i], "--errors")) errors = true;
    }
    if (!strcmp(mode, "devices")) {  // for the tests' skip: 0 and the count when a device is usable
        int n = 0;
        cudaError_t e = cudaGetDeviceCount(&n);
        if (e != cudaSuccess || n == 0) { printf("no CUDA device: %s\n", e != cudaSuccess ? cudaGetErrorString(e) : "none"); return 3; }
        printf("devices: %d\n", n);
        return 0;
    }
    if (!strcmp(mode, "gen")) return cmd_gen(dir, argc > 3 ? atof(argv[3]) : 6.0, argc > 4 ? atoi(argv[4]) : 4);
    CK(cudaSetDevice(0));
    CK(cudaFree(nullptr));  // context up front, out of the timings
    if (!strcmp(mode, "alloc")) { cmd_alloc(T, chunk); return 0; }
    if (!strcmp(mode, "rates")) return cmd_rates(dir, T, chunk, cold, reg, warm);
    if (!strcmp(mode, "load")) return cmd_load(dir, dts, reps, cold);
    if (!strcmp(mode, "verify")) return cmd_verify(dir, dts, errors);
    if (!strcmp(mode, "drop")) {
        auto files = shards(dir);
        const char *how = drop_cache(files);
        printf("drop_method: %s\nresident_after_drop: %.3f\n", how, resident_fraction(files));
        return 0;
    }
    fprintf(stderr, "unknown mode %s\n", mode);
    return 2;
}
