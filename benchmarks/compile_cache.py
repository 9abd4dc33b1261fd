"""What the persistent compilation cache saves: a fresh process's first calls, cold and warm.

    JAX_PLATFORMS=cpu python -m benchmarks.compile_cache [--rounds 3]
        [--workloads demo,sd_tiny,unet] [--smoke]

:mod:`jaxdiv.compilation_cache` keeps compiled XLA programs on disk for the next process
(the ``jaxdiv`` console command turns it on by itself). Every round runs each workload in
two fresh processes, alternating: **cold**, with an empty cache folder (it compiles and
writes every program), and **warm**, with the folder the workload's first cold run filled
(it loads them). Each process is pinned to one core and runs under
:data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` (what the console command does).

* ``demo``: ``jaxdiv demo --batches 2 --batch 16 --no-figure --quiet`` through the console
  entry point (``JAXDIV_COMPILATION_CACHE`` names the folder): the wall time of the whole
  process, interpreter start and imports included -- what a user waits for.
* ``sd_tiny`` and ``unet``: :mod:`benchmarks.compile_flags`' workloads (the tiny SD
  pipeline's 4-step DDIM + CFG, and an SD2.1-sized UNet forward at latent 32, CFG batch 2;
  first call and the calls after it), with ``JAX_COMPILATION_CACHE_DIR`` naming the folder.
  ``--smoke``: the parity tests' tiny UNet.

Every process keeps programs that compiled in at least ``--min-compile-time`` seconds
(default 0, what :func:`jaxdiv.compilation_cache.enable` keeps; JAX's default is 1).

Writes median [min-max] per workload and setting, the per-round cold / warm ratio, the
warm folder's entries and bytes, and the environment to
``results/benchmarks/compile_cache.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORKLOADS = ("demo", "sd_tiny", "unet")
SETTINGS = ("cold", "warm")
# what each workload reports, in seconds: the first is the one the cache should shorten
_KEYS = {"demo": ("process_s",), "sd_tiny": ("first_call_s", "second_call_s"),
         "unet": ("first_call_s", "lower_s", "compile_s", "first_run_s", "run_s")}  # fmt: skip
_DEMO = textwrap.dedent(
    """
    import sys
    from benchmarks.timing import pin_one_core
    pin_one_core()
    from experiments.cli import main
    sys.argv = ["jaxdiv", "demo", "--out", sys.argv[1], "--batches", "2", "--batch", "16",
                "--no-figure", "--quiet"]
    sys.exit(main())
    """
)


def _env(folder: Path, min_compile_time_s: float) -> dict:
    from jaxdiv.compilation_cache import VARIABLE
    from jaxdiv.host_memory import REUSE_FREED_MEMORY

    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
               GLIBC_TUNABLES=REUSE_FREED_MEMORY, JAX_COMPILATION_CACHE_DIR=str(folder),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(min_compile_time_s))
    env[VARIABLE] = str(folder)  # the console command's own variable (demo)
    return env  # fmt: skip


def run_workload(name: str, folder: Path, smoke: bool, min_compile_time_s: float = 0.0) -> dict:
    """One fresh process of workload ``name`` with the cache in ``folder``."""
    if name == "demo":
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", _DEMO, out],
                                  env=_env(folder, min_compile_time_s),
                                  capture_output=True, text=True)  # fmt: skip
            wall = time.perf_counter() - t0
        if proc.returncode:
            return {"status": "error", "stderr_tail": proc.stderr[-2000:]}
        return {"status": "ok", "process_s": wall}
    cmd = [sys.executable, "-m", "benchmarks.compile_flags", "--child", "--workloads", name]
    proc = subprocess.run(cmd + (["--smoke"] if smoke else []),
                          env=_env(folder, min_compile_time_s),
                          capture_output=True, text=True)  # fmt: skip
    if proc.returncode:
        return {"status": "error", "stderr_tail": proc.stderr[-2000:]}
    child = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"status": "ok", **child["workloads"][name], "environment": child["environment"]}


def _folder_size(folder: Path) -> dict:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return {"entries": len(files), "bytes": sum(p.stat().st_size for p in files)}


def _summarise(runs: dict, workloads: list[str]) -> dict:
    table: dict = {}
    for w in workloads:
        table[w] = {}
        for key in _KEYS[w]:
            row: dict = {}
            for setting in SETTINGS:
                vals = [r[key] for r in runs[w][setting] if r["status"] == "ok"]
                if vals:
                    row[setting] = {"median_s": statistics.median(vals), "min_s": min(vals),
                                    "max_s": max(vals)}  # fmt: skip
            pairs = [(c[key], h[key]) for c, h in zip(runs[w]["cold"], runs[w]["warm"])
                     if c["status"] == h["status"] == "ok"]  # fmt: skip
            if pairs:
                ratios = [c / h for c, h in pairs]
                row["cold_over_warm"] = statistics.median(ratios)
                row["cold_over_warm_per_round"] = [min(ratios), max(ratios)]
            table[w][key] = row
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compile_cache",
                                     description=__doc__.split("\n")[0])  # fmt: skip
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--smoke", action="store_true", help="the tiny UNet (tests)")
    parser.add_argument("--min-compile-time", type=float, default=0.0,
                        help="JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS of every process: "
                             "programs compiled faster are not kept (default 0, what "
                             "jaxdiv.compilation_cache.enable keeps; JAX's own default is 1)")
    parser.add_argument("--out", default="results/benchmarks/compile_cache.json")
    args = parser.parse_args(argv)
    workloads = [w for w in args.workloads.split(",") if w]
    bad = sorted(set(workloads) - set(WORKLOADS))
    if bad or not workloads:
        parser.error(f"--workloads must name some of {list(WORKLOADS)}, got {bad or workloads}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.min_compile_time >= 0:
        parser.error(f"--min-compile-time must be >= 0 seconds, got {args.min_compile_time}")
    from benchmarks.compile_flags import children_environment
    from benchmarks.timing import environment
    from experiments.common import write_json

    runs: dict = {w: {s: [] for s in SETTINGS} for w in workloads}
    folders: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        # round 0's cold run of each workload fills that workload's warm folder
        warm = {w: Path(tmp) / f"warm_{w}" for w in workloads}
        for r in range(args.rounds):
            for w in workloads:
                for setting in SETTINGS:
                    fresh = Path(tmp) / f"cold_{r}_{w}" if r else warm[w]
                    folder = warm[w] if setting == "warm" else fresh
                    res = run_workload(w, folder, args.smoke, args.min_compile_time)
                    runs[w][setting].append(res)
                    shown = f"{res[_KEYS[w][0]]:.2f} s" if res["status"] == "ok" else "error"
                    print(f"round {r} {w:>8} {setting}: {_KEYS[w][0]} {shown}", flush=True)
                if r == 0:
                    folders.setdefault("warm", {})[w] = _folder_size(warm[w])
        folders["warm_after"] = {w: _folder_size(warm[w]) for w in workloads}
    # the children's (pinned) environment; this process's where only the demo ran
    env = children_environment([r["environment"] for w in runs.values() for rs in w.values()
                                for r in rs if "environment" in r]) or environment()  # fmt: skip
    result = {
        "benchmark": "first calls in a fresh process with an empty (cold) and a filled (warm) "
                     "persistent compilation cache, alternating, each process pinned to one core",
        "command": " ".join(["python -m benchmarks.compile_cache"] + list(argv or sys.argv[1:])),
        "min_compile_time_s": args.min_compile_time,
        "table": _summarise(runs, workloads),
        "warm_folder": folders,
        "environment": env,
        "runs": runs,
    }  # fmt: skip
    write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
