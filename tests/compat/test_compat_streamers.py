"""Streaming with failing arguments, as transformers' docs stream (docs/source/en/generation_strategies.md,
"Streaming": TextIteratorStreamer, Thread(target=model.generate, kwargs=...), `for new_text in streamer`) and
as ChatGLM2's cli_demo.py streams (model.stream_chat). A bad argument in the worker must raise in the thread
that iterates, at once: never a hang. Every wait here is bounded (streamer timeout=, join timeout, a watchdog
thread), so a regression fails instead of hanging CI. Adapted: the import and the model path."""
import queue
import threading
import time
from threading import Thread

import pytest

import fastload as transformers

TextIteratorStreamer = transformers.TextIteratorStreamer
WAIT = 30  # seconds: far above what a 135M model needs for a few tokens, far below a CI job's limit


def consume_bounded(make_iter, timeout=WAIT):
    """Iterate what make_iter() returns in a watchdog thread; returns (items, exception) or fails on a hang."""
    box = {}

    def run():
        items = []
        try:
            for x in make_iter():
                items.append(x)
            box["items"] = items
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["items"], box["error"] = items, e

    t = Thread(target=run, daemon=True)
    t0 = time.monotonic()
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"iterating hung for {timeout} s: the worker's error never reached the consumer"
    return box["items"], box.get("error"), time.monotonic() - t0


def test_text_iterator_streamer_good_arguments(model, tokenizer, tensors):
    inputs = tokenizer(["The capital of France is"], return_tensors=tensors.name)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=WAIT)
    generation_kwargs = dict(inputs, streamer=streamer, max_new_tokens=12, do_sample=False)
    thread = Thread(target=model.generate, kwargs=generation_kwargs)
    thread.start()
    generated_text = ""
    for new_text in streamer:
        generated_text += new_text
    thread.join(WAIT)
    assert not thread.is_alive()
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    assert generated_text == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# generate raises in the worker thread too (as transformers' does); that thread's traceback is expected here
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("bad, exc, match", [
    ({"bad_argument": 1}, TypeError, "bad_argument"),
    ({"top_p": 2.0}, ValueError, "top_p"),
])
def test_text_iterator_streamer_worker_error_reaches_the_consumer(model, tokenizer, tensors, bad, exc, match):
    inputs = tokenizer(["The capital of France is"], return_tensors=tensors.name)
    # timeout= bounds each wait for a piece: without the fix this raises queue.Empty after WAIT s instead
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=WAIT)
    generation_kwargs = dict(inputs, streamer=streamer, max_new_tokens=12, **bad)
    thread = Thread(target=model.generate, kwargs=generation_kwargs, daemon=True)
    thread.start()
    items, err, _ = consume_bounded(lambda: streamer, timeout=WAIT + 10)
    thread.join(WAIT)
    assert not thread.is_alive()
    assert not isinstance(err, queue.Empty), "the consumer waited until its timeout: the error never reached it"
    assert isinstance(err, exc) and match in str(err), f"want {exc.__name__} naming {match!r}, got {err!r}"
    assert items == []


@pytest.mark.parametrize("bad, exc, match", [
    ({"bad_argument": 1}, TypeError, "bad_argument"),
    ({"top_p": 2.0}, ValueError, "top_p"),
])
def test_stream_chat_bad_argument_raises(model, tokenizer, bad, exc, match):
    items, err, _ = consume_bounded(lambda: model.stream_chat(tokenizer, "Hello", history=[], **bad))
    assert isinstance(err, exc) and match in str(err), f"want {exc.__name__} naming {match!r}, got {err!r}"
    assert items == []
    # the model still answers afterwards
    items, err, _ = consume_bounded(lambda: model.stream_chat(tokenizer, "What is 2+3?", history=[],
                                                              max_new_tokens=16))
    assert err is None and items and items[-1][0].strip()


def test_stream_chat_consumer_stops_early(model, tokenizer):
    """Breaking out of the stream_chat loop (a client disconnects) leaves the model usable at once."""
    def first_two():
        gen = model.stream_chat(tokenizer, "Tell me a story about a cat.", history=[], max_new_tokens=64)
        out = []
        for x in gen:
            out.append(x)
            if len(out) == 2:
                break
        gen.close()
        return out
    items, err, _ = consume_bounded(first_two)
    assert err is None and len(items) == 2
    r, _ = model.chat(tokenizer, "What is 2+3?", history=[], max_new_tokens=16)
    assert "5" in r
