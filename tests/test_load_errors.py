"""Bad checkpoints at the model level: each raises a Python exception that names the file (or
directory) and what is wrong; nothing crashes or hangs."""
import json
import os
import shutil

import numpy as np
import pytest

import fastload
from golden_util import model_dir


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the sharded Llama fixture."""
    for f in model_dir("llama").iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "golden.json":
            shutil.copy(f, tmp_path)
    return tmp_path


def load(p, **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map="cpu", **kw)


def edit_json(path, fn):
    d = json.load(open(path))
    fn(d)
    json.dump(d, open(path, "w"))


def test_loads(ckpt):
    assert load(ckpt).config["model_type"] == "llama"


def test_missing_shard(ckpt):
    os.remove(ckpt / "model-00002-of-00003.safetensors")
    with pytest.raises(fastload.CheckpointError, match=r"model\.safetensors\.index\.json.*model-00002-of-00003\.safetensors"):
        load(ckpt)


def test_missing_tensor(ckpt):
    idx = ckpt / "model.safetensors.index.json"
    edit_json(idx, lambda d: d["weight_map"].pop("model.layers.1.mlp.up_proj.weight"))
    # the shard still holds it, but the index no longer places it: the tensor is found through the shard
    load(ckpt)
    # a checkpoint that really lacks a tensor:
    cfg = ckpt / "config.json"
    edit_json(cfg, lambda d: d.update(num_hidden_layers=d["num_hidden_layers"] + 1))
    with pytest.raises(fastload.CheckpointError, match=r"missing tensor 'model\.layers\.3\.input_layernorm\.weight'"):
        load(ckpt)


def test_index_names_tensor_absent_from_shard(ckpt):
    edit_json(ckpt / "model.safetensors.index.json",
              lambda d: d["weight_map"].__setitem__("model.layers.0.extra.weight", "model-00001-of-00003.safetensors"))
    with pytest.raises(fastload.CheckpointError, match=r"model-00001-of-00003\.safetensors.*'model\.layers\.0\.extra\.weight'.*not in the shard"):
        load(ckpt)


def test_config_with_wrong_shape(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(intermediate_size=d["intermediate_size"] + 16))
    with pytest.raises(fastload.CheckpointError, match=r"\.safetensors: tensor 'model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight'.*does not match the config: expected \[\d+, \d+\]"):
        load(ckpt)


def test_truncated_shard(ckpt):
    p = ckpt / "model-00003-of-00003.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 100])
    with pytest.raises(fastload.CheckpointError, match="model-00003-of-00003.safetensors"):
        load(ckpt)


def test_header_longer_than_file(ckpt):
    p = ckpt / "model-00001-of-00003.safetensors"
    data = bytearray(p.read_bytes())
    data[:8] = (len(data) + 10).to_bytes(8, "little")
    p.write_bytes(bytes(data))
    with pytest.raises(fastload.CheckpointError, match="model-00001-of-00003.safetensors"):
        load(ckpt)


def test_bad_config_json(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(fastload.CheckpointError, match=r"config\.json: not valid JSON"):
        load(ckpt)


def test_unsupported_architecture_lists_supported(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox"))
    with pytest.raises(NotImplementedError, match="LlamaForCausalLM, MistralForCausalLM, MixtralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM"):
        load(ckpt)


def test_unsupported_rope_scaling(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(rope_parameters={"rope_type": "longrope", "factor": 4.0, "rope_theta": 1e4}))
    with pytest.raises(NotImplementedError, match=r"'longrope'.*supported: default, linear, llama3, yarn"):
        load(ckpt)


def test_unsupported_activation(ckpt):
    edit_json(ckpt / "config.json", lambda d: d.update(hidden_act="gelu"))
    with pytest.raises(NotImplementedError, match="hidden_act='gelu'"):
        load(ckpt)


def test_legacy_pickle_only(ckpt):
    # .bin checkpoints are read (tests/test_torch_bin.py); the legacy pre-zip format is refused with how to convert
    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")
    with pytest.raises(fastload.CheckpointError, match=r"pytorch_model\.bin: .*legacy serialization format.*torch\.save"):
        load(ckpt)


def test_bin_files_misnamed(ckpt):
    for f in ckpt.glob("model*.safetensors*"):
        f.unlink()
    (ckpt / "pytorch_model-00001-of-00002.bin").write_bytes(b"PK")
    with pytest.raises(fastload.CheckpointError, match=r"neither pytorch_model\.bin nor pytorch_model\.bin\.index\.json"):
        load(ckpt)


def test_missing_path():
    with pytest.raises(FileNotFoundError):
        load("/nonexistent/model/dir")


def test_token_out_of_vocab(ckpt):
    m = load(ckpt)
    with pytest.raises(ValueError, match=r"input_ids\[0\]\[1\] = 512 is outside the vocabulary \[0, 512\)"):
        m(np.array([[1, 512]]))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m.generate(np.array([[1, -3]]), max_new_tokens=2)


def test_failed_load_frees_the_core_even_if_the_exception_is_kept(ckpt):
    """A notebook keeps the last exception (sys.last_traceback); its frames must not keep the half-built
    model (on CUDA, its device memory) or the open shards alive."""
    import gc
    edit_json(ckpt / "config.json", lambda d: d.update(intermediate_size=d["intermediate_size"] + 8))
    try:
        load(ckpt)
    except fastload.CheckpointError as e:
        kept = e
    gc.collect()
    tb, held = kept.__traceback__, []
    while tb is not None:
        held += [k for k, v in tb.tb_frame.f_locals.items() if isinstance(v, (fastload._C.Model, fastload._C.SafetensorsFile))]
        tb = tb.tb_next
    assert not held, f"the kept traceback still holds {held}"


def test_tied_config_with_a_different_lm_head_uses_it(tmp_path):
    """tie_word_embeddings=true and an lm_head.weight that differs from the embedding: transformers 5 warns and uses
    the checkpoint's LM head; fastload tied anyway (logits off) with only an 'unused tensor' warning. The same
    values (a tied weight saved under both names) stay tied, without a warning."""
    import warnings
    import st_util
    from test_lora import tensors_of
    src = model_dir("qwen2")
    t = tensors_of(src / "model.safetensors")
    head = np.random.default_rng(0).standard_normal(t["model.embed_tokens.weight"].shape).astype(np.float32) * 0.05
    for d, h, tie in ((tmp_path / "tied", head, True), (tmp_path / "untied", head, False),
                      (tmp_path / "same", t["model.embed_tokens.weight"], True)):
        d.mkdir()
        st_util.write(d / "model.safetensors", {**t, "lm_head.weight": h}, metadata={"format": "pt"})
        edit = json.load(open(src / "config.json"))
        edit["tie_word_embeddings"] = tie
        json.dump(edit, open(d / "config.json", "w"))
    ids = np.array([[3, 17, 230, 5, 9]])
    with pytest.warns(UserWarning, match="differs from"):
        m = load(tmp_path / "tied", torch_dtype="float32")
    assert np.array_equal(m(ids).logits, load(tmp_path / "untied", torch_dtype="float32")(ids).logits)
    assert m.config.tie_word_embeddings is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same = load(tmp_path / "same", torch_dtype="float32")
    assert np.array_equal(same(ids).logits, load(src, torch_dtype="float32")(ids).logits)


def test_auto_dtype_without_one_in_config_is_the_weights(ckpt):
    """transformers' "auto" with no dtype in config.json takes the first floating tensor's dtype (the Llama
    fixture's bfloat16); fastload took float32 (twice the memory, another precision)."""
    edit_json(ckpt / "config.json", lambda d: (d.pop("dtype", None), d.pop("torch_dtype", None)))
    assert str(load(ckpt, torch_dtype="auto").dtype) == "bfloat16"
    assert str(load(model_dir("qwen2"), torch_dtype="auto").dtype) == "float32"  # its config says so


def test_hub_cache_found_as_huggingface_hub_finds_it(monkeypatch, tmp_path):
    from fastload import hub
    for k in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("FL_TEST_ROOT", str(tmp_path))
    monkeypatch.setenv("HF_HOME", "$FL_TEST_ROOT/home")
    assert hub.hf_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", "${FL_TEST_ROOT}/legacy")  # huggingface_hub's older name
    assert hub.hf_cache_dir() == str(tmp_path / "legacy")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "new"))
    assert hub.hf_cache_dir() == str(tmp_path / "new")
    assert hub.hf_cache_dir(cache_dir=tmp_path / "arg") == str(tmp_path / "arg")
