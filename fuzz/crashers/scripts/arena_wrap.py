"""The weight arena's size wraps around 2^64 (csrc/model.c fl_model_create: `total += align_up(rows * cols
* es)` unchecked). Prints the arena size the core computed for configs whose true size is >= 2^64.

    PYTHONPATH=. python3 fuzz/crashers/scripts/arena_wrap.py
On main (7156786): case 1 fails with "allocating 568.00 GiB" (true size 2^64 + 568 GiB), case 2 creates
a model whose arena is 64 bytes (true size exactly 2^64 + 64) and returns; every weight pointer but the
first then points past the 64-byte allocation. A fixed core refuses both with CheckpointError / limits."""
import fastload
from fastload import _C, arch

BASE = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_attention_heads": 2,
        "num_key_value_heads": 1, "head_dim": 4, "num_hidden_layers": 1, "rms_norm_eps": 1e-5}
CASES = [dict(vocab_size=2**31 - 1, hidden_size=2**31 - 1, intermediate_size=16),
         dict(vocab_size=2**31 - 15, hidden_size=2**30, intermediate_size=1)]
for i, extra in enumerate(CASES, 1):
    hf = dict(BASE, **extra)
    try:
        cfg = arch.core_config(hf, arch.arch_for(hf, "config.json"), "config.json")
        core = _C.Model(cfg, dtype="float32", device="cpu", threads=1)
        print(f"case {i}: model created, arena = {core.info['weight_bytes']} bytes  <-- wrapped")
    except BaseException as e:  # noqa: BLE001
        print(f"case {i}: {type(e).__name__}: {e}")

if __name__ == "__main__" and __import__("sys").argv[1:] == ["--forward"]:
    # the wrapped model's forward reads and writes through those pointers (unloaded weights are zero
    # here, but the addresses are out of bounds): expect SIGSEGV on main
    import numpy as np
    hf = dict(BASE, **CASES[1])
    cfg = arch.core_config(hf, arch.arch_for(hf, "config.json"), "config.json")
    core = _C.Model(cfg, dtype="float32", device="cpu", threads=1)
    print(core.forward(np.array([[1]], dtype=np.int64), None, None).shape)
