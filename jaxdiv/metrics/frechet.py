"""Frechet distance between Gaussians fitted to feature sets (FID when the features are
Inception-v3 pool features).

``FD = |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al., NeurIPS 2017, Eq. 6;
Dowson & Landau 1982). The trace term uses only symmetric eigendecompositions, which
run on every JAX backend (``scipy.linalg.sqrtm``'s Schur method has no GPU kernel):
``tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(S1^(1/2) S2 S1^(1/2)))``, because
``S1 S2`` is similar to the PSD matrix ``S1^(1/2) S2 S1^(1/2)``.

Precision: concrete inputs are computed in float64 by default, inside a scoped
``jax.enable_x64(True)`` context (the global x64 flag is not touched), as pytorch-fid,
clean-fid and torchmetrics compute FID: in float32 the square-root trace of large
covariances is far off (a 100 x 512 set scored about -2 against itself,
``tests/test_metrics_frechet.py``; worse at FID's 2048 dimensions). This
is the one exception to :mod:`jaxdiv.dtypes`' rule. Traced inputs (inside ``jit``) use
their own dtype, at least float32; ``dtype=jnp.float64`` there needs x64 enabled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.dtypes import working_dtype
from jaxdiv.metrics import _checks


def _psd_sqrt(s):
    w, v = jnp.linalg.eigh(s)
    return (v * jnp.sqrt(jnp.maximum(w, 0.0))) @ v.T, w


def _psd_tol(s):
    # Round-off of a PSD (possibly rank-deficient) covariance, relative to its scale.
    return jnp.sqrt(jnp.finfo(s.dtype).eps) * jnp.maximum(jnp.max(jnp.abs(jnp.diag(s))), 1e-30)


def _cholesky_ok(s):
    # Cheaper than a second eigh: Cholesky of S + tol I fails (NaN) iff lambda_min < -tol.
    chol = jnp.linalg.cholesky(s + _psd_tol(s) * jnp.eye(s.shape[0], dtype=s.dtype))
    return jnp.all(jnp.isfinite(chol))


@jax.jit
def _frechet_core(mu1, s1, mu2, s2):
    s1 = 0.5 * (s1 + s1.T)
    s2 = 0.5 * (s2 + s2.T)
    root1, w1 = _psd_sqrt(s1)
    m = root1 @ s2 @ root1
    lam = jnp.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = jnp.sum(jnp.sqrt(jnp.maximum(lam, 0.0)))
    diff = mu1 - mu2
    fd = diff @ diff + jnp.trace(s1) + jnp.trace(s2) - 2.0 * tr_covmean
    return fd, jnp.min(w1) >= -_psd_tol(s1), _cholesky_ok(s2)


def _resolve_dtype(dtype, *arrays):
    if dtype is None:
        if _checks.is_concrete(*arrays):  # the module docstring: float64 by default
            return jnp.dtype(jnp.float64)
        # Same rule as jnp.asarray: float64 inputs become float32 unless x64 is enabled.
        return jax.dtypes.canonicalize_dtype(
            jnp.result_type(*[working_dtype(a) for a in arrays]))
    dt = jnp.dtype(dtype)
    if not jnp.issubdtype(dt, jnp.floating) or dt.itemsize < 4:
        raise ValueError(f"`dtype` must be float32 or float64; got {dt}.")
    return dt


def _check_cov(s, name, d):
    if s.shape != (d, d):
        raise ValueError(f"`{name}` must be a ({d}, {d}) covariance matrix matching the mean; "
                         f"got shape {tuple(s.shape)}.")


def _x64_scope(dtype, *arrays):
    """A context giving float64 when asked for; float64 under a foreign trace needs x64 on."""
    if jnp.dtype(dtype) != jnp.float64 or jax.config.jax_enable_x64:
        return _NullScope()
    if not _checks.is_concrete(*arrays):
        raise ValueError("`dtype=float64` needs concrete inputs (call it outside jit) or "
                         "jax_enable_x64 switched on; got traced inputs.")
    return jax.enable_x64(True)


class _NullScope:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _as_array(x, name):
    # Keep JAX arrays where they live (no device-to-host copy); lists etc. go via NumPy.
    arr = x if isinstance(x, jax.Array) else np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"`{name}` must be a real numeric array; got dtype {arr.dtype}.")
    return arr


def _raise_not_psd(name, s, dtype):
    s = np.asarray(s, np.float64)
    tol = np.sqrt(np.finfo(dtype).eps) * np.abs(np.diag(s)).max()
    raise ValueError(f"`{name}` must be positive semi-definite; its smallest eigenvalue is "
                     f"{np.linalg.eigvalsh(s)[0]:.4g}, below the round-off tolerance "
                     f"-sqrt(eps) * max|diag| = {-tol:.3g}.")


def frechet_distance(mu1, sigma1, mu2, sigma2, dtype=None) -> jax.Array:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

    Non-PSD covariances (an eigenvalue below ``-sqrt(eps) * max|diag|``) or non-symmetric
    ones raise a ValueError when the inputs are concrete. Tiny negative eigenvalues from
    round-off are clipped to zero.

    Implements Heusel et al. (2017) Eq. 6 with the trace term from symmetric
    eigendecompositions: ``tr (S1 S2)^(1/2) = sum sqrt(eig(S1^(1/2) S2 S1^(1/2)))``.

    Args:
      mu1: (d,) mean of the first Gaussian.
      sigma1: (d, d) covariance of the first Gaussian.
      mu2: (d,) mean of the second Gaussian.
      sigma2: (d, d) covariance of the second Gaussian.
      dtype: computation dtype; ``None``: float64 for concrete inputs (a scoped x64
        context; see the module docstring), the inputs' (at least float32) under ``jit``;
        ``jnp.float32`` asks for float32 (fast, but far off for 2048-D FID).

    Returns:
      Scalar distance (float64 when computed in float64).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> eye = jnp.eye(3)
      >>> float(metrics.frechet_distance(jnp.zeros(3), eye, jnp.array([1.0, 2.0, 2.0]), eye))
      9.0
    """
    mu1 = _as_array(mu1, "mu1")
    mu2 = _as_array(mu2, "mu2")
    sigma1 = _as_array(sigma1, "sigma1")
    sigma2 = _as_array(sigma2, "sigma2")
    if mu1.ndim != 1:
        raise ValueError(f"`mu1` must be a 1-D mean vector; got shape {tuple(mu1.shape)}.")
    d = mu1.shape[0]
    if mu2.shape != (d,):
        raise ValueError(f"`mu2` must have shape ({d},) like `mu1`; got {tuple(mu2.shape)}.")
    _check_cov(sigma1, "sigma1", d)
    _check_cov(sigma2, "sigma2", d)
    dt = _resolve_dtype(dtype, mu1, sigma1, mu2, sigma2)
    concrete = _checks.is_concrete(mu1, sigma1, mu2, sigma2)
    for a, name in ((mu1, "mu1"), (sigma1, "sigma1"), (mu2, "mu2"), (sigma2, "sigma2")):
        _checks.check_values(a, name)
    _checks.check_symmetric(sigma1, "sigma1", rtol=1e-5)
    _checks.check_symmetric(sigma2, "sigma2", rtol=1e-5)
    with _x64_scope(dt, mu1, sigma1, mu2, sigma2):
        args = [jnp.asarray(a, dtype=dt) for a in (mu1, sigma1, mu2, sigma2)]
        fd, ok1, ok2 = _frechet_core(*args)
        if concrete:
            for ok, name in ((ok1, "sigma1"), (ok2, "sigma2")):
                if not bool(ok):
                    _raise_not_psd(name, args[1] if name == "sigma1" else args[3], dt)
    return fd


@jax.jit
def _mean_cov(x):
    mu = jnp.mean(x, axis=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


def feature_statistics(X, dtype=None) -> tuple[jax.Array, jax.Array]:
    """Mean and unbiased (``ddof=1``, as ``numpy.cov``) covariance of (n, d) features.

    The Gaussian fit of Heusel et al. (2017) Sec. 3 (the statistics FID compares).

    Args:
      X: (n, d) features, n >= 2.
      dtype: computation dtype (``None``: float64 for concrete inputs, in a scoped x64
        context; the inputs' under ``jit``).

    Returns:
      ``(mu, sigma)`` with shapes (d,) and (d, d).

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> mu, sigma = metrics.feature_statistics(jnp.array([[0.0, 1.0], [2.0, 3.0]]))
      >>> mu.tolist(), sigma.tolist()
      ([1.0, 2.0], [[2.0, 2.0], [2.0, 2.0]])
    """
    x = _as_array(X, "X")
    if x.ndim != 2:
        raise ValueError(f"`X` must be a 2-D array of shape (num_samples, num_features); got "
                         f"shape {tuple(x.shape)}.")
    _checks.check_min_rows(x, "X", 2, "a covariance needs two samples")
    _checks.check_values(x, "X")
    dt = _resolve_dtype(dtype, x)
    with _x64_scope(dt, x):
        return _mean_cov(jnp.asarray(x, dtype=dt))


def frechet_distance_from_features(X, Y, dtype=None) -> jax.Array:
    """Frechet distance between Gaussians fitted to two feature sets (FID on Inception
    features).

    Implements Heusel et al. (2017) Eq. 6 on the statistics of :func:`feature_statistics`.

    Args:
      X: (n, d) first feature set, n >= 2.
      Y: (m, d) second feature set, m >= 2.
      dtype: computation dtype (``None``: float64 for concrete inputs, in a scoped x64
        context; the inputs' under ``jit``). In float32, rounding in a rank-deficient or
        ill-conditioned covariance's null space adds spurious eigenvalues that move the
        distance far off at FID's 2048 dimensions.

    Returns:
      Scalar distance.

    Example:
      >>> import jax
      >>> from jaxdiv import metrics
      >>> x = jax.random.normal(jax.random.key(0), (500, 4))
      >>> round(float(metrics.frechet_distance_from_features(x, x + 1.0)), 3)  # |dmu|^2 = 4
      4.0
    """
    x = _as_array(X, "X")
    y = _as_array(Y, "Y")
    for arr, name in ((x, "X"), (y, "Y")):
        if arr.ndim != 2:
            raise ValueError(f"`{name}` must be a 2-D array of shape (num_samples, "
                             f"num_features); got shape {tuple(arr.shape)}.")
    _checks.check_same_dim(x, "X", y, "Y")
    dt = _resolve_dtype(dtype, x, y)
    with _x64_scope(dt, x, y):
        mu1, s1 = feature_statistics(x, dtype=dt)
        mu2, s2 = feature_statistics(y, dtype=dt)
        for s, name in ((s1, "X"), (s2, "Y")):
            if _checks.is_concrete(s) and not bool(jnp.isfinite(s).all()):
                raise ValueError(f"`{name}`'s covariance overflows {jnp.dtype(dt).name} "
                                 f"(features of magnitude up to "
                                 f"{float(jnp.max(jnp.abs(x if name == 'X' else y))):.3g}); "
                                 "rescale the features or pass dtype=jnp.float64")  # fmt: skip
        return frechet_distance(mu1, s1, mu2, s2, dtype=dt)
