// cuda_device.cu: device discovery and creation of the CUDA backend. Built when nvcc is found
// (setup.py); cuda_stub.c stands in otherwise. The backend itself is in cuda_backend.cu.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.cuh"

extern "C" int fl_cuda_compiled(void) { return 1; }

// The architectures setup.py built ("90;80"), from the one-token macro it passes to every nvcc command.
#ifndef FL_CUDA_ARCHS_TOKEN
#define FL_CUDA_ARCHS_TOKEN unknown
#endif
#define FL_STR2(x) #x
#define FL_STR(x) FL_STR2(x)
extern "C" const char *fl_cuda_archs(void) {
    static const char *s = [] {  // a local static's initialiser runs once, whatever the threads
        static char b[sizeof FL_STR(FL_CUDA_ARCHS_TOKEN)];
        memcpy(b, FL_STR(FL_CUDA_ARCHS_TOKEN), sizeof b);
        for (char *c = b; *c; c++)
            if (*c == '_') *c = ';';
        return (const char *)b;
    }();
    return s;
}

// FL_E_VALUE unless `device` is one of the visible CUDA devices (FL_E_DEVICE without a driver).
static fl_status check_device(int device) {
    int n = 0;
    FL_TRY(fl_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return fl_err(FL_E_VALUE, "cuda:%d requested but %d CUDA device(s) are visible", device, n);
    return FL_OK;
}

// A kernel of this object's image, for asking the driver whether the image runs on a device: every .cu file is
// compiled with the same -gencode list, so one kernel answers for all of them.
__global__ void fl_probe_kernel(int *p) {
    if (p) *p = 0;
}

extern "C" fl_status fl_cuda_kernel_check(int device, int *binary, int *ptx) {
    *binary = *ptx = 0;
    FL_TRY(check_device(device));
    int prev = 0;
    FL_CUDA_CHECK(cudaGetDevice(&prev));
    FL_CUDA_CHECK(cudaSetDevice(device));
    cudaFuncAttributes a;
    const cudaError_t e = cudaFuncGetAttributes(&a, fl_probe_kernel);
    cudaSetDevice(prev);
    if (e == cudaSuccess) {
        *binary = a.binaryVersion;
        *ptx = a.binaryVersion == a.ptxVersion ? 0 : a.ptxVersion;  // equal for SASS compiled from its own PTX
        return FL_OK;
    }
    cudaGetLastError();  // not sticky, but leave nothing behind for the next check
    cudaDeviceProp p;
    const bool named = cudaGetDeviceProperties(&p, device) == cudaSuccess;
    const char *why = NULL, *fix = NULL;
    if (e == cudaErrorUnsupportedPtxVersion) {  // no SASS for the GPU, and PTX newer than the driver can compile
        why = "and the NVIDIA driver is too old to compile its PTX for this GPU";
        fix = "Update the driver, or build for this GPU";
    } else if (e == cudaErrorNoKernelImageForDevice || e == cudaErrorInvalidDeviceFunction) {
        why = "which has no kernels this GPU can run";
        fix = "Build it for this GPU";
    }
    if (why)
        return fl_err(FL_E_UNSUPPORTED,
                      "cuda:%d (%s, compute capability %d.%d) cannot run this build of fastload: it was built with "
                      "FASTLOAD_CUDA_ARCHS=\"%s\", %s (%s: %s). %s: FASTLOAD_CUDA_ARCHS=\"%d%d\" pip install "
                      "--no-build-isolation --force-reinstall <fastload source> (by default the build targets the "
                      "GPUs nvidia-smi shows where it runs; list several, e.g. \"80;90\", for a package used on "
                      "other machines)",
                      device, named ? p.name : "?", named ? p.major : 0, named ? p.minor : 0, fl_cuda_archs(), why,
                      cudaGetErrorName(e), cudaGetErrorString(e), fix, named ? p.major : 0, named ? p.minor : 0);
    return fl_err(FL_E_DEVICE, "cuda:%d: cannot query fastload's kernels: %s (%s)", device, cudaGetErrorString(e),
                  cudaGetErrorName(e));
}

extern "C" fl_status fl_cuda_device_count(int *count) {
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) {
        *count = 0;
        cudaGetLastError();  // clear the sticky "no driver" error so later calls start clean
        return fl_err(FL_E_DEVICE, "cudaGetDeviceCount: %s (%s)", cudaGetErrorString(e), cudaGetErrorName(e));
    }
    return FL_OK;
}

extern "C" fl_status fl_backend_cuda_create(int device, fl_dtype act, fl_backend **out) {
    *out = NULL;
    FL_TRY(check_device(device));
    if (act != FL_F16 && act != FL_BF16 && act != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "CUDA backend: activation dtype %s is not float16, bfloat16 or float32",
                      fl_cuda_dtype_name(act));
    int binary = 0, ptx = 0;
    FL_TRY(fl_cuda_kernel_check(device, &binary, &ptx));  // a build for other GPUs: say so now, not at a first launch
    int major = 0;
    FL_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    if (act == FL_BF16 && major < 8)
        return fl_err(FL_E_UNSUPPORTED, "cuda:%d has compute capability %d.x; bfloat16 needs 8.0 or newer "
                      "(use dtype=float16)", device, major);
    fl_backend *be = (fl_backend *)calloc(1, sizeof *be);
    if (!be) return fl_err(FL_E_NOMEM, "cannot allocate the CUDA backend");
    const fl_status st = fl_cuda_backend_init(be, device, act);
    if (st != FL_OK) {
        if (be->destroy) be->destroy(be);
        else free(be);
        return st;
    }
    *out = be;
    return FL_OK;
}

// fastload.cuda.get_device_properties / get_device_name.
extern "C" fl_status fl_cuda_device_props(int device, fl_cuda_props *out) {
    memset(out, 0, sizeof *out);
    FL_TRY(check_device(device));
    cudaDeviceProp p;
    FL_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
    snprintf(out->name, sizeof out->name, "%s", p.name);
    out->total_memory = (uint64_t)p.totalGlobalMem;
    out->major = p.major;
    out->minor = p.minor;
    out->multi_processor_count = p.multiProcessorCount;
    return FL_OK;
}

// fastload.cuda.synchronize: every stream fastload uses on the device (cudaDeviceSynchronize), the
// calling thread's current device restored afterwards.
extern "C" fl_status fl_cuda_synchronize(int device) {
    FL_TRY(check_device(device));
    int prev = 0;
    FL_CUDA_CHECK(cudaGetDevice(&prev));
    FL_CUDA_CHECK(cudaSetDevice(device));
    const cudaError_t e = cudaDeviceSynchronize();
    cudaSetDevice(prev);
    if (e != cudaSuccess)
        return fl_err(FL_E_DEVICE, "cudaDeviceSynchronize on cuda:%d: %s (%s)", device, cudaGetErrorString(e),
                      cudaGetErrorName(e));
    return FL_OK;
}

// fastload.bench load's PCIe ceiling: the rate of host-to-device copies from pinned memory, what the loader's
// copies from its pinned pool can reach at best. One warm-up copy, then `repeats` copies on one stream between
// two events. Every buffer is freed and the calling thread's device restored on every path.
extern "C" fl_status fl_cuda_h2d_bandwidth(int device, uint64_t bytes, int repeats, double *gb_per_s) {
    *gb_per_s = 0;
    if (bytes == 0 || bytes > (1ull << 40))
        return fl_err(FL_E_VALUE, "cuda_h2d_bandwidth: bytes must be between 1 and 2^40, got %llu",
                      (unsigned long long)bytes);
    if (repeats < 1 || repeats > 1000)
        return fl_err(FL_E_VALUE, "cuda_h2d_bandwidth: repeats must be between 1 and 1000, got %d", repeats);
    FL_TRY(check_device(device));
    int prev = 0;
    FL_CUDA_CHECK(cudaGetDevice(&prev));
    FL_CUDA_CHECK(cudaSetDevice(device));
    void *host = NULL, *dev = NULL;
    cudaStream_t stream = NULL;
    cudaEvent_t e0 = NULL, e1 = NULL;
    cudaError_t e = cudaSuccess;
    const char *what = "";
    float ms = 0.0f;
    bool counted = false;
#define FL_H2D_STEP(stmt)                                                                                     \
    do {                                                                                                      \
        e = (stmt);                                                                                           \
        if (e != cudaSuccess) { what = #stmt; goto done; }                                                    \
    } while (0)
    FL_H2D_STEP(cudaHostAlloc(&host, (size_t)bytes, cudaHostAllocDefault));
    memset(host, 0x5a, (size_t)bytes);  // every page touched before the clock starts
    FL_H2D_STEP(cudaMalloc(&dev, (size_t)bytes));
    fl_cuda_account(device, (long long)bytes);
    counted = true;
    FL_H2D_STEP(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    FL_H2D_STEP(cudaEventCreate(&e0));
    FL_H2D_STEP(cudaEventCreate(&e1));
    FL_H2D_STEP(cudaMemcpyAsync(dev, host, (size_t)bytes, cudaMemcpyHostToDevice, stream));  // warm-up
    FL_H2D_STEP(cudaEventRecord(e0, stream));
    for (int i = 0; i < repeats; i++)
        FL_H2D_STEP(cudaMemcpyAsync(dev, host, (size_t)bytes, cudaMemcpyHostToDevice, stream));
    FL_H2D_STEP(cudaEventRecord(e1, stream));
    FL_H2D_STEP(cudaEventSynchronize(e1));
    FL_H2D_STEP(cudaEventElapsedTime(&ms, e0, e1));
#undef FL_H2D_STEP
done:
    if (stream) cudaStreamSynchronize(stream);
    if (e0) cudaEventDestroy(e0);
    if (e1) cudaEventDestroy(e1);
    if (stream) cudaStreamDestroy(stream);
    if (dev) cudaFree(dev);
    if (counted) fl_cuda_account(device, -(long long)bytes);
    if (host) cudaFreeHost(host);
    cudaSetDevice(prev);
    if (e != cudaSuccess) {
        cudaGetLastError();
        return fl_err(FL_E_DEVICE, "%s failed on cuda:%d: %s (%s)", what, device, cudaGetErrorString(e),
                      cudaGetErrorName(e));
    }
    if (!(ms > 0.0f)) return fl_err(FL_E_DEVICE, "cuda:%d: the copies were timed at %g ms", device, (double)ms);
    *gb_per_s = (double)bytes * (double)repeats / ((double)ms * 1e-3) / 1e9;
    return FL_OK;
}
