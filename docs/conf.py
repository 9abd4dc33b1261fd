"""Sphinx configuration of the API reference (``make docs``; built warning-free in the tests)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

project = "jaxdiv"
author = "jaxdiv maintainers"
copyright = "2026, jaxdiv maintainers"  # noqa: A001 -- Sphinx reads this name

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_parser",  # the guide pages are Markdown (moved out of the README)
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
# the guide's headings are Markdown titles, not cross-reference targets
myst_heading_anchors = 3
# docstrings are Google style: Args / Returns / Raises / Example sections
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
# "Attributes:" as instance-variable fields: NamedTuple fields are not described twice
napoleon_use_ivar = True
autodoc_default_options = {"members": True, "undoc-members": False, "show-inheritance": False}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# signatures show the names users type (``jax.Array``), not internal aliases
autodoc_type_aliases: dict[str, str] = {}
nitpicky = False
exclude_patterns = ["_build", "*.png"]
html_theme = "furo"
html_title = "jaxdiv API reference"
