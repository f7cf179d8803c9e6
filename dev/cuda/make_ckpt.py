"""The device scripts' benchmark checkpoints, made once per machine (each maker returns at once when its checkpoint is
already there): `qwen7b` = /tmp/fl_qwen7b, Qwen2.5-7B-shaped bf16 in 4 shards (benchmarks/gpu_bench.make_checkpoint);
`glm` = /tmp/glm_st, ChatGLM2-6B-shaped fp16 safetensors (benchmarks/chatglm_gpu.make_checkpoint). One place for the
one-liner verify_gpu.sh, skip_costs.sh and patch_ab.sh each carried.

    python3 dev/cuda/make_ckpt.py qwen7b [glm]
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "benchmarks"))

MAKERS = {  # name: (directory, maker)
    "qwen7b": ("/tmp/fl_qwen7b", lambda d: __import__("gpu_bench").make_checkpoint(d, "qwen2.5-7b", 4)),
    "glm": ("/tmp/glm_st", lambda d: __import__("chatglm_gpu").make_checkpoint(d, "chatglm2-6b", "float16")),
}


def main(names):
    bad = [n for n in names if n not in MAKERS]
    if not names or bad:
        sys.exit(f"make_ckpt.py: name one or more of {', '.join(MAKERS)} (got {' '.join(names) or 'nothing'})")
    for n in names:
        d, make = MAKERS[n]
        if not os.path.isfile(os.path.join(d, "config.json")):
            make(d)
        print(f"make_ckpt: {n} ready in {d}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
