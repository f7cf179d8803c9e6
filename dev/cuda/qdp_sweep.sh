#!/bin/bash
# The dp2a GEMV's configuration per class of matrix in the decode step (FASTLOAD_QDP_CFG's [4|8][small|big|long]:NAME[/gG]
# form; benchmarks/results/qdp-sweep-2026-12-04-h200/): the GPU tests TESTS first, then decode batch 1 on the
# Qwen2.5-7B-shaped checkpoint (dev/cuda/decode_ab.py) for every MODE=CFG of SWEEP, each in a fresh process, ROUNDS
# rounds interleaved, one JSON line a run.
#   OUT=/tmp/o SWEEP="int4=auto int4=4long:r2u4 int8=8small:r2u2" ROUNDS=2 bash dev/cuda/qdp_sweep.sh   carry [".devobj"]
source dev/cuda/ab_prelude.sh
prepare
echo "== sweep $(date +%T), copy $bw GB/s"
for r in $(seq ${ROUNDS:-2}); do
  for mc in ${SWEEP:-int4=auto}; do
    m=${mc%%=*}; cfg=${mc#*=}
    FASTLOAD_QDP_CFG=$cfg timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant "$m" \
        --bw-gbs "$bw" --label "$cfg-r$r" | tee -a "$OUT/decode.jsonl"
  done
done
echo "== end $(date +%T)"
