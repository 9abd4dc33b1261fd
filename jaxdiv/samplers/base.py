"""What every sampler shares: the Sampler record, the first-order update, per-sample noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Sampler", "first_order_update", "per_sample_normal", "check_times"]


class Sampler(NamedTuple):
    """A sampler: a time grid plus a pure ``step`` function run by ``lax.scan``.

    Attributes:
        name: "ddim", "edm" or "flow_euler".
        schedule: the process (a pytree, so schedule parameters can be differentiated).
        times: ``(N + 1,)`` decreasing process times; ``times[N]`` is the clean endpoint.
        step: ``step(sampler, i, x, denoise, carry, keys) -> (x_next, carry, (x0_hat, info))``
            where ``denoise(x, t, carry) -> (x0_hat, carry, info)`` is the guided denoiser
            and ``keys`` are the per-sample PRNG keys; the returned ``x0_hat``/``info`` are
            those of the step's first evaluation (kept in the trace).
        options: the sampler's hyperparameters (a NamedTuple).
    """

    name: str
    schedule: Any
    times: jax.Array
    step: Callable
    options: Any

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1

    @property
    def nfe(self) -> int:
        """Denoiser evaluations per sample (without CFG's doubling)."""
        if self.name == "edm":
            return 2 * self.num_steps - 1
        return self.num_steps


def first_order_update(x, x0_hat, alpha, sigma, alpha_next, sigma_next, noise_std=0.0, z=None):
    """``x_next = alpha_n x0_hat + sqrt(sigma_n^2 - s^2) eps_hat + s z`` (shared first-order step).

    Here ``eps_hat = (x - alpha x0_hat) / sigma``.

    The DDIM update (Song et al. 2021, Eq. 12). With ``s = 0`` it is *also* the Euler step
    of the probability-flow ODE on every process: on rectified flow
    ``x + (t_n - t) v`` (``v = (x - x0_hat)/t``), on EDM ``x + (sigma_n - sigma) d``
    (Karras Alg. 2 line 7, ``d = (x - D)/sigma``). DDIM, flow Euler and EDM's Euler step
    all call this one function. With ``sigma_next = 0`` and ``alpha_next = 1`` it returns
    ``x0_hat`` exactly.

    >>> float(first_order_update(1.0, 0.0, 1.0, 1.0, 1.0, 0.5))   # Euler: 1 + (0.5 - 1) * 1
    0.5
    """
    eps_hat = (x - alpha * x0_hat) / sigma
    direction = jnp.sqrt(jnp.clip(sigma_next**2 - noise_std**2, 0.0, None))
    out = alpha_next * x0_hat + direction * eps_hat
    if z is not None:
        out = out + noise_std * z
    return out


def per_sample_normal(keys, i, like):
    """Standard normal of ``like``'s shape, sample ``b`` drawn from ``fold_in(keys[b], i)``.

    Per-sample streams keep a sample's noise independent of the batch size.
    """
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, i), like.shape[1:], like.dtype)
    return jax.vmap(draw)(keys)


def check_times(times, schedule, name: str = "times"):
    """Validate a user time grid: 1-D, length >= 2, strictly decreasing, ends clean."""
    if isinstance(times, jax.core.Tracer):
        return jnp.asarray(times, jnp.float32)
    arr = np.asarray(times, np.float64)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if not np.all(np.diff(arr) < 0):
        raise ValueError(f"{name} must be strictly decreasing, got {arr.tolist()}")
    end_sigma = float(schedule.sigma(arr[-1]))
    if end_sigma != 0.0:
        raise ValueError(
            f"{name} must end at the clean endpoint t={schedule.t_clean} (sigma=0), "
            f"got t={arr[-1]} with sigma={end_sigma}"
        )
    return jnp.asarray(times, jnp.float32)
