"""Build torch zip checkpoints byte by byte for tests (numpy, struct and zipfile only; no torch).

    sd = {"w": Tensor("torch FloatStorage", "0", np.ones((2, 3), np.float32))}
    write(path, state_dict_pickle(sd), storages_of(sd))

`state_dict_pickle` writes the opcodes torch.save writes (protocol 2: an OrderedDict REDUCEd from
GLOBAL 'collections OrderedDict', SETITEMS of names -> _rebuild_tensor_v2(BINPERSID storage, offset,
size, stride, False, OrderedDict())); the pieces (`op`, `uni`, `num`, `glob`, ...) build hostile variants.
"""
import struct
import zipfile

import numpy as np

PROTO2 = b"\x80\x02"
STOP = b"."
MARK = b"("
TUPLE = b"t"
EMPTY_TUPLE = b")"
REDUCE = b"R"
SETITEM = b"s"
SETITEMS = b"u"
BINPERSID = b"Q"
NEWFALSE = b"\x89"
EMPTY_DICT = b"}"


def uni(s: str) -> bytes:
    b = s.encode("utf-8")
    return b"X" + struct.pack("<I", len(b)) + b


def num(n: int) -> bytes:
    if 0 <= n < 256:
        return b"K" + bytes([n])
    if 0 <= n < 65536:
        return b"M" + struct.pack("<H", n)
    if -(2 ** 31) <= n < 2 ** 31:
        return b"J" + struct.pack("<i", n)
    k = (n.bit_length() + 8) // 8
    return b"\x8a" + bytes([k]) + n.to_bytes(k, "little", signed=True)


def glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def tup(*parts: bytes) -> bytes:
    return MARK + b"".join(parts) + TUPLE


def ordered_dict() -> bytes:
    return glob("collections", "OrderedDict") + EMPTY_TUPLE + REDUCE


class Tensor:
    """A tensor as torch.save pickles it: storage (type global 'module name', key, numel, data bytes),
    storage offset, size, stride."""

    def __init__(self, storage_type, key, storage, offset=0, size=None, stride=None, numel=None):
        self.storage_type, self.key = storage_type, key
        self.data = np.ascontiguousarray(storage).tobytes()
        arr = np.asarray(storage)
        self.numel = arr.size if numel is None else numel
        self.offset = offset
        self.size = tuple(arr.shape) if size is None else tuple(size)
        if stride is None:
            stride, acc = [], 1
            for d in reversed(self.size):
                stride.insert(0, acc)
                acc *= d
        self.stride = tuple(stride)

    def pickle(self) -> bytes:
        mod, name = self.storage_type.split(" ")
        pid = tup(uni("storage"), glob(mod, name), uni(self.key), uni("cpu"), num(self.numel)) + BINPERSID
        return (glob("torch._utils", "_rebuild_tensor_v2") +
                tup(pid, num(self.offset), tup(*map(num, self.size)), tup(*map(num, self.stride)), NEWFALSE,
                    ordered_dict()) + REDUCE)


def state_dict_pickle(sd: dict) -> bytes:
    body = b"".join(uni(k) + v.pickle() if isinstance(v, Tensor) else uni(k) + v for k, v in sd.items())
    return PROTO2 + ordered_dict() + MARK + body + SETITEMS + STOP


def storages_of(sd: dict) -> dict:
    return {v.key: v.data for v in sd.values() if isinstance(v, Tensor)}


def zip_bytes(entries, compression=zipfile.ZIP_STORED) -> bytes:
    """A zip archive of (name, bytes) entries, in order."""
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = compression
            z.writestr(zi, data)
    return buf.getvalue()


def archive(pkl: bytes, storages: dict, prefix="archive", byteorder=b"little", extra=(), compress_storages=False):
    """The entries torch.save writes: data.pkl, byteorder, data/<key>..., version."""
    entries = [(f"{prefix}/data.pkl", pkl)]
    if byteorder is not None:
        entries.append((f"{prefix}/byteorder", byteorder))
    entries += [(f"{prefix}/data/{k}", v) for k, v in storages.items()]
    entries.append((f"{prefix}/version", b"3\n"))
    entries += list(extra)
    if not compress_storages:
        return zip_bytes(entries)
    import io
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED
            z.writestr(zi, data)
    return buf.getvalue()


def write(path, pkl: bytes, storages: dict, **kw) -> str:
    with open(path, "wb") as fh:
        fh.write(archive(pkl, storages, **kw))
    return str(path)
