"""What the CUDA op tests share (test_cuda_ops, test_cuda_quant, test_cuda_engine): the device, the activation
dtypes and their tolerances, random inputs rounded to the activation dtype, and the comparisons.

Tolerances, decided up front per dtype (u = unit roundoff of the activation dtype; float32's is taken as 2^-22:
fast-math intrinsics and reordered sums):
  - relative L2 error  ||got - ref|| / ||ref||  <  REL_L2[act]
  - every element      |got - ref|  <=  ELEM_K * u * (|ref| + rms(ref)), widened where sums are long or cancel
    (check_close's sum_len and terms)
  - attention, which rounds its probabilities to act, has ATT_REL_L2 and ATT_ELEM_K instead
  - copies: bit-exact (check_exact)."""
import math
import os

import numpy as np
import pytest

DEV = os.environ.get("FASTLOAD_TEST_CUDA_DEVICE", "cuda:0")
ACTS = ["float16", "bfloat16", "float32"]
REL_L2 = {"float16": 2e-3, "bfloat16": 1e-2, "float32": 1e-5}
# attention rounds its probabilities to act for the P.V product on the tensor cores (csrc/cuda/attention.cuh)
ATT_REL_L2 = {"float16": 5e-3, "bfloat16": 2e-2, "float32": 1e-4}
UNIT = {"float16": 2.0 ** -11, "bfloat16": 2.0 ** -8, "float32": 2.0 ** -22}  # f32: fast-math intrinsics, reordered sums
ELEM_K = 8
ATT_ELEM_K = 32


def rng_and_seed():
    seed = int(np.random.SeedSequence().entropy % (2 ** 63))
    return np.random.default_rng(seed), seed


def to_act(x, act):
    """Round float32 values to `act` (round to nearest even) and back to float32."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if act == "float16":
        return x.astype(np.float16).astype(np.float32)
    if act == "bfloat16":
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
        return u.astype(np.uint32).view(np.float32)
    return x


def randn(rng, shape, act, scale=1.0):
    return to_act(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale), act)


def check_close(got, ref, act, what, seed, k=ELEM_K, rel_l2=REL_L2, sum_len=0, terms=None):
    """sum_len: the length of the dot products behind each element (matmul's C). In float32 the two sides' different
    summation orders, not the output rounding, set the error: it grows like sqrt(sum_len) (seen: C = 4097 through
    cuBLAS at 1.15x the plain limit, one element in 18000), so the float32 element limit widens by sqrt(sum_len) / 32
    past 1024 terms.
    terms (optional, with sum_len): sum_k |x_k W_k| per output. Where those terms cancel to a small output (quantised
    weights with offsets: the device sums s * sum(q x) + m * sum(x) in float32), the rounding is set by the terms,
    not by the output: its typical size for a C-term float32 sum is ~ sqrt(C) * u * rms(term) ~ u * terms / sqrt(C)
    (u = 2^-24 whatever the activation dtype: the sums are float32), and k times that widens the element limit.
    Seen without it: nf4 with offsets, float32, one 1024-column group, 2.3e-7 off against a limit of 2.0e-7 (terms
    41.8: the limit becomes 8.2e-7; one wrong code moves an output by ~terms / C = 4e-2)."""
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.isfinite(ref).all(), f"{what}: the reference is not finite (seed {seed})"
    bad = ~np.isfinite(got)
    assert not bad.any(), f"{what}: {int(bad.sum())} non-finite outputs (unwritten or NaN), first at " \
                          f"{np.argwhere(bad)[0].tolist()} (seed {seed})"
    g, r = got.astype(np.float64), ref.astype(np.float64)
    nref = np.linalg.norm(r)
    rel = np.linalg.norm(g - r) / (nref if nref > 0 else 1.0)
    assert rel < rel_l2[act], f"{what} [{act}]: rel-L2 error {rel:.3g} >= {rel_l2[act]} (seed {seed})"
    rms = math.sqrt(float(np.mean(r * r))) if r.size else 0.0
    lim = k * UNIT[act] * (np.abs(r) + rms) + 1e-30
    if act == "float32" and sum_len > 1024:
        lim *= math.sqrt(sum_len) / 32
    if terms is not None and sum_len > 0:
        lim = lim + k * 2.0 ** -24 * terms / math.sqrt(sum_len)
    over = np.abs(g - r) > lim
    if over.any():
        i = tuple(np.argwhere(over)[0])
        pytest.fail(f"{what} [{act}]: {int(over.sum())} elements off, first at {list(i)}: got {g[i]!r}, "
                    f"ref {r[i]!r}, limit {lim[i]:.3g} (seed {seed})")


def check_exact(got, ref, what, seed):
    assert got.shape == ref.shape
    assert np.isfinite(got).all(), f"{what}: non-finite outputs (seed {seed})"
    assert np.array_equal(got, ref), f"{what}: differs at {np.argwhere(got != ref)[0].tolist()} (seed {seed})"
