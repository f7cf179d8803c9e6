"""Where a quantised forward spends its time (issue 9): a 4-layer model with Qwen2.5-7B's widths, int4 at load on
the GPU, one 2048-token prefill and 64 greedy decode steps. Run under nsys:
  nsys profile --cuda-graph-trace=node -o /tmp/q python3 dev/cuda/quant_step_profile.py
  nsys stats -r cuda_gpu_kern_sum /tmp/q.nsys-rep"""
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
m = fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cuda", quantization_config=scheme)
ids = np.random.default_rng(0).integers(0, 150000, (1, 2048))
for _ in range(2):
    t = time.perf_counter(); m.generate(ids, max_new_tokens=1, do_sample=False); print("prefill", time.perf_counter() - t)
t = time.perf_counter(); m.generate(ids[:, :32], max_new_tokens=64, do_sample=False); print("decode 64", time.perf_counter() - t)
