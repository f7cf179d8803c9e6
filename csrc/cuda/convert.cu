// convert.cu: element-wise dtype conversion on the device (see convert.cuh).
#include "convert.cuh"
#include "cuda_common.cuh"

// Each thread converts 4 consecutive elements per step of a grid-stride loop (loads of 4
// neighbours coalesce into wide transactions across the warp); the tail is element-wise.
template <typename TD, typename TS>
__global__ void convert_kernel(TD *__restrict__ dst, const TS *__restrict__ src, size_t n) {
    const size_t stride = (size_t)gridDim.x * blockDim.x * 4;
    for (size_t i = ((size_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < n; i += stride) {
        if (i + 4 <= n) {
            float f[4];
#pragma unroll
            for (int k = 0; k < 4; k++) f[k] = fl_to_f32(src[i + k]);
#pragma unroll
            for (int k = 0; k < 4; k++) dst[i + k] = fl_from_f32<TD>(f[k]);
        } else {
            for (size_t k = i; k < n; k++) dst[k] = fl_from_f32<TD>(fl_to_f32(src[k]));
        }
    }
}

template <typename TD, typename TS>
static fl_status launch_convert(cudaStream_t st, void *dst, const void *src, size_t n) {
    const int threads = 256;
    size_t blocks = (n + (size_t)threads * 4 - 1) / ((size_t)threads * 4);
    if (blocks > 65535u * 8u) blocks = 65535u * 8u;  // grid-stride beyond that
    convert_kernel<TD, TS><<<(unsigned)blocks, threads, 0, st>>>((TD *)dst, (const TS *)src, n);
    FL_CUDA_CHECK_LAUNCH();
    return FL_OK;
}

fl_status fl_cuda_convert(cudaStream_t stream, void *dst, fl_dtype dt, const void *src, fl_dtype st, size_t n) {
    if (n == 0) return FL_OK;
    if (dt == st && (dt == FL_F32 || dt == FL_F16 || dt == FL_BF16)) {
        if (dst != src) FL_CUDA_CHECK(cudaMemcpyAsync(dst, src, n * (size_t)fl_dtype_size(dt), cudaMemcpyDeviceToDevice, stream));
        return FL_OK;
    }
    if (st == FL_F64) {
        FL_CUDA_DISPATCH(dt, TD, return launch_convert<TD, double>(stream, dst, src, n););
    }
    FL_CUDA_DISPATCH(dt, TD, FL_CUDA_DISPATCH(st, TS, return launch_convert<TD, TS>(stream, dst, src, n);));
    return FL_OK;
}
