"""numpy's reading of transformers' sampling warpers, shared by tests/test_sampling.py (the distribution the sampler
draws from, in float64) and tests/test_generate_scores.py (the scores generate returns, in float32 as the sampler
computes them): the dtype of `x` decides which."""
import numpy as np


def log_softmax64(x):
    x = np.asarray(x, np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


def warp(x, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, typical_p=0.0, epsilon=0.0, eta=0.0):
    """Temperature, TopK (ties with the k-th kept), TopP, MinP (p >= min_p * max p), Typical (by |-log p - H|, up to
    the first reaching the mass, ties with it kept), Epsilon and Eta (p >= the cutoff, and the most likely), in
    transformers' order; -inf outside. Probabilities in float64 whatever the dtype of x."""
    ninf = x.dtype.type(-np.inf)
    if temperature != 1.0:
        x = x / np.float32(temperature)
    if top_k:
        kth = np.sort(x)[::-1][top_k - 1]
        x = np.where(x >= kth, x, ninf)
    if top_p < 1:
        p = np.exp(log_softmax64(x))
        order = np.argsort(-x, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)]
        y = np.full_like(x, -np.inf)
        y[keep] = x[keep]
        x = y
    if min_p:
        p = np.exp(log_softmax64(x))
        x = np.where(p >= min_p * p.max(), x, ninf)
    if typical_p:
        lp = log_softmax64(x)
        p = np.exp(lp)
        with np.errstate(invalid="ignore"):
            d = np.abs(-lp - (-np.nansum(p * lp)))
        order = np.argsort(d, kind="stable")
        last = min(int((np.cumsum(p[order]) < typical_p).sum()), len(x) - 1)
        x = np.where((d <= d[order[last]]) | (np.arange(len(x)) == order[0]), x, ninf)
    for name, cut in (("epsilon", epsilon), ("eta", eta)):
        if cut:
            lp = log_softmax64(x)
            p = np.exp(lp)
            if name == "eta":
                with np.errstate(invalid="ignore"):
                    cut = min(cut, np.sqrt(cut) * np.exp(np.nansum(p * lp)))
            x = np.where((p >= cut) | (x == x.max()), x, ninf)
    return x
