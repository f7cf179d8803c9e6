"""fastload.from_hf: a fastload model from a transformers model already in memory (FastLLM's `llm.from_hf`).

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda")
    model = fastload.from_hf(hf, tokenizer=tok)             # same device, same dtype
    model = fastload.from_hf(hf, dtype="int8")              # FastLLM's spelling: quantised at load

Copy or no copy. The core holds every weight in one arena per model (csrc/model.c `arena_alloc`) with q / k / v
fused into one matrix (wqkv) and gate / up into another (w_gate_up), so the matmuls of a layer read one contiguous
weight; transformers keeps them as separate tensors. Referencing torch's storage without a copy would need the
core to keep per-slot external pointers and give up the fused layout (three launches instead of one per layer,
and a torch tensor the user may change or free under it). So from_hf copies, once, straight from torch's memory
into the arena, without going through files or an intermediate host copy:
  - CPU tensors: the core reads them in place (data_ptr) and converts / quantises into the arena (a memcpy when
    the dtype matches); bfloat16 needs no numpy (and no DLPack): the core reads the bits itself.
  - CUDA tensors on the model's own device: a device-to-device conversion on the GPU (csrc/cuda/convert.cu; a
    plain copy at HBM speed when the dtype matches, ~0.1 s for 7B on an H200), or quantisation from device memory.
  - CUDA tensors for a CPU fastload model, or on another GPU: copied to the host (.cpu()) first.
The torch model is untouched and stays usable; the fastload model is independent of it afterwards (free the torch
model to get its memory back).

Supported: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM (the architectures fastload
runs), float32 / float16 / bfloat16 / float64 weights; a model quantised by bitsandbytes / GPTQ / AWQ inside
transformers is refused (its tensors are not float weights).
"""
from __future__ import annotations

import os
import tempfile
import time

from . import _C
from . import arch as archmod
from . import checks
from . import config as cfgmod
from . import engine as enginemod
from . import quant as quantmod

TORCH_DTYPES = {"torch.float32": "F32", "torch.float16": "F16", "torch.bfloat16": "BF16", "torch.float64": "F64"}
DTYPE_NAMES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float32"}


def _is_torch_module(m) -> bool:
    return callable(getattr(m, "state_dict", None)) and hasattr(m, "config") and callable(getattr(m, "parameters", None))


def _device_of(model):
    devs = {str(p.device) for p in model.parameters()}
    if len(devs) != 1:
        raise NotImplementedError(f"from_hf: the model's parameters are on several devices {sorted(devs)} "
                                  "(device_map spread it); fastload runs one model on one device")
    d = devs.pop()
    if d == "cpu" or d.startswith("cuda"):
        return "cuda:0" if d == "cuda" else d
    raise NotImplementedError(f"from_hf: parameters on device {d!r}; cpu or cuda only")


def _tokenizer_for(model, tokenizer):
    """fastload's tokenizer for what the caller gave: a fastload tokenizer as is; a transformers tokenizer through
    its own files (its name_or_path, or saved to a temporary directory when it has none); None: the model's
    name_or_path if it holds a tokenizer, else None."""
    from .tokenizer import AutoTokenizer, FastTokenizer
    if tokenizer is None:
        ref = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
        if not ref:
            return None
        try:
            return AutoTokenizer.from_pretrained(ref, local_files_only=True)
        except Exception:  # no tokenizer there: the model still works with ids
            return None
    if isinstance(tokenizer, FastTokenizer):
        return tokenizer
    if isinstance(tokenizer, (str, os.PathLike)):
        return AutoTokenizer.from_pretrained(tokenizer)
    if callable(getattr(tokenizer, "save_pretrained", None)):  # a transformers tokenizer: its own files
        ref = getattr(tokenizer, "name_or_path", None)
        if ref and os.path.isdir(ref):
            try:
                return AutoTokenizer.from_pretrained(ref)
            except Exception:
                pass
        with tempfile.TemporaryDirectory(prefix="fastload-tok-") as d:
            tokenizer.save_pretrained(d)
            return AutoTokenizer.from_pretrained(d)
    raise TypeError(f"from_hf: tokenizer must be a transformers or fastload tokenizer, a path, or None, not "
                    f"{type(tokenizer).__name__}")


def from_hf(model, tokenizer=None, dtype=None, device=None, threads=None, **engine_kwargs):
    """A fastload model from a loaded transformers causal LM (Llama / Mistral / Qwen2 / Qwen3).

    dtype: None / "auto" (the torch model's dtype), "float32" / "float16" / "bfloat16", or FastLLM's quantised
    names "int8" / "int4" / "nf4" (quantised at load, computing in the torch model's dtype). device: None (the
    torch model's device), "cpu" or "cuda:N". The returned model has model.tokenizer (see _tokenizer_for) and
    load_stats["from_hf"] = {"copied_bytes", "device_to_device", "host_to_host", "via_host"}."""
    from .modeling import Config, FastModelForCausalLM, GenerationConfig, _check_device, _context_bytes
    if not _is_torch_module(model):
        raise TypeError(f"from_hf: expected a transformers PreTrainedModel (a torch module with .config), not "
                        f"{type(model).__name__}")
    t0 = time.perf_counter()
    cls_name = type(model).__name__
    where = f"{cls_name} (from_hf)"
    hf = model.config.to_dict()
    if hf.get("quantization_config"):
        raise NotImplementedError(f"from_hf: {cls_name} is quantised inside transformers "
                                  f"({hf['quantization_config'].get('quant_method', '?')}); pass a float model "
                                  "(fastload quantises at load: dtype='int8' / 'int4' / 'nf4')")
    if not hf.get("architectures"):
        hf["architectures"] = [cls_name]
    checks.check_config(hf, where)
    hf = Config(hf)
    arch = archmod.arch_for(hf, where)
    core_cfg = archmod.core_config(hf, arch, where)

    src_dev = _device_of(model)
    dev = cfgmod.normalize_device(None, device) if device is not None else src_dev
    _check_device(dev, f"device={device if device is not None else src_dev!r}", "pass device='cpu'")
    sd = model.state_dict()
    quant = None
    model_dt = None
    for t in sd.values():
        if str(t.dtype) in TORCH_DTYPES:
            model_dt = DTYPE_NAMES[TORCH_DTYPES[str(t.dtype)]]
            break
    if isinstance(dtype, str) and dtype.lower() in quantmod.SCHEMES:
        quant = quantmod.request(dtype.lower(), env=False)
        want = model_dt or "float32"
    elif dtype is None or dtype == "auto":
        want = model_dt or "float32"
    else:
        want = cfgmod.normalize_dtype(dtype, "dtype")
        if want == "auto":
            want = model_dt or "float32"
    qcore = quantmod.reconcile(quant, None, where) if quant is not None else None

    glob_names = archmod.HF_NAMES[arch.names][0]
    emb, head = sd.get(glob_names["embed_tokens"]), sd.get(glob_names["lm_head"])
    if core_cfg["tie_embeddings"] and emb is not None and head is not None and emb.data_ptr() != head.data_ptr() and \
            not (emb.shape == head.shape and emb.dtype == head.dtype and bool((emb == head).all())):
        # config says tied, but the module's LM head is another matrix (transformers 5 unties such a checkpoint):
        # copy the LM head the torch model computes with
        import warnings
        warnings.warn(f"{where}: config.tie_word_embeddings is true, but lm_head differs from the embedding: its own "
                      "LM head is copied (not tied), as the torch model computes with it", stacklevel=2)
        core_cfg["tie_embeddings"] = 0
        hf["tie_word_embeddings"] = False
    keep, items, stats = [], [], {"copied_bytes": 0, "device_to_device": 0, "host_to_host": 0, "via_host": 0}
    dev_index = int(dev.split(":")[1]) if dev.startswith("cuda") else None
    any_cuda = False
    for slot, layer, name, heads, expert in archmod.tensor_plan(arch, core_cfg, gguf=False, have=set(sd)):
        t = sd.get(name)
        if t is None:
            raise _C.CheckpointError(f"{where}: the model has no tensor '{name}' (needed by {arch.name})")
        t = t.detach()
        st = TORCH_DTYPES.get(str(t.dtype))
        if st is None:
            raise NotImplementedError(f"{where}: tensor '{name}' is {t.dtype}, not a float tensor")
        if t.is_cuda and (dev_index is None or t.device.index != dev_index):
            t = t.cpu()  # another device, or a CPU fastload model: through the host
            stats["via_host"] += 1
        if not t.is_contiguous():
            t = t.contiguous()
        on_dev = bool(t.is_cuda)
        any_cuda |= on_dev
        nbytes = t.numel() * t.element_size()
        stats["copied_bytes"] += nbytes
        stats["device_to_device" if on_dev else "host_to_host"] += 1
        keep.append(t)  # alive until core.load returns
        src = {"ptr": t.data_ptr(), "nbytes": nbytes, "dtype": st, "shape": tuple(t.shape), "device": on_dev,
               "label": where}
        item = (archmod.SLOT[slot], layer, heads, src, name)
        items.append(item + (None, None, expert) if slot in archmod.MOE_SLOTS else item)  # (packed, lora, expert)
    if any_cuda:
        import torch  # the caller's model is a torch model: torch is there
        torch.cuda.synchronize(dev_index)  # torch's kernels that wrote the weights, on its streams, are done
    nthreads = threads if threads is not None else cfgmod.cpu_threads()
    context = _context_bytes(dev)
    core = _C.Model(core_cfg, dtype=want, device=dev, threads=nthreads, **({"quant": qcore} if qcore else {}))
    lstats = FastModelForCausalLM._finish(core, items, 0, cls_name, False, None)
    del keep
    lstats["from_hf"] = stats
    gen = GenerationConfig()
    gc = getattr(model, "generation_config", None)
    for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
        v = getattr(gc, k, None) if gc is not None else None
        gen[k] = v if v is not None else hf.get(k)
    fm = FastModelForCausalLM(core, hf, arch, gen, dev, want, getattr(model, "name_or_path", "") or cls_name, lstats)
    fm._context_bytes = context
    fm._source = None  # .to() / .half() cannot reload: from_hf again from the torch model
    fm._set_quant(quant, None)
    fm._engine = enginemod.Engine(fm, enginemod.options(**engine_kwargs))
    fm.tokenizer = _tokenizer_for(model, tokenizer)
    if fm.tokenizer is not None:
        fm._tokenizer = fm.tokenizer  # what model.response / stream_response / chat use (FastModelForCausalLM._own_tokenizer)
    lstats["total_seconds"] = time.perf_counter() - t0
    return fm
