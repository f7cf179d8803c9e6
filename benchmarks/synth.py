"""Synthetic checkpoints with real shapes and random weights (never zeros), numpy only.

    python benchmarks/synth.py --shape llama-1b --dtype float16 --out /tmp/llama1b
Shapes are taken from the public config.json of each model."""
from __future__ import annotations

import argparse
import json
import os
import struct

import numpy as np

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
}
ST_DTYPE = {"float16": ("F16", np.float16), "bfloat16": ("BF16", None), "float32": ("F32", np.float32)}


def tensors_for(cfg):
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
        yield p + "self_attn.o_proj.weight", (d, q)
        yield p + "post_attention_layernorm.weight", (d,)
        yield p + "mlp.gate_proj.weight", (f, d)
        yield p + "mlp.up_proj.weight", (f, d)
        yield p + "mlp.down_proj.weight", (d, f)
    yield "model.norm.weight", (d,)
    if not cfg.get("tie_word_embeddings"):
        yield "lm_head.weight", (V, d)


def random_tensor(rng, name, shape, dtype):
    n = int(np.prod(shape))
    if name.endswith("norm.weight"):
        x = 1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n, dtype=np.float32) * np.float32(0.5 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.02)
    x = x.astype(np.float32, copy=False)
    if dtype == "bfloat16":
        u = x.view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).reshape(shape)
    return x.astype(ST_DTYPE[dtype][1]).reshape(shape)


def write(out, shape_name, dtype, shard_bytes=2 << 30, seed=0):
    cfg = dict(SHAPES[shape_name], torch_dtype=dtype)
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
                f.write(random_tensor(rng, name, shape, dtype).tobytes())
        total += off
    if len(shards) > 1:
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}, f)
    return total


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(ST_DTYPE))
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    print(f"wrote {write(a.out, a.shape, a.dtype) / 1e9:.2f} GB to {a.out}")
