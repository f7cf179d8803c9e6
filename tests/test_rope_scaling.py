"""Rope scaling (issue 12 part 4): YaRN as transformers computes it, from config.json (rope_scaling / rope_parameters)
and from rope_scaling= passed to from_pretrained; a context past max_position_embeddings where YaRN extends it.

The reference is a transcription of transformers' _compute_yarn_parameters (modeling_rope_utils.py, transformers 5):
float32 tensors where it uses them, Python floats where it does. The core's own table comes from core.rope_freqs()."""
import importlib.util
import json
import math

import numpy as np
import pytest

import fastload
from fastload import arch
from golden_util import checkpoint_copy, load_cpu, model_dir


def yarn_reference(theta, dim, factor, orig, beta_fast=None, beta_slow=None, truncate=True, attention_factor=None,
                   mscale=None, mscale_all_dim=None):
    def get_mscale(scale, m=1):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    if attention_factor is None:
        attention_factor = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else get_mscale(factor))
    beta_fast, beta_slow = beta_fast or 32, beta_slow or 1

    def cdim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))
    low, high = cdim(beta_fast), cdim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos = np.float32(theta) ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))
    extra = np.float32(1.0) / pos
    inter = np.float32(1.0) / (np.float32(factor) * pos)
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    ef = np.float32(1) - ramp.astype(np.float32)
    return (inter * (1 - ef) + extra * ef).astype(np.float32), attention_factor


def qwen2_copy(dst, **config):
    """The qwen2 fixture copied to dst with the given config.json keys set."""
    return checkpoint_copy("qwen2", dst, config=config)


CASES = [
    # Qwen2.5's instructions: add this to config.json, keep max_position_embeddings 32768 (here: 128)
    ("qwen", {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}},
     dict(factor=4.0, orig=128)),
    ("transformers5", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6, "factor": 8.0,
                                           "original_max_position_embeddings": 32, "beta_fast": 16, "beta_slow": 2}},
     dict(factor=8.0, orig=32, beta_fast=16, beta_slow=2)),
    ("no_truncate", {"rope_scaling": {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 64,
                                      "truncate": False}}, dict(factor=2.5, orig=64, truncate=False)),
    ("deepseek_mscale", {"rope_scaling": {"rope_type": "yarn", "factor": 40.0, "mscale": 0.707,
                                          "mscale_all_dim": 0.707, "original_max_position_embeddings": 16}},
     dict(factor=40.0, orig=16, mscale=0.707, mscale_all_dim=0.707)),
    ("attention_factor", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25}},
     dict(factor=4.0, orig=128, attention_factor=1.25)),  # original_max_position_embeddings: max_position_embeddings
    ("no_factor", {"max_position_embeddings": 512, "rope_scaling": {"rope_type": "yarn",
                                                                    "original_max_position_embeddings": 128}},
     dict(factor=4.0, orig=128)),  # factor = max_position_embeddings / original
]


@pytest.mark.parametrize("name,config,ref", CASES, ids=[c[0] for c in CASES])
def test_yarn_frequencies_and_attention_factor_as_transformers(tmp_path, name, config, ref):
    m = load_cpu(qwen2_copy(tmp_path, **config))
    freqs, scale_mult = m._core.rope_freqs()
    want, attn = yarn_reference(1e6, 16, **ref)
    np.testing.assert_allclose(freqs, want, rtol=2e-7, atol=0)
    assert scale_mult == pytest.approx(np.float32(attn) ** 2, rel=1e-6)
    assert not np.allclose(freqs, yarn_reference(1e6, 16, 1.0, 128)[0])  # the scaling did something


def test_default_rope_table_unchanged(tmp_path):
    m = load_cpu(qwen2_copy(tmp_path))
    freqs, mult = m._core.rope_freqs()
    want = (np.float32(1) / np.float32(1e6) ** (np.arange(0, 16, 2).astype(np.float32) / np.float32(16)))
    np.testing.assert_allclose(freqs, want, rtol=2e-7)
    assert mult == 1.0


def test_yarn_attention_factor_is_the_softmax_scale(tmp_path):
    """YaRN multiplies cos and sin by the attention factor a, so q.k by a^2: with factor 1 (frequencies unchanged) and
    attention_factor a the logits equal those of the plain model whose q projection (weight and bias) is scaled by
    a^2, which is what transformers computes."""
    a = 1.3

    def scale_q(t):
        for k in list(t):
            if ".self_attn.q_proj." in k:
                t[k] = (t[k].astype(np.float64) * a * a).astype(np.float32)
    plain = checkpoint_copy("qwen2", tmp_path / "plain", change=scale_q)
    yarn = qwen2_copy(tmp_path / "yarn", rope_scaling={"rope_type": "yarn", "factor": 1.0, "attention_factor": a})
    ids = np.random.default_rng(0).integers(3, 600, (1, 40))
    got = np.asarray(load_cpu(yarn)(ids).logits)
    want = np.asarray(load_cpu(plain)(ids).logits)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    base = np.asarray(load_cpu(qwen2_copy(tmp_path / "base"))(ids).logits)
    assert np.abs(base - want).max() > 1e-2  # a^2 changes the logits: the comparison above is not vacuous


def test_yarn_extends_the_context(tmp_path):
    """Qwen's YaRN factor 4 with max_position_embeddings kept: a request may run past max_position_embeddings up to
    factor x original_max_position_embeddings; without the scaling the engine refuses it."""
    yarn = {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}}
    assert arch.context_length({"max_position_embeddings": 32768, "num_attention_heads": 28, "hidden_size": 3584,
                                "rope_theta": 1e6, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                                    "original_max_position_embeddings": 32768}}) == 131072
    ids = np.random.default_rng(1).integers(3, 600, (1, 200))
    m = load_cpu(qwen2_copy(tmp_path / "y", **yarn))
    out = np.asarray(m.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4))
    assert out.shape == (1, 204)
    plain = load_cpu(qwen2_copy(tmp_path / "n"))
    with pytest.raises(ValueError, match="128|context"):
        plain.generate(ids, max_new_tokens=4, do_sample=False)


def test_rope_scaling_argument_to_from_pretrained(tmp_path):
    """rope_scaling= given to from_pretrained overrides config.json, as transformers' config kwargs do."""
    p = qwen2_copy(tmp_path)
    m = load_cpu(p, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128})
    want, attn = yarn_reference(1e6, 16, 4.0, 128)
    freqs, mult = m._core.rope_freqs()
    np.testing.assert_allclose(freqs, want, rtol=2e-7)
    assert mult == pytest.approx(np.float32(attn) ** 2, rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    ({"rope_type": "yarn", "factor": -2.0}, "factor"),
    ({"rope_type": "yarn", "factor": 4.0, "beta_fast": float("nan")}, "beta_fast"),
    ({"rope_type": "yarn", "factor": 4.0, "truncate": "yes"}, "truncate"),
    ({"rope_type": "yarn", "factor": 4.0, "attention_factor": 0}, "attention_factor"),
    ({"rope_type": "yarn", "factor": 4.0, "rope_theta": 1.0}, "rope_theta > 1"),
    ({"rope_type": "yarn", "factor": 1e30}, "more than 2\\^31-1"),
])
def test_yarn_bad_values_name_the_key(tmp_path, bad, match):
    with pytest.raises((ValueError, fastload.CheckpointError), match=match):
        load_cpu(qwen2_copy(tmp_path, rope_scaling=bad))


HAVE_PEER = all(importlib.util.find_spec(x) for x in ("torch", "transformers"))
PEER_CASES = [c for c in CASES if c[0] in ("qwen", "transformers5", "no_truncate", "attention_factor")]


@pytest.mark.skipif(not HAVE_PEER, reason="torch and transformers are needed for the peer (not installed in CI)")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("name,config,ref", PEER_CASES, ids=[c[0] for c in PEER_CASES])
def test_yarn_logits_and_greedy_equal_transformers(tmp_path, device, name, config, ref):
    """The qwen2 fixture with each YaRN block, run by transformers (fp32, CPU) and by fastload in fp32 on `device`,
    over up to 300 tokens (the context YaRN gives, less 8; past original_max_position_embeddings): logits within 1e-4 of the largest, and 8 greedy tokens
    equal wherever transformers' own top-2 margin is clear of fastload's error (golden_util.teacher_forced_check)."""
    if device == "cuda" and not fastload.cuda.is_available():
        pytest.skip("no CUDA device here")
    import torch
    import transformers
    from golden_util import teacher_forced_check
    p = qwen2_copy(tmp_path, **config)
    if "rope_scaling" in config:
        # as Qwen2.5's own config.json: rope_theta at the top level, rope_scaling added by the user. (This fixture was
        # saved by transformers 5 with rope_parameters holding rope_theta; transformers 5 lets a rope_scaling block
        # replace that dict and then takes its class default, 1e4, for the missing theta; fastload keeps the model's
        # own theta there, a decision the README's rope scaling section explains.)
        d = json.load(open(p / "config.json"))
        d.pop("rope_parameters", None)
        d["rope_theta"] = 1e6
        json.dump(d, open(p / "config.json", "w"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
    rp = getattr(hf.config, "rope_parameters", None) or getattr(hf.config, "rope_scaling", None) or {}
    assert rp.get("rope_type", rp.get("type")) == "yarn", rp  # transformers did read the scaling
    T = min(300, arch.context_length(json.load(open(p / "config.json"))) - 8)
    ids = np.random.default_rng(7).integers(3, 600, (1, T))
    with torch.no_grad():
        t = torch.tensor(ids)
        want = hf(t).logits.numpy()
        r = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=8, min_new_tokens=8, do_sample=False,
                        eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    greedy = r.sequences.numpy()
    margins = np.array([[float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in r.scores]])
    m = fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map=device, torch_dtype="float32")
    got = np.asarray(m(ids).logits)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"{name} on {device}: max |logit - transformers| / max |transformers| = {err:.3g}"
    if teacher_forced_check(m, ids, greedy, margins):
        np.testing.assert_array_equal(m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[]), greedy)
    plain = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), dtype=torch.float32).eval()
    with torch.no_grad():
        base = plain(torch.tensor(ids)).logits.numpy()
    assert np.abs(base - want).max() / np.abs(want).max() > 10 * err  # the scaling changes transformers' logits


# ---- dynamic NTK -------------------------------------------------------------------------------------------------
def dynamic_reference(theta, dim, factor, max_pos, L):
    """transformers' _compute_dynamic_ntk_parameters (transformers 5.24) for a sequence of L tokens, float32 where torch
    computes it so: L a tensor, factor * L / max_pos - (factor - 1) and its power in float32, then base ** (2i / dim)."""
    if L <= max_pos:
        L = max_pos
    t = np.float32(factor) * np.float32(L)
    t = np.float32(t / np.float32(max_pos))
    t = np.float32(t - np.float32(factor - 1))
    base = np.float32(theta) * np.float32(t ** np.float32(dim / (dim - 2)))
    return (np.float32(1) / base ** (np.arange(0, dim, 2).astype(np.float32) / np.float32(dim))).astype(np.float32)


def test_dynamic_rope_is_the_default_table_up_to_max_position_embeddings(tmp_path):
    """Under max_position_embeddings (128 here) dynamic NTK is the plain rope: the same logits as the model without it;
    past it the frequencies change, so later positions differ."""
    dyn = load_cpu(qwen2_copy(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    plain = load_cpu(qwen2_copy(tmp_path / "plain"))
    ids = np.random.default_rng(3).integers(3, 600, (1, 120))
    np.testing.assert_array_equal(np.asarray(dyn(ids).logits), np.asarray(plain(ids).logits))
    long_ids = np.random.default_rng(4).integers(3, 600, (1, 200))
    a, b = np.asarray(dyn(long_ids).logits), np.asarray(plain(long_ids).logits)
    assert np.abs(a - b).max() > 1e-3  # 200 tokens > 128: every position rotates with the scaled base
    freqs, mult = dyn._core.rope_freqs()
    np.testing.assert_allclose(freqs, dynamic_reference(1e6, 16, 2.0, 128, 1), rtol=2e-7)  # the unscaled table
    assert mult == 1.0


def test_dynamic_rope_extends_the_context(tmp_path):
    m = load_cpu(qwen2_copy(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    out = np.asarray(m.generate(np.arange(3, 203)[None], max_new_tokens=4, do_sample=False, eos_token_id=[]))
    assert out.shape == (1, 204)
    with pytest.raises(ValueError, match="context"):
        m.generate(np.arange(3, 300)[None] % 600, max_new_tokens=4, do_sample=False)


@pytest.mark.parametrize("factor", [0, -1.0, float("nan")])
def test_dynamic_rope_bad_factor_names_it(tmp_path, factor):
    with pytest.raises((ValueError, fastload.CheckpointError), match="factor"):
        load_cpu(qwen2_copy(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": factor}))


DYN_CASES = [(2.0, 200, 8), (4.0, 300, 6), (2.0, 122, 12)]  # factor, prompt, new tokens (the last crosses 128 in decode)


@pytest.mark.skipif(not HAVE_PEER, reason="torch and transformers are needed for the peer (not installed in CI)")
@pytest.mark.parametrize("device", ["cpu", "cuda"])
@pytest.mark.parametrize("factor,T,new", DYN_CASES)
def test_dynamic_rope_equals_transformers(tmp_path, device, factor, T, new):
    """The qwen2 fixture (max_position_embeddings 128) with dynamic NTK, transformers fp32 on the CPU against fastload
    fp32 on `device`: the prompt's logits, and greedy tokens whose steps each recompute the frequencies for the length
    reached (transformers grows its table as the sequence does; a fresh transformers model per case, as its table
    also remembers earlier, longer calls)."""
    if device == "cuda" and not fastload.cuda.is_available():
        pytest.skip("no CUDA device here")
    import torch
    import transformers
    from golden_util import teacher_forced_check
    p = qwen2_copy(tmp_path, rope_scaling={"rope_type": "dynamic", "factor": factor})
    d = json.load(open(p / "config.json"))
    d.pop("rope_parameters", None)
    d["rope_theta"] = 1e6
    json.dump(d, open(p / "config.json", "w"))
    ids = np.random.default_rng(T).integers(3, 600, (1, T))

    def hf_model():
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(p), dtype=torch.float32).eval()
        assert hf.model.rotary_emb.rope_type == "dynamic"
        return hf
    with torch.no_grad():
        want = hf_model()(torch.tensor(ids)).logits.numpy()
        t = torch.tensor(ids)
        r = hf_model().generate(t, attention_mask=torch.ones_like(t), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, eos_token_id=None, pad_token_id=0, output_scores=True,
                                return_dict_in_generate=True)
    greedy = r.sequences.numpy()
    margins = np.array([[float(np.diff(np.sort(s[0].numpy())[-2:])[0]) for s in r.scores]])
    m = fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map=device, torch_dtype="float32")
    got = np.asarray(m(ids).logits)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < 1e-4, f"dynamic x{factor}, {T} tokens on {device}: {err:.3g}"
    # the decode steps: each recomputes the frequencies for the length reached (transformers' growing table); a
    # forward over the whole path would use the path's length for every position, so the free-running engine is
    # compared, once the first token's margin is clear of fastload's error
    if teacher_forced_check(m, ids, greedy[:, :T + 1], margins[:, :1]):
        out = np.asarray(m.generate(ids, max_new_tokens=new, do_sample=False, eos_token_id=[]))
        np.testing.assert_array_equal(out, greedy)


@pytest.mark.parametrize("theta,rp,ref", [
    # truncate false, a small original context: high = min(cdim(beta_slow), dim - 1) < 0 = low
    (1e6, {"factor": 4.0, "original_max_position_embeddings": 8, "beta_fast": 8, "beta_slow": 2, "truncate": False},
     dict(factor=4.0, orig=8, beta_fast=8, beta_slow=2, truncate=False)),
    # a small theta and a long original context: low = cdim(beta_fast) > dim - 1 = high
    (10.0, {"factor": 4.0, "original_max_position_embeddings": 32768}, dict(factor=4.0, orig=32768)),
])
def test_yarn_correction_range_upside_down_as_transformers(tmp_path, theta, rp, ref):
    """A correction range whose high end falls below its low end (the clamps to [0, dim - 1] cross): transformers
    takes it, its ramp (i - low) / (high - low) then falls; so does fastload's table (it was refused)."""
    m = load_cpu(qwen2_copy(tmp_path, rope_parameters={"rope_type": "yarn", "rope_theta": theta, **rp}))
    freqs, scale_mult = m._core.rope_freqs()
    want, attn = yarn_reference(theta, 16, **ref)
    np.testing.assert_allclose(freqs, want, rtol=2e-7, atol=0)
    assert scale_mult == pytest.approx(np.float32(attn) ** 2, rel=1e-6)
    assert np.isfinite(np.asarray(m(np.array([[3, 17, 23, 5, 9]])).logits)).all()
