"""Beam search (generate(num_beams > 1), csrc/engine.c "beam search"): transformers 5's _beam_search, greedy.

The engine's beams are rows of its batch over the paged KV cache (full pages shared, a partly filled last page copied
when a beam forks). They are held here to a numpy port of transformers' algorithm (generation/utils.py _beam_search
and its helpers, written from its text: top-k continuations, running beams, finished hypotheses, the early-stop
heuristic) run on the model's own forward logits, each step recomputed from the whole sequence (no cache); and, where
torch and transformers are installed, to transformers' generate itself. No timing assertions.
"""
import importlib.util
import threading

import numpy as np
import pytest

import fastload
from golden_util import load_fixture as load, model_dir


@pytest.fixture(scope="module")
def qwen():
    return load()


# ---- the reference -------------------------------------------------------------------------------------------------
def _topk(a, k):
    """torch.topk's values and indices, ties in index order (the engine's order; torch leaves it unspecified)."""
    idx = np.argsort(-a, kind="stable")[:k]
    return a[idx], idx


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    s = np.log(np.exp((x - m).astype(np.float64)).sum(axis=-1, keepdims=True)).astype(np.float32)
    return (x - m) - s


def reference_beam_search(model, prompt, K, max_new, eos=(), length_penalty=1.0, early_stopping=False, n_ret=1,
                          process=None):
    """transformers' _beam_search for one row, on `model`'s logits of each whole sequence. process(seq, logprobs,
    n_new) -> logprobs: the logits processors. Returns [(generated ids, score, beam indices)] of the first n_ret
    hypotheses, and the steps' [K, V] processed log-probs (transformers' scores)."""
    P = len(prompt)
    max_length = P + max_new
    keep = max(2, 1 + len(eos)) * K
    running = np.zeros((K, max_length), np.int64)
    running[:, :P] = prompt
    seqs, lens = running.copy(), np.zeros(K, int)
    hist, fhist, all_scores = np.full((K, max_new), -1), np.full((K, max_new), -1), []
    run_scores = np.full(K, -1e9, np.float32)
    run_scores[0] = 0
    beam_scores, fin, heur, cur = np.full(K, -1e9, np.float32), np.zeros(K, bool), True, P
    while True:
        lg = np.stack([np.asarray(model(running[k, :cur][None]).logits)[0, -1] for k in range(K)]).astype(np.float32)
        lp = _log_softmax(lg)
        if process is not None:
            lp = np.stack([process(running[k, :cur], lp[k].copy(), cur - P) for k in range(K)])
        all_scores.append(lp)
        V = lg.shape[1]
        tv, ti = _topk((lp + run_scores[:, None]).reshape(-1).astype(np.float32), keep)
        cb, ct = ti // V, ti % V
        tseq = running[cb].copy()
        tseq[:, cur] = ct
        thist = hist[cb].copy()
        thist[:, cur - P] = cb
        hits = np.array([int(t) in eos or cur + 1 >= max_length for t in ct])
        rl = (tv + hits.astype(np.float32) * np.float32(-1e9)).astype(np.float32)
        nj = _topk(rl, K)[1]
        fs = (tv / np.float32((cur + 1 - P) ** length_penalty)).astype(np.float32)
        fs = fs + np.float32(-1e9 if fin.all() and early_stopping is True else 0.0)
        fs = fs + np.float32(0.0 if heur else -1e9)
        just = hits & (np.arange(keep) < K)
        fs = (fs + (~just).astype(np.float32) * np.float32(-1e9)).astype(np.float32)
        ms = np.concatenate([beam_scores, fs])
        mi = _topk(ms, K)[1]
        seqs = np.concatenate([seqs, tseq])[mi]
        lens = np.concatenate([lens, np.full(keep, cur + 1 - P)])[mi]
        fhist = np.concatenate([fhist, thist])[mi]
        hist = thist[nj]
        beam_scores, fin = ms[mi], np.concatenate([fin, just])[mi]
        running, run_scores = tseq[nj], rl[nj]
        cur += 1
        bl = max_length - P if early_stopping == "never" and length_penalty > 0 else cur - P
        best = np.float32(run_scores[0] / np.float32(bl ** length_penalty))
        heur = heur and bool((best > np.where(fin, beam_scores.min(), np.float32(-1e9))).any())
        if not (heur and not (fin.all() and early_stopping is True) and not hits.all()):
            break
    return [(seqs[i, P:P + lens[i]], float(beam_scores[i]), fhist[i, :lens[i]]) for i in range(n_ret)], all_scores


# n_eos: eos ids taken from the prompt's greedy continuation (its 3rd, 5th and 2nd new tokens), which the beams meet
# within a few steps: hypotheses end early, so finished beams, the early-stop heuristic and ragged outputs are exercised
CASES = [
    dict(num_beams=2, max_new_tokens=6, n_eos=0),
    dict(num_beams=4, max_new_tokens=8, n_eos=1, num_return_sequences=3),
    dict(num_beams=3, max_new_tokens=12, n_eos=2, length_penalty=0.5, early_stopping=True, num_return_sequences=2),
    dict(num_beams=4, max_new_tokens=9, n_eos=3, length_penalty=2.0, early_stopping="never", num_return_sequences=4),
    dict(num_beams=5, max_new_tokens=15, n_eos=3, length_penalty=-1.0),
    dict(num_beams=4, max_new_tokens=20, n_eos=2, early_stopping=True, num_return_sequences=4),
]


def _prompt(n, seed):
    return np.random.default_rng(seed).integers(3, 500, size=n).astype(np.int64)


def _eos_ids(model, prompt, n):
    g = np.asarray(model.generate(prompt[None], max_new_tokens=5, eos_token_id=None))[0, len(prompt):].tolist()
    out = []
    for t in (g[2], g[4], g[1]):
        if len(out) < n and t not in out:
            out.append(int(t))
    return out


def _case(model, prompt, case):
    kw = {k: v for k, v in case.items() if k != "n_eos"}
    kw["eos_token_id"] = _eos_ids(model, prompt, case["n_eos"]) or None
    return kw


def _check(model, prompt, kw, process=None, tol=1e-5, **gen):
    """model's beam search against the reference on its own logits: the same tokens, beam_indices and fill;
    sequences_scores and every step's scores within tol (relative, at least absolute 1e-5); compute_transition_scores
    consistent with sequences_scores."""
    out = model.generate(prompt[None], do_sample=False, return_dict_in_generate=True, output_scores=True,
                         pad_token_id=0, **kw, **gen)
    eos = tuple(kw.get("eos_token_id") or ())
    ref, steps = reference_beam_search(model, prompt, kw["num_beams"], kw["max_new_tokens"], eos=eos,
                                       length_penalty=kw.get("length_penalty", 1.0),
                                       early_stopping=kw.get("early_stopping", False),
                                       n_ret=kw.get("num_return_sequences", 1), process=process)
    seq, sc, bi = np.asarray(out.sequences), np.asarray(out.sequences_scores), np.asarray(out.beam_indices)
    P, n_new = len(prompt), max(len(t) for t, _, _ in ref)
    assert seq.shape == (len(ref), P + n_new), (seq.shape, [t.tolist() for t, _, _ in ref])
    assert bi.shape == (len(ref), n_new)
    for i, (toks, score, hist) in enumerate(ref):
        assert (seq[i, :P] == prompt).all()
        assert seq[i, P:P + len(toks)].tolist() == toks.tolist(), (i, seq[:, P:].tolist(), [t.tolist() for t, _, _ in ref])
        assert (seq[i, P + len(toks):] == (eos[0] if eos else -1)).all()  # transformers' fill after a short hypothesis
        assert abs(sc[i] - score) <= tol * max(1.0, abs(score)), (i, sc.tolist(), [s for _, s, _ in ref])
        assert bi[i, :len(hist)].tolist() == hist.tolist() and (bi[i, len(hist):] == -1).all(), (i, bi.tolist())
    # transformers' scores: every step's processed log-probs of the running beams
    assert len(out.scores) == len(steps)
    for a, b in zip(out.scores, steps):
        np.testing.assert_allclose(np.asarray(a), b, rtol=tol, atol=tol)
    # compute_transition_scores with beam_indices: summed over a hypothesis and length-penalised, its sequence score
    # (transformers' docstring's check)
    ts = np.asarray(model.compute_transition_scores(out.sequences, out.scores, out.beam_indices))
    lens = (bi >= 0).sum(axis=1)
    lp = kw.get("length_penalty", 1.0)
    np.testing.assert_allclose(ts.sum(axis=1) / lens.astype(np.float64) ** lp, sc, rtol=1e-4, atol=1e-5)
    return ref


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("plen", [5, 33])
def test_beam_search_equals_the_reference(qwen, case, plen):
    """Prompts of 5 and 33 tokens (pages of 16: a beam that forks copies a partly filled last page, and shares the
    full ones), the settings of transformers' beam search, eos ids that end hypotheses early."""
    p = _prompt(plen, case)
    _check(qwen, p, _case(qwen, p, CASES[case]))


def test_reference_cases_end_hypotheses_early(qwen):
    """The eos ids of CASES do end hypotheses before max_new_tokens (else finished beams would go untested)."""
    short = 0
    for i, case in enumerate(CASES[1:], 1):
        for plen in (5, 33):
            p = _prompt(plen, i)
            kw = _case(qwen, p, case)
            ref, _ = reference_beam_search(qwen, p, kw["num_beams"], kw["max_new_tokens"], eos=tuple(kw["eos_token_id"]),
                                           n_ret=kw.get("num_return_sequences", 1))
            short += sum(len(t) < kw["max_new_tokens"] for t, _, _ in ref)
    assert short >= 5, short


def test_beam_search_with_logits_processors(qwen):
    """repetition_penalty, no_repeat_ngram_size and min_new_tokens act on each beam's log-probabilities (transformers'
    processors on log_softmax of the logits), before the beam scores are added."""
    p = _prompt(17, 7)
    eos = _eos_ids(qwen, p, 2)
    kw = dict(num_beams=3, max_new_tokens=10, eos_token_id=eos)

    def process(seq, lp, n_new):
        seen = np.unique(seq)
        v = lp[seen]
        lp[seen] = np.where(v < 0, v * np.float32(1.3), v / np.float32(1.3))
        if len(seq) >= 2:  # no bigram twice: the tokens that followed the last token before
            last = seq[-1]
            for i in range(len(seq) - 1):
                if seq[i] == last:
                    lp[seq[i + 1]] = -np.inf
        if n_new < 4:
            lp[eos] = -np.inf
        return lp
    _check(qwen, p, kw, process=process, repetition_penalty=1.3, no_repeat_ngram_size=2,
           min_new_tokens=4)


def test_beam_search_batch_rows_are_their_own_searches(qwen):
    """A left-padded batch: each row's hypotheses are those of the row alone, num_return_sequences rows per input row
    in transformers' order (row b's at b * n .. b * n + n - 1), padded to the longest."""
    ps = [_prompt(n, 40 + n) for n in (4, 9, 13)]
    T = 13
    ids, mask = np.zeros((3, T), np.int64), np.zeros((3, T), np.int64)
    for b, p in enumerate(ps):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    kw = dict(num_beams=3, max_new_tokens=10, eos_token_id=_eos_ids(qwen, ps[1], 2), num_return_sequences=2,
              pad_token_id=0)
    out = np.asarray(qwen.generate(ids, attention_mask=mask, **kw))
    assert out.shape[0] == 6
    for b, p in enumerate(ps):
        alone = np.asarray(qwen.generate(p[None], **kw))
        for i in range(2):
            assert (out[2 * b + i, :T] == ids[b]).all()
            n = alone.shape[1] - len(p)
            assert out[2 * b + i, T:T + n].tolist() == alone[i, len(p):].tolist()
            assert (out[2 * b + i, T + n:] == kw["eos_token_id"][0]).all()


def test_beams_share_the_prompt_pages(qwen):
    """K beams of a long prompt hold its full pages once (reference counts) plus a page each for their own tokens, not
    K copies of the prompt."""
    m = load()
    m.configure_engine(kv_page_tokens=16)
    p = _prompt(100, 3)  # 6 full pages and 4 tokens of a 7th (the fixture's context is 128)
    out = np.asarray(m.generate(p[None], num_beams=4, max_new_tokens=6, eos_token_id=None, pad_token_id=0))
    st = m.engine_stats()
    assert out.shape == (1, 106)
    assert st["peak_pages_used"] <= 6 + 4 + 4, st  # 4 x 7 = 28 without sharing


def test_beam_search_beside_other_requests_from_threads(qwen):
    """Beam searches and greedy requests from several threads at once, in one engine: every answer is the one its
    request gives alone."""
    threads_match_alone(load())


def threads_match_alone(m, rounds=2):
    """Two beam searches and two greedy requests from four threads at once, `rounds` times: each answer equals the
    request alone; nothing is left running. (The GPU test runs it too.)"""
    ps = [_prompt(n, 100 + n) for n in (6, 20, 35, 11)]
    kws = [dict(num_beams=3, max_new_tokens=8, eos_token_id=_eos_ids(m, ps[0], 1)),
           dict(max_new_tokens=12, eos_token_id=None),
           dict(num_beams=2, max_new_tokens=10, eos_token_id=_eos_ids(m, ps[2], 3), num_return_sequences=2),
           dict(max_new_tokens=9, eos_token_id=None)]
    alone = [np.asarray(m.generate(p[None], pad_token_id=0, **kw)) for p, kw in zip(ps, kws)]
    got = [None] * len(ps)

    def run(i):
        got[i] = np.asarray(m.generate(ps[i][None], pad_token_id=0, **kws[i]))
    for _ in range(rounds):
        ths = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
        for t in ths:
            t.start()
        for t in ths:
            t.join()
        for a, g in zip(alone, got):
            assert g.tolist() == a.tolist()
    assert m.engine_stats()["running"] == 0 and m.engine_stats()["pages_used"] == 0


def test_beam_search_in_a_small_pool_fails_clearly_and_frees_its_pages():
    """A pool that cannot hold the beams: a MemoryError naming kv_cache_memory; its pages come back (a greedy request
    of the same prompt runs after it)."""
    m = load()
    c = m.config
    hd = c.hidden_size // c.num_attention_heads
    page = 16 * 2 * c.num_hidden_layers * c.num_key_value_heads * hd * 4
    m.configure_engine(kv_cache_memory=3 * page, kv_page_tokens=16)
    p = _prompt(20, 5)
    with pytest.raises(MemoryError, match="kv_cache_memory"):
        m.generate(p[None], num_beams=4, max_new_tokens=40, eos_token_id=None)
    assert m.engine_stats()["pages_used"] == 0
    assert np.asarray(m.generate(p[None], max_new_tokens=3, eos_token_id=None)).shape == (1, 23)


def test_beam_searches_that_outgrow_the_pool_together_wait_and_give_their_answers():
    """A pool that holds each of these beam searches alone but not all at once: the newest yields and starts again
    from its prompt (beam search is deterministic), nothing fails, every answer is the one it gives alone, and every
    page comes back. Submitted to the engine together (no waiting in between), so they do run at once."""
    m = load()
    c = m.config
    hd = c.hidden_size // c.num_attention_heads
    page = 16 * 2 * c.num_hidden_layers * c.num_key_value_heads * hd * 4
    m.configure_engine(kv_cache_memory=18 * page, kv_page_tokens=16)
    core = m._engine_handle().core()
    ps = [_prompt(n, 300 + n).astype(np.int32) for n in (20, 24, 9, 30)]
    kws = [dict(num_beams=4, max_new_tokens=30), dict(num_beams=3, max_new_tokens=28), dict(max_new_tokens=40),
           dict(num_beams=2, max_new_tokens=25, num_return_sequences=2)]

    def answer(q, kw):
        while not q.wait(1 << 30, timeout=60)[1]:
            pass
        q.check()
        return [b[0].tolist() for b in q.beams()] if kw.get("num_beams", 1) > 1 else q.tokens().tolist()
    alone = [answer(core.engine_submit(p, eos_token_ids=[], **kw), kw) for p, kw in zip(ps, kws)]
    pre = m.engine_stats()["preemptions"]
    qs = [core.engine_submit(p, eos_token_ids=[], **kw) for p, kw in zip(ps, kws)]
    assert [answer(q, kw) for q, kw in zip(qs, kws)] == alone
    st = m.engine_stats()
    assert st["preemptions"] > pre and st["pages_used"] == 0, st  # the case must make someone yield


def test_beam_search_arguments():
    m = load()
    p = _prompt(5, 0)[None]
    with pytest.raises(ValueError, match="num_return_sequences"):
        m.generate(p, num_beams=2, num_return_sequences=3, max_new_tokens=3)
    with pytest.raises(NotImplementedError, match="do_sample"):
        m.generate(p, num_beams=2, do_sample=True, max_new_tokens=3)
    with pytest.raises(NotImplementedError, match="max_time"):
        m.generate(p, num_beams=2, max_time=5.0, max_new_tokens=3)
    with pytest.raises(ValueError, match="early_stopping"):
        m.generate(p, num_beams=2, early_stopping="sometimes", max_new_tokens=3)
    with pytest.raises(ValueError, match="streamer"):
        m.generate(p, num_beams=2, max_new_tokens=3, streamer=fastload.TextStreamer(None))
    m.configure_engine(max_num_seqs=2)
    with pytest.raises(ValueError, match="max_num_seqs"):
        m.generate(p, num_beams=3, max_new_tokens=3)
    with pytest.raises(ValueError, match="engine=False"):
        load(engine=False).generate(p, num_beams=2, max_new_tokens=3)
    out = m.generate(p, num_beams=2, max_new_tokens=0)  # nothing to generate: the prompt
    assert np.asarray(out).tolist() == p.tolist()


def test_the_models_generation_config_beams_are_used_but_not_when_streaming(tmp_path):
    """num_beams from the model's generation_config.json is beam search (transformers); a streamed call of that model
    warns and goes on greedy (a stream_chat or server request of such a model still runs)."""
    import json
    import shutil
    d = tmp_path / "m"
    shutil.copytree(model_dir("qwen2"), d)
    gc = json.loads((d / "generation_config.json").read_text())
    gc.update(num_beams=3)
    (d / "generation_config.json").write_text(json.dumps(gc))
    m = fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", torch_dtype="float32", threads=2)
    plain = load()
    p = _prompt(9, 2)[None]
    kw = dict(max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert np.asarray(m.generate(p, **kw)).tolist() == np.asarray(plain.generate(p, num_beams=3, **kw)).tolist()
    got = []

    class S:
        def put(self, v):
            got.append(np.asarray(v).ravel().tolist())

        def end(self):
            pass
    with pytest.warns(UserWarning, match="cannot stream"):
        out = m.generate(p, streamer=S(), **kw)
    assert np.asarray(out).tolist() == np.asarray(plain.generate(p, **kw)).tolist()


HAVE_PEER = all(importlib.util.find_spec(x) for x in ("torch", "transformers"))


@pytest.mark.skipif(not HAVE_PEER, reason="torch and transformers are needed for the transformers peer")
@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_beam_search_equals_transformers(name):
    """transformers' own generate(num_beams=...) on the fixtures in float32: the same sequences, sequences_scores
    within 1e-4, every case of CASES and the logits processors, and a left-padded batch."""
    import torch
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=torch.float32).eval()
    m = load(name)
    cases = CASES + [dict(num_beams=3, max_new_tokens=10, n_eos=1, repetition_penalty=1.3, no_repeat_ngram_size=2,
                          min_new_tokens=3),
                     dict(num_beams=2, max_new_tokens=7, n_eos=1, forced_eos_token_id=[7]),
                     dict(num_beams=3, max_new_tokens=8, n_eos=2, begin_suppress_tokens=[163], suppress_tokens=[46],
                          bad_words_ids=[[63]])]
    for i, case in enumerate(cases):
        for plen in (5, 17, 33):
            p = _prompt(plen, 200 + i)
            kw = _case(m, p, case)
            ids = torch.tensor(p[None])
            with torch.no_grad():
                o = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, return_dict_in_generate=True,
                                output_scores=True, pad_token_id=0, **kw)
            f = m.generate(p[None], do_sample=False, return_dict_in_generate=True, output_scores=True, pad_token_id=0,
                           **kw)
            assert np.asarray(f.sequences).tolist() == o.sequences.numpy().tolist(), (i, plen, kw)
            # sums of up to 15 log-probs, each off by matmul order (below), times len ** -length_penalty: 1e-5 was
            # too tight (1.6e-5 at length_penalty -1 with torch 2.15's CUDA wheel on the CPU)
            np.testing.assert_allclose(np.asarray(f.sequences_scores), o.sequences_scores.numpy(), rtol=1e-4,
                                       atol=1e-4, err_msg=str((i, plen, kw)))
            assert np.asarray(f.beam_indices).tolist() == o.beam_indices.numpy().tolist(), (i, plen, kw)
            assert len(f.scores) == len(o.scores)
            for a, b in zip(f.scores, o.scores):
                b = b.numpy()
                fin = np.isfinite(b)
                assert (np.isfinite(np.asarray(a)) == fin).all()
                # log-probs of ~-40 over a vocabulary: float32 logits that differ by matmul order differ by ~5e-5
                np.testing.assert_allclose(np.asarray(a)[fin], b[fin], rtol=1e-4, atol=1e-4)
            np.testing.assert_allclose(
                np.asarray(m.compute_transition_scores(f.sequences, f.scores, f.beam_indices)),
                hf.compute_transition_scores(o.sequences, o.scores, o.beam_indices).numpy(), rtol=1e-4, atol=1e-4)
