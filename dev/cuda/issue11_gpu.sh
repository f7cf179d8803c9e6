#!/bin/bash
# Issue 11 (the engine) on a GPU machine: install, the GPU tests the engine touches, and benchmarks/engine_bench.py on
# the Qwen2.5-7B-shaped bf16 checkpoint (random weights, made on the GPU in ~15 s). One call, within BUDGET_S:
#   FASTLOAD_COMMIT=<commit> [STAGES="install tests bench"] [TESTS="tests/test_cuda_engine.py ..."]
#   [SCENARIOS=single,seed,many,mixed,prefix] dev/cuda/issue11_gpu.sh           carry: [".devobj"]
# Files back in $OUT: issue11.log, engine_bench.json, pytest logs (tests_*.log), device.txt.
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T0=$(date +%s)
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/issue11.log") 2>&1
STAGES=${STAGES:-"install tests bench"}
BUDGET_S=${BUDGET_S:-570}
TESTS=${TESTS:-"tests/test_cuda_engine.py tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_api.py"}
SCENARIOS=${SCENARIOS:-single,seed,many,mixed,prefix}
CKPT=${CKPT:-/tmp/fl_qwen7b}
left() { echo $(( BUDGET_S - ($(date +%s) - T0) )); }
stage() { echo "== $1 at +$(( $(date +%s) - T0 )) s ($(left) s left)"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
cd "$REPO"
for s in $STAGES; do
  case $s in
  install)
    stage install
    if python3 -c "import fastload, sys; sys.exit(0 if fastload.info()['cuda_compiled'] else 1)" 2>/dev/null &&
       [ -n "${SKIP_INSTALLED:-}" ]; then echo "installed already"; continue; fi
    ( source dev/cuda/use_objs.sh && FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=90 timeout 400 python3 -m pip install -q \
      --no-build-isolation --no-deps --no-index . ) > "$OUT/install.log" 2>&1 || { echo "install failed"; tail -30 "$OUT/install.log"; exit 1; }
    # the source tree importable too (tests that start python with the repository on sys.path)
    so=$(cd /tmp && python3 -c "import fastload._C as c; print(c.__file__)") && cp "$so" fastload/ && echo "built: $so"
    ;;
  tests)
    stage tests
    cd /tmp
    for t in $TESTS; do
      n=$(basename "$t" .py)
      lim=$(( $(left) - 200 )); [ $lim -lt 30 ] && { echo "skip $t: budget"; continue; }
      timeout $lim python3 -m pytest -q -p no:cacheprovider -x "$REPO/$t" ${PYTEST_K:+-k "$PYTEST_K"} > "$OUT/tests_$n.log" 2>&1
      echo "$t: rc=$? $(tail -1 "$OUT/tests_$n.log")"
      grep -E "^(FAILED|ERROR)|Error" "$OUT/tests_$n.log" | head -8
    done
    cd "$REPO"
    ;;
  reliability)
    # benchmarks/serve_reliability.py over HTTP on the 7B-shaped checkpoint; the [serve] extra's wheels travel in
    # .whlserve (starlette, uvicorn, httpx and their dependencies, ~1 MB) and install into /tmp/site
    stage reliability
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whlserve/*.whl > "$OUT/wheels.log" 2>&1 || tail -3 "$OUT/wheels.log"
    timeout 200 python3 -c "import sys; sys.path.insert(0, '$REPO/benchmarks'); import synth; synth.bench_checkpoint('$CKPT', 'qwen2.5-7b')" \
      > "$OUT/ckpt.log" 2>&1 || { echo "checkpoint failed"; tail -5 "$OUT/ckpt.log"; }
    lim=$(( $(left) - 10 ))
    [ $lim -gt 60 ] && PYTHONPATH=/tmp/site timeout $lim python3 benchmarks/serve_reliability.py --model "$CKPT" \
      --requests ${REQUESTS:-1000} --out "$OUT/serve_reliability.json"
    echo "reliability rc=$?"
    ;;
  bench)
    stage ckpt
    timeout 200 python3 -c "import sys; sys.path.insert(0, '$REPO/benchmarks'); import synth; synth.bench_checkpoint('$CKPT', 'qwen2.5-7b')" \
      > "$OUT/ckpt.log" 2>&1 || { echo "checkpoint failed"; tail -5 "$OUT/ckpt.log"; }
    stage bench
    lim=$(( $(left) - 15 ))
    [ $lim -gt 60 ] && FASTLOAD_COMMIT=${FASTLOAD_COMMIT:-} timeout $lim python3 benchmarks/engine_bench.py --model "$CKPT" \
      --scenarios "$SCENARIOS" --out "$OUT/engine_bench.json" ${BENCH_ARGS:-}
    echo "bench rc=$?"
    ;;
  esac
done
stage done
