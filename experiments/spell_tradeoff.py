"""SPELL App. M on a toy: diversity (Vendi, recall, coverage) vs fidelity (precision,
density, class score) as the shield radius grows, on a conditional Gaussian mixture.

    python -m experiments.spell_tradeoff            # ~1-2 min on CPU

Model: ``toy.conditional.ring_of_classes()`` (12 modes on a circle of radius 3, 4 classes
of 3 modes with unequal weights, 2-D) and its exact conditional denoiser, with CFG
(w = 2, diffusers convention) and the EDM sampler (18 Heun steps). Per class, 128 samples
are generated in batches of 8 with intra-batch and previous-batch shields
(``spell_batched``), for radii ``r = f * m``, ``m`` the median pairwise final distance of the
unguided 128 samples of that class (App. D), ``f`` in {0, 1/32, 1/16, 1/8, 3/16, 1/4, 1/2,
1, 2} (the paper tries 16 values in [0, 2m]; with several modes per class ``m`` is an
inter-mode distance, so the interesting radii are small fractions of it). Metrics against
128 exact samples of ``p(x | class)`` (PRDC wants equal set sizes): PRDC (k = 5; Naeem et
al. 2020), Vendi with an RBF kernel of fixed bandwidth (the reference set's median
pairwise distance), and the toy's class score
``p(class | x)`` (``clip_score``); averaged over the 4 classes. The same noise and keys are
used for every radius, so r = 0 is the unguided baseline. Writes
``results/spell_tradeoff.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
from experiments.common import at_least, progress, save_figure, seed, write_json
from jaxdiv import guidance, metrics, samplers, schedules
from jaxdiv.guidance.spell import median_pairwise_distance
from jaxdiv.recipes import spell_batched
from toy.conditional import ring_of_classes

FRACTIONS = (0.0, 1 / 32, 1 / 16, 1 / 8, 3 / 16, 1 / 4, 1 / 2, 1.0, 2.0)
SHOWN = 1 / 16  # the radius whose samples are plotted


def run(n=128, batch_size=8, cfg_scale=2.0, steps=18, seed=0, fractions=FRACTIONS):
    cm = ring_of_classes()
    sch = schedules.edm()
    smp = samplers.edm(sch, steps)
    den = cm.denoiser(sch)
    g_cfg = guidance.cfg(cfg_scale)
    per_class = []
    t0 = time.perf_counter()
    for c in range(cm.num_classes):
        cond = cm.condition(jnp.full((n,), c))
        noise = jax.random.normal(jax.random.key(seed + 10 * c), (n, 2))
        key = jax.random.key(seed + 10 * c + 1)
        real = cm.sample(jax.random.key(seed + 10 * c + 2), n, cm.condition(c))
        bandwidth = median_pairwise_distance(real)
        base = jaxdiv.sample(smp, den, noise, key=key, cond=cond, guidance=g_cfg).x0
        m = float(median_pairwise_distance(base))
        rows, shown = [], None
        for f in fractions:
            if f == 0:
                x = base
            else:
                x = spell_batched(smp, den, noise, key=key, radius=f * m, batch_size=batch_size,
                                  cond=cond, guidance=g_cfg).x0  # fmt: skip
            if f == SHOWN:
                shown = x
            pr = metrics.prdc(real, x, k=5)
            rows.append({
                "fraction": f, "radius": f * m,
                "precision": float(pr.precision), "recall": float(pr.recall),
                "density": float(pr.density), "coverage": float(pr.coverage),
                "vendi": float(metrics.vendi(x, kernel="rbf", bandwidth=bandwidth)),
                "class_score": float(jnp.mean(cm.clip_score(x, c))),
            })  # fmt: skip
        per_class.append({"class": c, "median_pairwise": m, "rows": rows,
                          "x_unguided": np.asarray(base).tolist(),
                          "x_shown": None if shown is None else np.asarray(shown).tolist()})
        progress(f"class {c}: median pairwise distance {m:.3f}")
    keys = ("precision", "recall", "density", "coverage", "vendi", "class_score")
    mean = [
        {"fraction": f, **{k: float(np.mean([pc["rows"][i][k] for pc in per_class])) for k in keys}}
        for i, f in enumerate(fractions)
    ]
    return {"setting": {"n_per_class": n, "batch_size": batch_size, "cfg": cfg_scale,
                        "sampler": f"edm({steps})", "toy": "ring_of_classes()",
                        "seconds": time.perf_counter() - t0},
            "mean_over_classes": mean, "per_class": per_class}  # fmt: skip


def _plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    mean = out["mean_over_classes"]
    f = [r["fraction"] for r in mean]
    ax = axes[0]
    for k in ("recall", "coverage", "precision", "density", "class_score"):
        ax.plot(f, [r[k] for r in mean], marker="o", label=k)
    ax.set_xlabel("r / median pairwise distance")
    ax.set_xscale("symlog", linthresh=1 / 32)
    ax.set_ylabel("metric (mean over classes)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot(f, [r["vendi"] for r in mean], marker="o", color="k")
    ax.set_xlabel("r / median pairwise distance")
    ax.set_xscale("symlog", linthresh=1 / 32)
    ax.set_yscale("log")
    ax.set_ylabel("Vendi (RBF)")
    ax = axes[2]
    pc = out["per_class"][0]
    a, b = np.asarray(pc["x_unguided"]), np.asarray(pc["x_shown"])
    ax.scatter(a[:, 0], a[:, 1], s=10, label="unguided")
    ax.scatter(b[:, 0], b[:, 1], s=10, marker="x", label=f"SPELL, r = median / {1 / SHOWN:g}")
    ax.set_aspect("equal")
    ax.set_xlabel("x[0]")
    ax.set_ylabel("x[1]")
    ax.legend(fontsize=8)
    ax.set_title("class 0, 128 samples")
    fig.suptitle("SPELL App. M on the conditional ring GMM: diversity vs fidelity as r grows")
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=at_least(1), default=128)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--steps", type=at_least(1), default=18)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="results/spell_tradeoff")
    a = p.parse_args(argv)
    out = run(a.n, a.batch_size, a.cfg, a.steps, a.seed)
    write_json(a.out + ".json", out)
    _plot(out, a.out + ".png")
    print(f"{'r/median':>8s} {'prec':>6s} {'recall':>6s} {'dens':>6s} {'cover':>6s} "
          f"{'vendi':>6s} {'class':>6s}")  # fmt: skip
    for r in out["mean_over_classes"]:
        print(f"{r['fraction']:8.3f} {r['precision']:6.3f} {r['recall']:6.3f} {r['density']:6.3f} "
              f"{r['coverage']:6.3f} {r['vendi']:6.3f} {r['class_score']:6.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
