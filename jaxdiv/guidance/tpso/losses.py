"""TPSO's two losses (arXiv 2511.19811, Eq. 7 and 8) in the public code's exact form."""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["semantic_loss", "diversity_loss", "unit"]


def unit(v, eps=1e-12):
    """``v / max(||v||, eps)`` along the last axis (``torch.nn.functional.normalize``).

    >>> unit(jnp.array([[3.0, 4.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929]]
    """
    return v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)


def semantic_loss(cosine, kappa=0.8, tolerance=0.01):
    """Semantic hinge band, Eq. 7: ``sum_k max(0, kappa - tol - c_k) + max(0, c_k - kappa - tol)``.

    Zero while every cosine ``c_k = cos(v'_k, v)`` lies in ``[kappa - tol, kappa + tol]``;
    summed over variants, as the public code does.

    >>> round(float(semantic_loss(jnp.array([0.7, 0.8, 0.9]))), 6)   # public unit value
    0.18
    """
    cosine = jnp.asarray(cosine)
    lower, upper = kappa - tolerance, kappa + tolerance
    return jnp.sum(jnp.maximum(0.0, lower - cosine) + jnp.maximum(0.0, cosine - upper))


def diversity_loss(embeddings, num_variants, active=None):
    """Diversity, Eq. 8: minus the mean pairwise cosine distance among each prompt's variants.

    ``embeddings`` (G * N, P) are unit vectors grouped by prompt (rows ``g*N .. g*N+N-1``
    are prompt ``g``'s ``N = num_variants`` variants). For each group the mean pairwise
    distance is ``1 - (||sum_k v_k||^2 - N) / (N (N - 1))``; the loss is its negative,
    averaged over groups. With ``active`` (a bool per row, the variants still being
    optimised) each group's term is multiplied by ``N / #active`` and groups without an
    active variant are left out (the public code's compensation when converged variants
    are frozen).

    >>> float(diversity_loss(jnp.eye(2), 2))            # orthogonal pair: distance 1
    -1.0
    >>> float(diversity_loss(jnp.array([[1.0, 0.0], [1.0, 0.0]]), 2))   # identical: 0
    -0.0
    """
    embeddings = jnp.asarray(embeddings)
    if num_variants <= 1:
        return jnp.zeros((), embeddings.dtype)
    if embeddings.shape[0] % num_variants:
        raise ValueError(
            f"embeddings: {embeddings.shape[0]} rows is not a multiple of num_variants="
            f"{num_variants}"
        )
    n = num_variants
    grouped = embeddings.reshape(-1, n, embeddings.shape[-1])
    summed = grouped.sum(axis=1)
    mean_distance = 1.0 - (jnp.sum(summed * summed, axis=-1) - n) / (n * (n - 1))
    if active is None:
        return -jnp.mean(mean_distance)
    count = jnp.asarray(active).reshape(-1, n).sum(axis=1).astype(embeddings.dtype)
    valid = count > 0
    terms = jnp.where(valid, -mean_distance * n / jnp.where(valid, count, 1.0), 0.0)
    return jnp.where(valid.any(), terms.sum() / jnp.maximum(valid.sum(), 1), 0.0)


