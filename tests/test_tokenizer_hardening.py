"""Issue 7 part 4: tokenizer building in O(total characters), and every failure of the tokenizers
library on an inconsistent vocabulary (its plain Exceptions and its Rust panics, which are
BaseExceptions) a CheckpointError naming the file and what is wrong. No model file needed: the
vocabularies are small synthetic ones (tests/fixtures/smollm2_tokenizer.json's sentencepiece one and
hand-made byte-level ones)."""
import json
import os
import random

import pytest

from fastload import AutoTokenizer, CheckpointError
from fastload.gguf_tokenizer import MAX_MERGE_CHARS, MAX_TOKEN_BYTES, _merges_from_scores, tokenizer_from_gguf, \
    tokenizers_call

from gguf_util import GGUFWriter

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_tokenizer.json")


@pytest.fixture(scope="module")
def spm():
    """The synthetic sentencepiece (model "llama") metadata: 408 tokens, merges rebuilt from scores."""
    with open(FIXTURE, encoding="utf-8") as f:
        v = next(v for v in json.load(f)["variants"] if v["base"] == "metadata")
    return {k: value for k, _, value, _ in v["metadata"]}


def gpt2_meta(tokens, merges, **extra):
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": list(tokens), "tokenizer.ggml.merges": merges,
            "general.architecture": "llama", **extra}


# ------------------------------------------------------------------ merges from scores: same result, linear work

def reference_merges(tokens, scores):
    """The slicing version fastload had before (transformers' generate_merges): quadratic per token."""
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab_scores = dict(zip(tokens, scores))
    merges = []
    for merge, score in vocab_scores.items():
        local = []
        for k in range(1, len(merge)):
            left, right = merge[:k], merge[k:]
            if left in vocab and right in vocab:
                local.append((left, right, score))
        local.sort(key=lambda x: (vocab[x[0]], vocab[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda v: (v[2], len(v[0]), len(v[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


@pytest.mark.parametrize("seed", range(12))
def test_merges_from_scores_match_reference(seed):
    """Random vocabularies over a small alphabet (many splits), scores from a few values (many ties),
    some repeated tokens: the same merges in the same order as the slicing algorithm."""
    rng = random.Random(seed)
    alphabet = "ab\u2581c"[: rng.randint(2, 4)]
    tokens = [c for c in alphabet] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 9)))
                                      for _ in range(rng.randint(100, 300))]
    rng.shuffle(tokens)
    scores = [float(rng.choice([0, -1, -2, -2.5, 3])) for _ in tokens]
    want = reference_merges(tokens, scores)
    assert len(want) > 5
    assert _merges_from_scores(tokens, scores) == want


def test_merges_from_scores_real_vocabulary(spm):
    tokens, scores = spm["tokenizer.ggml.tokens"], spm["tokenizer.ggml.scores"]
    assert _merges_from_scores(tokens, scores) == reference_merges(tokens, scores)


class CountingStr(str):
    """A token that counts the characters copied out of it by slicing, and stops at a budget."""
    copied = 0
    budget = 0

    def __getitem__(self, key):
        out = str.__getitem__(self, key)
        CountingStr.copied += len(out)
        assert CountingStr.copied <= CountingStr.budget, "characters sliced out of tokens grow faster than linearly"
        return out


def test_merges_from_scores_linear_in_characters():
    """One token of 200,000 characters: the merges are found with a number of characters copied that
    is linear in the vocabulary's size (the slicing version copies n^2 = 4e10 for it)."""
    n = 200_000
    tokens = [CountingStr(t) for t in ("x", "xx", "y", "x" * (n - 1), "x" * n, "x" * (n - 1) + "y")]
    total = sum(map(len, tokens))
    CountingStr.copied, CountingStr.budget = 0, 2 * total
    merges = _merges_from_scores(tokens, [0.0] * len(tokens))
    assert CountingStr.copied <= 2 * total
    # same ties rule as the reference: longer left part first, then the ids of the parts
    assert [(len(a), a[-1], len(b), b[-1]) for a, b in merges] == \
        [(n - 1, "x", 1, "x"), (n - 1, "x", 1, "y"), (1, "x", n - 1, "x"), (1, "x", 1, "x")]


def test_merges_from_scores_degenerate_vocabulary_limit():
    """a, aa, ..., a^600: the merges would hold ~7e7 characters (n^1.5 in the vocabulary's size)."""
    tokens = ["a" * k for k in range(1, 601)]
    with pytest.raises(CheckpointError, match=rf"F\.gguf: .*more than {MAX_MERGE_CHARS} characters"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens,
                             "tokenizer.ggml.scores": [0.0] * len(tokens)}, "F.gguf")


def test_token_length_limit():
    tokens = ["a", "b", "ab", "x" * (MAX_TOKEN_BYTES + 1)]
    with pytest.raises(CheckpointError, match=rf"F\.gguf: GGUF tokenizer\.ggml\.tokens\[3\] .*{MAX_TOKEN_BYTES} bytes"):
        tokenizer_from_gguf(gpt2_meta(tokens, ["a b"]), "F.gguf")


def test_vocabulary_size_limit():
    """More than 2^24 tokens (the project's vocab_size limit): refused before any token is looked at."""
    tokens = ("a",) * ((1 << 24) + 1)  # one shared string: 128 MiB of references
    with pytest.raises(CheckpointError, match=r"F\.gguf: GGUF tokenizer\.ggml\.tokens has 16777217 entries; the limit "
                                              r"is 16777216"):
        tokenizer_from_gguf({"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens}, "F.gguf")


# ------------------------------------------------------------------ inconsistent GGUF tokenizer metadata

def _set(key, value):
    return lambda m: {**m, key: value}


def _tokens(fn):
    def edit(m):
        t = list(m["tokenizer.ggml.tokens"])
        fn(t)
        return {**m, "tokenizer.ggml.tokens": t}
    return edit


SPM_CASES = {
    # name: (edit, key the message names)
    "tokens not an array": (_set("tokenizer.ggml.tokens", 7), r"tokenizer\.ggml\.tokens is int"),
    "token not a string": (_tokens(lambda t: t.__setitem__(5, 12)), r"tokenizer\.ggml\.tokens\[5\] is int"),
    "empty vocabulary": (_set("tokenizer.ggml.tokens", []), r"tokenizer\.ggml\.tokens is empty"),
    "repeated token": (_tokens(lambda t: t.__setitem__(300, t[299])), r"tokenizer\.ggml\.tokens\[300\] .*repeats"),
    "model not a string": (_set("tokenizer.ggml.model", 3), r"tokenizer\.ggml\.model is int"),
    "token_type shorter": (lambda m: {**m, "tokenizer.ggml.token_type": m["tokenizer.ggml.token_type"][:-3]},
                           r"tokenizer\.ggml\.token_type has 405 entries for 408 tokens"),
    "token_type not ints": (lambda m: {**m, "tokenizer.ggml.token_type": ["3"] * 408},
                            r"tokenizer\.ggml\.token_type\[0\] is str"),
    "scores longer": (lambda m: {**m, "tokenizer.ggml.scores": m["tokenizer.ggml.scores"] + [0.0]},
                      r"tokenizer\.ggml\.scores has 409 entries"),
    "score not a number": (lambda m: {**m, "tokenizer.ggml.scores": ["x"] + m["tokenizer.ggml.scores"][1:]},
                           r"tokenizer\.ggml\.scores\[0\] is not a number"),
    "score NaN": (lambda m: {**m, "tokenizer.ggml.scores": [float("nan")] + m["tokenizer.ggml.scores"][1:]},
                  r"tokenizer\.ggml\.scores\[0\] is NaN"),
    "no merges nor scores": (lambda m: {k: v for k, v in m.items() if k != "tokenizer.ggml.scores"},
                             r"tokenizer\.ggml\.merges and tokenizer\.ggml\.scores are both missing"),
    "score too large for a float": (lambda m: {**m, "tokenizer.ggml.scores": [10 ** 400] + m["tokenizer.ggml.scores"][1:]},
                                    r"tokenizer\.ggml\.scores\[0\] is out of range"),
    "bos id outside": (_set("tokenizer.ggml.bos_token_id", 408), r"tokenizer\.ggml\.bos_token_id = 408 is outside"),
    "eos id negative": (_set("tokenizer.ggml.eos_token_id", -1), r"tokenizer\.ggml\.eos_token_id = -1 is outside"),
    "unk id a string": (_set("tokenizer.ggml.unknown_token_id", "0"), r"tokenizer\.ggml\.unknown_token_id is str"),
    "pad id a bool": (_set("tokenizer.ggml.padding_token_id", True), r"tokenizer\.ggml\.padding_token_id is bool"),
    "add_bos_token a string": (_set("tokenizer.ggml.add_bos_token", "no"), r"tokenizer\.ggml\.add_bos_token is str"),
    "pre a list": (_set("tokenizer.ggml.pre", ["llama3"]), r"tokenizer\.ggml\.pre is list"),
    "chat_template a number": (_set("tokenizer.chat_template", 5), r"tokenizer\.chat_template is int"),
    "architecture a dict": (_set("general.architecture", {"a": 1}), r"general\.architecture is dict"),
}


@pytest.mark.parametrize("name", sorted(SPM_CASES))
def test_inconsistent_sentencepiece_metadata(spm, name):
    edit, match = SPM_CASES[name]
    with pytest.raises(CheckpointError, match=r"^F\.gguf: .*" + match):
        tokenizer_from_gguf(edit(spm), "F.gguf")


GPT2_TOKENS = ["a", "b", "c", "ab", "abc", "<|endoftext|>"]
GPT2_CASES = {
    # the tokenizers library raised a plain Exception for these ...
    "merge part unknown": (["a b", "ab d"], r"tokenizer\.ggml\.merges\[1\] uses 'd'"),
    # ... and panicked (pyo3_runtime.PanicException) for this one: "b" + "c" is no token
    "merged token unknown": (["a b", "b c"], r"tokenizer\.ggml\.merges\[1\] uses 'bc'"),
    "merge not a pair": (["a b", "abc"], r"tokenizer\.ggml\.merges\[1\] 'abc' is not of the form"),
    "merge not a string": (["a b", 5], r"tokenizer\.ggml\.merges\[1\] is int"),
}


@pytest.mark.parametrize("name", sorted(GPT2_CASES))
def test_inconsistent_byte_level_metadata(name):
    merges, match = GPT2_CASES[name]
    with pytest.raises(CheckpointError, match=r"^F\.gguf: GGUF " + match):
        tokenizer_from_gguf(gpt2_meta(GPT2_TOKENS, merges, **{"tokenizer.ggml.eos_token_id": 5}), "F.gguf")


def test_byte_level_metadata_consistent_builds():
    tok, info = tokenizer_from_gguf(gpt2_meta(GPT2_TOKENS, ["a b", "ab c"], **{"tokenizer.ggml.eos_token_id": 5,
                                                                                "tokenizer.ggml.add_eos_token": 1}))
    assert tok.encode("abc").ids == [4, 5] and info["add_eos_token"] is True


@pytest.mark.parametrize("bos", ["<a:b>", "$A"])
def test_special_token_not_a_template_piece(bos):
    """A BOS spelled with ':' (TemplateProcessing refused it) or starting with '$' (silently read as a
    sequence) is still added as BOS."""
    tokens = ["a", "b", "ab", bos]
    tok, info = tokenizer_from_gguf(gpt2_meta(tokens, ["a b"], **{"tokenizer.ggml.bos_token_id": 3,
                                                                  "tokenizer.ggml.add_bos_token": True}))
    assert tok.encode("ab").ids == [3, 2] and info["bos_token_id"] == 3
    assert tok.encode("a", "b").ids == [3, 0, 3, 1]


def test_gguf_file_error_names_the_file(spm, tmp_path):
    """From a GGUF file on disk through AutoTokenizer: the message names the file and the key."""
    w = GGUFWriter()
    for k, v in spm.items():
        if k == "tokenizer.ggml.bos_token_id":
            v = 100000
        w.add(k, v) if not isinstance(v, list) or k != "tokenizer.ggml.scores" else w.add(k, v, 9, 6)
    path = w.write(str(tmp_path / "bad.gguf"))
    with pytest.raises(CheckpointError, match=r"bad\.gguf: GGUF tokenizer\.ggml\.bos_token_id = 100000 is outside"):
        AutoTokenizer.from_pretrained(path)


def test_tokenizers_call_lets_interrupts_through():
    with pytest.raises(KeyboardInterrupt):
        with tokenizers_call("F", "x"):
            raise KeyboardInterrupt
    with pytest.raises(SystemExit):
        with tokenizers_call("F", "x"):
            raise SystemExit(3)
    with pytest.raises(CheckpointError, match="F: x: the tokenizers library failed"):
        with tokenizers_call("F", "x"):
            raise Exception("boom")


# ------------------------------------------------------------------ tokenizer.json / tokenizer_config.json

@pytest.fixture(scope="module")
def tokenizer_json(spm):
    return json.loads(tokenizer_from_gguf(spm)[0].to_str())


def model_dir(tmp_path, tj, config=None):
    with open(tmp_path / "tokenizer.json", "w", encoding="utf-8") as f:
        f.write(tj if isinstance(tj, str) else json.dumps(tj))
    if config is not None:
        with open(tmp_path / "tokenizer_config.json", "w", encoding="utf-8") as f:
            json.dump(config, f)
    return str(tmp_path)


def test_tokenizer_json_valid(tmp_path, tokenizer_json):
    tok = AutoTokenizer.from_pretrained(model_dir(tmp_path, tokenizer_json, {"bos_token": {"content": "<s>"},
                                                                             "model_max_length": 1e30}))
    assert tok.bos_token == "<s>" and tok.encode("ab")[0] == 1


def _edit_json(fn):
    def edit(tj):
        tj = json.loads(json.dumps(tj))
        fn(tj)
        return tj
    return edit


JSON_CASES = {
    "not JSON": (lambda tj: "{not json", r"tokenizer\.json: reading the tokenizer: the tokenizers library failed"),
    "model a number": (_edit_json(lambda tj: tj.__setitem__("model", 5)), r"tokenizer\.json: reading the tokenizer"),
    "added token content a number": (_edit_json(lambda tj: tj["added_tokens"][0].__setitem__("content", 5)),
                                     r"tokenizer\.json: reading the tokenizer"),
    "merge of unknown tokens": (_edit_json(lambda tj: tj["model"]["merges"].append(["zz", "qq"])),
                                r"tokenizer\.json: reading the tokenizer"),
    # deserializes, then panics ("no entry found for key") on the first encode
    "template names a missing special token": (
        _edit_json(lambda tj: tj["post_processor"].__setitem__("special_tokens", {})),
        r"tokenizer\.json: encoding and decoding a probe text with the tokenizer: the tokenizers library panicked"),
}


@pytest.mark.parametrize("name", sorted(JSON_CASES))
def test_bad_tokenizer_json(tmp_path, tokenizer_json, name):
    edit, match = JSON_CASES[name]
    with pytest.raises(CheckpointError, match=match):
        AutoTokenizer.from_pretrained(model_dir(tmp_path, edit(tokenizer_json)))


def test_panic_at_decode_time(tmp_path, tokenizer_json):
    """A Strip decoder that strips more spaces than a token has loads (the probe text has no such
    token), then panics decoding that token: CheckpointError."""
    tj = json.loads(json.dumps(tokenizer_json))
    tj["decoder"]["decoders"][-1].update(start=0, stop=2)  # Strip: panics on a one-character text
    tok = AutoTokenizer.from_pretrained(model_dir(tmp_path, tj))
    with pytest.raises(CheckpointError, match="decoding: the tokenizers library panicked"):
        tok.decode([tj["model"]["vocab"]["\u2581"]])
    with pytest.raises(TypeError):  # a bad argument stays an argument error
        tok.encode(5)


CONFIG_CASES = {
    "chat_template a number": ({"chat_template": 5}, "chat_template is int"),
    "chat_template entry without template": ({"chat_template": [{"name": "default"}]}, r"chat_template\[0\]"),
    "padding_side": ({"padding_side": "middle"}, "padding_side must be"),
    "bos_token a number": ({"bos_token": 1}, "bos_token is int"),
    "eos_token content a list": ({"eos_token": {"content": ["</s>"]}}, "eos_token is list"),
    "model_max_length a string": ({"model_max_length": "big"}, "model_max_length must be"),
    "clean_up a string": ({"clean_up_tokenization_spaces": "false"}, "clean_up_tokenization_spaces is str"),
}


@pytest.mark.parametrize("name", sorted(CONFIG_CASES))
def test_bad_tokenizer_config(tmp_path, tokenizer_json, name):
    config, match = CONFIG_CASES[name]
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json: " + match):
        AutoTokenizer.from_pretrained(model_dir(tmp_path, tokenizer_json, config))


def test_byte_level_respelling_may_repeat_a_token():
    """A user-defined token stored raw ("  ") whose GPT-2 respelling is another token ("ĠĠ"): tolerated
    (the later id wins, as transformers does); only a token repeated as the file spells it is an error."""
    tokens = ["a", "\u0120", "\u0120\u0120", "  ", "<|endoftext|>"]
    tok, _ = tokenizer_from_gguf(gpt2_meta(tokens, ["\u0120 \u0120"], **{"tokenizer.ggml.token_type": [1, 1, 1, 4, 3]}))
    assert tok.encode("a").ids == [0]
    with pytest.raises(CheckpointError, match=r"tokenizer\.ggml\.tokens\[3\] 'a' repeats tokens\[0\]"):
        tokenizer_from_gguf(gpt2_meta(["a", "b", "ab", "a"], ["a b"]), "F.gguf")
