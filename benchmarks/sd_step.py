"""Stable Diffusion UNet denoiser step: jaxdiv (jitted Flax nnx) vs diffusers (PyTorch eager).

Both models hold the same random weights (the PyTorch model's state dict converted with
:func:`jaxdiv.models.conversion.convert_unet_state_dict`) and run in the same process on the
same inputs; the script also reports their max abs output difference as a sanity check.

Configs:
  * ``tiny``: the SD1-like UNet of the parity tests (:data:`jaxdiv.testing.TINY_UNET_SD1`,
    block_out_channels (32, 64)).
  * ``sd21``: SD 2.1 sized (block_out_channels (320, 640, 1280, 1280), cross-attention
    1024, heads (5, 10, 20, 20), linear projections, upcast attention; ~866M parameters).

Run (CPU, all cores):
    JAX_PLATFORMS=cpu python -m benchmarks.sd_step --configs tiny,sd21 --latent 32 --batch 2

Run (CPU, one thread each; steadier on a loaded machine, where PyTorch's OpenMP threads
spin on oversubscribed cores):
    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false \
    intra_op_parallelism_threads=1" JAX_PLATFORMS=cpu python -m benchmarks.sd_step \
    --out results/sd_step_1thread.json

Writes ``results/sd_step.json`` (one row per measurement). The rows are produced by
:func:`collect_rows`; the full-generation timing (50-step DDIM + CFG through
``jaxdiv.pipelines``) is meant to be added there as further rows.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import environment, interleaved
from jaxdiv.models.checkpoint import assign_params
from jaxdiv.models.conversion import convert_unet_state_dict
from jaxdiv.models.unet import UNet2DConditionModel, UNetConfig
from jaxdiv.testing import TINY_UNET_SD1

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": TINY_UNET_SD1,
    "sd21": dict(
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=(
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=(
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ),
        cross_attention_dim=1024,
        attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True,
        upcast_attention=True,
    ),
}

TEXT_TOKENS = 77


def build_pair(config: dict[str, Any], seed: int = 0):
    """A random diffusers UNet and the jaxdiv UNet holding the same weights (fp32)."""
    import torch
    from diffusers import UNet2DConditionModel as TorchUNet

    torch.manual_seed(seed)
    torch_model = TorchUNet(**config).eval()
    sd = {k: v.detach().numpy() for k, v in torch_model.state_dict().items()}
    diffusers_config = dict(torch_model.config)
    # eval_shape: no random init of the Flax copy; assign_params fills in the weights.
    model = nnx.eval_shape(
        lambda: UNet2DConditionModel(UNetConfig.from_dict(diffusers_config), rngs=nnx.Rngs(0))
    )
    assign_params(model, convert_unet_state_dict(sd, diffusers_config), component="benchmark")
    return torch_model, model


def measure_denoiser_step(
    name: str, *, latent: int, batch: int, repeats: int, seed: int = 0
) -> dict[str, Any]:
    """Time one UNet forward (eps prediction) in diffusers (eager) and jaxdiv (jitted).

    Args:
        name: key of :data:`CONFIGS`.
        latent: latent height = width.
        batch: batch size (2 = one CFG pair).
        repeats: interleaved rounds after one warm-up call each (median [min-max]).
        seed: weight and input seed.

    Returns:
        A result row (times in seconds; ``ratio`` = torch / jax, > 1 means jaxdiv faster).
    """
    import torch

    config = CONFIGS[name]
    t0 = time.perf_counter()
    torch_model, model = build_pair(config, seed)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 4, latent, latent)).astype(np.float32)
    t = np.full((batch,), 500, np.int64)
    ctx = rng.standard_normal((batch, TEXT_TOKENS, config["cross_attention_dim"])).astype(
        np.float32
    )
    n_params = sum(p.numel() for p in torch_model.parameters())

    graphdef, state = nnx.split(model)

    @jax.jit
    def step(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    xj, tj, cj = jnp.asarray(x), jnp.asarray(t), jnp.asarray(ctx)
    t0 = time.perf_counter()
    out_jax = step(state, xj, tj, cj).block_until_ready()
    compile_s = time.perf_counter() - t0

    xt, tt, ct = torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)
    with torch.no_grad():
        out_torch = torch_model(xt, tt, ct).sample.numpy()
        # A B A B: both implementations see the same machine load
        timed = interleaved({
            "jax": lambda: step(state, xj, tj, cj).block_until_ready(),
            "torch": lambda: torch_model(xt, tt, ct),
        }, repeats)  # fmt: skip
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]

    return dict(
        benchmark="unet_step",
        config=name,
        params=int(n_params),
        latent=latent,
        batch=batch,
        text_tokens=TEXT_TOKENS,
        dtype="float32",
        repeats=repeats,
        build_s=build_s,
        jax_compile_s=compile_s,
        jax_s=jax_s,
        torch_s=torch_s,
        jax_min_max_s=[timed["jax"]["min_s"], timed["jax"]["max_s"]],
        torch_min_max_s=[timed["torch"]["min_s"], timed["torch"]["max_s"]],
        jax_all_s=timed["jax"]["runs_s"],
        torch_all_s=timed["torch"]["runs_s"],
        timing="interleaved A B A B, median [min-max]",
        ratio_torch_over_jax=torch_s / jax_s,
        max_abs_diff=float(np.abs(np.asarray(out_jax) - out_torch).max()),
    )


def collect_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All measurements of this benchmark, one dict per row (extend here for new rows)."""
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise ValueError(f"--configs entries must be in {sorted(CONFIGS)}, got {name!r}")
        row = measure_denoiser_step(
            name, latent=args.latent, batch=args.batch, repeats=args.repeats
        )
        print(
            f"{name:>5}  {row['params'] / 1e6:7.1f}M params  latent {args.latent}x{args.latent} "
            f"batch {args.batch}:  jaxdiv {row['jax_s'] * 1e3:9.1f} ms  "
            f"(compile {row['jax_compile_s']:.1f} s)  diffusers {row['torch_s'] * 1e3:9.1f} ms  "
            f"ratio torch/jax {row['ratio_torch_over_jax']:.2f}  "
            f"max|diff| {row['max_abs_diff']:.1e}",
            flush=True,
        )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run :func:`collect_rows`, write the JSON."""
    import diffusers
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,sd21", help="comma-separated CONFIGS keys")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="results/sd_step.json")
    args = parser.parse_args(argv)
    if args.latent <= 0 or args.batch <= 0 or args.repeats <= 0:
        raise ValueError("--latent, --batch and --repeats must be positive")
    rows = collect_rows(args)
    meta = environment() | dict(
        command="python -m benchmarks.sd_step "
        + " ".join(f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        torch_threads=torch.get_num_threads(),
        machine=platform.machine(),
        processor=platform.processor(),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
