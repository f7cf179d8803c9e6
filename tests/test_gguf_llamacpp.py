"""fastload.gguf_tokenizer against llama.cpp, the GGUF format's own runtime: ids of a set of texts with and without
the special tokens, for GGUF vocabularies of several kinds (tests/fixtures/gguf_llamacpp/, written by
tools/make_gguf_llamacpp_fixtures.py with llama-cpp-python 0.3.36: each file holds the vocabulary's tokenizer.*
metadata and llama.cpp's ids). Covers what a bug hunt found (2026-12-06) where fastload followed transformers' GGUF
loader instead: tokenizer.ggml.pre names it did not know ("smollm", the demo's, "deepseek-coder", "deepseek-llm",
"falcon", "default") read with GPT-2's split; Llama 3 vocabularies merging a piece that is a token itself
(llama.cpp's ignore_merges) and adding no BOS without add_bos_token; sentencepiece vocabularies dropping a text's own
leading space and ignoring add_space_prefix = false."""
import json
import os
import warnings

import pytest

from fastload.gguf_tokenizer import tokenizer_from_gguf
from gguf_util import demo_gguf_path

DIR = os.path.join(os.path.dirname(__file__), "fixtures", "gguf_llamacpp")
NAMES = sorted(f[:-5] for f in os.listdir(DIR) if f.endswith(".json") and f != "demo.json")


def _load(name):
    with open(os.path.join(DIR, name + ".json"), encoding="utf-8") as f:
        return json.load(f)


def _check(tok, cases, label):
    bad = []
    for c in cases:
        got = tok.encode(c["text"], add_special_tokens=False).ids
        got_s = tok.encode(c["text"], add_special_tokens=True).ids
        if got != c["ids"] or got_s != c["ids_special"]:
            bad.append((c["text"], got, c["ids"], got_s, c["ids_special"]))
    assert not bad, f"{label}: {len(bad)} of {len(cases)} texts differ from llama.cpp, e.g. {bad[:2]}"


@pytest.mark.parametrize("name", NAMES)
def test_ids_equal_llama_cpp(name):
    rec = _load(name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every pre-tokenizer name here is one fastload knows
        tok, info = tokenizer_from_gguf(rec["metadata"], name)
    _check(tok, rec["cases"], name)


@pytest.mark.parametrize("name", ["spm", "spm_nospace"])
def test_sentencepiece_round_trips_the_text(name):
    """llama.cpp's dummy prefix is the decoder's to remove, and only it: a text's own leading spaces come back."""
    tok, _ = tokenizer_from_gguf(_load(name)["metadata"], name)
    for text in (" Hello world", "  indented code", "Hello", "x = 1"):
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids) == text, (name, text)


def test_demo_ids_equal_llama_cpp():
    path = demo_gguf_path()
    if path is None:
        pytest.skip("demo GGUF not available (FASTLOAD_SKIP_DEMO=1, or no network and no FASTLOAD_DEMO_GGUF)")
    from fastload import _C
    with _C.GGUFFile(path) as f:
        meta = f.metadata
    tok, info = tokenizer_from_gguf(meta, path)
    assert info["pre"] == "smollm"
    _check(tok, _load("demo")["cases"], "demo")


def test_unknown_pre_tokenizer_name_warns():
    meta = dict(_load("smollm")["metadata"])
    meta["tokenizer.ggml.pre"] = "no-such-pre"
    with pytest.warns(UserWarning, match="no-such-pre"):
        tokenizer_from_gguf(meta, "x.gguf")


def test_end_of_turn_tokens_end_generation():
    """tokenizer.ggml.eot_token_id / eom_token_id (Llama 3's <|eot_id|> / <|eom_id|>, eos <|end_of_text|>) end
    generation in llama.cpp; fastload's generation config read only eos, so a chat ran past the end of its turn
    into the next template turn."""
    from fastload.modeling import _gguf_generation_config
    meta = {"tokenizer.ggml.eos_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eot_token_id": 2,
            "tokenizer.ggml.eom_token_id": 3}
    assert _gguf_generation_config(meta, "x.gguf")["eos_token_id"] == [0, 2, 3]
    meta["tokenizer.ggml.eot_token_id"] = meta["tokenizer.ggml.eom_token_id"] = 0  # the same token: one id
    assert _gguf_generation_config(meta, "x.gguf")["eos_token_id"] == 0
