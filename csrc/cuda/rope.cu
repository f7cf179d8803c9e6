// rope.cu: rotary embedding fused with the KV-cache store (see rope.cuh).
// One block per token: the block first fills cos/sin of its position for the hd/2 frequencies
// into shared memory (NORM, Qwen3: and each warp takes q / k heads and puts 1 / rms of each head
// there too), then rotates every q and k head of the token's row in place (NORM: the head scaled
// by its 1 / rms and by q_norm / k_norm first), writing the rotated k (and the untouched v) into
// the cache slot.
#include "rope.cuh"
#include "cuda_common.cuh"

#define ROPE_THREADS 1024  /* one block per token; with ROPE_PP values a thread, 4096 pairs in one round trip */
#define ROPE_PP 4

// Dynamic NTK rope (fl_rope_dyn): frequency i of a row of rope length L > max_pos, as transformers computes it in
// float32 (every step rounded as torch's: explicit _rn intrinsics, which --use_fast_math leaves alone, and the powers
// in double rounded once, so they are the correctly rounded float32 powers, as glibc's powf on the CPU)
__device__ __forceinline__ float dyn_inv_freq(const fl_rope_dyn &d, int L, int hd, int i) {
    float t = __fmul_rn(d.factor, (float)L);
    t = __fdiv_rn(t, (float)d.max_pos);
    t = __fsub_rn(t, (float)((double)d.factor - 1.0));
    const float ex = (float)((double)hd / (double)(hd - 2));
    const float base = __fmul_rn(d.theta, (float)pow((double)t, (double)ex));
    const float e = __fdiv_rn((float)(2 * i), (float)hd);
    return __fdiv_rn(1.0f, (float)pow((double)base, (double)e));
}

// rd: rotated dims per head (hd: all); INTER: pairs (2i, 2i + 1), else (i, i + rd/2); round_cs: cos / sin rounded
// to T before use (ChatGLM's rope cache in the model dtype).
template <typename T, bool NORM, bool INTER>
__global__ void __launch_bounds__(ROPE_THREADS) rope_store_kernel(T *__restrict__ qkv, int n_new, int start, const int32_t *__restrict__ start_d,
                                  const int32_t *__restrict__ pos, const float *__restrict__ inv_freq,
                                  T *__restrict__ kcache, T *__restrict__ vcache, int max_len, int nh, int nkv, int hd,
                                  float *__restrict__ table, int table_mode, const fl_kv_paging pg,
                                  const T *__restrict__ qk_norm, float eps, int rd, int round_cs,
                                  const fl_rope_dyn dyn) {
    extern __shared__ float cs[];  // [half] cos, then [half] sin; NORM: then [nh + nkv] 1 / rms of each q and k head
    fl_pdl_launch_dependents();
    fl_pdl_wait();  // positions and q|k|v come from earlier kernels
    const int half = rd / 2;  // frequencies; NORM implies rd == hd (the host checks)
    float *sn = cs + half;
    const int bt = blockIdx.x, b = bt / n_new, t = bt % n_new;
    T *row = qkv + (int64_t)bt * (nh + 2 * nkv) * hd;
    const float p = table_mode == FL_ROPE_TABLE_READ ? 0.f : (float)pos[bt];
    if (table_mode == FL_ROPE_TABLE_READ) {
        // cos/sin of this token's position, made by layer 0's launch of this forward.
        for (int i = threadIdx.x; i < rd; i += blockDim.x) cs[i] = table[(int64_t)bt * hd + i];
    } else {
        // dynamic NTK rope: this row's length decides its frequencies (past max_pos)
        const int L = dyn.factor > 0.f ? (dyn.len_d ? dyn.len_d[b] : pos[bt] + 1) : 0;
        const bool dynf = dyn.factor > 0.f && L > dyn.max_pos;
        for (int i = threadIdx.x; i < half; i += blockDim.x) {
            // The angle as a float32 product, as the CPU backend and transformers compute it; its
            // cos/sin in double precision (untouched by --use_fast_math, unlike sinf/cosf, whose
            // fast versions lose accuracy for the large angles of long positions), rounded once.
            // That costs a few microseconds per launch, hence the table for the other layers.
            const float f = __fmul_rn(p, dynf ? dyn_inv_freq(dyn, L, rd, i) : inv_freq[i]);
            double s, c;
            sincos((double)f, &s, &c);
            float cf = (float)c, sf = (float)s;
            if (round_cs) {
                cf = fl_to_f32(fl_from_f32<T>(cf));
                sf = fl_to_f32(fl_from_f32<T>(sf));
            }
            cs[i] = cf;
            sn[i] = sf;
            if (table_mode == FL_ROPE_TABLE_WRITE) {
                table[(int64_t)bt * hd + i] = cf;
                table[(int64_t)bt * hd + half + i] = sf;
            }
        }
    }
    if (NORM) {
        // one warp per head (blockDim.x is a multiple of 32, so every warp is whole and the loop warp-uniform):
        // the sum of squares in float32, reduced across the warp; transformers' Qwen3RMSNorm computes
        // x * rsqrt(mean(x^2) + eps) in float32 too
        float *rinv = cs + hd;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        for (int h = warp; h < nh + nkv; h += nw) {
            const T *v = row + (int64_t)h * hd;
            float ss = 0.f;
            for (int i = lane; i < hd; i += 32) {
                const float x = fl_to_f32(v[i]);
                ss += x * x;
            }
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
            if (lane == 0) rinv[h] = rsqrtf(ss / (float)hd + eps);
        }
    }
    // Every value this thread rotates or copies is requested before the barrier, with the table's loads (or the
    // sincos) above still in flight: one memory round trip for the whole kernel. (The first form loaded, rotated and
    // stored pair by pair: the in-place stores into q|k|v kept the compiler from issuing a later pair's loads before
    // an earlier pair's stores, ~9 serial L2 round trips a token, ~4.4 us of each decode layer on an H200.)
    const int slot = (pg.starts_d ? pg.starts_d[b] : start_d ? *start_d : start) + t;
    const bool store = slot >= 0 && slot < max_len;
    const int npairs = (nh + nkv) * half, chunk = ROPE_PP * (int)blockDim.x;
    const int pass = hd - rd, ncopy = store ? nkv * pass + nkv * hd : 0;  // k's unrotated dims, then v
    float pa[ROPE_PP], pc[ROPE_PP];
    T cp[ROPE_PP];
    // pair q: head h, frequency i, its elements (i0, i1) of the head (loads and the rotation below)
    struct pair_ix { int h, i, i0, i1; };
    auto pair_of = [&](int q) {
        const int h = q / half, i = q % half;
        return pair_ix{h, i, INTER ? 2 * i : i, INTER ? 2 * i + 1 : i + half};
    };
    // copy e: k's unrotated dims [rd, hd) of each kv head (e < nkv * pass), then v; its offset in those rows
    auto copy_off = [&](int e) -> int64_t {
        return e < nkv * pass ? (int64_t)(e / pass) * hd + rd + e % pass : (int64_t)(e - nkv * pass);
    };
    auto load_pairs = [&](int base) {
#pragma unroll
        for (int k = 0; k < ROPE_PP; k++) {
            const int q = base + k * (int)blockDim.x + (int)threadIdx.x;
            pa[k] = pc[k] = 0.f;
            if (q < npairs) {
                const pair_ix p = pair_of(q);
                const T *v = row + (int64_t)p.h * hd;
                pa[k] = fl_to_f32(v[p.i0]);
                pc[k] = fl_to_f32(v[p.i1]);
            }
        }
    };
    const T *ksrc = row + (int64_t)nh * hd, *vsrc = row + (int64_t)(nh + nkv) * hd;
    auto load_copies = [&](int base) {
#pragma unroll
        for (int k = 0; k < ROPE_PP; k++) {
            const int e = base + k * (int)blockDim.x + (int)threadIdx.x;
            if (e < ncopy) cp[k] = (e < nkv * pass ? ksrc : vsrc)[copy_off(e)];
        }
    };
    load_pairs(0);
    load_copies(0);
    __syncthreads();  // cos/sin (and the 1 / rms of every head) ready; every read of q / k above is done
    // row b's slot in the cache (fl_kv_paging): rectangular, or a page of the pool through the block table
    int64_t at = (int64_t)b * max_len + (store ? slot : 0);
    if (pg.btab_d && store)
        at = ((int64_t)pg.btab_d[(int64_t)b * pg.btab_stride + (slot >> pg.page_shift)] << pg.page_shift) |
             (slot & ((1 << pg.page_shift) - 1));
    T *kdst = kcache + at * nkv * hd;
    T *vdst = vcache + at * nkv * hd;
    // the pair of frequency i: elements (i0, i1) of the head
    for (int base = 0; base < npairs; base += chunk) {
        if (base) load_pairs(base);  // heads past the first chunk (more than ROPE_PP * blockDim.x pairs)
#pragma unroll
        for (int k = 0; k < ROPE_PP; k++) {
            const int q = base + k * (int)blockDim.x + (int)threadIdx.x;
            if (q >= npairs) break;
            const auto [h, i, i0, i1] = pair_of(q);
            T *v = row + (int64_t)h * hd;
            float a = pa[k], c = pc[k];
            if (NORM) {  // q_norm for the q heads, k_norm for the k heads; one rounding, after the rotation
                const T *w = qk_norm + (h < nh ? 0 : hd);
                const float r = cs[hd + h];
                a = fl_to_f32(w[i0]) * (a * r);
                c = fl_to_f32(w[i1]) * (c * r);
            }
            const float2 rot = fl_rope_rot(a, c, cs[i], sn[i]);
            const T ra = fl_from_f32<T>(rot.x), rc = fl_from_f32<T>(rot.y);
            v[i0] = ra;
            v[i1] = rc;
            if (h >= nh && store) {
                kdst[(h - nh) * hd + i0] = ra;
                kdst[(h - nh) * hd + i1] = rc;
            }
        }
    }
    // partial rotary: k's dims [rd, hd) pass through into the cache; then v
    for (int base = 0; base < ncopy; base += chunk) {
        if (base) load_copies(base);
#pragma unroll
        for (int k = 0; k < ROPE_PP; k++) {
            const int e = base + k * (int)blockDim.x + (int)threadIdx.x;
            if (e < ncopy) (e < nkv * pass ? kdst : vdst)[copy_off(e)] = cp[k];
        }
    }
}

fl_status fl_cuda_rope_store(cudaStream_t st, fl_dtype act, void *qkv, int B, int T, int start,
                             const int32_t *start_d, const int32_t *pos, const float *inv_freq,
                             void *kcache, void *vcache, int max_len, int n_heads, int n_kv_heads,
                             int head_dim, float *table, int table_mode, const fl_kv_paging *pg,
                             const void *qk_norm, float eps, const fl_rope_style *style, const fl_rope_dyn *dyn) {
    if (B <= 0 || T <= 0) return FL_OK;
    const fl_rope_dyn dz = {};
    if (!dyn) dyn = &dz;
    if (dyn->factor > 0.f && (dyn->max_pos <= 0 || fl_rope_dims(style, head_dim) < 4))
        return fl_err(FL_E_VALUE, "rope_store: dynamic rope with max_position_embeddings %d, %d rotated dims", dyn->max_pos,
                      fl_rope_dims(style, head_dim));
    if (head_dim <= 0 || head_dim % 2 || head_dim > 1024)
        return fl_err(FL_E_VALUE, "rope_store: head_dim=%d must be even and at most 1024", head_dim);
    const int rd = fl_rope_dims(style, head_dim), inter = style && style->interleaved, rnd = style && style->round_cs;
    if (rd <= 0 || rd > head_dim || rd % 2)
        return fl_err(FL_E_VALUE, "rope_store: rotary dims %d must be even and in [2, head_dim=%d]", rd, head_dim);
    if (qk_norm && (rd != head_dim || inter))
        return fl_err(FL_E_VALUE, "rope_store: q/k norm needs the default rotary style");
    const fl_kv_paging pz = {};
    if (!pg) pg = &pz;
    if (pg->btab_d && (pg->page_shift < 0 || pg->page_shift > 20 || (long long)pg->btab_stride << pg->page_shift < max_len))
        return fl_err(FL_E_VALUE, "rope_store: block table of %d pages of 2^%d slots for max_len %d", pg->btab_stride,
                      pg->page_shift, max_len);
    if (!start_d && !pg->starts_d && (start < 0 || start + T > max_len))
        return fl_err(FL_E_VALUE, "rope_store: KV cache holds %d positions; slots [%d, %d) requested", max_len, start, start + T);
    if (table_mode != FL_ROPE_TABLE_NONE && !table) return fl_err(FL_E_INTERNAL, "rope_store: table mode %d without a table", table_mode);
    if (n_heads <= 0 || n_kv_heads <= 0 || n_heads > 1024 || n_kv_heads > 1024)
        return fl_err(FL_E_VALUE, "rope_store: %d heads, %d kv heads (each in [1, 1024])", n_heads, n_kv_heads);
    if (qk_norm && !(eps > 0.f)) return fl_err(FL_E_VALUE, "rope_store: q/k norm eps %g must be positive", (double)eps);
    // cos/sin, then (q/k norm) one float per q and k head: at most 4 KiB + 8 KiB
    const size_t smem = ((size_t)head_dim + (qk_norm ? (size_t)n_heads + n_kv_heads : 0)) * sizeof(float);
    FL_CUDA_DISPATCH(act, T_, {
        if (qk_norm)
            FL_LAUNCH((rope_store_kernel<T_, true, false>), dim3(B * T), dim3(ROPE_THREADS), smem, st, (T_ *)qkv, T, start,
                      start_d, pos, inv_freq, (T_ *)kcache, (T_ *)vcache, max_len, n_heads, n_kv_heads, head_dim, table,
                      table_mode, *pg, (const T_ *)qk_norm, eps, rd, rnd, *dyn);
        else if (inter)
            FL_LAUNCH((rope_store_kernel<T_, false, true>), dim3(B * T), dim3(ROPE_THREADS), smem, st, (T_ *)qkv, T, start,
                      start_d, pos, inv_freq, (T_ *)kcache, (T_ *)vcache, max_len, n_heads, n_kv_heads, head_dim, table,
                      table_mode, *pg, (const T_ *)nullptr, eps, rd, rnd, *dyn);
        else
            FL_LAUNCH((rope_store_kernel<T_, false, false>), dim3(B * T), dim3(ROPE_THREADS), smem, st, (T_ *)qkv, T, start,
                      start_d, pos, inv_freq, (T_ *)kcache, (T_ *)vcache, max_len, n_heads, n_kv_heads, head_dim, table,
                      table_mode, *pg, (const T_ *)nullptr, eps, rd, rnd, *dyn);
    });
    return FL_OK;
}
