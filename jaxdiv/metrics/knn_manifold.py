"""Precision, recall, density and coverage from k-nearest-neighbour balls.

Both metrics estimate each distribution's support as a union of balls centred on its
samples, the radius of a ball being the distance to the sample's k-th nearest neighbour
in its own set (the sample itself excluded):

* PRDC (Naeem et al., ICML 2020, Eqs. 1-4; k = 5): strict ``<`` against the radius.
* Improved precision/recall (Kynkaanniemi et al., NeurIPS 2019, Eqs. 1-3; k = 3):
  squared distances compared with ``<=``.

Distances are computed in row blocks (``lax.map`` / ``lax.scan``) with a running top-k,
so a 50k x 50k distance matrix is never materialised: peak extra memory is one
(block, n) tile. Neighbours are found by the expansion ``|a|^2 + |b|^2 - 2ab`` (one matrix
product).

Ties on a ball's boundary are decided by the difference form, not by the expansion's
rounding. The expansion rounds differently in each matrix product and cannot resolve
distances below its round-off (relative to the norms), so a fake sample that copies a
real one (the memorisation case), lattice data or near-duplicates landed inside or
outside a ball by a last-bit accident. Every distance within the expansion's round-off of
a radius -- the k-th neighbour's and its rivals', and the cross distances -- is
recomputed as ``sum((a - b)^2)`` summed by one fixed tree of elementwise adds. The
same pair of rows then gives the same bits wherever it is computed, so a copy's tie is
decided exactly, and so is every tie whose sums are exact in floating point
(small-integer or dyadic lattices); ``tests/test_metrics_prdc.py`` checks such cases
against SciPy's float64 ``cdist`` and the ``prdc`` package. Genuine near-ties closer than
float32 resolves are decided by float32 rounding, as in any float32 implementation.
Heavily tied data (many copies of one sample) recomputes whole rows in the difference
form: slower than the expansion, never wrong. The rows are not centred first (centring
rounds each entry, which breaks the ties of lattice data, and a centred copy of both sets
would double the memory): features far from the origin relative to their spread widen
the round-off band, which costs recomputations, not accuracy.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from jaxdiv.metrics import _checks
from jaxdiv.sphere import pow2_inverse_scale

_TILE_ELEMENTS = 1 << 22  # 16 MiB of float32 per (block, n) distance tile by default
_FLAGS_PER_PASS = 8  # near-ties recomputed per row and pass (_refine_near_ties) ...
_ROWS_PER_PASS = 32  # ... in up to this many rows


class PRDC(NamedTuple):
    """Naeem et al. (2020) fidelity/diversity scores, each a scalar array."""

    precision: jax.Array
    recall: jax.Array
    density: jax.Array
    coverage: jax.Array


class PrecisionRecall(NamedTuple):
    """Kynkaanniemi et al. (2019) improved precision and recall, scalar arrays."""

    precision: jax.Array
    recall: jax.Array


def _round_off(d, dtype):
    """Relative round-off of the expansion, a multiple of ``|a|^2 + |b|^2``."""
    return 4.0 * math.sqrt(d) * float(jnp.finfo(dtype).eps)


def _sq_dists(rows, cols, cols_sq):
    """Squared distances by the expansion (one matrix product), and the rows' ``|a|^2``
    (the round-off band is a multiple of ``|a|^2 + |b|^2``; formed where it is used, so
    that no second tile is written)."""
    rows_sq = jnp.sum(rows * rows, axis=-1)
    norms = rows_sq[:, None] + cols_sq[None, :]
    # HIGHEST: no TF32 / bf16 passes on GPUs, whose round-off would exceed the tie band
    d2 = norms - 2.0 * jnp.matmul(rows, cols.T, precision=lax.Precision.HIGHEST)
    # within the round-off a pair is a duplicate as far as the expansion can tell: 0 sorts
    # duplicates first among the neighbours (their radii are then recomputed exactly)
    return jnp.where(d2 <= _round_off(rows.shape[-1], d2.dtype) * norms, 0.0, d2), rows_sq


def _pair_sq(a, b):
    """``sum((a - b)^2)`` over the last axis by a fixed tree of elementwise adds.

    Not ``jnp.sum``: a reduction's order depends on the shapes and the device, and the same
    pair of rows must give the same bits in every place it is computed, or an exact tie
    (a copied sample) would again be decided by rounding.
    """
    sq = (a - b) ** 2
    width = 1 << max(sq.shape[-1] - 1, 0).bit_length()  # zeros pad to a power of two
    sq = jnp.pad(sq, [(0, 0)] * (sq.ndim - 1) + [(0, width - sq.shape[-1])])
    while sq.shape[-1] > 1:
        half = sq.shape[-1] // 2
        sq = sq[..., :half] + sq[..., half:]
    return sq[..., 0]


def _refine_near_ties(d2, near, rows, cols):
    """``d2`` with the entries flagged by ``near`` recomputed exactly from the raw ``rows``
    and ``cols`` (:func:`_pair_sq`).

    A row with more than ``4 * _FLAGS_PER_PASS`` flags (duplicates, a memorised sample's
    many copies) is recomputed whole, up to 16 such rows per pass; the others take up to
    ``_FLAGS_PER_PASS`` flags in up to ``_ROWS_PER_PASS`` rows per pass. Both are
    ``while`` loops, which stay loops under ``vmap`` (a ``cond`` would run both branches
    for every row); data without ties runs one pass or none.
    """
    num_rows, num_cols = d2.shape
    per_pass = min(_FLAGS_PER_PASS, num_cols)

    # whole rows: up to 16 per pass, their columns in chunks whose (rows, chunk, d)
    # differences fit in about a tile, so that memory stays a tile's worth at any width
    per_heavy = min(16, num_rows)
    width = max(1, min(num_cols, _TILE_ELEMENTS // (per_heavy * rows.shape[-1])))
    chunks = -(-num_cols // width)

    def exact_rows(r):
        def chunk(c, out):
            # the last chunk starts earlier instead of padding (a padded copy of ``cols``
            # would be a second copy of the whole set): overlapping columns get equal values
            start = jnp.minimum(c * width, num_cols - width)
            part = _pair_sq(r[:, None, :], lax.dynamic_slice_in_dim(cols, start, width)[None])
            return lax.dynamic_update_slice_in_dim(out, part, start, axis=1)

        return lax.fori_loop(0, chunks, chunk, jnp.zeros((per_heavy, num_cols), cols.dtype))

    # the loops test per-row counts, not the tile: a reduction over the whole tile per
    # pass cost more than the few recomputations of typical data
    def whole_rows(state):
        d2, near, heavy = state
        go, i = lax.top_k(heavy.astype(jnp.float32), per_heavy)  # distinct rows
        go = go > 0  # under vmap, finished batch members pass through unchanged
        exact = exact_rows(rows[i])
        redo = go[:, None] & near[i]
        return (d2.at[i].set(jnp.where(redo, exact, d2[i])), near.at[i].set(near[i] & ~redo),
                heavy.at[i].set(False))

    count = jnp.sum(near, axis=1, dtype=jnp.int32)
    heavy = count > 4 * per_pass
    d2, near, _ = lax.while_loop(lambda state: jnp.any(state[2]), whole_rows, (d2, near, heavy))
    count = jnp.where(heavy, 0, count)
    per_rows = min(_ROWS_PER_PASS, num_rows)

    def some_flags(state):
        # up to _ROWS_PER_PASS flagged rows, _FLAGS_PER_PASS flags each: the selections run
        # on those rows only; float operands, since XLA:CPU sorts integer ones whole in top_k
        d2, near, count = state
        has, r = lax.top_k((count > 0).astype(jnp.float32), per_rows)  # distinct rows
        flagged, j = lax.top_k(near[r].astype(jnp.float32), per_pass)  # distinct per row
        todo = (flagged > 0) & (has[:, None] > 0)
        count = count.at[r].add(-jnp.sum(todo, axis=1, dtype=jnp.int32))
        r = r[:, None]
        exact = _pair_sq(rows[r], cols[j])
        return (d2.at[r, j].set(jnp.where(todo, exact, d2[r, j])),
                near.at[r, j].set(near[r, j] & ~todo), count)

    return lax.while_loop(lambda state: jnp.any(state[2] > 0), some_flags,
                          (d2, near, count))[0]


def _pad_rows(x, block):
    num_blocks = -(-x.shape[0] // block)
    return jnp.pad(x, ((0, num_blocks * block - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)), \
        num_blocks


def _knn_sq_radii(x, k, block):
    """Squared distance from each row of ``x`` to its k-th nearest other row, exact:
    neighbours are found by the expansion, the k-th one's distance is recomputed
    (:func:`_pair_sq`), and so is every distance within the expansion's round-off of it,
    whereupon the k-th is taken again (the expansion cannot order neighbours closer
    together than its round-off, e.g. near-duplicates, which it reads as 0). The rivals'
    pass runs only in blocks that have some (``lax.cond``; under ``vmap`` it always runs)."""
    n, d = x.shape
    xp, num_blocks = _pad_rows(x, block)
    cols_sq = jnp.sum(x * x, axis=-1)
    col_ids = jnp.arange(n)

    def one_block(b):
        start = b * block
        rows = lax.dynamic_slice_in_dim(xp, start, block)
        d2, rows_sq = _sq_dists(rows, x, cols_sq)
        row_ids = start + jnp.arange(block)
        d2 = jnp.where(row_ids[:, None] != col_ids[None, :], d2, jnp.inf)  # exclude self
        # the k-th smallest is the last of the k smallest. Not `[:, k - 1]`: XLA CPU
        # rewrites top_k followed by a slice into a full sort of the row (far slower)
        values, nearest = lax.top_k(-d2, k)
        last = jnp.argmin(values, axis=1)[:, None]
        kth = jnp.take_along_axis(nearest, last, axis=1)[:, 0]
        exact = _pair_sq(rows, x[kth])
        # rivals: other neighbours within the round-off of the k-th (near-duplicates read
        # as 0, lattice ties); without any the k-th's exact distance is the radius, with
        # some they are recomputed and the k-th taken again in those rows
        band = 2.0 * _round_off(d, d2.dtype) * (rows_sq[:, None] + cols_sq[None, :])
        rivals = ((jnp.abs(d2 - (-jnp.take_along_axis(values, last, axis=1))) <= band)
                  & (col_ids[None, :] != kth[:, None]))  # fmt: skip
        return lax.cond(jnp.any(rivals),
                        lambda: _rival_radii(d2, rivals, rows, x, kth, exact, k),
                        lambda: exact)  # fmt: skip

    return lax.map(one_block, jnp.arange(num_blocks)).reshape(-1)[:n]


def _rival_radii(d2, rivals, rows, x, kth, radii, k):
    """``radii`` (the exact distances to the ``kth`` columns) with the k-th smallest of each
    row that has ``rivals`` taken again after recomputing them (:func:`_refine_near_ties`);
    the rows with rivals are selected ``_ROWS_PER_PASS`` at a time, so that the top-k runs
    on those rows only."""
    d2 = _refine_near_ties(d2.at[jnp.arange(d2.shape[0]), kth].set(radii), rivals, rows, x)
    per_rows = min(_ROWS_PER_PASS, d2.shape[0])

    def some_rows(state):
        radii, pending = state
        has, r = lax.top_k(pending.astype(jnp.float32), per_rows)  # distinct rows
        kth = -jnp.min(lax.top_k(-d2[r], k)[0], axis=1)
        return radii.at[r].set(jnp.where(has > 0, kth, radii[r])), pending.at[r].set(False)

    return lax.while_loop(lambda state: jnp.any(state[1]), some_rows,
                          (radii, jnp.any(rivals, axis=1)))[0]


def _cross_counts(real, fake, real_r2, fake_r2, strict, block):
    """Per fake sample: number of real balls containing it; per real sample: whether some
    fake sample lies in its ball (coverage) and whether it lies in some fake ball (recall)."""
    n, d = real.shape
    less = jnp.less if strict else jnp.less_equal
    realp, num_blocks = _pad_rows(real, block)
    r2p, _ = _pad_rows(real_r2, block)
    fake_sq = jnp.sum(fake * fake, axis=-1)

    def one_block(counts, b):
        start = b * block
        rows = lax.dynamic_slice_in_dim(realp, start, block)
        d2, rows_sq = _sq_dists(rows, fake, fake_sq)
        valid = (start + jnp.arange(block)) < n
        radius = lax.dynamic_slice_in_dim(r2p, start, block)[:, None]
        # twice the expansion's round-off: the radii are exact
        band = 2.0 * _round_off(d, d2.dtype) * (rows_sq[:, None] + fake_sq[None, :])
        near = (jnp.abs(d2 - radius) <= band) | (jnp.abs(d2 - fake_r2[None, :]) <= band)
        d2 = _refine_near_ties(d2, near & valid[:, None], rows, fake)
        in_real_ball = less(d2, radius) & valid[:, None]
        counts = counts + jnp.sum(in_real_ball, axis=0, dtype=jnp.int32)
        covered = jnp.any(in_real_ball, axis=1)
        recalled = jnp.any(less(d2, fake_r2[None, :]), axis=1)
        return counts, (covered, recalled)

    counts, (covered, recalled) = lax.scan(
        one_block, jnp.zeros(fake.shape[0], jnp.int32), jnp.arange(num_blocks))
    return counts, covered.reshape(-1)[:n], recalled.reshape(-1)[:n]


@partial(jax.jit, static_argnames=("k", "strict", "block"))
def _knn_manifold_core(real, fake, *, k, strict, block):
    # every comparison is between distances: scaling by a power of two near the largest
    # entry changes no result (exact, every tie is kept) and keeps squared distances
    # finite and non-zero for features of norm 1e20 or 1e-25 (they over/underflow in float32)
    inv = pow2_inverse_scale(jnp.maximum(jnp.max(jnp.abs(real)), jnp.max(jnp.abs(fake))))
    real, fake = real * inv, fake * inv
    real_r2 = _knn_sq_radii(real, k, block)
    fake_r2 = _knn_sq_radii(fake, k, block)
    counts, covered, recalled = _cross_counts(real, fake, real_r2, fake_r2, strict, block)
    dtype = real.dtype
    scores = (jnp.mean(counts > 0, dtype=dtype), jnp.mean(recalled, dtype=dtype),
              jnp.mean(counts, dtype=dtype) / k, jnp.mean(covered, dtype=dtype))
    # non-finite features (unchecked under jit) fail every distance comparison (inf - inf
    # is NaN): they would read as scores of 0, so they give NaN
    bad = ~(jnp.isfinite(real).all() & jnp.isfinite(fake).all())
    return tuple(jnp.where(bad, jnp.nan, v) for v in scores)


def _prepare(real, fake, k, block_size):
    k = _checks.check_int(k, "k", 1)
    why = f"k={k} neighbours plus the sample itself"
    r = _checks.check_features(real, "real", min_rows=k + 1, why=why)
    f = _checks.check_features(fake, "fake", min_rows=k + 1, why=why)
    _checks.check_same_dim(r, "real", f, "fake")
    n_max = max(r.shape[0], f.shape[0])
    if block_size is None:
        block = max(8, _TILE_ELEMENTS // n_max)
    else:
        block = _checks.check_int(block_size, "block_size", 1)
    block = min(block, n_max)
    dtype = _checks.common_dtype(r, f)
    return r.astype(dtype), f.astype(dtype), k, block


def prdc(real, fake, k: int = 5, block_size: int | None = None) -> PRDC:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features.

    Radii are the distance to the k-th nearest neighbour within the same set, excluding
    the sample itself; membership uses a strict ``<``, as in the reference ``prdc``
    package. Density can exceed 1; for two large samples of the same distribution it is
    about 1 and coverage about ``1 - 2^-k``.

    Implements Naeem et al. (2020) Eqs. 1-4 (precision/recall of Kynkaanniemi et al.
    with k-NN balls, density Eq. 3, coverage Eq. 4).

    Args:
      real: (n, d) real features, n >= k + 1.
      fake: (m, d) generated features, m >= k + 1.
      k: number of neighbours defining the radii.
      block_size: rows per distance tile; default keeps a tile at about 4M entries.

    Returns:
      ``PRDC(precision, recall, density, coverage)`` of scalar arrays.

    Example:
      >>> import jax
      >>> from jaxdiv import metrics
      >>> real = jax.random.normal(jax.random.key(0), (200, 8))
      >>> fake = jax.random.normal(jax.random.key(1), (200, 8)) + 3.0
      >>> res = metrics.prdc(real, fake, k=5)
      >>> float(res.coverage) < 0.2  # shifted far away: almost no real ball is hit
      True
    """
    r, f, k, block = _prepare(real, fake, k, block_size)
    return PRDC(*_knn_manifold_core(r, f, k=k, strict=True, block=block))


def precision_recall(real, fake, k: int = 3, block_size: int | None = None) -> PrecisionRecall:
    """Improved precision and recall of ``fake`` against ``real`` features.

    Precision: fraction of fake samples inside some real ball; recall: fraction of real
    samples inside some fake ball. Radii are the k-th nearest-neighbour distance excluding
    self; membership is ``|a - b|^2 <= r^2``.

    Implements Kynkaanniemi et al. (2019) Eqs. 1-3 (k = 3 default as in the paper).

    Args:
      real: (n, d) real features, n >= k + 1.
      fake: (m, d) generated features, m >= k + 1.
      k: number of neighbours defining the radii.
      block_size: rows per distance tile; default keeps a tile at about 4M entries.

    Returns:
      ``PrecisionRecall(precision, recall)`` of scalar arrays.

    Example:
      >>> import jax
      >>> from jaxdiv import metrics
      >>> x = jax.random.normal(jax.random.key(0), (100, 4))
      >>> [float(v) for v in metrics.precision_recall(x, x)]  # identical sets
      [1.0, 1.0]
    """
    r, f, k, block = _prepare(real, fake, k, block_size)
    precision, recall, _, _ = _knn_manifold_core(r, f, k=k, strict=False, block=block)
    return PrecisionRecall(precision, recall)
