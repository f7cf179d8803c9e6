"""K scales and split codes (csrc/quant.h), the CPU's compact forms of GGUF weights.

K scales: a weight whose parts are all GGUF K-quants keeps the file's two-level scales (int8 sub-scale x fp16
super-scale per 256 columns) instead of their float32 products, also where the parts' groups and forms differ (Q4_K_M's
q|k|v: Q4_K with a Q6_K v takes group 16 and offsets, the Q6_K rows' offsets as sub-scale x -32 d). The products are
exact either way, so every logit must be the same bits as with float32 scales (FASTLOAD_CPU_KSCALE=0), with fewer
weight bytes; weights that mix K-quants with other types keep float32 scales.
Split codes: 5- and 6-bit GGUF codes held in 5 / 6 bits (FASTLOAD_CPU_CODES56=0: a byte each). The weights' values
are the same (the float path, which widens them to float, gives the same bits); the integer kernels round
differently (an int16 activation flips), so one-token logits agree within the int16 activations' error.
Both stay equal to the float reference (test_quant_checkpoints.py)."""
import numpy as np
import pytest

import fastload
import quant_fixtures as qf
from test_quant_checkpoints import built  # noqa: F401 (the fixture: case id -> (quantised path, reference path))

CASES = ["gguf-Q4_K", "gguf-Q5_K", "gguf-Q6_K", "gguf-Q4_K_M", "gguf-mixed-all"]


def load(path, monkeypatch, ks):
    monkeypatch.setenv("FASTLOAD_CPU_KSCALE", ks)
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", torch_dtype="float32")


def layouts(m):
    return {d["name"]: d for d in m._core.layouts()}


@pytest.mark.parametrize("case", CASES)
def test_kscales_give_the_same_bits_in_fewer_bytes(built, case, monkeypatch):
    q, _ref = built(case)
    mk, mf = load(q, monkeypatch, "1"), load(q, monkeypatch, "0")
    lk, lf = layouts(mk), layouts(mf)
    ks = [n for n, d in lk.items() if d["scale_dtype"] == "kscale"]
    assert not [n for n, d in lf.items() if d["scale_dtype"] == "kscale"]      # FASTLOAD_CPU_KSCALE=0 turns them off
    if case != "gguf-mixed-all":                                                # there every weight mixes forms
        assert ks, f"{case}: no weight kept K scales: {[(n, d['scale_dtype']) for n, d in lk.items()]}"
    for n in ks:                                                                # K scales take fewer bytes
        assert lk[n]["bytes"] < lf[n]["bytes"] and lf[n]["scale_dtype"] == "float32", (n, lk[n], lf[n])
        assert {k: v for k, v in lk[n].items() if k not in ("bytes", "scale_dtype")} == \
               {k: v for k, v in lf[n].items() if k not in ("bytes", "scale_dtype")}
    for n in set(lk) - set(ks):
        assert lk[n] == lf[n], n
    assert (mk._core.info["weight_bytes"] < mf._core.info["weight_bytes"]) == bool(ks)
    V = mk.config["vocab_size"]
    ids = np.random.default_rng(3).integers(3, V, (2, 12))
    for n in (12, 1):                                          # prefill (float GEMM), one token (integer decode)
        a, b = np.asarray(mk(ids[:, :n]).logits), np.asarray(mf(ids[:, :n]).logits)
        np.testing.assert_array_equal(a, b, err_msg=f"{case}: {n} tokens")
    ga = mk.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    gb = mf.generate(ids[:1, :6], max_new_tokens=6, do_sample=False)
    np.testing.assert_array_equal(ga, gb)


def test_q4_k_m_layout_choice(built, monkeypatch):
    """Q4_K_M's mix (the fixture's: q, k, o, gate, up Q4_K; v and down Q6_K): gate|up and o take K scales (Q4_K, group
    32, offsets), down takes them as Q6_K (group 16, symmetric); q|k|v mixes both forms and takes them too, in group 16
    with offsets (it had float32 scales before: 10 bits a weight against 7.1)."""
    q, _ref = built("gguf-Q4_K_M")
    lk = layouts(load(q, monkeypatch, "1"))
    by = {}
    for n, d in lk.items():
        by.setdefault(n.split(".")[-1] if "." in n else n, set()).add((d["scale_dtype"], d["group_size"], d["zeros"]))
    kinds = {k: v for k, v in by.items() if any(s[0] in ("kscale", "float32") for s in v)}
    assert any(("kscale", 32, True) in v for v in kinds.values()), kinds
    assert any(("kscale", 16, False) in v for v in kinds.values()), kinds
    assert ("kscale", 16, True) in by["wqkv"], by["wqkv"]                        # q|k|v: Q4_K with Q6_K
    assert not any(s[0] == "float32" for v in kinds.values() for s in v), kinds


def test_export_of_kscale_weights_is_the_float_values(built, tmp_path, monkeypatch):
    """save_pretrained dequantises: K scales export the same float values as float32 scales."""
    q, _ref = built("gguf-Q6_K")
    for ks in ("1", "0"):
        load(q, monkeypatch, ks).save_pretrained(str(tmp_path / ks))
    a = qf.read_safetensors(str(tmp_path / "1" / "model.safetensors"))
    b = qf.read_safetensors(str(tmp_path / "0" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("case", ["gguf-Q6_K", "gguf-Q5_K", "gguf-Q4_K_M", "gguf-Q5_0", "gguf-Q5_1", "gguf-mixed-all"])
def test_split_codes_same_values_in_fewer_bytes(built, case, monkeypatch):
    q, _ref = built(case)
    monkeypatch.setenv("FASTLOAD_CPU_CODES56", "1")
    ms = fastload.AutoModelForCausalLM.from_pretrained(str(q), device_map="cpu", torch_dtype="float32")
    monkeypatch.setenv("FASTLOAD_CPU_CODES56", "0")
    mb = fastload.AutoModelForCausalLM.from_pretrained(str(q), device_map="cpu", torch_dtype="float32")
    ls, lb = layouts(ms), layouts(mb)
    split = [n for n, d in ls.items() if d["bits"] in (5, 6) and d["dtype"] in ("int5", "int6")]
    assert split, f"{case}: no weight took split codes: {[(n, d['dtype']) for n, d in ls.items()]}"
    assert not [n for n, d in lb.items() if d["bits"] in (5, 6)]
    for n in split:
        assert lb[n]["bits"] == 8 and ls[n]["bytes"] < lb[n]["bytes"], (n, ls[n], lb[n])
    V = ms.config["vocab_size"]
    ids = np.random.default_rng(4).integers(3, V, (2, 12))
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "float")   # the float path (byte codes are interleaved, whose kernel would
    np.testing.assert_array_equal(np.asarray(ms(ids).logits), np.asarray(mb(ids).logits))   # take a prompt): same values
    monkeypatch.delenv("FASTLOAD_CPU_QDOT")
    a, b = np.asarray(ms(ids[:, :1]).logits, np.float64), np.asarray(mb(ids[:, :1]).logits, np.float64)
    assert np.abs(a - b).max() <= 1e-3 * np.abs(b).max(), (case, np.abs(a - b).max(), np.abs(b).max())


def test_mixed_kscales_row_major_same_bits(built, monkeypatch):
    """Q4_K_M's q|k|v in K scales with offsets (group 16) through the row-major kernels too (interleaving off)."""
    q, _ref = built("gguf-Q4_K_M")
    monkeypatch.setenv("FASTLOAD_CPU_INTERLEAVE", "0")
    mk, mf = load(q, monkeypatch, "1"), load(q, monkeypatch, "0")
    assert ("kscale", 16, True) in {(d["scale_dtype"], d["group_size"], d["zeros"])
                                    for n, d in layouts(mk).items() if n.endswith("wqkv")}
    ids = np.random.default_rng(5).integers(3, mk.config["vocab_size"], (2, 12))
    for n in (12, 1):
        np.testing.assert_array_equal(np.asarray(mk(ids[:, :n]).logits), np.asarray(mf(ids[:, :n]).logits))


def test_symmetric_part_offset_beyond_float16_keeps_float32_scales(tmp_path, monkeypatch):
    """A Q6_K v beside Q4_K q / k holds its offsets as sub-scale x -32 d in float16: a scale d of 4096 (legal, absurd;
    files of random bytes have such) would overflow, so that weight keeps float32 scales (the others K scales), and
    the logits are the same bits as with float32 scales everywhere."""
    orig = qf.random_blocks

    def big_d(type_name, nb, rng, std=0.1):
        raw = orig(type_name, nb, rng, std)
        if type_name == "Q6_K":
            raw[0, 208:210] = np.frombuffer(np.float16(4096).tobytes(), np.uint8)
        return raw

    monkeypatch.setattr(qf, "random_blocks", big_d)
    path, _ref = qf.write_quant_gguf(tmp_path / "big-d.gguf", types=qf.Q4_K_M, seed=41)
    mk, mf = load(path, monkeypatch, "1"), load(path, monkeypatch, "0")
    lk = layouts(mk)
    assert lk["layers.0.wqkv"]["scale_dtype"] == "float32", lk["layers.0.wqkv"]     # v: Q6_K with d = 4096
    assert lk["layers.0.w_down"]["scale_dtype"] == "kscale"                          # Q6_K alone: no offsets to hold
    ids = np.random.default_rng(6).integers(3, mk.config["vocab_size"], (1, 8))
    np.testing.assert_array_equal(np.asarray(mk(ids).logits), np.asarray(mf(ids).logits))
