"""fastload._C.SafetensorsFile: round trips through the C reader, and one test per kind of broken
file, each checking that the error names the file and says what is wrong."""
import gc
import json
import os
import pathlib
import random
import re
import struct
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_util  # noqa: E402

from fastload import _C  # noqa: E402

CheckpointError = _C.CheckpointError
SafetensorsFile = _C.SafetensorsFile
CLEAN_ERRORS = (CheckpointError, OSError, NotImplementedError)


def rx(path, *parts):
    """A `match` pattern: the path, then each part (literal) in order."""
    return re.escape(str(path)) + ".*" + ".*".join(re.escape(p) for p in parts)


def f32(shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# round trips
# ----------------------------------------------------------------------------------------------
def test_round_trip_all_dtypes(tmp_path):
    rng = np.random.default_rng(1)
    x = f32((3, 5), 2)
    tensors = {
        "f32": f32((4, 7), 3),
        "f16": f32((2, 3, 5), 4).astype(np.float16),
        "bf16": ("BF16", st_util.bf16_bits(x)),
        "f64": rng.standard_normal(9),
        "i8": rng.integers(-128, 128, (5, 3), dtype=np.int8),
        "u8": rng.integers(0, 256, 17, dtype=np.uint8),
        "i16": rng.integers(-2**15, 2**15, (3, 3), dtype=np.int16),
        "u16": rng.integers(0, 2**16, 6, dtype=np.uint16),
        "i32": rng.integers(-2**31, 2**31, (2, 2), dtype=np.int32),
        "u32": rng.integers(0, 2**32, 3, dtype=np.uint32),
        "i64": rng.integers(-2**63, 2**63 - 1, (2, 3), dtype=np.int64),
        "u64": rng.integers(0, 2**63, 4, dtype=np.uint64),
        "bool": rng.integers(0, 2, (2, 5)).astype(np.bool_),
        "f8e4m3": ("F8_E4M3", rng.integers(0, 256, (3, 4), dtype=np.uint8)),
        "f8e5m2": ("F8_E5M2", rng.integers(0, 256, 5, dtype=np.uint8)),
    }
    p = st_util.write(tmp_path / "all.safetensors", tensors)
    expect_np = {"bf16": np.uint16, "f8e4m3": np.uint8, "f8e5m2": np.uint8}
    with SafetensorsFile(p) as f:
        assert f.keys() == list(tensors)
        assert len(f) == len(tensors)
        for name, v in tensors.items():
            ref = v[1] if isinstance(v, tuple) else v
            a = f.get(name)
            assert a.shape == ref.shape
            assert a.dtype == np.dtype(expect_np.get(name, ref.dtype))
            assert a.tobytes() == ref.tobytes(), name
            dt, shape, b, e = f.info(name)
            assert dt == (v[0] if isinstance(v, tuple) else st_util.NP_TO_ST[ref.dtype])
            assert shape == ref.shape and e - b == ref.nbytes
        np.testing.assert_array_equal(f.get("f32"), tensors["f32"])
        np.testing.assert_array_equal(f.get("f16"), tensors["f16"])
        np.testing.assert_allclose(st_util.bf16_to_f32(f.get("bf16")), x, rtol=2**-8)


def test_scalar_empty_and_zero_size(tmp_path):
    tensors = {
        "scalar": np.array(3.5, dtype=np.float32),
        "empty": np.zeros((0, 4), np.float16),
        "w": f32((2, 2)),
        "also_empty": np.zeros((3, 0, 2), np.int64),
    }
    p = st_util.write(tmp_path / "z.safetensors", tensors)
    with SafetensorsFile(p) as f:
        assert f.get("scalar").shape == () and float(f.get("scalar")) == 3.5
        assert f.get("empty").shape == (0, 4) and f.get("empty").dtype == np.float16
        assert f.get("also_empty").shape == (3, 0, 2)
        np.testing.assert_array_equal(f.get("w"), tensors["w"])
        assert f.info("scalar") == ("F32", (), 0, 4)
        assert f.info("empty")[2] == f.info("empty")[3]


def test_no_tensors(tmp_path):
    p = st_util.write(tmp_path / "none.safetensors", {})
    with SafetensorsFile(p) as f:
        assert f.keys() == [] and len(f) == 0 and f.metadata is None
    p = st_util.write(tmp_path / "meta_only.safetensors", {}, metadata={"a": "b"})
    with SafetensorsFile(p) as f:
        assert len(f) == 0 and f.metadata == {"a": "b"}


def test_keys_follow_offsets_not_header_order(tmp_path):
    tensors = {f"t{i}": np.full(i + 1, i, np.int32) for i in range(6)}
    header, data = st_util.layout(tensors)
    shuffled = dict(reversed(list(header.items())))  # JSON lists t5 first, data holds t0 first
    p = st_util.write_header(tmp_path / "r.safetensors", shuffled, data)
    with SafetensorsFile(p) as f:
        assert f.keys() == list(tensors)
        for k, v in tensors.items():
            np.testing.assert_array_equal(f.get(k), v)


def test_many_tensors_lookup(tmp_path):
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": np.full(3, i, np.int16) for i in range(2000)}
    p = st_util.write(tmp_path / "many.safetensors", tensors)
    with SafetensorsFile(p) as f:
        assert len(f) == 2000
        for i in (0, 1, 999, 1999):
            name = f"model.layers.{i}.mlp.up_proj.weight"
            assert name in f and f.get(name)[0] == i
        assert "model.layers.2000.mlp.up_proj.weight" not in f


def test_metadata_and_unicode_names(tmp_path):
    meta = {"format": "pt", "note": 'quote " backslash \\ tab \t newline \n', "emoji": "\U0001F600 é 中"}
    names = ["plain", "caf\u00e9.weight", "\U0001F600.bias", "sp ace/slash\\back"]
    tensors = {n: np.full(2, i, np.uint8) for i, n in enumerate(names)}
    header, data = st_util.layout(tensors, meta)
    for ensure_ascii in (True, False):  # \uXXXX escapes incl. surrogate pairs, and raw UTF-8
        text = json.dumps(header, ensure_ascii=ensure_ascii)
        p = st_util.write_header(tmp_path / f"u{ensure_ascii}.safetensors", text, data)
        with SafetensorsFile(p) as f:
            assert f.metadata == meta
            assert f.keys() == names
            for i, n in enumerate(names):
                assert n in f and list(f.get(n)) == [i, i]


def test_metadata_null_and_unknown_fields(tmp_path):
    header, data = st_util.layout({"w": np.ones(2, np.float32)})
    header["__metadata__"] = None
    header["w"]["extra"] = {"nested": [1, 2.5, -3e4, True, False, None, "s"]}
    p = st_util.write_header(tmp_path / "x.safetensors", header, data)
    with SafetensorsFile(p) as f:
        assert f.metadata is None and list(f.get("w")) == [1, 1]


def test_whitespace_in_header(tmp_path):
    header, data = st_util.layout({"w": np.ones(2, np.float32)})
    text = json.dumps(header, indent=2) + " \n\t\r  "
    p = st_util.write_header(tmp_path / "ws.safetensors", text, data, align=0)
    with SafetensorsFile(p) as f:
        assert list(f.get("w")) == [1, 1]


def test_unaligned_data(tmp_path):
    x = f32((5, 3), 7)
    header, data = st_util.layout({"b": np.ones(1, np.uint8), "w": x, "d": np.arange(3, dtype=np.float64)})
    for pad in range(8):  # header lengths of every residue mod 8: the data region is misaligned
        text = json.dumps(header) + " " * pad
        p = st_util.write_header(tmp_path / f"a{pad}.safetensors", text, data, align=0)
        with SafetensorsFile(p) as f:
            np.testing.assert_array_equal(f.get("w"), x)
            np.testing.assert_array_equal(f.get("d"), [0, 1, 2])


def test_views_are_read_only_and_outlive_file(tmp_path):
    x = f32((4, 4), 9)
    p = st_util.write(tmp_path / "v.safetensors", {"w": x})
    f = SafetensorsFile(pathlib.Path(p))  # os.PathLike accepted
    assert f.path == p
    a = f.get("w")
    assert a.base is f and not a.flags.writeable
    with pytest.raises(ValueError):
        a[0, 0] = 1
    with pytest.raises(ValueError):
        a.setflags(write=True)
    f.close()
    assert f.closed
    np.testing.assert_array_equal(a, x)  # the mapping stays while a view is alive
    del f
    gc.collect()
    np.testing.assert_array_equal(a, x)
    b = a[1:3].copy()
    del a
    gc.collect()
    np.testing.assert_array_equal(b, x[1:3])


def test_close_and_context_manager(tmp_path):
    p = st_util.write(tmp_path / "c.safetensors", {"w": np.ones(3, np.float32)})
    with SafetensorsFile(p) as f:
        assert "w" in f and "nope" not in f and 3 not in f
        assert "1 tensors" in repr(f)
    assert f.closed and "closed" in repr(f)
    for op in (f.keys, lambda: f.get("w"), lambda: f.info("w"), lambda: len(f), lambda: "w" in f,
               lambda: f.metadata, f.__enter__):
        with pytest.raises(ValueError, match="closed"):
            op()
    f.close()  # closing twice is fine
    assert f.path == p


def test_missing_tensor_is_key_error(tmp_path):
    p = st_util.write(tmp_path / "k.safetensors", {"w": np.ones(3, np.float32)})
    with SafetensorsFile(p) as f:
        with pytest.raises(KeyError, match=rx(p, "model.embed_tokens.weight")):
            f.get("model.embed_tokens.weight")
        with pytest.raises(KeyError, match=rx(p, "nope")):
            f.info("nope")
        with pytest.raises(KeyError):
            f.get("w\x00")
        with pytest.raises(TypeError):
            f.get(b"w")


# ----------------------------------------------------------------------------------------------
# files that cannot be read
# ----------------------------------------------------------------------------------------------
def test_missing_file_and_directory(tmp_path):
    p = tmp_path / "does_not_exist.safetensors"
    with pytest.raises(OSError, match=rx(p, "No such file")):
        SafetensorsFile(p)
    with pytest.raises(OSError, match=rx(tmp_path, "not a regular file")):
        SafetensorsFile(tmp_path)


# ----------------------------------------------------------------------------------------------
# broken files: one test per complaint
# ----------------------------------------------------------------------------------------------
def good_layout():
    return st_util.layout({"model.embed.weight": np.ones((4, 2), np.float16),
                           "model.layers.0.mlp.up_proj.weight": f32((2, 8)),
                           "lm_head.weight": np.zeros(3, np.int64)})


def expect_error(tmp_path, raw, *parts, exc=CheckpointError, name="bad.safetensors"):
    p = st_util.write_bytes(tmp_path / name, raw)
    with pytest.raises(exc, match=rx(p, *parts)):
        SafetensorsFile(p)


@pytest.mark.parametrize("n", [0, 1, 5, 7])
def test_shorter_than_length_field(tmp_path, n):
    expect_error(tmp_path, b"\x10" * n, f"file is {n} bytes", "too short")


def test_header_cut_short(tmp_path):
    header, data = good_layout()
    raw = st_util.pack(header, data)
    expect_error(tmp_path, raw[:40], "header length", "runs past the end of the file", "file is 40 bytes")


def test_header_length_larger_than_file(tmp_path):
    header, data = good_layout()
    raw = st_util.pack(header, data, length=10_000)
    expect_error(tmp_path, raw, "header length 10000 runs past the end of the file")


@pytest.mark.parametrize("length", [100 * 2**20 + 1, 2**40, 2**64 - 1])
def test_header_larger_than_cap(tmp_path, length):
    expect_error(tmp_path, struct.pack("<Q", length) + b"{}", "header length field exceeds the limit of 104857600 bytes")


def test_empty_header(tmp_path):
    expect_error(tmp_path, struct.pack("<Q", 0), "header is empty")


def test_offsets_outside_data_region(tmp_path):
    header, data = good_layout()
    header["model.layers.0.mlp.up_proj.weight"]["data_offsets"] = [16, 16 + 64 + 100]
    expect_error(tmp_path, st_util.pack(header, data), "tensor 'model.layers.0.mlp.up_proj.weight'",
                 "data_offsets [16, 180] lie outside the data region of 104 bytes")


def test_data_region_shorter_than_tensors(tmp_path):
    header, data = good_layout()
    expect_error(tmp_path, st_util.pack(header, data[:-5]), "tensor 'lm_head.weight'", "lie outside the data region")


def test_overlapping_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}
    expect_error(tmp_path, st_util.pack(header, bytes(16)), "tensor 'b' (data_offsets [8, 16]) overlaps tensor 'a'")
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "overlaps tensor 'a'")


def test_gap_between_tensors(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
              "b": {"dtype": "F32", "shape": [2], "data_offsets": [12, 20]}}
    expect_error(tmp_path, st_util.pack(header, bytes(20)), "gap of 4 unused bytes between tensor 'a'", "tensor 'b'")


def test_gap_at_start(tmp_path):
    header = {"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    expect_error(tmp_path, st_util.pack(header, bytes(12)), "gap of 4 unused bytes at the start", "tensor 'a'")


def test_trailing_bytes_after_last_tensor(tmp_path):
    header, data = good_layout()
    expect_error(tmp_path, st_util.pack(header, data + bytes(3)), "data region is 107 bytes",
                 "cover only 104", "3 trailing bytes after tensor 'lm_head.weight'")
    expect_error(tmp_path, st_util.pack({}, bytes(5)), "no tensors but 5 bytes follow")


def test_unknown_dtype(tmp_path):
    header, data = good_layout()
    header["model.embed.weight"]["dtype"] = "F17"
    expect_error(tmp_path, st_util.pack(header, data), "tensor 'model.embed.weight'", "unknown dtype 'F17'")


@pytest.mark.parametrize("dt", ["C64", "F8_E8M0", "F4"])
def test_valid_but_unsupported_dtype(tmp_path, dt):
    header = {"x": {"dtype": dt, "shape": [2], "data_offsets": [0, 16]}}
    expect_error(tmp_path, st_util.pack(header, bytes(16)), "tensor 'x'", f"dtype '{dt}' is valid safetensors but not "
                 "supported", exc=NotImplementedError)


def test_shape_does_not_match_size(tmp_path):
    header, data = good_layout()
    header["model.layers.0.mlp.up_proj.weight"]["shape"] = [2, 7]
    expect_error(tmp_path, st_util.pack(header, data), "tensor 'model.layers.0.mlp.up_proj.weight'",
                 "shape [2, 7] of F32 needs 56 bytes but data_offsets [16, 80] span 64")


def test_shape_overflow(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [2**32, 2**32, 2], "data_offsets": [0, 8]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "overflows 64 bits")
    header = {"x": {"dtype": "F64", "shape": [2**62], "data_offsets": [0, 8]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "overflows 64 bits in bytes")
    header = {"x": {"dtype": "F64", "shape": [2**64], "data_offsets": [0, 8]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "dimension 0 is too large")


def test_negative_dim(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [2, -1], "data_offsets": [0, 8]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "'shape' dimension 1 is negative (header byte")


def test_negative_and_reversed_offsets(tmp_path):
    header = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "'data_offsets' begin is negative")
    header = {"x": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}
    expect_error(tmp_path, st_util.pack(header, bytes(8)), "tensor 'x'", "[8, 0] are reversed")


@pytest.mark.parametrize("field", ["dtype", "shape", "data_offsets"])
def test_missing_field(tmp_path, field):
    header, data = good_layout()
    del header["lm_head.weight"][field]
    expect_error(tmp_path, st_util.pack(header, data), "tensor 'lm_head.weight'", f"missing field '{field}'")


@pytest.mark.parametrize("entry, complaint", [
    ({"dtype": 5, "shape": [2], "data_offsets": [0, 8]}, "'dtype' must be a string"),
    ({"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}, "'shape' must be an array"),
    ({"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}, "'shape' dimension 0 must be an integer (a non-integer number at header byte"),
    ({"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}, "'shape' dimension 0 must be a non-negative integer"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 9]}, "got more than two numbers"),
    ({"dtype": "F32", "shape": [2], "data_offsets": [8]}, "got one number"),
    ({"dtype": "F32", "shape": [2], "data_offsets": []}, "got []"),
    ({"dtype": "F32", "shape": [2], "data_offsets": {"a": 1}}, "'data_offsets' must be an array"),
    ("not an object", "is not an object"),
])
def test_malformed_entry(tmp_path, entry, complaint):
    expect_error(tmp_path, st_util.pack({"x": entry}, bytes(8)), "tensor 'x'", complaint)


def test_too_many_dims(tmp_path):
    header = {"x": {"dtype": "U8", "shape": [1] * 9, "data_offsets": [0, 1]}}
    expect_error(tmp_path, st_util.pack(header, bytes(1)), "tensor 'x'", "more than 8 dimensions",
                 exc=NotImplementedError)
    header = {"x": {"dtype": "U8", "shape": [1] * 8, "data_offsets": [0, 1]}}  # 8 is fine
    p = st_util.write_header(tmp_path / "ok8.safetensors", header, bytes(1))
    with SafetensorsFile(p) as f:
        assert f.get("x").shape == (1,) * 8


def test_duplicate_keys(tmp_path):
    e = '{"dtype":"F32","shape":[1],"data_offsets":[%d,%d]}'
    text = '{"w":' + e % (0, 4) + ',"w":' + e % (4, 8) + "}"
    expect_error(tmp_path, st_util.pack(text, bytes(8)), "tensor 'w' appears twice")
    text = '{"w":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    expect_error(tmp_path, st_util.pack(text, bytes(4)), "tensor 'w'", "field 'dtype' appears twice")
    text = '{"__metadata__":{"a":"1","a":"2"}}'
    expect_error(tmp_path, st_util.pack(text), "'__metadata__' key 'a' appears twice")
    text = '{"__metadata__":{},"__metadata__":{}}'
    expect_error(tmp_path, st_util.pack(text), "'__metadata__' appears twice")


def test_metadata_values_must_be_strings(tmp_path):
    expect_error(tmp_path, st_util.pack({"__metadata__": {"n": 3}}), "'__metadata__' value of key 'n' is not a string")
    expect_error(tmp_path, st_util.pack({"__metadata__": ["a"]}), "'__metadata__' must be an object")


@pytest.mark.parametrize("text, complaint", [
    (b"hello world!", "header does not start with '{': not a safetensors file"),
    (b" {}", "header does not start with '{'"),
    (b"[]", "header does not start with '{': not a safetensors file"),
    (b"{", "header ends at byte 1 (cut short?)"),
    (b'{"a":{"dtype":"F32",}}', "invalid JSON in header at byte 20: expected a field name (string)"),
    (b'{"a" {}}', "invalid JSON in header at byte 5: expected ':'"),
    (b'{} x', "invalid JSON in header at byte 3: unexpected data after the header's JSON object"),
    (b'{"__metadata__":{},}', "expected a tensor name"),
    (b'{"abc', "unterminated string"),
    (b'{"a\tb":{}}', "control character inside a string"),
    (b'{"a\\qb":{}}', "invalid escape"),
    (b'{"\\ud800":{}}', "high surrogate"),
    (b'{"\\udc00":{}}', "lone low surrogate"),
    (b'{"\\u12G4":{}}', "4 hex digits"),
    (b'{"a\\u0000":{}}', "NUL"),
    (b'{"x":{"shape":[01]}}', "expected ',' or ']'"),
    (b'{"x":{"extra":tru}}', "expected a JSON value"),
    (b'{"x":{"extra":' + b"[" * 100 + b"]" * 100 + b"}}", "nested too deeply"),
    (b'{"caf\xc3":{}}', "not valid UTF-8"),
    (b'{"\xed\xa0\x80":{}}', "not valid UTF-8"),  # an encoded surrogate
    (b"{}\x00", "unexpected data"),
])
def test_invalid_json(tmp_path, text, complaint):
    expect_error(tmp_path, st_util.pack(text, align=0), complaint)


def test_utf8_rule_is_unicodes(tmp_path):
    """The header's UTF-8 check (csrc/fl_utf8.h, also GGUF's name display) agrees with Python's strict decoder on every
    sequence of up to 3 bytes drawn from the boundaries of Unicode's well-formed table (overlongs, surrogates, above
    U+10FFFF, stray and missing continuation bytes), each followed by ASCII and by a 4th byte of the alphabet."""
    edges = [0x41, 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1, 0xec, 0xed, 0xee,
             0xef, 0xf0, 0xf1, 0xf3, 0xf4, 0xf5, 0xff]
    import itertools
    seqs = [bytes(t) for n in (1, 2, 3) for t in itertools.product(edges, repeat=n)]
    seqs += [b"\xf0\x90\x80\x80", b"\xf4\x8f\xbf\xbf", b"\xf4\x90\x80\x80", b"\xf0\x8f\xbf\xbf", b"\xf1\x80\x80\x7f"]
    p = tmp_path / "u.safetensors"
    wrong = []
    for q in seqs:
        key = b"k" + q + b"z"
        try:
            key.decode("utf-8")
            valid, at = True, None
        except UnicodeDecodeError as e:
            valid, at = False, 2 + e.start  # the header starts '{"
        p.write_bytes(st_util.pack(b'{"' + key + b'":{}}', align=0))
        try:
            SafetensorsFile(str(p))
            said_bad = False
        except CheckpointError as e:
            said_bad = "not valid UTF-8" in str(e)
            if said_bad and f"header byte {at})" not in str(e):  # the same first bad byte as Python's
                wrong.append((q, str(e)[-40:]))
        if said_bad == valid:
            wrong.append((q, valid))
    assert not wrong, wrong[:10]


def test_error_message_escapes_odd_names(tmp_path):
    name = "bad\nname" + "x" * 500
    header = {name: {"dtype": "F17", "shape": [1], "data_offsets": [0, 1]}}
    p = st_util.write_header(tmp_path / "odd.safetensors", header, bytes(1))
    with pytest.raises(CheckpointError) as ei:
        SafetensorsFile(p)
    msg = str(ei.value)
    assert "bad\\x0aname" in msg and "..." in msg and "\n" not in msg and "unknown dtype 'F17'" in msg


# ----------------------------------------------------------------------------------------------
# fuzz: mutated headers must load cleanly or raise a clean error, never crash
# ----------------------------------------------------------------------------------------------
def test_fuzz_header_mutations(tmp_path):
    header, data = st_util.layout({"a.weight": f32((3, 4)), "b": np.arange(5, dtype=np.int16),
                                   "c": ("BF16", np.arange(6, dtype=np.uint16).reshape(2, 3))},
                                  metadata={"format": "pt", "k": "v\u00e9"})
    good = st_util.pack(header, data)
    hlen = struct.unpack("<Q", good[:8])[0]
    rng = random.Random(1234)
    junk = b'{}[]",:-0123456789.eE \\u\xc3\xff\x00'
    path = tmp_path / "fuzz.safetensors"
    outcomes = {"ok": 0, "error": 0}
    for it in range(600):
        raw = bytearray(good)
        kind = it % 6
        if kind == 0:  # flip bits in the header
            for _ in range(rng.randint(1, 4)):
                i = rng.randrange(8, 8 + hlen)
                raw[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # structural junk
            for _ in range(rng.randint(1, 3)):
                raw[rng.randrange(8, 8 + hlen)] = junk[rng.randrange(len(junk))]
        elif kind == 2:  # truncate anywhere
            raw = raw[:rng.randrange(0, len(raw))]
        elif kind == 3:  # change a digit (offsets, shapes)
            digits = [i for i in range(8, 8 + hlen) if 48 <= raw[i] <= 57]
            i = rng.choice(digits)
            raw[i] = rng.choice(b"0123456789")
        elif kind == 4:  # the length field
            raw[0:8] = struct.pack("<Q", max(0, hlen + rng.randint(-20, 20)))
        else:  # delete or duplicate a span of the header
            i = rng.randrange(8, 8 + hlen)
            j = min(8 + hlen, i + rng.randint(1, 12))
            raw = raw[:i] + (raw[i:j] * 2 if rng.random() < 0.5 else b"") + raw[j:]
            raw[0:8] = struct.pack("<Q", hlen + (len(raw) - len(good)))
        path.write_bytes(bytes(raw))
        try:
            f = SafetensorsFile(path)
        except CLEAN_ERRORS as e:
            assert str(path) in str(e)
            outcomes["error"] += 1
            continue
        with f:
            for k in f.keys():
                a = f.get(k)
                a.tobytes()
                dt, shape, b, e = f.info(k)
                assert 0 <= b <= e <= len(raw) and a.nbytes == e - b
            f.metadata
        outcomes["ok"] += 1
    assert outcomes["error"] > 100 and outcomes["ok"] > 10, outcomes
