"""Mixture of Experts (MixtralForCausalLM, Qwen3MoeForCausalLM) on the CPU.

The golden logits and greedy tokens of the tiny mixtral / qwen3_moe fixtures are checked by test_golden.py
(TINY_MODELS); here: the hub's per-expert layout against transformers 5's fused 3-D one (same logits), that the
router decides which experts run (an expert a token does not choose can be anything; one it chooses changes the
result), routing against numpy, loading errors that name the tensor, config errors that name the key,
engine generation, quantised experts and save_pretrained.
"""
import json

import numpy as np
import pytest

import fastload
from fastload import CheckpointError
from golden_util import checkpoint_copy, fixture_weights, load_case, load_cpu, model_dir
import st_util

CASE = load_case("mixtral")
CFG = json.loads((model_dir("mixtral") / "config.json").read_text())
L, E, K = CFG["num_hidden_layers"], CFG["num_local_experts"], CFG["num_experts_per_tok"]
D, F = CFG["hidden_size"], CFG["intermediate_size"]
EXP = "model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight"


WEIGHTS = fixture_weights("mixtral")


def checkpoint(tmp_path, change=None, config=None, name="ckpt"):
    """The mixtral fixture copied to tmp_path / name, tensors through change, config keys set from config."""
    return checkpoint_copy("mixtral", tmp_path / name, change, config)


def logits(m, ids=None):
    return np.asarray(m(CASE["single_ids"] if ids is None else ids).logits, np.float32)


@pytest.fixture(scope="module")
def ref_model():
    return load_cpu(model_dir("mixtral"))


def test_hub_layout_is_what_transformers_saves():
    names = set(WEIGHTS)
    assert EXP.format(i=0, j=E - 1, w="w2") in names and "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_fused_layout_gives_the_same_logits(tmp_path, ref_model):
    """transformers 5's fused tensors: mlp.experts.gate_up_proj [E, 2F, D] (gate rows then up rows per expert),
    mlp.experts.down_proj [E, D, F], router mlp.gate.weight; one layer fused, the other per-expert."""
    def fuse(w):
        i = 0
        gu = np.stack([np.concatenate([w.pop(EXP.format(i=i, j=j, w="w1")), w.pop(EXP.format(i=i, j=j, w="w3"))])
                       for j in range(E)])
        dn = np.stack([w.pop(EXP.format(i=i, j=j, w="w2")) for j in range(E)])
        assert gu.shape == (E, 2 * F, D) and dn.shape == (E, D, F)
        w[f"model.layers.{i}.mlp.experts.gate_up_proj"] = gu
        w[f"model.layers.{i}.mlp.experts.down_proj"] = dn
        w[f"model.layers.{i}.mlp.gate.weight"] = w.pop(f"model.layers.{i}.block_sparse_moe.gate.weight")
    m = load_cpu(checkpoint(tmp_path, fuse))
    np.testing.assert_array_equal(logits(m), logits(ref_model))


def test_fused_layout_shape_error_names_the_tensor(tmp_path):
    def fuse_bad(w):
        gu = np.stack([np.concatenate([w.pop(EXP.format(i=0, j=j, w="w1")), w.pop(EXP.format(i=0, j=j, w="w3"))])
                       for j in range(E)])
        w["model.layers.0.mlp.experts.gate_up_proj"] = gu.reshape(E * 2 * F, D)  # 2-D: not the fused layout
        w["model.layers.0.mlp.experts.down_proj"] = np.stack([w.pop(EXP.format(i=0, j=j, w="w2")) for j in range(E)])
    with pytest.raises(CheckpointError, match=r"gate_up_proj.*expected \[4, 192, 64\]"):
        load_cpu(checkpoint(tmp_path, fuse_bad))


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x) + eps) * w


def _layer0_choice(tok):
    """Experts layer 0 chooses for a lone token (position 0: attention returns its own v), in numpy float64."""
    W = {k: v.astype(np.float64) for k, v in WEIGHTS.items()}
    eps, nh, nkv = CFG["rms_norm_eps"], CFG["num_attention_heads"], CFG["num_key_value_heads"]
    hd = D // nh
    x = W["model.embed_tokens.weight"][tok]
    xn = _rms(x, W["model.layers.0.input_layernorm.weight"], eps)
    v = (W["model.layers.0.self_attn.v_proj.weight"] @ xn).reshape(nkv, hd)
    att = np.concatenate([v[h // (nh // nkv)] for h in range(nh)])
    h = x + W["model.layers.0.self_attn.o_proj.weight"] @ att
    hn = _rms(h, W["model.layers.0.post_attention_layernorm.weight"], eps)
    lg = W["model.layers.0.block_sparse_moe.gate.weight"] @ hn
    order = np.argsort(-lg, kind="stable")
    assert lg[order[K - 1]] - lg[order[K]] > 1e-3, "the choice is too close to call"
    return set(order[:K].tolist())


@pytest.mark.parametrize("tok", [5, 77, 300])
def test_only_the_chosen_experts_matter(tmp_path, ref_model, tok):
    """A lone token: scaling an expert layer 0 does not choose leaves its logits bit for bit the same (its weights
    are never read); scaling a chosen one changes them."""
    chosen = _layer0_choice(tok)
    ids = np.array([[tok]])
    base = logits(ref_model, ids)
    for j in range(E):
        def scale(w, j=j):
            for part in ("w1", "w2", "w3"):
                w[EXP.format(i=0, j=j, w=part)] = w[EXP.format(i=0, j=j, w=part)] * 3.0
        got = logits(load_cpu(checkpoint(tmp_path, scale, name=f"e{tok}_{j}")), ids)
        if j in chosen:
            assert np.abs(got - base).max() > 1e-3, (tok, j, chosen)
        else:
            np.testing.assert_array_equal(got, base, err_msg=f"token {tok}: expert {j} is not chosen ({chosen})")


def moe_numpy(lg, x, w13, w2, k, norm):
    """transformers' MoE block in float64: softmax, top k (stable: ties to the lower index), renormalised when
    norm, each chosen expert's SwiGLU weighted and summed."""
    f = w2.shape[1]
    d = x.shape[1]
    p = np.exp(lg - lg.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, ids, 1)
    if norm:
        w = w / w.sum(1, keepdims=True)
    out = np.zeros_like(x)
    for i in range(x.shape[0]):
        for j in range(k):
            e = ids[i, j]
            g, u = w13[e * 2 * f:e * 2 * f + f] @ x[i], w13[e * 2 * f + f:(e + 1) * 2 * f] @ x[i]
            out[i] += w[i, j] * (w2[e * d:(e + 1) * d] @ (g / (1 + np.exp(-g)) * u))
    return ids, w, out


@pytest.mark.parametrize("n, E, k, norm", [(1, 4, 2, 1), (9, 8, 2, 1), (6, 6, 3, 0), (20, 16, 4, 1)])
def test_cpu_moe_op_against_numpy(n, E, k, norm):
    """The CPU backend's moe_route + moe_ffn (fastload._C.run_op "moe": grouped by expert) against numpy."""
    from fastload import _C
    rng = np.random.default_rng(n * 100 + E)
    d, f = 48, 40
    lg = np.stack([rng.permutation(E).astype(np.float32) * 0.3 for _ in range(n)])
    lg += rng.uniform(-0.05, 0.05, lg.shape).astype(np.float32)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w13 = (rng.standard_normal((E * 2 * f, d)) / np.sqrt(d)).astype(np.float32)
    w2 = (rng.standard_normal((E * d, f)) / np.sqrt(f)).astype(np.float32)
    got = _C.run_op("cpu", "moe", {"logits": lg, "x": x, "w13": w13, "w2": w2}, {"k": k, "norm": norm})
    ids, w, out = moe_numpy(lg.astype(np.float64), x.astype(np.float64), w13.astype(np.float64),
                            w2.astype(np.float64), k, norm)
    np.testing.assert_array_equal(got["ids"], ids)
    np.testing.assert_allclose(got["wts"], w, rtol=1e-5)
    np.testing.assert_allclose(got["out"], out, rtol=0, atol=1e-5 * np.abs(out).max())


def test_norm_topk_prob_reaches_the_core():
    from fastload import arch as archmod
    q = json.loads((model_dir("qwen3_moe") / "config.json").read_text())
    c = archmod.core_config(q, archmod.ARCHITECTURES["Qwen3MoeForCausalLM"], "x")
    assert (c["n_experts"], c["top_k"], c["moe_norm_topk"], c["moe_ffn"]) == (6, 3, 0, 48)
    c = archmod.core_config(dict(CFG), archmod.ARCHITECTURES["MixtralForCausalLM"], "x")
    assert (c["n_experts"], c["top_k"], c["moe_norm_topk"], c["moe_ffn"]) == (4, 2, 1, 96)


def test_missing_expert_tensor_is_named(tmp_path):
    name = EXP.format(i=1, j=2, w="w3")
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight'"):
        load_cpu(checkpoint(tmp_path, lambda w: w.pop(name)))


def test_missing_router_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"block_sparse_moe\.gate\.weight"):
        load_cpu(checkpoint(tmp_path, lambda w: w.pop("model.layers.0.block_sparse_moe.gate.weight")))


def test_expert_shape_error_names_the_tensor(tmp_path):
    name = EXP.format(i=0, j=1, w="w2")
    with pytest.raises(CheckpointError, match=r"experts\.1\.w2\.weight.*expected \[64, 96\]"):
        load_cpu(checkpoint(tmp_path, lambda w: w.__setitem__(name, w[name][:, :-1].copy())))


@pytest.mark.parametrize("k, msg", [(0, r"'num_experts_per_tok' must be a positive integer"),
                                    (5, r"'num_experts_per_tok' must be in \[1, min\(num_local_experts=4, 16\)\], got 5"),
                                    (True, r"'num_experts_per_tok' must be")])
def test_bad_num_experts_per_tok_names_the_key(tmp_path, k, msg):
    with pytest.raises(CheckpointError, match=msg):
        load_cpu(checkpoint(tmp_path, config={"num_experts_per_tok": k}))


def test_bad_num_local_experts_names_the_key(tmp_path):
    with pytest.raises(CheckpointError, match=r"'num_local_experts' must be a positive integer <= 256, got 1000"):
        load_cpu(checkpoint(tmp_path, config={"num_local_experts": 1000}))


def test_core_checks_top_k_itself():
    """fastload._C.Model takes its config from any caller: the core names the key too."""
    from fastload import _C
    from fastload import arch as archmod
    arch = archmod.ARCHITECTURES["MixtralForCausalLM"]
    cfg = archmod.core_config(dict(CFG), arch, "x")
    with pytest.raises(CheckpointError, match=r"num_experts_per_tok=9 must be in \[1, 4\]"):
        _C.Model({**cfg, "top_k": 9}, dtype="float32", device="cpu")
    with pytest.raises(NotImplementedError, match="shared expert"):
        _C.Model({**cfg, "shared_ffn": 32}, dtype="float32", device="cpu")


def test_shared_expert_and_dense_layers_are_refused(tmp_path):
    for i, (change, msg) in enumerate((({"mlp_only_layers": [0]}, "mlp_only_layers"),
                                       ({"decoder_sparse_step": 2}, "decoder_sparse_step"),
                                       ({"shared_expert_intermediate_size": 32}, "shared expert"))):
        p = checkpoint_copy("qwen3_moe", tmp_path / f"q{i}", config=change)
        with pytest.raises(NotImplementedError, match=msg):
            load_cpu(p)


def test_generate_through_the_engine_equals_the_fixture(ref_model):
    """generate() (the batched engine) gives the reference's greedy tokens, single and padded batch."""
    out = ref_model.generate(CASE["single_ids"], max_new_tokens=CASE["meta"]["max_new_tokens"], do_sample=False)
    np.testing.assert_array_equal(np.asarray(out), CASE["single_greedy"])
    out = ref_model.generate(CASE["batch_ids"], attention_mask=CASE["batch_mask"],
                             max_new_tokens=CASE["meta"]["max_new_tokens"], do_sample=False)
    np.testing.assert_array_equal(np.asarray(out), CASE["batch_greedy"])


def test_groupings_agree(ref_model):
    """Forwards over prefixes of the prompt (1 token: one GEMV per chosen expert; more: tokens grouped by expert,
    one GEMM each over different groups) agree at the positions they share."""
    full = logits(ref_model)
    ids = CASE["single_ids"]
    rows = [logits(ref_model, ids[:, :t + 1])[0, -1] for t in range(0, ids.shape[1], 5)]
    for r, t in zip(rows, range(0, ids.shape[1], 5)):
        np.testing.assert_allclose(r, full[0, t], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme, w_err, l2", [("int8", 0.01, 0.1), ("int4", 0.15, 0.6)])
def test_quantised_experts_on_cpu(scheme, w_err, l2):
    """Quantisation at load covers the experts (not the router): each expert's rows read back (dequantised) near
    the checkpoint's, and the logits stay near the float ones (a tiny random model: a few routing flips)."""
    from fastload import arch as archmod
    m = load_cpu(model_dir("mixtral"), quantization_config=fastload.QuantConfig(scheme=scheme))
    lay = {x["name"]: x["dtype"] for x in m._core.layouts()}
    assert lay["layers.0.moe_w13"] == scheme and lay["layers.1.moe_w2"] == scheme
    assert lay["layers.0.moe_router"] == "float32"
    for slot, part in (("moe_w1", "w1"), ("moe_w3", "w3"), ("moe_w2", "w2")):
        for j in (0, E - 1):
            want = WEIGHTS[EXP.format(i=1, j=j, w=part)]
            dt, got = m._core.export(archmod.SLOT[slot], 1, j)
            assert dt == "float32" and got.shape == want.shape
            assert np.abs(got - want).max() <= w_err * np.abs(want).max(), (slot, j)
    ref = CASE["single_logits"]
    got = logits(m)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < l2


def test_num_parameters_counts_every_expert(ref_model):
    assert ref_model.num_parameters() == sum(w.size for w in WEIGHTS.values())


def test_save_pretrained_round_trip(tmp_path, ref_model):
    ref_model.save_pretrained(tmp_path / "saved")
    w = st_util.read_f32(tmp_path / "saved" / "model.safetensors")
    assert set(w) == set(WEIGHTS)
    for k in WEIGHTS:
        np.testing.assert_array_equal(w[k], WEIGHTS[k], err_msg=k)
    np.testing.assert_array_equal(logits(load_cpu(tmp_path / "saved")), logits(ref_model))


def test_nan_router_logits_still_choose_distinct_experts():
    """A NaN in the router logits (a broken checkpoint) gives k distinct in-range experts, not a read outside the
    probabilities; the NaN itself reaches the output."""
    from fastload import _C
    E, k, d, f = 6, 3, 16, 8
    rng = np.random.default_rng(0)
    lg = rng.standard_normal((2, E)).astype(np.float32)
    lg[0, 2] = np.nan
    got = _C.run_op("cpu", "moe", {"logits": lg, "x": rng.standard_normal((2, d)).astype(np.float32),
                                   "w13": rng.standard_normal((E * 2 * f, d)).astype(np.float32),
                                   "w2": rng.standard_normal((E * d, f)).astype(np.float32)}, {"k": k, "norm": 1})
    for row in got["ids"]:
        assert len(set(row.tolist())) == k and all(0 <= e < E for e in row)
    assert np.isfinite(got["out"][1]).all()


def test_left_out_moe_keys_take_transformers_defaults(tmp_path, ref_model):
    """A key config.json leaves out takes MixtralConfig's default (num_experts_per_tok 2, num_local_experts 8), as
    transformers reads it: top-2 is the fixture's own setting, so the logits are the fixture's; 8 experts where the
    file has 4 names the first missing expert tensor instead of running on what is there (it was a CheckpointError
    about the key for both)."""
    d = checkpoint(tmp_path, name="no_k")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_experts_per_tok"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert K == 2
    np.testing.assert_array_equal(logits(load_cpu(d)), logits(ref_model))
    del cfg["num_local_experts"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"experts\.4\.w1\.weight"):
        load_cpu(d)
