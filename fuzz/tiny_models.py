"""Tiny valid checkpoints for the seed corpus (make_seeds.py) and the Python harness (fuzz_python.py).

Everything is built in memory with the test writers (tests/gguf_util.py, tests/st_util.py), with tiny
dimensions so that one load takes a millisecond or two:

    st_model()        -> (config dict, {tensor name: (st dtype, numpy array)})  a LlamaForCausalLM
    st_file(tensors)  -> safetensors file bytes
    tokenizer_json()  -> tokenizer.json text (byte-level BPE, 24 tokens + merges)
    gguf_model(kind)  -> GGUFWriter of a llama/qwen2 model with a gpt2 or llama (sentencepiece) tokenizer
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests")
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

import gguf_util  # noqa: E402
import st_util  # noqa: E402
from gguf_util import GGML, BLOCK, GGUFWriter, T  # noqa: E402,F401

# dimensions of the safetensors model: d=8, 2 heads of 4, 1 kv head, ffn 16, 1 layer, vocab 24
ST_DIMS = dict(d=8, heads=2, kv=1, head_dim=4, ffn=16, layers=1, vocab=24)


def st_model(seed=0, dtype="F32", arch="LlamaForCausalLM"):
    rng = np.random.default_rng(seed)
    D = ST_DIMS
    d, hd, ffn, V = D["d"], D["head_dim"], D["ffn"], D["vocab"]
    q, kv = D["heads"] * hd, D["kv"] * hd
    cfg = {
        "architectures": [arch], "model_type": {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
                                                "MistralForCausalLM": "mistral"}[arch],
        "hidden_size": d, "intermediate_size": ffn, "num_attention_heads": D["heads"],
        "num_key_value_heads": D["kv"], "head_dim": hd, "num_hidden_layers": D["layers"], "vocab_size": V,
        "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float32",
    }
    shapes = {"model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}
    for i in range(D["layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (ffn, d), p + "mlp.up_proj.weight": (ffn, d),
            p + "mlp.down_proj.weight": (d, ffn)})
        if arch == "Qwen2ForCausalLM":
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    tensors = {}
    for name, shp in shapes.items():
        x = (rng.standard_normal(shp) * 0.1).astype(np.float32)
        if dtype == "F32":
            tensors[name] = ("F32", x)
        elif dtype == "F16":
            tensors[name] = ("F16", x.astype(np.float16))
        else:
            tensors[name] = ("BF16", st_util.bf16_bits(x))
    return cfg, tensors


def st_header_and_data(tensors, metadata=None):
    return st_util.layout(tensors, metadata)


def st_file(tensors, metadata=None):
    h, data = st_util.layout(tensors, metadata)
    return st_util.pack(h, data)


# byte-level BPE over a few letters; ids 0..2 are specials
TOK_VOCAB = ["<unk>", "<s>", "</s>", "a", "b", "c", "d", "e", "h", "l", "o", "Ġ", "ab", "cd", "he", "ll",
             "hell", "hello", "Ġh", "Ġa", "abc", "!", ".", "x"]
TOK_MERGES = ["a b", "c d", "h e", "l l", "he ll", "hell o", "Ġ h", "Ġ a", "ab c"]


def tokenizer_dict():
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, t in enumerate(TOK_VOCAB[:3])],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(TOK_VOCAB)}, "merges": list(TOK_MERGES)},
    }


def tokenizer_config():
    return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>",
            "model_max_length": 64, "padding_side": "left",
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


def tokenizer_json():
    return json.dumps(tokenizer_dict())


# GGUF: d=32 (so that 32-element quant blocks fit a row), 2 heads of 16, 1 kv head, ffn 32, vocab 24
GG_DIMS = dict(d=32, heads=2, kv=1, head_dim=16, ffn=32, layers=1, vocab=24)
SP_VOCAB = ["<unk>", "<s>", "</s>", "▁", "a", "b", "c", "h", "e", "l", "o", "▁a", "▁h", "ab", "he", "ll",
            "hell", "hello", "▁hello", "<0x0A>", "<0x21>", "!", ".", "x"]


def quant_bytes(rng, type_id, n_elems):
    """Valid-looking bytes for n_elems of a ggml type (finite f16 scales)."""
    be, bb = BLOCK[type_id]
    if type_id == GGML.F32:
        return (rng.standard_normal(n_elems) * 0.1).astype(np.float32).tobytes()
    if type_id == GGML.F16:
        return (rng.standard_normal(n_elems) * 0.1).astype(np.float16).tobytes()
    if type_id == GGML.BF16:
        return st_util.bf16_bits((rng.standard_normal(n_elems) * 0.1).astype(np.float32)).tobytes()
    if type_id == GGML.F64:
        return (rng.standard_normal(n_elems) * 0.1).astype(np.float64).tobytes()
    nb = n_elems // be
    raw = bytearray(rng.integers(0, 256, size=nb * bb, dtype=np.uint8).tobytes())
    # put small finite f16 scales where the formats keep them
    half = np.float16(0.01).tobytes()
    for b in range(nb):
        o = b * bb
        if type_id in (GGML.Q4_0, GGML.Q5_0, GGML.Q8_0, GGML.IQ4_NL):
            raw[o:o + 2] = half
        elif type_id in (GGML.Q4_1, GGML.Q5_1, GGML.Q8_1, GGML.Q4_K, GGML.Q5_K):
            raw[o:o + 4] = half + half
        elif type_id == GGML.Q2_K:
            raw[o + 80:o + 84] = half + half
        elif type_id == GGML.Q3_K:
            raw[o + 108:o + 110] = half
        elif type_id == GGML.Q6_K:
            raw[o + 208:o + 210] = half
        elif type_id == GGML.Q8_K:
            raw[o:o + 4] = np.float32(0.01).tobytes()
    return bytes(raw)


def gguf_model(seed=0, arch="llama", tokenizer="gpt2", types=None, with_tokenizer=True):
    """A loadable GGUF model. `types`: ggml type per matrix (cycled), default F32/F16/Q8_0/Q4_0/Q5_1."""
    rng = np.random.default_rng(seed)
    D = GG_DIMS
    d, hd, ffn = D["d"], D["head_dim"], D["ffn"]
    V = D["vocab"]
    types = types or [GGML.F32, GGML.F16, GGML.Q8_0, GGML.Q4_0, GGML.Q5_1, GGML.Q4_1, GGML.Q5_0, GGML.BF16]
    w = GGUFWriter()
    w.add("general.architecture", arch)
    w.add("general.name", "fuzz-tiny")
    w.add("general.alignment", 32, T.UINT32)
    w.add(f"{arch}.block_count", D["layers"], T.UINT32)
    w.add(f"{arch}.context_length", 64, T.UINT32)
    w.add(f"{arch}.embedding_length", d, T.UINT32)
    w.add(f"{arch}.feed_forward_length", ffn, T.UINT32)
    w.add(f"{arch}.attention.head_count", D["heads"], T.UINT32)
    w.add(f"{arch}.attention.head_count_kv", D["kv"], T.UINT32)
    w.add(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5, T.FLOAT32)
    w.add(f"{arch}.rope.freq_base", 10000.0, T.FLOAT32)
    if with_tokenizer:
        if tokenizer == "gpt2":
            w.add("tokenizer.ggml.model", "gpt2")
            w.add("tokenizer.ggml.pre", "qwen2" if arch == "qwen2" else "llama-bpe")
            w.add("tokenizer.ggml.tokens", TOK_VOCAB)
            w.add("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (V - 3), T.ARRAY, T.INT32)
            w.add("tokenizer.ggml.merges", TOK_MERGES)
        else:
            w.add("tokenizer.ggml.model", "llama")
            w.add("tokenizer.ggml.tokens", SP_VOCAB)
            w.add("tokenizer.ggml.scores", [0.0, 0.0, 0.0] + [-float(i) for i in range(V - 3)], T.ARRAY, T.FLOAT32)
            w.add("tokenizer.ggml.token_type", [2, 3, 3] + [1] * 16 + [6, 6] + [1] * 3, T.ARRAY, T.INT32)
        w.add("tokenizer.ggml.bos_token_id", 1, T.UINT32)
        w.add("tokenizer.ggml.eos_token_id", 2, T.UINT32)
        w.add("tokenizer.ggml.unknown_token_id", 0, T.UINT32)
        w.add("tokenizer.ggml.add_bos_token", True, T.BOOL)
        w.add("tokenizer.chat_template", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    k = [0]

    def mat(name, rows, cols):
        t = types[k[0] % len(types)]
        k[0] += 1
        w.add_tensor(name, quant_bytes(rng, t, rows * cols), t, ne=[cols, rows])

    def vec(name, n):
        w.add_tensor(name, (1.0 + rng.standard_normal(n) * 0.01).astype(np.float32).tobytes(), GGML.F32, ne=[n])

    mat("token_embd.weight", V, d)
    vec("output_norm.weight", d)
    mat("output.weight", V, d)
    for i in range(D["layers"]):
        p = f"blk.{i}."
        vec(p + "attn_norm.weight", d)
        vec(p + "ffn_norm.weight", d)
        mat(p + "attn_q.weight", D["heads"] * hd, d)
        mat(p + "attn_k.weight", D["kv"] * hd, d)
        mat(p + "attn_v.weight", D["kv"] * hd, d)
        mat(p + "attn_output.weight", d, D["heads"] * hd)
        mat(p + "ffn_gate.weight", ffn, d)
        mat(p + "ffn_up.weight", ffn, d)
        mat(p + "ffn_down.weight", d, ffn)
        if arch == "qwen2":
            for nm, n in (("attn_q.bias", D["heads"] * hd), ("attn_k.bias", D["kv"] * hd), ("attn_v.bias", D["kv"] * hd)):
                vec(p + nm, n)
    return w
