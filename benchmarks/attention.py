"""Attention kernel on CPU: jaxdiv's blocked ``attention_core`` vs ``jax.nn.dot_product_attention``
vs PyTorch ``scaled_dot_product_attention``.

Multi-head attention ``softmax(Q K^T / sqrt(D)) V`` on random float32 ``(B, T, H, D)``
arrays, the shapes of Stable Diffusion's UNet: ``--seq 4096`` is the first down block's
self-attention at 512 px (64 x 64 latent pixels, 5 heads x 64 in SD 2.1), ``--seq 1024`` the
second's, ``--seq 4096x77`` the first block's cross-attention to 77 text tokens. Five
implementations, each jitted (JAX) or eager (PyTorch) and given the same inputs:

  * ``blocked``: :func:`jaxdiv.models.layers.attention_core` with
    ``implementation="blocked"`` (online softmax over key blocks, plain JAX; on CPU one
    (batch, head) pair after another);
  * ``looped`` / ``vmapped``: the same blocked computation with the (batch, head) pairs
    forced to run one after another / vmapped, i.e. every product batched over the pairs
    (what the blocked path did before; ``blocked`` loops on CPU over several key blocks);
  * ``xla``: :func:`jax.nn.dot_product_attention` (``attention_core``'s choice below the
    threshold; it materialises the ``T x S`` logits);
  * ``torch``: ``torch.nn.functional.scaled_dot_product_attention`` (diffusers' kernel).

Outputs are compared before timing (max abs difference of each to ``blocked``); then the
implementations alternate A B C D E A B C D E over ``--rounds`` rounds
(:func:`benchmarks.timing.interleaved`, after one warm-up call each): median [min-max].

``--tune`` adds rows sweeping the blocked path's ``kv_block`` at every ``--seq`` and the
blocked-vs-xla crossover over ``--tune-seqs`` (how ``BLOCKED_KV_BLOCK`` and
``BLOCKED_MIN_LOGITS`` in :mod:`jaxdiv.models.layers` were chosen).

Run (CPU, one core for both libraries; ``taskset`` pins the process, since XLA:CPU keeps
using every core under the ``XLA_FLAGS`` thread settings):
    OMP_NUM_THREADS=1 JAX_PLATFORMS=cpu taskset -c 0 python -m benchmarks.attention \
    --seq 4096,1024,4096x77 --rounds 5

``--malloc reuse`` restarts the process under :data:`jaxdiv.host_memory.REUSE_FREED_MEMORY`
(glibc keeps freed memory, so neither library's calls page-fault fresh buffers; without it
identical programs timed one after another differed by 10-18% here).

``--backward`` times one forward and one backward pass instead (the output and its
gradients with respect to ``q``, ``k`` and ``v`` at a random cotangent, ``jax.vjp`` against
torch autograd), as when GASS and TPSO backpropagate through CLIP's attention (CLIP
ViT-H/14: ``--seq 257 --heads 16 --dim 80``; its text encoder ``--seq 77 --heads 16``); the
gradients are compared too.

``--smoke`` runs a tiny shape for one round (the test of this script).

Writes ``results/benchmarks/attention.json`` (``--out`` to change); ``ratio_*`` fields are
time / blocked time (> 1: blocked faster), from the medians.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import MALLOC_CHOICES, interleaved, ready, use_malloc
from jaxdiv.models import layers
from jaxdiv.models.layers import attention_core


def peak_rss_gb() -> float:
    """Peak resident memory of this process so far (Linux ``ru_maxrss`` is in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _inputs(batch: int, seq_q: int, seq_kv: int, heads: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((batch, seq_q, heads, dim)).astype(np.float32)
    return (q, *(rng.standard_normal((batch, seq_kv, heads, dim)).astype(np.float32) for _ in "kv"))


def _summary(timed: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    t = timed[name]
    return {f"{name}_s": t["median_s"], f"{name}_min_max_s": [t["min_s"], t["max_s"]],
            f"{name}_runs_s": t["runs_s"]}  # fmt: skip


def _vjp(f, cotangent):
    """``(q, k, v) -> (out, (dq, dk, dv))`` of ``f`` at a fixed cotangent of its output: one
    forward and one backward pass, as a guidance term backpropagating through attention."""

    def both(q, k, v):
        out, pullback = jax.vjp(f, q, k, v)
        return out, pullback(cotangent)

    return both


def measure(
    *, batch: int, seq: tuple[int, int], heads: int, dim: int, rounds: int,
    kv_block: int | None = None, torch_too: bool = True, heads_too: bool = False, seed: int = 0,
    backward: bool = False,
) -> dict[str, Any]:  # fmt: skip
    """Time blocked vs xla (vs looped / vmapped heads, vs torch) on one (T, S); a result row.
    ``backward``: time the output and the gradients with respect to ``q``, ``k`` and ``v``
    at a random cotangent instead, and compare the gradients too."""
    q, k, v = _inputs(batch, *seq, heads, dim, seed)
    ct = np.random.default_rng(seed + 1).standard_normal(q.shape[:3] + v.shape[3:])
    ct = ct.astype(np.float32)
    qj, kj, vj = (jnp.asarray(x) for x in (q, k, v))
    jitted = {
        "blocked": lambda q, k, v: attention_core(
            q, k, v, implementation="blocked", kv_block=kv_block
        ),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation="xla"),
    }
    if heads_too:  # the blocked path with the (batch, head) pairs forced looped / vmapped
        for name, loop in (("looped", True), ("vmapped", False)):
            jitted[name] = functools.partial(
                layers._blocked_attention, scale=dim**-0.5, mask=None, is_causal=False,
                kv_block=kv_block or layers.BLOCKED_KV_BLOCK, loop_heads=loop,
            )  # fmt: skip
    if backward:
        jitted = {name: _vjp(f, jnp.asarray(ct)) for name, f in jitted.items()}
    jitted = {name: jax.jit(f) for name, f in jitted.items()}
    # the output, then (backward) the three gradients, each as one flat array
    outs = {name: [np.asarray(a) for a in jax.tree.leaves(f(qj, kj, vj))]
            for name, f in jitted.items()}  # fmt: skip
    fns = {name: functools.partial(ready, f, qj, kj, vj) for name, f in jitted.items()}
    row: dict[str, Any] = dict(
        batch=batch, seq_q=seq[0], seq_kv=seq[1], heads=heads, head_dim=dim, dtype="float32",
        kv_block=kv_block, rounds=rounds, backward=backward,
    )  # fmt: skip

    def max_diff(got):
        return float(max(np.abs(a - b).max() for a, b in zip(got, outs["blocked"], strict=True)))

    for name in outs:
        if name != "blocked":
            row[f"max_abs_diff_{name}"] = max_diff(outs[name])
    if torch_too:
        import torch
        import torch.nn.functional as F

        # torch SDPA takes (B, H, T, D)
        qt, kt, vt = (torch.from_numpy(x).transpose(1, 2).contiguous() for x in (q, k, v))
        ct_t = torch.from_numpy(ct).transpose(1, 2).contiguous()

        def run_torch():
            if not backward:
                with torch.no_grad():
                    return [F.scaled_dot_product_attention(qt, kt, vt)]
            leaves = [x.detach().requires_grad_(True) for x in (qt, kt, vt)]
            out = F.scaled_dot_product_attention(*leaves)
            out.backward(ct_t)
            return [out.detach(), *(x.grad for x in leaves)]

        row["max_abs_diff_torch"] = max_diff([a.transpose(1, 2).numpy() for a in run_torch()])
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

    names = [n for n in ("blocked", "looped", "vmapped", "xla", "torch") if f"{n}_s" in row]
    ratios = "  ".join(f"{n}/blocked {row[f'ratio_{n}_over_blocked']:.2f}" for n in names[1:])
    return (
        f"T={row['seq_q']:5d} S={row['seq_kv']:5d} kv_block={row['kv_block']}:  "
        + "  ".join(ms(n) for n in names)
        + f"  {ratios}  max|diff xla| {row['max_abs_diff_xla']:.1e}"
    )


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _seqs(text: str) -> list[tuple[int, int]]:
    """``"4096,4096x77"`` -> ``[(4096, 4096), (4096, 77)]``: T = S, or T x S."""
    pairs = [[int(n) for n in x.split("x")] for x in text.split(",") if x]
    if any(len(p) > 2 for p in pairs):
        raise ValueError(f"each entry is T or TxS, got {text!r}")
    return [(p[0], p[-1]) for p in pairs]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Parse arguments, measure, write the JSON; returns the written dict."""
    import torch

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.attention", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--seq", default="4096,1024", help="comma-separated T (= S) or TxS (cross-attention)"
    )
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--heads", type=int, default=5)
    parser.add_argument("--dim", type=int, default=64, help="head dim")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--tune", action="store_true", help="add kv_block / crossover sweeps")
    parser.add_argument("--tune-blocks", default="128,256,512,1024,2048")
    parser.add_argument("--tune-seqs", default="64,77,128,256,1024x77", help="as --seq")
    parser.add_argument("--backward", action="store_true",
                        help="time the output and its gradients (q, k, v) at a random "
                             "cotangent: GASS and TPSO backpropagate through CLIP's attention")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 1 round")
    parser.add_argument(
        "--malloc",
        choices=MALLOC_CHOICES,
        default="default",
        help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY",
    )
    parser.add_argument("--out", default="results/benchmarks/attention.json")
    args = parser.parse_args(argv)
    use_malloc(args.malloc, argv, "benchmarks.attention")
    try:
        seqs, blocks, tune_seqs = _seqs(args.seq), _ints(args.tune_blocks), _seqs(args.tune_seqs)
    except ValueError as e:
        parser.error(f"--seq, --tune-seqs take T or TxS, --tune-blocks ints, comma-separated ({e})")
    if args.smoke:
        seqs, args.rounds, args.batch, args.heads, args.dim = [(40, 40)], 1, 2, 2, 8
        blocks, tune_seqs = [16], [(24, 24)]
    sizes = [args.batch, args.heads, args.dim, args.rounds, args.torch_threads, *blocks]
    if min(sizes + [n for pair in seqs + tune_seqs for n in pair]) < 1:
        parser.error("--batch, --heads, --dim, --rounds, --torch-threads, --seq must be >= 1")
    torch_threads_before = torch.get_num_threads()
    torch.set_num_threads(args.torch_threads)
    try:
        return _run(args, seqs, blocks, tune_seqs, argv)
    finally:
        torch.set_num_threads(torch_threads_before)  # in-process callers (tests) keep theirs


def _run(args, seqs, blocks, tune_seqs, argv) -> dict[str, Any]:
    import torch

    shape = dict(batch=args.batch, heads=args.heads, dim=args.dim, rounds=args.rounds,
                 backward=args.backward)  # fmt: skip

    rows = []
    for seq in seqs:
        rows.append(dict(kind="compare", **measure(seq=seq, heads_too=True, **shape)))
        print(_fmt(rows[-1]), flush=True)
    if args.tune:
        for seq in seqs:
            for block in blocks:
                row = measure(seq=seq, kv_block=block, torch_too=False, **shape)
                rows.append(dict(kind="tune_kv_block", **row))
                print(_fmt(rows[-1]), flush=True)
        for seq in tune_seqs:
            row = measure(seq=seq, torch_too=False, heads_too=True, **shape)
            rows.append(dict(kind="tune_crossover", **row))
            print(_fmt(rows[-1]), flush=True)

    from benchmarks.timing import environment

    env = environment()
    result = dict(
        benchmark="multi-head attention, float32 CPU: attention_core blocked vs "
        "jax.nn.dot_product_attention (xla) vs torch scaled_dot_product_attention"
        + (", forward and gradients (q, k, v)" if args.backward else ""),
        command=" ".join(
            ["python -m benchmarks.attention"] + list(sys.argv[1:] if argv is None else argv)
        ),
        date=env["date"],
        malloc=args.malloc,
        defaults=dict(
            BLOCKED_KV_BLOCK=layers.BLOCKED_KV_BLOCK,
            BLOCKED_MIN_LOGITS=layers.BLOCKED_MIN_LOGITS,
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
