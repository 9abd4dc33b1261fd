"""DPM-Solver++(2M) (Lu et al. 2022): multistep second order, data prediction, log-SNR time.

The solver integrates the probability-flow ODE in ``lambda = log(alpha / sigma)``, where
the data-prediction form is exactly linear apart from the ``x0_hat`` integral (Lu et al.
2022, "DPM-Solver++", Sec. 4). Each step costs one (guided) denoiser call; the previous
step's ``x0_hat`` and ``h`` are the sampler state (:class:`DPMState`), so guidance terms
acting on ``x0_hat`` act on the history too.

Ends of the grid, as diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
"dpmsolver++", solver_order=2, solver_type="midpoint", final_sigmas_type="zero")`` does:

* the first step has no history and is first order (DDIM);
* the last step, to ``sigma = 0`` (``lambda = inf``), is first order and returns the guided
  ``x0_hat`` exactly. diffusers makes it first order because ``final_sigmas_type="zero"``
  (whatever ``N``); its other rule, ``lower_order_final`` for ``N < 15``, only changes
  order 3 (the step before last drops to second order) or a grid that ends at
  ``sigma_min`` instead of 0. For order 2 on a grid ending at 0 the rule is therefore the
  same for every ``N``: second order on every step except the first and the last.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiv.samplers.base import Sampler, check_times
from jaxdiv.samplers.grid import default_grid

__all__ = ["dpmpp_2m", "DPMState", "DPMOptions", "dpmpp_2m_update", "log_snr"]


class DPMState(NamedTuple):
    """State of DPM-Solver++(2M) between steps.

    Attributes:
        x0_hat: the previous step's guided ``x0_hat`` (zeros before the first step; after
            the run, the last step's, which is the output).
        h: the previous step's log-SNR increment ``lambda_i - lambda_{i-1}`` (0 before the
            first step; ``inf`` after a step from ``alpha = 0`` or to ``sigma = 0``).
    """

    x0_hat: jax.Array
    h: jax.Array


class DPMOptions(NamedTuple):
    """Options of :func:`dpmpp_2m`: the solver order (2) and diffusers' solver type."""

    order: int = 2
    solver_type: str = "midpoint"


def log_snr(alpha, sigma):
    """``lambda = log(alpha / sigma)`` (Lu et al. 2022, Sec. 2), ``-inf`` at ``alpha = 0``
    and ``inf`` at ``sigma = 0``.

    >>> [float(v) for v in log_snr(jnp.array([0.0, 1.0, 1.0]), jnp.array([1.0, 1.0, 0.0]))]
    [-inf, 0.0, inf]
    """
    alpha, sigma = jnp.asarray(alpha), jnp.asarray(sigma)
    # the infinite ends without log(0): gradients (e.g. in a flow's shift) stay finite
    a_pos, s_pos = alpha > 0, sigma > 0
    lam = jnp.log(jnp.where(a_pos, alpha, 1.0)) - jnp.log(jnp.where(s_pos, sigma, 1.0))
    return jnp.where(a_pos, jnp.where(s_pos, lam, jnp.inf), -jnp.inf)


def dpmpp_2m_update(x, d, alpha_next, sigma, sigma_next, h):
    """``x_next = (sigma_n / sigma) x - alpha_n (exp(-h) - 1) D`` (DPM-Solver++, Alg. 2).

    ``D`` is ``x0_hat`` for the first-order step and the multistep combination
    ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}`` for 2M. At ``sigma_next = 0`` (``h = inf``) it
    returns ``alpha_n D`` exactly; from ``alpha = 0`` (``h = inf``) it is
    ``(sigma_n / sigma) x + alpha_n D``.

    >>> float(dpmpp_2m_update(3.0, 1.0, 1.0, 0.5, 0.0, jnp.inf))   # to sigma = 0: D
    1.0
    """
    return (sigma_next / sigma) * x - alpha_next * (jnp.exp(-h) - 1.0) * d


def _dpmpp_2m_init(sampler, x):
    return DPMState(jnp.zeros_like(x), jnp.zeros((), x.dtype))


def _dpmpp_2m_step(sampler, i, x, state, denoise, carry, keys):
    """One DPM-Solver++(2M) step (Lu et al. 2022, Alg. 2), first order at both ends."""
    del keys
    sched = sampler.schedule
    n = sampler.num_steps
    t, t_next = sampler.times[i], sampler.times[i + 1]
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    alpha_n, sigma_n = sched.alpha(t_next), sched.sigma(t_next)
    h = log_snr(alpha_n, sigma_n) - log_snr(alpha, sigma)
    x0_hat, carry, info = denoise(x, t, carry)

    # 2M needs history (not the first step) and a finite step (not the last, to lambda =
    # inf); after a step from alpha = 0 (lambda = -inf) h_prev = inf, so 1/(2r) =
    # h / (2 h_prev) = 0: the limit is a first-order step.
    second = (i > 0) & (i < n - 1) & jnp.isfinite(h) & (state.h > 0)
    h_safe = jnp.where(second, h, 1.0)
    h_prev_safe = jnp.where(second, state.h, 1.0)
    c = jnp.where(second, h_safe / (2.0 * h_prev_safe), 0.0).astype(x.dtype)  # 1/(2r)
    d = x0_hat + c * (x0_hat - state.x0_hat)
    x_next = dpmpp_2m_update(x, d, alpha_n, sigma, sigma_n, h)
    # the last step returns the guided x0_hat exactly (alpha_n = 1, sigma_n = 0)
    x_next = jnp.where(i == n - 1, alpha_n * x0_hat, x_next).astype(x.dtype)
    return x_next, DPMState(x0_hat, h.astype(state.h.dtype)), carry, (x0_hat, info)


def dpmpp_2m(schedule, num_steps: int | None = None, *, times=None, **grid_kwargs) -> Sampler:
    """DPM-Solver++(2M): ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i``.

    Lu et al. (2022), "DPM-Solver++", Alg. 2 (multistep second order, data prediction):
    ``h_i = lambda_{i+1} - lambda_i``, ``lambda = log(alpha / sigma)``, ``r_i = h_{i-1} /
    h_i``, ``D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}``. The first step (no history)
    and the last step (to ``sigma = 0``) are first order (``D = x0_i``), so the output is
    the last guided ``x0_hat`` exactly. Equals diffusers' ``DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2)`` with ``final_sigmas_type="zero"`` on the
    same grid and model (with ``lower_order_final``'s ``N < 15`` rule, which does not change
    order 2 on a grid ending at 0). Works on every process; on a flow grid starting at
    ``t = 1`` (``alpha = 0``, ``lambda = -inf``) the first step is its finite limit
    ``x_1 = sigma_1 x_0 + alpha_1 x0_0`` and the second is first order too
    (``1/(2r) = h_1 / h_0 / 2 = 0``). NFE = ``N``.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules` (VP, EDM or flow).
        num_steps: number of denoiser evaluations ``N`` (default 20, or len(times) - 1).
        times: optional explicit ``(N + 1,)`` decreasing grid ending at the clean endpoint
            (e.g. Karras sigmas on any process, or diffusers' timesteps).
        **grid_kwargs: passed to ``schedule.grid`` (VP: ``spacing``, ``steps_offset``).

    Returns:
        A :class:`~jaxdiv.samplers.Sampler` whose state is a :class:`DPMState`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = dpmpp_2m(schedules.edm(), num_steps=10)
    >>> den = lambda x, t, c: 0.5 * x / (1.0 + t**2)   # any denoiser
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0))
    >>> s.nfe, bool(jnp.all(out.x0 == out.sampler_state.x0_hat))
    (10, True)
    """
    grid = check_times(default_grid(schedule, num_steps, times, grid_kwargs, 20), schedule)
    n = grid.shape[0] - 1
    return Sampler("dpmpp_2m", schedule, grid, _dpmpp_2m_init, _dpmpp_2m_step, DPMOptions(), n)
