"""CPU decode tokens/s on the demo model next to the memory-bandwidth ceiling (benchmarks/cpu_decode.py's
measurement: cpu_decode.run_fastload, bytes_per_token, membw_info), transformers as the peer when installed here or in
the Python FASTLOAD_BENCH_PEER_PYTHON names (the peer runs in its own process)."""
from __future__ import annotations

import importlib.util
import math
import os
import sys

import numpy as np
import pytest

import cpu_decode


@pytest.fixture(scope="module")
def llama1b(tmp_path_factory):
    """cpu_decode.py's Llama-3.2-1B-shaped random bf16 checkpoint (synth.write, ~2.5 GB)."""
    import synth
    d = str(tmp_path_factory.mktemp("llama1b"))
    synth.write(d, "llama-1b", "bfloat16")
    return d


@pytest.mark.parametrize("case", ["demo-float32", "demo-float16", "llama1b-bfloat16"])
def test_cpu_decode(record, request, bench_full, case):
    """cpu_decode.py's table: the demo model in float32 and float16; the Llama-1B shape only with --bench-full."""
    which, dtype = case.split("-")
    if which == "llama1b" and not bench_full:
        pytest.skip("the Llama-3.2-1B-shaped checkpoint (2.5 GB) only with --bench-full (FASTLOAD_BENCH_FULL=1)")
    path = request.getfixturevalue("demo_model" if which == "demo" else "llama1b")
    T, N = (32, 128) if bench_full else (32, 16)
    bw = cpu_decode.membw_info(1 << 30 if bench_full else 256 << 20)
    model, r = cpu_decode.run_fastload(path, dtype, T, N)
    bpt = cpu_decode.bytes_per_token(model, T + N // 2)
    bound = bw["read_GBps"] * 1e9 / bpt
    peer_python = os.environ.get("FASTLOAD_BENCH_PEER_PYTHON")  # an interpreter with torch + transformers
    if peer_python or all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        p = cpu_decode.run_peer(peer_python or sys.executable, path, dtype, T, N, os.cpu_count())
        peer = {"name": "transformers", "decode_tokens_per_s": p.get("tokens_per_s"), **p}
    else:
        peer = {"skipped": "torch / transformers not installed (FASTLOAD_BENCH_PEER_PYTHON names a Python that has "
                           "them)"}
    record({"decode_tokens_per_s": r["decode_tokens_per_s"], "tokens_per_s_e2e": r["tokens_per_s_e2e"],
            "prefill_s": r["prefill_s"], "load_s": r["load_s"], "bytes_per_token": bpt,
            "read_bandwidth_GBps": bw["read_GBps"], "params": model.num_parameters()},
           unit="tok/s", ceiling=bound, ceiling_how=f"read bandwidth / bytes per token; bandwidth: {bw['how']}",
           peer=peer, config={"model": os.path.basename(path), "dtype": dtype, "prompt_tokens": T,
                              "new_tokens": N})
    # correctness only: exactly N new tokens (eos off), a real model of the right dtype, finite figures
    assert r["new_tokens"] == N
    assert model.dtype == dtype
    assert bpt > 0 and math.isfinite(r["decode_tokens_per_s"]) and r["decode_tokens_per_s"] > 0
    # greedy decode is deterministic: the same prompt gives the same tokens twice
    ids = np.random.default_rng(0).integers(3, model.config["vocab_size"] - 1, size=(1, 8))
    a = np.asarray(model.generate(ids, max_new_tokens=6, eos_token_id=[]))
    b = np.asarray(model.generate(ids, max_new_tokens=6, eos_token_id=[]))
    assert a.shape == (1, 14) and (a == b).all()
