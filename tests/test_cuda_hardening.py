"""Hostile checkpoints on the CUDA path (skipped without a CUDA device): the same refusals as on the CPU,
raised before or during the device load, with every byte fastload took on the device given back, and the
next good load unaffected.

The CPU tests (test_hardening_core.py, test_config_validation.py, test_containment.py) cover each class of
hostile input in depth; here each class is loaded once with device_map="cuda", because the CUDA loader has its
own reader threads, pinned pool and device arena, and a failure half-way must release all of them."""
import json
import os
import shutil

import numpy as np
import pytest

import fastload
from golden_util import load_case, model_dir

pytestmark = pytest.mark.skipif(not fastload.cuda.is_available(),
                                reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))


def _copy(name, dst):
    dst.mkdir(parents=True, exist_ok=True)
    for f in model_dir(name).iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "golden.json":
            shutil.copy(f, dst)
    return dst


def _edit_json(path, fn):
    d = json.load(open(path))
    fn(d)
    json.dump(d, open(path, "w"))


def _config_overflow(d):
    # hidden_size * vocab_size * 2 bytes overflows 64 bits unless checked; both within no sane limit
    d.update(hidden_size=1 << 40, vocab_size=1 << 40)


def _truncate_shard(d):
    p = d / "model-00002-of-00003.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) - 100])


def _shard_outside(d):
    outside = d.parent / "outside.safetensors"
    shutil.copy(d / "model-00002-of-00003.safetensors", outside)
    idx = d / "model.safetensors.index.json"
    _edit_json(idx, lambda j: j["weight_map"].update(
        {k: "../outside.safetensors" for k, v in j["weight_map"].items() if v == "model-00002-of-00003.safetensors"}))


def _shape_mismatch(d):
    _edit_json(d / "config.json", lambda j: j.update(intermediate_size=j["intermediate_size"] + 8))


def _fifo_shard(d):
    p = d / "model-00003-of-00003.safetensors"
    p.unlink()
    os.mkfifo(p)


CASES = {
    "config dims overflow": (lambda d: _edit_json(d / "config.json", _config_overflow), "hidden_size|vocab_size"),
    "zero heads": (lambda d: _edit_json(d / "config.json", lambda j: j.update(num_attention_heads=0)),
                   "num_attention_heads"),
    "truncated shard": (_truncate_shard, "model-00002-of-00003"),
    "shard outside the directory": (_shard_outside, "outside"),
    "shape does not match config": (_shape_mismatch, "shape"),
    "FIFO as shard": (_fifo_shard, "model-00003-of-00003"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_checkpoint_on_cuda_frees_everything(case, tmp_path):
    d = _copy("llama", tmp_path / "m")
    make, pattern = CASES[case]
    make(d)
    before = fastload.cuda.memory_allocated()
    with pytest.raises(fastload.CheckpointError, match=pattern) as kept:
        fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cuda", torch_dtype="bfloat16")
    # checked while the exception (and its traceback) is still alive, as a notebook keeps it
    assert fastload.cuda.memory_allocated() == before, f"a failed load kept device memory ({kept.value})"


def test_good_load_after_failures(tmp_path):
    """After a failed load the next one works and computes what it should (nothing left half-set)."""
    d = _copy("llama", tmp_path / "bad")
    _truncate_shard(d)
    with pytest.raises(fastload.CheckpointError):
        fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cuda", torch_dtype="float16")
    case = load_case("llama")
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cuda", torch_dtype="float16")
    lg = m(case["single_ids"]).logits
    ref = case["single_logits"]
    assert np.isfinite(lg).all()
    assert np.abs(lg - ref).max() / np.abs(ref).max() < 1e-2
