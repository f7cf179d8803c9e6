#!/bin/bash
# Owed by the thirtieth session (its device calls were refused after the first): the GPU tests that cover the engine's
# KV dtype plumbing (kv_cache_dtype; CUDA keeps e->kv.dtype = act) and the host-side changes (argmax, logprobs, sampler),
# then benchmarks/scores_overhead.py on the Qwen2.5-7B-shaped checkpoint: logprobs=20 and the two sampled rows after
# the host changes (the H100 run before them: plain 195.9, output_scores 157.3, logprobs=20 111.3 tok/s,
# benchmarks/results/scores-engine-2026-12-05-h100/). One call, ~5 min: carry [".devobj"].
#   run: OUT=$OUT bash dev/cuda/host_side_gpu.sh
set -u
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
( python3 dev/cuda/make_ckpt.py qwen7b > $OUT/ckpt.log 2>&1 ) &
ck=$!
OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh 2>&1 | tail -3
timeout 240 python3 -m pytest -q -p no:cacheprovider -n 8 tests/test_cuda_engine.py tests/test_cuda_api.py \
    tests/test_generate_scores.py tests/test_kv_f16.py tests/test_sampling.py -rfE > $OUT/pytest.log 2>&1
echo "pytest rc=$?: $(tail -1 $OUT/pytest.log)"; grep -E "^(FAILED|ERROR)" $OUT/pytest.log | head
wait $ck; tail -1 $OUT/ckpt.log
timeout 170 python3 benchmarks/scores_overhead.py --dir /tmp/fl_qwen7b --new 128 --json $OUT/scores_overhead.json 2>&1 \
    | grep -v Warning
nvidia-smi --query-gpu=name --format=csv,noheader
