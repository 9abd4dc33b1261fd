"""EDM Heun on an exact GMM (d=2, K=8, B=4096, 64 steps): jaxdiv vs PyTorch and NumPy,
against this machine's exp floor.

The same algorithm (Karras Alg. 2 without churn, exact full-covariance posterior mean) in
one process: jaxdiv (one jitted ``lax.scan`` via :func:`jaxdiv.sample`); the same with the
denoiser as ``toy/gmm.py`` wrote it before its sums over the components became generic
reductions (``jaxdiv, softmax and products (before)``, written out below); ``torch.compile``
of one Heun step built on the component-major fused
denoiser, and on the same denoiser written as d ``(K, B)`` elementwise arrays (the goal is
against the faster of the two); PyTorch eager written naively (a Python loop over
components), fused in the ``(B, K, d)`` layout, in jaxdiv's component-major ``(K, d, B)``
layout and as d ``(K, B)`` arrays; NumPy fused. All outputs are checked against jaxdiv's
before timing, then every implementation runs once per round, in the same order each round
(:func:`benchmarks.timing.interleaved`, after one warm-up call each): median [min-max] and
the per-round ratio of each peer to jaxdiv.

The floor: the exact denoiser needs ``B K`` exps per call (its ``d x d`` solves are
diagonal in the eigenbasis), so the sampler needs ``B K NFE`` exps. The same rounds time
that many float32 exps with JAX (one flat jitted ``jnp.exp``, and ``NFE`` chained exps on
a ``(K, B)`` array in a ``fori_loop``), NumPy and PyTorch; the fastest median is the
floor. ``denoiser only`` rows time ``NFE`` denoiser evaluations in a jitted ``fori_loop``
(no sampler around them): the per-evaluation cost.

Where XLA's time goes: the compiled program of ``jaxdiv.sampling._run`` (what
``jaxdiv.sample`` runs) is parsed for the thunks (fusions, dots, copies) inside the scan's
while body, per Heun step; with ``--profile`` (default) a ``jax.profiler`` trace of a few
sampler calls gives each thunk's time per step.

Run (CPU, one core for every library; ``taskset`` pins the process, since XLA:CPU keeps
using every core under the ``XLA_FLAGS`` thread settings):
    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu taskset -c 0 python -m benchmarks.toy_sampler \
    --rounds 7

``--torch-compile`` picks the ``torch.compile`` mode (``max-autotune``, falling back to
``default`` when it fails; ``off`` skips the row and records why). Writes
``results/bench_toy_sampler.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
import toy
import toy.gmm
from benchmarks.timing import environment, interleaved, version
from experiments.common import write_json
from jaxdiv import samplers, sampling, schedules
from jaxdiv.pytrees import combine, partition

JAXDIV = "jaxdiv (jit, lax.scan)"
JAXDIV_BEFORE = "jaxdiv, softmax and products (before)"
TORCH_COMPILE = "torch.compile, Heun step (K,d,B)"
TORCH_COMPILE_ELEMENTWISE = "torch.compile, Heun step, d x (K,B)"
# each torch.compile peer and the Fused layout it compiles
TORCH_COMPILE_LAYOUTS = {TORCH_COMPILE: "component_major", TORCH_COMPILE_ELEMENTWISE: "elementwise"}
# the summary key of each one's ratio to jaxdiv (the first kept from older JSONs)
TORCH_COMPILE_SUMMARY_KEYS = {
    TORCH_COMPILE: "torch_compile_over_jaxdiv",
    TORCH_COMPILE_ELEMENTWISE: "torch_compile_over_jaxdiv_elementwise",
}
DEN_ONLY = "denoiser only x NFE (jit, fori_loop)"
DEN_ONLY_BEFORE = "denoiser only x NFE, softmax (before)"
FLOOR_PREFIX = "floor: "


def make_gmm(k=8, d=2, seed=0):
    rng = np.random.default_rng(seed)
    means = 3 * rng.normal(size=(k, d))
    a = 0.5 * rng.normal(size=(k, d, d))
    covs = a @ a.transpose(0, 2, 1) + 0.05 * np.eye(d)
    w = rng.uniform(0.5, 1.5, k)
    return means.astype(np.float32), covs.astype(np.float32), (w / w.sum()).astype(np.float32)


def heun_loop(den, x, sigmas):
    """Karras Alg. 2 (no churn), generic over the array library of ``x``."""
    for i in range(len(sigmas) - 1):
        s, s_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - den(x, s)) / s
        x_next = x + (s_next - s) * d
        if s_next > 0:
            d2 = (x_next - den(x_next, s_next)) / s_next
            x_next = x + (s_next - s) * 0.5 * (d + d2)
        x = x_next
    return x


class TorchNaive:
    """One component at a time with torch.linalg on d x d matrices (how one writes it first)."""

    def __init__(self, means, covs, w):
        import torch

        self.m, self.c, self.lw = (
            torch.tensor(means),
            torch.tensor(covs),
            torch.log(torch.tensor(w)),
        )

    def __call__(self, x, s):
        import torch

        d = x.shape[1]
        logits, post = [], []
        for k in range(self.m.shape[0]):
            cov_t = self.c[k] + s * s * torch.eye(d)
            diff = x - self.m[k]
            sol = torch.linalg.solve(cov_t, diff.T).T
            logdet = torch.logdet(cov_t)
            logits.append(self.lw[k] - 0.5 * (diff * sol).sum(1) - 0.5 * logdet)
            post.append(self.m[k] + sol @ self.c[k])
        r = torch.softmax(torch.stack(logits, 1), 1)
        return (r[:, :, None] * torch.stack(post, 1)).sum(1)


class Fused:
    """Eigenbasis formulation batched over components, in one of two layouts.

    ``layout="component_major"`` keeps arrays as ``(K, d, B)`` (what toy.GaussianMixture
    does for d > 3; reductions over K and d vectorise across the batch) -- the careful
    version; ``"elementwise"`` holds d ``(K, B)`` arrays, rotations written elementwise (as
    toy.GaussianMixture's ``_stats`` does for d <= 3) and the softmax normalised once per
    output coordinate (faster under ``torch.compile``; in JAX the same form was slower);
    ``"batch_major"`` is the ``(B, K, d)`` layout one writes first. ``s`` may be a float
    or a 0-d tensor (what ``torch.compile`` is given, so one graph serves every sigma).
    """

    def __init__(self, means, covs, w, lib, layout="component_major"):
        import torch

        lam, u = np.linalg.eigh(covs)
        self.lib, self.layout = lib, layout
        t = (lambda a: torch.tensor(a)) if lib == "torch" else (lambda a: a)
        self.m, self.lam, self.u, self.lw = t(means), t(lam), t(u), t(np.log(w))
        self.pm = t(np.einsum("kd,kde->ke", means, u))

    def _softmax(self, logits, axis):
        import torch

        if self.lib == "torch":
            return torch.softmax(logits, axis)
        e = np.exp(logits - logits.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)

    def __call__(self, x, s):
        import torch

        L = torch if self.lib == "torch" else np
        var = self.lam + s * s
        if self.layout == "elementwise":
            return self._elementwise(L, x, var)
        if self.layout == "batch_major":
            z = L.einsum("bd,kde->bke", x, self.u) - self.pm
            logits = self.lw - 0.5 * L.log(var).sum(-1) - 0.5 * (z * z / var).sum(-1)
            r = self._softmax(logits, 1)
            w = r[..., None] * (self.lam / var) * z
            return r @ self.m + L.einsum("kde,bke->bd", self.u, w)
        z = L.einsum("kde,db->keb", self.u, x.T) - self.pm[:, :, None]
        logits = (self.lw - 0.5 * L.log(var).sum(-1))[:, None] - 0.5 * (
            z * z / var[:, :, None]
        ).sum(1)
        r = self._softmax(logits, 0)
        w = r[:, None, :] * (self.lam / var)[:, :, None] * z
        return (self.m.T @ r + L.einsum("kde,keb->db", self.u, w)).T

    def _elementwise(self, L, x, var):
        # d (K, B) arrays (the rotations as toy.GaussianMixture's _stats writes them for
        # d <= 3), sums over the leading K axis, the softmax normalised once per coordinate
        d = x.shape[1]
        zs = []
        for e in range(d):
            y = self.u[:, 0, e, None] * x[:, 0]
            for j in range(1, d):
                y = y + self.u[:, j, e, None] * x[:, j]
            zs.append(y - self.pm[:, e, None])
        logits = (self.lw - 0.5 * L.log(var).sum(-1))[:, None]
        for e in range(d):
            logits = logits - 0.5 * zs[e] * zs[e] / var[:, e, None]
        p = L.exp(logits - L.amax(logits, 0))
        total = p.sum(0)
        ws = [(self.lam[:, e] / var[:, e])[:, None] * zs[e] for e in range(d)]
        outs = []
        for i in range(d):
            c = self.m[:, i, None] + self.u[:, i, 0, None] * ws[0]
            for e in range(1, d):
                c = c + self.u[:, i, e, None] * ws[e]
            outs.append((p * c).sum(0) / total)
        return L.stack(outs, -1)


def torch_compiled_sampler(den, sigmas, mode):
    """``torch.compile`` of one Heun step (two calls of ``den`` and the update, one graph)
    and of the final Euler step; a Python loop runs the steps with 0-d sigma tensors.

    Returns ``run(x) -> x0``; the first call compiles.
    """
    import torch

    def heun_step(x, s, s_next):
        d = (x - den(x, s)) / s
        x_next = x + (s_next - s) * d
        d2 = (x_next - den(x_next, s_next)) / s_next
        return x + (s_next - s) * 0.5 * (d + d2)

    def euler_step(x, s, s_next):
        return x + (s_next - s) * (x - den(x, s)) / s

    heun = torch.compile(heun_step, mode=mode, dynamic=False, fullgraph=True)
    euler = torch.compile(euler_step, mode=mode, dynamic=False, fullgraph=True)
    sig = [torch.tensor(float(v), dtype=torch.float32) for v in sigmas]
    n = len(sig) - 1

    def run(x):
        for i in range(n):
            x = (heun if float(sigmas[i + 1]) > 0 else euler)(x, sig[i], sig[i + 1])
        return x

    return run


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class SoftmaxDenoiser(NamedTuple):
    """The exact GMM denoiser as ``toy/gmm.py`` computed it for d <= 3 before 2026-12-08:
    ``jax.nn.softmax`` over the components, the weighted means as a ``(d, K) x (K, B)``
    product plus an einsum, sigma = 0 through ``jnp.where`` (XLA:CPU ran the softmax and the
    product as YNNPACK calls). A pytree of its own type, so :func:`jaxdiv.sample` compiles a
    separate program for it (arrays still traced)."""

    mixture: Any
    schedule: Any

    def __call__(self, x, t, cond=None):
        gm = self.mixture  # full covariances
        alpha = jnp.asarray(self.schedule.alpha(t), x.dtype)
        sigma = jnp.asarray(self.schedule.sigma(t), x.dtype)
        clean = sigma == 0
        var = alpha**2 * gm.eigvals + jnp.where(clean, 1.0, sigma) ** 2  # (K, d)
        d, xt = x.shape[1], x.T
        zs = [sum(gm.eigvecs[:, j, e, None] * xt[j] for j in range(d))
              - alpha * gm.proj_means[:, e, None] for e in range(d)]  # fmt: skip
        log_norm = jnp.log(gm.weights) - 0.5 * jnp.sum(jnp.log(2 * math.pi * var), -1)
        quad = sum(zs[e] * zs[e] / var[:, e, None] for e in range(d))
        r = jax.nn.softmax(log_norm[:, None] - 0.5 * quad, 0)  # (K, B)
        w = r[:, None, :] * (alpha * gm.eigvals / var)[:, :, None] * jnp.stack(zs, 1)
        out = gm.means.T @ r + jnp.einsum("kde,keb->db", gm.eigvecs, w)
        return jnp.where(clean, xt / jnp.where(clean, alpha, 1.0), out).T


# -- the compiled program: thunks per Heun step ----------------------------------------
_COMP = re.compile(r"^(ENTRY )?%?(\S+) .*\{$")
_INSTR = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([a-z][a-z0-9\-]*)\((.*)$")
_TRIVIAL = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast"}
_NOTABLE = ("exponential", "reduce", "dot", "transpose", "copy", "divide", "log", "sqrt",
            "dynamic-slice", "concatenate", "slice", "compare")  # fmt: skip


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    comps, entry, cur = {}, None, None
    for line in hlo.splitlines():
        m = _COMP.match(line)
        if m and not line.startswith(" "):
            cur = m.group(2)
            comps[cur] = []
            entry = cur if m.group(1) else entry
        elif line.startswith("}"):
            cur = None
        elif cur is not None:
            comps[cur].append(line)
    return comps, entry


def _instructions(lines):
    for line in lines:
        m = _INSTR.match(line)
        if m:
            yield m.group(1), m.group(2), m.group(3), m.group(4)


def _thunks(comps, name):
    """The runtime thunks of computation ``name``: every non-trivial instruction, with a
    conditional's branches listed under it."""
    out = []
    for iname, shape, op, rest in _instructions(comps[name]):
        if op in _TRIVIAL:
            continue
        row = {"name": iname, "op": op, "shape": shape.split("{")[0]}
        if op == "fusion":
            row["kind"] = re.search(r"kind=(\w+)", rest).group(1)
            called = re.search(r"calls=%([^,\s]+)", rest).group(1)
            ops = [o for _, _, o, _ in _instructions(comps.get(called, []))]
            row["contains"] = sorted({o for o in ops if o in _NOTABLE})
            row["num_ops"] = sum(o not in _TRIVIAL for o in ops)
        elif op == "conditional":
            branches = re.search(r"branch_computations=\{([^}]*)\}", rest).group(1)
            row["branches"] = [_thunks(comps, b.strip().lstrip("%"))
                               for b in branches.split(",")]  # fmt: skip
        out.append(row)
    return out


def _executed(thunks):
    """The thunks a run executes: each ``conditional`` (itself a thunk) followed by its
    larger branch's, recursively."""
    out = []
    for t in thunks:
        out.append(t)
        if t["op"] == "conditional":
            out += max((_executed(b) for b in t["branches"]), key=len)
    return out


def step_thunks(hlo: str, batch: int) -> dict[str, Any]:
    """Thunks of the scan's while body in compiled HLO text, per Heun step.

    The EDM step runs its first denoiser call in the body and the Heun correction in a
    ``conditional`` (the last step, to sigma = 0, takes the Euler branch); the GMM denoiser
    branches on sigma = 0 in one more. A Heun step executes the larger branch of each (the
    Heun correction, the mixture). ``batch_sized`` thunks are those whose output has a
    dimension of size ``batch`` (the rest are scalar bookkeeping).
    """
    comps, entry = _computations(hlo)
    whiles = [(n, rest) for n, _, op, rest in _instructions(comps[entry]) if op == "while"]
    if len(whiles) != 1:
        raise ValueError(f"expected one while loop in the entry computation, got {len(whiles)}")
    body = re.search(r"body=%(\S+?)[,\s]", whiles[0][1]).group(1)
    executed = _executed(_thunks(comps, body))
    per_step = [t for t in executed if t["op"] != "conditional"]
    fusions = [t for t in per_step if t["op"] == "fusion"]
    batch_sized = [t for t in per_step if str(batch) in re.split(r"[\[\],]", t["shape"])]
    return {
        "thunks_per_heun_step": len(executed),
        "fusions_per_heun_step": len(fusions),
        "fusion_kinds": {
            k: sum(t.get("kind") == k for t in fusions)
            for k in sorted({t["kind"] for t in fusions})
        },  # fmt: skip
        "batch_sized_thunks_per_heun_step": len(batch_sized),
        "exp_fusions_per_heun_step": sum("exponential" in t.get("contains", ()) for t in fusions),
        "thunks": [{k: v for k, v in t.items() if k != "branches"} for t in per_step],
    }


def profile_thunks(fn, calls: int, steps: int) -> dict[str, Any]:
    """Per-thunk device time (us per step) from a ``jax.profiler`` trace of ``calls`` calls."""
    opts = jax.profiler.ProfileOptions()
    opts.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, profiler_options=opts)
        for _ in range(calls):
            fn()
        jax.profiler.stop_trace()
        files = sorted(Path(d).rglob("*.trace.json.gz"))
        events = json.load(gzip.open(files[-1]))["traceEvents"]
    agg: dict[str, list[float]] = {}
    for e in events:
        if e.get("ph") == "X" and "dur" in e:
            agg.setdefault(e["name"], []).append(float(e["dur"]))
    return {name: {"count_per_call": len(ds) / calls, "us_per_step": sum(ds) / calls / steps}
            for name, ds in agg.items()}  # fmt: skip


def _ratio(key, runs, ref_runs):
    """``{key: median, key_min_max: [min, max]}`` of the per-round ratios ``runs / ref_runs``
    (both timed in the same rounds)."""
    r = [a / b for a, b in zip(runs, ref_runs)]
    return {key: statistics.median(r), f"{key}_min_max": [min(r), max(r)]}


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.toy_sampler", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--rounds", "--repeats", type=int, default=7)
    ap.add_argument("--torch-compile", choices=("max-autotune", "default", "off"),
                    default="max-autotune")  # fmt: skip
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--no-eager", action="store_true",
                    help="skip the naive / batch-major PyTorch and NumPy rows")  # fmt: skip
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--out", default="results/bench_toy_sampler.json")
    args = ap.parse_args(argv)
    if min(args.batch, args.steps, args.rounds, args.torch_threads) < 1:
        ap.error("--batch, --steps, --rounds and --torch-threads must be >= 1")
    import torch

    threads_before = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)  # in-process callers (tests) keep theirs


def _run(args, argv) -> dict[str, Any]:
    import torch

    means, covs, w = make_gmm()
    k, d = means.shape
    sch = schedules.edm()
    s = samplers.edm(sch, args.steps)
    sigmas = np.asarray(s.times, np.float64)
    nfe = int(s.nfe)
    noise = np.random.default_rng(1).normal(size=(args.batch, d)).astype(np.float32)
    x_init = (sigmas[0] * noise).astype(np.float32)
    noise_j = jnp.asarray(noise)

    gm = toy.GaussianMixture(means, covs, w)
    den = gm.denoiser(sch)
    den_before = SoftmaxDenoiser(gm, sch)
    key = jax.random.key(0)

    def sampler(dn):
        return lambda: jaxdiv.sample(s, dn, noise_j, key=key).x0.block_until_ready()

    compile_s = {}
    fns = {JAXDIV: sampler(den), JAXDIV_BEFORE: sampler(den_before)}
    outs = {}
    for name, fn in fns.items():
        t0 = time.perf_counter()
        outs[name] = np.asarray(fn())
        compile_s[name] = time.perf_counter() - t0
    ref = outs[JAXDIV]

    # PyTorch / NumPy peers
    x_t = lambda: torch.tensor(x_init)
    fused_t = Fused(means, covs, w, "torch")
    peers = {"torch eager, fused (K,d,B)": lambda: heun_loop(fused_t, x_t(), sigmas)}
    if not args.no_eager:
        naive, fused_bm = TorchNaive(means, covs, w), Fused(means, covs, w, "torch", "batch_major")
        fused_np = Fused(means, covs, w, "numpy")
        fused_el = Fused(means, covs, w, "torch", "elementwise")
        peers = {
            "torch eager, naive": lambda: heun_loop(naive, x_t(), sigmas),
            "torch eager, fused (B,K,d)": lambda: heun_loop(fused_bm, x_t(), sigmas),
            **peers,
            "torch eager, d x (K,B)": lambda: heun_loop(fused_el, x_t(), sigmas),
            "numpy, fused (K,d,B)": lambda: heun_loop(fused_np, x_init, sigmas),
        }
    tc: dict[str, Any] = {
        "what": "torch.compile(fullgraph=True, dynamic=False) of one Heun step (two calls "
        "of the fused denoiser and the update) and of the final Euler step; a Python loop "
        "over the steps passes sigma as 0-d tensors (one graph for every sigma). Two "
        "denoiser formulations: component-major (K,d,B) arrays with einsums, and d (K,B) "
        "arrays with elementwise rotations and sums over K (Fused layout 'elementwise'); "
        "the goal is taken against the faster",
        "peers": {},
    }
    for name, layout in TORCH_COMPILE_LAYOUTS.items():
        entry = tc["peers"][name] = {"layout": layout}
        if args.torch_compile == "off":
            entry["status"] = "skipped (--torch-compile off)"
            continue
        den_t = Fused(means, covs, w, "torch", layout)
        modes = [args.torch_compile] + (["default"] if args.torch_compile != "default" else [])
        for mode in modes:
            try:
                t0 = time.perf_counter()
                run_c = torch_compiled_sampler(den_t, sigmas, mode)
                with torch.no_grad():
                    outs[name] = np.asarray(run_c(x_t()))
                compile_s[name] = time.perf_counter() - t0
                entry.update(status="ok", mode=mode)
                peers[name] = lambda run_c=run_c: run_c(x_t())
                break
            except Exception as e:  # noqa: BLE001 -- recorded in the JSON instead of a number
                entry.setdefault("failures", []).append(
                    {
                        "mode": mode,
                        "error": f"{type(e).__name__}: {e}"[:2000],
                        "traceback_tail": traceback.format_exc()[-2000:],
                    }  # fmt: skip
                )
        else:
            entry["status"] = "failed"
    ok = [n for n, e in tc["peers"].items() if e["status"] == "ok"]
    tc["status"] = "ok" if ok else tc["peers"][TORCH_COMPILE]["status"]
    with torch.no_grad():
        for name, fn in peers.items():
            if name not in outs:
                outs[name] = np.asarray(fn(), np.float32)
    diffs = {name: float(np.abs(np.asarray(o, np.float32) - ref).max())
             for name, o in outs.items() if name != JAXDIV}  # fmt: skip
    bad = {n: e for n, e in diffs.items() if not math.isfinite(e) or e > 1e-2}
    if bad:
        raise SystemExit(f"implementations disagree with jaxdiv (max abs diff): {bad}")
    fns.update(peers)

    # the denoiser alone, NFE evaluations in one jitted fori_loop
    sig_eval = jnp.asarray(np.concatenate([sigmas[:-1], sigmas[1:-1]]).astype(np.float32))

    def den_loop(dn):
        dynamic, spec = partition(dn)  # arrays traced, as in jaxdiv.sample

        @jax.jit
        def loop(dynamic, x):
            dn = combine(dynamic, spec)
            return jax.lax.fori_loop(0, nfe, lambda i, x: dn(x, sig_eval[i]), x)

        return lambda: loop(dynamic, noise_j).block_until_ready()

    fns[DEN_ONLY], fns[DEN_ONLY_BEFORE] = den_loop(den), den_loop(den_before)

    # the exp floor: B K NFE float32 exps
    n_exp = args.batch * k * nfe
    vals = np.random.default_rng(2).uniform(-10.0, 0.0, n_exp).astype(np.float32)
    vals_j, vals_t, out_np, out_t = jnp.asarray(vals), torch.tensor(vals), np.empty_like(vals), (
        torch.empty(n_exp))  # fmt: skip
    exp_flat = jax.jit(jnp.exp)
    exp_chain = jax.jit(
        lambda a: jax.lax.fori_loop(0, nfe, lambda i, y: jnp.exp(y - 1.0), a)  # y <= 0: no inf
    )
    block = vals_j[: args.batch * k].reshape(k, args.batch)
    floors = {
        FLOOR_PREFIX + "jax exp, flat (jit)": lambda: exp_flat(vals_j).block_until_ready(),
        FLOOR_PREFIX + "jax exp, NFE x (K,B) in fori_loop": lambda: exp_chain(
            block
        ).block_until_ready(),
        FLOOR_PREFIX + "numpy exp, flat": lambda: np.exp(vals, out=out_np),
        FLOOR_PREFIX + "torch exp, flat": lambda: torch.exp(vals_t, out=out_t),
    }
    fns.update(floors)

    with torch.no_grad():
        timed = interleaved(fns, rounds=args.rounds)

    # the compiled program jaxdiv.sample runs, and its thunks per step
    def lowered(dn):
        return sampling.lower(s, dn, noise_j, key=key).compile()

    hlo = {name: step_thunks(lowered(dn).as_text(), args.batch)
           for name, dn in ((JAXDIV, den), (JAXDIV_BEFORE, den_before))}  # fmt: skip
    if args.profile:
        for name in (JAXDIV, JAXDIV_BEFORE):
            prof = profile_thunks(fns[name], calls=3, steps=args.steps)
            rows = hlo[name]["thunks"]
            for row in rows:
                p = prof.get(row["name"])
                row["profiled_us_per_step"] = None if p is None else p["us_per_step"]
            known = [r["profiled_us_per_step"] for r in rows if r["profiled_us_per_step"]]
            hlo[name]["profiled_us_per_heun_step_sum"] = sum(known)
            hlo[name]["profiled_thunks_found"] = len(known)

    # summaries
    jax_runs = timed[JAXDIV]["runs_s"]
    rows = []
    for name, t in timed.items():
        row = {"name": name, "median_s": t["median_s"], "min_s": t["min_s"], "max_s": t["max_s"],
               "runs_s": t["runs_s"], "samples_per_s": args.batch / t["median_s"],
               **_ratio("time_over_jaxdiv", t["runs_s"], jax_runs)}  # fmt: skip
        if name in diffs:
            row["max_abs_diff_vs_jaxdiv"] = diffs[name]
        if name in compile_s:
            row["first_call_s"] = compile_s[name]
        rows.append(row)
    by = {r["name"]: r for r in rows}
    floor_name = min(floors, key=lambda n: timed[n]["median_s"])
    floor = timed[floor_name]
    den_per_eval = timed[DEN_ONLY]["median_s"] / nfe
    jax_step = timed[JAXDIV]["median_s"] / args.steps
    summary = {
        "jaxdiv_median_s": timed[JAXDIV]["median_s"],
        "floor": {
            "name": floor_name,
            "median_s": floor["median_s"],
            "exps": n_exp,
            "gexp_per_s": n_exp / floor["median_s"] / 1e9,
            "jaxdiv_over_floor": timed[JAXDIV]["median_s"] / floor["median_s"],
            **_ratio("jaxdiv_over_floor_per_round", jax_runs, floor["runs_s"]),
            "denoiser_only_over_floor": timed[DEN_ONLY]["median_s"] / floor["median_s"],
        },
        "per_evaluation": {
            "denoiser_us": den_per_eval * 1e6,
            "denoiser_before_us": timed[DEN_ONLY_BEFORE]["median_s"] / nfe * 1e6,
            "exp_floor_us": floor["median_s"] / nfe * 1e6,
            "jaxdiv_heun_step_us": jax_step * 1e6,
            "jaxdiv_step_minus_two_evaluations_us": (jax_step - 2 * den_per_eval) * 1e6,
        },
        **_ratio("jaxdiv_speedup_over_before", timed[JAXDIV_BEFORE]["runs_s"], jax_runs),
    }
    compiled = [n for n in TORCH_COMPILE_LAYOUTS if n in by]
    for name in compiled:
        summary.update(_ratio(TORCH_COMPILE_SUMMARY_KEYS[name], timed[name]["runs_s"], jax_runs))
    tc_ratio = None
    if compiled:  # the goal is against the faster torch.compile formulation
        best = min(compiled, key=lambda n: timed[n]["median_s"])
        summary.update(_ratio("fastest_torch_compile_over_jaxdiv", timed[best]["runs_s"], jax_runs))
        summary["fastest_torch_compile"] = best
        tc_ratio = summary["fastest_torch_compile_over_jaxdiv"]
    goals = {
        "jaxdiv_within_3x_floor": summary["floor"]["jaxdiv_over_floor"] <= 3.0,
        "jaxdiv_2x_faster_than_torch_compile": None if tc_ratio is None else tc_ratio >= 2.0,
    }

    env = environment()
    env["versions"]["torch"] = version("torch")
    env["threads"]["torch_threads"] = torch.get_num_threads()
    prefix = " ".join(
        f"{k}={json.dumps(v) if ' ' in v else v}"
        for k in ("OMP_NUM_THREADS", "XLA_FLAGS", "JAX_PLATFORMS")
        if (v := os.environ.get(k)) is not None
    )
    argv_list = list(sys.argv[1:] if argv is None else argv)
    result = {
        "benchmark": f"EDM Heun, exact GMM (d={d}, K={k}), B={args.batch}, {args.steps} steps "
        f"(NFE {nfe}); CPU float32",
        "command": " ".join(filter(None, [prefix, "python -m benchmarks.toy_sampler", *argv_list])),
        **env,
        "peak_rss_gb": peak_rss_gb(),
        "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "config": {**vars(args), "nfe": nfe, "k": k, "d": d},
        "cross_check": {"passed": True, "tolerance": 1e-2, "max_abs_diff_vs_jaxdiv": diffs},
        "torch_compile": tc,
        "rows": rows,
        "summary": summary,
        "goals": goals,
        "hlo": hlo,
    }
    _print(result)
    write_json(args.out, result)
    print(f"wrote {args.out}", flush=True)
    return result


def _print(res):
    print(res["benchmark"] + f"; {res['config']['rounds']} interleaved rounds")
    head = ("implementation", "median s", "[min - max]", "x jaxdiv [min-max]")
    print(f"{head[0]:40s} {head[1]:>9s} {head[2]:>19s} {head[3]:>20s}")
    for r in res["rows"]:
        lo, hi = r["time_over_jaxdiv_min_max"]
        print(f"{r['name']:40s} {r['median_s']:9.4f} [{r['min_s']:.4f} - {r['max_s']:.4f}] "
              f"{r['time_over_jaxdiv']:7.2f} [{lo:.2f}-{hi:.2f}]")  # fmt: skip
    f, h = res["summary"]["floor"], res["hlo"][JAXDIV]
    print(f"{f['name']}: {f['median_s']:.4f} s ({f['gexp_per_s']:.2f} Gexp/s); "
          f"jaxdiv = {f['jaxdiv_over_floor']:.1f}x floor; "
          f"{h['fusions_per_heun_step']} fusions / {h['thunks_per_heun_step']} thunks per "
          "Heun step; "
          f"torch.compile: {res['torch_compile']['status']}")  # fmt: skip


if __name__ == "__main__":
    main()
