"""Edges of the transformers-shaped API that a bug hunt (2026-12-06, thirty-eighth session) found wrong, each checked
against what transformers does (or a clear error where it would misbehave):
  - ids, masks and positions of 2**31 and more were narrowed to int32 and wrapped into valid-looking tokens;
  - do_sample with a temperature small enough to overflow float32 (logits / 1e-38) drew arbitrary tokens;
  - generate() without attention_mask on left-padded ids read the pads as text (transformers infers the mask);
  - apply_chat_template ignored padding / truncation / max_length and padded a batch of chats silently;
  - stop strings could not begin in the prompt (transformers' StopStringCriteria reads the whole sequence);
  - ChatGLM's chat took a history only in its own model's style;
  - generate stopped at the model's context without a word;
  - pipeline(stop_sequence=), GenerationConfig.validate(), model.can_generate(), float attention masks.
Tiny Llama fixture (tests/fixtures/llama, pad 0, eos 2, context 128) and the demo model; no torch."""
import sys
import warnings

import numpy as np
import pytest

import fastload
from golden_util import model_dir

LLAMA = model_dir("llama")


@pytest.fixture(scope="module")
def llama():
    return fastload.AutoModelForCausalLM.from_pretrained(str(LLAMA), device_map="cpu", torch_dtype="float32")


def greedy(m, ids, n=6, **kw):
    return m.generate(np.asarray(ids), max_new_tokens=n, do_sample=False, **kw)


@pytest.mark.parametrize("value,dtype", [(2 ** 32 + 5, np.int64), (2 ** 40, np.int64), (2 ** 63, np.uint64),
                                         (-(2 ** 31) - 1, np.int64)])
def test_ids_past_int32_are_refused_not_wrapped(llama, value, dtype):
    ids = np.array([[5, 6, 7]], dtype)
    ids[0, 1] = value
    for call in (lambda: llama(ids), lambda: greedy(llama, ids)):
        with pytest.raises(ValueError, match=r"input_ids\[0\]\[1\] = .* is out of range"):
            call()
    with pytest.raises(ValueError, match="attention_mask"):
        llama(np.array([[5, 6, 7]]), attention_mask=np.array([[1, 2 ** 32, 1]]))
    with pytest.raises(ValueError, match="suppress_tokens holds"):
        greedy(llama, [[5, 6, 7]], suppress_tokens=[2 ** 32 + 7])


def test_float_attention_mask_of_ones_and_zeros(llama):
    ids = np.array([[0, 0, 5, 6, 7]])
    m = np.array([[0, 0, 1, 1, 1]])
    want = greedy(llama, ids, attention_mask=m)
    np.testing.assert_array_equal(greedy(llama, ids, attention_mask=m.astype(np.float32)), want)
    with pytest.raises(TypeError, match="only 0 and 1"):
        greedy(llama, ids, attention_mask=m * 0.5)


@pytest.mark.parametrize("temperature", [1e-30, 1e-37, 2e-38, 1.2e-38])
def test_tiny_temperature_tends_to_greedy(demo_model, demo_tok, temperature):
    """logits / T overflowed float32 for T below ~1e-37 and made thousands of tokens +inf (the draw then any token);
    the limit T -> 0 is the greedy answer."""
    ids = demo_tok("The capital of France is", return_tensors="np")["input_ids"]
    want = demo_model.generate(ids, max_new_tokens=8, do_sample=False)
    got = demo_model.generate(ids, max_new_tokens=8, do_sample=True, temperature=temperature, seed=1)
    np.testing.assert_array_equal(got, want)


def test_temperature_below_float32_range_is_refused(llama):
    with pytest.raises(ValueError, match="too small to sample with"):
        llama.generate(np.array([[5, 6]]), max_new_tokens=2, do_sample=True, temperature=1e-40)


def test_mask_inferred_from_left_and_right_pads(llama):
    """transformers: without attention_mask, the pad token (when it is not an eos) marks padding. fastload masks the
    runs of it at either end of a row."""
    alone = greedy(llama, [[5, 6, 7, 8]])[0, 4:]
    left = np.array([[0, 0, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    out = greedy(llama, left, pad_token_id=0, eos_token_id=2)
    np.testing.assert_array_equal(out[0, 6:], alone)
    np.testing.assert_array_equal(out[1, 6:], greedy(llama, [[9, 10, 11, 12, 13, 14]])[0, 6:])
    # the pad inside a row is text; pad == eos: no inference (transformers' rule)
    inner = greedy(llama, [[5, 0, 7, 8]], pad_token_id=0, eos_token_id=2)
    np.testing.assert_array_equal(inner, greedy(llama, [[5, 0, 7, 8]], attention_mask=np.ones((1, 4), int)))
    same = greedy(llama, [[0, 5, 6]], pad_token_id=0, eos_token_id=0)
    np.testing.assert_array_equal(same, greedy(llama, [[0, 5, 6]], attention_mask=np.ones((1, 3), int),
                                               pad_token_id=0, eos_token_id=0))


def test_empty_row_error_names_no_mask(llama):
    with pytest.raises(ValueError, match=r"input row 0 has no token$"):
        llama.generate(np.zeros((1, 0), np.int64), max_new_tokens=2)


def test_context_cap_warns(llama):
    prompt = (np.arange(117) % 500 + 3)[None]
    with pytest.warns(UserWarning, match="passes the model's context of 128 tokens"):
        out = llama.generate(prompt, max_new_tokens=30, do_sample=False, eos_token_id=None)
    assert out.shape[1] == 128
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        llama.generate(prompt, max_new_tokens=11, do_sample=False, eos_token_id=None)


def test_stop_string_may_begin_in_the_prompt(demo_model, demo_tok):
    ids = demo_tok("The capital of France is", return_tensors="np")["input_ids"]
    T = ids.shape[1]
    full = demo_model.generate(ids, max_new_tokens=8, do_sample=False)
    first = demo_tok.decode(full[0, T:T + 1])
    assert first.strip()  # " Paris" on the demo model
    for stop in ["is" + first, "France is" + first, first]:
        out = demo_model.generate(ids, max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=demo_tok)
        assert out.shape[1] == T + 1, stop
    # wholly inside the prompt: never a stop
    out = demo_model.generate(ids, max_new_tokens=8, do_sample=False, stop_strings=["capital"], tokenizer=demo_tok)
    np.testing.assert_array_equal(out, full)


CHATS = [[{"role": "user", "content": "Hi"}],
         [{"role": "user", "content": "Tell me about the capital of France in one short sentence."}]]


def test_chat_template_padding_truncation(demo_tok):
    full = demo_tok.apply_chat_template(CHATS[1], add_generation_prompt=True)
    assert len(full) > 10
    assert demo_tok.apply_chat_template(CHATS[1], add_generation_prompt=True, truncation=True, max_length=5) == full[:5]
    d = demo_tok.apply_chat_template(CHATS[1], add_generation_prompt=True, truncation=True, max_length=5,
                                     return_dict=True, return_tensors="np")
    assert d["input_ids"].shape == (1, 5) and d["attention_mask"].shape == (1, 5)
    # a batch: ragged lists by default (transformers' padding=False), an error for tensors, padded when asked
    ragged = demo_tok.apply_chat_template(CHATS, add_generation_prompt=True)
    assert [len(r) for r in ragged] == [len(demo_tok.apply_chat_template(c, add_generation_prompt=True)) for c in CHATS]
    with pytest.raises(ValueError):
        demo_tok.apply_chat_template(CHATS, add_generation_prompt=True, return_tensors="np")
    p = demo_tok.apply_chat_template(CHATS, add_generation_prompt=True, padding="max_length", max_length=64,
                                     return_dict=True, return_tensors="np")
    assert p["input_ids"].shape == (2, 64) and p["attention_mask"].sum(axis=1).tolist() == [len(r) for r in ragged]


def test_continue_final_message_rules(demo_tok):
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How "}]
    text = demo_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True)
    assert text.endswith("<|im_start|>assistant\nHello! How ")  # this template keeps the message as it is
    trimmed = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] | trim }}</s>{% endfor %}"
    text = demo_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True, chat_template=trimmed)
    assert text.endswith("<assistant>Hello! How")  # one that trims it: cut at the stripped content (transformers)
    with pytest.raises(ValueError, match="not compatible"):
        demo_tok.apply_chat_template(msgs, tokenize=False, continue_final_message=True, add_generation_prompt=True)


def test_chatglm_history_in_either_style():
    root = LLAMA.parent / "chatglm"
    pairs = [("What is 2+3?", "5")]
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "5"}]
    for v in (2, 3):
        tok = fastload.AutoTokenizer.from_pretrained(str(root / f"chatglm{v}"), trust_remote_code=True)
        m = fastload.AutoModel.from_pretrained(str(root / f"chatglm{v}"), trust_remote_code=True)
        a, ha = m.chat(tok, "And 4+4?", history=pairs, do_sample=False, max_new_tokens=3)
        b, hb = m.chat(tok, "And 4+4?", history=msgs, do_sample=False, max_new_tokens=3)
        assert a == b and ha == hb  # the model's own style either way
        assert all(isinstance(h, tuple) for h in ha) if v == 2 else all(isinstance(h, dict) for h in ha)
        with pytest.raises(ValueError, match="history items must be"):
            m.chat(tok, "x", history=["not a turn"], max_new_tokens=1)
    tok2 = fastload.AutoTokenizer.from_pretrained(str(root / "chatglm2"), trust_remote_code=True)
    assert tok2.build_prompt("q", msgs) == tok2.build_prompt("q", pairs)
    with pytest.raises(ValueError, match="no system prompt"):
        tok2.build_prompt("q", [{"role": "system", "content": "s"}])


def test_pipeline_stop_sequence(demo_model, demo_tok):
    pipe = fastload.pipeline("text-generation", model=demo_model, tokenizer=demo_tok)
    out = pipe("The capital of France is", max_new_tokens=20, do_sample=False, stop_sequence=".")
    text = out[0]["generated_text"]
    assert text.endswith(".") and text.count(".") == 1, text


def test_small_api_pieces(llama):
    assert llama.can_generate() is True
    fastload.GenerationConfig(max_new_tokens=3, temperature=0.5).validate()
    with pytest.raises(ValueError, match="top_p"):
        fastload.GenerationConfig(top_p=2.0, do_sample=True).validate()
    fastload.GenerationConfig(num_beams=2, length_penalty=0.5, early_stopping="never").validate()
    with pytest.raises(NotImplementedError, match="num_beams"):
        fastload.GenerationConfig(num_beams=2, do_sample=True).validate()


def test_thread_counts_out_of_range_are_refused(monkeypatch):
    """threads= / FASTLOAD_THREADS past 4x the CPUs (at least 64), or negative, are refused naming the setting:
    libgomp answers a thread it cannot create by exiting the process (100000 did, or segfaulted)."""
    from fastload import _C
    from fastload.config import max_cpu_threads
    path = str(model_dir("llama"))
    for bad in (max_cpu_threads() + 1, 100000, -7):
        with pytest.raises(ValueError, match=rf"threads={bad} is out of range"):
            fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", threads=bad)
    with pytest.raises(TypeError, match="threads=2.5"):
        fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", threads=2.5)
    monkeypatch.setenv("FASTLOAD_THREADS", "100000")
    with pytest.raises(ValueError, match="FASTLOAD_THREADS=100000"):
        fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    monkeypatch.delenv("FASTLOAD_THREADS")
    cfg = {"vocab": 8, "d": 8, "n_layers": 1, "n_heads": 2, "n_kv_heads": 2, "head_dim": 4, "ffn": 8}
    with pytest.raises(ValueError, match="threads=5000"):  # the core's own bound
        _C.Model(cfg, threads=5000)
    assert fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", threads=1).load_stats["threads"] == 1


def test_counts_past_int32_mean_no_limit(llama):
    """max_new_tokens / max_length / min_new_tokens / top_k / no_repeat_ngram_size past int32 (what the core takes)
    mean the same as any value past the context or the vocabulary: clamped, where they raised a bare OverflowError;
    num_return_sequences past it is refused naming it."""
    ids = np.array([[1, 5, 9]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        want = llama.generate(ids, max_new_tokens=10 ** 6, eos_token_id=[])
        for kw in (dict(max_new_tokens=2 ** 31), dict(max_length=2 ** 40), dict(max_new_tokens=2 ** 40,
                                                                                 min_new_tokens=2 ** 33)):
            assert np.array_equal(llama.generate(ids, eos_token_id=[], **kw), want), kw
        assert np.array_equal(llama.generate(ids, max_new_tokens=4, top_k=2 ** 40, no_repeat_ngram_size=2 ** 40),
                              llama.generate(ids, max_new_tokens=4))
    with pytest.raises(ValueError, match="num_return_sequences must be <= 2147483647"):
        llama.generate(ids, do_sample=True, num_return_sequences=2 ** 31)


def test_tokenizer_subfolder(tmp_path):
    """AutoTokenizer.from_pretrained(path, subfolder=) reads path/subfolder, as the model's loader does; it was
    ignored (the root's tokenizer came back, a wrong vocabulary with no error), and a missing one is refused."""
    from test_evaluate import byte_tokenizer_json
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tokenizer.json").write_text(byte_tokenizer_json(), encoding="utf-8")
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    root = fastload.AutoTokenizer.from_pretrained(str(tmp_path))
    sub = fastload.AutoTokenizer.from_pretrained(str(tmp_path), subfolder="sub")
    assert len(sub) != len(root) and len(sub) == len(fastload.AutoTokenizer.from_pretrained(str(tmp_path / "sub")))
    with pytest.raises(FileNotFoundError, match="no such subfolder"):
        fastload.AutoTokenizer.from_pretrained(str(tmp_path), subfolder="nope")
    with pytest.raises(fastload.CheckpointError, match="subfolder"):
        fastload.AutoTokenizer.from_pretrained(str(tmp_path), subfolder="../x")


def test_no_length_anywhere_means_twenty_new_tokens(llama):
    """transformers 5: with max_length set nowhere (call, passed config, model config) and no max_new_tokens, the
    default 20 counts new tokens (with its warning), a long prompt included; fastload took it as the total (a
    6-token prompt got 14, one of 20 tokens raised). An explicit max_length stays the total."""
    short, long_ = np.array([[1, 5, 9, 4, 7, 3]]), np.arange(3, 33)[None]
    assert "max_length" not in llama.generation_config.to_diff_dict()  # the fixture sets no length
    for ids in (short, long_):
        with pytest.warns(UserWarning, match="model-agnostic default `max_length`"):
            out = llama.generate(ids, eos_token_id=[])
        assert out.shape[1] - ids.shape[1] == 20
        assert np.array_equal(out, llama.generate(ids, max_new_tokens=20, eos_token_id=[]))
    assert llama.generate(short, max_length=10, eos_token_id=[]).shape == (1, 10)
    with pytest.raises(ValueError, match="max_length=20"):
        llama.generate(long_, max_length=20)
    with pytest.warns(UserWarning, match="model-agnostic"):  # capped at max_position_embeddings (128)
        assert llama.generate(np.arange(3, 121)[None], eos_token_id=[]).shape == (1, 128)


def test_renormalize_logits_makes_scores_log_probabilities(llama):
    """renormalize_logits=True: output_scores are log-softmax normalised (transformers' LogitNormalization after
    every processor), so compute_transition_scores gives log-probabilities; it was accepted and ignored. The
    tokens do not change."""
    ids = np.array([[1, 5, 9, 4]])
    kw = dict(max_new_tokens=4, eos_token_id=[], return_dict_in_generate=True, output_scores=True)
    raw = llama.generate(ids, **kw)
    norm = llama.generate(ids, renormalize_logits=True, **kw)
    assert np.array_equal(raw.sequences, norm.sequences)
    for r, n in zip(raw.scores, norm.scores):
        x = r.astype(np.float64)
        want = x - (x.max() + np.log(np.exp(x - x.max()).sum(axis=-1, keepdims=True)))
        np.testing.assert_allclose(n, want, rtol=0, atol=1e-5)
    tr = llama.compute_transition_scores(norm.sequences, norm.scores)
    assert (tr <= 0).all()
    np.testing.assert_allclose(tr, llama.compute_transition_scores(raw.sequences, raw.scores, normalize_logits=True),
                               atol=1e-5)


def test_generate_without_input_ids_starts_from_bos(llama):
    """generate() with no input_ids (unconditional generation, GPT-2 style examples) starts from [[bos_token_id]],
    the merged config's, as transformers; it was a ValueError."""
    want = llama.generate(np.array([[1]]), max_new_tokens=5, eos_token_id=[])
    assert np.array_equal(llama.generate(max_new_tokens=5, eos_token_id=[]), want)
    assert llama.generate(max_new_tokens=3, eos_token_id=[], bos_token_id=7)[0, 0] == 7


# ---- a bug hunt of forward / generate against transformers 5.25 (2026-12-06, fortieth session) ----------------
def test_forward_return_dict_false_is_a_tuple(llama):
    """return_dict=False was accepted and ignored: `loss, logits = model(..., return_dict=False)` unpacked the
    output's key names ('loss', 'logits')."""
    ids = np.array([[5, 6, 7, 8, 9]])
    out = llama(ids, labels=ids)
    loss, logits = llama(ids, labels=ids, return_dict=False)
    assert isinstance(loss, np.ndarray) and loss.shape == () and np.array_equal(loss, out.loss)
    assert np.array_equal(logits, out.logits)
    (only,) = llama(ids, return_dict=False)
    assert np.array_equal(only, out.logits)
    assert llama(ids, return_dict=True).logits.shape == out.logits.shape


def test_forward_takes_token_type_ids(llama):
    """Some tokenizers return token_type_ids, and model(**tok(...)) passes them on: ignored, as by transformers'
    decoder-only models (an array raised 'truth value of an array is ambiguous')."""
    ids = np.array([[5, 6, 7]])
    got = llama(ids, token_type_ids=np.zeros_like(ids), attention_mask=np.ones_like(ids)).logits
    assert np.array_equal(got, llama(ids).logits)
    with pytest.raises(TypeError, match="output_hidden_states"):
        llama(ids, output_hidden_states=True)


def test_loss_from_torch_like_inputs_is_0_d(monkeypatch):
    """With torch inputs the loss came back with shape [1] (np.ascontiguousarray of a 0-d array): f"{loss:.3f}"
    raised. The conversion keeps 0-d (a stand-in torch module here: CI has no torch)."""
    from fastload import modeling
    fake = type(sys)("torch")
    fake.from_numpy = lambda a: a
    monkeypatch.setitem(sys.modules, "torch", fake)
    assert modeling._to_user(np.float32(2.5), True).shape == ()
    assert modeling._to_user(np.asarray(2.5, np.float32), True).shape == ()
    assert modeling._to_user(np.ones((3, 4))[:, ::2], True).flags.c_contiguous


def test_generate_refuses_inputs_and_input_ids_together(llama):
    with pytest.raises(ValueError, match="both passed"):
        llama.generate(input_ids=np.array([[5, 6]]), inputs=np.array([[7, 8]]), max_new_tokens=2)
    a = llama.generate(inputs=np.array([[5, 6]]), max_new_tokens=2, do_sample=False)
    assert np.array_equal(a, greedy(llama, [[5, 6]], n=2))


def test_right_padding_warns_and_continues_from_the_real_tokens(llama):
    """transformers generates after a right-padded row's pads (and warns); fastload reads the unmasked tokens, so the
    row continues as it would alone: it warns that it differs."""
    ids = np.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.warns(UserWarning, match="right-padding was detected"):
        out = greedy(llama, ids, attention_mask=mask, pad_token_id=0, eos_token_id=2)
    np.testing.assert_array_equal(out[1, 4:], greedy(llama, [[9, 10]], eos_token_id=2)[0, 2:])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        greedy(llama, np.array([[5, 6, 7, 8], [0, 0, 9, 10]]), attention_mask=np.array([[1, 1, 1, 1], [0, 0, 1, 1]]),
               pad_token_id=0, eos_token_id=2)  # left padding: no warning


def test_config_reads_as_transformers_config():
    """config.dtype is the dtype the model was loaded in (it kept config.json's), and the PretrainedConfig
    attributes ported scripts read exist: torch_dtype, name_or_path / _name_or_path, is_encoder_decoder."""
    m = fastload.AutoModelForCausalLM.from_pretrained(str(LLAMA), device_map="cpu", torch_dtype="float16")
    assert m.config.dtype == "float16" and m.config.torch_dtype == "float16"
    assert m.config.name_or_path == m.config._name_or_path == str(LLAMA)
    assert m.config.is_encoder_decoder is False and m.config.use_return_dict is True
    with pytest.raises(AttributeError):
        m.config.no_such_key


def test_generation_config_stop_strings_and_max_time_read_none():
    gc = fastload.GenerationConfig()
    assert gc.stop_strings is None and gc.max_time is None
    assert fastload.GenerationConfig(max_time=2.0).max_time == 2.0


def test_chat_takes_stop_strings(demo_model, demo_tok):
    """chat / stream_chat / response with stop_strings: generate needs the tokenizer for them, and chat's own
    tokenizer argument was not passed on (without tokenizer=: 'stop_strings need the tokenizer'; with it: 'got multiple
    values for argument tokenizer')."""
    q = "Count from 1 to 20."
    full = demo_model.chat(demo_tok, q, max_new_tokens=40, do_sample=False)[0]
    assert "5" in full and full.index("5") < len(full) - 5
    cut = demo_model.chat(demo_tok, q, max_new_tokens=40, do_sample=False, stop_strings=["5"])[0]
    assert cut.endswith("5") and full.startswith(cut) and len(cut) < len(full)
    *_, (streamed, _) = demo_model.stream_chat(demo_tok, q, max_new_tokens=40, do_sample=False, stop_strings=["5"])
    assert streamed == cut
    for v in (2, 3):  # ChatGLM's own tokenizers take the same path (_glm_inputs)
        root = LLAMA.parent / "chatglm" / f"chatglm{v}"
        tok = fastload.AutoTokenizer.from_pretrained(str(root), trust_remote_code=True)
        m = fastload.AutoModel.from_pretrained(str(root), trust_remote_code=True)
        whole = m.chat(tok, "x", do_sample=False, max_new_tokens=6)[0]
        stop = whole[len(whole) // 2:len(whole) // 2 + 1] if whole.strip() else "z"
        part = m.chat(tok, "x", do_sample=False, max_new_tokens=6, stop_strings=[stop])[0]
        assert whole.startswith(part) and (stop not in whole or stop in part)


# ---------------------------------------------------------------- hunt 26 / 27 (44th session): generate and config
def test_a_stop_string_also_in_the_prompts_end_still_stops(demo_tok):
    """A fresh occurrence completed by the new token stops even when the same string is in the window before it
    (the check was "in the text now and not before", so the prompt's copy hid it). generate's stop check itself."""
    from fastload.engine import _StopCheck
    prompt = demo_tok("we saw Paris and then", add_special_tokens=False)["input_ids"]
    paris = demo_tok(" Paris", add_special_tokens=False)["input_ids"]
    assert len(paris) == 1
    c = _StopCheck([" Paris"], demo_tok, prompt)
    assert c.hit(paris[0])
    c = _StopCheck([" Paris"], demo_tok, prompt)
    assert not c.hit(demo_tok(" Rome", add_special_tokens=False)["input_ids"][0])
    c = _StopCheck(["then Paris"], demo_tok, prompt)  # begun in the prompt, completed by the token
    assert c.hit(paris[0])
    c = _StopCheck(["saw"], demo_tok, prompt)  # wholly in the prompt: never
    assert not c.hit(paris[0])


def test_bad_words_that_are_eos_are_dropped_as_transformers(llama):
    """NoBadWordsLogitsProcessor drops a one-token bad word equal to an eos id (eos 2 here); others are banned."""
    ids = np.array([[1, 5, 9, 44]])
    kw = dict(max_new_tokens=2, do_sample=False, output_scores=True, return_dict_in_generate=True)
    plain = llama.generate(ids, **kw).scores[0]
    s = llama.generate(ids, bad_words_ids=[[2], [7]], **kw).scores[0]
    assert np.isfinite(s[0, 2]) and s[0, 2] == plain[0, 2] and s[0, 7] == -np.inf
    assert llama.generate(ids, bad_words_ids=[[2]], eos_token_id=3, **kw).scores[0][0, 2] == -np.inf  # not eos there


def test_encoder_no_repeat_ngram_size_is_refused(llama):
    """transformers applies it to a decoder-only model's prompt; fastload does not implement it: refused when set."""
    with pytest.raises(TypeError, match="encoder_no_repeat_ngram_size=2"):
        greedy(llama, [[1, 5, 9]], encoder_no_repeat_ngram_size=2)
    greedy(llama, [[1, 5, 9]], encoder_no_repeat_ngram_size=0)


def test_neutral_generate_objects_are_accepted_custom_ones_refused(llama):
    ids = [[1, 5, 9]]
    want = greedy(llama, ids)
    for kw in (dict(logits_processor=None), dict(logits_processor=[]), dict(stopping_criteria=None),
               dict(stopping_criteria=()), dict(prefix_allowed_tokens_fn=None), dict(assistant_model=None),
               dict(negative_prompt_ids=None), dict(synced_gpus=False)):
        np.testing.assert_array_equal(greedy(llama, ids, **kw), want, err_msg=str(kw))
    for kw in (dict(logits_processor=[lambda ids, scores: scores]), dict(stopping_criteria=[object()]),
               dict(prefix_allowed_tokens_fn=lambda b, ids: [1])):
        with pytest.raises(TypeError, match=list(kw)[0]):
            greedy(llama, ids, **kw)


def test_generate_output_has_transformers_525_cache_field(llama):
    out = llama.generate(np.array([[1, 5]]), max_new_tokens=2, return_dict_in_generate=True)
    assert out.cache is None and out.past_key_values is None and "cache" not in out


def test_num_beams_in_generation_config_json_is_beam_search(tmp_path):
    """num_beams from the model's generation_config.json is beam search, as in transformers (it warned and ran greedy
    before beam search existed); num_beams=1 passed by the caller turns it off."""
    import shutil
    d = tmp_path / "m"
    shutil.copytree(LLAMA, d)
    (d / "generation_config.json").write_text('{"num_beams": 4, "eos_token_id": 2}')
    m = fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cpu", torch_dtype="float32")
    ref = fastload.AutoModelForCausalLM.from_pretrained(str(LLAMA), device_map="cpu", torch_dtype="float32")
    np.testing.assert_array_equal(greedy(m, [[1, 5, 9]]), greedy(ref, [[1, 5, 9]], num_beams=4))
    np.testing.assert_array_equal(greedy(m, [[1, 5, 9]], num_beams=1), greedy(ref, [[1, 5, 9]]))


def _variant(tmp_path, src, name, edit):
    import json
    import shutil
    d = tmp_path / name
    shutil.copytree(src, d)
    cfg = json.loads((d / "config.json").read_text())
    edit(cfg)
    (d / "config.json").write_text(json.dumps(cfg))
    return str(d)


def test_max_position_override_keeps_the_rope_original_length(tmp_path):
    """transformers fills llama3's / yarn's original length from config.json's max_position_embeddings before a
    from_pretrained(max_position_embeddings=) argument applies: the argument does not move it."""
    ids = np.arange(1, 100)[None] % 400
    for rs in ({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
               {"rope_type": "yarn", "factor": 4.0}):
        def no_orig(c, rs=rs):
            c.pop("rope_parameters", None)
            c["rope_scaling"] = rs
            c["rope_theta"] = 10000.0
        a = _variant(tmp_path, LLAMA, "a" + rs["rope_type"], no_orig)
        b = _variant(tmp_path, LLAMA, "b" + rs["rope_type"],
                     lambda c, rs=rs: (no_orig(c), c["rope_scaling"].update(original_max_position_embeddings=c["max_position_embeddings"])))
        ma = fastload.AutoModelForCausalLM.from_pretrained(a, device_map="cpu", torch_dtype="float32", max_position_embeddings=64)
        mb = fastload.AutoModelForCausalLM.from_pretrained(b, device_map="cpu", torch_dtype="float32", max_position_embeddings=64)
        assert ma.config["rope_scaling"]["original_max_position_embeddings"] == 128
        np.testing.assert_array_equal(np.asarray(ma(ids).logits), np.asarray(mb(ids).logits))


def test_chatglm_config_arguments_reach_its_own_keys(tmp_path):
    from golden_util import FIXTURES
    src = FIXTURES / "chatglm" / "chatglm3"
    ids = np.array([[5, 17, 230, 9, 44, 61, 8, 100, 300, 7] * 3])
    m = fastload.AutoModelForCausalLM.from_pretrained(str(src), device_map="cpu", torch_dtype="float32", rope_theta=123.0)
    ref = fastload.AutoModelForCausalLM.from_pretrained(
        _variant(tmp_path, src, "glm", lambda c: c.update(rope_ratio=0.0123)), device_map="cpu", torch_dtype="float32")
    np.testing.assert_array_equal(np.asarray(m(ids).logits), np.asarray(ref(ids).logits))
    plain = fastload.AutoModelForCausalLM.from_pretrained(str(src), device_map="cpu", torch_dtype="float32")
    assert not np.allclose(np.asarray(m(ids).logits), np.asarray(plain(ids).logits))
    for k in ("rope_scaling", "rope_parameters"):
        with pytest.raises(NotImplementedError, match=k):
            fastload.AutoModelForCausalLM.from_pretrained(str(src), device_map="cpu", **{k: {"rope_type": "linear", "factor": 2.0}})
