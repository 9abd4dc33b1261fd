"""Particle guidance (Corso et al., ICLR 2024): RBF repulsion between the samples of a batch."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.guidance.base import GuidanceTerm

__all__ = ["particle", "rbf_repulsion", "rbf_potential", "median_bandwidth", "ParticleInfo"]

_SPACES = ("x_t", "x0_hat")
TIME_SCALINGS = ("score", "eps", "x0")
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
    heuristic), self pairs excluded.

    The force is ``-grad U`` with ``h`` held fixed (:func:`rbf_repulsion` takes ``h`` as a
    number), but ``h`` itself follows the particles: a gradient of a whole run (w.r.t. a
    strength or the noise) goes through it, as finite differences do.

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
    return jnp.maximum(h, _H_FLOOR)


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


def particle(
    strength,
    bandwidth="median",
    space="x_t",
    features=None,
    time_scaling="score",
    min_noise_level=None,
) -> GuidanceTerm:
    """Particle guidance: push each sample away from the others of its batch.

    Corso et al. (2024), fixed-potential particle guidance with the RBF potential
    ``U = sum_{i<j} exp(-|z_i-z_j|^2/h)`` on (optionally featurised) particles
    ``z = phi(v)``; the force on sample ``i`` is ``F_i = -grad_{v_i} U``
    (:func:`rbf_repulsion` when ``phi`` is the identity, otherwise the kernel force
    backpropagated through ``phi``: the paper's DINO variant). It is applied as an
    x0-space correction at every denoiser evaluation::

        x0_hat_i <- x0_hat_i + strength * c(t) * F_i(v)

    **Which formulation.** The defaults are the paper's: the potential acts on the noisy
    particles (``space="x_t"``, ``v = x_t`` in the process's own scaling) and the force is
    added to the score of ``x_t`` (``time_scaling="score"``: ``c(t) = sigma^2 / alpha``,
    since Tweedie's formula ``x0_hat = (x_t + sigma^2 score) / alpha`` maps a score term
    to ``x0_hat``; ``(sigma/alpha)^2`` on EDM, where ``alpha = 1``), at every noise level.
    Named variants:

    * **PG's public SD code**: ``particle(s, time_scaling="eps", min_noise_level=1.0)``
      -- the same force on ``x_t``, subtracted from the noise prediction scaled by the
      noise level, ``eps <- eps - s (sigma/alpha) F`` (``c(t) = (sigma/alpha)^2``: the
      score form divided by ``alpha``: equal to it on EDM, and at least ``sqrt(2)`` times
      it on a VP process wherever that code acts, where ``alpha = (1 + level^2)^(-1/2)``),
      switched off below noise level 1 (``sigma/alpha < 1``), as
      ``gcorso/particle-guidance``'s ``pipeline_stable_diffusion_particle.py`` does (up to
      its per-row median bandwidth; ours is one global median, which keeps the force a
      true gradient and the term permutation equivariant).
    * **jaxdiv's x0 variant** (not in the paper): ``particle(s, space="x0_hat",
      time_scaling="x0", min_noise_level=1.0)`` -- the force on the prediction
      ``x0_hat`` with constant weight: ``strength`` is a displacement of ``x0_hat`` per
      unit force. It was this library's default before protocol v2; label it as a
      variant, never as "PG".

    With ``time_scaling="score"`` or ``"eps"`` the weight vanishes at the clean end
    (``sigma = 0``) and is skipped at an infinite noise level (the first point ``t = 1``
    of a flow grid). With the median bandwidth ``|F| ~ log(B - 1) / distance``: ``strength`` has
    units of squared distance in ``v``'s space.

    Args:
        strength: repulsion weight, a finite number (a traced leaf: no recompiles).
        bandwidth: ``"median"`` (``median d^2 / log(B - 1)``, batch 1 or >= 3) or a
            fixed finite ``h > 0``.
        space: ``"x_t"`` (paper) or ``"x0_hat"``.
        features: optional differentiable map ``phi: (B, ...) -> (B, f)`` applied to the
            batch before the kernel (a DINO / CLIP stand-in).
        time_scaling: ``"score"`` (paper, ``c = sigma^2 / alpha``), ``"eps"`` (PG's
            public SD code, ``c = (sigma / alpha)^2``) or ``"x0"`` (``c = 1``), see above.
        min_noise_level: switch-off noise level ``>= 0`` (no repulsion where
            ``sigma/alpha < min_noise_level``), or None (paper: always on);
            :func:`jaxdiv.sample` refuses one above every noise level of its process.

    Returns:
        An "x0"-hook :class:`GuidanceTerm` named ``"particle"`` with
        :class:`ParticleInfo`. A batch of one particle is left unchanged.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> den = lambda x, t, c: x / (1 + t**2)                # exact denoiser of N(0, 1) data
    >>> s = samplers.ddim(schedules.edm(), 8)
    >>> noise = jnp.array([[-0.01], [0.0], [0.01]])         # three almost identical seeds
    >>> iid = jaxdiv.sample(s, den, noise, key=jax.random.key(0)).x0
    >>> pg = jaxdiv.sample(s, den, noise, key=jax.random.key(0), guidance=particle(0.01)).x0
    >>> [round(float(v), 3) for v in iid[:, 0]], [round(float(v), 3) for v in pg[:, 0]]
    ([-0.007, 0.0, 0.007], [-0.815, 0.0, 0.815])
    """
    space = validation.choice("space", space, _SPACES)
    time_scaling = validation.choice("time_scaling", time_scaling, TIME_SCALINGS)
    if features is not None:
        validation.function("features", features, "batch -> (B, f)")
    strength = validation.real("strength", strength)
    if isinstance(bandwidth, str):
        validation.choice("bandwidth", bandwidth, ("median",))
        fixed_h = None
    else:
        fixed_h = validation.real("bandwidth", bandwidth, lo=0, lo_open=True)
    if min_noise_level is not None:
        min_noise_level = validation.real("min_noise_level", min_noise_level, lo=0)
    apply = Partial(_particle_apply, strength, fixed_h, space, features, time_scaling,
                    min_noise_level)  # fmt: skip
    init = Partial(_particle_init, fixed_h is None)
    return GuidanceTerm(init, apply, "x0", "particle")


def _particle_init(median, x, cond, key):
    if median and x.shape[0] == 2:
        raise ValueError(
            "particle guidance with bandwidth='median' needs a batch of 1 or >= 3 "
            "particles (h = median d^2 / log(B - 1) is infinite at B = 2); pass "
            "bandwidth=<float>"
        )
    return ()


def _force(v, fixed_h, features):
    """``-grad_v U(phi(v))`` and the bandwidth (computed on ``phi(v)``, held fixed)."""
    phi = (lambda u: u) if features is None else features
    z = _flat(phi(v))
    h = median_bandwidth(z) if fixed_h is None else jnp.asarray(fixed_h, z.dtype)
    if features is None:
        return rbf_repulsion(v, h), h
    _, vjp = jax.vjp(lambda u: _flat(phi(u)), v)
    (f,) = vjp(rbf_repulsion(z, h))
    return f, h


def _particle_apply(strength, fixed_h, space, features, time_scaling, min_noise_level,
                    state, x0_hat, ctx):  # fmt: skip
    b = x0_hat.shape[0]
    if b == 1:
        zero = jnp.zeros((), x0_hat.dtype)
        return x0_hat, state, ParticleInfo(zero, zero, zero)
    v = x0_hat if space == "x0_hat" else ctx.x
    f, h = _force(v, fixed_h, features)
    level = ctx.noise_level
    weight = jnp.asarray(strength, x0_hat.dtype)
    if time_scaling == "score":
        # Tweedie: x0_hat = (x_t + sigma^2 score) / alpha, so s F added to the score of x_t
        # moves x0_hat by s sigma^2 / alpha F. A flow process starts at alpha = 0 (an
        # infinite noise level): skip that point
        c = ctx.sigma**2 / jnp.where(ctx.alpha > 0, ctx.alpha, 1.0)
        weight = jnp.where(jnp.isfinite(level), weight * c, 0.0)
    elif time_scaling == "eps":
        # x0_hat = (x_t - sigma eps) / alpha, so eps - s (sigma / alpha) F moves x0_hat by
        # s (sigma / alpha)^2 F
        weight = jnp.where(jnp.isfinite(level), weight * level**2, 0.0)
    if min_noise_level is not None:
        weight = jnp.where(level >= min_noise_level, weight, 0.0)
    shift = (weight * f).astype(x0_hat.dtype)
    rms = jnp.sqrt(jnp.mean(shift.reshape(b, -1) ** 2, axis=1)).mean()
    return x0_hat + shift, state, ParticleInfo(h.astype(x0_hat.dtype), weight, rms)


# guidance.couples_batch / needs_batch: each sample is pushed by the others of its batch only
_particle_apply.couples_batch = _particle_apply.needs_batch = True


def _never_acts(num_steps, levels, *params):
    """``jaxdiv.sample`` refuses a ``min_noise_level`` above every level of the process
    (:func:`jaxdiv.guidance.base.check_windows`)."""
    floor = params[5]
    if floor is None or levels is None or not validation.is_concrete(floor):
        return None
    if float(floor) > levels[1]:
        return (f"min_noise_level={float(floor):g} lies above every noise level (sigma / "
                f"alpha) of the sampler's process, at most {levels[1]:.4g}")  # fmt: skip
    return None


_particle_apply.never_acts = _never_acts
