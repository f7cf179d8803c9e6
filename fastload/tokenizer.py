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
    return v


def _template_source(path):
    """The file a chat template came from (for errors)."""
    if not os.path.isfile(os.path.join(str(path), "chat_template.jinja")) and \
            os.path.isfile(os.path.join(str(path), "chat_template.json")):
        return os.path.join(str(path), "chat_template.json")
    return os.path.join(str(path), "tokenizer_config.json")


def _named_template(tmpl, path):
    """transformers' list of named chat templates ({"name", "template"}): the one named "default", else
    the first."""
    for i, t in enumerate(tmpl):
        if not (isinstance(t, dict) and isinstance(t.get("template"), str) and isinstance(t.get("name", ""), str)):
            raise CheckpointError(f"{_template_source(path)}: chat_template[{i}] is not a "
                                  "{\"name\": str, \"template\": str} entry")
    return next((t["template"] for t in tmpl if t.get("name") == "default"), tmpl[0]["template"] if tmpl else None)


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
    return out


_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
             (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


class FastTokenizer:
    def __init__(self, tokenizer, *, bos_token=None, eos_token=None, unk_token=None, pad_token=None,
                 chat_template=None, padding_side="left", model_max_length=None, name_or_path="",
                 clean_up_tokenization_spaces=False, add_bos_token=None, add_eos_token=None):
        self._tk = tokenizer
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.padding_side = padding_side
        self.model_max_length = model_max_length or int(1e30)
        self.name_or_path = name_or_path
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

    # ---------------------------------------------------------------- construction
    @_library_errors_to_checkpoint_error
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, gguf_file=None, padding_side=None, revision=None,
                        cache_dir=None, local_files_only=False, allow_external_symlinks=None, **kwargs):
        from tokenizers import Tokenizer
        path = resolve(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only)
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
        if isinstance(tmpl, list):  # named templates: take "default"
            tmpl = _named_template(tmpl, path)
        conf = _checked_config(conf, tmpl, path)
        return cls(tk, bos_token=conf["bos_token"], eos_token=conf["eos_token"],
                   unk_token=conf["unk_token"], pad_token=conf["pad_token"],
                   chat_template=conf["chat_template"], padding_side=padding_side or conf["padding_side"] or "left",
                   model_max_length=conf["model_max_length"], name_or_path=str(pretrained_model_name_or_path),
                   clean_up_tokenization_spaces=conf["clean_up_tokenization_spaces"])

    # ---------------------------------------------------------------- vocabulary
    def _id(self, tok):
        return None if tok is None else self._tk.token_to_id(tok)

    bos_token_id = property(lambda self: self._id(self.bos_token))
    eos_token_id = property(lambda self: self._id(self.eos_token))
    unk_token_id = property(lambda self: self._id(self.unk_token))

    @property
    def pad_token_id(self):
        return self._id(self.pad_token)

    @property
    def vocab_size(self):
        return self._tk.get_vocab_size(with_added_tokens=False)

    def __len__(self):
        return self._tk.get_vocab_size(with_added_tokens=True)

    def get_vocab(self):
        return self._tk.get_vocab(with_added_tokens=True)

    @property
    def all_special_tokens(self):
        return [t.content for t in self._tk.get_added_tokens_decoder().values() if t.special]

    @property
    def all_special_ids(self):
        return [i for i, t in self._tk.get_added_tokens_decoder().items() if t.special]

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

    def encode(self, text, add_special_tokens=True, **kwargs):
        with self._guard("encoding"):
            return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text, add_special_tokens=False):
        with self._guard("encoding"):
            return self._tk.encode(text, add_special_tokens=add_special_tokens).tokens

    def __call__(self, text=None, add_special_tokens=True, padding=False, truncation=False, max_length=None,
                 return_tensors=None, return_attention_mask=True, padding_side=None, **kwargs):
        if text is None:
            raise ValueError("tokenizer(...) needs text")
        for k, v in kwargs.items():
            if k not in ("return_token_type_ids", "verbose") and v:
                raise TypeError(f"tokenizer argument {k!r} is not supported")
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        with self._guard("encoding"):
            encs = self._tk.encode_batch(texts, add_special_tokens=add_special_tokens)
        ids = [e.ids for e in encs]
        if truncation and max_length is not None:
            ids = [x[:max_length] for x in ids]
        side = padding_side or self.padding_side
        if padding in (True, "longest", "max_length") or (return_tensors and len(ids) > 1):
            if not padding and return_tensors:
                if len({len(x) for x in ids}) > 1:
                    raise ValueError("sequences of different lengths need padding=True to make a tensor")
            target = max_length if padding == "max_length" and max_length else max(len(x) for x in ids)
            pad = self.pad_token_id
            if pad is None:
                if len({len(x) for x in ids}) > 1 or padding == "max_length":
                    raise ValueError("the tokenizer has no pad_token; set tokenizer.pad_token = tokenizer.eos_token")
                pad = 0
            masks = [[0] * (target - len(x)) + [1] * len(x) if side == "left" else [1] * len(x) + [0] * (target - len(x)) for x in ids]
            ids = [[pad] * (target - len(x)) + x if side == "left" else x + [pad] * (target - len(x)) for x in ids]
        else:
            masks = [[1] * len(x) for x in ids]
        out = BatchEncoding(input_ids=ids)
        if return_attention_mask:
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
        if is_torch(token_ids):
            token_ids = token_ids.tolist()
        ids = np.asarray(token_ids).reshape(-1).tolist() if not isinstance(token_ids, list) else token_ids
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        with self._guard("decoding"):
            text = self._tk.decode(ids, skip_special_tokens=skip_special_tokens)
        clean = self.clean_up_tokenization_spaces if clean_up_tokenization_spaces is None else clean_up_tokenization_spaces
        if clean:
            for a, b in _CLEANUPS:
                text = text.replace(a, b)
        return text

    def batch_decode(self, sequences, **kwargs):
        if is_torch(sequences):
            sequences = sequences.tolist()
        return [self.decode(s, **kwargs) for s in sequences]

    # ---------------------------------------------------------------- chat template
    def apply_chat_template(self, conversation, tokenize=True, add_generation_prompt=False, return_tensors=None,
                            return_dict=False, chat_template=None, continue_final_message=False, tools=None,
                            documents=None, **kwargs):
        tmpl = chat_template or self.chat_template
        if tmpl is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template or GGUF "
                             "tokenizer.chat_template); pass chat_template=...")
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        convs = conversation if batched else [conversation]
        env = _jinja_env()
        compiled = env.from_string(tmpl)
        texts = []
        for conv in convs:
            msgs = [dict(m) for m in conv]
            text = compiled.render(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                                   documents=documents, bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                   unk_token=self.unk_token or "", pad_token=self.pad_token or "", **kwargs)
            if continue_final_message and msgs:
                last = msgs[-1]["content"]
                text = text[: text.rindex(last) + len(last)] if isinstance(last, str) and last in text else text
            texts.append(text)
        if not tokenize:
            return texts if batched else texts[0]
        # The template already holds bos/eos where the model wants them: no special tokens added again.
        enc = self(texts, add_special_tokens=False, padding=True)
        if return_dict:
            out = enc if batched or return_tensors else BatchEncoding({k: v[0] for k, v in enc.items()})
            return self._tensors(out, return_tensors)
        ids = enc["input_ids"] if batched or return_tensors else enc["input_ids"][0]
        if return_tensors:
            return self._tensors(BatchEncoding(input_ids=ids), return_tensors)["input_ids"]
        return ids


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

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        _ENV = env
    return _ENV


class AutoTokenizer:
    def __init__(self):
        raise TypeError("use AutoTokenizer.from_pretrained(...)")

    @staticmethod
    def from_pretrained(*args, **kwargs) -> FastTokenizer:
        return FastTokenizer.from_pretrained(*args, **kwargs)
