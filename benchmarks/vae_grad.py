"""SD's VAE decoder and its gradient with respect to the latents: jaxdiv (jitted Flax nnx)
against diffusers (PyTorch autograd), alternating in one process.

    JAX_PLATFORMS=cpu python -m benchmarks.vae_grad [--config sd21] [--latent 32]
        [--batch 1] [--rounds 3] [--threads 1|0] [--malloc reuse|default]
        [--out results/benchmarks/vae_grad.json]

GASS with the latent write-back runs the decoder forward and backward at every
iteration of every step, so its cost on SD is the decoder's input gradient. Each round
times, in this order: jaxdiv's decode (``decode``), jaxdiv's gradient of ``sum(decode(z) *
c)`` with respect to ``z`` for a fixed random ``c`` (``input_grad``: forward and backward in
one jitted call), the same gradient with Winograd's input gradient left to JAX's autodiff of
its transforms (``input_grad_autodiff_winograd``,
:data:`jaxdiv.models.convolution.WINOGRAD_CUSTOM_INPUT_GRAD` off: what jaxdiv ran before),
then diffusers' ``decode`` under ``torch.no_grad`` and its input gradient by ``backward()``.
The VAE has SD 2.1's architecture (:data:`benchmarks.sd_generate.SD21_VAE`) with random
weights, saved by diffusers and loaded through :func:`jaxdiv.models.vae.load_vae`. The JSON
records each side's time median [min-max], the ratios per round, the max abs differences of
images and gradients to torch's, the environment, threads, malloc setting and peak RSS.
``--malloc reuse`` (the default) runs both libraries under
:data:`jaxdiv.host_memory.REUSE_FREED_MEMORY`, as jaxdiv's CPU guidance recommends: under
glibc's default malloc XLA:CPU page-faults every call's fresh buffers, and the gradient's
buffers are many. ``--config tiny`` is the smoke test's size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.sd_generate import SD21_VAE
from benchmarks.timing import add_thread_and_malloc_options, use_malloc

CONFIGS = {
    "sd21": SD21_VAE,
    "tiny": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                 norm_num_groups=4, latent_channels=4),  # fmt: skip
}


def measure(config: str, latent: int, batch: int, rounds: int, folder: str) -> dict:
    """Time decode and input gradient for jaxdiv (both Winograd input gradients) and
    diffusers, interleaved; see the module docstring."""
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import AutoencoderKL as TorchVAE

    from benchmarks.timing import interleaved, module_constants, round_ratio_range
    from jaxdiv.models import convolution
    from jaxdiv.models.layers import pure
    from jaxdiv.models.vae import load_vae

    torch.manual_seed(0)
    torch_vae = TorchVAE(**CONFIGS[config]).eval()
    torch_vae.save_pretrained(folder)
    torch_vae.requires_grad_(False)  # the input gradient only, as on the jaxdiv side
    decoder = pure(load_vae(folder), "decode")
    scale = 2 ** (len(torch_vae.config.block_out_channels) - 1)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((batch, torch_vae.config.latent_channels, latent, latent),
                            np.float32)  # fmt: skip
    c = rng.standard_normal((batch, 3, scale * latent, scale * latent), np.float32)
    zj, cj = jnp.asarray(z), jnp.asarray(c)

    decode = jax.jit(decoder.apply)

    def input_grad_fn():
        return jax.jit(jax.grad(lambda p, z: jnp.sum(decoder.apply(p, z) * cj), argnums=1))

    grad = input_grad_fn()
    grad_autodiff = input_grad_fn()
    out = {"decode": lambda: decode(decoder.params, zj).block_until_ready(),
           "input_grad": lambda: grad(decoder.params, zj).block_until_ready(),
           "input_grad_autodiff_winograd": lambda: grad_autodiff(decoder.params, zj)
           .block_until_ready()}  # fmt: skip
    values = {"decode": out["decode"](), "input_grad": out["input_grad"]()}
    with module_constants([(convolution, "WINOGRAD_CUSTOM_INPUT_GRAD", False)]):
        values["input_grad_autodiff_winograd"] = out["input_grad_autodiff_winograd"]()
    zt, ct = torch.from_numpy(z), torch.from_numpy(c)

    def torch_decode():
        with torch.no_grad():
            return torch_vae.decode(zt).sample

    def torch_input_grad():
        x = zt.clone().requires_grad_(True)
        (torch_vae.decode(x).sample * ct).sum().backward()
        return x.grad

    want = {"decode": torch_decode().numpy(), "input_grad": torch_input_grad().numpy()}
    fns = dict(out, torch_decode=torch_decode, torch_input_grad=torch_input_grad)
    timed = interleaved(fns, rounds)
    med = {name: t["median_s"] for name, t in timed.items()}

    def ratios(key, num, den):
        return {key: med[num] / med[den], f"per_round_{key}": round_ratio_range(timed, num, den)}

    diffs = {name: float(np.abs(np.asarray(v) - want[name.split("_autodiff")[0]]).max())
             for name, v in values.items()}  # fmt: skip
    return {"config": config, "latent": latent, "batch": batch,
            "image_size": scale * latent, "rounds": rounds, "times": timed,
            "max_abs_diff_to_torch": diffs,
            "max_abs_torch": {k: float(np.abs(v).max()) for k, v in want.items()},
            **ratios("decode_torch_over_jaxdiv", "torch_decode", "decode"),
            **ratios("input_grad_torch_over_jaxdiv", "torch_input_grad", "input_grad"),
            **ratios("autodiff_winograd_over_jaxdiv", "input_grad_autodiff_winograd",
                     "input_grad"),
            "jaxdiv_input_grad_over_decode": med["input_grad"] / med["decode"],
            "autodiff_winograd_input_grad_over_decode":
                med["input_grad_autodiff_winograd"] / med["decode"],
            "torch_input_grad_over_decode":
                med["torch_input_grad"] / med["torch_decode"]}  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run :func:`measure`, write and return the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="sd21")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    add_thread_and_malloc_options(parser)
    parser.add_argument("--out", default="results/benchmarks/vae_grad.json")
    args = parser.parse_args(argv)
    for name in ("latent", "batch", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    use_malloc(args.malloc, argv, "benchmarks.vae_grad")
    import diffusers
    import torch

    from benchmarks.timing import environment, pin_one_core

    if args.threads == 1:
        pin_one_core()  # before jax / torch start their thread pools
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        row = measure(args.config, args.latent, args.batch, args.rounds, folder)
    result = {"meta": environment() | dict(
        command="python -m benchmarks.vae_grad " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items() if k != "out"),
        thread_setting=args.threads, malloc=args.malloc, torch_threads=torch.get_num_threads(),
        torch=torch.__version__, diffusers=diffusers.__version__), "rows": [row]}  # fmt: skip
    from experiments.common import write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    t = {name: v["median_s"] for name, v in row["times"].items()}
    print(f"decode {t['decode']:.3f} s vs torch {t['torch_decode']:.3f} s "
          f"({row['decode_torch_over_jaxdiv']:.2f}x); input gradient {t['input_grad']:.3f} s "
          f"vs torch {t['torch_input_grad']:.3f} s ({row['input_grad_torch_over_jaxdiv']:.2f}x),"
          f" autodiff Winograd {t['input_grad_autodiff_winograd']:.3f} s; wrote {out}")
    return result


if __name__ == "__main__":
    main()
