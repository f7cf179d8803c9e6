"""The CUDA backend end to end (skipped without a CUDA device): golden fixtures on the GPU, the demo
model against transformers on the GPU, memory accounting, and CUDA errors as exceptions.

Tolerances (max |logit - fp32 reference| / max |reference|): float16 activations 1e-2, bfloat16 5e-2
(8 mantissa bits through every layer). Greedy tokens: teacher-forced, fastload's argmax must equal the
reference wherever the reference margin exceeds twice fastload's error at that step."""
import importlib.util
import os

import numpy as np
import pytest

import fastload
from golden_util import TINY_MODELS, load_case, model_dir, teacher_forced_check

pytestmark = pytest.mark.skipif(not fastload.cuda.is_available(),
                                reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))
TOL = {"float16": 1e-2, "bfloat16": 5e-2}
# Mixture of Experts in bfloat16: a token whose two best experts' router probabilities lie within bfloat16's rounding
# can take the other expert (the fixture's random router makes such near-ties common), which moves its logits by more
# than the dense models' tolerance (H200: 5.1% at one position of 16). A wrong expert kernel moves them by ~100%;
# the float32 MoE path is compared token for token in test_cuda_engine.
TOL_MOE = {"float16": 1e-2, "bfloat16": 1e-1}


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", TINY_MODELS)
def test_golden_on_gpu(name, dtype):
    case = load_case(name)
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), device_map="cuda", torch_dtype=dtype)
    lg = m(case["single_ids"]).logits
    assert np.isfinite(lg).all()
    ref = case["single_logits"]
    tol = (TOL_MOE if name == "mixtral" else TOL)[dtype]
    err = np.abs(lg - ref).max()
    assert err / np.abs(ref).max() < tol
    mask = case["batch_mask"]
    bl = m(case["batch_ids"], attention_mask=mask).logits
    berr = np.abs(bl - case["batch_logits"])[mask.astype(bool)].max()
    assert berr / np.abs(case["batch_logits"]).max() < tol
    if name == "mixtral" and dtype == "bfloat16":
        return  # the teacher-forced check bounds a step's error by its logits' distance; a routing flip breaks that
    # near-ties within the logit error measured above may flip (seen: qwen3 bfloat16, a 0.135 margin, after rope's
    # float32 rounding changed by one ulp): the generated steps are held to that measured error
    err = float(max(err, berr))
    clear = teacher_forced_check(m, case["single_ids"], case["single_greedy"], case["single_greedy_margins"], err=err)
    clear &= teacher_forced_check(m, case["batch_ids"], case["batch_greedy"], case["batch_greedy_margins"], mask,
                                  err=err)
    if clear:
        n = case["meta"]["max_new_tokens"]
        np.testing.assert_array_equal(m.generate(case["single_ids"], max_new_tokens=n, eos_token_id=None), case["single_greedy"])
        np.testing.assert_array_equal(
            m.generate(case["batch_ids"], attention_mask=mask, max_new_tokens=n, eos_token_id=None,
                       pad_token_id=case["meta"]["pad_token_id"]), case["batch_greedy"])
        np.testing.assert_array_equal(
            m.generate(case["batch_ids"], attention_mask=mask, max_new_tokens=n, eos_token_id=int(case["eos_batch_token_id"]),
                       pad_token_id=case["meta"]["pad_token_id"]), case["eos_batch_greedy"])


def test_pdl_off_gives_the_same_logits_and_tokens():
    """Programmatic dependent launch (sm_90+) lets a kernel start before its predecessor ends; a
    kernel reading its inputs before waiting would show up as different numbers. FASTLOAD_PDL=0
    (read once per process) runs the same kernels in plain stream order: logits and sampled
    tokens must be bit-identical."""
    import subprocess
    import sys
    HERE = os.path.dirname(os.path.abspath(__file__))
    code = (
        "import sys; sys.path[:0] = %r\nimport numpy as np, fastload\nfrom golden_util import load_case, model_dir\n"
        "case = load_case('qwen2'); m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir('qwen2')), "
        "device_map='cuda', torch_dtype='bfloat16')\n"
        "lg = m(case['batch_ids'], attention_mask=case['batch_mask']).logits\n"
        "g = m.generate(case['batch_ids'], attention_mask=case['batch_mask'], do_sample=True, seed=3, max_new_tokens=24, "
        "eos_token_id=[], pad_token_id=case['meta']['pad_token_id'])\n"
        "np.save(sys.argv[1], lg); np.save(sys.argv[2], g)\n") % [HERE, os.path.dirname(HERE)]
    out = {}
    for pdl in ("1", "0"):
        d = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"fl_pdl_{os.getpid()}_{pdl}")
        env = dict(os.environ, FASTLOAD_PDL=pdl)
        r = subprocess.run([sys.executable, "-c", code, d + "_lg.npy", d + "_g.npy"], env=env, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr[-2000:]
        out[pdl] = (np.load(d + "_lg.npy"), np.load(d + "_g.npy"))
        os.remove(d + "_lg.npy"); os.remove(d + "_g.npy")
    np.testing.assert_array_equal(out["1"][0], out["0"][0])
    np.testing.assert_array_equal(out["1"][1], out["0"][1])


def test_gpu_matches_cpu_sampling_rules():
    """Seeded sampling on the GPU is reproducible; top_k=1 equals greedy; min_new_tokens holds."""
    case = load_case("llama")
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cuda", torch_dtype="float16")
    ids = case["single_ids"]
    a = m.generate(ids, do_sample=True, max_new_tokens=16, seed=5, eos_token_id=None)
    b = m.generate(ids, do_sample=True, max_new_tokens=16, seed=5, eos_token_id=None)
    c = m.generate(ids, do_sample=True, max_new_tokens=16, seed=6, eos_token_id=None, temperature=1.5)
    assert (a == b).all() and not (a == c).all()
    g = m.generate(ids, max_new_tokens=16, eos_token_id=None)
    np.testing.assert_array_equal(m.generate(ids, do_sample=True, top_k=1, max_new_tokens=16, eos_token_id=None), g)
    first = int(g[0, ids.shape[1]])
    out = m.generate(ids, max_new_tokens=6, min_new_tokens=3, eos_token_id=first)
    assert first not in out[0, ids.shape[1]:ids.shape[1] + 3]
    for kw in (dict(top_p=0.5), dict(top_k=5, top_p=0.9, temperature=0.7), dict(repetition_penalty=1.3)):
        o = m.generate(ids, do_sample=True, max_new_tokens=8, seed=1, eos_token_id=None, **kw)
        assert o.shape == (1, ids.shape[1] + 8) and (o >= 0).all() and (o < 512).all()


def test_memory_accounting_and_load_peak():
    name = "llama"
    import gc
    gc.collect()  # models of earlier tests in this process that only a collection frees would count as "before"
    fastload.cuda.reset_peak_memory_stats()
    before = fastload.cuda.memory_allocated()
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir(name)), device_map="cuda", torch_dtype="bfloat16")
    w = m.get_memory_footprint()
    assert fastload.cuda.memory_allocated() - before >= w
    assert fastload.cuda.max_memory_allocated() - before <= w + (256 << 20)
    ms = m.memory_stats()
    assert ms["weights"] == w and ms["device"].startswith("cuda")
    del m
    import gc
    gc.collect()
    assert fastload.cuda.memory_allocated() == before


def test_cuda_error_is_an_exception_and_process_lives():
    """A KV pool far beyond the device: cudaMalloc fails, the engine raises, and the same model generates after a
    smaller pool is set."""
    m = fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("llama")), device_map="cuda", torch_dtype="float16",
                                                      kv_cache_memory=1 << 41)  # 2 TiB: pages fit int32 ids
    ids = load_case("llama")["single_ids"]
    with pytest.raises((MemoryError, RuntimeError)):
        m.generate(ids, max_new_tokens=2)
    m.configure_engine(kv_cache_memory=64 << 20)
    assert m.generate(ids, max_new_tokens=4, eos_token_id=None).shape == (1, ids.shape[1] + 4)


def _demo_path():
    p = os.environ.get("FASTLOAD_DEMO_GGUF")
    if p and os.path.isfile(p):
        return p
    from fastload.demo import demo_model_path
    return demo_model_path(download=False)


HAVE_PEER = all(importlib.util.find_spec(x) for x in ("torch", "transformers", "gguf"))


@pytest.mark.skipif(not HAVE_PEER, reason="torch, transformers and gguf are needed for the GPU peer")
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_demo_greedy_equals_transformers_on_gpu(dtype):
    """The issue's bar: the first 32 greedy tokens of each golden prompt equal transformers' on the GPU,
    except from a step where transformers' own top-2 logits tie within 2 ulp of the dtype (seen in bf16 only:
    p1 step 20 and p3 step 24 tie exactly at 0.0 on an H200, 2026-11-21)."""
    path = _demo_path()
    if not path:
        pytest.skip("the demo GGUF is not available here (set FASTLOAD_DEMO_GGUF)")
    import torch
    import transformers
    case = load_case("smollm2")
    hf = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                           dtype=getattr(torch, dtype)).cuda().eval()
    hf.generation_config.eos_token_id = None  # transformers 5 fills eos_token_id=None back from here
    m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cuda", torch_dtype=dtype)
    for p in case["meta"]["prompts"]:
        ids = case[f"{p['key']}_ids"]
        with torch.no_grad():
            # an explicit mask: the chat prompt holds token 2 (<|im_end|>), which is also the pad id, and
            # transformers would otherwise infer a mask that hides those prompt tokens
            t = torch.tensor(ids).cuda()
            r = hf.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=32, min_new_tokens=32,
                            do_sample=False, eos_token_id=None, pad_token_id=2, output_scores=True,
                            return_dict_in_generate=True)
        ref = r.sequences.cpu().numpy()
        out = m.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=[])  # [] = no eos (None keeps the config's, as transformers)
        T = ids.shape[1]
        assert ref.shape[1] == out.shape[1] == T + 32
        diff = np.nonzero(out[0, T:] != ref[0, T:])[0]
        if diff.size == 0:
            continue
        # The one accepted difference: a step where transformers' own top-2 logits are tied within two
        # units in the last place of the activation dtype (bf16 logits near 20 are spaced 0.125 apart),
        # so that no order of rounding decides between them. After that the sequences are unrelated.
        s = int(diff[0])
        sc = r.scores[s][0].float().cpu().numpy()
        top2 = np.sort(sc)[-2:]
        ulp = 2.0 ** (np.floor(np.log2(abs(top2[1]) + 1e-30)) - (7 if dtype == "bfloat16" else 10))
        assert top2[1] - top2[0] <= 2 * ulp, (
            f"{p['key']} ({dtype}): differs at new token {s} where transformers' margin is {top2[1] - top2[0]:.4g} "
            f"(> 2 ulp = {2 * ulp:.3g})")
    del hf
    torch.cuda.empty_cache()
