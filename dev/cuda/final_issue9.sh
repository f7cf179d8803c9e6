#!/bin/bash
# Final device call of a session on issue 9: build, the whole test suite on the GPU, then the quantisation benchmark
# with transformers + bitsandbytes in the same run (bitsandbytes travels as a wheel in .whl: carry it).
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 FASTLOAD_SKIP_DEMO=1
STAGES="build" dev/cuda/issue9_gpu.sh 2>&1 | tail -3
timeout ${PYTEST_SECONDS:-170} python3 -m pytest -q -n 8 --timeout 150 --timeout-method=thread -rs -p no:cacheprovider tests \
    > "$OUT/pytest-all.log" 2>&1
echo "pytest rc=$?: $(tail -1 "$OUT/pytest-all.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest-all.log" | head -20
STAGES="bench" BENCH_SECONDS=${BENCH_SECONDS:-300} dev/cuda/issue9_gpu.sh 2>&1 | tail -45
