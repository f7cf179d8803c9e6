"""Check fastload's ChatGLM2 / ChatGLM3 forward once against THUDM's published modelling code, on the GPU.

THUDM's code never enters the repository and fastload never runs it; this script (not part of the test suite) is
where it runs, to compare logits (benchmarks/chatglm_gpu.py builds it with thudm_model below, as its speed peer).
Carry THUDM's two files to the GPU machine (no download there):

    modeling_chatglm.py, configuration_chatglm.py   from https://huggingface.co/THUDM/chatglm3-6b (tree main)
                                                      or https://huggingface.co/THUDM/chatglm2-6b (tree main)

    python tools/chatglm_vs_thudm.py --thudm DIR_WITH_THE_TWO_FILES [--model tests/fixtures/chatglm/chatglm3_st]

It builds THUDM's ChatGLMForConditionalGeneration from the checkpoint's config.json, loads the tiny fixture's
weights (tests/fixtures/chatglm/chatglm2_st or chatglm3, or any ChatGLM directory: safetensors or .bin shards), and
compares the logits of a few prompts with fastload's, in float32 (tolerance 1e-4) and in float16 / bfloat16 (where
both round the rope cache to the model dtype; tolerance a few units of the dtype's resolution times |logits|).
Needs torch, transformers (any version THUDM's code imports under; with 5.x the config attributes it no longer
defines are set to 4.x's defaults), safetensors, numpy, and a CUDA GPU (--device cpu checks the script without one).
"""
import argparse
import importlib
import json
import os
import pathlib
import shutil
import sys
import tempfile

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def thudm_model(thudm_dir, model_dir, dtype, device="cuda"):
    """THUDM's ChatGLMForConditionalGeneration built from model_dir's config.json, holding its weights (safetensors,
    one file or shards, else pytorch_model*.bin), in `dtype` (a torch dtype or its name) on `device`. Also used by
    benchmarks/chatglm_gpu.py (its peer)."""
    import torch
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    pkg = pathlib.Path(tempfile.mkdtemp()) / "thudm_chatglm"
    pkg.mkdir()
    for f in ("modeling_chatglm.py", "configuration_chatglm.py"):
        shutil.copy(os.path.join(thudm_dir, f), pkg / f)
    (pkg / "__init__.py").write_text("")
    sys.path.insert(0, str(pkg.parent))
    conf = importlib.import_module("thudm_chatglm.configuration_chatglm")
    mod = importlib.import_module("thudm_chatglm.modeling_chatglm")
    cfg_json = json.loads((pathlib.Path(model_dir) / "config.json").read_text())
    cfg = conf.ChatGLMConfig(**{k: v for k, v in cfg_json.items() if k not in ("auto_map", "architectures")})
    # transformers 5's PretrainedConfig no longer defines these (generation settings moved to GenerationConfig) and
    # THUDM's code reads them: transformers 4's defaults
    for k, v in dict(max_length=20, use_cache=True, output_hidden_states=False, output_attentions=False,
                     return_dict=True).items():
        if not hasattr(cfg, k):
            setattr(cfg, k, v)
    cfg.torch_dtype = dtype
    # parameters made on the device uninitialised (THUDM's empty_init), then every one filled from the files
    model = mod.ChatGLMForConditionalGeneration(cfg, empty_init=True, device=device).to(dtype)
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if files:
        from safetensors.torch import load_file
        parts = (load_file(os.path.join(model_dir, f), device=str(device)) for f in files)
    else:
        files = sorted(f for f in os.listdir(model_dir) if f.startswith("pytorch_model") and f.endswith(".bin"))
        parts = (torch.load(os.path.join(model_dir, f), map_location=device, weights_only=True) for f in files)
    missing = {k for k, _ in model.named_parameters()}
    unexpected = []
    for sd in parts:
        unexpected += model.load_state_dict(sd, strict=False).unexpected_keys
        missing -= set(sd)
        del sd
    if missing or unexpected or not files:
        raise RuntimeError(f"THUDM's model and {model_dir} differ: files {files[:2]}, missing {sorted(missing)[:4]}, "
                           f"unexpected {unexpected[:4]}")
    return model.eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thudm", required=True, help="directory holding modeling_chatglm.py and configuration_chatglm.py")
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/chatglm/chatglm3"))
    ap.add_argument("--device", default="cuda", help="cuda, or cpu to check this script without a GPU")
    args = ap.parse_args()
    import torch
    import fastload
    cfg = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg["padded_vocab_size"] - 16, n).tolist() for n in (1, 7, 40)]
    ok = True
    for dt, tol in (("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 1.5e-1)):
        tdt = getattr(torch, dt)
        ref = thudm_model(args.thudm, args.model, tdt, args.device)
        ours = fastload.AutoModel.from_pretrained(args.model, trust_remote_code=True, device=args.device,
                                                  torch_dtype=dt)
        for p in prompts:
            with torch.no_grad():
                want = ref(torch.tensor([p], device=args.device), return_dict=True).logits[0].float().cpu().numpy()
            got = np.asarray(ours(np.array([p])).logits, np.float32)[0]
            err = float(np.abs(got - want).max())
            scale = float(np.abs(want).max())
            same = bool((got.argmax(-1) == want.argmax(-1)).mean() >= 0.95)
            good = err <= tol * max(1.0, scale) and np.isfinite(got).all()
            ok &= good
            print(f"{dt:9s} T={len(p):3d}  max|diff|={err:.3g}  max|logit|={scale:.3g}  argmax agree={same}  "
                  f"{'ok' if good else 'FAIL'}")
        del ours, ref
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    print("all ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
