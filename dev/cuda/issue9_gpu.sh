#!/bin/bash
# One device call for issue 9 (quantised weights): build with CUDA, the GPU tests (quantised kernels against the
# CPU backend, the quantised model paths), then the quantisation benchmark against transformers + bitsandbytes
# on the Qwen2.5-7B-shaped bf16 checkpoint. bitsandbytes travels as a wheel in .whl (carry it).
#   FASTLOAD_COMMIT=abc1234 STAGES="build bench ppl tests" TESTS="tests/test_cuda_quant.py ..." dev/cuda/issue9_gpu.sh
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 FASTLOAD_SKIP_DEMO=1
STAGES=${STAGES:-"build bench ppl tests"}
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD
fi
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
if [[ " $STAGES " == *" build "* ]]; then
  { nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; date -u; git rev-parse --short HEAD 2>/dev/null;
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)";
    python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)"; } 2>&1 | tee "$OUT/device.txt"
  t0=$(date +%s)
  FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
  echo "build $(( $(date +%s) - t0 )) s" | tee -a "$OUT/device.txt"
fi
if [[ " $STAGES " == *" bench "* ]]; then
  # benchmarks/test_gpu.py::test_gpu_quant at full size (quant_gpu.py runs it); BENCH_ARGS are pytest options (-k int4)
  timeout ${BENCH_SECONDS:-400} python3 benchmarks/quant_gpu.py --bench-results "$OUT/bench" ${BENCH_ARGS:-} 2>&1 \
      | tee "$OUT/bench.log" | tail -60
fi
if [[ " $STAGES " == *" ppl "* ]]; then
  timeout ${PPL_SECONDS:-120} python3 benchmarks/perplexity_vs_transformers.py --device cuda --skip-demo \
      --outputs_dir "$OUT/ppl" 2>&1 | tee "$OUT/ppl.log" | tail -15
fi
if [[ " $STAGES " == *" tests "* ]]; then
  timeout ${PYTEST_SECONDS:-300} python3 -m pytest -q -n 8 --timeout 200 --timeout-method=thread -rs -p no:cacheprovider \
      ${TESTS:-tests} > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
fi
