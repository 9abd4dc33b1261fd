"""Small utilities shared by the experiment scripts."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

__all__ = ["write_json", "save_figure", "energy_distance", "progress"]


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


@jax.jit
def energy_distance(x, y):
    """``2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (V-statistic) between ``(n, d)`` and ``(m, d)``."""

    def mean_dist(a, b):
        d2 = jnp.sum(a * a, 1)[:, None] - 2 * a @ b.T + jnp.sum(b * b, 1)[None]
        return jnp.mean(jnp.sqrt(jnp.clip(d2, 1e-12, None)))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def progress(msg: str):
    print(f"[jaxdiv] {msg}", flush=True)
