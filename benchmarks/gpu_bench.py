"""GPU benchmark (issue 3): load, decode, prefill, batch-8 and 32k-context figures next to the
ceilings and transformers, all measured in ONE run on the same device.

    python benchmarks/gpu_bench.py --dir /tmp/fl_qwen7b [--sections load,decode,prefill,batch,long] [--no-peer]

Makes a Qwen2.5-7B-shaped bf16 checkpoint with random weights (4 shards) if --dir has none (torch on
the GPU draws the numbers: never zeros). Ceilings: device-to-device copy bandwidth (bytes read +
written) for the decode roofline; the raw parallel read(+copy) rates of benchmarks/load_probe for
loading. Writes JSON to --results (default benchmarks/results/) and prints a table."""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)


def log(*a):
    print(*a, flush=True)


def make_checkpoint(d, shape="qwen2.5-7b", shards=4):
    import torch
    from safetensors.torch import save_file
    from synth import SHAPES, tensors_for
    if os.path.isfile(os.path.join(d, "model.safetensors.index.json")):
        return
    os.makedirs(d, exist_ok=True)
    cfg = dict(SHAPES[shape], torch_dtype="bfloat16")
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
    json.dump({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False},
              open(os.path.join(d, "generation_config.json"), "w"))


def drop_caches(d):
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return "drop_caches"
    except OSError:
        for f in os.listdir(d):
            fd = os.open(os.path.join(d, f), os.O_RDONLY)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return "fadvise_dontneed"


def ckpt_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def d2d_bandwidth():
    import torch
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


def load_probe(d, cold=False):
    """Raw parallel read rates (benchmarks/load_probe.cu: the loader's machinery without the model)."""
    exe = os.path.join("/tmp", "fl_load_probe")
    if not os.path.exists(exe):
        objs = []
        for c in ("fl_common.c", "safetensors.c"):
            o = os.path.join("/tmp", c + ".o")
            subprocess.run(["gcc", "-O2", "-std=gnu11", "-I" + os.path.join(ROOT, "csrc"), "-c", os.path.join(ROOT, "csrc", c), "-o", o], check=True)
            objs.append(o)
        r = subprocess.run(["nvcc", "-O3", "-std=c++17", "-arch=sm_90", "--use_fast_math", "-I" + os.path.join(ROOT, "csrc"),
                            os.path.join(HERE, "load_probe.cu"), os.path.join(ROOT, "csrc", "cuda", "loader.cu"), *objs,
                            "-o", exe], capture_output=True, text=True)
        if r.returncode:
            return {"error": r.stderr[-800:]}
    args = [exe, "rates", d] + (["--cold", "--no-warm"] if cold else [])
    r = subprocess.run(args, capture_output=True, text=True)
    out = {}
    for line in r.stdout.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            k = k.split("[")[0].strip()
            try:
                out[k] = float(v)
            except ValueError:
                out[k] = v.strip()
    if r.returncode:
        out["error"] = r.stderr[-500:]
    return out


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


def fl_decode(m, B, T, N, seed=0):
    V = m.config["vocab_size"]
    ids = np.random.default_rng(seed).integers(100, V - 100, size=(B, T))
    m.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up (graph capture, handles)
    t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, eos_token_id=[]); ttft = time.perf_counter() - t0
    t0 = time.perf_counter(); out = m.generate(ids, max_new_tokens=N, eos_token_id=[]); dt = time.perf_counter() - t0
    n = out.shape[1] - T
    return {"batch": B, "prompt": T, "new": n, "seconds": dt, "ttft_s": ttft,
            "decode_tok_s_per_seq": (n - 1) / (dt - ttft), "decode_tok_s_total": B * (n - 1) / (dt - ttft)}


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
    n = out.shape[1] - T
    return {"batch": B, "prompt": T, "new": n, "seconds": dt, "ttft_s": ttft,
            "decode_tok_s_per_seq": (n - 1) / (dt - ttft), "decode_tok_s_total": B * (n - 1) / (dt - ttft)}


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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fl_qwen7b")
    ap.add_argument("--sections", default="load,decode,prefill,batch,long")
    ap.add_argument("--no-peer", action="store_true")
    ap.add_argument("--no-compiled-peer", action="store_true")
    ap.add_argument("--results", default=os.path.join(HERE, "results"))
    a = ap.parse_args()
    secs = set(a.sections.split(","))
    import torch
    import fastload
    dev = torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    res = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": dev,
           # FASTLOAD_COMMIT first: the device tool's copy of the tree may carry a stale .git
           "commit": os.environ.get("FASTLOAD_COMMIT") or commit or "unknown",
           "fastload": fastload.info(), "torch": torch.__version__}
    try:
        import transformers
        res["transformers"] = transformers.__version__
    except ImportError:
        a.no_peer = True
    t0 = time.perf_counter()
    make_checkpoint(a.dir)
    res["checkpoint"] = {"dir": a.dir, "bytes": ckpt_bytes(a.dir), "made_s": time.perf_counter() - t0}
    bw = d2d_bandwidth()
    res["d2d_copy_GBps"] = bw / 1e9
    log(f"{dev}: D2D copy {bw / 1e9:.0f} GB/s; checkpoint {res['checkpoint']['bytes'] / 1e9:.2f} GB")
    m = None
    if "load" in secs:
        L = res["load"] = {}
        m, _ = time_fastload_load(a.dir)  # page cache warm after this (and the CUDA context made)
        del m; gc.collect()
        L["probe"] = load_probe(a.dir)
        m, L["fastload_warm_s"] = time_fastload_load(a.dir)
        L["fastload_warm_stats"] = m.load_stats
        L["fastload_memory"] = m.memory_stats()
        del m; gc.collect()
        if not a.no_peer:
            hm, L["hf_first_load_s"] = time_hf_load(a.dir); free_hf(hm)  # includes one-time set-up
            hm, L["hf_warm_s"] = time_hf_load(a.dir); free_hf(hm)
            hm, L["hf_warm_fp16_from_bf16_s"] = time_hf_load(a.dir, "float16"); free_hf(hm)
        L["probe_cold"] = load_probe(a.dir, cold=True)
        L["cache_drop"] = drop_caches(a.dir)
        m, L["fastload_cold_s"] = time_fastload_load(a.dir)
        L["fastload_cold_stats"] = m.load_stats
        del m; gc.collect()
        if not a.no_peer:
            drop_caches(a.dir)
            hm, L["hf_cold_s"] = time_hf_load(a.dir); free_hf(hm)
        log(json.dumps(L, indent=1, default=str))
        res["checkpoint"]["bytes"] = ckpt_bytes(a.dir)
    name = f"gpu-{dev.replace(' ', '_')}-{res['date'][:10]}-{res['commit']}.json"

    def save():
        for d in (a.results, os.environ.get("OUT")):
            if d:
                os.makedirs(d, exist_ok=True)
                with open(os.path.join(d, name), "w") as f:
                    json.dump(res, f, indent=1, default=str)
    save()
    m, _ = time_fastload_load(a.dir)
    roofline = roofline_fn(m, bw)
    if "decode" in secs:
        r = res["decode_b1"] = fl_decode(m, 1, 32, 256)
        r["roofline_tok_s"] = roofline(32 + 128)
        r["share_of_roofline"] = r["decode_tok_s_per_seq"] / r["roofline_tok_s"]
        log("decode b1", json.dumps(r))
        save()
    if "prefill" in secs:
        r = res["prefill_2048"] = fl_decode(m, 1, 2048, 2)
        log("prefill 2048", json.dumps(r))
        save()
    if "batch" in secs:
        r = res["decode_b8"] = fl_decode(m, 8, 32, 256)
        r["vs_b1"] = r["decode_tok_s_total"] / res.get("decode_b1", {}).get("decode_tok_s_per_seq", float("nan"))
        log("decode b8", json.dumps(r))
        save()
    if "long" in secs:
        r = res["long_32k"] = fl_decode(m, 1, 32768 - 64, 64)
        r["roofline_tok_s"] = roofline(32768 - 32)
        r["share_of_roofline"] = r["decode_tok_s_per_seq"] / r["roofline_tok_s"]
        log("long 32k", json.dumps(r))
        save()
    res["fastload_memory_after"] = m.memory_stats()
    del m; gc.collect()
    if not a.no_peer and secs & {"decode", "prefill", "batch", "compiled"}:
        hm, _ = time_hf_load(a.dir)
        P = res["peer"] = {}
        if "decode" in secs:
            P["eager_b1"] = hf_decode(hm, 1, 32, 256)
        if "prefill" in secs:
            P["prefill_2048"] = hf_decode(hm, 1, 2048, 2)
        if "batch" in secs:
            P["eager_b8"] = hf_decode(hm, 8, 32, 256)
        if ("decode" in secs or "compiled" in secs) and not a.no_compiled_peer:
            try:
                P["static_compiled_b1"] = hf_decode(hm, 1, 32, 256, compiled=True)
            except Exception as e:  # noqa: BLE001 - recorded, not hidden
                P["static_compiled_b1"] = {"error": repr(e)[:500]}
        log("peer", json.dumps(P))
        save()
        free_hf(hm)
    save()
    table(res)


def table(res):
    log(f"\n== {res['device']} | commit {res['commit']} | {res['date']} | D2D copy {res['d2d_copy_GBps']:.0f} GB/s ==")
    P = res.get("peer", {})
    if "load" in res:
        L = res["load"]
        gb = res["checkpoint"]["bytes"] / 1e9
        pr = L.get("probe", {})
        pc = L.get("probe_cold", {})
        log(f"load warm: fastload {L['fastload_warm_s']:.2f} s ({gb / L['fastload_warm_s']:.1f} GB/s) | raw read+copy {pr.get('warm_read_copy_GBps', '?')} GB/s | transformers {L.get('hf_warm_s', float('nan')):.2f} s")
        log(f"load cold: fastload {L['fastload_cold_s']:.2f} s ({gb / L['fastload_cold_s']:.1f} GB/s) | raw O_DIRECT read {pc.get('cold_direct_read_GBps', '?')} GB/s, +copy {pc.get('cold_direct_read_copy_GBps', '?')} GB/s | transformers {L.get('hf_cold_s', float('nan')):.2f} s")
    if "decode_b1" in res:
        r = res["decode_b1"]
        pe, pc = P.get("eager_b1", {}), P.get("static_compiled_b1", {})
        log(f"decode b1: {r['decode_tok_s_per_seq']:.1f} tok/s = {100 * r['share_of_roofline']:.0f}% of roofline {r['roofline_tok_s']:.0f} | "
            f"transformers eager {pe.get('decode_tok_s_per_seq', float('nan')):.1f}, static+compiled {pc.get('decode_tok_s_per_seq', float('nan')):.1f}")
    if "prefill_2048" in res:
        log(f"prefill 2048: TTFT {1e3 * res['prefill_2048']['ttft_s']:.0f} ms | transformers {1e3 * P.get('prefill_2048', {}).get('ttft_s', float('nan')):.0f} ms")
    if "decode_b8" in res:
        r = res["decode_b8"]
        log(f"decode b8: {r['decode_tok_s_total']:.0f} tok/s total = {r['vs_b1']:.2f}x batch 1 | transformers {P.get('eager_b8', {}).get('decode_tok_s_total', float('nan')):.0f}")
    if "long_32k" in res:
        r = res["long_32k"]
        log(f"32k context: prefill {r['ttft_s']:.2f} s, decode {r['decode_tok_s_per_seq']:.1f} tok/s = {100 * r['share_of_roofline']:.0f}% of roofline incl. KV ({r['roofline_tok_s']:.0f})")


if __name__ == "__main__":
    main()
