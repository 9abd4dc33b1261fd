"""Condition-annealed diffusion sampling (CADS; Sadat et al., ICLR 2024)."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.dtypes import as_float
from jaxdiv.guidance.base import GuidanceTerm
from jaxdiv.guidance.cfg import needs_cond

__all__ = ["cads", "cads_gamma", "cads_time", "CADSInfo"]

_TIME_MODES = ("progress", "flow")


class CADSInfo(NamedTuple):
    """Per-evaluation CADS diagnostics: normalised time ``t`` and ``gamma(t)``."""

    t: jax.Array
    gamma: jax.Array


def cads_gamma(t, tau1, tau2):
    """CADS's linear annealing schedule (Sadat et al. 2024), ``t = 1`` is pure noise.

    ``gamma(t) = 1`` for ``t <= tau1``, ``(tau2 - t) / (tau2 - tau1)`` in between and ``0``
    for ``t >= tau2``.

    >>> [round(float(cads_gamma(t, 0.6, 0.9)), 4) for t in (0.5, 0.6, 0.75, 0.84, 0.9, 1.0)]
    [1.0, 1.0, 0.5, 0.2, 0.0, 0.0]
    """
    t = as_float(t)  # float32, float64 in an x64 run
    return jnp.clip((tau2 - t) / (tau2 - tau1), 0.0, 1.0).astype(t.dtype)


def cads_time(ctx, time="progress"):
    """Normalised CADS time in ``[0, 1]`` (1 = noise) of a :class:`StepContext`.

    * ``"progress"`` (default): ``1 - step / num_steps``, the fraction of sampling steps
      still to run. On a DDPM/DDIM grid with trailing spacing this is ``timestep / T`` up
      to ``1/T`` -- the time CADS was defined and tuned on -- and it is what k-diffusion
      style reimplementations use on EDM grids.
    * ``"flow"``: ``lambda / (1 + lambda)`` with ``lambda = sigma / alpha``: the
      rectified-flow time of the current noise level. Grid-independent and the process
      time itself on flow processes; ``t = 0.6`` is noise level 1.5, ``t = 0.9`` is 9.
    * a callable ``time(ctx) -> t``.

    >>> from jaxdiv.guidance import StepContext
    >>> ctx = StepContext(None, 3.0, 1.0, 3.0, 5, 20, None, None)
    >>> float(cads_time(ctx)), float(cads_time(ctx, "flow"))
    (0.75, 0.75)
    """
    if callable(time):
        t = time(ctx)
    elif time == "progress":
        t = ctx.progress
    elif time == "flow":
        # sigma / (alpha + sigma) = lambda / (1 + lambda), finite at alpha = 0 (flow t = 1)
        t = ctx.sigma / (ctx.alpha + ctx.sigma)
    else:
        raise ValueError(f"time must be one of {_TIME_MODES} or a callable ctx -> t, got {time!r}")
    return as_float(t)


def _stats(y):
    """Per-sample mean and (population) std over all non-batch axes.

    The std of a constant sample is 0 with gradient 0 (``jnp.std``'s is NaN there: sqrt'(0)
    = inf times 0), so ``jax.grad`` through CADS stays finite for a condition that is
    constant per sample, e.g. every one-dimensional condition.
    """
    axes = tuple(range(1, y.ndim))
    mean = jnp.mean(y, axes, keepdims=True)
    var = jnp.mean(jnp.square(y - mean), axes, keepdims=True)
    pos = var > 0
    return mean, jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)


def _anneal(y, z, gamma, noise_scale, psi, rescale):
    y_hat = jnp.sqrt(gamma) * y + noise_scale * jnp.sqrt(1.0 - gamma) * z
    if not rescale:
        return y_hat
    mean_in, std_in = _stats(y)
    mean_hat, std_hat = _stats(y_hat)
    ok = std_hat > 0
    # std_hat = 0 only when y_hat = sqrt(gamma) y is constant along with y, or when
    # gamma = 0 and s = 0; the rescaled value's limit is then y itself (CADS's code
    # skips the rescaling there, which would leave a zero embedding at gamma = 0)
    standardised = (y_hat - mean_hat) / jnp.where(ok, std_hat, 1.0) * std_in + mean_in
    y_scaled = jnp.where(ok, standardised, y)
    return psi * y_scaled + (1.0 - psi) * y_hat


def cads(tau1=0.6, tau2=0.9, noise_scale=0.25, psi=1.0, rescale=True, time="progress"):
    """CADS: anneal Gaussian noise into the condition embedding early in sampling.

    Sadat et al. (2024), condition annealing with rescaling (formulas as in PAPERS.md,
    "Baselines"): with ``gamma = gamma(t)`` (:func:`cads_gamma`),

    * ``y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n``, ``n ~ N(0, I)``;
    * rescale: ``y_res = (y_hat - mean(y_hat)) / std(y_hat) * std(y) + mean(y)``;
    * mix: ``y_out = psi y_res + (1 - psi) y_hat``.

    Means and stds are taken **per sample** over all non-batch axes (CADS's code pools
    the whole tensor; per sample keeps samples independent of the batch), so a condition
    of one number per sample comes back exactly from the rescaling (the term is then the
    identity at ``psi = 1``: use ``rescale=False`` or ``psi < 1`` there). Every floating
    leaf of the condition pytree is annealed; integer leaves (token ids) pass through,
    and a condition without a floating leaf (class labels) is refused.
    Noise is drawn per sample from ``fold_in(ctx.key, b)``, fresh at every evaluation.
    Chain it before :func:`~jaxdiv.guidance.cfg`: only the conditional branch sees the
    noisy condition, the null embedding stays as it is (as in CADS).

    With ``noise_scale = 0``, ``rescale=True`` and ``psi = 1`` the term is the identity
    (the rescaling undoes ``sqrt(gamma)``); for ``t <= tau1`` it is the identity for any
    setting. Typical values: ``tau1=0.6, tau2=0.9, s=0.25, psi=1`` (class-conditional) and
    ``tau1=0.3, tau2=0.8`` in some text-to-image settings.

    Args:
        tau1, tau2: ``0 <= tau1 < tau2 <= 1``; clean condition below ``tau1``, pure
            (rescaled) noise above ``tau2``.
        noise_scale: ``s >= 0``.
        psi: mixing factor in ``[0, 1]`` between rescaled and raw noisy embedding.
        rescale: apply the rescaling and mixing (False: return ``y_hat``).
        time: how the sampler's time maps to CADS's ``t in [0, 1]``: ``"progress"``,
            ``"flow"`` or a callable, see :func:`cads_time`. :func:`jaxdiv.sample` refuses
            ``"flow"`` with ``tau1`` at or above the flow time of the process's largest
            noise level (SD's 14.6 is ``t = 0.936``): CADS would never anneal.

    Returns:
        A "condition"-hook :class:`GuidanceTerm` with :class:`CADSInfo`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules, guidance
    >>> den = lambda x, t, c: x * 0 + c.mean(-1, keepdims=True)
    >>> g = guidance.chain(cads(noise_scale=0.25), guidance.cfg(2.0))
    >>> out = jaxdiv.sample(samplers.ddim(schedules.edm(), 10), den, jnp.zeros((2, 1)),
    ...                     key=jax.random.key(0), cond=jnp.ones((2, 4)), guidance=g, trace=True)
    >>> [round(float(g), 3) for g in out.trace.info["cads"].gamma]   # t = 1, 0.9, ..., 0.1
    [0.0, 0.0, 0.333, 0.667, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    """
    tau1 = validation.real("tau1", tau1, lo=0, hi=1)
    tau2 = validation.real("tau2", tau2, lo=0, hi=1)
    if validation.is_concrete(tau1, tau2) and not float(tau2) > float(tau1):
        raise ValueError(f"need tau1 < tau2, got tau1={float(tau1):g}, tau2={float(tau2):g}")
    noise_scale = validation.real("noise_scale", noise_scale, lo=0)
    psi = validation.real("psi", psi, lo=0, hi=1)
    rescale = validation.boolean("rescale", rescale)
    if not callable(time) and time not in _TIME_MODES:
        raise ValueError(f"time must be one of {_TIME_MODES} or a callable ctx -> t, got {time!r}")
    apply = Partial(_cads_apply, tau1, tau2, noise_scale, psi, rescale, time)
    return GuidanceTerm(needs_cond("cads"), apply, "condition", "cads")


def _cads_apply(tau1, tau2, noise_scale, psi, rescale, time, state, cond, ctx):
    t = cads_time(ctx, time)
    gamma = cads_gamma(t, tau1, tau2)
    leaves, treedef = jax.tree.flatten(cond)
    kinds = [jnp.asarray(leaf).dtype for leaf in leaves]
    if not any(jnp.issubdtype(k, jnp.floating) for k in kinds):
        raise TypeError(
            f"cads: the condition has no floating-point leaf to anneal (got dtypes "
            f"{sorted({str(k) for k in kinds})}): CADS adds noise to a condition "
            "*embedding*; class labels or token ids would pass through unchanged and the "
            "term would never act. Condition the denoiser on an embedding (e.g. one-hot or "
            "learned class embeddings) and pass that as cond"
        )
    out = []
    for j, leaf in enumerate(leaves):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            out.append(leaf)
            continue
        key = jax.random.fold_in(ctx.key, j)
        per_sample = lambda b, k=key, l=leaf: jax.random.normal(
            jax.random.fold_in(k, b), l.shape[1:], l.dtype
        )
        z = jax.vmap(per_sample)(jnp.arange(leaf.shape[0]))
        g = gamma.astype(leaf.dtype)
        out.append(_anneal(leaf, z, g, noise_scale, psi, rescale).astype(leaf.dtype))
    return jax.tree.unflatten(treedef, out), state, CADSInfo(t, gamma)


def _never_acts(num_steps, levels, tau1, tau2, noise_scale, psi, rescale, time):
    """``jaxdiv.sample`` refuses ``time="flow"`` with ``tau1`` at or above the flow time of
    the process's largest noise level (:func:`jaxdiv.guidance.base.check_windows`): CADS
    anneals only where ``t > tau1``. ``"progress"`` starts at ``t = 1 > tau1`` on every
    sampler; a callable's range is unknown."""
    if not (isinstance(time, str) and time == "flow") or levels is None:
        return None
    if not validation.is_concrete(tau1):
        return None
    top = levels[1]
    t_max = 1.0 if np.isinf(top) else top / (1.0 + top)
    if float(tau1) >= t_max:
        return (f"tau1={float(tau1):g} with time='flow' is at or above the flow time of the "
                f"process's largest noise level ({top:.4g}, t = {t_max:.4g}), and CADS "
                f"anneals only where t > tau1; use tau1 < {t_max:.4g} or time='progress'")
    return None


_cads_apply.never_acts = _never_acts
