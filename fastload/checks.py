"""One validation of the values a checkpoint's config brings (config.json, generation_config.json,
GGUF metadata), before any arithmetic on them.

A schema is a tuple of Key rows (name, kind, range). check() applies one to a dict: a key that is
absent or None is left alone (the reader's default applies); anything else must have the row's
type and lie in its range, else CheckpointError names the file, the key and the limit. The same
rows serve config.json and the Hugging Face-style config built from GGUF metadata (`names` maps
a config key to the GGUF key it came from, so messages name what is in the file).

The limits are the project's shared ones (the C core's check_config enforces the same numbers).
bool is an int subclass in Python; true/false is refused where a number is wanted, and numbers
are refused where a bool is wanted. Integers are fine for float fields; numeric strings are not.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import _C

CheckpointError = _C.CheckpointError

INT32_MAX = 2**31 - 1
MAX_LAYERS = 1024
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_HIDDEN = 131072
MAX_FFN = 1048576
MAX_VOCAB = 2**24
MAX_EXPERTS = 256       # experts per layer (csrc/fl_backend.h FL_MOE_MAX_EXPERTS)
MAX_TOPK = 16           # experts per token (FL_MOE_MAX_K)


@dataclass(frozen=True)
class Key:
    name: str
    kind: str                 # "int" | "float" | "bool" | "str" | "str_list" | "ids" (int or list of ints) | "dict"
    lo: float | None = None   # inclusive unless lo_open
    hi: float | None = None   # inclusive unless hi_open
    lo_open: bool = False
    hi_open: bool = False


def _pos(name, hi):
    return Key(name, "int", 1, hi)


def _finite_pos(name):
    return Key(name, "float", 0, None, lo_open=True)


# eos may be a list (several stop tokens); bos and pad are one id each, as in transformers
TOKEN_IDS = (Key("eos_token_id", "ids", 0, INT32_MAX), Key("bos_token_id", "int", 0, INT32_MAX),
             Key("pad_token_id", "int", 0, INT32_MAX))

CONFIG = (
    _pos("vocab_size", MAX_VOCAB), _pos("hidden_size", MAX_HIDDEN), _pos("num_hidden_layers", MAX_LAYERS),
    _pos("num_attention_heads", MAX_HEADS), _pos("num_key_value_heads", MAX_HEADS), _pos("head_dim", MAX_HEAD_DIM),
    _pos("intermediate_size", MAX_FFN), _pos("max_position_embeddings", INT32_MAX),
    Key("rms_norm_eps", "float", 0, 1, lo_open=True, hi_open=True), _finite_pos("rope_theta"),
    Key("rope_scaling", "dict"), Key("rope_parameters", "dict"),
    Key("sliding_window", "int", 0, INT32_MAX), Key("use_sliding_window", "bool"),
    Key("max_window_layers", "int", 0, INT32_MAX), Key("layer_types", "str_list"),
    Key("tie_word_embeddings", "bool"), Key("attention_bias", "bool"), Key("mlp_bias", "bool"),
    Key("hidden_act", "str"), Key("architectures", "str_list"), Key("model_type", "str"),
    Key("torch_dtype", "str"), Key("dtype", "str"),
    # Mixture of Experts (Mixtral, Qwen MoE); num_experts_per_tok's upper bound (the number of experts) is checked
    # where the architecture says which key holds that number (arch._moe_config)
    _pos("num_local_experts", MAX_EXPERTS), _pos("num_experts", MAX_EXPERTS), _pos("num_experts_per_tok", MAX_TOPK),
    _pos("moe_intermediate_size", MAX_FFN), Key("norm_topk_prob", "bool"),
    Key("shared_expert_intermediate_size", "int", 0, MAX_FFN), Key("decoder_sparse_step", "int", 1, MAX_LAYERS),
) + TOKEN_IDS

ROPE = (
    Key("rope_type", "str"), Key("type", "str"), _finite_pos("rope_theta"), _finite_pos("factor"),
    _finite_pos("low_freq_factor"), _finite_pos("high_freq_factor"),
    _pos("original_max_position_embeddings", INT32_MAX),
    # yarn's: 0 reads as unset in transformers (`beta_fast or 32`, `if mscale and mscale_all_dim`), as here
    Key("beta_fast", "float", 0, None), Key("beta_slow", "float", 0, None), Key("mscale", "float", 0, None),
    Key("mscale_all_dim", "float", 0, None),
    _finite_pos("attention_factor"), Key("truncate", "bool"),
)

GENERATION = (
    Key("max_length", "int", 0, INT32_MAX), Key("max_new_tokens", "int", 0, INT32_MAX),
    Key("min_length", "int", 0, INT32_MAX), Key("min_new_tokens", "int", 0, INT32_MAX),
    Key("do_sample", "bool"), Key("temperature", "float", 0, None), Key("top_k", "int", 0, INT32_MAX),
    Key("top_p", "float", 0, 1, lo_open=True), Key("repetition_penalty", "float", 0, None, lo_open=True),
    Key("num_beams", "int", 1, INT32_MAX), Key("num_return_sequences", "int", 1, INT32_MAX),
    Key("seed", "int", 0, 2**64 - 1),
) + TOKEN_IDS

# config key -> GGUF metadata key (after "{arch}.") it is read from; see arch.gguf_config
GGUF_KEYS = {
    "hidden_size": "embedding_length", "num_hidden_layers": "block_count",
    "num_attention_heads": "attention.head_count", "num_key_value_heads": "attention.head_count_kv",
    "intermediate_size": "feed_forward_length", "max_position_embeddings": "context_length",
    "rms_norm_eps": "attention.layer_norm_rms_epsilon", "rope_theta": "rope.freq_base",
    "head_dim": "attention.key_length", "vocab_size": "vocab_size", "sliding_window": "attention.sliding_window",
}


def _got(v) -> str:
    """What was found, short: no file content beyond what identifies the problem."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return repr(v) if abs(v) < 10**20 else f"an integer of {v.bit_length()} bits"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return repr(v) if len(v) <= 40 else f"a string of {len(v)} characters"
    if isinstance(v, (list, tuple)):
        return f"a list of {len(v)} item(s)"
    if isinstance(v, dict):
        return "an object"
    return f"a {type(v).__name__}"


def _range(k: Key) -> str:
    if k.kind in ("int", "ids"):
        if k.lo == 1:
            s = "a positive integer"
        elif k.lo == 0:
            s = "an integer >= 0"
        else:
            s = f"an integer >= {k.lo}"
        return s + ((" and" if k.lo != 1 else "") + f" <= {k.hi}" if k.hi is not None else "")
    lo = f"{'>' if k.lo_open else '>='} {k.lo:g}" if k.lo is not None else ""
    hi = f"{'<' if k.hi_open else '<='} {k.hi:g}" if k.hi is not None else ""
    if lo and hi and k.lo_open and k.hi_open:
        return f"a finite number in ({k.lo:g}, {k.hi:g})"
    return "a finite number" + (" " + lo if lo else "") + (" and " + hi if lo and hi else " " + hi if hi else "")


def _fail(where, name, what, v):
    raise CheckpointError(f"{where}: '{name}' must be {what}, got {_got(v)}")


def _int_in(k: Key, v, where, name):
    if not isinstance(v, int) or isinstance(v, bool) or \
            (k.lo is not None and v < k.lo) or (k.hi is not None and v > k.hi):
        _fail(where, name, _range(k), v)


def check_value(k: Key, v, where: str, name: str | None = None):
    """Raise CheckpointError unless v fits the row; return v (floats as float)."""
    name = name or k.name
    if k.kind == "int":
        _int_in(k, v, where, name)
    elif k.kind == "ids":
        if isinstance(v, (list, tuple)):
            if not v:
                _fail(where, name, f"{_range(k)} or a non-empty list of them", v)
            for x in v:
                if not isinstance(x, int) or isinstance(x, bool) or x < k.lo or x > k.hi:
                    _fail(where, name, f"{_range(k)} or a list of them", x)
        else:
            _int_in(k, v, where, name)
    elif k.kind == "float":
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            _fail(where, name, _range(k), v)
        try:
            f = float(v)
        except OverflowError:
            f = math.inf
        if not math.isfinite(f) or (k.lo is not None and (f <= k.lo if k.lo_open else f < k.lo)) or \
                (k.hi is not None and (f >= k.hi if k.hi_open else f > k.hi)):
            _fail(where, name, _range(k), v)
        return f
    elif k.kind == "bool":
        if not isinstance(v, bool):
            _fail(where, name, "true or false", v)
    elif k.kind == "str":
        if not isinstance(v, str):
            _fail(where, name, "a string", v)
    elif k.kind == "str_list":
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            _fail(where, name, "a list of strings", v)
    elif k.kind == "dict":
        if not isinstance(v, dict):
            _fail(where, name, "an object (dict)", v)
    return v


def check(d: dict, schema, where: str, names: dict | None = None, prefix: str = "") -> None:
    """Apply a schema to d: every key present and not None must fit its row. A token id of exactly -1
    is the old "no such token" sentinel (early Llama conversions wrote "pad_token_id": -1): it becomes
    None, i.e. unset, so those checkpoints keep loading; any other negative id is an error."""
    for k in TOKEN_IDS:
        v = d.get(k.name)
        if k in schema and isinstance(v, int) and not isinstance(v, bool) and v == -1:
            d[k.name] = None
    for k in schema:
        v = d.get(k.name)
        if v is not None:
            check_value(k, v, where, (names or {}).get(k.name) or prefix + k.name)


def check_config(config: dict, where: str, names: dict | None = None) -> None:
    """Types and ranges of every field the loader reads, and the relations between them."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}: must hold a JSON object, got {_got(config)}")
    check(config, CONFIG, where, names)
    n = (names or {}).get

    def name(k):
        return n(k) or k
    for rk in ("rope_scaling", "rope_parameters"):
        r = config.get(rk)
        if r:
            check(r, ROPE, where, prefix=f"{rk}.")
    layers, types = config.get("num_hidden_layers"), config.get("layer_types")
    if layers is not None and types is not None and len(types) != layers:
        raise CheckpointError(f"{where}: 'layer_types' must have one entry per layer "
                              f"(num_hidden_layers={layers}), got {len(types)}")
    heads, kv = config.get("num_attention_heads"), config.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise CheckpointError(f"{where}: '{name('num_key_value_heads')}' must divide "
                              f"'{name('num_attention_heads')}' ({heads}), got {kv}")
    d, hd = config.get("hidden_size"), config.get("head_dim")
    if not hd and heads is not None and d is not None:
        if d % heads:
            raise CheckpointError(f"{where}: '{name('num_attention_heads')}' must divide "
                                  f"'{name('hidden_size')}' ({d}) when '{name('head_dim')}' is not given, got {heads}")
        hd = d // heads
    if hd and hd % 2:
        raise CheckpointError(f"{where}: head dimension ('{name('head_dim')}' or hidden_size / heads) must be even "
                              f"(rotary embeddings), got {hd}")


def check_generation(gen: dict, where: str) -> None:
    if not isinstance(gen, dict):
        raise CheckpointError(f"{where}: must hold a JSON object, got {_got(gen)}")
    check(gen, GENERATION, where)
    if gen.get("do_sample") is True and gen.get("temperature") == 0:
        raise CheckpointError(f"{where}: 'temperature' must be > 0 when 'do_sample' is true, got 0")
    if (gen.get("num_return_sequences") or 1) > 1 and gen.get("do_sample") is not True:
        raise CheckpointError(f"{where}: 'num_return_sequences' > 1 needs 'do_sample' true (greedy rows would be "
                              f"identical), got {gen['num_return_sequences']}")
