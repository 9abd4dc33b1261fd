"""Similarity-based scores: MSS, CLIP score and the Gram log-determinant."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxdiv.metrics import _checks
from jaxdiv.sphere import unit

_unit = unit  # overflow/underflow-safe row normalisation (features of norm 1e20 or 1e-25)


@jax.jit
def _mss_core(x):
    n = x.shape[0]
    s = jnp.sum(_unit(x), axis=0)
    # sum_{i,j} cos_ij = |sum_i x_i/|x_i||^2; removing the n diagonal ones leaves i != j.
    return (s @ s - n) / (n * (n - 1))


def mss(X) -> jax.Array:
    """Mean self-similarity: mean pairwise cosine similarity over pairs i != j.

    Computed in O(n d) from ``|sum_i x_i / |x_i||^2``, no (n, n) matrix. Lower means more
    diverse; evaluate it per prompt (see :func:`jaxdiv.metrics.groupwise`) as TPSO does.

    Implements the MSS of TPSO (arXiv 2511.19811), Sec. 5 metrics:
    ``1 / (n (n - 1)) sum_{i != j} cos(x_i, x_j)``.

    Args:
      X: (n, d) features of one group, n >= 2, no zero rows.

    Returns:
      Scalar in [-1/(n-1), 1].

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> float(metrics.mss(jnp.array([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])))  # (0+1+0)/3
      0.333...
    """
    return _mss_core(_mss_inputs(X))


def _mss_inputs(X):
    return _checks.check_features(X, "X", min_rows=2, why="pairs need two samples",
                                  nonzero_rows=True)  # fmt: skip


@partial(jax.jit, static_argnames=("reduce",))
def _clip_score_core(img, txt, *, reduce):
    cos = jnp.sum(_unit(img) * _unit(txt), axis=-1)
    score = 100.0 * jnp.maximum(cos, 0.0)
    return jnp.mean(score) if reduce else score


def clip_score(img_emb, txt_emb, reduce: bool = True) -> jax.Array:
    """CLIP score ``100 * max(cos(img, txt), 0)``, the torchmetrics / Hessel et al. scale.

    Papers differ: GASS tables report the raw cosine (e.g. 0.31), others 100x it (31);
    this function always returns the clipped 100x form. Guidance terms use the raw cosine.
    Each image is clamped, then averaged (Hessel et al.); torchmetrics clamps the mean, which
    differs only where some cosine is negative.

    Implements Hessel et al. (EMNLP 2021) CLIPScore Eq. 1 with w = 100 (torchmetrics'
    convention; the paper's w = 2.5 only rescales).

    Args:
      img_emb: (n, d) image embeddings.
      txt_emb: (n, d) matching text embeddings, or (d,) for one prompt shared by all.
      reduce: return the mean over the batch (True) or the (n,) per-sample scores.

    Returns:
      Scalar mean score, or (n,) scores.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> img = jnp.array([[1.0, 0.0], [-1.0, 0.0]])
      >>> metrics.clip_score(img, jnp.array([1.0, 0.0]), reduce=False).tolist()
      [100.0, 0.0]
    """
    img, txt = _clip_score_inputs(img_emb, txt_emb)
    return _clip_score_core(img, txt, reduce=bool(reduce))


def _clip_score_inputs(img_emb, txt_emb, reduce=True):
    img = _checks.check_features(img_emb, "img_emb", nonzero_rows=True)
    txt = _checks.as_float_array(txt_emb, "txt_emb")
    if txt.ndim == 1:
        txt = txt[None, :]
    if txt.ndim != 2 or txt.shape[0] not in (1, img.shape[0]):
        raise ValueError(f"`txt_emb` must have shape ({img.shape[0]}, d) or (d,); got shape "
                         f"{tuple(jnp.shape(txt_emb))}.")
    _checks.check_same_dim(img, "img_emb", txt, "txt_emb")
    _checks.check_values(txt, "txt_emb", nonzero_rows=True)
    dtype = _checks.common_dtype(img, txt)
    return img.astype(dtype), txt.astype(dtype)


@partial(jax.jit, static_argnames=("normalize",))
def _gram_logdet_core(x, *, normalize):
    if normalize:
        x = _unit(x)
    n, d = x.shape
    if n > d:  # rank(X X^T) <= d < n: the determinant is exactly zero
        return jnp.array(-jnp.inf, x.dtype)
    s = jnp.linalg.svd(x, compute_uv=False)
    # Numerical rank as in numpy.linalg.matrix_rank: s_min <= s_max * max(n, d) * eps.
    rank_deficient = s[-1] <= s[0] * max(n, d) * jnp.finfo(x.dtype).eps
    logdet = 2.0 * jnp.sum(jnp.log(jnp.where(rank_deficient, 1.0, s)))
    return jnp.where(rank_deficient, -jnp.inf, logdet)


def gram_logdet(X, normalize: bool = False) -> jax.Array:
    """Log-determinant of the Gram matrix ``X X^T`` (log squared hypervolume of the rows).

    Computed as ``2 sum log s_i`` from the singular values of X (no squaring of the
    condition number, unlike ``slogdet(X X^T)``); ``-inf`` when the rows are linearly
    dependent to working precision (numerical rank as ``numpy.linalg.matrix_rank``) and
    always when n > d.

    Implements the Gram determinant of GASS (ICML 2026) Prop. 4.1, ``det(E E^T)``, in logs.

    Args:
      X: (n, d) rows (embeddings).
      normalize: L2-normalise the rows first (unit-sphere embeddings, as in GASS).

    Returns:
      Scalar log det, possibly ``-inf``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> float(metrics.gram_logdet(jnp.array([[2.0, 0.0], [0.0, 3.0]])))  # log 36
      3.583...
      >>> float(metrics.gram_logdet(jnp.array([[1.0, 2.0], [2.0, 4.0]])))
      -inf
    """
    return _gram_logdet_core(_gram_logdet_inputs(X, normalize), normalize=bool(normalize))


def _gram_logdet_inputs(X, normalize=False):
    return _checks.check_features(X, "X", nonzero_rows=bool(normalize))


_checks.register_group_check(mss, _mss_inputs)
_checks.register_group_check(clip_score, _clip_score_inputs)
_checks.register_group_check(gram_logdet, _gram_logdet_inputs)
