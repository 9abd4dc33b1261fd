"""Guidance terms and their combinators.

Each method lives in its own module; all share the protocol of :mod:`jaxdiv.guidance.base`
(``GuidanceTerm(init, apply, hook)``, composed with :func:`chain`, restricted with
:func:`window`).
"""

from jaxdiv.guidance import radius_search
from jaxdiv.guidance.base import (
    HOOKS,
    Chain,
    GuidanceTerm,
    StepContext,
    WindowInfo,
    as_terms,
    chain,
    window,
)
from jaxdiv.guidance.cads import CADSInfo, cads, cads_gamma, cads_time
from jaxdiv.guidance.cfg import CFGInfo, cfg
from jaxdiv.guidance.gass import (
    AXES,
    GASSInfo,
    active_steps,
    expected_gram_det,
    gass,
    gass_targets,
    spherical_targets,
    spp_loss,
)
from jaxdiv.guidance.interval import interval
from jaxdiv.guidance.particle import ParticleInfo, particle
from jaxdiv.guidance.shield_memory import BatchedOutput, memory_vectors, spell_batched
from jaxdiv.guidance.spell import (
    SpellInfo,
    SpellState,
    median_pairwise_distance,
    radius_from_unguided,
    repulsion_field,
    repulsion_potential,
    spell,
    spell_delta,
)

__all__ = [
    "HOOKS",
    "Chain",
    "GuidanceTerm",
    "StepContext",
    "WindowInfo",
    "as_terms",
    "chain",
    "window",
    # baselines
    "cfg",
    "CFGInfo",
    "interval",
    "cads",
    "cads_gamma",
    "cads_time",
    "CADSInfo",
    "particle",
    "ParticleInfo",
    # SPELL
    "spell",
    "spell_delta",
    "spell_batched",
    "SpellInfo",
    "SpellState",
    "BatchedOutput",
    "memory_vectors",
    "median_pairwise_distance",
    "radius_from_unguided",
    "repulsion_field",
    "repulsion_potential",
    "radius_search",
    # GASS
    "gass",
    "gass_targets",
    "spherical_targets",
    "spp_loss",
    "active_steps",
    "expected_gram_det",
    "GASSInfo",
    "AXES",
]
