#!/usr/bin/env bash
# On a GPU machine: build fastload for this GPU, run the GPU tests, then the GPU benchmark.
#   STAGES="build tests bench" SECTIONS=load,decode,prefill,batch,long benchmarks/gpu_suite.sh
# Logs and JSON go to $OUT (the device tool) or ./gpu_out.
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
  python3 benchmarks/gpu_bench.py --dir "${CKPT:-/tmp/fl_qwen7b}" --sections "${SECTIONS:-load,decode,prefill,batch,long}" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log" | tail -40
fi
