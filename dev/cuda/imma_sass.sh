#!/bin/bash
# The SASS of one qgemv_imma8_kernel instantiation in seconds, on this machine (no GPU): the same trimmed translation
# unit as dev/cuda/imma_regs.sh, compiled to a cubin and disassembled with cuobjdump, which the CUDA toolkit here lacks
# but PyPI ships (pip download nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm; unzip; CUOBJDUMP=.../nvidia/cu13/bin). Prints
# the instruction count and the most frequent opcodes; FULL=1 prints every instruction.
#   CUOBJDUMP=/tmp/nvd/x/nvidia/cu13/bin bash dev/cuda/imma_sass.sh "__nv_bfloat16, __half, 4, true, 8, 2, 2, false, false, 0, 2"
# (template arguments: T, S, BITS, ZEROS, WARPS, U, TILES, NF, HALF, STAGES, MINB). The twenty-first session cut the
# w8u2t2 main loop from 586 to 330 instructions this way (benchmarks/results/imma8-index-2026-12-04-h200/).
set -eu
cd "$(dirname "$0")/../.."
ARGS=${1:?template arguments of qgemv_imma8_kernel}
export PATH="${CUOBJDUMP:-/tmp/nvd/x/nvidia/cu13/bin}:$PATH"
command -v cuobjdump > /dev/null || { echo "cuobjdump not found: set CUOBJDUMP (see the header)"; exit 1; }
T=$(mktemp -d)
L=$(grep -n "^// decode GEMV on integer dot products (dp2a)" csrc/cuda/qmatmul.cu | cut -d: -f1)
{ sed -n "1,$((L - 2))p" csrc/cuda/qmatmul.cu | sed "s|#include \"|#include \"$PWD/csrc/cuda/|; s|$PWD/csrc/cuda/../quant.h|$PWD/csrc/quant.h|"
  echo "template __global__ void qgemv_imma8_kernel<$ARGS>(__nv_bfloat16 *, const uint4 *, const float2 *, const fl_qw, const __nv_bfloat16 *, int, uint64_t);"
} > "$T/k.cu"
nvcc -O3 -std=c++17 --use_fast_math -Icsrc -gencode arch=compute_90a,code=sm_90a -Xptxas -v -cubin -o "$T/k.cubin" "$T/k.cu" \
    > "$T/ptxas.log" 2>&1 || { cat "$T/ptxas.log"; exit 1; }
grep -E "Used [0-9]+ registers|spill" "$T/ptxas.log" | sed 's/^ptxas info *: //'
cuobjdump -sass "$T/k.cubin" | grep -E "^\s+/\*[0-9a-f]{4}\*/" | sed 's/ *\/\* 0x[0-9a-f]* \*\///; s/^ *//' > "$T/all.txt"
echo "instructions: $(wc -l < "$T/all.txt")"
awk '{op=$2; if (op ~ /^@/) op=$3; sub(/\..*/,"",op); sub(/;/,"",op); print op}' "$T/all.txt" | sort | uniq -c | sort -rn |
    head -24 | tr '\n' ' '
echo
[ -n "${FULL:-}" ] && cat "$T/all.txt"
rm -rf "$T"
