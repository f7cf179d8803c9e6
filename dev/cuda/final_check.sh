#!/bin/bash
# One device call before closing GPU work: build, every GPU test (xdist), memcheck on the GEMV tails and
# the attention/rope/norm ops, and the GEMV benchmark. Logs to $OUT.
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
timeout 150 python3 -m pytest -q -n 6 --timeout 120 --timeout-method=thread -rs tests/test_cuda_ops.py tests/test_cuda_model.py \
    tests/test_cuda_load.py > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?: $(tail -1 "$OUT/pytest_gpu.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head
timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -p no:cacheprovider -x tests/test_cuda_ops.py \
    -k "bfloat16 and (gemv_variants and (18952 or 2400) and (fma1- or fma2x8 or fma1s) or rope_store or attention and B1-T1 or add_rmsnorm)" \
    > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?: $(grep -E 'ERROR SUMMARY|passed|failed' "$OUT/memcheck.log" | tail -2 | tr '\n' ' ')"
gcc -O2 -std=gnu11 -c csrc/fl_common.c -o /tmp/fl_common.o; gcc -O2 -std=gnu11 -Icsrc -c csrc/safetensors.c -o /tmp/fl_st.o
OBJ=$(ls build/temp*/cuda/{cuda_backend,cuda_device,cuda_memory,norm,rope,matmul,convert,attention,loader}.cu.o)
nvcc -O3 -std=c++17 -Icsrc -arch=sm_$cap dev/cuda/gemv_bench.cu $OBJ /tmp/fl_common.o /tmp/fl_st.o -lcublas -lpthread -o /tmp/gemv_bench \
    && timeout 100 /tmp/gemv_bench bf16 > "$OUT/gemv_bf16.log" 2>&1; echo "gemv rc=$?"; grep -E "copy|^[a-z_|]+ +[0-9]+ +[0-9]+  1 " "$OUT/gemv_bf16.log"
