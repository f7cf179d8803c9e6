#!/bin/bash
# dp2a GEMV configurations per class in the decode step (FASTLOAD_QDP_CFG), ROUNDS interleaved, fresh process each.
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1
python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 &
ck=$!
OUT=$OUT STAGES="build tests" TESTS="${TESTS:-tests/test_cuda_quant.py tests/test_cuda_ops.py}" bash dev/cuda/verify_gpu.sh
wait $ck
bw=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_bench import d2d_bandwidth; print(round(d2d_bandwidth() / 1e9))")
echo "== sweep $(date +%T), copy $bw GB/s"
for r in $(seq ${ROUNDS:-2}); do
  for mc in $SWEEP; do   # mode=cfg
    m=${mc%%=*}; cfg=${mc#*=}
    FASTLOAD_QDP_CFG=$cfg timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant $m \
        --bw-gbs "$bw" --label "$cfg-r$r" | tee -a "$OUT/decode.jsonl"
  done
done
echo "== end $(date +%T)"
