"""The CPU backend's weight arena in transparent huge pages (csrc/fl_common.c fl_advise_huge, called by model.c for a
host-memory backend before the load writes the arena): decode streams every weight each token, and with 4 KiB pages
each 4 KiB of weights costs a TLB miss. Where the pages are changes no value: logits are the same bits either way.
FASTLOAD_HUGEPAGES=0 (read at load) keeps 4 KiB pages."""
import os
import sys

import numpy as np
import pytest

import fastload

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or not os.path.exists(THP),
                                reason="transparent huge pages are a Linux kernel feature (no " + THP + " here)")


def _anon_huge_kb():
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1])
    return 0


def _vmstat(key):
    with open("/proc/vmstat") as f:
        for line in f:
            k, v = line.split()
            if k == key:
                return int(v)
    return 0


def _load(path, env, monkeypatch):
    if env is None:
        monkeypatch.delenv("FASTLOAD_HUGEPAGES", raising=False)
    else:
        monkeypatch.setenv("FASTLOAD_HUGEPAGES", env)
    return fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


def test_arena_advised_by_default_and_same_bits(demo_gguf, monkeypatch):
    ids = np.array([[1, 450, 4996, 17354, 1701, 373]])
    off = _load(demo_gguf, "0", monkeypatch)
    assert off.load_stats["huge_pages"] is False
    ref = off(ids).logits
    del off
    mode = open(THP).read()
    huge0, fallback0 = _anon_huge_kb(), _vmstat("thp_fault_fallback")
    on = _load(demo_gguf, None, monkeypatch)
    # the advice is taken (madvise accepted it) unless the kernel's THP setting is "never", where it would do nothing
    assert on.load_stats["huge_pages"] is ("[never]" not in mode)
    if "[never]" not in mode:
        grown_mb = (_anon_huge_kb() - huge0) / 1024
        if grown_mb < 0.25 * on.load_stats["weight_bytes"] / 2**20:
            if _vmstat("thp_fault_fallback") > fallback0:
                pytest.skip("the kernel had no free 2 MiB pages for the arena (thp_fault_fallback grew)")
            pytest.fail(f"THP mode {mode.strip()!r}: only {grown_mb:.0f} MB of huge pages appeared for a "
                        f"{on.load_stats['weight_bytes'] / 2**20:.0f} MB arena")
    np.testing.assert_array_equal(on(ids).logits, ref)


def test_kv_pool_only_at_level_2(demo_gguf, monkeypatch):
    """The KV pool is advised only with FASTLOAD_HUGEPAGES=2 (it would otherwise grow in 2 MiB steps a layer's K or V
    region from the first token); the same greedy tokens either way."""
    ids = np.array([[1, 450, 4996, 17354, 1701, 373]])
    outs = []
    for env, want in (("1", False), ("2", True)):
        m = _load(demo_gguf, env, monkeypatch)
        outs.append(m.generate(ids, max_new_tokens=12, do_sample=False))
        never = "[never]" in open(THP).read()
        assert m.engine_stats()["pool_huge_pages"] is (want and not never)
        assert m.load_stats["huge_pages"] is not never
        del m
    np.testing.assert_array_equal(outs[0], outs[1])
