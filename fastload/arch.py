"""Architectures as data.

Each supported Hugging Face architecture is one row of ARCHITECTURES: how its config.json maps
onto the core's numeric config, which checkpoint tensor fills which weight slot (Hugging Face
names and llama.cpp GGUF names), and the flags that differ (q/k/v biases, Qwen3's per-head q/k RMSNorm,
sliding window, GGUF's rotary row permutation). The C forward pass is the same for all of them.
"""
from __future__ import annotations

import math

from dataclasses import dataclass, field

from . import _C
from . import checks

SLOT = _C.SLOTS  # slot name -> int, from csrc/fl_model.h

ROPE_TYPES = {"default": 0, "linear": 1, "llama3": 2, "yarn": 3, "dynamic": 4}

# Hugging Face tensor names: (slot, per-layer?) -> name template
HF_GLOBAL = {
    "embed_tokens": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
HF_LAYER = {
    "input_layernorm": "model.layers.{i}.input_layernorm.weight",
    "q_proj": "model.layers.{i}.self_attn.q_proj.weight",
    "k_proj": "model.layers.{i}.self_attn.k_proj.weight",
    "v_proj": "model.layers.{i}.self_attn.v_proj.weight",
    "q_proj.bias": "model.layers.{i}.self_attn.q_proj.bias",
    "k_proj.bias": "model.layers.{i}.self_attn.k_proj.bias",
    "v_proj.bias": "model.layers.{i}.self_attn.v_proj.bias",
    "q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "o_proj": "model.layers.{i}.self_attn.o_proj.weight",
    "post_attention_layernorm": "model.layers.{i}.post_attention_layernorm.weight",
    "gate_proj": "model.layers.{i}.mlp.gate_proj.weight",
    "up_proj": "model.layers.{i}.mlp.up_proj.weight",
    "down_proj": "model.layers.{i}.mlp.down_proj.weight",
}
GGUF_GLOBAL = {"embed_tokens": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight"}
GGUF_LAYER = {
    "input_layernorm": "blk.{i}.attn_norm.weight",
    "q_proj": "blk.{i}.attn_q.weight", "k_proj": "blk.{i}.attn_k.weight", "v_proj": "blk.{i}.attn_v.weight",
    "q_proj.bias": "blk.{i}.attn_q.bias", "k_proj.bias": "blk.{i}.attn_k.bias", "v_proj.bias": "blk.{i}.attn_v.bias",
    "q_norm": "blk.{i}.attn_q_norm.weight", "k_norm": "blk.{i}.attn_k_norm.weight",
    "o_proj": "blk.{i}.attn_output.weight",
    "post_attention_layernorm": "blk.{i}.ffn_norm.weight",
    "gate_proj": "blk.{i}.ffn_gate.weight", "up_proj": "blk.{i}.ffn_up.weight", "down_proj": "blk.{i}.ffn_down.weight",
}
# ChatGLM2 / ChatGLM3 (THUDM's modeling_chatglm.py): q|k|v and gate|up are stored fused, filling the core's
# fused weights whole (slots "query_key_value", "dense_h_to_4h"); no separate names for the parts.
GLM_GLOBAL = {
    "embed_tokens": "transformer.embedding.word_embeddings.weight",
    "final_norm": "transformer.encoder.final_layernorm.weight",
    "lm_head": "transformer.output_layer.weight",
}
GLM_LAYER = {
    "input_layernorm": "transformer.encoder.layers.{i}.input_layernorm.weight",
    "query_key_value": "transformer.encoder.layers.{i}.self_attention.query_key_value.weight",  # [q | k | v] rows
    "query_key_value.bias": "transformer.encoder.layers.{i}.self_attention.query_key_value.bias",
    "o_proj": "transformer.encoder.layers.{i}.self_attention.dense.weight",
    "post_attention_layernorm": "transformer.encoder.layers.{i}.post_attention_layernorm.weight",
    "dense_h_to_4h": "transformer.encoder.layers.{i}.mlp.dense_h_to_4h.weight",  # [gate | up] rows: silu(first) * second
    "down_proj": "transformer.encoder.layers.{i}.mlp.dense_4h_to_h.weight",
}
HF_NAMES = {"hf": (HF_GLOBAL, HF_LAYER), "chatglm": (GLM_GLOBAL, GLM_LAYER)}


@dataclass(frozen=True)
class MoE:
    """A Mixture-of-Experts FFN as data: config keys and checkpoint names. Two checkpoint layouts are read: the
    hub's per-expert tensors ({j}: the expert) and transformers 5's fused 3-D ones (experts.gate_up_proj
    [E, 2*ffn, hidden], gate rows then up rows per expert; experts.down_proj [E, hidden, ffn])."""
    experts_keys: tuple          # config keys of the number of experts, first present wins
    ffn_key: str                 # each expert's intermediate size
    norm_key: str | None         # config key of "renormalise the top-k weights"; None: always (Mixtral)
    router: tuple                # router weight [E, hidden], candidate names (first present wins)
    w1: str                      # per-expert gate [ffn, hidden]
    w3: str                      # per-expert up [ffn, hidden]
    w2: str                      # per-expert down [hidden, ffn]
    fused_gate_up: str           # transformers 5's fused [E, 2*ffn, hidden]
    fused_down: str              # transformers 5's fused [E, hidden, ffn]
    # transformers' config-class defaults where config.json leaves a key out (MixtralConfig 8 / 2 / 14336,
    # Qwen3MoeConfig 128 / 8 / 768), as every other key takes its class default
    default_experts: int = 8
    default_topk: int = 2
    default_ffn: int = 14336


MIXTRAL_MOE = MoE(
    experts_keys=("num_local_experts", "num_experts"), ffn_key="intermediate_size", norm_key=None,
    router=("model.layers.{i}.block_sparse_moe.gate.weight", "model.layers.{i}.mlp.gate.weight"),
    w1="model.layers.{i}.block_sparse_moe.experts.{j}.w1.weight",
    w3="model.layers.{i}.block_sparse_moe.experts.{j}.w3.weight",
    w2="model.layers.{i}.block_sparse_moe.experts.{j}.w2.weight",
    fused_gate_up="model.layers.{i}.mlp.experts.gate_up_proj", fused_down="model.layers.{i}.mlp.experts.down_proj")
QWEN_MOE = MoE(
    experts_keys=("num_experts", "num_local_experts"), ffn_key="moe_intermediate_size", norm_key="norm_topk_prob",
    router=("model.layers.{i}.mlp.gate.weight",),
    w1="model.layers.{i}.mlp.experts.{j}.gate_proj.weight", w3="model.layers.{i}.mlp.experts.{j}.up_proj.weight",
    w2="model.layers.{i}.mlp.experts.{j}.down_proj.weight",
    fused_gate_up="model.layers.{i}.mlp.experts.gate_up_proj", fused_down="model.layers.{i}.mlp.experts.down_proj",
    default_experts=128, default_topk=8, default_ffn=768)
MOE_SLOTS = ("moe_router", "moe_w1", "moe_w3", "moe_w2", "moe_gate_up_proj", "moe_down_proj")
DENSE_FFN_SLOTS = ("gate_proj", "up_proj", "down_proj")

# Checkpoint tensors that carry nothing the model needs (recomputed buffers).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_pos_emb.inv_freq")


@dataclass(frozen=True)
class Arch:
    name: str                    # Hugging Face architecture class
    model_type: str              # config.json "model_type"
    gguf_arch: str               # GGUF general.architecture
    qkv_bias: bool = False       # q/k/v projections carry biases (Qwen2)
    qk_norm: bool = False        # RMSNorm over each head of q and of k before rope, weights [head_dim] (Qwen3)
    default_head_dim: int = 0    # head_dim when config.json has none (transformers' Qwen3Config: 128); 0: hidden / heads
    # "none" | "all" (Mistral: sliding_window on every layer) | "qwen2" (when use_sliding_window: layer_types, else
    # the layers from max_window_layers on) | "all_if_use" (Qwen3-MoE: every layer when use_sliding_window)
    sliding: str = "none"
    # transformers' config-class defaults where a key is absent: rms_norm_eps, sliding_window (Mistral 4096; Qwen2 /
    # Qwen3 / Qwen3-MoE 4096, used when use_sliding_window; an explicit null is no window), max_window_layers
    # ("qwen2": Qwen2Config / Qwen3Config 28)
    default_rms_eps: float = 1e-6
    default_window: int = 0
    default_max_window_layers: int = 28
    # more class defaults (transformers 5.25): num_key_value_heads when the key is absent (0: num_attention_heads; an
    # explicit null is num_attention_heads in every class), rope_theta, and max_position_embeddings where rope
    # scaling derives a length from it (llama3's and yarn's original length, dynamic's start)
    default_kv_heads: int = 0
    default_rope_theta: float = 10000.0
    default_max_pos: int = 2048
    gguf_permute_qk: bool = True # llama.cpp permutes q/k rows for its rotary layout (llama arch)
    names: str = "hf"            # HF_NAMES key: the checkpoint's tensor names
    qkv_bias_key: str = ""       # config key that turns the q/k/v biases on (ChatGLM: add_qkv_bias)
    rope_half: bool = False      # rotary on the first half of each head only (ChatGLM), the rest passes through
    rope_interleaved: bool = False  # rotary pairs (2i, 2i + 1) instead of rotate-half (ChatGLM)
    rope_round: bool = False     # cos / sin rounded to the model dtype before use (ChatGLM's rope cache)
    # config fields this architecture understands; anything else that changes results raises.
    extra_ok: tuple = field(default_factory=tuple)
    moe: MoE | None = None       # Mixture-of-Experts FFN on every layer (Mixtral, Qwen3-MoE); None: dense
    # bias switches the transformers class reads (true: refused, no such biases here); classes that hard-code their
    # biases (Qwen2's q/k/v, none for Mistral / Mixtral) ignore these keys, and so does fastload
    bias_keys: tuple = ()


ARCHITECTURES = {
    "LlamaForCausalLM": Arch("LlamaForCausalLM", "llama", "llama", bias_keys=("attention_bias", "mlp_bias")),
    # Mistral: sliding_window on every layer, or per layer_types where a config has them (transformers reads such a
    # config as Ministral's)
    "MistralForCausalLM": Arch("MistralForCausalLM", "mistral", "llama", sliding="all", default_window=4096,
                               default_kv_heads=8, default_max_pos=131072),
    "Qwen2ForCausalLM": Arch("Qwen2ForCausalLM", "qwen2", "qwen2", qkv_bias=True, sliding="qwen2", gguf_permute_qk=False,
                             default_window=4096, default_kv_heads=32, default_max_pos=32768),
    # Qwen3 dense: Qwen2 without the q/k/v biases (attention_bias, default false, would also put one on o_proj: not
    # supported), plus q_norm / k_norm; its sliding-window keys are Qwen2's
    "Qwen3ForCausalLM": Arch("Qwen3ForCausalLM", "qwen3", "qwen3", qk_norm=True, sliding="qwen2", gguf_permute_qk=False,
                             default_head_dim=128, default_window=4096, default_kv_heads=32, default_max_pos=32768,
                             bias_keys=("attention_bias",)),
    # ChatGLM2-6B / ChatGLM3-6B (and their -32k / -128k): multi-query groups, fused q|k|v with bias, fused gate|up,
    # rotary on the first half of each head in interleaved pairs with the cos / sin cache in the model dtype;
    # config.json in THUDM's own keys, read through chatglm_view
    "ChatGLMModel": Arch("ChatGLMModel", "chatglm", "", gguf_permute_qk=False, names="chatglm",
                         qkv_bias_key="add_qkv_bias", rope_half=True, rope_interleaved=True, rope_round=True),
    # Mixtral: Mistral's attention (sliding_window when set; the released checkpoints have null) and a top-k routed
    # SwiGLU Mixture of Experts on every layer, top-k weights always renormalised
    "MixtralForCausalLM": Arch("MixtralForCausalLM", "mixtral", "llama", sliding="all", moe=MIXTRAL_MOE,
                               default_rms_eps=1e-5, default_kv_heads=8, default_rope_theta=1e6, default_max_pos=131072),
    # Qwen3-MoE: Qwen3's attention (q_norm / k_norm) and routed experts, renormalised when norm_topk_prob; every
    # layer sparse only (decoder_sparse_step 1, no mlp_only_layers), no shared expert; use_sliding_window slides every
    # layer (transformers' Qwen3MoeConfig has no max_window_layers nor layer_types: the released configs' keys are
    # not read there); no head_dim default of its own (its attention takes hidden / heads when the key is absent;
    # the released configs say 128)
    "Qwen3MoeForCausalLM": Arch("Qwen3MoeForCausalLM", "qwen3_moe", "qwen3moe", qk_norm=True, sliding="all_if_use",
                                gguf_permute_qk=False, default_window=4096, moe=QWEN_MOE, default_kv_heads=4,
                                default_max_pos=32768, bias_keys=("attention_bias",)),
}
GGUF_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


# THUDM's ChatGLMConfig keys (configuration_chatglm.py), checked before chatglm_view reads them
CHATGLM_CONFIG = (
    checks._pos("num_layers", checks.MAX_LAYERS), checks._pos("padded_vocab_size", checks.MAX_VOCAB),
    checks._pos("ffn_hidden_size", checks.MAX_FFN), checks._pos("kv_channels", checks.MAX_HEAD_DIM),
    checks._pos("multi_query_group_num", checks.MAX_HEADS), checks._pos("seq_length", checks.INT32_MAX),
    checks.Key("layernorm_epsilon", "float", 0, 1, lo_open=True, hi_open=True), checks._finite_pos("rope_ratio"),
    checks.Key("multi_query_attention", "bool"), checks.Key("add_qkv_bias", "bool"), checks.Key("add_bias_linear", "bool"),
    checks.Key("rmsnorm", "bool"), checks.Key("apply_residual_connection_post_layernorm", "bool"),
    checks.Key("post_layer_norm", "bool"), checks.Key("quantization_bit", "int", 0, 64),
    checks.Key("pre_seq_len", "int", 0, checks.INT32_MAX),
)
# ChatGLM key -> the Hugging Face key chatglm_view fills from it (for messages: both name the same number)
CHATGLM_KEYS = {"num_layers": "num_hidden_layers", "padded_vocab_size": "vocab_size",
                "ffn_hidden_size": "intermediate_size", "kv_channels": "head_dim",
                "multi_query_group_num": "num_key_value_heads", "layernorm_epsilon": "rms_norm_eps",
                "seq_length": "max_position_embeddings", "rope_ratio": "rope_theta"}


def is_chatglm(config) -> bool:
    names = config.get("architectures") if isinstance(config, dict) else None
    return isinstance(config, dict) and (config.get("model_type") == "chatglm" or
                                         (isinstance(names, list) and "ChatGLMModel" in names))


def chatglm_overrides(overrides: dict, where: str) -> dict:
    """from_pretrained's config arguments for a ChatGLM config.json, in THUDM's keys (chatglm_view reads those, so a
    Hugging Face name given as an argument would be thrown away): max_position_embeddings -> seq_length, rope_theta
    -> rope_ratio (theta / 10000), the other renamed keys likewise. Rope scaling has no ChatGLM form: refused."""
    out = {}
    back = {hf: thudm for thudm, hf in CHATGLM_KEYS.items()}
    for k, v in overrides.items():
        if k in ("rope_scaling", "rope_parameters") and v:
            raise NotImplementedError(f"{where}: {k}= is not supported for ChatGLMModel (its rotary embedding has no "
                                      "scaling here; rope_ratio= sets its base, 10000 x rope_ratio)")
        if k == "rope_theta" and v is not None:
            out["rope_ratio"] = float(v) / 10000.0
        elif k in back and k != "rope_theta":
            out[back[k]] = v
        else:
            out[k] = v
    return out


def chatglm_view(config: dict, where: str) -> dict:
    """A ChatGLM2 / ChatGLM3 config.json (THUDM's keys) with the Hugging Face keys the core config is read from added
    (num_hidden_layers = num_layers, vocab_size = padded_vocab_size, intermediate_size = ffn_hidden_size,
    head_dim = kv_channels, num_key_value_heads = multi_query_group_num when multi_query_attention else the heads,
    rms_norm_eps = layernorm_epsilon, max_position_embeddings = seq_length, rope_theta = 10000 x rope_ratio); other
    configs unchanged. THUDM's keys win over Hugging Face ones the file may also hold. Variants whose forward differs
    (LayerNorm, post-layernorm residuals, biases on every linear, p-tuning prefixes, THUDM's int4 / int8 weights, the
    first ChatGLM-6B) raise NotImplementedError naming the key."""
    if not is_chatglm(config):
        return config
    checks.check(config, CHATGLM_CONFIG, where)
    if config.get("padded_vocab_size") is None or config.get("position_encoding_2d"):
        raise NotImplementedError(f"{where}: the first ChatGLM-6B (2D positions, GLM blank infilling) is not supported; "
                                  "ChatGLM2-6B and ChatGLM3-6B are")
    unsupported = [("rmsnorm", False, "LayerNorm instead of RMSNorm"),
                   ("apply_residual_connection_post_layernorm", True, "residuals taken after the layer norms"),
                   ("post_layer_norm", False, "no final layer norm"),
                   ("add_bias_linear", True, "biases on every linear layer")]
    for key, bad, what in unsupported:
        if config.get(key) is not None and bool(config[key]) == bad:
            raise NotImplementedError(f"{where}: {key}={str(bad).lower()} ({what}) is not supported for ChatGLMModel")
    if config.get("quantization_bit"):
        raise NotImplementedError(f"{where}: quantization_bit={config['quantization_bit']} (THUDM's own int4 / int8 "
                                  "weights) is not supported; load the float checkpoint (quantise at load with "
                                  "load_in_8bit / load_in_4bit)")
    if config.get("pre_seq_len"):
        raise NotImplementedError(f"{where}: pre_seq_len={config['pre_seq_len']} (a P-Tuning v2 prefix encoder) is not "
                                  "supported for ChatGLMModel")
    need = [k for k in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size") if config.get(k) is None]
    if need:
        raise checks.CheckpointError(f"{where}: ChatGLM config is missing '{need[0]}'")
    heads = config["num_attention_heads"]
    out = dict(config)
    out.update({
        "vocab_size": config["padded_vocab_size"], "num_hidden_layers": config["num_layers"],
        "intermediate_size": config["ffn_hidden_size"],
        "head_dim": config.get("kv_channels") or None,
        "num_key_value_heads": (config.get("multi_query_group_num") or 1) if config.get("multi_query_attention") else heads,
        "rms_norm_eps": _get(config, "layernorm_epsilon", 1e-5),
        "max_position_embeddings": _get(config, "seq_length", 2048),
        "rope_theta": 10000.0 * float(_get(config, "rope_ratio", 1.0)),
        "tie_word_embeddings": False, "hidden_act": "silu",
    })
    for k in ("rope_scaling", "rope_parameters"):
        out.pop(k, None)  # ChatGLM's rotary has no scaling block; rope_ratio is its only knob
    return out


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))


def arch_for(config: dict, where: str) -> Arch:
    checks.check(config, [k for k in checks.CONFIG if k.name in ("architectures", "model_type")], where)
    names = config.get("architectures") or []
    for n in names:
        if n in ARCHITECTURES:
            return ARCHITECTURES[n]
    mt = config.get("model_type")
    for a in ARCHITECTURES.values():
        if mt == a.model_type and not names:
            return a
    raise NotImplementedError(
        f"{where}: architecture {[n[:60] for n in names[:8]] or (mt[:60] if mt else mt)!r} is not supported; supported: {supported()}")


def _get(d: dict, k: str, default):
    """d[k], or default where the key is absent or null (as transformers treats None)."""
    v = d.get(k)
    return default if v is None else v


def _rope(config: dict, where: str, arch: "Arch | None" = None):
    """(theta, type, factor, low, high, orig_max, attention_factor) from rope_theta/rope_scaling (transformers 4) or
    rope_parameters (transformers 5). Types and ranges were checked by checks.check_config. llama3: low / high are its
    frequency factors; yarn: the correction range (dimensions) and the attention factor, computed as transformers'
    _compute_yarn_parameters does (modeling_rope_utils.py), in double precision as it does in Python."""
    params = config.get("rope_parameters")
    scaling = config.get("rope_scaling")
    if isinstance(params, dict) and params and all(isinstance(v, dict) for v in params.values()):
        # transformers 5's rope parameters per layer type ({"full_attention": {...}, "sliding_attention": {...}})
        kinds = list(params.values())
        if any(k != kinds[0] for k in kinds[1:]):
            raise NotImplementedError(f"{where}: rope_parameters that differ by layer type ({', '.join(map(str, params))}) "
                                      "are not supported")
        params = kinds[0]
    default_theta = arch.default_rope_theta if arch else 10000.0
    default_max = arch.default_max_pos if arch else 2048
    theta = config.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
    # transformers 5 (convert_rope_params_to_dict): a non-empty rope_scaling replaces rope_parameters, as when a user
    # adds Qwen's YaRN block to a config.json that a newer transformers saved with rope_parameters. Its rope_theta, if
    # absent, is the model's (top level or rope_parameters), not transformers' bare default.
    if scaling:
        # its own theta, else config.json's top-level one (transformers' order), else rope_parameters'
        theta = scaling.get("rope_theta", config.get("rope_theta", theta))
    elif isinstance(params, dict):
        scaling = params
    if theta is None:
        theta = default_theta  # the config class's (Mixtral 1e6)
    if not scaling:
        return float(theta), 0, 1.0, 1.0, 4.0, 8192, 1.0
    rtype = _get(scaling, "rope_type", _get(scaling, "type", "default"))
    if rtype not in ROPE_TYPES:
        raise NotImplementedError(
            f"{where}: rope scaling type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
    if rtype == "default":
        return float(theta), 0, 1.0, 1.0, 4.0, 8192, 1.0
    if rtype == "yarn":
        return (float(theta), ROPE_TYPES["yarn"]) + yarn_parameters(config, scaling, float(theta), where, default_max)
    for k in ("factor",) + (("low_freq_factor", "high_freq_factor") if rtype == "llama3" else ()):
        if _get(scaling, k, None) is None:  # transformers reads them unguarded (a KeyError there)
            raise checks.CheckpointError(f"{where}: {rtype} rope scaling needs '{k}'")
    factor = float(scaling["factor"])  # present: checked above
    if rtype == "linear":
        return float(theta), 1, factor, 1.0, 4.0, 8192, 1.0
    if rtype == "dynamic":
        # transformers' _compute_dynamic_ntk_parameters: max_position_embeddings is where the frequencies start to
        # change (the core reads it from rope_orig_max_pos); attention_factor 1
        max_pos = config.get("max_position_embeddings") or default_max
        if not isinstance(max_pos, int) or isinstance(max_pos, bool) or not 0 < max_pos <= checks.INT32_MAX:
            raise checks.CheckpointError(f"{where}: dynamic rope scaling needs max_position_embeddings, an integer in "
                                         f"[1, 2^31-1], got {max_pos!r}")
        if _head_dim(config) < 4:
            raise checks.CheckpointError(f"{where}: dynamic rope scaling needs head_dim >= 4 (its exponent is head_dim / "
                                         f"(head_dim - 2)), got {_head_dim(config)}")
        if factor * max_pos > checks.INT32_MAX:
            raise checks.CheckpointError(f"{where}: dynamic rope scaling gives a context of factor x "
                                         f"max_position_embeddings = {factor:g} x {max_pos} tokens, more than 2^31-1")
        return float(theta), ROPE_TYPES["dynamic"], factor, 1.0, 4.0, int(max_pos), 1.0
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    if high <= low:
        raise checks.CheckpointError(f"{where}: rope 'high_freq_factor' must be greater than 'low_freq_factor' "
                                     f"for llama3 rope, got {high:g} <= {low:g}")
    # transformers 5 (standardize_rope_params): a top-level original_max_position_embeddings wins, then the rope
    # dict's, then max_position_embeddings (the config class's default when the config has none of them)
    orig = config.get("original_max_position_embeddings") or _get(scaling, "original_max_position_embeddings", None) \
        or config.get("max_position_embeddings") or default_max
    return float(theta), 2, factor, low, high, int(orig), 1.0


def _head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def kv_heads(config: dict, arch: Arch, n_heads: int | None = None) -> int:
    """num_key_value_heads as transformers reads it: config.json's; null: the attention heads; absent: the config
    class's default (Mistral / Mixtral 8, Qwen2 / Qwen3 32, Qwen3-MoE 4, Llama the attention heads)."""
    n_heads = int(n_heads or config["num_attention_heads"])
    v = config.get("num_key_value_heads")
    if v is not None:
        return int(v)
    return n_heads if "num_key_value_heads" in config else (arch.default_kv_heads or n_heads)


def head_dim(config: dict, arch: Arch) -> int:
    """head_dim as transformers reads it for this architecture: config.json's, else the architecture's default
    (Qwen3: 128), else hidden_size / num_attention_heads."""
    return int(config.get("head_dim") or arch.default_head_dim or config["hidden_size"] // config["num_attention_heads"])


def yarn_parameters(config: dict, scaling: dict, theta: float, where: str, default_max: int = 2048):
    """(factor, low, high, original_max_position_embeddings, attention_factor) of YaRN, as transformers computes them:
    original_max_position_embeddings from the config's top level first (Phi-3 style), then rope_scaling, then
    max_position_embeddings; factor, when absent, max_position_embeddings / that; beta_fast 32, beta_slow 1;
    attention_factor, when absent, 0.1 ln(factor) + 1 (or the mscale / mscale_all_dim ratio DeepSeek configs give);
    the correction range [low, high] of dimensions floored / ceiled unless truncate is false. The kernels take the
    attention factor as a multiplier of the softmax scale: cos and sin both scaled by it make q.k scaled by its square."""
    max_pos = config.get("max_position_embeddings") or default_max  # the config class's where absent
    orig = config.get("original_max_position_embeddings") or _get(scaling, "original_max_position_embeddings", None) \
        or max_pos
    if not orig:
        raise checks.CheckpointError(f"{where}: yarn rope scaling needs original_max_position_embeddings or "
                                     "max_position_embeddings")
    factor = scaling.get("factor")
    if factor is None:
        if not max_pos:
            raise checks.CheckpointError(f"{where}: yarn rope scaling without 'factor' needs max_position_embeddings")
        factor = max_pos / orig
    factor = float(factor)

    def get_mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
    attn = scaling.get("attention_factor")
    if attn is None:
        ms, ms_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attn = get_mscale(factor, ms) / get_mscale(factor, ms_all) if ms and ms_all else get_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1
    dim = _head_dim(config)
    if not theta > 1:
        raise checks.CheckpointError(f"{where}: yarn rope scaling needs rope_theta > 1 (its correction range divides by "
                                     f"log(rope_theta)), got {theta:g}")
    if factor * orig > checks.INT32_MAX:
        raise checks.CheckpointError(f"{where}: yarn rope scaling gives a context of factor x "
                                     f"original_max_position_embeddings = {factor:g} x {orig} tokens, more than 2^31-1")

    def correction_dim(rot):
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))
    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' linear_ramp_factor: no division by zero
    return factor, float(low), float(high), int(orig), float(attn)


def context_length(config: dict, arch: "Arch | None" = None) -> int:
    """Tokens a request may hold: max_position_embeddings, or for YaRN factor x original_max_position_embeddings when
    that is more (Qwen2.5's instructions add YaRN factor 4 and keep max_position_embeddings at 32768). 0: unknown."""
    max_pos = int(config.get("max_position_embeddings") or 0)
    try:
        _, rtype, factor, _, _, orig, _ = _rope(config, "config", arch)
    except Exception:  # reported where the model is built
        return max_pos
    if rtype in (ROPE_TYPES["yarn"], ROPE_TYPES["dynamic"]):
        # dynamic NTK exists to run past max_position_embeddings (transformers sets no limit): factor x that
        return max(max_pos, int(factor * orig))
    return max_pos


def core_config(config: dict, arch: Arch, where: str, names: dict | None = None) -> dict:
    """Translate a Hugging Face config.json dict into the core's numeric config.
    Every value is checked (checks.check_config) before any arithmetic; `names` maps config keys
    to the GGUF metadata keys they came from, for messages.
    Fields that would change results and are not supported raise with the list of what is."""
    checks.check_config(config, where, names)

    def need(k):
        if k not in config or config[k] is None:
            raise checks.CheckpointError(f"{where}: config is missing '{(names or {}).get(k, k)}'")
        return config[k]

    act = _get(config, "hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise NotImplementedError(f"{where}: hidden_act={act[:40]!r} is not supported; supported: silu")
    for k in arch.bias_keys:
        if config.get(k):
            raise NotImplementedError(f"{where}: {k}=true is not supported for {arch.name}")
    n_layers = int(need("num_hidden_layers"))
    n_heads = int(need("num_attention_heads"))
    d = int(need("hidden_size"))
    hd = head_dim({**config, "hidden_size": d, "num_attention_heads": n_heads}, arch)
    rope_dicts = [r for r in (config.get("rope_scaling"), config.get("rope_parameters")) if isinstance(r, dict)]
    prf = next((r["partial_rotary_factor"] for r in rope_dicts if r.get("partial_rotary_factor") is not None),
               _get(config, "partial_rotary_factor", 1.0))  # transformers 5 keeps it in rope_parameters
    if arch.names == "hf" and prf != 1.0:
        raise NotImplementedError(f"{where}: partial_rotary_factor={prf!r} is not supported for {arch.name} (rotary on "
                                  "part of each head: ChatGLM's layout only)")
    # yarn's correction range depends on head_dim: give it the one resolved here
    theta, rtype, factor, low, high, orig, attn = _rope(config if config.get("head_dim") else {**config, "head_dim": hd},
                                                        where, arch)

    window = [0] * n_layers
    sw = config.get("sliding_window") if "sliding_window" in config else arch.default_window
    if arch.sliding == "all" and arch.model_type == "mistral" and config.get("layer_types"):
        # transformers 5 builds a mistral config with layer_types as Ministral: each layer its own kind
        types = config["layer_types"]
        _known_layer_types(types, where, arch)
        window = [int(sw) if sw and t == "sliding_attention" else 0 for t in types]
    elif arch.sliding == "all" and sw:
        window = [int(sw)] * n_layers
    elif arch.sliding == "all_if_use" and sw and config.get("use_sliding_window"):
        window = [int(sw)] * n_layers  # layer_types, if a config has them, are not read (transformers' Qwen3-MoE)
    elif arch.sliding == "qwen2" and sw and config.get("use_sliding_window"):
        types = config.get("layer_types")
        if types:
            _known_layer_types(types, where, arch)
            window = [int(sw) if t == "sliding_attention" else 0 for t in types]
        else:
            mwl = int(_get(config, "max_window_layers", arch.default_max_window_layers))
            window = [int(sw) if i >= mwl else 0 for i in range(n_layers)]
    # arch.sliding "none" (Llama): layer_types are not read, as LlamaModel's causal mask does not read them

    moe = _moe_config(config, arch, where, n_layers) if arch.moe else {}
    return {
        **moe,
        "vocab": int(need("vocab_size")), "d": d, "n_layers": n_layers, "n_heads": n_heads,
        "n_kv_heads": kv_heads(config, arch, n_heads),
        "head_dim": hd,
        "ffn": int(need("intermediate_size")), "max_pos": int(config.get("max_position_embeddings") or 0),
        "rms_eps": float(_get(config, "rms_norm_eps", arch.default_rms_eps)), "rope_theta": theta, "rope_type": rtype,
        "rope_factor": factor, "rope_low_freq_factor": low, "rope_high_freq_factor": high,
        "rope_orig_max_pos": orig, "rope_attn_factor": attn,
        "rope_dims": hd // 2 if arch.rope_half else 0, "rope_interleaved": int(arch.rope_interleaved),
        "rope_round": int(arch.rope_round),
        "qkv_bias": int(arch.qkv_bias or bool(arch.qkv_bias_key and config.get(arch.qkv_bias_key))),
        "qk_norm": int(arch.qk_norm),
        "tie_embeddings": int(_get(config, "tie_word_embeddings", False)), "window": window,
    }


def _moe_config(config: dict, arch: Arch, where: str, n_layers: int) -> dict:
    """The core's Mixture-of-Experts fields from config.json (types and ranges checked by checks.check_config)."""
    m = arch.moe
    ek = next((k for k in m.experts_keys if config.get(k) is not None), m.experts_keys[0])
    E = int(config.get(ek, m.default_experts))
    k = config.get("num_experts_per_tok")
    if k is None:
        k = m.default_topk
    if not 1 <= k <= min(E, checks.MAX_TOPK):
        raise checks.CheckpointError(f"{where}: 'num_experts_per_tok' must be in [1, min({ek}={E}, {checks.MAX_TOPK})], "
                                     f"got {k}")
    ffn = config.get(m.ffn_key)
    if ffn is None:
        ffn = m.default_ffn
    for key in ("shared_expert_intermediate_size",):
        if config.get(key):
            raise NotImplementedError(f"{where}: {key} (a shared expert) is not supported for {arch.name}")
    step, only = config.get("decoder_sparse_step"), config.get("mlp_only_layers")
    if step not in (None, 1) or only:  # a step past the layer count: every layer dense, refused the same way
        raise NotImplementedError(f"{where}: dense layers among the expert layers (decoder_sparse_step={step}, "
                                  f"mlp_only_layers={only}) are not supported for {arch.name}")
    norm = True if m.norm_key is None else bool(config.get(m.norm_key, False))
    return {"n_experts": E, "top_k": int(k), "moe_norm_topk": int(norm), "moe_ffn": int(ffn), "shared_ffn": 0}


def _known_layer_types(types, where, arch):
    for t in types:
        if t not in ("full_attention", "sliding_attention", "attention"):  # "attention": transformers' legacy name
            raise NotImplementedError(f"{where}: layer_types entry {t[:40]!r} is not supported for {arch.name}; "
                                      "supported: full_attention, sliding_attention")


def tensor_plan(arch: Arch, cfg: dict, gguf: bool, have=None):
    """[(slot_name, layer, checkpoint tensor name, unpermute_heads, expert)] for every weight the model needs.
    Experts (arch.moe): each layer in the hub's per-expert layout, or in transformers 5's fused one where `have`
    (the checkpoint's tensor names; None: the hub layout) holds that layer's fused gate_up_proj; the router under
    the first of its names present."""
    g, lay = (GGUF_GLOBAL, GGUF_LAYER) if gguf else HF_NAMES[arch.names]
    plan = [("embed_tokens", 0, g["embed_tokens"], 0, 0), ("final_norm", 0, g["final_norm"], 0, 0)]
    if not cfg["tie_embeddings"]:
        plan.append(("lm_head", 0, g["lm_head"], 0, 0))
    for i in range(cfg["n_layers"]):
        for slot, tmpl in lay.items():
            if slot.endswith(".bias") and not cfg["qkv_bias"]:
                continue
            if slot in ("q_norm", "k_norm") and not cfg.get("qk_norm"):
                continue
            if slot in DENSE_FFN_SLOTS and cfg.get("n_experts"):
                continue
            heads = 0
            if gguf and arch.gguf_permute_qk and slot in ("q_proj", "k_proj"):
                heads = cfg["n_heads"] if slot == "q_proj" else cfg["n_kv_heads"]
            plan.append((slot, i, tmpl.format(i=i), heads, 0))
        if cfg.get("n_experts") and not gguf:
            plan.extend(_expert_plan(arch.moe, i, cfg["n_experts"], have))
    return plan


def _expert_plan(m: MoE, i: int, E: int, have):
    router = next((r.format(i=i) for r in m.router if have is not None and r.format(i=i) in have), m.router[0].format(i=i))
    out = [("moe_router", i, router, 0, 0)]
    if have is not None and m.fused_gate_up.format(i=i) in have:
        return out + [("moe_gate_up_proj", i, m.fused_gate_up.format(i=i), 0, 0),
                      ("moe_down_proj", i, m.fused_down.format(i=i), 0, 0)]
    for j in range(E):
        out += [("moe_w1", i, m.w1.format(i=i, j=j), 0, j), ("moe_w3", i, m.w3.format(i=i, j=j), 0, j),
                ("moe_w2", i, m.w2.format(i=i, j=j), 0, j)]
    return out


# GGUF hyperparameters llama.cpp also accepts as one value a layer (get_key_or_arr)
PER_LAYER_KEYS = ("attention.head_count", "attention.head_count_kv", "feed_forward_length")


def gguf_names(ga: str) -> dict:
    """config key -> the GGUF metadata key it is read from, for messages."""
    return {k: f"{ga}.{v}" for k, v in checks.GGUF_KEYS.items()}


def gguf_config(meta: dict, where: str) -> tuple[Arch, dict]:
    """(arch, Hugging Face-style config dict) from GGUF metadata. Values keep the types the file
    gave them; core_config checks them (naming the GGUF keys, see gguf_names) before any arithmetic."""
    ga = meta.get("general.architecture")
    if ga is not None and not isinstance(ga, str):
        raise checks.CheckpointError(f"{where}: 'general.architecture' must be a string, got {checks._got(ga)}")
    if ga not in GGUF_ARCHS:
        raise NotImplementedError(f"{where}: GGUF architecture {ga!r} is not supported; supported: {', '.join(GGUF_ARCHS)}")
    arch = ARCHITECTURES[GGUF_ARCHS[ga]]
    if meta.get(f"{ga}.expert_count"):
        raise NotImplementedError(f"{where}: GGUF Mixture-of-Experts models ({ga}.expert_count="
                                  f"{meta.get(f'{ga}.expert_count')!r}) are not supported; load the safetensors checkpoint")

    def m(k, default=None):
        v = meta.get(f"{ga}.{k}", default)
        if v is None:
            raise checks.CheckpointError(f"{where}: GGUF metadata is missing '{ga}.{k}'")
        if isinstance(v, list) and k in PER_LAYER_KEYS and v:
            # llama.cpp reads these as one value or one a layer (get_key_or_arr): equal values are the one value
            if any(x != v[0] for x in v):
                raise NotImplementedError(f"{where}: '{ga}.{k}' differs between layers ({checks._got(v)}); models "
                                          "whose layers differ in shape are not supported")
            v = v[0]
        return v

    # keys llama.cpp reads for these architectures that would change the model, and fastload does not implement:
    # refused rather than ignored (a bug hunt against llama.cpp found them silently dropped)
    causal = meta.get(f"{ga}.attention.causal")
    if causal is not None and causal != 1:  # True == 1
        raise NotImplementedError(f"{where}: '{ga}.attention.causal' = {causal!r}: bidirectional (non-causal) attention "
                                  "is not supported; fastload runs causal language models")
    af = meta.get(f"{ga}.rope.scaling.attn_factor")
    if af is not None and af != 1:
        raise NotImplementedError(f"{where}: '{ga}.rope.scaling.attn_factor' = {af!r}: scaled rotary embeddings "
                                  "(llama.cpp multiplies cos / sin by it) are not supported; supported: 1.0")

    vocab = meta.get(f"{ga}.vocab_size")
    if vocab is None:
        toks = meta.get("tokenizer.ggml.tokens")
        if toks is not None and not isinstance(toks, list):
            raise checks.CheckpointError(f"{where}: 'tokenizer.ggml.tokens' must be an array, got {checks._got(toks)}")
        vocab = len(toks or [])
    hf = {
        "architectures": [arch.name], "model_type": arch.model_type, "vocab_size": vocab or None,
        "hidden_size": m("embedding_length"), "num_hidden_layers": m("block_count"),
        "num_attention_heads": m("attention.head_count"),
        "num_key_value_heads": m("attention.head_count_kv", meta.get(f"{ga}.attention.head_count")),
        "intermediate_size": m("feed_forward_length"),
        "max_position_embeddings": m("context_length", 2048),
        "rms_norm_eps": m("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": m("rope.freq_base", 10000.0),
        "head_dim": meta.get(f"{ga}.attention.key_length") or None,
        "tie_word_embeddings": False,  # decided by the presence of output.weight (caller)
        "hidden_act": "silu",
    }
    names = gguf_names(ga)
    checks.check_config(hf, where, names)
    if hf["head_dim"] is None and arch.default_head_dim:
        # llama.cpp's default is hidden / heads (transformers' for Qwen3 is 128): say it, so that no later reading of
        # this config (save_pretrained, the engine's page size) takes the config.json default instead
        hf["head_dim"] = int(hf["hidden_size"]) // int(hf["num_attention_heads"])
    rs = meta.get(f"{ga}.rope.scaling.type")
    if rs is not None and not isinstance(rs, str):
        raise checks.CheckpointError(f"{where}: '{ga}.rope.scaling.type' must be a string, got {checks._got(rs)}")
    # llama.cpp (load_hparams): the type defaults to linear; the factor is rope.scaling.factor, else the old key
    # rope.scale_linear; a factor of 0 (or none) is no scaling, and type "none" never scales
    fk = next((f"{ga}.{k}" for k in ("rope.scaling.factor", "rope.scale_linear") if meta.get(f"{ga}.{k}") is not None),
              None)
    if rs is None and fk is not None:
        rs = "linear"
    if rs and rs != "none":
        if rs != "linear":
            raise NotImplementedError(f"{where}: GGUF rope scaling {rs[:40]!r} is not supported; supported: linear")
        factor = meta[fk] if fk else 1.0
        if factor != 0:
            factor = checks.check_value(checks.ROPE[3], factor, where, fk)
            hf["rope_scaling"] = {"rope_type": "linear", "factor": factor}
    sw = meta.get(f"{ga}.attention.sliding_window")
    if sw:
        hf["sliding_window"] = sw
        checks.check_config(hf, where, names)
        if ga == "llama":  # llama.cpp writes Mistral as "llama" + a sliding window: say Mistral in the config too
            arch = ARCHITECTURES["MistralForCausalLM"]
            hf.update(architectures=[arch.name], model_type=arch.model_type)
    return arch, hf


__all__ = ["Arch", "ARCHITECTURES", "arch_for", "chatglm_view", "is_chatglm", "core_config", "head_dim", "tensor_plan",
           "gguf_config", "gguf_names", "supported", "SLOT", "IGNORED_SUFFIXES", "MoE", "MOE_SLOTS"]
