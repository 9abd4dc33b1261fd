"""The toy suite behind `make toy-suite`: every sampler on an exact GMM and on two moons.

    python -m experiments.toy_suite [--out results/toy_suite] [--n 4096]

Writes PNG scatter plots and ``toy_suite.json`` (energy distance to true samples, mean
log-likelihood under the true density, NFE, wall time) under ``--out`` and prints a table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import jaxdiv  # noqa: E402
import toy  # noqa: E402
from experiments.common import at_least, progress, save_figure, write_json  # noqa: E402
from jaxdiv import samplers, schedules  # noqa: E402
from jaxdiv.metrics import energy_distance  # noqa: E402


def demo_gmm() -> toy.GaussianMixture:
    """Six anisotropic components on a ring, unequal weights."""
    k = 6
    ang = jnp.arange(k) * 2 * jnp.pi / k
    means = 2.5 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
    rot = jnp.stack([jnp.stack([jnp.cos(ang), -jnp.sin(ang)], -1),
                     jnp.stack([jnp.sin(ang), jnp.cos(ang)], -1)], -2)  # fmt: skip
    covs = rot @ jnp.diag(jnp.array([0.25, 0.02])) @ jnp.swapaxes(rot, 1, 2)
    w = jnp.arange(1.0, k + 1.0)
    return toy.GaussianMixture(means, covs, w / w.sum())


def sampler_suite():
    return {
        "ddim (vp_linear, 50)": samplers.ddim(schedules.vp_linear(), 50),
        "ddpm (vp_linear, eta=1, 100)": samplers.ddim(schedules.vp_linear(), 100, eta=1.0),
        "edm heun (18)": samplers.edm(schedules.edm(), 18),
        "edm churn (32, S_churn=40)": samplers.edm(
            schedules.edm(), 32, s_churn=40.0, s_tmin=0.05, s_tmax=50.0
        ),  # fmt: skip
        "flow euler (50)": samplers.flow_euler(schedules.flow(), 50),
    }


def run_case(s, den, noise, key):
    t0 = time.perf_counter()
    x = jaxdiv.sample(s, den, noise, key=key).x0.block_until_ready()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jaxdiv.sample(s, den, noise, key=key).x0.block_until_ready()
    return x, first, time.perf_counter() - t0


def scatter_grid(results, ref, title, path):
    n = len(results) + 1
    fig, axes = plt.subplots(1, n, figsize=(2.6 * n, 2.8), sharex=True, sharey=True)
    axes[0].scatter(ref[:, 0], ref[:, 1], s=1, c="k", alpha=0.4)
    axes[0].set_title("true samples", fontsize=8)
    for ax, (name, x) in zip(axes[1:], results.items()):
        ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
        ax.set_title(name, fontsize=8)
    for ax in axes:
        ax.set_aspect("equal")
        ax.set_xlabel("x[0]", fontsize=8)
    axes[0].set_ylabel("x[1]", fontsize=8)
    fig.suptitle(title)
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="results/toy_suite")
    ap.add_argument("--n", type=at_least(2), default=4096)
    args = ap.parse_args(argv)
    out = Path(args.out)
    key = jax.random.key(0)
    noise = jax.random.normal(jax.random.key(1), (args.n, 2))
    table = []

    gm = demo_gmm()
    truth = gm.sample(jax.random.key(2), args.n)
    null = float(energy_distance(gm.sample(jax.random.key(3), args.n), truth))
    ll_truth = float(gm.log_prob(truth).mean())
    xs = {}
    for name, s in sampler_suite().items():
        progress(f"GMM: {name}")
        x, first, again = run_case(s, gm.denoiser(s.schedule), noise, key)
        xs[name] = x
        table.append({"target": "gmm", "sampler": name, "nfe": s.nfe,
                      "energy_distance": float(energy_distance(x, truth)),
                      "mean_loglik": float(gm.log_prob(x).mean()),
                      "seconds_first_call": first, "seconds_cached": again})  # fmt: skip
    scatter_grid(xs, truth, "exact GMM denoiser", out / "gmm_samplers.png")

    moons = toy.two_moons(jax.random.key(4), args.n)
    null_moons = float(energy_distance(toy.two_moons(jax.random.key(5), args.n), moons))
    train = toy.two_moons(jax.random.key(6), 512)  # the memorising model's training set
    for label, make_den in (
        ("two moons, MLP", lambda sch: toy.load_two_moons_mlp(sch)),
        ("two moons, empirical (512 pts)",
         lambda sch: toy.EmpiricalDenoiser(train, sch)),
    ):  # fmt: skip
        xs = {}
        for name, s in sampler_suite().items():
            progress(f"{label}: {name}")
            x, first, again = run_case(s, make_den(s.schedule), noise, key)
            xs[name] = x
            row = {"target": label, "sampler": name, "nfe": s.nfe,
                   "energy_distance": float(energy_distance(x, moons)),
                   "seconds_first_call": first, "seconds_cached": again}  # fmt: skip
            if "empirical" in label:
                d = jnp.min(jnp.linalg.norm(x[:, None] - train[None], axis=-1), axis=1)
                row["share_within_1e-3_of_training_point"] = float(jnp.mean(d < 1e-3))
            table.append(row)
        fname = "two_moons_mlp.png" if "MLP" in label else "two_moons_empirical.png"
        scatter_grid(xs, moons, label, out / fname)

    summary = {"n": args.n, "null_energy_distance_gmm": null, "mean_loglik_true_gmm": ll_truth,
               "null_energy_distance_moons": null_moons, "rows": table}  # fmt: skip
    write_json(out / "toy_suite.json", summary)
    print(
        f"\n{'target':32s} {'sampler':30s} {'NFE':>4s} {'E-dist':>8s} {'loglik':>7s} "
        f"{'memorised':>9s} {'s':>6s}"
    )
    for r in table:
        ll = r.get("mean_loglik", float("nan"))
        mem = r.get("share_within_1e-3_of_training_point", float("nan"))
        print(f"{r['target']:32s} {r['sampler']:30s} {r['nfe']:4d} {r['energy_distance']:8.4f} "
              f"{ll:7.3f} {mem:9.3f} {r['seconds_cached']:6.3f}")  # fmt: skip
    print(
        f"\nnull energy distance (true vs true): GMM {null:.4f}, moons {null_moons:.4f}; "
        f"true mean log-lik {ll_truth:.3f}"
    )
    print(f"figures and JSON in {out}/")


if __name__ == "__main__":
    main()
