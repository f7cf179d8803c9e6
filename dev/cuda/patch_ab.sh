#!/bin/bash
# A source change A/B'd on a GPU machine in one call: the tree as carried (the change applied, "new"), then the
# change reverted with PATCH (a diff of it, reverse-applied there) and rebuilt ("base"), decode b1 on the
# Qwen2.5-7B-shaped checkpoint per QUANT_MODES, ROUNDS times each, every run in a fresh process
# (dev/cuda/decode_ab.py; the greedy token hashes of the two must agree where the change keeps the arithmetic).
#   OUT=/tmp/o PATCH=path/to/change.patch STAGES="build tests bench decode" bash dev/cuda/patch_ab.sh   carry [".devobj", ".device"]
# build / tests: as dev/cuda/verify_gpu.sh; bench: .device/qgemv_bench when it is there (dev/cuda/qgemv_bench.sh).
# FORWARD=1: the tree as carried is the base (its .devobj match it, no compile there), decoded first; then PATCH is
# applied, rebuilt (only the files it touches), TESTS run on it, and decoded ("new").
source dev/cuda/ab_prelude.sh
STAGES=${STAGES:-"build tests decode"}
has() { [[ " $STAGES " == *" $1 "* ]]; }
vs=""; has build && vs="build"; has tests && vs="$vs tests"
[ -n "$vs" ] && OUT=$OUT STAGES="$vs" bash dev/cuda/verify_gpu.sh
if has decode; then  # the checkpoint is drawn while the bench runs
  ckpt_start
fi
if has bench && [ -x .device/qgemv_bench ]; then
  echo "== bench $(date +%T)"
  LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-} timeout ${BENCH_S:-240} .device/qgemv_bench ${BENCH_REPS:-9} \
      > "$OUT/qgemv_bench.log" 2>&1
  echo "bench rc=$?"; cat "$OUT/qgemv_bench.log"
fi
decode() {  # $1 label
  for r in $(seq ${ROUNDS:-2}); do
    timeout 200 python3 dev/cuda/decode_ab.py --dir /tmp/fl_qwen7b --quant ${QUANT_MODES:-bf16,int4} --bw-gbs "$bw" \
        --label "$1-r$r" | tee -a "$OUT/decode.jsonl"
  done
}
if has decode; then
  ckpt_wait
  echo "== decode $(date +%T)"
  bw=$(copy_bw)
  echo "copy $bw GB/s"
  if [ -n "${FORWARD:-}" ]; then
    decode base
    (git apply "$PATCH" 2>/dev/null || patch -p1 < "$PATCH") > /dev/null || { echo "cannot apply $PATCH"; exit 1; }
    FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build_new.log" 2>&1 || { tail -20 "$OUT/build_new.log"; exit 1; }
    echo "== new built $(date +%T)"
    [ -n "${TESTS:-}" ] && { timeout 300 python3 -m pytest -q -x $TESTS > "$OUT/pytest_new.log" 2>&1; echo "pytest (new) rc=$?: $(tail -1 "$OUT/pytest_new.log")"; }
    decode new
  else
  decode new
  fi
  if [ -n "${PATCH:-}" ] && [ -z "${FORWARD:-}" ]; then
    (git apply -R "$PATCH" 2>/dev/null || patch -R -p1 < "$PATCH") > /dev/null || { echo "cannot reverse $PATCH"; exit 1; }
    FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build_base.log" 2>&1 || { tail -20 "$OUT/build_base.log"; exit 1; }
    echo "== base built $(date +%T)"
    decode base
  fi
fi
echo "== end $(date +%T)"
