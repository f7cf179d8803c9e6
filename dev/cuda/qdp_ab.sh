#!/bin/bash
# A/B of the quantised GEMV kernels on the Qwen2.5-7B-shaped checkpoint (decode batch 1 and 8, int8 / int4):
# FASTLOAD_QGEMV=dp (auto) against mma, after building and running the quantised GPU tests.
#   VARIANTS="auto mma" MODES=int8,int4 TESTS="tests/test_cuda_quant.py" dev/cuda/qdp_ab.sh
# (decode batch 1 and 8 per mode from benchmarks/test_gpu.py::test_gpu_quant's JSON; 128 new tokens)
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 FASTLOAD_SKIP_DEMO=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
t0=$(date +%s)
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -40 /tmp/build.log; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
if [ -n "${TESTS:-}" ]; then
  timeout ${PYTEST_SECONDS:-240} python3 -m pytest -q -x -n 8 --timeout 200 --timeout-method=thread -p no:cacheprovider $TESTS > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)|Error|assert" "$OUT/pytest.log" | head -20
fi
for vc in ${VARIANTS:-auto mma}; do  # VARIANT[:QDP_CFG]
  v=${vc%%:*}; cfg=${vc#*:}; [ "$cfg" = "$vc" ] && cfg=r4u2
  echo "== FASTLOAD_QGEMV=$v FASTLOAD_QDP_CFG=$cfg"
  # benchmarks/test_gpu.py::test_gpu_quant at full size (128 new tokens; quant_gpu.py runs it), modes by -k
  modes=${MODES:-int8,int4}
  FASTLOAD_QDP_CFG=$cfg FASTLOAD_QGEMV=$v timeout ${BENCH_SECONDS:-200} python3 benchmarks/quant_gpu.py \
      -k "test_gpu_quant and (${modes//,/ or })" --bench-results "$OUT/ab-$v-$cfg" > "$OUT/bench-$v-$cfg.log" 2>&1
  python3 - "$OUT/ab-$v-$cfg" <<'EOF'
import glob, json, os, sys
for p in sorted(glob.glob(os.path.join(sys.argv[1], "test_gpu_quant*.json"))):
    d = json.load(open(p))
    f = d["figures"]
    print(d["config"]["mode"], "b1", round(f["decode_tok_s_per_seq"], 1), "b8", round(f["decode_b8_tok_s_total"], 1))
EOF
done
