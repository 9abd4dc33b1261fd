"""Small utilities shared by the experiment scripts."""

from __future__ import annotations

import io
from pathlib import Path

from experiments import run_folder
from jaxdiv.metrics import energy_distance  # re-exported for the experiment scripts

__all__ = ["write_json", "save_figure", "progress", "energy_distance"]


def write_json(path, obj):
    """Write JSON atomically (:func:`experiments.run_folder.write_json`: whole or absent,
    mode from the umask)."""
    run_folder.write_json(path, obj)


def save_figure(fig, path):
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    run_folder.atomic_write(path, buf.getvalue())


def progress(msg: str):
    print(f"[jaxdiv] {msg}", flush=True)
