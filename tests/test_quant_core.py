"""Issue 9, the core's plumbing into quantised weights (csrc/quant.c, csrc/model.c, csrc/py/py_model.c):

- GGUF Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K stay quantised and repack exactly: the model's
  dequantised weights (core.export, through fl_q_dequant_rows) equal GGUFFile.dequantize bit for bit;
- fused weights (wqkv, w_gate_up) take the common layout of their parts, or the float dtype when mixed;
- GPTQ (v1 / v2 zero points, sym / asym, 4 / 8 bits, act-order g_idx) and AWQ (GEMM packing) repack exactly,
  and every malformed tensor is refused with an error naming the file and the tensor;
- quantisation at load (int8 / int4 / nf4) gives those layouts, and logits equal to the same model run on
  its dequantised weights;
- core.layouts() and core.info's quantized_* numbers.

The GPTQ / AWQ packers below follow AutoGPTQ's QuantLinear.pack (codes packed along the input dimension,
low bits first; zero points packed along the output dimension; v1 stores zero - 1) and AutoAWQ's
WQLinear_GEMM.pack (packed along the output dimension in the order 0, 2, 4, 6, 1, 3, 5, 7).
"""
import os

import numpy as np
import pytest

from fastload import _C
import st_util
from gguf_util import BLOCK, GGML, GGUFWriter

CheckpointError = _C.CheckpointError
S = _C.SLOTS

# ------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------

# hidden 256 so that every K-quant row holds whole 256-element super-blocks
GCFG = dict(vocab=32, d=256, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=128, ffn=256, max_pos=64,
            rms_eps=1e-5, rope_theta=10000.0, tie_embeddings=0)
# GGUF tensor names and the slots they fill (heads: llama.cpp's q / k row permutation to undo)
GGUF_LINEAR = [("q_proj", "blk.0.attn_q.weight", "heads"), ("k_proj", "blk.0.attn_k.weight", "kv_heads"),
               ("v_proj", "blk.0.attn_v.weight", None), ("o_proj", "blk.0.attn_output.weight", None),
               ("gate_proj", "blk.0.ffn_gate.weight", None), ("up_proj", "blk.0.ffn_up.weight", None),
               ("down_proj", "blk.0.ffn_down.weight", None)]
GGUF_OTHER = [("embed_tokens", "token_embd.weight"), ("lm_head", "output.weight")]
GGUF_NORMS = [("final_norm", "output_norm.weight"), ("input_layernorm", "blk.0.attn_norm.weight"),
              ("post_attention_layernorm", "blk.0.ffn_norm.weight")]
HALF_FIELDS = {GGML.Q4_0: [0], GGML.Q4_1: [0, 2], GGML.Q5_0: [0], GGML.Q5_1: [0, 2], GGML.Q8_0: [0],
               GGML.Q4_K: [0, 2], GGML.Q5_K: [0, 2], GGML.Q6_K: [208]}
KEPT = {"Q4_0": GGML.Q4_0, "Q4_1": GGML.Q4_1, "Q5_0": GGML.Q5_0, "Q5_1": GGML.Q5_1, "Q8_0": GGML.Q8_0,
        "Q4_K": GGML.Q4_K, "Q5_K": GGML.Q5_K, "Q6_K": GGML.Q6_K}
# the layout each type keeps: (dtype, bits, group, scale dtype, zeros)
OWN = {"Q4_0": ("int4", 4, 32, "float16", False), "Q4_1": ("int4", 4, 32, "float16", True),
       "Q5_0": ("int8", 8, 32, "float16", False), "Q5_1": ("int8", 8, 32, "float16", True),
       "Q8_0": ("int8", 8, 32, "float16", False), "Q4_K": ("int4", 4, 32, "float32", True),
       "Q5_K": ("int8", 8, 32, "float32", True), "Q6_K": ("int8", 8, 16, "float32", False)}


def random_blocks(rng, type_id, nb):
    """Random bytes for the quants, finite random fp16 scales (zero, subnormal and extreme ones included)."""
    _, bb = BLOCK[type_id]
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for off in HALF_FIELDS[type_id]:
        v = (rng.standard_normal(nb) * 0.05).astype(np.float16)
        specials = np.array([0.0, 3e-6, -6e-8, 1.5, -2.0, 65504.0], np.float16)[:nb]
        v[: len(specials)] = specials
        rng.shuffle(v)
        raw[:, off:off + 2] = v.view(np.uint8).reshape(nb, 2)
    return raw


def gguf_tensor(w, rng, name, type_id, rows, cols):
    if type_id == GGML.F32:
        w.add_tensor(name, rng.standard_normal((rows, cols)).astype(np.float32), GGML.F32, [cols, rows])
    elif type_id == GGML.F16:
        w.add_tensor(name, rng.standard_normal((rows, cols)).astype(np.float16), GGML.F16, [cols, rows])
    else:
        blk, _ = BLOCK[type_id]
        w.add_tensor(name, random_blocks(rng, type_id, rows * cols // blk), type_id, [cols, rows])


def slot_shape(cfg, slot):
    d, q, k, f = cfg["d"], cfg["n_heads"] * cfg["head_dim"], cfg["n_kv_heads"] * cfg["head_dim"], cfg["ffn"]
    return {"q_proj": (q, d), "k_proj": (k, d), "v_proj": (k, d), "o_proj": (d, q), "gate_proj": (f, d),
            "up_proj": (f, d), "down_proj": (d, f), "embed_tokens": (cfg["vocab"], d), "lm_head": (cfg["vocab"], d)}[slot]


def write_gguf(path, types, seed=0, cfg=GCFG):
    """A GGUF holding one tensor per slot; types: {slot: ggml type} (default Q4_0); norms F32."""
    rng = np.random.default_rng(seed)
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    for slot, name, _ in GGUF_LINEAR:
        gguf_tensor(w, rng, name, types.get(slot, GGML.Q4_0), *slot_shape(cfg, slot))
    for slot, name in GGUF_OTHER:
        gguf_tensor(w, rng, name, types.get(slot, GGML.Q4_0), *slot_shape(cfg, slot))
    for _, name in GGUF_NORMS:
        w.add_tensor(name, (1 + 0.1 * rng.standard_normal(cfg["d"])).astype(np.float32), GGML.F32, [cfg["d"]])
    return w.write(str(path))


def gguf_items(g, cfg=GCFG):
    items = [(S[slot], 0, cfg["n_" + heads] if heads else 0, g, name) for slot, name, heads in GGUF_LINEAR]
    items += [(S[slot], 0, 0, g, name) for slot, name in GGUF_OTHER + GGUF_NORMS]
    return items


def unpermute(ref, heads):
    """llama.cpp's q / k row order back to Hugging Face's: GGUF row h*hd + 2i + j is HF row h*hd + j*hd/2 + i."""
    rows = ref.shape[0]
    hd = rows // heads
    return ref.reshape(heads, hd // 2, 2, -1).transpose(0, 2, 1, 3).reshape(ref.shape)


def bits_equal(a, b):
    """Equal to the last bit in float32, except that -0 and +0 count as equal: a symmetric source stored with
    offsets (a fused weight's common layout) computes s*v + m, which gives +0 where ggml's s * (q - off) gives -0
    for a negative scale; the values are the same."""
    a, b = np.asarray(a, np.float32) + np.float32(0), np.asarray(b, np.float32) + np.float32(0)
    return a.shape == b.shape and np.array_equal(a.view(np.uint32), b.view(np.uint32))


def layout_of(core, name):
    return next(d for d in core.layouts() if d["name"] == name)


# ------------------------------------------------------------------------------------------------
# GGUF: kept quantised, exact
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kscale", ["1", "0"])
@pytest.mark.parametrize("tname", list(KEPT))
def test_gguf_type_stays_quantised_and_repacks_exactly(tmp_path, tname, kscale, monkeypatch):
    """Also K scales and split codes (csrc/quant.h: the CPU keeps a K-quant's int8 sub-scales and fp16 super-scales,
    and 5- / 6-bit codes in 5 / 6 bits; off with FASTLOAD_CPU_KSCALE=0, FASTLOAD_CPU_CODES56=0): the same exact
    values, extreme fp16 scales included."""
    monkeypatch.setenv("FASTLOAD_CPU_KSCALE", kscale)
    monkeypatch.setenv("FASTLOAD_CPU_CODES56", kscale)
    t = KEPT[tname]
    slots = [s for s, _, _ in GGUF_LINEAR] + [s for s, _ in GGUF_OTHER]
    path = write_gguf(tmp_path / "m.gguf", {s: t for s in slots}, seed=t)
    g = _C.GGUFFile(path)
    core = _C.Model(GCFG)
    core.load(gguf_items(g))
    core.check_complete()
    dt, bits, group, sd, zeros = OWN[tname]
    if tname.endswith("_K") and kscale == "1":
        sd = "kscale"
    if tname[:2] in ("Q5", "Q6") and kscale == "1":
        dt, bits = f"int{tname[1]}", int(tname[1])
    for name in ("embed", "lm_head", "layers.0.wqkv", "layers.0.wo", "layers.0.w_gate_up", "layers.0.w_down"):
        lay = layout_of(core, name)
        assert (lay["dtype"], lay["bits"], lay["group_size"], lay["scale_dtype"], lay["zeros"], lay["perm"]) == \
            (dt, bits, group, sd, zeros, False), (name, lay)
    assert layout_of(core, "final_norm")["dtype"] == "float32"
    for slot, name, heads in GGUF_LINEAR:
        got_dt, got = core.export(S[slot], 0)
        ref = g.dequantize(name)
        if heads:
            ref = unpermute(ref, GCFG["n_" + heads])
        assert got_dt == "float32"
        assert bits_equal(got, ref), (tname, slot, np.abs(got - ref).max())
    for slot, name in GGUF_OTHER:
        assert bits_equal(core.export(S[slot], 0)[1], g.dequantize(name)), (tname, slot)
    g.close()


def test_gguf_dequantize_option_and_float_dtype(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {})
    g = _C.GGUFFile(path)
    core = _C.Model(GCFG, quant={"gguf": "dequantize"})
    core.load(gguf_items(g))
    assert all(d["dtype"] == "float32" for d in core.layouts())
    assert core.info["quantized_weights"] == 0 and core.info["quantized_bytes"] == 0
    assert bits_equal(core.export(S["v_proj"], 0)[1], g.dequantize("blk.0.attn_v.weight"))
    g.close()


@pytest.mark.parametrize("codes56", ["1", "0"])
def test_fused_layout_promotion_q4k_q6k(tmp_path, codes56, monkeypatch):
    # a Q4_K_M file: q, k in Q4_K, v in Q6_K -> wqkv holds both exactly: 8 bits (6 as split codes on the CPU), group
    # 16, fp32 scales, offsets (the common layout; the CPU's K scales, on by default, hold such a weight in two-level
    # scales instead where its Q6_K scales allow: tests/test_kscales.py)
    monkeypatch.setenv("FASTLOAD_CPU_CODES56", codes56)
    monkeypatch.setenv("FASTLOAD_CPU_KSCALE", "0")
    types = {"q_proj": GGML.Q4_K, "k_proj": GGML.Q4_K, "v_proj": GGML.Q6_K, "gate_proj": GGML.Q4_1,
             "up_proj": GGML.Q4_0, "down_proj": GGML.Q6_K, "o_proj": GGML.Q8_0}
    path = write_gguf(tmp_path / "m.gguf", types, seed=5)
    g = _C.GGUFFile(path)
    core = _C.Model(GCFG)
    core.load(gguf_items(g))
    qkv = layout_of(core, "layers.0.wqkv")
    assert (qkv["dtype"], qkv["bits"], qkv["group_size"], qkv["scale_dtype"], qkv["zeros"]) == \
        (("int6", 6) if codes56 == "1" else ("int8", 8)) + (16, "float32", True)
    # Q4_1 (offsets) with Q4_0 (symmetric): 4 bits, group 32, offsets; fp32 scales hold Q4_0's offset -8d exactly
    gu = layout_of(core, "layers.0.w_gate_up")
    assert (gu["dtype"], gu["bits"], gu["group_size"], gu["scale_dtype"], gu["zeros"]) == \
        ("int4", 4, 32, "float32", True)
    assert layout_of(core, "layers.0.w_down")["group_size"] == 16
    for slot, name, heads in GGUF_LINEAR:
        ref = g.dequantize(name)
        if heads:
            ref = unpermute(ref, GCFG["n_" + heads])
        assert bits_equal(core.export(S[slot], 0)[1], ref), slot
    g.close()


def test_fused_float_and_quantised_parts_become_float(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"k_proj": GGML.F16, "q_proj": GGML.Q5_1, "v_proj": GGML.Q5_0})
    g = _C.GGUFFile(path)
    core = _C.Model(GCFG, dtype="float32")
    core.load(gguf_items(g))
    assert layout_of(core, "layers.0.wqkv")["dtype"] == "float32"
    assert layout_of(core, "layers.0.wo")["dtype"] == "int4"
    ref = unpermute(g.dequantize("blk.0.attn_q.weight"), GCFG["n_heads"])
    assert bits_equal(core.export(S["q_proj"], 0)[1], ref)
    assert bits_equal(core.export(S["v_proj"], 0)[1], g.dequantize("blk.0.attn_v.weight"))
    g.close()


def test_layouts_and_info_numbers(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", {"q_proj": GGML.Q4_K, "k_proj": GGML.Q4_K, "v_proj": GGML.Q6_K,
                                             "embed_tokens": GGML.F16, "lm_head": GGML.Q8_0})
    g = _C.GGUFFile(path)
    core = _C.Model(GCFG, dtype="float16")
    before = core.info
    assert before["quantized_weights"] == 0 and before["quantized_bytes"] == 0 and before["float_bytes"] > 0
    core.load(gguf_items(g))
    lays = core.layouts()
    names = [d["name"] for d in lays]
    assert names == ["embed", "final_norm", "lm_head", "layers.0.attn_norm", "layers.0.wqkv", "layers.0.wo",
                     "layers.0.ffn_norm", "layers.0.w_gate_up", "layers.0.w_down"]
    for d in lays:
        if d["dtype"] in ("int4", "int5", "int6", "int8", "nf4"):
            groups = d["rows"] * (d["cols"] // d["group_size"])
            if d["scale_dtype"] == "kscale":   # int8 per group + fp16 per 256 columns (csrc/quant.h)
                sbytes = groups + d["rows"] * (d["cols"] // 256) * 2
            else:
                sbytes = groups * (4 if d["scale_dtype"] == "float32" else 2)
            want = d["rows"] * d["cols"] * d["bits"] // 8 + sbytes * (2 if d["zeros"] else 1) + \
                (4 * d["cols"] if d["perm"] else 0)
        else:
            assert d["scale_dtype"] is None and d["group_size"] == 0 and not d["zeros"] and not d["perm"]
            want = d["rows"] * d["cols"] * d["bits"] // 8
        assert d["bytes"] == want, d
    lm = layout_of(core, "lm_head")
    assert (lm["dtype"], lm["rows"], lm["cols"]) == ("int8", GCFG["vocab"], GCFG["d"])
    emb = layout_of(core, "embed")
    assert (emb["dtype"], emb["bits"]) == ("float16", 16)
    info = core.info
    q = [d for d in lays if d["dtype"] in ("int4", "int5", "int6", "int8", "nf4")]
    assert info["quantized_weights"] == len(q) == 5
    assert info["quantized_bytes"] == sum(d["bytes"] for d in q)
    assert info["float_bytes"] == sum(d["bytes"] for d in lays if d not in q)
    assert info["weight_bytes"] >= info["quantized_bytes"] + info["float_bytes"]
    assert info["weight_bytes"] < before["weight_bytes"]  # was sized for float16 before the load decided
    g.close()


def test_tied_quantised_embedding_is_the_lm_head(tmp_path):
    # the demo model's shape: token_embd kept as Q8_0 is also the LM head (resident memory ~ the file's)
    cfg = dict(GCFG, tie_embeddings=1)
    rng = np.random.default_rng(3)
    w = GGUFWriter()
    for slot, name, _ in GGUF_LINEAR:
        gguf_tensor(w, rng, name, GGML.Q4_1, *slot_shape(cfg, slot))
    gguf_tensor(w, rng, "token_embd.weight", GGML.Q8_0, cfg["vocab"], cfg["d"])
    for _, name in GGUF_NORMS:
        w.add_tensor(name, np.ones(cfg["d"], np.float32), GGML.F32, [cfg["d"]])
    g = _C.GGUFFile(w.write(str(tmp_path / "t.gguf")))
    items = [it for it in gguf_items(g, cfg) if it[4] != "output.weight"]
    core = _C.Model(cfg)
    core.load(items)
    core.check_complete()
    assert "lm_head" not in [d["name"] for d in core.layouts()]
    assert layout_of(core, "embed")["dtype"] == "int8"
    tensor_bytes = sum(t[4] for t in g.tensors())
    assert core.info["weight_bytes"] <= 1.1 * tensor_bytes
    g.close()


def test_demo_model_resident_memory_is_about_the_file(demo_gguf):
    import fastload
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu", torch_dtype="float32")
    info = m._core.info
    g = _C.GGUFFile(str(demo_gguf))
    tensor_bytes = sum(t[4] for t in g.tensors())
    g.close()
    assert info["weight_bytes"] <= 1.1 * tensor_bytes
    assert info["quantized_weights"] == 1 + 4 * 30  # token_embd (Q8_0) + wqkv, wo, w_gate_up, w_down per layer
    assert {d["dtype"] for d in m._core.layouts() if "norm" not in d["name"]} == {"int8", "int4"}


# ------------------------------------------------------------------------------------------------
# GPTQ / AWQ
# ------------------------------------------------------------------------------------------------

PCFG = dict(vocab=48, d=128, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256, max_pos=64,
            rms_eps=1e-5, rope_theta=10000.0, tie_embeddings=0)
HF = {"q_proj": "model.layers.0.self_attn.q_proj", "k_proj": "model.layers.0.self_attn.k_proj",
      "v_proj": "model.layers.0.self_attn.v_proj", "o_proj": "model.layers.0.self_attn.o_proj",
      "gate_proj": "model.layers.0.mlp.gate_proj", "up_proj": "model.layers.0.mlp.up_proj",
      "down_proj": "model.layers.0.mlp.down_proj"}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def pack_cols(x, bits):
    """[n, m] codes -> int32 [n, m * bits / 32]: element j of a row in word j // (32/bits), low bits first."""
    per = 32 // bits
    x = x.astype(np.uint32)
    out = np.zeros((x.shape[0], x.shape[1] // per), np.uint32)
    for k in range(per):
        out |= x[:, k::per] << np.uint32(bits * k)
    return out.view(np.int32)


def pack_gptq(q, z, s, bits, v1=True):
    """AutoGPTQ's packing. q: codes [out, in]; z: zero points [groups, out]; s: fp16 scales [groups, out]."""
    per = 32 // bits
    qt = q.T.astype(np.uint32)  # [in, out]: packed along the input dimension
    qweight = np.zeros((qt.shape[0] // per, qt.shape[1]), np.uint32)
    for k in range(per):
        qweight |= qt[k::per] << np.uint32(bits * k)
    qz = pack_cols(z, bits).view(np.uint32)
    if v1:  # zero - 1 in every field, as GPTQModel writes v1: one subtraction from each whole word (0 borrows)
        qz = (qz - np.uint32(0xFFFFFFFF // ((1 << bits) - 1))).astype(np.uint32)
    return qweight.view(np.int32), qz.view(np.int32), s.astype(np.float16)


def pack_awq(q, z, s):
    """AutoAWQ's GEMM packing (4 bits): qweight [in, out/8], nibble i of a word holds output 8k + ORDER[i]."""
    qt = q.T.astype(np.uint32)
    qweight = np.zeros((qt.shape[0], qt.shape[1] // 8), np.uint32)
    zt = z.astype(np.uint32)
    qzeros = np.zeros((zt.shape[0], zt.shape[1] // 8), np.uint32)
    for i in range(8):
        qweight |= qt[:, AWQ_ORDER[i]::8] << np.uint32(4 * i)
        qzeros |= zt[:, AWQ_ORDER[i]::8] << np.uint32(4 * i)
    return qweight.view(np.int32), qzeros.view(np.int32), s.astype(np.float16)


def random_quant(rng, rows, cols, bits, group, sym=False, g_idx=None, z=None):
    """Codes, zero points, scales and the float32 weight they mean: s * (q - z), exact in float32."""
    gs = cols if group == -1 else group
    ng = cols // gs
    q = rng.integers(0, 1 << bits, size=(rows, cols))
    if z is None:
        z = np.full((ng, rows), 1 << (bits - 1)) if sym else rng.integers(0, 1 << bits, size=(ng, rows))
    s = (rng.random((ng, rows)) * 0.02 + 0.001).astype(np.float16)
    gi = g_idx if g_idx is not None else np.arange(cols) // gs
    w = s.astype(np.float32)[gi].T * (q - z[gi].T).astype(np.float32)
    return q, z, s, w.astype(np.float32)


def write_packed_model(path, packing="gptq", bits=4, group=32, sym=False, act_order=False, v1=True, seed=0,
                       cfg=PCFG, shared_gidx=True, tweak=None, zeros=None):
    """A tiny checkpoint whose linear layers are GPTQ / AWQ packed: (items(file, extra=None), reference weights).
    act_order: a random g_idx per layer (shared by the parts of a fused weight unless shared_gidx=False, as GPTQ
    makes them: they see the same input). zeros: {slot: zero points [groups, rows]} instead of random ones."""
    rng = np.random.default_rng(seed)
    tensors, ref, gidx = {}, {}, {}
    for slot, base in HF.items():
        rows, cols = slot_shape(cfg, slot)
        g_idx = None
        if act_order:
            fused_with = {"k_proj": "q_proj", "v_proj": "q_proj", "up_proj": "gate_proj"}.get(slot)
            gs = cols if group == -1 else group
            g_idx = gidx[fused_with] if shared_gidx and fused_with else (rng.permutation(cols) // gs).astype(np.int32)
            gidx[slot] = g_idx
        q, z, s, w = random_quant(rng, rows, cols, bits, group, sym, g_idx, (zeros or {}).get(slot))
        if packing == "gptq":
            qw, qz, sc = pack_gptq(q, z, s, bits, v1)
        else:
            qw, qz, sc = pack_awq(q, z, s)
        tensors[base + ".qweight"], tensors[base + ".qzeros"], tensors[base + ".scales"] = qw, qz, sc
        if g_idx is not None:
            tensors[base + ".g_idx"] = g_idx
        ref[slot] = w
    tensors["model.embed_tokens.weight"] = rng.standard_normal((cfg["vocab"], cfg["d"])).astype(np.float32)
    tensors["lm_head.weight"] = rng.standard_normal((cfg["vocab"], cfg["d"])).astype(np.float32) * 0.1
    tensors["model.norm.weight"] = np.ones(cfg["d"], np.float32)
    tensors["model.layers.0.input_layernorm.weight"] = np.ones(cfg["d"], np.float32)
    tensors["model.layers.0.post_attention_layernorm.weight"] = np.ones(cfg["d"], np.float32)
    if tweak:
        tweak(tensors)
    st_util.write(str(path), tensors)

    def items(f, extra=None):
        out = [(S["embed_tokens"], 0, 0, f, "model.embed_tokens.weight"), (S["lm_head"], 0, 0, f, "lm_head.weight"),
               (S["final_norm"], 0, 0, f, "model.norm.weight"),
               (S["input_layernorm"], 0, 0, f, "model.layers.0.input_layernorm.weight"),
               (S["post_attention_layernorm"], 0, 0, f, "model.layers.0.post_attention_layernorm.weight")]
        for slot, base in HF.items():
            p = {"packing": packing, "bits": bits, "group_size": group, "zero_offset": 1 if (v1 and packing == "gptq") else 0,
                 "qzeros": (f, base + ".qzeros"), "scales": (f, base + ".scales"),
                 "g_idx": (f, base + ".g_idx") if (base + ".g_idx") in f.keys() else None}
            if extra:
                p.update(extra)
            out.append((S[slot], 0, 0, f, base + ".qweight", p))
        return out
    return items, ref


GPTQ_CASES = {
    "gptq4-asym-v1": dict(bits=4, group=32),
    "gptq4-sym-v1": dict(bits=4, group=32, sym=True),
    "gptq4-asym-v2": dict(bits=4, group=64, v1=False),
    "gptq8-asym-v1": dict(bits=8, group=32),
    "gptq8-sym-v2": dict(bits=8, group=128, sym=True, v1=False),
    "gptq4-whole-row": dict(bits=4, group=-1),
    "gptq4-act-order": dict(bits=4, group=32, act_order=True),
    "gptq8-act-order-sym": dict(bits=8, group=64, act_order=True, sym=True),
    "awq4": dict(packing="awq", bits=4, group=32),
    "awq4-g128": dict(packing="awq", bits=4, group=128),
}


@pytest.mark.parametrize("case", list(GPTQ_CASES))
def test_packed_checkpoint_repacks_exactly(tmp_path, case):
    kw = GPTQ_CASES[case]
    items, ref = write_packed_model(tmp_path / "m.safetensors", seed=len(case), **kw)
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    core = _C.Model(PCFG)
    core.load(items(f))
    core.check_complete()
    sym, act = kw.get("sym", False), kw.get("act_order", False)
    bits, group = kw["bits"], kw["group"]
    for name in ("layers.0.wqkv", "layers.0.wo", "layers.0.w_gate_up", "layers.0.w_down"):
        lay = layout_of(core, name)
        want_group = lay["cols"] if group == -1 else group
        assert (lay["dtype"], lay["bits"], lay["group_size"], lay["scale_dtype"], lay["zeros"], lay["perm"]) == \
            (f"int{bits}", bits, want_group, "float16" if sym else "float32", not sym, act), (name, lay)
    for slot in HF:
        dt, got = core.export(S[slot], 0)
        assert dt == "float32" and bits_equal(got, ref[slot]), (case, slot)
    f.close()


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_v1_zero_of_0_reads_as_the_writer_meant(tmp_path, bits):
    """v1 stores zero - 1; GPTQModel writes it as one subtraction from each whole int32 word, so a zero of 0 becomes
    2^bits - 1 and borrows one from the field above (AutoGPTQ stores the same 2^bits - 1 in a word's top field).
    Read back as GPTQModel (and so transformers) reads it, by adding the word back, every zero is the writer's:
    zeros of 0 in the lowest, a middle and the top field of words, and words of nothing but zeros of 0 (stored
    0xEEEEEEEF at 4 bits). A per-field + 1 read those as 2^bits and the field above one too low."""
    rows, per = 128, 32 // bits
    z = np.random.default_rng(bits).integers(0, 1 << bits, size=(4, rows))
    z[0, 0] = z[1, per // 2] = z[2, per - 1] = 0   # lowest, middle, top field of a word
    z[3, :per] = 0                                  # a whole word of zeros of 0
    items, ref = write_packed_model(tmp_path / "m.safetensors", bits=bits, zeros={"o_proj": z})
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    word = 0xFFFFFFFF // ((1 << bits) - 1)  # 1 in every field
    assert f.get(HF["o_proj"] + ".qzeros").view(np.uint32)[3, 0] == (-word) % (1 << 32)  # 0xEEEEEEEF at 4 bits
    core = _C.Model(PCFG)
    core.load(items(f))
    assert bits_equal(core.export(S["o_proj"], 0)[1], ref["o_proj"])
    f.close()


def test_fused_parts_with_different_act_order_are_refused(tmp_path):
    items, _ = write_packed_model(tmp_path / "m.safetensors", act_order=True, shared_gidx=False)
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    core = _C.Model(PCFG)
    with pytest.raises(NotImplementedError, match=r"q_proj\.qweight.*k_proj\.qweight.*layers\.0\.wqkv.*g_idx"):
        core.load(items(f))
    f.close()


def _load_packed(tmp_path, tweak=None, extra=None, **kw):
    items, _ = write_packed_model(tmp_path / "m.safetensors", tweak=tweak, **kw)
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        _C.Model(PCFG).load(items(f, extra))
    finally:
        f.close()


Q = HF["q_proj"]


@pytest.mark.parametrize("what,tweak,exc,pattern", [
    ("qweight shape", lambda t: t.__setitem__(Q + ".qweight", t[Q + ".qweight"][:-1]), CheckpointError,
     r"tensor '.*q_proj\.qweight'.*qweight '.*q_proj\.qweight' has shape \[15, 128\], expected \[16, 128\]"),
    ("qweight dtype", lambda t: t.__setitem__(Q + ".qweight", t[Q + ".qweight"].astype(np.float32)), CheckpointError,
     r"q_proj\.qweight' is F32, not I32"),
    ("scales shape", lambda t: t.__setitem__(Q + ".scales", t[Q + ".scales"][:, :64]), CheckpointError,
     r"tensor '.*q_proj\.qweight'.*scales '.*q_proj\.scales' has shape \[4, 64\], expected \[4, 128\]"),
    ("scales groups", lambda t: t.__setitem__(Q + ".scales", t[Q + ".scales"][:3]), CheckpointError,
     r"q_proj\.qweight.*qzeros '.*q_proj\.qzeros' has shape \[4, 16\], expected \[3, 16\]"),
    ("scales dtype", lambda t: t.__setitem__(Q + ".scales", t[Q + ".scales"].astype(np.float64)), CheckpointError,
     r"scales '.*q_proj\.scales' is F64, not F16, BF16 or F32"),
    ("qzeros shape", lambda t: t.__setitem__(Q + ".qzeros", t[Q + ".qzeros"][:, :8]), CheckpointError,
     r"tensor '.*q_proj\.qweight'.*qzeros '.*q_proj\.qzeros' has shape \[4, 8\], expected \[4, 16\]"),
])
def test_packed_bad_shapes_name_file_and_tensor(tmp_path, what, tweak, exc, pattern):
    with pytest.raises(exc, match=pattern) as ei:
        _load_packed(tmp_path, tweak=tweak)
    assert str(tmp_path / "m.safetensors") in str(ei.value), what


def test_gidx_out_of_range(tmp_path):
    def tweak(t):
        g = t[Q + ".g_idx"].copy()
        g[5] = 4  # 4 groups: 0..3
        t[Q + ".g_idx"] = g
    with pytest.raises(CheckpointError, match=r"m\.safetensors: tensor '.*q_proj\.qweight' \(q_proj\).*g_idx\[5\] = 4 "
                                              r"is outside \[0, 4\)") as ei:
        _load_packed(tmp_path, tweak=tweak, act_order=True)
    assert str(tmp_path) in str(ei.value)


def test_gidx_groups_of_unequal_size(tmp_path):
    def tweak(t):
        g = t[Q + ".g_idx"].copy()
        g[np.flatnonzero(g == 1)[0]] = 0  # group 0 gets 33 columns, group 1 31
        t[Q + ".g_idx"] = g
    with pytest.raises(NotImplementedError, match=r"q_proj\.qweight.*g_idx puts 33 columns in group 0, not group_size 32"):
        _load_packed(tmp_path, tweak=tweak, act_order=True)


def test_gidx_wrong_length(tmp_path):
    with pytest.raises(CheckpointError, match=r"g_idx '.*q_proj\.g_idx' has shape \[127\], expected \[128\]"):
        _load_packed(tmp_path, tweak=lambda t: t.__setitem__(Q + ".g_idx", t[Q + ".g_idx"][:-1]), act_order=True)


@pytest.mark.parametrize("extra,exc,pattern", [
    ({"bits": 3}, NotImplementedError, r"q_proj\.qweight.*GPTQ with bits=3 is not supported \(4 and 8 are\)"),
    ({"bits": 2}, NotImplementedError, r"GPTQ with bits=2 is not supported"),
    ({"packing": "awq", "bits": 8, "zero_offset": 0}, NotImplementedError, r"AWQ with bits=8 is not supported"),
    ({"group_size": 8}, CheckpointError, r"scales / qzeros hold 4 groups, but in_features 128 with group_size 8 needs 16"),
    ({"group_size": 0}, CheckpointError, r"group_size=0 must be positive or -1"),
    ({"zero_offset": 2}, ValueError, r"zero_offset=2 must be 1"),
])
def test_packed_bad_settings(tmp_path, extra, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _load_packed(tmp_path, extra=extra)


def test_partial_last_group_is_refused(tmp_path):
    def tweak(t):  # q_proj as a checkpoint with group_size 48 stores it: ceil(128 / 48) = 3 groups
        t[Q + ".scales"], t[Q + ".qzeros"] = t[Q + ".scales"][:3], t[Q + ".qzeros"][:3]
    with pytest.raises(NotImplementedError, match=r"q_proj\.qweight.*group_size 48 does not divide in_features 128"):
        _load_packed(tmp_path, tweak=tweak, extra={"group_size": 48})


def test_group_not_multiple_of_16_is_refused(tmp_path):
    cfg = dict(PCFG)
    with pytest.raises(NotImplementedError, match=r"group size 8 is not a multiple of 16"):
        items, _ = write_packed_model(tmp_path / "m.safetensors", group=8, cfg=cfg)
        f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
        try:
            _C.Model(cfg).load(items(f))
        finally:
            f.close()


def test_truncated_packed_file_names_the_file(tmp_path):
    items, _ = write_packed_model(tmp_path / "m.safetensors")
    p = tmp_path / "m.safetensors"
    raw = p.read_bytes()
    p.write_bytes(raw[:-100])
    with pytest.raises(CheckpointError, match=r"m\.safetensors"):
        _C.SafetensorsFile(str(p))


def test_packed_item_arguments(tmp_path):
    items, _ = write_packed_model(tmp_path / "m.safetensors")
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    it = items(f)
    bad = list(it)
    bad[-1] = bad[-1][:5] + ({"packing": "exl2", "bits": 4, "group_size": 32},)
    with pytest.raises(ValueError, match=r"packed\['packing'\] must be 'gptq' or 'awq'"):
        _C.Model(PCFG).load(bad)
    p = dict(it[-1][5])
    del p["scales"]
    bad[-1] = it[-1][:5] + (p,)
    with pytest.raises(ValueError, match=r"packed\['scales'\] is missing"):
        _C.Model(PCFG).load(bad)
    bad[-1] = it[-1][:5] + ([],)
    with pytest.raises(TypeError, match=r"6th element must be a dict"):
        _C.Model(PCFG).load(bad)
    p = dict(it[-1][5], qzeros=(f, "nope"))
    bad[-1] = it[-1][:5] + (p,)
    with pytest.raises(KeyError, match=r"no tensor 'nope'"):
        _C.Model(PCFG).load(bad)
    # a packed tensor cannot fill a norm
    bad = list(it)
    bad[2] = (S["final_norm"], 0, 0, f, HF["q_proj"] + ".qweight", it[-1][5])
    with pytest.raises(ValueError, match=r"cannot fill a vector"):
        _C.Model(PCFG).load(bad)
    f.close()


# ------------------------------------------------------------------------------------------------
# quantisation at load
# ------------------------------------------------------------------------------------------------

HF_PLAIN = {"q_proj": "model.layers.{l}.self_attn.q_proj.weight", "k_proj": "model.layers.{l}.self_attn.k_proj.weight",
            "v_proj": "model.layers.{l}.self_attn.v_proj.weight", "o_proj": "model.layers.{l}.self_attn.o_proj.weight",
            "gate_proj": "model.layers.{l}.mlp.gate_proj.weight", "up_proj": "model.layers.{l}.mlp.up_proj.weight",
            "down_proj": "model.layers.{l}.mlp.down_proj.weight",
            "input_layernorm": "model.layers.{l}.input_layernorm.weight",
            "post_attention_layernorm": "model.layers.{l}.post_attention_layernorm.weight"}
QCFG = dict(vocab=96, d=128, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=32, ffn=256, max_pos=64,
            rms_eps=1e-5, rope_theta=10000.0, tie_embeddings=0)


def write_plain_model(path, cfg=QCFG, dtype=np.float32, seed=0):
    """A tiny float checkpoint (Hugging Face names) with random weights in `dtype`."""
    rng = np.random.default_rng(seed)
    t = {}
    for l in range(cfg["n_layers"]):
        for slot, name in HF_PLAIN.items():
            if slot.endswith("norm"):
                t[name.format(l=l)] = (1 + 0.1 * rng.standard_normal(cfg["d"])).astype(dtype)
            else:
                t[name.format(l=l)] = (rng.standard_normal(slot_shape(cfg, slot)) * 0.08).astype(dtype)
    t["model.embed_tokens.weight"] = rng.standard_normal((cfg["vocab"], cfg["d"])).astype(dtype)
    t["model.norm.weight"] = np.ones(cfg["d"], dtype)
    if not cfg["tie_embeddings"]:
        t["lm_head.weight"] = (rng.standard_normal((cfg["vocab"], cfg["d"])) * 0.1).astype(dtype)
    st_util.write(str(path), t)
    return t


def plain_items(f, cfg=QCFG):
    items = [(S["embed_tokens"], 0, 0, f, "model.embed_tokens.weight"), (S["final_norm"], 0, 0, f, "model.norm.weight")]
    if not cfg["tie_embeddings"]:
        items.append((S["lm_head"], 0, 0, f, "lm_head.weight"))
    for l in range(cfg["n_layers"]):
        items += [(S[slot], l, 0, f, name.format(l=l)) for slot, name in HF_PLAIN.items()]
    return items


def export_all(core, cfg=QCFG):
    """The model's weights as a Hugging Face-named dict of float32 arrays (what save_pretrained writes)."""
    out = {"model.embed_tokens.weight": core.export(S["embed_tokens"], 0)[1],
           "model.norm.weight": core.export(S["final_norm"], 0)[1]}
    if not cfg["tie_embeddings"]:
        out["lm_head.weight"] = core.export(S["lm_head"], 0)[1]
    for l in range(cfg["n_layers"]):
        for slot, name in HF_PLAIN.items():
            out[name.format(l=l)] = core.export(S[slot], l)[1]
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


SCHEMES = {  # quant dict -> (linear dtype, group, zeros, lm_head dtype)
    "int8": ({"scheme": "int8"}, "int8", None, False, "int8"),
    "int8-g32": ({"scheme": "int8", "group_size": 32}, "int8", 32, False, "int8"),
    "int4": ({"scheme": "int4"}, "int4", 128, True, "int8"),
    "int4-g32": ({"scheme": "int4", "group_size": 32}, "int4", 32, True, "int8"),
    "nf4": ({"scheme": "nf4"}, "nf4", 64, False, "int8"),
    "nf4-lm-head-nf4": ({"scheme": "nf4", "lm_head": "nf4", "lm_head_group": 32}, "nf4", 64, False, "nf4"),
    "int4-lm-head-float": ({"scheme": "int4", "lm_head": "none"}, "int4", 128, True, "float32"),
}


@pytest.mark.parametrize("case", list(SCHEMES))
def test_quantise_at_load_layouts(tmp_path, case):
    quant, dt, group, zeros, lm = SCHEMES[case]
    write_plain_model(tmp_path / "m.safetensors")
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    core = _C.Model(QCFG, quant=quant)
    core.load(plain_items(f))
    core.check_complete()
    for l in range(QCFG["n_layers"]):
        for name in ("wqkv", "wo", "w_gate_up", "w_down"):
            lay = layout_of(core, f"layers.{l}.{name}")
            assert (lay["dtype"], lay["group_size"], lay["zeros"], lay["perm"], lay["scale_dtype"]) == \
                (dt, group or lay["cols"], zeros, False, "float16"), lay
        assert layout_of(core, f"layers.{l}.attn_norm")["dtype"] == "float32"
    assert layout_of(core, "embed")["dtype"] == "float32"  # embeddings and norms stay in the float dtype
    assert layout_of(core, "lm_head")["dtype"] == lm
    assert core.info["quantized_weights"] == 4 * QCFG["n_layers"] + (lm != "float32")
    # the dequantised weights are the originals within half a quantisation step (of the scheme each weight has);
    # int4's (scale, offset) search may clip a group's extremes to lower its squared error: within one step
    step = {"int8": 1 / 127, "int4": 2 / 15, "nf4": 0.28, "float32": 0}
    orig = st_util_read(f)
    got = export_all(core)
    for k, v in orig.items():
        scheme = lm if k == "lm_head.weight" else "float32" if ("norm" in k or "embed" in k) else dt
        err = np.abs(got[k] - v).max()
        assert err <= (1.0 if scheme == "int4" else 0.51) * step[scheme] * np.abs(v).max(), (k, scheme, err)
    f.close()


def st_util_read(f):
    return {k: np.asarray(f.get(k), np.float32) for k in f.keys()}


@pytest.mark.parametrize("case", ["int8", "int4", "nf4", "int4-g32"])
def test_quantise_at_load_logits_equal_dequantised_model(tmp_path, case):
    """Needs the CPU kernels for quantised weights (qcpu): the quantised model's logits equal those of a float
    model loaded from its own dequantised weights (export -> save float32 -> load)."""
    quant = SCHEMES[case][0]
    write_plain_model(tmp_path / "m.safetensors")
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    core = _C.Model(QCFG, quant=quant)
    core.load(plain_items(f))
    f.close()
    st_util.write(str(tmp_path / "deq.safetensors"), export_all(core))
    g = _C.SafetensorsFile(str(tmp_path / "deq.safetensors"))
    ref = _C.Model(QCFG)
    ref.load(plain_items(g))
    g.close()
    ids = np.random.default_rng(7).integers(0, QCFG["vocab"], size=(2, 9)).astype(np.int32)
    lq, lf = core.forward(ids), ref.forward(ids)
    np.testing.assert_allclose(lq, lf, rtol=1e-4, atol=1e-4)


def test_packed_logits_equal_dequantised_model(tmp_path, monkeypatch):
    """GPTQ with act order and AWQ: logits equal the float model on the exported (exact) weights. Needs qcpu's kernels.
    FASTLOAD_CPU_QDOT=exact: x unquantised (the integer path for up to 16 rows would add its int16 rounding)."""
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "exact")
    for kw in (dict(bits=4, group=32, act_order=True), dict(packing="awq", bits=4, group=32), dict(bits=8, group=64, sym=True)):
        items, ref_w = write_packed_model(tmp_path / "m.safetensors", **kw)
        f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
        core = _C.Model(PCFG)
        core.load(items(f))
        f.close()
        exp = {"model.embed_tokens.weight": core.export(S["embed_tokens"], 0)[1],
               "lm_head.weight": core.export(S["lm_head"], 0)[1], "model.norm.weight": core.export(S["final_norm"], 0)[1],
               "model.layers.0.input_layernorm.weight": core.export(S["input_layernorm"], 0)[1],
               "model.layers.0.post_attention_layernorm.weight": core.export(S["post_attention_layernorm"], 0)[1]}
        for slot in HF:
            exp[HF_PLAIN[slot].format(l=0)] = core.export(S[slot], 0)[1]
        st_util.write(str(tmp_path / "deq.safetensors"), {k: np.asarray(v, np.float32) for k, v in exp.items()})
        g = _C.SafetensorsFile(str(tmp_path / "deq.safetensors"))
        ref = _C.Model(PCFG)
        ref.load(plain_items(g, dict(PCFG)))
        g.close()
        ids = np.random.default_rng(3).integers(0, PCFG["vocab"], size=(1, 7)).astype(np.int32)
        np.testing.assert_allclose(core.forward(ids), ref.forward(ids), rtol=1e-4, atol=1e-4)


def test_gguf_logits_equal_dequantised_model(tmp_path):
    """A Q4_K_M-like GGUF (mixed types, fused promotion): logits equal the same model loaded with gguf='dequantize'.
    Needs qcpu's kernels."""
    types = {"q_proj": GGML.Q4_K, "k_proj": GGML.Q4_K, "v_proj": GGML.Q6_K, "gate_proj": GGML.Q5_K,
             "up_proj": GGML.Q5_K, "down_proj": GGML.Q6_K, "o_proj": GGML.Q8_0, "embed_tokens": GGML.Q4_0,
             "lm_head": GGML.Q6_K}
    path = write_gguf(tmp_path / "m.gguf", types, seed=11)
    g = _C.GGUFFile(path)
    core, ref = _C.Model(GCFG), _C.Model(GCFG, quant={"gguf": "dequantize"})
    core.load(gguf_items(g))
    ref.load(gguf_items(g))
    g.close()
    ids = np.random.default_rng(2).integers(0, GCFG["vocab"], size=(1, 6)).astype(np.int32)
    lq, lf = core.forward(ids), ref.forward(ids)
    scale = np.abs(lf).max()
    np.testing.assert_allclose(lq, lf, rtol=1e-4, atol=1e-4 * scale)


# ------------------------------------------------------------------------------------------------
# the quant= argument
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("quant,exc,pattern", [
    ({"scheme": "int5"}, ValueError, r"quant\['scheme'\] = 'int5' is not one of 'int8', 'int4', 'nf4', 'none'"),
    ({"scheme": 4}, ValueError, r"quant\['scheme'\] must be one of"),
    ({"scheme": "int4", "group_size": -1}, ValueError, r"quant\['group_size'\] must be an integer >= 0"),
    ({"scheme": "int4", "group_size": True}, ValueError, r"quant\['group_size'\] must be an integer"),
    ({"scheme": "int4", "bits": 4}, ValueError, r"quant: unknown key 'bits'"),
    ({"gguf": "yes"}, ValueError, r"quant\['gguf'\] must be 'keep' or 'dequantize'"),
    ({"lm_head": "fp8"}, ValueError, r"quant\['lm_head'\] = 'fp8'"),
    ("int4", TypeError, r"quant must be a dict or None"),
])
def test_quant_argument_errors(quant, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _C.Model(QCFG, quant=quant)


def test_quant_none_and_defaults(tmp_path):
    write_plain_model(tmp_path / "m.safetensors")
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    for quant in (None, {}, {"scheme": "none"}, {"scheme": None}):
        core = _C.Model(QCFG, quant=quant)
        core.load(plain_items(f))
        assert core.info["quantized_weights"] == 0
        assert {d["dtype"] for d in core.layouts()} == {"float32"}
    core = _C.Model(QCFG, quant={"scheme": "int8"})  # lm_head defaults to the scheme itself for int8
    core.load(plain_items(f))
    assert layout_of(core, "lm_head")["dtype"] == "int8"
    assert layout_of(core, "lm_head")["group_size"] == QCFG["d"]
    f.close()


def test_bad_scheme_group_names_the_tensor(tmp_path):
    # a group size that does not divide the rows' length is refused naming the tensor it does not fit
    write_plain_model(tmp_path / "m.safetensors")
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    with pytest.raises(ValueError, match=r"m\.safetensors: tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' \(q_proj\)"):
        _C.Model(QCFG, quant={"scheme": "int4", "group_size": 96}).load(plain_items(f))
    f.close()


# ------------------------------------------------------------------------------------------------
# CUDA (skipped without a device): the same weights as on the CPU, bit for bit
# ------------------------------------------------------------------------------------------------

def _cuda_available():
    import fastload
    return fastload.cuda.is_available()


needs_cuda = pytest.mark.skipif(not _cuda_available(), reason="no CUDA device here: the GPU load paths run on the GPU machine")


@needs_cuda
@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("src_dtype", [np.float32, np.float16])
def test_cuda_quantise_at_load_equals_cpu(tmp_path, scheme, src_dtype):
    # on the GPU the float weights stream into a device buffer and the backend's quantize op writes them: the codes,
    # scales and offsets must be the CPU's (fl_q_quantize_rows) exactly, so the dequantised exports are equal
    write_plain_model(tmp_path / "m.safetensors", dtype=src_dtype)
    f = _C.SafetensorsFile(str(tmp_path / "m.safetensors"))
    cores = {}
    for dev in ("cpu", "cuda"):
        cores[dev] = _C.Model(QCFG, dtype="float16", device=dev, quant={"scheme": scheme})
        cores[dev].load(plain_items(f))
    f.close()
    assert cores["cpu"].layouts() == cores["cuda"].layouts()
    a, b = export_all(cores["cpu"]), export_all(cores["cuda"])
    for k in a:
        assert bits_equal(a[k], b[k]), k
    ids = np.random.default_rng(4).integers(0, QCFG["vocab"], size=(2, 8)).astype(np.int32)
    np.testing.assert_allclose(cores["cuda"].forward(ids), cores["cpu"].forward(ids), rtol=2e-2, atol=2e-2)


@needs_cuda
def test_cuda_gguf_and_gptq_equal_cpu(tmp_path):
    types = {"q_proj": GGML.Q4_K, "k_proj": GGML.Q4_K, "v_proj": GGML.Q6_K, "gate_proj": GGML.Q4_1,
             "up_proj": GGML.Q4_0, "down_proj": GGML.Q5_K, "o_proj": GGML.Q8_0, "embed_tokens": GGML.Q8_0}
    g = _C.GGUFFile(write_gguf(tmp_path / "m.gguf", types, seed=9))
    cores = {dev: _C.Model(GCFG, dtype="float16", device=dev) for dev in ("cpu", "cuda")}
    for c in cores.values():
        c.load(gguf_items(g))
    g.close()
    # the same quantised data on both (the exports below are equal bit for bit); the CPU may hold GGUF's 5- / 6-bit
    # codes narrower than CUDA's bytes (its split codes, README "Interleaved weights": a fused q|k|v of Q4_K and Q6_K
    # parts is int6 there, int8 on CUDA) and K-quant scales as K scales (README: "keeps K scales") where CUDA has
    # float32
    for lc, lg in zip(cores["cpu"].layouts(), cores["cuda"].layouts()):
        same = ("name", "group_size", "zeros", "perm", "rows", "cols")
        assert {k: lc[k] for k in same} == {k: lg[k] for k in same}, (lc, lg)
        assert lc["bits"] == lg["bits"] or (lc["bits"] in (5, 6) and lg["bits"] == 8), (lc, lg)
        assert lc["scale_dtype"] == lg["scale_dtype"] or lc["scale_dtype"] == "kscale", (lc, lg)
    for slot, _, _ in GGUF_LINEAR:
        assert bits_equal(cores["cpu"].export(S[slot], 0)[1], cores["cuda"].export(S[slot], 0)[1]), slot
    items, ref = write_packed_model(tmp_path / "p.safetensors", act_order=True)
    f = _C.SafetensorsFile(str(tmp_path / "p.safetensors"))
    gpu = _C.Model(PCFG, dtype="float16", device="cuda")
    gpu.load(items(f))
    f.close()
    assert layout_of(gpu, "layers.0.wqkv")["perm"]
    for slot in HF:
        assert bits_equal(gpu.export(S[slot], 0)[1], ref[slot]), slot
