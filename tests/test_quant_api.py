"""Quantisation as the user asks for it (issue 9, fastload/quant.py): every way of asking maps to the core's
quant dict, conflicts raise naming both sides, transformers' arguments that mean nothing here are accepted,
GPTQ / AWQ quantization_config parsing and refusals, the load items handed to the core, reporting, the CLI.

The first part needs no quantisation support in the core (mapping functions, and a stand-in core that records
what from_pretrained hands it). The end-to-end part at the bottom loads tiny checkpoints with the real core:
quantised at load (int8 / int4 / nf4) and GPTQ / AWQ checkpoints packed here from the fixtures' weights with each
format's own packing rules, compared against float models holding the dequantised weights."""
import json
import os
import shutil
import warnings

import numpy as np
import pytest

import fastload
import st_util
from fastload import _C, modeling
from fastload import quant as Q
from golden_util import model_dir

LLAMA = str(model_dir("llama"))        # bfloat16, untied, d 128, ffn 320, 3 shards
ROPE3 = str(model_dir("llama3_rope"))  # float16, untied, d 128, ffn 256 (every input size divides 128)
QWEN2 = str(model_dir("qwen2"))        # float32, tied, q/k/v biases, d 128, ffn 352
IDS = np.array([[1, 5, 9, 33, 2, 7, 100, 3, 17, 250]])
CORE8 = {"scheme": "int8", "group_size": 0, "lm_head": "int8", "lm_head_group": 0, "gguf": "keep"}
CORE4 = {"scheme": "int4", "group_size": 0, "lm_head": "int8", "lm_head_group": 0, "gguf": "keep"}
NF4 = {"scheme": "nf4", "group_size": 0, "lm_head": "int8", "lm_head_group": 0, "gguf": "keep"}


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("FASTLOAD_QUANT", raising=False)
    monkeypatch.delenv("FASTLOAD_DTYPE", raising=False)


def core_of(**kw):
    r = Q.request(**kw)
    return None if r is None else r.to_core()


class FakeQuantizationMethod(str):
    """transformers' QuantizationMethod is a str Enum: it has .value."""
    @property
    def value(self):
        return str(self)


class FakeBnb:
    """Duck-types transformers.BitsAndBytesConfig (which needs torch): the same __dict__ and to_dict()."""

    def __init__(self, load_in_8bit=False, load_in_4bit=False, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=None,
                 **kw):
        self.quant_method = FakeQuantizationMethod("bitsandbytes")
        self._load_in_8bit, self._load_in_4bit = load_in_8bit, load_in_4bit
        self.llm_int8_threshold = kw.get("llm_int8_threshold", 6.0)
        self.llm_int8_skip_modules = kw.get("llm_int8_skip_modules")
        self.llm_int8_enable_fp32_cpu_offload = kw.get("llm_int8_enable_fp32_cpu_offload", False)
        self.llm_int8_has_fp16_weight = kw.get("llm_int8_has_fp16_weight", False)
        self.bnb_4bit_quant_type = bnb_4bit_quant_type
        self.bnb_4bit_use_double_quant = kw.get("bnb_4bit_use_double_quant", False)
        self.bnb_4bit_compute_dtype = bnb_4bit_compute_dtype or "torch.float32"
        self.bnb_4bit_quant_storage = "torch.uint8"

    def to_dict(self):  # as transformers writes it: dtypes as names, load_in_* without the underscore
        out = dict(self.__dict__)
        out["bnb_4bit_compute_dtype"] = str(out["bnb_4bit_compute_dtype"]).split(".")[1]
        out["bnb_4bit_quant_storage"] = str(out["bnb_4bit_quant_storage"]).split(".")[1]
        out["load_in_4bit"], out["load_in_8bit"] = self._load_in_4bit, self._load_in_8bit
        return out


class AttrOnlyConfig:
    """A config object without to_dict (read through its attributes)."""
    quant_method = "bitsandbytes"

    def __init__(self, **kw):
        self.__dict__.update(kw)


# ---------------------------------------------------------------- 1. every way of asking
def test_flags():
    assert core_of(load_in_8bit=True) == CORE8
    assert core_of(load_in_4bit=True) == CORE4
    assert core_of() is None
    assert Q.request(load_in_8bit=True).load_in_8bit and Q.request(load_in_4bit=True).load_in_4bit


def test_transformers_bitsandbytes_objects():
    assert core_of(quantization_config=FakeBnb(load_in_8bit=True)) == CORE8
    assert core_of(quantization_config=FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")) == NF4
    # transformers' default 4-bit type is fp4: fastload has no FP4 code book and uses int4 (documented)
    assert core_of(quantization_config=FakeBnb(load_in_4bit=True)) == CORE4
    qc = Q.request(quantization_config=FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype="torch.bfloat16"))
    assert qc.compute_dtype == "bfloat16"
    # transformers' default compute dtype (float32, also when unset) leaves the model's dtype to torch_dtype
    assert Q.request(quantization_config=FakeBnb(load_in_4bit=True)).compute_dtype is None
    # an object without to_dict is read through its attributes
    assert core_of(quantization_config=AttrOnlyConfig(load_in_8bit=True)) == CORE8
    assert core_of(quantization_config=AttrOnlyConfig(_load_in_4bit=True, bnb_4bit_quant_type="nf4")) == NF4


class _FakeTorchDtype:
    __module__ = "torch"

    def __init__(self, s):
        self.s = s

    def __str__(self):
        return self.s


def test_transformers_dicts():
    assert core_of(quantization_config={"quant_method": "bitsandbytes", "load_in_8bit": True}) == CORE8
    assert core_of(quantization_config={"load_in_8bit": True}) == CORE8  # transformers' AutoQuantizationConfig reads this
    assert core_of(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}) == NF4
    assert core_of(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}) == CORE4
    for dt, want in (("float16", "float16"), ("bfloat16", "bfloat16"), (_FakeTorchDtype("torch.float16"), "float16"),
                     ("float32", None), (None, None)):
        qc = Q.request(quantization_config={"load_in_4bit": True, "bnb_4bit_compute_dtype": dt})
        assert qc.compute_dtype == want, dt
    with pytest.raises(ValueError, match="bnb_4bit_compute_dtype"):
        Q.request(quantization_config={"load_in_4bit": True, "bnb_4bit_compute_dtype": "int8"})
    with pytest.raises(ValueError, match="bnb_4bit_quant_type"):
        Q.request(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "int2"})


def test_ignored_transformers_arguments_are_accepted_quietly():
    ignored = {"bnb_4bit_use_double_quant": True, "llm_int8_threshold": 4.0, "llm_int8_enable_fp32_cpu_offload": True,
               "llm_int8_has_fp16_weight": True, "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": None}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert core_of(quantization_config={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", **ignored}) == NF4
        assert core_of(quantization_config=FakeBnb(load_in_8bit=True, **ignored)) == CORE8
    for k in ignored:  # each is documented in the mapping table
        assert k in Q.BNB_KEYS and k in Q.__doc__


def test_skip_modules_and_unknown_keys():
    qc = Q.request(quantization_config={"load_in_8bit": True, "llm_int8_skip_modules": ["lm_head"]})
    assert qc.to_core()["lm_head"] == "none"
    with pytest.warns(UserWarning, match="mlp.gate"):
        qc = Q.request(quantization_config={"load_in_4bit": True, "llm_int8_skip_modules": ["lm_head", "mlp.gate"]})
    assert qc.to_core()["lm_head"] == "none" and qc.scheme == "int4"
    with pytest.warns(UserWarning, match="bnb_4bit_fancy"):
        Q.request(quantization_config={"load_in_4bit": True, "bnb_4bit_fancy": 1})
    with pytest.raises(TypeError, match="llm_int8_skip_modules"):
        Q.request(quantization_config={"load_in_8bit": True, "llm_int8_skip_modules": "lm_head"})


def test_fastload_dicts_quantconfig_and_names():
    assert core_of(quantization_config={"scheme": "nf4", "group_size": 32, "lm_head": "none"}) == \
        {"scheme": "nf4", "group_size": 32, "lm_head": "none", "lm_head_group": 0, "gguf": "keep"}
    assert core_of(quantization_config=fastload.QuantConfig("int4", group_size=64, lm_head="int4", lm_head_group=32)) == \
        {"scheme": "int4", "group_size": 64, "lm_head": "int4", "lm_head_group": 32, "gguf": "keep"}
    assert core_of(quantization_config=fastload.QuantConfig(gguf="dequantize")) == \
        {"scheme": "none", "group_size": 0, "lm_head": "none", "lm_head_group": 0, "gguf": "dequantize"}
    assert core_of(quantization_config=fastload.QuantConfig("INT8", lm_head=False))["lm_head"] == "none"
    assert core_of(quantization_config=fastload.QuantConfig("int8", lm_head=True))["lm_head"] == "int8"
    assert core_of(quantization_config="int4") == CORE4
    assert core_of(quantization_config="nf4") == NF4
    assert core_of(quantization_config="none") is None
    # to_dict (what model.quantization_config shows) reads back to the same request
    for qc in (fastload.QuantConfig("nf4"), fastload.QuantConfig("int4", group_size=32, lm_head="none"),
               fastload.QuantConfig("int8", compute_dtype="bfloat16")):
        d = qc.to_dict()
        assert d["quant_method"] == "fastload" and json.loads(json.dumps(d)) == d
        assert core_of(quantization_config=d) == qc.to_core()
        assert Q.request(quantization_config=d).compute_dtype == qc.compute_dtype
    assert fastload.QuantConfig("nf4").to_dict()["group_size"] == 64
    assert fastload.QuantConfig("int4").to_dict()["load_in_4bit"] is True


@pytest.mark.parametrize("kw,exc,match", [
    ({"scheme": "int3"}, ValueError, "scheme='int3'"),
    ({"scheme": "int8", "group_size": 10}, ValueError, "group_size=10"),
    ({"scheme": "int8", "group_size": -1}, ValueError, "group_size=-1"),
    ({"scheme": "int8", "group_size": "64"}, TypeError, "group_size"),
    ({"scheme": "int4", "gguf": "drop"}, ValueError, "gguf='drop'"),
    ({"scheme": "int4", "lm_head": "fp8"}, ValueError, "lm_head='fp8'"),
    ({"scheme": "int4", "compute_dtype": "int8"}, ValueError, "compute_dtype"),
])
def test_quantconfig_validation(kw, exc, match):
    with pytest.raises(exc, match=match):
        fastload.QuantConfig(**kw)
    with pytest.raises(exc, match=match):
        Q.request(quantization_config=dict(kw))


def test_bad_requests():
    with pytest.raises(TypeError, match="unknown key.*'groupsize'"):
        Q.request(quantization_config={"scheme": "int4", "groupsize": 32})
    with pytest.raises(ValueError, match="load_in_4bit=True disagrees with scheme='int8'"):
        Q.request(quantization_config={"quant_method": "fastload", "scheme": "int8", "load_in_4bit": True})
    with pytest.raises(ValueError, match="quantization_config='int5'"):
        Q.request(quantization_config="int5")
    with pytest.raises(TypeError, match="got list"):
        Q.request(quantization_config=["int8"])
    with pytest.raises(ValueError, match="no quant_method"):
        Q.request(quantization_config={"bits": 4})
    with pytest.raises(TypeError, match="load_in_8bit must be True or False"):
        Q.request(load_in_8bit="yes")


def test_conflicts_name_both_sides():
    with pytest.raises(ValueError, match="load_in_8bit=True and load_in_4bit=True"):
        Q.request(load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="load_in_4bit are both True"):
        Q.request(quantization_config={"load_in_8bit": True, "load_in_4bit": True})
    with pytest.raises(ValueError, match="neither load_in_8bit nor load_in_4bit"):
        Q.request(quantization_config={"quant_method": "bitsandbytes"})
    with pytest.raises(ValueError, match=r"load_in_8bit=True and quantization_config=FakeBnb disagree .*int4"):
        Q.request(load_in_8bit=True, quantization_config=FakeBnb(load_in_4bit=True))
    with pytest.raises(ValueError, match=r"load_in_4bit=True and quantization_config=.*int8"):
        Q.request(load_in_4bit=True, quantization_config="int8")
    with pytest.raises(ValueError, match=r"load_in_4bit=True and quantization_config=.*gptq.* GPTQ checkpoint"):
        Q.request(load_in_4bit=True, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(ValueError, match=r"load_in_8bit=True and quantization_config='none'"):
        Q.request(load_in_8bit=True, quantization_config="none")
    # agreeing: the config says the same, more precisely
    assert core_of(load_in_4bit=True, quantization_config=FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")) == NF4
    assert core_of(load_in_8bit=True, quantization_config={"load_in_8bit": True}) == CORE8


def test_environment(monkeypatch):
    monkeypatch.setenv("FASTLOAD_QUANT", "int8")
    qc = Q.request()
    assert qc.to_core() == CORE8 and qc._source == "FASTLOAD_QUANT='int8'"
    assert core_of(load_in_4bit=True) == CORE4              # explicit arguments win
    assert core_of(quantization_config="none") is None      # also an explicit "none"
    assert core_of(quantization_config="nf4") == NF4
    for v in ("none", "off", "0", ""):
        monkeypatch.setenv("FASTLOAD_QUANT", v)
        assert Q.request() is None
    monkeypatch.setenv("FASTLOAD_QUANT", "NF4")
    assert core_of() == NF4
    monkeypatch.setenv("FASTLOAD_QUANT", "fp8")
    with pytest.raises(ValueError, match="FASTLOAD_QUANT='fp8'.*int8, int4, nf4"):
        Q.request()
    assert fastload.config.quant_setting("int4") == "int4" and fastload.config.quant_setting("off") == "none"


@pytest.mark.parametrize("method", ["hqq", "fp8", "aqlm", "eetq", "torchao", "compressed-tensors"])
def test_unsupported_methods_asked_for(method):
    with pytest.raises(NotImplementedError) as e:
        Q.request(quantization_config={"quant_method": method})
    msg = str(e.value)
    assert method in msg and "int8, int4, nf4" in msg and "GPTQ" in msg and "AWQ" in msg


def test_gptq_awq_configs_asked_for_describe_checkpoints():
    r = Q.request(quantization_config={"quant_method": "gptq", "bits": 4, "group_size": 128})
    assert isinstance(r, Q.CheckpointMethod) and r.method == "gptq"
    # for a float checkpoint: fastload does not run GPTQ / AWQ (calibration); it says what it does instead
    with pytest.raises(NotImplementedError, match="calibration.*load_in_8bit=True"):
        Q.reconcile(r, None, "/m")
    gptq = Q.checkpoint_format({"quantization_config": {"quant_method": "gptq", "bits": 4}}, "/m")
    with pytest.warns(UserWarning, match="already GPTQ-quantised"):
        assert Q.reconcile(r, gptq, "/m") is None
    awq = Q.checkpoint_format({"quantization_config": {"quant_method": "awq", "bits": 4, "version": "gemm"}}, "/m")
    with pytest.raises(ValueError, match="is a AWQ checkpoint but .* GPTQ"):
        Q.reconcile(r, awq, "/m")
    # quantising an already quantised checkpoint again is refused; FASTLOAD_QUANT is only a default: ignored
    with pytest.raises(ValueError, match="already GPTQ-quantised .4-bit.; load_in_8bit=True cannot"):
        Q.reconcile(Q.request(load_in_8bit=True), gptq, "/m")
    env = Q.QuantConfig("int8")
    env._source = "FASTLOAD_QUANT='int8'"
    assert Q.reconcile(env, gptq, "/m") is None
    assert Q.reconcile(Q.QuantConfig("none"), gptq, "/m") is None
    assert Q.reconcile(Q.request(load_in_8bit=True), None, "/m") == CORE8


# ---------------------------------------------------------------- 2. GPTQ / AWQ quantization_config parsing
def fmt(**q):
    return Q.checkpoint_format({"quantization_config": q}, "/ckpt")


def test_gptq_parsing():
    f = fmt(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True)
    assert (f.method, f.bits, f.group_size, f.zero_offset, f.desc_act, f.sym) == ("gptq", 4, 128, 1, False, True)
    assert fmt(quant_method="gptq", bits=8, group_size=-1, checkpoint_format="gptq_v2").zero_offset == 0
    assert fmt(quant_method="gptq", bits=4, format="gptq_v2").zero_offset == 0
    assert fmt(quant_method="gptq", bits=4, checkpoint_format="gptq", format="gptq_v2").zero_offset == 1
    assert fmt(quant_method="gptq", bits=4, desc_act=True).desc_act
    assert Q.checkpoint_format({}, "/ckpt") is None and Q.checkpoint_format({"quantization_config": {}}, "/c") is None
    assert Q.checkpoint_format({"quantization_config": None}, "/ckpt") is None


@pytest.mark.parametrize("bits", [2, 3])
def test_gptq_low_bits_refused(bits):
    with pytest.raises(NotImplementedError, match=f"bits={bits}; fastload reads GPTQ with bits 4 or 8"):
        fmt(quant_method="gptq", bits=bits, group_size=128)


def test_gptq_refusals():
    with pytest.raises(NotImplementedError, match="checkpoint_format='marlin'; supported GPTQ checkpoint formats: gptq, "
                                                  "gptq_v2"):
        fmt(quant_method="gptq", bits=4, checkpoint_format="marlin")
    with pytest.raises(NotImplementedError, match="is_marlin_format"):
        fmt(quant_method="gptq", bits=4, is_marlin_format=True)
    with pytest.raises(NotImplementedError, match="dynamic"):
        fmt(quant_method="gptq", bits=4, dynamic={"-:.*mlp.*": {}})
    with pytest.raises(fastload.CheckpointError, match="quantization_config.bits must be an integer"):
        fmt(quant_method="gptq", bits="4")
    with pytest.raises(fastload.CheckpointError, match="quantization_config.bits"):
        fmt(quant_method="gptq")
    with pytest.raises(fastload.CheckpointError, match="group_size must be positive or -1, got 0"):
        fmt(quant_method="gptq", bits=4, group_size=0)
    with pytest.raises(fastload.CheckpointError, match="desc_act must be true or false"):
        fmt(quant_method="gptq", bits=4, desc_act="yes")
    with pytest.raises(fastload.CheckpointError, match="must be a JSON object"):
        Q.checkpoint_format({"quantization_config": [1]}, "/ckpt")


def test_awq_parsing_and_refusals():
    f = fmt(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemm")
    assert (f.method, f.bits, f.group_size, f.zero_offset) == ("awq", 4, 128, 0)
    assert fmt(quant_method="awq", bits=4, group_size=64, format="GEMM").group_size == 64  # transformers 5 spelling
    assert fmt(quant_method="awq").bits == 4  # AwqConfig's defaults: 4 bits, gemm
    for v in ("gemv", "gemv_fast", "exllama", "marlin", "ipex", "llm-awq"):
        with pytest.raises(NotImplementedError, match=f"version='{v}'; supported AWQ versions: gemm"):
            fmt(quant_method="awq", bits=4, version=v)
    with pytest.raises(NotImplementedError, match="format='gemv'; supported AWQ versions: gemm"):
        fmt(quant_method="awq", bits=4, format="gemv")
    with pytest.raises(NotImplementedError, match="version='gemv'"):  # version (legacy) wins over format
        fmt(quant_method="awq", bits=4, format="gemm", version="gemv")
    with pytest.raises(NotImplementedError, match="bits=8; fastload reads AWQ with bits 4"):
        fmt(quant_method="awq", bits=8)
    with pytest.raises(NotImplementedError, match="zero_point=false"):
        fmt(quant_method="awq", bits=4, zero_point=False)


@pytest.mark.parametrize("method,name", [("bitsandbytes", "bitsandbytes"), ("fp8", "FP8"),
                                         ("compressed-tensors", "compressed-tensors"), ("aqlm", "AQLM"),
                                         ("eetq", "EETQ"), ("hqq", "HQQ"), ("exl2", "EXL2"), ("newthing", "newthing")])
def test_other_checkpoint_methods_refused(method, name):
    with pytest.raises(NotImplementedError) as e:
        fmt(quant_method=method, bits=4)
    msg = str(e.value)
    assert msg.startswith(f"/ckpt is a {name}-quantised checkpoint (config.json quantization_config.quant_method="
                          f"'{method}')"), msg
    assert "GPTQ (quant_method 'gptq': bits 4 or 8" in msg and "AWQ (quant_method 'awq': version 'gemm'" in msg
    assert "Q4_K" in msg and "load_in_8bit" in msg


def test_packed_item_parts():
    f = fmt(quant_method="gptq", bits=4, group_size=32, desc_act=False)
    base = "model.layers.0.self_attn.q_proj"
    where = {f"{base}.{p}" for p in ("qweight", "qzeros", "scales")}
    p, names = f.packed(base, lambda n: "FILE:" + n, where)
    assert p == {"packing": "gptq", "bits": 4, "group_size": 32, "zero_offset": 1,
                 "qzeros": ("FILE:" + base + ".qzeros", base + ".qzeros"),
                 "scales": ("FILE:" + base + ".scales", base + ".scales"), "g_idx": None}
    assert sorted(names) == sorted(where)
    p, names = f.packed(base, lambda n: "F", where | {base + ".g_idx"})  # passed when present, even without desc_act
    assert p["g_idx"] == ("F", base + ".g_idx") and base + ".g_idx" in names
    fa = fmt(quant_method="gptq", bits=4, desc_act=True)
    assert fa.packed(base, lambda n: "F", where) == (None, base + ".g_idx")  # act-order needs g_idx
    assert f.packed(base, lambda n: "F", where - {base + ".scales"}) == (None, base + ".scales")
    fw = fmt(quant_method="awq", bits=4, group_size=64)
    p, _ = fw.packed(base, lambda n: "F", where | {base + ".g_idx"})
    assert p["packing"] == "awq" and p["zero_offset"] == 0 and p["g_idx"] is None


def test_layout_summary():
    lays = [{"name": "layers.0.wqkv", "dtype": "int4", "bits": 4, "group_size": 128, "scale_dtype": "float16",
             "zeros": True, "perm": False, "bytes": 100, "rows": 384, "cols": 256},
            {"name": "layers.0.wo", "dtype": "int4", "bits": 4, "group_size": 128, "scale_dtype": "float16",
             "zeros": True, "perm": False, "bytes": 50, "rows": 128, "cols": 256},
            {"name": "lm_head", "dtype": "int8", "bits": 8, "group_size": 128, "scale_dtype": "float16", "zeros": False,
             "perm": False, "bytes": 400, "rows": 384, "cols": 128},
            {"name": "layers.1.w_down", "dtype": "int8", "bits": 8, "group_size": 16, "scale_dtype": "float32",
             "zeros": False, "perm": True, "bytes": 7, "rows": 128, "cols": 256},
            {"name": "embed_tokens", "dtype": "float16", "bits": 16, "group_size": 0, "bytes": 30, "rows": 3, "cols": 5}]
    assert Q.summarize_layouts(lays) == {"int8 per-channel": {"weights": 1, "bytes": 400},
                                         "int4 g128": {"weights": 2, "bytes": 150},
                                         "float16": {"weights": 1, "bytes": 30},
                                         "int8 g16 f32-scales act-order": {"weights": 1, "bytes": 7}}


# ---------------------------------------------------------------- 3. what from_pretrained hands the core
class _Stop(Exception):
    pass


class RecordingCore:
    """Stands for _C.Model: records the constructor's quant= and the load items, then stops the load."""
    seen = {}

    def __init__(self, cfg, dtype=None, device=None, threads=None, **kw):
        RecordingCore.seen = {"dtype": dtype, "kw": kw}

    def load(self, items, progress=None):
        RecordingCore.seen["items"] = list(items)
        raise _Stop()


@pytest.fixture
def recording(monkeypatch):
    monkeypatch.setattr(modeling._C, "Model", RecordingCore)
    RecordingCore.seen = {}
    return RecordingCore.seen


def seen_load(path, **kw):
    with pytest.raises(_Stop):
        fastload.from_pretrained(str(path), device_map="cpu", **kw)
    return RecordingCore.seen


def test_core_gets_quant_dict(recording):
    assert seen_load(ROPE3)["kw"] == {}  # nothing asked: the core is called as before
    s = seen_load(ROPE3, load_in_8bit=True)
    assert s["kw"] == {"quant": CORE8} and s["dtype"] == "float16"
    assert all(len(it) == 5 for it in s["items"])  # float checkpoint: plain items, the core quantises
    assert seen_load(ROPE3, quantization_config=FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4"))["kw"] == \
        {"quant": NF4}
    # bnb_4bit_compute_dtype sets the model dtype unless torch_dtype / dtype is given
    bf = FakeBnb(load_in_4bit=True, bnb_4bit_compute_dtype="torch.bfloat16")
    assert seen_load(ROPE3, quantization_config=bf)["dtype"] == "bfloat16"
    assert seen_load(ROPE3, quantization_config=bf, torch_dtype="float32")["dtype"] == "float32"


def test_core_gets_quant_dict_from_env(recording, monkeypatch):
    monkeypatch.setenv("FASTLOAD_QUANT", "int4")
    assert seen_load(ROPE3)["kw"] == {"quant": CORE4}
    assert seen_load(ROPE3, quantization_config="none")["kw"] == {}


def test_conflicts_raise_before_loading(recording):
    with pytest.raises(ValueError, match="load_in_8bit=True and load_in_4bit=True"):
        fastload.from_pretrained(ROPE3, device_map="cpu", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(NotImplementedError, match="calibration"):
        fastload.from_pretrained(ROPE3, device_map="cpu", quantization_config={"quant_method": "awq", "bits": 4})
    assert recording == {}


# GPTQ / AWQ packing, written here from each format's rules (AutoGPTQ / GPTQModel pack(), AutoAWQ's WQLinear_GEMM):
def _pack_rows(vals, bits):
    """uint values [n, m] (< 2^bits) -> int32 [n * bits / 32, m], packed along rows, low bits first (GPTQ qweight)."""
    per = 32 // bits
    v = vals.astype(np.uint32).reshape(vals.shape[0] // per, per, vals.shape[1])
    out = np.zeros((v.shape[0], v.shape[2]), np.uint32)
    for j in range(per):
        out |= v[:, j, :] << np.uint32(bits * j)
    return out.view(np.int32)


def _pack_cols(vals, bits, order=None):
    """uint values [n, m] -> int32 [n, m * bits / 32], packed along columns (GPTQ qzeros; AWQ with `order`)."""
    per = 32 // bits
    order = order or list(range(per))
    v = vals.astype(np.uint32).reshape(vals.shape[0], vals.shape[1] // per, per)
    out = np.zeros(v.shape[:2], np.uint32)
    for j in range(per):
        out |= v[:, :, order[j]] << np.uint32(bits * j)
    return out.view(np.int32)


AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


def quantise_packed(w, method, bits, group, act_order=False, zero_offset=1, seed=0):
    """Float W [out, in] -> (checkpoint tensors {suffix: array}, dequantised W float32 [out, in])."""
    rng = np.random.default_rng(seed)
    out_f, in_f = w.shape
    g = in_f if group == -1 else group
    ng = in_f // g
    g_idx = np.arange(in_f) // g
    if act_order:  # GPTQ desc_act: groups follow a permutation of the input columns
        perm = rng.permutation(in_f)
        g_idx = np.empty(in_f, np.int64)
        g_idx[perm] = np.arange(in_f) // g
    top = 2 ** bits - 1
    scales = np.zeros((ng, out_f), np.float16)
    zeros = np.zeros((ng, out_f), np.int64)
    q = np.zeros((in_f, out_f), np.int64)
    for k in range(ng):
        cols = np.nonzero(g_idx == k)[0]
        blk = w[:, cols].astype(np.float32)
        lo, hi = np.minimum(blk.min(1), 0), np.maximum(blk.max(1), 0)
        s = np.maximum((hi - lo) / top, 1e-4).astype(np.float16)
        z = np.clip(np.round(-lo / s.astype(np.float32)), 0, top).astype(np.int64)
        scales[k], zeros[k] = s, z
        q[cols] = np.clip(np.round(blk / s.astype(np.float32)[:, None]) + z[:, None], 0, top).T
    deq = (scales.astype(np.float32)[g_idx].T * (q.T - zeros[g_idx].T)).astype(np.float32)
    if method == "gptq":
        # v1 as GPTQModel writes it: 1 subtracted from every field of each whole word (a zero of 0 borrows)
        qz = _pack_cols(zeros, bits).view(np.uint32) - np.uint32(zero_offset * (0xFFFFFFFF // (2 ** bits - 1)))
        t = {"qweight": _pack_rows(q, bits), "qzeros": qz.astype(np.uint32).view(np.int32), "scales": scales,
             "g_idx": g_idx.astype(np.int32)}
    else:
        t = {"qweight": _pack_cols(q, 4, AWQ_ORDER), "qzeros": _pack_cols(zeros, 4, AWQ_ORDER), "scales": scales}
    return t, deq


LINEAR = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj")


def write_packed_pair(tmp_path, src, qc, group, act_order=False, skip=()):
    """From fixture `src`: a GPTQ / AWQ checkpoint (config.json quantization_config = qc) and a float32 checkpoint
    holding the dequantised weights. Layers whose name contains an entry of `skip` stay float in both."""
    cfg = json.loads(open(os.path.join(src, "config.json")).read())
    tensors = {}
    for fn in sorted(os.listdir(src)):
        if fn.endswith(".safetensors"):
            with _C.SafetensorsFile(os.path.join(src, fn)) as f:
                for k in f.keys():
                    a = np.array(f.get(k))
                    tensors[k] = st_util.bf16_to_f32(a) if a.dtype == np.uint16 else a.astype(np.float32)
    packed, ref = {}, {}
    for k, a in tensors.items():
        base = k[:-len(".weight")]
        if k.endswith(".weight") and base.endswith(LINEAR) and not any(s in k for s in skip):
            t, deq = quantise_packed(a, qc["quant_method"], qc.get("bits", 4), group, act_order,
                                     0 if qc.get("checkpoint_format") == "gptq_v2" else 1)
            packed.update({f"{base}.{p}": v for p, v in t.items()})
            ref[k] = deq
        else:
            packed[k] = a.astype(np.float16)
            ref[k] = a.astype(np.float16).astype(np.float32)
    qd, rd = tmp_path / "packed", tmp_path / "ref"
    for d, t, c in ((qd, packed, dict(cfg, quantization_config=qc, dtype="float16")),
                    (rd, ref, dict(cfg, dtype="float32"))):
        d.mkdir()
        (d / "config.json").write_text(json.dumps(c))
        st_util.write(d / "model.safetensors", t)
    return qd, rd


def test_gptq_load_items(recording, tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}
    qd, _ = write_packed_pair(tmp_path, QWEN2, qc, 32, act_order=True)
    s = seen_load(qd)
    assert s["kw"] == {}  # the checkpoint decides; no quantisation at load
    items = {it[4]: it for it in s["items"]}
    q = items["model.layers.1.self_attn.q_proj.qweight"]
    assert q[:3] == (_C.SLOTS["q_proj"], 1, 0) and len(q) == 6
    p = q[5]
    assert {k: p[k] for k in ("packing", "bits", "group_size", "zero_offset")} == \
        {"packing": "gptq", "bits": 4, "group_size": 32, "zero_offset": 1}
    assert p["qzeros"][1] == "model.layers.1.self_attn.q_proj.qzeros" and p["qzeros"][0] is q[3]
    assert p["scales"][1] == "model.layers.1.self_attn.q_proj.scales"
    assert p["g_idx"][1] == "model.layers.1.self_attn.q_proj.g_idx"
    assert len(items["model.layers.1.self_attn.q_proj.bias"]) == 5  # biases, norms, embeddings stay float
    assert len(items["model.embed_tokens.weight"]) == 5
    assert sum(len(it) == 6 for it in s["items"]) == 7 * 3


def test_awq_load_items_and_float_layers(recording, tmp_path):
    qc = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm",
          "modules_to_not_convert": ["down_proj"]}
    qd, _ = write_packed_pair(tmp_path, ROPE3, qc, 64, skip=("down_proj",))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every tensor is used
        s = seen_load(qd)
    items = {it[4]: it for it in s["items"]}
    assert items["model.layers.0.mlp.up_proj.qweight"][5]["packing"] == "awq"
    assert items["model.layers.0.mlp.up_proj.qweight"][5]["zero_offset"] == 0
    assert len(items["model.layers.0.mlp.down_proj.weight"]) == 5  # modules_to_not_convert: a float layer
    assert len(items["lm_head.weight"]) == 5


def test_packed_checkpoint_errors(recording, tmp_path):
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    qd, _ = write_packed_pair(tmp_path, ROPE3, qc, 32)
    t = {}
    with _C.SafetensorsFile(str(qd / "model.safetensors")) as f:
        for k in f.keys():
            t[k] = np.array(f.get(k))  # a copy: the file is rewritten below while its old mapping may live
    base = "model.layers.1.mlp.up_proj"
    st_util.write(qd / "model.safetensors", {k: v for k, v in t.items() if k != base + ".qzeros"})
    with pytest.raises(fastload.CheckpointError, match=f"missing tensor '{base}.qzeros' of the GPTQ layer '{base}'"):
        fastload.from_pretrained(str(qd), device_map="cpu")
    st_util.write(qd / "model.safetensors", {k: v for k, v in t.items() if not k.startswith(base)})
    with pytest.raises(fastload.CheckpointError, match=f"missing tensor '{base}.qweight' .GPTQ checkpoint"):
        fastload.from_pretrained(str(qd), device_map="cpu")
    with pytest.raises(ValueError, match="already GPTQ-quantised"):
        fastload.from_pretrained(str(qd), device_map="cpu", load_in_4bit=True)
    cfg = json.loads((qd / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (qd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(NotImplementedError, match="bits=3"):
        fastload.from_pretrained(str(qd), device_map="cpu")


def test_cli_quant_option(capsys):
    from fastload.__main__ import main
    assert main(["info"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["quantization"]["at_load"] == ["int8", "int4", "nf4"] and "model" not in out
    assert "Q4_K" in out["quantization"]["gguf_kept_quantised"]
    with pytest.raises(SystemExit):
        main(["generate", "--prompt", "x", "--quant", "int3"])
    assert "--quant" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. end to end with the core's quantisation
# These need the quantising core (csrc/quant.c, py_model.c's quant=, core.layouts()); they fail, not skip,
# on a core without it.
def load(path, **kw):
    kw.setdefault("device_map", "cpu")
    return fastload.from_pretrained(str(path), **kw)


def logits(m, ids=IDS):
    return np.asarray(m(ids).logits, np.float32)


def close(a, b, rel):
    """Relative RMS error of logits a against b below rel."""
    err = np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b ** 2))
    assert err < rel, f"relative RMS error {err:.4g} >= {rel}"


# Quantisation at load by the rules of docs common to the CPU and CUDA quantisers (csrc/quant.h, fl_q_quantize_rows):
# float32 arithmetic on the source values, IEEE division, round half to even, fp16 scales and offsets.
NF4_TABLE = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                      -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                      0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                      0.7229568362236023, 1.0], np.float32)
NF4_MID = ((NF4_TABLE[:-1] + NF4_TABLE[1:]) * np.float32(0.5)).astype(np.float32)


def _f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def dequant_at_load(w, scheme, group):
    """W [rows, cols] -> the float32 values the core holds after quantising W with `scheme` (group 0: default)."""
    rows, cols = w.shape
    g = group or {"int8": cols, "int4": 128, "nf4": 64}[scheme]
    x = w.astype(np.float32).reshape(rows, cols // g, g)
    with np.errstate(divide="ignore", invalid="ignore"):
        if scheme == "int8":
            s = _f16(np.abs(x).max(-1, keepdims=True) / np.float32(127.0))
            out = s * np.where(s == 0, 0, np.clip(np.rint(x / s), -127, 127)).astype(np.float32)
        elif scheme == "int4":  # the (scale, offset) search of csrc/quant_ref.c, its numpy mirror in test_quant_ops
            from test_quant_ops import np_clamp15, np_int4_search
            s, m = np_int4_search(x.reshape(-1, g))
            s, m = s.reshape(rows, cols // g, 1), m.reshape(rows, cols // g, 1)
            inv = (np.float32(1.0) / s).astype(np.float32)
            out = s * np.where(s == 0, 0, np_clamp15(np.rint((x - m) * inv))).astype(np.float32) + m
        else:  # nf4: the sign of the scale is searched (test_quant_ops.np_nf4_scale)
            from test_quant_ops import np_nf4_scale
            s = np_nf4_scale(x.reshape(-1, g)).reshape(rows, cols // g, 1)
            v = np.where(s == 0, 0, x / s).astype(np.float32)
            out = s * NF4_TABLE[(v[..., None] > NF4_MID).sum(-1)]
    return out.astype(np.float32).reshape(rows, cols)


def at_load_reference(tmp_path, src, scheme, group=0, lm_head="int8"):
    """A float32 checkpoint holding fixture `src`'s weights as quantisation at load leaves them."""
    with _C.SafetensorsFile(os.path.join(src, "model.safetensors")) as f:
        t = {k: np.array(f.get(k)).astype(np.float32) for k in f.keys()}
    for k, a in t.items():
        if k.endswith("_proj.weight"):
            t[k] = dequant_at_load(a, scheme, group)
        elif k == "lm_head.weight" and lm_head != "none":
            t[k] = dequant_at_load(a, lm_head, 0)
    d = tmp_path / f"ref-{scheme}-{group}-{lm_head}"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(dict(json.loads(open(os.path.join(src, "config.json")).read()),
                                                   dtype="float32")))
    st_util.write(d / "model.safetensors", t)
    return d


def same_logits(m, ref_path):
    """m's logits equal those of the float32 model at ref_path (the same weight values) up to summation order.
    FASTLOAD_CPU_QDOT=exact (read on every call): x unquantised, as a prompt of up to 16 tokens would otherwise take
    the integer decode path and add its int16 rounding."""
    import os
    ref = logits(load(ref_path, torch_dtype="float32"))
    old = os.environ.get("FASTLOAD_CPU_QDOT")
    os.environ["FASTLOAD_CPU_QDOT"] = "exact"
    try:
        got = logits(m)
    finally:
        if old is None:
            del os.environ["FASTLOAD_CPU_QDOT"]
        else:
            os.environ["FASTLOAD_CPU_QDOT"] = old
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_load_in_8bit_end_to_end(tmp_path):
    fp16 = load(ROPE3, torch_dtype="float16")
    m = load(ROPE3, load_in_8bit=True)
    assert m.is_quantized and m.is_loaded_in_8bit and not m.is_loaded_in_4bit and m.dtype == "float16"
    assert m.quantization_config == fastload.QuantConfig("int8").to_dict() and m.quantization_method == "fastload"
    assert m.config["quantization_config"]["scheme"] == "int8"
    ms = m.memory_stats()
    assert ms["quantized_weights"] > 0 and 0.98 * ms["weights"] <= ms["quantized_bytes"] + ms["float_bytes"] <= ms["weights"]
    assert ms["weights"] < 0.75 * fp16.memory_stats()["weights"]
    lay = ms["layouts"]
    assert set(lay) == {"int8 per-channel", "float16"}, lay  # linear layers + lm_head int8; embeddings, norms fp16
    assert lay["int8 per-channel"]["weights"] == ms["quantized_weights"]
    assert lay["int8 per-channel"]["bytes"] == ms["quantized_bytes"]
    assert m.load_stats["quantization"]["method"] == "fastload"
    assert m.load_stats["quantization"]["quantized_bytes"] == ms["quantized_bytes"]
    close(logits(m), logits(fp16), 0.1)
    same_logits(load(ROPE3, load_in_8bit=True, torch_dtype="float32"), at_load_reference(tmp_path, ROPE3, "int8"))
    assert not fp16.is_quantized and fp16.quantization_config is None and not fp16.is_loaded_in_8bit
    assert fp16.memory_stats()["quantized_weights"] == 0 and fp16.load_stats["quantization"]["method"] is None


@pytest.mark.parametrize("how,scheme,group,key,lm", [
    ({"load_in_4bit": True}, "int4", 0, "int4 g128", "int8"),
    ({"quantization_config": FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4")}, "nf4", 0, "nf4 g64", "int8"),
    ({"quantization_config": fastload.QuantConfig("int4", group_size=32, lm_head="none")}, "int4", 32, "int4 g32",
     "none"),
    ({"quantization_config": {"scheme": "nf4", "group_size": 128, "lm_head": "nf4"}}, "nf4", 128, "nf4 g128", "nf4"),
])
def test_4bit_end_to_end(tmp_path, how, scheme, group, key, lm):
    m = load(ROPE3, **how)
    assert m.is_quantized and m.is_loaded_in_4bit and not m.is_loaded_in_8bit
    lay = m.memory_stats()["layouts"]
    assert key in lay and "float16" in lay, lay
    if lm == "int8":
        assert lay["int8 per-channel"]["weights"] == 1, lay  # the untied LM head, int8 per channel by default
    elif lm == "none":
        assert not any(k.startswith("int8") for k in lay), lay
    assert m.memory_stats()["weights"] < 0.6 * load(ROPE3, torch_dtype="float16").memory_stats()["weights"]
    m32 = load(ROPE3, torch_dtype="float32", **how)
    same_logits(m32, at_load_reference(tmp_path, ROPE3, scheme, group, lm))


def test_environment_and_compute_dtype_end_to_end(monkeypatch):
    monkeypatch.setenv("FASTLOAD_QUANT", "int4")
    m = load(ROPE3, quantization_config=FakeBnb(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                bnb_4bit_compute_dtype="torch.bfloat16"))
    assert m.is_loaded_in_4bit and m.dtype == "bfloat16" and m.quantization_config["scheme"] == "nf4"
    m = load(ROPE3)
    assert m.is_loaded_in_4bit and m.quantization_config["scheme"] == "int4"
    # conversions reload with the same quantisation; saving writes float weights without quantization_config
    m.float()
    assert m.dtype == "float32" and m.is_loaded_in_4bit and "int4 g128" in m.memory_stats()["layouts"]


def test_save_quantised_model(tmp_path):
    """Saved dequantised in the model's dtype, rounded to nearest even, without quantization_config."""
    m = load(ROPE3, load_in_4bit=True)
    m.save_pretrained(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float16"
    with _C.SafetensorsFile(os.path.join(ROPE3, "model.safetensors")) as f:
        src = np.array(f.get("model.layers.1.mlp.down_proj.weight")).astype(np.float32)
        lm = np.array(f.get("lm_head.weight")).astype(np.float32)
    with _C.SafetensorsFile(str(tmp_path / "out" / "model.safetensors")) as f:
        got = np.array(f.get("model.layers.1.mlp.down_proj.weight"))
        got_lm = np.array(f.get("lm_head.weight"))
    np.testing.assert_array_equal(got, dequant_at_load(src, "int4", 0).astype(np.float16))
    np.testing.assert_array_equal(got_lm, dequant_at_load(lm, "int8", 0).astype(np.float16))
    back = load(tmp_path / "out")
    assert not back.is_quantized and back.dtype == "float16"
    close(logits(back), logits(m), 0.01)


@pytest.mark.parametrize("src,qc,group,act", [
    (ROPE3, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": False}, 32, False),
    (QWEN2, {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": True, "sym": False}, 32, True),
    (ROPE3, {"quant_method": "gptq", "bits": 8, "group_size": -1, "checkpoint_format": "gptq_v2"}, -1, False),
    (ROPE3, {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}, 64, False),
])
def test_gptq_awq_end_to_end(tmp_path, src, qc, group, act):
    qd, rd = write_packed_pair(tmp_path, src, qc, group, act_order=act)
    m = load(qd, torch_dtype="float32")
    ref = load(rd, torch_dtype="float32")
    np.testing.assert_allclose(logits(m), logits(ref), rtol=1e-3, atol=1e-3 * np.abs(logits(ref)).max())
    assert m.is_quantized and not m.is_loaded_in_4bit and not m.is_loaded_in_8bit  # transformers' bnb-only flags
    assert m.quantization_config == qc and m.quantization_method == qc["quant_method"]
    ms = m.memory_stats()
    assert ms["quantized_weights"] > 0 and ms["float_bytes"] > 0
    assert any(k.startswith(("int4", "int8")) for k in ms["layouts"]), ms["layouts"]
    assert m.load_stats["quantization"]["method"] == qc["quant_method"]


def test_gguf_keeps_its_quantised_tensors(demo_gguf):
    m = load(demo_gguf)
    assert m.is_quantized and m.quantization_config == {"quant_method": "gguf", "gguf": "keep"}
    assert not m.is_loaded_in_4bit
    ms = m.memory_stats()
    assert ms["quantized_weights"] > 0 and "int4 g32" in ms["layouts"], ms["layouts"]  # Q4_1: 4 bits, groups of 32
    old = load(demo_gguf, quantization_config=fastload.QuantConfig(gguf="dequantize"))
    assert not old.is_quantized and old.memory_stats()["quantized_weights"] == 0
    assert ms["weights"] < 0.5 * old.memory_stats()["weights"]


def test_gguf_dequantize_with_a_scheme_is_refused(demo_gguf):
    """A scheme with gguf='dequantize' on a block-quantised GGUF used to load a float16 model that reported
    is_quantized / load_in_4bit with no quantised weight: refused, naming the file and what to do instead."""
    with pytest.raises(NotImplementedError, match=r"Q4_1\.gguf: quantization_config asks for int4 with gguf='dequantize'"):
        load(demo_gguf, quantization_config=fastload.QuantConfig("int4", gguf="dequantize"))


def test_cli_info_with_quant(capsys):
    from fastload.__main__ import main
    assert main(["info", "--model", ROPE3, "--device", "cpu", "--quant", "int8"]) == 0
    out = json.loads(capsys.readouterr().out)["model"]
    assert out["is_quantized"] and out["quantization_config"]["scheme"] == "int8"
    assert out["memory"]["quantized_bytes"] > 0 and "int8 per-channel" in out["memory"]["layouts"]


def test_gptq_config_over_float_tensors(recording, tmp_path):
    """A float export that kept its GPTQ quantization_config: loads as float, with a warning (not called GPTQ)."""
    d = tmp_path / "m"
    shutil.copytree(ROPE3, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 128}
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.warns(UserWarning, match="no layer is stored packed"):
        s = seen_load(d)
    assert s["kw"] == {} and all(len(it) == 5 for it in s["items"])


def test_autogptq_quantize_config_json(recording, tmp_path):
    """Older AutoGPTQ exports describe the packing only in quantize_config.json; without either file the
    missing-tensor error says what is missing."""
    qc = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    qd, _ = write_packed_pair(tmp_path, ROPE3, qc, 32)
    cfg = json.loads((qd / "config.json").read_text())
    del cfg["quantization_config"]
    (qd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastload.CheckpointError, match=r"missing tensor 'model.layers.0.self_attn.q_proj.weight' .*"
                                                       r"has 'model.layers.0.self_attn.q_proj.qweight' but neither"):
        fastload.from_pretrained(str(qd), device_map="cpu")
    (qd / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 32, "desc_act": False, "sym": False,
                                                         "damp_percent": 0.01, "true_sequential": True}))
    s = seen_load(qd)
    assert sum(len(it) == 6 for it in s["items"]) == 7 * 2
    assert s["items"][-1][5]["zero_offset"] == 1 and s["items"][-1][5]["group_size"] == 32
    (qd / "quantize_config.json").write_text(json.dumps({"bits": 3, "group_size": 32}))
    with pytest.raises(NotImplementedError, match="bits=3"):
        fastload.from_pretrained(str(qd), device_map="cpu")


def test_fastload_dict_without_scheme():
    """{"gguf": "dequantize"} alone is fastload's own setting (QuantConfig(gguf="dequantize")), not a dict with no
    quant_method; a dict with no known key still raises naming what is accepted."""
    from fastload import quant
    qc = quant.from_any({"gguf": "dequantize"})
    assert isinstance(qc, quant.QuantConfig) and qc.gguf == "dequantize" and qc.scheme == "none"
    with pytest.raises(ValueError, match="no quant_method"):
        quant.from_any({"bits": 4})


def test_scheme_over_a_quantised_gguf_reports_what_it_holds(demo_gguf, tmp_path):
    """load_in_8bit / a 4-bit scheme on a GGUF whose linear weights are all block-quantised (kept as the file has
    them) quantises nothing: a warning, and the model reports the GGUF's own quantisation, not is_loaded_in_8bit
    and a fastload scheme it does not hold. Over a float GGUF the scheme applies and is reported."""
    for kw in (dict(load_in_8bit=True), dict(quantization_config="nf4")):
        with pytest.warns(UserWarning, match=r"already quantised \(Q4_1\).*applies to nothing"):
            m = load(demo_gguf, **kw)
        assert not m.is_loaded_in_8bit and not m.is_loaded_in_4bit
        assert m.quantization_config == {"quant_method": "gguf", "gguf": "keep"}
        assert m.load_stats["quantization"]["method"] == "gguf"
    from test_config_validation import write_gguf
    f32 = write_gguf(tmp_path / "f32.gguf")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        m = load(f32, load_in_8bit=True)
    assert m.is_loaded_in_8bit and m.quantization_config["scheme"] == "int8"


# ---- what is reported (a bug hunt, 2026-12-06, fortieth session) -------------------------------------------------
def _float_dir(tmp_path, arch="llama", tie=None, big=None, **shape):
    import quant_fixtures as qf
    cfg = qf.model_config(arch, tie=tie, **shape)
    w = qf.float_weights(cfg)
    if big is not None:
        w["model.layers.0.mlp.down_proj.weight"][0, 0] = big
    qf._write_dir(str(tmp_path), cfg, w)
    return tmp_path


def test_env_scheme_over_a_gptq_checkpoint_sets_no_flags(tmp_path, monkeypatch):
    """FASTLOAD_QUANT is set aside for a GPTQ checkpoint's own packing, and the flags said otherwise
    (is_loaded_in_8bit True on a 4-bit GPTQ model)."""
    import quant_fixtures as qf
    path, _ = qf.write_gptq_checkpoint(str(tmp_path / "g"))
    monkeypatch.setenv("FASTLOAD_QUANT", "int8")
    m = load(path)
    assert m.quantization_method == "gptq" and not m.is_loaded_in_8bit and not m.is_loaded_in_4bit


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not fastload.cuda.is_available(), reason="no CUDA device here"))])
@pytest.mark.parametrize("scheme,big", [("nf4", 7e4), ("int8", 1e7), ("int4", 1e7)])
def test_weight_beyond_float16_scales_is_refused(tmp_path, scheme, big, device):
    """A weight whose group scale overflows float16 gave NaN logits, silently; now an error naming the tensor, from
    the CPU's quantiser and the CUDA one alike."""
    d = _float_dir(tmp_path, big=big)
    assert np.isfinite(logits(load(d, torch_dtype="float32"))).all()
    with pytest.raises(ValueError, match=r"down_proj\.weight.*float16 scale"):
        load(d, torch_dtype="float32", device_map=device, quantization_config=Q.QuantConfig(scheme))
    if device == "cuda":  # the device's overflow record was reset: the next load is clean
        d2 = _float_dir(tmp_path / "ok")
        assert np.isfinite(logits(load(d2, torch_dtype="float32", device_map=device,
                                       quantization_config=Q.QuantConfig(scheme)))).all()


def test_lm_head_without_a_scheme_is_refused():
    with pytest.raises(ValueError, match="LM head alone"):
        Q.QuantConfig("none", lm_head="int8")
    assert Q.QuantConfig("none", lm_head="none").effective_lm_head == "none"


def test_reported_groups_and_tied_head_are_what_the_layers_got(tmp_path):
    """quantization_config said group_size 128 where the layers took 96 / 80 (rows not a multiple of 128), and
    lm_head 'int8' for a tied head that stays the float embedding."""
    d = _float_dir(tmp_path / "w", hidden=192, inter=320, heads=6, head_dim=32)
    for qc in (Q.QuantConfig("int4"), Q.QuantConfig("nf4")):
        m = load(d, quantization_config=qc)
        got = sorted({lay["group_size"] for lay in m._core.layouts() if lay["dtype"] == qc.scheme and
                      lay["name"] != "lm_head"})
        assert m.quantization_config["group_sizes"] == got, (qc.scheme, got)
    m = load(d, quantization_config=Q.QuantConfig("int4"))
    assert m.quantization_config["group_sizes"] == [80, 96] and m.quantization_config["group_size"] == 128
    assert Q.QuantConfig.from_dict(m.quantization_config).group_size == 0  # the report reads back
    tied = _float_dir(tmp_path / "t", arch="qwen2")
    m = load(tied, load_in_4bit=True)
    assert m.quantization_config["lm_head"] == "none"
    with pytest.warns(UserWarning, match="tied embedding"):
        load(tied, quantization_config=Q.QuantConfig("int4", lm_head="int4"))
