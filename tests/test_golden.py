"""fastload against transformers' own logits and greedy tokens on tiny random checkpoints
(tests/fixtures, made by tools/make_fixtures.py; see tests/fixtures/README.md).

Tolerances, decided up front (error = max |fastload - reference| / max |reference| over the
compared positions):
  - weights loaded in their stored dtype, or widened to float32: 1e-4. The reference is float32
    math on exactly the stored values and fastload computes in float32 too; we measure ~2e-6.
  - weights rounded to a narrower dtype than stored (bf16 from an f16 or f32 checkpoint, f16 from
    f32): 3e-2 for bfloat16 (8 mantissa bits), 5e-3 for float16.
Greedy tokens: the reference's greedy sequence is run through fastload teacher-forced; at every
step fastload's argmax must equal the reference token unless the reference's top-1/top-2 margin is
within twice fastload's own logit error at that step. When no step is that close, free-running
greedy generation (single, padded batch, eos stopping with pad fill) must equal the reference.
"""
import numpy as np
import pytest

import fastload
from golden_util import TINY_MODELS, load_case, model_dir, teacher_forced_check as _teacher_forced_check

STORED = {}


def _case(name):
    if name not in STORED:
        STORED[name] = load_case(name)
    return STORED[name]


def _tol(stored, dtype):
    if dtype == "float32" or dtype == stored:
        return 1e-4
    return 3e-2 if dtype == "bfloat16" else 5e-3


def _rel(a, b, mask=None):
    d = np.abs(a.astype(np.float64) - b)
    if mask is not None:
        d = d[mask]
    assert np.isfinite(a).all(), "NaN/inf in fastload logits"
    return d.max() / np.abs(b).max()


@pytest.fixture(scope="module", params=[(n, d) for n in TINY_MODELS for d in ("float32", "bfloat16", "float16")],
                ids=lambda p: f"{p[0]}-{p[1]}")
def loaded(request):
    name, dtype = request.param
    case = _case(name)
    model = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), device_map="cpu", torch_dtype=dtype)
    return name, dtype, case, model


def test_single_logits(loaded):
    name, dtype, case, model = loaded
    lg = model(case["single_ids"]).logits
    assert lg.shape == case["single_logits"].shape and lg.dtype == np.float32
    assert _rel(lg, case["single_logits"]) < _tol(case["meta"]["storage_dtype"], dtype)


def test_padded_batch_logits(loaded):
    name, dtype, case, model = loaded
    mask = case["batch_mask"]
    lg = model(case["batch_ids"], attention_mask=mask).logits
    assert _rel(lg, case["batch_logits"], mask.astype(bool)) < _tol(case["meta"]["storage_dtype"], dtype)


def test_greedy(loaded):
    name, dtype, case, model = loaded
    n = case["meta"]["max_new_tokens"]
    clear = _teacher_forced_check(model, case["single_ids"], case["single_greedy"], case["single_greedy_margins"])
    clear &= _teacher_forced_check(model, case["batch_ids"], case["batch_greedy"], case["batch_greedy_margins"],
                                   case["batch_mask"])
    if not clear:
        pytest.skip(f"{name} in {dtype}: a reference margin is within fastload's rounding error; checked step by step only")
    out = model.generate(case["single_ids"], max_new_tokens=n, do_sample=False, eos_token_id=None)
    np.testing.assert_array_equal(out, case["single_greedy"])
    out = model.generate(case["batch_ids"], attention_mask=case["batch_mask"], max_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=case["meta"]["pad_token_id"])
    np.testing.assert_array_equal(out, case["batch_greedy"])


def test_eos_stops_and_pads(loaded):
    name, dtype, case, model = loaded
    n = case["meta"]["max_new_tokens"]
    if not _teacher_forced_check(model, case["single_ids"], case["single_greedy"], case["single_greedy_margins"]):
        pytest.skip("a reference margin is within fastload's rounding error for this dtype")
    out = model.generate(case["single_ids"], max_new_tokens=n, eos_token_id=int(case["eos_token_id"]))
    np.testing.assert_array_equal(out, case["eos_greedy"])
    assert out.shape[1] < case["single_ids"].shape[1] + n, "generation should stop at eos"
    out = model.generate(case["batch_ids"], attention_mask=case["batch_mask"], max_new_tokens=n,
                         eos_token_id=int(case["eos_batch_token_id"]), pad_token_id=case["meta"]["pad_token_id"])
    np.testing.assert_array_equal(out, case["eos_batch_greedy"])


def test_sliding_window_matters():
    """The Mistral fixture's window is shorter than its prompts: a model without the window must differ."""
    case = _case("mistral_swa")
    import json
    import shutil
    import tempfile
    src = model_dir("mistral_swa")
    with tempfile.TemporaryDirectory() as d:
        for f in src.iterdir():
            if f.suffix in (".safetensors", ".json"):
                shutil.copy(f, d)
        cfg = json.load(open(f"{d}/config.json"))
        assert cfg["sliding_window"] < case["single_ids"].shape[1]
        cfg["sliding_window"] = None
        json.dump(cfg, open(f"{d}/config.json", "w"))
        m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cpu", torch_dtype="float32")
        assert _rel(m(case["single_ids"]).logits, case["single_logits"]) > 1e-2
