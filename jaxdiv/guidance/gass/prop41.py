"""Proposition 4.1 of GASS (Zhu et al., ICML 2026), stated and computed exactly.

Proposition 4.1, stated exactly (checked in ``tests/test_gass_prop41.py``; formulas in
:func:`expected_gram_det`). Let ``E`` be the ``(B, m)`` batch of unit embeddings,
``G = E E^T``, ``a_1 = e_t`` and ``a_2 = u_ind`` the (orthonormal) axes, ``s_k = r_k^2/3``
the variances of the uniform shifts, ``E[i <- v]`` the batch with row ``i`` replaced by
``v``, ``P_i`` the projector onto the orthogonal complement of the rows other than ``i``
and ``H_i = I - 2 e_i e_i^T``.

* **Without renormalisation the claim holds, for every B, with a closed form:**
  ``E det G~ = det G + sum_{i,k} s_k det Gram(E[i <- a_k])
  + 2 s_1 s_2 sum_{i<j} det Gram(E[i <- a_1, j <- a_2])``. Every added term is ``>= 0``,
  and for linearly independent rows (so ``B <= m``) with ``r_dep + r_ind > 0`` one is
  ``> 0`` (the spans of the leave-one-out subsets meet only in 0, so some ``a_k`` is
  outside one of them): ``E det G~ > det G`` strictly.
* **With renormalisation (the paper's default) it is false in general.** For an
  orthonormal batch (``B >= 2``) Hadamard's inequality gives ``det G~ < 1 = det G`` for
  almost every draw, not only on average; near-orthogonal batches decrease on average
  (B=8, m=64, r=0.02: ratio 0.99986 +- 0.000002 by Monte Carlo and by the formula below;
  PAPERS.md's draw: 0.9997), while a tight cluster around ``e_t`` (B=8, m=16, cosines
  about 0.9) increases (1.00533 +- 0.00003; both from
  ``python -m experiments.gass_toy --only-prop41``). For small radii
  ``E det G~ = det G + sum_{i,k} s_k det G_{-i} (|P_i H_i a_k|^2 - |P_i e_i|^2) + O(r^4)``,
  so the expectation increases exactly when that sum is positive: each term is positive
  when the reflected axis ``H_i a_k`` sticks out of the span of the other embeddings
  further than ``e_i`` itself does. Tight clusters (the embeddings of one prompt: small
  ``|P_i e_i|``) with ``u_ind`` outside the batch's span and ``r_ind > 0`` increase; an
  orthonormal batch has terms ``-|proj_{span E_{-i}} a_k|^2 <= 0`` and decreases.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from jaxdiv import validation

__all__ = ["GramExpectation", "expected_gram_det"]


class GramExpectation(NamedTuple):
    """Result of :func:`expected_gram_det` (float64).

    Attributes:
        det: ``det G`` of the (row-normalised) batch.
        expected: ``E det G~``: exact without renormalisation; ``det + change`` with
            renormalisation, whose error is ``O(r^4)``.
        change: ``expected - det``.
        coefficients: ``(B, 2)`` per-row, per-axis coefficients ``c_ik`` of ``s_k = r_k^2/3``
            in ``change``: ``det Gram(E[i <- a_k])`` without renormalisation,
            ``det Gram(E[i <- H_i a_k]) - |a_k|^2 det G`` with it.
    """

    det: float
    expected: float
    change: float
    coefficients: np.ndarray


def _gram_det(rows):
    return float(np.linalg.det(rows @ rows.T))


def _replaced(rows, idx, vecs):
    out = rows.copy()
    for i, v in zip(idx, vecs, strict=True):
        out[i] = v
    return out


def expected_gram_det(emb, axis_dep, axis_ind, r_dep=0.02, r_ind=0.02, renormalize=False):
    """Expected Gram determinant of a batch's GASS targets (Proposition 4.1, exactly).

    With ``s_k = r_k^2 / 3`` (the variance of ``U[-r_k, r_k]``), ``a_1 = axis_dep``,
    ``a_2 = axis_ind``, ``E[i <- v]`` the batch with row ``i`` replaced by ``v`` and
    ``H_i = I - 2 e_i e_i^T`` the reflection through ``e_i``'s orthogonal hyperplane:

    * ``renormalize=False`` (exact, every ``B``; cross terms vanish by multilinearity):
      ``E det G~ = det G + sum_i sum_k s_k det Gram(E[i <- a_k])
      + 2 s_1 s_2 sum_{i<j} det Gram(E[i <- a_1, j <- a_2])``.
    * ``renormalize=True`` (second order; odd orders vanish because the perturbations are
      symmetric, so the error is ``O(r^4)``): ``E det G~ = det G + sum_i sum_k s_k c_ik``,
      ``c_ik = det Gram(E[i <- H_i a_k]) - |a_k|^2 det G
      = det G_{-i} (|P_i H_i a_k|^2 - |a_k|^2 |P_i e_i|^2)``, ``P_i`` the projector onto
      the orthogonal complement of the other rows. For an orthonormal batch
      ``c_ik = -|proj_{span E_{-i}} a_k|^2 <= 0``.

    Computed in float64 NumPy (an analysis tool, not a hot path). Rows of ``emb`` are
    normalised first; the axes are used as given.

    GASS (ICML 2026) Proposition 4.1; the exact statement is in this module's docstring.

    Args:
        emb: ``(B, m)`` embeddings.
        axis_dep, axis_ind: ``(m,)`` the two axes (``e_t``, ``u_ind``).
        r_dep, r_ind: the radii.
        renormalize: whether the targets are renormalised.

    Returns:
        :class:`GramExpectation`.

    >>> import numpy as np
    >>> e = np.eye(3)[:2]                                    # orthonormal pair
    >>> out = expected_gram_det(e, np.eye(3)[0], np.eye(3)[2], 0.3, 0.3)
    >>> round(out.change, 4)                                 # 3 s + 2 s^2, s = 0.3^2 / 3
    0.0918
    >>> out = expected_gram_det(e, np.eye(3)[0], np.eye(3)[2], 0.3, 0.3, renormalize=True)
    >>> out.coefficients.tolist()                            # -|proj of a_k on the other row|^2
    [[0.0, 0.0], [-1.0, 0.0]]
    """
    e = np.asarray(emb, np.float64)
    if e.ndim != 2:
        raise ValueError(f"emb must have shape (B, m), got shape {e.shape}")
    axes = [np.asarray(a, np.float64) for a in (axis_dep, axis_ind)]
    for name, a in zip(("axis_dep", "axis_ind"), axes, strict=True):
        if a.shape != (e.shape[1],):
            raise ValueError(f"{name} must have shape (m,)=({e.shape[1]},), got {a.shape}")
    r_dep = validation.number("r_dep", r_dep, lo=0)
    r_ind = validation.number("r_ind", r_ind, lo=0)
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = np.array([r_dep**2 / 3.0, r_ind**2 / 3.0])
    b = e.shape[0]
    det = _gram_det(e)
    coef = np.zeros((b, 2))
    for i in range(b):
        for k, a in enumerate(axes):
            if renormalize:
                reflected = a - 2.0 * (e[i] @ a) * e[i]
                coef[i, k] = _gram_det(_replaced(e, [i], [reflected])) - (a @ a) * det
            else:
                coef[i, k] = _gram_det(_replaced(e, [i], [a]))
    change = float(np.sum(coef @ s))
    if not renormalize:
        change += (
            2.0
            * s[0]
            * s[1]
            * sum(_gram_det(_replaced(e, [i, j], axes)) for i in range(b) for j in range(i + 1, b))
        )
    return GramExpectation(det, float(det + change), float(change), coef)
