#!/bin/bash
# Long context on a GPU machine (issue 10's last two rows, issue 12 part 4): Qwen2.5-7B-shaped bf16 (random weights,
# benchmarks/gpu_bench.make_checkpoint) with Qwen's YaRN block (factor 4 over 32768) at 63488 and 129024 prompt tokens.
# Stages ($STAGES, in order; a stage whose output is in $PERSIST is not run again on a warm machine):
#   build    setup.py build_ext --inplace with the carried .devobj objects (dev/cuda/use_objs.sh)         ~60 s
#   tests    pytest $TESTS (default: every tests/test_cuda_*.py and tests/test_rope_scaling.py)           ~3-4 min
#   ckpt     /tmp/fl_qwen7b (15.2 GB, drawn on the GPU), in the background during the tests
#   fl       bench speed, fastload alone, GEN new tokens (2048)                                           ~2-3 min
#   long     benchmarks/long_context.py: prefill and decode apart at each length, decode against the roofline that
#            counts KV bytes, transformers (sdpa) measured the same way (PEER_GEN/4 new tokens)          ~3 min
#   table    bench speed --peer transformers with GEN new tokens (Qwen's table rows; transformers ~4.5 min a row at
#            these lengths), started in its own session (setsid) so that it outlives this call: a call returns after
#            TABLE_WAIT_S (540) seconds, and the next call (STAGES=table, within 30 s) waits for it and brings it back
#   peer     bench speed --peer transformers, PEER_GEN new tokens (128): transformers decodes ~10 tok/s at
#            this length, so its 2048 would take minutes a row; its figure is a mean over PEER_GEN steps
# Files back in $OUT: longctx.log, pytest.log, speed_*.csv/json of each bench stage.
#   OUT=/tmp/o FASTLOAD_COMMIT=<commit> bash dev/cuda/longctx_gpu.sh                 carry [".devobj"]
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
PERSIST=${PERSIST:-/tmp/longctx}; mkdir -p "$PERSIST"
exec > >(tee -a "$OUT/longctx.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
STAGES=${STAGES:-"build tests ckpt fl long peer"}
GEN=${GEN:-2048}; PEER_GEN=${PEER_GEN:-128}
LENGTHS=${LENGTHS:-"63488 129024"}
YARN=${YARN:-'{"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}'}
has() { [[ " $STAGES " == *" $1 "* ]]; }
stamp() { echo "== $1 $(date +%T)"; }
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
if has build && [ ! -f "$PERSIST/built" ]; then
  stamp build
  source dev/cuda/use_objs.sh
  FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$PERSIST/build.log" 2>&1 || { tail -30 "$PERSIST/build.log"; exit 1; }
  touch "$PERSIST/built"
fi
ck=""
if has ckpt && [ ! -f /tmp/fl_qwen7b/tokenizer.json ]; then
  ( python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import synth; synth.bench_checkpoint('/tmp/fl_qwen7b', 'qwen2.5-7b')" > "$PERSIST/ckpt.log" 2>&1 ) &
  ck=$!
fi
if has tests && [ ! -f "$PERSIST/tested" ]; then
  stamp tests
  timeout ${TESTS_S:-330} python3 -m pytest -q -p no:cacheprovider -n 6 --timeout 300 --timeout-method=thread -rfE \
      ${TESTS:-$(ls tests/test_cuda_*.py) tests/test_rope_scaling.py} > "$OUT/pytest.log" 2>&1
  echo "pytest rc=$?: $(tail -1 "$OUT/pytest.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest.log" | head -20
  touch "$PERSIST/tested"
fi
[ -n "$ck" ] && { wait $ck; tail -2 "$PERSIST/ckpt.log"; }
bench() {  # $1 stage name, $2 generate length, rest: extra arguments
  local name=$1 gen=$2; shift 2
  stamp "$name"
  timeout ${BENCH_S:-420} python3 -m fastload bench speed --model_id_or_path /tmp/fl_qwen7b --device cuda \
      --context_length $LENGTHS --generate_length "$gen" --rope_scaling "$YARN" --outputs_dir "$PERSIST/$name" \
      --comment "yarn factor 4, commit ${FASTLOAD_COMMIT:-unknown}" "$@" 2>&1 | tail -25
  echo "bench $name rc=${PIPESTATUS[0]}"
  cp "$PERSIST/$name"/* "$OUT/" 2>/dev/null
}
has fl && [ ! -d "$PERSIST/fl" ] && bench fl "$GEN"
if has long && [ ! -f "$PERSIST/long_context.json" ]; then
  stamp long
  timeout ${LONG_S:-300} python3 benchmarks/long_context.py --model /tmp/fl_qwen7b --lengths $LENGTHS --new 256 \
      --peer-new $(( PEER_GEN / 4 )) --rope_scaling "$YARN" --out "$PERSIST/long_context.json" 2>&1 | grep -v Loading | tail -12
  cp "$PERSIST/long_context.json" "$OUT/" 2>/dev/null
fi
has peer && [ ! -d "$PERSIST/peer" ] && bench peer "$PEER_GEN" --peer transformers
if has table; then
  stamp table
  T0=$(date +%s); TP=$PERSIST/table.pid; TRC=$PERSIST/table.rc
  if [ ! -f "$TP" ]; then
    mkdir -p "$PERSIST/table"
    setsid bash -c 'echo $$ > "$1"; rcf=$2; shift 2; "$@" > '"$PERSIST"'/table.log 2>&1 < /dev/null; echo $? > "$rcf"' _ "$TP" "$TRC" \
        python3 -m fastload bench speed --model_id_or_path /tmp/fl_qwen7b --device cuda --context_length $LENGTHS \
        --generate_length "$GEN" --rope_scaling "$YARN" --peer transformers --outputs_dir "$PERSIST/table" \
        --comment "yarn factor 4, commit ${FASTLOAD_COMMIT:-unknown}" &
    sleep 2; echo "bench speed --peer started (pid $(cat "$TP"))"
  fi
  while [ ! -f "$TRC" ] && [ $(( $(date +%s) - T0 )) -lt ${TABLE_WAIT_S:-540} ]; do sleep 5; done
  if [ -f "$TRC" ]; then
    echo "table rc=$(cat "$TRC")"; grep -v "Loading" "$PERSIST/table.log" | tail -14; cp "$PERSIST/table"/* "$OUT/"
  else
    echo "table still running: call again with STAGES=table within 30 s"; grep -v Loading "$PERSIST/table.log" | tail -4
  fi
fi
nvidia-smi --query-gpu=memory.used --format=csv,noheader
stamp end
