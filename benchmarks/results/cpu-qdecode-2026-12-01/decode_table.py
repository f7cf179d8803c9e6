"""Decode tok/s of the demo model (SmolLM2-135M-Instruct Q4_1 GGUF) in each quantisation mode on the CPU.

Method (the issue-9 table's): the GGUF loaded as float16 (QuantConfig(gguf="dequantize")) and written with
save_pretrained (float16 safetensors); each mode loaded from that with quantization_config, threads=2;
64 greedy tokens after "The meaning of life is" (fastload.bench._decode_speed), best of REPS runs after one
warm-up. Prints the layout of the LM head (core.layouts()) and the weight bytes per mode.

    PYTHONPATH=$PWD python3 benchmarks/results/cpu-qdecode-2026-12-01/decode_table.py [MODES] [REPS]
MODES: comma list of fp16, gguf, int4, int4:32, int4:64, int4:96, int4:128, nf4:32, nf4:64, int8 (default all).
"""
import gc
import os
import sys

import fastload
from fastload import bench, demo

ALL = "fp16,int4,int4:32,int4:64,int4:128,nf4:32,nf4:64,int8,gguf"
modes = (sys.argv[1] if len(sys.argv) > 1 else ALL).split(",")
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 5
gguf = demo.demo_model_path()
src = "/tmp/cpuq-fp16-ref"
tok = fastload.AutoTokenizer.from_pretrained(gguf)
if not os.path.exists(os.path.join(src, "config.json")):
    ref = fastload.AutoModelForCausalLM.from_pretrained(gguf, torch_dtype="float16", threads=2,
                                                       quantization_config=fastload.QuantConfig(gguf="dequantize"))
    ref.save_pretrained(src)
    del ref
for mode in modes:
    scheme, _, group = mode.partition(":")
    if mode == "gguf":
        m = fastload.AutoModelForCausalLM.from_pretrained(gguf, torch_dtype="float16", threads=2)
    else:
        q = "none" if scheme == "fp16" else ({"scheme": scheme, "group_size": int(group)} if group else scheme)
        m = fastload.AutoModelForCausalLM.from_pretrained(src, torch_dtype="float16", threads=2, quantization_config=q)
    core = m._core
    lays = core.layouts() if hasattr(core, "layouts") else []
    head = [l for l in lays if "lm_head" in l["name"] or l["name"] in ("embed", "embed_tokens")]
    body = [l for l in lays if l["name"].startswith("layers.0.")]
    bench._decode_speed(m, tok, 64)
    best = max(bench._decode_speed(m, tok, 64) for _ in range(reps))
    hd = "; ".join(f"{l['name']} {l['dtype']} g{l.get('group_size')} {l['bytes'] / 1e6:.1f} MB" for l in head)
    bd = ",".join(sorted({f"{l['dtype']} g{l.get('group_size')}" for l in body}))
    print(f"{mode:9s} {best:6.1f} tok/s  weights {m._core.info.get('weight_bytes', 0) / 1e6:6.1f} MB  body [{bd}]  head [{hd}]",
          flush=True)
    del m, core
    gc.collect()
