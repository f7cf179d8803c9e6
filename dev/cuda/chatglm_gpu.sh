#!/bin/bash
# Issue 12's ChatGLM targets on a GPU machine, in one call (~5-7 min with the carried .devobj, ~3 min more without):
# ChatGLM2-6B as THUDM ships it (benchmarks/synth.py's chatglm2-6b: THUDM's config keys, tensor names, 7 .bin shards),
# fp16, random weights.
#   build    setup.py build_ext --inplace with the carried .devobj objects (dev/cuda/use_objs.sh)             ~60 s
#   ckpt     /tmp/glm/bin (torch.save shards + pytorch_model.bin.index.json) and /tmp/glm/safetensors, the same
#            tensors drawn once on the GPU and written both ways (12.5 GB each), in the background during build
#   thudm    tools/chatglm_vs_thudm.py: THUDM's ChatGLM2 code (carried in .thudm/chatglm2, git-ignored) against
#            fastload on the tiny ChatGLM2 fixture, fp32 / fp16 / bf16 logits                                 ~20 s
#   binload  benchmarks/bin_vs_safetensors.py: warm load of the .bin shards against the safetensors ones
#            (target: within 15%)                                                                           ~1 min
#   decode   benchmarks/chatglm_gpu.py on the .bin checkpoint: batch-1 decode against its roofline (target 85%),
#            THUDM's code as the peer on the same weights (NEW new tokens after a 32-token prompt)          ~1-2 min
# Files back in $OUT: chatglm.log, bin_vs_safetensors.json, chatglm_gpu.json (and build.log when the build fails).
#   OUT=/tmp/o FASTLOAD_COMMIT=<commit> bash dev/cuda/chatglm_gpu.sh                    carry [".devobj", ".thudm"]
# The same steps on the CPU at tiny size (a check of this script; torch on PATH's python3, no nvidia-smi needed):
#   PATH=/opt/tv/bin:$PATH STAGES="ckpt thudm binload decode" SHAPE=chatglm2-tiny DEVICE=cpu NEW=16 \
#       CKPT=/tmp/glm_tiny OUT=/tmp/o bash dev/cuda/chatglm_gpu.sh
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/chatglm.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
STAGES=${STAGES:-"build ckpt thudm binload decode"}
CKPT=${CKPT:-/tmp/glm}; NEW=${NEW:-256}; SHAPE=${SHAPE:-chatglm2-6b}; DEVICE=${DEVICE:-cuda}
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "== $1 $(date +%T)"; }
if [ "$DEVICE" != cpu ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
  export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
ck=""
if has ckpt; then
  stamp ckpt
  ( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bin_vs_safetensors as b; \
b.write_both('$CKPT', '$SHAPE', 'float16', max_shard_bytes=b.THUDM_SHARD_BYTES.get('$SHAPE', 0))" \
      > "$OUT/ckpt.log" 2>&1; echo "ckpt rc=$?" >> "$OUT/ckpt.log" ) &
  ck=$!
fi
if has build; then
  stamp build
  source dev/cuda/use_objs.sh
  FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 \
      || { tail -30 "$OUT/build.log"; exit 1; }
  rm -f "$OUT/build.log"
  python3 -c "import fastload; print('cuda:', fastload.info()['cuda'])"
fi
if has thudm; then
  stamp thudm
  if [ -f .thudm/chatglm2/modeling_chatglm.py ]; then
    timeout 180 python3 tools/chatglm_vs_thudm.py --thudm .thudm/chatglm2 --model tests/fixtures/chatglm/chatglm2_st \
        --device "$DEVICE" 2>&1 \
        | grep -E "T=|all ok|MISMATCH|Error"
  else
    echo "no .thudm/chatglm2: carry THUDM's modeling_chatglm.py + configuration_chatglm.py there"
  fi
fi
if [ -n "$ck" ]; then
  wait $ck; echo "ckpt done $(date +%T)"; grep -v "^  shard" "$OUT/ckpt.log" | tail -5; rm -f "$OUT/ckpt.log"
  du -sh "$CKPT"/bin "$CKPT"/safetensors; ls "$CKPT/bin"
fi
if has binload; then
  stamp binload
  timeout ${BIN_S:-300} python3 benchmarks/bin_vs_safetensors.py --shape "$SHAPE" --device "$DEVICE" --out "$CKPT" \
      2>&1 | tail -15
  cp "$CKPT/result.json" "$OUT/bin_vs_safetensors.json" 2>/dev/null
fi
if has decode && [ ! -f "$CKPT/bin/config.json" ]; then
  echo "no $CKPT/bin/config.json: the ckpt stage did not write the checkpoint; decode skipped"
elif has decode; then
  stamp decode
  timeout ${DECODE_S:-360} python3 benchmarks/chatglm_gpu.py --ckpt "$CKPT/bin" --shape "$SHAPE" --device "$DEVICE" \
      --new "$NEW" --thudm .thudm/chatglm2 --out "$OUT/chatglm_gpu.json" 2>&1 \
      | grep -vE "Warning|warnings.warn|^\[transformers\]|^  - "
fi
[ "$DEVICE" != cpu ] && nvidia-smi --query-gpu=memory.used --format=csv,noheader
stamp end
