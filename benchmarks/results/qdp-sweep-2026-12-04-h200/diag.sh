set -u
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD FASTLOAD_SKIP_DEMO=1
source dev/cuda/use_objs.sh
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=90 python3 setup.py -q build_ext --inplace > $OUT/build.log 2>&1 || tail $OUT/build.log
python3 dev/cuda/make_ckpt.py qwen7b > "$OUT/ckpt.log" 2>&1
(nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.mem,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 200 > $OUT/smi.csv) &
smi=$!
python3 .device/runs_diag.py int4 0
python3 .device/runs_diag.py int4 2
FASTLOAD_PREFIX_CACHING=0 python3 .device/runs_diag.py int4 0
FASTLOAD_ENGINE_PIPELINE=0 python3 .device/runs_diag.py int4 0
python3 .device/runs_diag.py bf16 0
kill $smi
python3 - <<'P'
import csv
rows=list(csv.reader(open("$OUT/smi.csv".replace("$OUT", __import__("os").environ["OUT"]))))
print(rows[0]); 
for r in rows[1::10]: print(r)
P
