"""The CPU's interleaved weights (csrc/cpu/cpu_qmatmul.c, qi_rows; fl_weight.interleaved): after a load, every 4-, 5-,
6- or 8-bit integer weight (5 / 6: GGUF's codes as split codes, which a CPU load now chooses for the weights it will
interleave) with groups of a multiple of 32 columns (6- and 8-bit: or 16) and rows a multiple of 8 is rearranged so that
one vector load holds 8 rows (fl_model_interleave, FASTLOAD_CPU_INTERLEAVE=0 turns it off).

What must hold:
  - the kernel's products are within the same bound as the row-major kernel's (test_cpu_qdecode.run_case's tolerance:
    float32 accumulation plus x's int16 rounding), for every format it takes: 4 and 8 bits, symmetric and min form,
    groups 16 (8-bit) / 32 / 64 / 96 / 128 / per channel, float16 / float32 scales, act-order perm, any number of rows of x (passes of up to 8; a
    prompt takes the same kernel); the float path (FASTLOAD_CPU_QDOT=float: the GEMM widening the codes) reads them;
  - formats it does not take are left row-major (run_op's "interleaved" 0) and still right;
  - a row's result is the same bits in any batch (the engine batches requests);
  - on whole models (GGUF Q4_0 / Q4_1 / Q4_K / Q4_K_M / Q8_0 / Q5_0 / Q5_K / Q6_K / a mix of all, GPTQ 4-bit with
    act-order and 8-bit, AWQ, int4 and int8 at load, and a Q8_0 embedding tied to the LM head, as the demo model's,
    which is interleaved too: its lookup reads interleaved rows): the weights are the
    same values (the float path's logits and save_pretrained's export the same bits as row-major), one-token and prompt
    logits agree within float / int16 rounding, and a load after the weights were finalised is refused.
"""
import numpy as np
import pytest

import fastload
import quant_fixtures as qf
from fastload import _C
from test_cpu_qdecode import COLS, run_case
from test_quant_checkpoints import built  # noqa: F401 (the fixture)
from test_quant_ops import pack, q_inputs, rng_seed, sround

QI_N = 8  # x rows per pass with AVX-512 (4 without): both are crossed by n = 1..9


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("group", [16, 32, 64, 96, 128])
def test_interleaved_every_group_batch_and_perm(bits, zeros, group):
    if bits == 4 and group == 16:
        pytest.skip("4-bit codes in 16-column groups stay row-major (test_formats_it_does_not_take_stay_row_major)")
    rng, seed = rng_seed()
    C = COLS[group]
    for n in (1, 2, 3, 4, 5, 8, 9, 16, 20, 37):
        for R in (8, 16, 40):
            sdtype = "float16" if (n + R // 8) % 2 else "float32"
            run_case(rng, seed, bits, zeros, 0, group, sdtype, n, R, C, perm=(n % 3 == 1), qdot="int16",
                     interleave=True)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("zeros", [False, True])
def test_interleaved_per_channel(bits, zeros):
    rng, seed = rng_seed()
    for C in (576, 1536):
        for n in (1, 3, 8):
            run_case(rng, seed, bits, zeros, 0, C, "float16", n, 24, C, perm=False, qdot="int16", interleave=True)


# Split codes (GGUF's 5- / 6-bit codes in 5 / 6 bits: 4-bit low plane + high plane, quant.h fl_qi_code): columns in
# whole spans (6-bit 128, 5-bit 256), groups as the GGUF types have them (Q6_K 16, Q5_K / Q5_0 / Q5_1 32) and wider.
@pytest.mark.parametrize("bits,zeros,group,C", [
    (6, False, 16, 384), (6, True, 16, 256), (6, False, 32, 512), (6, True, 64, 384), (6, False, 128, 640),
    (5, False, 32, 512), (5, True, 32, 768), (5, True, 64, 512), (5, False, 256, 1024),
])
def test_interleaved_split_codes(bits, zeros, group, C):
    sweep(bits, zeros, group, C, "int16")


def sweep(bits, zeros, group, C, qdot):
    """x rows 1..20 (passes of 4, 6, 8 and their tails: every pass size), 1 and 3 row groups, both scale types,
    perm or not"""
    rng, seed = rng_seed()
    for n in (1, 2, 3, 4, 5, 7, 8, 9, 20):
        for R in (8, 24):
            sdtype = "float16" if (n + R // 8) % 2 else "float32"
            run_case(rng, seed, bits, zeros, 0, group, sdtype, n, R, C, perm=(n % 3 == 2), qdot=qdot, interleave=True)


# int8 activations (FASTLOAD_CPU_QDOT=int8, llama.cpp's numerics): the VNNI form of the kernel (u8 codes x s8 x,
# x8 per 8 columns [0 1 4 5 2 3 6 7] for nibble codes), within int8 x's rounding bound; every code width and group
@pytest.mark.parametrize("bits,zeros,group,C", [
    (4, False, 32, 352), (4, True, 64, 320), (4, True, 128, 384), (8, False, 32, 352), (8, True, 16, 352),
    (8, False, 16, 288), (8, True, 96, 288), (6, False, 16, 384), (6, True, 32, 256), (5, True, 32, 512),
    (5, False, 64, 768),
])
def test_interleaved_int8_activations(bits, zeros, group, C, monkeypatch):
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "int8")
    sweep(bits, zeros, group, C, "int8")


@pytest.mark.parametrize("bits,zeros,code,group,R,C", [
    (4, False, 0, 32, 12, 352),   # rows not a multiple of 8
    (4, True, 0, 32, 1, 352),
    (8, False, 0, 32, 4, 352),
    (4, False, 1, 64, 16, 320),   # NF4
    (8, False, 0, 48, 16, 288),   # 8-bit codes in groups neither 16 nor a multiple of 32
    (4, True, 0, 16, 16, 352),    # 4-bit codes in 16-column groups
    (5, False, 0, 16, 16, 512),   # 5-bit split codes in 16-column groups (no GGUF type has them)
    (6, False, 0, 32, 12, 384),   # split codes, rows not a multiple of 8
])
def test_formats_it_does_not_take_stay_row_major(bits, zeros, code, group, R, C):
    rng, seed = rng_seed()
    for n in (1, 4):
        run_case(rng, seed, bits, zeros, code, group, "float16", n, R, C, perm=False, qdot="int16", interleave=False)


@pytest.mark.parametrize("qdot", ["int16", "int8"])
@pytest.mark.parametrize("bits,group", [(4, 64), (8, 16), (8, 32), (6, 16), (5, 32)])
@pytest.mark.parametrize("zeros", [True, False])
def test_a_row_is_the_same_bits_in_any_batch(bits, group, zeros, qdot, monkeypatch):
    """Symmetric codes on int16 x take their centre off the codes in wide passes and off the dot as centre * sum(x)
    in narrow ones (qi_rows' FOLD): both exact, so the same bits too."""
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", qdot)
    rng = np.random.default_rng(5)
    R, C = 48, 320 if bits in (4, 8) else 512
    codes = rng.integers(0, 1 << bits, size=(R, C))
    s = sround(rng.uniform(0.5, 2.0, size=(R, C // group)) * 0.05, "float16")
    z = sround(rng.uniform(-0.4, 0.4, size=(R, C // group)), "float16")
    x = rng.standard_normal((40, C)).astype(np.float32)
    params = {"bits": bits, "group_size": group, "sdtype": "float16", "interleave": 1}
    inp = q_inputs(pack(codes, bits), s, z if zeros else None, None)
    alone = [_C.run_op("cpu", "qmatmul", dict(inp, x=x[t:t + 1]), params)["y"][0] for t in range(40)]
    for n in (2, 3, 4, 5, 6, QI_N - 1, QI_N, QI_N + 1, 16, 40):   # 40: a prompt, the same kernel
        out = _C.run_op("cpu", "qmatmul", dict(inp, x=x[:n]), params)
        assert out["interleaved"] == 1
        for t in range(n):
            np.testing.assert_array_equal(out["y"][t], alone[t], err_msg=f"row {t} of a batch of {n}")


def load(path, monkeypatch, interleave, **kw):
    monkeypatch.setenv("FASTLOAD_CPU_INTERLEAVE", interleave)
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), device_map="cpu", torch_dtype="float32", **kw)


MODEL_CASES = ["gguf-Q4_0", "gguf-Q4_1", "gguf-Q4_K", "gguf-Q4_K_M", "gguf-Q8_0", "gguf-Q5_0", "gguf-Q5_K",
               "gguf-Q6_K", "gguf-mixed-all", "gptq-4b-g32-asym-v1-actorder", "awq-g64-qwen2",
               "gptq-4b-g128-sym-old-autogptq", "gptq-8b-g128-sym-v1", "int4-at-load", "int8-at-load",
               "gguf-Q8_0-embed-tied"]


@pytest.mark.parametrize("case", MODEL_CASES)
def test_models_interleaved_same_values(built, case, tmp_path, monkeypatch):
    if case.endswith("-at-load"):
        _q, ref = built("gguf-Q4_0")
        kw = {"load_in_4bit": True} if case.startswith("int4") else {"load_in_8bit": True}
        mi, mr = (load(ref, monkeypatch, v, **kw) for v in ("1", "0"))
    else:
        q, _ref = built(case)
        mi, mr = load(q, monkeypatch, "1"), load(q, monkeypatch, "0")
    ni, nr = mi._core.info["interleaved_weights"], mr._core.info["interleaved_weights"]
    assert ni > 0 and nr == 0, (case, ni, nr)
    li = {d["name"]: d for d in mi._core.layouts()}
    lr = {d["name"]: d for d in mr._core.layouts()}
    il = [n for n, d in li.items() if d["interleaved"]]
    assert len(il) == ni
    tied = bool(mi.config.get("tie_word_embeddings"))
    if tied and li["embed"]["dtype"].startswith("int"):  # the LM head's bytes: interleaved for that matmul, the lookup
        assert "lm_head" not in li and li["embed"]["interleaved"], (case, li["embed"])  # reads interleaved rows
    for n, d in li.items():
        took = ((n != "embed" or tied) and d["rows"] % 8 == 0 and d["cols"] % 32 == 0 and
                ((d["dtype"] in ("int4", "int5") and d["group_size"] % 32 == 0) or
                 (d["dtype"] in ("int6", "int8") and (d["group_size"] % 32 == 0 or d["group_size"] == 16))))
        assert bool(d["interleaved"]) == took, (case, n, d)
        skip = {"interleaved"}
        if d["dtype"] in ("int5", "int6"):  # split codes where the weight is interleaved, a byte a code otherwise
            assert d["interleaved"] and lr[n]["dtype"] == "int8", (case, n, d, lr[n])
            skip |= {"dtype", "bits", "bytes"}
        assert {k: v for k, v in d.items() if k not in skip} == {k: v for k, v in lr[n].items() if k not in skip}
    if case in ("gguf-Q6_K", "gguf-Q5_K", "gguf-Q5_0", "gguf-mixed-all"):
        assert any(d["dtype"] in ("int5", "int6") for d in li.values()), (case, li)
    V = mi.config["vocab_size"]
    ids = np.random.default_rng(11).integers(3, V, (2, 12))
    # the float path (the GEMM widening the codes, FASTLOAD_CPU_QDOT=float): the same values, so the same bits
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "float")
    np.testing.assert_array_equal(np.asarray(mi(ids).logits), np.asarray(mr(ids).logits), err_msg=case)
    exact = {k: np.asarray(mi(ids[:, :k]).logits, np.float64) for k in (1, 12)}
    monkeypatch.delenv("FASTLOAD_CPU_QDOT")
    # against that float path: one token a row (both layouts' integer kernels, int16 x; their arithmetic differs:
    # the interleaved kernel takes symmetric codes' centre off the codes, the row-major one as an offset term) and a
    # prompt of 24 rows (interleaved: the integer kernel; row-major: the float GEMM): within x's int16 rounding
    # (worst seen over these cases: 9.6e-5 at one token, 3.8e-4 at 12)
    for k, rel in ((1, 2e-4), (12, 1e-3)):
        ex = exact[k]
        for lay, m in (("interleaved", mi), ("row-major", mr)):
            a = np.asarray(m(ids[:, :k]).logits, np.float64)
            assert np.abs(a - ex).max() <= rel * np.abs(ex).max(), (case, lay, k, np.abs(a - ex).max(), np.abs(ex).max())
    one = np.asarray(mi(ids[1:, :1]).logits)                    # row 1 alone: the same bits as in the batch of 2
    np.testing.assert_array_equal(one[0], np.asarray(mi(ids[:, :1]).logits)[1])
    # save_pretrained dequantises: the same float values from either layout
    mi.save_pretrained(str(tmp_path / "i"))
    mr.save_pretrained(str(tmp_path / "r"))
    ei = qf.read_safetensors(str(tmp_path / "i" / "model.safetensors"))
    er = qf.read_safetensors(str(tmp_path / "r" / "model.safetensors"))
    assert ei.keys() == er.keys()
    for k in ei:
        np.testing.assert_array_equal(ei[k], er[k], err_msg=k)


def test_no_load_after_the_weights_are_final(built, monkeypatch):
    q, _ref = built("gguf-Q4_0")
    m = load(q, monkeypatch, "1")
    with pytest.raises(ValueError, match="finalised"):
        m._core.load([])
