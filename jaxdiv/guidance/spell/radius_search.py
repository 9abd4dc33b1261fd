"""Exact radius search and SPELL's repulsion sum over large shield sets, in bounded memory.

SPELL's correction (Kirchhof et al. 2025, Eq. 5) only involves the shields whose centre
lies within ``r`` of a sample's ``x0_hat``; with ``10^5``-``10^6`` shields almost all of
them are far away. :func:`repulsion` exploits this *without approximation*:

1. the shields are stored in fixed-size blocks (:func:`build_index`); a ``lax.scan`` over
   the blocks computes squared distances to the queries with one matmul per block
   (``|q|^2 + |z|^2 - 2 q.z`` on coordinates centred at the shields' mean, at
   ``Precision.HIGHEST``) and marks *candidates* within ``r`` plus a float-error margin;
2. only blocks (and sub-blocks) holding a candidate run the exact pass — direct
   differences ``q - z`` — and add their shields' ``delta_k`` to the correction.

Memory is ``O(B * block_size)`` for the matmul and ``O(B * sub_block * d)`` for the exact
pass (bounded by ``exact_bytes``), whatever the number of shields. False candidates cost
time only (their exact weight is 0); the margin is far above float32 rounding, so no
shield within ``r`` is missed. The paper instead retrieves neighbours with an approximate
faiss IVF index (App. I); :func:`build_ivf` / :func:`ivf_repulsion` reproduce that
approximation in JAX for comparison.

A sample whose ``x0_hat`` coincides *exactly* with a centre (a memorising model returns
training points bit for bit) has no direction ``x0_hat - z``; the minimal move of Eq. 5 is
then taken along a fallback direction ``a_i - a_k`` given by per-shield *anchors* (SPELL
uses the noisy states: ``x_t^i - alpha z_k`` for static shields, ``x_t^i - x_t^k`` within a
batch). Any unit direction lands exactly on the sphere of radius ``r``. When the anchors
coincide too (two identical rows of noise on a deterministic sampler) or there are none
(feature space), Eq. 5 is 0/0 twice over; the tie is broken by a fixed unit direction per
(query, shield) pair, opposite for the two members of a batch pair, so the two particles
end ``2r`` apart after the correction instead of staying on top of each other.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiv import validation
from jaxdiv.grouping import branch

__all__ = [
    "ShieldIndex",
    "Repulsion",
    "Nearest",
    "IVFIndex",
    "build_index",
    "repulsion",
    "nearest",
    "build_ivf",
    "ivf_repulsion",
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_EXACT_BYTES",
]

DEFAULT_BLOCK_SIZE = 4096
DEFAULT_EXACT_BYTES = 1 << 26  # 64 MiB for one (B, sub_block, d) tile of the exact pass
_HI = lax.Precision.HIGHEST
# candidate margin on squared distances, relative to |q - c|^2 + |z - c|^2: float32 dot
# products of length d carry ~sqrt(d) * 6e-8 relative error, far below 1e-4
_CAND_REL_TOL = 1e-4


class ShieldIndex(NamedTuple):
    """Shield centres in fixed-size blocks for :func:`repulsion` and :func:`nearest`.

    Attributes:
        points: ``(num_blocks, block_size, d)`` the centres *relative to* ``centre``
            (``z - centre``; padding rows are zeros and marked invalid). Working around
            the mean keeps float32 rounding proportional to the data's spread, not to
            its distance from the origin.
        sq_norms: ``(num_blocks, block_size)`` ``|z - centre|^2``.
        valid: ``(num_blocks, block_size)`` False on padding rows.
        centre: ``(d,)`` the mean of the centres.

    Built by :func:`build_index`; five centres in blocks of two leave one padding row:

    >>> import jax.numpy as jnp
    >>> idx = build_index(jnp.arange(10.0).reshape(5, 2), block_size=2)
    >>> idx.dim, idx.block_size, idx.valid.tolist(), idx.centre.tolist()
    (2, 2, [[True, True], [True, True], [True, False]], [4.0, 5.0])
    """

    points: jax.Array
    sq_norms: jax.Array
    valid: jax.Array
    centre: jax.Array

    @property
    def dim(self) -> int:
        return self.points.shape[-1]

    @property
    def block_size(self) -> int:
        return self.points.shape[1]

    def flat_points(self):
        """``(num_blocks * block_size, d)`` centres (absolute coordinates), padding included."""
        return self.points.reshape(-1, self.dim) + self.centre


class Repulsion(NamedTuple):
    """Result of :func:`repulsion`: ``delta (B, d)`` (Eq. 5, before overcompensation)
    and ``count (B,)``, the number of shields strictly within the radius."""

    delta: jax.Array
    count: jax.Array


class Nearest(NamedTuple):
    """Result of :func:`nearest`: exact ``distances (B, k)`` (ascending) and ``indices``."""

    distances: jax.Array
    indices: jax.Array


def _as_matrix(points, name):
    if not hasattr(points, "shape"):
        raise TypeError(f"{name} must be an array, got {type(points).__name__}")
    points = jnp.asarray(points)
    if points.ndim < 2:
        raise ValueError(f"{name} must have shape (K, d) or (K, ...), got shape {points.shape}")
    if not jnp.issubdtype(points.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array, got dtype {points.dtype}")
    return points.reshape(points.shape[0], -1).astype(jnp.float32)


def build_index(points, block_size: int = DEFAULT_BLOCK_SIZE, centre=None) -> ShieldIndex:
    """Store ``points`` (``(K, ...)``, flattened per row) as a :class:`ShieldIndex`.

    ``block_size`` rows are compared with the queries per ``lax.scan`` iteration (one
    ``(B, block_size)`` matmul); it is clipped to ``K``. The matmul's memory is
    ``4 * B * block_size`` bytes whatever ``K``. ``centre`` (default: the mean of the
    points) is the origin the blocks are stored around; any finite ``(d,)`` vector gives
    the same repulsion up to float rounding.

    >>> idx = build_index(jnp.arange(10.0).reshape(5, 2), block_size=2)
    >>> idx.points.shape, idx.valid.sum().item()
    ((3, 2, 2), 5)
    """
    pts = _as_matrix(points, "points")
    block_size = validation.integer("block_size", block_size, 1)
    k, d = pts.shape
    if k < 1:
        raise ValueError("points must hold at least one shield centre, got K=0")
    validation.finite_array("points", pts)
    bs = int(min(block_size, k))
    nb = -(-k // bs)
    if centre is None:
        centre = jnp.mean(pts, axis=0)
    else:
        centre = jnp.asarray(centre, jnp.float32)
        if centre.shape != (d,):
            raise ValueError(f"centre must have shape ({d},), got {centre.shape}")
        validation.finite_array("centre", centre)
    pad = nb * bs - k
    padded = jnp.concatenate([pts - centre, jnp.zeros((pad, d), pts.dtype)], axis=0)
    blocks = padded.reshape(nb, bs, d)
    sq = jnp.sum(blocks * blocks, axis=-1)
    valid = jnp.asarray(np.arange(nb * bs).reshape(nb, bs) < k)
    return ShieldIndex(blocks, sq, valid, centre)


def _dot_rows(a, b):
    """``a @ b.T`` without materialising the transpose, in full float32 precision."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_HI)


def _sub_block(bs, b, d, exact_bytes):
    """Largest divisor of ``bs`` whose ``(B, sub, d)`` float32 tile fits ``exact_bytes``
    (1 if none does: one shield at a time is the smallest tile there is).

    Any block size works, odd or prime: halving alone would stop at the first odd size.

    >>> _sub_block(9, 4, 8, 4 * 4 * 3 * 8)     # 9 -> 3, not stuck at the odd 9
    3
    """
    divisors = {k for i in range(1, int(bs**0.5) + 1) if bs % i == 0 for k in (i, bs // i)}
    fitting = [k for k in divisors if 4 * b * k * d <= exact_bytes]
    return max(fitting) if fitting else 1


_TIE_SEED = 0x5BE11  # fixed: the tie-break directions are part of the algorithm, not random


def _tie_directions(qid, zid, d, symmetric):
    """``(B, K, d)`` unit directions for queries sitting exactly on a shield centre whose
    anchor direction is zero too (or absent): a fixed direction per (query, shield) pair,
    drawn from a key folded with the pair's ids. With ``symmetric`` (intra-batch: the
    shields are the queries) the pair is unordered and the sign is ``+`` for the larger
    id, so two coinciding particles are pushed in exactly opposite directions."""
    qq = jnp.broadcast_to(qid[:, None], (qid.shape[0], zid.shape[0]))
    zz = jnp.broadcast_to(zid[None, :], qq.shape)
    a, b = (jnp.minimum(qq, zz), jnp.maximum(qq, zz)) if symmetric else (qq, zz)
    base = jax.random.key(_TIE_SEED)

    def one(i, k):
        # float32 whatever jax_enable_x64 says: the search is float32 (a float64 draw
        # would change the directions and break the lax.cond branches' types)
        v = jax.random.normal(jax.random.fold_in(jax.random.fold_in(base, i), k), (d,),
                              jnp.float32)
        return v * lax.rsqrt(jnp.maximum(jnp.sum(v * v), jnp.finfo(v.dtype).tiny))

    u = jax.vmap(jax.vmap(one))(a, b)
    if symmetric:
        u = u * jnp.where(qq > zz, 1.0, -1.0)[..., None]
    return u


def _exact_delta(q, z, cand, r2, radius, qa, za, qid, zid, symmetric):
    """Eq. 5 over one tile: ``sum_k 1[|q - z_k| < r] delta_k(q)`` with direct differences.

    ``delta_k = (r / |q - z_k| - 1)(q - z_k)``; where ``q == z_k`` exactly (Eq. 5 is 0/0),
    the minimal move ``r u`` along the unit anchor direction ``u = (qa - za_k)/|qa - za_k|``,
    or, when that is zero too (identical noise on a deterministic sampler) or there are
    no anchors, along the fixed pair direction of :func:`_tie_directions`.
    """
    diff = q[:, None, :] - z[None, :, :]
    d2 = jnp.sum(diff * diff, axis=-1)
    inside = cand & (d2 < r2)
    pos = d2 > 0
    dist = jnp.sqrt(jnp.where(pos, d2, 1.0))
    w = jnp.where(inside & pos, radius / dist - 1.0, 0.0)
    delta = jnp.einsum("bk,bkd->bd", w, diff, precision=_HI)
    count = jnp.sum(inside, axis=-1, dtype=jnp.int32)
    on_centre = inside & ~pos

    def fallback(_):
        out = jnp.zeros_like(delta)
        tie = on_centre
        if qa is not None:
            a = qa[:, None, :] - za[None, :, :]
            a2 = jnp.sum(a * a, axis=-1)
            apos = a2 > 0
            wa = jnp.where(on_centre & apos, radius / jnp.sqrt(jnp.where(apos, a2, 1.0)), 0.0)
            out = out + jnp.einsum("bk,bkd->bd", wa, a, precision=_HI)
            tie = on_centre & ~apos
        u = _tie_directions(qid, zid, q.shape[1], symmetric)
        wt = jnp.where(tie, radius, 0.0)
        return out + jnp.einsum("bk,bkd->bd", wt, u, precision=_HI)

    delta = delta + branch(jnp.any(on_centre), fallback, lambda _: jnp.zeros_like(delta), None)
    return delta, count


def repulsion(
    queries,
    index: ShieldIndex,
    radius,
    *,
    query_anchors=None,
    shield_anchors=None,
    query_ids=None,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
) -> Repulsion:
    """SPELL's repulsion sum (Eq. 5) of every query from every shield in ``index``, exactly.

    ``delta_i = sum_k relu(r / |q_i - z_k| - 1) (q_i - z_k)``, computed blockwise (see the
    module docstring): a matmul finds candidate blocks, only those run direct differences.

    Args:
        queries: ``(B, d)`` points (SPELL: the batch's ``x0_hat``).
        index: the shields, from :func:`build_index`.
        radius: shield radius ``r > 0`` (scalar, may be traced).
        query_anchors: optional ``(B, d)`` anchors of the queries for the fallback
            direction when a query sits exactly on a centre.
        shield_anchors: anchors of the shields: a scalar ``s`` (anchor ``s * z_k``) or an
            array shaped like ``index.points``. Needed when ``query_anchors`` is given.
        query_ids: optional ``(B,)`` int: query ``i`` ignores the shield with flat index
            ``query_ids[i]`` (itself, for intra-batch repulsion); ``-1`` ignores none.
        exact_bytes: memory bound of one exact-pass tile ``(B, sub_block, d)``.

    Returns:
        :class:`Repulsion` ``(delta, count)``.

    >>> idx = build_index(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
    >>> rep = repulsion(jnp.array([[0.5, 0.0], [5.0, 0.0]]), idx, 2.0)
    >>> rep.delta.tolist(), rep.count.tolist()   # (2/0.5 - 1) * 0.5 = 1.5; the far one: 0
    ([[1.5, 0.0], [0.0, 0.0]], [1, 0])
    """
    q, qa, anchor_scale, anchor_blocks = check_repulsion_args(
        queries, index, query_anchors, shield_anchors
    )
    return _repulsion_program(q, index, radius, qa, anchor_scale, anchor_blocks, query_ids,
                              int(exact_bytes))  # fmt: skip


def check_repulsion_args(queries, index, query_anchors, shield_anchors):
    """Validate :func:`repulsion`'s arguments; ``(q, qa, anchor_scale, anchor_blocks)``
    as float32 matrices (``index.points`` may be the global shape of a sharded index).

    >>> idx = build_index(jnp.zeros((3, 2)))
    >>> check_repulsion_args(jnp.ones((4, 2)), idx, None, None)[0].shape
    (4, 2)
    """
    q = _as_matrix(queries, "queries")
    if not isinstance(index, ShieldIndex):
        raise TypeError(f"index must be a ShieldIndex (build_index), got {type(index).__name__}")
    d = q.shape[1]
    dz = index.points.shape[-1]
    if d != dz:
        raise ValueError(f"queries have {d} features per row but the index has {dz}")
    if (query_anchors is None) != (shield_anchors is None):
        raise ValueError("pass both query_anchors and shield_anchors, or neither")
    qa = None if query_anchors is None else _as_matrix(query_anchors, "query_anchors")
    if qa is not None and qa.shape != q.shape:
        raise ValueError(f"query_anchors must have shape {q.shape}, got {qa.shape}")
    anchor_scale, anchor_blocks = None, None
    if shield_anchors is not None:
        sa = jnp.asarray(shield_anchors, jnp.float32)
        if sa.ndim == 0:
            anchor_scale = sa
        elif sa.shape == index.points.shape:
            anchor_blocks = sa
        else:
            raise ValueError(
                f"shield_anchors must be a scalar or shaped like index.points "
                f"{index.points.shape}, got {sa.shape}"
            )
    return q, qa, anchor_scale, anchor_blocks


def repulsion_core(q, index, radius, qa, anchor_scale, anchor_blocks, query_ids,
                   exact_bytes=DEFAULT_EXACT_BYTES, block_offset=0) -> Repulsion:
    """:func:`repulsion` on checked arguments, over blocks numbered from ``block_offset``
    (a device's shard of a sharded index; flat shield ids are ``block * block_size + j``).

    >>> idx = build_index(jnp.array([[0.0, 0.0], [10.0, 0.0]]))
    >>> repulsion_core(jnp.array([[0.5, 0.0]]), idx, 2.0, None, None, None, None).count
    Array([1], dtype=int32)
    """
    b, d = q.shape
    nb, bs, _ = index.points.shape
    radius = jnp.asarray(radius, jnp.float32)
    r2 = radius * radius
    qc = q - index.centre
    qcsq = jnp.sum(qc * qc, axis=-1)
    sub = _sub_block(bs, b, d, exact_bytes)
    ns = bs // sub
    local_ids = jnp.arange(bs, dtype=jnp.int32)
    qid = jnp.arange(b, dtype=jnp.int32) if query_ids is None else query_ids.astype(jnp.int32)

    def block(carry, inp):
        z, zsq, valid, blk, za_blk = inp  # z: centred
        d2a = qcsq[:, None] + zsq[None, :] - 2.0 * _dot_rows(qc, z)
        tol = _CAND_REL_TOL * (qcsq[:, None] + zsq[None, :] + r2)
        cand = valid[None, :] & (d2a <= r2 + tol)
        if query_ids is not None:
            cand = cand & (query_ids[:, None] != blk * bs + local_ids[None, :])

        def exact(c):
            za_all = None
            if qa is not None:
                za_all = anchor_scale * (z + index.centre) if anchor_blocks is None else za_blk

            def sub_step(cc, j):
                zs = lax.dynamic_slice_in_dim(z, j * sub, sub, 0)
                cs = lax.dynamic_slice_in_dim(cand, j * sub, sub, 1)
                zas = None if za_all is None else lax.dynamic_slice_in_dim(za_all, j * sub, sub, 0)

                def run(cc):
                    zid = blk * bs + j * sub + jnp.arange(sub, dtype=jnp.int32)
                    dd, cnt = _exact_delta(qc, zs, cs, r2, radius, qa, zas, qid, zid,
                                           query_ids is not None)  # fmt: skip
                    return cc[0] + dd, cc[1] + cnt

                return branch(jnp.any(cs), run, lambda cc: cc, cc), None

            if ns == 1:
                return sub_step(c, 0)[0]
            return lax.scan(sub_step, c, jnp.arange(ns))[0]

        return branch(jnp.any(cand), exact, lambda c: c, carry), None

    za_in = anchor_blocks if anchor_blocks is not None else jnp.zeros((nb, 0, 0), jnp.float32)
    init = (jnp.zeros((b, d), jnp.float32), jnp.zeros((b,), jnp.int32))
    blocks = block_offset + jnp.arange(nb, dtype=jnp.int32)
    xs = (index.points, index.sq_norms, index.valid, blocks, za_in)
    if nb == 1:  # one block (intra-batch, small sets): no loop to compile
        (delta, count), _ = block(init, jax.tree.map(lambda a: a[0], xs))
    else:
        (delta, count), _ = lax.scan(block, init, xs)
    return Repulsion(delta, count)


def nearest(queries, index: ShieldIndex, k: int = 1, *, exclude_ids=None) -> Nearest:
    """Exact ``k`` nearest shields of each query (blockwise; distances recomputed directly).

    A running top-``(k + 8)`` over matmul distances selects candidates, whose distances are
    then recomputed as ``|q - z|`` so near-ties and float cancellation cannot misorder the
    result. Used to measure leaks (Sec. 5.6) and nearest-neighbour histograms (Fig. 3).

    Args:
        queries: ``(B, d)``.
        index: from :func:`build_index`.
        k: number of neighbours (``<=`` the number of shields).
        exclude_ids: optional ``(B,)`` flat index to ignore per query (e.g. itself).

    >>> idx = build_index(jnp.array([[0.0], [1.0], [3.0]]), block_size=2)
    >>> nb = nearest(jnp.array([[2.9]]), idx, k=2)
    >>> nb.indices.tolist(), [round(v, 4) for v in nb.distances[0].tolist()]
    ([[2, 1]], [0.1, 1.9])
    """
    q = _as_matrix(queries, "queries")
    if not isinstance(index, ShieldIndex):
        raise TypeError(f"index must be a ShieldIndex (build_index), got {type(index).__name__}")
    exclude_ids = check_nearest_args(q, index, k, exclude_ids)
    distances, indices = _nearest_program(q - index.centre, index, int(k), exclude_ids)
    return Nearest(distances, indices)


def check_nearest_args(q, index: ShieldIndex, k, exclude_ids):
    """Validate :func:`nearest`'s arguments (shared with the sharded search); returns
    ``exclude_ids`` as an int32 ``(B,)`` array or ``None``."""
    d = index.points.shape[2]
    if q.shape[1] != d:
        raise ValueError(f"queries have {q.shape[1]} features per row but the index has {d}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    if exclude_ids is None:
        return None
    exclude_ids = jnp.asarray(exclude_ids)
    if exclude_ids.shape != (q.shape[0],) or not jnp.issubdtype(exclude_ids.dtype, jnp.integer):
        raise ValueError(
            f"exclude_ids must be integer ids of shape ({q.shape[0]},) (one per query), got "
            f"{exclude_ids.dtype} {exclude_ids.shape}"
        )
    return exclude_ids.astype(jnp.int32)


def nearest_core(qc, index: ShieldIndex, k: int, exclude_ids=None, id_offset=0):
    """:func:`nearest` on centred queries ``qc`` without checks: ``(distances, indices)``,
    each ``(B, min(k, rows))``. Shield ids are ``id_offset`` + the flat row in ``index``
    (the sharded search passes each device's first global row)."""
    nb, bs, d = index.points.shape
    total = nb * bs
    kc = int(min(k + 8, total))
    b = qc.shape[0]
    qcsq = jnp.sum(qc * qc, axis=-1)
    local_ids = jnp.arange(bs, dtype=jnp.int32)

    def block(carry, inp):
        best_d, best_i = carry
        z, zsq, valid, blk = inp
        d2a = qcsq[:, None] + zsq[None, :] - 2.0 * _dot_rows(qc, z)
        ids = id_offset + blk * bs + local_ids
        ok = valid[None, :]
        if exclude_ids is not None:
            ok = ok & (exclude_ids[:, None] != ids[None, :])
        d2a = jnp.where(ok, d2a, jnp.inf)
        all_d = jnp.concatenate([best_d, d2a], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(ids, (b, bs))], axis=1)
        neg, pos = lax.top_k(-all_d, kc)
        return (-neg, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((b, kc), jnp.inf, jnp.float32), jnp.zeros((b, kc), jnp.int32))
    xs = (index.points, index.sq_norms, index.valid, jnp.arange(nb, dtype=jnp.int32))
    (cand_d, cand_i), _ = lax.scan(block, init, xs)
    pts = index.points.reshape(-1, d)[cand_i - id_offset]  # centred, like qc
    exact = jnp.sqrt(jnp.sum((qc[:, None, :] - pts) ** 2, axis=-1))
    exact = jnp.where(jnp.isfinite(cand_d), exact, jnp.inf)
    neg, pos = lax.top_k(-exact, int(min(k, kc)))
    return -neg, jnp.take_along_axis(cand_i, pos, axis=1)


# one compile per (shapes, k): eager calls (leak counts per batch, a notebook's repulsion
# fields) would otherwise re-trace the scans on every call; inside a trace they inline
_nearest_program = jax.jit(nearest_core, static_argnames=("k",))
_repulsion_program = jax.jit(repulsion_core, static_argnames=("exact_bytes",))


class IVFIndex(NamedTuple):
    """An inverted-file index (faiss ``IndexIVFFlat``'s layout) for approximate search.

    Attributes:
        centroids: ``(C, d)`` k-means cell centres.
        cell_points: ``(C, M, d)`` the points of each cell, padded to the largest cell.
        cell_valid: ``(C, M)`` False on padding.
        cell_ids: ``(C, M)`` flat index of each point in the original set.
    """

    centroids: jax.Array
    cell_points: jax.Array
    cell_valid: jax.Array
    cell_ids: jax.Array


def build_ivf(points, num_cells: int, *, key, iters: int = 10) -> IVFIndex:
    """k-means (Lloyd, ``iters`` rounds) into ``num_cells`` cells; see :class:`IVFIndex`.

    The paper uses ``sqrt(K)`` cells (App. I). Built on the host (cell sizes are data
    dependent); searching it (:func:`ivf_repulsion`) is jit-able.

    >>> import jax
    >>> ivf = build_ivf(jnp.array([[0.0], [0.1], [5.0], [5.1]]), 2, key=jax.random.key(0))
    >>> sorted(ivf.cell_valid.sum(1).tolist())
    [2, 2]
    """
    pts = _as_matrix(points, "points")
    k, d = pts.shape
    if isinstance(num_cells, bool) or not isinstance(num_cells, (int, np.integer)):
        raise TypeError(f"num_cells must be an int, got {num_cells!r}")
    if not 1 <= num_cells <= k:
        raise ValueError(f"num_cells must be in [1, K={k}], got {num_cells}")
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    init = pts[jax.random.choice(key, k, (num_cells,), replace=False)]
    sq = jnp.sum(pts * pts, axis=-1)

    def assign(c):
        d2 = sq[:, None] + jnp.sum(c * c, -1)[None, :] - 2.0 * jnp.dot(pts, c.T, precision=_HI)
        return jnp.argmin(d2, axis=1)

    @jax.jit
    def lloyd(c):
        def body(_, c):
            a = assign(c)
            sums = jax.ops.segment_sum(pts, a, num_cells)
            cnt = jax.ops.segment_sum(jnp.ones((k,), jnp.float32), a, num_cells)
            # an empty cell keeps its centre (it stays a valid, empty probe target)
            return jnp.where(cnt[:, None] > 0, sums / jnp.maximum(cnt, 1.0)[:, None], c)

        c = lax.fori_loop(0, iters, body, c)
        return c, assign(c)

    cents, a = lloyd(init)
    a = np.asarray(a)
    order = np.argsort(a, kind="stable")
    counts = np.bincount(a, minlength=num_cells)
    m = int(max(counts.max(), 1))
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(k) - starts[a[order]]
    ids = np.zeros((num_cells, m), np.int32)
    valid = np.zeros((num_cells, m), bool)
    ids[a[order], slot] = order
    valid[a[order], slot] = True
    cell_points = jnp.where(jnp.asarray(valid)[..., None], pts[jnp.asarray(ids)], 0.0)
    return IVFIndex(cents, cell_points, jnp.asarray(valid), jnp.asarray(ids))


def ivf_repulsion(
    queries, ivf: IVFIndex, radius, nprobe: int, *, query_anchors=None, anchor_scale=None
) -> Repulsion:
    """Eq. 5 over the shields in the ``nprobe`` cells nearest each query (approximate).

    Reproduces the paper's faiss IVF retrieval (App. I): shields outside the probed cells
    are missed, so the correction may leave samples inside a shield. With ``nprobe`` equal
    to the number of cells it is exact.

    Args:
        queries: ``(B, d)`` points.
        ivf: the shields, from :func:`build_ivf`.
        radius: shield radius ``r > 0`` (scalar, may be traced).
        nprobe: how many cells, nearest first, each query searches (a Python int).
        query_anchors: optional ``(B, d)`` anchors for the fallback direction when a query
            sits exactly on a shield; with ``anchor_scale`` ``s`` (shield anchor ``s z``).
            Give both or neither.

    >>> import jax
    >>> pts = jnp.array([[0.0], [0.1], [5.0], [5.1]])
    >>> ivf = build_ivf(pts, 2, key=jax.random.key(0))
    >>> ivf_repulsion(jnp.array([[0.05]]), ivf, 0.2, 1).count.tolist()
    [2]
    """
    q = _as_matrix(queries, "queries")
    if not isinstance(ivf, IVFIndex):
        raise TypeError(f"ivf must be an IVFIndex (build_ivf), got {type(ivf).__name__}")
    c = ivf.centroids.shape[0]
    if isinstance(nprobe, bool) or not isinstance(nprobe, (int, np.integer)):
        raise TypeError(f"nprobe must be an int, got {nprobe!r}")
    if not 1 <= nprobe <= c:
        raise ValueError(f"nprobe must be in [1, num_cells={c}], got {nprobe}")
    if (query_anchors is None) != (anchor_scale is None):
        raise ValueError("pass both query_anchors and anchor_scale, or neither")
    qa = None if query_anchors is None else _as_matrix(query_anchors, "query_anchors")
    if qa is not None and qa.shape != q.shape:
        raise ValueError(f"query_anchors must have shape {q.shape}, got {qa.shape}")
    return _ivf_repulsion_program(q, ivf, radius, qa, anchor_scale, int(nprobe))


@partial(jax.jit, static_argnames=("nprobe",))
def _ivf_repulsion_program(q, ivf: IVFIndex, radius, qa, anchor_scale, nprobe: int):
    """:func:`ivf_repulsion` on checked arguments, one compile per (shapes, ``nprobe``)."""
    radius = jnp.asarray(radius, jnp.float32)
    r2 = radius * radius
    d2c = (
        jnp.sum(q * q, -1)[:, None]
        + jnp.sum(ivf.centroids**2, -1)[None, :]
        - 2.0 * jnp.dot(q, ivf.centroids.T, precision=_HI)
    )
    _, probes = lax.top_k(-d2c, nprobe)

    def probe(carry, p):
        cell = probes[:, p]
        z = ivf.cell_points[cell]  # (B, M, d)
        ok = ivf.cell_valid[cell]
        diff = q[:, None, :] - z
        d2 = jnp.sum(diff * diff, -1)
        inside = ok & (d2 < r2)
        pos = d2 > 0
        w = jnp.where(inside & pos, radius / jnp.sqrt(jnp.where(pos, d2, 1.0)) - 1.0, 0.0)
        delta = jnp.einsum("bk,bkd->bd", w, diff, precision=_HI)
        if qa is not None:
            a = qa[:, None, :] - anchor_scale * z
            a2 = jnp.sum(a * a, -1)
            apos = a2 > 0
            wa = jnp.where(inside & ~pos & apos, radius / jnp.sqrt(jnp.where(apos, a2, 1.0)), 0.0)
            delta = delta + jnp.einsum("bk,bkd->bd", wa, a, precision=_HI)
        return (carry[0] + delta, carry[1] + jnp.sum(inside, -1, dtype=jnp.int32)), None

    init = (jnp.zeros_like(q), jnp.zeros((q.shape[0],), jnp.int32))
    (delta, count), _ = lax.scan(probe, init, jnp.arange(nprobe))
    return Repulsion(delta, count)
