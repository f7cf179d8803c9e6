"""fastload against llama.cpp on the CPU, one GGUF type after another (issue 9, part 4: "GGUF on the CPU competes
with llama.cpp" for every type kept quantised, not only the demo's Q4_1).

    python benchmarks/cpu_gguf_types.py [--shape tinyllama|small] [--types Q4_K_M,Q4_0,...] [--reps 3]
                                        [--gen 64] [--pp 256] [--threads 2] [--out DIR] [--workdir DIR]

What it does, all on this machine:
  1. writes a llama GGUF in F16 with random weights (normal, std 0.02; never zeros) in a real model's shape
     (`tinyllama`: TinyLlama-1.1B's hidden 2048, ffn 5632, 22 layers, 32 heads, 4 KV heads, untied output;
     `small`: hidden 1024, ffn 2816, 8 layers) and the demo model's tokenizer (49152 tokens) copied from the
     demo GGUF, so that llama.cpp loads it;
  2. has llama.cpp itself quantise it into each asked type (llama-cpp-python's `llama_model_quantize`, the
     `llama-quantize` tool's code: the real Q4_K_M / Q5_K_M mixes, Q6_K output and all);
  3. runs benchmarks/cpu_quant_vs_llamacpp.py's `run_file` on each file: generation (`--gen` greedy tokens after a
     short prompt) and prompt processing (`--pp` tokens), llama.cpp in a child process first, then fastload (until
     2026-12-05 they alternated in this one process, and their thread pools slowed each other), the same thread
     count; and the resident weight bytes against the file's tensor bytes.
Writes results.json and README.md (a table) under --out. Random weights: the greedy texts mean nothing, and
the two libraries' tokens part early (different activation rounding on random logits); speed is what is measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from cpu_common import git_commit  # noqa: E402

SHAPES = {
    "tinyllama": dict(hidden=2048, ffn=5632, layers=22, heads=32, kv=4, tied=False),
    "small": dict(hidden=1024, ffn=2816, layers=8, heads=16, kv=4, tied=False),
}
# llama.cpp's llama_ftype values (include/llama.h)
FTYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16,
          "Q5_K_M": 17, "Q6_K": 18}
TOKENIZER_KEYS = None  # every tokenizer.ggml.* key of the demo file


def write_source(path, shape, seed=0):
    """The F16 llama GGUF of `shape` with the demo model's tokenizer."""
    from fastload import _C, demo
    from gguf_util import GGML, GGUFWriter, T
    s = SHAPES[shape]
    D, F, L, H, KV = s["hidden"], s["ffn"], s["layers"], s["heads"], s["kv"]
    hd = D // H
    g = _C.GGUFFile(demo.demo_model_path())
    md = g.metadata
    g.close()
    V = len(md["tokenizer.ggml.tokens"])
    w = GGUFWriter()
    for k, v, t in [("general.architecture", "llama", T.STRING), ("general.name", f"random-{shape}", T.STRING),
                    ("llama.block_count", L, T.UINT32), ("llama.context_length", 4096, T.UINT32),
                    ("llama.embedding_length", D, T.UINT32), ("llama.feed_forward_length", F, T.UINT32),
                    ("llama.attention.head_count", H, T.UINT32), ("llama.attention.head_count_kv", KV, T.UINT32),
                    ("llama.rope.dimension_count", hd, T.UINT32), ("llama.rope.freq_base", 10000.0, T.FLOAT32),
                    ("llama.attention.layer_norm_rms_epsilon", 1e-5, T.FLOAT32), ("llama.vocab_size", V, T.UINT32),
                    ("general.file_type", 1, T.UINT32)]:
        w.add(k, v, t)
    for k, v in md.items():
        if not k.startswith("tokenizer."):
            continue
        if k == "tokenizer.ggml.token_type":
            w.add(k, [int(x) for x in v], T.ARRAY, T.INT32)
        elif isinstance(v, bool):
            w.add(k, v, T.BOOL)
        elif isinstance(v, int):
            w.add(k, v, T.UINT32)
        else:
            w.add(k, v)
    rng = np.random.default_rng(seed)

    def t(name, rows, cols=None, norm=False):
        if norm:
            a = (1 + 0.1 * rng.standard_normal(rows, dtype=np.float32)).astype(np.float32)
            w.add_tensor(name, a.tobytes(), GGML.F32, [rows])
            return
        a = (0.02 * rng.standard_normal((rows, cols), dtype=np.float32)).astype(np.float16)
        w.add_tensor(name, a.tobytes(), GGML.F16, [cols, rows])

    t("token_embd.weight", V, D)
    t("output_norm.weight", D, norm=True)
    if not s["tied"]:
        t("output.weight", V, D)
    for i in range(L):
        t(f"blk.{i}.attn_norm.weight", D, norm=True)
        t(f"blk.{i}.attn_q.weight", H * hd, D)
        t(f"blk.{i}.attn_k.weight", KV * hd, D)
        t(f"blk.{i}.attn_v.weight", KV * hd, D)
        t(f"blk.{i}.attn_output.weight", D, H * hd)
        t(f"blk.{i}.ffn_norm.weight", D, norm=True)
        t(f"blk.{i}.ffn_gate.weight", F, D)
        t(f"blk.{i}.ffn_up.weight", F, D)
        t(f"blk.{i}.ffn_down.weight", D, F)
    w.write(path)


def quantise(src, dst, type_name, threads):
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = FTYPES[type_name]
    p.nthread = threads
    rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), p)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) returned {rc}")


def tensor_types(path):
    from fastload import _C
    g = _C.GGUFFile(path)
    try:
        ts = g.tensors()
    finally:
        g.close()
    counts, nbytes = {}, 0
    for name, tname, _tid, _shape, size in ts:
        counts[tname] = counts.get(tname, 0) + 1
        nbytes += size
    return counts, nbytes


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tinyllama", choices=sorted(SHAPES))
    ap.add_argument("--types", default="Q4_0,Q4_1,Q5_0,Q5_1,Q8_0,Q4_K_M,Q5_K_M,Q6_K")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--workdir", default="/tmp/fastload-gguf-types")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    import llama_cpp

    import cpu_quant_vs_llamacpp as q
    os.makedirs(a.workdir, exist_ok=True)
    src = os.path.join(a.workdir, f"{a.shape}-F16.gguf")
    if not os.path.exists(src):
        t0 = time.perf_counter()
        write_source(src, a.shape)
        print(f"wrote {src} in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for ty in [x.strip() for x in a.types.split(",") if x.strip()]:
        path = os.path.join(a.workdir, f"{a.shape}-{ty}.gguf")
        if not os.path.exists(path):
            quantise(src, path, ty, a.threads)
        counts, file_bytes = tensor_types(path)
        print(f"== {ty}: {path} ({file_bytes / 1e6:.1f} MB of tensors: {counts})", flush=True)
        info, r = q.run_file(path, a.threads, a.gen, a.pp, a.reps)
        med = statistics.median
        row = dict(type=ty, file_tensor_bytes=file_bytes, tensor_types=counts,
                   weight_bytes=int(info["weight_bytes"]), quantized_weights=int(info.get("quantized_weights", 0)),
                   fastload_gen=med(r["fl_gen"]), llamacpp_gen=med(r["ll_gen"]), fastload_pp=med(r["fl_pp"]),
                   llamacpp_pp=med(r["ll_pp"]), reps=r, same_greedy_tokens=r["same_tokens"])
        row["gen_ratio"] = row["fastload_gen"] / row["llamacpp_gen"]
        row["pp_ratio"] = row["fastload_pp"] / row["llamacpp_pp"]
        row["weights_over_file"] = row["weight_bytes"] / file_bytes
        print(f"   generation {row['fastload_gen']:.1f} / {row['llamacpp_gen']:.1f} tok/s = {row['gen_ratio']:.2f}x, "
              f"prompt {a.pp}: {row['fastload_pp']:.1f} / {row['llamacpp_pp']:.1f} = {row['pp_ratio']:.2f}x, "
              f"weights {row['weights_over_file']:.3f}x the file", flush=True)
        rows.append(row)
    commit = git_commit("?")
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), commit=commit,
                cpu=platform.processor() or platform.machine(), threads=a.threads, shape=a.shape,
                shape_config=SHAPES[a.shape], gen_tokens=a.gen, prompt_tokens=a.pp, reps=a.reps,
                llama_cpp_python=llama_cpp.__version__, loadavg=os.getloadavg())
    lines = [f"| type | tensors | fastload gen tok/s | llama.cpp gen | ratio | fastload pp{a.pp} | llama.cpp pp | ratio "
             "| weights / file bytes |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        tt = ", ".join(f"{k} {v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['type']} | {tt} | {r['fastload_gen']:.1f} | {r['llamacpp_gen']:.1f} | {r['gen_ratio']:.2f}x "
                     f"| {r['fastload_pp']:.1f} | {r['llamacpp_pp']:.1f} | {r['pp_ratio']:.2f}x "
                     f"| {r['weights_over_file']:.3f} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as f:
            json.dump(dict(meta=meta, rows=rows), f, indent=1)
        with open(os.path.join(a.out, "table.md"), "w") as f:
            f.write(f"{meta}\n\n{table}\n")
    return rows


if __name__ == "__main__":
    main()
