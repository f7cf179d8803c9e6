"""What a new user meets first: a mistyped local path, an AWQ/GPTQ checkpoint, from_pretrained arguments that
transformers scripts pass (use_cache=True). Adapted: the import and the model paths (tiny fixtures)."""
import json
import os
import shutil

import numpy as np
import pytest

import fastload as transformers
import st_util
from golden_util import model_dir

AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer


@pytest.mark.parametrize("path", ["./no-such-model", "../no-such-model", "/no/such/model", "~/no-such-model-xyz",
                                  "./models/no-such-model"])
@pytest.mark.parametrize("cls", ["AutoModelForCausalLM", "AutoTokenizer"])
def test_local_looking_missing_path(tmp_path, monkeypatch, path, cls):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        getattr(transformers, cls).from_pretrained(path)
    assert path in str(e.value) or os.path.expanduser(path) in str(e.value)


def _quantized_checkpoint(tmp_path, quant):
    """The tiny Qwen2 fixture dressed as a quantised export: a quantization_config in config.json and the
    *_proj.weight tensors replaced by qweight/qzeros/scales as AutoGPTQ / AutoAWQ write them."""
    src = model_dir("qwen2")
    d = tmp_path / quant
    d.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": quant, "bits": 4, "group_size": 32,
                                  **({"desc_act": False, "sym": True} if quant == "gptq" else
                                     {"version": "gemm", "zero_point": True})}
    (d / "config.json").write_text(json.dumps(cfg))
    shutil.copy(src / "generation_config.json", d / "generation_config.json")
    f = transformers._C.SafetensorsFile(str(src / "model.safetensors"))
    tensors = {}
    for k in f.keys():
        if k.endswith("_proj.weight"):
            base = k[: -len(".weight")]
            tensors[base + ".qweight"] = np.zeros((4, 8), np.int32)
            tensors[base + ".qzeros"] = np.zeros((1, 8), np.int32)
            tensors[base + ".scales"] = np.ones((1, 8), np.float16)
        else:  # norms, embeddings, biases as they are
            tensors[k] = np.array(f.get(k))
    st_util.write(str(d / "model.safetensors"), tensors)
    return str(d)


@pytest.mark.parametrize("quant, name", [("gptq", "GPTQ"), ("awq", "AWQ")])
def test_quantized_checkpoint_with_wrong_shapes_is_named(tmp_path, quant, name):
    """GPTQ / AWQ checkpoints load since issue 9 (tests/test_quant_api.py loads real ones); these qweight / qzeros /
    scales have shapes that do not fit the layers: a CheckpointError naming a projection, not a crash."""
    path = _quantized_checkpoint(tmp_path, quant)
    with pytest.raises(transformers.CheckpointError) as e:
        AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="auto")
    msg = str(e.value)
    assert "_proj" in msg, msg
    assert "missing tensor" not in msg


def test_use_cache_true_accepted():
    m = AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cpu", use_cache=True)
    assert m.generate(np.array([[1, 2, 3]]), max_new_tokens=2, eos_token_id=None).shape == (1, 5)
