"""torch.cuda-style questions about the device memory fastload holds (weights, KV caches, workspaces)
and the devices it sees, with torch's names and meanings.

Only fastload's own allocations are counted (the CUDA context and other libraries are not: see
model.memory_stats() for the whole picture).

fastload has no caching allocator: every device buffer is one cudaMalloc, given back with cudaFree
when its owner goes (csrc/cuda/cuda_memory.cu). So memory_reserved() == memory_allocated() and
max_memory_reserved() == max_memory_allocated(); empty_cache() has no device memory to give back and
frees the pinned host buffers the loader keeps for the next load.

Without a CUDA device (a CPU-only build, or no device visible): is_available() is False,
device_count() 0, the memory queries return 0 (fastload holds no device memory), synchronize() and
empty_cache() do nothing, and get_device_name() / get_device_properties() / get_device_capability() /
current_device() raise RuntimeError saying why (not compiled with CUDA, or no device)."""
from __future__ import annotations

from . import _C
from ._util import is_torch


def _dev(device) -> int:
    """An index from None (the current device, 0), an int, "cuda", "cuda:N" or a torch.device."""
    if device is None:
        return current_device() if is_available() else 0
    if is_torch(device):
        if getattr(device, "type", "cuda") != "cuda":
            raise ValueError(f"device {device!r} is not a CUDA device")
        device = 0 if device.index is None else device.index
    if isinstance(device, bool):
        raise ValueError(f"device {device!r} is not 'cuda', 'cuda:N' or an index")
    if isinstance(device, int):
        idx = device
    else:
        s = str(device)
        if s == "cuda":
            idx = 0
        elif s.startswith("cuda:") and s[5:].isdigit():
            idx = int(s[5:])
        else:
            raise ValueError(f"device {device!r} is not 'cuda', 'cuda:N' or an index")
    if idx < 0:
        raise ValueError(f"device {device!r}: a CUDA device index is >= 0")
    n = device_count()
    if n and idx >= n:
        raise ValueError(f"device {device!r}: {n} CUDA device(s) are visible (cuda:0 to cuda:{n - 1})")
    return idx


def _why_not() -> str:
    b = _C.build_info()
    if not b["cuda_compiled"]:
        return ("fastload was built without CUDA (no nvcc at install time, or FASTLOAD_CUDA=0); "
                "reinstall with nvcc on PATH")
    return f"no CUDA device is visible ({b['cuda_error'] or 'the driver reports 0 devices'})"


def _need_device():
    if not is_available():
        raise RuntimeError(f"no CUDA device: {_why_not()}")


def is_available() -> bool:
    """True when fastload was built with CUDA and at least one device is visible."""
    b = _C.build_info()
    return bool(b["cuda_compiled"] and b["cuda_devices"] > 0)


def device_count() -> int:
    """Visible CUDA devices (0 for a CPU-only build or without a driver)."""
    return int(_C.build_info()["cuda_devices"])


def current_device() -> int:
    """The device fastload.cuda's calls use when given none, and the one device_map="cuda" loads onto: 0.
    RuntimeError without a CUDA device (as torch)."""
    _need_device()
    return 0


def set_device(device) -> None:
    """Accepted for cuda:0 (the current device already). Another index raises NotImplementedError:
    device_map="cuda" always means cuda:0 here, so pass device_map="cuda:N" to from_pretrained instead."""
    idx = _dev(device)
    if idx != 0:
        raise NotImplementedError(f"set_device({device!r}): fastload has no per-thread current device; "
                                  f"load with device_map='cuda:{idx}' and pass device='cuda:{idx}' to fastload.cuda calls")


def get_device_properties(device=None) -> "DeviceProperties":
    """name, total_memory (bytes), major, minor, multi_processor_count of a device, as torch's."""
    _need_device()
    return DeviceProperties(**_C.cuda_device_props(_dev(device)))


def get_arch_list() -> list:
    """The GPU architectures this build has kernels for, as torch's: ['sm_80', 'sm_90'] (set by FASTLOAD_CUDA_ARCHS at
    build time, by default the GPUs nvidia-smi showed; the last one's PTX is embedded too, so newer GPUs JIT-compile
    it). [] without CUDA. Loading on a GPU none of them runs raises NotImplementedError saying how to rebuild."""
    return _arch_names(_C.build_info()["cuda_archs"])


def _arch_names(archs: str) -> list:
    """build_info()'s "90;80" as ['sm_90', 'sm_80'] (get_arch_list and fastload.info())."""
    return [f"sm_{a}" for a in archs.split(";") if a]


def get_device_name(device=None) -> str:
    return get_device_properties(device).name


def get_device_capability(device=None) -> tuple:
    p = get_device_properties(device)
    return p.major, p.minor


def synchronize(device=None) -> None:
    """Wait until every kernel and copy fastload queued on the device has finished (no-op without CUDA)."""
    if not is_available():
        return
    _C.cuda_synchronize(_dev(device))


def empty_cache() -> None:
    """fastload caches no device memory (every buffer is cudaFree'd when its owner goes), so this frees
    only the pinned host buffers the CUDA loader keeps for the next load. No-op without CUDA."""
    _C.cuda_empty_cache()


def memory_allocated(device=None) -> int:
    """Bytes fastload currently holds on the device (0 without CUDA)."""
    return _C.cuda_memory(_dev(device))["allocated"]


def max_memory_allocated(device=None) -> int:
    """Peak of memory_allocated() since the start or the last reset_peak_memory_stats()."""
    return _C.cuda_memory(_dev(device))["peak"]


def memory_reserved(device=None) -> int:
    """Bytes held from the driver: equal to memory_allocated(), as there is no caching allocator."""
    return memory_allocated(device)


def max_memory_reserved(device=None) -> int:
    """Peak of memory_reserved(): equal to max_memory_allocated() (no caching allocator)."""
    return max_memory_allocated(device)


def reset_peak_memory_stats(device=None) -> None:
    """Resets max_memory_allocated() and max_memory_reserved() to the current value."""
    _C.cuda_memory(_dev(device), True)


reset_max_memory_allocated = reset_peak_memory_stats


def mem_get_info(device=None) -> tuple:
    """(free, total) bytes on the device, as the driver reports them (all processes); (0, 0) without CUDA."""
    d = _C.cuda_memory(_dev(device))
    return d["free"], d["total"]


class DeviceProperties:
    """What get_device_properties() returns: torch's _CudaDeviceProperties fields that scripts read."""

    __slots__ = ("name", "total_memory", "major", "minor", "multi_processor_count")

    def __init__(self, name, total_memory, major, minor, multi_processor_count):
        self.name, self.total_memory = name, int(total_memory)
        self.major, self.minor, self.multi_processor_count = int(major), int(minor), int(multi_processor_count)

    def __repr__(self):
        return (f"_CudaDeviceProperties(name='{self.name}', major={self.major}, minor={self.minor}, "
                f"total_memory={self.total_memory // (1024 * 1024)}MB, "
                f"multi_processor_count={self.multi_processor_count})")
