#!/bin/bash
# Source before a device build: CUDA objects built on the dev machine for this GPU (FASTLOAD_CUDA_ARCHS=90 build
# there, objects and their .sha copied to .devobj/ and carried) go where this Python's build_ext looks, so
# setup.py reuses those whose hash still matches (nvcc version, flags, source, headers) instead of spending
# ~3 minutes of device time in nvcc. Without .devobj/ it does nothing.
if [ -d .devobj ] && ls .devobj/*.o > /dev/null 2>&1; then
    _t=$(python3 -c "import sysconfig, sys; print('build/temp.%s-cpython-%d%d' % (sysconfig.get_platform(), *sys.version_info[:2]))")
    mkdir -p "$_t/cuda" && cp .devobj/*.o .devobj/*.sha "$_t/cuda/" && echo "use_objs: $(ls .devobj/*.o | wc -l) prebuilt CUDA objects -> $_t/cuda"
fi
