"""fastload.pipeline("text-generation", model=..., tokenizer=...) as transformers' docs use it
(docs/source/en/pipeline_tutorial.md, conversations.md, the TextGenerationPipeline docstring): a string, a list of
strings, a chat message list; transformers' output shapes ([{"generated_text": str}], [[...], [...]],
[{"generated_text": messages + [assistant message]}]), return_full_text=False. Adapted: the import and the
model path; do_sample=False and a short max_new_tokens passed (the pipeline's default samples 256 tokens)."""
import numpy as np

import fastload as transformers


def new_text(model, tokenizer, ids, max_new_tokens):
    out = np.asarray(model.generate(np.asarray([ids]), max_new_tokens=max_new_tokens, do_sample=False))
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_pipeline_string(model_path, model, tokenizer):
    generator = transformers.pipeline("text-generation", model=model_path, tokenizer=model_path)
    prompt = "The capital of France is"
    out = generator(prompt, max_new_tokens=10, do_sample=False)
    assert isinstance(out, list) and len(out) == 1 and set(out[0]) == {"generated_text"}
    want = new_text(model, tokenizer, tokenizer(prompt)["input_ids"], 10)
    assert out[0]["generated_text"] == prompt + want
    out = generator(prompt, max_new_tokens=10, do_sample=False, return_full_text=False)
    assert out == [{"generated_text": want}]
    outs = generator([prompt, "Two plus three equals"], max_new_tokens=10, do_sample=False)
    assert isinstance(outs, list) and len(outs) == 2 and all(isinstance(o, list) and len(o) == 1 for o in outs)
    assert outs[0][0]["generated_text"] == prompt + want
    assert outs[1][0]["generated_text"].startswith("Two plus three equals")


def test_pipeline_chat(model_path, model, tokenizer):
    pipe = transformers.pipeline("text-generation", model=model_path, tokenizer=model_path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    out = pipe(messages, max_new_tokens=20, do_sample=False)
    assert isinstance(out, list) and len(out) == 1
    chat = out[0]["generated_text"]
    assert chat[:-1] == messages and chat[-1]["role"] == "assistant"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert chat[-1]["content"] == new_text(model, tokenizer, ids, 20)
    assert "Paris" in chat[-1]["content"] and "<|im_end|>" not in chat[-1]["content"]
    # a conversation continued with the pipeline's own output
    follow = chat + [{"role": "user", "content": "And of Germany?"}]
    out2 = pipe(follow, max_new_tokens=4, do_sample=False)
    assert out2[0]["generated_text"][:-1] == follow and out2[0]["generated_text"][-1]["role"] == "assistant"


def test_pipeline_with_loaded_objects(model, tokenizer):
    """pipeline(task, model=<loaded model>, tokenizer=<loaded tokenizer>) as well as paths."""
    pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = pipe("The capital of France is", max_new_tokens=5, do_sample=False)
    assert out[0]["generated_text"].startswith("The capital of France is")
