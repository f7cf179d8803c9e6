"""fastload._C.GGUFFile: header validation, metadata, dequantisation (against numpy references).

The reference dequantisers below are written independently in vectorised numpy from ggml's block
layouts (ggml-quants.c dequantize_row_*); with floating-point contraction off in gguf.c the results
must agree bit for bit. Files are written with tests/gguf_util.py. The demo-model checks compare
against values the gguf package computed (tests/fixtures/smollm2_tokenizer.json, "gguf_reference").
"""
import faulthandler
import hashlib
import json
import os
import struct

import numpy as np
import pytest

from fastload import _C
from gguf_util import BLOCK, GGML, GGUFWriter, Raw, T, demo_gguf_path

faulthandler.enable()
CheckpointError = _C.CheckpointError
FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_tokenizer.json")
F32 = np.float32


# ------------------------------------------------------------------------------------------------
# numpy reference dequantisers: raw (n_blocks, block_bytes) uint8 -> (n_blocks, block_elems) float32
# ------------------------------------------------------------------------------------------------

def _f16(raw, off):
    return raw[:, off:off + 2].copy().view(np.float16).astype(F32)  # (nb, 1)


def _nibbles(qs):
    return np.concatenate([qs & 15, qs >> 4], axis=1)


def _bits32(raw, off):
    qh = raw[:, off:off + 4].copy().view("<u4")  # (nb, 1)
    return ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)


def ref_q4_0(raw):
    return (_nibbles(raw[:, 2:18]).astype(np.int32) - 8).astype(F32) * _f16(raw, 0)


def ref_q4_1(raw):
    return _nibbles(raw[:, 4:20]).astype(F32) * _f16(raw, 0) + _f16(raw, 2)


def ref_q5_0(raw):
    q = _nibbles(raw[:, 6:22]) | (_bits32(raw, 2) << 4)
    return (q.astype(np.int32) - 16).astype(F32) * _f16(raw, 0)


def ref_q5_1(raw):
    q = _nibbles(raw[:, 8:24]) | (_bits32(raw, 4) << 4)
    return q.astype(F32) * _f16(raw, 0) + _f16(raw, 2)


def ref_q8_0(raw):
    return raw[:, 2:34].copy().view(np.int8).astype(F32) * _f16(raw, 0)


def ref_q2_k(raw):
    nb = raw.shape[0]
    sc, qs, d, dmin = raw[:, :16], raw[:, 16:80], _f16(raw, 80), _f16(raw, 82)
    q = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(nb, 16, 16).astype(F32)            # groups of 16 ordered (128-chunk, shift, half)
    dl = (d * (sc & 15).astype(F32))[..., None]
    ml = (dmin * (sc >> 4).astype(F32))[..., None]
    return (dl * q - ml).reshape(nb, 256)


def ref_q3_k(raw):
    nb = raw.shape[0]
    hm, qs, s, d = raw[:, :32], raw[:, 32:96], raw[:, 96:108].astype(np.int32), _f16(raw, 108)
    j = np.arange(16)
    lo = np.where(j < 8, s[:, j % 8] & 15, s[:, j % 8] >> 4)
    hi = (s[:, 8 + j % 4] >> (2 * (j // 4))) & 3
    scales = (lo | (hi << 4)) - 32                      # (nb, 16)
    ql = (qs.reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 3
    bit = (np.arange(2).reshape(2, 1) * 4 + np.arange(4).reshape(1, 4)).astype(np.uint8)  # (2, 4)
    h = (hm.reshape(nb, 1, 1, 32) >> bit.reshape(1, 2, 4, 1)) & 1
    q = ql.astype(np.int32) - np.where(h == 1, 0, 4)
    q = q.reshape(nb, 16, 16).astype(F32)
    return ((d * scales.astype(F32))[..., None] * q).reshape(nb, 256)


def _scale_min_k4(s):
    s = s.astype(np.int32)
    sc = np.empty((s.shape[0], 8), np.int32)
    m = np.empty_like(sc)
    sc[:, :4], m[:, :4] = s[:, 0:4] & 63, s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(F32), m.astype(F32)


def ref_q4_k(raw):
    nb = raw.shape[0]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, m = _scale_min_k4(raw[:, 4:16])
    qs = raw[:, 16:144].reshape(nb, 4, 1, 32)
    q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32).astype(F32)
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(nb, 256)


def ref_q5_k(raw):
    nb = raw.shape[0]
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, m = _scale_min_k4(raw[:, 4:16])
    qh = raw[:, 16:48].reshape(nb, 1, 32)
    ql = raw[:, 48:176].reshape(nb, 4, 1, 32)
    sub = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = ((qh >> sub) & 1).astype(np.int32) * 16                     # (nb, 8, 32)
    low = np.concatenate([ql & 15, ql >> 4], axis=2).reshape(nb, 8, 32).astype(np.int32)
    q = (low + high).astype(F32)
    return ((d * sc)[..., None] * q - (dmin * m)[..., None]).reshape(nb, 256)


def ref_q6_k(raw):
    nb = raw.shape[0]
    ql, qh = raw[:, :128].astype(np.int32), raw[:, 128:192].astype(np.int32)
    sc = raw[:, 192:208].copy().view(np.int8).astype(F32)
    d = _f16(raw, 208)
    out = np.empty((nb, 256), F32)
    for n in range(2):
        L, H = ql[:, 64 * n:64 * n + 64], qh[:, 32 * n:32 * n + 32]
        groups = [(L[:, :32] & 15) | (((H >> 0) & 3) << 4), (L[:, 32:] & 15) | (((H >> 2) & 3) << 4),
                  (L[:, :32] >> 4) | (((H >> 4) & 3) << 4), (L[:, 32:] >> 4) | (((H >> 6) & 3) << 4)]
        for g, q in enumerate(groups):
            s = np.repeat(sc[:, 8 * n + 2 * g:8 * n + 2 * g + 2], 16, axis=1)  # (nb, 32): l // 16
            out[:, 128 * n + 32 * g:128 * n + 32 * g + 32] = (d * s) * (q - 32).astype(F32)
    return out


def ref_q8_k(raw):
    d = raw[:, :4].copy().view("<f4")
    return d * raw[:, 4:260].copy().view(np.int8).astype(F32)


REF = {GGML.Q4_0: ref_q4_0, GGML.Q4_1: ref_q4_1, GGML.Q5_0: ref_q5_0, GGML.Q5_1: ref_q5_1, GGML.Q8_0: ref_q8_0,
       GGML.Q2_K: ref_q2_k, GGML.Q3_K: ref_q3_k, GGML.Q4_K: ref_q4_k, GGML.Q5_K: ref_q5_k, GGML.Q6_K: ref_q6_k,
       GGML.Q8_K: ref_q8_k}
NAMES = {GGML.Q4_0: "Q4_0", GGML.Q4_1: "Q4_1", GGML.Q5_0: "Q5_0", GGML.Q5_1: "Q5_1", GGML.Q8_0: "Q8_0",
         GGML.Q2_K: "Q2_K", GGML.Q3_K: "Q3_K", GGML.Q4_K: "Q4_K", GGML.Q5_K: "Q5_K", GGML.Q6_K: "Q6_K",
         GGML.Q8_K: "Q8_K"}
# byte offsets of the f16 (or, for Q8_K, f32) scale fields within a block
HALF_FIELDS = {GGML.Q4_0: [0], GGML.Q4_1: [0, 2], GGML.Q5_0: [0], GGML.Q5_1: [0, 2], GGML.Q8_0: [0],
               GGML.Q2_K: [80, 82], GGML.Q3_K: [108], GGML.Q4_K: [0, 2], GGML.Q5_K: [0, 2], GGML.Q6_K: [208]}


def random_blocks(rng, type_id, nb):
    """Random bytes for the quants, finite random scales (with zero, subnormal and extreme ones)."""
    _, bb = BLOCK[type_id]
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for off in HALF_FIELDS.get(type_id, []):
        v = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        specials = np.array([0.0, 3e-6, -6e-8, 1.5, -2.0, 65504.0], np.float16)[: nb]
        v[: len(specials)] = specials
        rng.shuffle(v)
        raw[:, off:off + 2] = v.view(np.uint8).reshape(nb, 2)
    if type_id == GGML.Q8_K:
        v = (rng.standard_normal(nb) * 0.01).astype("<f4")
        raw[:, 0:4] = v.view(np.uint8).reshape(nb, 4)
    return raw


def to_bf16_bits(a):
    u = np.ascontiguousarray(a, F32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


# ------------------------------------------------------------------------------------------------
# dequantisation
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def quant_file(tmp_path_factory):
    """One GGUF holding a random tensor of every block type, plus the expected float32 values."""
    rng = np.random.default_rng(1234)
    w = GGUFWriter()
    w.add("general.architecture", "test")
    expected = {}
    for type_id, ref in REF.items():
        blk, _ = BLOCK[type_id]
        for suffix, ne in (("2d", [blk * 3, 5]), ("3d", [blk, 2, 3])):
            nb = int(np.prod(ne)) // blk
            raw = random_blocks(rng, type_id, nb)
            name = f"{NAMES[type_id]}.{suffix}"
            w.add_tensor(name, raw, type_id, ne)
            expected[name] = ref(raw).reshape(tuple(reversed(ne)))
    # big enough for the multi-threaded path (> 65536 elements)
    raw = random_blocks(rng, GGML.Q4_K, 320)
    w.add_tensor("Q4_K.big", raw, GGML.Q4_K, [256 * 8, 40])
    expected["Q4_K.big"] = ref_q4_k(raw).reshape(40, 256 * 8)
    raw = random_blocks(rng, GGML.Q8_0, 4096)
    w.add_tensor("Q8_0.big", raw, GGML.Q8_0, [32 * 64, 64])
    expected["Q8_0.big"] = ref_q8_0(raw).reshape(64, 32 * 64)
    # element-wise types
    f16 = rng.standard_normal(7 * 33).astype(np.float16)
    f16[:6] = np.array([0.0, -0.0, 6e-8, np.inf, -np.inf, 65504.0], np.float16)
    f16[6:8] = np.frombuffer(np.array([0x0001, 0x03FF], np.uint16).tobytes(), np.float16)  # subnormals
    w.add_tensor("F16", f16, GGML.F16, [33, 7])
    expected["F16"] = f16.astype(F32).reshape(7, 33)
    bf16 = rng.integers(0, 0x7F80, size=5 * 17, dtype=np.uint16) | (rng.integers(0, 2, 5 * 17).astype(np.uint16) << 15)
    w.add_tensor("BF16", bf16, GGML.BF16, [17, 5])
    expected["BF16"] = (bf16.astype(np.uint32) << 16).view(F32).reshape(5, 17)
    f32 = rng.standard_normal(3 * 11).astype(F32)
    w.add_tensor("F32", f32, GGML.F32, [11, 3])
    expected["F32"] = f32.reshape(3, 11)
    f64 = rng.standard_normal(13) * 1e3
    w.add_tensor("F64", f64, GGML.F64, [13])
    expected["F64"] = f64.astype(F32)
    path = tmp_path_factory.mktemp("gguf") / "quants.gguf"
    w.write(str(path))
    return str(path), expected


def test_dequant_f32_exact(quant_file):
    path, expected = quant_file
    with _C.GGUFFile(path) as f:
        for name, want in expected.items():
            got = f.dequantize(name)
            assert got.dtype == np.float32 and got.shape == want.shape, name
            np.testing.assert_array_equal(got, want, err_msg=name)


def test_dequant_f16_bf16(quant_file):
    path, expected = quant_file
    with _C.GGUFFile(path) as f:
        for name, want in expected.items():
            with np.errstate(over="ignore"):
                want16 = want.astype(np.float16)
            got = f.dequantize(name, dtype="float16")
            assert got.dtype == np.float16 and got.shape == want.shape
            np.testing.assert_array_equal(got, want16, err_msg=name)
            got = f.dequantize(name, dtype=np.float16)
            np.testing.assert_array_equal(got, want16, err_msg=name)
            got = f.dequantize(name, dtype="bfloat16")
            assert got.dtype == np.uint16 and got.shape == want.shape
            np.testing.assert_array_equal(got, to_bf16_bits(want), err_msg=name)


def test_dequant_threads_agree(quant_file):
    path, expected = quant_file
    with _C.GGUFFile(path) as f:
        for name in ("Q4_K.big", "Q8_0.big"):
            one = f.dequantize(name, threads=1)
            many = f.dequantize(name, threads=4)
            np.testing.assert_array_equal(one, many)
            np.testing.assert_array_equal(many, expected[name])
            np.testing.assert_array_equal(f.dequantize(name, "bfloat16", threads=3), to_bf16_bits(expected[name]))


def test_tensors_listing_and_raw(quant_file):
    path, expected = quant_file
    with _C.GGUFFile(path) as f:
        listing = {t[0]: t for t in f.tensors()}
        name, type_name, type_id, shape, nbytes = listing["Q4_1.3d"]
        assert (type_name, type_id, shape, nbytes) == ("Q4_1", 3, (3, 2, 32), 6 * 20)
        assert listing["F64"][1:4] == ("F64", 28, (13,))
        raw = f.raw("Q4_1.3d")
        assert raw.dtype == np.uint8 and raw.shape == (120,) and not raw.flags.writeable
        assert raw.base is f
        np.testing.assert_array_equal(ref_q4_1(raw.reshape(-1, 20)).reshape(3, 2, 32), expected["Q4_1.3d"])
        with pytest.raises(ValueError):
            raw[0] = 1
        with pytest.raises(KeyError) as ei:
            f.dequantize("no.such.tensor")
        assert path in str(ei.value) and "no.such.tensor" in str(ei.value)
        with pytest.raises(KeyError):
            f.raw("nope")
        with pytest.raises(ValueError, match="dtype"):
            f.dequantize("F32", dtype="int8")


def test_close_keeps_views_valid(quant_file):
    path, expected = quant_file
    f = _C.GGUFFile(path)
    raw = f.raw("F32")
    f.close()
    assert f.closed
    # the mapping stays until the view is gone
    np.testing.assert_array_equal(raw.view(np.float32).reshape(3, 11), expected["F32"])
    with pytest.raises(ValueError, match="closed"):
        f.dequantize("F32")
    with pytest.raises(ValueError, match="closed"):
        f.tensors()
    del raw
    f.close()  # idempotent
    with _C.GGUFFile(path) as g:
        assert g.version == 3 and g.alignment == 32 and not g.closed
    assert g.closed


def test_close_while_dequantizing_in_threads(quant_file):
    """dequantize() releases the GIL; close() from another thread must not pull the mapping away."""
    import threading
    path, expected = quant_file
    f = _C.GGUFFile(path)
    errors, results = [], []

    def work():
        for _ in range(30):
            try:
                results.append(f.dequantize("Q8_0.big", threads=1))
            except ValueError as e:  # closed meanwhile
                errors.append(str(e))
                return

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    f.close()
    for t in threads:
        t.join()
    assert all("closed" in e for e in errors)
    for r in results:
        np.testing.assert_array_equal(r, expected["Q8_0.big"])
    assert f.closed


def test_uninitialised_object():
    f = _C.GGUFFile.__new__(_C.GGUFFile)
    with pytest.raises(ValueError):
        f.tensors()
    assert f.closed


def test_unsupported_dequant_type(tmp_path):
    w = GGUFWriter()
    w.add_tensor("iq4", np.zeros(18, np.uint8), GGML.IQ4_NL, [32])
    w.add_tensor("ints", np.arange(4, dtype=np.int32), GGML.I32, [4])
    path = w.write(str(tmp_path / "t.gguf"))
    with _C.GGUFFile(path) as f:
        assert [t[1] for t in f.tensors()] == ["IQ4_NL", "I32"]
        for name, tname in (("iq4", "IQ4_NL"), ("ints", "I32")):
            with pytest.raises(NotImplementedError, match=tname) as ei:
                f.dequantize(name)
            assert path in str(ei.value) and name in str(ei.value)
        np.testing.assert_array_equal(f.raw("ints").view(np.int32), np.arange(4))


# ------------------------------------------------------------------------------------------------
# metadata
# ------------------------------------------------------------------------------------------------

def test_metadata_types(tmp_path):
    w = GGUFWriter(version=2)
    w.add("u8", 255, T.UINT8).add("i8", -128, T.INT8).add("u16", 65535, T.UINT16).add("i16", -32768, T.INT16)
    w.add("u32", 2**32 - 1, T.UINT32).add("i32", -2**31, T.INT32).add("u64", 2**64 - 1, T.UINT64)
    w.add("i64", -2**63, T.INT64).add("f32", 0.1, T.FLOAT32).add("f64", 0.1, T.FLOAT64)
    w.add("t", True).add("f", False).add("s", "Grüße 😀").add("empty", "")
    w.add("bad_utf8", b"ab\xff\xfecd", T.STRING)
    w.add("arr_i32", [1, -2, 3], T.ARRAY, T.INT32).add("arr_f32", [0.5, -1.25], T.ARRAY, T.FLOAT32)
    w.add("arr_str", ["x", "", "ÿ"]).add("arr_bool", [True, False], T.ARRAY, T.BOOL)
    w.add("arr_u64", [2**64 - 1, 0], T.ARRAY, T.UINT64).add("arr_empty", [], T.ARRAY, T.STRING)
    w.add_tensor("x", np.ones(4, F32), GGML.F32, [4])
    path = w.write(str(tmp_path / "m.gguf"))
    with _C.GGUFFile(path) as f:
        m = f.metadata
        assert f.version == 2
        assert m["u8"] == 255 and m["i8"] == -128 and m["u16"] == 65535 and m["i16"] == -32768
        assert m["u32"] == 2**32 - 1 and m["i32"] == -2**31 and m["u64"] == 2**64 - 1 and m["i64"] == -2**63
        assert m["f32"] == float(np.float32(0.1)) and m["f64"] == 0.1
        assert m["t"] is True and m["f"] is False and m["s"] == "Grüße 😀" and m["empty"] == ""
        assert m["bad_utf8"].encode("utf-8", "surrogateescape") == b"ab\xff\xfecd"  # lossless
        assert m["arr_i32"] == [1, -2, 3] and m["arr_f32"] == [0.5, -1.25] and m["arr_str"] == ["x", "", "ÿ"]
        assert m["arr_bool"] == [True, False] and m["arr_u64"] == [2**64 - 1, 0] and m["arr_empty"] == []
        assert f.metadata is m  # built once, cached
        assert list(m) == [k for k, *_ in w.kvs]


def test_metadata_only_file(tmp_path):
    w = GGUFWriter().add("general.name", "x")
    path = w.write(str(tmp_path / "m.gguf"), pad_data=False)
    with _C.GGUFFile(path) as f:
        assert f.tensors() == [] and f.metadata == {"general.name": "x"}


def test_custom_alignment(tmp_path):
    w = GGUFWriter(alignment=64)
    w.add("general.alignment", 64, T.UINT32)
    w.add_tensor("a", np.arange(3, dtype=F32), GGML.F32, [3])
    w.add_tensor("b", np.arange(5, dtype=F32), GGML.F32, [5])
    path = w.write(str(tmp_path / "a.gguf"))
    with _C.GGUFFile(path) as f:
        assert f.alignment == 64 and f.data_offset % 64 == 0
        np.testing.assert_array_equal(f.dequantize("b"), np.arange(5, dtype=F32))


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------

def valid_writer():
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.add("llama.block_count", 1, T.UINT32)
    w.add("tokenizer.ggml.tokens", ["a", "b", "<s>"])
    w.add("tokenizer.ggml.scores", [0.0, -1.0, -2.0], T.ARRAY, T.FLOAT32)
    w.add_tensor("norm.weight", np.ones(32, F32), GGML.F32, [32])
    w.add_tensor("q4.weight", np.zeros((2, 18), np.uint8), GGML.Q4_0, [32, 2])
    w.add_tensor("q8.weight", np.zeros((4, 34), np.uint8), GGML.Q8_0, [64, 2])
    return w


def expect_error(path, exc, *needles):
    with pytest.raises(exc) as ei:
        _C.GGUFFile(path)
    msg = str(ei.value)
    assert path in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


def write_bytes(tmp_path, data, name="bad.gguf"):
    p = str(tmp_path / name)
    with open(p, "wb") as f:
        f.write(data)
    return p


def test_valid_writer_opens(tmp_path):
    path = valid_writer().write(str(tmp_path / "ok.gguf"))
    with _C.GGUFFile(path) as f:
        assert len(f.tensors()) == 3


def test_truncated(tmp_path):
    data = valid_writer().to_bytes()
    with _C.GGUFFile(write_bytes(tmp_path, data, "full.gguf")) as f:
        data_offset = f.data_offset
    for cut in (0, 3, 10, 23, 30, 60, 100, data_offset - 40, data_offset - 1):
        path = write_bytes(tmp_path, data[:cut], f"cut{cut}.gguf")
        if cut == 0:
            expect_error(path, CheckpointError, "empty")
        elif cut < 4:
            expect_error(path, CheckpointError, "magic")
        else:
            expect_error(path, CheckpointError, "truncated")
    # cut inside the data section: the last tensor no longer fits
    path = write_bytes(tmp_path, data[:len(data) - 70], "cutdata.gguf")
    expect_error(path, CheckpointError, "q8.weight", "outside the data section")


def test_missing_file_and_directory(tmp_path):
    p = str(tmp_path / "does_not_exist.gguf")
    with pytest.raises(OSError) as ei:
        _C.GGUFFile(p)
    assert p in str(ei.value)
    with pytest.raises(OSError):
        _C.GGUFFile(str(tmp_path))


def test_bad_magic_and_version(tmp_path):
    w = valid_writer()
    expect_error(write_bytes(tmp_path, w.to_bytes(magic=b"GGML")), CheckpointError, "bad magic")
    expect_error(write_bytes(tmp_path, w.to_bytes(version=1), "v1.gguf"), CheckpointError, "unsupported GGUF version 1")
    expect_error(write_bytes(tmp_path, w.to_bytes(version=4), "v4.gguf"), CheckpointError, "unsupported GGUF version 4")
    expect_error(write_bytes(tmp_path, w.to_bytes(version=3 << 24), "be.gguf"), CheckpointError, "big-endian")


def test_huge_counts(tmp_path):
    w = valid_writer()
    # over the 2^20 limits: refused by the limit; under them: by the bytes left in the file
    for n_kv, n_t, why in ((2**64 - 1, None, "limit of 1048576"), (10**6, None, "impossible"),
                           (None, 2**63, "limit of 1048576"), (None, 10**6, "impossible"),
                           (2**40, 2**40, "limit of 1048576")):
        path = write_bytes(tmp_path, w.to_bytes(n_kv=n_kv, n_tensors=n_t), "huge.gguf")
        expect_error(path, CheckpointError, why)
    # plausible count, but more entries than the file holds
    expect_error(write_bytes(tmp_path, w.to_bytes(n_kv=6), "more.gguf"), CheckpointError)


def test_string_length_past_eof(tmp_path):
    w = GGUFWriter().add("general.name", Raw(struct.pack("<Q", 2**62) + b"abc"), T.STRING)
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "general.name", "claims a length")
    # the key itself
    data = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2**63) + b"x" * 32
    expect_error(write_bytes(tmp_path, data, "key.gguf"), CheckpointError, "key of metadata entry 0", "claims a length")
    # an element of a string array
    w = GGUFWriter().add("arr", Raw(struct.pack("<IQ", T.STRING, 2) + struct.pack("<Q", 1) + b"a" +
                                    struct.pack("<Q", 10**9) + b"bc"), T.ARRAY)
    expect_error(write_bytes(tmp_path, w.to_bytes(), "arr.gguf"), CheckpointError, "arr", "claims a length")
    # a numeric array longer than the file
    w = GGUFWriter().add("nums", Raw(struct.pack("<IQ", T.UINT64, 2**61) + b"\0" * 16), T.ARRAY)
    expect_error(write_bytes(tmp_path, w.to_bytes(), "nums.gguf"), CheckpointError, "nums", "2305843009213693952")


def test_bad_value_types(tmp_path):
    w = GGUFWriter().add("weird", Raw(b"\0" * 8), 13)
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "weird", "unknown value type 13")
    w = GGUFWriter().add("nested", [(T.INT32, [1, 2]), (T.INT32, [3])], T.ARRAY, T.ARRAY)
    expect_error(write_bytes(tmp_path, w.to_bytes(), "nested.gguf"), NotImplementedError, "nested", "array of arrays")


def test_tensor_offset_outside(tmp_path):
    w = valid_writer()
    w.tensors[1].offset = 1 << 20
    w.tensors[1].place = False
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "q4.weight", "outside the data section")
    w = valid_writer()
    w.tensors[2].offset = 2**64 - 32  # offset + nbytes overflows
    w.tensors[2].place = False
    expect_error(write_bytes(tmp_path, w.to_bytes(), "ovf.gguf"), CheckpointError, "q8.weight", "outside")


def test_overlapping_tensors(tmp_path):
    w = valid_writer()
    w.tensors[2].offset = 128  # norm.weight is [0, 128), q4.weight [128, 164)
    msg = expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "overlap")
    assert "q4.weight" in msg and "q8.weight" in msg


def test_misaligned_offset(tmp_path):
    w = valid_writer()
    w.tensors[1].offset = 130
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "q4.weight", "alignment")


def test_unknown_ggml_type(tmp_path):
    for tid in (99, 4, 31, 2**32 - 1):
        w = valid_writer()
        w.tensors[1].type_id = tid
        expect_error(write_bytes(tmp_path, w.to_bytes(), f"t{tid}.gguf"), CheckpointError, "q4.weight",
                     f"unknown ggml type id {tid}")


def test_ne_not_multiple_of_block(tmp_path):
    w = valid_writer()
    w.tensors[1].ne = [48, 2]
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "q4.weight", "not a multiple of the block size 32")


def test_bad_shapes(tmp_path):
    w = valid_writer()
    w.tensors[0].ne = [2**40, 2**40]
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "norm.weight", "overflows")
    w = valid_writer()
    w.tensors[0].ne = [32, 2**63]
    expect_error(write_bytes(tmp_path, w.to_bytes(), "neg.gguf"), CheckpointError, "norm.weight", "negative")
    w = valid_writer()
    w.tensors[0].ne = [32, 1, 1, 1, 1]
    expect_error(write_bytes(tmp_path, w.to_bytes(), "5d.gguf"), CheckpointError, "norm.weight", "5 dimensions")


def test_duplicates_and_alignment(tmp_path):
    w = valid_writer()
    w.tensors[2].name = "q4.weight"
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "duplicate tensor name 'q4.weight'")
    w = valid_writer().add("general.architecture", "again")
    expect_error(write_bytes(tmp_path, w.to_bytes(), "k.gguf"), CheckpointError, "duplicate metadata key")
    w = valid_writer().add("general.alignment", 48, T.UINT32)
    expect_error(write_bytes(tmp_path, w.to_bytes(), "al.gguf"), CheckpointError, "general.alignment")
    w = valid_writer().add("general.alignment", "32")
    expect_error(write_bytes(tmp_path, w.to_bytes(), "al2.gguf"), CheckpointError, "general.alignment", "string")


def test_undecodable_bytes_in_names_and_paths(tmp_path):
    # a tensor name that is not UTF-8: the message escapes the byte instead of failing to decode
    w = valid_writer()
    w.tensors[1].name = b"bad\xffname"
    w.tensors[1].type_id = 99
    expect_error(write_bytes(tmp_path, w.to_bytes()), CheckpointError, "bad\\xffname", "unknown ggml type id 99")
    # such a name is otherwise fine: listed with surrogateescape, and found again by that str
    w = valid_writer()
    w.tensors[0].name = b"n\xe9rm"
    path = w.write(str(tmp_path / "ok.gguf"))
    with _C.GGUFFile(path) as f:
        name = f.tensors()[0][0]
        assert name == "n\udce9rm" and name.encode("utf-8", "surrogateescape") == b"n\xe9rm"
        np.testing.assert_array_equal(f.dequantize(name), np.ones(32, F32))
    # a path that is not UTF-8
    bad = os.path.join(os.fsencode(str(tmp_path)), b"p\xff.gguf")
    with open(bad, "wb") as fh:
        fh.write(b"GGML" + b"\0" * 40)
    with pytest.raises(CheckpointError, match="bad magic") as ei:
        _C.GGUFFile(os.fsdecode(bad))
    assert "p\\xff.gguf" in str(ei.value)
    with pytest.raises(CheckpointError):
        _C.GGUFFile(bad)  # bytes paths are accepted too


def test_fuzz_header_never_crashes(tmp_path):
    """Seeded mutations of a valid file's header: each open either succeeds (and everything on the
    file then works) or raises a named error; never a crash."""
    base = valid_writer().to_bytes()
    with _C.GGUFFile(write_bytes(tmp_path, base, "base.gguf")) as f:
        hdr = f.data_offset
    rng = np.random.default_rng(2024)
    path = str(tmp_path / "fuzz.gguf")
    outcomes = {"ok": 0, "error": 0}
    extremes = [0, 1, 2**31, 2**32 - 1, 2**63, 2**64 - 1, 2**62 + 5, 1 << 20, 127]
    for it in range(400):
        data = bytearray(base)
        mode = it % 4
        if mode == 0:    # random byte flips
            for pos in rng.integers(4, hdr, size=int(rng.integers(1, 6))):
                data[pos] = int(rng.integers(0, 256))
        elif mode == 1:  # an extreme 64-bit value at a random position
            pos = int(rng.integers(4, hdr - 8))
            data[pos:pos + 8] = struct.pack("<Q", extremes[int(rng.integers(len(extremes)))])
        elif mode == 2:  # an extreme 32-bit value
            pos = int(rng.integers(4, hdr - 4))
            data[pos:pos + 4] = struct.pack("<I", extremes[int(rng.integers(len(extremes)))] & 0xFFFFFFFF)
        else:            # truncate, then flip
            data = data[: int(rng.integers(1, len(data)))]
            if len(data) > 8:
                data[int(rng.integers(4, len(data)))] ^= 0xFF
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            f = _C.GGUFFile(path)
        except (CheckpointError, NotImplementedError, OSError) as e:
            assert path in str(e)
            outcomes["error"] += 1
            continue
        outcomes["ok"] += 1
        with f:
            f.metadata
            for name, tname, tid, shape, nbytes in f.tensors():
                raw = f.raw(name)
                assert raw.nbytes == nbytes
                try:
                    a = f.dequantize(name)
                    assert a.shape == shape
                except NotImplementedError:
                    pass
    assert outcomes["ok"] > 10 and outcomes["error"] > 100, outcomes


# ------------------------------------------------------------------------------------------------
# the demo model, against the gguf package's dequantize (values saved in the fixture)
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo():
    path = demo_gguf_path()
    if path is None:
        pytest.skip("demo GGUF not available: FASTLOAD_SKIP_DEMO=1, or fastload.demo.demo_model_path() "
                    "failed (no network?) and FASTLOAD_DEMO_GGUF is not set")
    with open(FIXTURE, encoding="utf-8") as fh:
        fx = json.load(fh)
    if os.path.getsize(path) != fx["gguf_file"]["size"]:
        pytest.skip(f"{path} is not the file the fixture was made from ({fx['gguf_file']['name']})")
    with _C.GGUFFile(path) as f:
        yield f, fx["gguf_reference"]


def test_demo_header(demo):
    f, _ = demo
    m = f.metadata
    assert f.version == 3 and m["general.architecture"] == "llama" and m["llama.block_count"] == 30
    listing = f.tensors()
    assert len(listing) == 272
    types = {t[1] for t in listing}
    assert types == {"F32", "Q4_1", "Q8_0"}
    emb = next(t for t in listing if t[0] == "token_embd.weight")
    assert emb[1:4] == ("Q8_0", 8, (49152, 576))


def test_demo_dequant_matches_gguf_package(demo):
    f, ref = demo
    for name, r in ref.items():
        a = f.dequantize(name)
        assert list(a.shape) == r["shape_hf"], name
        assert f.tensors()[[t[0] for t in f.tensors()].index(name)][1] == r["ggml_type"]
        rows = a.reshape(-1, a.shape[-1])[:2] if a.ndim > 1 else a.reshape(1, -1)[:1, :64]
        np.testing.assert_array_equal(rows, np.array(r["first_rows_f32"], F32), err_msg=name)
        digest = hashlib.sha256(np.ascontiguousarray(a, "<f4").tobytes()).hexdigest()
        assert digest == r["sha256_f32_le"], name
