"""Independent coupled batches in one program: ``jaxdiv.sample(..., groups=G)`` against
the ways to get the same samples without it.

For each workload, ``G`` groups of ``--per-group`` samples, ``--steps`` DDIM steps:

  * ``groups``: one call, ``sample(..., groups=G)``;
  * ``user_vmap``: one jitted ``jax.vmap`` of ``sample`` over the groups, written by hand
    (no group axis name: a ``lax.cond`` on the samples becomes a select that runs both
    branches in every group);
  * ``loop``: ``G`` calls of ``sample``, one per group (one compiled program);
  * ``one_batch``: all ``G x per_group`` samples as one batch: for a coupled method
    *other* samples (the groups act on each other), timed as the cost of one plain call of
    that size.

Workloads: on the toy (``x0_hat = x / (1 + t^2)``, the exact denoiser of N(0, I) data in
``--dim`` dimensions, so the guidance term is most of the cost) ``spell_reference``
(SPELL intra-batch and against ``--shields`` reference points, whose exact search skips
the blocks no query comes near), ``spell_sweep`` (the same with a radius per group, 0.5 to
1.5: ``guidance.per_group``, the reference index shared; by hand, the radii are vmapped
with the rows and the index compiled in, as a sweep is written without ``per_group``;
``one_batch`` runs the first radius) and ``particle`` (particle guidance: no branch to skip);
``sd_cfg``: a random Stable Diffusion pipeline (``--sd-config``, default ``sd21-small``,
128 px) with CFG 7.5 alone, one prompt per group: CFG acts per sample, so all four give the
same samples and ``groups`` against ``one_batch`` is the cost of the groups' ``vmap``
around the UNet. The implementations alternate A B A B over ``--rounds`` rounds after one
warm-up each (:func:`benchmarks.timing.interleaved`); the JSON records median [min-max],
per-round ratios to ``groups``, the largest difference of the others from ``groups``, the
versions, threads, CPU and date.

Run:
    JAX_PLATFORMS=cpu python -m benchmarks.groups --rounds 5

Writes ``results/benchmarks/groups.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import environment, interleaved, round_ratio_range

WORKLOADS = ("spell_reference", "spell_sweep", "particle", "sd_cfg")
IMPLEMENTATIONS = ("groups", "user_vmap", "loop", "one_batch")


def _toy(workload: str, groups: int, per_group: int, dim: int, shields: int, steps: int,
         seed: int):  # fmt: skip
    from jaxdiv import guidance, samplers, schedules
    from jaxdiv.guidance.spell import reference_index

    if workload == "particle":
        term = guidance.particle(1.0)
    else:
        ref = jax.random.normal(jax.random.key(seed + 3), (shields, dim)) * 3.0
        index = reference_index(ref)  # one index: every group's term shares it
        term = guidance.spell(1.0, reference=index, intra_batch=True)
        if workload == "spell_sweep":  # a radius per group, 0.5 .. 1.5
            term = guidance.per_group([guidance.spell(r, reference=index, intra_batch=True)
                                       for r in np.linspace(0.5, 1.5, groups)])  # fmt: skip
    noise = jax.random.normal(jax.random.key(seed), (groups * per_group, dim))
    den = lambda x, t, c: x / (1 + t**2)  # noqa: E731
    return samplers.ddim(schedules.edm(), steps), den, noise, None, term


def _sd(config: str, groups: int, per_group: int, steps: int, seed: int, folder: str):
    """A random SD pipeline of ``benchmarks.sd_generate.CONFIGS[config]``, one prompt per
    group, CFG 7.5 alone: per sample, so every implementation gives the same samples and
    the timings differ only by how the batch is run."""
    from benchmarks.sd_generate import CONFIGS
    from jaxdiv import guidance
    from jaxdiv.pipelines import stable_diffusion as sd
    from jaxdiv.testing import example_pipeline, save_random_pipeline

    if config == "tiny" and seed == 0:  # the same random pipeline, already built and loaded
        pipe = example_pipeline()
    else:
        save_random_pipeline(folder, seed=seed, **CONFIGS[config])
        pipe = sd.load(folder)
    prompts = [f"prompt {j}" for j in range(groups)]
    cond = pipe.encode_prompt(pipe.tokenize([p for p in prompts for _ in range(per_group)]))
    noise = jax.random.normal(jax.random.key(seed), pipe.noise_shape(groups * per_group))
    return pipe.ddim(steps), pipe.denoiser, noise, cond, guidance.cfg(7.5, pipe.null_cond)


def measure(workload: str, *, groups: int, per_group: int, dim: int, shields: int, steps: int,
            rounds: int, sd_config: str = "sd21-small", seed: int = 0) -> dict:  # fmt: skip
    """Time the four implementations of one workload, interleaved; check they agree."""
    import tempfile

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.pytrees import combine, partition

    with tempfile.TemporaryDirectory() as folder:
        if workload == "sd_cfg":
            sampler, den, noise, cond, term = _sd(sd_config, groups, per_group, steps, seed,
                                                  folder)  # fmt: skip
        else:
            sampler, den, noise, cond, term = _toy(workload, groups, per_group, dim, shields,
                                                   steps, seed)  # fmt: skip
    key = jax.random.key(seed + 1)

    def split(a):
        return a.reshape((groups, per_group) + a.shape[1:])

    parts, cond_parts = split(noise), jax.tree.map(split, cond)
    # group j's guidance: its own with per_group (a sweep), else the one term
    own = list(term.chains) if isinstance(term, guidance.PerGroup) else [term] * groups
    # by hand, as a sweep is written without per_group: the values that differ between
    # the groups (a sweep's radii) vmapped with the rows, the rest (the reference index,
    # a shared term) compiled in
    leaves = [partition(g)[0] for g in own]
    spec = partition(own[0])[1]
    varies = [d is not None and any(x[j] is not d for x in leaves)
              for j, d in enumerate(leaves[0])]  # fmt: skip
    values = [jnp.stack([x[j] for x in leaves]) if v else None for j, v in enumerate(varies)]

    def by_hand_one(vals, z, c):
        term_j = combine([v if m else d for v, m, d in zip(vals, varies, leaves[0])], spec)
        return jaxdiv.sample(sampler, den, z, key=key, cond=c, guidance=term_j).x0

    by_hand = jax.jit(jax.vmap(by_hand_one))

    def call(z, c, g=term, **kw):
        return jaxdiv.sample(sampler, den, z, key=key, cond=c, guidance=g, **kw).x0

    def group(a, j):
        return None if a is None else jax.tree.map(lambda leaf: leaf[j], a)

    fns = {
        "groups": lambda: call(noise, cond, groups=groups),
        "user_vmap": lambda: by_hand(values, parts, cond_parts).reshape(noise.shape),
        "loop": lambda: jnp.concatenate([call(parts[j], group(cond_parts, j), own[j])
                                         for j in range(groups)]),  # fmt: skip
        "one_batch": lambda: call(noise, cond, own[0]),
    }
    outs = {name: np.asarray(jax.block_until_ready(fn())) for name, fn in fns.items()}
    if not all(np.isfinite(o).all() for o in outs.values()):
        raise RuntimeError(f"{workload}: non-finite samples")
    scale = float(np.abs(outs["loop"]).max())
    timed = interleaved({n: (lambda f=f: jax.block_until_ready(f())) for n, f in fns.items()},
                        rounds, warmup=False)  # fmt: skip (the checks above warmed up)
    row = dict(workload=workload, groups=groups, per_group=per_group,
               sample_shape=list(noise.shape[1:]),
               num_shields=shields if workload.startswith("spell") else 0, steps=steps,
               rounds=rounds)  # fmt: skip
    if workload == "sd_cfg":
        row["config"] = sd_config
    for name in IMPLEMENTATIONS:
        t = timed[name]
        row[f"{name}_s"] = t["median_s"]
        row[f"{name}_min_max_s"] = [t["min_s"], t["max_s"]]
        row[f"{name}_runs_s"] = t["runs_s"]
        if name != "groups":
            row[f"{name}_over_groups"] = t["median_s"] / timed["groups"]["median_s"]
            row[f"{name}_over_groups_min_max"] = round_ratio_range(timed, name, "groups")
    for name in ("user_vmap", "loop"):  # the same samples as groups
        row[f"{name}_max_diff_of_scale"] = float(np.abs(outs[name] - outs["groups"]).max()
                                                 / scale)  # fmt: skip
    row["one_batch_differs_of_scale"] = float(np.abs(outs["one_batch"] - outs["groups"]).max()
                                              / scale)  # fmt: skip
    return row


def _fmt(row: dict) -> str:
    def ms(name):
        lo, hi = row[f"{name}_min_max_s"]
        return f"{name} {row[f'{name}_s'] * 1e3:.0f} [{lo * 1e3:.0f}-{hi * 1e3:.0f}] ms"

    ratios = "  ".join(
        f"{n}/groups {row[f'{n}_over_groups']:.2f} "
        f"[{row[f'{n}_over_groups_min_max'][0]:.2f}-{row[f'{n}_over_groups_min_max'][1]:.2f}]"
        for n in IMPLEMENTATIONS[1:]
    )  # fmt: skip
    shape = "x".join(map(str, row["sample_shape"]))
    return (f"groups {row['workload']} ({row['groups']} x {row['per_group']} of {shape}, "
            f"{row['num_shields']} shields, {row['steps']} steps): "
            + ", ".join(ms(n) for n in IMPLEMENTATIONS) + f"\n    {ratios}")  # fmt: skip


def _positive(name: str, value: int) -> int:
    if value < 1:
        raise SystemExit(f"{name} must be >= 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.groups",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help=f"comma-separated, from {', '.join(WORKLOADS)}")  # fmt: skip
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--per-group", type=int, default=4)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--shields", type=int, default=200_000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sd-config", default="sd21-small",
                        help="sd_cfg's random pipeline (benchmarks.sd_generate.CONFIGS)")
    parser.add_argument("--out", default="results/benchmarks/groups.json")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    unknown = sorted(set(workloads) - set(WORKLOADS))
    if unknown or not workloads:
        raise SystemExit(f"--workloads: unknown {unknown}; choose from {', '.join(WORKLOADS)}")
    for name in ("groups", "per_group", "dim", "shields", "steps", "rounds"):
        _positive(f"--{name.replace('_', '-')}", getattr(args, name))
    if args.per_group < 3 and "particle" in workloads:
        raise SystemExit("--per-group must be >= 3 for particle (its median bandwidth)")
    rows = []
    for w in workloads:
        row = measure(w, groups=args.groups, per_group=args.per_group, dim=args.dim,
                      shields=args.shields, steps=args.steps, rounds=args.rounds,
                      sd_config=args.sd_config)  # fmt: skip
        print(_fmt(row), flush=True)
        rows.append(row)
    result = {"command": "python -m benchmarks.groups " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),  # fmt: skip
              **environment(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1, default=float))
    tmp.replace(out)
    assert all(math.isfinite(r["groups_s"]) for r in rows)
    return result


if __name__ == "__main__":
    main()
