"""generate(return_dict_in_generate=True, output_scores=True, output_logits=True) and compute_transition_scores, as
transformers has them, and the engine's per-token records behind them (fl_gen_params.keep_*): the raw logits of each
step, the scores the token was chosen from (repetition penalty, eos masked below min_new_tokens, temperature, -inf
outside top-k / top-p) and the chosen token's log-probability with the k most likely (the server's logprobs).
CPU, the demo model in float32; a peer test against transformers where torch, transformers and gguf are installed."""
import importlib.util
import threading

import numpy as np
import pytest

import fastload
from sampling_ref import log_softmax64, warp

PROMPTS = ["The capital of France is", "Once upon a time"]


def processed(logits, seen, new, rep=1.0, min_new=0, eos=(), sample=False, temperature=1.0, top_k=0, top_p=1.0,
              min_p=0.0, bias=(), presence=0.0, frequency=0.0, ngram=0, typical_p=0.0, epsilon=0.0, eta=0.0):
    """transformers' processors in its order, in float32 as the sampler applies them: SequenceBias / NoBadWords /
    SuppressTokens (bias: (id, value) pairs, -inf bans), RepetitionPenalty, OpenAI's presence / frequency penalties
    over the `new` generated tokens at the end of `seen`, NoRepeatNGram, MinNewTokensLength, then when sampling
    the warpers (tests/sampling_ref.py)."""
    x = np.array(logits, np.float32)
    for seq, v in bias:  # (token sequence, value): on its last token when the ones before it end `seen`
        seq = (seq,) if isinstance(seq, int) else tuple(seq)
        if len(seq) - 1 <= len(seen) and tuple(seen[len(seen) - len(seq) + 1:]) == seq[:-1]:
            x[seq[-1]] += np.float32(v)
    if rep != 1.0:
        s = np.unique(seen)
        x[s] = np.where(x[s] < 0, x[s] * np.float32(rep), x[s] / np.float32(rep))
    if presence or frequency:
        out = list(seen[len(seen) - new:]) if new else []
        for t in out:
            x[t] -= np.float32(frequency)
        for t in set(out):
            x[t] -= np.float32(presence)
    if ngram:
        seq = list(seen)
        if len(seq) + 1 >= ngram:
            tail = seq[len(seq) - ngram + 1:]
            for i in range(len(seq) - ngram + 1):
                if seq[i:i + ngram - 1] == tail:
                    x[seq[i + ngram - 1]] = -np.inf
    if new < min_new:
        x[list(eos)] = -np.inf
    if not sample:
        return x
    return warp(x, temperature, top_k, top_p, min_p, typical_p, epsilon, eta)


@pytest.fixture(scope="module")
def enc(demo_tok):
    return demo_tok(PROMPTS[:1], return_tensors="np")


def test_greedy_scores_are_the_processed_logits(demo_model, enc):
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    kw = dict(max_new_tokens=8, repetition_penalty=1.3, min_new_tokens=4, eos_token_id=[13, 30])
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    seq = o.sequences
    assert np.array_equal(seq, m.generate(ids, **kw)), "keeping scores changed the answer"
    n_new = seq.shape[1] - T
    assert len(o.scores) == len(o.logits) == n_new >= 4
    for t in range(n_new):
        lg, sc = o.logits[t][0], o.scores[t][0]
        assert lg.shape == sc.shape == (m.config.vocab_size,) and lg.dtype == sc.dtype == np.float32
        # the raw logits are the model's at that position (a forward over the whole prefix: other kernels, so not
        # the same bits)
        ref = m(seq[:, :T + t]).logits[0, -1]
        np.testing.assert_allclose(lg, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
        want = processed(lg, seq[0, :T + t], t, rep=1.3, min_new=4, eos=(13, 30))
        np.testing.assert_array_equal(sc, want)
        assert int(np.argmax(sc)) == seq[0, T + t]


def test_sampled_scores_hold_what_the_token_was_drawn_from(demo_model, enc):
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    kw = dict(max_new_tokens=10, do_sample=True, temperature=0.7, top_k=40, top_p=0.8, seed=11, eos_token_id=[])
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert np.array_equal(o.sequences, m.generate(ids, **kw)), "keeping scores changed the draws"
    finite = []
    for t in range(len(o.scores)):
        want = processed(o.logits[t][0], None, t, sample=True, temperature=0.7, top_k=40, top_p=0.8)
        np.testing.assert_array_equal(o.scores[t][0], want)
        assert np.isfinite(o.scores[t][0, o.sequences[0, T + t]]), "a token drawn from outside its candidates"
        finite.append(int(np.isfinite(want).sum()))
    assert max(finite) > 1, "every step had a single candidate: the test does not see top-k / top-p at work"
    # min_p (after top-p, as transformers' MinPLogitsWarper): fewer candidates, the same rule
    kw = dict(max_new_tokens=10, do_sample=True, temperature=1.3, top_p=0.95, min_p=0.08, seed=4, eos_token_id=[])
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert np.array_equal(o.sequences, m.generate(ids, **kw))
    for t in range(len(o.scores)):
        want = processed(o.logits[t][0], None, t, sample=True, temperature=1.3, top_p=0.95, min_p=0.08)
        np.testing.assert_array_equal(o.scores[t][0], want)
        assert np.isfinite(o.scores[t][0, o.sequences[0, T + t]])


@pytest.mark.parametrize("kw, ref", [
    (dict(typical_p=0.7, temperature=0.9, top_k=0), dict(typical_p=0.7, temperature=0.9)),
    (dict(epsilon_cutoff=0.01, top_k=0), dict(epsilon=0.01)),
    (dict(eta_cutoff=0.02, top_k=50), dict(eta=0.02, top_k=50))])
def test_typical_epsilon_eta(demo_model, enc, kw, ref):
    """transformers' TypicalLogitsWarper, EpsilonLogitsWarper and EtaLogitsWarper: each step's scores are numpy's
    reading of the rule over the step's logits, and the drawn token is among them (top_k=0: generate's default top-k
    of 50, transformers' too, would come first)."""
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    kw = dict(max_new_tokens=8, do_sample=True, seed=9, eos_token_id=[], **kw)
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert np.array_equal(o.sequences, m.generate(ids, **kw))
    sizes = []
    for t in range(8):
        want = processed(o.logits[t][0], None, t, sample=True, **ref)
        np.testing.assert_array_equal(o.scores[t][0], want)
        assert np.isfinite(o.scores[t][0, o.sequences[0, T + t]])
        sizes.append(int(np.isfinite(want).sum()))
    assert 1 < max(sizes) < m.config.vocab_size, sizes


def test_biases_bans_penalties_and_ngrams(demo_model, enc):
    """sequence_bias, bad_words_ids and suppress_tokens (single tokens), the repetition penalty, OpenAI's presence
    and frequency penalties and no_repeat_ngram_size, together: each step's scores are numpy's reading of the rules,
    in transformers' order, and the answer holds no bigram twice."""
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    plain = m.generate(ids, max_new_tokens=12, eos_token_id=[])[0, T:]
    favour, ban, hush = int(plain[3]), int(plain[0]), int(plain[1])
    kw = dict(max_new_tokens=12, eos_token_id=[], sequence_bias={(favour,): 2.5}, bad_words_ids=[[ban]],
              suppress_tokens=[hush], repetition_penalty=1.1, presence_penalty=0.4, frequency_penalty=0.3,
              no_repeat_ngram_size=2)
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw)
    assert np.array_equal(o.sequences, m.generate(ids, **kw))
    seq = o.sequences[0]
    new = seq[T:]
    assert ban not in new and hush not in new
    grams = list(zip(seq[:-1].tolist(), seq[1:].tolist()))
    assert len(grams) == len(set(grams)), "a bigram came twice despite no_repeat_ngram_size=2"
    bias = [(favour, 2.5), (ban, -np.inf), (hush, -np.inf)]
    for t in range(12):
        want = processed(o.logits[t][0], seq[:T + t], t, rep=1.1, bias=bias, presence=0.4, frequency=0.3, ngram=2)
        np.testing.assert_array_equal(o.scores[t][0], want)
    # the same through the engine's list given as a dict / pairs
    assert np.array_equal(m.generate(ids, **{**kw, "sequence_bias": [[[favour], 2.5]]}), o.sequences)
    # sequences of several tokens: a bias / ban on the last token only where the ones before it end the text
    a, b = int(plain[0]), int(plain[1])
    kw2 = dict(max_new_tokens=12, eos_token_id=[], bad_words_ids=[[a, b]], sequence_bias={(b, int(plain[2])): -3.0},
               begin_suppress_tokens=[int(plain[5])])
    o = m.generate(ids, return_dict_in_generate=True, output_scores=True, output_logits=True, **kw2)
    seq = o.sequences[0]
    assert seq[T] == a and seq[T + 1] != b, "the banned pair came anyway"
    for t in range(12):
        want = processed(o.logits[t][0], seq[:T + t], t, bias=[((a, b), -np.inf), ((b, int(plain[2])), -3.0)] +
                         ([(int(plain[5]), -np.inf)] if t == 0 else []))
        np.testing.assert_array_equal(o.scores[t][0], want)
    # forced_eos_token_id: the last token is it
    o = m.generate(ids, max_new_tokens=5, eos_token_id=[], forced_eos_token_id=7)
    assert o.shape[1] == T + 5 and o[0, -1] == 7 and o[0, T:-1].tolist() == plain[:4].tolist()
    with pytest.raises(TypeError, match="sequence_bias"):
        m.generate(ids, max_new_tokens=2, sequence_bias={(ban,): "x"})
    with pytest.raises(TypeError, match="suppress_tokens"):
        m.generate(ids, max_new_tokens=2, suppress_tokens="x")
    with pytest.raises(ValueError, match="bias"):
        m.generate(ids, max_new_tokens=2, suppress_tokens=[m.config.vocab_size])
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        m.generate(ids, max_new_tokens=2, no_repeat_ngram_size=-1)


def test_transition_scores_and_engine_logprobs(demo_model, enc):
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    o = m.generate(ids, max_new_tokens=6, eos_token_id=[], return_dict_in_generate=True, output_scores=True)
    ts = m.compute_transition_scores(o.sequences, o.scores, normalize_logits=True)
    raw = m.compute_transition_scores(o.sequences, o.scores)
    assert ts.shape == raw.shape == (1, 6) and ts.dtype == np.float32
    want = [log_softmax64(o.scores[t][0])[o.sequences[0, T + t]] for t in range(6)]
    np.testing.assert_allclose(ts[0], want, atol=1e-5)
    np.testing.assert_array_equal(raw[0], [o.scores[t][0, o.sequences[0, T + t]] for t in range(6)])
    assert (ts <= 0).all()
    # the engine's own log-probabilities (what the server's logprobs report): the token's and the 5 most likely
    core = m._engine_handle().core()
    q = core.engine_submit(ids[0].astype(np.int32), max_new_tokens=6, logprobs=5, keep_logits=True)
    q.wait(1 << 30, timeout=60)
    while not q.check():
        q.wait(1 << 30, timeout=60)
    V = m.config.vocab_size
    rec = q.records()
    assert q.record_size == V + 11 and rec.shape == (6, V + 11)
    assert np.array_equal(q.tokens(), o.sequences[0, T:])
    for t in range(6):
        lp = log_softmax64(rec[t, :V])
        assert abs(rec[t, V] - lp[o.sequences[0, T + t]]) < 1e-5
        top = rec[t, V + 1:V + 6].view(np.int32)
        assert list(top) == list(np.argsort(-rec[t, :V], kind="stable")[:5])
        np.testing.assert_allclose(rec[t, V + 6:], lp[top], atol=1e-5)
    q0 = core.engine_submit(ids[0].astype(np.int32), max_new_tokens=2)
    assert q0.record_size == 0 and q0.records().shape == (0, 0)
    for bad in (-2, 21):
        with pytest.raises(ValueError, match="logprobs"):
            core.engine_submit(ids[0].astype(np.int32), max_new_tokens=2, logprobs=bad)


def test_rows_that_end_early_get_pad_rows(demo_model, demo_tok):
    m = demo_model
    enc = demo_tok(PROMPTS, return_tensors="np", padding=True)
    plain = m.generate(**enc, max_new_tokens=6, eos_token_id=[])
    T = enc["input_ids"].shape[1]
    eos = int(plain[1, T + 1])  # row 1 ends at its second token
    assert eos not in plain[0, T:T + 6].tolist()
    o = m.generate(**enc, max_new_tokens=6, eos_token_id=[eos], pad_token_id=0, return_dict_in_generate=True,
                   output_scores=True)
    assert np.array_equal(o.sequences[0], plain[0])
    assert o.sequences[1, T + 1] == eos and (o.sequences[1, T + 2:] == 0).all()
    assert len(o.scores) == 6 and o.scores[0].shape == (2, m.config.vocab_size)
    for t in range(2, 6):  # after its end: -inf except the pad token, at 0
        row = o.scores[t][1]
        assert row[0] == 0 and np.isneginf(np.delete(row, 0)).all()
    ts = m.compute_transition_scores(o.sequences, o.scores, normalize_logits=True)
    assert (ts[1, 2:] == 0).all() and (ts[1, :2] < 0).all() and (ts[0] < 0).all()


def test_stop_strings_max_time_and_streamer_cut_the_scores(demo_model, demo_tok, enc):
    m = demo_model
    ids = enc["input_ids"]
    T = ids.shape[1]
    text = demo_tok.decode(m.generate(ids, max_new_tokens=12, eos_token_id=[])[0, T:])
    stop = text.strip().split()[1]
    o = m.generate(ids, max_new_tokens=12, eos_token_id=[], stop_strings=stop, tokenizer=demo_tok,
                   return_dict_in_generate=True, output_scores=True, output_logits=True)
    n = o.sequences.shape[1] - T
    assert n < 12 and len(o.scores) == len(o.logits) == n
    st = fastload.TextIteratorStreamer(demo_tok, skip_prompt=True)
    box = {}
    th = threading.Thread(target=lambda: box.update(o=m.generate(ids, max_new_tokens=5, eos_token_id=[], streamer=st,
                                                                 return_dict_in_generate=True, output_logits=True)))
    th.start()
    streamed = "".join(st)
    th.join()
    o = box["o"]
    assert o.scores is None and "scores" not in o and len(o.logits) == 5
    assert streamed == demo_tok.decode(o.sequences[0, T:], skip_special_tokens=True)


def test_output_flags(demo_model, enc):
    m = demo_model
    ids = enc["input_ids"]
    a = m.generate(ids, max_new_tokens=3, output_scores=True)  # without return_dict_in_generate: ids, as transformers
    assert isinstance(a, np.ndarray) and a.shape == (1, ids.shape[1] + 3)
    o = m.generate(ids, max_new_tokens=3, return_dict_in_generate=True)
    assert list(o.keys()) == ["sequences"] and o.scores is None and o.logits is None and o.past_key_values is None
    assert np.array_equal(o[0], a) and np.array_equal(o["sequences"], a) and len(o.to_tuple()) == 1
    with pytest.raises(TypeError, match="output_scores"):
        m.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores="yes")
    with pytest.raises(NotImplementedError, match="output_attentions"):
        m.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_attentions=True)
    gc = fastload.GenerationConfig(max_new_tokens=2, return_dict_in_generate=True, output_scores=True)
    o = m.generate(ids, generation_config=gc)
    assert len(o.scores) == 2
    with pytest.raises(ValueError, match="sequences"):
        m.compute_transition_scores(o.sequences[:, :1], o.scores + o.scores + o.scores)
    # beam_indices of greedy search (beam 0 every step, as transformers assumes without them): the same scores
    np.testing.assert_array_equal(m.compute_transition_scores(o.sequences, o.scores, beam_indices=np.zeros((1, 2), np.int64)),
                                  m.compute_transition_scores(o.sequences, o.scores))
    with pytest.raises(ValueError, match="beam_indices"):
        m.compute_transition_scores(o.sequences, o.scores, beam_indices=np.full((1, 2), 5, np.int64))


def test_concurrent_callers_get_their_own_scores(demo_model, demo_tok):
    m = demo_model
    prompts = [demo_tok(p, return_tensors="np")["input_ids"] for p in PROMPTS * 2]
    kw = [dict(max_new_tokens=5 + i, eos_token_id=[], return_dict_in_generate=True, output_scores=True,
               output_logits=i % 2 == 0) for i in range(4)]
    alone = [m.generate(p, **k) for p, k in zip(prompts, kw)]
    got = [None] * 4
    ths = [threading.Thread(target=lambda i=i: got.__setitem__(i, m.generate(prompts[i], **kw[i]))) for i in range(4)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    for a, g in zip(alone, got):
        assert np.array_equal(a.sequences, g.sequences)
        assert len(a.scores) == len(g.scores)
        for x, y in zip(a.scores, g.scores):
            np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * np.abs(x[np.isfinite(x)]).max())
        assert (a.logits is None) == (g.logits is None)


@pytest.mark.skipif(not importlib.util.find_spec("torch"), reason="torch is not installed (torch inputs)")
def test_torch_inputs_give_torch_outputs(demo_model, enc):
    import torch
    m = demo_model
    ids = torch.from_numpy(enc["input_ids"])
    o = m.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert isinstance(o.sequences, torch.Tensor) and all(isinstance(s, torch.Tensor) for s in o.scores)
    ts = m.compute_transition_scores(o.sequences, o.scores, normalize_logits=True)
    assert isinstance(ts, torch.Tensor) and ts.shape == (1, 3)


HAVE_PEER = all(importlib.util.find_spec(x) for x in ("torch", "transformers"))


@pytest.mark.skipif(not HAVE_PEER, reason="torch and transformers are needed for the transformers peer")
def test_scores_equal_transformers():
    """The tiny Qwen2 golden fixture on the CPU in float32, fastload against transformers: greedy with a repetition
    penalty, min_new_tokens, no_repeat_ngram_size, sequence_bias, bad_words_ids and suppress_tokens gives the same
    tokens, scores and logits (within float32 rounding, -inf at the same
    places); sampling: transformers' own warpers (temperature, top-k, top-p) applied to fastload's logits give
    fastload's scores (with min_p too)."""
    import torch
    import transformers
    from golden_util import model_dir
    path = str(model_dir("qwen2"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="float32")
    ids = np.random.default_rng(7).integers(3, 500, size=(1, 9)).astype(np.int64)
    kw = dict(max_new_tokens=8, repetition_penalty=1.3, min_new_tokens=4, eos_token_id=[13, 30], pad_token_id=2,
              do_sample=False, return_dict_in_generate=True, output_scores=True, output_logits=True,
              no_repeat_ngram_size=3, sequence_bias={(17,): 1.5, (40,): -2.0}, bad_words_ids=[[99]],
              suppress_tokens=[7, 8])
    with torch.no_grad():
        t = torch.from_numpy(ids)
        r = hf.generate(t, attention_mask=torch.ones_like(t), **kw)
    o = m.generate(ids, **kw)
    assert np.array_equal(o.sequences, r.sequences.numpy())
    for name in ("scores", "logits"):
        assert len(getattr(o, name)) == len(getattr(r, name)) == 8
        for x, y in zip(getattr(o, name), getattr(r, name)):
            y = y.float().numpy()
            fin = np.isfinite(y)
            assert np.array_equal(np.isfinite(x), fin)
            np.testing.assert_allclose(x[fin], y[fin], rtol=0, atol=1e-4 * np.abs(y[fin]).max())
    ts = m.compute_transition_scores(o.sequences, o.scores, normalize_logits=True)
    ref = hf.compute_transition_scores(r.sequences, r.scores, normalize_logits=True).numpy()
    np.testing.assert_allclose(ts, ref, atol=1e-4)
    from transformers import (EpsilonLogitsWarper, EtaLogitsWarper, LogitsProcessorList, MinPLogitsWarper,
                              TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, TypicalLogitsWarper)
    procs = LogitsProcessorList([TemperatureLogitsWarper(0.7), TopKLogitsWarper(40), TopPLogitsWarper(0.8),
                                 MinPLogitsWarper(0.05)])
    o = m.generate(ids, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=40, top_p=0.8, min_p=0.05, seed=5,
                   eos_token_id=[], return_dict_in_generate=True, output_scores=True, output_logits=True)
    T = ids.shape[1]
    for t in range(8):
        want = procs(torch.from_numpy(o.sequences[:, :T + t]), torch.from_numpy(o.logits[t].copy())).numpy()
        np.testing.assert_array_equal(np.isfinite(o.scores[t]), np.isfinite(want))
        fin = np.isfinite(want)
        np.testing.assert_allclose(o.scores[t][fin], want[fin], rtol=1e-6, atol=0)
    for kw, procs in ((dict(typical_p=0.6, top_k=0), [TypicalLogitsWarper(0.6)]),
                      (dict(epsilon_cutoff=0.003, temperature=0.8, top_k=0), [TemperatureLogitsWarper(0.8),
                                                                              EpsilonLogitsWarper(0.003)]),
                      (dict(eta_cutoff=0.01, top_k=20), [TopKLogitsWarper(20), EtaLogitsWarper(0.01, device="cpu")])):
        o = m.generate(ids, max_new_tokens=6, do_sample=True, seed=2, eos_token_id=[], return_dict_in_generate=True,
                       output_scores=True, output_logits=True, **kw)
        for t in range(6):
            want = LogitsProcessorList(procs)(torch.from_numpy(o.sequences[:, :T + t]),
                                              torch.from_numpy(o.logits[t].copy())).numpy()
            np.testing.assert_array_equal(np.isfinite(o.scores[t]), np.isfinite(want), err_msg=str(kw))


def test_cli_generate_logprobs(demo_gguf, demo_model, demo_tok):
    """python -m fastload generate --logprobs K: one line a generated token, its log-probability under the logits and
    the K most likely (greedy: the token is the first of them)."""
    import io
    from contextlib import redirect_stderr, redirect_stdout

    from fastload.__main__ import main
    err, out = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = main(["generate", "--model", demo_gguf, "--device", "cpu", "--prompt", PROMPTS[0], "--raw", "--no-stream",
                   "--max-new-tokens", "3", "--logprobs", "2"])
    assert rc == 0
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip()[:1].isdigit()]
    assert len(lines) == 3, err.getvalue()
    ids = demo_tok(PROMPTS[0], return_tensors="np")["input_ids"]
    o = demo_model.generate(ids, max_new_tokens=3, return_dict_in_generate=True, output_logits=True)
    T = ids.shape[1]
    for t, ln in enumerate(lines):
        want = log_softmax64(o.logits[t][0])[o.sequences[0, T + t]]
        assert f"{want:9.4f}" in ln, (ln, want)
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as e, pytest.raises(SystemExit):
        main(["generate", "--model", demo_gguf, "--device", "cpu", "--prompt", "x", "--logprobs", "-1"])
    assert "--logprobs" in e.getvalue() and "integer >= 0" in e.getvalue()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()) as e, pytest.raises(SystemExit):
        main(["generate", "--model", demo_gguf, "--device", "cpu", "--prompt", "x", "--logprobs", "21"])
    assert "--logprobs" in e.getvalue() and "more than 20" in e.getvalue()
