"""CPU decode while other processes keep cores busy: the default thread count (threads=0: all cores, fewer while
others hold some: csrc/cpu/cpu_threads.c) against all cores fixed (FASTLOAD_ADAPT_THREADS=0) and one thread, with
0, 1 .. --busy processes spinning beside it. Each (setting, load) in a process of its own, alternated round by round
(a shared VM drifts by 10-20% within minutes: only alternated runs compare).

    python benchmarks/cpu_busy_cores.py [--model GGUF|DIR] [--busy 0,1,2] [--rounds 3] [--gen 64] [--json OUT]

Per process: from_pretrained(device_map="cpu"), one warm-up generation, then the best of 3 greedy generations of
--gen tokens after a 5-token prompt (eos ignored), with the spinning processes started before the load and killed
after; it prints tok/s and the thread count the model ended at. Nothing is asserted. Results of record:
benchmarks/results/cpu-busy-cores-2026-12-07/."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
from cpu_common import fl_rate, git_commit  # noqa: E402
SETTINGS = {  # name -> environment
    "adaptive (default)": {"FASTLOAD_ADAPT_THREADS": "1"},
    "all cores, fixed": {"FASTLOAD_ADAPT_THREADS": "0"},
    "1 thread": {"FASTLOAD_THREADS": "1"},
}


def child(a):
    import numpy as np
    import fastload
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(a.busy_now)]
    try:
        m = fastload.AutoModelForCausalLM.from_pretrained(a.model, device_map="cpu")
        kw = dict(do_sample=False, eos_token_id=[])
        ids = np.array([[1, 450, 4996, 17354, 1701]])
        m.generate(ids, max_new_tokens=8, **kw)
        best = max(fl_rate(m, ids, a.gen) for _ in range(3))
        info = m._core.info
        print(json.dumps({"gen_tok_s": best, "threads_now": info["cpu_threads_now"], "threads": info["cpu_threads"]}))
    finally:
        for p in busy:
            p.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file or model directory (default: the demo model)")
    ap.add_argument("--busy", default=None, help="numbers of spinning processes (default: 0, 1 and the CPU count)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--busy-now", type=int, default=0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        from fastload.demo import demo_model_path
        a.model = demo_model_path()
    if a.child:
        return child(a)
    ncpu = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    loads = [int(b) for b in a.busy.split(",")] if a.busy else sorted({0, 1, ncpu})
    rows = {(s, b): [] for b in loads for s in SETTINGS}
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "FASTLOAD_THREADS",
                                                             "FASTLOAD_ADAPT_THREADS")}
    for r in range(a.rounds):
        for b in loads:
            for s, env in SETTINGS.items():
                p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--model", a.model,
                                    "--gen", str(a.gen), "--busy-now", str(b)], env=dict(base, **env),
                                   capture_output=True, text=True)
                if p.returncode != 0:
                    sys.exit(f"{s}, {b} busy: the child failed:\n{p.stderr[-2000:]}")
                row = json.loads(p.stdout.strip().splitlines()[-1])
                rows[(s, b)].append(row)
                print(f"round {r}, {b} busy, {s}: {row['gen_tok_s']:.1f} tok/s, ended at {row['threads_now']} of "
                      f"{row['threads']} threads", flush=True)
    print(f"\n{os.path.basename(a.model)}, {ncpu} CPUs, {a.gen} tokens, best of 3 a process, median of "
          f"{a.rounds} alternated rounds (tok/s):")
    print(f"{'busy processes':>15} " + " ".join(f"{s:>20}" for s in SETTINGS))
    med = {}
    for b in loads:
        med[b] = {s: statistics.median(x["gen_tok_s"] for x in rows[(s, b)]) for s in SETTINGS}
        print(f"{b:>15} " + " ".join(f"{med[b][s]:20.1f}" for s in SETTINGS))
    if a.json:
        commit = git_commit()
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "cpus": ncpu, "rounds": a.rounds, "gen": a.gen,
                       "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                       "commit": commit, "medians": {str(b): med[b] for b in loads},
                       "rows": {f"{s} | {b}": v for (s, b), v in rows.items()}}, f, indent=1)


if __name__ == "__main__":
    main()
