"""GPU benchmark functions (issue 3): the Qwen2.5-7B-shaped checkpoint, decode / prefill / batch timing of fastload
and transformers, the device-to-device copy bandwidth and the decode roofline. benchmarks/test_gpu.py measures and
records with them (`python -m pytest benchmarks -k gpu`; load and Qwen's speed table through `python -m fastload bench
load` / `bench speed`); dev/cuda scripts use make_checkpoint and d2d_bandwidth.

    python benchmarks/gpu_bench.py [pytest options]   # = test_gpu.py's benchmarks but the quantised ones, full size

make_checkpoint: a Qwen2.5-7B-shaped bf16 checkpoint with random weights (4 shards), torch drawing the numbers on the
GPU (never zeros). Ceilings: device-to-device copy bandwidth (bytes read + written) for the decode roofline.
"""
from __future__ import annotations

import gc
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def log(*a):
    print(*a, flush=True)


def need_cuda(script, device="cuda", torch_too=False):
    """Exit with a one-line message (status 2) where `script` cannot run: a CUDA device asked for and this fastload
    build has no CUDA or sees no device, or torch needed (checkpoints drawn on the GPU, the copy-rate roofline, the
    transformers peer) and not installed. A GPU-only script on a CPU machine otherwise died in a traceback deep
    inside (`No module named 'torch'`, fastload's NotImplementedError) that never said it needs a GPU."""
    import importlib.util
    import fastload
    b = fastload.info()
    if str(device).startswith("cuda") and (not b["cuda_compiled"] or not b["cuda_devices"]):
        print(f"{script}: needs a CUDA device (--device {device}), and fastload here is {b['cuda']}", file=sys.stderr)
        sys.exit(2)
    if torch_too and importlib.util.find_spec("torch") is None:
        print(f"{script}: needs torch with CUDA (it draws checkpoints or measures the copy rate with it); "
              "pip install torch", file=sys.stderr)
        sys.exit(2)


def make_checkpoint(d, shape="qwen2.5-7b", shards=4, num_hidden_layers=None):
    import torch
    from safetensors.torch import save_file
    from synth import config, tensors_for
    if os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
        return
    os.makedirs(d, exist_ok=True)
    cfg = config(shape, "bfloat16", num_hidden_layers)
    specs = list(tensors_for(cfg))
    total = sum(int(np.prod(s)) * 2 for _, s in specs)
    per = total / shards
    g = torch.Generator(device="cuda").manual_seed(0)
    groups, cur, size = [], [], 0
    for name, shp in specs:
        cur.append((name, shp)); size += int(np.prod(shp)) * 2
        if size >= per and len(groups) < shards - 1:
            groups.append(cur); cur, size = [], 0
    groups.append(cur)
    wm = {}
    for i, items in enumerate(groups):
        fn = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shp in items:
            if name.endswith("norm.weight"):
                t = 1 + 0.1 * torch.randn(shp, generator=g, device="cuda")
            else:
                std = 0.5 / np.sqrt(shp[-1]) if len(shp) == 2 else 0.02
                t = torch.randn(shp, generator=g, device="cuda") * std
            tensors[name] = t.to(torch.bfloat16).cpu()
            wm[name] = fn
        save_file(tensors, os.path.join(d, fn), metadata={"format": "pt"})
        del tensors
    json.dump({"metadata": {"total_size": total}, "weight_map": wm}, open(os.path.join(d, "model.safetensors.index.json"), "w"))
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"), indent=1)
    if "bos_token_id" in cfg:  # ChatGLM's repository has no generation_config.json (synth.py's chatglm2-6b)
        json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False},
                  open(os.path.join(d, "generation_config.json"), "w"))


def ckpt_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def d2d_bandwidth(device="cuda"):
    """Copy bandwidth in bytes/s, bytes read + written: a 1 GiB device-to-device copy, median of 10 after 3 warm-ups.
    device "cpu": a 256 MiB host copy timed with the wall clock (CPU runs of the GPU scripts at tiny size)."""
    import torch
    if str(device).startswith("cpu"):
        a = torch.empty(1 << 28, dtype=torch.uint8).random_()
        b = torch.empty_like(a)
        ts = []
        for i in range(8):
            t0 = time.perf_counter(); b.copy_(a); t = time.perf_counter() - t0
            if i >= 2:
                ts.append(t)
        return 2 * a.numel() / float(np.median(ts))
    n = 1 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    ts = []
    for _ in range(10):
        e0.record(); b.copy_(a); e1.record(); torch.cuda.synchronize()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del a, b
    return 2 * n / float(np.median(ts))


def time_fastload_load(d, dtype="bfloat16"):
    import fastload
    t0 = time.perf_counter()
    m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cuda", torch_dtype=dtype, progress=False)
    dt = time.perf_counter() - t0
    return m, dt


def time_hf_load(d, dtype="bfloat16"):
    import torch
    import transformers
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    m = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=getattr(torch, dtype), device_map="cuda")
    torch.cuda.synchronize()
    return m, time.perf_counter() - t0


def free_hf(m):
    import torch
    del m
    gc.collect()
    torch.cuda.empty_cache()


def decode_rate(n, dt, ttft):
    """Decode tokens/s from two timed calls: (n - 1) tokens over the n-token call's time less the 1-token call's
    (every benchmark here measures decode so). None where noise between the two calls exceeds the decode (the
    difference is <= 0): no figure rather than a negative one (scores_overhead / step_gap printed -342 tok/s)."""
    return (n - 1) / (dt - ttft) if dt > ttft and n >= 2 else None


def median_rate(fn, new, reps=3):
    """Decode tokens/s of fn(n) (it generates and returns the tokens it made): `reps` pairs of a 1-token call and a
    `new`-token call (decode_rate). Returns (the median of the runs that gave a rate or None when none did, every
    run's rate rounded to 0.01 or None)."""
    rs = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = fn(new)
        rs.append(decode_rate(n, time.perf_counter() - t0, ttft))
    ok = sorted(r for r in rs if r is not None)
    med = None if not ok else (ok[len(ok) // 2] if len(ok) % 2 else (ok[len(ok) // 2 - 1] + ok[len(ok) // 2]) / 2)
    return med, [None if r is None else round(r, 2) for r in rs]


def _decode_rates(B, T, n, dt, ttft):
    """fl_decode's / hf_decode's figures (decode_rate's; an error where it has none)."""
    if decode_rate(n, dt, ttft) is None:
        raise RuntimeError(f"{n} new tokens took {dt:.4f} s and the first alone {ttft:.4f} s: no decode rate to report "
                           "(more new tokens, a quieter machine)")
    return {"batch": B, "prompt": T, "new": n, "seconds": dt, "ttft_s": ttft,
            "decode_tok_s_per_seq": (n - 1) / (dt - ttft), "decode_tok_s_total": B * (n - 1) / (dt - ttft)}


def fl_decode(m, B, T, N, seed=0):
    """Warm-up, then the time to first token and the time of N new tokens, each on a prompt of its own: the engine's
    prefix cache (on by default) would otherwise serve a repeated prompt's pages without any prefill (a 2048-token
    "time to first token" of 14 ms on a 7B, seen 2026-12-02, and a decode rate inflated by the too short ttft)."""
    V = m.config["vocab_size"]
    rng = np.random.default_rng(seed)
    warm, first, run = (rng.integers(100, V - 100, size=(B, T)) for _ in range(3))
    m.generate(warm, max_new_tokens=4, eos_token_id=[])  # warm-up (graph capture, handles)
    t0 = time.perf_counter(); m.generate(first, max_new_tokens=1, eos_token_id=[]); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); out = m.generate(run, max_new_tokens=N, eos_token_id=[]); dt = time.perf_counter() - t0
    return _decode_rates(B, T, out.shape[1] - T, dt, ttft)


def hf_decode(m, B, T, N, compiled=False):
    import torch
    V = m.config.vocab_size
    ids = torch.randint(100, V - 100, (B, T), device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    if compiled:
        # transformers compiles the forward itself for a static cache (generation_config.compile_config);
        # wrapping forward in torch.compile by hand broke its CUDA-graph outputs (seen 2026-11-21).
        kw["cache_implementation"] = "static"
        for _ in range(3):
            m.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw)
    else:
        m.generate(ids, max_new_tokens=4, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, **kw); torch.cuda.synchronize(); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); out = m.generate(ids, max_new_tokens=N, min_new_tokens=N, **kw); torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    return _decode_rates(B, T, out.shape[1] - T, dt, ttft)


def roofline_fn(m, bw):
    """roofline(ctx, B=1) -> decode steps/s bound: `bw` (D2D copy bytes/s) over the bytes a step reads (every weight
    but the embedding table once, + each row's bf16 KV cache at context ctx). Shared with benchmarks/test_gpu.py."""
    w = m.get_memory_footprint()
    emb = m.config["vocab_size"] * m.config["hidden_size"] * 2
    c = m.config
    kv_per_tok = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]) * 2

    def roofline(ctx, B=1):
        return bw / (w - emb + B * kv_per_tok * ctx)  # steps/s: weights once per step + each row's KV
    return roofline


if __name__ == "__main__":
    import suite
    suite.main("test_gpu.py", "not test_gpu_quant")
