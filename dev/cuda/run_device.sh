#!/bin/bash
# dev/cuda/run_device.sh: build the package in place, run the CUDA op tests, the graph-capture
# check, the GEMV benchmark and compute-sanitizer in one go (one call on a GPU machine).
# Logs go to $OUT; a summary is printed last.
#   OUT=/tmp/out bash dev/cuda/run_device.sh [pytest -k expression]
set -u
OUT=${OUT:-/tmp/fl_out}
mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin"
export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-90} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
if ! python3 -c "import pytest" 2>/dev/null && [ -d whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site whl/*.whl && export PYTHONPATH=/tmp/site
fi
t0=$(date +%s)
python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s" >> "$OUT/gpu.txt"
gcc -O2 -std=gnu11 -c csrc/fl_common.c -o /tmp/fl_common.o
gcc -O2 -std=gnu11 -Icsrc -c csrc/safetensors.c -o /tmp/fl_st.o
OBJ="$(ls build/temp*/cuda/{cuda_backend,cuda_device,cuda_memory,norm,rope,matmul,convert,attention,loader}.cu.o) /tmp/fl_st.o"
NV="nvcc -O3 -std=c++17 -Icsrc -gencode arch=compute_90,code=sm_90"
$NV dev/cuda/gemv_bench.cu $OBJ /tmp/fl_common.o -lcublas -lpthread -o /tmp/gemv_bench > "$OUT/bench_build.log" 2>&1 &
$NV dev/cuda/graph_check.cu $OBJ /tmp/fl_common.o -lcublas -lpthread -o /tmp/graph_check > "$OUT/graph_build.log" 2>&1 &
t0=$(date +%s)
timeout 120 python3 -m pytest -q -p no:cacheprovider --tb=short -rfE tests/test_cuda_ops.py ${1:+-k "$1"} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? in $(( $(date +%s) - t0 )) s" >> "$OUT/pytest.log"
wait
timeout 30 /tmp/graph_check > "$OUT/graph.log" 2>&1; echo "graph_check rc=$?" >> "$OUT/graph.log"
timeout 60 /tmp/gemv_bench bf16 > "$OUT/gemv_bf16.log" 2>&1; echo "gemv_bench bf16 rc=$?" >> "$OUT/gemv_bf16.log"
timeout 30 /tmp/gemv_bench f16 > "$OUT/gemv_f16.log" 2>&1; echo "gemv_bench f16 rc=$?" >> "$OUT/gemv_f16.log"
if command -v compute-sanitizer > /dev/null; then
    timeout 40 compute-sanitizer --tool memcheck --error-exitcode 9 /tmp/graph_check > "$OUT/sanitizer.log" 2>&1
    echo "memcheck graph_check rc=$?" >> "$OUT/sanitizer.log"
    timeout 60 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x \
        tests/test_cuda_ops.py -k "bfloat16 and (matmul and (-1000-576- or -4097-1000- or 37-) or rope or attention or gather or swiglu and -5- or add_rmsnorm and 1000 or gemv_variants and 4097)" \
        >> "$OUT/sanitizer.log" 2>&1
    echo "memcheck pytest subset rc=$?" >> "$OUT/sanitizer.log"
fi
# ---- summary ----
cat "$OUT/gpu.txt"
grep -iE "warning|error" "$OUT/build.log" | grep -v -iE "beta|readme|license" | head -10
cat "$OUT/bench_build.log" "$OUT/graph_build.log" | head -10
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -30
tail -2 "$OUT/pytest.log"
grep -E "ERROR SUMMARY|rc=|passed|failed" "$OUT/sanitizer.log" 2>/dev/null | tail -6
cat "$OUT/graph.log"
grep -E "copy|  1 \|" "$OUT/gemv_f16.log"
cat "$OUT/gemv_bf16.log"
