// cuda_device.cu: device discovery and creation of the CUDA backend. Built when nvcc is found
// (setup.py); cuda_stub.c stands in otherwise. The backend itself is in cuda_backend.cu.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cuda_backend.cuh"

extern "C" int fl_cuda_compiled(void) { return 1; }

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
    int n = 0;
    FL_TRY(fl_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return fl_err(FL_E_VALUE, "cuda:%d requested but %d CUDA device(s) are visible", device, n);
    if (act != FL_F16 && act != FL_BF16 && act != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "CUDA backend: activation dtype %s is not float16, bfloat16 or float32",
                      fl_cuda_dtype_name(act));
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
    int n = 0;
    FL_TRY(fl_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return fl_err(FL_E_VALUE, "cuda:%d requested but %d CUDA device(s) are visible", device, n);
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
    int n = 0;
    FL_TRY(fl_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return fl_err(FL_E_VALUE, "cuda:%d requested but %d CUDA device(s) are visible", device, n);
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
