"""CPU decode speed next to this machine's memory-bandwidth bound, with transformers as the peer: the functions of
benchmarks/test_cpu_decode.py, which measures and records (`python -m pytest benchmarks -k cpu_decode`).

    python benchmarks/cpu_decode.py [pytest options]     # = that benchmark at full size (benchmarks/suite.py)

For each model: tokens/s of batch-1 greedy decode (prompt of 32 tokens, 128 new tokens, eos off),
the bytes of weights (+ KV cache) read per token, the bound = read bandwidth / bytes per token, and
the share of the bound reached. The peer runs in a separate interpreter (fastload itself never
imports torch): FASTLOAD_BENCH_PEER_PYTHON names one with torch + transformers, else this one when it has them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
import fastload  # noqa: E402
from fastload import arch as archmod  # noqa: E402

PEER = r'''
import json, sys, time, torch, transformers
path, gguf, dtype, T, N, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
kw = {"gguf_file": gguf} if gguf != "-" else {}
m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), **kw).eval()
V = m.config.vocab_size
ids = torch.randint(3, V - 1, (1, T), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    m.generate(ids, max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    t0 = time.perf_counter()
    out = m.generate(ids, max_new_tokens=N, min_new_tokens=N, do_sample=False, eos_token_id=None, pad_token_id=0)
    dt = time.perf_counter() - t0
print(json.dumps({"tokens_per_s": (out.shape[1] - T) / dt, "torch": torch.__version__, "transformers": transformers.__version__}))
'''


def membw(nbytes=1 << 30):
    """Read bandwidth in GB/s: benchmarks/membw.c (OpenMP sum over `nbytes`), or, where no C compiler with
    OpenMP is at hand, numpy summing the same array (single-threaded: a lower ceiling)."""
    return membw_info(nbytes)["read_GBps"]


def membw_info(nbytes=1 << 30):
    """{"read_GBps", "how"}: the ceiling of CPU decode (shared with benchmarks/test_cpu_decode.py)."""
    exe = os.path.join(tempfile.gettempdir(), f"fastload_membw_{os.getuid()}")
    try:
        if not os.path.exists(exe) or os.path.getmtime(exe) < os.path.getmtime(os.path.join(HERE, "membw.c")):
            subprocess.run(["cc", "-O3", "-march=native", "-fopenmp", os.path.join(HERE, "membw.c"), "-o", exe],
                           check=True, capture_output=True)
        r = json.loads(subprocess.check_output([exe, str(int(nbytes))]))
        return {"read_GBps": r["read_GBps"], "how": f"benchmarks/membw.c, {r['threads']} OpenMP threads, "
                                                    f"{nbytes >> 20} MiB, best of 10"}
    except (OSError, subprocess.CalledProcessError, ValueError):
        a = np.ones(int(nbytes) // 4, np.float32)
        best = min(_timed(a.sum) for _ in range(5))
        return {"read_GBps": a.nbytes / best / 1e9, "how": f"numpy float32 sum of {nbytes >> 20} MiB, best of 5 "
                                                           "(no C compiler with OpenMP)"}


def _timed(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bytes_per_token(model, ctx):
    c = archmod.core_config(model.config, model.arch, model.name_or_path)
    esz = {"float16": 2, "bfloat16": 2, "float32": 4}[model.dtype]
    w = model.get_memory_footprint()
    if not c["tie_embeddings"]:
        w -= c["vocab"] * c["d"] * esz  # the embedding table is gathered, not streamed
    kv = 2 * c["n_layers"] * c["n_kv_heads"] * c["head_dim"] * 4 * ctx  # float32 KV cache on the CPU
    return w + kv


def run_fastload(path, dtype, T, N):
    t0 = time.perf_counter()
    model = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype=dtype, progress=False)
    load_s = time.perf_counter() - t0
    V = model.config["vocab_size"]
    ids = np.random.default_rng(0).integers(3, V - 1, size=(1, T))
    model.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm-up
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=N, eos_token_id=[])
    dt = time.perf_counter() - t0
    # prefill share: time a 1-token generation of the same prompt and subtract it
    t1 = time.perf_counter()
    model.generate(ids, max_new_tokens=1, eos_token_id=[])
    prefill = time.perf_counter() - t1
    n = out.shape[1] - T
    decode_tps = (n - 1) / max(dt - prefill, 1e-9)
    return model, {"load_s": load_s, "tokens_per_s_e2e": n / dt, "decode_tokens_per_s": decode_tps,
                   "prefill_s": prefill, "new_tokens": n}


def run_peer(python, path, dtype, T, N, threads):
    """transformers' decode tokens/s on the same checkpoint, in a separate interpreter `python` (torch never enters
    fastload's process); {"error": ...} when it fails."""
    d, g = (os.path.dirname(path), os.path.basename(path)) if path.endswith(".gguf") else (path, "-")
    peer_dtype = "float32" if path.endswith(".gguf") else dtype
    try:
        pr = json.loads(subprocess.check_output([python, "-c", PEER, d, g, peer_dtype, str(T), str(N), str(threads)],
                                                stderr=subprocess.DEVNULL).decode().strip().splitlines()[-1])
        return {"name": "transformers", "dtype": peer_dtype, **pr}
    except (OSError, subprocess.CalledProcessError, ValueError, IndexError) as e:
        return {"error": str(e)}


if __name__ == "__main__":
    import suite
    suite.main("test_cpu_decode.py")
