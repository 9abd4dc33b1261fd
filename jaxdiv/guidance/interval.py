"""Interval guidance (Kynkaanniemi et al. 2024): CFG only inside a noise-level interval."""

from __future__ import annotations

from jaxdiv import validation
from jaxdiv.guidance.base import GuidanceTerm, window
from jaxdiv.guidance.cfg import cfg, check_rescale

__all__ = ["interval"]


def interval(scale, sigma_lo, sigma_hi, null_cond=None, *, per_step: bool = False,
             rescale=None, prediction_type: str | None = None) -> GuidanceTerm:
    """CFG restricted to noise levels ``sigma / alpha in (sigma_lo, sigma_hi]``.

    Kynkaanniemi et al. (2024), guidance in a limited interval: ``D = D_u + w (D_c - D_u)``
    inside and the conditional denoiser ``D_c`` (``w = 1``) outside. The interval is in the
    process-independent noise level ``sigma / alpha`` (the EDM sigma), so the same numbers
    mean the same on VP, EDM and flow processes; SD-XL's interval is ``(0.28, 5.42]``.
    Built as ``window(cfg(scale, null_cond), noise_level=(sigma_lo, sigma_hi),
    per_step=per_step)``: outside the interval the model is called once (no doubled
    batch), inside once on the doubled batch.

    **EDM2's official setting** is ``interval(2.0, 0.19, 1.61, per_step=True)`` on
    ``samplers.edm(schedules.edm(), 32)`` (Heun): the official code
    (``kynkaat/guidance-interval``, ``sampling/edm_sampler.py``) decides once per step, by
    step index (steps 17..22, whose starting noise levels lie in the interval), for both
    Heun evaluations of the step. The default, ``per_step=False``, is the paper's
    definition, a guided denoiser piecewise in its own noise level: it tests each
    evaluation's noise level, which on that sampler guides step 16's correction
    (evaluated at step 17's noise level, inside the interval) and leaves step 22's (at step
    23's, below it) unguided; on one-evaluation samplers (DDIM, Euler, DPM-Solver) the two
    agree (``tests/test_baselines_cfg_interval.py`` checks both).

    Args:
        scale: guidance weight ``w`` inside the interval (diffusers convention).
        sigma_lo: lower end (exclusive) of the guided noise levels, ``>= 0``.
        sigma_hi: upper end (inclusive), ``> sigma_lo``; ``float("inf")`` for no upper end.
        null_cond: the unconditional condition (see :func:`jaxdiv.guidance.cfg`).
        per_step: decide once per sampler step at the noise level where the step starts
            (see above and :func:`jaxdiv.guidance.window`).
        rescale, prediction_type: the CFG rescale ``phi`` of Lin et al. (2024) inside the
            interval and the prediction space it acts in (see :func:`jaxdiv.guidance.cfg`);
            outside, the conditional prediction keeps its own scale (the rescale of ``D_c``
            by itself is the identity).

    Returns:
        A "denoiser"-hook :class:`GuidanceTerm` named ``"interval"``: ``trace.info`` holds
        its ``CFGInfo`` (zeros outside) and ``trace.active`` the steps inside.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> den = lambda x, t, c: x * 0 + c            # toy: x0_hat is the condition itself
    >>> s = samplers.ddim(schedules.edm(), num_steps=3)
    >>> out = jaxdiv.sample(s, den, jnp.zeros((1, 1)), key=jax.random.key(0),
    ...                     cond=jnp.ones((1, 1)), guidance=interval(3.0, 1.0, 10.0), trace=True)
    >>> [round(float(t), 2) for t in out.trace.t]            # noise levels of the 3 steps
    [80.0, 2.52, 0.0]
    >>> out.trace.x0_hat[:, 0, 0].tolist()                  # w = 3 only at 2.52
    [1.0, 3.0, 1.0]
    """
    lo = validation.real("sigma_lo", sigma_lo, lo=0)
    hi = validation.real("sigma_hi", sigma_hi, lo=0, allow_inf=True)
    if validation.is_concrete(lo, hi) and not float(hi) > float(lo):
        raise ValueError(f"need sigma_hi > sigma_lo, got sigma_lo={float(lo):g}, "
                         f"sigma_hi={float(hi):g}")  # fmt: skip
    rescale = check_rescale(rescale, prediction_type, "interval")
    term = cfg(scale, null_cond, rescale=rescale, prediction_type=prediction_type)
    return window(term, noise_level=(lo, hi), per_step=per_step)._replace(name="interval")
