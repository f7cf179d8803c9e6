"""A load-time monitoring script of the field reports: wall time (time.time) and perf_counter around
from_pretrained (AutoConfig read first, to print the model's size), the loader's own statistics, process and device memory before and after, then the usual
`del model; gc.collect(); torch.cuda.empty_cache()`. Adapted: the import (fastload for transformers,
fastload.cuda for torch.cuda), the model paths (a tiny sharded safetensors fixture and the demo GGUF), torch_dtype
(torch.float16 where torch is installed, "float16" otherwise), RSS read from /proc instead of psutil."""
import gc
import os
import time
import weakref

import pytest

import fastload as transformers
from fastload import cuda as torch_cuda  # the script's torch.cuda
from golden_util import model_dir


def rss_mb():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return 0.0


def gpu_mb():
    return torch_cuda.memory_allocated() / 2 ** 20


def monitor_load(path, torch_dtype):
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=True)
    print(f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, vocab {config.vocab_size}")
    before = (rss_mb(), gpu_mb())
    print(f"before load: rss {before[0]:.0f} MiB, gpu {before[1]:.0f} MiB")
    t0, p0 = time.time(), time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch_dtype, device_map="auto",
                                                              low_cpu_mem_usage=True)
    wall, perf = time.time() - t0, time.perf_counter() - p0
    print(f"from_pretrained: {wall:.3f} s wall, {perf:.3f} s perf_counter")
    print("load_stats:", model.load_stats)
    after = (rss_mb(), gpu_mb())
    print(f"after load: rss {after[0]:.0f} MiB, gpu {after[1]:.0f} MiB, peak gpu {torch_cuda.max_memory_allocated() / 2 ** 20:.0f} MiB")
    stats = dict(model.load_stats)
    stats["config_agrees"] = all(config[k] == model.config[k] for k in ("num_hidden_layers", "hidden_size",
                                                                         "vocab_size", "num_attention_heads"))
    ref = weakref.ref(model)
    del model
    gc.collect()
    torch_cuda.empty_cache()
    released = (rss_mb(), gpu_mb())
    print(f"after del: rss {released[0]:.0f} MiB, gpu {released[1]:.0f} MiB")
    return stats, perf, before, after, released, ref


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_load_monitoring(which, tensors, request):
    path = str(model_dir("llama")) if which == "tiny" else request.getfixturevalue("model_path")
    stats, perf, before, after, released, ref = monitor_load(path, tensors.float16())
    for k in ("seconds", "bytes", "gb_per_s", "total_seconds", "device", "dtype"):
        assert k in stats, k
    assert stats["dtype"] == "float16" and stats["bytes"] > 0
    assert stats["config_agrees"]  # AutoConfig read the same config the model was built from
    assert 0 <= stats["seconds"] <= stats["total_seconds"] <= perf
    assert ref() is None, "the model is still alive after del + gc.collect()"
    assert released[1] <= before[1]  # device memory is back (0 on the CPU)
