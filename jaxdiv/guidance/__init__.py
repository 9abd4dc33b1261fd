"""Guidance terms and their combinators.

Each method lives in its own module (or small package); all share the protocol of
:mod:`jaxdiv.guidance.base`: ``GuidanceTerm(init, apply, hook, name)`` with traced
hyperparameters, composed and named with :func:`chain`, restricted with :func:`window`;
:func:`stateless` writes a new term in a few lines; :func:`per_group` gives each group of
``jaxdiv.sample(..., groups=G)`` its own terms.
"""

from jaxdiv.guidance.base import (
    HOOKS,
    Chain,
    GuidanceTerm,
    PerGroup,
    StepContext,
    WindowInfo,
    as_terms,
    chain,
    couples_batch,
    needs_batch,
    per_group,
    prompt_bound,
    stateless,
    window,
)
from jaxdiv.guidance.cads import CADSInfo, cads, cads_gamma, cads_time
from jaxdiv.guidance.cfg import CFGInfo, cfg
from jaxdiv.guidance.contextual import (
    ContextualInfo,
    ContextualReport,
    contextual,
    contextual_hook,
    repel_context,
)
from jaxdiv.guidance.gass import (
    AXES,
    GASSInfo,
    GramExpectation,
    active_steps,
    expected_gram_det,
    gass,
    gass_targets,
    spherical_targets,
    spp_loss,
)
from jaxdiv.guidance.interval import interval
from jaxdiv.guidance.particle import ParticleInfo, particle
from jaxdiv.guidance.spell import (
    ShardedShieldIndex,
    SpellInfo,
    SpellState,
    build_sharded_index,
    median_pairwise_distance,
    memory_vectors,
    radius_search,
    repulsion_field,
    repulsion_potential,
    spell,
    spell_delta,
)
from jaxdiv.guidance.tpso import TPSOInfo, TPSOResult, tpso, tpso_null

__all__ = [
    "HOOKS",
    "Chain",
    "GuidanceTerm",
    "StepContext",
    "WindowInfo",
    "as_terms",
    "couples_batch",
    "needs_batch",
    "prompt_bound",
    "chain",
    "per_group",
    "PerGroup",
    "stateless",
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
    "SpellInfo",
    "SpellState",
    "memory_vectors",
    "median_pairwise_distance",
    "repulsion_field",
    "repulsion_potential",
    "radius_search",
    "ShardedShieldIndex",
    "build_sharded_index",
    # TPSO (its optimisation: from jaxdiv.guidance.tpso import optimize_offsets)
    "tpso",
    "tpso_null",
    "TPSOInfo",
    "TPSOResult",
    # GASS
    "gass",
    "gass_targets",
    "spherical_targets",
    "spp_loss",
    "active_steps",
    "expected_gram_det",
    "GASSInfo",
    "GramExpectation",
    "AXES",
    # contextual-space repulsion (a hook="model" term for MMDiT pipelines)
    "contextual",
    "ContextualInfo",
    "ContextualReport",
    "repel_context",
    "contextual_hook",
]

