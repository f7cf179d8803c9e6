"""The issue-11 reliability run: N mixed requests over HTTP against `python -m fastload serve`'s server (in this
process, uvicorn on a thread), 10% cancelled mid-stream by their clients, 5% malformed. Checks that every valid
request is answered exactly once (200 and a usage count), every malformed one gets a 400, none hangs, and that the
model's device memory (or, on the CPU, its engine pool) is back to its idle level afterwards. The load runs twice: the
first grows the step buffers that are kept for reuse (attention workspace, rope table: fastload's cudaMallocs, in
memory_allocated); the idle level is read after it, and the second run must end at exactly that level (no leak).

    python benchmarks/serve_reliability.py --model DIR [--device cuda] [--requests 1000] [--out result.json]

Uses /v1/completions (a synthetic checkpoint's word-level tokenizer has no chat template) with and without streaming,
max_tokens 4..64, ignore_eos on the cancelled ones so that they are still running when their client leaves."""
import argparse
import json
import socket
import sys
import threading
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=128, help="client threads sending the requests")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import httpx
    import uvicorn
    import fastload
    from fastload.bench import environment
    from fastload.serve import Server

    model = fastload.AutoModelForCausalLM.from_pretrained(a.model, device_map=a.device, torch_dtype=a.dtype)
    tok = fastload.AutoTokenizer.from_pretrained(a.model)
    srv = Server(model, tok, model_id="m", max_queue=a.requests)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    us = uvicorn.Server(uvicorn.Config(srv.app(), host="127.0.0.1", port=port, log_level="warning"))
    th = threading.Thread(target=us.run, daemon=True)
    th.start()
    while not us.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}"
    cuda = str(model.device).startswith("cuda")
    words = [w for w in tok.get_vocab() if w.isalpha()][:2000] or ["hello"]
    rng = np.random.default_rng(0)

    def prompt():
        return " ".join(rng.choice(words, size=int(rng.integers(4, 200))))

    # an abandoned stream asks for nearly the whole context, so that it is surely still running when its client leaves
    long_tokens = min(20000, int(model.config.max_position_embeddings) - 256)
    kinds = []
    for i in range(a.requests):
        r = rng.random()
        kinds.append("cancel" if r < 0.10 else "malformed" if r < 0.15 else "stream" if r < 0.55 else "plain")
    bodies = [{"model": "m", "prompt": prompt(), "max_tokens": int(rng.integers(4, 65)), "temperature": 0}
              for _ in kinds]
    results = [[] for _ in kinds]
    lock = threading.Lock()
    nxt = [0]

    def one(i):
        k, body = kinds[i], bodies[i]
        try:
            if k == "malformed":
                r = httpx.post(base + "/v1/completions", content=b'{"prompt": "x", "max_tokens": ', timeout=300,
                               headers={"content-type": "application/json"})
                got = r.status_code
            elif k == "cancel":
                b = dict(body, stream=True, ignore_eos=True, max_tokens=long_tokens)
                try:  # one chunk, or half a second of nothing (random weights: tokens may decode to no text), then leave
                    with httpx.stream("POST", base + "/v1/completions", json=b,
                                      timeout=httpx.Timeout(300, read=0.5)) as r:
                        next(ln for ln in r.iter_lines() if ln)
                except httpx.ReadTimeout:
                    pass
                got = "cancelled"
            elif k == "stream":
                with httpx.stream("POST", base + "/v1/completions", json=dict(body, stream=True), timeout=300) as r:
                    lines = [ln for ln in r.iter_lines() if ln]
                got = r.status_code if lines and lines[-1] == "data: [DONE]" else f"bad stream {lines[-1:]}"
            else:
                r = httpx.post(base + "/v1/completions", json=body, timeout=300)
                got = r.status_code if r.status_code != 200 or r.json()["usage"]["completion_tokens"] > 0 else "no usage"
        except Exception as e:  # noqa: BLE001 - recorded, checked below
            got = f"{type(e).__name__}: {e}"
        with lock:
            results[i].append(got)

    def client():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(kinds):
                return
            one(i)

    def run_all():
        for r in results:
            r.clear()
        nxt[0] = 0
        t0 = time.perf_counter()
        ths = [threading.Thread(target=client) for _ in range(a.clients)]
        for t in ths:
            t.start()
        for t in ths:
            t.join(900)
        wall = time.perf_counter() - t0
        hung = sum(t.is_alive() for t in ths)
        for _ in range(600):  # the cancelled requests leave the engine at its next step
            st = model.engine_stats()
            if st["running"] == 0 and st["waiting"] == 0:
                break
            time.sleep(0.05)
        if cuda:
            fastload.cuda.synchronize()
        return wall, hung, model.engine_stats(), fastload.cuda.memory_allocated(model.device) if cuda else None

    want = {"malformed": [400], "cancel": ["cancelled"], "stream": [200], "plain": [200]}
    wall1, hung1, _, idle = run_all()
    bad1 = [(i, kinds[i], list(results[i])) for i in range(len(kinds)) if results[i] != want[kinds[i]]]
    wall, hung, st, now = run_all()
    bad = bad1 + [(i, kinds[i], results[i]) for i in range(len(kinds)) if results[i] != want[kinds[i]]]
    hung += hung1
    health = httpx.get(base + "/health").json()
    us.should_exit = True
    th.join(10)
    out = {"requests": len(kinds), "runs": 2, "kinds": {k: kinds.count(k) for k in want}, "wall_s": [wall1, wall],
           "hung_clients": hung,
           "wrong": bad[:20], "n_wrong": len(bad), "engine_after": st, "device_memory_idle": idle,
           "device_memory_after": now, "health": health, "environment": environment(str(model.device))}
    # every abandoned stream was cancelled by the server (not run to its long_tokens), in both runs
    out["cancelled_by_server"] = health["cancelled"]
    ok = not bad and not hung and st["pages_used"] == 0 and st["running"] == 0 and (not cuda or now == idle) and \
        health["cancelled"] == 2 * kinds.count("cancel")
    out["ok"] = ok
    print(f"2 x {len(kinds)} requests ({out['kinds']}) in {wall1:.1f} + {wall:.1f} s from {a.clients} clients: {len(bad)} "
          f"wrong, {hung} hung; engine after: running {st['running']}, pages used {st['pages_used']}; device memory after "
          f"the first run {idle}, after the second {now}: {'OK' if ok else 'FAILED'}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=str)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
