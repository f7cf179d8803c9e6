"""AutoTokenizer against transformers 5's behaviour, on small tokenizers made here with the `tokenizers` library (no
transformers in CI). Each case is a difference a comparison with transformers 5.25 found (2026-12-06); the expected
values are transformers' there."""
import json

import numpy as np
import pytest

import fastload

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def make_dir(d, config=None, tokenizer_json=None, keep_added=None):
    """A small byte-level BPE tokenizer (GPT-2 / Qwen style) in d, as a hub checkpoint holds it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    corpus = ["Hello world! This is a test of the tokenizer.", "The quick brown fox jumps over the lazy dog.",
              "I don't think it's going to rain, we're fine.", "x = a.b ; print ( x, y )"] * 20
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>",
                                                                                       "<|im_end|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    tj = json.loads(tk.to_str())
    if keep_added is not None:
        tj["added_tokens"] = [a for a in tj["added_tokens"] if a["content"] in keep_added]
    if tokenizer_json:
        tokenizer_json(tj)
    (d / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False), encoding="utf-8")
    conf = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "padding_side": "right", "model_max_length": 32768, "clean_up_tokenization_spaces": False,
            "chat_template": CHATML}
    conf.update(config or {})
    (d / "tokenizer_config.json").write_text(json.dumps(conf), encoding="utf-8")
    return fastload.AutoTokenizer.from_pretrained(str(d))


def test_tokenizer_json_padding_and_truncation_apply_only_when_asked(tmp_path):
    """A tokenizer.json saved with padding / truncation on (common in fine-tuned checkpoints) padded and cut every
    call, with an attention mask of ones over the pads: they apply only when the call asks, as in transformers."""
    def on(tj):
        tj["padding"] = {"strategy": {"Fixed": 4}, "direction": "Right", "pad_to_multiple_of": None, "pad_id": 0,
                         "pad_type_id": 0, "pad_token": "<|endoftext|>"}
        tj["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    tok = make_dir(tmp_path, tokenizer_json=on)
    texts = ["Hello world!", "The quick brown fox jumps over the lazy dog."]
    plain = [tok.encode(t) for t in texts]
    assert len(plain[1]) > 4 and len(plain[0]) != len(plain[1])
    assert tok(texts)["input_ids"] == plain
    enc = tok(texts, padding=True)
    n0 = len(plain[0])
    assert enc["attention_mask"][0] == [1] * n0 + [0] * (len(plain[1]) - n0)
    assert tok(texts, truncation=True, max_length=3)["input_ids"] == [p[:3] for p in plain]


def test_decode_of_a_batch_gives_one_text_a_row(tmp_path):
    """decode of a 2-D array, a list of lists or an encoding: one string a row (transformers 5), where the rows
    were glued into one string (an array) or raised an unclear TypeError (lists)."""
    tok = make_dir(tmp_path)
    a, b = tok.encode("Hello world!"), tok.encode("The quick fox")
    assert tok.decode(np.array([a[:3], b[:3]])) == [tok.decode(a[:3]), tok.decode(b[:3])]
    assert tok.decode([a, b]) == ["Hello world!", "The quick fox"]
    assert tok.decode(np.array([a])) == ["Hello world!"]
    assert tok.decode(tok(["Hello world!"])) == ["Hello world!"]
    assert tok.decode(np.array(a)) == "Hello world!" and tok.decode(a[0]) == tok.decode([a[0]])
    for bad in ("12", [1.0, 2.0]):
        with pytest.raises(TypeError, match="decode takes"):
            tok.decode(bad)


def test_clean_up_tokenization_spaces_is_not_applied_to_bpe(tmp_path):
    """transformers 5 skips the clean-up for BPE models (it rewrites code and real text); fastload applied it."""
    tok = make_dir(tmp_path, config={"clean_up_tokenization_spaces": True})
    text = "x = a .b ; print ( x , y ) !"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode(text), clean_up_tokenization_spaces=True) == text


def test_named_special_tokens_missing_from_tokenizer_json_are_added(tmp_path):
    """A pad token named in tokenizer_config.json but absent from tokenizer.json is added as a special token (pad
    id len(vocab), padding works), and one in the vocabulary but not an added token is matched whole in text."""
    tok = make_dir(tmp_path, config={"pad_token": "<|pad|>"}, keep_added=["<|endoftext|>", "<|im_start|>",
                                                                          "<|im_end|>"])
    assert tok.pad_token_id == len(tok) - 1
    assert tok(["Hi", "Hello world! This is a test"], padding=True)["input_ids"][0][-1] == tok.pad_token_id
    d2 = tmp_path / "b"
    d2.mkdir()
    tok2 = make_dir(d2, keep_added=["<|im_start|>", "<|im_end|>"])  # <|endoftext|> in the vocab, not added
    eot = tok2.convert_tokens_to_ids("<|endoftext|>")
    assert tok2.encode("hi<|endoftext|>")[-1] == eot and tok2.pad_token_id == eot


def test_add_eos_token_setter_changes_encoding(tmp_path):
    """tok.add_eos_token = True (fine-tuning scripts) adds eos when encoding; it was a plain attribute."""
    tok = make_dir(tmp_path, config={"bos_token": "<|endoftext|>"})
    ids = tok.encode("Hello")
    assert not tok.add_eos_token and not tok.add_bos_token
    tok.add_eos_token = True
    assert tok.encode("Hello") == ids + [tok.eos_token_id] and tok.add_eos_token
    tok.add_bos_token = True
    assert tok.encode("Hello") == [tok.bos_token_id] + ids + [tok.eos_token_id]
    assert tok.encode("Hello", add_special_tokens=False) == ids
    tok.add_eos_token = tok.add_bos_token = False
    assert tok.encode("Hello") == ids


def test_all_special_tokens_are_the_named_and_extra_ones(tmp_path):
    """all_special_tokens: the named tokens and the extra / additional ones (transformers 5), not every special
    added token (<|im_start|> is not named here: convert_ids_to_tokens(skip_special_tokens=True) keeps it)."""
    tok = make_dir(tmp_path)
    assert tok.all_special_tokens == ["<|im_end|>", "<|endoftext|>"]
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.convert_ids_to_tokens([start], skip_special_tokens=True) == ["<|im_start|>"]
    d2 = tmp_path / "b"
    d2.mkdir()
    tok2 = make_dir(d2, config={"additional_special_tokens": ["<|im_start|>"]})
    assert tok2.all_special_tokens == ["<|im_end|>", "<|endoftext|>", "<|im_start|>"]
    assert tok2.all_special_ids == [tok2.convert_tokens_to_ids(t) for t in tok2.all_special_tokens]


def test_chat_template_generation_tag_and_special_token_kwargs(tmp_path):
    """{% generation %} blocks (assistant masks in training templates) render as their body (they were a
    TemplateSyntaxError); a template variable named like a special token (bos_token='') wins over the tokenizer's
    (it was 'multiple values')."""
    tmpl = ("{% for m in messages %}{{ bos_token }}{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}"
            "{% endgeneration %}{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    tok = make_dir(tmp_path, config={"chat_template": tmpl, "bos_token": "<|im_start|>"})
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<|im_start|>Hi<|im_start|>Hello"
    assert tok.apply_chat_template(chat, tokenize=False, bos_token="") == "HiHello"


def test_chat_messages_are_normalised_as_transformers(tmp_path):
    """content=None (OpenAI tool calls) is dropped before rendering, not printed as 'None'; reasoning given under
    one name reaches templates reading another (reasoning_content / thinking / reasoning)."""
    tmpl = ("{% for m in messages %}[{{ m['role'] }}]{% if m['content'] is defined %}{{ m['content'] }}{% endif %}"
            "{% if m['reasoning_content'] is defined %}<think>{{ m['reasoning_content'] }}</think>{% endif %}"
            "{% if m['tool_calls'] is defined %}<call>{{ m['tool_calls'][0]['name'] }}</call>{% endif %}{% endfor %}")
    tok = make_dir(tmp_path, config={"chat_template": tmpl})
    chat = [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [{"name": "get_weather"}]},
            {"role": "assistant", "content": "sunny", "reasoning": "look it up"}]
    assert tok.apply_chat_template(chat, tokenize=False) == \
        "[user]weather?[assistant]<call>get_weather</call>[assistant]sunny<think>look it up</think>"
    assert chat[1]["content"] is None and "reasoning_content" not in chat[2]  # the caller's messages unchanged


def test_continue_final_message_keeps_its_spaces(tmp_path):
    """continue_final_message cuts right after the final message as rendered: a message with leading and trailing
    spaces kept both (the trailing ones were dropped), and a template that strips drops them (transformers 5)."""
    tok = make_dir(tmp_path)
    chat = [{"role": "user", "content": "Tell a story"}, {"role": "assistant", "content": "  Once upon a time "}]
    text = tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\n  Once upon a time ")
    strip = CHATML.replace("message['content']", "message['content'] | trim")
    d2 = tmp_path / "b"
    d2.mkdir()
    tok2 = make_dir(d2, config={"chat_template": strip})
    assert tok2.apply_chat_template(chat, tokenize=False, continue_final_message=True).endswith(
        "<|im_start|>assistant\nOnce upon a time")
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([], tokenize=False, continue_final_message=True)


def test_named_chat_templates_chosen_by_name_or_tools(tmp_path):
    """tokenizer_config.json's list of named templates: chat_template='tool_use' picks that one (it rendered the
    word itself), tools= picks 'tool_use' by default, else 'default'; tools must be JSON-schema dicts."""
    named = [{"name": "default", "template": "DEFAULT:{{ messages[0]['content'] }}"},
             {"name": "tool_use", "template": "TOOLS({{ tools | length }}):{{ messages[0]['content'] }}"}]
    tok = make_dir(tmp_path, config={"chat_template": named})
    chat = [{"role": "user", "content": "hi"}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    assert tok.apply_chat_template(chat, tokenize=False) == "DEFAULT:hi"
    assert tok.apply_chat_template(chat, tokenize=False, tools=[tool]) == "TOOLS(1):hi"
    assert tok.apply_chat_template(chat, tokenize=False, chat_template="tool_use", tools=[]) == "TOOLS(0):hi"
    with pytest.raises(TypeError, match="JSON-schema dict"):
        tok.apply_chat_template(chat, tokenize=False, tools=[len])
    with pytest.raises(TypeError, match="list of"):
        tok.apply_chat_template("hello", tokenize=False)


def test_add_special_tokens_pad_for_batching(tmp_path):
    """tok.add_special_tokens({'pad_token': '[PAD]'}) (GPT-2-style batching scripts): a new special token past the
    vocabulary, set as the pad token, matched whole in text; add_tokens counts what is new (AttributeErrors before)."""
    tok = make_dir(tmp_path, config={"pad_token": None})
    n = len(tok)
    assert tok.add_special_tokens({"pad_token": "[PAD]"}) == 1
    assert tok.pad_token == "[PAD]" and tok.pad_token_id == n and len(tok) == n + 1
    enc = tok(["Hi", "Hello world! This is a test"], padding=True)
    assert enc["input_ids"][0][-1] == n and enc["attention_mask"][0][-1] == 0
    assert tok.add_tokens(["[PAD]", "newword"]) == 1 and tok.encode("a newword")[-1] == n + 1
    assert tok.add_special_tokens({"additional_special_tokens": ["<x>"]}) == 1 and "<x>" in tok.all_special_tokens
    with pytest.raises(ValueError, match="mask_token"):
        tok.add_special_tokens({"mask_token": "<mask>"})


@pytest.mark.parametrize("config", [{"pad_token": "\udcff"}, {"additional_special_tokens": ["\ud800x"]}])
def test_special_token_with_a_lone_surrogate_is_a_checkpoint_error(tmp_path, config):
    """A special token JSON spells with a lone surrogate escape cannot be a token: a CheckpointError naming the file
    and key (adding the named tokens to the vocabulary raised a bare UnicodeEncodeError)."""
    with pytest.raises(fastload.CheckpointError, match=r"tokenizer_config\.json: .* lone surrogate"):
        make_dir(tmp_path, config=config)
