"""Per-image overhead of each diversity method over the unguided (CFG-only) run, on CPU.

    python -m benchmarks.sd_methods [--config sd21-small] [--steps 10] [--batch 4] [--rounds 3]
                                    [--gass-iters 60] [--jax-conv-vjp] [--malloc reuse]
                                    [--methods spell,particle,cads,interval,gass,tpso]

A random pipeline of :data:`benchmarks.sd_generate.CONFIGS` (default ``sd21-small``: SD
2.1's architecture at reduced width, 128x128 px) plus a tiny CLIP vision tower for GASS is
saved to a temp folder and loaded. Every method samples the same batch from the same noise
with DDIM (clean endpoint) and CFG 7.5, each as one compiled program (compile time
reported apart); the methods alternate within every round (A B C ... A B C ...) and each
is reported as median [min-max] seconds per image and as a ratio to the unguided median
of the same rounds. TPSO's prompt optimisation (run once per prompt, before sampling) is
timed as its own row. ``--methods`` times a subset (the CFG-only run always runs: it is
the ratios' base). Results go to ``results/sd_methods.json``.

``--jax-conv-vjp`` adds both GASS programs compiled ahead of time twice, with
:func:`jaxdiv.models.convolution.conv_general_dilated`'s convolution VJPs and with JAX's own
(its transpose rule for XLA's convolutions, autodiff of the Winograd transforms),
and records whether each pair compiled to the same optimised HLO (source locations aside):
a pair that did tells how far two copies of one program can measure apart.

The CLIP vision tower is tiny (16x16 input), so GASS's figures are a lower bound: the VAE
decode (and, in pixel mode, the VAE encode) inside every Adam iteration dominates there.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import numpy as np

from benchmarks.timing import MALLOC_CHOICES, use_malloc

PROMPT = "a photo of a cat"
CFG = 7.5
# what --methods selects from; the unguided CFG run is always timed (the ratios' base)
METHODS = ("spell", "particle", "cads", "interval", "gass", "tpso")
TPSO_RATIO = 0.4  # the paper's default


def tpso_ratio(steps: int) -> float:
    """TPSO's default ratio, raised to ``1 / steps`` where ``int(0.4 steps) = 0`` would
    schedule no step (short smoke runs; ``jaxdiv.sample`` refuses a ratio that never acts).

    >>> tpso_ratio(50), tpso_ratio(2)
    (0.4, 0.5)
    """
    return TPSO_RATIO if int(TPSO_RATIO * steps) else 1.0 / steps


def build_methods(pipe, noise, steps, gass_iters):
    """``{name: guidance}`` at each method's defaults (GASS: every step active, at most
    ``gass_iters`` Adam iterations per step)."""
    import jax
    import jax.numpy as jnp

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.pipelines.generation import gass_encoder, gass_pixel_space

    null = pipe.null_cond
    cond = pipe.encode_prompt(pipe.tokenize([PROMPT] * noise.shape[0]))
    base = jaxdiv.sample(pipe.ddim(steps, clean_endpoint=True), pipe.denoiser, noise,
                         key=jax.random.key(0), cond=cond,
                         guidance=guidance.cfg(CFG, null_cond=null))  # fmt: skip
    flat = np.asarray(base.x0).reshape(len(noise), -1)
    d = np.linalg.norm(flat[:, None] - flat[None], axis=-1)[np.triu_indices(len(noise), 1)]
    r = float(np.median(d))
    text = jax.random.normal(jax.random.key(7), (pipe.encode_image(
        jnp.zeros((1, 3, 16, 16))).shape[-1],))  # fmt: skip
    text = text / jnp.linalg.norm(text)
    cfg = guidance.cfg(CFG, null_cond=null)
    return cond, r, {
        "unguided (CFG)": cfg,
        "spell": guidance.chain(cfg, guidance.spell(r, intra_batch=True, overcompensation=1.6)),
        "particle": guidance.chain(cfg, guidance.particle(1.0)),
        "cads": guidance.chain(guidance.cads(), cfg),
        "interval": guidance.interval(CFG, 0.28, 5.42, null),
        "gass (latent write-back)": guidance.chain(
            cfg, guidance.gass(gass_encoder(pipe), text, steps="all", max_iters=gass_iters)),
        "gass (pixel write-back)": guidance.chain(
            cfg, guidance.gass(pipe.encode_image, text, lr=8e-3, steps="all",
                               max_iters=gass_iters, write_space=gass_pixel_space(pipe))),
    }  # fmt: skip


def _with_jax_conv_vjp(compile_fn):
    """``compile_fn()`` traced and compiled with JAX's own VJP for the ports' convolutions
    instead of :func:`jaxdiv.models.convolution.conv_general_dilated`'s: JAX's transpose
    rule on XLA's convolutions (the layout XLA:CPU runs as a loop nest inside loop bodies)
    and autodiff of the Winograd transforms
    (:data:`~jaxdiv.models.convolution.WINOGRAD_CUSTOM_INPUT_GRAD` off): the "before" of
    both fixes, for comparison. JAX's trace caches are cleared on both sides so that
    neither program reuses the other's trace."""
    import jax

    from benchmarks.timing import module_constants
    from jaxdiv.models import convolution

    jax.clear_caches()
    try:
        with module_constants([(convolution, "_conv_library_layout_grad", convolution._lax_conv),
                               (convolution, "WINOGRAD_CUSTOM_INPUT_GRAD", False)]):
            return compile_fn()
    finally:
        jax.clear_caches()


def _hlo_without_locations(compiled) -> str:
    """The optimised HLO of a compiled program without its source locations (which differ
    between two traces of the same code), to tell whether two compilations are the same
    program."""
    import re

    text = re.sub(r", metadata=\{[^}]*\}", "", compiled.as_text())
    text = re.sub(r"stack_frame_id=\d+", "", text)
    return "\n".join(line for line in text.splitlines() if not re.match(r"^\d+ [{\"]", line))


def bench(config, steps, batch, rounds, gass_iters, folder, jax_conv_vjp=False,
          methods_run=METHODS):  # fmt: skip
    import jax

    import jaxdiv
    from benchmarks.sd_generate import CONFIGS
    from benchmarks.timing import interleaved
    from jaxdiv.pipelines import stable_diffusion as sd
    from jaxdiv.pipelines.tpso import tpso_conditions, tpso_guidance
    from jaxdiv.testing import save_random_pipeline

    save_random_pipeline(folder, seed=0, image_encoder=True, **CONFIGS[config])
    pipe = sd.load(folder)
    noise = jax.random.normal(jax.random.key(1), pipe.noise_shape(batch))
    cond, r, methods = build_methods(pipe, noise, steps, gass_iters)
    methods = {name: g for name, g in methods.items()
               if name == "unguided (CFG)" or name.split()[0] in methods_run}  # fmt: skip
    sampler = pipe.ddim(steps, clean_endpoint=True)

    width = pipe.token_embedding.shape[1]
    kernel = jax.random.normal(jax.random.key(5), (width, 64)) / width**0.5

    def optimise():
        c = tpso_conditions(pipe, [PROMPT], batch, jax.random.key(0), projection=kernel)
        return c.optimized.block_until_ready(), c

    tpso_c, tpso_compile_s = None, None
    if "tpso" in methods_run:
        t0 = time.perf_counter()
        _, tpso_c = optimise()
        tpso_compile_s = time.perf_counter() - t0
        methods["tpso (sampling)"] = tpso_guidance(tpso_c, CFG, ratio=tpso_ratio(steps))

    fns, compile_s, same_hlo = {}, {}, {}
    for name, g in methods.items():
        c = tpso_c.cond if name.startswith("tpso") else cond

        def run(g=g, c=c):
            out = jaxdiv.sample(sampler, pipe.denoiser, noise, key=jax.random.key(2), cond=c,
                                guidance=g)  # fmt: skip
            return out.x0.block_until_ready()

        t0 = time.perf_counter()
        run()
        compile_s[name] = time.perf_counter() - t0
        fns[name] = run
    if jax_conv_vjp:  # both sides compiled ahead of time, outside jaxdiv.sample's dispatch
        for name in ("gass (latent write-back)", "gass (pixel write-back)"):
            program = jax.jit(lambda noise, c, g=methods[name]: jaxdiv.sample(
                sampler, pipe.denoiser, noise, key=jax.random.key(2), cond=c, guidance=g).x0)
            hlo = []
            for vjp, build in (("jaxdiv", lambda f: f()), ("JAX's", _with_jax_conv_vjp)):
                row = f"{name}, {vjp} conv VJP, AOT"
                t0 = time.perf_counter()
                compiled = build(lambda p=program: p.lower(noise, cond).compile())
                compile_s[row] = time.perf_counter() - t0
                fns[row] = lambda compiled=compiled: compiled(noise, cond).block_until_ready()
                hlo.append(_hlo_without_locations(compiled))
            same_hlo[name] = hlo[0] == hlo[1]
    if tpso_c is not None:
        fns["tpso (optimisation, once per prompt)"] = optimise
    timed = interleaved(fns, rounds)
    base = timed["unguided (CFG)"]["median_s"]
    rows = []
    for name, t in timed.items():
        rows.append({
            "method": name,
            "per_image_s": t["median_s"] / batch,
            "per_image_min_max_s": [t["min_s"] / batch, t["max_s"] / batch],
            "ratio_to_unguided": t["median_s"] / base,
            "first_call_s": compile_s.get(name, tpso_compile_s),
            "runs_s": t["runs_s"],
        })  # fmt: skip
    extra = {"methods": list(methods_run), "spell_radius": r,
             "latent_shape": list(noise.shape[1:])}  # fmt: skip
    if tpso_c is not None:
        extra["tpso_optimizer_steps"] = int(tpso_c.result.steps)
        extra["tpso_ratio"] = tpso_ratio(steps)
    if jax_conv_vjp:
        extra["same_optimized_hlo_with_either_conv_vjp"] = same_hlo
    return rows, extra


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.sd_methods")
    p.add_argument("--config", default="sd21-small")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gass-iters", type=int, default=60,
                   help="GASS's max Adam iterations per step (paper: 60; each runs the VAE "
                   "decoder and CLIP forward and backward)")
    p.add_argument("--jax-conv-vjp", action="store_true",
                   help="also time both GASS methods as ahead-of-time compiled programs, "
                   "with convolution.conv_general_dilated's convolution VJP and with JAX's own "
                   "(before it), interleaved with the rest")
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)} (CFG alone always runs)")
    p.add_argument("--malloc", choices=MALLOC_CHOICES, default="default",
                   help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY (GASS's "
                   "VAE gradients page-fault fresh buffers under glibc's default)")
    p.add_argument("--out", default="results/sd_methods.json")
    args = p.parse_args(argv)
    methods_run = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = sorted(set(methods_run) - set(METHODS))
    if unknown or not methods_run:
        raise ValueError(f"--methods entries must be in {list(METHODS)}, got {args.methods!r}")
    if args.jax_conv_vjp and "gass" not in methods_run:
        raise ValueError("--jax-conv-vjp times the GASS programs: --methods must include gass, "
                         f"got {args.methods!r}")

    use_malloc(args.malloc, argv, "benchmarks.sd_methods")
    import torch

    from benchmarks.timing import environment
    from experiments.common import write_json

    with tempfile.TemporaryDirectory() as folder:
        rows, extra = bench(args.config, args.steps, args.batch, args.rounds, args.gass_iters,
                            folder, jax_conv_vjp=args.jax_conv_vjp, methods_run=methods_run)
    print("| method | s / image, median [min-max] | x unguided |")
    print("|---|---|---|")
    for r in rows:
        lo, hi = r["per_image_min_max_s"]
        print(f"| {r['method']} | {r['per_image_s']:.3f} [{lo:.3f}-{hi:.3f}] | "
              f"{r['ratio_to_unguided']:.2f} |")  # fmt: skip
    for name, same in extra.get("same_optimized_hlo_with_either_conv_vjp", {}).items():
        print(f"{name}: {'the same' if same else 'a different'} optimised program with "
              "JAX's convolution VJP")  # fmt: skip
    result = {
        "benchmark": "per-image cost of each method vs CFG only (DDIM, clean endpoint)",
        "command": " ".join(["python -m benchmarks.sd_methods"] + list(argv or sys.argv[1:])),
        "config": args.config,
        "steps": args.steps,
        "batch": args.batch,
        "rounds": args.rounds,
        "gass_max_iters": args.gass_iters,
        "jax_conv_vjp_rows": args.jax_conv_vjp,
        "malloc": args.malloc,
        "timing": "interleaved A B C ... per round, median [min-max]",
        **environment(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        **extra,
        "rows": rows,
    }
    write_json(args.out, result)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
