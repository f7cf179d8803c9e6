"""The real demo model (SmolLM2-135M-Instruct, Q4_1 GGUF dequantised at load) against transformers'
own GGUF loading of the same file (tests/fixtures/smollm2_golden.*, made by tools/make_fixtures.py).

Tolerances, decided up front: float32 weights and activations: max |logit - ref| <= 1e-2 (the
reference's own fp32-vs-fp64 spread is 7e-5; logits reach ~39); greedy tokens exactly equal for the
whole reference continuation (32 tokens or up to eos), teacher-forced steps checked against the
measured error. float16 weights (the default for GGUF): max abs logit error <= 0.3, and greedy equal
wherever the reference margin exceeds twice fastload's error at that step."""
import os
import subprocess
import sys

import numpy as np
import pytest

import fastload
from golden_util import load_case, teacher_forced_check

CASE = load_case("smollm2")
PROMPTS = [p["key"] for p in CASE["meta"]["prompts"]]


@pytest.mark.parametrize("key", PROMPTS)
def test_last_logits(demo_model, key):
    ids = CASE[f"{key}_ids"]
    lg = demo_model(ids).logits[:, -4:]
    assert np.isfinite(lg).all()
    assert np.abs(lg - CASE[f"{key}_last_logits"]).max() <= 1e-2


@pytest.mark.parametrize("key", PROMPTS)
def test_greedy_equals_transformers(demo_model, key):
    ids, ref = CASE[f"{key}_ids"], CASE[f"{key}_greedy"]
    assert teacher_forced_check(demo_model, ids, ref, CASE[f"{key}_greedy_margins"])
    out = demo_model.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=2)
    np.testing.assert_array_equal(out, ref)


def test_padded_batch(demo_model):
    ids, mask = CASE["batch_ids"], CASE["batch_mask"]
    lg = demo_model(ids, attention_mask=mask).logits[:, -1]
    assert np.abs(lg - CASE["batch_last_logits"]).max() <= 1e-2
    out = demo_model.generate(ids, attention_mask=mask, max_new_tokens=32, eos_token_id=2, pad_token_id=2)
    np.testing.assert_array_equal(out, CASE["batch_greedy"])


def test_float16_default(demo_gguf):
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu")
    assert m.dtype == "float16"
    for key in PROMPTS:
        ids = CASE[f"{key}_ids"]
        assert np.abs(m(ids).logits[:, -4:] - CASE[f"{key}_last_logits"]).max() <= 0.3
        teacher_forced_check(m, ids, CASE[f"{key}_greedy"], CASE[f"{key}_greedy_margins"])


def test_chat_answers_five(demo_model, demo_tok):
    response, history = demo_model.chat(demo_tok, "What is 2+3?", history=[])
    assert "5" in response, response
    assert history == [("What is 2+3?", response)]
    again, history2 = demo_model.chat(demo_tok, "And 2+4?", history=history)
    assert len(history2) == 2 and isinstance(again, str)
    r3, h3 = demo_model.chat(demo_tok, "What is 2+3?", history=[{"role": "system", "content": "Be brief."}])
    assert h3[-1] == {"role": "assistant", "content": r3}


def test_stream_chat(demo_model, demo_tok):
    pieces = [r for r, _ in demo_model.stream_chat(demo_tok, "What is 2+3?", history=[])]
    assert pieces and "5" in pieces[-1]


def test_readme_example(demo_model, demo_tok):
    enc = demo_tok("Was ist 2+3? Antworte kurz.", return_tensors="np")
    out = demo_model.generate(**enc, max_new_tokens=20)
    assert out.shape[0] == 1 and out.shape[1] > enc["input_ids"].shape[1]
    assert isinstance(demo_tok.decode(out[0], skip_special_tokens=True), str)
    assert demo_model(enc["input_ids"]).logits.shape == (1, enc["input_ids"].shape[1], 49152)
    batch = demo_tok(["Hi", "What is the capital of France?"], return_tensors="np", padding=True)
    assert (batch["attention_mask"][0, 0] == 0) and batch["input_ids"].shape[0] == 2  # left padding
    out = demo_model.generate(**batch, max_new_tokens=8)
    assert out.shape[0] == 2


def test_text_streamers(demo_model, demo_tok, capsys):
    enc = demo_tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                       return_dict=True, return_tensors="np")
    demo_model.generate(**enc, max_new_tokens=16, streamer=fastload.TextStreamer(demo_tok, skip_prompt=True,
                                                                                  skip_special_tokens=True))
    assert "5" in capsys.readouterr().out
    import threading
    st = fastload.TextIteratorStreamer(demo_tok, skip_prompt=True, skip_special_tokens=True)
    t = threading.Thread(target=demo_model.generate, kwargs=dict(**enc, max_new_tokens=16, streamer=st))
    t.start()
    text = "".join(st)
    t.join()
    assert "5" in text


def test_cli_main_command(demo_gguf):
    """The README's main command (default model) answers with 5."""
    env = dict(os.environ, FASTLOAD_DEVICE="cpu")
    r = subprocess.run([sys.executable, "-m", "fastload", "generate", "--prompt", "What is 2+3?", "--max-new-tokens", "32"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "5" in r.stdout, r.stdout


def test_cli_beam_search(demo_gguf):
    """generate --num-beams 4 prints the best hypothesis (the API's num_beams=4 answer, decoded); with --sample it is a
    usage error (exit 2) before any model loads."""
    env = dict(os.environ, FASTLOAD_DEVICE="cpu")
    r = subprocess.run([sys.executable, "-m", "fastload", "generate", "--prompt", "What is the capital of France?",
                        "--max-new-tokens", "24", "--num-beams", "4"], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    tok = fastload.AutoTokenizer.from_pretrained(demo_gguf)
    m = fastload.AutoModelForCausalLM.from_pretrained(demo_gguf, device_map="cpu")
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=True, return_tensors="np")
    eos = m.generation_config.get("eos_token_id")
    eos = [] if eos is None else list(eos) if isinstance(eos, list) else [eos]
    if tok.eos_token_id not in eos:
        eos.append(tok.eos_token_id)
    out = m.generate(**enc, num_beams=4, max_new_tokens=24, eos_token_id=eos)
    want = tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    assert r.stdout.strip() == want.strip() and "Paris" in want, (r.stdout, want)
    r = subprocess.run([sys.executable, "-m", "fastload", "generate", "--prompt", "x", "--num-beams", "2", "--sample"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "--num-beams" in r.stderr, r.stderr
