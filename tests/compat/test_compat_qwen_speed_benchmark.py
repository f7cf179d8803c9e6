"""The core of Qwen's speed benchmark (QwenLM/Qwen2.5 examples/speed-benchmark/speed_benchmark_transformers.py,
SpeedBenchmarkTransformers.__init__ and .run), written as published. Adapted: the import (fastload for
transformers, fastload.cuda for torch.cuda), the model path, return_tensors, GENERATE_LENGTH_PER_EXPERIMENT
(2048 -> 16), DUMMY_INPUT ('我' is two tokens in SmolLM2's vocabulary, the script asserts one per character:
' the' is one), torch.cuda.synchronize() called only when CUDA is available (torch's own raises without CUDA,
so the published script is CUDA-only there), no CSV written.

Also the benchmark's older form, GenerationConfig(min_new_tokens=n, max_new_tokens=n) passed as
generation_config=, and the issue's silent-wrong-output case: GenerationConfig(max_new_tokens=...) alone must
keep the model's eos (transformers merges a passed config over the model's own)."""
import time

import numpy as np
import pytest

import fastload as transformers
from fastload import cuda as torch_cuda  # the script's torch.cuda

AutoModelForCausalLM, AutoTokenizer, GenerationConfig = (transformers.AutoModelForCausalLM, transformers.AutoTokenizer,
                                                         transformers.GenerationConfig)


class SpeedBenchmarkTransformers:
    SEED = 1024
    BATCH_SIZE = 1
    USE_FLASH_ATTN = True
    DEVICE_MAP = 'auto'
    TORCH_DTYPE = 'auto'
    GENERATE_LENGTH_PER_EXPERIMENT = 16
    DUMMY_INPUT = ' the'

    def __init__(self, model_id_or_path, return_tensors):
        transformers.set_seed(self.SEED)
        self.model_id_or_path = model_id_or_path
        self.return_tensors = return_tensors
        self.tokenizer = AutoTokenizer.from_pretrained(model_id_or_path, trust_remote_code=True)
        attn_impl = 'flash_attention_2' if self.USE_FLASH_ATTN else 'eager'
        self.model = AutoModelForCausalLM.from_pretrained(model_id_or_path,
                                                          torch_dtype=self.TORCH_DTYPE,
                                                          device_map=self.DEVICE_MAP,
                                                          attn_implementation=attn_impl
                                                          ).eval()
        self.generation_config = GenerationConfig.from_pretrained(model_id_or_path, trust_remote_code=True)

    def run(self, context_length: int) -> dict:
        self.generation_config.min_length = self.GENERATE_LENGTH_PER_EXPERIMENT + context_length
        self.generation_config.max_new_tokens = self.GENERATE_LENGTH_PER_EXPERIMENT
        print(f'Generation config: {self.generation_config}')

        batch_size = self.BATCH_SIZE
        context_str = self.DUMMY_INPUT * context_length
        inputs = self.tokenizer([context_str for _ in range(batch_size)], return_tensors=self.return_tensors)
        assert inputs['input_ids'].shape[1] == context_length
        assert inputs['input_ids'].shape[0] == batch_size
        inputs = inputs.to(self.model.device)

        start_time = time.time()
        if torch_cuda.is_available():
            torch_cuda.synchronize()
        pred = self.model.generate(**inputs, generation_config=self.generation_config)
        if torch_cuda.is_available():
            torch_cuda.synchronize()
        time_cost = time.time() - start_time
        assert pred.shape[1] == self.generation_config.min_length
        m = 0
        max_gpu_memory_cost = 0
        for i in range(torch_cuda.device_count()):
            m += torch_cuda.max_memory_allocated(i)
        max_gpu_memory_cost = max(max_gpu_memory_cost, m)
        torch_cuda.empty_cache()

        tokens_per_second: float = self.GENERATE_LENGTH_PER_EXPERIMENT / time_cost
        max_gpu_memory_cost_gb = max_gpu_memory_cost / 1024 / 1024 / 1024
        return {"model_id_or_path": self.model_id_or_path, "batch_size": batch_size,
                "context_length_per_experiment": context_length,
                "generate_length_per_experiment": self.GENERATE_LENGTH_PER_EXPERIMENT,
                "tokens_per_second": round(tokens_per_second, 4),
                "max_gpu_memory_cost_gb": round(max_gpu_memory_cost_gb, 4), "pred": pred}


@pytest.mark.parametrize("context_length", [1, 12])
def test_speed_benchmark_run(model_path, tensors, context_length):
    bench = SpeedBenchmarkTransformers(model_path, tensors.name)
    before = dict(bench.model.generation_config)
    data = bench.run(context_length)
    pred = data["pred"]
    assert tensors.is_tensor(pred)
    assert tuple(pred.shape) == (1, context_length + 16)  # exactly GENERATE_LENGTH_PER_EXPERIMENT new tokens
    assert data["tokens_per_second"] > 0 and data["max_gpu_memory_cost_gb"] >= 0
    assert dict(bench.model.generation_config) == before


def test_speed_benchmark_memory_report(model_path, model):
    """The torch.cuda memory calls such benchmarks make, with torch's meanings (0 where nothing is held)."""
    torch_cuda.reset_peak_memory_stats()
    n = 10
    inputs = AutoTokenizer.from_pretrained(model_path)([" the" * 4], return_tensors="np").to(model.device)
    t0 = time.perf_counter()
    if torch_cuda.is_available():
        torch_cuda.synchronize()
    out = model.generate(**inputs, generation_config=GenerationConfig(min_new_tokens=n, max_new_tokens=n))
    if torch_cuda.is_available():
        torch_cuda.synchronize()
    elapsed = time.perf_counter() - t0
    assert out.shape == (1, 4 + n) and elapsed > 0
    alloc, peak = torch_cuda.memory_allocated(), torch_cuda.max_memory_allocated()
    reserved, peak_reserved = torch_cuda.memory_reserved(), torch_cuda.max_memory_reserved()
    for v in (alloc, peak, reserved, peak_reserved):
        assert isinstance(v, int) and v >= 0
    assert peak >= alloc and peak_reserved >= reserved and reserved >= alloc and peak_reserved >= peak
    torch_cuda.empty_cache()
    assert torch_cuda.memory_allocated() <= alloc
    if torch_cuda.is_available():
        assert torch_cuda.device_count() >= 1 and isinstance(torch_cuda.get_device_name(0), str)
    else:
        assert torch_cuda.device_count() == 0


@pytest.mark.parametrize("n", [1, 8, 24])
def test_generation_config_min_and_max_new_tokens(model, tokenizer, tensors, n):
    """GenerationConfig(min_new_tokens=n, max_new_tokens=n): exactly n new tokens even where eos comes first."""
    msgs = [{"role": "user", "content": "What is 2+3?"}]  # answered in about 8 tokens, then eos
    inputs = tokenizer([tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)],
                       return_tensors=tensors.name).to(model.device)
    out = model.generate(**inputs, generation_config=GenerationConfig(min_new_tokens=n, max_new_tokens=n))
    assert tuple(out.shape) == (1, inputs["input_ids"].shape[1] + n)


def test_generation_config_max_new_tokens_keeps_the_models_eos(model, tokenizer, tensors):
    """The silent wrong output: a GenerationConfig that sets only max_new_tokens leaves eos_token_id unset,
    which must mean "the model's", so the answer stops at <|im_end|> instead of inventing the next turns."""
    msgs = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    model_inputs = tokenizer([text], return_tensors=tensors.name).to(model.device)
    before = dict(model.generation_config)
    generated_ids = model.generate(**model_inputs, generation_config=GenerationConfig(max_new_tokens=48))
    reference = model.generate(**model_inputs, max_new_tokens=48)
    generated_ids = [o[len(i):] for i, o in zip(model_inputs.input_ids, generated_ids)]
    response = tokenizer.batch_decode(generated_ids, skip_special_tokens=True)[0]
    new = np.asarray(generated_ids[0]).tolist()
    assert tokenizer.eos_token_id in new and len(new) < 48, f"ran past eos: {response!r}"
    assert "Paris" in response and "user" not in response and "assistant" not in response
    assert new == np.asarray(reference)[0, model_inputs["input_ids"].shape[1]:].tolist()
    assert dict(model.generation_config) == before
