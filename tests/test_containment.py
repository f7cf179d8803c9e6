"""Containment (issue 7, part 3): a checkpoint reads only regular files inside its directory.

Shard names are plain file names; symlinks that leave the directory are refused (except the hub
cache's snapshot -> blobs links, and with allow_external_symlinks=True); FIFOs, devices, sockets
and directories are refused before anything opens them; errors never quote a file's content.

FIFO cases: a watcher thread opens the FIFO's write end whenever someone has opened it for reading.
That unblocks such a reader (which then sees end of file) and records the open, so code that opens
the FIFO fails the test instead of hanging the suite.
"""
import contextlib
import json
import os
import shutil
import threading

import pytest

import fastload
from golden_util import model_dir

SECRET = "root:x:0:0:SECRET-d41d8cd98f00b204:/root:/bin/bash\n"


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the sharded Llama fixture in tmp/model (tmp/ also holds files 'outside')."""
    d = tmp_path / "model"
    d.mkdir()
    for f in model_dir("llama").iterdir():
        if f.suffix in (".safetensors", ".json") and f.name != "golden.json":
            shutil.copy(f, d)
    return d


@pytest.fixture
def single(tmp_path):
    """A writable copy of a single-file checkpoint (model.safetensors + config.json)."""
    d = tmp_path / "single"
    d.mkdir()
    for f in model_dir("qwen2").iterdir():
        if f.name in ("model.safetensors", "config.json", "generation_config.json"):
            shutil.copy(f, d)
    return d


def tiny_tokenizer_json():
    from tokenizers import Tokenizer, models, pre_tokenizers
    tk = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_end|>": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return tk.to_str()


@pytest.fixture
def tokdir(tmp_path):
    d = tmp_path / "tok"
    d.mkdir()
    (d / "tokenizer.json").write_text(tiny_tokenizer_json())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>", "chat_template": "{{ messages }}"}))
    return d


def load(p, **kw):
    return fastload.AutoModelForCausalLM.from_pretrained(str(p), device_map="cpu", torch_dtype="float32", **kw)


def tok(p, **kw):
    return fastload.AutoTokenizer.from_pretrained(str(p), **kw)


SHARD = "model-00002-of-00003.safetensors"


def set_shard(ckpt, new_name):
    """Point every index entry of SHARD at `new_name`."""
    p = ckpt / "model.safetensors.index.json"
    d = json.loads(p.read_text())
    d["weight_map"] = {k: (new_name if v == SHARD else v) for k, v in d["weight_map"].items()}
    p.write_text(json.dumps(d))


def move_out(ckpt, name):
    """Move ckpt/name to a sibling directory 'elsewhere' (outside the model) and return its path."""
    out = ckpt.parent / "elsewhere"
    out.mkdir(exist_ok=True)
    shutil.move(str(ckpt / name), out / name)
    return out / name


@contextlib.contextmanager
def fifo_never_opened(path):
    os.mkfifo(path)
    opened, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO until someone opens it to read
            except OSError:
                stop.wait(0.005)
                continue
            opened.append(True)
            os.close(fd)  # the reader gets end of file instead of blocking forever
            stop.wait(0.005)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    try:
        yield
    finally:
        stop.set()
        th.join()
    assert not opened, f"{path} (a FIFO) was opened"


# ------------------------------------------------------------------ shard names from the index
def test_absolute_shard_name(ckpt):
    outside = move_out(ckpt, SHARD)
    set_shard(ckpt, str(outside))  # today: the weights from elsewhere load
    with pytest.raises(fastload.CheckpointError, match=r"model: shard name in model\.safetensors\.index\.json '/[^']*'(\.\.\.)? is an absolute path"):
        load(ckpt)


def test_dotdot_shard_name(ckpt):
    move_out(ckpt, SHARD)
    set_shard(ckpt, "../elsewhere/" + SHARD)
    with pytest.raises(fastload.CheckpointError, match=r"'\.\./elsewhere/model-00002-of-00003\.safetensors' has an "
                                                       r"empty, '\.' or '\.\.' component"):
        load(ckpt)


@pytest.mark.parametrize("name, why", [
    ("", "is empty"),
    (".", "component"),
    ("sub/" + SHARD, "names a subdirectory"),
    ("..\\" + SHARD, "contains a backslash"),
    (SHARD + "\x00.txt", "contains a NUL character"),
    ("a\nb.safetensors", "contains a control character"),
    ("x" * 300 + ".safetensors", r"is too long"),
    ("\ud800.safetensors", "is not encodable as UTF-8"),
])
def test_shard_name_must_be_a_plain_file_name(ckpt, name, why):
    if name.startswith("sub/"):  # a real subdirectory holding the shard: still refused (plain names only)
        (ckpt / "sub").mkdir()
        shutil.copy(ckpt / SHARD, ckpt / "sub" / SHARD)
    set_shard(ckpt, name)
    with pytest.raises(fastload.CheckpointError, match=why + ".*it must be a file name in the model directory") as e:
        load(ckpt)
    assert len(str(e.value)) < len(str(ckpt)) + 400  # the name is shown cut short


def test_secret_content_never_in_the_message(ckpt):
    secret = ckpt.parent / "secret.txt"
    secret.write_text(SECRET * 4)
    first8 = int.from_bytes(SECRET.encode()[:8], "little")  # the "header length" a reader would report
    index = (ckpt / "model.safetensors.index.json").read_text()
    for name in (str(secret), "../secret.txt"):
        (ckpt / "model.safetensors.index.json").write_text(index)
        set_shard(ckpt, name)
        with pytest.raises(fastload.CheckpointError) as e:
            load(ckpt)
        msg = str(e.value)
        assert "SECRET" not in msg and "root:x" not in msg and str(first8) not in msg and hex(first8)[2:] not in msg
    # a symlink named like the shard, to the secret file
    (ckpt / "model.safetensors.index.json").write_text(index)
    os.remove(ckpt / SHARD)
    os.symlink(secret, ckpt / SHARD)
    with pytest.raises(fastload.CheckpointError, match="resolves outside the model directory") as e:
        load(ckpt)
    assert "SECRET" not in str(e.value) and str(first8) not in str(e.value)


# ------------------------------------------------------------------ symlinks
def test_shard_symlink_outside(ckpt):
    outside = move_out(ckpt, SHARD)
    os.symlink(outside, ckpt / SHARD)
    with pytest.raises(fastload.CheckpointError, match=rf"model: shard name in model\.safetensors\.index\.json '{SHARD}'"
                                                       r" is a symbolic link that resolves outside the model directory"
                                                       r".*allow_external_symlinks=True"):
        load(ckpt)


def test_config_symlink_outside(ckpt):
    outside = move_out(ckpt, "config.json")
    os.symlink(os.path.relpath(outside, ckpt), ckpt / "config.json")  # relative: ../elsewhere/config.json
    with pytest.raises(fastload.CheckpointError, match=r"'config\.json' is a symbolic link that resolves outside"):
        load(ckpt)


def test_single_file_symlink_outside(single):
    outside = move_out(single, "model.safetensors")
    os.symlink(outside, single / "model.safetensors")
    with pytest.raises(fastload.CheckpointError, match=r"'model\.safetensors' is a symbolic link that resolves outside"):
        load(single)


def test_tokenizer_json_symlink_outside(tokdir):
    outside = move_out(tokdir, "tokenizer.json")
    os.symlink(outside, tokdir / "tokenizer.json")
    with pytest.raises(fastload.CheckpointError, match=r"tok: file 'tokenizer\.json' is a symbolic link that resolves outside"):
        tok(tokdir)


def test_tokenizer_config_symlink_outside(tokdir):
    outside = move_out(tokdir, "tokenizer_config.json")
    os.symlink(outside, tokdir / "tokenizer_config.json")
    with pytest.raises(fastload.CheckpointError, match=r"'tokenizer_config\.json' is a symbolic link that resolves outside"):
        tok(tokdir)


def test_symlink_chain_leaving_the_directory(ckpt):
    # inside -> inside -> outside: the final target decides
    outside = move_out(ckpt, "config.json")
    os.symlink(outside, ckpt / "real_config.json")
    os.symlink("real_config.json", ckpt / "config.json")
    with pytest.raises(fastload.CheckpointError, match="resolves outside"):
        load(ckpt)


def test_symlink_inside_the_directory_is_fine(ckpt, tokdir):
    os.rename(ckpt / SHARD, ckpt / "data.bin")
    os.symlink("data.bin", ckpt / SHARD)
    (ckpt / "configs").mkdir()
    os.rename(ckpt / "config.json", ckpt / "configs" / "c.json")
    os.symlink("configs/c.json", ckpt / "config.json")
    assert load(ckpt).config["model_type"] == "llama"
    os.rename(tokdir / "tokenizer.json", tokdir / "t.json")
    os.symlink(tokdir / "t.json", tokdir / "tokenizer.json")  # absolute, but inside
    assert tok(tokdir).eos_token == "<|im_end|>"


def test_model_directory_itself_a_symlink_is_fine(ckpt, tmp_path):
    os.symlink(ckpt, tmp_path / "alias")
    assert load(tmp_path / "alias").config["model_type"] == "llama"


def test_allow_external_symlinks(ckpt, monkeypatch):
    outside = move_out(ckpt, SHARD)
    os.symlink(outside, ckpt / SHARD)
    assert load(ckpt, allow_external_symlinks=True).config["model_type"] == "llama"
    monkeypatch.setenv("FASTLOAD_ALLOW_EXTERNAL_SYMLINKS", "1")
    assert load(ckpt).config["model_type"] == "llama"
    with pytest.raises(fastload.CheckpointError, match="resolves outside"):  # the argument wins over the variable
        load(ckpt, allow_external_symlinks=False)
    # the option is about links only: names in the index are checked as always
    set_shard(ckpt, str(outside))
    with pytest.raises(fastload.CheckpointError, match="is an absolute path"):
        load(ckpt)


def test_dangling_symlink_is_a_missing_file(single):
    os.remove(single / "config.json")
    os.symlink("nowhere.json", single / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load(single)


def test_symlink_loop(single):
    os.remove(single / "config.json")
    os.symlink("config.json", single / "config.json")
    with pytest.raises(fastload.CheckpointError, match="'config.json' is a loop of symbolic links"):
        load(single)


# ------------------------------------------------------------------ special files
@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "generation_config.json"])
def test_fifo_in_model_directory(single, name):
    if (single / name).exists():
        os.remove(single / name)
    with fifo_never_opened(single / name):
        with pytest.raises(fastload.CheckpointError, match=rf"'{name}' is a FIFO \(named pipe\), not a regular file"):
            load(single)


def test_fifo_shard(ckpt):
    os.remove(ckpt / SHARD)
    with fifo_never_opened(ckpt / SHARD):
        with pytest.raises(fastload.CheckpointError, match=rf"'{SHARD}' is a FIFO"):
            load(ckpt)


def test_fifo_gguf_found_by_listing(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    with fifo_never_opened(d / "model.gguf"):  # today: from_pretrained blocks in open() forever
        with pytest.raises(fastload.CheckpointError, match=r"GGUF file 'model\.gguf' is a FIFO"):
            load(d)
        with pytest.raises(fastload.CheckpointError, match=r"GGUF file 'model\.gguf' is a FIFO"):
            tok(d)


def test_fifo_gguf_file_argument(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    with fifo_never_opened(d / "q.gguf"):
        with pytest.raises(fastload.CheckpointError, match=r"gguf_file argument 'q\.gguf' is a FIFO"):
            load(d, gguf_file="q.gguf")
        with pytest.raises(fastload.CheckpointError, match=r"gguf_file argument 'q\.gguf' is a FIFO"):
            tok(d, gguf_file="q.gguf")


def test_fifo_gguf_path_given_directly(tmp_path):
    with fifo_never_opened(tmp_path / "m.gguf"):
        with pytest.raises(fastload.CheckpointError, match=r"m\.gguf is a FIFO"):
            load(tmp_path / "m.gguf")
        with pytest.raises(fastload.CheckpointError, match=r"m\.gguf is a FIFO"):
            tok(tmp_path / "m.gguf")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                  "chat_template.jinja", "chat_template.json"])
def test_fifo_tokenizer_files(tokdir, name):
    if (tokdir / name).exists():
        os.remove(tokdir / name)
    with fifo_never_opened(tokdir / name):
        with pytest.raises(fastload.CheckpointError, match=rf"'{name}' is a FIFO"):
            tok(tokdir)


def test_symlink_to_a_device(single, tokdir):
    # allowed to leave the directory, still not a regular file
    os.remove(single / "config.json")
    os.symlink("/dev/zero", single / "config.json")
    with pytest.raises(fastload.CheckpointError, match=r"'config\.json' \(a symbolic link to '/dev/zero'\) is a character "
                                                       r"device, not a regular file"):
        load(single, allow_external_symlinks=True)


def test_directory_named_model_safetensors(single):
    os.remove(single / "model.safetensors")
    (single / "model.safetensors").mkdir()
    with pytest.raises(fastload.CheckpointError, match=r"'model\.safetensors' is a directory, not a regular file"):
        load(single)


def test_directory_named_tokenizer_json(tokdir):
    os.remove(tokdir / "tokenizer.json")
    (tokdir / "tokenizer.json").mkdir()
    with pytest.raises(fastload.CheckpointError, match=r"'tokenizer\.json' is a directory"):
        tok(tokdir)


def test_gguf_file_argument_must_stay_inside(tmp_path):
    d = tmp_path / "g"
    d.mkdir()
    (tmp_path / "x.gguf").write_bytes(b"GGUF" + bytes(60))
    for name, why in (("../x.gguf", "component"), (str(tmp_path / "x.gguf"), "is an absolute path")):
        with pytest.raises(fastload.CheckpointError, match=rf"gguf_file argument .* {why}; it must be a relative path "
                                                           "inside the model directory"):
            load(d, gguf_file=name)
        with pytest.raises(fastload.CheckpointError, match=why):
            tok(d, gguf_file=name)
    # a subdirectory is fine for the caller's gguf_file= (hub GGUF repos keep quantisations in folders):
    # the name passes and the GGUF reader gets to judge the (here broken) file
    (d / "Q4").mkdir()
    shutil.copy(tmp_path / "x.gguf", d / "Q4" / "x.gguf")
    with pytest.raises(fastload.CheckpointError) as e:
        load(d, gguf_file="Q4/x.gguf")
    assert "it must be" not in str(e.value) and "x.gguf" in str(e.value)


# ------------------------------------------------------------------ JSON files read safely
def test_json_size_cap(single):
    with open(single / "config.json", "a") as f:
        f.write(" " * (16 << 20))  # valid JSON, just over the 16 MiB cap for configs
    with pytest.raises(fastload.CheckpointError, match=r"config\.json is \d+ bytes, over the limit of 16777216 bytes"):
        load(single)


def test_json_nested_too_deeply(single):
    (single / "config.json").write_text("[" * 100000 + "]" * 100000)
    with pytest.raises(fastload.CheckpointError, match=r"config\.json: not valid JSON \(nested too deeply\)"):
        load(single)


@pytest.mark.parametrize("text", ['["a", "b"]', '"LlamaForCausalLM"', "7"])
def test_json_top_level_must_be_an_object(single, tokdir, text):
    (single / "config.json").write_text(text)
    with pytest.raises(fastload.CheckpointError, match=r"config\.json: the top level must be a JSON object"):
        load(single)
    (tokdir / "tokenizer_config.json").write_text(text)
    with pytest.raises(fastload.CheckpointError, match=r"tokenizer_config\.json: the top level must be a JSON object"):
        tok(tokdir)


def test_json_not_utf8(tokdir):
    (tokdir / "tokenizer_config.json").write_bytes(b'{"eos_token": "\xff\xfe"}')
    with pytest.raises(fastload.CheckpointError, match=r"tokenizer_config\.json: not valid UTF-8 \(byte 15\)"):
        tok(tokdir)


# ------------------------------------------------------------------ the hub cache layout
def hub_repo(cache, repo_id, src_dir, names, rev="0123456789abcdef0123456789abcdef01234567"):
    """models--ORG--NAME/{blobs/<hash>, snapshots/<rev>/<name> -> ../../blobs/<hash>, refs/main} as huggingface_hub."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    for i, name in enumerate(names):
        blob = f"{i:064x}"
        shutil.copy(src_dir / name, repo / "blobs" / blob)
        os.symlink(f"../../blobs/{blob}", snap / name)
    return repo, snap


def test_hub_cache_layout_loads(tmp_path, monkeypatch, tokdir):
    cache = tmp_path / "hub"
    names = [f.name for f in model_dir("llama").iterdir() if f.suffix in (".safetensors", ".json") and f.name != "golden.json"]
    repo, snap = hub_repo(cache, "o/n", model_dir("llama"), names)
    for n in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokdir / n, repo / "blobs" / n)
        os.symlink(f"../../blobs/{n}", snap / n)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load("o/n").config["model_type"] == "llama"
    assert tok("o/n").eos_token == "<|im_end|>"
    assert load(snap).config["model_type"] == "llama"  # the snapshot directory itself, not through the hub id
    # the snapshot reached through a link (a user's alias): still recognised, from the resolved directory
    os.symlink(snap, tmp_path / "alias")
    assert load(tmp_path / "alias").config["model_type"] == "llama"


def test_hub_cache_links_only_into_the_same_repos_blobs(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    names = ["config.json", "model.safetensors"]
    repo, snap = hub_repo(cache, "o/n", model_dir("qwen2"), names)
    other, _ = hub_repo(cache, "o/other", model_dir("qwen2"), names)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert load("o/n").config["model_type"] == "qwen2"
    # a link into another repository's blobs
    os.remove(snap / "config.json")
    os.symlink(f"../../../{other.name}/blobs/{0:064x}", snap / "config.json")
    with pytest.raises(fastload.CheckpointError, match="'config.json' is a symbolic link that resolves outside"):
        load("o/n")
    # blobs/ itself a link elsewhere: not the hub layout any more
    os.remove(snap / "config.json")
    os.symlink(f"../../blobs/{0:064x}", snap / "config.json")
    shutil.move(str(repo / "blobs"), tmp_path / "stolen")
    os.symlink(tmp_path / "stolen", repo / "blobs")
    with pytest.raises(fastload.CheckpointError, match="resolves outside"):
        load("o/n")


def test_hub_ref_must_name_a_snapshot(tmp_path, monkeypatch, single):
    cache = tmp_path / "hub"
    repo, snap = hub_repo(cache, "o/n", model_dir("qwen2"), ["config.json", "model.safetensors"])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # refs/main pointing out of snapshots/ (today: the directory it names loads)
    (repo / "refs" / "main").write_text(os.path.relpath(single, repo / "snapshots"))
    with pytest.raises(fastload.CheckpointError, match=r"commit in refs/main '\.\./\.\./\.\./single'"):
        load("o/n")
    with pytest.raises(fastload.CheckpointError, match=r"revision '\.\./x'"):
        load("o/n", revision="../x")
    os.remove(repo / "refs" / "main")
    with fifo_never_opened(repo / "refs" / "main"):
        with pytest.raises(fastload.CheckpointError, match=r"'main' is a FIFO"):
            load("o/n")
