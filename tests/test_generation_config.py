"""GenerationConfig objects as transformers 5 treats them: a config passed to generate() is merged with the
model's generation_config (fields the caller did not set keep the model's value, then the defaults; keyword
arguments win over both), transformers' API of the object, and GenerationConfig.from_pretrained with the hub
arguments and GGUF files. Tiny Llama fixture (tests/fixtures/llama) with edited generation_config.json files;
the demo model for the issue's own symptom. No torch, no transformers."""
import copy
import json
import os
import pickle
import shutil

import numpy as np
import pytest

import fastload
from fastload import GenerationConfig
from gguf_util import GGUFWriter, T
from golden_util import load_case, model_dir

LLAMA = model_dir("llama")
GREEDY_NEW = [212, 356, 421, 420, 482, 188, 321, 331]  # the fixture's greedy continuation (golden.npz)
EOS = 420  # the 4th greedy token: a model whose eos is this stops after 4 new tokens


@pytest.fixture(scope="module")
def case():
    c = load_case("llama")
    assert c["single_greedy"][0, 17:25].tolist() == GREEDY_NEW
    return c


@pytest.fixture(scope="module")
def plain():
    return fastload.AutoModelForCausalLM.from_pretrained(str(LLAMA), device_map="cpu", torch_dtype="float32")


def checkpoint(root, gen):
    """The tiny Llama checkpoint with generation_config.json = gen (None: no generation_config.json)."""
    root.mkdir(parents=True, exist_ok=True)
    for f in LLAMA.iterdir():
        if f.suffix == ".safetensors" or f.name in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, root / f.name)
    if gen is not None:
        (root / "generation_config.json").write_text(json.dumps(gen))
    return str(root)


def load(root, gen):
    return fastload.AutoModelForCausalLM.from_pretrained(checkpoint(root, gen), device_map="cpu",
                                                         torch_dtype="float32")


def test_demo_answer_stops_at_im_end(demo_model, demo_tok):
    """The issue's symptom: generation_config=GenerationConfig(max_new_tokens=...) dropped the model's eos
    (<|im_end|>), so the answer ran on into invented turns."""
    text = demo_tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], tokenize=False,
                                        add_generation_prompt=True)
    enc = demo_tok([text], return_tensors="np")
    out = demo_model.generate(**enc, generation_config=GenerationConfig(max_new_tokens=60))
    new = out[0, enc["input_ids"].shape[1]:]
    assert demo_tok.decode(new).endswith("<|im_end|>") and "<|im_start|>" not in demo_tok.decode(new)
    np.testing.assert_array_equal(out, demo_model.generate(**enc, max_new_tokens=60))
    assert "5" in demo_tok.decode(new, skip_special_tokens=True)


# (model's generation_config.json, GenerationConfig(...) passed, the same generation as keyword arguments)
MERGES = {
    "eos": ({"eos_token_id": EOS}, {"max_new_tokens": 10}, {"max_new_tokens": 10, "eos_token_id": EOS}),
    "max_new_tokens": ({"max_new_tokens": 6}, {"do_sample": False}, {"max_new_tokens": 6}),
    "max_length": ({"max_length": 23}, {"top_k": 5}, {"max_length": 23}),
    "max_new_tokens_over_max_length": ({"max_new_tokens": 5}, {"max_length": 25}, {"max_new_tokens": 5}),
    "do_sample_temperature": ({"do_sample": True, "temperature": 5.0}, {"max_new_tokens": 8, "seed": 3},
                              {"do_sample": True, "temperature": 5.0, "max_new_tokens": 8, "seed": 3}),
    "top_k": ({"do_sample": True, "top_k": 1}, {"do_sample": True, "max_new_tokens": 8, "seed": 3},
              {"do_sample": True, "top_k": 1, "max_new_tokens": 8, "seed": 3}),
    "top_p": ({"do_sample": True, "top_p": 0.02}, {"do_sample": True, "max_new_tokens": 8, "seed": 3},
              {"do_sample": True, "top_p": 0.02, "max_new_tokens": 8, "seed": 3}),
    # (on the 33-token greedy output as prompt: the penalty changes the continuation there)
    "repetition_penalty": ({"repetition_penalty": 3.0}, {"max_new_tokens": 12}, {"max_new_tokens": 12, "repetition_penalty": 3.0}),
    "min_new_tokens": ({"min_new_tokens": 6}, {"max_new_tokens": 10, "eos_token_id": EOS},
                       {"max_new_tokens": 10, "eos_token_id": EOS, "min_new_tokens": 6}),
    # an explicitly set value equal to the default (do_sample=False) wins over the model's; eos still the model's
    "explicit_default_wins": ({"do_sample": True, "temperature": 5.0, "eos_token_id": EOS}, {"do_sample": False, "max_new_tokens": 10},
                              {"max_new_tokens": 10, "eos_token_id": EOS}),
}


@pytest.mark.parametrize("name", sorted(MERGES))
def test_passed_config_keeps_the_models_unset_fields(tmp_path, plain, case, name):
    file_gen, passed, as_kwargs = MERGES[name]
    m = load(tmp_path, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, **file_gen})
    ids = case["single_greedy" if name == "repetition_penalty" else "single_ids"]
    want = plain.generate(ids, **as_kwargs)
    assert not np.array_equal(want, plain.generate(ids, **passed)), "the case must tell the model's settings apart"
    before = copy.deepcopy(m.generation_config.to_dict())
    gc = GenerationConfig(**passed)
    np.testing.assert_array_equal(m.generate(ids, generation_config=gc), want)
    assert m.generation_config.to_dict() == before and gc.to_diff_dict() == passed  # neither is changed


def test_pad_from_the_model(tmp_path, plain, case):
    """Finished rows of a batch are filled with the model's pad_token_id, also when a config is passed."""
    e = int(case["eos_batch_token_id"])
    m = load(tmp_path, {"eos_token_id": e, "pad_token_id": 7})
    kw = dict(attention_mask=case["batch_mask"], max_new_tokens=12)
    want = plain.generate(case["batch_ids"], eos_token_id=e, pad_token_id=7, **kw)
    assert (want[:, 15:] == 7).any()
    np.testing.assert_array_equal(m.generate(case["batch_ids"], generation_config=GenerationConfig(max_new_tokens=12),
                                             attention_mask=case["batch_mask"]), want)
    np.testing.assert_array_equal(m.generate(case["batch_ids"], generation_config={"eos_token_id": e}, **kw), want)


def test_keyword_arguments_win(tmp_path, case):
    m = load(tmp_path, {"eos_token_id": EOS, "max_new_tokens": 3})
    ids, T = case["single_ids"], case["single_ids"].shape[1]
    gc = GenerationConfig(max_new_tokens=6)
    assert m.generate(ids, generation_config=gc).shape[1] == T + 4  # the model's eos
    assert m.generate(ids, generation_config=gc, eos_token_id=None).shape[1] == T + 6  # None disables eos, as transformers
    assert m.generate(ids, generation_config=gc, max_new_tokens=8, eos_token_id=[5, 6]).shape[1] == T + 8
    assert m.generate(ids).shape[1] == T + 3
    # explicitly set None in a config object: no eos (transformers would refill it from the model)
    assert m.generate(ids, generation_config=GenerationConfig(max_new_tokens=6, eos_token_id=None)).shape[1] == T + 6
    assert m.generation_config.to_diff_dict()["eos_token_id"] == EOS


class TransformersLikeConfig:
    """transformers 5's GenerationConfig as generate() sees it (duck-typed): every field None unless set."""

    def __init__(self, **kw):
        for k in ("max_length", "max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id",
                  "pad_token_id", "bos_token_id", "num_beams", "repetition_penalty", "min_new_tokens"):
            setattr(self, k, None)
        self.transformers_version = "5.24.0"
        self._from_model_config = False
        self.__dict__.update(kw)

    def to_dict(self):
        return dict(self.__dict__)

    def to_diff_dict(self):
        return {k: v for k, v in self.__dict__.items() if v is not None}


def test_transformers_config_object_and_dict(tmp_path, case):
    m = load(tmp_path, {"eos_token_id": EOS, "top_k": 1})
    ids, T = case["single_ids"], case["single_ids"].shape[1]
    assert m.generate(ids, generation_config=TransformersLikeConfig(max_new_tokens=10)).shape[1] == T + 4
    assert m.generate(ids, generation_config={"max_new_tokens": 10}).shape[1] == T + 4
    with pytest.raises(TypeError, match="generation_config"):
        m.generate(ids, generation_config="greedy")


@pytest.mark.parametrize("bad,exc", [({"penalty_alpha": 0.6}, TypeError), ({"typical_p": 1.5}, ValueError),
                                     ({"epsilon_cutoff": 1.0}, ValueError), ({"guidance_scale": 1.5}, TypeError),
                                     ({"min_p": 1.5}, ValueError), ({"min_p": "x"}, TypeError),
                                     ({"max_new_tokens": "8"}, TypeError),
                                     ({"temperature": "hot"}, TypeError), ({"eos_token_id": [2, "x"]}, ValueError)])
def test_unsupported_or_bad_fields_in_a_config_raise(plain, case, bad, exc):
    name = next(iter(bad))
    with pytest.raises(exc, match=name):
        plain.generate(case["single_ids"], generation_config=GenerationConfig(**bad))
    # the fields' neutral values are accepted
    plain.generate(case["single_ids"], generation_config=GenerationConfig(no_repeat_ngram_size=0, typical_p=1.0,
                                                                        use_cache=True, max_new_tokens=2))


def test_object_api(tmp_path):
    gc = GenerationConfig(max_new_tokens=5, temperature=1.0)
    assert gc.max_new_tokens == 5 and gc["top_k"] == 50 and gc.typical_p is None  # unset: the default
    assert gc.to_diff_dict() == {"max_new_tokens": 5, "temperature": 1.0}
    assert gc.to_dict()["top_k"] == 50 and gc.to_dict()["max_new_tokens"] == 5
    gc.top_k = 3
    gc["eos_token_id"] = [2, 3]
    assert gc.update(do_sample=True, foo=1) == {"foo": 1} and gc.do_sample is True and "foo" not in gc
    assert gc.update(foo=1, allow_custom_entries=True) == {} and gc.foo == 1
    assert gc.update(top_k=9, max_length=30, defaults_only=True) == {} and gc.top_k == 3 and gc.max_length == 30
    assert set(gc.to_diff_dict()) == {"max_new_tokens", "temperature", "top_k", "eos_token_id", "do_sample", "foo",
                                      "max_length"}
    for c in (copy.copy(gc), copy.deepcopy(gc), gc.copy(), pickle.loads(pickle.dumps(gc))):
        assert type(c) is GenerationConfig and c.to_diff_dict() == gc.to_diff_dict() and c == gc
        c.top_p = 0.5
        assert "top_p" not in gc.to_diff_dict()
    del gc.foo
    del gc["top_k"]
    assert gc.top_k == 50 and "top_k" not in gc.to_diff_dict()
    gc.save_pretrained(tmp_path / "saved")
    on_disk = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert on_disk == gc.to_diff_dict()
    back = GenerationConfig.from_pretrained(tmp_path / "saved")
    assert back.to_diff_dict() == gc.to_diff_dict()
    cfg, unused = GenerationConfig.from_dict({"top_k": 4}, top_p=0.9, bar=2, return_unused_kwargs=True)
    assert cfg.to_diff_dict() == {"top_k": 4, "top_p": 0.9, "bar": 2} and unused == {}
    assert GenerationConfig.from_dict({"top_k": 4}).to_diff_dict() == {"top_k": 4}
    assert GenerationConfig(transformers_version="5.0", _from_model_config=True).to_diff_dict() == {}


def test_loaded_generation_config(tmp_path, demo_model):
    """The loader fills generation_config from generation_config.json, then config.json's token ids, or GGUF."""
    m = load(tmp_path / "a", {"eos_token_id": 5, "temperature": 0.5, "do_sample": True})
    assert m.generation_config.to_diff_dict() == {"eos_token_id": 5, "temperature": 0.5, "do_sample": True,
                                                  "bos_token_id": 1, "pad_token_id": 0}
    m = load(tmp_path / "b", None)
    assert m.generation_config.to_diff_dict() == {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 0}
    assert demo_model.generation_config.to_diff_dict() == {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 2}


def test_from_pretrained_hub_arguments(tmp_path, monkeypatch):
    d = checkpoint(tmp_path / "dir", {"eos_token_id": 7, "top_k": 8, "transformers_version": "5.0"})
    gc = GenerationConfig.from_pretrained(d, trust_remote_code=True, revision="main", token=None, cache_dir=None,
                                          force_download=False, proxies=None, local_files_only=True, subfolder="")
    assert gc.to_diff_dict() == {"eos_token_id": 7, "top_k": 8}
    gc, unused = GenerationConfig.from_pretrained(d, top_k=1, foo=False, do_sample=True, return_unused_kwargs=True)
    # as transformers 5.24's from_dict: a non-field keyword becomes a custom entry first, so update() uses it
    assert (gc.top_k, gc.do_sample, gc.eos_token_id, gc.foo, unused) == (1, True, 7, False, {})
    # a hub id found in the local Hugging Face cache, at a revision
    repo = tmp_path / "hub" / "models--acme--tiny"
    for rev, eos in (("abc123", 7), ("def456", 9)):
        (repo / "snapshots" / rev).mkdir(parents=True)
        (repo / "snapshots" / rev / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert GenerationConfig.from_pretrained("acme/tiny", cache_dir=tmp_path / "hub").eos_token_id == 7
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert GenerationConfig.from_pretrained("acme/tiny", revision="def456", trust_remote_code=True).eos_token_id == 9
    (repo / "snapshots" / "abc123" / "sub").mkdir()
    (repo / "snapshots" / "abc123" / "sub" / "g.json").write_text(json.dumps({"top_p": 0.5}))
    assert GenerationConfig.from_pretrained("acme/tiny", "g.json", subfolder="sub").top_p == 0.5


def _tiny_gguf(path, **meta):
    w = GGUFWriter()
    w.add("general.architecture", "llama")
    for k, v in meta.items():
        w.add(k, v, T.UINT32)
    w.write(str(path))
    return str(path)


def test_from_pretrained_gguf(tmp_path, demo_gguf, demo_model):
    gc = GenerationConfig.from_pretrained(demo_gguf)
    assert gc.to_diff_dict() == demo_model.generation_config.to_diff_dict() == {"eos_token_id": 2, "bos_token_id": 1,
                                                                                 "pad_token_id": 2}
    (tmp_path / "one").mkdir()
    _tiny_gguf(tmp_path / "one" / "m.gguf", **{"tokenizer.ggml.eos_token_id": 11, "tokenizer.ggml.padding_token_id": 3})
    assert GenerationConfig.from_pretrained(tmp_path / "one").to_diff_dict() == {"eos_token_id": 11, "pad_token_id": 3}
    assert GenerationConfig.from_pretrained(tmp_path / "one" / "m.gguf", top_k=2).to_diff_dict() == \
        {"eos_token_id": 11, "pad_token_id": 3, "top_k": 2}
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="generation_config.json"):
        GenerationConfig.from_pretrained(tmp_path / "empty")
    bad = _tiny_gguf(tmp_path / "bad.gguf", **{"tokenizer.ggml.eos_token_id": 2**31})
    with pytest.raises(fastload.CheckpointError, match="tokenizer.ggml.eos_token_id"):
        GenerationConfig.from_pretrained(bad)


def test_chat_takes_a_config(demo_model, demo_tok):
    """chat(..., generation_config=...) used the config's length, not its own default of 512 new tokens."""
    r, _ = demo_model.chat(demo_tok, "What is 2+3?", generation_config=GenerationConfig(max_new_tokens=2))
    full, _ = demo_model.chat(demo_tok, "What is 2+3?", max_new_tokens=40)
    assert len(demo_tok.encode(r, add_special_tokens=False)) <= 2 < len(demo_tok.encode(full, add_special_tokens=False))


def test_unimplemented_field_from_the_models_own_file_warns(tmp_path, case):
    """A sampling rule fastload does not implement, set by the model's generation_config.json: generate()
    warns and generates without it (the model stays usable); the same field passed by the caller is an error."""
    m = load(tmp_path / "ck", {"eos_token_id": EOS, "penalty_alpha": 0.6})
    with pytest.warns(UserWarning, match="penalty_alpha=0.6"):
        out = m.generate(case["single_ids"], max_new_tokens=8)
    assert out[0, 17:].tolist() == GREEDY_NEW[:4]  # and the model's eos still stops it
    with pytest.raises(TypeError, match="penalty_alpha"):
        m.generate(case["single_ids"], max_new_tokens=8, penalty_alpha=0.5)


def test_validate_strict_and_equality_follow_explicit_fields():
    """validate(): sampling settings while do_sample is not True change nothing (transformers' minor issues): a
    warning, a ValueError with strict=True. == compares what generate() takes, the explicitly set fields: a
    temperature of 1.0 set is not the same config as none set (transformers 5: unset is None)."""
    import warnings as w
    g = fastload.GenerationConfig(temperature=0.5, top_k=10)
    with pytest.raises(ValueError, match="temperature=0.5, top_k=10 set while do_sample"):
        g.validate(strict=True)
    with pytest.warns(UserWarning, match="greedy decoding ignores them"):
        g.validate()
    with w.catch_warnings():
        w.simplefilter("error")
        fastload.GenerationConfig(temperature=0.5, do_sample=True).validate(strict=True)
        fastload.GenerationConfig(temperature=1.0).validate(strict=True)  # the default value: not an issue
    assert fastload.GenerationConfig(temperature=1.0) != fastload.GenerationConfig()
    assert fastload.GenerationConfig(top_k=5) == fastload.GenerationConfig(top_k=5)
