"""DDIM (Song et al. 2021) on any process; ``eta=1`` is DDPM-like ancestral sampling."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from jaxdiv.samplers.base import Sampler, check_times, first_order_update, per_sample_normal
from jaxdiv.samplers.grid import default_grid

__all__ = ["ddim", "DDIMOptions", "ddim_noise_std"]


class DDIMOptions(NamedTuple):
    eta: float


def ddim_noise_std(eta, alpha, sigma, alpha_next, sigma_next):
    """``sigma_t = eta sqrt((1-a_prev)/(1-a_t)) sqrt(1 - a_t/a_prev)`` (Song et al. 2021, Eq. 16).

    Written for any process as ``eta * sigma_n * sqrt(1 - SNR(t)/SNR(t_n))``
    (``SNR = alpha^2/sigma^2``), which equals the VP formula with ``a = alpha^2`` and is 0
    at the clean endpoint.

    >>> round(float(ddim_noise_std(1.0, 0.6, 0.8, 0.8, 0.6)), 4)   # VP: a_t=.36, a_prev=.64
    0.4961
    """
    ratio = (alpha * sigma_next) ** 2 / ((alpha_next * sigma) ** 2)
    return eta * sigma_next * jnp.sqrt(jnp.clip(1.0 - ratio, 0.0, None))


def _ddim_step(sampler, i, x, denoise, carry, keys):
    sched = sampler.schedule
    t, t_next = sampler.times[i], sampler.times[i + 1]
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    alpha_n, sigma_n = sched.alpha(t_next), sched.sigma(t_next)
    x0_hat, carry, info = denoise(x, t, carry)
    eta = sampler.options.eta
    if isinstance(eta, (int, float)) and eta == 0:
        x_next = first_order_update(x, x0_hat, alpha, sigma, alpha_n, sigma_n)
    else:
        s = ddim_noise_std(eta, alpha, sigma, alpha_n, sigma_n)
        z = per_sample_normal(keys, i, x)
        x_next = first_order_update(x, x0_hat, alpha, sigma, alpha_n, sigma_n, s, z)
    return x_next, carry, (x0_hat, info)


def ddim(
    schedule, num_steps: int | None = None, eta: float = 0.0, *, times=None, **grid_kwargs
) -> Sampler:
    """DDIM: ``x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma_t^2) eps_hat + sigma_t z``.

    Song et al. (2021), Eq. 12 with the ``sigma_t z`` term (the old diffusers Flax DDIM
    dropped it, so its ``eta > 0`` was wrong). Works on every process: on rectified flow
    with ``eta = 0`` it is exactly the flow Euler sampler.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules`.
        num_steps: number of denoiser evaluations ``N`` (default 50, or len(times) - 1).
        eta: 0 deterministic DDIM, 1 DDPM-like ancestral sampling.
        times: optional explicit ``(N + 1,)`` grid ending at the clean endpoint.
        **grid_kwargs: passed to ``schedule.grid`` (VP: ``spacing``, ``steps_offset``).

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = ddim(schedules.vp_linear(), num_steps=10, eta=1.0)
    >>> den = lambda x, t, c: jnp.zeros_like(x)          # data = a point mass at 0
    >>> jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0)).x0.tolist()
    [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    """
    if isinstance(eta, (int, float)) and not eta >= 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    grid = default_grid(schedule, num_steps, times, grid_kwargs, 50)
    return Sampler("ddim", schedule, check_times(grid, schedule), _ddim_step, DDIMOptions(eta))
