"""TPSO: token-prompt space optimisation (arXiv 2511.19811).

* :mod:`~jaxdiv.guidance.tpso.losses`: the semantic hinge band and the diversity loss;
* :mod:`~jaxdiv.guidance.tpso.optimize`: the offset optimisation (one jitted loop);
* :mod:`~jaxdiv.guidance.tpso.schedule`: the progressive ``alpha_t`` schedule;
* :mod:`~jaxdiv.guidance.tpso.term`: the condition term and the scheduled null condition.

The model side (our CLIP text port on token embeddings, the projection, the blank-prompt
pool of the unconditional branch) lives in :mod:`jaxdiv.pipelines.tpso`.
"""

from jaxdiv.guidance.tpso.losses import diversity_loss, semantic_loss
from jaxdiv.guidance.tpso.optimize import (
    TPSOResult,
    optimize_offsets,
    tpso_loss,
    trainable_mask,
)
from jaxdiv.guidance.tpso.schedule import tpso_alpha, tpso_alphas
from jaxdiv.guidance.tpso.term import TPSOInfo, tpso, tpso_null

__all__ = [
    "TPSOInfo",
    "TPSOResult",
    "diversity_loss",
    "optimize_offsets",
    "semantic_loss",
    "tpso",
    "tpso_alpha",
    "tpso_alphas",
    "tpso_loss",
    "tpso_null",
    "trainable_mask",
]
