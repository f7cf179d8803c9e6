"""Round trips users write with transformers (docs "Share a model" / "Load pretrained instances":
tokenizer.save_pretrained(d) + model.save_pretrained(d), then from_pretrained(d)); tokenizer.encode with
return_tensors; `tokenizer.pad_token_id = tokenizer.eos_token_id` before batched generation (the usual fix for
models without a pad token). Adapted: the import and the model paths (the demo GGUF; the tiny Llama fixture)."""
import os

import numpy as np

import fastload as transformers
from golden_util import model_dir

AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer


def greedy_answer(model, tokenizer, question, max_new_tokens=32):
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer([text], return_tensors="np")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return tokenizer.batch_decode([o[len(i):] for i, o in zip(inputs.input_ids, out)], skip_special_tokens=True)[0]


def test_save_pretrained_round_trip_demo(model_path, model, tokenizer, tmp_path):
    save_directory = str(tmp_path / "saved")
    tokenizer.save_pretrained(save_directory)
    model.save_pretrained(save_directory)
    assert os.path.isfile(os.path.join(save_directory, "config.json"))
    assert any(f.endswith(".safetensors") for f in os.listdir(save_directory))
    tok2 = AutoTokenizer.from_pretrained(save_directory)
    model2 = AutoModelForCausalLM.from_pretrained(save_directory, torch_dtype="auto", device_map="cpu")
    assert str(model2.dtype).endswith(str(model.dtype).replace("torch.", ""))
    q = "What is the capital of France?"
    assert greedy_answer(model2, tok2, q) == greedy_answer(model, tokenizer, q)
    assert tok2.encode("Hello, world!") == tokenizer.encode("Hello, world!")
    assert tok2.eos_token_id == tokenizer.eos_token_id


def test_save_pretrained_round_trip_tiny(tmp_path):
    """A sharded bfloat16 checkpoint saved and reloaded gives the same logits, bit for bit."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cpu", torch_dtype="auto")
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path), device_map="cpu", torch_dtype="auto")
    ids = np.array([[1, 5, 77, 300, 12]])
    assert again.dtype == model.dtype
    assert np.array_equal(np.asarray(model(ids).logits), np.asarray(again(ids).logits))
    assert again.config["model_type"] == "llama"


def test_encode_return_tensors(tokenizer, tensors):
    ids = tokenizer.encode("Hello, how are you?", return_tensors=tensors.name)
    assert tensors.is_tensor(ids)
    n = len(tokenizer.encode("Hello, how are you?"))
    assert tuple(ids.shape) == (1, n)
    assert np.asarray(ids)[0].tolist() == tokenizer.encode("Hello, how are you?")


def test_pad_token_id_setter(model_path, model):
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.pad_token_id = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == tokenizer.eos_token_id and tokenizer.pad_token == tokenizer.eos_token
    tokenizer.padding_side = "left"
    inputs = tokenizer(["Hi", "The capital of France is"], return_tensors="np", padding=True)
    first = inputs["input_ids"][0].tolist()
    assert first[0] == tokenizer.eos_token_id and inputs["attention_mask"][0][0] == 0
    out = model.generate(**inputs, max_new_tokens=4, pad_token_id=tokenizer.pad_token_id, do_sample=False)
    assert out.shape == (2, inputs["input_ids"].shape[1] + 4) or out.shape[0] == 2
