"""Overhead of contextual-space repulsion per sampling step: one guided MMDiT denoiser call
with ``guidance.contextual`` active vs the same call without it.

The paper reports +20-30 % wall time (Flux-dev, 10.3 -> 12.8 s per image). Here both
sides are the SD3 pipeline's own denoiser (``stable_diffusion_3._mmdit_fn``) inside one
``jaxdiv.sample`` step with CFG (the model sees ``[cond; uncond]``, ``2 B`` samples), on
a random MMDiT (:func:`jaxdiv.testing.random_mmdit`) of the chosen layout:

  * ``tiny``: :data:`jaxdiv.testing.TINY_MMDIT` with 16 latent channels;
  * ``sd3-medium``: the released SD3-Medium transformer shape
    (:data:`benchmarks.sd3_step.SD3_MEDIUM`: 1536 wide, 77 CLIP + ``--t5-tokens`` T5 text
    tokens), depth cut to ``--layers`` blocks to fit a CPU machine's memory and time. Both
    the model's cost and the repulsion's cost grow linearly with the number of joint
    blocks, so the ratio is nearly depth-independent.

"on" repels after every joint block with ``--inner-steps`` (the paper's M = 100) ascent
steps at ``--eta``; "off" is the unguided call (no model term). The two alternate A B A B
over ``--rounds`` rounds after one warm-up each (:func:`benchmarks.timing.interleaved`).

Run (CPU):
    JAX_PLATFORMS=cpu python -m benchmarks.contextual_overhead --config sd3-medium \
        --layers 2 --latent 32 --batch 2 --rounds 3

Writes ``results/benchmarks/contextual_overhead_<config>.json`` (``--out``) with the
times (median [min-max]), ``overhead = on / off - 1`` from the medians and the per-round
range, the versions, threads and date.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.sd3_step import CLIP_TOKENS, SD3_MEDIUM, peak_rss_gb
from benchmarks.timing import interleaved, version

CONFIGS: dict[str, dict[str, Any]] = {"sd3-medium": SD3_MEDIUM}
DEFAULT_LATENT = {"tiny": 16, "sd3-medium": 32}


def _config(name: str, layers: int | None) -> dict[str, Any]:
    from jaxdiv.testing import TINY_MMDIT

    config = dict(TINY_MMDIT, in_channels=16, out_channels=16) if name == "tiny" else dict(
        CONFIGS[name])  # fmt: skip
    if layers is not None:
        config["num_layers"] = layers
    return config


def measure(name: str, *, layers: int | None, latent: int, t5_tokens: int, batch: int,
            inner_steps: int, eta: float, rounds: int, seed: int = 0) -> dict:  # fmt: skip
    """Time one CFG-guided flow step with and without contextual repulsion, interleaved."""
    import jaxdiv
    from jaxdiv import guidance, samplers, schedules
    from jaxdiv.pipelines.stable_diffusion_3 import SD3Cond, _mmdit_fn
    from jaxdiv.predictions import as_denoiser
    from jaxdiv.testing import random_mmdit

    config = _config(name, layers)
    model = random_mmdit(config, seed)
    schedule = schedules.flow(shift=3.0)
    den = as_denoiser(_mmdit_fn(model, 1000), schedule, "flow")
    del model
    rng = np.random.default_rng(seed)
    seq = CLIP_TOKENS + t5_tokens
    cond = SD3Cond(
        jnp.asarray(rng.standard_normal((batch, seq, config["joint_attention_dim"])), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, config["pooled_projection_dim"])), jnp.float32),
    )
    null = jax.tree.map(lambda a: jnp.zeros_like(a[:1]), cond)
    noise = jnp.asarray(rng.standard_normal((batch, config["in_channels"], latent, latent)),
                        jnp.float32)  # fmt: skip
    sampler = samplers.flow_euler(schedule, 1)  # one step: one guided denoiser call
    cfg = guidance.cfg(4.0, null_cond=null)
    terms = {"off": cfg, "on": guidance.chain(guidance.contextual(eta, inner_steps), cfg)}

    def step(den, g):  # jaxdiv.sample compiles once per structure and reuses it
        return jaxdiv.sample(sampler, den, noise, key=jax.random.key(seed), cond=cond,
                             guidance=g)  # fmt: skip

    outs = {k: step(den, g) for k, g in terms.items()}
    change = float(jnp.linalg.norm(outs["on"].x0 - outs["off"].x0)
                   / jnp.linalg.norm(outs["off"].x0))  # fmt: skip
    if not all(bool(jnp.all(jnp.isfinite(o.x0))) for o in outs.values()):
        raise RuntimeError(f"{name}: non-finite outputs")
    timed = interleaved(
        {k: (lambda g=g: step(den, g).x0.block_until_ready()) for k, g in terms.items()}, rounds
    )
    on, off = timed["on"]["median_s"], timed["off"]["median_s"]
    per_round = [a / b - 1 for a, b in zip(timed["on"]["runs_s"], timed["off"]["runs_s"])]
    n_params = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(den.model.params))
    return dict(
        config=name,
        num_layers=config["num_layers"],
        params=n_params,
        latent_shape=list(noise.shape),
        model_batch=2 * batch,
        image_tokens=(latent // config["patch_size"]) ** 2,
        text_tokens=seq,
        text_stream_per_sample=seq * config.get("caption_projection_dim", 0),
        inner_steps=inner_steps,
        eta=eta,
        rounds=rounds,
        off_s=off,
        on_s=on,
        off_min_max_s=[timed["off"]["min_s"], timed["off"]["max_s"]],
        on_min_max_s=[timed["on"]["min_s"], timed["on"]["max_s"]],
        off_runs_s=timed["off"]["runs_s"],
        on_runs_s=timed["on"]["runs_s"],
        overhead=on / off - 1,
        overhead_min_max=[min(per_round), max(per_round)],
        relative_change_of_x0=change,
        timing="interleaved A B A B after one warm-up each, median [min-max]",
    )


def _fmt(row: dict[str, Any]) -> str:
    def ms(key):
        lo, hi = row[f"{key}_min_max_s"]
        return f"{row[f'{key}_s'] * 1e3:.1f} [{lo * 1e3:.1f}-{hi * 1e3:.1f}] ms"

    lo, hi = row["overhead_min_max"]
    return (
        f"contextual_overhead {row['config']} ({row['num_layers']} layers, model batch "
        f"{row['model_batch']}, {row['image_tokens']} image + {row['text_tokens']} text tokens, "
        f"M={row['inner_steps']}): off {ms('off')}  on {ms('on')}  overhead "
        f"{100 * row['overhead']:+.1f}% [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.contextual_overhead",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--config", choices=["tiny", *sorted(CONFIGS)], default="tiny")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--latent", type=int, default=None)
    parser.add_argument("--t5-tokens", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2, help="samples per CFG branch")
    parser.add_argument("--inner-steps", type=int, default=100, help="M (the paper: 100)")
    parser.add_argument("--eta", type=float, default=1e3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    latent = DEFAULT_LATENT[args.config] if args.latent is None else args.latent
    for flag, value, low in (("--layers", args.layers, 1), ("--latent", latent, 2),
                             ("--t5-tokens", args.t5_tokens, 0), ("--batch", args.batch, 2),
                             ("--inner-steps", args.inner_steps, 1),
                             ("--rounds", args.rounds, 1)):  # fmt: skip
        if value is not None and value < low:
            parser.error(f"{flag} must be >= {low}, got {value}")
    if not np.isfinite(args.eta) or args.eta <= 0:
        parser.error(f"--eta must be a finite number > 0, got {args.eta}")
    patch = _config(args.config, None)["patch_size"]
    if latent % patch:
        parser.error(f"--latent must be a multiple of the patch size {patch}, got {latent}")
    row = measure(args.config, layers=args.layers, latent=latent, t5_tokens=args.t5_tokens,
                  batch=args.batch, inner_steps=args.inner_steps, eta=args.eta,
                  rounds=args.rounds, seed=args.seed)  # fmt: skip
    print(_fmt(row), flush=True)
    result = dict(
        benchmark="contextual-space repulsion: one CFG flow step with / without, fp32",
        command=" ".join(["python -m benchmarks.contextual_overhead"]
                         + list(sys.argv[1:] if argv is None else argv)),  # fmt: skip
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        paper="+20-30% (Flux-dev 10.3 -> 12.8 s per image, Dahary et al. 2026)",
        versions=dict(jax=jax.__version__, jaxlib=version("jaxlib"), flax=version("flax"),
                      numpy=np.__version__, python=platform.python_version()),  # fmt: skip
        threads=dict(
            env={k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")},
            cpu_affinity=sorted(os.sched_getaffinity(0)),
            cpu_count=os.cpu_count(),
        ),
        jax_devices=[str(d) for d in jax.devices()],
        load_average=list(os.getloadavg()),
        peak_rss_gb=peak_rss_gb(),
        rows=[row],
    )
    out = Path(args.out or f"results/benchmarks/contextual_overhead_{args.config}.json")
    from experiments.common import write_json

    write_json(out, result)
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
