"""SPELL's cost per sampler step: with vs without the term, intra-batch and 10^3-10^6
reference shields, on the toy and on a UNet-sized dummy denoiser.

    python -m benchmarks.spell              # ~5 min on 2 CPU cores
    python -m benchmarks.spell --quick      # smaller grid, ~1 min

Each configuration runs ``jaxdiv.sample`` (DDIM, ``--steps`` steps) once to compile and
then ``--repeats`` times; the best wall time divided by the number of steps is the step
time. The SPELL term alone is timed the same way (jitted, on the ``x0_hat`` of the
unguided run's middle step). The overhead is ``SPELL time / step time without SPELL``
(one SPELL evaluation per DDIM step); the end-to-end ratio ``step(with) / step(without)
- 1`` is printed too but is noisy on a shared CPU. The paper reports ~0.3% for
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
import os
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import jaxdiv
import toy
from benchmarks.timing import interleaved
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


def bench(name, den, shape, batches, refs, steps, repeats, radius, ivf_probes=()):
    sch = schedules.vp_linear()
    smp = samplers.ddim(sch, steps)
    d = int(np.prod(shape))
    rows = []
    key = jax.random.key(0)

    def record(kind, b, k, g, label=None):
        noise = jax.random.normal(jax.random.key(1), (b,) + shape)
        run = lambda gg: jaxdiv.sample(smp, den, noise, key=key, guidance=gg).x0.block_until_ready()
        # unguided and guided alternate (A B A B) so both see the same machine load
        timed = interleaved({"without": lambda: run(None), "with": lambda: run(g)}, repeats,
                            budget_s=20.0)  # fmt: skip
        base = timed["without"]["median_s"] / steps
        with_ = timed["with"]["median_s"] / steps
        # the term alone on realistic inputs: x0_hat of the unguided run's middle step
        tr = jaxdiv.sample(smp, den, noise, key=key, trace=True).trace
        i = steps // 2
        x, x0 = tr.x[i], tr.x0_hat[i]
        t = smp.times[i]
        ctx = StepContext(x, t, sch.alpha(t), sch.sigma(t), i, steps, key, None)
        state = g.init(x, None, key)
        apply = jax.jit(lambda x0_: g.apply(state, x0_, ctx)[0])
        alone = interleaved({"term": lambda: apply(x0).block_until_ready()}, repeats, 10.0)
        term = alone["term"]["median_s"]
        row = {"denoiser": name, "shields": kind, "batch": b, "num_reference": k,
               "search": label or "exact", "step_s_without": base, "step_s_with": with_,
               "step_s_without_min_max": [timed["without"]["min_s"] / steps,
                                          timed["without"]["max_s"] / steps],
               "step_s_with_min_max": [timed["with"]["min_s"] / steps,
                                       timed["with"]["max_s"] / steps],
               "spell_s_per_eval": term,
               "spell_s_min_max": [alone["term"]["min_s"], alone["term"]["max_s"]],
               "timing": "interleaved A B A B, median [min-max]", "overhead": term / base,
               "overhead_end_to_end": with_ / base - 1.0}  # fmt: skip
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
    write_json(a.out, {
        "date": time.strftime("%Y-%m-%d"), "device": str(jax.devices()[0]),
        "versions": {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "numpy": np.__version__},
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS")},
        "cpu_count": os.cpu_count(), "steps": a.steps, "repeats": a.repeats, "rows": rows,
    })  # fmt: skip
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
