"""fastload against llama.cpp on the CPU with the same GGUF file and thread count (issue 9's CPU target).

    python benchmarks/cpu_quant_vs_llamacpp.py [--model F.gguf] [--threads 2] [--reps 5] [--out DIR]

Both libraries run in this one process, alternating rep by rep (fastload, llama.cpp, fastload, ...), so
both see the same machine load; medians are reported. Per rep:
  - generation: a short prompt (the same token ids for both), then 128 greedy tokens, eos ignored.
    fastload: generate(129 new tokens) - generate(1 new token), over 128 tokens. llama.cpp
    (llama-cpp-python): eval(prompt), then 128 x (argmax of the last logits, eval([token])), timed
    over the loop; llama.cpp's own counter (llama_perf_context: t_eval_ms / n_eval) is recorded too.
  - prompt processing: 512 token ids (fixed seed) into an empty cache. fastload: generate(1 new
    token) on them; llama.cpp: eval(ids) (its own t_p_eval_ms recorded too). tok/s = 512 / time.
  - resident weight memory: fastload's core.info["weight_bytes"] (every weight byte it holds) against
    the file's tensor bytes (sum of the GGUF tensors' sizes).
The issue's targets: generation >= 1.2x llama.cpp, prompt processing >= 1.0x, weights <= 1.1x the
file's tensor bytes. JSON goes to benchmarks/results/cpu-quant-vs-llamacpp-<date>/ (or --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import fastload  # noqa: E402
import fastload.demo  # noqa: E402
from fastload import _C  # noqa: E402

PROMPT = "The history of the printing press begins with"


def fastload_rep(m, prompt_ids, pp_ids, n_gen):
    ids = np.asarray(prompt_ids, np.int64)[None]
    kw = dict(do_sample=False, eos_token_id=None)
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
    t1 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=n_gen + 1, min_new_tokens=n_gen + 1, **kw)
    t2 = time.perf_counter()
    assert out.shape[1] == ids.shape[1] + n_gen + 1
    gen = n_gen / ((t2 - t1) - (t1 - t0))
    pp = np.asarray(pp_ids, np.int64)[None]
    t0 = time.perf_counter()
    m.generate(pp, max_new_tokens=1, min_new_tokens=1, **kw)
    pp_tps = pp.shape[1] / (time.perf_counter() - t0)
    return gen, pp_tps, out[0, ids.shape[1]:].tolist()


def llama_rep(llm, prompt_ids, pp_ids, n_gen):
    import llama_cpp
    V = llm.n_vocab()
    ctx = llm._ctx.ctx

    def last_logits():
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(V,))

    llm.reset()
    llm.eval(prompt_ids)
    llama_cpp.llama_perf_context_reset(ctx)
    toks = []
    t0 = time.perf_counter()
    for _ in range(n_gen):
        tok = int(np.argmax(last_logits()))
        toks.append(tok)
        llm.eval([tok])
    gen = n_gen / (time.perf_counter() - t0)
    perf = llama_cpp.llama_perf_context(ctx)
    own_gen = perf.n_eval / (perf.t_eval_ms / 1e3) if perf.t_eval_ms > 0 else None
    llm.reset()
    llama_cpp.llama_perf_context_reset(ctx)
    t0 = time.perf_counter()
    llm.eval(pp_ids)
    pp = len(pp_ids) / (time.perf_counter() - t0)
    perf = llama_cpp.llama_perf_context(ctx)
    own_pp = perf.n_p_eval / (perf.t_p_eval_ms / 1e3) if perf.t_p_eval_ms > 0 else None
    return gen, pp, own_gen, own_pp, toks


def compare(m, llm, prompt_ids, pp_ids, n_gen, reps, warm=64, log=print):
    """Warm both, then `reps` alternating reps (fastload, llama.cpp, ...): lists of tokens/s per rep, llama.cpp's own
    counters, the greedy tokens of the first rep and how many agree before the first difference. Shared with
    benchmarks/test_cpu_vs_llamacpp.py."""
    fastload_rep(m, prompt_ids, pp_ids[:warm], 4)  # page cache, first-call allocations
    llama_rep(llm, prompt_ids, pp_ids[:warm], 4)
    r = {k: [] for k in ("fl_gen", "fl_pp", "ll_gen", "ll_pp", "ll_own_gen", "ll_own_pp")}
    r["same_tokens"] = None
    for rep in range(reps):
        g1, p1, fl_toks = fastload_rep(m, prompt_ids, pp_ids, n_gen)
        g2, p2, og, op, ll_toks = llama_rep(llm, prompt_ids, pp_ids, n_gen)
        for k, v in zip(("fl_gen", "fl_pp", "ll_gen", "ll_pp", "ll_own_gen", "ll_own_pp"), (g1, p1, g2, p2, og, op)):
            r[k].append(v)
        if r["same_tokens"] is None:  # how many greedy tokens agree before the first difference
            k = 0
            while k < min(len(fl_toks), len(ll_toks)) and fl_toks[k] == ll_toks[k]:
                k += 1
            r["same_tokens"], r["fl_tokens"], r["ll_tokens"] = k, fl_toks, ll_toks
        log(f"rep {rep}: generation fastload {g1:7.1f} llama.cpp {g2:7.1f} tok/s | "
            f"prompt {len(pp_ids)}: fastload {p1:7.1f} llama.cpp {p2:7.1f} tok/s")
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the demo model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import llama_cpp

    path = a.model or fastload.demo.demo_model_path()
    g = _C.GGUFFile(path)
    file_tensor_bytes = sum(t[4] for t in g.tensors())
    types = sorted({t[1] for t in g.tensors()})
    g.close()

    m = fastload.AutoModelForCausalLM.from_pretrained(path, threads=a.threads)
    info = m._core.info
    llm = llama_cpp.Llama(model_path=path, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=a.pp + a.gen + 64,
                          n_batch=a.pp, verbose=False)
    prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False)
    V = llm.n_vocab()
    pp_ids = np.random.default_rng(0).integers(100, V - 100, size=a.pp).tolist()

    r = compare(m, llm, prompt_ids, pp_ids, a.gen, a.reps)
    fl_gen, fl_pp, ll_gen, ll_pp = r["fl_gen"], r["fl_pp"], r["ll_gen"], r["ll_pp"]
    ll_own_gen, ll_own_pp, same_tokens = r["ll_own_gen"], r["ll_own_pp"], r["same_tokens"]

    med = statistics.median
    res = {
        "date": datetime.date.today().isoformat(),
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "simd": fastload.info().get("simd") if hasattr(fastload, "info") else None,
        "threads": a.threads, "model": path, "gguf_types": types,
        "fastload_commit": subprocess.run(["git", "-C", HERE, "rev-parse", "HEAD"], capture_output=True,
                                          text=True).stdout.strip(),
        "llama_cpp_python": llama_cpp.__version__,
        "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode(errors="replace"),
        "generation_tokens": a.gen, "prompt_tokens_generation": len(prompt_ids), "prompt_processing_tokens": a.pp,
        "reps": a.reps,
        "fastload": {"generation_tok_s": fl_gen, "prompt_tok_s": fl_pp,
                     "generation_median": med(fl_gen), "prompt_median": med(fl_pp)},
        "llama_cpp": {"generation_tok_s": ll_gen, "prompt_tok_s": ll_pp,
                      "generation_median": med(ll_gen), "prompt_median": med(ll_pp),
                      "own_counter_generation_tok_s": ll_own_gen, "own_counter_prompt_tok_s": ll_own_pp},
        "ratio_generation": med(fl_gen) / med(ll_gen), "ratio_prompt": med(fl_pp) / med(ll_pp),
        "greedy_tokens_equal_before_first_difference": same_tokens,
        "fastload_weight_bytes": int(info["weight_bytes"]),
        "fastload_quantized_bytes": int(info.get("quantized_bytes", 0)),
        "fastload_float_bytes": int(info.get("float_bytes", 0)),
        "file_tensor_bytes": int(file_tensor_bytes),
        "weight_bytes_over_file": int(info["weight_bytes"]) / file_tensor_bytes,
        "load_avg_1min": os.getloadavg()[0],
    }
    print(f"\n{'':24s}{'fastload':>12s}{'llama.cpp':>12s}{'ratio':>8s}  target")
    print(f"{'generation tok/s':24s}{med(fl_gen):12.1f}{med(ll_gen):12.1f}{res['ratio_generation']:8.2f}  >= 1.2")
    print(f"{'prompt %d tok/s' % a.pp:24s}{med(fl_pp):12.1f}{med(ll_pp):12.1f}{res['ratio_prompt']:8.2f}  >= 1.0")
    print(f"{'weights MB':24s}{info['weight_bytes'] / 1e6:12.1f}{file_tensor_bytes / 1e6:12.1f}"
          f"{res['weight_bytes_over_file']:8.3f}  <= 1.1 (file's tensor bytes)")
    def med_or_none(xs):
        xs = [x for x in xs if x]
        return f"{med(xs):.1f}" if xs else "n/a"
    print(f"llama.cpp's own counters (median): generation {med_or_none(ll_own_gen)}, prompt {med_or_none(ll_own_pp)} "
          f"tok/s; greedy tokens equal before the first difference: {same_tokens}")
    out = a.out or os.path.join(HERE, "results", f"cpu-quant-vs-llamacpp-{res['date']}")
    os.makedirs(out, exist_ok=True)
    fn = os.path.join(out, f"result-{datetime.datetime.now().strftime('%H%M%S')}.json")
    with open(fn, "w") as f:
        json.dump(res, f, indent=1)
    print("wrote", fn)


if __name__ == "__main__":
    main()
