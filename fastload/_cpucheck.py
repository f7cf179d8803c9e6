"""Before the C core loads: does this CPU have the features the core was compiled to use?

setup.py builds the C core with -march=native by default (the package is built on the machine that runs it, as
llama.cpp's GGML_NATIVE) and records the CPU features that allowed in fastload/_build_cpu.py. A build copied to an
older CPU (a wheel or venv from another machine, a Docker image, a cluster's shared environment) would die of an
illegal instruction (SIGILL) in its first kernel, taking the whole process with it; this makes it an ImportError that
names the missing features and the two ways out. Pure Python on purpose: no compiled code runs before it.

Linux only (/proc/cpuinfo); elsewhere, or without the record (a build by other means), nothing is checked.
FASTLOAD_SKIP_CPU_CHECK=1 skips it (a kernel that names a feature differently)."""
from __future__ import annotations

import os
import platform

CPUINFO = "/proc/cpuinfo"


def cpu_flags(path: str = CPUINFO) -> set[str] | None:
    """The CPU's feature names from the first `flags` (x86) or `Features` (ARM) line; None if unreadable."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, rest = line.partition(":")
                if sep and key.strip() in ("flags", "Features"):
                    return set(rest.split())
    except OSError:
        return None
    return None


def missing_features(built_for, machine: str, path: str = CPUINFO) -> list[str]:
    """The features in `built_for` this CPU lacks ([] when it has them all or cannot be read, or the record is for
    another machine type: that module would not load at all)."""
    if not built_for or machine != platform.machine():
        return []
    flags = cpu_flags(path)
    if flags is None:
        return []
    return [f for f in built_for if f not in flags]


def check(path: str = CPUINFO) -> None:
    if os.environ.get("FASTLOAD_SKIP_CPU_CHECK", "") == "1":
        return
    try:
        from . import _build_cpu
    except ImportError:
        return
    missing = missing_features(getattr(_build_cpu, "FEATURES", None), getattr(_build_cpu, "MACHINE", ""), path)
    if missing:
        raise ImportError(
            f"fastload's C core was compiled for a CPU with {', '.join(missing)} ({_build_cpu.FLAGS or 'its compiler'}"
            f" on the machine that built it), and this CPU lacks {'it' if len(missing) == 1 else 'them'}: its "
            "kernels would stop the process with an illegal instruction. Build it on this machine "
            "(pip install --force-reinstall --no-cache-dir with fastload's source), or build a portable one anywhere "
            "with FASTLOAD_NATIVE=0 (slower kernels). FASTLOAD_SKIP_CPU_CHECK=1 skips this "
            "check.")
