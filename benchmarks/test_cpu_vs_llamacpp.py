"""CPU quantised decode and prompt processing against llama.cpp on the same GGUF and thread count
(benchmarks/cpu_quant_vs_llamacpp.py's measurement: fastload_rep, llama_rep). Skips without llama_cpp."""
from __future__ import annotations

import math
import os
import statistics

import numpy as np
import pytest


def test_cpu_quant_vs_llamacpp(record, demo_model, bench_full):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: no llama.cpp peer")
    import fastload
    from fastload import _C

    import cpu_quant_vs_llamacpp as q
    threads = min(2, os.cpu_count() or 1)
    n_gen, n_pp, reps = (128, 512, 5) if bench_full else (16, 64, 1)
    g = _C.GGUFFile(demo_model)
    file_tensor_bytes = sum(t[4] for t in g.tensors())
    g.close()
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_model, threads=threads)
    info = m._core.info
    llm = llama_cpp.Llama(model_path=demo_model, n_threads=threads, n_threads_batch=threads,
                          n_ctx=n_pp + n_gen + 64, n_batch=n_pp, verbose=False)
    try:
        prompt_ids = llm.tokenize(q.PROMPT.encode(), add_bos=False)
        pp_ids = np.random.default_rng(0).integers(100, llm.n_vocab() - 100, size=n_pp).tolist()
        q.fastload_rep(m, prompt_ids, pp_ids[:16], 2)  # warm-up, as the script
        q.llama_rep(llm, prompt_ids, pp_ids[:16], 2)
        fl_gen, fl_pp, ll_gen, ll_pp = [], [], [], []
        for _ in range(reps):
            a, b, fl_toks = q.fastload_rep(m, prompt_ids, pp_ids, n_gen)
            c, d, _og, _op, ll_toks = q.llama_rep(llm, prompt_ids, pp_ids, n_gen)
            fl_gen.append(a); fl_pp.append(b); ll_gen.append(c); ll_pp.append(d)
    finally:
        llm.close() if hasattr(llm, "close") else None
    same = 0
    while same < min(len(fl_toks), len(ll_toks)) and fl_toks[same] == ll_toks[same]:
        same += 1
    med = statistics.median
    record({"generation_tokens_per_s": med(fl_gen), "prompt_tokens_per_s": med(fl_pp),
            "weight_bytes": int(info["weight_bytes"]), "file_tensor_bytes": int(file_tensor_bytes),
            "quantized_weights": int(info.get("quantized_weights", 0)),
            "greedy_tokens_equal_before_first_difference": same},
           unit="tok/s", peer={"name": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                               "generation_tokens_per_s": med(ll_gen), "prompt_tokens_per_s": med(ll_pp)},
           config={"model": demo_model, "threads": threads, "generation_tokens": n_gen, "prompt_tokens": n_pp,
                   "reps": reps})
    # correctness: the GGUF really stays quantised (weights near the file's tensor bytes), both produced the asked
    # number of tokens, figures finite
    assert info.get("quantized_weights", 0) > 0
    assert int(info["weight_bytes"]) <= 1.1 * file_tensor_bytes
    assert len(fl_toks) == n_gen + 1 and len(ll_toks) == n_gen
    assert all(math.isfinite(x) and x > 0 for x in fl_gen + fl_pp + ll_gen + ll_pp)
    assert fl_toks[0] == ll_toks[0]  # the first greedy token of the same prompt agrees
