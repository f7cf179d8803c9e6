"""The CUDA backend's ops against the CPU backend, one op at a time, through fastload._C.run_op.

Every test draws fresh random inputs (the seed is in the failure message), rounds them to the
activation dtype first (so both backends see the same values: the CPU backend computes in float32
on them), runs the op on "cpu" and on "cuda:0" (float16, bfloat16 and float32 activations), and
compares. run_op poisons every output buffer with NaN bytes before the op and checks the memory
counters after it; a NaN in an output never passes.

Tolerances: cuda_util's, decided up front per dtype (one rounding of the output, plus one of an
intermediate the model keeps in act, as the residual stream, fit well inside the element limit);
copies (embed, gather_rows, logits_to_host, untouched cache slots) are bit-exact.
"""
import math

import numpy as np
import pytest

from fastload import _C
from paged_util import paged_case
from cuda_util import (ACTS, ATT_ELEM_K, ATT_REL_L2, DEV, REL_L2, check_close, check_exact, randn,
                       rng_and_seed, to_act)

_info = _C.build_info()
if _info["cuda_devices"] == 0:
    pytest.skip("fastload was built without CUDA" if not _info["cuda_compiled"] else
                "no CUDA device: " + (_info["cuda_error"] or "0 devices visible"), allow_module_level=True)

pytestmark = pytest.mark.gpu


# ----------------------------------------------------------------------------------------------
# helpers (the shared ones: cuda_util)
# ----------------------------------------------------------------------------------------------
def run_both(op, inputs, params, act):
    ref = _C.run_op("cpu", op, inputs, dict(params, act="float32"))
    got = _C.run_op(DEV, op, inputs, dict(params, act=act))
    assert set(got) == set(ref)
    return got, ref


# ----------------------------------------------------------------------------------------------
# embedding, norms, SwiGLU, gathers
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("vocab,d", [(49152, 576), (151936, 200), (1000, 4097)])
@pytest.mark.parametrize("n", [1, 7, 33])
def test_embed(act, vocab, d, n):
    rng, seed = rng_and_seed()
    emb = randn(rng, (vocab, d), act)
    tokens = rng.integers(0, vocab, n, dtype=np.int32)
    tokens[0] = vocab - 1
    got, ref = run_both("embed", {"tokens": tokens, "emb": emb}, {}, act)
    check_exact(got["x"], emb[tokens], "embed", seed)
    check_exact(got["x"], ref["x"], "embed vs cpu", seed)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [576, 1000, 4097, 8192, 16400])  # 16400: past the register-held rows (loop form)
@pytest.mark.parametrize("n", [1, 3, 33])
def test_rmsnorm(act, d, n):
    rng, seed = rng_and_seed()
    x = randn(rng, (n, d), act, 3.0)
    w = to_act(1.0 + 0.2 * rng.standard_normal(d, dtype=np.float32), act)
    got, ref = run_both("rmsnorm", {"x": x, "w": w}, {"eps": 1e-5}, act)
    check_close(got["out"], ref["out"], act, "rmsnorm", seed)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [576, 1000, 4097, 16400])
@pytest.mark.parametrize("n", [1, 2, 9, 33])
def test_add_rmsnorm(act, d, n):
    rng, seed = rng_and_seed()
    resid, delta = randn(rng, (n, d), act, 2.0), randn(rng, (n, d), act)
    w = to_act(1.0 + 0.2 * rng.standard_normal(d, dtype=np.float32), act)
    got, ref = run_both("add_rmsnorm", {"resid": resid, "delta": delta, "w": w}, {"eps": 1e-6}, act)
    # The CUDA backend keeps resid in act (rounded), as the model stores it: one rounding.
    check_close(got["resid"], ref["resid"], act, "add_rmsnorm resid", seed)
    check_close(got["out"], ref["out"], act, "add_rmsnorm out", seed)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("f", [1000, 4097, 18944])
@pytest.mark.parametrize("n", [1, 5, 33])
def test_swiglu(act, f, n):
    rng, seed = rng_and_seed()
    gu = randn(rng, (n, 2 * f), act, 3.0)
    got, ref = run_both("swiglu", {"gu": gu}, {}, act)
    check_close(got["out"], ref["out"], act, "swiglu", seed)


@pytest.mark.parametrize("act", ACTS)
# f x C: ragged f and a row shorter than one step, whole steps plus a tail, a tail not a multiple of 32 vectors, a
# down_proj-like long row, and a gate|up taller than 16384 rows (where the plain GEMV takes 4 rows a warp from n = 2)
@pytest.mark.parametrize("f,C", [(1001, 576), (37, 3584), (129, 2400), (40, 18952), (8200, 1024)])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("u", ["4", "8"])
def test_matmul_swiglu(act, f, C, n, u, monkeypatch):
    """gate|up's GEMV with SwiGLU in its epilogue (decode, n <= 4; n = 5 takes cuBLAS + the SwiGLU kernel) equals the
    backend's matmul followed by its swiglu bit for bit, and the CPU backend in float32 within tolerance."""
    monkeypatch.setenv("FASTLOAD_GLU_U", u)
    rng, seed = rng_and_seed()
    x = randn(rng, (n, C), act)
    W = randn(rng, (2 * f, C), act, 3.0 / math.sqrt(C))
    got = _C.run_op(DEV, "matmul_swiglu", {"x": x, "W": W}, {"act": act})["out"]
    gu = _C.run_op(DEV, "matmul", {"x": x, "W": W}, {"act": act})["y"]
    two = _C.run_op(DEV, "swiglu", {"gu": gu}, {"act": act})["out"]
    np.testing.assert_array_equal(got, two, err_msg=f"fused gate|up + SwiGLU differs from the two ops (seed {seed})")
    # against the CPU: gate|up element by element as test_matmul checks it; SwiGLU's output as a whole (silu(g) * u
    # of two 1024-term sums can cancel, so an element's error is bounded by g's and u's, not by its own size)
    ref_gu = _C.run_op("cpu", "matmul", {"x": x, "W": W}, {"act": "float32"})["y"]
    check_close(gu, ref_gu, act, f"gate|up n={n} f={f} C={C}", seed, sum_len=C)
    ref = _C.run_op("cpu", "matmul_swiglu", {"x": x, "W": W}, {"act": "float32"})["out"]
    rel = np.linalg.norm(got.astype(np.float64) - ref) / np.linalg.norm(ref)
    assert rel < REL_L2[act], f"matmul_swiglu n={n} f={f} C={C} [{act}]: rel-L2 {rel:.3g} (seed {seed})"


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,V", [(1, 152064), (3, 65024), (2, 1000), (2, 1001), (1, 7)])
def test_argmax_rows(act, n, V):
    """The engine's greedy token on the device: the first maximum of each row in the activation dtype (ties, -inf,
    a row of all -inf gives 0); rows of whole 16-byte vectors take the vector loads, others the scalar loop."""
    rng, seed = rng_and_seed()
    x = randn(rng, (n, V), act, 3.0)
    x[0, V // 3] = x[0, V // 2] = 50.0  # a tie: the lower index wins
    if n > 1:
        x[1, :] = -np.inf
    if n > 2:
        x[2, V - 1] = 60.0
    got = _C.run_op(DEV, "argmax_rows", {"logits": x}, {"act": act})["ids"]
    # what the device holds: x rounded to the activation dtype (round trip through logits_to_host)
    held = _C.run_op(DEV, "logits_to_host", {"src": x}, {"act": act})["out"]
    want = np.argmax(held, axis=1)
    want[np.all(held == -np.inf, axis=1)] = 0
    np.testing.assert_array_equal(got, want, err_msg=f"argmax_rows {act} {n}x{V} (seed {seed})")


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("d", [576, 4097])
@pytest.mark.parametrize("n", [1, 5, 300])
def test_gather_rows(act, d, n):
    rng, seed = rng_and_seed()
    m = 2 * n + 3
    src = randn(rng, (m, d), act)
    rows = rng.integers(0, m, n, dtype=np.int32)
    rows[-1] = m - 1
    got, ref = run_both("gather_rows", {"src": src, "rows": rows}, {}, act)
    check_exact(got["dst"], src[rows], "gather_rows", seed)
    check_exact(got["dst"], ref["dst"], "gather_rows vs cpu", seed)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,vocab", [(1, 151936), (3, 49152), (33, 1001)])
def test_logits_to_host(act, n, vocab):
    rng, seed = rng_and_seed()
    src = randn(rng, (n, vocab), act, 5.0)
    got, ref = run_both("logits_to_host", {"src": src}, {}, act)
    check_exact(got["out"], src, "logits_to_host", seed)
    check_exact(got["out"], ref["out"], "logits_to_host vs cpu", seed)


# ----------------------------------------------------------------------------------------------
# matmul: GEMV (n <= 4 by default) and cuBLAS (larger n), with and without bias; every GEMV
# kernel variant at every n it takes, through the backend's knobs
# ----------------------------------------------------------------------------------------------
MM_SHAPES = [(1000, 576), (4097, 1000), (576, 4097), (37, 3584)]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("R,C", MM_SHAPES)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 8, 9, 64])
@pytest.mark.parametrize("bias", [False, True])
def test_matmul(act, R, C, n, bias):
    rng, seed = rng_and_seed()
    x = randn(rng, (n, C), act)
    W = randn(rng, (R, C), act, 1.0 / math.sqrt(C))
    inputs = {"x": x, "W": W}
    if bias:
        inputs["bias"] = randn(rng, (R,), act)
    got, ref = run_both("matmul", inputs, {}, act)
    check_close(got["y"], ref["y"], act, f"matmul n={n} {R}x{C} bias={bias}", seed, sum_len=C)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("variant", ["fma1", "fma1s", "fma2", "fma4", "fma2x8", "mma4", "mma8"])
# Row lengths: shorter than one full step (1000, 576), whole steps plus a tail (3584: 448 16-byte
# vectors in bf16), a tail that is not a multiple of 32 vectors (2400 -> 300 / 600 vectors), and
# a down_proj-like long row with a tail (18952 -> 2369 vectors).
@pytest.mark.parametrize("R,C", [(4097, 1000), (37, 3584), (1000, 576), (129, 2400), (40, 18952)])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_gemv_variants(act, variant, R, C, n, monkeypatch):
    """FASTLOAD_GEMV_UP_TO=8 routes every n <= 8 to the GEMV, FASTLOAD_GEMV_VARIANT picks the kernel."""
    monkeypatch.setenv("FASTLOAD_GEMV_UP_TO", "8")
    monkeypatch.setenv("FASTLOAD_GEMV_VARIANT", variant)
    rng, seed = rng_and_seed()
    inputs = {"x": randn(rng, (n, C), act), "W": randn(rng, (R, C), act, 1.0 / math.sqrt(C)),
              "bias": randn(rng, (R,), act)}
    if variant.startswith("mma") and act == "float32":
        with pytest.raises(NotImplementedError, match="tensor-core"):
            _C.run_op(DEV, "matmul", inputs, {"act": act})
        return
    got, ref = run_both("matmul", inputs, {}, act)
    check_close(got["y"], ref["y"], act, f"gemv {variant} n={n} {R}x{C}", seed, sum_len=C)


@pytest.mark.parametrize("settings,match", [
    ({"FASTLOAD_GEMV_VARIANT": "fma3"}, "FASTLOAD_GEMV_VARIANT='fma3'"),
    ({"FASTLOAD_GLU_U": "6"}, "FASTLOAD_GLU_U='6'"),
    ({"FASTLOAD_GLU_FUSE": "yes"}, "FASTLOAD_GLU_FUSE='yes'"),
    ({"FASTLOAD_ATT_FUSE": "yes"}, "FASTLOAD_ATT_FUSE='yes'"),
    ({"FASTLOAD_LOGITS_PIN": "2"}, "FASTLOAD_LOGITS_PIN='2' is not 0 or 1"),
    ({"FASTLOAD_MOE_QDP": "2"}, "FASTLOAD_MOE_QDP='2'"),
    ({"FASTLOAD_MOE_QDP_ROWS": "8"}, "FASTLOAD_MOE_QDP_ROWS='8' is not 4 or 2"),
    ({"FASTLOAD_QGEMV_UP_TO": "9"}, "FASTLOAD_QGEMV_UP_TO='9'"),
    ({"FASTLOAD_QGEMV": "fast"}, "FASTLOAD_QGEMV='fast' is not auto, dp, fma, mma or generic"),
    ({"FASTLOAD_QDP_CFG": "r9u9"}, "FASTLOAD_QDP_CFG='r9u9'"),
    ({"FASTLOAD_QDP_CFG": "huge:r4u2"}, "class 'huge' is not small, big or long"),
    ({"FASTLOAD_QDP_CFG": "long:r2u4/g0"}, "'/g0' is not /g1../g16"),
    ({"FASTLOAD_QDP_CFG": "r2u4,4big:r4u5"}, "'r4u5' is not auto"),
])
def test_knob_errors(monkeypatch, settings, match):
    """The backend's knobs are read when it is made: a bad value is a ValueError naming it (any op makes one)."""
    for k, v in settings.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        _C.run_op(DEV, "swiglu", {"gu": np.ones((1, 2), np.float32)}, {"act": "float16"})


@pytest.mark.parametrize("act", ["float16", "bfloat16"])
@pytest.mark.parametrize("n", [1, 4, 8, 9])
def test_matmul_lm_head(act, n):
    """A vocabulary-sized head (Qwen2.5's 151936 rows) at decode and just past the GEMV."""
    rng, seed = rng_and_seed()
    R, C = 151936, 576
    x = randn(rng, (n, C), act)
    W = randn(rng, (R, C), act, 1.0 / math.sqrt(C))
    got, ref = run_both("matmul", {"x": x, "W": W}, {}, act)
    check_close(got["y"], ref["y"], act, f"lm_head n={n}", seed)


# ----------------------------------------------------------------------------------------------
# RoPE + KV-cache store, attention
# ----------------------------------------------------------------------------------------------
def inv_freq(hd, theta):
    i = np.arange(hd // 2, dtype=np.float32)
    return (np.float32(1.0) / np.power(np.float32(theta), (2 * i) / np.float32(hd))).astype(np.float32)


ROPE_CASES = [  # B, T, start, nh, nkv, hd, max_len
    (1, 1, 0, 14, 2, 64, 8),
    (2, 5, 3, 4, 4, 128, 16),
    (3, 33, 7, 6, 2, 96, 41),
    (1, 1, 1023, 32, 8, 128, 1024),
    (1, 2, 5, 64, 64, 128, 8),  # more pairs (8192) and k / v values (8192) than one pass of the block's threads
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ROPE_CASES, ids=lambda c: "B%d-T%d-s%d-h%d/%d-d%d" % c[:6])
@pytest.mark.parametrize("on_device", [0, 1])
def test_rope_store(act, case, on_device):
    B, T, start, nh, nkv, hd, max_len = case
    rng, seed = rng_and_seed()
    qkv = randn(rng, (B * T, (nh + 2 * nkv) * hd), act)
    pos = rng.integers(0, 32768, B * T, dtype=np.int32)  # large angles: accuracy of cos/sin
    pos[0] = 0
    kc, vc = randn(rng, (B, max_len, nkv, hd), act), randn(rng, (B, max_len, nkv, hd), act)
    inputs = {"qkv": qkv, "pos": pos, "inv_freq": inv_freq(hd, 1e6), "k_cache": kc, "v_cache": vc}
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "start_on_device": on_device}
    got, ref = run_both("rope_store", inputs, params, act)
    check_close(got["qkv"], ref["qkv"], act, "rope_store qkv", seed)
    check_close(got["k_cache"], ref["k_cache"], act, "rope_store k_cache", seed)
    check_exact(got["v_cache"], ref["v_cache"], "rope_store v_cache", seed)
    # slots outside [start, start+T) are untouched
    outside = np.ones(max_len, bool)
    outside[start:start + T] = False
    check_exact(got["k_cache"][:, outside], kc[:, outside], "rope_store: k slots outside the step", seed)


ROPE_STYLE_CASES = [  # B, T, start, nh, nkv, hd, max_len, rope_dims: ChatGLM's half-head interleaved rotary
    (1, 1, 0, 32, 2, 128, 8, 64),
    (2, 7, 3, 4, 2, 16, 12, 8),
    (1, 1, 511, 8, 8, 64, 512, 64),
    (1, 1, 3, 64, 64, 128, 8, 64),  # pass-through dims and v: 12288 values, more than one pass of the block's threads
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ROPE_STYLE_CASES, ids=lambda c: "B%d-T%d-s%d-h%d/%d-d%d-L%d-r%d" % c)
@pytest.mark.parametrize("rnd", [0, 1])
def test_rope_store_interleaved_partial(act, case, rnd):
    """rope_dims / rope_interleaved / rope_round (ChatGLM) against the CPU op (float32: rounding cos / sin to
    float32 changes nothing there; on the device it rounds them to act, inside act's tolerance)."""
    B, T, start, nh, nkv, hd, max_len, rd = case
    rng, seed = rng_and_seed()
    qkv = randn(rng, (B * T, (nh + 2 * nkv) * hd), act)
    pos = rng.integers(0, 32768, B * T, dtype=np.int32)
    kc, vc = randn(rng, (B, max_len, nkv, hd), act), randn(rng, (B, max_len, nkv, hd), act)
    inputs = {"qkv": qkv, "pos": pos, "inv_freq": inv_freq(rd, 1e4 * 50), "k_cache": kc, "v_cache": vc}
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "rope_dims": rd,
              "rope_interleaved": 1, "rope_round": rnd}
    got, ref = run_both("rope_store", inputs, params, act)
    check_close(got["qkv"], ref["qkv"], act, "rope_store (interleaved, partial) qkv", seed)
    check_close(got["k_cache"], ref["k_cache"], act, "rope_store (interleaved, partial) k_cache", seed)
    check_exact(got["v_cache"], ref["v_cache"], "rope_store (interleaved, partial) v_cache", seed)
    # the pass-through half of q and k is copied, not rounded again
    pass_q = qkv.reshape(B * T, nh + 2 * nkv, hd)[:, :nh + nkv, rd:]
    check_exact(got["qkv"].reshape(B * T, nh + 2 * nkv, hd)[:, :nh + nkv, rd:], pass_q, "pass-through dims", seed)


QK_NORM_CASES = [  # B, T, start, nh, nkv, hd, max_len: Qwen3's q_norm / k_norm fused into rope_store
    (1, 1, 0, 4, 2, 48, 8),         # the qwen3 fixture's heads: head_dim not a multiple of 32 (a warp per head)
    (2, 7, 3, 16, 8, 128, 16),      # Qwen3-0.6B / 1.7B: 16 / 8 heads of 128
    (3, 33, 7, 40, 8, 128, 41),     # Qwen3-14B: more heads than the block's 8 warps
    (1, 1, 1023, 64, 4, 128, 1024), # Qwen3-32B at decode
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", QK_NORM_CASES, ids=lambda c: "B%d-T%d-s%d-h%d/%d-d%d" % c[:6])
def test_rope_store_qk_norm(act, case):
    B, T, start, nh, nkv, hd, max_len = case
    rng, seed = rng_and_seed()
    qkv = randn(rng, (B * T, (nh + 2 * nkv) * hd), act, 4.0)  # not unit rms: the norm has to rescale
    qkv[0, :hd] = to_act(np.full(hd, 1e-3, np.float32), act)  # a tiny head: eps matters there
    w = to_act((1 + 0.3 * rng.standard_normal(2 * hd)).astype(np.float32), act)
    pos = rng.integers(0, 32768, B * T, dtype=np.int32)
    kc, vc = randn(rng, (B, max_len, nkv, hd), act), randn(rng, (B, max_len, nkv, hd), act)
    inputs = {"qkv": qkv, "pos": pos, "inv_freq": inv_freq(hd, 1e6), "k_cache": kc, "v_cache": vc, "qk_norm": w}
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "eps": 1e-6}
    got, ref = run_both("rope_store", inputs, params, act)
    check_close(got["qkv"], ref["qkv"], act, "rope_store+qk_norm qkv", seed)
    check_close(got["k_cache"], ref["k_cache"], act, "rope_store+qk_norm k_cache", seed)
    check_exact(got["v_cache"], ref["v_cache"], "rope_store+qk_norm v_cache", seed)
    outside = np.ones(max_len, bool)
    outside[start:start + T] = False
    check_exact(got["k_cache"][:, outside], kc[:, outside], "rope_store+qk_norm: k slots outside the step", seed)


ATT_CASES = [  # B, T, start, nh, nkv, hd, max_len, window, kmask kind
    (2, 1, 37, 14, 2, 64, 64, 0, None),
    (3, 1, 100, 8, 8, 128, 130, 0, "left-pad"),
    (2, 33, 0, 4, 2, 64, 40, 0, None),
    (2, 17, 5, 4, 1, 128, 30, 0, "left-pad"),
    (1, 9, 20, 6, 2, 128, 29, 6, None),
    (1, 3, 5, 2, 1, 96, 8, 0, None),
]


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("case", ATT_CASES, ids=lambda c: "B%d-T%d-s%d-h%d/%d-d%d-L%d-w%d-%s" % c)
@pytest.mark.parametrize("on_device", [0, 1])
def test_attention(act, case, on_device):
    B, T, start, nh, nkv, hd, max_len, window, km = case
    rng, seed = rng_and_seed()
    qkv = randn(rng, (B * T, (nh + 2 * nkv) * hd), act)
    kc, vc = randn(rng, (B, max_len, nkv, hd), act), randn(rng, (B, max_len, nkv, hd), act)
    inputs = {"qkv": qkv, "k_cache": kc, "v_cache": vc}
    if km == "left-pad":
        stride = start + T + 3
        mask = np.ones((B, stride), np.uint8)
        for b in range(B):
            mask[b, : int(rng.integers(0, start + 1))] = 0
        mask[0, :] = 0  # a row with no visible key: zeros
        inputs["kmask"] = mask
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "window": window,
              "scale": 1.0 / math.sqrt(hd), "start_on_device": on_device}
    got, ref = run_both("attention", inputs, params, act)
    check_close(got["out"], ref["out"], act, "attention", seed, k=ATT_ELEM_K, rel_l2=ATT_REL_L2)


ROPE_ATT_CASES = [  # B, T, start, nh, nkv, hd, max_len, rope_dims (0: whole head), interleaved, round, window, kind
    (1, 1, 37, 14, 2, 64, 64, 0, 0, 0, 0, "plain"),        # Qwen2.5-0.5B-like heads of 64: rotate-half, fused
    (2, 1, 100, 28, 4, 128, 130, 0, 0, 0, 0, "plain"),     # Qwen2.5-7B heads, two rows
    (1, 1, 50, 32, 2, 128, 64, 64, 1, 1, 0, "plain"),      # ChatGLM2: half the head, interleaved, cos / sin rounded
    (1, 1, 50, 32, 2, 128, 64, 64, 1, 0, 0, "plain"),
    (1, 1, 511, 8, 8, 64, 512, 64, 1, 0, 0, "plain"),      # interleaved over the whole head
    (3, 1, 20, 32, 2, 128, 40, 0, 0, 0, 8, "plain"),       # 16 q heads a kv head (two sub-blocks), a window
    (3, 1, 0, 28, 4, 128, 90, 0, 0, 0, 0, "starts"),       # rows at their own starts
    (4, 1, 0, 14, 2, 64, 300, 64, 1, 1, 0, "paged"),       # paged pool, block table
    (2, 5, 3, 4, 2, 128, 16, 0, 0, 0, 0, "plain"),         # T > 1: rope_store first, then prefill attention
    (1, 1, 5, 4, 2, 96, 8, 0, 0, 0, 0, "plain"),           # head_dim 96: rope_store first, then the simple kernel
    (1, 1, 9, 8, 2, 128, 16, 32, 0, 0, 0, "plain"),        # rotate-half on part of the head: not fused
]


def _rope_att_inputs(rng, case, act):
    B, T, start, nh, nkv, hd, max_len, rd, inter, rnd, window, kind = case
    rd_eff = rd or hd
    pos = rng.integers(0, 32768, B * T, dtype=np.int32)
    params = {"B": B, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "rope_dims": rd,
              "rope_interleaved": inter, "rope_round": rnd, "window": window, "scale": 1.0 / math.sqrt(hd)}
    inputs = {"pos": pos, "inv_freq": inv_freq(rd_eff, 1e4 if inter else 1e6)}
    if kind == "plain":
        inputs["qkv"] = randn(rng, (B * T, (nh + 2 * nkv) * hd), act)
        inputs["k_cache"] = randn(rng, (B, max_len, nkv, hd), act)
        inputs["v_cache"] = randn(rng, (B, max_len, nkv, hd), act)
    else:
        c = paged_case(rng, B, T, nh, nkv, hd, max_len, 4 if kind == "paged" else 0)
        inputs["qkv"] = to_act(c["qkv"], act)
        inputs["starts"] = c["starts"]
        params["start"] = 0
        if kind == "paged":
            inputs.update(k_cache=to_act(c["kp"], act), v_cache=to_act(c["vp"], act), block_table=c["table"])
            params["page_shift"] = 4
        else:
            inputs.update(k_cache=to_act(c["kc"], act), v_cache=to_act(c["vc"], act))
    return inputs, params


@pytest.mark.parametrize("act", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ROPE_ATT_CASES, ids=lambda c: "B%d-T%d-s%d-h%d/%d-d%d-L%d-r%d-i%d-c%d-w%d-%s" % c)
@pytest.mark.parametrize("on_device", [0, 1])
def test_rope_attention_fused_is_bit_exact(act, case, on_device, monkeypatch):
    """RoPE fused into the decode attention kernel (FASTLOAD_ROPE_FUSE=1, the default) gives the same bits as
    rope_store then attention (=0): out, and the caches with the new rotated key; and both agree with the CPU op.
    The fused kernel rotates with the same table entries and the same fmaf / fmul sequence (fl_rope_rot)."""
    rng, seed = rng_and_seed()
    inputs, params = _rope_att_inputs(rng, case, act)
    if case[-1] != "paged":
        params["start_on_device"] = on_device
    elif on_device:
        pytest.skip("paged rows take their starts from `starts`")
    got = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("FASTLOAD_ROPE_FUSE", fuse)
        got[fuse] = _C.run_op(DEV, "rope_attention", inputs, dict(params, act=act))
    for k in ("out", "k_cache", "v_cache"):
        check_exact(got["1"][k], got["0"][k], f"rope_attention {k}: fused vs rope_store + attention", seed)
    ref = _C.run_op("cpu", "rope_attention", inputs, dict(params, act="float32"))
    check_close(got["1"]["out"], ref["out"], act, "rope_attention out vs cpu", seed, k=ATT_ELEM_K, rel_l2=ATT_REL_L2)
    check_close(got["1"]["k_cache"], ref["k_cache"], act, "rope_attention k_cache vs cpu", seed)
    check_exact(got["1"]["v_cache"], ref["v_cache"], "rope_attention v_cache vs cpu", seed)


def test_rope_fuse_knob_error(monkeypatch):
    monkeypatch.setenv("FASTLOAD_ROPE_FUSE", "on")
    with pytest.raises(ValueError, match="FASTLOAD_ROPE_FUSE='on'"):
        _C.run_op(DEV, "swiglu", {"gu": np.ones((1, 2), np.float32)}, {"act": "float16"})


ATT_FUSE_CASES = [  # B, start, nh, nkv, hd, max_len, window, kmask kind: decode steps
    (1, 300, 28, 4, 128, 512, 0, None),       # Qwen2.5-7B's heads, a few splits
    (1, 5000, 28, 4, 128, 5001, 0, None),     # many splits
    (1, 20000, 28, 4, 128, 32768, 0, None),   # a grid sized for 32K keys (start on the device), 66 splits used
    (2, 37, 14, 2, 64, 64, 0, None),          # heads of 64
    (3, 100, 8, 8, 128, 130, 0, "left-pad"),  # one q head a kv head; a row with no visible key
    (2, 700, 32, 2, 128, 1024, 64, None),     # 16 q heads a kv head (two sub-blocks); splits outside the window
    (65, 40, 28, 4, 128, 64, 0, None),        # many rows: more combine blocks than SMs
]


@pytest.mark.parametrize("act", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", ATT_FUSE_CASES, ids=lambda c: "B%d-s%d-h%d/%d-d%d-L%d-w%d-%s" % c)
@pytest.mark.parametrize("on_device", [0, 1])
def test_attention_fused_combine_is_bit_exact(act, case, on_device, monkeypatch):
    """The decode attention's splits combined by blocks of the split kernel's own grid (FASTLOAD_ATT_FUSE=1, the
    default: each waits for its head's splits to be counted) give the same bits as the separate combine kernel (=0):
    both sum the splits in the same order (attention.cu's combine_head); and both agree with the CPU op."""
    B, start, nh, nkv, hd, max_len, window, km = case
    rng, seed = rng_and_seed()
    inputs = {"qkv": randn(rng, (B, (nh + 2 * nkv) * hd), act), "k_cache": randn(rng, (B, max_len, nkv, hd), act),
              "v_cache": randn(rng, (B, max_len, nkv, hd), act)}
    if km == "left-pad":
        mask = np.ones((B, start + 4), np.uint8)
        for b in range(B):
            mask[b, : int(rng.integers(0, start + 1))] = 0
        mask[0, :] = 0
        inputs["kmask"] = mask
    params = {"B": B, "T": 1, "start": start, "n_heads": nh, "n_kv_heads": nkv, "window": window,
              "scale": 1.0 / math.sqrt(hd), "start_on_device": on_device}
    got = {}
    for fuse in ("1", "0"):
        monkeypatch.setenv("FASTLOAD_ATT_FUSE", fuse)
        got[fuse] = _C.run_op(DEV, "attention", inputs, dict(params, act=act))
    check_exact(got["1"]["out"], got["0"]["out"], "attention: combine in the split grid vs its own kernel", seed)
    ref = _C.run_op("cpu", "attention", inputs, dict(params, act="float32"))
    check_close(got["1"]["out"], ref["out"], act, "attention (fused combine) vs cpu", seed, k=ATT_ELEM_K,
                rel_l2=ATT_REL_L2)


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_bad_device_index():
    with pytest.raises(ValueError, match=r"cuda:999"):
        _C.run_op("cuda:999", "swiglu", {"gu": np.ones((1, 2), np.float32)}, {"act": "float16"})


# ----------------------------------------------------------------------------------------------
# Mixture of Experts: routing + the grouped expert GEMV (decode, graph-safe) or per-expert GEMMs (prefill)
# ----------------------------------------------------------------------------------------------
def moe_inputs(rng, n, E, k, d, f, act):
    """Router logits with a gap of 0.3 between a token's experts (the same top k on both sides whatever the exp
    rounding), inputs and expert weights rounded to act."""
    lg = np.stack([rng.permutation(E).astype(np.float32) * 0.3 for _ in range(n)]) + \
        rng.uniform(-0.05, 0.05, (n, E)).astype(np.float32)
    return {"logits": to_act(lg, act), "x": randn(rng, (n, d), act),
            "w13": randn(rng, (E * 2 * f, d), act, 1 / math.sqrt(d)), "w2": randn(rng, (E * d, f), act, 1 / math.sqrt(f))}


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,E,k,d,f,norm,may_sync", [
    (1, 8, 2, 256, 224, 1, 0),     # decode, Mixtral-like: two experts read
    (3, 8, 2, 128, 96, 1, 0),      # a small batch: some experts shared
    (12, 4, 2, 64, 96, 1, 0),      # more than 8 slots an expert: several passes over its rows
    (7, 6, 3, 64, 48, 0, 0),       # Qwen-like: top 3, not renormalised
    (5, 8, 2, 60, 44, 1, 0),       # d, f not multiples of the 16-byte vector: the element-wise GEMV
    (40, 8, 2, 128, 64, 1, 1),     # prefill: 80 slots, per-expert GEMMs after reading the counts
    (9, 128, 8, 64, 32, 1, 1),     # many experts (Qwen3-MoE's 128, top 8); 72 slots
])
def test_moe(act, n, E, k, d, f, norm, may_sync):
    rng, seed = rng_and_seed()
    inp = moe_inputs(rng, n, E, k, d, f, act)
    params = {"k": k, "norm": norm, "may_sync": may_sync}
    got, ref = run_both("moe", inp, params, act)
    assert np.array_equal(got["ids"], ref["ids"]), f"expert choice differs (seed {seed})"
    np.testing.assert_allclose(got["wts"], ref["wts"], rtol=1e-5, atol=1e-6, err_msg=f"weights (seed {seed})")
    # gate|up, the SwiGLU and the expert outputs are each rounded to act on the device: attention's tolerances
    check_close(got["out"], ref["out"], act, "moe", seed, k=ATT_ELEM_K, rel_l2=ATT_REL_L2, sum_len=max(d, f))
