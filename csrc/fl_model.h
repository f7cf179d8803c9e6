/* fl_model.h: a decoder-only transformer (Llama / Mistral / Qwen2 / Qwen3 family, and their Mixture-of-Experts
 * forms: Mixtral, Qwen3-MoE) as data.
 *
 * Architectures differ only through fl_config (filled by the Python architecture table,
 * fastload/arch.py) and through the tensor-name table that decides which checkpoint tensor
 * goes to which slot. The forward pass and the generation loop are written once. */
#ifndef FL_MODEL_H
#define FL_MODEL_H
#include "fl_backend.h"
#include "quant.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Limits on config values (issue 7), checked by fl_model_create before any size is computed;
 * fastload/arch.py validates config.json against the same numbers. */
#define FL_MAX_LAYERS 1024          /* num_hidden_layers */
#define FL_MAX_HEADS 1024           /* num_attention_heads */
#define FL_MAX_HEAD_DIM 1024        /* head_dim (even) */
#define FL_MAX_HIDDEN 131072        /* hidden_size */
#define FL_MAX_FFN 1048576          /* intermediate_size */
#define FL_MAX_VOCAB 16777216       /* vocab_size (2^24) */
#define FL_MAX_EXPERTS FL_MOE_MAX_EXPERTS /* num_local_experts / num_experts (fl_backend.h) */
#define FL_MAX_TOPK FL_MOE_MAX_K            /* num_experts_per_tok */

/* FL_ROPE_DYNAMIC: transformers' "dynamic" (NTK) rope: the frequencies of a row depend on its length (fl_rope_dyn,
 * fl_common.h); rope_orig_max_pos holds max_position_embeddings, past which they change. */
typedef enum { FL_ROPE_DEFAULT = 0, FL_ROPE_LINEAR, FL_ROPE_LLAMA3, FL_ROPE_YARN, FL_ROPE_DYNAMIC } fl_rope_type;

typedef struct {
    int vocab;               /* vocab_size */
    int d;                   /* hidden_size */
    int n_layers;            /* num_hidden_layers */
    int n_heads;             /* num_attention_heads */
    int n_kv_heads;          /* num_key_value_heads (grouped-query attention) */
    int head_dim;            /* head_dim, or hidden_size / num_attention_heads */
    int ffn;                 /* intermediate_size */
    int max_pos;             /* max_position_embeddings */
    float rms_eps;           /* rms_norm_eps */
    float rope_theta;        /* rope_theta */
    int rope_type;           /* fl_rope_type */
    float rope_factor;       /* linear / llama3 / yarn: factor */
    float rope_low_freq_factor, rope_high_freq_factor; /* llama3: its factors; yarn: the correction range (dims) */
    int rope_orig_max_pos;   /* llama3 / yarn: original_max_position_embeddings */
    float rope_attn_factor;  /* yarn: cos and sin scale (applied as its square to the softmax scale); 1 otherwise */
    int rope_dims;           /* rotated dims of each q / k head (even; 0: head_dim); ChatGLM: head_dim / 2 */
    int rope_interleaved;    /* rotary pairs (2i, 2i + 1) instead of rotate-half (i, i + dims/2): ChatGLM */
    int rope_round;          /* cos / sin rounded to the activation dtype before use: ChatGLM's rope cache */
    int qkv_bias;            /* Qwen2: q/k/v projections have biases */
    int qk_norm;             /* Qwen3: RMSNorm (eps rms_eps, weight [head_dim]) over each head of q and of k,
                              * after the projections, before rope */
    int tie_embeddings;      /* lm_head shares the embedding matrix */
    /* Mixture of Experts (Mixtral; Qwen2-MoE / Qwen3-MoE shapes). n_experts 0: a dense model, nothing below used.
     * Otherwise every layer's FFN is: router logits = x @ moe_router^T [E]; p = softmax(logits) in float32; the
     * top_k largest p (ties: the lower expert index), divided by their sum when moe_norm_topk; out = sum over the
     * chosen experts e of p_e * W2_e (silu(W1_e x) * W3_e x), each expert a SwiGLU of width moe_ffn. */
    int n_experts;           /* num_local_experts (Mixtral) / num_experts (Qwen MoE); 0: dense */
    int top_k;               /* num_experts_per_tok, 1..min(n_experts, FL_MAX_TOPK) */
    int moe_norm_topk;       /* renormalise the top-k probabilities to sum 1 (Mixtral: always; Qwen: norm_topk_prob) */
    int moe_ffn;             /* each expert's intermediate size (Mixtral: intermediate_size; Qwen: moe_intermediate_size) */
    int shared_ffn;          /* a shared expert's intermediate size (Qwen2-MoE), 0: none. Reserved: must be 0 for now */
    int window[FL_MAX_LAYERS]; /* per-layer sliding window, 0 = full attention */
} fl_config;

/* Loading slots: which part of the model a checkpoint tensor fills. q/k/v (and gate/up) go
 * into one concatenated matrix at a row offset, so one matmul serves all three. */
typedef enum {
    FL_SLOT_EMBED = 0,   /* [vocab, d] */
    FL_SLOT_LM_HEAD,     /* [vocab, d] (absent when tied) */
    FL_SLOT_FINAL_NORM,  /* [d] */
    FL_SLOT_ATTN_NORM,   /* per layer: [d] */
    FL_SLOT_Q,           /* [nh*hd, d]   -> wqkv rows [0, nh*hd) */
    FL_SLOT_K,           /* [nkv*hd, d]  -> wqkv rows [nh*hd, (nh+nkv)*hd) */
    FL_SLOT_V,           /* [nkv*hd, d]  -> wqkv rows [(nh+nkv)*hd, (nh+2nkv)*hd) */
    FL_SLOT_Q_BIAS, FL_SLOT_K_BIAS, FL_SLOT_V_BIAS, /* [nh*hd], [nkv*hd], [nkv*hd] -> bqkv */
    FL_SLOT_O,           /* [d, nh*hd] */
    FL_SLOT_FFN_NORM,    /* [d] */
    FL_SLOT_GATE,        /* [ffn, d] -> w_gate_up rows [0, ffn) */
    FL_SLOT_UP,          /* [ffn, d] -> w_gate_up rows [ffn, 2ffn) */
    FL_SLOT_DOWN,        /* [d, ffn] */
    FL_SLOT_Q_NORM,      /* per layer: [hd] -> qk_norm rows [0, hd) (qk_norm only) */
    FL_SLOT_K_NORM,      /* per layer: [hd] -> qk_norm rows [hd, 2hd) (qk_norm only) */
    /* checkpoints that store the fused matrices (ChatGLM): one tensor fills the whole weight and stands for
     * its parts (q, k, v / their biases / gate, up), which then must not be given too */
    FL_SLOT_QKV,         /* [(nh+2nkv)*hd, d] -> wqkv */
    FL_SLOT_QKV_BIAS,    /* [(nh+2nkv)*hd]    -> bqkv (qkv_bias only) */
    FL_SLOT_GATE_UP,     /* [2ffn, d]         -> w_gate_up (gate rows first) */
    /* Mixture of Experts (n_experts > 0; E experts of width f = moe_ffn). Per-expert slots take the item's expert
     * index; the _ALL slots are the fused 3-D tensors [E, ...] of transformers 5 and fill every expert at once. */
    FL_SLOT_MOE_ROUTER,  /* per layer: [E, d] -> moe_router */
    FL_SLOT_MOE_W1,      /* per layer and expert e: [f, d] -> moe_w13 rows [e*2f, e*2f + f) (gate) */
    FL_SLOT_MOE_W3,      /* per layer and expert e: [f, d] -> moe_w13 rows [e*2f + f, (e+1)*2f) (up) */
    FL_SLOT_MOE_W2,      /* per layer and expert e: [d, f] -> moe_w2 rows [e*d, (e+1)*d) (down) */
    FL_SLOT_MOE_W13_ALL, /* per layer: [E, 2f, d] (gate | up per expert) -> moe_w13 */
    FL_SLOT_MOE_W2_ALL,  /* per layer: [E, d, f] -> moe_w2 */
    FL_SLOT_COUNT
} fl_slot;
extern const char *const fl_slot_names[FL_SLOT_COUNT];

typedef struct {
    fl_weight attn_norm;  /* [d] */
    fl_weight wqkv;       /* [(nh + 2*nkv) * hd, d] */
    fl_weight bqkv;       /* [(nh + 2*nkv) * hd] (rows only; data_d NULL without qkv_bias) */
    fl_weight qk_norm;    /* [2 * hd]: q_norm then k_norm, one weight for every head (data_d NULL without qk_norm) */
    fl_weight wo;         /* [d, nh * hd] */
    fl_weight ffn_norm;   /* [d] */
    fl_weight w_gate_up;  /* [2 * ffn, d] */
    fl_weight w_down;     /* [d, ffn] */
    fl_weight moe_router; /* [E, d] (n_experts > 0; else absent) */
    fl_weight moe_w13;    /* [E * 2 * moe_ffn, d]: expert e's gate rows then its up rows, experts one after another */
    fl_weight moe_w2;     /* [E * d, moe_ffn]: expert e's down projection at rows [e*d, (e+1)*d) */
} fl_layer;
#define FL_LAYER_WEIGHTS 11   /* fl_weight fields of fl_layer (model.c checks) */

typedef struct {
    fl_weight embed;      /* [vocab, d] */
    fl_weight final_norm; /* [d] */
    fl_weight lm_head;    /* [vocab, d]; same data as embed when tied */
    fl_layer *layers;     /* [n_layers] */
} fl_weights;

typedef struct {
    int slot, layer;      /* fl_slot; layer index (ignored for global slots) */
    int expert;           /* FL_SLOT_MOE_W1 / W3 / W2: the expert index (else ignored) */
    int unpermute_heads;  /* GGUF q/k: undo llama.cpp's rotary row permutation for this many heads */
    fl_src_tensor src;    /* the tensor; for GPTQ / AWQ: qweight */
    /* GPTQ / AWQ (csrc/quant.h): packing != 0, src is qweight and these are its companions */
    int packing;          /* 0, FL_PACK_GPTQ, FL_PACK_AWQ */
    int qbits, qgroup, qzero_offset;
    fl_src_tensor qzeros, scales, g_idx; /* g_idx.data NULL: none */
    /* LoRA (fastload/lora.py): the weight rows this item fills become W + lora_scale * (lora_b @ lora_a), merged
     * after W lands in backend memory and before any quantisation at load. lora_a [r, cols], lora_b [rows, r],
     * float tensors; lora_a.data NULL: no adapter on this item. */
    fl_src_tensor lora_a, lora_b;
    float lora_scale;
} fl_load_item;

typedef struct fl_model {
    fl_config cfg;
    fl_dtype wdtype;       /* float weight dtype in backend memory (embeddings, norms, unquantised weights) */
    fl_quant_cfg quant;    /* quantisation at load (fl_model_set_quant); zero: none */
    uint64_t bytes_quant;  /* bytes of quantised weights (codes + scales + offsets + perms) in the arena */
    int n_quant;           /* weights held quantised */
    int n_interleaved;     /* of them, in the backend's interleaved layout (fl_model_interleave) */
    int weights_final;     /* fl_model_interleave ran: the weights may be interleaved, no load may write them */
    fl_backend *be;
    void *arena_d;         /* one allocation holds every weight */
    size_t arena_bytes;
    int arena_huge;     /* 1: the weight arena was advised to transparent huge pages (host memory; fl_advise_huge) */
    fl_weights w;
    float *inv_freq_d;     /* [head_dim / 2] rotary frequencies after scaling */
    uint8_t *loaded;       /* [FL_SLOT_COUNT * n_layers] which slots were filled */
    uint8_t *moe_loaded;   /* [n_layers * n_experts * 3]: expert parts filled (w1, w3, w2), NULL when dense */
    /* workspace, grown on demand to the largest B*T seen; logits (and the last-row gather) to the largest
     * number of logit rows asked for, which is B, not B*T, for generation's prefill */
    int ws_tokens, ws_logit_rows;
    void *ws_x, *ws_xn, *ws_qkv, *ws_att, *ws_delta, *ws_gu, *ws_ff;
    void *ws_last, *ws_logits;
    /* Mixture of Experts, for ws_tokens tokens (k = top_k, f = moe_ffn): */
    void *ws_router;       /* [N, E] router logits (activation dtype) */
    int32_t *ws_moe_ids;   /* [N * k] chosen experts, token-major */
    float *ws_moe_wts;     /* [N * k] their weights (float32) */
    fl_moe_scratch moe_ws; /* the backend's MoE scratch (fl_backend.h) */
    int32_t *ws_tok_d, *ws_pos_d; uint8_t *ws_mask_d;
    fl_load_stats stats;
    uint64_t kv_bytes_last;  /* size of the most recent KV cache (freed after each generate) */
    /* fl_forward_core without all_logits: the token of row b whose logits are wanted is last_rows[b] (host, [B]) when
     * set, else T - 1 (the engine's prefill of right-padded prompt chunks sets it for one call) */
    const int32_t *last_rows;
    /* FASTLOAD_TIMING_SKIP (measurements only, read at creation): FL_SKIP_* bits of the ops a one-token step skips */
    unsigned timing_skip;
} fl_model;

/* FASTLOAD_TIMING_SKIP=op[,op...]: decode steps (one new token per row) leave these ops out, their outputs stale, to
 * price each kind of kernel inside the real step (under programmatic dependent launch a kernel's own duration
 * overstates what removing it saves). The tokens are then wrong: a timing tool, never for answers. With quantised
 * weights a skipped norm / attention / SwiGLU no longer writes the next GEMV's int16 x, so that GEMV prepares its own
 * (one small kernel in place of the skipped one: the saving shown is the skipped op's cost less a prep kernel's). */
enum {
    FL_SKIP_NORM = 1u << 0,     /* both (add_)rmsnorm of a layer */
    FL_SKIP_QKV = 1u << 1,      /* the q|k|v matmul */
    FL_SKIP_ROPE = 1u << 2,     /* rope + KV store */
    FL_SKIP_ATTENTION = 1u << 3, /* attention (split + combine) */
    FL_SKIP_O = 1u << 4,        /* o_proj */
    FL_SKIP_GATE_UP = 1u << 5,  /* gate|up (with its SwiGLU where fused) */
    FL_SKIP_SWIGLU = 1u << 6,   /* a separate SwiGLU */
    FL_SKIP_DOWN = 1u << 7,     /* down_proj */
    FL_SKIP_LM_HEAD = 1u << 8,  /* the final norm and the LM head */
};
fl_status fl_timing_skip_parse(const char *s, unsigned *mask);

fl_status fl_model_create(const fl_config *cfg, fl_dtype wdtype, fl_backend *be, fl_model **out);
void fl_model_free(fl_model *m);
/* Quantisation at load for the float tensors of the next fl_model_load (before the first load). */
fl_status fl_model_set_quant(fl_model *m, const fl_quant_cfg *q);
/* Convert / dequantise items into the arena (OpenMP over items). Shapes are checked against the
 * config: a mismatch names the file and tensor. */
fl_status fl_model_load(fl_model *m, const fl_load_item *items, int n, fl_progress_fn cb, void *ud);
/* After loading: every required slot filled? Names the first missing one. */
fl_status fl_model_check_complete(const fl_model *m);
fl_status fl_model_interleave(fl_model *m);

/* The weight `slot` (fl_slot) of `layer` fills: *w, its first row *row0 and the slot's shape
 * [*rows, *cols] (*is_vec: a vector, cols 1). Errors for a slot the config does not have. */
fl_status fl_model_slot_rows(fl_model *m, int slot, int layer, int expert, const fl_weight **w, int64_t *row0,
                             int64_t *rows, int64_t *cols, int *is_vec);

/* The model's weights one by one, in arena order (lm_head only when untied), for Model.layouts(): weight i, its
 * name ("embed", "final_norm", "lm_head", "layers.N.attn_norm|wqkv|bqkv|qk_norm|wo|ffn_norm|w_gate_up|w_down") and its
 * bytes in backend memory (codes + scales + offsets + perm of a quantised weight). */
int fl_model_n_weights(const fl_model *m);
fl_status fl_model_weight_info(fl_model *m, int i, const fl_weight **w, char *name, size_t cap, uint64_t *bytes);
uint64_t fl_weight_bytes(const fl_weight *w);

/* A rectangular KV cache of batch x max_len slots whose elements are `dtype`: the backend's activation dtype, or FL_F16
 * on the CPU backend (fl_kv_dtype_ok). */
fl_status fl_kv_create(fl_model *m, int batch, int max_len, fl_dtype dtype, fl_kvcache **out);
/* FL_OK when the backend's attention reads and writes a KV cache of `dtype`, else FL_E_VALUE naming kv_cache_dtype. */
fl_status fl_kv_dtype_ok(const fl_backend *be, fl_dtype dtype);
void fl_kv_free(fl_model *m, fl_kvcache *kv);

/* One forward step over a rectangular batch, host arrays in and out. tokens/pos: [B*T];
 * kmask: [B, kmask_stride] (kmask_stride >= start+T) or NULL. logits_h: [B*T, vocab] float32
 * (all_logits) or [B, vocab] (last token of each row). */
fl_status fl_forward(fl_model *m, fl_kvcache *kv, int B, int T, int start, const int32_t *tokens,
                     const int32_t *pos, const uint8_t *kmask, int kmask_stride, int all_logits, float *logits_h);
/* The same, with all_logits, row b's T logit rows written to logits_h[b * logits_ld * vocab ...] (logits_ld >= T):
 * one chunk [start, start + T) of rows logits_ld tokens long, in place in the whole forward's logits. */
fl_status fl_forward_ld(fl_model *m, fl_kvcache *kv, int B, int T, int start, const int32_t *tokens,
                        const int32_t *pos, const uint8_t *kmask, int kmask_stride, int all_logits, float *logits_h,
                        int logits_ld);

/* The same on backend memory only: no host transfer and no synchronisation, so a CUDA graph
 * can capture it. tok_d: [B*T]; step->pos_d etc. in backend memory. Logits (activation dtype)
 * are left in m->ws_logits: [B*T, vocab] (all_logits) or [B, vocab]. The workspace must have
 * been grown with fl_model_reserve first. */
fl_status fl_forward_core(fl_model *m, fl_kvcache *kv, const fl_step *step, const int32_t *tok_d, int all_logits);
/* Grow the activation workspace to hold n_tokens rows (and n_logits rows of logits). */
fl_status fl_model_reserve(fl_model *m, int n_tokens, int n_logits);

typedef struct {
    int max_new_tokens, min_new_tokens;
    int do_sample;
    float temperature;       /* <= 0 or 1: no scaling */
    int top_k;               /* 0: off */
    float top_p;             /* >= 1: off */
    float repetition_penalty;/* 1: off */
    float min_p;             /* 0: off; else drop tokens below min_p x the most likely one's probability (after top-p) */
    float presence_penalty, frequency_penalty; /* 0: off; OpenAI's: logit -= c * frequency + (c > 0) * presence, c the
                                                  token's count among the tokens generated so far */
    int no_repeat_ngram_size; /* 0: off; transformers' NoRepeatNGram: no n-gram of prompt + output twice */
    /* Logit biases, every step before the penalties: entry i is the token sequence bias_toks[bias_off[i] ..
     * bias_off[i + 1]) with value bias[i], added to the logit of the sequence's last token when the tokens before it
     * end prompt + output so far (always, for a sequence of one token): OpenAI's logit_bias, transformers'
     * sequence_bias; -inf bans (bad_words_ids, suppress_tokens). bias_off has n_bias + 1 entries. */
    const int32_t *bias_toks, *bias_off; const float *bias; int n_bias;
    const int32_t *begin_ban; int n_begin_ban;   /* -inf at the first generated token (begin_suppress_tokens) */
    const int32_t *forced_eos; int n_forced_eos; /* the token that reaches max_new_tokens is one of these, all else
                                                    -inf (transformers' forced_eos_token_id) */
    float typical_p;          /* 0 or >= 1: off; transformers' TypicalLogitsWarper, after min-p */
    float epsilon_cutoff, eta_cutoff; /* 0: off; transformers' EpsilonLogitsWarper / EtaLogitsWarper, after typical */
    uint64_t seed;
    const int32_t *eos; int n_eos;
    /* What the engine keeps of each generated token for the caller (fl_request_records), one row of floats a token:
     * keep_scores: the vocab scores the token was chosen from (transformers' output_scores: repetition penalty, eos
     *   masked below min_new_tokens, then when sampling temperature, and -inf for every token top-k / top-p left out);
     * keep_logits: the model's logits row as it came (transformers' output_logits);
     * keep_logprob: the token's log-probability under those raw logits (log softmax, double sums), then with
     *   top_logprobs = k the k most likely tokens' ids (int32 bits) and their log-probabilities (OpenAI's / vLLM's
     *   logprobs). Row: [scores vocab][logits vocab][logprob 1, ids k, logprobs k], each part only when asked for. */
    int keep_scores, keep_logits, keep_logprob, top_logprobs;
    /* Beam search (num_beams > 1; 0 or 1: off): transformers' _beam_search (5.x), greedy, on the rules above applied to
     * each beam's log-probabilities (engine.c "beam search"). num_return: hypotheses returned (1..num_beams, 0: 1);
     * length_penalty: a finished hypothesis scores sum(log-probs) / generated_length ^ length_penalty;
     * early_stopping: 0 (transformers' False: a heuristic), 1 (True: stop once num_beams are finished), 2 ("never") */
    int num_beams, num_return;
    float length_penalty;
    int early_stopping;
} fl_gen_params;
#define FL_MAX_TOP_LOGPROBS 20


#ifdef __cplusplus
}
#endif
#endif
