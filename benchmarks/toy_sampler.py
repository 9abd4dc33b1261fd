"""EDM Heun on an exact GMM (d=2, K=8, B=4096, 64 steps): jaxdiv vs eager PyTorch and NumPy.

    python -m benchmarks.toy_sampler [--batch 4096] [--steps 64] [--repeats 5]

The same algorithm (Karras Alg. 2 without churn, exact full-covariance posterior mean)
in one process: jaxdiv (one jitted lax.scan), PyTorch eager written naively (a Python
loop over components), PyTorch eager fused in the (B, K, d) layout and in jaxdiv's
component-major (K, d, B) layout, and NumPy fused. All outputs are checked against each
other before timing. Prints samples/s and ratios, writes ``results/bench_toy_sampler.json``.
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxdiv
import toy
from experiments.common import write_json
from jaxdiv import samplers, schedules


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
        self.m, self.c, self.lw = (
            torch.tensor(means),
            torch.tensor(covs),
            torch.log(torch.tensor(w)),
        )

    def __call__(self, x, s):
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
    does; reductions over K and d vectorise across the batch) -- the careful version;
    ``"batch_major"`` is the ``(B, K, d)`` layout one writes first.
    """

    def __init__(self, means, covs, w, lib, layout="component_major"):
        lam, u = np.linalg.eigh(covs)
        self.lib, self.layout = lib, layout
        t = (lambda a: torch.tensor(a)) if lib == "torch" else (lambda a: a)
        self.m, self.lam, self.u, self.lw = t(means), t(lam), t(u), t(np.log(w))
        self.pm = t(np.einsum("kd,kde->ke", means, u))

    def _softmax(self, logits, axis):
        if self.lib == "torch":
            return torch.softmax(logits, axis)
        e = np.exp(logits - logits.max(axis, keepdims=True))
        return e / e.sum(axis, keepdims=True)

    def __call__(self, x, s):
        L = torch if self.lib == "torch" else np
        var = self.lam + s * s
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


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, float(np.median(times))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="results/bench_toy_sampler.json")
    args = ap.parse_args(argv)
    means, covs, w = make_gmm()
    sch = schedules.edm()
    s = samplers.edm(sch, args.steps)
    sigmas = np.asarray(s.times, np.float64)
    noise = np.random.default_rng(1).normal(size=(args.batch, 2)).astype(np.float32)
    x_init = (sigmas[0] * noise).astype(np.float32)

    gm = toy.GaussianMixture(means, covs, w)
    den = gm.denoiser(sch)
    run_jax = lambda: jaxdiv.sample(
        s, den, jnp.asarray(noise), key=jax.random.key(0)
    ).x0.block_until_ready()
    t0 = time.perf_counter()
    ref = np.asarray(run_jax())
    compile_s = time.perf_counter() - t0
    _, t_jax = timed(run_jax, args.repeats)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = {"jaxdiv (jit, lax.scan)": t_jax}
    x_t = lambda: torch.tensor(x_init)
    impls = {
        "torch eager, naive": lambda: heun_loop(TorchNaive(means, covs, w), x_t(), sigmas),
        "torch eager, fused (B,K,d)": lambda: heun_loop(
            Fused(means, covs, w, "torch", "batch_major"), x_t(), sigmas
        ),
        "torch eager, fused (K,d,B)": lambda: heun_loop(
            Fused(means, covs, w, "torch"), x_t(), sigmas
        ),
        "numpy, fused (K,d,B)": lambda: heun_loop(Fused(means, covs, w, "numpy"), x_init, sigmas),
    }
    with torch.no_grad():
        for name, fn in impls.items():
            out, t = timed(fn, max(1, args.repeats // 2))
            err = float(np.abs(np.asarray(out, np.float32) - ref).max())
            if not math.isfinite(err) or err > 1e-2:
                raise SystemExit(f"{name} disagrees with jaxdiv: max abs diff {err}")
            results[name] = t
    best_torch = min(t for name, t in results.items() if name.startswith("torch"))
    print(
        f"EDM Heun, exact GMM (d=2, K=8), B={args.batch}, {args.steps} steps "
        f"(NFE {s.nfe}); jaxdiv compile {compile_s:.2f}s"
    )
    print(f"{'implementation':28s} {'seconds':>9s} {'samples/s':>12s} {'jaxdiv speed-up':>16s}")
    rows = []
    for name, t in results.items():
        rows.append(
            {
                "impl": name,
                "seconds": t,
                "samples_per_s": args.batch / t,
                "jaxdiv_speedup": t / t_jax,
            }
        )
        print(f"{name:28s} {t:9.4f} {args.batch / t:12.0f} {t / t_jax:15.1f}x")
    print(f"jaxdiv vs best eager PyTorch: {best_torch / t_jax:.1f}x")
    write_json(
        args.out,
        {
            "config": vars(args),
            "machine": platform.processor() or platform.machine(),
            "cpu_count": jax.device_count(),
            "backend": jax.default_backend(),
            "jaxdiv_compile_seconds": compile_s,
            "rows": rows,
            "speedup_vs_best_torch": best_torch / t_jax,
        },
    )


if __name__ == "__main__":
    main()
