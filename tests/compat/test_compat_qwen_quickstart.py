"""Qwen2.5's quickstart (QwenLM/Qwen2.5 README.md, "Quickstart" / the model cards' "Quickstart" section),
written as published; adapted in the import, the model path, return_tensors ("np", and "pt" where torch is
installed), max_new_tokens (512 -> 64 to keep CI fast) and the prompt ("... Answer in one sentence.":
the 135M demo model rambles past 512 tokens otherwise, so the eos check would say nothing)."""
import numpy as np

import fastload as transformers
from compat_util import assert_greedy_by_forward

AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer


def qwen_quickstart(model_name, return_tensors):
    model = AutoModelForCausalLM.from_pretrained(
        model_name,
        torch_dtype="auto",
        device_map="auto"
    )
    tokenizer = AutoTokenizer.from_pretrained(model_name)

    prompt = "Give me a short introduction to large language model. Answer in one sentence."
    messages = [
        {"role": "system", "content": "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."},
        {"role": "user", "content": prompt}
    ]
    text = tokenizer.apply_chat_template(
        messages,
        tokenize=False,
        add_generation_prompt=True
    )
    model_inputs = tokenizer([text], return_tensors=return_tensors).to(model.device)

    generated_ids = model.generate(
        **model_inputs,
        max_new_tokens=64
    )
    generated_ids = [
        output_ids[len(input_ids):] for input_ids, output_ids in zip(model_inputs.input_ids, generated_ids)
    ]

    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    return response, messages, generated_ids, model, tokenizer


def test_qwen_quickstart(model_path, tensors):
    response, messages, generated_ids, model, tokenizer = qwen_quickstart(model_path, tensors.name)
    assert tensors.is_tensor(generated_ids[0])
    # sane: an answer, stopped by the model's eos (<|im_end|>), no invented turns after it
    assert response.strip()
    assert "<|im_start|>" not in response and "<|im_end|>" not in response
    assert "\nuser\n" not in response and "\nassistant\n" not in response and not response.startswith("user\n")
    new = np.asarray(generated_ids[0]).tolist()
    eos = tokenizer.eos_token_id
    assert eos in new, "the answer did not stop at the model's eos within max_new_tokens"
    assert new.index(eos) == len(new) - 1
    # equals the greedy answer computed another way: chat template tokenised directly, argmax of forward logits
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    assert_greedy_by_forward(model, ids, new)
