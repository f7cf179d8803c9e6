"""Qwen3 dense (Qwen3ForCausalLM): the per-head RMSNorm of q and k (q_norm / k_norm) before rope, on the CPU.

The golden logits and greedy tokens of the tiny qwen3 fixture are checked by test_golden.py (TINY_MODELS); here:
the rope_store op with the norm against numpy, that the norm's weights reach the forward (scaling them changes the
logits, except at position 0, which attends to itself only), loading errors that name the tensor, the llama.cpp
GGUF names (blk.N.attn_q_norm / attn_k_norm), quantisation leaving the norm weights in float, save_pretrained,
and the config rules (head_dim default 128, attention_bias unsupported).
"""
import json

import numpy as np
import pytest

from fastload import CheckpointError, _C
from fastload import arch as archmod
from golden_util import assert_logits_close, checkpoint_copy, fixture_weights, load_case, load_cpu, model_dir
from gguf_util import GGML, GGUFWriter, T
import st_util

CASE = load_case("qwen3")
ATOL = CASE["meta"]["tolerances"]["logits_atol"]
CFG = json.loads((model_dir("qwen3") / "config.json").read_text())
L, HD, NH, NKV = CFG["num_hidden_layers"], CFG["head_dim"], CFG["num_attention_heads"], CFG["num_key_value_heads"]


WEIGHTS = fixture_weights("qwen3")


def checkpoint(tmp_path, change=None):
    """The qwen3 fixture copied to tmp_path / "ckpt", its tensors (as float32) passed through change(dict) first."""
    return checkpoint_copy("qwen3", tmp_path / "ckpt", change)


def single_logits(m):
    return np.asarray(m(CASE["single_ids"]).logits, np.float32)


# ------------------------------------------------------------------------------------------------
# the op: rope_store with qk_norm
# ------------------------------------------------------------------------------------------------
def rope_ref(x, pos, inv):
    """Rotate-half rope of x [N, heads, hd] at positions pos [N] (float32 angles, as the backends)."""
    f = (pos.astype(np.float32)[:, None] * inv[None, :]).astype(np.float32)
    c, s = np.cos(f)[:, None, :], np.sin(f)[:, None, :]
    h = x.shape[-1] // 2
    a, b = x[..., :h], x[..., h:]
    return np.concatenate([a * c - b * s, b * c + a * s], -1)


def rms_ref(x, w, eps):
    return w * (x / np.sqrt(np.mean(x.astype(np.float64) ** 2, -1, keepdims=True) + eps)).astype(np.float32)


@pytest.mark.parametrize("nh,nkv,hd", [(4, 2, 48), (3, 3, 16), (8, 1, 128)])
def test_rope_store_qk_norm_matches_numpy(nh, nkv, hd):
    rng = np.random.default_rng(nh * 100 + hd)
    B, T, start, max_len, eps = 2, 5, 3, 12, 1e-6
    qkv = (rng.standard_normal((B * T, (nh + 2 * nkv) * hd)) * 3).astype(np.float32)
    w = (1 + 0.3 * rng.standard_normal(2 * hd)).astype(np.float32)
    pos = rng.integers(0, 4000, B * T).astype(np.int32)
    inv = (1.0 / (1e6 ** (np.arange(hd // 2, dtype=np.float32) * 2 / hd))).astype(np.float32)
    kc = rng.standard_normal((B, max_len, nkv, hd)).astype(np.float32)
    vc = rng.standard_normal((B, max_len, nkv, hd)).astype(np.float32)
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "eps": eps, "act": "float32"}
    got = _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": vc,
                                          "qk_norm": w}, params)
    q = qkv[:, :nh * hd].reshape(-1, nh, hd)
    k = qkv[:, nh * hd:(nh + nkv) * hd].reshape(-1, nkv, hd)
    v = qkv[:, (nh + nkv) * hd:].reshape(-1, nkv, hd)
    q_ref = rope_ref(rms_ref(q, w[:hd], eps), pos, inv)
    k_ref = rope_ref(rms_ref(k, w[hd:], eps), pos, inv)
    out = got["qkv"]
    np.testing.assert_allclose(out[:, :nh * hd].reshape(-1, nh, hd), q_ref, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(out[:, nh * hd:(nh + nkv) * hd].reshape(-1, nkv, hd), k_ref, rtol=2e-5, atol=2e-5)
    assert np.array_equal(out[:, (nh + nkv) * hd:], qkv[:, (nh + nkv) * hd:])  # v untouched
    for b in range(B):
        sl = slice(b * T, (b + 1) * T)
        np.testing.assert_array_equal(got["k_cache"][b, start:start + T],
                                      out[sl, nh * hd:(nh + nkv) * hd].reshape(T, nkv, hd))
        np.testing.assert_array_equal(got["v_cache"][b, start:start + T], v[sl])
    # without qk_norm: rope only (the op every other architecture runs)
    plain = _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": vc},
                      params)
    np.testing.assert_allclose(plain["qkv"][:, :nh * hd].reshape(-1, nh, hd), rope_ref(q, pos, inv), rtol=2e-5, atol=1e-4)


def test_rope_store_qk_norm_shape_checked():
    qkv = np.ones((1, 4 * 16), np.float32)
    with pytest.raises(ValueError, match="qk_norm must have 2 \\* head_dim"):
        _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": np.zeros(1, np.int32), "inv_freq": np.ones(8, np.float32),
                                        "qk_norm": np.ones(16, np.float32)},
                  {"B": 1, "T": 1, "max_len": 4, "n_heads": 2, "n_kv_heads": 1, "act": "float32"})


# ------------------------------------------------------------------------------------------------
# the model: the weights reach the forward
# ------------------------------------------------------------------------------------------------
def test_fixture_reloaded_as_float32_matches_golden(tmp_path):
    """The rewritten checkpoint (float32 tensors) is the same model: the baseline of the tests below."""
    m = load_cpu(checkpoint(tmp_path))
    assert m.arch.name == "Qwen3ForCausalLM" and m.arch.qk_norm
    assert_logits_close(single_logits(m), CASE["single_logits"], ATOL)


@pytest.mark.parametrize("which", ["q_norm", "k_norm"])
def test_norm_weights_change_the_logits(tmp_path, which):
    rng = np.random.default_rng(7)

    def scale(w):
        for i in range(L):
            k = f"model.layers.{i}.self_attn.{which}.weight"
            w[k] = (w[k] * (1 + 0.5 * rng.standard_normal(HD))).astype(np.float32)
    got = single_logits(load_cpu(checkpoint(tmp_path, scale)))
    diff = np.abs(got - CASE["single_logits"]).max(-1)[0]
    # position 0 attends only to itself: q and k cannot change it; every later position must move materially
    assert diff[0] < ATOL, diff
    assert diff[1:].min() > 0.05, diff


def test_missing_q_norm_names_the_tensor(tmp_path):
    p = checkpoint(tmp_path, lambda w: w.pop("model.layers.1.self_attn.q_norm.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.self_attn\.q_norm\.weight'"):
        load_cpu(p)


def test_wrong_k_norm_shape_names_the_tensor(tmp_path):
    def bad(w):
        w["model.layers.2.self_attn.k_norm.weight"] = np.ones(HD + 2, np.float32)
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.self_attn\.k_norm\.weight.*k_norm.*expected \[48\]"):
        load_cpu(checkpoint(tmp_path, bad))


def test_a_row_without_qk_norm_leaves_the_norms_unused(tmp_path):
    """The flag is the architecture's: the same weights read as Llama (no q/k norm) load, report the q/k norm tensors
    unused, and give other logits."""
    p = checkpoint(tmp_path)
    (p / "config.json").write_text(json.dumps(dict(CFG, architectures=["LlamaForCausalLM"], model_type="llama")))
    with pytest.warns(UserWarning, match=r"6 checkpoint tensor\(s\) not used by LlamaForCausalLM.*q_norm"):
        m = load_cpu(p)
    assert not m.arch.qk_norm
    assert np.abs(single_logits(m) - CASE["single_logits"]).max(-1)[0, 1:].min() > 0.05


# ------------------------------------------------------------------------------------------------
# quantisation, saving, parameters, config rules
# ------------------------------------------------------------------------------------------------
def test_quantised_at_load_keeps_the_norms_float():
    m = load_cpu(model_dir("qwen3"), load_in_8bit=True, torch_dtype="float32")
    lay = {d["name"]: d for d in m._core.layouts()}
    for i in range(L):
        assert lay[f"layers.{i}.qk_norm"]["dtype"] == "float32" and lay[f"layers.{i}.qk_norm"]["rows"] == 2 * HD
        assert lay[f"layers.{i}.wqkv"]["dtype"] == "int8"
    err = np.abs(single_logits(m) - CASE["single_logits"]).max()
    assert np.isfinite(err) and err < 2.0, err  # int8 linear layers: close, not exact


def test_save_pretrained_round_trip(tmp_path):
    m = load_cpu(model_dir("qwen3"))
    m.save_pretrained(tmp_path / "out")
    saved = st_util.read_f32(tmp_path / "out" / "model.safetensors")
    for i in range(L):
        for which in ("q_norm", "k_norm"):
            k = f"model.layers.{i}.self_attn.{which}.weight"
            np.testing.assert_array_equal(saved[k], WEIGHTS[k])
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForCausalLM"] and cfg["head_dim"] == HD
    np.testing.assert_array_equal(single_logits(load_cpu(tmp_path / "out")), single_logits(m))


def test_num_parameters_counts_the_norms():
    m = load_cpu(model_dir("qwen3"))
    assert m.num_parameters() == sum(int(v.size) for v in WEIGHTS.values())


def test_head_dim_default_is_qwen3s():
    """transformers' Qwen3Config defaults head_dim to 128 (not hidden / heads, which Qwen2 uses)."""
    q3, q2 = archmod.ARCHITECTURES["Qwen3ForCausalLM"], archmod.ARCHITECTURES["Qwen2ForCausalLM"]
    base = {k: v for k, v in CFG.items() if k != "head_dim"}
    assert archmod.core_config(base, q3, "cfg")["head_dim"] == 128
    assert archmod.core_config(dict(base, head_dim=48), q3, "cfg")["head_dim"] == 48
    assert archmod.core_config(dict(base, architectures=["Qwen2ForCausalLM"], model_type="qwen2"), q2, "cfg")[
        "head_dim"] == CFG["hidden_size"] // NH


def test_gguf_head_dim_default_is_llama_cpps():
    """A qwen3 GGUF without attention.key_length: llama.cpp's default hidden / heads, written into the config (so that
    save_pretrained and the engine do not take transformers' 128 instead)."""
    meta = {"general.architecture": "qwen3", "qwen3.block_count": 1, "qwen3.embedding_length": 64,
            "qwen3.attention.head_count": 4, "qwen3.feed_forward_length": 96, "qwen3.vocab_size": 32}
    arch, hf = archmod.gguf_config(meta, "m.gguf")
    assert arch.name == "Qwen3ForCausalLM" and hf["head_dim"] == 16
    assert archmod.core_config(hf, arch, "m.gguf")["head_dim"] == 16
    arch, hf = archmod.gguf_config(dict(meta, **{"qwen3.attention.key_length": 48}), "m.gguf")
    assert hf["head_dim"] == 48


def test_attention_bias_is_refused(tmp_path):
    p = checkpoint(tmp_path)
    (p / "config.json").write_text(json.dumps(dict(CFG, attention_bias=True)))
    with pytest.raises(NotImplementedError, match="attention_bias=true is not supported for Qwen3ForCausalLM"):
        load_cpu(p)


# ------------------------------------------------------------------------------------------------
# GGUF: llama.cpp's qwen3 architecture (no q/k row permutation; blk.N.attn_q_norm / attn_k_norm)
# ------------------------------------------------------------------------------------------------
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
              "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_qwen3_gguf(path, drop=()):
    """The fixture as a llama.cpp qwen3 GGUF, every tensor F32 (exactly the stored bf16 values)."""
    w = GGUFWriter()
    ga = "qwen3"
    for k, v, t in [("general.architecture", ga, T.STRING), (f"{ga}.block_count", L, T.UINT32),
                    (f"{ga}.context_length", CFG["max_position_embeddings"], T.UINT32),
                    (f"{ga}.embedding_length", CFG["hidden_size"], T.UINT32),
                    (f"{ga}.feed_forward_length", CFG["intermediate_size"], T.UINT32),
                    (f"{ga}.attention.head_count", NH, T.UINT32), (f"{ga}.attention.head_count_kv", NKV, T.UINT32),
                    (f"{ga}.attention.key_length", HD, T.UINT32), (f"{ga}.attention.value_length", HD, T.UINT32),
                    (f"{ga}.rope.freq_base", CFG["rope_parameters"]["rope_theta"], T.FLOAT32),
                    (f"{ga}.attention.layer_norm_rms_epsilon", CFG["rms_norm_eps"], T.FLOAT32),
                    ("tokenizer.ggml.bos_token_id", 1, T.UINT32), ("tokenizer.ggml.eos_token_id", 2, T.UINT32)]:
        w.add(k, v, t)

    def put(name, a):
        if name not in drop:
            w.add_tensor(name, np.ascontiguousarray(a, np.float32), GGML.F32, list(a.shape[::-1]))
    put("token_embd.weight", WEIGHTS["model.embed_tokens.weight"])  # tied: no output.weight
    put("output_norm.weight", WEIGHTS["model.norm.weight"])
    for i in range(L):
        for hf, g in GGUF_NAMES.items():
            put(f"blk.{i}.{g}.weight", WEIGHTS[f"model.layers.{i}.{hf}.weight"])
    return w.write(str(path))


def test_gguf_qwen3_matches_golden(tmp_path):
    m = load_cpu(write_qwen3_gguf(tmp_path / "q3.gguf"))
    assert m.arch.name == "Qwen3ForCausalLM" and m.config["head_dim"] == HD
    assert_logits_close(single_logits(m), CASE["single_logits"], ATOL)
    out = np.asarray(m.generate(CASE["single_ids"], max_new_tokens=16, do_sample=False))
    np.testing.assert_array_equal(out, CASE["single_greedy"])


def test_gguf_qwen3_missing_k_norm_names_the_tensor(tmp_path):
    p = write_qwen3_gguf(tmp_path / "q3.gguf", drop=("blk.1.attn_k_norm.weight",))
    with pytest.raises(CheckpointError, match=r"missing tensor 'blk\.1\.attn_k_norm\.weight'"):
        load_cpu(p)
