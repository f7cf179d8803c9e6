"""AutoModelForCausalLM: load a checkpoint into the C core and expose transformers' API.

Python only arranges: it reads config.json / GGUF metadata, decides which checkpoint tensor
fills which slot (fastload/arch.py), and hands the opened files to the core, which validates,
converts and places every tensor with the GIL released. forward() and generate() are one call
into the core each (generate calls back per token only to stream and to notice Ctrl-C).
"""
from __future__ import annotations

import copy
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
    "use_cache": "fastload always keeps a KV cache while generating; the output is the same either way",
}

# The GGUF tensor types the core dequantises at load (csrc/gguf.c, fl_ggml_dequant), for messages.
GGUF_TYPES = "F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K"
_QUANT_NAMES = {"awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "aqlm": "AQLM", "eetq": "EETQ", "hqq": "HQQ",
                "exl2": "EXL2", "mxfp4": "MXFP4", "bitnet": "BitNet", "vptq": "VPTQ", "spqr": "SpQR"}
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
    """'float32' / 'float16' / 'bfloat16' for a dtype given any way (string alias, torch dtype, numpy
    dtype), None for anything else; torch is never imported."""
    if isinstance(x, str):
        key = x.lower().replace("torch.", "")
    elif is_torch(x):
        key = str(x).replace("torch.", "")
    else:
        try:
            key = np.dtype(x).name
        except (TypeError, ValueError):
            return None
    v = cfgmod._DTYPE_ALIASES.get(key)
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


def _check_not_quantised(hf, path):
    """config.json with a quantization_config: say what it is and what fastload loads, before looking for tensors."""
    q = hf.get("quantization_config") if isinstance(hf, dict) else None
    if not q:
        return
    method = q.get("quant_method") if isinstance(q, dict) else None
    if isinstance(method, str) and method:
        shown = method[:40]
        name = _QUANT_NAMES.get(shown.lower(), shown)
        what = f"a {name}-quantised checkpoint (config.json quantization_config.quant_method={shown!r})"
    else:
        what = "a quantised checkpoint (config.json has a quantization_config)"
    raise NotImplementedError(
        f"{path} is {what}; fastload loads float32/float16/bfloat16 safetensors and GGUF ({GGUF_TYPES}, "
        "dequantised at load) today; quantised safetensors checkpoints arrive with issue 9")


def _stamp(real):
    """(size, mtime_ns, inode) of a checkpoint file, to notice a change before reloading from it."""
    st = os.stat(real)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def generation_config_dict(gc) -> dict:
    """The values of a GenerationConfig that generation_config.json gets: those that are not None and
    differ from the defaults (transformers writes its non-default values too)."""
    d = gc.to_dict() if hasattr(gc, "to_dict") else dict(gc)
    dflt = getattr(type(gc), "DEFAULTS", {})
    out = {}
    for k, v in d.items():
        if v is None or k.startswith("_") or (k in dflt and dflt[k] == v and type(dflt[k]) is type(v)):
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


class Config(AttrDict):
    """config.json as a dict with attribute access (like transformers' PretrainedConfig)."""

    def __setattr__(self, k, v):
        self[k] = v

    def to_dict(self):
        return dict(self)


class GenerationConfig(Config):
    DEFAULTS = dict(max_length=20, max_new_tokens=None, min_length=0, min_new_tokens=None, do_sample=False,
                    temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, num_beams=1,
                    num_return_sequences=1, eos_token_id=None, pad_token_id=None, bos_token_id=None)

    def __init__(self, **kw):
        super().__init__(self.DEFAULTS)
        self.update(kw)

    @classmethod
    def from_pretrained(cls, path):
        """generation_config.json from a directory or file; its values are checked (checks.GENERATION) so
        that generate() never meets a wrong-typed or out-of-range value from a file."""
        p = os.path.join(path, "generation_config.json") if os.path.isdir(path) else path
        real = _files.checkpoint_file(path, "generation_config.json") if os.path.isdir(path) else _files.given_file(p)
        return cls(**cls._read(real, p))

    @staticmethod
    def _read(real, shown) -> dict:
        """The file's values, checked so that generate() never meets a wrong-typed or out-of-range one."""
        d = _files.read_json(real, shown)
        checks.check_generation(d, shown)
        return d


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
        self.device = ModelDevice(device)
        self.dtype = ModelDType(dtype)
        self.name_or_path = name_or_path
        self.load_stats = load_stats
        self._source = None  # what the weights were loaded from (files and their stamps), for .half() / .to()

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path=None, *model_args, device_map=None, device=None,
                        torch_dtype=None, dtype=None, gguf_file=None, revision=None, cache_dir=None, subfolder="",
                        local_files_only=False, progress=None, progress_callback=None, threads=None,
                        quantization_config=None, load_in_8bit=False, load_in_4bit=False, allow_external_symlinks=None,
                        **kwargs):
        """transformers' from_pretrained. `device=` (ChatGLM scripts pass it) means the same as `device_map=`;
        given both, they must name the same device (a ValueError otherwise, rather than one silently winning).
        A CUDA device where none is usable raises, naming the argument."""
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
        # device= (ChatGLM scripts pass it) means the same as device_map=; both given and different is refused
        # rather than one silently winning.
        if device is not None and device_map is not None and \
                cfgmod.normalize_device(device_map) != cfgmod.normalize_device(None, device):
            raise ValueError(f"device_map={device_map!r} and device={device!r} disagree; pass one of them")
        dev = cfgmod.normalize_device(device_map, device)
        arg = "device_map" if device_map is not None else "device" if device is not None else "FASTLOAD_DEVICE"
        value = device_map if device_map is not None else device if device is not None else cfgmod.env("FASTLOAD_DEVICE")
        _check_device(dev, f"{arg}={value!r}", f"use {arg}='cpu'")
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
                "cache": "cold (O_DIRECT reads)" if info["direct_io"] else "warm (page cache)"}

    @classmethod
    def _load_safetensors(cls, path, want_dtype, dev, nthreads, progress, progress_callback, ext=False):
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: not a model directory or .gguf file")
        cfg_first = _files.find_file(path, "config.json", allow_external=ext)
        if cfg_first is not None:  # a quantised checkpoint is named as such before its tensors are looked for
            _check_not_quantised(_files.read_json(cfg_first, os.path.join(path, "config.json")), path)
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

        stamps = {r: _stamp(r) for r in [cfg_real, index_real, *real.values()] if r}
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
        model._source = {"kind": "safetensors", "path": path, "ext": ext, "files": stamps}
        return model

    @classmethod
    def _load_gguf(cls, path, want_dtype, dev, nthreads, progress, progress_callback, real=None):
        stamps = {real or path: _stamp(real or path)}
        g = _C.GGUFFile(real or path)  # real: `path` checked and resolved by fastload/_files.py
        meta = g.metadata
        arch, hf, names, tensors = _gguf_hf_config(g, path)
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
        gen = GenerationConfig()
        gen.update(_gguf_token_ids(meta, path))
        hf.update({k: gen[k] for k in ("eos_token_id", "bos_token_id", "pad_token_id")})
        model = cls(core, hf, arch, gen, dev, want_dtype, path, stats)
        model._context_bytes = context
        model._source = {"kind": "gguf", "path": path, "real": real, "files": stamps}
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
        gc = GenerationConfig(**self.generation_config)
        if generation_config is not None:
            gc.update(dict(generation_config) if isinstance(generation_config, dict) else
                      {k: v for k, v in vars(generation_config).items() if not k.startswith("_")})
        unknown = [k for k in kwargs if k not in GEN_KEYS]
        if unknown:
            raise TypeError(f"generate: unsupported argument(s) {unknown}; supported: {sorted(GEN_KEYS)}")
        gc.update({k: v for k, v in kwargs.items() if v is not None})
        for k, bad in (("num_beams", lambda v: v != 1), ("return_dict_in_generate", bool), ("output_scores", bool),
                       ("output_logits", bool), ("output_attentions", bool), ("output_hidden_states", bool)):
            if gc.get(k) is not None and bad(gc.get(k)):
                raise NotImplementedError(f"generate: {k}={gc.get(k)!r} is not supported (greedy and sampling only, "
                                          "token ids returned)")
        return gc

    def generate(self, input_ids=None, attention_mask=None, generation_config=None, streamer=None, inputs=None, **kwargs):
        """transformers' generate: greedy or sampling; returns [batch, prompt + new] token ids."""
        if input_ids is None:
            input_ids = inputs
        if input_ids is None:
            raise ValueError("generate needs input_ids")
        like_torch = is_torch(input_ids)
        ids = _ids2d(input_ids, "input_ids")
        mask = _ids2d(attention_mask, "attention_mask")
        if mask is not None and mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} does not match input_ids {ids.shape}")
        gc = self._gen_settings(generation_config, kwargs)
        T = ids.shape[1]
        max_new = gc.get("max_new_tokens")
        if max_new is None:
            max_new = int(gc.get("max_length") or 20) - T
            if max_new <= 0:
                raise ValueError(f"input length {T} reaches max_length={gc.get('max_length')}; set max_new_tokens")
        max_new = int(max_new)
        if max_new < 0:
            raise ValueError("max_new_tokens must be >= 0")
        min_new = gc.get("min_new_tokens")
        if min_new is None:
            min_new = max(0, int(gc.get("min_length") or 0) - T)
        eos = gc.get("eos_token_id")
        eos = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
        pad = gc.get("pad_token_id")
        if pad is None:
            pad = eos[0] if eos else 0
        do_sample = bool(gc.get("do_sample"))
        temp = float(gc.get("temperature") if gc.get("temperature") is not None else 1.0)
        if do_sample and temp <= 0:
            raise ValueError(f"temperature={temp} must be strictly positive when do_sample=True")
        top_k = int(gc.get("top_k") or 0)
        top_p = float(gc.get("top_p") if gc.get("top_p") is not None else 1.0)
        rep = float(gc.get("repetition_penalty") or 1.0)
        if rep <= 0:
            raise ValueError(f"repetition_penalty={rep} must be strictly positive")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]")
        nrs = int(gc.get("num_return_sequences") or 1)
        if nrs > 1:
            if not do_sample:
                raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")
            ids = np.repeat(ids, nrs, axis=0)
            mask = None if mask is None else np.repeat(mask, nrs, axis=0)
        seed = gc.get("seed")
        seed = _global_rng.getrandbits(63) if seed is None else int(seed)
        cb = None
        if streamer is not None:
            streamer.put(_to_user(ids.astype(np.int64), like_torch))
            cb = (lambda toks: streamer.put(_to_user(toks, like_torch)))
        try:
            out = self._core.generate(ids, None if mask is None else (mask != 0).astype(np.uint8),
                                      max_new_tokens=max_new, min_new_tokens=int(min_new), do_sample=do_sample,
                                      temperature=temp, top_k=top_k, top_p=top_p, repetition_penalty=rep,
                                      seed=seed & 0xFFFFFFFFFFFFFFFF, eos_token_ids=eos, pad_token_id=int(pad),
                                      callback=cb)
        finally:
            if streamer is not None:
                streamer.end()
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
        enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True, return_tensors="np")
        gen_kwargs = dict(gen_kwargs)
        if gen_kwargs.get("max_new_tokens") is None and gen_kwargs.get("max_length") is None:
            gen_kwargs["max_new_tokens"] = 512
        eos = gen_kwargs.get("eos_token_id", self.generation_config.get("eos_token_id"))
        eos = [] if eos is None else list(eos) if isinstance(eos, (list, tuple)) else [eos]
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
            eos.append(tokenizer.eos_token_id)
        gen_kwargs["eos_token_id"] = eos
        return enc, gen_kwargs

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
        """ChatGLM-style streaming chat: yields (response so far, history) as text arrives."""
        from .streamers import TextIteratorStreamer
        history, msgs = self._chat_messages(query, history, role, system)
        enc, gen_kwargs = self._chat_inputs(tokenizer, msgs, gen_kwargs)
        streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        err = []

        def run():
            try:
                self.generate(enc["input_ids"], attention_mask=enc["attention_mask"], streamer=streamer, **gen_kwargs)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer thread (generate ended the streamer)
                err.append(e)
        th = threading.Thread(target=run, daemon=True)
        th.start()
        response = ""
        for piece in streamer:
            response += piece
            yield response.strip(), self._chat_history(history, query, response.strip(), role)
        th.join()
        if err:
            raise err[0]

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
        for a in args:
            if _dtype_key(a) is not None and not (isinstance(a, str) and a.lower().startswith(("cpu", "cuda"))):
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
                new = type(self)._load_gguf(src["path"], dtype, device, threads, False, None, real=src.get("real"))
            else:
                new = type(self)._load_safetensors(src["path"], dtype, device, threads, False, None, ext=src["ext"])
        if new._source["files"] != src["files"]:  # a file changed while it was being read again
            del new
            _check_source(src["files"], what)
            raise RuntimeError(f"{what}: the checkpoint files changed while the weights were reloaded; "
                               "call from_pretrained again")
        self._core = new._core
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
        rows in Hugging Face order). Stale weight files of an earlier save in the directory are removed."""
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
                  "gate_proj": (ffn, d), "up_proj": (ffn, d), "down_proj": (d, ffn)}
        dt, es = str(self.dtype), self.dtype.itemsize
        entries = []
        for slot, layer, name, _ in archmod.tensor_plan(self.arch, c, gguf=False):
            shape = shapes[slot]
            entries.append((name, shape, dt, int(np.prod(shape)) * es, (archmod.SLOT[slot], layer)))
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
            _write_safetensors(os.path.join(save_directory, fname), shard, lambda key: core.export(*key))
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
    names = archmod.gguf_names(meta["general.architecture"])
    if "token_embd.weight" in tensors:
        shape = tensors["token_embd.weight"][3]
        if len(shape) != 2:
            raise CheckpointError(f"{path}: tensor 'token_embd.weight' must have 2 dimensions, got {len(shape)}")
        hf["vocab_size"] = int(shape[0])
        names["vocab_size"] = "token_embd.weight rows (vocabulary size)"
    return arch, Config(hf), names, tensors


def _gguf_token_ids(meta, path) -> dict:
    """eos / bos / pad token ids from GGUF metadata, checked."""
    out = {}
    for k, mk in (("eos_token_id", "tokenizer.ggml.eos_token_id"), ("bos_token_id", "tokenizer.ggml.bos_token_id"),
                  ("pad_token_id", "tokenizer.ggml.padding_token_id")):
        if meta.get(mk) is not None:
            out[k] = checks.check_value(checks.Key(mk, "int", 0, checks.INT32_MAX), meta[mk], path)
    return out


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
                    raise ValueError(f"{path}: not a model directory, config.json or .gguf file")
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
                hf.update(_gguf_token_ids(g.metadata, gguf_path))
            finally:
                g.close()
        else:
            cfg_path = os.path.join(path, "config.json")
            hf = Config(_files.read_json(_files.checkpoint_file(path, "config.json", allow_external=ext), cfg_path))
            checks.check_config(hf, cfg_path)
        unused = {}
        for k, v in kwargs.items():
            if k in hf:
                hf[k] = v
            else:
                unused[k] = v
        return (hf, unused) if return_unused_kwargs else hf


def from_pretrained(*args, **kwargs) -> FastModelForCausalLM:
    """Short form of AutoModelForCausalLM.from_pretrained."""
    return FastModelForCausalLM.from_pretrained(*args, **kwargs)
