"""Quantised weights: what the user asks for, what a checkpoint holds, and what the C core is told.

Quantisation at load (csrc/quant.h has the format and the exact rounding rules):

    from_pretrained(path, load_in_8bit=True)                         # int8
    from_pretrained(path, load_in_4bit=True)                         # int4
    from_pretrained(path, quantization_config=fastload.QuantConfig("nf4", lm_head="none"))
    from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
    FASTLOAD_QUANT=int8 python ...        python -m fastload generate --quant int4 ...

| scheme | what it stores | default group |
|---|---|---|
| `int8` | symmetric, s = absmax / 127 per group, fp16 scales | per output channel (one group per row) |
| `int4` | asymmetric (min form): w = s * q + m, q in 0..15, fp16 s and m | 128 |
| `nf4`  | bitsandbytes' NF4 code book, s = absmax per group, fp16 scales | 64 (bitsandbytes' block size) |

What is quantised: the linear layers (q/k/v/o projections, gate/up/down) and an untied LM head (int8 per
channel by default for the 4-bit schemes, the scheme itself for int8; `lm_head="none"` keeps it in the float
dtype). Embeddings (and so a tied LM head) and norms stay in the float dtype (`torch_dtype`). A GGUF file's
quantised tensors stay as the file has them (`gguf="keep"`, the default, with or without a scheme);
`gguf="dequantize"` expands them to the float dtype at load as fastload did before.

Pre-quantised checkpoints are detected from config.json's `quantization_config` (or, for older AutoGPTQ exports,
quantize_config.json):
GPTQ (bits 4 or 8, any group size or -1, sym or not, with or without act-order `g_idx`; checkpoint_format
"gptq" (stored zeros minus one) or "gptq_v2") and AWQ (version / format "gemm", bits 4, zero_point true).
Each linear layer P is read from P.qweight, P.qzeros, P.scales (and P.g_idx for GPTQ) and repacked at load;
a layer stored as a plain P.weight (AWQ's modules_to_not_convert) loads as float. The LM head and the
embeddings of these checkpoints are float tensors and load as usual. Anything else in `quantization_config`
(bitsandbytes-serialised weights, FP8, compressed-tensors, AQLM, EETQ, HQQ, ...) raises NotImplementedError
listing what is supported.

How transformers' arguments map (a dict in transformers' shape, or any object with `to_dict()` such as
`transformers.BitsAndBytesConfig`: torch and transformers are never imported here):

| transformers | fastload |
|---|---|
| `load_in_8bit=True` | `int8` |
| `load_in_4bit=True` | `int4` |
| `bnb_4bit_quant_type="nf4"` | `nf4` |
| `bnb_4bit_quant_type="fp4"` (transformers' default) | `int4`: fastload has no FP4 code book; int4 with an offset per group of 128 is at least as accurate |
| `bnb_4bit_compute_dtype=float16 / bfloat16` | the model's float dtype (activations on the GPU, embeddings, norms) when `torch_dtype` / `dtype` is not given; `float32` (transformers' default when unset) is ignored |
| `llm_int8_skip_modules` | `"lm_head"` in the list keeps the LM head in the float dtype; other names are ignored with a warning (every linear layer is quantised) |
| `bnb_4bit_use_double_quant` | ignored: scales stay fp16 |
| `bnb_4bit_quant_storage` | ignored: codes are packed in bytes |
| `llm_int8_threshold` | ignored: no outlier decomposition (weight-only int8, activations stay in float) |
| `llm_int8_enable_fp32_cpu_offload` | ignored: no offloading, the model lives on one device |
| `llm_int8_has_fp16_weight` | ignored: inference only |

Conflicts raise ValueError naming both sides: load_in_8bit and load_in_4bit together, a flag and a
quantization_config that say different things, a quantisation request for a checkpoint that is already GPTQ/AWQ.
Explicit arguments win over FASTLOAD_QUANT, which is ignored for GPTQ / AWQ checkpoints (already quantised).
Differences from transformers: the LM head is quantised by default (bitsandbytes keeps it in float), and the
CPU is supported.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from . import config as cfgmod

SCHEMES = ("int8", "int4", "nf4")
DEFAULT_GROUP = {"int8": 0, "int4": 128, "nf4": 64}  # 0 for int8: one group per output channel (row)
GGUF_MODES = ("keep", "dequantize")
_NONE = ("none", "no", "off", "0", "false", "")
# Linear-layer slots of arch.tensor_plan (the ones quantised at load / read packed from GPTQ / AWQ): the HF parts, and
# ChatGLM's fused q|k|v and gate|up, stored whole (GPTQModel quantises those four linears of a GLM block).
LINEAR_SLOTS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "query_key_value",
                "dense_h_to_4h")

# GGUF tensor types the core reads: the first kept quantised in memory (csrc/quant.h), the rest dequantised at load.
GGUF_KEPT = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")
GGUF_DEQUANTISED = ("F32", "F16", "BF16", "F64", "Q2_K", "Q3_K", "Q8_K")
GGUF_TYPES = ", ".join(GGUF_DEQUANTISED[:4] + GGUF_KEPT + GGUF_DEQUANTISED[4:])
SUPPORTED_CHECKPOINTS = ("GPTQ (quant_method 'gptq': bits 4 or 8, checkpoint_format 'gptq' or 'gptq_v2')",
                         "AWQ (quant_method 'awq': version 'gemm', bits 4, zero_point true)")
GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}  # checkpoint_format -> zero_offset (v1 stores zero - 1)
AWQ_VERSIONS = ("gemm",)
_METHOD_NAMES = {"awq": "AWQ", "gptq": "GPTQ", "fp8": "FP8", "aqlm": "AQLM", "eetq": "EETQ", "hqq": "HQQ",
                 "exl2": "EXL2", "mxfp4": "MXFP4", "bitnet": "BitNet", "vptq": "VPTQ", "spqr": "SpQR",
                 "bitsandbytes": "bitsandbytes", "compressed-tensors": "compressed-tensors", "torchao": "torchao",
                 "quanto": "Quanto", "higgs": "HIGGS", "fbgemm_fp8": "FBGEMM FP8", "auto-round": "AutoRound"}

# Keys of a bitsandbytes quantization_config: how each one is used (see the table above).
BNB_KEYS = {
    "quant_method": "'bitsandbytes'",
    "load_in_8bit": "int8", "load_in_4bit": "int4 / nf4 (bnb_4bit_quant_type)",
    "_load_in_8bit": "load_in_8bit", "_load_in_4bit": "load_in_4bit",  # BitsAndBytesConfig.__dict__ spellings
    "bnb_4bit_quant_type": "nf4 -> nf4, fp4 -> int4",
    "bnb_4bit_compute_dtype": "the model's float dtype when torch_dtype is not given (float32 ignored)",
    "llm_int8_skip_modules": "'lm_head' keeps the LM head in float; other names ignored",
    "bnb_4bit_use_double_quant": "ignored", "bnb_4bit_quant_storage": "ignored", "llm_int8_threshold": "ignored",
    "llm_int8_enable_fp32_cpu_offload": "ignored", "llm_int8_has_fp16_weight": "ignored",
}
_QC_KEYS = ("scheme", "group_size", "lm_head", "lm_head_group", "gguf", "compute_dtype")


def _choice(v, choices, what):
    s = getattr(v, "value", v)  # str enums (transformers' QuantizationMethod)
    if not isinstance(s, str) or s.lower() not in choices:
        raise ValueError(f"{what}={v!r} is not supported; use one of {', '.join(repr(c) for c in choices)}")
    return s.lower()


def _group(v, what):
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{what}={v!r} must be an int (0: the scheme's default)")
    if v != 0 and (v < 16 or v % 16):
        raise ValueError(f"{what}={v} is not supported: use 0 (the scheme's default) or a positive multiple of 16 "
                         "that divides the layers' input size")
    return v


@dataclass
class QuantConfig:
    """Quantisation at load (see the module docstring for what each scheme stores).

    scheme:        "int8" | "int4" | "nf4" | "none" (no quantisation at load; GGUF handling still applies)
    group_size:    0 = the scheme's default (int8: per output channel, int4: 128, nf4: 64), or a positive
                   multiple of 16 dividing every linear layer's input size
    lm_head:       None = default ("int8" for int4 / nf4, the scheme itself for int8), a scheme name, or "none"
                   (keep an untied LM head in the float dtype); True means the default, False "none"
    lm_head_group: group size for the LM head (0 = its scheme's default)
    gguf:          "keep" (a GGUF's quantised tensors stay as the file has them) | "dequantize" (expanded to the
                   float dtype at load, fastload's behaviour before quantisation support)
    compute_dtype: the model's float dtype when torch_dtype / dtype is not given (transformers'
                   bnb_4bit_compute_dtype); None: torch_dtype decides
    """
    scheme: str = "none"
    group_size: int = 0
    lm_head: object = None
    lm_head_group: int = 0
    gguf: str = "keep"
    compute_dtype: object = None
    _source: str = field(default="quantization_config", init=False, repr=False, compare=False)  # for messages

    def __post_init__(self):
        self.scheme = _choice(self.scheme, SCHEMES + ("none",), "QuantConfig scheme")
        self.group_size = _group(self.group_size, "QuantConfig group_size")
        if self.lm_head is True:
            self.lm_head = None
        elif self.lm_head is False:
            self.lm_head = "none"
        if self.lm_head is not None:
            self.lm_head = _choice(self.lm_head, SCHEMES + ("none",), "QuantConfig lm_head")
        if self.scheme == "none" and self.lm_head not in (None, "none"):
            raise ValueError(f"QuantConfig lm_head={self.lm_head!r} with scheme 'none': quantising the LM head alone "
                             "is not supported (give a scheme, or leave lm_head unset)")
        self.lm_head_group = _group(self.lm_head_group, "QuantConfig lm_head_group")
        self.gguf = _choice(self.gguf, GGUF_MODES, "QuantConfig gguf")
        if self.compute_dtype is not None:
            self.compute_dtype = cfgmod.normalize_dtype(self.compute_dtype, "QuantConfig compute_dtype")
            if self.compute_dtype == "auto":
                self.compute_dtype = None

    # transformers' BitsAndBytesConfig attributes, for scripts that read them
    @property
    def load_in_8bit(self) -> bool:
        return self.scheme == "int8"

    @property
    def load_in_4bit(self) -> bool:
        return self.scheme in ("int4", "nf4")

    @property
    def quant_method(self) -> str:
        return "fastload"

    @property
    def effective_lm_head(self) -> str:
        if self.lm_head is not None:
            return self.lm_head
        return "none" if self.scheme == "none" else "int8" if self.scheme in ("int4", "nf4") else self.scheme

    def to_core(self) -> dict:
        """The dict `_C.Model(..., quant=)` takes (see common binding contract / csrc/quant.h fl_quant_cfg)."""
        return {"scheme": self.scheme, "group_size": self.group_size, "lm_head": self.effective_lm_head,
                "lm_head_group": self.lm_head_group, "gguf": self.gguf}

    def to_dict(self) -> dict:
        """JSON-able, in the shape of a quantization_config (quant_method "fastload"); from_dict reads it back."""
        return {"quant_method": "fastload", "scheme": self.scheme,
                "group_size": self.group_size or DEFAULT_GROUP.get(self.scheme, 0),
                "lm_head": self.effective_lm_head, "lm_head_group": self.lm_head_group, "gguf": self.gguf,
                "compute_dtype": self.compute_dtype, "load_in_8bit": self.load_in_8bit,
                "load_in_4bit": self.load_in_4bit}

    @classmethod
    def from_dict(cls, d: dict, source="quantization_config"):
        """fastload's own dict: the constructor's keys (plus what to_dict writes: quant_method "fastload",
        load_in_8bit / load_in_4bit, which must agree with the scheme)."""
        d = dict(d)
        qm = d.pop("quant_method", "fastload")
        if getattr(qm, "value", qm) != "fastload":
            raise ValueError(f"{source}: quant_method={qm!r} is not fastload's")
        flags = {k: d.pop(k) for k in ("load_in_8bit", "load_in_4bit") if k in d}
        d.pop("group_sizes", None)  # model.quantization_config's report of the groups the layers got
        unknown = sorted(set(d) - set(_QC_KEYS))
        if unknown:
            raise TypeError(f"{source}: unknown key(s) {unknown}; fastload's quantisation settings are "
                            f"{', '.join(_QC_KEYS)} (or a transformers BitsAndBytesConfig / its dict)")
        if "group_size" in d and "scheme" in d and d["group_size"] == DEFAULT_GROUP.get(str(d["scheme"]).lower()):
            d["group_size"] = 0  # to_dict writes the default group explicitly; 0 means the same
        qc = cls(**d)
        for k, v in flags.items():
            if bool(v) != getattr(qc, k):
                raise ValueError(f"{source}: {k}={v!r} disagrees with scheme={qc.scheme!r}")
        qc._source = source
        return qc


@dataclass(frozen=True)
class CheckpointMethod:
    """The user passed a quantization_config of a checkpoint format (GPTQConfig, AwqConfig or their dicts):
    it only describes how a GPTQ / AWQ checkpoint is stored (fastload does not quantise with GPTQ / AWQ, which
    needs calibration); the checkpoint's own config.json is used, as transformers does."""
    method: str
    source: str


# ----------------------------------------------------------------------------------------- what the user asked
def _shown(obj) -> str:
    if isinstance(obj, (str, dict, QuantConfig)):
        s = repr(obj)
        return s if len(s) <= 120 else s[:117] + "..."
    return type(obj).__name__


def _as_dict(obj, source):
    """A quantization_config given as a dict or as an object (transformers' config classes have to_dict())."""
    if isinstance(obj, dict):
        return dict(obj)
    to_dict = getattr(obj, "to_dict", None)
    if callable(to_dict):
        d = to_dict()
        if isinstance(d, dict):
            return dict(d)
    if hasattr(obj, "__dict__") and ("quant_method" in vars(obj) or hasattr(type(obj), "quant_method")):
        d = {k: v for k, v in vars(obj).items()}
        d.setdefault("quant_method", getattr(obj, "quant_method"))
        return d
    raise TypeError(f"{source}: expected a fastload.QuantConfig, a dict, a scheme name ('int8', 'int4', 'nf4') or a "
                    f"transformers quantization config (BitsAndBytesConfig), got {type(obj).__name__}")


def _dtype_name(v):
    """'float16' / 'bfloat16' / 'float32' of a compute dtype given as a string or torch dtype; None when unset."""
    if v is None:
        return None
    key = cfgmod.dtype_key(v)
    if key is None:
        raise ValueError(f"bnb_4bit_compute_dtype={v!r} is not supported; use float16, bfloat16 or float32")
    return None if key == "auto" else key


def _flag(d, k, source):
    v = d.get(k, d.get("_" + k, False))
    if v is None:
        return False
    if not isinstance(v, bool):
        if type(v).__name__ == "bool_":  # numpy bool
            return bool(v)
        raise TypeError(f"{source}: {k} must be a boolean, got {v!r}")
    return v


def from_bitsandbytes(d: dict, source="quantization_config") -> QuantConfig:
    """A transformers BitsAndBytesConfig as a dict (quant_method "bitsandbytes" or load_in_8bit / load_in_4bit
    keys) -> QuantConfig, per the table in the module docstring."""
    l8, l4 = _flag(d, "load_in_8bit", source), _flag(d, "load_in_4bit", source)
    if l8 and l4:
        raise ValueError(f"{source}: load_in_8bit and load_in_4bit are both True; only one can be used")
    if not (l8 or l4):
        raise ValueError(f"{source}: a bitsandbytes quantization_config with neither load_in_8bit nor load_in_4bit "
                         "set asks for nothing; set one of them")
    unknown = sorted(k for k in d if k not in BNB_KEYS)
    if unknown:
        warnings.warn(f"{source}: bitsandbytes setting(s) {unknown} are not known to fastload and are ignored",
                      stacklevel=4)
    scheme = "int8"
    if l4:
        qt = d.get("bnb_4bit_quant_type") or "fp4"
        qt = _choice(qt, ("nf4", "fp4"), f"{source}: bnb_4bit_quant_type")
        scheme = "nf4" if qt == "nf4" else "int4"  # no FP4 code book here: int4 (group 128, with offsets)
    skip = d.get("llm_int8_skip_modules") or []
    if isinstance(skip, str) or not isinstance(skip, (list, tuple)):
        raise TypeError(f"{source}: llm_int8_skip_modules must be a list of module names, got {skip!r}")
    lm_head = None
    others = [s for s in skip if s != "lm_head"]
    if "lm_head" in skip:
        lm_head = "none"
    if others:
        warnings.warn(f"{source}: llm_int8_skip_modules {others[:8]} ignored: fastload quantises every linear layer "
                      "(only 'lm_head' can be kept in float)", stacklevel=4)
    compute = _dtype_name(d.get("bnb_4bit_compute_dtype")) if l4 else None
    if compute == "float32":
        compute = None  # transformers' default when unset: the model keeps torch_dtype
    qc = QuantConfig(scheme, lm_head=lm_head, compute_dtype=compute)
    qc._source = source
    return qc


def _from_setting(v, source) -> QuantConfig | None:
    """A scheme name (FASTLOAD_QUANT, --quant, quantization_config="int4") -> QuantConfig, None for "none"."""
    s = str(v).strip().lower()
    if s in _NONE:
        return None
    if s not in SCHEMES:
        raise ValueError(f"{source}={v!r} is not supported; use one of {', '.join(SCHEMES)} or none")
    qc = QuantConfig(s)
    qc._source = f"{source}={v!r}"
    return qc


def from_any(obj, source="quantization_config"):
    """Whatever the user passed as quantization_config -> QuantConfig, CheckpointMethod, or None (nothing asked)."""
    if obj is None:
        return None
    if isinstance(obj, QuantConfig):
        return obj if obj._source != "quantization_config" else _with_source(obj, f"{source}={_shown(obj)}")
    if isinstance(obj, str):
        return _from_setting(obj, source)
    d = _as_dict(obj, source)
    shown = f"{source}={_shown(obj)}"
    method = d.get("quant_method")
    method = getattr(method, "value", method)
    # fastload's own (QuantConfig.to_dict's shape), also without a scheme when every key is one of its settings:
    # {"gguf": "dequantize"} is QuantConfig(gguf="dequantize")
    if method == "fastload" or (method is None and ("scheme" in d or (d and set(d) <= set(_QC_KEYS)))):
        return QuantConfig.from_dict(d, shown)
    if d.get("load_in_8bit") or d.get("load_in_4bit") or d.get("_load_in_8bit") or d.get("_load_in_4bit") \
            or method == "bitsandbytes":
        return from_bitsandbytes(d, shown)
    if method in ("gptq", "awq"):
        return CheckpointMethod(method, shown)
    if method is None:
        raise ValueError(f"{shown}: no quant_method; pass fastload's settings ({', '.join(_QC_KEYS)}), "
                         "a bitsandbytes config (load_in_8bit / load_in_4bit) or a QuantConfig")
    raise NotImplementedError(f"{shown}: quantisation method {str(method)[:40]!r} is not supported; at load fastload "
                              f"quantises to {', '.join(SCHEMES)} (load_in_8bit=True, load_in_4bit=True, "
                              "bitsandbytes configs, fastload.QuantConfig) and it reads "
                              + "; ".join(SUPPORTED_CHECKPOINTS) + " checkpoints")


def _with_source(qc, source):
    qc = QuantConfig(qc.scheme, qc.group_size, qc.lm_head, qc.lm_head_group, qc.gguf, qc.compute_dtype)
    qc._source = source
    return qc


def _bool_arg(v, name):
    if v is None:
        return False
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    raise TypeError(f"{name} must be True or False, got {v!r}")


def request(quantization_config=None, load_in_8bit=False, load_in_4bit=False, env=True):
    """The one reading of from_pretrained's quantisation arguments: QuantConfig (quantise at load),
    CheckpointMethod (a GPTQ / AWQ config: the checkpoint decides), or None (nothing asked).

    Explicit arguments win over FASTLOAD_QUANT. Conflicts raise ValueError naming both sides."""
    l8, l4 = _bool_arg(load_in_8bit, "load_in_8bit"), _bool_arg(load_in_4bit, "load_in_4bit")
    if l8 and l4:
        raise ValueError("load_in_8bit=True and load_in_4bit=True: only one can be used")
    flag = "load_in_8bit=True" if l8 else "load_in_4bit=True" if l4 else None
    req = from_any(quantization_config)
    if flag and quantization_config is not None:
        ok = isinstance(req, QuantConfig) and (req.load_in_8bit if l8 else req.load_in_4bit)
        if not ok:
            what = (f"asks for {req.scheme}" if isinstance(req, QuantConfig) else
                    f"describes a {req.method.upper()} checkpoint" if isinstance(req, CheckpointMethod) else
                    "asks for no quantisation")
            raise ValueError(f"{flag} and {_source_of(req, quantization_config)} disagree (the config {what}); "
                             "pass one of them")
        return req  # the config says the same, more precisely (e.g. nf4 for load_in_4bit)
    if flag:
        qc = QuantConfig("int8" if l8 else "int4")
        qc._source = flag
        return qc
    if req is not None or quantization_config is not None:
        return req
    if env:
        return _from_setting(cfgmod.quant_setting(), "FASTLOAD_QUANT")
    return None


def _source_of(req, obj):
    if isinstance(req, QuantConfig):
        return req._source
    if isinstance(req, CheckpointMethod):
        return req.source
    return f"quantization_config={_shown(obj)}"


# ----------------------------------------------------------------------------------------- what a checkpoint holds
@dataclass(frozen=True)
class PackedFormat:
    """A GPTQ / AWQ checkpoint's packing, from config.json's quantization_config."""
    method: str          # "gptq" | "awq"
    bits: int
    group_size: int      # -1: one group per row
    zero_offset: int     # GPTQ v1: 1 (stored zero = zero - 1); gptq_v2 and AWQ: 0
    desc_act: bool = False
    sym: bool = False
    config: dict = field(default_factory=dict, compare=False)

    @property
    def name(self) -> str:
        return self.method.upper()

    def packed(self, base, file_of, where):
        """The 6th element of a load item for linear layer `base` ("model.layers.3.self_attn.q_proj"), and the
        checkpoint tensor names it uses. file_of(name) -> the opened file holding that tensor; where: names present."""
        names = {"qweight": f"{base}.qweight", "qzeros": f"{base}.qzeros", "scales": f"{base}.scales"}
        for part in ("qzeros", "scales"):
            if names[part] not in where:
                return None, names[part]
        g = f"{base}.g_idx" if self.method == "gptq" else None
        if g is not None and g not in where:
            if self.desc_act:
                return None, g
            g = None  # without act-order g_idx is i // group_size: nothing to pass
        p = {"packing": self.method, "bits": self.bits, "group_size": self.group_size,
             "zero_offset": self.zero_offset, "qzeros": (file_of(names["qzeros"]), names["qzeros"]),
             "scales": (file_of(names["scales"]), names["scales"]), "g_idx": (file_of(g), g) if g else None}
        return p, [*names.values()] + ([g] if g else [])


def _cfg_int(q, key, where, default=None):
    v = q.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        from ._C import CheckpointError
        raise CheckpointError(f"{where}: quantization_config.{key} must be an integer, got {str(v)[:40]!r}")
    return v


def _cfg_bool(q, key, where, default):
    v = q.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        from ._C import CheckpointError
        raise CheckpointError(f"{where}: quantization_config.{key} must be true or false, got {str(v)[:40]!r}")
    return v


def _cfg_str(q, keys, where, default):
    for k in keys:  # the first present key wins (transformers: checkpoint_format over format, version over format)
        v = q.get(k)
        if v is not None:
            if not isinstance(v, str):
                from ._C import CheckpointError
                raise CheckpointError(f"{where}: quantization_config.{k} must be a string, got {str(v)[:40]!r}")
            return k, v.lower()
    return keys[0], default


def method_name(q) -> str | None:
    m = q.get("quant_method") if isinstance(q, dict) else None
    return m if isinstance(m, str) and m else None


def checkpoint_format(hf: dict, where: str) -> PackedFormat | None:
    """config.json's quantization_config -> PackedFormat (GPTQ / AWQ), None when the checkpoint is not quantised.
    Anything else raises NotImplementedError naming the method and listing what is supported; malformed values
    raise CheckpointError naming the key."""
    q = hf.get("quantization_config") if isinstance(hf, dict) else None
    if not q:
        return None
    if not isinstance(q, dict):
        from ._C import CheckpointError
        raise CheckpointError(f"{where}: quantization_config must be a JSON object")
    method = method_name(q)
    supported = "; ".join(SUPPORTED_CHECKPOINTS)
    if method is None:
        raise NotImplementedError(f"{where} is a quantised checkpoint (config.json has a quantization_config without "
                                  f"quant_method); fastload reads {supported} checkpoints, float32/float16/bfloat16 "
                                  f"safetensors, and GGUF ({GGUF_TYPES})")
    m = method.lower()
    label = f"a {_METHOD_NAMES.get(m, method[:40])}-quantised checkpoint (config.json quantization_config." \
            f"quant_method={method[:40]!r})"
    if m not in ("gptq", "awq"):
        hint = (" (bitsandbytes-serialised weights cannot be read: load the original float checkpoint with "
                "load_in_8bit=True / load_in_4bit=True instead)" if m == "bitsandbytes" else "")
        raise NotImplementedError(f"{where} is {label}; fastload reads {supported} checkpoints, float32/float16/"
                                  f"bfloat16 safetensors (quantised at load with load_in_8bit / load_in_4bit / "
                                  f"QuantConfig), and GGUF ({GGUF_TYPES}){hint}")
    bits = _cfg_int(q, "bits", where, 4 if m == "awq" else None)
    group = _cfg_int(q, "group_size", where, 128)
    if group != -1 and group <= 0:
        from ._C import CheckpointError
        raise CheckpointError(f"{where}: quantization_config.group_size must be positive or -1, got {group}")
    if m == "gptq":
        if bits not in (4, 8):
            raise NotImplementedError(f"{where} is {label} with bits={bits}; fastload reads GPTQ with bits 4 or 8 "
                                      "(2- and 3-bit GPTQ are not supported)")
        key, fmt = _cfg_str(q, ("checkpoint_format", "format"), where, "gptq")
        if fmt not in GPTQ_FORMATS or q.get("is_marlin_format"):
            raise NotImplementedError(f"{where} is {label} with {key}={fmt!r}"
                                      f"{' (is_marlin_format)' if q.get('is_marlin_format') else ''}; supported "
                                      f"GPTQ checkpoint formats: {', '.join(GPTQ_FORMATS)}")
        if q.get("dynamic"):
            raise NotImplementedError(f"{where} is {label} with per-module overrides (quantization_config.dynamic); "
                                      "fastload reads GPTQ checkpoints with one bits / group_size for every layer")
        return PackedFormat("gptq", bits, group, GPTQ_FORMATS[fmt], _cfg_bool(q, "desc_act", where, False),
                            _cfg_bool(q, "sym", where, True), dict(q))
    key, ver = _cfg_str(q, ("version", "format"), where, "gemm")
    if ver not in AWQ_VERSIONS:
        raise NotImplementedError(f"{where} is {label} with {key}={ver!r}; supported AWQ versions: "
                                  f"{', '.join(AWQ_VERSIONS)} (GEMV, GEMV-fast, Marlin, ExLlama and IPEX packings "
                                  "are not read; re-export the model with AutoAWQ's GEMM version)")
    if bits != 4:
        raise NotImplementedError(f"{where} is {label} with bits={bits}; fastload reads AWQ with bits 4")
    if not _cfg_bool(q, "zero_point", where, True):
        raise NotImplementedError(f"{where} is {label} with zero_point=false; fastload reads AWQ with zero points "
                                  "(zero_point true, AutoAWQ's default)")
    return PackedFormat("awq", bits, group, 0, False, False, dict(q))


def reconcile(req, fmt: PackedFormat | None, where: str, gguf=False):
    """The core's quant dict (or None) for a user request `req` (from request()) and a checkpoint format `fmt`."""
    if fmt is not None:  # GPTQ / AWQ: the checkpoint decides
        if isinstance(req, CheckpointMethod):
            if req.method != fmt.method:
                raise ValueError(f"{where} is a {fmt.name} checkpoint but {req.source} describes {req.method.upper()}; "
                                 "drop quantization_config (the checkpoint's own is used)")
            warnings.warn(f"{req.source}: {where} is already {fmt.name}-quantised; the quantization_config from its "
                          "config.json is used", stacklevel=4)
            return None
        if isinstance(req, QuantConfig) and req.scheme != "none" and not req._source.startswith("FASTLOAD_QUANT"):
            raise ValueError(f"{where} is already {fmt.name}-quantised ({fmt.bits}-bit); {req._source} cannot "
                             "quantise it again: drop it")
        return None
    if isinstance(req, CheckpointMethod):
        raise NotImplementedError(
            f"{req.source}: {where} is not a {req.method.upper()} checkpoint, and fastload does not quantise with "
            f"{req.method.upper()} (it needs calibration data). It reads {req.method.upper()} checkpoints as they are "
            f"(detected from config.json) and quantises at load to {', '.join(SCHEMES)} (load_in_8bit=True, "
            "load_in_4bit=True, fastload.QuantConfig)")
    if req is None:
        return None
    return req.to_core()


# ----------------------------------------------------------------------------------------- reporting
def layout_key(lay: dict) -> str:
    """A short name for a weight layout from core.layouts(): "int4 g128", "int8 per-channel", "float16"."""
    dt = str(lay.get("dtype"))
    if not lay.get("bits") or dt.startswith(("float", "bfloat")):
        return dt
    g, cols = lay.get("group_size"), lay.get("cols")
    key = f"{dt} per-channel" if g == cols else f"{dt} g{g}"
    if lay.get("scale_dtype") in ("float32", "f32"):
        key += " f32-scales"
    elif lay.get("scale_dtype") == "kscale":
        key += " k-scales"
    if lay.get("perm"):
        key += " act-order"
    return key


def summarize_layouts(layouts) -> dict:
    """{layout key: {"weights": n, "bytes": b}} over core.layouts(), largest first."""
    out = {}
    for lay in layouts:
        e = out.setdefault(layout_key(lay), {"weights": 0, "bytes": 0})
        e["weights"] += 1
        e["bytes"] += int(lay.get("bytes") or 0)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["bytes"]))


def report(core) -> dict:
    """What is quantised and what it takes, from the core (info keys and layouts()); {} from a core without them."""
    info = core.info
    if "quantized_weights" not in info:
        return {}
    out = {"quantized_weights": int(info["quantized_weights"]), "quantized_bytes": int(info["quantized_bytes"]),
           "float_bytes": int(info["float_bytes"])}
    if "interleaved_weights" in info:  # CPU: of them, rearranged for the decode kernel (README "On the CPU")
        out["interleaved_weights"] = int(info["interleaved_weights"])
    layouts = getattr(core, "layouts", None)
    if callable(layouts):
        out["layouts"] = summarize_layouts(layouts())
    return out


__all__ = ["QuantConfig", "SCHEMES", "request", "from_any", "from_bitsandbytes", "checkpoint_format", "PackedFormat",
           "reconcile", "report", "summarize_layouts"]
