"""SPELL's cost per sampler step: with vs without the term, intra-batch and 10^3-10^6
reference shields, on the toy and on a UNet-sized dummy denoiser.

    python -m benchmarks.spell              # ~5 min on 2 CPU cores
    python -m benchmarks.spell --quick      # smaller grid, ~1 min

Each configuration runs ``jaxdiv.sample`` (DDIM, ``--steps`` steps) without and with the
term once each to compile, then alternates the two over ``--repeats`` rounds
(:func:`benchmarks.timing.interleaved`); the median wall time divided by the number of
steps is the step time. The SPELL term alone is timed the same way (jitted, on the
``x0_hat`` of the unguided run's middle step). The overhead is ``SPELL time / step time
without SPELL`` (one SPELL evaluation per DDIM step); the end-to-end ratio ``step(with) /
step(without) - 1`` is printed too but is noisy on a shared CPU. The paper reports ~0.3% for
intra-batch SPELL with Simple Diffusion on a V100 (App. G, Table 5). Denoisers:

* ``toy``: the exact denoiser of a 16-component GMM in d = 16 (a few hundred flops per
  sample — the worst case for relative overhead);
* ``unet_dummy``: latents ``(4, 32, 32)`` (d = 4096) through 4 dense 4096 x 4096 layers,
  ~134 MFLOP per sample. A real SD 1.5 UNet at 64 x 64 latents costs several hundred GFLOP
  per sample, so the relative overheads here are upper bounds for real models.

For 10^6 toy shields an approximate IVF index (our JAX k-means + inverted lists, the
layout of faiss ``IndexIVFFlat``; faiss itself is not installed) is timed for comparison.
Writes ``results/spell_benchmark.json``; device: whatever JAX runs on (CPU here).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
import toy
from benchmarks.timing import environment, interleaved, jit_over_arrays
from experiments.common import write_json
from jaxdiv import samplers, schedules
from jaxdiv.guidance.base import StepContext
from jaxdiv.guidance.spell import spell
from jaxdiv.guidance.spell.radius_search import build_index, build_ivf


class DenseDummy:
    """A UNet-sized stand-in: flatten, ``depth`` dense ``d x d`` tanh layers, reshape."""

    def __init__(self, shape, depth, key):
        self.shape = shape
        d = int(np.prod(shape))
        keys = jax.random.split(key, depth)
        self.ws = [jax.random.normal(k, (d, d), jnp.float32) / np.sqrt(d) for k in keys]

    def __call__(self, x, t, cond=None):
        h = x.reshape(x.shape[0], -1)
        for w in self.ws:
            h = jnp.tanh(h @ w)
        return h.reshape(x.shape)


def time_terms(smp, sch, den, noise, key, terms: dict, rounds: int, budget_s: float = 20.0):
    """Per-step times of ``jaxdiv.sample`` without guidance and with each of ``terms``
    (``{label: term}``), interleaved in one process (without, a, b, ..., without, a, ...),
    and each term alone, jitted with its arrays as arguments, on the ``x0_hat`` of the
    unguided run's middle step (what one guided DDIM step adds).

    Returns ``{"step": {"without": t, label: t, ...}, "alone": {label: t},
    "first_call_s": {...}}``, each ``t`` the :func:`interleaved` entry (``median_s``,
    ``min_s``, ``max_s``, ``runs_s``), ``step`` divided by the number of steps.
    """
    steps = smp.num_steps

    def run(g):
        return jaxdiv.sample(smp, den, noise, key=key, guidance=g).x0.block_until_ready()

    fns = {"without": lambda: run(None)} | {k: (lambda g=g: run(g)) for k, g in terms.items()}
    first = {}
    for label, fn in fns.items():  # compiles: reported, not timed as steps
        t0 = time.perf_counter()
        fn()
        first[label] = time.perf_counter() - t0
    timed = interleaved(fns, rounds, budget_s=budget_s)
    tr = jaxdiv.sample(smp, den, noise, key=key, trace=True).trace
    i = steps // 2
    x, x0 = tr.x[i], tr.x0_hat[i]
    t = smp.times[i]
    ctx = StepContext(x, t, sch.alpha(t), sch.sigma(t), i, steps, key, None)
    alone = {}
    for label, g in terms.items():
        apply = jit_over_arrays(lambda tree, x0_: tree[0].apply(tree[1], x0_, tree[2])[0],
                                (g, g.init(x, None, key), ctx))  # fmt: skip
        alone[label] = lambda apply=apply: apply(x0).block_until_ready()
    per_step = {k: {"median_s": v["median_s"] / steps, "min_s": v["min_s"] / steps,
                    "max_s": v["max_s"] / steps, "runs_s": [r / steps for r in v["runs_s"]]}
                for k, v in timed.items()}  # fmt: skip
    return {"step": per_step, "alone": interleaved(alone, rounds, budget_s=budget_s / 2),
            "first_call_s": first}  # fmt: skip


def bench(name, den, shape, batches, refs, steps, repeats, radius, ivf_probes=()):
    sch = schedules.vp_linear()
    smp = samplers.ddim(sch, steps)
    d = int(np.prod(shape))
    rows = []
    key = jax.random.key(0)

    def record(kind, b, k, g, label=None):
        noise = jax.random.normal(jax.random.key(1), (b,) + shape)
        res = time_terms(smp, sch, den, noise, key, {"with": g}, repeats)
        without, with_ = res["step"]["without"], res["step"]["with"]
        base = without["median_s"]
        term = res["alone"]["with"]["median_s"]
        row = {"denoiser": name, "shields": kind, "batch": b, "num_reference": k,
               "search": label or "exact", "step_s_without": base,
               "step_s_with": with_["median_s"],
               "step_s_without_min_max": [without["min_s"], without["max_s"]],
               "step_s_with_min_max": [with_["min_s"], with_["max_s"]],
               "spell_s_per_eval": term,
               "spell_s_min_max": [res["alone"]["with"]["min_s"], res["alone"]["with"]["max_s"]],
               "timing": "interleaved A B A B, median [min-max]", "overhead": term / base,
               "overhead_end_to_end": with_["median_s"] / base - 1.0}  # fmt: skip
        rows.append(row)
        print(f"{name:10s} {kind:9s} {row['search']:6s} B={b:4d} K={k:8d}  step "
              f"{1e3 * base:9.3f} ms  SPELL {1e3 * term:9.3f} ms  overhead "
              f"{100 * row['overhead']:9.2f}%  (end-to-end "
              f"{100 * row['overhead_end_to_end']:8.2f}%)", flush=True)  # fmt: skip

    for b in batches:
        record("intra", b, 0, spell(radius))
    for k in refs:
        ref = jax.random.normal(jax.random.key(2), (k, d))
        idx = build_index(ref)
        for b in sorted({batches[0], batches[-1]}):
            record("reference", b, k, spell(radius, reference=idx, intra_batch=False))
        if ivf_probes and k == refs[-1]:
            t0 = time.perf_counter()
            ivf = build_ivf(ref, int(np.sqrt(k)), key=jax.random.key(3), iters=5)
            print(f"  IVF build ({int(np.sqrt(k))} cells): {time.perf_counter() - t0:.1f} s")
            for p in ivf_probes:
                for b in sorted({batches[0], batches[-1]}):
                    g = spell(radius, reference=ivf, intra_batch=False, nprobe=p)
                    record("reference", b, k, g, label=f"ivf{p}")
        del ref, idx
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default="results/spell_benchmark.json")
    a = p.parse_args(argv)
    gm = toy.GaussianMixture(jax.random.normal(jax.random.key(0), (16, 16)) * 3, jnp.ones(16))
    sch = schedules.vp_linear()
    if a.quick:
        toy_b, toy_k, probes = (8, 256), (1_000, 100_000), (1,)
        unet_b, unet_k = (8,), (1_000,)
    else:
        toy_b, toy_k, probes = (8, 32, 128, 256), (1_000, 10_000, 100_000, 1_000_000), (1, 10)
        unet_b, unet_k = (8, 32, 64), (1_000, 10_000, 100_000)
    rows = bench("toy", gm.denoiser(sch), (16,), toy_b, toy_k, a.steps, a.repeats, 0.5, probes)
    dummy = DenseDummy((4, 32, 32), 4, jax.random.key(5))
    rows += bench("unet_dummy", dummy, (4, 32, 32), unet_b, unet_k, a.steps, a.repeats, 20.0)
    write_json(a.out, environment() | {"steps": a.steps, "repeats": a.repeats, "rows": rows})
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
