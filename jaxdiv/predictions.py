"""Converters between a network's prediction and the clean-sample estimate ``x0_hat``.

jaxdiv samplers and guidance work in x0-space (the "denoiser view" of Karras et al.
2022): a denoiser maps ``(x_t, t, cond)`` to ``x0_hat``. Networks predict ``eps``
(DDPM, SD 1.x), ``v`` (SD 2.x 768-v) or a flow velocity (SD3); these converters and
:func:`as_denoiser` bridge the two, for any process ``x_t = alpha x0 + sigma eps``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from jaxdiv import validation

__all__ = [
    "eps_to_x0",
    "x0_to_eps",
    "v_to_x0",
    "x0_to_v",
    "velocity_to_x0",
    "x0_to_velocity",
    "to_prediction",
    "from_prediction",
    "check_prediction_type",
    "as_denoiser",
    "PREDICTION_TYPES",
]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def eps_to_x0(eps, x, alpha, sigma):
    """``x0_hat = (x - sigma eps) / alpha`` (Ho et al. 2020, Eq. 15).

    >>> float(eps_to_x0(1.0, 2.0, 0.5, 0.5))
    3.0
    """
    return (x - sigma * eps) / alpha


def x0_to_eps(x0, x, alpha, sigma):
    """``eps_hat = (x - alpha x0) / sigma``; inverse of :func:`eps_to_x0`.

    >>> float(x0_to_eps(3.0, 2.0, 0.5, 0.5))
    1.0
    """
    return (x - alpha * x0) / sigma


def v_to_x0(v, x, alpha, sigma):
    """``x0_hat = (alpha x - sigma v) / (alpha^2 + sigma^2)``, with ``v = alpha eps - sigma x0``
    (Salimans & Ho 2022, Sec. 4; the denominator is 1 on VP processes).

    >>> float(v_to_x0(x0_to_v(3.0, 2.0, 0.6, 0.8), 2.0, 0.6, 0.8))
    3.0
    """
    return (alpha * x - sigma * v) / (alpha**2 + sigma**2)


def x0_to_v(x0, x, alpha, sigma):
    """``v = alpha eps - sigma x0`` with ``eps = (x - alpha x0) / sigma``.

    >>> round(float(x0_to_v(0.0, 1.0, 0.6, 0.8)), 4)
    0.75
    """
    eps = x0_to_eps(x0, x, alpha, sigma)
    return alpha * eps - sigma * x0


def velocity_to_x0(u, x, alpha, sigma):
    """Rectified-flow velocity ``u = eps - x0`` to ``x0_hat = x - sigma u``.

    Valid on processes with ``alpha + sigma = 1`` (rectified flow, ``sigma = t``; SD3:
    ``x0_hat = x_t - t v``). The public GASS code uses a diffusion formula here instead,
    which is wrong for flows (PAPERS.md).

    >>> float(velocity_to_x0(-1.0, 0.5, 0.5, 0.5))
    1.0
    """
    return x - sigma * u


def x0_to_velocity(x0, x, alpha, sigma):
    """``u = (x - x0) / sigma``; inverse of :func:`velocity_to_x0`.

    >>> float(x0_to_velocity(1.0, 0.5, 0.5, 0.5))
    -1.0
    """
    del alpha
    return (x - x0) / sigma


_TO_X0 = {
    "epsilon": eps_to_x0,
    "v_prediction": v_to_x0,
    "sample": lambda out, x, alpha, sigma: out,
    "flow": velocity_to_x0,
}
_FROM_X0 = {
    "epsilon": x0_to_eps,
    "v_prediction": x0_to_v,
    "sample": lambda x0, x, alpha, sigma: x0,
    "flow": x0_to_velocity,
}


def check_prediction_type(prediction_type) -> str:
    """Refuse a prediction type other than diffusers' names and ``"flow"``.

    >>> check_prediction_type("v_prediction")
    'v_prediction'
    """
    if not isinstance(prediction_type, str) or prediction_type not in _TO_X0:
        raise ValueError(
            f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}"
        )
    return prediction_type


def to_prediction(x0, x, alpha, sigma, prediction_type: str):
    """``x0_hat`` as a network of ``prediction_type`` would output it at ``x = alpha x0 +
    sigma eps`` (the inverse of the conversion :func:`as_denoiser` applies).

    >>> round(float(to_prediction(0.0, 1.0, 0.6, 0.8, "v_prediction")), 4)   # x0_to_v
    0.75
    """
    return _FROM_X0[prediction_type](x0, x, alpha, sigma)


def from_prediction(out, x, alpha, sigma, prediction_type: str):
    """A network output of ``prediction_type`` as ``x0_hat`` (what :func:`as_denoiser`
    returns).

    >>> float(from_prediction(1.0, 2.0, 0.5, 0.5, "epsilon"))                   # eps_to_x0
    3.0
    """
    return _TO_X0[prediction_type](out, x, alpha, sigma)


class PredictionDenoiser(NamedTuple):
    """A network wrapped as a denoiser; see :func:`as_denoiser`."""

    model: Callable
    schedule: object
    prediction_type: str

    def __call__(self, x, t, cond=None, *, model_hooks=None):
        alpha = self.schedule.alpha(t)
        sigma = self.schedule.sigma(t)
        to_x0 = _TO_X0[self.prediction_type]
        if not model_hooks:
            return to_x0(self.model(x, t, cond), x, alpha, sigma).astype(x.dtype)
        # model hooks (guidance terms acting inside the network) reach models that take
        # them; such a model returns (prediction, the hooks' reports)
        out, reports = self.model(x, t, cond, model_hooks=model_hooks)
        return to_x0(out, x, alpha, sigma).astype(x.dtype), reports


def as_denoiser(model, schedule, prediction_type: str = "epsilon") -> PredictionDenoiser:
    """Wrap ``model(x, t, cond) -> prediction`` as a denoiser ``(x, t, cond) -> x0_hat``.

    ``prediction_type`` uses diffusers' names: ``"epsilon"``, ``"v_prediction"``,
    ``"sample"``, plus ``"flow"`` for rectified-flow velocities.

    >>> import jax.numpy as jnp
    >>> from jaxdiv import schedules
    >>> den = as_denoiser(lambda x, t, c: jnp.zeros_like(x), schedules.flow(), "flow")
    >>> den(jnp.ones((1, 2)), 0.5).tolist()
    [[1.0, 1.0]]
    """
    check_prediction_type(prediction_type)
    if not callable(model):
        raise TypeError(f"model must be callable (x, t, cond) -> prediction, got {type(model)}")
    validation.process("schedule", schedule)
    if prediction_type == "flow":
        _check_flow_process(schedule)
    return PredictionDenoiser(model, schedule, prediction_type)


def _check_flow_process(schedule):
    """``x0 = x - sigma u`` holds only where ``alpha + sigma = 1``: check it on the
    schedule's own 16-step grid (a VP or EDM process fails at every interior time)."""
    t = np.asarray(schedule.grid(16), np.float64)
    gap = np.abs(np.asarray(schedule.alpha(t)) + np.asarray(schedule.sigma(t)) - 1.0)
    if not np.all(gap <= 1e-6):
        i = int(np.argmax(gap))
        raise ValueError(
            f"prediction_type='flow' needs a process with alpha(t) + sigma(t) = 1 "
            f"(rectified flow, schedules.flow); {type(schedule).__name__} has "
            f"|alpha + sigma - 1| = {float(gap[i]):.3g} at t={t[i]:.6g}"
        )
