"""fastload.gguf_tokenizer against transformers' own GGUF tokenizer loading.

The expected values come from tests/fixtures/smollm2_tokenizer.json, written once by
tools/make_tokenizer_fixtures.py with transformers (AutoTokenizer.from_pretrained(dir, gguf_file=...)).
Needs the demo model (SmolLM2-135M-Instruct Q4_1 GGUF): fastload.demo.demo_model_path(), else
$FASTLOAD_DEMO_GGUF; the synthetic sentencepiece cases need no model file.
"""
import json
import os

import pytest

from fastload import _C
from fastload.gguf_tokenizer import tokenizer_from_gguf

from gguf_util import GGUFWriter, demo_gguf_path

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_tokenizer.json")


@pytest.fixture(scope="module")
def fx():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def demo_metadata(fx):
    path = demo_gguf_path()
    if path is None:
        pytest.skip("demo GGUF not available: FASTLOAD_SKIP_DEMO=1, or fastload.demo.demo_model_path() "
                    "failed (no network?) and FASTLOAD_DEMO_GGUF is not set")
    if os.path.getsize(path) != fx["gguf_file"]["size"]:
        pytest.skip(f"{path} is not the file the fixture was made from ({fx['gguf_file']['name']})")
    with _C.GGUFFile(path) as f:
        return f.metadata


@pytest.fixture(scope="module")
def demo_tok(demo_metadata):
    return tokenizer_from_gguf(demo_metadata)


# Where fastload follows llama.cpp, the GGUF format's runtime, rather than transformers' GGUF loader (whose ids
# these fixtures hold): tests/test_gguf_llamacpp.py checks these against llama.cpp's own ids.
FOLLOWS_LLAMA_CPP = {
    # tokenizer.ggml.pre "default": llama.cpp's split sequence puts punctuation apart (transformers: GPT-2's regex)
    ("control_token_with_space", "don't won't it's"),
    # sentencepiece: llama.cpp's dummy prefix goes before the text whatever it starts with, and after each special
    # token (transformers' Metaspace "first" drops a text's own leading space and adds none after specials)
    *((n, t) for n in ("spm_synthetic", "spm_synthetic_no_bos", "spm_synthetic_bos_eos_names")
      for t in (" hello world", "<s>hello</s>", "<bos>hello<eos><unk>")),
}


def check_cases(tok, cases, label):
    for c in cases:
        text = c["text"]
        if (label, text) in FOLLOWS_LLAMA_CPP:
            continue
        got = tok.encode(text, add_special_tokens=True).ids
        assert got == c["ids_add_special"], f"{label}: encode({text!r}, add_special_tokens=True)"
        got = tok.encode(text, add_special_tokens=False).ids
        assert got == c["ids_no_special"], f"{label}: encode({text!r}, add_special_tokens=False)"
        ids = c["ids_add_special"]
        assert tok.decode(ids, skip_special_tokens=False) == c["decode_keep_special"], f"{label}: decode keep {text!r}"
        assert tok.decode(ids, skip_special_tokens=True) == c["decode_skip_special"], f"{label}: decode skip {text!r}"


def check_special(tok, info, want, label):
    for k in ("bos_token", "eos_token", "unk_token", "pad_token",
              "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "add_bos_token", "add_eos_token"):
        assert info[k] == want[k], f"{label}: {k}"
    assert tok.get_vocab_size(with_added_tokens=True) == want["vocab_size_with_added"], f"{label}: vocabulary size"


def test_demo_encode_decode(demo_tok, fx):
    tok, info = demo_tok
    check_cases(tok, fx["cases"], "demo")


def test_demo_special_tokens(demo_tok, fx):
    tok, info = demo_tok
    check_special(tok, info, fx["special"], "demo")
    assert info["model"] == "gpt2" and info["pre"] == "smollm"
    # control tokens are never split, and are skipped on decode
    assert tok.encode("<|im_start|><|im_end|>", add_special_tokens=False).ids == [1, 2]


def test_demo_decode_only(demo_tok, fx):
    tok, _ = demo_tok
    for c in fx["decode_only"]:
        assert tok.decode(c["ids"], skip_special_tokens=False) == c["keep_special"]
        assert tok.decode(c["ids"], skip_special_tokens=True) == c["skip_special"]


def test_demo_chat_template(demo_tok, fx):
    jinja2 = pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    tok, info = demo_tok
    assert isinstance(info["chat_template"], str) and "<|im_start|>" in info["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    template = env.from_string(info["chat_template"])
    for name, c in fx["chat"].items():
        text = template.render(messages=c["messages"], add_generation_prompt=True, bos_token=info["bos_token"],
                               eos_token=info["eos_token"])
        assert text == c["text"], name
        assert tok.encode(text, add_special_tokens=False).ids == c["ids"], name


def apply_edits(meta, edits):
    meta = dict(meta)
    for k, v in edits.get("set", {}).items():
        meta[k] = v
    for k in edits.get("delete", []):
        meta.pop(k, None)
    if "rename_tokens" in edits:
        toks = list(meta["tokenizer.ggml.tokens"])
        for i, s in edits["rename_tokens"].items():
            toks[int(i)] = s
        meta["tokenizer.ggml.tokens"] = toks
    if "token_types" in edits:
        types = list(meta["tokenizer.ggml.token_type"])
        for i, t in edits["token_types"].items():
            types[int(i)] = t
        meta["tokenizer.ggml.token_type"] = types
    return meta


def fx_variants():
    with open(FIXTURE, encoding="utf-8") as f:
        return json.load(f)["variants"]


@pytest.mark.parametrize("name", [v["name"] for v in fx_variants() if v["base"] == "demo"])
def test_demo_metadata_variants(name, demo_metadata, fx):
    v = next(v for v in fx["variants"] if v["name"] == name)
    tok, info = tokenizer_from_gguf(apply_edits(demo_metadata, v["edits"]))
    check_special(tok, info, v["special"], name)
    check_cases(tok, v["cases"], name)


@pytest.mark.parametrize("name", [v["name"] for v in fx_variants() if v["base"] == "metadata"])
def test_synthetic_sentencepiece(name, fx, tmp_path):
    """A small llama-model (sentencepiece BPE) vocabulary, written to a GGUF with tests/gguf_util.py and
    read back through _C.GGUFFile: merges rebuilt from scores, byte fallback, Metaspace, BOS."""
    v = next(v for v in fx["variants"] if v["name"] == name)
    w = GGUFWriter()
    for key, vt, value, at in v["metadata"]:
        w.add(key, value, vt, at)
    path = w.write(str(tmp_path / "spm.gguf"))
    with _C.GGUFFile(path) as f:
        meta = f.metadata
    tok, info = tokenizer_from_gguf(meta)
    assert info["model"] == "llama"
    check_special(tok, info, v["special"], name)
    check_cases(tok, v["cases"], name)


def test_unsupported_model():
    with pytest.raises(NotImplementedError, match="t5"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "t5", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenizer_from_gguf({"general.architecture": "llama"})
