// cuda_device.cu: device discovery for the CUDA part. Built when nvcc is found (setup.py).
// The CUDA backend's kernels (fl_backend_cuda_create) arrive with the CUDA-backend issue; until
// then device_map="cuda" raises NotImplementedError with this message, and info() reports devices.
#include <cuda_runtime.h>
#include "../fl_backend.h"

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
    (void)act;
    *out = NULL;
    int n = 0;
    FL_TRY(fl_cuda_device_count(&n));
    if (device < 0 || device >= n)
        return fl_err(FL_E_VALUE, "cuda:%d requested but %d CUDA device(s) are visible", device, n);
    return fl_err(FL_E_UNSUPPORTED, "the CUDA backend is not implemented in this version of fastload yet; "
                  "use device_map=\"cpu\"");
}

// The stream the backend's ops run on. Until the CUDA backend lands no backend can be created,
// so nothing calls this with a real backend; the default stream keeps the symbol defined.
extern "C" cudaStream_t fl_cuda_stream(fl_backend *be) { (void)be; return 0; }
