// lowrank.cu: the LoRA merge at load (lowrank.cuh). Why a GEMM into float32 scratch and then an add, rather than
// cuBLAS with beta = 1 on the weight: the weight is float16 / bfloat16 on the GPU (cuBLAS would accumulate in the
// weight's dtype), the merged values are checked (NaN / inf / float16 overflow name the tensor), and the result is
// rounded once from W + scale * (B @ A) in float32, the same value the CPU backend's C loop forms.
#include "cuda_common.cuh"
#include "lowrank.cuh"

template <typename T>
__global__ void add_delta_kernel(T *__restrict__ w, const float *__restrict__ delta, int64_t n, int *__restrict__ bad) {
    int local = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float v = fl_to_f32(w[i]) + delta[i];
        const T o = fl_from_f32<T>(v);
        local |= !isfinite(fl_to_f32(o));  // float16 overflow rounds to inf here
        w[i] = o;
    }
    if (local) atomicAdd(bad, 1);
}

fl_status fl_cuda_add_lowrank(cudaStream_t st, cublasHandle_t blas, void *w, fl_dtype dt, int64_t rows, int64_t cols,
                              const float *b, const float *a, int r, float scale, float *tmp, size_t tmp_floats,
                              int *bad) {
    if (rows <= 0 || cols <= 0 || r <= 0) return FL_OK;
    if (cols > INT32_MAX || r > INT32_MAX || (size_t)cols > tmp_floats)
        return fl_err(FL_E_VALUE, "LoRA merge: %lld columns do not fit cuBLAS' int sizes or the scratch", (long long)cols);
    const int64_t chunk = (int64_t)(tmp_floats / (size_t)cols);
    const size_t es = (size_t)fl_dtype_size(dt);
    for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
        const int64_t k = rows - r0 < chunk ? rows - r0 : chunk;
        // Row-major C[k, cols] = B[r0:r0+k, r] @ A[r, cols] is column-major C^T[cols, k] = A^T[cols, r] @ B^T[r, k]:
        // A as stored is A^T with ld cols, B's rows as stored are B^T with ld r.
        const float zero = 0.f;
        FL_CUBLAS_CHECK(cublasSgemm(blas, CUBLAS_OP_N, CUBLAS_OP_N, (int)cols, (int)k, r, &scale, a, (int)cols,
                                    b + (size_t)r0 * (size_t)r, r, &zero, tmp, (int)cols));
        const int64_t n = k * cols;
        const unsigned grid = (unsigned)((n + 255) / 256 < 4096 ? (n + 255) / 256 : 4096);
        char *wr = (char *)w + (size_t)r0 * (size_t)cols * es;
        FL_CUDA_DISPATCH(dt, T, add_delta_kernel<T><<<grid, 256, 0, st>>>((T *)wr, tmp, n, bad););
        FL_CUDA_CHECK_LAUNCH();
    }
    return FL_OK;
}
