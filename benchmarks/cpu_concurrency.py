"""Chat requests on one CPU model from a loop and from a thread pool (issue 8, part 4).

    python benchmarks/cpu_concurrency.py [--model PATH] [--n 10] [--max-new-tokens 48]
                                         [--workers 1,2,4,10] [--repeat 3] [--out DIR]

Loads the demo model (or --model), answers N short fixed questions greedily (the chat workload:
chat template + generate, what model.chat runs) first in a for-loop, then through
ThreadPoolExecutor(workers) for each worker count, and prints wall seconds, generated tokens/s, the
ratio of each pool's speed to the loop's, and whether every answer equals the loop's. Each mode runs
--repeat times; the median wall time is reported. Writes cpu-concurrency-<date>-<host>.json and .md
under --out (default benchmarks/results)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import platform
import socket
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import fastload  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colours.",
    "How many legs does a spider have?",
    "What is 12 times 7?",
    "Give a synonym for happy.",
    "What does a thermometer measure?",
    "Which planet is closest to the Sun?",
    "What is the boiling point of water in Celsius?",
    "Name a famous painting by Leonardo da Vinci.",
    "What language is spoken in Brazil?",
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint (default: the demo model)")
    ap.add_argument("--n", type=int, default=10, help="chat requests per run (questions are reused cyclically)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--workers", default="1,2,4,10")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="OpenMP threads of the model (default: all cores)")
    ap.add_argument("--label", default="", help="free text stored with the results (e.g. 'main' or a branch)")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    a = ap.parse_args()

    if a.model is None:
        from fastload.demo import demo_model_path
        a.model = demo_model_path()
    tok = fastload.AutoTokenizer.from_pretrained(a.model)
    model = fastload.AutoModelForCausalLM.from_pretrained(a.model, device_map="cpu", threads=a.threads)
    eos = model.generation_config.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
    if tok.eos_token_id is not None and tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    qs = [QUESTIONS[i % len(QUESTIONS)] for i in range(a.n)]
    encs = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, return_dict=True,
                                    return_tensors="np") for q in qs]

    def ask(i):
        e = encs[i]
        out = np.asarray(model.generate(e["input_ids"], attention_mask=e["attention_mask"], do_sample=False,
                                        max_new_tokens=a.max_new_tokens, eos_token_id=eos))
        new = out[0, e["input_ids"].shape[1]:]
        return tok.decode(new, skip_special_tokens=True).strip(), len(new)

    ask(0)  # warm-up (first-touch of the weights, the thread team)
    modes = [("loop", 0)] + [(f"pool({w})", w) for w in (int(x) for x in a.workers.split(","))]
    runs = {name: [] for name, _ in modes}
    answers, tokens = {}, {}
    for _ in range(a.repeat):  # interleaved, so a change in machine load hits every mode alike
        for name, w in modes:
            t0 = time.perf_counter()
            if w == 0:
                res = [ask(i) for i in range(a.n)]
            else:
                with ThreadPoolExecutor(w) as ex:
                    res = list(ex.map(ask, range(a.n)))
            runs[name].append(time.perf_counter() - t0)
            answers.setdefault(name, [r[0] for r in res])
            tokens[name] = sum(r[1] for r in res)
    rows = []
    loop_wall = statistics.median(runs["loop"])
    for name, _ in modes:
        wall = statistics.median(runs[name])
        rows.append({"mode": name, "wall_s": wall, "walls_s": runs[name], "tokens": tokens[name],
                     "tok_per_s": tokens[name] / wall, "ratio_to_loop": loop_wall / wall,
                     "identical": answers[name] == answers["loop"]})

    host = socket.gethostname()
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "host": host,
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "label": a.label,
            "model": a.model, "n": a.n, "max_new_tokens": a.max_new_tokens, "repeat": a.repeat,
            "model_threads": model._core.info["cpu_threads"], "fastload": fastload.__file__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "rows": rows}
    head = f"| mode | wall s (median of {a.repeat}) | tok/s | speed / loop | identical answers |"
    lines = [head, "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['mode']} | {r['wall_s']:.2f} | {r['tok_per_s']:.1f} | {r['ratio_to_loop']:.2f}x | "
                     f"{'yes' if r['identical'] else 'NO'} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(a.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", a.label).strip("-")  # the label is free text; file names stay plain
    stem = os.path.join(a.out, f"cpu-concurrency-{info['date'][:10]}-{host}{'-' + slug if slug else ''}")
    with open(stem + ".json", "w") as f:
        json.dump(info, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(f"# CPU chat requests: loop vs thread pool ({info['date']}, {host}, {info['cores']} cores, "
                f"model threads {info['model_threads']}{', ' + a.label if a.label else ''})\n\n"
                f"{a.n} greedy chat requests of at most {a.max_new_tokens} new tokens on {os.path.basename(a.model)}.\n\n"
                f"{table}\n")
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
