// rope.cuh: rotary embedding of q and k (rotate-half or interleaved, whole or partial heads) fused with the KV-cache store
// (and with Qwen3's per-head RMSNorm of q and k before it).
#ifndef FL_CUDA_ROPE_CUH
#define FL_CUDA_ROPE_CUH
#include <cuda_runtime.h>
#include "../fl_common.h"

// qkv: [B*T, (nh + 2*nkv) * hd] (act), rotated in place for q and k; pos: [B*T] int32;
// inv_freq: [hd/2] float32. The angle is the float32 product (float)pos * inv_freq[i] (as the
// CPU backend and transformers), its cos/sin evaluated accurately (not the fast-math intrinsics,
// whose error grows with the angle). Rotated k and v go to kcache/vcache: [B, max_len, nkv, hd]
// at slot start + t, where start = *start_d when start_d != NULL (graph replay), else `start`.
// Slots outside [0, max_len) are skipped (the host checks `start`; a device start cannot be).
// table ([B*T, hd] float32: cos of the hd/2 frequencies, then sin) spares the other layers of a
// forward the accurate cos/sin (a few microseconds per launch): FL_ROPE_TABLE_WRITE computes
// and stores it (layer 0), FL_ROPE_TABLE_READ uses it (pos and inv_freq unread), NONE neither.
// qk_norm (Qwen3; NULL: none): [2 * hd] (act), q_norm then k_norm. Before the rotation each q and k
// head becomes x * rsqrt(mean(x^2) + eps) * w in float32 (fused: the same block, one rounding to act
// after the rotation, where transformers rounds after the norm and again after rope).
// style (NULL: the whole head, rotate-half): fl_rope_style's rotated dims (the rest of each head passes
// through, into the cache too), interleaved pairs (2i, 2i + 1), and cos / sin rounded to act first (ChatGLM's
// 16-bit rope cache); inv_freq then has dims/2 entries and the table holds cos then sin of those. q/k norm needs
// the default style.
enum { FL_ROPE_TABLE_NONE = 0, FL_ROPE_TABLE_WRITE = 1, FL_ROPE_TABLE_READ = 2 };
fl_status fl_cuda_rope_store(cudaStream_t st, fl_dtype act, void *qkv, int B, int T, int start,
                             const int32_t *start_d, const int32_t *pos, const float *inv_freq,
                             void *kcache, void *vcache, int max_len, int n_heads, int n_kv_heads,
                             int head_dim, float *table, int table_mode, const fl_kv_paging *pg,
                             const void *qk_norm, float eps, const fl_rope_style *style, const fl_rope_dyn *dyn);
#endif
