#!/bin/bash
# Ninth session, one device call (~8 min): the decode fusions on a GPU.
#   build    setup.py build_ext --inplace with the carried .devobj
#   tests    every GPU test file (as verify_gpu.sh's tests stage)
#   glm      ChatGLM2-6B-shaped fp16 safetensors (benchmarks/chatglm_gpu.py makes it), decode b1 against the roofline
#            with gate|up + SwiGLU fused (FASTLOAD_GLU_FUSE=1, the default) and not (0), alternating, REPS times each
#   quant    Qwen2.5-7B-shaped bf16: decode b1 of bf16 / int8 / int4 / nf4 (dev/cuda/decode_ab.py), the attention's
#            combine kernel now writing o_proj's int16 x; and bf16 with FASTLOAD_GLU_FUSE=0 beside it
#   gap      dev/cuda/step_gap.py on the ChatGLM checkpoint (and Qwen int4 with quant): GPU time of a step against
#            the time it waits for the host
#   OUT=/tmp/o STAGES="build tests glm quant gap" GLM_SETTINGS="FASTLOAD_GLU_U=8 FASTLOAD_GLU_FUSE=0" \
#       bash dev/cuda/fuse_gpu.sh                                                     carry [".devobj"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/fuse.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1  # no PyPI there: demo-model tests skip
STAGES=${STAGES:-"build tests glm quant"}; REPS=${REPS:-2}
GLM_SETTINGS=${GLM_SETTINGS:-"FASTLOAD_GLU_FUSE=1 FASTLOAD_GLU_FUSE=0"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "== $1 $(date +%T)"; }
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if has build; then
  stamp build
  source dev/cuda/use_objs.sh
  FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
  python3 -c "import fastload; print(fastload.info()['cuda'])"
fi
if has glm || has quant; then  # checkpoints drawn while the tests run
  ( if has glm; then python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import chatglm_gpu as g; \
g.make_checkpoint('/tmp/glm_st', 'chatglm2-6b', 'float16')" > "$OUT/ckpt.log" 2>&1 || echo "glm ckpt failed" >> "$OUT/ckpt.log"; fi
    if has quant; then python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; \
gpu_bench.make_checkpoint('/tmp/fl_qwen7b', 'qwen2.5-7b', 4)" >> "$OUT/ckpt.log" 2>&1 || echo "qwen ckpt failed" >> "$OUT/ckpt.log"; fi ) &
  ck=$!
fi
if has tests; then
  stamp tests
  timeout ${TESTS_S:-300} python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 300 --timeout-method=thread -rfE \
      ${TESTS:-$(ls tests/test_cuda_*.py) tests/test_rope_scaling.py tests/test_lora.py tests/test_from_hf.py \
      tests/test_chatglm.py tests/test_qwen3.py $(ls tests/test_moe*.py) tests/test_torch_bin.py tests/test_quant_ops.py} \
      > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
[ -n "${ck:-}" ] && { wait $ck; tail -3 "$OUT/ckpt.log"; }
if has glm; then
  stamp glm
  for r in $(seq $REPS); do
    for f in $GLM_SETTINGS; do  # env settings, e.g. FASTLOAD_GLU_FUSE=0
      env $f timeout 150 python3 benchmarks/chatglm_gpu.py --ckpt /tmp/glm_st --out "$OUT/glm_${f//[^A-Za-z0-9]/_}_$r.json" \
          2>&1 | grep -E "decode b1|Error|error" | sed "s/^/[$f] /"
    done
  done
fi
if has quant; then
  stamp quant
  timeout 300 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-bf16,int8,int4,nf4} --label fused \
      | tee "$OUT/quant.jsonl"
  [ -n "${QUANT_ALSO:-}" ] && env $QUANT_ALSO timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant bf16 \
      --label "$QUANT_ALSO" | tee -a "$OUT/quant.jsonl"
fi
if has gap; then  # the host's share of a decode step (dev/cuda/step_gap.py)
  stamp gap
  timeout 200 python3 dev/cuda/step_gap.py --dir /tmp/glm_st --dtype float16 --out "$OUT/gap_glm.json" | tail -4
  has quant && timeout 150 python3 dev/cuda/step_gap.py --dir /tmp/fl_qwen7b --quant int4 --out "$OUT/gap_qwen_int4.json" | tail -4
fi
stamp end
