"""Speed and memory of jaxdiv.metrics against the reference packages, in one process.

    python -m benchmarks.metrics            # full run (several minutes on 2 CPU cores)
    python -m benchmarks.metrics --quick    # small shapes, a smoke test of the script

Cases (issue 3): Vendi n=10k at d=512 and d=2048 (jaxdiv's automatic dual form vs
``vendi_score.score_dual``, the same O(n d^2) algorithm, and at d=512 also the package's
default ``score_X``, which builds the n x n kernel); PRDC 10k vs 10k at d=512 (vs
``prdc.compute_prdc``); Frechet distance at d=2048 (vs the pytorch-fid formula with
``scipy.linalg.sqrtm``).

What is measured, per implementation and case:

* ``time_s``: median wall time over ``--repeats`` rounds in which jaxdiv and the
  reference alternate (A B A B, :func:`benchmarks.timing.interleaved`), with
  ``time_min_max_s``; jaxdiv's first call includes XLA compilation, reported separately as
  ``first_call_s``. Slow reference calls (> 20 s) are timed once, after a warm-up call.
* ``peak_rss_mib``: peak resident memory during one call minus the resident memory just
  before it (Linux ``/proc/self/clear_refs`` resets the high-water mark; ``malloc_trim``
  first returns freed heap pages). The same method for both sides, so the ratio is fair;
  it counts everything the process touches (XLA buffers, NumPy arrays, BLAS workspace).
* ``tracemalloc_peak_mib`` (NumPy side only): peak of Python/NumPy allocations as seen
  by ``tracemalloc``; ``xla_temp_mib`` (jaxdiv side only): XLA's compiled temp+output
  buffer plan. These explain the RSS numbers; they are not comparable with each other.

Threads: by default the BLAS pools run single-threaded (``JAXDIV_BENCH_THREADS=1`` sets
``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` and XLA's thread flags), which is what makes
timings reproducible on a shared machine; ``JAXDIV_BENCH_THREADS=N`` allows more. XLA:CPU
keeps using every core under those flags: for one core, start it under ``taskset -c 0``.
``prdc.compute_prdc`` still starts its 8 joblib threads (each using 1 BLAS thread).

Writes ``results/metrics_benchmark.json`` and prints a Markdown table. The machine may
be shared: the 1-minute load average before and after the run is recorded.
"""

from __future__ import annotations

import os

# Thread counts must be fixed before NumPy / JAX load their BLAS and thread pools. On a
# shared 2-core machine, multi-threaded OpenBLAS/Eigen pools oversubscribe and the same
# 512 x 512 eigh varied between 0.04 s and 3.6 s; one thread each gives stable timings.
THREADS = os.environ.get("JAXDIV_BENCH_THREADS", "1")
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, THREADS)
if THREADS == "1":
    os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false "
                                       "intra_op_parallelism_threads=1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import ctypes  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.linalg  # noqa: E402

from benchmarks.timing import environment, interleaved  # noqa: E402
from jaxdiv import metrics  # noqa: E402

RESULTS = Path("results") / "metrics_benchmark.json"
_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _rss_kib(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", status).group(1))


def _reset_peak() -> int:
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    return _rss_kib("VmRSS")


def _block(x):
    return jax.block_until_ready(x) if isinstance(x, jax.Array | tuple) else x


def measure(fn, repeats: int, numpy_side: bool) -> dict:
    """Time ``fn`` and measure its peak memory (see the module docstring)."""
    t0 = time.perf_counter()
    out = _block(fn())  # warm-up (compilation for jaxdiv)
    first = time.perf_counter() - t0
    before = _reset_peak()
    t0 = time.perf_counter()
    out = _block(fn())
    times = [time.perf_counter() - t0]
    peak = _rss_kib("VmHWM") - before
    if times[0] < 20.0:
        for _ in range(repeats - 1):
            t0 = time.perf_counter()
            _block(fn())
            times.append(time.perf_counter() - t0)
    rec = {"time_s": min(times), "first_call_s": first, "peak_rss_mib": peak / 1024,
           "value": _scalar(out)}
    if numpy_side and times[0] < 20.0:
        tracemalloc.start()
        fn()
        rec["tracemalloc_peak_mib"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return rec


def _scalar(out):
    if isinstance(out, dict):
        return {k: float(v) for k, v in out.items()}
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return {k: float(v) for k, v in zip(out._fields, out, strict=True)}
    return float(out)


def _xla_temp_mib(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return (analysis.temp_size_in_bytes + analysis.output_size_in_bytes) / 2**20


def _quiet(fn):
    def run():
        with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints its sizes
            return fn()
    return run


def _scipy_fd(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)


def run_cases(n: int, d_small: int, d_large: int, d_fd: int, repeats: int, primal: bool):
    from prdc import compute_prdc
    from vendi_score import vendi as vs

    rng = np.random.default_rng(0)
    cases = []

    def add(name, ours, ref, ref_name, xla=None, rec_ours=None):
        if rec_ours is None:
            print(f"  {name}: jaxdiv ...", flush=True)
            rec_ours = measure(ours, 1, numpy_side=False)
            if xla is not None:
                rec_ours["xla_temp_mib"] = xla()
        print(f"  {name}: {ref_name} ...", flush=True)
        rec_ref = measure(ref, 1, numpy_side=True)
        if ours is not None and rec_ref["time_s"] < 20.0:
            # the times: both sides alternating, A B A B (memory came from one call each)
            timed = interleaved({"jaxdiv": lambda: _block(ours()), "ref": lambda: _block(ref())},
                                repeats)  # fmt: skip
            for rec, key in ((rec_ours, "jaxdiv"), (rec_ref, "ref")):
                t = timed[key]
                rec.update(time_s=t["median_s"], time_min_max_s=[t["min_s"], t["max_s"]],
                           timing=f"interleaved, median of {len(t['runs_s'])}")
        else:
            rec_ref["timing"] = "one call after a warm-up (slow reference), not interleaved"
        cases.append({"case": name, "reference": ref_name, "jaxdiv": rec_ours,
                      "ref": rec_ref,
                      "speedup": rec_ref["time_s"] / rec_ours["time_s"],
                      "rss_ratio": rec_ref["peak_rss_mib"] / max(rec_ours["peak_rss_mib"], 1e-3)})
        print(f"    jaxdiv {rec_ours['time_s']:.3f}s {rec_ours['peak_rss_mib']:.0f} MiB | "
              f"{ref_name} {rec_ref['time_s']:.3f}s {rec_ref['peak_rss_mib']:.0f} MiB", flush=True)
        return rec_ours

    for d in (d_small, d_large):
        x64 = rng.normal(size=(n, d)) + 0.1
        x32 = jnp.asarray(x64, jnp.float32)
        shape = jax.ShapeDtypeStruct(x32.shape, x32.dtype)
        rec = add(f"Vendi n={n} d={d} (q=1, cosine)", lambda x=x32: metrics.vendi(x),
                  lambda x=x64: vs.score_dual(x), "vendi_score.score_dual",
                  xla=lambda s=shape: _xla_temp_mib(metrics.vendi, s))
        if primal and d == d_small:
            add(f"Vendi n={n} d={d} (q=1, cosine)", None, lambda x=x64: vs.score_X(x),
                "vendi_score.score_X (n x n)", rec_ours=rec)


    real = rng.normal(size=(n, d_small)).astype(np.float32)
    fake = rng.normal(size=(n, d_small)).astype(np.float32)
    rj, fj = jnp.asarray(real), jnp.asarray(fake)
    shape = jax.ShapeDtypeStruct(real.shape, jnp.float32)
    add(f"PRDC {n} vs {n} d={d_small} (k=5)", lambda: metrics.prdc(rj, fj, k=5),
        _quiet(lambda: compute_prdc(real, fake, nearest_k=5)), "prdc.compute_prdc",
        xla=lambda: _xla_temp_mib(metrics.prdc, shape, shape))


    a = rng.normal(size=(d_fd, 2 * d_fd)) / np.sqrt(2 * d_fd)
    b = rng.normal(size=(d_fd, 2 * d_fd)) / np.sqrt(2 * d_fd) * 1.1
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=d_fd) * 0.1, rng.normal(size=d_fd) * 0.1
    s1j, s2j = jnp.asarray(s1, jnp.float32), jnp.asarray(s2, jnp.float32)
    m1j, m2j = jnp.asarray(mu1, jnp.float32), jnp.asarray(mu2, jnp.float32)
    add(f"Frechet distance d={d_fd} (float32)",
        lambda: metrics.frechet_distance(m1j, s1j, m2j, s2j, dtype=jnp.float32),
        lambda: _scipy_fd(mu1, s1, mu2, s2), "scipy.linalg.sqrtm (float64)")
    add(f"Frechet distance d={d_fd} (float64)",
        lambda: metrics.frechet_distance(mu1, s1, mu2, s2, dtype=jnp.float64),
        lambda: _scipy_fd(mu1, s1, mu2, s2), "scipy.linalg.sqrtm (float64)")
    return cases


def golden_prdc(n: int, d: int) -> dict:
    """PAPERS.md: PRDC (k=5) of two samples of N(0, I), 10k vs 10k in 1000-D, is about
    P 0.477, R 0.471, D 1.056, C 0.974 (one draw; seeds move each by a few 0.01)."""
    key_r, key_f = jax.random.split(jax.random.key(0))
    real = jax.random.normal(key_r, (n, d))
    fake = jax.random.normal(key_f, (n, d))
    t0 = time.perf_counter()
    res = metrics.prdc(real, fake, k=5)
    values = {k: float(v) for k, v in zip(res._fields, res, strict=True)}
    # the golden values hold for PAPERS.md's sizes only (--quick runs smaller ones)
    golden = {"precision": 0.477, "recall": 0.471, "density": 1.056, "coverage": 0.974}
    return {"n": n, "d": d, "k": 5, "jaxdiv": values, "time_s": time.perf_counter() - t0,
            "papers_md": golden if (n, d) == (10_000, 1000) else None}


def _table(cases) -> str:
    lines = ["| case | reference | jaxdiv time | reference time | speed-up | jaxdiv peak RSS "
             "| reference peak RSS | memory ratio |",
             "|---|---|---|---|---|---|---|---|"]
    for c in cases:
        j, r = c["jaxdiv"], c["ref"]
        lines.append(f"| {c['case']} | {c['reference']} | {j['time_s']:.2f} s | "
                     f"{r['time_s']:.2f} s | {c['speedup']:.1f}x | {j['peak_rss_mib']:.0f} MiB | "
                     f"{r['peak_rss_mib']:.0f} MiB | {c['rss_ratio']:.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-primal", action="store_true",
                        help="skip vendi_score.score_X (the n x n eigendecomposition)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        sizes = dict(n=1000, d_small=64, d_large=128, d_fd=128)
    else:
        sizes = dict(n=10_000, d_small=512, d_large=2048, d_fd=2048)
    load_before = os.getloadavg()[0]
    print(f"[benchmarks.metrics] {sizes} on {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, {THREADS} thread(s), load {load_before:.1f}", flush=True)
    t0 = time.perf_counter()
    cases = run_cases(**sizes, repeats=args.repeats, primal=not args.no_primal)
    table = _table(cases)
    print(table)
    golden = golden_prdc(sizes["n"], 1000 if not args.quick else 100)
    versus = golden["papers_md"] or "none at these sizes (PAPERS.md: 10k vs 10k, d=1000)"
    print(f"PRDC golden check (N(0, I), {golden['n']} vs {golden['n']}, d={golden['d']}): "
          f"{golden['jaxdiv']} vs PAPERS.md {versus} ({golden['time_s']:.1f} s)")
    record = {
        "command": "python -m benchmarks.metrics" + (" --quick" if args.quick else "")
                   + (" --no-primal" if args.no_primal else ""),
        "sizes": sizes, "cases": cases, "table_markdown": table, "prdc_golden": golden,
        "environment": environment() | {
            "scipy": scipy.__version__, "threads_setting": THREADS,
            "platform": platform.platform(), "processor": platform.processor(),
            "load_avg_1min_before": load_before, "total_s": time.perf_counter() - t0},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from experiments.common import write_json

    write_json(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
