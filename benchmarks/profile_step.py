"""Where a jitted UNet step spends its time on CPU: XLA:CPU thunks grouped by what they do,
and the step's largest matrix products timed against PyTorch's.

    JAX_PLATFORMS=cpu python -m benchmarks.profile_step --config sd21 --latent 64 \\
        --out results/benchmarks/profile_step_sd21_l64.json

One call of the compiled step (random weights, batch 2, pinned to one core unless
``--threads 0``) runs under :func:`jax.profiler.trace`; every XLA:CPU thunk event carries
the HLO instruction it ran (``hlo_op``), which is joined with the compiled module's text:
its shape and JAX name stack (``op_name``) say what it is. Groups:

* ``winograd_gemm``: the 16 products of :mod:`jaxdiv.models.convolution`'s Winograd path
  (its ``winograd_products`` name scope: one batched einsum ``kpc,kco->kpo`` or 16 2-D
  products);
* ``winograd_kernel_transform``: its ``G g G^T`` of each kernel (a ``(16, Cin * Cout)``
  product), recomputed on every call since the kernel is an argument;
* ``attention``: every product and fusion under the blocked attention's scan or an
  einsum with heads (``bhtd`` / ``bhts``), and ``jax.nn.dot_product_attention``;
* ``direct_conv``: XLA's own convolutions (inputs too small for Winograd);
* ``matmul``: the other products (linear layers, 1 x 1 convolutions), fused or not;
* ``elementwise``: loop fusions (normalisations, activations, the Winograd transforms);
* ``other``: the rest (copies, concatenates, reductions outside fusions).

``--malloc reuse`` starts the process again under
:data:`jaxdiv.host_memory.REUSE_FREED_MEMORY` (as ``benchmarks.sd_step``), so the traced
call does not page-fault fresh buffers.

``--gemm-peers N`` then times the N most expensive distinct product shapes of the
``matmul`` and ``winograd_gemm`` groups as plain ``jnp.matmul`` against ``torch.matmul``,
alternating round by round, and reports each one's GFLOP/s: whether XLA:CPU's products
run at PyTorch's rate on this machine. Writes a JSON with the groups' seconds and shares,
the 25 most expensive instructions, the GEMM table and :func:`benchmarks.timing.environment`.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.timing import (
    MALLOC_CHOICES,
    environment,
    interleaved,
    pin_one_core,
    round_ratio_range,
    use_malloc,
)

GROUPS = ("winograd_gemm", "winograd_kernel_transform", "attention", "direct_conv", "matmul",
          "elementwise", "other")  # fmt: skip
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+?)(?:\{[\d,]*\})? ([\w\-]+)\(")


def instructions(hlo_text: str) -> dict[str, dict[str, Any]]:
    """``{name: {"opcode", "kind", "shape", "op_name"}}`` of a compiled module's text.

    >>> text = ('%f.1 = f32[16,8,4]{2,1,0} fusion(%a, %b), kind=kCustom, calls=%c, '
    ...         'metadata={op_name="jit(f)/kpc,kco->kpo/dot_general"}')
    >>> instructions(text)["f.1"]["kind"], instructions(text)["f.1"]["shape"]
    ('kCustom', [16, 8, 4])
    """
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, shape, opcode = m.groups()
        dims = re.match(r"\w+\[([\d,]*)\]", shape)
        kind = re.search(r"kind=(k\w+)", line)
        op_name = re.search(r'op_name="([^"]*)"', line)
        calls = re.search(r"calls=%([\w.\-]+)", line)
        out[name] = {
            "opcode": opcode,
            "kind": kind.group(1) if kind else None,
            "shape": [int(d) for d in dims.group(1).split(",") if d] if dims else [],
            "op_name": op_name.group(1) if op_name else "",
            "calls": calls.group(1) if calls else None,
        }
    return out


def group_of(inst: dict[str, Any]) -> str:
    """The :data:`GROUPS` entry of one instruction of :func:`instructions`.

    >>> group_of({"opcode": "fusion", "kind": "kCustom", "shape": [16, 2048, 320],
    ...           "op_name": "jit(f)/kpc,kco->kpo/dot_general"})
    'winograd_gemm'
    >>> group_of({"opcode": "fusion", "kind": "kCustom", "shape": [2048, 320],
    ...           "op_name": "jit(f)/winograd_products/dot_general"})
    'winograd_gemm'
    >>> group_of({"opcode": "fusion", "kind": "kLoop", "shape": [2, 64], "op_name": "add"})
    'elementwise'
    """
    op, opcode, shape = inst["op_name"], inst["opcode"], inst["shape"]
    if "winograd_products" in op or "kpc,kco->kpo" in op:
        return "winograd_gemm"
    if "dot_general" in op and len(shape) == 2 and shape[0] == 16:
        return "winograd_kernel_transform"
    if "checkpoint" in op or "bhtd" in op or "bhts" in op or "dot_product_attention" in op:
        return "attention"
    if opcode == "convolution" or "conv_general_dilated" in op:
        return "direct_conv"
    if "dot_general" in op or opcode == "dot":
        return "matmul"
    if inst["kind"] == "kLoop" or opcode == "fusion":
        return "elementwise"
    return "other"


def thunk_seconds(trace_dir: str) -> dict[str, float]:
    """Seconds per HLO instruction from a :func:`jax.profiler.trace` folder (the XLA:CPU
    thunk events' ``hlo_op``; the Eigen pool's own events are left out)."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
        events = json.load(f)["traceEvents"]
    out: dict[str, float] = collections.defaultdict(float)
    for e in events:
        op = e.get("args", {}).get("hlo_op")
        if e.get("ph") == "X" and op:
            out[op] += e["dur"] / 1e6
    return dict(out)


def gemm_peers(shapes: list[tuple[tuple[int, ...], tuple[int, ...]]], rounds: int,
               dtype: str = "float32") -> list:  # fmt: skip
    """``jnp.matmul`` vs ``torch.matmul`` on each ``(lhs shape, rhs shape)`` in ``dtype``
    (``"float32"`` or ``"bfloat16"``), interleaved; each one's max abs error to the float64
    product of the same (rounded) operands, relative to that product's largest entry."""
    import jax
    import jax.numpy as jnp
    import torch

    rng = np.random.default_rng(0)
    rows = []
    for sa, sb in shapes:
        aj = jnp.asarray(rng.standard_normal(sa), jnp.float32).astype(dtype)
        bj = jnp.asarray(rng.standard_normal(sb), jnp.float32).astype(dtype)
        a64 = np.asarray(aj.astype(jnp.float32), np.float64)
        b64 = np.asarray(bj.astype(jnp.float32), np.float64)
        at = torch.from_numpy(a64).to(getattr(torch, dtype))
        bt = torch.from_numpy(b64).to(getattr(torch, dtype))
        f = jax.jit(jnp.matmul)
        truth = np.matmul(a64, b64)
        scale = float(np.abs(truth).max())
        errors = {name: float(np.abs(np.asarray(out, np.float64) - truth).max()) / scale
                  for name, out in (("jax", f(aj, bj).astype(jnp.float32)),
                                    ("torch", torch.matmul(at, bt).float().numpy()))}  # fmt: skip
        flops = 2.0 * float(np.prod(sa)) * sb[-1]
        t = interleaved({"jax": lambda f=f, aj=aj, bj=bj: f(aj, bj).block_until_ready(),
                         "torch": lambda at=at, bt=bt: torch.matmul(at, bt)}, rounds)  # fmt: skip
        rows.append({
            "lhs": list(sa), "rhs": list(sb), "dtype": dtype,
            "jax_gflops": flops / t["jax"]["median_s"] / 1e9,
            "torch_gflops": flops / t["torch"]["median_s"] / 1e9,
            "jax_s": t["jax"]["median_s"], "torch_s": t["torch"]["median_s"],
            "jax_min_max_s": [t["jax"]["min_s"], t["jax"]["max_s"]],
            "torch_min_max_s": [t["torch"]["min_s"], t["torch"]["max_s"]],
            "rounds": rounds,
            "torch_over_jax": t["torch"]["median_s"] / t["jax"]["median_s"],
            "per_round_torch_over_jax": round_ratio_range(t, "torch", "jax"),
            "max_rel_error_to_float64": errors,
        })  # fmt: skip
    return rows


def _gemm_shapes(inst: dict[str, Any], hlo_text: str) -> tuple | None:
    """The dot inside a fusion (or a bare dot) as a plain product: ``((M, K), (K, N))`` or
    ``((B, M, K), (B, K, N))`` from its operand shapes and dimension numbers, read from the
    called computation's text; ``None`` where there is no dot."""
    body = hlo_text
    if inst["calls"]:
        start = hlo_text.find(f"%{inst['calls']} ")
        body = hlo_text[start : hlo_text.find("\n}", start)] if start >= 0 else ""
    shapes = {m.group(1): [int(d) for d in m.group(2).split(",") if d]
              for m in re.finditer(r"%([\w.\-]+) = \w+\[([\d,]*)\]", body)}  # fmt: skip
    dot = re.search(r"= \w+\[[\d,]*\]\S* dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)", body)
    if not dot or dot.group(1) not in shapes or dot.group(2) not in shapes:
        return None
    lhs, rhs, attrs = shapes[dot.group(1)], shapes[dot.group(2)], dot.group(3)

    def dims(key):
        m = re.search(key + r"=\{([\d,]*)\}", attrs)
        return [int(d) for d in m.group(1).split(",") if d] if m else []

    lb, lc, rb, rc = (dims(k) for k in ("lhs_batch_dims", "lhs_contracting_dims",
                                         "rhs_batch_dims", "rhs_contracting_dims"))  # fmt: skip
    size = lambda shape, idx: int(np.prod([shape[i] for i in idx]))  # noqa: E731
    free = lambda shape, used: [i for i in range(len(shape)) if i not in used]  # noqa: E731
    b, k = size(lhs, lb), size(lhs, lc)
    m, n = size(lhs, free(lhs, lb + lc)), size(rhs, free(rhs, rb + rc))
    return ((b, m, k), (b, k, n)) if lb else ((m, k), (k, n))


def profile(config: str, latent: int, batch: int, trace_dir: str) -> dict[str, Any]:
    """Compile the UNet step, run it once warm and once traced; return the grouped times."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from benchmarks.sd_step import CONFIGS, TEXT_TOKENS
    from jaxdiv.models.unet import UNet2DConditionModel, UNetConfig

    cfg = CONFIGS[config]
    model = UNet2DConditionModel(UNetConfig.from_dict(cfg), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((batch, 4, latent, latent)), jnp.float32)
    t = jnp.full((batch,), 500, jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((batch, TEXT_TOKENS, cfg["cross_attention_dim"])),
                      jnp.float32)  # fmt: skip

    def step(state, x, t, ctx):
        return nnx.merge(graphdef, state)(x, t, ctx)

    t0 = time.perf_counter()
    compiled = jax.jit(step).lower(state, x, t, ctx).compile()
    compile_s = time.perf_counter() - t0
    compiled(state, x, t, ctx).block_until_ready()
    t0 = time.perf_counter()
    compiled(state, x, t, ctx).block_until_ready()
    step_s = time.perf_counter() - t0
    with jax.profiler.trace(trace_dir):
        t0 = time.perf_counter()
        compiled(state, x, t, ctx).block_until_ready()
        traced_s = time.perf_counter() - t0
    text = compiled.as_text()
    insts = instructions(text)
    secs = thunk_seconds(trace_dir)
    groups: dict[str, dict[str, float]] = {g: {"s": 0.0, "thunks": 0} for g in GROUPS}
    top = []
    for name, s in secs.items():
        inst = insts.get(name)
        if inst is None:
            continue
        g = group_of(inst)
        groups[g]["s"] += s
        groups[g]["thunks"] += 1
        top.append((s, name, g, inst))
    total = sum(v["s"] for v in groups.values())
    for v in groups.values():
        v["share"] = v["s"] / total if total else 0.0
    top.sort(key=lambda r: -r[0])
    gemms: dict[tuple, float] = collections.defaultdict(float)
    for s, _, g, inst in top:
        shapes = _gemm_shapes(inst, text) if g in ("matmul", "winograd_gemm") else None
        if shapes is not None:
            gemms[shapes] += s
    return {
        "config": config, "latent": latent, "batch": batch,
        "compile_s": compile_s, "step_s": step_s, "traced_step_s": traced_s,
        "thunk_total_s": total, "groups": groups,
        "top": [{"s": s, "instruction": n, "group": g, "shape": i["shape"],
                 "op_name": i["op_name"][-120:]} for s, n, g, i in top[:25]],
        "_gemm_shapes": sorted(gemms, key=lambda k: -gemms[k]),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="sd21", help="benchmarks.sd_step CONFIGS key")
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--threads", type=int, choices=(0, 1), default=1,
                        help="1: pin the process to one core; 0: all cores")  # fmt: skip
    parser.add_argument("--gemm-peers", type=int, default=5,
                        help="time this many product shapes against torch (0: none)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--malloc", choices=MALLOC_CHOICES, default="default",
                        help="reuse: restart under jaxdiv.host_memory.REUSE_FREED_MEMORY "
                             "(no fresh-page faults in the traced call)")  # fmt: skip
    parser.add_argument("--out", default="results/benchmarks/profile_step.json")
    args = parser.parse_args(argv)
    use_malloc(args.malloc, argv, "benchmarks.profile_step")
    from benchmarks.sd_step import CONFIGS

    if args.config not in CONFIGS:
        raise ValueError(f"--config must be one of {sorted(CONFIGS)}, got {args.config!r}")
    if args.latent < 8 or args.latent % 8:
        raise ValueError(f"--latent must be a positive multiple of 8, got {args.latent}")
    if args.batch < 1 or args.rounds < 1 or args.gemm_peers < 0:
        raise ValueError("--batch and --rounds must be >= 1 and --gemm-peers >= 0, got "
                         f"{args.batch}, {args.rounds}, {args.gemm_peers}")  # fmt: skip
    if args.threads == 1:
        pin_one_core()
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="profile_step_") as trace_dir:
        result = profile(args.config, args.latent, args.batch, trace_dir)
    shapes = result.pop("_gemm_shapes")[: args.gemm_peers]
    if shapes:
        import torch

        if args.threads == 1:
            torch.set_num_threads(1)
        result["gemm_peers"] = gemm_peers(shapes, args.rounds)
        result["torch_version"] = torch.__version__
        result["timing"] = "gemm_peers: jax and torch alternating, median [min-max] of rounds"
    result["threads"] = args.threads
    result["malloc"] = args.malloc
    result["environment"] = environment()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    from experiments.common import write_json

    write_json(out, result)
    print(f"{args.config} latent {args.latent} batch {args.batch}: step {result['step_s']:.2f} s "
          f"(thunks {result['thunk_total_s']:.2f} s)")  # fmt: skip
    for g, v in result["groups"].items():
        print(f"  {g:26s} {v['s']:8.3f} s  {100 * v['share']:5.1f}%  ({v['thunks']} thunks)")
    for r in result.get("gemm_peers", []):
        print(f"  {str(r['lhs']):>18s} @ {str(r['rhs']):18s} jax {r['jax_gflops']:6.1f} GFLOP/s"
              f"  torch {r['torch_gflops']:6.1f} GFLOP/s")  # fmt: skip
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
