#!/bin/bash
# The seventh session's work on a GPU machine, in one call (~6-8 min): everything that landed without running on a GPU.
#   build     setup.py build_ext --inplace with the carried .devobj (dev/cuda/use_objs.sh)
#   tests     every tests/test_cuda_*.py, and the files whose GPU cases skip on the CPU: YaRN / dynamic NTK against
#             transformers on the GPU (test_rope_scaling), LoRA's device merge and from_hf's device path (test_lora,
#             test_from_hf), ChatGLM, Qwen3, MoE, the torch .bin reader
#   thudm     tools/chatglm_vs_thudm.py: THUDM's own ChatGLM2 modelling code (carried in .thudm/chatglm2, git-ignored:
#             none of it goes into the repository) against fastload on the tiny ChatGLM fixtures, fp32 / fp16 / bf16
#   binload   benchmarks/bin_vs_safetensors.py: ChatGLM2-6B fp16 as THUDM ships it (its names, 7 .bin shards) and as
#             safetensors, warm load (target: .bin within 15% of safetensors); dev/cuda/chatglm_gpu.sh adds decode
#   OUT=/tmp/o STAGES="build tests thudm binload" bash dev/cuda/verify_gpu.sh      carry [".devobj", ".thudm"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/verify.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
STAGES=${STAGES:-"build tests thudm binload"}
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
if has tests; then
  stamp tests
  timeout ${TESTS_S:-360} python3 -m pytest -q -p no:cacheprovider -n 8 --timeout 300 --timeout-method=thread -rfE \
      ${TESTS:-$(ls tests/test_cuda_*.py) tests/test_rope_scaling.py tests/test_lora.py tests/test_from_hf.py \
      tests/test_chatglm.py tests/test_qwen3.py $(ls tests/test_moe*.py 2>/dev/null) tests/test_torch_bin.py} \
      > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
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
stamp end
