#!/usr/bin/env bash
# On a GPU machine: build fastload for this GPU, run the GPU tests, then the GPU benchmarks (benchmarks/test_gpu.py at
# full size: load, Qwen's speed table, decode batch 1 / 8, prefill, 32k context, quantised modes).
#   STAGES="build tests bench" BENCH_K="decode or load" CKPT=/tmp/fl_qwen7b benchmarks/gpu_suite.sh
# Logs and JSON go to $OUT (the device tool) or ./gpu_out (the benchmarks' JSON in $OUT/bench).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
STAGES=${STAGES:-"build tests bench"}
export PYTHONUNBUFFERED=1
cap=$(python3 -c "import torch;p=torch.cuda.get_device_capability();print(f'{p[0]}{p[1]}')" 2>/dev/null || echo 90)
if [[ " $STAGES " == *" build "* ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap} python3 setup.py -q build_ext --inplace 2>&1 | tee "$OUT/build.log" | grep -E "error|warning" | head -20
  python3 -c "import fastload, json; print(json.dumps(fastload.info()))" | tee "$OUT/info.json" || exit 1
fi
if [[ " $STAGES " == *" tests "* ]]; then
  python3 -m pytest -q -rs ${TESTS:-tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_load.py} 2>&1 | tee "$OUT/pytest_gpu.log" | tail -25
fi
if [[ " $STAGES " == *" bench "* ]]; then
  FASTLOAD_BENCH_QWEN7B_DIR="${CKPT:-/tmp/fl_qwen7b}" python3 -m pytest -q -rs -p no:cacheprovider benchmarks/test_gpu.py \
      --bench-full --bench-results "$OUT/bench" ${BENCH_K:+-k "$BENCH_K"} ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi
