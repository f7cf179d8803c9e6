// attention.cuh: grouped-query attention over the KV cache on CUDA (launcher API).
//
// Semantics are cpu_attention.c's (fl_backend.h, `attention`): for batch row b, new token t
// (query slot i = start + t) and query head h (kv head h / (n_heads / n_kv_heads)), key slot j
// is visible iff j <= i && (window == 0 || i - j < window) && (kmask == NULL ||
// kmask[b * kmask_stride + j]); out = softmax(q k^T * scale) v over the visible keys, a query
// row with no visible key gives zeros. q comes from the packed qkv buffer
// [B*T, (n_heads + 2*n_kv_heads) * head_dim] (q first); k and v from the layer's cache
// [B, max_len, n_kv_heads, head_dim], which already holds the new tokens at slots
// start..start+T-1. Cache slots [0, start+T) must hold finite values (rope_store writes every
// slot, padding included); slots from start+T on are never read.
//
// Paths (chosen in attention.cu):
//   T == 1, f16/bf16, head_dim 64 or 128, sm_80+: split-K flash-decoding on tensor cores, one
//           block per (kv head, split, batch row) reading each K/V tile once for all the query
//           heads of the group, then a combine kernel. Needs the workspace below.
//   T > 1,  same dtypes/head_dims/arch: flash-attention-2 style tiled kernel (64 queries x 64
//           keys per step, mma.sync m16n8k16, online softmax, tiles outside the causal band or
//           the sliding window skipped).
//   otherwise (f32, other head_dims up to 256, sm_75): a simple one-warp-per-query kernel,
//           correct but not fast.
// All paths accumulate in fp32. When start_d != NULL every kernel reads start from device
// memory and no grid size depends on it (the decode grid is sized from max_len), so the launch
// can be captured in a CUDA graph and replayed with a new *start_d. On sm_90 the combine kernel
// is a programmatic dependent launch (captured as such in graphs).
// Limits: small T > 1 (speculative decoding) takes the prefill kernel, which has no split over
// the keys; decode needs B * n_kv_heads <= 65535 (else the fallback); the fast prefill needs
// 64 KB of shared memory per block at head_dim 128 (opt-in, present on sm_80+).
// Tests, benchmark and measurements: dev/cuda/attention_test.cu, dev/cuda/README.md.
#ifndef FL_CUDA_ATTENTION_CUH
#define FL_CUDA_ATTENTION_CUH

#include <cuda_runtime.h>
#include "../fl_common.h"

#ifdef __cplusplus
extern "C" {
#endif

// out[B*T, n_heads*head_dim] (act dtype: FL_F16, FL_BF16 or FL_F32). start: host value of the
// first new token's cache slot, ignored in favour of *start_d when start_d != NULL. kmask: NULL
// or [B, kmask_stride] bytes, 1 = key slot may be attended; kmask_stride >= start + T.
// workspace: at least fl_cuda_attention_workspace(B, n_heads, head_dim, max_len) bytes, 16-byte
// aligned (only the decode path uses it). No allocation, no host synchronisation.
fl_status fl_cuda_attention(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T, int start,
                            const int32_t *start_d, const uint8_t *kmask, int kmask_stride, const void *kcache,
                            const void *vcache, int max_len, int n_heads, int n_kv_heads, int head_dim, int window,
                            float scale, void *workspace, size_t workspace_bytes, const fl_kv_paging *pg);
size_t fl_cuda_attention_workspace(int B, int n_heads, int head_dim, int max_len);

// Same, with the path forced (dev/cuda/attention_test.cu): FL_ATT_AUTO as above, FL_ATT_SIMPLE the
// fallback kernel, FL_ATT_FAST the fast kernels, FL_ATT_VARIANT0 + v the fast kernels with the
// sandbox's tuning variant v (bits, see attention.cu; v = 0 is FL_ATT_FAST). A forced fast path
// that does not apply returns FL_E_UNSUPPORTED.
enum { FL_ATT_AUTO = 0, FL_ATT_SIMPLE = 1, FL_ATT_FAST = 2, FL_ATT_VARIANT0 = 16 };
fl_status fl_cuda_attention_ex(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T, int start,
                               const int32_t *start_d, const uint8_t *kmask, int kmask_stride, const void *kcache,
                               const void *vcache, int max_len, int n_heads, int n_kv_heads, int head_dim,
                               int window, float scale, void *workspace, size_t workspace_bytes, int path,
                               const fl_kv_paging *pg);

#ifdef __cplusplus
}
// fl_cuda_attention, and where the decode path runs (T == 1, fast kernels, head_dim % 32 == 0) with qd->bits 4 or 8,
// `out` also written as the dp2a GEMV's int16 x at qd (qx.cuh) by the combine kernel; qd->bits is 0 on return when
// that did not happen (the caller then leaves the GEMV to prepare its x).
//
// rope (NULL: q|k|v's q and k are rotated and the cache holds the new k / v, as above): this step's rotary embedding
// is left to this call. q|k|v then holds the unrotated q and k, `table` the cos / sin of each row's position as
// rope_store's FL_ROPE_TABLE_WRITE made it earlier in the same forward ([B*T, head_dim] floats), `style` the rotary
// style (NULL: whole head, rotate-half); qk_norm and dynamic frequencies are not supported here (the table already
// holds a dynamic rope's angles). On the decode path with a style of whole-vector pairs (rotate-half over the whole
// head, or interleaved over rd % 8 == 0 dims) the split kernel rotates q and the new k in registers and stores k / v
// into the cache itself (q|k|v left unrotated); elsewhere rope_store runs first (q|k|v rotated in place). The cache
// and the output are the same bits either way.
//
// sync (NULL: a combine kernel follows the split kernel): on the decode path, at least (1 + B * n_heads) ints of
// device memory, zero before the first call and left zero by each (the caller owns them, one set a stream): the
// split kernel's grid then also holds one combine block a head, which waits for that head's splits and combines them
// (one kernel and one dependency wait fewer a layer; the same bits).
struct fl_qx_dst;
struct fl_att_rope {
    const float *table;
    const fl_rope_style *style;
};
fl_status fl_cuda_attention_qx(cudaStream_t st, fl_dtype act, void *out, const void *qkv, int B, int T, int start,
                               const int32_t *start_d, const uint8_t *kmask, int kmask_stride, const void *kcache,
                               const void *vcache, int max_len, int n_heads, int n_kv_heads, int head_dim, int window,
                               float scale, void *workspace, size_t workspace_bytes, const fl_kv_paging *pg,
                               struct fl_qx_dst *qd, const struct fl_att_rope *rope, int *sync, size_t sync_bytes);
#endif
#endif
