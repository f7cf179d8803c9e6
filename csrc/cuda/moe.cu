// moe.cu: Mixture of Experts kernels (see moe.cuh). Every kernel is launched with fl_launch (PDL where
// enabled) and waits for its predecessor before reading anything: all of them read activations or routing.
#include "moe.cuh"
#include "cuda_common.cuh"

#define MOE_MAX_E 256
#define MOE_MAX_K 16
#define MOE_PER_LANE (MOE_MAX_E / 32)

// One warp per token: the token's E logits in registers (MOE_PER_LANE per lane), softmax, k rounds of a warp
// argmax (largest value, then lowest index), lane 0 writes.
template <typename T>
__global__ void moe_route_kernel(int32_t *__restrict__ ids, float *__restrict__ wts, const T *__restrict__ logits,
                                 int n, int E, int k, int norm) {
    fl_pdl_wait();
    fl_pdl_launch_dependents();
    const int lane = threadIdx.x & 31;
    const int tok = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    if (tok >= n) return;
    const T *l = logits + (int64_t)tok * E;
    float p[MOE_PER_LANE];
    float mx = -INFINITY;
#pragma unroll
    for (int i = 0; i < MOE_PER_LANE; i++) {
        const int e = lane + 32 * i;
        p[i] = e < E ? fl_to_f32(l[e]) : -INFINITY;
        mx = fmaxf(mx, p[i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < MOE_PER_LANE; i++) {
        p[i] = lane + 32 * i < E ? expf(p[i] - mx) : 0.f;
        sum += p[i];
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
#pragma unroll
    for (int i = 0; i < MOE_PER_LANE; i++) {  // -1: not an expert; NaN logits: 0, so k distinct experts are chosen
        const float v = p[i] / sum;
        p[i] = lane + 32 * i < E ? (v >= 0.f ? v : 0.f) : -1.f;
    }
    float tot = 0.f, chosen_w[MOE_MAX_K];
    int chosen_e[MOE_MAX_K];
    for (int j = 0; j < k; j++) {
        float bv = -1.f;
        int be = 1 << 30;
#pragma unroll
        for (int i = 0; i < MOE_PER_LANE; i++)
            if (p[i] > bv) { bv = p[i]; be = lane + 32 * i; }  // ascending e per lane: the first of equals stays
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oe = __shfl_xor_sync(0xffffffffu, be, o);
            if (ov > bv || (ov == bv && oe < be)) { bv = ov; be = oe; }
        }
#pragma unroll
        for (int i = 0; i < MOE_PER_LANE; i++)
            if (lane + 32 * i == be) p[i] = -1.f;
        chosen_e[j] = be;
        chosen_w[j] = bv;
        tot += bv;
    }
    if (lane == 0)
        for (int j = 0; j < k; j++) {
            ids[(int64_t)tok * k + j] = chosen_e[j];
            wts[(int64_t)tok * k + j] = norm ? chosen_w[j] / tot : chosen_w[j];
        }
}

fl_status fl_cuda_moe_route(cudaStream_t st, fl_dtype act, int32_t *ids, float *wts, const void *logits, int n, int E,
                            int k, int norm) {
    if (n <= 0) return FL_OK;
    if (E < 1 || E > MOE_MAX_E || k < 1 || k > MOE_MAX_K || k > E)
        return fl_err(FL_E_VALUE, "moe_route: %d experts, top %d (at most %d, %d)", E, k, MOE_MAX_E, MOE_MAX_K);
    const int warps = 4;
    const unsigned blocks = (unsigned)((n + warps - 1) / warps);
    FL_CUDA_DISPATCH(act, T, FL_LAUNCH(moe_route_kernel<T>, dim3(blocks), dim3(32 * warps), 0, st, ids, wts,
                                       (const T *)logits, n, E, k, norm););
    return FL_OK;
}

// One block: counts per expert in shared memory, offsets and the active list by thread 0, then every slot takes
// its place with an atomic (the order within an expert is arbitrary: each row's result does not depend on it).
__global__ void moe_group_kernel(const int32_t *__restrict__ ids, int nk, int E, int32_t *__restrict__ offs,
                                 int32_t *__restrict__ perm, int32_t *__restrict__ inv) {
    __shared__ int cnt[MOE_MAX_E], cur[MOE_MAX_E];
    fl_pdl_wait();
    fl_pdl_launch_dependents();
    for (int e = threadIdx.x; e < E; e += blockDim.x) cnt[e] = 0;
    __syncthreads();
    for (int s = threadIdx.x; s < nk; s += blockDim.x) {
        const int e = min(max(ids[s], 0), E - 1);  // ids come from moe_route: in range
        atomicAdd(&cnt[e], 1);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        int acc = 0, na = 0;
        for (int e = 0; e < E; e++) {
            offs[e] = acc;
            cur[e] = acc;
            if (cnt[e]) offs[E + 1 + na++] = e;
            acc += cnt[e];
        }
        offs[E] = acc;
        offs[2 * E + 1] = na;
    }
    __syncthreads();
    for (int s = threadIdx.x; s < nk; s += blockDim.x) {
        const int e = min(max(ids[s], 0), E - 1);
        const int p = atomicAdd(&cur[e], 1);
        perm[p] = s;
        inv[s] = p;
    }
}

fl_status fl_cuda_moe_group(cudaStream_t st, const int32_t *ids, int nk, int E, int32_t *offs, int32_t *perm,
                            int32_t *inv) {
    if (E < 1 || E > MOE_MAX_E) return fl_err(FL_E_VALUE, "moe_group: %d experts (at most %d)", E, MOE_MAX_E);
    FL_LAUNCH(moe_group_kernel, dim3(1), dim3(1024), 0, st, ids, nk, E, offs, perm, inv);
    return FL_OK;
}

// The grouped GEMV. Block (bx, a): expert e = the a-th active one; 4 warps, one output row each; the slots of e
// in passes of NT: each lane streams its share of the row's 16-byte vectors once per pass and dots them with the
// NT slots' inputs (small, cached). VEC false: element-wise (C not a multiple of the vector, or misaligned).
#define MOE_GEMV_WARPS 4
#define MOE_NT 8
template <typename T, bool VEC>
__global__ void __launch_bounds__(MOE_GEMV_WARPS * 32)
moe_gemv_kernel(T *__restrict__ y, const T *__restrict__ x, const int32_t *__restrict__ perm, int x_div,
                const int32_t *__restrict__ offs, int E, const T *__restrict__ W, int64_t R, int64_t C) {
    fl_pdl_wait();
    fl_pdl_launch_dependents();
    const int a = blockIdx.y;
    if (a >= offs[2 * E + 1]) return;  // fewer experts have slots than the grid allows for
    const int e = offs[E + 1 + a];
    const int p0 = offs[e], p1 = offs[e + 1];
    const int lane = threadIdx.x & 31;
    const int64_t r = (int64_t)blockIdx.x * MOE_GEMV_WARPS + threadIdx.x / 32;
    if (r >= R) return;
    const T *w = W + ((int64_t)e * R + r) * C;
    for (int q0 = p0; q0 < p1; q0 += MOE_NT) {
        const int nt = min(MOE_NT, p1 - q0);
        const T *xr[MOE_NT];
#pragma unroll
        for (int t = 0; t < MOE_NT; t++) {
            const int p = q0 + (t < nt ? t : 0);
            xr[t] = x + (int64_t)(perm ? perm[p] / x_div : p) * C;
        }
        float acc[MOE_NT];
#pragma unroll
        for (int t = 0; t < MOE_NT; t++) acc[t] = 0.f;
        if (VEC) {
            constexpr int EPV = fl_vec<T>::EPV, U = 4;  // U vectors per lane in flight
            const int64_t nv = C / EPV;
            const uint4 *wv = (const uint4 *)w;
            const bool once = nt == p1 - p0;  // one pass over the row: stream it past L1
            auto fma_vec = [&](const uint4 &wq, int64_t v) {
                float wf[EPV];
                fl_vec_to_f32<T>(wq, wf);
#pragma unroll
                for (int t = 0; t < MOE_NT; t++) {
                    if (t >= nt) break;
                    float xf[EPV];
                    fl_vec_to_f32<T>(__ldg((const uint4 *)xr[t] + v), xf);
#pragma unroll
                    for (int i = 0; i < EPV; i++) acc[t] = fmaf(wf[i], xf[i], acc[t]);
                }
            };
            int64_t v = lane;
            for (; v + 32 * (U - 1) < nv; v += 32 * U) {
                uint4 wq[U];
#pragma unroll
                for (int u = 0; u < U; u++) wq[u] = once ? fl_ld_stream(wv + v + 32 * u) : __ldg(wv + v + 32 * u);
#pragma unroll
                for (int u = 0; u < U; u++) fma_vec(wq[u], v + 32 * u);
            }
            for (; v < nv; v += 32) fma_vec(once ? fl_ld_stream(wv + v) : __ldg(wv + v), v);
        } else {
            for (int64_t c = lane; c < C; c += 32) {
                const float wc = fl_to_f32(w[c]);
#pragma unroll
                for (int t = 0; t < MOE_NT; t++) {
                    if (t >= nt) break;
                    acc[t] = fmaf(wc, fl_to_f32(xr[t][c]), acc[t]);
                }
            }
        }
#pragma unroll
        for (int t = 0; t < MOE_NT; t++) {
            float v = acc[t];
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            if (lane == 0 && t < nt) y[(int64_t)(q0 + t) * R + r] = fl_from_f32<T>(v);
        }
    }
}

fl_status fl_cuda_moe_gemv(cudaStream_t st, fl_dtype act, void *y, const void *x, const int32_t *perm, int x_div,
                           const int32_t *offs, int E, int max_active, const void *W, int64_t R, int64_t C) {
    if (R <= 0 || max_active <= 0) return FL_OK;
    if (max_active > E) max_active = E;
    const int64_t bx = (R + MOE_GEMV_WARPS - 1) / MOE_GEMV_WARPS;
    if (bx > INT32_MAX || max_active > 65535) return fl_err(FL_E_VALUE, "moe_gemv: %lld rows is too many", (long long)R);
    const dim3 grid((unsigned)bx, (unsigned)max_active);
    FL_CUDA_DISPATCH(act, T, {
        const bool vec = C % fl_vec<T>::EPV == 0 && fl_is_aligned16(x) && fl_is_aligned16(W);
        if (vec)
            FL_LAUNCH(moe_gemv_kernel<T, true>, grid, dim3(MOE_GEMV_WARPS * 32), 0, st, (T *)y, (const T *)x, perm, x_div,
                      offs, E, (const T *)W, R, C);
        else
            FL_LAUNCH(moe_gemv_kernel<T, false>, grid, dim3(MOE_GEMV_WARPS * 32), 0, st, (T *)y, (const T *)x, perm,
                      x_div, offs, E, (const T *)W, R, C);
    });
    return FL_OK;
}

template <typename T>
__global__ void moe_gather_kernel(T *__restrict__ xs, const T *__restrict__ x, const int32_t *__restrict__ perm, int k,
                                  int nk, int64_t d) {
    fl_pdl_wait();
    fl_pdl_launch_dependents();
    for (int p = blockIdx.x; p < nk; p += gridDim.x) {
        const T *src = x + (int64_t)(perm[p] / k) * d;
        T *dst = xs + (int64_t)p * d;
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) dst[c] = src[c];
    }
}

fl_status fl_cuda_moe_gather(cudaStream_t st, fl_dtype act, void *xs, const void *x, const int32_t *perm, int k,
                             int nk, int64_t d) {
    if (nk <= 0) return FL_OK;
    const unsigned blocks = (unsigned)(nk < 65535 ? nk : 65535);
    FL_CUDA_DISPATCH(act, T, FL_LAUNCH(moe_gather_kernel<T>, dim3(blocks), dim3(256), 0, st, (T *)xs, (const T *)x,
                                       perm, k, nk, d););
    return FL_OK;
}

// One block per token: its k slots ordered by expert id (insertion sort, k <= 16) in shared memory, then each
// thread sums its columns.
template <typename T>
__global__ void moe_combine_kernel(T *__restrict__ out, const T *__restrict__ y, const int32_t *__restrict__ ids,
                                   const float *__restrict__ wts, const int32_t *__restrict__ inv, int n, int k,
                                   int64_t d) {
    __shared__ int row[MOE_MAX_K];
    __shared__ float wt[MOE_MAX_K];
    fl_pdl_wait();
    fl_pdl_launch_dependents();
    for (int i = blockIdx.x; i < n; i += gridDim.x) {
        __syncthreads();  // row / wt of the previous token are no longer read
        if (threadIdx.x == 0) {
            int ord[MOE_MAX_K];
            for (int j = 0; j < k; j++) {
                int b = j;
                while (b > 0 && ids[(int64_t)i * k + ord[b - 1]] > ids[(int64_t)i * k + j]) { ord[b] = ord[b - 1]; b--; }
                ord[b] = j;
            }
            for (int j = 0; j < k; j++) {
                const int64_t s = (int64_t)i * k + ord[j];
                row[j] = inv[s];
                wt[j] = wts[s];
            }
        }
        __syncthreads();
        for (int64_t c = threadIdx.x; c < d; c += blockDim.x) {
            float acc = 0.f;
            for (int j = 0; j < k; j++) acc += wt[j] * fl_to_f32(y[(int64_t)row[j] * d + c]);
            out[(int64_t)i * d + c] = fl_from_f32<T>(acc);
        }
    }
}

fl_status fl_cuda_moe_combine(cudaStream_t st, fl_dtype act, void *out, const void *y, const int32_t *ids,
                              const float *wts, const int32_t *inv, int n, int k, int64_t d) {
    if (n <= 0) return FL_OK;
    if (k < 1 || k > MOE_MAX_K) return fl_err(FL_E_VALUE, "moe_combine: top %d (at most %d)", k, MOE_MAX_K);
    const unsigned blocks = (unsigned)(n < 65535 ? n : 65535);
    FL_CUDA_DISPATCH(act, T, FL_LAUNCH(moe_combine_kernel<T>, dim3(blocks), dim3(256), 0, st, (T *)out, (const T *)y,
                                       ids, wts, inv, n, k, d););
    return FL_OK;
}
