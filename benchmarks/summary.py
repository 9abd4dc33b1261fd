"""One screen of every ratio the benchmark JSONs under ``results/`` hold.

    python -m benchmarks.summary [--root results]

``make bench`` runs the CPU benchmarks and then this. Every benchmark writes its own JSON
layout; the summary reads them all the same way: each number whose key names a ratio
(``..._over_...``, ``ratio...``, ``speedup...``, ``overhead...``) is printed with the
row's identifying fields (config, method, sizes), the file's date, its CPU (where
recorded) and its peak resident memory, so the figures quoted in the README can be found
again without opening files.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

_RATIO = re.compile(r"(^|_)(over|ratio|speedup|overhead)(_|$)")
# fields that tell the rows of one file apart
_LABELS = ("config", "method", "workload", "name", "seq", "latent", "batch", "d", "num_reference",
           "num_shields", "devices", "threads", "steps", "dtype", "lhs", "rhs", "hw",
           "in_channels", "out_channels", "stride", "path", "shape")  # fmt: skip


def _label(value) -> str | None:
    """A row field as it is printed: numbers and strings as they are, shapes as ``8x320``."""
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    return None


def ratios(tree, where: str = "") -> list[tuple[str, str, float]]:
    """``(row, key, value)`` for every finite number under a ratio-named key of ``tree``
    (model configurations are skipped: their ``mlp_ratio`` is not a measurement).

    >>> ratios({"rows": [{"config": "tiny", "torch_over_jax": 1.5, "jax_s": 2.0}]})
    [('rows[0] config=tiny', 'torch_over_jax', 1.5)]
    """
    out = []
    if isinstance(tree, dict):
        # a field already named on the way down (the file's own dtype, say) is not repeated
        tags = " ".join(tag for k in _LABELS if k in tree and _label(tree[k]) is not None
                        if (tag := f"{k}={_label(tree[k])}") not in where.split())  # fmt: skip
        here = " ".join(p for p in (where, tags) if p)
        for key, value in tree.items():
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if is_number and _RATIO.search(key) and math.isfinite(value):
                out.append((here, key, float(value)))
            elif isinstance(value, dict) and "config" not in key:
                out.extend(ratios(value, f"{here} {key}".strip()))
            elif isinstance(value, list):
                out.extend(ratios(value, f"{here} {key}".strip()))
    elif isinstance(tree, list):
        for i, item in enumerate(tree):
            out.extend(ratios(item, f"{where}[{i}]"))
    return out


def _environment(data: dict) -> dict:
    """Where a JSON keeps its environment: sd_step under "meta", metrics and gpu_suite under
    "environment", benchmarks.conv in each flag set's child result (the first one here)."""
    env = data.get("meta") or data.get("environment")
    if env or "date" in data:
        return env or data
    for value in data.values():
        if isinstance(value, dict) and (found := _environment(value)) is not value:
            return found
    return data


def _meta(data: dict) -> str:
    env = _environment(data)
    date = str(env.get("date", "?"))[:10]
    cpu = env.get("cpu", {}).get("model") if isinstance(env.get("cpu"), dict) else None
    rss = env.get("peak_rss_mb")
    if rss is None and env.get("peak_rss_gb") is not None:
        rss = 1024 * env["peak_rss_gb"]
    parts = [date] + ([cpu] if cpu else [])
    parts.append(f"peak RSS {rss / 1024:.1f} GB" if rss else "peak RSS not recorded")
    return ", ".join(parts)


def summary(root: Path) -> list[str]:
    """The lines :func:`main` prints for the JSON files under ``root``: a heading per
    file, then one line per row with its ratios."""
    lines = []
    for path in sorted(Path(root).rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            lines.append(f"{path}: unreadable ({err})")
            continue
        found = ratios(data) if isinstance(data, dict) else []
        if not found:
            continue
        lines.append(f"{path.relative_to(root)}  ({_meta(data)})")
        rows: dict[str, list[str]] = {}
        for row, key, value in found:
            rows.setdefault(row, []).append(f"{key} {value:.3g}")
        lines.extend(f"  {row or '-'}: {', '.join(items)}" for row, items in rows.items())
    return lines


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.summary",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--root", default="results", help="folder searched for *.json")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        parser.error(f"--root {str(root)!r} is not a folder (run the benchmarks first)")
    lines = summary(root) or [f"no benchmark ratios under {root}/ yet"]
    print("\n".join(lines))
    return lines


if __name__ == "__main__":
    main()
