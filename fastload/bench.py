"""`python -m fastload bench {speed,load,concurrency,perplexity}`: the field reports' benchmark tables, for fastload.

Each subcommand runs on the demo model when no model is named (--model_id_or_path / --model, else FASTLOAD_MODEL,
else the demo GGUF), prints a table and writes `<name>_<model>_<UTC time>.csv` and `.json` into --outputs_dir
(Qwen's spelling; --outputs-dir too). The JSON holds the rows and the environment: device and its name, date, host,
versions (fastload, numpy, python, and torch / transformers when installed, read from their metadata without
importing them), the git commit of the fastload checkout when there is one. Both files are written under temporary
names and renamed at the end: a failed or interrupted run leaves nothing half written.

  speed        Qwen's speed_benchmark_transformers.py (QwenLM/Qwen2.5 examples/speed-benchmark): a prompt of exactly
               N tokens (N = each --context_length), then exactly --generate_length new tokens (min_length =
               N + generate_length, max_new_tokens = generate_length, the model's own generation config otherwise),
               seed 1024, batch 1; tokens/s = generate_length / seconds of generate(); Qwen's CSV columns first
               (model_id_or_path, batch_size, context_length_per_experiment, generate_length_per_experiment,
               use_flash_attn, comment, tokens_per_second, max_gpu_memory_cost_gb), then fastload's. Differences
               from Qwen's script: all context lengths in one run and one file (its peak memory is reset before
               each length, so each row has its own peak as Qwen's one-length-per-process runs had); the prompt is
               built from token ids (one token repeated: '我' when it is one token, as Qwen's, else ' the'), so any
               tokenizer gets exactly N tokens; --gpus sets CUDA_VISIBLE_DEVICES as Qwen's does, but fastload
               loads onto one device; --peer transformers measures transformers in the same process.
  load         from_pretrained time, warm (page cache) and cold (the files' pages evicted first, where the OS
               lets this process do it: posix_fadvise(DONTNEED) checked with mincore, else
               /proc/sys/vm/drop_caches; said in the table when neither works), against the raw read rate of the
               same files (parallel 16 MiB preads, no parsing), on a CUDA device the PCIe ceiling (a row "PCIe
               host-to-device", cache "any": pinned host-to-device copy rate, _C.cuda_h2d_bandwidth; a note says
               why when it is not measured) and transformers with --peer transformers.
  concurrency  the ChatGLM2 field report: five queries (or --queries FILE) answered with model.chat in a for-loop,
               then through ThreadPoolExecutor(max_workers) (several --max_workers: one pool each; --repeat N:
               the median of N interleaved runs); wall time, tokens/s, whether the answers equal the
               loop's, current and peak memory (fastload.cuda's memory_allocated / max_memory_allocated on a GPU,
               the process's RSS and peak RSS on the CPU).
  perplexity   every quantisation mode (fp16 reference, int8, int4, nf4 at load, the GGUF as shipped) scored with
               fastload.evaluate.perplexity on one text: perplexity, memory, scoring tokens/s and decode tokens/s
               in one table (benchmarks/quant_quality.py is built on the same functions).

Real-scale commands (a GPU machine; Qwen2.5-7B-Instruct; see README "Benchmarks from the command line"):
  python -m fastload bench speed --model_id_or_path Qwen/Qwen2.5-7B-Instruct \\
      --context_length 1 6144 14336 30720 --generate_length 2048 --gpus 0 --peer transformers \\
      --outputs_dir outputs/speed
  python -m fastload bench load --model Qwen/Qwen2.5-7B-Instruct --repeat 3 --peer transformers
  python -m fastload bench concurrency --model THUDM/chatglm2-6b --max_new_tokens 256   (the field report's model)
  python -m fastload bench perplexity --model Qwen/Qwen2.5-7B-Instruct --context 2048
"""
from __future__ import annotations

import argparse
import csv
import datetime
import gc
import importlib.util
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

# The ChatGLM2 field report's five queries (English, as tests/compat/test_compat_chatglm2_concurrency.py).
QUERIES = ["What is 2+3?", "What is the capital of France?", "What is 10 minus 4?", "What colour is the sky?",
           "Say hello."]
SEED = 1024           # Qwen's speed benchmark
BATCH_SIZE = 1        # Qwen's speed benchmark
DUMMY_INPUTS = ("我", " the", "a")  # Qwen's first; the first that is one token is repeated
PPL_MODES = ("fp16", "int8", "int4", "nf4", "gguf")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TEXT = os.path.join(os.path.dirname(HERE), "benchmarks", "data", "devils_dictionary.txt")
GiB = 1024 ** 3
MiB = 1024 ** 2


class BenchError(ValueError):
    """A bad argument or a condition the benchmark cannot run under; printed as `error: ...`, exit status 2."""


# ---------------------------------------------------------------------------------------------- arguments
def _context_lengths(values):
    """--context_length 1 6144 14336 or 1,6144,14336 -> [1, 6144, 14336]."""
    out = []
    for v in values:
        for part in str(v).replace(",", " ").split():
            try:
                n = int(part)
            except ValueError:
                raise BenchError(f"--context_length: {part!r} is not a whole number of tokens "
                                 "(e.g. --context_length 1 6144 14336 30720)") from None
            if n < 1:
                raise BenchError(f"--context_length: {n} must be at least 1 token")
            out.append(n)
    if not out:
        raise BenchError("--context_length: give at least one length")
    return out


def _positive(name, v, lo=1):
    if v is None or v < lo:
        raise BenchError(f"{name} must be at least {lo}, got {v}")
    return v


def _threads(v):
    """--threads: 1 .. config.max_cpu_threads() (more would ask OpenMP for threads it may fail to create)."""
    from .config import max_cpu_threads
    _positive("--threads", v)
    if v > max_cpu_threads():
        raise BenchError(f"--threads must be at most {max_cpu_threads()} (4x this machine's CPUs, at least 64), got {v}")
    return v


def _common(sp, model_help="directory, .gguf file or hub id (default: FASTLOAD_MODEL or the demo model)"):
    sp.add_argument("--model_id_or_path", "--model", dest="model", default=None, help=model_help)
    from .__main__ import cli_device, cli_dtype
    sp.add_argument("--device", default=None, type=cli_device,
                    help="cpu, cuda, cuda:N or auto (default: FASTLOAD_DEVICE or auto)")
    sp.add_argument("--dtype", default=None, type=cli_dtype,
                    help="auto, float16, bfloat16, float32 (default: FASTLOAD_DTYPE or auto)")
    sp.add_argument("--threads", type=int, default=None, help="CPU threads (default: FASTLOAD_THREADS or all cores)")
    sp.add_argument("--outputs_dir", "--outputs-dir", dest="outputs_dir", default=os.path.join("outputs", "fastload"),
                    help="where the CSV and JSON go (default: outputs/fastload, as Qwen's outputs/transformers)")


def _quant_arg(sp):
    sp.add_argument("--quant", default=None, choices=["none", "int8", "int4", "nf4"],
                    help="quantise the linear layers at load (default: FASTLOAD_QUANT, else none)")


def _peer_arg(sp):
    sp.add_argument("--peer", action="append", default=[], choices=["transformers"],
                    help="also measure transformers in the same process (needs torch and transformers installed)")


def add_parser(sub):
    """Register `bench` and its subcommands on the subparsers of `python -m fastload`."""
    bp = sub.add_parser("bench", help="benchmarks: speed, load, concurrency, perplexity", description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    bsub = bp.add_subparsers(dest="bench_cmd", required=True)

    sp = bsub.add_parser("speed", help="tokens/s and device memory per context length (Qwen's speed benchmark)")
    _common(sp)
    _quant_arg(sp)
    _peer_arg(sp)
    sp.add_argument("--context_length", "--context-length", dest="context_length", nargs="+", default=["1"],
                    help="prompt lengths in tokens, several allowed (default 1; Qwen's: 1 6144 14336 30720 63488 "
                         "129024)")
    sp.add_argument("--generate_length", "--generate-length", dest="generate_length", type=int, default=2048,
                    help="new tokens per experiment (default 2048, Qwen's GENERATE_LENGTH_PER_EXPERIMENT)")
    sp.add_argument("--gpus", default=None, help="sets CUDA_VISIBLE_DEVICES, as Qwen's (e.g. 0 or 0,1); fastload "
                                                 "loads onto one device")
    sp.add_argument("--comment", default="default", help="free text for the CSV's comment column (Qwen's COMMENT)")
    sp.add_argument("--rope_scaling", "--rope-scaling", dest="rope_scaling", default=None, type=_json_object,
                    help="a JSON object given to from_pretrained(rope_scaling=...) of fastload and of the peer, as "
                         "Qwen's instructions add it to config.json for contexts past 32768, e.g. "
                         "'{\"type\": \"yarn\", \"factor\": 4.0, \"original_max_position_embeddings\": 32768}'")
    sp.set_defaults(fn_bench=cmd_speed)

    sp = bsub.add_parser("load", help="load time, warm and cold, against the raw read rate of the files")
    _common(sp)
    _quant_arg(sp)
    _peer_arg(sp)
    sp.add_argument("--repeat", type=int, default=3, help="loads per kind (median reported; default 3)")
    sp.add_argument("--no-cold", "--no_cold", dest="no_cold", action="store_true",
                    help="warm loads only (do not evict the files from the page cache)")
    sp.add_argument("--read_threads", "--read-threads", dest="read_threads", type=int, default=None,
                    help="threads of the raw read (default: min(8, cores))")
    sp.set_defaults(fn_bench=cmd_load)

    sp = bsub.add_parser("concurrency", help="model.chat in a for-loop against a ThreadPoolExecutor")
    _common(sp)
    _quant_arg(sp)
    sp.add_argument("--queries", default=None,
                    help="a UTF-8 file, one query per line (default: the ChatGLM2 report's five queries)")
    sp.add_argument("--max_new_tokens", "--max-new-tokens", dest="max_new_tokens", type=int, default=64)
    sp.add_argument("--max_workers", "--max-workers", "--workers", dest="max_workers", type=int, nargs="+",
                    default=None, help="threads of the pool; several values (1 2 4 10) give one pool row each "
                                       "(default: one per query, as the report's max_workers=5)")
    sp.add_argument("--repeat", type=int, default=1, help="runs of each mode, interleaved so that a change in the "
                                                         "machine's load hits every mode alike; the median wall "
                                                         "time is reported (default 1)")
    sp.set_defaults(fn_bench=cmd_concurrency)

    sp = bsub.add_parser("perplexity", help="perplexity, memory and tokens/s of every quantisation mode")
    _common(sp)
    sp.add_argument("--file", default=None, help="UTF-8 text to score (default: benchmarks/data/devils_dictionary.txt "
                                                 "of a fastload checkout)")
    sp.add_argument("--modes", default=None, help="comma-separated of fp16,int8,int4,nf4,gguf; SCHEME:GROUP (int4:32) "
                                                  "sets a group size (default: all; gguf only for a .gguf model)")
    sp.add_argument("--context", type=int, default=None, help="window length in tokens (default: the model's "
                                                              "max_position_embeddings)")
    sp.add_argument("--max_chars", "--max-chars", dest="max_chars", type=int, default=None,
                    help="score only the first N characters")
    sp.add_argument("--generate_length", "--generate-length", dest="generate_length", type=int, default=32,
                    help="new tokens of the decode-speed measurement per mode (default 32; 0 skips it)")
    sp.set_defaults(fn_bench=cmd_perplexity)
    bp.set_defaults(fn=run)
    return bp


def run(args):
    """Entry point of `python -m fastload bench SUB`: a BenchError or a bad file gives `error: ...` and exit 2."""
    from . import CheckpointError
    try:
        args.fn_bench(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        raise SystemExit(130)
    except (BenchError, ValueError, OSError, NotImplementedError, CheckpointError) as e:
        from .__main__ import prog_name
        print(f"{prog_name()} bench {args.bench_cmd}: error: {e}", file=sys.stderr)
        raise SystemExit(2)


# ---------------------------------------------------------------------------------------------- environment
def _git_commit():
    """(commit, dirty) of the fastload checkout this module runs from, or (None, None) outside one. FASTLOAD_COMMIT,
    when set, is the commit (dirty unknown): an installed copy (pip install .) has no .git, and a copied tree (a GPU
    machine's) may carry a stale one."""
    if os.environ.get("FASTLOAD_COMMIT"):
        return os.environ["FASTLOAD_COMMIT"].strip(), None
    root = os.path.dirname(HERE)
    if not os.path.exists(os.path.join(root, ".git")):
        return None, None
    try:
        c = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if c.returncode != 0:
        return None, None
    return c.stdout.strip(), bool(d.stdout.strip()) if d.returncode == 0 else None


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist):
    try:
        from importlib import metadata
        return metadata.version(dist)
    except Exception:  # noqa: BLE001 - not installed (or broken metadata): no version
        return None


def environment(device=None) -> dict:
    """Where and with what a benchmark ran (stored in every JSON)."""
    import fastload
    from . import cuda
    b = fastload._C.build_info()
    commit, dirty = _git_commit()
    dev = str(device) if device is not None else None
    if dev and dev.startswith("cuda") and cuda.is_available():
        name = cuda.get_device_name(dev)
    else:
        name = _cpu_name()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "host": platform.node(), "platform": platform.platform(), "device": dev, "device_name": name,
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "versions": {"fastload": fastload.__version__, "python": platform.python_version(),
                         "numpy": np.__version__, "torch": _version("torch"), "transformers": _version("transformers")},
            "build": {k: b.get(k) for k in ("cuda_compiled", "cuda_devices", "simd", "openmp", "compiler")},
            "git_commit": commit, "git_dirty": dirty}


# ---------------------------------------------------------------------------------------------- outputs
def json_safe(v):
    """v with every non-finite float as None: strict JSON has no Infinity / NaN (a one-word text's word perplexity
    overflows to inf), and json.dumps would write them as bare tokens other parsers refuse."""
    if isinstance(v, float):
        return v if v == v and v not in (float("inf"), float("-inf")) else None
    if isinstance(v, dict):
        return {k: json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [json_safe(x) for x in v]
    return v


class Outputs:
    """The outputs directory: checked before any work (so that a bad one fails in a second, not after the run),
    created at the end, each file written to a temporary name and renamed once all are written."""

    def __init__(self, path, option="--outputs_dir"):
        if not path:
            raise BenchError(f"{option}: empty path")
        self.path, self.option = os.path.abspath(path), option
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise BenchError(f"{option} {path}: exists and is not a directory")
        while not os.path.exists(p):  # the nearest existing ancestor must be a writable directory
            parent = os.path.dirname(p)
            if parent == p:
                break
            p = parent
        if not os.path.isdir(p):
            raise BenchError(f"{option} {path}: cannot be created: {p} is a file, not a directory")
        if not os.access(p, os.W_OK | os.X_OK):
            raise BenchError(f"{option} {path}: not writable ({p} does not allow this user to create files)")

    def write(self, stem, rows, columns, meta):
        """Write stem.csv (rows, columns in this order) and stem.json (meta + rows); return their paths."""
        made = []
        p = self.path
        while not os.path.isdir(p):
            made.append(p)
            p = os.path.dirname(p)
        tmps = []
        try:
            try:
                os.makedirs(self.path, exist_ok=True)
            except OSError as e:
                raise BenchError(f"{self.option} {self.path}: cannot be created ({e.strerror})") from None
            buf = io.StringIO()
            w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
            w.writeheader()
            w.writerows(rows)
            doc = dict(meta)
            doc["columns"] = list(columns)
            doc["rows"] = rows
            text = {"csv": buf.getvalue(), "json": json.dumps(json_safe(doc), indent=1, default=str,
                                                              allow_nan=False) + "\n"}
            final = {}
            for ext in ("csv", "json"):
                final[ext] = os.path.join(self.path, f"{stem}.{ext}")
                tmp = os.path.join(self.path, f".{stem}.{ext}.{os.getpid()}.tmp")
                tmps.append(tmp)
                try:
                    with open(tmp, "w", encoding="utf-8", newline="") as fh:
                        fh.write(text[ext])
                except OSError as e:
                    raise BenchError(f"{self.option} {self.path}: cannot write {os.path.basename(final[ext])} "
                                     f"({e.strerror})") from None
            renamed = []
            try:
                for ext, tmp in zip(("csv", "json"), tmps):
                    os.replace(tmp, final[ext])
                    renamed.append(final[ext])
            except OSError as e:
                for f in renamed:  # a CSV without its JSON is a half-written result: neither stays
                    try:
                        os.unlink(f)
                    except OSError:
                        pass
                raise BenchError(f"{self.option} {self.path}: cannot rename the results into place "
                                 f"({e.strerror or e})") from None
            tmps = []
            return final["csv"], final["json"]
        finally:
            failed = bool(tmps)
            for tmp in tmps:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass
            if failed:
                for d in made:  # directories this call created, innermost first, only while empty
                    try:
                        os.rmdir(d)
                    except OSError:
                        break


def _stem(kind, ref):
    """speed_<model>_<UTC time>: the model as Qwen's file names have it (directory name, or org__name)."""
    ref = str(ref)
    name = os.path.basename(os.path.normpath(ref)) if os.path.exists(ref) else ref.replace("/", "__")
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in name) or "model"
    # microseconds: two runs in one second must not write over each other
    return f"{kind}_{name}_{datetime.datetime.now(datetime.timezone.utc).strftime('%Y%m%d-%H%M%S-%f')}"


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def print_table(rows, columns, file=None):
    """A plain fixed-width table of the given columns."""
    file = file or sys.stdout
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)), file=file)
    print("  ".join("-" * w for w in widths), file=file)
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)), file=file)


def _finish(out, kind, ref, rows, columns, meta, shown=None):
    print_table(rows, shown or columns)
    csv_path, json_path = out.write(_stem(kind, ref), rows, columns, meta)
    for note in meta.get("notes", []):
        print(f"note: {note}")
    print(f"wrote {csv_path}\nwrote {json_path}")
    return csv_path, json_path


# ---------------------------------------------------------------------------------------------- loading
def model_ref(args):
    from . import config
    from .demo import demo_model_path
    ref = args.model or config.env("FASTLOAD_MODEL") or demo_model_path()
    looks_local = os.path.isabs(ref) or ref.startswith(".") or ref.endswith(".gguf") or ref.count("/") != 1
    if looks_local and not os.path.exists(ref):
        raise BenchError(f"--model_id_or_path {ref}: no such file or directory (a local path, or a hub id "
                         "like org/name)")
    return ref


def _json_object(text):
    """--rope_scaling's argparse type: the text as a dict, or argparse's usage error naming the option."""
    try:
        v = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--rope_scaling {text!r}: not JSON ({e})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"--rope_scaling {text!r}: must be a JSON object, like "
                                         "'{\"type\": \"yarn\", \"factor\": 4.0, "
                                         "\"original_max_position_embeddings\": 32768}'")
    return v


def load_fastload(ref, args, quant=None, dtype=None):
    """(model, wall seconds) of fastload.AutoModelForCausalLM.from_pretrained with the command's settings."""
    import fastload
    kw = {}
    rs = getattr(args, "rope_scaling", None)  # bench speed's --rope_scaling, a dict
    if rs is not None:
        kw["rope_scaling"] = rs
    q = quant if quant is not None else getattr(args, "quant", None)
    if q:
        kw["quantization_config"] = q
    if getattr(args, "threads", None) is not None:
        kw["threads"] = _threads(args.threads)
    t0 = time.perf_counter()
    m = fastload.AutoModelForCausalLM.from_pretrained(ref, device_map=args.device,
                                                     torch_dtype=dtype if dtype is not None else args.dtype, **kw)
    return m, time.perf_counter() - t0


def _pool_for(model, batch, tokens):
    """Size the model's engine KV pool to `batch` sequences of `tokens` (whole pages, one spare each) and return its
    bytes. bench speed calls it per row, so that its memory columns show what that context costs (the default pool is
    a fixed share of free memory, the same for every row)."""
    from . import engine as enginemod
    page = model._engine_handle().opts["kv_page_tokens"]
    pages = batch * (-(-tokens // page) + 1)
    pool = enginemod.kv_bytes_per_token(model) * page * pages
    model.configure_engine(kv_cache_memory=int(pool))
    return pool


def _device_memory(device):
    """Bytes fastload holds on all visible CUDA devices: (now, peak since the last reset), as Qwen sums them."""
    from . import cuda
    if not str(device).startswith("cuda") or not cuda.is_available():
        return None, None
    n = cuda.device_count()
    return (sum(cuda.memory_allocated(i) for i in range(n)), sum(cuda.max_memory_allocated(i) for i in range(n)))


def _reset_peaks(device):
    from . import cuda
    if str(device).startswith("cuda") and cuda.is_available():
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)
    try:  # Linux: writing 5 to clear_refs resets the peak RSS (VmHWM) of this process
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        pass


def process_rss():
    """(RSS, peak RSS) of this process in bytes (peak since the last _reset_peaks where Linux allows it)."""
    now = peak = None
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    now = int(line.split()[1]) * 1024
                elif line.startswith("VmHWM:"):
                    peak = int(line.split()[1]) * 1024
    except OSError:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    return now, peak


def _sync(device):
    from . import cuda
    if str(device).startswith("cuda") and cuda.is_available():
        cuda.synchronize()


def _quant_name(model):
    """What the model holds (not what was asked: a scheme over a GGUF's own blocks or a GPTQ / AWQ checkpoint is set
    aside): the at-load scheme (int8 / int4 / nf4), the checkpoint's method (gptq, awq, gguf), else "none"; a
    transformers peer's quantization_config object by its method."""
    q = getattr(model, "quantization_config", None)
    if q is None:
        return "none"
    if isinstance(q, dict):
        return (q.get("scheme") if q.get("quant_method") == "fastload" else q.get("quant_method")) or str(q)
    if getattr(q, "load_in_8bit", False):
        return "bnb-int8"
    if getattr(q, "load_in_4bit", False):
        return f"bnb-{getattr(q, 'bnb_4bit_quant_type', '4bit')}"
    return str(getattr(q, "quant_method", None) or q)


def _peer_missing(name="transformers"):
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        return (f"--peer {name}: {' and '.join(missing)} not installed in this Python ({sys.executable}); "
                "only fastload was measured (pip install torch transformers to compare)")
    return None


def _hf_source(ref):
    """(path, extra from_pretrained kwargs) for transformers: a .gguf file is its directory plus gguf_file=."""
    if str(ref).endswith(".gguf") and os.path.isfile(ref):
        return os.path.dirname(os.path.abspath(ref)), {"gguf_file": os.path.basename(ref)}
    return ref, {}


def _hf_config_with_rope(transformers, path, rs, extra):
    """transformers' config of `path` with the --rope_scaling block in it. Given as from_pretrained(rope_scaling=...),
    transformers 5 loses it (5.23: KeyError 'rope_type'; 5.24: rope_theta None), so the block goes into the loaded
    config: rope_parameters (transformers 5) keeps the model's rope_theta unless the block names one; rope_scaling
    (transformers 4) as given."""
    cfg = transformers.AutoConfig.from_pretrained(path, **extra)
    rp = getattr(cfg, "rope_parameters", None)
    if isinstance(rp, dict):
        cfg.rope_parameters = {"rope_theta": rp.get("rope_theta", getattr(cfg, "rope_theta", None)), **rs,
                               "rope_type": rs.get("rope_type", rs.get("type", "default"))}
    else:
        cfg.rope_scaling = dict(rs)
    return cfg


def load_transformers(ref, args):
    """(transformers model, tokenizer, wall seconds, torch module); attention as Qwen's (flash_attention_2 when
    flash_attn is installed, else sdpa); device_map auto on a GPU, else cpu."""
    import torch
    import transformers
    threads = getattr(args, "threads", None)
    if threads:  # --threads holds for the peer too (torch took every core while fastload had the ones asked for)
        torch.set_num_threads(int(threads))
    path, extra = _hf_source(ref)
    dt = args.dtype or "auto"
    ver = tuple(int(x) for x in (transformers.__version__.split(".") + ["0", "0"])[:2] if x.isdigit())
    dkey = "dtype" if ver >= (4, 56) else "torch_dtype"  # transformers renamed torch_dtype= to dtype= in 4.56
    kw = {dkey: dt if dt == "auto" else getattr(torch, dt),
          "attn_implementation": "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"}
    if args.device in (None, "auto"):
        if torch.cuda.is_available():
            kw["device_map"] = "auto"  # Qwen's DEVICE_MAP; on the CPU no device_map (transformers' own default)
    elif args.device != "cpu":
        kw["device_map"] = args.device
    rs = getattr(args, "rope_scaling", None)
    if rs is not None:
        kw["config"] = _hf_config_with_rope(transformers, path, rs, extra)
    q = getattr(args, "quant", None)
    if q in ("int8", "int4", "nf4"):  # the same request through bitsandbytes
        kw["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_8bit=q == "int8", load_in_4bit=q != "int8",
            **({"bnb_4bit_quant_type": "nf4" if q == "nf4" else "fp4"} if q != "int8" else {}))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, **kw, **extra).eval()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    tok = transformers.AutoTokenizer.from_pretrained(path, **extra)
    return model, tok, secs, torch, kw["attn_implementation"]


# ---------------------------------------------------------------------------------------------- speed
def dummy_token(tok):
    """(token id, text) of the one-token string repeated into a prompt of N tokens."""
    for s in DUMMY_INPUTS:
        ids = tok(s * 4, add_special_tokens=False)["input_ids"]
        ids = list(np.asarray(ids).reshape(-1))
        if len(ids) == 4 and len(set(ids)) == 1:
            return int(ids[0]), s
    ids = list(np.asarray(tok("a", add_special_tokens=False)["input_ids"]).reshape(-1))
    if not ids:
        raise BenchError("the tokenizer encodes no test string to a token; cannot build a prompt of N tokens")
    return int(ids[0]), "a"


SPEED_COLUMNS = ["model_id_or_path", "batch_size", "context_length_per_experiment", "generate_length_per_experiment",
                 "use_flash_attn", "comment", "tokens_per_second", "max_gpu_memory_cost_gb",
                 "engine", "device", "dtype", "quant", "seconds", "peak_memory_gb", "peak_rss_gb", "kv_pool_gb"]
SPEED_SHOWN = ["engine", "context_length_per_experiment", "generate_length_per_experiment", "tokens_per_second",
               "seconds", "max_gpu_memory_cost_gb", "peak_memory_gb", "kv_pool_gb", "peak_rss_gb"]


def cmd_speed(args):
    lengths = _context_lengths(args.context_length)
    gen = _positive("--generate_length", args.generate_length)
    if args.gpus is not None:
        g = args.gpus.replace(" ", "")
        if g and not all(p.isdigit() for p in g.split(",")):
            raise BenchError(f"--gpus {args.gpus!r}: a comma-separated list of device indices (e.g. 0 or 0,1)")
        os.environ["CUDA_VISIBLE_DEVICES"] = g  # before fastload first asks the driver, as Qwen's script
    out = Outputs(args.outputs_dir)
    ref = model_ref(args)
    import fastload
    tok = fastload.AutoTokenizer.from_pretrained(ref)
    model, load_s = load_fastload(ref, args)
    from .engine import context_length
    limit = context_length(model)
    for n in lengths:
        if limit and n + gen > limit:
            raise BenchError(f"--context_length {n} + --generate_length {gen} = {n + gen} tokens is more than the "
                             f"model's context ({limit}: max_position_embeddings, or YaRN's factor x "
                             "original_max_position_embeddings)")
    tid, dummy = dummy_token(tok)
    device, notes, rows = str(model.device), [], []
    quant = _quant_name(model)
    for n in lengths:
        fastload.set_seed(SEED)
        ids = np.full((BATCH_SIZE, n), tid, dtype=np.int64)
        pool = _pool_for(model, BATCH_SIZE, n + gen)
        _reset_peaks(device)
        _sync(device)
        t0 = time.perf_counter()
        pred = np.asarray(model.generate(ids, attention_mask=np.ones_like(ids), min_length=n + gen,
                                         max_new_tokens=gen))
        _sync(device)
        secs = time.perf_counter() - t0
        if pred.shape[1] != n + gen:
            raise BenchError(f"context_length {n}: generate returned {pred.shape[1] - n} new tokens, not {gen}")
        _, gpu_peak = _device_memory(device)
        ms = model.memory_stats()
        own = ms["allocated"] + ms.get("kv_cache_last", 0)  # weights + workspace + this run's KV cache
        _, rss_peak = process_rss()
        rows.append({"model_id_or_path": str(ref), "batch_size": BATCH_SIZE, "context_length_per_experiment": n,
                     "generate_length_per_experiment": gen, "use_flash_attn": False, "comment": args.comment,
                     "tokens_per_second": round(gen / secs, 4),
                     "max_gpu_memory_cost_gb": round((gpu_peak or 0) / GiB, 4),
                     "engine": "fastload", "device": device, "dtype": str(model.dtype), "quant": quant,
                     "seconds": round(secs, 4), "peak_memory_gb": round((gpu_peak if gpu_peak else own) / GiB, 4),
                     "kv_pool_gb": round(pool / GiB, 4),
                     "peak_rss_gb": round(rss_peak / GiB, 4) if rss_peak else None})
        print(f"fastload  context {n:>7}  {gen} new tokens in {secs:.2f} s: {gen / secs:.2f} tokens/s", flush=True)
    del model
    gc.collect()
    fastload.cuda.empty_cache()  # the GPU memory and pinned buffers go back before the peer loads
    peer = {}
    if "transformers" in args.peer:
        peer["transformers"] = _speed_transformers(ref, args, lengths, gen, rows)
        if peer["transformers"].get("error"):
            notes.append(peer["transformers"]["error"])
    meta = {"benchmark": "speed", "source": "QwenLM/Qwen2.5 examples/speed-benchmark/speed_benchmark_transformers.py",
            "model": str(ref), "environment": environment(device), "load_seconds": load_s,
            "rope_scaling": args.rope_scaling, "context_limit": limit,
            "seed": SEED, "prompt": f"token {tid} ({dummy!r}) repeated context_length times",
            "generation": "min_length = context_length + generate_length, max_new_tokens = generate_length; the "
                          "model's generation config otherwise",
            "memory": "max_gpu_memory_cost_gb: fastload.cuda.max_memory_allocated summed over the visible devices "
                      "(0 on the CPU); peak_memory_gb: that on a GPU, else fastload's weights + workspace + this "
                      "run's KV cache; peak_rss_gb: the process's peak RSS since this row started; kv_pool_gb: the "
                      "engine's KV pool, sized per row to the row's context + generate_length (configure_engine("
                      "kv_cache_memory=...)), as transformers' cache grows to what the row needs (generate's default "
                      "pool, 0.4 of free device memory, would otherwise be in every row)",
            "peer": peer, "notes": notes}
    return _finish(out, "speed", ref, rows, SPEED_COLUMNS, meta, SPEED_SHOWN)


def _speed_transformers(ref, args, lengths, gen, rows):
    why = _peer_missing()
    if why:
        return {"error": why}
    try:
        model, tok, load_s, torch, attn = load_transformers(ref, args)
        import transformers
        tid, _ = dummy_token(tok)
        gcfg = model.generation_config
        dev = str(model.device)
        for n in lengths:
            transformers.set_seed(SEED)
            gcfg.min_length, gcfg.max_new_tokens = n + gen, gen
            ids = torch.full((BATCH_SIZE, n), tid, dtype=torch.long, device=model.device)
            cuda = torch.cuda.is_available()
            if cuda:
                for i in range(torch.cuda.device_count()):
                    torch.cuda.reset_peak_memory_stats(i)
                torch.cuda.synchronize()
            _reset_peaks("cpu")
            t0 = time.perf_counter()
            with torch.no_grad():
                pred = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gcfg)
            if cuda:
                torch.cuda.synchronize()
            secs = time.perf_counter() - t0
            peak = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) if cuda else 0
            _, rss_peak = process_rss()
            if pred.shape[1] != n + gen:
                raise RuntimeError(f"generated {pred.shape[1] - n} tokens, not {gen}")
            rows.append({"model_id_or_path": str(ref), "batch_size": BATCH_SIZE, "context_length_per_experiment": n,
                         "generate_length_per_experiment": gen, "use_flash_attn": attn == "flash_attention_2",
                         "comment": args.comment, "tokens_per_second": round(gen / secs, 4),
                         "max_gpu_memory_cost_gb": round(peak / GiB, 4), "engine": "transformers", "device": dev,
                         "dtype": str(model.dtype).replace("torch.", ""), "quant": args.quant or "none",
                         "seconds": round(secs, 4), "peak_memory_gb": round(peak / GiB, 4) if peak else None,
                         "peak_rss_gb": round(rss_peak / GiB, 4) if rss_peak else None})
            print(f"transformers  context {n:>7}  {gen} new tokens in {secs:.2f} s: {gen / secs:.2f} tokens/s",
                  flush=True)
        del model
        gc.collect()
        return {"load_seconds": load_s, "attn_implementation": attn, "versions": {
            "torch": _version("torch"), "transformers": _version("transformers")}}
    except Exception as e:  # noqa: BLE001 - the peer failing must not lose fastload's rows
        return {"error": f"--peer transformers failed: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------- load
def _libc():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
    return libc


def resident_fraction(paths):
    """Fraction of the files' pages in the page cache (mincore), or None where it cannot be asked."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    try:
        libc = _libc()
    except (OSError, AttributeError):
        return None
    page = os.sysconf("SC_PAGE_SIZE")
    total = resident = 0
    for p in paths:
        size = os.path.getsize(p)
        if size == 0:
            continue
        fd = os.open(p, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                n = (size + page - 1) // page
                vec = (ctypes.c_ubyte * n)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                resident += int((np.frombuffer(vec, dtype=np.uint8) & 1).sum())
                total += n
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    return resident / total if total else 0.0


def drop_page_cache(paths):
    """Evict the files from the page cache. Returns (method, resident fraction afterwards or None); raises
    BenchError saying why when this process cannot (another process mapping the files keeps them, for one)."""
    tried = []
    if hasattr(os, "posix_fadvise"):
        for p in paths:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
        left = resident_fraction(paths)
        if left is not None and left <= 0.05:
            return "posix_fadvise(POSIX_FADV_DONTNEED) per file", left
        tried.append("posix_fadvise(DONTNEED) left " + ("an unknown share" if left is None else f"{left:.0%}")
                     + " of the pages cached")
    else:
        tried.append("no posix_fadvise on this OS")
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as fh:
            fh.write("1")
        left = resident_fraction(paths)
        if left is None or left <= 0.05:
            return "echo 1 > /proc/sys/vm/drop_caches", left
        tried.append(f"drop_caches left {left:.0%} cached")
    except OSError as e:
        tried.append(f"/proc/sys/vm/drop_caches: {e.strerror or e}")
    raise BenchError("; ".join(tried))


def raw_read(paths, threads, chunk=16 * MiB):
    """Seconds to read every byte of the files (parallel preads into reused buffers, nothing parsed)."""
    jobs = []
    for p in paths:
        size = os.path.getsize(p)
        jobs += [(p, off, min(chunk, size - off)) for off in range(0, size, chunk)]
    fds = {p: os.open(p, os.O_RDONLY) for p in paths}
    bufs = {}

    def one(job):
        p, off, n = job
        import threading
        b = bufs.setdefault(threading.get_ident(), bytearray(chunk))
        mv = memoryview(b)[:n]
        got = 0
        while got < n:
            k = os.preadv(fds[p], [mv[got:]], off + got)
            if k <= 0:
                raise OSError(f"{p}: short read at byte {off + got}")
            got += k
        return n

    try:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as ex:
            done = sum(ex.map(one, jobs))
        return time.perf_counter() - t0, done
    finally:
        for fd in fds.values():
            os.close(fd)


PCIE_ENGINE = "PCIe host-to-device"
PCIE_BYTES, PCIE_REPEATS = 256 * MiB, 5


def pcie_ceiling(device, nbytes, size=PCIE_BYTES, repeats=PCIE_REPEATS):
    """bench load's PCIe reference row for a model on a CUDA device: the rate of host-to-device copies of `size`
    bytes from pinned memory (_C.cuda_h2d_bandwidth: cudaHostAlloc'd buffer, one warm-up copy, then `repeats`
    cudaMemcpyAsync timed with CUDA events), with seconds = the checkpoint's `nbytes` at that rate: no load onto
    the GPU can be faster. Raises BenchError saying why it was not measured (a CPU model, a CPU-only build, no
    device)."""
    dev = str(device)
    if not dev.startswith("cuda"):
        raise BenchError(f"the model is on {dev}: no host-to-device copy in its load")
    from . import _C, cuda
    fn = getattr(_C, "cuda_h2d_bandwidth", None)
    if fn is None:
        raise BenchError("this fastload build has no _C.cuda_h2d_bandwidth")
    try:
        idx = cuda._dev(dev)
        gbps = fn(idx, size, repeats)
    except (NotImplementedError, RuntimeError, ValueError) as e:
        raise BenchError(str(e)) from None
    secs = nbytes / (gbps * 1e9)
    return {"engine": PCIE_ENGINE, "cache": "any", "runs": repeats, "times": [secs], "seconds_median": secs,
            "seconds_min": secs, "bytes": nbytes, "core_seconds_median": None,
            "how": f"cudaMemcpyAsync of {size // MiB} MiB from cudaHostAlloc'd (pinned) memory to {dev}, {repeats} "
                   f"copies after a warm-up, timed with CUDA events: {gbps:.2f} GB/s; seconds = the checkpoint's bytes "
                   "at that rate (a bound for any load onto the GPU, warm or cold)"}


LOAD_COLUMNS = ["engine", "cache", "runs", "seconds_median", "seconds_min", "bytes", "gb_per_s", "vs_raw_read",
                "core_seconds_median", "how"]


def cmd_load(args):
    repeat = _positive("--repeat", args.repeat)
    threads = (_positive("--read_threads", args.read_threads) if args.read_threads is not None
               else min(8, os.cpu_count() or 1))
    out = Outputs(args.outputs_dir)
    ref = model_ref(args)
    model, first_s = load_fastload(ref, args)  # also finds the files and warms the cache
    files = sorted(model._source["files"]) if getattr(model, "_source", None) else []
    device, loader_cache = str(model.device), model.load_stats.get("cache")
    del model
    gc.collect()
    if not files:
        raise BenchError(f"{ref}: fastload did not report the files it loaded")
    nbytes = sum(os.path.getsize(p) for p in files)
    notes, results = [], {}

    def fastload_once():
        m, s = load_fastload(ref, args)
        _sync(device)
        core = m.load_stats.get("seconds")
        del m
        gc.collect()
        return s, core

    def record(engine, cache, runs, how, core=None):
        results[(engine, cache)] = {"engine": engine, "cache": cache, "runs": len(runs), "times": runs,
                                    "seconds_median": statistics.median(runs), "seconds_min": min(runs),
                                    "bytes": nbytes, "core_seconds_median": statistics.median(core) if core else None,
                                    "how": how}

    # Warm first: the probe that evicts the files (whether cold loads can be measured at all) must come after the
    # warm runs. Evicting before them made every "warm" load a disk read (the loader reads files that are not in
    # the page cache with O_DIRECT, which does not fill it): 9.8 s instead of ~0.5 s on an H200, 2026-12-01.
    kinds = ["warm"] + ([] if args.no_cold else ["cold"])
    cold_how = None
    if args.no_cold:
        notes.append("cold loads not measured (--no-cold)")
    for cache in kinds:
        if cache == "cold":
            try:
                cold_how, left = drop_page_cache(files)
            except BenchError as e:
                notes.append(f"cold loads not measured: this process cannot evict the files from the page cache ({e})")
                kinds.remove("cold")
                break
        else:
            raw_read(files, threads)  # warm means the files' pages are resident: read them once through the cache
        runs, core, rr = [], [], []
        for _ in range(repeat):
            if cache == "cold":
                drop_page_cache(files)
            s, c = fastload_once()
            runs.append(s)
            core.append(c)
        for _ in range(repeat):
            if cache == "cold":
                drop_page_cache(files)
            rr.append(raw_read(files, threads)[0])
        record("fastload", cache, runs, f"from_pretrained(device_map={device!r}) wall time" +
               (f"; pages evicted by {cold_how}" if cache == "cold" else ""), core)
        record("raw read", cache, rr, f"{threads} threads of 16 MiB preads, nothing parsed" +
               (f"; pages evicted by {cold_how}" if cache == "cold" else ""))
        print(f"{cache}: fastload {statistics.median(runs):.3f} s, raw read {statistics.median(rr):.3f} s", flush=True)
    try:
        pcie = pcie_ceiling(device, nbytes)
        results[(PCIE_ENGINE, pcie["cache"])] = pcie
        print(f"PCIe host-to-device (pinned): {nbytes / pcie['seconds_median'] / 1e9:.2f} GB/s", flush=True)
    except BenchError as e:
        notes.append(f"PCIe ceiling not measured: {e}")
    peer = {}
    if "transformers" in args.peer:
        peer["transformers"] = _load_transformers_peer(ref, args, files, [(k, cold_how if k == "cold" else None)
                                                                           for k in kinds], repeat, record, threads)
        if peer["transformers"].get("error"):
            notes.append(peer["transformers"]["error"])
    rows = []
    for (engine, cache), r in results.items():
        raw = results.get(("raw read", cache))
        r["gb_per_s"] = round(nbytes / r["seconds_median"] / 1e9, 4) if r["seconds_median"] > 0 else None
        r["vs_raw_read"] = (round(raw["seconds_median"] / r["seconds_median"], 4) if raw and r["seconds_median"] > 0
                            else None)
        rows.append(r)
    meta = {"benchmark": "load", "model": str(ref), "files": files, "bytes": nbytes,
            "environment": environment(device), "first_load_seconds": first_s, "repeat": repeat,
            "cold_method": cold_how, "loader_reports": loader_cache,
            "vs_raw_read": "raw read seconds / this row's seconds (1.0 = the files' read rate; above 1 is possible "
                           "warm when the raw read's threads are fewer than the loader's)",
            "peer": peer, "notes": notes}
    return _finish(out, "load", ref, rows, LOAD_COLUMNS, meta, LOAD_COLUMNS[:-1])


def _load_transformers_peer(ref, args, files, kinds, repeat, record, threads):
    why = _peer_missing()
    if why:
        return {"error": why}
    try:
        info = {}
        # One untimed load first, as for fastload (first_load_seconds): the first from_pretrained of a process also
        # pays torch's CUDA start (H200, 2026-12-01: 13.1 s, then 3.0 s for the same warm files).
        m, _tok, info["first_load_seconds"], torch, _attn = load_transformers(ref, args)
        del m
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        for cache, how in kinds:
            if cache == "warm":
                raw_read(files, threads)  # after fastload's cold runs: make the pages resident again
            runs = []
            for _ in range(repeat):
                if cache == "cold":
                    drop_page_cache(files)
                m, _tok, secs, torch, attn = load_transformers(ref, args)
                runs.append(secs)
                del m
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            record("transformers", cache, runs, "AutoModelForCausalLM.from_pretrained wall time"
                   + (f"; pages evicted by {how}" if cache == "cold" else ""))
        info["versions"] = {"torch": _version("torch"), "transformers": _version("transformers")}
        return info
    except Exception as e:  # noqa: BLE001
        return {"error": f"--peer transformers failed: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------- concurrency
def read_queries(path):
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except IsADirectoryError:
        raise BenchError(f"--queries {path}: is a directory, not a text file") from None
    except FileNotFoundError:
        raise BenchError(f"--queries {path}: no such file") from None
    except OSError as e:
        raise BenchError(f"--queries {path}: cannot be read ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BenchError(f"--queries {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    qs = [q.strip() for q in text.splitlines() if q.strip()]
    if not qs:
        raise BenchError(f"--queries {path}: no queries (one per line)")
    return qs


def _memory_now(device, model):
    """(current, peak, kind) in bytes: fastload's device memory on a GPU, the process's RSS on the CPU."""
    now, peak = _device_memory(device)
    if now is not None:
        return now, peak, "fastload.cuda memory_allocated / max_memory_allocated"
    now, peak = process_rss()
    return now, peak, "process RSS / peak RSS (CPU)"


CONC_COLUMNS = ["mode", "workers", "queries", "runs", "wall_s", "walls_s", "new_tokens", "tokens_per_s",
                "speedup_vs_loop", "same_answers_as_loop", "memory_allocated_mb", "max_memory_allocated_mb",
                "weights_mb", "kv_pool_mb", "kv_pool_peak_used_mb", "memory"]


def cmd_concurrency(args):
    queries = read_queries(args.queries) if args.queries else list(QUERIES)
    mnt = _positive("--max_new_tokens", args.max_new_tokens)
    workers = ([_positive("--max_workers", w) for w in args.max_workers] if args.max_workers
               else [len(queries)])
    workers = list(dict.fromkeys(workers))
    repeat = _positive("--repeat", args.repeat)
    out = Outputs(args.outputs_dir)
    ref = model_ref(args)
    import fastload
    tok = fastload.AutoTokenizer.from_pretrained(ref)
    model, load_s = load_fastload(ref, args)
    device = str(model.device)

    def ask(q):
        response, _history = model.chat(tok, q, history=[], max_new_tokens=mnt, do_sample=False)
        return response

    ask(queries[0])  # warm-up: first touch of the weights, the thread team
    modes = [("loop", 1)] + [(f"pool({w})", w) for w in workers]
    walls = {m: [] for m, _ in modes}
    answers, memory, generated = {}, {}, {}

    def made():  # tokens the engine generated so far: a decode row each (wasted / replayed rows not), plus the
        st = model.engine_stats() or {}  # first token of each request, from its prompt
        return (st.get("decode_rows", 0) - st.get("wasted_rows", 0) - st.get("replayed_tokens", 0),
                st.get("prefill_tokens", 0))
    for _ in range(repeat):  # interleaved: a change in the machine's load hits every mode alike
        for mode, w in modes:
            _reset_peaks(device)
            before = made()[0]
            t0 = time.perf_counter()
            if mode == "loop":
                got = [ask(q) for q in queries]
            else:
                with ThreadPoolExecutor(max_workers=w) as ex:
                    got = list(ex.map(ask, queries))
            walls[mode].append(time.perf_counter() - t0)
            generated.setdefault(mode, made()[0] - before + len(queries))
            now, peak, kind = _memory_now(device, model)
            prev = memory.get(mode)
            memory[mode] = (now, max(peak or 0, prev[1] or 0) if prev else peak, kind)
            answers.setdefault(mode, got)
            print(f"{'for-loop' if mode == 'loop' else f'ThreadPoolExecutor({w})'}: {walls[mode][-1]:.2f} s",
                  flush=True)
    rows = []
    # what the memory figures hold: the weights, and the engine's KV pool (reserved up front, kv_cache_memory=) with
    # the most of it the requests used at once
    ms = model.memory_stats()
    pool_split = {"weights_mb": round(ms["weights"] / MiB, 2), "kv_pool_mb": round(ms["kv_cache_pool"] / MiB, 2),
                  "kv_pool_peak_used_mb": round(ms["kv_cache_pool_peak_used"] / MiB, 2)}
    for mode, w in modes:
        got, wall = answers[mode], statistics.median(walls[mode])
        now, peak, kind = memory[mode]
        ntok = generated[mode]
        rows.append({"mode": "for-loop" if mode == "loop" else f"ThreadPoolExecutor({w})", "workers": w,
                     "queries": len(queries), "runs": repeat, "wall_s": round(wall, 4),
                     "walls_s": [round(x, 4) for x in walls[mode]], "new_tokens": ntok,
                     "tokens_per_s": round(ntok / wall, 4) if wall > 0 else None,
                     "same_answers_as_loop": got == answers["loop"],
                     "memory_allocated_mb": round(now / MiB, 2) if now is not None else None,
                     "max_memory_allocated_mb": round(peak / MiB, 2) if peak is not None else None, "memory": kind,
                     **pool_split})
    for r in rows:
        r["speedup_vs_loop"] = round(rows[0]["wall_s"] / r["wall_s"], 4) if r["wall_s"] > 0 else None
    shown_answers = {"loop": answers["loop"], "pool": answers[modes[1][0]]}  # "pool": the first pool size's
    shown_answers.update({m: answers[m] for m, _ in modes[2:]})
    meta = {"benchmark": "concurrency", "source": "the ChatGLM2 field report (model.chat in a for-loop and through "
            "ThreadPoolExecutor, then torch.cuda's memory report)", "model": str(ref), "environment":
            environment(device), "load_seconds": load_s, "max_new_tokens": mnt, "greedy": True, "repeat": repeat,
            "queries_list": queries, "answers": shown_answers, "model_memory": model.memory_stats(),
            "new_tokens": "tokens the engine generated for the answers in one run (engine_stats: decode rows, less any "
                          "computed for nothing or replayed after a preemption, plus each request's first token; an "
                          "answer's final eos included); re-encoding the answers' text miscounted (U+FFFD of a cut "
                          "character, stripped spaces)",
            "wall_s": f"median of {repeat} run(s) per mode, modes interleaved (walls_s: every run)",
            "notes": []}
    return _finish(out, "concurrency", ref, rows, CONC_COLUMNS, meta,
                   [c for c in CONC_COLUMNS if c not in ("memory", "walls_s")])


# ---------------------------------------------------------------------------------------------- perplexity
def weights_info(model):
    """Bytes of weights and whether they are held quantised (model.is_quantized and the core's counts)."""
    info = dict(getattr(model, "_core").info)
    out = {"weight_bytes": info.get("weight_bytes"), "is_quantized": getattr(model, "is_quantized", None)}
    for k in ("quantized_weights", "quantized_bytes", "float_bytes"):
        if k in info:
            out[k] = info[k]
    return out


def load_reference(fastload, path, device, threads=None, dtype="float16"):
    """(model, how): `path` in `dtype` (float16) with nothing quantised (a GGUF dequantised). Raises BenchError
    when this fastload cannot give a float reference."""
    kw = {} if threads is None else {"threads": threads}
    is_gguf = str(path).endswith(".gguf")
    cfg = fastload.QuantConfig(gguf="dequantize") if is_gguf else "none"
    shown = 'QuantConfig(gguf="dequantize")' if is_gguf else '"none"'
    try:
        m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map=device, torch_dtype=dtype,
                                                         quantization_config=cfg, **kw)
    except (NotImplementedError, TypeError) as e:
        raise BenchError(f"{path}: no float16 reference: quantization_config={shown} was refused "
                         f"({type(e).__name__}: {e})") from None
    if weights_info(m).get("quantized_weights"):
        raise BenchError(f"{path}: quantization_config={shown} still loaded quantised weights (a quantised "
                         "checkpoint?): no float reference")
    return m, f'from_pretrained(model, quantization_config={shown}, torch_dtype={dtype!r})'


def _decode_speed(model, tok, n):
    """Tokens/s of generating exactly n tokens greedily after a short prompt (0 / None: not measured)."""
    if not n:
        return None
    enc = tok("The meaning of life is", return_tensors="np")
    k = enc["input_ids"].shape[1]
    _sync(model.device)
    t0 = time.perf_counter()
    model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], min_length=k + n, max_new_tokens=n,
                   do_sample=False)
    _sync(model.device)
    return n / (time.perf_counter() - t0)


def perplexity_modes(path, tok, text, modes, device=None, context=None, generate_length=0, threads=None, log=print,
                     dtype="float16"):
    """Score every mode on `text` and return {mode: row}. Modes: "fp16" (the float reference in `dtype`, float16
    unless asked otherwise, always first),
    "int8" / "int4" / "nf4" (quantised at load; "int4:32" sets the group size) and "gguf" (a .gguf as shipped).
    A GGUF's quantised modes are loaded from the reference written with save_pretrained (float16 safetensors), a
    directory's from the directory itself. A mode that cannot be loaded gets {"error": ...}."""
    import shutil
    import tempfile

    import fastload
    from . import evaluate
    kw = {} if threads is None else {"threads": threads}
    is_gguf = str(path).endswith(".gguf")
    rows = {}

    def score(name, model, how, extra=None):
        _reset_peaks(device)
        r = evaluate.perplexity(model, tok, text, context=context)
        ms = model.memory_stats()  # the scoring's peak: before the decode-speed test makes the engine's KV pool
        dec = _decode_speed(model, tok, generate_length)
        row = {"how": how, "device": str(model.device), "dtype": str(model.dtype), **weights_info(model),
               **{k: r[k] for k in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte",
                                    "loglikelihood", "tokens", "words", "bytes", "windows", "seconds",
                                    "tokens_per_s")},
               "decode_tokens_per_s": dec, "peak_memory_bytes": ms.get("peak")}
        row.update(extra or {})
        rows[name] = row
        log(f"{name:5s} word_ppl {r['word_perplexity']:10.4f}  ppl {r['perplexity']:9.4f}  bpb {r['bits_per_byte']:.4f}"
            f"  ({r['tokens']} tokens, {r['seconds']:.1f} s, {r['tokens_per_s']:.0f} tok/s)  {how}")

    modes = [m for m in modes if m != "fp16"]
    tmp = tempfile.mkdtemp(prefix="fastload-bench-ppl-")
    try:
        t0 = time.perf_counter()
        ref, how = load_reference(fastload, path, device, threads, dtype)
        score("fp16", ref, how, {"load_seconds": time.perf_counter() - t0})
        src = path
        if is_gguf and any(m.split(":")[0] in ("int8", "int4", "nf4") for m in modes):
            src = os.path.join(tmp, "fp16")
            ref.save_pretrained(src)
        del ref
        gc.collect()
        for mode in modes:
            scheme, _, group = mode.partition(":")
            if scheme == "gguf":
                t0 = time.perf_counter()
                m = fastload.AutoModelForCausalLM.from_pretrained(path, device_map=device, torch_dtype=dtype, **kw)
                score("gguf", m, "from_pretrained(GGUF as shipped)", {"load_seconds": time.perf_counter() - t0})
                del m
                gc.collect()
                continue
            qcfg = {"scheme": scheme, "group_size": int(group)} if group else scheme
            t0 = time.perf_counter()
            try:
                m = fastload.AutoModelForCausalLM.from_pretrained(src, device_map=device, torch_dtype=dtype,
                                                                 quantization_config=qcfg, **kw)
            except (NotImplementedError, ValueError, TypeError) as e:
                rows[mode] = {"error": f"{type(e).__name__}: {e}"}
                log(f"{mode:5s} could not be loaded: {type(e).__name__}: {e}")
                continue
            what = "save_pretrained(fp16 reference) then " if src != path else ""
            score(mode, m, f"{what}from_pretrained(quantization_config={qcfg!r})",
                  {"load_seconds": time.perf_counter() - t0})
            del m
            gc.collect()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    base = rows["fp16"]["word_perplexity"]
    for name, row in rows.items():
        if name == "fp16" or "error" in row:
            continue
        row["word_ppl_vs_fp16_pct"] = 100.0 * (row["word_perplexity"] / base - 1.0)
        row["held_quantised"] = bool(row.get("quantized_weights")) if "quantized_weights" in row else None
    return rows


def _modes(spec, is_gguf):
    if spec is None:
        return [m for m in PPL_MODES if m != "gguf" or is_gguf]
    out = []
    for m in (x.strip() for x in spec.split(",")):
        if not m:
            continue
        scheme, _, group = m.partition(":")
        if scheme not in PPL_MODES:
            raise BenchError(f"--modes: {m!r} is not one of {', '.join(PPL_MODES)} (SCHEME:GROUP for a group size)")
        if group and (scheme in ("fp16", "gguf") or not group.isdigit() or int(group) < 1):
            raise BenchError(f"--modes: {m!r}: a group size is a positive number after int8/int4/nf4 (e.g. int4:32)")
        if scheme == "gguf" and not is_gguf:
            raise BenchError("--modes: gguf needs a .gguf model")
        if group:  # QuantConfig's own rule, before the reference is loaded and scored (it failed only after that)
            from .quant import QuantConfig
            try:
                QuantConfig(scheme, group_size=int(group))
            except ValueError as e:
                raise BenchError(f"--modes: {m!r}: {e}") from None
        out.append(m)
    if not out:
        raise BenchError("--modes: no modes given")
    return out


PPL_COLUMNS = ["mode", "perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "word_ppl_vs_fp16_pct",
               "tokens", "seconds", "tokens_per_s", "decode_tokens_per_s", "weight_bytes", "peak_memory_bytes",
               "quantized_weights", "held_quantised", "load_seconds", "error", "how"]
PPL_SHOWN = ["mode", "perplexity", "word_perplexity", "word_ppl_vs_fp16_pct", "tokens_per_s", "decode_tokens_per_s",
             "weight_bytes", "peak_memory_bytes", "held_quantised"]


def cmd_perplexity(args):
    if args.context is not None and args.context < 2:
        raise BenchError(f"--context must be at least 2, got {args.context}")
    if args.max_chars is not None:
        _positive("--max_chars", args.max_chars)
    if args.generate_length is not None and args.generate_length < 0:
        raise BenchError(f"--generate_length must be 0 or more, got {args.generate_length}")
    _modes(args.modes, True)  # the names, before the text and the model (which may fetch the demo model)
    out = Outputs(args.outputs_dir)
    path = args.file or DEFAULT_TEXT
    if args.file is None and not os.path.isfile(path):
        raise BenchError(f"--file: give a UTF-8 text to score (the default {DEFAULT_TEXT} is part of a fastload "
                         "checkout, not of the installed package)")
    from .__main__ import _read_text
    text = _read_text(path, args.max_chars)
    if not text.strip():
        raise BenchError(f"--file {path}: the text is empty")
    ref = model_ref(args)
    modes = _modes(args.modes, str(ref).endswith(".gguf"))
    import fastload
    tok = fastload.AutoTokenizer.from_pretrained(ref)
    device = args.device
    threads = _threads(args.threads) if args.threads is not None else None
    dtype = args.dtype if args.dtype not in (None, "auto") else "float16"
    res = perplexity_modes(ref, tok, text, modes, device=device, context=args.context,
                           generate_length=args.generate_length, threads=threads, dtype=dtype)
    rows = [{"mode": k, **v} for k, v in res.items()]
    dev = res["fp16"]["device"]
    meta = {"benchmark": "perplexity", "model": str(ref), "text": path, "max_chars": args.max_chars, "dtype": dtype,
            "context": args.context, "method": "rolling windows (lm-evaluation-harness loglikelihood_rolling)",
            "tokens_per_s": "scoring (forward passes over the text); decode_tokens_per_s: greedy generation of "
                            f"{args.generate_length} tokens after a short prompt",
            "environment": environment(dev), "notes": []}
    done = _finish(out, "perplexity", ref, rows, PPL_COLUMNS, meta, PPL_SHOWN)
    failed = [r["mode"] for r in rows if "error" in r]
    if failed:  # the table and files keep the other modes; the run is not a success (it exited 0)
        raise BenchError(f"--modes: {', '.join(failed)} could not be loaded for this model (see above; the other "
                         "modes' rows are written)")
    return done
