"""`python -m fastload serve`: an OpenAI-compatible HTTP server over one loaded model (issue 11, part 4).

Endpoints: GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, with the fields
model, max_tokens (max_completion_tokens for chat), temperature, top_p, seed, stop, n, stream (server-sent events
in OpenAI's chunk format ending with `data: [DONE]`; `stream_options: {"include_usage": true}` adds the usage
chunk), logprobs (chat: logprobs + top_logprobs; completions: logprobs = k), presence_penalty, frequency_penalty,
logit_bias, vLLM's ignore_eos / min_p / top_k / repetition_penalty / min_tokens / stop_token_ids / bad_words,
typical_p, and usage counts.

Stack: Starlette + uvicorn (the optional extra `fastload[serve]`). Starlette is the ASGI toolkit FastAPI is built
on, without pydantic and its model layer: the server validates the few OpenAI fields itself (so the errors read
exactly as OpenAI's: status 400 and {"error": {"message", "type", "param", "code"}}), and the extra stays two
small pure-Python packages. uvicorn is the standard ASGI server; Starlette's StreamingResponse notices a client
that goes away under it and cancels the stream, which cancels the generation.

Layering: the server calls only the public model API (tokenizer.apply_chat_template / tokenizer(...),
model.generate with a streamer derived from fastload's TextIteratorStreamer, and that streamer's cancel()); for
logprobs its streamer also carries `_fastload_logprobs` (k), which asks generate for the engine's per-token records
(the token's log-probability and the k most likely) handed to the streamer's `_fastload_record`. Requests
run on --max-concurrency worker threads (default: the model engine's max_num_seqs), off the event loop; their
generate calls meet in the engine (fastload/engine.py), which batches whatever is running into each decode step.
With the engine off (engine=False / FASTLOAD_ENGINE=0: one request at a time) one worker runs them in turn.

Decisions (also in the README's "Serving" section):
- `n` choices are n generate calls one after another; with `seed` choice i samples with seed + i (so choice 0 of
  n=2 equals the n=1 answer with the same seed). Streamed choices of n > 1 arrive one after another.
- Fields left out take the model's generation_config (as model.chat and vLLM do, not OpenAI's temperature 1):
  temperature 0 is greedy; temperature > 0 or top_p samples. top_k and repetition_penalty are the model's.
- max_tokens defaults to the rest of the context for chat and to 16 for /v1/completions (OpenAI's defaults);
  prompt + max_tokens beyond the model's context (max_position_embeddings) is a 400, code
  "context_length_exceeded".
- stop: a string or up to 4; the text ends before the first stop string, finish_reason "stop". usage's
  completion_tokens counts the tokens generated (the eos token included, as vLLM; with a stop string, the
  tokens up to the one that completed it).
- A model name other than the served one (its id, or the --model reference as given) is a 404, code
  "model_not_found", as OpenAI answers; a missing model field is accepted.
- More than --max-queue requests waiting for a worker (the running ones not counted) is a 429, code "queue_full", with
  Retry-After: 1. A client that disconnects (mid-stream, or while waiting for a non-streamed answer) cancels its
  request: a waiting one is dropped, a running one stops at its next token.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import queue
import threading
import time
import uuid

import numpy as np

from .streamers import GenerationCancelled, TextIteratorStreamer

MAX_N = 16
MAX_STOP = 4
MAX_LOGPROBS = 20  # the engine's FL_MAX_TOP_LOGPROBS (csrc/fl_model.h)
# Fields that would change the answer and that this server does not implement: a 400 rather than an answer that
# silently ignores them (OpenAI's and vLLM's). Fields that cannot change it (user, metadata, store, service_tier,
# parallel_tool_calls without tools, ...) and unknown ones are ignored, as vLLM does.
_UNSUPPORTED = ("echo", "tools", "functions", "function_call", "tool_choice", "suffix", "prediction", "audio",
                "modalities", "best_of_n", "use_beam_search", "length_penalty", "guided_json", "guided_regex",
                "guided_choice", "guided_grammar", "structured_outputs", "allowed_token_ids",
                "prompt_logprobs", "truncate_prompt_tokens", "include_stop_str_in_output", "continue_final_message",
                "chat_template", "chat_template_kwargs", "logits_processors", "return_tokens_as_token_ids")
# vLLM's fields whose default (true) is what this server does: false would change the answer, and is refused
_UNSUPPORTED_FALSE = ("add_generation_prompt", "skip_special_tokens", "spaces_between_special_tokens")


class ServeError(Exception):
    """An OpenAI-style error answer: HTTP status and {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status, message, type="invalid_request_error", param=None, code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self):
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _bad(message, param=None, code=None):
    return ServeError(400, message, param=param, code=code)


class _StopStringHit(GenerationCancelled):
    """Raised from the streamer in the generating thread when the text reached a stop string."""


class _RequestStreamer(TextIteratorStreamer):
    """fastload's TextIteratorStreamer (its cancel() stops the generate feeding it at the next token) that keeps
    the generated ids, decodes the whole completion after each token, ends the generation at the first stop
    string and hands text deltas to `emit` (never text that might be the start of a stop string or an
    incomplete UTF-8 character)."""

    def __init__(self, tokenizer, stops, emit, logprobs=None, min_tokens=0):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.stops, self.emit = stops, emit
        self.min_tokens = min_tokens  # vLLM's min_tokens: no stop string ends the answer before that many tokens
        self.ids, self.sent, self.text, self.hit_stop = [], 0, "", False
        self._prompt_seen = False
        self._p = self._r = 0  # the window of ids decoded at each step: ids[_p:] against ids[_p:_r]
        # logprobs=k: generate keeps each token's log-probability and the k most likely (the engine's records, handed
        # to _fastload_record before the token reaches put); emit then gets (text, entries): the (token, logprob,
        # [(id, logprob)] * k) of every token put since the last emit. The rest go with end() (self.pending).
        self._fastload_logprobs = logprobs
        self._rec, self.pending = None, []

    def _fastload_record(self, row):
        self._rec = row

    def put(self, value):
        if self._cancelled:
            raise GenerationCancelled("the client of this request went away")
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        new_ids = [int(v) for v in np.asarray(value).reshape(-1)]
        self.ids.extend(new_ids)
        if self._fastload_logprobs is not None:
            k, row = self._fastload_logprobs, self._rec
            tail = row[row.shape[0] - 1 - 2 * k:]
            self.pending.append((new_ids[-1], float(tail[0]),
                                 list(zip(tail[1:1 + k].view(np.int32).tolist(), tail[1 + k:].tolist()))))
        # incremental detokenisation (as vLLM's): decode a short window of ids and take what it adds to the text
        # decoded at the previous step, so each token costs O(1) and not a decode of the whole completion; the
        # window starts a few tokens back so word joins and multi-byte characters decode as in the whole text
        dec = self.tokenizer.decode
        new = dec(self.ids[self._p:], skip_special_tokens=True)
        before = dec(self.ids[self._p:self._r], skip_special_tokens=True)
        old_len = len(self.text)
        if len(new) > len(before) and not new.endswith("\ufffd"):
            self.text += new[len(before):]
            self._p, self._r = self._r, len(self.ids)
        text = self.text
        cut = min((i for i in (text.find(s, max(0, old_len - len(s) + 1)) for s in self.stops) if i >= 0),
                  default=-1) if len(self.ids) >= self.min_tokens else -1
        if cut >= 0:
            self.text, self.hit_stop = text[:cut], True
            self._flush(cut)
            raise _StopStringHit("stop string reached")
        held = 0  # hold back the longest tail that may still grow into a stop string
        for s in self.stops:
            held = max([held] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
        self._flush(len(text) - held)

    def _flush(self, upto):
        if upto > self.sent:
            if self._fastload_logprobs is None:
                self.emit(self.text[self.sent:upto])
            else:
                self.emit(self.text[self.sent:upto], self.pending)
                self.pending = []
            self.sent = upto

    def end(self):
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)  # once: what a held-back tail became
        if full.startswith(self.text[:self.sent]):
            self.text = full
        self._flush(len(self.text))

    def _end_with_error(self, exc):
        pass


class _Job:
    def __init__(self, server, fn):
        self.server, self.fn, self.cancelled, self.streamer, self.state = server, fn, False, None, "waiting"

    def cancel(self):
        """The client went away: a waiting job leaves the queue's count at once, a running one stops at its next
        token (the streamer's cancel)."""
        srv = self.server
        with srv._lock:
            self.cancelled = True
            if self.state == "waiting":
                self.state = "dropped"
                srv._waiting -= 1
                srv.stats["cancelled"] += 1
        st = self.streamer
        if st is not None:
            st.cancel()


class Server:
    """The model, its tokenizer and the request queue; `app()` is the Starlette application."""

    def __init__(self, model, tokenizer, model_id=None, max_queue=32, aliases=(), concurrency=None):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        if concurrency is None:
            eng = getattr(model, "_engine_handle", None)
            opts = eng().opts if eng else {"engine": False}
            from .engine import max_num_seqs
            concurrency = max_num_seqs(model, opts) if opts["engine"] else 1
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.concurrency = concurrency
        self.model, self.tokenizer, self.max_queue = model, tokenizer, max_queue
        self.model_id = model_id or _model_id(getattr(model, "name_or_path", None) or "model")
        self.names = {self.model_id, *aliases}
        cfg = model.config
        from .engine import context_length
        self.context = context_length(model) if hasattr(cfg, "get") else 0  # YaRN: factor x original max
        eos = model.generation_config.get("eos_token_id")
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        self.eos = [int(e) for e in eos]
        self.created = int(time.time())
        vocab = cfg.get("vocab_size", 0) if hasattr(cfg, "get") else getattr(cfg, "vocab_size", 0)
        self.vocab = int(vocab or 0) or (1 << 31)  # token ids a logit_bias / stop_token_ids entry may name
        # logprobs' token text: a byte-level BPE tokenizer's pieces map back to bytes (GPT-2's byte alphabet)
        tk = getattr(tokenizer, "_tk", None)
        self._byte_level = None
        if tk is not None and "ByteLevel" in repr(getattr(tk, "decoder", None)):
            from .gguf_tokenizer import _bytes_to_unicode
            self._byte_level = {c: b for b, c in _bytes_to_unicode().items()}
        self._tok_cache = {}
        self._jobs = queue.Queue()
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0  # jobs a worker is running
        # requests answered / cancelled by their client, tokens generated (all in /health)
        self.stats = {"completed": 0, "cancelled": 0, "generated_tokens": 0}
        self._workers = [threading.Thread(target=self._work, daemon=True, name=f"fastload-serve-worker-{i}")
                         for i in range(concurrency)]
        for w in self._workers:
            w.start()

    # ------------------------------------------------------------------ the worker
    def _work(self):
        while True:
            job = self._jobs.get()
            if job is None:
                return
            with self._lock:
                if job.state == "dropped":  # its client went away while it waited (counted by cancel())
                    continue
                job.state = "running"
                self._waiting -= 1
                self._running += 1
            try:
                job.fn(job)
            except BaseException:  # noqa: BLE001 - job.fn reports its own errors; the worker must live on
                pass
            finally:
                with self._lock:
                    self._running -= 1

    def _submit(self, fn):
        job = _Job(self, fn)
        with self._lock:
            # the requests that will wait for a worker: those submitted and not yet taken, this one included, past
            # the workers that are idle (they take a job at once; counting them made an idle server with
            # --max-queue 0 refuse everything)
            if self._waiting + 1 - max(0, self.concurrency - self._running) > self.max_queue:
                raise ServeError(429, f"too many requests waiting (--max-queue {self.max_queue}); retry later",
                                 type="rate_limit_error", code="queue_full")
            self._waiting += 1
        self._jobs.put(job)
        return job

    def close(self):
        for _ in self._workers:
            self._jobs.put(None)

    def _count(self, key, n=1):
        with self._lock:
            self.stats[key] += n

    # ------------------------------------------------------------------ requests
    def _check_model(self, body):
        name = body.get("model")
        if name is not None and not isinstance(name, str):
            raise _bad("model must be a string", "model")
        if name is not None and name not in self.names:
            raise ServeError(404, f"The model `{name}` does not exist; this server serves `{self.model_id}`",
                             param="model", code="model_not_found")

    def _settings(self, body, chat):
        """Validated sampling settings: (n, max_tokens or None, stops, generate kwargs without max_new_tokens)."""
        for k in _UNSUPPORTED:
            v = body.get(k)
            if v not in (None, False, [], {}, 0, ""):
                raise _bad(f"{k} is not supported by this server", k, "unsupported_parameter")
        for k in _UNSUPPORTED_FALSE:
            if body.get(k, True) is not True and body.get(k) is not None:
                raise _bad(f"{k}={body.get(k)!r} is not supported by this server (it always does {k}=true)", k,
                           "unsupported_parameter")
        rf = body.get("response_format")
        if rf is not None and rf != {"type": "text"}:
            raise _bad("response_format other than {\"type\": \"text\"} is not supported by this server",
                       "response_format", "unsupported_parameter")
        # logprobs: the chosen token's log-probability under the model's raw logits (before temperature, top-p and
        # the model's repetition penalty: vLLM's default, raw_logprobs) and the k most likely tokens'. Chat:
        # logprobs (bool) + top_logprobs (0..20); completions: logprobs = k (0..20; OpenAI allows 5, vLLM 20).
        if chat:
            want = body.get("logprobs")
            if want is not None and not isinstance(want, bool):
                raise _bad("logprobs must be a boolean", "logprobs", "invalid_type")
            top = _int(body, "top_logprobs", None, 0, MAX_LOGPROBS)
            if top is not None and not want:
                raise _bad("top_logprobs needs logprobs: true", "top_logprobs", "invalid_value")
            logprobs = (top or 0) if want else None
        else:
            logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
        if body.get("best_of") not in (None, 1, body.get("n", 1)):
            raise _bad("best_of is not supported by this server", "best_of", "unsupported_parameter")
        n = _int(body, "n", 1, 1, MAX_N)
        key = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _int(body, key, None, 1, None)
        temp = _num(body, "temperature", 0.0, 2.0)
        top_p = _num(body, "top_p", 0.0, 1.0)
        min_p = _num(body, "min_p", 0.0, 1.0)  # vLLM's extension (sampling only)
        if top_p is not None and top_p <= 0:
            raise _bad(f"top_p must be greater than 0 and at most 1, got {top_p}", "top_p", "invalid_value")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise _bad(f"seed must be an integer, got {seed!r}", "seed", "invalid_type")
        stop = body.get("stop")
        if stop is None:
            stops = []
        elif isinstance(stop, str):
            stops = [stop]
        elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
            stops = list(stop)
        else:
            raise _bad("stop must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > MAX_STOP:
            raise _bad(f"stop takes at most {MAX_STOP} strings, got {len(stops)}", "stop", "invalid_value")
        if any(s == "" for s in stops):
            raise _bad("stop strings must not be empty", "stop", "invalid_value")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise _bad("stream must be a boolean", "stream", "invalid_type")
        opts = body.get("stream_options")
        if opts is not None and not isinstance(opts, dict):
            raise _bad("stream_options must be an object", "stream_options", "invalid_type")
        if opts and not stream:  # vLLM's rule ("Stream options can only be defined when `stream=True`")
            raise _bad("stream_options can only be given with stream: true", "stream_options", "invalid_value")
        include_usage = (opts or {}).get("include_usage", False)
        if include_usage is None:
            include_usage = False
        if not isinstance(include_usage, bool):
            raise _bad("stream_options.include_usage must be a boolean", "stream_options", "invalid_type")
        ignore_eos = body.get("ignore_eos", False)  # vLLM's extension: generate exactly max_tokens tokens
        if not isinstance(ignore_eos, bool):
            raise _bad("ignore_eos must be a boolean", "ignore_eos", "invalid_type")
        kw = {"eos_token_id": [] if ignore_eos else self.eos}
        # OpenAI's presence / frequency penalties (over the tokens generated so far) and logit_bias ({"token id":
        # bias}, -100..100, added to the logits every step); vLLM's top_k, repetition_penalty (transformers' rule,
        # prompt included) and min_tokens
        for k in ("presence_penalty", "frequency_penalty"):
            v = _num(body, k, -2.0, 2.0)
            if v:
                kw[k] = v
        lb = body.get("logit_bias")
        if lb is not None:
            if not isinstance(lb, dict):
                raise _bad("logit_bias must be an object mapping token ids to biases", "logit_bias", "invalid_type")
            bias = {}
            for t, v in lb.items():
                try:
                    tid = int(t)
                except (TypeError, ValueError):
                    raise _bad(f"logit_bias: {t!r} is not a token id", "logit_bias", "invalid_value") from None
                if not 0 <= tid < self.vocab:
                    raise _bad(f"logit_bias: token id {tid} is outside the vocabulary [0, {self.vocab})", "logit_bias",
                               "invalid_value")
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not -100 <= v <= 100:
                    raise _bad(f"logit_bias: the bias of {t} must be a number in [-100, 100], got {v!r}",
                               "logit_bias", "invalid_value")
                if v:
                    bias[(tid,)] = float(v)
            if bias:
                kw["sequence_bias"] = bias
        top_k = _int(body, "top_k", None, -1, None)
        if top_k is not None:
            kw["top_k"] = max(top_k, 0)  # vLLM: -1 (and 0) = all tokens
        rp = _num(body, "repetition_penalty", 0.0, None)
        if rp is not None:
            if rp <= 0:
                raise _bad(f"repetition_penalty must be greater than 0, got {rp}", "repetition_penalty",
                           "invalid_value")
            kw["repetition_penalty"] = rp
        mt = _int(body, "min_tokens", None, 0, None)
        if mt and max_tokens is not None and mt > max_tokens:  # vLLM refuses it too
            raise _bad(f"min_tokens must be at most {key}={max_tokens}, got {mt}", "min_tokens", "invalid_value")
        if mt:
            kw["min_new_tokens"] = mt
        tp = _num(body, "typical_p", 0.0, 1.0)  # text-generation-inference's / transformers' typical sampling
        if tp is not None:
            if tp <= 0:
                raise _bad(f"typical_p must be greater than 0, got {tp}", "typical_p", "invalid_value")
            kw["typical_p"] = tp
        bw = body.get("bad_words")  # vLLM: words never completed (as it does: the word and " word", tokenized)
        if bw is not None:
            if not isinstance(bw, list) or not all(isinstance(w, str) and w for w in bw):
                raise _bad("bad_words must be a list of non-empty strings", "bad_words", "invalid_type")
            seqs = []
            for w in bw:
                for v in (w, " " + w.lstrip()):
                    ids = [int(t) for t in self.tokenizer.encode(v, add_special_tokens=False)]
                    if ids and ids not in seqs:
                        seqs.append(ids)
            if seqs:
                kw["bad_words_ids"] = seqs
        sti = body.get("stop_token_ids")  # vLLM: more token ids that end the answer (finish_reason "stop")
        if sti is not None:
            if not isinstance(sti, list) or not all(isinstance(t, int) and not isinstance(t, bool) and
                                                    0 <= t < self.vocab for t in sti):
                raise _bad("stop_token_ids must be a list of token ids in the vocabulary", "stop_token_ids",
                           "invalid_value")
            kw["eos_token_id"] = kw["eos_token_id"] + [t for t in sti if t not in kw["eos_token_id"]]
        # a sampling-only field given without temperature samples at the model's temperature (1.0 unless its
        # generation config says otherwise), as vLLM samples at its default 1.0: top_k, min_p and typical_p were
        # accepted and changed nothing when the model's own default was greedy
        sampling_only = any(body.get(k) is not None for k in ("top_k", "min_p", "typical_p"))
        if temp is not None and temp < 1e-5:  # vLLM's _SAMPLING_EPS: greedy (what the limit T -> 0 is)
            kw["do_sample"] = False
        elif temp is not None or top_p is not None or sampling_only:
            kw["do_sample"] = True
            if temp is not None:
                kw["temperature"] = temp
            if top_p is not None:
                kw["top_p"] = top_p
        if min_p is not None:
            kw["min_p"] = min_p
        return {"n": n, "max_tokens": max_tokens, "stops": stops, "seed": seed, "kw": kw, "stream": stream,
                "include_usage": include_usage, "logprobs": logprobs}

    def _prompt_ids(self, ids, max_tokens, default_max, param):
        T = len(ids)
        if T == 0:
            raise _bad("the prompt is empty", param, "invalid_value")
        if self.context:
            if max_tokens is None:
                max_tokens = min(default_max, self.context - T) if default_max else self.context - T
                max_tokens = max(max_tokens, 1)  # a prompt that fills the context leaves no room for one token
            if T + max_tokens > self.context:
                raise _bad(f"This model's maximum context length is {self.context} tokens. However, you requested "
                           f"{T + max_tokens} tokens ({T} in the messages, {max_tokens} in the completion). Please "
                           f"reduce the length of the messages or completion.", param, "context_length_exceeded")
        elif max_tokens is None:
            max_tokens = default_max or 16
        return max_tokens

    def parse_chat(self, body):
        self._check_model(body)
        s = self._settings(body, chat=True)
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("messages must be a non-empty list", "messages", "invalid_type")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str):
                raise _bad(f"messages[{i}] must be an object with a string role", f"messages[{i}]", "invalid_type")
            c = m.get("content")
            if isinstance(c, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                           for p in c):
                    raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content",
                               "invalid_value")
                c = "".join(p["text"] for p in c)
            if c is None:
                c = ""
            if not isinstance(c, str):
                raise _bad(f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content", "invalid_type")
            clean.append({"role": m["role"], "content": c})
        if self.tokenizer.chat_template is None:
            raise _bad("this model's tokenizer has no chat template; use /v1/completions", "messages")
        try:
            enc = self.tokenizer.apply_chat_template(clean, add_generation_prompt=True, return_dict=True,
                                                     return_tensors="np")
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (roles, order)
            raise _bad(f"the chat template rejected the messages: {e}", "messages") from None
        ids = [int(t) for t in np.asarray(enc["input_ids"])[0]]
        s["max_tokens"] = self._prompt_ids(ids, s["max_tokens"], None, "messages")
        s["prompts"] = [ids]
        return s

    def parse_completion(self, body):
        self._check_model(body)
        s = self._settings(body, chat=False)
        p = body.get("prompt")
        if isinstance(p, str):
            prompts = [p]
        elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
            prompts = list(p)
        else:
            raise _bad("prompt must be a string or a non-empty list of strings", "prompt", "invalid_type")
        if len(prompts) * s["n"] > 64:
            raise _bad("at most 64 choices (prompts x n) per request", "n", "invalid_value")
        ids = [[int(t) for t in self.tokenizer(x)["input_ids"]] for x in prompts]
        mt = s["max_tokens"]
        s["max_tokens"] = min(self._prompt_ids(x, mt, 16, "prompt") for x in ids)
        s["prompts"] = ids
        return s

    def start(self, s, emit):
        """Queue a parsed request. The worker runs its choices (prompt-major, then n) and calls, from its thread,
        emit(("text", index, str, entries)), emit(("end", index, finish_reason, completion_tokens, entries)),
        emit(("error", ServeError)) and lastly emit(("done",)) (not after a cancel). entries: with logprobs, the
        (token, logprob, top) of the tokens since the choice's last event (_RequestStreamer), else []."""
        def run(job):
            idx = 0
            try:
                for ids in s["prompts"]:
                    for i in range(s["n"]):
                        kw = dict(s["kw"])
                        if s["seed"] is not None:
                            kw["seed"] = (s["seed"] + i) & 0xFFFFFFFFFFFFFFFF
                        k = idx
                        st = _RequestStreamer(self.tokenizer, s["stops"],
                                              lambda t, e=(), k=k: emit(("text", k, t, list(e))), s["logprobs"],
                                              s["kw"].get("min_new_tokens", 0))
                        job.streamer = st
                        if job.cancelled:
                            raise GenerationCancelled("the client of this request went away")
                        x = np.asarray([ids], dtype=np.int64)
                        try:
                            self.model.generate(x, attention_mask=np.ones_like(x), max_new_tokens=s["max_tokens"],
                                                streamer=st, **kw)
                        except _StopStringHit:
                            pass
                        finally:
                            self._count("generated_tokens", len(st.ids))
                        eos_end = bool(st.ids) and st.ids[-1] in kw["eos_token_id"]
                        reason = "stop" if st.hit_stop or eos_end or len(st.ids) < s["max_tokens"] else "length"
                        emit(("end", k, reason, len(st.ids), st.pending))
                        idx += 1
            except GenerationCancelled:
                self._count("cancelled")
                return
            except ServeError as e:
                emit(("error", e))
            except (ValueError, TypeError) as e:
                emit(("error", _bad(str(e))))
            except Exception as e:  # noqa: BLE001
                emit(("error", ServeError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            self._count("completed")
            emit(("done",))
        return self._submit(run)

    # ------------------------------------------------------------------ logprobs
    def _token(self, i):
        """(text, bytes) of token i as logprobs show it: the token's own bytes (a byte-level BPE piece mapped back
        to its bytes, a <0xNN> byte piece, a SentencePiece piece with its space), text the UTF-8 reading of them
        (U+FFFD where a token holds part of a character; `bytes` has the exact bytes)."""
        hit = self._tok_cache.get(i)
        if hit is not None:
            return hit
        tk = self.tokenizer
        piece = tk.convert_ids_to_tokens(int(i))
        if piece is None:
            raw = tk.decode([int(i)]).encode("utf-8")
        elif self._byte_level is not None and all(c in self._byte_level for c in piece):
            raw = bytes(self._byte_level[c] for c in piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            raw = bytes([int(piece[3:5], 16)])
        elif "\u2581" in piece:
            raw = piece.replace("\u2581", " ").encode("utf-8")
        else:
            raw = tk.decode([int(i)]).encode("utf-8")
        hit = (raw.decode("utf-8", errors="replace"), list(raw))
        if len(self._tok_cache) < 1 << 20:
            self._tok_cache[i] = hit
        return hit

    def _lp_chat(self, entries):
        def one(t, lp):
            text, raw = self._token(t)
            return {"token": text, "logprob": lp, "bytes": raw}
        return {"content": [dict(one(t, lp), top_logprobs=[one(a, b) for a, b in top]) for t, lp, top in entries],
                "refusal": None}

    def _lp_completion(self, entries, offset):
        """The legacy completions form; offset: [the choice's text offset so far], advanced here."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for t, lp, top in entries:
            text = self._token(t)[0]
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            # OpenAI's legacy form (and vLLM's): the sampled token is always there, so up to logprobs + 1 entries
            alts = {self._token(a)[0]: b for a, b in top}
            alts.setdefault(text, lp)
            out["top_logprobs"].append(alts)
            out["text_offset"].append(offset[0])
            offset[0] += len(text)
        return out

    # ------------------------------------------------------------------ HTTP
    def app(self):
        from starlette.applications import Starlette
        from starlette.exceptions import HTTPException
        from starlette.responses import JSONResponse, StreamingResponse
        from starlette.routing import Route

        def err(e):
            headers = {"Retry-After": "1"} if e.status == 429 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        async def body_of(request):
            raw = await request.body()
            try:
                body = json.loads(raw)
                if not isinstance(body, dict):
                    raise _bad("the request body must be a JSON object", code="invalid_json")
                # a lone UTF-16 surrogate ("\ud83d" cut from an emoji) is valid JSON but no text: the tokenizer, the
                # error bodies and the answer could not hold it
                json.dumps(body, ensure_ascii=False).encode("utf-8")
            except UnicodeEncodeError:  # before ValueError, its base
                raise _bad("the request body holds a string that is not valid Unicode (a lone UTF-16 surrogate "
                           "escape such as \\ud83d)", code="invalid_value") from None
            except (ValueError, UnicodeDecodeError) as e:
                raise _bad(f"the request body is not valid JSON: {e}", code="invalid_json") from None
            except RecursionError:
                raise _bad("the request body is nested too deeply", code="invalid_json") from None
            return body

        async def health(request):
            return JSONResponse({"status": "ok", "model": self.model_id, "waiting": self._waiting, **self.stats})

        async def models(request):
            return JSONResponse({"object": "list", "data": [{"id": self.model_id, "object": "model",
                                                              "created": self.created, "owned_by": "fastload"}]})

        async def handle(request, chat):
            try:
                body = await body_of(request)
                s = self.parse_chat(body) if chat else self.parse_completion(body)
            except ServeError as e:
                return err(e)
            loop = asyncio.get_running_loop()
            events = asyncio.Queue()
            emit = lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev)  # noqa: E731
            try:
                job = self.start(s, emit)
            except ServeError as e:
                return err(e)
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            obj = "chat.completion" if chat else "text_completion"
            nchoices = len(s["prompts"]) * s["n"]
            prompt_tokens = sum(len(p) for p in s["prompts"])  # counted once for n choices, as OpenAI
            usage = lambda ct: {"prompt_tokens": prompt_tokens, "completion_tokens": ct,  # noqa: E731
                                "total_tokens": prompt_tokens + ct}
            if s["stream"]:
                return StreamingResponse(self._sse(events, job, chat, rid, created, nchoices, s, usage, request),
                                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
            # not streamed: wait for the worker, but cancel the request if the client goes away meanwhile
            texts, reasons, ctoks = [""] * nchoices, [None] * nchoices, 0
            lps = [[] for _ in range(nchoices)]

            async def collect():
                nonlocal ctoks
                while True:
                    ev = await events.get()
                    if ev[0] == "text":
                        texts[ev[1]] += ev[2]
                        lps[ev[1]] += ev[3]
                    elif ev[0] == "end":
                        reasons[ev[1]], ctoks = ev[2], ctoks + ev[3]
                        lps[ev[1]] += ev[4]
                    elif ev[0] == "error":
                        return ev[1]
                    else:
                        return None

            async def gone():
                while True:
                    msg = await request.receive()
                    if msg["type"] == "http.disconnect":
                        return
            tc, tg = asyncio.ensure_future(collect()), asyncio.ensure_future(gone())
            try:
                done, _ = await asyncio.wait({tc, tg}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                if not tc.done():
                    job.cancel()
                    tc.cancel()
                tg.cancel()
            if tc not in done:
                return JSONResponse({}, status_code=499)
            e = tc.result()
            if e is not None:
                return err(e)
            want = s["logprobs"] is not None
            if chat:
                choices = [{"index": i, "message": {"role": "assistant", "content": texts[i]},
                            "logprobs": self._lp_chat(lps[i]) if want else None,
                            "finish_reason": reasons[i]} for i in range(nchoices)]
            else:
                choices = [{"index": i, "text": texts[i],
                            "logprobs": self._lp_completion(lps[i], [0]) if want else None,
                            "finish_reason": reasons[i]} for i in range(nchoices)]
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                 "system_fingerprint": None, "choices": choices, "usage": usage(ctoks)})

        async def chat_ep(request):
            return await handle(request, True)

        async def completions_ep(request):
            return await handle(request, False)

        async def http_error(request, exc):
            typ = "invalid_request_error" if exc.status_code < 500 else "server_error"
            return JSONResponse({"error": {"message": str(exc.detail), "type": typ, "param": None,
                                           "code": None}}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))  # a 405's Allow (RFC 9110 15.5.6)

        async def server_error(request, exc):
            return JSONResponse({"error": {"message": f"{type(exc).__name__}: {exc}", "type": "server_error",
                                           "param": None, "code": None}}, status_code=500)

        routes = [Route("/health", health, methods=["GET"]), Route("/v1/models", models, methods=["GET"]),
                  Route("/v1/chat/completions", chat_ep, methods=["POST"]),
                  Route("/v1/completions", completions_ep, methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={HTTPException: http_error, Exception: server_error})

    async def _sse(self, events, job, chat, rid, created, nchoices, s, usage, request=None):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(choices, **extra):
            d = {"id": rid, "object": obj, "created": created, "model": self.model_id, "system_fingerprint": None,
                 "choices": choices}
            d.update(extra)
            return "data: " + json.dumps(d) + "\n\n"

        want = s["logprobs"] is not None
        offsets = [[0] for _ in range(nchoices)]  # /v1/completions' text_offset, per choice

        def choice(i, text=None, reason=None, role=False, entries=()):
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
                lp = self._lp_chat(entries) if want and not role else None
                return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
            lp = self._lp_completion(entries, offsets[i]) if want else None
            return {"index": i, "text": text or "", "logprobs": lp, "finish_reason": reason}

        finished = False
        ctoks = 0
        try:
            if chat:
                yield chunk([choice(i, role=True) for i in range(nchoices)])
            loop = asyncio.get_running_loop()
            next_check = loop.time() + _SSE_IDLE_S
            while True:
                # A client that left is not always noticed at a send (uvicorn may drop what is sent to a closed
                # connection), and a stream may have nothing to send for a while (a long prompt, tokens that decode
                # to no text yet): every half second ask the server whether the client is still there.
                try:
                    ev = await asyncio.wait_for(events.get(), timeout=max(0.0, next_check - loop.time()))
                except asyncio.TimeoutError:
                    ev = None
                if loop.time() >= next_check:
                    if request is not None and await request.is_disconnected():
                        return  # finally: job.cancel()
                    next_check = loop.time() + _SSE_IDLE_S
                if ev is None:
                    continue
                if ev[0] == "text":
                    yield chunk([choice(ev[1], ev[2], entries=ev[3])])
                elif ev[0] == "end":
                    ctoks += ev[3]
                    yield chunk([choice(ev[1], reason=ev[2], entries=ev[4])])
                elif ev[0] == "error":
                    yield "data: " + json.dumps(ev[1].body()) + "\n\n"
                else:
                    break
            finished = True
            if s["include_usage"]:
                yield chunk([], usage=usage(ctoks))
            yield "data: [DONE]\n\n"
        finally:
            if not finished:  # the client went away (Starlette cancelled this generator): free the model
                job.cancel()


_SSE_IDLE_S = 0.5  # how often a stream checks whether its client is still there


def _int(body, key, default, lo, hi):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(f"{key} must be an integer, got {v!r}", key, "invalid_type")
    if v < lo or v > (2 ** 31 - 1 if hi is None else hi):  # the engine's int32 (a larger value was a 500 from the C call)
        rng = f"at least {lo}" if hi is None else f"between {lo} and {hi}"
        raise _bad(f"{key} must be {rng}, got {v}", key, "invalid_value")
    return v


def _num(body, key, lo, hi):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _bad(f"{key} must be a number, got {v!r}", key, "invalid_type")
    if not math.isfinite(v):  # Python's json reads Infinity and NaN
        raise _bad(f"{key} must be a finite number, got {v!r}", key, "invalid_value")
    if not lo <= v or (hi is not None and v > hi):
        rng = f"at least {lo:g}" if hi is None else f"between {lo:g} and {hi:g}"
        raise _bad(f"{key} must be {rng}, got {v}", key, "invalid_value")
    return float(v)


def _model_id(ref):
    ref = str(ref).rstrip("/\\")
    if os.path.exists(ref):
        return os.path.basename(ref)
    return ref


def add_parser(sub):
    from .__main__ import cli_device, cli_dtype, cli_int_at_least, cli_port
    sp = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the [serve] extra)",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp.add_argument("--model", help="directory, .gguf file or hub id (default: FASTLOAD_MODEL or the demo model)")
    sp.add_argument("--device", default=None, type=cli_device,
                    help="cpu, cuda, cuda:N or auto (default: FASTLOAD_DEVICE or auto)")
    sp.add_argument("--dtype", default=None, type=cli_dtype,
                    help="auto, float16, bfloat16, float32 (default: FASTLOAD_DTYPE or auto)")
    sp.add_argument("--quant", default=None, choices=["none", "int8", "int4", "nf4"],
                    help="quantise the linear layers at load (default: FASTLOAD_QUANT, else none)")
    sp.add_argument("--kv-cache-dtype", "--kv_cache_dtype", dest="kv_cache_dtype", default=None,
                    choices=["auto", "float16", "float32"],
                    help="keys and values as: auto (the activation dtype) or float16 (CPU: twice the tokens in the "
                         "same pool); default FASTLOAD_KV_CACHE_DTYPE, else auto")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=cli_port, default=8000)
    sp.add_argument("--max-queue", "--max_queue", dest="max_queue", type=cli_int_at_least(0), default=32,
                    help="requests allowed to wait for a worker; more get 429 (default 32)")
    sp.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=cli_int_at_least(1),
                    default=None,
                    help="requests generating at once (worker threads; their steps are batched by the engine; "
                         "default: the engine's max_num_seqs, 64 on CUDA, 16 on the CPU)")
    sp.add_argument("--served-model-name", dest="served_model_name", default=None,
                    help="the model id in /v1/models and answers (default: the file or directory name)")
    sp.add_argument("--log-level", dest="log_level", default="info",
                    choices=["critical", "error", "warning", "info", "debug", "trace"], help="uvicorn's log level")
    sp.set_defaults(fn=cmd_serve)


def cmd_serve(args):
    try:
        import uvicorn  # noqa: F401
        import starlette  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"python -m fastload serve needs the [serve] extra: pip install 'fastload[serve]' ({e})")
    from .__main__ import _load, _model_ref
    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError("--served-model-name: the model id must not be empty")
    # the socket first, then the model: a port in use or a host that does not resolve is a usage error naming the
    # flag, before seconds of loading (uvicorn found it after the load and the banner, and exited 3); the bound
    # socket is handed to uvicorn, so nothing can take the port in between
    sock = _bind(args.host, args.port)
    try:
        ref = _model_ref(args)
        tok, model = _load(args)
        server = Server(model, tok, model_id=args.served_model_name or _model_id(ref), max_queue=args.max_queue,
                        aliases=(str(ref),), concurrency=args.max_concurrency)
        host, port = args.host, sock.getsockname()[1]
        shown = f"[{host}]" if ":" in host else host
        print(f"fastload serve: {server.model_id} on http://{shown}:{port}/v1", flush=True)
        import uvicorn
        uvicorn.Server(uvicorn.Config(server.app(), host=host, port=port, log_level=args.log_level)).run(sockets=[sock])
    finally:
        sock.close()


def _bind(host, port):
    """A listening TCP socket on (host, port), as uvicorn makes its own (SO_REUSEADDR, the first address the host
    resolves to); OSError naming --host / --port when the host does not resolve or the address is taken."""
    import socket
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise OSError(f"--host {host}: cannot be resolved ({e.strerror})") from None
    fam, typ, proto, _, addr = infos[0]
    sock = socket.socket(fam, typ, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise OSError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    sock.set_inheritable(True)
    return sock
