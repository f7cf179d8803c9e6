"""Resolve a model reference to local files: a directory, a .gguf file, or a hub id
("Qwen/Qwen2.5-7B-Instruct") found in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or
~/.cache/huggingface/hub; layout models--ORG--NAME/{refs,snapshots}). No network is used unless
huggingface_hub is installed, HF_HUB_OFFLINE is not set, and the model is not in the cache."""
from __future__ import annotations

import os
import re


def hf_cache_dir(cache_dir=None) -> str:
    if cache_dir:
        return os.path.expanduser(str(cache_dir))
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


_REPO_RE = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


def resolve(ref, revision=None, cache_dir=None, local_files_only=False) -> str:
    ref = os.fspath(ref)
    p = os.path.expanduser(ref)
    if os.path.exists(p):
        return p
    if not _REPO_RE.match(ref):
        raise FileNotFoundError(f"{ref!r} is neither an existing path nor a hub id like 'org/name'")
    cache = hf_cache_dir(cache_dir)
    repo = os.path.join(cache, "models--" + ref.replace("/", "--"))
    rev = revision or "main"
    commit = rev
    ref_file = os.path.join(repo, "refs", rev)
    if os.path.isfile(ref_file):
        with open(ref_file) as f:
            commit = f.read().strip()
    snap = os.path.join(repo, "snapshots", commit)
    if os.path.isdir(snap):
        return snap
    if not local_files_only and not _offline():
        try:
            from huggingface_hub import snapshot_download  # optional
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            return snapshot_download(ref, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=["*.json", "*.safetensors", "*.gguf", "tokenizer*", "*.model", "*.txt", "*.jinja"])
    raise FileNotFoundError(
        f"{ref!r} is not in the Hugging Face cache ({snap} does not exist) and cannot be downloaded "
        "(no network, HF_HUB_OFFLINE set, or huggingface_hub not installed); pass a local directory or .gguf file")
