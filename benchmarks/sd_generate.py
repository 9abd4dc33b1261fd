"""Full Stable Diffusion generation, jaxdiv (one jitted program) vs diffusers PyTorch, on CPU.

    python -m benchmarks.sd_generate [--configs tiny sd21-small] [--steps 50] [--repeats 3]
                                     [--threads 1] [--no-warmup]
                                     [--malloc reuse]

For each configuration a random diffusers ``StableDiffusionPipeline`` is saved to a temp
folder (:func:`jaxdiv.testing.save_random_pipeline`) and both sides run
the same full generation from the same initial latents: prompt encoding, ``--steps``
DDIM steps (eta 0) with CFG 7.5 (a doubled batch per step), VAE decode. jaxdiv runs it as
one ``jax.jit`` program (compiled once, compile time reported separately); diffusers runs
``StableDiffusionPipeline.__call__`` under ``torch.no_grad``. The two alternate, A B A B,
for ``--repeats`` rounds after one warm-up each (:func:`benchmarks.timing.interleaved`),
and each is reported as median [min-max]; the max abs difference of the two libraries'
last image batches (in ``[0, 1]``) is a sanity check. ``--no-warmup`` drops the warm-up
calls (jaxdiv's program is compiled ahead of time either way), for the 512 px
configuration, where one call takes minutes on CPU. Results go to
``results/sd_generate.json`` with the environment (:func:`benchmarks.timing.environment`:
versions, threads, peak RSS).

``--threads 1`` (default) pins the process to one core, with one torch thread and
single-threaded Eigen in XLA: a like-for-like comparison that stays meaningful on a
shared machine (torch's default thread pool collapses when the cores are oversubscribed:
3 tiny DDIM steps took 16.7 s instead of 0.2 s). ``--threads 0`` keeps both libraries'
defaults. ``--malloc reuse`` restarts the process under
:data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` (glibc keeps freed memory for reuse instead of
mapping XLA:CPU's buffers afresh every call); both libraries run under it.

Configurations:

* ``tiny`` -- the test suite's 16x16-pixel pipeline (:data:`jaxdiv.testing.TINY_UNET`, ...).
* ``sd21-small`` -- SD 2.1's architecture at reduced width: 4-level UNet with
  ``block_out_channels`` (64, 128, 256, 256), 64-wide heads, linear projections,
  ``upcast_attention``, cross-attention width 1024 from a 2-layer 1024-wide text encoder
  (77 tokens), a 4-level VAE (scale factor 8), v-prediction; 16x16 latents (128x128 px).
* ``sd21`` -- SD 2.1-base's shapes at full size (not in the default run): the 866M-parameter
  UNet of :mod:`benchmarks.sd_step`, the 23-layer 1024-wide text encoder, the
  (128, 256, 512, 512) VAE, epsilon prediction; 64x64 latents (512x512 px).
"""  # noqa: E501

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from benchmarks.sd_step import CONFIGS as UNET_CONFIGS
from benchmarks.timing import MALLOC_CHOICES, use_malloc

# SD2.1-base's text encoder (OpenCLIP-H's text tower, penultimate layer) and VAE
SD21_TEXT = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu",
                 projection_dim=512)  # fmt: skip
SD21_VAE = dict(block_out_channels=(128, 256, 512, 512),
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                layers_per_block=2, norm_num_groups=32, sample_size=512)  # fmt: skip
CONFIGS = {
    "tiny": {},
    "sd21-small": dict(
        prediction_type="v_prediction",
        unet=dict(
            sample_size=16,
            block_out_channels=(64, 128, 256, 256),
            layers_per_block=2,
            norm_num_groups=32,
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=1024,
            attention_head_dim=(1, 2, 4, 4),
            use_linear_projection=True,
            upcast_attention=True,
        ),
        vae=dict(
            block_out_channels=(32, 64, 128, 128),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            norm_num_groups=32,
            sample_size=128,
        ),
        text_encoder=dict(
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=2,
            num_attention_heads=16,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        ),
    ),
}
CONFIGS["sd21"] = dict(prediction_type="epsilon", unet=dict(UNET_CONFIGS["sd21"], sample_size=64),
                       vae=SD21_VAE, text_encoder=SD21_TEXT)  # fmt: skip
DEFAULT_CONFIGS = ("tiny", "sd21-small")
PROMPTS = ["a photo of a cat", "a red dog"]
CFG = 7.5


def bench_config(name, steps, repeats, folder, warmup=True):
    import jax
    import jax.numpy as jnp
    import torch

    import jaxdiv
    from benchmarks.timing import interleaved
    from jaxdiv import guidance
    from jaxdiv.pipelines import stable_diffusion as sd
    from jaxdiv.testing import save_random_pipeline

    torch_pipe = save_random_pipeline(folder, seed=0, **CONFIGS[name])
    torch_pipe.set_progress_bar_config(disable=True)
    pipe = sd.load(folder)
    shape = pipe.noise_shape(len(PROMPTS))
    noise = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    tokens = jnp.asarray(pipe.tokenize(PROMPTS))
    sampler = pipe.ddim(steps)
    term = guidance.cfg(CFG, null_cond=pipe.null_cond)
    params = (pipe.encode_prompt.params, pipe.denoiser.model.params, pipe.decode.params)

    def generate(params, tokens, noise):
        enc, unet, dec = params
        cond = pipe.encode_prompt.apply(enc, tokens)
        denoiser = pipe.denoiser._replace(model=pipe.denoiser.model._replace(params=unet))
        out = jaxdiv.sample(sampler, denoiser, noise, key=jax.random.key(0), cond=cond,
                            guidance=term)  # fmt: skip
        return pipe.decode.apply(dec, out.x0)

    t0 = time.perf_counter()
    compiled = jax.jit(generate).lower(params, tokens, jnp.asarray(noise)).compile()
    compile_s = time.perf_counter() - t0

    last = {}  # each side's latest images: the parity check needs no extra call

    def run_jax():
        last["jax"] = compiled(params, tokens, jnp.asarray(noise)).block_until_ready()

    def run_torch():
        with torch.no_grad():
            last["torch"] = torch_pipe(
                PROMPTS,
                num_inference_steps=steps,
                guidance_scale=CFG,
                eta=0.0,
                latents=torch.from_numpy(noise),
                height=shape[2] * pipe.vae_scale_factor,
                width=shape[3] * pipe.vae_scale_factor,
                output_type="np",
            ).images

    timed = interleaved({"jax": run_jax, "torch": run_torch}, repeats, warmup=warmup)  # A B A B
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]
    ours = np.clip(np.asarray(last["jax"]).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)
    diff = float(np.abs(ours - last["torch"]).max())
    n_unet = sum(p.numel() for p in torch_pipe.unet.parameters())
    return {
        "config": name,
        "batch": len(PROMPTS),
        "steps": steps,
        "cfg": CFG,
        "image_size": [shape[2] * pipe.vae_scale_factor, shape[3] * pipe.vae_scale_factor],
        "latent_shape": list(shape[1:]),
        "unet_params": n_unet,
        "jax_compile_s": compile_s,
        "jax_s": jax_s,
        "torch_s": torch_s,
        "torch_over_jax": torch_s / jax_s,
        "jax_min_max_s": [timed["jax"]["min_s"], timed["jax"]["max_s"]],
        "torch_min_max_s": [timed["torch"]["min_s"], timed["torch"]["max_s"]],
        "jax_runs_s": timed["jax"]["runs_s"],
        "torch_runs_s": timed["torch"]["runs_s"],
        "timing": "interleaved A B A B, median [min-max]",
        "warmup": warmup,
        "max_abs_image_diff": diff,
    }


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd_generate")
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="results/sd_generate.json")
    p.add_argument("--threads", type=int, choices=(0, 1), default=1,
                   help="1: one core for both libraries; 0: library defaults")  # fmt: skip
    p.add_argument(
        "--no-warmup",
        action="store_true",
        help="time from the first call (jaxdiv is compiled ahead of time anyway)",
    )
    p.add_argument(
        "--malloc",
        choices=MALLOC_CHOICES,
        default="default",
        help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY",
    )
    args = p.parse_args(argv)
    use_malloc(args.malloc, argv, "benchmarks.sd_generate")
    if args.steps < 1 or args.repeats < 1:
        raise ValueError(f"--steps and --repeats must be >= 1, got {args.steps} and "
                         f"{args.repeats}")  # fmt: skip
    if args.threads == 1:
        from benchmarks.timing import pin_one_core

        pin_one_core()  # before jax / torch start their thread pools
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()

    import torch

    from benchmarks.timing import environment, version
    from experiments.common import write_json

    if args.threads == 1:
        torch.set_num_threads(1)

    rows = []
    for name in args.configs:
        with tempfile.TemporaryDirectory() as folder:
            row = bench_config(name, args.steps, args.repeats, folder,
                               warmup=not args.no_warmup)  # fmt: skip
        rows.append(row)
        print(
            f"{name:>11}: jaxdiv {row['jax_s']:.3f} s (compile {row['jax_compile_s']:.1f} s)  "
            f"diffusers {row['torch_s']:.3f} s  torch/jax {row['torch_over_jax']:.2f}x  "
            f"max|img diff| {row['max_abs_image_diff']:.1e}",
            flush=True,
        )
    print()
    print("| config | image | UNet params | jaxdiv (s) | diffusers (s) | diffusers / jaxdiv |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        size = "x".join(map(str, r["image_size"]))
        print(
            f"| {r['config']} | {r['batch']}x{size} | {r['unet_params'] / 1e6:.2f} M | "
            f"{r['jax_s']:.3f} | {r['torch_s']:.3f} | {r['torch_over_jax']:.2f} |"
        )
    env = environment()
    env["versions"] |= {"torch": torch.__version__, "diffusers": version("diffusers")}
    result = env | {
        "benchmark": "full generation: prompt encoding + DDIM (eta 0) with CFG + VAE decode",
        "command": " ".join(["python -m benchmarks.sd_generate"] + list(argv or sys.argv[1:])),
        "threads_option": args.threads,
        "malloc": args.malloc,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
