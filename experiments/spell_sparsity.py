"""SPELL Fig. 5 / App. H on a toy: when and how strongly the repellency acts.

    python -m experiments.spell_sparsity            # ~1-2 min on CPU

128 two-moons samples (data scale 2, see ``experiments/spell_two_moons.py``) generated in
batches of 8 with intra-batch *and* previous-batch shields, DDIM (eta = 0, 50 steps, like
Latent Diffusion) on the DDPM VP schedule. The mix of shields is the paper's Fig. 5 / Fig.
11 setting, at a larger scale: Fig. 11 generates 2 images at a time, 4-32 per prompt (at
most 30 earlier images), while the last batch here repels from 120 earlier samples. Four
variants: r = 0.075; r = 0.075 with overcompensation 1.6; a 1.5x larger radius (App. H
Fig. 13, whose shields are 8 protected images); and the larger radius with
overcompensation 2 (Fig. 14 uses overcompensation 2 at the standard radius). A fifth run
repeats the base variant with the ancestral sampler (eta = 1).

Writes ``results/spell_sparsity.png`` ((a) |score correction| / |score| per step over the
active trajectories, (b) share of trajectories with a non-zero term vs t) and
``results/spell_sparsity.json``: the share active at t = 0.8 and t = 0.6 (t = timestep /
1000, 1 = noise), the ratio's median / 95th percentile / max over active entries, the
share of active entries below 5%, and the share of trajectories whose repellency has
stopped for good by each t.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

import toy
from experiments.common import at_least, progress, save_figure, seed, write_json
from experiments.spell_two_moons import ScaledMoonsDenoiser
from jaxdiv import samplers, schedules
from jaxdiv.recipes import spell_batched

VARIANTS = {
    "r=0.075": (0.075, 1.0, 0.0),
    "r=0.075, lambda=1.6": (0.075, 1.6, 0.0),
    "r=0.1125": (0.1125, 1.0, 0.0),
    "r=0.1125, lambda=2": (0.1125, 2.0, 0.0),
    "r=0.075, eta=1 (ancestral)": (0.075, 1.0, 1.0),
}


def _at(tn, values, t):
    """Value at the grid time closest to normalised time ``t``."""
    return float(values[int(np.argmin(np.abs(tn - t)))])


def run(n=128, batch_size=8, steps=50, seed=0):
    sch = schedules.vp_linear()
    den = ScaledMoonsDenoiser(toy.load_two_moons_mlp(sch), 2.0)
    noise = jax.random.normal(jax.random.key(seed), (n, 2))
    out = {}
    for name, (r, lam, eta) in VARIANTS.items():
        smp = samplers.ddim(sch, steps, eta=eta)
        t0 = time.perf_counter()
        res = spell_batched(smp, den, noise, key=jax.random.key(seed + 1), radius=r,
                            batch_size=batch_size, overcompensation=lam, trace=True)  # fmt: skip
        res.x0.block_until_ready()
        secs = time.perf_counter() - t0
        info = [tr.info["spell"] for tr in res.traces]
        active = np.concatenate([np.asarray(i.active) for i in info], axis=1)  # (N, n)
        ratio = np.concatenate([np.asarray(i.score_ratio) for i in info], axis=1)
        tn = (np.asarray(res.traces[0].t) + 1.0) / 1000.0  # t_clean = -1 -> 0, 999 -> 1
        share = active.mean(axis=1)
        act = ratio[active]
        # step after which a trajectory's term stays zero (0 if never active)
        last = np.where(active.any(0), active.shape[0] - np.argmax(active[::-1], 0), 0)
        stopped = [(last <= i).mean() for i in range(active.shape[0] + 1)]
        out[name] = {
            "radius": r, "overcompensation": lam, "eta": eta, "seconds": secs,
            "t": tn.tolist(), "share_active": share.tolist(),
            "share_active_at_t0.8": _at(tn, share, 0.8),
            "share_active_at_t0.6": _at(tn, share, 0.6),
            "share_active_last_step": float(share[-1]),
            "ratio_median": float(np.median(act)) if act.size else 0.0,
            "ratio_p95": float(np.percentile(act, 95)) if act.size else 0.0,
            "ratio_max": float(act.max()) if act.size else 0.0,
            "share_ratio_below_5pct": float((act < 0.05).mean()) if act.size else 1.0,
            "share_stopped_by_step": stopped,
            "ratio_per_step_active": [ratio[i][active[i]].tolist() for i in range(len(tn))],
        }  # fmt: skip
        progress(f"{name}: {secs:.1f} s; active at t=0.8 {out[name]['share_active_at_t0.8']:.2f}"
                 f", t=0.6 {out[name]['share_active_at_t0.6']:.2f}; ratio median "
                 f"{out[name]['ratio_median']:.3f} max {out[name]['ratio_max']:.3f}")  # fmt: skip
    return out


def _plot(out, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(14, 4.5))
    for j, (name, e) in enumerate(out.items()):
        tn = np.asarray(e["t"])
        pts = [(t, v) for t, vs in zip(tn, e["ratio_per_step_active"]) for v in vs]
        if pts:
            t, v = np.asarray(pts).T
            a.scatter(t + 0.003 * (j - 2), v, s=3, alpha=0.35, label=name)
        b.plot(tn, e["share_active"], label=name)
    a.set_yscale("log")
    a.set_xlabel("t (1 = noise)")
    a.set_ylabel("|score correction| / |score| (active)")
    a.invert_xaxis()
    a.legend(fontsize=7, markerscale=3)
    b.set_xlabel("t (1 = noise)")
    b.set_ylabel("share of trajectories with non-zero SPELL term")
    b.invert_xaxis()
    b.legend(fontsize=7)
    fig.suptitle("SPELL Fig. 5 on two moons (x2): 128 samples, batches of 8, intra+previous-batch")
    save_figure(fig, path)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=at_least(1), default=128)
    p.add_argument("--batch-size", type=at_least(1), default=8)
    p.add_argument("--steps", type=at_least(1), default=50)
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--out", default="results/spell_sparsity")
    a = p.parse_args(argv)
    out = run(a.n, a.batch_size, a.steps, a.seed)
    write_json(a.out + ".json", out)
    _plot(out, a.out + ".png")
    print(f"{'variant':30s} act@0.8 act@0.6 act@end ratio_med ratio_p95 ratio_max <5%")
    for name, e in out.items():
        print(f"{name:30s} {e['share_active_at_t0.8']:7.2f} {e['share_active_at_t0.6']:7.2f} "
              f"{e['share_active_last_step']:7.2f} {e['ratio_median']:9.4f} {e['ratio_p95']:9.4f} "
              f"{e['ratio_max']:9.4f} {e['share_ratio_below_5pct']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
