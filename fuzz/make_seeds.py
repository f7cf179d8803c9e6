"""Write the seed corpus of the fuzzers: fuzz/corpus/<harness>/ (run from anywhere; deterministic).

    python3 fuzz/make_seeds.py          # rewrites fuzz/corpus/{fuzz_safetensors,fuzz_gguf,fuzz_python}/

fuzz_safetensors seeds are the harness's input format: 8 bytes little-endian data_len, then the
header JSON. fuzz_gguf seeds are whole GGUF files. fuzz_python seeds are plain bytes that the
harness's FuzzedDataProvider turns into choices (its files are built from tiny_models.py).
Everything stays small (< 1 MB in all)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_models as tm  # noqa: E402
from tiny_models import GGML, BLOCK, GGUFWriter, T  # noqa: E402
import st_util  # noqa: E402  (tests/, put on the path by tiny_models)
import gguf_util  # noqa: E402


def st_seed(header, data_len, align=8):
    h = st_util.header_bytes(header, align)
    return struct.pack("<Q", data_len) + h


def st_seeds():
    out = {}
    for dt in ("F32", "BF16", "F16"):
        _, tensors = tm.st_model(dtype=dt)
        h, data = tm.st_header_and_data(tensors, {"format": "pt"})
        out[f"model-{dt}"] = st_seed(h, len(data))
    # every dtype, with a scalar, a zero-size tensor and metadata
    t = {}
    for dt, size in st_util.ST_SIZE.items():
        t[f"t.{dt.lower()}"] = (dt, np.zeros((2, 3), dtype=np.dtype(f"u{size}") if size in (1, 2, 4, 8) else np.uint8))
    t["scalar"] = ("F32", np.zeros((), np.float32))
    t["empty"] = ("F16", np.zeros((0, 5), np.float16))
    t["eight.dims"] = ("U8", np.zeros((1, 2, 1, 2, 1, 2, 1, 2), np.uint8))
    h, data = st_util.layout(t, {"format": "pt", "note": "caf\u00e9 \u2603", "empty": ""})
    out["all-dtypes"] = st_seed(h, len(data))
    out["empty-header"] = st_seed("{}", 0)
    out["metadata-only"] = st_seed({"__metadata__": {"a": "b", "c": "d"}}, 0)
    out["metadata-null"] = st_seed('{"__metadata__":null}', 0)
    # hand-written JSON: escapes, unknown nested fields, whitespace, order of fields
    out["escapes"] = st_seed(
        '{ "na\\u00efve\\n\\"q\\"\\ud83d\\ude00" : {"data_offsets":[0,4],"shape":[1],"dtype":"F32",'
        '"extra":{"x":[1,-2.5e-3,true,false,null,{"y":"\\/"}]}} ,\n\t"b":{"dtype":"I8","shape":[4],'
        '"data_offsets":[4,8]}}', 8, align=0)
    out["padded"] = st_seed('{"w":{"dtype":"BF16","shape":[2,2],"data_offsets":[0,8]}}' + " " * 40, 8, align=0)
    # near misses (error paths): overlap, gap, duplicate, reversed, too many dims, unsupported dtype
    out["overlap"] = st_seed('{"a":{"dtype":"U8","shape":[4],"data_offsets":[0,4]},'
                             '"b":{"dtype":"U8","shape":[4],"data_offsets":[2,6]}}', 6)
    out["duplicate"] = st_seed('{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
                               '"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', 2)
    out["big-numbers"] = st_seed('{"a":{"dtype":"F64","shape":[0,9223372036854775807,9223372036854775807],'
                                 '"data_offsets":[18446744073709551615,18446744073709551615]}}', 2**64 - 1)
    out["f4"] = st_seed('{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', 1)
    # many tensors (index sort paths)
    many = {f"layers.{i}.w": ("U8", np.zeros((i % 3 + 1,), np.uint8)) for i in range(40)}
    h, data = st_util.layout(many)
    out["many-tensors"] = st_seed(h, len(data))
    return out


def gguf_seeds():
    out = {}
    out["model-llama-gpt2"] = tm.gguf_model(arch="llama", tokenizer="gpt2").to_bytes()
    out["model-qwen2-spm"] = tm.gguf_model(arch="qwen2", tokenizer="llama").to_bytes()
    out["model-llama-kquants"] = tm.gguf_model(
        arch="llama", tokenizer="llama", types=[GGML.Q8_0, GGML.Q4_1, GGML.Q5_0, GGML.F16]).to_bytes(version=2)
    # metadata of every value type, empty and non-empty arrays of each
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    for name, vt, v in (("u8", T.UINT8, 200), ("i8", T.INT8, -5), ("u16", T.UINT16, 60000), ("i16", T.INT16, -300),
                        ("u32", T.UINT32, 4000000000), ("i32", T.INT32, -7), ("f32", T.FLOAT32, 0.5),
                        ("bool", T.BOOL, True), ("u64", T.UINT64, 2**63), ("i64", T.INT64, -2**40),
                        ("f64", T.FLOAT64, 1e-300)):
        w.add(f"test.scalar.{name}", v, vt)
        w.add(f"test.array.{name}", [v, v], T.ARRAY, vt)
        w.add(f"test.empty.{name}", [], T.ARRAY, vt)
    w.add("test.string", "caf\u00e9 \u2603")
    w.add("test.string.empty", "")
    w.add("test.array.str", ["", "a", "\u00e9\u00e9", "x" * 40])
    w.add("test.empty.str", [], T.ARRAY, T.STRING)
    w.add("test.\u00fcnicode.key", 1, T.UINT32)
    w.add("general.alignment", 64, T.UINT32)
    w.add_tensor("v", np.arange(8, dtype=np.float32), GGML.F32, ne=[8])
    out["metadata-all-types"] = w.to_bytes()
    # one tensor of every block type (2 rows of one block), and the plain integer types
    rng = np.random.default_rng(1)
    w = GGUFWriter()
    w.add("general.architecture", "zoo")
    for tid, (be, bb) in sorted(BLOCK.items()):
        if tid in (GGML.I8, GGML.I16, GGML.I32, GGML.I64, GGML.Q8_1, GGML.IQ4_NL):
            w.add_tensor(f"t{tid}", rng.integers(0, 256, size=2 * bb, dtype=np.uint8).tobytes(), tid, ne=[be, 2])
        else:
            w.add_tensor(f"t{tid}", tm.quant_bytes(rng, tid, 2 * be), tid, ne=[be, 2])
    out["quant-zoo"] = w.to_bytes()
    for tid in (GGML.Q2_K, GGML.Q3_K, GGML.Q4_K, GGML.Q5_K, GGML.Q6_K, GGML.Q8_K):
        w = GGUFWriter()
        w.add_tensor("w", tm.quant_bytes(rng, tid, 4 * 256), tid, ne=[256, 4])
        w.add_tensor("z", b"", tid, ne=[256, 0])
        out[f"kquant-{tid}"] = w.to_bytes()
    # tokenizer-like vocabulary: 300 byte-level tokens, merges, scores, types
    toks = ["<unk>", "<s>", "</s>"] + [chr(0x21 + i) for i in range(94)] + [f"t{i}" for i in range(203)]
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    w.add("tokenizer.ggml.model", "gpt2")
    w.add("tokenizer.ggml.pre", "llama-bpe")
    w.add("tokenizer.ggml.tokens", toks)
    w.add("tokenizer.ggml.scores", [-float(i) for i in range(len(toks))], T.ARRAY, T.FLOAT32)
    w.add("tokenizer.ggml.token_type", [3, 3, 3] + [1] * (len(toks) - 3), T.ARRAY, T.INT32)
    w.add("tokenizer.ggml.merges", [f"t {i}" for i in range(50)])
    w.add("tokenizer.ggml.bos_token_id", 1, T.UINT32)
    out["tokenizer-vocab"] = w.to_bytes()
    # headers only / odd but valid
    out["empty-v3"] = GGUFWriter().to_bytes()
    w = GGUFWriter(alignment=1)
    w.add("general.alignment", 1, T.UINT32)
    w.add_tensor("a", b"\x01\x02", GGML.I8, ne=[2])
    w.add_tensor("b", np.ones(3, np.float16).tobytes(), GGML.F16, ne=[3, 1, 1, 1])
    out["align-1"] = w.to_bytes()
    return out


def python_seeds():
    rng = np.random.default_rng(7)
    out = {}
    for i in range(24):
        out[f"rand-{i:02d}"] = rng.integers(0, 256, size=int(rng.integers(8, 400)), dtype=np.uint8).tobytes()
    out["zeros"] = b"\0" * 64
    out["ones"] = b"\xff" * 64
    # whole torch zips (fuzz_python.py reads an input that starts with PK\x03\x04 as a pytorch_model.bin):
    # the tests' fixtures written by torch.save (tools/make_bin_fixtures.py), the valid ones and the refused
    # zips (a deflated copy, a nested dict, complex, a transposed view); not the sharded llama_bin (over
    # run.sh's -max_len) nor legacy.bin (no zip)
    bins = os.path.join(HERE, "..", "tests", "fixtures", "torch_bin")
    for rel in ("qwen2_bin/pytorch_model.bin", "odd/views.bin", "odd/p4.bin", "odd/compressed.bin", "odd/nested.bin",
                "odd/complex.bin", "odd/noncontig.bin"):
        with open(os.path.join(bins, rel), "rb") as f:
            out["bin-" + rel.replace("/", "-")] = f.read()
    return out


def write(harness, seeds):
    d = os.path.join(HERE, "corpus", harness)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    total = 0
    for name, data in sorted(seeds.items()):
        with open(os.path.join(d, name), "wb") as f:
            f.write(data)
        total += len(data)
    print(f"{harness}: {len(seeds)} seeds, {total} bytes")
    return total


if __name__ == "__main__":
    total = write("fuzz_safetensors", st_seeds()) + write("fuzz_gguf", gguf_seeds()) + write("fuzz_python", python_seeds())
    print(f"total {total} bytes")
    assert total < 1 << 20, "seed corpus over 1 MB"
