"""Decode at long context against its roofline (issue 12 part 4): the Qwen2.5-7B-shaped bf16 checkpoint with Qwen's
YaRN block (factor 4 over 32768), one prompt of each length, prefill time and decode tokens/s measured apart inside
one generate() call (a streamer stamps each token), next to the roofline that counts the KV bytes a step reads, and
transformers (sdpa, the same YaRN block in its config) measured the same way in the same process.

    python benchmarks/long_context.py --model /tmp/fl_qwen7b --lengths 63488 129024 --new 256 --peer-new 32 \\
        --out benchmarks/results/<dir>/long_context.json

Roofline: the device-to-device copy rate (gpu_bench.d2d_bandwidth, bytes read + written) over the bytes one decode
step reads: every weight but the embedding table, plus the bf16 K and V of every cached token at the mean context of
the measured steps. No prefix cache is involved: each length is one generate() call on a fresh prompt."""
import argparse
import gc
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}


class Stamps:
    """A streamer (transformers' put / end protocol, which fastload's generate also calls): the time of every put.
    put 0 is the prompt; put 1 the first new token; the last put the last token. Both engines hand put host ids
    (transformers calls put(next_tokens.cpu())), so a stamp is taken after the step finished on the device."""
    def __init__(self):
        self.t = []

    def put(self, _):
        self.t.append(time.perf_counter())

    def end(self):
        pass


def measure(gen, T, N):
    st = Stamps()
    t0 = time.perf_counter()
    out = gen(st, N)
    t1 = time.perf_counter()
    n = int(out.shape[1] - T)
    first = st.t[1] if len(st.t) > 1 else t1
    return {"prompt": T, "new": n, "prefill_s": round(first - t0, 3),
            "decode_tok_s": round((n - 1) / (st.t[-1] - first), 2) if n > 1 else None, "total_s": round(t1 - t0, 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/fl_qwen7b")
    ap.add_argument("--lengths", type=int, nargs="+", default=[63488, 129024])
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--peer-new", type=int, default=32, help="transformers' new tokens (0: no peer)")
    ap.add_argument("--rope_scaling", type=json.loads, default=YARN)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import fastload
    import gpu_bench
    from fastload import bench
    gpu_bench.need_cuda("benchmarks/long_context.py", torch_too=True)
    bw = gpu_bench.d2d_bandwidth()
    m = fastload.AutoModelForCausalLM.from_pretrained(a.model, device_map="cuda", torch_dtype="bfloat16",
                                                     rope_scaling=a.rope_scaling)
    roof = gpu_bench.roofline_fn(m, bw)
    V = m.config["vocab_size"]
    rows = []
    for T in a.lengths:
        bench._pool_for(m, 1, T + a.new + 16)
        ids = np.random.default_rng(T).integers(100, V - 100, size=(1, T))
        r = measure(lambda st, N: m.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False,
                                             eos_token_id=[], streamer=st), T, a.new)
        r["roofline_tok_s"] = round(roof(T + a.new // 2), 2)
        r["share_of_roofline"] = round(r["decode_tok_s"] / r["roofline_tok_s"], 4)
        r["engine"] = "fastload"
        print(json.dumps(r), flush=True)
        rows.append(r)
    del m
    gc.collect()
    fastload.cuda.empty_cache()
    peer = None
    if a.peer_new:
        try:
            import torch
            import transformers
            cfg = bench._hf_config_with_rope(transformers, a.model, a.rope_scaling, {})
            hf = transformers.AutoModelForCausalLM.from_pretrained(a.model, config=cfg, dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa").cuda().eval()
            peer = {"transformers": transformers.__version__, "torch": torch.__version__, "attn": "sdpa",
                    "rope_parameters": getattr(hf.config, "rope_parameters", None) or getattr(hf.config, "rope_scaling", None)}
            for T in a.lengths:
                ids = torch.randint(100, V - 100, (1, T), device="cuda")
                with torch.no_grad():
                    r = measure(lambda st, N: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=N,
                                                          min_new_tokens=N, do_sample=False, eos_token_id=None,
                                                          pad_token_id=0, streamer=st), T, a.peer_new)
                r["engine"] = "transformers"
                r["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
                print(json.dumps(r), flush=True)
                rows.append(r)
        except Exception as e:  # noqa: BLE001 - the peer failing must not lose fastload's rows
            peer = {"error": f"{type(e).__name__}: {e}"}
            print("peer failed:", peer["error"], flush=True)
    doc = {"benchmark": "long_context", "model": a.model, "rope_scaling": a.rope_scaling, "d2d_gb_s": round(bw / 1e9, 1),
           "device": fastload.cuda.get_device_name(0) if hasattr(fastload.cuda, "get_device_name") else "cuda",
           "commit": os.environ.get("FASTLOAD_COMMIT"), "date": time.strftime("%Y-%m-%d"), "peer": peer, "rows": rows}
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        json.dump(doc, open(a.out, "w"), indent=1)
    print(json.dumps({k: v for k, v in doc.items() if k != "rows"}))


if __name__ == "__main__":
    main()
