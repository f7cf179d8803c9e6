"""Per-kernel GPU time of decode steps (issue 9): a 4-layer model with Qwen2.5-7B's widths, loaded as
SCHEME (bf16 / int8 / int4 / nf4), PROMPT tokens (default 32; 2048 for the prefill) then NEW greedy steps.
Run under ncu (or nsys, where installed: nsys profile --cuda-graph-trace=node), e.g.
  ncu --metrics gpu__time_duration.sum --csv --log-file /tmp/k.csv python3 dev/cuda/decode_kernel_times.py
and sum the durations per kernel name with dev/cuda/kernel_table.py. Without ncu it prints the wall time per step."""
import os, sys, time
import numpy as np
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT); sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import synth, fastload

d = "/tmp/q4layers"
if not os.path.exists(os.path.join(d, "config.json")):
    synth.SHAPES["qwen-4l"] = dict(synth.SHAPES["qwen2.5-7b"], num_hidden_layers=4)
    synth.write(d, "qwen-4l", "bfloat16")
scheme = os.environ.get("SCHEME", "int4")
new = int(os.environ.get("NEW", "8"))
kw = {} if scheme == "bf16" else {"quantization_config": scheme}
m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cuda", torch_dtype="bfloat16", **kw)
ids = np.random.default_rng(0).integers(0, 150000, (1, int(os.environ.get("PROMPT", "32"))))
m.generate(ids, max_new_tokens=new, do_sample=False)
t = time.perf_counter(); m.generate(ids, max_new_tokens=new, do_sample=False)
print(scheme, "generate", new, "tokens", time.perf_counter() - t, "s", flush=True)
