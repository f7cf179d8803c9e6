"""Profile the quantised GEMV on the Qwen2.5-7B shapes (issue 9): one run_op per shape and format, n = 1.
Run under ncu:  ncu --kernel-name regex:qgemv --section SpeedOfLight --section Occupancy --section LaunchStats
                    --section WarpStateStats python3 dev/cuda/qgemv_profile.py"""
import os, sys
import numpy as np
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from fastload import _C

rng = np.random.default_rng(0)
SHAPES = [("qkv", 4608, 3584), ("o", 3584, 3584), ("gate_up", 37888, 3584), ("down", 3584, 18944)]
n = int(os.environ.get("N", "1"))
for name, R, C in SHAPES:
    for bits, g, zeros in ((4, 128, True), (8, C, False)):
        q = rng.integers(0, 256, (R, C * bits // 8), dtype=np.uint8)
        s = (rng.random((R, C // g)) * 0.01).astype(np.float32)
        inp = {"x": rng.standard_normal((n, C)).astype(np.float32), "q": q, "scales": s}
        if zeros:
            inp["zeros"] = -(rng.random((R, C // g)) * 0.08).astype(np.float32)
        for _ in range(2):
            _C.run_op("cuda", "qmatmul", inp, {"bits": bits, "group_size": g, "sdtype": "float16", "code": 0,
                                               "act": "bfloat16"})
        print(name, R, C, bits, "bytes", q.nbytes + s.nbytes * (1 + zeros) // 2, flush=True)
