"""The CPU backend's attention alone (csrc/cpu/cpu_attention.c) and a prompt through the whole demo model, on this
machine's cores. A prompt chunk of T queries over L cached keys of the demo model's shape (9 heads, 3 KV heads, head
size 64), timed through fastload._C.run_op, best of 7; then time to first token of 512- and 2048-token prompts of the
demo model (prefix caching off, fresh ids each time, best of 2) and 128 generated tokens, as the README reports.

    python benchmarks/cpu_attention.py [--T 512] [--L 2048] [--no-model]
    python benchmarks/cpu_attention.py --decode 32,256,1024,2048,4000   # decode ms a token by context length
"""
import argparse
import os
import time

import numpy as np


def attention_ms(T, L, nh=9, nkv=3, hd=64, reps=7):
    from fastload import _C
    rng = np.random.default_rng(0)
    qkv = rng.standard_normal((T, (nh + 2 * nkv) * hd), dtype=np.float32)
    kc = rng.standard_normal((1, L, nkv, hd), dtype=np.float32)
    vc = rng.standard_normal((1, L, nkv, hd), dtype=np.float32)
    args = {"B": 1, "T": T, "start": L - T, "n_heads": nh, "n_kv_heads": nkv, "scale": hd ** -0.5, "act": "float32"}
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        _C.run_op("cpu", "attention", {"qkv": qkv, "k_cache": kc, "v_cache": vc}, args)
        ts.append(time.perf_counter() - t)
    return min(ts) * 1e3


def prompt_times():
    import fastload
    from fastload.demo import demo_model_path
    os.environ["FASTLOAD_PREFIX_CACHING"] = "0"
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_model_path(), device_map="cpu")
    rng = np.random.default_rng(0)
    m.generate(rng.integers(100, 40000, size=(1, 64)), max_new_tokens=1)
    out = {}
    for T in (512, 2048):
        ts = []
        for _ in range(2):
            ids = rng.integers(100, 40000, size=(1, T))
            t = time.perf_counter()
            m.generate(ids, max_new_tokens=1, min_new_tokens=1, eos_token_id=None)
            ts.append(time.perf_counter() - t)
        out[T] = min(ts)
    ids = rng.integers(100, 40000, size=(1, 16))
    t = time.perf_counter()
    m.generate(ids, max_new_tokens=129, min_new_tokens=129, eos_token_id=None)
    out["gen129"] = time.perf_counter() - t
    return out


def decode_times(lengths, new=65, rounds=4):
    """Batch-1 decode of the demo model after a prompt of each length: ms a token (TTFT subtracted; the prompt's pages
    are reused, so only decode is timed), the decode attention path (key chunks, all heads an item) against the
    general kernel (FASTLOAD_CPU_ATT_GENERAL=1) alternately in this process, median of `rounds` each."""
    import fastload
    from fastload.demo import demo_model_path
    os.environ["FASTLOAD_PREFIX_CACHING"] = "1"
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_model_path(), device_map="cpu")
    rng = np.random.default_rng(0)
    out = {}
    for L in lengths:
        ids = rng.integers(100, 40000, size=(1, L))
        m.generate(ids, max_new_tokens=2, eos_token_id=[])
        res = {"decode": [], "general": []}
        for _ in range(rounds):
            for mode in res:
                if mode == "general":
                    os.environ["FASTLOAD_CPU_ATT_GENERAL"] = "1"
                else:
                    os.environ.pop("FASTLOAD_CPU_ATT_GENERAL", None)
                t = time.perf_counter()
                m.generate(ids, max_new_tokens=1, eos_token_id=[])
                ttft = time.perf_counter() - t
                t = time.perf_counter()
                m.generate(ids, max_new_tokens=new, eos_token_id=[])
                res[mode].append((time.perf_counter() - t - ttft) / (new - 1) * 1e3)
        os.environ.pop("FASTLOAD_CPU_ATT_GENERAL", None)
        out[L] = {k: float(np.median(v)) for k, v in res.items()}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=512)
    ap.add_argument("--L", type=int, default=2048)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--decode", default="", help="comma list of context lengths: decode ms a token at each, the "
                                                  "decode attention path against the general kernel")
    a = ap.parse_args()
    if a.decode:
        for L, r in decode_times([int(x) for x in a.decode.split(",")]).items():
            print(f"decode after {L} tokens: {r['decode']:.2f} ms a token ({1e3 / r['decode']:.1f} tok/s); general "
                  f"attention kernel {r['general']:.2f} ms ({r['general'] / r['decode']:.2f}x)")
        return
    print(f"attention, {a.T} queries over {a.L} keys (9 heads / 3 KV heads, head size 64): {attention_ms(a.T, a.L):.1f} ms")
    if not a.no_model:
        r = prompt_times()
        print(f"demo model: 512-token prompt {r[512]:.2f} s ({512 / r[512]:.0f} tok/s), 2048-token prompt {r[2048]:.2f} s "
              f"({2048 / r[2048]:.0f} tok/s), 16-token prompt + 129 tokens {r['gen129']:.2f} s")


if __name__ == "__main__":
    main()
