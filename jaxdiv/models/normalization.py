"""Group normalisation with per-channel statistics and a closed-form tangent.

XLA:CPU reduces a channels-last ``(B, ..., C)`` array fastest over its leading axes with
the channels as contiguous lanes, so the statistics are first summed per channel and only
then per group (a ``(B, C)`` array: negligible). Differentiating that form by autodiff
costs 2-3x the group-reshaped form's backward; the tangent is therefore written by hand
(``jax.custom_jvp``): forward mode uses it as is and reverse mode transposes it into the
usual GroupNorm backward (two per-channel reductions of the cotangent and one elementwise
pass). ``python -m benchmarks.group_norm`` times both forms against ``torch``.
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

__all__ = ["group_norm"]


def group_norm(
    x: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, eps: float
) -> jax.Array:
    """Group normalisation of a channels-last array, computed in float32.

    Wu & He (2018), Eq. 1-2: ``y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta``, with
    ``mu_g`` and the biased ``var_g`` over every axis but the batch (first) axis and
    ``C / num_groups`` contiguous channels (``torch.nn.functional.group_norm``'s grouping).

    Args:
        x: ``(B, ..., C)`` input, any float dtype.
        scale: ``(C,)`` per-channel ``gamma``.
        bias: ``(C,)`` per-channel ``beta``.
        num_groups: G, a positive divisor of C.
        eps: variance epsilon (static: a Python float).

    Returns:
        The normalised array in float32, shaped as ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.arange(16.0).reshape(1, 2, 2, 4)
        >>> y = group_norm(x, jnp.ones(4), jnp.zeros(4), 2, 1e-5)
        >>> [round(float(v), 3) for v in y[0, :, :, :2].ravel()]  # group 0: mean 6.5, std 4.5
        [-1.444, -1.222, -0.556, -0.333, 0.333, 0.556, 1.222, 1.444]
    """
    c = x.shape[-1]
    if x.ndim < 2:
        raise ValueError(f"group_norm: x must be (B, ..., C) with ndim >= 2, got shape {x.shape}")
    if num_groups <= 0 or c % num_groups:
        raise ValueError(
            f"group_norm: num_groups must be a positive divisor of the channel count {c} "
            f"(x's last axis), got {num_groups}"
        )
    for name, v in (("scale", scale), ("bias", bias)):
        if v.shape != (c,):
            raise ValueError(f"group_norm: {name} must have shape ({c},), got {v.shape}")
    f32 = jnp.float32
    return _group_norm(x.astype(f32), scale.astype(f32), bias.astype(f32), num_groups, float(eps))


def _channel_sum(v: jax.Array) -> jax.Array:
    """Sum over every axis but the first and last, kept as size-1 axes."""
    return v.sum(axis=tuple(range(1, v.ndim - 1)), keepdims=True)


def _group_mean(channel_sums: jax.Array, num_groups: int, count: int) -> jax.Array:
    """Per-channel sums ``(B, 1.., C)`` -> each channel's group mean, same shape."""
    *lead, c = channel_sums.shape
    grouped = channel_sums.reshape(*lead, num_groups, c // num_groups)
    sums = jnp.broadcast_to(grouped.sum(-1, keepdims=True), grouped.shape)
    return sums.reshape(channel_sums.shape) / count


def _centred_and_rstd(x: jax.Array, num_groups: int, eps: float):
    count = math.prod(x.shape[1:]) // num_groups  # per group, per batch element
    centred = x - _group_mean(_channel_sum(x), num_groups, count)
    var = _group_mean(_channel_sum(jnp.square(centred)), num_groups, count)
    return centred, jax.lax.rsqrt(var + eps), count


@partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _group_norm(x, scale, bias, num_groups: int, eps: float):
    centred, rstd, _ = _centred_and_rstd(x, num_groups, eps)
    return centred * (rstd * scale) + bias


@partial(_group_norm.defjvp, symbolic_zeros=True)
def _group_norm_jvp(num_groups: int, eps: float, primals, tangents):
    # d xhat = rstd (dx - mean_g(dx) - xhat mean_g(dx xhat)); every group mean is taken
    # per channel first, so the transpose (reverse mode) also reduces per channel.
    x, scale, bias = primals
    dx, dscale, dbias = tangents
    centred, rstd, count = _centred_and_rstd(x, num_groups, eps)
    gain = rstd * scale
    out = centred * gain + bias
    parts = []
    if not isinstance(dx, SymbolicZero):
        m1 = _group_mean(_channel_sum(dx), num_groups, count)
        m2 = _group_mean(_channel_sum(dx * centred), num_groups, count)
        parts.append(gain * (dx - m1) - centred * (gain * jnp.square(rstd) * m2))
    if not isinstance(dscale, SymbolicZero):
        parts.append(centred * (rstd * dscale))
    if not isinstance(dbias, SymbolicZero):
        parts.append(jnp.broadcast_to(dbias, out.shape))
    if not parts:
        return out, jnp.zeros_like(out)
    return out, sum(parts[1:], parts[0])
