"""Branches that stay branches when :func:`jaxdiv.sample` runs groups (``groups=``).

``sample(..., groups=G)`` maps one run over the groups with ``jax.vmap``. A ``lax.cond``
whose predicate depends on a group's samples is then batched, and vmap turns it into a
``select`` that runs *both* branches for every group: SPELL's search, which skips the
reference blocks no query comes near, would compare every query with every shield.
:func:`branch` keeps the skip: it takes the branch when the predicate holds in any group
and keeps each group's own branch's value. (A hand-written ``jax.vmap`` of ``sample``,
which has no group axis name, runs 119x slower than ``groups=`` on 8 groups of 4 with
200k reference shields: ``python -m benchmarks.groups``,
``results/benchmarks/xeon/groups.json``.)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["GROUP_AXIS", "any_group", "branch"]

GROUP_AXIS = "jaxdiv_groups"  # the vmap axis name of sample(groups=)


def any_group(pred):
    """``pred`` outside ``sample(groups=)``; inside, whether it holds in any group (the
    same unbatched value in every group).

    >>> f = lambda x: any_group(x > 0)
    >>> bool(f(jnp.float32(-1.0)))
    False
    >>> jax.vmap(f, axis_name=GROUP_AXIS)(jnp.array([-1.0, 2.0])).tolist()
    [True, True]
    """
    try:
        return lax.psum(jnp.asarray(pred, jnp.int32), GROUP_AXIS) > 0
    except NameError:  # no groups: the axis name is unbound
        return pred


def branch(pred, true_fn, false_fn, *operands):
    """``lax.cond(pred, true_fn, false_fn, *operands)`` that stays a branch under
    ``sample(groups=)``: ``true_fn`` runs (for all groups) when ``pred`` holds in any
    group, and each group keeps the value of its own ``pred``'s branch.

    >>> double = lambda x: branch(x.sum() > 0, lambda y: 2 * y, lambda y: y, x)
    >>> jax.vmap(double, axis_name=GROUP_AXIS)(jnp.array([[1.0], [-1.0]])).tolist()
    [[2.0], [-1.0]]
    """
    shared = any_group(pred)
    if shared is pred:
        return lax.cond(pred, true_fn, false_fn, *operands)

    def per_group(*ops):
        return jax.tree.map(lambda a, b: jnp.where(pred, a, b), true_fn(*ops), false_fn(*ops))

    return lax.cond(shared, per_group, false_fn, *operands)
