"""Load time of the demo model against the raw read rate of its file (`python -m fastload bench load`'s
measurement, fastload.bench.cmd_load), transformers as the peer when installed; on a GPU (test_gpu.py) the PCIe
host-to-device copy rate too."""
from __future__ import annotations

import importlib.util


def test_cpu_load(record, demo_model, bench_cli, bench_full):
    load_benchmark(record, bench_cli, demo_model, "cpu", bench_full, suffix=".gguf")


def load_benchmark(record, bench_cli, model, device, full, suffix):
    """`bench load` on `model`, recorded with the raw read rate as the ceiling (shared with test_gpu.py)."""
    argv = ["load", "--model", model, "--device", device, "--repeat", "3" if full else "1"]
    if not full:
        argv.append("--no-cold")  # evicting the page cache is slow on a shared CI machine
    if all(importlib.util.find_spec(m) for m in ("torch", "transformers")):
        argv += ["--peer", "transformers"]
    doc = bench_cli(argv)
    rows = {(r["engine"], r["cache"]): r for r in doc["rows"]}
    fl, raw = rows[("fastload", "warm")], rows[("raw read", "warm")]
    peer_row = rows.get(("transformers", "warm"))
    peer = ({"name": "transformers", "warm_GBps": peer_row["gb_per_s"],
                                           "warm_s": peer_row["seconds_median"]} if peer_row else
            {"error": doc["peer"]["transformers"]["error"]} if doc["peer"].get("transformers") else
            {"skipped": "torch / transformers not installed"})
    figures = {"warm_GBps": fl["gb_per_s"], "warm_s": fl["seconds_median"], "bytes": doc["bytes"],
               "core_warm_s": fl["core_seconds_median"], "raw_read_warm_s": raw["seconds_median"]}
    pcie = rows.get(("PCIe host-to-device", "any"))  # a GPU run: the pinned host-to-device copy rate
    if pcie:
        figures["pcie_h2d_GBps"] = pcie["gb_per_s"]
    if ("fastload", "cold") in rows:
        figures["cold_s"] = rows[("fastload", "cold")]["seconds_median"]
        figures["raw_read_cold_s"] = rows[("raw read", "cold")]["seconds_median"]
    record(figures, unit="GB/s", ceiling=raw["gb_per_s"], ceiling_how="raw read of the same file: " + raw["how"],
           peer=peer,
           device=device, config={"model": model, "repeat": fl["runs"], "notes": doc["notes"]})
    assert doc["bytes"] > 0 and fl["bytes"] == doc["bytes"]
    assert fl["runs"] >= 1 and fl["seconds_median"] > 0 and raw["seconds_median"] > 0
    assert doc["files"] and all(f.endswith(suffix) for f in doc["files"])
    return doc
