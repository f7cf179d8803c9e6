"""SentencePiece models (`tokenizer.model`) read without the sentencepiece package, rebuilt as a Hugging Face
`tokenizers` tokenizer that encodes and decodes as sentencepiece does.

The file is a protobuf ModelProto (sentencepiece_model.proto). The fields read, by number:

    ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
    SentencePiece   1 piece (string), 2 score (float), 3 type (1 normal, 2 unknown, 3 control, 4 user defined,
                    5 unused, 6 byte)
    TrainerSpec     3 model_type (1 unigram, 2 BPE, 3 word, 4 char), 24 treat_whitespace_as_suffix,
                    35 byte_fallback, 40 unk_id
    NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix (default true),
                    4 remove_extra_whitespaces (default true), 5 escape_whitespaces (default true)

Every other field is skipped by its wire type. The reader is a small protobuf decoder that trusts nothing:
lengths and varints are bounded by what is left of the buffer, the number of pieces by MAX_VOCAB, and every
failure is a CheckpointError naming the file.

The rebuild (BPE models only, which is what ChatGLM2 / ChatGLM3 ship; the same construction as transformers'
LlamaConverter): a BPE model over the pieces with merges implied by the scores (the merged piece's score
decides, as sentencepiece's BPE picks the best-scoring adjacent pair first), byte fallback as the file says;
the normalizer: the precompiled character map (if any), extra whitespace removed (if asked), the dummy "\u2581"
prefix and spaces escaped to "\u2581"; the decoder: "\u2581" back to spaces, bytes fused, and the dummy prefix's
space dropped (decode_pieces is sentencepiece's own decoding, exact where the tokenizers decoder is not: invalid
bytes become one U+FFFD each, and only a piece's own dummy-prefix "▁" is dropped). Merges are built only from normal and user-defined pieces (sentencepiece never merges into control,
unknown, unused or byte pieces). tests/test_chatglm_tokenizer.py compares ids and text with real sentencepiece on a
few hundred strings (fixtures made by tests/fixtures/make_chatglm_fixtures.py)."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from ._C import CheckpointError
from .gguf_tokenizer import MAX_VOCAB, _merges_from_scores, tokenizers_call

__all__ = ["SPModel", "read_model", "build_tokenizer", "decode_pieces", "NORMAL", "UNKNOWN", "CONTROL", "USER_DEFINED", "UNUSED",
           "BYTE"]

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
UNIGRAM, BPE_MODEL, WORD, CHAR = 1, 2, 3, 4
MAX_PIECE_BYTES = 65536


@dataclass
class SPModel:
    pieces: list = field(default_factory=list)   # [(piece str, score float, type int)]
    model_type: int = UNIGRAM                     # sentencepiece's default
    byte_fallback: bool = False
    unk_id: int = 0
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = ""
    charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True


class _Reader:
    def __init__(self, buf: bytes, source: str, what: str):
        self.b, self.i, self.source, self.what = memoryview(buf), 0, source, what

    def error(self, msg):
        return CheckpointError(f"{self.source}: not a valid SentencePiece model ({self.what}: {msg})")

    def varint(self) -> int:
        v, shift = 0, 0
        while True:
            if self.i >= len(self.b):
                raise self.error("truncated varint")
            c = self.b[self.i]
            self.i += 1
            v |= (c & 0x7F) << shift
            if c < 0x80:
                return v
            shift += 7
            if shift >= 64:
                raise self.error("varint longer than 10 bytes")

    def fields(self):
        """(field number, wire type, value): value an int (varint / fixed), or bytes (length-delimited)."""
        while self.i < len(self.b):
            key = self.varint()
            num, wt = key >> 3, key & 7
            if num == 0:
                raise self.error("field number 0")
            if wt == 0:
                yield num, wt, self.varint()
            elif wt == 1:
                if self.i + 8 > len(self.b):
                    raise self.error("truncated 64-bit field")
                yield num, wt, bytes(self.b[self.i:self.i + 8])
                self.i += 8
            elif wt == 2:
                n = self.varint()
                if n > len(self.b) - self.i:
                    raise self.error(f"field {num} claims {n} bytes, {len(self.b) - self.i} are left")
                yield num, wt, bytes(self.b[self.i:self.i + n])
                self.i += n
            elif wt == 5:
                if self.i + 4 > len(self.b):
                    raise self.error("truncated 32-bit field")
                yield num, wt, bytes(self.b[self.i:self.i + 4])
                self.i += 4
            else:
                raise self.error(f"wire type {wt} of field {num} is not supported")


def _expect(r: _Reader, num, wt, want, name):
    if wt != want:
        raise r.error(f"{name} (field {num}) has wire type {wt}, expected {want}")


def _int32(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def read_model(data: bytes, source: str = "tokenizer.model") -> SPModel:
    """The fields of a SentencePiece ModelProto that tokenization needs (see the module docstring)."""
    m = SPModel()
    top = _Reader(data, source, "ModelProto")
    for num, wt, v in top.fields():
        if num == 1:
            _expect(top, num, wt, 2, "pieces")
            if len(m.pieces) >= MAX_VOCAB:
                raise top.error(f"more than {MAX_VOCAB} pieces (limit)")
            r = _Reader(v, source, f"pieces[{len(m.pieces)}]")
            piece, score, typ = None, 0.0, NORMAL
            for n2, w2, v2 in r.fields():
                if n2 == 1:
                    _expect(r, n2, w2, 2, "piece")
                    if len(v2) > MAX_PIECE_BYTES:
                        raise r.error(f"piece longer than {MAX_PIECE_BYTES} bytes (limit)")
                    try:
                        piece = v2.decode("utf-8")
                    except UnicodeDecodeError:
                        raise r.error("piece is not valid UTF-8") from None
                elif n2 == 2:
                    _expect(r, n2, w2, 5, "score")
                    score = struct.unpack("<f", v2)[0]
                    if score != score:
                        raise r.error("score is NaN")
                elif n2 == 3:
                    _expect(r, n2, w2, 0, "type")
                    if v2 not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE):
                        raise r.error(f"unknown piece type {v2}")
                    typ = v2
            if piece is None:
                raise r.error("no piece string")
            m.pieces.append((piece, score, typ))
        elif num == 2:
            _expect(top, num, wt, 2, "trainer_spec")
            r = _Reader(v, source, "trainer_spec")
            for n2, w2, v2 in r.fields():
                if n2 == 3 and w2 == 0:
                    m.model_type = v2
                elif n2 == 35 and w2 == 0:
                    m.byte_fallback = bool(v2)
                elif n2 == 40 and w2 == 0:
                    m.unk_id = _int32(v2)
                elif n2 == 24 and w2 == 0:
                    m.treat_whitespace_as_suffix = bool(v2)
        elif num == 3:
            _expect(top, num, wt, 2, "normalizer_spec")
            r = _Reader(v, source, "normalizer_spec")
            for n2, w2, v2 in r.fields():
                if n2 == 1 and w2 == 2:
                    m.normalizer_name = v2.decode("utf-8", "replace")
                elif n2 == 2 and w2 == 2:
                    m.charsmap = v2
                elif n2 == 3 and w2 == 0:
                    m.add_dummy_prefix = bool(v2)
                elif n2 == 4 and w2 == 0:
                    m.remove_extra_whitespaces = bool(v2)
                elif n2 == 5 and w2 == 0:
                    m.escape_whitespaces = bool(v2)
    if not m.pieces:
        raise CheckpointError(f"{source}: not a valid SentencePiece model (no pieces)")
    if not 0 <= m.unk_id < len(m.pieces) or m.pieces[m.unk_id][2] != UNKNOWN:
        raise CheckpointError(f"{source}: SentencePiece unk_id {m.unk_id} does not name an unknown piece")
    seen = {}
    for i, (p, _, _) in enumerate(m.pieces):
        j = seen.setdefault(p, i)
        if j != i:
            raise CheckpointError(f"{source}: SentencePiece piece {i} {p[:40]!r} repeats piece {j}")
    return m


def build_tokenizer(m: SPModel, source: str = "tokenizer.model"):
    """A tokenizers.Tokenizer that encodes (without special tokens) and decodes as sentencepiece does."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    if m.model_type != BPE_MODEL:
        kind = {UNIGRAM: "unigram", WORD: "word", CHAR: "char"}.get(m.model_type, str(m.model_type))
        raise NotImplementedError(f"{source}: SentencePiece {kind} models are not supported (BPE models are)")
    if m.treat_whitespace_as_suffix:
        raise NotImplementedError(f"{source}: SentencePiece treat_whitespace_as_suffix is not supported")
    vocab = {p: i for i, (p, _, _) in enumerate(m.pieces)}
    mergeable = [(p, s) for p, s, t in m.pieces if t in (NORMAL, USER_DEFINED)]
    merges = _merges_from_scores([p for p, _ in mergeable], [s for _, s in mergeable], source)
    with tokenizers_call(source, "building the SentencePiece BPE model"):
        tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token=m.pieces[m.unk_id][0], fuse_unk=True,
                           byte_fallback=m.byte_fallback, dropout=None))
        norm = []
        if m.charsmap:
            norm.append(normalizers.Precompiled(m.charsmap))
        if m.remove_extra_whitespaces:
            norm += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
        if m.add_dummy_prefix:
            norm.append(normalizers.Prepend("\u2581"))
        if m.escape_whitespaces:
            norm.append(normalizers.Replace(" ", "\u2581"))
        tk.normalizer = normalizers.Sequence(norm) if norm else None
        dec = [decoders.Replace("\u2581", " ")]
        if m.byte_fallback:
            dec.append(decoders.ByteFallback())
        dec.append(decoders.Fuse())
        if m.add_dummy_prefix:
            dec.append(decoders.Strip(content=" ", left=1, right=0))
        tk.decoder = decoders.Sequence(dec)
        # user-defined pieces are matched whole in the text (sentencepiece's prefix matcher), never split
        tk.add_tokens([AddedToken(p, normalized=False, special=False) for p, _, t in m.pieces if t == USER_DEFINED])
    return tk


def _decode_bytes(buf: bytes) -> str:
    """sentencepiece's byte-piece decoding: whole UTF-8 characters kept, every other byte one U+FFFD."""
    out, i, n = [], 0, len(buf)
    while i < n:
        c = buf[i]
        ln = 1 if c < 0x80 else 2 if 0xC2 <= c < 0xE0 else 3 if 0xE0 <= c < 0xF0 else 4 if 0xF0 <= c < 0xF5 else 0
        if ln and i + ln <= n:
            try:
                out.append(buf[i:i + ln].decode("utf-8"))
                i += ln
                continue
            except UnicodeDecodeError:
                pass
        out.append("\ufffd")
        i += 1
    return "".join(out)


def decode_pieces(m: SPModel, pieces, vocab: dict | None = None) -> str:
    """sentencepiece's DecodePieces: control pieces give nothing, the unknown piece " \u2047 ", byte pieces their
    bytes (decoded together, see _decode_bytes), a string that is no piece itself; "\u2581" becomes a space, and the
    first text-giving piece loses its dummy-prefix "\u2581" (a lone "\u2581" counts as giving text). `vocab` (piece -> id) may be passed to save
    rebuilding it."""
    vocab = vocab if vocab is not None else {p: i for i, (p, _, _) in enumerate(m.pieces)}
    out, buf, bos = [], bytearray(), True
    for p in pieces:
        i = vocab.get(p)
        t = m.pieces[i][2] if i is not None else None
        if t == BYTE and len(p) == 6 and p.startswith("<0x") and p.endswith(">"):
            buf.append(int(p[3:5], 16))
            continue
        if buf:
            text = _decode_bytes(bytes(buf))
            buf.clear()
            out.append(text)
            bos = bos and not text
        if i is None:
            surface = p
        elif t == CONTROL:
            surface = ""
        elif t == UNKNOWN:
            surface = " \u2047 "
        else:
            surface = p
            if bos and m.add_dummy_prefix and surface.startswith("\u2581"):
                surface = surface[1:]
            if m.escape_whitespaces:
                surface = surface.replace("\u2581", " ")
            bos = False  # (a lone "\u2581" gives no text, yet ends the dummy prefix: sentencepiece does so)
        out.append(surface)
        bos = bos and not surface
    if buf:
        out.append(_decode_bytes(bytes(buf)))
    return "".join(out)
