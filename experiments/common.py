"""Small utilities shared by the experiment scripts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from jaxdiv.metrics import energy_distance  # re-exported for the experiment scripts

__all__ = ["write_json", "save_figure", "progress", "energy_distance"]


def write_json(path, obj):
    """Write JSON atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


def save_figure(fig, path):
    """Save a matplotlib figure atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def progress(msg: str):
    print(f"[jaxdiv] {msg}", flush=True)
