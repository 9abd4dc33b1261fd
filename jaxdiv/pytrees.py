"""Split pytrees into traced array leaves and hashed static parts (one compile per structure).

Samplers, denoisers, guidance terms and TPSO's encoders are pytrees whose arrays must be
traced -- so ``jax.grad`` reaches them and new values never recompile -- while their
functions and settings key the compilation cache.

>>> import jax.numpy as jnp
>>> dynamic, spec = partition((len, jnp.ones(2), "mode"))
>>> [d is None for d in dynamic]
[True, False, True]
>>> combine(dynamic, spec)[2]
'mode'
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["partition", "combine"]


class _Static:
    """Hashable wrapper for a non-array leaf (functions, strings, Python numbers)."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def _key(self):
        try:
            hash(self.value)
            return (0, self.value)
        except TypeError:
            return (1, id(self.value))

    def __hash__(self):
        return hash(self._key())

    def __eq__(self, other):
        return (
            isinstance(other, _Static)
            and type(self.value) is type(other.value)
            and self._key() == other._key()
        )


def _is_dynamic(leaf) -> bool:
    return isinstance(leaf, (jax.Array, np.ndarray))


def partition(tree):
    """Split a pytree into array leaves (traced) and everything else (static, hashed).

    Samplers, denoisers and guidance terms are pytrees whose arrays (time grids, GMM
    parameters) must be traced -- so ``jax.grad`` reaches them -- while their functions
    and hyperparameters key the compilation cache: the same objects never recompile.

    Returns ``(dynamic, spec)``: the leaves with ``None`` for static ones, and a hashable
    spec (tree structure + static leaves) that :func:`combine` inverts.

    >>> import jax.numpy as jnp
    >>> dynamic, spec = partition({"f": len, "w": jnp.ones(2)})
    >>> dynamic                                         # leaves in key order: f, w
    [None, Array([1., 1.], dtype=float32)]
    >>> spec == partition({"f": len, "w": jnp.zeros(2)})[1]   # new values: same spec
    True
    """
    leaves, treedef = jax.tree.flatten(tree)
    dynamic = [leaf if _is_dynamic(leaf) else None for leaf in leaves]
    static = tuple(None if _is_dynamic(leaf) else _Static(leaf) for leaf in leaves)
    return dynamic, (treedef, static)


def combine(dynamic, spec):
    """Inverse of :func:`partition`: the tree with ``dynamic``'s arrays put back.

    >>> import jax, jax.numpy as jnp
    >>> dynamic, spec = partition((len, jnp.ones(2)))
    >>> f, w = jax.jit(lambda d: combine(d, spec)[1] * 2)(dynamic), combine(dynamic, spec)[0]
    >>> f.tolist(), f is not None and w is len
    ([2.0, 2.0], True)
    """
    treedef, static = spec
    leaves = [d if s is None else s.value for d, s in zip(dynamic, static)]
    return jax.tree.unflatten(treedef, leaves)
