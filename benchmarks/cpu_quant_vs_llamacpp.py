"""fastload against llama.cpp on the CPU with the same GGUF file and thread count (issue 9's CPU target): the
functions of benchmarks/test_cpu_vs_llamacpp.py, which measures and records (`python -m pytest benchmarks -k
llamacpp`; skips without llama-cpp-python).

    python benchmarks/cpu_quant_vs_llamacpp.py [pytest options]   # = that benchmark at full size (benchmarks/suite.py)

llama.cpp runs first in a child process of its own, then fastload in this one (never both in one process: their
thread pools slowed each other up to 2x on 2 cores); medians are reported. Per rep:
  - generation: a short prompt (the same token ids for both), then 128 greedy tokens, eos ignored.
    fastload: generate(129 new tokens) - generate(1 new token), over 128 tokens. llama.cpp
    (llama-cpp-python): eval(prompt), then 128 x (argmax of the last logits, eval([token])), timed
    over the loop; llama.cpp's own counter (llama_perf_context: t_eval_ms / n_eval) is recorded too.
  - prompt processing: 512 token ids (fixed seed) into an empty cache. fastload: generate(1 new
    token) on them, prefix caching off (run_file()); llama.cpp: eval(ids) (its own t_p_eval_ms recorded too). tok/s = 512 / time.
  - resident weight memory: fastload's core.info["weight_bytes"] (every weight byte it holds) against
    the file's tensor bytes (sum of the GGUF tensors' sizes).
The issue's targets: generation >= 1.2x llama.cpp, prompt processing >= 1.0x, weights <= 1.1x the
file's tensor bytes.
"""
from __future__ import annotations

import time

import numpy as np

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


def llama_measure(path, threads, n_gen, n_pp, reps, warm=16):
    """llama.cpp alone (run_file calls this in a child process): the prompt's ids from its tokenizer, n_pp random ids
    (fixed seed), a warm-up, then `reps` reps: tok/s lists, its own counters, the greedy tokens of the first rep."""
    import llama_cpp
    llm = llama_cpp.Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=n_pp + n_gen + 64,
                          n_batch=n_pp, verbose=False)
    try:
        prompt_ids = llm.tokenize(PROMPT.encode(), add_bos=False)
        pp_ids = np.random.default_rng(0).integers(100, llm.n_vocab() - 100, size=n_pp).tolist()
        llama_rep(llm, prompt_ids, pp_ids[:warm], 4)
        r = {"prompt_ids": prompt_ids, "pp_ids": pp_ids, "ll_gen": [], "ll_pp": [], "ll_own_gen": [], "ll_own_pp": []}
        for rep in range(reps):
            g, p, og, op, toks = llama_rep(llm, prompt_ids, pp_ids, n_gen)
            for k, v in zip(("ll_gen", "ll_pp", "ll_own_gen", "ll_own_pp"), (g, p, og, op)):
                r[k].append(v)
            if rep == 0:
                r["ll_tokens"] = toks
    finally:
        if hasattr(llm, "close"):
            llm.close()
    return r


def run_file(path, threads, n_gen, n_pp, reps, warm=16, log=print):
    """The GGUF at `path` in llama.cpp (a child process of its own, first) and then in fastload (this process), with
    `threads` threads each, on the same short prompt and n_pp random prompt ids: (fastload's core.info, a dict of
    tok/s lists per rep, llama.cpp's own counters, the greedy tokens of the first rep of each and how many agree before
    the first difference). Shared by benchmarks/test_cpu_vs_llamacpp.py and benchmarks/cpu_gguf_types.py.

    Never both in one process: until 2026-12-05 they alternated rep by rep in one, and on the 2-core dev VM the two
    thread pools slowed each other (fastload 144 -> 76 tok/s at 256 tokens of context once llama.cpp had run, llama.cpp
    73 against 91 alone; benchmarks/results/cpu-kv-f16-2026-12-05/). fastload's prefix caching is off: the same prompt
    ids come back every rep, and it would take them from its shared pages instead of reading them."""
    import json
    import os
    import subprocess
    import sys

    import fastload
    here = os.path.dirname(os.path.abspath(__file__))
    code = (f"import json, sys; sys.path.insert(0, {here!r}); import cpu_quant_vs_llamacpp as q; "
            f"print(json.dumps(q.llama_measure({path!r}, {threads}, {n_gen}, {n_pp}, {reps}, {warm})))")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if child.returncode:
        raise RuntimeError(f"llama.cpp child process failed on {path}: {child.stderr.strip()[-2000:]}")
    r = json.loads(child.stdout.strip().splitlines()[-1])
    prompt_ids, pp_ids = r.pop("prompt_ids"), r.pop("pp_ids")
    m = fastload.AutoModelForCausalLM.from_pretrained(path, threads=threads, prefix_caching=False)
    info = m._core.info
    fastload_rep(m, prompt_ids, pp_ids[:warm], 4)  # page cache, first-call allocations
    r["fl_gen"], r["fl_pp"] = [], []
    for rep in range(reps):
        g, p, toks = fastload_rep(m, prompt_ids, pp_ids, n_gen)
        r["fl_gen"].append(g)
        r["fl_pp"].append(p)
        if rep == 0:
            r["fl_tokens"] = toks
        log(f"rep {rep}: generation fastload {g:7.1f} (llama.cpp {r['ll_gen'][rep]:7.1f}) tok/s | prompt {len(pp_ids)}: "
            f"fastload {p:7.1f} (llama.cpp {r['ll_pp'][rep]:7.1f}) tok/s")
    k, fl_toks, ll_toks = 0, r["fl_tokens"], r["ll_tokens"]
    while k < min(len(fl_toks), len(ll_toks)) and fl_toks[k] == ll_toks[k]:
        k += 1
    r["same_tokens"] = k
    return info, r


if __name__ == "__main__":
    import suite
    suite.main("test_cpu_vs_llamacpp.py")
