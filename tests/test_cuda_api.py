"""fastload.cuda with torch.cuda's names and meanings. Without a CUDA device (CI): memory queries are 0,
synchronize/empty_cache do nothing, the device questions raise RuntimeError saying why. With one
(skipped here): real values, and a model's weights show in allocated and reserved alike."""
import numpy as np
import pytest

import fastload
from golden_util import model_dir

HAVE_CUDA = fastload.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))
needs_no_gpu = pytest.mark.skipif(HAVE_CUDA, reason="checks the behaviour without a CUDA device")

ALL = ("memory_reserved", "max_memory_reserved", "empty_cache", "synchronize", "is_available", "device_count",
       "get_device_name", "get_device_properties", "get_device_capability", "current_device", "set_device",
       "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "mem_get_info")


def test_the_torch_names_exist():
    missing = [n for n in ALL if not callable(getattr(fastload.cuda, n, None))]
    assert not missing


@needs_no_gpu
def test_without_a_device_memory_is_zero_and_waits_are_no_ops():
    assert fastload.cuda.is_available() is False
    assert fastload.cuda.device_count() == 0
    for f in ("memory_reserved", "max_memory_reserved", "memory_allocated", "max_memory_allocated"):
        assert getattr(fastload.cuda, f)() == 0
        assert getattr(fastload.cuda, f)("cuda:0") == 0
        assert getattr(fastload.cuda, f)(0) == 0
    assert fastload.cuda.synchronize() is None
    assert fastload.cuda.synchronize("cuda") is None
    assert fastload.cuda.empty_cache() is None
    fastload.cuda.reset_peak_memory_stats()


@needs_no_gpu
@pytest.mark.parametrize("call", [lambda c: c.get_device_name(), lambda c: c.get_device_name(0),
                                  lambda c: c.get_device_properties(0), lambda c: c.get_device_capability(),
                                  lambda c: c.current_device()])
def test_without_a_device_the_device_questions_raise(call):
    b = fastload._C.build_info()
    why = "built without CUDA" if not b["cuda_compiled"] else "no CUDA device"
    with pytest.raises(RuntimeError, match=why):
        call(fastload.cuda)


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", -1, "cpu", 1.5])
def test_bad_device_arguments(bad):
    with pytest.raises(ValueError, match="device"):
        fastload.cuda.memory_reserved(bad)


def test_set_device_other_than_zero_is_refused():
    if HAVE_CUDA:
        fastload.cuda.set_device(0)
    with pytest.raises((NotImplementedError, ValueError), match="cuda:7|device"):
        fastload.cuda.set_device(7)


# ---------------------------------------------------------------- with a GPU (skipped in CI)
@needs_gpu
def test_device_facts():
    n = fastload.cuda.device_count()
    assert n >= 1
    assert fastload.cuda.current_device() == 0
    for d in range(n):
        p = fastload.cuda.get_device_properties(d)
        assert p.name and p.name == fastload.cuda.get_device_name(d) == fastload.cuda.get_device_name(f"cuda:{d}")
        assert p.total_memory == fastload.cuda.mem_get_info(d)[1]
        assert p.major >= 3 and p.minor >= 0 and p.multi_processor_count > 0
        assert fastload.cuda.get_device_capability(d) == (p.major, p.minor)
        assert "_CudaDeviceProperties(name=" in repr(p)
    assert fastload.cuda.get_device_name() == fastload.cuda.get_device_name(0)
    with pytest.raises(ValueError, match="visible"):
        fastload.cuda.get_device_name(n)


@needs_gpu
def test_weights_show_in_allocated_and_reserved():
    before_a, before_r = fastload.cuda.memory_allocated(), fastload.cuda.memory_reserved()
    assert before_r >= before_a
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cuda", torch_dtype="float16")
    w = m.get_memory_footprint()
    a, r = fastload.cuda.memory_allocated(), fastload.cuda.memory_reserved("cuda:0")
    assert a - before_a >= w and r - before_r >= w
    assert r >= a
    m.generate(np.array([[1, 5, 9]]), max_new_tokens=4, eos_token_id=None)
    fastload.cuda.synchronize()
    fastload.cuda.synchronize(0)
    assert fastload.cuda.max_memory_reserved() >= fastload.cuda.max_memory_allocated() >= a
    del m
    fastload.cuda.empty_cache()
    assert fastload.cuda.memory_reserved() == fastload.cuda.memory_allocated() <= before_a
    fastload.cuda.reset_peak_memory_stats()
    assert fastload.cuda.max_memory_reserved() == fastload.cuda.memory_reserved()
