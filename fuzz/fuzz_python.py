"""fuzz_python.py: atheris harness for fastload's Python layer (config.json, safetensors index and
shards, tokenizer.json, GGUF metadata and tokenizer), end to end through the public API.

Each input is read by atheris.FuzzedDataProvider as a list of choices: which checkpoint to start
from (a tiny valid safetensors directory, a sharded one, or a GGUF file; fuzz/tiny_models.py), then
structural mutations: a key of config.json / tokenizer.json / tokenizer_config.json /
model.safetensors.index.json / GGUF metadata set to a wrong type, a huge, negative, NaN or infinite
number, a deeply nested value, an odd string; tensors with other shapes, dtypes, ggml types, names or
offsets; odd shard names (absolute, '..', '', nested); a symlink or FIFO where a checkpoint file should
be; odd tokenizer vocabularies (duplicates, one very long token, bad merges, ids out of range); and
byte flips / truncation of the written files. Then:

    fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")   (+ one forward if it loads)
    fastload.AutoTokenizer.from_pretrained(path)                            (+ encode/decode if it loads)
    fastload.AutoConfig.from_pretrained(path), fastload.GenerationConfig.from_pretrained(path)

An input that starts with a zip local header (PK\x03\x04) is not read as choices: it is a PyTorch `.bin`
(torch.save's zip; the seeds are the fixtures of tests/fixtures/torch_bin/, so libFuzzer mutates real zips and
the pickles in them). Its stored entries get their CRC-32 recomputed (where the zip directory can be followed),
so that changed bytes of data.pkl reach the pickle interpreter rather than the CRC check; it is written as
pytorch_model.bin next to the tiny qwen2_bin fixture's config.json, and fastload.torchbin.open_file reads it
(every tensor of an accepted table read back) before the calls above run on the directory. (No reproducer
in fuzz/crashers/ starts so: they build what they built before this case existed.)

ALLOW-LIST (anything else is a finding and is re-raised, so that atheris reports it and saves the input):
  - fastload.CheckpointError (a ValueError subclass): a malformed / hostile checkpoint;
  - NotImplementedError: valid but unsupported (architecture, dtype, rope type, ...);
  - OSError and its subclasses (FileNotFoundError, IsADirectoryError, ...) whose message or .filename
    names a file or directory of the checkpoint (the harness's temporary root appears in it).
  Not allowed: MemoryError (a tiny file must not cause a huge allocation), plain ValueError, TypeError,
  KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError, RecursionError,
  UnicodeError, json.JSONDecodeError escaping as such, the tokenizers library's bare Exception and
  pyo3's PanicException (a BaseException), and any exception after a successful load.
  Also findings: a message that shows the contents of a file outside the checkpoint (a canary file
  and /etc/passwd), and a load that succeeds through a shard name or symlink leading outside the
  model directory. Hangs are caught by libFuzzer's -timeout (run.sh passes -timeout=10), and an OSError
  'Interrupted system call' (a blocking open of a FIFO cut by libFuzzer's SIGALRM) is a hang too; crashes of
  the C extension by atheris's signal handlers.

Limits: the process runs under RLIMIT_AS = 2 GiB (FUZZ_PY_AS_MB to change) and FASTLOAD_THREADS=1.

Modes:
    python3 fuzz/fuzz_python.py [libFuzzer flags] [corpus dirs]   fuzz (stops at the first finding)
    python3 fuzz/fuzz_python.py CRASH_FILE                         re-run one input (reproduce)
    FUZZ_PY_COLLECT=DIR python3 fuzz/fuzz_python.py ...            triage: record each distinct finding
        (exception type + innermost fastload frame) as DIR/<sig>.input + DIR/<sig>.txt and go on; hangs
        are cut at FUZZ_PY_HANG_S seconds (default 3) by an interval timer and recorded as findings too.
    FUZZ_PY_DESCRIBE=1 with one input prints the checkpoint it builds (the mutations chosen);
    FUZZ_PY_DUMP=DIR also copies it to DIR, to load by hand (symlinks and FIFOs kept as such).
"""
from __future__ import annotations

import atexit
import copy
import errno
import hashlib
import json
import math
import os
import resource
import shutil
import signal
import stat
import struct
import sys
import tempfile
import traceback
import warnings
import zlib

os.environ.setdefault("FASTLOAD_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402  (imported before instrumentation: only fastload is instrumented)
import tokenizers  # noqa: E402,F401
import atheris  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import tiny_models as tm  # noqa: E402
from tiny_models import GGML, T  # noqa: E402

with atheris.instrument_imports(include=["fastload"]):
    import fastload  # noqa: E402
    import fastload.gguf_tokenizer  # noqa: E402,F401
    import fastload.torchbin  # noqa: E402

CANARY = "root:x:0:0:FUZZ-CANARY-OUTSIDE-FILE"
COLLECT = os.environ.get("FUZZ_PY_COLLECT")
DESCRIBE = os.environ.get("FUZZ_PY_DESCRIBE") == "1"
HANG_S = float(os.environ.get("FUZZ_PY_HANG_S", "3"))
DUMP = os.environ.get("FUZZ_PY_DUMP")


class Finding(Exception):
    """A property the harness checks failed (not an exception type from fastload)."""


class Hang(BaseException):
    pass


# ------------------------------------------------------------------------------------------------
# templates (built once)
# ------------------------------------------------------------------------------------------------
ST_TEMPLATES = [tm.st_model(seed=0, dtype="F32"), tm.st_model(seed=1, dtype="BF16"),
                tm.st_model(seed=2, dtype="F16", arch="Qwen2ForCausalLM"),
                tm.st_model(seed=3, dtype="F32", arch="MistralForCausalLM")]
GG_TEMPLATES = [tm.gguf_model(seed=0, arch="llama", tokenizer="gpt2"),
                tm.gguf_model(seed=1, arch="qwen2", tokenizer="llama"),
                tm.gguf_model(seed=2, arch="llama", tokenizer="llama", types=[GGML.Q8_0, GGML.F16])]
TOK_TEMPLATE = tm.tokenizer_dict()
TOKCFG_TEMPLATE = tm.tokenizer_config()
BIN_MAGIC = b"PK\x03\x04"  # an input that starts so is a whole torch zip (build_bin_dir)
BIN_FIXTURE = os.path.join(HERE, "..", "tests", "fixtures", "torch_bin", "qwen2_bin")
BIN_FILES = {}
for _n in ("config.json", "generation_config.json"):
    with open(os.path.join(BIN_FIXTURE, _n), "rb") as _f:
        BIN_FILES[_n] = _f.read()

CONFIG_KEYS = ["architectures", "model_type", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "head_dim", "num_hidden_layers", "vocab_size", "max_position_embeddings",
               "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters", "hidden_act", "tie_word_embeddings",
               "sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "attention_bias",
               "mlp_bias", "dtype", "torch_dtype", "bos_token_id", "eos_token_id", "pad_token_id", "quantization_config"]
ROPE_KEYS = ["rope_type", "type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings",
             "rope_theta"]
GGUF_SUFFIXES = ["block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                 "attention.head_count_kv", "attention.key_length", "attention.layer_norm_rms_epsilon",
                 "rope.freq_base", "rope.scaling.type", "rope.scaling.factor", "attention.sliding_window",
                 "vocab_size", "rope.scale_linear", "rope.scaling.attn_factor", "attention.causal"]
GGUF_KEYS = ["general.architecture", "general.alignment", "tokenizer.ggml.model", "tokenizer.ggml.pre",
             "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
             "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
             "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
             "tokenizer.chat_template"]
INTS = [0, 1, -1, 2, 3, 4, 7, 8, 16, 31, 33, 255, 256, 1023, 1024, 1025, 65535, 65536, 131072, 131073,
        2**20, 2**24, 2**24 + 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**53 + 1, 2**62, 2**63 - 1, 2**63,
        2**64 - 1, 2**64, -2**31, -2**63, 10**30, -10**30]
FLOATS = [0.0, -0.0, 1e-300, -1e-5, 0.5, 1.0, 1.5, 2.0, 1e5, 1e300, float("nan"), float("inf"), float("-inf"),
          5e-324, 3.4e38, 1e39]
STRINGS = ["", "a", "silu", "gelu", "llama", "qwen2", "mistral", "gpt2", "bert", "float16", "bfloat16", "float8",
           "int4", "linear", "llama3", "yarn", "dynamic", "default", "full_attention", "sliding_attention",
           "LlamaForCausalLM", "Qwen2ForCausalLM", "../x", "/etc/passwd", "\u2581", "\x00", "\ud800", "\u00e9" * 3,
           "a b", "a  b", " ", "<s>", "</s>", "<unk>", "\u0120", "x" * 300]
SHARD_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors",
               "../outside.safetensors", "../secret.txt", "/etc/passwd", "", ".", "..", "sub/s.safetensors",
               "./model-00001-of-00002.safetensors", "link.safetensors", "fifo.safetensors", "x" * 300,
               "caf\u00e9.safetensors", "a\nb.safetensors", "config.json", "model"]
ST_DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3",
             "F8_E5M2", "F4", "C64", "Q4", "f32", ""]


# ------------------------------------------------------------------------------------------------
# value generators
# ------------------------------------------------------------------------------------------------
class Deep:
    """Placeholder for a nesting `n` deep, expanded in the JSON text (json.dumps would recurse)."""

    def __init__(self, n, kind):
        self.n, self.kind = n, kind

    def __str__(self):  # where a string is needed (GGUF string values): a short nesting as text
        k = min(self.n, 40)
        return "[" * k + "]" * k if self.kind == "[" else '{"a":' * k + "1" + "}" * k


def weird_value(fdp, depth=0):
    k = fdp.ConsumeIntInRange(0, 13)
    if k == 0:
        return fdp.PickValueInList(INTS)
    if k == 1:
        return fdp.ConsumeIntInRange(-4, 600)
    if k == 2:
        return fdp.PickValueInList(FLOATS)
    if k == 3:
        return fdp.ConsumeRegularFloat()
    if k == 4:
        return fdp.PickValueInList(STRINGS)
    if k == 5:
        return fdp.ConsumeUnicodeNoSurrogates(fdp.ConsumeIntInRange(0, 24))
    if k == 6:
        return fdp.ConsumeBool()
    if k == 7:
        return None
    if k == 8 and depth < 3:
        return [weird_value(fdp, depth + 1) for _ in range(fdp.ConsumeIntInRange(0, 3))]
    if k == 9 and depth < 3:
        return {fdp.PickValueInList(CONFIG_KEYS + ROPE_KEYS + ["x"]): weird_value(fdp, depth + 1)
                for _ in range(fdp.ConsumeIntInRange(0, 3))}
    if k == 10:
        return Deep(fdp.PickValueInList([10, 100, 1000, 3000, 100000]), fdp.PickValueInList(["[", "{"]))
    if k == 11:
        return str(fdp.PickValueInList(INTS))  # a number as a string
    if k == 12:
        return float(fdp.PickValueInList(INTS))
    return fdp.ConsumeIntInRange(0, 64)


def to_json(obj):
    deep = []

    def enc(o):
        if isinstance(o, Deep):
            deep.append(o)
            return f"@@DEEP{len(deep) - 1}@@"
        raise TypeError(type(o).__name__)

    s = json.dumps(obj, default=enc, allow_nan=True, ensure_ascii=False)
    for i, d in enumerate(deep):
        inner = ("[" * d.n + "]" * d.n) if d.kind == "[" else ('{"a":' * d.n + "1" + "}" * d.n)
        s = s.replace(f'"@@DEEP{i}@@"', inner)
    return s


def mutate_obj(fdp, obj, keys):
    """Set / delete / add one entry somewhere in a JSON-like object (dicts and lists)."""
    cur = obj
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if isinstance(cur, dict) and cur:
            k = fdp.PickValueInList(sorted(cur, key=str))
            if isinstance(cur[k], (dict, list)) and cur[k]:
                cur = cur[k]
                continue
        elif isinstance(cur, list) and cur:
            i = fdp.ConsumeIntInRange(0, len(cur) - 1)
            if isinstance(cur[i], (dict, list)) and cur[i]:
                cur = cur[i]
                continue
        break
    act = fdp.ConsumeIntInRange(0, 3)
    if isinstance(cur, dict):
        if act == 0 and cur:
            del cur[fdp.PickValueInList(sorted(cur, key=str))]
        else:
            k = fdp.PickValueInList(keys) if (act != 3 or not cur) else fdp.PickValueInList(sorted(cur, key=str))
            cur[k] = weird_value(fdp)
    elif isinstance(cur, list):
        if act == 0 and cur:
            del cur[fdp.ConsumeIntInRange(0, len(cur) - 1)]
        elif act == 1 or not cur:
            cur.append(weird_value(fdp))
        else:
            cur[fdp.ConsumeIntInRange(0, len(cur) - 1)] = weird_value(fdp)


def mutate_bytes(fdp, b: bytes) -> bytes:
    """Byte-level damage: flips, overwrites with interesting u32/u64, truncation, appended garbage."""
    b = bytearray(b)
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        if not b:
            break
        k = fdp.ConsumeIntInRange(0, 4)
        at = fdp.ConsumeIntInRange(0, len(b) - 1)
        if k == 0:
            b[at] ^= 1 << fdp.ConsumeIntInRange(0, 7)
        elif k == 1:
            b[at] = fdp.ConsumeIntInRange(0, 255)
        elif k == 2:
            v = fdp.PickValueInList([0, 1, 0xFFFFFFFF, 2**31, 2**63, 2**64 - 1, 2**32, 24, 255])
            b[at:at + 8] = struct.pack("<Q", v % 2**64)
        elif k == 3:
            del b[at:]
        else:
            b += fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 16))
    return bytes(b)


# ------------------------------------------------------------------------------------------------
# checkpoint builders
# ------------------------------------------------------------------------------------------------
def build_st_dir(fdp, root, d, log):
    cfg, tensors = copy.deepcopy(fdp.PickValueInList(ST_TEMPLATES))
    tensors = dict(tensors)
    # config.json
    for _ in range(fdp.ConsumeIntInRange(0, 3)):
        mutate_obj(fdp, cfg, CONFIG_KEYS)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        cfg["rope_scaling"] = {fdp.PickValueInList(ROPE_KEYS): weird_value(fdp) for _ in range(3)}
        cfg["rope_scaling"]["rope_type"] = fdp.PickValueInList(["linear", "llama3", "default", "yarn"])
    # tensors
    header_edits = []
    for _ in range(fdp.ConsumeIntInRange(0, 2)):
        names = sorted(tensors)
        k = fdp.ConsumeIntInRange(0, 6)
        n = fdp.PickValueInList(names) if names else None
        if n is None:
            break
        dt, arr = tensors[n]
        if k == 0:
            del tensors[n]
        elif k == 1:  # another shape, consistent data
            shp = tuple(fdp.ConsumeIntInRange(0, 40) for _ in range(fdp.ConsumeIntInRange(0, 4)))
            tensors[n] = (dt, np.zeros(shp, np.uint8 if tm.st_util.ST_SIZE.get(dt, 1) == 1 else
                                       np.dtype(f"u{tm.st_util.ST_SIZE.get(dt, 1)}")))
        elif k == 2:  # another dtype with the same bytes per element, or not
            ndt = fdp.PickValueInList(ST_DTYPES)
            size = tm.st_util.ST_SIZE.get(ndt)
            if size:
                tensors[n] = (ndt, np.zeros(arr.shape, np.dtype(f"u{size}") if size > 1 else np.uint8))
            else:
                header_edits.append((n, "dtype", ndt))
        elif k == 3:  # rename
            tensors[fdp.PickValueInList(STRINGS + ["model.layers.1.mlp.up_proj.weight", "lm_head.weight"])] = tensors.pop(n)
        elif k == 4:  # a header-only lie: shape or offsets that do not match
            header_edits.append((n, fdp.PickValueInList(["shape", "data_offsets"]),
                                 [fdp.PickValueInList(INTS) for _ in range(fdp.ConsumeIntInRange(0, 3))]))
        elif k == 5:  # values: NaN / inf in the weights
            a = np.array(arr, copy=True)
            if a.size:
                a.reshape(-1).view(np.uint8)[:] = fdp.ConsumeIntInRange(0, 255)
            tensors[n] = (dt, a)
        else:  # huge shape with a zero extent (0 bytes)
            shp = (0,) + tuple(fdp.PickValueInList(INTS[:30]) for _ in range(fdp.ConsumeIntInRange(1, 3)))
            header_edits.append((n, "shape", [abs(x) for x in shp]))
            header_edits.append((n, "data_offsets", None))
    header, data = tm.st_util.layout(tensors, {"format": "pt"} if fdp.ConsumeBool() else None)
    for n, field, v in header_edits:
        if n in header:
            if field == "data_offsets" and v is None:
                # an earlier edit may have replaced the offsets with 0-3 arbitrary numbers
                cur = header[n].get("data_offsets")
                b = cur[0] if isinstance(cur, list) and len(cur) == 2 and isinstance(cur[0], int) else 0
                header[n]["data_offsets"] = [b, b]
                # the rest of the region no longer tiles: shift the others back is not needed for a
                # zero-size tensor at the end; otherwise the parser rejects it, which is fine
            else:
                header[n][field] = v
    files = {"config.json": to_json(cfg).encode("utf-8", "surrogatepass")}
    sharded = fdp.ConsumeIntInRange(0, 3) == 0
    if sharded:
        names = sorted(header)
        names = [x for x in names if x != "__metadata__"]
        cut = fdp.ConsumeIntInRange(0, len(names))
        s1 = fdp.PickValueInList(SHARD_NAMES)
        s2 = fdp.PickValueInList(SHARD_NAMES)
        parts = {s1: {n: tensors[n] for n in names[:cut] if n in tensors},
                 s2: {n: tensors[n] for n in names[cut:] if n in tensors}}
        wm = {n: (s1 if i < cut else s2) for i, n in enumerate(names)}
        index = {"metadata": {"total_size": len(data)}, "weight_map": wm}
        for _ in range(fdp.ConsumeIntInRange(0, 2)):
            mutate_obj(fdp, index, ["weight_map", "metadata"])
        files["model.safetensors.index.json"] = to_json(index).encode("utf-8", "surrogatepass")
        for s, part in parts.items():
            if s in SHARD_NAMES[:3] or s in ("x" * 300, "caf\u00e9.safetensors", "a\nb.safetensors", "model"):
                files[s] = tm.st_file(part)
        log.append(f"shards {s1!r} {s2!r}")
    else:
        files["model.safetensors"] = tm.st_util.pack(header, data)
    if fdp.ConsumeBool():
        tk = copy.deepcopy(TOK_TEMPLATE)
        for _ in range(fdp.ConsumeIntInRange(0, 3)):
            which = fdp.ConsumeIntInRange(0, 4)
            if not (isinstance(tk.get("model"), dict) and isinstance(tk["model"].get("vocab"), dict)
                    and isinstance(tk["model"].get("merges"), list)):
                which = 3  # an earlier mutation replaced the model: only whole-object edits from here
            if which == 0:
                mutate_obj(fdp, tk["model"], ["vocab", "merges", "type", "unk_token", "byte_fallback", "dropout"])
            elif which == 1:
                mutate_obj(fdp, tk["model"]["vocab"], STRINGS)
            elif which == 2:
                mutate_obj(fdp, tk["model"]["merges"], ["x"])
            elif which == 3:
                mutate_obj(fdp, tk, ["added_tokens", "pre_tokenizer", "decoder", "normalizer", "post_processor",
                                     "model", "truncation", "padding"])
            else:
                tk["model"]["vocab"][fdp.PickValueInList(STRINGS)] = fdp.PickValueInList(INTS[:20])
        files["tokenizer.json"] = to_json(tk).encode("utf-8", "surrogatepass")
        if fdp.ConsumeBool():
            tc = copy.deepcopy(TOKCFG_TEMPLATE)
            for _ in range(fdp.ConsumeIntInRange(0, 2)):
                mutate_obj(fdp, tc, ["bos_token", "eos_token", "pad_token", "chat_template", "model_max_length",
                                     "padding_side"])
            files["tokenizer_config.json"] = to_json(tc).encode("utf-8", "surrogatepass")
    if fdp.ConsumeIntInRange(0, 3) == 0:
        name = fdp.PickValueInList(sorted(files))
        files[name] = mutate_bytes(fdp, files[name])
        log.append(f"bytes of {name}")
    for name, b in files.items():
        write_in(d, name, b)
    special_files(fdp, root, d, log)
    log.append(f"config {to_json(cfg)[:600]}")
    return d


def write_in(d, name, b):
    """Write `name` inside the model directory only (names that leave it are not created here)."""
    if not name or name in (".", "..") or name.startswith("/") or ".." in name.split("/") or "\0" in name:
        return
    p = os.path.join(d, name)
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(b)
    except OSError:
        pass


def special_files(fdp, root, d, log):
    """Now and then: a symlink to a file outside, or a FIFO, where a checkpoint file is expected."""
    k = fdp.ConsumeIntInRange(0, 15)
    if k > 1:
        return
    name = fdp.PickValueInList(["model.safetensors", "config.json", "tokenizer.json", "model.gguf",
                                "link.safetensors", "fifo.safetensors", "model-00001-of-00002.safetensors"])
    p = os.path.join(d, name)
    if os.path.lexists(p):
        os.unlink(p)
    if k == 0:
        os.symlink(fdp.PickValueInList([os.path.join(root, "outside.safetensors"), "../outside.safetensors",
                                        os.path.join(root, "secret.txt"), "/etc/passwd"]), p)
        log.append(f"symlink {name}")
    else:
        os.mkfifo(p)
        log.append(f"fifo {name}")


def build_gguf(fdp, root, d, log):
    w = copy.deepcopy(fdp.PickValueInList(GG_TEMPLATES))
    arch = next(v for k, vt, v, at in w.kvs if k == "general.architecture")
    overrides = {}
    for _ in range(fdp.ConsumeIntInRange(0, 4)):
        k = fdp.ConsumeIntInRange(0, 9)
        if k <= 2:  # a metadata value: another value of the same or another type
            key = fdp.PickValueInList([f"{arch}.{s}" for s in GGUF_SUFFIXES] + GGUF_KEYS)
            w.kvs = [kv for kv in w.kvs if kv[0] != key]
            vt = fdp.PickValueInList([T.UINT32, T.INT32, T.UINT64, T.INT64, T.FLOAT32, T.FLOAT64, T.STRING,
                                      T.BOOL, T.UINT8, T.INT8, T.ARRAY])
            v = weird_value(fdp)
            try:
                if vt == T.STRING:
                    w.add(key, str(v).encode("utf-8", "surrogatepass"), T.STRING)
                elif vt == T.ARRAY:
                    w.add(key, [fdp.PickValueInList(INTS[:24]) for _ in range(fdp.ConsumeIntInRange(0, 4))],
                          T.ARRAY, fdp.PickValueInList([T.INT32, T.UINT64, T.FLOAT32]))
                elif vt in (T.FLOAT32, T.FLOAT64):
                    w.add(key, float(v) if isinstance(v, (int, float)) and not isinstance(v, bool)
                          and abs(v) < 1e300 else fdp.PickValueInList(FLOATS), vt)
                else:
                    iv = int(v) if isinstance(v, (int, float)) and math.isfinite(v) else fdp.PickValueInList(INTS)
                    bits = {T.UINT32: 32, T.INT32: 32, T.UINT64: 64, T.INT64: 64, T.BOOL: 1, T.UINT8: 8, T.INT8: 8}[vt]
                    signed = vt in (T.INT32, T.INT64, T.INT8)
                    iv %= 2**bits
                    if signed and iv >= 2**(bits - 1):
                        iv -= 2**bits
                    w.add(key, bool(iv) if vt == T.BOOL else iv, vt)
            except (OverflowError, ValueError, TypeError):
                pass
            log.append(f"kv {key} type {vt}")
        elif k == 3:  # delete a key
            if w.kvs:
                del w.kvs[fdp.ConsumeIntInRange(0, len(w.kvs) - 1)]
        elif k == 4:  # vocabulary
            toks = next((v for key, vt, v, at in w.kvs if key == "tokenizer.ggml.tokens" and vt == T.ARRAY
                         and isinstance(v, list)), None)
            if toks is not None:
                toks = list(toks)
                j = fdp.ConsumeIntInRange(0, 5)
                if j == 0 and toks:
                    toks[fdp.ConsumeIntInRange(0, len(toks) - 1)] = fdp.PickValueInList(toks)  # duplicate
                elif j == 1:
                    toks.append("a" * fdp.PickValueInList([100, 1000, 5000, 20000, 200000]))  # one very long token
                elif j == 2 and toks:
                    toks[fdp.ConsumeIntInRange(0, len(toks) - 1)] = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 8))
                elif j == 3:
                    toks = toks[:fdp.ConsumeIntInRange(0, len(toks))]
                elif j == 4:
                    toks += [fdp.PickValueInList(STRINGS) for _ in range(fdp.ConsumeIntInRange(1, 4))]
                else:
                    toks = [""] * len(toks)
                w.kvs = [(key, vt, toks if key == "tokenizer.ggml.tokens" else v, at) for key, vt, v, at in w.kvs]
                log.append(f"tokens ({len(toks)})")
        elif k == 5:  # merges / scores / token types
            key = fdp.PickValueInList(["tokenizer.ggml.merges", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"])
            w.kvs = [kv for kv in w.kvs if kv[0] != key]
            if key == "tokenizer.ggml.merges":
                w.add(key, [fdp.PickValueInList(STRINGS) for _ in range(fdp.ConsumeIntInRange(0, 5))] or [], T.ARRAY, T.STRING)
            elif key == "tokenizer.ggml.scores":
                w.add(key, [fdp.PickValueInList(FLOATS) for _ in range(fdp.ConsumeIntInRange(0, 30))], T.ARRAY, T.FLOAT32)
            else:
                w.add(key, [fdp.ConsumeIntInRange(-3, 9) for _ in range(fdp.ConsumeIntInRange(0, 30))], T.ARRAY, T.INT32)
            log.append(f"replaced {key}")
        elif k <= 7 and w.tensors:  # a tensor's shape / type / offset / name
            t = w.tensors[fdp.ConsumeIntInRange(0, len(w.tensors) - 1)]
            j = fdp.ConsumeIntInRange(0, 4)
            if j == 0:
                t.ne = [fdp.PickValueInList([0, 1, 2, 16, 24, 32, 64, 2**16, 2**32, 2**40, 2**61])
                        for _ in range(fdp.ConsumeIntInRange(0, 5))]
            elif j == 1:
                t.ne = [0] + [fdp.PickValueInList([2**20, 2**32, 2**40, 2**58]) for _ in range(fdp.ConsumeIntInRange(1, 3))]
            elif j == 2:
                t.type_id = fdp.PickValueInList([0, 1, 2, 3, 6, 7, 8, 9, 10, 12, 14, 16, 20, 24, 28, 30, 39, 41, 42, 99])
            elif j == 3:
                t.offset = fdp.PickValueInList([0, 32, 64, 2**32, 2**63])
                t.place = t.offset < 2**20  # far offsets: declared only (the writer would fill the gap)
            else:
                t.name = fdp.PickValueInList(["token_embd.weight", "output.weight", "blk.0.attn_q.weight", "", "x"])
            log.append(f"tensor {t.name} ne={t.ne} type={t.type_id}")
        elif k == 8 and w.tensors:
            del w.tensors[fdp.ConsumeIntInRange(0, len(w.tensors) - 1)]
        else:
            overrides = fdp.PickValueInList([{"version": 2}, {"n_kv": len(w.kvs) + 1}, {"n_tensors": 2**40},
                                             {"data_size": 0}, {"pad_data": False}, {}])
    try:
        b = w.to_bytes(**overrides)
    except (ValueError, TypeError, OverflowError, struct.error, KeyError, MemoryError):
        b = copy.deepcopy(GG_TEMPLATES[0]).to_bytes()
    if fdp.ConsumeIntInRange(0, 2) == 0:
        b = mutate_bytes(fdp, b)
        log.append("bytes")
    name = fdp.PickValueInList(["model.gguf", "model.gguf", "m.GGUF", "a.gguf"])
    write_in(d, name, b)
    if fdp.ConsumeIntInRange(0, 7) == 0:
        write_in(d, "second.gguf", b)  # two GGUF files in one directory
    special_files(fdp, root, d, log)
    return os.path.join(d, name) if fdp.ConsumeBool() else d


def fix_zip_crcs(b: bytes) -> bytes:
    """`b` with the CRC-32 that the central directory gives each stored zip entry (the one torchbin checks;
    torch.save leaves the local headers' at 0) recomputed from the entry's bytes, as far as the directory
    can be followed; the rest as it is. Never raises on any input."""
    b = bytearray(b)
    at = b.rfind(b"PK\x05\x06")
    if at < 0 or at + 22 > len(b):
        return bytes(b)
    n, _, p = struct.unpack_from("<HII", b, at + 10)  # entries, directory size, directory offset
    for _ in range(n):
        if p + 46 > len(b) or b[p:p + 4] != b"PK\x01\x02":
            break
        method, = struct.unpack_from("<H", b, p + 10)
        csize, = struct.unpack_from("<I", b, p + 20)
        nlen, elen, clen = struct.unpack_from("<HHH", b, p + 28)
        hdr, = struct.unpack_from("<I", b, p + 42)
        if method == 0 and hdr + 30 <= len(b) and b[hdr:hdr + 4] == b"PK\x03\x04":
            lnlen, lelen = struct.unpack_from("<HH", b, hdr + 26)
            start = hdr + 30 + lnlen + lelen
            if start + csize <= len(b):
                struct.pack_into("<I", b, p + 16, zlib.crc32(b[start:start + csize]))
        p += 46 + nlen + elen + clen
    return bytes(b)


def build_bin_dir(data, d, log):
    """The input as pytorch_model.bin (CRCs fixed) beside the qwen2_bin fixture's config files."""
    for name, b in BIN_FILES.items():
        write_in(d, name, b)
    fixed = fix_zip_crcs(data)
    write_in(d, "pytorch_model.bin", fixed)
    log.append(f"pytorch_model.bin: {len(data)} bytes{'' if fixed == data else ', CRCs recomputed'}")
    return d


def run_bin(path, root):
    """fastload.torchbin.open_file on the .bin; when it accepts the file, every tensor must read back."""
    try:
        f = fastload.torchbin.open_file(os.path.join(path, "pytorch_model.bin"))
    except BaseException as e:  # noqa: BLE001
        if isinstance(e, (KeyboardInterrupt, SystemExit, Hang, Finding)) or not allowed(e, root):
            raise
        return
    with f:
        for name in f.keys():
            np.asarray(f.get(name)).tobytes()  # every byte touched: a range past the file would fault


# ------------------------------------------------------------------------------------------------
# the property
# ------------------------------------------------------------------------------------------------
def allowed(e, root):
    """True if `e` is an acceptable way for a load of a bad checkpoint to fail."""
    msg = str(e)
    if CANARY in msg or "root:x:0:0" in msg:
        raise Finding(f"an error message shows the contents of a file outside the checkpoint: {msg[:300]!r}") from e
    if isinstance(e, MemoryError):
        return False
    if isinstance(e, (fastload.CheckpointError, NotImplementedError)):
        return True
    if isinstance(e, OSError):
        if e.errno == errno.EINTR or "Interrupted system call" in msg:
            # libFuzzer's periodic SIGALRM (or the triage timer) interrupted a blocking call: the load
            # was stuck, e.g. opening a FIFO. A hang, not a clean failure.
            raise Finding(f"the load blocked in a system call until a signal interrupted it: {msg[:300]}") from e
        return root in msg or (e.filename is not None and root in str(e.filename))
    return False


def escaped(path, root, what):
    """Did the loaded checkpoint come through a link or shard name leaving the model directory?
    what: "model" (config.json, weights, index, shards), "tokenizer" (tokenizer files, GGUF), "config"
    (config.json or GGUF) or "generation config" (generation_config.json or GGUF)."""
    d = path if os.path.isdir(path) else os.path.dirname(path)
    names = os.listdir(d)
    ggufs = {n for n in names if n.endswith(".gguf")}
    idx = os.path.join(d, "model.safetensors.index.json")
    if not os.path.isdir(path):
        used = {os.path.basename(path)}
    elif what == "tokenizer":
        used = ({"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
                if os.path.lexists(os.path.join(d, "tokenizer.json")) else ggufs)
    elif what in ("config", "generation config"):
        name = "config.json" if what == "config" else "generation_config.json"
        used = {name} if os.path.lexists(os.path.join(d, name)) else ggufs
    elif os.path.lexists(idx):
        used = {"config.json", "model.safetensors.index.json"}
        try:
            with open(idx, "rb") as f:
                wm = json.loads(f.read()).get("weight_map", {})
            for s in set(wm.values()) if isinstance(wm, dict) else ():
                if isinstance(s, str) and (s.startswith("/") or ".." in s.split("/")):
                    return f"shard name {s!r} leaves the model directory"
                if isinstance(s, str):
                    used.add(s)
        except Exception:  # noqa: BLE001 - the loader accepted it; the harness only looks
            pass
    elif os.path.lexists(os.path.join(d, "model.safetensors")):
        used = {"config.json", "model.safetensors"}
    else:
        used = ggufs
    for name in sorted(used):
        p = os.path.join(d, name)
        if os.path.islink(p):
            target = os.path.realpath(p)
            if not target.startswith(os.path.realpath(d) + os.sep):
                return f"symlink {name} -> {target}"
    return None


# issue 7's shared limits (notes/common.md): a checkpoint that loads must have its values inside them
LIMITS = {"num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024), "num_key_value_heads": (1, 1024),
          "head_dim": (2, 1024), "hidden_size": (1, 131072), "intermediate_size": (1, 1048576),
          "vocab_size": (1, 2**24), "max_position_embeddings": (0, 2**31 - 1), "sliding_window": (0, 2**31 - 1)}


def check_accepted_config(path):
    """After a successful load of a safetensors directory: config.json's numbers within the limits."""
    p = os.path.join(path, "config.json") if os.path.isdir(path) else None
    if not p or not os.path.isfile(p) or path.endswith(".gguf"):
        return
    try:
        with open(p, "rb") as f:
            cfg = json.loads(f.read())
    except Exception:  # noqa: BLE001 - the loader read it its own way; nothing to compare
        return
    if not isinstance(cfg, dict):
        return

    def num(v):  # a finite number (an int of any size: math.isfinite would overflow converting it)
        return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)

    bad = []
    for k, (lo, hi) in LIMITS.items():
        v = cfg.get(k)
        if isinstance(v, float) and not math.isfinite(v) or num(v) and not lo <= v <= hi:
            bad.append(f"{k}={v!r} outside [{lo}, {hi}]")
    hd = cfg.get("head_dim")
    if num(hd) and hd % 2:
        bad.append(f"head_dim={hd!r} is odd")
    h, kv = cfg.get("num_attention_heads"), cfg.get("num_key_value_heads")
    if num(h) and num(kv) and kv and (kv > h or h % kv):
        bad.append(f"num_key_value_heads={kv!r} does not divide num_attention_heads={h!r}")
    eps = cfg.get("rms_norm_eps")
    if (num(eps) or isinstance(eps, float)) and not (num(eps) and 0 < eps < 1):
        bad.append(f"rms_norm_eps={eps!r} outside (0, 1)")
    theta = cfg.get("rope_theta")
    if (num(theta) or isinstance(theta, float)) and not (num(theta) and theta > 0):
        bad.append(f"rope_theta={theta!r} is not finite > 0")
    if bad:
        raise Finding(f"the model loaded with config values outside issue 7's limits: {'; '.join(bad)}")


def run_one(path, root):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="float32")
        except BaseException as e:  # noqa: BLE001 - PanicException is a BaseException
            if isinstance(e, (KeyboardInterrupt, SystemExit, Hang, Finding)) or not allowed(e, root):
                raise
        else:
            why = escaped(path, root, "model")
            if why:
                raise Finding(f"the model loaded although {why}")
            check_accepted_config(path)
            v = int(model.config.get("vocab_size") or 0)
            if v >= 3:
                model(np.array([[1, 2]], dtype=np.int64))
            del model
        try:
            tok = fastload.AutoTokenizer.from_pretrained(path)
        except BaseException as e:  # noqa: BLE001
            if isinstance(e, (KeyboardInterrupt, SystemExit, Hang, Finding)) or not allowed(e, root):
                raise
        else:
            why = escaped(path, root, "tokenizer")
            if why:
                raise Finding(f"the tokenizer loaded although {why}")
            ids = tok("hello abc\n!")["input_ids"]
            tok.decode(ids)
        # the config readers issue 8 added: AutoConfig (config.json or GGUF metadata) and
        # GenerationConfig.from_pretrained (generation_config.json or GGUF metadata)
        for what, read in (("config", fastload.AutoConfig.from_pretrained),
                           ("generation config", fastload.GenerationConfig.from_pretrained)):
            try:
                read(path)
            except BaseException as e:  # noqa: BLE001
                if isinstance(e, (KeyboardInterrupt, SystemExit, Hang, Finding)) or not allowed(e, root):
                    raise
            else:
                why = escaped(path, root, what)
                if why:
                    raise Finding(f"the {what} was read although {why}")


# ------------------------------------------------------------------------------------------------
_ROOT = None


def setup_root():
    if DUMP:  # kept after the run: the dumped checkpoint's symlinks point into it
        root = os.path.abspath(DUMP) + ".root"
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root)
    else:
        # fuzz/run.sh passes FL_FUZZ_TMP (a directory it removes: libFuzzer's timed exit skips atexit)
        base = os.environ.get("FL_FUZZ_TMP") or (
            "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None)
        root = tempfile.mkdtemp(prefix="fl-fuzz-", dir=base)
        atexit.register(shutil.rmtree, root, True)  # a run ended by Python (triage, -runs=N) cleans up itself
    cfg, tensors = ST_TEMPLATES[0]
    with open(os.path.join(root, "outside.safetensors"), "wb") as f:
        f.write(tm.st_file(tensors))
    with open(os.path.join(root, "secret.txt"), "w") as f:
        f.write(CANARY + "\n" * 20)
    return root


def dump(d, out):
    """Copy the built checkpoint to `out` as it is (symlinks as symlinks, FIFOs as FIFOs)."""
    shutil.rmtree(out, ignore_errors=True)
    for dirpath, dirnames, filenames in os.walk(d):
        rel = os.path.relpath(dirpath, d)
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for n in filenames + [x for x in dirnames if os.path.islink(os.path.join(dirpath, x))]:
            src, dst = os.path.join(dirpath, n), os.path.join(out, rel, n)
            st = os.lstat(src)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(src), dst)
            elif stat.S_ISFIFO(st.st_mode):
                os.mkfifo(dst)
            else:
                shutil.copyfile(src, dst)


def signature(e):
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if "/fastload/" in f.filename] or frames[-1:]
    where = f"{os.path.basename(mine[-1].filename)}:{mine[-1].lineno}" if mine else "?"
    return f"{type(e).__name__}@{where}"


BUILD_SKIPS = {}  # signature -> inputs skipped because the harness could not build a checkpoint from them


def build_skipped(e, data, log):
    """A builder failed on its own account (a combination of mutations it cannot write). The builders
    only use numpy, json, struct and the test writers (fuzz/tiny_models.py, tests/*_util.py), never
    fastload, so nothing caught here can be a finding about the library: the input is skipped and
    counted (stderr at the 1st, 10th, 100th, ... skip of each kind; in triage mode also recorded as
    DIR/HarnessBuild@<where>-<hash>.input / .txt, to be fixed in the builder)."""
    frames = traceback.extract_tb(e.__traceback__)
    where = f"{os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else "?"
    sig = f"HarnessBuild@{type(e).__name__}@{where}"
    n = BUILD_SKIPS[sig] = BUILD_SKIPS.get(sig, 0) + 1
    if math.log10(n).is_integer():
        print(f"\nfuzz_python: skipped an input the harness could not build ({n}x {sig}: {str(e)[:200]}); "
              f"{sum(BUILD_SKIPS.values())} skipped in all", file=sys.stderr, flush=True)
    if COLLECT and n == 1:
        os.makedirs(COLLECT, exist_ok=True)
        out = os.path.join(COLLECT, f"{sig.replace('/', '_').replace(':', '_')}-"
                                    f"{hashlib.sha1(sig.encode()).hexdigest()[:10]}")
        with open(out + ".input", "wb") as f:
            f.write(data)
        with open(out + ".txt", "w", encoding="utf-8", errors="backslashreplace") as f:
            f.write(f"{sig}\n\n" + "".join(traceback.format_exception(e)) + "\nbuilt:\n" + "\n".join(log) + "\n")


def run_input(path, root, torch_bin):
    if torch_bin:
        run_bin(path, root)
    run_one(path, root)


def TestOneInput(data: bytes):
    global _ROOT
    if _ROOT is None:
        _ROOT = setup_root()
    root = _ROOT
    d = os.path.join(root, "model")
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    fdp = atheris.FuzzedDataProvider(data)
    log = []
    torch_bin = data.startswith(BIN_MAGIC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # numpy's overflow warnings from the test writers
        try:
            if torch_bin:
                path = build_bin_dir(data, d, log)
            else:
                path = (build_gguf(fdp, root, d, log) if fdp.ConsumeIntInRange(0, 2) == 0
                        else build_st_dir(fdp, root, d, log))
        except Exception as e:  # noqa: BLE001 - see build_skipped: the builders never call fastload
            build_skipped(e, data, log)
            return
    if DESCRIBE:
        print("\n".join(log), file=sys.stderr)
        print("files:", sorted(os.listdir(d)), "path:", path, file=sys.stderr)
    if DUMP:
        dump(d, DUMP)
        print(f"checkpoint written to {DUMP} (load: {os.path.join(DUMP, os.path.relpath(path, d))})", file=sys.stderr)
    if not COLLECT:
        run_input(path, root, torch_bin)
        return
    if HANG_S > 0:
        signal.setitimer(signal.ITIMER_REAL, HANG_S)
    try:
        run_input(path, root, torch_bin)
    except BaseException as e:  # noqa: BLE001 - triage mode records and goes on
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        sig = signature(e) if not isinstance(e, Hang) else "Hang@" + signature(e).split("@", 1)[1]
        h = hashlib.sha1(sig.encode()).hexdigest()[:10]
        os.makedirs(COLLECT, exist_ok=True)
        out = os.path.join(COLLECT, f"{sig.replace('/', '_').replace(':', '_')}-{h}")
        if not os.path.exists(out + ".input"):
            with open(out + ".input", "wb") as f:
                f.write(data)
            with open(out + ".txt", "w", encoding="utf-8", errors="backslashreplace") as f:
                f.write(f"{sig}\n{type(e).__module__}.{type(e).__name__}: {str(e)[:2000]}\n\n")
                f.write("".join(traceback.format_exception(e)))
                f.write("\nbuilt:\n" + "\n".join(log) + "\n")
            print(f"\nFINDING {sig}: {str(e)[:200]}", file=sys.stderr, flush=True)
    finally:
        if HANG_S > 0:
            signal.setitimer(signal.ITIMER_REAL, 0)


def _alarm(signum, frame):
    raise Hang(f"no result after {HANG_S} s")


def main():
    mb = int(os.environ.get("FUZZ_PY_AS_MB", "2048"))
    if mb > 0:
        resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))
    if COLLECT and HANG_S > 0:
        signal.signal(signal.SIGALRM, _alarm)
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
