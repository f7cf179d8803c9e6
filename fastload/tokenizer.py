"""AutoTokenizer: transformers' tokenizer API over a Hugging Face `tokenizers` tokenizer, read from
tokenizer.json (+ tokenizer_config.json) or rebuilt from GGUF metadata (fastload/gguf_tokenizer.py).

Decision: padding_side defaults to "left" (tokenizer_config.json's value wins when present, and the
`padding_side` argument wins over both): fastload is a generation library, and batched generation
with decoder-only models needs left padding (transformers warns when it is not)."""
from __future__ import annotations

import functools
import json
import os
from datetime import datetime

import numpy as np

from . import _files
from ._util import AttrDict, is_torch
from .hub import resolve
from ._C import CheckpointError  # (after .hub: the import block of the containment branch stays apart)


class BatchEncoding(AttrDict):
    """dict of input_ids / attention_mask with attribute access; .to() is a no-op for compatibility."""

    def to(self, *args, **kwargs):
        return self


def tokenizers_call(source, what, convert="all"):
    """fastload.gguf_tokenizer.tokenizers_call, imported when first used (it imports tokenizers)."""
    from .gguf_tokenizer import tokenizers_call as call
    return call(source, what, convert)


def _library_errors_to_checkpoint_error(from_pretrained):
    """Wraps FastTokenizer.from_pretrained (a classmethod): what the tokenizers library raises on a
    tokenizer.json it cannot use (a bare Exception for malformed JSON or structure, a Rust panic, a
    BaseException, for some inconsistent vocabularies) becomes CheckpointError naming the file; then the
    tokenizer must encode and decode a short probe text (some inconsistencies only surface there)."""
    func = from_pretrained.__func__

    @functools.wraps(func)
    def wrapper(cls, pretrained_model_name_or_path, *args, **kwargs):
        name = str(pretrained_model_name_or_path)
        source = name if name.endswith(".gguf") else os.path.join(name, "tokenizer.json")
        with tokenizers_call(source, "reading the tokenizer", convert="bare"):
            tok = func(cls, pretrained_model_name_or_path, *args, **kwargs)
        with tokenizers_call(source, "encoding and decoding a probe text with the tokenizer"):
            tok._tk.decode(tok._tk.encode("Hello, world! 123", add_special_tokens=True).ids, skip_special_tokens=False)
        return tok

    return classmethod(wrapper)


def _tok_str(v, key, source):
    """A special token of tokenizer_config.json / special_tokens_map.json: a string, or an AddedToken
    dict whose "content" is one (transformers writes both), or null."""
    if isinstance(v, dict):
        v = v.get("content")
    if v is not None and not isinstance(v, str):
        raise CheckpointError(f"{source}: {key} is {type(v).__name__}, not a token string (or a dict with a "
                              "string \"content\")")
    if v is not None:
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate (JSON allows the escape): no token can hold it
            raise CheckpointError(f"{source}: {key} {v!r} is not valid Unicode text (a lone surrogate)") from None
    return v


def _template_source(path):
    """The file a chat template came from (for errors)."""
    if not os.path.isfile(os.path.join(str(path), "chat_template.jinja")) and \
            os.path.isfile(os.path.join(str(path), "chat_template.json")):
        return os.path.join(str(path), "chat_template.json")
    return os.path.join(str(path), "tokenizer_config.json")


def _named_templates(tmpl, path):
    """transformers' list of named chat templates ({"name", "template"}) as a dict, in the file's order."""
    for i, t in enumerate(tmpl):
        if not (isinstance(t, dict) and isinstance(t.get("template"), str) and isinstance(t.get("name", ""), str)):
            raise CheckpointError(f"{_template_source(path)}: chat_template[{i}] is not a "
                                  "{\"name\": str, \"template\": str} entry")
    return {t.get("name", ""): t["template"] for t in tmpl}


def _extra_special_tokens(conf, path):
    """tokenizer_config.json's extra_special_tokens (transformers 5) or additional_special_tokens (earlier), as token
    strings (AddedToken dicts give their content)."""
    source = os.path.join(str(path), "tokenizer_config.json")
    v = conf.get("extra_special_tokens", conf.get("additional_special_tokens"))
    if v is None:
        return []
    if isinstance(v, dict):  # transformers 5's named extra tokens {"image_token": "<image>", ...}
        v = list(v.values())
    if not isinstance(v, list):
        raise CheckpointError(f"{source}: extra_special_tokens must be a list of tokens")
    return [_tok_str(t, "extra_special_tokens", source) for t in v]


def _checked_config(conf, tmpl, path):
    """The values from_pretrained takes from tokenizer_config.json (+ special_tokens_map.json,
    chat_template.jinja/.json), type-checked: a wrong type is a CheckpointError naming the file and key.
    Tolerated: model_max_length beyond 2^63 or non-finite (transformers writes 1e30 for "no limit") means
    no limit; AddedToken dicts for special tokens."""
    source = os.path.join(str(path), "tokenizer_config.json")  # (or special_tokens_map.json, merged into it)
    if not isinstance(conf, dict):
        raise CheckpointError(f"{source}: not a JSON object")
    out = {k: _tok_str(conf.get(k), k, source) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    if tmpl is not None and not isinstance(tmpl, str):
        raise CheckpointError(f"{_template_source(path)}: chat_template is {type(tmpl).__name__}, not a string or "
                              "a list of named templates")
    out["chat_template"] = tmpl
    side = conf.get("padding_side")
    if side not in (None, "left", "right"):
        raise CheckpointError(f"{source}: padding_side must be \"left\" or \"right\"")
    out["padding_side"] = side
    mml = conf.get("model_max_length")
    if mml is not None:
        if isinstance(mml, bool) or not isinstance(mml, (int, float)) or mml != mml or mml < 0:
            raise CheckpointError(f"{source}: model_max_length must be a non-negative number")
        mml = int(mml) if mml < 2 ** 63 else None  # None: no limit
    out["model_max_length"] = mml
    clean = conf.get("clean_up_tokenization_spaces", False)
    if not isinstance(clean, bool) and clean is not None:
        raise CheckpointError(f"{source}: clean_up_tokenization_spaces is {type(clean).__name__}, not a bool")
    out["clean_up_tokenization_spaces"] = bool(clean)
    for k in ("add_bos_token", "add_eos_token"):
        if conf.get(k) is not None and not isinstance(conf.get(k), bool):
            raise CheckpointError(f"{source}: {k} is {type(conf.get(k)).__name__}, not a bool")
        out[k] = conf.get(k)
    side = conf.get("truncation_side")
    if side not in (None, "left", "right"):
        raise CheckpointError(f"{source}: truncation_side must be \"left\" or \"right\"")
    out["truncation_side"] = side
    return out


_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")
LARGE_INTEGER = int(1e20)  # transformers: a model_max_length above this means "no limit"
# keyword arguments of transformers' encode()/__call__ accepted when they ask for nothing fastload lacks
_NEUTRAL_KWARGS = {
    "verbose": lambda v: v is None or isinstance(v, bool),
    "return_token_type_ids": lambda v: not v,
    "return_overflowing_tokens": lambda v: not v,
    "return_special_tokens_mask": lambda v: not v,
    "return_offsets_mapping": lambda v: not v,
    "return_length": lambda v: not v,
    "is_split_into_words": lambda v: not v,
    "split_special_tokens": lambda v: not v,
    "stride": lambda v: not v,
    "text_pair": lambda v: v is None,
    "return_attention_mask": lambda v: True,
}

_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class FastTokenizer:
    def __init__(self, tokenizer, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 chat_template=None, padding_side="left", model_max_length=None, name_or_path="",
                 clean_up_tokenization_spaces=False, add_bos_token=None, add_eos_token=None, truncation_side="right"):
        self._tk = tokenizer
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length or int(1e30)
        self.name_or_path = name_or_path
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        object.__setattr__(self, "_add_bos", add_bos_token)
        object.__setattr__(self, "_add_eos", add_eos_token)
        self.truncation_side = truncation_side
        self.chat_templates = None  # named chat templates (tokenizer_config.json's list), "default" among them
        self.extra_special_tokens = []
        try:  # transformers 5 never applies its text clean-up to BPE models (it corrupts code and such text)
            self._bpe = type(tokenizer.model).__name__ == "BPE"
        except Exception:  # noqa: BLE001 - a tokenizer without a readable model: not BPE for this purpose
            self._bpe = False

    # ---------------------------------------------------------------- construction
    @_library_errors_to_checkpoint_error
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, gguf_file=None, padding_side=None, revision=None,
                        cache_dir=None, local_files_only=False, allow_external_symlinks=None, subfolder="", **kwargs):
        from tokenizers import Tokenizer
        path = resolve(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only)
        if subfolder:  # as the model's from_pretrained: the tokenizer files of path/subfolder, never the root's
            _files.check_name(path, subfolder, "subfolder", subdirs=True)
            path = os.path.join(path, subfolder)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path}: no such subfolder (subfolder={subfolder!r})")
        # every file goes through fastload/_files.py: plain names, inside the directory, regular files
        ext = _files.external_symlinks_allowed(allow_external_symlinks)
        gguf_real = None
        if os.path.isdir(path) and gguf_file:
            gguf_real = _files.checkpoint_file(path, gguf_file, "gguf_file argument", allow_external=ext, subdirs=True)
            path = os.path.join(path, gguf_file)
        if os.path.isdir(path) and not os.path.lexists(os.path.join(path, "tokenizer.json")):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_real = _files.checkpoint_file(path, ggufs[0], "GGUF file", allow_external=ext)
                path = os.path.join(path, ggufs[0])
        if not os.path.isdir(path) and path.endswith(".gguf"):
            from . import _C
            from .gguf_tokenizer import tokenizer_from_gguf
            g = _C.GGUFFile(gguf_real or _files.given_file(path))
            try:
                tk, info = tokenizer_from_gguf(g.metadata, str(path))
            finally:
                g.close()
            return cls(tk, bos_token=info.get("bos_token"), eos_token=info.get("eos_token"),
                       unk_token=info.get("unk_token"), pad_token=info.get("pad_token"),
                       chat_template=info.get("chat_template"), padding_side=padding_side or "left",
                       name_or_path=str(pretrained_model_name_or_path),
                       clean_up_tokenization_spaces=bool(info.get("clean_up_tokenization_spaces", False)),
                       add_bos_token=info.get("add_bos_token"), add_eos_token=info.get("add_eos_token"))
        tj = os.path.join(path, "tokenizer.json")
        tj_real = _files.find_file(path, "tokenizer.json", allow_external=ext) if os.path.isdir(path) else None
        if tj_real is None and os.path.isdir(path):
            from .chatglm_tokenizer import ChatGLMTokenizer, is_chatglm_dir
            if is_chatglm_dir(path, ext):  # THUDM's ChatGLM2 / ChatGLM3: tokenizer.model, rebuilt (no remote code)
                return ChatGLMTokenizer.from_dir(path, pretrained_model_name_or_path,
                                                 chatglm_version=kwargs.get("chatglm_version"),
                                                 padding_side=padding_side,
                                                 encode_special_tokens=kwargs.get("encode_special_tokens"),
                                                 allow_external=ext)
        if tj_real is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json (and no .gguf file) to build a tokenizer from")
        tk = Tokenizer.from_str(_files.read_text(tj_real, tj, _files.TOKENIZER_LIMIT))  # the Rust side opens no path
        conf = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = _files.find_file(path, name, allow_external=ext)
            if p is not None:
                conf.update(_files.read_json(p, os.path.join(path, name)))
        tmpl = conf.get("chat_template")
        jp = _files.find_file(path, "chat_template.jinja", allow_external=ext)
        cj = _files.find_file(path, "chat_template.json", allow_external=ext) if jp is None else None
        if jp is not None:
            tmpl = _files.read_text(jp, os.path.join(path, "chat_template.jinja"))
        elif cj is not None:
            tmpl = _files.read_json(cj, os.path.join(path, "chat_template.json")).get("chat_template", tmpl)
        named = None
        if isinstance(tmpl, list):  # named templates: "default" is the chat_template, the others chosen by name
            named = _named_templates(tmpl, path)
            tmpl = named.get("default", next(iter(named.values()), None))
        extra = _extra_special_tokens(conf, path)
        conf = _checked_config(conf, tmpl, path)
        # tokenizer.json's own padding / truncation sections (written when they were on at save time) would apply to
        # every call; transformers resets them per call and takes their pad token and sides as defaults only
        pad_cfg, trunc_cfg = tk.padding, tk.truncation
        tk.no_padding()
        tk.no_truncation()
        if pad_cfg and conf["pad_token"] is None and pad_cfg.get("pad_token"):
            conf["pad_token"] = pad_cfg["pad_token"]
        if pad_cfg and padding_side is None and conf["padding_side"] is None:
            padding_side = pad_cfg.get("direction")
        if trunc_cfg and conf["truncation_side"] is None:
            conf["truncation_side"] = trunc_cfg.get("direction")
        # named special tokens (and additional / extra ones) that tokenizer.json does not hold as added tokens: added
        # as special tokens, as transformers 5 does (else a pad token has no id and a named token splits in text)
        have = {t.content for t in tk.get_added_tokens_decoder().values()}
        want = [t for t in [conf[k] for k in _SPECIAL_TOKENS] + extra if t is not None and t not in have]
        if want:
            from tokenizers import AddedToken
            tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(want)])
        out = cls(tk, bos_token=conf["bos_token"], eos_token=conf["eos_token"],
                   unk_token=conf["unk_token"], pad_token=conf["pad_token"],
                   chat_template=conf["chat_template"], padding_side=padding_side or conf["padding_side"] or "left",
                   model_max_length=conf["model_max_length"], name_or_path=str(pretrained_model_name_or_path),
                   clean_up_tokenization_spaces=conf["clean_up_tokenization_spaces"],
                   add_bos_token=conf["add_bos_token"], add_eos_token=conf["add_eos_token"],
                   truncation_side=conf["truncation_side"] or "right")
        out.chat_templates = named
        out.extra_special_tokens = extra
        return out

    # ---------------------------------------------------------------- vocabulary
    def _id(self, tok):
        return None if tok is None else self._tk.token_to_id(tok)

    # bos/eos/unk/pad: the token strings are the state; the *_token_id properties read them through the
    # vocabulary and their setters set the token of that id (None clears it), as transformers does.
    def __setattr__(self, key, value):
        if key in _SPECIAL_TOKENS and value is not None and not isinstance(value, str):
            if isinstance(getattr(value, "content", None), str):  # a tokenizers / transformers AddedToken
                value = value.content
            else:
                raise ValueError(f"{key} must be a token string (or None), got {type(value).__name__}; "
                                 f"set {key}_id to give a token id")
        object.__setattr__(self, key, value)

    def _set_id(self, name, value):
        if value is None:
            setattr(self, name, None)
            return
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name}_id must be an int token id or None, got {type(value).__name__}")
        tok = self._tk.id_to_token(int(value)) if 0 <= int(value) < 2 ** 32 else None
        if tok is None:
            raise ValueError(f"{name}_id={int(value)} is not a token id of this tokenizer (ids 0..{len(self) - 1})")
        setattr(self, name, tok)

    bos_token_id = property(lambda self: self._id(self.bos_token), lambda self, v: self._set_id("bos_token", v))
    eos_token_id = property(lambda self: self._id(self.eos_token), lambda self, v: self._set_id("eos_token", v))
    unk_token_id = property(lambda self: self._id(self.unk_token), lambda self, v: self._set_id("unk_token", v))
    pad_token_id = property(lambda self: self._id(self.pad_token), lambda self, v: self._set_id("pad_token", v))

    def _adds(self):
        """(bos, eos): whether encoding with special tokens adds them now (the post-processor's doing)."""
        for text in ("a", ""):  # the special tokens around a text's own ids (bos and eos may be the same token)
            try:
                body = self._tk.encode(text, add_special_tokens=False).ids
                ids = self._tk.encode(text, add_special_tokens=True).ids
            except Exception:  # noqa: BLE001 - a vocabulary without "a" and no unk token: the empty text
                continue
            i = next((i for i in range(len(ids) - len(body) + 1) if ids[i:i + len(body)] == body), 0)
            pre, post = ids[:i], ids[i + len(body):]
            return (self.bos_token_id is not None and self.bos_token_id in pre,
                    self.eos_token_id is not None and self.eos_token_id in post)
        return False, False

    def _set_adds(self, bos=None, eos=None):
        """transformers' update_post_processor: a TemplateProcessing that adds bos and / or eos around each
        sequence. The flag not being set keeps what the tokenizer does now."""
        from tokenizers import processors
        cur = self._adds()
        bos = cur[0] if bos is None else bool(bos)
        eos = cur[1] if eos is None else bool(eos)
        for flag, name in ((bos, "bos_token"), (eos, "eos_token")):
            if flag and (getattr(self, name) is None or self._id(getattr(self, name)) is None):
                raise ValueError(f"add_{name} = True needs a {name} in the vocabulary, got {getattr(self, name)!r}")
        b, e = self.bos_token, self.eos_token
        single = f"{b + ':0 ' if bos else ''}$A:0{' ' + e + ':0' if eos else ''}"
        pair = f"{single}{' ' + b + ':1' if bos else ''} $B:1{' ' + e + ':1' if eos else ''}"
        special = [(t, self._id(t)) for t, on in ((b, bos), (e, eos)) if on]
        self._tk.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                special_tokens=list(dict.fromkeys(special)))

    def _flag(name):
        def get(self):
            v = getattr(self, "_" + name)
            return v if v is not None else self._adds()[0 if name == "add_bos" else 1]

        def put(self, v):
            if name == "add_bos":
                self._set_adds(bos=v)
            else:
                self._set_adds(eos=v)
            object.__setattr__(self, "_" + name, bool(v))
        return property(get, put, doc=f"transformers' {name}_token: whether encoding adds it; setting it rebuilds "
                                      "the post-processor (transformers' update_post_processor)")
    add_bos_token = _flag("add_bos")
    add_eos_token = _flag("add_eos")
    del _flag

    def add_tokens(self, new_tokens, special_tokens=False) -> int:
        """transformers' add_tokens: strings (or tokenizers AddedTokens) added to the vocabulary, returning how many
        were new. A model's embeddings do not grow here (fastload has no resize_token_embeddings): a new id is for
        padding, which the attention mask hides, or for text the model never reads."""
        from tokenizers import AddedToken
        if isinstance(new_tokens, (str, AddedToken)):
            new_tokens = [new_tokens]
        toks = []
        for t in new_tokens:
            if isinstance(t, str):
                t = AddedToken(t, special=bool(special_tokens), normalized=not special_tokens)
            elif not isinstance(t, AddedToken):
                raise TypeError(f"add_tokens takes strings or AddedTokens, got {type(t).__name__}")
            toks.append(t)
        before = len(self)
        with self._guard("adding tokens"):
            if special_tokens:
                self._tk.add_special_tokens(toks)
            else:
                self._tk.add_tokens(toks)
        return len(self) - before

    def add_special_tokens(self, special_tokens_dict, replace_extra_special_tokens=True) -> int:
        """transformers' add_special_tokens({"pad_token": "[PAD]", "additional_special_tokens": [...]}): the tokens
        added as special tokens (new ones get ids past the vocabulary) and the named ones set; returns how many
        were new. The usual use here: a pad token for batching (`tok.pad_token = tok.eos_token` does the same
        without a new id)."""
        if not isinstance(special_tokens_dict, dict):
            raise TypeError("add_special_tokens takes a dict such as {'pad_token': '[PAD]'}")
        n = 0
        for k, v in special_tokens_dict.items():
            if k in _SPECIAL_TOKENS:
                v = getattr(v, "content", v)
                if not isinstance(v, str):
                    raise TypeError(f"add_special_tokens: {k} must be a token string, got {type(v).__name__}")
                n += self.add_tokens([v], special_tokens=True)
                setattr(self, k, v)
            elif k in ("additional_special_tokens", "extra_special_tokens"):
                vals = [getattr(t, "content", t) for t in (v or [])]
                n += self.add_tokens(vals, special_tokens=True)
                self.extra_special_tokens = (list(vals) if replace_extra_special_tokens
                                             else list(dict.fromkeys(self.extra_special_tokens + vals)))
            else:
                raise ValueError(f"add_special_tokens: {k!r} is not a special token fastload keeps (bos_token, "
                                 "eos_token, unk_token, pad_token, additional_special_tokens)")
        return n

    @property
    def special_tokens_map(self) -> dict:
        """The named special tokens that are set (bos/eos/unk/pad), as transformers' special_tokens_map."""
        return {k: getattr(self, k) for k in _SPECIAL_TOKENS if getattr(self, k) is not None}

    @property
    def vocab_size(self):
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self):
        return self._tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self):
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self):
        """The named special tokens (bos, eos, unk, pad) and the extra / additional ones, as transformers 5 lists
        them (not every special added token of tokenizer.json: decode(skip_special_tokens=True) skips those)."""
        return list(dict.fromkeys(t for t in [getattr(self, k) for k in _SPECIAL_TOKENS] + self.extra_special_tokens
                                  if t is not None))

    @property
    def all_special_ids(self):
        return [i for i in (self._id(t) for t in self.all_special_tokens) if i is not None]

    def convert_tokens_to_ids(self, tokens):
        if isinstance(tokens, str):
            i = self._tk.token_to_id(tokens)
            return self.unk_token_id if i is None else i
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, (int, np.integer)):
            return self._tk.id_to_token(int(ids))
        special = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tk.id_to_token(int(i)) for i in ids if int(i) not in special]

    # ---------------------------------------------------------------- encode / decode
    # A tokenizer file can be consistent enough to load and still make the Rust library panic on some
    # input (e.g. a Strip decoder longer than a token): that panic (a BaseException) becomes
    # CheckpointError naming the tokenizer; plain exceptions (bad arguments) pass through.
    def _guard(self, what):
        return tokenizers_call(self.name_or_path or "tokenizer", what, convert="panics")

    @staticmethod
    def _check_kwargs(where, kwargs, allowed=()):
        """transformers' encode/__call__ arguments: those asking for nothing fastload lacks are accepted;
        any other value raises NotImplementedError, an unknown name TypeError (never silently ignored)."""
        for k, v in kwargs.items():
            if k in allowed:
                continue
            if k not in _NEUTRAL_KWARGS:
                raise TypeError(f"{where}: unexpected argument {k!r}")
            if not _NEUTRAL_KWARGS[k](v):
                raise NotImplementedError(f"{where}: {k}={v!r} is not supported")

    def _strategies(self, padding, truncation, max_length):
        """transformers' _get_padding_truncation_strategies for one sequence per text: returns
        (pad: None | "longest" | "max_length", truncate: bool, max_length)."""
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer))
                                       or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int, got {max_length!r}")
        if max_length is not None and padding is False and truncation is None:
            truncation = True  # transformers: max_length alone truncates ("longest_first")
        if padding in (False, None, "do_not_pad"):
            pad = None
        elif padding in (True, "longest"):
            pad = "longest"
        elif padding == "max_length":
            pad = "max_length"
        else:
            raise ValueError(f"padding={padding!r}: use True/'longest', 'max_length', False/'do_not_pad'")
        if truncation in (False, None, "do_not_truncate"):
            trunc = False
        elif truncation in (True, "longest_first", "only_first"):
            trunc = True
        elif truncation == "only_second":
            raise ValueError("truncation='only_second' needs a second sequence (text_pair), which is not supported")
        else:
            raise ValueError(f"truncation={truncation!r}: use True/'longest_first', 'only_first', False/'do_not_truncate'")
        if max_length is None:
            limit = self.model_max_length if self.model_max_length <= LARGE_INTEGER else None
            if pad == "max_length":
                pad = pad if limit is not None else None
                max_length = limit
            if trunc:
                trunc = limit is not None
                max_length = limit
        return pad, trunc, None if max_length is None else int(max_length)

    def _encode_ids(self, texts, add_special_tokens, truncate, max_length):
        """Token ids per text; truncation keeps the special tokens the post-processor adds (as the Rust
        tokenizer's own truncation does for transformers), cutting on self.truncation_side."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a string or a list of strings, got an item of type {type(t).__name__}")
        with self._guard("encoding"):
            if not truncate:
                return [e.ids for e in self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)]
            n_special = self._tk.num_special_tokens_to_add(False) if add_special_tokens else 0
            out = []
            for e in self._tk.encode_batch(texts, add_special_tokens=False):
                e.truncate(max(0, max_length - n_special), 0, self.truncation_side)
                out.append(self._tk.post_process(e, None, add_special_tokens).ids)
            return out

    def _pad(self, ids, pad, max_length, pad_to_multiple_of, side, force_equal):
        """Pads to the longest (or max_length) on `side`; returns (ids, masks)."""
        masks = [[1] * len(x) for x in ids]
        if pad is None and not force_equal:
            return ids, masks
        if pad is None and len({len(x) for x in ids}) > 1:
            raise ValueError("sequences of different lengths need padding=True to make a tensor")
        target = max_length if pad == "max_length" and max_length is not None else max((len(x) for x in ids), default=0)
        if pad is not None and pad_to_multiple_of:
            target = -(-target // int(pad_to_multiple_of)) * int(pad_to_multiple_of)
        pad_id = self.pad_token_id
        if pad_id is None:
            if any(len(x) != target for x in ids):
                raise ValueError("the tokenizer has no pad_token; set tokenizer.pad_token = tokenizer.eos_token")
            pad_id = 0
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r} must be 'left' or 'right'")
        n = [max(0, target - len(x)) for x in ids]
        if side == "left":
            return ([[pad_id] * k + x for x, k in zip(ids, n)], [[0] * k + m for m, k in zip(masks, n)])
        return ([x + [pad_id] * k for x, k in zip(ids, n)], [m + [0] * k for m, k in zip(masks, n)])

    def encode(self, text, text_pair=None, add_special_tokens=True, padding=False, truncation=None, max_length=None,
               stride=0, padding_side=None, return_tensors=None, pad_to_multiple_of=None, **kwargs):
        """transformers' encode: the token ids of one text, a list, or with return_tensors="np"/"pt" a
        [1, n] array/tensor. truncation/max_length/padding as transformers (max_length alone truncates,
        special tokens kept); text_pair and stride are not supported (NotImplementedError)."""
        self._check_kwargs("encode", dict(kwargs, text_pair=text_pair, stride=stride))
        if not isinstance(text, str):
            raise TypeError(f"encode(text): text must be a string, got {type(text).__name__} "
                            "(use tokenizer(list_of_texts) or batch encoding for several)")
        pad, trunc, max_length = self._strategies(padding, truncation, max_length)
        ids = self._encode_ids([text], add_special_tokens, trunc, max_length)
        ids, _ = self._pad(ids, pad, max_length, pad_to_multiple_of, padding_side or self.padding_side, False)
        if return_tensors is None:
            return ids[0]
        return self._tensors(BatchEncoding(input_ids=ids), return_tensors)["input_ids"]

    def tokenize(self, text, add_special_tokens=False):
        with self._guard("encoding"):
            return self._tk.encode(text, add_special_tokens=add_special_tokens).tokens

    def __call__(self, text=None, text_pair=None, text_target=None, text_pair_target=None, add_special_tokens=True,
                 padding=False, truncation=None, max_length=None, stride=0, is_split_into_words=False,
                 pad_to_multiple_of=None, padding_side=None, return_tensors=None, return_token_type_ids=None,
                 return_attention_mask=None, **kwargs):
        """transformers' tokenizer(...) with the same positional order; text pairs and targets (seq2seq)
        are not supported and raise NotImplementedError."""
        if text is None:
            raise ValueError("tokenizer(...) needs text")
        self._check_kwargs("tokenizer", dict(kwargs, text_pair=text_pair, stride=stride,
                                             is_split_into_words=is_split_into_words,
                                             return_token_type_ids=return_token_type_ids))
        if text_target is not None or text_pair_target is not None:
            raise NotImplementedError("tokenizer(text_target=...): targets of sequence-to-sequence models are not supported")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        pad, trunc, max_length = self._strategies(padding, truncation, max_length)
        ids = self._encode_ids(texts, add_special_tokens, trunc, max_length)
        ids, masks = self._pad(ids, pad, max_length, pad_to_multiple_of, padding_side or self.padding_side,
                               force_equal=bool(return_tensors) and len(ids) > 1)
        if return_tensors and len({len(x) for x in ids}) > 1:
            raise ValueError(f"sequences longer than max_length={max_length} stay longer without truncation=True, "
                             "so they cannot make one tensor")
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask is None or return_attention_mask:
            out["attention_mask"] = masks
        if single and not return_tensors:
            out = BatchEncoding({k: v[0] for k, v in out.items()})
        return self._tensors(out, return_tensors)

    @staticmethod
    def _tensors(enc, return_tensors):
        if return_tensors is None:
            return enc
        if return_tensors == "np":
            return BatchEncoding({k: np.asarray(v, dtype=np.int64) for k, v in enc.items()})
        if return_tensors == "pt":
            import torch  # only because the caller asked for torch tensors
            return BatchEncoding({k: torch.tensor(v, dtype=torch.long) for k, v in enc.items()})
        raise ValueError(f"return_tensors={return_tensors!r} is not supported; use 'np' or 'pt'")

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        """One sequence of ids -> its text; a batch (a list of lists, a 2-D array or tensor, or an encoding's
        input_ids) -> one text a row, as transformers 5."""
        if isinstance(token_ids, dict) or (hasattr(token_ids, "keys") and hasattr(token_ids, "__getitem__")
                                           and "input_ids" in token_ids):
            token_ids = token_ids["input_ids"]
        if is_torch(token_ids) or isinstance(token_ids, np.ndarray):
            token_ids = token_ids.tolist()
        if isinstance(token_ids, (list, tuple)) and token_ids and (isinstance(token_ids[0], (list, tuple, np.ndarray))
                                                                   or is_torch(token_ids[0])):
            return [self.decode(row, skip_special_tokens, clean_up_tokenization_spaces, **kwargs) for row in token_ids]
        ids = [token_ids] if isinstance(token_ids, (int, np.integer)) else token_ids
        if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)) or \
                not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
            raise TypeError(f"decode takes a token id, a sequence of ids or a batch of them, got "
                            f"{type(token_ids).__name__}" + (f" holding {type(ids[0]).__name__}"
                                                            if isinstance(ids, (list, tuple)) and ids else ""))
        ids = [int(i) for i in ids]
        with self._guard("decoding"):
            text = self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean and not self._bpe:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences, **kwargs):
        if is_torch(sequences):
            sequences = sequences.tolist()
        return [self.decode(s, **kwargs) for s in sequences]

    # ---------------------------------------------------------------- saving
    def save_pretrained(self, save_directory, legacy_format=None, filename_prefix=None, push_to_hub=False,
                        save_jinja_files=True, **kwargs) -> tuple:
        """transformers' save_pretrained: writes tokenizer_config.json (special tokens, padding_side,
        model_max_length, clean_up_tokenization_spaces, add_bos/eos_token when known, tokenizer_class),
        special_tokens_map.json (transformers 5 no longer writes it; older loaders read it),
        chat_template.jinja (when there is a template) and tokenizer.json, and returns their paths.
        Works for GGUF-rebuilt tokenizers too: the directory then loads without the GGUF file. Files are
        replaced, never written through (an existing symlink is replaced, not followed)."""
        if push_to_hub:
            raise NotImplementedError("save_pretrained(push_to_hub=True): fastload does not upload; save, then use "
                                      "huggingface_hub's upload_folder")
        if legacy_format:
            raise ValueError("legacy_format=True: there is no slow (sentencepiece/vocab file) tokenizer to save; "
                             "tokenizer.json is the format")
        if kwargs:
            raise TypeError(f"save_pretrained: unexpected argument(s) {sorted(kwargs)}")
        save_directory = os.fspath(save_directory)
        if os.path.exists(save_directory) and not os.path.isdir(save_directory):
            raise NotADirectoryError(f"save_pretrained: {save_directory} exists and is not a directory")
        os.makedirs(save_directory, exist_ok=True)
        pre = (filename_prefix + "-") if filename_prefix else ""
        special = self.special_tokens_map
        conf = dict(special)
        conf.update(clean_up_tokenization_spaces=bool(self.clean_up_tokenization_spaces),
                    model_max_length=int(self.model_max_length), padding_side=self.padding_side,
                    tokenizer_class="PreTrainedTokenizerFast")
        if self.truncation_side != "right":
            conf["truncation_side"] = self.truncation_side
        for k, v in (("add_bos_token", self._add_bos), ("add_eos_token", self._add_eos)):
            if v is not None:  # known (tokenizer_config.json's, or set): the getters infer a value otherwise
                conf[k] = bool(v)
        written = []
        config_path = os.path.join(save_directory, pre + "tokenizer_config.json")
        special_path = os.path.join(save_directory, pre + "special_tokens_map.json")
        template_path = os.path.join(save_directory, pre + "chat_template.jinja")
        if self.chat_template is not None and not save_jinja_files:
            conf["chat_template"] = self.chat_template
        _write_file(config_path, json.dumps(conf, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(config_path)
        _write_file(special_path, json.dumps(special, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
        written.append(special_path)
        if self.chat_template is not None and save_jinja_files:
            _write_file(template_path, self.chat_template)
            written.append(template_path)
        tj = os.path.join(save_directory, pre + "tokenizer.json")
        _write_file(tj, self._tk.to_str(pretty=True))
        written.append(tj)
        return tuple(written)

    # ---------------------------------------------------------------- chat template
    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, return_tensors=None,
                            return_dict=False, chat_template=None, continue_final_message=False, tools=None,
                            documents=None, padding=False, truncation=False, max_length=None, tokenizer_kwargs=None,
                            return_assistant_tokens_mask=False, **kwargs):
        """transformers' apply_chat_template: the template rendered with `kwargs`, then (tokenize=True) encoded without
        special tokens (the template holds them) with padding / truncation / max_length / tokenizer_kwargs as given.
        A batch is not padded unless padding= asks (transformers' default: ragged lists, and an error for tensors)."""
        named = self.chat_templates or {}
        if chat_template is not None and chat_template in named:  # a template chosen by name (transformers)
            tmpl = named[chat_template]
        elif chat_template is None and tools is not None and "tool_use" in named:
            tmpl = named["tool_use"]
        else:
            tmpl = chat_template or self.chat_template
        if tmpl is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template or GGUF "
                             "tokenizer.chat_template); pass chat_template=...")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: continue_final_message "
                             "continues the last message, add_generation_prompt starts a new one")
        if return_assistant_tokens_mask:
            raise NotImplementedError("apply_chat_template(return_assistant_tokens_mask=True) is not supported by fastload")
        if isinstance(conversation, (str, bytes)) or not isinstance(conversation, (list, tuple)):
            raise TypeError(f"apply_chat_template takes a list of {{'role', 'content'}} messages (or a batch of such "
                            f"lists), got {type(conversation).__name__}")
        if tools is not None:
            if not isinstance(tools, (list, tuple)) or any(callable(t) or not isinstance(t, dict) for t in tools):
                raise TypeError("apply_chat_template(tools=): give each tool as a JSON-schema dict; Python functions are "
                                "not converted here (transformers.utils.get_json_schema(fn) makes the dict)")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        env = _jinja_env()
        compiled = env.from_string(tmpl)
        # the special tokens, then the caller's template variables over them (transformers: a bos_token= kwarg wins)
        ctx = {"bos_token": self.bos_token or "", "eos_token": self.eos_token or "", "unk_token": self.unk_token or "",
               "pad_token": self.pad_token or ""}
        ctx.update(kwargs)
        texts = []
        for conv in convs:
            msgs = _normalize_messages(conv)
            final = _tag_final_message(msgs, continue_final_message, tmpl) if continue_final_message else None
            text = compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                   documents=documents, **ctx)
            if continue_final_message:
                text = _cut_at_tag(text, final)
            texts.append(text)
        if not tokenize:
            return texts if batched else texts[0]
        # The template already holds bos/eos where the model wants them: no special tokens added again.
        enc = self(texts if batched else texts[0], add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors, **dict(tokenizer_kwargs or {}))
        return enc if return_dict else enc["input_ids"]


_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _normalize_messages(conv):
    """transformers 5's message normalisation before rendering: copies of the messages without the keys whose value
    is None (OpenAI clients send content=None beside tool_calls; templates would print "None"), and the reasoning
    under each of its names (reasoning_content / thinking / reasoning), since templates read different ones."""
    msgs = []
    for m in conv:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        m = {k: v for k, v in m.items() if v is not None}
        r = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
        if r is not None:
            m = {"thinking": r, **m, "reasoning_content": r}
        msgs.append(m)
    return msgs


def _tag_final_message(msgs, field, tmpl):
    """continue_final_message as transformers 5 does it: a tag appended to the final message's text (its last text
    part for a list of parts; field: "content", or the name given), found again after rendering. Returns the text."""
    if not msgs:
        raise ValueError("continue_final_message is set but the conversation is empty")
    field = field if isinstance(field, str) else "content"
    final = msgs[-1].get(field)
    if final is None:
        raise ValueError(f"continue_final_message is set but the final message has no {field!r} to continue")
    fields = [f for f in _REASONING_FIELDS if msgs[-1].get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in tmpl for f in fields):
        raise ValueError(f"continue_final_message is set to {field!r} but the chat template never reads it")
    if isinstance(final, (list, tuple)):
        blocks = [dict(b) if isinstance(b, dict) else b for b in final]
        for b in reversed(blocks):
            if isinstance(b, dict) and isinstance(b.get("text"), str):
                text, b["text"] = b["text"], b["text"] + _CONTINUE_TAG
                break
        else:
            raise ValueError("continue_final_message is set but the final message has no text part")
        msgs[-1][field] = blocks
        return text
    if not isinstance(final, str):
        raise ValueError(f"continue_final_message: the final message's {field} is {type(final).__name__}, not text")
    for f in fields:
        msgs[-1][f] = msgs[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(text, final):
    """The rendered chat cut where the final message's tag is: right after the message, its trailing spaces kept
    only where the template kept the tag's own (transformers 5)."""
    if final.strip() not in text or _CONTINUE_TAG.strip() not in text:
        raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                         "applying the chat template (the template may change it, e.g. strip it)")
    at = text.rindex(_CONTINUE_TAG.strip())
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def _write_file(path, text):
    """Writes `text` (UTF-8) to a temporary file beside `path`, then renames it over `path`: a reader never
    sees half a file, and a symlink at `path` is replaced rather than written through."""
    d, base = os.path.split(path)
    tmp = os.path.join(d, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


_ENV = None


def _jinja_env():
    """The environment transformers renders chat templates with (sandboxed, trim/lstrip blocks)."""
    global _ENV
    if _ENV is None:
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols", _generation_extension()])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


def _generation_extension():
    """transformers' {% generation %} ... {% endgeneration %} tag (it marks assistant text for training masks):
    rendered as its body; the mask it tracks (return_assistant_tokens_mask) is not supported here."""
    import jinja2.ext
    import jinja2.nodes

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()
    return Generation


class AutoTokenizer:
    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(...)")

    @staticmethod
    def from_pretrained(*args, **kwargs) -> FastTokenizer:
        return FastTokenizer.from_pretrained(*args, **kwargs)
