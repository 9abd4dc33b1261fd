"""GASS on the toys: SPP, D_dep, D_ind, Vendi, precision with and without GASS, per ablation.

    python -m experiments.gass_toy                 # ~1.6 min CPU time (mostly compiling)
    python -m experiments.gass_toy --batches 8     # quick look

The analogue of the GASS paper's ablation table (ICML 2026, Table "Ablation") on two
toys: an 8-mode ring GMM (exact denoiser) and two moons (the trained MLP,
``toy/params/two_moons_mlp.safetensors``). The "image encoder" is
:func:`toy.encoder.sphere_encoder` fitted to each data set's centre and scale (``m = 16``,
anchor 2: the data land in a cap around ``e_t``, cosine about 0.9-0.95).

Sampling: EDM process, deterministic DDIM (probability-flow Euler) with 25 steps;
``--batches`` batches of ``--batch-size`` samples, the same noise and keys for every
configuration (paired comparisons). GASS is active on 10 uniformly spread steps (the
paper's 20 of 50) or, in the "early" row, on the first 10.

Toy hyperparameters. The paper's ``lr = 1e-4`` and ``r = 0.02`` are for SD latents and
CLIP ViT-H; on these toys the embeddings' spread is ``SPP ~ 0.4-0.5`` (the paper's CLIP
SPP of one prompt's images: 0.11-0.15 generated, 0.22 for real ImageNet images), and Adam
at ``1e-4`` moves a 2-D point by at most ``6e-3`` in 60 iterations, so we scale both:
``lr = 0.05``, ``r = 0.1`` (and 0.25 for the "excessive" row); patience 4, tolerance 5e-4
and 60 iterations as in the paper.

Metrics, per batch then averaged (mean +- standard error over batches): SPP, D_dep,
D_ind (``metrics.spp`` with one fixed key for every configuration), alignment (mean
``e_i . e_t``, the CLIPScore analogue), Vendi of the embeddings (cosine kernel), and
improved precision / recall (k = 3) of all samples against 4096 data points in data
space. ``prop41_increase`` is the fraction of unguided batches whose renormalised
targets increase the expected Gram determinant to second order
(:func:`jaxdiv.guidance.gass.expected_gram_det`): which regime of Prop. 4.1 the toy is in.

Writes ``results/gass_toy.json`` and ``results/gass_toy.png`` (embeddings on the
(e_t, u_ind) plane and the samples in data space, before and after GASS), and
``results/gass_toy_prop41.json``: Proposition 4.1's expected Gram-determinant ratio, exact
formula vs antithetic Monte Carlo, for near-orthogonal and tightly clustered batches
(``--only-prop41`` writes just that, in seconds).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
import toy
from experiments.common import at_least, progress, save_figure, seed, write_json
from jaxdiv import metrics, samplers, schedules
from jaxdiv.guidance.gass import expected_gram_det, gass
from toy.encoder import sphere_encoder
from toy.mlp import load_two_moons_mlp
from toy.two_moons import two_moons

NUM_STEPS = 25
NUM_ACTIVE = 10
LR = 0.05
RADIUS = 0.1


def configs():
    """(name, gass kwargs or None) for each row of the ablation table."""
    base = dict(r_dep=RADIUS, r_ind=RADIUS, lr=LR, num_active=NUM_ACTIVE)
    return [
        ("unguided", None),
        ("GASS", base),
        ("IP (isotropic axes)", dict(base, axes="isotropic")),
        ("RD (random u)", dict(base, axes="random")),
        ("w/o renormalisation", dict(base, renormalize=False)),
        ("r_dep=0 (u_ind only)", dict(base, r_dep=0.0)),
        ("r_ind=0 (e_t only)", dict(base, r_ind=0.0)),
        (f"r={2.5 * RADIUS:g} (excessive)", dict(base, r_dep=2.5 * RADIUS, r_ind=2.5 * RADIUS)),
        ("early consecutive", dict(base, steps="early")),
    ]


def make_toys(seed):
    k = 8
    ang = jnp.arange(k) * 2 * jnp.pi / k
    ring = toy.GaussianMixture(
        3.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1), jnp.full((k,), 0.05)
    )
    sch = schedules.edm()
    ring_data = ring.sample(jax.random.key(seed + 100), 4096)
    moons_data = two_moons(jax.random.key(seed + 101), 4096)
    return {
        "ring8": (ring.denoiser(sch), ring_data),
        "two_moons": (load_two_moons_mlp(sch), moons_data),
    }, sch


def batch_metrics(enc, key):
    """Per-batch SPP parts, alignment and Vendi of the embeddings (jit + vmap)."""

    def one(x):
        e = enc(x)
        res = metrics.spp(e, enc.text_emb, key)
        return dict(
            spp=res.spp,
            d_dep=res.d_dep,
            d_ind=res.d_ind,
            alignment=jnp.mean(e @ enc.text_emb),
            vendi=metrics.vendi(e, kernel="cosine"),
        )

    return jax.jit(jax.vmap(one))


def summarise(per_batch, x_all, data, base_per_batch=None):
    out = {}
    for k, v in per_batch.items():
        v = np.asarray(v, np.float64)
        out[k] = float(v.mean())
        out[k + "_se"] = float(v.std(ddof=1) / np.sqrt(v.size))
        if base_per_batch is not None:
            diff = v - np.asarray(base_per_batch[k], np.float64)
            out[k + "_paired_diff"] = float(diff.mean())
            out[k + "_paired_diff_se"] = float(diff.std(ddof=1) / np.sqrt(diff.size))
    pr = metrics.precision_recall(data, x_all, k=3)
    out["precision"], out["recall"] = float(pr.precision), float(pr.recall)
    return out


def prop41_fraction(enc, xs, key):
    """Fraction of batches whose renormalised GASS targets (r = RADIUS) increase the
    expected Gram determinant to second order."""
    ups = []
    for i, x in enumerate(np.asarray(xs)):
        e = np.asarray(enc(x), np.float64)
        e_t = np.asarray(enc.text_emb, np.float64)
        u = np.asarray(
            metrics.principal_residual_direction(jax.random.fold_in(key, i), e, e_t), np.float64
        )
        u = u - (u @ e_t) * e_t
        u /= np.linalg.norm(u)
        ups.append(expected_gram_det(e, e_t, u, RADIUS, RADIUS, renormalize=True).change > 0)
    return float(np.mean(ups))


def run_toy(name, den, data, sch, batches, batch_size, seed):
    enc = sphere_encoder(jax.random.key(seed), 2, 16, center=data.mean(0), scale=data.std())
    smp = samplers.ddim(sch, NUM_STEPS)
    noise = jax.random.normal(jax.random.key(seed + 1), (batches, batch_size, 2))
    keys = jax.random.split(jax.random.key(seed + 2), batches)
    metric_key = jax.random.key(seed + 3)
    measure = batch_metrics(enc, metric_key)
    rows, samples = {}, {}
    base = None
    for cname, kwargs in configs():
        g = None if kwargs is None else gass(enc, enc.text_emb, **kwargs)
        t0 = time.perf_counter()
        # the batches as independent groups of one program (GASS couples a batch)
        xs = jaxdiv.sample(smp, den, noise.reshape(-1, 2), key=keys, guidance=g,
                           groups=batches).x0.reshape(noise.shape)  # fmt: skip
        xs.block_until_ready()
        secs = time.perf_counter() - t0
        per_batch = measure(xs)
        row = summarise(per_batch, xs.reshape(-1, 2), data, base)
        row["seconds_incl_compile"] = secs
        if kwargs is None:
            base = per_batch
            row["prop41_increase"] = prop41_fraction(enc, xs, metric_key)
        rows[cname] = row
        samples[cname] = xs
        progress(
            f"{name:9s} {cname:24s} SPP {row['spp']:.4f} (+{row.get('spp_paired_diff', 0):.4f}) "
            f"Vendi {row['vendi']:.3f} precision {row['precision']:.3f} [{secs:.1f} s]"
        )
    return enc, rows, samples


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def prop41_reference(n=20000, seed=0):
    """Proposition 4.1 regimes, formula vs antithetic Monte Carlo (r = 0.02, as in the
    paper): near-orthogonal unit vectors (PAPERS.md's B = 8, m = 64 reference) and a tight
    cluster around e_t (B = 8, m = 16, eps = 0.1), with and without renormalisation;
    axes e_t and the principal residual direction of the batch."""
    rng = np.random.default_rng(seed)
    cases = {}
    for name, (b, m, eps) in {
        "near_orthogonal_B8_m64": (8, 64, None),
        "tight_cluster_B8_m16_eps0.1": (8, 16, 0.1),
    }.items():
        e_t = _unit(rng.normal(size=m))
        if eps is None:
            e = _unit(rng.normal(size=(b, m)))
        else:
            e = _unit(e_t + eps * rng.normal(size=(b, m)))
        u = metrics.principal_residual_direction(
            jax.random.key(seed), e.astype(np.float32), e_t.astype(np.float32)
        )
        u = np.asarray(u, np.float64)
        u = _unit(u - (u @ e_t) * e_t)
        d, g = rng.uniform(-0.02, 0.02, (2, n, b))
        for renorm in (False, True):
            ex = expected_gram_det(e, e_t, u, 0.02, 0.02, renormalize=renorm)

            def dets(sign, renorm=renorm):
                t = e + sign * (d[..., None] * e_t + g[..., None] * u)
                t = _unit(t) if renorm else t
                return np.linalg.det(t @ np.swapaxes(t, -1, -2))

            pair = 0.5 * (dets(1.0) + dets(-1.0)) / ex.det
            cases[f"{name}_{'renormalised' if renorm else 'unrenormalised'}"] = dict(
                ratio_formula=ex.expected / ex.det,
                ratio_monte_carlo=float(pair.mean()),
                ratio_monte_carlo_se=float(pair.std(ddof=1) / np.sqrt(n)),
                mean_cos_to_e_t=float((e @ e_t).mean()),
            )
            progress(f"Prop. 4.1 {name} renorm={renorm}: E[det]/det {ex.expected / ex.det:.6f}")
    return dict(r=0.02, monte_carlo_pairs=n, cases=cases)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(10, 4.6 * len(results)))
    axes = np.atleast_2d(axes)
    for row, (name, (enc, samples, data)) in enumerate(results.items()):
        x0, x1 = np.asarray(samples["unguided"][0]), np.asarray(samples["GASS"][0])
        e0, e1 = np.asarray(enc(x0)), np.asarray(enc(x1))
        e_t = np.asarray(enc.text_emb)
        u = np.asarray(metrics.principal_residual_direction(jax.random.key(0), e0, e_t))
        ax = axes[row, 0]
        ax.scatter(e0 @ e_t, e0 @ u, s=22, label="unguided", alpha=0.8)
        ax.scatter(e1 @ e_t, e1 @ u, s=22, label="GASS", alpha=0.8, marker="x")
        for a, b in zip(e0, e1, strict=True):
            ax.plot([a @ e_t, b @ e_t], [a @ u, b @ u], color="gray", lw=0.5, alpha=0.6)
        ax.set_xlabel("e . e_t  (prompt-dependent axis)")
        ax.set_ylabel("e . u_ind  (principal residual axis)")
        ax.set_title(f"{name}: one batch on the (e_t, u_ind) plane")
        ax.legend()
        ax = axes[row, 1]
        d = np.asarray(data[::2])  # two_moons lists the upper moon first: take both
        ax.scatter(d[:, 0], d[:, 1], s=2, color="lightgray", label="data")
        ax.scatter(x0[:, 0], x0[:, 1], s=22, label="unguided")
        ax.scatter(x1[:, 0], x1[:, 1], s=22, marker="x", label="GASS")
        for a, b in zip(x0, x1, strict=True):
            ax.plot([a[0], b[0]], [a[1], b[1]], color="gray", lw=0.5, alpha=0.6)
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]")
        ax.set_ylabel("x[1]")
        ax.set_title(f"{name}: the same batch in data space (same noise)")
        ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=at_least(2), default=64)
    parser.add_argument("--batch-size", type=at_least(4), default=16)
    parser.add_argument("--seed", type=seed, default=0)
    parser.add_argument("--out", default="results/gass_toy")
    parser.add_argument(
        "--only-prop41", action="store_true", help="only write <out>_prop41.json (seconds)"
    )
    args = parser.parse_args(argv)
    write_json(args.out + "_prop41.json", prop41_reference(seed=args.seed))
    if args.only_prop41:
        return
    toys, sch = make_toys(args.seed)
    table, figure = {}, {}
    for name, (den, data) in toys.items():
        enc, rows, samples = run_toy(name, den, data, sch, args.batches, args.batch_size, args.seed)
        table[name] = rows
        figure[name] = (enc, samples, data)
    setting = dict(
        batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
        sampler=f"ddim on edm, {NUM_STEPS} steps, eta=0",
        gass=dict(lr=LR, r=RADIUS, num_active=NUM_ACTIVE, max_iters=60, patience=4, tol=5e-4),
        encoder="toy.encoder.sphere_encoder(m=16, anchor=2), fitted to each data set",
        command="python -m experiments.gass_toy "
        + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "only_prop41"
        ),
    )
    write_json(args.out + ".json", dict(setting=setting, results=table))
    plot(figure, args.out + ".png")
    progress(f"wrote {args.out}.json and {args.out}.png")


if __name__ == "__main__":
    main()
