"""Attention kernel on CPU: jaxdiv's blocked ``attention_core`` vs ``jax.nn.dot_product_attention``
vs PyTorch ``scaled_dot_product_attention``.

Multi-head self-attention ``softmax(Q K^T / sqrt(D)) V`` on random float32 ``(B, T, H, D)``
arrays, the shape of Stable Diffusion's UNet self-attention: ``--seq 4096`` is the first
down block at 512 px (64 x 64 latent pixels, 5 heads x 64 in SD 2.1), ``--seq 1024`` the
second. Three implementations, each jitted (JAX) or eager (PyTorch) and given the same
inputs:

  * ``blocked``: :func:`jaxdiv.models.layers.attention_core` with
    ``implementation="blocked"`` (online softmax over key blocks, plain JAX);
  * ``xla``: :func:`jax.nn.dot_product_attention` (what ``attention_core`` used before;
    it materialises the ``T x S`` logits);
  * ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' kernel).

Outputs are compared before timing (max abs difference of each to ``blocked``); then the
implementations alternate A B C A B C over ``--rounds`` rounds
(:func:`benchmarks.timing.interleaved`, after one warm-up call each): median [min-max].

``--tune`` adds rows sweeping the blocked path's ``kv_block`` at every ``--seq`` and the
dense-vs-blocked crossover over ``--tune-seqs`` (how ``BLOCKED_KV_BLOCK`` and
``BLOCKED_MIN_KEYS`` in :mod:`jaxdiv.models.layers` were chosen).

Run (CPU, one core for both libraries; ``taskset`` pins the process, since XLA:CPU keeps
using every core under the ``XLA_FLAGS`` thread settings):
    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu taskset -c 0 python -m benchmarks.attention \
    --seq 4096,1024 --rounds 5

``--smoke`` runs a tiny shape for one round (the test of this script).

Writes ``results/benchmarks/attention.json`` (``--out`` to change); ``ratio_*`` fields are
time / blocked time (> 1: blocked faster), from the medians.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import interleaved
from jaxdiv.models.layers import attention_core


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _inputs(batch: int, seq: int, heads: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal((batch, seq, heads, dim)).astype(np.float32) for _ in "qkv")


def _summary(timed: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    t = timed[name]
    return {f"{name}_s": t["median_s"], f"{name}_min_max_s": [t["min_s"], t["max_s"]],
            f"{name}_runs_s": t["runs_s"]}  # fmt: skip


def measure(
    *, batch: int, seq: int, heads: int, dim: int, rounds: int, kv_block: int | None = None,
    torch_too: bool = True, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Time blocked vs xla (vs torch) attention on one shape; returns a result row."""
    q, k, v = _inputs(batch, seq, heads, dim, seed)
    qj, kj, vj = (jnp.asarray(x) for x in (q, k, v))
    blocked = jax.jit(
        lambda q, k, v: attention_core(q, k, v, implementation="blocked", kv_block=kv_block)
    )
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"))
    out_b = np.asarray(blocked(qj, kj, vj))
    out_x = np.asarray(xla(qj, kj, vj))
    fns = {
        "blocked": lambda: blocked(qj, kj, vj).block_until_ready(),
        "xla": lambda: xla(qj, kj, vj).block_until_ready(),
    }
    row: dict[str, Any] = dict(
        batch=batch, seq_q=seq, seq_kv=seq, heads=heads, head_dim=dim, dtype="float32",
        kv_block=kv_block, rounds=rounds, max_abs_diff_xla=float(np.abs(out_x - out_b).max()),
    )  # fmt: skip
    if torch_too:
        import torch
        import torch.nn.functional as F

        # torch SDPA takes (B, H, T, D)
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        with torch.no_grad():
            out_t = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2).numpy()
        row["max_abs_diff_torch"] = float(np.abs(out_t - out_b).max())

        def run_torch():
            with torch.no_grad():
                F.scaled_dot_product_attention(qt, kt, vt)

        fns["torch"] = run_torch
    timed = interleaved(fns, rounds)  # A B C A B C: the same machine load for all
    for name in fns:
        row.update(_summary(timed, name))
    for name in fns:
        if name != "blocked":
            row[f"ratio_{name}_over_blocked"] = row[f"{name}_s"] / row["blocked_s"]
    row["timing"] = "interleaved A B C, median [min-max]"
    row["peak_rss_gb"] = peak_rss_gb()
    return row


def _fmt(row: dict[str, Any]) -> str:
    def ms(name):
        lo, hi = row[f"{name}_min_max_s"]
        return f"{name} {row[f'{name}_s'] * 1e3:8.1f} ms [{lo * 1e3:.1f}-{hi * 1e3:.1f}]"

    names = [n for n in ("blocked", "xla", "torch") if f"{n}_s" in row]
    ratios = "  ".join(f"{n}/blocked {row[f'ratio_{n}_over_blocked']:.2f}" for n in names[1:])
    return (
        f"T=S={row['seq_q']:5d} kv_block={row['kv_block']}:  "
        + "  ".join(ms(n) for n in names)
        + f"  {ratios}  max|diff xla| {row['max_abs_diff_xla']:.1e}"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seq", default="4096,1024", help="comma-separated T = S")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="add kv_block / crossover sweeps")
    parser.add_argument("--tune-blocks", default="128,256,512,1024,2048")
    parser.add_argument("--tune-seqs", default="256,512,1024,2048")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 round")
    parser.add_argument("--out", default="results/benchmarks/attention.json")
    args = parser.parse_args(argv)
    try:
        seqs, blocks, tune_seqs = _ints(args.seq), _ints(args.tune_blocks), _ints(args.tune_seqs)
    except ValueError as e:
        parser.error(f"--seq, --tune-blocks and --tune-seqs are comma-separated ints ({e})")
    if args.smoke:
        seqs, args.rounds, args.batch, args.heads, args.dim = [40], 1, 2, 2, 8
        blocks, tune_seqs = [16], [24]
    if min([args.batch, args.heads, args.dim, args.rounds, args.torch_threads] + seqs) < 1:
        parser.error("--batch, --heads, --dim, --rounds, --torch-threads, --seq must be >= 1")
    torch_threads_before = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        return _run(args, seqs, blocks, tune_seqs, argv)
    finally:
        torch.set_num_threads(torch_threads_before)  # in-process callers (tests) keep theirs


def _run(args, seqs, blocks, tune_seqs, argv) -> dict[str, Any]:
    import torch

    shape = dict(batch=args.batch, heads=args.heads, dim=args.dim, rounds=args.rounds)

    rows = []
    for seq in seqs:
        rows.append(dict(kind="compare", **measure(seq=seq, **shape)))
        print(_fmt(rows[-1]), flush=True)
    if args.tune:
        for seq in seqs:
            for block in blocks:
                row = measure(seq=seq, kv_block=block, torch_too=False, **shape)
                rows.append(dict(kind="tune_kv_block", **row))
                print(_fmt(rows[-1]), flush=True)
        for seq in tune_seqs:
            rows.append(dict(kind="tune_crossover", **measure(seq=seq, torch_too=False, **shape)))
            print(_fmt(rows[-1]), flush=True)

    from benchmarks.timing import environment
    from jaxdiv.models import layers

    env = environment()
    result = dict(
        benchmark="multi-head attention, float32 CPU: attention_core blocked vs "
        "jax.nn.dot_product_attention (xla) vs torch scaled_dot_product_attention",
        command=" ".join(
            ["python -m benchmarks.attention"] + list(sys.argv[1:] if argv is None else argv)
        ),
        date=env["date"],
        defaults=dict(
            BLOCKED_KV_BLOCK=layers.BLOCKED_KV_BLOCK, BLOCKED_MIN_KEYS=layers.BLOCKED_MIN_KEYS
        ),
        versions=env["versions"] | {"torch": torch.__version__},
        threads=dict(
            torch_threads=torch.get_num_threads(),
            env=env["threads"] | {"MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS")},
            cpu_affinity=env["cpu_affinity"],
            cpu_count=env["cpu_count"],
        ),
        jax_devices=env["jax_devices"],
        load_average=env["load_average"],
        cpu=env["cpu"],
        peak_rss_gb=peak_rss_gb(),
        rows=rows,
    )
    out = Path(args.out)
    from experiments.common import write_json

    write_json(out, result)
    print(f"wrote {out}", flush=True)
    return result


if __name__ == "__main__":
    main()
