"""A Hugging Face `tokenizers` tokenizer rebuilt from a GGUF file's `tokenizer.ggml.*` metadata.

A GGUF carries no tokenizer.json: llama.cpp stores the vocabulary, merges, token types and special
token ids as metadata. `tokenizer_from_gguf` rebuilds from them the same tokenizer that transformers
builds when it loads a GGUF (`AutoTokenizer.from_pretrained(dir, gguf_file=...)`, transformers 5.x,
`integrations/gguf/gguf_tokenizer_mapping.py`), step by step, so that ids and decodes agree exactly:

1. the model, by `tokenizer.ggml.model`:
   * "gpt2"  -> byte-level BPE (transformers' GPT2Tokenizer): tokens that use characters outside
     GPT-2's byte alphabet are respelled through it; ByteLevel pre-tokenizer (GPT-2 regex,
     no prefix space) and ByteLevel decoder;
   * "llama" -> SentencePiece-style BPE (transformers' LlamaTokenizer): byte fallback, fuse_unk,
     Metaspace("\u2581", prepend_scheme="first", split=False), decoder Replace/ByteFallback/Fuse/Strip;
     merges from the file, or rebuilt from the token scores when the file has none;
     for architecture "phi3" the prefix "\u2581" comes from a normalizer instead (as transformers does);
2. the default special tokens of that transformers class ("<|endoftext|>" for gpt2; "<s>", "</s>",
   "<unk>" for llama) are registered as special added tokens -- appended to the vocabulary if the
   file does not have them (a transformers quirk we reproduce so that ids agree);
3. tokens of type 3 (control) become special added tokens and tokens of type 4 (user-defined) plain
   added tokens, so that neither is ever split (a byte-level "control" token spelled outside the
   byte alphabet is a llama.cpp mislabel and is skipped, as transformers does);
4. `tokenizer.ggml.pre` picks the pre-tokenizer split regex (llama3, qwen2, ... table below);
   unknown names (e.g. "smollm", "default") keep GPT-2's;
5. the file's bos/eos/unk/pad tokens are registered as special tokens, then a TemplateProcessing
   post-processor adds BOS/EOS per `tokenizer.ggml.add_bos_token` / `add_eos_token` (a "llama"
   vocabulary without the flag gets add_bos_token=True, as llama.cpp and transformers do).

Only `tokenizers` is needed (no transformers at run time). Metadata strings may carry lone
surrogates (fastload._C.GGUFFile decodes with errors="surrogateescape"); tokens are re-decoded with
errors="replace" because the Rust side only takes valid Unicode.
"""
from __future__ import annotations

from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

__all__ = ["tokenizer_from_gguf", "GGUF_PRE_TOKENIZER_SPLITS"]

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

# tokenizer.ggml.pre -> split regex (the names transformers 5.x knows; others keep GPT-2's regex)
GGUF_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

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


def _clean(s: Any) -> str:
    """A metadata string as valid Unicode (lone surrogates from undecodable bytes -> U+FFFD)."""
    s = str(s)
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two tokens,
    best (highest score of the merged token) first; ties by the lengths of the parts, then by the
    ids of the parts -- the order transformers' generate_merges produces."""
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_scores = dict(zip(tokens, scores))
    merges = []
    for merge, score in vocab_scores.items():
        local = []
        for k in range(1, len(merge)):
            left, right = merge[:k], merge[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


def _file_merges(metadata: dict) -> list[tuple[str, str]] | None:
    merges = metadata.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    out = []
    for m in merges:
        parts = _clean(m).split(" ", 1)
        if len(parts) != 2:
            raise ValueError(f"GGUF tokenizer.ggml.merges entry {m!r} is not of the form 'left right'")
        out.append((parts[0], parts[1]))
    return out


def _build_gpt2(tokens: list[str], metadata: dict) -> Tokenizer:
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        (t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8"))): i
        for i, t in enumerate(tokens)
    }
    merges = _file_merges(metadata)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("GGUF byte-level vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
        merges = _merges_from_scores(tokens, [float(s) for s in scores])
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _build_llama(tokens: list[str], metadata: dict, architecture: str | None) -> Tokenizer:
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = _file_merges(metadata)
    if merges is None:
        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("GGUF sentencepiece vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
        if len(scores) != len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        merges = _merges_from_scores(tokens, [float(s) for s in scores])
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    tok.normalizer = None
    # transformers' LlamaTokenizer: add_prefix_space=True, legacy=False -> prepend "first"
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(content=" ", left=1)])
    if architecture == "phi3":
        # Phi-3: the prefix comes from a normalizer, not Metaspace (differs on text starting with a space)
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(prepend="\u2581"),
                                               normalizers.Replace(pattern=" ", content="\u2581")])
        tok.pre_tokenizer = None
    return tok


def _special_token(metadata: dict, tokens: list[str], key: str) -> tuple[str | None, int | None]:
    tid = metadata.get(f"tokenizer.ggml.{key}")
    if tid is None:
        return None, None
    tid = int(tid)
    if not 0 <= tid < len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.{key} = {tid} is outside the vocabulary ({len(tokens)} tokens)")
    return tokens[tid], tid


def tokenizer_from_gguf(metadata: dict) -> tuple[Tokenizer, dict]:
    """Build the tokenizer a GGUF file describes.

    `metadata` is a GGUF metadata dict (e.g. fastload._C.GGUFFile(path).metadata). Returns
    `(tokenizer, info)`: a `tokenizers.Tokenizer` whose encode(..., add_special_tokens=True)
    adds BOS/EOS as the file asks, and a dict with bos_token, eos_token, unk_token, pad_token
    (str or None), bos_token_id, eos_token_id, unk_token_id, pad_token_id (ids in the returned
    tokenizer, None when absent), add_bos_token, add_eos_token, chat_template (str or None),
    model ("gpt2" / "llama"), pre (tokenizer.ggml.pre or None), architecture, and
    clean_up_tokenization_spaces (always False: transformers skips the clean-up for BPE).

    Raises NotImplementedError for tokenizer models other than gpt2/llama (t5, gemma, ...), and
    ValueError for metadata that does not describe a tokenizer.
    """
    model = metadata.get("tokenizer.ggml.model")
    raw_tokens = metadata.get("tokenizer.ggml.tokens")
    if model is None or raw_tokens is None:
        raise ValueError("GGUF metadata has no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens missing)")
    model = str(model)
    architecture = metadata.get("general.architecture")
    tokens = [_clean(t) for t in raw_tokens]
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [])

    if model == "gpt2":
        tok = _build_gpt2(tokens, metadata)
    elif model == "llama":
        if architecture in ("gemma", "gemma2", "gemma3"):
            raise NotImplementedError(f"GGUF tokenizer of architecture {architecture!r} (Gemma sentencepiece) "
                                      "is not supported yet")
        tok = _build_llama(tokens, metadata, architecture)
    else:
        raise NotImplementedError(f"GGUF tokenizer model {model!r} is not supported (supported: 'gpt2', 'llama')")

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

    # 4. split regex by tokenizer.ggml.pre
    pre = metadata.get("tokenizer.ggml.pre")
    split = GGUF_PRE_TOKENIZER_SPLITS.get(pre)
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])

    # 5. the file's special tokens, then BOS/EOS insertion
    specials = {name: _special_token(metadata, tokens, key) for name, key in (
        ("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id"))}
    added = {t.content for t in tok.get_added_tokens_decoder().values()}
    to_add = []
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        s = specials[name][0]
        if s is not None and s not in added and s not in to_add:
            to_add.append(s)
    if to_add:
        tok.add_tokens([AddedToken(s, special=True) for s in to_add])

    add_bos = metadata.get("tokenizer.ggml.add_bos_token")
    if add_bos is None and model == "llama":
        add_bos = True
    add_bos = bool(add_bos)
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
    bos, eos = specials["bos_token"][0], specials["eos_token"][0]
    if bos is None:
        add_bos = False
    if eos is None:
        add_eos = False
    ids = {name: (tok.token_to_id(s) if s is not None else None) for name, (s, _) in specials.items()}
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    pair = single + ([f"{bos}:1"] if add_bos else []) + ["$B:1"] + ([f"{eos}:1"] if add_eos else [])
    special_ids = []
    if add_bos:
        special_ids.append((bos, ids["bos_token"]))
    if add_eos and eos != (bos if add_bos else None):
        special_ids.append((eos, ids["eos_token"]))
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_ids)

    chat_template = metadata.get("tokenizer.chat_template")
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
