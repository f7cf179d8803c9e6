"""GenerationConfig objects as scripts use them (transformers docs "Generation strategies" / "Text generation":
GenerationConfig.from_pretrained(model, ...) with the hub arguments from_pretrained takes, modify, pass as
generation_config=; Qwen's speed benchmark passes trust_remote_code=True). Adapted: the import and the model
paths (a directory with generation_config.json: the tiny Llama fixture; the demo .gguf file)."""
import numpy as np

import fastload as transformers
from golden_util import model_dir

GenerationConfig = transformers.GenerationConfig
LLAMA = str(model_dir("llama"))


def test_generation_config_from_directory_with_hub_arguments():
    gc = GenerationConfig.from_pretrained(LLAMA, trust_remote_code=True, revision="main")
    assert (gc.bos_token_id, gc.eos_token_id, gc.pad_token_id) == (1, 2, 0)
    model = transformers.AutoModelForCausalLM.from_pretrained(LLAMA, device_map="cpu", torch_dtype="float32")
    before = dict(model.generation_config)
    gc.max_new_tokens = 5
    gc.eos_token_id = None  # random weights: run the full length
    ids = np.array([[1, 17, 42, 99]])
    out = model.generate(ids, generation_config=gc)
    assert out.shape == (1, 9)
    assert dict(model.generation_config) == before
    assert np.array_equal(out, model.generate(ids, max_new_tokens=5, eos_token_id=None))


def test_generation_config_from_gguf(model_path, model, tokenizer, tensors):
    """A .gguf path reads its generation settings (eos/bos/pad from the metadata) as from_pretrained does."""
    gc = GenerationConfig.from_pretrained(model_path, trust_remote_code=True, revision="main")
    assert gc.eos_token_id == tokenizer.eos_token_id == model.generation_config.eos_token_id
    before = dict(model.generation_config)
    gc.max_new_tokens = 40
    gc.do_sample = False
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer([tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)],
                       return_tensors=tensors.name)
    out = model.generate(**inputs, generation_config=gc)
    new = np.asarray(out)[0, inputs["input_ids"].shape[1]:].tolist()
    assert new[-1] == tokenizer.eos_token_id and len(new) < 40
    assert "Paris" in tokenizer.decode(new, skip_special_tokens=True)
    assert dict(model.generation_config) == before


def test_generation_config_modified_field_by_field(model, tokenizer):
    """Each field set on a fresh GenerationConfig changes only itself: the model's eos stays."""
    before = dict(model.generation_config)
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    ids = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="np")
    ref = model.generate(ids, max_new_tokens=30)
    for gc in (GenerationConfig(max_new_tokens=30, do_sample=False),
               GenerationConfig(max_new_tokens=30, top_k=50, top_p=1.0, temperature=1.0, repetition_penalty=1.0)):
        out = model.generate(ids, generation_config=gc)
        assert np.array_equal(out, ref), f"{dict(gc)} changed the answer"
    gc = GenerationConfig(max_new_tokens=30, eos_token_id=None)
    assert model.generate(ids, generation_config=gc, eos_token_id=tokenizer.eos_token_id).shape == ref.shape
    assert dict(model.generation_config) == before
