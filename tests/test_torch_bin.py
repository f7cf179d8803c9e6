"""PyTorch .bin checkpoints (torch.save's zip format), read by fastload/torchbin.py without running pickle code.

Valid files come from torch.save itself (tests/fixtures/torch_bin/, written by tools/make_bin_fixtures.py);
hostile and broken ones are built here byte by byte (tests/torchbin_util.py). Every bad input must raise
CheckpointError naming the file and the culprit; nothing may run, crash, hang or read outside the file."""
import os
import pickle
import random
import shutil
import struct
import zipfile

import numpy as np
import pytest

import fastload
from fastload import _C, torchbin
from golden_util import FIXTURES, model_dir
from torchbin_util import (EMPTY_DICT, MARK, PROTO2, REDUCE, SETITEM, SETITEMS, STOP, Tensor, archive, glob, num,
                           ordered_dict, state_dict_pickle, storages_of, tup, uni, write)

BIN = FIXTURES / "torch_bin"
IDS = np.array([[1, 5, 9, 3, 7, 11, 2, 4, 8, 6], [1, 12, 30, 3, 2, 0, 17, 9, 21, 5]])
CheckpointError = fastload.CheckpointError


def load(path, **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", torch_dtype="float32", **kw)


def f32(n=6, seed=0):
    return np.random.default_rng(seed).standard_normal(n).astype(np.float32)


# ------------------------------------------------------------------------------------------ files from torch.save
def test_sharded_llama_bin_logits_equal_safetensors():
    a, b = load(BIN / "llama_bin"), load(model_dir("llama"))
    la, lb = a(IDS).logits, b(IDS).logits
    assert la.dtype == lb.dtype == np.float32
    assert np.array_equal(la, lb)
    assert a._source["kind"] == "torch_bin" and b._source["kind"] == "safetensors"
    assert a.load_stats["files"] == 2


def test_single_qwen2_bin_logits_equal_safetensors(tmp_path):
    src = BIN / "qwen2_bin"
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, tmp_path / f)
    shutil.copy(src / "reference.safetensors", tmp_path / "model.safetensors")
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # lm_head.weight shares embed_tokens' storage: no "unused tensor" warning
        a = load(src)
    b = load(tmp_path)
    assert np.array_equal(a(IDS % 64).logits, b(IDS % 64).logits)
    assert a(IDS % 64).logits.std() > 1  # not a degenerate model


def test_bin_reload_to_other_dtype():
    m = load(BIN / "llama_bin")
    ref = load(model_dir("llama")).to(dtype="bfloat16")
    m = m.to(dtype="bfloat16")  # reloads from the .bin files (model._source)
    assert str(m.dtype) == "bfloat16"
    assert np.array_equal(m(IDS).logits, ref(IDS).logits)


def test_safetensors_preferred_over_bin(tmp_path):
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    for f in model_dir("llama").iterdir():
        if f.name.startswith("model"):
            shutil.copy(f, tmp_path)
    assert load(tmp_path)._source["kind"] == "safetensors"


def test_views_values():
    """Tied names, fp16/bf16 views at storage offsets, 0-d, empty, size-1 dims, a Parameter, ints, bool,
    uint16 through _rebuild_tensor_v3: every value equals what torch saved."""
    f = torchbin.open_file(str(BIN / "odd" / "views.bin"))
    ref = np.load(BIN / "odd" / "views.npz")
    assert sorted(f.keys()) == sorted(ref.files)
    for n in ref.files:
        got = f.get(n)
        assert got.shape == ref[n].shape and got.tobytes() == ref[n].tobytes(), n
    table = {t[0]: t for t in torchbin.read_table(str(BIN / "odd" / "views.bin"))}
    assert table["tied.a"][3:] == table["tied.b"][3:]  # one storage, two names
    assert table["half.rows"][1:3] == ("F16", (3, 4))
    assert table["half.rows"][3] % 64 == 16  # element offset 8 in a 64-byte aligned storage
    assert table["u16"][1] == "U16" and table["bf16.row"][1] == "BF16" and table["scalar"][2] == ()
    f.close()


def test_protocol4_file():
    f = torchbin.open_file(str(BIN / "odd" / "p4.bin"))
    assert np.array_equal(f.get("a"), np.arange(6, dtype=np.float32).reshape(2, 3))


@pytest.mark.parametrize("name, match", [
    ("noncontig", r"tensor 't': not contiguous \(shape \[4, 3\], stride \[1, 4\]\).*contiguous\(\)"),
    ("nested", r"key 'model' holds a dict, not a tensor: a nested checkpoint"),
    ("complex", r"global 'torch\.ComplexFloatStorage' is not allowed.*complex tensors are not supported"),
    ("compressed", r"compressed entry 'views/[a-z.]+' \(zip method 8\).*Re-save it with torch\.save"),
    ("legacy", r"legacy serialization format.*torch\.save\(torch\.load\(path, weights_only=True\), path\)"),
])
def test_refused_fixture(name, match):
    path = str(BIN / "odd" / f"{name}.bin")
    with pytest.raises(CheckpointError, match=match) as e:
        torchbin.open_file(path)
    assert str(e.value).startswith(path + ":")


def test_model_dir_errors_name_the_shard(tmp_path):
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    shard = tmp_path / "pytorch_model-00002-of-00002.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin: no zip end-of-central-directory"):
        load(tmp_path)
    shard.unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin\.index\.json: shard 'pytorch_model-00002-of-00002"
                                              r"\.bin' is listed in weight_map but .* does not exist"):
        load(tmp_path)


def test_index_names_tensor_missing_from_shard(tmp_path):
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    import json
    idx = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    idx["weight_map"]["model.extra.weight"] = "pytorch_model-00001-of-00002.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"tensor 'model\.extra\.weight' is listed in .*pytorch_model\.bin\.index"):
        load(tmp_path)


def test_index_shard_name_contained(tmp_path):
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    import json
    idx = json.loads((tmp_path / "pytorch_model.bin.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = "../pytorch_model.bin"
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=r"shard name in pytorch_model\.bin\.index\.json '\.\./pytorch_model\.bin'"):
        load(tmp_path)


# ------------------------------------------------------------------------------------------ hostile pickles
class Evil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return os.system, (self.cmd,)


class EvalEvil:
    def __init__(self, cmd):
        self.cmd = cmd

    def __reduce__(self):
        return eval, (f"__import__('os').system({self.cmd!r})",)


@pytest.mark.parametrize("proto", [2, 4])
@pytest.mark.parametrize("cls, name", [(Evil, r"(os|posix)\.system"), (EvalEvil, r"(__builtin__|builtins)\.eval")])
def test_reduce_payload_never_runs(tmp_path, proto, cls, name):
    marker = tmp_path / "pwned"
    pkl = pickle.dumps({"w": cls(f"touch {marker}")}, protocol=proto)  # pickled here, never unpickled
    path = write(tmp_path / "evil.bin", pkl, {})
    with pytest.raises(CheckpointError, match=rf"evil\.bin: data\.pkl byte \d+: global '{name}' is not allowed"):
        torchbin.read_table(path)
    assert not marker.exists()


@pytest.mark.parametrize("module, name", [("os", "system"), ("posix", "system"), ("builtins", "eval"),
                                          ("builtins", "exec"), ("__builtin__", "eval"), ("subprocess", "Popen"),
                                          ("torch", "load"), ("torch._utils", "_rebuild_qtensor"),
                                          ("torch.serialization", "_get_layout"), ("collections", "defaultdict"),
                                          ("numpy.core.multiarray", "_reconstruct"), ("torch", "Size")])
def test_unknown_global(tmp_path, module, name):
    marker = tmp_path / "pwned"
    pkl = PROTO2 + glob(module, name) + tup(uni(f"touch {marker}")) + REDUCE + STOP
    path = write(tmp_path / "g.bin", pkl, {})
    with pytest.raises(CheckpointError, match=rf"g\.bin: data\.pkl byte 2: global '{module}\.{name}' is not allowed"):
        torchbin.read_table(path)
    assert not marker.exists()


def test_stack_global_unknown(tmp_path):
    pkl = b"\x80\x04" + b"\x8c\x02os" + b"\x8c\x06system" + b"\x93" + tup(uni("true")) + REDUCE + STOP
    with pytest.raises(CheckpointError, match=r"global 'os\.system' is not allowed"):
        torchbin.read_table(write(tmp_path / "s.bin", pkl, {}))


@pytest.mark.parametrize("body, opname", [
    (b"i" + b"os\nsystem\n" + MARK + uni("true"), "INST"),
    (MARK + glob("collections", "OrderedDict") + b"o", "OBJ"),
    (b"\x82\x01", "EXT1"),
    (b"\x83\x01\x00", "EXT2"),
    (b"P0\n", "PERSID"),
    (glob("collections", "OrderedDict") + b")" + b"\x81", "NEWOBJ"),
    (b"B\x01\x00\x00\x00x", "BINBYTES"),
    (b"S'x'\n", "STRING"),
    (b"I1\n", "INT"),
    (b"\x8b\x01\x00\x00\x00\x01", "LONG4"),
    (b"\xff", "opcode 0xff"),
])
def test_unknown_opcode(tmp_path, body, opname):
    pkl = PROTO2 + body + STOP
    with pytest.raises(CheckpointError, match=rf"data\.pkl byte \d+: {opname} \(0x[0-9a-f]{{2}}\) is not an opcode "
                                              r"torch\.save writes"):
        torchbin.read_table(write(tmp_path / "op.bin", pkl, {}))


def _sd_file(tmp_path, sd, name="sd.bin", **kw):
    return write(tmp_path / name, state_dict_pickle(sd), storages_of(sd), **kw)


def test_handmade_state_dict_reads(tmp_path):
    x = f32(12)
    sd = {"a": Tensor("torch FloatStorage", "0", x, size=(3, 4)),
          "b": Tensor("torch FloatStorage", "0", x, offset=4, size=(2, 4)),  # shares storage 0
          "h": Tensor("torch HalfStorage", "1", x.astype(np.float16), offset=2, size=(5,))}
    f = torchbin.open_file(_sd_file(tmp_path, sd))
    assert np.array_equal(f.get("a"), x.reshape(3, 4))
    assert np.array_equal(f.get("b"), x[4:].reshape(2, 4))
    assert np.array_equal(f.get("h"), x.astype(np.float16)[2:7])


@pytest.mark.parametrize("kw, match", [
    (dict(offset=10, size=(3,)), r"tensor 'w': shape \[3\] of F32 at element offset 10 needs bytes 40\.\.52 of "
                                 r"storage '0', which has 24 bytes"),
    (dict(size=(7,)), r"tensor 'w': shape \[7\] of F32 .* needs bytes 0\.\.28 of storage '0', which has 24"),
    (dict(size=(2, 2 ** 62)), r"tensor 'w': shape \[2, 4611686018427387904\] at element offset 0 is too large"),
    (dict(offset=2 ** 62, size=(3,)), r"tensor 'w': shape \[3\] at element offset 4611686018427387904 is too large"),
    (dict(offset=-1), r"storage offset is -1 \(an integer in \[0, 2\^63\) expected\)"),
    (dict(offset=2 ** 70), r"storage offset is a huge integer"),
    (dict(size=(-2,)), r"a dimension is -2"),
    (dict(size=(2,) * 9, stride=(1,) * 9), r"a tensor with 9 dimensions \(at most 8\)"),
    (dict(size=(2, 3), stride=(1, 2)), r"tensor 'w': not contiguous \(shape \[2, 3\], stride \[1, 2\]\)"),
    (dict(size=(2, 3), stride=(3,)), r"size and stride must be tuples of the same length"),
    (dict(numel=100), r"tensor 'w': its storage '0' \(torch\.FloatStorage, 100 elements = 400 bytes\) is larger "
                      r"than its zip entry \(24 bytes\)"),
    (dict(numel=-5), r"storage '0' element count is -5"),
])
def test_out_of_range_tensors(tmp_path, kw, match):
    t = Tensor("torch FloatStorage", "0", f32(6), **kw)
    with pytest.raises(CheckpointError, match=match):
        torchbin.read_table(_sd_file(tmp_path, {"w": t}))


def test_storage_key_not_in_zip(tmp_path):
    t = Tensor("torch FloatStorage", "7", f32(6))
    path = write(tmp_path / "k.bin", state_dict_pickle({"w": t}), {"0": t.data})
    with pytest.raises(CheckpointError, match=r"k\.bin: tensor 'w': its storage '7' has no entry 'archive/data/7'"):
        torchbin.read_table(path)
    for key in ("../../../etc/passwd", "/etc/passwd", "0/../0"):
        t = Tensor("torch FloatStorage", key, f32(6))
        path = write(tmp_path / "k.bin", state_dict_pickle({"w": t}), {"0": t.data})
        with pytest.raises(CheckpointError, match=r"has no entry .* in the zip archive"):
            torchbin.read_table(path)


def test_storage_type_must_be_storage(tmp_path):
    t = Tensor("torch float32", "0", f32(6))
    with pytest.raises(CheckpointError, match=r"storage type global torch\.float32 is not a storage type"):
        torchbin.read_table(_sd_file(tmp_path, {"w": t}))
    t = Tensor("collections OrderedDict", "0", f32(6))
    with pytest.raises(CheckpointError, match=r"storage type global collections\.OrderedDict is not a storage type"):
        torchbin.read_table(_sd_file(tmp_path, {"w": t}))


def test_same_storage_key_two_types(tmp_path):
    a = Tensor("torch FloatStorage", "0", f32(6))
    b = Tensor("torch HalfStorage", "0", f32(6))
    with pytest.raises(CheckpointError, match=r"storage '0' appears twice with different types or sizes"):
        torchbin.read_table(_sd_file(tmp_path, {"a": a, "b": b}))


@pytest.mark.parametrize("pkl, match", [
    (PROTO2 + MARK * 100000 + STOP, r"MARKs nested deeper than 64"),
    (PROTO2 + b"\x85" + STOP, r"TUPLE1 on an empty stack"),
    (PROTO2 + SETITEMS + STOP, r"SETITEMS without a MARK"),
    (PROTO2 + STOP, r"STOP with 0 values on the stack"),
    (PROTO2 + num(1) + num(2) + STOP, r"STOP with 2 values on the stack"),
    (PROTO2 + MARK + num(1) + STOP, r"STOP with 1 values on the stack and 1 open MARKs"),
    (PROTO2 + b"h\x05" + STOP, r"BINGET 5: no such memo entry"),
    (PROTO2 + b"j\x00\x00\x01\x00" + STOP, r"LONG_BINGET 65536: no such memo entry"),
    (PROTO2 + b"q\x00" + STOP, r"BINPUT on an empty stack"),
    (PROTO2 + EMPTY_DICT + num(1) + uni("x") + SETITEM + STOP, r"state dict key 1 is not a string"),
    (PROTO2 + EMPTY_DICT + tup() + uni("x") + SETITEM + STOP, r"SETITEM with a tuple of 0 as a dict key"),
    (PROTO2 + EMPTY_DICT + uni("") + num(1) + SETITEM + STOP, r"state dict key '' is empty"),
    (PROTO2 + EMPTY_DICT + uni("a\x00b") + num(1) + SETITEM + STOP, r"key 'a\\x00b' is empty or contains NUL"),
    (PROTO2 + EMPTY_DICT + uni("w") + num(1) + SETITEM + STOP, r"key 'w' holds 1, not a tensor"),
    (PROTO2 + EMPTY_DICT + MARK + uni("w") + SETITEMS + STOP, r"SETITEMS with an odd number of values"),
    (PROTO2 + num(1) + uni("k") + uni("v") + SETITEM + STOP, r"SETITEM on 1 \(a dict expected\)"),
    (PROTO2 + uni("k") + uni("v") + SETITEM + STOP, r"SETITEM on an empty stack"),
    (PROTO2 + b"]" + b"\x85" + num(1) + b"a" + STOP, r"APPEND to a tuple of 1 \(a list expected\)"),
    (PROTO2 + num(1) + b"\x85" * 200000 + STOP, r"holds a tuple of 1, not a state dict"),  # no recursion
    (PROTO2 + b"]" + STOP, r"holds a list, not a state dict"),
    (PROTO2 + EMPTY_DICT + EMPTY_DICT + b"b" + STOP, r"BUILD of a dict with a dict: only an OrderedDict's"),
    (PROTO2 + ordered_dict() + num(3) + b"b" + STOP, r"BUILD of an OrderedDict with 3"),
    (PROTO2 + glob("collections", "OrderedDict") + tup(num(1)) + REDUCE + STOP,
     r"collections\.OrderedDict called with 1 arguments"),
    (PROTO2 + num(5) + b")" + REDUCE + STOP,
     r"REDUCE calls 5, which is not a function"),
    (PROTO2 + glob("torch", "FloatStorage") + b")" + REDUCE + STOP,
     r"REDUCE of torch\.FloatStorage, which is a type or dtype"),
    (PROTO2 + glob("torch._utils", "_rebuild_tensor_v2") + num(1) + REDUCE + STOP,
     r"REDUCE of torch\._utils\._rebuild_tensor_v2 with 1 as arguments"),
    (PROTO2 + glob("torch._utils", "_rebuild_tensor_v2") + tup(num(1)) + REDUCE + STOP,
     r"_rebuild_tensor_v2 with 1 arguments \(6 or 7 expected\)"),
    (PROTO2 + glob("torch._utils", "_rebuild_tensor_v2") + tup(*[num(0)] * 6) + REDUCE + STOP,
     r"_rebuild_tensor_v2: its first argument is 0, not a storage"),
    (PROTO2 + glob("torch._utils", "_rebuild_parameter") + tup(num(0), num(0), num(0)) + REDUCE + STOP,
     r"_rebuild_parameter needs \(tensor, requires_grad, hooks\)"),
    (PROTO2 + tup(uni("storage")) + b"Q" + STOP, r"persistent id a tuple of 1: only \('storage', type, key"),
    (PROTO2 + num(3) + b"Q" + STOP, r"persistent id 3"),
    (PROTO2 + b"\x80\x09" + STOP, r"pickle protocol 9"),
    (PROTO2 + b"X\xff\xff\xff\x7f" + STOP, r"BINUNICODE needs 2147483647 bytes but data\.pkl ends"),
    (PROTO2 + b"X\x02\x00\x00\x00\xff\xfe" + STOP, r"BINUNICODE: a string that is not valid UTF-8"),
    (PROTO2 + b"\x8a\xff" + b"\x01" * 255 + STOP, r"holds a huge integer, not a state dict"),
    (PROTO2 + b"c" + b"o" * 300 + STOP, r"GLOBAL: no newline-terminated name within 256 bytes"),
    (PROTO2 + b"\x95" + struct.pack("<Q", 2 ** 40) + STOP, r"FRAME of 1099511627776 bytes runs past"),
    (PROTO2 + ordered_dict(), r"data\.pkl ends without a STOP opcode"),
    (PROTO2 + ordered_dict() + STOP + b"junk", r"4 bytes follow STOP"),
    (b"", r"data\.pkl ends without a STOP opcode"),
])
def test_malformed_pickles(tmp_path, pkl, match):
    with pytest.raises(CheckpointError, match=match) as e:
        torchbin.read_table(write(tmp_path / "m.bin", pkl, {}))
    assert str(e.value).startswith(str(tmp_path / "m.bin") + ": ")


def test_build_metadata_and_parameter(tmp_path):
    """The OrderedDict's _metadata (BUILD) and nn.Parameter (_rebuild_parameter) as torch writes them."""
    t = Tensor("torch FloatStorage", "0", f32(6))
    param = glob("torch._utils", "_rebuild_parameter") + tup(t.pickle(), b"\x88", ordered_dict()) + REDUCE
    meta = EMPTY_DICT + uni("_metadata") + ordered_dict() + uni("") + EMPTY_DICT + uni("version") + num(1) + \
        SETITEM + SETITEM + SETITEM + b"b"
    pkl = PROTO2 + ordered_dict() + MARK + uni("p") + param + SETITEMS + meta + STOP
    assert [r[0] for r in torchbin.read_table(write(tmp_path / "p.bin", pkl, {"0": t.data}))] == ["p"]


def test_rebuild_v3_needs_dtype(tmp_path):
    t = Tensor("torch.storage UntypedStorage", "0", np.zeros(12, np.uint8), size=(6,))
    pid = tup(uni("storage"), glob("torch.storage", "UntypedStorage"), uni("0"), uni("cpu"), num(12)) + b"Q"
    good = glob("torch._utils", "_rebuild_tensor_v3") + tup(pid, num(0), tup(num(6)), tup(num(1)), b"\x89",
                                                              ordered_dict(), glob("torch", "uint16")) + REDUCE
    pkl = PROTO2 + EMPTY_DICT + uni("u") + good + SETITEM + STOP
    assert torchbin.read_table(write(tmp_path / "v3.bin", pkl, {"0": t.data}))[0][1:3] == ("U16", (6,))
    bad = good.replace(glob("torch", "uint16"), num(3))
    with pytest.raises(CheckpointError, match=r"_rebuild_tensor_v3: its dtype argument is 3, not a dtype"):
        torchbin.read_table(write(tmp_path / "v3.bin", PROTO2 + EMPTY_DICT + uni("u") + bad + SETITEM + STOP,
                                  {"0": t.data}))
    v2 = good.replace(b"_rebuild_tensor_v3", b"_rebuild_tensor_v2").replace(glob("torch", "uint16"), b"")
    with pytest.raises(CheckpointError, match=r"_rebuild_tensor_v2 on an untyped storage"):
        torchbin.read_table(write(tmp_path / "v3.bin", PROTO2 + EMPTY_DICT + uni("u") + v2 + SETITEM + STOP,
                                  {"0": t.data}))


# ------------------------------------------------------------------------------------------ the zip container
def _good(tmp_path, **kw):
    sd = {"w": Tensor("torch FloatStorage", "0", f32(6))}
    return archive(state_dict_pickle(sd), storages_of(sd), **kw)


def test_truncated_zips(tmp_path):
    for src in (BIN / "odd" / "views.bin", BIN / "qwen2_bin" / "pytorch_model.bin"):
        data = src.read_bytes()
        cuts = sorted({0, 1, 3, 4, 21, 22, 30, 64, 100, len(data) // 2, len(data) - 100, len(data) - 23,
                       len(data) - 22, len(data) - 1} | set(range(0, len(data), max(1, len(data) // 40))))
        for cut in cuts:
            p = tmp_path / "t.bin"
            p.write_bytes(data[:cut])
            with pytest.raises(CheckpointError, match=r"t\.bin: ") as e:
                torchbin.read_table(str(p))
            assert "Traceback" not in str(e.value)


def test_empty_and_not_zip(tmp_path):
    (tmp_path / "e.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"not a PyTorch zip checkpoint .*the file is empty"):
        torchbin.read_table(str(tmp_path / "e.bin"))
    (tmp_path / "t.bin").write_bytes(b"hello world, not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"not a PyTorch zip checkpoint"):
        torchbin.read_table(str(tmp_path / "t.bin"))


def test_compressed_storage_entry(tmp_path):
    p = tmp_path / "c.bin"
    p.write_bytes(_good(tmp_path, compress_storages=True))
    with pytest.raises(CheckpointError, match=r"c\.bin: storage '0': compressed entry 'archive/data/0' "
                                              r"\(zip method 8\); torch\.save writes every entry stored"):
        torchbin.read_table(str(p))


def test_wrong_byteorder(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(_good(tmp_path, byteorder=b"big"))
    with pytest.raises(CheckpointError, match=r"byteorder is b'big'; only little-endian"):
        torchbin.read_table(str(p))
    p.write_bytes(_good(tmp_path, byteorder=None))  # torch < 1.13 wrote none: little-endian
    assert torchbin.read_table(str(p))[0][0] == "w"


def test_no_data_pkl_or_prefix(tmp_path):
    p = tmp_path / "z.bin"
    from torchbin_util import zip_bytes
    p.write_bytes(zip_bytes([("archive/other.pkl", b"x")]))
    with pytest.raises(CheckpointError, match=r"no 'archive/data\.pkl' in the zip archive"):
        torchbin.read_table(str(p))
    p.write_bytes(zip_bytes([("data.pkl", b"x")]))
    with pytest.raises(CheckpointError, match=r"zip entry 'data\.pkl' is not inside an archive directory"):
        torchbin.read_table(str(p))


def _patch_central(data, name, **fields):
    """Rewrite fields of the central directory entry of `name` (offsets of the 46-byte record)."""
    at = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "csize": (20, "<I"), "usize": (24, "<I"),
          "header": (42, "<I")}
    b = bytearray(data)
    i = b.find(b"PK\x01\x02")
    while i >= 0:
        nlen = struct.unpack_from("<H", b, i + 28)[0]
        if bytes(b[i + 46:i + 46 + nlen]) == name.encode():
            for k, v in fields.items():
                struct.pack_into(at[k][1], b, i + at[k][0], v)
            return bytes(b)
        i = b.find(b"PK\x01\x02", i + 1)
    raise AssertionError(name)


@pytest.mark.parametrize("entry, fields, match", [
    ("archive/data.pkl", dict(csize=0x7FFFFFF0, usize=0x7FFFFFF0), r"run past the start of the central directory"),
    ("archive/data/0", dict(csize=0x7FFFFFF0, usize=0x7FFFFFF0), r"run past the start of the central directory"),
    ("archive/data/0", dict(csize=3), r"compressed size 3 different from its size 24"),
    ("archive/data/0", dict(header=0xFFFFFFFF), r"saturated but no valid ZIP64 extra field"),
    ("archive/data/0", dict(header=0x7FFFFFF0), r"the local header of zip entry 'archive/data/0' \(bytes .*\) lies "
                                                r"outside the file"),
    ("archive/data/0", dict(header=0), r"zip entry 'archive/data/0': the local header names another file"),
    ("archive/data/0", dict(header=5), r"zip entry 'archive/data/0': no local header at offset 5"),
    ("archive/data/0", dict(flags=1), r"zip entry 'archive/data/0' is encrypted"),
    ("archive/data/0", dict(method=8), r"the local header's method 0 differs|compressed entry 'archive/data/0'"),
    ("archive/data.pkl", dict(crc=1), r"zip entry 'archive/data\.pkl' fails its CRC check"),
])
def test_hostile_central_directory(tmp_path, entry, fields, match):
    p = tmp_path / "d.bin"
    p.write_bytes(_patch_central(_good(tmp_path), entry, **fields))
    with pytest.raises(CheckpointError, match=r"d\.bin: .*" + match):
        torchbin.read_table(str(p))


def test_huge_data_pkl_limit(tmp_path, monkeypatch):
    p = tmp_path / "h.bin"
    p.write_bytes(_good(tmp_path))
    monkeypatch.setattr(torchbin, "PICKLE_LIMIT", 16)
    with pytest.raises(CheckpointError, match=r"zip entry 'archive/data\.pkl' is \d+ bytes, over the limit of 16"):
        torchbin.read_table(str(p))


def test_end_record_lies(tmp_path):
    data = _good(tmp_path)
    eocd = data.rfind(b"PK\x05\x06")
    for off, fmt, v, match in [(8, "<HH", (60000, 60000), r"more than a central directory of \d+ bytes holds"),
                               (12, "<I", 1 << 30, r"over the limit of"),
                               (16, "<I", 0x7FFFFFF0, r"runs past its end record"),
                               (8, "<H", 3, r"multi-volume"), (4, "<H", 1, r"multi-volume"),
                               (12, "<I", 0xFFFFFFFF, r"needs a ZIP64 record, which is missing")]:
        b = bytearray(data)
        struct.pack_into(fmt, b, eocd + off, *(v if isinstance(v, tuple) else (v,)))
        (tmp_path / "e.bin").write_bytes(bytes(b))
        with pytest.raises(CheckpointError, match=match):
            torchbin.read_table(str(tmp_path / "e.bin"))
    (tmp_path / "e.bin").write_bytes(data[:eocd] + b"PK\x05\x07" + data[eocd + 4:])
    with pytest.raises(CheckpointError, match=r"no zip end-of-central-directory record"):
        torchbin.read_table(str(tmp_path / "e.bin"))


def test_duplicate_zip_entry(tmp_path):
    from torchbin_util import zip_bytes
    sd = {"w": Tensor("torch FloatStorage", "0", f32(6))}
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name
        raw = zip_bytes([("archive/data.pkl", state_dict_pickle(sd)), ("archive/data/0", sd["w"].data),
                         ("archive/data/0", sd["w"].data)])
    (tmp_path / "d.bin").write_bytes(raw)
    with pytest.raises(CheckpointError, match=r"zip entry 'archive/data/0' appears twice"):
        torchbin.read_table(str(tmp_path / "d.bin"))


# ------------------------------------------------------------------------------------------ the C table
def test_c_table_checks(tmp_path):
    p = tmp_path / "f.bin"
    p.write_bytes(bytes(range(64)))
    f = _C.SafetensorsFile(str(p), table=[("a", "F32", (2, 2), 0, 16), ("b", "F32", (4,), 0, 16),  # overlap: fine
                                          ("c", "U8", (), 63, 1), ("z", "F32", (0, 5), 64, 0)])
    assert f.get("c").tolist() == 63 and f.get("a").shape == (2, 2) and f.info("b") == ("F32", (4,), 0, 16)
    f.close()
    for table, exc, match in [
        ([("a", "F32", (4,), 56, 16)], CheckpointError, r"f\.bin: tensor 'a': bytes \[56, 72\) lie outside the file "
                                                         r"of 64 bytes"),
        ([("a", "F32", (4,), 0, 12)], CheckpointError, r"tensor 'a': shape \[4\] of F32 needs 16 bytes but the "
                                                        r"table gives bytes \[0, 12\)"),
        ([("a", "F32", (2 ** 62, 8), 0, 0)], CheckpointError, r"tensor 'a': shape .* overflows 64 bits"),
        ([("a", "F32", (1,), 2 ** 64 - 2, 4)], ValueError, r"offset \+ nbytes overflows 64 bits"),
        ([("a", "F32", (1,), 0, 4), ("a", "F32", (1,), 4, 4)], CheckpointError, r"tensor 'a' appears twice"),
        ([("a", "F99", (1,), 0, 4)], ValueError, r"unknown dtype 'F99'"),
        ([("a", "F32", (-1,), 0, 4)], ValueError, r"shape must hold non-negative ints"),
        ([("a", "F32", (1,) * 9, 0, 4)], ValueError, r"9 dimensions \(at most 8\)"),
        ([("a", "F32", (1,), -4, 4)], OverflowError, None),
        ([("", "F32", (1,), 0, 4)], ValueError, r"empty or contains NUL"),
        ([("a\x00b", "F32", (1,), 0, 4)], ValueError, r"empty or contains NUL"),
        ([("a", "F32", (1,), 0)], TypeError, r"table\[0\] must be a tuple"),
        ([("a", "F32", [1], 0, 4)], TypeError, r"must be \(str, str, tuple, int, int\)"),
    ]:
        with pytest.raises(exc, match=match):
            _C.SafetensorsFile(str(p), table=table)
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="the file is empty"):
        _C.SafetensorsFile(str(tmp_path / "empty"), table=[])
    with pytest.raises(OSError, match="not a regular file"):
        _C.SafetensorsFile(str(tmp_path), table=[])


# ------------------------------------------------------------------------------------------ mutation fuzz (bounded)
def _mutate(data, rng):
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        kind = rng.random()
        i = rng.randrange(len(b))
        if kind < 0.6:
            b[i] = rng.randrange(256)
        elif kind < 0.8:
            b[i:i + 4] = struct.pack("<I", rng.choice([0, 1, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, len(b)]))
        elif kind < 0.9:
            del b[i:i + rng.randint(1, 64)]
        else:
            b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    return bytes(b)


def test_mutation_fuzz_bounded(tmp_path):
    """Random byte flips, field smashes, cuts and insertions of real torch.save files: only CheckpointError
    (or a successful read whose every tensor lies inside the file). FASTLOAD_FUZZ_ITERS raises the count."""
    rng = random.Random(1234)
    seeds = [(BIN / "odd" / f"{n}.bin").read_bytes() for n in ("views", "p4", "noncontig")]
    n = int(os.environ.get("FASTLOAD_FUZZ_ITERS", "400"))
    p = tmp_path / "fz.bin"
    ok = 0
    for _ in range(n):
        data = _mutate(rng.choice(seeds), rng)
        p.write_bytes(data)
        try:
            table = torchbin.read_table(str(p))
        except CheckpointError:
            continue
        for name, dt, shape, off, nb in table:
            assert 0 <= off and off + nb <= len(data), name
        try:
            torchbin.open_file(str(p)).close()
        except (CheckpointError, NotImplementedError):
            pass
        ok += 1
    assert ok < n  # the mutations do break most files


def test_pickle_mutation_fuzz_bounded(tmp_path):
    """The same on data.pkl alone, re-zipped with a correct CRC so that every mutant reaches the interpreter."""
    from torchbin_util import zip_bytes
    rng = random.Random(4321)
    seeds = []
    for n in ("views", "p4", "nested"):
        with zipfile.ZipFile(BIN / "odd" / f"{n}.bin") as z:
            seeds.append([(i.filename, z.read(i.filename)) for i in z.infolist()])
    n = int(os.environ.get("FASTLOAD_FUZZ_ITERS", "400"))
    p = tmp_path / "fz.bin"
    for _ in range(n):
        entries = list(rng.choice(seeds))
        k = next(i for i, (name, _) in enumerate(entries) if name.endswith("/data.pkl"))
        entries[k] = (entries[k][0], _mutate(entries[k][1], rng))
        raw = zip_bytes(entries)
        p.write_bytes(raw)
        try:
            table = torchbin.read_table(str(p))
        except CheckpointError:
            continue
        for name, dt, shape, off, nb in table:
            assert 0 <= off and off + nb <= len(raw), name
        torchbin.open_file(str(p)).close()


# ------------------------------------------------------------------------------------------ which files (2026-12-06)
def _llama_tensors():
    from test_lora import tensors_of  # float32 of every tensor of a safetensors file
    out = {}
    for p in sorted(model_dir("llama").glob("*.safetensors")):
        out.update(tensors_of(p))
    return out


def test_single_safetensors_beats_a_stale_index(tmp_path):
    """transformers reads model.safetensors before model.safetensors.index.json: a sharded save followed by an
    unsharded one into the same directory leaves the index (and its shards may be gone). fastload read the index:
    a CheckpointError for the missing shards, or the old shards' model, silently."""
    import st_util
    t = _llama_tensors()
    t["lm_head.weight"] = t["lm_head.weight"] * 2  # the newer, single-file model differs
    for f in model_dir("llama").iterdir():
        if f.name.startswith("model") or f.suffix == ".json":
            shutil.copy(f, tmp_path)
    st_util.write(tmp_path / "model.safetensors", t, metadata={"format": "pt"})
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(tmp_path / "model.safetensors", alone)
    shutil.copy(tmp_path / "config.json", alone)
    want = load(alone)(IDS).logits
    assert np.array_equal(load(tmp_path)(IDS).logits, want)  # the stale shards are there: not read
    for f in tmp_path.glob("model-*.safetensors"):
        f.unlink()
    assert np.array_equal(load(tmp_path)(IDS).logits, want)  # the stale shards are gone: no error


def test_use_safetensors_chooses_as_transformers(tmp_path):
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    with pytest.raises(FileNotFoundError, match="use_safetensors=True"):
        load(tmp_path, use_safetensors=True)
    for f in model_dir("llama").iterdir():
        if f.name.startswith("model"):
            shutil.copy(f, tmp_path)
    assert load(tmp_path)._source["kind"] == "safetensors"
    m = load(tmp_path, use_safetensors=False)
    assert m._source["kind"] == "torch_bin" and m.to(dtype="bfloat16")._source["kind"] == "torch_bin"
    with pytest.raises(TypeError, match="use_safetensors"):
        load(tmp_path, use_safetensors="yes")


def test_bin_beats_a_lone_gguf_beside_it(tmp_path):
    """transformers reads a GGUF only when gguf_file= names it: a .gguf beside pytorch_model.bin is not the model."""
    for f in (BIN / "llama_bin").iterdir():
        shutil.copy(f, tmp_path)
    (tmp_path / "other.gguf").write_bytes(b"not read")
    assert load(tmp_path)._source["kind"] == "torch_bin"
