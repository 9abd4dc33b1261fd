"""Stable Diffusion UNet denoiser step: jaxdiv (jitted Flax nnx) vs diffusers (PyTorch eager).

Both models hold the same random weights (the PyTorch model's state dict converted with
:func:`jaxdiv.models.conversion.convert_unet_state_dict`) and run in the same process on the
same inputs; the script also reports their max abs output difference as a sanity check.

Configs:
  * ``tiny``: the SD1-like UNet of the parity tests (:data:`jaxdiv.testing.TINY_UNET_SD1`,
    block_out_channels (32, 64)).
  * ``sd21``: SD 2.1 sized (block_out_channels (320, 640, 1280, 1280), cross-attention
    1024, heads (5, 10, 20, 20), linear projections, upcast attention; ~866M parameters).

Run (CPU, one core for every implementation, the default ``--threads 1``: the process is
pinned to one core, since XLA:CPU keeps using every core under
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``):
    JAX_PLATFORMS=cpu python -m benchmarks.sd_step --configs tiny,sd21 --latent 32 --batch 2

Run (CPU, both libraries' default threads on all cores): add ``--threads 0``. Each row
records ``cores_used`` (CPU time / wall time of one call) per implementation, and
``call_usage``: that call's system CPU seconds and minor page faults.
``--malloc reuse`` restarts the process under :data:`jaxdiv.host_memory.REUSE_FREED_MEMORY`
(glibc keeps freed memory for reuse, so XLA:CPU's per-call buffers stop page-faulting);
every implementation runs under it.

Three implementations alternate round by round (A B C A B C): jaxdiv jitted, diffusers
eager and diffusers under ``torch.compile`` (``--torch-compile`` picks the mode; ``off``
drops that peer; a compile failure is recorded in the JSON, not raised).
``--jax-variants`` adds jaxdiv itself traced again with some of its tuning constants or
XLA compiler options changed, one more implementation per entry of :data:`JAX_VARIANTS`
(``direct_conv``: XLA's direct 3 x 3 convolutions instead of Winograd and the
small-output patch products; ``direct_strided``: the same for the strided ones alone;
``vmapped_heads``: the blocked attention's (batch, head) pairs vmapped instead of looped;
``batched_winograd``: Winograd's 16 products always as one batched product;
``no_ynn``: compiled with the XLA option ``xla_cpu_experimental_ynn_fusion_type=""``, i.e.
without YNNPACK's fusions; ``ynn_dot_only`` / ``ynn_no_dot``: YNNPACK for the product
fusions alone / for the elementwise and reduction fusions alone;
``vector512``: XLA's own loops at 512-bit vectors (``xla_cpu_prefer_vector_width=512``);
``xla_attention``: :func:`jax.nn.dot_product_attention` for every attention);
``--direct-conv-peer`` is ``--jax-variants direct_conv``. Writes
``results/sd_step.json`` (one row per config, from :func:`collect_rows`). The full 50-step
DDIM + CFG generation is ``benchmarks.sd_generate``; its 2 prompts run the UNet at CFG
batch 4 (``--batch 4`` here), twice this script's default batch.
"""

from __future__ import annotations

import argparse
import functools
import platform
import resource
import time
import traceback
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import (
    MALLOC_CHOICES,
    environment,
    interleaved,
    module_constants,
    pin_one_core,
    ready,
    round_ratio_range,
    use_malloc,
)
from jaxdiv.models import convolution, layers
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

#: ``--jax-variants``: name -> (what changes, the module constants set while tracing it,
#: XLA compiler options of its ``jax.jit``)
JAX_VARIANTS: dict[str, tuple[str, tuple[tuple[Any, str, Any], ...], dict[str, str]]] = {
    "direct_conv": (
        "3 x 3 convolutions by XLA's direct convolution (Winograd and patch products off)",
        (
            (convolution, "WINOGRAD_MIN_TILES", float("inf")),
            (convolution, "SMALL_OUTPUT_TILES", 0),
            (convolution, "SMALL_STRIDED_OUTPUT_TILES", 0),
        ),
        {},
    ),
    "direct_strided": (
        "the strided (downsampling) 3 x 3 convolutions by XLA's direct convolution, never "
        "as a product over gathered patches",
        ((convolution, "SMALL_STRIDED_OUTPUT_TILES", 0),),
        {},
    ),
    "vmapped_heads": (
        "blocked attention with the (batch, head) pairs vmapped instead of looped",
        ((layers, "BLOCKED_LOOP_HEADS", False),),
        {},
    ),
    "batched_winograd": (
        "Winograd's 16 products as one batched product everywhere (never 16 2-D products)",
        ((convolution, "WINOGRAD_UNROLL_MIN_TILES", float("inf")),),
        {},
    ),
    "no_ynn": (
        "XLA:CPU without YNNPACK fusions (products and the elementwise work fused with them by "
        "XLA's own emitters and library calls)",
        (),
        {"xla_cpu_experimental_ynn_fusion_type": ""},
    ),
    # compiler_options take the enum's proto names (XLA_FLAGS takes ``dot``, ``eltwise``)
    "ynn_dot_only": (
        "XLA:CPU with YNNPACK fusing the products alone (elementwise and reductions by XLA)",
        (),
        {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"},
    ),
    "ynn_no_dot": (
        "XLA:CPU with YNNPACK fusing elementwise work and reductions alone (products by XLA)",
        (),
        {"xla_cpu_experimental_ynn_fusion_type":
             "LIBRARY_FUSION_TYPE_ELTWISE,LIBRARY_FUSION_TYPE_REDUCE"},
    ),
    "vector512": (
        "XLA:CPU's own loops at 512-bit vectors (xla_cpu_prefer_vector_width=512; its default "
        "is 256 bits on these AVX-512 hosts)",
        (),
        {"xla_cpu_prefer_vector_width": 512},
    ),
    "xla_attention": (
        "jax.nn.dot_product_attention for every attention (blocked attention off)",
        ((layers, "BLOCKED_MIN_LOGITS", float("inf")),),
        {},
    ),
}


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


def compiled_peer(torch_model, mode: str, args: tuple) -> tuple[Any, dict[str, Any]]:
    """``torch.compile`` of the diffusers UNet (``fullgraph=True, dynamic=False``), compiled
    and checked by one call on ``args``. Returns ``(callable or None, record)``; a failure
    is recorded (error and traceback tail) instead of raised, so the eager rows still run."""
    import torch

    record: dict[str, Any] = {"mode": mode, "what": "torch.compile(UNet2DConditionModel, "
                              "fullgraph=True, dynamic=False), inductor on CPU"}  # fmt: skip
    if mode == "off":
        return None, record | {"status": "skipped (--torch-compile off)"}
    try:
        compiled = torch.compile(torch_model, mode=mode, fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = compiled(*args).sample.numpy()
        record.update(status="ok", compile_s=time.perf_counter() - t0)
        return (lambda: compiled(*args)), record | {"_out": out}
    except Exception as e:  # noqa: BLE001 -- recorded in the JSON instead of a number
        return None, record | {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}"[:2000],
            "traceback_tail": traceback.format_exc()[-2000:],
        }


def measure_denoiser_step(
    name: str, *, latent: int, batch: int, repeats: int, seed: int = 0,
    torch_compile: str = "default", variants: tuple[str, ...] = (),
) -> dict[str, Any]:  # fmt: skip
    """Time one UNet forward (eps prediction) in diffusers (eager), diffusers under
    ``torch.compile`` and jaxdiv (jitted), alternating A B C over the rounds.

    Args:
        name: key of :data:`CONFIGS`.
        latent: latent height = width.
        batch: batch size (2 = one CFG pair).
        repeats: interleaved rounds after one warm-up call each (median [min-max]).
        seed: weight and input seed.
        torch_compile: ``torch.compile`` mode of the third peer, or ``"off"``.
        variants: keys of :data:`JAX_VARIANTS`: also time jaxdiv traced with those
            constants, each as ``jax_variants[name]`` of the row (and ``jax_<name>`` in
            ``cores_used`` / ``call_usage``).

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
    run_compiled, compiled = compiled_peer(torch_model, torch_compile, (xt, tt, ct))
    fns = {
        "jax": lambda: step(state, xj, tj, cj).block_until_ready(),
        "torch": lambda: torch_model(xt, tt, ct),
    }
    if run_compiled is not None:
        fns["torch_compile"] = run_compiled
        compiled["max_abs_diff_to_eager"] = float(np.abs(compiled.pop("_out") - out_torch).max())
    jax_variants: dict[str, dict[str, Any]] = {}
    for variant in variants:
        description, settings, options = JAX_VARIANTS[variant]
        # a new function object: jit's trace cache is keyed on it, so this traces again
        step_variant = jax.jit(lambda *args: step.__wrapped__(*args), compiler_options=options)
        with module_constants(settings):
            out_variant = step_variant(state, xj, tj, cj).block_until_ready()
        fns[f"jax_{variant}"] = functools.partial(ready, step_variant, state, xj, tj, cj)
        jax_variants[variant] = {
            "description": description,
            "settings": {
                f"{module.__name__}.{attr}": _json_number(value) for module, attr, value in settings
            },  # fmt: skip
            "compiler_options": options,
            "max_abs_diff_to_jax": float(np.abs(out_variant - out_jax).max()),
            "max_abs_diff_to_torch": float(np.abs(np.asarray(out_variant) - out_torch).max()),
        }
    with torch.no_grad():
        # A B C A B C: every implementation sees the same machine load
        timed = interleaved(fns, repeats)
    jax_s, torch_s = timed["jax"]["median_s"], timed["torch"]["median_s"]
    with torch.no_grad():
        usage = {name: call_usage(fn) for name, fn in fns.items()}

    def peer_summary(key: str, ratio_name: str) -> dict[str, Any]:
        t = timed[key]
        return {"median_s": t["median_s"], "min_max_s": [t["min_s"], t["max_s"]],
                "all_s": t["runs_s"], ratio_name: t["median_s"] / jax_s,
                "per_round_ratio_min_max": round_ratio_range(timed, key, "jax")}  # fmt: skip

    for variant in variants:
        jax_variants[variant].update(peer_summary(f"jax_{variant}", "ratio_variant_over_jax"))
    if run_compiled is not None:
        compiled.update(peer_summary("torch_compile", "ratio_torch_compile_over_jax"))

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
        per_round_ratio_min_max=round_ratio_range(timed, "torch", "jax"),
        max_abs_diff=float(np.abs(np.asarray(out_jax) - out_torch).max()),
        torch_compile=compiled,
        jax_variants=jax_variants,
        cores_used={name: u["cores_used"] for name, u in usage.items()},
        call_usage=usage,
    )


def _json_number(value):
    return str(value) if value in (float("inf"), float("-inf")) else value


def call_usage(fn) -> dict[str, float]:
    """What one call of ``fn`` cost the process: ``cores_used`` (CPU time over wall time:
    how many cores it kept busy), ``system_s`` (CPU seconds in the kernel) and
    ``minor_faults`` (pages mapped on first touch; XLA:CPU's fresh buffers take them).

    >>> sorted(call_usage(lambda: bytearray(1 << 20)))
    ['cores_used', 'minor_faults', 'system_s']
    """
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    r1, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - t0
    return {
        "cores_used": (r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime) / wall,
        "system_s": r1.ru_stime - r0.ru_stime,
        "minor_faults": r1.ru_minflt - r0.ru_minflt,
    }


def collect_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """All measurements of this benchmark, one dict per row (extend here for new rows)."""
    rows = []
    for name in args.configs.split(","):
        if name not in CONFIGS:
            raise ValueError(f"--configs entries must be in {sorted(CONFIGS)}, got {name!r}")
        row = measure_denoiser_step(
            name, latent=args.latent, batch=args.batch, repeats=args.repeats,
            torch_compile=args.torch_compile, variants=tuple(args.jax_variants),
        )  # fmt: skip
        print(
            f"{name:>5}  {row['params'] / 1e6:7.1f}M params  latent {args.latent}x{args.latent} "
            f"batch {args.batch}:  jaxdiv {row['jax_s'] * 1e3:9.1f} ms  "
            f"(compile {row['jax_compile_s']:.1f} s)  diffusers {row['torch_s'] * 1e3:9.1f} ms  "
            f"ratio torch/jax {row['ratio_torch_over_jax']:.2f}  "
            f"max|diff| {row['max_abs_diff']:.1e}  cores used "
            + ", ".join(f"{k} {v:.2f}" for k, v in row["cores_used"].items())
            + "  minor page faults per call "
            + ", ".join(f"{k} {u['minor_faults']}" for k, u in row["call_usage"].items()),
            flush=True,
        )
        tc = row["torch_compile"]
        if tc["status"] == "ok":
            print(f"       torch.compile ({tc['mode']}, compile {tc['compile_s']:.0f} s) "
                  f"{tc['median_s'] * 1e3:9.1f} ms  ratio compile/jax "
                  f"{tc['ratio_torch_compile_over_jax']:.2f}", flush=True)  # fmt: skip
        else:
            print(f"       torch.compile: {tc['status']}", flush=True)
        for variant, v in row["jax_variants"].items():
            print(
                f"       jaxdiv {variant} ({v['description']}) {v['median_s'] * 1e3:9.1f} ms  "
                f"ratio {variant}/jaxdiv {v['ratio_variant_over_jax']:.2f}  "
                f"max|diff| to diffusers {v['max_abs_diff_to_torch']:.1e}",
                flush=True,
            )
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run :func:`collect_rows`, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default="tiny,sd21", help="comma-separated CONFIGS keys")
    parser.add_argument("--latent", type=int, default=32, help="latent height = width")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--torch-compile",
        default="default",
        choices=("default", "max-autotune", "max-autotune-no-cudagraphs", "off"),
        help="torch.compile mode of the third peer (off: eager diffusers only)",
    )
    parser.add_argument(
        "--jax-variants",
        default="",
        help=f"comma-separated jaxdiv variants to time too, of {sorted(JAX_VARIANTS)}",
    )
    parser.add_argument(
        "--direct-conv-peer",
        action="store_true",
        help="the same as adding direct_conv to --jax-variants",
    )
    parser.add_argument("--out", default="results/sd_step.json")
    parser.add_argument(
        "--threads",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: one core for every implementation; 0: library defaults",
    )
    parser.add_argument(
        "--malloc",
        choices=MALLOC_CHOICES,
        default="default",
        help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY",
    )
    args = parser.parse_args(argv)
    args.jax_variants = [v for v in args.jax_variants.split(",") if v]
    unknown = sorted(set(args.jax_variants) - set(JAX_VARIANTS))
    if unknown:
        raise ValueError(f"--jax-variants entries must be in {sorted(JAX_VARIANTS)}, got {unknown}")
    if args.direct_conv_peer and "direct_conv" not in args.jax_variants:
        args.jax_variants.append("direct_conv")
    use_malloc(args.malloc, argv, "benchmarks.sd_step")
    import diffusers
    import torch

    if args.threads == 1:
        pin_one_core()  # before jax / torch start their thread pools
        torch.set_num_threads(1)
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
    from experiments.common import write_json

    write_json(out, dict(meta=meta, rows=rows))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
