"""The model object as transformers scripts use it (issue 8, part 3): AutoModel / AutoConfig, device= and
use_cache in from_pretrained, local-looking paths that do not exist, quantised checkpoints named,
model.device / model.dtype shaped like torch's, half() / float() / bfloat16() / cuda() / cpu() / to() /
eval() / train(), and save_pretrained. Tiny fixtures and a tiny GGUF on the CPU; the GPU paths at the end
skip without a CUDA device."""
import importlib.util
import json
import os
import shutil
import struct

import numpy as np
import pytest

import fastload
import st_util
from golden_util import model_dir
from test_config_validation import write_gguf

LLAMA = str(model_dir("llama"))          # untied, bfloat16 in config.json, three shards
QWEN2 = str(model_dir("qwen2"))          # tied embeddings, q/k/v biases, float32
ROPE3 = str(model_dir("llama3_rope"))    # float16 in config.json
IDS = np.array([[1, 5, 9, 33, 2, 7, 100, 3]])
HAS_CUDA = fastload.cuda.is_available()


def logits(m, ids=IDS):
    return np.asarray(m(ids).logits)


def load(path, **kw):
    kw.setdefault("device_map", "cpu")
    return fastload.from_pretrained(str(path), **kw)


# ---------------------------------------------------------------- 1. AutoModel, AutoConfig
def test_auto_model_is_the_causal_lm_loader():
    m = fastload.AutoModel.from_pretrained(LLAMA, device_map="cpu", trust_remote_code=True)
    assert isinstance(m, fastload.FastModelForCausalLM)
    np.testing.assert_array_equal(logits(m), logits(load(LLAMA, torch_dtype="bfloat16")))
    with pytest.raises(TypeError, match="from_pretrained"):
        fastload.AutoModel()
    assert "AutoModel" in fastload.__all__ and "AutoConfig" in fastload.__all__


def test_auto_config_from_directory_and_hub_arguments():
    c = fastload.AutoConfig.from_pretrained(QWEN2, trust_remote_code=True, revision=None, token=None)
    assert isinstance(c, fastload.Config)
    assert c.model_type == "qwen2" and c["tie_word_embeddings"] is True and c.hidden_size == 128
    assert c == load(QWEN2).config
    # kwargs naming config keys override the file's values, as in transformers; others come back unused
    c2, unused = fastload.AutoConfig.from_pretrained(QWEN2, hidden_size=64, foo=1, return_unused_kwargs=True)
    assert c2.hidden_size == 64 and unused == {"foo": 1}


def test_auto_config_checks_config_json(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(QWEN2, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["num_attention_heads"] = -3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(fastload.CheckpointError, match="num_attention_heads"):
        fastload.AutoConfig.from_pretrained(str(d))


def test_auto_config_from_gguf(tmp_path):
    g = write_gguf(tmp_path / "m.gguf")
    c = fastload.AutoConfig.from_pretrained(g)
    m = load(g, torch_dtype="float32")
    assert c.architectures == ["LlamaForCausalLM"] and c.model_type == "llama"
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
              "intermediate_size", "rms_norm_eps", "rope_theta", "tie_word_embeddings"):
        assert c[k] == m.config[k], k
    assert fastload.AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf") == c
    assert fastload.AutoConfig.from_pretrained(str(tmp_path)) == c  # a directory with one GGUF, no config.json


# ---------------------------------------------------------------- 2. device=, use_cache
def test_device_argument_and_use_cache():
    m = fastload.AutoModel.from_pretrained(QWEN2, device="cpu", use_cache=True)
    assert m.device == "cpu"
    np.testing.assert_array_equal(logits(m), logits(load(QWEN2, use_cache=False)))
    assert load(QWEN2, device="cpu", device_map="cpu").device == "cpu"  # both, agreeing
    assert "use_cache" in fastload.modeling.IGNORED_LOAD_ARGS


def test_device_and_device_map_disagreeing_is_refused():
    with pytest.raises(ValueError, match="device_map='cpu' and device='cuda:1' disagree"):
        load(QWEN2, device_map="cpu", device="cuda:1")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where no CUDA device is usable")
def test_cuda_device_without_cuda_names_the_argument():
    err = (NotImplementedError, RuntimeError)
    with pytest.raises(err, match=r"device='cuda'.*use device='cpu'"):
        fastload.AutoModel.from_pretrained(QWEN2, device="cuda")
    with pytest.raises(err, match=r"device_map='cuda:0'.*use device_map='cpu'"):
        fastload.from_pretrained(QWEN2, device_map="cuda:0")


# ---------------------------------------------------------------- 3. local-looking paths
LOCAL_LOOKING = ["./no-such-model", "../no-such-model", "/no/such/model", "~/no-such-model-fastload",
                 "models/org/name", "C:\\models\\x", ".\\x"]


@pytest.mark.parametrize("ref", LOCAL_LOOKING)
def test_missing_local_path_is_file_not_found(ref):
    for loader in (fastload.AutoModelForCausalLM, fastload.AutoTokenizer, fastload.AutoConfig):
        with pytest.raises(FileNotFoundError) as e:
            loader.from_pretrained(ref)
        assert e.value.filename == ref, loader
        assert "cache" not in str(e.value) and "hub id" not in str(e.value)


def test_hub_id_still_means_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        fastload.from_pretrained("someorg/somemodel")


# ---------------------------------------------------------------- 4. quantised checkpoints
def _quantised_checkpoint(tmp_path, qc):
    d = tmp_path / "q"
    d.mkdir()
    cfg = json.loads(open(os.path.join(QWEN2, "config.json")).read())
    cfg["quantization_config"] = qc
    (d / "config.json").write_text(json.dumps(cfg))
    # what a GPTQ checkpoint holds instead of q_proj.weight
    st_util.write(d / "model.safetensors", {"model.layers.0.self_attn.q_proj.qweight": np.zeros((16, 128), np.int32),
                                            "model.layers.0.self_attn.q_proj.scales": np.zeros((1, 128), np.float16)})
    return d


@pytest.mark.parametrize("method,name", [("bitsandbytes", "bitsandbytes"), ("fp8", "FP8"),
                                         ("compressed-tensors", "compressed-tensors"), ("hqq", "HQQ")])
def test_quantised_checkpoint_is_named(tmp_path, method, name):
    d = _quantised_checkpoint(tmp_path, {"quant_method": method, "bits": 4})
    with pytest.raises(NotImplementedError) as e:
        load(d)
    msg = str(e.value)
    assert msg.startswith(f"{d} is a {name}-quantised checkpoint (config.json quantization_config."
                          f"quant_method='{method}')"), msg
    assert "float32/float16/bfloat16 safetensors" in msg and "Q4_0" in msg and "Q6_K" in msg
    assert "GPTQ" in msg and "AWQ" in msg  # what is supported (GPTQ / AWQ load since issue 9: test_quant_api.py)


def test_quantisation_config_without_method(tmp_path):
    d = _quantised_checkpoint(tmp_path, {"bits": 4})
    with pytest.raises(NotImplementedError, match="is a quantised checkpoint .config.json has a quantization_config"):
        load(d)


# ---------------------------------------------------------------- 5. model.device, model.dtype
class _FakeTorch:
    """Stands for a torch.dtype / torch.device (fastload recognises torch objects by their module)."""
    __module__ = "torch"

    def __init__(self, s):
        self.s = s

    def __str__(self):
        return self.s


def test_device_and_dtype_are_shaped_like_torch():
    m = load(QWEN2, torch_dtype="float16")
    assert isinstance(m.device, str) and str(m.device) == "cpu" and m.device == "cpu"
    assert m.device.type == "cpu" and m.device.index is None
    assert m.device == _FakeTorch("cpu") and m.device != _FakeTorch("cuda:0") and m.device != "cuda"
    assert isinstance(m.dtype, str) and str(m.dtype) == "float16" and f"{m.dtype}" == "float16"
    assert m.dtype.itemsize == 2 and m.dtype.is_floating_point is True
    assert m.dtype == _FakeTorch("torch.float16") and m.dtype != _FakeTorch("torch.bfloat16")
    for alias in ("float16", "fp16", "half", "FP16", "torch.float16", np.float16, np.dtype("float16")):
        assert m.dtype == alias and not (m.dtype != alias), alias
    for other in ("float32", "bfloat16", "bf16", np.float32, 3, None, "cpu"):
        assert m.dtype != other and not (m.dtype == other), other
    assert m.dtype in ("bfloat16", "float16") and {m.dtype: 1}["float16"] == 1
    enc = fastload.BatchEncoding(input_ids=IDS).to(m.device)  # tokenizer(...).to(model.device)
    assert m.generate(**enc, max_new_tokens=2).shape == (1, IDS.shape[1] + 2)
    f32 = load(QWEN2, torch_dtype="float32")
    assert f32.dtype.itemsize == 4 and f32.dtype == "float" and f32.dtype == _FakeTorch("torch.float32")


def test_device_and_dtype_against_real_torch():
    torch = pytest.importorskip("torch")
    m = load(QWEN2, torch_dtype="bfloat16")
    assert m.dtype == torch.bfloat16 and torch.bfloat16 == m.dtype and m.dtype != torch.float16
    assert m.device == torch.device("cpu") and torch.device(m.device).type == "cpu"
    assert torch.zeros(2).to(m.device).device.type == "cpu"


# ---------------------------------------------------------------- 6. conversions
def test_half_float_bfloat16_reload_from_the_checkpoint():
    m = load(LLAMA, torch_dtype="float32")
    w32 = m.memory_stats()["weights"]
    assert m.half() is m and m.dtype == "float16" and m.load_stats["dtype"] == "float16"
    np.testing.assert_array_equal(logits(m), logits(load(LLAMA, torch_dtype="float16")))
    assert m.memory_stats()["weights"] == m.get_memory_footprint() < 0.51 * w32  # (+ rotary table in float32)
    assert m.load_stats["reloaded_by"] == "half()"
    # bfloat16 from the checkpoint, not from the float16 weights (no double rounding)
    assert m.bfloat16() is m and m.dtype == "bfloat16"
    np.testing.assert_array_equal(logits(m), logits(load(LLAMA, torch_dtype="bfloat16")))
    assert m.half().eval().float() is m and m.dtype == "float32"
    np.testing.assert_array_equal(logits(m), logits(load(LLAMA, torch_dtype="float32")))
    assert m.generate(IDS, max_new_tokens=3).shape == (1, IDS.shape[1] + 3)


def test_to_forms():
    m = load(QWEN2, torch_dtype="float32")
    assert m.to("float16") is m and m.dtype == "float16"
    assert m.to("cpu", "bfloat16") is m and m.dtype == "bfloat16"
    assert m.to(device="cpu", dtype="fp32", non_blocking=True, copy=False) is m and m.dtype == "float32"
    assert m.to(np.float16).dtype == "float16"
    assert m.to(_FakeTorch("torch.bfloat16")).dtype == "bfloat16"
    assert m.to(_FakeTorch("cpu")).device == "cpu"
    with pytest.raises(TypeError, match="neither a device"):
        m.to("int8")
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        m.to(dtype="int8")
    with pytest.raises(TypeError, match="two dtypes"):
        m.to("float16", dtype="float32")
    assert m.dtype == "bfloat16"  # a refused call changes nothing


def test_no_ops_return_the_model_without_reloading():
    m = load(QWEN2, torch_dtype="float32")
    stats = m.load_stats
    core = m._core
    for r in (m.eval(), m.train(False), m.requires_grad_(False), m.float(), m.cpu(), m.to("cpu"),
              m.to("cpu", "float32"), m.to(dtype="fp32"), m.to("float")):
        assert r is m
    assert m._core is core and m.load_stats is stats and m.training is False
    with pytest.raises(NotImplementedError, match="inference only"):
        m.train()
    with pytest.raises(NotImplementedError, match="inference only"):
        m.train(True)
    with pytest.raises(NotImplementedError):
        m.requires_grad_(True)


@pytest.mark.skipif(HAS_CUDA, reason="checks the error where no CUDA device is usable")
def test_cuda_without_cuda_is_a_clear_error():
    m = load(QWEN2, torch_dtype="float32")
    ref = logits(m)
    for call, shown in ((lambda: m.to("cuda"), "to('cuda')"), (m.cuda, "cuda()"),
                        (lambda: m.to("cuda:0", "float16"), "to('cuda:0')")):
        with pytest.raises((NotImplementedError, RuntimeError)) as e:
            call()
        assert str(e.value).startswith(shown), str(e.value)
    assert m.device == "cpu" and m.dtype == "float32"
    np.testing.assert_array_equal(logits(m), ref)


def test_reload_refuses_changed_or_vanished_files(tmp_path):
    d = tmp_path / "m"
    shutil.copytree(LLAMA, d)
    m = load(d, torch_dtype="float32")
    ref = logits(m)
    shard = d / "model-00002-of-00003.safetensors"
    with open(shard, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(RuntimeError, match=r"model-00002-of-00003.safetensors changed since the model was loaded.*"
                                           r"call from_pretrained again"):
        m.half()
    assert m.dtype == "float32"
    np.testing.assert_array_equal(logits(m), ref)  # still usable
    shard.unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors, which the model was loaded "
                                                "from, is gone"):
        m.bfloat16()
    np.testing.assert_array_equal(logits(m), ref)


def test_reload_of_gguf_and_touch_detected(tmp_path):
    g = write_gguf(tmp_path / "m.gguf")
    m = load(g, torch_dtype="float32")
    assert m.half() is m and m.dtype == "float16"
    np.testing.assert_array_equal(logits(m, IDS % 32), logits(load(g, torch_dtype="float16"), IDS % 32))
    st = os.stat(g)
    os.utime(g, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, newer mtime: not trusted
    with pytest.raises(RuntimeError, match="m.gguf changed"):
        m.float()


def test_failed_reload_keeps_the_model(monkeypatch):
    m = load(QWEN2, torch_dtype="float32")
    ref = logits(m)
    cls = type(m)

    def boom(*a, **k):
        raise MemoryError("no memory for the new weights")
    monkeypatch.setattr(cls, "_load_safetensors", boom)
    with pytest.raises(MemoryError):
        m.half()
    assert m.dtype == "float32" and m.load_stats["dtype"] == "float32"
    np.testing.assert_array_equal(logits(m), ref)


# ---------------------------------------------------------------- 7. save_pretrained
ST_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2"}


def check_safetensors_file(path):
    """The rules safetensors' reader (Metadata::validate) applies, and the writer's habits: returns {name: info}."""
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and 8 + n <= len(raw)
    text = raw[8:8 + n].decode("utf-8")
    assert text.startswith("{") and text.rstrip(" ") == text.rstrip()
    header = json.loads(text)
    assert header.pop("__metadata__") == {"format": "pt"}
    spans = []
    for name, info in header.items():
        assert set(info) == {"dtype", "shape", "data_offsets"}
        assert info["dtype"] in ST_DTYPES
        b, e = info["data_offsets"]
        assert e - b == int(np.prod(info["shape"])) * st_util.ST_SIZE[info["dtype"]], name
        spans.append((b, e))
    spans.sort()
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # contiguous, no overlap, no gap
    if importlib.util.find_spec("safetensors") is not None:
        from safetensors import safe_open
        with safe_open(path, "np") as f:
            assert sorted(f.keys()) == sorted(header)
    return header


def saved_tensors(d):
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".safetensors"):
            for k, v in check_safetensors_file(os.path.join(d, f)).items():
                out[k] = (f, v)
    return out


@pytest.mark.parametrize("src,dtype", [(LLAMA, "float32"), (LLAMA, "bfloat16"), (QWEN2, "float32"),
                                       (QWEN2, "float16"), (ROPE3, "auto")],
                         ids=["llama-f32", "llama-bf16", "qwen2-f32", "qwen2-f16", "llama3_rope-auto"])
def test_save_pretrained_round_trip(tmp_path, src, dtype):
    m = load(src, torch_dtype=dtype)
    ref = logits(m)
    m.generation_config["temperature"] = 0.7
    m.save_pretrained(tmp_path / "out")
    files = sorted(os.listdir(tmp_path / "out"))
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    m2 = load(tmp_path / "out")  # torch_dtype auto: the saved config's dtype
    assert m2.dtype == m.dtype
    np.testing.assert_array_equal(logits(m2), ref)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == cfg["torch_dtype"] == str(m.dtype)
    t = saved_tensors(tmp_path / "out")
    st = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[str(m.dtype)]
    assert {v[1]["dtype"] for v in t.values()} == {st}
    assert t["model.layers.0.self_attn.q_proj.weight"][1]["shape"] == [cfg["num_attention_heads"] * cfg.get(
        "head_dim", cfg["hidden_size"] // cfg["num_attention_heads"]), cfg["hidden_size"]]
    tied = cfg.get("tie_word_embeddings", False)
    assert ("lm_head.weight" in t) == (not tied)
    assert ("model.layers.0.self_attn.q_proj.bias" in t) == (src == QWEN2)
    gen = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert gen["temperature"] == 0.7 and None not in gen.values()
    assert m2.generation_config["temperature"] == 0.7


def test_save_after_half_writes_float16(tmp_path):
    m = load(LLAMA, torch_dtype="float32").half()
    m.save_pretrained(tmp_path)
    assert {v[1]["dtype"] for v in saved_tensors(tmp_path).values()} == {"F16"}
    np.testing.assert_array_equal(logits(load(tmp_path)), logits(m))


def test_save_sharded_with_index(tmp_path):
    m = load(LLAMA, torch_dtype="float32")
    ref = logits(m)
    m.save_pretrained(tmp_path, max_shard_size="200KB")
    idx = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    t = saved_tensors(tmp_path)
    assert idx["weight_map"] == {k: v[0] for k, v in t.items()}
    assert idx["metadata"]["total_size"] == sum(v[1]["data_offsets"][1] - v[1]["data_offsets"][0] for v in t.values())
    assert idx["metadata"]["total_parameters"] == m.num_parameters()
    for f in shards:  # each shard within the limit unless it holds one tensor larger than it
        h = check_safetensors_file(tmp_path / f)
        size = sum(v["data_offsets"][1] - v["data_offsets"][0] for v in h.values())
        assert size <= 200_000 or len(h) == 1
    np.testing.assert_array_equal(logits(load(tmp_path)), ref)
    # saving again unsharded removes the earlier shards and index
    m.save_pretrained(tmp_path, max_shard_size=10**9)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "generation_config.json", "model.safetensors"]
    np.testing.assert_array_equal(logits(load(tmp_path)), ref)


def test_save_gguf_model_as_hugging_face_checkpoint(tmp_path):
    g = write_gguf(tmp_path / "m.gguf")  # llama arch: q/k rows permuted in the file, unpermuted at load
    m = load(g, torch_dtype="float32")
    ids = IDS % m.config["vocab_size"]
    m.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "rms_norm_eps", "rope_theta", "head_dim", "tie_word_embeddings",
              "max_position_embeddings", "hidden_act"):
        assert k in cfg, k
    assert None not in cfg.values()
    np.testing.assert_array_equal(logits(load(tmp_path / "hf"), ids), logits(m, ids))


def test_save_demo_model(tmp_path, demo_gguf):
    """The demo model (Q4_1 GGUF kept quantised, tied, q/k rows unpermuted at load) saved as float16 safetensors
    (its Q4_1 weights dequantised and rounded to float16)."""
    m = fastload.from_pretrained(demo_gguf, device_map="cpu", torch_dtype="float16")
    ids = np.array([[1, 504, 3458, 314, 253, 1345, 30]])
    m.save_pretrained(tmp_path)
    t = saved_tensors(tmp_path)
    assert "lm_head.weight" not in t and len(t) == 2 + 9 * 30
    m2 = load(tmp_path)
    assert m2.dtype == "float16" and m2.config["tie_word_embeddings"] is True
    a, b = logits(m2, ids), logits(m, ids)
    assert np.sqrt(np.mean((a - b) ** 2)) < 1e-2 * np.sqrt(np.mean(b ** 2))


def test_save_arguments(tmp_path):
    m = load(QWEN2, torch_dtype="float32")
    m.save_pretrained(str(tmp_path / "a"), is_main_process=True, save_function=None, safe_serialization=True)
    with pytest.raises(NotImplementedError, match="safetensors only"):
        m.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(NotImplementedError, match="never uploads"):
        m.save_pretrained(tmp_path / "b", push_to_hub=True)
    with pytest.raises(TypeError, match="unsupported argument 'frobnicate'"):
        m.save_pretrained(tmp_path / "b", frobnicate=1)
    with pytest.raises(ValueError, match="max_shard_size"):
        m.save_pretrained(tmp_path / "b", max_shard_size="lots")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        m.save_pretrained(tmp_path / "file")
    assert not (tmp_path / "b").exists()


def test_generation_config_dict():
    gc = fastload.GenerationConfig(eos_token_id=[2, 3], temperature=0.5, top_k=50, pad_token_id=None)
    assert fastload.modeling.generation_config_dict(gc) == {"eos_token_id": [2, 3], "temperature": 0.5, "top_k": 50}


# ---------------------------------------------------------------- GPU paths (the lead runs them on an H200)
cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device here (fastload.info(): %s)"
                               % fastload.info().get("cuda"))


@cuda_only
def test_cuda_and_cpu_move_the_weights():
    m = load(LLAMA, torch_dtype="float16")
    ref = logits(m)
    assert m.cuda() is m and m.device == "cuda:0" and m.device.type == "cuda" and m.device.index == 0
    assert m.memory_stats()["device"] == "cuda:0" and m.load_stats["device"] == "cuda:0"
    direct = fastload.from_pretrained(LLAMA, device_map="cuda", torch_dtype="float16")
    np.testing.assert_array_equal(logits(m), logits(direct))
    assert np.abs(logits(m) - ref).max() / np.abs(ref).max() < 1e-2
    assert m.cpu() is m and m.device == "cpu"
    np.testing.assert_array_equal(logits(m), ref)
    assert m.to("cuda", "bfloat16") is m and m.device == "cuda:0" and m.dtype == "bfloat16"
    direct = fastload.from_pretrained(LLAMA, device_map="cuda:0", torch_dtype="bfloat16")
    np.testing.assert_array_equal(logits(m), logits(direct))
    assert m.to("cuda:0") is m and m.generate(IDS, max_new_tokens=3).shape == (1, IDS.shape[1] + 3)


@cuda_only
def test_cuda_device_argument_and_missing_index():
    m = fastload.AutoModel.from_pretrained(QWEN2, device="cuda", torch_dtype="float16")
    assert m.device == "cuda:0"
    n = fastload.cuda.device_count()
    with pytest.raises(ValueError, match=f"cuda:{n} does not exist"):
        load(QWEN2, device_map=f"cuda:{n}")
    with pytest.raises(ValueError, match=f"cuda:{n} does not exist"):
        m.to(f"cuda:{n}")


@cuda_only
def test_save_from_gpu(tmp_path):
    m = fastload.from_pretrained(QWEN2, device_map="cuda", torch_dtype="bfloat16")
    m.save_pretrained(tmp_path)
    m2 = fastload.from_pretrained(str(tmp_path), device_map="cuda")
    assert m2.dtype == "bfloat16"
    np.testing.assert_array_equal(logits(m2), logits(m))


@pytest.mark.parametrize("src", ["demo", QWEN2], ids=["demo-gguf", "qwen2-tied-bias"])
def test_transformers_loads_what_save_pretrained_wrote(tmp_path, src, request, monkeypatch):
    """transformers (where it and torch are installed: the GPU machine) loads the directory save_pretrained
    wrote, and its float32 logits agree with fastload's: the names, shapes, dtypes and config are transformers'.
    The demo GGUF stays Q4_1 in fastload, whose CPU path rounds activations to int16 per 32 values for its integer
    dot products (~5e-4 of the logits): FASTLOAD_CPU_QDOT=float gives the float path transformers computes."""
    torch = pytest.importorskip("torch", reason="torch is not installed here (the peer check runs on the GPU machine)")
    transformers = pytest.importorskip("transformers", reason="transformers is not installed here")
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "float")
    path = request.getfixturevalue("demo_gguf") if src == "demo" else src
    m = fastload.from_pretrained(path, device_map="cpu", torch_dtype="float32")
    m.save_pretrained(tmp_path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    ids = np.array([[1, 504, 3458, 314, 253, 1345, 30]]) if src == "demo" else IDS
    with torch.no_grad():
        theirs = ref(torch.from_numpy(ids)).logits.numpy()
    # 30 layers of a 576-wide model summed in other orders: ~1e-4 at logits near 20 (the tiny fixture: far less)
    np.testing.assert_allclose(logits(m, ids), theirs, rtol=1e-4, atol=5e-4 if src == "demo" else 1e-4)


def test_gguf_llama_with_sliding_window_is_mistral_in_its_config(tmp_path):
    """llama.cpp writes Mistral as general.architecture "llama" plus a sliding window: the model runs as Mistral,
    and model.config / AutoConfig say so (they said LlamaForCausalLM while model.arch was Mistral)."""
    from gguf_util import T
    p = tmp_path / "m.gguf"
    write_gguf(p, {"llama.attention.sliding_window": (4, T.UINT32)})
    m = fastload.from_pretrained(str(p), device_map="cpu")
    assert m.arch.name == "MistralForCausalLM"
    assert m.config["architectures"] == ["MistralForCausalLM"] and m.config["model_type"] == "mistral"
    assert fastload.AutoConfig.from_pretrained(str(p))["architectures"] == ["MistralForCausalLM"]
