"""Precision, recall, density and coverage from k-nearest-neighbour balls.

Both metrics estimate each distribution's support as a union of balls centred on its
samples, the radius of a ball being the distance to the sample's k-th nearest neighbour
in its own set (the sample itself excluded):

* PRDC (Naeem et al., ICML 2020, Eqs. 1-4; k = 5): strict ``<`` against the radius.
* Improved precision/recall (Kynkaanniemi et al., NeurIPS 2019, Eqs. 1-3; k = 3):
  squared distances compared with ``<=``.

Distances are computed in row blocks (``lax.map`` / ``lax.scan``) with a running top-k,
so a 50k x 50k distance matrix is never materialised: peak extra memory is one
(block, n) tile. Both sets are shifted by the real mean first (distances are translation
invariant, and smaller norms lose less to float32 cancellation in ``|a|^2 + |b|^2 - 2ab``).
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


def _sq_dists(rows, cols, cols_sq):
    rows_sq = jnp.sum(rows * rows, axis=-1)
    norms = rows_sq[:, None] + cols_sq[None, :]
    d2 = norms - 2.0 * rows @ cols.T
    # Values within the expansion's round-off (~ sqrt(d) eps (|a|^2 + |b|^2)) are exact
    # duplicates as far as float arithmetic can tell: make them exactly 0, so that
    # duplicated samples give zero radii deterministically, as in the reference.
    tol = 4.0 * math.sqrt(rows.shape[-1]) * jnp.finfo(d2.dtype).eps
    return jnp.where(d2 <= tol * norms, 0.0, d2)


def _pad_rows(x, block):
    num_blocks = -(-x.shape[0] // block)
    return jnp.pad(x, ((0, num_blocks * block - x.shape[0]),) + ((0, 0),) * (x.ndim - 1)), \
        num_blocks


def _knn_sq_radii(x, k, block):
    """Squared distance from each row of ``x`` to its k-th nearest other row."""
    n = x.shape[0]
    xp, num_blocks = _pad_rows(x, block)
    cols_sq = jnp.sum(x * x, axis=-1)
    col_ids = jnp.arange(n)

    def one_block(b):
        start = b * block
        d2 = _sq_dists(lax.dynamic_slice_in_dim(xp, start, block), x, cols_sq)
        row_ids = start + jnp.arange(block)
        d2 = jnp.where(row_ids[:, None] == col_ids[None, :], jnp.inf, d2)  # exclude self
        # The k-th smallest is the max of the k smallest. Not `[:, k - 1]`: XLA CPU rewrites
        # top_k followed by a slice into a full sort of the row (far slower than the top-k).
        return -jnp.min(lax.top_k(-d2, k)[0], axis=1)

    return lax.map(one_block, jnp.arange(num_blocks)).reshape(-1)[:n]


def _cross_counts(real, fake, real_r2, fake_r2, strict, block):
    """Per fake sample: number of real balls containing it; per real sample: whether some
    fake sample lies in its ball (coverage) and whether it lies in some fake ball (recall)."""
    n = real.shape[0]
    less = jnp.less if strict else jnp.less_equal
    realp, num_blocks = _pad_rows(real, block)
    real_r2p, _ = _pad_rows(real_r2, block)
    fake_sq = jnp.sum(fake * fake, axis=-1)

    def one_block(counts, b):
        start = b * block
        d2 = _sq_dists(lax.dynamic_slice_in_dim(realp, start, block), fake, fake_sq)
        valid = (start + jnp.arange(block)) < n
        in_real_ball = less(d2, lax.dynamic_slice_in_dim(real_r2p, start, block)[:, None])
        in_real_ball = in_real_ball & valid[:, None]
        counts = counts + jnp.sum(in_real_ball, axis=0, dtype=jnp.int32)
        covered = jnp.any(in_real_ball, axis=1)
        recalled = jnp.any(less(d2, fake_r2[None, :]), axis=1)
        return counts, (covered, recalled)

    counts, (covered, recalled) = lax.scan(
        one_block, jnp.zeros(fake.shape[0], jnp.int32), jnp.arange(num_blocks))
    return counts, covered.reshape(-1)[:n], recalled.reshape(-1)[:n]


@partial(jax.jit, static_argnames=("k", "strict", "block"))
def _knn_manifold_core(real, fake, *, k, strict, block):
    shift = jnp.mean(real, axis=0)
    real, fake = real - shift, fake - shift
    # every comparison is between distances: scaling both sets by a power of two near
    # their largest entry changes no result and keeps squared distances finite and
    # non-zero for features of norm 1e20 or 1e-25 (they over/underflow in float32)
    inv = pow2_inverse_scale(jnp.maximum(jnp.max(jnp.abs(real)), jnp.max(jnp.abs(fake))))
    real, fake = real * inv, fake * inv  # a power of two: exact, every tie is kept
    real_r2 = _knn_sq_radii(real, k, block)
    fake_r2 = _knn_sq_radii(fake, k, block)
    counts, covered, recalled = _cross_counts(real, fake, real_r2, fake_r2, strict, block)
    dtype = real.dtype
    scores = (jnp.mean(counts > 0, dtype=dtype), jnp.mean(recalled, dtype=dtype),
              jnp.mean(counts, dtype=dtype) / k, jnp.mean(covered, dtype=dtype))
    # NaN features (unchecked under jit) fail every distance comparison: they would read
    # as scores of 0, so they give NaN
    bad = jnp.isnan(real).any() | jnp.isnan(fake).any()
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
