"""SPELL's exact reference search with the shields split across devices.

A reference set too large for one device (SPELL's 1.2M ImageNet latents of 4x32x32 are
~20 GB in float32) is stored as a :class:`ShardedShieldIndex`: the blocks of a
:class:`~jaxdiv.guidance.spell.radius_search.ShieldIndex` laid out along one mesh axis, so
each device holds ``1 / n`` of the rows. :func:`repulsion` runs the exact blockwise search
of :func:`~jaxdiv.guidance.spell.radius_search.repulsion` on every device's own shard
(``jax.shard_map``) and sums the corrections and counts across the axis (``psum``): the
result is the single-device exact search up to the order of the float32 sums. Only the
queries (the batch's ``x0_hat``, ``B x d``) travel to every device; the shields never move.
:func:`nearest` finds the exact ``k`` nearest shields the same way (each device's own
``k``, gathered and merged), for leak counts and nearest-neighbour distances at scale.

:func:`build_sharded_index` fills the shards from an array, a ``.npy`` file or a folder of
``.npy`` files read through memory maps, one device's rows at a time
(``jax.make_array_from_callback``), so no host ever holds the whole set -- in a
multi-process run each process reads only the rows of its own devices.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxdiv import validation
from jaxdiv.guidance.spell.radius_search import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_EXACT_BYTES,
    Nearest,
    Repulsion,
    ShieldIndex,
    _as_matrix,
    check_nearest_args,
    check_repulsion_args,
    nearest_core,
    repulsion_core,
)

__all__ = ["ShardedShieldIndex", "ShieldRows", "build_sharded_index", "nearest", "repulsion"]


@jax.tree_util.register_pytree_node_class
class ShardedShieldIndex:
    """A :class:`ShieldIndex` whose blocks are split along mesh axis ``axis``.

    Attributes:
        index: the global index; ``points``, ``sq_norms`` and ``valid`` are sharded on
            their block axis over ``mesh.shape[axis]`` devices (each device an equal
            number of whole blocks), ``centre`` replicated.
        mesh: the :class:`jax.sharding.Mesh` (static).
        axis: the mesh axis name the blocks are split along (static).
        num_shields: ``K``, the rows before padding (static).
    """

    def __init__(self, index: ShieldIndex, mesh: Mesh, axis: str, num_shields: int):
        self.index, self.mesh, self.axis, self.num_shields = index, mesh, axis, num_shields

    def tree_flatten(self):
        return (self.index,), (self.mesh, self.axis, self.num_shields)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(children[0], *aux)

    @property
    def dim(self) -> int:
        return self.index.dim

    @property
    def block_size(self) -> int:
        return self.index.block_size

    def __repr__(self):
        nb, bs, d = self.index.points.shape
        return (f"ShardedShieldIndex(K={self.num_shields}, d={d}, blocks={nb}x{bs}, "
                f"axis={self.axis!r} over {self.mesh.shape[self.axis]} devices)")  # fmt: skip


class ShieldRows:
    """Rows ``(K, d)`` of shield centres read lazily from an array or ``.npy`` files.

    ``source`` is an array ``(K, ...)`` (NumPy, memory-mapped or JAX), a ``.npy`` file,
    or a folder whose ``*.npy`` files (sorted by name as strings: ``part10`` before
    ``part2``, so zero-pad the numbers) are concatenated along the first
    axis; every file is opened with ``mmap_mode="r"``, so :meth:`read` touches only the
    rows asked for. Rows are flattened to ``d`` features.

    >>> rows = ShieldRows(np.arange(12.0).reshape(3, 2, 2))
    >>> rows.shape, rows.read(1, 3).tolist()
    ((3, 4), [[4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 10.0, 11.0]])
    """

    def __init__(self, source):
        if isinstance(source, (str, os.PathLike)):
            path = Path(source)
            files = sorted(path.glob("*.npy")) if path.is_dir() else [path]
            if not files:
                raise ValueError(f"source folder {path} holds no .npy files")
            parts = []
            for f in files:
                try:
                    parts.append(np.load(f, mmap_mode="r", allow_pickle=False))
                except (OSError, ValueError) as err:
                    msg = f"source file {f} is not a readable .npy array: {err}"
                    raise ValueError(msg) from err
            names = [str(f) for f in files]
        else:
            if not hasattr(source, "shape"):
                raise TypeError(
                    f"source must be an array, a .npy file or a folder of .npy files, got "
                    f"{type(source).__name__}"
                )
            parts, names = [source], ["source"]
        shapes = [tuple(np.shape(a)) for a in parts]
        for name, shape, a in zip(names, shapes, parts):
            if len(shape) < 2 or shape[0] < 1:
                raise ValueError(f"{name} must have shape (K, ...) with K >= 1, got {shape}")
            if not np.issubdtype(np.dtype(a.dtype), np.floating) and a.dtype != jnp.bfloat16:
                raise TypeError(f"{name} must hold floating values, got dtype {a.dtype}")
        dims = {int(np.prod(s[1:])) for s in shapes}
        if len(dims) != 1:
            raise ValueError(f"source files disagree on the features per row: {sorted(dims)}")
        self._parts = parts
        self._names = names
        self._starts = np.cumsum([0] + [s[0] for s in shapes])
        self.shape = (int(self._starts[-1]), dims.pop())

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as float32 ``(stop - start, d)`` (only those are read)."""
        out = []
        for part, name, lo, hi in zip(self._parts, self._names, self._starts[:-1],
                                      self._starts[1:]):  # fmt: skip
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                rows = np.asarray(part[a - lo : b - lo], np.float32).reshape(b - a, -1)
                if not np.all(np.isfinite(rows)):
                    bad = a + int(np.argmax(~np.isfinite(rows).all(axis=1)))
                    raise ValueError(f"{name}: shield row {bad} is not finite (NaN or inf)")
                out.append(rows)
        return np.concatenate(out) if out else np.zeros((0, self.shape[1]), np.float32)

    def mean(self, chunk: int = 65536) -> np.ndarray:
        """The mean row, accumulated in float64 over chunks of ``chunk`` rows."""
        total = np.zeros(self.shape[1], np.float64)
        for a in range(0, self.shape[0], chunk):
            total += self.read(a, min(a + chunk, self.shape[0])).sum(axis=0, dtype=np.float64)
        return (total / self.shape[0]).astype(np.float32)


def build_sharded_index(
    source,
    mesh: Mesh,
    axis: str = "shields",
    block_size: int = DEFAULT_BLOCK_SIZE,
    centre=None,
) -> ShardedShieldIndex:
    """Split a reference set over the devices of ``mesh`` axis ``axis``, streamed from disk.

    Every device gets the same number of whole blocks of ``block_size`` rows (the last
    device's tail is padding, marked invalid); its rows are read from ``source`` (see
    :class:`ShieldRows`) only when that device's shard is built, so peak host memory is
    one device's shard. ``centre`` (default: the mean row, one streaming pass) is the
    origin the blocks are stored around, as in :func:`build_index`.

    Memory per device: ``ceil(K / (n * bs)) * bs * (4 d + 5)`` bytes for ``n`` devices
    on the axis (points, squared norms, validity), plus the search's bounded block; ``bs``
    is the index's block size, ``min(block_size, ceil(K / n))`` (``idx.block_size``).

    >>> import jax, numpy as np
    >>> mesh = jax.make_mesh((1,), ("shields",))
    >>> idx = build_sharded_index(np.eye(3, dtype=np.float32), mesh, block_size=2)
    >>> idx
    ShardedShieldIndex(K=3, d=3, blocks=2x2, axis='shields' over 1 devices)
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}")
    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not an axis of the mesh {dict(mesh.shape)}")
    block_size = validation.integer("block_size", block_size, 1)
    rows = ShieldRows(source)
    k, d = rows.shape
    n = mesh.shape[axis]
    bs = int(min(block_size, -(-k // n)))
    per_device = -(-k // (n * bs))  # blocks per device
    nb = n * per_device
    if centre is None:
        centre = rows.mean()
    centre = np.asarray(centre, np.float32)
    if centre.shape != (d,):
        raise ValueError(f"centre must have shape ({d},), got {centre.shape}")
    validation.finite_array("centre", centre)
    sharding = NamedSharding(mesh, P(axis))

    def blocks(index):
        sl = index[0]
        lo, hi = (sl.start or 0) * bs, (nb if sl.stop is None else sl.stop) * bs
        z = rows.read(min(lo, k), min(hi, k)) - centre
        z = np.concatenate([z, np.zeros((hi - lo - z.shape[0], d), np.float32)])
        return z.reshape(-1, bs, d)

    def validity(index):
        sl = index[0]
        lo, hi = (sl.start or 0) * bs, (nb if sl.stop is None else sl.stop) * bs
        return (np.arange(lo, hi) < k).reshape(-1, bs)

    points = jax.make_array_from_callback((nb, bs, d), sharding, blocks)
    valid = jax.make_array_from_callback((nb, bs), sharding, validity)
    sq = jax.jit(lambda z: jnp.sum(z * z, axis=-1), out_shardings=sharding)(points)
    centre = jax.device_put(jnp.asarray(centre), NamedSharding(mesh, P()))
    return ShardedShieldIndex(ShieldIndex(points, sq, valid, centre), mesh, axis, k)


def repulsion(
    queries,
    index: ShardedShieldIndex,
    radius,
    *,
    query_anchors=None,
    shield_anchors=None,
    query_ids=None,
    exact_bytes: int = DEFAULT_EXACT_BYTES,
) -> Repulsion:
    """SPELL's exact repulsion sum (Eq. 5) over a sharded reference set.

    Each device runs the blockwise exact search of
    :func:`jaxdiv.guidance.spell.radius_search.repulsion` on its own blocks; the
    corrections and counts are summed over ``index.axis`` (``psum``). Arguments as there;
    ``shield_anchors`` of the shape of ``index.index.points`` are split like the points.

    >>> import jax, numpy as np
    >>> mesh = jax.make_mesh((1,), ("shields",))
    >>> idx = build_sharded_index(np.array([[0.0, 0.0], [10.0, 0.0]], np.float32), mesh)
    >>> rep = repulsion(jnp.array([[0.5, 0.0], [5.0, 0.0]]), idx, 2.0)
    >>> rep.delta.tolist(), rep.count.tolist()   # (2/0.5 - 1) * 0.5 = 1.5; the far one: 0
    ([[1.5, 0.0], [0.0, 0.0]], [1, 0])
    """
    _check_sharded(index)
    q, qa, anchor_scale, anchor_blocks = check_repulsion_args(
        queries, index.index, query_anchors, shield_anchors
    )
    return _repulsion_program(q, qa, jnp.asarray(radius, jnp.float32), anchor_scale,
                              anchor_blocks, query_ids, index, int(exact_bytes))  # fmt: skip


@functools.partial(jax.jit, static_argnames=("exact_bytes",))
def _repulsion_program(q, qa, radius, anchor_scale, anchor_blocks, query_ids,
                       index: ShardedShieldIndex, exact_bytes: int) -> Repulsion:  # fmt: skip
    """:func:`repulsion`'s program: one compile per (shapes, optional arguments given,
    ``exact_bytes``, mesh) -- an eager ``shard_map`` of a fresh closure compiles anew on
    every call."""
    axis = index.axis
    rep_spec, shard_spec = P(), P(axis)
    # optional arguments travel as () so shard_map sees a fixed argument structure
    given = [a is not None for a in (qa, anchor_scale, anchor_blocks, query_ids)]
    qa, scale, blocks_a, qids = (a if g else () for a, g in zip(
        (qa, anchor_scale, anchor_blocks, query_ids), given))  # fmt: skip
    args = (q, qa, radius, scale, blocks_a, qids, index.index)
    specs = (rep_spec, rep_spec, rep_spec, rep_spec, shard_spec, rep_spec,
             ShieldIndex(shard_spec, shard_spec, shard_spec, rep_spec))  # fmt: skip
    opt = lambda a, i: a if given[i] else None  # noqa: E731

    def local(q, qa, radius, scale, blocks_a, qids, shard):
        offset = lax.axis_index(axis) * shard.points.shape[0]
        rep = repulsion_core(q, shard, radius, opt(qa, 0), opt(scale, 1), opt(blocks_a, 2),
                             opt(qids, 3), exact_bytes, offset)  # fmt: skip
        return Repulsion(lax.psum(rep.delta, axis), lax.psum(rep.count, axis))

    # check_vma off: the search's lax.cond/scan carries start replicated (zeros) and become
    # device-varying inside; the psum makes the outputs replicated again
    run = jax.shard_map(local, mesh=index.mesh, in_specs=specs,
                        out_specs=Repulsion(rep_spec, rep_spec), check_vma=False)  # fmt: skip
    return run(*args)


def _check_sharded(index):
    if not isinstance(index, ShardedShieldIndex):
        raise TypeError(
            f"index must be a ShardedShieldIndex (build_sharded_index), got "
            f"{type(index).__name__}"
        )


def nearest(queries, index: ShardedShieldIndex, k: int = 1, *, exclude_ids=None) -> Nearest:
    """Exact ``k`` nearest shields of each query over a sharded reference set.

    Each device runs :func:`jaxdiv.guidance.spell.radius_search.nearest` on its own blocks
    (distances recomputed as ``|q - z|`` from its own rows); the ``k`` nearest of every
    device are gathered across ``index.axis`` (``B x n k`` distances and ids, never the
    shields) and the ``k`` smallest kept, so the result is the single-device search's.
    ``min_d |q - z_d|``, the distance SPELL's guarantee bounds below by ``r`` (Sec. 3.2),
    and leak counts (Sec. 5.6) thus scale to reference sets no device holds.

    Args:
        queries: ``(B, d)``.
        index: from :func:`build_sharded_index`.
        k: number of neighbours, at most the number of shields.
        exclude_ids: optional ``(B,)`` shield id (row of the source) to ignore per query.

    Returns:
        :class:`~jaxdiv.guidance.spell.radius_search.Nearest`: ``distances (B, k)``
        ascending and ``indices`` (rows of the source), replicated.

    >>> import jax, numpy as np
    >>> mesh = jax.make_mesh((1,), ("shields",))
    >>> idx = build_sharded_index(np.array([[0.0], [1.0], [3.0]], np.float32), mesh, block_size=2)
    >>> nb = nearest(jnp.array([[2.9]]), idx, k=2)
    >>> nb.indices.tolist(), [round(v, 4) for v in nb.distances[0].tolist()]
    ([[2, 1]], [0.1, 1.9])
    """
    _check_sharded(index)
    q = _as_matrix(queries, "queries")
    exclude_ids = check_nearest_args(q, index.index, k, exclude_ids)
    if k > index.num_shields:
        raise ValueError(f"k must be at most the number of shields {index.num_shields}, got {k}")
    distances, indices = _nearest_program(q - index.index.centre, exclude_ids, index, int(k))
    return Nearest(distances, indices)


@functools.partial(jax.jit, static_argnames=("k",))
def _nearest_program(qc, exclude_ids, index: ShardedShieldIndex, k: int):
    """:func:`nearest`'s program: one compile per (shapes, ``k``, mesh) -- an eager
    ``shard_map`` of a fresh closure would compile anew on every call."""
    axis, rep = index.axis, P()
    excluded = exclude_ids is not None

    def local(qc, excl, shard):
        offset = lax.axis_index(axis) * shard.points.shape[0] * shard.points.shape[1]
        dist, ids = nearest_core(qc, shard, k, excl if excluded else None, offset)
        # (B, n k') from every device's k' = min(k, rows per device) nearest
        dist = lax.all_gather(dist, axis, axis=1, tiled=True)
        ids = lax.all_gather(ids, axis, axis=1, tiled=True)
        neg, pos = lax.top_k(-dist, k)
        return -neg, jnp.take_along_axis(ids, pos, axis=1)

    specs = (rep, rep, ShieldIndex(P(axis), P(axis), P(axis), rep))
    run = jax.shard_map(local, mesh=index.mesh, in_specs=specs, out_specs=(rep, rep),
                        check_vma=False)  # fmt: skip
    return run(qc, exclude_ids if excluded else (), index.index)
