"""PyTorch `.bin` checkpoints (torch.save's zip format) read without running any pickle code.

A `pytorch_model.bin` written by `torch.save(state_dict, path)` (torch >= 1.6) is a zip archive:

    <archive>/data.pkl        the state dict, pickled (protocol 2): names -> tensors whose storages
                              are "persistent ids" ('storage', StorageType, key, location, numel)
    <archive>/data/<key>      one entry per storage: its raw little-endian bytes, stored (never
                              compressed) and 64-byte aligned in the file
    <archive>/byteorder       "little" (torch >= 1.13; absent before, meaning little)
    <archive>/version, .format_version, .storage_alignment, .data/serialization_id (not needed)

`torch.load` runs the pickle, which may call any importable function: a checkpoint is code. This
module never does. It interprets the pickle opcodes itself, and only the few that `torch.save` of a
state dict emits (the set torch's own `weights_only` unpickler accepts, plus the protocol-4 framing
ops of `torch.save(..., pickle_protocol=4)`). Globals are names checked against a fixed table and
*modelled*, never imported or called: `collections.OrderedDict()` becomes a dict,
`torch._utils._rebuild_tensor_v2(...)` becomes a record (dtype, shape, byte range), a storage type
becomes its dtype. Any other opcode or global raises CheckpointError naming it and its byte
position; nothing is executed, nothing is imported.

The result is a table (name, dtype, shape, absolute file offset, nbytes) per tensor, handed to
`_C.SafetensorsFile(path, table=...)`: the C core checks it again, maps the file and reads every
tensor straight from its offset with the same pipeline as safetensors (no copy here: this module
reads only the zip directory, the local headers and data.pkl).

Decisions (each refusal is a CheckpointError naming the file and the culprit):
- The zip directory is parsed here, not by `zipfile`: its end record and central directory are
  size-capped before they are read (zipfile would read a central directory of any claimed size),
  every offset is checked against the file, and each entry's local header is read to find where
  its data starts (signature, method and name must agree with the central directory).
- Entries read (data.pkl, byteorder, storages) must be stored: torch.save never compresses;
  a re-zipped (deflated) checkpoint is refused with how to fix it. Encrypted entries are refused.
- Tensors must be row-major contiguous views of their storage (dimensions of size 1 may have any
  stride): a state dict of a Hugging Face model always is; a transposed view is refused (save
  `t.contiguous()`). Several tensors may share a storage (tied weights), at any element offset.
- The top level must be a flat dict of str -> tensor, as transformers saves shards. A nested
  checkpoint ({'model': state_dict}, a training checkpoint with an optimizer) is refused with a
  message naming the key; so are non-tensor values.
- The legacy pre-1.6 format (a bare pickle stream, not a zip) is refused with how to convert it.
"""
from __future__ import annotations

import os
import struct
import zlib

from . import _C
from ._files import open_regular, show

CheckpointError = _C.CheckpointError

MiB = 1 << 20
PICKLE_LIMIT = 64 * MiB     # data.pkl: ~100 bytes per tensor; a 100k-tensor state dict is ~10 MB
DIRECTORY_LIMIT = 64 * MiB  # the zip's central directory: ~100 bytes per entry
MARK_DEPTH_LIMIT = 64       # nested MARKs; torch.save writes 3
MAX_DIMS = 8                # as safetensors (csrc/safetensors.h FL_ST_MAX_DIMS)
MAX_INT = (1 << 63) - 1     # offsets, sizes, strides, element counts: int64 in the core

# ---------------------------------------------------------------------------------------------
# What a state dict's pickle may name. Each is data for the interpreter below, never imported.
# ---------------------------------------------------------------------------------------------
# typed storages (torch.save of torch < 2.x and >= 2.x alike writes these for the classic dtypes):
# persistent id numel counts elements of this type
_TYPED_STORAGE = {
    "torch.FloatStorage": "F32", "torch.HalfStorage": "F16", "torch.BFloat16Storage": "BF16",
    "torch.DoubleStorage": "F64", "torch.LongStorage": "I64", "torch.IntStorage": "I32",
    "torch.ShortStorage": "I16", "torch.CharStorage": "I8", "torch.ByteStorage": "U8", "torch.BoolStorage": "BOOL",
}
# the untyped storage of _rebuild_tensor_v3 (torch >= 2.1 for uint16/32/64 and float8): numel counts bytes
_UNTYPED_STORAGE = "torch.storage.UntypedStorage"
# dtype globals: the 7th argument of _rebuild_tensor_v3
_DTYPES = {
    "torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64",
    "torch.int64": "I64", "torch.int32": "I32", "torch.int16": "I16", "torch.int8": "I8", "torch.uint8": "U8",
    "torch.bool": "BOOL", "torch.uint16": "U16", "torch.uint32": "U32", "torch.uint64": "U64",
    "torch.float8_e4m3fn": "F8_E4M3", "torch.float8_e5m2": "F8_E5M2",
}
_ITEMSIZE = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
             "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
_ORDERED_DICT = "collections.OrderedDict"
_REBUILD_V2 = "torch._utils._rebuild_tensor_v2"
_REBUILD_V3 = "torch._utils._rebuild_tensor_v3"
_REBUILD_PARAM = "torch._utils._rebuild_parameter"
ALLOWED_GLOBALS = frozenset([_ORDERED_DICT, _REBUILD_V2, _REBUILD_V3, _REBUILD_PARAM, _UNTYPED_STORAGE,
                             *_TYPED_STORAGE, *_DTYPES])
# names torch's weights_only loader knows that fastload has no use for: a more helpful refusal
_UNSUPPORTED_HINT = {
    "torch.ComplexFloatStorage": "complex tensors are not supported",
    "torch.ComplexDoubleStorage": "complex tensors are not supported",
    **{f"torch.{q}Storage": "torch-quantised tensors are not supported"
       for q in ("QInt8", "QUInt8", "QInt32", "QUInt4x2", "QUInt2x4")},
    "torch._utils._rebuild_qtensor": "torch-quantised tensors are not supported",
    "torch._utils._rebuild_sparse_tensor": "sparse tensors are not supported",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta tensors have no data",
    "torch._utils._rebuild_parameter_with_state": "parameters with Python state are not supported",
    "torch._tensor._rebuild_from_type_v2": "tensor subclasses are not supported",
    "torch._utils._rebuild_wrapper_subclass": "tensor subclasses are not supported",
}


class _Global:
    """A GLOBAL that passed the allowlist: only its name. Nothing is imported."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name


class _ODict(dict):
    """collections.OrderedDict(): a dict (the only object BUILD may set state on, as torch's loader)."""
    __slots__ = ()


class _Storage:
    """A storage entry of the zip: dtype (None: untyped bytes), its byte size, where its data starts.
    `problem`: why its bytes cannot be used (no such entry, larger than its entry), raised once a state dict
    key names a tensor of it, so that the message can name the tensor."""
    __slots__ = ("key", "dtype", "nbytes", "offset", "problem")

    def __init__(self, key, dtype, nbytes, offset, problem=None):
        self.key, self.dtype, self.nbytes, self.offset, self.problem = key, dtype, nbytes, offset, problem


class _Tensor:
    """A contiguous tensor: dtype (safetensors spelling), shape, absolute file offset, nbytes; or the
    `problem` (not contiguous, outside its storage) raised by _table() with the tensor's name."""
    __slots__ = ("dtype", "shape", "offset", "nbytes", "problem")

    def __init__(self, dtype, shape, offset, nbytes, problem=None):
        self.dtype, self.shape, self.offset, self.nbytes, self.problem = dtype, shape, offset, nbytes, problem


def _what(obj) -> str:
    """A short description of an interpreted value for messages (never a repr of nested data: a hostile
    pickle can nest tuples deeper than repr's recursion limit)."""
    if isinstance(obj, _Global):
        return f"global {obj.name}"
    if isinstance(obj, _Tensor):
        return "a tensor"
    if isinstance(obj, _Storage):
        return "a storage"
    if isinstance(obj, str):
        return f"the string {show(obj, 60)}"
    if obj is None or isinstance(obj, (bool, float)):
        return repr(obj)
    if isinstance(obj, int):
        return repr(obj) if abs(obj) < 10 ** 20 else "a huge integer"
    if isinstance(obj, tuple):
        return f"a tuple of {len(obj)}"
    return {dict: "a dict", _ODict: "an OrderedDict", list: "a list"}.get(type(obj), type(obj).__name__)


# ---------------------------------------------------------------------------------------------
# The zip container
# ---------------------------------------------------------------------------------------------
class _Entry:
    __slots__ = ("name", "method", "flags", "crc", "csize", "usize", "header")

    def __init__(self, name, method, flags, crc, csize, usize, header):
        self.name, self.method, self.flags, self.crc = name, method, flags, crc
        self.csize, self.usize, self.header = csize, usize, header


class _Zip:
    """The central directory of a zip held open by fd; data offsets come from the local headers."""
    _EOCD = struct.Struct("<4sHHHHIIH")          # end of central directory, 22 bytes
    _LOC64 = struct.Struct("<4sIQI")             # ZIP64 end of central directory locator, 20 bytes
    _EOCD64 = struct.Struct("<4sQHHIIQQQQ")      # ZIP64 end of central directory record, 56 bytes
    _CEN = struct.Struct("<4sHHHHHHIIIHHHHHII")  # central directory file header, 46 bytes
    _LOC = struct.Struct("<4sHHHHHIIIHH")        # local file header, 30 bytes

    def __init__(self, fd, size, shown):
        self.fd, self.size, self.shown = fd, size, shown
        self.entries = {}   # name -> _Entry
        self.order = []     # names in directory order
        self._read_directory()

    def err(self, msg):
        return CheckpointError(f"{self.shown}: {msg}")

    def pread(self, n, off, what):
        if n < 0 or off < 0 or off + n > self.size:
            raise self.err(f"{what} (bytes {off}..{off + n}) lies outside the file ({self.size} bytes; truncated?)")
        got = os.pread(self.fd, n, off)
        if len(got) != n:
            raise self.err(f"file ended while reading {what} (did it change while being read?)")
        return got

    def _read_directory(self):
        trunc = "truncated, or not a complete zip archive"
        if self.size < self._EOCD.size:
            raise self.err(f"file is {self.size} bytes, too short for a zip archive ({trunc})")
        tail_len = min(self.size, self._EOCD.size + 0xFFFF)  # the end record and a comment of at most 64 KiB
        tail = self.pread(tail_len, self.size - tail_len, "the end of the zip archive")
        at = tail.rfind(b"PK\x05\x06")
        while at >= 0 and (at + self._EOCD.size > len(tail) or
                           at + self._EOCD.size + struct.unpack_from("<H", tail, at + 20)[0] != len(tail)):
            at = tail.rfind(b"PK\x05\x06", 0, at)  # a signature inside the comment: keep looking
        if at < 0:
            raise self.err(f"no zip end-of-central-directory record ({trunc})")
        eocd_pos = self.size - tail_len + at
        _, disk, cd_disk, n_disk, n_total, cd_size, cd_off, _ = self._EOCD.unpack_from(tail, at)
        end_of_cd = eocd_pos
        loc_pos = eocd_pos - self._LOC64.size
        if loc_pos >= 0 and self.pread(4, loc_pos, "the ZIP64 locator") == b"PK\x06\x07":
            _, disk64, rec_off, n_disks = self._LOC64.unpack(self.pread(self._LOC64.size, loc_pos, "the ZIP64 locator"))
            if disk64 != 0 or n_disks > 1:
                raise self.err("multi-volume zip archives are not supported")
            if rec_off > loc_pos - self._EOCD64.size:
                raise self.err(f"the ZIP64 end record offset {rec_off} lies outside the file ({trunc})")
            rec = self._EOCD64.unpack(self.pread(self._EOCD64.size, rec_off, "the ZIP64 end record"))
            if rec[0] != b"PK\x06\x06":
                raise self.err(f"no ZIP64 end record at offset {rec_off} ({trunc})")
            _, _, _, _, disk, cd_disk, n_disk, n_total, cd_size, cd_off = rec
            end_of_cd = rec_off
        elif 0xFFFF in (n_disk, n_total) or 0xFFFFFFFF in (cd_size, cd_off):
            raise self.err(f"the zip end record needs a ZIP64 record, which is missing ({trunc})")
        if disk != 0 or cd_disk != 0 or n_disk != n_total:
            raise self.err("multi-volume zip archives are not supported")
        if cd_size > DIRECTORY_LIMIT:
            raise self.err(f"the zip central directory is {cd_size} bytes, over the limit of {DIRECTORY_LIMIT}")
        if cd_off + cd_size > end_of_cd:
            raise self.err(f"the zip central directory (offset {cd_off}, {cd_size} bytes) runs past its end "
                           f"record at {end_of_cd} ({trunc})")
        if n_total > cd_size // self._CEN.size:
            raise self.err(f"the zip end record claims {n_total} entries, more than a central directory of "
                           f"{cd_size} bytes holds")
        self.cd_off = cd_off
        cd = self.pread(cd_size, cd_off, "the zip central directory")
        p = 0
        for i in range(n_total):
            if p + self._CEN.size > len(cd):
                raise self.err(f"zip central directory entry {i} runs past the directory's end")
            (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, disk_start, _, _,
             header) = self._CEN.unpack_from(cd, p)
            if sig != b"PK\x01\x02":
                raise self.err(f"zip central directory entry {i} has a bad signature (corrupt archive)")
            q = p + self._CEN.size
            if q + nlen + elen + clen > len(cd):
                raise self.err(f"zip central directory entry {i} runs past the directory's end")
            raw_name, extra = cd[q:q + nlen], cd[q + nlen:q + nlen + elen]
            p = q + nlen + elen + clen
            try:
                name = raw_name.decode("utf-8" if flags & 0x800 else "cp437")
            except UnicodeDecodeError:
                raise self.err(f"zip entry {i} has a name that is not valid UTF-8") from None
            # ZIP64 extended information (id 1): the 64-bit values of the fields saturated at 0xFFFFFFFF
            need = [k for k, v in (("usize", usize), ("csize", csize), ("header", header)) if v == 0xFFFFFFFF]
            if disk_start == 0xFFFF:
                need.append("disk")
            if need:
                vals = self._zip64_extra(extra, need, name)
                usize, csize, header = (vals.get(k, v) for k, v in (("usize", usize), ("csize", csize),
                                                                    ("header", header)))
                disk_start = vals.get("disk", disk_start)
            if disk_start != 0:
                raise self.err(f"zip entry {show(name)} lies on another volume (multi-volume archives are not supported)")
            if name in self.entries:
                raise self.err(f"zip entry {show(name)} appears twice in the central directory")
            self.entries[name] = _Entry(name, method, flags, crc, csize, usize, header)
            self.order.append(name)

    def _zip64_extra(self, extra, need, name):
        p = 0
        while p + 4 <= len(extra):
            tag, n = struct.unpack_from("<HH", extra, p)
            if p + 4 + n > len(extra):
                break
            if tag == 1:
                if n < 8 * len([k for k in need if k != "disk"]) + 4 * ("disk" in need):
                    break
                vals, q = {}, p + 4
                for k in need:
                    if k == "disk":
                        vals[k] = struct.unpack_from("<I", extra, q)[0]
                        q += 4
                    else:
                        vals[k] = struct.unpack_from("<Q", extra, q)[0]
                        q += 8
                return vals
            p += 4 + n
        raise self.err(f"zip entry {show(name)} has 32-bit sizes saturated but no valid ZIP64 extra field")

    def data_range(self, name, what):
        """(offset, size) of a stored entry's data, checked against its local header and the file."""
        e = self.entries[name]
        if e.flags & 0x1:
            raise self.err(f"{what}: zip entry {show(name)} is encrypted")
        if e.method != 0:
            raise self.err(f"{what}: compressed entry {show(name)} (zip method {e.method}); torch.save writes every "
                           "entry stored (uncompressed) so that tensors can be read in place: the file was re-zipped "
                           "by another tool. Re-save it with torch.save (or convert it to safetensors)")
        if e.csize != e.usize:
            raise self.err(f"{what}: stored zip entry {show(name)} has a compressed size {e.csize} different from its "
                           f"size {e.usize} (corrupt archive)")
        loc = self.pread(self._LOC.size, e.header, f"the local header of zip entry {show(name)}")
        sig, _, _, method, _, _, _, _, _, nlen, elen = self._LOC.unpack(loc)
        if sig != b"PK\x03\x04":
            raise self.err(f"zip entry {show(name)}: no local header at offset {e.header} (corrupt archive)")
        if method != e.method:
            raise self.err(f"zip entry {show(name)}: the local header's method {method} differs from the central "
                           f"directory's {e.method} (corrupt archive)")
        if self.pread(nlen, e.header + self._LOC.size, f"the name of zip entry {show(name)}") != name.encode(
                "utf-8" if e.flags & 0x800 else "cp437"):
            raise self.err(f"zip entry {show(name)}: the local header names another file (corrupt archive)")
        start = e.header + self._LOC.size + nlen + elen
        if start + e.usize > self.cd_off:
            raise self.err(f"zip entry {show(name)}: its {e.usize} bytes at offset {start} run past the start of the "
                           f"central directory at {self.cd_off} (truncated or corrupt archive)")
        return start, e.usize

    def read(self, name, limit, what):
        off, n = self.data_range(name, what)
        if n > limit:
            raise self.err(f"{what}: zip entry {show(name)} is {n} bytes, over the limit of {limit}")
        data = self.pread(n, off, f"zip entry {show(name)}")
        if zlib.crc32(data) != self.entries[name].crc:
            raise self.err(f"{what}: zip entry {show(name)} fails its CRC check (corrupt file)")
        return data


# ---------------------------------------------------------------------------------------------
# The pickle interpreter
# ---------------------------------------------------------------------------------------------
def _opcode_names():
    # pickletools holds the opcode table as data (names and codes); nothing in it runs pickles
    import pickletools
    return {op.code.encode("latin-1")[0]: op.name for op in pickletools.opcodes}


_OPNAMES = None


class _Unpickler:
    """Interprets data.pkl. Values: None, bool, int, float, str, tuple, list, dict/_ODict, _Global,
    _Storage, _Tensor. Nothing else can be built, so nothing else can run."""

    def __init__(self, data, zf, prefix, shown):
        self.data, self.zf, self.prefix, self.shown = data, zf, prefix, shown
        self.storages = {}  # key -> _Storage (a storage is pickled once, later tensors reuse the memo)
        self.pos = 0

    def err(self, msg, at=None):
        return CheckpointError(f"{self.shown}: data.pkl byte {self.op_at if at is None else at}: {msg}")

    def take(self, n):
        p = self.pos
        if n > len(self.data) - p:
            raise self.err(f"{self.opname} needs {n} bytes but data.pkl ends at byte {len(self.data)} (truncated)")
        self.pos = p + n
        return self.data[p:p + n]

    def u8(self):
        return self.take(1)[0]

    def line(self):
        end = self.data.find(b"\n", self.pos, self.pos + 256)
        if end < 0:
            raise self.err(f"{self.opname}: no newline-terminated name within 256 bytes")
        raw = self.data[self.pos:end]
        self.pos = end + 1
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise self.err(f"{self.opname}: a name that is not ASCII") from None

    def text(self, n):
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.err(f"{self.opname}: a string that is not valid UTF-8") from None

    def pop(self):
        if not self.stack:
            raise self.err(f"{self.opname} on an empty stack" + (" (after MARK)" if self.marks else ""))
        return self.stack.pop()

    def top(self):
        if not self.stack:
            raise self.err(f"{self.opname} on an empty stack" + (" (after MARK)" if self.marks else ""))
        return self.stack[-1]

    def pop_mark(self):
        if not self.marks:
            raise self.err(f"{self.opname} without a MARK")
        items = self.stack
        self.stack = self.marks.pop()
        return items

    def glob(self, module, name):
        full = f"{module}.{name}"
        if full not in ALLOWED_GLOBALS:
            hint = _UNSUPPORTED_HINT.get(full)
            raise self.err(f"global {show(full, 120)} is not allowed: a state dict written by torch.save names only "
                           "collections.OrderedDict, torch._utils._rebuild_tensor_v2/_v3, _rebuild_parameter, storage "
                           "types and dtypes" + (f" ({hint})" if hint else "") + "; fastload never imports or runs what a "
                           "checkpoint names")
        return _Global(full)

    def run(self):
        global _OPNAMES
        if _OPNAMES is None:
            _OPNAMES = _opcode_names()
        data = self.data
        self.stack, self.marks, self.memo = [], [], {}
        n = len(data)
        while True:
            if self.pos >= n:
                raise self.err("data.pkl ends without a STOP opcode (truncated)", at=self.pos)
            self.op_at = self.pos
            op = data[self.pos]
            self.pos += 1
            self.opname = _OPNAMES.get(op, f"opcode 0x{op:02x}")
            self.step(op)
            if op == 0x2E:  # STOP
                break
        if self.pos != n:
            raise self.err(f"{n - self.pos} bytes follow STOP", at=self.pos)
        return self.result

    def step(self, op):  # noqa: C901 (one branch per opcode, as pickle's own tables)
        st = self.stack
        if op == 0x80:    # PROTO
            proto = self.u8()
            if not 2 <= proto <= 5:
                raise self.err(f"pickle protocol {proto} (torch.save writes 2)")
        elif op == 0x95:  # FRAME: a length hint for buffered readers; the bytes are read as they come
            (size,) = struct.unpack("<Q", self.take(8))
            if size > len(self.data) - self.pos:
                raise self.err(f"FRAME of {size} bytes runs past the end of data.pkl")
        elif op == 0x2E:  # STOP
            if self.marks or len(st) != 1:
                raise self.err(f"STOP with {len(st)} values on the stack and {len(self.marks)} open MARKs "
                               "(one value expected)")
            self.result = st.pop()
        elif op == 0x28:  # MARK
            if len(self.marks) >= MARK_DEPTH_LIMIT:
                raise self.err(f"MARKs nested deeper than {MARK_DEPTH_LIMIT}")
            self.marks.append(st)
            self.stack = []
        elif op == 0x7D:  # EMPTY_DICT
            st.append({})
        elif op == 0x5D:  # EMPTY_LIST
            st.append([])
        elif op == 0x29:  # EMPTY_TUPLE
            st.append(())
        elif op == 0x4E:  # NONE
            st.append(None)
        elif op == 0x88:  # NEWTRUE
            st.append(True)
        elif op == 0x89:  # NEWFALSE
            st.append(False)
        elif op == 0x4A:  # BININT
            st.append(struct.unpack("<i", self.take(4))[0])
        elif op == 0x4B:  # BININT1
            st.append(self.u8())
        elif op == 0x4D:  # BININT2
            st.append(struct.unpack("<H", self.take(2))[0])
        elif op == 0x8A:  # LONG1
            k = self.u8()
            st.append(int.from_bytes(self.take(k), "little", signed=True))
        elif op == 0x47:  # BINFLOAT
            st.append(struct.unpack(">d", self.take(8))[0])
        elif op == 0x58:  # BINUNICODE
            (k,) = struct.unpack("<I", self.take(4))
            st.append(self.text(k))
        elif op == 0x8C:  # SHORT_BINUNICODE
            st.append(self.text(self.u8()))
        elif op == 0x55:  # SHORT_BINSTRING (protocol 2 str of Python 2; torch decodes it as ASCII)
            raw = self.take(self.u8())
            try:
                st.append(raw.decode("ascii"))
            except UnicodeDecodeError:
                raise self.err("SHORT_BINSTRING that is not ASCII") from None
        elif op == 0x74:  # TUPLE
            st = self.pop_mark()
            self.stack.append(tuple(st))
        elif op == 0x85:  # TUPLE1
            st.append((self.pop(),))
        elif op == 0x86:  # TUPLE2
            b, a = self.pop(), self.pop()
            st.append((a, b))
        elif op == 0x87:  # TUPLE3
            c, b, a = self.pop(), self.pop(), self.pop()
            st.append((a, b, c))
        elif op == 0x61:  # APPEND
            v = self.pop()
            self.list_target().append(v)
        elif op == 0x65:  # APPENDS
            items = self.pop_mark()
            self.list_target().extend(items)
        elif op == 0x73:  # SETITEM
            v, k = self.pop(), self.pop()
            self.dict_target()[self.key(k)] = v
        elif op == 0x75:  # SETITEMS
            items = self.pop_mark()
            if len(items) % 2:
                raise self.err("SETITEMS with an odd number of values (a key without a value)")
            d = self.dict_target()
            for i in range(0, len(items), 2):
                d[self.key(items[i])] = items[i + 1]
        elif op in (0x71, 0x72, 0x94):  # BINPUT, LONG_BINPUT, MEMOIZE
            idx = self.u8() if op == 0x71 else struct.unpack("<I", self.take(4))[0] if op == 0x72 else len(self.memo)
            self.memo[idx] = self.top()
        elif op in (0x68, 0x6A):  # BINGET, LONG_BINGET
            idx = self.u8() if op == 0x68 else struct.unpack("<I", self.take(4))[0]
            if idx not in self.memo:
                raise self.err(f"{self.opname} {idx}: no such memo entry")
            st.append(self.memo[idx])
        elif op == 0x63:  # GLOBAL
            module = self.line()
            name = self.line()
            st.append(self.glob(module, name))
        elif op == 0x93:  # STACK_GLOBAL (protocol 4)
            name, module = self.pop(), self.pop()
            if type(module) is not str or type(name) is not str:
                raise self.err("STACK_GLOBAL needs two strings (module, name)")
            st.append(self.glob(module, name))
        elif op == 0x52:  # REDUCE
            args = self.pop()
            func = self.top()
            if not isinstance(func, _Global):
                raise self.err(f"REDUCE calls {_what(func)}, which is not a function")
            if type(args) is not tuple:
                raise self.err(f"REDUCE of {func.name} with {_what(args)} as arguments (a tuple expected)")
            st[-1] = self.reduce(func.name, args)
        elif op == 0x51:  # BINPERSID
            st.append(self.storage(self.pop()))
        elif op == 0x62:  # BUILD: only the OrderedDict of a state dict, whose state is its _metadata attribute
            state = self.pop()
            inst = self.top()
            if type(inst) is not _ODict or type(state) is not dict:
                raise self.err(f"BUILD of {_what(inst)} with {_what(state)}: only an OrderedDict's attributes "
                               "(a state dict's _metadata) may be set")
            # the attributes (module versions) are not needed: dropped
        else:
            raise self.err(f"{self.opname} (0x{op:02x}) is not an opcode torch.save writes for a state dict; "
                           "fastload interprets only those (it never runs pickle code)")

    def list_target(self):
        t = self.top()
        if type(t) is not list:
            raise self.err(f"{self.opname} to {_what(t)} (a list expected)")
        return t

    def dict_target(self):
        t = self.top()
        if type(t) not in (dict, _ODict):
            raise self.err(f"{self.opname} on {_what(t)} (a dict expected)")
        return t

    def key(self, k):
        if k is not None and type(k) not in (str, int, float, bool):
            raise self.err(f"{self.opname} with {_what(k)} as a dict key")
        return k

    def int_arg(self, v, what, lo=0):
        if type(v) is not int or not lo <= v <= MAX_INT:
            raise self.err(f"{what} is {_what(v)} (an integer in [{lo}, 2^63) expected)")
        return v

    def storage(self, pid):
        if type(pid) is not tuple or len(pid) != 5 or pid[0] != "storage":
            raise self.err(f"persistent id {_what(pid)}: only ('storage', type, key, location, numel) is supported")
        _, stype, key, location, numel = pid
        if not isinstance(stype, _Global) or (stype.name not in _TYPED_STORAGE and stype.name != _UNTYPED_STORAGE):
            raise self.err(f"storage type {_what(stype)} is not a storage type")
        if type(key) is not str or type(location) is not str:
            raise self.err("a storage's key and location must be strings")
        numel = self.int_arg(numel, f"storage {show(key)} element count")
        dtype = _TYPED_STORAGE.get(stype.name)  # None: untyped, numel counts bytes
        nbytes = numel * (_ITEMSIZE[dtype] if dtype else 1)
        s = self.storages.get(key)
        if s is not None:
            if s.dtype != dtype or s.nbytes != nbytes:
                raise self.err(f"storage {show(key)} appears twice with different types or sizes")
            return s
        entry = f"{self.prefix}data/{key}"
        if entry not in self.zf.entries:
            s = _Storage(key, dtype, nbytes, 0, f"its storage {show(key)} has no entry {show(entry)} in the zip archive")
        else:
            off, size = self.zf.data_range(entry, f"storage {show(key)}")
            s = _Storage(key, dtype, nbytes, off, None if nbytes <= size else
                         f"its storage {show(key)} ({stype.name}, {numel} elements = {nbytes} bytes) is larger than "
                         f"its zip entry ({size} bytes)")
        self.storages[key] = s
        return s

    def reduce(self, fn, args):
        if fn == _ORDERED_DICT:
            if args:
                raise self.err(f"{fn} called with {len(args)} arguments (torch.save writes OrderedDict())")
            return _ODict()
        if fn == _REBUILD_PARAM:
            if len(args) != 3 or not isinstance(args[0], _Tensor):
                raise self.err(f"{fn} needs (tensor, requires_grad, hooks)")
            return args[0]
        if fn in (_REBUILD_V2, _REBUILD_V3):
            v3 = fn == _REBUILD_V3
            if not (6 + v3 <= len(args) <= 7 + v3):
                raise self.err(f"{fn} with {len(args)} arguments ({6 + v3} or {7 + v3} expected)")
            storage, offset, size, stride, requires_grad, hooks = args[:6]
            if not isinstance(storage, _Storage):
                raise self.err(f"{fn}: its first argument is {_what(storage)}, not a storage")
            if type(requires_grad) is not bool or type(hooks) not in (dict, _ODict):
                raise self.err(f"{fn}: requires_grad must be a bool and the hooks a dict")
            if hooks:
                raise self.err(f"{fn}: a tensor with backward hooks")
            if v3:
                dt = args[6]
                if not isinstance(dt, _Global) or dt.name not in _DTYPES:
                    raise self.err(f"{fn}: its dtype argument is {_what(dt)}, not a dtype")
                if storage.dtype is not None:
                    raise self.err(f"{fn} on a typed storage ({storage.key})")
                dtype = _DTYPES[dt.name]
            else:
                if storage.dtype is None:
                    raise self.err(f"{fn} on an untyped storage ({storage.key}): no dtype")
                dtype = storage.dtype
            return self.tensor(storage, dtype, offset, size, stride)
        raise self.err(f"REDUCE of {fn}, which is a type or dtype, not a function torch.save calls")

    def tensor(self, s, dtype, offset, size, stride):
        item = _ITEMSIZE[dtype]
        offset = self.int_arg(offset, "storage offset")
        if type(size) is not tuple or type(stride) is not tuple or len(size) != len(stride):
            raise self.err("a tensor's size and stride must be tuples of the same length")
        if len(size) > MAX_DIMS:
            raise self.err(f"a tensor with {len(size)} dimensions (at most {MAX_DIMS})")
        shape = tuple(self.int_arg(d, "a dimension") for d in size)
        strides = tuple(self.int_arg(d, "a stride") for d in stride)
        numel = 1
        for d in shape:
            numel *= d
        begin, nbytes = offset * item, numel * item  # Python ints: exact; bounded below before use
        # what is wrong with a well-formed tensor is raised by _table(), which knows its name
        problem = s.problem
        if problem is None and begin + nbytes > MAX_INT:
            problem = f"shape {list(shape)} at element offset {offset} is too large"
        if problem is None and numel:
            expect = 1
            for d, sd in zip(reversed(shape), reversed(strides)):
                if d != 1 and sd != expect:
                    problem = (f"not contiguous (shape {list(shape)}, stride {list(strides)}); fastload reads tensors "
                               "in place and needs them row-major contiguous: save t.contiguous() instead of a "
                               "transposed view")
                    break
                expect *= d
        if problem is None and numel and begin + nbytes > s.nbytes:
            problem = (f"shape {list(shape)} of {dtype} at element offset {offset} needs bytes {begin}..{begin + nbytes} "
                       f"of storage {show(s.key)}, which has {s.nbytes} bytes")
        if problem is not None:
            return _Tensor(dtype, shape, 0, 0, problem)
        return _Tensor(dtype, shape, s.offset + (begin if numel else 0), nbytes)


# ---------------------------------------------------------------------------------------------
# Entry points
# ---------------------------------------------------------------------------------------------
def read_table(path, shown=None):
    """[(name, dtype, shape, file offset, nbytes)] of the state dict in the torch zip file at `path`
    (a path already checked by fastload/_files.py); CheckpointError naming `shown` otherwise."""
    shown = path if shown is None else shown
    fd, st = open_regular(path, shown)
    try:
        head = os.pread(fd, 4, 0)
        if head != b"PK\x03\x04":
            if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
                raise CheckpointError(
                    f"{shown}: a PyTorch checkpoint in the legacy serialization format (a bare pickle stream, "
                    "written by torch < 1.6 or with _use_new_zipfile_serialization=False). fastload reads only the "
                    "zip format, whose tensors lie in place in the file. Convert it where torch is installed: "
                    "torch.save(torch.load(path, weights_only=True), path) (torch >= 1.6 writes the zip format), "
                    "or with transformers: model.save_pretrained(dir, safe_serialization=True)")
            raise CheckpointError(f"{shown}: not a PyTorch zip checkpoint (does not start with a zip local header"
                                  + ("; the file is empty)" if not head else ")"))
        zf = _Zip(fd, st.st_size, shown)
        if not zf.order:
            raise CheckpointError(f"{shown}: the zip archive has no entries")
        first = zf.order[0]
        prefix = first[:first.index("/") + 1] if "/" in first else ""
        if not prefix:
            raise CheckpointError(f"{shown}: zip entry {show(first)} is not inside an archive directory "
                                  "(torch.save writes <name>/data.pkl)")
        pkl_name = prefix + "data.pkl"
        if pkl_name not in zf.entries:
            raise CheckpointError(f"{shown}: no {show(pkl_name)} in the zip archive: not a torch.save checkpoint")
        bo = prefix + "byteorder"
        if bo in zf.entries:
            order = zf.read(bo, 16, "byteorder")
            if order != b"little":
                raise CheckpointError(f"{shown}: byteorder is {show(order[:16])}; only little-endian checkpoints are "
                                      "supported")
        data = zf.read(pkl_name, PICKLE_LIMIT, "the pickled state dict")
        obj = _Unpickler(data, zf, prefix, shown).run()
    finally:
        os.close(fd)
    return _table(obj, shown)


def _table(obj, shown):
    if type(obj) not in (dict, _ODict):
        raise CheckpointError(f"{shown}: the checkpoint holds {_what(obj)}, not a state dict (a dict of tensors)")
    table = []
    for name, v in obj.items():
        if type(name) is not str:
            raise CheckpointError(f"{shown}: state dict key {_what(name)} is not a string")
        if not name or "\x00" in name:
            raise CheckpointError(f"{shown}: state dict key {show(name)} is empty or contains NUL")
        if isinstance(v, _Tensor):
            if v.problem:
                raise CheckpointError(f"{shown}: tensor {show(name)}: {v.problem}")
            table.append((name, v.dtype, v.shape, v.offset, v.nbytes))
        elif type(v) in (dict, _ODict):
            raise CheckpointError(
                f"{shown}: key {show(name)} holds a dict, not a tensor: a nested checkpoint (e.g. "
                "{'model': state_dict} or a training checkpoint). fastload reads a flat state dict (name -> tensor) "
                f"as transformers saves it; re-save the inner dict: torch.save(ckpt[{show(name)}], path)")
        else:
            raise CheckpointError(f"{shown}: key {show(name)} holds {_what(v)}, not a tensor")
    return table


def open_file(path, shown=None):
    """A _C.SafetensorsFile over the torch zip file at `path`: the same object core.load reads
    safetensors shards through, built from the table read_table() checked."""
    return _C.SafetensorsFile(path, table=read_table(path, shown))
