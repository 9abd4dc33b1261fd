"""Particle guidance (Corso et al., ICLR 2024): RBF repulsion between the samples of a batch."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.guidance.base import GuidanceTerm

__all__ = ["particle", "rbf_repulsion", "rbf_potential", "median_bandwidth", "ParticleInfo"]

_SPACES = ("x0_hat", "x_t")
_SCALINGS = ("x0", "score")
_H_FLOOR = 1e-20  # keeps 2 w / h finite when (almost) all particles coincide


class ParticleInfo(NamedTuple):
    """Per-evaluation diagnostics of particle guidance.

    Attributes:
        bandwidth: the RBF bandwidth ``h`` used.
        weight: the effective weight ``strength * c(t)`` (0 where switched off).
        shift_norm: batch-mean RMS of the applied ``x0_hat`` shift.
    """

    bandwidth: jax.Array
    weight: jax.Array
    shift_norm: jax.Array


def _flat(z):
    return z.reshape(z.shape[0], -1)


def _sq_dists(z):
    diff = z[:, None, :] - z[None, :, :]
    return jnp.sum(diff * diff, -1), diff


def median_bandwidth(z):
    """``h = median_{i != j} |z_i - z_j|^2 / log(B - 1)`` (PG's public code, SVGD's
    heuristic), self pairs excluded, as a constant for gradients.

    Needs ``B >= 3`` (``log(1) = 0`` at ``B = 2``).

    >>> import jax.numpy as jnp
    >>> z = jnp.array([[0.0], [1.0], [3.0]])                  # d^2: 1, 9, 4
    >>> round(float(median_bandwidth(z)), 4)                  # 4 / log 2
    5.7708
    """
    z = _flat(jnp.asarray(z))
    b = z.shape[0]
    if b < 3:
        raise ValueError(
            f"the median bandwidth needs a batch of >= 3 particles (log(B - 1) = 0 at B = 2), "
            f"got B={b}; pass a fixed bandwidth"
        )
    d2, _ = _sq_dists(z)
    iu = np.triu_indices(b, 1)
    h = jnp.median(d2[iu]) / math.log(b - 1)
    return jax.lax.stop_gradient(jnp.maximum(h, _H_FLOOR))


def rbf_potential(z, bandwidth):
    """``U(z) = sum_{i < j} exp(-|z_i - z_j|^2 / h)`` on flattened particles ``z``.

    >>> import jax.numpy as jnp
    >>> round(float(rbf_potential(jnp.array([[0.0], [1.0]]), 1.0)), 4)   # e^-1
    0.3679
    """
    z = _flat(jnp.asarray(z))
    d2, _ = _sq_dists(z)
    k = jnp.exp(-d2 / bandwidth)
    return 0.5 * (jnp.sum(k) - jnp.sum(jnp.diagonal(k)))


def rbf_repulsion(z, bandwidth):
    """The repulsive force ``F_i = sum_{j != i} 2 w_ij (z_i - z_j) / h = -grad_{z_i} U(z)``,
    ``w_ij = exp(-|z_i - z_j|^2 / h)``, ``h`` held fixed (Corso et al. 2024, the
    fixed-potential guidance term with an RBF kernel). Shape of ``z``.

    >>> import jax.numpy as jnp
    >>> [round(float(f), 4) for f in rbf_repulsion(jnp.array([[0.0], [1.0]]), 1.0)[:, 0]]
    [-0.7358, 0.7358]
    """
    z = jnp.asarray(z)
    zf = _flat(z)
    d2, diff = _sq_dists(zf)
    coef = 2.0 * jnp.exp(-d2 / bandwidth) / bandwidth  # (B, B); the diagonal multiplies 0
    return jnp.einsum("ij,ijd->id", coef, diff).reshape(z.shape)


def _check_features(features):
    if features is not None and not callable(features):
        raise TypeError(f"features must be None or a callable batch -> (B, f), got "
                        f"{type(features).__name__}")  # fmt: skip


def particle(
    strength,
    bandwidth="median",
    space="x0_hat",
    features=None,
    time_scaling="x0",
    min_noise_level=1.0,
) -> GuidanceTerm:
    """Particle guidance: push each sample away from the others of its batch.

    Corso et al. (2024), fixed-potential particle guidance with the RBF potential
    ``U = sum_{i<j} exp(-|z_i-z_j|^2/h)`` on (optionally featurised) particles
    ``z = phi(v)``; the force on sample ``i`` is
    ``-grad_{v_i} U`` (:func:`rbf_repulsion` when ``phi`` is the identity, otherwise the
    kernel force backpropagated through ``phi``: the paper's DINO variant). It is applied
    as an x0-space correction at every denoiser evaluation::

        x0_hat_i <- x0_hat_i + strength * c(t) * (-grad_{v_i} U(phi(v)))

    **How strength scales.**

    * ``space="x0_hat"`` (default): ``v = x0_hat`` (the prediction entering this term);
      ``space="x_t"``: ``v = x_t``, the noisy batch in the process's own scaling.
    * ``time_scaling="x0"`` (default): ``c(t) = 1``: ``strength`` is a displacement of
      ``x0_hat`` per unit force. ``time_scaling="score"``: ``c(t) = (sigma/alpha)^2``:
      ``strength`` weighs the force as a term added to the score of ``x_t / alpha``
      (skipped at an infinite noise level: the first point ``t = 1`` of a flow grid).
    * ``min_noise_level`` (default ``1.0``): no repulsion at noise levels
      ``sigma/alpha < min_noise_level``, as PG's public code (``sigma < 1``); ``None``
      keeps it on to the end, which pushes the final samples off the data (the last
      ``x0_hat`` is the output).
    * With the median bandwidth, ``|F| ~ log(B - 1) / distance``: ``strength`` has units
      of squared distance in ``v``'s space.

    PG's public Stable Diffusion code subtracts ``strength * sigma * F(x_t)`` from the
    predicted noise and skips ``sigma < 1`` (``sigma`` the noise level): that is exactly
    ``particle(strength, space="x_t", time_scaling="score")`` (up to its per-row median
    bandwidth; ours is one global median, which keeps the force a true gradient and the
    term permutation equivariant).

    Args:
        strength: repulsion weight (float or traced scalar).
        bandwidth: ``"median"`` (``median d^2 / log(B - 1)``, batch 1 or >= 3) or a
            fixed ``h > 0``.
        space: ``"x0_hat"`` or ``"x_t"``.
        features: optional differentiable map ``phi: (B, ...) -> (B, f)`` applied to the
            batch before the kernel (a DINO / CLIP stand-in).
        time_scaling: ``"x0"`` or ``"score"``, see above.
        min_noise_level: switch-off noise level, or None.

    Returns:
        An "x0"-hook :class:`GuidanceTerm` with :class:`ParticleInfo`. A batch of one
        particle is left unchanged.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> den = lambda x, t, c: x / (1 + t**2)                # exact denoiser of N(0, 1) data
    >>> s = samplers.ddim(schedules.edm(), 8)
    >>> noise = jnp.array([[-0.01], [0.0], [0.01]])         # three almost identical seeds
    >>> iid = jaxdiv.sample(s, den, noise, key=jax.random.key(0)).x0
    >>> pg = jaxdiv.sample(s, den, noise, key=jax.random.key(0), guidance=particle(0.01)).x0
    >>> [round(float(v), 3) for v in iid[:, 0]], [round(float(v), 3) for v in pg[:, 0]]
    ([-0.007, 0.0, 0.007], [-0.819, 0.0, 0.819])
    """
    if space not in _SPACES:
        raise ValueError(f"space must be one of {_SPACES}, got {space!r}")
    if time_scaling not in _SCALINGS:
        raise ValueError(f"time_scaling must be one of {_SCALINGS}, got {time_scaling!r}")
    _check_features(features)
    fixed_h = None
    if isinstance(bandwidth, str):
        if bandwidth != "median":
            raise ValueError(f"bandwidth must be 'median' or a number > 0, got {bandwidth!r}")
    elif isinstance(bandwidth, jax.core.Tracer):
        fixed_h = bandwidth
    else:
        try:
            fixed_h = float(bandwidth)
        except (TypeError, ValueError):
            raise TypeError(f"bandwidth must be 'median' or a number > 0, got "
                            f"{type(bandwidth).__name__}") from None  # fmt: skip
        if not fixed_h > 0:
            raise ValueError(f"bandwidth must be > 0, got {fixed_h}")
    if min_noise_level is not None and not isinstance(min_noise_level, jax.core.Tracer):
        if not float(min_noise_level) >= 0:
            raise ValueError(f"min_noise_level must be >= 0 or None, got {min_noise_level}")

    def init(x, cond, key):
        if fixed_h is None and x.shape[0] == 2:
            raise ValueError(
                "particle guidance with bandwidth='median' needs a batch of 1 or >= 3 "
                "particles (h = median d^2 / log(B - 1) is infinite at B = 2); pass "
                "bandwidth=<float>"
            )
        return ()

    def force(v):
        """``-grad_v U(phi(v))`` and the bandwidth (computed on ``phi(v)``, held fixed)."""
        phi = (lambda u: u) if features is None else features
        z = _flat(phi(v))
        h = median_bandwidth(z) if fixed_h is None else jnp.asarray(fixed_h, z.dtype)
        if features is None:
            return rbf_repulsion(v, h), h
        _, vjp = jax.vjp(lambda u: _flat(phi(u)), v)
        (f,) = vjp(rbf_repulsion(z, h))
        return f, h

    def apply(state, x0_hat, ctx):
        b = x0_hat.shape[0]
        if b == 1:
            zero = jnp.zeros((), x0_hat.dtype)
            return x0_hat, state, ParticleInfo(zero, zero, zero)
        v = x0_hat if space == "x0_hat" else ctx.x
        f, h = force(v)
        level = ctx.noise_level
        weight = jnp.asarray(strength, x0_hat.dtype)
        if time_scaling == "score":
            # a flow process starts at alpha = 0 (infinite noise level): skip that point
            weight = jnp.where(jnp.isfinite(level), weight * level**2, 0.0)
        if min_noise_level is not None:
            weight = jnp.where(level >= min_noise_level, weight, 0.0)
        shift = (weight * f).astype(x0_hat.dtype)
        rms = jnp.sqrt(jnp.mean(shift.reshape(b, -1) ** 2, axis=1)).mean()
        return x0_hat + shift, state, ParticleInfo(h.astype(x0_hat.dtype), weight, rms)

    return GuidanceTerm(init, apply, "x0")
