"""Time grids: the samplers' defaults, and Karras / exponential / uniform spacing on any
process (pass them as ``times=``)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxdiv import validation

__all__ = ["default_grid", "exponential_grid", "karras_grid", "uniform_grid"]


def default_grid(schedule, num_steps, times, grid_kwargs, default_steps):
    """``times`` if given (its length fixes ``num_steps``), else ``schedule.grid(num_steps)``
    with ``num_steps`` defaulting to ``default_steps``.

    >>> from jaxdiv import schedules
    >>> default_grid(schedules.edm(), None, None, {}, 18).shape      # the default: 18 steps
    (19,)
    >>> default_grid(schedules.edm(), 3, [5.0, 1.0, 0.0], {}, 18)
    Traceback (most recent call last):
    ...
    ValueError: num_steps=3 but times has 3 entries (needs N + 1)
    >>> default_grid(schedules.edm, 3, None, {}, 18)
    Traceback (most recent call last):
    ...
    TypeError: schedule must be a process such as schedules.edm() (with alpha, sigma, grid), got the function edm: call it, e.g. edm()
    """  # noqa: E501
    validation.process("schedule", schedule,
                       ("alpha", "sigma") + (() if times is not None else ("grid",)))
    if times is not None:
        if grid_kwargs:
            raise ValueError(f"pass either times= or grid options {sorted(grid_kwargs)}, not both")
        n = np.shape(times)[0] - 1 if np.ndim(times) == 1 else None
        if num_steps is not None and n is not None and num_steps != n:
            raise ValueError(f"num_steps={num_steps} but times has {n + 1} entries (needs N + 1)")
        return times
    if num_steps is None:
        num_steps = default_steps
    num_steps = validation.integer("num_steps", num_steps, 1)
    grid = schedule.grid(num_steps, **grid_kwargs)
    if validation.is_concrete(grid) and not np.all(np.isfinite(np.asarray(grid))):
        # the user passed no times: name the schedule parameters that produced them
        params = {k: v for k, v in schedule._asdict().items()
                  if k != "name" and np.ndim(v) == 0}  # fmt: skip
        shown = ", ".join(f"{k}={float(v):g}" for k, v in params.items())
        raise ValueError(
            f"the {getattr(schedule, 'name', type(schedule).__name__)} schedule ({shown}) "
            f"gives a non-finite time grid for num_steps={num_steps}: "
            f"{np.asarray(grid).tolist()[:4]}...; check those parameters"
        )
    return grid


_SPACES = {"VPSchedule": "level", "EDMSchedule": "level", "FlowSchedule": "t"}


def _range(schedule, space):
    """Default ``(high, low)`` ends of a grid: the schedule's own first and last noisy
    times (VP: ``T - 1`` and 0, EDM: ``sigma_max`` and ``sigma_min``, flow: the ends of its
    shifted grid), as noise levels or times."""
    kind = type(schedule).__name__
    if kind == "VPSchedule":
        t_hi, t_lo = float(schedule.num_train_timesteps - 1), 0.0
    elif kind == "EDMSchedule":
        t_hi, t_lo = schedule.sigma_max, schedule.sigma_min
    else:
        g = schedule.grid(2)
        t_hi, t_lo = g[0], g[1]
    if space == "t":
        return jnp.asarray(t_hi), jnp.asarray(t_lo)
    return schedule.noise_level(jnp.asarray(t_hi)), schedule.noise_level(jnp.asarray(t_lo))


def _finish(schedule, values, space):
    times = values if space == "t" else schedule.t_of_noise_level(values)
    clean = jnp.full((1,), schedule.t_clean, times.dtype)
    return jnp.concatenate([times, clean])


def _ends(schedule, space, high, low):
    d_hi, d_lo = _range(schedule, space)
    high = d_hi if high is None else validation.real("high", high, lo=0, lo_open=True)
    low = d_lo if low is None else validation.real("low", low, lo=0, lo_open=True)
    if validation.is_concrete(high, low) and not float(high) > float(low):
        raise ValueError(f"need high > low, got high={float(high):g}, low={float(low):g}")
    # a VP process ends at timestep T - 1, a flow at t = 1: beyond, times would be clamped
    # there and the spacing silently lost
    top = {"VPSchedule": d_hi, "FlowSchedule": 1.0}.get(type(schedule).__name__)
    if top is not None and validation.is_concrete(high, top) and float(high) > float(top) * (
            1 + 1e-6):  # fmt: skip
        what = "noise level" if space != "t" else "t"
        raise ValueError(f"high={float(high):g} lies above the process's largest {what}, "
                         f"{float(top):.6g}: the grid would be clamped there")  # fmt: skip
    return high, low


def _space(schedule):
    kind = type(schedule).__name__
    if kind not in _SPACES:
        raise TypeError(f"schedule must be a jaxdiv schedule (vp_*, edm, flow), got {kind}")
    return _SPACES[kind]


def karras_grid(schedule, num_steps: int, rho=7.0, *, high=None, low=None):
    """Karras et al. (2022) Eq. 5 spacing on any process, plus the clean endpoint.

    ``(high^(1/rho) + i/(N-1) (low^(1/rho) - high^(1/rho)))^rho`` in the noise level
    ``sigma / alpha`` on VP and EDM processes (then ``t = schedule.t_of_noise_level``), and
    in ``t`` itself on flows, where the noise level is infinite at ``t = 1`` -- as diffusers'
    ``use_karras_sigmas`` does for ``DPMSolverMultistepScheduler`` / ``EulerDiscreteScheduler``
    (VP: between the noise levels of timesteps ``T-1`` and 0) and for
    ``FlowMatchEulerDiscreteScheduler`` (between the ends of its shifted grid). ``high`` /
    ``low`` override the ends (in that space). Pass the result as ``times=``.

    >>> from jaxdiv import schedules
    >>> g = karras_grid(schedules.edm(), 18)        # EDM's own grid
    >>> [round(float(v), 3) for v in g[:2]], float(g[-1])
    ([80.0, 57.586], 0.0)
    """
    from jaxdiv.schedules import karras_sigmas

    space = _space(schedule)
    high, low = _ends(schedule, space, high, low)
    rho = validation.real("rho", rho, lo=0, lo_open=True)
    return _finish(schedule, karras_sigmas(num_steps, low, high, rho), space)


def exponential_grid(schedule, num_steps: int, *, high=None, low=None):
    """Log-uniform spacing (k-diffusion's ``get_sigmas_exponential``, diffusers'
    ``use_exponential_sigmas``) on any process: ``exp(linspace(log high, log low, N))`` in
    the same space as :func:`karras_grid`, plus the clean endpoint.

    >>> from jaxdiv import schedules
    >>> [round(float(v), 3) for v in exponential_grid(schedules.edm(), 3)]
    [80.0, 0.4, 0.002, 0.0]
    """
    validation.integer("num_steps", num_steps, minimum=1)
    space = _space(schedule)
    high, low = _ends(schedule, space, high, low)
    logs = jnp.linspace(jnp.log(high), jnp.log(low), num_steps)
    return _finish(schedule, jnp.exp(logs), space)


def uniform_grid(schedule, num_steps: int, *, high=None, low=None):
    """Uniform spacing in process time ``t`` from ``high`` to ``low`` (defaults: the
    schedule's first and last noisy times, see :func:`karras_grid`), plus the clean
    endpoint.

    >>> from jaxdiv import schedules
    >>> [round(float(v), 2) for v in uniform_grid(schedules.vp_linear(), 4)]
    [999.0, 666.0, 333.0, 0.0, -1.0]
    """
    validation.integer("num_steps", num_steps, minimum=1)
    high, low = _ends(schedule, "t", high, low)
    return _finish(schedule, jnp.linspace(high, low, num_steps), "t")
