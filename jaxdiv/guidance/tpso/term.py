"""TPSO at sampling time: the optimised condition, faded out by the progressive schedule."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.guidance.base import GuidanceTerm, check_like
from jaxdiv.guidance.tpso.schedule import scheduled_steps, tpso_alpha

__all__ = ["TPSOInfo", "tpso", "tpso_null"]


class TPSOInfo(NamedTuple):
    """Per-evaluation TPSO diagnostic: the schedule's ``alpha_t``."""

    alpha: jax.Array


def _mix(alpha, optimized, original):
    # where the optimised condition equals the original (SD3's T5 tokens and padding, which
    # the public code never mixes), the original is kept bit for bit
    return jax.tree.map(
        lambda o, c: jnp.where(o == c, c, (alpha * o + (1.0 - alpha) * c).astype(c.dtype)),
        optimized, original,
    )  # fmt: skip


def _tpso_init(optimized, original, x, cond, key):
    if cond is None:
        raise ValueError("tpso needs a condition: pass the prompts' original embedding as "
                         "cond= to jaxdiv.sample")  # fmt: skip
    check_like("tpso's optimized condition", optimized, cond, "cond")
    if original is not None and validation.is_concrete(original, cond):
        check_like("tpso's original condition", original, cond, "cond")
        for o, c in zip(jax.tree.leaves(original), jax.tree.leaves(cond), strict=True):
            o, c = np.asarray(o, np.float64), np.asarray(c, np.float64)
            # the same prompts give the same embedding up to float rounding; another
            # prompt differs by O(1) at its content tokens
            if not np.allclose(c, o, rtol=1e-3, atol=1e-3 * max(np.abs(o).max(), 1e-30)):
                raise ValueError(
                    "tpso: cond is not the condition its variants were optimised from (its "
                    f"largest difference is {np.abs(c - o).max():.3g}): pass the "
                    "TPSOConditions' own cond (or the same prompts and n to pipe.generate)"
                )
    return ()


def _tpso_apply(optimized, ratio, state, cond, ctx):
    alpha = tpso_alpha(ctx.step, ctx.num_steps, ratio)
    return _mix(alpha, optimized, cond), state, TPSOInfo(alpha)


# guidance.prompt_bound: its variants are rows of the batch it was optimised for
_tpso_apply.prompt_bound = True


def _finite_tree(name, tree):
    return jax.tree.map(lambda a: validation.finite_array(name, a), tree)


def tpso(optimized, ratio=0.4, original=None) -> GuidanceTerm:
    """TPSO's condition schedule: ``c_t = alpha_t c' + (1 - alpha_t) c`` (Eq. 10-11).

    ``c'`` is the optimised condition (``TPSOResult.hidden``, one row per variant) and ``c``
    the condition passed to :func:`jaxdiv.sample` (the prompt's own embedding, repeated per
    variant); ``alpha_t`` falls linearly from 1 to 0 over the first ``int(ratio * N)``
    sampler steps and is 0 afterwards (:func:`~jaxdiv.guidance.tpso.tpso_alpha`), so the
    last steps refine with the original prompt. The public code schedules the
    unconditional branch the same way, with optimised blank-prompt embeddings: pass
    :func:`tpso_null` as ``cfg``'s ``null_cond`` for that (or let
    :func:`jaxdiv.pipelines.tpso.tpso_guidance` build both).

    Args:
        optimized: the optimised condition, shaped like ``cond`` (a pytree of arrays).
        ratio: the schedule ratio ``r`` (0.4; the paper recommends 0.3-0.5, a negative
            value injects late). A traced leaf: a sweep compiles once. A non-zero ratio
            with ``int(|r| N) = 0`` on the sampler would never act: :func:`jaxdiv.sample`
            refuses it (``0`` switches TPSO off on purpose).
        original: the condition the variants were optimised from
            (:attr:`~jaxdiv.pipelines.tpso.TPSOConditions.cond`), optional; given, a run
            whose ``cond`` differs from it beyond float rounding is refused (variants of
            one prompt mixed into another prompt's embedding).

    Returns:
        A "condition"-hook :class:`~jaxdiv.guidance.GuidanceTerm` named ``"tpso"`` with
        :class:`TPSOInfo`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> den = lambda x, t, c: x * 0 + c           # toy: x0_hat is the condition
    >>> out = jaxdiv.sample(samplers.ddim(schedules.flow(), 10), den, jnp.zeros((1, 1)),
    ...                     key=jax.random.key(0), cond=jnp.zeros((1, 1)),
    ...                     guidance=tpso(jnp.ones((1, 1)), ratio=0.4), trace=True)
    >>> [round(float(a), 3) for a in out.trace.info["tpso"].alpha]
    [1.0, 0.667, 0.333, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    """
    optimized = _finite_tree("optimized", optimized)
    if original is not None:
        original = _finite_tree("original", original)
    ratio = validation.real("ratio", ratio, lo=-1, hi=1)
    return GuidanceTerm(Partial(_tpso_init, optimized, original),
                        Partial(_tpso_apply, optimized, ratio), "condition", "tpso")  # fmt: skip


def _null_at(optimized, null_cond, ratio, ctx):
    return _mix(tpso_alpha(ctx.step, ctx.num_steps, ratio), optimized, null_cond)


def tpso_null(optimized_null, null_cond, ratio=0.4):
    """The unconditional branch's TPSO schedule, for ``cfg(w, null_cond=tpso_null(...))``.

    ``null_t = alpha_t n' + (1 - alpha_t) n`` with the same ``alpha_t`` as :func:`tpso`:
    ``n'`` are optimised blank-prompt embeddings (one row per sample), ``n`` the plain null
    embedding (broadcast to ``n'``'s shape). This is what the public code feeds its
    negative branch.

    Returns:
        ``null(ctx) -> embedding``, a :class:`jax.tree_util.Partial` whose arrays are traced
        leaves.

    >>> import jax.numpy as jnp
    >>> from jaxdiv.guidance import StepContext
    >>> f = tpso_null(jnp.ones((2, 3)), jnp.zeros((1, 3)), ratio=0.5)
    >>> ctx = StepContext(None, 1.0, 1.0, 1.0, 1, 4, None, None)   # step 1 of 4
    >>> f(ctx)[0].tolist()                                          # alpha = 0
    [0.0, 0.0, 0.0]
    """
    optimized_null = _finite_tree("optimized_null", optimized_null)
    null_cond = _finite_tree("null_cond", null_cond)
    try:
        null_cond = jax.tree.map(lambda n, o: jnp.broadcast_to(n, o.shape).astype(o.dtype),
                                 null_cond, optimized_null)  # fmt: skip
    except ValueError:
        raise ValueError(
            f"null_cond {jax.tree.map(jnp.shape, null_cond)} does not broadcast to "
            f"optimized_null {jax.tree.map(jnp.shape, optimized_null)}"
        ) from None
    ratio = validation.real("ratio", ratio, lo=-1, hi=1)
    return Partial(_null_at, optimized_null, null_cond, ratio)


def _never_acts(num_steps, levels, optimized, ratio):
    """``jaxdiv.sample`` refuses a non-zero ratio that schedules no step on its sampler
    (:func:`jaxdiv.guidance.base.check_windows`); ``ratio = 0`` switches TPSO off on
    purpose (a sweep's control)."""
    if not validation.is_concrete(ratio) or float(ratio) == 0:
        return None
    if int(scheduled_steps(ratio, num_steps)) == 0:  # tpso_alpha's n
        return (f"ratio={float(ratio):g} schedules int(|ratio| * N) = 0 of the sampler's "
                f"{num_steps} steps; use |ratio| >= 1 / N = {1 / num_steps:.3g} (or ratio=0 to "
                "switch it off on purpose)")  # fmt: skip
    return None


_tpso_apply.never_acts = _never_acts
