"""NF4 decode GEMV at Qwen2.5-7B's shapes against a float64 reference (2026-12-02: dev/cuda/qgemv_bench.cu's dp2a
configurations disagreed with the backend on NF4 at these shapes; the tests use at most 1000 rows). One process per
FASTLOAD_QGEMV setting: python3 dev/cuda/nf4_check.py [auto|dp|fma]"""
import os, sys
import numpy as np
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from fastload import _C
from cuda_util import to_act

NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0])
rng = np.random.default_rng(0)
ACT = os.environ.get("ACT", "bfloat16")
for R, C in ((129, 3584), (1000, 3584), (4608, 3584), (3584, 3584), (37888, 3584), (3584, 18944)):
    gs = 64
    q = rng.integers(0, 256, (R, C // 2), dtype=np.uint8)
    s = (0.001 + 0.009 * rng.random((R, C // gs))).astype(np.float16)
    x = rng.uniform(-1, 1, (1, C)).astype(np.float32)
    codes = np.empty((R, C), np.int64)
    codes[:, 0::2] = q & 15
    codes[:, 1::2] = q >> 4
    w = NF4[codes] * np.repeat(s.astype(np.float64), gs, axis=1)
    ref = to_act(x, ACT).astype(np.float64) @ w.T  # x as the op sees it in the activation dtype
    got = _C.run_op(os.environ.get("DEV", "cuda"), "qmatmul", {"q": q, "scales": s.astype(np.float32), "x": x},
                    {"bits": 4, "group_size": gs, "sdtype": "float16", "code": 1, "act": ACT})["y"].astype(np.float64)
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    print(f"{os.environ.get('FASTLOAD_QGEMV', 'auto'):5s} R={R:6d} C={C:6d}  rel L2 err {rel:.2e}  {'OK' if rel < 1e-2 else 'WRONG'}",
          flush=True)
