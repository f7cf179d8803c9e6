// cuda_memory.cu: process-wide accounting of the device memory fastload allocates, per device,
// for fastload.cuda.memory_allocated() / max_memory_allocated() / reset_peak_memory_stats().
// The backend's alloc/free report every allocation here (fl_cuda_account).
// Every device allocation is a direct cudaMalloc / cudaFree (cuda_backend.cu cu_alloc / cu_free and its
// workspaces, loader.cu staging ring), so fastload.cuda.memory_reserved() == memory_allocated().
#include <cuda_runtime.h>
#include <atomic>
#include "../fl_backend.h"

#define FL_MAX_DEVICES 64
static std::atomic<unsigned long long> g_alloc[FL_MAX_DEVICES], g_peak[FL_MAX_DEVICES];

extern "C" void fl_cuda_account(int device, long long delta) {
    if (device < 0 || device >= FL_MAX_DEVICES) return;
    unsigned long long now = g_alloc[device].fetch_add((unsigned long long)delta) + (unsigned long long)delta;
    unsigned long long pk = g_peak[device].load();
    while (now > pk && !g_peak[device].compare_exchange_weak(pk, now)) {}
}

extern "C" fl_status fl_cuda_memory(int device, uint64_t *allocated, uint64_t *peak) {
    if (device < 0 || device >= FL_MAX_DEVICES) return fl_err(FL_E_VALUE, "cuda:%d: no such device", device);
    *allocated = g_alloc[device].load();
    *peak = g_peak[device].load();
    return FL_OK;
}

extern "C" fl_status fl_cuda_reset_peak(int device) {
    if (device < 0 || device >= FL_MAX_DEVICES) return fl_err(FL_E_VALUE, "cuda:%d: no such device", device);
    g_peak[device].store(g_alloc[device].load());
    return FL_OK;
}

extern "C" fl_status fl_cuda_mem_info(int device, uint64_t *free_b, uint64_t *total_b) {
    int prev = 0;
    cudaGetDevice(&prev);
    cudaError_t e = cudaSetDevice(device);
    size_t f = 0, t = 0;
    if (e == cudaSuccess) e = cudaMemGetInfo(&f, &t);
    cudaSetDevice(prev);
    if (e != cudaSuccess) return fl_err(FL_E_DEVICE, "cudaMemGetInfo on cuda:%d: %s", device, cudaGetErrorString(e));
    *free_b = f;
    *total_b = t;
    return FL_OK;
}

// fastload.cuda.empty_cache: device memory is never cached (every buffer above is one cudaMalloc,
// released by cudaFree when its owner goes), so the only thing to give back is the loader's kept
// pinned host buffers (loader.cu; a no-op while a load is using them).
extern "C" void fl_cuda_load_release_pool(void);
extern "C" void fl_cuda_empty_cache(void) { fl_cuda_load_release_pool(); }
