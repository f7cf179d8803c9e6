"""The ChatGLM2 field report on the CPU: model.chat in a for-loop against ThreadPoolExecutor
(`python -m fastload bench concurrency`'s measurement, fastload.bench.cmd_concurrency)."""
from __future__ import annotations


def test_cpu_concurrency(record, demo_model, bench_cli, bench_full):
    mnt = 64 if bench_full else 12
    doc = bench_cli(["concurrency", "--model", demo_model, "--device", "cpu", "--max_new_tokens", str(mnt)])
    loop, pool = doc["rows"]
    record({"pool_tokens_per_s": pool["tokens_per_s"], "loop_tokens_per_s": loop["tokens_per_s"],
            "pool_wall_s": pool["wall_s"], "loop_wall_s": loop["wall_s"], "speedup_vs_loop": pool["speedup_vs_loop"],
            "pool_peak_rss_mb": pool["max_memory_allocated_mb"], "loop_peak_rss_mb": loop["max_memory_allocated_mb"]},
           unit="tok/s", peer={"name": "for-loop", "pool_tokens_per_s": loop["tokens_per_s"]},
           config={"model": demo_model, "max_new_tokens": mnt, "queries": doc["queries_list"],
                   "workers": pool["workers"]})
    # correctness: greedy answers through the pool equal the loop's, one per query, none empty
    assert doc["answers"]["pool"] == doc["answers"]["loop"]
    assert pool["same_answers_as_loop"] is True
    assert len(doc["answers"]["loop"]) == len(doc["queries_list"]) == 5
    assert all(a.strip() for a in doc["answers"]["loop"])
