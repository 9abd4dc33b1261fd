"""The two-moons distribution (as in scikit-learn's ``make_moons``, with random angles)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiv import validation

__all__ = ["two_moons"]


def two_moons(key, n: int, noise: float = 0.05):
    """``n`` samples ``(n, 2)`` of two interleaved half circles plus Gaussian noise.

    Upper moon ``(cos a, sin a)``, lower moon ``(1 - cos a, 0.5 - sin a)``, ``a ~ U[0, pi]``,
    half the points on each (scikit-learn's geometry; angles are random so this is a
    distribution to sample, not a fixed grid).

    >>> two_moons(jax.random.key(0), 6).shape
    (6, 2)
    """
    validation.prng_key("key", key)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    k_a, k_n = jax.random.split(key)
    a = jax.random.uniform(k_a, (n,), minval=0.0, maxval=jnp.pi)
    upper = jnp.arange(n) < (n + 1) // 2
    x = jnp.where(upper, jnp.cos(a), 1.0 - jnp.cos(a))
    y = jnp.where(upper, jnp.sin(a), 0.5 - jnp.sin(a))
    pts = jnp.stack([x, y], axis=-1)
    return pts + noise * jax.random.normal(k_n, (n, 2))
