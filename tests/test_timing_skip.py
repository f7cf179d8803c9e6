"""FASTLOAD_TIMING_SKIP (csrc/fl_model.h): a measurement knob that leaves named ops out of decode steps, to price each
kind of kernel inside the real step. Checked here: it is read when a model is made, names it does not know are a
ValueError naming the variable, it touches decode steps only (the prompt's forward, hence the first new token, is
unchanged) and it does change what a decode step computes."""
import numpy as np
import pytest

import fastload
from golden_util import model_dir

IDS = np.array([[3, 17, 230, 5, 99, 41]])


def _gen(monkeypatch, skip):
    if skip is None:
        monkeypatch.delenv("FASTLOAD_TIMING_SKIP", raising=False)
    else:
        monkeypatch.setenv("FASTLOAD_TIMING_SKIP", skip)
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu", torch_dtype="float32",
                                                      threads=2)
    return m, m.generate(IDS, max_new_tokens=6, eos_token_id=[])[0, IDS.shape[1]:]


def test_unknown_op_is_a_value_error(monkeypatch):
    monkeypatch.setenv("FASTLOAD_TIMING_SKIP", "rope,softmax")
    with pytest.raises(ValueError, match=r"FASTLOAD_TIMING_SKIP='rope,softmax': 'softmax' is not one of"):
        fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu", torch_dtype="float32")


@pytest.mark.parametrize("skip", ["rope", "attention", "norm", "qkv,o", "gate_up", "swiglu", "down", "lm_head"])
def test_skips_decode_steps_only(monkeypatch, skip):
    whole, ref = _gen(monkeypatch, None)
    m, got = _gen(monkeypatch, skip)
    assert got[0] == ref[0]  # the prompt's forward is whole
    assert not np.array_equal(got, ref)
    # a forward of several tokens is never skipped
    np.testing.assert_array_equal(m(IDS).logits, whole(IDS).logits)


def test_empty_means_nothing_skipped(monkeypatch):
    np.testing.assert_array_equal(_gen(monkeypatch, "")[1], _gen(monkeypatch, None)[1])
