// norm.cu: row-wise activation ops (see norm.cuh). One kernel template per op over the element
// type T; each takes the 16-byte vector path when the row length and the pointers allow it and
// an element path otherwise (odd hidden sizes stay correct, only slower).
#include "norm.cuh"
#include "cuda_common.cuh"
#include "qx.cuh"

#define ROW_THREADS 256

// ---------------------------------------------------------------------------------------------
// embedding gather: one block per token row
// ---------------------------------------------------------------------------------------------
template <typename T, bool VEC>
__global__ void embed_kernel(T *__restrict__ x, const int32_t *__restrict__ tok, const T *__restrict__ emb,
                             int64_t vocab, int64_t d) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // the token ids come from the previous step's sampling
    const int i = blockIdx.x;
    const int32_t t = tok[i];
    T *xr = x + (int64_t)i * d;
    const bool ok = t >= 0 && t < vocab;
    const T *er = emb + (ok ? (int64_t)t : 0) * d;
    if (VEC) {
        const int64_t nv = d / fl_vec<T>::EPV;
        for (int64_t v = threadIdx.x; v < nv; v += blockDim.x)
            ((uint4 *)xr)[v] = ok ? ((const uint4 *)er)[v] : make_uint4(0, 0, 0, 0);
    } else {
        for (int64_t k = threadIdx.x; k < d; k += blockDim.x) xr[k] = ok ? er[k] : fl_from_f32<T>(0.f);
    }
}

fl_status fl_cuda_embed(cudaStream_t st, fl_dtype act, void *x, const int32_t *tok, int n,
                        const void *emb, int64_t vocab, int64_t d) {
    if (n <= 0) return FL_OK;
    FL_CUDA_DISPATCH(act, T, {
        const bool vec = d % fl_vec<T>::EPV == 0 && fl_is_aligned16(x) && fl_is_aligned16(emb);
        if (vec) FL_LAUNCH(embed_kernel<T, true>, dim3(n), dim3(ROW_THREADS), 0, st, (T *)x, tok, (const T *)emb, vocab, d);
        else FL_LAUNCH(embed_kernel<T, false>, dim3(n), dim3(ROW_THREADS), 0, st, (T *)x, tok, (const T *)emb, vocab, d);
    });
    return FL_OK;
}

// ---------------------------------------------------------------------------------------------
// RMSNorm, optionally fused with the residual add: one block per row, two passes over the row
// (the second hits L1/L2). With ADD, pass 1 writes resid = round(resid + delta) and the norm is
// taken of that rounded value, which is what the model keeps.
// ---------------------------------------------------------------------------------------------
// QB (4 or 8, | FL_QX8 for int8 x; VEC with 8 elements per vector only): also write out as the dp2a GEMV's x (qx.cuh).
// CACHED (VEC, d / E <= RMS_RV * blockDim.x): each thread holds its vectors in registers from the first pass to the
// second, all of a thread's loads are issued at once (the norm weights before fl_pdl_wait: they are weights), so a
// row costs one memory round trip. (The looping form below stores resid between loads of the same array, which
// keeps a later vector's loads behind an earlier one's stores, and it re-reads the row for pass 2.)
#define RMS_RV 4
#define RMS_CACHED_THREADS 512
template <typename T, bool VEC, bool ADD, int QB, bool CACHED>
__global__ void __launch_bounds__(RMS_CACHED_THREADS) rmsnorm_kernel(T *__restrict__ out, T *resid, const T *x,
                                                                     const T *__restrict__ delta, const T *__restrict__ w,
                                                                     int64_t d, float eps, fl_qx_dst qd) {
    __shared__ float red[32];
    fl_pdl_launch_dependents();
    constexpr int E = fl_vec<T>::EPV;
    if constexpr (CACHED) {
        const int64_t row = blockIdx.x, nv = d / E;
        uint4 wv[RMS_RV], xv[RMS_RV], dv[RMS_RV];
#pragma unroll
        for (int k = 0; k < RMS_RV; k++) {
            const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
            if (v < nv) wv[k] = __ldg((const uint4 *)w + v);
        }
        fl_pdl_wait();
        const T *xr = ADD ? resid + row * d : x + row * d;
#pragma unroll
        for (int k = 0; k < RMS_RV; k++) {
            const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
            if (v < nv) {
                xv[k] = ((const uint4 *)xr)[v];
                if (ADD) dv[k] = ((const uint4 *)(delta + row * d))[v];
            }
        }
        float ss = 0.f;
#pragma unroll
        for (int k = 0; k < RMS_RV; k++) {
            const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
            if (v < nv) {
                float a[E];
                fl_vec_to_f32<T>(xv[k], a);
                if (ADD) {
                    float b[E];
                    fl_vec_to_f32<T>(dv[k], b);
#pragma unroll
                    for (int e = 0; e < E; e++) a[e] += b[e];
                    xv[k] = fl_f32_to_vec<T>(a);  // the rounded sum is what the model keeps, and what is normed
                    ((uint4 *)(resid + row * d))[v] = xv[k];
                    fl_vec_to_f32<T>(xv[k], a);
                }
#pragma unroll
                for (int e = 0; e < E; e++) ss += a[e] * a[e];
            }
        }
        const float r = rsqrtf(fl_block_sum(ss, red) / (float)d + eps);
#pragma unroll
        for (int k = 0; k < RMS_RV; k++) {  // the same trip count on every lane: fl_qx_store8 shuffles across lanes
            const int64_t v = threadIdx.x + (int64_t)k * blockDim.x;
            const bool on = v < nv;
            float a[E] = {};
            if (on) {
                float g[E];
                fl_vec_to_f32<T>(xv[k], a);
                fl_vec_to_f32<T>(wv[k], g);
#pragma unroll
                for (int e = 0; e < E; e++) a[e] = g[e] * (a[e] * r);
                const uint4 o = fl_f32_to_vec<T>(a);
                ((uint4 *)(out + row * d))[v] = o;
                if constexpr (QB != 0) fl_vec_to_f32<T>(o, a);
            }
            if constexpr (QB != 0 && E == 8) fl_qx_store8<QB>(qd.xq, qd.xd, a, row * d + v * E, d, on);
        }
        return;
    }
    fl_pdl_wait();
    const int64_t row = blockIdx.x;
    // The input row: resid (read and written by this kernel, so no read-only path) or x.
    const T *xr = ADD ? resid + row * d : x + row * d;
    T *outr = out + row * d;
    float ss = 0.f;
    if (VEC) {
        const int64_t nv = d / E;
        for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
            float a[E];
            fl_vec_to_f32<T>(((const uint4 *)xr)[v], a);
            if (ADD) {
                float b[E];
                fl_vec_to_f32<T>(((const uint4 *)(delta + row * d))[v], b);
#pragma unroll
                for (int k = 0; k < E; k++) a[k] += b[k];
                const uint4 r = fl_f32_to_vec<T>(a);
                ((uint4 *)(resid + row * d))[v] = r;
                fl_vec_to_f32<T>(r, a);
            }
#pragma unroll
            for (int k = 0; k < E; k++) ss += a[k] * a[k];
        }
    } else {
        for (int64_t k = threadIdx.x; k < d; k += blockDim.x) {
            float a = fl_to_f32(xr[k]);
            if (ADD) {
                const T r = fl_from_f32<T>(a + fl_to_f32(delta[row * d + k]));
                resid[row * d + k] = r;
                a = fl_to_f32(r);
            }
            ss += a * a;
        }
    }
    const float r = rsqrtf(fl_block_sum(ss, red) / (float)d + eps);
    // Pass 2: each thread re-reads exactly the elements it wrote in pass 1 (same loop), so the
    // writes to resid are visible to it without a barrier.
    if (VEC) {
        // The loop bound is the same on every lane: with QB, fl_qx_store8 shuffles across lanes (d % fl_qx_cols(QB) == 0).
        const int64_t nv = d / E;
        for (int64_t v0 = 0; v0 < nv; v0 += blockDim.x) {
            const int64_t v = v0 + threadIdx.x;
            const bool on = v < nv;
            float a[E] = {};  // lanes past the row give zeros to the int16 copy
            if (on) {
                float g[E];
                fl_vec_to_f32<T>(((const uint4 *)xr)[v], a);
                fl_vec_to_f32<T>(((const uint4 *)w)[v], g);
#pragma unroll
                for (int k = 0; k < E; k++) a[k] = g[k] * (a[k] * r);
                const uint4 o = fl_f32_to_vec<T>(a);
                ((uint4 *)outr)[v] = o;
                if constexpr (QB != 0) fl_vec_to_f32<T>(o, a);  // the int16 copy is of the rounded output
            }
            if constexpr (QB != 0 && E == 8) fl_qx_store8<QB>(qd.xq, qd.xd, a, row * d + v * E, d, on);
        }
    } else {
        for (int64_t k = threadIdx.x; k < d; k += blockDim.x)
            outr[k] = fl_from_f32<T>(fl_to_f32(w[k]) * (fl_to_f32(xr[k]) * r));
    }
}

template <typename T, bool ADD>
static fl_status launch_rmsnorm(cudaStream_t st, void *out, void *resid, const void *x, const void *delta,
                                const void *w, int n, int64_t d, float eps, const fl_qx_dst &qd) {
    const bool vec = d % fl_vec<T>::EPV == 0 && fl_is_aligned16(out) && fl_is_aligned16(w) &&
                     (ADD ? fl_is_aligned16(resid) && fl_is_aligned16(delta) : fl_is_aligned16(x));
    const int qb = vec && fl_vec<T>::EPV == 8 && d % fl_qx_cols(qd.bits) == 0 ? qd.bits : 0;
    if (qd.bits && !qb) return fl_err(FL_E_INTERNAL, "rmsnorm: the dp2a GEMV's x cannot be written for d = %lld", (long long)d);
    const bool cached = vec && d / fl_vec<T>::EPV <= (int64_t)RMS_RV * RMS_CACHED_THREADS;
#define FL_RMS(VEC_, QB_, C_) FL_LAUNCH((rmsnorm_kernel<T, VEC_, ADD, QB_, C_>), dim3(n), dim3(C_ ? RMS_CACHED_THREADS : ROW_THREADS), 0, st, (T *)out, (T *)resid, (const T *)x, (const T *)delta, (const T *)w, d, eps, qd)
    if (qb)
        return fl_qx_dispatch(qb, "rmsnorm", [&](auto QB) -> fl_status {
            if (cached) FL_RMS(true, decltype(QB)::value, true);
            else FL_RMS(true, decltype(QB)::value, false);
            return FL_OK;
        });
    if (cached) FL_RMS(true, 0, true);
    else if (vec) FL_RMS(true, 0, false);
    else FL_RMS(false, 0, false);
#undef FL_RMS
    return FL_OK;
}

fl_status fl_cuda_rmsnorm(cudaStream_t st, fl_dtype act, void *out, const void *x, const void *w,
                          int n, int64_t d, float eps, const fl_qx_dst &qd) {
    if (n <= 0) return FL_OK;
    FL_CUDA_DISPATCH(act, T, return launch_rmsnorm<T, false>(st, out, NULL, x, NULL, w, n, d, eps, qd););
    return FL_OK;
}

fl_status fl_cuda_add_rmsnorm(cudaStream_t st, fl_dtype act, void *out, void *resid, const void *delta,
                              const void *w, int n, int64_t d, float eps, const fl_qx_dst &qd) {
    if (n <= 0) return FL_OK;
    FL_CUDA_DISPATCH(act, T, return launch_rmsnorm<T, true>(st, out, resid, NULL, delta, w, n, d, eps, qd););
    return FL_OK;
}

// ---------------------------------------------------------------------------------------------
// SwiGLU: out[i, k] = silu(g) * u with g = gu[i, k], u = gu[i, f + k]; grid-stride over n*f.
// ---------------------------------------------------------------------------------------------

// QB (4 or 8, | FL_QX8; VEC with 8 elements per vector, f % 32 == 0): out is also written as the dp2a GEMV's x
// (qx.cuh). The loop bound is the same on every lane of a warp (fl_qx_store8 shuffles within lane groups).
template <typename T, bool VEC, int QB>
__global__ void swiglu_kernel(T *__restrict__ out, const T *__restrict__ gu, int n, int64_t f, fl_qx_dst qd) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    constexpr int E = fl_vec<T>::EPV;
    const int64_t per_row = VEC ? f / E : f, total = (int64_t)n * per_row, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t lane = threadIdx.x & 31;
    for (int64_t v0 = (int64_t)blockIdx.x * blockDim.x + (threadIdx.x - lane); v0 < total; v0 += stride) {
        const int64_t v = v0 + lane;
        const bool on = v < total;
        const int64_t i = on ? v / per_row : 0, k = on ? v - i * per_row : 0;
        const T *g = gu + i * 2 * f, *u = g + f;
        if (VEC) {
            float a[E] = {};  // lanes past the end give zeros to the int16 copy
            if (on) {
                float b[E];
                fl_vec_to_f32<T>(((const uint4 *)g)[k], a);
                fl_vec_to_f32<T>(((const uint4 *)u)[k], b);
#pragma unroll
                for (int e = 0; e < E; e++) a[e] = fl_silu_mul(a[e], b[e]);
                const uint4 o = fl_f32_to_vec<T>(a);
                ((uint4 *)(out + i * f))[k] = o;
                if constexpr (QB != 0) fl_vec_to_f32<T>(o, a);
            }
            if constexpr (QB != 0 && E == 8) fl_qx_store8<QB>(qd.xq, qd.xd, a, on ? v * 8 : 0, f, on);
        } else if (on) {
            out[i * f + k] = fl_from_f32<T>(fl_silu_mul(fl_to_f32(g[k]), fl_to_f32(u[k])));
        }
    }
}

fl_status fl_cuda_swiglu(cudaStream_t st, fl_dtype act, void *out, const void *gu, int n, int64_t f, const fl_qx_dst &qd) {
    if (n <= 0 || f <= 0) return FL_OK;
#define FL_SWIGLU(VEC_, QB_) FL_LAUNCH((swiglu_kernel<T, VEC_, QB_>), dim3((unsigned)blocks), dim3(ROW_THREADS), 0, st, (T *)out, (const T *)gu, n, f, qd)
    FL_CUDA_DISPATCH(act, T, {
        const bool vec = f % fl_vec<T>::EPV == 0 && fl_is_aligned16(out) && fl_is_aligned16(gu);
        const int64_t work = (int64_t)n * (vec ? f / fl_vec<T>::EPV : f);
        int64_t blocks = (work + ROW_THREADS - 1) / ROW_THREADS;
        if (blocks > 65535 * 16) blocks = 65535 * 16;
        const int qb = vec && fl_vec<T>::EPV == 8 && f % fl_qx_cols(qd.bits) == 0 ? qd.bits : 0;
        if (qd.bits && !qb) return fl_err(FL_E_INTERNAL, "swiglu: the dp2a GEMV's x cannot be written for f = %lld", (long long)f);
        if (qb)
            return fl_qx_dispatch(qb, "swiglu", [&](auto QB) -> fl_status {
                FL_SWIGLU(true, decltype(QB)::value);
                return FL_OK;
            });
        if (vec) FL_SWIGLU(true, 0);
        else FL_SWIGLU(false, 0);
    });
#undef FL_SWIGLU
    return FL_OK;
}

// ---------------------------------------------------------------------------------------------
// Row gather with the row list in the kernel's arguments, FL_GATHER_CHUNK rows per launch.
// ---------------------------------------------------------------------------------------------
#define FL_GATHER_CHUNK 256
struct gather_rows_arg { int32_t r[FL_GATHER_CHUNK]; };

template <typename T, bool VEC>
__global__ void gather_rows_kernel(T *__restrict__ dst, const T *__restrict__ src, const gather_rows_arg rows, int64_t d) {
    fl_pdl_launch_dependents();
    fl_pdl_wait();
    const int i = blockIdx.x;
    const T *s = src + (int64_t)rows.r[i] * d;
    T *o = dst + (int64_t)i * d;
    if (VEC) {
        for (int64_t v = threadIdx.x; v < d / fl_vec<T>::EPV; v += blockDim.x) ((uint4 *)o)[v] = ((const uint4 *)s)[v];
    } else {
        for (int64_t k = threadIdx.x; k < d; k += blockDim.x) o[k] = s[k];
    }
}

fl_status fl_cuda_gather_rows(cudaStream_t st, fl_dtype act, void *dst, const void *src,
                              const int32_t *rows_h, int n, int64_t d) {
    for (int i0 = 0; i0 < n; i0 += FL_GATHER_CHUNK) {
        const int cnt = n - i0 < FL_GATHER_CHUNK ? n - i0 : FL_GATHER_CHUNK;
        gather_rows_arg a;
        memset(&a, 0, sizeof a);
        for (int i = 0; i < cnt; i++) {
            if (rows_h[i0 + i] < 0) return fl_err(FL_E_VALUE, "gather_rows: row %d is negative", (int)rows_h[i0 + i]);
            a.r[i] = rows_h[i0 + i];
        }
        FL_CUDA_DISPATCH(act, T, {
            T *o = (T *)dst + (int64_t)i0 * d;
            const bool vec = d % fl_vec<T>::EPV == 0 && fl_is_aligned16(dst) && fl_is_aligned16(src);
            if (vec) FL_LAUNCH(gather_rows_kernel<T, true>, dim3(cnt), dim3(ROW_THREADS), 0, st, o, (const T *)src, a, d);
            else FL_LAUNCH(gather_rows_kernel<T, false>, dim3(cnt), dim3(ROW_THREADS), 0, st, o, (const T *)src, a, d);
        });
    }
    return FL_OK;
}
