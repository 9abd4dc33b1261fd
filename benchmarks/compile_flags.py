"""XLA:CPU compile time against run time, per codegen flag set: what the test suite's flags buy.

    JAX_PLATFORMS=cpu python -m benchmarks.compile_flags [--rounds 3]
        [--flag-sets default,tests,...] [--workloads toy,sd_tiny,unet]

On CPU most of a short program's first call is XLA compilation: of ``tests/test_dpmpp_sde.py``'s
208 s, 176 s were spent in 557 XLA compilations (``JAX_LOG_COMPILES=1``, one run). Two flags
trade machine-code quality for compile speed; this benchmark measures both sides, on:

* ``toy``: nine toy sampler programs (a 2-D Gaussian mixture's exact denoiser, x64, batch
  256: ``dpmpp_3m``, ``dpmpp_2m_sde`` and ``ddim`` at 32, 64 and 128 steps; ``--smoke``:
  32 steps only), each a distinct ``jaxdiv.sample`` program: the summed first calls
  (trace + compile + run) and the summed second calls (run only);
* ``sd_tiny``: the tiny random SD pipeline of the tests (:func:`jaxdiv.testing.example_pipeline`):
  4-step DDIM + CFG on a batch of 2, first and second call;
* ``unet``: one SD2.1-sized UNet forward (random weights, latent 32, CFG batch 2): first
  call (also in its parts: trace and lower, compile, first run), then the median of 3
  calls: the run-time cost of the flags on a real-sized model.

Flag sets (``--flag-sets``, comma-separated names):

* ``default``: XLA's defaults.
* ``tests``: :data:`TEST_SUITE_FLAGS`, what ``conftest.py`` sets for ``make test``
  (the fusion emitters off and LLVM at -O0).
* ``exact_tests``: :data:`EXACT_CODEGEN_FLAGS`, those of ``make test``'s second pass (the
  tests marked ``exact_codegen``): the fusion emitters off and LLVM at -O1.
* ``no_fusion_emitters``: ``--xla_cpu_use_fusion_emitters=false`` alone.
* ``llvm_o1``: ``--xla_backend_optimization_level=1`` alone.
* ``tests_split_parts``: the suite's flags before 2026-12-07, :data:`TEST_SUITE_FLAGS`
  without ``--xla_cpu_parallel_codegen_split_count=1`` (XLA splits each program's LLVM
  module into up to 32 parts, compiled on its thread pool and loaded as separate objects).

XLA reads its flags once per process, so every (round, flag set) runs in a fresh child
process pinned to one core (:func:`benchmarks.timing.pin_one_core`); the flag sets
alternate within each round (A B C A B C ...), so each sees the machine's load of the same
moment, and each round's ratio to ``default`` is recorded beside the medians. The children
compile nothing in common (no persistent compilation cache). Writes
``results/benchmarks/compile_flags.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

# One LLVM module per program instead of up to 32 parts: the parts buy parallel codegen
# that two pytest workers on two cores cannot use, and each part costs its own codegen
# set-up and its own memory mappings (docs/guide/benchmarks.md, "Compile time").
_ONE_PART = "--xla_cpu_parallel_codegen_split_count=1"

#: XLA:CPU flags of the test sessions (``conftest.py``): LLVM at -O0 instead of the default
#: -O2, the legacy elemental emitters instead of the MLIR fusion emitters, and each program
#: compiled as one LLVM module. At -O0 LLVM forms no fused multiply-adds, which XLA's
#: default codegen does.
TEST_SUITE_FLAGS = (
    f"--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0 {_ONE_PART}"
)

#: XLA:CPU flags of the tests marked ``exact_codegen`` (which compare two compiled programs
#: bitwise or within a few ulps): LLVM at -O1, which contracts ``a * b + c`` into fused
#: multiply-adds as the default codegen does.
EXACT_CODEGEN_FLAGS = (
    f"--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=1 {_ONE_PART}"
)

FLAG_SETS = {
    "default": "",
    "tests": TEST_SUITE_FLAGS,
    "exact_tests": EXACT_CODEGEN_FLAGS,
    "no_fusion_emitters": "--xla_cpu_use_fusion_emitters=false",
    "llvm_o1": "--xla_backend_optimization_level=1",
    "tests_split_parts": TEST_SUITE_FLAGS.replace(f" {_ONE_PART}", ""),
}
WORKLOADS = ("toy", "sd_tiny", "unet")
_SMOKE_UNET = "tiny"  # --smoke: the parity tests' UNet instead of the SD2.1-sized one
_STEP_COUNTS, _SMOKE_STEP_COUNTS = (32, 64, 128), (32,)  # --smoke: three toy programs


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def toy(step_counts=_STEP_COUNTS) -> dict:
    """First and second calls of distinct toy sampler programs (three samplers at each of
    ``step_counts``: nine by default), summed."""
    import jax
    import jax.numpy as jnp

    import jaxdiv
    import toy as toys
    from jaxdiv import samplers, schedules

    with jax.enable_x64(True):
        gm = toys.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), jnp.array([0.2, 0.1]))
        sch = schedules.edm()
        den = gm.denoiser(sch)
        noise = jax.random.normal(jax.random.key(3), (256, 2), jnp.float64)
        first = second = 0.0
        for n in step_counts:
            for make in (samplers.dpmpp_3m, samplers.dpmpp_2m_sde, samplers.ddim):
                s = make(sch, n)

                def call(s=s):
                    jaxdiv.sample(s, den, noise, key=jax.random.key(0)).x0.block_until_ready()

                first += _timed(call)
                second += _timed(call)
    return {"programs": 3 * len(step_counts), "first_call_s": first, "second_call_s": second}


def sd_tiny() -> dict:
    """The tiny random SD pipeline: 4-step DDIM + CFG, batch 2, first and second call."""
    import jax

    import jaxdiv
    from jaxdiv import guidance
    from jaxdiv.testing import example_pipeline

    pipe = example_pipeline()
    cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"]))
    noise = jax.random.normal(jax.random.key(0), pipe.noise_shape(2))
    g = guidance.cfg(5.0, null_cond=pipe.null_cond)
    s = pipe.ddim(4)

    def call():
        jaxdiv.sample(s, pipe.denoiser, noise, key=jax.random.key(1), cond=cond,
                      guidance=g).x0.block_until_ready()  # fmt: skip

    return {"first_call_s": _timed(call), "second_call_s": _timed(call)}


def unet(config: str = "sd21") -> dict:
    """One UNet forward at latent 32, CFG batch 2 (random weights): first call and the
    median of 3 calls after it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from benchmarks.sd_step import CONFIGS, TEXT_TOKENS, build_pair

    _, model = build_pair(CONFIGS[config])
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 4, 32, 32)), jnp.float32)  # NCHW, as diffusers
    t = jnp.full((2,), 500, jnp.int32)
    width = CONFIGS[config]["cross_attention_dim"]
    ctx = jnp.asarray(rng.standard_normal((2, TEXT_TOKENS, width)), jnp.float32)
    step = jax.jit(lambda st, x, t, c: nnx.merge(graphdef, st)(x, t, c))
    # the first call in its parts: trace and lower, compile (or load from a persistent
    # cache), and the first run, which on XLA:CPU costs more than the runs after it
    t0 = time.perf_counter()
    lowered = step.lower(state, x, t, ctx)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()

    def call():
        compiled(state, x, t, ctx).block_until_ready()

    first_run = _timed(call)
    runs = [_timed(call) for _ in range(3)]
    return {"config": config, "first_call_s": t2 - t0 + first_run, "lower_s": t1 - t0,
            "compile_s": t2 - t1, "first_run_s": first_run, "run_s": statistics.median(runs),
            "runs_s": runs}  # fmt: skip


def _child(workloads: list[str], smoke: bool) -> None:
    from benchmarks.timing import environment

    out = {}
    for name in workloads:
        if name == "unet":
            out[name] = unet(_SMOKE_UNET if smoke else "sd21")
        elif name == "toy":
            out[name] = toy(_SMOKE_STEP_COUNTS if smoke else _STEP_COUNTS)
        else:
            out[name] = sd_tiny()
    print(json.dumps({"workloads": out, "environment": environment()}))


def _summarise(runs: dict[str, list[dict]], names: list[str], workloads: list[str]) -> dict:
    """Median [min-max] per flag set and workload; the ratio to ``default`` per round."""
    keys = {"toy": ("first_call_s", "second_call_s"), "sd_tiny": ("first_call_s", "second_call_s"),
            "unet": ("first_call_s", "run_s")}  # fmt: skip
    table: dict = {}
    for w in workloads:
        table[w] = {}
        for name in names:
            ok = [r["workloads"][w] for r in runs[name] if "workloads" in r]
            row: dict = {}
            for k in keys[w]:
                vals = [o[k] for o in ok]
                if not vals:
                    continue
                row[k] = {"median_s": statistics.median(vals), "min_s": min(vals),
                          "max_s": max(vals), "runs_s": vals}  # fmt: skip
                if name != "default" and "default" in names:
                    base = [r["workloads"][w][k] if "workloads" in r else None
                            for r in runs["default"]]  # fmt: skip
                    this = [r["workloads"][w][k] if "workloads" in r else None for r in runs[name]]
                    ratios = [b / t for b, t in zip(base, this) if b and t]
                    if ratios:
                        row[k]["default_over_this_per_round"] = [min(ratios), max(ratios)]
                        row[k]["default_over_this"] = statistics.median(ratios)
            table[w][name] = row
    return table


def children_environment(children: list[dict]) -> dict:
    """For :mod:`benchmarks.summary`: the first child process's date, versions and CPU, and
    the largest peak RSS of them all (``{}`` without children); each child's own
    environment (its XLA_FLAGS among them) stays with its run.

    >>> children_environment([{"date": "d", "peak_rss_mb": 1.0}, {"date": "e", "peak_rss_mb": 3.0}])
    {'date': 'd', 'peak_rss_mb': 3.0}
    """
    if not children:
        return {}
    return children[0] | {"peak_rss_mb": max(c["peak_rss_mb"] for c in children)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_flags",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--flag-sets",
                        default="default,tests,exact_tests,no_fusion_emitters,llvm_o1")
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--smoke", action="store_true",
                        help="the tiny UNet and three toy programs (tests)")
    parser.add_argument("--out", default="results/benchmarks/compile_flags.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    bad = sorted(set(workloads) - set(WORKLOADS))
    if bad or not workloads:
        parser.error(f"--workloads must name some of {list(WORKLOADS)}, got {bad or workloads}")
    if args.child:
        from benchmarks.timing import pin_one_core

        pin_one_core()  # before JAX starts its thread pools
        _child(workloads, args.smoke)
        return {}
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    names = [n for n in args.flag_sets.split(",") if n]
    unknown = sorted(set(names) - set(FLAG_SETS))
    if unknown or not names:
        parser.error(f"--flag-sets must name some of {sorted(FLAG_SETS)}, got {unknown or names}")
    from experiments.common import write_json

    runs: dict[str, list[dict]] = {n: [] for n in names}
    cmd = [sys.executable, "-m", "benchmarks.compile_flags", "--child",
           "--workloads", ",".join(workloads)] + (["--smoke"] if args.smoke else [])  # fmt: skip
    for r in range(args.rounds):
        for name in names:
            env = dict(os.environ, XLA_FLAGS=FLAG_SETS[name],
                       JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))  # fmt: skip
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                runs[name].append({"status": "error", "stderr_tail": proc.stderr[-2000:]})
                print(f"round {r} {name}: error", flush=True)
                continue
            child = json.loads(proc.stdout.strip().splitlines()[-1])
            runs[name].append({"status": "ok", **child})
            print(f"round {r} {name:>20}: " + "  ".join(
                f"{w} " + " / ".join(f"{v:.2f}" for k, v in child["workloads"][w].items()
                                     if isinstance(v, float))
                for w in workloads), flush=True)  # fmt: skip
    environment = children_environment(
        [r["environment"] for rs in runs.values() for r in rs if "environment" in r])
    result = {
        "benchmark": "XLA:CPU compile and run time per codegen flag set, one fresh process "
                     "per round and flag set, pinned to one core, flag sets alternating",
        "command": " ".join(["python -m benchmarks.compile_flags"] + list(argv or sys.argv[1:])),
        "flag_sets": {n: FLAG_SETS[n] for n in names},
        "table": _summarise(runs, names, workloads),
        "environment": environment,
        "runs": runs,
    }  # fmt: skip
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
