#!/bin/bash
# One device call for the hardening issue (7): build with CUDA, every GPU test (hostile checkpoints on the
# CUDA path included), then compute-sanitizer memcheck (leak check on) over the GPU tests, each pytest-xdist
# worker a sanitised process. Logs to $OUT.
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/device.txt"
compute-sanitizer --version | tail -1 | tee -a "$OUT/device.txt"
FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$cap python3 setup.py -q build_ext --inplace > /tmp/build.log 2>&1 || { tail -30 /tmp/build.log; exit 1; }
GPU_TESTS="tests/test_cuda_ops.py tests/test_cuda_model.py tests/test_cuda_load.py tests/test_cuda_hardening.py"
timeout 200 python3 -m pytest -q -n 8 --timeout 120 --timeout-method=thread -rs $GPU_TESTS > "$OUT/pytest_gpu.log" 2>&1
echo "pytest rc=$?: $(tail -1 "$OUT/pytest_gpu.log")"; grep -E "^(FAILED|ERROR)" "$OUT/pytest_gpu.log" | head
# The CPU-side hardening tests on this machine too (its Python, numpy and tokenizers differ from CI's).
timeout 120 python3 -m pytest -q -n 8 tests/test_hardening_core.py tests/test_config_validation.py tests/test_containment.py \
    tests/test_tokenizer_hardening.py > "$OUT/pytest_hardening_cpu.log" 2>&1
echo "cpu hardening rc=$?: $(tail -1 "$OUT/pytest_hardening_cpu.log")"
# memcheck, one sanitised process over the GPU test files that load checkpoints (hostile ones included) and
# run the model (not the torch peer, whose own CUDA would be checked too); the kernels' own sweeps
# (test_cuda_ops.py, 800+ cases) do not fit one device call under memcheck: their tail cases are
# checked by dev/cuda/final_check.sh. Expected: one "Program hit cudaErrorMemoryAllocation" (the test
# that asks for more memory than the device has, on purpose) and nothing else.
# Not used, and why: xdist workers under --target-processes all did not start within 270 s;
# --leak-check full reports every model still alive at interpreter exit (session fixtures) as leaked,
# and under it test_memory_accounting_and_load_peak saw one backend (33 MiB) still counted after `del m`
# when it ran after test_cuda_hardening.py (never without the leak checker, nor in any pair of tests).
MEMCHECK_TESTS=${MEMCHECK_TESTS:-"tests/test_cuda_hardening.py tests/test_cuda_model.py"}
timeout ${MEMCHECK_SECONDS:-300} compute-sanitizer --tool memcheck --target-processes application-only \
    python3 -m pytest -q -p no:cacheprovider -p no:xdist -p no:benchmark -rs -k "not transformers" $MEMCHECK_TESTS \
    > "$OUT/memcheck.log" 2>&1
echo "memcheck rc=$?: $(grep -E '^=+ +(Invalid|Program hit|Uninitialized)' "$OUT/memcheck.log" | sort | uniq -c | tr '\n' ' ')" \
     "$(grep -E 'ERROR SUMMARY' "$OUT/memcheck.log" | tail -1) $(grep -E 'passed|failed' "$OUT/memcheck.log" | tail -1)"
