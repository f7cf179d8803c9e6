"""fastload: load Hugging Face language models at the speed of the hardware and generate with a
C/CUDA core, behind transformers' API.

    import fastload
    tok = fastload.AutoTokenizer.from_pretrained(path)
    model = fastload.AutoModelForCausalLM.from_pretrained(path, device_map="cpu", torch_dtype="float16")
    out = model.generate(**tok("Hello", return_tensors="np"), max_new_tokens=20)
"""
from ._cpucheck import check as _check_cpu

_check_cpu()  # before the C core loads: a build for another CPU is an ImportError, not an illegal instruction
from . import _C  # noqa: E402
from . import cuda
from . import evaluate
from .modeling import (AutoConfig, AutoModel, AutoModelForCausalLM, CausalLMOutput, Config, FastModelForCausalLM,
                       GenerationConfig, from_pretrained, set_seed)
from .from_hf import from_hf
from .pipelines import pipeline
from .quant import QuantConfig
from .streamers import TextIteratorStreamer, TextStreamer
from .tokenizer import AutoTokenizer, BatchEncoding, FastTokenizer

CheckpointError = _C.CheckpointError
EngineBusy = _C.EngineBusy
__version__ = "0.1.0"


def info() -> dict:
    """What this build of fastload can do here: version, backends, CPU features, CUDA devices, quantisation."""
    b = _C.build_info()
    out = {"version": __version__, "backends": ["cpu"] + (["cuda"] if b["cuda_compiled"] else []), **b}
    if not b["cuda_compiled"]:
        out["cuda"] = "not built (no nvcc at install time, or FASTLOAD_CUDA=0): CPU only"
    else:
        built = f"built for {', '.join(cuda._arch_names(b['cuda_archs']))}"
        out["cuda"] = (f"{built}, but no CUDA device is usable here ({b['cuda_error'] or 'no device'})"
                       if b["cuda_devices"] == 0 else f"{built}, {b['cuda_devices']} device(s)")
    try:  # the CPU features the C core was compiled to use (setup.py; fastload/_cpucheck.py checks them at import)
        from . import _build_cpu
        out["cpu_build_features"] = list(_build_cpu.FEATURES or ())
        out["cpu_build_flags"] = _build_cpu.FLAGS
    except ImportError:
        pass
    from . import quant
    out["quantization"] = {"at_load": list(quant.SCHEMES), "checkpoints": list(quant.SUPPORTED_CHECKPOINTS),
                           "gguf_kept_quantised": list(quant.GGUF_KEPT),
                           "gguf_dequantised": list(quant.GGUF_DEQUANTISED)}
    return out


__all__ = ["AutoModelForCausalLM", "AutoModel", "AutoConfig", "AutoTokenizer", "FastModelForCausalLM", "FastTokenizer", "from_pretrained",
           "GenerationConfig", "CausalLMOutput", "Config", "BatchEncoding", "TextStreamer", "TextIteratorStreamer",
           "CheckpointError", "EngineBusy", "info", "set_seed", "from_hf", "cuda", "evaluate", "pipeline", "QuantConfig", "__version__"]
