"""LoRA adapters (PEFT's adapter_config.json + adapter_model.safetensors), merged into the weights at load.

    model = AutoModelForCausalLM.from_pretrained(base_dir, adapter="path/to/adapter")
    model = AutoModelForCausalLM.from_pretrained("path/to/adapter")   # its config names base_model_name_or_path

What PEFT computes for a LoRA layer in inference is y = x W^T + scale * (x A^T) B^T, A [r, in], B [out, r], with
scale = lora_alpha / r (use_rslora: lora_alpha / sqrt(r)); r and lora_alpha per module from rank_pattern /
alpha_pattern. Merged (PEFT's merge_and_unload) that is W' = W + scale * (B @ A). fastload merges at load, in the
core (csrc/model.c, `lora_apply`): each linear weight's rows get their delta right after they land in backend
memory (cuBLAS on CUDA, a C loop on the CPU) and before quantisation at load, so int8 / int4 / nf4 quantise the
merged weight. This file only reads and checks the adapter and says, per base tensor, which A / B / scale go with it.

Supported: target_modules (a list of module names or suffixes, a regex string, "all-linear"), r, lora_alpha,
use_rslora, rank_pattern, alpha_pattern, modules_to_save (full replacement tensors), fan_in_fan_out (PEFT turns it
off for nn.Linear, and so does this), bias "none". Refused with NotImplementedError: DoRA (use_dora), LoRA biases
(bias != "none", lora_bias), embedding LoRA (lora_embedding_A/B), other PEFT types, and bases that are GGUF or
GPTQ / AWQ-packed (the merge would need the float weight).
"""
from __future__ import annotations

import math
import os
import re
import warnings

from . import _C
from . import _files
from . import torchbin
from .hub import resolve

CheckpointError = _C.CheckpointError

CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
MAX_RANK = 65536           # csrc/model.c FL_LORA_MAX_RANK
MAX_SCALE = 1e6            # |lora_alpha / r| beyond this is a broken config, not a fine-tune

# Config keys that change the computation in ways fastload does not implement: refused when set (truthy).
UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA) adapters are not supported; merge it with PEFT "
                "(merge_and_unload() + save_pretrained) and load the merged model",
    "lora_bias": "LoRA adapters with a bias on lora_B (lora_bias=true) are not supported",
    "layer_replication": "layer_replication (PEFT's duplicated layers) is not supported",
    "target_parameters": "target_parameters (LoRA on nn.Parameter) is not supported",
    "trainable_token_indices": "trainable_token_indices (PEFT's trainable tokens) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA (use_qalora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "kasa_config": "KaSA (kasa_config) is not supported",
    "velora_config": "VeLoRA (velora_config) is not supported",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
}


# init_lora_weights values whose initialisation leaves the base weights as they are (PEFT's LoraLayer.update_layer):
# True / "gaussian" (random A, zero B), False, "eva", "orthogonal". The others (PiSSA, OLoRA, CorDA, MiCA, LoftQ,
# LoRA-GA) subtract their initial B A from the base (W_res = W - scale B0 A0, from an SVD / QR of W or a quantisation
# of it) when PEFT loads the adapter, so merging the trained A, B into the original W gives another model.
BASE_KEEPING_INITS = (True, False, "gaussian", "eva", "orthogonal")


def is_adapter_dir(path, allow_config=False) -> bool:
    """A directory with adapter_config.json and no config.json of its own: PEFT's save_pretrained output.
    allow_config: a config.json beside it is allowed (the adapter was named explicitly with adapter=)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME)) and \
        (allow_config or not os.path.isfile(os.path.join(path, "config.json")))


def pattern_key(keys, module: str) -> str | None:
    """PEFT's get_pattern_key: the first key k of rank_pattern / alpha_pattern with re.match(rf"(.*\\.)?({k})$")."""
    for k in keys:
        if re.match(rf"(.*\.)?({k})$", module):
            return k
    return None


def _number(cfg, key, where, lo=None, integer=False):
    v = cfg.get(key)
    ok = isinstance(v, int) and not isinstance(v, bool) if integer else \
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or (lo is not None and v < lo):
        want = "an integer" if integer else "a finite number"
        raise CheckpointError(f"{where}: '{key}' must be {want}{f' >= {lo}' if lo is not None else ''}, got {v!r}")
    return v


def _target_matches(target, module: str) -> bool:
    """PEFT's check_target_module_exists for a module path ("model.layers.0.self_attn.q_proj")."""
    if isinstance(target, str):
        if target == "all-linear":
            return module.rsplit(".", 1)[-1] in LINEAR_MODULES and module != "lm_head"
        return re.fullmatch(target, module) is not None
    return any(module == t or module.endswith("." + t) for t in target)


class Adapter:
    """A checked PEFT LoRA adapter: `layers` maps a base module path ("model.layers.0.self_attn.q_proj") to
    (A tensor name, B tensor name, r, scale); `replaced` maps a base tensor name to the adapter tensor that
    replaces it (modules_to_save). `file` is the opened adapter weights (a _C.SafetensorsFile)."""

    def __init__(self, path, ext=False):
        self.path = path
        cfg_real = _files.find_file(path, CONFIG_NAME, allow_external=ext)
        shown = os.path.join(path, CONFIG_NAME)
        if cfg_real is None:
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME} (not a PEFT adapter directory)")
        cfg = _files.read_json(cfg_real, shown)
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{shown}: must hold a JSON object")
        self.config, self.config_path = cfg, shown
        self.stamps = {cfg_real: _stamp(cfg_real)}
        pt = cfg.get("peft_type", "LORA")
        if not isinstance(pt, str) or pt.upper() != "LORA":
            raise NotImplementedError(f"{shown}: peft_type {pt!r} is not supported (LoRA adapters only)")
        for k, why in UNSUPPORTED.items():
            if cfg.get(k):
                raise NotImplementedError(f"{shown}: {why} ({k}={cfg[k]!r})")
        init = cfg.get("init_lora_weights", True)
        if not any(init is v or (isinstance(init, str) and isinstance(v, str) and init.lower() == v) for v in BASE_KEEPING_INITS):
            raise NotImplementedError(
                f"{shown}: init_lora_weights={init!r}: this initialisation changes the base weights when PEFT loads "
                "the adapter (W - scale B0 A0), which fastload does not redo; convert it to a plain LoRA with PEFT "
                "(save_pretrained(..., path_initial_model_for_weight_conversion=...)) or merge it "
                "(merge_and_unload() + save_pretrained) and load the result")
        bias = cfg.get("bias", "none")
        if bias != "none":
            raise NotImplementedError(f"{shown}: bias={bias!r}: LoRA adapters that train biases are not supported "
                                      "(bias='none' only)")
        self.r = _number(cfg, "r", shown, lo=1, integer=True)
        if self.r > MAX_RANK:
            raise CheckpointError(f"{shown}: 'r' = {self.r} is beyond {MAX_RANK}")
        self.alpha = _number(cfg, "lora_alpha", shown)
        self.rslora = bool(cfg.get("use_rslora", False))
        for pk in ("rank_pattern", "alpha_pattern"):
            pat = cfg.get(pk) or {}
            if not isinstance(pat, dict):
                raise CheckpointError(f"{shown}: '{pk}' must be an object")
            for k, v in pat.items():
                _number({k: v}, k, f"{shown}: {pk}", lo=1 if pk == "rank_pattern" else None,
                        integer=pk == "rank_pattern")
                try:
                    re.compile(k)
                except re.error as e:
                    raise CheckpointError(f"{shown}: {pk} key {k!r} is not a regular expression: {e}") from None
        self.rank_pattern, self.alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
        tm = cfg.get("target_modules")
        if not (isinstance(tm, str) or (isinstance(tm, list) and all(isinstance(t, str) for t in tm))):
            raise CheckpointError(f"{shown}: 'target_modules' must be a list of module names or a regex string, "
                                  f"got {tm!r}")
        self.target_modules = tm
        if cfg.get("fan_in_fan_out"):
            # PEFT: "fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting
            # fan_in_fan_out to False." Every LoRA target of these architectures is an nn.Linear.
            warnings.warn(f"{shown}: fan_in_fan_out=true is ignored for nn.Linear targets (as PEFT does)", stacklevel=4)
        mts = cfg.get("modules_to_save") or []
        if not isinstance(mts, list) or not all(isinstance(m, str) for m in mts):
            raise CheckpointError(f"{shown}: 'modules_to_save' must be a list of module names")
        self.modules_to_save = mts
        self.base = cfg.get("base_model_name_or_path")

        wname = next((n for n in WEIGHT_NAMES if _files.find_file(path, n, allow_external=ext)), None)
        if wname is None:
            raise FileNotFoundError(f"{path}: no {' or '.join(WEIGHT_NAMES)}")
        real = _files.find_file(path, wname, allow_external=ext)
        self.weights_path = os.path.join(path, wname)
        self.stamps[real] = _stamp(real)
        self.file = torchbin.open_file(real, self.weights_path) if wname.endswith(".bin") else _C.SafetensorsFile(real)
        try:
            self._index()
        except BaseException:
            self.close()
            raise

    def _index(self):
        wp = self.weights_path
        ab, self.replaced = {}, {}
        for name in self.file.keys():
            if not name.startswith(PREFIX):
                raise CheckpointError(f"{wp}: tensor '{name}' does not start with '{PREFIX}' (not a PEFT adapter file)")
            rest = name[len(PREFIX):]
            if ".lora_embedding_" in rest:
                raise NotImplementedError(f"{wp}: tensor '{name}': LoRA on embeddings is not supported")
            if ".lora_magnitude_vector" in rest:
                raise NotImplementedError(f"{wp}: tensor '{name}': DoRA adapters are not supported")
            m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", rest)
            if m:
                ab.setdefault(m.group(1), {})[m.group(2)] = name
            elif ".lora_" in rest:
                raise NotImplementedError(f"{wp}: tensor '{name}' is not a LoRA A / B weight (LoRA biases and other "
                                          "PEFT tensors are not supported)")
            else:  # modules_to_save: the module's whole tensor, under its base name
                # PEFT's save_embedding_layers="auto" (the default) also saves a LoRA-wrapped lm_head / embedding's
                # own weight as '<module>.base_layer.weight'; loading puts it under the LoRA: it replaces
                # '<module>.weight', and the LoRA is merged on top
                rest = re.sub(r"\.base_layer\.(weight|bias)$", r".\1", rest)
                if rest in self.replaced:
                    raise CheckpointError(f"{wp}: tensors '{self.replaced[rest]}' and '{name}' both replace '{rest}'")
                self.replaced[rest] = name
        self.layers = {}
        for mod, d in sorted(ab.items()):
            for side in "AB":
                if side not in d:
                    other = d["B" if side == "A" else "A"]
                    raise CheckpointError(f"{wp}: tensor '{other}' has no matching lora_{side} "
                                          f"('{PREFIX}{mod}.lora_{side}.weight' is missing)")
            rk = pattern_key(self.rank_pattern, mod)
            ak = pattern_key(self.alpha_pattern, mod)
            r = self.rank_pattern[rk] if rk is not None else self.r
            alpha = self.alpha_pattern[ak] if ak is not None else self.alpha
            shape_a, shape_b = self.file.info(d["A"])[1], self.file.info(d["B"])[1]
            if len(shape_a) != 2 or shape_a[0] != r:
                raise CheckpointError(f"{wp}: tensor '{d['A']}' has shape {list(shape_a)}: its rank (first dimension) "
                                      f"must be r = {r} ({'rank_pattern ' + repr(rk) if rk is not None else 'r'} in "
                                      f"{CONFIG_NAME})")
            if len(shape_b) != 2 or shape_b[1] != r:
                raise CheckpointError(f"{wp}: tensor '{d['B']}' has shape {list(shape_b)}: its second dimension must "
                                      f"be r = {r}")
            scale = alpha / math.sqrt(r) if self.rslora else alpha / r
            if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
                raise CheckpointError(f"{self.config_path}: LoRA scale {scale!r} for '{mod}' (lora_alpha {alpha!r}, "
                                      f"r {r}{', rsLoRA' if self.rslora else ''}) is not a usable number (|scale| "
                                      f"<= {MAX_SCALE:g})")
            self.layers[mod] = (d["A"], d["B"], r, float(scale))
        if not self.layers and not self.replaced:
            raise CheckpointError(f"{wp}: no LoRA tensors")

    def check_targets(self, base_modules):
        """Every adapter module names a linear layer of the base; every target_modules entry matches one."""
        linear = {m for m in base_modules if m.rsplit(".", 1)[-1] in LINEAR_MODULES}
        for mod, (a, _, _, _) in self.layers.items():
            if mod not in base_modules:
                raise CheckpointError(f"{self.weights_path}: tensor '{a}': the base model has no module '{mod}'")
            if mod not in linear:
                raise NotImplementedError(f"{self.weights_path}: tensor '{a}': LoRA on '{mod}' is not supported "
                                          f"(linear layers only: {', '.join(LINEAR_MODULES)})")
            if not _target_matches(self.target_modules, mod):
                raise CheckpointError(f"{self.weights_path}: tensor '{a}': module '{mod}' is not in target_modules "
                                      f"{self.target_modules!r} of {CONFIG_NAME}")
        if isinstance(self.target_modules, list):
            for t in self.target_modules:
                if not any(_target_matches([t], m) for m in base_modules):
                    raise CheckpointError(f"{self.config_path}: target module {t!r} matches no module of the base "
                                          "model")
                if not any(_target_matches([t], m) for m in self.layers):
                    warnings.warn(f"{self.weights_path}: no LoRA tensors for target module {t!r}", stacklevel=4)

    def item_lora(self, name):
        """The 7th load-item element for base tensor `name` ("...q_proj.weight"), or None."""
        if not name.endswith(".weight"):
            return None
        got = self.layers.get(name[: -len(".weight")])
        if got is None:
            return None
        a, b, _, scale = got
        return {"A": (self.file, a), "B": (self.file, b), "scale": scale}

    def summary(self) -> dict:
        kinds = sorted({m.rsplit(".", 1)[-1] for m in self.layers})
        return {"path": self.path, "r": self.r, "lora_alpha": self.alpha, "use_rslora": self.rslora,
                "target_modules": self.target_modules, "modules": len(self.layers), "module_kinds": kinds,
                "modules_to_save": sorted(self.replaced), "merged": True}

    def close(self):
        f, self.file = getattr(self, "file", None), None
        if f is not None:
            f.close()


def _stamp(real):
    st = os.stat(real)
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def base_of(adapter_dir, ext=False, revision=None, cache_dir=None, local_files_only=False) -> str:
    """The base model an adapter directory names (base_model_name_or_path): an absolute path; a relative path
    tried from the working directory (as PEFT passes it to from_pretrained) and then from the adapter directory;
    or a hub id, resolved through fastload/hub.py (the offline cache first)."""
    shown = os.path.join(adapter_dir, CONFIG_NAME)
    real = _files.find_file(adapter_dir, CONFIG_NAME, allow_external=ext)
    cfg = _files.read_json(real, shown) if real else None
    base = cfg.get("base_model_name_or_path") if isinstance(cfg, dict) else None
    if not isinstance(base, str) or not base:
        raise ValueError(f"{shown}: no base_model_name_or_path; pass the base model and the adapter separately: "
                         "from_pretrained(base, adapter=path)")
    p = os.path.expanduser(base)
    if os.path.isabs(p):
        if not os.path.exists(p):
            raise FileNotFoundError(f"{shown}: base_model_name_or_path {base!r} does not exist")
        return p
    if os.path.exists(p):
        return p
    rel = os.path.join(adapter_dir, p)
    if os.path.exists(rel):
        return os.path.normpath(rel)
    try:
        return resolve(base, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{shown}: base_model_name_or_path {base!r} is neither a path (from the working "
                                f"directory or from {adapter_dir}) nor a hub model in the cache: {e}") from None
