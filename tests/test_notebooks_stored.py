"""The notebooks are committed executed (figures included) and small.

``make notebooks`` (``python -m experiments.notebooks``) refreshes them; ``make test``
re-executes each through nbmake, so this file checks only what is stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat

from experiments.notebooks import DEFAULT_MAX_KB, main, notebook_problems

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


def test_every_stored_notebook_is_executed_and_small():
    assert NOTEBOOKS
    assert main(["--check"]) == 0
    problems = [p for nb in NOTEBOOKS for p in notebook_problems(nb)]
    assert not problems, problems


def test_stored_figures_are_there_for_a_reader():
    with_png = [p.name for p in NOTEBOOKS
                if "image/png" in json.dumps(json.loads(p.read_text())["cells"])]  # fmt: skip
    assert len(with_png) >= 4, with_png


def test_unexecuted_and_oversize_notebooks_are_reported(tmp_path):
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1"),
                                         nbformat.v4.new_markdown_cell("text")])  # fmt: skip
    path = tmp_path / "fresh.ipynb"
    nbformat.write(nb, path)
    assert notebook_problems(path) == [
        "fresh.ipynb: code cell 0 was not executed (run `make notebooks`)"
    ]
    nb.cells[0].execution_count = 1
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="x" * (DEFAULT_MAX_KB * 1024))]
    nbformat.write(nb, path)
    (problem,) = notebook_problems(path)
    assert problem.startswith("fresh.ipynb: ") and f"--max-kb {DEFAULT_MAX_KB}" in problem
    assert main(["--check", str(path)]) == 1
