"""DDIM (Song et al. 2021) on any process; ``eta=1`` is DDPM-like ancestral sampling."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.samplers.base import (
    FirstOrderOptions,
    Sampler,
    check_times,
    first_order_step,
    first_order_to,
    no_state,
    noise_std,
)
from jaxdiv.samplers.grid import default_grid

__all__ = ["ddim", "ddim_noise_std", "DDIMTargetOptions"]

#: Song et al.'s ``sigma_t`` (Eq. 16); the same function the step uses.
ddim_noise_std = noise_std


class DDIMTargetOptions(NamedTuple):
    """Options of a DDIM sampler whose steps go to ``targets[i]`` rather than ``times[i+1]``.

    Attributes:
        eta: the noise weight.
        targets: ``(N,)`` process time each step goes to (a traced array).
    """

    eta: float
    targets: Any


def _ddim_target_step(sampler, i, x, state, denoise, carry, keys):
    """The shared first-order update from ``times[i]`` to ``targets[i]``."""
    t_next = jnp.asarray(sampler.options.targets, sampler.times.dtype)[i]
    return first_order_to(sampler, i, t_next, x, state, denoise, carry, keys)


def _check_targets(times, targets, schedule):
    """Evaluation times strictly decreasing; each target at or below its evaluation time,
    the last one equal to ``times[-1]``; all within the schedule (unchecked when traced)."""
    if isinstance(times, jax.core.Tracer) or isinstance(targets, jax.core.Tracer):
        return jnp.asarray(times), jnp.asarray(targets)
    t = np.asarray(times, np.float64)
    g = np.asarray(targets, np.float64)
    if t.ndim != 1 or t.shape[0] < 2 or g.shape != (t.shape[0] - 1,):
        raise ValueError(
            f"targets must have shape (N,) = ({t.shape[0] - 1},) for times of shape "
            f"{t.shape}, got {g.shape}"
        )
    if not (np.all(np.isfinite(t)) and np.all(np.isfinite(g))):
        raise ValueError("times and targets must be finite")
    if not np.all(np.diff(t[:-1]) < 0):
        raise ValueError(f"times[:-1] must be strictly decreasing, got {t.tolist()}")
    if not np.all(g <= t[:-1]) or g[-1] != t[-1]:
        raise ValueError(
            "each targets[i] must be <= times[i] and targets[-1] == times[-1], got "
            f"times={t.tolist()}, targets={g.tolist()}"
        )
    if hasattr(schedule, "check_times"):  # VP: timesteps outside the schedule are refused
        schedule.check_times(t, "times")
        schedule.check_times(g, "targets")
    lo = getattr(schedule, "t_clean", None)
    if lo is not None and np.any(g < lo):
        raise ValueError(f"targets must be >= the clean endpoint {lo}, got {g.tolist()}")
    dtype = working_dtype(times)
    return jnp.asarray(times, dtype), jnp.asarray(targets, dtype)


def ddim(
    schedule,
    num_steps: int | None = None,
    eta: float = 0.0,
    *,
    times=None,
    targets=None,
    allow_noisy_end: bool = False,
    **grid_kwargs,
) -> Sampler:
    """DDIM: ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat + sigma_t z``.

    Song et al. (2021), Eq. 12 with the ``sigma_t z`` term (the old diffusers Flax DDIM
    dropped it, so its ``eta > 0`` was wrong). Works on every process: on rectified flow
    with ``eta = 0`` it is exactly the flow Euler sampler. In the rescaled variable
    ``x / alpha`` (noise level ``sigma / alpha``) it is k-diffusion's
    ``sample_euler_ancestral`` with the same ``eta`` (``eta = 0``: ``sample_euler``;
    ``tests/test_samplers.py``). NFE = ``N``.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules`.
        num_steps: number of denoiser evaluations ``N`` (default 50, or len(times) - 1).
        eta: 0 deterministic DDIM, 1 DDPM-like ancestral sampling (in [0, 1]).
        times: optional explicit ``(N + 1,)`` grid ending at the clean endpoint.
        targets: optional ``(N,)`` times each step goes to, when they are not the next
            evaluation time ``times[i + 1]`` (diffusers' ``DDIMScheduler`` steps to
            ``t - T // N``; see :func:`jaxdiv.pipelines.scheduler_config.ddim_grid`).
            Needs ``times``, whose last entry must equal ``targets[-1]``; the end may be
            noisy (``allow_noisy_end`` is implied).
        allow_noisy_end: accept a grid ending at ``sigma > 0``; the output then keeps
            ``sigma(times[-1]) eps`` of noise and is not the last ``x0_hat``.
        **grid_kwargs: passed to ``schedule.grid`` (VP: ``spacing``, ``steps_offset``).

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = ddim(schedules.vp_linear(), num_steps=10, eta=1.0)
    >>> den = lambda x, t, c: jnp.zeros_like(x)          # data = a point mass at 0
    >>> jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0)).x0.tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    >>> s.nfe
    10
    """
    eta = validation.number("eta", eta, lo=0)
    if eta > 1:  # sigma_t would pass sigma_prev: sqrt(1 - a_prev - sigma_t^2) turns imaginary
        raise ValueError(f"eta must be <= 1 (Song et al. 2021, Eq. 16: above 1 the step's "
                         f"noise exceeds the next noise level), got {eta:g}")  # fmt: skip
    allow_noisy_end = validation.boolean("allow_noisy_end", allow_noisy_end)
    if targets is not None:
        if times is None or grid_kwargs:
            raise ValueError("targets= needs times= (and no grid options)")
        grid, tg = _check_targets(times, targets, schedule)
        if num_steps is not None and num_steps != grid.shape[0] - 1:
            raise ValueError(f"num_steps={num_steps} but times has {grid.shape[0]} entries")
        opts = DDIMTargetOptions(eta, tg)
        return Sampler("ddim", schedule, grid, no_state, _ddim_target_step, opts, tg.shape[0])
    grid = default_grid(schedule, num_steps, times, grid_kwargs, 50)
    grid = check_times(grid, schedule, clean_end=not allow_noisy_end)
    opts = FirstOrderOptions(eta)
    return Sampler("ddim", schedule, grid, no_state, first_order_step, opts, grid.shape[0] - 1)
