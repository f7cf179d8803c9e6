/* cuda_stub.c: linked instead of the CUDA part when the package is built without nvcc. */
#include "../fl_backend.h"

int fl_cuda_compiled(void) { return 0; }
fl_status fl_cuda_device_count(int *count) { *count = 0; return FL_OK; }
fl_status fl_backend_cuda_create(int device, fl_dtype act, fl_backend **out) {
    *out = NULL;
    return fl_err(FL_E_UNSUPPORTED, "fastload was built without CUDA (no nvcc at install time, or "
                  "FASTLOAD_CUDA=0); reinstall with nvcc on PATH to use device_map=\"cuda\"");
}
void fl_cuda_account(int device, long long delta_bytes) { (void)device; (void)delta_bytes; }
fl_status fl_cuda_memory(int device, uint64_t *allocated, uint64_t *peak) { (void)device; *allocated = *peak = 0; return FL_OK; }
fl_status fl_cuda_reset_peak(int device) { (void)device; return FL_OK; }
fl_status fl_cuda_mem_info(int device, uint64_t *free_bytes, uint64_t *total_bytes) {
    (void)device; *free_bytes = *total_bytes = 0;
    return fl_err(FL_E_UNSUPPORTED, "fastload was built without CUDA");
}
/* Without CUDA there is no device: properties are an error, synchronizing and emptying caches no-ops. */
fl_status fl_cuda_device_props(int device, fl_cuda_props *out) {
    (void)device; (void)out;
    return fl_err(FL_E_UNSUPPORTED, "fastload was built without CUDA (no nvcc at install time, or FASTLOAD_CUDA=0)");
}
const char *fl_cuda_archs(void) { return ""; }
fl_status fl_cuda_kernel_check(int device, int *binary, int *ptx) {
    (void)device; *binary = *ptx = 0;
    return fl_err(FL_E_UNSUPPORTED, "fastload was built without CUDA (no nvcc at install time, or FASTLOAD_CUDA=0)");
}
fl_status fl_cuda_synchronize(int device) { (void)device; return FL_OK; }
void fl_cuda_empty_cache(void) {}
fl_status fl_cuda_h2d_bandwidth(int device, uint64_t bytes, int repeats, double *gb_per_s) {
    (void)device; (void)bytes; (void)repeats; *gb_per_s = 0;
    return fl_err(FL_E_UNSUPPORTED, "fastload was built without CUDA (no nvcc at install time, or FASTLOAD_CUDA=0): "
                  "no host-to-device copy to measure");
}
