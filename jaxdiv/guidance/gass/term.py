"""GASS: geometry-aware spherical sampling (Zhu et al., ICML 2026, arXiv 2602.17200).

At an active sampler step GASS

1. encodes the batch's ``x0_hat`` with a differentiable encoder ``E`` onto the unit
   sphere (CLIP's image tower on real models, :func:`toy.sphere_encoder` on the toys);
2. finds the principal residual direction ``u_ind`` (the one search shared with the SPP
   metric, :func:`jaxdiv.sphere.principal_direction`) and builds targets
   ``e~_i = e_i + d_i e_t + g_i u_ind`` with ``d_i ~ U[-r_dep, r_dep]``,
   ``g_i ~ U[-r_ind, r_ind]``, renormalised onto the sphere (:func:`gass_targets`);
3. runs Adam on ``x0_hat`` minimising ``L_SPP = sum_i (1 - E(x0_hat_i) . e~_i)`` with
   early stopping, and hands the optimised ``x0_hat*`` back to the sampler (:func:`gass`).

Differences from the public code (L-YeZhu/GASS_T2I), all deliberate (PAPERS.md): the
perturbation radii default to the paper's 0.02 (the code's defaults are 0, i.e. no
perturbation); all randomness comes from the key of each call (the code re-seeds inside
its target builder, so every step drew the same perturbation); and ``x0_hat`` on flows is
the core's ``x_t - t v`` (the code used a diffusion formula).

Proposition 4.1 (the batch's Gram determinant increases in expectation) is stated exactly,
and computed, in :mod:`jaxdiv.guidance.gass.prop41`: it holds without renormalisation and
is false in general with it.

**On a Heun sampler** (``samplers.edm``) an x0 term applies at every denoiser evaluation:
at an active step GASS runs twice, on the Euler prediction and on Heun's correction, each
with its own fresh targets, so that both predictions the step averages are spread (the
trace keeps the first evaluation's :class:`GASSInfo`). ``tests/test_review_findings.py``
counts the encoder calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.guidance.base import GuidanceTerm, delegates_flags, run_if, step_indices, window
from jaxdiv.guidance.gass.targets import (
    check_axes,
    check_num_directions,
    check_radius,
    draw_targets,
    spp_loss,
)
from jaxdiv.guidance.gass.write_back import adam_write_back
from jaxdiv.sphere import unit

__all__ = ["GASSInfo", "active_steps", "gass"]

_SCHEDULES = ("uniform", "early", "all")


# the paper's number of active steps (Sec. 5): num_active=None's, capped at the sampler's
_PAPER_NUM_ACTIVE = 20


def active_steps(num_steps: int, schedule: str = "uniform",
                 num_active: int | None = None) -> tuple:  # fmt: skip
    """Sampler step indices where GASS is active.

    ``"uniform"``: ``num_active`` steps spread evenly, ``floor(j N / k)`` for
    ``j = 0..k-1`` (the paper's default, 20 steps); ``"early"``: the first ``num_active``
    consecutive steps (the paper's ablation uses 10); ``"all"``: every step (``num_active``
    unused). ``num_active = N`` is every step. A ``num_active`` given beyond ``N`` is
    refused for ``"uniform"`` and ``"early"``: a sampler of ``N`` steps has no more steps
    to act at, so the setting could never take effect. ``None`` (the default) is the
    paper's 20, every step on a sampler of fewer than 20 steps.

    GASS (ICML 2026) Sec. 5, "GASS steps" (uniform vs early consecutive).

    >>> active_steps(10, "uniform", 4)
    (0, 2, 5, 7)
    >>> active_steps(10, "early", 3)
    (0, 1, 2)
    >>> active_steps(10)  # the paper's 20 of a 10-step sampler: every step
    (0, 1, 2, 3, 4, 5, 6, 7, 8, 9)
    >>> active_steps(10, "uniform", 12)
    Traceback (most recent call last):
    ...
    ValueError: num_active=12 exceeds the sampler's 10 steps: GASS acts at most once per step, so the setting could never take effect; pass num_active <= 10, or steps="all" to act at every step
    """  # noqa: E501
    num_steps = validation.integer("num_steps", num_steps, 1)
    paper = num_active is None
    num_active = _PAPER_NUM_ACTIVE if paper else validation.integer("num_active", num_active, 1)
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
    if num_active > num_steps and not (paper or schedule == "all"):
        # clamping to every step would silently run another schedule than the one asked for
        raise ValueError(
            f"num_active={num_active} exceeds the sampler's {num_steps} steps: GASS acts at "
            "most once per step, so the setting could never take effect; pass "
            f'num_active <= {num_steps}, or steps="all" to act at every step'
        )
    k = min(num_active, num_steps)
    if schedule == "all" or k == num_steps:
        return tuple(range(num_steps))
    if schedule == "early":
        return tuple(range(k))
    return tuple(sorted({(j * num_steps) // k for j in range(k)}))


class GASSInfo(NamedTuple):
    """Diagnostics of one GASS application (zeros at inactive steps).

    Attributes:
        loss_before: ``L_SPP`` of the incoming ``x0_hat`` against the step's targets.
        loss_after: ``L_SPP`` of the returned ``x0_hat*`` (``<= loss_before``).
        num_iters: Adam iterations run (``<= max_iters``).
        update_rms: RMS of ``x0_hat* - x0_hat`` over the batch.
        u_ind: ``(m,)`` the step's second axis.
        delta: ``(B, 2)`` the step's perturbations ``(d_i, g_i)``.
    """

    loss_before: jax.Array
    loss_after: jax.Array
    num_iters: jax.Array
    update_rms: jax.Array
    u_ind: jax.Array
    delta: jax.Array


def gass(
    encoder: Callable,
    text_emb,
    r_dep=0.02,
    r_ind=0.02,
    num_directions: int = 10,
    lr=1e-4,
    max_iters: int = 60,
    patience: int = 4,
    tol=5e-4,
    steps: str | Sequence[int] = "uniform",
    num_active: int | None = None,
    *,
    renormalize: bool = True,
    axes: str = "principal",
    write_space=None,
) -> GuidanceTerm:
    """GASS guidance: spread the batch on the encoder's sphere, written back into ``x0_hat``.

    At each active step: ``e_i = E(x0_hat_i)``, targets from :func:`gass_targets` with
    the step's fresh key, then Adam (``optax.adam(lr)``) on ``x0_hat`` minimising
    ``L_SPP = sum_i (1 - E(x0_hat_i) . e~_i)`` inside a ``lax.while_loop``: at most
    ``max_iters`` iterations, stopping early once the loss has not improved by more than
    ``tol`` for ``patience`` iterations. The lowest-loss iterate ``x0_hat*`` goes back to
    the sampler, which continues from it (the x0 hook; on flows the core's ``x0_hat`` is
    ``x_t - t v``). Defaults are the paper's (SD2.1/SD3-M); a toy in data space usually
    needs a larger ``lr`` (``experiments/gass_toy.py`` uses 0.02).

    Implements GASS (ICML 2026) Algorithm 2 / Sec. 4.3 (SPP gradient write-back on ``x0_hat``).

    Args:
        encoder: differentiable ``encoder(x0_hat) -> (B, m)`` embeddings on the whole batch
            (decoder + image encoder on real models); outputs are L2-normalised.
        text_emb: ``(m,)`` text embedding ``e_t``.
        r_dep, r_ind: target radii along ``e_t`` and ``u_ind`` (0 for single-axis ablations).
        num_directions: candidate directions of the ``u_ind`` search.
        lr: Adam learning rate (a number or an optax schedule of the iteration).
        max_iters: maximum Adam iterations per active step.
        patience: iterations without an improvement larger than ``tol`` before stopping.
        tol: minimum improvement of ``L_SPP`` that resets the patience counter.
        steps: ``"uniform"`` (``num_active`` evenly spread steps, default 20),
            ``"early"`` (the first ``num_active`` steps), ``"all"``, or explicit step
            indices; applied with :func:`jaxdiv.guidance.window`.
        num_active: number of active steps for ``"uniform"``/``"early"``; ``None``: the
            paper's 20, every step on a sampler of fewer. A value
            given here must not
            exceed the sampler's number of steps: :func:`jaxdiv.sample`, the first place
            that knows it, refuses a larger one (it could never take effect).
        renormalize: renormalise targets (False: the "w/o renorm." ablation).
        axes: ``"principal"``, ``"random"`` (RD ablation) or ``"isotropic"`` (IP ablation).
        write_space: ``None`` runs Adam on ``x0_hat`` itself (through the encoder chain);
            a pair ``(to_space, from_space)`` of callables runs it on ``to_space(x0_hat)``
            at active steps and returns ``from_space(y*)`` -- the paper's code on latent
            models: Adam on decoded pixels, then VAE re-encoding (``encoder`` then takes
            pixels). See :func:`jaxdiv.pipelines.generation.gass_pixel_space`.

    Returns:
        An ``"x0"``-hook :class:`GuidanceTerm` named ``"gass"``: ``trace.info["gass"]`` is
        its :class:`GASSInfo` (zeros at inactive steps), ``trace.active["gass"]`` the
        active steps. ``text_emb``, the radii, ``lr`` and ``tol`` are traced leaves.

    >>> import jax, jax.numpy as jnp, jaxdiv, toy
    >>> from jaxdiv import samplers, schedules
    >>> from toy.encoder import sphere_encoder
    >>> gm = toy.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 0.0]]), jnp.array([0.1, 0.1]))
    >>> enc = sphere_encoder(jax.random.key(0), 2)
    >>> g = gass(enc, enc.text_emb, r_dep=0.1, r_ind=0.1, lr=0.02, num_active=4)
    >>> sch = schedules.edm()
    >>> out = jaxdiv.sample(samplers.edm(sch, 8), gm.denoiser(sch),
    ...                     jax.random.normal(jax.random.key(1), (6, 2)),
    ...                     key=jax.random.key(2), guidance=g, trace=True)
    >>> out.trace.active["gass"].astype(int).tolist()
    [1, 0, 1, 0, 1, 0, 1, 0]
    >>> info = out.trace.info["gass"]
    >>> bool(jnp.all(info.loss_after <= info.loss_before))
    True
    """
    validation.function("encoder", encoder, "x0_hat -> (B, m)")
    text_emb = validation.finite_array("text_emb", text_emb, ndim=1)
    if validation.is_concrete(text_emb) and not np.any(np.asarray(text_emb) != 0):
        raise ValueError("text_emb must have non-zero norm (it defines a direction)")
    r_dep = check_radius(r_dep, "r_dep")
    r_ind = check_radius(r_ind, "r_ind")
    tol = check_radius(tol, "tol")
    if not callable(lr):  # a callable is an optax schedule, passed through to optax.adam
        lr = validation.real("lr", lr, lo=0, lo_open=True)
    max_iters = validation.integer("max_iters", max_iters, 1)
    patience = validation.integer("patience", patience, 1)
    if num_active is not None:  # None stays None: the paper's 20, capped at the steps
        num_active = validation.integer("num_active", num_active, 1)
    m = text_emb.shape[0]
    if validation.integer("num_directions", num_directions, 1) > m - 1:
        raise ValueError(
            f"text_emb has dimension m={m}, which leaves only m - 1 = {m - 1} orthonormal "
            f"directions for num_directions={num_directions}: pass the text embedding "
            "of the same encoder (its output dimension), or num_directions <= m - 1"
        )
    num_directions = check_num_directions(num_directions, m)
    check_axes(axes)
    renormalize = validation.boolean("renormalize", renormalize)
    if isinstance(steps, str):
        validation.choice("steps", steps, _SCHEDULES)
    else:
        steps = tuple(int(s) for s in step_indices(steps))
    if write_space is not None:
        if not (isinstance(write_space, tuple | list) and len(write_space) == 2
                and all(callable(f) for f in write_space)):  # fmt: skip
            raise TypeError(f"write_space must be None or a pair of callables (to_space, "
                            f"from_space), got {write_space!r}")  # fmt: skip
        write_space = tuple(write_space)
    settings = _Settings(encoder, num_directions, max_iters, patience, renormalize, axes,
                         write_space)  # fmt: skip
    apply = Partial(_gass_apply, settings, text_emb, r_dep, r_ind, lr, tol)
    term = GuidanceTerm(Partial(_gass_init, encoder, m, write_space), apply, "x0", "gass")
    if isinstance(steps, tuple):
        return window(term, steps=steps)
    return term._replace(apply=Partial(_scheduled_apply, apply, steps, num_active))


class _Settings(NamedTuple):
    """GASS's static settings (they shape the program)."""

    encoder: Callable
    num_directions: int
    max_iters: int
    patience: int
    renormalize: bool
    axes: str
    write_space: Any = None


def _check_embedding_shape(shape, x_shape, m):
    if len(shape) != 2 or shape[0] != x_shape[0]:
        raise ValueError(
            f"encoder must map the batch {tuple(x_shape)} to embeddings of shape (B, m) = "
            f"({x_shape[0]}, {m}), got {tuple(shape)}"
        )
    if shape[1] != m:
        raise ValueError(
            f"encoder must map the batch {tuple(x_shape)} to embeddings of shape (B, m) = "
            f"({x_shape[0]}, {m}) matching text_emb, got {tuple(shape)}: text_emb has "
            f"dimension {m} but the encoder's embeddings have dimension {shape[1]}; pass "
            "the text embedding of the same encoder"
        )


def _gass_init(encoder, m, write_space, x, cond, key):
    """No state; checks the encoder's output shape against ``text_emb`` before tracing."""
    y = x if write_space is None else jax.eval_shape(write_space[0], x)
    _check_embedding_shape(jax.eval_shape(encoder, y).shape, x.shape, m)
    return ()


def _encode(encoder, text_emb, x):
    emb = encoder(x)
    _check_embedding_shape(emb.shape, x.shape, text_emb.shape[0])
    return unit(emb)


def _gass_apply(st: _Settings, text_emb, r_dep, r_ind, lr, tol, state, x0_hat, ctx):
    y = x0_hat if st.write_space is None else st.write_space[0](x0_hat)
    emb = _encode(st.encoder, text_emb, y)
    # targets in >= float32: their QR has no bfloat16 / float16 kernel (CPU LAPACK, cuSolver)
    wide = working_dtype(emb)
    targets, _, u, delta = draw_targets(
        ctx.key, emb.astype(wide), text_emb.astype(wide), r_dep, r_ind, st.num_directions,
        st.renormalize, st.axes,
    )  # fmt: skip
    targets = jax.lax.stop_gradient(targets)
    loss_fn = lambda x: spp_loss(_encode(st.encoder, text_emb, x), targets)
    y_star, loss0, loss1, iters = adam_write_back(loss_fn, y, lr, st.max_iters, st.patience, tol)
    x_star = y_star if st.write_space is None else st.write_space[1](y_star)
    x_star = x_star.astype(x0_hat.dtype)
    rms = jnp.sqrt(jnp.mean((x_star - x0_hat) ** 2))
    return x_star, state, GASSInfo(loss0, loss1, iters, rms, u, delta)


def _scheduled_apply(apply, schedule, num_active, state, x0_hat, ctx):
    # ctx.num_steps is static, so the schedule resolves to fixed indices at trace time (and
    # a num_active beyond the sampler's steps is refused there, the first place N is known)
    idx = jnp.asarray(active_steps(ctx.num_steps, schedule, num_active), jnp.int32)
    return run_if(jnp.any(idx == ctx.step), apply, "x0", state, x0_hat, ctx)


# guidance.couples_batch: the batch is spread around e_t together; guidance.prompt_bound:
# e_t is one prompt's
_gass_apply.couples_batch = _gass_apply.prompt_bound = True
delegates_flags(_scheduled_apply)
