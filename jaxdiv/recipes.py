"""Recipes: loops over :func:`jaxdiv.sample` (one layer above it).

Nothing under :mod:`jaxdiv.guidance` calls the sampler; procedures that run it several
times -- SPELL's batch-by-batch generation with a shield memory, App. D's radius
heuristic -- live here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.guidance.base import as_terms, chain, couples_batch, per_group
from jaxdiv.guidance.spell.radius_search import DEFAULT_BLOCK_SIZE
from jaxdiv.guidance.spell.term import median_pairwise_distance, reference_index, spell
from jaxdiv.sampling import sample

__all__ = ["BatchedOutput", "spell_batched", "radius_from_unguided"]


class BatchedOutput(NamedTuple):
    """Result of :func:`spell_batched`.

    Attributes:
        x0: ``(N, ...)`` all samples, in the rows of ``noise``.
        state: the final guidance state (a dict by term name, SPELL's
            :class:`~jaxdiv.guidance.spell.SpellState` under ``"spell"``; with ``groups``,
            a leading group axis); to continue with more batches pass it to
            :func:`jaxdiv.sample`'s ``guidance_state=`` with the same terms
            (``spell_batched`` itself always starts from an empty memory).
        traces: per-batch :class:`~jaxdiv.Trace` tuple when ``trace=True``, else None.
    """

    x0: Any
    state: dict
    traces: tuple | None




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
    groups: int = 1,
    **spell_kwargs,
) -> BatchedOutput:
    """Generate ``N = noise.shape[0]`` samples in batches of ``batch_size`` with SPELL.

    Batch ``j`` is repelled from the reference set, from its own members (if
    ``intra_batch``) and from the outputs of batches ``0..j-1`` (Kirchhof et al. 2025,
    Sec. 3 / Fig. 2c). One :func:`jaxdiv.sample` call per batch, all sharing one compiled
    program (the memory is a fixed-size buffer in the term's state). Every batch is
    shielded from all earlier ones whatever their ``cond``: for several prompts or
    classes, pass ``groups`` (or call it once per prompt, as ``experiments.spell_tradeoff``
    does per class), or one prompt's images repel another's.

    Args:
        sampler, denoiser: as for :func:`jaxdiv.sample`.
        noise: ``(N, ...)`` standard normal, ``N`` a multiple of ``batch_size``.
        key: PRNG key; batch ``j`` uses ``fold_in(key, j)``.
        radius, reference, intra_batch, overcompensation: see
            :func:`~jaxdiv.guidance.spell`. With ``groups``, ``radius`` may hold one radius
            per group (App. D's radius differs between prompts; see
            :func:`~jaxdiv.guidance.per_group`).
        batch_size: samples per :func:`jaxdiv.sample` call.
        cond: optional condition pytree with leading dimension ``N``.
        guidance: optional other terms (e.g. ``guidance.cfg(...)``), chained before SPELL
            (which is named ``"spell"`` in the state and trace).
        memory_size: shield-memory capacity; default ``N`` (every earlier output); with
            ``groups``, per group (default ``N / groups``).
        trace: keep each batch's :class:`~jaxdiv.Trace`.
        groups: run ``groups`` independent sequences at once: rows ``g N / groups .. (g + 1)
            N / groups - 1`` (one prompt's or class's) are group ``g``, generated in
            batches of ``batch_size`` with a memory of its own, as a call with those rows
            alone would; each :func:`jaxdiv.sample` call runs batch ``j`` of every group
            (``groups=``). ``state`` and ``traces`` then carry a leading group axis.
        **spell_kwargs: further :func:`~jaxdiv.guidance.spell.spell` options.

    >>> import jax, jax.numpy as jnp, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.05]))
    >>> sch = schedules.edm()
    >>> noise = jax.random.normal(jax.random.key(0), (8, 2))
    >>> out = spell_batched(samplers.edm(sch, 10), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1), radius=0.3, batch_size=2)
    >>> out.x0.shape, int(out.state["spell"].count)
    ((8, 2), 8)
    >>> two = spell_batched(samplers.edm(sch, 10), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1), radius=0.3, batch_size=2, groups=2)
    >>> two.state["spell"].count.tolist()  # each group's memory holds its own 4 outputs
    [4, 4]
    """
    if not hasattr(noise, "shape"):
        raise TypeError(f"noise must be an array, got {type(noise).__name__}")
    n = noise.shape[0] if np.ndim(noise) >= 1 else 0
    validation.prng_key("key", key)
    batch_size = validation.integer("batch_size", batch_size, 1)
    groups = validation.integer("groups", groups, 1)
    if n < 1 or n % (groups * batch_size):
        per = f"groups x batch_size ({groups} x {batch_size})" if groups > 1 else (
            f"batch_size ({batch_size})")  # fmt: skip
        raise ValueError(f"noise's leading dimension ({n}) must be a positive multiple of "
                         f"{per}")  # fmt: skip
    if cond is not None:  # sliced per batch below: extra rows would be dropped silently
        rows = {np.shape(leaf)[0] if np.ndim(leaf) else None for leaf in jax.tree.leaves(cond)}
        if rows != {n}:
            raise ValueError(f"cond must have noise's {n} rows (leading dimension) in every "
                             f"leaf, got {sorted(rows, key=str)}")  # fmt: skip
    group_rows = n // groups
    if memory_size is None:
        memory_size = int(group_rows)
    per_radius = np.ndim(radius) == 1  # one radius per group: each group its own term
    if per_radius:
        if len(radius) != groups:
            raise ValueError(f"radius holds {len(radius)} radii but groups={groups}: give one "
                             "radius, or one per group")  # fmt: skip
        # one index for every group's term: the program holds the reference set once
        block = spell_kwargs.get("block_size", DEFAULT_BLOCK_SIZE)
        reference = reference_index(reference, block)

    def term(r):
        return spell(r, reference, intra_batch, overcompensation, memory_size=memory_size,
                     **spell_kwargs)  # fmt: skip

    spelled = per_group([term(r) for r in radius]) if per_radius else term(radius)
    g = chain(guidance, spell=spelled)

    def rows(a, j):  # batch j of every group, group-major: (groups * batch_size, ...)
        a = a.reshape((groups, group_rows) + a.shape[1:])[:, j * batch_size:(j + 1) * batch_size]
        return a.reshape((groups * batch_size,) + a.shape[2:])

    outs, traces, state = [], [], None
    for j in range(group_rows // batch_size):
        c = None if cond is None else jax.tree.map(lambda a, j=j: rows(a, j), cond)
        out = sample(sampler, denoiser, rows(noise, j), key=jax.random.fold_in(key, j), cond=c,
                     guidance=g, trace=trace, guidance_state=state, groups=groups)  # fmt: skip
        state = out.state
        outs.append(out.x0.reshape((groups, batch_size) + out.x0.shape[1:]))
        traces.append(out.trace)
    x0 = jnp.concatenate(outs, axis=1).reshape(noise.shape)  # back to group-major rows
    return BatchedOutput(x0, state, tuple(traces) if trace else None)


def radius_from_unguided(sampler, denoiser, noise, *, key, cond=None, guidance=None) -> float:
    """Median pairwise distance of an unguided batch's final samples (App. D).

    The paper then tries 16 radii from 0 to twice this value. ``guidance`` may hold the
    per-sample terms (e.g. CFG) so the batch matches the guided setting; a term that
    couples the batch (SPELL, PG, GASS: :func:`jaxdiv.guidance.couples_batch`) is refused,
    since it would spread the very batch the radius is measured on.

    >>> import jax, jax.numpy as jnp, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.zeros((1, 1)), jnp.ones((1,)))      # N(0, 1)
    >>> sch = schedules.edm()
    >>> r = radius_from_unguided(samplers.edm(sch, 8), gm.denoiser(sch),
    ...                          jax.random.normal(jax.random.key(0), (64, 1)),
    ...                          key=jax.random.key(1))
    >>> 0.7 < r < 1.2     # |x - y| ~ |N(0, 2)| has median 0.954
    True
    """
    coupled = [t.name for t in as_terms(guidance) if couples_batch(t)]
    if coupled:
        raise ValueError(f"guidance must hold per-sample terms only (the radius is measured on "
                         f"an unguided batch), got the batch-coupling term(s) {coupled}; pass "
                         "the setting's CFG alone")  # fmt: skip
    out = sample(sampler, denoiser, noise, key=key, cond=cond, guidance=guidance)
    return float(median_pairwise_distance(out.x0))
