"""The generation sampler against numpy's reading of transformers' rules: temperature, top-k
(ties kept), top-p (smallest prefix reaching p), repetition penalty; seeded and reproducible.
Empirical frequencies over 40000 draws must match the target distribution (max abs error < 0.01)."""
import numpy as np
import pytest

from fastload import _C

N = 40000


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def target(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.0, epsilon_cutoff=0.0, eta_cutoff=0.0):
    x = logits.astype(np.float64) / temperature
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, -np.inf)
    if top_p < 1:
        p = softmax(x)
        order = np.argsort(-x, kind="stable")
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, top_p) + 1)]
        y = np.full_like(x, -np.inf)
        y[keep] = x[keep]
        x = y
    if min_p:  # transformers' MinPLogitsWarper: keep p >= min_p * max p
        p = softmax(x)
        x = np.where(p >= min_p * p.max(), x, -np.inf)
    if typical_p:  # TypicalLogitsWarper: by |-log p - H|, up to the first reaching the mass (ties with it kept)
        p = softmax(x)
        with np.errstate(divide="ignore", invalid="ignore"):
            lp = np.log(p)
            h = -np.nansum(p * lp)
            d = np.abs(-lp - h)
        order = np.argsort(d, kind="stable")
        last = min(int((np.cumsum(p[order]) < typical_p).sum()), len(x) - 1)
        x = np.where((d <= d[order[last]]) | (np.arange(len(x)) == order[0]), x, -np.inf)
    for name, cut in (("epsilon", epsilon_cutoff), ("eta", eta_cutoff)):  # keep p >= the cutoff, and the most likely
        if cut:
            p = softmax(x)
            if name == "eta":
                with np.errstate(divide="ignore", invalid="ignore"):
                    h = -np.nansum(p * np.log(p))
                cut = min(cut, np.sqrt(cut) * np.exp(-h))
            x = np.where((p >= cut) | (x == x.max()), x, -np.inf)
    return softmax(x)


def freq(draws, v):
    return np.bincount(draws, minlength=v) / len(draws)


LOGITS = np.random.default_rng(0).normal(size=50).astype(np.float32) * 2


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(temperature=2.0), dict(top_k=5), dict(top_p=0.7),
                                dict(top_k=10, top_p=0.8, temperature=0.7), dict(min_p=0.1),
                                dict(min_p=0.3, temperature=1.5), dict(top_p=0.9, min_p=0.05, top_k=20),
                                dict(typical_p=0.5), dict(typical_p=0.9, temperature=0.8, top_k=30),
                                dict(epsilon_cutoff=0.02), dict(eta_cutoff=0.05), dict(eta_cutoff=0.3, top_p=0.95)])
def test_distribution(kw):
    draws = _C.sample(LOGITS, N, True, seed=123, **kw)
    assert np.abs(freq(draws, 50) - target(LOGITS, **kw)).max() < 0.01


def test_top_k_keeps_ties():
    lg = np.array([3, 1, 3, 3, 0], np.float32)
    d = _C.sample(lg, 3000, True, top_k=1, seed=1)
    assert set(np.unique(d)) == {0, 2, 3}


def test_greedy_is_first_argmax():
    lg = np.array([1, 5, 5, 2], np.float32)
    assert (_C.sample(lg, 5, False) == 1).all()


def test_seeded_reproducible():
    a = _C.sample(LOGITS, 100, True, seed=7)
    b = _C.sample(LOGITS, 100, True, seed=7)
    c = _C.sample(LOGITS, 100, True, seed=8)
    assert (a == b).all() and not (a == c).all()


def test_repetition_penalty_rule():
    lg = np.array([2.0, -2.0, 1.0, 0.5], np.float32)
    # penalised: token 0 -> 2/2 = 1.0 ; token 1 -> -2*2 = -4 ; greedy then picks token 2 (1.0 ties 1.0 -> first = 0)
    assert _C.sample(lg, 1, False, repetition_penalty=2.0, seen=np.array([0, 1, 0]))[0] == 0
    assert _C.sample(lg, 1, False, repetition_penalty=2.5, seen=np.array([0]))[0] == 2
    pen = lg.copy()
    pen[0] /= 1.3
    pen[1] *= 1.3
    draws = _C.sample(lg, N, True, repetition_penalty=1.3, seen=np.array([1, 0]), seed=5)
    assert np.abs(freq(draws, 4) - softmax(pen.astype(np.float64))).max() < 0.01
