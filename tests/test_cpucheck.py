"""fastload/_cpucheck.py: a C core built (-march=native by default) for CPU features this CPU lacks is an ImportError
naming them, raised before any compiled code runs, not an illegal instruction that kills the process. setup.py
records the features (fastload/_build_cpu.py, from the compiler's macros under the build's flags)."""
import os
import platform
import subprocess
import sys

import pytest

import fastload
from fastload import _cpucheck

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastload.__file__)))
linux = pytest.mark.skipif(_cpucheck.cpu_flags() is None, reason="no readable /proc/cpuinfo flags (not Linux)")


def test_the_build_left_its_record():
    from fastload import _build_cpu
    assert _build_cpu.MACHINE == platform.machine()
    assert isinstance(_build_cpu.FEATURES, tuple) and all(isinstance(f, str) for f in _build_cpu.FEATURES)


@linux
def test_this_cpu_has_what_the_build_used():
    from fastload import _build_cpu
    assert _cpucheck.missing_features(_build_cpu.FEATURES, _build_cpu.MACHINE) == []


def test_missing_features_from_a_cpuinfo(tmp_path):
    p = tmp_path / "cpuinfo"
    p.write_text("processor\t: 0\nvendor_id\t: X\nflags\t\t: fpu sse2 ssse3 avx fma\nbogomips\t: 1\n\n"
                 "processor\t: 1\nflags\t\t: fpu sse2 ssse3 avx fma avx2\n")
    m = platform.machine()
    assert _cpucheck.missing_features(("avx", "avx2", "f16c"), m, str(p)) == ["avx2", "f16c"]  # the first CPU's
    assert _cpucheck.missing_features(("avx", "fma"), m, str(p)) == []
    assert _cpucheck.missing_features(("avx2",), "not-" + m, str(p)) == []  # a record for another machine type
    assert _cpucheck.missing_features(("avx2",), m, str(tmp_path / "absent")) == []  # unreadable: not checked
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd asimddp\n")
    assert _cpucheck.missing_features(("asimddp", "sve"), m, str(arm)) == ["sve"]


_FAKE = r"""
import builtins, io, sys
real = builtins.open
def fake(path, *a, **k):
    if path == "/proc/cpuinfo":
        return io.StringIO("processor\t: 0\nflags\t\t: fpu sse sse2\n")
    return real(path, *a, **k)
builtins.open = fake
try:
    import fastload
except ImportError as e:
    print("IMPORTERROR", e)
    sys.exit(3)
print("IMPORTED", "fastload._C" in sys.modules)
"""


@linux
def test_import_on_a_cpu_without_the_features_is_an_import_error():
    from fastload import _build_cpu
    if not _build_cpu.FEATURES:
        pytest.skip("this build uses no CPU features beyond the baseline (FASTLOAD_NATIVE=0?)")
    env = {k: v for k, v in os.environ.items() if k != "FASTLOAD_SKIP_CPU_CHECK"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    r = subprocess.run([sys.executable, "-c", _FAKE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    msg = r.stdout
    assert all(f in msg for f in _build_cpu.FEATURES), msg
    assert "illegal instruction" in msg and "FASTLOAD_NATIVE=0" in msg and "FASTLOAD_SKIP_CPU_CHECK=1" in msg
    # the check ran before the C core was loaded: nothing compiled ran
    r = subprocess.run([sys.executable, "-c", _FAKE.replace('print("IMPORTERROR", e)',
                        'print("IMPORTERROR", "fastload._C" in sys.modules)')], capture_output=True, text=True,
                       env=env, timeout=120)
    assert "IMPORTERROR False" in r.stdout, r.stdout + r.stderr
    env["FASTLOAD_SKIP_CPU_CHECK"] = "1"  # the way around it (this CPU does have them, so the import works)
    r = subprocess.run([sys.executable, "-c", _FAKE], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0 and "IMPORTED True" in r.stdout, r.stdout + r.stderr
