"""Perplexity, memory and tokens/s of every quantisation mode on a short slice of benchmarks/data
(`python -m fastload bench perplexity`'s measurement, fastload.bench.perplexity_modes)."""
from __future__ import annotations

import math


def test_cpu_perplexity(record, demo_model, bench_cli, bench_full):
    argv = ["perplexity", "--model", demo_model, "--device", "cpu"]
    argv += ["--context", "2048"] if bench_full else ["--max_chars", "1500", "--context", "128",
                                                       "--generate_length", "8"]
    doc = bench_cli(argv)
    rows = {r["mode"]: r for r in doc["rows"]}
    figures = {f"{m}_word_perplexity": r.get("word_perplexity") for m, r in rows.items()}
    for m, r in rows.items():
        figures[f"{m}_perplexity"] = r.get("perplexity")
        figures[f"{m}_weight_bytes"] = r.get("weight_bytes")
        figures[f"{m}_scoring_tokens_per_s"] = r.get("tokens_per_s")
        figures[f"{m}_decode_tokens_per_s"] = r.get("decode_tokens_per_s")
        figures[f"{m}_word_ppl_vs_fp16_pct"] = r.get("word_ppl_vs_fp16_pct")
    note = ", ".join(f"{m} {r['word_ppl_vs_fp16_pct']:+.2f}%" for m, r in rows.items()
                     if r.get("word_ppl_vs_fp16_pct") is not None)
    record(figures, main="fp16_word_perplexity", config={"argv": argv, "rows": doc["rows"]},
           note=f"word perplexity vs fp16: {note}")
    assert set(rows) == {"fp16", "int8", "int4", "nf4", "gguf"}
    for m, r in rows.items():
        assert "error" not in r, (m, r.get("error"))
        assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1, m
        assert math.isfinite(r["word_perplexity"]) and r["tokens"] > 100, m
    # the reference is float, the quantised modes really hold quantised weights and fewer bytes
    assert not rows["fp16"].get("quantized_weights")
    for m in ("int8", "int4", "nf4"):
        assert rows[m]["held_quantised"] is True, m
        assert rows[m]["weight_bytes"] < rows["fp16"]["weight_bytes"], m
    assert rows["int4"]["weight_bytes"] < rows["int8"]["weight_bytes"]
    # every mode scored the same tokens of the same text
    assert len({r["tokens"] for r in rows.values()}) == 1
