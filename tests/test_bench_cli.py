"""`python -m fastload bench {speed,load,concurrency,perplexity}` (issue 10 parts 1 and 4): each subcommand on the
demo model with tiny sizes writes one CSV and one JSON whose contents are sane (columns, row counts, positive
numbers, the environment); bad arguments give a clear error and leave no file behind. No timing is asserted."""
import csv
import glob
import json
import os
import subprocess
import sys

import pytest

from fastload import bench
from fastload.__main__ import main

QWEN_COLUMNS = ["model_id_or_path", "batch_size", "context_length_per_experiment", "generate_length_per_experiment",
                "use_flash_attn", "comment", "tokens_per_second", "max_gpu_memory_cost_gb"]


def _run(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def _results(d):
    """(csv rows, csv header, json document) of the one result pair in d; nothing else may be there."""
    names = sorted(os.listdir(d))
    assert len(names) == 2, names
    (c,), (j,) = glob.glob(os.path.join(d, "*.csv")), glob.glob(os.path.join(d, "*.json"))
    assert os.path.splitext(c)[0] == os.path.splitext(j)[0]
    with open(c, newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
        header = reader.fieldnames
    with open(j) as fh:
        doc = json.load(fh)
    assert doc["columns"] == header
    assert len(doc["rows"]) == len(rows)
    env = doc["environment"]
    assert env["date"][:4].isdigit() and env["versions"]["fastload"] and env["versions"]["numpy"]
    assert env["device"] and env["device_name"]
    assert "git_commit" in env
    return rows, header, doc


def _no_files(root):
    return [os.path.join(dp, f) for dp, _, fs in os.walk(root) for f in fs]


def test_speed_on_the_demo_model(tmp_path, monkeypatch, capsys, demo_gguf):
    monkeypatch.delenv("FASTLOAD_MODEL", raising=False)  # no model named: the demo model
    out = tmp_path / "speed"
    rc = _run(["bench", "speed", "--context_length", "1", "5", "--generate_length", "3", "--outputs_dir", str(out)])
    assert rc in (0, None)
    rows, header, doc = _results(out)
    assert header[:8] == QWEN_COLUMNS  # Qwen's CSV columns first, in its order
    assert [int(r["context_length_per_experiment"]) for r in rows] == [1, 5]
    for r in rows:
        assert r["engine"] == "fastload" and r["model_id_or_path"] == demo_gguf
        assert int(r["batch_size"]) == 1 and int(r["generate_length_per_experiment"]) == 3
        assert float(r["tokens_per_second"]) > 0 and float(r["seconds"]) > 0
        assert float(r["max_gpu_memory_cost_gb"]) >= 0 and float(r["peak_memory_gb"]) > 0
        if r["device"].startswith("cuda"):
            assert float(r["max_gpu_memory_cost_gb"]) > 0
    assert doc["benchmark"] == "speed" and doc["seed"] == 1024
    shown = capsys.readouterr().out
    assert "tokens_per_second" in shown and "wrote " in shown


def test_speed_sizes_the_kv_pool_to_each_row(tmp_path, monkeypatch, demo_gguf):
    """The engine's default pool is a fixed share of free memory (the same in every row): bench speed sizes it per row
    to that row's context + generate_length, whole 16-token pages plus one spare, so that the memory columns show what
    the context costs, and records it as kv_pool_gb."""
    from fastload import engine as enginemod
    sizes = []
    real = bench._pool_for

    def spy(model, batch, tokens):
        b = real(model, batch, tokens)
        sizes.append((tokens, b, enginemod.pool_bytes(model, model._engine_handle().opts)))
        return b
    monkeypatch.setattr(bench, "_pool_for", spy)
    out = tmp_path / "speed"
    assert _run(["bench", "speed", "--model", demo_gguf, "--context_length", "1", "40", "--generate_length", "3",
                 "--outputs_dir", str(out)]) in (0, None)
    rows, header, _ = _results(out)
    assert "kv_pool_gb" in header
    assert [t for t, _, _ in sizes] == [4, 43]
    per_page = sizes[0][1] // 2  # 4 tokens: one page + the spare
    assert sizes[1][1] == per_page * (3 + 1)  # 43 tokens: three pages + the spare
    for (_, b, resolved), r in zip(sizes, rows):
        assert resolved == b  # the engine is configured with exactly that many bytes
        assert float(r["kv_pool_gb"]) == pytest.approx(b / 2**30, abs=1e-4)


def test_speed_rope_scaling_argument(tmp_path, monkeypatch, demo_gguf):
    """--rope_scaling JSON goes to from_pretrained(rope_scaling=...) (Qwen's YaRN block for contexts past 32768) and
    into the JSON's meta (bad values: test_bad_arguments_clear_error_nothing_written)."""
    import fastload
    seen = {}
    real = fastload.AutoModelForCausalLM.from_pretrained

    def spy(ref, **kw):
        seen.update(kw)
        return real(ref, **kw)
    monkeypatch.setattr(fastload.AutoModelForCausalLM, "from_pretrained", spy)
    yarn = {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8192}
    out = tmp_path / "o"
    assert _run(["bench", "speed", "--model", demo_gguf, "--context_length", "1", "--generate_length", "2",
                 "--rope_scaling", json.dumps(yarn), "--outputs_dir", str(out)]) in (0, None)
    assert seen["rope_scaling"] == yarn
    _, _, doc = _results(out)
    assert doc["rope_scaling"] == yarn and doc["context_limit"] == 16384  # factor x original


def test_speed_spellings_and_missing_peer(tmp_path, capsys, demo_gguf):
    """--model_id_or_path, --context_length a,b and --outputs-dir; --peer transformers says why it did not run."""
    if bench._peer_missing() is None:
        pytest.skip("torch and transformers are installed: the peer would run (a GPU-machine measurement)")
    out = tmp_path / "a" / "b"  # created at the end
    rc = _run(["bench", "speed", "--model_id_or_path", demo_gguf, "--context_length", "2,3", "--generate_length", "2",
               "--peer", "transformers", "--comment", "ci", "--outputs-dir", str(out)])
    assert rc in (0, None)
    rows, _, doc = _results(out)
    assert [int(r["context_length_per_experiment"]) for r in rows] == [2, 3]
    assert {r["comment"] for r in rows} == {"ci"}
    assert "not installed" in doc["peer"]["transformers"]["error"]
    assert "not installed" in capsys.readouterr().out


def test_context_length_parsing():
    assert bench._context_lengths(["1,6144", "14336", "30720"]) == [1, 6144, 14336, 30720]
    with pytest.raises(bench.BenchError, match="'6k' is not a whole number"):
        bench._context_lengths(["1", "6k"])
    with pytest.raises(bench.BenchError, match="at least 1"):
        bench._context_lengths(["0"])


def test_load_on_the_demo_model(tmp_path, demo_gguf):
    out = tmp_path / "load"
    assert _run(["bench", "load", "--model", demo_gguf, "--repeat", "1", "--outputs_dir", str(out)]) in (0, None)
    rows, header, doc = _results(out)
    kinds = {(r["engine"], r["cache"]) for r in rows}
    assert {("fastload", "warm"), ("raw read", "warm")} <= kinds
    if doc["cold_method"]:  # where this process can evict the file's pages
        assert {("fastload", "cold"), ("raw read", "cold")} <= kinds
    else:
        assert any("cold loads not measured" in n for n in doc["notes"])
    size = os.path.getsize(demo_gguf)
    assert doc["bytes"] == size and doc["files"] == [os.path.realpath(demo_gguf)]
    for r in rows:
        assert int(r["bytes"]) == size and int(r["runs"]) == 1
        assert float(r["seconds_median"]) > 0 and float(r["gb_per_s"]) > 0 and float(r["vs_raw_read"]) > 0
    assert all(float(r["core_seconds_median"]) > 0 for r in rows if r["engine"] == "fastload")


def test_resident_fraction_and_drop(tmp_path):
    """The cold-cache helpers: a file just written is (partly) cached; after drop_page_cache, where it works, the
    fraction it reports is small; where it cannot, it says why."""
    p = tmp_path / "f.bin"
    p.write_bytes(os.urandom(1 << 20))
    frac = bench.resident_fraction([str(p)])
    if frac is None:
        pytest.skip("mincore is not available here")
    assert 0.0 <= frac <= 1.0
    try:
        how, left = bench.drop_page_cache([str(p)])
    except bench.BenchError as e:
        assert str(e)  # a reason
        return
    assert how and (left is None or left <= 0.05)


def test_concurrency_on_the_demo_model(tmp_path, demo_gguf, monkeypatch):
    monkeypatch.setenv("FASTLOAD_PREFIX_CACHING", "0")  # same answers whichever request computes the shared prompt
    q = tmp_path / "queries.txt"
    q.write_text("What is the capital of France?\n\nSay hello.\n", encoding="utf-8")
    out = tmp_path / "conc"
    rc = _run(["bench", "concurrency", "--model", demo_gguf, "--queries", str(q), "--max_new_tokens", "2",
               "--outputs_dir", str(out)])
    assert rc in (0, None)
    rows, header, doc = _results(out)
    assert [r["mode"] for r in rows] == ["for-loop", "ThreadPoolExecutor(2)"]  # one worker per query by default
    assert doc["queries_list"] == ["What is the capital of France?", "Say hello."]
    for r in rows:
        # the tokens generated (at most 2 a query, an eos included), not the answers' text re-encoded (a cut
        # character's U+FFFD counted 3 tokens, stripped spaces none)
        assert int(r["queries"]) == 2 and float(r["wall_s"]) > 0 and 2 <= int(r["new_tokens"]) <= 4
        assert float(r["tokens_per_s"]) > 0 and r["same_answers_as_loop"] == "True"  # greedy: same answers
        now, peak = float(r["memory_allocated_mb"]), float(r["max_memory_allocated_mb"])
        assert now > 0 and peak >= now
        # what the memory holds: the weights and the engine's pool, reserved up front, of which the requests used some
        w, pool, used = float(r["weights_mb"]), float(r["kv_pool_mb"]), float(r["kv_pool_peak_used_mb"])
        assert w == pytest.approx(doc["model_memory"]["weights"] / 2**20, abs=0.01)
        assert pool == pytest.approx(doc["model_memory"]["kv_cache_pool"] / 2**20, abs=0.01) and 0 < used <= pool
    assert len(doc["answers"]["loop"]) == 2 and doc["answers"]["loop"] == doc["answers"]["pool"]


def test_concurrency_default_queries_are_the_reports_five():
    assert len(bench.QUERIES) == 5 and all(isinstance(q, str) and q for q in bench.QUERIES)


def test_perplexity_on_the_demo_model(tmp_path, demo_gguf):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 6, encoding="utf-8")
    out = tmp_path / "ppl"
    rc = _run(["bench", "perplexity", "--model", demo_gguf, "--file", str(text), "--modes", "int8,gguf",
               "--context", "32", "--generate_length", "2", "--outputs_dir", str(out)])
    assert rc in (0, None)
    rows, header, doc = _results(out)
    by = {r["mode"]: r for r in rows}
    assert list(by) == ["fp16", "int8", "gguf"]  # the fp16 reference always first
    for r in rows:
        assert float(r["perplexity"]) > 1 and float(r["word_perplexity"]) > 1 and int(r["tokens"]) > 0
        assert float(r["tokens_per_s"]) > 0 and float(r["decode_tokens_per_s"]) > 0
        assert int(r["weight_bytes"]) > 0 and int(r["peak_memory_bytes"]) >= int(r["weight_bytes"])
    assert by["int8"]["held_quantised"] == "True" and by["gguf"]["held_quantised"] == "True"
    assert int(by["int8"]["weight_bytes"]) < int(by["fp16"]["weight_bytes"])
    assert by["fp16"]["word_ppl_vs_fp16_pct"] == "" and by["int8"]["word_ppl_vs_fp16_pct"] != ""


# ------------------------------------------------------------------------------------------------ bad arguments
@pytest.mark.parametrize("argv, message", [
    (["speed", "--context_length", "1", "abc"], "--context_length: 'abc' is not a whole number"),
    (["speed", "--context_length", "0"], "--context_length: 0 must be at least 1"),
    (["speed", "--generate_length", "0"], "--generate_length must be at least 1"),
    (["speed", "--gpus", "first"], "--gpus 'first'"),
    (["speed", "--rope_scaling", "{type: yarn}"], "--rope_scaling '{type: yarn}': not JSON"),
    (["speed", "--rope_scaling", "[1, 2]"], "--rope_scaling '[1, 2]': must be a JSON object"),
    (["speed", "--model_id_or_path", "/nonexistent/model.gguf"], "/nonexistent/model.gguf: no such file"),
    (["load", "--model", "/nonexistent/dir"], "/nonexistent/dir: no such file"),
    (["load", "--repeat", "0"], "--repeat must be at least 1"),
    (["concurrency", "--queries", "/nonexistent/q.txt"], "/nonexistent/q.txt"),
    (["concurrency", "--max_new_tokens", "0"], "--max_new_tokens must be at least 1"),
    (["perplexity", "--modes", "int8,int3"], "--modes: 'int3' is not one of"),
    # QuantConfig's group rule before the reference is scored (it failed after that, exiting 0)
    (["perplexity", "--modes", "fp16,int4:7"], "--modes: 'int4:7': QuantConfig group_size=7 is not supported"),
    (["perplexity", "--context", "1"], "--context must be at least 2"),
])
def test_bad_arguments_clear_error_nothing_written(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _run(["bench"] + argv + ["--outputs_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"python -m fastload bench {argv[0]}: error:" in err and message in err, err
    assert not out.exists() and _no_files(tmp_path) == []


def test_too_long_context_refused_before_running(tmp_path, capsys, demo_gguf):
    out = tmp_path / "out"
    assert _run(["bench", "speed", "--model", demo_gguf, "--context_length", "1", "9000", "--generate_length", "8",
                 "--outputs_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--context_length 9000 + --generate_length 8 = 9008 tokens" in err and "max_position_embeddings" in err
    assert not out.exists()


def test_empty_queries_file(tmp_path, capsys):
    q = tmp_path / "q.txt"
    q.write_text("\n  \n", encoding="utf-8")
    assert _run(["bench", "concurrency", "--queries", str(q), "--outputs_dir", str(tmp_path / "o")]) == 2
    assert "no queries" in capsys.readouterr().err and not (tmp_path / "o").exists()


@pytest.mark.parametrize("cmd", ["speed", "load", "concurrency", "perplexity"])
def test_outputs_dir_under_a_file(tmp_path, capsys, cmd):
    f = tmp_path / "a-file"
    f.write_text("x")
    assert _run(["bench", cmd, "--outputs_dir", str(f / "sub")]) == 2
    err = capsys.readouterr().err
    assert "--outputs_dir" in err and "is a file, not a directory" in err
    assert _no_files(tmp_path) == [str(f)] and f.read_text() == "x"
    assert _run(["bench", cmd, "--outputs-dir", str(f)]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err


def test_outputs_dir_not_writable(tmp_path, capsys):
    if os.geteuid() == 0:
        pytest.skip("root may write into any directory: permissions cannot make it unwritable")
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        assert _run(["bench", "speed", "--outputs_dir", str(d / "x")]) == 2
        assert "not writable" in capsys.readouterr().err
        assert os.listdir(d) == []
    finally:
        d.chmod(0o700)


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """The CSV and JSON are renamed into place together: when the second rename fails the first is taken back,
    the temporary files are removed and the directories this write created are removed too."""
    target = tmp_path / "new" / "dir"
    o = bench.Outputs(str(target))
    real = os.replace
    calls = []

    def flaky(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(a, b)

    monkeypatch.setattr(bench.os, "replace", flaky)
    with pytest.raises(bench.BenchError, match="cannot rename"):
        o.write("x", [{"a": 1}], ["a"], {"environment": {}})
    assert len(calls) == 2 and not (tmp_path / "new").exists()
    monkeypatch.setattr(bench.os, "replace", real)
    c, j = o.write("x", [{"a": 1, "b": 2}], ["a"], {"k": "v"})
    assert open(c).read() == "a\n1\n" and json.load(open(j))["rows"] == [{"a": 1, "b": 2}]
    assert sorted(os.listdir(target)) == ["x.csv", "x.json"]


def test_command_line_exit_status(tmp_path):
    """The real command: exit status 2 and a one-line error, no traceback."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(bench.__file__))]
                                                      + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    r = subprocess.run([sys.executable, "-m", "fastload", "bench", "speed", "--context_length", "x",
                        "--outputs_dir", str(tmp_path / "o")], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    assert "error: --context_length: 'x' is not a whole number" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ --peer transformers
def _fake_peer(monkeypatch):
    """Stand-ins for torch and transformers with just what bench's peer code calls (CI has neither): the peer's
    flow and rows are checked here; its real numbers come from a machine with both installed."""
    import contextlib
    import types

    import numpy as np
    torch = types.ModuleType("torch")
    torch.long, torch.float16 = np.int64, np.float16
    torch.full = lambda shape, v, dtype=None, device=None: np.full(shape, v, dtype=np.int64)
    torch.ones_like = np.ones_like
    torch.no_grad = contextlib.nullcontext
    torch.cuda = types.SimpleNamespace(is_available=lambda: False, device_count=lambda: 0)
    tf = types.ModuleType("transformers")
    tf.__version__ = "5.0.0"
    tf.set_seed = lambda s: None
    seen = {}

    class Model:
        device, dtype = "cpu", "torch.float32"

        def __init__(self):
            self.generation_config = types.SimpleNamespace(min_length=0, max_new_tokens=None)

        def eval(self):
            return self

        def generate(self, input_ids=None, attention_mask=None, generation_config=None):
            seen.setdefault("lengths", []).append(input_ids.shape[1])
            return np.zeros((input_ids.shape[0], generation_config.min_length), dtype=np.int64)

    def model_from_pretrained(path, **kw):
        seen["model_kw"] = dict(kw, path=path)
        return Model()

    tf.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=model_from_pretrained)
    tf.AutoTokenizer = types.SimpleNamespace(from_pretrained=lambda path, **kw: (
        lambda text, add_special_tokens=True: {"input_ids": [7] * (len(text) // len(text[:1] or "x"))}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "transformers", tf)
    monkeypatch.setattr(bench, "_peer_missing", lambda name="transformers": None)
    monkeypatch.setattr(bench, "_version", lambda dist: "0-fake")
    return seen


def test_speed_peer_rows(tmp_path, monkeypatch, demo_gguf):
    seen = _fake_peer(monkeypatch)
    out = tmp_path / "o"
    assert _run(["bench", "speed", "--model", demo_gguf, "--context_length", "1", "3", "--generate_length", "2",
                 "--peer", "transformers", "--outputs_dir", str(out)]) in (0, None)
    rows, header, doc = _results(out)
    assert [(r["engine"], int(r["context_length_per_experiment"])) for r in rows] == [
        ("fastload", 1), ("fastload", 3), ("transformers", 1), ("transformers", 3)]
    assert seen["lengths"] == [1, 3]
    # a .gguf file goes to transformers as its directory plus gguf_file=, dtype= (transformers >= 4.56's name)
    kw = seen["model_kw"]
    assert kw["path"] == os.path.dirname(demo_gguf) and kw["gguf_file"] == os.path.basename(demo_gguf)
    assert kw["dtype"] == "auto" and "device_map" not in kw
    assert kw["attn_implementation"] in ("sdpa", "flash_attention_2")
    t = [r for r in rows if r["engine"] == "transformers"]
    assert all(float(r["tokens_per_second"]) > 0 and r["dtype"] == "float32" for r in t)
    assert "error" not in doc["peer"]["transformers"]


def test_load_peer_rows(tmp_path, monkeypatch, demo_gguf):
    _fake_peer(monkeypatch)
    out = tmp_path / "o"
    assert _run(["bench", "load", "--model", demo_gguf, "--repeat", "1", "--no-cold", "--peer", "transformers",
                 "--outputs_dir", str(out)]) in (0, None)
    rows, header, doc = _results(out)
    assert [(r["engine"], r["cache"]) for r in rows] == [("fastload", "warm"), ("raw read", "warm"),
                                                          ("transformers", "warm")]
    assert float(rows[2]["seconds_median"]) > 0 and float(rows[2]["vs_raw_read"]) > 0
    assert any("--no-cold" in n for n in doc["notes"])


def test_peer_failure_keeps_fastload_rows(tmp_path, monkeypatch, capsys, demo_gguf):
    _fake_peer(monkeypatch)

    def boom(path, **kw):
        raise OSError("no such checkpoint for transformers")
    monkeypatch.setattr(sys.modules["transformers"].AutoModelForCausalLM, "from_pretrained", boom)
    out = tmp_path / "o"
    assert _run(["bench", "speed", "--model", demo_gguf, "--generate_length", "2", "--peer", "transformers",
                 "--outputs_dir", str(out)]) in (0, None)
    rows, _, doc = _results(out)
    assert [r["engine"] for r in rows] == ["fastload"]
    assert "no such checkpoint for transformers" in doc["peer"]["transformers"]["error"]
    assert "--peer transformers failed" in capsys.readouterr().out


# ---- bench load's PCIe ceiling (issue 10: "bar chart with the disk and PCIe ceilings drawn in")
import fastload  # noqa: E402

CUDA_BUILT = fastload._C.build_info()["cuda_compiled"]


def test_load_pcie_row_skipped_on_the_cpu_with_a_reason(tmp_path, demo_gguf):
    out = tmp_path / "o"
    assert _run(["bench", "load", "--model", demo_gguf, "--device", "cpu", "--repeat", "1", "--no-cold",
                 "--outputs_dir", str(out)]) in (0, None)
    rows, _, doc = _results(out)
    assert bench.PCIE_ENGINE not in {r["engine"] for r in rows}
    assert any(n.startswith("PCIe ceiling not measured: the model is on cpu") for n in doc["notes"]), doc["notes"]


@pytest.mark.skipif(CUDA_BUILT, reason="this build has CUDA: the CPU-only refusal is not what it does")
def test_h2d_bandwidth_without_cuda_says_why():
    from fastload import _C
    with pytest.raises(NotImplementedError, match="without CUDA"):
        _C.cuda_h2d_bandwidth()
    with pytest.raises(NotImplementedError, match="without CUDA"):
        _C.cuda_h2d_bandwidth(0, 1 << 20, 2)
    with pytest.raises(bench.BenchError, match="without CUDA"):
        bench.pcie_ceiling("cuda", 1 << 30)
    with pytest.raises(bench.BenchError, match="the model is on cpu"):
        bench.pcie_ceiling("cpu", 1 << 30)


def test_pcie_row_from_the_measured_rate(monkeypatch):
    from fastload import _C, cuda
    calls = []

    def fake(device, nbytes, repeats):
        calls.append((device, nbytes, repeats))
        return 50.0
    monkeypatch.setattr(_C, "cuda_h2d_bandwidth", fake, raising=False)
    monkeypatch.setattr(cuda, "device_count", lambda: 2)
    row = bench.pcie_ceiling("cuda:1", 10 ** 9)
    assert calls == [(1, bench.PCIE_BYTES, bench.PCIE_REPEATS)]
    assert row["engine"] == bench.PCIE_ENGINE and row["cache"] == "any" and row["bytes"] == 10 ** 9
    assert row["seconds_median"] == pytest.approx(0.02) and "pinned" in row["how"]


def test_load_writes_the_pcie_row_when_measured(tmp_path, monkeypatch, demo_gguf):
    """The row as a GPU run writes it (the measurement faked: no GPU here): one row, cache 'any', the checkpoint's
    bytes at the copy rate, gb_per_s the rate, no vs_raw_read."""
    seen = {}

    def fake(device, nbytes, size=bench.PCIE_BYTES, repeats=bench.PCIE_REPEATS):
        seen["device"] = device
        secs = nbytes / 40e9
        return {"engine": bench.PCIE_ENGINE, "cache": "any", "runs": repeats, "times": [secs], "seconds_median": secs,
                "seconds_min": secs, "bytes": nbytes, "core_seconds_median": None, "how": "fake 40 GB/s"}
    monkeypatch.setattr(bench, "pcie_ceiling", fake)
    out = tmp_path / "o"
    assert _run(["bench", "load", "--model", demo_gguf, "--device", "cpu", "--repeat", "1", "--no-cold",
                 "--outputs_dir", str(out)]) in (0, None)
    rows, _, doc = _results(out)
    assert seen["device"] == "cpu"
    pcie = [r for r in rows if r["engine"] == bench.PCIE_ENGINE]
    assert len(pcie) == 1 and pcie[0]["cache"] == "any"
    assert float(pcie[0]["gb_per_s"]) == pytest.approx(40.0) and pcie[0]["vs_raw_read"] == ""
    assert not any("PCIe" in n for n in doc["notes"])


def test_load_warm_runs_come_before_any_eviction(tmp_path, monkeypatch, demo_gguf):
    """The first version probed eviction (drop_page_cache) before the warm runs, so on the H200 every "warm" load
    read the disk (the loader's O_DIRECT reads do not fill the page cache): 9.8 s where a warm load takes ~0.5 s.
    Warm loads must all come before the first eviction, right after a read that makes the pages resident."""
    events = []
    real_load, real_raw = bench.load_fastload, bench.raw_read

    def load(*a, **k):
        events.append("load")
        return real_load(*a, **k)

    def raw(*a, **k):
        events.append("raw")
        return real_raw(*a, **k)

    def drop(files):
        events.append("drop")
        return "fake eviction", 0

    monkeypatch.setattr(bench, "load_fastload", load)
    monkeypatch.setattr(bench, "raw_read", raw)
    monkeypatch.setattr(bench, "drop_page_cache", drop)
    monkeypatch.setattr(bench, "pcie_ceiling", lambda *a, **k: (_ for _ in ()).throw(bench.BenchError("no GPU")))
    out = tmp_path / "o"
    assert _run(["bench", "load", "--model", demo_gguf, "--device", "cpu", "--repeat", "2",
                 "--outputs_dir", str(out)]) in (0, None)
    first_drop = events.index("drop")
    # the first load finds the files; then a warming read, then the two warm loads, all before any eviction
    assert events[:first_drop].count("load") == 3 and events[1] == "raw", events
    assert events[first_drop:].count("load") == 2, events
    rows, _, _ = _results(out)
    assert {(r["engine"], r["cache"]) for r in rows} >= {("fastload", "warm"), ("fastload", "cold")}


@pytest.mark.gpu
@pytest.mark.skipif(not fastload.cuda.is_available(), reason="no CUDA device here")
def test_h2d_bandwidth_on_the_gpu():
    from fastload import _C, cuda
    before = cuda.memory_allocated(0)
    gbps = _C.cuda_h2d_bandwidth(0, 64 << 20, 3)
    assert 1.0 < gbps < 1000.0  # PCIe 3 x16 is ~12 GB/s, PCIe 5 x16 ~55, NVLink-C2C ~400
    assert cuda.memory_allocated(0) == before  # its device buffer was counted and given back
    with pytest.raises(ValueError, match="visible"):
        _C.cuda_h2d_bandwidth(cuda.device_count(), 1 << 20, 1)
    with pytest.raises(ValueError, match="repeats"):
        _C.cuda_h2d_bandwidth(0, 1 << 20, 0)
    with pytest.raises(ValueError, match="bytes"):
        _C.cuda_h2d_bandwidth(0, 0, 1)


def test_concurrency_several_pools_and_repeats(tmp_path, demo_gguf):
    """The former benchmarks/cpu_concurrency.py's measurement (loop against pools of several sizes, median of
    interleaved runs) is `bench concurrency --max_workers 1 3 --repeat 2` now: one row per pool, every run's wall time kept."""
    q = tmp_path / "queries.txt"
    q.write_text("Say hello.\nWhat is 2+3?\n", encoding="utf-8")
    out = tmp_path / "conc"
    assert _run(["bench", "concurrency", "--model", demo_gguf, "--queries", str(q), "--max_new_tokens", "2",
                 "--max_workers", "1", "3", "--repeat", "2", "--outputs_dir", str(out)]) in (0, None)
    rows, header, doc = _results(out)
    assert [r["mode"] for r in rows] == ["for-loop", "ThreadPoolExecutor(1)", "ThreadPoolExecutor(3)"]
    assert [int(r["workers"]) for r in rows] == [1, 1, 3]
    for r in doc["rows"]:
        assert r["runs"] == 2 and len(r["walls_s"]) == 2 and min(r["walls_s"]) <= r["wall_s"] <= max(r["walls_s"])
        assert r["same_answers_as_loop"] is True
    assert doc["answers"]["loop"] == doc["answers"]["pool"] == doc["answers"]["pool(3)"]
    assert doc["repeat"] == 2


@pytest.mark.parametrize("argv, message", [
    (["--max_workers", "2", "0"], "--max_workers must be at least 1"),
    (["--repeat", "0"], "--repeat must be at least 1"),
])
def test_concurrency_bad_pool_arguments(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    assert _run(["bench", "concurrency", *argv, "--outputs_dir", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_environment_commit_from_fastload_commit(monkeypatch):
    """An installed copy (pip install . on a GPU machine) has no .git: FASTLOAD_COMMIT names the commit measured."""
    monkeypatch.setenv("FASTLOAD_COMMIT", "abc1234")
    env = bench.environment("cpu")
    assert env["git_commit"] == "abc1234" and env["git_dirty"] is None


# ---- figures that mean what they say (a bug hunt, 2026-12-06, fortieth session) -----------------------------------
def test_json_outputs_are_strict_json(tmp_path):
    """A one-word text's word perplexity overflows to inf: json.dumps wrote the bare token Infinity, which strict
    parsers refuse; non-finite values are null now."""
    assert bench.json_safe({"a": float("inf"), "b": [float("nan"), 1.5], "c": "x"}) == {"a": None, "b": [None, 1.5],
                                                                                      "c": "x"}
    out = bench.Outputs(str(tmp_path / "o"))
    _, j = out.write("t", [{"x": float("-inf")}], ["x"], {"m": float("inf")})
    doc = json.loads(open(j).read(), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["m"] is None and doc["rows"][0]["x"] is None


def test_result_names_do_not_collide_within_a_second():
    assert bench._stem("load", "m") != bench._stem("load", "m")


def test_quant_column_is_what_the_model_holds():
    class M:
        def __init__(self, q):
            self.quantization_config = q

    # (read from the model only: an int8 asked for over a GGUF's own blocks is not what it holds)
    assert bench._quant_name(M({"quant_method": "gguf", "gguf": "keep"})) == "gguf"
    assert bench._quant_name(M({"quant_method": "fastload", "scheme": "nf4"})) == "nf4"
    assert bench._quant_name(M(None)) == "none"


def test_info_loads_the_model_when_its_options_are_given(demo_gguf, capsys, monkeypatch):
    monkeypatch.setenv("FASTLOAD_MODEL", demo_gguf)
    assert _run(["info", "--dtype", "float32"]) in (0, None)
    rep = json.loads(capsys.readouterr().out)
    assert rep["model"]["dtype"] == "float32"


def test_usage_names_the_command_the_user_typed(monkeypatch, capsys, tmp_path):
    """The console script pip installs is `fastload`; usage and error lines said `python -m fastload` for it too."""
    for argv0, prog in (("/usr/local/bin/fastload", "fastload"), ("/x/fastload/__main__.py", "python -m fastload")):
        monkeypatch.setattr(sys, "argv", [argv0])
        with pytest.raises(SystemExit):
            main(["no-such-command"])
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog}: error: argument cmd")
        assert main(["info", "--model", str(tmp_path / "missing")]) == 2
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog} info: error: ")
        with pytest.raises(SystemExit):
            main(["bench", "concurrency", "--model", str(tmp_path / "missing"), "--outputs", str(tmp_path / "o")])
        assert capsys.readouterr().err.splitlines()[-1].startswith(f"{prog} bench concurrency: error: ")
