#!/bin/bash
# Source before a device build: CUDA objects built on the dev machine for this GPU (FASTLOAD_CUDA_ARCHS=90 build
# there, objects and their .sha copied to .devobj/ and carried) go where this Python's build_ext looks, so
# setup.py reuses those whose hash still matches (nvcc version, flags, source, headers) instead of spending
# ~3 minutes of device time in nvcc. Without .devobj/ it does nothing.
# Refresh .devobj/ whenever a .cu file OR a header it includes changes (csrc/quant.h counts: the 2026-12-05 K-scale
# change left cuda_backend.cu.o and qmatmul.cu.o stale and the device spent 7.5 minutes of a 10-minute call in nvcc):
#   FASTLOAD_CUDA_ARCHS=90 python3 setup.py -q build_ext -b /tmp/devbuild/lib -t /tmp/devbuild/tmp   (~7 min here)
#   cp /tmp/devbuild/tmp/cuda/*.o /tmp/devbuild/tmp/cuda/*.sha .devobj/
if [ -d .devobj ] && ls .devobj/*.o > /dev/null 2>&1; then
    _t=$(python3 -c "import sysconfig, sys; print('build/temp.%s-cpython-%d%d' % (sysconfig.get_platform(), *sys.version_info[:2]))")
    mkdir -p "$_t/cuda" && cp .devobj/*.o .devobj/*.sha "$_t/cuda/" && echo "use_objs: $(ls .devobj/*.o | wc -l) prebuilt CUDA objects -> $_t/cuda"
fi
