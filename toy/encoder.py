"""A differentiable toy "image encoder": a fixed random smooth map onto the unit sphere.

GASS (Zhu et al., ICML 2026) and its SPP metric live on the unit sphere of a CLIP image
encoder, anchored at a text embedding ``e_t``. The toy stand-in maps data points
``x in R^d`` to

    E(x) = normalize(a * e_t + W_out (tanh(W_in (x - c) / s + b) - tanh(b)))

with fixed random weights (``m >= 16`` output dimensions). The anchor strength ``a``
makes every data point land in a cap around ``e_t`` (as the images of one prompt do in
CLIP space), the random tanh features make different regions of the data space (modes
of a GMM, the two moons) land at different points of that cap, and the map is smooth,
so gradients of losses on the sphere reach ``x`` — exactly what GASS needs to write a
target embedding back into ``x0_hat``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.dtypes import as_float

__all__ = ["SphereEncoder", "sphere_encoder"]


class SphereEncoder(NamedTuple):
    """The toy sphere encoder ``E(x) = normalize(a e_t + W_out (tanh(...) - tanh(b)))``.

    A NamedTuple of arrays (a pytree), so its weights are traced, not compiled in.
    Call it on ``(..., d)`` points; it returns ``(..., m)`` unit vectors.

    Attributes:
        w_in: ``(d, hidden)`` input weights.
        b_in: ``(hidden,)`` input biases.
        w_out: ``(hidden, m)`` output weights.
        text_emb: ``(m,)`` unit text anchor ``e_t``.
        anchor: scalar ``a``: larger means a tighter cap around ``e_t``.
        center: ``(d,)`` data centre ``c``.
        scale: scalar data length scale ``s``.

    >>> import jax, jax.numpy as jnp
    >>> enc = sphere_encoder(jax.random.key(0), dim_in=2)    # S^15
    >>> z = enc(jnp.ones((3, 2)))
    >>> z.shape, bool(jnp.allclose(jnp.linalg.norm(z, axis=-1), 1.0))
    ((3, 16), True)
    """

    w_in: jax.Array
    b_in: jax.Array
    w_out: jax.Array
    text_emb: jax.Array
    anchor: jax.Array
    center: jax.Array
    scale: jax.Array

    @property
    def dim_in(self) -> int:
        return self.w_in.shape[0]

    @property
    def dim_out(self) -> int:
        return self.w_out.shape[1]

    def features(self, x):
        """The un-normalised embedding ``a e_t + W_out tanh(...)``, shape ``(..., m)``."""
        x = jnp.asarray(x)
        if x.shape[-1:] != (self.dim_in,):
            raise ValueError(
                f"x must have last dimension d={self.dim_in}, got shape {tuple(x.shape)}"
            )
        h = jnp.tanh(((x - self.center) / self.scale) @ self.w_in + self.b_in)
        # subtracting the features of the centre maps the data centre exactly onto e_t
        return self.anchor * self.text_emb + (h - jnp.tanh(self.b_in)) @ self.w_out

    def __call__(self, x):
        """Unit embeddings ``(..., m)`` of points ``(..., d)``.

        >>> enc = sphere_encoder(jax.random.key(0), 2)
        >>> e = enc(jnp.zeros((3, 2)))
        >>> e.shape, bool(jnp.allclose(jnp.linalg.norm(e, axis=-1), 1.0))
        ((3, 16), True)
        """
        z = self.features(x)
        return z / jnp.linalg.norm(z, axis=-1, keepdims=True)


def sphere_encoder(
    key,
    dim_in: int,
    dim_out: int = 16,
    hidden: int = 64,
    *,
    center=None,
    scale=1.0,
    anchor: float = 2.0,
    frequency: float = 1.5,
) -> SphereEncoder:
    """A fixed random smooth encoder ``R^d -> S^{m-1}`` with a text anchor ``e_t``.

    The toy stand-in for CLIP's image tower in GASS (Zhu et al., ICML 2026, Sec. 4):
    ``E(x) = normalize(a e_t + W_out (tanh(W_in (x - c)/s + b) - tanh(b)))`` with
    ``W_in ~ N(0, f^2/d)`` (``f`` = ``frequency``: features vary on the data's length
    scale), ``b ~ U[-1, 1]`` and ``W_out ~ N(0, 1/(hidden m))``. The data centre ``c`` maps
    exactly onto ``e_t``; other points land in a cap around it whose width the anchor
    ``a`` sets (``a = 2`` on the 8-mode ring of ``experiments/gass_toy.py``: cosines to
    ``e_t`` mostly above 0.9, like one prompt's images, and a dominant residual plane
    spanned by the 2-D data).

    Args:
        key: PRNG key fixing the weights and ``e_t``.
        dim_in: data dimension ``d``.
        dim_out: sphere dimension ``m`` (>= 16).
        hidden: number of tanh features.
        center: ``(d,)`` data centre (default 0); pass the data mean.
        scale: data length scale (default 1); pass the data's standard deviation.
        anchor: strength ``a > 0`` of the text anchor.
        frequency: ``f > 0``, how fast the features vary per unit of ``(x - c)/s``.

    Returns:
        A :class:`SphereEncoder`; ``enc.text_emb`` is the text anchor ``e_t``.

    >>> enc = sphere_encoder(jax.random.key(0), dim_in=2)
    >>> cos = enc(jax.random.normal(jax.random.key(1), (64, 2))) @ enc.text_emb
    >>> bool(cos.min() > 0.8), bool(jnp.allclose(enc(jnp.zeros((1, 2))) @ enc.text_emb, 1.0))
    (True, True)
    """
    for name, v in (("dim_in", dim_in), ("dim_out", dim_out), ("hidden", hidden)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if dim_out < 16:
        raise ValueError(f"dim_out must be >= 16 (a sphere S^(m-1) with m >= 16), got {dim_out}")
    for name, v in (("anchor", anchor), ("frequency", frequency)):
        if not isinstance(v, (int, float, np.floating)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}")
    center = jnp.zeros((dim_in,)) if center is None else as_float(center)
    if center.shape != (dim_in,):
        raise ValueError(f"center must have shape (dim_in,)=({dim_in},), got {center.shape}")
    scale = as_float(scale)
    if scale.ndim != 0 or not bool(scale > 0):
        raise ValueError(f"scale must be a scalar > 0, got {scale}")
    k_in, k_b, k_out, k_t = jax.random.split(key, 4)
    w_in = jax.random.normal(k_in, (dim_in, hidden)) * (frequency / math.sqrt(dim_in))
    b_in = jax.random.uniform(k_b, (hidden,), minval=-1.0, maxval=1.0)
    w_out = jax.random.normal(k_out, (hidden, dim_out)) / math.sqrt(hidden * dim_out)
    e_t = jax.random.normal(k_t, (dim_out,))
    e_t = e_t / jnp.linalg.norm(e_t)
    return SphereEncoder(w_in, b_in, w_out, e_t, as_float(anchor), center, scale)
