"""The guidance-term protocol, its four hook points, ``chain``, ``window`` and ``stateless``.

A guidance term is an optax-style NamedTuple of pure functions plus a hook and a name::

    GuidanceTerm(init, apply, hook, name)

* ``init(x, cond, key) -> state`` is called once per :func:`jaxdiv.sample` call with the
  initial (scaled) noise batch.
* ``apply(state, arg, ctx) -> (out, state, info)`` is called at every denoiser evaluation;
  ``info`` is a pytree of per-step diagnostics kept in the trace under the term's name.
  What ``arg`` and ``out`` are depends on ``hook``:

  ============  ==========================================  ===========================
  hook          ``apply(state, arg, ctx)``                  examples
  ============  ==========================================  ===========================
  "condition"   ``arg = cond`` -> the condition             CADS
  "denoiser"    ``arg = denoise(x, cond)`` -> ``x0_hat``    CFG, interval guidance
  "x0"          ``arg = x0_hat`` -> ``x0_hat``              SPELL, particle guidance, GASS
  "model"       ``arg = None`` -> a model hook              contextual repulsion
  ============  ==========================================  ===========================

  ``denoise(x, cond) -> x0_hat`` calls the model at the current time; ``ctx`` is a
  :class:`StepContext`. Terms that couple samples see the whole batch.

  A ``"model"`` term acts *inside* the network's forward pass: its ``apply`` returns a
  hook, and every model call of that evaluation (both CFG branches included) receives the
  hooks of all model terms, in chain order, as ``denoiser(x, t, cond, model_hooks=(...))``.
  A denoiser that can run them takes that keyword (the SD3 pipeline's MMDiT calls each
  ``hook(block_index, text_stream) -> (text_stream, report)`` after every joint block) and
  then returns ``(x0_hat, reports)``: per hook, a tuple of its reports after each block
  (a pytree, ``None`` where it has nothing to say); any other denoiser is refused with a
  message naming the term. A hook must be a pytree whose numbers are leaves, and must be
  the identity when every leaf is zero: that is what :func:`window` hands the model where
  the term is inactive. The reports of an evaluation's first model call (CFG's doubled
  batch, or the plain call) reach the trace through the term's info: if it has a method
  ``with_model_report(per_block)``, its result replaces the info (contextual repulsion
  records the log Vendi of the text stream before and after each block this way).

**Compile once per structure.** :func:`jaxdiv.sample` traces every array leaf of a term
and keys its compile cache on everything else. So a factory binds module-level functions
with :class:`jax.tree_util.Partial` and stores every number as an array leaf (see
:mod:`jaxdiv.validation`): ``cfg(2.0)`` and ``cfg(3.0)`` share one compiled program and
``jax.grad`` reaches the scale. A closure over a Python float would recompile for every
value. :func:`stateless` does this for the common case of a term without state.

Hooks are strings; a term whose ``apply``/``init`` cannot take the protocol's arguments is
refused with a message naming the expected signature when it is chained or sampled.

Terms compose with :func:`chain` (conditions first, then the single denoiser-combination
term, then x0 terms in chain order; put SPELL last so its distance guarantee holds for
the final ``x0_hat``), are named there (``chain(spell=..., cfg=...)``; the trace's
``info`` is a dict by name) and are restricted in time with :func:`window`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.pytrees import partition

__all__ = [
    "HOOKS",
    "GuidanceTerm",
    "StepContext",
    "Chain",
    "PerGroup",
    "WindowInfo",
    "chain",
    "per_group",
    "window",
    "check_windows",
    "couples_batch",
    "needs_batch",
    "prompt_bound",
    "step_indices",
    "stateless",
    "as_terms",
    "init_terms",
    "guided_denoise",
    "run_if",
    "ModelCalls",
]

HOOKS = ("condition", "denoiser", "x0", "model")
_ARG = {"condition": "cond", "denoiser": "denoise", "x0": "x0_hat", "model": "None"}


class GuidanceTerm(NamedTuple):
    """One guidance method: ``init(x, cond, key) -> state``, ``apply(state, arg, ctx) ->
    (out, state, info)``, its ``hook`` and the ``name`` its diagnostics appear under.

    A term with state, written by hand: it counts the denoiser evaluations it has seen and
    reports the count (Heun's 4 steps to sigma = 0 evaluate 2 + 2 + 2 + 1 times; the trace
    keeps each step's first evaluation). A term without state is shorter with
    :func:`stateless`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> def _init(x, cond, key):
    ...     return jnp.zeros((), jnp.int32)
    >>> def _apply(count, x0_hat, ctx):
    ...     return x0_hat, count + 1, count + 1            # out, new state, info
    >>> counter = GuidanceTerm(_init, _apply, "x0", "counter")
    >>> s = samplers.edm(schedules.edm(), 4)
    >>> den = lambda x, t, c: x / (1 + t**2)               # exact denoiser of N(0, 1) data
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 1)), key=jax.random.key(0),
    ...                     guidance=counter, trace=True)
    >>> out.trace.info["counter"].tolist()
    [1, 3, 5, 7]
    """

    init: Callable
    apply: Callable
    hook: str
    name: str = "term"


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
        evaluation: 0 for a step's first denoiser evaluation, 1 for a second one (Heun's
            correction), ...
        step_t, step_noise_level: the time ``times[i]`` of the sampler's grid where step
            ``i`` starts, and its noise level ``sigma / alpha``, shared by every evaluation
            of the step (a Heun correction is evaluated at ``times[i + 1]``);
            :func:`jaxdiv.sample` sets them, a context built by hand without them reads
            ``t`` and ``noise_level``.
    """

    x: Any
    t: Any
    alpha: Any
    sigma: Any
    step: Any
    num_steps: int
    key: Any
    cond: Any
    evaluation: Any = 0
    step_t: Any = None
    step_noise_level: Any = None

    @property
    def noise_level(self):
        """``sigma / alpha``: the EDM-equivalent noise level, the same on every process."""
        return self.sigma / self.alpha

    def step_start(self):
        """``(step_t, step_noise_level)`` where set, else this evaluation's ``(t,
        noise_level)``."""
        if self.step_t is None:
            return self.t, self.noise_level
        return self.step_t, self.step_noise_level

    @property
    def progress(self):
        """``1 - step / num_steps``: 1 at the first (noisiest) step, towards 0 at the end."""
        return 1.0 - self.step / self.num_steps

    def score(self, x0_hat):
        """Tweedie's formula: ``score = (alpha x0_hat - x) / sigma^2``."""
        return (self.alpha * x0_hat - self.x) / self.sigma**2


class Chain(NamedTuple):
    """Several named terms applied in order; built by :func:`chain`.

    >>> from jaxdiv import guidance
    >>> g = guidance.chain(guidance.cfg(7.5), repel=guidance.particle(1.0))
    >>> g.names
    ('cfg', 'repel')
    """

    terms: tuple

    @property
    def names(self) -> tuple:
        return tuple(t.name for t in self.terms)


class PerGroup(NamedTuple):
    """Guidance with its own terms for each group of :func:`jaxdiv.sample`'s ``groups=``;
    built by :func:`per_group`.

    >>> from jaxdiv import guidance
    >>> g = guidance.per_group([guidance.cfg(w) for w in (1.0, 2.0, 4.0)])
    >>> g.size, g.names
    (3, ('cfg',))
    """

    chains: tuple  # one Chain per group, all of one structure

    @property
    def size(self) -> int:
        return len(self.chains)

    @property
    def names(self) -> tuple:
        return self.chains[0].names


def per_group(guidances) -> PerGroup:
    """One term or chain per group, of one structure: group ``g`` of ``jaxdiv.sample(...,
    groups=G)`` runs with ``guidances[g]``, as its own call with that guidance would
    (``groups`` defaults to ``len(guidances)``).

    A sweep over a method's strength or interval (traced window bounds), or per-prompt
    terms (GASS's text embedding, SPELL's per-prompt radius), in one compiled program. The
    terms must differ only in the *values* of their array leaves (strengths, radii,
    embeddings of one shape): a different method, setting that fixes the program (a Python
    value such as SPELL's ``memory_size``) or leaf shape is refused, naming the group and
    the leaf. Values are traced, so a new sweep reuses the program. An array that is the
    same object in every group (an encoder's weights, with each term built from one
    ``gass_encoder(pipe)``; SPELL's reference index, built once by ``reference_index(ref)``
    from ``jaxdiv.guidance.spell`` and given to every term) enters the program once (which
    leaves are shared is part of the program's structure); the others are stacked, one
    row per group. :func:`chain` takes a ``PerGroup`` beside shared terms
    (``chain(per_group([...]), guidance.cfg(7.5))``) and returns one.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import guidance, samplers, schedules
    >>> s, den = samplers.ddim(schedules.edm(), 4), lambda x, t, c: x * 0 + c
    >>> sweep = guidance.per_group([guidance.cfg(w) for w in (1.0, 2.0, 4.0)])
    >>> out = jaxdiv.sample(s, den, jnp.zeros((6, 1)), key=jax.random.key(0),
    ...                     cond=jnp.ones((6, 1)), guidance=sweep, groups=3)
    >>> out.x0[::2, 0].tolist()  # x0_hat = w c + (1 - w) 0: each group's own scale
    [1.0, 2.0, 4.0]
    """
    single = isinstance(guidances, (GuidanceTerm, Chain, PerGroup))
    if single or not hasattr(guidances, "__iter__"):
        raise TypeError("per_group takes a list with one term or chain per group, got "
                        f"{type(guidances).__name__}")  # fmt: skip
    guidances = list(guidances)  # a generator expression reads as well as a list
    if not guidances:
        raise ValueError("per_group needs one term or chain per group, got an empty list")
    chains = []
    for g, item in enumerate(guidances):
        if isinstance(item, PerGroup):
            raise TypeError(f"per_group: group {g} is itself per_group; give each group "
                            "its own terms")  # fmt: skip
        chains.append(Chain(_unique([(t, False) for t in _flatten(item, f"group {g}")])))
    for g, c in enumerate(chains[1:], 1):
        _check_same_structure(chains[0], c, g)
    return PerGroup(tuple(chains))


def _check_same_structure(first: Chain, other: Chain, g: int) -> None:
    if other.names != first.names:
        raise ValueError(f"per_group: group {g} has terms {other.names} but group 0 has "
                         f"{first.names}; every group needs the same terms")  # fmt: skip
    for t0, tg in zip(first.terms, other.terms):
        (d0, s0), (dg, sg) = partition(t0), partition(tg)
        if s0 == sg and all(a is None or (a.shape, a.dtype) == (b.shape, b.dtype)
                            for a, b in zip(d0, dg)):  # fmt: skip
            continue  # one program: the common case, checked at once
        # None as a leaf: a setting left out in one group and given in another is named
        l0, d0 = jax.tree_util.tree_flatten_with_path(t0, is_leaf=lambda v: v is None)
        lg, dg = jax.tree_util.tree_flatten_with_path(tg, is_leaf=lambda v: v is None)
        if d0 != dg:
            raise ValueError(
                f"per_group: group {g}'s {tg.name!r} term is built differently from group "
                f"0's (apply {_func_name(tg.apply)} vs {_func_name(t0.apply)}, or nested "
                "settings of another structure): only array values may differ")
        for (path, a), (_, b) in zip(l0, lg):
            where = f"group {g}'s {tg.name!r} term, {_leaf_words(tg, path)}"
            (da,), sa = partition([a]) if a is not None else ((None,), None)
            (db,), sb = partition([b]) if b is not None else ((None,), None)
            if sa != sb:  # what keys the compile: a setting, or an array against a number
                raise ValueError(f"per_group: {where} is {b!r} where group 0's is {a!r}; "
                                 "settings that fix the program must agree across groups "
                                 "(only array values may differ)")  # fmt: skip
            if da is not None and (da.shape, da.dtype) != (db.shape, db.dtype):
                raise ValueError(f"per_group: {where} has shape {db.shape} {db.dtype} where "
                                 f"group 0's has {da.shape} {da.dtype}")  # fmt: skip


def _leaf_words(term, path) -> str:
    """A leaf of a term named by the parameters of the ``Partial`` s it sits in and the
    fields below them (``setting 'space'``; windowed: ``setting 'apply.space'``), its
    exact path after."""
    exact = jax.tree_util.keystr(path)
    names, obj, keys = [], term, list(path)
    for i, k in enumerate(keys):
        if isinstance(k, jax.tree_util.GetAttrKey):
            if names:  # a field of a named argument
                names.append(k.name)
            obj = getattr(obj, k.name, None)
            continue
        nxt = keys[i + 1] if i + 1 < len(keys) else None
        if not (isinstance(obj, Partial) and isinstance(k, jax.tree_util.FlattenedIndexKey)
                and k.key == 0 and isinstance(nxt, jax.tree_util.SequenceKey)):  # fmt: skip
            if isinstance(obj, Partial) or names:
                continue  # the Partial's args tuple, or inside a named argument
            break
        try:
            names.append(list(inspect.signature(obj.func).parameters)[nxt.idx])
        except (TypeError, ValueError, IndexError):
            names.append(f"argument {nxt.idx}")
        obj = obj.args[nxt.idx] if nxt.idx < len(obj.args) else None
    if not names:
        return f"leaf {exact}"
    return f"setting {'.'.join(names)!r} (leaf {exact})"


def _func_name(fn) -> str:
    return getattr(getattr(fn, "func", fn), "__name__", type(fn).__name__)


def _binds(fn, nargs: int) -> bool:
    try:
        inspect.signature(fn).bind(*([None] * nargs))
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): trust the caller
        return True
    return True


def _check_term(term, where="guidance"):
    if isinstance(term, PerGroup):
        raise TypeError(
            f"{where} is per_group guidance (a chain for each of {term.size} group(s)): it "
            f"runs as jaxdiv.sample(..., guidance=..., groups={term.size}) or inside chain; "
            "to change the terms, change each group's before per_group"
        )
    if not isinstance(term, GuidanceTerm):
        hint = ""
        if isinstance(term, (list, tuple)) and not hasattr(term, "_fields"):
            hint = ("; to compose terms pass guidance.chain(*terms), to give each of "
                    "sample's groups its own pass guidance.per_group(terms)")  # fmt: skip
        raise TypeError(
            f"{where} must be a GuidanceTerm (or a chain of them), got "
            f"{type(term).__name__}{hint}"
        )
    if term.hook not in HOOKS:
        raise ValueError(f"{where}.hook must be one of {HOOKS}, got {term.hook!r}")
    if not isinstance(term.name, str) or not term.name:
        raise TypeError(f"{where}.name must be a non-empty string, got {term.name!r}")
    if not callable(term.init) or not _binds(term.init, 3):
        raise TypeError(
            f"{where} {term.name!r}: init must be callable as init(x, cond, key) -> state, "
            f"got {_describe(term.init)}"
        )
    if not callable(term.apply) or not _binds(term.apply, 3):
        raise TypeError(
            f"{where} {term.name!r} (hook {term.hook!r}): apply must be callable as "
            f"apply(state, {_ARG[term.hook]}, ctx) -> (out, state, info), got "
            f"{_describe(term.apply)}"
        )


def _describe(fn) -> str:
    if not callable(fn):
        return type(fn).__name__
    try:
        return f"{getattr(fn, '__name__', type(fn).__name__)}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return repr(fn)


def _flatten(guidance, where="guidance") -> list:
    if guidance is None:
        return []
    if isinstance(guidance, Chain):
        return [t for term in guidance.terms for t in _flatten(term, where)]
    _check_term(guidance, where)
    return [guidance]


def as_terms(guidance) -> tuple:
    """Normalise ``None``, a term or a (nested) :class:`Chain` to a flat tuple of terms
    with unique names.

    >>> as_terms(None)
    ()
    >>> [t.name for t in as_terms(chain(_identity_x0(), _identity_x0()))]
    ['identity', 'identity_2']
    """
    return _unique([(t, False) for t in _flatten(guidance)])


def _unique(flagged) -> tuple:
    """Terms with unique names: keyword names (flag True) are kept, and must differ;
    repeated factory names are numbered ``_2``, ``_3``, ..."""
    explicit = [t.name for t, fixed in flagged if fixed]
    taken = set(explicit)
    out = []
    for term, fixed in flagged:
        if not fixed:
            name, k = term.name, 2
            while name in taken:
                name, k = f"{term.name}_{k}", k + 1
            term = term._replace(name=name)
            taken.add(name)
        out.append(term)
    return tuple(out)


def chain(*terms, **named) -> Chain | PerGroup:
    """Compose guidance terms; nested chains are flattened.

    Keyword arguments name their term (``chain(cfg=guidance.cfg(7.5), spell=...)``);
    positional terms keep their factory's name (``"cfg"``, ``"spell"``, ...), numbered
    ``_2``, ``_3`` when repeated. The trace's ``info`` and the output's ``state`` are
    dicts keyed by these names.

    Conditions are transformed first (in order), then at most one denoiser-combination
    term calls the model, then x0 terms run in order. With a :func:`per_group` argument the
    result is per-group too: each group's chain holds the shared terms and its own.

    >>> g = chain(window(_identity_x0(), steps=[0]), pull=_identity_x0())
    >>> g.names
    ('identity', 'pull')
    """
    per = [a for a in (*terms, *named.values()) if isinstance(a, PerGroup)]
    if per:  # shared terms join every group's own
        sizes = sorted({p.size for p in per})
        if len(sizes) > 1:
            raise ValueError(f"chain got per_group guidance for different numbers of groups "
                             f"{sizes}; give every per_group one entry per group")  # fmt: skip

        def pick(a, g):
            if not isinstance(a, PerGroup):
                return a
            own = a.chains[g]
            return own.terms[0] if len(own.terms) == 1 else own

        return per_group([chain(*(pick(a, g) for a in terms),
                                **{k: pick(v, g) for k, v in named.items()})
                          for g in range(sizes[0])])  # fmt: skip
    flat = [(t, False) for term in terms for t in _flatten(term, "chain argument")]
    for name, term in named.items():
        if isinstance(term, Chain):
            raise TypeError(f"chain keyword {name!r} must be a single term, got a chain")
        _check_term(term, f"chain argument {name!r}")
        flat.append((term._replace(name=name), True))
    out = _unique(flat)
    n_den = sum(t.hook == "denoiser" for t in out)
    if n_den > 1:
        raise ValueError(
            f"chain got {n_den} denoiser-combination terms (hook='denoiser'); only one can "
            "call the model per evaluation. Combine them into one term (e.g. wrap CFG in "
            "window() instead of chaining interval guidance with CFG)."
        )
    return Chain(out)


def init_terms(terms, x, cond, key) -> dict:
    """Initial state of each term: a dict by name (each term gets its own key).

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiv import guidance
    >>> g = guidance.chain(guidance.cfg(2.0), guidance.particle(1.0))
    >>> sorted(init_terms(g.terms, jnp.zeros((3, 2)), jnp.ones((3, 4)), jax.random.key(0)))
    ['cfg', 'particle']
    """
    return {
        term.name: term.init(x, cond, jax.random.fold_in(key, j)) for j, term in enumerate(terms)
    }


class WindowInfo(NamedTuple):
    """Info of a windowed term as its ``apply`` returns it: whether it was active, and the
    inner term's info (zeros when inactive). :func:`jaxdiv.sample` unpacks it into
    ``trace.active[name]`` and ``trace.info[name]``."""

    active: Any
    inner: Any


def _unwrap(info):
    """``(active, info)`` with nested windows' activity combined."""
    active = jnp.asarray(True)
    while isinstance(info, WindowInfo):
        active = active & info.active
        info = info.inner
    return active, info


def guided_denoise(terms, denoiser, x, t, cond, states, *, schedule, step, num_steps, key,
                   evaluation=0, step_t=None):  # fmt: skip
    """One guided denoiser evaluation: condition hooks, model call(s), x0 hooks.

    ``step_t``: the grid time where the step starts (:attr:`StepContext.step_t`; default
    ``t``, right for a step's first evaluation without churn).

    Returns ``(x0_hat, states, infos, actives)``, the last three dicts by term name.
    Raises a clear error (at trace time) when the denoiser's output shape differs from ``x``.
    :func:`jaxdiv.sample` calls it at every evaluation; called alone it shows what the terms
    do to one ``x0_hat``:

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiv import guidance, schedules
    >>> def _double(x0_hat, ctx):
    ...     return 2 * x0_hat
    >>> terms = guidance.chain(guidance.stateless("x0", _double)).terms
    >>> den = lambda x, t, c: x / (1 + t**2)
    >>> x0_hat, states, infos, actives = guided_denoise(
    ...     terms, den, jnp.ones((2, 1)), 1.0, None, {"double": ()},
    ...     schedule=schedules.edm(), step=0, num_steps=1, key=jax.random.key(0))
    >>> x0_hat.tolist(), bool(actives["double"])
    ([[1.0], [1.0]], True)
    """
    alpha = schedule.alpha(t)
    sigma = schedule.sigma(t)
    if step_t is None:
        step_t, step_level = t, sigma / alpha
    else:
        step_level = schedule.sigma(step_t) / schedule.alpha(step_t)
    states = dict(states)
    infos, actives = {}, {}

    def ctx_for(j, c):
        k = jax.random.fold_in(key, j)
        return StepContext(x, t, alpha, sigma, step, num_steps, k, c, evaluation, step_t,
                           step_level)  # fmt: skip

    def record(term, out, like=None):
        # a user term's slip named at trace time, before scan's or broadcasting's message
        who = f"guidance term {term.name!r} (hook {term.hook!r})"
        if not (isinstance(out, tuple) and len(out) == 3):
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            raise TypeError(f"{who}: apply must return (value, state, info), got {got}")
        value, state, info = out
        check_like(f"{who}: apply's state", state, states[term.name], "init's")
        _check_state_dtypes(who, state, states[term.name])
        if like is not None:
            check_like(f"{who}: apply's {'cond' if term.hook == 'condition' else 'x0_hat'}",
                       value, like, "its input")  # fmt: skip
        states[term.name] = state
        actives[term.name], infos[term.name] = _unwrap(info)
        return value

    for j, term in enumerate(terms):
        if term.hook == "condition":
            cond = record(term, term.apply(states[term.name], cond, ctx_for(j, cond)), cond)
    model_terms = [term for term in terms if term.hook == "model"]
    hooks = tuple(record(term, term.apply(states[term.name], None, ctx_for(j, cond)))
                  for j, term in enumerate(terms) if term.hook == "model")  # fmt: skip

    def call(xx, cc):
        if hooks:
            out, reports = _call_with_hooks(denoiser, xx, t, cc, hooks, model_terms)
        else:
            out, reports = denoiser(xx, t, cc), None
        if not hasattr(out, "shape") or out.shape != xx.shape:
            raise ValueError(
                f"denoiser must return x0_hat with the shape of its input x {tuple(xx.shape)}, "
                f"got {getattr(out, 'shape', type(out))}"
            )
        return out.astype(xx.dtype), reports

    denoise = ModelCalls(call, reporting=bool(hooks))
    den = [j for j, term in enumerate(terms) if term.hook == "denoiser"]
    if den:
        term = terms[den[0]]
        x0_hat = record(term, term.apply(states[term.name], denoise, ctx_for(den[0], cond)), x)
    else:
        x0_hat = denoise(x, cond)
    if hooks and denoise.reports is not None:
        _check_same_trace(denoise.reports, terms[den[0]].name if den else None)
        for term, report in zip(model_terms, denoise.reports, strict=True):
            with_report = getattr(infos[term.name], "with_model_report", None)
            if with_report is not None:
                infos[term.name] = with_report(report)

    for j, term in enumerate(terms):
        if term.hook == "x0":
            x0_hat = record(term, term.apply(states[term.name], x0_hat, ctx_for(j, cond)),
                            x0_hat)  # fmt: skip
    return x0_hat, states, infos, actives


def check_like(what: str, got, want, whose: str) -> None:
    """``got`` must have ``want``'s tree structure and leaf shapes (what a scan carry, the
    next step or a condition's rows need); ValueError naming both, shape by shape.

    >>> check_like("x", {"a": jnp.ones(2)}, {"a": jnp.ones(3)}, "y")
    Traceback (most recent call last):
    ...
    ValueError: x must have the shape of y {'a': (3,)}, got {'a': (2,)}
    """
    shapes, wanted = jax.tree.map(np.shape, got), jax.tree.map(np.shape, want)
    if jax.tree.structure(got) != jax.tree.structure(want) or shapes != wanted:
        raise ValueError(f"{what} must have the shape of {whose} {wanted}, got {shapes}")


def _check_state_dtypes(who: str, got, want) -> None:
    """The state is the sampling loop's carry: apply must keep init's dtypes."""
    def dtype(v):  # typed PRNG keys have a dtype NumPy does not know
        return v.dtype if hasattr(v, "dtype") else np.result_type(v)

    got_d, want_d = jax.tree.map(dtype, got), jax.tree.map(dtype, want)
    if got_d != want_d:
        show = lambda d: jax.tree.map(str, d)  # noqa: E731
        raise TypeError(f"{who}: apply's state must keep init's dtypes {show(want_d)}, got "
                        f"{show(got_d)} (cast it, e.g. new.astype(old.dtype))")  # fmt: skip


class ModelCalls:
    """``denoise(x, cond) -> x0_hat`` as a ``"denoiser"`` term receives it; it keeps the
    model hooks' reports of its first call (``reports``, ``None`` before any call).

    The reports leave the term's ``apply`` by this side door, since ``apply`` returns only
    ``x0_hat``; :func:`run_if` carries them out of its ``lax.cond`` as an output. A term
    that calls ``denoise`` inside a transformation of its own (``lax.cond``, ``vmap``)
    would leak them; :func:`guided_denoise` refuses that with a message.
    """

    def __init__(self, call, reporting: bool = True):
        self._call = call
        self.reporting = reporting  # False: no model hooks, so no reports to carry
        self.reports = None

    def __call__(self, x, cond):
        out, reports = self._call(x, cond)
        if self.reports is None:
            self.reports = reports
        return out

    def collect(self, fn):
        """``(fn(), reports of the calls fn made)``, leaving the outer ``reports`` alone."""
        outer, self.reports = self.reports, None
        try:
            return fn(), self.reports
        finally:
            self.reports = outer


def _check_same_trace(reports, term_name) -> None:
    """Refuse reports created under a transformation that has ended (a leaked tracer)."""
    from jax._src import core  # the current trace has no public accessor

    current = getattr(getattr(core, "trace_ctx", None), "trace", None)
    if current is None:
        return
    for leaf in jax.tree.leaves(reports):
        if isinstance(leaf, jax.core.Tracer) and leaf._trace is not current:
            raise ValueError(
                f"guidance term {term_name!r} called denoise inside a transformation of its "
                "own (lax.cond, vmap, ...), so the model hooks' reports cannot reach the "
                "trace; wrap the conditional part with jaxdiv.guidance.base.run_if, which "
                "carries them out, or call denoise outside it"
            )


def _call_with_hooks(denoiser, x, t, cond, hooks, model_terms):
    names = [term.name for term in model_terms]
    try:
        out = denoiser(x, t, cond, model_hooks=hooks)
    except TypeError as e:
        if "model_hooks" not in str(e):
            raise
        # name the network that refused, not only its wrapper (a PredictionDenoiser)
        chain = [denoiser]
        while getattr(chain[-1], "model", None) is not None and len(chain) < 8:
            chain.append(chain[-1].model)
        who = " wrapping ".join(getattr(m, "__name__", None) or type(m).__name__ for m in chain)
        raise TypeError(
            f"guidance term(s) {names} act inside the model (hook='model'), but the denoiser "
            f"({who}) does not take model_hooks=: use a pipeline whose "
            "model runs them (an MMDiT: jaxdiv.pipelines.stable_diffusion_3)"
        ) from e
    if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], tuple)
            and len(out[1]) == len(hooks)):  # fmt: skip
        raise TypeError(
            f"a denoiser called with model_hooks= (for guidance term(s) {names}) must return "
            f"(x0_hat, reports), reports a tuple with one entry per hook ({len(hooks)}), "
            f"got {type(out).__name__}"
        )
    return out


def _bounds(value, name):
    """``(low, high]`` as two scalar leaves, ``None`` ends open (+-inf)."""
    if value is None:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{name} must be a (low, high) pair, got {value!r}")
    lo = validation.real(f"{name}[0]", -np.inf if value[0] is None else value[0],
                         allow_inf=True)  # fmt: skip
    hi = validation.real(f"{name}[1]", np.inf if value[1] is None else value[1],
                         allow_inf=True)  # fmt: skip
    if validation.is_concrete(lo, hi) and not float(lo) < float(hi):
        raise ValueError(f"{name} must have low < high, got {value!r}")
    return lo, hi


def _within(value, bounds):
    if bounds is None:
        return jnp.asarray(True)
    lo, hi = bounds
    return (value > lo) & (value <= hi)


def run_if(active, apply, hook, state, arg, ctx):
    """``apply(state, arg, ctx)`` where ``active``, the identity elsewhere (``lax.cond``:
    inactive evaluations skip the term's computation), with :class:`WindowInfo`.

    :func:`window` builds its terms on it; a custom windowing term can too:

    >>> import jax, jax.numpy as jnp
    >>> apply = lambda state, x0, ctx: (x0 + 1.0, state, jnp.sum(x0))
    >>> ctx = StepContext(jnp.zeros(2), 1.0, 1.0, 1.0, 0, 1, jax.random.key(0), None)
    >>> out, _, info = run_if(jnp.asarray(False), apply, "x0", (), jnp.ones(2), ctx)
    >>> out.tolist(), bool(info.active), float(info.inner)
    ([1.0, 1.0], False, 0.0)
    """
    on = lambda: apply(state, arg, ctx)
    reporting = hook == "denoiser" and isinstance(arg, ModelCalls) and arg.reporting
    # the model hooks' reports (if any) leave the cond as an output, not through the closure
    shapes, on_reports = jax.eval_shape(lambda: arg.collect(on)) if reporting else (
        jax.eval_shape(on), None)  # fmt: skip

    def zeros(tree):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

    def off():
        if hook == "denoiser":
            out = arg(ctx.x, ctx.cond)
        elif hook == "model":  # a model hook whose leaves are all zero is the identity
            out = zeros(shapes[0])
        else:
            out = arg
        return out, state, zeros(shapes[2])

    if reporting:
        out, new_state, info = _cond_with_reports(active, on, off, arg, on_reports)
    else:
        out, new_state, info = jax.lax.cond(active, on, off)
    return out, new_state, WindowInfo(active, info)


def _cond_with_reports(active, on, off, calls, on_reports):
    """``lax.cond(active, on, off)`` whose branches call the model through ``calls``: the
    reports of the taken branch's first call are handed on to ``calls``."""
    like = on_reports if on_reports is not None else jax.eval_shape(lambda: calls.collect(off))[1]
    if like is None:
        return jax.lax.cond(active, on, off)

    def branch(fn):  # a branch without a model call reports NaN
        out, reports = calls.collect(fn)
        if reports is None:
            reports = jax.tree.map(lambda s: jnp.full(s.shape, jnp.nan, s.dtype), like)
        return out, reports

    out, reports = jax.lax.cond(active, lambda: branch(on), lambda: branch(off))
    if calls.reports is None:
        calls.reports = reports
    return out


def _window_apply(apply, hook, t, noise_level, steps, per_step, state, arg, ctx):
    now_t, now_level = ctx.step_start() if per_step else (ctx.t, ctx.noise_level)
    active = _within(now_t, t) & _within(now_level, noise_level)
    if steps is not None:
        active = active & jnp.any(steps == ctx.step)
    return run_if(active, apply, hook, state, arg, ctx)


_BATCH_FLAGS = ("couples_batch", "needs_batch", "prompt_bound")


def delegates_flags(fn):
    """Mark ``fn``, an ``apply`` whose first ``Partial`` argument is the ``apply`` it wraps
    (:func:`window`, GASS's schedule), as answering every batch flag
    (:func:`couples_batch`, :func:`needs_batch`, :func:`prompt_bound`) as the wrapped
    ``apply`` does."""
    for flag in _BATCH_FLAGS:
        setattr(fn, flag, lambda apply, *_, f=flag: apply_flag(apply, f))
    return fn


delegates_flags(_window_apply)


def step_indices(steps, name: str = "steps") -> np.ndarray:
    """Sampler step indices as a sorted unique int64 NumPy array, checked.

    Every entry must be an integer ``>= 0`` (Python or NumPy ints, or an integer array;
    bools and floats such as ``1.7`` are refused rather than truncated). Checked with
    NumPy, so a window can be built inside a ``jit`` trace. Whether the indices exist on
    a sampler (``< num_steps``) is checked by :func:`jaxdiv.sample`, which knows ``N``.

    >>> step_indices([3, 0, 3]).tolist()
    [0, 3]
    >>> step_indices([1.7])
    Traceback (most recent call last):
    ...
    TypeError: steps must be a sequence of integer step indices, got 1.7 (float)
    """
    if isinstance(steps, jax.core.Tracer):
        raise TypeError(f"{name} must be concrete integer step indices, got a traced value")
    if isinstance(steps, (str, bytes)) or np.ndim(steps) != 1:
        raise TypeError(f"{name} must be a sequence of integer step indices, got {steps!r}")
    try:
        items = list(np.ravel(np.asarray(steps, dtype=object)))
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a sequence of integer step indices, got "
                        f"{steps!r}") from None  # fmt: skip
    for v in items:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be a sequence of integer step indices, got {v!r} "
                            f"({type(v).__name__})")  # fmt: skip
    idx = np.unique(np.asarray([int(v) for v in items], np.int64))
    if idx.size == 0:
        raise ValueError(f"{name} must name at least one step index")
    if idx.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {steps!r}")
    return idx


def _window_parts(apply):
    """The ``(t, noise_level, steps)`` restrictions of every window wrapped around
    ``apply`` (outermost first)."""
    out = []
    while isinstance(apply, Partial) and apply.func is _window_apply:
        inner, _hook, t, noise_level, steps, _per_step = apply.args
        out.append((t, noise_level, steps))
        apply = inner
    return out


def _process_ranges(schedule) -> dict:
    """``{"t": (lo, hi), "noise_level": (lo, hi)}`` of a schedule with a ``time_range``
    whose numbers are concrete; ``{}`` where they cannot be known (a custom schedule, or
    one traced under ``jit``)."""
    try:
        lo, hi = schedule.time_range
        levels = schedule.noise_level(jnp.asarray([lo, hi], jnp.float32))
    except (AttributeError, TypeError, ValueError):
        return {}
    if not validation.is_concrete(levels):
        return {}
    lv = np.asarray(levels, np.float64)
    return {"t": (float(lo), float(hi)), "noise_level": (float(lv[0]), float(lv[1]))}


def _check_in_range(name, kind, bounds, span, process) -> None:
    """Refuse a concrete ``(low, high]`` that misses ``(span[0], span[1]]`` (the clean
    end ``span[0]`` is never evaluated)."""
    if bounds is None or span is None or not validation.is_concrete(*bounds):
        return
    low, high = (float(b) for b in bounds)
    if high <= span[0] or low >= span[1]:
        raise ValueError(
            f"guidance term {name!r}: window({kind}=({low:g}, {high:g}]) lies outside the "
            f"{'times' if kind == 't' else 'noise levels'} of the sampler's process, "
            f"[{span[0]:.4g}, {span[1]:.4g}] ({process}): the term would never act"
            + (" (t is in the schedule's own units)" if kind == "t" else
               " (noise_level is sigma / alpha)")
        )  # fmt: skip


def couples_batch(term: GuidanceTerm) -> bool:
    """Whether ``term`` makes each sample's update depend on the other samples of the
    batch (SPELL's intra-batch shields, PG's repulsion, GASS's spread, contextual
    repulsion), windowed or not.

    A term's ``apply`` callable says so with a ``couples_batch`` attribute: ``True``, or a
    function of the ``Partial``'s arguments (SPELL couples only with ``intra_batch``; a
    wrapper such as :func:`window` asks the ``apply`` it wraps, through
    :func:`apply_flag`). Callers that put several groups in one batch
    (:func:`jaxdiv.pipelines.generation.generate` with several prompts) use it to keep the
    groups apart (``jaxdiv.sample(..., groups=)``).

    >>> from jaxdiv import guidance
    >>> couples_batch(guidance.particle(1.0)), couples_batch(guidance.cfg(3.0))
    (True, False)
    >>> couples_batch(window(guidance.spell(0.5), steps=[0]))
    True
    """
    return apply_flag(term.apply, "couples_batch")


def needs_batch(term: GuidanceTerm) -> bool:
    """Whether ``term`` acts only between the samples of a batch, so that a batch of one
    sample leaves it idle (PG, contextual repulsion, SPELL with intra-batch shields only:
    no ``reference``, no memory), windowed or not. GASS couples the batch but moves a
    lone sample too (towards its target on the sphere).

    Read from a ``needs_batch`` attribute of the term's ``apply`` as :func:`couples_batch`
    reads its own. :func:`jaxdiv.pipelines.generation.generate` refuses such a method
    with ``n=1``.

    >>> from jaxdiv import guidance
    >>> needs_batch(guidance.particle(1.0)), needs_batch(guidance.spell(0.5))
    (True, True)
    >>> needs_batch(guidance.spell(0.5, reference=jnp.zeros((3, 2)))), needs_batch(guidance.cfg(3.0))
    (False, False)
    """  # noqa: E501
    return apply_flag(term.apply, "needs_batch")


def prompt_bound(term: GuidanceTerm) -> bool:
    """Whether ``term`` holds data of the prompts it was built for (GASS: one prompt's text
    embedding as its target direction; TPSO: optimised variants of every row of its
    batch), windowed or not: it cannot be shared by groups of other prompts or rows.
    :func:`jaxdiv.pipelines.generation.generate` refuses such a method where it would run
    the prompts as groups (several prompts and a term that couples the batch) unless it
    comes as :func:`per_group`, one term per prompt. Read from a
    ``prompt_bound`` attribute of the term's ``apply`` as :func:`couples_batch` reads its
    own.

    >>> from jaxdiv import guidance
    >>> from toy.encoder import sphere_encoder
    >>> enc = sphere_encoder(jax.random.key(0), 3)
    >>> gass = guidance.window(guidance.gass(enc, enc.text_emb), steps=[0])
    >>> prompt_bound(gass), prompt_bound(guidance.spell(0.5))
    (True, False)
    """
    return apply_flag(term.apply, "prompt_bound")


def apply_flag(apply, flag: str) -> bool:
    """A flag (``"couples_batch"``, ``"needs_batch"``, ``"prompt_bound"``) of a term's
    ``apply``: the callable's attribute, ``True`` or a function of the ``Partial``'s
    arguments; absent means ``False``."""
    fn, args = (apply.func, apply.args) if isinstance(apply, Partial) else (apply, ())
    value = getattr(fn, flag, False)
    return bool(value(*args) if callable(value) else value)


def check_windows(terms, sampler, ranges: dict | None = None) -> None:
    """Refuse windows that can never be active on ``sampler`` (:func:`jaxdiv.sample`
    calls it, since only there the number of steps ``N`` and the process are known).
    ``ranges``: a dict that keeps the process's ranges between calls on one sampler
    (``sample`` checks each :func:`per_group` entry with one).

    A step index ``>= N`` names a step that does not exist, so a window (or a GASS
    ``steps=`` list) holding one would silently never act there: it is refused, naming
    the term, the indices and ``N``. A ``t=`` / ``noise_level=`` interval that lies wholly
    outside the process's range (the schedule's ``time_range`` and the noise levels
    there) is refused too: no sampler on that process could ever use it, typically a
    bound in another process's units (SD's timesteps ``0..999`` on SD3's flow times
    ``0..1``, EDM's ``sigma`` up to 80 on SD, whose noise levels end near 14.6).
    Intervals inside the range that merely miss this sampler's grid are not refused: an
    interval-guidance sweep legitimately includes empty intervals (plain conditional
    sampling); ``trace.active`` shows where a term acted.

    >>> from jaxdiv import samplers, schedules
    >>> s = samplers.ddim(schedules.edm(), 6)
    >>> check_windows(as_terms(window(_identity_x0(), steps=[100])), s)
    Traceback (most recent call last):
    ...
    ValueError: guidance term 'identity': window(steps=...) names step indices [100] but the sampler has 6 steps (indices 0..5); the term would never act there
    >>> check_windows(as_terms(window(_identity_x0(), t=(200, 800))),
    ...               samplers.flow_euler(schedules.flow(), 6))
    Traceback (most recent call last):
    ...
    ValueError: guidance term 'identity': window(t=(200, 800]) lies outside the times of the sampler's process, [0, 1] (flow): the term would never act (t is in the schedule's own units)
    """  # noqa: E501
    n = sampler.num_steps
    ranges = {} if ranges is None else ranges

    def span(kind):  # computed on first need: a few eager ops (ms on VP), not per plain call
        if not ranges:
            ranges.update(_process_ranges(sampler.schedule), computed=True)
        return ranges.get(kind)

    for term in terms:
        for t, noise_level, steps in _window_parts(term.apply):
            for kind, bounds in (("t", t), ("noise_level", noise_level)):
                if bounds is not None:
                    _check_in_range(term.name, kind, bounds, span(kind),
                                    getattr(sampler.schedule, "name", "?"))  # fmt: skip
            if steps is not None and validation.is_concrete(steps):
                idx = np.asarray(steps)
                bad = idx[idx >= n]
                if bad.size:
                    raise ValueError(
                        f"guidance term {term.name!r}: window(steps=...) names step indices "
                        f"{bad.tolist()} but the sampler has {n} steps (indices 0..{n - 1}); "
                        "the term would never act there"
                    )
        _check_never_acts(term, n, lambda: span("noise_level"))


def _check_never_acts(term, num_steps, levels) -> None:
    """Refuse a term that its own settings keep off on this sampler: its apply's
    ``never_acts(num_steps, levels, *params) -> str | None`` attribute says why (PG's
    ``min_noise_level`` above every noise level of the process, TPSO's ratio scheduling
    no step); ``levels()`` gives the process's noise-level range, or None where unknown."""
    apply = term.apply
    while isinstance(apply, Partial) and apply.func is _window_apply:
        apply = apply.args[0]
    check = getattr(apply.func, "never_acts", None) if isinstance(apply, Partial) else None
    why = None if check is None else check(num_steps, levels(), *apply.args)
    if why:
        raise ValueError(f"guidance term {term.name!r}: {why}: the term would never act")


def window(term: GuidanceTerm | Chain | PerGroup, *, t=None, noise_level=None, steps=None,
           per_step: bool = False) -> GuidanceTerm | Chain | PerGroup:  # fmt: skip
    """Restrict ``term`` to part of the trajectory; elsewhere it is the identity.

    Args:
        term: the guidance term to restrict (it keeps its name); a :func:`chain` or
            :func:`per_group` gets the window on each of its terms.
        t: ``(low, high]`` interval of process time ``t`` (None for an open end).
        noise_level: ``(low, high]`` interval of ``sigma / alpha`` — the same on VP, EDM
            and flow processes (interval guidance, Kynkaanniemi et al. 2024, Sec. 3).
            :func:`jaxdiv.sample` refuses a ``t`` or ``noise_level`` interval wholly
            outside the process's range (see :func:`check_windows`).
        steps: sampler step indices (a sequence of ints) where the term is active;
            floats and bools are refused, and :func:`jaxdiv.sample` refuses indices
            ``>= N`` (see :func:`check_windows`).
        per_step: test ``t`` / ``noise_level`` once per sampler step, at the grid point
            where the step starts (:attr:`StepContext.step_t`), so that every evaluation
            of a step follows one decision (EDM2's official interval guidance does this
            for both Heun evaluations); default False: at each evaluation's own ``t``.
            The two differ only for samplers with several evaluations per step (Heun) or
            churn.

    All given conditions must hold. Inactive evaluations skip the term's computation
    (``lax.cond``) and report zero info; ``out.trace.active[name]`` says which steps were
    active. The bounds and step indices are traced leaves: a new window of the same kind
    (and the same number of steps) reuses the compiled program.

    >>> g = window(_identity_x0(), noise_level=(0.28, 5.42))
    >>> g.hook, g.name
    ('x0', 'identity')
    >>> window(chain(_identity_x0(), pull=_identity_x0()), steps=[0]).names
    ('identity', 'pull')
    """
    where = dict(t=t, noise_level=noise_level, steps=steps, per_step=per_step)
    if isinstance(term, Chain):
        return Chain(tuple(window(one, **where) for one in term.terms))
    if isinstance(term, PerGroup):
        return per_group([window(c, **where) for c in term.chains])
    _check_term(term, "term")
    if t is None and noise_level is None and steps is None:
        raise ValueError("window needs at least one of t=, noise_level=, steps=")
    if not isinstance(per_step, (bool, np.bool_)):
        raise TypeError(f"per_step must be True or False, got {per_step!r}")
    if per_step and t is None and noise_level is None:
        raise ValueError("per_step=True needs t= or noise_level= (steps= is per step already)")
    step_idx = None
    if steps is not None:
        step_idx = jnp.asarray(step_indices(steps), jnp.int32)
    apply = Partial(_window_apply, term.apply, term.hook, _bounds(t, "t"),
                    _bounds(noise_level, "noise_level"), step_idx, bool(per_step))  # fmt: skip
    return term._replace(apply=apply)


def no_state(x, cond, key):
    """``init`` of a term without state."""
    return ()


def _stateless_apply(fn, with_info, params, state, arg, ctx):
    out = fn(arg, ctx, **params)
    if with_info:
        if not (isinstance(out, tuple) and len(out) == 2):
            got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
            name = getattr(fn, "__name__", fn)
            raise TypeError(f"stateless term fn {name!r} was built with info=True, so it "
                            f"must return (out, info); got {got}")  # fmt: skip
        out, info = out
    else:
        info = ()
    return out, state, info


def stateless(hook: str, fn: Callable, *, name: str | None = None, info: bool = False,
              **params) -> GuidanceTerm:  # fmt: skip
    """A guidance term without state from ``fn(arg, ctx, **params) -> out``.

    Like optax's ``stateless``: ``fn`` is the whole method; each keyword in ``params`` is
    a hyperparameter, checked (numbers must be finite, arrays finite) and stored as a
    traced leaf, so a new value reuses the compiled program. With ``info=True`` ``fn``
    returns ``(out, info)`` and ``info`` lands in the trace. ``fn`` should be a
    module-level function (a new lambda each call is a new program).

    Args:
        hook: ``"condition"``, ``"denoiser"``, ``"x0"`` or ``"model"`` (see the module
            docstring for what ``arg`` is).
        fn: ``fn(arg, ctx, **params)``.
        name: the name in traces (default: ``fn.__name__`` without leading underscores).
        info: whether ``fn`` also returns diagnostics.
        **params: numbers or arrays.

    A complete custom term, "push ``x0_hat`` away from the batch mean":

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import guidance, samplers, schedules
    >>> def _away_from_mean(x0_hat, ctx, strength):
    ...     return x0_hat + strength * (x0_hat - x0_hat.mean(axis=0))
    >>> def away_from_mean(strength):
    ...     return guidance.stateless("x0", _away_from_mean, strength=strength)
    >>> s = samplers.ddim(schedules.edm(), 4)
    >>> den = lambda x, t, c: x / (1 + t**2)           # exact denoiser of N(0, 1) data
    >>> noise = jnp.array([[-1.0], [1.0]])
    >>> plain = jaxdiv.sample(s, den, noise, key=jax.random.key(0)).x0
    >>> pushed = jaxdiv.sample(s, den, noise, key=jax.random.key(0),
    ...                        guidance=away_from_mean(0.5)).x0
    >>> bool(jnp.all(jnp.abs(pushed) > jnp.abs(plain)))
    True
    """
    validation.choice("hook", hook, HOOKS)
    validation.function("fn", fn, f"fn({_ARG[hook]}, ctx, **params)")
    try:
        inspect.signature(fn).bind(None, None, **dict.fromkeys(params))
    except TypeError:
        raise TypeError(
            f"fn must accept ({_ARG[hook]}, ctx, {', '.join(params) or ''}) for hook "
            f"{hook!r}, got {_describe(fn)}"
        ) from None
    except ValueError:
        pass
    checked = {}
    for key, value in params.items():
        if value is None or isinstance(value, str | bool):
            checked[key] = value
        elif np.ndim(value) == 0:
            checked[key] = validation.real(key, value)
        else:
            checked[key] = validation.finite_array(key, value)
    if name is None:
        name = getattr(fn, "__name__", "term").lstrip("_") or "term"
    apply = Partial(_stateless_apply, fn, validation.boolean("info", info), checked)
    return GuidanceTerm(no_state, apply, hook, name)


def _identity(x0_hat, ctx):
    return x0_hat


def _identity_x0() -> GuidanceTerm:
    """A do-nothing x0 term (used in examples and tests of the plumbing)."""
    return stateless("x0", _identity)
