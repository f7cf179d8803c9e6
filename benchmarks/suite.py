"""The one way the benchmarks measure: `python -m pytest benchmarks` (figures recorded by conftest.py's `record`
fixture) and `python -m fastload bench ...`. The measurement scripts here (cpu_decode.py, cpu_quant_vs_llamacpp.py,
gpu_bench.py, quant_gpu.py) hold the functions their pytest benchmarks call; run as programs they run those
benchmarks through pytest, at full size, with the results in benchmarks/results/pytest/ (--bench-results DIR or
FASTLOAD_BENCH_RESULTS to choose), instead of writing JSON of their own."""
from __future__ import annotations

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_args(test_file, select=None, argv=()):
    """The pytest command line of `python benchmarks/SCRIPT.py [pytest options]`: test_file at full size
    (--bench-full), -k select, the results in benchmarks/results/pytest unless the caller chose a directory."""
    argv = list(argv)
    args = [os.path.join(HERE, test_file), "--bench-full", "-q", "-rs", "-p", "no:cacheprovider"]
    if select:
        args += ["-k", select]
    chosen = any(a == "--bench-results" or a.startswith("--bench-results=") for a in argv)
    if not chosen and not os.environ.get("FASTLOAD_BENCH_RESULTS"):
        args += ["--bench-results", os.path.join(HERE, "results", "pytest")]
    return args + argv


def main(test_file, select=None):
    """Run test_file's benchmarks (full size) and exit with pytest's status; sys.argv[1:] go to pytest."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(f"usage: python {os.path.relpath(sys.argv[0])} [pytest options]\n\nRuns "
              f"`python -m pytest {' '.join(pytest_args(test_file, select))}`: the benchmark is the pytest "
              "benchmark of this script (benchmarks/conftest.py records its figures, the ceiling and the peer as "
              "JSON); extra options go to pytest (-k EXPR, --bench-results DIR, -s).")
        sys.exit(0)
    import pytest
    sys.exit(pytest.main(pytest_args(test_file, select, sys.argv[1:])))
