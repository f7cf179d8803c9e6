#!/bin/bash
# Issue 10 on a GPU machine (H200): Qwen's speed table and the load table of the Qwen2.5-7B-shaped bf16 checkpoint
# (random weights, benchmarks/synth.py) with transformers measured in the same run, bench load's PCIe row, and the
# five notebooks executed with GPU parameters. Stages (STAGES, in this order):
#   install  pip install --no-build-isolation --no-deps --no-index . with CUDA for this GPU (skipped when an installed
#            fastload with CUDA is already there: a warm machine's second call)                     ~130 s
#   ckpt     /tmp/fl_qwen7b (15.2 GB, torch draws the numbers on the GPU) + a word-level tokenizer  ~15 s
#   load     python -m fastload bench load --repeat $REPEAT --peer transformers: warm, cold, raw read,
#            PCIe host-to-device (pinned), transformers warm and cold                                ~60-90 s
#   speed    python -m fastload bench speed --context_length $LENGTHS --generate_length $GEN --peer transformers,
#            started in the background (setsid), so that a run longer than this call survives it; this call waits
#            for it until its budget is spent. fastload ~250 tok/s at short context, ~160 at 30k; transformers bf16
#            eager 17-22 tok/s on this H200 (benchmarks/results/issue9-2026-12-01, gpu-2026-11-21-pm): with the 4
#            lengths, GEN=2048: fastload ~45 s, transformers ~480 s (~9 min in all); GEN=512 ~2.5 min; GEN=256 ~1.5 min
#   nb       notebooks/execute.py: 02 / 03 draw the load / speed JSON above (results_json, nothing measured twice) on
#            model $CKPT, device cuda; 01 / 04 / 05 on the demo GGUF on cuda when it is here (DEMO_GGUF, or pieces,
#            below), else skipped with a message; executed copies + their PNGs in $OUT/notebooks.tar  ~60-90 s
# Everything that fails prints why and the next stage runs. Stage timings: $OUT/issue10.log ("== stage" lines).
#
# Files back in $OUT (7, no folders): issue10.log, speed_*.csv + .json, load_*.csv + .json, notebooks.tar,
# logs.tar (install / bench / notebook logs, device.txt, timings.txt). Results persist in $PERSIST (default
# /tmp/issue10) across calls of one warm machine: a stage whose result is there is not run again (RERUN="speed load"
# to measure again), and every call packs all of them.
#
# The tree (~15 MB) + .whl (~15 MB) + carried pieces must stay under 64 MiB a call; the demo GGUF (98 MB) travels in 3
# pieces, one a call (`split -n 3 ~/.cache/fastload/SmolLM2-135M-Instruct.Q4_1.gguf` into .demo1/demo.part-aa,
# .demo2/demo.part-ab, .demo3/demo.part-ac: 32.8 MB each); a warm machine keeps what earlier calls brought.
# One call (~6.5 min with GEN=256, ~7.5 with GEN=512; 01/04/05 skipped without the whole demo GGUF; the table at
# GEN=2048 does not fit in one 10-minute call):
#   GEN=256 FASTLOAD_COMMIT=<commit> dev/cuda/issue10_gpu.sh                    carry: [".whl"]
# The issue's table (GEN=2048) and all five notebooks: three calls on one warm machine, each within 30 s of the last:
#   FASTLOAD_COMMIT=<c> dev/cuda/issue10_gpu.sh                        carry [".whl", ".demo1"]  ~7.5 min: install, ckpt,
#                                                                      load; speed starts and runs on after the call
#   FASTLOAD_COMMIT=<c> STAGES="speed nb" dev/cuda/issue10_gpu.sh      carry [".demo2"]  ~6 min: waits for speed, 02/03
#   FASTLOAD_COMMIT=<c> STAGES="nb" dev/cuda/issue10_gpu.sh            carry [".demo3"]  ~2 min: all five notebooks
#
# Environment: GEN (2048), LENGTHS ("1 6144 14336 30720"), PEER (transformers; "" for fastload alone), REPEAT (3, load
# repeats), BUDGET_S (560: this call's wall budget; the speed wait stops in time for the stages after it), CKPT
# (/tmp/fl_qwen7b), CKPT_SHAPE (qwen2.5-7b; qwen2-tiny for a CPU rehearsal), DEVICE (cuda; cpu rehearses the steps
# on a CPU), DEMO_GGUF (the demo GGUF, SmolLM2-135M-Instruct.Q4_1.gguf, 98,362,432 bytes), DEMO_PARTS (a glob of its
# pieces, default ".demo*/*.part*": `split -b 30M SmolLM2-135M-Instruct.Q4_1.gguf .demo1/demo.part-` here; pieces
# carried by successive calls of one warm machine accumulate in $PERSIST/parts and are joined once the sha256 fits),
# FASTLOAD_COMMIT (recorded in the JSON: an installed copy has no .git), PERSIST (/tmp/issue10), NB_TOKENS (64),
# NB_CHARS (20000), NB_CONTEXT (2048): new tokens, characters scored and window of notebooks 01/04/05.
# A CPU rehearsal of every stage but install (a few minutes on 2 cores; what was run before handing this over):
#   PYTHONPATH=$PWD DEVICE=cpu CKPT=/tmp/tiny CKPT_SHAPE=qwen2-tiny GEN=8 LENGTHS="1 64" REPEAT=1 NB_TOKENS=8 \
#   NB_CHARS=1500 NB_CONTEXT=128 FASTLOAD_THREADS=1 DEMO_GGUF=~/.cache/fastload/SmolLM2-135M-Instruct.Q4_1.gguf \
#   STAGES="ckpt load speed nb" OUT=/tmp/o PERSIST=/tmp/p bash dev/cuda/issue10_gpu.sh
#
# Notebooks need nbclient, nbformat, ipykernel (matplotlib is there): not on the device image. Carry these wheels in
# .whl (cp312, manylinux; `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 ...` as the
# device README says; ~15 MB, ~5 MB without the optional debugpy and jedi); they install into /tmp/site, which a
# warm machine keeps for the next call:
#   nbclient-0.11.0 nbformat-5.11.1 ipykernel-7.4.0 ipython-9.18.1 jupyter_client-8.10.0 jupyter_core-5.9.1
#   traitlets-5.16.1 pyzmq-27.3.0 tornado-6.6.1 comm-0.2.3 nest_asyncio2-1.7.4 matplotlib_inline-0.2.2
#   fastjsonschema-2.22.3 jsonschema-4.26.0 jsonschema_specifications-2025.9.1 referencing-0.37.0 rpds_py-2026.9.1
#   platformdirs-4.14.9 ipython_pygments_lexers-1.1.1 prompt_toolkit-3.0.53 wcwidth-0.9.4 pexpect-4.9.0
#   ptyprocess-0.7.0 stack_data-0.6.3 asttokens-3.0.2 executing-2.3.0 pure_eval-0.2.4 parso-0.8.7
#   (optional) debugpy-1.8.22 jedi-0.20.1
# (already on the image: attrs, packaging, psutil, pygments, python-dateutil, typing_extensions, matplotlib, torch,
# transformers, tokenizers, safetensors, numpy, jinja2).
set -u
REPO=$(cd "$(dirname "$0")/../.." && pwd)
T0=$(date +%s)
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
PERSIST=${PERSIST:-/tmp/issue10}
RES=$PERSIST/results; LOGS=$PERSIST/logs; WORK=$PERSIST/work
mkdir -p "$RES" "$LOGS" "$WORK" "$PERSIST/parts"
# demo GGUF pieces carried by this call: kept at once, whatever stages run (a call whose nb stage is skipped while
# bench speed runs must not lose its piece: the sixth session's first two calls did)
( cd "$REPO" && for p in ${DEMO_PARTS:-.demo*/*.part*}; do [ -f "$p" ] && cp -n "$p" "$PERSIST/parts/"; done ) 2>/dev/null
exec > >(tee -a "$OUT/issue10.log") 2>&1
STAGES=${STAGES:-"install ckpt load speed nb"}
GEN=${GEN:-2048}
LENGTHS=${LENGTHS:-"1 6144 14336 30720"}
PEER=${PEER-transformers}
REPEAT=${REPEAT:-3}
BUDGET_S=${BUDGET_S:-560}
CKPT=${CKPT:-/tmp/fl_qwen7b}
CKPT_SHAPE=${CKPT_SHAPE:-qwen2.5-7b}
DEVICE=${DEVICE:-cuda}
RERUN=${RERUN:-}
NB_TOKENS=${NB_TOKENS:-64}; NB_CHARS=${NB_CHARS:-20000}; NB_CONTEXT=${NB_CONTEXT:-2048}  # 01/04/05's sizes
DEMO_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 MPLBACKEND=Agg HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false FASTLOAD_SKIP_DEMO=1
export FASTLOAD_COMMIT=${FASTLOAD_COMMIT:-$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)}
[ -n "$FASTLOAD_COMMIT" ] || unset FASTLOAD_COMMIT

now() { date +%s; }
left() { echo $(( BUDGET_S - ($(now) - T0) )); }
has() { [[ " $STAGES " == *" $1 "* ]]; }
rerun() { [[ " $RERUN " == *" $1 "* ]]; }
STAGE_T=0
begin() { STAGE_T=$(now); echo "== stage $1: start at +$(( STAGE_T - T0 )) s ($(left) s of the budget left)"; }
end() {  # end NAME RC [what]
  local dt=$(( $(now) - STAGE_T ))
  echo "== stage $1: rc=$2 in $dt s${3:+ ($3)}"
  echo "$(date -u +%FT%TZ) $1 rc=$2 ${dt}s ${3:-}" >> "$PERSIST/timings.txt"
}
newest() { ls -t "$RES"/$1 2>/dev/null | head -1; }  # full path of the newest result matching $1

echo "issue10_gpu.sh: STAGES='$STAGES' GEN=$GEN LENGTHS='$LENGTHS' PEER='$PEER' REPEAT=$REPEAT BUDGET_S=$BUDGET_S" \
     "CKPT=$CKPT DEVICE=$DEVICE commit=${FASTLOAD_COMMIT:-?}"
nl=$(echo $LENGTHS | wc -w)
peer_s=0; [ -n "$PEER" ] && peer_s=$(( 20 + nl * GEN / 18 ))
echo "estimate of the speed stage on an H200: fastload ~$(( 20 + nl * GEN / 200 )) s + $PEER ~$peer_s s"
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader 2>&1 | head -2
  echo "cpus $(nproc)"; python3 -c "import sys; print('python', sys.version.split()[0])"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" 2>&1 | tail -1
} > "$PERSIST/device.txt" 2>&1
cat "$PERSIST/device.txt"

# ---- wheels for the notebooks (.whl), kept in /tmp/site for the next call of a warm machine
if ls "$REPO"/.whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$REPO"/.whl/*.whl \
    > "$LOGS/wheels.log" 2>&1 || { echo "wheels: pip install failed:"; tail -5 "$LOGS/wheels.log"; }
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}

# every Python below runs in $WORK, so that `import fastload` finds the installed package, not $REPO/fastload
cd "$WORK" || exit 1
fl_ok() { python3 -c "import fastload, sys; b = fastload._C.build_info(); print(fastload.__file__, 'cuda' if b['cuda_compiled'] else 'cpu-only'); sys.exit(0 if b['cuda_compiled'] or '$DEVICE' == 'cpu' else 1)" 2>&1; }

# ---- install
if has install; then
  begin install
  if msg=$(fl_ok) && ! rerun install; then
    end install 0 "already installed: $msg"
  else
    cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d .)
    ( cd "$REPO" && source dev/cuda/use_objs.sh && FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=${cap:-90} timeout 400 python3 -m pip install -v \
        --no-build-isolation --no-deps --no-index --no-cache-dir . ) > "$LOGS/install.log" 2>&1
    rc=$?
    [ $rc = 0 ] || { echo "install failed (rc=$rc), the end of its log:"; grep -E "error|Error" "$LOGS/install.log" | head -10; tail -15 "$LOGS/install.log"; }
    end install $rc "$(fl_ok | tail -1)"
  fi
fi
if ! fl_ok > /dev/null; then
  echo "no usable fastload (with CUDA for DEVICE=$DEVICE): $(fl_ok | tail -1); the stages that need it will fail"
fi

# ---- checkpoint
if has ckpt; then
  begin ckpt
  timeout 600 python3 -c "import sys; sys.path.insert(0, '$REPO/benchmarks'); import synth; synth.bench_checkpoint('$CKPT', '$CKPT_SHAPE')" \
    > "$LOGS/ckpt.log" 2>&1
  rc=$?
  [ $rc = 0 ] || tail -5 "$LOGS/ckpt.log"
  end ckpt $rc "$(du -sh "$CKPT" 2>/dev/null | cut -f1) in $CKPT"
fi

peer_args=(); [ -n "$PEER" ] && peer_args=(--peer "$PEER")
SPEED_PID=$PERSIST/speed.pid; SPEED_RC=$PERSIST/speed.rc

speed_running() { [ -f "$SPEED_PID" ] && kill -0 "$(cat "$SPEED_PID")" 2>/dev/null; }

# ---- load (before speed: the GPU must be idle while it is measured)
if has load; then
  begin load
  if [ -n "$(newest 'load_*.json')" ] && ! rerun load; then
    end load 0 "already measured: $(newest 'load_*.json')"
  elif speed_running; then
    end load 1 "skipped: bench speed is still running on the GPU (pid $(cat "$SPEED_PID"))"
  else
    timeout ${LOAD_S:-300} python3 -m fastload bench load --model "$CKPT" --device "$DEVICE" --repeat "$REPEAT" \
        "${peer_args[@]}" --outputs_dir "$RES" > "$LOGS/load.log" 2>&1
    rc=$?
    tail -14 "$LOGS/load.log"
    end load $rc "$(newest 'load_*.json')"
  fi
fi

# ---- speed (in the background: survives the end of this call; the next call of a warm machine waits for it)
SPEED_DONE=1
if has speed; then
  begin speed
  if speed_running; then
    echo "bench speed already running (pid $(cat "$SPEED_PID")), started by an earlier call: waiting for it"
  elif [ -n "$(newest 'speed_*.json')" ] && ! rerun speed; then
    echo "already measured: $(newest 'speed_*.json')"
  else
    rm -f "$SPEED_RC" "$SPEED_PID"
    # its own session (setsid): the device tool ends a command's other processes when the command returns.
    # The inner shell writes its own pid (setsid may fork) and, at the end, bench speed's exit status.
    # shellcheck disable=SC2086
    setsid bash -c 'echo $$ > "$1"; cd "$2" || exit 1; rcf=$3; shift 3; "$@"; echo $? > "$rcf"' _ "$SPEED_PID" \
        "$WORK" "$SPEED_RC" python3 -m fastload bench speed --model_id_or_path "$CKPT" --device "$DEVICE" \
        --context_length $LENGTHS --generate_length "$GEN" "${peer_args[@]}" --outputs_dir "$RES" \
        > "$LOGS/speed.log" 2>&1 < /dev/null &
    for _ in $(seq 50); do [ -s "$SPEED_PID" ] && break; sleep 0.2; done
    echo "bench speed started (pid $(cat "$SPEED_PID" 2>/dev/null)), log $LOGS/speed.log"
  fi
  reserve=15; has nb && reserve=$(( reserve + ${NB_RESERVE_S:-110} ))
  while speed_running && [ "$(left)" -gt "$reserve" ]; do sleep 5; done
  if speed_running; then
    SPEED_DONE=0
    tail -6 "$LOGS/speed.log"
    end speed running "still running in the background (pid $(cat "$SPEED_PID")): call again within 30 s with \
STAGES=\"speed nb\" to wait for it and draw it; the GPU stages after it are skipped"
  else
    rc=$(cat "$SPEED_RC" 2>/dev/null || echo "?")
    tail -16 "$LOGS/speed.log" 2>/dev/null
    end speed "$rc" "$(newest 'speed_*.json')"
  fi
fi

# ---- notebooks
if has nb; then
  begin nb
  missing=$(python3 -c "
import importlib.util
print(' '.join(m for m in ('nbclient', 'nbformat', 'ipykernel', 'matplotlib') if importlib.util.find_spec(m) is None))")
  if [ "$SPEED_DONE" = 0 ] || speed_running; then
    end nb 1 "skipped: bench speed is still running on the GPU"
  elif [ -n "$missing" ]; then
    end nb 1 "skipped: $missing not importable (carry the wheels listed at the top of this script in .whl)"
  else
    # the demo GGUF: DEMO_GGUF, else pieces (this call's and earlier calls') joined once they make the right file
    demo=""
    if [ -n "${DEMO_GGUF:-}" ] && [ -f "$REPO/${DEMO_GGUF#$REPO/}" ]; then demo="$REPO/${DEMO_GGUF#$REPO/}"
    elif [ -n "${DEMO_GGUF:-}" ] && [ -f "$DEMO_GGUF" ]; then demo=$DEMO_GGUF
    fi
    if [ -z "$demo" ]; then
      if [ -f "$PERSIST/demo.gguf" ]; then demo=$PERSIST/demo.gguf
      elif ls "$PERSIST"/parts/* > /dev/null 2>&1; then
        cat "$PERSIST"/parts/* > "$PERSIST/demo.tmp"
        if [ "$(sha256sum "$PERSIST/demo.tmp" | cut -d' ' -f1)" = "$DEMO_SHA256" ]; then
          mv "$PERSIST/demo.tmp" "$PERSIST/demo.gguf"; demo=$PERSIST/demo.gguf
        else
          echo "demo pieces so far: $(ls "$PERSIST/parts" | tr '\n' ' ')($(stat -c %s "$PERSIST/demo.tmp") of 98362432 bytes)"
          rm -f "$PERSIST/demo.tmp"
        fi
      fi
    fi
    mkdir -p "$WORK/notebooks" "$WORK/nb-out"
    nbrun() {  # nbrun NAME TIMEOUT -p ...
      local name=$1 to=$2 t; t=$(now); shift 2
      timeout "$to" python3 "$REPO/notebooks/execute.py" --output-dir "$WORK/notebooks" --timeout "$to" \
          -p device "$DEVICE" "$@" "$REPO/notebooks/$name.ipynb" > "$LOGS/nb-$name.log" 2>&1
      local rc=$?
      echo "notebook $name: rc=$rc in $(( $(now) - t )) s"
      [ $rc = 0 ] || tail -8 "$LOGS/nb-$name.log"
    }
    lj=$(newest 'load_*.json'); sj=$(newest 'speed_*.json')
    if [ -n "$lj" ]; then nbrun 02_load_time 120 -p outputs_dir "$WORK/nb-out" -p model "$CKPT" -p results_json "$lj"
    else echo "notebook 02_load_time: skipped (no bench load result to draw)"; fi
    if [ -n "$sj" ]; then nbrun 03_speed_benchmark 120 -p outputs_dir "$WORK/nb-out" -p model "$CKPT" -p results_json "$sj"
    else echo "notebook 03_speed_benchmark: skipped (no bench speed result to draw)"; fi
    if [ -n "$demo" ]; then
      export FASTLOAD_DEMO_GGUF=$demo
      nbrun 01_quickstart 150 -p model "$demo" -p max_new_tokens "$NB_TOKENS"
      nbrun 04_concurrency 150 -p outputs_dir "$WORK/nb-out" -p model "$demo" -p max_new_tokens "$NB_TOKENS"
      nbrun 05_quantisation 200 -p outputs_dir "$WORK/nb-out" -p model "$demo" -p max_chars "$NB_CHARS" \
          -p text_file "$REPO/benchmarks/data/devils_dictionary.txt" -p context "$NB_CONTEXT" -p generate_length "$NB_TOKENS"
    else
      echo "notebooks 01_quickstart 04_concurrency 05_quantisation: skipped (no demo GGUF: set DEMO_GGUF, or carry its" \
           "pieces, see the top of this script)"
    fi
    # the figures as PNG files beside the notebooks
    python3 - "$WORK/notebooks" <<'EOF' 2>&1 | tail -3
import base64, glob, json, os, sys
d = sys.argv[1]
for p in sorted(glob.glob(os.path.join(d, "*.ipynb"))):
    nb = json.load(open(p))
    k = 0
    for c in nb["cells"]:
        for o in c.get("outputs", []):
            png = o.get("data", {}).get("image/png")
            if png:
                k += 1
                with open(p[:-6] + f"_fig{k}.png", "wb") as fh:
                    fh.write(base64.b64decode(png if isinstance(png, str) else "".join(png)))
    print(os.path.basename(p), k, "figure(s)")
EOF
    end nb 0 "$(ls "$WORK/notebooks" | tr '\n' ' ')"
  fi
fi

# ---- pack: at most 8 files come back
for f in "$(newest 'speed_*.csv')" "$(newest 'speed_*.json')" "$(newest 'load_*.csv')" "$(newest 'load_*.json')"; do
  [ -n "$f" ] && cp "$f" "$OUT/"
done
[ -n "$(ls "$WORK/notebooks" 2>/dev/null)" ] && tar -C "$WORK" -cf "$OUT/notebooks.tar" notebooks
cp "$PERSIST/device.txt" "$PERSIST/timings.txt" "$LOGS/" 2>/dev/null
tar -C "$PERSIST" -cf "$OUT/logs.tar" logs
echo "stage timings so far (every call of this machine):"; cat "$PERSIST/timings.txt" 2>/dev/null
echo "== done in $(( $(now) - T0 )) s; in \$OUT: $(ls "$OUT" | tr '\n' ' ')"
sleep 1  # tee (the log's copy in $OUT) writes its last lines
