"""Kernel durations of one forward + a few decode steps under ncu (each kernel timed alone):
    ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 dev/cuda/ncu_step.py DIR
The sum per decode step against the measured step time gives the share lost between kernels."""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import fastload  # noqa: E402

m = fastload.AutoModelForCausalLM.from_pretrained(sys.argv[1] if len(sys.argv) > 1 else "/tmp/fl_qwen7b",
                                                  device_map="cuda", torch_dtype="bfloat16", progress=False)
ids = np.random.default_rng(0).integers(100, m.config["vocab_size"] - 100, size=(1, 32))
m.generate(ids, max_new_tokens=int(os.environ.get("NEW", "4")), eos_token_id=[])
