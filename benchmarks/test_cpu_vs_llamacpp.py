"""CPU quantised decode and prompt processing against llama.cpp on the same GGUF and thread count
(benchmarks/cpu_quant_vs_llamacpp.py's measurement: run_file, llama.cpp in a child process). Skips without llama_cpp."""
from __future__ import annotations

import math
import os
import statistics

import pytest


def test_cpu_quant_vs_llamacpp(record, demo_model, bench_full):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: no llama.cpp peer")
    from fastload import _C

    import cpu_quant_vs_llamacpp as q
    threads = min(2, os.cpu_count() or 1)
    n_gen, n_pp, reps = (128, 512, 5) if bench_full else (16, 64, 1)
    g = _C.GGUFFile(demo_model)
    file_tensor_bytes = sum(t[4] for t in g.tensors())
    g.close()
    info, r = q.run_file(demo_model, threads, n_gen, n_pp, reps)
    fl_gen, fl_pp, ll_gen, ll_pp = r["fl_gen"], r["fl_pp"], r["ll_gen"], r["ll_pp"]
    fl_toks, ll_toks, same = r["fl_tokens"], r["ll_tokens"], r["same_tokens"]
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


@pytest.mark.parametrize("gtype", ["Q4_K_M", "Q6_K", "Q4_0"])
def test_cpu_gguf_types_vs_llamacpp(record, bench_full, tmp_path_factory, gtype):
    """Each GGUF type on a random-weight model of a real shape (benchmarks/cpu_gguf_types.py: TinyLlama-1.1B's at full
    size, a 1024-wide 8-layer one otherwise), quantised by llama.cpp's own quantiser, against llama.cpp."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python not installed: no llama.cpp peer")
    import cpu_gguf_types as gt
    import cpu_quant_vs_llamacpp as q
    shape = "tinyllama" if bench_full else "small"
    n_gen, n_pp, reps = (48, 128, 3) if bench_full else (16, 64, 1)
    threads = min(2, os.cpu_count() or 1)
    work = os.environ.get("FASTLOAD_BENCH_GGUF_DIR") or str(tmp_path_factory.getbasetemp() / "gguf-types")
    os.makedirs(work, exist_ok=True)
    src, path = os.path.join(work, f"{shape}-F16.gguf"), os.path.join(work, f"{shape}-{gtype}.gguf")
    if not os.path.exists(src):
        gt.write_source(src, shape)
    if not os.path.exists(path):
        gt.quantise(src, path, gtype, threads)
    counts, file_bytes = gt.tensor_types(path)
    info, r = q.run_file(path, threads, n_gen, n_pp, reps)
    med = statistics.median
    record({"generation_tokens_per_s": med(r["fl_gen"]), "prompt_tokens_per_s": med(r["fl_pp"]),
            "weight_bytes": int(info["weight_bytes"]), "file_tensor_bytes": int(file_bytes)},
           unit="tok/s", peer={"name": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
                               "generation_tokens_per_s": med(r["ll_gen"]), "prompt_tokens_per_s": med(r["ll_pp"])},
           config={"type": gtype, "shape": shape, "tensor_types": counts, "threads": threads,
                   "generation_tokens": n_gen, "prompt_tokens": n_pp, "reps": reps})
    assert info.get("quantized_weights", 0) > 0          # kept quantised
    assert len(r["fl_tokens"]) == n_gen + 1 and len(r["ll_tokens"]) == n_gen
    assert all(math.isfinite(x) and x > 0 for x in r["fl_gen"] + r["fl_pp"] + r["ll_gen"] + r["ll_pp"])
