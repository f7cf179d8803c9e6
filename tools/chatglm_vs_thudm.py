"""Check fastload's ChatGLM2 / ChatGLM3 forward once against THUDM's published modelling code, on the GPU.

THUDM's code never enters the repository and fastload never runs it; this script (not part of the test suite) is
the one place it runs, to compare logits. Carry THUDM's two files to the GPU machine (no download there):

    modeling_chatglm.py, configuration_chatglm.py   from https://huggingface.co/THUDM/chatglm3-6b (tree main)
                                                      or https://huggingface.co/THUDM/chatglm2-6b (tree main)

    python tools/chatglm_vs_thudm.py --thudm DIR_WITH_THE_TWO_FILES [--model tests/fixtures/chatglm/chatglm3_st]

It builds THUDM's ChatGLMForConditionalGeneration from the checkpoint's config.json, loads the tiny fixture's
weights (tests/fixtures/chatglm/chatglm2_st or chatglm3, or any ChatGLM directory with model.safetensors), and
compares the logits of a few prompts with fastload's, in float32 (tolerance 1e-4) and in float16 / bfloat16 (where
both round the rope cache to the model dtype; tolerance a few units of the dtype's resolution times |logits|).
Needs torch, transformers (any version THUDM's code imports under), safetensors, numpy, and a CUDA GPU.
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


def thudm_model(thudm_dir, model_dir, dtype):
    import torch
    from safetensors.numpy import load_file
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
    cfg.torch_dtype = dtype
    model = mod.ChatGLMForConditionalGeneration(cfg, empty_init=False)
    sd = {k: torch.from_numpy(v) for k, v in load_file(str(pathlib.Path(model_dir) / "model.safetensors")).items()
          if not k.endswith("inv_freq")}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    assert not missing and not unexpected, (missing, unexpected)
    return model.to(dtype).cuda().eval()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thudm", required=True, help="directory holding modeling_chatglm.py and configuration_chatglm.py")
    ap.add_argument("--model", default=str(ROOT / "tests/fixtures/chatglm/chatglm3"))
    args = ap.parse_args()
    import torch
    import fastload
    cfg = json.loads((pathlib.Path(args.model) / "config.json").read_text())
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg["padded_vocab_size"] - 16, n).tolist() for n in (1, 7, 40)]
    ok = True
    for dt, tol in (("float32", 1e-4), ("float16", 2e-2), ("bfloat16", 1.5e-1)):
        tdt = getattr(torch, dt)
        ref = thudm_model(args.thudm, args.model, tdt)
        ours = fastload.AutoModel.from_pretrained(args.model, trust_remote_code=True, device="cuda", torch_dtype=dt)
        for p in prompts:
            with torch.no_grad():
                want = ref(torch.tensor([p]).cuda()).logits[0].float().cpu().numpy()
            got = np.asarray(ours(np.array([p])).logits, np.float32)[0]
            err = float(np.abs(got - want).max())
            scale = float(np.abs(want).max())
            same = bool((got.argmax(-1) == want.argmax(-1)).mean() >= 0.95)
            good = err <= tol * max(1.0, scale) and np.isfinite(got).all()
            ok &= good
            print(f"{dt:9s} T={len(p):3d}  max|diff|={err:.3g}  max|logit|={scale:.3g}  argmax agree={same}  "
                  f"{'ok' if good else 'FAIL'}")
        del ours, ref
        torch.cuda.empty_cache()
    print("all ok" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
