#!/usr/bin/env bash
# load_probe.sh: build benchmarks/load_probe.cu, write a Qwen2.5-7B-shaped bf16 checkpoint, and
# measure the loading ceilings and fl_cuda_load against them on this machine's GPU.
#   benchmarks/load_probe.sh [GB=15.23] [SHARDS=4] [DIR=/var/tmp/fl_ckpt]
# (15.23 GB = 28 layers, the Qwen2.5-7B size.) Stages may be chosen with
# STAGES="build pytest gen verify alloc rates load cold" (default: all, in that order).
# Cold runs drop the page cache (root: /proc/sys/vm/drop_caches; else posix_fadvise DONTNEED).
set -u
GB=${1:-15.23}; SHARDS=${2:-4}; DIR=${3:-/var/tmp/fl_ckpt}
STAGES=${STAGES:-"build pytest gen verify alloc rates load cold"}
B=/tmp/fl_load_probe; P=$B/load_probe
ARCH=${ARCH:-sm_90}
has() { case " $STAGES " in *" $1 "*) return 0;; esac; return 1; }
t() { local to=$1; shift; echo "+ $*"; timeout "$to" "$@"; local rc=$?; [ $rc -ne 0 ] && echo "!! rc=$rc: $*"; return 0; }

if has build; then
  mkdir -p $B
  gcc -O2 -std=gnu11 -Icsrc -c csrc/fl_common.c -o $B/fl_common.o &&
  gcc -O2 -std=gnu11 -Icsrc -c csrc/safetensors.c -o $B/safetensors.o &&
  nvcc -O3 -std=c++17 -arch=$ARCH --use_fast_math -Icsrc benchmarks/load_probe.cu csrc/cuda/loader.cu \
       $B/fl_common.o $B/safetensors.o -o $P || { echo "build failed"; exit 1; }
fi
has pytest && FASTLOAD_LOAD_PROBE=$P t 120 python3 -m pytest -q tests/test_cuda_load.py
has gen && t 120 $P gen $DIR $GB $SHARDS && sync
if has verify; then
  t 60 $P verify $DIR --dtype keep --errors
  t 60 $P verify $DIR --dtype f16
fi
if has alloc; then
  t 30 $P alloc - -t 16 -c 4
fi
if has rates; then
  t 60 $P rates $DIR -t 16 -c 4
fi
if has load; then
  t 60 $P load $DIR --reps 3
  FASTLOAD_LOAD_PINNED=alloc t 60 $P load $DIR --reps 2
  FASTLOAD_LOAD_KEEP_POOL=0 t 60 $P load $DIR --reps 2
  t 60 $P load $DIR --dtype f16 --reps 2
  t 60 $P load $DIR --dtype f32 --reps 1
  # not the files' owner: mincore cannot see the page cache, RWF_NOWAIT reads decide
  command -v runuser >/dev/null && t 60 runuser -u nobody -- $P load $DIR --reps 2
fi
if has cold; then
  t 90 $P rates $DIR -t 16 -c 4 --cold --no-warm
  t 60 $P load $DIR --cold --reps 1
  FASTLOAD_LOAD_CHUNK=8M t 60 $P load $DIR --cold --reps 1
  FASTLOAD_LOAD_DIRECT=1 t 60 $P load $DIR --cold --reps 1
  command -v runuser >/dev/null && t 60 runuser -u nobody -- $P load $DIR --cold --reps 1
fi
