"""forward() as a request of the engine (issue 11 part 1: every public call goes through it), on the CPU backend.

What must hold: a forward from any thread, beside generate calls from others, returns the logits the same call gets
alone, bit for bit (float32 fixtures: the engine runs the same rectangular pass, whole, between its steps); its
errors are raised in the calling thread and nobody else's request notices; it makes no KV pool (a transient cache of
its own B x T slots, reported, freed after it); the engine still configures and stops cleanly around forwards.
No timing assertions: hangs are bounded by the subprocess timeouts.
"""
import gc
import json
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from golden_util import load_case, load_fixture, model_dir
from test_concurrency import run_py


def load(name="llama", **kw):
    return load_fixture(name, **kw)


def kv_bytes(model, B, T):
    c = model.config
    return 2 * c.num_hidden_layers * B * T * c.num_key_value_heads * c.head_dim * 4


def forward_jobs(name, seed=0):
    """Forward calls of several shapes on fixture `name`: its golden inputs (one row; a left-padded batch with its
    mask; the batch teacher-forced with positions from the mask, as golden_util does), and random batches with and
    without a mask, with explicit position_ids."""
    case = load_case(name)
    rng = np.random.default_rng(seed)
    V = json.loads((model_dir(name) / "config.json").read_text())["vocab_size"]
    mask = case["batch_mask"]
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0) * mask + (1 - mask)
    jobs = [dict(input_ids=case["single_ids"]), dict(input_ids=case["batch_ids"], attention_mask=mask),
            dict(input_ids=case["batch_ids"], attention_mask=mask, position_ids=pos)]
    for k in range(9):
        B, T = int(rng.integers(1, 4)), int(rng.integers(1, 40))
        job = dict(input_ids=rng.integers(3, V, size=(B, T)))
        if k % 3 == 1:
            m = np.ones((B, T), np.int64)
            m[0, :int(rng.integers(0, T))] = 0
            job["attention_mask"] = m
        if k % 3 == 2:
            job["position_ids"] = np.tile(np.arange(T), (B, 1)) + int(rng.integers(0, 50))
        jobs.append(job)
    return jobs


def prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 380, size=int(rng.integers(3, 30))).astype(np.int64) for _ in range(n)]


@pytest.fixture(scope="module")
def llama():
    return load()


def test_forward_is_an_engine_request_without_a_pool(llama):
    m = load()
    assert m.engine_stats() is None
    ids = np.arange(3, 40).reshape(1, -1)
    m(ids)
    st, ms = m.engine_stats(), m.memory_stats()
    assert st["forwards"] == 1 and st["forward_tokens"] == ids.size, st
    assert st["n_pages"] == 0 and ms["kv_cache_pool"] == 0, "a forward made the KV pool"
    assert st["forward_kv_peak"] == ms["kv_cache_last"] == kv_bytes(m, *ids.shape), (st, ms)
    assert st["forwards_waiting"] == 0 and st["forwards_running"] == 0
    m(np.tile(ids[:, :10], (3, 1)))  # a smaller one: kv_cache_last follows, the peak stays
    assert m.memory_stats()["kv_cache_last"] == kv_bytes(m, 3, 10) < m.engine_stats()["forward_kv_peak"]
    m.generate(ids, max_new_tokens=2)  # the first generate makes the pool
    assert m.engine_stats()["n_pages"] > 0 and m.memory_stats()["kv_cache_pool"] > 0
    assert np.array_equal(m(ids).logits, llama(ids).logits)


@pytest.mark.parametrize("name", ["llama", "qwen2", "mixtral"])
def test_forwards_from_threads_beside_generate_equal_each_alone(name):
    """24 calls, forwards of the shapes above and greedy generates, from 8 threads: each equals the same call alone
    (alone: one after another on an idle engine), bit for bit; the generates keep their tokens too."""
    m = load(name)
    fj = forward_jobs(name)
    ps = prompts(12, seed=1)

    def call(k):
        if k % 2:
            return m.generate(ps[k // 2][None], max_new_tokens=24, do_sample=False, eos_token_id=[])
        return m(**fj[k // 2]).logits
    jobs = list(range(2 * min(len(fj), len(ps))))
    alone = [call(k) for k in jobs]
    n0 = m.engine_stats()["forwards"]
    for workers in (8, 3):
        with ThreadPoolExecutor(workers) as ex:
            got = list(ex.map(call, reversed(jobs)))[::-1]
        for k, (a, b) in enumerate(zip(alone, got)):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"call {k} ({'generate' if k % 2 else 'forward'}), " \
                                                                 f"{workers} threads"
    st = m.engine_stats()
    assert st["forwards"] - n0 == len(jobs) and st["running"] == 0 and st["pages_used"] == 0, st
    assert st["forwards_waiting"] == 0 and st["forwards_running"] == 0, st


def test_forward_errors_reach_only_their_caller(llama):
    """Bad ids and a malformed mask are raised in the thread that called, while other threads' forwards and
    generates run on and get what they get alone."""
    ps = prompts(6, seed=2)
    good = [llama.generate(p[None], max_new_tokens=20, do_sample=False, eos_token_id=[]) for p in ps]
    x = np.arange(3, 30)[None]
    want = llama(x).logits
    bad = [dict(input_ids=np.array([[5, 6, 512]])), dict(input_ids=np.array([[5, -1, 7]])),
           dict(input_ids=x, attention_mask=np.ones((1, 3), np.int64)), dict(input_ids=np.zeros((1, 0), np.int64))]
    errors = {}
    barrier = threading.Barrier(len(ps) + len(bad) + 1)

    def gen(i):
        barrier.wait(30)
        return llama.generate(ps[i][None], max_new_tokens=20, do_sample=False, eos_token_id=[])

    def fwd_bad(i):
        barrier.wait(30)
        try:
            llama(**bad[i])
        except ValueError as e:
            errors[i] = (threading.get_ident(), str(e))
        return threading.get_ident()

    def fwd_good():
        barrier.wait(30)
        return [llama(x).logits for _ in range(5)]
    with ThreadPoolExecutor(len(ps) + len(bad) + 1) as ex:
        g = [ex.submit(gen, i) for i in range(len(ps))]
        b = [ex.submit(fwd_bad, i) for i in range(len(bad))]
        f = ex.submit(fwd_good)
        for i, fut in enumerate(g):
            assert np.array_equal(fut.result(60), good[i])
        for out in f.result(60):
            assert np.array_equal(out, want)
        tids = [fut.result(60) for fut in b]
    assert sorted(errors) == list(range(len(bad))), errors
    assert all(errors[i][0] == tids[i] for i in errors)  # raised in the calling thread
    assert "input_ids[0][2] = 512 is outside the vocabulary [0, 512)" in errors[0][1]
    assert "input_ids[0][1] = -1 is outside the vocabulary" in errors[1][1]
    assert "attention_mask" in errors[2][1] and "empty" in errors[3][1]
    st = llama.engine_stats()
    assert st["running"] == 0 and st["waiting"] == 0 and st["forwards_waiting"] == 0, st


def test_long_forward_is_read_in_chunks_equal_to_one_pass(llama):
    """A forward of more than prefill_chunk tokens (B x T) is read in chunks of at most prefill_chunk tokens, one a
    step, into its own cache: its logits equal the one pass of the same call (an engine whose prefill_chunk holds it
    whole) within float32 rounding, with a key mask, left padding and explicit positions; cut into equal chunks (the
    count in forward_chunks), the same result every time; a forward of at most prefill_chunk tokens stays one pass."""
    rng = np.random.default_rng(7)
    m = load()
    m.configure_engine(prefill_chunk=16)
    ids = rng.integers(3, 380, size=(3, 70))
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    mask[2, :33] = 0
    pos = np.maximum(np.cumsum(mask, 1) - 1, 0) * mask + (1 - mask)
    for job, chunks in ((dict(input_ids=ids[:1]), 5), (dict(input_ids=ids, attention_mask=mask), 14),
                        (dict(input_ids=ids, attention_mask=mask, position_ids=pos), 14),
                        (dict(input_ids=ids[:1, :16]), 1), (dict(input_ids=ids[:2, :8]), 1)):
        want = llama(**job).logits  # prefill_chunk 512: one pass
        n0 = m.engine_stats()["forward_chunks"] if m.engine_stats() else 0
        got = m(**job).logits
        assert m.engine_stats()["forward_chunks"] - n0 == chunks
        scale = float(np.abs(want).max())
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)
        if chunks == 1:
            assert np.array_equal(got, want)
        assert np.array_equal(m(**job).logits, got)  # the same cut, the same bits
    st = m.engine_stats()
    assert st["forwards_running"] == 0 and st["forward_kv_peak"] == kv_bytes(m, 3, 70), st


def test_long_forward_lets_a_running_generate_step_between_its_chunks(llama):
    """While a forward is read in chunks, the running generate takes a decode step between them (one chunk a step):
    the engine's decode rows grow by about the chunk count during the forward (by one or two when it was read whole,
    before chunks); both results equal each alone."""
    rng = np.random.default_rng(8)
    m = load()
    m.configure_engine(prefill_chunk=16)
    x = rng.integers(3, 380, size=(1, 200))  # 13 chunks
    p = np.arange(5, 20)[None]
    want_f = llama(x).logits
    want_g = m.generate(p, max_new_tokens=120, do_sample=False, eos_token_id=[])
    out = {}

    def fwd():
        d0, c0 = m.engine_stats()["decode_rows"], m.engine_stats()["forward_chunks"]
        out["logits"] = m(x).logits
        st = m.engine_stats()
        out["rows"], out["chunks"] = st["decode_rows"] - d0, st["forward_chunks"] - c0

    class Probe:  # starts the forward once the generate has its first token (it runs 119 steps more)
        def put(self, value):
            self.n = getattr(self, "n", 0) + 1
            if self.n == 2:
                out["th"] = threading.Thread(target=fwd)
                out["th"].start()

        def end(self):
            pass
    g = m.generate(p, max_new_tokens=120, do_sample=False, eos_token_id=[], streamer=Probe())
    out["th"].join(60)
    assert np.array_equal(g, want_g)
    np.testing.assert_allclose(out["logits"], want_f, rtol=0, atol=2e-5 * float(np.abs(want_f).max()))
    assert out["chunks"] == 13 and out["rows"] >= 12, out


@pytest.mark.skipif("address" in os.environ.get("FASTLOAD_SANITIZE", ""),
                    reason="ASan reserves terabytes of address space and cannot run under an RLIMIT_AS "
                           "(tools/sanitize_tests.sh)")
def test_forward_that_cannot_get_its_memory_fails_alone():
    """An input too long for the memory left (an address-space limit in a subprocess: its output array fits, its
    cache and workspace do not) is a MemoryError in its own thread, from the engine's step; a generate running
    beside it and later forwards get their usual results. forward has no context limit (transformers' has none for
    rotary models), so the limit a too-long forward meets is memory."""
    r = run_py("""
        import resource, threading, numpy as np, fastload
        from golden_util import model_dir
        m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cpu",
                                                          torch_dtype="float32", threads=2, kv_cache_memory=8 << 20)
        p, x = np.arange(3, 20)[None], np.arange(3, 50)[None]
        want_g, want_f = m.generate(p, max_new_tokens=60, do_sample=False, eos_token_id=[]), m(x).logits
        vm = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize")][0]) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1200 << 20), resource.getrlimit(resource.RLIMIT_AS)[1]))
        out = {}
        def gen():
            out["g"] = m.generate(p, max_new_tokens=60, do_sample=False, eos_token_id=[])
        th = threading.Thread(target=gen)
        th.start()
        big = np.full((1, 400_000), 7)  # logits 820 MB fit; its cache (600 MB) beside them does not
        try:
            m(big)
            print("no error")
        except MemoryError as e:
            print("MemoryError:", e)
        th.join(120)
        print("generate equal:", np.array_equal(out.get("g"), want_g))
        print("forward equal:", np.array_equal(m(x).logits, want_f))
        st = m.engine_stats()
        print("state:", st["running"], st["waiting"], st["forwards_waiting"], st["forwards_running"])
    """, timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "MemoryError:" in r.stdout and ("cache" in r.stdout or "workspace" in r.stdout), r.stdout + r.stderr
    assert "generate equal: True" in r.stdout and "forward equal: True" in r.stdout, r.stdout
    assert "state: 0 0 0 0" in r.stdout, r.stdout


def test_configure_engine_waits_for_no_forward_and_deletion_frees_the_engine():
    """configure_engine while a forward is queued is refused (the forward's request lives in the engine), then works
    once it has returned; the forward's result is unchanged. The forward is held in the queue deterministically: the
    compute thread is paused in the progress callback of another model's load. A model dropped after forwards frees
    its engine (nothing but the model holds it)."""
    m = load()
    x = np.arange(3, 40)[None]
    want = m(x).logits
    release, entered = threading.Event(), threading.Event()

    def progress(done, total):
        entered.set()
        release.wait(60)
    loader = threading.Thread(target=lambda: load("qwen2", progress_callback=progress))
    loader.start()
    assert entered.wait(60)
    res = {}
    th = threading.Thread(target=lambda: res.setdefault("out", m(x).logits))
    th.start()
    for _ in range(600):  # the forward is queued behind the paused load (GIL released while it waits)
        if m.engine_stats()["forwards_waiting"]:
            break
        threading.Event().wait(0.05)
    assert m.engine_stats()["forwards_waiting"] == 1
    with pytest.raises(RuntimeError, match="call.s. are still running"):
        m.configure_engine(max_num_seqs=2)
    with pytest.raises(RuntimeError, match="forward calls are still running"):  # the core's own check
        m._core.engine_stop()
    release.set()
    th.join(60)
    loader.join(60)
    assert np.array_equal(res["out"], want)
    m.configure_engine(max_num_seqs=2, kv_cache_memory=4 << 20)
    assert m.engine_stats() is None  # a new engine, started by the next call
    assert np.array_equal(m(x).logits, want)
    assert m.generate(x, max_new_tokens=3).shape == (1, x.shape[1] + 3)
    gc.disable()
    try:
        w = weakref.ref(m)
        del m
        assert w() is None
    finally:
        gc.enable()


def test_forward_from_a_load_callback_runs_at_once(llama):
    """A forward called from a load's progress callback (the compute thread is paused in that load, so the engine's
    steps wait behind it) runs at once on the paused compute thread instead of waiting in the queue for ever, while
    a generate on the same model is mid-way; both get what they get alone."""
    x = np.arange(3, 40)[None]
    want = llama(x).logits
    p = np.arange(5, 20)[None]
    want_g = llama.generate(p, max_new_tokens=60, do_sample=False, eos_token_id=[])
    got, out = [], {}
    n0 = llama.engine_stats()["forwards"]

    def progress(done, total):
        if not got:
            got.append(llama(x).logits)

    th = threading.Thread(target=lambda: out.setdefault("g", llama.generate(p, max_new_tokens=60, do_sample=False,
                                                                              eos_token_id=[])))
    th.start()
    load("qwen2", progress_callback=progress)
    th.join(60)
    assert len(got) == 1 and np.array_equal(got[0], want)
    assert np.array_equal(out["g"], want_g)
    assert llama.engine_stats()["forwards"] == n0 + 1


def test_generate_from_a_load_callback_is_refused_not_hung(llama):
    """generate (and chat, stream_chat: the same submit) from a load's progress callback would wait for the paused
    compute thread, which waits for the callback: it hung for ever (hunt20). It is a RuntimeError saying why; the
    load goes on, and generate works once the load has returned."""
    p = np.arange(5, 20)[None]
    want = llama.generate(p, max_new_tokens=4, do_sample=False, eos_token_id=[])
    errors = []

    def progress(done, total):
        if not errors:
            try:
                llama.generate(p, max_new_tokens=4, eos_token_id=[])
            except RuntimeError as e:
                errors.append(str(e))
            else:
                errors.append("no error")

    other = load("qwen2", progress_callback=progress)
    assert len(errors) == 1 and "cannot run inside a progress_callback of a load" in errors[0], errors
    assert np.array_equal(llama.generate(p, max_new_tokens=4, do_sample=False, eos_token_id=[]), want)
    assert other.generate(p % 100, max_new_tokens=2).shape == (1, p.shape[1] + 2)


def test_engine_off_forwards_from_threads():
    m = load(engine=False)
    jobs = forward_jobs("llama", seed=4)
    alone = [m(**j).logits for j in jobs]
    with ThreadPoolExecutor(6) as ex:
        got = list(ex.map(lambda j: m(**j).logits, jobs))
    assert all(np.array_equal(a, b) for a, b in zip(alone, got))


def test_core_forward_without_the_python_engine():
    """fastload._C.Model.forward on a core nobody started an engine for starts one with the defaults and no pool;
    the model's own engine (generate, with its settings and pool) then replaces it."""
    m = load()
    x = np.arange(3, 20, dtype=np.int32)[None]
    raw = m._core.forward(x)
    assert m.engine_stats() is None and m._core.engine_stats()["forwards"] == 1
    assert m._core.engine_stats()["n_pages"] == 0
    assert m.generate(x, max_new_tokens=2).shape == (1, x.shape[1] + 2)
    st = m.engine_stats()
    assert st["n_pages"] > 0 and st["forwards"] == 0, st  # the replacement
    assert np.array_equal(m(x).logits, raw)
