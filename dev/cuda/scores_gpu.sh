#!/bin/bash
# Owed by the twenty-seventh session (no device was lent): the whole GPU suite after the per-token records /
# samplers change (tests/test_cuda_engine.py test_scores_and_logits_beside_device_argmax_rows, test_generate_scores
# against transformers), then benchmarks/scores_overhead.py on the Qwen2.5-7B-shaped checkpoint (made during the
# tests) with transformers in the same process. One call, ~8 min: carry [".devobj"].
#   run: OUT=$OUT bash dev/cuda/scores_gpu.sh        (SKIP_TESTS=1: build + bench only)
set -u
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
T0=$(date +%s)
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  ( sleep 60; python3 dev/cuda/make_ckpt.py qwen7b > $OUT/ckpt.log 2>&1 ) &
  ck=$!
  OUT=$OUT STAGES="build tests" bash dev/cuda/verify_gpu.sh
  wait $ck; tail -2 $OUT/ckpt.log
else
  OUT=$OUT STAGES="build" bash dev/cuda/verify_gpu.sh
  python3 dev/cuda/make_ckpt.py qwen7b > $OUT/ckpt.log 2>&1; tail -2 $OUT/ckpt.log
fi
left=$(( ${BUDGET:-570} - ($(date +%s) - T0) ))
echo "== bench, $left s left"
[ $left -gt 60 ] && timeout $left python3 benchmarks/scores_overhead.py --dir /tmp/fl_qwen7b --new ${NEW:-128} --hf --json $OUT/scores_overhead.json 2>&1 | grep -v Warning
nvidia-smi --query-gpu=name --format=csv,noheader; git log --oneline -1 2>/dev/null || true
