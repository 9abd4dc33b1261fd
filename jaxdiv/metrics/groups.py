"""Evaluate a metric per prompt / class group, then average over groups.

Diversity papers report Vendi, MSS, SPP, ... per prompt (the images generated for one
prompt) or per class, averaged over prompts; pooling all images would measure
prompt diversity instead. Group ids must be concrete (they decide shapes).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv.metrics import _checks


class GroupwiseResult(NamedTuple):
    """``mean``: metric output averaged leaf-wise over groups (unweighted);
    ``per_group``: the same pytree with a leading group axis; ``group_ids``: sorted ids."""

    mean: Any
    per_group: Any
    group_ids: np.ndarray


def _group_ids(groups, name, n):
    if isinstance(groups, jax.core.Tracer):
        raise TypeError(f"`{name}` must be concrete (NumPy or JAX array), not traced: group "
                        "sizes decide array shapes.")
    g = np.asarray(groups)
    if g.ndim != 1 or not (np.issubdtype(g.dtype, np.integer) or g.dtype == np.bool_):
        raise ValueError(f"`{name}` must be a 1-D array of integer group ids; got shape "
                         f"{g.shape} and dtype {g.dtype}.")
    if g.shape[0] != n:
        raise ValueError(f"`{name}` must have one id per sample ({n}); got {g.shape[0]}.")
    return g


@contextlib.contextmanager
def _naming_group(group_id):
    """Re-raise a metric's input error with the group it came from."""
    try:
        yield
    except (ValueError, TypeError) as err:
        raise type(err)(f"group id {group_id}: {err}") from err


def _check_groups(metric, kwargs, ids, stacked, group_arrays) -> None:
    """Run ``metric``'s registered eager checks on every group's concrete rows (on the
    host) before ``vmap`` hides the values from it; errors name the group id."""
    check, bound = _checks.group_check_for(metric)
    if check is None or not _checks.is_concrete(stacked, group_arrays):
        return
    host = [np.asarray(a) for a in stacked]
    is_key = lambda g: jax.dtypes.issubdtype(getattr(g, "dtype", None), jax.dtypes.prng_key)
    rows = [None if is_key(g) else np.asarray(g) for g in group_arrays]
    for gi in range(ids.size):
        with _naming_group(ids[gi]):
            check(*[h[gi] for h in host], *[r if r is None else r[gi] for r in rows],
                  **{**bound, **kwargs})  # fmt: skip


def groupwise(metric: Callable[..., Any], groups, *sample_arrays,
              group_arrays: Sequence[Any] = (), **kwargs) -> GroupwiseResult:
    """Apply ``metric`` to each group's samples and average the results over groups.

    ``metric(*group_slices, *group_rows, **kwargs)`` is called once per group id, where
    ``group_slices`` are the rows of each sample array belonging to the group and
    ``group_rows`` the group's row of each entry of ``group_arrays`` (indexed by position in
    the sorted unique ids: e.g. one text embedding and one PRNG key per prompt). When
    every group has the same size the calls are batched with ``jax.vmap`` (one compile);
    otherwise they run one by one. Values of sample arrays are checked for NaN/inf here,
    and the metrics of this package (``mss``, ``clip_score``, ``vendi``, ``log_vendi``,
    ``gram_logdet``, ``spp``, ``kid``, ``cmmd``) run their own value checks (zero rows,
    weights, ...) on every group's rows before the ``vmap``, since under ``vmap`` they only
    see traced values; an error names the group id. A metric of your own is not checked.

    Implements the per-prompt averaging of GASS/TPSO evaluation protocols (e.g. Vendi and
    MSS "per prompt, averaged over prompts").

    Args:
      metric: any metric of this package (or a function of arrays returning a pytree).
      groups: (n,) integer ids shared by all sample arrays, or a sequence with one id
        array per sample array (e.g. real and fake features of PRDC per class).
      *sample_arrays: arrays with one row per sample.
      group_arrays: arrays with one row per group, in sorted-id order.
      **kwargs: static keyword arguments passed to ``metric`` (``q=2.0``, ``k=5``, ...).

    Returns:
      ``GroupwiseResult(mean, per_group, group_ids)``; leaves such as SPP's ``u_ind`` are
      averaged too, which is only meaningful per group.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxdiv import metrics
      >>> X = jnp.array([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
      >>> res = metrics.groupwise(metrics.vendi, jnp.array([0, 0, 1, 1]), X)
      >>> res.per_group.tolist(), float(res.mean)
      ([1.0, 2.0], 1.5)
    """
    if not callable(metric):
        raise TypeError(f"`metric` must be callable; got {type(metric).__name__}.")
    if not sample_arrays:
        raise ValueError("`groupwise` needs at least one sample array after `groups`.")
    arrays = [a if isinstance(a, jax.Array) else np.asarray(a) for a in sample_arrays]
    if isinstance(groups, list | tuple):
        if len(groups) != len(arrays):
            raise ValueError(f"`groups` has {len(groups)} id arrays for {len(arrays)} sample "
                             "arrays; give one per sample array or a single shared one.")
        id_arrays = list(groups)
    else:
        id_arrays = [groups] * len(arrays)
    id_arrays = [_group_ids(g, "groups", a.shape[0]) for g, a in zip(id_arrays, arrays,
                                                                        strict=True)]
    ids = np.unique(id_arrays[0])
    for g in id_arrays[1:]:
        if not np.array_equal(np.unique(g), ids):
            raise ValueError("every sample array must contain the same set of group ids; got "
                             f"{ids.tolist()[:10]} and {np.unique(g).tolist()[:10]}.")
    for i, a in enumerate(arrays):
        if jnp.issubdtype(a.dtype, jnp.floating):
            _checks.check_values(a, f"sample_arrays[{i}]")
    group_arrays = list(group_arrays)
    for i, ga in enumerate(group_arrays):
        if jnp.shape(ga)[0] != ids.size:
            raise ValueError(f"`group_arrays[{i}]` must have one row per group ({ids.size}); "
                             f"got leading dimension {jnp.shape(ga)[0]}.")

    sizes = [np.bincount(np.searchsorted(ids, g), minlength=ids.size) for g in id_arrays]
    orders = [np.argsort(g, kind="stable") for g in id_arrays]
    call = lambda *args: metric(*args, **kwargs)
    if all((s == s[0]).all() for s in sizes):
        stacked = [jnp.asarray(a)[o].reshape((ids.size, s[0]) + a.shape[1:])
                   for a, o, s in zip(arrays, orders, sizes, strict=True)]
        _check_groups(metric, kwargs, ids, stacked, group_arrays)
        per_group = jax.vmap(call)(*stacked, *group_arrays)
    else:
        outs = []
        for gi in range(ids.size):
            slices = [jnp.asarray(a)[o[np.searchsorted(g[o], ids[gi], "left"):
                                       np.searchsorted(g[o], ids[gi], "right")]]
                      for a, o, g in zip(arrays, orders, id_arrays, strict=True)]
            with _naming_group(ids[gi]):
                outs.append(call(*slices, *[ga[gi] for ga in group_arrays]))
        per_group = jax.tree_util.tree_map(lambda *v: jnp.stack(v), *outs)
    mean = jax.tree_util.tree_map(lambda v: jnp.mean(v, axis=0), per_group)
    return GroupwiseResult(mean, per_group, ids)
