"""Many callers on one model (issue 11): the engine's continuous batching against a for-loop, one batched generate
call through the same engine and (optionally) transformers, on token ids (synthetic checkpoints have no tokenizer;
every request ignores eos so all produce their full length).

    python benchmarks/engine_bench.py --model DIR [--device cuda] [--dtype bfloat16] [--out results.json]
        [--scenarios single,seed,many,mixed,prefix] [--peer]

Scenarios (each prints its figures next to what it is compared with):
  single  one caller, one request: decode tok/s through the engine, next to the decode roofline on CUDA (the
          device-to-device copy rate over the weights' bytes, benchmarks/gpu_bench.py) where torch is there to
          measure the copy rate. (Until 2026-12-01 it was compared with the pre-engine one-call loop, since removed:
          single 100.3% of it on the H200, benchmarks/results/issue11-2026-12-01-h200/.)
  seed    the ChatGLM2 field report: 5 requests in a for-loop against 5 threads (target: threads <= 0.35x loop).
  many    64 requests of 256 new tokens from 32 threads: aggregate tok/s against one batched generate call of the
          same shape (64 rows; target >= 85%) and the for-loop (target >= 8x; the loop is timed on --loop_sample
          requests and scaled). 32 blocking callers have at most 32 requests in flight, so they are also timed
          against two batched calls of 32 rows, and a third form has each thread keep two in flight (a 2-row
          generate a thread: 64 in flight, as in the batched call).
  mixed   256 requests, prompts 32..4096 tokens, outputs 16..512, all submitted at once: throughput, time to first
          token and inter-token latency percentiles; then TTFT of one new request while 31 others decode against
          its TTFT alone (target <= 2x).
  prefix  32 requests sharing a 1000-token system prompt: pages used against one prompt plus their own tokens
          (target <= 1.2x).
  forward one streaming request decoding while a long forward (model(ids), --forward_tokens) runs beside it, under
          each --forward_chunks setting of prefill_chunk (65536: the forward in one pass, as before 2026-12-04):
          the request's longest gap between two tokens during the forward against its median gap alone, and the
          forward's time against its time alone.
  preempt requests from threads in a pool holding about half of their tokens, so the newest are preempted and read
          again, under each preemption_mode (replay: the generated tokens fed back through decode steps; recompute:
          read as a prompt): wall time, preemptions, replayed tokens, and how many greedy answers differ from the
          same request alone (replay: none by construction; recompute: near-ties may flip).
No figure is asserted; the JSON records them with the device, date and commit."""
import argparse
import json
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np



def ids_for(rng, vocab, n):
    return rng.integers(100, vocab - 100, size=n).astype(np.int64)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def sync(model):
    if str(model.device).startswith("cuda"):
        import fastload
        fastload.cuda.synchronize()


def gen(model, ids, n):
    return model.generate(ids[None], max_new_tokens=n, eos_token_id=[])  # no eos: every request runs its n tokens


def scenario_single(m, rng, V, args, res):
    p = ids_for(rng, V, 32)
    n = args.single_tokens
    gen(m, p, 8)
    ts = []
    for _ in range(3):
        _, t = timed(lambda: gen(m, p, n))
        _, t1 = timed(lambda: gen(m, p, 1))  # prefill + first token, subtracted
        ts.append((n - 1) / max(t - t1, 1e-9))
    r = {"new_tokens": n, "decode_tok_s": statistics.median(ts)}
    if str(m.device).startswith("cuda"):
        try:
            import gpu_bench
            bw = gpu_bench.d2d_bandwidth()
            r["roofline_tok_s"] = gpu_bench.roofline_fn(m, bw)(32 + n // 2)
            r["d2d_gb_s"] = bw / 1e9
        except Exception as e:  # noqa: BLE001 - no torch here: the figure alone
            r["roofline_note"] = f"not measured: {type(e).__name__}: {e}"
    res["single"] = r
    print(f"single caller, decode {n} tokens: engine {r['decode_tok_s']:.1f} tok/s" +
          (f", roofline {r['roofline_tok_s']:.1f} ({100 * r['decode_tok_s'] / r['roofline_tok_s']:.1f}%)"
           if "roofline_tok_s" in r else ""), flush=True)


def scenario_seed(m, rng, V, args, res):
    qs = [ids_for(rng, V, int(rng.integers(20, 40))) for _ in range(5)]
    n = args.seed_tokens
    loop_out, loop_t = timed(lambda: [gen(m, q, n) for q in qs])
    with ThreadPoolExecutor(5) as ex:
        pool_out, pool_t = timed(lambda: list(ex.map(lambda q: gen(m, q, n), qs)))
    same = all(np.array_equal(a, b) for a, b in zip(loop_out, pool_out))
    res["seed"] = {"queries": 5, "new_tokens": n, "loop_s": loop_t, "threads_s": pool_t, "ratio": pool_t / loop_t,
                   "target_ratio": 0.35, "same_tokens": same}
    print(f"seed scenario (5 x {n} tokens): for-loop {loop_t:.2f} s, 5 threads {pool_t:.2f} s -> {pool_t / loop_t:.3f}x "
          f"(target <= 0.35x; FastLLM 0.68x, transformers 1.14x in the report); same tokens: {same}", flush=True)


def scenario_many(m, rng, V, args, res):
    N, n, W = 64, args.many_tokens, 32
    ps = [ids_for(rng, V, 64) for _ in range(N)]
    batch = np.stack(ps)
    _, t_batch = timed(lambda: m.generate(batch, max_new_tokens=n, eos_token_id=[]))
    # 32 blocking callers have at most 32 requests in flight: the same 64 requests as two batched calls of 32 rows
    _, t_batch32 = timed(lambda: [m.generate(batch[i:i + W], max_new_tokens=n, eos_token_id=[]) for i in (0, W)])
    with ThreadPoolExecutor(W) as ex:
        _, t_threads = timed(lambda: list(ex.map(lambda p: gen(m, p, n), ps)))
    # the same 32 threads, each with two requests in flight (one generate call of 2 rows a thread: the engine takes
    # every row as its own request): the concurrency one batched call of 64 has, supplied by the callers
    with ThreadPoolExecutor(W) as ex:
        _, t_threads2 = timed(lambda: list(ex.map(
            lambda i: m.generate(batch[2 * i:2 * i + 2], max_new_tokens=n, eos_token_id=[]), range(W))))
    k = args.loop_sample
    _, t_loop_k = timed(lambda: [gen(m, p, n) for p in ps[:k]])
    t_loop = t_loop_k * N / k
    tot = N * n
    r = {"requests": N, "new_tokens": n, "threads": W, "threads_tok_s": tot / t_threads,
         "one_batched_call_tok_s": tot / t_batch,
         "two_batched_calls_of_32_tok_s": tot / t_batch32, "vs_two_batched_calls_of_32": t_batch32 / t_threads,
         "loop_tok_s_est": tot / t_loop, "loop_sample": k, "vs_batched_call": t_batch / t_threads,
         "vs_loop": t_loop / t_threads, "targets": {"vs_batched_call": 0.85, "vs_loop": 8},
         "threads_two_in_flight_tok_s": tot / t_threads2, "two_in_flight_vs_batched_call": t_batch / t_threads2}
    res["many"] = r
    print(f"64 x {n} from 32 threads: {r['threads_tok_s']:.0f} tok/s; one batched generate of 64 rows "
          f"{r['one_batched_call_tok_s']:.0f} tok/s -> {100 * r['vs_batched_call']:.1f}% (target >= 85%); two batched "
          f"calls of 32 rows {r['two_batched_calls_of_32_tok_s']:.0f} tok/s -> {100 * r['vs_two_batched_calls_of_32']:.1f}%; "
          f"32 threads with 2 requests in flight each {r['threads_two_in_flight_tok_s']:.0f} tok/s -> "
          f"{100 * r['two_in_flight_vs_batched_call']:.1f}% of the batched call; for-loop (est. from {k}) "
          f"{r['loop_tok_s_est']:.0f} tok/s -> {r['vs_loop']:.1f}x (target >= 8x)", flush=True)


def _ttft_itl(m, p, n):
    """Time to first token and the gaps between later tokens of one request, from its token stream."""
    core = m._engine_handle().core()
    t0 = time.perf_counter()
    r = core.engine_submit(p.astype(np.int32), max_new_tokens=n, eos_token_ids=[])
    stamps, have = [], 0
    while True:
        k, done = r.wait(have)
        now = time.perf_counter()
        stamps += [now] * (k - have)
        have = k
        if done:
            break
    r.check()
    return stamps[0] - t0, np.diff(stamps).tolist(), stamps[-1] - t0


def scenario_mixed(m, rng, V, args, res):
    N = args.mixed_requests
    lens = np.exp(rng.uniform(np.log(32), np.log(4096), N)).astype(int)
    outs = np.exp(rng.uniform(np.log(16), np.log(512), N)).astype(int)
    ps = [ids_for(rng, V, int(L)) for L in lens]
    results = [None] * N

    def one(i):
        results[i] = _ttft_itl(m, ps[i], int(outs[i]))
    t0 = time.perf_counter()
    ths = [threading.Thread(target=one, args=(i,)) for i in range(N)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] for r in results]
    itl = [x for r in results for x in r[1]]
    pct = lambda xs, q: float(np.percentile(xs, q)) * 1e3
    r = {"requests": N, "prompt_tokens": int(lens.sum()), "new_tokens": int(outs.sum()), "wall_s": wall,
         "output_tok_s": float(outs.sum()) / wall, "total_tok_s": float(lens.sum() + outs.sum()) / wall,
         "ttft_ms": {q: pct(ttft, q) for q in (50, 90, 99)}, "itl_ms": {q: pct(itl, q) for q in (50, 90, 99)}}
    # TTFT of one 1024-token request alone, and while 31 others decode (fresh prompts: no shared pages)
    alone = statistics.median([_ttft_itl(m, ids_for(rng, V, 1024), 4)[0] for _ in range(3)])
    stop = threading.Event()
    bg = [ids_for(rng, V, 128) for _ in range(31)]
    core = m._engine_handle().core()
    reqs = [core.engine_submit(q.astype(np.int32), max_new_tokens=4000, eos_token_ids=[]) for q in bg]
    for q in reqs:
        q.wait(0)  # every one is decoding
    busy = statistics.median([_ttft_itl(m, ids_for(rng, V, 1024), 4)[0] for _ in range(3)])
    for q in reqs:
        q.cancel()
    for q in reqs:
        q.wait(1 << 30)
    stop.set()
    r["ttft_1024_alone_ms"] = alone * 1e3
    r["ttft_1024_with_31_decoding_ms"] = busy * 1e3
    r["ttft_ratio"] = busy / alone
    r["target_ttft_ratio"] = 2.0
    res["mixed"] = r
    print(f"mixed {N} requests ({r['prompt_tokens']} prompt + {r['new_tokens']} new tokens): {wall:.1f} s, "
          f"{r['output_tok_s']:.0f} output tok/s; TTFT p50/p90/p99 {r['ttft_ms'][50]:.0f}/{r['ttft_ms'][90]:.0f}/"
          f"{r['ttft_ms'][99]:.0f} ms; ITL p50/p90/p99 {r['itl_ms'][50]:.1f}/{r['itl_ms'][90]:.1f}/{r['itl_ms'][99]:.1f} ms; "
          f"TTFT of 1024 tokens alone {alone * 1e3:.1f} ms, with 31 decoding {busy * 1e3:.1f} ms "
          f"-> {busy / alone:.2f}x (target <= 2x)", flush=True)


def scenario_prefix(m, rng, V, args, res):
    import fastload  # noqa: F401
    m.configure_engine()  # a fresh pool: its peak counts this scenario only
    system = ids_for(rng, V, 1000)
    ps = [np.concatenate([system, ids_for(rng, V, 20)]) for _ in range(32)]
    n = 16
    gen(m, ps[0], n)  # the system prompt's pages enter the prefix table
    with ThreadPoolExecutor(32) as ex:
        list(ex.map(lambda p: gen(m, p, n), ps))
    st = m.engine_stats()
    page = st["page_tokens"]
    one = (1000 + page - 1) // page
    own = 32 * ((1000 % page + 20 + n + page - 1) // page)
    r = {"requests": 32, "system_tokens": 1000, "own_tokens": 20 + n, "peak_pages_used": st["peak_pages_used"],
         "one_prompt_pages": one, "own_pages": own, "ratio": st["peak_pages_used"] / (one + own),
         "target_ratio": 1.2, "prefix_hit_tokens": st["prefix_hit_tokens"]}
    res["prefix"] = r
    print(f"shared 1000-token system prompt, 32 requests: peak {r['peak_pages_used']} pages against "
          f"{one} + {own} -> {r['ratio']:.2f}x (target <= 1.2x); {r['prefix_hit_tokens']} prompt tokens from shared pages",
          flush=True)


def scenario_preempt(m, rng, V, args, res):
    n, P, G = args.preempt_requests, args.preempt_prompt, args.preempt_tokens
    ps = [ids_for(rng, V, P) for _ in range(n)]
    m.configure_engine(prefix_caching=False)  # every request reads its own prompt: the pool holds what is said below
    alone = [gen(m, p, G)[0, P:] for p in ps]
    per_tok = m.memory_stats()["kv_cache_bytes_per_token"]
    pool = per_tok * n * (P + G) // 2
    out = {"requests": n, "prompt_tokens": P, "new_tokens": G, "pool_tokens": pool // per_tok, "modes": {}}
    for mode in ("replay", "recompute"):
        m.configure_engine(kv_cache_memory=int(pool), preemption_mode=mode, prefix_caching=False)
        gen(m, ps[0], 2)  # the pool
        with ThreadPoolExecutor(n) as ex:
            got, wall = timed(lambda: list(ex.map(lambda p: gen(m, p, G)[0, P:], ps)))
        st = m.engine_stats()
        differ = sum(not np.array_equal(a, b) for a, b in zip(alone, got))
        row = {"wall_s": wall, "tok_s": n * G / wall, "preemptions": st["preemptions"],
               "replayed_tokens": st["replayed_tokens"], "prefill_tokens": st["prefill_tokens"],
               "answers_differing_from_alone": differ}
        out["modes"][mode] = row
        print(f"{n} requests x ({P} + {G}) tokens in a pool of {out['pool_tokens']} tokens, preemption_mode={mode}: "
              f"{wall:.2f} s, {row['tok_s']:.1f} tok/s; {row['preemptions']} preemptions, {row['replayed_tokens']} "
              f"replayed tokens; {differ} of {n} greedy answers differ from alone", flush=True)
    m.configure_engine(kv_cache_memory=args.kv_cache_memory_kw, preemption_mode=None, prefix_caching=None)
    res["preempt"] = out


def scenario_forward(m, rng, V, args, res):
    """A decoding request's token gaps while a forward of args.forward_tokens runs, per prefill_chunk setting."""
    core_of = lambda: m._engine_handle().core()
    x = ids_for(rng, V, args.forward_tokens)[None]
    p = ids_for(rng, V, 32)
    out = {"forward_tokens": args.forward_tokens, "settings": {}}
    for chunk in [int(c) for c in args.forward_chunks.split(",")]:
        m.configure_engine(prefill_chunk=chunk)
        m(x[:, :64])
        gen(m, p, 4)  # the pool, the decode graphs
        f_alone = statistics.median([timed(lambda: m(x))[1] for _ in range(2)])
        _, gaps_alone, _ = _ttft_itl(m, p, 64)
        core = core_of()
        r = core.engine_submit(p.astype(np.int32), max_new_tokens=100000, eos_token_ids=[])
        have = 0
        while have < 8:
            have, _ = r.wait(have)
        stamps, box = [], {}

        def fwd():
            box["t0"] = time.perf_counter()
            m(x)
            box["t1"] = time.perf_counter()
        th = threading.Thread(target=fwd)
        th.start()
        while th.is_alive() or "t1" not in box:
            k, done = r.wait(have)
            now = time.perf_counter()
            stamps += [now] * (k - have)
            have = k
        th.join()
        k, _ = r.wait(have)  # the first token after the forward ends
        stamps += [time.perf_counter()] * (k - have)
        r.cancel()
        r.wait(1 << 30)
        t0, t1 = box["t0"], box["t1"]
        during = [b - a for a, b in zip(stamps, stamps[1:]) if b > t0 and a < t1]
        st = m.engine_stats()
        row = {"forward_s": t1 - t0, "forward_alone_s": f_alone, "tokens_during": len([s_ for s_ in stamps if t0 < s_ < t1]),
               "max_gap_ms": max(during) * 1e3 if during else None, "gap_alone_p50_ms": statistics.median(gaps_alone) * 1e3,
               "forward_chunks": st["forward_chunks"]}
        out["settings"][chunk] = row
        print(f"forward of {args.forward_tokens} tokens beside a decoding request, prefill_chunk {chunk}: forward "
              f"{row['forward_s'] * 1e3:.0f} ms (alone {f_alone * 1e3:.0f} ms); the request's longest gap between two "
              f"tokens {row['max_gap_ms'] or 0:.1f} ms (alone p50 {row['gap_alone_p50_ms']:.1f} ms), "
              f"{row['tokens_during']} tokens during the forward", flush=True)
    m.configure_engine(prefill_chunk=None)
    res["forward"] = out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--scenarios", default="single,seed,many,mixed,prefix")
    ap.add_argument("--single_tokens", type=int, default=256)
    ap.add_argument("--seed_tokens", type=int, default=256)
    ap.add_argument("--many_tokens", type=int, default=256)
    ap.add_argument("--loop_sample", type=int, default=4)
    ap.add_argument("--mixed_requests", type=int, default=256)
    ap.add_argument("--kv_cache_memory", type=float, default=None)
    ap.add_argument("--forward_tokens", type=int, default=4096)
    ap.add_argument("--forward_chunks", default="65536,2048,512")
    ap.add_argument("--preempt_requests", type=int, default=16)
    ap.add_argument("--preempt_prompt", type=int, default=64)
    ap.add_argument("--preempt_tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import fastload
    from fastload.bench import environment
    kw = {}
    if args.kv_cache_memory is not None:
        kw["kv_cache_memory"] = int(args.kv_cache_memory) if args.kv_cache_memory > 1 else args.kv_cache_memory
    args.kv_cache_memory_kw = kw.get("kv_cache_memory")
    m = fastload.AutoModelForCausalLM.from_pretrained(args.model, device_map=args.device, torch_dtype=args.dtype, **kw)
    want = args.scenarios.split(",")
    V = m.config.vocab_size
    rng = np.random.default_rng(0)
    gen(m, ids_for(rng, V, 16), 4)
    res = {"model": args.model, "device": args.device, "dtype": args.dtype, "environment": environment(args.device)}
    for s in want:
        t0 = time.perf_counter()
        if s == "single":
            scenario_single(m, rng, V, args, res)
        elif s == "seed":
            scenario_seed(m, rng, V, args, res)
        elif s == "many":
            scenario_many(m, rng, V, args, res)
        elif s == "mixed":
            scenario_mixed(m, rng, V, args, res)
        elif s == "prefix":
            scenario_prefix(m, rng, V, args, res)
        elif s == "forward":
            scenario_forward(m, rng, V, args, res)
        elif s == "preempt":
            scenario_preempt(m, rng, V, args, res)
        else:
            raise SystemExit(f"unknown scenario {s}")
        print(f"  ({s}: {time.perf_counter() - t0:.1f} s)", flush=True)
    res["engine_stats"] = m.engine_stats()
    res["memory_stats"] = m.memory_stats()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1, default=str)


if __name__ == "__main__":
    main()
