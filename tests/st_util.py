"""A tiny safetensors writer for tests (numpy only), with ways to write broken files.

    write(path, {"w": np.ones((2, 3), np.float32), "b": ("BF16", bf16_bits(x))}, metadata={...})

A tensor is a numpy array (dtype mapped by NP_TO_ST) or a pair (st_dtype, array) whose array holds
the raw payload with the logical shape (BF16 as uint16 bits, F8 as uint8 bits). For broken files,
build the pieces with `layout()`, change the header dict or bytes, then `pack()` / `write_bytes()`.
"""
import json
import struct
from pathlib import Path

import numpy as np

NP_TO_ST = {
    np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
    np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(np.int16): "I16", np.dtype(np.uint16): "U16",
    np.dtype(np.int32): "I32", np.dtype(np.uint32): "U32", np.dtype(np.int64): "I64", np.dtype(np.uint64): "U64",
    np.dtype(np.bool_): "BOOL",
}
ST_SIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I8": 1, "U8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4,
           "I64": 8, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def bf16_bits(x):
    """float32 array -> bfloat16 bits as uint16 (round to nearest even; NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, dtype=np.float32))
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_to_f32(bits):
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def _payload(v):
    if isinstance(v, tuple):
        dt, arr = v
        arr = np.asarray(arr)  # (not ascontiguousarray: it turns 0-d into 1-d)
        return dt, list(arr.shape), arr.tobytes(order="C")
    arr = np.asarray(v)
    return NP_TO_ST[arr.dtype], list(arr.shape), arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes(order="C")


def layout(tensors, metadata=None):
    """(header dict, data bytes): tensors laid out back to back in the given order."""
    header, chunks, off = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    for name, v in tensors.items():
        dt, shape, raw = _payload(v)
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [off, off + len(raw)]}
        chunks.append(raw)
        off += len(raw)
    return header, b"".join(chunks)


def header_bytes(header, align=8):
    """JSON text of `header` (a dict, or a str/bytes taken as is), padded with spaces to `align`."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode("utf-8")
    if align and len(header) % align:
        header += b" " * (align - len(header) % align)
    return header


def pack(header, data=b"", align=8, length=None):
    """Whole file bytes. `length` overrides the 8-byte header length field."""
    h = header_bytes(header, align)
    n = len(h) if length is None else length
    return struct.pack("<Q", n) + h + data


def write_bytes(path, raw):
    with open(path, "wb") as fh:
        fh.write(raw)
    return str(path)


def write(path, tensors, metadata=None, align=8):
    header, data = layout(tensors, metadata)
    return write_bytes(path, pack(header, data, align))


def write_header(path, header, data=b"", align=8, length=None):
    """Write a file from a (possibly broken) header dict / JSON text and data bytes."""
    return write_bytes(path, pack(header, data, align, length))


def read_f32(path):
    """{name: float32 array} of a safetensors file holding F32 / BF16 tensors (the tiny fixtures' dtypes)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        buf = raw[8 + n + a:8 + n + b]
        if info["dtype"] == "BF16":
            v = bf16_to_f32(np.frombuffer(buf, np.uint16))
        else:
            assert info["dtype"] == "F32", info
            v = np.frombuffer(buf, np.float32)
        out[name] = np.array(v, np.float32).reshape(info["shape"])
    return out
