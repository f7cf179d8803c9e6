"""transformers-compatible API surface: arguments, return shapes and types, environment settings,
numpy and (where installed) torch inputs. Runs on the tiny Llama fixture; no GPU, no torch needed."""
import importlib.util
import os
import shutil
import threading

import numpy as np
import pytest

import fastload
from golden_util import load_case, model_dir

LLAMA = str(model_dir("llama"))
HAS_TORCH = importlib.util.find_spec("torch") is not None


@pytest.fixture(scope="module")
def model():
    return fastload.AutoModelForCausalLM.from_pretrained(LLAMA, device_map="cpu", torch_dtype="float32")


@pytest.fixture(scope="module")
def case():
    return load_case("llama")


def test_info():
    i = fastload.info()
    assert "cpu" in i["backends"] and isinstance(i["cuda_compiled"], bool) and "cuda" in i


def test_short_form_and_ignored_arguments():
    m = fastload.from_pretrained(LLAMA, device_map={"": "cpu"}, torch_dtype="auto", low_cpu_mem_usage=True,
                                 trust_remote_code=True, attn_implementation="sdpa", use_safetensors=True)
    assert m.dtype == "bfloat16"  # "auto" = the checkpoint's dtype (config.json)
    assert m.device == "cpu"


def test_unsupported_arguments_raise():
    with pytest.raises(TypeError, match="output_attentions"):
        fastload.from_pretrained(LLAMA, device_map="cpu", output_attentions=True)
    with pytest.raises(ValueError, match="load_in_8bit=True and load_in_4bit=True"):
        fastload.from_pretrained(LLAMA, device_map="cpu", load_in_8bit=True, load_in_4bit=True)
    with pytest.raises(ValueError, match="torch_dtype"):
        fastload.from_pretrained(LLAMA, device_map="cpu", torch_dtype="int3")
    with pytest.raises(ValueError, match="device_map"):
        fastload.from_pretrained(LLAMA, device_map="tpu")


@pytest.mark.parametrize("dt,want", [("float16", "float16"), (np.float16, "float16"), (np.dtype("float32"), "float32"),
                                     ("bf16", "bfloat16"), ("torch.float16", "float16")])
def test_dtype_spellings(dt, want):
    assert fastload.from_pretrained(LLAMA, device_map="cpu", torch_dtype=dt).dtype == want


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed (fastload never needs it; only this test does)")
def test_torch_dtype_and_tensors(model, case):
    import torch
    m = fastload.from_pretrained(LLAMA, device_map="cpu", torch_dtype=torch.bfloat16)
    assert m.dtype == "bfloat16"
    ids = torch.tensor(case["single_ids"])
    out = model.generate(ids, max_new_tokens=4, eos_token_id=None)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.int64 and tuple(out.shape) == (1, ids.shape[1] + 4)
    lg = model(ids).logits
    assert isinstance(lg, torch.Tensor) and tuple(lg.shape) == tuple(case["single_logits"].shape)


def test_environment_settings(monkeypatch):
    monkeypatch.setenv("FASTLOAD_DTYPE", "float16")
    monkeypatch.setenv("FASTLOAD_DEVICE", "cpu")
    assert fastload.from_pretrained(LLAMA).dtype == "float16"
    assert fastload.from_pretrained(LLAMA, torch_dtype="float32").dtype == "float32"  # explicit wins
    monkeypatch.setenv("FASTLOAD_MODEL", LLAMA)
    assert fastload.from_pretrained().config["model_type"] == "llama"
    monkeypatch.setenv("FASTLOAD_QUANT", "int3")  # FASTLOAD_QUANT=int4 loading: tests/test_quant_api.py
    with pytest.raises(ValueError, match="FASTLOAD_QUANT='int3'"):
        fastload.from_pretrained(LLAMA)
    monkeypatch.setenv("FASTLOAD_DEVICE", "cuda")
    monkeypatch.setenv("FASTLOAD_QUANT", "none")
    if not fastload.info()["cuda_compiled"]:
        with pytest.raises(NotImplementedError, match="without CUDA"):
            fastload.from_pretrained(LLAMA)


def test_forward_shapes_and_loss(model, case):
    ids = case["single_ids"]
    out = model(ids)
    assert out.logits.shape == (1, ids.shape[1], 512) and out[0] is out.logits
    labels = ids.copy()
    labels[0, :3] = -100
    loss = model(ids, labels=labels).loss
    nll = -_ref_logprobs(out.logits[0], np.arange(ids.shape[1] - 1), ids[0, 1:])
    assert abs(float(loss) - nll[2:].mean()) < 1e-4
    assert model(ids[0]).logits.shape == out.logits.shape  # 1-D input is a batch of one


def _ref_logprobs(lg, rows, targets):
    x = lg[rows].astype(np.float64)
    mx = x.max(-1, keepdims=True)
    return x[np.arange(len(rows)), targets] - (np.log(np.exp(x - mx).sum(-1)) + mx[:, 0])


def test_loss_of_a_batch_and_its_errors(model):
    """labels= on a batch (the loss without a float64 copy of the logits: _C.target_logprobs) equals the float64
    formula to rounding; labels of another shape, or outside the vocabulary other than -100, are ValueErrors that
    name them; all labels -100 is nan, as transformers gives."""
    rng = np.random.default_rng(3)
    ids = rng.integers(3, 500, size=(3, 17))
    labels = ids.copy()
    labels[1, :5] = -100
    labels[2, 9] = -100
    out = model(ids, labels=labels)
    lg = out.logits.reshape(-1, 512)
    b, t = np.nonzero(labels[:, 1:] != -100)
    want = -_ref_logprobs(lg, b * 17 + t, labels[b, t + 1]).mean()
    assert abs(float(out.loss) - want) <= 1e-6 * abs(want)
    with pytest.raises(ValueError, match=r"labels of shape \(3, 16\)"):
        model(ids, labels=labels[:, 1:])
    bad = labels.copy()
    bad[2, 4] = 512
    with pytest.raises(ValueError, match=r"labels\[2\]\[4\] = 512 is outside the vocabulary"):
        model(ids, labels=bad)
    bad[2, 4] = -3
    with pytest.raises(ValueError, match=r"labels\[2\]\[4\] = -3"):
        model(ids, labels=bad)
    assert np.isnan(float(model(ids, labels=np.full(ids.shape, -100)).loss))


def test_target_logprobs_against_float64_and_its_errors():
    rng = np.random.default_rng(4)
    lg = (rng.standard_normal((40, 3001)) * 8).astype(np.float32)
    lg[7, 100] = 300.0  # one dominant logit: exp(x - max) keeps it finite
    rows, targets = rng.integers(0, 40, size=90), rng.integers(0, 3001, size=90)
    rows[:3], targets[:3] = 7, [100, 0, 3000]
    got = fastload._C.target_logprobs(lg, rows, targets)
    assert got.dtype == np.float64 and got.shape == (90,)
    np.testing.assert_allclose(got, _ref_logprobs(lg, rows, targets), rtol=1e-12, atol=1e-12)
    assert np.array_equal(fastload._C.target_logprobs(lg[::1], list(rows), list(targets)), got)
    with pytest.raises(ValueError, match=r"rows\[1\] = 40 is outside \[0, 40\)"):
        fastload._C.target_logprobs(lg, [0, 40], [1, 1])
    with pytest.raises(ValueError, match=r"targets\[0\] = -1 is outside the vocabulary"):
        fastload._C.target_logprobs(lg, [0], [-1])
    with pytest.raises(ValueError, match="2 rows but 1 targets"):
        fastload._C.target_logprobs(lg, [0, 1], [1])


def test_generate_lengths(model, case):
    ids = case["single_ids"]
    T = ids.shape[1]
    assert model.generate(ids, max_new_tokens=5, eos_token_id=None).shape == (1, T + 5)
    assert model.generate(ids, max_length=T + 3, eos_token_id=None).shape == (1, T + 3)
    assert model.generate(ids, max_new_tokens=0).shape == (1, T)
    with pytest.raises(ValueError, match="max_length"):
        model.generate(ids, max_length=T)
    # min_new_tokens masks eos: with eos = the greedy first token, generation must go past it
    first = int(case["single_greedy"][0, T])
    assert model.generate(ids, max_new_tokens=6, eos_token_id=first).shape[1] == T + 1
    out = model.generate(ids, max_new_tokens=6, min_new_tokens=3, eos_token_id=first)
    assert out.shape[1] >= T + 4 and first not in out[0, T:T + 3]


def test_generate_sampling(model, case):
    ids = case["single_ids"]
    a = model.generate(ids, do_sample=True, max_new_tokens=12, seed=3, eos_token_id=None)
    b = model.generate(ids, do_sample=True, max_new_tokens=12, seed=3, eos_token_id=None)
    c = model.generate(ids, do_sample=True, max_new_tokens=12, seed=4, temperature=1.5, eos_token_id=None)
    assert (a == b).all() and not (a == c).all()
    g = model.generate(ids, do_sample=True, top_k=1, max_new_tokens=12, eos_token_id=None)
    np.testing.assert_array_equal(g, model.generate(ids, max_new_tokens=12, eos_token_id=None))
    fastload.set_seed(11)
    d = model.generate(ids, do_sample=True, max_new_tokens=8, eos_token_id=None)
    fastload.set_seed(11)
    np.testing.assert_array_equal(d, model.generate(ids, do_sample=True, max_new_tokens=8, eos_token_id=None))
    r = model.generate(ids, do_sample=True, num_return_sequences=3, max_new_tokens=8, seed=1, eos_token_id=None)
    assert r.shape == (3, ids.shape[1] + 8) and (r[:, :ids.shape[1]] == ids).all()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, do_sample=True, temperature=0.0)
    rp = model.generate(ids, repetition_penalty=1.5, max_new_tokens=12, eos_token_id=None)
    assert rp.shape == g.shape


def test_generate_unsupported(model, case):
    with pytest.raises(NotImplementedError, match="num_beams"):  # beam sampling (beam search: test_beam_search.py)
        model.generate(case["single_ids"], num_beams=4, do_sample=True)
    with pytest.raises(TypeError, match="penalty_alpha"):
        model.generate(case["single_ids"], penalty_alpha=0.6, top_k=4)


def test_generation_config_object(model, case):
    gc = fastload.GenerationConfig(max_new_tokens=3, eos_token_id=None)
    assert model.generate(case["single_ids"], generation_config=gc).shape[1] == case["single_ids"].shape[1] + 3


class Collect:
    def __init__(self):
        self.puts, self.ended = [], False

    def put(self, v):
        self.puts.append(np.asarray(v))

    def end(self):
        self.ended = True


def test_streamer_protocol(model, case):
    s = Collect()
    out = model.generate(case["single_ids"], max_new_tokens=5, eos_token_id=None, streamer=s)
    assert s.ended and len(s.puts) == 6
    np.testing.assert_array_equal(s.puts[0], case["single_ids"])  # the prompt first, as transformers
    np.testing.assert_array_equal(np.concatenate(s.puts[1:]), out[0, -5:])


def test_streamer_exception_stops_generation(model, case):
    class Boom(Collect):
        def put(self, v):
            super().put(v)
            if len(self.puts) == 3:
                raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        model.generate(case["single_ids"], max_new_tokens=10, eos_token_id=None, streamer=Boom())


def test_concurrent_callers_share_a_model(model, case):
    """Callers on several threads are serialised per model and each gets its own answer."""
    want = model.generate(case["single_ids"], max_new_tokens=8, eos_token_id=None)
    res = [None] * 4

    def run(i):
        res[i] = model.generate(case["single_ids"], max_new_tokens=8, eos_token_id=None)
    ts = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    [t.start() for t in ts]
    [t.join() for t in ts]
    for r in res:
        np.testing.assert_array_equal(r, want)


def test_hub_id_from_local_cache(tmp_path, monkeypatch, case):
    # the hub cache's layout: snapshot files are relative links into the repository's blobs/
    snap = tmp_path / "models--acme--tiny-llama" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    blobs = tmp_path / "models--acme--tiny-llama" / "blobs"
    blobs.mkdir()
    for i, f in enumerate(model_dir("llama").iterdir()):
        if f.suffix in (".safetensors", ".json"):
            shutil.copy(f, blobs / f"{i:040x}")
            (snap / f.name).symlink_to(f"../../blobs/{i:040x}")
    (tmp_path / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    m = fastload.AutoModelForCausalLM.from_pretrained("acme/tiny-llama", device_map="cpu", torch_dtype="float32")
    assert m.generate(case["single_ids"], max_new_tokens=2, eos_token_id=None).shape[1] == case["single_ids"].shape[1] + 2
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        fastload.AutoModelForCausalLM.from_pretrained("acme/absent", device_map="cpu")


def test_memory_and_stats(model):
    st = model.load_stats
    assert st["bytes"] > 0 and st["seconds"] >= 0 and st["files"] == 3 and st["threads"] >= 1
    ms = model.memory_stats()
    assert ms["weights"] == model.get_memory_footprint() > 0
    assert model.num_parameters() > 0 and "LlamaForCausalLM" in repr(model)


def test_progress_callback():
    seen = []
    fastload.from_pretrained(LLAMA, device_map="cpu", progress=False, progress_callback=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == seen[-1][1] > 0


def test_prefill_workspace_holds_logits_of_the_last_rows_only():
    """generate's prefill asks for the last row's logits, not every row's: the workspace grows per prompt token read in
    a step by the activations only (d, q|k|v, attention, residual, gate|up, ffn, ids, positions), never by the
    vocabulary (a 2048-token prompt of a 152k-vocabulary model used to hold ~600 MB of 16-bit logits on the GPU). Two
    engines reading a 100-token prompt 32 and 96 tokens a step: their workspaces differ by 64 tokens of activations."""
    from golden_util import model_dir
    c = None
    ws = []
    for chunk in (32, 96):
        m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cpu",
                                                          torch_dtype="float32", prefill_chunk=chunk)
        c = m.config
        ids = np.arange(1, 101, dtype=np.int64)[None] % (c["vocab_size"] - 1) + 1
        m.generate(ids, max_new_tokens=2, eos_token_id=[])
        info = m._core.info
        ws.append(info["mem_allocated"] - info["weight_bytes"])
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    per_token = 4 * (2 * d + (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
                     + c["num_attention_heads"] * hd + d + 2 * f + f) + 8
    assert ws[1] - ws[0] == 64 * per_token, (ws, per_token, c["vocab_size"])
    lg = m(np.arange(1, 41, dtype=np.int64)[None]).logits  # a forward of every row still gets every row's logits
    assert lg.shape == (1, 40, c["vocab_size"]) and np.isfinite(np.asarray(lg)).all()
