"""What keeping each token's scores costs a decode: batch-1 greedy tok/s on one checkpoint, plain against
generate(return_dict_in_generate=True, output_scores=True) (+ output_logits), the engine's logprobs (the server's
OpenAI logprobs: the token's log-probability and the 20 most likely) and sampled decoding (drawn on the host), next to the bandwidth roofline of a plain
decode (weights read per token over the device's copy bandwidth) and transformers' generate with and without
output_scores in the same process on the same device. A row that keeps its scores takes its logits to the host each
step (no device argmax, no pipelined steps); the host then copies a vocabulary row per kept part.

    python benchmarks/scores_overhead.py --dir /tmp/fl_qwen7b [--new 128] [--hf] [--json OUT.json]
Prints one table and, with --json, writes the figures. Median of 3 runs each; TTFT (one token) is subtracted.
"""
import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_bench import median_rate, need_cuda  # noqa: E402


def rate(fn, new, reps=3):
    med, rs = median_rate(fn, new, reps)  # a None run: the noise between two calls exceeded the decode
    if sum(r is not None for r in rs) < 2:
        raise SystemExit(f"scores_overhead: {sum(r is None for r in rs)} of {reps} runs had the {new}-token call no "
                         "slower than the 1-token call: the timing noise exceeds the decode, no rate to report (a "
                         "larger --new, a quieter machine)")
    return med, rs


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fl_qwen7b")
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--hf", action="store_true", help="also transformers' generate (needs torch + transformers)")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    import fastload
    need_cuda("benchmarks/scores_overhead.py", a.device)
    m = fastload.AutoModelForCausalLM.from_pretrained(a.dir, device_map=a.device, torch_dtype=a.dtype, progress=False)
    c = m.config
    ids = np.random.default_rng(0).integers(100, c["vocab_size"] - 100, size=(1, 32))
    T = ids.shape[1]
    m.generate(ids, max_new_tokens=4, eos_token_id=[])
    core = m._engine_handle().core()

    def fl(extra):
        def go(n):
            o = m.generate(ids, max_new_tokens=n, eos_token_id=[], **extra)
            seq = o.sequences if isinstance(o, dict) else o
            return seq.shape[1] - T
        return go

    def lp(n):
        q = core.engine_submit(ids[0].astype(np.int32), max_new_tokens=n, logprobs=20)
        while not q.wait(1 << 30, timeout=60)[1]:
            pass
        q.check()
        q.records()
        return len(q.tokens())

    rows = {}
    for name, fn in (("plain", fl({})),
                     ("output_scores", fl(dict(return_dict_in_generate=True, output_scores=True))),
                     ("output_scores+logits", fl(dict(return_dict_in_generate=True, output_scores=True,
                                                      output_logits=True))),
                     ("logprobs=20 (engine)", lp),
                     # sampled rows are drawn on the host from the step's logits (csrc/sampling.c); random weights give
                     # a flat distribution: the worst case for the sorted prefix (no top-k, top-p 0.9)
                     ("sample top_k=20 top_p=0.8", fl(dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.8,
                                                           seed=1))),
                     ("sample top_p=0.9, no top_k", fl(dict(do_sample=True, temperature=0.7, top_k=0, top_p=0.9,
                                                            seed=1)))):
        rows[name] = rate(fn, a.new)
    roof = None
    if a.device.startswith("cuda"):
        from gpu_bench import d2d_bandwidth
        bw = d2d_bandwidth()
        w = m.get_memory_footprint() - c["vocab_size"] * c["hidden_size"] * 2  # the embedding is gathered, not read
        roof = bw / w
    del m
    hf = {}
    if a.hf:
        import torch
        import transformers
        h = transformers.AutoModelForCausalLM.from_pretrained(a.dir, dtype=getattr(torch, a.dtype)).to(a.device).eval()
        t = torch.from_numpy(ids).to(a.device)

        def hgo(extra):
            def go(n):
                with torch.no_grad():
                    o = h.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=n, min_new_tokens=n,
                                   do_sample=False, pad_token_id=0, **extra)
                if a.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seq = o.sequences if hasattr(o, "sequences") else o
                return seq.shape[1] - T
            return go
        hgo({})(2)
        hf["transformers plain"] = rate(hgo({}), min(a.new, 64))
        hf["transformers output_scores"] = rate(hgo(dict(return_dict_in_generate=True, output_scores=True)),
                                                min(a.new, 64))
    base = rows["plain"][0]
    print(f"{'':28s} {'tok/s':>8s} {'vs plain':>9s} {'of roofline':>12s}  runs")
    for name, (r, rs) in list(rows.items()) + list(hf.items()):
        share = f"{r / roof:11.1%}" if roof else f"{'':>11s}"
        print(f"{name:28s} {r:8.1f} {r / base:8.2f}x {share}  {rs}")
    if roof:
        print(f"roofline (weights / copy bandwidth): {roof:.1f} tok/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"dir": a.dir, "device": a.device, "dtype": a.dtype, "new": a.new, "roofline_tok_s": roof,
                       "fastload": {k: {"tok_s": v[0], "runs": v[1]} for k, v in rows.items()},
                       "transformers": {k: {"tok_s": v[0], "runs": v[1]} for k, v in hf.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
