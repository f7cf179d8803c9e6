"""Pieces the CPU benchmark scripts share (run as `python benchmarks/X.py`, so this folder is on sys.path)."""
import os
import subprocess
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def fl_rate(m, ids, new, **kw):
    """fastload's decode tok/s for `new` tokens after the prompt `ids` (greedy, eos ignored): a generate of new + 1
    tokens less a generate of 1 (the prompt's forward and the first token)."""
    kw = dict(dict(do_sample=False, eos_token_id=[]), **kw)
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=1, **kw)
    ttft = time.perf_counter() - t0
    t0 = time.perf_counter()
    m.generate(ids, max_new_tokens=new + 1, **kw)
    return new / (time.perf_counter() - t0 - ttft)


def git_commit(default=""):
    """The short commit of this checkout, for the results files; `default` where git cannot say."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=HERE).stdout.strip() or default
    except OSError:
        return default
