"""DDIM (Song et al. 2021) on any process; ``eta=1`` is DDPM-like ancestral sampling."""

from __future__ import annotations

from jaxdiv import validation
from jaxdiv.samplers.base import (
    FirstOrderOptions,
    Sampler,
    check_times,
    first_order_step,
    no_state,
    noise_std,
)
from jaxdiv.samplers.grid import default_grid

__all__ = ["ddim", "ddim_noise_std"]

#: Song et al.'s ``sigma_t`` (Eq. 16); the same function the step uses.
ddim_noise_std = noise_std


def ddim(
    schedule, num_steps: int | None = None, eta: float = 0.0, *, times=None, **grid_kwargs
) -> Sampler:
    """DDIM: ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat + sigma_t z``.

    Song et al. (2021), Eq. 12 with the ``sigma_t z`` term (the old diffusers Flax DDIM
    dropped it, so its ``eta > 0`` was wrong). Works on every process: on rectified flow
    with ``eta = 0`` it is exactly the flow Euler sampler. NFE = ``N``.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules`.
        num_steps: number of denoiser evaluations ``N`` (default 50, or len(times) - 1).
        eta: 0 deterministic DDIM, 1 DDPM-like ancestral sampling (finite, >= 0).
        times: optional explicit ``(N + 1,)`` grid ending at the clean endpoint.
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
    grid = check_times(default_grid(schedule, num_steps, times, grid_kwargs, 50), schedule)
    opts = FirstOrderOptions(eta)
    return Sampler("ddim", schedule, grid, no_state, first_order_step, opts, grid.shape[0] - 1)
