"""Perplexity of a text under a model: token perplexity, word_perplexity, byte_perplexity and bits_per_byte.

    r = fastload.evaluate.perplexity(model, tokenizer, open("benchmarks/data/devils_dictionary.txt").read(), context=2048)
    r["word_perplexity"], r["bits_per_byte"]

Two ways to cut a long text into windows the model can take:

* **rolling** (the default; lm-evaluation-harness's `loglikelihood_rolling`, used by its wikitext-style tasks).
  The text is tokenised without special tokens (see add_special_tokens) and every token is scored exactly once, in windows of `context`
  tokens: the first window is the prefix token (bos, else eos) followed by the first context-1 tokens and
  scores the first `context` tokens; each later window scores the next `context` tokens (fewer in the last) and
  is fed the `context` tokens just before each scored one, so a window's first scored token sees one token of the
  window before, and the last window, when short, sees more. This is the harness's
  lm_eval/utils.py get_rolling_token_windows(token_list, prefix_token, max_seq_len=context, context_len=1)
  followed by make_disjoint_window, with the model input built as in lm_eval/models/huggingface.py
  _loglikelihood_tokens ((context + continuation)[-(max_length + 1):][:-1]) and the default max_length of
  lm_eval/models/utils.py resolve_max_length (the config's n_positions / max_position_embeddings / n_ctx, else the
  tokenizer's model_max_length, else 2048).
* **strided** (`stride=` given; the "strided sliding window" of transformers' guide "Perplexity of fixed-length
  models", docs/source/en/perplexity.md). The text is tokenised as `tokenizer(text)` does (special tokens
  included), windows of `context` tokens start every `stride` tokens, and each scores only the tokens after
  the previous window's end (target -100 elsewhere; the first token of the text, and of every window when
  stride == context, has no prediction and is not scored). `perplexity` is exp(-sum / scored tokens);
  `recipe_perplexity` repeats the guide's own arithmetic, which weights each window's mean loss by its number of
  targets minus one (nll_sum += loss * (valid - 1)), so it can differ from `perplexity` in the last digits.

The four numbers, from the summed log-likelihood LL (natural log) of the scored tokens, are those of
lm-evaluation-harness's rolling tasks (lm_eval/api/task.py process_results with count_words / count_bytes,
aggregated by lm_eval/api/metrics.py weighted_perplexity and bits_per_byte):
  perplexity = exp(-LL / tokens), word_perplexity = exp(-LL / words), byte_perplexity = exp(-LL / bytes),
  bits_per_byte = -LL / (bytes * ln 2),
where words = len(re.split(r"\\s+", text)) (a leading or trailing whitespace run counts one empty word, as there)
and bytes = len(text.encode("utf-8")). A list of texts is scored as separate documents and the sums are pooled,
as the harness does over a task's documents.

Logits come from model.forward (float32, every position of one window at a time); log-softmax is taken in float64
numpy on the scored rows only, so nothing of size [tokens, vocab] is held beyond one window.
"""
from __future__ import annotations

import math
import re
import time

import numpy as np

from . import _C

__all__ = ["perplexity", "rolling_windows", "strided_windows", "default_context", "count_words", "count_bytes"]

DEFAULT_MAX_LENGTH = 2048  # lm_eval/models/utils.py DEFAULT_MAX_LENGTH
_TOKENIZER_INFINITY = 1000000000000000019884624838656  # transformers' "no limit" model_max_length (int(1e30))
_WORDS = re.compile(r"\s+")


def count_words(text: str) -> int:
    """lm-evaluation-harness's word count for rolling tasks (lm_eval/api/task.py count_words)."""
    return len(_WORDS.split(text))


def count_bytes(text: str) -> int:
    """lm-evaluation-harness's byte count for rolling tasks (lm_eval/api/task.py count_bytes)."""
    return len(text.encode("utf-8"))


def default_context(model, tokenizer=None) -> int:
    """The window length lm-evaluation-harness's HF model uses when max_length is not given
    (lm_eval/models/utils.py resolve_max_length): the config's n_positions, max_position_embeddings or n_ctx,
    else the tokenizer's model_max_length unless it is transformers' "unlimited", else 2048."""
    cfg = getattr(model, "config", None) or {}
    get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    text_cfg = get("text_config")
    if text_cfg:
        cfg = text_cfg
        get = cfg.get if isinstance(cfg, dict) else (lambda k: getattr(cfg, k, None))
    for k in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = get(k)
        if v is not None:
            return int(v)
    mml = getattr(tokenizer, "model_max_length", None)
    if mml is not None and mml != _TOKENIZER_INFINITY and mml < 1e29:
        return int(mml)
    return DEFAULT_MAX_LENGTH


def rolling_windows(n_tokens: int, context: int):
    """lm-evaluation-harness's rolling windows over token positions 0..n_tokens-1 (lm_eval/utils.py
    get_rolling_token_windows with context_len=1, then make_disjoint_window), as (start, end, first_scored):
    the model input is the tokens at positions start..end-2, position -1 meaning the prefix token (only the
    first window starts there), and the targets first_scored..end-1 are scored, each from the input position
    just before it. Every position is scored exactly once; every input is at most `context` tokens."""
    if n_tokens <= 0:
        return
    first = min(context, n_tokens)
    yield -1, first, 0
    done = first
    while done < n_tokens:
        k = min(n_tokens - done, context)  # pred_len = max_seq_len - context_len + 1 = context
        end = done + k
        yield end - context - 1, end, done
        done = end


def strided_windows(n_tokens: int, context: int, stride: int):
    """The windows of transformers' strided-sliding-window recipe (docs/source/en/perplexity.md), as
    (begin, end, first_scored, valid): the model input is tokens[begin:end]; the recipe's labels are the last
    trg_len = end - prev_end of them (`target_ids[:, :-trg_len] = -100`), `valid` of them inside the window; the
    model shifts labels by one, so the targets first_scored..end-1 are scored (first_scored >= begin + 1: a
    window's first token has no prediction)."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        trg_len = end - prev_end
        valid = min(trg_len, end - begin)
        yield begin, end, max(end - valid, begin + 1), valid
        prev_end = end
        if end == n_tokens:
            break


def _exp(x: float) -> float:
    """exp(x), inf where a float overflows: a text of few words (CJK has no spaces: one word) or a poor model gives
    a mean loss past 709.78 nats a word, and the other figures of the result are still worth returning."""
    try:
        return math.exp(x)
    except OverflowError:
        return float("inf")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if v < lo:
        raise ValueError(f"{name} must be at least {lo}, got {v}")
    return int(v)


def _encode(tokenizer, text, add_special_tokens):
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    return ids


def _window_logits(model, ids):
    """float32 logits [T, vocab] of one window (a row of token ids) through model.forward."""
    out = model.forward(np.ascontiguousarray(ids, dtype=np.int64)[None, :])
    logits = np.asarray(out["logits"] if isinstance(out, dict) else out.logits)
    if logits.ndim != 3 or logits.shape[0] != 1 or logits.shape[1] != len(ids):
        raise ValueError(f"model.forward returned logits of shape {logits.shape} for {len(ids)} tokens")
    return logits[0]


def _scored_loglik(logits, rows, targets):
    """log p(targets[i]) from the row logits[rows[i]] (float32 logits, float64 arithmetic: _C.target_logprobs, one
    pass over the rows on every core, no float64 copy)."""
    return _C.target_logprobs(np.ascontiguousarray(logits, dtype=np.float32), np.asarray(rows, dtype=np.int64),
                              np.asarray(targets, dtype=np.int64))


def _doc_rolling(model, toks, context, prefix):
    ll, n, windows = 0.0, 0, 0
    for start, end, first in rolling_windows(len(toks), context):
        if start < 0:
            inp = np.concatenate([np.array([prefix], dtype=np.int64), toks[:end - 1]])
            pos0 = -1
        else:
            inp = toks[start:end - 1]
            pos0 = start
        logits = _window_logits(model, inp)
        tgt = np.arange(first, end)
        lp = _scored_loglik(logits, tgt - 1 - pos0, toks[tgt])
        ll += float(lp.sum())
        n += len(tgt)
        windows += 1
    return ll, n, windows, 0.0, 0


def _doc_strided(model, toks, context, stride):
    ll, n, windows, rec_nll, rec_n = 0.0, 0, 0, 0.0, 0
    for begin, end, first, valid in strided_windows(len(toks), context, stride):
        logits = _window_logits(model, toks[begin:end])
        tgt = np.arange(first, end)
        lp = _scored_loglik(logits, tgt - 1 - begin, toks[tgt])
        s = float(lp.sum())
        ll += s
        n += len(tgt)
        windows += 1
        # the guide: loss = mean over the window's shifted targets; nll_sum += loss * (valid labels - batch size 1)
        num_loss = valid - 1
        if len(tgt):
            rec_nll += (-s / len(tgt)) * num_loss
        rec_n += num_loss
    return ll, n, windows, rec_nll, rec_n


def perplexity(model, tokenizer, text, context=None, stride=None, *, add_special_tokens=None, prefix_token_id=None,
               progress=None) -> dict:
    """Perplexities of `text` (a string, or a list of strings scored as separate documents) under `model`.

    context: window length in tokens (>= 2). Default: what lm-evaluation-harness uses (the config's
      max_position_embeddings for the models fastload loads; see default_context).
    stride: None for lm-evaluation-harness's rolling windows; an int in 1..context for transformers'
      strided sliding window (see the module docstring for both).
    add_special_tokens: how the text is tokenised. Default False for rolling windows (what the harness passes for
      causal models up to v0.4.9.1, the prefix token standing in for bos; from v0.4.9.2 it leaves the tokenizer's
      default, the same for tokenizers that add no special tokens, e.g. SmolLM2's, while a bos-adding tokenizer
      then has bos both as prefix and as first scored token: pass True to reproduce that) and True for the
      strided recipe (`tokenizer(text)` there).
    prefix_token_id: the token the first rolling window starts with; default bos, else eos (the harness's
      prefix_token_id).
    progress: None or a callable(done_tokens, total_tokens) called after each window.

    Returns a dict: perplexity, word_perplexity, byte_perplexity, bits_per_byte, loglikelihood (natural log, summed),
    tokens (scored), words, bytes, documents, windows, context, stride, method ("rolling" | "strided"), seconds
    (forward passes and scoring), tokens_per_s, tokenize_seconds; for the strided method also recipe_perplexity.
    """
    docs = [text] if isinstance(text, str) else text
    if not isinstance(docs, (list, tuple)) or not all(isinstance(d, str) for d in docs):
        raise TypeError(f"text must be a string or a list of strings, got {type(text).__name__}")
    if not docs or any(not d for d in docs):
        raise ValueError("text is empty: nothing to score")
    if context is None:
        context = default_context(model, tokenizer)
    context = _check_int("context", context, 2)
    if stride is not None:
        stride = _check_int("stride", stride, 1)
        if stride > context:
            raise ValueError(f"stride ({stride}) must not exceed context ({context})")
    if add_special_tokens is None:
        add_special_tokens = stride is not None
    if stride is None:
        if prefix_token_id is None:
            prefix_token_id = getattr(tokenizer, "bos_token_id", None)
            if prefix_token_id is None:
                prefix_token_id = getattr(tokenizer, "eos_token_id", None)
            if prefix_token_id is None:
                raise ValueError("prefix_token_id: the tokenizer has neither a bos nor an eos token; pass one")
        prefix_token_id = _check_int("prefix_token_id", prefix_token_id, 0)

    t0 = time.perf_counter()
    encoded = [_encode(tokenizer, d, bool(add_special_tokens)) for d in docs]
    t_tok = time.perf_counter() - t0
    for i, toks in enumerate(encoded):
        if len(toks) == 0:
            raise ValueError(f"text{'' if isinstance(text, str) else f'[{i}]'} is empty after tokenisation")
        if stride is not None and len(toks) < 2:
            raise ValueError(f"text{'' if isinstance(text, str) else f'[{i}]'} has one token: the strided "
                             "recipe scores none (its first token has no prediction)")
    total = sum(len(t) for t in encoded)

    t1 = time.perf_counter()
    ll = 0.0
    n_tok = n_win = rec_n = 0
    rec_nll = 0.0
    done = 0
    for toks in encoded:
        if stride is None:
            r = _doc_rolling(model, toks, context, prefix_token_id)
        else:
            r = _doc_strided(model, toks, context, stride)
        ll += r[0]
        n_tok += r[1]
        n_win += r[2]
        rec_nll += r[3]
        rec_n += r[4]
        done += len(toks)
        if progress is not None:
            progress(done, total)
    secs = time.perf_counter() - t1

    words = sum(count_words(d) for d in docs)
    nbytes = sum(count_bytes(d) for d in docs)
    res = {
        "method": "rolling" if stride is None else "strided",
        "perplexity": _exp(-ll / n_tok),
        "word_perplexity": _exp(-ll / words),
        "byte_perplexity": _exp(-ll / nbytes),
        "bits_per_byte": -ll / (nbytes * math.log(2)),
        "loglikelihood": ll,
        "tokens": n_tok,
        "words": words,
        "bytes": nbytes,
        "documents": len(docs),
        "windows": n_win,
        "context": context,
        "stride": stride,
        "seconds": secs,
        "tokens_per_s": n_tok / secs if secs > 0 else float("inf"),
        "tokenize_seconds": t_tok,
    }
    if stride is not None:
        res["recipe_perplexity"] = _exp(rec_nll / rec_n) if rec_n > 0 else float("nan")
    return res
