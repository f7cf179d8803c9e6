#!/bin/bash
# One device call for issue 8 (the field reports' scripts): build with CUDA, then the whole test suite on the
# GPU machine (GPU tests, tests/compat with DEVICE=cuda, and the checks that need torch / transformers /
# safetensors, which only that machine has). The demo model (98 MB) cannot travel (64 MiB carry limit): its
# tests skip there and run in CI. Logs to $OUT.
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 FASTLOAD_SKIP_DEMO=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; nproc; date -u;
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } | tee "$OUT/device.txt"
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
python3 -c "import fastload, json; print(json.dumps(fastload.info()))" >> "$OUT/device.txt"
timeout ${PYTEST_SECONDS:-330} python3 -m pytest -q -n 8 --timeout 200 --timeout-method=thread -rs -p no:cacheprovider tests \
    > "$OUT/pytest_all.log" 2>&1
echo "pytest rc=$?: $(tail -1 "$OUT/pytest_all.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_all.log" | head -20
grep -E "^SKIPPED" "$OUT/pytest_all.log" | sed -E 's/\[[0-9]+\] //' | cut -c1-160 | sort | uniq -c | sort -rn | head -12
