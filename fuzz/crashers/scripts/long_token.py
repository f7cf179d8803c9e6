"""Building a GGUF sentencepiece tokenizer takes time quadratic in the longest token
(fastload/gguf_tokenizer.py _merges_from_scores: every split of every token, each split slicing
and hashing the token). Writes /tmp/long-token-N.gguf (the tiny llama model of fuzz/tiny_models.py
plus one token of N 'a's) and times fastload.AutoTokenizer.from_pretrained on it.

    PYTHONPATH=. python3 fuzz/crashers/scripts/long_token.py 40000     # main: ~1.6 s (56 KB file)
    PYTHONPATH=. python3 fuzz/crashers/scripts/long_token.py 200000    # main: ~40 s (216 KB file)
"""
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import tiny_models as tm  # noqa: E402
import fastload  # noqa: E402

n = int(sys.argv[1]) if len(sys.argv) > 1 else 40000
w = tm.gguf_model(arch="llama", tokenizer="llama")
extra = {"tokenizer.ggml.tokens": "a" * n, "tokenizer.ggml.scores": -99.0, "tokenizer.ggml.token_type": 1}
w.kvs = [(k, vt, v + [extra[k]] if k in extra else v, at) for k, vt, v, at in w.kvs]
p = f"/tmp/long-token-{n}.gguf"
w.write(p)
t0 = time.time()
try:
    fastload.AutoTokenizer.from_pretrained(p)
    what = "loaded"
except BaseException as e:  # noqa: BLE001
    what = f"{type(e).__name__}: {str(e)[:100]}"
print(f"{what}: token of {n} chars, {os.path.getsize(p)} byte file, {time.time() - t0:.2f} s")
