"""SPELL (Kirchhof et al., ICML 2025): the term, its exact shield index and its memory.

* :mod:`~jaxdiv.guidance.spell.term`: the ``x0``-hook term :func:`spell` and Eq. 5/7;
* :mod:`~jaxdiv.guidance.spell.radius_search`: exact blockwise radius search over large
  shield sets (and an IVF index for comparison with the paper's App. I);
* :mod:`~jaxdiv.guidance.spell.sharded`: the same exact search (and exact nearest
  shields) over shields split across devices (``shard_map`` + ``psum`` / a gather of each
  device's nearest), filled from files one device's rows at a time;
* :mod:`~jaxdiv.guidance.spell.memory`: the previous-batch memory, read back.

Loops over :func:`jaxdiv.sample` (``spell_batched``, ``radius_from_unguided``) live a
layer up, in :mod:`jaxdiv.recipes`.
"""

from jaxdiv.guidance.spell import radius_search, sharded
from jaxdiv.guidance.spell.memory import memory_vectors
from jaxdiv.guidance.spell.sharded import ShardedShieldIndex, build_sharded_index
from jaxdiv.guidance.spell.term import (
    SpellInfo,
    SpellState,
    median_pairwise_distance,
    reference_index,
    repulsion_field,
    repulsion_potential,
    spell,
    spell_delta,
)

__all__ = [
    "spell",
    "spell_delta",
    "SpellInfo",
    "SpellState",
    "memory_vectors",
    "median_pairwise_distance",
    "reference_index",
    "repulsion_field",
    "repulsion_potential",
    "radius_search",
    "sharded",
    "ShardedShieldIndex",
    "build_sharded_index",
]
