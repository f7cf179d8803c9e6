#!/bin/bash
# One device call: build for this GPU, CUDA op + model tests, the GEMV benchmark, then decode A/B
# runs (dev/cuda/decode_ab.py) under the settings in $AB (';'-separated env assignments), each with every
# '|'-separated argument set in $AB_ARGS.
#   OUT=/tmp/o AB="FASTLOAD_PDL=1;FASTLOAD_PDL=0" bash dev/cuda/ab_run.sh          carry [".devobj", ".qb"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap}
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
t0=$(date +%s)
source dev/cuda/use_objs.sh
FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; gpu_bench.make_checkpoint('/tmp/fl_qwen7b')" > /tmp/ckpt.log 2>&1 ) &
ck=$!
if [ -n "${GEMV-1}" ]; then  # GEMV= (empty) skips the bf16 GEMV micro-benchmark
    gcc -O2 -std=gnu11 -c csrc/fl_common.c -o /tmp/fl_common.o; gcc -O2 -std=gnu11 -Icsrc -c csrc/safetensors.c -o /tmp/fl_st.o
    OBJ=$(ls build/temp*/cuda/{cuda_backend,cuda_device,cuda_memory,norm,rope,matmul,convert,attention,loader}.cu.o)
    nvcc -O3 -std=c++17 -Icsrc -arch=sm_$cap dev/cuda/gemv_bench.cu $OBJ /tmp/fl_common.o /tmp/fl_st.o -lcublas -lpthread -o /tmp/gemv_bench > /tmp/bench_build.log 2>&1 || head -20 /tmp/bench_build.log
fi
t0=$(date +%s)
timeout 300 python3 -m pytest -q -p no:cacheprovider -n 6 --timeout 120 --timeout-method=thread -rfE \
    ${TESTS:-tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_load.py} > "$OUT/pytest.log" 2>&1
echo "pytest rc=$? $(( $(date +%s) - t0 )) s: $(tail -1 "$OUT/pytest.log")"
grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
[ -n "${GEMV-1}" ] && { timeout 120 /tmp/gemv_bench bf16 > "$OUT/gemv_bf16.log" 2>&1; echo "gemv rc=$?"; cat "$OUT/gemv_bf16.log" | cut -c1-150; }
# the quantised GEMV micro-benchmark, built on the dev machine by dev/cuda/qgemv_bench.sh and carried in .qb/
[ -x .qb/qgemv_bench ] && { timeout 120 .qb/qgemv_bench 9 > "$OUT/qgemv_bench.log" 2>&1; echo "qgemv_bench rc=$?"; cat "$OUT/qgemv_bench.log"; }
wait $ck; tail -3 /tmp/ckpt.log
bw=$(python3 -c "import sys; sys.path.insert(0,'benchmarks'); import gpu_bench; print(gpu_bench.d2d_bandwidth()/1e9)")
echo "D2D $bw GB/s"
IFS=';' read -ra SETS <<< "${AB:-FASTLOAD_PDL=1;FASTLOAD_PDL=0}"
IFS='|' read -ra ARGSETS <<< "${AB_ARGS:- }"  # '|'-separated argument sets for decode_ab.py, each run per setting
for s in "${SETS[@]}"; do
    for a in "${ARGSETS[@]}"; do
        env $s python3 dev/cuda/decode_ab.py --bw-gbs "$bw" --label "$s" $a 2>&1 | grep -E "^\{|Error" | tee -a "$OUT/ab.jsonl"
    done
done
if [ -n "${NCU:-}" ]; then
    timeout 240 ncu --clock-control none --metrics gpu__time_duration.sum --csv python3 dev/cuda/ncu_step.py /tmp/fl_qwen7b \
        > "$OUT/ncu.csv" 2> /tmp/ncu.err; echo "ncu rc=$? $(wc -l < "$OUT/ncu.csv") lines"
fi
