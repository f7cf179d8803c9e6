"""Streaming never hangs: every error in generate() (bad arguments included) ends the streamer, and fastload's
TextIteratorStreamer raises that same exception in the thread that iterates it; stream_chat raises it at once.
Every wait here is bounded (a queue timeout or a join timeout), so a regression fails instead of hanging CI.
Tiny Llama fixture with a stand-in tokenizer, and the demo model for stream_chat."""
import queue
import threading

import numpy as np
import pytest

import fastload
from fastload import TextIteratorStreamer
from golden_util import load_case, model_dir

WAIT = 60  # seconds any single wait may take before the test fails (generation here takes milliseconds)


@pytest.fixture(scope="module")
def model():
    return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cpu",
                                                         torch_dtype="float32")


@pytest.fixture(scope="module")
def ids():
    return load_case("llama")["single_ids"]


class IdsTokenizer:
    """Decodes ids as space-separated numbers; decode raises `fail` on call number `fail_at`."""

    def __init__(self, fail_at=None, fail=None):
        self.calls, self.fail_at, self.fail = 0, fail_at, fail

    def decode(self, ids, **kw):
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise self.fail
        return "".join(f"{int(i)} " for i in ids)


def run_in_thread(model, streamer, **kwargs):
    """transformers' recipe: Thread(target=model.generate, kwargs=...), then `for text in streamer`."""
    raised = []

    def target():
        try:
            model.generate(streamer=streamer, **kwargs)
        except BaseException as e:  # noqa: BLE001 - kept to compare with what the consumer sees
            raised.append(e)
    th = threading.Thread(target=target, daemon=True)
    th.start()
    return th, raised


def consume(streamer):
    pieces = []
    try:
        for text in streamer:
            pieces.append(text)
    except queue.Empty:
        pytest.fail(f"the consumer waited {WAIT} s for a streamer that was never ended (generate's error was lost)")
    return pieces


BAD = [({"max_new_tokens": -1}, ValueError, "max_new_tokens"), ({"max_new_tokens": "5"}, TypeError, "max_new_tokens"),
       ({"bogus_argument": 1}, TypeError, "bogus_argument"), ({"num_beams": 4}, ValueError, "beam search"),
       ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
       ({"generation_config": "nope"}, TypeError, "generation_config"), ({"input_ids": [[1.5, 2.5]]}, TypeError, "input_ids")]


@pytest.mark.parametrize("bad,exc,match", BAD, ids=[next(iter(b[0])) for b in BAD])
def test_thread_generate_bad_argument_raises_in_the_consumer(model, ids, bad, exc, match):
    s = TextIteratorStreamer(IdsTokenizer(), skip_prompt=True, timeout=WAIT)
    th, raised = run_in_thread(model, s, **{"input_ids": ids, "max_new_tokens": 4, **bad})
    with pytest.raises(exc, match=match) as ei:
        consume(s)
    th.join(WAIT)
    assert not th.is_alive() and raised and ei.value is raised[0]  # the worker's own exception object


def test_thread_generate_error_mid_generation(model, ids):
    """The tokenizer fails while the core generates (the streamer's put, called back per token): the consumer
    gets the text decoded before the failure, then the exception; generate stopped early."""
    boom = RuntimeError("decode failed")
    s = TextIteratorStreamer(IdsTokenizer(fail_at=4, fail=boom), skip_prompt=True, timeout=WAIT)
    th, raised = run_in_thread(model, s, input_ids=ids, max_new_tokens=50, eos_token_id=None)
    got = []
    with pytest.raises(RuntimeError, match="decode failed") as ei:
        for text in s:
            got.append(text)
    th.join(WAIT)
    assert ei.value is boom and raised == [boom] and not th.is_alive()
    assert "".join(got).split() == [str(t) for t in load_case("llama")["single_greedy"][0, 17:20]]


def test_thread_generate_keyboard_interrupt(model, ids):
    s = TextIteratorStreamer(IdsTokenizer(fail_at=2, fail=KeyboardInterrupt()), skip_prompt=True, timeout=WAIT)
    th, raised = run_in_thread(model, s, input_ids=ids, max_new_tokens=20, eos_token_id=None)
    with pytest.raises(KeyboardInterrupt):
        consume(s)
    th.join(WAIT)
    assert not th.is_alive() and isinstance(raised[0], KeyboardInterrupt)


def test_streamer_reusable_after_an_error(model, ids):
    s = TextIteratorStreamer(IdsTokenizer(), skip_prompt=True, timeout=WAIT)
    th, _ = run_in_thread(model, s, input_ids=ids, max_new_tokens=-3)
    with pytest.raises(ValueError):
        consume(s)
    th.join(WAIT)
    th, raised = run_in_thread(model, s, input_ids=ids, max_new_tokens=3, eos_token_id=None)
    assert len("".join(consume(s)).split()) == 3
    th.join(WAIT)
    assert not raised


def test_foreign_streamer_is_ended(model, ids):
    """A streamer that is not fastload's (anything with put/end, e.g. transformers') at least gets end()."""
    class Plain:
        def __init__(self):
            self.puts, self.ended = 0, 0

        def put(self, v):
            self.puts += 1

        def end(self):
            self.ended += 1
    for bad in ({"max_new_tokens": -1}, {"bogus": 1}, {"top_p": 2.0}):
        p = Plain()
        with pytest.raises((ValueError, TypeError)):
            model.generate(ids, streamer=p, **bad)
        assert p.ended == 1


def bounded(fn):
    """Run fn in a thread, return its result or raise its exception; fail if it has not finished in WAIT s."""
    out = []

    def target():
        try:
            out.append(("ok", fn()))
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            out.append(("err", e))
    th = threading.Thread(target=target, daemon=True)
    th.start()
    th.join(WAIT)
    if th.is_alive():
        pytest.fail(f"still waiting after {WAIT} s: the error never reached the consumer")
    kind, v = out[0]
    if kind == "err":
        raise v
    return v


@pytest.mark.parametrize("bad,exc,match", BAD[:5], ids=[next(iter(b[0])) for b in BAD[:5]])
def test_stream_chat_bad_argument_raises(demo_model, demo_tok, bad, exc, match):
    with pytest.raises(exc, match=match):
        bounded(lambda: list(demo_model.stream_chat(demo_tok, "What is 2+3?", **bad)))


class FailingDecode:
    """The demo tokenizer, whose decode fails from its `n`th call (in the generating thread)."""

    def __init__(self, tok, n):
        self._tok, self._n, self.calls = tok, n, 0

    def __getattr__(self, k):
        return getattr(self._tok, k)

    def decode(self, *a, **kw):
        self.calls += 1
        if self.calls >= self._n:
            raise UnicodeError("cannot decode")
        return self._tok.decode(*a, **kw)


def test_stream_chat_error_mid_generation(demo_model, demo_tok):
    seen = []

    def run():
        for response, history in demo_model.stream_chat(FailingDecode(demo_tok, 3), "What is 2+3?", max_new_tokens=30):
            seen.append(response)
    with pytest.raises(UnicodeError, match="cannot decode"):
        bounded(run)
    ok = bounded(lambda: list(demo_model.stream_chat(demo_tok, "What is 2+3?", max_new_tokens=30)))
    assert "5" in ok[-1][0]


def test_stream_chat_closed_early_stops_the_generation(demo_model, demo_tok):
    """A consumer that stops reading stream_chat early must not leave the generation running to max_new_tokens
    (holding the model for every other caller): the generating thread ends within a decode step."""
    before = set(threading.enumerate())
    gen = demo_model.stream_chat(demo_tok, "Count from one to a thousand.", max_new_tokens=4000, min_new_tokens=4000)
    first, _ = next(gen)
    workers = set(threading.enumerate()) - before  # the generating thread stream_chat started
    assert first and workers
    gen.close()  # as `break` out of the consumer's loop does
    for t in workers:
        t.join(timeout=30)
    assert not [t for t in workers if t.is_alive()], "generation kept running after the consumer left"
    # the model answers the next caller at once
    out = demo_model.generate(demo_tok("Hi", return_tensors="np")["input_ids"], max_new_tokens=2)
    assert out.shape[1] >= 2


def test_text_iterator_streamer_cancel(model, ids):
    """TextIteratorStreamer.cancel(): the generate() feeding it raises GenerationCancelled at its next token,
    and the consumer's loop ends with that error instead of waiting."""
    from fastload.streamers import GenerationCancelled
    s = TextIteratorStreamer(IdsTokenizer(), skip_prompt=True, timeout=WAIT)
    s.cancel()
    with pytest.raises(GenerationCancelled):
        model.generate(ids, max_new_tokens=50, min_new_tokens=50, streamer=s)
    with pytest.raises(GenerationCancelled):
        list(s)
    # the cancel() was for that generation: the streamer serves the next one, as transformers' streamers are reused
    # (it raised GenerationCancelled at once for ever after, hunt20), and holds no finished requests
    out = model.generate(ids, max_new_tokens=5, min_new_tokens=5, streamer=s)
    assert "".join(s) == IdsTokenizer().decode(out[0, ids.shape[1]:]) and s._bound == []


def test_text_streamer_keeps_indentation_after_a_newline():
    """A SentencePiece-style decoder drops the leading space of a text's first token; the streamer emptied its cache
    at each newline, so the next line's first token decoded alone and lost one space (streamed code mis-indented,
    stream_chat's text unlike chat()'s). It keeps the newline's token as context, as transformers 5."""
    from tokenizers import Tokenizer, decoders, models
    from fastload.streamers import TextStreamer
    from fastload.tokenizer import FastTokenizer
    pieces = ["▁def", "▁f", "(", "x", "):", "\n", "▁", "▁", "▁", "▁return", "▁x", "▁+", "▁1", "\n", "T", "he", "▁",
              "en", "d", "<unk>"]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tok = FastTokenizer(tk)
    ids = [vocab[p] for p in pieces[:-1]]
    got = []

    class S(TextStreamer):
        def on_finalized_text(self, text, stream_end=False):
            got.append(text)
    s = S(tok)
    for i in ids:
        s.put(np.array([i]))
    s.end()
    assert tok.decode(ids) == "def f(x):\n    return x + 1\nThe end"
    assert "".join(got) == tok.decode(ids)
