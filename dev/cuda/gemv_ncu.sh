#!/bin/bash
# What bounds the quantised decode GEMVs, in one device call (no library build needed): the per-shape batch-1 bench
# (.device/qgemv_bench: every configuration of the dp2a GEMV, int8-x ones included) and ncu's scheduler / warp-state /
# occupancy / memory sections of the library's kernels: the integer tensor-core GEMV at n = 8 (gate|up, down) and the
# dp2a GEMV at n = 1 (q|k|v, gate|up), both from .device/qmma_bench (QMMA_PROFILE=1). Build the benches here first:
#   dev/cuda/qgemv_bench.sh dev/cuda/qgemv_bench.cu /tmp/qgemv_bench && xz -c /tmp/qgemv_bench > .device/qgemv_bench.xz
#   dev/cuda/qgemv_bench.sh dev/cuda/qmma_bench.cu /tmp/qmma_bench && xz -c /tmp/qmma_bench > .device/qmma_bench.xz
#   OUT=/tmp/o bash dev/cuda/gemv_ncu.sh                                                           carry [".device"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
for b in qgemv_bench qmma_bench; do
  [ -f .device/$b.xz ] && xz -dkf .device/$b.xz && chmod +x .device/$b
done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
echo "== qgemv_bench $(date +%T)"
timeout ${BENCH_S:-240} .device/qgemv_bench ${BENCH_REPS:-7} > "$OUT/qgemv_bench.log" 2>&1; echo "qgemv_bench rc=$?"
SECS="--section SpeedOfLight --section Occupancy --section SchedulerStats --section WarpStateStats --section LaunchStats
      --section MemoryWorkloadAnalysis --section SourceCounters"
echo "== ncu imma8 $(date +%T)"
QMMA_PROFILE=1 QMMA_SHAPES=gate_up,down QMMA_N=8 QMMA_CFGS=none timeout 200 ncu --kernel-name regex:qgemv_imma8 $SECS \
    .device/qmma_bench > "$OUT/ncu_imma8_n8.txt" 2>&1; echo "ncu rc=$?"
echo "== ncu dp2a $(date +%T)"
QMMA_PROFILE=1 QMMA_SHAPES=qkv,gate_up QMMA_N=1 QMMA_CFGS=none timeout 200 ncu --kernel-name regex:qgemv_dp $SECS \
    .device/qmma_bench > "$OUT/ncu_dp_n1.txt" 2>&1; echo "ncu rc=$?"
echo "== end $(date +%T)"
