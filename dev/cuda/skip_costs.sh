#!/bin/bash
# What each kind of decode kernel costs inside the real step, under programmatic dependent launch: decode b1 with
# FASTLOAD_TIMING_SKIP=<op> (csrc/fl_model.h; the tokens are then wrong), one process per setting, against the same
# run with nothing skipped. Saving per token = 1 / tok_s(skip) - 1 / tok_s(none).
#   OUT=/tmp/o bash dev/cuda/skip_costs.sh          (after `STAGES=build bash dev/cuda/verify_gpu.sh`; carry .devobj)
# Qwen2.5-7B-shaped (MODES, default bf16 int4) through dev/cuda/decode_ab.py; ChatGLM2-6B-shaped fp16 through
# benchmarks/chatglm_gpu.py (GLM_SKIPS). Checkpoints are made when missing (/tmp/fl_qwen7b, /tmp/glm_st).
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1
python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1 &
python3 dev/cuda/make_ckpt.py glm >> "$OUT/ckpt.log" 2>&1 &
wait
bw=$(python3 -c "import sys; sys.path.insert(0, 'benchmarks'); from gpu_bench import d2d_bandwidth; print(round(d2d_bandwidth() / 1e9))")
echo "copy $bw GB/s"
for mode in ${MODES:-bf16 int4}; do
  for s in none ${SKIPS:-norm rope attention swiglu qkv o gate_up down lm_head}; do
    v=""; [ "$s" != none ] && v=$s
    FASTLOAD_TIMING_SKIP=$v timeout 120 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant "$mode" --bw-gbs "$bw" \
        --new 128 --label "skip-$s" | tee -a "$OUT/skip_qwen.jsonl" | python3 -c "import json, sys
for l in sys.stdin:
    d = json.loads(l); print('qwen %-5s skip %-9s %7.1f tok/s' % (d['mode'], d['label'][5:], d['tok_s_per_seq']))"
  done
done
for s in none ${GLM_SKIPS:-norm rope attention qkv o lm_head}; do
  v=""; [ "$s" != none ] && v=$s
  FASTLOAD_TIMING_SKIP=$v timeout 120 python3 benchmarks/chatglm_gpu.py --ckpt /tmp/glm_st --new 128 --repeats 2 \
      --out "$OUT/skip_glm_$s.json" 2>&1 | grep -E "decode b1|Error" | sed "s/^/glm skip $s: /"
done
