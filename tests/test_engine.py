"""The engine (issue 11 parts 1-2, csrc/engine.h): continuous batching over a paged KV cache, on the CPU backend.

What must hold whatever the batch: every request's tokens are those of the same request alone (greedy, and sampling
with its seed); the pool holds requests by their tokens, not their max_new_tokens, and preempts instead of failing
when it runs dry; prompts that share leading pages share them; cancelled or finished requests give their pages back;
a request that can never fit gets an error naming kv_cache_memory. Paged attention itself is checked against each
row alone on a rectangular cache. No timing assertions.
"""
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastload
from fastload import _C
from golden_util import load_fixture as load
from paged_util import paged_attention, paged_case, per_row_reference


@pytest.fixture(scope="module")
def qwen():
    return load()


def prompts(n, seed=0, lo=3, hi=40):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(lo, hi))).astype(np.int64) for _ in range(n)]


_legacy = []


def alone(model, p, **kw):
    """The request through the one-call path (engine=False: its own rectangular KV cache, batch 1), on the same
    checkpoint as `model` (every model here is the qwen2 fixture in float32)."""
    if not _legacy:
        _legacy.append(load(engine=False))
    return _legacy[0].generate(p[None], **kw)[0, len(p):]


def left_padded(ps):
    """A batch of prompts left-padded with 0, and its attention_mask (as a tokenizer pads for generation)."""
    T = max(len(p) for p in ps)
    ids, mask = np.zeros((len(ps), T), np.int64), np.zeros((len(ps), T), np.int64)
    for b, p in enumerate(ps):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask


def page_bytes(model, page):
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    return page * 2 * c.num_hidden_layers * c.num_key_value_heads * hd * 4


# ---- paged attention (the op) ----------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T,nh,nkv,hd,L,shift,window", [
    (3, 1, 4, 2, 64, 40, 2, 0),      # decode, rows at different lengths
    (2, 7, 6, 2, 32, 50, 3, 0),      # a prompt chunk per row
    (4, 1, 8, 8, 16, 33, 0, 5),      # one-slot pages, sliding window
    (1, 16, 2, 1, 128, 64, 4, 0),
])
def test_cpu_paged_attention_matches_each_row_alone(B, T, nh, nkv, hd, L, shift, window):
    rng = np.random.default_rng(B * 100 + T)
    case = paged_case(rng, B, T, nh, nkv, hd, L, shift)
    got = paged_attention("cpu", case, window)
    ref = per_row_reference(case, window)
    assert np.array_equal(got, ref)  # same arithmetic, addressed through the table


def test_cpu_paged_rope_store_writes_through_the_table():
    rng = np.random.default_rng(5)
    B, T, nh, nkv, hd, L, shift = 3, 4, 2, 1, 16, 24, 2
    case = paged_case(rng, B, T, nh, nkv, hd, L, shift)
    inv = (1.0 / (10000.0 ** (np.arange(hd // 2, dtype=np.float32) * 2 / hd))).astype(np.float32)
    pos = np.concatenate([np.arange(s, s + T) for s in case["starts"]]).astype(np.int32)
    got = _C.run_op("cpu", "rope_store", {"qkv": case["qkv"], "pos": pos, "inv_freq": inv, "k_cache": case["kp"],
                                          "v_cache": case["vp"], "block_table": case["table"], "starts": case["starts"]},
                    {"B": B, "T": T, "n_heads": nh, "n_kv_heads": nkv, "page_shift": shift, "act": "float32"})
    page = 1 << shift
    for b in range(B):
        ref = _C.run_op("cpu", "rope_store", {"qkv": case["qkv"][b * T:(b + 1) * T], "pos": pos[b * T:(b + 1) * T],
                                              "inv_freq": inv, "k_cache": case["kc"][b:b + 1],
                                              "v_cache": case["vc"][b:b + 1]},
                        {"B": 1, "T": T, "start": int(case["starts"][b]), "n_heads": nh, "n_kv_heads": nkv,
                         "act": "float32"})
        assert np.array_equal(got["qkv"][b * T:(b + 1) * T], ref["qkv"])
        for j in range(L):
            pg, off = case["table"][b, j // page], j % page
            assert np.array_equal(got["k_cache"][pg, off], ref["k_cache"][0, j]), (b, j)
            assert np.array_equal(got["v_cache"][pg, off], ref["v_cache"][0, j]), (b, j)


def test_paged_op_rejects_bad_tables():
    rng = np.random.default_rng(1)
    case = paged_case(rng, 2, 1, 2, 1, 16, 12, 2)
    case["table"] = case["table"].copy()
    case["table"][1, 0] = case["kp"].shape[0]  # past the pool
    with pytest.raises(ValueError, match="block_table"):
        paged_attention("cpu", case)


# ---- the engine ------------------------------------------------------------------------------------------------
def threads_equal_alone(m, ps, **kw):
    """Each prompt through m.generate from its own thread, all at once: every request's new tokens equal the same
    request alone (the one-call path)."""
    ref = [alone(m, p, **kw) for p in ps]
    with ThreadPoolExecutor(len(ps)) as ex:
        outs = list(ex.map(lambda p: m.generate(p[None], **kw)[0, len(p):], ps))
    for i, (a, b) in enumerate(zip(ref, outs)):
        assert np.array_equal(a, b), f"request {i}: {list(b)} != alone {list(a)}"


def test_concurrent_greedy_equals_alone(qwen):
    threads_equal_alone(qwen, prompts(12, seed=1), max_new_tokens=10)
    st = qwen.engine_stats()
    assert st["peak_running"] > 1, st          # they did run together
    assert st["pages_used"] == 0 and st["running"] == 0 and st["waiting"] == 0, st


def test_sampling_with_seed_is_the_same_batched_or_alone(qwen):
    threads_equal_alone(qwen, prompts(6, seed=2), max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50,
                        top_p=0.95, seed=7)


def test_batched_generate_with_left_padding_matches_rows_alone(qwen):
    ps = prompts(4, seed=3, lo=3, hi=12)
    ids, mask = left_padded(ps)
    T = ids.shape[1]
    out = qwen.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[], pad_token_id=0)
    assert out.shape == (4, T + 6) and np.array_equal(out[:, :T], ids)
    for b, p in enumerate(ps):
        assert np.array_equal(out[b, T:], alone(qwen, p, max_new_tokens=6)), b


def test_rows_ending_early_are_padded_as_transformers(qwen):
    ps = prompts(3, seed=4)
    first = [alone(qwen, p, max_new_tokens=5) for p in ps]
    eos = int(first[0][1])  # row 0 stops at its second token
    ids, mask = left_padded(ps)
    out = qwen.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=499)
    legacy = load(engine=False).generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=eos, pad_token_id=499)
    assert np.array_equal(out, legacy)


def test_small_pool_preempts_and_keeps_outputs():
    m = load(kv_cache_memory=page_bytes(load(), 4) * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16)
    threads_equal_alone(m, prompts(6, seed=5, lo=8, hi=16), max_new_tokens=12, eos_token_id=[])
    st = m.engine_stats()
    assert st["n_pages"] == 14 and st["preemptions"] > 0 and st["peak_pages_used"] <= 14, st
    assert st["pages_used"] == 0


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("sample", [False, True])
def test_preempted_request_is_replayed_bit_for_bit(sample, prefix):
    """A dry pool preempts the newest requests; read again (preemption_mode="replay", the default), each feeds the
    tokens it had generated through decode steps, so the keys and values are the same bits as before and the logits
    of every later token equal those of the request alone, bit for bit, greedy or sampled with a seed (recompute
    reads them as a prompt: other matmul kernels, logits ~1e-6 apart)."""
    # prefix caching on: a request read again found its own prompt pages in the table and read the rest in other
    # chunks than the first time (other rounding); it now takes only what its first read took
    m = load(kv_cache_memory=page_bytes(load(), 4) * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16,
             prefix_caching=prefix)
    ps = prompts(6, seed=5, lo=8, hi=16) + prompts(2, seed=9, lo=17, hi=24)  # two read in two chunks
    kw = dict(max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    if sample:
        kw.update(do_sample=True, temperature=0.8, top_k=0, seed=11)
    alone_m = load(engine=False, prefill_chunk=16)  # prompts read in the same chunks (longer ones take two)
    ref = [alone_m.generate(p[None], **kw) for p in ps]
    with ThreadPoolExecutor(len(ps)) as ex:
        outs = list(ex.map(lambda p: m.generate(p[None], **kw), ps))
    st = m.engine_stats()
    assert st["preemptions"] > 0 and st["replayed_tokens"] > 0 and st["pages_used"] == 0, st
    for i, (a, b) in enumerate(zip(ref, outs)):
        assert np.array_equal(a.sequences, b.sequences), i
        assert len(a.logits) == len(b.logits) == 12
        for t, (x, y) in enumerate(zip(a.logits, b.logits)):
            assert np.array_equal(x, y), f"request {i}, token {t}: logits differ by {np.abs(x - y).max()}"


def test_preemption_mode_recompute_reads_generated_tokens_as_a_prompt():
    m = load(kv_cache_memory=page_bytes(load(), 4) * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16,
             preemption_mode="recompute")
    threads_equal_alone(m, prompts(6, seed=5, lo=8, hi=16), max_new_tokens=12, eos_token_id=[])
    st = m.engine_stats()
    assert st["preemptions"] > 0 and st["replayed_tokens"] == 0 and st["pages_used"] == 0, st
    with pytest.raises(ValueError, match="preemption_mode"):
        load(preemption_mode="swap")


def test_pool_serves_requests_by_tokens_not_max_new_tokens():
    """8 requests each allowed 4096 new tokens stop at eos after a few: a pool far smaller than 8 x 4096 tokens
    serves them all at once, and holds only their real tokens."""
    base = load()
    ps = prompts(8, seed=6, lo=5, hi=9)
    firsts = [alone(base, p, max_new_tokens=3, eos_token_id=[]) for p in ps]
    m = load(kv_cache_memory=page_bytes(base, 4) * 32, kv_page_tokens=4, max_num_seqs=8)
    with ThreadPoolExecutor(8) as ex:
        outs = list(ex.map(lambda i: m.generate(ps[i][None], max_new_tokens=4096, eos_token_id=int(firsts[i][2]))[0],
                           range(8)))
    for i, o in enumerate(outs):
        assert o[-1] == firsts[i][2] and len(o) <= len(ps[i]) + 3
    st = m.engine_stats()
    assert st["preemptions"] == 0 and st["peak_pages_used"] <= 32, st  # 8 x 4096 tokens would be 8192 pages


def shared_prompts(seed, n_system, n_own, count):
    """count prompts that start with the same n_system tokens (a system prompt), then n_own of their own."""
    rng = np.random.default_rng(seed)
    system = rng.integers(3, 500, size=n_system)
    return [np.concatenate([system, rng.integers(3, 500, size=n_own)]) for _ in range(count)]


def test_shared_prompt_pages_are_shared():
    m = load(kv_page_tokens=4, max_num_seqs=16, prefix_caching=True)
    threads_equal_alone(m, shared_prompts(7, 40, 3, 8), max_new_tokens=4, eos_token_id=[])
    st = m.engine_stats()
    # 10 shared pages of the system prompt; each request's own tail (3 prompt + 4 new tokens, at most 3 pages)
    assert st["prefix_hit_tokens"] >= 7 * 40, st
    assert st["peak_pages_used"] <= 1.2 * (10 + 8 * 3), st


def test_prefix_table_forgets_the_children_of_an_evicted_page():
    """A table page evicted and reused for other tokens left its children in the table under its page id: a later
    prompt walking the new page then the old child's tokens took K/V computed after another prefix (greedy answers
    differed from alone, logits by up to 26). Pool of 6 pages of 16 tokens, all registered, then reused."""
    base = load()
    m = load(kv_cache_memory=page_bytes(base, 16) * 6, kv_page_tokens=16, prefix_caching=True)
    rng = np.random.default_rng(11)
    A, C, B, G = (rng.integers(3, 500, size=k) for k in (16, 16, 16, 64))

    def gen(p, k=1):
        return m.generate(p[None], max_new_tokens=k, eos_token_id=[])[0, len(p):]
    gen(np.concatenate([A, C]))  # A's page, then C's after A, in the table
    gen(G)                       # four more: every page is a table page now
    gen(B)                       # A's page (oldest) evicted and reused for B
    p = np.concatenate([B, C, [7]])
    hit0 = m.engine_stats()["prefix_hit_tokens"]
    out = gen(p, 8)
    assert m.engine_stats()["prefix_hit_tokens"] - hit0 == 16  # B's page only: C's was computed after A
    np.testing.assert_array_equal(out, alone(m, p, max_new_tokens=8, eos_token_id=[]))


@pytest.mark.parametrize("n,k", [(40, 1), (20, 30)])
def test_peak_pages_count_the_step_a_request_ends_in(n, k):
    """peak_pages_used was sampled at a step's end, after the requests that ended in it had let their pages go: a
    40-token prompt with one new token held 3 pages of 16 and reported 0."""
    m = load(kv_page_tokens=16)
    m.generate(np.arange(3, 3 + n)[None], max_new_tokens=k, eos_token_id=[])
    held = -(-(n + k - 1) // 16)  # K/V written: the prompt and every new token but the last
    assert m.engine_stats()["peak_pages_used"] == held
    assert m.memory_stats()["kv_cache_pool_peak_used"] == held * page_bytes(m, 16)


def test_memory_stats_page_bytes_of_a_small_pool():
    """memory_stats derived a page's bytes as pool // (n_pages + 1), which the allocator's alignment inflated for a
    small pool (two 1-token pages: 1024 bytes a page where a page is 768)."""
    m = load(kv_cache_memory=page_bytes(load(), 1) * 2, kv_page_tokens=1)
    m.generate(np.arange(3, 4)[None], max_new_tokens=2, eos_token_id=[])  # 2 slots: the prompt and one new token
    ms, st = m.memory_stats(), m.engine_stats()
    assert st["n_pages"] == 2 and ms["kv_cache_pool_peak_used"] == st["peak_pages_used"] * page_bytes(m, 1)


def test_prompt_that_can_never_fit_is_refused():
    base = load()
    m = load(kv_cache_memory=page_bytes(base, 4) * 4, kv_page_tokens=4)  # 16 tokens
    with pytest.raises(ValueError, match="kv_cache_memory"):
        m.generate(np.arange(3, 23)[None], max_new_tokens=2)
    # a prompt of exactly the pool's 16 tokens fits for one new token (its keys and values are never stored: it was
    # refused, "a prompt of 16 tokens does not fit the KV cache pool of 16 tokens"); a second new token outgrows it
    p = np.arange(3, 19)
    np.testing.assert_array_equal(m.generate(p[None], max_new_tokens=1, eos_token_id=[])[0, 16:],
                                  alone(m, p, max_new_tokens=1, eos_token_id=[]))
    with pytest.raises(MemoryError, match="kv_cache_memory"):
        m.generate(p[None], max_new_tokens=2, eos_token_id=[])
    assert m.engine_stats()["pages_used"] == 0
    with pytest.raises(MemoryError, match="kv_cache_memory"):
        m.generate(np.arange(3, 13)[None], max_new_tokens=20, eos_token_id=[])  # grows past the pool alone
    assert m.engine_stats()["pages_used"] == 0
    assert len(m.generate(np.arange(3, 8)[None], max_new_tokens=3)[0]) <= 8  # and it still serves


def test_context_limit_stops_like_max_length():
    m = load()
    ctx = m.config.max_position_embeddings
    with pytest.raises(ValueError, match="context"):
        m.generate(np.full((1, ctx), 5), max_new_tokens=1)


def stream_then_cancel(m, reads=1):
    """A 500-token generate streamed from a thread, cancelled by its consumer after `reads` pieces: the generate
    ends within 30 s with the cancellation."""
    from fastload.streamers import TextIteratorStreamer

    class Tok:
        eos_token_id = None

        def decode(self, ids, **kw):
            return " ".join(str(int(i)) for i in ids)

    st = TextIteratorStreamer(Tok(), skip_prompt=True)
    raised = []

    def run():
        try:
            m.generate(np.arange(3, 20)[None], max_new_tokens=500, eos_token_id=[], streamer=st)
        except Exception as e:  # noqa: BLE001 - the cancellation, checked below
            raised.append(e)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    it = iter(st)
    for _ in range(reads):
        next(it)
    st.cancel()
    th.join(30)
    assert not th.is_alive() and raised and "cancelled" in str(raised[0])


def test_streamer_cancel_frees_pages(qwen):
    stream_then_cancel(qwen)
    s = qwen.engine_stats()
    assert s["running"] == 0 and s["pages_used"] == 0, s


def test_engine_busy_when_queue_is_full():
    m = load(max_num_seqs=1, max_queue=1)
    core = m._engine_handle().core()
    r1 = core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=400, eos_token_ids=[])
    r1.wait(0)  # r1 runs: the one row of every step
    r2 = core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=400, eos_token_ids=[])  # waits
    with pytest.raises(fastload.EngineBusy, match="queue is full"):
        core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=2)
    r1.cancel()
    r2.cancel()
    assert r1.wait(1 << 30)[1] and r2.wait(1 << 30)[1]
    with pytest.raises(RuntimeError, match="cancelled"):
        r2.check()


def test_engine_off_runs_one_request_at_a_time():
    """engine=False: the same loop with one request per step, in order of arrival (there is no other loop): callers
    from threads get what each gets alone, and the engine never runs two at once."""
    m = load(engine=False)
    ps = prompts(4, seed=11, lo=3, hi=20)
    ref = [alone(m, p, max_new_tokens=4, eos_token_id=[]) for p in ps]
    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(lambda p: m.generate(p[None], max_new_tokens=4, eos_token_id=[])[0, len(p):], ps))
    assert all(np.array_equal(a, b) for a, b in zip(out, ref))
    st = m.engine_stats()
    assert st["peak_running"] == 1 and st["running"] == 0, st
    assert not hasattr(m._core, "generate")  # the pre-engine one-call loop is gone


def test_engine_options_are_checked():
    with pytest.raises(ValueError, match="kv_cache_memory"):
        load(kv_cache_memory=1.5)
    with pytest.raises(ValueError, match="max_num_seqs"):
        load(max_num_seqs=0)
    with pytest.raises(ValueError, match="power of two"):
        load(kv_page_tokens=12)
    m = load()
    with pytest.raises(TypeError, match="unknown"):
        m.configure_engine(kv_cache=5)
    m.configure_engine(kv_cache_memory=1 << 20)
    m.generate(np.arange(3, 9)[None], max_new_tokens=2)
    assert m.memory_stats()["kv_cache_pool"] >= (1 << 20) * 0.9
    # ints past 64 bits were cut to their low bits by the core's argument parsing (2**64 + 5 pages: a 5-page pool)
    for big in (1 << 64, (1 << 64) + page_bytes(m, 16) * 5):
        with pytest.raises(ValueError, match="kv_cache_memory.*2\\*\\*63"):
            load(kv_cache_memory=big)
    # less than one page (a tiny fraction, a few bytes): named here, not the core's "kv_bytes must be positive"
    for small in (1e-15, 100):
        tiny = load(kv_cache_memory=small)
        with pytest.raises(ValueError, match="kv_cache_memory.*less than one page"):
            tiny.generate(np.arange(3, 9)[None], max_new_tokens=2)
    m5 = load(kv_cache_memory=np.int64(page_bytes(m, 16) * 5))  # numpy integers are bytes, as Python's
    m5.generate(np.arange(3, 9)[None], max_new_tokens=2)
    assert m5.engine_stats()["n_pages"] == 5


def test_memory_stats_report_the_pool(qwen):
    qwen.generate(np.arange(3, 9)[None], max_new_tokens=2)
    ms = qwen.memory_stats()
    assert ms["kv_cache_pool"] > 0 and ms["kv_cache_pool_used"] == 0
    assert ms["workspace"] >= 0 and ms["allocated"] >= ms["weights"] + ms["kv_cache_pool"]


def test_chat_from_a_thread_pool_matches_the_loop(demo_gguf, demo_tok):
    """The field report's scenario: the same answers from a thread pool as from a loop. prefix_caching=False: the chat
    template's shared system prompt would otherwise be computed by whichever request comes first (the loop's first,
    a pool's first to arrive), over its own prompt's rows, which can round differently (README, prefix_caching)."""
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu", prefix_caching=False)
    qs = ["What is 2+2?", "Name a colour.", "Say hello.", "What is the capital of France?", "Count to three."]
    loop = [m.chat(demo_tok, q, max_new_tokens=12)[0] for q in qs]
    with ThreadPoolExecutor(5) as ex:
        pool = list(ex.map(lambda q: m.chat(demo_tok, q, max_new_tokens=12)[0], qs))
    assert pool == loop
    assert m.engine_stats()["prefix_hit_tokens"] == 0 and m.engine_stats()["pages_cached"] == 0


def test_dropping_the_model_frees_its_engine():
    import gc
    import weakref
    m = load()
    m.generate(np.arange(3, 9)[None], max_new_tokens=2)
    gc.disable()
    try:
        w = weakref.ref(m)
        del m
        assert w() is None  # freed by reference counting: no cycle through the engine handle keeps the pool alive
    finally:
        gc.enable()


def test_prompts_arriving_together_equal_each_alone():
    """Requests submitted at once: outputs equal each alone. (On the GPU their prompts, of different lengths, are read
    by one prefill forward, right-padded to the longest, each row's logits taken at its own last token; on the CPU
    one prompt a forward, as the kernel there depends on the row count.)"""
    m = load(kv_page_tokens=4, max_num_seqs=16)
    ps = prompts(10, seed=9, lo=2, hi=30)
    ref = [alone(m, p, max_new_tokens=5, eos_token_id=[]) for p in ps]
    core = m._engine_handle().core()
    reqs = [core.engine_submit(p.astype(np.int32), max_new_tokens=5) for p in ps]
    for r, a in zip(reqs, ref):
        assert r.wait(1 << 30)[1]
        r.check()
        assert np.array_equal(r.tokens(), a)


def test_same_first_page_waits_to_share_it():
    m = load(kv_page_tokens=4, max_num_seqs=16, prefix_caching=True)
    ps = shared_prompts(10, 24, 2, 6)
    ref = [alone(m, p, max_new_tokens=3, eos_token_id=[]) for p in ps]
    core = m._engine_handle().core()
    reqs = [core.engine_submit(p.astype(np.int32), max_new_tokens=3, eos_token_ids=[]) for p in ps]
    for r, a in zip(reqs, ref):
        assert r.wait(1 << 30)[1] and np.array_equal(r.tokens(), a)
    st = m.engine_stats()
    assert st["prefix_hit_tokens"] >= 5 * 24, st  # the first reads the 6 shared pages, the others take them


# ---- part 3: the shapes people use ------------------------------------------------------------------------------
def test_stop_strings_end_a_request_at_the_completing_token(demo_model, demo_tok):
    enc = demo_tok("1, 2, 3, 4, 5,", return_tensors="np")
    n = enc["input_ids"].shape[1]
    full = demo_model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[])
    text = demo_tok.decode(full[0, n:])
    assert " 8" in text, text
    out = demo_model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[], stop_strings=" 8",
                              tokenizer=demo_tok)
    got = demo_tok.decode(out[0, n:])
    assert got.endswith(" 8") and text.startswith(got) and out.shape[1] < full.shape[1]
    out2 = demo_model.generate(**enc, max_new_tokens=12, do_sample=False, eos_token_id=[], stop_strings=["zq", " 7"],
                               tokenizer=demo_tok)
    assert demo_tok.decode(out2[0, n:]).endswith(" 7")
    assert demo_model.engine_stats()["pages_used"] == 0
    with pytest.raises(ValueError, match="tokenizer"):
        demo_model.generate(**enc, max_new_tokens=4, stop_strings=" 8")
    with pytest.raises(TypeError, match="stop_strings"):
        demo_model.generate(**enc, max_new_tokens=4, stop_strings=[""], tokenizer=demo_tok)


def test_fastllm_response_and_stream_response(demo_model, demo_tok):
    want = demo_model.chat(demo_tok, "What is 2+3?", max_new_tokens=16)[0]
    assert demo_model.response("What is 2+3?", max_length=16) == want
    pieces = list(demo_model.stream_response("What is 2+3?", max_length=16))
    assert len(pieces) > 1 and "".join(pieces) == want
    whole = list(demo_model.stream_response("What is 2+3?", max_length=16, one_by_one=False))
    assert whole[-1] == want and all(want.startswith(w) for w in whole)


def test_stream_chat_from_threads_each_gets_its_own_answer(demo_model, demo_tok):
    qs = ["Say hello.", "Name a colour.", "What is 2+3?"]
    alone = [demo_model.chat(demo_tok, q, max_new_tokens=10)[0] for q in qs]

    def streamed(q):
        last = ""
        for resp, _ in demo_model.stream_chat(demo_tok, q, max_new_tokens=10):
            last = resp
        return last
    with ThreadPoolExecutor(3) as ex:
        assert list(ex.map(streamed, qs)) == alone


def test_max_time_ends_every_row_with_what_it_has(demo_model):
    """max_time (transformers): after that many seconds every row ends with the tokens it has, the right ones."""
    import time
    ids = np.arange(100, 106)[None]
    # the deadline scaled to this machine (a sanitizer build decodes the demo model ~12x slower): a few tokens' time
    t0 = time.perf_counter()
    demo_model.generate(np.repeat(ids, 2, 0), max_new_tokens=3, eos_token_id=[])
    step = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = demo_model.generate(np.repeat(ids, 2, 0), max_new_tokens=5000, eos_token_id=[], max_time=0.3 + 2 * step)
    assert 6 < out.shape[1] < 6 + 5000 and time.perf_counter() - t0 < 20 + 10 * step
    one = demo_model.generate(ids, max_new_tokens=5000, eos_token_id=[], max_time=0.2 + 2 * step)[0, 6:]
    assert 0 < len(one) < 5000
    assert np.array_equal(one, demo_model.generate(ids, max_new_tokens=len(one), eos_token_id=[])[0, 6:])
    s = demo_model.engine_stats()
    assert s["running"] == 0 and s["pages_used"] == 0, s
    with pytest.raises(ValueError, match="max_time"):
        demo_model.generate(ids, max_new_tokens=2, max_time=0)


def test_streaming_a_batch_gives_one_array_per_step_as_the_one_call_path(qwen):
    """A streamer on a batch: one array of B tokens per step, pad for rows that ended, the prompt first; the same
    arrays as the one-call path (engine=False)."""
    class Rec:
        def __init__(self):
            self.items = []

        def put(self, v):
            self.items.append(np.asarray(v).copy())

        def end(self):
            self.items.append("end")
    ps = prompts(3, seed=11, lo=4, hi=9)
    first = [alone(qwen, p, max_new_tokens=4, eos_token_id=[]) for p in ps]
    ids, mask = left_padded(ps)
    kw = dict(attention_mask=mask, max_new_tokens=6, eos_token_id=int(first[1][2]), pad_token_id=499)
    a, b = Rec(), Rec()
    out_a = qwen.generate(ids, streamer=a, **kw)
    if not _legacy:
        _legacy.append(load(engine=False))
    out_b = _legacy[0].generate(ids, streamer=b, **kw)
    assert np.array_equal(out_a, out_b)
    assert len(a.items) == len(b.items) and a.items[-1] == b.items[-1] == "end"
    for x, y in zip(a.items[:-1], b.items[:-1]):
        assert np.array_equal(x, y), (x, y)


def test_sampled_chat_from_threads_equals_the_loop(demo_gguf, demo_tok):
    """Sampled rows of a batch are drawn in parallel, each with its own seeded stream: the same answers as one by one."""
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu", prefix_caching=False)
    qs = ["Say hello.", "Name a colour.", "What is 2+3?", "Tell a joke.", "Count to five."]
    kw = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_p=0.9, top_k=40, repetition_penalty=1.1, seed=11)
    loop = [m.chat(demo_tok, q, **kw)[0] for q in qs]
    with ThreadPoolExecutor(5) as ex:
        pool = list(ex.map(lambda q: m.chat(demo_tok, q, **kw)[0], qs))
    assert pool == loop


def test_group_submit_queues_rows_together():
    """engine_submit with a list of prompts queues them under one lock (generate() does, so that a batch is scheduled
    the same way on every run): one Request per row, each with its own seed, equal to each submitted alone."""
    m = load(kv_page_tokens=4, max_num_seqs=16)
    ps = prompts(4, seed=3, lo=3, hi=12)
    core = m._engine_handle().core()
    kw = dict(max_new_tokens=6, do_sample=True, temperature=1.5, top_k=50, eos_token_ids=[])
    alone_out = []
    for b, p in enumerate(ps):
        r = core.engine_submit(p.astype(np.int32), seed=100 + b, **kw)
        assert r.wait(1 << 30)[1]
        alone_out.append(r.tokens())
    reqs = core.engine_submit([p.astype(np.int32) for p in ps], seed=[100 + b for b in range(len(ps))], **kw)
    assert isinstance(reqs, list) and len(reqs) == len(ps)
    for r, a in zip(reqs, alone_out):
        assert r.wait(1 << 30)[1]
        r.check()
        assert np.array_equal(r.tokens(), a)
    assert len({tuple(a) for a in alone_out}) > 1  # the seeds differ: so do the rows
    with pytest.raises(ValueError, match="list of seeds"):
        core.engine_submit(ps[0].astype(np.int32), seed=[1, 2], **kw)
    with pytest.raises(ValueError, match=r"input_ids\[1\]"):
        core.engine_submit([ps[0].astype(np.int32), np.zeros((2, 2))], **kw)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # one bad row: none of the group is queued
        core.engine_submit([ps[0].astype(np.int32), np.array([1, 10 ** 6])], **kw)
    assert m.engine_stats()["waiting"] == 0 and m.engine_stats()["running"] == 0


def test_group_larger_than_the_queue_enters_an_empty_queue():
    m = load(max_num_seqs=1, max_queue=1)
    out = m.generate(np.tile(np.arange(3, 9), (3, 1)), max_new_tokens=2, do_sample=False, eos_token_id=[])
    assert out.shape == (3, 8) and (out[0] == out[1]).all() and (out[1] == out[2]).all()


def test_huge_declared_context_costs_no_huge_tables(tmp_path):
    """A config declaring max_position_embeddings 2^31 - 1 (found by fuzz_python: a forward made the engine, whose
    block tables were sized by it, ~8.6 GB, a MemoryError): the tables follow the pool's pages, so a forward and a
    generate run as on the fixture."""
    from golden_util import checkpoint_copy
    d = checkpoint_copy("qwen2", tmp_path / "m", config={"max_position_embeddings": 2 ** 31 - 1})
    m = fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", torch_dtype="float32", threads=2,
                                                      kv_cache_memory=page_bytes(load(), 16) * 32)
    ids = np.array([[3, 17, 230, 5]])
    ref = load()
    np.testing.assert_array_equal(m(ids).logits, ref(ids).logits)
    out = m.generate(ids, max_new_tokens=6, eos_token_id=[])
    np.testing.assert_array_equal(out, ref.generate(ids, max_new_tokens=6, eos_token_id=[]))
    assert m.engine_stats()["n_pages"] == 32


def attention_ref(case, row, b, lo, i):
    """Attention of q|k|v row `row` (cache row b, keys lo..i) in float64: every head, concatenated."""
    nh, nkv, hd = case["nh"], case["nkv"], case["hd"]
    q = case["qkv"][row, :nh * hd].reshape(nh, hd).astype(np.float64) / np.sqrt(hd)
    k = case["kc"][b, lo:i + 1].astype(np.float64)
    v = case["vc"][b, lo:i + 1].astype(np.float64)
    out = []
    for h in range(nh):
        s = k[:, h // (nh // nkv)] @ q[h]
        p = np.exp(s - s.max())
        out.append((p / p.sum()) @ v[:, h // (nh // nkv)])
    return np.concatenate(out)


@pytest.mark.parametrize("B,nh,nkv,hd,L,shift,window", [
    (3, 9, 3, 64, 1500, 4, 0),       # the demo model's heads, rows of several chunks
    (2, 32, 8, 128, 700, 4, 300),    # Llama-3 8B's heads, sliding window
    (4, 4, 2, 64, 257, 0, 0),        # one-slot pages, a row just past one chunk
    (1, 6, 6, 32, 200, 4, 0),        # one chunk: the general kernel's arithmetic exactly
])
def test_cpu_decode_attention_in_key_chunks_equals_the_general_kernel(B, nh, nkv, hd, L, shift, window, monkeypatch):
    """Decode steps (one token a row) read every KV head of a block of keys together and cut long rows into chunks
    of at least 256 keys merged after (cpu_attention.c, attention_decode): the general kernel's result (one item a
    head, FASTLOAD_CPU_ATT_GENERAL=1) bit for bit where a row is one chunk, within float rounding otherwise, and a
    float64 reference."""
    rng = np.random.default_rng(L + B)
    case = paged_case(rng, B, 1, nh, nkv, hd, L, shift, starts=rng.integers(L // 2, L, B).astype(np.int32))
    got = paged_attention("cpu", case, window)
    monkeypatch.setenv("FASTLOAD_CPU_ATT_GENERAL", "1")
    ref = paged_attention("cpu", case, window)
    for b in range(B):
        i = int(case["starts"][b])
        lo = max(0, i - window + 1) if window else 0
        if i - lo + 1 <= 256:
            assert np.array_equal(got[b], ref[b]), b
        np.testing.assert_allclose(got[b], ref[b], rtol=0, atol=2e-6)
        np.testing.assert_allclose(got[b], attention_ref(case, b, b, lo, i), rtol=0, atol=1e-5)


def test_cpu_decode_attention_masked_chunks():
    """A key mask hiding the first 300 keys (left padding): the first chunk holds no key and weighs nothing in the
    merge; a row with every key masked gives zeros, as the general kernel."""
    rng = np.random.default_rng(9)
    nh, nkv, hd, L = 4, 2, 32, 600
    qkv = rng.standard_normal((2, (nh + 2 * nkv) * hd), dtype=np.float32)
    kc = rng.standard_normal((2, L, nkv, hd), dtype=np.float32)
    vc = rng.standard_normal((2, L, nkv, hd), dtype=np.float32)
    mask = np.ones((2, L), np.uint8)
    mask[0, :300] = 0
    mask[1, :] = 0
    out = _C.run_op("cpu", "attention", {"qkv": qkv, "k_cache": kc, "v_cache": vc, "kmask": mask},
                    {"B": 2, "T": 1, "start": L - 1, "n_heads": nh, "n_kv_heads": nkv, "scale": hd ** -0.5,
                     "act": "float32"})["out"]
    assert (out[1] == 0).all()
    q = qkv[0, :nh * hd].reshape(nh, hd).astype(np.float64) * hd ** -0.5
    for h in range(nh):
        s = kc[0, 300:, h // 2].astype(np.float64) @ q[h]
        p = np.exp(s - s.max())
        np.testing.assert_allclose(out[0, h * hd:(h + 1) * hd], (p / p.sum()) @ vc[0, 300:, h // 2], atol=1e-5)


@pytest.mark.parametrize("T,nh,nkv,window", [(1, 65, 1, 0), (5, 72, 1, 0), (3, 256, 2, 7), (1, 128, 1, 9)])
def test_cpu_attention_groups_over_64_heads(T, nh, nkv, window):
    """More than 64 query heads on one KV head (the decode kernel's slots): the general kernel takes them, its
    per-slot positions sized by the group (they were 64-entry stack arrays, written past their end: a SIGSEGV on the
    first forward of such a checkpoint). Against a float64 reference, causal and sliding-window."""
    rng = np.random.default_rng(nh + T)
    hd, L = 16, 40
    case = paged_case(rng, 2, T, nh, nkv, hd, L, 2)
    got = paged_attention("cpu", case, window)
    for b in range(2):
        for t in range(T):
            i = int(case["starts"][b]) + t
            lo = max(0, i - window + 1) if window else 0
            np.testing.assert_allclose(got[b * T + t], attention_ref(case, b * T + t, b, lo, i), rtol=0, atol=1e-5)


def _long_context_model(tmp_path, **kw):
    """The qwen2 fixture declaring a context of 2^20 tokens: a request of 10^6 new tokens runs until cancelled."""
    from golden_util import checkpoint_copy
    d = checkpoint_copy("qwen2", tmp_path / "long", config={"max_position_embeddings": 1 << 20})
    return fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", torch_dtype="float32", threads=2,
                                                         kv_cache_memory=page_bytes(load(), 16) * 8192, **kw)


def test_streamer_cancel_reaches_a_request_still_in_the_queue(tmp_path):
    """TextIteratorStreamer.cancel() while its request waits in the engine's queue (behind a running one): it leaves
    the queue at once and its generate() raises GenerationCancelled, without waiting for the running request (a
    put() only comes with a token, so the cancel used to wait for the request's admission)."""
    from fastload.streamers import GenerationCancelled, TextIteratorStreamer
    m = _long_context_model(tmp_path, max_num_seqs=1, max_queue=1)
    core = m._engine_handle().core()
    r1 = core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=10 ** 6, eos_token_ids=[])
    r1.wait(0)
    tok = type("Tok", (), {"decode": lambda self, ids, **k: "x" * len(ids)})()
    st = TextIteratorStreamer(tok, skip_prompt=True)
    res = []

    def b():
        try:
            m.generate(np.arange(3, 10)[None], max_new_tokens=20, eos_token_id=[], streamer=st)
            res.append("finished")
        except GenerationCancelled as e:
            res.append(e)
    th = threading.Thread(target=b)
    th.start()
    for _ in range(2000):
        if m.engine_stats()["waiting"] == 1:
            break
        threading.Event().wait(0.005)
    assert m.engine_stats()["waiting"] == 1
    st.cancel()
    th.join(60)
    try:
        assert not th.is_alive() and isinstance(res[0], GenerationCancelled), res
        assert not r1.wait(0, timeout=0)[1]  # the running request never ended meanwhile
        assert m.engine_stats()["waiting"] == 0
        m.generate(np.arange(3, 6)[None], max_new_tokens=0)  # the queue slot is free again (max_queue=1)
    finally:
        r1.cancel()
        r1.wait(1 << 30)


def test_request_wait_timeout_with_a_fraction_of_a_millisecond(tmp_path):
    """Request.wait(timeout) ends at its deadline on a monotonic clock: a timeout with a fractional millisecond
    (30.5 ms) once spun on 0 ms slices until a token came."""
    import time
    m = _long_context_model(tmp_path, max_num_seqs=1)
    core = m._engine_handle().core()
    r1 = core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=10 ** 6, eos_token_ids=[])
    r1.wait(0)
    r2 = core.engine_submit(np.arange(3, 10, dtype=np.int32), max_new_tokens=5, eos_token_ids=[])  # queued
    try:
        t0 = time.monotonic()
        n, done = r2.wait(0, timeout=0.0305)
        assert (n, done) == (0, False) and time.monotonic() - t0 < 5  # (it spun until r1 ended: never, here)
        t0 = time.monotonic()
        out = m.generate(np.arange(3, 10)[None], max_new_tokens=5, max_time=0.05, eos_token_id=[])  # queued too
        assert out.shape[1] == 7 and time.monotonic() - t0 < 5  # max_time ends it with no token
    finally:
        r1.cancel()
        r2.cancel()
        r1.wait(1 << 30)
        r2.wait(1 << 30)


def test_max_time_with_stop_strings_keeps_every_rows_tokens(tmp_path):
    """max_time and stop_strings on a batch: rows after the first keep the tokens they made by the deadline (they
    were all dropped: the first row's collection used up the deadline, the others ended with none)."""
    m = _long_context_model(tmp_path)
    tok = type("Tok", (), {"decode": lambda self, ids, **k: " ".join(map(str, ids))})()
    ids = np.tile(np.arange(3, 10), (3, 1))
    out = m.generate(ids, max_new_tokens=10 ** 5, max_time=0.3, eos_token_id=[], stop_strings=["never"],
                     tokenizer=tok, pad_token_id=-7 % 500)
    if out.shape[1] == 7:
        pytest.skip("this machine made no token in 0.3 s")
    full = m.generate(ids[:1], max_new_tokens=out.shape[1] - 7, eos_token_id=[])[0, 7:]
    n = [int(np.argmax(np.append(row[7:] != full, True))) for row in out]  # each row: the tokens equal to full's
    assert min(n) >= 1, n  # (the rows run in the same steps; each is read at its own time after the deadline)
    for b in range(3):
        assert (out[b, 7 + n[b]:] == 493).all()  # then padding


def test_cpu_decode_rows_past_a_block_of_four_are_batch_independent():
    """The CPU decode matmul's rows are the same bits in any batch of up to 16 (the engine's greedy-equals-alone);
    a weight whose row count is not a multiple of 4 (a vocabulary of 451 or 50257, a router of 6 experts) took the
    GEMM, whose blocking depends on the batch: logits 1e-6..1e-5 apart."""
    rng = np.random.default_rng(0)
    for R in (451, 6, 13):
        W = rng.standard_normal((R, 72)).astype(np.float32)
        x = rng.standard_normal((9, 72)).astype(np.float32)
        one = _C.run_op("cpu", "matmul", {"x": x[:1], "W": W}, {"act": "float32"})["y"]
        for n in (2, 5, 9):
            y = _C.run_op("cpu", "matmul", {"x": x[:n], "W": W}, {"act": "float32"})["y"]
            assert np.array_equal(y[:1], one), (R, n)


def test_dynamic_ntk_preemption_always_replays():
    """Recompute would read a preempted request's generated tokens with the NTK base of its whole length (their
    keys had their own positions' base): logits O(1) off. Dynamic NTK models replay whatever preemption_mode says."""
    dyn = dict(rope_scaling={"rope_type": "dynamic", "factor": 4.0}, max_position_embeddings=24)
    base = load(**dyn)
    m = load(kv_cache_memory=page_bytes(base, 4) * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16,
             preemption_mode="recompute", **dyn)
    ref = load(engine=False, **dyn)
    # Which request is preempted, and whether it had made tokens yet (only those are replayed), depends on how the
    # threads' calls arrive: on a 16-core GPU host the one preemption of the first round hit a request still in its
    # prompt (replayed_tokens 0). Rounds of other prompts until one replays; every round's outputs must be exact.
    for seed in range(5, 25):
        ps = prompts(6, seed=seed, lo=8, hi=16)
        want = [ref.generate(p[None], max_new_tokens=12, eos_token_id=[])[0, len(p):] for p in ps]
        with ThreadPoolExecutor(len(ps)) as ex:
            got = list(ex.map(lambda p: m.generate(p[None], max_new_tokens=12, eos_token_id=[])[0, len(p):], ps))
        assert all(np.array_equal(a, b) for a, b in zip(want, got)), seed
        st = m.engine_stats()
        if st["preemptions"] > 0 and st["replayed_tokens"] > 0:
            break
    assert st["preemptions"] > 0 and st["replayed_tokens"] > 0, st


def test_requests_held_after_configure_engine_are_released_safely():
    """A finished call's requests can outlive the engine that ran them (a TextIteratorStreamer keeps them for
    cancel(), a kept exception's traceback holds generate's frame): configure_engine() frees that engine, and
    releasing them afterwards locked its freed mutex (a use-after-free valgrind showed, hunt20; ASan does not see a
    lock taken inside libc). The engine's struct now lives until the last of them is released: the release reads
    its handle count, which the sanitized CI run checks is not freed memory."""
    import gc

    class Keep:  # a streamer that keeps what generate() binds to it, as TextIteratorStreamer does
        def put(self, value):
            pass

        def end(self):
            pass

        def _fastload_bind(self, reqs):
            self.reqs = list(reqs)

    m = load()
    ids = prompts(2, seed=3)[0][None]
    k = Keep()
    first = m.generate(ids, max_new_tokens=4, streamer=k, eos_token_id=[])
    assert len(k.reqs) == 1
    m.configure_engine(max_num_seqs=4)  # frees the engine k's request belongs to
    k.reqs[0].cancel()  # calls on the finished request still work
    del k
    gc.collect()
    assert np.array_equal(m.generate(ids, max_new_tokens=4, eos_token_id=[]), first)
