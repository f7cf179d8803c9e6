"""torch.cuda-style questions about the device memory fastload holds (weights, KV caches, workspaces).

Only fastload's own allocations are counted (the CUDA context and other libraries are not: see
model.memory_stats() for the whole picture)."""
from __future__ import annotations

from . import _C


def _dev(device) -> int:
    if device is None:
        return 0
    if isinstance(device, int):
        return device
    s = str(device)
    if s == "cuda":
        return 0
    if s.startswith("cuda:") and s[5:].isdigit():
        return int(s[5:])
    raise ValueError(f"device {device!r} is not 'cuda', 'cuda:N' or an index")


def is_available() -> bool:
    b = _C.build_info()
    return bool(b["cuda_compiled"] and b["cuda_devices"] > 0)


def device_count() -> int:
    return int(_C.build_info()["cuda_devices"])


def memory_allocated(device=None) -> int:
    """Bytes fastload currently holds on the device."""
    return _C.cuda_memory(_dev(device))["allocated"]


def max_memory_allocated(device=None) -> int:
    """Peak of memory_allocated() since the start or the last reset_peak_memory_stats()."""
    return _C.cuda_memory(_dev(device))["peak"]


def reset_peak_memory_stats(device=None) -> None:
    _C.cuda_memory(_dev(device), True)


def mem_get_info(device=None) -> tuple:
    """(free, total) bytes on the device, as the driver reports them (all processes)."""
    d = _C.cuda_memory(_dev(device))
    return d["free"], d["total"]
