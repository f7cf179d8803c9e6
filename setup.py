"""Build of fastload's C core (always) and CUDA part (when nvcc is found).

Environment:
  FASTLOAD_CUDA=auto|0|1     auto (default): build the CUDA part if nvcc is on PATH or in
                             $CUDA_HOME/bin; 1: require it; 0: CPU only.
  FASTLOAD_CUDA_ARCHS="80;90"  SM architectures to build (PTX of the last is embedded too, so newer
                             GPUs JIT-compile it). Default: the GPUs nvidia-smi sees on this machine (the
                             package is built where it runs, like -march=native), else 80 (SASS for sm_80/86/89,
                             PTX JIT-compiled on newer GPUs). One architecture keeps the build short: the
                             quantised kernels (csrc/cuda/qmatmul.cu) are many template instances, and five
                             architectures took over 12 minutes on 2 cores.
  FASTLOAD_NVCC_JOBS=N       nvcc processes run side by side (default: one per core).
  FASTLOAD_BUILD_JOBS=N      C files compiled side by side (default: one per core; 1: distutils' serial compile).
  FASTLOAD_CUDA_REBUILD=1    compile every .cu file again (default: an object whose recorded hash of nvcc's
                             version, flags, source and csrc/ headers still matches is reused).
  FASTLOAD_NATIVE=1|0        1 (default): -march=native for the CPU kernels (the package is built
                             on the machine that runs it, as llama.cpp's GGML_NATIVE); 0: portable.
  FASTLOAD_DEBUG=1           -O0 -g, for gdb / sanitizers.
  FASTLOAD_SANITIZE=address,undefined  (any -fsanitize= list the C compiler accepts) adds
                             -fsanitize=<list> -fno-omit-frame-pointer -fno-sanitize-recover=undefined
                             -g -O1 to compiling and linking the C core, and builds CPU-only (the CUDA
                             part is checked with compute-sanitizer instead). The module then needs the
                             sanitizer runtimes preloaded into python: tools/sanitize_tests.sh does that.
"""
import glob
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCHS = "80"


def local_archs():
    """Compute capabilities of the GPUs nvidia-smi sees ("90;80"), or None."""
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    caps = sorted({c.strip().replace(".", "") for c in r.stdout.split() if c.strip().replace(".", "").isdigit()})
    return ";".join(caps) if r.returncode == 0 and caps else None


def env(name, default):
    return os.environ.get(name, default).strip()


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc:
        return nvcc
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return os.path.join(root, "bin", "nvcc")
    return None


def compiler_accepts(cc, flags):
    """True if the C compiler accepts `flags` on an empty program (OpenMP, -march=native)."""
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "t.c")
        with open(src, "w") as f:
            f.write("int main(void){return 0;}\n")
        try:
            r = subprocess.run([cc, *flags, src, "-o", os.path.join(d, "t")], capture_output=True)
        except OSError:
            return False
        return r.returncode == 0


def parallel_compile(compiler, jobs):
    """The C compiler's compile() with its sources side by side, `jobs` at a time, largest first (distutils
    compiles one after another: on 2 cores the C core took ~80 s, ~2 min sanitized, one file over half of it).
    Only where distutils' private steps are there; otherwise its own serial compile stays."""
    if jobs <= 1 or not all(hasattr(compiler, a) for a in ("_setup_compile", "_get_cc_args", "_compile")):
        return
    from concurrent.futures import ThreadPoolExecutor

    def compile(sources, output_dir=None, macros=None, include_dirs=None, debug=0, extra_preargs=None,
                extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = compiler._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = compiler._get_cc_args(pp_opts, debug, extra_preargs)
        todo = sorted((o for o in objects if o in build), key=lambda o: -os.path.getsize(build[o][0]))
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            for f in [pool.submit(compiler._compile, o, build[o][0], build[o][1], cc_args, extra_postargs, pp_opts)
                      for o in todo]:
                f.result()  # the first failure raises, as the serial compile does
        return objects

    compiler.compile = compile


# The CPU features a -march=native build may use, by the compiler's macro -> their name in /proc/cpuinfo (flags on
# x86, Features on ARM). Only names the kernel has reported for years: an unknown or renamed one would refuse the
# import on the very machine that built it.
CPU_FEATURE_MACROS = {
    "__SSSE3__": "ssse3", "__SSE4_1__": "sse4_1", "__SSE4_2__": "sse4_2", "__POPCNT__": "popcnt", "__MOVBE__": "movbe",
    "__LZCNT__": "abm", "__BMI__": "bmi1", "__BMI2__": "bmi2", "__AVX__": "avx", "__AVX2__": "avx2", "__FMA__": "fma",
    "__F16C__": "f16c", "__AVX512F__": "avx512f", "__AVX512VL__": "avx512vl", "__AVX512BW__": "avx512bw",
    "__AVX512DQ__": "avx512dq", "__AVX512CD__": "avx512cd", "__AVX512VNNI__": "avx512_vnni", "__AVXVNNI__": "avx_vnni",
    "__AVX512BF16__": "avx512_bf16", "__AVX512VBMI__": "avx512vbmi", "__AVX512IFMA__": "avx512ifma",
    "__AVX512VBMI2__": "avx512_vbmi2", "__AVX512BITALG__": "avx512_bitalg", "__AVX512VPOPCNTDQ__": "avx512_vpopcntdq",
    "__AVX512FP16__": "avx512_fp16",
    "__ARM_FEATURE_DOTPROD": "asimddp", "__ARM_FEATURE_SVE": "sve", "__ARM_FEATURE_SVE2": "sve2",
    "__ARM_FEATURE_MATMUL_INT8": "i8mm", "__ARM_FEATURE_BF16_VECTOR_ARITHMETIC": "bf16",
    "__ARM_FEATURE_FP16_VECTOR_ARITHMETIC": "asimdhp",
}


def write_cpu_record(cc, cflags, pkg_dir):
    """fastload/_build_cpu.py beside the module: the CPU features its C code was compiled to use (the compiler's
    predefined macros under the build's flags), so that `import fastload` on a CPU without them is an ImportError
    that says so (fastload/_cpucheck.py) instead of the process dying of an illegal instruction in the first kernel:
    a -march=native wheel or venv copied to an older machine (a Docker image, a cluster's shared venv)."""
    flags = [f for f in cflags if f.startswith("-m")]  # -march=native, -mcpu=, -mavx2, ...: what picks the ISA
    try:
        r = subprocess.run([cc, *flags, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
        macros = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("#define ")}
    except (OSError, IndexError):
        macros = None
    os.makedirs(pkg_dir, exist_ok=True)
    with open(os.path.join(pkg_dir, "_build_cpu.py"), "w") as f:
        f.write("# Written by setup.py when the C core was built: the CPU features its code may use (fastload/_cpucheck.py).\n")
        f.write(f"MACHINE = {platform.machine()!r}\n")
        f.write(f"FLAGS = {' '.join(flags)!r}\n")
        feats = sorted(v for k, v in CPU_FEATURE_MACROS.items() if macros and k in macros)
        f.write(f"FEATURES = {tuple(feats)!r}\n" if macros is not None else "FEATURES = None  # the compiler was not asked\n")


class BuildExt(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        parallel_compile(self.compiler, int(env("FASTLOAD_BUILD_JOBS", str(os.cpu_count() or 1)) or 1))
        cc = self.compiler.compiler_so[0]
        cflags = ["-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
                  "-fvisibility=hidden"]
        sanitize = env("FASTLOAD_SANITIZE", "")
        if env("FASTLOAD_DEBUG", "0") == "1":
            cflags += ["-O0", "-g"]
        elif sanitize:
            cflags += ["-O1", "-g"]  # fast enough for the whole test suite, exact enough for the reports
        else:
            cflags += ["-O3"]
        if sanitize:
            san = ["-fsanitize=" + sanitize, "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
            if not compiler_accepts(cc, san):
                raise RuntimeError(f"FASTLOAD_SANITIZE={sanitize}: {cc} does not accept {' '.join(san)} "
                                   "(or lacks the sanitizer runtimes)")
            cflags += san
            ext.extra_link_args += san
        if env("FASTLOAD_NATIVE", "1") == "1" and compiler_accepts(cc, ["-march=native"]):
            cflags.append("-march=native")
        # GCC keeps a loop with a float compare-and-select or floorf scalar unless told that floating point never traps
        # (the exp polynomials of the CPU attention's online softmax and of the logprobs, csrc/sampling.c: scalar
        # before, 5-8x slower there). No result changes: it allows no reassociation or contraction, only transforms
        # that could change which floating-point exception flags get raised, which nothing here reads.
        if compiler_accepts(cc, ["-fno-trapping-math"]):
            cflags.append("-fno-trapping-math")
        if compiler_accepts(cc, ["-fopenmp"]):
            cflags.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        else:
            print("fastload: the C compiler has no OpenMP; the CPU backend will use one core", file=sys.stderr)
        ext.extra_compile_args = cflags

        mode = env("FASTLOAD_CUDA", "auto").lower()
        if sanitize:
            if mode == "1":
                raise RuntimeError("FASTLOAD_SANITIZE builds the C core only; it cannot be combined with FASTLOAD_CUDA=1 "
                                   "(check the CUDA part with compute-sanitizer on a normal build)")
            mode = "0"
        nvcc = find_nvcc() if mode != "0" else None
        if mode == "1" and not nvcc:
            raise RuntimeError("FASTLOAD_CUDA=1 but nvcc was not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        if nvcc:
            self.build_cuda(ext, nvcc)
        else:
            ext.sources.append("csrc/cuda/cuda_stub.c")
            print("fastload: building CPU-only (no nvcc, FASTLOAD_CUDA=0 or FASTLOAD_SANITIZE)", file=sys.stderr)
        # build_ext relinks only when a source or a `depends` file is newer than the module: a change of settings
        # (FASTLOAD_NATIVE, FASTLOAD_DEBUG, CUDA on or off, ...) kept the old module without a word. The settings are
        # recorded beside the objects; other settings than last time rebuild everything.
        import hashlib
        key = hashlib.sha256(repr((sorted(ext.sources), ext.extra_compile_args, ext.extra_link_args, ext.extra_objects,
                                   ext.define_macros, ext.libraries, sys.version)).encode()).hexdigest()
        stamp = os.path.join(self.build_temp, "fastload-settings.sha")
        try:
            with open(stamp) as f:
                same = f.read().strip() == key
        except OSError:
            same = False
        if not same:
            self.force = True
        super().build_extensions()
        write_cpu_record(cc, cflags, os.path.dirname(self.get_ext_fullpath(ext.name)))
        os.makedirs(self.build_temp, exist_ok=True)
        with open(stamp, "w") as f:
            f.write(key + "\n")

    def copy_extensions_to_source(self):
        """--inplace and editable installs: the module is copied into the source tree, and its CPU record with it"""
        super().copy_extensions_to_source()
        built = os.path.join(self.build_lib, "fastload", "_build_cpu.py")
        if os.path.isfile(built):
            pkg = self.get_finalized_command("build_py").get_package_dir("fastload")
            shutil.copyfile(built, os.path.join(pkg, "_build_cpu.py"))

    def build_cuda(self, ext, nvcc):
        want = env("FASTLOAD_CUDA_ARCHS", "") or local_archs() or DEFAULT_ARCHS
        archs = [a.strip() for a in want.replace(",", ";").split(";") if a.strip()]
        bad = [a for a in archs if not a[:1].isdigit() or not a.rstrip("af").isdigit()]
        if bad or not archs:
            raise SystemExit(f"fastload: FASTLOAD_CUDA_ARCHS={want!r}: expected compute capabilities without the dot, "
                             f"separated by ';' (e.g. \"80;90\" or \"90a\"); not {', '.join(bad) or 'an empty list'}")
        print(f"fastload: CUDA architectures {';'.join(archs)}", file=sys.stderr)
        gencode = []
        for a in archs:
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
        cuda_root = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        objdir = os.path.join(self.build_temp, "cuda")
        os.makedirs(objdir, exist_ok=True)
        cmds, objs = [], []
        # An object is reused when its .sha file matches the hash of the nvcc command, the source and every
        # header it includes from csrc/, directly or not (content, not times: objects built on another machine
        # for the same nvcc and flags, copied into build_temp/cuda, are reused too). FASTLOAD_CUDA_REBUILD=1
        # ignores them. Only the headers a .cu file reaches count, so a change to a host-only header (the
        # engine's, the Python layer's) does not recompile the CUDA objects.
        import hashlib
        import re
        nvcc_id = hashlib.sha256(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode()).digest()
        inc_re = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)

        def local_headers(path, seen):
            with open(path, encoding="utf-8", errors="replace") as f:
                text = f.read()
            for name in inc_re.findall(text):
                for base in (os.path.dirname(path), "csrc"):
                    h = os.path.normpath(os.path.join(base, name))
                    if os.path.isfile(h):
                        if h not in seen:
                            seen.add(h)
                            local_headers(h, seen)
                        break
            return seen

        for src in sorted(glob.glob("csrc/cuda/*.cu")):
            obj = os.path.join(objdir, os.path.basename(src) + ".o")
            # FL_CUDA_ARCHS_TOKEN: the architectures as one preprocessor token (90_80: nvcc splits -D values at
            # commas, and quotes do not survive its passes), for fastload.cuda.get_arch_list() and the check at
            # device creation that this build has a kernel image the GPU can run (cuda_device.cu).
            cmd = [nvcc, "-c", src, "-o", obj, "-O3", "-std=c++17", "-Icsrc", "--use_fast_math",
                   "-Xcompiler", "-fPIC,-fvisibility=hidden", f"-DFL_CUDA_ARCHS_TOKEN={'_'.join(archs)}", *gencode]
            hdr = hashlib.sha256(nvcc_id)
            hdrs = sorted(local_headers(src, set()))
            for h in hdrs:
                with open(h, "rb") as f:
                    hdr.update(h.encode() + b"\0" + f.read())
            with open(src, "rb") as f:
                flags = " ".join(a for a in cmd[1:] if a != obj)  # not the object's path: build_temp differs per Python
                key = hashlib.sha256(flags.encode() + hdr.digest() + f.read()).hexdigest()
            objs.append(obj)
            try:
                with open(obj + ".sha") as f:
                    fresh = f.read().strip() == key and os.path.exists(obj) and env("FASTLOAD_CUDA_REBUILD", "0") != "1"
            except OSError:
                fresh = False
            if fresh:
                print(f"fastload: {obj} is up to date", file=sys.stderr)
            else:
                weight = sum(os.path.getsize(h) for h in hdrs) + os.path.getsize(src)
                cmds.append((weight, cmd, obj, key))
        # nvcc compiles one file per process: run them side by side (one per core, FASTLOAD_NVCC_JOBS to choose).
        jobs = int(env("FASTLOAD_NVCC_JOBS", str(os.cpu_count() or 1)) or 1)

        # Largest first (bytes of the source and the csrc/ headers it includes: a rough measure of nvcc's time), so the
        # long files do not start last on a 2-core machine and decide the wall time alone.
        cmds.sort(key=lambda job: -job[0])

        def compile_one(job):
            _, cmd, obj, key = job
            print(" ".join(cmd), file=sys.stderr)
            if os.path.exists(obj + ".sha"):
                os.remove(obj + ".sha")
            subprocess.check_call(cmd)
            with open(obj + ".sha", "w") as f:
                f.write(key + "\n")

        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            list(pool.map(compile_one, cmds))
        ext.extra_objects += objs
        ext.depends += objs  # a CUDA object compiled again relinks the module
        ext.define_macros.append(("FL_WITH_CUDA", "1"))
        for libdir in ("lib64", "lib", os.path.join("targets", "x86_64-linux", "lib")):
            p = os.path.join(cuda_root, libdir)
            if os.path.isdir(p):
                ext.library_dirs.append(p)
                ext.runtime_library_dirs.append(p)
        ext.libraries += ["cudart", "cublas", "cublasLt", "stdc++"]


sources = sorted(glob.glob("csrc/*.c") + glob.glob("csrc/cpu/*.c") + glob.glob("csrc/py/*.c"))
# every header: a change to one rebuilds the C core (build_ext compared only the .c files' times with the module's)
headers = sorted(glob.glob("csrc/**/*.h", recursive=True))
setup(
    ext_modules=[Extension("fastload._C", sources=sources, depends=headers, include_dirs=["csrc", numpy.get_include()])],
    cmdclass={"build_ext": BuildExt},
)
