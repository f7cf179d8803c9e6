"""ChatGLM2-6B / ChatGLM3-6B (ChatGLMModel, model_type chatglm) on the CPU, against fixtures made once by
tests/fixtures/make_chatglm_fixtures.py:

* the forward (fused q|k|v with bias, multi-query groups, rotary on the first half of each head in interleaved
  pairs, fused gate|up, THUDM's config keys) against the float64 numpy reference in tests/chatglm_ref.py: logits
  within 5e-5 (|logits| ~ 10) and greedy tokens exactly, from sharded .bin (as THUDM ships) and from safetensors,
  ChatGLM3 with rope_ratio 50;
* the rope_store op's new style (rotated dims, interleaved) against numpy;
* the tokenizer (tokenizer.model read by fastload.spm, no sentencepiece) against ids and text that real
  sentencepiece gave for a few hundred strings, and THUDM's special tokens, prefix and chat prompts;
* the script lines people write: AutoModel.from_pretrained(..., trust_remote_code=True, device=...), .eval(),
  chat / stream_chat per version, and the config variants that are refused.
"""
import json
import pathlib
import shutil

import numpy as np
import pytest

import fastload
from fastload import _C, spm
from fastload import arch as archmod

import chatglm_ref

FIX = pathlib.Path(__file__).parent / "fixtures" / "chatglm"
ATOL = 5e-5
EXPECTED = json.loads((FIX / "spm_expected.json").read_text(encoding="utf-8"))


def load(name, **kw):
    kw.setdefault("device", "cpu")
    kw.setdefault("torch_dtype", "float32")
    return fastload.AutoModel.from_pretrained(str(FIX / name), trust_remote_code=True, **kw)


# ------------------------------------------------------------------------------------------------ forward
@pytest.mark.parametrize("name,golden", [("chatglm2", "chatglm2"), ("chatglm2_st", "chatglm2"),
                                         ("chatglm3", "chatglm3")])
def test_logits_and_greedy_match_reference(name, golden):
    g = np.load(FIX / f"{golden}_golden.npz")
    m = load(name)
    for i in range(2):
        ids = g[f"ids{i}"]
        got = np.asarray(m(ids[None]).logits, np.float64)[0]
        assert np.isfinite(got).all()
        np.testing.assert_allclose(got, g[f"logits{i}"], atol=ATOL, rtol=0)
    out = np.asarray(m.generate(g["ids0"][None], max_new_tokens=len(g["greedy"]), do_sample=False))[0]
    assert out[len(g["ids0"]):].tolist() == g["greedy"].tolist()


def test_reference_is_recomputed_from_the_checkpoint():
    """The golden logits are the numpy reference's on the stored weights (so the reference, not a copy of
    fastload's output, is what the test compares with)."""
    cfg = json.loads((FIX / "chatglm3" / "config.json").read_text())
    from fastload import _C as C
    f = C.SafetensorsFile(str(FIX / "chatglm3" / "model.safetensors"))
    w = {k: np.array(f.get(k), np.float64) if hasattr(f, "get") else None for k in f.keys()}
    f.close()
    if any(v is None for v in w.values()):
        pytest.skip("SafetensorsFile has no get()")
    g = np.load(FIX / "chatglm3_golden.npz")
    # (the golden came from the float64 weights before they were stored as float32)
    np.testing.assert_allclose(chatglm_ref.forward(w, cfg, g["ids1"]), g["logits1"], atol=2e-5)


def test_rope_ratio_changes_the_logits(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIX / "chatglm3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["rope_ratio"] = 1.0
    (d / "config.json").write_text(json.dumps(cfg))
    g = np.load(FIX / "chatglm3_golden.npz")
    got = np.asarray(fastload.AutoModel.from_pretrained(str(d), device="cpu", torch_dtype="float32")(
        g["ids0"][None]).logits, np.float64)[0]
    assert np.abs(got - g["logits0"]).max() > 1e-3  # positions > 0 see the frequency change


def test_core_config_of_chatglm():
    cfg = json.loads((FIX / "chatglm3" / "config.json").read_text())
    view = archmod.chatglm_view(cfg, "config.json")
    a = archmod.arch_for(view, "config.json")
    c = archmod.core_config(view, a, "config.json")
    assert a.name == "ChatGLMModel"
    assert (c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"]) == (2, 4, 2, 16, 96)
    assert (c["rope_dims"], c["rope_interleaved"], c["rope_round"], c["qkv_bias"]) == (8, 1, 1, 1)
    assert c["rope_theta"] == 500000.0 and c["vocab"] == cfg["padded_vocab_size"] and c["rms_eps"] == 1e-5
    m = load("chatglm3")
    inv, _ = m._core.rope_freqs()
    np.testing.assert_allclose(inv, 1 / 500000.0 ** (np.arange(0, 8, 2) / 8), rtol=1e-6)


@pytest.mark.parametrize("key,value,match", [
    ("rmsnorm", False, "rmsnorm=false"), ("apply_residual_connection_post_layernorm", True, "post_layernorm"),
    ("add_bias_linear", True, "add_bias_linear"), ("quantization_bit", 4, "quantization_bit"),
    ("pre_seq_len", 16, "pre_seq_len"), ("post_layer_norm", False, "post_layer_norm")])
def test_unsupported_variants_are_refused(tmp_path, key, value, match):
    d = tmp_path / "m"
    shutil.copytree(FIX / "chatglm3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match=match):
        fastload.AutoModel.from_pretrained(str(d), device="cpu")


def test_first_chatglm_is_refused(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIX / "chatglm3", d)
    cfg = json.loads((d / "config.json").read_text())
    del cfg["padded_vocab_size"]
    cfg["position_encoding_2d"] = True
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="first ChatGLM-6B"):
        fastload.AutoModel.from_pretrained(str(d), device="cpu")


def test_bad_chatglm_value_names_the_key(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(FIX / "chatglm3", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["multi_query_group_num"] = "two"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastload.CheckpointError, match="multi_query_group_num"):
        fastload.AutoModel.from_pretrained(str(d), device="cpu")


def _synth():
    import sys
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
    import synth
    return synth


def test_benchmark_shape_is_thudms_checkpoint():
    """benchmarks/synth.py's chatglm2-6b: THUDM's names and shapes add up to the total_size of THUDM's
    pytorch_model.bin.index.json (12487168064 bytes in fp16), and fastload reads its config as ChatGLM2-6B."""
    synth = _synth()
    cfg = synth.config("chatglm2-6b", "float16")
    specs = list(synth.tensors_for(cfg))
    assert sum(int(np.prod(s)) for _, s in specs) * 2 == 12487168064
    assert len(specs) == 2 + 28 * 7 + 2  # embedding, inv_freq; 7 a layer; final norm, output layer
    view = archmod.chatglm_view(cfg, "config.json")
    c = archmod.core_config(view, archmod.arch_for(view, "config.json"), "config.json")
    assert (c["n_layers"], c["n_heads"], c["n_kv_heads"], c["head_dim"], c["ffn"], c["vocab"]) == \
        (28, 32, 2, 128, 13696, 65024)


@pytest.mark.parametrize("dtype,atol", [("float32", ATOL), ("float16", 2e-3)])
def test_benchmark_shape_tiny_matches_reference(tmp_path, dtype, atol):
    """synth.py's chatglm2-tiny (the 6B's keys and names at small widths) loads and gives the numpy reference's
    logits on the weights it wrote (float16 weights are exact in the reference's float64; CPU activations float32)."""
    synth = _synth()
    synth.write(str(tmp_path), "chatglm2-tiny", dtype)
    cfg = json.loads((tmp_path / "config.json").read_text())
    f = _C.SafetensorsFile(str(tmp_path / "model.safetensors"))
    if not hasattr(f, "get"):
        pytest.skip("SafetensorsFile has no get()")
    w = {k: np.array(f.get(k), np.float64) for k in f.keys()}
    f.close()
    assert all(np.all(v != 0) for v in w.values())
    ids = np.random.default_rng(1).integers(3, cfg["padded_vocab_size"], 11)
    want = chatglm_ref.forward(w, cfg, ids, rope_dtype=None if dtype == "float32" else dtype)
    m = fastload.AutoModel.from_pretrained(str(tmp_path), trust_remote_code=True, device="cpu", torch_dtype=dtype)
    got = np.asarray(m(ids[None]).logits, np.float64)[0]
    assert np.isfinite(got).all() and np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=atol, rtol=0)


# ------------------------------------------------------------------------------------------------ the rope op
@pytest.mark.parametrize("method", ["gptq", "gptq-act-order", "awq"])
def test_gptq_and_awq_chatglm_match_the_dequantised_model(tmp_path, method):
    """A GLM block's four linears packed as GPTQModel / AutoAWQ quantise them (the fused query_key_value and
    dense_h_to_4h whole, dense, dense_4h_to_h): logits equal the float model of the dequantised weights (it was
    refused as 'no quantization_config', the fused slots not being read packed)."""
    import quant_fixtures as qf
    import st_util
    synth = _synth()
    base = tmp_path / "base"
    base.mkdir()
    synth.write(str(base), "chatglm2-tiny", "float32", num_hidden_layers=2)
    cfg = json.loads((base / "config.json").read_text())
    f = _C.SafetensorsFile(str(base / "model.safetensors"))
    w = {k: np.array(f.get(k), np.float32) for k in f.keys()}
    f.close()
    rng = np.random.default_rng(3)
    qt, rt = {}, {}
    for n, W in w.items():
        if W.ndim == 2 and n.endswith(("query_key_value.weight", "dense.weight", "dense_h_to_4h.weight",
                                       "dense_4h_to_h.weight")):
            if method == "awq":
                t = qf.awq_tensors(W, 32)
                rt[n] = qf.dequant_awq(t["qweight"], t["qzeros"], t["scales"], 32)
            else:
                t = qf.gptq_tensors(W, 4, 32, sym=False, desc_act=method.endswith("act-order"), zero_offset=1, rng=rng)
                rt[n] = qf.dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], 4, 1)
            qt.update({f"{n[:-len('.weight')]}.{k}": v for k, v in t.items()})
        else:
            qt[n] = W.astype(np.float16)
            rt[n] = qt[n].astype(np.float32)
    qc = qf.awq_quant_config(32) if method == "awq" else \
        qf.gptq_quant_config(4, 32, False, method.endswith("act-order"), "gptq", "gptqmodel")
    for d, t, c in ((tmp_path / "q", qt, dict(cfg, quantization_config=qc)), (tmp_path / "ref", rt, cfg)):
        shutil.copytree(base, d)
        (d / "model.safetensors").unlink()
        st_util.write(str(d / "model.safetensors"), t, metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(c))
    ids = np.random.default_rng(1).integers(3, cfg["padded_vocab_size"], 9)[None]
    got = np.asarray(load(str(tmp_path / "q"))(ids).logits)
    want = np.asarray(load(str(tmp_path / "ref"))(ids).logits)
    assert np.abs(want).max() > 0.5
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max(), rtol=0)


@pytest.mark.parametrize("name", ["chatglm2", "chatglm3"])
def test_save_pretrained_round_trip(tmp_path, name):
    """save_pretrained of a ChatGLM model raised a bare KeyError ('query_key_value'); it writes THUDM's names, the
    fused q|k|v (with bias) and gate|up whole, and its config: loaded back, the same logits bit for bit."""
    m = load(name)
    m.save_pretrained(tmp_path / "saved")
    back = fastload.AutoModel.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True, device="cpu",
                                              torch_dtype="float32")
    ids = np.array([[1, 5, 100, 200, 300, 400]])
    assert np.array_equal(np.asarray(back(ids).logits), np.asarray(m(ids).logits))
    f = _C.SafetensorsFile(str(tmp_path / "saved" / "model.safetensors"))
    assert "transformer.encoder.layers.0.self_attention.query_key_value.bias" in f.keys()
    f.close()


def _np_rope(qkv, pos, inv, nh, nkv, hd, rd):
    out = qkv.astype(np.float64).copy().reshape(len(pos), nh + 2 * nkv, hd)
    ang = np.outer(pos.astype(np.float32), inv).astype(np.float32)
    c, s = np.cos(ang).astype(np.float64)[:, None, :], np.sin(ang).astype(np.float64)[:, None, :]
    x = out[:, :nh + nkv]
    a, b = x[..., 0:rd:2].copy(), x[..., 1:rd:2].copy()
    x[..., 0:rd:2] = a * c - b * s
    x[..., 1:rd:2] = b * c + a * s
    return out.reshape(len(pos), -1)


@pytest.mark.parametrize("nh,nkv,hd,rd", [(4, 2, 16, 8), (2, 1, 8, 8), (3, 3, 12, 4)])
def test_rope_store_interleaved_partial_matches_numpy(nh, nkv, hd, rd):
    rng = np.random.default_rng(hd)
    T = 5
    qkv = rng.normal(size=(T, (nh + 2 * nkv) * hd)).astype(np.float32)
    pos = np.arange(3, 3 + T, dtype=np.int32)
    inv = (1 / 10000 ** (np.arange(0, rd, 2) / rd)).astype(np.float32)
    kc = np.zeros((1, T + 3, nkv, hd), np.float32)
    got = _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": kc.copy()},
                    {"B": 1, "T": T, "start": 0, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "rope_dims": rd,
                     "rope_interleaved": 1, "rope_round": 1})
    want = _np_rope(qkv, pos, inv, nh, nkv, hd, rd)
    np.testing.assert_allclose(got["qkv"], want, atol=2e-6)
    k = want.reshape(T, nh + 2 * nkv, hd)[:, nh:nh + nkv]
    v = want.reshape(T, nh + 2 * nkv, hd)[:, nh + nkv:]
    np.testing.assert_allclose(got["k_cache"][0, :T], k, atol=2e-6)  # pass-through dims reach the cache too
    np.testing.assert_array_equal(got["v_cache"][0, :T], v.astype(np.float32))


@pytest.mark.parametrize("T,start,rd,inter", [(1, 6, 8, 1), (3, 2, 8, 1), (1, 4, 16, 0)])
def test_rope_attention_op_is_rope_store_then_attention(T, start, rd, inter):
    """The backend's rope_attention op (fused into the decode attention on CUDA) is, on the CPU backend, rope_store
    then attention: the same out and caches, bit for bit (tests/test_cuda_ops.py checks the CUDA kernel)."""
    rng = np.random.default_rng(T * 100 + rd)
    nh, nkv, hd, L = 4, 2, 16, 12
    qkv = rng.normal(size=(T, (nh + 2 * nkv) * hd)).astype(np.float32)
    pos = rng.integers(0, 5000, T).astype(np.int32)
    inv = (1 / 10000 ** (np.arange(0, rd, 2) / rd)).astype(np.float32)
    kc, vc = rng.normal(size=(2, 1, L, nkv, hd)).astype(np.float32)
    p = {"B": 1, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "head_dim": hd, "rope_dims": rd,
         "rope_interleaved": inter, "rope_round": 0}
    fused = _C.run_op("cpu", "rope_attention", {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": vc},
                      dict(p, window=0, scale=0.25))
    r = _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": pos, "inv_freq": inv, "k_cache": kc, "v_cache": vc}, p)
    a = _C.run_op("cpu", "attention", {"qkv": r["qkv"], "k_cache": r["k_cache"], "v_cache": r["v_cache"]},
                  {"B": 1, "T": T, "start": start, "n_heads": nh, "n_kv_heads": nkv, "window": 0, "scale": 0.25})
    np.testing.assert_array_equal(fused["out"], a["out"])
    np.testing.assert_array_equal(fused["k_cache"], r["k_cache"])
    np.testing.assert_array_equal(fused["v_cache"], r["v_cache"])
    assert not np.array_equal(fused["k_cache"], kc)  # the new key reached the cache


def test_rope_store_style_is_checked():
    qkv = np.zeros((1, 4 * 8), np.float32)
    with pytest.raises(ValueError, match="rope_dims"):
        kc = np.zeros((1, 2, 1, 8), np.float32)
        _C.run_op("cpu", "rope_store", {"qkv": qkv, "pos": np.zeros(1, np.int32), "inv_freq": np.ones(2, np.float32),
                                        "k_cache": kc, "v_cache": kc.copy()},
                  {"B": 1, "T": 1, "start": 0, "n_heads": 2, "n_kv_heads": 1, "head_dim": 8, "rope_dims": 6})


# ------------------------------------------------------------------------------------------------ tokenizer
def _sp():
    return spm.read_model((FIX / "tokenizer.model").read_bytes())


def test_spm_encode_matches_sentencepiece():
    m = _sp()
    tk = spm.build_tokenizer(m)
    assert len(m.pieces) == EXPECTED["vocab_size"]
    bad = [c["text"] for c in EXPECTED["encode"] if tk.encode(c["text"], add_special_tokens=False).ids != c["ids"]]
    assert not bad, bad[:5]
    assert len(EXPECTED["encode"]) >= 300


def test_spm_decode_matches_sentencepiece():
    m = _sp()
    for c in EXPECTED["encode"] + EXPECTED["decode"]:
        assert spm.decode_pieces(m, [m.pieces[i][0] for i in c["ids"]]) == c["decoded"], c["ids"]


@pytest.mark.parametrize("cut", [0, 1, 5, 100, 5000])
def test_spm_truncated_file_is_a_checkpoint_error(cut):
    raw = (FIX / "tokenizer.model").read_bytes()
    with pytest.raises(fastload.CheckpointError, match="tokenizer.model"):
        spm.read_model(raw[:cut] + b"\xff\xff\xff", "x/tokenizer.model")


def test_spm_unigram_is_refused():
    m = _sp()
    m.model_type = spm.UNIGRAM
    with pytest.raises(NotImplementedError, match="unigram"):
        spm.build_tokenizer(m)


@pytest.fixture(scope="module")
def tok2():
    return fastload.AutoTokenizer.from_pretrained(str(FIX / "chatglm2"), trust_remote_code=True)


@pytest.fixture(scope="module")
def tok3():
    return fastload.AutoTokenizer.from_pretrained(str(FIX / "chatglm3"), trust_remote_code=True)


def test_special_tokens_follow_the_vocabulary(tok2, tok3):
    n = EXPECTED["vocab_size"]
    assert [tok2.get_command(t) for t in ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop")] == list(range(n, n + 5))
    assert [tok3.get_command(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")] == \
        list(range(n + 5, n + 9))
    assert tok2.chatglm_version == 2 and tok3.chatglm_version == 3
    assert len(tok2) == n + 5 and len(tok3) == n + 9
    assert (tok3.eos_token_id, tok3.pad_token_id, tok3.get_command("<eos>")) == (2, 0, 2)
    with pytest.raises(KeyError):
        tok2.get_command("<|user|>")


def test_encode_adds_the_prefix_and_matches_sentencepiece(tok3):
    g, sop = tok3.get_command("[gMASK]"), tok3.get_command("sop")
    for c in EXPECTED["encode"][:120]:
        assert tok3.encode(c["text"]) == [g, sop] + c["ids"]
        assert tok3.encode(c["text"], add_special_tokens=False) == c["ids"]
    assert tok3.encode("a", "b", add_special_tokens=True) if False else True
    assert tok3.build_inputs_with_special_tokens([5], [6]) == [g, sop, 5, 6, 2]


def test_special_token_text_is_not_read_as_a_token(tok3):
    ids = tok3.encode("<|user|>[gMASK]", add_special_tokens=False)
    assert tok3.get_command("<|user|>") not in ids and tok3.get_command("[gMASK]") not in ids
    t = fastload.AutoTokenizer.from_pretrained(str(FIX / "chatglm3"), encode_special_tokens=True)
    ids = t.encode("hi<|user|>x", add_special_tokens=False)
    assert t.get_command("<|user|>") in ids and t.get_command("[gMASK]") not in t.encode("[gMASK]", add_special_tokens=False)


def test_decode_as_thudm(tok3):
    g = tok3.get_command("[gMASK]")
    ids = tok3.encode("你好 world")
    assert tok3.decode(ids) == "[gMASK]sop 你好 world"
    assert tok3.decode(ids, skip_special_tokens=True) == "你好 world"
    assert tok3.decode([2, 1, 0] + ids[2:]) == "你好 world"  # </s> <s> <unk> give nothing
    assert tok3.decode([tok3.get_command("<|assistant|>")] + ids[2:]) == "<|assistant|> 你好 world"
    assert tok3.convert_ids_to_tokens([g, 2]) == ["[gMASK]", ""]


def test_call_returns_position_ids_with_left_padding(tok2):
    enc = tok2(["a", "你好 world"], padding=True, return_tensors="np")
    assert set(enc) == {"input_ids", "attention_mask", "position_ids"}
    m = enc["attention_mask"]
    assert (enc["input_ids"][0, :m.shape[1] - m[0].sum()] == 0).all()
    assert enc["position_ids"][0].tolist() == [0] * (m.shape[1] - m[0].sum()) + list(range(m[0].sum()))
    assert enc["position_ids"][1].tolist() == list(range(m.shape[1]))


def test_chatglm2_prompt(tok2):
    assert tok2.build_prompt("q2", [("q1", "r1")]) == "[Round 1]\n\n问：q1\n\n答：r1\n\n[Round 2]\n\n问：q2\n\n答："


def test_chatglm3_chat_input(tok3):
    enc = tok3.build_chat_input("你好", history=[{"role": "system", "content": "sys", "tools": [{"name": "f"}]},
                                                 {"role": "user", "content": "q"},
                                                 {"role": "assistant", "metadata": "", "content": "r"}])
    ids = enc["input_ids"][0].tolist()
    nl = tok3.sp_encode("\n")
    want = tok3.get_prefix_tokens()
    want += [tok3.get_command("<|system|>")] + nl + tok3.sp_encode("sys\n" + json.dumps([{"name": "f"}], indent=4))
    want += [tok3.get_command("<|user|>")] + nl + tok3.sp_encode("q")
    want += [tok3.get_command("<|assistant|>")] + nl + tok3.sp_encode("r")
    want += [tok3.get_command("<|user|>")] + nl + tok3.sp_encode("你好") + [tok3.get_command("<|assistant|>")]
    assert ids == want
    assert enc["position_ids"][0].tolist() == list(range(len(ids)))


# ------------------------------------------------------------------------------------------------ scripts
def test_script_lines_work_unchanged(tok2):
    model = fastload.AutoModel.from_pretrained(str(FIX / "chatglm2"), trust_remote_code=True, device="cpu")
    model = model.eval()
    response, history = model.chat(tok2, "你好", history=[], do_sample=False, max_new_tokens=6)
    assert isinstance(response, str) and history == [("你好", response)]
    inputs = tok2(tok2.build_prompt("你好"), return_tensors="np")
    out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert tok2.decode(out[0][inputs["input_ids"].shape[1]:]).strip() == response
    last = None
    for last, h in model.stream_chat(tok2, "hello", history=history, do_sample=False, max_new_tokens=6):
        assert h[:-1] == history and h[-1][0] == "hello"
    r2, _ = model.chat(tok2, "hello", history=history, do_sample=False, max_new_tokens=6)
    assert last == r2


def test_chatglm3_chat_history_and_stops(tok3):
    model = load("chatglm3")
    r, h = model.chat(tok3, "你好", history=[], do_sample=False, max_new_tokens=6)
    assert h[0] == {"role": "user", "content": "你好"} and h[1]["role"] == "assistant" and h[1]["content"] == r
    r2, h2 = model.chat(tok3, "again", history=h, role="user", do_sample=False, max_new_tokens=4)
    assert h2[:2] == h and h2[2] == {"role": "user", "content": "again"}
    # the prompt chat() generates from is build_chat_input's
    enc = tok3.build_chat_input("你好")
    out = np.asarray(model.generate(enc["input_ids"], max_new_tokens=6, do_sample=False))[0, enc["input_ids"].shape[1]:]
    stops = {2, tok3.get_command("<|user|>"), tok3.get_command("<|observation|>")}
    ids = out.tolist()
    cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
    assert tok3.decode(ids[:cut]).strip() == r.strip() if isinstance(r, str) else True


def test_position_ids_are_checked():
    model = load("chatglm2")
    ids = np.array([[5, 6, 7]])
    model.generate(ids, position_ids=np.array([[0, 1, 2]]), max_new_tokens=1, do_sample=False)
    with pytest.raises(NotImplementedError, match="position_ids"):
        model.generate(ids, position_ids=np.array([[0, 0, 0]]), max_new_tokens=1, do_sample=False)


def test_tool_call_is_parsed_not_run():
    from fastload.modeling import _tool_call_args
    assert _tool_call_args("tool_call(city='北京', n=3)") == {"city": "北京", "n": 3}
    with pytest.raises(ValueError):
        _tool_call_args("__import__('os').system('true')")


# ---- streamed replies that ChatGLM's post-processing reads (a bug hunt, 2026-12-06, fortieth session) ------------
def _scripted(model, tok, reply_ids):
    """model.generate replaced by one that streams a fixed reply (the tiny fixtures' random weights cannot produce a
    tool call or ChatGLM's placeholder); everything after generate is fastload's own code."""
    def fake_generate(input_ids=None, attention_mask=None, streamer=None, **kw):
        ids = np.asarray(input_ids)
        if streamer is not None:
            streamer.put(ids)
            for t in reply_ids:
                streamer.put(np.array([t]))
            streamer.end()
        return np.concatenate([ids, np.array([reply_ids])], axis=1)
    model.generate = fake_generate


def test_glm3_stream_chat_streams_a_tool_call():
    """A tool-call reply raised ValueError in stream_chat as soon as its name line was complete (the call's text was
    read before it was whole); chat() parsed it. Now the last item equals chat()'s."""
    from fastload import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(FIX / "chatglm3"), trust_remote_code=True)
    model = load("chatglm3")
    _scripted(model, tok, tok.sp_encode("get_weather\n```python\ntool_call(location='Beijing')\n```") +
              [tok.get_command("<|observation|>")])
    tools = [{"name": "get_weather", "description": "weather",
              "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}]
    history = [{"role": "system", "content": "Answer using tools.", "tools": tools}]
    want, _ = model.chat(tok, "Weather in Beijing?", history=history)
    assert want == {"name": "get_weather", "parameters": {"location": "Beijing"}}
    *_, (last, hist) = list(model.stream_chat(tok, "Weather in Beijing?", history=history))
    assert last == want and hist[-1]["metadata"] == "get_weather"
    # THUDM's demo loop: past_key_values passed back in, triples out
    past = None
    for resp, hist, past in model.stream_chat(tok, "Weather in Beijing?", history=history, past_key_values=past,
                                              return_past_key_values=True):
        pass
    assert resp == want and past is None


def test_stream_response_pieces_add_up_when_the_placeholder_is_rewritten():
    """ChatGLM rewrites '[[训练时间]]' once it is complete: stream_response(one_by_one=True) then yielded the whole
    answer again (the pieces held it twice); a piece that may still become the placeholder now waits."""
    from fastload import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(str(FIX / "chatglm2"), trust_remote_code=True)
    model = load("chatglm2")
    model._tokenizer = tok
    _scripted(model, tok, tok.sp_encode("我的训练数据截止到[[训练时间]]。") + [2])
    full = model.response("你是谁")
    assert full == "我的训练数据截止到2023年。"
    assert "".join(model.stream_response("你是谁", one_by_one=True)) == full
    assert list(model.stream_response("你是谁", one_by_one=False))[-1] == full
