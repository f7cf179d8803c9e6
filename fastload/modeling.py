"""AutoModelForCausalLM: load a checkpoint into the C core and expose transformers' API.

Python only arranges: it reads config.json / GGUF metadata, decides which checkpoint tensor
fills which slot (fastload/arch.py), and hands the opened files to the core, which validates,
converts and places every tensor with the GIL released. forward() and generate() are one call
into the core each (generate calls back per token only to stream and to notice Ctrl-C).
"""
from __future__ import annotations

import copy
import errno
import json
import os
import re
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
from . import engine as enginemod
from . import lora as loramod
from . import quant as quantmod
from . import _files
from . import torchbin
from ._util import AttrDict, is_torch
from .hub import resolve

CheckpointError = _C.CheckpointError

# from_pretrained arguments transformers scripts pass that mean nothing here (accepted, ignored):
IGNORED_LOAD_ARGS = {
    "low_cpu_mem_usage": "loading always streams tensors into one preallocated arena",
    "trust_remote_code": "no remote code is ever run; architectures are built in",
    "attn_implementation": "fastload always uses its own fused attention",
    "use_flash_attention_2": "fastload always uses its own fused attention",
    "token": "only used for hub downloads through huggingface_hub",
    "use_auth_token": "only used for hub downloads through huggingface_hub",
    "force_download": "no downloads besides huggingface_hub's own",
    "resume_download": "no downloads besides huggingface_hub's own",
    "proxies": "no downloads besides huggingface_hub's own",
    "offload_folder": "no offloading: the model lives on one device",
    "offload_state_dict": "no offloading: the model lives on one device",
    "max_memory": "the model lives on one device",
    "_fast_init": "weights are never initialised randomly",
    "use_cache": "fastload always keeps a KV cache while generating; the output is the same either way",
}

# The GGUF tensor types the core reads (kept quantised or dequantised at load: fastload/quant.py), for messages.
GGUF_TYPES = quantmod.GGUF_TYPES
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


class ModelDevice(str):
    """model.device: the device string ("cpu", "cuda:0"), as before, that also answers torch.device's
    `.type` ("cpu" / "cuda") and `.index` (None on the CPU). Compares equal to the same string, or to a
    torch.device whose str() is the same ("cuda:0"; like torch, "cuda" != "cuda:0")."""
    __slots__ = ()

    @property
    def type(self) -> str:
        return self.split(":")[0]

    @property
    def index(self):
        return int(self.split(":")[1]) if ":" in self else None

    def __eq__(self, other):
        if isinstance(other, str) or is_torch(other):
            return str.__eq__(self, str(other))
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = str.__hash__


def _dtype_key(x):
    """'float32' / 'float16' / 'bfloat16' for a dtype given any way, None for anything else (and for "auto")."""
    v = cfgmod.dtype_key(x)
    return None if v == "auto" else v


class ModelDType(str):
    """model.dtype: the weight dtype's name ("float16"), as before, shaped like a torch dtype: `.itemsize`,
    `.is_floating_point`, and equality that accepts torch dtypes (`model.dtype == torch.float16`, compared
    through str() without importing torch), numpy dtypes and the aliases "fp16", "half", "bf16", "float"..."""
    __slots__ = ()

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[str(self)]

    @property
    def is_floating_point(self) -> bool:
        return True

    @property
    def is_complex(self) -> bool:
        return False

    @property
    def is_signed(self) -> bool:
        return True

    def __eq__(self, other):
        key = _dtype_key(other)
        return key is not None and key == str(self)

    def __ne__(self, other):
        return not self.__eq__(other)

    __hash__ = str.__hash__


def _check_device(dev, shown, fix):
    """A CUDA device asked for where there is none: a clear error naming the argument (`shown`, e.g.
    "device_map='cuda'") and what to do instead (`fix`)."""
    if not dev.startswith("cuda"):
        return
    b = _C.build_info()
    if not b["cuda_compiled"]:
        raise NotImplementedError(f"{shown}: fastload was built without CUDA (no nvcc at install time, or "
                                  f"FASTLOAD_CUDA=0), so only the CPU is available; {fix}")
    n, idx = int(b["cuda_devices"]), int(dev[5:])
    if n == 0:
        raise RuntimeError(f"{shown}: no CUDA device is usable here ({b.get('cuda_error') or 'none found'}); {fix}")
    if idx >= n:
        raise ValueError(f"{shown}: cuda:{idx} does not exist (this machine has {n} CUDA device(s): "
                         f"cuda:0 .. cuda:{n - 1})")


def _checkpoint_quant(hf, path):
    """config.json's quantization_config, before looking for tensors: a GPTQ / AWQ checkpoint's packing
    (quant.PackedFormat), None for a float checkpoint; anything else raises NotImplementedError naming the method
    and listing what loads (quant.checkpoint_format)."""
    return quantmod.checkpoint_format(hf, path)


def _stamp(real):
    """(size, mtime_ns, inode) of a checkpoint file, to notice a change before reloading from it."""
    st = os.stat(real)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def generation_config_dict(gc) -> dict:
    """What generation_config.json gets: the explicitly set values of a fastload GenerationConfig (its
    to_diff_dict(), as transformers writes its non-default values), without None, bookkeeping entries
    (transformers_version, read from the file) and objects a file cannot hold."""
    d = gc.to_diff_dict() if hasattr(gc, "to_diff_dict") else dict(gc)
    out = {}
    for k, v in d.items():
        if v is None or k.startswith("_") or k == "transformers_version":
            continue
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            continue  # not a generation setting a file can hold (an object set by a caller)
        out[k] = v
    return out


def _shard_limit(max_shard_size) -> int:
    """transformers' convert_file_size_to_int: an int (bytes) or "5GB" / "500MB" / "1GiB" / "10KB"."""
    if isinstance(max_shard_size, int) and not isinstance(max_shard_size, bool):
        n = max_shard_size
    else:
        m = re.fullmatch(r"\s*(\d+)\s*(GIB|MIB|KIB|GB|MB|KB|B)?\s*", str(max_shard_size), re.I)
        if not m:
            raise ValueError(f"max_shard_size={max_shard_size!r} is not a size: use bytes or '5GB', '500MB', '1GiB'")
        mult = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1, None: 1}
        unit = m.group(2)
        n = int(m.group(1)) * mult[unit.upper() if unit else None]
        if unit and unit.endswith("b") and unit.upper() in ("GB", "MB", "KB"):
            n //= 8  # "5Gb": gigabits, as transformers reads it
    if n <= 0:
        raise ValueError(f"max_shard_size={max_shard_size!r} must be positive")
    return n


_ST_DTYPES = {"float32": ("F32", "<f4"), "float16": ("F16", "<u2"), "bfloat16": ("BF16", "<u2")}


def _write_safetensors(path, entries, export):
    """Write one safetensors file: 8-byte little-endian header length, the header JSON (padded with spaces
    to 8 bytes, __metadata__ {"format": "pt"}), then the tensors back to back in header order.
    entries: [(name, shape, dtype, nbytes, key)]; export(key) -> (dtype, array) gives each tensor's data,
    one at a time, so no more than one tensor is held in host memory. Written to a temporary name and
    renamed, so a failed save leaves no half-written file under the final name."""
    header, off = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype, nbytes, _ in entries:
        header[name] = {"dtype": _ST_DTYPES[dtype][0], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    hb = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hb += b" " * (-len(hb) % 8)
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as fh:
            fh.write(len(hb).to_bytes(8, "little"))
            fh.write(hb)
            for name, shape, dtype, nbytes, key in entries:
                dt, arr = export(key)
                if dt != dtype or tuple(arr.shape) != tuple(shape) or arr.nbytes != nbytes:
                    raise RuntimeError(f"save_pretrained: {name}: the core returned {dt} {arr.shape}, "
                                       f"expected {dtype} {tuple(shape)}")
                fh.write(np.ascontiguousarray(arr, dtype=_ST_DTYPES[dtype][1]).tobytes())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# save_pretrained arguments transformers scripts pass that mean nothing here (accepted, ignored):
IGNORED_SAVE_ARGS = {
    "is_main_process": "one process writes (no distributed saving)",
    "save_function": "files are written directly (safetensors only)",
    "token": "no upload: push_to_hub is not supported",
    "save_peft_format": "no adapters",
    "save_original_format": "the weights are written with Hugging Face names already",
}
_global_rng = random.Random()


def set_seed(seed: int) -> None:
    """Seed the generator used for sampling when generate() gets no explicit `seed`."""
    _global_rng.seed(int(seed))


# from_pretrained keyword arguments that set config.json values (rope scaling and the context it allows): applied
# before the model is built, checked like the file's own values.
CONFIG_OVERRIDES = ("rope_scaling", "rope_parameters", "rope_theta", "max_position_embeddings")


def _apply_overrides(hf, overrides):
    """from_pretrained's config arguments over config.json's values. rope_theta= also replaces the theta inside a
    rope_parameters dict (transformers 5 writes it there, and the model reads it there first), unless
    rope_parameters= itself is given: otherwise the argument would be a silent no-op on current checkpoints."""
    if "max_position_embeddings" in overrides and hf.get("max_position_embeddings") \
            and not hf.get("original_max_position_embeddings"):
        # transformers fills llama3's / yarn's original length from config.json's max_position_embeddings when it
        # builds the config, and applies the argument after: the argument does not move the original length
        for key in ("rope_scaling", "rope_parameters"):
            rd = overrides.get(key, hf.get(key))
            if isinstance(rd, dict) and rd.get("rope_type", rd.get("type")) in ("llama3", "yarn") \
                    and not rd.get("original_max_position_embeddings"):
                overrides = {**overrides, key: {**rd, "original_max_position_embeddings": hf["max_position_embeddings"]}}
    hf.update(overrides)
    rp = hf.get("rope_parameters")
    if "rope_theta" in overrides and "rope_parameters" not in overrides and isinstance(rp, dict) and "rope_theta" in rp:
        hf["rope_parameters"] = {**rp, "rope_theta": overrides["rope_theta"]}


class Config(AttrDict):
    """config.json as a dict with attribute access (like transformers' PretrainedConfig). Attributes a ported script
    reads that config.json seldom holds come from PretrainedConfig's defaults (not dict keys, so save_pretrained
    writes what the file had): name_or_path / _name_or_path (where the model was loaded from), torch_dtype (= dtype,
    transformers 4's name), is_encoder_decoder, output_attentions, output_hidden_states, use_return_dict."""

    _ATTR_DEFAULTS = {"is_encoder_decoder": False, "output_attentions": False, "output_hidden_states": False,
                      "use_return_dict": True, "return_dict": True}

    def __setattr__(self, k, v):
        self[k] = v

    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            pass
        if k in ("name_or_path", "_name_or_path"):
            return self.get("_name_or_path", self.__dict__.get("_fl_name_or_path", ""))
        if k == "torch_dtype" and "dtype" in self:
            return self["dtype"]
        if k in self._ATTR_DEFAULTS:
            return self._ATTR_DEFAULTS[k]
        raise AttributeError(k)

    def to_dict(self):
        return dict(self)


# Fields of transformers' GenerationConfig that fastload does not implement, with the value that means "off".
# A config or generate() argument that sets one of them to anything else is refused (never silently ignored);
# fields that cannot change greedy/sampling output (cache, compile, assistant and beam-only settings) are accepted.
_UNSUPPORTED_FIELDS = {
    "use_mtp": False, "top_h": None, "encoder_repetition_penalty": 1.0, "forced_bos_token_id": None,
    "exponential_decay_length_penalty": None,
    "token_healing": False, "guidance_scale": None, "watermarking_config": None,
    "prompt_lookup_num_tokens": None, "assistant_early_exit": None, "penalty_alpha": None, "dola_layers": None,
    "num_beam_groups": 1, "constraints": None, "force_words_ids": None,
    # transformers applies it to decoder-only models too, the prompt standing for the encoder's input
    "encoder_no_repeat_ngram_size": 0,
}
# (length_penalty and early_stopping are read by beam search, num_beams > 1: _resolve_settings)
_HARMLESS_FIELDS = {
    "use_cache", "cache_implementation", "cache_config", "max_cache_len", "early_stopping", "length_penalty",
    "diversity_penalty", "renormalize_logits",
    "remove_invalid_values", "decoder_start_token_id", "is_assistant",
    "num_assistant_tokens", "num_assistant_tokens_schedule", "assistant_confidence_threshold", "max_matching_ngram_size",
    "assistant_lookbehind", "target_lookbehind", "assistant_ensemble_weight", "speculation_type", "compile_config",
    "disable_compile", "continuous_batching_config", "low_memory", "prefill_chunk_size",
}
# transformers' generate() arguments that are objects, not GenerationConfig fields: accepted at their neutral value
# (None, False or an empty list: scripts pass logits_processor=LogitsProcessorList() and the like), refused otherwise
# (a custom processor or criterion would change the output and fastload's loop is in C)
_NEUTRAL_CALL_ARGS = ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
                      "assistant_model", "assistant_tokenizer", "negative_prompt_ids", "negative_prompt_attention_mask",
                      "custom_generate")


def _is_neutral(v):
    if v is None or v is False:
        return True
    try:
        return not isinstance(v, (str, bytes)) and hasattr(v, "__len__") and len(v) == 0
    except TypeError:
        return False


# refused by generate() when set (no attention maps or hidden states are kept)
_REFUSED_FIELDS = {"output_attentions": False, "output_hidden_states": False}
# what generate() returns: token ids, or with return_dict_in_generate a GenerateDecoderOnlyOutput with the scores /
# logits of every step when asked for (kept by the engine per request: csrc/fl_model.h, fl_gen_params.keep_*)
_OUTPUT_FIELDS = ("return_dict_in_generate", "output_scores", "output_logits")
# transformers' logits-processor and warper settings whose default is None (unset): read with a fallback in
# _resolve_settings
_SAMPLING_FIELDS = ("min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "no_repeat_ngram_size", "bad_words_ids",
                    "suppress_tokens", "begin_suppress_tokens", "sequence_bias", "forced_eos_token_id")
# fastload's own generate() arguments beside transformers' (vLLM's and OpenAI's names): presence / frequency
# penalties over the tokens generated so far (fl_gen_params)
_EXTRA_FIELDS = ("presence_penalty", "frequency_penalty")
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
    FIELDS = (frozenset(DEFAULTS) | frozenset(_UNSUPPORTED_FIELDS) | _HARMLESS_FIELDS | frozenset(_REFUSED_FIELDS) |
              frozenset(_OUTPUT_FIELDS) | frozenset(_SAMPLING_FIELDS) | frozenset(("stop_strings", "max_time")))

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

    _SAMPLING_ONLY = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")

    def validate(self, strict=False):
        """transformers' GenerationConfig.validate: the checks generate() makes of these values (types, ranges,
        fields fastload refuses) raise here; nothing is returned. Sampling settings set while do_sample is not True
        (they change nothing) are transformers' minor issues: a UserWarning, a ValueError with strict=True."""
        _resolve_settings(self, (("GenerationConfig", _explicit(self)),))
        if not self.get("do_sample"):
            idle = [k for k in self._SAMPLING_ONLY
                    if k in self._set and self.get(k) is not None and self.get(k) != self.DEFAULTS.get(k)]
            if idle:
                msg = (f"GenerationConfig: {', '.join(f'{k}={self.get(k)!r}' for k in idle)} set while do_sample is "
                       "not True: greedy decoding ignores them (set do_sample=True, or unset them)")
                if strict:
                    raise ValueError(msg)
                warnings.warn(msg, UserWarning, stacklevel=2)

    def __eq__(self, other):
        """Equal when the same fields are set explicitly to the same values (what generate() takes from a config;
        a field set to its default value is not equal to it unset, as in transformers 5 where unset is None)."""
        if isinstance(other, GenerationConfig):
            return self.to_diff_dict() == other.to_diff_dict()
        return NotImplemented

    def __ne__(self, other):
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # a mutable dict, as before (transformers' is hashable by its JSON; fastload's is not)

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
    """A GGUF file's generation settings: eos/bos/pad from its tokenizer.ggml.* metadata (checked token ids). The
    end-of-turn and end-of-message tokens (tokenizer.ggml.eot_token_id / eom_token_id: Llama 3's <|eot_id|> /
    <|eom_id|> where eos is <|end_of_text|>) end generation too, as in llama.cpp (llama_vocab_is_eog) and in the
    generation_config.json the hub ships beside such models (eos_token_id a list): eos_token_id becomes the list."""
    def token_id(mk):  # a checked token id, or None when the key is absent
        v = meta.get(mk)
        return None if v is None else checks.check_value(checks.Key(mk, "int", 0, checks.INT32_MAX), v, path)
    gen = GenerationConfig()
    for k, mk in _GGUF_GENERATION_KEYS:
        if (t := token_id(mk)) is not None:
            gen[k] = t
    stops = [gen["eos_token_id"]] if gen.get("eos_token_id") is not None else []
    for mk in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if (t := token_id(mk)) is not None and t not in stops:
            stops.append(t)
    if len(stops) > 1:
        gen["eos_token_id"] = stops
    return gen


_GLM_REWRITE = "[[训练时间]]"


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


_INT32_MAX = (1 << 31) - 1


def _int_arg(gc, k, lo, default=None, clamp=False):
    """An integer field >= lo. Past int32 (what the core takes): clamp=True for counts whose every value beyond
    any sequence length or vocabulary means the same (max_new_tokens, top_k, ...), else a ValueError naming k."""
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
    if v > _INT32_MAX and k != "seed":
        if not clamp:
            raise ValueError(f"generate: {k} must be <= {_INT32_MAX}, got {v}")
        v = _INT32_MAX
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
            raise NotImplementedError(f"{source(k)}: {k}={gc.get(k)!r} is not supported (attention maps and hidden "
                                      "states are not kept; token ids and scores are returned)")
    for k, neutral in _UNSUPPORTED_FIELDS.items():
        if not _off(k, gc.get(k), neutral):
            raise TypeError(f"{source(k)}: unsupported argument {k}={gc.get(k)!r}: fastload implements greedy search, "
                            "sampling (temperature, top_k, top_p, min_p, ...) and beam search (num_beams), with "
                            "transformers' logits processors; "
                            f"leave {k} unset (or {neutral!r}) or pass {k}={neutral!r} to override the model's")
    # lengths, top_k and the n-gram size past int32 all mean "no limit here": clamped (generation stops at the context)
    r = dict(max_new_tokens=_int_arg(gc, "max_new_tokens", 0, clamp=True),
             max_length=_int_arg(gc, "max_length", 0, 20, clamp=True),
             min_new_tokens=_int_arg(gc, "min_new_tokens", 0, clamp=True),
             min_length=_int_arg(gc, "min_length", 0, 0, clamp=True), top_k=_int_arg(gc, "top_k", 0, 0, clamp=True),
             num_return_sequences=_int_arg(gc, "num_return_sequences", 1, 1),
             temperature=_float_arg(gc, "temperature", 1.0), top_p=_float_arg(gc, "top_p", 1.0),
             repetition_penalty=_float_arg(gc, "repetition_penalty", 1.0), min_p=_float_arg(gc, "min_p", 0.0),
             presence_penalty=_float_arg(gc, "presence_penalty", 0.0),
             frequency_penalty=_float_arg(gc, "frequency_penalty", 0.0),
             no_repeat_ngram_size=_int_arg(gc, "no_repeat_ngram_size", 0, 0, clamp=True),
             eos_token_id=_token_ids(gc, "eos_token_id"), pad_token_id=_token_ids(gc, "pad_token_id"),
             seed=_int_arg(gc, "seed", -(1 << 63)))
    # transformers 5's has_default_max_length: no layer sets max_length (then 20 is a count of new tokens)
    r["default_max_length"] = not any(d.get("max_length") is not None for _, d in layers)
    ss = gc.get("stop_strings")
    if ss is None:
        ss = []
    elif isinstance(ss, str):
        ss = [ss]
    if not isinstance(ss, (list, tuple)) or not all(isinstance(x, str) and x for x in ss):
        raise TypeError(f"{source('stop_strings')}: stop_strings must be a non-empty string or a list of them, "
                        f"got {gc.get('stop_strings')!r}")
    r["stop_strings"] = list(ss)
    mt = gc.get("max_time")
    if mt is not None and (isinstance(mt, bool) or not isinstance(mt, (int, float)) or not mt > 0):
        raise ValueError(f"{source('max_time')}: max_time={mt!r} must be a positive number of seconds")
    r["max_time"] = None if mt is None else float(mt)
    for k in _OUTPUT_FIELDS:
        v = gc.get(k)
        if v is not None and not isinstance(v, (bool, np.bool_, int)):
            raise TypeError(f"{source(k)}: {k} must be True or False, got {v!r}")
        r[k] = bool(v)
    ds = gc.get("do_sample")
    if ds is not None and not isinstance(ds, (bool, np.bool_, int)):
        raise TypeError(f"generate: do_sample must be True or False, got {ds!r}")
    r["do_sample"] = bool(ds)
    if len(r["pad_token_id"]) > 1:
        raise ValueError(f"generate: pad_token_id must be one token id, got {gc.get('pad_token_id')!r}")
    r["pad_token_id"] = r["pad_token_id"][0] if r["pad_token_id"] else None
    if r["do_sample"] and r["temperature"] <= 0:
        raise ValueError(f"temperature={r['temperature']} must be strictly positive when do_sample=True")
    if 0 < r["top_p"] < 1e-30:  # a float32 of the core would round it to 0 (top-p off); any such mass keeps the top token
        r["top_p"] = 1e-30
    if r["do_sample"] and r["temperature"] < 1.1754944e-38:  # below float32's normal range: it would round towards 0
        raise ValueError(f"temperature={r['temperature']} is too small to sample with (below 1.18e-38, float32's "
                         f"smallest normal number); do_sample=False gives the greedy answer it tends to")
    if r["repetition_penalty"] <= 0:
        raise ValueError(f"repetition_penalty={r['repetition_penalty']} must be strictly positive")
    if not 0 < r["top_p"] <= 1:
        raise ValueError(f"top_p={r['top_p']} must be in (0, 1]")
    if not 0 <= r["min_p"] <= 1:
        raise ValueError(f"min_p={r['min_p']} must be in [0, 1]")
    for k, lo_open in (("typical_p", True), ("epsilon_cutoff", False), ("eta_cutoff", False)):
        v = _float_arg(gc, k, 1.0 if k == "typical_p" else 0.0)
        if not (0 < v <= 1 if lo_open else 0 <= v < 1):
            raise ValueError(f"{source(k)}: {k}={v} must be in " + ("(0, 1]" if lo_open else "[0, 1)"))
        r[k] = v
    r["bias"] = _token_biases(gc, source, r.get("eos_token_id") or ())
    r["begin_suppress_tokens"] = _id_list(gc, "begin_suppress_tokens", source)
    r["forced_eos_token_id"] = _id_list(gc, "forced_eos_token_id", source)
    r["num_beams"] = _int_arg(gc, "num_beams", 1, 1)
    r["num_beams_source"] = source("num_beams")
    r["length_penalty"] = _float_arg(gc, "length_penalty", 1.0)
    es = gc.get("early_stopping")
    if es is None or isinstance(es, (bool, np.bool_)) or (isinstance(es, (int, np.integer)) and es in (0, 1)) or \
            (isinstance(es, str) and es == "never"):
        r["early_stopping"] = 2 if isinstance(es, str) else int(bool(es))  # 0 / 1: False / True, as transformers
    else:
        raise ValueError(f"{source('early_stopping')}: early_stopping={es!r} must be True, False or 'never'")
    if r["num_beams"] > 1:
        if not np.isfinite(r["length_penalty"]):
            raise ValueError(f"length_penalty={r['length_penalty']} must be finite")
        if r["num_return_sequences"] > r["num_beams"]:
            raise ValueError(f"`num_return_sequences` ({r['num_return_sequences']}) has to be smaller or equal to "
                             f"`num_beams` ({r['num_beams']}).")
        for k, on in (("do_sample", r["do_sample"]), ("stop_strings", bool(r["stop_strings"])),
                      ("max_time", r["max_time"] is not None), ("output_logits", r["output_logits"]),
                      ("renormalize_logits", bool(gc.get("renormalize_logits")))):
            if on:
                raise NotImplementedError(f"{source(k)}: {k} with num_beams={r['num_beams']} is not supported (beam "
                                          "search here is transformers' greedy beam search with eos and length stops)")
    elif r["num_return_sequences"] > 1 and not r["do_sample"]:
        raise ValueError("num_return_sequences > 1 needs do_sample=True or num_beams > 1 (greedy rows would be identical)")
    return r


def _as_ids(v):
    """One token id or a sequence of them (list, tuple, numpy or torch) as a list of ints; None when it is neither."""
    if is_torch(v) or isinstance(v, np.ndarray):
        v = np.asarray(v).tolist()
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        v = [v]
    if not isinstance(v, (list, tuple)) or not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool)
                                                   for t in v):
        return None
    return [int(t) for t in v]


def _id_list(gc, k, source):
    """A field holding one token id or a list of them, as a list (empty when unset)."""
    v = gc.get(k)
    if v is None:
        return []
    ids = _as_ids(v)
    if ids is None:
        raise TypeError(f"{source(k)}: {k} must be a token id or a list of them, got {v!r}")
    _check_int32_ids(ids, source, k)
    return ids


def _check_int32_ids(ids, source, k):
    """The core takes token ids as int32 (a vocabulary check follows where an id is used): a larger one would wrap."""
    for t in ids:
        if not -(1 << 31) <= t < (1 << 31):
            raise ValueError(f"{source(k)}: {k} holds {t}, which is not a token id")


def _token_biases(gc, source, eos=()):
    """transformers' sequence_bias, bad_words_ids and suppress_tokens as one list of (token sequence, value added to
    the logit of its last token whenever the tokens before it end the text so far; -inf bans), in that order."""
    out = []
    eos_words = [[int(e)] for e in eos]  # one-token bad words transformers drops

    def one(k, seq, val):
        ids = _as_ids(seq)
        if not ids:
            raise TypeError(f"{source(k)}: {k} holds {seq!r}, not a non-empty sequence of token ids")
        _check_int32_ids(ids, source, k)
        out.append((tuple(ids), val))

    sb = gc.get("sequence_bias")
    if sb is not None:
        items = sb.items() if isinstance(sb, dict) else sb
        try:
            pairs = [(seq, v) for seq, v in items]
        except (TypeError, ValueError):
            raise TypeError(f"{source('sequence_bias')}: sequence_bias must be a dict {{(ids,): bias}} or a list of "
                            f"[ids, bias] pairs, got {sb!r}") from None
        for seq, v in pairs:
            if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or v != v:
                raise TypeError(f"{source('sequence_bias')}: sequence_bias: the bias of {seq!r} must be a number, "
                                f"got {v!r}")
            one("sequence_bias", seq, float(v))
    bw = gc.get("bad_words_ids")
    if bw is not None:
        if not isinstance(bw, (list, tuple)) or not bw:
            raise TypeError(f"{source('bad_words_ids')}: bad_words_ids must be a non-empty list of lists of token "
                            f"ids, got {bw!r}")
        for seq in bw:
            if _as_ids(seq) in eos_words:
                continue  # transformers' NoBadWordsLogitsProcessor drops a one-token bad word that is an eos id
            one("bad_words_ids", seq, float("-inf"))
    for t in _id_list(gc, "suppress_tokens", source):
        one("suppress_tokens", t, float("-inf"))
    return out


class CausalLMOutput(AttrDict):
    """logits (and loss when labels are given), by attribute, key or index, as transformers' output."""

    def __getitem__(self, k):
        if isinstance(k, int):
            return list(self.values())[k]
        return super().__getitem__(k)

    def to_tuple(self):
        return tuple(self.values())


class GenerateDecoderOnlyOutput(CausalLMOutput):
    """transformers' GenerateDecoderOnlyOutput (generate with return_dict_in_generate=True): `sequences` [batch,
    prompt + new], and when asked for `scores` (output_scores) and `logits` (output_logits), tuples of one float32
    [batch, vocab] array per generated token. Fields not produced read as None and are not keys, as in
    transformers' ModelOutput; `attentions`, `hidden_states` and `past_key_values` (`cache`, transformers 5.25's name
    for it) are never produced."""

    FIELDS = ("sequences", "scores", "logits", "attentions", "hidden_states", "past_key_values", "cache")

    def __init__(self, **kw):
        bad = set(kw) - set(self.FIELDS)
        if bad:
            raise TypeError(f"GenerateDecoderOnlyOutput: unknown field(s) {sorted(bad)}")
        super().__init__({k: v for k, v in kw.items() if v is not None})

    def __getattr__(self, k):
        if k in GenerateDecoderOnlyOutput.FIELDS:
            return self.get(k)
        return super().__getattr__(k)


class GenerateBeamDecoderOnlyOutput(GenerateDecoderOnlyOutput):
    """transformers' GenerateBeamDecoderOnlyOutput (beam search with return_dict_in_generate=True): `sequences`
    [batch * num_return_sequences, prompt + new], `beam_indices` [batch * num_return_sequences, new] (the beam each
    token came from at its step, + b * num_beams; -1 past a hypothesis' end) and, with output_scores=True,
    `sequences_scores` (float32, each hypothesis' sum of log-probabilities over its length ** length_penalty) and
    `scores` (a tuple of one float32 [batch * num_beams, vocab] array of processed log-probs per step)."""

    FIELDS = GenerateDecoderOnlyOutput.FIELDS + ("sequences_scores", "beam_indices")

    def __init__(self, **kw):
        bad = set(kw) - set(self.FIELDS)
        if bad:
            raise TypeError(f"GenerateBeamDecoderOnlyOutput: unknown field(s) {sorted(bad)}")
        CausalLMOutput.__init__(self, {k: v for k, v in kw.items() if v is not None})

    def __getattr__(self, k):
        if k in GenerateBeamDecoderOnlyOutput.FIELDS:
            return self.get(k)
        return super().__getattr__(k)


def _per_step(recs, off, V, n_new, pad, like_torch, renormalize=False):
    """The tuple of n_new [B, V] arrays (generate's scores / logits) from each row's kept records (columns off:off+V
    of records[b] [n_b, row]). A row that ended before step t has a one-hot row there: -inf everywhere, 0 at the pad
    token it holds in `sequences` (its log-probability 0, so compute_transition_scores gives 0 at padding and a row's
    sum is that of its own tokens; transformers would show logits computed from the pad token instead)."""
    arr = np.full((n_new, len(recs), V), -np.inf, dtype=np.float32)
    for b, rec in enumerate(recs):
        n = rec.shape[0]
        arr[:n, b] = rec[:, off:off + V]
        if n < n_new and 0 <= pad < V:
            arr[n:, b, pad] = 0.0
    if renormalize:  # transformers' renormalize_logits: a LogitNormalization (log-softmax) after every processor
        with np.errstate(invalid="ignore", over="ignore"):
            x = arr.astype(np.float64)
            mx = np.max(x, axis=-1, keepdims=True)
            lse = mx + np.log(np.sum(np.exp(x - mx), axis=-1, keepdims=True))
            arr = (x - lse).astype(np.float32)
    return tuple(_to_user(arr[t], like_torch) for t in range(n_new))


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
    if a.size and name == "attention_mask" and np.issubdtype(a.dtype, np.floating):
        # transformers takes a float mask of ones and zeros (what some tokenizers and `.float()` give)
        if not np.isin(a, (0.0, 1.0)).all():
            raise TypeError(f"attention_mask of {a.dtype} must hold only 0 and 1")
        a = a.astype(np.int64)
    if a.size and not np.issubdtype(a.dtype, np.integer) and not np.issubdtype(a.dtype, np.bool_):
        raise TypeError(f"{name} must hold integers, got {a.dtype}")
    if a.size and np.issubdtype(a.dtype, np.integer) and a.dtype.itemsize >= 4:
        # the core takes ids, masks and positions as int32: a larger value would wrap into a valid-looking one
        lo, hi = (-(1 << 31), (1 << 31) - 1)
        big = (a > hi) if not np.issubdtype(a.dtype, np.signedinteger) else (a > hi) | (a < lo)
        if big.any():
            b, t = (int(i) for i in np.argwhere(big)[0])
            raise ValueError(f"{name}[{b}][{t}] = {int(a[b, t])} is out of range (token ids and positions are below "
                             f"2**31; a token id must be in [0, vocab_size))")
    return a


def _to_user(arr, like_torch):
    if like_torch:
        arr = np.asarray(arr)  # a 0-d loss stays 0-d (np.ascontiguousarray would make it shape (1,))
        return sys.modules["torch"].from_numpy(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))
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
                                             "output_attentions", "output_hidden_states", "tokenizer", "stop_strings",
                                             "max_time"} | set(_EXTRA_FIELDS)


class FastModelForCausalLM:
    """A causal LM held by the C core. Construct with AutoModelForCausalLM.from_pretrained."""

    def __init__(self, core, config, arch, generation_config, device, dtype, name_or_path, load_stats):
        self._core = core
        self.config = config
        if isinstance(config, dict):  # transformers sets the dtype the model was loaded in
            config["dtype"] = str(dtype)
            if "torch_dtype" in config:
                config["torch_dtype"] = str(dtype)
        self.arch = arch
        self.generation_config = generation_config
        self.device = ModelDevice(device)
        self.dtype = ModelDType(dtype)
        self.name_or_path = name_or_path
        self.load_stats = load_stats
        self._source = None  # what the weights were loaded from (files and their stamps), for .half() / .to()
        self._quant = None   # {"config": quantization_config dict or None, "scheme": at-load scheme or None}
        self._engine = None  # fastload/engine.py: the scheduler behind generate / chat (made on first use)

    # ------------------------------------------------------------------ quantisation (fastload/quant.py)
    def _set_quant(self, quant, packed, gguf=False):
        """Record what was quantised and how: model.quantization_config, load_stats["quantization"]."""
        rep = quantmod.report(self._core)
        scheme = quant.scheme if isinstance(quant, quantmod.QuantConfig) and quant.scheme != "none" else None
        if packed is not None:  # GPTQ / AWQ: config.json's own quantization_config (model.config holds it too)
            cfg = dict(packed.config)
            scheme = None  # a scheme (FASTLOAD_QUANT) was set aside for the checkpoint's own packing (reconcile)
        elif scheme is not None:
            cfg = quant.to_dict()
            lays = self._core.layouts() if callable(getattr(self._core, "layouts", None)) else []
            # what the layers got: a group the row's input size is not a multiple of falls back to a smaller one
            # (SmolLM2's 576 takes int4 g96), and a tied LM head is the float embedding whatever lm_head says
            if cfg["group_size"]:  # int8 by default: per output channel, no group to report
                cfg["group_sizes"] = sorted({int(lay["group_size"]) for lay in lays if lay["name"] != "lm_head" and
                                             lay["dtype"] == scheme})
            if not any(lay["name"] == "lm_head" for lay in lays) and cfg["lm_head"] != "none":
                if quant.lm_head not in (None, "none"):
                    warnings.warn(f"{self.name_or_path}: lm_head={quant.lm_head!r} was asked for, but the LM head is "
                                  "the tied embedding, which stays in the float dtype", stacklevel=4)
                cfg["lm_head"] = "none"
        elif gguf and rep.get("quantized_weights"):
            cfg = {"quant_method": "gguf", "gguf": "keep"}
        else:
            cfg = None
        self._quant = {"config": cfg, "scheme": scheme}
        if scheme is not None and not gguf:
            self.config["quantization_config"] = dict(cfg)  # as transformers records it (save_pretrained drops it)
        self.load_stats["quantization"] = {"method": cfg["quant_method"] if cfg else None, **rep}

    @property
    def quantization_config(self):
        """What the weights are quantised with, as a dict (transformers keeps a config object): config.json's
        quantization_config for GPTQ / AWQ checkpoints; {"quant_method": "fastload", "scheme": ..., "group_size":
        ..., "lm_head": ..., "load_in_8bit": ..., "load_in_4bit": ...} for quantisation at load (QuantConfig.to_dict);
        {"quant_method": "gguf", "gguf": "keep"} for a GGUF whose quantised tensors were kept; None otherwise."""
        q = self._quant and self._quant["config"]
        return copy.deepcopy(q) if q else None

    @property
    def quantization_method(self):
        """transformers' attribute: "fastload" (quantised at load), "gptq", "awq", "gguf", or None."""
        q = self.quantization_config
        return q["quant_method"] if q else None

    @property
    def is_quantized(self) -> bool:
        """True when weights are held quantised (at load, GPTQ / AWQ, or a GGUF's kept quantised tensors)."""
        return self.quantization_config is not None

    @property
    def is_loaded_in_8bit(self) -> bool:
        """transformers' flag for load_in_8bit: True when quantised to int8 at load (not for GPTQ / AWQ / GGUF
        checkpoints, whose flags transformers leaves unset too: see is_quantized)."""
        return bool(self._quant and self._quant["scheme"] == "int8")

    @property
    def is_loaded_in_4bit(self) -> bool:
        """transformers' flag for load_in_4bit: True when quantised to int4 or nf4 at load (see is_loaded_in_8bit)."""
        return bool(self._quant and self._quant["scheme"] in ("int4", "nf4"))

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, device_map=None, device=None,
                        torch_dtype=None, dtype=None, gguf_file=None, revision=None, cache_dir=None, subfolder="",
                        local_files_only=False, progress=None, progress_callback=None, threads=None,
                        quantization_config=None, load_in_8bit=False, load_in_4bit=False, allow_external_symlinks=None,
                        adapter=None, use_safetensors=None, **kwargs):
        """transformers' from_pretrained. `device=` (ChatGLM scripts pass it) means the same as `device_map=`;
        given both, they must name the same device (a ValueError otherwise, rather than one silently winning).
        A CUDA device where none is usable raises, naming the argument.

        Quantisation (fastload/quant.py): load_in_8bit=True, load_in_4bit=True, quantization_config= (a
        fastload.QuantConfig, a scheme name "int8" / "int4" / "nf4", fastload's dict, or transformers'
        BitsAndBytesConfig / its dict) quantise the linear layers at load; FASTLOAD_QUANT does the same when none
        is given. GPTQ / AWQ checkpoints are detected from config.json and stay quantised; GGUF files keep their
        quantised tensors. model.quantization_config, is_quantized, is_loaded_in_8bit / is_loaded_in_4bit,
        memory_stats() and load_stats["quantization"] say what was done.

        LoRA (fastload/lora.py): adapter= a PEFT adapter directory (adapter_config.json + adapter_model.safetensors),
        or the adapter directory itself as the model, its base named by base_model_name_or_path. The adapter is
        merged into the weights at load, on the model's device, before any quantisation at load;
        load_stats["lora"] says what was merged."""
        if model_args:
            raise TypeError("from_pretrained takes the model path and keyword arguments only")
        for k in list(kwargs):
            if k in IGNORED_LOAD_ARGS:
                kwargs.pop(k)
        eng_opts = enginemod.options(**{k: kwargs.pop(k) for k in list(kwargs) if k in enginemod.ENGINE_KEYS})
        # config.json values given as arguments, as transformers applies them to the config before building the model
        overrides = {k: kwargs.pop(k) for k in list(kwargs) if k in CONFIG_OVERRIDES}
        if overrides:  # checked alone first: a bad argument is the caller's, not config.json's (or a GGUF key's)
            try:
                checks.check_config(copy.deepcopy(overrides), "from_pretrained")
            except CheckpointError as e:
                raise ValueError(f"{e} (a from_pretrained argument)") from None
        if kwargs:
            raise TypeError(f"from_pretrained: unsupported argument(s) {sorted(kwargs)}; they would change the model "
                            f"and are not implemented. Accepted and ignored: {sorted(IGNORED_LOAD_ARGS)}")
        quant = quantmod.request(quantization_config, load_in_8bit, load_in_4bit)
        ref = pretrained_model_name_or_path or cfgmod.env("FASTLOAD_MODEL")
        if ref is None:
            raise ValueError("no model given: pass a path, .gguf file or hub id (or set FASTLOAD_MODEL)")
        t0 = time.perf_counter()
        path = resolve(ref, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
        if subfolder:
            path = os.path.join(path, subfolder)
        adapter_path = None
        if adapter is not None:
            if loramod.is_adapter_dir(path):
                raise ValueError(f"{ref}: is a LoRA adapter directory itself; pass the base model as the first "
                                 "argument with adapter=, or the adapter directory alone")
            adapter_path = resolve(adapter, revision=None, cache_dir=cache_dir, local_files_only=local_files_only)
            if not loramod.is_adapter_dir(adapter_path, allow_config=True):
                raise FileNotFoundError(f"adapter={adapter!r}: not a PEFT adapter directory (no "
                                        f"{loramod.CONFIG_NAME})")
        elif loramod.is_adapter_dir(path):
            adapter_path = path
            path = loramod.base_of(path, _files.external_symlinks_allowed(allow_external_symlinks), revision=None,
                                   cache_dir=cache_dir, local_files_only=local_files_only)
        if dtype is not None and torch_dtype is not None and cfgmod.normalize_dtype(dtype) != cfgmod.normalize_dtype(torch_dtype):
            raise ValueError("dtype and torch_dtype disagree")
        if dtype is None and torch_dtype is None and isinstance(quant, quantmod.QuantConfig) and quant.compute_dtype:
            want_dtype = quant.compute_dtype  # bnb_4bit_compute_dtype: an explicit argument, so it beats FASTLOAD_DTYPE
        else:
            want_dtype = cfgmod.normalize_dtype(dtype if dtype is not None else torch_dtype)
        # device= (ChatGLM scripts pass it) means the same as device_map=; both given and different is refused
        # rather than one silently winning.
        if device is not None and device_map is not None and \
                cfgmod.normalize_device(device_map) != cfgmod.normalize_device(None, device):
            raise ValueError(f"device_map={device_map!r} and device={device!r} disagree; pass one of them")
        dev = cfgmod.normalize_device(device_map, device)
        arg = "device_map" if device_map is not None else "device" if device is not None else "FASTLOAD_DEVICE"
        value = device_map if device_map is not None else device if device is not None else cfgmod.env("FASTLOAD_DEVICE")
        _check_device(dev, f"{arg}={value!r}", f"use {arg}='cpu'")
        nthreads = cfgmod.check_threads(threads, "threads") if threads is not None else cfgmod.cpu_threads()
        ext = _files.external_symlinks_allowed(allow_external_symlinks)

        gguf_path = gguf_real = None
        if not os.path.isdir(path) and path.endswith(".gguf"):
            gguf_path = gguf_real = _files.given_file(path)
        elif os.path.isdir(path) and gguf_file:
            gguf_path = os.path.join(path, gguf_file)
            gguf_real = _files.checkpoint_file(path, gguf_file, "gguf_file argument", allow_external=ext, subdirs=True)
        elif os.path.isdir(path) and not _has_safetensors(path) and not _has_torch_bin(path):
            # a lone .gguf is the model only where no weights transformers would load are (it reads a GGUF only
            # when gguf_file= names it)
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_path = os.path.join(path, ggufs[0])
                gguf_real = _files.checkpoint_file(path, ggufs[0], "GGUF file", allow_external=ext)
        if adapter_path is not None and gguf_path:
            raise NotImplementedError(f"{adapter_path}: LoRA adapters on a GGUF model are not supported (the merge needs "
                                      "the float weights: load the safetensors checkpoint the GGUF was made from)")
        try:
            if gguf_path:
                model = cls._load_gguf(gguf_path, want_dtype, dev, nthreads, progress, progress_callback, real=gguf_real,
                                       quant=quant, overrides=overrides)
            else:
                if use_safetensors not in (None, True, False):
                    raise TypeError(f"use_safetensors={use_safetensors!r} must be True, False or None")
                model = cls._load_safetensors(path, want_dtype, dev, nthreads, progress, progress_callback, ext=ext,
                                              quant=quant, overrides=overrides, adapter=adapter_path,
                                              use_safetensors=use_safetensors)
        except BaseException as e:
            # The loaders' frames hold the half-built core (its weight arena, on the GPU too) and the open files;
            # a traceback kept by the caller (a notebook's sys.last_traceback, a logged exception) would keep
            # them alive. Clear those finished frames' locals: the message names what went wrong.
            traceback.clear_frames(e.__traceback__)
            raise
        model.name_or_path = str(ref)
        if isinstance(model.config, Config):
            object.__setattr__(model.config, "_fl_name_or_path", str(ref))  # config.name_or_path, as transformers'
        enginemod.kv_dtype(model, eng_opts)  # a kv_cache_dtype this backend cannot keep: refused here, not at generate
        model._engine = enginemod.Engine(model, eng_opts)
        model.load_stats["total_seconds"] = time.perf_counter() - t0
        model._source.update(threads=nthreads)
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
                "cache": "cold (O_DIRECT reads)" if info["direct_io"] else "warm (page cache)",
                "huge_pages": info["huge_pages"]}

    @classmethod
    def _load_safetensors(cls, path, want_dtype, dev, nthreads, progress, progress_callback, ext=False, quant=None,
                          overrides=None, adapter=None, use_safetensors=None):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
        ad = loramod.Adapter(adapter, ext) if adapter is not None else None
        try:
            return cls._load_safetensors_with(path, want_dtype, dev, nthreads, progress, progress_callback, ext, quant,
                                              overrides, ad, use_safetensors)
        finally:
            if ad is not None:
                ad.close()

    @classmethod
    def _load_safetensors_with(cls, path, want_dtype, dev, nthreads, progress, progress_callback, ext, quant, overrides,
                               ad, use_safetensors=None):
        cfg_first = _files.find_file(path, "config.json", allow_external=ext)
        packed = None
        if cfg_first is not None:  # a quantised checkpoint is named as such before its tensors are looked for
            packed = _checkpoint_quant(_files.read_json(cfg_first, os.path.join(path, "config.json")), path)
        if packed is None and (qc_real := _files.find_file(path, "quantize_config.json", allow_external=ext)):
            # older AutoGPTQ exports describe their packing only there (quant_method "gptq" unless it says otherwise)
            qc = _files.read_json(qc_real, os.path.join(path, "quantize_config.json"))
            packed = _checkpoint_quant({"quantization_config": {"quant_method": "gptq", **qc}}, path)
        qcore = quantmod.reconcile(quant, packed, path)
        # shards: every file goes through fastload/_files.py (plain names, inside the directory, regular files).
        # Which weights, in transformers' order (modeling_utils._get_resolved_checkpoint_files): model.safetensors,
        # model.safetensors.index.json, pytorch_model.bin, pytorch_model.bin.index.json (PyTorch .bin files are read
        # by fastload/torchbin.py, which never runs their pickle code). A single file beats an index beside it: a
        # save_pretrained into a directory that held the other layout leaves the old index (or file) behind.
        # use_safetensors=False skips safetensors, True refuses .bin, as transformers.
        choices = []
        if use_safetensors is not False:
            choices += [("safetensors", "model.safetensors", False), ("safetensors", "model.safetensors.index.json", True)]
        if use_safetensors is not True:
            choices += [("torch_bin", "pytorch_model.bin", False), ("torch_bin", "pytorch_model.bin.index.json", True)]
        kind = pick_name = pick_real = None
        for k, n, is_index in choices:
            found = _files.find_file(path, n, allow_external=ext)
            if found is not None:
                kind, pick_name, pick_real, index_name = k, n, found, n if is_index else None
                break
        real = {}
        if kind is None:
            if use_safetensors is True and any(os.path.lexists(os.path.join(path, n)) for n in
                                               ("pytorch_model.bin", "pytorch_model.bin.index.json")):
                raise FileNotFoundError(f"{path}: use_safetensors=True, but there is no model.safetensors or "
                                        "model.safetensors.index.json (only PyTorch .bin files)")
            if use_safetensors is False and _has_safetensors(path):
                raise FileNotFoundError(f"{path}: use_safetensors=False, but there is no pytorch_model.bin or "
                                        "pytorch_model.bin.index.json (only safetensors)")
            if any(f.startswith("pytorch_model") for f in os.listdir(path)):
                raise CheckpointError(f"{path}: pytorch_model* files but neither pytorch_model.bin nor "
                                      "pytorch_model.bin.index.json (the names transformers writes)")
            raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json, pytorch_model.bin, "
                                    "pytorch_model.bin.index.json or .gguf file")
        index_path = os.path.join(path, index_name or pick_name)
        index_real = pick_real if index_name else None
        if index_name:
            weight_map = _files.read_json(pick_real, index_path, _files.INDEX_LIMIT).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError(f"{index_path}: weight_map must map tensor names to shard file names")
            shard_names = sorted(set(weight_map.values()))
            for s in shard_names:
                real[s] = _files.find_file(path, s, f"shard name in {index_name}", allow_external=ext)
                if real[s] is None:
                    raise CheckpointError(f"{index_path}: shard '{s}' is listed in weight_map but {os.path.join(path, s)} does not exist")
        else:
            weight_map, shard_names, real = None, [pick_name], {pick_name: pick_real}

        cfg_path = os.path.join(path, "config.json")
        cfg_real = _files.find_file(path, "config.json", allow_external=ext)
        if cfg_real is None:
            raise FileNotFoundError(f"{path}: no config.json")
        hf = _files.read_json(cfg_real, cfg_path)
        if overrides and isinstance(hf, dict):
            _apply_overrides(hf, archmod.chatglm_overrides(overrides, cfg_path) if archmod.is_chatglm(hf) else overrides)
        hf = archmod.chatglm_view(hf, cfg_path)  # ChatGLM's own keys, read as the Hugging Face ones
        checks.check_config(hf, cfg_path)  # types, ranges and relations, before any arithmetic
        hf = Config(hf)
        arch = archmod.arch_for(hf, cfg_path)
        core_cfg = archmod.core_config(hf, arch, cfg_path)
        if arch.moe and packed is not None:
            raise NotImplementedError(f"{path}: {packed.name} checkpoints of {arch.name} (Mixture of Experts) are not "
                                      "supported; load the float checkpoint and quantise at load (load_in_4bit=True "
                                      "covers the experts)")
        stamps = {r: _stamp(r) for r in [cfg_real, index_real, *real.values()] if r}
        if kind == "torch_bin":  # the same file objects, built from the tensors' offsets in the zip
            files = {s: torchbin.open_file(real[s], os.path.join(path, s)) for s in shard_names}
        else:
            files = {s: _C.SafetensorsFile(real[s]) for s in shard_names}
        if want_dtype == "auto":
            cd = hf.get("dtype") or hf.get("torch_dtype")
            if not cd:
                # transformers' _get_dtype: without a dtype in config.json, "auto" is the dtype of the first
                # floating-point tensor of the first weights file
                first = files[shard_names[0]]
                cd = next((_ST_FLOAT[t] for t in (first.info(k)[0] for k in first.keys()) if t in _ST_FLOAT), "float32")
            cd = str(cd).replace("torch.", "")
            want_dtype = cd if cd in ("float16", "bfloat16", "float32") else "float32"
        where = {}
        for s, f in files.items():
            for k in f.keys():
                where.setdefault(k, s)
        if weight_map is not None:
            for name, s in weight_map.items():
                if name not in files[s]:
                    raise CheckpointError(f"{os.path.join(path, s)}: tensor '{name}' is listed in {index_path} but not in the shard")
                where[name] = s
        glob_names = archmod.HF_NAMES[arch.names][0]
        emb_name, head_name = glob_names["embed_tokens"], glob_names["lm_head"]
        if core_cfg["tie_embeddings"] and emb_name in where and head_name in where:
            # tie_word_embeddings with an lm_head tensor too: the same values (torch.save writes a tied weight under
            # both names) tie; different ones are used as the LM head, with transformers 5's warning (it unties)
            fe, fh = files[where[emb_name]], files[where[head_name]]
            if fe.info(emb_name)[:2] != fh.info(head_name)[:2] or \
                    not np.array_equal(np.asarray(fe.get(emb_name)), np.asarray(fh.get(head_name))):
                warnings.warn(f"{path}: config.json has tie_word_embeddings=true, but '{head_name}' differs from "
                              f"'{emb_name}': the checkpoint's LM head is used (not tied), as transformers does",
                              stacklevel=3)
                core_cfg["tie_embeddings"] = 0
                hf["tie_word_embeddings"] = False
            else:
                where.pop(head_name)  # the same matrix: tied, and not an unused tensor
        if ad is not None:
            if packed is not None and ad.layers:
                raise NotImplementedError(f"{ad.path}: LoRA on a {packed.name}-quantised base ({path}) is not supported "
                                          "(the merge needs the float weights); load the float checkpoint, with "
                                          "quantisation at load if wanted (quantised after the merge)")
            ad.check_targets({n[: -len(".weight")] for n in where if n.endswith(".weight")})
            stamps.update(ad.stamps)
        context = _context_bytes(dev)
        core = _C.Model(core_cfg, dtype=want_dtype, device=dev, threads=nthreads, **({"quant": qcore} if qcore else {}))
        items, used = [], set()
        for slot, layer, name, heads, expert in archmod.tensor_plan(arch, core_cfg, gguf=False, have=where):
            if packed is not None and (slot in quantmod.LINEAR_SLOTS or slot == "lm_head") and \
                    f"{name[:-len('.weight')]}.qweight" in where:
                # GPTQ / AWQ: P.qweight with P.qzeros, P.scales (and P.g_idx): one 6-tuple item, repacked by the core
                base = name[:-len(".weight")]
                pk, names = packed.packed(base, lambda n: files[where[n]], where)
                if pk is None:
                    raise CheckpointError(f"{path}: missing tensor '{names}' of the {packed.name} layer '{base}' "
                                          f"('{base}.qweight' is present)")
                items.append((archmod.SLOT[slot], layer, heads, files[where[base + ".qweight"]], base + ".qweight", pk))
                used.update(names)
                continue
            if name not in where:
                if packed is not None and slot in quantmod.LINEAR_SLOTS:
                    base = name[:-len(".weight")]
                    raise CheckpointError(f"{path}: missing tensor '{base}.qweight' ({packed.name} checkpoint; "
                                          f"nor is there a float '{name}') needed by {arch.name}")
                if slot == "lm_head" and not core_cfg["tie_embeddings"]:
                    raise CheckpointError(f"{path}: missing tensor '{name}' (config.json has tie_word_embeddings=false)")
                if packed is not None and name.endswith(".weight") and name[:-len(".weight")] + ".qweight" in where:
                    raise NotImplementedError(f"{path}: '{name[:-len('.weight')]}.qweight' is {packed.name}-packed, "
                                              f"which fastload reads for linear layers only ({arch.name} slot "
                                              f"'{slot}' is not one); a float '{name}' is needed")
                if name.endswith(".weight") and name[:-len(".weight")] + ".qweight" in where:
                    raise CheckpointError(f"{path}: missing tensor '{name}' needed by {arch.name}; the checkpoint has "
                                          f"'{name[:-len('.weight')]}.qweight' but neither config.json nor "
                                          "quantize_config.json has a quantization_config saying how it is packed")
                raise CheckpointError(f"{path}: missing tensor '{name}' needed by {arch.name}")
            if ad is not None and slot == "embed_tokens" and name in ad.replaced and core_cfg["tie_embeddings"]:
                # PEFT replaces the input embedding only (the tied LM head keeps the base's matrix); fastload holds
                # one tied matrix, which would make the adapter's embedding the LM head too
                raise NotImplementedError(
                    f"{ad.weights_path}: tensor '{ad.replaced[name]}' (modules_to_save) replaces the embedding of a "
                    f"model with tie_word_embeddings ({path}): PEFT keeps the base matrix as the LM head, fastload "
                    "ties one matrix; merge the adapter with PEFT (merge_and_unload() + save_pretrained) and load that")
            if ad is not None and (name in ad.replaced or ad.item_lora(name)):
                # modules_to_save: the adapter's whole tensor instead of the base's; LoRA: merged at load (7th element)
                src = (ad.file, ad.replaced[name]) if name in ad.replaced else (files[where[name]], name)
                items.append((archmod.SLOT[slot], layer, heads, *src, None, ad.item_lora(name)) +
                             ((expert,) if slot in archmod.MOE_SLOTS else ()))
            else:
                item = (archmod.SLOT[slot], layer, heads, files[where[name]], name)
                # (packed, lora, expert index)
                items.append(item + (None, None, expert) if slot in archmod.MOE_SLOTS else item)
            used.add(name)
        if ad is not None:
            for mod, (a, *_) in ad.layers.items():
                if mod + ".weight" not in used:
                    why = " (tie_word_embeddings: the LM head is the embedding matrix)" if mod == "lm_head" else ""
                    raise NotImplementedError(f"{ad.weights_path}: tensor '{a}': '{mod}' is not a weight fastload "
                                              f"loads for {arch.name}{why}")
            for name, t in ad.replaced.items():
                if name not in used:
                    raise NotImplementedError(f"{ad.weights_path}: tensor '{t}' (modules_to_save) replaces '{name}', "
                                              f"which fastload does not load for {arch.name}")
        if packed is not None and not any(len(it) == 6 for it in items):
            warnings.warn(f"{path}: config.json has a {packed.name} quantization_config but no layer is stored "
                          "packed (no '.qweight' tensors): loaded as a float checkpoint", stacklevel=3)
            packed = None
        unused = [n for n in where if n not in used and not n.endswith(archmod.IGNORED_SUFFIXES)]
        if kind == "torch_bin" and unused:
            # torch.save keeps tied weights under every name (lm_head.weight next to embed_tokens.weight, one
            # storage): a name whose bytes are those of a used tensor is that tensor, not an unused one
            used_at = {(where[n], files[where[n]].info(n)) for n in used if n in where}
            unused = [n for n in unused if (where[n], files[where[n]].info(n)) not in used_at]
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
        if ad is not None:
            stats["lora"] = ad.summary()
        model = cls(core, hf, arch, gen, dev, want_dtype, path, stats)
        model._context_bytes = context
        model._source = {"kind": kind, "path": path, "ext": ext, "files": stamps, "quant": quant,
                         "adapter": ad.path if ad is not None else None, "use_safetensors": use_safetensors}
        model._set_quant(quant, packed)
        return model

    @classmethod
    def _load_gguf(cls, path, want_dtype, dev, nthreads, progress, progress_callback, real=None, quant=None,
                   overrides=None):
        stamps = {real or path: _stamp(real or path)}
        g = _C.GGUFFile(real or path)  # real: `path` checked and resolved by fastload/_files.py
        meta = g.metadata
        arch, hf, names, tensors = _gguf_hf_config(g, path)
        if overrides:
            _apply_overrides(hf, overrides)
            checks.check_config(hf, path, names)
        core_cfg = archmod.core_config(hf, arch, path, names)
        if want_dtype == "auto":
            want_dtype = "float16"  # dequantised GGUF weights: float16 keeps 10 mantissa bits at half of f32's bytes
        qcore = quantmod.reconcile(quant, None, path, gguf=True)
        context = _context_bytes(dev)
        core = _C.Model(core_cfg, dtype=want_dtype, device=dev, threads=nthreads, **({"quant": qcore} if qcore else {}))
        items, float_linear, kept = [], 0, set()
        scheme = quant.scheme if isinstance(quant, quantmod.QuantConfig) else None
        for slot, layer, name, heads, _ in archmod.tensor_plan(arch, core_cfg, gguf=True):
            if name not in tensors:
                raise CheckpointError(f"{path}: missing tensor '{name}' needed by {arch.name}")
            items.append((archmod.SLOT[slot], layer, heads, g, name))
            if slot in quantmod.LINEAR_SLOTS or (slot == "lm_head" and scheme not in (None, "none")
                                                 and quant.effective_lm_head != "none"):
                if tensors[name][1] in ("F32", "F16", "BF16"):
                    float_linear += 1  # what a scheme quantises: the file's float linear weights
                else:
                    kept.add(tensors[name][1])
        planned = {it[4] for it in items} | {"rope_freqs.weight"}  # rope_freqs: read into rope_scaling above
        extra = sorted(set(tensors) - planned)
        if extra:
            g.close()
            raise NotImplementedError(f"{path}: {len(extra)} tensor(s) fastload does not know what to do with for "
                                      f"{arch.name}: {extra[:4]}; dropping them would run another model than the file's")
        stats = cls._finish(core, items, 1, os.path.basename(path), progress, progress_callback)
        g.close()
        if scheme not in (None, "none") and not quantmod.report(core).get("quantized_weights"):
            # The core quantises float sources only: a GGUF's quantised blocks expanded by gguf="dequantize" stay in
            # the float dtype. Refused rather than handing back a float model that claims to be quantised.
            raise NotImplementedError(
                f"{path}: quantization_config asks for {scheme} with gguf='dequantize', but quantising a GGUF's "
                "dequantised blocks at load is not supported (nothing was quantised); use gguf='keep' (the file's own "
                "quantisation, kept exactly) or save_pretrained() the dequantised model and load that with the scheme")
        gen = _gguf_generation_config(meta, path)
        hf.update({k: gen[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")})
        model = cls(core, hf, arch, gen, dev, want_dtype, path, stats)
        model._context_bytes = context
        model._source = {"kind": "gguf", "path": path, "real": real, "files": stamps, "quant": quant}
        if scheme not in (None, "none") and not float_linear and getattr(quant, "gguf", "keep") == "keep":
            # every linear weight is one of the file's quantised types, kept as they are: the scheme quantised nothing,
            # and the model says what it holds (not is_loaded_in_8bit / a fastload scheme it does not have)
            warnings.warn(f"{path}: quantization_config asks for {scheme}, but every linear weight of this GGUF is "
                          f"already quantised ({', '.join(sorted(kept))}), kept as the file has it: {scheme} applies "
                          "to nothing here", UserWarning, stacklevel=3)
            quant = None
        model._set_quant(quant, None, gguf=True)
        return model

    # ------------------------------------------------------------------ inference
    def __call__(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, **kwargs):
        return self.forward(input_ids, attention_mask=attention_mask, position_ids=position_ids, labels=labels, **kwargs)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, use_cache=None,
                return_dict=None, **kwargs):
        """Logits for every position, as transformers' forward (position_ids default to 0..T-1 even with
        left padding, as there). With `labels`, also the mean next-token cross-entropy (ignore index -100).
        A request to the model's engine (fastload/engine.py), run whole by its scheduler between decode steps, so
        forwards from any threads and generate calls beside them are safe; the caller waits with the GIL released."""
        for k in kwargs:
            if k == "token_type_ids":  # some tokenizers return it; decoder-only models ignore it (transformers too)
                continue
            if k not in ("output_attentions", "output_hidden_states") or kwargs[k]:
                raise TypeError(f"forward: argument {k!r} is not supported")
        like_torch = is_torch(input_ids)
        ids = _ids2d(input_ids, "input_ids")
        if ids is None:
            raise ValueError("forward needs input_ids")
        mask = _ids2d(attention_mask, "attention_mask")
        pos = _ids2d(position_ids, "position_ids")
        logits = self._engine_handle().forward(ids, None if mask is None else (mask != 0).astype(np.uint8), pos)
        out = CausalLMOutput(logits=_to_user(logits, like_torch))
        if labels is not None:
            lab = _ids2d(labels, "labels")
            out = CausalLMOutput(loss=_to_user(np.asarray(_ce_loss(logits, lab)), like_torch), logits=out["logits"])
        # return_dict=False: transformers' tuple, (loss, logits) or (logits,) (no past_key_values: fastload's forward
        # keeps no cache for the caller)
        return out if return_dict is None or return_dict else out.to_tuple()

    def _gen_settings(self, generation_config, kwargs):
        """The settings one generate() call uses, as transformers 5 merges them: the passed generation_config's
        explicitly set fields over the model's generation_config over the defaults, then every keyword argument
        (None included) over all of them. Neither the model's config nor the passed one is changed. Values are
        checked here (types, ranges, unsupported fields), so callers can validate before starting a thread.
        Returns (the merged GenerationConfig, its checked and typed values from _resolve_settings)."""
        kwargs = {k: v for k, v in kwargs.items() if not (k in _NEUTRAL_CALL_ARGS and _is_neutral(v))}
        unknown = [k for k in kwargs if k not in GEN_KEYS and k not in GenerationConfig.FIELDS]
        if unknown:
            raise TypeError(f"generate: unsupported argument(s) {unknown}; supported: {sorted(GEN_KEYS)}")
        layers = (("model.generation_config", _explicit(self.generation_config, "model.generation_config")),
                  ("generate: generation_config", _explicit(generation_config)),
                  ("generate", {k: v for k, v in kwargs.items() if k != "streamer"}))
        gc = GenerationConfig()
        for _, d in layers:
            gc.update(d)
        # A sampling rule fastload does not implement, set by the model's own generation_config.json (not by this
        # call): warn and generate without it rather than refuse every generate() of that model. Passed by the
        # caller, the same field is an error (_resolve_settings).
        # num_beams > 1 likewise (README: "set by a model's own generation_config.json: a warning"): greedy / sampling.
        for k, neutral in (*_UNSUPPORTED_FIELDS.items(), *_REFUSED_FIELDS.items()):
            if k in layers[0][1] and not any(k in d for _, d in layers[1:]) and not _off(k, gc.get(k), neutral):
                warnings.warn(f"{self.name_or_path}: the model's generation config sets {k}={gc.get(k)!r}, which "
                              f"fastload does not implement; generating without it (pass {k}={neutral!r} to silence)",
                              stacklevel=3)
                gc[k] = None if k in _UNSUPPORTED_FIELDS else neutral
        return gc, _resolve_settings(gc, layers)

    def can_generate(self) -> bool:
        """transformers' PreTrainedModel.can_generate: every fastload causal LM generates."""
        return True

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

    def compute_transition_scores(self, sequences, scores, beam_indices=None, normalize_logits=False):
        """transformers' compute_transition_scores: [batch, new tokens], the score of
        each generated token at its step (scores: generate's output_scores or output_logits tuple);
        normalize_logits=True takes the log softmax of each step's row first (log-probabilities). float32, torch
        when `sequences` is a torch tensor."""
        like_torch = is_torch(sequences)
        if beam_indices is not None:
            return self._beam_transition_scores(sequences, scores, beam_indices, normalize_logits, like_torch)
        seq = _ids2d(sequences, "sequences")
        if not isinstance(scores, (tuple, list)) or not scores:
            raise ValueError("compute_transition_scores: scores must be generate's non-empty tuple of [batch, vocab] "
                             "arrays (return_dict_in_generate=True, output_scores=True)")
        sc = np.stack([np.asarray(_as_numpy(x, "scores"), dtype=np.float32) for x in scores])  # [steps, B, V]
        steps = sc.shape[0]
        if sc.ndim != 3 or sc.shape[1] != seq.shape[0] or steps > seq.shape[1]:
            raise ValueError(f"compute_transition_scores: scores of {steps} steps of shape {sc.shape[1:]} do not match "
                             f"sequences of shape {seq.shape}")
        tok = seq[:, seq.shape[1] - steps:].astype(np.int64).T  # [steps, B]
        if tok.size and (tok.min() < 0 or tok.max() >= sc.shape[2]):
            raise ValueError(f"compute_transition_scores: a token id of sequences is outside the scores' {sc.shape[2]} "
                             "columns")
        if normalize_logits:
            mx = sc.max(axis=2, keepdims=True)
            with np.errstate(invalid="ignore", over="ignore"):
                sc = sc - (mx + np.log(np.exp(sc - mx).sum(axis=2, keepdims=True)))
        out = np.take_along_axis(sc, tok[:, :, None], axis=2)[:, :, 0].T
        return _to_user(np.ascontiguousarray(out), like_torch)

    def _beam_transition_scores(self, sequences, scores, beam_indices, normalize_logits, like_torch):
        """compute_transition_scores with beam_indices (beam search's output), transformers' steps: each step's score
        of each hypothesis' token, read from the row of the beam it came from; 0 past a hypothesis' end."""
        seq = _ids2d(sequences, "sequences")
        bi = _ids2d(beam_indices, "beam_indices").astype(np.int64)
        if not isinstance(scores, (tuple, list)) or not scores:
            raise ValueError("compute_transition_scores: scores must be generate's non-empty tuple of [batch * num_beams, "
                             "vocab] arrays (return_dict_in_generate=True, output_scores=True)")
        sc = np.stack([np.asarray(_as_numpy(x, "scores"), dtype=np.float32) for x in scores])  # [steps, B*K, V]
        steps, rows, V = sc.shape
        if normalize_logits:
            mx = sc.max(axis=2, keepdims=True)
            with np.errstate(invalid="ignore", over="ignore"):
                sc = sc - (mx + np.log(np.exp(sc - mx).sum(axis=2, keepdims=True)))
        masked = bi < 0
        n = int((~masked).sum(axis=1).max(initial=0))
        bi, masked = bi[:, :n].copy(), masked[:, :n]
        bi[masked] = 0
        if n > steps or bi.size and (bi.max() >= rows) or bi.shape[0] != seq.shape[0] or n > seq.shape[1]:
            raise ValueError(f"compute_transition_scores: beam_indices of shape {bi.shape} do not match scores of "
                             f"{steps} steps of {rows} rows and sequences of shape {seq.shape}")
        tok = seq[:, seq.shape[1] - n:].astype(np.int64)
        if tok.size and (tok.min() < 0 or tok.max() >= V):
            raise ValueError(f"compute_transition_scores: a token id of sequences is outside the scores' {V} columns")
        out = sc[np.arange(n)[None, :], bi, tok] if n else np.zeros((seq.shape[0], 0), np.float32)
        out = np.where(masked, np.float32(0), out).astype(np.float32)
        return _to_user(np.ascontiguousarray(out), like_torch)

    def _generate(self, input_ids, attention_mask, generation_config, streamer, inputs, kwargs):
        if input_ids is not None and inputs is not None:
            raise ValueError("generate: `inputs` and `input_ids` were both passed; pass one of them (transformers "
                             "refuses both too)")
        if input_ids is None:
            input_ids = inputs
        kwargs = dict(kwargs)
        tokenizer = kwargs.pop("tokenizer", None)
        position_ids = kwargs.pop("position_ids", None)
        gcm, r = self._gen_settings(generation_config, kwargs)
        if input_ids is None:  # unconditional generation starts from the bos token (transformers)
            bos = gcm.get("bos_token_id")
            bos = bos[0] if isinstance(bos, (list, tuple)) and bos else bos
            if bos is None:
                raise ValueError("generate needs input_ids (or a bos_token_id to start from)")
            input_ids = np.array([[int(bos)]], dtype=np.int64)
        _check_position_ids(position_ids, input_ids, attention_mask)
        like_torch = is_torch(input_ids)
        ids = _ids2d(input_ids, "input_ids")
        mask = _ids2d(attention_mask, "attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        eos = r["eos_token_id"]
        if mask is None and r["pad_token_id"] is not None and r["pad_token_id"] not in eos \
                and (ids == r["pad_token_id"]).any():
            # transformers' _prepare_attention_mask_for_generation: without a mask, the pad token (one that is not an
            # eos) marks padding, as `tok(batch, padding=True).input_ids` alone gives it. Here only the runs of it
            # at the start or the end of a row (left or right padding): transformers also masks a pad token inside
            # the text (a chat model's <|im_end|> between turns when eos is overridden), leaving a hole in the row.
            is_pad = ids == r["pad_token_id"]
            lead = np.logical_and.accumulate(is_pad, axis=1)
            trail = np.logical_and.accumulate(is_pad[:, ::-1], axis=1)[:, ::-1]
            if (lead | trail).any():
                mask = (~(lead | trail)).astype(np.int64)
        if mask is not None and ids.shape[0] > 1 and ((mask[:, -1] == 0) & (mask != 0).any(axis=1)).any():
            # transformers generates after the pads of a right-padded row (and warns); fastload reads each row's
            # tokens where the mask is 1, so a right-padded row continues from its last real token, as the same
            # row alone or left-padded would (README "Coming from transformers")
            warnings.warn("A decoder-only architecture is being used, but right-padding was detected! transformers "
                          "would generate after the pad tokens; fastload continues each row from its last unmasked "
                          "token (as with padding_side='left', which transformers recommends)", UserWarning,
                          stacklevel=3)
        T = ids.shape[1]
        max_new = r["max_new_tokens"]
        ctx = enginemod.context_length(self)
        if max_new is None and r.get("default_max_length"):
            # transformers 5 (_prepare_generated_length): with no length set anywhere, the default max_length (20)
            # counts new tokens, the total capped at max_position_embeddings, and it warns
            warnings.warn(f"Using the model-agnostic default `max_length` (={r['max_length']}) to control the generation "
                          "length. We recommend setting `max_new_tokens` to control the maximum length of the "
                          "generation.", UserWarning, stacklevel=3)
            max_len = r["max_length"] + T
            pos = self.config.get("max_position_embeddings")
            max_new = (min(max_len, int(pos)) if pos else max_len) - T
            if max_new <= 0:
                raise ValueError(f"input length {T} reaches max_position_embeddings={pos}")
        elif max_new is None:
            max_new = r["max_length"] - T
            if max_new <= 0:
                raise ValueError(f"input length {T} reaches max_length={r['max_length']}; set max_new_tokens")
        min_new = r["min_new_tokens"]
        if min_new is None:
            min_new = max(0, r["min_length"] - T)
        longest = int(T if mask is None else (mask != 0).sum(axis=1).max(initial=0))
        if ctx and 0 < longest < ctx < longest + max_new:
            # transformers warns and goes on past the context; fastload's KV cache ends there (README "Coming from
            # transformers")
            warnings.warn(f"generate: a prompt of {longest} tokens plus max_new_tokens={max_new} passes the model's "
                          f"context of {ctx} tokens (max_position_embeddings); generation stops at {ctx} tokens, "
                          f"min_new_tokens included", stacklevel=3)
        pad = r["pad_token_id"]
        if pad is None:
            pad = eos[0] if eos else 0
        if r["num_beams"] > 1 and streamer is not None:
            if r["num_beams_source"] != "model.generation_config":
                raise ValueError("`streamer` cannot be used with beam search (yet!). Make sure that `num_beams` is set "
                                 "to 1.")
            # the model's own generation_config.json asks for beams: streaming callers (stream_chat, the server, a
            # TextIteratorStreamer) go on greedy / sampling instead of failing every streamed request of that model
            warnings.warn(f"{self.name_or_path}: the model's generation config sets num_beams={r['num_beams']}, which "
                          "cannot stream; generating without beams", stacklevel=3)
            r["num_beams"] = 1
            if r["num_return_sequences"] > 1 and not r["do_sample"]:
                r["num_return_sequences"] = 1
        if r["num_beams"] > 1:
            # transformers' output_fill_value: `pad_token_id or eos_token_id[0] if eos_token_id is not None else -1`
            fill = (r["pad_token_id"] or eos[0]) if eos else -1
            out, seq_scores, bidx, steps = self._engine_handle().beam_generate(ids, mask, max_new, min_new, r, eos,
                                                                               int(fill))
            if not r["return_dict_in_generate"]:
                return _to_user(out, like_torch)
            sc = r["output_scores"]
            return GenerateBeamDecoderOnlyOutput(
                sequences=_to_user(out, like_torch), beam_indices=_to_user(bidx, like_torch),
                sequences_scores=_to_user(seq_scores, like_torch) if sc else None,
                scores=tuple(_to_user(np.ascontiguousarray(x), like_torch) for x in steps) if sc and steps else None)
        nrs = r["num_return_sequences"]
        if nrs > 1:
            ids = np.repeat(ids, nrs, axis=0)
            mask = None if mask is None else np.repeat(mask, nrs, axis=0)
        seed = r["seed"]
        seed = _global_rng.getrandbits(63) if seed is None else seed
        if streamer is not None:
            streamer.put(_to_user(ids.astype(np.int64), like_torch))
        eng = self._engine_handle()
        stops = r["stop_strings"]
        if stops and tokenizer is None:
            raise ValueError("generate: stop_strings need the tokenizer: pass tokenizer=tok (as transformers)")
        if stops and streamer is not None and ids.shape[0] > 1:
            raise NotImplementedError("generate: stop_strings with a streamer of a batch of several rows")
        put = None if streamer is None else (lambda t: streamer.put(_to_user(np.atleast_1d(np.asarray(t, np.int64)),
                                                                            like_torch)))
        keep, on_record = None, None
        if r["return_dict_in_generate"] and (r["output_scores"] or r["output_logits"]):
            keep = {"keep_scores": r["output_scores"], "keep_logits": r["output_logits"]}
        lp = getattr(streamer, "_fastload_logprobs", None)  # fastload's own streamers (the server's OpenAI logprobs)
        if lp is not None:
            if ids.shape[0] > 1:
                raise NotImplementedError("generate: a logprobs streamer takes one row")
            keep, on_record = dict(keep or {}, logprobs=int(lp)), streamer._fastload_record
        try:
            res = eng.generate(ids, mask, max_new, min_new, r, seed & 0xFFFFFFFFFFFFFFFF, eos, int(pad), on_token=put,
                               stops=stops, tokenizer=tokenizer, max_time=r["max_time"], keep=keep,
                               on_record=on_record, on_submit=getattr(streamer, "_fastload_bind", None))
        except RuntimeError:  # the requests ended "cancelled": by the streamer's cancel() before a token came
            if getattr(streamer, "_cancelled", False):
                from .streamers import GenerationCancelled
                raise GenerationCancelled("the consumer of this streamer cancelled the generation") from None
            raise
        out, recs = res if keep is not None else (res, None)
        if not r["return_dict_in_generate"]:
            return _to_user(out, like_torch)
        V = int(self.config.vocab_size)
        per_step = {}
        for name, on, off in (("scores", r["output_scores"], 0), ("logits", r["output_logits"],
                                                                   V if r["output_scores"] else 0)):
            if on:
                per_step[name] = _per_step(recs, off, V, out.shape[1] - T, int(pad), like_torch,
                                           renormalize=name == "scores" and bool(gcm.get("renormalize_logits")))
        return GenerateDecoderOnlyOutput(sequences=_to_user(out, like_torch), **per_step)

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
        gc, r = self._gen_settings(passed, gen_kwargs)
        user = {**_explicit(passed), **gen_kwargs}
        if gc.get("max_new_tokens") is None and user.get("max_length") is None:
            gc["max_new_tokens"] = 512
        eos = r["eos_token_id"]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        gc["eos_token_id"] = eos
        out = {"generation_config": gc, "tokenizer": tokenizer}  # for stop_strings (chat's own tokenizer argument)
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
        given (pairs when empty). The prompt is rendered with the tokenizer's chat template; with ChatGLM's own
        tokenizer (fastload.chatglm_tokenizer) it is built as THUDM's chat() builds it, per version (_glm_chat)."""
        if getattr(tokenizer, "chatglm_version", None):
            return self._glm_chat(tokenizer, query, history, role, system, gen_kwargs)
        history, msgs = self._chat_messages(query, history, role, system)
        enc, gen_kwargs = self._chat_inputs(tokenizer, msgs, gen_kwargs)
        out = self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **gen_kwargs)
        response = tokenizer.decode(np.asarray(out)[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
        return response, self._chat_history(history, query, response, role)

    def stream_chat(self, tokenizer, query, history=None, role="user", system=None, past_key_values=None,
                    return_past_key_values=False, **gen_kwargs):
        """ChatGLM-style streaming chat: yields (response so far, history) as text arrives. Bad arguments raise
        here before any thread starts; an error in the generating thread is raised here at once (the streamer
        carries it). THUDM's demo loop passes past_key_values back in and asks return_past_key_values=True: accepted,
        and the triples (response, history, None) are yielded; fastload keeps no cache for the caller (the engine's
        prefix cache already reuses the pages of the conversation so far), so what is passed is not read."""
        del past_key_values  # see the docstring
        if return_past_key_values:
            for response, hist in self.stream_chat(tokenizer, query, history, role, system, **gen_kwargs):
                yield response, hist, None
            return
        if getattr(tokenizer, "chatglm_version", None):
            yield from self._glm_stream_chat(tokenizer, query, history, role, system, gen_kwargs)
            return
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
        th = threading.Thread(target=run, daemon=True, name="fastload-stream_chat")
        th.start()
        response = ""
        finished = False
        try:
            for piece in streamer:
                response += piece
                yield response.strip(), self._chat_history(history, query, response.strip(), role)
            finished = True
        finally:
            if not finished:
                # The consumer stopped early (broke out of its loop, closed the generator, or raised): stop the
                # generation at its next token instead of letting it run to max_new_tokens holding the model.
                streamer.cancel()
        th.join()

    # ------------------------------------------------------------------ ChatGLM2 / ChatGLM3's chat
    def _glm_inputs(self, tokenizer, query, history, role, system, gen_kwargs):
        """THUDM's chat(): the prompt (ChatGLM2: build_prompt, "[Round N]..."; ChatGLM3: build_chat_input, role
        tokens), its sampling defaults (max_length 8192, do_sample, top_p 0.8, temperature 0.8; the caller's
        arguments win) and stop ids (</s>; ChatGLM3 also <|user|>, <|observation|>)."""
        v = tokenizer.chatglm_version
        from .chatglm_tokenizer import glm_history
        history = glm_history(history, v)
        if v == 2:
            if role != "user" or system is not None:
                raise ValueError("ChatGLM2's chat has no roles or system prompt (role='user', system=None)")
            enc = tokenizer([tokenizer.build_prompt(query, history)], return_tensors="np")
            stops = []
        else:
            if system is not None and not (history and history[0].get("role") == "system"):
                history = [{"role": "system", "content": str(system)}] + history
            enc = tokenizer.build_chat_input(query, history=history, role=role)
            stops = [tokenizer.get_command("<|user|>"), tokenizer.get_command("<|observation|>")]
        kw = {"max_length": 8192, "do_sample": True, "top_p": 0.8, "temperature": 0.8}
        kw.update(gen_kwargs)
        if kw.get("logits_processor", 0) is None:
            kw.pop("logits_processor")
        eos = kw.pop("eos_token_id", None)
        if eos is None:
            eos = self.generation_config.eos_token_id
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        eos = eos + [tokenizer.get_command("<eos>")] + stops
        kw["eos_token_id"] = list(dict.fromkeys(int(e) for e in eos))
        kw["tokenizer"] = tokenizer  # for stop_strings (chat's own tokenizer argument)
        return history, enc, kw

    @staticmethod
    def _glm_response(tokenizer, ids, eos, query, history, role):
        """(response, history) as THUDM's process_response: ChatGLM2 strips the text and appends (query, response);
        ChatGLM3 drops a final stop token, appends {"role", "content": query} and each "<|assistant|>" part as
        {"role": "assistant", "metadata", "content"}; a part with metadata is a tool call: with tools in the system
        message its "tool_call(k=v, ...)" becomes {"name", "parameters"} (read with ast.literal_eval, never run),
        else {"name", "content"}."""
        if tokenizer.chatglm_version == 2:
            response = tokenizer.decode(ids).strip().replace("[[训练时间]]", "2023年")
            return response, history + [(query, response)]
        if ids and ids[-1] in eos:
            ids = ids[:-1]
        output = tokenizer.decode(ids)
        history = [dict(h) for h in history] + [{"role": role, "content": query}]
        content = ""
        for part in output.split("<|assistant|>"):
            metadata, content = part.split("\n", 1) if "\n" in part else ("", part)
            if not metadata.strip():
                content = content.strip()
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                content = content.replace("[[训练时间]]", "2023年")
            else:
                history.append({"role": "assistant", "metadata": metadata, "content": content})
                if history[0]["role"] == "system" and "tools" in history[0]:
                    args = _tool_call_args("\n".join(content.split("\n")[1:-1]))
                    content = {"name": metadata.strip(), "parameters": args}
                else:
                    content = {"name": metadata.strip(), "content": content}
        return content, history

    def _glm_chat(self, tokenizer, query, history, role, system, gen_kwargs):
        history, enc, kw = self._glm_inputs(tokenizer, query, history, role, system, gen_kwargs)
        out = self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
        ids = [int(t) for t in np.asarray(out)[0, enc["input_ids"].shape[1]:]]
        return self._glm_response(tokenizer, ids, kw["eos_token_id"], query, history, role)

    def _glm_stream_chat(self, tokenizer, query, history, role, system, gen_kwargs):
        """Yields (response, history) after each new token whose text does not end in an unfinished character
        ("\ufffd"), as THUDM's stream_chat; closing the generator early stops the generation."""
        from .streamers import IdIteratorStreamer
        history, enc, kw = self._glm_inputs(tokenizer, query, history, role, system, gen_kwargs)
        if "streamer" in kw:
            raise TypeError("stream_chat makes its own streamer; pass streamer= to chat() or generate() instead")
        streamer = IdIteratorStreamer()

        def run():
            try:
                self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], streamer=streamer, **kw)
            except BaseException:  # noqa: BLE001 - generate handed it to the streamer, which raises it below
                pass
        th = threading.Thread(target=run, daemon=True, name="fastload-stream_chat")
        th.start()
        finished = False
        ids, pending = [], False
        try:
            for ids in streamer:
                text = tokenizer.decode(ids[:-1] if ids[-1] in kw["eos_token_id"] else ids)
                if text and text[-1] != "\ufffd":
                    try:
                        out = self._glm_response(tokenizer, ids, kw["eos_token_id"], query, history, role)
                    except ValueError:  # a ChatGLM3 tool call not complete yet: read once it is (or at the end)
                        pending = True
                        continue
                    pending = False
                    yield out
            finished = True
            if pending:  # the whole reply, read as chat() reads it (a malformed tool call raises here, as there)
                yield self._glm_response(tokenizer, ids, kw["eos_token_id"], query, history, role)
        finally:
            if not finished:
                streamer.cancel()
        th.join()

    # ------------------------------------------------------------------ FastLLM's API
    # (_GLM_REWRITE: the placeholder ChatGLM's replies rewrite, see _glm_response)
    def _own_tokenizer(self):
        """The model's own tokenizer (FastLLM's models carry one): loaded once from where the model came from."""
        tok = getattr(self, "_tokenizer", None)
        if tok is None:
            from .tokenizer import AutoTokenizer
            tok = self._tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        return tok

    @staticmethod
    def _fastllm_kwargs(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, gen_kwargs):
        kw = dict(gen_kwargs)
        for k, v in (("max_new_tokens", max_length), ("do_sample", do_sample), ("top_p", top_p), ("top_k", top_k),
                     ("temperature", temperature), ("repetition_penalty", repeat_penalty)):
            if v is not None:
                kw[k] = v
        return kw

    def response(self, query, history=None, max_length=None, do_sample=None, top_p=None, top_k=None, temperature=None,
                 repeat_penalty=None, **gen_kwargs) -> str:
        """FastLLM's model.response(query, history): the answer as a string, with the model's own tokenizer and chat
        template (as chat()). max_length is the most new tokens (FastLLM's output limit), repeat_penalty the
        repetition penalty; other settings as generate(). Safe from any number of threads (the engine batches)."""
        kw = self._fastllm_kwargs(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, gen_kwargs)
        return self.chat(self._own_tokenizer(), query, history=history, **kw)[0]

    def stream_response(self, query, history=None, max_length=None, do_sample=None, top_p=None, top_k=None,
                        temperature=None, repeat_penalty=None, one_by_one=True, **gen_kwargs):
        """FastLLM's model.stream_response: yields the answer as it is generated, each new piece (one_by_one=True,
        FastLLM's default) or the whole answer so far. Closing the generator stops the generation."""
        kw = self._fastllm_kwargs(max_length, do_sample, top_p, top_k, temperature, repeat_penalty, gen_kwargs)
        sent, last = "", ""
        for resp, _ in self.stream_chat(self._own_tokenizer(), query, history=history, **kw):
            last = resp
            if not one_by_one:
                if resp != sent:
                    yield resp
                    sent = resp
                continue
            if not isinstance(resp, str):  # a ChatGLM3 tool call (a dict) comes whole, at the end
                continue
            # ChatGLM's reply rewrites "[[训练时间]]" once it is complete: a piece that may still become it waits,
            # so that the pieces always add up to response()
            stable = resp
            for k in range(len(_GLM_REWRITE) - 1, 0, -1):
                if stable.endswith(_GLM_REWRITE[:k]):
                    stable = stable[:-k]
                    break
            if stable.startswith(sent) and len(stable) > len(sent):
                yield stable[len(sent):]
                sent = stable
        if one_by_one:
            if isinstance(last, str):
                if last.startswith(sent) and last != sent:
                    yield last[len(sent):]
            else:
                yield last

    def _engine_handle(self):
        if self._engine is None:
            self._engine = enginemod.Engine(self, enginemod.options())
        return self._engine

    def configure_engine(self, **kwargs):
        """Change the engine settings (fastload/engine.py: kv_cache_memory, max_num_seqs, max_queue, engine,
        prefill_chunk, kv_page_tokens, prefix_caching, kv_cache_dtype, preemption_mode). Takes effect at once when no
        request is running: the pool is freed and made again at the next generate."""
        unknown = sorted(set(kwargs) - set(enginemod.ENGINE_KEYS))
        if unknown:
            raise TypeError(f"configure_engine: unknown setting(s) {unknown}; known: {list(enginemod.ENGINE_KEYS)}")
        old = self._engine_handle()
        opts = enginemod.options(**{**{k: v for k, v in old.opts.items() if k in enginemod.ENGINE_KEYS}, **kwargs})
        enginemod.kv_dtype(self, opts)  # refused here, before the running engine is replaced
        new = enginemod.Engine(self, opts)
        old.close(new)  # refuses while requests or forward calls run; calls that took `old` meanwhile go to `new`
        self._engine = new
        return self

    def engine_stats(self):
        """The engine's counters (None before the first generate or forward): pool pages (n_pages, page_tokens,
        pages_used, pages_cached: prompt pages kept for reuse; 0 until the first generate makes the pool), requests
        waiting / running, steps, decode_rows, prefill_tokens, prefix_hit_tokens (prompt tokens taken from shared
        pages), preemptions, replayed_tokens (decode rows that fed a preempted request's generated tokens again),
        peaks; forwards_waiting / forwards_running, forwards (run to the end), forward_tokens,
        forward_chunks (their passes: one, or one a chunk for a forward longer than prefill_chunk) and forward_kv_peak
        (bytes of the largest transient KV cache a forward had); pipelined_steps (decode steps launched before the
        tokens of the step before were read) and wasted_rows (rows such a step computed for a request that had just
        ended on eos, dropped); on the CPU, cpu_threads_now (the threads its kernels use now: all cores, fewer while
        other processes keep some busy, unless a count was given)."""
        st = self._engine_handle().stats()
        if st is not None and self.device == "cpu":
            st["cpu_threads_now"] = self._core.info["cpu_threads_now"]
        return st

    # ------------------------------------------------------------------ facts
    def memory_stats(self) -> dict:
        """Bytes this model holds on its device, by use (and kv_cache_dtype, kv_cache_bytes_per_token: what one token's
        keys and values take, every layer). kv_cache_pool: the engine's paged KV pool, made at the first
        generate and kept (kv_cache_memory= sets it); kv_cache_pool_used / kv_cache_pool_cached: its pages held by
        requests now / kept as shared prompt prefixes; kv_cache_pool_peak_used: the most pages requests held at once;
        kv_cache_last: the transient cache of the most recent forward() (B x T slots, made and freed by the engine's
        scheduler in the step that ran it, outside the pool; kv_cache_now is 0), which peak includes. quantized_weights / quantized_bytes (codes with their
        scales and offsets) / float_bytes split the weights, and layouts sums them per kind ({"int4 g128":
        {"weights": n, "bytes": b}, "float16": {...}}). workspace: activations of the largest step (per token) plus
        logits of the most logit rows asked for (one per sequence in generate)."""
        info = self._core.info
        eng = self._engine_handle()
        es = eng.stats() or {}
        pool = es.get("pool_bytes", 0)
        # a page's keys and values (the pool is n_pages + the null page, plus the allocator's alignment: dividing it
        # overstated a page of a small pool)
        per_tok = enginemod.kv_bytes_per_token(self, eng.opts)
        page_bytes = per_tok * es["page_tokens"] if es else 0
        out = {"device": info["device"], "weights": info["weight_bytes"], "kv_cache_now": 0,
               "kv_cache_last": info["kv_bytes_last"], "kv_cache_pool": pool,
               "kv_cache_pool_used": es.get("pages_used", 0) * page_bytes,
               "kv_cache_pool_peak_used": es.get("peak_pages_used", 0) * page_bytes,
               "kv_cache_pool_cached": es.get("pages_cached", 0) * page_bytes,
               "workspace": info["mem_allocated"] - info["weight_bytes"] - pool,
               "allocated": info["mem_allocated"], "peak": info["mem_peak"]}
        out["kv_cache_dtype"] = enginemod.kv_dtype(self, eng.opts)
        out["kv_cache_bytes_per_token"] = per_tok
        q = quantmod.report(self._core)  # weights = quantized_bytes (codes, scales, offsets) + float_bytes
        if q:
            out.update(q)
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
        ffn_params = 3 * d * ffn
        if c.get("n_experts"):  # every expert and the router (not only the top_k a token uses)
            ffn_params = c["n_experts"] * (3 * d * c["moe_ffn"] + d)
        per = 2 * d + d * (q + 2 * kv) + q * d + ffn_params + (q + 2 * kv if c["qkv_bias"] else 0) + \
            (2 * c["head_dim"] if c["qk_norm"] else 0)
        return V * d * (1 if c["tie_embeddings"] else 2) + d + L * per

    # ------------------------------------------------------------------ torch.nn.Module-style conversions
    def eval(self):
        """A no-op returning the model: fastload is inference only (no dropout, no training mode)."""
        return self

    def train(self, mode: bool = True):
        """train(False) is a no-op returning the model; train() / train(True) raise: fastload is inference only."""
        if mode:
            raise NotImplementedError("train(): fastload is for inference only (no gradients, no training mode); "
                                      "train(False) and eval() are accepted")
        return self

    def requires_grad_(self, requires_grad: bool = True):
        """requires_grad_(False) is a no-op returning the model; True raises (no gradients in fastload)."""
        if requires_grad:
            raise NotImplementedError("requires_grad_(True): fastload computes no gradients (inference only)")
        return self

    @property
    def training(self) -> bool:
        return False

    def half(self):
        """The weights as float16 (see to())."""
        return self._convert(dtype="float16", what="half()")

    def float(self):
        """The weights as float32 (see to())."""
        return self._convert(dtype="float32", what="float()")

    def bfloat16(self):
        """The weights as bfloat16 (see to())."""
        return self._convert(dtype="bfloat16", what="bfloat16()")

    def cuda(self, device=None):
        """Move the model to a CUDA device (default cuda:0; an int or 'cuda:N' picks another) (see to())."""
        d = 0 if device is None else device
        dev = cfgmod.normalize_device(d if not isinstance(d, str) or d.startswith("cuda") else f"cuda:{d}")
        _check_device(dev, f"cuda({'' if device is None else repr(device)})", "keep the model on the CPU")
        return self._convert(device=dev, what="cuda()")

    def cpu(self):
        """Move the model to the CPU (see to())."""
        return self._convert(device="cpu", what="cpu()")

    def to(self, *args, device=None, dtype=None, non_blocking=False, copy=False, memory_format=None):
        """torch.nn.Module.to: .to(device), .to(dtype), .to(device, dtype), .to(device=..., dtype=...).
        Returns the model itself (converted in place), as torch does; non_blocking / copy / memory_format are
        accepted and ignored. See _convert for how weights are converted or moved."""
        torch = sys.modules.get("torch")
        for a in args:
            if (_dtype_key(a) is not None and not (isinstance(a, str) and a.lower().startswith(("cpu", "cuda")))) or \
                    (torch is not None and isinstance(a, torch.dtype)):  # torch.float64 too: refused below as a dtype
                if dtype is not None:
                    raise TypeError(f"to(): two dtypes given ({dtype!r} and {a!r})")
                dtype = a
            elif (isinstance(a, str) and re.fullmatch(r"(cpu|cuda|cuda:\d+|auto)", a.lower())) or \
                    (isinstance(a, int) and not isinstance(a, bool)) or is_torch(a):
                if device is not None:
                    raise TypeError(f"to(): two devices given ({device!r} and {a!r})")
                device = a
            else:
                raise TypeError(f"to(): {a!r} is neither a device ('cpu', 'cuda', 'cuda:N', an index) nor a dtype "
                                "(float32, float16, bfloat16)")
        dev = want = None
        if device is not None:
            if isinstance(device, str) and device.lower() == "auto":
                raise ValueError("to(device='auto'): name the device ('cpu', 'cuda', 'cuda:N')")
            dev = cfgmod.normalize_device(device)
            _check_device(dev, f"to({device!r})", "keep the model on the CPU")
        if dtype is not None:
            want = _dtype_key(dtype)
            if want is None:
                raise ValueError(f"to(dtype={dtype!r}): fastload holds float32, float16 or bfloat16 weights")
        return self._convert(dtype=want, device=dev, what="to()")

    def _convert(self, dtype=None, device=None, what="to()"):
        """Convert / move the weights: nothing when the model already is so, else the weights are reloaded
        from the checkpoint files the model was loaded from, with the new dtype and on the new device
        (loading is as fast as a conversion, and converting from the source avoids double rounding: a
        float16 model turned bfloat16 gets the checkpoint's values rounded once, not twice). The files must
        be unchanged since the load (size, mtime and inode of each are compared): otherwise an error names
        the file and asks for from_pretrained again. The new weights are loaded first and swapped in only
        on success: if the reload fails, the model keeps its weights and stays usable. While it runs, both
        copies of the weights exist (on the same GPU for a dtype change there: room for both is needed)."""
        dtype = dtype or str(self.dtype)
        device = device or str(self.device)
        if dtype == self.dtype and device == self.device:
            return self
        src = self._source
        if not src:
            raise RuntimeError(f"{what}: this model does not know the files it was loaded from; load it with "
                               f"from_pretrained(..., torch_dtype={dtype!r}, device_map={device!r}) instead")
        _check_source(src["files"], what)
        threads = src.get("threads") or 0
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the first load already warned about unused tensors
            if src["kind"] == "gguf":
                new = type(self)._load_gguf(src["path"], dtype, device, threads, False, None, real=src.get("real"),
                                            quant=src.get("quant"))
            else:
                new = type(self)._load_safetensors(src["path"], dtype, device, threads, False, None, ext=src["ext"],
                                                   quant=src.get("quant"), adapter=src.get("adapter"),
                                                   use_safetensors=src.get("use_safetensors"))
        if new._source["files"] != src["files"]:  # a file changed while it was being read again
            del new
            _check_source(src["files"], what)
            raise RuntimeError(f"{what}: the checkpoint files changed while the weights were reloaded; "
                               "call from_pretrained again")
        self._core = new._core
        self._quant = new._quant
        if self._engine is not None:  # the old core keeps its engine until its last request is gone
            opts = dict(self._engine.opts)
            if opts["kv_cache_dtype"] == "float16" and str(device) != "cpu":
                opts["kv_cache_dtype"] = "auto"  # .cuda() of a model with a float16 CPU cache: CUDA's cache is 16-bit
            self._engine = enginemod.Engine(self, opts)
        self.device, self.dtype = ModelDevice(device), ModelDType(dtype)
        self._context_bytes = new._context_bytes
        stats = new.load_stats
        stats["total_seconds"] = time.perf_counter() - t0
        stats["reloaded_by"] = what
        self.load_stats = stats
        return self

    # ------------------------------------------------------------------ saving
    def _hf_config_to_save(self) -> dict:
        """A complete Hugging Face config.json for what the model holds (also for a GGUF-loaded model)."""
        cfg = {k: v for k, v in dict(self.config).items() if v is not None}
        cfg.pop("quantization_config", None)  # the weights are written in the float dtype, not packed
        cfg["architectures"] = [self.arch.name]
        cfg["model_type"] = self.arch.model_type
        cfg["dtype"] = cfg["torch_dtype"] = str(self.dtype)  # transformers 5 reads dtype, 4.x torch_dtype
        c = archmod.core_config(self.config, self.arch, self.name_or_path)
        cfg.setdefault("num_key_value_heads", c["n_kv_heads"])
        cfg.setdefault("head_dim", c["head_dim"])
        cfg.setdefault("tie_word_embeddings", bool(c["tie_embeddings"]))
        cfg.setdefault("hidden_act", "silu")
        cfg.setdefault("rms_norm_eps", c["rms_eps"])
        cfg.setdefault("rope_theta", c["rope_theta"])
        return cfg

    def save_pretrained(self, save_directory, safe_serialization=True, max_shard_size="5GB", push_to_hub=False,
                        state_dict=None, variant=None, **kwargs):
        """Write what the model holds, as transformers does: config.json (dtype set to the model's dtype; a
        complete Hugging Face config for a GGUF-loaded model), generation_config.json, and the weights as
        safetensors with Hugging Face tensor names (lm_head omitted when tied), sharded as
        model-0000i-of-0000n.safetensors with model.safetensors.index.json above max_shard_size. The weights
        are read from the core: after .half() they are float16; a GGUF model's are dequantised (and its q/k
        rows in Hugging Face order). Stale weight files of an earlier save in the directory are removed.
        A quantised model (at load, GPTQ / AWQ, GGUF kept quantised) is saved as a float checkpoint in its dtype: the
        core exports each quantised weight dequantised to float32, rounded here to the model's dtype (to nearest
        even), without quantization_config (differs from transformers, which writes the packed weights; the round
        trip keeps the dtype, as transformers' does)."""
        for k in kwargs:
            if k not in IGNORED_SAVE_ARGS:
                raise TypeError(f"save_pretrained: unsupported argument {k!r}; accepted and ignored: "
                                f"{sorted(IGNORED_SAVE_ARGS)}")
        if push_to_hub:
            raise NotImplementedError("save_pretrained(push_to_hub=True): fastload never uploads; push the saved "
                                      "directory with huggingface_hub")
        if state_dict is not None:
            raise NotImplementedError("save_pretrained(state_dict=...): fastload saves the weights the model holds")
        if variant is not None:
            raise NotImplementedError("save_pretrained(variant=...): variant file names are not written")
        if not safe_serialization:
            raise NotImplementedError("save_pretrained(safe_serialization=False): fastload writes safetensors only "
                                      "(never pickle)")
        limit = _shard_limit(max_shard_size)
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise NotADirectoryError(f"save_pretrained: {save_directory} is a file, not a directory")
        os.makedirs(save_directory, exist_ok=True)

        c = archmod.core_config(self.config, self.arch, self.name_or_path)
        q, kv = c["n_heads"] * c["head_dim"], c["n_kv_heads"] * c["head_dim"]
        d, ffn, V = c["d"], c["ffn"], c["vocab"]
        shapes = {"embed_tokens": (V, d), "lm_head": (V, d), "final_norm": (d,), "input_layernorm": (d,),
                  "post_attention_layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d),
                  "q_proj.bias": (q,), "k_proj.bias": (kv,), "v_proj.bias": (kv,), "o_proj": (d, q),
                  "q_norm": (c["head_dim"],), "k_norm": (c["head_dim"],),
                  "gate_proj": (ffn, d), "up_proj": (ffn, d), "down_proj": (d, ffn),
                  # ChatGLM's fused q|k|v (with its bias) and gate|up, written whole under THUDM's names
                  "query_key_value": (q + 2 * kv, d), "query_key_value.bias": (q + 2 * kv,),
                  "dense_h_to_4h": (2 * ffn, d)}
        dt, es = str(self.dtype), self.dtype.itemsize
        entries = []
        if c.get("n_experts"):  # experts written in the hub's per-expert layout (what transformers' save writes)
            f = c["moe_ffn"]
            shapes.update(moe_router=(c["n_experts"], d), moe_w1=(f, d), moe_w3=(f, d), moe_w2=(d, f))
        for slot, layer, name, _, expert in archmod.tensor_plan(self.arch, c, gguf=False):
            shape = shapes[slot]
            entries.append((name, shape, dt, int(np.prod(shape)) * es, (archmod.SLOT[slot], layer, expert)))
        shards, cur, size = [], [], 0  # huggingface_hub's split: a new shard when the next tensor would overflow
        for e in entries:
            if cur and size + e[3] > limit:
                shards.append(cur)
                cur, size = [], 0
            cur.append(e)
            size += e[3]
        shards.append(cur)
        n = len(shards)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        core = self._core
        for fname, shard in zip(names, shards):
            _write_safetensors(os.path.join(save_directory, fname), shard, lambda key: _export_as(core.export(*key), dt))
        index_path = os.path.join(save_directory, "model.safetensors.index.json")
        if n > 1:
            index = {"metadata": {"total_parameters": self.num_parameters(), "total_size": sum(e[3] for e in entries)},
                     "weight_map": {e[0]: fname for fname, shard in zip(names, shards) for e in shard}}
            with open(index_path, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
        for f in os.listdir(save_directory):  # an earlier save's weights would be read with the new ones
            if (re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors", f) and f not in names) or \
                    (n == 1 and f == "model.safetensors.index.json"):
                os.unlink(os.path.join(save_directory, f))
        with open(os.path.join(save_directory, "config.json"), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(self._hf_config_to_save(), indent=2, sort_keys=True, default=_json_default) + "\n")
        with open(os.path.join(save_directory, "generation_config.json"), "w", encoding="utf-8") as fh:
            fh.write(json.dumps(generation_config_dict(self.generation_config), indent=2, sort_keys=True) + "\n")

    def __repr__(self):
        return (f"FastModelForCausalLM({self.arch.name}, {self.name_or_path!r}, device={self.device}, "
                f"dtype={self.dtype}, params={self.num_parameters() / 1e6:.1f}M)")


def _export_as(exported, dtype):
    """core.export's (dtype name, array) in the dtype save_pretrained writes: a quantised weight comes dequantised as
    float32 and is rounded to nearest even into float16 / bfloat16 (as raw uint16 bits, like the core's own exports);
    anything else is passed on unchanged for _write_safetensors to check."""
    dt, arr = exported
    if dt != "float32" or dtype == "float32":
        return dt, arr
    a = np.ascontiguousarray(arr, dtype=np.float32)
    if dtype == "float16":
        return dtype, a.astype(np.float16).view(np.uint16)
    u = a.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    bits[np.isnan(a)] = 0x7FC0
    return dtype, bits


def _json_default(v):
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def _check_source(files, what):
    """Every checkpoint file the model was loaded from is still the same (size, mtime_ns, inode)."""
    for real, stamp in files.items():
        try:
            now = _stamp(real)
        except OSError as e:
            raise FileNotFoundError(f"{what}: {real}, which the model was loaded from, is gone ({e.strerror}); "
                                    "converting reloads the weights from the checkpoint files: call from_pretrained "
                                    "again") from None
        if now != stamp:
            raise RuntimeError(f"{what}: {real} changed since the model was loaded from it (size, mtime or inode "
                               "differ); converting reloads the weights from the checkpoint files: call "
                               "from_pretrained again")


def _gguf_hf_config(g, path):
    """(arch, Hugging Face-style Config, config key -> GGUF key names, {tensor name: info}) of an opened GGUF."""
    meta = g.metadata
    arch, hf = archmod.gguf_config(meta, path)
    tensors = {t[0]: t for t in g.tensors()}
    hf["tie_word_embeddings"] = "output.weight" not in tensors
    ga = meta["general.architecture"]
    names = archmod.gguf_names(ga)
    hd = int(hf.get("head_dim") or int(hf["hidden_size"]) // int(hf["num_attention_heads"]))
    rd = meta.get(f"{ga}.rope.dimension_count")
    if rd is not None and rd != hd:
        # llama.cpp rotates that many dimensions of a head (and refuses such llama / qwen2 / qwen3 files itself)
        raise NotImplementedError(f"{path}: {ga}.rope.dimension_count = {rd!r} is not the head size {hd}: rotary "
                                  "embeddings on part of a head are not supported for GGUF files")
    if "rope_freqs.weight" in tensors:
        # convert_hf_to_gguf stores Llama 3.1 / 3.2 rope scaling as per-frequency divisors: read back as the
        # llama3 rope_scaling that makes them, or refused (its shape checked first: a hostile file's huge tensor is
        # not read)
        if tuple(tensors["rope_freqs.weight"][3]) != (hd // 2,):
            raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' must hold {hd // 2} numbers (head_dim / 2), "
                                  f"got shape {list(tensors['rope_freqs.weight'][3])}")
        f = np.asarray(g.dequantize("rope_freqs.weight"), np.float64).reshape(-1)
        rs = _llama3_from_rope_freqs(f, float(hf.get("rope_theta") or 10000.0), hd, path)
        if rs is not None:
            if hf.get("rope_scaling") and hf["rope_scaling"]["factor"] != 1:  # llama.cpp applies both
                raise NotImplementedError(f"{path}: linear rope scaling ({ga}.rope.scaling) together with per-frequency "
                                          "factors (tensor 'rope_freqs.weight') is not supported")
            hf["rope_scaling"] = rs
    if "blk.0.attn_qkv.weight" in tensors:
        raise NotImplementedError(f"{path}: fused q|k|v tensors ('blk.0.attn_qkv.weight', convert_hf_to_gguf.py "
                                  "--fuse-qkv) are not supported for GGUF files; convert without --fuse-qkv")
    biases = sorted(n for n in tensors if n.startswith("blk.") and n.endswith(".bias"))
    if biases and not (arch.qkv_bias and all(n.rsplit(".", 2)[-2] in ("attn_q", "attn_k", "attn_v") for n in biases)):
        raise NotImplementedError(f"{path}: tensor '{biases[0]}' ({len(biases)} bias tensors): biases on a {ga!r} GGUF "
                                  f"are not supported (llama.cpp applies them; fastload would drop them)")
    if "token_embd.weight" in tensors:
        shape = tensors["token_embd.weight"][3]
        if len(shape) != 2:
            raise CheckpointError(f"{path}: tensor 'token_embd.weight' must have 2 dimensions, got {len(shape)}")
        hf["vocab_size"] = int(shape[0])
        names["vocab_size"] = "token_embd.weight rows (vocabulary size)"
    return arch, Config(hf), names, tensors


def _llama3_from_rope_freqs(f, theta, head_dim, path):
    """The llama3 rope_scaling whose per-frequency divisors (convert_hf_to_gguf's rope_freqs.weight, from
    transformers' _compute_llama3_parameters) are f, or None when every divisor is 1; NotImplementedError when no
    llama3 setting makes them (factor = the largest divisor; low / high frequency factors and the original context
    searched among the values Llama 3.x uses)."""
    n = head_dim // 2
    if f.shape != (n,) or not np.all(np.isfinite(f)) or (f <= 0).any():
        raise CheckpointError(f"{path}: tensor 'rope_freqs.weight' must hold {n} positive numbers (head_dim / 2), "
                              f"got shape {list(f.shape)}")
    if np.allclose(f, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(f.max())
    wavelen = 2 * np.pi * theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    # Llama 3.x's own settings first; else, since the factors depend on orig / (high - low) and low / (high - low)
    # only, low = 1 with the rest fitted to the smooth part (or placed between the ends when it has one point or none)
    tries = [(o, lo, hi) for o in (8192, 4096, 2048, 16384, 32768, 65536, 131072)
             for lo, hi in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0))]
    mid = (f > 1 + 1e-6) & (f < factor * (1 - 1e-6))
    if factor > 1 and mid.sum() >= 2:
        sm = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)  # the smooth factor s, linear in 1 / wavelength
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # RankWarning: equal wavelengths (a degenerate rope_theta)
                a, b = np.polyfit(1 / wavelen[mid], sm, 1)
        except (np.linalg.LinAlgError, ValueError):
            a = b = 0.0
        if b < 0 < a:
            tries.append((-a / b, 1.0, 1 - 1 / b))
    elif factor > 1:
        lo_w = wavelen[f <= 1 + 1e-6].max(initial=0.0) * 4
        hi_w = wavelen[f >= factor * (1 - 1e-6)].min(initial=np.inf)
        if mid.sum() == 1:  # s = (orig / wl - 1) / 3 at that point
            w1, s1 = wavelen[mid][0], (1 / f[mid][0] - 1 / factor) / (1 - 1 / factor)
            tries.append((w1 * (3 * s1 + 1), 1.0, 4.0))
        elif np.isfinite(hi_w) and lo_w < hi_w:
            tries.append((float(np.sqrt(max(lo_w, 1e-9) * hi_w)), 1.0, 4.0))
    for orig, low, high in tries:
        if not (np.isfinite(orig) and np.isfinite(high) and 1 <= orig <= checks.INT32_MAX):
            continue
        orig, high = int(round(orig)), round(float(high), 6)  # config.json's types: an integer context
        if high <= low:
            continue
        smooth = (orig / wavelen - low) / (high - low)
        want = np.where(wavelen < orig / high, 1.0,
                        np.where(wavelen > orig / low, factor, 1.0 / ((1 - smooth) / factor + smooth)))
        if np.allclose(f, want, rtol=1e-4, atol=0):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(low),
                    "high_freq_factor": float(high), "original_max_position_embeddings": orig}
    raise NotImplementedError(f"{path}: tensor 'rope_freqs.weight' holds per-frequency rope factors that no llama3 "
                              "rope scaling fastload knows produces; such rope scaling is not supported for GGUF files")


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


_ST_FLOAT = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float32"}  # file dtype -> "auto" dtype


def _has_torch_bin(path):
    return os.path.lexists(os.path.join(path, "pytorch_model.bin")) or \
        os.path.lexists(os.path.join(path, "pytorch_model.bin.index.json"))


def _ce_loss(logits, labels):
    """transformers' causal LM loss: the mean over labels[:, 1:] != -100 of -log softmax(logits[:, :-1]) at the label,
    in float64 arithmetic (_C.target_logprobs: one pass over the float32 logits, no float64 copy of them)."""
    B, T, V = logits.shape
    if labels.shape != (B, T):
        raise ValueError(f"labels of shape {tuple(labels.shape)} for input_ids of shape {(B, T)}")
    lab = labels[:, 1:]
    valid = lab != -100
    bad = valid & ((lab < 0) | (lab >= V))
    if bad.any():
        b, t = np.argwhere(bad)[0]
        raise ValueError(f"labels[{b}][{t + 1}] = {int(lab[b, t])} is outside the vocabulary [0, {V}) (and not -100)")
    if not valid.any():
        return np.float32("nan")
    b, t = np.nonzero(valid)
    lp = _C.target_logprobs(np.ascontiguousarray(logits, dtype=np.float32).reshape(B * T, V), b * T + t, lab[b, t])
    return np.float32(-lp.sum() / len(lp))


class AutoModelForCausalLM:
    """transformers-style entry point: AutoModelForCausalLM.from_pretrained(path, device_map=..., torch_dtype=...)."""

    def __init__(self):
        raise TypeError("use AutoModelForCausalLM.from_pretrained(...)")

    @staticmethod
    def from_pretrained(*args, **kwargs) -> FastModelForCausalLM:
        return FastModelForCausalLM.from_pretrained(*args, **kwargs)


class AutoModel(AutoModelForCausalLM):
    """The same as AutoModelForCausalLM (ChatGLM scripts load with AutoModel): fastload's models are causal LMs."""

    def __init__(self):
        raise TypeError("use AutoModel.from_pretrained(...)")


# AutoConfig.from_pretrained arguments that only concern downloads or remote code (accepted, ignored):
_CONFIG_HUB_ARGS = ("trust_remote_code", "token", "use_auth_token", "force_download", "resume_download", "proxies",
                    "_from_auto", "code_revision")


class AutoConfig:
    """transformers-style AutoConfig: AutoConfig.from_pretrained(path or hub id or .gguf) -> Config."""

    def __init__(self):
        raise TypeError("use AutoConfig.from_pretrained(...)")

    @staticmethod
    def from_pretrained(pretrained_model_name_or_path, *, revision=None, cache_dir=None, local_files_only=False,
                        subfolder="", gguf_file=None, return_unused_kwargs=False, allow_external_symlinks=None,
                        **kwargs):
        """The model's Config: config.json checked as from_pretrained checks it (fastload/checks.py), or for a
        .gguf (a file, gguf_file=, or a directory holding one GGUF and no config.json) the config fastload
        derives from its metadata. Keyword arguments naming config keys override the file's values, as in
        transformers; hub arguments (trust_remote_code, token, ...) are accepted and ignored."""
        for k in _CONFIG_HUB_ARGS:
            kwargs.pop(k, None)
        path = resolve(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir,
                       local_files_only=local_files_only)
        if subfolder:
            path = os.path.join(path, subfolder)
        ext = _files.external_symlinks_allowed(allow_external_symlinks)
        gguf_path = gguf_real = None
        if not os.path.isdir(path):
            if not path.endswith(".gguf"):
                if os.path.basename(path) == "config.json":
                    path = os.path.dirname(path) or "."
                else:
                    raise CheckpointError(f"{path}: not a model directory, config.json or .gguf file")
            else:
                gguf_path = gguf_real = _files.given_file(path)
        elif gguf_file:
            gguf_path = os.path.join(path, gguf_file)
            gguf_real = _files.checkpoint_file(path, gguf_file, "gguf_file argument", allow_external=ext, subdirs=True)
        elif _files.find_file(path, "config.json", allow_external=ext) is None:
            ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
            if len(ggufs) == 1:
                gguf_path = os.path.join(path, ggufs[0])
                gguf_real = _files.checkpoint_file(path, ggufs[0], "GGUF file", allow_external=ext)
        if gguf_path:
            g = _C.GGUFFile(gguf_real)
            try:
                arch, hf, names, _ = _gguf_hf_config(g, gguf_path)
                archmod.core_config(hf, arch, gguf_path, names)
                hf.update(_gguf_generation_config(g.metadata, gguf_path).to_diff_dict())
            finally:
                g.close()
        else:
            cfg_path = os.path.join(path, "config.json")
            hf = _files.read_json(_files.checkpoint_file(path, "config.json", allow_external=ext), cfg_path)
            hf = Config(archmod.chatglm_view(hf, cfg_path))  # ChatGLM: its keys, plus the Hugging Face ones
            checks.check_config(hf, cfg_path)
        unused = {}
        for k, v in kwargs.items():
            if k in hf:
                hf[k] = v
            else:
                unused[k] = v
        return (hf, unused) if return_unused_kwargs else hf


def _check_position_ids(position_ids, input_ids, attention_mask):
    """generate(position_ids=...) (ChatGLM's tokenizer returns them): accepted when they are the positions fastload
    uses anyway -- 0, 1, ... from each row's first attended token (padding positions are not looked at)."""
    if position_ids is None or input_ids is None:
        return
    pos = _ids2d(position_ids, "position_ids")
    ids = _ids2d(input_ids, "input_ids")
    mask = _ids2d(attention_mask, "attention_mask") if attention_mask is not None else np.ones_like(ids)
    if pos.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(f"position_ids shape {pos.shape} does not match input_ids {ids.shape}")
    m = mask != 0
    want = np.cumsum(m, axis=1) - 1
    if not np.array_equal(pos[m], want[m]):
        raise NotImplementedError("generate: position_ids other than 0, 1, ... from each row's first attended token "
                                  "are not supported")


def _tool_call_args(text):
    """The keyword arguments of ChatGLM3's "tool_call(k=v, ...)" as a dict, read with ast (literals only; THUDM's
    code eval()s the text)."""
    import ast
    try:
        node = ast.parse(text.strip(), mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
            raise ValueError("not a tool_call(k=v, ...) call")
        return {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"ChatGLM3 tool call {text[:200]!r} could not be read: {e}") from None


def from_pretrained(*args, **kwargs) -> FastModelForCausalLM:
    """Short form of AutoModelForCausalLM.from_pretrained."""
    return FastModelForCausalLM.from_pretrained(*args, **kwargs)
