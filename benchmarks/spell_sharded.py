"""SPELL's exact reference search with the shields split over devices: the cost per sampler
step against the unguided step and against the single-device exact search, for 10^4 ..
10^6 shields at d = 16 (a toy GMM) and d = 4096 (latents 4x32x32 through the UNet-sized
dummy of :mod:`benchmarks.spell`).

    python -m benchmarks.spell_sharded            # ~10 min on 2 CPU cores
    python -m benchmarks.spell_sharded --quick    # 10^4 shields, ~1 min

Per configuration, in one process and interleaved round by round (unguided, single-device
exact, sharded exact, unguided, ...): the time of one DDIM step, and the SPELL term alone
on the ``x0_hat`` of the unguided run's middle step (:func:`benchmarks.spell.time_terms`);
``overhead = term / unguided step``, ``overhead_end_to_end = step with / step without -
1``, medians with [min-max] over the rounds. Each row also records how far the sharded
run's samples are from the single-device run's (the same exact search up to float32
summation order) and the shield bytes each device holds.

On a CPU the devices are XLA host devices (``--xla_force_host_platform_device_count``, set
here to ``--devices`` unless ``XLA_FLAGS`` already sets it) sharing this machine's cores:
the split divides the memory per device, not the work per core, so the sharded search is
*not* expected to be faster here -- the row shows what the split costs on one host. On a
GPU machine the flag is ignored and the mesh spans the GPUs. A reference set above
``--max-gb`` (float32) is recorded as skipped with its size: 10^6 shields of d = 4096 are
16.4 GB, the ``spell_million`` section of :mod:`benchmarks.gpu_suite` on one GPU.

Writes ``results/benchmarks/spell_sharded.json`` (``--out``) with the environment (date,
versions, threads, devices, load).
"""

from __future__ import annotations

import os
import sys

# before JAX starts: the host device count is fixed when its CPU backend is created
_FLAG = "--xla_force_host_platform_device_count"


def _host_devices(argv) -> None:
    if "jax" in sys.modules or _FLAG in os.environ.get("XLA_FLAGS", ""):
        return
    n = "8"
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            n = argv[i + 1]
        elif a.startswith("--devices="):
            n = a.split("=", 1)[1]
    if n.isdigit() and int(n) >= 1:
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}={n}".strip()


if __name__ == "__main__":
    _host_devices(sys.argv[1:])

import argparse  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import jaxdiv  # noqa: E402
import toy  # noqa: E402
from benchmarks.spell import DenseDummy, time_terms  # noqa: E402
from benchmarks.timing import environment  # noqa: E402
from experiments.common import write_json  # noqa: E402
from jaxdiv import samplers, schedules  # noqa: E402
from jaxdiv.guidance.spell import spell  # noqa: E402
from jaxdiv.guidance.spell.radius_search import build_index  # noqa: E402
from jaxdiv.guidance.spell.sharded import build_sharded_index  # noqa: E402

# denoiser -> (latent shape, radius); the radii of benchmarks.spell
DENOISERS = {"toy": ((16,), 0.5), "unet_dummy": ((4, 32, 32), 20.0)}


def _denoiser(name, sch):
    if name == "toy":
        gm = toy.GaussianMixture(jax.random.normal(jax.random.key(0), (16, 16)) * 3,
                                 jnp.ones(16))  # fmt: skip
        return gm.denoiser(sch)
    return DenseDummy(DENOISERS[name][0], 4, jax.random.key(5))


def measure(name: str, k: int, batch: int, steps: int, rounds: int, mesh, block_size: int,
            budget_s: float = 30.0) -> dict:  # fmt: skip
    """One row: ``k`` random shields, the batch of ``name``'s denoiser, DDIM ``steps``.

    >>> mesh = jax.make_mesh((1,), ("shields",))
    >>> row = measure("toy", 300, 4, 2, 1, mesh, 64, budget_s=1.0)
    >>> row["max_abs_diff_vs_single"] < 1e-4, row["shield_bytes_per_device"] > 0
    (True, True)
    """
    shape, radius = DENOISERS[name]
    d = int(np.prod(shape))
    sch = schedules.vp_linear()
    smp = samplers.ddim(sch, steps)
    den = _denoiser(name, sch)
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((k, d), dtype=np.float32)
    t0 = time.perf_counter()
    sharded = build_sharded_index(ref, mesh, block_size=block_size)
    jax.block_until_ready(sharded.index)
    build_s = time.perf_counter() - t0
    # the same centre: both searches see the same stored (centred) rows
    single = build_index(ref, block_size, centre=np.asarray(sharded.index.centre))
    del ref
    noise = jax.random.normal(jax.random.key(1), (batch,) + shape)
    key = jax.random.key(0)
    terms = {label: spell(radius, reference=idx, intra_batch=False, block_size=block_size)
             for label, idx in (("single", single), ("sharded", sharded))}  # fmt: skip
    res = time_terms(smp, sch, den, noise, key, terms, rounds, budget_s=budget_s)
    outs = {label: np.asarray(jaxdiv.sample(smp, den, noise, key=key, guidance=g).x0)
            for label, g in terms.items()}  # fmt: skip
    base = res["step"]["without"]["median_s"]

    def rng_of(t):
        return [t["min_s"], t["max_s"]]

    row = {
        "denoiser": name, "d": d, "num_reference": k, "batch": batch, "radius": radius,
        "devices": int(mesh.devices.size), "block_size": block_size,
        "reference_gb_float32": k * d * 4 / 1e9,
        "shield_bytes_per_device": max(s.data.nbytes
                                       for s in sharded.index.points.addressable_shards),
        "sharded_index_build_s": build_s,
        "step_s_without": base, "step_s_without_min_max": rng_of(res["step"]["without"]),
        "max_abs_diff_vs_single": float(np.abs(outs["sharded"] - outs["single"]).max()),
        "first_call_s": res["first_call_s"],
    }  # fmt: skip
    for label in terms:
        step, alone = res["step"][label], res["alone"][label]
        row[label] = {
            "step_s_with": step["median_s"], "step_s_with_min_max": rng_of(step),
            "term_s": alone["median_s"], "term_s_min_max": rng_of(alone),
            "overhead": alone["median_s"] / base,
            "overhead_end_to_end": step["median_s"] / base - 1.0,
        }  # fmt: skip
    row["sharded_over_single_term"] = row["sharded"]["term_s"] / row["single"]["term_s"]
    return row


def _fmt(row) -> str:
    return (f"{row['denoiser']:10s} d={row['d']:5d} K={row['num_reference']:8d} "
            f"B={row['batch']:3d}  step {1e3 * row['step_s_without']:8.3f} ms  "
            f"overhead single {100 * row['single']['overhead']:8.1f}%  sharded "
            f"{100 * row['sharded']['overhead']:8.1f}%  (sharded/single term "
            f"{row['sharded_over_single_term']:.2f}x, |diff| "
            f"{row['max_abs_diff_vs_single']:.1e})")  # fmt: skip


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", type=int, default=8,
                   help="host devices on a CPU (read before JAX starts; default 8)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--batch", type=int, default=8, help="samples per batch (default 8)")
    p.add_argument("--block-size", type=int, default=4096,
                   help="shields per search block (default 4096)")
    p.add_argument("--max-gb", type=float, default=4.0,
                   help="skip reference sets above this size in float32 (default 4)")
    p.add_argument("--quick", action="store_true", help="10^4 shields only")
    p.add_argument("--out", default="results/benchmarks/spell_sharded.json")
    a = p.parse_args(argv)
    for flag in ("steps", "rounds", "batch", "block_size"):
        if getattr(a, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(a, flag)}")
    if not np.isfinite(a.max_gb) or a.max_gb <= 0:
        p.error(f"--max-gb must be a finite number > 0, got {a.max_gb}")
    mesh = jax.make_mesh((jax.device_count(),), ("shields",))
    refs = (10_000,) if a.quick else (10_000, 100_000, 1_000_000)
    rows, skipped = [], []
    for name, (shape, _) in DENOISERS.items():
        d = int(np.prod(shape))
        for k in refs:
            gb = k * d * 4 / 1e9
            if gb > a.max_gb:
                skipped.append({"denoiser": name, "d": d, "num_reference": k,
                                "reference_gb_float32": gb,
                                "reason": f"above --max-gb {a.max_gb}"})  # fmt: skip
                print(f"{name:10s} d={d:5d} K={k:8d}  skipped: {gb:.1f} GB > --max-gb", flush=True)
                continue
            rows.append(measure(name, k, a.batch, a.steps, a.rounds, mesh, a.block_size))
            print(_fmt(rows[-1]), flush=True)
    result = environment() | {
        "benchmark": "exact SPELL reference search, shields split over devices vs one device",
        "command": " ".join(["python -m benchmarks.spell_sharded",
                             *(sys.argv[1:] if argv is None else argv)]),  # fmt: skip
        "timing": "interleaved (without, single, sharded) per round, median [min-max]",
        "note": "host devices share the CPU cores: the split divides memory, not work",
        "steps": a.steps, "rounds": a.rounds, "rows": rows, "skipped": skipped,
    }  # fmt: skip
    write_json(a.out, result)
    print(f"wrote {a.out}", flush=True)
    return result


if __name__ == "__main__":
    main()
