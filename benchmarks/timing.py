"""Interleaved timing shared by the benchmarks: implementations alternate A B A B.

On a shared, noisy machine two separate timing loops measure two different moments;
alternating the implementations round by round exposes them to the same load, so their
ratio is a result.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, budget_s: float = float("inf"),
                warmup: bool = True):  # fmt: skip
    """Time each callable once per round, in the same order every round (A B A B ...),
    after one warm-up call each (``warmup=False`` skips it, for calls that take minutes
    and are already compiled). Stops early (after at least 3 rounds) once ``budget_s``
    seconds have been spent.

    Returns ``{name: {"median_s", "min_s", "max_s", "runs_s"}}``.

    >>> out = interleaved({"a": lambda: None, "b": lambda: None}, rounds=3)
    >>> sorted(out), len(out["a"]["runs_s"])
    (['a', 'b'], 3)
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in fns.values() if warmup else ():
        fn()  # compile / warm up
    runs = {name: [] for name in fns}
    spent = 0.0
    for r in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            runs[name].append(dt)
            spent += dt
        if spent > budget_s and r >= 2:
            break
    return {
        name: {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts),
               "runs_s": ts}  # fmt: skip
        for name, ts in runs.items()
    }


def ready(fn, *args):
    """``fn(*args)``, returned once every output array has been computed (JAX dispatches
    asynchronously: a timed call must wait for its results).

    >>> import jax.numpy as jnp
    >>> float(ready(jnp.add, 1.0, 2.0))
    3.0
    """
    import jax

    return jax.block_until_ready(fn(*args))


def version(dist: str) -> str | None:
    """The installed version of distribution ``dist``, ``None`` when it is not installed."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as _installed

    try:
        return _installed(dist)
    except PackageNotFoundError:
        return None


def round_ratio_range(timed: dict, num: str, den: str) -> list[float]:
    """``[min, max]`` over the rounds of ``num``'s time / ``den``'s time, each ratio taken
    within one round of :func:`interleaved`'s result ``timed`` (so both saw the same load).

    >>> round_ratio_range({"a": {"runs_s": [2.0, 3.0]}, "b": {"runs_s": [1.0, 2.0]}}, "a", "b")
    [1.5, 2.0]
    """
    ratios = [n / d for n, d in zip(timed[num]["runs_s"], timed[den]["runs_s"], strict=True)]
    return [min(ratios), max(ratios)]


def environment() -> dict:
    """What a benchmark JSON records beside its numbers: UTC date, versions, threads and
    CPU affinity, the CPU model and its vector extensions, the JAX devices, the machine's
    load average when it ran and the process's peak resident memory so far (call it after
    the timings).

    >>> env = environment()
    >>> sorted(env)  # doctest: +NORMALIZE_WHITESPACE
    ['cpu', 'cpu_affinity', 'cpu_count', 'date', 'jax_devices', 'load_average', 'memory',
     'peak_rss_mb', 'threads', 'versions']
    >>> sorted(env["cpu"])
    ['machine', 'model', 'vector_extensions']
    """
    import datetime
    import os
    import platform
    import resource

    import jax

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "versions": {name: version(name) for name in ("jax", "jaxlib", "numpy", "flax")}
        | {"python": platform.python_version()},
        "threads": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                     "XLA_FLAGS", "JAX_PLATFORMS")},
        "cpu_affinity": sorted(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu": cpu_model(),
        "jax_devices": [str(d) for d in jax.devices()],
        "load_average": list(os.getloadavg()),
        "memory": memory_settings(),
        # Linux reports ru_maxrss in KiB
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }  # fmt: skip


def memory_settings() -> dict:
    """How the process gets its memory: ``GLIBC_TUNABLES``
    (:data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` keeps freed memory for reuse;
    ``glibc.malloc.hugetlb=1`` backs large allocations with transparent huge pages) and the
    kernel's transparent huge page modes, both read once at process start. Recorded because
    they change how fast memory-bound operations run, for both libraries of a comparison.

    >>> sorted(memory_settings())
    ['glibc_tunables', 'thp_defrag', 'thp_enabled']
    """
    import os

    def thp(name):
        try:
            with open(f"/sys/kernel/mm/transparent_hugepage/{name}") as f:
                return f.read().strip()
        except OSError:
            return None

    return {"glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "thp_enabled": thp("enabled"),
            "thp_defrag": thp("defrag")}  # fmt: skip


MALLOC_CHOICES = ("default", "reuse")


def add_thread_and_malloc_options(parser, malloc_default: str = "reuse") -> None:
    """``--threads {0,1}`` (1: one pinned core for both libraries, :func:`pin_one_core`)
    and ``--malloc`` (:data:`MALLOC_CHOICES`, see :func:`use_malloc`) on a benchmark's
    ``argparse`` parser.

    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_thread_and_malloc_options(p)
    >>> vars(p.parse_args(["--threads", "0"]))
    {'threads': 0, 'malloc': 'reuse'}
    """
    parser.add_argument("--threads", type=int, choices=(0, 1), default=1,
                        help="1: one pinned core for both; 0: library defaults")
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default=malloc_default,
                        help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY")


def use_malloc(choice: str, argv: list[str] | None, module: str) -> None:
    """Put a benchmark under its ``--malloc`` choice before it starts JAX or PyTorch.

    ``"default"`` leaves the process as it is. ``"reuse"`` needs
    :data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` from process start: from the command line
    (``argv`` is ``None``) the benchmark starts again under it
    (:func:`jaxdiv.host_memory.restart_with_reused_memory`); called in-process with an
    explicit ``argv`` it raises instead, since replacing the caller's process is not its to
    do. Both libraries of a comparison run in that one process, so both get the setting.

    >>> use_malloc("default", ["--repeats", "1"], "benchmarks.sd_step")
    >>> use_malloc("reuse", ["--repeats", "1"], "benchmarks.sd_step")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ValueError: --malloc reuse needs GLIBC_TUNABLES=glibc.malloc.arena_max=1:... at process start...
    """
    from jaxdiv.host_memory import (
        REUSE_FREED_MEMORY,
        restart_with_reused_memory,
        reusing_freed_memory,
    )

    if choice not in MALLOC_CHOICES:
        raise ValueError(f"--malloc must be one of {MALLOC_CHOICES}, got {choice!r}")
    if choice == "default" or reusing_freed_memory():
        return
    if argv is not None:
        raise ValueError(
            f"--malloc reuse needs GLIBC_TUNABLES={REUSE_FREED_MEMORY} at process start; run "
            f"`python -m {module}` from the command line (it restarts itself with it) or set "
            "the variable before Python starts"
        )
    if not restart_with_reused_memory():
        raise ValueError("--malloc reuse: this system has no glibc, whose settings it sets")


def cpu_model() -> dict:
    """The CPU's model name and which wide vector extensions it has (from
    ``/proc/cpuinfo`` where it exists): relative speeds of XLA:CPU and PyTorch's oneDNN
    differ between hosts, e.g. with and without AVX-512, so every figure names its CPU.

    >>> info = cpu_model()
    >>> isinstance(info["model"], str) and isinstance(info["vector_extensions"], list)
    True
    """
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:  # every core repeats the same fields: keep the first
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    model = fields.get("model name") or platform.processor() or "unknown"
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    wide = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile",
            "sve", "asimd")  # fmt: skip
    return {"model": model, "machine": platform.machine(),
            "vector_extensions": [f for f in wide if f in flags]}  # fmt: skip


def pin_one_core() -> int:
    """Pin this process to one core (the lowest it may use) for a one-thread comparison,
    and return it. Call it before JAX or torch start their thread pools (before the first
    JAX computation); threads created later inherit the pin.

    Only the pin limits XLA:CPU (jax 0.10.2): with ``XLA_FLAGS="--xla_cpu_multi_thread_eigen=
    false intra_op_parallelism_threads=1"`` a jitted SD2.1-sized UNet step still used 1.90
    cores (CPU time / wall time), under ``taskset -c 0`` 1.00 (``benchmarks.sd_step``'s
    ``cores_used``; the commands are on the findings page).
    """
    import os

    core = min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {core})
    return core


def jit_over_arrays(fn, tree):
    """``fn(tree, *args)`` jitted with ``tree``'s array leaves as arguments (a 16 GB shield
    index must not become a compile-time constant) and its other leaves static.

    >>> import jax.numpy as jnp
    >>> f = jit_over_arrays(lambda t, x: t["w"] * x + t["n"], {"w": jnp.arange(3.0), "n": 1})
    >>> f(2.0).tolist()
    [1.0, 3.0, 5.0]
    """
    import jax
    import numpy as np

    leaves, treedef = jax.tree.flatten(tree)
    is_arr = [isinstance(v, jax.Array | np.ndarray) for v in leaves]
    arrays = [v for v, a in zip(leaves, is_arr) if a]
    static = [None if a else v for v, a in zip(leaves, is_arr)]

    @jax.jit
    def run(arrays, *args):
        it = iter(arrays)
        values = [next(it) if a else s for a, s in zip(is_arr, static)]
        return fn(jax.tree.unflatten(treedef, values), *args)

    return lambda *args: run(arrays, *args)


@contextlib.contextmanager
def module_constants(settings):
    """Set ``(module, name, value)`` triples for the duration of a ``with`` block and restore
    them after: jaxdiv reads its tuning constants when a function is traced, so a jitted
    function first called inside the block is compiled with the changed ones.

    >>> import math
    >>> with module_constants([(math, "tau", 1.0)]):
    ...     math.tau
    1.0
    >>> round(math.tau, 2)
    6.28
    """
    saved = [getattr(module, attr) for module, attr, _ in settings]
    for module, attr, value in settings:
        setattr(module, attr, value)
    try:
        yield
    finally:
        for (module, attr, _), value in zip(settings, saved):
            setattr(module, attr, value)
