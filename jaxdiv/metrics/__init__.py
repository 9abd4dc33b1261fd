"""Diversity and fidelity metrics on feature arrays, all jit-able.

Every function takes features (e.g. CLIP / Inception / DINO embeddings) as arrays. Public
functions validate their inputs eagerly (shapes always; NaN/inf and PSD-ness only for
concrete inputs, since traced values cannot be inspected) and then call a jitted core.

* Vendi score (Friedman & Dieng 2023): :func:`vendi`, :func:`log_vendi`,
  :func:`vendi_from_kernel`, :func:`log_vendi_from_kernel`.
* k-NN manifold metrics: :func:`prdc` (Naeem et al. 2020), :func:`precision_recall`
  (Kynkaanniemi et al. 2019).
* Frechet distance (Heusel et al. 2017): :func:`frechet_distance`,
  :func:`frechet_distance_from_features`, :func:`feature_statistics`.
* Two-sample checks: :func:`energy_distance`, :func:`mmd`.
* Image-generation distances: :func:`kid` (Binkowski et al. 2018), :func:`cmmd`
  (Jayasumana et al. 2024).
* GASS spherical projection spread: :func:`spp`, :func:`principal_residual_direction`.
* Similarity scores: :func:`mss`, :func:`clip_score`, :func:`gram_logdet`.
* Per-prompt / per-class evaluation: :func:`groupwise`.
"""

from jaxdiv.metrics.frechet import (
    feature_statistics,
    frechet_distance,
    frechet_distance_from_features,
)
from jaxdiv.metrics.groups import GroupwiseResult, groupwise
from jaxdiv.metrics.kernel_two_sample import KIDResult, cmmd, energy_distance, kid, mmd
from jaxdiv.metrics.knn_manifold import PRDC, PrecisionRecall, prdc, precision_recall
from jaxdiv.metrics.similarity import clip_score, gram_logdet, mss
from jaxdiv.metrics.spherical_spread import SPPResult, principal_residual_direction, spp
from jaxdiv.metrics.vendi_entropy import log_vendi, log_vendi_from_kernel, vendi, vendi_from_kernel

__all__ = [
    "PRDC",
    "GroupwiseResult",
    "KIDResult",
    "PrecisionRecall",
    "SPPResult",
    "clip_score",
    "cmmd",
    "energy_distance",
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_features",
    "gram_logdet",
    "groupwise",
    "kid",
    "log_vendi",
    "log_vendi_from_kernel",
    "mmd",
    "mss",
    "prdc",
    "precision_recall",
    "principal_residual_direction",
    "spp",
    "vendi",
    "vendi_from_kernel",
]
