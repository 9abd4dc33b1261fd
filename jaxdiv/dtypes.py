"""The floating dtype jaxdiv computes in: float32, or float64 where the input is float64.

One rule for samplers, schedules, guidance terms, metrics and toys: a computation runs in
its input's floating dtype promoted to at least float32 (half precision has no eigh or
solve kernels, and would round a sampler's step sizes), so a float64 run in x64 mode
(``jax.enable_x64``) keeps float64 end to end; integer and bool inputs take the default
float (float32, float64 under x64). Two exceptions: a sampler's ``x`` is carried between
steps in the noise's own dtype (half-precision latents, as diffusers' fp16 pipelines carry
theirs), each step computed at float32; and the Frechet distance computes concrete inputs
in float64 (:mod:`jaxdiv.metrics.frechet`: in float32 a 2048-D FID is far off).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["working_dtype", "as_float"]


def working_dtype(x) -> np.dtype:
    """The dtype to compute ``x`` in: its floating dtype, at least float32.

    ``x`` is an array, a dtype or a Python / NumPy scalar. Without x64 the answer is always
    float32 (``jnp.asarray`` would truncate float64 anyway).

    >>> import jax, jax.numpy as jnp, numpy as np
    >>> working_dtype(jnp.zeros(2, jnp.bfloat16)), working_dtype(3)
    (dtype('float32'), dtype('float32'))
    >>> with jax.enable_x64(True):
    ...     working_dtype(np.zeros(2)), working_dtype(np.float32), working_dtype(3)
    (dtype('float64'), dtype('float32'), dtype('float64'))
    """
    if isinstance(x, (np.dtype, type, str)):
        dtype = jnp.dtype(x)
    elif hasattr(x, "dtype"):
        dtype = x.dtype
    else:
        dtype = np.asarray(x).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        return jax.dtypes.canonicalize_dtype(jnp.result_type(float))
    return jax.dtypes.canonicalize_dtype(jnp.promote_types(dtype, jnp.float32))


def as_float(x) -> jax.Array:
    """``x`` as a JAX array in its :func:`working_dtype` (also under ``jit``).

    >>> import jax, numpy as np
    >>> as_float([1, 2]).dtype, as_float(np.ones(2, np.float16)).dtype
    (dtype('float32'), dtype('float32'))
    >>> with jax.enable_x64(True):
    ...     as_float(np.ones(2)).dtype
    dtype('float64')
    """
    return jnp.asarray(x, working_dtype(x))
