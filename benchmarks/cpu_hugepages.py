"""The CPU backend's weights in 2 MiB transparent huge pages (FASTLOAD_HUGEPAGES, default 1) against 4 KiB pages (0),
and optionally the KV pool too (2): load time, generation, prompt and resident memory, each setting in processes of
its own, alternated round by round (a shared VM drifts by 10-20% within minutes: only alternated runs compare).

    python benchmarks/cpu_hugepages.py [--model GGUF|DIR] [--settings 0,1] [--rounds 6] [--gen 64] [--pp 256]
        [--context 0] [--threads 2] [--json OUT]

Per process: from_pretrained(device_map="cpu") timed, then the best of 3 greedy generations of --gen tokens after a
5-token prompt (or, with --context L, after an L-token prompt whose pages are reused: the decode at that context),
then one --pp-token prompt (prefix caching off for it: a fresh prompt), and the process's resident memory and huge
pages (/proc/self/smaps_rollup). Prints the median of each setting. Nothing is asserted; --json writes the rows with
the machine, date and commit. Results of record: benchmarks/results/cpu-hugepages-2026-12-06/."""
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


def child(a):
    import numpy as np
    import fastload
    t0 = time.perf_counter()
    m = fastload.AutoModelForCausalLM.from_pretrained(a.model, device_map="cpu")
    load_s = time.perf_counter() - t0
    kw = dict(do_sample=False, eos_token_id=[])
    if a.context:
        ids = np.random.default_rng(0).integers(100, min(30000, m.config.vocab_size), size=(1, a.context))
    else:
        ids = np.array([[1, 450, 4996, 17354, 1701]])
    m.generate(ids, max_new_tokens=1, **kw)  # warm-up; with --context the prompt's pages are kept for the reps
    gen = max(fl_rate(m, ids, a.gen) for _ in range(3))
    m.configure_engine(prefix_caching=False)
    pp = np.random.default_rng(int(time.time())).integers(100, min(30000, m.config.vocab_size), size=(1, a.pp))
    t0 = time.perf_counter()
    m.generate(pp, max_new_tokens=1, **kw)
    pp_tps = a.pp / (time.perf_counter() - t0)
    mem = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            k = line.split(":")[0]
            if k in ("Rss", "AnonHugePages"):
                mem[k] = int(line.split()[1]) // 1024
    print(json.dumps({"load_s": load_s, "gen_tok_s": gen, "pp_tok_s": pp_tps, "rss_mb": mem.get("Rss"),
                      "anon_huge_mb": mem.get("AnonHugePages"), "huge_pages": m.load_stats["huge_pages"],
                      "weight_bytes": m.load_stats["weight_bytes"]}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file or model directory (default: the demo model)")
    ap.add_argument("--settings", default="0,1", help="FASTLOAD_HUGEPAGES values to alternate")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--pp", type=int, default=256)
    ap.add_argument("--context", type=int, default=0, help="decode after a prompt of this many tokens (0: 5 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default="")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.model is None:
        from fastload.demo import demo_model_path
        a.model = demo_model_path()
    if a.child:
        return child(a)
    settings = a.settings.split(",")
    rows = {s: [] for s in settings}
    args = [sys.executable, os.path.abspath(__file__), "--child", "--model", a.model, "--gen", str(a.gen),
            "--pp", str(a.pp), "--context", str(a.context)]
    for r in range(a.rounds):
        for s in settings:
            env = dict(os.environ, FASTLOAD_HUGEPAGES=s, OMP_NUM_THREADS=str(a.threads), FASTLOAD_THREADS=str(a.threads))
            p = subprocess.run(args, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                sys.exit(f"FASTLOAD_HUGEPAGES={s}: the child failed:\n{p.stderr[-2000:]}")
            row = json.loads(p.stdout.strip().splitlines()[-1])
            rows[s].append(row)
            print(f"round {r} FASTLOAD_HUGEPAGES={s}: load {row['load_s']:.2f} s, generation {row['gen_tok_s']:.1f} "
                  f"tok/s, prompt {a.pp} {row['pp_tok_s']:.1f} tok/s, Rss {row['rss_mb']} MB "
                  f"({row['anon_huge_mb']} MB huge)", flush=True)
    print(f"\n{os.path.basename(a.model)}, {a.threads} threads, {a.rounds} alternated rounds, medians:")
    print(f"{'FASTLOAD_HUGEPAGES':>18} {'load s':>8} {'gen tok/s':>10} {'pp tok/s':>9} {'Rss MB':>7} {'huge MB':>8}")
    med = {}
    for s in settings:
        med[s] = {k: statistics.median(r[k] for r in rows[s])
                  for k in ("load_s", "gen_tok_s", "pp_tok_s", "rss_mb", "anon_huge_mb")}
        m = med[s]
        print(f"{s:>18} {m['load_s']:8.2f} {m['gen_tok_s']:10.1f} {m['pp_tok_s']:9.1f} {m['rss_mb']:7.0f} "
              f"{m['anon_huge_mb']:8.0f}")
    if a.json:
        commit = git_commit()
        with open(a.json, "w") as f:
            json.dump({"model": a.model, "threads": a.threads, "rounds": a.rounds, "gen": a.gen, "pp": a.pp,
                       "context": a.context, "cpu": platform.processor() or platform.machine(),
                       "date": time.strftime("%Y-%m-%d"), "commit": commit, "medians": med, "rows": rows}, f,
                      indent=1)


if __name__ == "__main__":
    main()
