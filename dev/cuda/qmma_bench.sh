#!/bin/bash
# Build dev/cuda/qmma_bench.cu against the backend's CUDA objects (a CUDA build_ext first, or .devobj via
# dev/cuda/use_objs.sh) into /tmp/qmma_bench (or $1). qmatmul.cu is compiled into the bench itself.
set -eu
cd "$(dirname "$0")/../.."
T=$(ls -d build/temp*/cuda | head -1)
OBJ=$(ls $T/*.cu.o | grep -v -e qmatmul -e generate_cuda)
gcc -O2 -std=gnu11 -Icsrc -c csrc/fl_common.c -o /tmp/qmb_fl_common.o
gcc -O2 -std=gnu11 -Icsrc -c csrc/quant_ref.c -o /tmp/qmb_quant_ref.o 2>/dev/null || true
nvcc -O3 -std=c++17 --use_fast_math -Icsrc -gencode arch=compute_90a,code=sm_90a -o ${1:-/tmp/qmma_bench} dev/cuda/qmma_bench.cu $OBJ \
    /tmp/qmb_fl_common.o $(ls /tmp/qmb_quant_ref.o 2>/dev/null) -lcublas -lpthread
