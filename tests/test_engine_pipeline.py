"""The engine's pipelined decode (csrc/engine.c, la_*): when nothing else is queued, a decode step is launched before
the tokens of the step before it are read, fed with that step's tokens where they are (on CUDA, the device). It is
on by default where the backend has the device hooks (CUDA); FASTLOAD_ENGINE_PIPELINE=1 turns it on for the CPU
backend too (the engine's own argmax over the float32 logits), which is how these tests run the same logic here.
What must hold: every request's tokens are those of the same request alone and of the step-by-step engine; a row
that ends on eos while the next step is already running has that row dropped (wasted_rows); cancelling, preemption
and a pool that runs dry still work; pages all come back."""
import threading

import numpy as np
import pytest

from test_engine import alone, left_padded, load, page_bytes, prompts, stream_then_cancel, threads_equal_alone


@pytest.fixture()
def piped(monkeypatch):
    """A loader of the qwen2 fixture with the pipelined decode on (read when the engine is made)."""
    monkeypatch.setenv("FASTLOAD_ENGINE_PIPELINE", "1")
    return load


def test_off_by_default_on_the_cpu_and_on_when_asked(monkeypatch):
    monkeypatch.delenv("FASTLOAD_ENGINE_PIPELINE", raising=False)
    m = load()
    m.generate(np.arange(3, 12)[None], max_new_tokens=6, eos_token_id=[])
    assert m.engine_stats()["pipelined_steps"] == 0
    monkeypatch.setenv("FASTLOAD_ENGINE_PIPELINE", "1")
    m = load()
    m.generate(np.arange(3, 12)[None], max_new_tokens=6, eos_token_id=[])
    st = m.engine_stats()
    assert st["pipelined_steps"] >= 3 and st["wasted_rows"] == 0, st  # ends by count: nothing computed past it


def test_concurrent_greedy_equals_alone(piped):
    m = piped()
    # 30 new tokens: the CPU reads one prompt a step, so the batch is all decoding (quiet) only after the 12th
    threads_equal_alone(m, prompts(12, seed=1), max_new_tokens=30)
    st = m.engine_stats()
    assert st["pipelined_steps"] > 0 and st["pages_used"] == 0 and st["running"] == 0, st


def test_rows_ending_on_eos_mid_pipeline(piped):
    """Row 0 stops at its sixth token while the step after it is already running: its row of that step is dropped,
    the batch goes on, and the output equals the step-by-step engine's and the one-call path's."""
    ps = prompts(3, seed=4)
    first = [alone(load(), p, max_new_tokens=8) for p in ps]
    eos = int(first[0][5])
    ids, mask = left_padded(ps)
    m = piped()
    out = m.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=499)
    legacy = load(engine=False).generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=eos, pad_token_id=499)
    assert np.array_equal(out, legacy)
    st = m.engine_stats()
    assert st["pipelined_steps"] > 0 and st["wasted_rows"] >= 1 and st["pages_used"] == 0, st


def test_different_lengths_from_threads(piped):
    """Requests of 1 to 12 new tokens from threads: each ends by count exactly, arrivals break the pipeline and it
    resumes."""
    m = piped()
    ps = prompts(8, seed=9)
    ref = [alone(m, p, max_new_tokens=1 + 11 * i // 7) for i, p in enumerate(ps)]
    outs = [None] * len(ps)

    def run(i):
        outs[i] = m.generate(ps[i][None], max_new_tokens=1 + 11 * i // 7, eos_token_id=[])[0, len(ps[i]):]
    ts = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    for i in range(len(ps)):
        assert np.array_equal(outs[i], ref[i]), i
    assert m.engine_stats()["pages_used"] == 0


def test_small_pool_preempts_and_keeps_outputs(piped):
    """A pool of 14 pages of 4 tokens for 6 requests of ~24 tokens (one batched call: the same schedule every run):
    the pipelined step takes its next page only when one is free, else the ordinary step (which may preempt) runs."""
    m = piped(kv_cache_memory=page_bytes(load(), 4) * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16)
    ps = prompts(6, seed=5, lo=8, hi=16)
    ids, mask = left_padded(ps)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[], pad_token_id=0)
    for b, p in enumerate(ps):
        assert np.array_equal(out[b, ids.shape[1]:], alone(m, p, max_new_tokens=12, eos_token_id=[])), b
    st = m.engine_stats()
    assert st["preemptions"] > 0 and st["peak_pages_used"] <= 14 and st["pages_used"] == 0, st
    assert st["pipelined_steps"] > 0, st


def test_streamer_cancel_frees_pages(piped):
    m = piped()
    stream_then_cancel(m, reads=5)
    s = m.engine_stats()
    assert s["running"] == 0 and s["pages_used"] == 0 and s["pipelined_steps"] > 0, s


def test_sampled_rows_are_not_pipelined(piped):
    """Sampling happens on the host: such a batch runs step by step, with the same tokens as alone."""
    m = piped()
    threads_equal_alone(m, prompts(4, seed=2), max_new_tokens=8, do_sample=True, temperature=0.9, top_k=50,
                        seed=7)
    assert m.engine_stats()["pipelined_steps"] == 0


def test_zero_turns_it_off(monkeypatch):
    monkeypatch.setenv("FASTLOAD_ENGINE_PIPELINE", "0")
    m = load()
    m.generate(np.arange(3, 12)[None], max_new_tokens=6, eos_token_id=[])
    assert m.engine_stats()["pipelined_steps"] == 0


def test_forced_eos_and_rules_hold_in_a_pipeline(piped, monkeypatch):
    """A greedy row with forced_eos_token_id takes the device argmax until its last two tokens (a step chained at
    token n computes token n + 1): its last token is the forced one, as step by step; plain rows beside it pipeline."""
    m = piped()
    p = prompts(1, seed=7)[0]
    out = m.generate(p[None], max_new_tokens=12, eos_token_id=[], forced_eos_token_id=5)
    assert out[0, -1] == 5 and m.engine_stats()["pipelined_steps"] > 0
    monkeypatch.setenv("FASTLOAD_ENGINE_PIPELINE", "0")
    ref = load()
    assert np.array_equal(out, ref.generate(p[None], max_new_tokens=12, eos_token_id=[], forced_eos_token_id=5))
    kw = dict(max_new_tokens=12, eos_token_id=[], no_repeat_ngram_size=2, sequence_bias={(7,): 3.0})
    assert np.array_equal(m.generate(p[None], **kw), ref.generate(p[None], **kw))
