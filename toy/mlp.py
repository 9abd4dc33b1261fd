"""A small MLP denoiser for two moons with EDM preconditioning, usable on any process."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype

__all__ = ["MLPDenoiser", "init_mlp", "mlp_apply", "load_two_moons_mlp", "save_mlp", "load_mlp"]

TWO_MOONS_PARAMS = Path(__file__).parent / "params" / "two_moons_mlp.safetensors"
NUM_FREQS = 8


def init_mlp(key, dim: int = 2, hidden: int = 128, depth: int = 3):
    """Random MLP parameters: input ``dim`` + noise features, ``depth`` hidden SiLU layers.

    >>> params = init_mlp(jax.random.key(0), dim=2, hidden=16, depth=2)
    >>> [tuple(params[f"w{i}"].shape) for i in range(3)]   # 2 + 16 noise features in
    [(18, 16), (16, 16), (16, 2)]
    """
    key = validation.prng_key("key", key)
    sizes = [dim + 2 * NUM_FREQS] + [hidden] * depth + [dim]
    params = {}
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b)) * math.sqrt(1.0 / a)
        params[f"b{i}"] = jnp.zeros((b,))
    params[f"w{len(sizes) - 2}"] = params[f"w{len(sizes) - 2}"] * 0.1
    return params


def mlp_apply(params, y, c_noise):
    """Raw network ``F(y, c_noise)``; ``c_noise`` is ``(B,)``.

    >>> params = init_mlp(jax.random.key(0), hidden=16, depth=2)
    >>> mlp_apply(params, jnp.zeros((3, 2)), jnp.zeros(3)).shape
    (3, 2)
    """
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
    ``sigma / alpha = 1e4``, far above anything trained on, and at ``sigma = 0`` the
    denoiser is the identity (``c_skip = 1, c_out = 0``).
    """
    b = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, x.dtype), (b,))[:, None]
    alpha = jnp.broadcast_to(jnp.asarray(alpha, x.dtype), (b,))[:, None]
    norm = jnp.sqrt(sigma**2 + (alpha * sigma_data) ** 2)
    c_skip = sigma_data**2 * alpha / norm**2
    c_out = sigma * sigma_data / norm
    c_in = 1.0 / norm
    lam = sigma / jnp.maximum(alpha, sigma * 1e-4)
    # at sigma = 0 log(lam) = -inf would make the network NaN and c_out * NaN = NaN
    c_noise = jnp.log(jnp.maximum(lam[:, 0], jnp.finfo(x.dtype).tiny)) / 4.0
    return c_skip * x + c_out * mlp_apply(params, c_in * x, c_noise)


class MLPDenoiser(NamedTuple):
    """EDM-preconditioned MLP as a denoiser on any process: it sees ``x / alpha`` at noise
    level ``sigma / alpha``, the variable it was trained on.

    At ``sigma = 0`` it is the identity whatever the weights (``c_skip = 1, c_out = 0``):

    >>> from jaxdiv import schedules
    >>> den = MLPDenoiser(init_mlp(jax.random.key(0), hidden=16), schedules.edm(), 0.5)
    >>> den(jnp.ones((2, 2)), 0.0).tolist()
    [[1.0, 1.0], [1.0, 1.0]]
    """

    params: dict
    schedule: object
    sigma_data: float

    def __call__(self, x, t, cond=None):
        del cond
        return edm_precond(
            self.params, x, self.schedule.sigma(t), self.sigma_data, self.schedule.alpha(t)
        )


def save_mlp(path, params, sigma_data: float):
    """Write parameters to a safetensors file (atomically: temp file, then rename), in
    float32, or float64 where they are float64 (x64 mode).

    Parameters :func:`mlp_apply` could not run, or NaN/inf in them or in ``sigma_data``,
    are refused before anything is written.

    >>> import tempfile
    >>> params = init_mlp(jax.random.key(0), hidden=16, depth=2)
    >>> path = Path(tempfile.mkdtemp()) / "mlp.safetensors"
    >>> save_mlp(path, params, sigma_data=0.5)
    >>> loaded, sigma_data = load_mlp(path)
    >>> sigma_data, bool(jnp.all(loaded["w1"] == params["w1"]))
    (0.5, True)
    """
    from safetensors.numpy import save_file

    arrays = {k: np.asarray(v) for k, v in params.items()}
    _check_mlp(arrays, sigma_data, "params")
    # float32, or float64 for float64 parameters (x64): a reload returns what was saved
    arrays = {k: a.astype(working_dtype(a), copy=False) for k, a in arrays.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # one temp name per process: two writers never interleave their bytes in one file
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        save_file(arrays, str(tmp), metadata={"sigma_data": repr(float(sigma_data))})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load_mlp(path):
    """Read ``(params, sigma_data)`` written by :func:`save_mlp` (example there).

    A file whose tensors :func:`mlp_apply` could not run (missing, unexpected, mis-shaped
    or non-floating tensors), or with NaN/inf values or a missing or non-positive
    ``sigma_data``, is refused with a ``ValueError`` naming the file and the tensor.

    >>> import tempfile
    >>> from safetensors.numpy import save_file
    >>> path = Path(tempfile.mkdtemp()) / "half.safetensors"
    >>> save_file({"w0": np.ones((18, 2), np.float32)}, str(path), {"sigma_data": "0.5"})
    >>> load_mlp(path)
    Traceback (most recent call last):
    ...
    ValueError: '...half.safetensors': expected one pair ... missing ['b0'], unexpected none
    """
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"MLP parameters not found at {path}; retrain with "
            "`python -m experiments.train_two_moons_mlp`"
        )
    with safe_open(str(path), framework="numpy") as f:
        arrays = {k: f.get_tensor(k) for k in f.keys()}
        sigma_data = (f.metadata() or {}).get("sigma_data")
    try:
        sigma_data = float(sigma_data)
    except (TypeError, ValueError):
        raise ValueError(
            f"{str(path)!r}: metadata sigma_data must be a number, got {sigma_data!r} (write "
            "the file with toy.mlp.save_mlp)"
        ) from None
    _check_mlp(arrays, sigma_data, repr(str(path)))
    return {k: jnp.asarray(v) for k, v in arrays.items()}, sigma_data


def _check_mlp(arrays: dict, sigma_data: float, where: str) -> None:
    """Refuse what :func:`mlp_apply` cannot run or would turn into NaN, by tensor name."""
    if not (math.isfinite(sigma_data) and sigma_data > 0):
        raise ValueError(f"{where}: sigma_data must be a finite number > 0, got {sigma_data}")
    layers = [int(m.group(1)) for m in map(re.compile(r"[wb](\d+)").fullmatch, arrays) if m]
    n = max(layers, default=-1) + 1
    if n > len(arrays):  # a stray large index: say so rather than list its gap
        raise ValueError(
            f"{where}: tensor names reach layer {n - 1} but the file holds only "
            f"{len(arrays)} tensors (one pair w<i>, b<i> per layer, i = 0, 1, ...)"
        )
    expected = {f"{p}{i}" for i in range(n) for p in "wb"}
    missing = sorted(expected - set(arrays), key=_layer_order)
    unexpected = sorted(set(arrays) - expected)
    if not n or missing or unexpected:
        raise ValueError(
            f"{where}: expected one pair of tensors w<i>, b<i> per layer, i = 0, 1, ...; "
            f"missing {missing or 'none'}, unexpected {unexpected or 'none'}"
        )
    for i in range(n):
        w, b = arrays[f"w{i}"], arrays[f"b{i}"]
        for name, a in ((f"w{i}", w), (f"b{i}", b)):
            if not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"{where}: {name} must be a floating tensor, got {a.dtype}")
            bad = a.size - int(np.count_nonzero(np.isfinite(a)))
            if bad:
                raise ValueError(f"{where}: {name} has {bad} NaN or inf values of {a.size}")
        want_in = arrays[f"w{i - 1}"].shape[-1] if i else None
        if w.ndim != 2 or (want_in is not None and w.shape[0] != want_in):
            raise ValueError(
                f"{where}: w{i} must have shape ({want_in if i else 'in'}, out), got {w.shape}"
            )
        if b.shape != (w.shape[1],):
            raise ValueError(f"{where}: b{i} must have shape ({w.shape[1]},), got {b.shape}")
    dim = arrays[f"w{n - 1}"].shape[1]
    if arrays["w0"].shape[0] != dim + 2 * NUM_FREQS:
        raise ValueError(
            f"{where}: w0 must take the {dim} data coordinates and {2 * NUM_FREQS} noise "
            f"features (shape ({dim + 2 * NUM_FREQS}, ...)), got {arrays['w0'].shape}"
        )


def _layer_order(name: str) -> tuple:
    return int(name[1:]), name[0] == "b"


def load_two_moons_mlp(schedule, path=None) -> MLPDenoiser:
    """The trained two-moons MLP (``experiments/train_two_moons_mlp.py``) as a denoiser.

    >>> from jaxdiv import schedules
    >>> den = load_two_moons_mlp(schedules.edm())
    >>> den(jnp.zeros((3, 2)), 1.0).shape
    (3, 2)
    """
    params, sigma_data = load_mlp(TWO_MOONS_PARAMS if path is None else path)
    return MLPDenoiser(params, schedule, sigma_data)
