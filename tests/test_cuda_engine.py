"""The engine on the GPU (issue 11 parts 1-2; skipped without a CUDA device): paged attention and RoPE store
kernels against each row alone on the CPU backend, and the engine's batched, graph-replayed decode against the same
requests one at a time.

Tolerances for the kernels are those of test_cuda_ops (attention). Requests: greedy tokens of every request in a
batch equal the request alone through the same engine on the demo model (real weights); a batch of other sizes
runs other matmul kernels (GEMV at 1-2 rows, tensor cores above), so this is the claim users rely on, checked where
logit margins are those of a trained model. No timing assertions."""
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import fastload
from fastload import _C
from golden_util import model_dir
from paged_util import paged_attention, paged_case, per_row_reference
from cuda_util import ATT_ELEM_K, ATT_REL_L2, DEV, check_close, to_act

pytestmark = pytest.mark.skipif(not fastload.cuda.is_available(),
                                reason="no CUDA device here (fastload.info(): %s)" % fastload.info().get("cuda"))

CASES = [  # B, T, nh, nkv, hd, L, page shift, window
    (4, 1, 14, 2, 64, 300, 4, 0),     # decode: split-K kernel, rows at their own lengths
    (3, 1, 28, 4, 128, 1000, 4, 0),
    (5, 1, 8, 8, 128, 90, 0, 0),      # one-slot pages
    (2, 1, 8, 2, 128, 200, 4, 37),    # sliding window
    (2, 33, 4, 2, 64, 120, 4, 0),     # prefill kernel, 64-key tiles across 16-slot pages
    (1, 100, 28, 4, 128, 300, 5, 0),
    (2, 9, 6, 2, 96, 60, 3, 0),       # head_dim 96: the simple kernel
    (3, 1, 6, 2, 96, 61, 2, 0),
]


@pytest.mark.parametrize("act", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B%d-T%d-h%d/%d-d%d-L%d-p%d-w%d" % c)
def test_paged_attention_matches_rows_alone(act, case):
    B, T, nh, nkv, hd, L, shift, window = case
    seed = int(np.random.SeedSequence().entropy % (2 ** 31))
    c = paged_case(np.random.default_rng(seed), B, T, nh, nkv, hd, L, shift)
    for k in ("qkv", "kc", "vc", "kp", "vp"):
        c[k] = to_act(c[k], act)
    ref = per_row_reference(c, window)
    got = paged_attention(DEV, c, window, act)
    check_close(got, ref, act, "paged attention", seed, k=ATT_ELEM_K, rel_l2=ATT_REL_L2)


@pytest.mark.parametrize("act", ["float16", "bfloat16"])
def test_paged_rope_store_matches_cpu(act):
    rng = np.random.default_rng(3)
    B, T, nh, nkv, hd, L, shift = 3, 5, 4, 2, 128, 80, 4
    c = paged_case(rng, B, T, nh, nkv, hd, L, shift)
    for k in ("qkv", "kp", "vp"):
        c[k] = to_act(c[k], act)
    inv = (1.0 / (1e6 ** (np.arange(hd // 2, dtype=np.float32) * 2 / hd))).astype(np.float32)
    pos = np.concatenate([np.arange(s, s + T) for s in c["starts"]]).astype(np.int32)
    inputs = {"qkv": c["qkv"], "pos": pos, "inv_freq": inv, "k_cache": c["kp"], "v_cache": c["vp"],
              "block_table": c["table"], "starts": c["starts"]}
    params = {"B": B, "T": T, "n_heads": nh, "n_kv_heads": nkv, "page_shift": shift}
    got = _C.run_op(DEV, "rope_store", inputs, dict(params, act=act))
    ref = _C.run_op("cpu", "rope_store", inputs, dict(params, act="float32"))
    check_close(got["k_cache"], ref["k_cache"], act, "paged rope_store k", 3)
    assert np.array_equal(got["v_cache"], ref["v_cache"])
    # pages no row's new slots fall in are untouched
    page = 1 << shift
    touched = {int(c["table"][b, j // page]) for b in range(B) for j in range(c["starts"][b], c["starts"][b] + T)}
    for p in range(c["kp"].shape[0]):
        if p not in touched:
            assert np.array_equal(got["k_cache"][p], c["kp"][p]), p


def _demo():
    p = os.environ.get("FASTLOAD_DEMO_GGUF")
    if p and os.path.isfile(p):
        return p
    from fastload.demo import demo_model_path
    return demo_model_path(download=False)


def _load(dtype="float32", **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("qwen2")), device_map="cuda", torch_dtype=dtype, **kw)


@pytest.fixture(scope="module")
def gold():
    """The qwen2 golden fixture in float32 on the GPU, with the engine and without (engine=False: the one-call path,
    its own rectangular cache and decode graph). In float32 the matmul kernels a batch size picks differ by
    rounding only (~1e-6): a greedy token that flips would be an engine bug, not a near-tie."""
    return _load(), _load(engine=False)


def _prompts(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 500, size=int(rng.integers(3, 60))).astype(np.int64) for _ in range(n)]


def _gen(m, p, n):
    return m.generate(p[None], max_new_tokens=n, eos_token_id=[])[0, len(p):]


def test_batched_greedy_equals_one_call_path(gold):
    m, legacy = gold
    ps = _prompts(24, seed=1)
    ref = [_gen(legacy, p, 20) for p in ps]
    with ThreadPoolExecutor(24) as ex:
        out = list(ex.map(lambda p: _gen(m, p, 20), ps))
    bad = [i for i in range(len(ps)) if not np.array_equal(out[i], ref[i])]
    assert not bad, [(list(out[i]), list(ref[i])) for i in bad[:3]]
    st = m.engine_stats()
    assert st["peak_running"] > 1 and st["pages_used"] == 0, st


def test_staggered_arrivals_replay_graphs_of_every_bucket(gold):
    """Requests arrive while others decode, so steps run at many batch sizes (graph buckets 1, 2, 4, 8, 16, 24 and
    their padding rows, each captured once and replayed); each request's tokens equal the one-call path."""
    m, legacy = gold
    ps = _prompts(20, seed=2)
    ns = [8 + 3 * k for k in range(len(ps))]
    ref = [_gen(legacy, p, n) for p, n in zip(ps, ns)]
    out = [None] * len(ps)

    def run(k):
        out[k] = _gen(m, ps[k], ns[k])
    threads = []
    for k in range(len(ps)):
        threads.append(threading.Thread(target=run, args=(k,)))
        threads[-1].start()
        threading.Event().wait(0.003 * (k % 4))
    for t in threads:
        t.join(120)
    for k in range(len(ps)):
        assert np.array_equal(out[k], ref[k]), (k, list(out[k]), list(ref[k]))


def test_pipelined_decode_equals_step_by_step(monkeypatch):
    """Decode steps launched before the tokens of the step before are read, fed on the device (on by default on
    CUDA): a batch in which row 0 ends on eos while the next step already runs (its row dropped: wasted_rows) gives
    the tokens of the step-by-step engine (FASTLOAD_ENGINE_PIPELINE=0), bit for bit in float32; a single request in
    bf16 too (the same bucket-1 graph either way)."""
    monkeypatch.setenv("FASTLOAD_ENGINE_PIPELINE", "0")
    ref_m, ref16 = _load(), _load("bfloat16")
    for r in (ref_m, ref16):  # the engine reads the setting when it is made, at the first generate
        r.generate(np.array([[5, 6, 7]]), max_new_tokens=2, eos_token_id=[])
    monkeypatch.delenv("FASTLOAD_ENGINE_PIPELINE")
    m, m16 = _load(), _load("bfloat16")
    ps = _prompts(3, seed=11)
    eos = int(_gen(ref_m, ps[0], 12)[6])
    T = max(len(p) for p in ps)
    ids, mask = np.zeros((3, T), np.int64), np.zeros((3, T), np.int64)
    for b, p in enumerate(ps):
        ids[b, T - len(p):], mask[b, T - len(p):] = p, 1
    kw = dict(attention_mask=mask, max_new_tokens=12, eos_token_id=eos, pad_token_id=0)
    assert np.array_equal(m.generate(ids, **kw), ref_m.generate(ids, **kw))
    st = m.engine_stats()
    assert st["pipelined_steps"] > 0 and st["wasted_rows"] >= 1 and st["pages_used"] == 0, st
    assert ref_m.engine_stats()["pipelined_steps"] == 0
    for p in ps:
        assert np.array_equal(_gen(m16, p, 48), _gen(ref16, p, 48))
    assert m16.engine_stats()["pipelined_steps"] > 40


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_single_request_equals_one_call_path_in_16_bit(dtype):
    """One request alone: the engine's bucket-1 graph runs the same kernels as the one-call path's decode graph,
    with the cache addressed through a block table: the same tokens, bit for bit."""
    m, legacy = _load(dtype), _load(dtype, engine=False)
    for p in _prompts(4, seed=3):
        assert np.array_equal(_gen(m, p, 32), _gen(legacy, p, 32))


def test_long_prompt_chunks_and_prefix_sharing(gold):
    _, legacy = gold
    m = _load(prefill_chunk=16, prefix_caching=True)  # the fixture's context is 128 tokens: 16-token chunks
    rng = np.random.default_rng(4)
    system = rng.integers(3, 500, size=90)  # 6 prefill chunks, 5 full pages of 16
    ps = [np.concatenate([system, rng.integers(3, 500, size=5)]) for _ in range(6)]
    ref = [_gen(legacy, p, 6) for p in ps]
    _gen(m, ps[0], 2)
    with ThreadPoolExecutor(6) as ex:
        out = list(ex.map(lambda p: _gen(m, p, 6), ps))
    for a, b in zip(out, ref):
        assert np.array_equal(a, b)
    assert m.engine_stats()["prefix_hit_tokens"] >= 6 * 80


def test_sampling_is_reproducible_and_follows_the_rules(gold):
    m, _ = gold
    p = _prompts(1, seed=5)[0]
    kw = dict(max_new_tokens=16, do_sample=True, eos_token_id=[])
    a = m.generate(p[None], seed=5, **kw)
    b = m.generate(p[None], seed=5, **kw)
    c = m.generate(p[None], seed=6, temperature=1.5, **kw)
    assert (a == b).all() and not (a == c).all()
    g = m.generate(p[None], max_new_tokens=16, eos_token_id=[])
    assert np.array_equal(m.generate(p[None], top_k=1, seed=9, **kw), g)


@pytest.mark.parametrize("quant", [None, "int4"])
def test_batch_sampling_is_the_same_on_every_run(quant):
    """A generate() of several sampled rows gives the same tokens every time: its rows are queued as one group, so the
    batches the engine forms, and a 16-bit batched matmul's rounding, never depend on the driver's timing (they did
    when rows were submitted one by one: test_quantized_model_pdl_off_is_bit_identical failed on an H200, 2026-12-01)."""
    kw = {} if quant is None else {"quantization_config": {"quant_method": "fastload", "scheme": quant}}
    m = _load("bfloat16", **kw)
    ids = np.array([[1, 17, 230, 5, 99, 412], [1, 8, 64, 300, 21, 7], [1, 9, 9, 40, 41, 3]])
    runs = [m.generate(ids, do_sample=True, seed=3, max_new_tokens=24, eos_token_id=[]) for _ in range(6)]
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def test_engine_memory_returns_to_idle(gold):
    """Rounds of concurrent requests leave device memory where it was: the backend's lazily sized scratch (split-KV
    attention's for the widest batch and longest table a step had, the pipelined decode's token slots) grows to what
    the schedules need, which depends on arrival timing, and then stays; a leak would grow every round."""
    m, _ = gold

    def round_():
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(lambda p: _gen(m, p, 8), _prompts(16, seed=6)))
    seen = []
    # seen on an H200: growth in the first rounds, 3,776 bytes at a time, twice (arrival timing); on an H100 under
    # pytest -n 8 (2026-12-05) four steps of 320-3,968 bytes over 8 rounds: the scratch follows the widest schedule
    # seen so far, which a loaded machine reaches later. A leak grows every round; 20 rounds tell them apart.
    for _ in range(20):
        round_()
        seen.append(fastload.cuda.memory_allocated())
        if len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3]:
            break
    assert len(seen) >= 3 and seen[-1] == seen[-2] == seen[-3], seen
    ms = m.memory_stats()
    assert ms["kv_cache_pool"] > 0 and ms["kv_cache_pool_used"] == 0


@pytest.mark.parametrize("mode", ["replay", "recompute"])
def test_small_pool_preempts_and_keeps_greedy_outputs(gold, mode):
    """A pool of 14 pages of 4 tokens for 6 requests of 8-15 + 24 tokens (8-10 pages each: any two in flight
    together overflow it): the newest are preempted and read again, replayed through graph-replayed decode steps
    (their rows take the device argmax, which is dropped) or recomputed as prompts; every request's tokens equal the
    one-call path. (With 12 new tokens, 7 pages a request, an H200 once finished the threads' requests too far apart
    for three to meet: no preemption, 2026-12-06.)"""
    _, legacy = gold
    c = legacy.config
    page = 4 * 2 * c.num_hidden_layers * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 4
    m = _load(kv_cache_memory=page * 14, kv_page_tokens=4, max_num_seqs=8, prefill_chunk=16, preemption_mode=mode)
    rng = np.random.default_rng(5)
    ps = [rng.integers(3, 500, size=int(rng.integers(8, 16))).astype(np.int64) for _ in range(6)]
    ref = [_gen(legacy, p, 24) for p in ps]
    start = threading.Barrier(len(ps))

    def run(p):
        start.wait()
        return _gen(m, p, 24)
    with ThreadPoolExecutor(len(ps)) as ex:
        out = list(ex.map(run, ps))
    bad = [i for i in range(len(ps)) if not np.array_equal(out[i], ref[i])]
    assert not bad, [(list(out[i]), list(ref[i])) for i in bad[:3]]
    st = m.engine_stats()
    assert st["preemptions"] > 0 and st["pages_used"] == 0, st
    assert (st["replayed_tokens"] > 0) == (mode == "replay"), st


def test_pool_larger_than_the_device_is_a_memory_error():
    m = _load("bfloat16", kv_cache_memory=2 * fastload.cuda.get_device_properties(0).total_memory)
    with pytest.raises(MemoryError, match="KV cache pool"):
        m.generate(np.arange(3, 9)[None], max_new_tokens=2)
    m.configure_engine(kv_cache_memory=64 << 20)  # and the model still serves with a pool that fits
    assert m.generate(np.arange(3, 9)[None], max_new_tokens=2).shape[1] <= 8


QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a GPU is.",
             "List three fruits.", "What is 12 times 12?", "Who wrote Hamlet?", "Say hello in Spanish.",
             "Describe a cat in one sentence.", "What colour is the sky?", "Name a prime number.",
             "How many legs does a spider have?", "What is water made of?"]


def test_demo_chat_from_threads_equals_the_loop():
    """The field report's scenario on real weights in bfloat16 (skipped without the demo GGUF): every answer from a
    thread pool equals the for-loop's."""
    path = _demo()
    if not path:
        pytest.skip("the demo GGUF is not available here (set FASTLOAD_DEMO_GGUF)")
    m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cuda", torch_dtype="bfloat16")
    tok = fastload.AutoTokenizer.from_pretrained(path)
    loop = [m.chat(tok, q, max_new_tokens=24)[0] for q in QUESTIONS]
    with ThreadPoolExecutor(len(QUESTIONS)) as ex:
        pool = list(ex.map(lambda q: m.chat(tok, q, max_new_tokens=24)[0], QUESTIONS))
    assert pool == loop, [(a, b) for a, b in zip(loop, pool) if a != b]


@pytest.mark.parametrize("scheme", ["int8", "int4", "nf4"])
def test_quantised_experts_on_gpu(scheme, monkeypatch):
    """Mixtral with its experts quantised at load on the GPU (float32 activations): the experts' codes equal the CPU
    backend's (the two quantisers are bit-identical), so the dequantised experts read back equal; a prompt of 80
    tokens (160 slots: per-expert quantised matmuls) gives the CPU's logits; greedy decode (the quantised grouped
    GEMV, expert ids on the device, graph-replayed) gives the CPU's tokens, several requests at once too."""
    from fastload import arch as archmod
    monkeypatch.setenv("FASTLOAD_CPU_QDOT", "exact")  # the CPU's float dot products, as the GPU kernel does

    def load(dev):
        return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("mixtral")), device_map=dev,
                                                             torch_dtype="float32",
                                                             quantization_config=fastload.QuantConfig(scheme=scheme))
    g, c = load("cuda"), load("cpu")
    lay = {x["name"]: x["dtype"] for x in g._core.layouts()}
    assert lay["layers.0.moe_w13"] == scheme and lay["layers.0.moe_w2"] == scheme
    E = g.config.num_local_experts
    for slot in ("moe_w1", "moe_w3", "moe_w2"):
        for j in (0, E - 1):
            a, b = g._core.export(archmod.SLOT[slot], 1, j)[1], c._core.export(archmod.SLOT[slot], 1, j)[1]
            assert np.array_equal(a, b), (slot, j)
    ids = np.random.default_rng(7).integers(3, 500, size=(1, 80))
    lg, lc = g(ids).logits, c(ids).logits
    assert np.abs(lg - lc).max() <= 1e-3 * np.abs(lc).max()
    ps = _prompts(6, seed=8)
    ref = [_gen(c, p, 10) for p in ps]
    with ThreadPoolExecutor(len(ps)) as ex:
        out = list(ex.map(lambda p: _gen(g, p, 10), ps))
    bad = [i for i in range(len(ps)) if not np.array_equal(out[i], ref[i])]
    assert not bad, [(list(out[i]), list(ref[i])) for i in bad[:3]]


def test_mixture_of_experts_through_the_engine():
    """Mixtral (the tiny fixture, float32): concurrent requests through the engine (graph-replayed decode steps of
    several batch buckets; routing, grouping and the grouped expert GEMV on the device) give the one-call path's
    tokens; a prefill long enough for the per-expert GEMMs (>= 64 slots) too."""
    def load(**kw):
        return fastload.AutoModelForCausalLM.from_pretrained(str(model_dir("mixtral")), device_map="cuda",
                                                             torch_dtype="float32", **kw)
    m, legacy = load(), load(engine=False)
    ps = _prompts(12, seed=5) + [np.random.default_rng(6).integers(3, 500, size=80).astype(np.int64)]
    ref = [_gen(legacy, p, 24) for p in ps]
    start = threading.Barrier(len(ps))

    def run(p):
        start.wait()
        return _gen(m, p, 24)
    with ThreadPoolExecutor(len(ps)) as ex:
        out = list(ex.map(run, ps))
    bad = [i for i in range(len(ps)) if not np.array_equal(out[i], ref[i])]
    assert not bad, [(list(out[i]), list(ref[i])) for i in bad[:3]]


def test_forwards_from_threads_beside_generate_equal_alone(gold):
    """forward() is a request of the engine (csrc/engine.h): its driver thread runs it between decode steps (graph
    replays), with a transient cache of its own B x T slots. Forwards from threads while requests decode equal the same
    forward alone, bit for bit in float32 (the same rectangular pass on the same stream: one shape, one cuBLAS choice),
    and the requests keep the one-call path's tokens. Forwards of more rows than the engine reserved logits for grow
    the workspace between decode steps: the captured decode graphs are then recaptured, never replayed on freed
    buffers."""
    m, legacy = gold
    ps = _prompts(8, seed=7)
    ref = [_gen(legacy, p, 24) for p in ps]
    rng = np.random.default_rng(8)
    xs = [rng.integers(3, 500, size=(int(rng.integers(1, 4)), int(rng.integers(1, 120)))) for _ in range(8)]
    masks = []
    for k, x in enumerate(xs):  # every other one left-padded by k positions (the last always attended)
        mk = np.ones(x.shape, np.int64)
        mk[:, :min(k, x.shape[1] - 1)] = 0
        masks.append(None if k % 2 else mk)
    alone = [m(x, attention_mask=mk).logits for x, mk in zip(xs, masks)]

    def call(k):
        return _gen(m, ps[k // 2], 24) if k % 2 else m(xs[k // 2], attention_mask=masks[k // 2]).logits
    with ThreadPoolExecutor(8) as ex:
        out = list(ex.map(call, range(16)))
    bad = [k for k in range(16) if not np.array_equal(out[k], ref[k // 2] if k % 2 else alone[k // 2], equal_nan=not k % 2)]
    assert not bad, bad
    st = m.engine_stats()
    assert st["forwards_running"] == 0 and st["forwards_waiting"] == 0 and st["running"] == 0, st


def test_forward_makes_no_pool_and_frees_its_cache():
    """A model that only runs forwards holds no KV pool (it is made at the first generate), and each forward's
    transient cache is freed by the step that ran it: device memory is back to its level after every call."""
    m = _load()
    x = np.random.default_rng(9).integers(3, 500, size=(2, 100))
    want = m(x).logits  # the engine starts; the workspace grows to 200 rows
    before = fastload.cuda.memory_allocated()
    for _ in range(3):
        assert np.array_equal(m(x).logits, want)
        assert fastload.cuda.memory_allocated() == before
    ms, st = m.memory_stats(), m.engine_stats()
    assert ms["kv_cache_pool"] == 0 and st["n_pages"] == 0, (ms, st)
    assert st["forward_kv_peak"] == ms["kv_cache_last"] > 0 and st["forwards"] == 4, (ms, st)
    m.generate(x[:1], max_new_tokens=2)
    assert m.memory_stats()["kv_cache_pool"] > 0


@pytest.mark.parametrize("dtype,quant,tol", [("float32", None, 1e-5), ("bfloat16", None, 2e-2), ("float32", "int4", 1e-4)])
def test_long_forward_in_chunks_equals_one_pass(dtype, quant, tol):
    """A forward longer than prefill_chunk (B x T tokens) is read in chunks, one a step, on the GPU too (a chunk's
    keys after the first come from the forward's own cache, with the key mask): its logits equal the one pass of an
    engine whose prefill_chunk holds it whole (relative L2 within tol: float32 rounding; bf16 activations rounded
    between matmuls of other row counts), with left padding; the chunk count in forward_chunks; memory back after."""
    kw = {"quantization_config": fastload.QuantConfig(scheme=quant)} if quant else {}
    whole, m = _load(dtype, **kw), _load(dtype, **kw)
    m.configure_engine(prefill_chunk=16)
    rng = np.random.default_rng(10)
    x = rng.integers(3, 500, size=(2, 150))
    mk = np.ones(x.shape, np.int64)
    mk[1, :37] = 0
    for job, chunks in ((dict(input_ids=x[:1]), 10), (dict(input_ids=x, attention_mask=mk), 19)):
        want = whole(**job).logits
        n0 = m.engine_stats()["forward_chunks"] if m.engine_stats() else 0
        got = m(**job).logits
        assert m.engine_stats()["forward_chunks"] - n0 == chunks
        assert np.isfinite(got).all()
        err = float(np.linalg.norm(got - want) / np.linalg.norm(want))
        assert err < tol, (job.keys(), err)
        assert np.array_equal(m(**job).logits, got)  # the same cut, the same bits
    before = fastload.cuda.memory_allocated()
    m(x, attention_mask=mk)
    assert fastload.cuda.memory_allocated() == before and m.engine_stats()["forwards_running"] == 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_many_logits_through_pinned_buffers_equal_the_plain_copy(dtype, monkeypatch):
    """A forward's logits of every position past two pinned buffers' worth (16.8M floats: 4 x 4200 positions x 600)
    go to the host through the pinned double buffer and several host threads (FASTLOAD_LOGITS_PIN=1, the default):
    the same bits as the plain device-to-host copy (FASTLOAD_LOGITS_PIN=0), in a fresh array and in pieces that do not
    end on a buffer's edge; the pinned path's 64 MiB are host memory, no device byte is left behind."""
    x = np.random.default_rng(11).integers(3, 500, size=(4, 4200))
    mk = np.ones(x.shape, np.int64)
    mk[3, :1234] = 0
    got = {}
    for pin in ("0", "1"):
        monkeypatch.setenv("FASTLOAD_LOGITS_PIN", pin)
        m = _load(dtype)
        m.configure_engine(prefill_chunk=65536)  # one pass: all 16.8M logits in one copy
        got[pin] = m(x, attention_mask=mk).logits
        before = fastload.cuda.memory_allocated()
        assert np.array_equal(m(x, attention_mask=mk).logits, got[pin])
        assert fastload.cuda.memory_allocated() == before
        del m
    assert got["1"].shape == (4, 4200, 600) and np.isfinite(got["1"]).all()
    assert np.array_equal(got["0"], got["1"])


def test_huge_declared_context_decodes_past_the_first_length_bucket(tmp_path):
    """A config declaring max_position_embeddings 2^31 - 1: the engine's decode graphs come in table-length buckets
    (256, 512, ... slots up to the pool's pages), counted from max_pages << page_shift. Before 884e39b that shift
    passed INT_MAX, the count stopped at one bucket, and a row longer than 256 tokens replayed a graph whose table
    described 256 slots: tokens silently wrong. A 250-token prompt and 30 new tokens cross into the second bucket;
    the greedy tokens equal those of the same weights declaring 4096 positions (same float32 kernels)."""
    from golden_util import checkpoint_copy
    p = np.random.default_rng(11).integers(3, 500, size=250).astype(np.int64)
    out = {}
    for n in (4096, 2 ** 31 - 1):
        d = checkpoint_copy("qwen2", tmp_path / str(n), config={"max_position_embeddings": n})
        m = fastload.AutoModelForCausalLM.from_pretrained(str(d), device_map="cuda", torch_dtype="float32")
        out[n] = _gen(m, p, 30)
        del m
    np.testing.assert_array_equal(out[2 ** 31 - 1], out[4096])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_scores_and_logits_beside_device_argmax_rows(dtype):
    """Rows keeping their scores take their logits to the host (no device argmax, no pipelined chaining) while
    plain greedy rows of the same decode steps keep the device's: every row's tokens equal it alone without
    scores, and each step's kept logits are the model's at that position (a forward over the prefix) within the
    dtype's rounding; a sampled row's scores hold -inf outside its top-k."""
    m = _load(dtype)
    ps = _prompts(6, seed=21)
    plain = [_gen(m, p, 12) for p in ps]
    keep = [dict(return_dict_in_generate=True, output_scores=True, output_logits=True) if i % 2 else {}
            for i in range(len(ps))]
    out = [None] * len(ps)

    def run(i):
        out[i] = m.generate(ps[i][None], max_new_tokens=12, eos_token_id=[], **keep[i])
    ths = [threading.Thread(target=run, args=(i,)) for i in range(len(ps))]
    for t in ths:
        t.start()
    for t in ths:
        t.join(120)
    tol = 1e-4 if dtype == "float32" else 3e-2
    for i, p in enumerate(ps):
        seq = out[i].sequences if keep[i] else out[i]
        got = np.asarray(seq[0, len(p):])
        if dtype != "float32" and not np.array_equal(got, plain[i]):
            # bf16: a batch of another size runs other matmul kernels (README "Many callers"), so a near-tie may break
            # the other way (seen on an H100, 2026-12-05: row 0, step 8, on this random-weight model). Accept only
            # that: at the first difference the two tokens' logits over the common prefix are within the rounding.
            t = int(np.argmax(got != plain[i]))
            ref = np.asarray(m(np.concatenate([p, got[:t]])[None]).logits[0, -1], np.float64)
            assert abs(ref[got[t]] - ref[plain[i][t]]) <= tol * np.abs(ref).max(), (i, t, got, plain[i])
            continue
        assert np.array_equal(got, plain[i]), i
        if not keep[i]:
            continue
        assert len(out[i].scores) == len(out[i].logits) == 12
        for t in (0, 5, 11):
            ref = m(seq[:, :len(p) + t]).logits[0, -1]
            lg = out[i].logits[t][0]
            assert np.abs(lg - ref).max() <= tol * np.abs(ref).max(), (i, t)
            np.testing.assert_array_equal(out[i].scores[t][0], lg)  # greedy, no penalty: the logits as they came
    o = m.generate(ps[0][None], max_new_tokens=6, do_sample=True, top_k=7, seed=3, eos_token_id=[],
                   return_dict_in_generate=True, output_scores=True)
    assert all(7 <= np.isfinite(s[0]).sum() <= 12 for s in o.scores)  # ties with the 7th are kept
    assert np.array_equal(o.sequences, m.generate(ps[0][None], max_new_tokens=6, do_sample=True, top_k=7, seed=3,
                                                  eos_token_id=[]))
    assert m.engine_stats()["pages_used"] == 0


def test_beam_search_on_the_gpu_equals_the_reference():
    """Beam search on CUDA (tests/test_beam_search.py on the CPU): the beams are rows of the engine's decode steps, a
    forking beam's partly filled last page is copied on the device (convert_d) before the next step reads it. Held to
    the numpy port of transformers' algorithm on this model's own logits, float32, every case, prompts that end inside
    a page and past one. Scores within 1e-4: the reference reads every step as a whole-sequence forward, the engine
    through its decode kernels (the split-K attention), which differ by a few 1e-5 on log-probs of ~1-50."""
    import test_beam_search as tb
    m = _load("float32")
    for i, case in enumerate(tb.CASES):
        for plen in (5, 33):
            p = tb._prompt(plen, i)
            tb._check(m, p, tb._case(m, p, case), tol=1e-4)


def test_beam_search_on_the_gpu_shares_pages_and_runs_beside_others():
    """K beams of a 100-token prompt hold its full pages once; beam searches and greedy requests from threads give the
    answers each gives alone (float32: batch sizes change only the rounding), and every page comes back."""
    import test_beam_search as tb
    m = _load("float32")
    m.configure_engine(kv_page_tokens=16)
    p = tb._prompt(100, 3)
    out = np.asarray(m.generate(p[None], num_beams=4, max_new_tokens=6, eos_token_id=None, pad_token_id=0))
    assert out.shape == (1, 106) and m.engine_stats()["peak_pages_used"] <= 6 + 4 + 4, m.engine_stats()
    tb.threads_match_alone(m, rounds=1)
