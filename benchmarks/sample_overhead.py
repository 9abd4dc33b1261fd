"""Per-call overhead of :func:`jaxdiv.sample`: the whole call against the compiled program it
runs, called directly, alternating in one process.

    JAX_PLATFORMS=cpu taskset -c 0 python -m benchmarks.sample_overhead [--rounds 50]
        [--batches 4 4096] [--steps 16] [--out results/benchmarks/sample_overhead.json]

For each case (the exact GMM toy of ``benchmarks.toy_sampler``, d = 2, K = 8, EDM Heun with
``--steps`` steps, ``B`` samples; without guidance, and at ``B <= 64`` with particle
guidance, a term that has an ``init`` and whose pairwise cost grows as ``B^2``) a round
times ``jaxdiv.sample(...)`` end to end (argument checks, the terms' ``init``, dispatch and
the run, blocking on ``x0``) and the program alone: ``jaxdiv.sampling._run`` called with
the arguments ``sample`` prepared once, which is the same compiled executable.
``overhead_ms`` is the difference of the two medians; ``sample_over_program`` the ratio
per round. Run it on one pinned core as above: XLA:CPU's thread pool and the Python thread
then share that core, as in ``benchmarks.toy_sampler``.
"""

from __future__ import annotations

import argparse
import statistics

CASES = ("none", "particle")
PARTICLE_MAX_BATCH = 64


def measure(batch: int, steps: int, guidance_name: str, rounds: int) -> dict:
    """One case: ``sample`` and the program alone, interleaved; see the module docstring."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    import jaxdiv
    import toy
    from benchmarks.timing import interleaved, round_ratio_range
    from benchmarks.toy_sampler import make_gmm
    from jaxdiv import guidance, samplers, sampling, schedules

    sch = schedules.edm()
    sampler = samplers.edm(sch, steps)
    den = toy.GaussianMixture(*make_gmm()).denoiser(sch)
    noise = jnp.asarray(np.random.default_rng(1).normal(size=(batch, 2)).astype(np.float32))
    key = jax.random.key(0)
    term = {"none": None, "particle": guidance.particle(0.5)}[guidance_name]
    prepared = sampling._prepared(sampler, den, noise, key=key, cond=None, guidance=term,
                                  trace=False, guidance_state=None, mesh=None,
                                  groups=None)  # fmt: skip

    def whole():
        return jaxdiv.sample(sampler, den, noise, key=key, guidance=term).x0.block_until_ready()

    def program():
        return sampling._run(*prepared)[0].block_until_ready()

    diff = float(jnp.abs(whole() - program()).max())
    timed = interleaved({"sample": whole, "program": program}, rounds)
    med = {name: t["median_s"] for name, t in timed.items()}
    ratios = [a / b for a, b in zip(timed["sample"]["runs_s"], timed["program"]["runs_s"])]
    return {
        "batch": batch, "steps": steps, "guidance": guidance_name, "rounds": rounds,
        "times": timed, "max_abs_diff": diff,
        "overhead_ms": 1e3 * (med["sample"] - med["program"]),
        "sample_over_program": statistics.median(ratios),
        "per_round_sample_over_program": round_ratio_range(timed, "sample", "program"),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run :func:`measure` per case, write and return the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[4, 4096])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--out", default="results/benchmarks/sample_overhead.json")
    args = parser.parse_args(argv)
    if min(args.rounds, args.steps, *args.batches) < 1:
        parser.error("--rounds, --steps and --batches must be >= 1")
    from benchmarks.timing import environment
    from experiments.common import write_json

    rows = [measure(b, args.steps, g, args.rounds) for b in args.batches for g in CASES
            if g == "none" or b <= PARTICLE_MAX_BATCH]  # fmt: skip
    result = {"meta": environment(), "rows": rows}
    for r in rows:
        lo, hi = r["per_round_sample_over_program"]
        print(f"B={r['batch']:5d} guidance={r['guidance']:8s} sample "
              f"{1e3 * r['times']['sample']['median_s']:8.3f} ms  program "
              f"{1e3 * r['times']['program']['median_s']:8.3f} ms  overhead "
              f"{r['overhead_ms']:6.3f} ms  ratio {r['sample_over_program']:.2f} "
              f"[{lo:.2f}-{hi:.2f}]")  # fmt: skip
    write_json(args.out, result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
