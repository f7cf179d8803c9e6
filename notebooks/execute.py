"""Run the notebooks top to bottom headless (nbclient), with parameters, and save them with their outputs.

    python notebooks/execute.py                                   # every notebook, defaults, saved in place
    python notebooks/execute.py -p device cuda -p model Qwen/Qwen2.5-7B-Instruct notebooks/03_speed_benchmark.ipynb
    python notebooks/execute.py -p context_lengths "[1, 6144, 14336, 30720]" -p generate_length 2048 \\
        -p peer_transformers True notebooks/03_speed_benchmark.ipynb

Parameters go in as papermill does it: a cell tagged "injected-parameters" right after the cell tagged
"parameters", so the notebooks also run under `papermill NB OUT -p NAME VALUE` or
`jupyter nbconvert --to notebook --execute`. A -p VALUE is read as a Python literal where it is one (numbers, lists,
True/None), else taken as a string. Needs `pip install -e ".[notebooks]"` (nbclient, nbformat, ipykernel, matplotlib).
Figures use matplotlib's inline backend, which draws with Agg: no display is needed.
"""
from __future__ import annotations

import argparse
import ast
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def notebooks():
    """The numbered notebooks of this directory, in order."""
    return sorted(glob.glob(os.path.join(HERE, "[0-9][0-9]_*.ipynb")))


def parameter_names(nb):
    """Names assigned in the notebook's cell tagged "parameters" (ValueError when it has none)."""
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    known = set()
    for node in ast.parse(cells[0].source).body:
        if isinstance(node, ast.Assign):
            known.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return known


def inject_parameters(nb, params, strict=True):
    """Put `name = value` lines for params in a cell tagged "injected-parameters" after the "parameters" cell
    (replacing an earlier injected cell). Raises ValueError when the notebook has no parameters cell or, when
    strict, a name is not one of its parameters (a misspelt override would otherwise be ignored without a word);
    not strict: such names are left out."""
    import nbformat
    cells = [c for c in nb.cells if "injected-parameters" not in c.get("metadata", {}).get("tags", [])]
    idx = [i for i, c in enumerate(cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    if not idx:
        raise ValueError("the notebook has no cell tagged 'parameters'")
    known = parameter_names(nb)
    unknown = sorted(set(params) - known)
    if unknown and strict:
        raise ValueError(f"not parameters of this notebook: {', '.join(unknown)} (it has: {', '.join(sorted(known))})")
    params = {k: v for k, v in params.items() if k in known}
    if params:
        src = "# Injected parameters\n" + "".join(f"{k} = {v!r}\n" for k, v in params.items())
        cell = nbformat.v4.new_code_cell(src)
        cell.metadata["tags"] = ["injected-parameters"]
        cells.insert(idx[0] + 1, cell)
    nb.cells = cells
    return nb


def _commit():
    """The repository's commit (short hash, "+dirty" with uncommitted changes), or None outside a git checkout."""
    import subprocess
    try:
        run = lambda *a: subprocess.run(["git", "-C", HERE, *a], capture_output=True, text=True, timeout=10)
        h = run("rev-parse", "--short", "HEAD")
        if h.returncode:
            return None
        return h.stdout.strip() + ("+dirty" if run("status", "--porcelain", "--untracked-files=no").stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def set_provenance(nb, params, when=None, commit=None):
    """Rewrite the markdown cell tagged "provenance" (the committed notebooks' cell saying which run made their
    outputs) to say what this run was: its date, the commit and the parameters injected. Without it a re-run saved
    in place kept the text of the run it replaced (an H200 run's, over a CPU run's outputs). No such cell: nothing."""
    import datetime
    when = when or datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = commit if commit is not None else _commit()
    for c in nb.cells:
        if c.cell_type == "markdown" and "provenance" in c.get("metadata", {}).get("tags", []):
            shown = "".join(f"{k} = {v!r}\n" for k, v in params.items())
            c.source = (f"The outputs below come from `notebooks/execute.py` run on {when}"
                        + (f" at commit {commit}" if commit else "")
                        + (", with these parameters injected after the cell above:\n```python\n" + shown + "```"
                           if shown else ", with the parameter cell's defaults above.")
                        + "\nThe device, model and versions the run used are printed by the cells themselves.")
    return nb


def execute(path, params=None, cwd=None, timeout=600, output=None, strict=True):
    """Execute the notebook at `path` with `params` (dict) injected; save it to `output` (None: do not save).
    Returns the executed notebook; an error in a cell raises nbclient's CellExecutionError."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.read(path, as_version=4)
    inject_parameters(nb, params or {}, strict=strict)
    # the kernel's own log at ERROR: its warning that a local kernel's TCP traffic is not encrypted would
    # otherwise land in the saved outputs
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3",
                            extra_arguments=["--IPKernelApp.log_level=ERROR"],
                            resources={"metadata": {"path": cwd or os.path.dirname(os.path.abspath(path))}})
    client.execute()
    if output:
        known = parameter_names(nb)  # the parameters inject_parameters put in (strict: all of them, or it raised)
        set_provenance(nb, {k: v for k, v in (params or {}).items() if k in known})
        nbformat.write(nb, output)
    return nb


def _value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("notebooks", nargs="*", help="notebooks to run (default: all of notebooks/)")
    ap.add_argument("-p", "--parameter", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    ap.add_argument("--output-dir", default=None, help="write the executed notebooks here (default: in place)")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per cell (default 3600)")
    args = ap.parse_args(argv)
    params = {k: _value(v) for k, v in args.parameter}
    paths = args.notebooks or notebooks()
    import nbformat
    known = set()
    for p in paths:
        try:
            known |= parameter_names(nbformat.read(p, as_version=4))
        except (OSError, ValueError) as e:  # missing, unreadable, not a notebook (nbformat's NotJSONError is one)
            ap.error(f"{p}: not a notebook this script can run ({type(e).__name__}: {e})")
    unknown = sorted(set(params) - known)
    if unknown:
        ap.error(f"-p {', '.join(unknown)}: not a parameter of any of these notebooks ({', '.join(sorted(known))})")
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    for p in paths:
        out = os.path.join(args.output_dir, os.path.basename(p)) if args.output_dir else p
        print(f"{p} -> {out}", flush=True)
        execute(p, params, timeout=args.timeout, output=out, strict=False)  # each takes the names it has
    return 0


if __name__ == "__main__":
    sys.exit(main())
