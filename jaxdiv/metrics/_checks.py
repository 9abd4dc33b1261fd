"""Eager input checks shared by the metric wrappers.

Every public metric is a thin Python wrapper around a jitted core. The wrapper checks
shapes always (shapes are static, so this also works under an outer ``jit``/``vmap``)
and checks values (NaN/inf, zero rows, PSD-ness, ...) only when the inputs are concrete,
because a traced value cannot be inspected without a host round trip.

NumPy inputs are checked on the host with NumPy (no compilation); JAX arrays are checked
with one small jitted reduction, so their data never leaves the device.
"""

from __future__ import annotations

import math
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.dtypes import working_dtype

# one definition for the whole library; metric modules reach it as ``_checks.is_concrete``
from jaxdiv.validation import is_concrete


def as_float_array(x, name: str):
    """Return ``x`` as a floating array (NumPy stays NumPy, JAX stays JAX) or raise a
    TypeError naming ``name``."""
    if isinstance(x, jax.Array):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise TypeError(f"`{name}` must be an array of numbers; got {type(x).__name__}."
                            ) from err
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)
            or arr.dtype == np.bool_ or arr.dtype == jnp.bfloat16):
        raise TypeError(f"`{name}` must have a real numeric dtype; got dtype {arr.dtype}.")
    dtype = working_dtype(arr)
    return arr if arr.dtype == dtype else arr.astype(dtype)


def check_ndim(x, name: str, ndim: int, what: str) -> None:
    """Raise a ValueError unless ``x.ndim == ndim``; ``what`` names the expected layout."""
    if x.ndim != ndim:
        raise ValueError(f"`{name}` must be a {ndim}-D array of shape {what}; "
                         f"got shape {tuple(x.shape)}.")


def check_min_rows(x, name: str, minimum: int, why: str) -> None:
    """Raise a ValueError unless ``x`` has at least ``minimum`` rows."""
    if x.shape[0] < minimum:
        raise ValueError(f"`{name}` needs at least {minimum} samples ({why}); "
                         f"got {x.shape[0]}.")


def check_same_dim(a, name_a: str, b, name_b: str) -> None:
    """Raise a ValueError unless the last (feature) dimensions of ``a`` and ``b`` agree."""
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"`{name_a}` and `{name_b}` must have the same feature dimension; "
                         f"got {a.shape[-1]} for `{name_a}` and {b.shape[-1]} for `{name_b}`.")


@jax.jit
def _device_summary(x):
    zero_rows = jnp.sum(jnp.all(x == 0, axis=-1)) if x.ndim == 2 else jnp.array(0)
    return jnp.sum(~jnp.isfinite(x)), zero_rows


def _summary(x) -> tuple[int, int]:
    """(number of non-finite entries, number of all-zero rows) of a concrete array."""
    if isinstance(x, jax.Array):
        bad, zero = _device_summary(x)
        return int(bad), int(zero)
    bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
    zero = int(np.count_nonzero(~x.any(axis=-1))) if x.ndim == 2 else 0
    return bad, zero


def check_values(x, name: str, *, nonzero_rows: bool = False) -> None:
    """For concrete ``x``: raise on NaN/inf, and on all-zero rows if ``nonzero_rows``."""
    if not is_concrete(x):
        return
    bad, zero = _summary(x)
    if bad:
        raise ValueError(f"`{name}` contains {bad} non-finite value(s) (NaN or inf); "
                         "metrics need finite features.")
    if nonzero_rows and zero:
        raise ValueError(f"`{name}` has {zero} all-zero row(s); cosine similarity / the unit "
                         "sphere are undefined for zero vectors.")


def check_features(x, name: str, *, min_rows: int = 1, why: str = "",
                   nonzero_rows: bool = False):
    """Validate an (n, d) feature matrix and return it as a floating array."""
    arr = as_float_array(x, name)
    check_ndim(arr, name, 2, "(num_samples, num_features)")
    if arr.shape[1] == 0:
        raise ValueError(f"`{name}` must have at least one feature column; got shape "
                         f"{tuple(arr.shape)}.")
    check_min_rows(arr, name, min_rows, why or f"at least {min_rows} required")
    check_values(arr, name, nonzero_rows=nonzero_rows)
    return arr


def common_dtype(*arrays) -> np.dtype:
    """The floating dtype all ``arrays`` are promoted to."""
    return working_dtype(jnp.result_type(*[a.dtype for a in arrays]))


def check_int(value, name: str, minimum: int) -> int:
    """Return ``value`` as a Python int >= ``minimum`` or raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"`{name}` must be a Python int; got {type(value).__name__}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}; got {value}.")
    return int(value)


def check_order(q) -> float:
    """Validate a Renyi order q in (0, inf] (a static Python number) and return it."""
    if isinstance(q, str) and q.lower() == "inf":
        return math.inf
    if isinstance(q, bool) or not isinstance(q, Real):
        raise TypeError(f"`q` must be a Python number in (0, inf]; got {type(q).__name__}.")
    q = float(q)
    if math.isnan(q) or not q > 0:
        raise ValueError(f"`q` must be in (0, inf]; got {q}.")
    return q


def check_positive_scalar(value, name: str) -> None:
    """For concrete ``value``, raise unless it is a finite number > 0."""
    if value is None or not is_concrete(value):
        return
    v = np.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"`{name}` must be a scalar; got shape {v.shape}.")
    if not np.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be a finite number > 0; got {v}.")


@jax.jit
def _device_asymmetry(x):
    return jnp.max(jnp.abs(x - x.T)), jnp.max(jnp.abs(x))


def check_symmetric(x, name: str, rtol: float) -> None:
    """For concrete square ``x``: raise unless ``max|x - x^T| <= rtol * max|x|``."""
    if not is_concrete(x):
        return
    if isinstance(x, jax.Array):
        asym, scale = (float(v) for v in _device_asymmetry(x))
    else:
        asym, scale = float(np.max(np.abs(x - x.T))), float(np.max(np.abs(x)))
    if asym > rtol * max(scale, 1e-30):
        raise ValueError(f"`{name}` must be symmetric; max |{name} - {name}^T| is {asym:.3g} "
                         f"for max |{name}| {scale:.3g}.")


# metric -> its eager input check, run by ``groupwise`` on each group before ``vmap``
_GROUP_CHECKS: dict = {}


def register_group_check(metric, check) -> None:
    """Register ``check(*group_args, **kwargs)``, the eager (value) checks ``metric``
    makes on its inputs, so :func:`jaxdiv.metrics.groupwise` can run them on each group's
    concrete rows before it ``vmap``s the metric (under ``vmap`` the values are traced and
    the metric's own checks cannot see them)."""
    _GROUP_CHECKS[metric] = check


def group_check_for(metric):
    """``(check, bound_kwargs)`` for ``metric`` (also through ``functools.partial``), or
    ``(None, {})`` when it has no registered check."""
    kwargs = {}
    while hasattr(metric, "func") and hasattr(metric, "keywords") and not getattr(
            metric, "args", ()):  # fmt: skip
        kwargs = {**metric.keywords, **kwargs}
        metric = metric.func
    try:
        return _GROUP_CHECKS.get(metric), kwargs
    except TypeError:  # unhashable callable
        return None, {}
