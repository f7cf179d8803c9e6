"""Quality of fastload's quantised modes on the demo model (issue 9's quality targets), fastload only.

    python3 benchmarks/quant_quality.py [--device cuda] [--context 2048] [--max-chars N] [--outputs_dir DIR]

Modes, each scored with fastload.evaluate.perplexity (lm-evaluation-harness rolling windows) on
benchmarks/data/devils_dictionary.txt with the GGUF's tokenizer:
  fp16     the reference: the demo GGUF (SmolLM2-135M-Instruct, Q4_1) with its weights dequantised, float16
           (from_pretrained(demo, quantization_config=QuantConfig(gguf="dequantize"), torch_dtype="float16"))
  int8     that float reference written with save_pretrained (float16 safetensors) and loaded with int8 quantisation
           at load (from_pretrained(dir, quantization_config="int8"), the same as load_in_8bit=True / FASTLOAD_QUANT);
           int4 and nf4 likewise
  gguf     the GGUF as shipped (Q4_1 kept quantised once issue 9 lands)
The loading and scoring are fastload.bench.perplexity_modes (`python -m fastload bench perplexity` runs the same
for any model); this script adds the issue-9 targets and verdicts. It prints the table and writes
quant-quality_<model>_<UTC time>.csv and .json into --outputs_dir (default benchmarks/results/quant-quality) with
fastload.bench's writer (device, date, versions, commit; written whole or not at all).
Targets (issue 9): word perplexity of int8 within 1% of fp16, int4 within 6%, nf4 within 6%.
Each row also says whether the weights really were held quantised (the core's info["quantized_weights"] and
byte counts, when the build reports them): a mode that silently loaded float weights is flagged, not passed.
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
TEXT_PATH = os.path.join(HERE, "data", "devils_dictionary.txt")
TARGETS = {"int8": 1.0, "int4": 6.0, "nf4": 6.0}  # max % increase of word perplexity over fp16


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when fastload sees one)")
    ap.add_argument("--context", type=int, default=2048, help="rolling window length in tokens")
    ap.add_argument("--max-chars", type=int, default=None, help="score only the first N characters (quick CPU runs)")
    ap.add_argument("--modes", default="fp16,int8,int4,nf4,gguf",
                    help="comma-separated; SCHEME:GROUP (e.g. int4:32) adds a mode with that group size")
    ap.add_argument("--outputs_dir", "--outputs-dir", dest="outputs_dir",
                    default=os.path.join(HERE, "results", "quant-quality"),
                    help="where the CSV and JSON go (fastload.bench.Outputs)")
    args = ap.parse_args()
    import fastload
    from fastload import bench
    from fastload.bench import BenchError, perplexity_modes
    try:
        out = bench.Outputs(args.outputs_dir)  # checked before the work, written at the end
    except BenchError as e:
        sys.exit(f"quant_quality: {e}")
    from fastload.demo import demo_model_path
    device = args.device or ("cuda" if fastload.cuda.is_available() else "cpu")
    gguf = demo_model_path()
    tok = fastload.AutoTokenizer.from_pretrained(gguf)
    with open(TEXT_PATH, encoding="utf-8") as fh:
        text = fh.read()
    if args.max_chars:
        text = text[:args.max_chars]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    try:  # the loading and scoring are fastload.bench's (the same as `python -m fastload bench perplexity`)
        rows = perplexity_modes(gguf, tok, text, modes, device=device, context=args.context,
                                log=lambda line: print(line, flush=True))
    except BenchError as e:
        sys.exit(f"quant_quality: {e}")

    base = rows["fp16"]["word_perplexity"]
    verdict = {}
    for name, row in rows.items():
        if name == "fp16" or "error" in row:
            continue
        row["word_ppl_vs_fp16_pct"] = pct = 100.0 * (row["word_perplexity"] / base - 1.0)
        quantised = bool(row.get("quantized_weights"))
        row["held_quantised"] = quantised if "quantized_weights" in row else None
        if name == "gguf" and not quantised:
            row["note"] = "this fastload dequantises the GGUF at load: the row equals fp16"
        if name in TARGETS:
            ok = pct <= TARGETS[name] and quantised
            verdict[name] = {"target_pct": TARGETS[name], "pct": pct, "held_quantised": row["held_quantised"],
                             "pass": ok}
    print(f"\nword perplexity vs fp16 ({base:.4f}):")
    for name, row in rows.items():
        if name == "fp16":
            continue
        if "error" in row:
            print(f"  {name:5s} not run: {row['error']}")
            continue
        v = verdict.get(name)
        tgt = f"  target <= {v['target_pct']:.0f}%: {'PASS' if v['pass'] else 'FAIL'}" if v else ""
        held = {True: "", False: "  (weights NOT held quantised)", None: "  (quantised? not reported)"}[row["held_quantised"]]
        print(f"  {name:5s} {row['word_perplexity']:10.4f}  {row['word_ppl_vs_fp16_pct']:+7.3f}%{tgt}{held}")
    meta = {"benchmark": "quant-quality", "model": os.path.basename(gguf), "environment": bench.environment(device),
            "text": os.path.relpath(TEXT_PATH, ROOT), "max_chars": args.max_chars, "context": args.context,
            "method": "rolling (lm-evaluation-harness loglikelihood_rolling)", "targets_pct": TARGETS,
            "verdict": verdict, "notes": []}
    table = [{"mode": k, **v} for k, v in rows.items()]
    bench._finish(out, "quant-quality", gguf, table, bench.PPL_COLUMNS + ["note"], meta, bench.PPL_SHOWN)

if __name__ == "__main__":
    main()
