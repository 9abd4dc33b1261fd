"""GroupNorm + SiLU, forward and input gradient, at SD's shapes: jaxdiv against PyTorch and
against jaxdiv's previous group-reshaped form, alternating in one process.

    JAX_PLATFORMS=cpu python -m benchmarks.group_norm [--shapes vae_decoder_256 unet_64]
        [--rounds 5] [--threads 1|0] [--malloc reuse|default]
        [--out results/benchmarks/group_norm.json]

Every ResNet block of SD's UNet and VAE runs ``silu(group_norm(x))`` twice. For each shape
(channels-last ``(B, H, W, C)``, 32 groups, eps 1e-6) a round times, in this order:
jaxdiv's :func:`jaxdiv.models.normalization.group_norm` (per-channel statistics, closed-form
tangent) forward (``forward``) and the input gradient of ``sum(silu(gn(x)) * c)`` for a
fixed random ``c`` (``input_grad``: forward and backward, one jitted call); the same for
the form jaxdiv used before (statistics over a ``(B, HW, G, C/G)`` reshape, JAX's autodiff;
``reshape_*``, written out below); then PyTorch's ``group_norm`` + ``silu`` on its
native channels-first layout, forward under ``no_grad`` and ``backward()``
(``torch_*``). The JSON records each time as median [min-max], the ratios per round, each
side's max abs difference to float64 torch, threads, malloc setting and peak RSS.
``--shapes tiny`` is the smoke test's size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.timing import add_thread_and_malloc_options, use_malloc

GROUPS, EPS = 32, 1e-6
SHAPES = {
    # SD's VAE decoder for a 256 px image (latent 32): its four levels
    "vae_decoder_256": [(1, 32, 32, 512), (1, 64, 64, 512), (1, 128, 128, 256),
                        (1, 256, 256, 128)],
    # SD 2.1's UNet at latent 64 (512 px), batch 2: its four levels
    "unet_64": [(2, 64, 64, 320), (2, 32, 32, 640), (2, 16, 16, 1280), (2, 8, 8, 1280)],
    "tiny": [(1, 6, 6, 64)],
}  # fmt: skip


def reshape_group_norm(x, scale, bias):
    """jaxdiv's GroupNorm before 2026-12-07: statistics over a group reshape, autodiff."""
    import jax
    import jax.numpy as jnp

    b, c = x.shape[0], x.shape[-1]
    xg = x.reshape(b, -1, GROUPS, c // GROUPS)
    mean = xg.mean(axis=(1, 3), keepdims=True)
    var = jnp.square(xg - mean).mean(axis=(1, 3), keepdims=True)
    return ((xg - mean) * jax.lax.rsqrt(var + EPS)).reshape(x.shape) * scale + bias


def measure(shape: tuple[int, ...], rounds: int) -> dict:
    """Time one shape's six calls interleaved; see the module docstring."""
    import jax
    import jax.numpy as jnp
    import torch

    from benchmarks.timing import interleaved, round_ratio_range
    from jaxdiv.models.normalization import group_norm

    rng = np.random.default_rng(0)
    x, c = (rng.standard_normal(shape, np.float32) for _ in range(2))
    scale = (1 + 0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    bias = (0.1 * rng.standard_normal(shape[-1])).astype(np.float32)
    xj, cj, sj, bj = map(jnp.asarray, (x, c, scale, bias))
    forms = {"": lambda x: group_norm(x, sj, bj, GROUPS, EPS),
             "reshape_": lambda x: reshape_group_norm(x, sj, bj)}
    fns, values = {}, {}
    for prefix, gn in forms.items():
        fwd = jax.jit(lambda x, gn=gn: jax.nn.silu(gn(x)))
        grad = jax.jit(jax.grad(lambda x, gn=gn: jnp.sum(jax.nn.silu(gn(x)) * cj)))
        fns[f"{prefix}forward"] = lambda f=fwd: f(xj).block_until_ready()
        fns[f"{prefix}input_grad"] = lambda f=grad: f(xj).block_until_ready()
        values[f"{prefix}forward"], values[f"{prefix}input_grad"] = fwd(xj), grad(xj)

    def to_torch(a, dtype=torch.float32):  # channels-last numpy -> contiguous NCHW
        return torch.from_numpy(np.moveaxis(a, -1, 1).copy()).to(dtype)

    xt, ct, st, bt = to_torch(x), to_torch(c), torch.from_numpy(scale), torch.from_numpy(bias)

    def torch_forward():
        with torch.no_grad():
            return torch.nn.functional.silu(torch.nn.functional.group_norm(xt, GROUPS, st, bt,
                                                                           EPS))  # fmt: skip

    def torch_input_grad(x=xt, c=ct, s=st, b=bt):
        leaf = x.clone().requires_grad_(True)
        y = torch.nn.functional.silu(torch.nn.functional.group_norm(leaf, GROUPS, s, b, EPS))
        (y * c).sum().backward()
        return leaf.grad

    fns |= {"torch_forward": torch_forward, "torch_input_grad": torch_input_grad}
    timed = interleaved(fns, rounds)
    # float64 truth for every side's error
    x64, c64 = to_torch(x, torch.float64), to_torch(c, torch.float64)
    s64, b64 = st.double(), bt.double()
    want = {"forward": torch.nn.functional.silu(torch.nn.functional.group_norm(
                x64, GROUPS, s64, b64, EPS)).numpy(),
            "input_grad": torch_input_grad(x64, c64, s64, b64).numpy()}  # fmt: skip
    values |= {"torch_forward": torch_forward().numpy(),
               "torch_input_grad": torch_input_grad().numpy()}  # fmt: skip
    errors = {}
    for name, v in values.items():
        v = np.asarray(v) if name.startswith("torch_") else np.moveaxis(np.asarray(v), -1, 1)
        errors[name] = float(np.abs(v - want["input_grad" if name.endswith("input_grad")
                                                else "forward"]).max())  # fmt: skip
    med = {name: t["median_s"] for name, t in timed.items()}
    row = {"shape": list(shape), "rounds": rounds, "times": timed,
           "max_abs_diff_to_float64_torch": errors}  # fmt: skip
    for kind in ("forward", "input_grad"):
        for peer in ("torch", "reshape"):
            key = f"{kind}_{peer}_over_jaxdiv"
            row[key] = med[f"{peer}_{kind}"] / med[kind]
            row[f"per_round_{key}"] = round_ratio_range(timed, f"{peer}_{kind}", kind)
    return row


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, run :func:`measure` per shape, write and return the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES),
                        default=["vae_decoder_256", "unet_64"])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    add_thread_and_malloc_options(parser)
    parser.add_argument("--out", default="results/benchmarks/group_norm.json")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    use_malloc(args.malloc, argv, "benchmarks.group_norm")
    import torch

    from benchmarks.timing import environment, pin_one_core

    if args.threads == 1:
        pin_one_core()  # before jax / torch start their thread pools
        torch.set_num_threads(1)
    rows = [dict(measure(shape, args.rounds), set=name)
            for name in args.shapes for shape in SHAPES[name]]  # fmt: skip
    result = {"meta": environment() | dict(
        command="python -m benchmarks.group_norm " + " ".join(
            f"--{k} {' '.join(v) if isinstance(v, list) else v}"
            for k, v in vars(args).items() if k != "out"),
        groups=GROUPS, eps=EPS, thread_setting=args.threads, malloc=args.malloc,
        torch_threads=torch.get_num_threads(), torch=torch.__version__), "rows": rows}  # fmt: skip
    from experiments.common import write_json

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)
    for row in rows:
        print(f"{'x'.join(map(str, row['shape'])):>16}: forward torch/jaxdiv "
              f"{row['forward_torch_over_jaxdiv']:.2f}x, reshape/jaxdiv "
              f"{row['forward_reshape_over_jaxdiv']:.2f}x; input gradient torch/jaxdiv "
              f"{row['input_grad_torch_over_jaxdiv']:.2f}x, reshape/jaxdiv "
              f"{row['input_grad_reshape_over_jaxdiv']:.2f}x")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
