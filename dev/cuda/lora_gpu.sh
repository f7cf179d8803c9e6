#!/bin/bash
# Issue 12 parts 6 and 7 on a GPU: the LoRA merge on the device (cuBLAS + add kernel, before quantisation) and
# fastload.from_hf's device-to-device path, plus the loader / quantisation / golden suites the change touches.
#   OUT=/tmp/o bash dev/cuda/lora_gpu.sh                                   carry [".devobj"]
# from_hf's GPU tests need torch + transformers on the machine (skipped otherwise: the log says which ran).
set -u
OUT=${OUT:-/tmp/fl_out}; mkdir -p "$OUT"
exec > >(tee -a "$OUT/lora_gpu.log") 2>&1
export PATH="$PATH:/usr/local/cuda/bin" PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
export FASTLOAD_CUDA_ARCHS=${FASTLOAD_CUDA_ARCHS:-$cap}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
source dev/cuda/use_objs.sh
FASTLOAD_CUDA=1 python3 setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -30 "$OUT/build.log"; exit 1; }
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
    || echo "no torch / transformers: tests/test_from_hf.py skips"
python3 -m pytest -q -rs tests/test_lora.py tests/test_from_hf.py
python3 -m pytest -q tests/test_cuda_load.py tests/test_cuda_quant.py tests/test_cuda_model.py
