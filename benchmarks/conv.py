"""The convolution gap: XLA:CPU 3x3 convolutions against PyTorch's (oneDNN), per XLA flag set.

    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu python -m benchmarks.conv [--rounds 5]
        [--flag-sets default,onednn,...] [--shapes sd21] [--pass forward|input_grad]

The UNet ports run their 3x3 convolutions through
:func:`jaxdiv.models.convolution.conv_general_dilated`: Winograd F(2 x 2, 3 x 3) on enough
output tiles, a product of gathered patches on inputs smaller than the kernel, NHWC
``lax.conv_general_dilated`` (XLA's direct convolution, what ``nnx.Conv`` lowers to)
otherwise; PyTorch runs NCHW ``conv2d`` through oneDNN. Each row names the path jaxdiv
took (``path``) and times all three -- jaxdiv, plain ``lax.conv_general_dilated`` and
torch -- with each one's max abs error to a float64 PyTorch convolution. On a Winograd
shape a fourth implementation, :data:`OTHER_PRODUCTS`, is jaxdiv with Winograd's 16
products in the form it did not choose (``winograd_products``: ``unrolled`` into 16 2-D
products or ``batched``; :data:`~jaxdiv.models.convolution.WINOGRAD_UNROLL_MIN_TILES`).
``--shapes sd21`` uses the shapes of an SD 2.1 UNet at latent 64 (CFG batch 2): from 64 x
64 x 320 down to 8 x 8 x 1280, where the spatial size is small and the channel count high
(``winograd_tiles``: its Winograd shapes at CFG batch 2 and 4, 128 to 2048 tiles). ``--shapes
bottom`` times the bottom of a UNet at 128 px (2 x 2 and 1 x 1 inputs, CFG batch 4);
``--shapes downsample`` SD 2.1's three stride-2 downsamplers at CFG batch 2 and 4 (a
:data:`SHAPES` entry's optional fifth number is the stride).
XLA's flags are read once per process, so each flag set runs in a child process of its
own, where the implementations alternate round by round
(:func:`benchmarks.timing.interleaved`), on one pinned core with one thread each
(``--threads 1``, the default) or with every library's default threads on all cores
(``--threads 0``); the ratios come from those interleaved rounds. ``--winograd-min-tiles
0`` forces jaxdiv's Winograd path on every shape it can take (how
:data:`~jaxdiv.models.convolution.WINOGRAD_MIN_TILES` was chosen).

``--pass input_grad`` times gradient steps on a convolution's input inside a ``lax.scan``
(:func:`measure_input_grad`), where XLA:CPU left JAX's own input gradient as a naive loop
nest; jaxdiv's layer, plain ``lax.conv_general_dilated`` and torch autograd alternate
(``--shapes vae_decoder_256``: the levels of SD's VAE decoder at 256 px), and on a Winograd
shape jaxdiv with JAX's autodiff of the Winograd transforms as its input gradient
(:data:`AUTODIFF_WINOGRAD`).

Flag sets (``--flag-sets``, comma-separated names):

* ``default``: no flags beyond single-threaded Eigen.
* ``onednn``: ``--xla_cpu_use_onednn=true`` (oneDNN thunks for matmul and convolution).
* ``onednn_custom_call``: ``--xla_cpu_experimental_onednn_custom_call=true``.
* ``no_xnnpack``: ``--xla_cpu_use_xnnpack=false``.
* ``fast_runtime``: ``--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME``.
* ``no_ynn``: ``--xla_cpu_experimental_ynn_fusion_type=`` (no YNNPACK fusions: products,
  and the elementwise work YNNPACK would fuse with them, by XLA's own emitters and
  library calls).
* ``ynn_dot_only`` / ``ynn_no_dot``: YNNPACK for the product fusions alone
  (``--xla_cpu_experimental_ynn_fusion_type=dot``) / for elementwise work and reductions
  alone (``=eltwise,reduce``).

``--pass matmul`` times plain ``jnp.matmul`` against ``torch.matmul`` instead, on
:data:`MATMUL_SHAPES` (``--shapes sd21`` or ``tiny``), per flag set: whether XLA:CPU's
products run at PyTorch's rate (:func:`benchmarks.profile_step.gemm_peers`); ``--dtype
bfloat16`` times them in bfloat16 (PyTorch's oneDNN runs those on AMX / AVX-512 BF16 units
where the CPU has them).

Writes ``results/benchmarks/conv.json`` (``--out``) with median [min-max] per shape and
flag set, the torch / jaxdiv ratio per round, the environment and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

FLAG_SETS = {
    "default": "",
    "onednn": "--xla_cpu_use_onednn=true",
    "onednn_custom_call": "--xla_cpu_experimental_onednn_custom_call=true",
    "no_xnnpack": "--xla_cpu_use_xnnpack=false",
    "fast_runtime": "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_RUNTIME",
    "no_ynn": "--xla_cpu_experimental_ynn_fusion_type=",
    "ynn_dot_only": "--xla_cpu_experimental_ynn_fusion_type=dot",
    "ynn_no_dot": "--xla_cpu_experimental_ynn_fusion_type=eltwise,reduce",
}
#: command-line overrides of :mod:`jaxdiv.models.convolution`'s thresholds, set in the child
THRESHOLDS = {"winograd_min_tiles": "WINOGRAD_MIN_TILES",
              "small_output_tiles": "SMALL_OUTPUT_TILES",
              "small_strided_output_tiles": "SMALL_STRIDED_OUTPUT_TILES"}  # fmt: skip
#: ``--pass matmul``: the largest products of an SD 2.1 UNet step at latent 64, CFG batch 2
#: (``python -m benchmarks.profile_step --gemm-peers 6``): linear layers, and one batched
#: Winograd product of the 64 x 64 level
MATMUL_SHAPES = {
    "sd21": [((8192, 320), (320, 2560)), ((8192, 320), (320, 320)), ((2048, 640), (640, 640)),
             ((512, 1280), (1280, 1280)), ((16, 2048, 320), (16, 320, 320)),
             ((2048, 640), (640, 5120))],
    "tiny": [((64, 32), (32, 48)), ((4, 16, 32), (4, 32, 8))],
}
#: the row of a Winograd-path shape that times jaxdiv with Winograd's 16 products in their
#: other form (batched where jaxdiv unrolls them, unrolled where it batches them)
OTHER_PRODUCTS = "jaxdiv_other_winograd_products"
#: the row of a Winograd-path shape in ``--pass input_grad`` that times jaxdiv with the input
#: gradient left to JAX's autodiff of Winograd's transforms
#: (:data:`~jaxdiv.models.convolution.WINOGRAD_CUSTOM_INPUT_GRAD` off)
AUTODIFF_WINOGRAD = "jaxdiv_autodiff_winograd"
_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
# (batch, height = width, in channels, out channels): SD 2.1's UNet at latent 64, CFG batch 2
SHAPES = {
    "sd21": [(2, 64, 320, 320), (2, 32, 640, 640), (2, 16, 1280, 1280), (2, 8, 1280, 1280)],
    # the bottom of a UNet at 128 px (latent 16, CFG batch 4): inputs smaller than the kernel
    "bottom": [(4, 2, 256, 256), (4, 2, 512, 256), (4, 1, 256, 256), (4, 4, 256, 256)],
    # SD's VAE decoder levels at 256 px output, batch 1 (GASS differentiates through them)
    "vae_decoder_256": [(1, 32, 512, 512), (1, 64, 512, 512), (1, 128, 256, 256),
                        (1, 256, 128, 128)],
    # outputs with fewer 2 x 2 tiles than WINOGRAD_MIN_TILES: SD 2.1's 8 x 8 level at latent
    # 64 (batch 2 and CFG batch 4, the 2560-channel input of the first up block), and 4 x 4
    "small_output": [(2, 8, 1280, 1280), (2, 8, 2560, 1280), (4, 8, 1280, 1280),
                     (2, 4, 1280, 1280)],
    # Winograd shapes of SD 2.1's UNet at latent 64 with 128 to 2048 output tiles (CFG batch
    # 2 and 4): where WINOGRAD_UNROLL_MIN_TILES splits batched from unrolled products
    "winograd_tiles": [(2, 16, 1280, 1280), (4, 16, 1280, 1280), (4, 16, 2560, 1280),
                       (2, 32, 640, 640), (4, 32, 640, 640), (2, 64, 320, 320)],
    # SD 2.1's three UNet downsamplers (stride 2) at CFG batch 2 and 4 (a fifth entry is
    # the stride, 1 when absent)
    "downsample": [(2, 64, 320, 320, 2), (2, 32, 640, 640, 2), (2, 16, 1280, 1280, 2),
                   (4, 32, 640, 640, 2), (4, 16, 1280, 1280, 2)],
    # patches, patches, Winograd, strided patches
    "tiny": [(1, 8, 8, 8), (1, 2, 16, 16), (2, 16, 8, 8), (2, 8, 8, 8, 2)],
}


def _shape(entry):
    """``(batch, size, in, out, stride)`` of a :data:`SHAPES` entry (stride 1 when absent)."""
    b, hw, cin, cout, *stride = entry
    return b, hw, cin, cout, stride[0] if stride else 1


def _out_size(hw, stride):
    """Output height (= width) of the 3x3 convolution with padding 1 on ``hw`` pixels."""
    return (hw - 1) // stride + 1


def _operands(b, hw, cin, cout, stride=1):
    """A random NHWC input and HWIO 3x3 kernel, and a target of the output's shape (padding
    1), each as ``(jax, torch)`` with the torch side in NCHW / OIHW."""
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((b, hw, hw, cin), np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    out = _out_size(hw, stride)
    c = rng.standard_normal((b, out, out, cout), np.float32)
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return ((jnp.asarray(x), jnp.asarray(w)),
            (nchw(x), torch.from_numpy(np.ascontiguousarray(w.transpose(3, 2, 0, 1)))),
            (jnp.asarray(c), nchw(c)))  # fmt: skip


def measure(shapes, rounds: int) -> list[dict]:
    """Time jaxdiv's NHWC convolution, XLA's direct one and torch's NCHW one on each shape,
    interleaved, in this process (with whatever ``XLA_FLAGS`` and threads it was started
    with); each one's max abs error to a float64 PyTorch convolution of the same inputs."""
    import jax
    import numpy as np
    import torch

    from benchmarks.timing import interleaved, module_constants, round_ratio_range
    from jaxdiv.models import convolution
    from jaxdiv.models.convolution import conv_general_dilated, conv_path

    def jitted(fn, stride):
        return jax.jit(lambda x, w: fn(x, w, (stride, stride), ((1, 1), (1, 1)),
                                       dimension_numbers=jax.lax.conv_dimension_numbers(
                                           x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))))

    rows = []
    for entry in shapes:
        b, hw, cin, cout, stride = _shape(entry)
        conv = jitted(conv_general_dilated, stride)
        lax_conv = jitted(jax.lax.conv_general_dilated, stride)
        (xj, wj), (xt, wt), _ = _operands(b, hw, cin, cout, stride)

        def run_torch(xt=xt, wt=wt, stride=stride):
            with torch.no_grad():
                return torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1)

        def run_jax(xj=xj, wj=wj):
            return conv(xj, wj).block_until_ready()

        def run_lax(xj=xj, wj=wj):
            return lax_conv(xj, wj).block_until_ready()

        with torch.no_grad():
            truth = torch.nn.functional.conv2d(xt.double(), wt.double(), stride=stride,
                                               padding=1).numpy()  # fmt: skip
        outs = {"jaxdiv": np.asarray(run_jax()).transpose(0, 3, 1, 2),
                "lax_conv_general_dilated": np.asarray(run_lax()).transpose(0, 3, 1, 2),
                "torch": run_torch().numpy()}  # fmt: skip
        errors = {name: float(np.abs(out.astype(np.float64) - truth).max())
                  for name, out in outs.items()}  # fmt: skip
        path = conv_path(xj, wj, (stride, stride), ((1, 1), (1, 1)), products=True)
        fns = {"jaxdiv": run_jax, "torch": run_torch, "lax_conv_general_dilated": run_lax}
        products = None
        if path.startswith("winograd"):  # also time the other form of Winograd's 16 products
            path, products = path.split("_")
            other = jitted(conv_general_dilated, stride)
            flip = 0 if products == "batched" else float("inf")

            def run_other(xj=xj, wj=wj, other=other):
                return other(xj, wj).block_until_ready()

            with module_constants([(convolution, "WINOGRAD_UNROLL_MIN_TILES", flip)]):
                outs[OTHER_PRODUCTS] = np.asarray(run_other()).transpose(0, 3, 1, 2)
            errors[OTHER_PRODUCTS] = float(np.abs(outs[OTHER_PRODUCTS] - truth).max())
            fns[OTHER_PRODUCTS] = run_other
        timed = interleaved(fns, rounds)
        jax_s = timed["jaxdiv"]["median_s"]
        if products is not None:
            other_ratio = {"other_products_over_jaxdiv": timed[OTHER_PRODUCTS]["median_s"] / jax_s,
                           "per_round_other_products_over_jaxdiv": round_ratio_range(
                               timed, OTHER_PRODUCTS, "jaxdiv")}  # fmt: skip
        out = _out_size(hw, stride)
        rows.append({"batch": b, "hw": hw, "in_channels": cin, "out_channels": cout,
                     "stride": stride, "path": path,
                     "gflop": 2 * b * out * out * 9 * cin * cout / 1e9,
                     "winograd_products": products,
                     **(other_ratio if products is not None else {}),
                     "max_abs_diff": float(np.abs(outs["jaxdiv"] - outs["torch"]).max()),
                     "max_abs_error_to_float64": errors, "times": timed,
                     "torch_over_jaxdiv": timed["torch"]["median_s"] / jax_s,
                     "per_round_torch_over_jaxdiv": round_ratio_range(timed, "torch", "jaxdiv"),
                     "lax_over_jaxdiv": timed["lax_conv_general_dilated"]["median_s"] / jax_s,
                     "per_round_lax_over_jaxdiv": round_ratio_range(
                         timed, "lax_conv_general_dilated", "jaxdiv")})  # fmt: skip
    return rows


def measure_input_grad(shapes, rounds: int, steps: int = 2) -> list[dict]:
    """Time ``steps`` gradient steps on the input of one 3x3 convolution,
    ``x <- x - 0.01 d/dx |conv(x, w) - c|^2 / 2`` (a forward and an input-gradient
    convolution per step), in a ``lax.scan`` (where a guidance term's
    gradient runs): jaxdiv's layer, plain ``lax.conv_general_dilated`` under JAX's own
    transpose rule, and torch autograd in a Python loop; interleaved, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    from benchmarks.timing import interleaved, module_constants, round_ratio_range
    from jaxdiv.models import convolution
    from jaxdiv.models.convolution import conv_general_dilated, conv_path

    torch.set_num_threads(1)

    def descent(fn, stride):
        def run(x, w, c):
            dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
            energy = lambda x: 0.5 * jnp.sum((fn(x, w, (stride, stride), ((1, 1), (1, 1)),  # noqa: E731,E501
                                                  dimension_numbers=dn) - c) ** 2)  # fmt: skip
            step = lambda x, _: (x - 0.01 * jax.grad(energy)(x), None)  # noqa: E731
            return jax.lax.scan(step, x, None, length=steps)[0]

        return jax.jit(run)

    rows = []
    for entry in shapes:
        b, hw, cin, cout, stride = _shape(entry)
        ours = descent(conv_general_dilated, stride)
        lax_conv = descent(jax.lax.conv_general_dilated, stride)
        (xj, wj), (xt, wt), (cj, ct) = _operands(b, hw, cin, cout, stride)

        def run_torch(xt=xt, wt=wt, ct=ct, stride=stride):
            x = xt
            for _ in range(steps):
                x = x.detach().requires_grad_(True)
                y = torch.nn.functional.conv2d(x, wt, stride=stride, padding=1)
                (0.5 * ((y - ct) ** 2).sum()).backward()
                x = x.detach() - 0.01 * x.grad
            return x

        def run_jax(xj=xj, wj=wj, cj=cj):
            return ours(xj, wj, cj).block_until_ready()

        def run_lax(xj=xj, wj=wj, cj=cj):
            return lax_conv(xj, wj, cj).block_until_ready()

        want = run_torch().numpy().transpose(0, 2, 3, 1)
        diff = float(np.abs(np.asarray(run_jax()) - want).max())
        diff_lax = float(np.abs(np.asarray(run_lax()) - want).max())
        fns = {"jaxdiv": run_jax, "torch": run_torch, "lax_conv_general_dilated": run_lax}
        path = conv_path(xj, wj, (stride, stride), ((1, 1), (1, 1)))
        autodiff = {}
        if path == "winograd":  # also time Winograd under JAX's autodiff of its transforms
            plain = descent(conv_general_dilated, stride)

            def run_plain(xj=xj, wj=wj, cj=cj, plain=plain):
                return plain(xj, wj, cj).block_until_ready()

            with module_constants([(convolution, "WINOGRAD_CUSTOM_INPUT_GRAD", False)]):
                autodiff["max_abs_diff_autodiff_winograd"] = float(
                    np.abs(np.asarray(run_plain()) - want).max())  # fmt: skip
            fns[AUTODIFF_WINOGRAD] = run_plain
        timed = interleaved(fns, rounds)
        if autodiff:
            autodiff["autodiff_winograd_over_jaxdiv"] = (timed[AUTODIFF_WINOGRAD]["median_s"]
                                                         / timed["jaxdiv"]["median_s"])
            autodiff["per_round_autodiff_winograd_over_jaxdiv"] = round_ratio_range(
                timed, AUTODIFF_WINOGRAD, "jaxdiv")
        rows.append({"batch": b, "hw": hw, "in_channels": cin, "out_channels": cout,
                     "stride": stride, "steps": steps, "path": path, "max_abs_diff": diff,
                     "max_abs_diff_lax": diff_lax, **autodiff,
                     "times": timed, "torch_over_jaxdiv": timed["torch"]["median_s"]
                     / timed["jaxdiv"]["median_s"],
                     "per_round_torch_over_jaxdiv": round_ratio_range(timed, "torch", "jaxdiv"),
                     "lax_over_jaxdiv": timed["lax_conv_general_dilated"]["median_s"]
                     / timed["jaxdiv"]["median_s"],
                     "per_round_lax_over_jaxdiv": round_ratio_range(
                         timed, "lax_conv_general_dilated", "jaxdiv")})  # fmt: skip
    return rows


def _child(args) -> None:
    import torch

    from benchmarks.timing import environment

    if args.threads == 1:
        torch.set_num_threads(1)
    from jaxdiv.models import convolution

    for option, constant in THRESHOLDS.items():
        if getattr(args, option) is not None:
            setattr(convolution, constant, getattr(args, option))
    if args.pass_ == "matmul":
        from benchmarks.profile_step import gemm_peers

        rows = gemm_peers(MATMUL_SHAPES[args.shapes], args.rounds, args.dtype)
    else:
        measure_fn = measure_input_grad if args.pass_ == "input_grad" else measure
        rows = measure_fn(SHAPES[args.shapes], args.rounds)
    env = environment()
    env["versions"]["torch"] = torch.__version__
    env["torch_threads"] = torch.get_num_threads()
    print(json.dumps({"rows": rows, "environment": env}))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.conv",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--flag-sets", default=",".join(FLAG_SETS))
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="sd21")
    parser.add_argument("--pass", dest="pass_", choices=("forward", "input_grad", "matmul"),
                        default="forward",
                        help="input_grad: gradient steps on the input in a lax.scan; "
                             "matmul: the UNet step's largest matrix products")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--pass matmul only: the operands' dtype (bfloat16: whether "
                             "XLA:CPU uses the CPU's bfloat16 units as PyTorch does)")
    parser.add_argument("--winograd-min-tiles", type=float, default=None,
                        help="override jaxdiv.models.convolution.WINOGRAD_MIN_TILES "
                             "(0: Winograd wherever it can run)")
    parser.add_argument("--small-output-tiles", type=float, default=None,
                        help="override jaxdiv.models.convolution.SMALL_OUTPUT_TILES "
                             "(0: XLA's convolution below the Winograd threshold)")
    parser.add_argument("--small-strided-output-tiles", type=float, default=None,
                        help="override jaxdiv.models.convolution.SMALL_STRIDED_OUTPUT_TILES "
                             "(0: XLA's convolution for every strided one; inf: patches)")
    parser.add_argument("--threads", type=int, choices=(0, 1), default=1,
                        help="1: one pinned core, one thread each; 0: library defaults")
    parser.add_argument("--out", default="results/benchmarks/conv.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if args.child:
        from benchmarks.timing import pin_one_core

        # the flags alone leave XLA:CPU on every core: the child pins itself before JAX starts
        if args.threads == 1:
            pin_one_core()
        _child(args)
        return {}
    if args.dtype != "float32" and args.pass_ != "matmul":
        parser.error(f"--dtype {args.dtype} is taken by --pass matmul only, got --pass "
                     f"{args.pass_}")  # fmt: skip
    if args.pass_ == "matmul" and args.shapes not in MATMUL_SHAPES:
        parser.error(f"--pass matmul takes --shapes {sorted(MATMUL_SHAPES)}, got {args.shapes}")
    names = [n for n in args.flag_sets.split(",") if n]
    unknown = sorted(set(names) - set(FLAG_SETS))
    if unknown or not names:
        parser.error(f"--flag-sets must name some of {sorted(FLAG_SETS)}, got {unknown or names}")
    from experiments.common import write_json

    what = {"forward": "3x3 convolution",
            "input_grad": "gradient steps on the input of a 3x3 convolution in a lax.scan",
            "matmul": "matrix products"}[args.pass_]  # fmt: skip
    peers = ("jnp.matmul vs torch.matmul" if args.pass_ == "matmul"
             else "XLA:CPU NHWC vs torch conv2d NCHW (oneDNN)")  # fmt: skip
    threads = "one pinned thread" if args.threads == 1 else "library default threads"
    result = {"benchmark": f"{what}, {args.dtype}, {threads}: {peers}, per XLA flag set, "
                           "interleaved",
              "threads": args.threads, "dtype": args.dtype,
              **{option: getattr(args, option) for option in THRESHOLDS},
              "pass": args.pass_,
              "command": " ".join(["python -m benchmarks.conv"] + list(argv or sys.argv[1:])),
              "flag_sets": {}}  # fmt: skip
    for name in names:
        one = args.threads == 1
        env = dict(os.environ, XLA_FLAGS=f"{FLAG_SETS[name]} {_ONE_THREAD if one else ''}".strip(),
                   JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
        if one:
            env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "benchmarks.conv", "--child", "--rounds",
               str(args.rounds), "--shapes", args.shapes, "--pass", args.pass_,
               "--threads", str(args.threads), "--dtype", args.dtype]  # fmt: skip
        for option in THRESHOLDS:
            if getattr(args, option) is not None:
                cmd += [f"--{option.replace('_', '-')}", str(getattr(args, option))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            result["flag_sets"][name] = {"flags": FLAG_SETS[name], "status": "error",
                                         "stderr_tail": proc.stderr[-2000:]}  # fmt: skip
        else:
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            result["flag_sets"][name] = {"flags": FLAG_SETS[name], "status": "ok", **child}
        for row in result["flag_sets"][name].get("rows", []):
            if args.pass_ == "matmul":
                print(f"{name:>18}  {row['lhs']} @ {row['rhs']}: jax {row['jax_gflops']:6.1f} "
                      f"GFLOP/s  torch {row['torch_gflops']:6.1f} GFLOP/s  torch/jax time "
                      f"{row['torch_over_jax']:.2f}", flush=True)  # fmt: skip
                continue
            print(f"{name:>18}  {row['batch']}x{row['hw']}x{row['hw']}x{row['in_channels']}"
                  f"->{row['out_channels']} ({row.get('path', 'grad')}): jaxdiv "
                  f"{row['times']['jaxdiv']['median_s'] * 1e3:8.2f} ms  torch "
                  f"{row['times']['torch']['median_s'] * 1e3:8.2f} ms  torch/jaxdiv "
                  f"{row['torch_over_jaxdiv']:.2f}"
                  + (f"  lax/jaxdiv {row['lax_over_jaxdiv']:.2f}" if "lax_over_jaxdiv" in row
                     else "")
                  + (f"  {row['winograd_products']}; other products/jaxdiv "
                     f"{row['other_products_over_jaxdiv']:.2f}" if row.get("winograd_products")
                     else ""), flush=True)  # fmt: skip
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
