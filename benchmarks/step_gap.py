"""The host's share of a batch-1 decode step, without a profiler: with FASTLOAD_ENGINE_PROBE_REPLAYS=k the engine
replays each graph-replayed decode step k more times right behind the first (same inputs, same results), so a step
costs host + (k + 1) x GPU. Decode time per token at k = 0, 1, 2 (each in a fresh process, median of 3 generates of
--new tokens) fitted by a line: the slope is the GPU's time for one step, the intercept the time the GPU waits for
the host between steps (token to the host, bookkeeping, inputs up, graph launch).

    python3 benchmarks/step_gap.py --dir /tmp/glm_st [--dtype float16] [--quant int4] [--new 256] [--out F]
    FASTLOAD_ENGINE_PIPELINE=0 python3 benchmarks/step_gap.py ...     # the same, decode step by step

With the pipelined decode (the default on CUDA) the intercept is what the GPU still waits between two graphs; step by
step it is also the host's work. benchmarks/test_gpu.py::test_gpu_step_gap runs both on the Qwen2.5-7B checkpoint.
"""
import argparse
import json
import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one(a):
    sys.path.insert(0, ROOT)
    import time
    import fastload
    from gpu_bench import decode_rate
    kw = {} if a.quant in ("", "none") else {"quantization_config": {"quant_method": "fastload", "scheme": a.quant}}
    m = fastload.AutoModelForCausalLM.from_pretrained(a.dir, device_map=a.device, torch_dtype=a.dtype, progress=False,
                                                      trust_remote_code=True, **kw)
    ids = np.random.default_rng(0).integers(3, min(30000, m.config["vocab_size"]), size=(1, 32))
    m.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=[])
    per = []
    for _ in range(3):
        t0 = time.perf_counter(); m.generate(ids, max_new_tokens=1, do_sample=False, eos_token_id=[])
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter(); m.generate(ids, max_new_tokens=a.new, do_sample=False, eos_token_id=[])
        dt = time.perf_counter() - t0
        if decode_rate(a.new, dt, ttft) is not None:  # else noise exceeded the decode: no figure, not a negative one
            per.append((dt - ttft) / (a.new - 1))
    print(json.dumps({"us_per_token": float(np.median(per)) * 1e6 if len(per) >= 2 else None}))


def measure(d, dtype="bfloat16", quant="", new=256, ks=(0, 1, 2), env=None, device="cuda"):
    """Decode time per token at each k (a fresh process each, env added to its environment) and the line through
    them: {"ks", "us_per_token", "gpu_us_per_step", "host_gap_us", "host_share"}."""
    ts = []
    for k in ks:
        e = dict(os.environ, **(env or {}), FASTLOAD_ENGINE_PROBE_REPLAYS=str(k))
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", "--dir", d, "--dtype", dtype,
                            "--quant", quant, "--new", str(new), "--device", device], env=e, capture_output=True,
                           text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
        if r.returncode or not line:
            raise RuntimeError(f"step_gap k={k}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        t = json.loads(line[-1])["us_per_token"]
        if t is None:
            raise RuntimeError(f"step_gap k={k}: in 2 of 3 runs the {new}-token generate took no longer than the "
                               "1-token one: the timing noise exceeds the decode (a larger --new, a quieter machine)")
        ts.append(t)
    if device != "cuda":  # no graphs, so no replays: k changes nothing and a line through noise means nothing
        return {"ks": list(ks), "us_per_token": ts, "gpu_us_per_step": None, "host_gap_us": None, "host_share": None,
                "note": f"device {device}: the probe replays CUDA graphs only; the per-token times are all there is"}
    gpu, host = np.polyfit(np.array(ks) + 1.0, np.array(ts), 1)
    if gpu <= 0:
        raise RuntimeError(f"step_gap: the replays added no time ({ts} us a token for k = {list(ks)}): the probe did "
                           "not take effect (decode steps not graph-replayed?), so there is no GPU share to report")
    return {"ks": list(ks), "us_per_token": ts, "gpu_us_per_step": float(gpu), "host_gap_us": float(host),
            "host_share": float(host / ts[0])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", required=True)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--quant", default="")
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--ks", default="0,1,2")
    ap.add_argument("--device", default="cuda", help="cuda (cpu: a check of the script; no graphs, no replays)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(a)
    from gpu_bench import need_cuda
    need_cuda("benchmarks/step_gap.py", a.device)
    res = dict(dir=a.dir, dtype=a.dtype, quant=a.quant,
               pipeline=os.environ.get("FASTLOAD_ENGINE_PIPELINE", "default"),
               **measure(a.dir, a.dtype, a.quant, a.new, tuple(int(v) for v in a.ks.split(",")), device=a.device))
    for k, t in zip(res["ks"], res["us_per_token"]):
        print(f"k={k}: {t:.1f} us a token")
    print(json.dumps(res))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
