"""SPELL's previous-batch shield memory (SPELL's one-by-one SD3 generation, Kirchhof et al.
2025, Fig. 6), read back.

The memory lives in the SPELL term's :class:`~jaxdiv.guidance.spell.SpellState`: a
preallocated ``(capacity, f)`` buffer and a count, so its shape never changes between
batches and every batch reuses one compiled program. The loop over batches is
:func:`jaxdiv.recipes.spell_batched`; :func:`memory_vectors` reads the memory back.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxdiv.guidance.spell.term import SpellState

__all__ = ["memory_vectors"]


def memory_vectors(state: SpellState) -> jax.Array:
    """The valid memory rows, oldest first (host-side: the result's length varies).

    >>> s = SpellState(jnp.arange(8.0).reshape(4, 2), jnp.int32(5))   # wrapped once
    >>> memory_vectors(s).tolist()
    [[2.0, 3.0], [4.0, 5.0], [6.0, 7.0], [0.0, 1.0]]
    """
    if not isinstance(state, SpellState):
        raise TypeError(f"state must be a SpellState, got {type(state).__name__}")
    cap = state.memory.shape[0]
    count = int(state.count)
    if cap == 0 or count == 0:
        return state.memory[:0]
    if count <= cap:
        return state.memory[:count]
    start = count % cap
    return jnp.concatenate([state.memory[start:], state.memory[:start]], axis=0)
