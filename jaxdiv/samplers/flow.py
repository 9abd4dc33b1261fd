"""Rectified-flow Euler sampler (SD3's FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

from jaxdiv import validation
from jaxdiv.samplers.base import (
    FirstOrderOptions,
    Sampler,
    check_times,
    first_order_step,
    no_state,
    per_sample_normal,
)
from jaxdiv.samplers.grid import default_grid
from jaxdiv.schedules import FlowSchedule

__all__ = ["flow_euler"]


def flow_euler(schedule, num_steps: int | None = None, *, times=None,
               stochastic: bool = False) -> Sampler:  # fmt: skip
    """Euler on the flow ODE: ``x_next = x + (t_next - t) v``, ``v = (x - x0_hat) / t``.

    Esser et al. (2024) / diffusers' FlowMatchEulerDiscreteScheduler. This is the shared
    first-order update (:func:`jaxdiv.samplers.base.first_order_update`) with no noise,
    i.e. DDIM with ``eta = 0`` on the flow process. NFE = ``N``.

    ``stochastic=True`` is diffusers' ``stochastic_sampling``: every step re-noises the
    prediction to the next level, ``x_next = (1 - t_next) x0_hat + t_next z`` with fresh
    ``z`` (per sample, independent of the batch), i.e. DDIM with the largest noise
    ``s = sigma_next``; the last step (``t_next = 0``) returns ``x0_hat``. It re-noises the
    posterior *mean* and forgets ``x_t``, so it is biased: on an exact Gaussian mixture the
    variances stay at ~0.6 of the true ones at any N (``tests/test_grids.py``); meant for
    few-step distilled models. ``dpmpp_2m_sde`` and ``ddim(eta=1)`` are unbiased on flows.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = flow_euler(schedules.flow(shift=3.0), num_steps=28)
    >>> s.times.shape, s.nfe
    ((29,), 28)
    """
    if not isinstance(schedule, FlowSchedule):
        raise TypeError(
            f"flow_euler needs a flow schedule (schedules.flow), got {type(schedule).__name__}; "
            "use samplers.ddim for other processes"
        )
    stochastic = validation.boolean("stochastic", stochastic)
    grid = check_times(default_grid(schedule, num_steps, times, {}, 28), schedule)
    step = _renoise_step if stochastic else first_order_step
    name = "flow_euler_stochastic" if stochastic else "flow_euler"
    return Sampler(name, schedule, grid, no_state, step, FirstOrderOptions(0.0),
                   grid.shape[0] - 1)  # fmt: skip


def _renoise_step(sampler, i, x, state, denoise, carry, keys):
    t, t_next = sampler.times[i], sampler.times[i + 1]
    sched = sampler.schedule
    x0_hat, carry, info = denoise(x, t, carry)
    z = per_sample_normal(keys, i, x)
    x_next = sched.alpha(t_next) * x0_hat + sched.sigma(t_next) * z
    return x_next.astype(x.dtype), state, carry, (x0_hat, info)
