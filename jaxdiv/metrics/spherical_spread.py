"""Spherical projection spread (SPP) of GASS and its principal residual direction.

GASS (ICML 2026, Algorithm 1 and Sec. 4.1): with unit image embeddings ``e_i`` and the
unit text embedding ``e_t`` of one prompt, ``D_dep = max_i e_i.e_t - min_i e_i.e_t``;
``u_ind`` is, among ``num_directions`` random orthonormal directions in the orthogonal
complement of ``e_t`` (QR of ``[e_t, G]``, i.e. Gram-Schmidt), the one with the largest
batch-mean ``|e_i.u|``; ``D_ind`` is the same range along ``u_ind``; ``SPP = D_dep + D_ind``.

:func:`principal_residual_direction` wraps the single implementation of that search,
:func:`jaxdiv.sphere.principal_direction`, which the GASS guidance term calls too.
Randomness comes only from the ``key`` argument (the public GASS code re-seeds inside its
target builder, so every call saw the same directions).
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiv import validation
from jaxdiv.metrics import _checks
from jaxdiv.sphere import principal_direction, unit


class SPPResult(NamedTuple):
    """Projection ranges of GASS: ``spp = d_dep + d_ind`` and the direction ``u_ind``."""

    d_dep: jax.Array
    d_ind: jax.Array
    spp: jax.Array
    u_ind: jax.Array


@partial(jax.jit, static_argnames=("num_directions",))
def _direction_core(key, emb, text_emb, *, num_directions):
    return principal_direction(key, unit(emb), unit(text_emb), num_directions)


@partial(jax.jit, static_argnames=("num_directions",))
def _spp_core(emb, text_emb, key, *, num_directions):
    emb, e_t = unit(emb), unit(text_emb)
    u = principal_direction(key, emb, e_t, num_directions)
    dep, ind = emb @ e_t, emb @ u
    d_dep = jnp.max(dep) - jnp.min(dep)
    d_ind = jnp.max(ind) - jnp.min(ind)
    return SPPResult(d_dep, d_ind, d_dep + d_ind, u)


def _check_inputs(emb, text_emb, num_directions):
    e = _checks.check_features(emb, "emb", nonzero_rows=True)
    t = _checks.as_float_array(text_emb, "text_emb")
    if t.ndim != 1:
        raise ValueError("`text_emb` must be a 1-D embedding of shape (d,) for one prompt; "
                         f"got shape {tuple(t.shape)}.")
    _checks.check_same_dim(e, "emb", t, "text_emb")
    _checks.check_values(t[None, :], "text_emb", nonzero_rows=True)
    num_directions = _checks.check_int(num_directions, "num_directions", 1)
    d = e.shape[1]
    if num_directions > d - 1:
        raise ValueError(f"`num_directions` must be <= d - 1 = {d - 1} (orthonormal directions "
                         f"in the complement of `text_emb`); got {num_directions}.")
    dtype = _checks.common_dtype(e, t)
    return e.astype(dtype), t.astype(dtype), num_directions


def principal_residual_direction(key, emb, text_emb, num_directions: int = 10) -> jax.Array:
    """GASS principal residual direction ``u_ind`` of a batch of embeddings.

    Draws ``num_directions`` Gaussian vectors, orthonormalises them against ``e_t`` by QR
    (Gram-Schmidt), and returns the direction with the largest batch mean ``|e_i . u|``.
    Rows of ``emb`` and ``text_emb`` are L2-normalised first (CLIP-sphere embeddings).
    The sign of ``u_ind`` is arbitrary (QR's), which no GASS quantity depends on.

    Implements GASS (ICML 2026) Algorithm 1, "disentangled basis identification".

    Args:
      key: PRNG key; the only source of randomness (fresh directions per key).
      emb: (B, d) image embeddings of one prompt's batch.
      text_emb: (d,) text embedding of the prompt.
      num_directions: number N of candidate directions, 1 <= N <= d - 1 (paper: 10).

    Returns:
      (d,) unit vector orthogonal to ``text_emb``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> emb = jax.random.normal(jax.random.key(0), (8, 16))
      >>> e_t = jnp.eye(16)[0]
      >>> u = metrics.principal_residual_direction(jax.random.key(1), emb, e_t)
      >>> round(float(u @ e_t), 6) == 0.0, round(float(u @ u), 5)
      (True, 1.0)
    """
    e, t, num_directions = _check_inputs(emb, text_emb, num_directions)
    return _direction_core(validation.prng_key("`key`", key), e, t, num_directions=num_directions)


def spp(emb, text_emb, key, num_directions: int = 10) -> SPPResult:
    """Spherical projection spread of one prompt's batch of image embeddings.

    ``d_dep`` is the range of ``e_i . e_t`` (prompt-dependent spread), ``d_ind`` the range of
    ``e_i . u_ind`` with ``u_ind`` from :func:`principal_residual_direction` (same key, same
    directions), and ``spp = d_dep + d_ind``. For several prompts use
    :func:`jaxdiv.metrics.groupwise` with per-prompt text embeddings and keys.

    Implements GASS (ICML 2026) Sec. 4.1, ``SPP = D_dep + D_ind``.

    Args:
      emb: (B, d) image embeddings (normalised internally).
      text_emb: (d,) text embedding (normalised internally).
      key: PRNG key for the direction search.
      num_directions: number of candidate residual directions (paper: 10).

    Returns:
      ``SPPResult(d_dep, d_ind, spp, u_ind)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> e_t = jnp.eye(4)[0]
      >>> emb = jnp.array([[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
      >>> res = metrics.spp(emb, e_t, jax.random.key(0), num_directions=3)
      >>> float(res.d_dep)
      1.0
    """
    e, t, num_directions = _check_inputs(emb, text_emb, num_directions)
    return _spp_core(e, t, validation.prng_key("`key`", key), num_directions=num_directions)


def _spp_inputs(emb, text_emb, key=None, num_directions: int = 10):
    return _check_inputs(emb, text_emb, num_directions)


_checks.register_group_check(spp, _spp_inputs)
