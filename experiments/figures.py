"""The README's figures: run the experiment behind each and store a small PNG under docs/.

    python -m experiments.figures [--only demo spell_two_moons ...] [--max-width 1100]

``make figures`` runs this. Each figure is produced by its experiment script (the same
command the README names next to it), written under ``results/figures/`` with the
experiment's JSON, then shrunk (width at most ``--max-width`` px, palette PNG) into
``docs/<name>.png``. A stored figure over ``--max-kb`` is an error: the repository keeps
only a few small images.
"""

from __future__ import annotations

import argparse
import importlib
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

#: name -> (experiment module, its argv given the output prefix, the PNG it writes)
FIGURES = {
    "demo": ("experiments.demo", lambda out: ["--out", str(out), "--quiet"],
             lambda out: out / "demo.png"),
    "spell_two_moons": ("experiments.spell_two_moons", lambda out: ["--out", str(out / "fig")],
                        lambda out: out / "fig.png"),
    "tradeoff_pareto": ("experiments.tradeoff",
                        lambda out: ["--out", str(out / "tradeoff"), "--skip-ring"],
                        lambda out: out / "tradeoff_pareto.png"),
    "samplers_gmm": ("experiments.toy_suite", lambda out: ["--out", str(out)],
                     lambda out: out / "gmm_samplers.png"),
}  # fmt: skip


def shrink_png(data: bytes, max_width: int) -> bytes:
    """A smaller PNG of the same figure: at most ``max_width`` px wide, 256-colour palette.

    >>> from PIL import Image
    >>> buf = io.BytesIO(); Image.new("RGB", (400, 100), "white").save(buf, "PNG")
    >>> from PIL import Image as I; I.open(io.BytesIO(shrink_png(buf.getvalue(), 200))).size
    (200, 50)
    """
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    if img.width > max_width:
        img = img.resize((max_width, round(img.height * max_width / img.width)),
                         Image.Resampling.LANCZOS)  # fmt: skip
    out = io.BytesIO()
    img.quantize(256, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return out.getvalue()


def make_figure(name: str, results: Path, max_width: int) -> Path:
    """Run the experiment behind ``name`` and store its shrunk PNG as ``docs/<name>.png``."""
    from experiments import run_folder

    module, argv, produced = FIGURES[name]
    out = results / name
    out.mkdir(parents=True, exist_ok=True)
    main = importlib.import_module(module).main
    code = main(argv(out))
    if code not in (None, 0):
        raise RuntimeError(f"{module} {' '.join(argv(out))} exited with {code}")
    target = DOCS / f"{name}.png"
    run_folder.atomic_write(target, shrink_png(produced(out).read_bytes(), max_width))
    return target


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.add_argument("--only", nargs="+", choices=list(FIGURES), default=list(FIGURES),
                   help="figures to make")  # fmt: skip
    p.add_argument("--results", type=Path, default=ROOT / "results" / "figures",
                   help="where the experiments write their full outputs and JSON")  # fmt: skip
    p.add_argument("--max-width", type=int, default=1100, help="stored width in px, at most")
    p.add_argument("--max-kb", type=int, default=250, help="stored size per figure, at most")
    args = p.parse_args(argv)
    too_big = []
    for name in args.only:
        start = time.perf_counter()
        target = make_figure(name, args.results, args.max_width)
        kb = target.stat().st_size / 1024
        print(f"[figures] {target.relative_to(ROOT)}: {kb:.0f} KB "
              f"({time.perf_counter() - start:.0f} s)", flush=True)  # fmt: skip
        if kb > args.max_kb:
            too_big.append(f"{target.name}: {kb:.0f} KB > --max-kb {args.max_kb}")
    for line in too_big:
        print(f"[figures] {line}", file=sys.stderr)
    return 1 if too_big else 0


if __name__ == "__main__":
    sys.exit(main())
