"""AutoModelForCausalLM: load a checkpoint into the C core and expose transformers' API.

Python only arranges: it reads config.json / GGUF metadata, decides which checkpoint tensor
fills which slot (fastload/arch.py), and hands the opened files to the core, which validates,
converts and places every tensor with the GIL released. forward() and generate() are one call
into the core each (generate calls back per token only to stream and to notice Ctrl-C).
"""
from __future__ import annotations

import copy
import os
import random
import sys
import threading
import time
import traceback
import warnings

import numpy as np

from . import _C
from . import arch as archmod
from . import checks
from . import config as cfgmod
from . import _files
from ._util import AttrDict, is_torch
from .hub import resolve

CheckpointError = _C.CheckpointError

# from_pretrained arguments transformers scripts pass that mean nothing here (accepted, ignored):
IGNORED_LOAD_ARGS = {
    "low_cpu_mem_usage": "loading always streams tensors into one preallocated arena",
    "trust_remote_code": "no remote code is ever run; architectures are built in",
    "attn_implementation": "fastload always uses its own fused attention",
    "use_flash_attention_2": "fastload always uses its own fused attention",
    "use_safetensors": "safetensors is always preferred; pickle checkpoints are refused",
    "token": "only used for hub downloads through huggingface_hub",
    "use_auth_token": "only used for hub downloads through huggingface_hub",
    "force_download": "no downloads besides huggingface_hub's own",
    "resume_download": "no downloads besides huggingface_hub's own",
    "proxies": "no downloads besides huggingface_hub's own",
    "offload_folder": "no offloading: the model lives on one device",
    "offload_state_dict": "no offloading: the model lives on one device",
    "max_memory": "the model lives on one device",
    "_fast_init": "weights are never initialised randomly",
}
_global_rng = random.Random()


def set_seed(seed: int) -> None:
    """Seed the generator used for sampling when generate() gets no explicit `seed`."""
    _global_rng.seed(int(seed))


class Config(AttrDict):
    """config.json as a dict with attribute access (like transformers' PretrainedConfig)."""

    def __setattr__(self, k, v):
        self[k] = v

    def to_dict(self):
        return dict(self)


# Fields of transformers' GenerationConfig that fastload does not implement, with the value that means "off".
# A config or generate() argument that sets one of them to anything else is refused (never silently ignored);
# fields that cannot change greedy/sampling output (cache, compile, assistant and beam-only settings) are accepted.
_UNSUPPORTED_FIELDS = {
    "max_time": None, "stop_strings": None, "use_mtp": False, "min_p": None, "top_h": None,
    "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0, "bad_words_ids": None, "forced_bos_token_id": None, "forced_eos_token_id": None,
    "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
    "sequence_bias": None, "token_healing": False, "guidance_scale": None, "watermarking_config": None,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "penalty_alpha": None, "dola_layers": None,
    "num_beam_groups": 1, "constraints": None, "force_words_ids": None,
}
_HARMLESS_FIELDS = {
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "early_stopping", "length_penalty",
    "diversity_penalty", "renormalize_logits",
    "remove_invalid_values", "encoder_no_repeat_ngram_size", "decoder_start_token_id", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size",
    "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "compile_config",
    "disable_compile", "continuous_batching_config", "low_memory", "prefill_chunk_size",
}
# refused by generate() when set (fastload returns token ids from greedy search or sampling)
_REFUSED_FIELDS = {"num_beams": 1, "return_dict_in_generate": False, "output_scores": False, "output_logits": False,
                   "output_attentions": False, "output_hidden_states": False}
# transformers' bookkeeping entries: never generation settings
_METADATA_FIELDS = ("_from_model_config", "_commit_hash", "_original_object_hash", "transformers_version")


class GenerationConfig(Config):
    """transformers' GenerationConfig as a dict with attribute access. Reading a field nobody set gives the
    global default (DEFAULTS; None for the transformers fields fastload does not implement).

    The object remembers which fields were set explicitly (constructor keywords, `gc.x = v`, `gc["x"] = v`,
    update(), from_pretrained/from_dict): generate() takes exactly those from a config passed to it and keeps the
    model's generation_config (then DEFAULTS) for the rest, as transformers 5 does. transformers decides "not
    set" by comparing with None; fastload's fields read as their defaults, so it tracks the assignments instead:
    a field set to a value equal to the default still wins over the model's value, and a field explicitly set to
    None (e.g. `eos_token_id=None`) means None there too (no eos), where transformers refills it from the model."""

    DEFAULTS = dict(max_length=20, max_new_tokens=None, min_length=0, min_new_tokens=None, do_sample=False,
                    temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, num_beams=1,
                    num_return_sequences=1, eos_token_id=None, pad_token_id=None, bos_token_id=None)
    # every name transformers' GenerationConfig has as an attribute (update() uses these, others are unused)
    FIELDS = frozenset(DEFAULTS) | frozenset(_UNSUPPORTED_FIELDS) | _HARMLESS_FIELDS | frozenset(_REFUSED_FIELDS)

    def __init__(self, **kw):
        dict.__init__(self, self.DEFAULTS)
        object.__setattr__(self, "_set", set())
        for k in _METADATA_FIELDS:
            kw.pop(k, None)
        for k, v in kw.items():  # as transformers' constructor: unknown keys become custom entries
            self[k] = v

    # ---- tracking: every way of writing a field marks it as set
    def __setitem__(self, k, v):
        dict.__setitem__(self, k, v)
        self._set.add(k)

    def __setattr__(self, k, v):
        if k.startswith("_"):
            object.__setattr__(self, k, v)
        else:
            self[k] = v

    def __getattr__(self, k):
        if k.startswith("__"):
            raise AttributeError(k)
        try:
            return self[k]
        except KeyError:
            if k in self.FIELDS:  # a transformers field fastload has no default for: None, as transformers 5
                return None
            raise AttributeError(k) from None

    def __delitem__(self, k):
        dict.__delitem__(self, k)
        self._set.discard(k)
        if k in self.DEFAULTS:  # back to unset: the default reads again
            dict.__setitem__(self, k, self.DEFAULTS[k])

    def __delattr__(self, k):
        try:
            del self[k]
        except KeyError:
            raise AttributeError(k) from None

    def pop(self, k, *default):
        had = k in self
        v = dict.pop(self, k, *default)
        if had:
            self._set.discard(k)
            if k in self.DEFAULTS:
                dict.__setitem__(self, k, self.DEFAULTS[k])
        return v

    def setdefault(self, k, v=None):
        if k not in self:
            self[k] = v
        return self[k]

    def clear(self):
        dict.clear(self)
        dict.update(self, self.DEFAULTS)
        self._set.clear()

    def popitem(self):
        raise TypeError("GenerationConfig.popitem is not supported; use pop(name)")

    def update(self, *args, defaults_only=False, allow_custom_entries=False, **kwargs):
        """transformers' update(**kwargs): sets the given fields that GenerationConfig has (or, with
        allow_custom_entries=True, any name) and returns the unused ones as a dict. defaults_only=True only fills
        fields not set yet. A positional dict (dict.update's form) is taken like keywords, any key accepted."""
        if len(args) > 1:
            raise TypeError(f"update expected at most 1 positional argument, got {len(args)}")
        if args:
            other = args[0]
            items = other.items() if hasattr(other, "items") else other
            for k, v in items:
                if not defaults_only or k not in self._set:
                    self[k] = v
        used = []
        for k, v in kwargs.items():
            if (allow_custom_entries and k not in self.FIELDS and k not in self) or k in self.FIELDS or k in self:
                if not defaults_only or k not in self._set:
                    self[k] = v
                used.append(k)
        return {k: v for k, v in kwargs.items() if k not in used}

    # ---- copies keep what was set
    def copy(self):
        new = type(self).__new__(type(self))
        dict.__init__(new, self)
        object.__setattr__(new, "_set", set(self._set))
        return new

    __copy__ = copy

    def __deepcopy__(self, memo):
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        dict.__init__(new, {k: copy.deepcopy(v, memo) for k, v in self.items()})
        object.__setattr__(new, "_set", set(self._set))
        return new

    def __reduce__(self):
        return (_rebuild_generation_config, (type(self), dict(self), sorted(self._set)))

    # ---- transformers' serialisation API
    def to_dict(self) -> dict:
        """Every field with its value (defaults included), a deep copy."""
        return copy.deepcopy(dict(self))

    def to_diff_dict(self) -> dict:
        """The fields set explicitly (what generate() takes from this object and save_pretrained writes).
        transformers keeps the fields that differ from a default GenerationConfig() instead."""
        return copy.deepcopy({k: v for k, v in self.items() if k in self._set})

    def to_json_string(self, use_diff=True, ignore_metadata=False, keys_to_pop=None) -> str:
        import json
        d = self.to_diff_dict() if use_diff else self.to_dict()
        for k in tuple(keys_to_pop or ()) + (_METADATA_FIELDS if ignore_metadata else ()):
            d.pop(k, None)
        try:
            return json.dumps(_jsonable(d), indent=2, sort_keys=True) + "\n"
        except (TypeError, ValueError) as e:
            raise TypeError(f"GenerationConfig: a value cannot be written as JSON ({e})") from None

    def to_json_file(self, json_file_path, use_diff=True, keys_to_pop=None) -> None:
        text = self.to_json_string(use_diff=use_diff, keys_to_pop=keys_to_pop)
        with open(json_file_path, "w", encoding="utf-8") as f:
            f.write(text)

    def save_pretrained(self, save_directory, config_file_name=None, push_to_hub=False, **kwargs):
        """Writes the explicitly set fields to save_directory/generation_config.json (created if needed)."""
        if push_to_hub:
            raise NotImplementedError("GenerationConfig.save_pretrained: push_to_hub is not supported by fastload")
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"Provided path ({save_directory}) should be a directory, not a file")
        os.makedirs(save_directory, exist_ok=True)
        self.to_json_file(os.path.join(save_directory, config_file_name or "generation_config.json"))

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers' from_dict: config_dict then kwargs (kwargs win; names that are not generation fields
        become custom entries, as there); return_unused_kwargs=True also returns what update() did not use,
        which, as in transformers 5.24, is then empty."""
        if not isinstance(config_dict, dict):
            raise TypeError(f"GenerationConfig.from_dict needs a dict, got {type(config_dict).__name__}")
        return_unused = kwargs.pop("return_unused_kwargs", False)
        kwargs.pop("_from_auto", None)
        kwargs.pop("_from_pipeline", None)
        config = cls(**{**config_dict, **kwargs})
        unused = config.update(**kwargs)
        return (config, unused) if return_unused else config

    def __repr__(self):
        try:
            body = self.to_json_string(use_diff=False)
        except TypeError:
            body = dict.__repr__(self)
        return f"{type(self).__name__} {body}"

    @classmethod
    def from_pretrained(cls, pretrained_model_name, config_file_name=None, cache_dir=None, force_download=False,
                        local_files_only=False, token=None, revision="main", *, proxies=None, subfolder="",
                        trust_remote_code=None, **kwargs):
        """transformers' from_pretrained: a directory, a hub id (found through fastload/hub.py, as the model's
        from_pretrained), a generation_config.json path, or a .gguf file / a directory holding one GGUF and no
        generation_config.json (eos/bos/pad from its tokenizer.ggml.* metadata). Values from a file are checked
        (checks.GENERATION) so that generate() never meets a wrong-typed or out-of-range value; keyword arguments
        that are generation fields override them and return_unused_kwargs=True also returns the others, as
        transformers. token/force_download/proxies/trust_remote_code are accepted and ignored (no remote code,
        downloads only through huggingface_hub)."""
        import errno
        del force_download, token, proxies, trust_remote_code  # accepted, meaningless here
        for k in ("use_auth_token", "resume_download", "_from_auto", "_from_pipeline", "_commit_hash"):
            kwargs.pop(k, None)
        if kwargs.pop("_from_model_config", False):
            raise NotImplementedError("GenerationConfig.from_pretrained: _from_model_config is not supported")
        name = config_file_name or "generation_config.json"
        ref = os.fspath(pretrained_model_name)
        path = os.path.expanduser(ref)
        if os.path.isfile(path):
            shown, real = path, None
        else:
            if not os.path.isdir(path):
                path = resolve(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
            if subfolder:
                _files.check_name(path, subfolder, "subfolder", subdirs=True)
                path = os.path.join(path, subfolder)
            shown, real = os.path.join(path, name), None
            if os.path.isdir(path):
                real = _files.find_file(path, name, subdirs=True)
                if real is None and config_file_name is None:
                    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
                    if len(ggufs) == 1:
                        shown = os.path.join(path, ggufs[0])
                        real = _files.checkpoint_file(path, ggufs[0], "GGUF file")
            if real is None:
                raise OSError(errno.ENOENT, f"{ref} does not appear to have a file named {name}"
                              + (f" (in {path})" if path != ref else ""), shown)
        if real is None:
            real = _files.given_file(shown)
        if shown.endswith(".gguf") or _is_gguf(real):
            d = _gguf_generation_config(_gguf_metadata(real), shown).to_diff_dict()
        else:
            d = cls._read(real, shown)
        d = {k: v for k, v in d.items() if v is not None}  # null in a file: unset (as absent), as transformers
        return cls.from_dict(d, **kwargs)

    @staticmethod
    def _read(real, shown) -> dict:
        """The file's values, checked so that generate() never meets a wrong-typed or out-of-range one."""
        d = _files.read_json(real, shown)
        checks.check_generation(d, shown)
        return d


def _rebuild_generation_config(cls, items, explicit):
    new = cls.__new__(cls)
    dict.__init__(new, items)
    object.__setattr__(new, "_set", set(explicit))
    return new


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic) or is_torch(v):
        return _jsonable(v.tolist())
    return v


_GGUF_GENERATION_KEYS = (("eos_token_id", "tokenizer.ggml.eos_token_id"), ("bos_token_id", "tokenizer.ggml.bos_token_id"),
                         ("pad_token_id", "tokenizer.ggml.padding_token_id"))


def _gguf_generation_config(meta, path) -> GenerationConfig:
    """A GGUF file's generation settings: eos/bos/pad from its tokenizer.ggml.* metadata (checked token ids)."""
    gen = GenerationConfig()
    for k, mk in _GGUF_GENERATION_KEYS:
        if meta.get(mk) is not None:
            gen[k] = checks.check_value(checks.Key(mk, "int", 0, checks.INT32_MAX), meta[mk], path)
    return gen


def _is_gguf(real) -> bool:
    with open(real, "rb") as f:
        return f.read(4) == b"GGUF"


def _gguf_metadata(real) -> dict:
    g = _C.GGUFFile(real)
    try:
        return g.metadata
    finally:
        g.close()


def _explicit(obj, what="generation_config") -> dict:
    """The settings a generation config sets explicitly, as a new dict (lists copied): fastload's
    GenerationConfig (its tracked fields), a dict (every key), or anything with transformers' to_diff_dict()/
    to_dict() (its fields that are not None; None means unset there). Metadata entries are dropped."""
    if obj is None:
        return {}
    if isinstance(obj, GenerationConfig):
        d = {k: v for k, v in obj.items() if k in obj._set}
    elif isinstance(obj, dict):
        d = dict(obj)
    else:
        d = None
        for meth in ("to_diff_dict", "to_dict"):
            f = getattr(obj, meth, None)
            if callable(f):
                d = f()
                break
        if not isinstance(d, dict):
            raise TypeError(f"{what} must be a GenerationConfig (fastload's or transformers') or a dict, "
                            f"got {type(obj).__name__}")
        d = {k: v for k, v in d.items() if v is not None}
    return {k: list(v) if isinstance(v, list) else v for k, v in d.items() if k not in _METADATA_FIELDS}


def _end_streamer(streamer, exc):
    """generate() failed: end the streamer so that a consumer waiting on it never hangs. fastload's streamers
    also carry the exception to the consumer; another streamer (transformers') gets end()."""
    fail = getattr(streamer, "_end_with_error", None)
    try:
        if callable(fail):
            fail(exc)
        else:
            streamer.end()
    except BaseException as e2:  # noqa: BLE001 - the caller must see the original error; note this one on it
        if hasattr(exc, "add_note"):
            exc.add_note(f"(ending the streamer also failed: {e2!r})")


def _int_arg(gc, k, lo, default=None):
    v = gc.get(k)
    if v is None:
        return default
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
        if is_torch(v) and getattr(v, "ndim", 1) == 0 and not v.is_floating_point():
            v = int(v.item())
        else:
            raise TypeError(f"generate: {k} must be an integer, got {v!r}")
    v = int(v)
    if v < lo:
        raise ValueError(f"generate: {k} must be >= {lo}, got {v}")
    return v


def _float_arg(gc, k, default):
    v = gc.get(k)
    if v is None:
        return default
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"generate: {k} must be a number, got {v!r}")
    v = float(v)
    if v != v or v in (float("inf"), float("-inf")):
        raise ValueError(f"generate: {k} must be finite, got {v}")
    return v


def _token_ids(gc, k):
    v = gc.get(k)
    if v is None:
        return []
    if is_torch(v) or isinstance(v, np.ndarray):
        v = v.tolist()
    vals = v if isinstance(v, (list, tuple)) else [v]
    out = []
    for x in vals:
        if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
            raise ValueError(f"generate: {k} must be a token id (an integer >= 0) or a list of them, got {v!r}")
        out.append(int(x))
    return out


def _off(k, v, neutral) -> bool:
    if v is None or v is False or (isinstance(v, (list, tuple, dict, str)) and not v and neutral is None):
        return True
    if k == "guidance_scale" and v == 1:
        return True
    try:
        return bool(v == neutral)
    except Exception:  # noqa: BLE001 - an array or other object: not the neutral value
        return False


def _resolve_settings(gc, layers) -> dict:
    """Checked, typed values of a merged config. `layers` ((name, explicit dict), ...), last wins, say where a
    refused value came from."""
    def source(k):
        for name, d in reversed(layers):
            if k in d:
                return name
        return "generate"
    for k, neutral in _REFUSED_FIELDS.items():
        if not _off(k, gc.get(k), neutral):
            raise NotImplementedError(f"{source(k)}: {k}={gc.get(k)!r} is not supported (greedy and sampling only, "
                                      "token ids returned)")
    for k, neutral in _UNSUPPORTED_FIELDS.items():
        if not _off(k, gc.get(k), neutral):
            raise TypeError(f"{source(k)}: unsupported argument {k}={gc.get(k)!r}: fastload implements greedy search "
                            "and sampling (temperature, top_k, top_p, repetition_penalty, min/max lengths); "
                            f"leave {k} unset (or {neutral!r}) or pass {k}={neutral!r} to override the model's")
    r = dict(max_new_tokens=_int_arg(gc, "max_new_tokens", 0), max_length=_int_arg(gc, "max_length", 0, 20),
             min_new_tokens=_int_arg(gc, "min_new_tokens", 0), min_length=_int_arg(gc, "min_length", 0, 0),
             top_k=_int_arg(gc, "top_k", 0, 0), num_return_sequences=_int_arg(gc, "num_return_sequences", 1, 1),
             temperature=_float_arg(gc, "temperature", 1.0), top_p=_float_arg(gc, "top_p", 1.0),
             repetition_penalty=_float_arg(gc, "repetition_penalty", 1.0),
             eos_token_id=_token_ids(gc, "eos_token_id"), pad_token_id=_token_ids(gc, "pad_token_id"),
             seed=_int_arg(gc, "seed", -(1 << 63)))
    ds = gc.get("do_sample")
    if ds is not None and not isinstance(ds, (bool, np.bool_, int)):
        raise TypeError(f"generate: do_sample must be True or False, got {ds!r}")
    r["do_sample"] = bool(ds)
    if len(r["pad_token_id"]) > 1:
        raise ValueError(f"generate: pad_token_id must be one token id, got {gc.get('pad_token_id')!r}")
    r["pad_token_id"] = r["pad_token_id"][0] if r["pad_token_id"] else None
    if r["do_sample"] and r["temperature"] <= 0:
        raise ValueError(f"temperature={r['temperature']} must be strictly positive when do_sample=True")
    if r["repetition_penalty"] <= 0:
        raise ValueError(f"repetition_penalty={r['repetition_penalty']} must be strictly positive")
    if not 0 < r["top_p"] <= 1:
        raise ValueError(f"top_p={r['top_p']} must be in (0, 1]")
    if r["num_return_sequences"] > 1 and not r["do_sample"]:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")
    return r


class CausalLMOutput(AttrDict):
    """logits (and loss when labels are given), by attribute, key or index, as transformers' output."""

    def __getitem__(self, k):
        if isinstance(k, int):
            return list(self.values())[k]
        return super().__getitem__(k)

    def to_tuple(self):
        return tuple(self.values())


def _as_numpy(x, name):
    if x is None:
        return None
    if is_torch(x):
        return x.detach().cpu().numpy()
    if isinstance(x, np.ndarray):
        return x
    try:
        return np.asarray(x)
    except Exception as e:  # noqa: BLE001 - re-raised with the argument's name
        raise TypeError(f"{name} must be an array of token ids, got {type(x).__name__}") from e


def _ids2d(x, name):
    a = _as_numpy(x, name)
    if a is None:
        return None
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2:
        raise ValueError(f"{name} must have shape [batch, seq_len], got {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.bool_):
        raise TypeError(f"{name} must hold integers, got {a.dtype}")
    return a


def _to_user(arr, like_torch):
    if like_torch:
        return sys.modules["torch"].from_numpy(np.ascontiguousarray(arr))
    return arr


class _Progress:
    """A one-line progress bar on stderr (only when stderr is a terminal) and/or a user callback."""

    def __init__(self, what, enabled, callback):
        self.what, self.callback = what, callback
        self.enabled = enabled if enabled is not None else sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = 0.0

    def __call__(self, done, total):
        if self.callback is not None:
            self.callback(done, total)
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        frac = done / total if total else 1.0
        rate = done / max(now - self.t0, 1e-9) / 1e9
        bar = "#" * int(frac * 30)
        sys.stderr.write(f"\rloading {self.what} [{bar:<30}] {frac * 100:5.1f}% {done / 1e9:.2f}/{total / 1e9:.2f} GB {rate:.2f} GB/s")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


GEN_KEYS = set(GenerationConfig.DEFAULTS) | {"seed", "use_cache", "streamer", "synced_gpus", "generation_config",
                                             "return_dict_in_generate", "output_scores", "output_logits",
                                             "output_attentions", "output_hidden_states", "tokenizer"}


class FastModelForCausalLM:
    """A causal LM held by the C core. Construct with AutoModelForCausalLM.from_pretrained."""

    def __init__(self, core, config, arch, generation_config, device, dtype, name_or_path, load_stats):
        self._core = core
        self.config = config
        self.arch = arch
        self.generation_config = generation_config
        self.device = device
        self.dtype = dtype
        self.name_or_path = name_or_path
        self.load_stats = load_stats

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, device_map=None, device=None,
                        torch_dtype=None, dtype=None, gguf_file=None, revision=None, cache_dir=None, subfolder="",
                        local_files_only=False, progress=None, progress_callback=None, threads=None,
                        quantization_config=None, load_in_8bit=False, load_in_4bit=False, allow_external_symlinks=None,
                        **kwargs):
        if model_args:
            raise TypeError("from_pretrained takes the model path and keyword arguments only")
        for k in list(kwargs):
            if k in IGNORED_LOAD_ARGS:
                kwargs.pop(k)
        if kwargs:
            raise TypeError(f"from_pretrained: unsupported argument(s) {sorted(kwargs)}; they would change the model "
                            f"and are not implemented. Accepted and ignored: {sorted(IGNORED_LOAD_ARGS)}")
        if load_in_8bit or load_in_4bit or quantization_config is not None:
            cfgmod.quant_setting("int8" if load_in_8bit else "int4" if load_in_4bit else "quantization_config")
        cfgmod.quant_setting()
        ref = pretrained_model_name_or_path or cfgmod.env("FASTLOAD_MODEL")
        if ref is None:
            raise ValueError("no model given: pass a path, .gguf file or hub id (or set FASTLOAD_MODEL)")
        t0 = time.perf_counter()
        path = resolve(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        if subfolder:
            path = os.path.join(path, subfolder)
        if dtype is not None and torch_dtype is not None and cfgmod.normalize_dtype(dtype) != cfgmod.normalize_dtype(torch_dtype):
            raise ValueError("dtype and torch_dtype disagree")
        want_dtype = cfgmod.normalize_dtype(dtype if dtype is not None else torch_dtype)
        dev = cfgmod.normalize_device(device_map, device)
        nthreads = threads if threads is not None else cfgmod.cpu_threads()
        ext = _files.external_symlinks_allowed(allow_external_symlinks)

        gguf_path = gguf_real = None
        if not os.path.isdir(path) and path.endswith(".gguf"):
            gguf_path = gguf_real = _files.given_file(path)
        elif os.path.isdir(path) and gguf_file:
            gguf_path = os.path.join(path, gguf_file)
            gguf_real = _files.checkpoint_file(path, gguf_file, "gguf_file argument", allow_external=ext, subdirs=True)
        elif os.path.isdir(path) and not _has_safetensors(path):
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_path = os.path.join(path, ggufs[0])
                gguf_real = _files.checkpoint_file(path, ggufs[0], "GGUF file", allow_external=ext)
        try:
            if gguf_path:
                model = cls._load_gguf(gguf_path, want_dtype, dev, nthreads, progress, progress_callback, real=gguf_real)
            else:
                model = cls._load_safetensors(path, want_dtype, dev, nthreads, progress, progress_callback, ext=ext)
        except BaseException as e:
            # The loaders' frames hold the half-built core (its weight arena, on the GPU too) and the open files;
            # a traceback kept by the caller (a notebook's sys.last_traceback, a logged exception) would keep
            # them alive. Clear those finished frames' locals: the message names what went wrong.
            traceback.clear_frames(e.__traceback__)
            raise
        model.name_or_path = str(ref)
        model.load_stats["total_seconds"] = time.perf_counter() - t0
        return model

    @staticmethod
    def _finish(core, items, n_files, what, progress, progress_callback):
        """Hand every (slot, layer, heads, file, name) to the core, check nothing is missing, report."""
        core.load(items, progress=_Progress(what, progress, progress_callback))
        core.check_complete()
        info = core.info
        secs = info["load_seconds"]
        return {"seconds": secs, "bytes": info["bytes_read"], "weight_bytes": info["weight_bytes"],
                "gb_per_s": info["bytes_read"] / secs / 1e9 if secs > 0 else float("inf"),
                "threads": info["threads"], "files": n_files, "device": info["device"], "dtype": info["dtype"],
                "cache": "cold (O_DIRECT reads)" if info["direct_io"] else "warm (page cache)"}

    @classmethod
    def _load_safetensors(cls, path, want_dtype, dev, nthreads, progress, progress_callback, ext=False):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
        # shards: every file goes through fastload/_files.py (plain names, inside the directory, regular files)
        index_path = os.path.join(path, "model.safetensors.index.json")
        index_real = _files.find_file(path, "model.safetensors.index.json", allow_external=ext)
        real = {}
        if index_real:
            weight_map = _files.read_json(index_real, index_path, _files.INDEX_LIMIT).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
            shard_names = sorted(set(weight_map.values()))
            for s in shard_names:
                real[s] = _files.find_file(path, s, "shard name in model.safetensors.index.json", allow_external=ext)
                if real[s] is None:
                    raise CheckpointError(f"{index_path}: shard '{s}' is listed in weight_map but {os.path.join(path, s)} does not exist")
        elif (single := _files.find_file(path, "model.safetensors", allow_external=ext)) is not None:
            weight_map, shard_names, real = None, ["model.safetensors"], {"model.safetensors": single}
        else:
            if os.path.isfile(os.path.join(path, "pytorch_model.bin")) or any(
                    f.startswith("pytorch_model") for f in os.listdir(path)):
                raise CheckpointError(f"{path}: only pickle (.bin) weights found; fastload reads safetensors and GGUF "
                                      "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))")
            raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or .gguf file")

        cfg_path = os.path.join(path, "config.json")
        cfg_real = _files.find_file(path, "config.json", allow_external=ext)
        if cfg_real is None:
            raise FileNotFoundError(f"{path}: no config.json")
        hf = _files.read_json(cfg_real, cfg_path)
        checks.check_config(hf, cfg_path)  # types, ranges and relations, before any arithmetic
        hf = Config(hf)
        arch = archmod.arch_for(hf, cfg_path)
        core_cfg = archmod.core_config(hf, arch, cfg_path)
        if want_dtype == "auto":
            cd = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
            want_dtype = cd if cd in ("float16", "bfloat16", "float32") else "float32"

        files = {s: _C.SafetensorsFile(real[s]) for s in shard_names}
        where = {}
        for s, f in files.items():
            for k in f.keys():
                where.setdefault(k, s)
        if weight_map is not None:
            for name, s in weight_map.items():
                if name not in files[s]:
                    raise CheckpointError(f"{os.path.join(path, s)}: tensor '{name}' is listed in {index_path} but not in the shard")
                where[name] = s
        context = _context_bytes(dev)
        core = _C.Model(core_cfg, dtype=want_dtype, device=dev, threads=nthreads)
        items, used = [], set()
        for slot, layer, name, heads in archmod.tensor_plan(arch, core_cfg, gguf=False):
            if name not in where:
                if slot == "lm_head" and not core_cfg["tie_embeddings"]:
                    raise CheckpointError(f"{path}: missing tensor '{name}' (config.json has tie_word_embeddings=false)")
                raise CheckpointError(f"{path}: missing tensor '{name}' needed by {arch.name}")
            items.append((archmod.SLOT[slot], layer, heads, files[where[name]], name))
            used.add(name)
        unused = [n for n in where if n not in used and not n.endswith(archmod.IGNORED_SUFFIXES)]
        if unused:
            warnings.warn(f"{path}: {len(unused)} checkpoint tensor(s) not used by {arch.name}: {unused[:5]}", stacklevel=3)
        stats = cls._finish(core, items, len(files), os.path.basename(os.path.normpath(path)), progress, progress_callback)
        for f in files.values():
            f.close()
        gen_path = os.path.join(path, "generation_config.json")
        gen_real = _files.find_file(path, "generation_config.json", allow_external=ext)
        gen = GenerationConfig()
        if gen_real:
            gen.update(GenerationConfig._read(gen_real, gen_path))
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if gen.get(k) is None and hf.get(k) is not None:
                gen[k] = hf[k]
        model = cls(core, hf, arch, gen, dev, want_dtype, path, stats)
        model._context_bytes = context
        return model

    @classmethod
    def _load_gguf(cls, path, want_dtype, dev, nthreads, progress, progress_callback, real=None):
        g = _C.GGUFFile(real or path)  # real: `path` checked and resolved by fastload/_files.py
        meta = g.metadata
        arch, hf = archmod.gguf_config(meta, path)
        tensors = {t[0]: t for t in g.tensors()}
        hf["tie_word_embeddings"] = "output.weight" not in tensors
        names = archmod.gguf_names(meta["general.architecture"])
        if "token_embd.weight" in tensors:
            shape = tensors["token_embd.weight"][3]
            if len(shape) != 2:
                raise CheckpointError(f"{path}: tensor 'token_embd.weight' must have 2 dimensions, got {len(shape)}")
            hf["vocab_size"] = int(shape[0])
            names["vocab_size"] = "token_embd.weight rows (vocabulary size)"
        hf = Config(hf)
        core_cfg = archmod.core_config(hf, arch, path, names)
        if want_dtype == "auto":
            want_dtype = "float16"  # dequantised GGUF weights: float16 keeps 10 mantissa bits at half of f32's bytes
        context = _context_bytes(dev)
        core = _C.Model(core_cfg, dtype=want_dtype, device=dev, threads=nthreads)
        items = []
        for slot, layer, name, heads in archmod.tensor_plan(arch, core_cfg, gguf=True):
            if name not in tensors:
                raise CheckpointError(f"{path}: missing tensor '{name}' needed by {arch.name}")
            items.append((archmod.SLOT[slot], layer, heads, g, name))
        stats = cls._finish(core, items, 1, os.path.basename(path), progress, progress_callback)
        g.close()
        gen = _gguf_generation_config(meta, path)
        hf.update({k: gen[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")})
        model = cls(core, hf, arch, gen, dev, want_dtype, path, stats)
        model._context_bytes = context
        return model

    # ------------------------------------------------------------------ inference
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        return self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                return_dict=None, **kwargs):
        """Logits for every position, as transformers' forward (position_ids default to 0..T-1 even with
        left padding, as there). With `labels`, also the mean next-token cross-entropy (ignore index -100)."""
        for k in kwargs:
            if k not in ("output_attentions", "output_hidden_states", "token_type_ids") or kwargs[k]:
                raise TypeError(f"forward: argument {k!r} is not supported")
        like_torch = is_torch(input_ids)
        ids = _ids2d(input_ids, "input_ids")
        if ids is None:
            raise ValueError("forward needs input_ids")
        mask = _ids2d(attention_mask, "attention_mask")
        pos = _ids2d(position_ids, "position_ids")
        logits = self._core.forward(ids, None if mask is None else (mask != 0).astype(np.uint8), pos)
        out = CausalLMOutput(logits=_to_user(logits, like_torch))
        if labels is not None:
            lab = _ids2d(labels, "labels")
            out = CausalLMOutput(loss=_to_user(np.asarray(_ce_loss(logits, lab)), like_torch), logits=out["logits"])
        return out

    def _gen_settings(self, generation_config, kwargs):
        """The settings one generate() call uses, as transformers 5 merges them: the passed generation_config's
        explicitly set fields over the model's generation_config over the defaults, then every keyword argument
        (None included) over all of them. Neither the model's config nor the passed one is changed. Values are
        checked here (types, ranges, unsupported fields), so callers can validate before starting a thread."""
        unknown = [k for k in kwargs if k not in GEN_KEYS and k not in GenerationConfig.FIELDS]
        if unknown:
            raise TypeError(f"generate: unsupported argument(s) {unknown}; supported: {sorted(GEN_KEYS)}")
        layers = (("model.generation_config", _explicit(self.generation_config, "model.generation_config")),
                  ("generate: generation_config", _explicit(generation_config)),
                  ("generate", {k: v for k, v in kwargs.items() if k != "streamer"}))
        gc = GenerationConfig()
        for _, d in layers:
            gc.update(d)
        _resolve_settings(gc, layers)
        return gc

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, inputs=None, **kwargs):
        """transformers' generate: greedy or sampling; returns [batch, prompt + new] token ids.
        `generation_config` (fastload's or transformers' GenerationConfig, or a dict) is merged with the model's
        generation_config as transformers does (see _gen_settings). With a `streamer`, every error (bad
        arguments included, and KeyboardInterrupt) ends it before it is raised: fastload's TextIteratorStreamer
        then raises the same exception in the thread that iterates it, so a consumer never waits forever."""
        try:
            out = self._generate(input_ids, attention_mask, generation_config, streamer, inputs, kwargs)
        except BaseException as e:
            if streamer is not None:
                _end_streamer(streamer, e)
            raise
        if streamer is not None:
            streamer.end()
        return out

    def _generate(self, input_ids, attention_mask, generation_config, streamer, inputs, kwargs):
        if input_ids is None:
            input_ids = inputs
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        like_torch = is_torch(input_ids)
        ids = _ids2d(input_ids, "input_ids")
        mask = _ids2d(attention_mask, "attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        r = _resolve_settings(self._gen_settings(generation_config, kwargs), ())
        T = ids.shape[1]
        max_new = r["max_new_tokens"]
        if max_new is None:
            max_new = r["max_length"] - T
            if max_new <= 0:
                raise ValueError(f"input length {T} reaches max_length={r['max_length']}; set max_new_tokens")
        min_new = r["min_new_tokens"]
        if min_new is None:
            min_new = max(0, r["min_length"] - T)
        eos = r["eos_token_id"]
        pad = r["pad_token_id"]
        if pad is None:
            pad = eos[0] if eos else 0
        nrs = r["num_return_sequences"]
        if nrs > 1:
            ids = np.repeat(ids, nrs, axis=0)
            mask = None if mask is None else np.repeat(mask, nrs, axis=0)
        seed = r["seed"]
        seed = _global_rng.getrandbits(63) if seed is None else seed
        cb = None
        if streamer is not None:
            streamer.put(_to_user(ids.astype(np.int64), like_torch))
            cb = (lambda toks: streamer.put(_to_user(toks, like_torch)))
        out = self._core.generate(ids, None if mask is None else (mask != 0).astype(np.uint8),
                                  max_new_tokens=max_new, min_new_tokens=min_new, do_sample=r["do_sample"],
                                  temperature=r["temperature"], top_k=r["top_k"], top_p=r["top_p"],
                                  repetition_penalty=r["repetition_penalty"], seed=seed & 0xFFFFFFFFFFFFFFFF,
                                  eos_token_ids=eos, pad_token_id=int(pad), callback=cb)
        return _to_user(out, like_torch)

    def _chat_messages(self, query, history, role, system):
        history = list(history or [])
        msgs = []
        if system is not None:
            msgs.append(system if isinstance(system, dict) else {"role": "system", "content": str(system)})
        for item in history:
            if isinstance(item, dict):
                msgs.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 2:
                msgs += [{"role": "user", "content": item[0]}, {"role": "assistant", "content": item[1]}]
            else:
                raise ValueError(f"history items must be (query, response) pairs or {{'role', 'content'}} dicts, got {item!r}")
        msgs.append({"role": role, "content": query})
        return history, msgs

    def _chat_inputs(self, tokenizer, msgs, gen_kwargs):
        """The prompt and generate()'s arguments for chat/stream_chat: the merged settings (checked here, in the
        caller's thread), max_new_tokens=512 unless a length was given, and the tokenizer's eos added."""
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="np")
        gen_kwargs = dict(gen_kwargs)
        streamer = gen_kwargs.pop("streamer", None)
        passed = gen_kwargs.pop("generation_config", None)
        gc = self._gen_settings(passed, gen_kwargs)
        user = {**_explicit(passed), **gen_kwargs}
        if gc.get("max_new_tokens") is None and user.get("max_length") is None:
            gc["max_new_tokens"] = 512
        eos = _resolve_settings(gc, ())["eos_token_id"]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        gc["eos_token_id"] = eos
        out = {"generation_config": gc}
        if streamer is not None:
            out["streamer"] = streamer
        return enc, out

    @staticmethod
    def _chat_history(history, query, response, role):
        if history and isinstance(history[0], dict):
            return history + [{"role": role, "content": query}, {"role": "assistant", "content": response}]
        return history + [(query, response)]

    def chat(self, tokenizer, query, history=None, role="user", system=None, **gen_kwargs):
        """ChatGLM-style chat: returns (response, history). `history` is a list of (query, response)
        pairs (ChatGLM2) or role/content dicts (ChatGLM3); the returned history keeps the style
        given (pairs when empty). The prompt is rendered with the tokenizer's chat template."""
        history, msgs = self._chat_messages(query, history, role, system)
        enc, gen_kwargs = self._chat_inputs(tokenizer, msgs, gen_kwargs)
        out = self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs)
        response = tokenizer.decode(np.asarray(out)[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return response, self._chat_history(history, query, response, role)

    def stream_chat(self, tokenizer, query, history=None, role="user", system=None, **gen_kwargs):
        """ChatGLM-style streaming chat: yields (response so far, history) as text arrives. Bad arguments raise
        here before any thread starts; an error in the generating thread is raised here at once (the streamer
        carries it)."""
        from .streamers import TextIteratorStreamer
        history, msgs = self._chat_messages(query, history, role, system)
        enc, gen_kwargs = self._chat_inputs(tokenizer, msgs, gen_kwargs)
        if "streamer" in gen_kwargs:
            raise TypeError("stream_chat makes its own streamer; pass streamer= to chat() or generate() instead")
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)

        def run():
            try:
                self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], streamer=streamer, **gen_kwargs)
            except BaseException:  # noqa: BLE001 - generate handed it to the streamer, which raises it below
                pass
        th = threading.Thread(target=run, daemon=True)
        th.start()
        response = ""
        for piece in streamer:
            response += piece
            yield response.strip(), self._chat_history(history, query, response.strip(), role)
        th.join()

    # ------------------------------------------------------------------ facts
    def memory_stats(self) -> dict:
        """Bytes this model holds on its device, by use. The KV cache lives for one generate() call:
        kv_cache_last is the size of the most recent one (0 now), and peak includes it."""
        info = self._core.info
        out = {"device": info["device"], "weights": info["weight_bytes"], "kv_cache_now": 0,
               "kv_cache_last": info["kv_bytes_last"], "workspace": info["mem_allocated"] - info["weight_bytes"],
               "allocated": info["mem_allocated"], "peak": info["mem_peak"]}
        if self.device.startswith("cuda"):
            from . import cuda
            free, total = cuda.mem_get_info(self.device)
            out.update(device_total=total, device_free=free,
                       context_and_other_processes=getattr(self, "_context_bytes", None))
        return out

    def get_memory_footprint(self) -> int:
        return int(self._core.info["weight_bytes"])

    def num_parameters(self) -> int:
        c = archmod.core_config(self.config, self.arch, self.name_or_path)
        d, L, ffn, V = c["d"], c["n_layers"], c["ffn"], c["vocab"]
        q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
        per = 2 * d + d * (q + 2 * kv) + q * d + 3 * d * ffn + (q + 2 * kv if c["qkv_bias"] else 0)
        return V * d * (1 if c["tie_embeddings"] else 2) + d + L * per

    def eval(self):
        return self

    def __repr__(self):
        return (f"FastModelForCausalLM({self.arch.name}, {self.name_or_path!r}, device={self.device}, "
                f"dtype={self.dtype}, params={self.num_parameters() / 1e6:.1f}M)")


def _context_bytes(dev):
    """Device memory in use that fastload did not allocate (its CUDA context, other processes), taken
    just before the model's own allocations; None on the CPU."""
    if not dev.startswith("cuda"):
        return None
    from . import cuda
    free, total = cuda.mem_get_info(dev)
    return total - free - cuda.memory_allocated(dev)


def _has_safetensors(path):
    # lexists: a FIFO or directory named model.safetensors is then refused by _load_safetensors, not skipped
    return os.path.lexists(os.path.join(path, "model.safetensors")) or \
        os.path.lexists(os.path.join(path, "model.safetensors.index.json"))


def _ce_loss(logits, labels):
    lg = logits[:, :-1].astype(np.float64)
    lab = labels[:, 1:]
    valid = lab != -100
    if not valid.any():
        return np.float32("nan")
    mx = lg.max(-1, keepdims=True)
    lse = np.log(np.exp(lg - mx).sum(-1)) + mx[..., 0]
    picked = np.take_along_axis(lg, np.where(valid, lab, 0)[..., None], -1)[..., 0]
    return np.float32(((lse - picked) * valid).sum() / valid.sum())


class AutoModelForCausalLM:
    """transformers-style entry point: AutoModelForCausalLM.from_pretrained(path, device_map=..., torch_dtype=...)."""

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...)")

    @staticmethod
    def from_pretrained(*args, **kwargs) -> FastModelForCausalLM:
        return FastModelForCausalLM.from_pretrained(*args, **kwargs)


def from_pretrained(*args, **kwargs) -> FastModelForCausalLM:
    """Short form of AutoModelForCausalLM.from_pretrained."""
    return FastModelForCausalLM.from_pretrained(*args, **kwargs)
