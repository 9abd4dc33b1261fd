"""Particle guidance's ring toy: distinct modes hit by 10 particles, PG vs SPELL vs i.i.d.

    python -m experiments.pg_ring [--runs 100] [--steps 32] [--out results/pg_ring]

The toy of Corso et al. (2024)'s synthetic experiments: 10 Gaussians of variance 0.005 on
the unit circle, equal weights, exact denoiser; 10 particles per run, ``--runs`` runs
with independent seeds (the same seeds for every method). For each run we count the
distinct modes hit (each particle assigned to its nearest mode), as in the PG code, and
the fraction of particles *on* a mode (within 3 standard deviations, 0.212, of its
nearest mean) -- repulsion that pushes particles between modes also "hits" more modes --
and the distinct modes hit by on-mode particles only.
I.i.d. sampling hits ``10 (1 - 0.9^10) = 6.51`` modes on average.

Sampler: ``samplers.edm(schedules.edm(), --steps)`` (Karras Heun, deterministic). Methods:

* ``iid``: no guidance;
* ``PG, x0 variant (jaxdiv)``: ``particle(strength, space="x0_hat", time_scaling="x0",
  min_noise_level=1.0)`` -- x0_hat space, constant weight, off below noise level 1 (not
  the paper's formulation; ``particle``'s default in jaxdiv's first releases);
* ``PG (SD code: score form, sigma >= 1)``: ``particle(strength, min_noise_level=1.0)``
  -- the paper's score-form force on ``x_t``, switched off below noise level 1 as in PG's
  public Stable Diffusion code (whose ``eps``-form scaling, ``time_scaling="eps"``, equals
  the score form on this EDM process, where ``alpha = 1``);
* ``SPELL``: ``spell(radius)``, intra-batch shields.

Writes ``<out>.json`` (modes hit mean and standard error, on-mode fraction, per strength)
and ``<out>.png`` (one run's particles per method).
"""

from __future__ import annotations

import argparse
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
import toy
from experiments.common import at_least, progress, save_figure, seed, write_json
from jaxdiv import samplers, schedules
from jaxdiv.guidance import particle, spell

NUM_MODES, VARIANCE, PARTICLES = 10, 0.005, 10
PG_X0 = "PG, x0 variant (jaxdiv)"
PG_SD = "PG (SD code: score form, sigma >= 1)"
PG_STRENGTHS = (0.01, 0.03, 0.1, 0.3)
PG_SD_STRENGTHS = (0.03, 0.1, 0.3, 1.0)
SPELL_RADII = (0.2, 0.4, 0.6, 0.8)


def ring_mixture(num_modes=NUM_MODES, variance=VARIANCE) -> toy.GaussianMixture:
    """``num_modes`` equal Gaussians of variance ``variance`` on the unit circle."""
    th = 2 * np.pi * np.arange(num_modes) / num_modes
    return toy.GaussianMixture(np.stack([np.cos(th), np.sin(th)], 1), np.full(num_modes, variance))


def mode_stats(x, means, variance=VARIANCE):
    """Per run: distinct nearest modes hit, fraction of particles within 3 std of a mode,
    and distinct modes hit counting only those on-mode particles."""
    d = jnp.linalg.norm(x[..., None, :] - means, axis=-1)  # (runs, B, K)
    onehot = jax.nn.one_hot(jnp.argmin(d, -1), means.shape[0])
    on = jnp.min(d, -1) < 3 * np.sqrt(variance)
    hit = onehot.max(1).sum(-1)
    hit_on = (onehot * on[..., None]).max(1).sum(-1)
    return np.asarray(hit), np.asarray(on.mean(-1)), np.asarray(hit_on)


def sweep(sampler, den, make, values, noise, keys):
    """Samples ``(len(values), runs, B, 2)``: one compiled program for the whole sweep."""
    one = lambda v, z, k: jaxdiv.sample(sampler, den, z, key=k, guidance=make(v)).x0
    f = jax.jit(jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, None)))
    return f(jnp.asarray(values, jnp.float32), noise, keys)


def run(runs=100, steps=32, seed=0):
    """The whole experiment; returns ``(table, example_particles)``."""
    gm = ring_mixture()
    sch = schedules.edm()
    sampler = samplers.edm(sch, steps)
    den = gm.denoiser(sch)
    noise = jax.random.normal(jax.random.key(seed), (runs, PARTICLES, 2))
    keys = jax.random.split(jax.random.key(seed + 1), runs)
    methods = {
        "iid": (lambda v: None, (0.0,)),
        PG_X0: (
            lambda v: particle(v, space="x0_hat", time_scaling="x0", min_noise_level=1.0),
            PG_STRENGTHS,
        ),
        PG_SD: (lambda v: particle(v, min_noise_level=1.0), PG_SD_STRENGTHS),
        "SPELL": (lambda v: spell(v), SPELL_RADII),
    }
    table, examples = {}, {}
    for name, (make, values) in methods.items():
        t0 = time.perf_counter()
        xs = sweep(sampler, den, make, values, noise, keys)
        for v, x in zip(values, xs):
            hit, on, hit_on = mode_stats(x, gm.means)
            key = name if name == "iid" else f"{name}@{v:g}"
            table[key] = dict(
                method=name, value=float(v), modes_hit=float(hit.mean()),
                modes_hit_se=float(hit.std(ddof=1) / np.sqrt(runs)), on_mode=float(on.mean()),
                modes_hit_on_mode=float(hit_on.mean()),
            )  # fmt: skip
            examples[key] = np.asarray(x[0])
        progress(f"pg_ring {name}: {time.perf_counter() - t0:.1f}s")
    return table, examples


def summary_lines(table):
    w = max([12, *map(len, table)])
    lines = [f"{'method':{w}s} {'modes hit':>13s} {'on-mode':>8s} {'hit on-mode':>12s}"]
    for key, row in table.items():
        lines.append(f"{key:{w}s} {row['modes_hit']:6.2f} ± {row['modes_hit_se']:.2f} "
                     f"{row['on_mode']:8.3f} {row['modes_hit_on_mode']:12.2f}")  # fmt: skip
    return lines


def plot(examples, means, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(examples)
    cols = min(len(keys), 7)
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    th = np.linspace(0, 2 * np.pi, 200)
    for ax, key in zip(axes.flat, keys):
        ax.plot(np.cos(th), np.sin(th), color="0.85", lw=0.8)
        ax.scatter(means[:, 0], means[:, 1], s=60, facecolors="none", edgecolors="0.5")
        ax.scatter(examples[key][:, 0], examples[key][:, 1], s=12, color="C3")
        ax.set_title(textwrap.fill(key, 24), fontsize=8)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=at_least(1), default=100)
    p.add_argument("--steps", type=at_least(1), default=32)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="results/pg_ring")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    table, examples = run(args.runs, args.steps, args.seed)
    setting = dict(runs=args.runs, particles=PARTICLES, modes=NUM_MODES, variance=VARIANCE,
                   sampler=f"edm Heun {args.steps} steps", seed=args.seed,
                   iid_expected=NUM_MODES * (1 - 0.9**10),
                   seconds=time.perf_counter() - t0)  # fmt: skip
    write_json(args.out + ".json", dict(setting=setting, results=table))
    plot(examples, np.asarray(ring_mixture().means), args.out + ".png")
    print("\n".join(summary_lines(table)))
    print(f"wrote {args.out}.json, {args.out}.png ({setting['seconds']:.0f}s)")


if __name__ == "__main__":
    main()
