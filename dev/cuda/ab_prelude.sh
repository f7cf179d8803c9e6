#!/bin/bash
# Sourced by the device A/B scripts (env_ab.sh, imma_ab.sh, l2pf_ab.sh, patch_ab.sh, qdp_sweep.sh): the output folder,
# the environment every device run takes, and helpers.
#   ckpt_start         draw the Qwen2.5-7B-shaped checkpoint (/tmp/fl_qwen7b) in the background
#   ckpt_wait          wait for it (its log's last lines)
#   copy_bw            the device-to-device copy rate in GB/s (benchmarks/gpu_bench.py), the rooflines' denominator
#   envs S             a setting "K=V,K2=V2" as env arguments ("-": none)
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1
ckpt_start() { python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 & _fl_ck=$!; }
ckpt_wait() { wait "$_fl_ck"; tail -2 "$OUT/ckpt.log"; }
copy_bw() { python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_bench import d2d_bandwidth; print(round(d2d_bandwidth() / 1e9))"; }
envs() { [ "$1" = "-" ] && return; echo "$1" | tr ',' ' '; }
# prepare [STAGES [TESTS]]: the checkpoint drawn while dev/cuda/verify_gpu.sh runs STAGES (default: build, and tests when
# TESTS is set) on TESTS; then waits for it and sets bw (copy_bw)
prepare() {
  ckpt_start
  OUT=$OUT STAGES="${1:-build${TESTS:+ tests}}" TESTS="${2:-${TESTS:-}}" bash dev/cuda/verify_gpu.sh
  ckpt_wait
  bw=$(copy_bw)
}
