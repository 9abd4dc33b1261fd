"""The guidance-term protocol, its three hook points, ``chain`` and time windows.

A guidance term is an optax-style NamedTuple of pure functions::

    GuidanceTerm(init, apply, hook)

* ``init(x, cond, key) -> state`` is called once per :func:`jaxdiv.sample` call with the
  initial (scaled) noise batch. Put large arrays a term needs (reference sets, shield
  memories) in its state or close over them; both are passed to XLA as arguments.
* ``apply`` is called at every denoiser evaluation and returns ``(out, state, info)``;
  ``info`` is a pytree of per-step diagnostics kept in the trace. Its signature depends
  on ``hook``:

  ============  ==========================================  ===========================
  hook          ``apply(state, ...)``                       examples
  ============  ==========================================  ===========================
  "condition"   ``apply(state, cond, ctx) -> cond``         CADS, TPSO variants
  "denoiser"    ``apply(state, denoise, ctx) -> x0_hat``    CFG, interval guidance
  "x0"          ``apply(state, x0_hat, ctx) -> x0_hat``     SPELL, particle guidance, GASS
  ============  ==========================================  ===========================

  ``denoise(x, cond) -> x0_hat`` calls the model at the current time; ``ctx`` is a
  :class:`StepContext`. Terms that couple samples see the whole batch.

Terms compose with :func:`chain` (conditions first, then the single denoiser-combination
term, then x0 terms in chain order — put SPELL last so its distance guarantee holds for
the final ``x0_hat``) and are restricted in time with :func:`window`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "HOOKS",
    "GuidanceTerm",
    "StepContext",
    "Chain",
    "WindowInfo",
    "chain",
    "window",
    "as_terms",
    "init_terms",
    "guided_denoise",
]

HOOKS = ("condition", "denoiser", "x0")


class GuidanceTerm(NamedTuple):
    """One guidance method: ``init(x, cond, key) -> state`` and a hook-specific ``apply``."""

    init: Callable
    apply: Callable
    hook: str


class StepContext(NamedTuple):
    """What a term sees at one denoiser evaluation.

    Attributes:
        x: current noisy batch ``x_t`` (B, ...), in the process's own scaling.
        t: the process time of this evaluation (scalar).
        alpha, sigma: ``alpha(t)``, ``sigma(t)``.
        step: index ``i`` of the sampler step (both Heun evaluations share it).
        num_steps: number of sampler steps ``N`` (static).
        key: a PRNG key unique to this term and evaluation.
        cond: the condition after the condition hooks (None when unconditional).
    """

    x: Any
    t: Any
    alpha: Any
    sigma: Any
    step: Any
    num_steps: int
    key: Any
    cond: Any

    @property
    def noise_level(self):
        """``sigma / alpha``: the EDM-equivalent noise level, the same on every process."""
        return self.sigma / self.alpha

    @property
    def progress(self):
        """``1 - step / num_steps``: 1 at the first (noisiest) step, towards 0 at the end."""
        return 1.0 - self.step / self.num_steps

    def score(self, x0_hat):
        """Tweedie's formula: ``score = (alpha x0_hat - x) / sigma^2``."""
        return (self.alpha * x0_hat - self.x) / self.sigma**2


class Chain(NamedTuple):
    """Several terms applied in order; built by :func:`chain`."""

    terms: tuple

    def init(self, x, cond, key):
        return init_terms(self.terms, x, cond, key)


def _check_term(term, where="guidance"):
    if not isinstance(term, GuidanceTerm):
        raise TypeError(
            f"{where} must be a GuidanceTerm (or a chain of them), got {type(term).__name__}"
        )
    if term.hook not in HOOKS:
        raise ValueError(f"{where}.hook must be one of {HOOKS}, got {term.hook!r}")


def as_terms(guidance) -> tuple:
    """Normalise ``None``, a term or a (nested) :class:`Chain` to a flat tuple of terms.

    >>> as_terms(None)
    ()
    """
    if guidance is None:
        return ()
    if isinstance(guidance, Chain):
        out = ()
        for t in guidance.terms:
            out = out + as_terms(t)
        return out
    _check_term(guidance)
    return (guidance,)


def chain(*terms) -> Chain:
    """Compose guidance terms; nested chains are flattened.

    Conditions are transformed first (in order), then at most one denoiser-combination
    term calls the model, then x0 terms run in order.

    >>> g = chain(window(_identity_x0(), steps=[0]), _identity_x0())
    >>> len(as_terms(g))
    2
    """
    flat = as_terms(Chain(tuple(t for t in terms if t is not None)))
    n_den = sum(t.hook == "denoiser" for t in flat)
    if n_den > 1:
        raise ValueError(
            f"chain got {n_den} denoiser-combination terms (hook='denoiser'); only one can "
            "call the model per evaluation. Combine them into one term (e.g. wrap CFG in "
            "window() instead of chaining interval guidance with CFG)."
        )
    return Chain(flat)


def init_terms(terms: Sequence[GuidanceTerm], x, cond, key) -> tuple:
    """Initial state of each term (a tuple, one entry per term)."""
    keys = [jax.random.fold_in(key, j) for j in range(len(terms))]
    return tuple(term.init(x, cond, k) for term, k in zip(terms, keys))


def guided_denoise(terms, denoiser, x, t, cond, states, *, schedule, step, num_steps, key):
    """One guided denoiser evaluation: condition hooks, model call(s), x0 hooks.

    Returns ``(x0_hat, states, infos)``. Raises a clear error (at trace time) when the
    denoiser's output shape differs from ``x``.
    """
    alpha = schedule.alpha(t)
    sigma = schedule.sigma(t)
    states = list(states)
    infos = [None] * len(terms)

    def ctx_for(j, c):
        return StepContext(x, t, alpha, sigma, step, num_steps, jax.random.fold_in(key, j), c)

    for j, term in enumerate(terms):
        if term.hook == "condition":
            cond, states[j], infos[j] = term.apply(states[j], cond, ctx_for(j, cond))

    def denoise(xx, cc):
        out = denoiser(xx, t, cc)
        if not hasattr(out, "shape") or out.shape != xx.shape:
            raise ValueError(
                f"denoiser must return x0_hat with the shape of its input x {tuple(xx.shape)}, "
                f"got {getattr(out, 'shape', type(out))}"
            )
        return out.astype(xx.dtype)

    den_terms = [j for j, term in enumerate(terms) if term.hook == "denoiser"]
    if den_terms:
        j = den_terms[0]
        x0_hat, states[j], infos[j] = terms[j].apply(states[j], denoise, ctx_for(j, cond))
    else:
        x0_hat = denoise(x, cond)

    for j, term in enumerate(terms):
        if term.hook == "x0":
            x0_hat, states[j], infos[j] = term.apply(states[j], x0_hat, ctx_for(j, cond))
    return x0_hat, tuple(states), tuple(infos)


class WindowInfo(NamedTuple):
    """Info of a windowed term: whether it was active, and the inner term's info
    (zeros when inactive)."""

    active: Any
    inner: Any


def _interval_mask(value, bounds, name):
    if bounds is None:
        return True
    if len(bounds) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {bounds!r}")
    lo, hi = bounds
    lo = -jnp.inf if lo is None else lo
    hi = jnp.inf if hi is None else hi
    return (value > lo) & (value <= hi)


def window(term: GuidanceTerm, *, t=None, noise_level=None, steps=None) -> GuidanceTerm:
    """Restrict ``term`` to part of the trajectory; elsewhere it is the identity.

    Args:
        term: the guidance term to restrict.
        t: ``(low, high]`` interval of process time ``t`` (None for an open end).
        noise_level: ``(low, high]`` interval of ``sigma / alpha`` — the same on VP, EDM
            and flow processes (interval guidance, Kynkaanniemi et al. 2024, Sec. 3).
        steps: sampler step indices (a sequence of ints) where the term is active.

    All given conditions must hold. Inactive evaluations skip the term's computation
    (``lax.cond``) and report zero info.

    >>> g = window(_identity_x0(), noise_level=(0.28, 5.42))
    >>> g.hook
    'x0'
    """
    _check_term(term, "term")
    if t is None and noise_level is None and steps is None:
        raise ValueError("window needs at least one of t=, noise_level=, steps=")
    step_set = None
    if steps is not None:
        # validated with NumPy so window() can also be built inside a jit trace
        idx = np.unique(np.asarray(steps, np.int64).ravel())
        if idx.size == 0:
            raise ValueError("steps must name at least one step index")
        if idx.min() < 0:
            raise ValueError(f"steps must be >= 0, got {steps!r}")
        step_set = idx.astype(np.int32)

    def is_active(ctx):
        on = jnp.asarray(True)
        on = on & _interval_mask(ctx.t, t, "t")
        on = on & _interval_mask(ctx.noise_level, noise_level, "noise_level")
        if step_set is not None:
            on = on & jnp.any(step_set == ctx.step)
        return on

    def identity(state, arg, ctx):
        if term.hook == "denoiser":
            return arg(ctx.x, ctx.cond)
        return arg

    def apply(state, arg, ctx):
        active = is_active(ctx)
        on = lambda: term.apply(state, arg, ctx)
        shapes = jax.eval_shape(on)
        zeros_info = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes[2])

        def off():
            return identity(state, arg, ctx), state, zeros_info

        out, new_state, info = jax.lax.cond(active, on, off)
        return out, new_state, WindowInfo(active, info)

    return GuidanceTerm(term.init, apply, term.hook)


def _identity_x0() -> GuidanceTerm:
    """A do-nothing x0 term (used in examples and tests of the plumbing)."""
    return GuidanceTerm(lambda x, cond, key: (), lambda s, x0, ctx: (x0, s, ()), "x0")
