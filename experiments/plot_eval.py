"""Figures from an ``experiments.evaluate`` folder: diversity vs fidelity, and image grids.

    jaxdiv plot results/eval/NAME [--x fd] [--y vendi_mean] [--images 8]
    (or python -m experiments.plot_eval ...)

Writes into the folder:

* ``pareto_<encoder>.png``: one point per image folder (method / setting), ``--y`` (a
  diversity metric) against ``--x`` (a fidelity metric; lower is better for ``fd``,
  ``kid_mean``, ``cmmd``, ``mss_mean``, higher for the others), each with its error bar
  where it has one (a ``*_mean`` its bootstrap 95% interval, ``kid_mean`` +- ``kid_std``);
  the non-dominated folders are joined as the Pareto front;
* ``grid_p<k>.png``: for each prompt, one row per folder (its name on the left), the first
  ``--images`` images of that prompt; folders that record no prompts (plain image folders)
  share one more grid of their first images.

The folder is locked while the figures are written (the lock ``experiments.evaluate``
takes: neither runs while the other writes there); every file is written atomically;
matplotlib's Agg backend, no display needed.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

import numpy as np

from experiments import run_folder

# fidelity / diversity metrics where a smaller value is better
LOWER_IS_BETTER = ("fd", "kid_mean", "cmmd", "mss_mean")
# the metrics an evaluation computes only with a --reference, or with --clip-text (CLIP)
NEEDS_REFERENCE = ("fd", "kid_mean", "kid_std", "precision", "recall", "density", "coverage",
                   "cmmd")  # fmt: skip
NEEDS_TEXT = ("clip_score_mean", "spp_mean")


def pareto_front(x, y, x_lower_better: bool = True, y_lower_better: bool = False) -> list[int]:
    """Indices of the non-dominated points, sorted by ``x``: no other point is at least as
    good in both coordinates and strictly better in one.

    >>> pareto_front([1.0, 2.0, 3.0, 2.5], [1.0, 3.0, 4.0, 2.0])  # low x, high y
    [0, 1, 2]
    """
    px = np.asarray(x, np.float64) * (1 if x_lower_better else -1)
    py = np.asarray(y, np.float64) * (1 if y_lower_better else -1)
    keep = []
    for i in range(len(px)):
        dominated = np.any((px <= px[i]) & (py <= py[i]) & ((px < px[i]) | (py < py[i])))
        if not dominated and np.isfinite(px[i]) and np.isfinite(py[i]):
            keep.append(i)
    return sorted(keep, key=lambda i: (x[i], i))


def _save_png(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    run_folder.atomic_write(path, buf.getvalue())


def error_bar(pooled: dict, name: str) -> tuple[float, float]:
    """The lengths (below, above) of metric ``name``'s error bar: a ``*_mean``'s bootstrap
    95% interval, ``kid_mean`` +- ``kid_std``, else none.

    >>> error_bar({"vendi_mean": 3.0, "vendi_ci95": [2.5, 3.25]}, "vendi_mean")
    (0.5, 0.25)
    >>> error_bar({"kid_mean": 0.01, "kid_std": 0.002}, "kid_mean"), error_bar({"fd": 9.0}, "fd")
    ((0.002, 0.002), (0.0, 0.0))
    >>> error_bar({"mss_mean": 0.5, "mss_ci95": [0.6, 0.7]}, "mss_mean")  # above the estimate
    (0.0, 0.19999999999999996)
    """
    if name == "kid_mean" and pooled.get("kid_std") is not None:
        return float(pooled["kid_std"]), float(pooled["kid_std"])
    ci = pooled.get(name[: -len("_mean")] + "_ci95") if name.endswith("_mean") else None
    value = pooled[name]
    # a percentile interval may miss its own point estimate; matplotlib refuses negatives
    return (max(value - ci[0], 0.0), max(ci[1] - value, 0.0)) if ci else (0.0, 0.0)


def plot_pareto(results: dict, encoder: str, xname: str, yname: str, path: Path) -> list[str]:
    """The diversity-vs-fidelity scatter of one encoder; returns the front's set names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, xs, ys, xerrs, yerrs = [], [], [], [], []
    for name, entry in results["sets"].items():
        pooled = entry["encoders"].get(encoder, {}).get("pooled", {})
        x, y = pooled.get(xname), pooled.get(yname)
        if x is None or y is None:
            continue
        names.append(name if entry.get("method") is None else f"{name} ({entry['method']})")
        xs.append(x)
        ys.append(y)
        xerrs.append(error_bar(pooled, xname))
        yerrs.append(error_bar(pooled, yname))
    if not names:
        needs = [f"{m} needs evaluate --reference" for m in (xname, yname)
                 if m in NEEDS_REFERENCE]
        needs += [f"{m} needs evaluate --clip-text (CLIP only)" for m in (xname, yname)
                  if m in NEEDS_TEXT]  # fmt: skip
        why = f" ({'; '.join(needs)})" if needs else ""
        raise ValueError(f"no folder has both {xname} and {yname} for encoder {encoder}{why}")
    front = pareto_front(xs, ys, xname in LOWER_IS_BETTER, yname in LOWER_IS_BETTER)
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.errorbar(xs, ys, xerr=np.asarray(xerrs).T, yerr=np.asarray(yerrs).T, fmt="o", capsize=3)
    for n, x, y in zip(names, xs, ys):
        ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "--", color="gray",
            label="Pareto front")  # fmt: skip
    better = lambda m: "lower" if m in LOWER_IS_BETTER else "higher"  # noqa: E731
    ax.set_xlabel(f"{xname} ({encoder}; {better(xname)} is better)")
    ax.set_ylabel(f"{yname} ({encoder}; {better(yname)} is better)")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)
    plt.close(fig)
    return [names[i] for i in front]


def write_prompt_grids(results: dict, out: Path, per_row: int) -> list[Path]:
    """One grid per prompt: a row per folder, its first ``per_row`` images of the prompt;
    the folders without prompts (``None``) share one grid, after the prompts'."""
    from PIL import Image

    from experiments.evaluate import load_rgb, read_image_set
    from experiments.sd_methods import LABEL_WIDTH, _label

    sets = [read_image_set(entry["folder"]) for entry in results["sets"].values()]
    prompts = list(dict.fromkeys(p for s in sets for p in s.prompts if p is not None))
    prompts += [None] if any(p is None for s in sets for p in s.prompts) else []
    written = []
    for k, prompt in enumerate(prompts):
        rows, size = [], None
        for s in sets:
            files = [f for f, p in zip(s.files, s.prompts) if p == prompt][:per_row]
            if not files:
                continue
            with Image.open(files[0]) as im:
                size = size or im.size
            tiles = [np.asarray(Image.fromarray(load_rgb(f)).resize(size)) for f in files]
            tiles += [np.full_like(tiles[0], 255)] * (per_row - len(tiles))
            rows.append(np.concatenate([_label(s.name, LABEL_WIDTH, size[1]), *tiles], axis=1))
        buf = io.BytesIO()
        Image.fromarray(np.concatenate(rows, axis=0)).save(buf, format="PNG")
        path = out / f"grid_p{k:03d}.png"
        run_folder.atomic_write(path, buf.getvalue())
        written.append(path)
    return written


def main(argv=None, prog: str = "python -m experiments.plot_eval") -> int:
    """Run the command line (``jaxdiv plot``): 0 on success, 2 for a refused input."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line
    p.add_argument("folder", help="an evaluate --out folder (required)")
    p.add_argument("--x", default="fd", help="fidelity metric (default fd)")
    p.add_argument("--y", default="vendi_mean", help="diversity metric (default vendi_mean)")
    p.add_argument("--images", type=int, default=8,
                   help="images per row of the grids (default 8)")  # fmt: skip
    args = p.parse_args(argv)
    folder = Path(args.folder)
    try:
        results = json.loads((folder / "results.json").read_text())
        encoders = list(results["settings"]["encoders"])
    except (OSError, ValueError, KeyError):
        p.error(f"{args.folder!r} holds no results.json of experiments.evaluate")
    if args.images < 1:
        p.error(f"--images must be >= 1, got {args.images}")
    from experiments.evaluate import TABLE_COLUMNS

    # the table's numbers that measure images: not the counts of images and prompts
    metrics = [c for c in TABLE_COLUMNS[3:] if not c.endswith("_ci95")
               and c not in ("n", "prompts")]  # fmt: skip
    for flag, name in (("--x", args.x), ("--y", args.y)):
        if name not in metrics:
            p.error(f"{flag} must be one of {', '.join(metrics)}, got {name!r}")
    from experiments.evaluate import EvaluateError

    missing = []
    try:
        with run_folder.FolderLock(folder):
            for enc in encoders:
                try:
                    front = plot_pareto(results, enc, args.x, args.y,
                                        folder / f"pareto_{enc}.png")  # fmt: skip
                except ValueError as err:  # this pair of metrics is not in the file
                    missing.append(str(err))
                    print(f"[plot] no pareto_{enc}.png: {err}", flush=True)
                    continue
                print(f"[plot] wrote pareto_{enc}.png (front: {', '.join(front)})", flush=True)
            grids = write_prompt_grids(results, folder, args.images)
    except (ValueError, EvaluateError, run_folder.FolderError) as err:
        p.error(str(err))
    print(f"[plot] wrote {len(grids)} prompt grids", flush=True)
    if len(missing) == len(encoders) and not grids:
        p.error(missing[0])  # nothing drawn at all
    return 0


if __name__ == "__main__":
    sys.exit(main())
