"""GPU benchmarks on a Qwen2.5-7B-shaped bf16 checkpoint with random weights (benchmarks/gpu_bench.py and
quant_gpu.py's measurements, `bench speed` / `bench load`): decode batch 1 and 8, prefill, 32k context (--bench-full),
load against the raw read rate, Qwen's speed table, quantised modes. Ceiling: the device-to-device copy bandwidth
(gpu_bench.d2d_bandwidth, needs torch) over the bytes a decode step reads. Peers: transformers (and bitsandbytes for
the quantised modes) in the same process when installed. Everything skips without a CUDA device.

The checkpoint: FASTLOAD_BENCH_QWEN7B_DIR (default /tmp/fl_qwen7b, as gpu_bench.py's --dir), made once when it
has none (gpu_bench.make_checkpoint with torch, else synth.write with numpy: ~15 GB). `bench speed` needs a
tokenizer: a directory without tokenizer.json gets a small word-level one (random weights have no real vocabulary).
"""
from __future__ import annotations

import gc
import importlib.util
import math
import os

import pytest

import gpu_bench

pytestmark = pytest.mark.gpu


def _have(*mods):
    return all(importlib.util.find_spec(m) is not None for m in mods)


@pytest.fixture(scope="module")
def qwen7b(cuda_device):
    import synth
    return synth.bench_checkpoint(os.environ.get("FASTLOAD_BENCH_QWEN7B_DIR", "/tmp/fl_qwen7b"))


@pytest.fixture(scope="module")
def d2d(cuda_device):
    """Device-to-device copy bandwidth in bytes/s (read + written), or None without torch."""
    if not _have("torch"):
        return None
    return gpu_bench.d2d_bandwidth()


# load and speed first: each loads its own models, and the memory figures must not count the module's
# resident models (fl_model, hf_model below stay loaded until the module ends)
def test_gpu_load(record, bench_cli, qwen7b, bench_full, cuda_device):
    from test_cpu_load import load_benchmark
    load_benchmark(record, bench_cli, qwen7b, "cuda", bench_full, suffix=".safetensors")


def test_gpu_speed(record, bench_cli, qwen7b, bench_full, cuda_device):
    """Qwen's speed table (`bench speed`): context lengths 1 6144 14336 30720 and 2048 new tokens with
    --bench-full, else 1 2048 and 128 new tokens; transformers in the same run when installed."""
    lengths = [1, 6144, 14336, 30720] if bench_full else [1, 2048]
    gen = 2048 if bench_full else 128
    argv = ["speed", "--model", qwen7b, "--device", "cuda", "--generate_length", str(gen), "--context_length",
            *map(str, lengths)]
    if _have("torch", "transformers"):
        argv += ["--peer", "transformers"]
    doc = bench_cli(argv)
    fl = {r["context_length_per_experiment"]: r for r in doc["rows"] if r["engine"] == "fastload"}
    hf = {r["context_length_per_experiment"]: r for r in doc["rows"] if r["engine"] == "transformers"}
    figures = {f"tokens_per_second_ctx{n}": fl[n]["tokens_per_second"] for n in lengths}
    figures.update({f"max_gpu_memory_cost_gb_ctx{n}": fl[n]["max_gpu_memory_cost_gb"] for n in lengths})
    peer = ({"name": "transformers", **{f"tokens_per_second_ctx{n}": r["tokens_per_second"] for n, r in hf.items()},
             **{f"max_gpu_memory_cost_gb_ctx{n}": r["max_gpu_memory_cost_gb"] for n, r in hf.items()}} if hf else
            {"error": doc["peer"]["transformers"]["error"]} if doc["peer"].get("transformers") else
            {"skipped": "torch / transformers not installed"})
    record(figures, unit="tok/s", peer=peer, device="cuda", config={"rows": doc["rows"], "notes": doc["notes"]})
    assert sorted(fl) == lengths  # cmd_speed itself checks that every row generated exactly `gen` tokens
    for n in lengths:
        assert fl[n]["generate_length_per_experiment"] == gen and fl[n]["tokens_per_second"] > 0
        assert fl[n]["max_gpu_memory_cost_gb"] > 0


@pytest.fixture(scope="module")
def fl_model(qwen7b):
    m, load_s = gpu_bench.time_fastload_load(qwen7b)
    yield m
    del m
    gc.collect()


@pytest.fixture(scope="module")
def hf_model(qwen7b):
    if not _have("torch", "transformers"):
        yield None
        return
    m, _ = gpu_bench.time_hf_load(qwen7b)
    yield m
    gpu_bench.free_hf(m)


CASES = {  # name: (batch, prompt, new tokens quick, new tokens full, full only)
    "decode_b1": (1, 32, 64, 256, False),
    "decode_b8": (8, 32, 64, 256, False),
    "prefill_2048": (1, 2048, 2, 2, False),
    "long_32k": (1, 32768 - 64, 16, 64, True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gpu_decode(record, fl_model, hf_model, d2d, bench_full, case):
    B, T, nq, nf, full_only = CASES[case]
    if full_only and not bench_full:
        pytest.skip(f"{case}: only with --bench-full (FASTLOAD_BENCH_FULL=1)")
    N = nf if bench_full else nq
    r = gpu_bench.fl_decode(fl_model, B, T, N)
    prefill = case.startswith("prefill")
    main = "ttft_s" if prefill else ("decode_tok_s_total" if B > 1 else "decode_tok_s_per_seq")
    ceiling = None
    if d2d and not prefill:
        ceiling = gpu_bench.roofline_fn(fl_model, d2d)(T + N // 2, B) * B
    if hf_model is not None:
        p = gpu_bench.hf_decode(hf_model, B, T, N)
        peer = {"name": "transformers (eager)", **p}
    else:
        peer = {"skipped": "torch / transformers not installed"}
    record(r, main=main, unit="s" if prefill else "tok/s", ceiling=ceiling,
           ceiling_how=f"D2D copy {d2d / 1e9:.0f} GB/s over the bytes a step reads (weights but the embedding "
                       "table, + the KV cache)" if ceiling else None,
           peer=peer, device="cuda", config={"batch": B, "prompt": T, "new_tokens": N})
    assert r["new"] == N and r["batch"] == B
    assert math.isfinite(r[main]) and r[main] > 0


@pytest.mark.parametrize("mode", ["int8", "int4", "nf4", "int4-x16", "nf4-x16"])
def test_gpu_quant(record, qwen7b, fl_model, d2d, bench_full, mode):
    """quant_gpu.py's per-mode figures: load, weight memory, decode batch 1 against the roofline of the bytes the
    quantised step reads, decode batch 8, time to first token of a 2048-token prompt; bitsandbytes in the same run
    when installed."""
    import quant_gpu
    N = 128 if bench_full else 32
    m, rec = quant_gpu.fl_load(qwen7b, mode, reps=3 if bench_full else 1)
    assert m is not None, rec
    try:
        r = gpu_bench.fl_decode(m, 1, 32, N)
        r8 = gpu_bench.fl_decode(m, 8, 32, N)
        pf = gpu_bench.fl_decode(m, 1, 2048, 2)
        ceiling = None
        if d2d:
            step, _how = quant_gpu.bytes_per_step(m, m.get_memory_footprint())
            ceiling = d2d / (step + quant_gpu.kv_bytes_per_token(m.config) * (32 + N // 2))
        figures = {"decode_tok_s_per_seq": r["decode_tok_s_per_seq"], "load_s": rec["load_s"],
                   "weights_bytes": rec["weights_bytes"], "quantized_weights": rec["quantized_weights"],
                   "ttft_s": r["ttft_s"], "decode_b8_tok_s_total": r8["decode_tok_s_total"],
                   "prefill_2048_ttft_s": pf["ttft_s"]}
    finally:
        del m
        gc.collect()
    peer = {"skipped": "torch / transformers / bitsandbytes not installed"}
    if _have("torch", "transformers", "bitsandbytes"):
        name = quant_gpu.PEER_OF[mode]
        try:
            hm, prec = quant_gpu.hf_load(qwen7b, name)
            p = gpu_bench.hf_decode(hm, 1, 32, N)
            gpu_bench.free_hf(hm)
            peer = {"name": f"transformers + bitsandbytes ({name})", **prec, **p}
        except Exception as e:  # noqa: BLE001 - the peer failing is recorded, not a failure of fastload
            peer = {"error": f"{type(e).__name__}: {e}"[:500]}
    record(figures, main="decode_tok_s_per_seq", unit="tok/s", ceiling=ceiling,
           ceiling_how="D2D copy bandwidth over core.layouts() bytes (codes + scales + offsets) + KV" if ceiling
           else None, peer=peer, device="cuda", config={"mode": mode, "how": rec["how"], "new_tokens": N})
    # really quantised: the core holds quantised weights, in fewer bytes than the bf16 model
    assert rec["quantized_weights"] > 0
    assert rec["weights_bytes"] < fl_model.get_memory_footprint()
    assert r["new"] == N and r8["batch"] == 8 and r8["new"] == N


def test_gpu_step_gap(record, qwen7b, cuda_device):
    """What a batch-1 decode step waits for besides its own graph (benchmarks/step_gap.py: each step replayed k more
    times behind itself, the line through the step times), with the pipelined decode (the default: step t+1 launched
    on t's device tokens before the host reads them) and step by step (FASTLOAD_ENGINE_PIPELINE=0)."""
    import step_gap
    rows = {p: step_gap.measure(qwen7b, new=128, env={"FASTLOAD_ENGINE_PIPELINE": p}) for p in ("1", "0")}
    record({"gap_us_pipelined": rows["1"]["host_gap_us"], "gap_us_step_by_step": rows["0"]["host_gap_us"],
            "gpu_us_per_step": rows["1"]["gpu_us_per_step"], "pipelined": rows["1"], "step_by_step": rows["0"]},
           main="gap_us_pipelined", unit="us", device="cuda",
           config={"batch": 1, "prompt": 32, "new_tokens": 128, "replays": [0, 1, 2]},
           note="the ideal is 0: every microsecond here is a step's time the GPU spends outside its decode graph")
    for r in rows.values():
        assert math.isfinite(r["gpu_us_per_step"]) and r["gpu_us_per_step"] > 0
