// matmul.cu: y[n, R] = x[n, C] @ W[R, C]^T (+ bias) for plain-dtype weights (see matmul.cuh).
//
// Decode (n <= 8) is bound by reading W once: R*C*sizeof(T) bytes. The FMA GEMV gives each warp
// RPW consecutive rows; each lane walks the row in 16-byte vectors (8 halves / 4 floats) with
// U vectors per row in flight per step (RPW*U = 8 or 16 independent 16-byte loads per lane; the
// row's last, partial step is one more step of predicated loads, not a trip per vector), loads W
// past L1 (it is read once), reads the n token rows of x through L1 (shared by the block's
// warps and reused for all RPW rows), and accumulates n x RPW dot products in float32. One read
// of each weight tile serves every token row. A warp reduction then leaves output (i, r) in
// lane i*RPW + r, which adds the bias and writes it. At n = 8 that kernel runs 4 FMAs per weight
// byte and becomes issue-bound before the memory is (HBM3e is fast): the tensor-core GEMV
// below was written for the larger n, but on an H200 cuBLAS streams W faster than both from n = 5
// on (dev/cuda/NOTES.md), so fl_cuda_matmul sends n >= 5 to cuBLAS (float32 accumulation).
// Every kernel here is launched with fl_launch (programmatic dependent launch on sm_90+).
#include "matmul.cuh"
#include "cuda_common.cuh"

#define GEMV_THREADS 128  /* 4 warps: small blocks spread a short row count over more SMs */

enum { GEMV_TAIL_SERIAL = 0, GEMV_TAIL_PRED = 1 };  // how a row's last partial step is read

// GLU (RPW = 2): W is [gate | up], 2R rows; a warp reads gate row o and up row o together and writes
// y[i, o] = silu(g) * u of the two dot products, each first rounded to T as the separate matmul would
// store it, so the result equals matmul + swiglu_kernel bit for bit (SwiGLU fused into gate|up: one
// kernel and one dependency less per decode layer).
template <typename T, int N, int RPW, int U, int TAIL, bool GLU = false>
__global__ void __launch_bounds__(GEMV_THREADS)
gemv_kernel(T *__restrict__ y, const T *__restrict__ x, const T *__restrict__ W, const T *__restrict__ bias,
            int64_t R, int64_t C) {
    constexpr int E = fl_vec<T>::EPV;
    static_assert(N * RPW <= 32, "one output per lane");
    static_assert(!GLU || RPW == 2, "GLU pairs a gate row with its up row");
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int64_t wid = (int64_t)blockIdx.x * (GEMV_THREADS / 32) + threadIdx.x / 32;
    const int64_t r0 = GLU ? wid : wid * RPW;
    if (r0 >= R) return;  // whole warps only
    const int64_t nv = C / E;
    const uint4 *wrow[RPW];
    if constexpr (GLU) {
        wrow[0] = (const uint4 *)(W + r0 * C);
        wrow[1] = (const uint4 *)(W + (R + r0) * C);
    } else {
#pragma unroll
        for (int r = 0; r < RPW; r++) wrow[r] = (const uint4 *)(W + (r0 + r < R ? r0 + r : R - 1) * C);
    }
    const uint4 *xv = (const uint4 *)x;  // row i starts at vector i * nv

    float acc[N][RPW];
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) acc[i][r] = 0.f;

    auto fma_vec = [&](const uint4 (&wv)[RPW], int64_t idx) {
        float wf[RPW][E];
#pragma unroll
        for (int r = 0; r < RPW; r++) fl_vec_to_f32<T>(wv[r], wf[r]);
#pragma unroll
        for (int i = 0; i < N; i++) {
            float xf[E];
            fl_vec_to_f32<T>(__ldg(xv + i * nv + idx), xf);
#pragma unroll
            for (int r = 0; r < RPW; r++)
#pragma unroll
                for (int e = 0; e < E; e++) acc[i][r] = fmaf(wf[r][e], xf[e], acc[i][r]);
        }
    };

    // x comes from the previous kernel. Requesting the first step's weights before this wait
    // (they are never written on the stream) measured 2% slower end to end, not faster.
    fl_pdl_wait();
    int64_t base = lane;
    // Full steps: U vectors of each of the RPW rows, all loads issued before any use.
    for (; base + 32 * (U - 1) < nv; base += 32 * U) {
        uint4 w[U][RPW];
#pragma unroll
        for (int u = 0; u < U; u++)
#pragma unroll
            for (int r = 0; r < RPW; r++) w[u][r] = fl_ld_stream(wrow[r] + base + 32 * u);
#pragma unroll
        for (int u = 0; u < U; u++) fma_vec(w[u], base + 32 * u);
    }
    if (TAIL == GEMV_TAIL_PRED) {
        // The rest in one more step with predicated loads: one round trip to memory, where one
        // vector at a time cost a round trip per vector (qkv / o_proj rows of 448 vectors: 7
        // trips -> 2; q|k|v 3256 -> 3447 GB/s on an H200, dev/cuda/NOTES.md). The
        // predicates cost registers (50 against 36 at n = 1) and still win. A variant that
        // re-read an overlapping last full window instead (36 registers) measured slower.
        if (base < nv) {
            uint4 w[U][RPW];
            const uint4 z = make_uint4(0, 0, 0, 0);
#pragma unroll
            for (int u = 0; u < U; u++)
#pragma unroll
                for (int r = 0; r < RPW; r++) w[u][r] = base + 32 * u < nv ? fl_ld_stream(wrow[r] + base + 32 * u) : z;
#pragma unroll
            for (int u = 0; u < U; u++)
                if (base + 32 * u < nv) fma_vec(w[u], base + 32 * u);
        }
    } else {
        // One vector at a time: a round trip per remaining vector (the kernel up to 2026-11-21).
        for (; base < nv; base += 32) {
            uint4 w[RPW];
#pragma unroll
            for (int r = 0; r < RPW; r++) w[r] = fl_ld_stream(wrow[r] + base);
            fma_vec(w, base);
        }
    }

    float mine = 0.f;
    if constexpr (GLU) {  // the sums reach every lane; lane i keeps token i's silu(g) * u
#pragma unroll
        for (int i = 0; i < N; i++) {
            float g = acc[i][0], u = acc[i][1];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) {
                g += __shfl_xor_sync(0xffffffffu, g, o);
                u += __shfl_xor_sync(0xffffffffu, u, o);
            }
            if (lane == i) mine = fl_silu_mul(fl_to_f32(fl_from_f32<T>(g)), fl_to_f32(fl_from_f32<T>(u)));
        }
        if (lane < N) y[(int64_t)lane * R + r0] = fl_from_f32<T>(mine);
        return;
    }
#pragma unroll
    for (int i = 0; i < N; i++)
#pragma unroll
        for (int r = 0; r < RPW; r++) {
            float v = acc[i][r];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == i * RPW + r) mine = v;
        }
    if (lane < N * RPW) {
        const int i = lane / RPW, r = lane % RPW;
        const int64_t row = r0 + r;
        if (row < R) {
            if (bias) mine += fl_to_f32(bias[row]);
            y[(int64_t)i * R + row] = fl_from_f32<T>(mine);
        }
    }
}

// Element-wise fallback for rows that are not whole 16-byte vectors (odd C) or misaligned
// pointers: one warp per output row, any n <= FL_GEMV_MAX_N.
template <typename T>
__global__ void __launch_bounds__(GEMV_THREADS)
gemv_scalar_kernel(T *__restrict__ y, const T *__restrict__ x, const T *__restrict__ W, const T *__restrict__ bias,
                   int n, int64_t R, int64_t C) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    const int lane = threadIdx.x & 31;
    const int64_t row = (int64_t)blockIdx.x * (GEMV_THREADS / 32) + threadIdx.x / 32;
    if (row >= R) return;
    const T *w = W + row * C;
    float acc[FL_GEMV_MAX_N];
#pragma unroll
    for (int i = 0; i < FL_GEMV_MAX_N; i++) acc[i] = 0.f;
    for (int64_t k = lane; k < C; k += 32) {
        const float wk = fl_to_f32(w[k]);
#pragma unroll
        for (int i = 0; i < FL_GEMV_MAX_N; i++)
            if (i < n) acc[i] = fmaf(wk, fl_to_f32(x[i * C + k]), acc[i]);
    }
#pragma unroll
    for (int i = 0; i < FL_GEMV_MAX_N; i++) {
        if (i >= n) break;
        float v = acc[i];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        if (lane == 0) y[i * R + row] = fl_from_f32<T>(v + (bias ? fl_to_f32(bias[row]) : 0.f));
    }
}


// ---------------------------------------------------------------------------------------------
// Tensor-core GEMV for 16-bit weights (sm_80+): one block per 16-row tile of W, its WARPS warps
// splitting K. Each step of a warp covers 32 columns with two mma.sync.m16n8k16 (fp32
// accumulators): the 16 rows are the M side, the (up to 8) token rows the N side, so every
// token row comes from the same single read of W and the FMA work that limits the FMA kernel at
// n = 8 moves to the tensor cores. The sum over k does not care about the order of k, so each
// lane loads 16 contiguous bytes (8 columns) of its rows and of its token's x and uses them in
// fragment slots of the matching order: lane (g = lane/4, q = lane%4) holds columns 8q..8q+7
// of the 32-column chunk for rows g and g+8 (A) and for token g (B); mma #1 takes the first
// four of those columns in slots {2q, 2q+1, 2q+8, 2q+9}, mma #2 the last four. A and B use the
// same slot -> column map, so the product is the plain dot product. Tokens g >= n get zeros.
// The warps' partial tiles are summed through shared memory; lane (g, q) of warp 0 then holds
// rows g, g+8 x tokens 2q, 2q+1.
// Status: correct (tests, benchmark) and flat in n, but on an H200 it streams only 46-75% of
// the copy bandwidth (8 warps; cuBLAS 56-99%, dev/cuda/NOTES.md), so it is not on the default
// path. Open work: x staged once per block in shared memory (frees 16 registers per lane), more
// 16-byte loads in flight per SM, wider contiguous row segments per step.
// ---------------------------------------------------------------------------------------------
template <typename T, int WARPS, int U>
__global__ void __launch_bounds__(WARPS * 32)
gemv_mma_kernel(T *__restrict__ y, const T *__restrict__ x, const T *__restrict__ W, const T *__restrict__ bias,
                int n, int64_t R, int64_t C) {
    __shared__ float red[WARPS][4][32];
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, q = lane & 3;
    const int64_t r0 = (int64_t)blockIdx.x * 16;
    const int64_t ra = r0 + g < R ? r0 + g : R - 1, rb = r0 + g + 8 < R ? r0 + g + 8 : R - 1;
    const uint4 *wa = (const uint4 *)(W + ra * C) + q, *wb = (const uint4 *)(W + rb * C) + q;
    const bool has_x = g < n;
    const uint4 *xg = (const uint4 *)(x + (has_x ? g : 0) * C) + q;
    const int64_t nvec = C / 8, nchunk = (nvec + 3) / 4;  // 32-column chunks, the last maybe partial
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    const uint4 z = make_uint4(0, 0, 0, 0);
    for (int64_t c0 = (int64_t)warp * U; c0 < nchunk; c0 += WARPS * U) {
        uint4 va[U], vb[U], vx[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t v = (c0 + u) * 4;  // this lane's vector: v + q
            const bool ok = c0 + u < nchunk && v + q < nvec;
            va[u] = ok ? fl_ld_stream(wa + v) : z;
            vb[u] = ok ? fl_ld_stream(wb + v) : z;
            vx[u] = ok && has_x ? __ldg(xg + v) : z;
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            fl_mma_16816<T>(acc, va[u].x, vb[u].x, va[u].y, vb[u].y, vx[u].x, vx[u].y);
            fl_mma_16816<T>(acc, va[u].z, vb[u].z, va[u].w, vb[u].w, vx[u].z, vx[u].w);
        }
    }
#pragma unroll
    for (int k = 0; k < 4; k++) red[warp][k][lane] = acc[k];
    __syncthreads();
    if (warp != 0) return;
#pragma unroll
    for (int w = 1; w < WARPS; w++)
#pragma unroll
        for (int k = 0; k < 4; k++) acc[k] += red[w][k][lane];
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const int64_t row = r0 + g + (k >> 1) * 8;
        const int tok = 2 * q + (k & 1);
        if (row < R && tok < n) y[(int64_t)tok * R + row] = fl_from_f32<T>(acc[k] + (bias ? fl_to_f32(bias[row]) : 0.f));
    }
}

template <typename T, int WARPS>
static fl_status launch_gemv_mma(cudaStream_t st, T *y, const T *x, const T *W, const T *bias, int n, int64_t R, int64_t C) {
    const int64_t blocks = (R + 15) / 16;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "matmul: %lld rows is too many", (long long)R);
    FL_LAUNCH(gemv_mma_kernel<T, WARPS, 4>, dim3((unsigned)blocks), dim3(WARPS * 32), 0, st, y, x, W, bias, n, R, C);
    return FL_OK;
}

template <typename T, int N, int RPW, int U, int TAIL = GEMV_TAIL_PRED>
static fl_status launch_gemv_rpw(cudaStream_t st, T *y, const T *x, const T *W, const T *bias, int64_t R, int64_t C) {
    const int64_t warps = (R + RPW - 1) / RPW, per_block = GEMV_THREADS / 32;
    const int64_t blocks = (warps + per_block - 1) / per_block;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "matmul: %lld rows is too many", (long long)R);
    FL_LAUNCH(gemv_kernel<T, N, RPW, U, TAIL>, dim3((unsigned)blocks), dim3(GEMV_THREADS), 0, st, y, x, W, bias, R, C);
    return FL_OK;
}

// The variant when the caller does not choose, from the H200 measurements in dev/cuda/NOTES.md.
// Short matrices (qkv, o_proj, down of a 7B model) want the most warps in flight: one row per
// warp up to n = 3. Tall ones (gate|up, lm_head: R >= 16384) reuse each x load over four rows
// from n = 2 on. n = 4: two rows per warp with 16 loads in flight for short matrices with long
// rows (down: 2709 -> 3547 GB/s), four rows per warp otherwise. n >= 6 (only reached when
// FASTLOAD_GEMV_UP_TO raises the cuBLAS switch point): the tensor cores, as the FMA kernel is
// issue-bound there.
static inline int default_variant(int n, int64_t R, int64_t C, bool mma_ok) {
    const bool tall = R >= 16384;
    if (n == 1) return FL_GEMV_FMA1;
    if (n <= 3) return tall ? FL_GEMV_FMA4 : FL_GEMV_FMA1;
    if (n == 4) return !tall && C >= 8192 ? FL_GEMV_FMA2_U8 : FL_GEMV_FMA4;
    if (n >= 6 && mma_ok) return FL_GEMV_MMA8;
    return FL_GEMV_FMA4;
}

int fl_gemv_variant_from_name(const char *s) {
    static const struct { const char *name; int v; } t[] = {
        {"auto", FL_GEMV_AUTO}, {"fma1", FL_GEMV_FMA1}, {"fma2", FL_GEMV_FMA2}, {"fma4", FL_GEMV_FMA4},
        {"fma2x8", FL_GEMV_FMA2_U8}, {"fma1s", FL_GEMV_FMA1_SERIAL},
        {"mma4", FL_GEMV_MMA4}, {"mma8", FL_GEMV_MMA8},
    };
    for (size_t i = 0; i < sizeof t / sizeof *t; i++)
        if (!strcmp(s, t[i].name)) return t[i].v;
    return -1;
}

template <typename T, int N>
static fl_status launch_gemv_n(cudaStream_t st, T *y, const T *x, const T *W, const T *bias, int64_t R, int64_t C, int variant) {
    switch (variant) {
    case FL_GEMV_FMA1: return launch_gemv_rpw<T, N, 1, 8>(st, y, x, W, bias, R, C);
    case FL_GEMV_FMA2: return launch_gemv_rpw<T, N, 2, 4>(st, y, x, W, bias, R, C);
    case FL_GEMV_FMA4: return launch_gemv_rpw<T, N, 4, 2>(st, y, x, W, bias, R, C);
    case FL_GEMV_FMA2_U8: return launch_gemv_rpw<T, N, 2, 8>(st, y, x, W, bias, R, C);
    case FL_GEMV_FMA1_SERIAL: return launch_gemv_rpw<T, N, 1, 8, GEMV_TAIL_SERIAL>(st, y, x, W, bias, R, C);
    default: return fl_err(FL_E_VALUE, "gemv: variant %d unknown", variant);
    }
}

fl_status fl_cuda_gemv(cudaStream_t st, fl_dtype act, void *y, const void *x, int n, const void *W,
                       int64_t R, int64_t C, const void *bias, int variant) {
    if (n < 1 || n > FL_GEMV_MAX_N) return fl_err(FL_E_INTERNAL, "gemv: n=%d outside 1..%d", n, FL_GEMV_MAX_N);
    if (R <= 0) return FL_OK;
    FL_CUDA_DISPATCH(act, T, {
        T *yt = (T *)y;
        const T *xt = (const T *)x, *wt = (const T *)W, *bt = (const T *)bias;
        const bool vec = C % fl_vec<T>::EPV == 0 && fl_is_aligned16(x) && fl_is_aligned16(W);
        if (!vec) {
            const int64_t blocks = (R + GEMV_THREADS / 32 - 1) / (GEMV_THREADS / 32);
            FL_LAUNCH(gemv_scalar_kernel<T>, dim3((unsigned)blocks), dim3(GEMV_THREADS), 0, st, yt, xt, wt, bt, n, R, C);
            return FL_OK;
        }
        const bool mma_ok = sizeof(T) == 2 && fl_cuda_cc_major() >= 8;
        if (!variant) variant = default_variant(n, R, C, mma_ok);
        if (variant == FL_GEMV_MMA4 || variant == FL_GEMV_MMA8) {
            if (!mma_ok) return fl_err(FL_E_UNSUPPORTED, "gemv: the tensor-core variant needs 16-bit types and sm_80+");
            if constexpr (sizeof(T) == 2) {
                return variant == FL_GEMV_MMA4 ? launch_gemv_mma<T, 4>(st, yt, xt, wt, bt, n, R, C)
                                               : launch_gemv_mma<T, 8>(st, yt, xt, wt, bt, n, R, C);
            }
        }
        switch (n) {
        case 1: return launch_gemv_n<T, 1>(st, yt, xt, wt, bt, R, C, variant);
        case 2: return launch_gemv_n<T, 2>(st, yt, xt, wt, bt, R, C, variant);
        case 3: return launch_gemv_n<T, 3>(st, yt, xt, wt, bt, R, C, variant);
        case 4: return launch_gemv_n<T, 4>(st, yt, xt, wt, bt, R, C, variant);
        case 5: return launch_gemv_n<T, 5>(st, yt, xt, wt, bt, R, C, variant);
        case 6: return launch_gemv_n<T, 6>(st, yt, xt, wt, bt, R, C, variant);
        case 7: return launch_gemv_n<T, 7>(st, yt, xt, wt, bt, R, C, variant);
        default: return launch_gemv_n<T, 8>(st, yt, xt, wt, bt, R, C, variant);
        }
    });
    return FL_OK;
}

template <typename T, int N, int U>
static fl_status launch_gemv_glu(cudaStream_t st, T *y, const T *x, const T *W, int64_t F, int64_t C) {
    const int64_t per_block = GEMV_THREADS / 32, blocks = (F + per_block - 1) / per_block;
    if (blocks > INT32_MAX) return fl_err(FL_E_VALUE, "gemv_swiglu: %lld rows is too many", (long long)F);
    FL_LAUNCH((gemv_kernel<T, N, 2, U, GEMV_TAIL_PRED, true>), dim3((unsigned)blocks), dim3(GEMV_THREADS), 0, st, y, x,
              W, (const T *)nullptr, F, C);
    return FL_OK;
}

#define FL_GLU_N(N_) return u == 8 ? launch_gemv_glu<T, N_, 8>(st, yt, xt, wt, F, C) : launch_gemv_glu<T, N_, 4>(st, yt, xt, wt, F, C)
fl_status fl_cuda_gemv_swiglu(cudaStream_t st, fl_dtype act, void *y, const void *x, int n, const void *W, int64_t F,
                              int64_t C, int u) {
    if (n < 1 || n > FL_GEMV_GLU_MAX_N) return fl_err(FL_E_UNSUPPORTED, "gemv_swiglu: n=%d outside 1..%d", n, FL_GEMV_GLU_MAX_N);
    if (F <= 0) return FL_OK;
    FL_CUDA_DISPATCH(act, T, {
        if (C % fl_vec<T>::EPV || !fl_is_aligned16(x) || !fl_is_aligned16(W))
            return fl_err(FL_E_UNSUPPORTED, "gemv_swiglu: rows are not whole 16-byte vectors");
        T *yt = (T *)y;
        const T *xt = (const T *)x, *wt = (const T *)W;
        switch (n) {
        case 1: FL_GLU_N(1);
        case 2: FL_GLU_N(2);
        case 3: FL_GLU_N(3);
        default: FL_GLU_N(4);
        }
    });
    return FL_OK;
}
#undef FL_GLU_N

// ---------------------------------------------------------------------------------------------
// n > 8: cuBLAS. Column-major view: y^T[R, n] = W[C, R]^T-as-stored (op T) x x^T[C, n].
// ---------------------------------------------------------------------------------------------
template <typename T>
__global__ void add_bias_kernel(T *__restrict__ y, const T *__restrict__ bias, int n, int64_t R) {
    const int64_t total = (int64_t)n * R;
    for (int64_t k = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; k < total; k += (int64_t)gridDim.x * blockDim.x)
        y[k] = fl_from_f32<T>(fl_to_f32(y[k]) + fl_to_f32(bias[k % R]));
}

static cudaDataType_t cuda_type(fl_dtype t) {
    return t == FL_F16 ? CUDA_R_16F : t == FL_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

fl_status fl_cuda_matmul(cudaStream_t st, cublasHandle_t blas, fl_dtype act, void *y, const void *x, int n,
                         const void *W, int64_t R, int64_t C, const void *bias, int gemv_up_to, int gemv_variant) {
    if (n <= 0 || R <= 0) return FL_OK;
    if (act != FL_F16 && act != FL_BF16 && act != FL_F32)
        return fl_err(FL_E_UNSUPPORTED, "CUDA matmul: dtype %s is not supported", fl_cuda_dtype_name(act));
    if (gemv_up_to < 0) gemv_up_to = FL_MATMUL_GEMV_UP_TO;
    if (n <= gemv_up_to && n <= FL_GEMV_MAX_N) return fl_cuda_gemv(st, act, y, x, n, W, R, C, bias, gemv_variant);
    if (R > INT32_MAX || C > INT32_MAX)
        return fl_err(FL_E_VALUE, "matmul: %lld x %lld is beyond cuBLAS' int sizes", (long long)R, (long long)C);
    const float alpha = 1.f, beta = 0.f;
    const cudaDataType_t t = cuda_type(act);
    FL_CUBLAS_CHECK(cublasGemmEx(blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)R, n, (int)C, &alpha, W, t, (int)C, x, t, (int)C,
                                 &beta, y, t, (int)R, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
    if (bias) {
        const int64_t total = (int64_t)n * R;
        int64_t blocks = (total + 255) / 256;
        if (blocks > 65535 * 16) blocks = 65535 * 16;
        FL_CUDA_DISPATCH(act, T, add_bias_kernel<T><<<(unsigned)blocks, 256, 0, st>>>((T *)y, (const T *)bias, n, R););
        FL_CUDA_CHECK_LAUNCH();
    }
    return FL_OK;
}
