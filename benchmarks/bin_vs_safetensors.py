#!/usr/bin/env python3
"""Warm load time of the same weights as PyTorch .bin shards and as safetensors shards.

    python benchmarks/bin_vs_safetensors.py --shape chatglm2-6b --out /tmp/x          # fp16, THUDM's 7 shards, cuda
    python benchmarks/bin_vs_safetensors.py --shape qwen2.5-7b --dtype bfloat16 --out /tmp/x
    python benchmarks/bin_vs_safetensors.py --shape chatglm2-tiny --device cpu --max-shard-bytes 1e5 --out /tmp/x
                                                                                     # a quick CPU check, 4 shards

Writes (once; kept when present with the same config) OUT/safetensors/ and OUT/bin/: the same random tensors
(torch, on the GPU when there is one; each shard drawn once and written both ways) cut into the same shards,
saved with safetensors' save_file and with torch.save (pytorch_model-0000i-of-0000n.bin +
pytorch_model.bin.index.json, as transformers wrote .bin shards). chatglm2-6b is ChatGLM2-6B as THUDM ships it
(its config keys, tensor names and order, benchmarks/synth.py), cut as THUDM's files are (transformers' 2 GB
rule: 7 shards); other shapes into --shards files of about equal size. Needs torch and safetensors to write them;
loading is fastload's alone.

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


# THUDM's ChatGLM2-6B files are transformers' save_pretrained cut at max_shard_size "2GB" (a new file when the next
# tensor would pass 2e9 bytes): pytorch_model-00001..7-of-00007.bin
THUDM_SHARD_BYTES = {"chatglm2-6b": 2_000_000_000}


def shard_groups(specs, esz, shards=7, max_shard_bytes=0):
    """The (name, shape) list cut into files in order: with max_shard_bytes, transformers' rule (a new file when the
    next tensor would pass it; a larger tensor gets a file of its own); else `shards` files of about equal size."""
    groups, cur, size = [], [], 0
    if max_shard_bytes:
        for name, shp in specs:
            nb = int(np.prod(shp)) * esz
            if cur and size + nb > max_shard_bytes:
                groups.append(cur)
                cur, size = [], 0
            cur.append((name, shp))
            size += nb
        return groups + [cur]
    total = sum(int(np.prod(s)) * esz for _, s in specs)
    for name, shp in specs:
        cur.append((name, shp))
        size += int(np.prod(shp)) * esz
        if size >= total / shards and len(groups) < shards - 1:
            groups.append(cur)
            cur, size = [], 0
    return groups + [cur] if cur else groups  # (tensors larger than total / shards: fewer files, none empty)


def random_torch(cfg, name, shp, tdt, g, dev):
    """One tensor as synth.py draws them (norms 1 + 0.1 N, matrices N(0, 0.5 / sqrt(in)), vectors N(0, 0.02), fixed
    buffers their values), drawn by torch on `dev`, in `tdt`, never an exact zero, on the CPU."""
    import torch
    fixed = synth.fixed_values(cfg, name)
    if fixed is not None:
        return torch.from_numpy(fixed).to(tdt)
    if name.endswith("norm.weight"):
        t = 1 + 0.1 * torch.randn(shp, generator=g, device=dev)
    else:
        t = torch.randn(shp, generator=g, device=dev) * (0.5 / np.sqrt(shp[-1]) if len(shp) == 2 else 0.02)
    t = t.to(tdt)
    return t.masked_fill_(t == 0, 1e-3).cpu()


def write_torch(dirs, cfg, dtype, groups, seed=0):
    """The same random tensors, drawn once per shard (torch, on the GPU when there is one), written into each of
    `dirs` ({"safetensors": dir, "bin": dir}, either or both): safetensors' save_file (model-0000i-of-0000n
    .safetensors + model.safetensors.index.json) and torch.save (pytorch_model-0000i-of-0000n.bin +
    pytorch_model.bin.index.json, as transformers wrote .bin shards); config.json in each. Returns the bytes."""
    import torch
    from safetensors.torch import save_file
    tdt = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator(device=dev).manual_seed(seed)
    esz = torch.tensor([], dtype=tdt).element_size()
    total = sum(int(np.prod(s)) * esz for items in groups for _, s in items)
    n = len(groups)
    names = {"safetensors": ("model-{:05d}-of-{:05d}.safetensors", "model.safetensors.index.json"),
             "bin": ("pytorch_model-{:05d}-of-{:05d}.bin", "pytorch_model.bin.index.json")}
    maps = {k: {} for k in dirs}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    for i, items in enumerate(groups):
        tensors = {name: random_torch(cfg, name, shp, tdt, g, dev) for name, shp in items}
        for kind, d in dirs.items():
            fname = names[kind][0].format(i + 1, n)
            if kind == "safetensors":
                save_file(tensors, os.path.join(d, fname), metadata={"format": "pt"})
            else:
                torch.save(tensors, os.path.join(d, fname))
            maps[kind].update({name: fname for name in tensors})
        del tensors
        print(f"  shard {i + 1}/{n} written", flush=True)
    for kind, d in dirs.items():
        with open(os.path.join(d, names[kind][1]), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": maps[kind]}, f)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(cfg, f, indent=1)
    return total


def write_both(out, shape, dtype, shards=7, max_shard_bytes=0, seed=0):
    """OUT/safetensors and OUT/bin: the same tensors both ways (kept when both are there with this config)."""
    st_dir, bin_dir = os.path.join(out, "safetensors"), os.path.join(out, "bin")
    cfg = synth.config(shape, dtype)
    have = [os.path.join(st_dir, "model.safetensors.index.json"), os.path.join(bin_dir, "pytorch_model.bin.index.json")]
    if all(os.path.isfile(p) for p in have):
        with open(os.path.join(st_dir, "config.json")) as f:
            if json.load(f) == cfg:
                return st_dir, bin_dir
        print(f"{out} holds another shape or dtype: writing it again", flush=True)
        import shutil
        shutil.rmtree(st_dir)
        shutil.rmtree(bin_dir)
    specs = list(synth.tensors_for(cfg))
    esz = 4 if dtype == "float32" else 2
    write_torch({"safetensors": st_dir, "bin": bin_dir}, cfg, dtype,
                shard_groups(specs, esz, shards, max_shard_bytes), seed)
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
    ap.add_argument("--shards", type=int, default=7, help="shards per format, cut to about equal sizes")
    ap.add_argument("--max-shard-bytes", type=float, default=None,
                    help="cut as transformers' save_pretrained does instead (a new file when the next tensor would "
                         "pass this); default for chatglm2-6b: 2e9, THUDM's cut (7 files)")
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--target", type=float, default=1.15, help="allowed bin / safetensors warm load time ratio")
    a = ap.parse_args()
    from gpu_bench import need_cuda
    need_cuda("benchmarks/bin_vs_safetensors.py", a.device)

    t0 = time.perf_counter()
    cut = a.max_shard_bytes if a.max_shard_bytes is not None else THUDM_SHARD_BYTES.get(a.shape, 0)
    st_dir, bin_dir = write_both(a.out, a.shape, a.dtype, a.shards, int(cut))
    with open(os.path.join(bin_dir, "pytorch_model.bin.index.json")) as f:
        n_files = len(set(json.load(f)["weight_map"].values()))
    print(f"checkpoints in {a.out}: {n_files} shards each ({time.perf_counter() - t0:.0f} s)", flush=True)

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
        json.dump({"shape": a.shape, "dtype": a.dtype, "shards": n_files, "device": a.device, "weight_gb": gb,
                   "runs": res, "median": med, "ratio_wall": ratio, "target": a.target, "pass": ok}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
