"""The exact posterior-mean denoiser of a finite data set (a memorising "model")."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.dtypes import as_float

__all__ = ["EmpiricalDenoiser"]


@jax.tree_util.register_pytree_node_class
class EmpiricalDenoiser:
    """``D(x, t) = sum_j softmax_j(-|x - alpha y_j|^2 / (2 sigma^2)) y_j`` over data ``y``.

    The optimal denoiser of the empirical distribution of ``data``: it reproduces training
    points (Kadkhodaie et al. 2024), which makes it the toy for data-protection
    experiments. At ``sigma = 0`` it returns the limit, the nearest point of ``alpha y``.
    Computed blockwise over the data with an online (streaming) softmax, so memory is
    ``O(B * block_size)`` and 10^5-10^6 points fit.

    Args:
        data: ``(n, d)`` training points.
        schedule: the process whose ``alpha(t)``, ``sigma(t)`` the denoiser is called with.
        block_size: data points per block.

    >>> import jax.numpy as jnp
    >>> from jaxdiv import schedules
    >>> den = EmpiricalDenoiser(jnp.array([[0.0], [4.0]]), schedules.edm())
    >>> den(jnp.array([[3.9]]), 0.1).round(3).tolist()
    [[4.0]]
    """

    def __init__(self, data, schedule, block_size: int = 4096):
        data = as_float(data)
        if data.ndim != 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape (n, d) with n >= 1, got {data.shape}")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if not isinstance(data, jax.core.Tracer) and not bool(jnp.all(jnp.isfinite(data))):
            raise ValueError("data contains NaN or inf values")
        n, d = data.shape
        bs = min(block_size, n)
        nb = -(-n // bs)
        self.blocks = jnp.pad(data, ((0, nb * bs - n), (0, 0))).reshape(nb, bs, d)
        self.valid = jnp.asarray(np.arange(nb * bs).reshape(nb, bs) < n)
        self.schedule = schedule
        self.n = n

    def tree_flatten(self):
        return (self.blocks, self.valid, self.schedule), self.n

    @classmethod
    def tree_unflatten(cls, n, children):
        obj = object.__new__(cls)
        obj.blocks, obj.valid, obj.schedule = children
        obj.n = n
        return obj

    @property
    def data(self):
        """The ``(n, d)`` data points."""
        return self.blocks.reshape(-1, self.blocks.shape[-1])[: self.n]

    def posterior_mean(self, x, alpha, sigma):
        """Exact ``E[x0 | x_t = x]`` under the empirical distribution, shape of ``x``."""
        shape = x.shape
        xf = x.reshape(shape[0], -1)
        if xf.shape[1] != self.blocks.shape[-1]:
            raise ValueError(
                f"x must have {self.blocks.shape[-1]} features per sample, got shape {shape}"
            )
        alpha = jnp.asarray(alpha, xf.dtype)
        # finite at sigma = 0, where the weights become the nearest point's (the limit)
        inv = 0.5 / jnp.maximum(jnp.asarray(sigma, xf.dtype) ** 2, jnp.finfo(xf.dtype).tiny)
        b, d = xf.shape

        def block(carry, inputs):
            m, l, acc = carry
            y, ok = inputs
            # -|x - a y|^2 up to the per-row constant |x|^2; the running max m is taken
            # before the scaling by 1 / 2 sigma^2, so a huge scale cannot make inf - inf
            e = jnp.where(ok, 2 * alpha * xf @ y.T - alpha**2 * jnp.sum(y * y, -1), -jnp.inf)
            m_new = jnp.maximum(m, e.max(-1))
            scale = jnp.exp((m - m_new) * inv)
            p = jnp.exp((e - m_new[:, None]) * inv)
            return (m_new, l * scale + p.sum(-1), acc * scale[:, None] + p @ y), None

        init = (jnp.full((b,), -jnp.inf, xf.dtype), jnp.zeros((b,), xf.dtype),
                jnp.zeros((b, d), xf.dtype))  # fmt: skip
        (m, l, acc), _ = jax.lax.scan(block, init, (self.blocks, self.valid))
        return (acc / l[:, None]).reshape(shape)

    def __call__(self, x, t, cond=None):
        del cond
        return self.posterior_mean(x, self.schedule.alpha(t), self.schedule.sigma(t))
