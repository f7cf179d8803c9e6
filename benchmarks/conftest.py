"""The benchmark suite (`python -m pytest benchmarks`): each benchmark is a test that measures, hands its figures to
the one `record` fixture (with the hardware ceiling where one applies and the peer's figure where the peer is
installed) and asserts only correctness, never a timing.

`record` writes one JSON per benchmark (device, date, versions, git commit: fastload.bench.environment(), plus the
figures) into the results directory and prints a one-line summary per benchmark at the end of the run. The results
directory is `--bench-results DIR` (or FASTLOAD_BENCH_RESULTS), e.g. `--bench-results benchmarks/results/pytest`;
without either the JSON goes to a temporary directory (so that CI never writes into the tree) whose path is printed.

Sizes are small by default (the demo model, a few dozen tokens) so that the suite runs on a 2-core CPU in minutes;
`--bench-full` (or FASTLOAD_BENCH_FULL=1) uses the scripts' full sizes. GPU benchmarks skip without a CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, ROOT):  # the scripts' functions (cpu_decode, gpu_bench, ...) and this checkout's fastload
    if p not in sys.path:
        sys.path.insert(0, p)


def pytest_addoption(parser):
    g = parser.getgroup("fastload benchmarks")
    g.addoption("--bench-results", dest="bench_results", default=None,
                help="directory for the benchmarks' JSON (default: FASTLOAD_BENCH_RESULTS, else a temporary "
                     "directory; benchmarks/results/pytest keeps them in the tree)")
    g.addoption("--bench-full", dest="bench_full", action="store_true", default=False,
                help="full sizes (the scripts' defaults) instead of the quick CPU sizes (also FASTLOAD_BENCH_FULL=1)")


def _results_dir(config):
    d = config.getoption("bench_results") or os.environ.get("FASTLOAD_BENCH_RESULTS")
    if not d:
        d = getattr(config, "_fl_bench_tmp", None) or tempfile.mkdtemp(prefix="fastload-bench-")
        config._fl_bench_tmp = d
    return os.path.abspath(d)


def _summary(config):
    if not hasattr(config, "_fl_bench_summary"):
        config._fl_bench_summary = []
    return config._fl_bench_summary


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    lines = _summary(config)
    if not lines:
        return
    terminalreporter.section("fastload benchmarks")
    for line in lines:
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"results: {_results_dir(config)}")


@pytest.fixture(scope="session")
def bench_full(pytestconfig):
    """True for the scripts' full sizes (--bench-full / FASTLOAD_BENCH_FULL=1), False for the quick CPU sizes."""
    return bool(pytestconfig.getoption("bench_full") or os.environ.get("FASTLOAD_BENCH_FULL", "") not in ("", "0"))


@pytest.fixture(scope="session")
def results_dir(pytestconfig):
    return _results_dir(pytestconfig)


@pytest.fixture(scope="session")
def demo_model():
    """Path of the demo GGUF (skips when it is absent and cannot be fetched)."""
    from fastload.demo import demo_model_path
    try:
        p = demo_model_path()
    except Exception as e:  # noqa: BLE001 - no network on this machine, say so
        pytest.skip(f"the demo model is not cached and cannot be fetched: {type(e).__name__}: {e}")
    if not p or not os.path.isfile(p):
        pytest.skip("the demo model is not available")
    return p


@pytest.fixture(scope="session")
def cuda_device():
    """'cuda' when fastload sees a CUDA device; skips the test otherwise."""
    import fastload
    if not fastload._C.build_info().get("cuda_compiled"):
        pytest.skip("GPU benchmark: this fastload build has no CUDA (built with FASTLOAD_CUDA=0)")
    if not fastload.cuda.is_available():
        pytest.skip("GPU benchmark: no CUDA device visible")
    return "cuda"


def _clean(v):
    """JSON-safe figures: numpy scalars to Python, NaN/inf to None."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            v = v.item()
        except (ValueError, TypeError):
            return str(v)
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def _fmt(v, unit=""):
    if v is None:
        return "-"
    if isinstance(v, float):
        v = f"{v:.4g}"
    return f"{v}{(' ' + unit) if unit else ''}"


@pytest.fixture
def record(request, results_dir):
    """record(figures, *, unit=None, main=None, ceiling=None, ceiling_how=None, peer=None, device="cpu",
    config=None, note=None) -> path of the JSON written.

    figures: dict of this benchmark's measurements (rows allowed). main: the key of the headline figure (the first
    figure when omitted), unit its unit; ceiling: the hardware bound of that figure (same unit) and ceiling_how how
    it was measured; peer: {"name": ..., main: ...} or {"error"/"skipped": why} (None: no peer for this benchmark);
    config: the sizes and settings it ran with; note: free text appended to the summary line. Nothing here is
    asserted."""
    from fastload.bench import environment
    calls = []

    def _record(figures, *, unit=None, main=None, ceiling=None, ceiling_how=None, peer=None, device="cpu",
                config=None, note=None):
        name = request.node.name
        if calls:
            name = f"{name}-{len(calls)}"
        calls.append(name)
        main = main or next(iter(figures), None)
        doc = {"benchmark": name, "test": request.node.nodeid, "main": main, "unit": unit,
               "figures": figures, "ceiling": ceiling, "ceiling_how": ceiling_how,
               "share_of_ceiling": (figures[main] / ceiling if ceiling and isinstance(figures.get(main), (int, float))
                                    else None),
               "peer": peer, "config": config or {}, "note": note, "environment": environment(device)}
        doc = _clean(doc)
        os.makedirs(results_dir, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        fn = os.path.join(results_dir, f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}_{stamp}.json")
        tmp = fn + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, default=str)
        os.replace(tmp, fn)
        line = f"{name}: {main} {_fmt(doc['figures'].get(main), unit or '')}"
        if ceiling:
            share = doc["share_of_ceiling"]
            line += f" | ceiling {_fmt(doc['ceiling'], unit or '')}" + (f" ({share:.0%})" if share is not None else "")
        if peer:
            if peer.get(main) is not None:
                line += f" | {peer.get('name', 'peer')} {_fmt(_clean(peer[main]), unit or '')}"
            else:
                line += f" | peer: {peer.get('error') or peer.get('skipped') or 'no figure'}"
        if note:
            line += f" | {note}"
        _summary(request.config).append(line)
        print(line)
        return fn

    return _record


@pytest.fixture
def bench_cli(tmp_path):
    """run(["speed", "--context_length", "1", ...]) -> the JSON document `python -m fastload bench ...` wrote
    (rows, environment, notes): the suite measures with fastload.bench's own functions, into a temporary
    outputs dir."""
    from fastload import bench

    def run(argv):
        ap = argparse.ArgumentParser(prog="fastload")
        bench.add_parser(ap.add_subparsers(dest="cmd"))
        out = str(tmp_path / "outputs")
        args = ap.parse_args(["bench", *argv, "--outputs_dir", out])
        _csv, json_path = args.fn_bench(args)
        with open(json_path, encoding="utf-8") as fh:
            return json.load(fh)

    return run
