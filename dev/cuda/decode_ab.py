"""A/B of the decode loop under knobs that are read once per process (FASTLOAD_PDL,
FASTLOAD_GEMV_VARIANT, ...): run once per setting, each in a fresh process, on the same
checkpoint. Prints one JSON line: batch-1 decode tok/s (median of 3 generates of --new tokens
after a 32-token prompt), the roofline (weights read per token / D2D copy bandwidth passed in
with --bw-gbs, or measured here with torch), and a hash of the greedy tokens (the same for
every setting whose kernels round identically; a difference with PDL on/off is a race).

    python dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b [--bw-gbs 4222] [--label pdl-on]
"""
import argparse
import hashlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/fl_qwen7b")
    ap.add_argument("--bw-gbs", type=float, default=0.0)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--label", default="")
    ap.add_argument("--quant", default="bf16", help="comma list of bf16|int8|int4|nf4 (quantised at load), one line each")
    a = ap.parse_args()
    if a.bw_gbs <= 0:
        from gpu_bench import d2d_bandwidth
        a.bw_gbs = d2d_bandwidth() / 1e9
    for mode in a.quant.split(","):
        run(a, mode)


def run(a, mode):
    import fastload
    kw = {} if mode == "bf16" else {"quantization_config": {"quant_method": "fastload", "scheme": mode}}
    m = fastload.AutoModelForCausalLM.from_pretrained(a.dir, device_map="cuda", torch_dtype="bfloat16", progress=False, **kw)
    c = m.config
    ids = np.random.default_rng(0).integers(100, c["vocab_size"] - 100, size=(a.batch, 32))
    m.generate(ids, max_new_tokens=4, eos_token_id=[])
    rates, out = [], None
    for _ in range(3):
        t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, eos_token_id=[]); ttft = time.perf_counter() - t0
        t0 = time.perf_counter(); out = m.generate(ids, max_new_tokens=a.new, eos_token_id=[]); dt = time.perf_counter() - t0
        rates.append((out.shape[1] - 32 - 1) / (dt - ttft))
    w = m.get_memory_footprint() - c["vocab_size"] * c["hidden_size"] * 2
    kv = 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"]) * 2 * (32 + a.new // 2)
    roof = a.bw_gbs * 1e9 / (w + a.batch * kv)
    tok = float(np.median(rates))
    fused = m._core.info.get("fused_matmul_inputs", 0)
    del m
    print(json.dumps({"label": a.label, "mode": mode, "fused_matmul_inputs": fused, "env": {k: v for k, v in os.environ.items() if k.startswith("FASTLOAD_")},
                      "batch": a.batch, "tok_s_per_seq": round(tok, 1), "runs": [round(r, 1) for r in rates],
                      "roofline_tok_s": round(roof, 1), "share": round(tok / roof, 4),
                      "tokens_sha": hashlib.sha1(np.asarray(out).tobytes()).hexdigest()[:12]}), flush=True)


if __name__ == "__main__":
    main()
