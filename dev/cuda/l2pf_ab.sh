#!/bin/bash
# The L2 prefetch hints (FASTLOAD_L2PF, fl_backend.l2_prefetch: NOT in the library, measured slower and not kept; apply
# dev/cuda/l2pf_sidestream.patch first and build .devobj from it; benchmarks/results/b1-structure-2026-12-04-h200/)
# A/B'd in one device call: build (carried .devobj),
# optional TESTS, then decode batch 1 on the Qwen2.5-7B-shaped checkpoint per SETTINGS (each a comma list of env
# settings, "-" for none; FASTLOAD_L2PF's own list separated by ':'), QUANT_MODES, ROUNDS rounds interleaved, bf16 once
# a round; then step timelines (FASTLOAD_PDL=0, 4 layers, int4) per TL_SETTINGS.
#   OUT=/tmp/o SETTINGS="- FASTLOAD_L2PF=o=1:gu=0.25" bash dev/cuda/l2pf_ab.sh                 carry [".devobj"]
source dev/cuda/ab_prelude.sh
prepare
echo "== decode $(date +%T), copy $bw GB/s"
for r in $(seq ${ROUNDS:-2}); do
  timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant bf16 --bw-gbs "$bw" --label "bf16-r$r" \
      | tee -a "$OUT/decode.jsonl"
  for s in ${SETTINGS:--}; do
    env $(envs "$s") timeout 200 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-int4,int8,nf4} \
        --bw-gbs "$bw" --label "${s/#-/default}-r$r" | tee -a "$OUT/decode.jsonl"
  done
done
i=0
for s in ${TL_SETTINGS:-}; do
  i=$((i + 1)); echo "== timeline $i: $s $(date +%T)"
  env $(envs "$s") FASTLOAD_PDL=0 timeout 120 python3 dev/cuda/step_timeline.py --schemes ${TL_SCHEMES:-int4} \
      --out "$OUT/timeline_$i.json" > "$OUT/timeline_$i.log" 2>&1; echo "rc=$?"
done
echo "== end $(date +%T)"
