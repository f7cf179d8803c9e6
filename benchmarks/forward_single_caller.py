"""One caller, CPU: wall time of 20 forwards of T tokens, `reps` times, on the fastload tree given (its checkout, built
in place), so that two trees can be run alternately in one window (benchmarks/results/issue11-forward-2026-12-02-cpu).
Validates first: the last forward's logits equal the first's (and the printed sum of the logits equals the other
tree's).
    python3 benchmarks/forward_single_caller.py TREE demo|llama|qwen2|... THREADS REPS T"""
import argparse, sys, time, json
import numpy as np
ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("tree", help="a fastload checkout, built in place")
ap.add_argument("which", help="demo, or a tiny fixture under TREE/tests/fixtures (llama, qwen2, ...)")
ap.add_argument("threads", type=int)
ap.add_argument("reps", type=int)
ap.add_argument("T", type=int, help="tokens a forward")
a = ap.parse_args()
tree, which, threads, reps, T = a.tree, a.which, a.threads, a.reps, a.T
sys.path.insert(0, tree); sys.path.insert(0, tree + "/tests")
import fastload, fastload.demo
assert fastload.__file__.startswith(tree), fastload.__file__
from golden_util import model_dir
kw = dict(device_map="cpu", threads=threads)
if which == "demo":
    m = fastload.AutoModelForCausalLM.from_pretrained(fastload.demo.demo_model_path(download=False), **kw)
else:
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(which)), torch_dtype="float32", **kw)
V = m.config.vocab_size
x = (np.arange(T)[None] * 7 + 3) % (V - 3) + 3
ref = m(x).logits; m(x)
out = []
for _ in range(reps):
    t = time.perf_counter()
    for _ in range(20):
        lg = m(x).logits
    out.append(time.perf_counter() - t)
assert np.array_equal(lg, ref)
print(json.dumps({"tree": tree.split("/")[-1], "model": which, "threads": threads, "T": T, "min": min(out),
                  "median": sorted(out)[len(out) // 2], "sum": float(np.float64(ref).sum())}))
