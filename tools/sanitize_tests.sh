#!/usr/bin/env bash
# The whole test suite against a copy of the C core built with AddressSanitizer + UndefinedBehaviorSanitizer
# (FASTLOAD_SANITIZE, see setup.py), CPU only. CI runs it after the normal tests (.ci/run).
#
#   bash tools/sanitize_tests.sh [pytest arguments]     default: -q tests
#
# The normal (editable / in-place) build is left alone: the sanitized module is built into a temporary
# directory, put next to a copy of the package's Python files ($T/pkg/fastload), and the tests run from
# $T/pkg so that directory comes first on sys.path (python -m puts the working directory first, so running
# from the repository would import the normal build). tests/conftest.py checks, inside the pytest process,
# that fastload._C is the sanitized module (FASTLOAD_TEST_EXPECT_C). Subprocesses started by the tests inherit
# PYTHONPATH and LD_PRELOAD, so they are checked too.
#
# Any sanitizer report fails the run: the first one aborts its process. ASan's reports also go to
# $T/san.<pid> files, printed at the end, so one from a subprocess whose exit status a test did not look at
# fails the run too; UBSan's go to stderr (pytest runs with -s so they are not swallowed).
#
# Environment: FASTLOAD_SANITIZE (default address,undefined); SANITIZE_KEEP=DIR builds in DIR and keeps it.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
SAN=${FASTLOAD_SANITIZE:-address,undefined}
PY=${PYTHON:-python3}

if [ -n "${SANITIZE_KEEP:-}" ]; then
    T=$(mkdir -p "$SANITIZE_KEEP" && cd "$SANITIZE_KEEP" && pwd)
    rm -rf "${T:?}/pkg" "${T:?}/lib" "${T:?}"/san.*
else
    T=$(mktemp -d "${TMPDIR:-/tmp}/fastload-sanitize.XXXXXX")
    trap 'rm -rf "$T"' EXIT
fi

# 1. Build. FASTLOAD_CUDA=0 because the sanitized build is CPU-only (setup.py refuses FASTLOAD_CUDA=1 with it).
t0=$SECONDS
echo "sanitize: building the C core with -fsanitize=$SAN into $T" >&2
if ! (cd "$ROOT" && FASTLOAD_SANITIZE="$SAN" FASTLOAD_CUDA=0 "$PY" setup.py build_ext \
        --build-lib "$T/lib" --build-temp "$T/tmp" > "$T/build.log" 2>&1); then
    tail -n 40 "$T/build.log" >&2
    echo "sanitize: the sanitized build failed (log above)" >&2
    exit 1
fi
so=$(ls "$T"/lib/fastload/_C*.so)
mkdir -p "$T/pkg/fastload"
cp "$ROOT"/fastload/*.py "$T/pkg/fastload/"
cp "$so" "$T/pkg/fastload/"
cp "$T/lib/fastload/_build_cpu.py" "$T/pkg/fastload/"  # this build's CPU record (setup.py write_cpu_record)
so="$T/pkg/fastload/$(basename "$so")"
echo "sanitize: built in $((SECONDS - t0)) s" >&2

# 2. The sanitizer runtimes the module was linked against; they must be loaded before anything else in the
# process (python itself is not instrumented), hence LD_PRELOAD, the ASan runtime first.
preload=""
for lib in libasan libubsan liblsan libtsan; do
    p=$(ldd "$so" | awk -v l="$lib" 'index($1, l ".so") == 1 { print $3 }')
    if [ -n "$p" ]; then
        [ -f "$p" ] || { echo "sanitize: $lib resolves to '$p', not a file" >&2; exit 1; }
        preload=${preload:+$preload:}$p
    fi
done
[ -n "$preload" ] || { echo "sanitize: $so links no sanitizer runtime" >&2; exit 1; }

# detect_leaks=0: CPython does not free everything at exit by design (interned objects, static types,
# module state, its own arenas), nor do numpy and tokenizers, so LeakSanitizer would report thousands of
# leaks from the interpreter at every exit. Leaks in the C parsers are checked by the libFuzzer harnesses
# (fuzz/), which run with leak detection on.
# abort_on_error / halt_on_error: the first report ends the process with SIGABRT, so the test fails.
# allocator_may_return_null stays 0: a huge allocation attempt from a file's numbers is itself a bug.
export LD_PRELOAD="$preload${LD_PRELOAD:+:$LD_PRELOAD}"
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:strict_string_checks=1:detect_stack_use_after_return=0:check_initialization_order=1:log_path=$T/san${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:abort_on_error=1:log_path=$T/san${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export PYTHONPATH="$T/pkg${PYTHONPATH:+:$PYTHONPATH}"
export FASTLOAD_SANITIZE="$SAN"          # tests that cannot run under ASan (RLIMIT_AS) may skip on it
export FASTLOAD_TEST_EXPECT_C="$so"     # tests/conftest.py: fastload._C must be this file
# The preloaded runtime reaches every program the tests start; nvcc's compiler passes crash under it
# (SIGSEGV), so tests/test_cuda_load.py gets a stand-in for its probe and skips (this build has no CUDA).
cat > "$T/no_probe" <<'PROBE'
#!/bin/sh
echo "sanitized CPU-only run (tools/sanitize_tests.sh): no CUDA load probe"
exit 1
PROBE
chmod +x "$T/no_probe"
export FASTLOAD_LOAD_PROBE="$T/no_probe"

# 3. Check the import here too, for a clear message before the suite starts.
(cd "$T/pkg" && "$PY" -c '
import os, sys, fastload._C as C
want = os.environ["FASTLOAD_TEST_EXPECT_C"]
if os.path.realpath(C.__file__) != os.path.realpath(want):
    sys.exit(f"sanitize: imported {C.__file__}, not the sanitized {want}")
') || exit 1

# 4. The suite, from $T/pkg. Paths given as arguments are taken relative to the repository root.
args=()
for a in "$@"; do
    if [[ "$a" != -* && "$a" != /* && -e "$ROOT/${a%%::*}" ]]; then a="$ROOT/$a"; fi
    args+=("$a")
done
[ ${#args[@]} -gt 0 ] || args=(-q "$ROOT/tests")
t0=$SECONDS
set +e
# -s (no capture): pytest's fd-level capture would swallow a report written to fd 2 by a process that
# then aborts (UBSan ignores log_path next to the ASan runtime: its reports always go to stderr), and
# --capture=sys breaks tests that call faulthandler.enable().
(cd "$T/pkg" && "$PY" -m pytest -p no:cacheprovider -s "${args[@]}")
rc=$?
set -e
reports=$(ls "$T"/san.* 2>/dev/null || true)
if [ -n "$reports" ]; then
    for f in $reports; do echo "==== sanitizer report $f" >&2; cat "$f" >&2; done
    echo "sanitize: $(echo "$reports" | wc -l) sanitizer report(s) (above)" >&2
    [ $rc -ne 0 ] || rc=1
fi
echo "sanitize: tests ran in $((SECONDS - t0)) s, exit status $rc" >&2
exit $rc
