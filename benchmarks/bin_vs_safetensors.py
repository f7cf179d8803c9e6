#!/usr/bin/env python3
"""Warm load time of the same weights as PyTorch .bin shards and as safetensors shards.

    python benchmarks/bin_vs_safetensors.py --shape chatglm2-6b --out /tmp/x          # fp16, 7 shards, cuda
    python benchmarks/bin_vs_safetensors.py --shape qwen2.5-7b --dtype bfloat16 --out /tmp/x
    python benchmarks/bin_vs_safetensors.py --shape qwen2-tiny --device cpu --out /tmp/x   # a quick CPU check

Writes (once; kept when present) OUT/safetensors/ and OUT/bin/: the same random tensors (torch, on the GPU
when there is one) cut into the same shards, saved with safetensors' save_file and with torch.save
(pytorch_model-0000i-of-0000n.bin + pytorch_model.bin.index.json, as transformers wrote .bin shards).
Needs torch and safetensors to write them; loading is fastload's alone.

Then, validate first: one load of each, logits of a short prompt must be equal (same bytes, same dtype
path). Warm-up: that load also fills the page cache (both checkpoints must fit in RAM: ~2 x 12.5 GB for the
6B/7B shapes). Then --repeats rounds, each loading safetensors then .bin (alternating, so that drift hits
both), timing from_pretrained end to end (wall) and the core's load (load_stats seconds), each load
freed before the next. Reports medians, GB/s and the ratio bin / safetensors against the target
(--target, 1.15 = within 15%), and writes OUT/result.json. Exit status 1 when the target is missed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import synth  # noqa: E402


def write_both(out, shape, dtype, shards, seed=0):
    st_dir, bin_dir = os.path.join(out, "safetensors"), os.path.join(out, "bin")
    if os.path.isfile(os.path.join(bin_dir, "pytorch_model.bin.index.json")) and \
            os.path.isfile(os.path.join(st_dir, "model.safetensors.index.json")):
        return st_dir, bin_dir
    import torch
    from safetensors.torch import save_file
    os.makedirs(st_dir, exist_ok=True)
    os.makedirs(bin_dir, exist_ok=True)
    cfg = dict(synth.SHAPES[shape], torch_dtype=dtype)
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    specs = list(synth.tensors_for(cfg))
    esz = torch.tensor([], dtype=tdt).element_size()
    total = sum(int(np.prod(s)) * esz for _, s in specs)
    groups, cur, size = [], [], 0
    for name, shp in specs:
        cur.append((name, shp))
        size += int(np.prod(shp)) * esz
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    groups.append(cur)
    wm_st, wm_bin = {}, {}
    for i, items in enumerate(groups):
        st_name = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        bin_name = f"pytorch_model-{i + 1:05d}-of-{len(groups):05d}.bin"
        tensors = {}
        for name, shp in items:
            if name.endswith("norm.weight"):
                t = 1 + 0.1 * torch.randn(shp, generator=g, device=dev)
            else:
                t = torch.randn(shp, generator=g, device=dev) * (0.5 / np.sqrt(shp[-1]) if len(shp) == 2 else 0.02)
            tensors[name] = t.to(tdt).cpu()
            wm_st[name], wm_bin[name] = st_name, bin_name
        save_file(tensors, os.path.join(st_dir, st_name), metadata={"format": "pt"})
        torch.save(tensors, os.path.join(bin_dir, bin_name))
        print(f"  shard {i + 1}/{len(groups)} written", flush=True)
    for d, idx, wm in ((st_dir, "model.safetensors.index.json", wm_st), (bin_dir, "pytorch_model.bin.index.json", wm_bin)):
        with open(os.path.join(d, idx), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": wm}, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    return st_dir, bin_dir


def load(d, device, dtype):
    import fastload
    t0 = time.perf_counter()
    m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map=device, torch_dtype=dtype, progress=False)
    wall = time.perf_counter() - t0
    return m, wall


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="chatglm2-6b", choices=sorted(synth.SHAPES))
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shards", type=int, default=7, help="shards per format (ChatGLM2-6B ships 7 .bin shards)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", type=float, default=1.15, help="allowed bin / safetensors warm load time ratio")
    a = ap.parse_args()

    t0 = time.perf_counter()
    st_dir, bin_dir = write_both(a.out, a.shape, a.dtype, a.shards)
    print(f"checkpoints in {a.out} ({time.perf_counter() - t0:.0f} s)", flush=True)

    # validate (and warm the page cache and the device): same logits from both
    ids = np.array([[1, 5, 9, 3, 7, 11, 2, 4]])
    m, _ = load(st_dir, a.device, a.dtype)
    ref = m(ids).logits
    gb = m.load_stats["bytes"] / 1e9
    del m
    gc.collect()
    m, _ = load(bin_dir, a.device, a.dtype)
    got = m(ids).logits
    assert m._source["kind"] == "torch_bin"
    if not np.array_equal(ref, got):
        print("FAIL: logits differ between the .bin and the safetensors checkpoint", flush=True)
        return 2
    del m
    gc.collect()
    print(f"validated: equal logits; {gb:.2f} GB of weights", flush=True)

    res = {"safetensors": {"wall": [], "core": []}, "bin": {"wall": [], "core": []}}
    for r in range(a.repeats):
        for kind, d in (("safetensors", st_dir), ("bin", bin_dir)):
            m, wall = load(d, a.device, a.dtype)
            res[kind]["wall"].append(wall)
            res[kind]["core"].append(m.load_stats["seconds"])
            cache = m.load_stats["cache"]
            del m
            gc.collect()
            print(f"  round {r + 1} {kind:11s} wall {wall:6.3f} s  core {res[kind]['core'][-1]:6.3f} s  ({cache})",
                  flush=True)
    med = {k: {m_: statistics.median(v[m_]) for m_ in ("wall", "core")} for k, v in res.items()}
    ratio = med["bin"]["wall"] / med["safetensors"]["wall"]
    for k in ("safetensors", "bin"):
        print(f"{k:11s} median wall {med[k]['wall']:.3f} s ({gb / med[k]['wall']:.2f} GB/s), "
              f"core load {med[k]['core']:.3f} s ({gb / med[k]['core']:.2f} GB/s)")
    ok = ratio <= a.target
    print(f"bin / safetensors (wall, warm): {ratio:.3f}  target <= {a.target}: {'PASS' if ok else 'FAIL'}")
    with open(os.path.join(a.out, "result.json"), "w") as f:
        json.dump({"shape": a.shape, "dtype": a.dtype, "shards": a.shards, "device": a.device, "weight_gb": gb,
                   "runs": res, "median": med, "ratio_wall": ratio, "target": a.target, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
