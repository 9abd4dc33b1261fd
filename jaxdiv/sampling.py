"""The one entry point: :func:`sample`."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import distributed, validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.grouping import GROUP_AXIS
from jaxdiv.guidance.base import (
    PerGroup,
    _binds,
    _describe,
    as_terms,
    check_windows,
    guided_denoise,
    init_terms,
    prompt_bound,
)
from jaxdiv.pytrees import combine, partition
from jaxdiv.samplers.base import Sampler

__all__ = ["sample", "lower", "SampleOutput", "Trace", "compile_count"]


class Trace(NamedTuple):
    """Per-step record, each field stacked over the ``N`` steps (with ``sample(...,
    groups=G)``, each field's leading axis is the ``G`` groups, each holding its group's
    record: ``x`` is ``(G, N, B / G, ...)``).

    Attributes:
        t: ``(N,)`` process time at the start of each step.
        x: ``(N, B, ...)`` the noisy batch ``x_t`` entering each step.
        x0_hat: ``(N, B, ...)`` the guided ``x0_hat`` of each step's first evaluation.
        info: dict by term name: each term's ``Info`` stacked over steps (a windowed
            term's own info, zeros where it was inactive).
        active: dict by term name: ``(N,)`` whether the term acted at that step (always
            True for a term without a window).
    """

    t: Any
    x: Any
    x0_hat: Any
    info: dict
    active: dict


class SampleOutput(NamedTuple):
    """Result of :func:`sample`.

    Attributes:
        x0: final samples, shape of ``noise``.
        trace: a :class:`Trace` when ``trace=True``, else None.
        state: the guidance terms' final states, a dict by term name (pass it back as
            ``guidance_state=`` to continue, e.g. SPELL's memory of earlier batches).
        sampler_state: the sampler's final state (``()`` for one-step samplers).

    With ``sample(..., groups=G)``, ``x0`` keeps the shape of ``noise`` and the others
    gain a leading axis of the ``G`` groups.
    """

    x0: Any
    trace: Trace | None
    state: dict
    sampler_state: Any = ()


_COMPILES = [0]


def compile_count() -> int:
    """How many times :func:`sample` has traced (and so compiled) its program so far.

    A new sampler structure, denoiser, guidance structure, shape or dtype costs one
    compile; new *values* of guidance hyperparameters (array leaves) cost none. Use it to
    check that a sweep reuses one program.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import guidance, samplers, schedules
    >>> s = samplers.ddim(schedules.edm(), 4)
    >>> den = lambda x, t, c: x * 0 + c
    >>> before = jaxdiv.compile_count()
    >>> for w in (1.0, 2.0, 3.0):
    ...     _ = jaxdiv.sample(s, den, jnp.zeros((2, 1)), key=jax.random.key(0),
    ...                       cond=jnp.ones((2, 1)), guidance=guidance.cfg(w))
    >>> jaxdiv.compile_count() - before
    1
    """
    return _COMPILES[0]


def _run_impl(spec, trace, groups, dynamic, noise, key, cond, gstate):
    _COMPILES[0] += 1  # Python side effect: runs once per trace, i.e. per compile
    (model_spec, terms_spec, stacked, mesh), (model_dynamic, terms_dynamic) = spec, dynamic
    sampler, denoiser = combine(model_dynamic, model_spec)

    def run(terms_dynamic, noise, key, cond, gstate):
        terms = combine(terms_dynamic, terms_spec)
        return _one_run(sampler, denoiser, terms, trace, noise, key, cond, gstate)

    if groups == 1:
        return run(terms_dynamic, noise, key, cond, gstate)
    # each group runs as a call of its own (the shared key or its own): vmap, not a loop,
    # keeps one program whose model calls see the whole batch
    key_axis = 0 if group_keys(key, groups) else None
    noise_g, cond_g = _keep_split(split_groups((noise, cond), groups), mesh, groups,
                                  noise.shape[0])  # fmt: skip
    x0, tr, gstate, sstate = jax.vmap(
        run, in_axes=(_terms_axes(stacked), 0, key_axis, 0, 0), axis_name=GROUP_AXIS)(
        terms_dynamic, noise_g, key, cond_g, gstate)
    x0 = x0.reshape(noise.shape)
    if mesh is not None:  # back to the batch's own split (XLA would gather it)
        x0 = jax.lax.with_sharding_constraint(
            x0, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(distributed.DATA)))
    return x0, tr, gstate, sstate


def _group_split(mesh, groups: int, batch: int):
    """Whether ``(groups, batch // groups, ...)`` can stay split over the mesh's data axis,
    and the constraint that keeps it so (``None``: the devices' blocks of the batch already
    hold whole groups, or whole devices' blocks make a group)."""
    n = mesh.shape[distributed.DATA]
    if groups % n == 0 or n % groups == 0:
        return True, None
    if (batch // groups) % n == 0:  # every group's rows spread over all devices
        return True, jax.sharding.PartitionSpec(None, distributed.DATA)
    return False, None


def _keep_split(tree, mesh, groups: int, batch: int):
    """The grouped batch kept split over the data axis. Groups that do not line up with the
    devices' blocks (3 groups of 4 on 4 devices) are otherwise read by XLA as a replicated
    array: every device then ran the whole batch."""
    spec = None if mesh is None else _group_split(mesh, groups, batch)[1]
    if spec is None:
        return tree
    sharding = jax.sharding.NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, sharding), tree)


def _terms_axes(stacked):
    """vmap's axes of the terms' leaves: per_group's stacked ones along the groups."""
    return None if stacked is None else [0 if s else None for s in stacked]


def split_groups(tree, groups: int):
    """Every leaf's leading axis ``B`` as ``(groups, B // groups)``.

    >>> split_groups({"x": jnp.zeros((6, 2))}, 3)["x"].shape
    (3, 2, 2)
    """
    return jax.tree.map(lambda a: a.reshape((groups, a.shape[0] // groups) + a.shape[1:]), tree)


def group_keys(key, groups: int) -> bool:
    """Whether ``key`` holds one typed PRNG key per group (shape ``(groups,)``)."""
    dtype = getattr(key, "dtype", None)
    return (groups > 1 and dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)
            and tuple(key.shape) == (groups,))  # fmt: skip


def _one_run(sampler, denoiser, terms, trace, noise, key, cond, gstate):
    # the grid in the run's precision: float32, float64 for a float64 run (x64 mode)
    run_dtype = working_dtype(noise)
    sampler = sampler._replace(times=sampler.times.astype(run_dtype))
    n = sampler.num_steps
    times = sampler.times
    key_noise, key_guide = jax.random.split(key)
    keys = jax.random.split(key_noise, noise.shape[0])
    x = sampler.schedule.init_noise_scale(times[0]).astype(noise.dtype) * noise
    sstate = sampler.init(sampler, x)

    def body(carry, i):
        x, sstate, gstate = carry
        step_key = jax.random.fold_in(key_guide, i)

        def denoise(xx, t, c):
            gs, n_eval = c
            x0, gs, info, active = guided_denoise(
                terms, denoiser, xx, t, cond, gs,
                schedule=sampler.schedule, step=i, num_steps=n,
                key=jax.random.fold_in(step_key, n_eval), evaluation=n_eval, step_t=times[i],
            )  # fmt: skip
            return x0, (gs, n_eval + 1), (info, active)

        x_next, sstate, (gstate, _), (x0_hat, (info, active)) = sampler.step(
            sampler, i, x, sstate, denoise, (gstate, jnp.int32(0)), keys
        )
        out = Trace(times[i], x, x0_hat, info, active) if trace else None
        return (x_next.astype(x.dtype), sstate, gstate), out

    (x, sstate, gstate), tr = jax.lax.scan(body, (x, sstate, gstate), jnp.arange(n))
    return x, tr, gstate, sstate


_run = jax.jit(_run_impl, static_argnums=(0, 1, 2))


def _check_epsilon_at_alpha_zero(sampler, denoiser):
    """An epsilon-prediction network gives ``x0_hat = (x - sigma eps) / alpha``: where the
    sampler evaluates it at ``alpha = 0`` (a flow grid's ``t = 1``) every output is NaN."""
    if getattr(denoiser, "prediction_type", None) != "epsilon":
        return
    schedule = getattr(denoiser, "schedule", None)
    if not callable(getattr(schedule, "alpha", None)) or not validation.is_concrete(
            sampler.times, schedule):  # fmt: skip
        return
    # alpha falls with t on every process: only the grid's first (largest) time can be 0
    t0 = float(np.asarray(sampler.times)[0])
    with jax.ensure_compile_time_eval():
        alpha = schedule.alpha(t0)
    if not validation.is_concrete(alpha):
        return
    if float(alpha) == 0:
        raise ValueError(
            f"denoiser: an epsilon-prediction network gives x0_hat = (x - sigma eps) / alpha, "
            f"undefined where alpha = 0, and the sampler evaluates it at t = "
            f"{t0:g} ({getattr(schedule, 'name', type(schedule).__name__)}), "
            "where alpha = 0; pass times= starting below it, or wrap a 'flow' or "
            "'v_prediction' network"
        )


def _check_process(sampler, denoiser):
    """A denoiser that carries its schedule (a wrapped network,
    :func:`~jaxdiv.predictions.as_denoiser`, every pipeline's ``denoiser``; the toys'
    exact and MLP denoisers) reads ``t`` on it: the sampler's schedule must give the
    same ``alpha(t)`` and ``sigma(t)`` at the sampler's times, or every step would move
    ``x`` on one process while the network denoises another (a silent wrong answer).
    The grid may differ (a flow ``shift`` only moves the times)."""
    mine, theirs = getattr(denoiser, "schedule", None), sampler.schedule
    if not (callable(getattr(mine, "alpha", None)) and callable(getattr(mine, "sigma", None))):
        return
    if mine is theirs or not validation.is_concrete(sampler.times, mine, theirs):
        return
    t = np.asarray(sampler.times, np.float64)
    names = (f"{getattr(theirs, 'name', type(theirs).__name__)!r}",
             f"{getattr(mine, 'name', type(mine).__name__)!r}")  # fmt: skip
    fix = ("build the sampler on the denoiser's schedule (a pipeline's own pipe.ddim(N), "
           "pipe.flow_euler(N), ..., or samplers.<name>(denoiser.schedule, N))")
    try:
        pairs = [(np.asarray(f(mine)(t), np.float64), np.asarray(f(theirs)(t), np.float64))
                 for f in (lambda s: s.alpha, lambda s: s.sigma)]  # fmt: skip
    except ValueError as err:  # the sampler's times lie outside the network's schedule
        raise ValueError(f"sampler: its schedule {names[0]} has times the denoiser's schedule "
                         f"{names[1]} does not ({err}); {fix}") from None  # fmt: skip
    for (want, got), what in zip(pairs, ("alpha", "sigma"), strict=True):
        if not np.allclose(got, want, rtol=1e-5, atol=1e-7):
            i = int(np.argmax(np.abs(got - want)))
            raise ValueError(
                f"sampler: its schedule {names[0]} is not the process the denoiser reads t on "
                f"({names[1]}): at t = {t[i]:.6g} {what} is {got[i]:.6g} for the sampler and "
                f"{want[i]:.6g} for the denoiser; {fix}"
            )


def _check_inputs(sampler, denoiser, noise, key, cond, groups):
    if not isinstance(sampler, Sampler):
        raise TypeError(
            "sampler must be a jaxdiv.samplers.Sampler (ddim, edm, flow_euler, flow_heun, "
            "dpmpp_2m, dpmpp_2m_sde, dpmpp_3m, dpmpp_3m_sde, or your own), "
            f"got {type(sampler).__name__}"
        )
    times = sampler.times
    if not isinstance(times, (jax.Array, np.ndarray)):
        raise TypeError(f"sampler.times must be an array (samplers.check_times(times, "
                        f"schedule) checks and converts one), got {type(times).__name__}")
    if validation.is_concrete(times):  # a custom sampler's grid: the factories check theirs
        t = np.asarray(times)
        # (a pipeline's DDIM grid may repeat its clean end, as diffusers' does)
        if t.ndim != 1 or t.shape[0] < 2 or not np.all(np.diff(t) <= 0):
            raise ValueError(f"sampler.times must be a decreasing 1-D grid of at least 2 "
                             f"times, got {t.tolist()}")  # fmt: skip
    if not callable(denoiser):
        raise TypeError(f"denoiser must be callable (x, t, cond) -> x0_hat, got {type(denoiser)}")
    if not _binds(denoiser, 3):
        raise TypeError(f"denoiser must be callable as denoiser(x, t, cond) -> x0_hat (cond is "
                        f"None when unconditional), got {_describe(denoiser)}")  # fmt: skip
    _check_process(sampler, denoiser)
    _check_epsilon_at_alpha_zero(sampler, denoiser)
    if not hasattr(noise, "shape") or not hasattr(noise, "dtype"):
        raise TypeError(f"noise must be an array, got {type(noise).__name__}")
    noise = jnp.asarray(noise)
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a leading batch dimension >= 1, got shape {noise.shape}")
    if not jnp.issubdtype(noise.dtype, jnp.floating):
        raise TypeError(f"noise must be a floating array, got dtype {noise.dtype}")
    validation.finite_array("noise", noise)
    if key is None:
        raise TypeError("key is required: pass key=jax.random.key(seed)")
    if not group_keys(key, groups):
        raw = getattr(key, "dtype", None) == jnp.uint32 and jnp.ndim(key) == 2
        if raw and groups > 1 and jnp.shape(key)[0] == groups:
            raise TypeError(
                f"key: {groups} raw uint32 keys (jax.random.PRNGKey's, shape "
                f"{tuple(jnp.shape(key))}); one key per group must be typed: "
                f"jax.random.split(jax.random.key(seed), {groups}), or "
                "jax.random.wrap_key_data(keys)"
            )
        try:
            validation.prng_key("key", key)
        except ValueError as err:  # a batch of keys
            if groups == 1:
                raise
            raise ValueError(f"{err}, or with groups={groups} one key per group "
                             f"(jax.random.split(key, {groups}))") from None  # fmt: skip
    b = noise.shape[0]
    if b % groups:
        raise ValueError(f"groups={groups} must divide the batch: noise has {b} rows")
    for path, leaf in jax.tree_util.tree_leaves_with_path(cond):
        shape = np.shape(leaf)
        name = "cond" + jax.tree_util.keystr(path)
        if len(shape) < 1 or shape[0] != b:
            raise ValueError(
                f"{name} must have the batch size of noise ({b}) as its leading dimension, "
                f"got shape {shape}"
            )
        if jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            validation.finite_array(name, leaf)
    return noise


def _check_state(state, expected, noise_shape) -> None:
    """``guidance_state`` must have the structure, shapes and dtypes that the terms'
    ``init`` gives for this batch: checked before tracing, naming the term and leaf."""
    for name in sorted(expected):
        where = f"guidance_state[{name!r}]"
        want_leaves, want_def = jax.tree.flatten(expected[name])
        got_leaves, got_def = jax.tree.flatten(state[name])
        if want_def != got_def:
            raise ValueError(
                f"{where} does not fit guidance term {name!r}: expected a state of structure "
                f"{want_def}, got {got_def} (a state from a different term?)"
            )
        paths = [jax.tree_util.keystr(p) for p, _ in
                 jax.tree_util.tree_leaves_with_path(expected[name])]  # fmt: skip
        for path, want, got in zip(paths, want_leaves, got_leaves):
            shape, dtype = np.shape(got), getattr(got, "dtype", np.asarray(got).dtype)
            if tuple(shape) != tuple(want.shape) or jnp.dtype(dtype) != jnp.dtype(want.dtype):
                raise ValueError(
                    f"{where}{path} has shape {tuple(shape)} and dtype {dtype}, but guidance "
                    f"term {name!r} on noise of shape {tuple(noise_shape)} expects shape "
                    f"{tuple(want.shape)} and dtype {want.dtype} (a state from a different "
                    "batch shape or term settings?)"
                )


def sample(
    sampler: Sampler,
    denoiser,
    noise,
    *,
    key,
    cond=None,
    guidance=None,
    trace: bool = False,
    guidance_state=None,
    mesh=None,
    groups: int | None = None,
) -> SampleOutput:
    """Run ``sampler`` from ``noise`` to clean samples with optional guidance.

    The whole trajectory is one ``lax.scan`` inside one jitted computation; calling again
    with the same sampler, denoiser and guidance objects and the same shapes reuses the
    compiled program. Everything is differentiable: ``jax.grad`` of a function of
    ``out.x0`` reaches the noise, the condition, array fields of the denoiser (e.g. a GMM's
    means), of the schedule and of guidance terms. Works under an outer ``jit``/``vmap``.

    Args:
        sampler: from :mod:`jaxdiv.samplers`.
        denoiser: ``denoiser(x, t, cond) -> x0_hat`` on the whole batch; ``t`` is a scalar
            process time. A callable pytree (like ``toy.GaussianMixture.denoiser``) has
            its arrays traced; a closure's arrays are compiled-in arguments.
        noise: standard normal ``(B, ...)``; the sampler scales it (by ``sigma_max`` on EDM),
            so the same noise gives comparable runs across samplers. Its dtype is the
            state's: ``x`` is carried between steps in it (half precision too, as
            diffusers' fp16 pipelines do), while the grid and each step's arithmetic are
            at least float32 (:mod:`jaxdiv.dtypes`).
        key: PRNG key for the samplers' and guidance terms' randomness. Sample ``b`` uses
            ``split(key, B)[b]``-derived streams, so without coupling terms a sample does
            not depend on the batch size (under JAX's default
            ``jax_threefry_partitionable=True``; switched off, ``split`` depends on ``B``).
            With ``groups``, also one key per group
            (``jax.random.split(key, groups)``).
        cond: optional condition pytree, leading dimension ``B``.
        guidance: a :class:`~jaxdiv.guidance.GuidanceTerm` or a ``guidance.chain(...)``.
            Its array leaves (strengths, radii, reference sets) are traced: new values
            reuse the compiled program (see :func:`compile_count`). With ``groups``, also
            :func:`guidance.per_group([...]) <jaxdiv.guidance.per_group>`: each group its
            own terms of one structure (a sweep of strengths, per-prompt terms).
        trace: also return a :class:`Trace` of per-step ``x``, ``x0_hat`` and guidance
            info, by term name.
        guidance_state: continue from a previous call's ``out.state`` (e.g. SPELL's memory
            of earlier batches) instead of ``init``-ing the terms. Checked before tracing:
            its structure, shapes and dtypes must be those the terms' ``init`` gives for
            this ``noise``, or the error names the term and the mismatching leaf.
        mesh: optional :class:`jax.sharding.Mesh` with a ``"data"`` axis
            (:func:`jaxdiv.distributed.make_mesh`): ``noise`` and ``cond`` are split along
            it by their leading axis (:func:`jaxdiv.distributed.shard_batch`) and the
            program runs over its devices; the output equals the single-device run.
            Weights placed with :func:`jaxdiv.distributed.shard_params` stay split.
        groups: split the batch into ``groups`` consecutive groups of ``B // groups``
            samples that do not act on each other, in one program. Each group runs as its
            own call of ``sample`` would, with ``key`` or, given ``groups`` keys, its own:
            terms that couple the batch (:func:`~jaxdiv.guidance.couples_batch`) act within
            a group, a SPELL memory is kept per group, ``cond``'s rows split the same way
            and the terms' parameters are shared (or each group's own, with
            :func:`~jaxdiv.guidance.per_group`). One shared key repeats the samplers'
            noise streams in every group (as separate calls with one key would): pass
            ``jax.random.split(key, groups)`` for independent groups. ``trace``, ``state``
            and ``sampler_state`` gain a leading axis of size ``groups`` (group ``g``'s at
            ``[g]``), and so must ``guidance_state``; ``x0`` keeps the shape of ``noise``.
            Default: 1, or the number of entries of a ``per_group`` guidance.

    Returns:
        :class:`SampleOutput` with ``x0`` (shape of ``noise``), ``trace``, ``state`` and
        ``sampler_state``.
        When the grid ends at sigma = 0 (every jaxdiv grid unless built with
        ``allow_noisy_end=True``, e.g. ``pipe.ddim(N)`` on a diffusers config),
        ``x0`` equals the last step's guided ``x0_hat``; otherwise it keeps the last
        level's noise.

    >>> import jax, jax.numpy as jnp, jaxdiv, toy
    >>> from jaxdiv import samplers, schedules
    >>> gm = toy.GaussianMixture(jnp.array([[-2.0], [2.0]]), jnp.array([0.1, 0.1]),
    ...                          jnp.array([0.5, 0.5]))
    >>> sch = schedules.edm()
    >>> noise = jax.random.normal(jax.random.key(0), (512, 1))
    >>> out = jaxdiv.sample(samplers.edm(sch, 32), gm.denoiser(sch), noise,
    ...                     key=jax.random.key(1))
    >>> bool(abs(jnp.abs(out.x0).mean() - 2.0) < 0.1)
    True

    Eight batches of four samples, each pushed apart only within itself (PG):

    >>> pg = jaxdiv.sample(samplers.edm(sch, 32), gm.denoiser(sch), noise[:32],
    ...                    key=jax.random.key(1), guidance=jaxdiv.guidance.particle(1.0),
    ...                    groups=8, trace=True)
    >>> pg.x0.shape, pg.trace.x.shape
    ((32, 1), (8, 32, 4, 1))
    """
    x0, tr, state, sstate = _run(*_prepared(
        sampler, denoiser, noise, key=key, cond=cond, guidance=guidance, trace=trace,
        guidance_state=guidance_state, mesh=mesh, groups=groups))  # fmt: skip
    return SampleOutput(x0, tr, state, sstate)


def lower(sampler: Sampler, denoiser, noise, *, key, cond=None, guidance=None,
          trace: bool = False, guidance_state=None, mesh=None,
          groups: int | None = None):  # fmt: skip
    """The program :func:`sample` runs for these arguments (the same checks and ``init``),
    lowered and not run: ``.compile().as_text()`` is XLA's optimised HLO, to read its
    fusions, collectives or memory without sampling.

    >>> import jax, jax.numpy as jnp
    >>> from jaxdiv import guidance, samplers, schedules
    >>> s = samplers.ddim(schedules.edm(), 4)
    >>> low = lower(s, lambda x, t, c: x / (1 + t**2), jnp.ones((8, 2)), key=jax.random.key(0),
    ...             guidance=guidance.particle(1.0), groups=2)
    >>> "while" in low.compile().as_text()   # the steps' lax.scan
    True
    """
    return _run.lower(*_prepared(
        sampler, denoiser, noise, key=key, cond=cond, guidance=guidance, trace=trace,
        guidance_state=guidance_state, mesh=mesh, groups=groups))  # fmt: skip


def _check_placement(mesh, named) -> None:
    """Refuse arrays committed to devices other than ``mesh``'s (``jax.device_put(x,
    device)``): the program runs on the mesh, and jit's own error names none of them."""
    devices = set(mesh.devices.flat)
    for what, tree in named:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            if (isinstance(leaf, jax.Array) and leaf.committed
                    and leaf.sharding.device_set != devices):  # fmt: skip
                raise ValueError(
                    f"{what}: its array {jax.tree_util.keystr(path)} is committed to "
                    f"{sorted(d.id for d in leaf.sharding.device_set)}, but mesh= runs on "
                    f"devices {sorted(d.id for d in devices)}: place it on the mesh "
                    "(jax.device_put(x, NamedSharding(mesh, P())) to replicate, or "
                    "distributed.shard_params), or leave it uncommitted")  # fmt: skip


def _prepared(sampler, denoiser, noise, *, key, cond, guidance, trace, guidance_state, mesh,
              groups):  # fmt: skip
    """:func:`sample`'s checks, placement and terms' ``init``: ``_run``'s arguments."""
    if groups is None:  # per_group guidance brings its number of groups
        groups = guidance.size if isinstance(guidance, PerGroup) else 1
    groups = validation.integer("groups", groups, minimum=1)
    noise = _check_inputs(sampler, denoiser, noise, key, cond, groups)
    if mesh is not None:
        # noise first: a batch the mesh cannot split is then named by noise, not by cond
        noise = distributed.shard_batch(noise, mesh, name="noise")
        cond = distributed.shard_batch(cond, mesh, name="cond")
        if groups > 1 and not _group_split(mesh, groups, noise.shape[0])[0]:
            n = mesh.shape[distributed.DATA]
            raise ValueError(
                f"groups={groups} of {noise.shape[0] // groups} samples cannot be split over "
                f"the {n} devices of the mesh's {distributed.DATA!r} axis: every device would "
                f"run the whole batch; use a number of groups or a group size that {n} "
                "divides")  # fmt: skip
    per_group = isinstance(guidance, PerGroup)
    if per_group and guidance.size != groups:
        raise ValueError(f"guidance is per_group for {guidance.size} groups, but groups="
                         f"{groups}: pass groups={guidance.size}")  # fmt: skip
    group_terms = [c.terms for c in guidance.chains] if per_group else [as_terms(guidance)]
    ranges = {}  # the process's ranges: computed once for every group's terms
    for g, terms in enumerate(group_terms):
        try:
            check_windows(terms, sampler, ranges)
        except ValueError as err:
            if not per_group:
                raise
            raise ValueError(f"per_group entry {g}: {err}") from None
    terms_spec = partition(group_terms[0])[1]
    per_dynamic = [partition(terms)[0] for terms in group_terms]
    terms_dynamic, stacked = per_dynamic[0], None
    if per_group:
        # a leaf that is one array in every group (an encoder's weights) stays shared: no
        # copy per group, and the groups' model calls keep one set of weights
        stacked = tuple(leaf is not None and any(d[j] is not leaf for d in per_dynamic)
                        for j, leaf in enumerate(per_dynamic[0]))  # fmt: skip
        terms_dynamic = [jnp.stack([d[j] for d in per_dynamic]) if s else leaf
                         for j, (leaf, s) in enumerate(zip(per_dynamic[0], stacked))]  # fmt: skip
    names = sorted(t.name for t in group_terms[0])
    seed = 0x5EED  # the terms' init keys: fold_in(key, seed), the group's key if per group

    def init(x, c):
        if groups == 1:
            return init_terms(group_terms[0], x, c, jax.random.fold_in(key, seed))
        xs, cs = split_groups((x, c), groups)
        keys = key if group_keys(key, groups) else jnp.stack([key] * groups)

        def one(dyn, xg, cg, kg):
            return init_terms(combine(dyn, terms_spec), xg, cg, jax.random.fold_in(kg, seed))

        try:
            try:  # one pass for all groups
                return jax.vmap(one, in_axes=(_terms_axes(stacked), 0, 0, 0))(
                    terms_dynamic, xs, cs, keys)
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                    jax.errors.TracerBoolConversionError):  # fmt: skip
                # an init that reads concrete values: group by group
                each = [one(per_dynamic[g if per_group else 0], xs[g],
                            jax.tree.map(lambda a, g=g: a[g], cs), keys[g])
                        for g in range(groups)]  # fmt: skip
                return jax.tree.map(lambda *leaves: jnp.stack(leaves), *each)
        except ValueError as err:  # the terms' "batch" is a group here
            bound = [t.name for t in group_terms[0] if prompt_bound(t)]
            hint = "" if per_group or not bound else (
                f"; {', '.join(map(repr, bound))} holds data of the rows it was built for: "
                f"give each group its own with guidance.per_group([...]) (one entry of "
                f"{xs.shape[1]} rows per group)")  # fmt: skip
            raise ValueError(f"with groups={groups}, each group of {xs.shape[1]} samples is "
                             f"a batch of its own: {err}{hint}") from None  # fmt: skip

    def x_init():  # the terms' init sees the first state (not computed without terms)
        return sampler.schedule.init_noise_scale(sampler.times[0]) * noise

    if guidance_state is None:
        guidance_state = init(x_init(), cond) if names else {}
    elif not isinstance(guidance_state, dict) or sorted(guidance_state) != names:
        got = sorted(guidance_state) if isinstance(guidance_state, dict) else guidance_state
        raise ValueError(
            f"guidance_state must be the .state of a call with the same guidance: a dict "
            f"with keys {names}, got {got!r}"
        )
    elif names:
        try:
            expected = jax.eval_shape(lambda c: init(x_init(), c), cond)
        except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
            expected = None  # an init that needs concrete values: cannot be shape-checked
        if expected is not None:
            _check_state(guidance_state, expected, noise.shape)
    if mesh is not None:
        _check_placement(mesh, [("sampler", sampler), ("denoiser", denoiser)]
                         + [(f"guidance term {t.name!r}", t) for g in group_terms for t in g])
    model_dynamic, model_spec = partition((sampler, denoiser))
    spec = (model_spec, terms_spec, stacked, mesh)
    return (spec, validation.boolean("trace", trace), groups, (model_dynamic, terms_dynamic),
            noise, key, cond, guidance_state)  # fmt: skip

