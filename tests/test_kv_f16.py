"""kv_cache_dtype="float16" (the CPU backend): keys and values rounded to float16 once as they are stored, widened to
float32 as the attention reads them, the arithmetic unchanged. So the attention over a float16 cache must give the
same bits as the float32 attention over the float16-rounded values, on every path (decode, the general prompt kernel,
paged, sliding window, key mask); rope_store must store exactly the float16 rounding of what it stores in float32;
and a model must hold half the KV bytes and agree with its float32-cache self within float16 rounding."""
import numpy as np
import pytest

import fastload
from fastload import _C, engine as enginemod
from golden_util import model_dir
from paged_util import paged_case


def f16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def att(qkv, kc, vc, kv_f16, **p):
    args = {"B": kc.shape[0], "n_heads": p.pop("nh"), "n_kv_heads": kc.shape[2], "scale": 1.0 / np.sqrt(kc.shape[3]),
            "act": "float32", "kv_f16": int(kv_f16), **p}
    return _C.run_op("cpu", "attention", {"qkv": qkv, "k_cache": kc, "v_cache": vc,
                                          **({"kmask": p.pop("kmask")} if "kmask" in p else {})},
                     {k: v for k, v in args.items() if k != "kmask"})["out"]


@pytest.mark.parametrize("B,T,start,nh,nkv,hd,window", [
    (1, 1, 700, 9, 3, 64, 0),     # decode, the demo's heads: chunks of keys, every head an item
    (3, 1, 40, 8, 2, 32, 0),      # decode, a batch
    (1, 1, 300, 4, 4, 48, 100),   # decode, sliding window, head size not a multiple of the register tile
    (2, 37, 20, 6, 2, 64, 0),     # a prompt chunk: the general kernel
    (1, 64, 0, 14, 2, 64, 16),    # a prompt from the start, sliding window
])
def test_attention_over_f16_cache_is_f32_attention_over_rounded_values(B, T, start, nh, nkv, hd, window):
    rng = np.random.default_rng(B * 1000 + T + hd)
    L = start + T
    qkv = rng.standard_normal((B * T, (nh + 2 * nkv) * hd), dtype=np.float32)
    kc = rng.standard_normal((B, L, nkv, hd), dtype=np.float32) * 3
    vc = rng.standard_normal((B, L, nkv, hd), dtype=np.float32)
    p = dict(nh=nh, T=T, start=start, window=window)
    got = att(qkv, kc, vc, True, **dict(p))
    want = att(qkv, f16(kc), f16(vc), False, **dict(p))
    np.testing.assert_array_equal(got, want)
    # and it is not the float32 cache's answer (the test would pass on a cache that ignored kv_f16 otherwise)
    assert not np.array_equal(got, att(qkv, kc, vc, False, **dict(p)))


def test_attention_key_mask_and_paged_pool_in_f16():
    rng = np.random.default_rng(5)
    case = paged_case(rng, B=3, T=2, nh=6, nkv=2, hd=32, L=90, shift=4)
    c = case
    base = {"B": c["B"], "T": c["T"], "n_heads": c["nh"], "n_kv_heads": c["nkv"], "page_shift": c["shift"],
            "scale": 1.0 / np.sqrt(c["hd"]), "act": "float32"}
    arrs = {"qkv": c["qkv"], "block_table": c["table"], "starts": c["starts"]}
    got = _C.run_op("cpu", "attention", {**arrs, "k_cache": c["kp"], "v_cache": c["vp"]}, {**base, "kv_f16": 1})["out"]
    want = _C.run_op("cpu", "attention", {**arrs, "k_cache": f16(c["kp"]), "v_cache": f16(c["vp"])}, base)["out"]
    np.testing.assert_array_equal(got, want)
    # a key mask (left padding) through the general kernel
    qkv = rng.standard_normal((2 * 5, (4 + 2 * 2) * 16), dtype=np.float32)
    kc = rng.standard_normal((2, 12, 2, 16), dtype=np.float32)
    vc = rng.standard_normal((2, 12, 2, 16), dtype=np.float32)
    mask = np.ones((2, 12), np.uint8)
    mask[0, :4] = 0
    p = {"B": 2, "T": 5, "start": 7, "n_heads": 4, "n_kv_heads": 2, "scale": 0.25, "act": "float32"}
    got = _C.run_op("cpu", "attention", {"qkv": qkv, "k_cache": kc, "v_cache": vc, "kmask": mask}, {**p, "kv_f16": 1})
    want = _C.run_op("cpu", "attention", {"qkv": qkv, "k_cache": f16(kc), "v_cache": f16(vc), "kmask": mask}, p)
    np.testing.assert_array_equal(got["out"], want["out"])


def test_rope_store_rounds_once_to_f16():
    rng = np.random.default_rng(2)
    B, T, nh, nkv, hd, L = 2, 5, 4, 2, 32, 16
    qkv = rng.standard_normal((B * T, (nh + 2 * nkv) * hd), dtype=np.float32) * 10
    pos = np.tile(np.arange(3, 3 + T, dtype=np.int32), B)
    inv = (1.0 / 10000 ** (np.arange(0, hd, 2) / hd)).astype(np.float32)
    kc = rng.standard_normal((B, L, nkv, hd), dtype=np.float32)
    vc = rng.standard_normal((B, L, nkv, hd), dtype=np.float32)
    p = {"B": B, "T": T, "start": 3, "n_heads": nh, "n_kv_heads": nkv, "act": "float32"}
    a = {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": vc}
    got = _C.run_op("cpu", "rope_store", a, {**p, "kv_f16": 1})
    ref = _C.run_op("cpu", "rope_store", a, p)
    np.testing.assert_array_equal(got["qkv"], ref["qkv"])  # q|k|v itself stays float32
    np.testing.assert_array_equal(got["k_cache"], f16(ref["k_cache"]))
    np.testing.assert_array_equal(got["v_cache"], f16(ref["v_cache"]))
    assert not np.array_equal(got["k_cache"][:, 3:3 + T], ref["k_cache"][:, 3:3 + T])


def load(**kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu",
                                                         torch_dtype="float32", threads=2, **kw)


def test_model_with_f16_cache_holds_half_and_agrees():
    a, b = load(), load(kv_cache_dtype="float16", kv_cache_memory=1 << 22)
    a.configure_engine(kv_cache_memory=1 << 22)
    rng = np.random.default_rng(0)
    ids = rng.integers(3, a.config.vocab_size - 3, size=(2, 40))
    la, lb = a(ids).logits, b(ids).logits
    assert b.memory_stats()["kv_cache_last"] * 2 == a.memory_stats()["kv_cache_last"] > 0
    err = np.abs(la - lb).max()
    assert 0 < err < 2e-2 * np.abs(la).max(), err  # float16 keys / values: close, not the same bits
    ga = a.generate(ids[:1], max_new_tokens=12, eos_token_id=[])
    gb = b.generate(ids[:1], max_new_tokens=12, eos_token_id=[])
    assert ga.shape == gb.shape
    sa, sb = a.engine_stats(), b.engine_stats()
    assert sb["n_pages"] >= 2 * sa["n_pages"]  # the same bytes hold twice the pages (+1: the null page's share)
    # generate's decode steps read the float16 pool: a forward's logits at the last position are its first token's
    out = b.generate(ids[:1], max_new_tokens=1, eos_token_id=[], return_dict_in_generate=True, output_logits=True)
    np.testing.assert_allclose(out.logits[0][0], lb[0, -1], rtol=0, atol=1e-4 * np.abs(lb).max())


def test_kv_cache_dtype_settings():
    for ok in ("auto", "float16", "fp16", "half", "float32", "FLOAT16"):
        assert enginemod.options(kv_cache_dtype=ok)["kv_cache_dtype"] in ("auto", "float16", "float32")
    with pytest.raises(ValueError, match="kv_cache_dtype='int8'"):
        enginemod.options(kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        load(kv_cache_dtype="bfloat16")

    class FakeCuda:  # what the check sees of a CUDA model: its device and dtype
        device, dtype = "cuda:0", "bfloat16"
    with pytest.raises(ValueError, match="CPU backend"):
        enginemod.kv_f16(FakeCuda(), enginemod.options(kv_cache_dtype="float16"))
    assert not enginemod.kv_f16(FakeCuda(), enginemod.options(kv_cache_dtype="auto"))
    m = load()
    m.configure_engine(kv_cache_dtype="float16")
    assert m._engine_handle().opts["kv_cache_dtype"] == "float16"
    # float32 on the CPU is the activation dtype: the same as auto
    assert not enginemod.kv_f16(m, enginemod.options(kv_cache_dtype="float32"))


def test_kv_cache_dtype_from_environment(monkeypatch):
    monkeypatch.setenv("FASTLOAD_KV_CACHE_DTYPE", "float16")
    assert enginemod.options()["kv_cache_dtype"] == "float16"
    monkeypatch.setenv("FASTLOAD_KV_CACHE_DTYPE", "fp8")
    with pytest.raises(ValueError, match="fp8"):
        enginemod.options()


def test_cli_kv_cache_dtype(capsys):
    import json
    from fastload.__main__ import main
    d = str(model_dir("qwen2"))
    assert main(["info", "--model", d, "--device", "cpu", "--kv-cache-dtype", "float16"]) == 0
    mem = json.loads(capsys.readouterr().out)["model"]["memory"]
    assert main(["info", "--model", d, "--device", "cpu"]) == 0
    mem32 = json.loads(capsys.readouterr().out)["model"]["memory"]
    assert (mem["kv_cache_dtype"], mem32["kv_cache_dtype"]) == ("float16", "float32")
    assert mem["kv_cache_bytes_per_token"] * 2 == mem32["kv_cache_bytes_per_token"]
    with pytest.raises(SystemExit):
        main(["info", "--model", d, "--device", "cpu", "--kv-cache-dtype", "int8"])


@pytest.mark.skipif(not fastload.cuda.is_available(), reason="needs a CUDA GPU (fastload built with CUDA)")
def test_cuda_refuses_f16_cache_at_load_and_cuda_of_a_cpu_f16_model_drops_it():
    d = str(model_dir("qwen2"))
    with pytest.raises(ValueError, match="kv_cache_dtype='float16'.*CPU backend"):
        fastload.AutoModelForCausalLM.from_pretrained(d, device_map="cuda", torch_dtype="bfloat16",
                                                      kv_cache_dtype="float16")
    m = load(kv_cache_dtype="float16")
    ids = np.arange(3, 20)[None]
    want = m.generate(ids, max_new_tokens=4, eos_token_id=[])
    m.to("cuda", "float32")
    assert m.memory_stats()["kv_cache_dtype"] == "float32"
    assert m.generate(ids, max_new_tokens=4, eos_token_id=[]).shape == want.shape
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        m.configure_engine(kv_cache_dtype="float16")
