"""Where a decode step's time goes, from the GPU's own timeline (torch.profiler's CUPTI trace of every kernel and copy
in the process, fastload's included; graph-replayed kernels are traced one by one, overlaps from programmatic
dependent launch kept as they ran). Unlike ncu, which runs each kernel alone, this shows the idle time between
kernels and between steps (the host's turn: token to host, bookkeeping, inputs up, graph launch).

    python3 dev/cuda/step_timeline.py [--shape qwen2.5-7b] [--layers 4] [--schemes bf16,int4] [--new 48] [--batch B] [--out F]

Per scheme: mean wall time of a decode step (argmax kernel to argmax kernel), GPU busy time in it (union of
kernel / copy intervals), the idle time inside the step and the idle time between the step's last activity and the
next step's first (the host gap), the kernels by total time per step, and the first --seq kernels of a step in order.
With FASTLOAD_PDL=0 (kernels in plain stream order) each kernel's time is its own; with programmatic dependent launch
(the default) a kernel's interval starts while it waits for the one before, so only the idle gaps mean something."""
import argparse
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def union(iv):
    tot, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(iv):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                tot += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        tot += cur_e - cur_s
    return tot


def analyse(events):
    """events: (name, start_us, end_us) of GPU activity, sorted by start. A step ends with its argmax kernel and the
    copy of the tokens to the host after it; the next step begins with its first activity after that."""
    marks = [i for i, ev in enumerate(events) if "argmax" in ev[0].lower()]

    def after(i):  # index past argmax i and the device-to-host copies that follow it
        j = i + 1
        while j < len(events) and "dtoh" in events[j][0].lower().replace(" ", ""):
            j += 1
        return j

    steps = []
    for a, b in zip(marks[:-1], marks[1:]):
        j, k = after(a), after(b)
        evs = events[j:k]
        if not evs:
            continue
        steps.append(dict(start=evs[0][1], busy=union([(s, e) for _, s, e in evs]),
                          gap_before=evs[0][1] - max(e for _, _, e in events[a:j]),
                          names=[n for n, _, _ in evs], durs=[e - s for _, s, e in evs],
                          starts=[s for _, s, _ in evs], ends=[e for _, _, e in evs]))
    return steps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen2.5-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--schemes", default="bf16,int4")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=24, help="kernels of one step to list in order")
    a = ap.parse_args()
    import torch
    from torch.profiler import ProfilerActivity, profile
    import gpu_bench
    import fastload
    d = a.ckpt or f"/tmp/tl_{a.shape}_{a.layers}"
    gpu_bench.make_checkpoint(d, a.shape, shards=1, num_hidden_layers=a.layers)
    res = {"shape": a.shape, "layers": a.layers, "batch": a.batch, "device": torch.cuda.get_device_name(0), "schemes": {}}
    for scheme in a.schemes.split(","):
        kw = {} if scheme in ("bf16", "fp16") else {"quantization_config": scheme}
        m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cuda", torch_dtype=a.dtype, progress=False, **kw)
        ids = np.random.default_rng(0).integers(100, 60000, size=(a.batch, 32))
        m.generate(ids, max_new_tokens=16, do_sample=False, eos_token_id=[])  # graphs captured
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            m.generate(ids, max_new_tokens=a.new, do_sample=False, eos_token_id=[])
        evs = []
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                evs.append((e.name, float(e.time_range.start), float(e.time_range.end)))
        evs.sort(key=lambda t: t[1])
        steps = analyse(evs)[2:]  # past the prefill and the first decode step
        if not steps:
            print(scheme, "no steps found in", len(evs), "events")
            continue
        wall = [s2["start"] - s1["start"] for s1, s2 in zip(steps[:-1], steps[1:])]
        busy = [s["busy"] for s in steps[:-1]]
        gap = [s["gap_before"] for s in steps[1:]]
        per = {}
        for s in steps:
            for n, du in zip(s["names"], s["durs"]):
                k = per.setdefault(n[:90], [0, 0.0])
                k[0] += 1
                k[1] += du
        ns = len(steps)
        top = sorted(per.items(), key=lambda kv: -kv[1][1])
        r = dict(steps=ns, wall_us=float(np.median(wall)), busy_us=float(np.median(busy)),
                 host_gap_us=float(np.median(gap)), host_gap_p90_us=float(np.percentile(gap, 90)),
                 kernels_per_step=float(np.mean([len(s["names"]) for s in steps])),
                 kernels=[dict(name=n, per_step=c / ns, us_per_step=t / ns) for n, (c, t) in top[:25]])
        mid = steps[ns // 2]  # one step's kernels in order, with their gaps: one layer's sequence is a period of it
        seq = [dict(name=n[:90], us=du, gap_us=(st - mid["ends"][i - 1]) if i else 0.0)
               for i, (n, du, st) in enumerate(zip(mid["names"], mid["durs"], mid["starts"]))]
        r["sequence"] = seq[:a.seq]
        res["schemes"][scheme] = r
        print(f"== {scheme}: {ns} steps, step {r['wall_us']:.1f} us (median), GPU busy {r['busy_us']:.1f} us, "
              f"idle between steps {r['host_gap_us']:.1f} us (p90 {r['host_gap_p90_us']:.1f}), "
              f"{r['kernels_per_step']:.0f} kernels/copies a step", flush=True)
        for k in r["kernels"][:16]:
            print(f"   {k['us_per_step']:8.1f} us  x{k['per_step']:5.1f}  {k['name']}")
        print(f"   the first {a.seq} kernels / copies of a step, in order:")
        for k in r["sequence"]:
            print(f"   {k['us']:8.1f} us  (idle before {k['gap_us']:5.1f})  {k['name'][:64]}")
        del m
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
