"""A Hugging Face `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
token ids as metadata. `tokenizer_from_gguf` rebuilds from them the tokenizer that transformers
builds when it loads a GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers 5.x,
`integrations/gguf/gguf_tokenizer_mapping.py`), step by step, except where that differs from llama.cpp,
the format's own runtime, whose ids are the model's (tests/test_gguf_llamacpp.py holds fastload to llama.cpp's ids;
tests/test_gguf_tokenizer.py to transformers' elsewhere): the split regexes of every tokenizer.ggml.pre name
llama.cpp knows, Llama 3's ignore_merges and default BOS, and sentencepiece's dummy prefix (below):

1. the model, by `tokenizer.ggml.model`:
   * "gpt2"  -> byte-level BPE (transformers' GPT2Tokenizer): tokens that use characters outside
     GPT-2's byte alphabet are respelled through it; ByteLevel pre-tokenizer (GPT-2 regex,
     no prefix space) and ByteLevel decoder;
   * "llama" -> SentencePiece-style BPE (transformers' LlamaTokenizer): byte fallback, fuse_unk, spaces as
     "\u2581" and, per tokenizer.ggml.add_space_prefix (default true), one "\u2581" before the text and after each
     special token, from a normalizer (llama.cpp's and sentencepiece's dummy prefix; transformers' Metaspace
     "first" drops a text's own leading space), decoder Replace/ByteFallback/Fuse/Strip (the Strip only with the
     prefix); merges from the file, or rebuilt from the token scores when the file has none;
2. the default special tokens of that transformers class ("<|endoftext|>" for gpt2; "<s>", "</s>",
   "<unk>" for llama) are registered as special added tokens -- appended to the vocabulary if the
   file does not have them (a transformers quirk we reproduce so that ids agree);
3. tokens of type 3 (control) become special added tokens and tokens of type 4 (user-defined) plain
   added tokens, so that neither is ever split (a byte-level "control" token spelled outside the
   byte alphabet is a llama.cpp mislabel and is skipped, as transformers does);
4. `tokenizer.ggml.pre` picks the pre-tokenizer split regexes (llama.cpp's table, below); an unknown name
   keeps GPT-2's with a warning; the Llama 3 family emits a piece that is a token whole (ignore_merges);
5. the file's bos/eos/unk/pad tokens are registered as special tokens, then a TemplateProcessing
   post-processor adds BOS/EOS per `tokenizer.ggml.add_bos_token` / `add_eos_token` (a "llama"
   vocabulary, or one of the Llama 3 family, without the flag gets add_bos_token=True, as llama.cpp does).

Hostile files: the metadata is checked before the tokenizers library sees it (types, array lengths
against tokenizer.ggml.tokens, ids inside the vocabulary, distinct tokens, merges that use only
vocabulary tokens, MAX_VOCAB tokens of at most MAX_TOKEN_BYTES bytes), merges are rebuilt from scores
in O(total characters) plus a sort, capped at MAX_MERGE_CHARS, and every call into the library runs
under `tokenizers_call`, which turns its exceptions and Rust panics (pyo3_runtime.PanicException, a
BaseException) into CheckpointError naming the file; nothing else escapes at load time.

Only `tokenizers` is needed (no transformers at run time). Metadata strings may carry lone
surrogates (fastload._C.GGUFFile decodes with errors="surrogateescape"); tokens are re-decoded with
errors="replace" because the Rust side only takes valid Unicode.
"""
from __future__ import annotations

import warnings
from contextlib import contextmanager

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from ._C import CheckpointError

__all__ = ["tokenizer_from_gguf", "tokenizers_call", "GGUF_PRE_TOKENIZER_SPLITS", "MAX_TOKEN_BYTES", "MAX_VOCAB",
           "MAX_MERGE_CHARS"]

# Limits on what a GGUF vocabulary may ask of us (each named in its error). Real vocabularies have at
# most a few hundred thousand tokens of at most a few hundred bytes, and rebuild a few characters of
# merges per vocabulary character.
MAX_VOCAB = 1 << 24          # tokens (the project-wide vocab_size limit)
MAX_TOKEN_BYTES = 65536      # UTF-8 bytes in one token
MAX_MERGE_CHARS = 1 << 26    # characters in the merges rebuilt from scores (a, aa, aaa, ... would need n^1.5)

# token_type values (llama.cpp's llama_token_type)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_SEED_CODER_SPLIT = (  # Seed-Coder's: Qwen2's, but a run of punctuation keeps no line breaks
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
_DEEPSEEK_LLM_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943]+")
_FINNISH = " ?[^(\\s|.,!?\u2026\u3002\uff0c\u3001\u0964\u06d4\u060c)]+"

# tokenizer.ggml.pre -> the split regexes, applied in turn as llama.cpp does (llama-vocab.cpp llm_tokenizer_bpe:
# each splits the pieces the ones before made, keeping the text between matches as pieces too: tokenizers'
# Split(behavior="isolated") in sequence), then byte-level. llama.cpp's own names; one it does not know is read as
# GPT-2's split with a warning. (transformers' GGUF loader knows fewer and reads the others as GPT-2's silently:
# the demo's "smollm" then splits " 1" as one piece where SmolLM2's own tokenizer.json and llama.cpp split digits.)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe", "chatglm-bpe", "glm4"], (_LLAMA3_SPLIT,)),
    "tekken": (_TEKKEN_SPLIT,),
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez", "stablelm2"], (_QWEN2_SPLIT,)),
    "qwen35": (_QWEN35_SPLIT,),
    "seed-coder": (_SEED_CODER_SPLIT,),
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], (_GPT4O_SPLIT,)),
    **dict.fromkeys(["gpt-2", "gpt2", "mpt", "olmo", "jais", "trillion", "phi-2", "gigachat", "a.x-4.0", "mellum",
                     "exaone4", "granite-docling", "jina-es", "jina-de", "jina-v2-es", "jina-v2-de", "modern-bert"],
                    (_GPT2_SPLIT,)),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva", "minerva-7b"],
                    (r"\p{N}", _GPT2_SPLIT)),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]"),
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
    "deepseek-llm": ("[\r\n]", _DEEPSEEK_LLM_LETTERS, "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
                     r"\s+$", _CJK, r"\p{N}+"),
    **dict.fromkeys(["poro-chat", "bloom", "gpt3-finnish"], (_FINNISH,)),
    "viking": (_FINNISH, r"\p{N}"),
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"),
}
# llama.cpp (llama_vocab::impl::load): these vocabularies emit a pre-tokenized piece that is itself a token whole,
# without merging (ignore_merges, as Llama 3's tokenizer.json says), and add BOS when the file does not say
_LLAMA3_FAMILY = ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken")

# Default special tokens of the transformers class each builder hands the vocabulary to, in the
# order transformers registers them (bos, eos, unk, sep, pad, cls, mask; duplicates once).
_CLASS_DEFAULT_SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "llama": ["<s>", "</s>", "<unk>"],
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1)) + \
        list(range(ord("\xae"), ord("\xff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _is_panic(e: BaseException) -> bool:
    """A Rust panic surfaced by pyo3 (pyo3_runtime.PanicException derives from BaseException)."""
    return any(c.__name__ == "PanicException" and c.__module__ == "pyo3_runtime" for c in type(e).__mro__)


@contextmanager
def tokenizers_call(source: str, what: str, convert: str = "all"):
    """Turn a failure of the `tokenizers` library inside the block (a Rust panic, which is a
    BaseException, or an exception) into CheckpointError naming `source` and `what` was being done.
    `convert`: "all" (any Exception: the block only calls the library with values we checked),
    "bare" (only `Exception` itself, which is what the library raises for a file it cannot use, and
    panics: for blocks that also run other code) or "panics" (encode/decode at run time, where an
    exception means a bad argument). KeyboardInterrupt, SystemExit, MemoryError and our own errors pass
    through unchanged."""
    try:
        yield
    except (CheckpointError, NotImplementedError, MemoryError, RecursionError):
        raise
    except BaseException as e:
        if not (_is_panic(e) or (convert == "all" and isinstance(e, Exception))
                or (convert == "bare" and type(e) is Exception)):
            raise  # KeyboardInterrupt, SystemExit, GeneratorExit; other errors of the block
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if len(msg) > 200:
            msg = msg[:200] + "..."
        kind = "panicked" if _is_panic(e) else f"failed ({type(e).__name__})"
        raise CheckpointError(f"{source}: {what}: the tokenizers library {kind}: {msg}") from None


def _short(s: str) -> str:
    return repr(s if len(s) <= 40 else s[:40] + "...")


def _clean(s: str) -> str:
    """A metadata string as valid Unicode (lone surrogates from undecodable bytes -> U+FFFD)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _longest_proper_prefixes(words: list[str]) -> list[int]:
    """For each of the distinct strings `words`, the index of the longest other word that is a proper
    prefix of it (-1 if none). One sort, then one pass with a stack of the current word's prefixes:
    in sorted order the words starting with w follow w contiguously, so a startswith that fails pops
    a word for good and one that succeeds is charged to the current word -- O(total characters)
    comparisons besides the sort."""
    parent = [-1] * len(words)
    stack: list[int] = []
    for i in sorted(range(len(words)), key=words.__getitem__):
        w = words[i]
        while stack and not w.startswith(words[stack[-1]]):
            stack.pop()
        if stack:
            parent[i] = stack[-1]
        stack.append(i)
    return parent


def _merges_from_scores(tokens: list[str], scores: list[float], source: str = "GGUF metadata") -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best (highest score of the merged token) first; ties by the lengths of the parts, then by the
    ids of the parts -- the order transformers' generate_merges produces.

    transformers tries every split point of every token, slicing both parts (quadratic in a token's
    length). Here the splits are found from the chains "longest proper prefix / suffix that is a
    token" (`_longest_proper_prefixes` on the tokens and on the reversed tokens): a token's chain
    lists exactly the tokens that are its prefixes (suffixes), so the work per token is linear in its
    length, nothing is sliced, and the parts are the vocabulary's own string objects. The whole build
    is O(total characters) plus the sorts. Same merges in the same order as the slicing version
    (tests/test_tokenizer_hardening.py compares them on random vocabularies with tied scores)."""
    vocab = {t: i for i, t in enumerate(tokens)}  # a repeated token keeps its last id (as transformers)
    vocab_scores = dict(zip(tokens, scores))      # ... its first position and its last score
    words = list(vocab_scores)
    wscore = list(vocab_scores.values())
    wid = [vocab[w] for w in words]
    prefix = _longest_proper_prefixes(words)
    suffix = _longest_proper_prefixes([w[::-1] for w in words])
    merges = []  # (score, len(left), len(right), left index, right index)
    total = 0
    for i, w in enumerate(words):
        n = len(w)
        if n < 2 or prefix[i] < 0 or suffix[i] < 0:
            continue
        by_len = {}
        j = prefix[i]
        while j >= 0:
            by_len[len(words[j])] = j
            j = prefix[j]
        local = []
        j = suffix[i]
        while j >= 0:
            a = by_len.get(n - len(words[j]))
            if a is not None:
                local.append((a, j))
            j = suffix[j]
        if not local:
            continue
        total += n * len(local)
        if total > MAX_MERGE_CHARS:
            raise CheckpointError(f"{source}: the BPE merges implied by tokenizer.ggml.scores would hold more than "
                                  f"{MAX_MERGE_CHARS} characters (limit); the vocabulary is degenerate")
        # each split point gives a different left part, so this order is total (as transformers' stable sort)
        local.sort(key=lambda p: (wid[p[0]], wid[p[1]]))
        s = wscore[i]
        merges.extend((s, len(words[a]), len(words[b]), a, b) for a, b in local)
    merges.sort(key=lambda v: (v[0], v[1], v[2]), reverse=True)
    return [(words[a], words[b]) for _, _, _, a, b in merges]


class _Meta:
    """Typed access to the tokenizer.* metadata of one GGUF: every wrong type, length or range is a
    CheckpointError naming the file and the key."""

    def __init__(self, metadata: dict, source: str):
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{source}: GGUF metadata is {type(metadata).__name__}, not a dict")
        self.m, self.source = metadata, source

    def error(self, key: str, what: str) -> CheckpointError:
        return CheckpointError(f"{self.source}: GGUF {key} {what}")

    def string(self, key: str) -> str | None:
        v = self.m.get(key)
        if v is not None and not isinstance(v, str):
            raise self.error(key, f"is {type(v).__name__}, not a string")
        return v

    def flag(self, key: str) -> bool | None:
        v = self.m.get(key)
        if v is None or isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):  # tolerated: a bool written as an integer
            return bool(v)
        raise self.error(key, f"is {type(v).__name__}, not a bool")

    def array(self, key: str, n: int | None = None) -> list | None:
        v = self.m.get(key)
        if v is None:
            return None
        if not isinstance(v, (list, tuple)):
            raise self.error(key, f"is {type(v).__name__}, not an array")
        if len(v) > MAX_VOCAB:
            raise self.error(key, f"has {len(v)} entries; the limit is {MAX_VOCAB}")
        if n is not None and len(v) != n:
            raise self.error(key, f"has {len(v)} entries for {n} tokens (tokenizer.ggml.tokens)")
        return v

    def token_id(self, key: str, n: int) -> int | None:
        v = self.m.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int):
            raise self.error(key, f"is {type(v).__name__}, not an integer token id")
        if not 0 <= v < n:
            raise self.error(key, f"= {v} is outside the vocabulary ({n} tokens)")
        return v


def _tokens(meta: _Meta) -> list[str]:
    raw = meta.array("tokenizer.ggml.tokens")
    if not raw:
        raise meta.error("tokenizer.ggml.tokens", "is empty: a tokenizer needs a vocabulary")
    tokens = []
    for i, t in enumerate(raw):
        if not isinstance(t, str):
            raise meta.error(f"tokenizer.ggml.tokens[{i}]", f"is {type(t).__name__}, not a string")
        t = _clean(t)
        if len(t) > MAX_TOKEN_BYTES // 4 and len(t.encode("utf-8")) > MAX_TOKEN_BYTES:
            raise meta.error(f"tokenizer.ggml.tokens[{i}]", f"is longer than {MAX_TOKEN_BYTES} bytes (limit)")
        tokens.append(t)
    return tokens


def _check_unique(meta: _Meta, tokens: list[str]) -> dict[str, int]:
    """token -> id; a repeated token would leave a hole in the ids that later added tokens fill,
    giving two tokens one id, so it is an error."""
    vocab = {}
    for i, t in enumerate(tokens):
        j = vocab.setdefault(t, i)
        if j != i:
            raise meta.error(f"tokenizer.ggml.tokens[{i}]", f"{_short(t)} repeats tokens[{j}]; "
                             "token strings must be distinct")
    return vocab


def _scores(meta: _Meta, n: int) -> list[float] | None:
    scores = meta.array("tokenizer.ggml.scores", n)
    if scores is None:
        return None
    out = []
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)):
            raise meta.error(f"tokenizer.ggml.scores[{i}]", "is not a number")
        try:
            s = float(s)  # (infinities order fine; NaN would make the merge order arbitrary)
        except OverflowError:
            raise meta.error(f"tokenizer.ggml.scores[{i}]", "is out of range") from None
        if s != s:
            raise meta.error(f"tokenizer.ggml.scores[{i}]", "is NaN")
        out.append(s)
    return out


def _file_merges(meta: _Meta, vocab: dict[str, int]) -> list[tuple[str, str]] | None:
    merges = meta.array("tokenizer.ggml.merges")
    if merges is None:
        return None
    out = []
    for i, m in enumerate(merges):
        if not isinstance(m, str):
            raise meta.error(f"tokenizer.ggml.merges[{i}]", f"is {type(m).__name__}, not a string")
        parts = _clean(m).split(" ", 1)
        if len(parts) != 2:
            raise meta.error(f"tokenizer.ggml.merges[{i}]", f"{_short(m)} is not of the form 'left right'")
        a, b = parts
        if a not in vocab or b not in vocab or a + b not in vocab:
            missing = next(x for x in (a, b, a + b) if x not in vocab)
            raise meta.error(f"tokenizer.ggml.merges[{i}]", f"uses {_short(missing)}, which is not in the vocabulary")
        out.append((a, b))
    return out


def _merges(meta: _Meta, vocab: dict, tokens: list[str], kind: str) -> list:
    """The file's merges, or (when it has none) the merges implied by its token scores; the scores are
    checked either way."""
    merges = _file_merges(meta, vocab)
    scores = _scores(meta, len(tokens))
    if merges is not None:
        return merges
    if scores is None:
        raise meta.error("tokenizer.ggml.merges", f"and tokenizer.ggml.scores are both missing: a {kind} "
                         "vocabulary needs one of them")
    return _merges_from_scores(tokens, scores, meta.source)


def _build_gpt2(tokens: list[str], meta: _Meta, ignore_merges: bool = False) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    _check_unique(meta, tokens)
    # A respelled token may equal another token (a user-defined "  " stored raw next to the BPE's "ĠĠ"):
    # the later id wins, as in transformers, and real files do this, so it is not an error.
    vocab = {(t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
             for i, t in enumerate(tokens)}
    # (as transformers: merges rebuilt from scores come from the tokens as the file spells them)
    merges = _merges(meta, vocab, tokens, "byte-level")
    with tokenizers_call(meta.source, "building the byte-level BPE model from tokenizer.ggml.*"):
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                            end_of_word_suffix="", fuse_unk=False, ignore_merges=ignore_merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    return tok


def _build_llama(tokens: list[str], meta: _Meta, architecture: str | None) -> Tokenizer:
    vocab = _check_unique(meta, tokens)
    merges = _merges(meta, vocab, tokens, "sentencepiece")
    # llama.cpp (llm_tokenizer_spm): spaces become "\u2581", and with tokenizer.ggml.add_space_prefix (default true)
    # one more is put before the text and after each special token, whatever the text starts with (" Hello" reads
    # "\u2581\u2581Hello", as sentencepiece's add_dummy_prefix): a normalizer, which tokenizers runs on each piece
    # between added tokens. (transformers' GGUF loader prepends with Metaspace "first", which drops a text's own
    # leading space: lossy, and other ids than llama.cpp's.) The decoder strips the one prefix space it added.
    prefix = meta.flag("tokenizer.ggml.add_space_prefix")
    prefix = True if prefix is None else bool(prefix)
    with tokenizers_call(meta.source, "building the sentencepiece BPE model from tokenizer.ggml.*"):
        tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
        tok.normalizer = normalizers.Sequence(([normalizers.Prepend(prepend="\u2581")] if prefix else []) +
                                              [normalizers.Replace(pattern=" ", content="\u2581")])
        tok.pre_tokenizer = None
        tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()] +
                                        ([decoders.Strip(content=" ", left=1)] if prefix else []))
    return tok


def _template_piece(token: str, name: str) -> str:
    """A TemplateProcessing piece name for a special token and its special_tokens entry. The string
    form "token:type" cannot name tokens holding ':' or starting with '$' (those read as sequences),
    so such tokens get a placeholder name; the ids and tokens are the same."""
    if ":" in token or token.startswith("$"):
        return f"<fastload-{name}>"
    return token


def tokenizer_from_gguf(metadata: dict, source: str = "GGUF metadata") -> tuple[Tokenizer, dict]:
    """Build the tokenizer a GGUF file describes.

    `metadata` is a GGUF metadata dict (e.g. fastload._C.GGUFFile(path).metadata); `source` (the
    file's path) names it in errors. Returns `(tokenizer, info)`: a `tokenizers.Tokenizer` whose
    encode(..., add_special_tokens=True) adds BOS/EOS as the file asks, and a dict with bos_token,
    eos_token, unk_token, pad_token (str or None), bos_token_id, eos_token_id, unk_token_id,
    pad_token_id (ids in the returned tokenizer, None when absent), add_bos_token, add_eos_token,
    chat_template (str or None), model ("gpt2" / "llama"), pre (tokenizer.ggml.pre or None),
    architecture, and clean_up_tokenization_spaces (always False: transformers skips the clean-up for BPE).

    Raises NotImplementedError for tokenizer models other than gpt2/llama (t5, gemma, ...), and
    CheckpointError (a ValueError) naming `source` and the key for metadata that does not describe a
    consistent tokenizer: wrong types, array lengths that disagree, ids outside the vocabulary,
    repeated tokens, merges using unknown tokens, a token over MAX_TOKEN_BYTES bytes, more than
    MAX_VOCAB tokens, and anything the tokenizers library rejects (its exceptions and panics).
    """
    meta = _Meta(metadata, source)
    model = meta.string("tokenizer.ggml.model")
    if model is None or metadata.get("tokenizer.ggml.tokens") is None:
        raise CheckpointError(f"{source}: GGUF metadata has no tokenizer (tokenizer.ggml.model / "
                              "tokenizer.ggml.tokens missing)")
    architecture = meta.string("general.architecture")
    pre = meta.string("tokenizer.ggml.pre")
    chat_template = meta.string("tokenizer.chat_template")
    if model not in ("gpt2", "llama"):
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")
    if model == "llama" and architecture in ("gemma", "gemma2", "gemma3"):
        raise NotImplementedError(f"GGUF tokenizer of architecture {architecture!r} (Gemma sentencepiece) "
                                  "is not supported yet")
    tokens = _tokens(meta)
    n = len(tokens)
    token_types = meta.array("tokenizer.ggml.token_type", n) or []
    for i, ty in enumerate(token_types):
        if isinstance(ty, bool) or not isinstance(ty, int):
            raise meta.error(f"tokenizer.ggml.token_type[{i}]", f"is {type(ty).__name__}, not an integer")
    specials = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        tid = meta.token_id(f"tokenizer.ggml.{key}", n)
        specials[name] = (tokens[tid] if tid is not None else None, tid)
    add_bos = meta.flag("tokenizer.ggml.add_bos_token")
    add_eos = meta.flag("tokenizer.ggml.add_eos_token")

    tok = _build_gpt2(tokens, meta, ignore_merges=pre in _LLAMA3_FAMILY) if model == "gpt2" else \
        _build_llama(tokens, meta, architecture)

    with tokenizers_call(source, "registering the special and added tokens of tokenizer.ggml.*"):
        # 2. the transformers class's own default special tokens
        tok.add_tokens([AddedToken(t, special=True) for t in _CLASS_DEFAULT_SPECIALS[model]])

        # 3. control tokens -> special; user-defined -> added (not special)
        byte_alphabet = set(_bytes_to_unicode().values()) if model == "gpt2" else None
        control = [AddedToken(t, normalized=False, special=True)
                   for t, ty in zip(tokens, token_types)
                   if ty == TOKEN_CONTROL and (byte_alphabet is None or set(t) <= byte_alphabet)]
        if control:
            tok.add_special_tokens(control)
        vocab_now = tok.get_vocab(with_added_tokens=True)
        user_defined = [AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(tokens, token_types) if ty == TOKEN_USER_DEFINED and t in vocab_now]
        if user_defined:
            tok.add_tokens(user_defined)

    # 4. split regexes by tokenizer.ggml.pre
    splits = GGUF_PRE_TOKENIZER_SPLITS.get(pre) if model == "gpt2" else None
    if model == "gpt2" and splits is None:
        warnings.warn(f"{source}: tokenizer.ggml.pre = {pre!r} is not a pre-tokenizer fastload knows; GPT-2's split "
                      "is used, which can split some text otherwise than llama.cpp", stacklevel=3)
        splits = (_GPT2_SPLIT,)
    if splits is not None:
        with tokenizers_call(source, f"setting up the pre-tokenizer of tokenizer.ggml.pre = {pre!r}"):
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in splits] +
                [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])

    # 5. the file's special tokens, then BOS/EOS insertion
    with tokenizers_call(source, "setting up BOS/EOS insertion (tokenizer.ggml.bos_token_id / eos_token_id)"):
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        to_add = []
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            s = specials[name][0]
            if s is not None and s not in added and s not in to_add:
                to_add.append(s)
        if to_add:
            tok.add_tokens([AddedToken(s, special=True) for s in to_add])

        if add_bos is None and (model == "llama" or pre in _LLAMA3_FAMILY):
            add_bos = True  # llama.cpp's default for these vocabularies when the file does not say
        add_bos, add_eos = bool(add_bos), bool(add_eos)
        bos, eos = specials["bos_token"][0], specials["eos_token"][0]
        if bos is None:
            add_bos = False
        if eos is None:
            add_eos = False
        ids = {name: (tok.token_to_id(s) if s is not None else None) for name, (s, _) in specials.items()}
        for name in ("bos_token", "eos_token"):
            if (add_bos if name == "bos_token" else add_eos) and ids[name] is None:
                raise CheckpointError(f"{source}: GGUF tokenizer.ggml.{name}_id names {_short(specials[name][0])}, "
                                      "which the tokenizer cannot map back to an id")
        bos_piece, eos_piece = (_template_piece(bos, "bos") if bos is not None else None,
                                _template_piece(eos, "eos") if eos is not None else None)
        if bos == eos:
            eos_piece = bos_piece
        single = ([f"{bos_piece}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos_piece}:0"] if add_eos else [])
        pair = single + ([f"{bos_piece}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos_piece}:1"] if add_eos else [])
        special_ids = []
        if add_bos:
            special_ids.append({"id": bos_piece, "ids": [ids["bos_token"]], "tokens": [bos]}
                               if bos_piece != bos else (bos, ids["bos_token"]))
        if add_eos and eos_piece != (bos_piece if add_bos else None):
            special_ids.append({"id": eos_piece, "ids": [ids["eos_token"]], "tokens": [eos]}
                               if eos_piece != eos else (eos, ids["eos_token"]))
        tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

    info = {
        "bos_token": specials["bos_token"][0], "eos_token": specials["eos_token"][0],
        "unk_token": specials["unk_token"][0], "pad_token": specials["pad_token"][0],
        "bos_token_id": ids["bos_token"], "eos_token_id": ids["eos_token"],
        "unk_token_id": ids["unk_token"], "pad_token_id": ids["pad_token"],
        "add_bos_token": add_bos, "add_eos_token": add_eos,
        "chat_template": _clean(chat_template) if chat_template is not None else None,
        "model": model, "pre": pre, "architecture": architecture,
        "clean_up_tokenization_spaces": False,
    }
    return tok, info
