#!/bin/bash
# Knob settings A/B'd in one device call (written for the IMMA GEMV, dev/cuda/imma_gemv.patch, which is not in the
# library: apply the patch to run FASTLOAD_QGEMV=imma): build, TESTS, then decode on the Qwen2.5-7B-shaped checkpoint
# per SETTINGS (each a comma list of env settings, "-" for none), QUANT_MODES at batch 1 for ROUNDS rounds
# interleaved, and B8_MODES (default int4) at batch 8 per B8_SETTINGS once.
#   OUT=/tmp/o SETTINGS="- FASTLOAD_CUDA_QDOT=int8 FASTLOAD_CUDA_QDOT=int8,FASTLOAD_PDL=0" bash dev/cuda/imma_ab.sh
#                                                                                      carry [".devobj", ".device"]
# BENCH=1: then .device/qgemv_bench (dev/cuda/qgemv_bench.sh) into $OUT/qgemv_bench.log; QMMA_BENCH=1: .device/qmma_bench
# (dev/cuda/qgemv_bench.sh dev/cuda/qmma_bench.cu, xz-compressed: the GEMV at 1..8 rows) into $OUT/qmma_bench.log, before the decode runs.
source dev/cuda/ab_prelude.sh
prepare "${STAGES:-build tests}" "${TESTS:-tests/test_cuda_quant.py}"
if [ -n "${QMMA_BENCH:-}" ] && [ -f .device/qmma_bench.xz ]; then
  xz -dkf .device/qmma_bench.xz && chmod +x .device/qmma_bench && echo "== qmma bench $(date +%T)"
  LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} timeout ${BENCH_S:-200} .device/qmma_bench ${BENCH_REPS:-7} \
      > "$OUT/qmma_bench.log" 2>&1; echo "qmma bench rc=$?"; cat "$OUT/qmma_bench.log"
fi
echo "== decode $(date +%T), copy $bw GB/s"
for r in $(seq ${ROUNDS:-2}); do
  for s in ${SETTINGS:-- FASTLOAD_CUDA_QDOT=int8}; do
    env $(envs "$s") timeout 200 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-int4,int8} \
        --bw-gbs "$bw" --label "${s/#-/default}-r$r" | tee -a "$OUT/decode.jsonl"
  done
done
for s in ${B8_SETTINGS:--}; do
  env $(envs "$s") timeout 200 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${B8_MODES:-int4} --batch 8 \
      --bw-gbs "$bw" --label "${s/#-/default}-b8" | tee -a "$OUT/decode.jsonl"
done
[ -f .device/qgemv_bench.xz ] && [ ! -x .device/qgemv_bench ] && xz -dk .device/qgemv_bench.xz && chmod +x .device/qgemv_bench
if [ -n "${BENCH:-}" ] && [ -x .device/qgemv_bench ]; then  # per-shape GEMV times (dev/cuda/qgemv_bench.sh builds it)
  echo "== bench $(date +%T)"
  LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} timeout ${BENCH_S:-200} .device/qgemv_bench ${BENCH_REPS:-5} \
      > "$OUT/qgemv_bench.log" 2>&1; echo "bench rc=$?"
fi
echo "== end $(date +%T)"
