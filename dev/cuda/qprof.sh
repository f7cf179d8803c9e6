#!/bin/bash
# Where decode time goes on quantised weights: build, per-kernel ncu durations of a 4-layer Qwen2.5-7B-wide model
# (SCHEMES), wall time per generate, and ncu speed-of-light of the GEMV kernels on the 7B shapes.
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 FASTLOAD_SKIP_DEMO=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [ -z "${NOBUILD:-}" ]; then
t0=$(date +%s)
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
fi
for s in ${SCHEMES:-bf16 int4}; do
  NEW=64 SCHEME=$s python3 dev/cuda/decode_kernel_times.py 2>&1 | tail -1
  NEW=8 SCHEME=$s timeout 200 ncu --metrics gpu__time_duration.sum --csv --log-file "$OUT/k-$s.csv" python3 dev/cuda/decode_kernel_times.py > /dev/null 2>&1
  echo "== $s kernels"; python3 dev/cuda/kernel_table.py "$OUT/k-$s.csv"
done
if [ -n "${SOL:-}" ]; then
  timeout 200 ncu --kernel-name regex:"qgemv_dp|qx_prep" --section SpeedOfLight --section Occupancy --section LaunchStats \
     python3 dev/cuda/qgemv_profile.py > "$OUT/sol.txt" 2>&1
  grep -E "qgemv_dp|qx_prep|Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Memory Throughput" "$OUT/sol.txt" | head -80
fi
