"""fastload.cuda with torch.cuda's names and meanings. Without a CUDA device (CI): memory queries are 0,
synchronize/empty_cache do nothing, the device questions raise RuntimeError saying why. With one
(skipped here): real values, and a model's weights show in allocated and reserved alike."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import fastload
from golden_util import model_dir

HAVE_CUDA = fastload.cuda.is_available()
needs_gpu = pytest.mark.skipif(not HAVE_CUDA, reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))
needs_no_gpu = pytest.mark.skipif(HAVE_CUDA, reason="checks the behaviour without a CUDA device")

ALL = ("memory_reserved", "max_memory_reserved", "empty_cache", "synchronize", "is_available", "device_count",
       "get_device_name", "get_device_properties", "get_device_capability", "current_device", "set_device",
       "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats", "mem_get_info", "get_arch_list")


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


# ---------------------------------------------------------------- the architectures a build has kernels for
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastload.__file__)))


def test_arch_list_is_what_the_build_was_given():
    info = fastload.info()
    archs = fastload.cuda.get_arch_list()
    if not info["cuda_compiled"]:
        assert archs == [] and info["cuda_archs"] == ""
        return
    assert archs and all(re.fullmatch(r"sm_\d+[af]?", a) for a in archs), archs
    assert archs == ["sm_" + a for a in info["cuda_archs"].split(";")]
    assert info["cuda"].startswith("built for " + ", ".join(archs))


@needs_no_gpu
def test_kernel_check_without_a_device_says_why():
    err = NotImplementedError if not fastload.info()["cuda_compiled"] else (RuntimeError, ValueError)
    with pytest.raises(err, match="CUDA|cuda|device"):
        fastload._C.cuda_kernel_check(0)


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, "setup.py")), reason="needs the source tree's setup.py")
@pytest.mark.skipif(shutil.which("nvcc") is None and not os.path.exists("/usr/local/cuda/bin/nvcc"),
                    reason="no nvcc: setup.py reads FASTLOAD_CUDA_ARCHS only when it builds the CUDA part")
@pytest.mark.parametrize("archs", ["9.0", "sm_90", "80;compute_90", ";"])
def test_setup_refuses_malformed_archs_before_compiling(tmp_path, archs):
    env = dict(os.environ, FASTLOAD_CUDA="1", FASTLOAD_CUDA_ARCHS=archs, PATH=os.environ.get("PATH", "") + ":/usr/local/cuda/bin")
    r = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "-b", str(tmp_path / "lib"), "-t", str(tmp_path / "tmp")],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "FASTLOAD_CUDA_ARCHS=" in r.stderr and "without the dot" in r.stderr, r.stderr[-2000:]
    assert not list((tmp_path / "tmp").rglob("*.o"))  # nothing was compiled


@needs_gpu
def test_this_build_has_kernels_for_each_visible_gpu():
    archs = fastload.cuda.get_arch_list()
    for d in range(fastload.cuda.device_count()):
        major, minor = fastload.cuda.get_device_capability(d)
        k = fastload._C.cuda_kernel_check(d)
        assert k["binary"] == 10 * major + minor, (k, major, minor)
        # SASS for this GPU, or the PTX of an older architecture in the list, JIT-compiled by the driver
        assert f"sm_{k['binary']}" in archs or (k["ptx"] and f"sm_{k['ptx']}" == archs[-1]), (k, archs)


FOREIGN = os.environ.get("FASTLOAD_FOREIGN_BUILD", "")


@pytest.mark.skipif(not FOREIGN, reason="set FASTLOAD_FOREIGN_BUILD to a folder holding a fastload package built for "
                    "GPUs other than this machine's (dev/cuda/foreign_arch.sh makes one)")
def test_a_build_for_other_gpus_is_a_clear_error_at_load(tmp_path):
    # Everything is asked of the foreign build in a subprocess: the package under test here may be CPU-only.
    code = f"""
import fastload
assert fastload.cuda.is_available() and fastload.cuda.device_count() >= 1, fastload.info()  # questions still answer
print("ARCHS", fastload.cuda.get_arch_list())
print("NAME", fastload.cuda.get_device_name(0))
print("CAP %d.%d" % fastload.cuda.get_device_capability(0))
for call in (lambda: fastload._C.cuda_kernel_check(0),
             lambda: fastload.AutoModelForCausalLM.from_pretrained({str(model_dir("llama"))!r}, device_map="cuda",
                                                                   torch_dtype="float16")):
    try:
        call()
    except NotImplementedError as e:
        print("ERR", e)
    else:
        print("NO ERROR")
"""
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=FOREIGN), capture_output=True,
                       text=True, timeout=300, cwd=tmp_path)  # not the source tree's cwd: `-c` puts it first on sys.path
    assert r.returncode == 0, r.stderr[-3000:]
    out = dict(l.split(" ", 1) for l in r.stdout.splitlines() if l.startswith(("ARCHS", "NAME", "CAP")))
    errs = [l for l in r.stdout.splitlines() if l.startswith(("ERR", "NO ERROR"))]
    cap = out["CAP"]
    assert "sm_" in out["ARCHS"] and f"'sm_{cap.replace('.', '')}'" not in out["ARCHS"], out  # really foreign
    assert len(errs) == 2, r.stdout
    for e in errs:
        assert e.startswith("ERR"), r.stdout
        assert "cannot run this build of fastload" in e and out["NAME"] in e and f"compute capability {cap}" in e, e
        assert f'FASTLOAD_CUDA_ARCHS="{cap.replace(".", "")}"' in e, e
