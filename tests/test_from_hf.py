"""fastload.from_hf: a fastload model built from a transformers model in memory (fastload/from_hf.py).

Needs torch and transformers (skipped without them; CI has neither): run with the reference environment,
    PYTHONPATH=. /opt/tv/bin/python -m pytest -q tests/test_from_hf.py
GPU cases skip without a CUDA device (and a CUDA build of fastload)."""
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import fastload  # noqa: E402
from golden_util import FIXTURES, TINY_MODELS, assert_greedy_match, assert_logits_close, load_case, model_dir  # noqa: E402

ATOL = 2e-3  # tests/fixtures/README.md: tiny models, float32 activations, same stored weights


def hf_model(name, dtype=torch.float32, device="cpu"):
    m = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), dtype=dtype,
                                                          attn_implementation="eager")
    return m.to(device).eval()


def gpu_ok():
    return torch.cuda.is_available() and fastload.info()["backends"][-1] == "cuda" and \
        fastload._C.build_info()["cuda_devices"] > 0


@pytest.mark.parametrize("name", TINY_MODELS)
def test_cpu_float32_equals_golden(name):
    c = load_case(name)
    m = fastload.from_hf(hf_model(name))
    assert str(m.device) == "cpu" and str(m.dtype) == "float32"
    assert_logits_close(m(c["single_ids"]).logits, c["single_logits"], atol=ATOL)
    assert_logits_close(m(input_ids=c["batch_ids"], attention_mask=c["batch_mask"]).logits, c["batch_logits"],
                        atol=ATOL, where=c["batch_mask"])
    assert_greedy_match(m.generate(c["single_ids"], max_new_tokens=16, do_sample=False, eos_token_id=None),
                        c["single_greedy"], c["single_ids"].shape[1])
    st = m.load_stats["from_hf"]
    assert st["host_to_host"] > 0 and st["device_to_device"] == 0 and st["via_host"] == 0


def test_cpu_equals_from_pretrained_bit_for_bit():
    """The same float32 values reach the core from torch's memory as from the file: identical logits."""
    c = load_case("llama")
    a = fastload.from_hf(hf_model("llama"))
    b = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), torch_dtype="float32", device_map="cpu")
    assert np.array_equal(a(c["single_ids"]).logits, b(c["single_ids"]).logits)


def test_bfloat16_without_numpy_bf16():
    """bfloat16 torch tensors (numpy has no bfloat16): read by the core from their bits; equal to loading the
    bfloat16 file with torch_dtype=bfloat16."""
    c = load_case("llama")
    a = fastload.from_hf(hf_model("llama", torch.bfloat16))
    assert str(a.dtype) == "bfloat16"
    b = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), torch_dtype="bfloat16", device_map="cpu")
    assert np.array_equal(a(c["single_ids"]).logits, b(c["single_ids"]).logits)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fastllm_quantised_dtype(scheme):
    """FastLLM's from_hf(model, dtype="int8"): quantised at load, equal to from_pretrained with that scheme."""
    c = load_case("llama")
    a = fastload.from_hf(hf_model("llama"), dtype=scheme)
    b = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), torch_dtype="float32", device_map="cpu",
                                                      quantization_config=scheme)
    assert a.is_quantized and a.quantization_config["scheme"] == scheme
    assert np.array_equal(a(c["single_ids"]).logits, b(c["single_ids"]).logits)


def test_explicit_dtype_converts():
    c = load_case("qwen2")
    m = fastload.from_hf(hf_model("qwen2"), dtype="float16")
    assert str(m.dtype) == "float16"
    assert_logits_close(m(c["single_ids"]).logits, c["single_logits"], atol=0.5)


def test_torch_model_untouched_and_independent():
    hf = hf_model("qwen3")
    before = {k: v.clone() for k, v in hf.state_dict().items()}
    m = fastload.from_hf(hf)
    c = load_case("qwen3")
    ref = m(c["single_ids"]).logits
    for k, v in hf.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():  # the fastload model holds its own copy
        for p in hf.parameters():
            p.zero_()
    del hf
    assert np.array_equal(m(c["single_ids"]).logits, ref)


def byte_bpe_tokenizer():
    """A small byte-level BPE tokenizer made in memory (GPT-2 / Llama 3 / Qwen style), wrapped by transformers."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers
    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["The capital of France is Paris.", "Paris is the capital of France.", "fastload loads models fast."] * 5
    tk.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")


def test_tokenizer_object_is_wrapped():
    tok = byte_bpe_tokenizer()
    m = fastload.from_hf(hf_model("llama"), tokenizer=tok)
    text = "The capital of France is Paris."
    assert m.tokenizer is not None
    assert list(m.tokenizer(text)["input_ids"]) == tok(text)["input_ids"]


def test_tokenizer_from_the_model_name_or_path(tmp_path):
    d = tmp_path / "llama_tok"
    shutil.copytree(model_dir("llama"), d)
    tok = byte_bpe_tokenizer()
    tok.save_pretrained(d)
    m = fastload.from_hf(transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32))
    assert m.tokenizer is not None and m._own_tokenizer() is m.tokenizer
    assert list(m.tokenizer("Paris is the capital")["input_ids"]) == tok("Paris is the capital")["input_ids"]


def test_no_tokenizer_in_the_model_dir():
    assert fastload.from_hf(hf_model("llama")).tokenizer is None


def test_refusals():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fastload.from_hf(object())
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    with pytest.raises(NotImplementedError):
        fastload.from_hf(transformers.GPT2LMHeadModel(cfg))


def test_reload_is_refused_with_a_hint():
    m = fastload.from_hf(hf_model("llama"))
    with pytest.raises(RuntimeError, match="does not know the files"):
        m.half()


# ------------------------------------------------------------------------------------------ GPU
gpu = pytest.mark.skipif(not gpu_ok(), reason="needs a CUDA device and a CUDA build of fastload")


@gpu
@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_cuda_float32_device_to_device(name):
    c = load_case(name)
    hf = hf_model(name, device="cuda:0")
    m = fastload.from_hf(hf)
    assert str(m.device) == "cuda:0"
    st = m.load_stats["from_hf"]
    assert st["device_to_device"] > 0 and st["host_to_host"] == 0 and st["via_host"] == 0
    assert_logits_close(m(c["single_ids"]).logits, c["single_logits"], atol=ATOL)
    assert_greedy_match(m.generate(c["single_ids"], max_new_tokens=16, do_sample=False, eos_token_id=None),
                        c["single_greedy"], c["single_ids"].shape[1])


@gpu
def test_cuda_bfloat16_equals_from_pretrained():
    c = load_case("llama")
    a = fastload.from_hf(hf_model("llama", torch.bfloat16, "cuda:0"))
    b = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), torch_dtype="bfloat16",
                                                      device_map="cuda:0")
    assert np.array_equal(a(c["single_ids"]).logits, b(c["single_ids"]).logits)


@gpu
def test_cuda_int8_from_device_memory_equals_from_pretrained():
    c = load_case("llama")
    a = fastload.from_hf(hf_model("llama", torch.float32, "cuda:0"), dtype="int8")
    b = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), torch_dtype="float32",
                                                      device_map="cuda:0", load_in_8bit=True)
    assert np.array_equal(a(c["single_ids"]).logits, b(c["single_ids"]).logits)


@gpu
def test_cpu_torch_model_to_cuda_fastload():
    c = load_case("llama")
    m = fastload.from_hf(hf_model("llama"), device="cuda:0")
    assert m.load_stats["from_hf"]["host_to_host"] > 0
    assert_logits_close(m(c["single_ids"]).logits, c["single_logits"], atol=ATOL)


@gpu
def test_cuda_torch_model_to_cpu_fastload():
    c = load_case("llama")
    m = fastload.from_hf(hf_model("llama", device="cuda:0"), device="cpu")
    assert m.load_stats["from_hf"]["via_host"] > 0
    assert_logits_close(m(c["single_ids"]).logits, c["single_logits"], atol=ATOL)


def test_config_tied_but_lm_head_differs_copies_the_head():
    """A torch model whose config says tie_word_embeddings but whose lm_head is another matrix (transformers 5
    unties such a checkpoint): from_hf copied the embedding as the LM head, silently. It copies the head it
    computes with, and warns."""
    hf = hf_model("qwen2")  # tied
    assert hf.config.tie_word_embeddings
    with torch.no_grad():
        hf.lm_head.weight = torch.nn.Parameter(hf.lm_head.weight.detach().clone() * 0.5 + 0.01)
    ids = torch.tensor([[3, 17, 230, 5, 9]])
    with pytest.warns(UserWarning, match="lm_head differs"):
        m = fastload.from_hf(hf)
    with torch.no_grad():
        want = hf(ids).logits.float().numpy()
    np.testing.assert_allclose(np.asarray(m(ids.numpy()).logits), want, atol=ATOL, rtol=0)
    same = fastload.from_hf(hf_model("qwen2"))  # really tied: no warning, tied
    assert same.config.tie_word_embeddings
