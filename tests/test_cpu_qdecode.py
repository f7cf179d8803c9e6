"""The CPU decode kernels for quantised weights (csrc/cpu/cpu_qmatmul.c, n <= 4 rows of x, group % 32 == 0 or 16):
every format and group size through _C.run_op("qmatmul"), against numpy on the dequantised weights.

What is exercised: the per-chunk scale / offset loads for groups of 32, 64, 96, 128 and per channel (one vector
load of the groups a chunk of 8 blocks touches, spread with vpermps; a scalar copy for the last rows, whose load
would run past the scales), row blocks and their tails (R = 1..9, 37), the last chunk of a row (blocks % 8 != 0),
n = 1..4, act-order perm, float16 / float32 scales, each FASTLOAD_CPU_QDOT integer mode, and NF4 codes (int16
weights from a 16-entry table).

Tolerance (|y - x @ W^T| per element, W the float32 dequantised weights, numpy float64):
  2^-20 * (|x| @ |W|^T)                                 float32 accumulation (as test_quant_ops)
  + sum_b dx_b / 2 * sum_{k in b} |w_k|                 x quantised per block of 32 (dx_b = max|x_b| / 32767 or 127)
  + NF4 only: |x| @ (|s| * e[q])^T                      the table's rounding: code q's weight is s * T[q] / 2^14,
                                                        e[q] = |T[q] / 2^14 - nf4[q]| <= 2^-15 (T = rint(nf4 * 2^14))
A wrong code, scale, group index, offset, row or perm moves a result by O(|x| |w|), far outside this.
"""
import numpy as np
import pytest

from fastload import _C
from test_quant_ops import NF4, F32_K, QDOT_IMAX, int_x_tol, np_dequant, pack, q_inputs, rng_seed, sround

NF4_K = 14                                             # csrc/cpu/cpu_qmatmul.c: NF4_K
NF4_T = np.rint(NF4.astype(np.float64) * 2 ** NF4_K)   # the int16 table
NF4_ERR = np.abs(NF4_T / 2 ** NF4_K - NF4.astype(np.float64))

FORMATS = [  # bits, zeros, code
    (4, True, 0),    # int4 at load, GGUF Q4_1 / Q4_K, AWQ / GPTQ
    (4, False, 0),   # GGUF Q4_0, GPTQ symmetric
    (8, False, 0),   # int8 at load, GGUF Q8_0 / Q5_0 / Q6_K
    (8, True, 0),    # GGUF Q5_1 / Q5_K
    (4, False, 1),   # nf4 at load
    (4, True, 1),    # NF4 with offsets
]
COLS = {16: 352, 32: 352, 64: 320, 96: 288, 128: 384}  # 11, 11, 10, 9, 12 blocks of 32: every row ends in a part chunk


def table_tol(x, codes, scales, group, code):
    if code != 1:
        return 0.0
    e = NF4_ERR[codes] * np.repeat(np.abs(scales.astype(np.float64)), group, axis=1)   # [R, C]
    return np.abs(x.astype(np.float64)) @ e.T


def run_case(rng, seed, bits, zeros, code, group, sdtype, n, R, C, perm, qdot, interleave=None):
    """interleave: None, or whether the backend must take the weight into its interleaved layout (run_op's
    interleave=1; test_cpu_interleave.py)"""
    hi = 1 << bits
    codes = rng.integers(0, hi, size=(R, C))
    q = pack(codes, bits)
    ng = C // group
    s = sround(rng.uniform(0.5, 2.0, size=(R, ng)) * (0.05 if bits == 4 else 0.005), sdtype)
    s *= np.where(rng.random((R, ng)) < 0.2, -1, 1).astype(np.float32)     # negative scales (nf4's sign search)
    z = sround(rng.uniform(-0.4, 0.4, size=(R, ng)), sdtype) if zeros else None
    x = rng.standard_normal((n, C)).astype(np.float32)
    x[:, rng.integers(0, C, size=3)] *= 20                                 # outliers: blocks of different scale
    p = rng.permutation(C).astype(np.int32) if perm else None
    params = {"bits": bits, "group_size": group, "sdtype": sdtype, "code": code}
    if interleave is not None:
        params["interleave"] = 1
    out = _C.run_op("cpu", "qmatmul", dict(q_inputs(q, s, z, p), x=x), params)
    y = out["y"]
    if interleave is not None:
        assert out["interleaved"] == int(interleave), (bits, zeros, code, group, R, C, out["interleaved"])
    assert y.shape == (n, R)
    W = np_dequant(q, s, z, bits, group, code)
    xg = x[:, p] if perm else x                                            # column j multiplies x[perm[j]]
    ref = xg.astype(np.float64) @ W.astype(np.float64).T
    tol = (F32_K * (np.abs(xg.astype(np.float64)) @ np.abs(W.astype(np.float64)).T) + 1e-30
           + (int_x_tol(xg, W, qdot if interleave else "int16" if code == 1 or group == 16 or bits in (5, 6) else qdot)
              if n <= 16 or interleave else 0.0)   # an interleaved weight takes the integer kernel at any n
           + table_tol(xg, codes, s, group, code))
    err = np.abs(y.astype(np.float64) - ref)
    bad = err > tol
    assert not bad.any(), (f"seed {seed} bits {bits} zeros {zeros} code {code} g{group} {sdtype} n={n} R={R} "
                           f"perm {perm}: {bad.sum()} of {bad.size} wrong, worst err {err.max():.3g} "
                           f"(tol there {tol.flat[np.argmax(err - tol)]:.3g})")
    return err, tol


@pytest.mark.parametrize("bits,zeros,code", FORMATS)
@pytest.mark.parametrize("group", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("qdot", ["int16", "int8"])
def test_decode_every_format_group_and_tail(bits, zeros, code, group, qdot, monkeypatch):
    """group 16 (Q6_K; a fused weight with a Q6_K part): two groups a block of x, qdec16_rows, int16 activations in
    both modes (NF4: the float path)."""
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", qdot)
    rng, seed = rng_seed()
    C = COLS[group]
    for n in (1, 2, 3, 4):
        for R in (1, 2, 3, 5, 6, 7, 9, 37):
            sdtype = "float16" if (n + R) % 2 else "float32"
            run_case(rng, seed, bits, zeros, code, group, sdtype, n, R, C, perm=(R % 3 == 1), qdot=qdot)


@pytest.mark.parametrize("bits,zeros,code", FORMATS)
@pytest.mark.parametrize("C", [576, 1536])
def test_decode_per_channel(bits, zeros, code, C):
    """group = cols (int8 per channel, the at-load lm_head): every chunk's 8 blocks take the row's one scale."""
    rng, seed = rng_seed()
    for n in (1, 2, 3, 4):
        for R in (1, 5, 37):
            run_case(rng, seed, bits, zeros, code, C, "float16", n, R, C, perm=False, qdot="int16")


@pytest.mark.parametrize("bits,zeros", [(5, False), (5, True), (6, False), (6, True)])
@pytest.mark.parametrize("group", [16, 32, 64, 96, 128])
@pytest.mark.parametrize("qdot", ["int16", "int8"])
def test_split_codes(bits, zeros, group, qdot, monkeypatch):
    """5- and 6-bit split codes (csrc/quant.h; GGUF Q5_0 / Q5_1 / Q5_K / Q6_K on the CPU): the decode kernels (int16
    activations in both modes; qdec16_rows for group 16), passes of 4 rows (n = 5), and the float path's widening
    (n = 17), against numpy on codes packed by the test's own reading of the layout."""
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", qdot)
    rng, seed = rng_seed()
    for n in (1, 2, 3, 4, 5, 17):
        for R in (1, 3, 5, 9, 37):
            sdtype = "float16" if (n + R) % 2 else "float32"
            run_case(rng, seed, bits, zeros, 0, group, sdtype, n, R, 768, perm=(R % 3 == 1), qdot=qdot)


@pytest.mark.parametrize("bits", [5, 6])
def test_split_codes_need_whole_spans(bits):
    """cols not a multiple of the high plane's span (128 columns for 6 bits, 256 for 5) is refused, not misread."""
    C = 384 if bits == 5 else 320
    q = np.zeros((2, C * bits // 8), np.uint8)
    with pytest.raises((ValueError, NotImplementedError), match="split codes"):
        _C.run_op("cpu", "qmatmul", dict(q_inputs(q, np.ones((2, C // 32), np.float32), None),
                                         x=np.ones((1, C), np.float32)),
                  {"bits": bits, "group_size": 32, "sdtype": "float32", "code": 0})


@pytest.mark.parametrize("bits,zeros", [(8, False), (8, True), (4, False), (4, True)])
def test_group16_takes_the_integer_kernel(bits, zeros, monkeypatch):
    """16-column groups with integer codes run the integer decode kernel (int16 activations, qdec16_rows), not the
    float path (which ran Q6_K at a third of llama.cpp's speed): its results differ from the float path's in the
    low bits (x rounded to int16 per block), within int_x_tol. Cols not a multiple of 32 keep the float path."""
    rng, seed = rng_seed()
    for C, integer in ((352, True), (336, False)):
        R, n = 13, 2
        codes = rng.integers(0, 16 if bits == 4 else 256, size=(R, C))
        q = pack(codes, bits)
        s = sround(rng.uniform(0.5, 2.0, size=(R, C // 16)) * 0.01, "float32")
        z = sround(rng.uniform(-0.4, 0.4, size=(R, C // 16)), "float32") if zeros else None
        x = rng.standard_normal((n, C)).astype(np.float32)
        ys = {}
        for mode in ("int16", "int8", "float"):
            monkeypatch.setenv("FASTLOAD_CPU_QDOT", mode)
            ys[mode] = _C.run_op("cpu", "qmatmul", dict(q_inputs(q, s, z), x=x),
                                 {"bits": bits, "group_size": 16, "sdtype": "float32", "code": 0})["y"]
        np.testing.assert_array_equal(ys["int16"], ys["int8"])     # the int8 mode takes int16 activations here
        assert (not np.array_equal(ys["int16"], ys["float"])) == integer, (seed, C)
        W = np_dequant(q, s, z, bits, 16, 0)
        ref = x.astype(np.float64) @ W.astype(np.float64).T
        tol = F32_K * (np.abs(x.astype(np.float64)) @ np.abs(W.astype(np.float64)).T) + (int_x_tol(x, W, "int16")
                                                                                          if integer else 0.0)
        assert (np.abs(ys["int16"] - ref) <= tol).all(), (seed, C)


def test_decode_group_scales_are_not_mixed_up():
    """One group's scale made huge: only the columns of that group (in each row) may change, as the float path
    says; a kernel that spread the groups over the wrong blocks moves other columns' sums."""
    rng, seed = rng_seed()
    for group, C, code in ((16, 352, 0), (64, 320, 0), (96, 288, 0), (128, 384, 0), (64, 320, 1), (128, 384, 1)):
        R, ng = 9, C // group
        codes = rng.integers(0, 16, size=(R, C))
        q = pack(codes, 4)
        s = sround(rng.uniform(0.5, 2.0, size=(R, ng)) * 0.05, "float16")
        s[4, ng - 1] = 50.0
        x = np.zeros((1, C), np.float32)
        x[0, :group * (ng - 1)] = rng.standard_normal(group * (ng - 1))   # the last group's columns: x = 0
        y = _C.run_op("cpu", "qmatmul", dict(q_inputs(q, s, None), x=x), {"bits": 4, "group_size": group,
                                                                           "sdtype": "float16", "code": code})["y"]
        W = np_dequant(q, s, None, 4, group, code)
        ref = x.astype(np.float64) @ W.astype(np.float64).T
        np.testing.assert_allclose(y, ref, rtol=1e-3, atol=1e-3, err_msg=f"seed {seed} group {group} code {code}")


def test_nf4_table_bound():
    """The int16 table's sums cannot overflow int32: 4 products per lane of at most 2^14 * 32767 (x16), and
    its rounding stays within 2^-15 of each code book value (relative to the group's scale)."""
    assert np.abs(NF4_T).max() == 2 ** NF4_K and 4 * 2 ** NF4_K * 32767 < 2 ** 31
    assert NF4_ERR.max() <= 2.0 ** -(NF4_K + 1)


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("group", [32, 64, 96, 128])
def test_nf4_decode_is_the_int16_table_exactly(zeros, group):
    """x already int16 * 2^-10 per block (each block's max 32767 * 2^-10: its quantisation is exact), so the NF4
    decode path must equal x @ (s * T[q] / 2^14 (+ m))^T to float tolerance, T = rint(nf4 * 2^14): this pins the
    table itself (one entry off by 1 moves results by 2^-14 * s * |x|, far outside 2^-20)."""
    rng, seed = rng_seed()
    C = COLS[group]
    for n in (1, 2, 3, 4):
        for R in (1, 4, 7, 37):
            codes = rng.integers(0, 16, size=(R, C))
            q = pack(codes, 4)
            s = sround(rng.uniform(0.5, 2.0, size=(R, C // group)) * 0.05, "float16")
            z = sround(rng.uniform(-0.4, 0.4, size=(R, C // group)), "float16") if zeros else None
            xi = rng.integers(-32767, 32768, size=(n, C))
            xi.reshape(n, C // 32, 32)[:, :, 0] = 32767                    # every block's max: dx = 2^-10 exactly
            x = (xi * 2.0 ** -10).astype(np.float32)
            y = _C.run_op("cpu", "qmatmul", dict(q_inputs(q, s, z), x=x),
                          {"bits": 4, "group_size": group, "sdtype": "float16", "code": 1})["y"]
            Wt = NF4_T[codes] / 2 ** NF4_K * np.repeat(s.astype(np.float64), group, axis=1)
            if zeros:
                Wt = Wt + np.repeat(z.astype(np.float64), group, axis=1)
            ref = x.astype(np.float64) @ Wt.T
            tol = F32_K * (np.abs(x.astype(np.float64)) @ np.abs(Wt).T) + 1e-30
            err = np.abs(y - ref)
            assert (err <= tol).all(), f"seed {seed} n={n} R={R}: worst err {err.max():.3g}"


@pytest.mark.parametrize("zeros", [False, True])
@pytest.mark.parametrize("qdot", ["int16", "int8"])
def test_nf4_decode_nan_in_x_propagates(zeros, qdot, monkeypatch):
    """A NaN in row t of x makes row t's outputs NaN on the NF4 integer path too (its block's dx is NaN), and only
    those: the other rows stay finite."""
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", qdot)
    rng, seed = rng_seed()
    C, R, group = 320, 9, 64
    codes = rng.integers(0, 16, size=(R, C))
    s = sround(rng.uniform(0.5, 2.0, size=(R, C // group)) * 0.05, "float16")
    z = sround(rng.uniform(-0.4, 0.4, size=(R, C // group)), "float16") if zeros else None
    for n in (1, 2, 3, 4):
        x = rng.standard_normal((n, C)).astype(np.float32)
        x[n - 1, 100] = np.nan
        y = _C.run_op("cpu", "qmatmul", dict(q_inputs(pack(codes, 4), s, z), x=x),
                      {"bits": 4, "group_size": group, "sdtype": "float16", "code": 1})["y"]
        assert np.isnan(y[n - 1]).all() and np.isfinite(y[:n - 1]).all(), f"seed {seed} n={n}"
