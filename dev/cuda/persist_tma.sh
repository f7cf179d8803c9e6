#!/bin/bash
# dev/cuda/persist_tma.sh: persist_bench.cu's chain of kernels against the persistent copy-engine design (thirty-sixth
# session; benchmarks/results/persist-tma-2026-12-06/). OUT=dir bash dev/cuda/persist_tma.sh (needs only nvcc and a GPU)
# WORKS / XMODES / STEPS narrow it; PERSIST_XMODE: 0 one value a hand-off, 1 a 4096-value vector after a counter,
# 2 the vector as {value, epoch} words polled by the reader (no counter, no fence); DYNS="0 1": PERSIST_DYN=1 has the
# producers take a step's chunks in tickets from a counter instead of a fixed slice a block.
set -u
OUT=${OUT:-/tmp/persist_tma}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv | tee "$OUT/gpu.txt"
nvcc -O3 -arch=sm_90 -o "$OUT/pb" dev/cuda/persist_bench.cu || exit 1
git rev-parse HEAD > "$OUT/commit.txt" 2>/dev/null
for steps in ${STEPS:-norm1,qkv,attention,o,norm2,gate_up,swiglu,down qkv,attention,o,gate_up,down}; do
  for w in ${WORKS:-1}; do
    for x in ${XMODES:-1 2}; do
      for d in ${DYNS:-0}; do
        echo "=== steps $steps, work $w, xmode $x, dyn $d"
        PERSIST_TMA_ONLY=1 PERSIST_XMODE=$x PERSIST_DYN=$d timeout 60 "$OUT/pb" ${REPS:-30} $steps $w
      done
    done
  done
done 2>&1 | tee "$OUT/persist.txt"
rm -f "$OUT/pb"
