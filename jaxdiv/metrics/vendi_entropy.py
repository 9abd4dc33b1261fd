"""Vendi score: the exponential of the (Renyi) entropy of a similarity kernel's spectrum.

Friedman & Dieng, "The Vendi Score" (TMLR 2023), Eq. 1 and the order-q family of
Pasarkar & Dieng (2024): ``VS_q(K) = exp(H_q(eig(K / n)))`` for a PSD kernel ``K`` with
unit diagonal, ``H_1`` the Shannon entropy, ``H_q = log(sum p^q) / (1 - q)`` and
``H_inf = -log max p``.

Differences from the reference ``vendi_score`` package, all intentional:

* ``vendi_score.vendi.score_X`` silently ignores its ``q`` argument (it calls
  ``score_K(K, q=1)``); here ``q`` is always honoured. Tests compare against its
  ``score_K`` / ``score_dual``, which do pass ``q`` through.
* The spectrum is divided by its sum (the weighted trace of ``K``). For a kernel with
  unit diagonal this is exactly ``eig(K / n)``; for other kernels it keeps the spectrum a
  probability vector, so the entropy stays meaningful.
* Eigenvalues below ``ROUND_OFF_ULPS * eps * max(p)`` count as zero: symmetric
  eigensolvers' round-off (a few ``eps * max(p)``, which ``p ** q`` would inflate for
  ``q < 1``: a duplicated set would score above 1). ``numpy.linalg.matrix_rank``'s
  ``m * eps * max(p)`` was used before; at CLIP-like widths it also cut real eigenvalues
  (``tests/test_metrics_vendi.py::test_a_long_tail_of_small_eigenvalues_counts``: on its
  768-D set the old cut gave 24.0 and 29.2 for q = 1 and 0.5, the reference 25.6 and
  54.3).
* The entropy has a custom derivative (``dH = tr(V diag(dH/dp) V^T dK)``) that stays finite
  when eigenvalues are repeated, e.g. for duplicated or orthogonal samples, where the
  generic ``eigh`` derivative divides by eigenvalue gaps. This is what makes ``log_vendi``
  usable as a loss (contextual-space repulsion).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.metrics import _checks
from jaxdiv.sphere import pow2_inverse_scale, unit

Kernel = str | Callable[[jax.Array, jax.Array], jax.Array]

_NAMED_KERNELS = ("cosine", "rbf")


def _order_mode(q: float) -> str:
    """Static branch of the entropy: Shannon and min-entropy have their own formulas; every
    other order shares one compiled program with q as a traced value."""
    if q == 1.0:
        return "shannon"
    return "min" if math.isinf(q) else "renyi"


#: eigenvalues below ``-NOT_PSD_ULPS * n * eps * max |lam|`` are not round-off: the kernel
#: is not positive semidefinite, and the score is NaN rather than that of a clipped spectrum
NOT_PSD_ULPS = 100
#: positive eigenvalues below ``ROUND_OFF_ULPS * eps * max(p)`` are the eigensolver's
#: round-off (measured at 3-5 eps * max(p) in float32), counted as zero
ROUND_OFF_ULPS = 32


def _entropy_of_spectrum(lam: jax.Array, q, mode: str) -> jax.Array:
    """Renyi entropy of order ``q`` of ``lam / sum(lam)`` (round-off negatives clipped; a
    clearly negative eigenvalue, a kernel that is not PSD, gives NaN)."""
    reach = jnp.max(jnp.abs(lam), axis=-1) * lam.shape[-1] * jnp.finfo(lam.dtype).eps
    not_psd = jnp.min(lam, axis=-1) < -NOT_PSD_ULPS * reach
    lam = jnp.maximum(lam, 0.0)
    p = lam / jnp.sum(lam, axis=-1, keepdims=True)
    eps = jnp.finfo(p.dtype).eps
    tol = jnp.max(p, axis=-1, keepdims=True) * ROUND_OFF_ULPS * eps
    keep = p > tol
    # Double-where: the discarded branch must not produce NaN gradients via log(0).
    p_safe = jnp.where(keep, p, 1.0)
    if mode == "shannon":
        h = -jnp.sum(jnp.where(keep, p_safe * jnp.log(p_safe), 0.0), axis=-1)
    elif mode == "min":
        h = -jnp.log(jnp.max(p, axis=-1))
    else:
        h = jnp.log(jnp.sum(jnp.where(keep, p_safe**q, 0.0), axis=-1)) / (1.0 - q)
    # NaN features (unchecked under jit) must not turn into a plausible score via `keep`.
    return jnp.where(jnp.any(jnp.isnan(p), axis=-1) | not_psd, jnp.nan, h)


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _spectral_entropy(m: jax.Array, q, mode: str) -> jax.Array:
    return _entropy_of_spectrum(jnp.linalg.eigvalsh(m), q, mode)


@_spectral_entropy.defjvp
def _spectral_entropy_jvp(mode, primals, tangents):
    # A spectral function F(M) = h(eig(M)) has dF = sum_i h'(lam_i) v_i^T dM v_i, which is
    # basis-independent inside degenerate eigenspaces, unlike eigh's eigenvector derivative.
    # The order q is a hyperparameter: no derivative is propagated to it.
    (m, q), (dm, _) = primals, tangents
    lam, vecs = jnp.linalg.eigh(m)
    value, grad_lam = jax.value_and_grad(_entropy_of_spectrum)(lam, q, mode)
    dm = 0.5 * (dm + jnp.swapaxes(dm, -1, -2))
    dlam = jnp.einsum("ji,jk,ki->i", vecs, dm, vecs)
    return value, jnp.sum(grad_lam * dlam)


_unit_rows = unit  # scales each row by its max |entry| first: no overflow / underflow

# The median heuristic looks at the pairs of at most this many rows (chosen with a fixed
# key when n is larger), so its cost is bounded whatever n: a (1024, 1024) tile.
MEDIAN_MAX_ROWS = 1024
_MEDIAN_SEED = 0

# Kernels without a (d, d) dual form ("rbf", callables) need the (n, n) kernel matrix and
# its eigendecomposition: O(n^2) memory and O(n^3) time. Larger n is refused with a clear
# error rather than left to run out of memory (measured: README "What fits").
MAX_KERNEL_SAMPLES = 8192


def _scale(*xs) -> jax.Array:
    """A power of two near the largest absolute entry of ``xs`` (1 if all are zero), a
    constant for gradients: dividing by it is exact and keeps squared distances within
    float range for features of norm 1e20 or 1e-25."""
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x)) for x in xs]))
    return 1.0 / pow2_inverse_scale(m)


def _pairwise_sq_dists(x: jax.Array, y: jax.Array) -> jax.Array:
    """Squared Euclidean distances ``|x_i - y_j|^2`` via the Gram expansion, clipped at 0;
    values within the expansion's round-off (``~ sqrt(d) eps (|x_i|^2 + |y_j|^2)``) are
    exactly 0, so identical rows are at distance 0."""
    xx, yy = jnp.sum(x * x, -1)[:, None], jnp.sum(y * y, -1)[None, :]
    d2 = xx + yy - 2.0 * x @ y.T
    tol = 4.0 * math.sqrt(x.shape[-1]) * jnp.finfo(d2.dtype).eps
    return jnp.where(d2 <= tol * (xx + yy), 0.0, d2)


def _median_rows(x: jax.Array) -> jax.Array:
    """At most :data:`MEDIAN_MAX_ROWS` rows of ``x``: all of them, or a subset chosen
    without replacement by ``jax.random.key(_MEDIAN_SEED)`` (deterministic)."""
    n = x.shape[0]
    if n <= MEDIAN_MAX_ROWS:
        return x
    idx = jax.random.choice(jax.random.key(_MEDIAN_SEED), n, (MEDIAN_MAX_ROWS,), replace=False)
    return x[idx]


def _median_bandwidth(x: jax.Array) -> jax.Array:
    """Median heuristic, made robust: the median of the **non-zero** pairwise Euclidean
    distances ``|x_i - x_j|`` (``i < j``), or 1 when every pair coincides.

    Zero distances (duplicated samples) are left out, so a batch that has mostly
    collapsed still gets a finite bandwidth (the plain median would be 0 and the kernel
    0/0); when all samples are identical any bandwidth gives the all-ones kernel (Vendi
    1, MMD 0), and 1 is used. For ``n > MEDIAN_MAX_ROWS`` the pairs are those of
    ``MEDIAN_MAX_ROWS`` rows chosen with a fixed key (an unbiased U-statistic estimate,
    O(1024^2) memory instead of O(n^2)). The rows are centred and scaled by the largest
    entry first, so features of norm 1e20 or 1e-25 neither overflow nor underflow. A constant
    for gradients.
    """
    x = _median_rows(x)
    x = x - jnp.mean(x, axis=0)  # distances are translation-invariant; less cancellation
    s = _scale(x)
    xs = x / s
    n = xs.shape[0]
    d2 = _pairwise_sq_dists(xs, xs)[np.triu_indices(n, 1)]
    nz = d2 > 0
    k = jnp.sum(nz)
    d = jnp.sort(jnp.where(nz, jnp.sqrt(jnp.where(nz, d2, 1.0)), jnp.inf))
    lo = d[jnp.maximum((k - 1) // 2, 0)]
    hi = d[jnp.maximum(k // 2, 0)]
    med = jnp.where(k > 0, 0.5 * (lo + jnp.where(k > 1, hi, lo)) * s, 1.0)
    return jax.lax.stop_gradient(med.astype(x.dtype))


def _rbf_gram(x: jax.Array, y: jax.Array, bandwidth) -> jax.Array:
    """RBF kernel matrix ``exp(-|x_i - y_j|^2 / (2 h^2))``, computed on rows scaled by
    their largest entry (``|x_i - y_j| / h`` is scale-free), so it stays finite for
    features of norm 1e20 or 1e-25; coinciding rows give exactly 1."""
    centre = jnp.mean(x, axis=0)  # translation-invariant; less cancellation in the Gram
    x, y = x - centre, y - centre
    s = _scale(x, y)
    d2 = _pairwise_sq_dists(x / s, y / s)
    pos = ~(d2 <= 0)  # a NaN distance (NaN features under jit) stays NaN, not kernel 1
    r = jnp.sqrt(jnp.where(pos, d2, 1.0)) * (s / bandwidth)
    return jnp.where(pos, jnp.exp(-0.5 * r * r), 1.0)


def _weighted_kernel(k: jax.Array, weights) -> jax.Array:
    if weights is None:
        return k / k.shape[0]
    s = jnp.sqrt(weights)
    return k * s[:, None] * s[None, :]


def _kernel_matrix(x, kernel, bandwidth):
    if kernel == "cosine":
        z = _unit_rows(x)
        return z @ z.T
    if kernel == "rbf":
        h = _median_bandwidth(x) if bandwidth is None else bandwidth
        return _rbf_gram(x, x, h)
    k = jax.vmap(jax.vmap(kernel, in_axes=(None, 0)), in_axes=(0, None))(x, x)
    return 0.5 * (k + k.T)


@partial(jax.jit, static_argnames=("kernel", "mode"))
def _log_vendi_core(x, weights, bandwidth, q, *, kernel, mode):
    n, d = x.shape
    if weights is not None:
        weights = weights / jnp.sum(weights)
    if kernel == "cosine" and d < n:
        # Dual form: Z^T W Z (d x d) has the same non-zero spectrum as W^1/2 Z Z^T W^1/2.
        z = _unit_rows(x)
        zw = z / jnp.sqrt(n) if weights is None else z * jnp.sqrt(weights)[:, None]
        m = zw.T @ zw
    else:
        m = _weighted_kernel(_kernel_matrix(x, kernel, bandwidth), weights)
    return _spectral_entropy(m, q, mode)


@partial(jax.jit, static_argnames=("mode",))
def _log_vendi_from_kernel_core(k, weights, q, *, mode):
    if weights is not None:
        weights = weights / jnp.sum(weights)
    return _spectral_entropy(_weighted_kernel(0.5 * (k + k.T), weights), q, mode)


def _renyi_q(q: float, x):
    # Only the general-order branch reads q; the others get a fixed dummy so that they do
    # not recompile per q. A scalar of the working dtype keeps float32 inputs in float32.
    return np.asarray(q if _order_mode(q) == "renyi" else 2.0, dtype=x.dtype)


def _check_weights(weights, n: int):
    if weights is None:
        return None
    w = _checks.as_float_array(weights, "weights")
    if w.shape != (n,):
        raise ValueError(f"`weights` must have shape ({n},), one weight per sample; "
                         f"got shape {tuple(w.shape)}.")
    _checks.check_values(w, "weights")
    if _checks.is_concrete(w):
        wn = np.asarray(w)
        if (wn < 0).any() or wn.sum() <= 0:
            raise ValueError("`weights` must be non-negative with a positive sum; got min "
                             f"{wn.min()} and sum {wn.sum()}.")
    return w


def _check_kernel(kernel):
    if isinstance(kernel, str):
        if kernel not in _NAMED_KERNELS:
            raise ValueError(f"`kernel` must be one of {_NAMED_KERNELS} or a callable "
                             f"k(x, y) -> scalar; got {kernel!r}.")
    elif not callable(kernel):
        raise TypeError("`kernel` must be 'cosine', 'rbf' or a callable k(x, y) -> scalar; "
                        f"got {type(kernel).__name__}.")
    return kernel


def check_kernel_size(n: int, kernel) -> None:
    """Refuse an (n, n) kernel eigendecomposition beyond :data:`MAX_KERNEL_SAMPLES`.

    The cosine kernel with fewer features than samples uses the (d, d) dual and has no
    limit; ``"rbf"`` and callable kernels (and cosine with d >= n) need the (n, n)
    matrix: ``4 n^2`` bytes plus ``eigh``'s workspace, and O(n^3) time.

    Example:
      >>> check_kernel_size(100, "rbf")
      >>> check_kernel_size(50_000, "rbf")
      Traceback (most recent call last):
      ...
      ValueError: `X` has n=50000 samples; kernel='rbf' needs the (n, n) kernel matrix (9.31 GiB in float32) and its O(n^3) eigendecomposition, and jaxdiv refuses n > MAX_KERNEL_SAMPLES=8192. Use kernel='cosine' (a (d, d) dual form when d < n, any n), score a random subset of rows, or pass a precomputed low-rank kernel to vendi_from_kernel.
    """  # noqa: E501
    if n > MAX_KERNEL_SAMPLES:
        gib = 4.0 * n * n / 2**30
        name = kernel if isinstance(kernel, str) else getattr(kernel, "__name__", "callable")
        raise ValueError(
            f"`X` has n={n} samples; kernel={name!r} needs the (n, n) kernel matrix "
            f"({gib:.2f} GiB in float32) and its O(n^3) eigendecomposition, and jaxdiv "
            f"refuses n > MAX_KERNEL_SAMPLES={MAX_KERNEL_SAMPLES}. Use kernel='cosine' (a "
            "(d, d) dual form when d < n, any n), score a random subset of rows, or pass a "
            "precomputed low-rank kernel to vendi_from_kernel."
        )


def _vendi_impl(X, kernel, q, weights, bandwidth, exponentiate):
    kernel, q, x, w = _vendi_inputs(X, kernel, q, weights, bandwidth)
    h = _log_vendi_core(x, w, bandwidth if kernel == "rbf" else None, _renyi_q(q, x),
                        kernel=kernel, mode=_order_mode(q))
    if callable(kernel):
        _refuse_not_psd(h, x, "the callable kernel's matrix on X")
    return jnp.exp(h) if exponentiate else h


def _refuse_not_psd(h, finite_input, what: str) -> None:
    """A concrete NaN score from finite input means a spectrum with a clearly negative
    eigenvalue: say so (under jit the NaN stands)."""
    if (_checks.is_concrete(h) and _checks.is_concrete(finite_input) and bool(jnp.isnan(h))
            and bool(jnp.isfinite(finite_input).all())):  # fmt: skip
        raise ValueError(f"{what} is not positive semidefinite with a positive trace (an "
                         f"eigenvalue below -{NOT_PSD_ULPS} n eps max|eig|, or none above "
                         "0); the Vendi score needs a PSD similarity matrix with k(x, x) > "
                         "0")  # fmt: skip


def _vendi_inputs(X, kernel="cosine", q=1.0, weights=None, bandwidth=None):
    kernel = _check_kernel(kernel)
    q = _checks.check_order(q)
    x = _checks.check_features(X, "X", nonzero_rows=kernel == "cosine")
    w = _check_weights(weights, x.shape[0])
    if kernel == "rbf":
        _checks.check_positive_scalar(bandwidth, "bandwidth")
        if bandwidth is None:
            _checks.check_min_rows(x, "X", 2, "the median bandwidth needs a pair")
    if kernel != "cosine" or x.shape[1] >= x.shape[0]:
        check_kernel_size(x.shape[0], kernel)
    return kernel, q, x, w


def log_vendi(X, kernel: Kernel = "cosine", q: float = 1.0, weights=None,
              bandwidth=None) -> jax.Array:
    """Log Vendi score: the order-q entropy of the normalised kernel spectrum.

    Differentiable (with a derivative that stays finite for duplicated samples), so it
    can be maximised directly, as contextual-space repulsion does with the cosine kernel
    over flattened text tokens. With ``kernel="cosine"`` and fewer features than samples
    the (d x d) dual matrix ``Z^T Z / n`` is used, so n = 50k costs O(n d^2). The RBF and
    callable kernels need the (n x n) matrix and are refused beyond
    ``MAX_KERNEL_SAMPLES`` (8192) samples with an error saying so.

    Implements Friedman & Dieng (2023) Eq. 1 (log of it), Renyi order q as in
    Pasarkar & Dieng (2024).

    Args:
      X: (n, d) features.
      kernel: ``"cosine"`` (rows are L2-normalised, zero rows are an error), ``"rbf"``
        (``exp(-|x - y|^2 / (2 h^2))``) or a callable ``k(x, y) -> scalar`` on single
        feature vectors (a static argument under ``jit``: pass the same function object
        to avoid recompiling).
      q: Renyi order in (0, inf]; 1 is Shannon, ``math.inf`` is ``-log max p``.
      weights: optional (n,) non-negative sample weights, normalised to sum to one.
      bandwidth: RBF bandwidth h; ``None`` uses the median of the non-zero pairwise
        distances (1 if all samples coincide; over the pairs of 1024 rows chosen with a
        fixed key when n > 1024; a constant for gradients), so a collapsed batch scores
        a finite Vendi near 1. Ignored by the other kernels.

    Returns:
      Scalar entropy; ``exp`` of it is the Vendi score.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> float(metrics.log_vendi(jnp.eye(4)))  # log(4)
      1.386...
    """
    return _vendi_impl(X, kernel, q, weights, bandwidth, exponentiate=False)


def vendi(X, kernel: Kernel = "cosine", q: float = 1.0, weights=None,
          bandwidth=None) -> jax.Array:
    """Vendi score of a set of feature vectors: the effective number of distinct samples.

    ``1 <= vendi <= n``; identical samples give 1, n mutually orthogonal samples give n.
    See :func:`log_vendi` for the arguments (same meaning) and the dual (d x d) form used
    automatically for the cosine kernel when d < n.

    Implements Friedman & Dieng (2023) Eq. 1: ``exp(H_q(eig(K / n)))``.

    Args:
      X: (n, d) features.
      kernel: ``"cosine"``, ``"rbf"`` or a callable ``k(x, y) -> scalar``.
      q: Renyi order in (0, inf].
      weights: optional (n,) non-negative sample weights.
      bandwidth: RBF bandwidth (``None``: median heuristic).

    Returns:
      Scalar Vendi score.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> X = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 3.0]])
      >>> round(float(metrics.vendi(X)), 4)  # two identical directions + one orthogonal
      1.8899
    """
    return _vendi_impl(X, kernel, q, weights, bandwidth, exponentiate=True)


def _from_kernel_impl(K, q, weights, exponentiate):
    q = _checks.check_order(q)
    k = _checks.as_float_array(K, "K")
    if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] == 0:
        raise ValueError(f"`K` must be a square (n, n) kernel matrix; got shape "
                         f"{tuple(k.shape)}.")
    _checks.check_values(k, "K")
    _checks.check_symmetric(k, "K", rtol=1e-4)
    w = _check_weights(weights, k.shape[0])
    h = _log_vendi_from_kernel_core(k, w, _renyi_q(q, k), mode=_order_mode(q))
    _refuse_not_psd(h, k, "`K`")
    return jnp.exp(h) if exponentiate else h


def log_vendi_from_kernel(K, q: float = 1.0, weights=None) -> jax.Array:
    """Log Vendi score from a precomputed (n, n) PSD similarity matrix.

    The spectrum of ``W^1/2 K W^1/2`` (``W = diag(weights)``, default ``1/n``) is divided by
    its sum, which equals ``eig(K / n)`` for a unit-diagonal ``K``.

    Implements Friedman & Dieng (2023) Eq. 1 (log of it).

    Args:
      K: (n, n) symmetric positive semi-definite similarity matrix (unit diagonal).
      q: Renyi order in (0, inf].
      weights: optional (n,) non-negative sample weights, normalised to sum to one.

    Returns:
      Scalar entropy.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> abs(float(metrics.log_vendi_from_kernel(jnp.ones((3, 3))))) < 1e-6  # 3 duplicates
      True
    """
    return _from_kernel_impl(K, q, weights, exponentiate=False)


def vendi_from_kernel(K, q: float = 1.0, weights=None) -> jax.Array:
    """Vendi score from a precomputed (n, n) PSD similarity matrix with unit diagonal.

    Implements Friedman & Dieng (2023) Eq. 1: ``exp(H_q(eig(K / n)))``; ``q=math.inf``
    gives ``1 / max eig(K / n)``.

    Args:
      K: (n, n) symmetric positive semi-definite similarity matrix.
      q: Renyi order in (0, inf].
      weights: optional (n,) non-negative sample weights, normalised to sum to one.

    Returns:
      Scalar Vendi score.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> K = jnp.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
      >>> round(float(metrics.vendi_from_kernel(K, q=1.0)), 4)
      2.1573
    """
    return _from_kernel_impl(K, q, weights, exponentiate=True)


_checks.register_group_check(vendi, _vendi_inputs)
_checks.register_group_check(log_vendi, _vendi_inputs)
