"""Tokenizer API holes from the field reports: encode(return_tensors=, max_length=, truncation=), no silently
ignored encode arguments, the *_token_id setters, and save_pretrained with a from_pretrained round trip
(a tokenizer.json-based fixture and the demo GGUF's rebuilt tokenizer)."""
import json
import os

import numpy as np
import pytest

import fastload

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")
TEXTS = ["hello world", "world hello hello", "hello unknownword world", "", "hello  world hello world hello world"]


@pytest.fixture
def tokdir(tmp_path):
    """A tokenizer.json with a BOS-adding post-processor, special tokens and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5, ":": 6, "user": 7, "assistant": 8}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(tk.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "chat_template": TEMPLATE,
        "model_max_length": 6, "padding_side": "right", "add_bos_token": True}))
    return d


@pytest.fixture
def tok(tokdir):
    return fastload.AutoTokenizer.from_pretrained(str(tokdir))


# ---------------------------------------------------------------- encode
def test_encode_return_tensors_np(tok):
    ids = tok.encode("hello world")
    assert ids == [1, 4, 5]
    a = tok.encode("hello world", return_tensors="np")
    assert isinstance(a, np.ndarray) and a.shape == (1, 3) and a.dtype == np.int64
    assert a[0].tolist() == ids
    with pytest.raises(ValueError, match="return_tensors"):
        tok.encode("hello", return_tensors="tf")


def test_encode_return_tensors_pt(tok):
    torch = pytest.importorskip("torch")
    t = tok.encode("hello world", return_tensors="pt")
    assert isinstance(t, torch.Tensor) and tuple(t.shape) == (1, 3) and t.dtype == torch.long


def test_encode_max_length_truncates_and_keeps_special_tokens(tok):
    long = "hello world hello world hello world hello"
    assert tok.encode(long, max_length=3) == [1, 4, 5]               # max_length alone truncates (transformers)
    assert tok.encode(long, max_length=3, truncation=True) == [1, 4, 5]
    assert tok.encode(long, max_length=3, truncation=False) == tok.encode(long)
    assert tok.encode(long, truncation=True) == tok.encode(long)[:6]  # model_max_length 6
    assert tok.encode(long, max_length=3, add_special_tokens=False) == [4, 5, 4]
    assert tok(long, max_length=3)["input_ids"] == [1, 4, 5]
    tok.truncation_side = "left"
    assert tok.encode(long, max_length=3) == [1, 5, 4]
    with pytest.raises(ValueError, match="truncation"):
        tok.encode(long, truncation="sideways")


def test_encode_padding_max_length(tok):
    tok.pad_token = "<pad>"
    assert tok.encode("hello", padding="max_length", max_length=4) == [1, 4, 3, 3]  # padding_side right (config)
    assert tok.encode("hello", padding="max_length", max_length=4, padding_side="left") == [3, 3, 1, 4]


def test_encode_arguments_are_never_silently_ignored(tok):
    with pytest.raises(TypeError, match="retrun_tensors"):
        tok.encode("hello", retrun_tensors="np")
    with pytest.raises(NotImplementedError, match="text_pair"):
        tok.encode("hello", "world")
    with pytest.raises(NotImplementedError, match="stride"):
        tok.encode("hello", stride=2)
    with pytest.raises(TypeError, match="bogus"):
        tok("hello", bogus=False)
    assert tok.encode("hello", verbose=False, return_attention_mask=True) == [1, 4]
    with pytest.raises(NotImplementedError, match="text_pair"):  # transformers' positional order: (text, text_pair)
        tok("hello", "world")
    assert tok("hello", return_attention_mask=False) == {"input_ids": [1, 4]}


def test_call_max_length_batches(tok):
    tok.pad_token_id = 3
    enc = tok(TEXTS, max_length=3, truncation=True, padding=True, return_tensors="np")
    assert enc["input_ids"].shape == (len(TEXTS), 3)
    enc = tok(TEXTS, max_length=3, padding=True)  # padding without truncation: max_length does not cut (transformers)
    assert [len(x) for x in enc["input_ids"]] == [7] * len(TEXTS)
    with pytest.raises(ValueError, match="truncation=True"):  # longer rows stay longer: no ragged tensor
        tok(TEXTS, max_length=3, padding="max_length", return_tensors="np")


# ---------------------------------------------------------------- special token setters
def test_pad_token_id_setter(tok):
    assert tok.pad_token is None and tok.pad_token_id is None
    tok.pad_token_id = 3
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 3
    tok.pad_token_id = np.int64(2)
    assert tok.pad_token == "</s>"
    tok.pad_token_id = None
    assert tok.pad_token is None and tok.pad_token_id is None
    tok.pad_token = tok.eos_token
    assert tok.pad_token_id == tok.eos_token_id == 2
    with pytest.raises(ValueError, match="pad_token_id=999"):
        tok.pad_token_id = 999
    with pytest.raises(TypeError, match="pad_token_id"):
        tok.pad_token_id = "3"
    with pytest.raises(ValueError, match="pad_token"):
        tok.pad_token = 3
    assert tok.pad_token_id == 2  # unchanged by the refused assignments


def test_eos_bos_token_id_setters(tok):
    tok.eos_token_id = 3
    assert tok.eos_token == "<pad>"
    tok.bos_token_id = 2
    assert tok.bos_token == "</s>"
    tok.bos_token_id = None
    assert tok.bos_token is None


def test_batch_padding_with_set_pad_id(tok):
    tok.pad_token_id = 3
    enc = tok(["hello", "hello world"], padding=True, return_tensors="np", padding_side="left")
    assert enc["input_ids"].tolist() == [[3, 1, 4], [1, 4, 5]]


# ---------------------------------------------------------------- save_pretrained
def _same(a, b, texts, chat):
    for t in texts:
        assert a.encode(t) == b.encode(t), t
        assert a(t)["input_ids"] == b(t)["input_ids"]
        ids = a.encode(t)
        assert a.decode(ids) == b.decode(ids)
        assert a.decode(ids, skip_special_tokens=True) == b.decode(ids, skip_special_tokens=True)
    assert a.special_tokens_map == b.special_tokens_map
    for k in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "padding_side", "model_max_length",
              "clean_up_tokenization_spaces", "add_bos_token", "add_eos_token", "chat_template", "truncation_side"):
        assert getattr(a, k) == getattr(b, k), k
    assert len(a) == len(b) and a.get_vocab() == b.get_vocab()
    assert sorted(a.all_special_ids) == sorted(b.all_special_ids)
    assert a.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
        b.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert a.apply_chat_template(chat, add_generation_prompt=True) == b.apply_chat_template(chat, add_generation_prompt=True)


CHAT = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "world"}]


def test_save_pretrained_round_trip_tokenizer_json(tok, tmp_path):
    tok.pad_token_id = 3
    out = tmp_path / "saved"
    files = tok.save_pretrained(out)
    assert isinstance(files, tuple)
    names = [os.path.basename(f) for f in files]
    assert names == ["tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "tokenizer.json"]
    assert all(os.path.isfile(f) for f in files)
    conf = json.loads((out / "tokenizer_config.json").read_text())
    assert conf["pad_token"] == "<pad>" and conf["eos_token"] == "</s>" and conf["padding_side"] == "right"
    assert conf["model_max_length"] == 6 and conf["add_bos_token"] is True and "chat_template" not in conf
    assert json.loads((out / "special_tokens_map.json").read_text()) == tok.special_tokens_map
    assert (out / "chat_template.jinja").read_text() == TEMPLATE
    back = fastload.AutoTokenizer.from_pretrained(str(out))
    _same(tok, back, TEXTS, CHAT)


def test_save_pretrained_options(tok, tmp_path):
    files = tok.save_pretrained(str(tmp_path / "p"), filename_prefix="x", save_jinja_files=False)
    assert [os.path.basename(f) for f in files] == ["x-tokenizer_config.json", "x-special_tokens_map.json", "x-tokenizer.json"]
    assert json.loads((tmp_path / "p" / "x-tokenizer_config.json").read_text())["chat_template"] == TEMPLATE
    with pytest.raises(TypeError, match="bogus"):
        tok.save_pretrained(str(tmp_path / "q"), bogus=1)
    with pytest.raises(NotImplementedError, match="push_to_hub"):
        tok.save_pretrained(str(tmp_path / "q"), push_to_hub=True)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(NotADirectoryError, match="afile"):
        tok.save_pretrained(str(tmp_path / "afile"))


def test_save_pretrained_replaces_a_symlink_instead_of_writing_through_it(tok, tmp_path):
    victim = tmp_path / "victim.json"
    victim.write_text("keep")
    out = tmp_path / "s"
    out.mkdir()
    os.symlink(victim, out / "tokenizer.json")
    tok.save_pretrained(out)
    assert victim.read_text() == "keep"
    assert not os.path.islink(out / "tokenizer.json")
    assert fastload.AutoTokenizer.from_pretrained(str(out)).encode("hello") == [1, 4]


def test_save_pretrained_round_trip_demo_gguf(demo_gguf, tmp_path):
    a = fastload.AutoTokenizer.from_pretrained(demo_gguf)
    a.save_pretrained(tmp_path / "smol")
    b = fastload.AutoTokenizer.from_pretrained(str(tmp_path / "smol"))
    texts = ["Hello world!", "  leading spaces and\ttabs\n\nnewlines", "Über 12345 ☃ émoji 🙂 日本語",
             "<|im_start|>user\nWhat is 2+3?<|im_end|>\n", "def f(x):\n    return x**2  # code", ""]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]
    _same(a, b, texts, chat)
    ids = a.encode(texts[2], return_tensors="np")
    assert ids.shape == (1, len(a.encode(texts[2])))
