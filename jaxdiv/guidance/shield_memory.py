"""Previous-batch shields: generate N samples b at a time, each batch repelled from all
earlier outputs (SPELL's one-by-one SD3 generation, Kirchhof et al. 2025, Fig. 6).

The memory lives in the SPELL term's :class:`~jaxdiv.guidance.spell.SpellState`: a
preallocated ``(capacity, f)`` buffer and a count, so its shape never changes between
batches and every batch reuses one compiled program. :func:`spell_batched` is the one-call
API; :func:`memory_vectors` reads the memory back.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.guidance.base import chain
from jaxdiv.guidance.spell import SpellState, spell

__all__ = ["BatchedOutput", "spell_batched", "memory_vectors"]


class BatchedOutput(NamedTuple):
    """Result of :func:`spell_batched`.

    Attributes:
        x0: ``(N, ...)`` all samples, in batch order.
        state: the final guidance state (a tuple, SPELL's :class:`SpellState` last); pass
            it as ``guidance_state=`` to continue with more batches.
        traces: per-batch :class:`~jaxdiv.Trace` tuple when ``trace=True``, else None.
    """

    x0: Any
    state: tuple
    traces: tuple | None


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


def spell_batched(
    sampler,
    denoiser,
    noise,
    *,
    key,
    radius,
    batch_size: int,
    reference=None,
    intra_batch: bool = True,
    overcompensation=1.0,
    cond=None,
    guidance=None,
    memory_size: int | None = None,
    trace: bool = False,
    **spell_kwargs,
) -> BatchedOutput:
    """Generate ``N = noise.shape[0]`` samples in batches of ``batch_size`` with SPELL.

    Batch ``j`` is repelled from the reference set, from its own members (if
    ``intra_batch``) and from the outputs of batches ``0..j-1`` (Kirchhof et al. 2025,
    Sec. 3 / Fig. 2c). One :func:`jaxdiv.sample` call per batch, all sharing one compiled
    program (the memory is a fixed-size buffer in the term's state).

    Args:
        sampler, denoiser: as for :func:`jaxdiv.sample`.
        noise: ``(N, ...)`` standard normal, ``N`` a multiple of ``batch_size``.
        key: PRNG key; batch ``j`` uses ``fold_in(key, j)``.
        radius, reference, intra_batch, overcompensation: see
            :func:`~jaxdiv.guidance.spell.spell`.
        batch_size: samples per :func:`jaxdiv.sample` call.
        cond: optional condition pytree with leading dimension ``N``.
        guidance: optional other terms (e.g. ``guidance.cfg(...)``), chained before SPELL.
        memory_size: shield-memory capacity; default ``N`` (every earlier output).
        trace: keep each batch's :class:`~jaxdiv.Trace`.
        **spell_kwargs: further :func:`~jaxdiv.guidance.spell.spell` options.

    >>> import jax, jax.numpy as jnp, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.05]))
    >>> sch = schedules.edm()
    >>> noise = jax.random.normal(jax.random.key(0), (8, 2))
    >>> out = spell_batched(samplers.edm(sch, 10), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1), radius=0.3, batch_size=2)
    >>> out.x0.shape, int(out.state[-1].count)
    ((8, 2), 8)
    """
    if not hasattr(noise, "shape"):
        raise TypeError(f"noise must be an array, got {type(noise).__name__}")
    n = noise.shape[0] if np.ndim(noise) >= 1 else 0
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if batch_size < 1 or n < 1 or n % batch_size:
        raise ValueError(
            f"noise's leading dimension ({n}) must be a positive multiple of batch_size "
            f"({batch_size})"
        )
    if memory_size is None:
        memory_size = int(n)
    term = spell(radius, reference, intra_batch, overcompensation, memory_size=memory_size,
                 **spell_kwargs)  # fmt: skip
    g = term if guidance is None else chain(guidance, term)
    from jaxdiv.sampling import sample

    outs, traces, state = [], [], None
    for j in range(n // batch_size):
        sl = slice(j * batch_size, (j + 1) * batch_size)
        c = None if cond is None else jax.tree.map(lambda a, sl=sl: a[sl], cond)
        out = sample(sampler, denoiser, noise[sl], key=jax.random.fold_in(key, j), cond=c,
                     guidance=g, trace=trace, guidance_state=state)  # fmt: skip
        state = out.state
        outs.append(out.x0)
        traces.append(out.trace)
    return BatchedOutput(jnp.concatenate(outs, axis=0), state, tuple(traces) if trace else None)
