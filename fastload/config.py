"""Settings from the environment and argument normalisation (dtype, device).

Environment variables (explicit arguments always win):
  FASTLOAD_DEVICE   default device_map: "cpu", "cuda", "cuda:N" or "auto" (default "auto":
                    CUDA when built with it and a device is present, else CPU)
  FASTLOAD_DTYPE    default torch_dtype: "auto", "float16", "bfloat16", "float32"
  FASTLOAD_MODEL    default model for `python -m fastload` (path, .gguf file or hub id)
  FASTLOAD_QUANT    quantisation at load when from_pretrained is given none: "none" (default), "int8", "int4",
                    "nf4" (fastload/quant.py; ignored for GPTQ / AWQ checkpoints, which are quantised already)
  FASTLOAD_THREADS  CPU threads (default 0: all cores, fewer while other processes keep some busy; README "Busy
                    cores")
  FASTLOAD_ADAPT_THREADS  "0": the default count stays at all cores even while other processes keep some busy
  FASTLOAD_CACHE    where the demo model is kept (default ~/.cache/fastload)
"""
from __future__ import annotations

import os

from . import _C
from ._util import is_torch

_DTYPE_ALIASES = {
    "float32": "float32", "fp32": "float32", "float": "float32", "f32": "float32",
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "auto": "auto",
}


def env(name: str, default=None):
    v = os.environ.get(name)
    return v if v not in (None, "") else default


def dtype_key(dtype):
    """The canonical name ("float32", "float16", "bfloat16" or "auto") of a dtype given any way: a string alias,
    a numpy dtype or type, a torch dtype (torch is never imported); None for anything else."""
    if isinstance(dtype, str):
        key = dtype.lower().replace("torch.", "")
    elif is_torch(dtype):
        key = str(dtype).replace("torch.", "")
    else:
        try:
            import numpy as np
            key = np.dtype(dtype).name
        except (TypeError, ValueError):
            return None
    return _DTYPE_ALIASES.get(key)


def normalize_dtype(dtype, where="torch_dtype") -> str:
    """Accept strings, numpy dtypes/types and torch dtypes (without importing torch)."""
    if dtype is None:
        dtype = env("FASTLOAD_DTYPE", "auto")
    key = dtype_key(dtype)
    if key is None:
        raise ValueError(f"{where}={dtype!r} is not supported; use one of float32, float16, bfloat16 or 'auto'")
    return key


def cuda_available() -> bool:
    info = _C.build_info()
    return bool(info["cuda_compiled"] and info["cuda_devices"] > 0)


def normalize_device(device_map=None, device=None) -> str:
    """device_map as transformers takes it ("cpu", "cuda", "cuda:1", "auto", 0, {"": 0}) -> "cpu"|"cuda:N"."""
    d = device_map if device_map is not None else device
    if d is None:
        d = env("FASTLOAD_DEVICE", "auto")
    if isinstance(d, dict):
        vals = set(d.values())
        if len(vals) != 1:
            raise NotImplementedError(f"device_map={d!r}: splitting one model over several devices is not supported yet")
        d = vals.pop()
    if is_torch(d):
        d = str(d)
    if isinstance(d, int):
        d = f"cuda:{d}"
    d = str(d).lower()
    if d == "auto":
        return "cuda:0" if cuda_available() else "cpu"
    if d == "cpu":
        return "cpu"
    if d == "cuda":
        return "cuda:0"
    if d.startswith("cuda:") and d[5:].isdigit():
        return d
    raise ValueError(f"device_map={d!r} is not supported; use 'cpu', 'cuda', 'cuda:N' or 'auto'")


def quant_setting(quant=None) -> str:
    """The quantisation scheme named by `quant` or, when None, FASTLOAD_QUANT: "none", "int8", "int4" or "nf4"
    ("no", "off", "0", "false" and "" mean "none"). Anything else raises ValueError naming the setting."""
    src = "quant" if quant is not None else "FASTLOAD_QUANT"
    q = quant if quant is not None else env("FASTLOAD_QUANT", "none")
    s = str(q).strip().lower()
    if s in ("none", "no", "off", "0", "false", ""):
        return "none"
    if s not in ("int8", "int4", "nf4"):
        raise ValueError(f"{src}={q!r} is not supported; use one of int8, int4, nf4 or none")
    return s


def max_cpu_threads() -> int:
    """The most CPU threads a model may be given: 4x the CPUs this process may run on, at least 64. More only slows
    the kernels down, and asking OpenMP for thousands can fail thread creation, which libgomp answers by exiting
    the process (the core refuses more than 4096 itself)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(64, 4 * n)


def check_threads(v, where: str) -> int:
    """A thread count as given to from_pretrained(threads=) / FASTLOAD_THREADS / --threads: 0 (all cores, the
    default) or 1 .. max_cpu_threads(); anything else raises naming `where`."""
    import numpy as np
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{where}={v!r} must be an integer (0: all cores)")
    v, cap = int(v), max_cpu_threads()
    if not 0 <= v <= cap:
        raise ValueError(f"{where}={v} is out of range: use 1 .. {cap} CPU threads, or 0 for all cores")
    return v


def cpu_threads() -> int:
    v = env("FASTLOAD_THREADS")
    try:
        n = int(v) if v else 0
    except ValueError:
        raise ValueError(f"FASTLOAD_THREADS={v!r} is not an integer") from None
    return check_threads(n, "FASTLOAD_THREADS")
