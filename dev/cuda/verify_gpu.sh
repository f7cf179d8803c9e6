#!/bin/bash
# Everything a GPU machine should run in one call, by stage (~2 min for build + tests with the carried .devobj):
#   build     setup.py build_ext --inplace with the carried .devobj (dev/cuda/use_objs.sh)
#   tests     every tests/test_cuda_*.py, and the files whose GPU cases skip on the CPU: YaRN / dynamic NTK against
#             transformers on the GPU (test_rope_scaling), LoRA's device merge and from_hf's device path (test_lora,
#             test_from_hf), ChatGLM, Qwen3, MoE, the torch .bin reader, quantisation ops, generate's scores against
#             transformers (TESTS=... to choose;
#             demo-model tests skip there: FASTLOAD_SKIP_DEMO=1, no PyPI)                                 ~105 s
#   thudm     tools/chatglm_vs_thudm.py: THUDM's own ChatGLM2 modelling code (carried in .thudm/chatglm2, git-ignored:
#             none of it goes into the repository) against fastload on the tiny ChatGLM fixtures, fp32 / fp16 / bf16
#   binload   benchmarks/bin_vs_safetensors.py: ChatGLM2-6B fp16 as THUDM ships it (its names, 7 .bin shards) and as
#             safetensors, warm load (target: .bin within 15% of safetensors); dev/cuda/chatglm_gpu.sh adds decode
#   glm       ChatGLM2-6B-shaped fp16 safetensors (/tmp/glm_st, made during the tests), decode b1 against the roofline
#             (benchmarks/chatglm_gpu.py), once per GLM_SETTINGS entry (env settings), REPS times      ~25 s a run
#   quant     Qwen2.5-7B-shaped bf16 (/tmp/fl_qwen7b, made during the tests): decode b1 per QUANT_MODES
#             (dev/cuda/decode_ab.py; default bf16,int8,int4,nf4), and bf16 once more under QUANT_ALSO (env settings)
#   gap       benchmarks/step_gap.py: the host's share of a decode step, ChatGLM2 (and Qwen int4 with quant)
#   beam      benchmarks/beam_search.py on the Qwen2.5-7B shape, bf16, K = 1, 2, 4, 8, transformers beside it
#   OUT=/tmp/o STAGES="build tests thudm binload" bash dev/cuda/verify_gpu.sh      carry [".devobj", ".thudm"]
#   OUT=/tmp/o STAGES="build glm" GLM_SETTINGS="FASTLOAD_ENGINE_PIPELINE=1 FASTLOAD_ENGINE_PIPELINE=0" REPS=2 \
#       bash dev/cuda/verify_gpu.sh                                                 carry [".devobj"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/verify.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1  # no PyPI there
STAGES=${STAGES:-"build tests thudm binload"}; REPS=${REPS:-2}
GLM_SETTINGS=${GLM_SETTINGS:-"FASTLOAD_ENGINE_PIPELINE=1"}
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
if has glm || has quant || has gap || has beam; then  # checkpoints drawn while the tests run
  ( if has glm || has gap; then python3 dev/cuda/make_ckpt.py glm > "$OUT/ckpt.log" 2>&1 || echo "glm ckpt failed" >> "$OUT/ckpt.log"; fi
    if has quant || has beam; then python3 dev/cuda/make_ckpt.py qwen7b >> "$OUT/ckpt.log" 2>&1 || echo "qwen ckpt failed" >> "$OUT/ckpt.log"; fi ) &
  ck=$!
fi
if has tests; then
  stamp tests
  timeout ${TESTS_S:-360} python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 300 --timeout-method=thread -rfE \
      ${TESTS:-$(ls tests/test_cuda_*.py) tests/test_rope_scaling.py tests/test_lora.py tests/test_from_hf.py \
      tests/test_chatglm.py tests/test_qwen3.py $(ls tests/test_moe*.py 2>/dev/null) tests/test_torch_bin.py \
      tests/test_quant_ops.py tests/test_generate_scores.py} \
      > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
[ -n "${ck:-}" ] && { wait $ck; tail -3 "$OUT/ckpt.log"; }
if has thudm; then
  stamp thudm
  if [ -f .thudm/chatglm2/modeling_chatglm.py ]; then
    timeout 180 python3 tools/chatglm_vs_thudm.py --thudm .thudm/chatglm2 --model tests/fixtures/chatglm/chatglm2_st 2>&1 | tail -20
  else
    echo "no .thudm/chatglm2: carry THUDM's modeling_chatglm.py + configuration_chatglm.py there"
  fi
fi
if has binload; then
  stamp binload
  timeout ${BIN_S:-300} python3 benchmarks/bin_vs_safetensors.py --shape chatglm2-6b --out /tmp/binload 2>&1 | tail -15
  cp /tmp/binload/result.json "$OUT/bin_vs_safetensors.json" 2>/dev/null
fi
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
  timeout 300 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-bf16,int8,int4,nf4} --label quant \
      | tee "$OUT/quant.jsonl"
  [ -n "${QUANT_ALSO:-}" ] && env $QUANT_ALSO timeout 100 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant bf16 \
      --label "$QUANT_ALSO" | tee -a "$OUT/quant.jsonl"
fi
if has gap; then  # the host's share of a decode step (benchmarks/step_gap.py)
  stamp gap
  timeout 200 python3 benchmarks/step_gap.py --dir /tmp/glm_st --dtype float16 --out "$OUT/gap_glm.json" | tail -4
  has quant && timeout 150 python3 benchmarks/step_gap.py --dir /tmp/fl_qwen7b --quant int4 --out "$OUT/gap_qwen_int4.json" | tail -4
fi
if has beam; then
  stamp beam
  timeout ${BEAM_S:-300} python3 benchmarks/beam_search.py --dir /tmp/fl_qwen7b --device cuda --dtype bfloat16 --hf \
      --json "$OUT/beam.json" 2>&1 | tail -8
fi
stamp end
