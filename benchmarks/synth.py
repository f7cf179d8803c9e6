"""Synthetic checkpoints with real shapes and random weights (never zeros), numpy only.

    python benchmarks/synth.py --shape llama-1b --dtype float16 --out /tmp/llama1b
    python benchmarks/synth.py --shape mixtral-8x7b --num-hidden-layers 12 --out /data/mixtral12   # 35 GB
    python benchmarks/synth.py --shape chatglm2-6b --dtype float16 --out /tmp/chatglm2   # THUDM's keys and names
Shapes are taken from the public config.json of each model; ChatGLM's in THUDM's own keys and tensor names, as
THUDM's checkpoints have them (fastload reads those through arch.chatglm_view)."""
from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

# THUDM's ChatGLM2 config keys that every ChatGLM2 shape below shares (the sizes are each shape's own)
_GLM2_KEYS = dict(model_type="chatglm", architectures=["ChatGLMModel"], add_bias_linear=False, add_qkv_bias=True,
                  apply_query_key_layer_scaling=True, apply_residual_connection_post_layernorm=False,
                  attention_dropout=0.0, attention_softmax_in_fp32=True, bias_dropout_fusion=True,
                  fp32_residual_connection=False, hidden_dropout=0.0, layernorm_epsilon=1e-5, multi_query_attention=True,
                  multi_query_group_num=2, original_rope=True, post_layer_norm=True, rmsnorm=True, use_cache=True,
                  torch_dtype="float16", tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)

SHAPES = {
    # Llama-3.2-1B
    "llama-1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128256, hidden_size=2048,
                     intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                     rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                     tie_word_embeddings=True, hidden_act="silu", bos_token_id=128000, eos_token_id=128001),
    # Qwen2.5-7B
    "qwen2.5-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                       intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False, sliding_window=131072,
                       max_window_layers=28, bos_token_id=151643, eos_token_id=151645),
    # Qwen3-8B (dense; q_norm / k_norm per head, head_dim 128 with 32 heads over hidden 4096, no q/k/v biases)
    "qwen3-8b": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3", vocab_size=151936, hidden_size=4096,
                     intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
                     attention_bias=False, tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False,
                     sliding_window=None, max_window_layers=36, bos_token_id=151643, eos_token_id=151645),
    # ChatGLM2-6B as THUDM ships it (huggingface.co/THUDM/chatglm2-6b config.json): THUDM's own config keys and tensor
    # names (tensors_for), fused q|k|v with bias and fused gate|up, 2 multi-query groups; 6.24 G parameters, 12.49 GB
    # in fp16. No generation_config.json: THUDM's repository has none
    "chatglm2-6b": dict(_GLM2_KEYS, _name_or_path="THUDM/chatglm2-6b",
                        auto_map={"AutoConfig": "configuration_chatglm.ChatGLMConfig",
                                  "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
                                  "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                                  "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
                                  "AutoModelForSequenceClassification":
                                      "modeling_chatglm.ChatGLMForSequenceClassification"},
                        ffn_hidden_size=13696, hidden_size=4096, kv_channels=128, num_attention_heads=32, num_layers=28,
                        padded_vocab_size=65024, seq_length=32768, transformers_version="4.27.1"),
    # the same keys at a few hundred kB (2 layers, hidden 64, 4 heads of 16, 2 groups): CPU runs of the ChatGLM
    # scripts (benchmarks/chatglm_gpu.py, bin_vs_safetensors.py) and tests/test_chatglm.py's check of this shape
    "chatglm2-tiny": dict(_GLM2_KEYS, _name_or_path="chatglm2-tiny", ffn_hidden_size=96, hidden_size=64, kv_channels=16,
                          num_attention_heads=4, num_layers=2, padded_vocab_size=1024, seq_length=2048),
    # ChatGLM2-6B's sizes (hidden 4096, ffn 13696, 28 layers, 32 heads, 2 KV groups, vocab 65024) as a
    # Llama-architecture checkpoint: q/k/v and gate/up as separate tensors under Llama's names (9 a layer against
    # ChatGLM's 7), no q|k|v bias (258 kB less of 12.49 GB). What "chatglm2-6b" was before it became the real shape
    "chatglm2-6b-llama": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=65024,
                              hidden_size=4096, intermediate_size=13696, num_hidden_layers=28, num_attention_heads=32,
                              num_key_value_heads=2, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
                              rope_theta=10000.0, tie_word_embeddings=False, hidden_act="silu", bos_token_id=1,
                              eos_token_id=2),
    # Mixtral-8x7B-v0.1: 8 experts of width 14336, top-2, every layer (46.7 G parameters, 12.9 G active per token);
    # --num-hidden-layers 12 gives a 17.6 G-parameter (35 GB bf16) checkpoint that fits the GPU machine's disk
    "mixtral-8x7b": dict(architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
                         intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=1000000.0, num_local_experts=8,
                         num_experts_per_tok=2, router_aux_loss_coef=0.02, router_jitter_noise=0.0,
                         output_router_logits=False, sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
                         bos_token_id=1, eos_token_id=2),
    # a Qwen2-architecture model of a few hundred kB: CPU runs of the GPU scripts' steps (dev/cuda/issue10_gpu.sh)
    "qwen2-tiny": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=1024, hidden_size=64,
                       intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False, hidden_act="silu", use_sliding_window=False, sliding_window=4096,
                       max_window_layers=2, bos_token_id=1, eos_token_id=1023),
}
ST_DTYPE = {"float16": ("F16", np.float16), "bfloat16": ("BF16", None), "float32": ("F32", np.float32)}


def config(shape_name, dtype, num_hidden_layers=None):
    """The shape's config.json in `dtype`, with `num_hidden_layers` layers when given (ChatGLM's key: num_layers)."""
    cfg = dict(SHAPES[shape_name], torch_dtype=dtype)
    if num_hidden_layers:  # fewer layers of the same shape (a 12-layer Mixtral fits a 64 GiB disk)
        cfg["num_layers" if cfg["model_type"] == "chatglm" else "num_hidden_layers"] = int(num_hidden_layers)
    return cfg


def chatglm_tensors(cfg):
    """(name, shape) of a ChatGLM2 / ChatGLM3 checkpoint in THUDM's state-dict order (ChatGLMForConditionalGeneration:
    embedding, the rotary buffer, the layers, final norm, output layer)."""
    d, f, V, L = cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["padded_vocab_size"], cfg["num_layers"]
    nh = cfg["num_attention_heads"]
    hd = cfg.get("kv_channels") or d // nh
    ng = cfg["multi_query_group_num"] if cfg.get("multi_query_attention") else nh
    yield "transformer.embedding.word_embeddings.weight", (V, d)
    yield "transformer.rotary_pos_emb.inv_freq", (hd // 4,)  # rotary over hd/2 dims, one frequency per pair
    for i in range(L):
        p = f"transformer.encoder.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "self_attention.query_key_value.weight", ((nh + 2 * ng) * hd, d)  # [q | k | v] rows
        if cfg.get("add_qkv_bias"):
            yield p + "self_attention.query_key_value.bias", ((nh + 2 * ng) * hd,)
        yield p + "self_attention.dense.weight", (d, nh * hd)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.dense_h_to_4h.weight", (2 * f, d)  # [gate | up] rows
        yield p + "mlp.dense_4h_to_h.weight", (d, f)
    yield "transformer.encoder.final_layernorm.weight", (d,)
    yield "transformer.output_layer.weight", (V, d)


def fixed_values(cfg, name):
    """float32 values of a tensor that is not random (ChatGLM's rotary inv_freq buffer: 1 / 10000^(2i / (hd/2))),
    else None."""
    if not name.endswith("rotary_pos_emb.inv_freq"):
        return None
    hd = cfg.get("kv_channels") or cfg["hidden_size"] // cfg["num_attention_heads"]
    rd = hd // 2
    return (1.0 / 10000.0 ** (np.arange(0, rd, 2, dtype=np.float32) / np.float32(rd))).astype(np.float32)


def tensors_for(cfg):
    if cfg.get("model_type") == "chatglm":
        yield from chatglm_tensors(cfg)
        return
    d, f, V, L = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] == "qwen2"
    yield "model.embed_tokens.weight", (V, d)
    for i in range(L):
        p = f"model.layers.{i}."
        yield p + "input_layernorm.weight", (d,)
        yield p + "self_attn.q_proj.weight", (q, d)
        yield p + "self_attn.k_proj.weight", (kv, d)
        yield p + "self_attn.v_proj.weight", (kv, d)
        if bias:
            yield p + "self_attn.q_proj.bias", (q,)
            yield p + "self_attn.k_proj.bias", (kv,)
            yield p + "self_attn.v_proj.bias", (kv,)
        if cfg["model_type"] == "qwen3":
            yield p + "self_attn.q_norm.weight", (hd,)
            yield p + "self_attn.k_norm.weight", (hd,)
        yield p + "self_attn.o_proj.weight", (d, q)
        yield p + "post_attention_layernorm.weight", (d,)
        if cfg.get("num_local_experts"):  # Mixtral, the hub's per-expert names
            yield p + "block_sparse_moe.gate.weight", (cfg["num_local_experts"], d)
            for j in range(cfg["num_local_experts"]):
                yield p + f"block_sparse_moe.experts.{j}.w1.weight", (f, d)
                yield p + f"block_sparse_moe.experts.{j}.w2.weight", (d, f)
                yield p + f"block_sparse_moe.experts.{j}.w3.weight", (f, d)
            continue
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "mlp.down_proj.weight", (d, f)
    yield "model.norm.weight", (d,)
    if not cfg.get("tie_word_embeddings"):
        yield "lm_head.weight", (V, d)


_POOL = {}


def random_tensor(rng, name, shape, dtype, cfg=None):
    n = int(np.prod(shape))
    fixed = fixed_values(cfg, name) if cfg else None
    if fixed is not None:
        x = fixed
    elif n > (1 << 24) and ".experts." in name:
        # experts (tens of GB): a window at a random offset of one pool of 2^26 normal values (drawn once), so
        # that a Mixtral-sized checkpoint takes minutes to write, not the time numpy needs to draw every value
        if "pool" not in _POOL:
            _POOL["pool"] = rng.standard_normal(1 << 26, dtype=np.float32)
        pool = _POOL["pool"]
        x = np.roll(pool, -int(rng.integers(0, pool.size)))
        x = np.resize(x, n) * np.float32(0.5 / np.sqrt(shape[-1]))
    elif name.endswith("norm.weight"):
        x = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.5 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.02)
    x = x.astype(np.float32, copy=False)
    if x.size == 0 or np.any(x == 0):
        x = np.where(x == 0, np.float32(1e-3), x)
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).reshape(shape)
    return x.astype(ST_DTYPE[dtype][1]).reshape(shape)


def write(out, shape_name, dtype, shard_bytes=2 << 30, seed=0, num_hidden_layers=None):
    cfg = config(shape_name, dtype, num_hidden_layers)
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = list(tensors_for(cfg))
    esz = 4 if dtype == "float32" else 2
    shards, cur, size = [], [], 0
    for name, shape in specs:
        nb = int(np.prod(shape)) * esz
        if cur and size + nb > shard_bytes:
            shards.append(cur); cur, size = [], 0
        cur.append((name, shape)); size += nb
    shards.append(cur)
    weight_map, total = {}, 0
    for si, items in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{si + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {}, 0
        for name, shape in items:
            nb = int(np.prod(shape)) * esz
            header[name] = {"dtype": ST_DTYPE[dtype][0], "shape": list(shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[name] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(os.path.join(out, fname), "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for name, shape in items:
                f.write(random_tensor(rng, name, shape, dtype, cfg).tobytes())
        total += off
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    if "bos_token_id" in cfg:  # (THUDM's ChatGLM repositories have no generation_config.json)
        with open(os.path.join(out, "generation_config.json"), "w") as f:
            json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, f)
    return total


def write_word_tokenizer(d):
    """A word-level tokenizer.json (+ tokenizer_config.json) for a synthetic checkpoint that has none (random weights
    have no real vocabulary; `bench speed` and transformers need a tokenizer). Needs the tokenizers package."""
    if os.path.isfile(os.path.join(d, "tokenizer.json")):
        return
    from tokenizers import Tokenizer, models, pre_tokenizers
    with open(os.path.join(d, "config.json")) as fh:
        cfg = json.load(fh)
    words = ["<unk>", "<|endoftext|>", "the", "a", "of", "and", "to", "in", "is", "that"]
    vocab = {w: i for i, w in enumerate(words)}
    eos = cfg.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    if isinstance(eos, int) and eos >= len(vocab):
        vocab["<|im_end|>"] = eos  # the model's eos id, so that eos handling sees a real token
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(os.path.join(d, "tokenizer.json"))
    with open(os.path.join(d, "tokenizer_config.json"), "w") as fh:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>",
                   "eos_token": "<|im_end|>" if "<|im_end|>" in vocab else "<|endoftext|>",
                   "model_max_length": cfg.get("max_position_embeddings", 32768)}, fh)


def bench_checkpoint(d, shape="qwen2.5-7b", dtype="bfloat16"):
    """The benchmarks' synthetic checkpoint in `d` with a word-level tokenizer, made once (a `d` with config.json is
    kept): torch draws the numbers on the GPU when torch, safetensors and a CUDA device are there (~15 s for the 7B
    shape, gpu_bench.make_checkpoint), else numpy (minutes for the 7B shape). Returns d."""
    if not os.path.isfile(os.path.join(d, "config.json")):
        fast = False
        if shape == "qwen2.5-7b" and dtype == "bfloat16":
            try:
                import torch
                import safetensors  # noqa: F401
                fast = torch.cuda.is_available()
            except ImportError:
                pass
        if fast:
            import gpu_bench
            gpu_bench.make_checkpoint(d, shape)
        else:
            write(d, shape, dtype)
    write_word_tokenizer(d)
    return d


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(ST_DTYPE))
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", action="store_true", help="also a word-level tokenizer (for bench speed)")
    ap.add_argument("--num-hidden-layers", type=int, default=None, help="override the shape's layer count")
    a = ap.parse_args()
    if a.tokenizer:
        bench_checkpoint(a.out, a.shape, a.dtype)
        print(f"{a.out}: {a.shape} {a.dtype} with a word-level tokenizer")
    else:
        print(f"wrote {write(a.out, a.shape, a.dtype, num_hidden_layers=a.num_hidden_layers) / 1e9:.2f} GB to {a.out}")
