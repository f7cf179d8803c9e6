"""What an sdist carries and what the package declares (hunt23): setuptools' defaults left every header, every .cu
file and csrc/cuda/cuda_stub.c out of the sdist, so `pip install fastload-X.tar.gz` (and `python -m build`, which builds
the wheel from the sdist) failed; pyproject allowed Python 3.9, where the module built and then failed to import."""
import glob
import os
import re
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sdist(tmp_path):
    r = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(tmp_path)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env=dict(os.environ, FASTLOAD_CUDA="0"))
    if r.returncode:
        pytest.fail(f"setup.py sdist failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    (tar,) = glob.glob(str(tmp_path / "fastload-*.tar.gz"))
    with tarfile.open(tar) as t:
        names = [n.split("/", 1)[1] for n in t.getnames() if "/" in n]
    return set(names), os.path.getsize(tar)


def test_sdist_has_every_file_the_build_reads(tmp_path):
    names, size = _sdist(tmp_path)
    need = [os.path.relpath(p, ROOT) for pat in ("csrc/**/*.c", "csrc/**/*.h", "csrc/**/*.cu", "csrc/**/*.cuh",
                                                 "fastload/*.py")
            for p in glob.glob(os.path.join(ROOT, pat), recursive=True)]
    assert len(need) > 80
    missing = sorted(set(need) - names)
    assert not missing, f"not in the sdist: {missing}"
    for f in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        assert f in names, f
    # the repository's own trees stay out (tests need their 16 MB of fixtures and a checkout)
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "notebooks/", "tools/", "dev/", "fuzz/"))]
    assert not [n for n in names if n.endswith((".o", ".so", ".sha"))]
    assert size < 5 << 20, size


def test_declared_python_matches_the_c_api_used():
    """PyModule_AddObjectRef is CPython 3.10's: requires-python must not allow less."""
    text = open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    m = re.search(r'requires-python\s*=\s*">=\s*3\.(\d+)"', text)
    assert m, "requires-python not found"
    uses = any("PyModule_AddObjectRef" in open(p, encoding="utf-8").read()
               for p in glob.glob(os.path.join(ROOT, "csrc", "py", "*.c")))
    assert int(m.group(1)) >= (10 if uses else 9), m.group(0)
