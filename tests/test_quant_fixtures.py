"""Unit tests of the quantised fixture makers (tests/quant_fixtures.py): known packed words, pack -> unpack round
trips, dequantisation within one quantisation step of the float weights, GGUF blocks against the independent
numpy references in tests/test_gguf.py and fastload's existing GGUF dequantiser, and the checkpoint writers.
They need only numpy (and fastload's GGUF reader for one cross-check); torch, if installed, adds a cross-check of
the unpacking written the way AutoGPTQ / AutoAWQ write it (torch shifts on int32)."""
import json
import os

import numpy as np
import pytest

import quant_fixtures as qf
from gguf_util import BLOCK, GGML

F32 = np.float32


def rnd(shape, seed=0, s=0.15):
    return (np.random.default_rng(seed).standard_normal(shape) * s).astype(F32)


# ---------------------------------------------------------------- known words
def test_gptq_qweight_low_bits_first_along_the_input_dim():
    codes = np.zeros((2, 16), np.int64)          # [out, in]
    codes[0, :8] = np.arange(8)                  # inputs 0..7 of output 0: one word
    codes[1, 8:] = 15
    qw = qf.gptq_pack(codes, np.full((2, 8), 8), np.ones((2, 8), np.float16), np.arange(16) // 8, 4, 1)["qweight"]
    assert qw.shape == (2, 2) and qw.dtype == np.int32
    assert qw.view(np.uint32)[0, 0] == 0x76543210 and qw[1, 0] == 0
    assert qw.view(np.uint32)[1, 1] == 0xFFFFFFFF and qw[1, 1] == -1
    codes8 = np.zeros((1, 4), np.int64)
    codes8[0] = [1, 2, 3, 250]
    assert qf._pack_fields(codes8.T, 8, axis=0).view(np.uint32)[0, 0] == 0xFA030201


def test_gptq_v1_symmetric_zeros_are_the_familiar_0x77777777():
    W = rnd((16, 64))
    t = qf.gptq_tensors(W, bits=4, group_size=32, sym=True, zero_offset=1)
    assert t["qweight"].shape == (8, 16) and t["qzeros"].shape == (2, 2) and t["scales"].shape == (2, 16)
    assert (t["qzeros"].view(np.uint32) == 0x77777777).all()          # zero 8 stored as 7 in every nibble
    t2 = qf.gptq_tensors(W, bits=4, group_size=32, sym=True, zero_offset=0)
    assert (t2["qzeros"].view(np.uint32) == 0x88888888).all()         # gptq_v2 stores 8
    assert (t2["qweight"] == t["qweight"]).all()
    t8 = qf.gptq_tensors(W, bits=8, group_size=-1, sym=True, zero_offset=1)
    assert t8["qweight"].shape == (16, 16) and t8["qzeros"].shape == (1, 4)
    assert (t8["qzeros"].view(np.uint32) == 0x7F7F7F7F).all()         # zero 128 stored as 127
    assert (t8["g_idx"] == 0).all()


def test_awq_word_order():
    codes = np.zeros((16, 2), np.int64)        # [out, in]
    codes[:8, 0] = np.arange(8)                # outputs 0..7 of input 0
    zeros = np.arange(16).reshape(1, 16) % 16
    t = qf.awq_pack(codes, zeros, np.ones((1, 16), np.float16))
    assert t["qweight"].shape == (2, 2) and t["qzeros"].shape == (1, 2)
    # slot s (bits 4s..4s+3) holds output ORDER[s] = 0, 2, 4, 6, 1, 3, 5, 7
    assert t["qweight"].view(np.uint32)[0, 0] == 0x75316420
    assert t["qzeros"].view(np.uint32)[0, 0] == 0x75316420
    assert t["qzeros"].view(np.uint32)[0, 1] == 0xFDB9ECA8
    back, z = qf.awq_unpack(t["qweight"], t["qzeros"])
    assert (back == codes).all() and (z == zeros).all()


# ---------------------------------------------------------------- round trips and quantisation error
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zero_offset", [0, 1])
def test_gptq_pack_unpack_round_trip(bits, zero_offset):
    rng = np.random.default_rng(bits + zero_offset)
    codes = rng.integers(0, 1 << bits, (24, 64))
    zeros = rng.integers(zero_offset, 1 << bits, (2, 24))
    g_idx = np.arange(64) // 32
    t = qf.gptq_pack(codes, zeros, rng.random((2, 24)).astype(np.float16), g_idx, bits, zero_offset)
    assert t["qweight"].shape == (64 * bits // 32, 24) and t["qzeros"].shape == (2, 24 * bits // 32)
    c, z = qf.gptq_unpack(t["qweight"], t["qzeros"], bits, zero_offset)
    assert (c == codes).all() and (z == zeros).all()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_stores_zero_zero_as_gptqmodel(bits):
    """v1 writes zero - 1 as one subtraction from each whole word (GPTQModel): zeros of 0 borrow, and the reader's
    word addition gives every zero back."""
    z = np.zeros((1, 8), np.int64)
    z[0, 3] = 5
    t = qf.gptq_pack(np.zeros((8, 8), np.int64), z, np.ones((1, 8), np.float16), np.zeros(8), bits, 1)
    word = 0xFFFFFFFF // ((1 << bits) - 1)
    packed = qf.gptq_pack(np.zeros((8, 8), np.int64), z, np.ones((1, 8), np.float16), np.zeros(8), bits, 0)
    assert np.array_equal(t["qzeros"].view(np.uint32), (packed["qzeros"].view(np.uint32) - np.uint32(word)))
    assert np.array_equal(qf.gptq_unpack(t["qweight"], t["qzeros"], bits, 1)[1], z)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("desc_act", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_gptq_dequant_within_one_step(bits, sym, desc_act, group_size):
    W = rnd((40, 128), seed=bits)
    rng = np.random.default_rng(7)
    p = qf.gptq_quantize(W, bits, group_size, sym, desc_act, 1, rng)
    t = qf.gptq_pack(p["codes"], p["zeros"], p["scales"], p["g_idx"], bits, 1)
    D = qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], bits, 1)
    assert D.shape == W.shape and D.dtype == F32
    step = t["scales"].astype(F32)[t["g_idx"]].T                      # [out, in]
    err = np.abs(D - W)
    # one step: half a step of rounding, plus the clipped top of the symmetric range (AutoGPTQ's quantizer
    # maps xmax to code 2^bits - 1 - zero + 1, one past the top)
    assert (err <= step * 1.0001).all(), err.max()
    assert np.mean(err / step) < 0.3
    gs = 128 if group_size == -1 else group_size
    assert np.bincount(t["g_idx"], minlength=128 // gs).tolist() == [gs] * (128 // gs)
    if desc_act and group_size != -1:
        assert (np.diff(t["g_idx"]) < 0).any()                        # scattered groups
    else:
        assert (t["g_idx"] == np.arange(128) // gs).all()
    # the formula applied directly to the unpacked fields
    c, z = qf.gptq_unpack(t["qweight"], t["qzeros"], bits, 1)
    assert (c == p["codes"]).all() and (z == p["zeros"]).all()
    if sym:
        assert (z == 1 << (bits - 1)).all()


def test_gptq_v2_can_store_zero_zero():
    W = np.abs(rnd((8, 32))) + 0.01                                   # all positive: AutoGPTQ's zero is 0
    p = qf.gptq_quantize(W, 4, 32, sym=False, zero_offset=0)
    assert (p["zeros"] == 0).all()
    t = qf.gptq_pack(p["codes"], p["zeros"], p["scales"], p["g_idx"], 4, 0)
    assert (t["qzeros"] == 0).all()
    assert np.abs(qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 0) - W).max() < 0.02
    t1 = qf.gptq_pack(p["codes"], p["zeros"], p["scales"], p["g_idx"], 4, 1)  # v1: the same zeros, borrowed
    assert (t1["qzeros"].view(np.uint32) == 0xEEEEEEEF).all()
    assert np.array_equal(qf.dequant_gptq(t1["qweight"], t1["qzeros"], t1["scales"], t1["g_idx"], 4, 1),
                          qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 0))


@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_awq_dequant_within_half_a_step(group_size):
    W = rnd((48, 128), seed=3)
    t = qf.awq_tensors(W, group_size)
    ng = 1 if group_size == -1 else 128 // group_size
    assert t["qweight"].shape == (128, 6) and t["qzeros"].shape == (ng, 6) and t["scales"].shape == (ng, 48)
    D = qf.dequant_awq(t["qweight"], t["qzeros"], t["scales"], group_size)
    gs = 128 if group_size == -1 else group_size
    step = t["scales"].astype(F32)[np.arange(128) // gs].T
    err = np.abs(D - W)
    # zero = round(-min / s) moves the grid by up to half a step: the extremes may clip by up to one step
    assert (err <= step * 1.0001).all() and np.mean(err / step) < 0.3


def test_dequant_is_exact_in_float32():
    """scale (fp16) times an integer of at most 9 bits: float32 holds it exactly, so the float reference holds
    the very values a repacker producing fp32 s and m = -s * zero (csrc/quant.h) must give."""
    W = rnd((16, 64), seed=5)
    t = qf.gptq_tensors(W, 4, 32, sym=False, zero_offset=1)
    D = qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
    c, z = qf.gptq_unpack(t["qweight"], t["qzeros"], 4, 1)
    s = t["scales"].astype(np.float64)[t["g_idx"]].T
    assert (D.astype(np.float64) == s * (c - z[t["g_idx"]].T)).all()
    sf = t["scales"].astype(F32)[t["g_idx"]].T
    m = -sf * z[t["g_idx"]].T.astype(F32)
    assert (sf * c.astype(F32) + m == D).all()


# ---------------------------------------------------------------- GGUF blocks
KINDS = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_blocks_match_the_independent_reference(kind):
    test_gguf = pytest.importorskip("test_gguf")
    rng = np.random.default_rng(11)
    tid = qf.GGUF_TYPES[kind]
    raw = qf.random_blocks(kind, 9, rng)
    assert raw.shape == (9, BLOCK[tid][1]) and raw.dtype == np.uint8
    got = qf.decode_blocks(kind, raw)
    assert np.isfinite(got).all() and 0.03 < got.std() < 0.3 and abs(got.mean()) < 0.03
    np.testing.assert_array_equal(got, test_gguf.REF[tid](raw))
    # and arbitrary bytes (any block is valid apart from its fp16 fields)
    anyraw = test_gguf.random_blocks(rng, tid, 6)
    np.testing.assert_array_equal(qf.decode_blocks(kind, anyraw), test_gguf.REF[tid](anyraw))


@pytest.mark.parametrize("kind", KINDS)
def test_gguf_encode_decode_fields(kind):
    """encode_blocks puts each field where decode_blocks (ggml's formula) finds it."""
    rng = np.random.default_rng(2)
    nb = 4
    if kind in ("Q4_K", "Q5_K"):
        top = 16 if kind == "Q4_K" else 32
        q, sc, mn = rng.integers(0, top, (nb, 256)), rng.integers(0, 64, (nb, 8)), rng.integers(0, 64, (nb, 8))
        d, dmin = np.full(nb, 0.5), np.full(nb, 0.25)
        got = qf.decode_blocks(kind, qf.encode_blocks(kind, q, d, dmin, sc, mn))
        want = (0.5 * np.repeat(sc, 32, 1) * q - 0.25 * np.repeat(mn, 32, 1))
    elif kind == "Q6_K":
        q, sc = rng.integers(0, 64, (nb, 256)), rng.integers(-128, 128, (nb, 16))
        got = qf.decode_blocks(kind, qf.encode_blocks(kind, q, np.full(nb, 0.5), sc=sc))
        want = 0.5 * np.repeat(sc, 16, 1) * (q - 32)
    else:
        lo, hi, off = {"Q4_0": (0, 16, 8), "Q4_1": (0, 16, 0), "Q5_0": (0, 32, 16), "Q5_1": (0, 32, 0),
                       "Q8_0": (-128, 128, 0)}[kind]
        q = rng.integers(lo, hi, (nb, 32))
        m = np.full(nb, -1.5) if kind.endswith("_1") else None
        got = qf.decode_blocks(kind, qf.encode_blocks(kind, q, np.full(nb, 0.25), m))
        want = 0.25 * (q - off) + (-1.5 if m is not None else 0)
    np.testing.assert_array_equal(got, want.astype(F32))


def test_gguf_files_and_fastloads_dequantiser(tmp_path):
    """The quantised file's tensors dequantised by fastload's existing GGUF reader equal the reference file's
    F32 tensors (so the reference holds exactly the quantised values)."""
    from fastload import _C
    qp, rp = qf.write_quant_gguf(tmp_path / "m.gguf", qf.Q4_K_M)
    q2, r2 = qf.write_quant_gguf(tmp_path / "all.gguf", {"attn_q": "Q4_0", "attn_k": "Q4_1", "attn_v": "Q5_0",
                                                         "attn_output": "Q5_1", "ffn_gate": "Q8_0",
                                                         "ffn_up": "Q5_K", "ffn_down": "Q6_K", "output": "Q8_0"})
    assert rp.endswith("m-ref.gguf")
    with _C.GGUFFile(qp) as f:
        types = {t[0]: t[1] for t in f.tensors()}
    assert types["blk.1.attn_q.weight"] == "Q4_K" and types["blk.0.attn_v.weight"] == "Q6_K"
    assert types["blk.1.attn_v.weight"] == "Q4_K" and types["blk.0.ffn_down.weight"] == "Q6_K"
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    assert types["blk.0.attn_norm.weight"] == "F32"
    for a, b in ((qp, rp), (q2, r2)):
        with _C.GGUFFile(a) as fq, _C.GGUFFile(b) as fr:
            types = {t[0]: t[1] for t in fq.tensors()}
            assert {t[0]: t[1] for t in fr.tensors()} == {k: "F32" for k in types}
            for name in types:
                np.testing.assert_array_equal(fq.dequantize(name), fr.dequantize(name), err_msg=name)


# ---------------------------------------------------------------- checkpoint writers
def test_gptq_checkpoint_layout(tmp_path):
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": False, "desc_act": True},
                                    arch="qwen2")
    cfg = json.load(open(os.path.join(q, "config.json")))
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["desc_act"] is True and qc["sym"] is False
    assert qc["checkpoint_format"] == "gptq" and cfg["dtype"] == "float16"
    assert "quantization_config" not in json.load(open(os.path.join(r, "config.json")))
    qt = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    p = "model.layers.1.self_attn.k_proj."
    out, inn = 32, 128
    assert qt[p + "qweight"].shape == (inn // 8, out) and qt[p + "qweight"].dtype == np.int32
    assert qt[p + "qzeros"].shape == (4, out // 8) and qt[p + "scales"].shape == (4, out)
    assert qt[p + "scales"].dtype == np.float16 and qt[p + "g_idx"].shape == (inn,)
    assert qt[p + "bias"].dtype == np.float16 and p + "weight" not in qt
    np.testing.assert_array_equal(rt[p + "bias"], qt[p + "bias"].astype(F32))
    np.testing.assert_array_equal(rt[p + "weight"], qf.dequant_gptq(qt[p + "qweight"], qt[p + "qzeros"],
                                                                    qt[p + "scales"], qt[p + "g_idx"], 4, 1))
    assert all(v.dtype == F32 for v in rt.values()) and "lm_head.weight" not in rt   # qwen2: tied
    assert set(k for k in qt if k.endswith(".qweight")) == {f"model.layers.{i}.{s}.qweight" for i in range(2)
                                                           for s in qf.LINEARS}


def test_gptq_v2_8bit_quantised_lm_head_sharded(tmp_path):
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2",
                                                     "lm_head": True}, files=2)
    qc = json.load(open(os.path.join(q, "config.json")))["quantization_config"]
    assert qc["checkpoint_format"] == "gptq_v2" and qc["lm_head"] is True and qc["group_size"] == -1
    idx = json.load(open(os.path.join(q, "model.safetensors.index.json")))["weight_map"]
    qt = {}
    for fn in sorted(set(idx.values())):
        qt.update(qf.read_safetensors(os.path.join(q, fn)))
    assert set(qt) == set(idx) and qt["lm_head.qweight"].shape == (32, 320)
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    np.testing.assert_array_equal(rt["lm_head.weight"], qf.dequant_gptq(
        qt["lm_head.qweight"], qt["lm_head.qzeros"], qt["lm_head.scales"], qt["lm_head.g_idx"], 8, 0))
    assert (qt["lm_head.qzeros"].view(np.uint32) == 0x80808080).all()


def test_awq_checkpoint_layout(tmp_path):
    q, r = qf.write_awq_checkpoint(tmp_path / "a", group_size=64, modules_to_not_convert=["model.layers.1.mlp"])
    qc = json.load(open(os.path.join(q, "config.json")))["quantization_config"]
    assert qc == {"quant_method": "awq", "zero_point": True, "group_size": 64, "bits": 4, "version": "gemm",
                  "modules_to_not_convert": ["model.layers.1.mlp"]}
    qt = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    p = "model.layers.0.mlp.down_proj."                    # [128 out, 256 in]
    assert qt[p + "qweight"].shape == (256, 16) and qt[p + "qzeros"].shape == (4, 16)
    assert qt[p + "scales"].shape == (4, 128)
    np.testing.assert_array_equal(rt[p + "weight"], qf.dequant_awq(qt[p + "qweight"], qt[p + "qzeros"],
                                                                   qt[p + "scales"], 64))
    assert "model.layers.1.mlp.up_proj.weight" in qt and qt["model.layers.1.mlp.up_proj.weight"].dtype == np.float16
    assert "model.layers.1.self_attn.q_proj.qweight" in qt


def test_rewrite_safetensors(tmp_path):
    q, _ = qf.write_awq_checkpoint(tmp_path / "a")
    f = os.path.join(q, "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.scales"
    qf.rewrite_safetensors(f, {name: np.zeros((3, 3), np.float16), "model.norm.weight": None}, order=[name])
    t = qf.read_safetensors(f)
    assert list(t)[-1] == name and t[name].shape == (3, 3) and "model.norm.weight" not in t


# ---------------------------------------------------------------- optional: torch, as the tools unpack
def test_unpacking_like_the_tools_with_torch():
    torch = pytest.importorskip("torch")
    W = rnd((32, 64), seed=9)
    t = qf.gptq_tensors(W, 4, 32, sym=False, zero_offset=1)
    qw, qz = torch.from_numpy(t["qweight"]), torch.from_numpy(t["qzeros"])
    wf = torch.tensor(list(range(0, 32, 4)), dtype=torch.int32).unsqueeze(0)
    z = torch.bitwise_and(torch.bitwise_right_shift(qz.unsqueeze(2).expand(-1, -1, 8), wf.unsqueeze(0)), 15) + 1
    z = z.reshape(t["scales"].shape)
    w = torch.bitwise_and(torch.bitwise_right_shift(qw.unsqueeze(1).expand(-1, 8, -1), wf.unsqueeze(-1)), 15)
    w = w.reshape(-1, w.shape[2])
    g = torch.from_numpy(t["g_idx"]).long()
    s = torch.from_numpy(t["scales"]).float()
    got = (s[g] * (w - z[g]).float()).numpy().T
    np.testing.assert_array_equal(got, qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1))
    a = qf.awq_tensors(W, 32)
    shifts = torch.arange(0, 32, 4)
    iw = torch.bitwise_right_shift(torch.from_numpy(a["qweight"])[:, :, None], shifts[None, None, :]).reshape(64, -1)
    iz = torch.bitwise_right_shift(torch.from_numpy(a["qzeros"])[:, :, None], shifts[None, None, :]).reshape(2, -1)
    rev = torch.arange(32).view(-1, 8)[:, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(-1)
    iw, iz = torch.bitwise_and(iw[:, rev], 15), torch.bitwise_and(iz[:, rev], 15)
    got = ((iw - iz.repeat_interleave(32, dim=0)).float() * torch.from_numpy(a["scales"]).float()
           .repeat_interleave(32, dim=0)).numpy().T
    np.testing.assert_array_equal(got, qf.dequant_awq(a["qweight"], a["qzeros"], a["scales"], 32))


def test_gguf_blocks_against_gguf_py():
    """Optional: llama.cpp's own Python package (gguf-py, gguf.quants.dequantize) reads the blocks the same way
    (checked with gguf 0.19.0: bit-identical for every type)."""
    pytest.importorskip("gguf")
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import dequantize
    rng = np.random.default_rng(5)
    for kind in KINDS:
        raw = qf.random_blocks(kind, 12, rng)
        got = dequantize(raw.reshape(-1), getattr(GGMLQuantizationType, kind)).reshape(12, -1)
        np.testing.assert_array_equal(np.asarray(got, F32), qf.decode_blocks(kind, raw), err_msg=kind)


def test_gptq_checkpoint_without_g_idx(tmp_path):
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "sym": False}, g_idx=False)
    qt = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    assert not [k for k in qt if k.endswith(".g_idx")]
    p = "model.layers.0.mlp.down_proj."
    np.testing.assert_array_equal(rt[p + "weight"], qf.dequant_gptq(qt[p + "qweight"], qt[p + "qzeros"],
                                                                    qt[p + "scales"], None, 4, 1, 32))
    with pytest.raises(AssertionError):
        qf.write_gptq_checkpoint(tmp_path / "h", {"desc_act": True}, g_idx=False)


def test_act_order_permutation_shared_by_layers_with_one_input(tmp_path):
    q, _ = qf.write_gptq_checkpoint(tmp_path / "g", {"desc_act": True})
    t = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    p = "model.layers.1."
    g = {s: t[p + s + ".g_idx"] for s in qf.LINEARS}
    assert (g["self_attn.q_proj"] == g["self_attn.k_proj"]).all() and (g["self_attn.q_proj"] == g["self_attn.v_proj"]).all()
    assert (g["mlp.gate_proj"] == g["mlp.up_proj"]).all()
    assert not (g["self_attn.q_proj"] == g["self_attn.o_proj"]).all()
    assert not (t["model.layers.0.self_attn.q_proj.g_idx"] == g["self_attn.q_proj"]).all()
    q2, _ = qf.write_gptq_checkpoint(tmp_path / "h", {"desc_act": True}, shared_perm=False)
    t2 = qf.read_safetensors(os.path.join(q2, "model.safetensors"))
    assert not (t2[p + "self_attn.q_proj.g_idx"] == t2[p + "self_attn.k_proj.g_idx"]).all()


def test_gptq_dynamic_overrides(tmp_path):
    dyn = {"-:model\\.layers\\.1\\.mlp\\..*": {}, "+:.*down_proj": {"bits": 8, "group_size": 64}}
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"bits": 4, "group_size": 32, "dynamic": dyn})
    assert json.load(open(os.path.join(q, "config.json")))["quantization_config"]["dynamic"] == dyn
    qt = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    assert qt["model.layers.1.mlp.up_proj.weight"].dtype == np.float16 and "model.layers.1.mlp.up_proj.qweight" not in qt
    assert qt["model.layers.1.self_attn.q_proj.qweight"].shape == (16, 128)          # 4 bit
    assert qt["model.layers.0.mlp.down_proj.qweight"].shape == (64, 128)             # 8 bit, in 256
    assert qt["model.layers.0.mlp.down_proj.scales"].shape == (4, 128)               # group 64
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    p = "model.layers.0.mlp.down_proj."
    np.testing.assert_array_equal(rt[p + "weight"], qf.dequant_gptq(qt[p + "qweight"], qt[p + "qzeros"],
                                                                    qt[p + "scales"], qt[p + "g_idx"], 8, 1))


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_gptq_scales_in_other_dtypes(tmp_path, scale_dtype):
    q, r = qf.write_gptq_checkpoint(tmp_path / "g", {"sym": False}, scale_dtype=scale_dtype)
    raw = open(os.path.join(q, "model.safetensors"), "rb").read()
    hdr = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    p = "model.layers.0.mlp.down_proj."
    assert hdr[p + "scales"]["dtype"] == {"float32": "F32", "bfloat16": "BF16"}[scale_dtype]
    qt = qf.read_safetensors(os.path.join(q, "model.safetensors"))
    rt = qf.read_safetensors(os.path.join(r, "model.safetensors"))
    np.testing.assert_array_equal(rt[p + "weight"], qf.dequant_gptq(qt[p + "qweight"], qt[p + "qzeros"],
                                                                    qt[p + "scales"], qt[p + "g_idx"], 4, 1))
