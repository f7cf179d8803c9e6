#!/bin/bash
# A fastload package built for GPUs other than the device's, for the check at device creation
# (tests/test_cuda_api.py::test_a_build_for_other_gpus_is_a_clear_error_at_load).
#   here:    bash dev/cuda/foreign_arch.sh pack [ARCH]   builds the whole package with FASTLOAD_CUDA_ARCHS=ARCH (default
#            100: neither its SASS nor its PTX runs on sm_90) and FASTLOAD_NATIVE=0 into /tmp/fl-foreign-ARCH (~7 min on
#            2 cores; reuses its objects), then packs fastload/ + that _C module into .foreign/fastload.tar.xz (git-ignored).
#            The module is for one Python: PYTHON=... names the device's (3.12 there, e.g. PYTHON=~/.pyenv/versions/3.12.1/bin/python3.12
#            with numpy and setuptools installed); CUDA objects are shared between Pythons, C objects are not
#   device:  carry [".devobj", ".foreign"]; FASTLOAD_FOREIGN_BUILD=$(bash dev/cuda/foreign_arch.sh unpack) pytest ...
set -eu
cd "$(dirname "$0")/../.."
case "${1:-}" in
pack)
    arch=${2:-100}; b=/tmp/fl-foreign-$arch
    FASTLOAD_CUDA=1 FASTLOAD_CUDA_ARCHS=$arch FASTLOAD_NATIVE=0 "${PYTHON:-python3}" setup.py -q build_ext -b "$b/lib" -t "$b/tmp" >&2
    rm -rf "$b/pkg" && mkdir -p "$b/pkg/fastload"
    cp fastload/*.py "$b/pkg/fastload/"
    sfx=$("${PYTHON:-python3}" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
    cp "$b/lib/fastload/_C$sfx" "$b"/lib/fastload/_build_cpu.py "$b/pkg/fastload/"
    mkdir -p .foreign && tar -C "$b/pkg" -cJf .foreign/fastload.tar.xz fastload
    ls -l .foreign/fastload.tar.xz >&2 ;;
unpack)
    d=/tmp/fl-foreign && rm -rf "$d" && mkdir -p "$d" && tar -C "$d" -xJf .foreign/fastload.tar.xz && echo "$d" ;;
*)
    echo "usage: $0 pack [ARCH] | unpack" >&2; exit 2 ;;
esac
