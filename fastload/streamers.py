"""Streamers with transformers' shapes: generate() calls put(prompt_ids) once, then put(new_ids)
with one id per batch row after every step, then end(). When generate fails (bad arguments included) it
calls _end_with_error(exc) on fastload's streamers instead of end(): TextIteratorStreamer then raises that
exception in the thread that iterates it, so a consumer never waits for an end that will not come."""
from __future__ import annotations

import queue
import threading
import unicodedata

import numpy as np


class BaseStreamer:
    def put(self, value):
        raise NotImplementedError

    def end(self):
        raise NotImplementedError

    def _end_with_error(self, exc):
        """generate() failed with exc: end the stream (the text so far is still delivered)."""
        self.end()


class TextStreamer(BaseStreamer):
    """Prints text to stdout as soon as whole words are available (batch size 1)."""

    def __init__(self, tokenizer, skip_prompt=False, **decode_kwargs):
        self.tokenizer, self.skip_prompt, self.decode_kwargs = tokenizer, skip_prompt, decode_kwargs
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True

    def put(self, value):
        value = np.asarray(value.tolist() if hasattr(value, "tolist") else value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("TextStreamer only supports batch size 1")
        if value.ndim > 1:
            value = value[0]
        if self.skip_prompt and self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self.token_cache.extend(int(v) for v in value.reshape(-1))
        text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
        if text.endswith("\n"):
            # transformers 5: the cache keeps the newline's token as context, so the next line's first token decodes
            # as in the whole text (a SentencePiece decoder strips the leading space of a text's first token: an
            # emptied cache lost one space of indentation after every newline)
            printable = text[self.print_len:]
            self.token_cache = self.token_cache[-1:]
            self.print_len = len(self.tokenizer.decode(self.token_cache, **self.decode_kwargs))
        elif text and _is_cjk(text[-1]):
            printable = text[self.print_len:]
            self.print_len += len(printable)
        elif all(c.isspace() or unicodedata.category(c)[0] in "LMN" for c in text[self.print_len:]):
            # letters (with their marks), digits and spaces at once, as transformers 5 (long words and Thai stream
            # too); symbols wait for the next space (they may start formatting, or be an incomplete character)
            printable = text[self.print_len:]
            self.print_len += len(printable)
        else:
            printable = text[self.print_len: text.rfind(" ") + 1]
            self.print_len += len(printable)
        self.on_finalized_text(printable)

    def end(self):
        if self.token_cache:
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            printable = text[self.print_len:]
        else:
            printable = ""
        self.token_cache, self.print_len, self.next_tokens_are_prompt = [], 0, True
        self.on_finalized_text(printable, stream_end=True)

    def on_finalized_text(self, text, stream_end=False):
        print(text, flush=True, end="" if not stream_end else None)


class _Failure:
    """Queued instead of the stop signal when generate failed: __next__ raises the exception."""

    def __init__(self, exc):
        self.exc = exc


class GenerationCancelled(Exception):
    """Raised in the generating thread when the consumer cancelled its TextIteratorStreamer."""


class TextIteratorStreamer(TextStreamer):
    """Queues text pieces for a consumer thread: `for piece in streamer: ...` (generate in another thread).
    If generate fails, the iteration yields the text produced so far and then raises generate's exception (the
    same object) in the iterating thread; transformers' streamer would wait for ever (or until `timeout`)."""

    def __init__(self, tokenizer, skip_prompt=False, timeout=None, **decode_kwargs):
        super().__init__(tokenizer, skip_prompt, **decode_kwargs)
        self.text_queue, self.stop_signal, self.timeout = queue.Queue(), object(), timeout
        self._error = None
        self._cancelled = False
        self._lock, self._bound = threading.Lock(), []

    def cancel(self):
        """Ask the generate() feeding this streamer to stop: it raises GenerationCancelled in the generating thread
        and the model is free again within one decode step, also when the request is still waiting in the engine's
        queue (it leaves the queue at once). For a consumer that stops reading early; stream_chat calls it when its
        generator is closed. (fastload's own; transformers has no such call.)"""
        with self._lock:
            self._cancelled = True
            reqs, self._bound = self._bound, []
        for q in reqs:
            q.cancel()

    def _fastload_bind(self, reqs):
        """generate() hands over its engine requests as soon as they are queued, so that cancel() stops them
        before their first token too (a put() only comes with a token)."""
        with self._lock:
            if not self._cancelled:
                self._bound = list(reqs)
                return
        for q in reqs:
            q.cancel()

    def put(self, value):
        if self._cancelled:
            raise GenerationCancelled("the consumer of this TextIteratorStreamer cancelled the generation")
        super().put(value)

    def on_finalized_text(self, text, stream_end=False):
        if text:
            self.text_queue.put(text, timeout=self.timeout)
        if stream_end:
            err, self._error = self._error, None
            self.text_queue.put(self.stop_signal if err is None else _Failure(err), timeout=self.timeout)

    def _reset(self):
        """The generation it was bound to is over: a cancel() then was for that one; the next generate() with this
        streamer runs (transformers' streamers can be used again; this one raised GenerationCancelled at once after
        a cancel()), and the finished requests are let go of."""
        with self._lock:
            self._cancelled, self._bound = False, []

    def end(self):
        self._reset()
        try:
            super().end()
        except BaseException as e:  # decoding the last text failed: the consumer still gets an end, with e
            self._error = None
            self.text_queue.put(_Failure(e))
            raise

    def _end_with_error(self, exc):
        self._reset()
        self._error = exc
        try:
            super().end()  # the text so far, then the failure (on_finalized_text queues it last)
        except BaseException:  # noqa: BLE001 - exc is what the consumer must see
            pass
        if self._error is not None:  # end() failed before queueing the failure
            self._error = None
            self.text_queue.put(_Failure(exc))

    def __iter__(self):
        return self

    def __next__(self):
        value = self.text_queue.get(timeout=self.timeout)
        if value is self.stop_signal:
            raise StopIteration
        if isinstance(value, _Failure):
            raise value.exc
        return value


def _is_cjk(ch):
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0x2A700 <= cp <= 0x2B73F
            or 0x2B740 <= cp <= 0x2B81F or 0x2B820 <= cp <= 0x2CEAF or 0xF900 <= cp <= 0xFAFF or 0x2F800 <= cp <= 0x2FA1F)


class IdIteratorStreamer(TextIteratorStreamer):
    """For ChatGLM's stream_chat: each item is the list of all new token ids so far (batch size 1), so that the
    caller decodes the whole response each time, as THUDM's stream_chat does. Errors and cancel() as
    TextIteratorStreamer."""

    def __init__(self, timeout=None):
        super().__init__(None, skip_prompt=True, timeout=timeout)
        self._ids = []

    def put(self, value):
        if self._cancelled:
            raise GenerationCancelled("the consumer of this streamer cancelled the generation")
        value = np.asarray(value.tolist() if hasattr(value, "tolist") else value)
        if value.ndim > 1 and value.shape[0] > 1:
            raise ValueError("IdIteratorStreamer only supports batch size 1")
        if self.next_tokens_are_prompt:
            self.next_tokens_are_prompt = False
            return
        self._ids.extend(int(v) for v in value.reshape(-1))
        self.text_queue.put(list(self._ids), timeout=self.timeout)

    def end(self):
        self.next_tokens_are_prompt = True
        err, self._error = self._error, None
        self.text_queue.put(self.stop_signal if err is None else _Failure(err), timeout=self.timeout)

    def _end_with_error(self, exc):
        self._error = exc
        self.end()
