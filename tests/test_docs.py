"""The API reference (``make docs``) builds warning-free and covers the public API.

Sphinx runs with ``-W`` (every warning an error: a malformed docstring section, a broken
cross-reference, a duplicated object), and every name a documented module exports must
appear as an anchor in the built HTML, so a new public function cannot be left out.
"""

from __future__ import annotations

import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _documented_modules() -> dict[str, bool]:
    """``module -> documents its members`` from the ``automodule`` directives of docs/api."""
    found = {}
    for page in sorted((DOCS / "api").glob("*.rst")):
        text = page.read_text()
        for m in re.finditer(r"^\.\. automodule:: (\S+)\n((?:   :\S+:.*\n)*)", text, re.M):
            found[m.group(1)] = ":no-members:" not in m.group(2)
    return found


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs_html")
    cmd = [sys.executable, "-m", "sphinx", "-E", "-W", "--keep-going", "-q", "-b", "html",
           str(DOCS), str(out)]  # fmt: skip
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"sphinx -W failed:\n{run.stdout}\n{run.stderr}"
    return out


def test_docs_build_without_warnings(html):
    assert (html / "index.html").is_file()
    assert (html / "api" / "guidance.html").is_file()


def test_every_exported_name_has_an_entry(html):
    ids = set()
    for page in (html / "api").glob("*.html"):
        ids |= set(re.findall(r'id="([\w.]+)"', page.read_text()))
    modules = _documented_modules()
    assert {"jaxdiv.guidance", "jaxdiv.samplers", "jaxdiv.metrics", "jaxdiv.models"} <= set(
        modules
    )
    missing = []
    for name, with_members in modules.items():
        mod = importlib.import_module(name)
        exported = getattr(mod, "__all__", []) if with_members else []
        for attr in exported:
            if not callable(getattr(mod, attr)):  # modules and constants: not API entries
                continue
            if f"{name}.{attr}" not in ids:
                missing.append(f"{name}.{attr}")
    for full in ("jaxdiv.sample", "jaxdiv.compile_count", "jaxdiv.SampleOutput",
                 "jaxdiv.Trace", "jaxdiv.guidance.HOOKS", "jaxdiv.predictions.PREDICTION_TYPES"):
        if full not in ids:
            missing.append(full)
    assert not missing, f"public names without an API entry: {missing}"


def test_every_public_function_has_a_runnable_example():
    """Functions (not result containers) carry a ``>>>`` example; ``make test`` runs them."""
    lacking = []
    for name in _documented_modules():
        mod = importlib.import_module(name)
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if inspect.isfunction(obj) and ">>>" not in (inspect.getdoc(obj) or ""):
                lacking.append(f"{name}.{attr}")
    assert not lacking, f"public functions without a runnable example: {lacking}"


def test_every_function_a_submodule_exports_has_a_runnable_example():
    """The same for every module of ``jaxdiv`` and ``toy``, documented pages or not (names a
    submodule lists in ``__all__`` are public even where its package does not re-export
    them, e.g. ``jaxdiv.guidance.base.guided_denoise``)."""
    import pkgutil

    import jaxdiv
    import toy

    lacking = []
    for pkg in (jaxdiv, toy):
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            mod = importlib.import_module(info.name)
            for attr in getattr(mod, "__all__", []):
                obj = getattr(mod, attr)
                if (inspect.isfunction(obj) and obj.__module__ == mod.__name__
                        and ">>>" not in (inspect.getdoc(obj) or "")):  # fmt: skip
                    lacking.append(f"{info.name}.{attr}")
    assert not lacking, f"public functions without a runnable example: {lacking}"


def test_readme_and_guide_links_point_at_files_that_exist():
    """Relative links and images of the README and the guide resolve (anchors aside)."""
    broken = []
    pages = [ROOT / "README.md", *sorted((DOCS / "guide").glob("*.md"))]
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith(("http://", "https://", "#")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_readme_figures_are_small():
    images = re.findall(r"!\[[^]]*\]\(([^)]+\.png)\)", (ROOT / "README.md").read_text())
    assert len(images) >= 3, images
    for image in images:
        size_kb = (ROOT / image).stat().st_size / 1024
        assert size_kb < 250, f"{image}: {size_kb:.0f} KB"
