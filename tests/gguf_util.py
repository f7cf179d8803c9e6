"""A tiny GGUF writer for tests (numpy only), able to write broken files on purpose.

    w = GGUFWriter()
    w.add("general.architecture", "llama")                 # type inferred: str -> STRING
    w.add("llama.block_count", 2, T.UINT32)                # explicit type
    w.add("tokenizer.ggml.tokens", ["a", "b"])             # list of str -> ARRAY of STRING
    w.add("tokenizer.ggml.scores", [0.5, 1.0], T.ARRAY, T.FLOAT32)
    w.add_tensor("w", raw_bytes, GGML.Q4_0, ne=[64, 2])    # ne in ggml order (innermost first)
    data = w.to_bytes()                                    # or w.write(path)

Hooks for broken files: `to_bytes(magic=, version=, n_kv=, n_tensors=, data_size=, pad_data=)`;
`Raw(b"...")` as a value writes bytes verbatim after the type field; add_tensor(..., offset=,
type_id=, place=False) sets a tensor's declared offset / type id or leaves its bytes out of the
data section. Also `demo_gguf_path()`: where the demo model lies, or None.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

import numpy as np


class T:  # GGUF metadata value types
    UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)


class GGML:  # ggml tensor types
    F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q8_1 = 0, 1, 2, 3, 6, 7, 8, 9
    Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K = 10, 11, 12, 13, 14, 15
    IQ4_NL, I8, I16, I32, I64, F64, BF16 = 20, 24, 25, 26, 27, 28, 30


# (elements per block, bytes per block), as ggml
BLOCK = {
    GGML.F32: (1, 4), GGML.F16: (1, 2), GGML.BF16: (1, 2), GGML.F64: (1, 8),
    GGML.I8: (1, 1), GGML.I16: (1, 2), GGML.I32: (1, 4), GGML.I64: (1, 8),
    GGML.Q4_0: (32, 18), GGML.Q4_1: (32, 20), GGML.Q5_0: (32, 22), GGML.Q5_1: (32, 24),
    GGML.Q8_0: (32, 34), GGML.Q8_1: (32, 36), GGML.Q2_K: (256, 84), GGML.Q3_K: (256, 110),
    GGML.Q4_K: (256, 144), GGML.Q5_K: (256, 176), GGML.Q6_K: (256, 210), GGML.Q8_K: (256, 292),
    GGML.IQ4_NL: (32, 18),
}

_SCALAR_FMT = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
               T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}


@dataclass
class Raw:
    """Bytes written verbatim where a value would go (after the key and the type field)."""
    data: bytes


def gguf_str(s) -> bytes:
    b = s if isinstance(s, bytes) else str(s).encode("utf-8", "surrogateescape")
    return struct.pack("<Q", len(b)) + b


def _infer(v):
    if isinstance(v, bool):
        return T.BOOL
    if isinstance(v, int):
        return T.INT32 if -2**31 <= v < 2**31 else T.INT64
    if isinstance(v, float):
        return T.FLOAT32
    if isinstance(v, (str, bytes)):
        return T.STRING
    raise TypeError(f"cannot infer a GGUF type for {v!r}")


def encode_value(vtype: int, value, arr_type: int | None = None) -> bytes:
    if isinstance(value, Raw):
        return value.data
    if vtype == T.STRING:
        return gguf_str(value)
    if vtype == T.ARRAY:
        value = list(value)
        if arr_type is None:
            arr_type = _infer(value[0]) if value else T.INT32
        if arr_type == T.ARRAY:  # nested arrays: value is a list of (elem_type, list)
            body = b"".join(struct.pack("<IQ", et, len(v)) + b"".join(encode_value(et, x) for x in v)
                            for et, v in value)
        elif arr_type == T.STRING:
            body = b"".join(gguf_str(x) for x in value)
        else:
            body = np.asarray(value, dtype=np.dtype(_SCALAR_FMT[arr_type])).tobytes() if value else b""
        return struct.pack("<IQ", arr_type, len(value)) + body
    return struct.pack(_SCALAR_FMT[vtype], value)


@dataclass
class Tensor:
    name: str
    data: bytes
    type_id: int
    ne: list
    offset: int | None = None   # declared offset (None: packed, aligned)
    place: bool = True          # write the bytes into the data section


@dataclass
class GGUFWriter:
    version: int = 3
    alignment: int = 32
    kvs: list = field(default_factory=list)
    tensors: list = field(default_factory=list)

    def add(self, key, value, vtype=None, arr_type=None):
        if vtype is None:
            if isinstance(value, Raw):
                raise TypeError("give the type of a Raw value")
            if isinstance(value, (list, tuple)):
                vtype = T.ARRAY
            else:
                vtype = _infer(value)
        self.kvs.append((key, vtype, value, arr_type))
        return self

    def add_tensor(self, name, data, type_id, ne, offset=None, place=True):
        if isinstance(data, np.ndarray):
            data = data.tobytes()
        self.tensors.append(Tensor(name, bytes(data), type_id, list(ne), offset, place))
        return self

    def layout(self):
        """Declared offsets of the tensors (data-section relative). Tensors without an explicit offset
        are packed in order, each aligned; explicit offsets do not move the packing cursor."""
        offs, pos = [], 0
        for t in self.tensors:
            if t.offset is not None:
                offs.append(t.offset)
                continue
            else:
                pos = -(-pos // self.alignment) * self.alignment
                offs.append(pos)
                pos += len(t.data)
        return offs

    def to_bytes(self, magic=b"GGUF", version=None, n_kv=None, n_tensors=None, data_size=None, pad_data=True):
        version = self.version if version is None else version
        out = bytearray(magic)
        out += struct.pack("<I", version)
        out += struct.pack("<QQ", len(self.tensors) if n_tensors is None else n_tensors,
                           len(self.kvs) if n_kv is None else n_kv)
        for key, vtype, value, arr_type in self.kvs:
            out += gguf_str(key) + struct.pack("<I", vtype) + encode_value(vtype, value, arr_type)
        offs = self.layout()
        for t, off in zip(self.tensors, offs):
            out += gguf_str(t.name) + struct.pack("<I", len(t.ne))
            out += b"".join(struct.pack("<Q", int(n)) for n in t.ne)
            out += struct.pack("<IQ", t.type_id, off)
        if pad_data:
            out += b"\0" * (-len(out) % self.alignment)
        end = max([o + len(t.data) for t, o in zip(self.tensors, offs) if t.place] + [0])
        if pad_data and self.tensors:
            end = -(-end // self.alignment) * self.alignment
        data = bytearray(end if data_size is None else max(data_size, end))
        for t, off in zip(self.tensors, offs):
            if t.place:
                data[off:off + len(t.data)] = t.data
        if data_size is not None:
            data = data[:data_size]
        return bytes(out + data)

    def write(self, path, **kw):
        data = self.to_bytes(**kw)
        with open(path, "wb") as f:
            f.write(data)
        return path


def demo_gguf_path():
    """The demo model's GGUF, or None: None when FASTLOAD_SKIP_DEMO=1; else
    fastload.demo.demo_model_path() if that module exists (it may fetch the file once, as the suite's
    conftest does), else $FASTLOAD_DEMO_GGUF."""
    if os.environ.get("FASTLOAD_SKIP_DEMO") == "1":
        return None
    cands = []
    try:
        from fastload import demo  # optional module
        p = demo.demo_model_path()
        if p:
            cands.append(str(p))
    except Exception:  # no such module, or no network to fetch with: fall back to the variable
        pass
    if os.environ.get("FASTLOAD_DEMO_GGUF"):
        cands.append(os.environ["FASTLOAD_DEMO_GGUF"])
    for p in cands:
        if os.path.isdir(p):
            ggufs = sorted(f for f in os.listdir(p) if f.endswith(".gguf"))
            if ggufs:
                return os.path.join(p, ggufs[0])
        elif os.path.isfile(p):
            return p
    return None
