"""CPU decode at long contexts: fastload with its float32 KV cache (kv_cache_dtype="auto") and with
kv_cache_dtype="float16" (alternating per round in this process), against llama.cpp (llama-cpp-python, its default
f16 KV cache) on the same GGUF file, prompt ids and thread count, measured after them in a child process of its own:
with a llama.cpp context alive in the same process fastload decoded up to 2x slower on the 2-core dev VM (first
run, 2026-12-05: 144 -> 76 tok/s at 256 tokens once llama.cpp had run), so the two never share a process here.
Batch 1, greedy, tokens a second of `--new` generated tokens after a prompt of L tokens (fastload: time to first
token subtracted, the prompt's pages reused; llama.cpp: its own t_eval counter over the same tokens), median of
`--rounds`. Then the demo model's word perplexity on the committed text both ways (the float16 cache's cost in
quality).

    python benchmarks/cpu_long_context.py [--model GGUF] [--lengths 256,2048,4000] [--new 32] [--rounds 3]
        [--threads 2] [--no-llama] [--json OUT]
No figure is asserted; --json writes them with the machine, date and commit."""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cpu_common import fl_rate, git_commit  # noqa: E402


def llama_rate(llm, ids, new):
    import llama_cpp
    V = llm.n_vocab()
    ctx = llm._ctx.ctx
    llm.reset()
    llm.eval(ids)
    llama_cpp.llama_perf_context_reset(ctx)
    for _ in range(new):
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,))))
        llm.eval([tok])
    perf = llama_cpp.llama_perf_context(ctx)
    return perf.n_eval / (perf.t_eval_ms / 1e3)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a GGUF file (default: the demo model)")
    ap.add_argument("--lengths", default="256,2048,4000")
    ap.add_argument("--new", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-llama", action="store_true")
    ap.add_argument("--llama-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    ap.add_argument("--ppl_chars", type=int, default=8000)
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    os.environ["FASTLOAD_THREADS"] = str(a.threads)
    from fastload.demo import demo_model_path
    path = a.model or demo_model_path()
    lengths = [int(x) for x in a.lengths.split(",")]
    rng = np.random.default_rng(0)
    prompts = {L: rng.integers(100, 40000, size=L) for L in lengths}
    if a.llama_only:  # the child: llama.cpp alone in its process, one JSON line of medians and runs
        import llama_cpp
        llm = llama_cpp.Llama(model_path=path, n_threads=a.threads, n_threads_batch=a.threads,
                              n_ctx=max(lengths) + a.new + 64, verbose=False)
        out = {}
        for L in lengths:
            rs = [llama_rate(llm, prompts[L].tolist(), a.new) for _ in range(a.rounds)]
            out[L] = {"tok_s": statistics.median(rs), "runs": [round(x, 1) for x in rs]}
        print(json.dumps(out))
        return
    import fastload
    models = {}
    for kd in ("auto", "float16"):
        models[kd] = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", kv_cache_dtype=kd,
                                                                   kv_cache_memory=1 << 30)
    res = {}
    for L in lengths:
        ids = prompts[L]
        for m in models.values():
            m.generate(ids[None], max_new_tokens=2, eos_token_id=[])
        runs = {k: [] for k in models}
        for _ in range(a.rounds):
            for k, m in models.items():
                runs[k].append(fl_rate(m, ids[None], a.new))
        res[L] = {k: {"tok_s": statistics.median(v), "runs": [round(x, 1) for x in v]} for k, v in runs.items()}
        print(f"decode after {L} tokens (tok/s): " + ", ".join(f"{k} {v['tok_s']:.1f}" for k, v in res[L].items()),
              flush=True)
    if not a.no_llama:
        child = subprocess.run([sys.executable, os.path.abspath(__file__), "--llama-only", "--model", path,
                                "--lengths", a.lengths, "--new", str(a.new), "--rounds", str(a.rounds),
                                "--threads", str(a.threads)], capture_output=True, text=True)
        if child.returncode:
            print(f"llama.cpp not measured: {child.stderr.strip().splitlines()[-1:]}")
        else:
            lc = json.loads(child.stdout.strip().splitlines()[-1])
            for L in lengths:
                res[L]["llama.cpp"] = lc[str(L)]
                c = lc[str(L)]["tok_s"]
                print(f"decode after {L} tokens: llama.cpp {c:.1f} tok/s (runs {lc[str(L)]['runs']}); fastload float32 KV "
                      f"{res[L]['auto']['tok_s'] / c:.2f}x, float16 KV {res[L]['float16']['tok_s'] / c:.2f}x", flush=True)
    ppl = {}
    if a.ppl_chars:
        from fastload import evaluate
        text = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "devils_dictionary.txt"),
                    encoding="utf-8").read()[:a.ppl_chars]
        tok = fastload.AutoTokenizer.from_pretrained(path)
        for k, m in models.items():
            ppl[k] = evaluate.perplexity(m, tok, text, context=256)["word_perplexity"]
        print(f"word perplexity, first {a.ppl_chars} characters, context 256: float32 KV {ppl['auto']:.4f}, "
              f"float16 KV {ppl['float16']:.4f} ({100 * (ppl['float16'] / ppl['auto'] - 1):+.3f}%)")
    mem = {k: m.memory_stats() for k, m in models.items()}
    print("tokens the same 1 GiB pool holds: " + ", ".join(
        f"{k} {m.engine_stats()['n_pages'] * m.engine_stats()['page_tokens']}" for k, m in models.items()))
    if a.json:
        commit = git_commit()
        with open(a.json, "w") as f:
            json.dump({"model": path, "threads": a.threads, "new": a.new, "rounds": a.rounds,
                       "cpu": platform.processor() or platform.machine(), "date": time.strftime("%Y-%m-%d"),
                       "commit": commit, "decode": res, "word_perplexity": ppl,
                       "pool_tokens": {k: m.engine_stats()["n_pages"] * m.engine_stats()["page_tokens"]
                                       for k, m in models.items()},
                       "memory_stats": mem}, f, indent=1, default=str)


if __name__ == "__main__":
    main()
