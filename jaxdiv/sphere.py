"""Geometry on the unit sphere shared by the SPP metric and GASS guidance.

GASS (ICML 2026, Algorithm 1): ``u_ind`` is, among ``num_directions`` random orthonormal
directions in the orthogonal complement of ``e_t`` (QR of ``[e_t, G]``, i.e.
Gram-Schmidt), the one with the largest batch-mean ``|e_i . u|``. This module is the one
implementation of that search: :func:`jaxdiv.metrics.principal_residual_direction` wraps
it with input checks, :func:`jaxdiv.guidance.gass` calls it inside the sampler. It sits
below both layers and imports nothing from jaxdiv.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["unit", "pow2_inverse_scale", "residual_directions", "principal_direction"]


def pow2_inverse_scale(m):
    """``2^-e`` with ``m = f 2^e``, ``f`` in [0.5, 1) (1 where ``m`` is 0 or not finite):
    multiplying by it brings ``m`` into [0.5, 1) *exactly* (a power of two changes only
    the exponent), so rescaled values keep every tie and comparison. A constant for
    gradients.

    >>> pow2_inverse_scale(jnp.array([3e20, 0.75, 0.0])).tolist()
    [1.6940658945086007e-21, 1.0, 1.0]
    """
    m = jax.lax.stop_gradient(jnp.asarray(m))
    ok = (m > 0) & jnp.isfinite(m)
    _, e = jnp.frexp(jnp.where(ok, m, 1.0))
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(m), -e), 1.0)


def unit(x):
    """Rows scaled to unit L2 norm (an all-zero row stays zero, never NaN).

    Each row is first scaled by a power of two bringing its largest absolute entry into
    [0.5, 1) (exact, :func:`pow2_inverse_scale`), so the sum of squares can neither
    overflow (rows of norm ~1e20 in float32) nor underflow (norm ~1e-25); the scale is a
    constant for gradients, which is exact because ``x / |x|`` is scale-invariant.

    >>> unit(jnp.array([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    >>> bool(jnp.allclose(unit(jnp.array([[3e20, 4e20], [3e-25, 4e-25]])), jnp.array([0.6, 0.8])))
    True
    """
    y = x * pow2_inverse_scale(jnp.max(jnp.abs(x), axis=-1, keepdims=True))
    sq = jnp.sum(y * y, axis=-1, keepdims=True)
    return y * jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(x.dtype).tiny))


def residual_directions(key, e_t, num_directions: int):
    """``(num_directions, d)`` random orthonormal rows orthogonal to the unit ``e_t``
    (QR of ``[e_t, G]`` with Gaussian ``G``).

    >>> d = residual_directions(jax.random.key(0), jnp.eye(4)[0], 3)
    >>> bool(jnp.allclose(d @ d.T, jnp.eye(3), atol=1e-6)), bool(jnp.allclose(d[:, 0], 0))
    (True, True)
    """
    d = e_t.shape[0]
    g = jax.random.normal(key, (d, num_directions), dtype=e_t.dtype)
    q, _ = jnp.linalg.qr(jnp.concatenate([e_t[:, None], g], axis=1), mode="reduced")
    return q[:, 1:].T


def principal_direction(key, emb, e_t, num_directions: int):
    """GASS's ``u_ind`` for unit rows ``emb`` (B, d) and unit ``e_t`` (d,): the candidate
    of :func:`residual_directions` with the largest batch mean ``|e_i . u|``.

    >>> emb = jnp.array([[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]])
    >>> u = principal_direction(jax.random.key(0), emb, jnp.eye(3)[0], 2)
    >>> # two orthonormal candidates span the complement; the one closer to the batch's
    >>> # axis (the second) wins, so it makes an angle of at most 45 degrees with it
    >>> abs(float(u[1])) >= 0.5**0.5
    True
    """
    dirs = residual_directions(key, e_t, num_directions)
    score = jnp.mean(jnp.abs(emb @ dirs.T), axis=0)
    return dirs[jnp.argmax(score)]
