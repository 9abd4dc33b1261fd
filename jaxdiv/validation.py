"""Eager argument checks shared by every factory in jaxdiv.

Every message names the argument, says what was expected and shows what came. Numeric
hyperparameters must be finite (``inf`` only where the caller documents a meaning for it)
and are returned as weakly typed JAX scalars: array leaves are *traced* by
:func:`jaxdiv.sample`, so a new value never recompiles and ``jax.grad`` reaches it, and
weak typing keeps a bf16 run in bf16. Traced values (under ``jit``/``grad``) cannot be
inspected; they pass through unchecked.

>>> from jaxdiv import validation
>>> validation.real("scale", 7.5)
Array(7.5, dtype=float32, weak_type=True)
>>> validation.real("scale", float("nan"))
Traceback (most recent call last):
...
ValueError: scale must be a finite number, got nan
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "is_concrete",
    "integer",
    "real",
    "number",
    "boolean",
    "choice",
    "function",
    "finite_array",
    "prng_key",
]


def is_concrete(*xs) -> bool:
    """True when no leaf of ``xs`` is a tracer, i.e. their values can be inspected.

    >>> is_concrete(1.0, jnp.ones(2))
    True
    """
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree_util.tree_leaves(xs))


def integer(name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """A Python int in ``[minimum, maximum]`` (bools and floats are refused).

    >>> integer("num_steps", 10, minimum=1)
    10
    >>> integer("num_steps", 0, minimum=1)
    Traceback (most recent call last):
    ...
    ValueError: num_steps must be an integer >= 1, got 0
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        lo = "" if minimum is None else f">= {minimum}"
        hi = "" if maximum is None else f"<= {maximum}"
        raise ValueError(f"{name} must be an integer {' and '.join(filter(None, (lo, hi)))}, "
                         f"got {value}")  # fmt: skip
    return value


def image_sizes(multiple: int, **sizes) -> None:
    """Refuse an image size (``height=...``, ``width=...``) that is not a positive integer
    multiple of ``multiple`` (the model's down/up path must line up), naming it.

    >>> image_sizes(64, height=512, width=768)
    >>> image_sizes(64, height=500)
    Traceback (most recent call last):
    ...
    ValueError: height must be a positive multiple of 64, got 500
    """
    for name, v in sizes.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {type(v).__name__} {v!r}")
        if v <= 0 or v % multiple:
            raise ValueError(f"{name} must be a positive multiple of {multiple}, got {int(v)}")


def _range_text(lo, hi, lo_open, hi_open) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi}")
    return " and ".join(parts)


def number(
    name: str,
    value,
    *,
    lo=None,
    hi=None,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
) -> float:
    """A concrete real number as a Python float, checked (for static settings).

    ``lo``/``hi`` bound it (``lo_open``/``hi_open`` make a bound strict); NaN is always
    refused and ``inf`` unless ``allow_inf``.

    >>> number("eta", 0.5, lo=0)
    0.5
    >>> number("eta", -1, lo=0)
    Traceback (most recent call last):
    ...
    ValueError: eta must be a finite number >= 0, got -1.0
    >>> number("eta", "0.5")
    Traceback (most recent call last):
    ...
    TypeError: eta must be a real number, got str '0.5'
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} must be a concrete number here (it sets the program's "
                        "structure), got a traced value")  # fmt: skip
    numeric = isinstance(value, numbers.Real) or (
        isinstance(value, (jax.Array, np.ndarray, np.generic))
        and (np.issubdtype(value.dtype, np.number) or value.dtype == jnp.bfloat16)
    )
    if isinstance(value, (bool, np.bool_)) or not numeric or np.ndim(value) != 0:
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} "
                        f"{value!r}") from None  # fmt: skip
    finite = "" if allow_inf else "finite "
    rng = _range_text(lo, hi, lo_open, hi_open)
    want = f"{name} must be a {finite}number" + (f" {rng}" if rng else "")
    if math.isnan(v) or (math.isinf(v) and not allow_inf):
        raise ValueError(f"{want}, got {v}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{want}, got {v}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{want}, got {v}")
    return v


def real(name: str, value, **bounds) -> jax.Array:
    """A numeric hyperparameter as a traced-friendly scalar leaf, checked when concrete.

    Takes the keyword bounds of :func:`number`. Concrete values become weakly typed
    scalars (default float dtype); a tracer (under ``jit``/``grad``) is returned as is.

    >>> real("radius", 0.5, lo=0, lo_open=True)
    Array(0.5, dtype=float32, weak_type=True)
    >>> real("radius", 0.0, lo=0, lo_open=True)
    Traceback (most recent call last):
    ...
    ValueError: radius must be a finite number > 0, got 0.0
    """
    if isinstance(value, jax.core.Tracer):
        if np.ndim(value) != 0:
            raise ValueError(f"{name} must be a scalar, got shape {np.shape(value)}")
        return value
    return jnp.asarray(number(name, value, **bounds))


def boolean(name: str, value) -> bool:
    """A Python bool (NumPy bools accepted; ints and strings refused).

    >>> boolean("heun", True)
    True
    """
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def choice(name: str, value, options: Sequence):
    """``value`` if it is one of ``options``.

    >>> choice("space", "x_t", ("x0_hat", "x_t"))
    'x_t'
    """
    if not isinstance(value, str) or value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")
    return value


def process(name: str, value, attrs=("alpha", "sigma")):
    """``value`` if it is a process (a schedule) with the callable attributes ``attrs``;
    a schedule factory passed uncalled is named as such.

    >>> from jaxdiv import schedules
    >>> process("schedule", schedules.edm)
    Traceback (most recent call last):
    ...
    TypeError: schedule must be a process such as schedules.edm() (with alpha, sigma), got the function edm: call it, e.g. edm()
    """  # noqa: E501
    if all(callable(getattr(value, a, None)) for a in attrs):
        return value
    what = (f"the function {value.__name__}: call it, e.g. {value.__name__}()"
            if callable(value) and hasattr(value, "__name__")
            else f"{type(value).__name__} {value!r}")  # fmt: skip
    raise TypeError(f"{name} must be a process such as schedules.edm() (with "
                    f"{', '.join(attrs)}), got {what}")  # fmt: skip


def function(name: str, value, what: str):
    """``value`` if callable; ``what`` describes the expected signature.

    >>> function("encoder", len, "x0_hat -> (B, m)") is len
    True
    """
    if not callable(value):
        raise TypeError(f"{name} must be callable {what}, got {type(value).__name__}")
    return value


def finite_array(name: str, value, ndim: int | None = None, min_ndim: int | None = None):
    """``value`` as a floating JAX array, shape-checked; NaN/inf refused when concrete.

    >>> finite_array("reference", np.zeros((3, 2)), ndim=2).shape
    (3, 2)
    >>> finite_array("noise", jnp.array([jnp.nan], jnp.bfloat16))
    Traceback (most recent call last):
    ...
    ValueError: noise contains NaN or inf values
    """
    if not hasattr(value, "shape") and not isinstance(value, (list, tuple, int, float)):
        raise TypeError(f"{name} must be an array, got {type(value).__name__}")
    if isinstance(value, jax.core.Tracer):
        arr = value
    else:
        host = np.asarray(value)
        if host.dtype == object or not (
            np.issubdtype(host.dtype, np.number) or host.dtype == jnp.bfloat16
        ):  # bf16 arrays are checked below like any float
            raise TypeError(f"{name} must be a numeric array, got dtype {host.dtype}")
        floating = np.issubdtype(host.dtype, np.inexact) or host.dtype == jnp.bfloat16
        if floating and not np.all(np.isfinite(host)):
            raise ValueError(f"{name} contains NaN or inf values")
        arr = jnp.asarray(value)
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        arr = arr.astype(jnp.result_type(float))
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    if min_ndim is not None and arr.ndim < min_ndim:
        raise ValueError(f"{name} must have >= {min_ndim} dimensions, got shape "
                         f"{tuple(arr.shape)}")  # fmt: skip
    return arr


def prng_key(name: str, value):
    """``value`` if it is one PRNG key: a typed key of shape ``()`` (``jax.random.key``) or
    the raw ``uint32`` data of one (``jax.random.PRNGKey``); a seed or a batch of keys is
    refused.

    >>> prng_key("key", jax.random.key(0)).shape
    ()
    >>> prng_key("key", jax.random.split(jax.random.key(0), 4))
    Traceback (most recent call last):
    ...
    ValueError: key must be one PRNG key (jax.random.key(seed)), got a batch of keys of shape (4,)
    """
    dtype = getattr(value, "dtype", None)
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if value.shape != ():
            raise ValueError(f"{name} must be one PRNG key (jax.random.key(seed)), got a batch "
                             f"of keys of shape {tuple(value.shape)}")  # fmt: skip
        return value
    if dtype is not None and dtype == jnp.uint32 and jnp.ndim(value) == 1:
        want = jax.random.key_data(jax.random.key(0)).shape  # the default implementation's
        if tuple(jnp.shape(value)) != want:
            raise ValueError(f"{name} holds raw key data of shape {tuple(jnp.shape(value))}, "
                             f"but the PRNG implementation's keys have shape {want} (use "
                             "jax.random.key(seed))")  # fmt: skip
        return value
    what = f"{type(value).__name__} {value!r}" if dtype is None else (
        f"an array of dtype {dtype} and shape {tuple(jnp.shape(value))}")  # fmt: skip
    raise TypeError(f"{name} must be a PRNG key (jax.random.key(seed)), got {what}")
