"""Rectified-flow Euler sampler (SD3's FlowMatchEulerDiscreteScheduler)."""

from __future__ import annotations

from jaxdiv.samplers.base import (
    FirstOrderOptions,
    Sampler,
    check_times,
    first_order_step,
    no_state,
)
from jaxdiv.samplers.grid import default_grid
from jaxdiv.schedules import FlowSchedule

__all__ = ["flow_euler"]


def flow_euler(schedule, num_steps: int | None = None, *, times=None) -> Sampler:
    """Euler on the flow ODE: ``x_next = x + (t_next - t) v``, ``v = (x - x0_hat) / t``.

    Esser et al. (2024) / diffusers' FlowMatchEulerDiscreteScheduler. This is the shared
    first-order update (:func:`jaxdiv.samplers.base.first_order_update`) with no noise,
    i.e. DDIM with ``eta = 0`` on the flow process. NFE = ``N``.

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
    grid = check_times(default_grid(schedule, num_steps, times, {}, 28), schedule)
    opts = FirstOrderOptions(0.0)
    return Sampler("flow_euler", schedule, grid, no_state, first_order_step, opts,
                   grid.shape[0] - 1)  # fmt: skip
