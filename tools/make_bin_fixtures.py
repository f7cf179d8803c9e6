#!/usr/bin/env python3
"""Write the PyTorch `.bin` test fixtures (tests/fixtures/torch_bin/) with torch.save itself.

The test suite (tests/test_torch_bin.py) reads them with numpy and fastload only; this script is
the one place torch is needed. Fixed seeds: two runs write byte-identical files except odd/legacy.bin
(the legacy format keys storages by object addresses). Total about 1.5 MB.

  llama_bin/   the tests/fixtures/llama checkpoint (bf16) re-saved as transformers saved .bin shards:
               pytorch_model-0000{1,2}-of-00002.bin + pytorch_model.bin.index.json (metadata.total_size,
               weight_map), config.json and generation_config.json copied. Its logits must equal those
               of the safetensors fixture.
  qwen2_bin/   a tiny random Qwen2ForCausalLM (fp32, q/k/v biases, tied embeddings), saved twice:
               pytorch_model.bin = torch.save(model.state_dict()) (lm_head.weight and embed_tokens.weight
               share one storage, the OrderedDict carries _metadata through BUILD), and
               reference.safetensors from save_pretrained (the test loads it as model.safetensors).
               Tiny (vocab 64, hidden 32) because the tests/fixtures/qwen2 checkpoint is fp32 and 2.4 MB.
  odd/         single-file cases:
    views.bin + views.npz   valid: tied names sharing a storage, fp16/bf16 views at storage offsets,
                            0-d, empty, size-1 dims with odd strides, an nn.Parameter, int64/int8/bool,
                            uint16 (written through _rebuild_tensor_v3 and UntypedStorage);
                            views.npz holds the expected values (bf16 as uint16 bits)
    p4.bin                  valid: torch.save(..., pickle_protocol=4) (FRAME, MEMOIZE, STACK_GLOBAL)
    noncontig.bin           a transposed view (refused: not contiguous)
    nested.bin              {'model': state_dict} (refused: nested)
    complex.bin             a complex64 tensor (refused: ComplexFloatStorage)
    compressed.bin          views.bin re-zipped with ZIP_DEFLATED (refused: compressed entry)
    legacy.bin              _use_new_zipfile_serialization=False (refused: legacy format, how to convert)

Usage (from the repository root; torch, transformers and safetensors installed):
    /opt/tv/bin/python tools/make_bin_fixtures.py --out tests/fixtures/torch_bin
Every written .bin that should load is also checked with torch.load(weights_only=True).
"""
from __future__ import annotations

import argparse
import json
import shutil
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parent.parent


def save_llama(out: Path):
    src = ROOT / "tests" / "fixtures" / "llama"
    d = out / "llama_bin"
    d.mkdir(parents=True, exist_ok=True)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    tensors = OrderedDict()
    for shard in sorted(set(index["weight_map"].values())):
        tensors.update(load_file(str(src / shard)))
    names = list(tensors)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    # two shards of about half the bytes each, in name order (transformers' shard_checkpoint fills in order)
    shards, cur, acc = [OrderedDict(), OrderedDict()], 0, 0
    for n in names:
        if cur == 0 and acc >= total / 2:
            cur = 1
        shards[cur][n] = tensors[n].clone()  # its own storage, as a module's state dict
        acc += tensors[n].numel() * tensors[n].element_size()
    weight_map = {}
    for i, sd in enumerate(shards):
        fname = f"pytorch_model-{i + 1:05d}-of-{len(shards):05d}.bin"
        torch.save(sd, d / fname)
        weight_map.update({n: fname for n in sd})
        back = torch.load(d / fname, weights_only=True)
        assert all(torch.equal(back[n], sd[n]) for n in sd)
    (d / "pytorch_model.bin.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n")
    for f in ("config.json", "generation_config.json"):
        shutil.copy(src / f, d / f)


def save_qwen2(out: Path):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    d = out / "qwen2_bin"
    d.mkdir(parents=True, exist_ok=True)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=True,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(1234)
    model = Qwen2ForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():  # weights set here (not by transformers' init): peaked logits, non-zero biases
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed" in n:
                p.copy_(torch.randn(p.shape, generator=g))
            elif n.endswith("bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    model.save_pretrained(d)  # model.safetensors (tied lm_head left out), config.json, generation_config.json
    (d / "model.safetensors").rename(d / "reference.safetensors")
    (d / "reference.safetensors").chmod(0o644)
    sd = model.state_dict()
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
    torch.save(sd, d / "pytorch_model.bin")
    back = torch.load(d / "pytorch_model.bin", weights_only=True)
    assert all(torch.equal(back[n], sd[n]) for n in sd)


def _np(t):
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def save_odd(out: Path):
    d = out / "odd"
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(7)
    half = torch.randn(6, 4, generator=g).half()
    bf = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    tied = torch.randn(5, 3, generator=g)
    col = torch.randn(4, 1, generator=g)
    sd = OrderedDict()
    sd["tied.a"] = tied
    sd["tied.b"] = tied                         # same tensor: one storage, two names
    sd["half.rows"] = half[2:5]                 # fp16 view at element offset 8
    sd["half.row"] = half[5]                    # fp16, 1-d, offset 20
    sd["bf16.row"] = bf[1]                      # bf16 at offset 8
    sd["scalar"] = torch.tensor(3.5)            # 0-d
    sd["empty"] = torch.zeros(0, 3)             # no elements
    sd["col"] = col                             # size-1 last dim
    sd["one_row"] = torch.randn(1, 5, generator=g).expand(1, 5)  # size-1 dim, stride 0 there
    sd["param"] = torch.nn.Parameter(torch.randn(3, generator=g))  # _rebuild_parameter
    sd["i64"] = torch.arange(-4, 4, dtype=torch.int64)
    sd["i8"] = torch.arange(-3, 3, dtype=torch.int8)
    sd["bool"] = torch.tensor([True, False, True])
    sd["u16"] = torch.arange(0, 60000, 12000, dtype=torch.int32).to(torch.uint16)  # _rebuild_tensor_v3
    torch.save(sd, d / "views.bin")
    back = torch.load(d / "views.bin", weights_only=True)
    assert all(torch.equal(back[n], sd[n]) for n in sd)
    np.savez(d / "views.npz", **{n: _np(t) for n, t in sd.items()})

    torch.save(OrderedDict(a=torch.arange(6, dtype=torch.float32).reshape(2, 3)), d / "p4.bin", pickle_protocol=4)
    torch.save({"t": torch.randn(3, 4, generator=g).t()}, d / "noncontig.bin")
    torch.save({"model": {"w": torch.ones(2)}}, d / "nested.bin")
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, d / "complex.bin")
    torch.save({"w": torch.ones(2)}, d / "legacy.bin", _use_new_zipfile_serialization=False)
    with zipfile.ZipFile(d / "views.bin") as zin, \
            zipfile.ZipFile(d / "compressed.bin", "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zi = zipfile.ZipInfo(info.filename, date_time=(2020, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(zi, zin.read(info.filename))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "tests" / "fixtures" / "torch_bin"))
    a = ap.parse_args()
    out = Path(a.out)
    save_llama(out)
    save_qwen2(out)
    save_odd(out)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
