#!/bin/bash
# Build a quantised-GEMV bench that compiles qmatmul.cu into itself (dev/cuda/qgemv_bench.cu by default, or
# dev/cuda/qmma_bench.cu) against the backend's other CUDA objects (a CUDA build_ext first, or .devobj via
# dev/cuda/use_objs.sh).   dev/cuda/qgemv_bench.sh [SRC.cu] [OUT]     (default: qgemv_bench.cu -> /tmp/qgemv_bench)
set -eu
cd "$(dirname "$0")/../.."
SRC=${1:-dev/cuda/qgemv_bench.cu}
OUTB=${2:-/tmp/$(basename "$SRC" .cu)}
T=$(ls -d build/temp*/cuda | head -1)
OBJ=$(ls $T/*.cu.o | grep -v -e qmatmul -e generate_cuda)
gcc -O2 -std=gnu11 -Icsrc -c csrc/fl_common.c -o /tmp/qb_fl_common.o
gcc -O2 -std=gnu11 -Icsrc -c csrc/quant_ref.c -o /tmp/qb_quant_ref.o 2>/dev/null || true
nvcc -O3 -std=c++17 --use_fast_math -Icsrc -gencode arch=compute_90a,code=sm_90a -o "$OUTB" "$SRC" $OBJ \
    /tmp/qb_fl_common.o $(ls /tmp/qb_quant_ref.o 2>/dev/null) -lcublas -lpthread
