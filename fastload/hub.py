"""Resolve a model reference to local files: a directory, a .gguf file, or a hub id
("Qwen/Qwen2.5-7B-Instruct") found in the local Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or
~/.cache/huggingface/hub; layout models--ORG--NAME/{refs,snapshots,blobs}). No network is used unless
huggingface_hub is installed, HF_HUB_OFFLINE is not set, and the model is not in the cache.

A snapshot's files are symbolic links into the repository's blobs/ directory; fastload/_files.py
recognises that layout and follows those links (and no others that leave the snapshot)."""
from __future__ import annotations

import errno
import os
import re

from . import _files


def hf_cache_dir(cache_dir=None) -> str:
    """The hub cache as huggingface_hub.constants finds it: HF_HUB_CACHE, else the legacy HUGGINGFACE_HUB_CACHE,
    else $HF_HOME/hub (HF_HOME: $XDG_CACHE_HOME/huggingface, ~/.cache/huggingface), ~ and $VARS expanded."""
    if cache_dir:
        return os.path.expanduser(str(cache_dir))
    expand = lambda p: os.path.expandvars(os.path.expanduser(p))  # noqa: E731 (huggingface_hub's order)
    home = expand(os.environ.get("HF_HOME") or
                  os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                               "huggingface"))
    return expand(os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or
                  os.path.join(home, "hub"))


_REPO_RE = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") or \
        os.environ.get("TRANSFORMERS_OFFLINE", "0").lower() in ("1", "true", "yes")


_WINDOWS_DRIVE_RE = re.compile(r"^[A-Za-z]:[\\/]")


def looks_local(ref: str) -> bool:
    """A reference that can only be a path: ./x, ../x, /x, ~/x, '.', '..', C:\\x, anything with a backslash
    or os.sep, or with more than the one slash of 'org/name'. Such a reference is never looked up on the hub."""
    if ref in (".", "..") or ref.startswith(("./", "../", "/", "~", ".\\", "..\\")):
        return True
    if _WINDOWS_DRIVE_RE.match(ref) or "\\" in ref or (os.sep != "/" and os.sep in ref):
        return True
    return ref.count("/") > 1


def resolve(ref, revision=None, cache_dir=None, local_files_only=False) -> str:
    ref = os.fspath(ref)
    p = os.path.expanduser(ref)
    if os.path.exists(p):
        return p
    if looks_local(ref):
        raise FileNotFoundError(errno.ENOENT, "no such file or directory (a local path: the Hugging Face hub is not "
                                "consulted for it)", ref)
    if not _REPO_RE.match(ref):
        raise FileNotFoundError(f"{ref!r} is neither an existing path nor a hub id like 'org/name'")
    cache = hf_cache_dir(cache_dir)
    repo = os.path.join(cache, "models--" + ref.replace("/", "--"))
    rev = os.fspath(revision or "main")
    # a revision is a branch / tag ("main", "refs/pr/1") or a commit hash: relative, no ".."
    _files.check_name(repo, rev, "revision", subdirs=True)
    commit = rev
    ref_file = _files.find_file(os.path.join(repo, "refs"), rev, "ref", subdirs=True) \
        if os.path.isdir(os.path.join(repo, "refs")) else None
    if ref_file is not None:  # refs/<branch> holds the commit hash: a plain name, checked like one
        commit = _files.read_text(ref_file, os.path.join(repo, "refs", rev), _files.REF_LIMIT).strip()
        _files.check_name(repo, commit, f"commit in refs/{rev}")
    snap = os.path.join(repo, "snapshots", commit)
    if os.path.isdir(snap):
        return snap
    if not local_files_only and not _offline():
        try:
            from huggingface_hub import snapshot_download  # optional
        except ImportError:
            snapshot_download = None
        if snapshot_download is not None:
            snap = snapshot_download(ref, revision=revision, cache_dir=cache_dir,
                                     allow_patterns=["*.json", "*.safetensors", "*.gguf", "tokenizer*", "*.model", "*.txt", "*.jinja"])
            if not any(f.endswith((".safetensors", ".gguf")) for f in os.listdir(snap)):
                # only PyTorch .bin weights (ChatGLM2, many fine-tunes): fetched only then, never next to safetensors;
                # fastload/torchbin.py reads them without running their pickle code
                snap = snapshot_download(ref, revision=revision, cache_dir=cache_dir, allow_patterns=["pytorch_model*.bin"])
            return snap
    raise FileNotFoundError(
        f"{ref!r} is not in the Hugging Face cache ({snap} does not exist) and cannot be downloaded "
        "(no network, HF_HUB_OFFLINE set, or huggingface_hub not installed); pass a local directory or .gguf file")
