"""Beam search speed: generate(num_beams=K) for K = 1 (greedy), 2, 4, 8 on one checkpoint, as answer tokens per second
(the new tokens of the best hypothesis, eos off: every search runs max_new_tokens steps) and as the cost of K beams
against greedy, next to transformers' generate(num_beams=K) in the same process on the same device (--hf).

fastload runs a search's K beams as K rows of its engine's decode steps over the paged KV cache: the prompt's pages are
shared, a forking beam copies only its partly filled last page (csrc/engine.c "beam search"). A decode step is bound by
reading the weights, so K rows cost little more than one while K is small on a GPU; the CPU is compute-bound.

    python benchmarks/beam_search.py                       # the demo model on the CPU
    python benchmarks/beam_search.py --dir /tmp/fl_qwen7b --device cuda --dtype bfloat16 --hf [--json OUT.json]
Decode rates from an n-token call less a 1-token call (the prompt read), median of 3.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import median_rate as rate, need_cuda  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="", help="checkpoint (default: the demo model)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--beams", default="1,2,4,8")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--hf", action="store_true", help="also transformers' generate (needs torch + transformers)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import fastload
    need_cuda("benchmarks/beam_search.py", a.device, torch_too=False)
    path = a.dir
    if not path:
        from fastload.demo import demo_model_path
        path = demo_model_path()
    m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map=a.device, torch_dtype=a.dtype, progress=False)
    V = int(m.config["vocab_size"])
    ids = np.random.default_rng(0).integers(100, V - 100, size=(1, a.prompt))
    T = ids.shape[1]
    beams = [int(k) for k in a.beams.split(",")]

    def fl(K):
        def go(n):
            return np.asarray(m.generate(ids, num_beams=K, max_new_tokens=n, eos_token_id=[])).shape[1] - T
        return go
    fl(max(beams))(4)  # warm: the engine's pool and decode graphs of these batch sizes
    rows = {K: rate(fl(K), a.new) for K in beams}
    hf = {}
    if a.hf:
        import torch
        import transformers
        dt = torch.float32 if a.dtype == "auto" and a.device == "cpu" else getattr(torch, a.dtype)
        h = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dt).to(a.device).eval()
        t = torch.from_numpy(ids).to(a.device)

        def hgo(K):
            def go(n):
                with torch.no_grad():
                    o = h.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                                   num_beams=K, do_sample=False, pad_token_id=0)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                return o.shape[1] - T
            return go
        hgo(2)(2)
        hf = {K: rate(hgo(K), min(a.new, 32)) for K in beams}
    base = rows[beams[0]][0]
    print(f"{'num_beams':>9s} {'fastload tok/s':>15s} {'vs K=' + str(beams[0]):>9s} {'transformers':>13s} "
          f"{'fastload / tf':>14s}  runs")
    for K in beams:
        r, rs = rows[K]
        h = hf.get(K, (None, None))[0]
        ratio = f"{r / h:13.1f}x" if (r and h) else f"{'':>14s}"
        print(f"{K:9d} {r or float('nan'):15.1f} {(r or 0) / base:8.2f}x {h or float('nan'):13.1f} {ratio}  {rs}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dir": path, "device": a.device, "dtype": a.dtype, "new": a.new, "prompt": a.prompt,
                       "fastload": {K: {"tok_s": v[0], "runs": v[1]} for K, v in rows.items()},
                       "transformers": {K: {"tok_s": v[0], "runs": v[1]} for K, v in hf.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
