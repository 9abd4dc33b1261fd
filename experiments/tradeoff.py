"""Diversity vs fidelity of CFG, interval guidance, CADS, particle guidance and SPELL.

    python -m experiments.tradeoff [--n-per-class 512] [--batch 16] [--steps 24] \
        [--out results/tradeoff] [--skip-ring]

The toy analogue of SPELL's Figure 4 / Table 4 (Kirchhof et al. 2025, App. F) on the
conditional Gaussian-mixture toy ``toy.conditional.ring_of_classes()``: 4 classes, each
with 3 modes of unequal weight interleaved on a circle of radius 3, one-hot condition
embeddings, exact conditional and unconditional denoisers.

Protocol. For each class ``c`` we draw ``--n-per-class`` samples in batches of
``--batch`` (the batch is what intra-batch methods -- PG, SPELL -- couple), with the same
noise and keys for every method and strength (matched samples), using
``samplers.edm(schedules.edm(), --steps)`` (Karras Heun). The reference set of class ``c``
is ``--n-per-class`` exact samples of ``p(x | u_c)``. Per class we compute precision,
recall, density and coverage (Naeem et al. 2020, k = 5), the Vendi score of the class's
samples with an RBF kernel of fixed bandwidth 0.5 (``exp(-|x-y|^2 / (2 h^2))``; the same
bandwidth for every method so the scores compare), the mean Vendi score within each batch,
and the toy "CLIP score" ``100 * mean p(c | x)``: the class posterior under the null prior
of ``x`` read at noise level 0.5 (``cm.clip_score(x, c, blur=0.5)``, a soft classifier;
the exact posterior saturates at 100 for any CFG scale >= 2). The table reports the means
over classes (per-class values are in the JSON).

With an exact model, CFG can only move samples away from ``p(x | c)``: every PRDC number
is best at ``w = 1``, and only the CLIP score rewards guidance. The trade-off to read is
therefore the one against the CLIP score (and, for methods on top of CFG, against the
base model's precision).

Methods (the "base model" is CFG with w = 3, the others modify it):

* CFG ``w``; interval guidance ``interval(3, lo, hi)`` for noise-level intervals;
* CADS ``chain(cads(tau1, 0.9, s), cfg(3))`` (time = sampling progress);
* particle guidance on top of ``cfg(3)``, two variants: "PG, x0 variant (jaxdiv)"
  ``chain(cfg(3), particle(strength, space="x0_hat", time_scaling="x0",
  min_noise_level=1.0))`` (x0_hat space, constant weight, off below noise level 1; not the
  paper's formulation) and "PG (SD code: score form, sigma >= 1)"
  ``chain(cfg(3), particle(strength, min_noise_level=1.0))`` (the paper's score-form force
  on x_t, off below noise level 1 as in PG's public SD code, whose ``eps``-form scaling
  equals the score form on this EDM toy, where ``alpha = 1``);
* SPELL ``chain(cfg(3), spell(radius))`` (intra-batch) when ``jaxdiv.guidance.spell`` exists.

Every sweep is one compiled program (the strength is a traced argument, vmapped).
Writes ``<out>.json`` (the Table-4 analogue), ``<out>_pareto.png`` (recall vs precision,
coverage vs density, Vendi vs toy-CLIP), prints the table and which methods are on each
Pareto front; then runs :mod:`experiments.pg_ring` (``results/pg_ring.json``).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
from experiments import pg_ring
from experiments.common import at_least, progress, save_figure, seed, write_json
from jaxdiv import guidance, metrics, samplers, schedules
from jaxdiv.guidance.cads import cads
from jaxdiv.guidance.interval import interval
from jaxdiv.guidance.particle import particle
from toy.conditional import ring_of_classes

BASE_W = 3.0
VENDI_BANDWIDTH = 0.5
CLIP_BLUR = 0.5
PRDC_K = 5
AXES = (("precision", "recall"), ("density", "coverage"), ("clip", "vendi"))
LABELS = dict(precision="precision", recall="recall", density="density", coverage="coverage",
              clip="toy CLIP (100 p(c|x), blur 0.5)", vendi="Vendi (RBF h=0.5)")  # fmt: skip


def method_sweeps():
    """name -> (guidance factory of the traced parameter(s), parameter values, label)."""
    cfg = guidance.cfg
    sweeps = {
        "CFG": (lambda w: cfg(w), np.array([1.0, 1.5, 2.0, 3.0, 4.0, 6.0]), "w"),
        "IG": (
            lambda p: interval(BASE_W, p[0], p[1]),
            np.array([[0.2, 1.0], [0.3, 2.0], [0.5, 3.0], [1.0, 5.0], [0.2, 5.0], [2.0, 10.0]]),
            "(lo, hi]",
        ),
        "CADS": (
            lambda p: guidance.chain(cads(tau1=p[0], tau2=0.9, noise_scale=p[1]), cfg(BASE_W)),
            np.array([[0.5, 0.25], [0.35, 0.25], [0.2, 0.25], [0.5, 1.0], [0.35, 1.0],
                      [0.2, 1.0]]),  # fmt: skip
            "(tau1, s)",
        ),
        pg_ring.PG_X0: (
            lambda s: guidance.chain(
                cfg(BASE_W),
                particle(s, space="x0_hat", time_scaling="x0", min_noise_level=1.0),
            ),
            np.array([0.03, 0.1, 0.3, 1.0, 3.0]),
            "strength",
        ),
        pg_ring.PG_SD: (
            lambda s: guidance.chain(cfg(BASE_W), particle(s, min_noise_level=1.0)),
            np.array([0.01, 0.03, 0.1, 0.3, 1.0]),
            "strength",
        ),
        "SPELL": (
            lambda r: guidance.chain(cfg(BASE_W), guidance.spell(r)),
            np.array([0.25, 0.5, 1.0, 1.5, 2.0, 3.0]),
            "radius",
        ),
    }
    return sweeps


def sample_sweep(sampler, den, make, values, noise, keys, conds):
    """``(S, C, G, B, d)`` samples: vmapped over the sweep, classes and batch groups."""

    def one(v, z, k, c):
        return jaxdiv.sample(sampler, den, z, key=k, cond=c, guidance=make(v)).x0

    f = jax.vmap(one, (None, 0, 0, None))  # batch groups of one class
    f = jax.vmap(f, (None, 0, 0, 0))  # classes
    f = jax.jit(jax.vmap(f, (0, None, None, None)))  # sweep values
    return f(jnp.asarray(values, jnp.float32), noise, keys, conds)


@jax.jit
def _batch_vendi(xb):
    k = jnp.exp(-jnp.sum((xb[:, :, None] - xb[:, None]) ** 2, -1) / (2 * VENDI_BANDWIDTH**2))
    return jax.vmap(metrics.vendi_from_kernel)(k).mean()


def class_metrics(cm, c, x_groups, ref):
    """Metrics of one class's samples ``(G, B, d)`` against its reference set."""
    x = x_groups.reshape(-1, x_groups.shape[-1])
    p = metrics.prdc(ref, x, k=PRDC_K)
    return dict(
        precision=float(p.precision), recall=float(p.recall), density=float(p.density),
        coverage=float(p.coverage),
        vendi=float(metrics.vendi(x, kernel="rbf", bandwidth=VENDI_BANDWIDTH)),
        vendi_batch=float(_batch_vendi(x_groups)),
        clip=float(100 * cm.clip_score(x, c, blur=CLIP_BLUR).mean()),
    )  # fmt: skip


def fmt_value(v):
    v = np.atleast_1d(v)
    return ", ".join(f"{float(u):g}" for u in v)


def pareto_front(points, decimals=3):
    """Indices of points not dominated (both coordinates maximised, compared after rounding
    so that differences below the metrics' resolution do not decide)."""
    pts = np.round(np.asarray(points, np.float64), decimals)
    keep = []
    for i, p in enumerate(pts):
        dominated = np.any(np.all(pts >= p, 1) & np.any(pts > p, 1))
        if not dominated:
            keep.append(i)
    return keep


METRIC_COLS = ("precision", "recall", "density", "coverage", "vendi", "vendi_batch", "clip")


def summarize(rows, precision_margin=0.05, clip_margin=1.0):
    """Printed summary: the table, each panel's Pareto front, and the matched-fidelity
    comparison: per method, the setting with the highest Vendi score among those whose
    precision and CLIP score are both within a margin of the base model's."""
    w = max([7, *(len(r["method"]) for r in rows)])
    lines = [f"{'method':{w}s} {'value':11s} " + " ".join(f"{m[:11]:>11s}" for m in METRIC_COLS)]
    for r in rows:
        lines.append(f"{r['method']:{w}s} {r['value_str']:11s} "
                     + " ".join(f"{r[m]:11.3f}" for m in METRIC_COLS))  # fmt: skip
    base = next(r for r in rows if r["method"] == "CFG" and r["value_str"] == f"{BASE_W:g}")
    fronts = {}
    for fid, div in AXES:
        idx = pareto_front([(r[fid], r[div]) for r in rows])
        idx = sorted(idx, key=lambda i: -rows[i][fid])
        front = [f"{rows[i]['method']}({rows[i]['value_str']})" for i in idx]
        fronts[f"{div}_vs_{fid}"] = front
        lines.append(f"Pareto front, {div} vs {fid} (high {fid} first): " + ", ".join(front))
    lines.append(f"Matched fidelity (precision >= {base['precision']:.3f} - {precision_margin:g}"
                 f" and CLIP >= {base['clip']:.2f} - {clip_margin:g}), most diverse setting "
                 "per method:")  # fmt: skip
    matched = {}
    for m in dict.fromkeys(r["method"] for r in rows):
        ok = [r for r in rows if r["method"] == m and r["precision"] >= base["precision"]
              - precision_margin and r["clip"] >= base["clip"] - clip_margin]  # fmt: skip
        if not ok:
            lines.append(f"  {m:{w}s} no setting keeps the base fidelity")
            continue
        b = max(ok, key=lambda r: r["vendi"])
        matched[m] = {k: b[k] for k in ("value", "param", *METRIC_COLS)}
        setting = f"{b['param']} = {b['value_str']}"
        lines.append(f"  {m:{w}s} {setting:22s} vendi {b['vendi']:6.2f} "
                     f"recall {b['recall']:.3f} coverage {b['coverage']:.3f} "
                     f"precision {b['precision']:.3f} clip {b['clip']:.2f}")  # fmt: skip
    if matched:
        order = sorted(matched, key=lambda m: -matched[m]["vendi"])
        lines.append("  ranking by Vendi at matched fidelity: " + " > ".join(order))
    return lines, fronts, matched


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    for ax, (fid, div) in zip(axes, AXES):
        for j, m in enumerate(methods):
            rs = [r for r in rows if r["method"] == m]
            ax.plot([r[fid] for r in rs], [r[div] for r in rs], "o-", color=f"C{j}", label=m,
                    ms=4, lw=1)  # fmt: skip
        base = next(r for r in rows if r["method"] == "CFG" and r["value_str"] == f"{BASE_W:g}")
        ax.scatter([base[fid]], [base[div]], s=120, facecolors="none", edgecolors="k",
                   label=f"base (CFG w={BASE_W:g})", zorder=5)  # fmt: skip
        ax.set_xlabel(LABELS[fid])
        ax.set_ylabel(LABELS[div])
        if div == "vendi":
            ax.set_yscale("log")  # SPELL's large radii spread samples far off the data
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Diversity (y) vs fidelity (x) on the conditional GMM toy; up-right is better")
    save_figure(fig, path)
    plt.close(fig)


def run_study(n_per_class=512, batch=16, steps=24, seed=0):
    cm = ring_of_classes()
    sch = schedules.edm()
    sampler = samplers.edm(sch, steps)
    den = cm.denoiser(sch)
    c = cm.num_classes
    if n_per_class % batch:
        raise ValueError(f"--n-per-class must be a multiple of --batch, got {n_per_class}, {batch}")
    groups = n_per_class // batch
    noise = jax.random.normal(jax.random.key(seed), (c, groups, batch, cm.dim))
    keys = jax.random.split(jax.random.key(seed + 1), c * groups).reshape(c, groups)
    conds = jnp.broadcast_to(cm.condition(jnp.arange(c))[:, None], (c, batch, cm.cond_dim))
    refs = [cm.sample(jax.random.key(seed + 100 + k), n_per_class, cm.condition(k))
            for k in range(c)]  # fmt: skip
    rows, timings = [], {}
    for name, (make, values, label) in method_sweeps().items():
        t0 = time.perf_counter()
        xs = np.asarray(sample_sweep(sampler, den, make, values, noise, keys, conds))
        for v, x in zip(values, xs):
            per_class = [class_metrics(cm, k, x[k], refs[k]) for k in range(c)]
            mean = {m: float(np.mean([pc[m] for pc in per_class])) for m in per_class[0]}
            rows.append(dict(method=name, param=label, value=np.atleast_1d(v).tolist(),
                             value_str=fmt_value(v), **mean, per_class=per_class))  # fmt: skip
        timings[name] = time.perf_counter() - t0
        progress(f"tradeoff {name}: {len(values)} settings in {timings[name]:.1f}s")
    # the reference of the reference: a second exact draw scores the metrics' ceiling
    exact = []
    for k in range(c):
        x = cm.sample(jax.random.key(seed + 200 + k), n_per_class, cm.condition(k))
        exact.append(class_metrics(cm, k, x.reshape(groups, batch, -1), refs[k]))
    exact_row = {m: float(np.mean([pc[m] for pc in exact])) for m in exact[0]}
    setting = dict(toy="ring_of_classes()", classes=c, n_per_class=n_per_class, batch=batch,
                   sampler=f"edm Heun {steps} steps (NFE {sampler.nfe})", base_cfg=BASE_W,
                   prdc_k=PRDC_K, vendi=f"rbf, bandwidth {VENDI_BANDWIDTH}",
                   clip=f"100 * mean p(c | x_t = x) at noise level {CLIP_BLUR}, null prior",
                   seed=seed, seconds_per_method=timings)  # fmt: skip
    return rows, exact_row, setting


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n-per-class", type=at_least(1), default=512)
    p.add_argument("--batch", type=at_least(1), default=16)
    p.add_argument("--steps", type=at_least(1), default=24)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="results/tradeoff")
    p.add_argument("--skip-ring", action="store_true", help="do not run experiments.pg_ring")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    rows, exact_row, setting = run_study(args.n_per_class, args.batch, args.steps, args.seed)
    lines, fronts, best = summarize(rows)
    lines.append("exact samples vs reference: " + ", ".join(
        f"{m} {v:.3f}" for m, v in exact_row.items()))  # fmt: skip
    setting["seconds"] = time.perf_counter() - t0
    write_json(args.out + ".json", dict(setting=setting, exact=exact_row, results=rows,
                                        pareto_fronts=fronts, matched_fidelity=best))
    plot(rows, args.out + "_pareto.png")
    print("\n".join(lines))
    print(f"wrote {args.out}.json, {args.out}_pareto.png ({setting['seconds']:.0f}s)")
    if not args.skip_ring:
        pg_ring.main([])


if __name__ == "__main__":
    main()
