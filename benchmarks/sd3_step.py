"""SD3 MMDiT velocity step: jaxdiv (jitted Flax nnx) vs diffusers ``SD3Transformer2DModel``.

One forward of the transformer on a CFG batch of 2 (the same latent twice, two random text
sequences of 77 CLIP + ``--t5-tokens`` T5 tokens, two pooled vectors), float32 on CPU.
A random diffusers model is built (``torch.manual_seed``; norm affines and biases random
too, :func:`jaxdiv.testing.randomize_norms_and_biases`), saved with ``save_pretrained``
(safetensors) to a temp folder and loaded back with :func:`jaxdiv.models.mmdit.load_mmdit`,
so both sides hold the SAME weights and go through the real loader. The outputs are
compared (max abs difference recorded) before timing; then the two implementations
alternate A B A B over ``--rounds`` rounds (:func:`benchmarks.timing.interleaved`, after
one warm-up call each). jaxdiv runs one ``jax.jit`` program with the weights as arguments
(compile time reported separately); diffusers runs eager under ``torch.no_grad`` in eval.

Configs (``--config``):
  * ``tiny``: :data:`jaxdiv.testing.TINY_MMDIT` (the parity tests' SD3-Medium layout,
    3 layers, 16 wide; default latent 16, its position table allows at most 16).
  * ``sd3-medium``: the released SD3-Medium transformer shape (24 layers, 24 heads x 64 =
    1536 wide, joint_attention_dim 4096, caption_projection_dim 1536, pooled 2048,
    pos_embed_max_size 192, patch 2, 16 channels; 2.03B parameters plus a 192 x 192 x 1536
    position-table buffer, 8.3 GB per framework in fp32). ``--layers K`` keeps the first K
    blocks (the last one ``context_pre_only``, as in the release): each further block has
    85M parameters (0.34 GB fp32 per framework); the last block has 54M and the rest of the
    model 19M parameters + the 57M-entry table. Peak RSS is about 0.7 GB (the libraries)
    plus 2.8 x the fp32 size of one copy (the torch model, its saved file read back, the
    jaxdiv copy): measured 3.1 GB with ``--layers 2`` (159M parameters); ``--layers 4``
    needs ~5 GB, the full 24 layers ~24 GB -- more than a 24 GiB machine shared with other
    jobs has, so there measure a cut depth (time per step scales ~linearly in layers).

Latents are NCHW ``(2, C, --latent, --latent)``; ``--latent 32`` is a 256 px image (256
image tokens), SD3's native 1024 px is ``--latent 128``.

Run (CPU, one core for both libraries: steadier on a loaded machine, where PyTorch's
OpenMP threads spin on oversubscribed cores; ``taskset`` pins the process, since XLA:CPU
keeps using every core under the ``XLA_FLAGS`` thread settings):
    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu taskset -c 0 python -m benchmarks.sd3_step \
    --config sd3-medium --layers 2 --latent 32 --rounds 3

``--generate-steps 28`` adds a second row: a full generation (tokenization, prompt
encoding with CLIP-L / CLIP-G / T5, 28 flow-Euler steps with CFG 7.0, VAE decode) of a tiny
random SD3 pipeline (:func:`jaxdiv.testing.save_random_sd3_pipeline`), jaxdiv's
:mod:`jaxdiv.pipelines.stable_diffusion_3` as one jitted program vs diffusers'
``StableDiffusion3Pipeline``, same initial latents, images compared.

Writes ``results/benchmarks/sd3_step_<config>.json`` (``--out`` to change) and prints a
one-line summary per row. ``ratio_torch_over_jax`` = diffusers time / jaxdiv time (> 1: jaxdiv
faster), from the medians; ``ratio_min_max`` is the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import interleaved, round_ratio_range, version
from jaxdiv.models.mmdit import load_mmdit
from jaxdiv.testing import TINY_MMDIT, randomize_norms_and_biases

# diffusers SD3Transformer2DModel kwargs of stabilityai/stable-diffusion-3-medium-diffusers
SD3_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    pos_embed_max_size=192,
)
CONFIGS: dict[str, dict[str, Any]] = {"tiny": TINY_MMDIT, "sd3-medium": SD3_MEDIUM}
DEFAULT_LATENT = {"tiny": 16, "sd3-medium": 32}
CLIP_TOKENS = 77
BATCH = 2  # one CFG pair
TIMESTEP = 500.0  # SD3 timesteps are 1000 * sigma


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_pair(config: dict[str, Any], folder: str | os.PathLike, seed: int = 0):
    """A random diffusers MMDiT (eval) and the jaxdiv one loaded from its saved folder."""
    import torch
    from diffusers import SD3Transformer2DModel as TorchMMDiT

    torch.manual_seed(seed)
    torch_model = randomize_norms_and_biases(TorchMMDiT(**config), seed)
    torch_model.save_pretrained(folder, safe_serialization=True)
    return torch_model, load_mmdit(folder)


def make_inputs(config: dict[str, Any], latent: int, t5_tokens: int, seed: int = 0):
    """CFG-pair inputs: one latent twice, two text sequences and pooled vectors (numpy)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, config["in_channels"], latent, latent)).astype(np.float32)
    x = np.repeat(x, BATCH, axis=0)
    t = np.full((BATCH,), TIMESTEP, np.float32)
    seq = CLIP_TOKENS + t5_tokens
    ctx = rng.standard_normal((BATCH, seq, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((BATCH, config["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


def measure_step(
    name: str, *, layers: int | None, latent: int, t5_tokens: int, rounds: int, seed: int = 0
) -> dict[str, Any]:
    """Check agreement, then time one MMDiT forward in jaxdiv and diffusers, interleaved.

    Args:
        name: key of :data:`CONFIGS`.
        layers: number of transformer blocks (``None``: the config's).
        latent: latent height = width.
        t5_tokens: T5 tokens appended to the 77 CLIP tokens.
        rounds: interleaved rounds after one warm-up call each.
        seed: weight and input seed.

    Returns:
        A result row (times in seconds).
    """
    import torch

    config = dict(CONFIGS[name])
    if layers is not None:
        config["num_layers"] = layers
    rss = {"start_gb": peak_rss_gb()}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        torch_model, model = build_pair(config, folder, seed)
    build_s = time.perf_counter() - t0
    rss["after_build_gb"] = peak_rss_gb()
    n_params = sum(p.numel() for p in torch_model.parameters())
    n_buffers = sum(b.numel() for b in torch_model.buffers())  # the position table

    x, t, ctx, pooled = make_inputs(config, latent, t5_tokens, seed)
    graphdef, state = nnx.split(model)
    del model

    @jax.jit
    def step(state, x, t, ctx, pooled):
        return nnx.merge(graphdef, state)(x, t, ctx, pooled)

    args_j = tuple(jnp.asarray(a) for a in (x, t, ctx, pooled))
    t0 = time.perf_counter()
    compiled = step.lower(state, *args_j).compile()
    compile_s = time.perf_counter() - t0

    def run_jax():
        return compiled(state, *args_j).block_until_ready()

    xt, tt, ct, pt = (torch.from_numpy(a) for a in (x, t, ctx, pooled))

    def run_torch():
        return torch_model(xt, encoder_hidden_states=ct, pooled_projections=pt, timestep=tt).sample

    with torch.no_grad():
        ours = np.asarray(run_jax())
        ref = run_torch().numpy()
        diff = float(np.abs(ours - ref).max())
        scale = float(np.abs(ref).max())
        if not np.isfinite(diff):
            raise RuntimeError(f"{name}: non-finite outputs (max|diff| {diff})")
        timed = interleaved({"jax": run_jax, "torch": run_torch}, rounds)  # A B A B
    rss["end_gb"] = peak_rss_gb()
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]
    return dict(
        benchmark="mmdit_step",
        config=name,
        model_config=config,
        num_layers=config["num_layers"],
        full_num_layers=CONFIGS[name]["num_layers"],
        params=int(n_params),
        buffers=int(n_buffers),
        fp32_gb_per_copy=(n_params + n_buffers) * 4 / 1e9,
        latent_shape=list(x.shape),
        image_px=latent * 8,
        image_tokens=(latent // config["patch_size"]) ** 2,
        text_tokens=CLIP_TOKENS + t5_tokens,
        t5_tokens=t5_tokens,
        batch=BATCH,
        timestep=TIMESTEP,
        dtype="float32",
        rounds=rounds,
        build_s=build_s,
        jax_compile_s=compile_s,
        jax_s=jax_s,
        torch_s=torch_s,
        jax_min_max_s=[timed["jax"]["min_s"], timed["jax"]["max_s"]],
        torch_min_max_s=[timed["torch"]["min_s"], timed["torch"]["max_s"]],
        jax_runs_s=timed["jax"]["runs_s"],
        torch_runs_s=timed["torch"]["runs_s"],
        timing="interleaved A B A B after one warm-up each, median [min-max]",
        ratio_torch_over_jax=torch_s / jax_s,
        ratio_min_max=round_ratio_range(timed, "torch", "jax"),
        max_abs_diff=diff,
        max_abs_output=scale,
        rel_max_abs_diff=diff / scale if scale else float("nan"),
        peak_rss_gb=rss,
    )


GEN_PROMPTS = ["a photo of a cat", "a red dog"]
GEN_CFG = 7.0


def generation_available() -> bool:
    """Whether the SD3 pipeline (``load``) and its random test folder exist in this tree."""
    try:
        from jaxdiv import testing
        from jaxdiv.pipelines import stable_diffusion_3
    except ImportError:
        return False
    return hasattr(stable_diffusion_3, "load") and hasattr(testing, "save_random_sd3_pipeline")


def measure_generation(*, steps: int, rounds: int, seed: int = 0) -> dict[str, Any]:
    """Full tiny SD3 generation, jaxdiv (one jitted program) vs ``StableDiffusion3Pipeline``.

    A random tiny pipeline (:func:`jaxdiv.testing.save_random_sd3_pipeline`: SD3-Medium
    layout, CLIP-L, CLIP-G, T5) is saved to a temp folder and loaded by both. Both run
    tokenization, prompt encoding (with the empty negative prompt), ``steps`` flow-Euler
    steps (shift 3) with CFG 7.0 on a doubled batch, and the VAE decode, from the same
    initial latents; jaxdiv as one ``jax.jit`` program with the weights as arguments.
    """
    import diffusers
    import torch
    import transformers
    from diffusers import StableDiffusion3Pipeline

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.pipelines import stable_diffusion_3 as sd3
    from jaxdiv.testing import save_random_sd3_pipeline

    for lib in (diffusers, transformers):  # quiet loading / saving bars
        lib.utils.logging.disable_progress_bar()
        lib.utils.logging.set_verbosity_error()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        save_random_sd3_pipeline(folder, seed=seed)
        pipe = sd3.load(folder)
        torch_pipe = StableDiffusion3Pipeline.from_pretrained(folder)  # fp32 as saved
    build_s = time.perf_counter() - t0
    torch_pipe.set_progress_bar_config(disable=True)
    shape = pipe.noise_shape(len(GEN_PROMPTS))
    noise = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    sampler = pipe.flow_euler(steps)
    term = guidance.cfg(GEN_CFG, null_cond=pipe.null_cond)
    params = (pipe.encode_prompt.params, pipe.denoiser.model.params, pipe.decode.params)

    def generate(params, tokens, noise):
        enc, net, dec = params
        cond = pipe.encode_prompt.apply(enc, tokens)
        denoiser = pipe.denoiser._replace(model=pipe.denoiser.model._replace(params=net))
        out = jaxdiv.sample(
            sampler, denoiser, noise, key=jax.random.key(seed), cond=cond, guidance=term
        )
        return pipe.decode.apply(dec, out.x0)

    def tokens():
        return jax.tree.map(jnp.asarray, pipe.tokenize(GEN_PROMPTS))

    noise_j = jnp.asarray(noise)
    t0 = time.perf_counter()
    compiled = jax.jit(generate).lower(params, tokens(), noise_j).compile()
    compile_s = time.perf_counter() - t0
    height, width = (n * pipe.vae_scale_factor for n in shape[2:])

    def run_jax():
        return compiled(params, tokens(), noise_j).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return torch_pipe(
                GEN_PROMPTS,
                num_inference_steps=steps,
                guidance_scale=GEN_CFG,
                latents=torch.from_numpy(noise),
                height=height,
                width=width,
                max_sequence_length=pipe.max_sequence_length,
                output_type="np",
            ).images

    ours = np.clip(np.asarray(run_jax()).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    diff = float(np.abs(ours - run_torch()).max())
    timed = interleaved({"jax": run_jax, "torch": run_torch}, rounds)  # A B A B
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]
    return dict(
        benchmark="generation",
        config="tiny random SD3 pipeline (jaxdiv.testing.save_random_sd3_pipeline)",
        num_layers=pipe.configs["transformer"]["num_layers"],
        params=int(sum(p.numel() for p in torch_pipe.transformer.parameters())),
        batch=len(GEN_PROMPTS),
        steps=steps,
        cfg=GEN_CFG,
        image_px=[height, width],
        latent_shape=list(shape),
        t5_tokens=pipe.max_sequence_length,
        rounds=rounds,
        build_s=build_s,
        jax_compile_s=compile_s,
        jax_s=jax_s,
        torch_s=torch_s,
        jax_min_max_s=[timed["jax"]["min_s"], timed["jax"]["max_s"]],
        torch_min_max_s=[timed["torch"]["min_s"], timed["torch"]["max_s"]],
        jax_runs_s=timed["jax"]["runs_s"],
        torch_runs_s=timed["torch"]["runs_s"],
        timing="interleaved A B A B after one warm-up each, median [min-max]; both include "
        "tokenization, prompt encoding, sampling and VAE decode",
        ratio_torch_over_jax=torch_s / jax_s,
        ratio_min_max=round_ratio_range(timed, "torch", "jax"),
        max_abs_image_diff=diff,
        peak_rss_gb={"end_gb": peak_rss_gb()},
    )


def _fmt(row: dict[str, Any]) -> str:
    def ms(key):
        lo, hi = row[f"{key}_min_max_s"]
        return f"{row[f'{key}_s'] * 1e3:.1f} [{lo * 1e3:.1f}-{hi * 1e3:.1f}] ms"

    lo, hi = row["ratio_min_max"]
    if row["benchmark"] == "generation":
        return (
            f"sd3_generate tiny ({row['steps']} steps, CFG {row['cfg']}, batch {row['batch']}, "
            f"{row['image_px'][0]}x{row['image_px'][1]} px): jaxdiv {ms('jax')} "
            f"(compile {row['jax_compile_s']:.1f} s)  diffusers {ms('torch')}  "
            f"diffusers/jaxdiv {row['ratio_torch_over_jax']:.2f}x [{lo:.2f}-{hi:.2f}]  "
            f"max|img diff| {row['max_abs_image_diff']:.1e}"
        )
    return (
        f"sd3_step {row['config']} ({row['num_layers']}/{row['full_num_layers']} layers, "
        f"{row['params'] / 1e6:.4g}M params, latent {row['latent_shape']}, "
        f"{row['text_tokens']} text tokens): jaxdiv {ms('jax')} "
        f"(compile {row['jax_compile_s']:.1f} s)  diffusers {ms('torch')}  "
        f"diffusers/jaxdiv {row['ratio_torch_over_jax']:.2f}x [{lo:.2f}-{hi:.2f}]  "
        f"max|diff| {row['max_abs_diff']:.1e}  peak RSS {row['peak_rss_gb']['end_gb']:.2f} GB"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    import diffusers
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.sd3_step", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help="transformer blocks (default: the config's; sd3-medium 24)",
    )
    parser.add_argument(
        "--latent", type=int, default=None, help=f"latent height = width (default {DEFAULT_LATENT})"
    )
    parser.add_argument(
        "--t5-tokens",
        type=int,
        default=256,
        help="T5 tokens after the 77 CLIP tokens (diffusers' default 256)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--generate-steps",
        type=int,
        default=0,
        help="also time a full tiny SD3 generation with this many flow-Euler "
        "steps (e.g. 28; 0: skip; needs jaxdiv.pipelines.stable_diffusion_3)",
    )
    parser.add_argument(
        "--out", default=None, help="JSON path (default results/benchmarks/sd3_step_<config>.json)"
    )
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    latent = DEFAULT_LATENT[args.config] if args.latent is None else args.latent
    if args.rounds < 1 or args.t5_tokens < 0 or (args.layers is not None and args.layers < 1):
        parser.error("--rounds and --layers must be >= 1, --t5-tokens >= 0")
    if args.generate_steps < 0:
        parser.error(f"--generate-steps must be >= 0, got {args.generate_steps}")
    patches = latent // config["patch_size"]
    if latent < 1 or latent % config["patch_size"] or patches > config["pos_embed_max_size"]:
        parser.error(
            f"--latent must be a positive multiple of {config['patch_size']} and at "
            f"most {config['patch_size'] * config['pos_embed_max_size']} for "
            f"{args.config}, got {latent}"
        )

    row = measure_step(
        args.config,
        layers=args.layers,
        latent=latent,
        t5_tokens=args.t5_tokens,
        rounds=args.rounds,
        seed=args.seed,
    )
    print(_fmt(row), flush=True)
    rows = [row]
    if args.generate_steps:
        if generation_available():
            rows.append(
                measure_generation(steps=args.generate_steps, rounds=args.rounds, seed=args.seed)
            )
            print(_fmt(rows[-1]), flush=True)
        else:
            print(
                "sd3_generate skipped: jaxdiv.pipelines.stable_diffusion_3.load or "
                "jaxdiv.testing.save_random_sd3_pipeline is missing",
                flush=True,
            )
    result = dict(
        benchmark="SD3 MMDiT forward step (CFG batch 2), jaxdiv jit vs diffusers eager, fp32",
        command=" ".join(
            ["python -m benchmarks.sd3_step"] + list(sys.argv[1:] if argv is None else argv)
        ),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        note=(
            "same random weights (diffusers save_pretrained -> jaxdiv load_mmdit); outputs "
            "compared before timing"
            + (
                f"; depth cut to {row['num_layers']} of {row['full_num_layers']} layers to fit "
                "memory (time scales ~linearly in layers)"
                if row["num_layers"] < row["full_num_layers"]
                else ""
            )
        ),
        versions=dict(
            jax=jax.__version__,
            jaxlib=getattr(jax.lib, "__version__", None) or version("jaxlib"),
            flax=version("flax"),
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            numpy=np.__version__,
            python=platform.python_version(),
        ),
        threads=dict(
            torch_threads=torch.get_num_threads(),
            torch_interop_threads=torch.get_num_interop_threads(),
            env={
                k: os.environ.get(k)
                for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")
            },
            cpu_affinity=sorted(os.sched_getaffinity(0)),
            cpu_count=os.cpu_count(),
        ),
        jax_devices=[str(d) for d in jax.devices()],
        load_average=list(os.getloadavg()),
        machine=platform.machine(),
        processor=platform.processor(),
        peak_rss_gb=peak_rss_gb(),
        rows=rows,
    )
    out = Path(args.out or f"results/benchmarks/sd3_step_{args.config}.json")
    from experiments.common import write_json

    write_json(out, result)
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
