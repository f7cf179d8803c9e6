"""Quantised checkpoints end to end (issue 9, part 3): GPTQ, AWQ and GGUF fixtures made by tests/quant_fixtures.py
from random weights with each format's own packing, loaded by fastload, give the logits of the float model whose
weights are the dequantised values (the reference directory / file next to each fixture). Then bad input: shapes
that disagree, unsupported bits or group sizes, g_idx out of range or with unequal groups, wrong dtypes, missing
and truncated tensors -> a clear exception naming the file and the tensor.

Tolerances (max abs logit error, relative to the reference's max |logit|, about 15-55 here):
- FORWARD_REL 5e-4: forward() of several tokens runs the prefill path, float32 activations on exactly the
  dequantised weights; an honest float32 implementation differs by about 1e-4 absolute (summation order,
  tests/fixtures/README.md), a packing bug (nibble order, zero offset, group of a column) by whole units.
- DECODE_REL 8e-2: a one-token forward and generate's steps may use a decode kernel that quantises activations
  to int8 per 32 values as llama.cpp does. A numpy simulation of exactly that on these fixtures (float weights,
  activations rounded to int8 per 32 before every quantised matmul) moves one-token logits by 1.7-1.8% of
  max |logit| (median) and 3.3% at most over 37 tokens; the CPU kernels measured 1.5-2.1% (median) and 3.5%
  at most over every fixture; a packing bug moves them by more than 100%.
  Greedy tokens are compared up to the first step whose reference margin (top1 - top2) is below
  GREEDY_MARGIN_REL * max |logit| (twice the worst measured error), and the prompts are picked so that their
  first two steps have larger margins (the comparison is never vacuous).
"""
import json
import os

import numpy as np
import pytest

import fastload
import quant_fixtures as qf
import st_util
from fastload import CheckpointError

FORWARD_REL = 5e-4
DECODE_REL = 8e-2
GREEDY_MARGIN_REL = 7e-2
NEW = 8
HAS_CUDA = fastload.cuda.is_available()
ALL = list(qf.CASES)
SAFETENSORS = [c for c in ALL if qf.CASES[c][0] != "gguf"]
GGUF = [c for c in ALL if qf.CASES[c][0] == "gguf"]


def load(path, device="cpu", **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), device_map=device, torch_dtype="float32", **kw)


def load_ref(path):
    """The float reference: one thread (its speed does not matter; the quantised model keeps the default)."""
    return load(path, threads=1)


def logits(m, ids):
    return np.asarray(m(ids).logits, dtype=np.float32)


def quantised_count(m):
    core = getattr(m, "_core", None)
    return (getattr(core, "info", None) or {}).get("quantized_weights")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """case id -> (quantised path, reference path), written once per module on first use."""
    root = tmp_path_factory.mktemp("quant")
    cache = {}

    def get(case):
        if case not in cache:
            cache[case] = qf.write_case(case, root)
        return cache[case]
    return get


_models = {}


def models(built, case, device="cpu"):
    """(quantised model on `device`, float reference on the CPU, vocab size, prompt [2, 10])."""
    key = (case, device)
    if key not in _models:
        q, r = built(case)
        mr = _models.get((case, "ref")) or load_ref(r)
        _models[(case, "ref")] = mr
        mq = load(q, device)
        n = quantised_count(mq)
        assert n is not None and n > 0, f"{case}: the weights were not kept quantised (core.info quantized_weights={n})"
        _models[key] = (mq, mr, mr.config["vocab_size"], pick_prompts(mr, mr.config["vocab_size"]))
    return _models[key]


def margins_of(m, seq, T):
    """top1 - top2 of m's logits at the positions that chose seq[:, T:] (float prefill)."""
    lg = logits(m, seq[:, :-1])[0, T - 1:]
    s = np.sort(lg, axis=-1)
    return s[:, -1] - s[:, -2], float(np.abs(lg).max())


def pick_prompts(mr, V):
    """Two prompts of 10 tokens (ids 3..V-1) whose greedy continuations under the reference have margins
    >= 1.2 * GREEDY_MARGIN_REL * max|logit| at their first two steps: the best two of 32 random prompts
    (one batched generate and one forward; deterministic)."""
    ids = np.random.default_rng(1000).integers(3, V, (32, 10))
    g = np.asarray(mr.generate(ids, max_new_tokens=2, do_sample=False))
    lg = logits(mr, g[:, :-1])[:, 9:]
    s = np.sort(lg, axis=-1)
    mg = (s[..., -1] - s[..., -2]).min(axis=1) / np.abs(lg).max(axis=(1, 2))
    mg[np.isin(g[:, 10:], (0, 1, 2)).any(axis=1)] = -1          # a row that met eos / pad is no candidate
    best = np.argsort(-mg)[:2]
    assert mg[best].min() >= 1.2 * GREEDY_MARGIN_REL, f"no prompts with clear margins ({mg[best]}): change the seed"
    return ids[best]


def assert_close(got, want, rel, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    assert np.isfinite(got).all(), f"{what}: non-finite logits"
    tol = rel * float(np.abs(want).max())
    err = float(np.abs(got - want).max())
    assert err <= tol, f"{what}: max abs logit error {err:.3g} > {tol:.3g} (max |logit| {np.abs(want).max():.3g})"
    return err


def check_greedy(mq, mr, ids, what):
    T = ids.shape[1]
    gr = np.asarray(mr.generate(ids, max_new_tokens=NEW, do_sample=False))
    gq = np.asarray(mq.generate(ids, max_new_tokens=NEW, do_sample=False))
    if gq.shape == gr.shape and (gq == gr).all():
        return
    n = min(gq.shape[1], gr.shape[1])
    diff = np.nonzero(gq[0, T:n] != gr[0, T:n])[0]
    assert diff.size, f"{what}: one greedy continuation is a prefix of the other: {gq[0, T:]} vs {gr[0, T:]}"
    k = int(diff[0])
    mg, mx = margins_of(mr, gr, T)
    assert mg[k] < GREEDY_MARGIN_REL * mx, (f"{what}: greedy differs at new token {k} ({gq[0, T:]} vs reference "
                                            f"{gr[0, T:]}) where the reference margin {mg[k]:.3g} is clear")


# ================================================================================================
# logits against the dequantised reference
# ================================================================================================

@pytest.mark.parametrize("case", ALL)
def test_prefill_logits_match_the_dequantised_reference(built, case):
    mq, mr, V, ids = models(built, case)
    assert_close(logits(mq, ids), logits(mr, ids), FORWARD_REL, case)
    # one row with a left-padded shorter prompt: the batch path
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    assert_close(np.asarray(mq(ids, attention_mask=mask).logits)[mask == 1],
                 np.asarray(mr(ids, attention_mask=mask).logits)[mask == 1], FORWARD_REL, case + " (padded batch)")


@pytest.mark.parametrize("case", ALL)
def test_one_token_logits_match(built, case):
    """A one-token forward: the decode kernels (GEMV) where the backend picks them by batch size."""
    mq, mr, V, ids = models(built, case)
    for t in ids[0, :4]:
        one = np.array([[t]])
        assert_close(logits(mq, one), logits(mr, one), DECODE_REL, f"{case} token {t}")


@pytest.mark.parametrize("case", ALL)
def test_greedy_generate_matches(built, case):
    mq, mr, V, ids = models(built, case)
    for row in ids:
        check_greedy(mq, mr, row[None], case)


def test_gptq_v1_and_v2_of_the_same_weights_load_the_same(tmp_path):
    """The zero-point offset convention: the same quantisation stored v1 (zero - 1) and v2 (zero) loads to the
    same model; read as the wrong convention it would not (the reference differs by one step per group)."""
    cfg = {"bits": 4, "group_size": 32, "sym": False}
    q1, r1 = qf.write_gptq_checkpoint(tmp_path / "v1", dict(cfg, checkpoint_format="gptq"), seed=3)
    q2, _ = qf.write_gptq_checkpoint(tmp_path / "v2", dict(cfg, checkpoint_format="gptq_v2"), seed=3)
    ids = np.random.default_rng(0).integers(3, 320, (1, 12))
    a, b, ref = logits(load(q1), ids), logits(load(q2), ids), logits(load_ref(r1), ids)
    assert_close(a, ref, FORWARD_REL, "v1")
    assert_close(b, ref, FORWARD_REL, "v2")


def test_gptq_format_key_of_transformers(tmp_path):
    """transformers' GPTQConfig reads `format` (current) or `checkpoint_format` (legacy): a config with only
    "format": "gptq_v2" is a v2 checkpoint."""
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": False,
                                                     "checkpoint_format": "gptq_v2"}, seed=4)
    p = os.path.join(q, "config.json")
    cfg = json.load(open(p))
    qc = cfg["quantization_config"]
    qc["format"] = qc.pop("checkpoint_format")
    json.dump(cfg, open(p, "w"))
    ids = np.random.default_rng(1).integers(3, 320, (1, 12))
    assert_close(logits(load(q), ids), logits(load_ref(r), ids), FORWARD_REL, "format key")


@pytest.mark.parametrize("dynamic", [{"-:model\\.layers\\.1\\.mlp\\..*": {}},
                                     {"+:.*down_proj": {"bits": 8, "group_size": 64}}], ids=["skip", "bits"])
def test_gptq_dynamic_overrides_load_right_or_are_refused(tmp_path, dynamic):
    """GPTQModel's per-module "dynamic" overrides (modules left float, or other bits / group size): either the
    logits match the dequantised reference, or loading refuses naming "dynamic" (never a silent misreading)."""
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": False, "dynamic": dynamic})
    ids = np.random.default_rng(2).integers(3, 320, (1, 12))
    try:
        m = load(q)
    except NotImplementedError as e:
        msg = str(e).replace(str(q), "<dir>")              # the directory holds the test's name
        assert "dynamic" in msg, msg
        return
    assert_close(logits(m, ids), logits(load_ref(r), ids), FORWARD_REL, "dynamic")


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_gptq_scales_not_float16_load_right(tmp_path, scale_dtype, sym):
    """AutoGPTQ stores scales in the layer's dtype (qlinear_cuda.py pack), so bfloat16 / float32 scales exist: they
    widen to quant.h's float32 scales exactly (symmetric ones too, which float16 scales keep as float16), and the
    logits match the dequantised reference."""
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": sym},
                                    scale_dtype=scale_dtype)
    ids = np.random.default_rng(3).integers(3, 320, (1, 12))
    m = load(q)
    lay = {x["name"]: x for x in m._core.layouts()}
    assert lay["layers.0.wqkv"]["scale_dtype"] == "float32" and lay["layers.0.wqkv"]["zeros"] == (not sym)
    assert_close(logits(m, ids), logits(load_ref(r), ids), FORWARD_REL, scale_dtype + " scales")


# ---------------------------------------------------------------- GPU (the lead runs these on the GPU machine)
CUDA_CASES = ["gptq-4b-g32-asym-v1-actorder", "gptq-8b-g128-sym-v1", "gptq-4b-g64-asym-v2-qwen2", "awq-g32",
              "awq-g128-not-converted", "gguf-Q4_K_M", "gguf-Q4_1", "gguf-Q5_K", "gguf-mixed-all"]


@pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))
@pytest.mark.parametrize("case", CUDA_CASES)
def test_cuda_matches_the_dequantised_reference(built, case):
    mq, mr, V, ids = models(built, case, "cuda")
    assert_close(logits(mq, ids), logits(mr, ids), 4 * FORWARD_REL, case + " cuda prefill")
    assert_close(logits(mq, ids[:1, :1]), logits(mr, ids[:1, :1]), DECODE_REL, case + " cuda one token")
    for row in ids:
        check_greedy(mq, mr, row[None], case + " cuda")


# ================================================================================================
# bad input: a clear error naming the file and the tensor
# ================================================================================================

ERRORS = (CheckpointError, NotImplementedError)
MOD = "model.layers.0.self_attn.q_proj"          # [128 out, 128 in] in the llama fixtures


def expect(path, exc, *needles):
    """load(path) raises exc whose message holds every needle; the directory is cut out of the message first
    (it holds the test's name), so "model.safetensors" / "m.gguf" stand for the file."""
    with pytest.raises(exc) as e:
        load(path)
    d = str(path) if os.path.isdir(str(path)) else os.path.dirname(str(path))
    msg = str(e.value).replace(d, "<dir>")
    for n in needles:
        assert str(n) in msg, f"{n!r} not in the message: {msg}"
    return msg


def gptq(tmp_path, **cfg):
    c = {"bits": 4, "group_size": 32, "sym": False}
    c.update(cfg)
    q, _ = qf.write_gptq_checkpoint(tmp_path / "g", c)
    return q, os.path.join(q, "model.safetensors")


def awq(tmp_path, **kw):
    q, _ = qf.write_awq_checkpoint(tmp_path / "a", **kw)
    return q, os.path.join(q, "model.safetensors")


def set_qc(q, **changes):
    p = os.path.join(q, "config.json")
    cfg = json.load(open(p))
    cfg["quantization_config"].update(changes)
    json.dump(cfg, open(p, "w"))


@pytest.mark.parametrize("tensor,shape", [("qweight", (15, 128)), ("qweight", (16, 120)), ("qzeros", (4, 15)),
                                          ("qzeros", (3, 16)), ("scales", (4, 120)), ("scales", (3, 128)),
                                          ("g_idx", (120,))])
def test_gptq_shapes_that_disagree(tmp_path, tensor, shape):
    q, f = gptq(tmp_path)
    dt = {"qweight": np.int32, "qzeros": np.int32, "scales": np.float16, "g_idx": np.int32}[tensor]
    qf.rewrite_safetensors(f, {f"{MOD}.{tensor}": np.zeros(shape, dt)})
    expect(q, ERRORS, "model.safetensors", MOD)


@pytest.mark.parametrize("tensor,shape", [("qweight", (128, 15)), ("qweight", (120, 16)), ("qzeros", (4, 15)),
                                          ("qzeros", (5, 16)), ("scales", (4, 120)), ("scales", (2, 128))])
def test_awq_shapes_that_disagree(tmp_path, tensor, shape):
    q, f = awq(tmp_path)
    dt = np.float16 if tensor == "scales" else np.int32
    qf.rewrite_safetensors(f, {f"{MOD}.{tensor}": np.zeros(shape, dt)})
    expect(q, ERRORS, "model.safetensors", MOD)


# (scales are not in the list: AutoGPTQ's pack stores them in the layer's dtype, so bf16 / f32 scales exist)
@pytest.mark.parametrize("tensor,dtype", [("qweight", np.float32), ("qweight", np.uint8), ("qzeros", np.float32),
                                          ("g_idx", np.float32)])
def test_gptq_wrong_dtypes(tmp_path, tensor, dtype):
    q, f = gptq(tmp_path)
    old = qf.read_safetensors(f)[f"{MOD}.{tensor}"]
    qf.rewrite_safetensors(f, {f"{MOD}.{tensor}": old.astype(dtype)})
    expect(q, ERRORS, "model.safetensors", f"{MOD}.{tensor}")


@pytest.mark.parametrize("tensor", ["qzeros", "scales"])
def test_gptq_missing_tensor(tmp_path, tensor):
    q, f = gptq(tmp_path)
    qf.rewrite_safetensors(f, {f"{MOD}.{tensor}": None})
    expect(q, ERRORS, f"{MOD}.{tensor}")


@pytest.mark.parametrize("bits", [2, 3, 5, 16])
def test_gptq_unsupported_bits(tmp_path, bits):
    q, _ = gptq(tmp_path)
    set_qc(q, bits=bits)
    msg = expect(q, ERRORS, "bits", str(bits))
    assert "4" in msg and "8" in msg, msg                       # says what is supported


def test_awq_only_4_bit(tmp_path):
    q, _ = awq(tmp_path)
    set_qc(q, bits=8)
    expect(q, ERRORS, "bits", "8")


@pytest.mark.parametrize("fmt", ["marlin", "gptq_v3", "bitblas"])
def test_gptq_unknown_checkpoint_format(tmp_path, fmt):
    q, _ = gptq(tmp_path)
    set_qc(q, checkpoint_format=fmt)
    expect(q, ERRORS, fmt)


def test_gptq_marlin_format_flag_is_refused(tmp_path):
    """Older AutoGPTQ marks Marlin-repacked checkpoints with is_marlin_format: a different packing."""
    q, _ = gptq(tmp_path, sym=True)
    set_qc(q, is_marlin_format=True)
    expect(q, ERRORS, "marlin")


@pytest.mark.parametrize("version", ["gemv", "gemv_fast", "llm-awq"])   # transformers' AwqFormat values
def test_awq_other_packings_are_refused(tmp_path, version):
    q, _ = awq(tmp_path)
    set_qc(q, version=version)
    expect(q, ERRORS, version)


def test_awq_without_zero_point_is_refused(tmp_path):
    q, _ = awq(tmp_path)
    set_qc(q, zero_point=False)
    expect(q, ERRORS, "zero_point")


def test_gptq_pack_dtype_other_than_int32(tmp_path):
    """GPTQModel can pack into int16 words (pack_dtype): qweight [in * bits / 16, out] I16. Not the layout the
    repacker reads: refused naming the tensor (the config's pack_dtype alone, with int32 tensors, may load)."""
    q, f = gptq(tmp_path)
    t = qf.read_safetensors(f)
    for k, ax in ((f"{MOD}.qweight", 0), (f"{MOD}.qzeros", 1)):
        w = t[k].view(np.uint32)                          # 16-bit words: the low half first, along the packed dim
        halves = np.stack([w & 0xFFFF, w >> 16], axis=ax + 1).astype(np.uint16)
        shape = list(w.shape)
        shape[ax] *= 2
        t[k] = halves.reshape(shape).view(np.int16)
    st_util.write(f, t)
    set_qc(q, pack_dtype="int16")
    expect(q, ERRORS, "model.safetensors", MOD)


def test_group_size_not_dividing_in_features(tmp_path):
    """group_size 48 for in_features 128 / 256: AutoGPTQ would make ceil(128 / 48) = 3 groups, which fastload's
    format (groups of equal size along a row) cannot hold; consistent tensors, refused clearly."""
    q, f = gptq(tmp_path)
    t = qf.read_safetensors(f)
    rng = np.random.default_rng(0)
    for i in range(2):
        for s in qf.LINEARS:
            p = f"model.layers.{i}.{s}."
            out, inn = t[p + "scales"].shape[1], t[p + "g_idx"].shape[0]
            ng = -(-inn // 48)
            packed = qf.gptq_pack(rng.integers(0, 16, (out, inn)), rng.integers(1, 16, (ng, out)),
                                  np.full((ng, out), 0.01, np.float16), np.arange(inn) // 48, 4, 1)
            for k, v in packed.items():
                t[p + k] = v
    st_util.write(f, t)
    set_qc(q, group_size=48)
    expect(q, ERRORS, "48")


@pytest.mark.parametrize("bad", [128, 4, -1])
def test_g_idx_out_of_range(tmp_path, bad):
    q, f = gptq(tmp_path, desc_act=True)
    g = qf.read_safetensors(f)[f"{MOD}.g_idx"].copy()
    g[5] = bad
    qf.rewrite_safetensors(f, {f"{MOD}.g_idx": g})
    expect(q, ERRORS, "model.safetensors", MOD, "g_idx", str(bad))


def test_g_idx_with_unequal_groups(tmp_path):
    """csrc/quant.h: a g_idx whose groups are not all group_size columns is refused."""
    q, f = gptq(tmp_path, desc_act=True)
    g = qf.read_safetensors(f)[f"{MOD}.g_idx"].copy()
    g[np.nonzero(g == 1)[0][0]] = 0                          # group 0: 33 columns, group 1: 31
    qf.rewrite_safetensors(f, {f"{MOD}.g_idx": g})
    expect(q, ERRORS, "model.safetensors", MOD, "g_idx")


def test_fused_parts_with_different_act_order(tmp_path):
    """q/k/v (and gate/up) share GPTQ's permutation in real checkpoints (same input, same Hessian); fastload
    fuses them into one weight with one column order, so parts with different g_idx orders are refused by name
    (they would need separate weights)."""
    q, _ = qf.write_gptq_checkpoint(tmp_path / "g", {"desc_act": True, "sym": False}, shared_perm=False)
    expect(q, ERRORS, "model.safetensors", "model.layers.0.self_attn.", "g_idx")


@pytest.mark.parametrize("kind,tensor", [("gptq", "qweight"), ("gptq", "qzeros"), ("gptq", "scales"),
                                         ("awq", "qweight"), ("awq", "scales")])
def test_truncated_quantised_tensor(tmp_path, kind, tensor):
    """The file is shorter than its header says, the cut inside a quantised tensor (the last one)."""
    q, f = gptq(tmp_path) if kind == "gptq" else awq(tmp_path)
    qf.rewrite_safetensors(f, order=[f"{MOD}.{tensor}"])
    raw = open(f, "rb").read()
    open(f, "wb").write(raw[:-7])
    expect(q, CheckpointError, "model.safetensors", f"{MOD}.{tensor}")


def test_truncated_quantised_gguf(tmp_path):
    p, _ = qf.write_quant_gguf(tmp_path / "m.gguf", qf.Q4_K_M)
    raw = open(p, "rb").read()
    open(p, "wb").write(raw[:-100])                     # the last tensor: blk.1.ffn_down.weight (Q4_K)
    expect(p, CheckpointError, "m.gguf", "blk.1.ffn_down.weight")
