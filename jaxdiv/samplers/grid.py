"""Default time grids of the samplers."""

from __future__ import annotations

import numpy as np

from jaxdiv import validation

__all__ = ["default_grid"]


def default_grid(schedule, num_steps, times, grid_kwargs, default_steps):
    """``times`` if given (its length fixes ``num_steps``), else ``schedule.grid(num_steps)``
    with ``num_steps`` defaulting to ``default_steps``."""
    if times is not None:
        if grid_kwargs:
            raise ValueError(f"pass either times= or grid options {sorted(grid_kwargs)}, not both")
        n = np.shape(times)[0] - 1 if np.ndim(times) == 1 else None
        if num_steps is not None and n is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} but times has {n + 1} entries (needs N + 1)")
        return times
    if num_steps is None:
        num_steps = default_steps
    return schedule.grid(validation.integer("num_steps", num_steps, 1), **grid_kwargs)
