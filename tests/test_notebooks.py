"""notebooks/: every notebook runs top to bottom headless on the CPU (nbclient, a python3 kernel of this Python, the
demo model) with tiny sizes injected after its "parameters" cell, without an error, and draws its plot; the
committed copies carry their outputs (figures included) and no errors.

Deselect with `-m "not notebooks"`. Needs `pip install -e ".[notebooks]"` (nbclient, nbformat, ipykernel,
matplotlib); skips with the reason when one is missing. Figures: matplotlib's inline backend (Agg), MPLBACKEND=Agg
for anything else, so no display is needed.
"""
import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
sys.path.insert(0, NB_DIR)

pytestmark = pytest.mark.notebooks

NOTEBOOKS = ["01_quickstart", "02_load_time", "03_speed_benchmark", "04_concurrency", "05_quantisation"]
WITH_PLOT = NOTEBOOKS[1:]  # the benchmark notebooks; the quickstart prints only

# Tiny sizes: each notebook's run stays a few seconds on 2 cores. outputs_dir is set per test (tmp_path).
TINY = {
    "01_quickstart": {"max_new_tokens": 8},
    "02_load_time": {"repeat": 1, "cold": False},  # cold would evict pages of a shared machine's cache
    "03_speed_benchmark": {"context_lengths": [1, 8], "generate_length": 2},
    "04_concurrency": {"queries": ["Say hi.", "What is 2+3?"], "max_new_tokens": 2},
    "05_quantisation": {"modes": "gguf", "max_chars": 200, "context": 32, "generate_length": 2},
}


def _missing():
    return [m for m in ("nbformat", "nbclient", "ipykernel", "matplotlib") if importlib.util.find_spec(m) is None]


def _need_nbformat():
    if importlib.util.find_spec("nbformat") is None:
        pytest.skip('nbformat not installed (pip install -e ".[notebooks]")')


def _read(name):
    import nbformat
    return nbformat.read(os.path.join(NB_DIR, name + ".ipynb"), as_version=4)


def _outputs(nb):
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_notebook_list():
    """The five notebooks of issue 10, no more, no fewer (execute.notebooks() is what gets run and re-run)."""
    import execute
    assert [os.path.basename(p)[:-6] for p in execute.notebooks()] == NOTEBOOKS


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_parameters_cell(name):
    """The first code cell is tagged "parameters" (papermill) and defaults to the demo model on device "auto"."""
    _need_nbformat()
    nb = _read(name)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", [])
    ns = {}
    exec(first.source, ns)  # plain assignments only
    assert ns["model"] is None and ns["device"] == "auto"
    assert not any("injected-parameters" in c.metadata.get("tags", []) for c in nb.cells)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_outputs(name):
    """The committed notebook was run: every code cell has run, none raised, the benchmark ones hold a figure."""
    _need_nbformat()
    nb = _read(name)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), "a code cell was not executed"
    outs = _outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    if name in WITH_PLOT:
        assert any("image/png" in o.get("data", {}) for o in outs), "no figure saved"


def test_inject_rejects_unknown_parameter():
    """A misspelt override is an error naming it, not silently ignored; a known one lands after the parameters cell."""
    _need_nbformat()
    import execute
    nb = _read("03_speed_benchmark")
    with pytest.raises(ValueError, match="generate_lenght"):
        execute.inject_parameters(nb, {"generate_lenght": 2})
    execute.inject_parameters(nb, {"generate_length": 2, "device": "cpu"})
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    injected = nb.cells[i + 1]
    assert injected.metadata["tags"] == ["injected-parameters"]
    assert "generate_length = 2\n" in injected.source and "device = 'cpu'\n" in injected.source


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_provenance_cell_is_rewritten_by_a_run(name):
    """Each notebook's cell saying which run made its outputs is tagged "provenance", and execute.py rewrites it with
    the run's date, commit and parameters when it saves: a CPU re-run saved in place kept the committed H200 run's
    text (hunt22)."""
    _need_nbformat()
    import execute
    nb = _read(name)
    cells = [c for c in nb.cells if "provenance" in c.metadata.get("tags", [])]
    assert len(cells) == 1 and cells[0].cell_type == "markdown" and "H200" in cells[0].source
    execute.set_provenance(nb, {"device": "cpu", "max_new_tokens": 8}, when="2026-12-06 23:00 UTC", commit="abc1234")
    src = cells[0].source
    assert "H200" not in src and "2026-12-06 23:00 UTC at commit abc1234" in src
    assert "device = 'cpu'\nmax_new_tokens = 8\n" in src
    execute.set_provenance(nb, {}, when="x", commit="")
    assert "the parameter cell's defaults" in cells[0].source


def test_execute_names_a_path_that_is_no_notebook(tmp_path, capsys):
    _need_nbformat()
    import execute
    bad = tmp_path / "x.ipynb"
    bad.write_text("not json")
    for p in (str(tmp_path / "nope.ipynb"), str(bad)):
        with pytest.raises(SystemExit) as e:
            execute.main([p])
        assert e.value.code == 2 and p in capsys.readouterr().err


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs(name, demo_gguf, tmp_path, monkeypatch):
    missing = _missing()
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed (pip install -e ".[notebooks]")')
    if os.environ.get("FASTLOAD_TEST_EXPECT_C"):
        pytest.skip("sanitized run (tools/sanitize_tests.sh): a Jupyter kernel under ASan is left out; the notebooks "
                    "drive the same C paths as test_demo / test_bench_cli")
    import execute
    # the kernel is a child of this process: it imports this tree's fastload and draws with Agg
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # one compute thread: two OpenMP threads on 2 shared cores spin at barriers while other work runs, and a
    # notebook then took 5x longer (23 s against 4 s for the quickstart); the C paths are the same
    monkeypatch.setenv("FASTLOAD_THREADS", "1")
    monkeypatch.setenv("FASTLOAD_DEMO_GGUF", demo_gguf)
    for var in ("FASTLOAD_MODEL", "FASTLOAD_DEVICE", "FASTLOAD_QUANT"):
        monkeypatch.delenv(var, raising=False)
    params = dict(TINY[name], device="cpu")
    if name != "01_quickstart":
        params["outputs_dir"] = str(tmp_path / "out")
    nb = execute.execute(os.path.join(NB_DIR, name + ".ipynb"), params, cwd=str(tmp_path), timeout=120)
    outs = _outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    if name in WITH_PLOT:
        assert any("image/png" in o.get("data", {}) for o in outs), "the notebook drew no figure"
        assert "$ python -m fastload bench" in text and "--device cpu" in text  # fastload.bench ran, as asked
        written = sorted(os.listdir(tmp_path / "out"))
        assert [f for f in written if f.endswith(".csv")] and [f for f in written if f.endswith(".json")]
    else:
        assert "2 + 3 = 5" in text  # the chat answer (greedy)
        assert "'weights':" in text  # memory_stats()


def _bench_json(argv, out):
    """Run `python -m fastload bench ARGV --outputs_dir OUT` here and return (path, document) of the JSON."""
    import argparse
    import json
    from fastload import bench
    ap = argparse.ArgumentParser()
    bench.add_parser(ap.add_subparsers(dest="cmd"))
    args = ap.parse_args(["bench", *argv, "--outputs_dir", str(out)])
    _csv, path = args.fn_bench(args)
    with open(path, encoding="utf-8") as fh:
        return path, json.load(fh)


@pytest.mark.parametrize("name", ["02_load_time", "03_speed_benchmark"])
def test_notebook_draws_results_json(name, demo_gguf, tmp_path, monkeypatch):
    """results_json: the notebook draws the numbers of an earlier `bench` run (a GPU run's, for the committed outputs)
    instead of measuring again; 02 draws a PCIe reference row (cache "any") as a line and names it."""
    missing = _missing()
    if missing:
        pytest.skip(f'{", ".join(missing)} not installed (pip install -e ".[notebooks]")')
    if os.environ.get("FASTLOAD_TEST_EXPECT_C"):
        pytest.skip("sanitized run: no Jupyter kernel under ASan")
    import json

    import execute
    from fastload import bench
    monkeypatch.setenv("FASTLOAD_THREADS", "1")
    if name == "02_load_time":
        path, doc = _bench_json(["load", "--model", demo_gguf, "--device", "cpu", "--repeat", "1", "--no-cold"],
                                tmp_path / "src")
        n = doc["bytes"]
        doc["rows"].append({"engine": bench.PCIE_ENGINE, "cache": "any", "runs": 5, "seconds_median": n / 50e9,
                            "seconds_min": n / 50e9, "bytes": n, "gb_per_s": 50.0, "vs_raw_read": None,
                            "core_seconds_median": None, "how": "a GPU run's row"})
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(doc, fh)
    else:
        path, doc = _bench_json(["speed", "--model", demo_gguf, "--device", "cpu", "--context_length", "1", "4",
                                 "--generate_length", "2"], tmp_path / "src")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # a model that does not exist: the notebook must not load anything when it draws a JSON
    params = {"results_json": path, "device": "cpu", "outputs_dir": str(tmp_path / "out"),
              "model": str(tmp_path / "no-such-model")}
    nb = execute.execute(os.path.join(NB_DIR, name + ".ipynb"), params, cwd=str(tmp_path), timeout=120)
    outs = _outputs(nb)
    assert not [o for o in outs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outs if o.output_type == "stream")
    assert f"drawn from {path}" in text and "$ python -m fastload bench" not in text
    assert any("image/png" in o.get("data", {}) for o in outs)
    assert not os.path.exists(tmp_path / "out")  # nothing measured, nothing written
    if name == "02_load_time":
        assert "reference: PCIe host-to-device (any): 50 GB/s" in text
        assert "reference: raw read (warm)" in text
