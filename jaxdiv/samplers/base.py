"""What every sampler shares: the Sampler record, the first-order update, per-sample noise."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.dtypes import working_dtype

__all__ = [
    "Sampler",
    "FirstOrderOptions",
    "first_order_update",
    "first_order_step",
    "noise_std",
    "no_state",
    "per_sample_normal",
    "check_times",
]


class Sampler(NamedTuple):
    """A sampler: a time grid plus pure ``init``/``step`` functions run by ``lax.scan``.

    Built by the factories of :mod:`jaxdiv.samplers`; Heun's last step to ``sigma = 0``
    takes one evaluation, the others two:

    >>> from jaxdiv import samplers, schedules
    >>> s = samplers.edm(schedules.edm(), 10)
    >>> s.name, s.num_steps, s.times.shape, s.nfe
    ('edm', 10, (11,), 19)

    Attributes:
        name: the factory's name (for reports; nothing switches on it).
        schedule: the process (a pytree, so schedule parameters can be differentiated).
        times: ``(N + 1,)`` decreasing process times; ``times[N]`` is the clean endpoint
            (a noisy one only where the factory was told ``allow_noisy_end=True``).
        init: ``init(sampler, x) -> state``, the sampler's own state before step 0 (``()``
            for one-step methods; a multistep method keeps its previous ``x0_hat`` there).
        step: ``step(sampler, i, x, state, denoise, carry, keys) -> (x_next, state, carry,
            (x0_hat, info))`` where ``denoise(x, t, carry) -> (x0_hat, carry, info)`` is
            the guided denoiser and ``keys`` are the per-sample PRNG keys; the returned
            ``x0_hat``/``info`` are those of the step's first evaluation (kept in the trace).
        options: the sampler's hyperparameters (a NamedTuple).
        nfe: denoiser evaluations per sample over the whole grid (without CFG's doubling),
            computed by the factory.
    """

    name: str
    schedule: Any
    times: jax.Array
    init: Callable
    step: Callable
    options: Any
    nfe: int

    @property
    def num_steps(self) -> int:
        return self.times.shape[0] - 1


def no_state(sampler, x):
    """``init`` of a sampler without state: the empty pytree ``()``.

    >>> import jax.numpy as jnp
    >>> from jaxdiv import samplers, schedules
    >>> s = samplers.ddim(schedules.vp_linear(), 10)
    >>> s.init is no_state, s.init(s, jnp.zeros((2, 3)))
    (True, ())
    """
    return ()


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


class FirstOrderOptions(NamedTuple):
    """Options of the first-order samplers (DDIM, flow Euler): the noise weight ``eta``."""

    eta: float


def noise_std(eta, alpha, sigma, alpha_next, sigma_next):
    """``sigma_t = eta sqrt((1-a_prev)/(1-a_t)) sqrt(1 - a_t/a_prev)`` (Song et al. 2021, Eq. 16).

    Written for any process as ``eta * sigma_n * sqrt(1 - SNR(t)/SNR(t_n))``
    (``SNR = alpha^2/sigma^2``), which equals the VP formula with ``a = alpha^2`` and is 0
    at the clean endpoint.

    >>> round(float(noise_std(1.0, 0.6, 0.8, 0.8, 0.6)), 4)   # VP: a_t=.36, a_prev=.64
    0.4961
    """
    ratio = (alpha * sigma_next) ** 2 / ((alpha_next * sigma) ** 2)
    return eta * sigma_next * jnp.sqrt(jnp.clip(1.0 - ratio, 0.0, None))


def first_order_step(sampler, i, x, state, denoise, carry, keys):
    """One step of the shared first-order update: DDIM (``options.eta``), and with
    ``eta = 0`` the Euler step of the probability-flow ODE on every process (flow Euler).

    ``x_{i+1} = alpha_{i+1} x0_hat + sigma_{i+1} eps_hat`` (Song et al. 2021, Eq. 12 with
    ``sigma_t = 0``); returns ``(x_next, state, carry, (x0_hat, info))``, the sampler step
    protocol. A custom sampler can reuse it as its ``step``:

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiv import samplers, schedules
    >>> s = samplers.flow_euler(schedules.flow(), times=jnp.array([1.0, 0.5, 0.0]))
    >>> den = lambda x, t, carry: (jnp.zeros_like(x), carry, None)   # x0_hat = 0
    >>> x1, _, _, (x0_hat, _) = first_order_step(s, 0, jnp.ones((1, 2)), (), den, None,
    ...                                          jax.random.split(jax.random.key(0), 1))
    >>> x1.tolist()                                     # sigma_1 / sigma_0 = 0.5 of x
    [[0.5, 0.5]]
    """
    return first_order_to(sampler, i, sampler.times[i + 1], x, state, denoise, carry, keys)


def first_order_to(sampler, i, t_next, x, state, denoise, carry, keys):
    """:func:`first_order_step` from ``times[i]`` to any ``t_next`` (DDIM's diffusers
    endpoint steps to ``t - T // N`` rather than to the next evaluation time)."""
    sched = sampler.schedule
    t = sampler.times[i]
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    alpha_n, sigma_n = sched.alpha(t_next), sched.sigma(t_next)
    x0_hat, carry, info = denoise(x, t, carry)
    eta = sampler.options.eta
    if eta == 0:
        x_next = first_order_update(x, x0_hat, alpha, sigma, alpha_n, sigma_n)
    else:
        s = noise_std(eta, alpha, sigma, alpha_n, sigma_n)
        z = per_sample_normal(keys, i, x)
        x_next = first_order_update(x, x0_hat, alpha, sigma, alpha_n, sigma_n, s, z)
    return x_next, state, carry, (x0_hat, info)


def per_sample_normal(keys, i, like):
    """Standard normal of ``like``'s shape, sample ``b`` drawn from ``fold_in(keys[b], i)``.

    Per-sample streams keep a sample's noise independent of the batch size.

    >>> import jax, jax.numpy as jnp
    >>> keys = jax.random.split(jax.random.key(0), 3)
    >>> z3 = per_sample_normal(keys, 5, jnp.zeros((3, 2)))
    >>> z1 = per_sample_normal(keys[:1], 5, jnp.zeros((1, 2)))
    >>> bool(jnp.all(z3[:1] == z1))                    # sample 0 ignores the batch size
    True
    """
    draw = lambda k: jax.random.normal(jax.random.fold_in(k, i), like.shape[1:], like.dtype)
    return jax.vmap(draw)(keys)


def check_times(times, schedule, name: str = "times", clean_end: bool = True):
    """Validate a user time grid: 1-D, length >= 2, strictly decreasing, ends clean.

    With ``clean_end=False`` the grid may end at a noisy time (``sigma > 0``, e.g.
    diffusers' ``final_sigmas_type="sigma_min"``); the output then keeps that noise.

    >>> from jaxdiv import schedules
    >>> check_times([10.0, 1.0, 0.0], schedules.edm()).tolist()
    [10.0, 1.0, 0.0]
    >>> check_times([1.0, 10.0, 0.0], schedules.edm())
    Traceback (most recent call last):
    ...
    ValueError: times must be strictly decreasing, got [1.0, 10.0, 0.0]
    """
    if isinstance(times, jax.core.Tracer):
        return jnp.asarray(times, working_dtype(times))
    kind = np.asarray(times).dtype.kind
    if kind not in "fiu":  # strings would parse, complex numbers lose their imaginary part
        raise TypeError(f"{name} must be real numbers, got dtype {np.asarray(times).dtype}")
    arr = np.asarray(times, np.float64)
    if arr.ndim != 1 or arr.shape[0] < 2:
        raise ValueError(f"{name} must be 1-D with at least 2 entries, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    if not np.all(np.diff(arr) < 0):
        raise ValueError(f"{name} must be strictly decreasing, got {arr.tolist()}")
    if hasattr(schedule, "check_times"):  # VP: timesteps outside the schedule are refused
        schedule.check_times(arr, name)
    end_sigma = float(schedule.sigma(arr[-1]))
    if clean_end and end_sigma != 0.0:
        raise ValueError(
            f"{name} must end at the clean endpoint t={schedule.t_clean} (sigma=0), "
            f"got t={arr[-1]} with sigma={end_sigma}"
        )
    return jnp.asarray(times, working_dtype(times))
