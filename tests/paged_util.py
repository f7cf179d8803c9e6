"""Paged KV-cache fixtures shared by the CPU and CUDA op tests: a rectangular cache scattered into a pool of pages
through a random block table, and the per-row reference (each row alone, rectangular, on the CPU backend)."""
import numpy as np

from fastload import _C


def paged_case(rng, B, T, nh, nkv, hd, L, shift, starts=None):
    """Random q|k|v for B rows of T tokens, rectangular caches [B, L, nkv, hd], per-row starts (slots of the new
    tokens: starts[b] .. starts[b] + T - 1 < L), and the same caches as a shuffled pool [n_pages, page, nkv, hd]
    with its block table [B, ceil(L / page)]. Two spare pages are never named by the table."""
    page = 1 << shift
    nb = (L + page - 1) // page
    qkv = rng.standard_normal((B * T, (nh + 2 * nkv) * hd), dtype=np.float32)
    kc = rng.standard_normal((B, nb * page, nkv, hd), dtype=np.float32)
    vc = rng.standard_normal((B, nb * page, nkv, hd), dtype=np.float32)
    if starts is None:
        starts = rng.integers(0, L - T + 1, B).astype(np.int32)
    n_pages = B * nb + 2
    perm = rng.permutation(n_pages).astype(np.int32)
    table = perm[:B * nb].reshape(B, nb)
    kp = rng.standard_normal((n_pages, page, nkv, hd), dtype=np.float32)
    vp = rng.standard_normal((n_pages, page, nkv, hd), dtype=np.float32)
    for b in range(B):
        for i in range(nb):
            kp[table[b, i]] = kc[b, i * page:(i + 1) * page]
            vp[table[b, i]] = vc[b, i * page:(i + 1) * page]
    return {"qkv": qkv, "kc": kc[:, :L], "vc": vc[:, :L], "starts": np.asarray(starts, np.int32), "table": table,
            "kp": kp, "vp": vp, "shift": shift, "B": B, "T": T, "nh": nh, "nkv": nkv, "hd": hd, "L": L}


def per_row_reference(case, window=0, act="float32"):
    """Attention of each row alone (B = 1, rectangular cache, its own start) on the CPU backend."""
    c = case
    outs = []
    for b in range(c["B"]):
        rows = c["qkv"][b * c["T"]:(b + 1) * c["T"]]
        got = _C.run_op("cpu", "attention", {"qkv": rows, "k_cache": c["kc"][b:b + 1], "v_cache": c["vc"][b:b + 1]},
                        {"B": 1, "T": c["T"], "start": int(c["starts"][b]), "n_heads": c["nh"], "n_kv_heads": c["nkv"],
                         "window": window, "scale": 1.0 / np.sqrt(c["hd"]), "act": act})
        outs.append(got["out"])
    return np.concatenate(outs)


def paged_attention(dev, case, window=0, act="float32"):
    c = case
    return _C.run_op(dev, "attention", {"qkv": c["qkv"], "k_cache": c["kp"], "v_cache": c["vp"], "block_table": c["table"],
                                        "starts": c["starts"]},
                     {"B": c["B"], "T": c["T"], "n_heads": c["nh"], "n_kv_heads": c["nkv"], "window": window,
                      "page_shift": c["shift"], "scale": 1.0 / np.sqrt(c["hd"]), "act": act})["out"]
