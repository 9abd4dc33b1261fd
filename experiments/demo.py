"""What jaxdiv is for, in under a minute: the same noise through every diversity method.

    python -m experiments.demo [--out results/demo] [--batches 8] [--batch 32] [--quiet]
    make demo          # the same, after installing
    jaxdiv demo        # the console command

The toy is ``toy.conditional.ring_of_classes()``: 12 Gaussian modes on a circle of
radius 3, 4 interleaved classes, each with 3 modes of unequal weight (1, 1/2, 1/3), exact
conditional and unconditional denoisers. We ask for class 0. Classifier-free guidance
does what it does on Stable Diffusion: its samples are more "on prompt" (the toy CLIP
score rises) and collapse onto the class's heaviest mode (Vendi and recall fall). Each
diversity method runs on top of the same CFG (``w = 3``) with the same noise and keys:

* ``unguided``: the conditional model alone (``cfg(1)``);
* ``CFG``: ``cfg(3)``, the base every other method modifies;
* ``CADS``: ``chain(cads(tau1=0.5, tau2=0.9, noise_scale=0.25), cfg(3))``;
* ``interval``: ``interval(3, 0.3, 2.0)`` (guidance only at noise levels in (0.3, 2]);
* ``PG``: ``chain(cfg(3), particle(0.3, min_noise_level=1))`` (score form, off below noise
  level 1: on this EDM toy, where ``alpha = 1``, PG's public SD code);
* ``SPELL``: ``chain(cfg(3), spell(0.3))`` (intra-batch shields of radius 0.3);
* ``GASS``: ``chain(cfg(3), gass(E, E.text_emb, 0.1, 0.1, lr=0.05, num_active=10))`` with
  the toy sphere encoder ``E`` (:func:`toy.encoder.sphere_encoder`) as "CLIP".

Settings and values are those of :mod:`experiments.tradeoff` (the full sweeps) and
:mod:`experiments.gass_toy`. Sampler ``samplers.edm(schedules.edm(), 24)`` (Karras Heun).
``--batches`` batches of ``--batch`` samples (the batch is what PG, SPELL and GASS
couple), run as the groups of one ``jaxdiv.sample(..., groups=batches)`` call. Metrics
on all samples of a method against 2048 exact samples of ``p(x | c)``: Vendi (RBF
kernel, bandwidth 0.5), improved precision and recall (k = 5), the toy CLIP score
``100 * mean p(c | x)`` read at noise level 0.5. Each method is shown at one setting;
:mod:`experiments.tradeoff` sweeps each one's strength (the Pareto figure).

Writes ``<out>/demo.json`` (settings, versions, date, per-method numbers and seconds),
``<out>/demo.png`` (one panel per method, numbers in the titles) and prints the table.
``make figures`` stores a small copy of the figure as ``docs/demo.png`` for the README.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
from experiments.common import progress_bar, quiet, save_figure, say, seed, write_json
from jaxdiv import guidance, metrics, samplers, schedules
from toy.conditional import ring_of_classes
from toy.encoder import sphere_encoder

CLASS, BASE_W, STEPS = 0, 3.0, 24
VENDI_BANDWIDTH, PRDC_K, CLIP_BLUR, REFERENCE = 0.5, 5, 0.5, 2048


def methods(encoder) -> dict:
    """name -> (guidance term, the call that builds it, as printed)."""
    cfg = guidance.cfg
    return {
        "unguided": (cfg(1.0), "cfg(1)"),
        "CFG": (cfg(BASE_W), "cfg(3)"),
        "CADS": (guidance.chain(guidance.cads(tau1=0.5, tau2=0.9, noise_scale=0.25),
                                cfg(BASE_W)), "chain(cads(0.5, 0.9, 0.25), cfg(3))"),
        "interval": (guidance.interval(BASE_W, 0.3, 2.0), "interval(3, 0.3, 2.0)"),
        "PG": (guidance.chain(cfg(BASE_W), guidance.particle(0.3, min_noise_level=1.0)),
               "chain(cfg(3), particle(0.3, min_noise_level=1))"),
        "SPELL": (guidance.chain(cfg(BASE_W), guidance.spell(0.3)),
                  "chain(cfg(3), spell(0.3))"),
        "GASS": (guidance.chain(cfg(BASE_W), guidance.gass(encoder, encoder.text_emb, 0.1, 0.1,
                                                           lr=0.05, num_active=10)),
                 "chain(cfg(3), gass(E, E.text_emb, 0.1, 0.1, lr=0.05, num_active=10))"),
    }  # fmt: skip


def measure(cm, x, ref) -> dict:
    """Vendi, recall, precision and toy CLIP score of samples ``x (..., 2)`` of class 0."""
    flat = jnp.reshape(x, (-1, x.shape[-1]))
    pr = metrics.precision_recall(ref, flat, k=PRDC_K)
    return dict(
        vendi=float(metrics.vendi(flat, kernel="rbf", bandwidth=VENDI_BANDWIDTH)),
        recall=float(pr.recall),
        precision=float(pr.precision),
        clip=float(100 * cm.clip_score(flat, CLASS, blur=CLIP_BLUR).mean()),
    )  # fmt: skip


def run(batches: int = 8, batch: int = 32, seed: int = 0):
    """Sample every method with the same noise; returns rows, samples, reference, setting."""
    cm = ring_of_classes()
    sch = schedules.edm()
    sampler = samplers.edm(sch, STEPS)
    den = cm.denoiser(sch)
    cond = jnp.broadcast_to(cm.condition(CLASS), (batches * batch, cm.cond_dim))
    ref = cm.sample(jax.random.key(seed + 100), REFERENCE, cm.condition(CLASS))
    encoder = sphere_encoder(jax.random.key(seed + 3), 2, 16, center=ref.mean(0),
                             scale=ref.std())  # fmt: skip
    noise = jax.random.normal(jax.random.key(seed + 1), (batches * batch, cm.dim))
    keys = jax.random.split(jax.random.key(seed + 2), batches)  # one per batch
    rows, samples = [], {}
    table = methods(encoder)
    with progress_bar(table.items(), desc="demo", unit="method") as bar:
        for name, (term, call) in bar:
            t0 = time.perf_counter()
            # `batches` independent batches in one program: coupled terms act within each
            x = np.asarray(jaxdiv.sample(sampler, den, noise, key=keys, cond=cond, guidance=term,
                                         groups=batches).x0)  # fmt: skip
            seconds = time.perf_counter() - t0
            samples[name] = x
            rows.append(dict(method=name, guidance=call, seconds_incl_compile=seconds,
                             **measure(cm, x, ref)))  # fmt: skip
            if bar.disable:
                say("demo", f"{name}: {seconds:.1f} s")
    exact = cm.sample(jax.random.key(seed + 200), batches * batch, cm.condition(CLASS))
    exact_row = measure(cm, exact, ref)
    setting = dict(
        toy="toy.conditional.ring_of_classes()", cls=CLASS, batches=batches, batch=batch,
        sampler=f"samplers.edm(schedules.edm(), {STEPS}) (Heun, NFE {sampler.nfe})",
        reference=f"{REFERENCE} exact samples of p(x | c)", seed=seed,
        vendi=f"rbf, bandwidth {VENDI_BANDWIDTH}", prdc_k=PRDC_K,
        clip=f"100 * mean p(c | x) at noise level {CLIP_BLUR}",
    )  # fmt: skip
    return rows, exact_row, samples, np.asarray(ref), setting


def format_table(rows, exact_row) -> str:
    head = "| method | Vendi | recall | precision | toy CLIP |"
    lines = [head, "|---|---|---|---|---|"]
    for r in [*rows, dict(method="exact p(x|c)", **exact_row)]:
        lines.append(f"| {r['method']} | {r['vendi']:.2f} | {r['recall']:.2f} | "
                     f"{r['precision']:.2f} | {r['clip']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def plot(rows, samples, ref, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = ring_of_classes()
    mine = np.asarray(cm.labels) == CLASS
    means = np.asarray(cm.means)
    panels = [("exact p(x | c)", ref[: len(next(iter(samples.values())).reshape(-1, 2))], None),
              *[(r["method"], samples[r["method"]].reshape(-1, 2), r) for r in rows]]  # fmt: skip
    fig, axes = plt.subplots(2, 4, figsize=(13, 7.8))
    for ax, (name, x, r) in zip(axes.flat, panels):
        ax.scatter(means[~mine, 0], means[~mine, 1], s=60, c="#dddddd", zorder=0)
        ax.scatter(means[mine, 0], means[mine, 1], s=60, facecolors="none",
                   edgecolors="#444444", zorder=2)  # fmt: skip
        ax.scatter(x[:, 0], x[:, 1], s=3, alpha=0.6, c="C0" if r is None else "C1", zorder=1)
        sub = "" if r is None else (f"\nVendi {r['vendi']:.2f}  recall {r['recall']:.2f}\n"
                                    f"precision {r['precision']:.2f}  CLIP {r['clip']:.0f}")
        ax.set_title(name + sub, fontsize=10)
        ax.set(xlim=(-4.2, 4.2), ylim=(-4.2, 4.2), aspect="equal", xticks=[], yticks=[])
    fig.suptitle("class 0 of the ring toy (open circles: its 3 modes, weights 1 : 1/2 : 1/3); "
                 "same noise for every method", fontsize=11)  # fmt: skip
    fig.tight_layout(rect=(0, 0, 1, 0.96), h_pad=3.0)
    save_figure(fig, path)
    plt.close(fig)


def main(argv: list[str] | None = None, prog: str = "python -m experiments.demo") -> int:
    """Run the demo from the command line (``jaxdiv demo``); exit 2 for a bad value."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}\n")  # one line
    p.add_argument("--out", type=Path, default=Path("results/demo"),
                   help="folder for demo.json and demo.png")  # fmt: skip
    p.add_argument("--batches", type=int, default=8, help="batches per method, >= 2")
    p.add_argument("--batch", type=int, default=32,
                   help="samples per batch (what PG, SPELL and GASS couple), >= 2")  # fmt: skip
    p.add_argument("--seed", type=seed, default=0, help="seed of the noise and keys")
    p.add_argument("--no-figure", action="store_true", help="skip the PNG (no matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress, no table")
    args = p.parse_args(argv)
    for name in ("batches", "batch"):
        if getattr(args, name) < 2:
            p.error(f"--{name} must be >= 2, got {getattr(args, name)}")
    if args.batches * args.batch <= PRDC_K:  # precision / recall need k neighbours + 1
        p.error(f"--batches x --batch must give more than {PRDC_K} samples per method (the "
                f"precision / recall use k = {PRDC_K} neighbours), got "
                f"{args.batches} x {args.batch}")  # fmt: skip
    with quiet(args.quiet):
        t0 = time.perf_counter()
        rows, exact_row, samples, ref, setting = run(args.batches, args.batch, args.seed)
        args.out.mkdir(parents=True, exist_ok=True)
        write_json(args.out / "demo.json", dict(
            command=f"{prog} " + " ".join(argv if argv is not None else sys.argv[1:]),
            date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            versions=dict(jaxdiv=jaxdiv.__version__, jax=jax.__version__,
                          numpy=np.__version__, python=platform.python_version()),
            machine=platform.machine(), setting=setting, rows=rows, exact=exact_row,
            seconds_total=time.perf_counter() - t0))  # fmt: skip
        if not args.no_figure:
            plot(rows, samples, ref, args.out / "demo.png")
        table = format_table(rows, exact_row)
        if not args.quiet:
            print(table)
        say("demo", f"wrote {args.out / 'demo.json'}"
            + ("" if args.no_figure else f" and {args.out / 'demo.png'}")
            + f" in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
