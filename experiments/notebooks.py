"""Execute the notebooks in place so their stored outputs (figures included) are current.

    python -m experiments.notebooks [notebooks/*.ipynb] [--max-kb 400] [--check]

``make notebooks`` runs this. Each notebook is executed top to bottom in a fresh kernel
(nbclient) with matplotlib's inline backend, so a reader on a code host sees the figures;
per-cell execution timestamps are dropped (they would change every run and say nothing).
A notebook whose stored size exceeds ``--max-kb`` is an error: figures must stay small.
``--check`` executes nothing and fails if a notebook has a code cell never executed or is
too large (``tests/test_notebooks_stored.py`` runs the same check). ``make test`` re-runs
every notebook through nbmake (without writing) so a stale one fails there.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAX_KB = 400


def notebook_problems(path: Path, max_kb: int = DEFAULT_MAX_KB) -> list[str]:
    """What is wrong with a stored notebook: code cells never executed, oversize file.

    >>> import tempfile, nbformat
    >>> nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("1 + 1")])
    >>> p = Path(tempfile.mkdtemp()) / "a.ipynb"; nbformat.write(nb, p)
    >>> notebook_problems(p)
    ['a.ipynb: code cell 0 was not executed (run `make notebooks`)']
    """
    import nbformat

    problems = []
    nb = nbformat.read(path, as_version=4)
    for i, cell in enumerate(c for c in nb.cells if c.cell_type == "code"):
        if cell.source.strip() and cell.get("execution_count") is None:
            problems.append(f"{path.name}: code cell {i} was not executed "
                            "(run `make notebooks`)")  # fmt: skip
    kb = path.stat().st_size / 1024
    if kb > max_kb:
        problems.append(f"{path.name}: {kb:.0f} KB stored, more than --max-kb {max_kb}")
    return problems


def execute_in_place(path: Path, timeout_s: int = 600) -> None:
    """Run ``path`` in a fresh kernel (cwd: its folder) and write it back with outputs."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    # the inline backend stores figures as PNG outputs; Agg (set by the Makefile) would not
    os.environ["MPLBACKEND"] = "module://matplotlib_inline.backend_inline"
    NotebookClient(nb, timeout=timeout_s, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()  # fmt: skip
    for cell in nb.cells:
        cell.metadata.pop("execution", None)
    tmp = path.with_name(f".{path.name}.tmp")
    nbformat.write(nb, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run leaves the old notebook


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("paths", nargs="*", type=Path,
                   help="notebooks (default: every notebooks/*.ipynb)")  # fmt: skip
    p.add_argument("--max-kb", type=int, default=DEFAULT_MAX_KB,
                   help="largest stored size allowed per notebook, in KB")  # fmt: skip
    p.add_argument("--check", action="store_true",
                   help="execute nothing; fail on unexecuted cells or oversize files")
    args = p.parse_args(argv)
    paths = args.paths or sorted((ROOT / "notebooks").glob("*.ipynb"))
    problems = []
    for path in paths:
        if not args.check:
            print(f"[notebooks] executing {path}", flush=True)
            execute_in_place(path)
        problems += notebook_problems(path, args.max_kb)
    for line in problems:
        print(f"[notebooks] {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
