"""Quantised fixture checkpoints (GPTQ, AWQ, GGUF) made from random weights with each format's OWN packing rules.

numpy only, and written independently of fastload's C code (csrc/quant.c): this module is the independent
check of the repacker. Facts about each format were read from the tools that write the format; the comments
name the repository and file each one comes from. No code was copied.

GPTQ (AutoGPTQ, GPTQModel, transformers + optimum; one linear layer, W[out_features, in_features]):
  qweight int32 [in * bits / 32, out]   codes packed along the INPUT dim: word r of column o holds the codes
                                        of inputs r*k .. r*k+k-1 (k = 32 / bits), input r*k+j at bit bits*j
                                        ("low bits first").  AutoGPTQ auto_gptq/nn_modules/qlinear/qlinear_cuda.py
                                        QuantLinear.pack (`qweight[row] |= intweight[j] << (bits * (j - i))`)
                                        and the unpack in forward (`wf = range(0, 32, bits)`).
  qzeros  int32 [n_groups, out * bits / 32]  zero points packed along the OUTPUT dim, same bit order;
                                        the v1 format ("checkpoint_format": "gptq") stores zero - 1
                                        (qlinear_cuda.py pack: `zeros -= 1`; forward: `zeros = zeros + 1`);
                                        gptq_v2 stores zero itself: GPTQModel gptqmodel/utils/model.py
                                        convert_gptq_v1_to_v2_format_module adds 0x11111111 (4 bit) /
                                        0x01010101 (8 bit) to every int32 of qzeros, i.e. +1 per field.
  scales  float16 [n_groups, out]
  g_idx   int32 [in]                    group of each input column; without act-order i // group_size
                                        (qlinear_cuda.py __init__). With act-order (desc_act=True) the
                                        columns are quantised in a permuted order perm and
                                        g_idx = (arange(in) // group_size)[argsort(perm)]: every group still
                                        has exactly group_size columns, scattered (AutoGPTQ
                                        auto_gptq/quantization/gptq.py fasterquant, `g_idx = g_idx[invperm]`).
  w[o, i] = scales[g, o] * (q[i, o] - zero[g, o]),  g = g_idx[i]   (qlinear_cuda.py forward:
                                        `scales[g_idx] * (weight - zeros[g_idx])`).
  Quantiser (auto_gptq/quantization/quantizer.py Quantizer.find_params, per output row and group, no
  Hessian update here): xmin = min(min x, 0), xmax = max(max x, 0); sym: xmax = max(|xmin|, xmax),
  xmin = -xmax when xmin < 0; both 0 -> -1, +1; scale = (xmax - xmin) / maxq; zero = (maxq + 1) / 2 =
  2^(bits-1) when sym else round(-xmin / scale); q = clamp(round(x / scale) + zero, 0, maxq).
  group_size -1 means one group of in_features (qlinear_cuda.py: `group_size if group_size != -1 else infeatures`).
  A zero of 0 does not fit v1's zero - 1 (GPTQModel's comment in convert_gptq_v1_to_v2_format_module: the
  ~13% overflow of sym=False v1 checkpoints): GPTQModel writes v1 by subtracting 0x11111111 / 0x01010101
  from each whole int32 (convert_gptq_v2_to_v1_format_module), so such a field holds 2^bits - 1 and the
  field above it one less; its reader adds the word back and recovers every zero. The v1 fixtures are
  written that way (zeros of 0 included) and read back by the word addition (csrc/quant.c packed_zero).
  config.json quantization_config keys:
    older AutoGPTQ (and many published checkpoints): no checkpoint_format, "is_marlin_format": false instead
      (AutoGPTQ config.py from_quant_config still reads is_marlin_format; a missing checkpoint_format means "gptq").
    AutoGPTQ auto_gptq/quantization/config.py BaseQuantizeConfig.to_dict: bits, group_size, damp_percent,
      desc_act, static_groups, sym, true_sequential, model_name_or_path, model_file_base_name,
      quant_method "gptq", checkpoint_format "gptq".
    GPTQModel (as saved in checkpoints): bits, group_size, desc_act, sym, lm_head, quant_method "gptq",
      checkpoint_format "gptq" | "gptq_v2", pack_dtype "int32", meta {quantizer: [...], ...}.
    transformers utils/quantization_config.py GPTQConfig: reads `format` or the legacy `checkpoint_format`
      (to_dict writes both); sym defaults True, desc_act False, group_size 128.

AWQ GEMM (AutoAWQ WQLinear_GEMM, casper-hansen/AutoAWQ awq/modules/linear/gemm.py; only 4-bit:
`if w_bit not in [4]: raise NotImplementedError`):
  qweight int32 [in, out / 8]   codes packed along the OUTPUT dim: word c of input row i holds outputs
                                c*8 .. c*8+7, slot s (bits 4s..4s+3) holds output c*8 + ORDER[s],
                                ORDER = [0, 2, 4, 6, 1, 3, 5, 7] (from_linear: `order_map`,
                                `qweight[:, col] |= qweight_col << (i * w_bit)`).
  qzeros  int32 [n_groups, out / 8]   the same packing of the zero points, no -1.
  scales  float16 [n_groups, out]
  w[o, i] = (q - zero) * scale of group i // group_size  (awq/utils/packing_utils.py dequantize_gemm:
                                unpack with shifts 0, 4, .., 28, reorder with AWQ_REVERSE_ORDER
                                [0, 4, 1, 5, 2, 6, 3, 7], `(iweight - izeros) * scales`).
  Quantiser (AutoAWQ awq/quantize/quantizer.py pseudo_quantize_tensor, zero_point=True):
  scale = max(max - min, 1e-5) / 15, zero = clamp(-round(min / scale), 0, 15),
  q = clamp(round(w / scale) + zero, 0, 15).
  config.json quantization_config (awq/models/_config.py AwqConfig.to_transformers_dict): quant_method "awq",
  zero_point true, group_size, bits 4, version "gemm", modules_to_not_convert (null or a list of names;
  transformers matches them as prefixes at a module boundary or as suffixes,
  quantizers/quantizers_utils.py should_convert_module).

Biases of quantised linears are float16 `<module>.bias` in both tools (qlinear_cuda.py and gemm.py register
bias as float16); the other tensors (embeddings, norms, an unquantised lm_head) are stored in float16 here,
like the published checkpoints. Every quantised fixture has a float REFERENCE directory holding the
dequantised weights (computed in float32 from the fp16 scales: exact, see dequant_*) and float32 copies of the
float16 tensors, so a quantised load and the float load see identical weight values.

GGUF (ggml ggml/src/ggml-common.h block structs, ggml/src/ggml-quants.c dequantize_row_*), per block:
  Q4_0 {d f16, qs[16]}: value j < 16 low nibble of qs[j], j >= 16 high nibble of qs[j-16]; w = d (q - 8)
  Q4_1 {d, m f16, qs[16]}: w = d q + m
  Q5_0 {d, qh u32, qs[16]}: q = nibble | (bit j of qh) << 4; w = d (q - 16)
  Q5_1 {d, m, qh, qs}: w = d q + m
  Q8_0 {d, qs int8[32]}: w = d q
  Q4_K {d, dmin f16, scales[12], qs[128]}: 8 sub-blocks of 32; 6-bit sc/m of sub-block j (get_scale_min_k4):
       j < 4: sc = s[j] & 63, m = s[j+4] & 63; else sc = (s[j+4] & 15) | (s[j-4] >> 6) << 4,
       m = (s[j+4] >> 4) | (s[j] >> 6) << 4; 64 values per 32 bytes of qs: low nibbles sub-block 2c, high 2c+1;
       w = d sc q - dmin m
  Q5_K {d, dmin, scales[12], qh[32], qs[128]}: as Q4_K plus bit (2c) / (2c+1) of qh[l] as bit 4
  Q6_K {ql[128], qh[64], scales int8[16], d f16}: per half n (128 values): y[l] = ql[l] & 15 | (qh[l] & 3) << 4,
       y[l+32] = ql[l+32] & 15 | (qh[l] >> 2 & 3) << 4, y[l+64] = ql[l] >> 4 | (qh[l] >> 4 & 3) << 4,
       y[l+96] = ql[l+32] >> 4 | (qh[l] >> 6) << 4 (ql, qh offset by 64n, 32n); scale of value v in the half:
       scales[8n + v // 16]; w = d sc (q - 32)
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

import st_util
from gguf_util import BLOCK, GGML, GGUFWriter, T

F32 = np.float32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # AutoAWQ gemm.py order_map / packing_utils.py AWQ_ORDER
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


# ================================================================================================
# bit packing into int32 words (little end first), both directions
# ================================================================================================

def _pack_fields(vals, bits, axis):
    """Pack unsigned ints < 2^bits, k = 32 // bits consecutive ones along `axis`, field j at bit bits*j."""
    vals = np.asarray(vals)
    k = 32 // bits
    if vals.min(initial=0) < 0 or vals.max(initial=0) >= (1 << bits):
        raise ValueError(f"values outside 0..{(1 << bits) - 1}")
    v = np.moveaxis(vals.astype(np.uint32), axis, -1)
    if v.shape[-1] % k:
        raise ValueError(f"dimension {v.shape[-1]} is not a multiple of {k}")
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // k, k))
    word = np.zeros(v.shape[:-1], np.uint32)
    for j in range(k):
        word |= v[..., j] << np.uint32(bits * j)
    return np.ascontiguousarray(np.moveaxis(word, -1, axis)).view(np.int32)


def _unpack_fields(words, bits, axis):
    """Inverse of _pack_fields: int32 words -> unsigned fields (int64), k per word along `axis`."""
    k = 32 // bits
    w = np.moveaxis(np.asarray(words).view(np.uint32), axis, -1)
    shifts = (np.arange(k, dtype=np.uint32) * bits)
    f = (w[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    f = f.reshape(w.shape[:-1] + (w.shape[-1] * k,)).astype(np.int64)
    return np.ascontiguousarray(np.moveaxis(f, -1, axis))


def _check_bits(bits, allowed=(4, 8)):
    if bits not in allowed:
        raise ValueError(f"bits {bits} not in {allowed}")


def _f16(x):
    return np.asarray(x, F32).astype(np.float16)


# ================================================================================================
# GPTQ
# ================================================================================================

def gptq_g_idx(in_features, group_size, desc_act=False, rng=None, perm=None):
    """(g_idx int32 [in], perm): perm[g*gs:(g+1)*gs] are the columns of group g (quantisation order).
    With desc_act the order is `perm` if given, else a random permutation (GPTQ's argsort of the Hessian's
    diagonal, descending: layers fed the same input, q/k/v or gate/up, have the same Hessian and so the
    same order)."""
    gs = in_features if group_size == -1 else group_size
    if in_features % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_features}")
    if not desc_act:
        perm = np.arange(in_features)
    elif perm is None:
        perm = (rng or np.random.default_rng(0)).permutation(in_features)
    invperm = np.argsort(perm)
    g_idx = (np.arange(in_features) // gs)[invperm].astype(np.int32)
    return g_idx, perm


def gptq_quantize(W, bits=4, group_size=128, sym=True, desc_act=False, zero_offset=1, rng=None, perm=None):
    """Quantise W[out, in] float32 as AutoGPTQ's quantizer does per group (no Hessian update).
    Returns dict codes [out, in] (int64), zeros [n_groups, out] (int64, the true zero point),
    scales float16 [n_groups, out], g_idx int32 [in]."""
    _check_bits(bits)
    W = np.asarray(W, F32)
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    g_idx, perm = gptq_g_idx(in_f, group_size, desc_act, rng, perm)
    ng = in_f // gs
    maxq = (1 << bits) - 1
    codes = np.zeros((out_f, in_f), np.int64)
    zeros = np.zeros((ng, out_f), np.int64)
    scales = np.zeros((ng, out_f), np.float16)
    for g in range(ng):
        cols = perm[g * gs:(g + 1) * gs]
        x = W[:, cols]
        xmin = np.minimum(x.min(1), 0)
        xmax = np.maximum(x.max(1), 0)
        if sym:
            xmax = np.maximum(np.abs(xmin), xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        both0 = (xmin == 0) & (xmax == 0)
        xmin = np.where(both0, -1, xmin)
        xmax = np.where(both0, 1, xmax)
        scale = (xmax - xmin) / maxq
        if sym:
            zero = np.full(out_f, (maxq + 1) // 2, np.int64)
        else:
            zero = np.rint(-xmin / scale).astype(np.int64)
        s16 = _f16(scale)
        s16[s16 == 0] = np.float16(6e-5)
        s = s16.astype(F32)
        q = np.clip(np.rint(x / s[:, None]) + zero[:, None], 0, maxq).astype(np.int64)
        codes[:, cols] = q
        zeros[g], scales[g] = zero, s16
    return {"codes": codes, "zeros": zeros, "scales": scales, "g_idx": g_idx}


def v1_word(bits):
    """What GPTQ v1 subtracts from (writing) and adds to (reading) each int32 of qzeros: 1 in every field."""
    return np.uint32(0xFFFFFFFF // ((1 << bits) - 1))


def gptq_pack(codes, zeros, scales, g_idx, bits=4, zero_offset=1):
    """Checkpoint tensors from codes [out, in] and true zeros [n_groups, out]; v1 (zero_offset 1) as GPTQModel
    writes it: the zeros packed, then zero_offset x v1_word(bits) subtracted from each whole word (mod 2^32)."""
    _check_bits(bits)
    qz = _pack_fields(np.asarray(zeros), bits, axis=1).view(np.uint32)
    qz = (qz - np.uint32(zero_offset) * v1_word(bits)).astype(np.uint32)
    return {"qweight": _pack_fields(np.asarray(codes).T, bits, axis=0),
            "qzeros": qz.view(np.int32),
            "scales": np.asarray(scales, np.float16),
            "g_idx": np.asarray(g_idx, np.int32)}


def gptq_unpack(qweight, qzeros, bits=4, zero_offset=1):
    """(codes [out, in], true zeros [n_groups, out]) from the packed tensors."""
    codes = _unpack_fields(qweight, bits, axis=0).T
    qz = (np.asarray(qzeros).view(np.uint32) + np.uint32(zero_offset) * v1_word(bits)).astype(np.uint32)
    zeros = _unpack_fields(qz.view(np.int32), bits, axis=1)
    return np.ascontiguousarray(codes), zeros


def dequant_gptq(qweight, qzeros, scales, g_idx=None, bits=4, zero_offset=1, group_size=None):
    """W[out, in] float32 = scales[g, o] * (q - zero[g, o]), g = g_idx[i] (computed in float32: exact)."""
    codes, zeros = gptq_unpack(qweight, qzeros, bits, zero_offset)
    in_f = codes.shape[1]
    if g_idx is None:
        gs = in_f if group_size in (None, -1) else group_size
        g_idx = np.arange(in_f) // gs
    g = np.asarray(g_idx, np.int64)
    s = np.asarray(scales).astype(F32)         # float16 (or bfloat16 / float32 values) widened exactly
    return (s[g].T * (codes - zeros[g].T).astype(F32)).astype(F32)


def gptq_tensors(W, bits=4, group_size=128, sym=True, desc_act=False, zero_offset=1, rng=None, perm=None):
    """Quantise and pack one linear layer: {"qweight", "qzeros", "scales", "g_idx"}."""
    p = gptq_quantize(W, bits, group_size, sym, desc_act, zero_offset, rng, perm)
    return gptq_pack(p["codes"], p["zeros"], p["scales"], p["g_idx"], bits, zero_offset)


def gptq_quant_config(bits=4, group_size=128, sym=True, desc_act=False, checkpoint_format="gptq", tool="gptqmodel",
                      lm_head=False):
    """config.json's quantization_config as each tool writes it (see the module docstring for sources)."""
    if tool == "autogptq":
        return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
                "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": None, "quant_method": "gptq", "checkpoint_format": checkpoint_format}
    if tool == "autogptq-0.6":  # older AutoGPTQ: no checkpoint_format, is_marlin_format false (v1 implied)
        return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
                "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
                "model_file_base_name": None, "is_marlin_format": False, "quant_method": "gptq"}
    if tool == "gptqmodel":
        return {"bits": bits, "checkpoint_format": checkpoint_format, "desc_act": desc_act,
                "group_size": group_size, "lm_head": lm_head,
                "meta": {"damp_auto_increment": 0.0025, "damp_percent": 0.05, "mse": 0.0,
                         "quantizer": ["gptqmodel:4.0.0"], "static_groups": False, "true_sequential": True,
                         "uri": "https://github.com/modelcloud/gptqmodel"},
                "pack_dtype": "int32", "quant_method": "gptq", "sym": sym}
    if tool == "transformers":  # GPTQConfig.to_dict (optimum): `format` and the legacy `checkpoint_format`
        return {"quant_method": "gptq", "bits": bits, "tokenizer": None, "dataset": None, "group_size": group_size,
                "damp_percent": 0.1, "desc_act": desc_act, "act_group_aware": not desc_act, "sym": sym,
                "true_sequential": True, "format": checkpoint_format, "meta": None, "backend": "auto",
                "model_seqlen": None, "block_name_to_quantize": "model.layers",
                "module_name_preceding_first_block": ["model.embed_tokens"], "batch_size": 1,
                "pad_token_id": None, "max_input_length": None, "cache_block_outputs": True,
                "modules_in_block_to_quantize": None, "checkpoint_format": checkpoint_format}
    raise ValueError(f"tool {tool!r}")


# ================================================================================================
# AWQ (GEMM)
# ================================================================================================

def awq_quantize(W, group_size=128):
    """AutoAWQ's zero-point quantiser per output row and group of consecutive input columns.
    Returns codes [out, in], zeros [n_groups, out], scales float16 [n_groups, out]."""
    W = np.asarray(W, F32)
    out_f, in_f = W.shape
    gs = in_f if group_size == -1 else group_size
    if in_f % gs:
        raise ValueError(f"group_size {gs} does not divide in_features {in_f}")
    ng = in_f // gs
    x = W.reshape(out_f, ng, gs)
    mx, mn = x.max(2), x.min(2)
    scale = np.maximum(mx - mn, 1e-5) / 15
    zero = np.clip(-np.rint(mn / scale), 0, 15).astype(np.int64)
    s16 = _f16(scale)
    s16[s16 == 0] = np.float16(6e-5)
    s = s16.astype(F32)
    q = np.clip(np.rint(x / s[..., None]) + zero[..., None], 0, 15).astype(np.int64)
    return {"codes": q.reshape(out_f, in_f), "zeros": zero.T.copy(), "scales": s16.T.copy()}


def _awq_order(vals):
    """[..., out] -> [..., out] with the 8 outputs of each word in slot order (slot s <- output ORDER[s])."""
    v = np.asarray(vals)
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // 8, 8))[..., list(AWQ_ORDER)]
    return v.reshape(v.shape[:-2] + (-1,))


def _awq_unorder(vals):
    v = np.asarray(vals)
    v = v.reshape(v.shape[:-1] + (v.shape[-1] // 8, 8))
    out = np.empty_like(v)
    out[..., list(AWQ_ORDER)] = v
    return out.reshape(out.shape[:-2] + (-1,))


def awq_pack(codes, zeros, scales):
    """Checkpoint tensors (4-bit GEMM) from codes [out, in] and zeros [n_groups, out]."""
    codes = np.asarray(codes)
    if codes.shape[0] % 8:
        raise ValueError("out_features must be a multiple of 8")
    return {"qweight": _pack_fields(_awq_order(codes.T), 4, axis=1),
            "qzeros": _pack_fields(_awq_order(np.asarray(zeros)), 4, axis=1),
            "scales": np.asarray(scales, np.float16)}


def awq_unpack(qweight, qzeros):
    """(codes [out, in], zeros [n_groups, out])."""
    codes_t = _awq_unorder(_unpack_fields(qweight, 4, axis=1))
    zeros = _awq_unorder(_unpack_fields(qzeros, 4, axis=1))
    return np.ascontiguousarray(codes_t.T), zeros


def dequant_awq(qweight, qzeros, scales, group_size=None):
    """W[out, in] float32 = (q - zero) * scale, group of input i = i // group_size (float32: exact)."""
    codes, zeros = awq_unpack(qweight, qzeros)
    in_f = codes.shape[1]
    ng = np.asarray(scales).shape[0]
    gs = in_f // ng if group_size in (None, -1) else group_size
    g = np.arange(in_f) // gs
    s = np.asarray(scales, np.float16).astype(F32)
    return ((codes - zeros[g].T).astype(F32) * s[g].T).astype(F32)


def awq_tensors(W, group_size=128):
    p = awq_quantize(W, group_size)
    return awq_pack(p["codes"], p["zeros"], p["scales"])


def awq_quant_config(group_size=128, modules_to_not_convert=None):
    """AutoAWQ awq/models/_config.py to_transformers_dict."""
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": modules_to_not_convert}


# ================================================================================================
# tiny Llama / Qwen2 models
# ================================================================================================

SHAPES = {
    # vocab, hidden, intermediate, layers, heads, kv heads, head_dim
    "llama": dict(vocab=320, hidden=128, inter=256, layers=2, heads=4, kv=2, head_dim=32),
    "qwen2": dict(vocab=320, hidden=128, inter=256, layers=2, heads=8, kv=2, head_dim=16),
}


def model_config(arch="llama", dtype="float32", tie=None, **shape):
    """config.json of a tiny model, with the keys transformers 5.23 writes (tests/fixtures/README.md)."""
    s = dict(SHAPES[arch], **shape)
    tie = (arch == "qwen2") if tie is None else tie
    cfg = {"architectures": ["LlamaForCausalLM" if arch == "llama" else "Qwen2ForCausalLM"],
           "attention_dropout": 0.0, "bos_token_id": 1, "dtype": dtype, "eos_token_id": 2, "hidden_act": "silu",
           "hidden_size": s["hidden"], "initializer_range": 0.02, "intermediate_size": s["inter"],
           "max_position_embeddings": 128, "model_type": arch, "num_attention_heads": s["heads"],
           "num_hidden_layers": s["layers"], "num_key_value_heads": s["kv"], "pad_token_id": 0,
           "rms_norm_eps": 1e-05, "tie_word_embeddings": tie, "use_cache": True, "vocab_size": s["vocab"],
           "transformers_version": "5.23.0"}
    if arch == "llama":
        cfg.update({"attention_bias": False, "head_dim": s["head_dim"], "mlp_bias": False, "pretraining_tp": 1,
                    "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}})
    else:
        if s["head_dim"] * s["heads"] != s["hidden"]:
            cfg["head_dim"] = s["head_dim"]
        cfg.update({"layer_types": ["full_attention"] * s["layers"], "max_window_layers": 28,
                    "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"},
                    "sliding_window": None, "use_sliding_window": False})
    return cfg


def linear_shapes(cfg):
    """{suffix: (out, in)} of one layer's linears."""
    d, f = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or d // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}


def float_weights(cfg, seed=0):
    """Random float32 weights with the usual HF names (the scales of tests/fixtures: matrices 0.15 N(0,1),
    embeddings and lm_head N(0,1), norms 1 + 0.1 N(0,1), q/k/v biases 0.3 N(0,1) for qwen2)."""
    rng = np.random.default_rng(seed)
    V, d = cfg["vocab_size"], cfg["hidden_size"]

    def n(shape, s):
        return (rng.standard_normal(shape) * s).astype(F32)

    w = {"model.embed_tokens.weight": n((V, d), 1.0)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = 1 + n(d, 0.1)
        w[p + "post_attention_layernorm.weight"] = 1 + n(d, 0.1)
        for suf, shape in linear_shapes(cfg).items():
            w[p + suf + ".weight"] = n(shape, 0.15)
            if cfg["model_type"] == "qwen2" and suf in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                w[p + suf + ".bias"] = n(shape[0], 0.3)
    w["model.norm.weight"] = 1 + n(d, 0.1)
    if not cfg["tie_word_embeddings"]:
        w["lm_head.weight"] = n((V, d), 1.0)
    return w


def _write_dir(path, cfg, tensors, files=1):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, f)
    names = list(tensors)
    if files == 1:
        st_util.write(os.path.join(path, "model.safetensors"), tensors, metadata={"format": "pt"})
        return str(path)
    chunks = np.array_split(np.arange(len(names)), files)
    weight_map = {}
    for k, idx in enumerate(chunks):
        fn = f"model-{k + 1:05d}-of-{files:05d}.safetensors"
        st_util.write(os.path.join(path, fn), {names[i]: tensors[names[i]] for i in idx}, metadata={"format": "pt"})
        weight_map.update({names[i]: fn for i in idx})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    return str(path)


def _fp16_exact(a):
    """float32 values that float16 holds exactly (what the quantised checkpoint stores)."""
    return np.asarray(a, F32).astype(np.float16)


def _write_quantised(path, ref_dir, cfg, qc, weights, quantise, quantised, files=1):
    """Shared part of the GPTQ / AWQ writers. quantise(name, W) -> (tensors dict, dequantised W)."""
    qt, rt = {}, {}
    for name, w in weights.items():
        mod = name[:-len(".weight")] if name.endswith(".weight") else None
        if mod is not None and quantised(mod):
            packed, deq = quantise(mod, w)
            for k, v in packed.items():
                qt[f"{mod}.{k}"] = v
            rt[name] = deq
        else:
            h = _fp16_exact(w)
            qt[name] = h
            rt[name] = h.astype(F32)
    qcfg = dict(cfg, dtype="float16", quantization_config=qc)
    rcfg = dict(cfg, dtype="float32")
    _write_dir(path, qcfg, qt, files)
    _write_dir(ref_dir, rcfg, rt)
    return str(path), str(ref_dir)


def _is_linear(mod, lm_head=False):
    return any(mod.endswith("." + s) for s in LINEARS) or (lm_head and mod == "lm_head")


def _input_group(mod):
    """Linears fed the same input share GPTQ's act-order permutation: q/k/v, gate/up."""
    for a, b in (("self_attn.k_proj", "self_attn.q_proj"), ("self_attn.v_proj", "self_attn.q_proj"),
                 ("mlp.up_proj", "mlp.gate_proj")):
        if mod.endswith(a):
            return mod[:-len(a)] + b
    return mod


def _dynamic_rule(mod, dynamic):
    """GPTQModel's per-module overrides (quantization_config "dynamic": {"-:regex": {}} leaves matching modules
    unquantised, "+:regex" or a bare regex: {"bits": 8, ...} overrides settings; regexes matched with re.match).
    Returns None (skip), or a dict of overrides."""
    import re
    for k, v in (dynamic or {}).items():
        neg = k.startswith("-:")
        pat = k[2:] if k[:2] in ("-:", "+:") else k
        if re.match(pat, mod):
            return None if neg else dict(v)
    return {}


def write_gptq_checkpoint(path, cfg=None, *, arch="llama", ref_dir=None, seed=0, tool="gptqmodel", files=1,
                          g_idx=True, shared_perm=True, scale_dtype="float16", **shape):
    """A tiny GPTQ model in `path` and its dequantised float32 reference in `ref_dir` (default path + "-ref").
    cfg: the quantisation settings, keys as in quantization_config: bits (4|8), group_size (-1 = one group),
    sym, desc_act (a random act-order permutation per layer, groups of equal size), checkpoint_format
    ("gptq" = v1, zero stored minus 1 | "gptq_v2"), lm_head (quantise an untied lm_head, GPTQModel's option).
    cfg may hold GPTQModel's "dynamic" per-module overrides (see _dynamic_rule): skipped modules stay float16.
    g_idx=False leaves the g_idx tensors out (older GPTQ-for-LLaMa checkpoints; only without desc_act).
    scale_dtype "bfloat16" / "float32" stores the scales so (AutoGPTQ's qlinear_cuda.py pack casts them to
    the layer's dtype: a bfloat16 model gets bfloat16 scales); the reference uses the stored values.
    With desc_act, q/k/v and gate/up share one random permutation, as real checkpoints do (the same input
    gives the same Hessian); shared_perm=False gives every linear its own (for an error test).
    Returns (path, ref_dir)."""
    c = {"bits": 4, "group_size": 32, "sym": True, "desc_act": False, "checkpoint_format": "gptq", "lm_head": False}
    c.update(cfg or {})
    dynamic = c.pop("dynamic", None)
    mcfg = model_config(arch, tie=False if c["lm_head"] else None, **shape)
    bits, gs = c["bits"], c["group_size"]
    zero_offset = 0 if c["checkpoint_format"] == "gptq_v2" else 1
    rng = np.random.default_rng(seed + 1000)
    perms = {}
    qc = gptq_quant_config(bits, gs, c["sym"], c["desc_act"], c["checkpoint_format"], tool, c["lm_head"])
    if dynamic is not None:
        qc["dynamic"] = dynamic

    def quantise(mod, w):
        o = dict(c, **_dynamic_rule(mod, dynamic))
        b, g = o["bits"], o["group_size"]
        key = _input_group(mod) if shared_perm else mod
        if key not in perms:
            perms[key] = rng.permutation(w.shape[1])
        t = gptq_tensors(w, b, g, o["sym"], o["desc_act"], zero_offset, rng, perms[key])
        if scale_dtype == "float32":
            t["scales"] = t["scales"].astype(F32)
        elif scale_dtype == "bfloat16":
            bits16 = st_util.bf16_bits(t["scales"].astype(F32))
            t["scales"] = ("BF16", bits16)
            deq = dequant_gptq(t["qweight"], t["qzeros"], st_util.bf16_to_f32(bits16), t.get("g_idx") if g_idx else None,
                               b, zero_offset, g)
            if not g_idx:
                t.pop("g_idx")
            return t, deq
        if not g_idx:
            assert not o["desc_act"], "act-order needs g_idx"
            t.pop("g_idx")
            return t, dequant_gptq(t["qweight"], t["qzeros"], t["scales"], None, b, zero_offset, g)
        return t, dequant_gptq(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], b, zero_offset)

    def quantised(m):
        return _is_linear(m, c["lm_head"]) and _dynamic_rule(m, dynamic) is not None

    out = _write_quantised(path, ref_dir or str(path) + "-ref", mcfg, qc, float_weights(mcfg, seed), quantise,
                           quantised, files)
    if tool.startswith("autogptq"):  # AutoGPTQ also saves quantize_config.json (config.py QUANT_CONFIG_FILENAME)
        with open(os.path.join(str(path), "quantize_config.json"), "w") as f:
            json.dump(qc, f, indent=2)
    return out


def write_awq_checkpoint(path, *, group_size=32, arch="llama", ref_dir=None, seed=0, modules_to_not_convert=None,
                         files=1, **shape):
    """A tiny AWQ (GEMM, 4-bit) model and its dequantised float32 reference. Modules whose names match
    modules_to_not_convert (prefix at a module boundary, or suffix, as transformers) stay float16 `.weight`.
    Returns (path, ref_dir)."""
    mcfg = model_config(arch, **shape)
    skip = list(modules_to_not_convert or [])

    def converted(mod):
        if not _is_linear(mod):
            return False
        return not any(mod == k or mod.startswith(k + ".") or mod.endswith(k) for k in skip)

    def quantise(mod, w):
        t = awq_tensors(w, group_size)
        return t, dequant_awq(t["qweight"], t["qzeros"], t["scales"], group_size)

    qc = awq_quant_config(group_size, modules_to_not_convert)
    return _write_quantised(path, ref_dir or str(path) + "-ref", mcfg, qc, float_weights(mcfg, seed), quantise,
                            converted, files)


# ================================================================================================
# safetensors read / rewrite (for broken variants in tests)
# ================================================================================================

_ST_NP = {v: k for k, v in st_util.NP_TO_ST.items()}


def read_safetensors(path):
    """{name: numpy array} in file order (numpy only; BF16 tensors come back as their float32 values)."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    out = {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = e["data_offsets"]
        if e["dtype"] == "BF16":    # as the float32 values
            out[name] = st_util.bf16_to_f32(np.frombuffer(raw[base + a:base + b], np.uint16)).reshape(e["shape"])
            continue
        out[name] = np.frombuffer(raw[base + a:base + b], dtype=_ST_NP[e["dtype"]]).reshape(e["shape"]).copy()
    return out


def rewrite_safetensors(path, changes=None, order=None):
    """Rewrite a safetensors file with tensors replaced ({name: array}) or removed ({name: None});
    `order` lists names to put last (in that order)."""
    t = read_safetensors(path)
    for k, v in (changes or {}).items():
        if v is None:
            t.pop(k, None)
        else:
            t[k] = v
    if order:
        for k in order:
            t[k] = t.pop(k)
    st_util.write(path, t, metadata={"format": "pt"})
    return str(path)


# ================================================================================================
# GGUF: random valid blocks of each type, their exact values, tiny llama files
# ================================================================================================

GGUF_TYPES = {"Q4_0": GGML.Q4_0, "Q4_1": GGML.Q4_1, "Q5_0": GGML.Q5_0, "Q5_1": GGML.Q5_1, "Q8_0": GGML.Q8_0,
              "Q4_K": GGML.Q4_K, "Q5_K": GGML.Q5_K, "Q6_K": GGML.Q6_K, "F32": GGML.F32, "F16": GGML.F16}


def _h(x):
    """float16 bytes of an [nb] array -> [nb, 2] uint8."""
    return _f16(x).view(np.uint8).reshape(-1, 2)


def _nibbles_pack(lo, hi):
    return (np.asarray(lo, np.uint8) | (np.asarray(hi, np.uint8) << 4)).astype(np.uint8)


def encode_blocks(type_name, q, d, m=None, sc=None, mn=None):
    """Block bytes [nb, block_bytes] from the unpacked fields:
    q: codes [nb, elems] (unsigned stored values: Q4_0 0..15, Q5_* 0..31, Q8_0 -128..127, K: per type);
    d: [nb] super/block scale; m: [nb] (Q4_1 / Q5_1 min, K-quants dmin); sc, mn: [nb, 8] 6-bit
    (Q4_K / Q5_K) or sc [nb, 16] int8 (Q6_K)."""
    q = np.asarray(q)
    nb = q.shape[0]
    if type_name in ("Q4_0", "Q4_1"):
        qs = _nibbles_pack(q[:, :16], q[:, 16:])
        head = [_h(d)] + ([_h(m)] if type_name == "Q4_1" else [])
        return np.concatenate(head + [qs], axis=1)
    if type_name in ("Q5_0", "Q5_1"):
        qs = _nibbles_pack(q[:, :16] & 15, q[:, 16:] & 15)
        hb = ((q >> 4) & 1).astype(np.uint64)
        qh = (hb << np.arange(32, dtype=np.uint64)).sum(axis=1).astype("<u4").view(np.uint8).reshape(nb, 4)
        head = [_h(d)] + ([_h(m)] if type_name == "Q5_1" else [])
        return np.concatenate(head + [qh, qs], axis=1)
    if type_name == "Q8_0":
        return np.concatenate([_h(d), np.asarray(q, np.int8).view(np.uint8)], axis=1)
    if type_name in ("Q4_K", "Q5_K"):
        sc, mn = np.asarray(sc, np.uint8), np.asarray(mn, np.uint8)
        s = np.zeros((nb, 12), np.uint8)
        s[:, 0:4] = (sc[:, 0:4] & 63) | ((sc[:, 4:8] >> 4) << 6)
        s[:, 4:8] = (mn[:, 0:4] & 63) | ((mn[:, 4:8] >> 4) << 6)
        s[:, 8:12] = (sc[:, 4:8] & 15) | ((mn[:, 4:8] & 15) << 4)
        qq = q.reshape(nb, 4, 2, 32)                       # chunk c, half (sub-block 2c / 2c+1), l
        qs = _nibbles_pack(qq[:, :, 0] & 15, qq[:, :, 1] & 15).reshape(nb, 128)
        parts = [_h(d), _h(m), s]
        if type_name == "Q5_K":
            hb = ((q.reshape(nb, 8, 32) >> 4) & 1).astype(np.uint8)   # sub-block j -> bit j of qh[l]
            qh = (hb << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1).astype(np.uint8)
            parts.append(qh)
        parts.append(qs)
        return np.concatenate(parts, axis=1)
    if type_name == "Q6_K":
        qq = np.asarray(q, np.uint8).reshape(nb, 2, 4, 32)   # half n, quarter k (y[32k + l]), l
        ql = np.zeros((nb, 2, 64), np.uint8)
        ql[:, :, :32] = (qq[:, :, 0] & 15) | ((qq[:, :, 2] & 15) << 4)
        ql[:, :, 32:] = (qq[:, :, 1] & 15) | ((qq[:, :, 3] & 15) << 4)
        qh = ((qq[:, :, 0] >> 4) | ((qq[:, :, 1] >> 4) << 2) | ((qq[:, :, 2] >> 4) << 4)
              | ((qq[:, :, 3] >> 4) << 6)).astype(np.uint8)
        return np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), np.asarray(sc, np.int8).view(np.uint8),
                               _h(d)], axis=1)
    raise ValueError(f"type {type_name}")


def decode_blocks(type_name, raw):
    """Exact float32 values [nb, elems] of block bytes (the ggml formulas in the module docstring)."""
    raw = np.asarray(raw, np.uint8)
    nb = raw.shape[0]

    def h(off):
        return raw[:, off:off + 2].copy().view(np.float16).astype(F32)   # [nb, 1]

    def nib(qs):
        return np.concatenate([qs & 15, qs >> 4], axis=1).astype(np.int32)

    def bits32(off):
        v = raw[:, off:off + 4].copy().view("<u4")
        return ((v >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)

    if type_name == "Q4_0":
        return h(0) * (nib(raw[:, 2:18]) - 8).astype(F32)
    if type_name == "Q4_1":
        return h(0) * nib(raw[:, 4:20]).astype(F32) + h(2)
    if type_name == "Q5_0":
        return h(0) * ((nib(raw[:, 6:22]) | (bits32(2) << 4)) - 16).astype(F32)
    if type_name == "Q5_1":
        return h(0) * (nib(raw[:, 8:24]) | (bits32(4) << 4)).astype(F32) + h(2)
    if type_name == "Q8_0":
        return h(0) * raw[:, 2:34].copy().view(np.int8).astype(F32)
    if type_name in ("Q4_K", "Q5_K"):
        d, dmin = h(0), h(2)
        s = raw[:, 4:16].astype(np.int32)
        sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
        mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
        qs_off = 16 if type_name == "Q4_K" else 48
        qs = raw[:, qs_off:qs_off + 128].reshape(nb, 4, 32).astype(np.int32)
        q = np.stack([qs & 15, qs >> 4], axis=2).reshape(nb, 8, 32)
        if type_name == "Q5_K":
            qh = raw[:, 16:48].astype(np.int32)
            q = q + (((qh[:, None, :] >> np.arange(8)[None, :, None]) & 1) << 4)
        return ((d * sc.astype(F32))[..., None] * q.astype(F32) - (dmin * mn.astype(F32))[..., None]).reshape(nb, 256)
    if type_name == "Q6_K":
        ql = raw[:, :128].reshape(nb, 2, 64).astype(np.int32)
        qh = raw[:, 128:192].reshape(nb, 2, 32).astype(np.int32)
        sc = raw[:, 192:208].copy().view(np.int8).astype(F32).reshape(nb, 2, 8)
        d = h(208)
        q = np.stack([(ql[..., :32] & 15) | ((qh & 3) << 4), (ql[..., 32:] & 15) | (((qh >> 2) & 3) << 4),
                      (ql[..., :32] >> 4) | (((qh >> 4) & 3) << 4), (ql[..., 32:] >> 4) | (((qh >> 6) & 3) << 4)],
                     axis=2)                                     # [nb, 2, 4, 32]: value 32k + l of half n
        s = np.repeat(sc, 16, axis=2).reshape(nb, 2, 4, 32)      # value v of a half uses scales[8n + v // 16]
        return (d[:, :, None, None] * s * (q - 32).astype(F32)).reshape(nb, 256)
    raise ValueError(f"type {type_name}")


def random_blocks(type_name, nb, rng, std=0.1):
    """Random valid blocks: random codes over the whole range, finite fp16 scales sized so the values have
    roughly `std` and mean 0 (the _1 / K types get a min that centres them; signs of d vary where the
    format's quantiser produces negative d: Q4_0, Q5_0, Q8_0, Q6_K). Returns raw [nb, block_bytes] uint8."""
    sign = np.where(rng.random(nb) < 0.5, -1.0, 1.0)
    jitter = rng.uniform(0.6, 1.4, nb)
    if type_name == "Q4_0":
        return encode_blocks(type_name, rng.integers(0, 16, (nb, 32)), sign * jitter * std / 4.6)
    if type_name == "Q5_0":
        return encode_blocks(type_name, rng.integers(0, 32, (nb, 32)), sign * jitter * std / 9.2)
    if type_name == "Q8_0":
        return encode_blocks(type_name, rng.integers(-128, 128, (nb, 32)), sign * jitter * std / 74)
    if type_name in ("Q4_1", "Q5_1"):
        top = 15 if type_name == "Q4_1" else 31
        d = _f16(jitter * std / (top / 3.46)).astype(F32)
        m = -d * top / 2 + rng.normal(0, 0.1 * std, nb)
        return encode_blocks(type_name, rng.integers(0, top + 1, (nb, 32)), d, m)
    if type_name in ("Q4_K", "Q5_K"):
        top = 15 if type_name == "Q4_K" else 31
        sc = rng.integers(0, 64, (nb, 8))
        sc[:, 0] = rng.integers(32, 64, nb)   # every block uses the high bits of some 6-bit fields
        # d * sc * q has std about std for the average sc (31.5); dmin * mn centres each sub-block
        d = jitter * std / (31.5 * top / 3.46)
        dmin = d * 8.0 if top == 15 else d * 16.0
        mn = np.clip(np.rint(sc * (top / 2) * d[:, None] / dmin[:, None]), 0, 63).astype(np.int64)
        return encode_blocks(type_name, rng.integers(0, top + 1, (nb, 256)), d, dmin, sc, mn)
    if type_name == "Q6_K":
        sc = rng.integers(-128, 128, (nb, 16))
        return encode_blocks(type_name, rng.integers(0, 64, (nb, 256)), sign * jitter * std / (74 * 18.5), sc=sc)
    raise ValueError(f"type {type_name}")


def quant_tensor(type_name, rows, cols, rng, std=0.1):
    """(raw bytes [rows * cols / elems, block_bytes], exact float32 values [rows, cols]) of a random tensor."""
    if type_name in ("F32", "F16"):
        v = (rng.standard_normal((rows, cols)) * std).astype(F32)
        if type_name == "F16":
            h = _f16(v)
            return h, h.astype(F32)
        return v, v
    elems = BLOCK[GGUF_TYPES[type_name]][0]
    if cols % elems:
        raise ValueError(f"{type_name}: {cols} columns are not a multiple of {elems}")
    raw = random_blocks(type_name, rows * cols // elems, rng, std)
    return raw, decode_blocks(type_name, raw).reshape(rows, cols)


GGUF_SHAPE = dict(vocab=96, hidden=256, ffn=512, layers=2, heads=4, kv=2)   # K-quants need rows of 256
GGUF_ROLES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
# like llama.cpp's Q4_K_M: Q4_K with Q6_K for attn_v and ffn_down in some layers (here layer 0, not layer 1),
# a Q6_K output and a Q4_K token embedding; "N.role" keys override a role in layer N
Q4_K_M = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q4_K", "ffn_gate": "Q4_K",
          "ffn_up": "Q4_K", "ffn_down": "Q6_K", "1.attn_v": "Q4_K", "1.ffn_down": "Q4_K", "output": "Q6_K",
          "token_embd": "Q4_K"}


def write_quant_gguf(path, types=None, ref_path=None, seed=0, tied=False, **shape):
    """A tiny llama GGUF whose tensors have the ggml types in `types` ({role: type name}; roles: attn_q,
    attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, token_embd, output, and "N.role" for layer N
    only; a plain type name means all seven linear roles; missing roles are F32), and its float reference `ref_path` (default path with
    "-ref.gguf"): the same file with every tensor F32 holding the exact values. Returns (path, ref_path)."""
    if isinstance(types, str):
        types = {r: types for r in GGUF_ROLES}
    types = dict(types or {})
    s = dict(GGUF_SHAPE, **shape)
    D, F, V, H, KV = s["hidden"], s["ffn"], s["vocab"], s["heads"], s["kv"]
    hd = D // H
    rng = np.random.default_rng(seed)
    meta = [("general.architecture", "llama", T.STRING), ("general.name", "quant-fixture", T.STRING),
            ("llama.block_count", s["layers"], T.UINT32), ("llama.context_length", 128, T.UINT32),
            ("llama.embedding_length", D, T.UINT32), ("llama.feed_forward_length", F, T.UINT32),
            ("llama.attention.head_count", H, T.UINT32), ("llama.attention.head_count_kv", KV, T.UINT32),
            ("llama.attention.layer_norm_rms_epsilon", 1e-5, T.FLOAT32), ("llama.rope.freq_base", 10000.0, T.FLOAT32),
            ("tokenizer.ggml.bos_token_id", 1, T.UINT32), ("tokenizer.ggml.eos_token_id", 2, T.UINT32)]
    wq, wr = GGUFWriter(), GGUFWriter()
    for k, v, t in meta:
        wq.add(k, v, t)
        wr.add(k, v, t)

    def tensor(name, role, rows, cols, std, layer=None):
        ty = types.get(f"{layer}.{role}", types.get(role, "F32"))
        raw, val = quant_tensor(ty, rows, cols, rng, std)
        ne = [cols, rows]
        wq.add_tensor(name, raw, GGUF_TYPES[ty], ne)
        wr.add_tensor(name, val.astype(F32), GGML.F32, ne)

    def norm(name):
        raw = (1 + rng.standard_normal(D) * 0.1).astype(F32)
        wq.add_tensor(name, raw, GGML.F32, [D])
        wr.add_tensor(name, raw, GGML.F32, [D])

    tensor("token_embd.weight", "token_embd", V, D, 1.0)
    norm("output_norm.weight")
    if not tied:
        tensor("output.weight", "output", V, D, 0.3)
    dims = {"attn_q": (H * hd, D), "attn_k": (KV * hd, D), "attn_v": (KV * hd, D), "attn_output": (D, H * hd),
            "ffn_gate": (F, D), "ffn_up": (F, D), "ffn_down": (D, F)}
    for i in range(s["layers"]):
        for role in ("attn_norm",) + GGUF_ROLES[:4] + ("ffn_norm",) + GGUF_ROLES[4:]:
            if role.endswith("norm"):
                norm(f"blk.{i}.{role}.weight")
            else:
                rows, cols = dims[role]
                tensor(f"blk.{i}.{role}.weight", role, rows, cols, 0.15 if role != "ffn_down" else 0.1, i)
    ref_path = ref_path or (str(path)[:-5] if str(path).endswith(".gguf") else str(path)) + "-ref.gguf"
    wq.write(str(path))
    wr.write(str(ref_path))
    return str(path), str(ref_path)


# ================================================================================================
# the fixture set (tests/test_quant_checkpoints.py and tests/fixtures/make_quant_fixtures.py)
# ================================================================================================

# id -> (kind, arguments). GPTQ ids: bits, group, sym / asym, v1 / v2, act-order; the tiny models have
# in_features 128 (256 for down_proj), so g128 is one group for most layers and two for down_proj.
CASES = {
    "gptq-4b-g32-sym-v1": ("gptq", dict(cfg={"bits": 4, "group_size": 32, "sym": True}, tool="gptqmodel")),
    "gptq-4b-g32-asym-v1-actorder": ("gptq", dict(cfg={"bits": 4, "group_size": 32, "sym": False, "desc_act": True},
                                                  tool="autogptq", seed=1)),
    "gptq-4b-g64-asym-v2-qwen2": ("gptq", dict(cfg={"bits": 4, "group_size": 64, "sym": False,
                                                    "checkpoint_format": "gptq_v2"}, arch="qwen2", seed=2)),
    "gptq-4b-g16-sym-actorder-qwen2": ("gptq", dict(cfg={"bits": 4, "group_size": 16, "desc_act": True},
                                                    arch="qwen2", tool="transformers", seed=3)),
    "gptq-8b-g128-sym-v1": ("gptq", dict(cfg={"bits": 8, "group_size": 128}, tool="autogptq", seed=4)),
    "gptq-4b-g32-asym-no-g_idx": ("gptq", dict(cfg={"bits": 4, "group_size": 32, "sym": False}, g_idx=False,
                                               seed=12)),
    "gptq-4b-g128-sym-old-autogptq": ("gptq", dict(cfg={"bits": 4, "group_size": 128}, tool="autogptq-0.6", seed=11)),
    "gptq-8b-gall-asym-v2-actorder": ("gptq", dict(cfg={"bits": 8, "group_size": -1, "sym": False, "desc_act": True,
                                                        "checkpoint_format": "gptq_v2"}, seed=5)),
    "gptq-4b-g32-asym-lmhead-sharded": ("gptq", dict(cfg={"bits": 4, "group_size": 32, "sym": False,
                                                          "lm_head": True}, files=3, seed=6)),
    "awq-g32": ("awq", dict(group_size=32, seed=7)),
    "awq-g64-qwen2": ("awq", dict(group_size=64, arch="qwen2", seed=8)),
    "awq-g128-not-converted": ("awq", dict(group_size=128, modules_to_not_convert=["model.layers.1.mlp"], seed=9)),
    "awq-gall-sharded": ("awq", dict(group_size=-1, files=2, seed=10)),
}
for _t in ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K"):
    CASES[f"gguf-{_t}"] = ("gguf", dict(types=_t, seed=20 + len(CASES)))
CASES["gguf-Q4_K_M"] = ("gguf", dict(types=Q4_K_M, seed=40))                         # q/k Q4_K, v Q6_K, ...
CASES["gguf-Q8_0-embed-tied"] = ("gguf", dict(types=dict({r: "Q4_1" for r in GGUF_ROLES}, token_embd="Q8_0"),
                                              tied=True, seed=41))                    # like the demo model
CASES["gguf-mixed-all"] = ("gguf", dict(types={"attn_q": "Q4_0", "attn_k": "Q5_1", "attn_v": "Q8_0",
                                               "attn_output": "Q5_K", "ffn_gate": "Q4_1", "ffn_up": "Q6_K",
                                               "ffn_down": "Q5_0", "output": "Q4_K"}, seed=42))


def write_case(case_id, out_dir):
    """Write fixture `case_id` (a key of CASES) under out_dir; returns (quantised path, float reference path)."""
    kind, kw = CASES[case_id]
    kw = dict(kw)
    base = os.path.join(str(out_dir), case_id)
    if kind == "gptq":
        cfg = kw.pop("cfg")
        return write_gptq_checkpoint(base, cfg, **kw)
    if kind == "awq":
        return write_awq_checkpoint(base, **kw)
    return write_quant_gguf(base + ".gguf", **kw)
