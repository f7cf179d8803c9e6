"""fastload.pipeline("text-generation"): transformers' TextGenerationPipeline shapes and defaults, and the
generated text equal to model.generate + decode with the same settings (demo model, tiny fixture)."""
import copy
import json

import numpy as np
import pytest

import fastload
from golden_util import model_dir

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


@pytest.fixture(scope="module")
def pipe(demo_model, demo_tok):
    return fastload.pipeline("text-generation", model=demo_model, tokenizer=demo_tok)


def _generate_text(model, tok, ids, **kw):
    out = model.generate(np.asarray(ids), attention_mask=np.ones_like(ids), **kw)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_pipeline_attributes(pipe, demo_model, demo_tok):
    assert pipe.model is demo_model and pipe.tokenizer is demo_tok and pipe.task == "text-generation"


def test_string_prompt_equals_generate_and_decode(pipe, demo_model, demo_tok):
    prompt = "The capital of France is"
    out = pipe(prompt, max_new_tokens=8, do_sample=False)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    ids = demo_tok(prompt, return_tensors="np")["input_ids"]  # the tokenizer's own add_special_tokens default
    new = _generate_text(demo_model, demo_tok, ids, max_new_tokens=8, do_sample=False, pad_token_id=demo_tok.pad_token_id)
    assert out[0]["generated_text"] == prompt + new
    assert pipe(prompt, max_new_tokens=8, do_sample=False, return_full_text=False) == [{"generated_text": new}]
    toks = pipe(prompt, max_new_tokens=8, do_sample=False, return_tensors=True)
    assert toks[0]["generated_token_ids"][:ids.shape[1]] == ids[0].tolist()


def test_chat_returns_messages_plus_assistant(pipe, demo_model, demo_tok):
    out = pipe(MSGS, max_new_tokens=12, do_sample=False)
    assert len(out) == 1
    gen = out[0]["generated_text"]
    assert gen[:2] == MSGS and gen[2]["role"] == "assistant" and len(gen) == 3
    ids = demo_tok.apply_chat_template(MSGS, add_generation_prompt=True, return_tensors="np")
    assert gen[2]["content"] == _generate_text(demo_model, demo_tok, ids, max_new_tokens=12, do_sample=False,
                                               pad_token_id=demo_tok.pad_token_id)
    assert MSGS == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+3?"}]


def test_chat_continuation_of_an_assistant_prefill(pipe, demo_model, demo_tok):
    chat = MSGS + [{"role": "assistant", "content": "The answer is"}]
    out = pipe(chat, max_new_tokens=6, do_sample=False)
    gen = out[0]["generated_text"]
    assert len(gen) == 3 and gen[:2] == MSGS and gen[2]["role"] == "assistant"
    text = demo_tok.apply_chat_template(chat, tokenize=False, continue_final_message=True)
    assert text.endswith("The answer is")
    ids = demo_tok(text, add_special_tokens=False, return_tensors="np")["input_ids"]
    new = _generate_text(demo_model, demo_tok, ids, max_new_tokens=6, do_sample=False, pad_token_id=demo_tok.pad_token_id)
    assert gen[2]["content"] == "The answer is" + new


def test_lists_give_lists_of_lists_and_batching_matches_generate(pipe, demo_model, demo_tok):
    prompts = ["Hello, my name is", "One two three"]
    one_by_one = pipe(prompts, max_new_tokens=5, do_sample=False)
    assert isinstance(one_by_one, list) and len(one_by_one) == 2
    assert all(isinstance(r, list) and len(r) == 1 and set(r[0]) == {"generated_text"} for r in one_by_one)
    for p, r in zip(prompts, one_by_one):
        assert r == pipe(p, max_new_tokens=5, do_sample=False)
    batched = pipe(prompts, max_new_tokens=5, do_sample=False, batch_size=2)
    enc = demo_tok(prompts, padding=True, return_tensors="np")
    out = demo_model.generate(**enc, max_new_tokens=5, do_sample=False, pad_token_id=demo_tok.pad_token_id)
    T = enc["input_ids"].shape[1]
    want = [[{"generated_text": p + demo_tok.decode(out[i, T:], skip_special_tokens=True)}] for i, p in enumerate(prompts)]
    assert batched == want
    chats = pipe([MSGS, [{"role": "user", "content": "Hi"}]], max_new_tokens=4, do_sample=False)
    assert len(chats) == 2 and all(len(c) == 1 and c[0]["generated_text"][-1]["role"] == "assistant" for c in chats)
    assert pipe([], max_new_tokens=2) == []


def test_sampling_settings_reach_generate(pipe, demo_model, demo_tok):
    prompt = "Once upon a time"
    out = pipe(prompt, max_new_tokens=6, do_sample=True, temperature=0.9, top_p=0.8, seed=11, num_return_sequences=3,
               return_full_text=False)
    assert len(out) == 3
    ids = demo_tok(prompt, return_tensors="np")["input_ids"]
    g = demo_model.generate(ids, attention_mask=np.ones_like(ids), max_new_tokens=6, do_sample=True, temperature=0.9,
                            top_p=0.8, seed=11, num_return_sequences=3, pad_token_id=demo_tok.pad_token_id)
    assert [r["generated_text"] for r in out] == [demo_tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in g]


def test_generator_input_streams_results(pipe):
    it = pipe((p for p in ["a", "b"]), max_new_tokens=2, do_sample=False)
    assert not isinstance(it, list)
    assert [len(r) for r in it] == [1, 1]


# ---------------------------------------------------------------- defaults and arguments, through a recording model
class _Recorder:
    """A stand-in model that records what generate() receives and returns the prompt plus two tokens."""

    def __init__(self, generation_config=None):
        self.generation_config = fastload.GenerationConfig(**(generation_config or {}))
        self.config = fastload.Config()
        self.device = "cpu"
        self.calls = []

    def generate(self, input_ids=None, attention_mask=None, **kw):
        self.calls.append(dict(kw, input_ids=np.asarray(input_ids).copy(),
                               attention_mask=None if attention_mask is None else np.asarray(attention_mask).copy()))
        n = int(kw.get("num_return_sequences") or 1)
        ids = np.repeat(np.asarray(input_ids), n, axis=0)
        return np.concatenate([ids, np.full((ids.shape[0], 2), 4, dtype=ids.dtype)], axis=1)


@pytest.fixture
def tokdir(tmp_path):
    """A tokenizer.json whose post-processor adds <s>; right padding in its config (the pipeline makes it left)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, decoders
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5, "user": 6, "assistant": 7}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.decoder = decoders.WordPiece()
    tk.add_special_tokens(["<unk>", "<s>", "</s>", "<pad>"])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(tk.to_str())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>", "padding_side": "right",
        "chat_template": "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}"}))
    return d


def test_transformers_defaults(tokdir):
    rec = _Recorder()
    p = fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir))
    assert p.tokenizer.padding_side == "left"
    assert p("hello world") == [{"generated_text": "hello world" + "hello hello"}]  # prompt + decoded new tokens
    kw = rec.calls[-1]
    assert kw["max_new_tokens"] == 256 and kw["do_sample"] is True and kw["temperature"] == 0.7
    assert kw["pad_token_id"] == 3
    assert kw["input_ids"].tolist() == [[1, 4, 5]]  # text prompts: the tokenizer's add_special_tokens default
    p("hello", do_sample=False)
    assert "temperature" not in rec.calls[-1] and rec.calls[-1]["do_sample"] is False
    p("hello", add_special_tokens=False)
    assert rec.calls[-1]["input_ids"].tolist() == [[4]]
    p([{"role": "user", "content": "hello"}])
    assert rec.calls[-1]["input_ids"].tolist() == [[6, 4, 7]]  # chats: no special tokens added
    p("hello", max_length=10)
    assert "max_new_tokens" not in rec.calls[-1] and rec.calls[-1]["max_length"] == 10


def test_model_generation_config_wins_over_pipeline_defaults(tokdir):
    rec = _Recorder({"max_length": 50, "temperature": 0.3, "do_sample": True})
    p = fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir))
    p("hello")
    kw = rec.calls[-1]
    assert "max_new_tokens" not in kw and "temperature" not in kw  # the model's own values apply in generate
    # a value equal to the default is still set (transformers 5: GenerationConfig()'s fields are all None), so the
    # model's do_sample=False holds (transformers 4 took it as unset and sampled at 0.7); None is unset
    rec3 = _Recorder({"do_sample": False, "max_new_tokens": None})
    fastload.pipeline("text-generation", model=rec3, tokenizer=str(tokdir))("hello")
    kw3 = rec3.calls[-1]
    assert "do_sample" not in kw3 and "temperature" not in kw3 and kw3["max_new_tokens"] == 256
    rec2 = _Recorder()
    gc = fastload.GenerationConfig(max_new_tokens=5)
    before = copy.deepcopy(dict(gc))
    fastload.pipeline("text-generation", model=rec2, tokenizer=str(tokdir))("hello", generation_config=gc)
    sent = rec2.calls[-1]["generation_config"]
    assert sent is not gc and dict(gc) == before
    assert sent["max_new_tokens"] == 5 and sent["do_sample"] is True and sent["temperature"] == 0.7


def test_construction_time_generation_arguments(tokdir):
    rec = _Recorder()
    p = fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir), max_new_tokens=7, do_sample=False,
                          return_full_text=False)
    assert p("hello") == [{"generated_text": "hello hello"}]
    assert rec.calls[-1]["max_new_tokens"] == 7
    p("hello", max_new_tokens=3)
    assert rec.calls[-1]["max_new_tokens"] == 3


def test_batching_pads_left_and_needs_a_pad_token(tokdir):
    rec = _Recorder()
    p = fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir), do_sample=False)
    out = p(["hello", "hello world world"], batch_size=2)
    assert len(rec.calls) == 1
    assert rec.calls[0]["input_ids"].tolist() == [[3, 3, 1, 4], [1, 4, 5, 5]]
    assert rec.calls[0]["attention_mask"].tolist() == [[0, 0, 1, 1], [1, 1, 1, 1]]
    assert out == [[{"generated_text": "hello" + "hello hello"}], [{"generated_text": "hello world world" + "hello hello"}]]
    p.tokenizer.pad_token = None
    with pytest.raises(ValueError, match="pad_token"):
        p(["hello", "world"], batch_size=2)


def test_empty_prompt_starts_from_bos(tokdir):
    rec = _Recorder()
    p = fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir), do_sample=False)
    assert p("", add_special_tokens=False) == [{"generated_text": "hello hello"}]
    assert rec.calls[-1]["input_ids"].tolist() == [[1]]


def test_bad_arguments_raise(tokdir, pipe):
    rec = _Recorder()
    with pytest.raises(NotImplementedError, match="'text-generation'"):
        fastload.pipeline("summarization", model=rec, tokenizer=str(tokdir))
    with pytest.raises(TypeError, match="bogus"):
        fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir), bogus=1)
    with pytest.raises(ValueError, match="stop_sequence"):  # a string stops through stop_strings (test_api_edges)
        fastload.pipeline("text-generation", model=rec, tokenizer=str(tokdir))("hello", stop_sequence="")
    with pytest.raises(TypeError, match="bogus"):  # unknown call arguments reach generate, which refuses them
        pipe("hello", max_new_tokens=2, bogus=3)
    with pytest.raises(ValueError, match="batch_size"):
        pipe(["a"], batch_size=0)


def test_tiny_fixture_from_paths(tokdir):
    """model and tokenizer as paths (safetensors fixture, device/dtype passed to from_pretrained)."""
    p = fastload.pipeline("text-generation", model=str(model_dir("llama")), tokenizer=str(tokdir), device="cpu",
                          torch_dtype="float32")
    assert p.model.device == "cpu" and p.model.dtype == "float32"
    out = p("hello world", max_new_tokens=4, do_sample=False, return_tensors=True)
    ids = np.array([[1, 4, 5]])
    want = p.model.generate(ids, attention_mask=np.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=3)
    assert out == [{"generated_token_ids": want[0].tolist()}]
    p2 = fastload.pipeline(model=str(model_dir("llama")), tokenizer=str(tokdir), device=-1,
                           model_kwargs={"torch_dtype": "float32"})
    assert p2.task == "text-generation" and p2.model.device == "cpu"
    if not fastload.cuda.is_available():  # transformers: device=0 without an accelerator runs on the CPU
        p3 = fastload.pipeline("text-generation", model=str(model_dir("llama")), tokenizer=str(tokdir), device=0)
        assert p3.model.device == "cpu"


def test_gguf_path_loads_its_own_tokenizer(demo_gguf):
    p = fastload.pipeline("text-generation", model=demo_gguf, device_map="cpu", torch_dtype="float32")
    out = p("2+3=", max_new_tokens=2, do_sample=False)
    assert out[0]["generated_text"].startswith("2+3=")
