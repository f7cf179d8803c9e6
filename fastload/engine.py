"""The engine behind generate / chat / forward (csrc/engine.h): every call is a request to one scheduler per model,
which batches whatever requests are running into each decode step (continuous batching) and keeps their keys and
values in one pool of fixed-size pages (a paged KV cache). A forward (model(ids)) is a request too: the scheduler runs
it whole between its steps, with a transient KV cache of its own B x T slots, freed after it (it takes no pool pages:
its keys matter only inside its own pass); the pool is made at the first generate, not for a forward.

So a ThreadPoolExecutor of callers runs as one batch instead of one caller at a time, KV memory follows the tokens in
use (not batch x max_length), requests that start with the same pages of prompt (a system prompt) share them, and
nothing changes for a single caller: the same tokens (greedy output of a request is the same as alone), the same
speed within noise.

Settings, at from_pretrained or later with model.configure_engine():
  kv_cache_memory   the pool: bytes (int), or a fraction (0 < f <= 1) of the device memory free when the engine
                    starts (first generate). Default: CUDA 0.4 of free memory, CPU 2 GiB; never more than
                    max_num_seqs full contexts. memory_stats() reports it.
  max_num_seqs      requests decoded together per step (vLLM's name; default 64 on CUDA, 16 on the CPU). More wait in
                    the queue.
  max_queue         waiting requests allowed before generate raises fastload.EngineBusy (default: no limit).
                    Forward calls are not counted (each waits at most for the forwards queued before it).
  prefill_chunk     prompt tokens read per step, between two decode steps of the running requests (default: CUDA
                    2048, CPU 512): larger starts a newcomer sooner, smaller keeps the others' inter-token gaps short.
                    A forward of more tokens (B x T) is read in chunks of at most this many, one a step.
  kv_page_tokens    tokens per KV page (a power of two, default 16).
  kv_cache_dtype    what keys and values are stored as: "auto" (default: the activation dtype: float32 on the CPU,
                    the model's bf16 / fp16 on CUDA) or "float16" (the CPU backend only, as llama.cpp's default f16
                    cache: half the pool's bytes a token, so twice the tokens in the same kv_cache_memory, and less
                    to read per decode step at long contexts; keys and values rounded to float16 once as they are
                    stored, the attention's arithmetic float32 as before). vLLM's name; "fp16" / "half" are the same.
                    FASTLOAD_KV_CACHE_DTYPE sets the default.
  prefix_caching    share and keep full prompt pages between requests (default True; FASTLOAD_PREFIX_CACHING=0).
                    A request that reuses another's pages skips computing them; its own part is computed over fewer
                    rows, which on the CPU can round differently (other kernels), so a greedy answer can differ in
                    a near-tie from the same request without sharing, as with vLLM's prefix caching.
  preemption_mode   what a request preempted by a dry pool does when it is read again (vLLM's name):
                    "replay" (default; FASTLOAD_PREEMPTION_MODE): its prompt as a prompt, then the tokens it had
                    generated fed one a decode step, so their keys and values are computed by the same kernels as the
                    first time: the same bits, and the answer the request gives alone. "recompute": prompt and
                    generated tokens read as one prompt (a chunk a step instead of a step a token: sooner back, but
                    other matmul kernels round differently, so a greedy answer can flip in a near-tie, as in vLLM).
  engine            False: one request at a time (max_num_seqs 1, in order of arrival), each alone through the same
                    loop; also FASTLOAD_ENGINE=0. There is no other generation loop: the engine is the one loop
                    of both backends (the pre-engine one-call loops, generate.c and generate_cuda.cu, were removed).
"""
import threading
import time
import weakref

import numpy as np

from . import config as cfgmod

ENGINE_KEYS = ("kv_cache_memory", "max_num_seqs", "max_queue", "engine", "prefill_chunk", "kv_page_tokens",
               "prefix_caching", "kv_cache_dtype", "preemption_mode")
PREEMPTION_MODES = ("replay", "recompute")
KV_DTYPES = {"auto": "auto", "float16": "float16", "fp16": "float16", "half": "float16", "float32": "float32",
             "fp32": "float32", "float": "float32"}
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def options(kv_cache_memory=None, max_num_seqs=None, max_queue=None, engine=None, prefill_chunk=None,
            kv_page_tokens=None, prefix_caching=None, kv_cache_dtype=None, preemption_mode=None) -> dict:
    """Check and normalise the engine settings (from_pretrained / configure_engine arguments)."""
    if kv_cache_dtype is None:
        kv_cache_dtype = cfgmod.env("FASTLOAD_KV_CACHE_DTYPE") or "auto"
    name = str(getattr(kv_cache_dtype, "name", kv_cache_dtype)).replace("torch.", "").strip().lower()  # torch.float16 too
    if name not in KV_DTYPES:
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: one of 'auto', 'float16' (the CPU backend), 'float32'")
    kv_cache_dtype = KV_DTYPES[name]
    if preemption_mode is None:
        preemption_mode = cfgmod.env("FASTLOAD_PREEMPTION_MODE") or "replay"
    if not isinstance(preemption_mode, str) or preemption_mode.strip().lower() not in PREEMPTION_MODES:
        raise ValueError(f"preemption_mode={preemption_mode!r}: one of 'replay' (default: a preempted request's "
                         "tokens are the same as alone), 'recompute'")
    preemption_mode = preemption_mode.strip().lower()
    if engine is None:
        env = cfgmod.env("FASTLOAD_ENGINE")
        engine = True if env is None else env.strip().lower() not in ("0", "false", "no", "off")
    if prefix_caching is None:
        env = cfgmod.env("FASTLOAD_PREFIX_CACHING")
        prefix_caching = True if env is None else env.strip().lower() not in ("0", "false", "no", "off")
    if kv_cache_memory is not None:
        import numbers
        if isinstance(kv_cache_memory, numbers.Integral) and not isinstance(kv_cache_memory, bool):
            kv_cache_memory = int(kv_cache_memory)  # numpy's integers too (np.float64 is a float already)
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, (int, float)):
            raise TypeError(f"kv_cache_memory must be bytes (int) or a fraction of free memory (float), "
                            f"not {type(kv_cache_memory).__name__}")
        if isinstance(kv_cache_memory, float) and not 0 < kv_cache_memory <= 1:
            raise ValueError(f"kv_cache_memory={kv_cache_memory}: a fraction must be in (0, 1]; give bytes as an int")
        if isinstance(kv_cache_memory, int) and not 0 < kv_cache_memory < 1 << 63:
            raise ValueError(f"kv_cache_memory={kv_cache_memory} bytes must be positive and below 2**63")
    for name, v, lo, hi in (("max_num_seqs", max_num_seqs, 1, 4096), ("max_queue", max_queue, 0, 1 << 30),
                            ("prefill_chunk", prefill_chunk, 16, 65536), ("kv_page_tokens", kv_page_tokens, 1, 4096)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi):
            raise ValueError(f"{name}={v!r} must be an integer in [{lo}, {hi}]")
    if kv_page_tokens is not None and kv_page_tokens & (kv_page_tokens - 1):
        raise ValueError(f"kv_page_tokens={kv_page_tokens} must be a power of two")
    return {"engine": bool(engine), "kv_cache_memory": kv_cache_memory, "max_num_seqs": max_num_seqs,
            "max_queue": max_queue or 0, "prefill_chunk": prefill_chunk, "kv_page_tokens": kv_page_tokens or 16,
            "prefix_caching": bool(prefix_caching), "kv_cache_dtype": kv_cache_dtype, "preemption_mode": preemption_mode}


def kv_dtype(model, opts) -> str:
    """The dtype the engine stores keys and values in: the activation dtype, or float16 on the CPU; ValueError naming
    kv_cache_dtype where the backend cannot (CUDA keeps them in the activation dtype)."""
    want, act = opts["kv_cache_dtype"], act_dtype(model)
    if want == "auto" or want == act:
        return act
    if want == "float16" and model.device == "cpu":
        return "float16"
    raise ValueError(f"kv_cache_dtype={want!r}: the {model.device} backend keeps keys and values in the activation "
                     f"dtype, {act} here ('float16' is for the CPU backend, whose activations are float32)")


def kv_f16(model, opts) -> bool:
    """Whether the core is asked for a float16 cache (engine_start's kv_f16): a dtype other than the activations'."""
    return kv_dtype(model, opts) != act_dtype(model)


def act_dtype(model) -> str:
    """The backend's activation dtype: float32 on the CPU, the model's dtype on CUDA."""
    return "float32" if model.device == "cpu" else str(model.dtype).replace("torch.", "")


def max_num_seqs(model, opts) -> int:
    """Requests per decode step: 1 with engine=False (each request alone, in order of arrival), else max_num_seqs,
    else 64 on CUDA and 16 on the CPU (where up to 16 rows run in passes of 4 through the decode kernels, each row the
    same bits as alone; a CPU is compute-bound long before 64)."""
    if not opts["engine"]:
        return 1
    if opts["max_num_seqs"]:
        return opts["max_num_seqs"]
    return 64 if str(model.device).startswith("cuda") else 16


def kv_bytes_per_token(model, opts=None) -> int:
    """K and V bytes of one token, every layer, as the engine stores them (opts: its settings; the model's own engine's
    when None)."""
    from . import arch
    c = model.config
    nh = c.num_attention_heads
    hd = arch.head_dim(dict(c), model.arch)  # Qwen3 without head_dim: 128, not hidden / heads
    nkv = arch.kv_heads(dict(c), model.arch, nh)
    # the activation dtype (float32 on the CPU, the model's on CUDA), or float16 with kv_cache_dtype="float16"
    opts = opts if opts is not None else model._engine_handle().opts
    es = 4 if kv_dtype(model, opts) == "float32" else 2
    return 2 * c.num_hidden_layers * nkv * hd * es


def context_length(model) -> int:
    """Tokens one request may hold: max_position_embeddings, or more where YaRN extends it (arch.context_length)."""
    from . import arch
    return arch.context_length(dict(model.config), getattr(model, "arch", None))


def pool_bytes(model, opts) -> int:
    """The pool size the engine will get: kv_cache_memory resolved against the device now."""
    per_tok = kv_bytes_per_token(model, opts)
    ctx = context_length(model) or 4096
    cap = per_tok * ctx * max_num_seqs(model, opts) + per_tok * opts["kv_page_tokens"]
    want = opts["kv_cache_memory"]
    if isinstance(want, int):
        got = want
    elif model.device.startswith("cuda"):
        from . import cuda
        free, _ = cuda.mem_get_info(model.device)
        got = int(min(cap, (want if want is not None else 0.4) * free))
    elif want is None:
        got = int(min(cap, 2 << 30))
    else:
        try:
            import os
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            avail = 8 << 30
        got = int(min(cap, want * avail))
    page = per_tok * opts["kv_page_tokens"]
    if got < page:  # a fraction of little free memory can come to nothing: say so here, not as the core's check
        raise ValueError(f"kv_cache_memory={want!r} comes to {got} bytes on {model.device} now, less than one page of "
                         f"keys and values ({opts['kv_page_tokens']} tokens, {page} bytes)")
    return got


class Engine:
    """One model's engine handle (the core engine starts on first use and lives as long as the model)."""

    def __init__(self, model, opts):
        self._model = weakref.ref(model)  # the model holds this handle: no reference cycle keeps its weights alive
        self._core = model._core  # the core this handle's engine lives in (to() gives the model a new core and handle)
        self.opts = opts
        self._lock = threading.Lock()
        self._started = False
        self._pooled = False
        self._calls = 0  # forward / generate calls using this handle now (under _lock)
        self._next = None  # set by close(): the handle that replaced this one, where later calls go

    def core(self, pool=True):
        """The model's core with its engine started. pool: also its KV page pool (generate needs it; a forward does
        not, so a model that only runs forwards never holds the pool's memory, and kv_cache_memory as a fraction is
        resolved against the memory free at the first generate)."""
        if not self._started or (pool and not self._pooled):
            with self._lock:
                m = self._model()
                if not self._started:
                    self._core.engine_start(0, page_tokens=self.opts["kv_page_tokens"],
                                            max_batch=max_num_seqs(m, self.opts),
                                            prefill_chunk=self.opts["prefill_chunk"] or
                                            (2048 if str(m.device).startswith("cuda") else 512),
                                            max_waiting=self.opts["max_queue"],
                                            max_context=context_length(m),
                                            prefix_caching=self.opts["prefix_caching"],
                                            kv_f16=kv_f16(m, self.opts),
                                            preempt_recompute=self.opts["preemption_mode"] == "recompute")
                    self._started = True
                if pool and not self._pooled:
                    self._core.engine_pool(pool_bytes(m, self.opts))
                    self._pooled = True
        return self._core

    def _enter(self, pool):
        """Count one call on this handle and return its core, engine started (and pooled, if pool); None when
        configure_engine retired the handle before the call got here (the caller uses the model's new one). While
        calls are counted, close() refuses: a call between taking the core and submitting its request never finds
        the engine stopped under it (nor does a forward start a default engine in the stopped one's place)."""
        with self._lock:
            if self._next is not None:
                return None
            self._calls += 1
        try:
            return self.core(pool)
        except BaseException:
            self._leave()
            raise

    def _leave(self):
        with self._lock:
            self._calls -= 1

    def close(self, successor):
        """Stop the core engine and retire this handle for `successor` (configure_engine). Refused while a call runs
        on it."""
        with self._lock:
            if self._calls:
                raise RuntimeError(f"configure_engine: {self._calls} forward / generate call(s) are still running on "
                                   "the engine (wait for them, or cancel their streams, first)")
            if self._started:
                self._core.engine_stop()  # refuses while requests (a stream given up but not yet ended) remain
            self._next = successor

    def stats(self):
        return self._core.engine_stats() if self._started else None

    def forward(self, ids, mask, pos):
        """float32 logits [B, T, V] of every position: a forward request (csrc/engine.h), run whole by the scheduler
        between its steps with a transient KV cache of B x T slots, the caller waiting with the GIL released."""
        core = self._enter(pool=False)
        if core is None:
            return self._next.forward(ids, mask, pos)
        try:
            return core.forward(ids, mask, pos)
        finally:
            self._leave()

    def generate(self, ids, mask, max_new, min_new, r, seed, eos, pad, on_token=None, stops=(), tokenizer=None,
                 max_time=None, keep=None, on_record=None, on_submit=None):
        """Rows of ids (left padding in mask as transformers) as one request each; returns [B, T + n_new] int64 with
        pad after a row's end, as transformers' generate. on_token: called with each new token (B == 1) or with each
        step's array of B tokens, pad for rows that ended (B > 1), as a streamer's put. stops: strings
        that end a row at the token completing one (transformers' stop_strings), decoded with tokenizer. max_time:
        seconds from now after which every row ends with the tokens it has (transformers' max_time).
        keep: what the engine keeps of each token, {"keep_scores": bool, "keep_logits": bool, "logprobs": k or -1}
        (fl_gen_params.keep_*); then the result is (ids, rows) with rows[b] the float32 [n_b, row] records of row b's
        n_b tokens (Request.records). on_record (B == 1, with on_token): called with each token's record before
        on_token gets the token. on_submit: called with the engine's requests once they are queued (a streamer's
        cancel() then reaches a request that has no token yet)."""
        core = self._enter(pool=True)
        if core is None:
            return self._next.generate(ids, mask, max_new, min_new, r, seed, eos, pad, on_token, stops, tokenizer,
                                       max_time, keep, on_record, on_submit)
        try:
            return self._generate(core, ids, mask, max_new, min_new, r, seed, eos, pad, on_token, stops, tokenizer,
                                  max_time, keep, on_record, on_submit)
        finally:
            self._leave()

    def _generate(self, core, ids, mask, max_new, min_new, r, seed, eos, pad, on_token, stops, tokenizer, max_time,
                  keep, on_record, on_submit=None):
        deadline = None if max_time is None else time.monotonic() + max_time
        B, T = ids.shape
        reqs = []
        try:
            rows = _prompt_rows(ids, mask)
            # one group: the engine queues every row under one lock, so the batches it forms from them (and a
            # batched matmul's rounding) are the same on every run, whatever its driver was doing meanwhile
            reqs = core.engine_submit(
                rows, max_new_tokens=int(max_new), min_new_tokens=int(min_new),
                do_sample=bool(r["do_sample"]), temperature=float(r["temperature"]), top_k=int(r["top_k"]),
                top_p=float(r["top_p"]), min_p=float(r.get("min_p", 0.0)),
                repetition_penalty=float(r["repetition_penalty"]),
                presence_penalty=float(r.get("presence_penalty", 0.0)),
                frequency_penalty=float(r.get("frequency_penalty", 0.0)),
                no_repeat_ngram_size=int(r.get("no_repeat_ngram_size", 0)),
                typical_p=float(r.get("typical_p", 1.0)), epsilon_cutoff=float(r.get("epsilon_cutoff", 0.0)),
                eta_cutoff=float(r.get("eta_cutoff", 0.0)),
                begin_suppress=r.get("begin_suppress_tokens") or None, forced_eos=r.get("forced_eos_token_id") or None,
                **_bias_arrays(r.get("bias")),
                seed=[(seed + _GOLDEN * b) & _M64 for b in range(B)], eos_token_ids=eos, **(keep or {}))
            if on_submit is not None:
                on_submit(reqs)
            if on_token is not None and B > 1:
                outs = self._collect_steps(reqs, on_token, pad, deadline)
            else:
                outs = [self._collect(q, on_token if b == 0 else None, stops, tokenizer, deadline,
                                      on_record if b == 0 else None, rows[b])
                        for b, q in enumerate(reqs)]
            recs = [q.records(0, len(o)) for q, o in zip(reqs, outs)] if keep else None
        except BaseException:
            for q in reqs:
                q.cancel()
            try:  # the next step drops them: return once their pages are back in the pool
                for q in reqs:
                    _wait_done(q)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C: leave them to the engine
                pass
            raise
        n_new = max((len(o) for o in outs), default=0)
        out = np.full((B, T + n_new), pad, dtype=np.int64)
        out[:, :T] = ids
        for b, o in enumerate(outs):
            out[b, T:T + len(o)] = o
        return out if keep is None else (out, recs)

    def beam_generate(self, ids, mask, max_new, min_new, r, eos, fill):
        """Beam search (transformers' _beam_search, greedy): one engine request of num_beams beams a row (csrc/engine.c
        "beam search"). Returns ([B * num_return_sequences, T + n_new] int64 ids, float32 scores of each row, int64
        beam_indices [B * num_return_sequences, n_new] (the beam of each step, + b * num_beams, -1 past a hypothesis'
        end), and with r["output_scores"] the steps' float32 [B * num_beams, vocab] processed log-probs, else None):
        the hypotheses of row b, best first, at rows b * n .. b * n + n - 1 as transformers orders them, padded with
        `fill` after their end. A row whose search ended before the others' reads -inf there, 0 at `fill`."""
        core = self._enter(pool=True)
        if core is None:
            return self._next.beam_generate(ids, mask, max_new, min_new, r, eos, fill)
        try:
            return self._beam_generate(core, ids, mask, max_new, min_new, r, eos, fill)
        finally:
            self._leave()

    def _beam_generate(self, core, ids, mask, max_new, min_new, r, eos, fill):
        B, T = ids.shape
        K, n_ret = int(r["num_beams"]), int(r["num_return_sequences"])
        if not self.opts["engine"]:
            raise ValueError(f"num_beams={K}: beam search runs its beams as rows of the engine's batch, and this model "
                             "was loaded with engine=False (one row at a time); load it with the engine (the default)")
        rows = _prompt_rows(ids, mask)
        reqs = []
        try:
            reqs = core.engine_submit(
                rows, max_new_tokens=int(max_new), min_new_tokens=int(min_new),
                repetition_penalty=float(r["repetition_penalty"]),
                presence_penalty=float(r.get("presence_penalty", 0.0)),
                frequency_penalty=float(r.get("frequency_penalty", 0.0)),
                no_repeat_ngram_size=int(r.get("no_repeat_ngram_size", 0)),
                begin_suppress=r.get("begin_suppress_tokens") or None, forced_eos=r.get("forced_eos_token_id") or None,
                **_bias_arrays(r.get("bias")), eos_token_ids=eos, num_beams=K, num_return_sequences=n_ret,
                length_penalty=float(r["length_penalty"]), early_stopping=int(r["early_stopping"]),
                keep_scores=bool(r.get("output_scores")))
            hyps, steps = [], []
            for q in reqs:
                _wait_done(q)
                q.check()
                hyps.append(q.beams())
                steps.append(q.beam_scores() if r.get("output_scores") else None)
        except BaseException:
            for q in reqs:
                q.cancel()
            try:
                for q in reqs:
                    _wait_done(q)
            except BaseException:  # noqa: BLE001 - a second Ctrl-C: leave them to the engine
                pass
            raise
        if max_new == 0:  # nothing generated: the prompt, n_ret times (scores as transformers' unfilled slots)
            hyps = [[(np.zeros(0, np.int64), -1e9, np.zeros(0, np.int64))] * n_ret for _ in range(B)]
        n_new = max((len(h[0]) for hs in hyps for h in hs), default=0)
        out = np.full((B * n_ret, T + n_new), fill, dtype=np.int64)
        scores = np.zeros(B * n_ret, dtype=np.float32)
        bidx = np.full((B * n_ret, n_new), -1, dtype=np.int64)
        for b, hs in enumerate(hyps):
            for i, (toks, sc, bi) in enumerate(hs):
                out[b * n_ret + i, :T] = ids[b]
                out[b * n_ret + i, T:T + len(toks)] = toks
                scores[b * n_ret + i] = sc
                bidx[b * n_ret + i, :len(bi)] = bi + b * K
        per_step = None
        if r.get("output_scores") and max_new > 0:
            V = max(s.shape[2] for s in steps)
            n_steps = max(s.shape[0] for s in steps)
            arr = np.full((n_steps, B * K, V), -np.inf, dtype=np.float32)
            for b, s in enumerate(steps):
                arr[:s.shape[0], b * K:(b + 1) * K] = s
                if s.shape[0] < n_steps and 0 <= fill < V:
                    arr[s.shape[0]:, b * K:(b + 1) * K, fill] = 0
            per_step = tuple(arr)
        return out, scores, bidx, per_step

    @classmethod
    def _collect_steps(cls, reqs, on_step, pad, deadline):
        """Streaming a batch (transformers' streamers get one array of B tokens per step): step k's array holds each
        row's k-th new token, pad for a row that has ended. Returns every row's tokens."""
        B = len(reqs)
        outs = [None] * B
        k = 0
        while any(o is None for o in outs):
            step = np.full(B, pad, dtype=np.int64)
            got = False
            for b, q in enumerate(reqs):
                if outs[b] is not None:
                    continue
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                n, done = q.wait(k, timeout=left)
                if deadline is not None and time.monotonic() >= deadline and n <= k and not done:
                    outs[b] = cls._end_early(q, n)
                elif n > k:
                    step[b] = q.tokens(k, k + 1)[0]
                    got = True
                else:  # done with k tokens: ended
                    q.check()
                    outs[b] = q.tokens()
            if got:
                on_step(step)
            k += 1
        return outs

    @staticmethod
    def _end_early(q, have):
        """Stop q (a stop string, max_time) and return its first `have` tokens once its pages are back."""
        q.cancel()  # the tokens it made meanwhile are dropped
        _wait_done(q)
        return q.tokens(0, have)

    @classmethod
    def _collect(cls, q, on_token, stops, tokenizer, deadline=None, on_record=None, prompt=()):
        """A request's tokens once it ends: token by token when they are streamed or checked for stop strings
        (on_record, with on_token: each token's kept record first; prompt: its ids, whose end a stop string may
        begin in)."""
        if on_token is None and not stops and deadline is None:
            _wait_done(q)
            q.check()
            return q.tokens()
        stop = _StopCheck(stops, tokenizer, prompt) if stops else None
        have = 0
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            # max_time: the tokens made by now (those streamed, when streaming), none when the request was still
            # queued or its first token had not come (transformers makes one before it checks; waiting here for a
            # request queued behind others could take any time: the deadline is what the caller asked for)
            if left is not None and left <= 0:
                if on_token is not None:
                    return cls._end_early(q, have)
                n = q.wait(1 << 30, timeout=0)[0]
                if stop is not None:  # the rows after the first of a batch: their stop strings checked here
                    for t in q.tokens(have, n):
                        have += 1
                        if stop.hit(int(t)):
                            break
                    n = have
                return cls._end_early(q, n)
            n, done = q.wait(have, timeout=left)
            recs = q.records(have, n) if on_record is not None else None
            for i, t in enumerate(q.tokens(have, n)):
                have += 1
                if recs is not None:
                    on_record(recs[i])
                if on_token is not None:
                    on_token(int(t))
                if stop is not None and stop.hit(int(t)):
                    return cls._end_early(q, have)
            if done:
                q.check()
                return q.tokens(0, have)


def _prompt_rows(ids, mask):
    """Each row's tokens where the mask is 1 (left padding dropped), int32, for engine_submit."""
    rows = []
    for b in range(ids.shape[0]):
        row = ids[b] if mask is None else ids[b][mask[b] != 0]
        if row.size == 0:
            raise ValueError(f"input row {b} has no token" + ("" if ids.shape[1] == 0 or mask is None else
                                                              " (its attention_mask is all zeros)"))
        rows.append(row.astype(np.int32))
    return rows


def _bias_arrays(bias):
    """engine_submit's bias_tokens / bias_offsets / bias_values from [(token sequence, value), ...]."""
    if not bias:
        return {}
    off = np.cumsum([0] + [len(seq) for seq, _ in bias]).astype(np.int32)
    return {"bias_tokens": np.asarray([t for seq, _ in bias for t in seq], np.int32), "bias_offsets": off,
            "bias_values": np.asarray([v for _, v in bias], np.float32)}


def _wait_done(q):
    """Until q has ended (its pages are back in the pool). Ctrl-C raises here: Request.wait checks for signals."""
    while not q.wait(1 << 30, timeout=10.0)[1]:
        pass


class _StopCheck:
    """Whether a stop string was just completed, token by token: it is in the text of the last tokens and was not
    before the newest one (transformers' stop_strings: the row ends with the token that completes one). Decodes a
    window of the last tokens, long enough for the longest stop string, not the whole answer each time. The window
    starts with the prompt's last tokens: as transformers' StopStringCriteria, which reads the whole sequence, a stop
    string may begin in the prompt and end in the answer ("France is" + " Paris" stops at "is Paris"); one wholly in
    the prompt never stops (it ends before the first new token)."""

    def __init__(self, stops, tokenizer, prompt=()):
        self.stops, self.tok = list(stops), tokenizer
        self.window = max(len(s) for s in self.stops) + 4
        self.ids = [int(t) for t in prompt[-self.window:]]

    def hit(self, t) -> bool:
        self.ids.append(t)
        w = self.ids[-self.window:]
        cur = self.tok.decode(w, skip_special_tokens=False)
        prev = self.tok.decode(w[:-1], skip_special_tokens=False) if len(w) > 1 else ""
        if not cur.startswith(prev):  # a decode that rewrote the text before the token: the whole-window rule
            return any(s in cur and s not in prev for s in self.stops)
        # an occurrence that ends inside the newest token's text: a stop string also present earlier in the window
        # (the prompt's end, say) must not hide a fresh one
        return any(cur.find(s, max(0, len(prev) - len(s) + 1)) != -1 for s in self.stops)
