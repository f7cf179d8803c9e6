#!/bin/bash
# Cold-cache load rate against loader threads and chunk size (is the disk saturated at the default
# 16 threads x 4 MiB?). Needs root for drop_caches. Prints one line per setting.
#   bash dev/cuda/cold_scan.sh [/tmp/fl_qwen7b]
D=${1:-/tmp/fl_qwen7b}
export PYTHONUNBUFFERED=1
python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import gpu_bench; gpu_bench.make_checkpoint('$D')" > /tmp/ckpt.log 2>&1 || tail /tmp/ckpt.log
for cfg in "16 4M" "16 16M" "32 4M" "32 16M" "64 4M" "64 16M" "8 4M" "16 4M"; do
    set -- $cfg
    sync; echo 3 > /proc/sys/vm/drop_caches
    FASTLOAD_LOAD_THREADS=$1 FASTLOAD_LOAD_CHUNK=$2 python3 -c "
import fastload, sys
m = fastload.AutoModelForCausalLM.from_pretrained('$D', device_map='cuda', torch_dtype='bfloat16', progress=False)
s = m.load_stats
print('threads $1 chunk $2: %.2f s %.2f GB/s %s' % (s['seconds'], s['gb_per_s'], s['cache']))"
done
