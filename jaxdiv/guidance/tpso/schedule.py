"""TPSO's progressive (coarse-to-fine) condition schedule, arXiv 2511.19811 Eq. 10-11."""

from __future__ import annotations

import jax.numpy as jnp

from jaxdiv.dtypes import as_float

__all__ = ["scheduled_steps", "tpso_alpha", "tpso_alphas"]


def scheduled_steps(ratio, num_steps):
    """``n = int(|ratio| * num_steps)``, the public code's count of scheduled steps, for a
    (traced) ``ratio``: floored with a few ulps of slack, so a product that is an integer
    up to the ratio's rounding counts as that integer (float32 ``0.53 * 100`` is
    ``52.99999...``; Python's float64 gives 53).

    >>> int(scheduled_steps(0.53, 100)), int(scheduled_steps(1 / 41, 41)), int(scheduled_steps(0.529, 100))
    (53, 1, 52)
    """  # noqa: E501
    ratio = as_float(ratio)
    product = jnp.abs(ratio) * num_steps
    return jnp.floor(product * (1 + 8 * jnp.finfo(product.dtype).eps))


def tpso_alpha(step, num_steps, ratio):
    """``alpha`` at sampler step ``step``: linear from 1 to 0 over the first
    ``n = int(|ratio| * num_steps)`` steps (``linspace(1, 0, n)``), 0 afterwards; a negative
    ratio reverses the sequence (late injection, the paper's ablation).

    ``step`` and ``ratio`` may be traced (a new ratio never recompiles); ``num_steps`` is
    the sampler's static step count.

    >>> [round(float(tpso_alpha(i, 10, 0.4)), 4) for i in range(5)]
    [1.0, 0.6667, 0.3333, 0.0, 0.0]
    """
    step, ratio = as_float(step), as_float(ratio)
    n = scheduled_steps(ratio, num_steps)
    i = jnp.where(ratio < 0, num_steps - 1 - step, step)
    ramp = jnp.where(n > 1, 1.0 - i / jnp.maximum(n - 1.0, 1.0), 1.0)
    return jnp.where(i < n, ramp, 0.0)


def tpso_alphas(num_steps, ratio):
    """All ``num_steps`` values of :func:`tpso_alpha`, in sampling order (noisy to clean).

    >>> [round(float(a), 4) for a in tpso_alphas(10, 0.4)]
    [1.0, 0.6667, 0.3333, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    return tpso_alpha(jnp.arange(num_steps), num_steps, ratio)
