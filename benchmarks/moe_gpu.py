"""Mixtral on the GPU (issue 12 part 1): load rate, batch-1 decode against the MoE roofline, transformers eager.

    python benchmarks/moe_gpu.py --ckpt /data/mixtral12 [--layers 12] [--new 128] [--no-hf] [--quant int4,nf4]
                                 [--batches 4,8,16]

Makes the checkpoint first when --ckpt has no config.json (benchmarks/synth.py's mixtral-8x7b shape with --layers
layers, bf16, the hub's per-expert names; 12 layers = 35 GB). Then, validated first, warmed up, synchronised:
  load   fastload's warm load (a first load fills the page cache, the second is timed) in GB/s, next to the raw
         parallel read + host-to-device copy rate of the same files measured in the same run (16 threads reading
         64 MiB pieces into pinned memory, each copying on its own stream; torch) as the ceiling, with the copy
         rate alone and the read rate alone next to it;
  decode batch 1, prompt 32, --new tokens through generate() (CUDA-graph decode steps), tokens/s, next to the
         roofline: device-to-device copy bandwidth over the bytes one token reads: attention (q|k|v, o, norms),
         the router, the two chosen experts of every layer, the final norm and lm_head, plus the KV cache;
  batches (--batches) decode at larger batches for bf16 and each --quant scheme, tokens/s in total;
  hf     transformers eager (bf16, device_map cuda) on the same checkpoint, the same prompt and length.
Prints one JSON line per measurement and a summary with the targets (load >= 85% of the ceiling, decode >= 75% of
the roofline, >= 5x transformers eager).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import gpu_bench  # noqa: E402
import synth  # noqa: E402


def raw_rate(d, threads=16, chunk=1 << 26):
    """The ceiling for a warm load: bytes/s of reading the checkpoint's files (page cache warm) into pinned memory
    and copying them to the GPU, in parallel as a loader would: `threads` workers, each with two pinned buffers and
    its own CUDA stream, take 64 MiB pieces of the files in turn (read with os.preadv, the GIL released, while the
    previous piece's host-to-device copy runs). Also returns the pinned host-to-device copy rate alone (the same
    buffers, no reads) and the parallel read rate alone (no copies), the two limits it is made of."""
    import threading
    import torch
    files = sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))
    pieces = [(f, o, min(chunk, os.path.getsize(f) - o)) for f in files for o in range(0, os.path.getsize(f), chunk)]
    total = sum(p[2] for p in pieces)
    pins = [[torch.empty(chunk, dtype=torch.uint8).pin_memory() for _ in range(2)] for _ in range(threads)]
    devs = [torch.empty(chunk, dtype=torch.uint8, device="cuda") for _ in range(threads)]
    streams = [torch.cuda.Stream() for _ in range(threads)]

    def run(read, copy):
        nxt = iter(range(len(pieces)))
        lock = threading.Lock()

        def worker(w):
            fds = {}
            ev = [None, None]
            k = 0
            while True:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    break
                f, off, n = pieces[i]
                b = k & 1
                if ev[b] is not None:
                    ev[b].synchronize()  # this buffer's previous copy is done
                if read:
                    fd = fds.get(f) or fds.setdefault(f, os.open(f, os.O_RDONLY))
                    got = os.preadv(fd, [memoryview(pins[w][b].numpy())[:n]], off)
                    assert got == n, (f, off, got, n)
                if copy:
                    with torch.cuda.stream(streams[w]):
                        devs[w][:n].copy_(pins[w][b][:n], non_blocking=True)
                        ev[b] = torch.cuda.Event()
                        ev[b].record(streams[w])
                k += 1
            for e in ev:
                if e is not None:
                    e.synchronize()
            for fd in fds.values():
                os.close(fd)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ts = [threading.Thread(target=worker, args=(w,)) for w in range(threads)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        torch.cuda.synchronize()
        return total / (time.perf_counter() - t0)
    run(True, False)  # the files in the page cache
    return {"read_copy": run(True, True), "copy_only": run(False, True), "read_only": run(True, False)}


def bytes_per_token(c, ctx):
    d, L, V = c["hidden_size"], c["num_hidden_layers"], c["vocab_size"]
    hd = c.get("head_dim") or d // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    f, E, k = c["intermediate_size"], c["num_local_experts"], c["num_experts_per_tok"]
    per_layer = (d * (q + 2 * kv) + q * d + 2 * d + E * d + k * 3 * d * f) * 2
    return L * per_layer + (d + V * d) * 2 + L * 2 * kv * 2 * ctx


def bytes_per_token_loaded(m, c, ctx):
    """The same count from the loaded model's own layouts (codes, scales and offsets of a quantised weight
    included): every weight of a layer but the experts, top_k / E of the experts, the final norm and the LM head
    (the embedding reads one row), plus the KV cache (bfloat16) at ctx tokens."""
    E, k = c["num_local_experts"], c["num_experts_per_tok"]
    kv = c["num_key_value_heads"] * (c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"])
    total = 0.0
    for w in m._core.layouts():
        n = w["name"]
        if n == "embed":
            continue
        total += w["bytes"] * (k / E if n.endswith((".moe_w13", ".moe_w2")) else 1)
    return total + c["num_hidden_layers"] * 2 * kv * 2 * ctx


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--out", help="write every figure as JSON here")
    ap.add_argument("--batches", default="", help="comma-separated decode batches measured after batch 1 for bf16 and "
                    "every scheme (tokens/s a sequence and in total; no roofline: the experts a step reads depend on "
                    "the routing), e.g. 4,8,16")
    ap.add_argument("--quant", default="int4", help="comma-separated schemes quantised at load and measured after bf16 "
                    "(weights on the GPU, load, decode against their own roofline); '' for none")
    a = ap.parse_args()
    gpu_bench.need_cuda("benchmarks/moe_gpu.py", torch_too=True)
    if not os.path.isfile(os.path.join(a.ckpt, "config.json")):
        t0 = time.perf_counter()
        # torch on the GPU draws the numbers (seconds); numpy (synth.write) would take many minutes for 35 GB
        gpu_bench.make_checkpoint(a.ckpt, "mixtral-8x7b", shards=max(1, a.layers * 3 // 4), num_hidden_layers=a.layers)
        n = gpu_bench.ckpt_bytes(a.ckpt)
        print(json.dumps({"made": a.ckpt, "GB": n / 1e9, "seconds": time.perf_counter() - t0}), flush=True)
    with open(os.path.join(a.ckpt, "config.json")) as fh:
        cfg = json.load(fh)
    import fastload
    out = {}
    m, _ = gpu_bench.time_fastload_load(a.ckpt)  # fills the page cache
    del m
    m, secs = gpu_bench.time_fastload_load(a.ckpt)
    nbytes = gpu_bench.ckpt_bytes(a.ckpt)
    out["load"] = {"seconds": secs, "GB_per_s": nbytes / secs / 1e9, "stats": m.load_stats}
    rates = raw_rate(a.ckpt)
    ceiling = rates["read_copy"]
    out["load"]["ceiling_GB_per_s"] = ceiling / 1e9
    out["load"]["h2d_only_GB_per_s"] = rates["copy_only"] / 1e9
    out["load"]["read_only_GB_per_s"] = rates["read_only"] / 1e9
    out["load"]["of_ceiling"] = nbytes / secs / ceiling
    print(json.dumps({"load": out["load"]}, default=str), flush=True)
    # validate first: a greedy continuation is deterministic and finite logits come out
    ids = np.random.default_rng(0).integers(100, cfg["vocab_size"] - 100, size=(1, a.prompt))
    lg = np.asarray(m(ids).logits)
    assert np.isfinite(lg).all(), "non-finite logits"
    g1 = m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    g2 = m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    assert np.array_equal(g1, g2), "greedy decode is not deterministic"
    bw = gpu_bench.d2d_bandwidth()
    r = gpu_bench.fl_decode(m, 1, a.prompt, a.new)
    bpt = bytes_per_token(cfg, a.prompt + a.new // 2)
    r["roofline_tok_s"] = bw / bpt
    r["of_roofline"] = r["decode_tok_s_per_seq"] / r["roofline_tok_s"]
    r["GB_per_token"] = bpt / 1e9
    r["d2d_GB_per_s"] = bw / 1e9
    out["decode"] = r
    print(json.dumps({"decode": r}), flush=True)
    batches = [int(b) for b in a.batches.split(",") if b]
    schemes = [q for q in a.quant.split(",") if q]

    def more_batches(model, res):  # decode at the other batches, on prompts of their own
        res["batches"] = {b: gpu_bench.fl_decode(model, b, a.prompt, a.new) for b in batches}
        for b, x in res["batches"].items():
            print(json.dumps({"batch": b, "decode_tok_s_total": x["decode_tok_s_total"]}), flush=True)
    more_batches(m, r)
    out["decode"]["GB_per_token_layouts"] = bytes_per_token_loaded(m, cfg, a.prompt + a.new // 2) / 1e9
    out["weights_GB"] = m.memory_stats()["weights"] / 1e9
    del m
    import gc
    gc.collect()
    for scheme in schemes:
        t0 = time.perf_counter()
        qm = fastload.AutoModelForCausalLM.from_pretrained(a.ckpt, device_map="cuda", torch_dtype="bfloat16",
                                                           progress=False,
                                                           quantization_config=fastload.QuantConfig(scheme=scheme))
        qsecs = time.perf_counter() - t0
        qlg = np.asarray(qm(ids).logits)
        assert np.isfinite(qlg).all(), f"{scheme}: non-finite logits"
        qr = gpu_bench.fl_decode(qm, 1, a.prompt, a.new)
        more_batches(qm, qr)
        qb = bytes_per_token_loaded(qm, cfg, a.prompt + a.new // 2)
        ms = qm.memory_stats()
        lays = qm._core.layouts()
        per_layers = sum(w["bytes"] for w in lays if w["name"].startswith("layers."))
        rest = sum(w["bytes"] for w in lays if not w["name"].startswith("layers."))
        # Mixtral-8x7B has 32 layers: the measured layers' bytes scaled to 32, plus what is outside the layers
        qr["weights_GB_at_32_layers"] = (per_layers * 32 / cfg["num_hidden_layers"] + rest) / 1e9
        qr.update(load_seconds=qsecs, weights_GB=ms["weights"] / 1e9, layouts=ms["layouts"], GB_per_token=qb / 1e9,
                  roofline_tok_s=bw / qb, of_roofline=qr["decode_tok_s_per_seq"] / (bw / qb),
                  vs_bf16=qr["decode_tok_s_per_seq"] / r["decode_tok_s_per_seq"])
        out[scheme] = qr
        print(json.dumps({scheme: qr}), flush=True)
        del qm
        gc.collect()
    if not a.no_hf:
        hm, hsecs = gpu_bench.time_hf_load(a.ckpt)
        h = gpu_bench.hf_decode(hm, 1, a.prompt, a.new)
        h["load_seconds"] = hsecs
        out["hf_eager"] = h
        out["speedup_vs_hf_eager"] = r["decode_tok_s_per_seq"] / h["decode_tok_s_per_seq"]
        print(json.dumps({"hf_eager": h, "speedup": out["speedup_vs_hf_eager"]}), flush=True)
        gpu_bench.free_hf(hm)
    print(f"load {out['load']['GB_per_s']:.2f} GB/s = {100 * out['load']['of_ceiling']:.0f}% of read+copy "
          f"{out['load']['ceiling_GB_per_s']:.2f} (target >= 85%); decode {r['decode_tok_s_per_seq']:.1f} tok/s = "
          f"{100 * r['of_roofline']:.0f}% of the roofline {r['roofline_tok_s']:.1f} (target >= 75%)"
          + (f"; {out['speedup_vs_hf_eager']:.1f}x transformers eager (target >= 5x)" if "hf_eager" in out else ""))
    for scheme in schemes:
        q = out[scheme]
        print(f"{scheme}: weights {q['weights_GB']:.2f} GB (bf16 {out['weights_GB']:.2f}; {q['weights_GB_at_32_layers']:.1f} GB "
              f"at Mixtral's 32 layers, target <= 30), load {q['load_seconds']:.2f} s, "
              f"decode {q['decode_tok_s_per_seq']:.1f} tok/s = {100 * q['of_roofline']:.0f}% of its roofline "
              f"{q['roofline_tok_s']:.1f}, {q['vs_bf16']:.2f}x bf16")
    for b in batches:
        print(f"batch {b}, tok/s in total: bf16 {r['batches'][b]['decode_tok_s_total']:.0f}"
              + "".join(f", {s} {out[s]['batches'][b]['decode_tok_s_total']:.0f} "
                        f"({out[s]['batches'][b]['decode_tok_s_total'] / r['batches'][b]['decode_tok_s_total']:.2f}x)"
                        for s in schemes))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    del fastload


if __name__ == "__main__":
    main()
