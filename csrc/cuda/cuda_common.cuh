// cuda_common.cuh: what every CUDA file of fastload shares: the checking macros, the one
// activation-dtype dispatch, and element conversions.
//
// Error handling (STYLE.md, habit 2): every CUDA runtime and cuBLAS call goes through
// FL_CUDA_CHECK / FL_CUBLAS_CHECK, which on failure record
//   "<statement> failed at <file>:<line> on cuda:<N>: <message> (<error name>)"
// through fl_err(FL_E_DEVICE, ...) and return that status from the enclosing function (which
// must therefore return fl_status). Kernel launches are checked with FL_CUDA_CHECK_LAUNCH().
#ifndef FL_CUDA_COMMON_CUH
#define FL_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cublas_v2.h>
#include <stdint.h>
#include <stdlib.h>
#include <type_traits>
#include <string.h>

#include "../fl_common.h"

// Device of the calling thread, for messages only (-1 if even that fails).
static inline int fl_cuda_current_device(void) {
    int d = -1;
    if (cudaGetDevice(&d) != cudaSuccess) d = -1;
    return d;
}

#define FL_CUDA_CHECK(stmt)                                                                         \
    do {                                                                                            \
        cudaError_t fl_cu_e_ = (stmt);                                                              \
        if (fl_cu_e_ != cudaSuccess)                                                                \
            return fl_err(FL_E_DEVICE, "%s failed at %s:%d on cuda:%d: %s (%s)", #stmt, __FILE__,   \
                          __LINE__, fl_cuda_current_device(), cudaGetErrorString(fl_cu_e_),        \
                          cudaGetErrorName(fl_cu_e_));                                              \
    } while (0)

#define FL_CUBLAS_CHECK(stmt)                                                                       \
    do {                                                                                            \
        cublasStatus_t fl_cb_s_ = (stmt);                                                           \
        if (fl_cb_s_ != CUBLAS_STATUS_SUCCESS)                                                      \
            return fl_err(FL_E_DEVICE, "%s failed at %s:%d on cuda:%d: %s (%s)", #stmt, __FILE__,   \
                          __LINE__, fl_cuda_current_device(), cublasGetStatusString(fl_cb_s_),     \
                          cublasGetStatusName(fl_cb_s_));                                           \
    } while (0)

// After a <<<...>>> launch: a bad configuration or a missing kernel image shows up here; faults
// inside the kernel surface at the next synchronisation (backend->sync).
#define FL_CUDA_CHECK_LAUNCH() FL_CUDA_CHECK(cudaGetLastError())

static inline const char *fl_cuda_dtype_name(fl_dtype t) {
    return (t >= 0 && t < FL_DTYPE_PLAIN_COUNT) ? fl_dtype_table[t].np_name : "?";
}

// The one dtype dispatch (STYLE.md, habit 4): binds the C++ element type `T` for an fl_dtype
// and expands the body (the variadic part, so it may hold commas) once per supported type.
// Unsupported dtypes return FL_E_UNSUPPORTED from the enclosing function.
//   FL_CUDA_DISPATCH(act, T, launch_something<T><<<g, b, 0, st>>>(...););
#define FL_CUDA_DISPATCH(dt, T, ...)                                                                \
    switch (dt) {                                                                                   \
    case FL_F16: { typedef __half T; __VA_ARGS__ } break;                                           \
    case FL_BF16: { typedef __nv_bfloat16 T; __VA_ARGS__ } break;                                   \
    case FL_F32: { typedef float T; __VA_ARGS__ } break;                                            \
    default:                                                                                        \
        return fl_err(FL_E_UNSUPPORTED, "CUDA: dtype %s is not supported here (float16, bfloat16 " \
                      "or float32)", fl_cuda_dtype_name(dt));                                       \
    }

// ---- element conversions (float32 math everywhere) ----
__device__ __forceinline__ float fl_to_f32(float v) { return v; }
__device__ __forceinline__ float fl_to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float fl_to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float fl_to_f32(double v) { return (float)v; }

template <typename T> __device__ __forceinline__ T fl_from_f32(float v);
template <> __device__ __forceinline__ float fl_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __half fl_from_f32<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 fl_from_f32<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A 16-byte vector of T (8 halves or 4 floats), widened to float32. `EPV` elements per vector.
template <typename T> struct fl_vec { static constexpr int EPV = 16 / (int)sizeof(T); };

template <typename T> __device__ __forceinline__ void fl_vec_to_f32(const uint4 &v, float *f);
template <> __device__ __forceinline__ void fl_vec_to_f32<float>(const uint4 &v, float *f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
}
template <> __device__ __forceinline__ void fl_vec_to_f32<__half>(const uint4 &v, float *f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        __half2 h;
        memcpy(&h, &w[i], 4);
        const float2 p = __half22float2(h);
        f[2 * i] = p.x; f[2 * i + 1] = p.y;
    }
}
template <> __device__ __forceinline__ void fl_vec_to_f32<__nv_bfloat16>(const uint4 &v, float *f) {
    // bf16 -> f32 is a shift: low half of each word is element 2i, high half element 2i+1.
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; i++) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// The reverse: EPV floats -> one 16-byte vector of T (round to nearest even).
template <typename T> __device__ __forceinline__ uint4 fl_f32_to_vec(const float *f) {
    T e[fl_vec<T>::EPV];
#pragma unroll
    for (int i = 0; i < fl_vec<T>::EPV; i++) e[i] = fl_from_f32<T>(f[i]);
    uint4 v;
    memcpy(&v, e, 16);
    return v;
}

// One rope pair (a, c) rotated by the angle whose cos / sin are cs / sn: (a cs - c sn, c cs + a sn) in float32.
// Written with explicit roundings so no contraction is left to the compiler: rope_store and the decode attention
// that rotates q and the new k itself (attention.cu) give the same bits.
__device__ __forceinline__ float2 fl_rope_rot(float a, float c, float cs, float sn) {
    return make_float2(__fmaf_rn(a, cs, -__fmul_rn(c, sn)), __fmaf_rn(c, cs, __fmul_rn(a, sn)));
}

// c[0..3] += A * B on the tensor cores: mma.sync m16n8k16, row.col, T = __half or __nv_bfloat16 inputs
// (a0..a3: the A fragment, b0, b1: the B fragment, two elements per register), fp32 accumulators.
// sm_80 and newer; below that (and in the host pass) it compiles to nothing, and callers must
// not reach it (the GEMV and attention select their tensor-core paths by compute capability).
template <typename T>
__device__ __forceinline__ void fl_mma_16816(float *c, uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                             uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    if constexpr (std::is_same<T, __nv_bfloat16>::value)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// Loads that bypass L1 for data read exactly once (weights streamed by the GEMV).
__device__ __forceinline__ uint4 fl_ld_stream(const void *p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// 16-byte global -> shared copy (cp.async, sm_80+; L1 bypassed); src_bytes 0 writes zeros (rows past the end).
__device__ __forceinline__ uint32_t smem_addr(const void *p) {
    return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t saddr, const void *g, int src_bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(saddr), "l"(g), "r"(src_bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N> __device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// silu(g) * u in float32, as SwiGLU (norm.cu) and the GEMV that ends in it (matmul.cu) both compute it.
__device__ __forceinline__ float fl_silu_mul(float g, float u) { return g / (1.0f + __expf(-g)) * u; }

// ---- programmatic dependent launch (PDL, sm_90+) --------------------------------------------
// A kernel launched with fl_launch() may start while the kernel before it on the stream is
// still running (once that one's blocks have all started, or called fl_pdl_launch_dependents):
// its launch latency and prologue hide under the predecessor's tail. The contract, for every
// kernel launched through fl_launch(): before fl_pdl_wait() it may read only data that no
// kernel of the stream writes (weights), and it writes nothing; fl_pdl_wait() returns once the
// predecessor grid has completed and its memory is visible, so (each kernel waiting on its own
// predecessor) everything earlier on the stream is done. Without PDL (older GPUs,
// FASTLOAD_PDL=0, a plain <<<>>> launch) both calls are no-ops and ordering is the stream's.
__device__ __forceinline__ void fl_pdl_wait(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void fl_pdl_launch_dependents(void) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A 32-bit load with acquire semantics at GPU scope: what a block waiting on a counter that other blocks raise after
// fencing their writes reads it with (attention.cu's combine blocks).
__device__ __forceinline__ unsigned fl_ld_acquire_u32(const unsigned *p) {
    unsigned v;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
    asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
#else
    v = *(const volatile unsigned *)p;
#endif
    return v;
}

// The GPU's nanosecond clock (%globaltimer): for time bounds on waits, not for measuring.
__device__ __forceinline__ unsigned long long fl_globaltimer_ns(void) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

// Compute capability major of the current device (0 if unknown), cached per device.
static inline int fl_cuda_cc_major(void) {
    static int cache[64];  // 0 = unknown; benign race: every writer stores the same value
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 0;
    if (!cache[dev]) {
        int major = 0;
        if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return 0;
        cache[dev] = major;
    }
    return cache[dev];
}

// Whether launches use PDL: compute capability 9.0+ and FASTLOAD_PDL not "0" (the switch exists
// for measurements and as a way out; read once per process).
static inline bool fl_cuda_pdl_enabled(void) {
    static const bool env_off = [] { const char *e = getenv("FASTLOAD_PDL"); return e && !strcmp(e, "0"); }();
    return !env_off && fl_cuda_cc_major() >= 9;
}

// kernel<<<grid, block, smem, st>>>(args...) with the PDL attribute where enabled. The kernel
// must follow the contract above (call fl_pdl_wait() before touching activations).
template <typename... KArgs, typename... Args>
static inline cudaError_t fl_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t st,
                                    Args... args) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = st;
    cudaLaunchAttribute attr[1];
    if (fl_cuda_pdl_enabled()) {
        attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attr[0].val.programmaticStreamSerializationAllowed = 1;
        cfg.attrs = attr;
        cfg.numAttrs = 1;
    }
    return cudaLaunchKernelEx(&cfg, kernel, static_cast<KArgs>(args)...);
}
// cudaLaunchKernelEx returns the launch's own errors (bad configuration, no kernel image), so no
// FL_CUDA_CHECK_LAUNCH() is needed after it.
#define FL_LAUNCH(...) FL_CUDA_CHECK(fl_launch(__VA_ARGS__))

static inline int fl_is_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Block-wide float sum for blockDim.x a multiple of 32 (<= 1024); every thread gets the total.
// `red` is __shared__ float[32]. Contains __syncthreads: call from all threads of the block.
__device__ __forceinline__ float fl_block_sum(float v, float *red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();  // `red` may still be read by a previous call
    if (lane == 0) red[warp] = v;
    __syncthreads();
    v = lane < nw ? red[lane] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

#endif
