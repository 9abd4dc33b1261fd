"""Gaussian mixtures with exact posterior means, scores and marginal densities of x_t.

For ``x0 ~ sum_k w_k N(mu_k, C_k)`` and ``x_t = alpha x0 + sigma eps``:

* ``x_t | k ~ N(alpha mu_k, alpha^2 C_k + sigma^2 I)``;
* ``E[x0 | x_t, k] = mu_k + alpha C_k (alpha^2 C_k + sigma^2 I)^{-1} (x_t - alpha mu_k)``;
* ``E[x0 | x_t] = sum_k p(k | x_t) E[x0 | x_t, k]``.

With ``C_k = U_k diag(lam_k) U_k^T`` precomputed once, every t-dependent quantity is a
diagonal operation in the eigenbasis: the hot path costs ``O(B K d^2)`` (full), ``O(B K d)``
(diagonal) or a ``(K, d) x (d, B)`` matmul (isotropic) and never builds ``(B, K, d, d)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxdiv import validation
from jaxdiv.dtypes import as_float

__all__ = ["GaussianMixture", "GMMDenoiser"]

_COV_KINDS = ("full", "diag", "iso")
# up to this dimension the full and diagonal kinds work on d (K, B) arrays: rotations and
# sums over d elementwise, sums over K as the reductions below
_ELEMENTWISE_MAX_D = 3


def _concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


# Why the reductions of the elementwise path are generic ``lax.reduce``s: on a (K, B) array
# XLA:CPU hands ``jnp.max(a, 0)`` and ``jnp.sum(a, 0)`` (and the softmax around them) to
# YNNPACK, whose calls cost several times the work at toy sizes; a reduce whose computation
# is not a plain max / add stays with XLA's own loops (the d = 2 sampler of
# benchmarks/toy_sampler.py: the benchmarks guide, "The toy sampler: reductions in XLA's own
# loops").
def _select_max(u, v):
    return lax.select(u > v, u, v)


def _max_over_components(a):
    """``max_k a[k]`` of a ``(K, B)`` array, without gradient: the softmax stabiliser
    (the result of ``exp(a - m) / sum exp(a - m)`` does not depend on ``m``).

    >>> _max_over_components(jnp.array([[1.0, -2.0], [0.5, 3.0]])).tolist()
    [1.0, 3.0]
    """
    a = lax.stop_gradient(a)
    return lax.reduce(a, jnp.array(-jnp.inf, a.dtype), _select_max, (0,))


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _sum_over(a, axis: int):
    """``jnp.sum(a, axis)`` that XLA:CPU computes itself: ``u - (0 - v)`` is ``u + v``
    exactly, but not the add that YNNPACK's fusions match.

    >>> _sum_over(jnp.array([[1.0, -2.0], [0.5, 3.0]]), 0).tolist()
    [1.5, 1.0]
    """
    return lax.reduce(a, jnp.array(0, a.dtype), lambda u, v: u - (0 - v), (axis,))


@_sum_over.defjvp
def _sum_over_jvp(axis, primals, tangents):
    # linear: the tangent is the same sum, written as jnp.sum so reverse mode can transpose it
    return _sum_over(primals[0], axis), jnp.sum(tangents[0], axis)


@jax.tree_util.register_pytree_node_class
class GaussianMixture:
    """Mixture ``sum_k w_k N(mu_k, C_k)`` with exact diffusion quantities.

    Args:
        means: ``(K, d)``.
        covs: ``(K, d, d)`` full, ``(K, d)`` diagonal or ``(K,)`` isotropic variances.
        weights: ``(K,)`` non-negative, summing to 1. Default: uniform.

    The mixture is a pytree: its arrays can be traced, so ``jax.grad`` of a function of
    samples generated with its denoiser reaches the means (and weights, covariances).

    >>> import jax.numpy as jnp
    >>> gm = GaussianMixture(jnp.zeros((1, 2)), jnp.ones((1,)), jnp.ones((1,)))
    >>> gm.posterior_mean(jnp.ones((1, 2)), 1.0, 1.0).tolist()     # N(0,1): x/2
    [[0.5, 0.5]]
    """

    def __init__(self, means, covs, weights=None):
        means = as_float(means)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}")
        k, d = means.shape
        covs = as_float(covs)
        if covs.shape == (k, d, d):
            kind = "full"
        elif covs.shape == (k, d):
            kind = "diag"
        elif covs.shape == (k,):
            kind = "iso"
        else:
            raise ValueError(
                f"covs must have shape (K, d, d)=({k}, {d}, {d}) full, (K, d)=({k}, {d}) "
                f"diagonal or (K,)=({k},) isotropic, got {covs.shape}"
            )
        weights = jnp.full((k,), 1.0 / k) if weights is None else as_float(weights)
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape (K,)=({k},), got {weights.shape}")
        if _concrete(means, covs, weights):
            _validate(np.asarray(means), np.asarray(covs), np.asarray(weights), kind)
        if kind == "full":
            eigvals, eigvecs = jnp.linalg.eigh(0.5 * (covs + jnp.swapaxes(covs, -1, -2)))
            eigvals = jnp.clip(eigvals, 0.0, None)
            # means in each component's eigenbasis: y_k = U_k^T mu_k, used at every t
            proj_means = jnp.einsum("kd,kde->ke", means, eigvecs)
        else:
            eigvals = jnp.clip(covs, 0.0, None)
            eigvecs = None
            proj_means = means
        self.means, self.covs, self.weights, self.kind = means, covs, weights, kind
        self.eigvals, self.eigvecs, self.proj_means = eigvals, eigvecs, proj_means

    # -- pytree ---------------------------------------------------------------------------
    def tree_flatten(self):
        children = (self.means, self.covs, self.weights, self.eigvals, self.eigvecs,
                    self.proj_means)  # fmt: skip
        return children, self.kind

    @classmethod
    def tree_unflatten(cls, kind, children):
        obj = object.__new__(cls)
        obj.means, obj.covs, obj.weights, obj.eigvals, obj.eigvecs, obj.proj_means = children
        obj.kind = kind
        return obj

    def __repr__(self):
        k, d = self.means.shape
        return f"GaussianMixture(K={k}, d={d}, covs={self.kind!r})"

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    # -- moments and sampling -------------------------------------------------------------
    def full_covs(self):
        """``(K, d, d)`` covariance matrices whatever the storage."""
        d = self.dim
        if self.kind == "full":
            return self.covs
        if self.kind == "diag":
            return jax.vmap(jnp.diag)(self.covs)
        return self.covs[:, None, None] * jnp.eye(d)

    def mean(self):
        """Mixture mean ``sum_k w_k mu_k``."""
        return self.weights @ self.means

    def covariance(self):
        """Mixture covariance ``sum_k w_k (C_k + mu_k mu_k^T) - m m^T``."""
        m = self.mean()
        second = jnp.einsum("k,kde->de", self.weights, self.full_covs())
        second = second + jnp.einsum("k,kd,ke->de", self.weights, self.means, self.means)
        return second - jnp.outer(m, m)

    def sample(self, key, n: int, return_labels: bool = False):
        """``n`` exact samples ``(n, d)`` (and component labels if asked).

        >>> import jax
        >>> gm = GaussianMixture(jnp.zeros((2, 3)), jnp.ones((2,)))
        >>> gm.sample(jax.random.key(0), 5).shape
        (5, 3)
        """
        n = validation.integer("n", n, minimum=0)
        k_lab, k_eps = jax.random.split(validation.prng_key("key", key))
        labels = jax.random.categorical(k_lab, jnp.log(self.weights), shape=(n,))
        eps = jax.random.normal(k_eps, (n, self.dim))
        scale = jnp.sqrt(self.eigvals)
        if self.kind == "full":
            # x = mu_c + U_c (sqrt(lam_c) * eps), gathered per sample without (n, d, d)
            per_comp = jnp.einsum("kde,ne->nkd", self.eigvecs * scale[:, None, :], eps)
            x = (
                self.means[labels]
                + jnp.take_along_axis(per_comp, labels[:, None, None], axis=1)[:, 0]
            )
        elif self.kind == "diag":
            x = self.means[labels] + scale[labels] * eps
        else:
            x = self.means[labels] + scale[labels][:, None] * eps
        return (x, labels) if return_labels else x

    # -- exact quantities of x_t ----------------------------------------------------------
    @property
    def _elementwise(self) -> bool:
        return self.kind != "iso" and self.dim <= _ELEMENTWISE_MAX_D

    def _stats(self, x, alpha, sigma, target=None):
        """Per-component logits ``(K, B)``, residuals ``z`` ``(K, d, B)`` in each eigenbasis
        and variances; on the elementwise path (``self._elementwise``) the affine maps of
        ``target`` in place of ``z`` (see :meth:`_elementwise_stats`).

        Component-major layout on purpose: reductions over ``K`` and ``d`` then run over
        leading axes and vectorise across the batch; with ``(B, K, d)`` XLA on CPU reduces
        over tiny minor axes and the whole denoiser is ~4x slower.
        """
        alpha = jnp.asarray(alpha, x.dtype)
        sigma = jnp.asarray(sigma, x.dtype)
        var = alpha**2 * self.eigvals + sigma**2  # (K, d) or (K,)
        d = self.dim
        xt = x.T  # (d, B)
        if self.kind == "iso":
            sq = (
                jnp.sum(xt * xt, 0)[None, :]
                - 2 * alpha * self.means @ xt
                + alpha**2 * jnp.sum(self.means**2, -1)[:, None]
            )
            sq = jnp.clip(sq, 0.0, None)
            log_norm = jnp.log(self.weights) - 0.5 * d * jnp.log(2 * math.pi * var)
            return log_norm[:, None] - 0.5 * sq / var[:, None], None, var
        log_norm = jnp.log(self.weights) - 0.5 * jnp.sum(jnp.log(2 * math.pi * var), -1)
        if self._elementwise:
            return (*self._elementwise_stats(xt, alpha, var, log_norm, target), var)
        if self.kind == "full":
            y = jnp.einsum("kde,db->keb", self.eigvecs, xt)
        else:
            y = xt[None]
        z = y - alpha * self.proj_means[:, :, None]  # (K, d, B)
        return log_norm[:, None] - 0.5 * jnp.sum(z * z / var[:, :, None], 1), z, var

    def _elementwise_stats(self, xt, alpha, var, log_norm, target):
        """The elementwise path (d <= 3, full or diagonal covariances) on ``xt`` ``(d, B)``:
        logits ``(K, B)`` and, for ``target`` ``"mean"`` or ``"score"``, each component's
        affine map ``x -> a_k + G_k x`` whose ``p(k | x)``-weighted sum the target is
        (posterior mean: ``G_k = alpha C_k (alpha^2 C_k + sigma^2 I)^-1``, ``a_k = mu_k -
        alpha G_k mu_k``; score: ``G_k = -(alpha^2 C_k + sigma^2 I)^-1``, ``a_k = -alpha
        G_k mu_k``) as ``(a (K, d), G (K, d * d), or its diagonal (K, d))``.

        Rotations and sums over d are written out as ``(K, B)`` operations: XLA:CPU would
        run a ``(K d, d) x (d, B)`` product and a middle-axis reduction as library calls
        costing more than the exps.
        """
        d, k = self.dim, self.num_components
        inv = 1 / var
        maps = None
        if target is not None:
            gain = alpha * self.eigvals * inv if target == "mean" else -inv
            if self.kind == "full":  # G_k = U_k diag(gain_k) U_k^T, y_k = U_k^T mu_k
                ug = self.eigvecs * gain[:, None, :]
                lin = jnp.sum(ug[:, :, None, :] * self.eigvecs[:, None, :, :], -1)
                lin, shift = lin.reshape(k, d * d), jnp.sum(ug * self.proj_means[:, None, :], -1)
            else:
                lin, shift = gain, gain * self.proj_means
            maps = (self.means - alpha * shift if target == "mean" else -alpha * shift, lin)
        sq = []
        for e in range(d):  # z_e = (U_k^T x)_e - alpha y_ke, then z_e^2 / var_ke
            y = (sum(self.eigvecs[:, j, e, None] * xt[j] for j in range(d))
                 if self.kind == "full" else xt[e][None])  # fmt: skip
            z = y - alpha * self.proj_means[:, e, None]
            sq.append(z * z * inv[:, e, None])
        # a reduce, so the logits are computed once for the max and the exps that read them
        return log_norm[:, None] - 0.5 * _sum_over(jnp.stack(sq, 1), 1), maps

    def _flat(self, x):
        # jaxdiv.dtypes' rule: half-precision x is computed in float32 (|x|^2 of a float16
        # x overflows from |x| ~ 181, far inside EDM's sigma_max = 80 noise)
        x = as_float(x)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last dimension d={self.dim}, got shape {x.shape}")
        return x.reshape(-1, self.dim), x.shape

    def _rotate_back(self, w):
        """``sum_k U_k w_k`` for ``w`` of shape ``(K, d, B)``, as ``(d, B)``."""
        if self.kind == "full":
            return jnp.einsum("kde,keb->db", self.eigvecs, w)
        return jnp.sum(w, 0)

    def _average(self, logits, xt, maps):
        """``sum_k p(k | x) (a_k + G_k x)`` as ``(d, B)`` from the elementwise path's logits
        and affine maps (:meth:`_elementwise_stats`): ``d (d + 1)`` multiply-adds per sample
        and component."""
        d = self.dim
        offset, lin = maps
        full = lin.shape[1] == d * d
        p = jnp.exp(logits - _max_over_components(logits))
        out = []
        for j in range(d):
            v = offset[:, j, None] + (sum(lin[:, j * d + i, None] * xt[i] for i in range(d))
                                      if full else lin[:, j, None] * xt[j])  # fmt: skip
            out.append(_sum_over(p * v, 0))
        return jnp.stack(out) / _sum_over(p, 0)

    def log_prob(self, x, alpha=1.0, sigma=0.0):
        """Exact ``log p_t(x)`` of ``x_t = alpha x0 + sigma eps`` (``alpha=1, sigma=0``: data).

        >>> gm = GaussianMixture(jnp.zeros((1, 1)), jnp.ones((1,)))
        >>> round(float(gm.log_prob(jnp.zeros((1, 1)))[0]), 4)      # -log(sqrt(2 pi))
        -0.9189
        """
        xf, shape = self._flat(x)
        logits, _, _ = self._stats(xf, alpha, sigma)
        return jax.nn.logsumexp(logits, 0).reshape(shape[:-1])

    def responsibilities(self, x, alpha, sigma):
        """``p(k | x_t)``, shape ``(..., K)``."""
        xf, shape = self._flat(x)
        logits, _, _ = self._stats(xf, alpha, sigma)
        return jax.nn.softmax(logits, 0).T.reshape(shape[:-1] + (self.num_components,))

    def posterior_mean(self, x, alpha, sigma):
        """Exact ``E[x0 | x_t = x]`` (see module docstring), shape of ``x``.

        At ``sigma = 0`` it is ``x / alpha`` (``x_t`` determines ``x0``), also where a
        component has a zero variance (a point mass), whose formula is 0 / 0 there.

        >>> gm = GaussianMixture(jnp.array([[0.0], [2.0]]), jnp.array([0.0, 1.0]))
        >>> gm.posterior_mean(jnp.array([[0.0], [0.5]]), 1.0, 0.0).tolist()
        [[0.0], [0.5]]
        """
        xf, shape = self._flat(x)
        clean = jnp.asarray(sigma, xf.dtype) == 0

        def clean_x0():
            # x / alpha only where sigma = 0 (alpha > 0 there); alpha = 0 (a flow's noisy
            # end) must not reach the division, or its gradient is 0 * inf = NaN
            return xf.T / jnp.where(clean, jnp.asarray(alpha, xf.dtype), 1.0)

        if self._elementwise:
            # a branch, not jnp.where: XLA:CPU then writes the (d, B) mean out before the
            # caller's (B, d) layout instead of fusing the sums over K into that transpose
            # (a scalar loop per output element, several times slower); and sigma = 0
            # skips the mixture
            out = lax.cond(clean, clean_x0, lambda: self._mixture_mean(xf, alpha, sigma))
        else:
            out = jnp.where(clean, clean_x0(), self._mixture_mean(xf, alpha, sigma))
        return out.T.reshape(shape)

    def _mixture_mean(self, xf, alpha, sigma):
        """``E[x0 | x_t]`` as ``(d, B)`` for ``sigma > 0``."""
        # the formula at sigma = 1 where sigma = 0: no 0 / 0 in the discarded branch or in
        # its gradient
        logits, z, var = self._stats(xf, alpha, jnp.where(sigma == 0, 1.0, sigma), "mean")
        if self._elementwise:
            return self._average(logits, xf.T, z)
        alpha = jnp.asarray(alpha, xf.dtype)
        gain = alpha * self.eigvals / var  # (K, d) or (K,)
        r = jax.nn.softmax(logits, 0)  # (K, B)
        if self.kind == "iso":
            return self.means.T @ (r * (1 - alpha * gain)[:, None]) + (gain @ r)[None] * xf.T
        return self.means.T @ r + self._rotate_back(r[:, None, :] * gain[:, :, None] * z)

    def score(self, x, alpha, sigma):
        """Exact score ``-sum_k p(k|x) (alpha^2 C_k + sigma^2 I)^{-1} (x - alpha mu_k)``."""
        xf, shape = self._flat(x)
        logits, z, var = self._stats(xf, alpha, sigma, "score")
        if self._elementwise:
            return self._average(logits, xf.T, z).T.reshape(shape)
        alpha = jnp.asarray(alpha, xf.dtype)
        r = jax.nn.softmax(logits, 0)
        if self.kind == "iso":
            out = -((1 / var) @ r)[None] * xf.T + alpha * self.means.T @ (r / var[:, None])
        else:
            out = -self._rotate_back(r[:, None, :] * z / var[:, :, None])
        return out.T.reshape(shape)

    def denoiser(self, schedule) -> GMMDenoiser:
        """Exact denoiser ``D(x, t, cond=None) = E[x0 | x_t = x]`` for ``schedule``.

        >>> from jaxdiv import schedules
        >>> gm = GaussianMixture(jnp.zeros((1, 2)), jnp.ones((1,)))
        >>> gm.denoiser(schedules.edm())(jnp.ones((1, 2)), 1.0).tolist()
        [[0.5, 0.5]]
        """
        return GMMDenoiser(self, schedule)


class GMMDenoiser(NamedTuple):
    """The exact posterior-mean denoiser of a :class:`GaussianMixture` (a pytree).

    For ``N(0, 1)`` data on the EDM process ``D(x, sigma) = x / (1 + sigma^2)``:

    >>> from jaxdiv import schedules
    >>> gm = GaussianMixture(jnp.zeros((1, 1)), jnp.ones((1,)))
    >>> GMMDenoiser(gm, schedules.edm())(jnp.array([[3.0]]), 2.0).tolist()
    [[0.6000000238418579]]
    """

    mixture: GaussianMixture
    schedule: object

    def __call__(self, x, t, cond=None):
        del cond
        return self.mixture.posterior_mean(x, self.schedule.alpha(t), self.schedule.sigma(t))


def _validate(means, covs, weights, kind):
    for name, arr in (("means", means), ("covs", covs), ("weights", weights)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains NaN or inf values")
    if np.any(weights < 0):
        raise ValueError(f"weights must be non-negative, got {weights.tolist()}")
    if abs(float(weights.sum()) - 1.0) > 1e-5:
        raise ValueError(f"weights must sum to 1, got sum {float(weights.sum()):.6g}")
    if kind == "full":
        asym = np.max(np.abs(covs - np.swapaxes(covs, -1, -2)), axis=(1, 2))
        scale = np.maximum(np.max(np.abs(covs), axis=(1, 2)), 1e-30)
        bad = np.nonzero(asym > 1e-5 * scale)[0]
        if bad.size:
            raise ValueError(
                f"covs[{bad[0]}] is not symmetric (max |C - C^T| = {asym[bad[0]]:.3g})"
            )
        eig = np.linalg.eigvalsh(covs.astype(np.float64))
        lo = eig.min(axis=1)
        bad = np.nonzero(lo < -1e-6 * np.maximum(eig.max(axis=1), 1e-30))[0]
        if bad.size:
            raise ValueError(
                f"covs must be positive semi-definite; covs[{bad[0]}] has eigenvalue "
                f"{lo[bad[0]]:.4g}"
            )
    else:
        bad = np.argwhere(covs < 0)
        if bad.size:
            idx = tuple(int(i) for i in bad[0])
            raise ValueError(
                f"covs must be non-negative variances; covs{list(idx)} = {covs[idx]:.4g}"
            )
