"""ChatGLM2-6B / ChatGLM3-6B's tokenizer (THUDM's ChatGLMTokenizer, tokenization_chatglm.py) without running its code.

What THUDM's tokenizer does, rebuilt on fastload.spm (its tokenizer.model is a SentencePiece BPE model):
  * text -> sentencepiece ids (dummy prefix, byte fallback); the command tokens get the ids after the
    SentencePiece vocabulary, in THUDM's order: [MASK], [gMASK], [sMASK], sop, eop (ChatGLM2: 64789..64793), and for
    ChatGLM3 then <|system|>, <|user|>, <|assistant|>, <|observation|> (64794..64797). They are never read out of text
    (THUDM's default; ChatGLM3's encode_special_tokens=True reads the four role tokens, as its tokenizer does);
  * special tokens added to every encoding: the prefix [gMASK] sop (get_prefix_tokens); a pair gets
    prefix + a + b + </s> (build_inputs_with_special_tokens);
  * eos </s> (2), pad and unk <unk> (0), left padding, position_ids next to input_ids / attention_mask;
  * decode: the ids of <unk> / <s> / </s> give nothing, command tokens their names, the rest sentencepiece's decoding
    of the pieces (DecodePieces, fastload.spm.decode_pieces). skip_special_tokens=True also drops the command tokens
    (THUDM's drops nothing more: its special-token list is empty);
  * chat prompts: ChatGLM2's build_prompt ("[Round N]\\n\\n问：...\\n\\n答：", rounds from 1) and ChatGLM3's
    build_single_message / build_chat_input (role token, sentencepiece("{metadata}\\n"), sentencepiece(content);
    <|assistant|> at the end; a system message with "tools" gets them as indented JSON).

Which version a directory holds: the argument chatglm_version=2 / 3, else ChatGLM3 when its tokenization_chatglm.py
(read as text, never imported), tokenizer_config.json or config.json name ChatGLM3's role tokens or "chatglm3", else
ChatGLM2 when they name "chatglm2", else ChatGLM3."""
from __future__ import annotations

import json
import os
import re

import numpy as np

from . import _files, spm
from ._C import CheckpointError
from ._util import is_torch
from .tokenizer import BatchEncoding, FastTokenizer

__all__ = ["ChatGLMTokenizer", "is_chatglm_dir"]

COMMANDS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop"]
ROLES = ["<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"]
SP_MODEL_LIMIT = 64 * 1024 * 1024


def _read_small(path, name, ext):
    real = _files.find_file(path, name, allow_external=ext)
    if real is None:
        return None
    return _files.read_text(real, os.path.join(path, name))


def is_chatglm_dir(path, ext=False) -> bool:
    """A directory with THUDM's tokenizer: tokenizer.model and no tokenizer.json, with tokenizer_config.json naming
    ChatGLMTokenizer or config.json model_type chatglm."""
    if not os.path.isdir(path) or _files.find_file(path, "tokenizer.model", allow_external=ext) is None:
        return False
    for name, key, want in (("tokenizer_config.json", "tokenizer_class", "ChatGLMTokenizer"),
                            ("config.json", "model_type", "chatglm")):
        real = _files.find_file(path, name, allow_external=ext)
        if real is not None:
            try:
                conf = _files.read_json(real, os.path.join(path, name))
            except (CheckpointError, ValueError, OSError):
                continue
            if isinstance(conf, dict) and conf.get(key) == want:
                return True
    return False


def _version(path, ext) -> int:
    texts = [_read_small(path, n, ext) or "" for n in ("tokenization_chatglm.py", "tokenizer_config.json",
                                                         "config.json")]
    blob = "\n".join(texts)
    if "<|observation|>" in blob or "<|user|>" in blob or "chatglm3" in blob.lower():
        return 3
    if "chatglm2" in blob.lower():
        return 2
    return 3


def glm_history(history, version):
    """A chat history in the form THUDM's ChatGLM2 (pairs (query, response)) or ChatGLM3 (role / content dicts) takes,
    from either form (what the generic chat() accepts): the returned history is then in the model's own form."""
    out = []
    items = list(history or [])
    pairs = [isinstance(h, (list, tuple)) and len(h) == 2 for h in items]
    dicts = [isinstance(h, dict) and "role" in h and "content" in h for h in items]
    if not all(p or d for p, d in zip(pairs, dicts)):
        bad = next(h for h, p, d in zip(items, pairs, dicts) if not (p or d))
        raise ValueError(f"history items must be (query, response) pairs or {{'role', 'content'}} dicts, got {bad!r}")
    if version == 2:
        pending = None
        for h, p in zip(items, pairs):
            if p:
                out.append((str(h[0]), str(h[1])))
            elif h["role"] == "user" and pending is None:
                pending = str(h["content"])
            elif h["role"] == "assistant" and pending is not None:
                out.append((pending, str(h["content"])))
                pending = None
            else:
                raise ValueError(f"ChatGLM2's history is user / assistant turns in pairs (no system prompt or other "
                                 f"roles), got {h!r}")
        if pending is not None:
            raise ValueError("ChatGLM2's history ends with a user message that has no answer")
        return out
    for h, p in zip(items, pairs):
        if p:
            out += [{"role": "user", "content": str(h[0])}, {"role": "assistant", "content": str(h[1])}]
        else:
            out.append(dict(h))
    return out


class ChatGLMTokenizer(FastTokenizer):
    """fastload's THUDM ChatGLMTokenizer (see the module docstring); everything else as FastTokenizer."""

    model_input_names = ["input_ids", "attention_mask", "position_ids"]

    def __init__(self, sp_model: spm.SPModel, version: int, *, source="tokenizer.model", name_or_path="",
                 padding_side="left", encode_special_tokens=False, model_max_length=None):
        from tokenizers import AddedToken, processors
        tk = spm.build_tokenizer(sp_model, source)
        n = len(sp_model.pieces)
        self.__dict__["_sp"] = sp_model
        self.__dict__["_sp_vocab"] = {p: i for i, (p, _, _) in enumerate(sp_model.pieces)}
        commands = COMMANDS + (ROLES if version == 3 else [])
        self.__dict__["_commands"] = {t: n + i for i, t in enumerate(commands)}
        self.__dict__["_command_names"] = {n + i: t for i, t in enumerate(commands)}
        with spm.tokenizers_call(source, "adding ChatGLM's special tokens"):
            tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in commands])
            tk.encode_special_tokens = True  # THUDM's tokenizer never reads them out of text
            g, s = self._commands["[gMASK]"], self._commands["sop"]
            eos = sp_model.pieces[2][0] if len(sp_model.pieces) > 2 else "</s>"
            tk.post_processor = processors.TemplateProcessing(
                single="[gMASK] sop $A", pair=f"[gMASK] sop $A $B {eos}",
                special_tokens=[("[gMASK]", g), ("sop", s), (eos, 2)])
        if any(tk.token_to_id(t) != i for t, i in self._commands.items()):
            raise CheckpointError(f"{source}: ChatGLM's special tokens do not follow the SentencePiece vocabulary "
                                  "(a piece repeats one of their names)")
        super().__init__(tk, bos_token=None, eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                         padding_side=padding_side, model_max_length=model_max_length, name_or_path=name_or_path,
                         clean_up_tokenization_spaces=False)
        self.__dict__["chatglm_version"] = version
        self.__dict__["encode_special_tokens"] = bool(encode_special_tokens)
        self.__dict__["name"] = "GLMTokenizer"

    # ---------------------------------------------------------------- construction
    @classmethod
    def from_dir(cls, path, shown=None, *, chatglm_version=None, padding_side=None, encode_special_tokens=None,
                 allow_external=False):
        shown = str(shown or path)
        real = _files.find_file(path, "tokenizer.model", allow_external=allow_external)
        if real is None:
            raise FileNotFoundError(f"{path}: no tokenizer.model")
        where = os.path.join(shown, "tokenizer.model")
        m = spm.read_model(_files.read_bytes(real, where, SP_MODEL_LIMIT), where)
        conf = {}
        tc = _files.find_file(path, "tokenizer_config.json", allow_external=allow_external)
        if tc is not None:
            conf = _files.read_json(tc, os.path.join(shown, "tokenizer_config.json"))
            if not isinstance(conf, dict):
                raise CheckpointError(f"{os.path.join(shown, 'tokenizer_config.json')}: not a JSON object")
        version = chatglm_version if chatglm_version is not None else _version(path, allow_external)
        if version not in (2, 3):
            raise ValueError(f"chatglm_version={version!r}: 2 (ChatGLM2-6B) or 3 (ChatGLM3-6B)")
        side = padding_side or conf.get("padding_side") or "left"
        if side not in ("left", "right"):
            raise CheckpointError(f"{shown}: padding_side must be \"left\" or \"right\"")
        est = conf.get("encode_special_tokens", False) if encode_special_tokens is None else encode_special_tokens
        mml = conf.get("model_max_length")
        mml = int(mml) if isinstance(mml, (int, float)) and not isinstance(mml, bool) and 0 < mml < 2 ** 63 else None
        return cls(m, version, source=where, name_or_path=shown, padding_side=side,
                   encode_special_tokens=bool(est), model_max_length=mml)

    # ---------------------------------------------------------------- THUDM's API
    def get_command(self, token):
        """The id of "<bos>" / "<eos>" / "<pad>" or of a command token ("[gMASK]", "sop", "<|user|>", ...)."""
        fixed = {"<bos>": 1, "<eos>": 2, "<pad>": 0}
        if token in fixed:
            return fixed[token]
        if token not in self._commands:
            raise KeyError(f"{token} is not a special token for ChatGLM{self.chatglm_version}")
        return self._commands[token]

    def get_prefix_tokens(self):
        return [self.get_command("[gMASK]"), self.get_command("sop")]

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        ids = self.get_prefix_tokens() + list(token_ids_0)
        if token_ids_1 is not None:
            ids = ids + list(token_ids_1) + [self.get_command("<eos>")]
        return ids

    def sp_encode(self, text):
        """SentencePiece ids of `text` alone (THUDM's tokenizer.tokenizer.encode)."""
        with self._guard("encoding"):
            return self._tk.encode(text, add_special_tokens=False).ids

    def build_prompt(self, query, history=None):
        """ChatGLM2's prompt: "[Round N]\\n\\n问：{query}\\n\\n答：" after the earlier rounds, numbered from 1."""
        prompt = ""
        history = glm_history(history, 2)
        for i, (old_query, response) in enumerate(history):
            prompt += f"[Round {i + 1}]\n\n问：{old_query}\n\n答：{response}\n\n"
        return prompt + f"[Round {len(history) + 1}]\n\n问：{query}\n\n答："

    def build_single_message(self, role, metadata, message):
        if role not in ("system", "user", "assistant", "observation"):
            raise ValueError(f"role {role!r}: one of system, user, assistant, observation")
        return [self.get_command(f"<|{role}|>")] + self.sp_encode(f"{metadata}\n") + self.sp_encode(message)

    def build_chat_input(self, query, history=None, role="user", return_tensors="np"):
        """ChatGLM3's chat input: [gMASK] sop, each history message (dicts with role / content / metadata; a system
        message's "tools" appended as indented JSON), the new message, then <|assistant|>."""
        if self.chatglm_version != 3:
            raise ValueError("build_chat_input is ChatGLM3's; ChatGLM2 uses build_prompt")
        ids = []
        for item in glm_history(history, 3):
            content = item["content"]
            if item["role"] == "system" and "tools" in item:
                content = content + "\n" + json.dumps(item["tools"], indent=4, ensure_ascii=False)
            ids.extend(self.build_single_message(item["role"], item.get("metadata", ""), content))
        ids.extend(self.build_single_message(role, "", query))
        ids.append(self.get_command("<|assistant|>"))
        ids = self.build_inputs_with_special_tokens(ids)
        enc = BatchEncoding(input_ids=[ids], attention_mask=[[1] * len(ids)], position_ids=[list(range(len(ids)))])
        return self._tensors(enc, return_tensors)

    # ---------------------------------------------------------------- encode with ChatGLM3's role tokens
    def _encode_ids(self, texts, add_special_tokens, truncate, max_length):
        if not (self.encode_special_tokens and self.chatglm_version == 3):
            return super()._encode_ids(texts, add_special_tokens, truncate, max_length)
        out = []
        pat = re.compile("|".join(re.escape(t) for t in ROLES))
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a string or a list of strings, got an item of type {type(t).__name__}")
            ids, last = [], 0
            for mt in pat.finditer(t):
                if mt.start() > last:
                    ids += self.sp_encode(t[last:mt.start()])
                ids.append(self._commands[mt.group()])
                last = mt.end()
            if last < len(t):
                ids += self.sp_encode(t[last:])
            if truncate:
                keep = max(0, max_length - (2 if add_special_tokens else 0))
                ids = ids[:keep] if self.truncation_side == "right" else ids[len(ids) - keep:] if keep else []
            out.append(self.build_inputs_with_special_tokens(ids) if add_special_tokens else ids)
        return out

    def __call__(self, text=None, *args, return_tensors=None, **kwargs):
        """As FastTokenizer's, plus position_ids (0 from the first real token; padding 0), as THUDM's _pad."""
        enc = super().__call__(text, *args, **kwargs)
        ids = enc["input_ids"]
        single = bool(ids) and isinstance(ids[0], (int, np.integer))
        rows = [ids] if single else ids
        masks = enc.get("attention_mask") or [[1] * len(r) for r in rows]
        masks = [masks] if single else masks
        pos = [[0] * (len(m) - sum(m)) + list(range(sum(m))) if self.padding_side == "left" else
               list(range(sum(m))) + [0] * (len(m) - sum(m)) for m in masks]
        enc["position_ids"] = pos[0] if single else pos
        if single and return_tensors:  # one text as a [1, n] batch, as transformers
            enc = BatchEncoding({k: [v] for k, v in enc.items()})
        return self._tensors(enc, return_tensors)

    def tokenize(self, text, add_special_tokens=False):
        ids = self._encode_ids([text], add_special_tokens, False, None)[0]
        return self.convert_ids_to_tokens(ids)

    # ---------------------------------------------------------------- decode
    @property
    def all_special_tokens(self):
        return list(self._commands)

    @property
    def all_special_ids(self):
        return list(self._commands.values())

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, (int, np.integer)):
            return self._token(int(ids))
        return [self._token(int(i)) for i in ids if not (skip_special_tokens and int(i) in self._command_names)]

    def _token(self, i):
        """THUDM's _convert_id_to_token: command names, "" for <unk> / <s> / </s> and ids outside the vocabulary."""
        if i in self._command_names:
            return self._command_names[i]
        if i in (0, 1, 2) or not 0 <= i < len(self._sp.pieces):
            return ""
        return self._sp.pieces[i][0]

    def convert_tokens_to_string(self, tokens):
        return spm.decode_pieces(self._sp, tokens, self._sp_vocab)

    def decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if is_torch(token_ids):
            token_ids = token_ids.tolist()
        ids = np.asarray(token_ids).reshape(-1).tolist() if not isinstance(token_ids, list) else token_ids
        if isinstance(ids, int):
            ids = [ids]
        return self.convert_tokens_to_string(self.convert_ids_to_tokens([int(i) for i in ids], skip_special_tokens))

    def save_pretrained(self, save_directory, **kwargs):
        """tokenizer.model (the same bytes) and tokenizer_config.json naming ChatGLMTokenizer."""
        raise NotImplementedError("save_pretrained of a ChatGLM tokenizer: copy tokenizer.model and "
                                  "tokenizer_config.json from the model directory")
