"""GASS: geometry-aware spherical sampling (Zhu et al., ICML 2026, arXiv 2602.17200).

* :mod:`~jaxdiv.guidance.gass.term`: the ``x0``-hook term :func:`gass`;
* :mod:`~jaxdiv.guidance.gass.targets`: targets on the sphere and the SPP loss;
* :mod:`~jaxdiv.guidance.gass.write_back`: the inner Adam loop (optax);
* :mod:`~jaxdiv.guidance.gass.prop41`: Proposition 4.1, exactly.

optax is imported only when a GASS term is traced, and the ``u_ind`` search is the one
of :mod:`jaxdiv.sphere` (shared with the SPP metric), so ``import jaxdiv`` stays light.
"""

from jaxdiv.guidance.gass.prop41 import GramExpectation, expected_gram_det
from jaxdiv.guidance.gass.targets import AXES, gass_targets, spherical_targets, spp_loss
from jaxdiv.guidance.gass.term import GASSInfo, active_steps, gass

__all__ = [
    "AXES",
    "GASSInfo",
    "GramExpectation",
    "active_steps",
    "expected_gram_det",
    "gass",
    "gass_targets",
    "spherical_targets",
    "spp_loss",
]
