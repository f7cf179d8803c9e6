#!/usr/bin/env bash
# fuzz/run.sh: build and run fastload's fuzzers (see fuzz/README.md).
#
#   bash fuzz/run.sh build             build the libFuzzer harnesses into fuzz/build/
#   bash fuzz/run.sh short [SECONDS]   each C harness and the Python harness for SECONDS (default 20);
#                                      exits non-zero on any finding (what CI runs)
#   bash fuzz/run.sh long RUNS [JOBS]  each C harness for RUNS executions (in JOBS processes); prints a summary
#   bash fuzz/run.sh python SECONDS    the Python (atheris) harness for SECONDS
#   bash fuzz/run.sh repro FILE...     run the crashers given (or all of fuzz/crashers/) once each
#
# Environment: CLANG (default /usr/bin/clang, else clang-14/clang on PATH), PYTHON (default python3),
# FUZZ_PYTHON=0 (short: skip the Python harness, e.g. in CI until issue 7's Python fixes land).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/.." && pwd)"
BUILD="$HERE/build"
PYTHON="${PYTHON:-python3}"
HARNESSES=(fuzz_safetensors fuzz_gguf)
declare -A MAXLEN=([fuzz_safetensors]=262144 [fuzz_gguf]=1048576)
COMMON_FLAGS=(-timeout=5 -rss_limit_mb=2048 -malloc_limit_mb=2048 -print_final_stats=1)
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

find_clang() {
    if [ -n "${CLANG:-}" ]; then echo "$CLANG"; return; fi
    for c in /usr/bin/clang clang-14 clang; do
        if command -v "$c" >/dev/null 2>&1; then command -v "$c"; return; fi
    done
    echo ""
}

# libFuzzer's runtime ships in libclang-rt-<ver>-dev on Debian (not with clang itself there).
ensure_toolchain() {
    local cc; cc="$(find_clang)"
    if [ -z "$cc" ]; then
        echo "fuzz: no clang found; installing clang-14" >&2
        apt-get update -qq && apt-get install -y -qq clang-14 >/dev/null
        cc="$(find_clang)"
    fi
    local rt; rt="$("$cc" -print-resource-dir)/lib/linux/libclang_rt.fuzzer-x86_64.a"
    if [ ! -f "$rt" ]; then
        local ver; ver="$("$cc" -dumpversion | cut -d. -f1)"
        echo "fuzz: libFuzzer runtime missing ($rt); installing libclang-rt-$ver-dev" >&2
        apt-get update -qq && apt-get install -y -qq "libclang-rt-$ver-dev" >/dev/null
    fi
    CC="$cc"
}

build() {
    ensure_toolchain
    mkdir -p "$BUILD"
    local flags=(-fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -g -O1
                 -fno-omit-frame-pointer -std=gnu11 -I"$ROOT/csrc" -I"$HERE" -Wall -Wno-unused-function)
    "$CC" "${flags[@]}" "$HERE/fuzz_safetensors.c" "$ROOT/csrc/safetensors.c" "$ROOT/csrc/fl_common.c" \
        -o "$BUILD/fuzz_safetensors"
    "$CC" "${flags[@]}" "$HERE/fuzz_gguf.c" "$ROOT/csrc/gguf.c" "$ROOT/csrc/fl_common.c" -o "$BUILD/fuzz_gguf"
    echo "fuzz: built ${HARNESSES[*]} in $BUILD with $("$CC" --version | head -1)"
}

need_build() {
    for h in "${HARNESSES[@]}"; do [ -x "$BUILD/$h" ] || { build; return; }; done
}

# run_c HARNESS LOG ARGS...: fuzz HARNESS on a scratch copy of its corpus (new inputs land in
# fuzz/build/corpus/, the committed seeds stay as they are); findings go to fuzz/build/findings/.
run_c() {
    local h="$1" log="$2"; shift 2
    local work="$BUILD/corpus/$h" art="$BUILD/findings/$h/"
    mkdir -p "$work" "$art"
    touch "$BUILD/findings/.since_$h"
    local dict=()
    [ -f "$HERE/$h.dict" ] && dict=(-dict="$HERE/$h.dict")
    set +e
    "$BUILD/$h" "${COMMON_FLAGS[@]}" -max_len="${MAXLEN[$h]}" "${dict[@]}" -artifact_prefix="$art" \
        "$@" "$work" "$HERE/corpus/$h" >"$log" 2>&1
    local rc=$?
    set -e
    return $rc
}

# new_findings HARNESS: artefacts written since its run began (older ones are earlier runs', kept for a repro; they
# used to be counted again, so a clean run could report findings and `long` fail)
new_findings() { find "$BUILD/findings/$1" -maxdepth 1 -type f -newer "$BUILD/findings/.since_$1" 2>/dev/null | wc -l; }

summarise() { # HARNESS LOG RC
    local h="$1" log="$2" rc="$3"
    local execs rate cov ft corp
    execs="$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}' | tail -1)"
    rate="$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | awk '{print $2}' | tail -1)"
    cov="$(grep -oE '(DONE|#[0-9]+).*cov: [0-9]+' "$log" | tail -1 | grep -oE 'cov: [0-9]+' | awk '{print $2}')"
    ft="$(grep -oE 'ft: [0-9]+' "$log" | tail -1 | awk '{print $2}')"
    corp="$(grep -oE 'corp: [0-9]+' "$log" | tail -1 | awk '{print $2}')"
    local found; found="$(new_findings "$h")"
    printf '%-18s executions=%s exec/s=%s cov=%s ft=%s corpus=%s findings=%s rc=%s log=%s\n' \
        "$h" "${execs:-?}" "${rate:-?}" "${cov:-?}" "${ft:-?}" "${corp:-?}" "$found" "$rc" "$log"
}

short() {
    local secs="${1:-20}" fail=0
    need_build
    mkdir -p "$BUILD/logs"
    for h in "${HARNESSES[@]}"; do
        local log="$BUILD/logs/$h-short.log" rc=0
        run_c "$h" "$log" -max_total_time="$secs" || rc=$?
        summarise "$h" "$log" "$rc"
        if [ "$rc" != 0 ]; then fail=1; grep -E 'ERROR|FUZZ_CHECK|runtime error|Test unit written' "$log" | head -20 >&2 || true; fi
    done
    local rc=0
    if [ "${FUZZ_PYTHON:-1}" = 0 ]; then
        echo "fuzz_python        skipped (FUZZ_PYTHON=0)"
    else
        python_run "$secs" || rc=$?
    fi
    [ "$rc" != 0 ] && fail=1
    if [ "$fail" != 0 ]; then echo "fuzz: FINDINGS (see fuzz/build/findings/ and the logs)" >&2; exit 1; fi
    echo "fuzz: short run clean"
}

# long RUNS [JOBS]: RUNS executions per harness in all; with JOBS > 1, JOBS processes of each harness
# (seeds 1..JOBS, RUNS/JOBS executions each, one shared scratch corpus) run at once and their
# executions are summed: how the 10^7 runs of record are made on a many-core machine.
long() {
    local runs="${1:?usage: run.sh long RUNS [JOBS]}" jobs="${2:-1}" fail=0
    [ "$jobs" -gt 1 ] && { long_parallel "$runs" "$jobs"; return; }
    need_build
    mkdir -p "$BUILD/logs"
    echo "# fastload fuzz run: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit:  $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- csrc fuzz 2>/dev/null || echo ' (dirty)')"
    echo "machine: $(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
    echo "clang:   $("$(find_clang)" --version | head -1)"
    echo "runs:    $runs per harness"
    for h in "${HARNESSES[@]}"; do
        local log="$BUILD/logs/$h-long.log" rc=0 t0 t1
        t0=$(date +%s)
        run_c "$h" "$log" -runs="$runs" || rc=$?
        t1=$(date +%s)
        summarise "$h" "$log" "$rc"
        echo "                   wall=$((t1 - t0))s"
        [ "$rc" != 0 ] && fail=1
    done
    [ "$fail" = 0 ] && echo "result: 0 findings" || { echo "result: FINDINGS"; exit 1; }
}

long_parallel() {
    local runs="$1" jobs="$2" fail=0 per=$(( ($1 + $2 - 1) / $2 ))
    need_build
    mkdir -p "$BUILD/logs"
    local cc; cc="$(find_clang)"
    echo "# fastload fuzz run: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "commit:  $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)$(git -C "$ROOT" diff --quiet HEAD -- csrc fuzz 2>/dev/null || echo ' (dirty)')"
    echo "machine: $(uname -n), $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(uname -sr)"
    if [ -n "$cc" ]; then echo "clang:   $("$cc" --version | head -1)"; else echo "clang:   none here (harnesses built on another machine)"; fi
    echo "runs:    $runs per harness = $jobs processes x $per (-seed=1..$jobs)"
    for h in "${HARNESSES[@]}"; do
        local t0 t1 pids=() total=0 rc=0 k
        t0=$(date +%s)
        for k in $(seq 1 "$jobs"); do
            run_c "$h" "$BUILD/logs/$h-long-$k.log" -runs="$per" -seed="$k" & pids+=($!)
        done
        for k in "${!pids[@]}"; do wait "${pids[$k]}" || rc=$?; done
        t1=$(date +%s)
        for k in $(seq 1 "$jobs"); do
            local e; e="$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$BUILD/logs/$h-long-$k.log" | awk '{print $2}' | tail -1)"
            total=$((total + ${e:-0}))
        done
        local found; found="$(new_findings "$h")"
        local cov; cov="$(grep -ohE 'cov: [0-9]+' "$BUILD"/logs/"$h"-long-*.log | awk '{print $2}' | sort -n | tail -1)"
        printf '%-18s executions=%s (%d processes) wall=%ss exec/s=%s max_cov=%s findings=%s rc=%s\n' "$h" "$total" "$jobs" \
            "$((t1 - t0))" "$((total / (t1 - t0 > 0 ? t1 - t0 : 1)))" "${cov:-?}" "$found" "$rc"
        [ "$rc" != 0 ] || [ "$found" != 0 ] && fail=1
    done
    [ "$fail" = 0 ] && echo "result: 0 findings" || { echo "result: FINDINGS"; exit 1; }
}

ensure_python() {
    if ! "$PYTHON" -c "import atheris" >/dev/null 2>&1; then
        echo "fuzz: installing atheris (pip)" >&2
        "$PYTHON" -m pip install -q atheris >&2
    fi
    if ! PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -c "import fastload._C" >/dev/null 2>&1; then
        echo "fuzz: fastload's extension is not built in $ROOT; run: FASTLOAD_CUDA=0 $PYTHON setup.py build_ext --inplace" >&2
        return 1
    fi
}

python_run() {
    local secs="${1:?usage: run.sh python SECONDS}"
    ensure_python || return 1
    mkdir -p "$BUILD/logs" "$BUILD/findings/fuzz_python" "$BUILD/corpus/fuzz_python"
    touch "$BUILD/findings/.since_fuzz_python"
    local log="$BUILD/logs/fuzz_python.log" rc=0 tmp
    # the harness's scratch root (checkpoints it builds, its canary files) goes under a directory made here and removed
    # here: libFuzzer ends a timed run with _exit, which skips the harness's own atexit clean-up (every run left a
    # /dev/shm/fl-fuzz-* behind)
    tmp="$(mktemp -d /dev/shm/fl-fuzz-run-XXXXXX 2>/dev/null || mktemp -d)"
    # new inputs go to the scratch corpus (the first directory), never into the committed seeds
    (cd "$BUILD/findings/fuzz_python" && FL_FUZZ_TMP="$tmp" PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" \
        "$PYTHON" "$HERE/fuzz_python.py" -max_total_time="$secs" -timeout=10 -rss_limit_mb=3072 \
        -max_len=131072 -print_final_stats=1 -artifact_prefix="$BUILD/findings/fuzz_python/" \
        "$BUILD/corpus/fuzz_python" "$HERE/corpus/fuzz_python") >"$log" 2>&1 || rc=$?
    rm -rf "$tmp"
    local execs rate
    execs="$(grep -oE 'stat::number_of_executed_units: +[0-9]+' "$log" | awk '{print $2}' | tail -1)"
    rate="$(grep -oE 'stat::average_exec_per_sec: +[0-9]+' "$log" | awk '{print $2}' | tail -1)"
    printf '%-18s executions=%s exec/s=%s findings=%s rc=%s log=%s\n' fuzz_python "${execs:-?}" "${rate:-?}" \
        "$(new_findings fuzz_python)" "$rc" "$log"
    if [ "$rc" != 0 ]; then grep -E '=== Uncaught|Error|Exception|crash-|timeout-|oom-' "$log" | head -20 >&2 || true; fi
    return $rc
}

repro() {
    need_build
    local files=("$@") rc=0
    [ ${#files[@]} = 0 ] && mapfile -t files < <(find "$HERE/crashers" -path '*/fuzz_*/*' -type f ! -name '*.md' | sort)
    for f in "${files[@]}"; do
        local h; h="$(basename "$(dirname "$f")")"
        if [ "$h" = fuzz_python ]; then
            PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" "$HERE/fuzz_python.py" -timeout=10 "$f" >/dev/null 2>&1 \
                && echo "ok       $f" || { echo "FAILS    $f"; rc=1; }
        else
            "$BUILD/$h" -timeout=5 -rss_limit_mb=2048 -malloc_limit_mb=2048 "$f" >/dev/null 2>&1 \
                && echo "ok       $f" || { echo "FAILS    $f"; rc=1; }
        fi
    done
    return $rc
}

case "${1:-}" in
    build) build ;;
    short) short "${2:-20}" ;;
    long) long "${2:-}" "${3:-1}" ;;
    python) python_run "${2:-}" ;;
    repro) shift; repro "$@" ;;
    *) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
