"""LoRA adapters merged at load (fastload/lora.py, csrc/model.c `lora_apply`), against transformers + peft.

Fixtures: tests/fixtures/lora/{qv,rs,od} (tools/make_lora_fixtures.py): PEFT adapters on tests/fixtures/llama with
the PEFT model's float32 logits and greedy tokens. numpy only. Tolerance, decided up front: the logits of the merged
float32 model within 1e-5 x max|logit| of PEFT's (unmerged) forward (PEFT's own merge_and_unload() moves them by
0.8e-4 to 3.7e-4, i.e. 2e-6 to 8e-6 of max|logit| ~45-50, golden.json "measured"); greedy tokens exact (margins
>= 0.11 there)."""
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest

import fastload
from fastload import _C
from golden_util import FIXTURES, assert_greedy_match, assert_logits_close, load_cpu, model_dir
import st_util

LORA = FIXTURES / "lora"
ADAPTERS = ("qv", "rs", "od")
REL = 1e-5
CheckpointError = fastload.CheckpointError


def golden(name):
    g = dict(np.load(LORA / name / "golden.npz"))
    g["meta"] = json.loads((LORA / name / "golden.json").read_text())
    return g


def tensors_of(path):
    """name -> float32 numpy (bf16 widened) of a safetensors file."""
    out = {}
    with _C.SafetensorsFile(str(path)) as f:
        for k in f.keys():
            dt = f.info(k)[0]
            a = np.array(f.get(k))
            out[k] = st_util.bf16_to_f32(a).reshape(a.shape) if dt == "BF16" else a.astype(np.float32)
    return out


def base_tensors():
    out = {}
    for p in sorted(model_dir("llama").glob("*.safetensors")):
        out.update(tensors_of(p))
    return out


def adapter_copy(dst, name="qv", drop=(), add=None, cfg=None, base=None):
    """A copy of fixture adapter `name` in dst: tensors dropped / added / replaced, config keys changed."""
    dst.mkdir(parents=True, exist_ok=True)
    t = tensors_of(LORA / name / "adapter_model.safetensors")
    for k in drop:
        del t[k]
    t.update(add or {})
    st_util.write(dst / "adapter_model.safetensors", t, metadata={"format": "pt"})
    c = json.loads((LORA / name / "adapter_config.json").read_text())
    c["base_model_name_or_path"] = str(model_dir("llama").resolve()) if base is None else base
    c.update(cfg or {})
    (dst / "adapter_config.json").write_text(json.dumps(c))
    return dst


def q_a(layer=0, kind="q_proj", side="A"):
    return f"base_model.model.model.layers.{layer}.self_attn.{kind}.lora_{side}.weight"


# ----------------------------------------------------------------------------------------------- golden
@pytest.mark.parametrize("name", ADAPTERS)
def test_logits_and_greedy_equal_peft(name):
    g = golden(name)
    m = load_cpu(model_dir("llama"), adapter=LORA / name)
    tol = REL * float(np.abs(g["single_logits"]).max())
    err = assert_logits_close(m(g["single_ids"]).logits, g["single_logits"], atol=tol, what=f"{name} single")
    assert_logits_close(m(input_ids=g["batch_ids"], attention_mask=g["batch_mask"]).logits, g["batch_logits"],
                        atol=tol, where=g["batch_mask"], what=f"{name} batch")
    T = g["single_ids"].shape[1]
    assert_greedy_match(m.generate(g["single_ids"], max_new_tokens=16, do_sample=False, eos_token_id=None),
                        g["single_greedy"], T)
    assert_greedy_match(m.generate(g["batch_ids"], attention_mask=g["batch_mask"], max_new_tokens=16, do_sample=False,
                                   eos_token_id=None, pad_token_id=0), g["batch_greedy"], g["batch_ids"].shape[1])
    info = m.load_stats["lora"]
    assert info["merged"] and info["modules"] == 3 * len(g["meta"]["adapter_config"]["target_modules"])
    assert err < tol


def test_adapter_matters():
    """The base alone is far from the adapter's golden (the test above cannot pass by ignoring the adapter)."""
    g = golden("qv")
    base = load_cpu(model_dir("llama"))
    assert np.abs(base(g["single_ids"]).logits - g["single_logits"]).max() > 1.0


def test_merge_equals_numpy_merge(tmp_path):
    """rsLoRA + rank_pattern + alpha_pattern: the merged weights (save_pretrained exports what the core holds) are
    W + scale * B @ A with PEFT's per-module r and alpha, computed here in numpy."""
    m = load_cpu(model_dir("llama"), adapter=LORA / "rs")
    m.save_pretrained(tmp_path / "merged")
    got = {}
    for p in sorted((tmp_path / "merged").glob("*.safetensors")):
        got.update(tensors_of(p))
    base, ad = base_tensors(), tensors_of(LORA / "rs" / "adapter_model.safetensors")
    cfg = json.loads((LORA / "rs" / "adapter_config.json").read_text())
    seen = set()
    for k, w in base.items():
        mod = k[: -len(".weight")]
        a = ad.get(f"base_model.model.{mod}.lora_A.weight")
        if a is None:
            assert np.array_equal(got[k], w), k
            continue
        b = ad[f"base_model.model.{mod}.lora_B.weight"]
        r = next((v for p, v in cfg["rank_pattern"].items() if mod == p or mod.endswith("." + p)), cfg["r"])
        alpha = next((v for p, v in cfg["alpha_pattern"].items() if mod.endswith("." + p)), cfg["lora_alpha"])
        assert a.shape[0] == r
        want = w + (b @ a) * np.float32(alpha / math.sqrt(r))
        np.testing.assert_allclose(got[k], want, rtol=0, atol=2e-6 * max(1.0, np.abs(want).max()), err_msg=k)
        seen.add(mod.rsplit(".", 1)[1] + (":r5" if r == 5 else ":r2" if r == 2 else ""))
    assert {"q_proj:r5", "k_proj:r2", "up_proj", "gate_proj", "v_proj", "q_proj"} <= seen


def test_modules_to_save_replaces_lm_head(tmp_path):
    m = load_cpu(model_dir("llama"), adapter=LORA / "od")
    m.save_pretrained(tmp_path / "merged")
    got = {}
    for p in sorted((tmp_path / "merged").glob("*.safetensors")):
        got.update(tensors_of(p))
    ad = tensors_of(LORA / "od" / "adapter_model.safetensors")
    assert np.array_equal(got["lm_head.weight"], ad["base_model.model.lm_head.weight"])


# ----------------------------------------------------------------------------------------------- how it is named
def test_adapter_dir_with_relative_base_equals_adapter_argument():
    """tests/fixtures/lora/qv/adapter_config.json names "../../llama": not found from the working directory, then
    found from the adapter directory."""
    a = load_cpu(LORA / "qv")
    b = load_cpu(model_dir("llama"), adapter=LORA / "qv")
    ids = golden("qv")["single_ids"]
    assert np.array_equal(a(ids).logits, b(ids).logits)
    assert a.load_stats["lora"]["path"] == str(LORA / "qv")


def test_adapter_dir_with_absolute_base(tmp_path):
    d = adapter_copy(tmp_path / "ad")
    ids = golden("qv")["single_ids"]
    assert np.array_equal(load_cpu(d)(ids).logits, load_cpu(model_dir("llama"), adapter=LORA / "qv")(ids).logits)


def test_adapter_dir_base_relative_to_working_directory(tmp_path, monkeypatch):
    d = adapter_copy(tmp_path / "ad", base="llama")
    monkeypatch.chdir(FIXTURES)
    ids = golden("qv")["single_ids"]
    assert np.array_equal(load_cpu(d)(ids).logits, load_cpu(model_dir("llama"), adapter=LORA / "qv")(ids).logits)


def test_adapter_dir_without_base(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"base_model_name_or_path": None})
    with pytest.raises(ValueError, match="base_model_name_or_path"):
        load_cpu(d)
    d = adapter_copy(tmp_path / "ad2", base="./no/such/base")
    with pytest.raises(FileNotFoundError, match="base_model_name_or_path"):
        load_cpu(d)


def test_adapter_argument_must_be_an_adapter():
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter"):
        load_cpu(model_dir("llama"), adapter=model_dir("qwen2"))
    with pytest.raises(ValueError, match="adapter directory itself"):
        load_cpu(LORA / "qv", adapter=LORA / "rs")


def test_reload_to_float16_keeps_the_adapter():
    g = golden("qv")
    m = load_cpu(model_dir("llama"), adapter=LORA / "qv")
    m.half()
    assert str(m.dtype) == "float16"
    err = np.abs(m(g["single_ids"]).logits - g["single_logits"]).max()
    assert err < 0.5, err  # float16 weights; without the adapter the logits move by ~40


# ----------------------------------------------------------------------------------------------- with quantisation
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_merged_before_quantisation(tmp_path, scheme):
    """base + adapter quantised at load equals the merged float32 weights (exported) quantised at load: the
    quantiser saw W + scale * B @ A, bit for bit."""
    g = golden("qv")
    merged = tmp_path / "merged"
    load_cpu(model_dir("llama"), adapter=LORA / "qv").save_pretrained(merged)
    a = load_cpu(model_dir("llama"), adapter=LORA / "qv", quantization_config=scheme)
    b = load_cpu(merged, quantization_config=scheme)
    assert a.is_quantized and a.load_stats["lora"]["merged"]
    la, lb = a(g["single_ids"]).logits, b(g["single_ids"]).logits
    assert np.array_equal(la, lb)
    if scheme != "int8":
        return  # int4 on this tiny random model moves logits by tens either way: only the equality above is telling
    # and the int8 merge is near PEFT's float32 reference, far nearer than the int8 base
    base = load_cpu(model_dir("llama"), quantization_config=scheme)(g["single_ids"]).logits
    err, err_base = np.abs(la - g["single_logits"]).max(), np.abs(base - g["single_logits"]).max()
    assert err < err_base / 5, (err, err_base)


# ----------------------------------------------------------------------------------------------- bad adapters
def test_missing_lora_b(tmp_path):
    d = adapter_copy(tmp_path / "ad", drop=[q_a(1, side="B")])
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*layers\.1\.self_attn\.q_proj\.lora_A.*"
                                              r"no matching lora_B"):
        load_cpu(d)


def test_rank_mismatch_with_config(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"r": 8})
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors.*tensor '.*lora_A\.weight' has shape "
                                              r"\[4, 128\].*r = 8"):
        load_cpu(d)


def test_a_b_rank_disagree(tmp_path):
    b = np.zeros((128, 3), np.float32)
    d = adapter_copy(tmp_path / "ad", add={q_a(0, side="B"): b})
    with pytest.raises(CheckpointError, match=r"layers\.0\.self_attn\.q_proj\.lora_B\.weight' has shape \[128, 3\]"):
        load_cpu(d)


def test_factor_shape_does_not_fit_the_weight(tmp_path):
    """A [r, in] with the wrong in_features: the core names the adapter file and tensor and the expected shape."""
    d = adapter_copy(tmp_path / "ad", add={q_a(2): np.zeros((4, 96), np.float32)})
    with pytest.raises(CheckpointError, match=r"adapter_model\.safetensors: LoRA A '.*layers\.2\.self_attn\.q_proj"
                                              r"\.lora_A\.weight' has shape \[4, 96\], expected \[4, 128\]"):
        load_cpu(d)


def test_unknown_target_module(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"target_modules": ["q_proj", "v_proj", "foo_proj"]})
    with pytest.raises(CheckpointError, match=r"adapter_config\.json: target module 'foo_proj' matches no module"):
        load_cpu(d)
    d = adapter_copy(tmp_path / "ad2", add={q_a(0, "foo_proj"): np.zeros((4, 128), np.float32),
                                            q_a(0, "foo_proj", "B"): np.zeros((128, 4), np.float32)})
    with pytest.raises(CheckpointError, match=r"tensor '.*foo_proj\.lora_A\.weight': the base model has no module"):
        load_cpu(d)


def test_tensor_outside_target_modules(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"target_modules": ["q_proj"]})
    with pytest.raises(CheckpointError, match=r"v_proj\.lora_A\.weight': module '.*v_proj' is not in target_modules"):
        load_cpu(d)


@pytest.mark.parametrize("cfg,exc,pat", [
    ({"use_dora": True}, NotImplementedError, "DoRA"),
    ({"bias": "all"}, NotImplementedError, "bias='all'"),
    ({"lora_bias": True}, NotImplementedError, "lora_bias"),
    ({"peft_type": "IA3"}, NotImplementedError, "peft_type 'IA3'"),
    ({"r": 0}, CheckpointError, "'r' must be an integer >= 1"),
    ({"r": 4.0}, CheckpointError, "'r' must be an integer"),
    ({"lora_alpha": float("nan")}, CheckpointError, "'lora_alpha' must be a finite number"),
    ({"lora_alpha": 1e30}, CheckpointError, r"LoRA scale 2\.5e\+29 .*lora_alpha 1e\+30"),
    ({"rank_pattern": {"q_proj": 0}}, CheckpointError, "rank_pattern"),
    ({"target_modules": 5}, CheckpointError, "target_modules"),
])
def test_bad_config(tmp_path, cfg, exc, pat):
    d = adapter_copy(tmp_path / "ad", cfg=cfg)
    with pytest.raises(exc, match=pat) as ei:
        load_cpu(d)
    assert "adapter_config.json" in str(ei.value)


def test_non_finite_factor(tmp_path):
    a = tensors_of(LORA / "qv" / "adapter_model.safetensors")[q_a(1, "v_proj")].copy()
    a[2, 7] = np.nan
    d = adapter_copy(tmp_path / "ad", add={q_a(1, "v_proj"): a})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: LoRA A '.*layers\.1\.self_attn\.v_proj"
                                         r"\.lora_A\.weight' holds a non-finite value"):
        load_cpu(d)


def test_merge_overflowing_float16(tmp_path):
    """A scale within the config limit whose merged values overflow float16: refused, naming the tensor."""
    d = adapter_copy(tmp_path / "ad", cfg={"lora_alpha": 4e6})
    with pytest.raises(ValueError, match=r"q_proj\.weight'.*merging LoRA.*non-finite float16"):
        load_cpu(model_dir("llama"), adapter=d, torch_dtype="float16")


def test_embedding_lora_refused(tmp_path):
    d = adapter_copy(tmp_path / "ad", add={"base_model.model.model.embed_tokens.lora_embedding_A":
                                           np.zeros((4, 512), np.float32)})
    with pytest.raises(NotImplementedError, match="LoRA on embeddings"):
        load_cpu(d)


def test_lm_head_lora_on_tied_model_refused(tmp_path):
    """qwen2 ties lm_head to the embeddings: a LoRA delta on lm_head would change the embeddings too."""
    d = tmp_path / "ad"
    d.mkdir()
    st_util.write(d / "adapter_model.safetensors", {
        "base_model.model.lm_head.lora_A.weight": np.zeros((4, 128), np.float32),
        "base_model.model.lm_head.lora_B.weight": np.zeros((600, 4), np.float32)})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["lm_head"]}))
    with pytest.raises(CheckpointError, match="lm_head"):
        load_cpu(model_dir("qwen2"), adapter=d)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq", "lora_ga", "mica"])
def test_inits_that_change_the_base_are_refused(tmp_path, init):
    """PiSSA, OLoRA, CorDA, LoftQ, ... subtract their initial B A from the base weights when PEFT loads the adapter:
    merged into the original weights, the trained A, B give another model (logits ~70% off); refused."""
    with pytest.raises(NotImplementedError, match=f"init_lora_weights={init!r}"):
        load_cpu(adapter_copy(tmp_path / "ad", cfg={"init_lora_weights": init}))


@pytest.mark.parametrize("init", [False, "gaussian", "eva", "orthogonal"])
def test_inits_that_keep_the_base_load(tmp_path, init):
    ids = golden("qv")["single_ids"]
    got = load_cpu(adapter_copy(tmp_path / "ad", cfg={"init_lora_weights": init}))(ids).logits
    assert np.array_equal(got, load_cpu(model_dir("llama"), adapter=LORA / "qv")(ids).logits)


def test_lm_head_lora_with_its_base_layer_saved(tmp_path):
    """PEFT's default save_embedding_layers="auto" writes a LoRA-wrapped lm_head's own weight as
    'lm_head.base_layer.weight' (it was refused as an unknown modules_to_save tensor): it replaces the base's
    lm_head, and the LoRA is merged on top of it, as PeftModel.from_pretrained loads it."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((512, 128)).astype(np.float32) * 0.05  # not the base model's lm_head
    a = rng.standard_normal((4, 128)).astype(np.float32) * 0.1
    b = rng.standard_normal((512, 4)).astype(np.float32) * 0.1
    d = adapter_copy(tmp_path / "ad", add={"base_model.model.lm_head.base_layer.weight": w,
                                           "base_model.model.lm_head.lora_A.weight": a,
                                           "base_model.model.lm_head.lora_B.weight": b},
                     cfg={"target_modules": ["q_proj", "v_proj", "lm_head"]})
    m = load_cpu(d)
    m.save_pretrained(tmp_path / "merged")
    got = {}
    for p in sorted((tmp_path / "merged").glob("*.safetensors")):
        got.update(tensors_of(p))
    np.testing.assert_allclose(got["lm_head.weight"], w + (b @ a) * np.float32(8 / 4), rtol=0, atol=1e-6)


def test_modules_to_save_embedding_on_tied_model_refused(tmp_path):
    """PEFT replaces only the input embedding of a tied model (its LM head keeps the base matrix); fastload holds
    one tied matrix, which would have made the adapter's embedding the LM head too (logits ~40% off): refused."""
    d = tmp_path / "ad"
    d.mkdir()
    st_util.write(d / "adapter_model.safetensors", {
        "base_model.model.model.embed_tokens.weight": np.ones((600, 128), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((4, 128), np.float32),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 4), np.float32)})
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                       "target_modules": ["q_proj"],
                                                       "modules_to_save": ["embed_tokens"]}))
    with pytest.raises(NotImplementedError, match="tie_word_embeddings"):
        load_cpu(model_dir("qwen2"), adapter=d)


def test_adapter_argument_may_hold_a_config_json(tmp_path):
    """adapter= names the adapter, so a config.json beside adapter_config.json (a base config copied in, as some
    training scripts leave it) does not make it 'not an adapter'."""
    d = adapter_copy(tmp_path / "ad")
    shutil.copy(model_dir("llama") / "config.json", d / "config.json")
    ids = golden("qv")["single_ids"]
    assert np.array_equal(load_cpu(model_dir("llama"), adapter=d)(ids).logits,
                          load_cpu(model_dir("llama"), adapter=LORA / "qv")(ids).logits)


def test_lora_on_gptq_base_refused(tmp_path):
    import quant_fixtures as qf
    q, _ = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": True, "desc_act": False})
    with pytest.raises(NotImplementedError, match=r"LoRA on a GPTQ-quantised base"):
        load_cpu(q, adapter=adapter_copy(tmp_path / "ad"))


def test_lora_on_gguf_refused(tmp_path):
    """Refused before the GGUF is even parsed (any .gguf path)."""
    g = tmp_path / "m.gguf"
    g.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(NotImplementedError, match="LoRA adapters on a GGUF model are not supported"):
        load_cpu(g, adapter=LORA / "qv")


def test_fan_in_fan_out_is_ignored_with_a_warning(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"fan_in_fan_out": True})
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        m = load_cpu(d)
    g = golden("qv")
    assert_logits_close(m(g["single_ids"]).logits, g["single_logits"], atol=REL * 50)


# ----------------------------------------------------------------------------------------------- on the GPU
gpu = pytest.mark.skipif(not fastload.cuda.is_available(),
                         reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))


def load_gpu(path, **kw):
    kw.setdefault("torch_dtype", "float32")
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), device_map="cuda", **kw)


@gpu
@pytest.mark.parametrize("name", ADAPTERS)
def test_gpu_float32_equals_peft(name):
    """The merge on the device (cuBLAS sgemm, no TF32, + an add kernel) in a float32 model: PEFT's logits within
    the tiny-model tolerance (2e-3), greedy tokens exact."""
    g = golden(name)
    m = load_gpu(model_dir("llama"), adapter=LORA / name)
    assert_logits_close(m(g["single_ids"]).logits, g["single_logits"], atol=2e-3)
    assert_greedy_match(m.generate(g["single_ids"], max_new_tokens=16, do_sample=False, eos_token_id=None),
                        g["single_greedy"], g["single_ids"].shape[1])


@gpu
@pytest.mark.parametrize("dtype,tol", [("float16", 1e-2), ("bfloat16", 5e-2)])
def test_gpu_half_equals_peft(dtype, tol):
    g = golden("rs")
    m = load_gpu(model_dir("llama"), adapter=LORA / "rs", torch_dtype=dtype)
    lg = m(g["single_ids"]).logits
    assert np.abs(lg - g["single_logits"]).max() / np.abs(g["single_logits"]).max() < tol


@gpu
def test_gpu_merge_equals_cpu_merge(tmp_path):
    load_cpu(model_dir("llama"), adapter=LORA / "rs").save_pretrained(tmp_path / "cpu")
    load_gpu(model_dir("llama"), adapter=LORA / "rs").save_pretrained(tmp_path / "gpu")
    a, b = {}, {}
    for p in sorted((tmp_path / "cpu").glob("*.safetensors")):
        a.update(tensors_of(p))
    for p in sorted((tmp_path / "gpu").glob("*.safetensors")):
        b.update(tensors_of(p))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=0, atol=2e-6 * max(1.0, np.abs(a[k]).max()), err_msg=k)


@gpu
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_gpu_merged_before_quantisation(tmp_path, scheme):
    """On the GPU the rows stream into float32 scratch, get their delta, then the quantize op: identical to
    quantising the merged float32 weights (exported from the GPU model) at load."""
    g = golden("qv")
    load_gpu(model_dir("llama"), adapter=LORA / "qv").save_pretrained(tmp_path / "merged")
    a = load_gpu(model_dir("llama"), adapter=LORA / "qv", quantization_config=scheme)
    b = load_gpu(tmp_path / "merged", quantization_config=scheme)
    assert np.array_equal(a(g["single_ids"]).logits, b(g["single_ids"]).logits)


@gpu
def test_gpu_merge_overflowing_float16(tmp_path):
    d = adapter_copy(tmp_path / "ad", cfg={"lora_alpha": 4e6})
    with pytest.raises(ValueError, match=r"q_proj\.weight'.*merging LoRA.*non-finite float16"):
        load_gpu(model_dir("llama"), adapter=d, torch_dtype="float16")
