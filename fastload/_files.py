"""Containment: which files a checkpoint may make fastload read, and reading them safely.

A model directory is untrusted data. Every file fastload reads from it goes through here:

- Names that come from the checkpoint (shard names in model.safetensors.index.json, the .gguf
  file found by listing the directory) must be plain file names: no absolute path, no "/" or
  "\\", no "." or ".." component, no NUL or control character, at most 255 bytes. The caller's
  own `gguf_file=` argument may also name a file in a subdirectory ("Q4_K_M/model.gguf", as
  GGUF repositories on the hub are laid out), still relative and without "..".
- The name is resolved (symlinks followed) and must land inside the model directory. Two
  exceptions: a Hugging Face hub cache snapshot (.../models--ORG--NAME/snapshots/<rev>/), whose
  files are links into the same repository's .../models--ORG--NAME/blobs/, is recognised from
  its layout and those links are followed; and the caller may allow symlinks to anywhere with
  `allow_external_symlinks=True` or FASTLOAD_ALLOW_EXTERNAL_SYMLINKS=1 (names are still checked).
- What the name resolves to must be a regular file, checked with stat() before anything opens
  it: a FIFO, device, socket or directory is refused (opening a FIFO would block forever).
- JSON / text files are opened with O_NONBLOCK, re-checked with fstat() on the open descriptor,
  and size-capped before they are read.

Refusals raise CheckpointError naming the model directory, the offending name (repr, cut to 100
characters) and the reason; a missing file raises FileNotFoundError. Messages never quote the
content of a file. This is not a defence against someone rewriting the directory while it is
being loaded (the C readers re-check that what they open is a regular file).
"""
from __future__ import annotations

import errno
import json
import os
import stat

from . import _C

CheckpointError = _C.CheckpointError

MiB = 1 << 20
CONFIG_LIMIT = 16 * MiB     # config.json, generation_config.json, tokenizer_config.json, special_tokens_map.json,
                            # chat_template.json / .jinja (real ones are kilobytes; Gemma 3's tokenizer_config is 1.2 MB)
TOKENIZER_LIMIT = 64 * MiB  # tokenizer.json (the largest known, Gemma 3's, is 33 MB)
INDEX_LIMIT = 64 * MiB      # model.safetensors.index.json (DeepSeek-V3's, ~90k tensors, is under 10 MB)
REF_LIMIT = 4096            # a hub cache refs/<branch> file (a 40-character commit hash)
NAME_MAX = 255              # bytes per path component (Linux NAME_MAX)
ENV_ALLOW = "FASTLOAD_ALLOW_EXTERNAL_SYMLINKS"


def show(name, limit=100) -> str:
    """repr of a name for an error message, cut to `limit` characters."""
    r = repr(name)
    if len(r) <= limit:
        return r
    if not isinstance(name, (str, bytes)):
        return r[: limit - 3] + "..."
    cut = name[: max(1, limit - 8)]  # the repr of a prefix, closed, then "...": the quotes still delimit the name
    while len(repr(cut)) > limit - 3 and len(cut) > 1:
        cut = cut[:-1]
    return repr(cut) + "..."


def external_symlinks_allowed(arg=None) -> bool:
    """The allow_external_symlinks argument, or FASTLOAD_ALLOW_EXTERNAL_SYMLINKS when it is None."""
    if arg is not None:
        return bool(arg)
    v = os.environ.get(ENV_ALLOW, "").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{ENV_ALLOW}={show(v)} must be 1 or 0")


def check_name(model_dir, name, what, subdirs=False) -> str:
    """Raise CheckpointError unless `name` is a plain relative name (see the module docstring)."""
    name = os.fspath(name) if isinstance(name, os.PathLike) else name
    if not isinstance(name, str):
        raise CheckpointError(f"{model_dir}: {what} must be a string, got {type(name).__name__}")
    where = "a file name in the model directory" if not subdirs else "a relative path inside the model directory"

    def bad(why):
        return CheckpointError(f"{model_dir}: {what} {show(name)} {why}; it must be {where}")

    if not name:
        raise bad("is empty")
    if "\x00" in name:
        raise bad("contains a NUL character")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise bad("contains a control character")
    if "\\" in name:
        raise bad("contains a backslash")
    if name.startswith("/"):
        raise bad("is an absolute path")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise bad("has an empty, '.' or '..' component")
    if len(parts) > 1 and not subdirs:
        raise bad("names a subdirectory")
    try:
        too_long = any(len(p.encode("utf-8")) > NAME_MAX for p in parts)
    except UnicodeEncodeError:
        raise bad("is not encodable as UTF-8") from None
    if too_long or len(parts) > 16:
        raise bad(f"is too long (components of at most {NAME_MAX} bytes, at most 16 of them)")
    return name


def _kind(mode) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return what
    return "not a regular file"


def _inside(root, p) -> bool:
    return p == root or p.startswith(root.rstrip(os.sep) + os.sep)


def _hub_blobs(root) -> str | None:
    """When `root` (a resolved directory) is, or lies in, a hub cache snapshot
    .../models--ORG--NAME/snapshots/<rev>, that repository's blobs directory (itself no link)."""
    d = root
    while True:
        parent = os.path.dirname(d)
        if parent == d:
            return None
        if os.path.basename(parent) == "snapshots" and os.path.basename(os.path.dirname(parent)).startswith("models--"):
            blobs = os.path.join(os.path.dirname(parent), "blobs")
            return blobs if os.path.realpath(blobs) == blobs else None
        d = parent


def find_file(model_dir, name, what=None, *, allow_external=False, subdirs=False) -> str | None:
    """The resolved path of `name` in `model_dir` after every check above, or None when there is
    no such directory entry (a dangling symlink inside the directory counts as none)."""
    what = what or "file"
    check_name(model_dir, name, what, subdirs)
    joined = os.path.join(model_dir, name)
    root = os.path.realpath(model_dir)
    real = os.path.realpath(joined)
    if not os.path.lexists(joined):
        return None
    via = "" if real == os.path.join(root, name) else f" (a symbolic link to {show(real)})"
    if not _inside(root, real) and not allow_external:
        blobs = _hub_blobs(root)
        if blobs is None or os.path.dirname(real) != blobs:
            raise CheckpointError(
                f"{model_dir}: {what} {show(name)} is a symbolic link that resolves outside the model directory "
                f"(to {show(real)}); a checkpoint reads only files inside its directory (pass "
                f"allow_external_symlinks=True or set {ENV_ALLOW}=1 to follow such links)")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{model_dir}: {what} {show(name)} is a loop of symbolic links") from None
        raise
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{model_dir}: {what} {show(name)}{via} is {_kind(st.st_mode)}, not a regular file; "
                              "a checkpoint reads only regular files")
    return real


def checkpoint_file(model_dir, name, what=None, *, allow_external=False, subdirs=False) -> str:
    """find_file, with FileNotFoundError when the file is absent."""
    real = find_file(model_dir, name, what, allow_external=allow_external, subdirs=subdirs)
    if real is None:
        raise FileNotFoundError(errno.ENOENT, f"{what or 'file'} {show(name)} not found in {model_dir}",
                                os.path.join(model_dir, name))
    return real


def given_file(path) -> str:
    """A file path the caller gave directly (a .gguf, generation_config.json): followed wherever it
    points (the caller chose it), but it must be a regular file, checked before it is opened."""
    st = os.stat(path)  # FileNotFoundError stays
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path} is {_kind(st.st_mode)}, not a regular file")
    return os.fspath(path)


def open_regular(path, shown=None):
    """(fd, os.stat_result) of `path` opened for reading, checked on the descriptor to be a regular file (no FIFO blocks
    the open: O_NONBLOCK). The caller closes fd. `shown` is the path errors name."""
    shown = path if shown is None else shown
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError(f"{shown} is {_kind(st.st_mode)}, not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def read_bytes(path, shown=None, limit=CONFIG_LIMIT) -> bytes:
    """The bytes of a regular file of at most `limit` bytes. `shown` is the path errors name."""
    shown = path if shown is None else shown
    fd, st = open_regular(path, shown)
    try:
        if st.st_size > limit:
            raise CheckpointError(f"{shown} is {st.st_size} bytes, over the limit of {limit} bytes for this file")
        chunks, got = [], 0
        while got <= limit:
            b = os.read(fd, min(1 << 22, limit + 1 - got))
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise CheckpointError(f"{shown} grew past the limit of {limit} bytes while being read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_text(path, shown=None, limit=CONFIG_LIMIT) -> str:
    shown = path if shown is None else shown
    data = read_bytes(path, shown, limit)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{shown}: not valid UTF-8 (byte {e.start})") from None


def read_json(path, shown=None, limit=CONFIG_LIMIT):
    """A JSON object (dict) from a regular file of at most `limit` bytes; CheckpointError otherwise.
    The message gives the parser's position, never the file's content."""
    shown = path if shown is None else shown
    text = read_text(path, shown, limit)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{shown}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{shown}: not valid JSON (nested too deeply)") from None
    except ValueError as e:  # e.g. an integer literal longer than Python's int digit limit
        raise CheckpointError(f"{shown}: not valid JSON ({str(e)[:100]})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{shown}: the top level must be a JSON object, not {type(obj).__name__}")
    return obj
