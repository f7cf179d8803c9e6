"""fastload.evaluate.perplexity against the same numbers computed with transformers (torch), same token ids, same
windows. Needs torch + transformers (the GPU machine has both; no network).

    python3 benchmarks/perplexity_vs_transformers.py [--device cuda] [--outputs_dir DIR]

Prints a table and writes perplexity-vs-transformers_<models>_<UTC time>.csv and .json into --outputs_dir (default
benchmarks/results/perplexity-vs-transformers) with fastload.bench's writer (device, date, versions, commit; written
whole or not at all), as `python -m fastload bench` does.

Models:
  * tiny: the random-weight safetensors fixtures tests/fixtures/llama (bf16, 3 shards) and tests/fixtures/qwen2
    (written by transformers' save_pretrained, see tests/fixtures/README.md), with a byte tokenizer (token = UTF-8
    byte, bos 256), so no tokenizer file is involved;
  * demo: the demo GGUF (SmolLM2-135M-Instruct, Q4_1) loaded by fastload with its weights dequantised, written with
    fastload's model.save_pretrained (safetensors, Hugging Face names) and read back by both libraries in float32;
    token ids from fastload's tokenizer of the GGUF.
Methods: lm-evaluation-harness's rolling windows and transformers' strided recipe (the guide, run literally
with labels=). The transformers side is written here from the two sources (lm_eval/utils.py
get_rolling_token_windows + make_disjoint_window; docs/source/en/perplexity.md), not through fastload.evaluate.
Both run in float32 on --device; the relative differences measure the two forward passes, since tokens,
windows and the arithmetic after the logits are the same definitions.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import sys
import tempfile
import time


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
TEXT_PATH = os.path.join(HERE, "data", "devils_dictionary.txt")
KEYS = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
PVT_COLUMNS = (["model", "method", "context", "stride", "device", "tokens", "windows", "words", "bytes"]
               + [f"{side}_{k}" for k in KEYS + ("recipe_perplexity",) for side in ("fastload", "transformers",
                                                                                     "rel_diff")]
               + ["transformers_version"])
PVT_SHOWN = ["model", "method", "context", "stride", "tokens", "fastload_perplexity", "transformers_perplexity",
             "rel_diff_perplexity", "rel_diff_word_perplexity", "rel_diff_bits_per_byte"]


class ByteTokenizer:
    """token = UTF-8 byte value; bos 256, eos 257 (inside the tiny fixtures' vocabularies of 512 and 600)."""
    bos_token_id, eos_token_id, model_max_length = 256, 257, None

    def encode(self, text, add_special_tokens=True):
        return ([self.bos_token_id] if add_special_tokens else []) + list(text.encode("utf-8"))


# ---------------------------------------------------------------- transformers side
def hf_rolling(model, toks, max_len, prefix, torch, device):
    """Sum of log p over the document in lm-evaluation-harness's rolling windows (context_len=1)."""
    ll, n, pred_len, predicted = 0.0, len(toks), max_len, 0
    pairs = []
    first = min(max_len, n)
    pairs.append(([prefix] + toks[:first - 1], toks[:first]))
    predicted = first
    while predicted < n:
        k = min(n - predicted, pred_len)
        end = predicted + k
        pairs.append((toks[end - max_len - 1:end - 1], toks[end - k:end]))
        predicted += k
    for ctx, cont in pairs:
        ctx = ctx[:len(ctx) - (len(cont) - 1)]                 # make_disjoint_window
        inp = (ctx + cont)[-(max_len + 1):][:-1]                # huggingface.py _loglikelihood_tokens
        with torch.no_grad():
            logits = model(torch.tensor([inp], device=device)).logits[0, -len(cont):]
            lp = torch.log_softmax(logits.double(), dim=-1)
            ll += float(lp.gather(-1, torch.tensor(cont, device=device)[:, None]).sum())
    return ll, n, len(pairs)


def hf_strided(model, ids, max_length, stride, torch, device):
    """The guide's loop, literally (loss from labels=), plus the exact sum of log p over the same targets."""
    enc = torch.tensor([ids], device=device)
    seq_len = enc.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    ll, n, windows = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = enc[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss
            lp = torch.log_softmax(outputs.logits[0, :-1].double(), dim=-1)
            lab = target_ids[0, 1:]
            ok = lab != -100
            ll += float(lp[ok].gather(-1, lab[ok][:, None]).sum())
            n += int(ok.sum())
        num_valid_tokens = (target_ids != -100).sum().item()
        num_loss_tokens = num_valid_tokens - target_ids.size(0)
        nll_sum += float(neg_log_likelihood) * num_loss_tokens
        n_tokens += num_loss_tokens
        windows += 1
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return ll, n, windows, math.exp(nll_sum / n_tokens)


def numbers(ll, tokens, text):
    words, nbytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
    return {"perplexity": math.exp(-ll / tokens), "word_perplexity": math.exp(-ll / words),
            "byte_perplexity": math.exp(-ll / nbytes), "bits_per_byte": -ll / (nbytes * math.log(2)),
            "loglikelihood": ll, "tokens": tokens, "words": words, "bytes": nbytes}


def hf_load(path, torch, device):
    import transformers
    try:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except TypeError:
        m = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32)
    return m.to(device).eval(), transformers.__version__


# ---------------------------------------------------------------- one comparison
def compare(name, path, tok, text, context, stride, device, torch, rows):
    import fastload
    from fastload import evaluate
    fdev = "cuda" if device.startswith("cuda") else "cpu"
    fm = fastload.AutoModelForCausalLM.from_pretrained(path, device_map=fdev, torch_dtype="float32")
    hm, tf_version = hf_load(path, torch, device)
    for method, st in (("rolling", None), ("strided", stride)):
        t0 = time.perf_counter()
        fr = evaluate.perplexity(fm, tok, text, context=context, stride=st)
        f_s = time.perf_counter() - t0
        toks = tok.encode(text, add_special_tokens=st is not None)
        t0 = time.perf_counter()
        if st is None:
            prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            ll, n, w = hf_rolling(hm, toks, context, prefix, torch, device)
            hr = numbers(ll, n, text)
        else:
            ll, n, w, rp = hf_strided(hm, toks, context, st, torch, device)
            hr = numbers(ll, n, text)
            hr["recipe_perplexity"] = rp
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        h_s = time.perf_counter() - t0
        hr["windows"] = w
        keys = KEYS + (("recipe_perplexity",) if st is not None else ())
        row = {"model": name, "method": method, "context": context, "stride": st, "device": device,
               "tokens": fr["tokens"], "tokens_transformers": hr["tokens"], "windows": fr["windows"],
               "windows_transformers": hr["windows"], "words": fr["words"], "bytes": fr["bytes"],
               "fastload": {k: fr[k] for k in keys}, "transformers": {k: hr[k] for k in keys},
               "rel_diff": {k: abs(fr[k] - hr[k]) / abs(hr[k]) for k in keys},
               "seconds": {"fastload": f_s, "transformers": h_s}, "transformers_version": tf_version}
        rows.append(row)
        print(f"{name:6s} {method:8s} ctx {context:5d} stride {str(st):5s} tokens {fr['tokens']:7d}/{hr['tokens']:7d} "
              f"windows {fr['windows']}/{hr['windows']}")
        for k in keys:
            print(f"    {k:18s} fastload {fr[k]:14.6f}  transformers {hr[k]:14.6f}  rel diff {row['rel_diff'][k]:.2e}")
        assert fr["tokens"] == hr["tokens"] and fr["windows"] == hr["windows"], "window plans differ"
    del hm
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when torch sees one)")
    ap.add_argument("--tiny-chars", type=int, default=20000, help="characters of the text for the tiny models")
    ap.add_argument("--demo-chars", type=int, default=None, help="characters of the text for the demo model (all)")
    ap.add_argument("--demo-context", type=int, default=2048)
    ap.add_argument("--demo-stride", type=int, default=512)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--outputs_dir", "--outputs-dir", dest="outputs_dir",
                    default=os.path.join(HERE, "results", "perplexity-vs-transformers"),
                    help="where the CSV and JSON go (fastload.bench.Outputs)")
    args = ap.parse_args()
    from fastload import bench
    try:
        out = bench.Outputs(args.outputs_dir)  # checked before the work, written at the end
    except bench.BenchError as e:
        sys.exit(f"perplexity_vs_transformers: {e}")
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as e:
        sys.exit(f"this benchmark needs torch and transformers ({e})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    import fastload
    from fastload.demo import demo_model_path
    with open(TEXT_PATH, encoding="utf-8") as fh:
        text = fh.read()
    rows = []
    tmp = tempfile.mkdtemp(prefix="ppl-vs-tf-")
    try:
        for name in ("llama", "qwen2"):
            compare(name, os.path.join(ROOT, "tests", "fixtures", name), ByteTokenizer(), text[:args.tiny_chars],
                    64, 32, device, torch, rows)
        if not args.skip_demo:
            gguf = demo_model_path()
            # float32 weights dequantised from the GGUF (save_pretrained writes what the model holds; a model that
            # kept the GGUF quantised is dequantised on export too, so either load gives the same file)
            kw = {"quantization_config": fastload.QuantConfig(gguf="dequantize")} if hasattr(fastload, "QuantConfig") else {}
            src = fastload.AutoModelForCausalLM.from_pretrained(gguf, device_map="cpu", torch_dtype="float32", **kw)
            d = os.path.join(tmp, "demo")
            src.save_pretrained(d)
            del src
            tok = fastload.AutoTokenizer.from_pretrained(gguf)
            demo_text = text if args.demo_chars is None else text[:args.demo_chars]
            compare("demo", d, tok, demo_text, args.demo_context, args.demo_stride, device, torch, rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    worst = max(v for r in rows for v in r["rel_diff"].values())
    for r in rows:  # flat columns for the CSV; the JSON keeps the nested dicts too
        for side in ("fastload", "transformers", "rel_diff"):
            r.update({f"{side}_{k}": v for k, v in r[side].items()})
    models = "-".join(dict.fromkeys(r["model"] for r in rows))
    meta = {"benchmark": "perplexity-vs-transformers", "model": models, "environment": bench.environment(device),
            "text": os.path.relpath(TEXT_PATH, ROOT), "worst_rel_diff": worst,
            "method": "lm-evaluation-harness rolling windows and transformers' strided recipe, both sides float32",
            "notes": [f"worst relative difference {worst:.2e}"]}
    bench._finish(out, "perplexity-vs-transformers", models, rows, PVT_COLUMNS, meta, PVT_SHOWN)

if __name__ == "__main__":
    main()
