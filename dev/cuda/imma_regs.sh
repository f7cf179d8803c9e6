#!/bin/bash
# Registers and spills of qgemv_imma8_kernel's configurations in seconds, on this machine (no GPU needed): qmatmul.cu up
# to the dp2a section (the imma8 kernel and its helpers) plus explicit instantiations of every configuration that
# dev/cuda/qmma_bench.cu lists, compiled to a cubin with ptxas -v (the whole qmatmul.cu takes ~5 minutes). A w8
# configuration above 128 registers runs 1 block an SM instead of 2 (benchmarks/results/imma8-cfg-2026-12-04-h200/).
#   bash dev/cuda/imma_regs.sh [ARCH (default sm_90a)]
set -eu
cd "$(dirname "$0")/../.."
ARCH=${1:-sm_90a}
T=$(mktemp -d)
L=$(grep -n "^// decode GEMV on integer dot products (dp2a)" csrc/cuda/qmatmul.cu | cut -d: -f1)
{ sed -n "1,$((L - 2))p" csrc/cuda/qmatmul.cu | sed "s|#include \"|#include \"$PWD/csrc/cuda/|; s|$PWD/csrc/cuda/../quant.h|$PWD/csrc/quant.h|"
  echo '#define I(...) template __global__ void qgemv_imma8_kernel<__VA_ARGS__>(__nv_bfloat16 *, const uint4 *, const float2 *, const fl_qw, const __nv_bfloat16 *, int, uint64_t);'
  grep -o 'launch_qimma8_cfg<[^>]*>' dev/cuda/qmma_bench.cu | sed 's/launch_qimma8_cfg<\(.*\)>/I(\1)/' | sort -u
} > "$T/imma_only.cu"
nvcc -O3 -std=c++17 --use_fast_math -Icsrc -gencode arch=compute_${ARCH#sm_},code=$ARCH -Xptxas -v -cubin -o "$T/imma.cubin" \
    "$T/imma_only.cu" > "$T/ptxas.log" 2>&1 || { cat "$T/ptxas.log"; exit 1; }
python3 - "$T/ptxas.log" <<'PY'
import re, subprocess, sys
lines = open(sys.argv[1]).read().split("\n")
cur = None
print("regs spill(st,ld)  <T, S, BITS, ZEROS, WARPS, U, TILES, NF, HALF, STAGES, MINB>")
for i, l in enumerate(lines):
    m = re.search(r"Compiling entry function '(\S+)'", l)
    if m:
        cur = m.group(1)
    m = re.search(r"Used (\d+) registers", l)
    if m and cur and "imma8" in cur:
        sp = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", lines[i - 1])
        dm = subprocess.run(["c++filt", cur], capture_output=True, text=True).stdout.strip()
        print(f"{m.group(1):>4} {'%s,%s' % sp.groups() if sp else '?':>10}  {dm[dm.index('<') + 1:dm.index('>')]}")
PY
rm -rf "$T"
