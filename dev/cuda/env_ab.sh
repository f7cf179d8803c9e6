#!/bin/bash
# Decode b1 on the Qwen2.5-7B-shaped checkpoint under several settings of knobs that are read once per process
# (FASTLOAD_CUDA_QDOT, FASTLOAD_PDL, ...), in one device call after dev/cuda/verify_gpu.sh's stages (its "quant"
# stage makes the checkpoint and gives a bf16 line): every setting in a fresh process, ROUNDS rounds interleaved,
# one JSON line per run and mode (dev/cuda/decode_ab.py: tok/s, roofline share, greedy token hash).
#   OUT=/tmp/o STAGES="build tests" SETTINGS="FASTLOAD_CUDA_QDOT=int16 FASTLOAD_CUDA_QDOT=int8" \
#       QUANT_MODES=int8,int4 ROUNDS=2 bash dev/cuda/env_ab.sh                                    carry [".devobj"]
source dev/cuda/ab_prelude.sh
OUT=$OUT STAGES="${STAGES:-build tests} quant" QUANT_MODES=bf16 bash dev/cuda/verify_gpu.sh
bw=$(copy_bw)
echo "== settings $(date +%T), copy $bw GB/s"
for r in $(seq ${ROUNDS:-2}); do
  for s in ${SETTINGS:-FASTLOAD_PDL=1}; do
    env "$s" timeout 200 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-int8,int4} \
        --bw-gbs "$bw" --label "$s-r$r" | tee -a "$OUT/decode.jsonl"
  done
done
echo "== end $(date +%T)"
