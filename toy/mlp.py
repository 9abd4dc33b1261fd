"""A small MLP denoiser for two moons with EDM preconditioning, usable on any process."""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["MLPDenoiser", "init_mlp", "mlp_apply", "load_two_moons_mlp", "save_mlp", "load_mlp"]

TWO_MOONS_PARAMS = Path(__file__).parent / "params" / "two_moons_mlp.safetensors"
NUM_FREQS = 8


def init_mlp(key, dim: int = 2, hidden: int = 128, depth: int = 3):
    """Random MLP parameters: input ``dim`` + noise features, ``depth`` hidden SiLU layers."""
    sizes = [dim + 2 * NUM_FREQS] + [hidden] * depth + [dim]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b)) * math.sqrt(1.0 / a)
        params[f"b{i}"] = jnp.zeros((b,))
    params[f"w{len(sizes) - 2}"] = params[f"w{len(sizes) - 2}"] * 0.1
    return params


def mlp_apply(params, y, c_noise):
    """Raw network ``F(y, c_noise)``; ``c_noise`` is ``(B,)``."""
    freqs = 2.0 ** jnp.arange(NUM_FREQS)
    emb = c_noise[:, None] * freqs
    h = jnp.concatenate([y, jnp.sin(emb), jnp.cos(emb)], -1)
    n = len(params) // 2
    for i in range(n):
        h = h @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            h = jax.nn.silu(h)
    return h


def edm_precond(params, x, sigma, sigma_data, alpha=1.0):
    """Karras et al. (2022) Table 1, ``D = c_skip y + c_out F(c_in y, c_noise)`` with
    ``y = x / alpha`` at noise level ``sigma / alpha``.

    The coefficients are written in ``(x, alpha, sigma)`` so they stay finite at
    ``alpha = 0`` (rectified flow at ``t = 1``); the noise embedding saturates at
    ``sigma / alpha = 1e4``, far above anything trained on.
    """
    b = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (b,))[:, None]
    alpha = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (b,))[:, None]
    norm = jnp.sqrt(sigma**2 + (alpha * sigma_data) ** 2)
    c_skip = sigma_data**2 * alpha / norm**2
    c_out = sigma * sigma_data / norm
    c_in = 1.0 / norm
    lam = sigma / jnp.maximum(alpha, sigma * 1e-4)
    c_noise = jnp.log(lam[:, 0]) / 4.0
    return c_skip * x + c_out * mlp_apply(params, c_in * x, c_noise)


class MLPDenoiser(NamedTuple):
    """EDM-preconditioned MLP as a denoiser on any process: it sees ``x / alpha`` at noise
    level ``sigma / alpha``, the variable it was trained on."""

    params: dict
    schedule: object
    sigma_data: float

    def __call__(self, x, t, cond=None):
        del cond
        return edm_precond(
            self.params, x, self.schedule.sigma(t), self.sigma_data, self.schedule.alpha(t)
        )


def save_mlp(path, params, sigma_data: float):
    """Write parameters to a safetensors file (atomically: temp file, then rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    arrays = {k: np.asarray(v, np.float32) for k, v in params.items()}
    save_file(arrays, str(tmp), metadata={"sigma_data": repr(float(sigma_data))})
    tmp.replace(path)


def load_mlp(path):
    """Read ``(params, sigma_data)`` written by :func:`save_mlp`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MLP parameters not found at {path}; retrain with "
            "`python -m experiments.train_two_moons_mlp`"
        )
    with safe_open(str(path), framework="numpy") as f:
        params = {k: jnp.asarray(f.get_tensor(k)) for k in f.keys()}
        sigma_data = float(f.metadata()["sigma_data"])
    return params, sigma_data


def load_two_moons_mlp(schedule, path=None) -> MLPDenoiser:
    """The trained two-moons MLP (``experiments/train_two_moons_mlp.py``) as a denoiser.

    >>> from jaxdiv import schedules
    >>> den = load_two_moons_mlp(schedules.edm())
    >>> den(jnp.zeros((3, 2)), 1.0).shape
    (3, 2)
    """
    params, sigma_data = load_mlp(TWO_MOONS_PARAMS if path is None else path)
    return MLPDenoiser(params, schedule, sigma_data)
