"""Karras et al. (2022) Algorithm 2: stochastic churn + Heun's second-order correction."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.samplers.base import (
    Sampler,
    check_times,
    first_order_update,
    no_state,
    per_sample_normal,
)
from jaxdiv.samplers.grid import default_grid

__all__ = ["edm", "EDMOptions"]


class EDMOptions(NamedTuple):
    s_churn: float
    s_tmin: float
    s_tmax: float
    s_noise: float
    heun: bool


def _edm_step(sampler, i, x, state, denoise, carry, keys):
    """Alg. 2, lines 4-8, run in the rescaled variable ``x / alpha`` with noise level
    ``sigma / alpha`` so it applies to VP and flow processes too (Karras Alg. 1 with
    ``s(t) = alpha``); on the EDM process this is Alg. 2 verbatim."""
    sched, opt = sampler.schedule, sampler.options
    n = sampler.num_steps
    t, t_next = sampler.times[i], sampler.times[i + 1]
    lam, lam_next = sched.noise_level(t), sched.noise_level(t_next)
    alpha_next = sched.alpha(t_next)
    y = x / sched.alpha(t)

    # line 4-6: churn raises the noise level to lam_hat = (1 + gamma) lam
    gamma = jnp.where(
        (lam >= opt.s_tmin) & (lam <= opt.s_tmax),
        jnp.minimum(opt.s_churn / n, math.sqrt(2.0) - 1.0),
        0.0,
    )
    if opt.s_churn == 0:
        lam_hat, t_hat, y_hat = lam, t, y
    else:
        t_hat = jnp.where(gamma > 0, sched.t_of_noise_level(lam * (1.0 + gamma)), t)
        # the level of the time the model will see: a VP process clamps t_hat at its last
        # training time, so a level above its maximum is capped there (gamma shrinks)
        # instead of adding more noise than the model is told about
        lam_hat = jnp.where(gamma > 0, sched.noise_level(t_hat), lam)
        gamma = jnp.maximum(lam_hat / lam - 1.0, 0.0)
        z = per_sample_normal(keys, i, x)
        # sqrt(lam_hat^2 - lam^2) written so that gamma = 0 gives exactly 0: the
        # difference of squares leaves an FMA rounding residual whose sqrt is ~1e-2 * lam
        y_hat = y + lam * jnp.sqrt(gamma * (2.0 + gamma)) * opt.s_noise * z
    alpha_hat = sched.alpha(t_hat)

    # line 7: Euler step (the shared first-order update, in the rescaled variable)
    x0_hat, carry, info = denoise(alpha_hat * y_hat, t_hat, carry)
    y_next = first_order_update(y_hat, x0_hat, 1.0, lam_hat, 1.0, lam_next)

    if not opt.heun:
        return alpha_next * y_next, state, carry, (x0_hat, info)

    # line 8-11: Heun correction unless the next level is 0 (the final step stays Euler,
    # so the output equals the last x0_hat and NFE = 2N - 1)
    # the first slope outside the branch: the branch then takes it in the state's layout
    # (XLA:CPU otherwise copies x0_hat into that layout inside the branch)
    d = (y_hat - x0_hat) / lam_hat

    def heun(carry):
        x0_next, carry, _ = denoise(alpha_next * y_next, t_next, carry)
        d_next = (y_next - x0_next) / lam_next
        return y_hat + (lam_next - lam_hat) * 0.5 * (d + d_next), carry

    def euler(carry):
        return y_next, carry

    y_out, carry = jax.lax.cond(i < n - 1, heun, euler, carry)
    return alpha_next * y_out, state, carry, (x0_hat, info)


def edm(
    schedule,
    num_steps: int | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    *,
    heun: bool = True,
    times=None,
) -> Sampler:
    """EDM sampler (Karras et al. 2022, Algorithm 2): churn + Heun, NFE ``2N - 1`` (``N``
    with ``heun=False``).

    Args:
        schedule: any process; the EDM schedule gives Alg. 2 verbatim, VP and flow
            processes run it on ``x / alpha`` with noise level ``sigma / alpha``.
        num_steps: ``N`` (default 18); the grid is ``schedule.grid(N)`` (Eq. 5 on EDM) ending at 0.
        s_churn, s_tmin, s_tmax, s_noise: Alg. 2's stochasticity; ``gamma =
            min(S_churn/N, sqrt(2) - 1)`` where ``S_tmin <= sigma <= S_tmax``. All finite
            and >= 0, except ``s_tmax = inf`` (no upper end); ``s_tmin`` and ``s_tmax`` are
            noise levels ``sigma / alpha``, and a churn whose ``[s_tmin, s_tmax]`` holds no
            level of the grid is refused. On a VP process a churned level above the
            schedule's largest is capped there (the model is always told the noise level
            it is given).
        heun: False gives the first-order (Euler) EDM sampler.
        times: optional explicit grid ending at the clean endpoint.

    >>> from jaxdiv import schedules
    >>> s = edm(schedules.edm(), num_steps=18)
    >>> s.nfe, edm(schedules.edm(), num_steps=18, heun=False).nfe
    (35, 18)
    """
    s_churn = validation.number("s_churn", s_churn, lo=0)
    s_tmin = validation.number("s_tmin", s_tmin, lo=0)
    s_tmax = validation.number("s_tmax", s_tmax, lo=0, allow_inf=True)
    s_noise = validation.number("s_noise", s_noise, lo=0)
    heun = validation.boolean("heun", heun)
    if s_tmax < s_tmin:
        raise ValueError(f"s_tmax must be >= s_tmin, got s_tmin={s_tmin}, s_tmax={s_tmax}")
    grid = check_times(default_grid(schedule, num_steps, times, {}, 18), schedule)
    if not isinstance(grid, jax.core.Tracer) and float(schedule.alpha(grid[0])) == 0.0:
        # Alg. 2 runs on x / alpha; at alpha = 0 (flow at t = 1) the noise level is infinite
        raise ValueError(
            f"edm needs a finite noise level at the first time, but alpha(t={float(grid[0])}) "
            "= 0; pass times= starting below t=1 (e.g. schedule.grid(N) with its first entry "
            "replaced by 0.999) or use samplers.flow_euler"
        )
    if s_churn > 0 and not isinstance(grid, jax.core.Tracer):
        levels = np.asarray(schedule.noise_level(grid[:-1]), np.float64)
        if validation.is_concrete(levels) and not np.any((levels >= s_tmin) & (levels <= s_tmax)):
            raise ValueError(
                f"s_churn={s_churn:g} would never act: no noise level of the grid (sigma / "
                f"alpha from {levels[0]:.4g} down to {levels[-1]:.4g}) lies in [s_tmin, "
                f"s_tmax] = [{s_tmin:g}, {s_tmax:g}] (both are noise levels, not times)"
            )  # fmt: skip
    opts = EDMOptions(s_churn, s_tmin, s_tmax, s_noise, heun)
    n = grid.shape[0] - 1
    return Sampler("edm", schedule, grid, no_state, _edm_step, opts, 2 * n - 1 if heun else n)
