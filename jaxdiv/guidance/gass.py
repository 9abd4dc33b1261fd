"""GASS: geometry-aware spherical sampling (Zhu et al., ICML 2026, arXiv 2602.17200).

At an active sampler step GASS

1. encodes the batch's ``x0_hat`` with a differentiable encoder ``E`` onto the unit
   sphere (CLIP's image tower on real models, :func:`toy.sphere_encoder` on the toys);
2. finds the principal residual direction ``u_ind`` (the one search shared with the SPP
   metric, :func:`jaxdiv.metrics.principal_residual_direction`) and builds targets
   ``e~_i = e_i + d_i e_t + g_i u_ind`` with ``d_i ~ U[-r_dep, r_dep]``,
   ``g_i ~ U[-r_ind, r_ind]``, renormalised onto the sphere (:func:`gass_targets`);
3. runs Adam on ``x0_hat`` minimising ``L_SPP = sum_i (1 - E(x0_hat_i) . e~_i)`` with
   early stopping, and hands the optimised ``x0_hat*`` back to the sampler (:func:`gass`).

Differences from the public code (L-YeZhu/GASS_T2I), all deliberate (PAPERS.md): the
perturbation radii default to the paper's 0.02 (the code's defaults are 0, i.e. no
perturbation); all randomness comes from the key of each call (the code re-seeds inside
its target builder, so every step drew the same perturbation); and ``x0_hat`` on flows is
the core's ``x_t - t v`` (the code used a diffusion formula).

Proposition 4.1, stated exactly (checked in ``tests/test_gass_prop41.py``; formulas in
:func:`expected_gram_det`). Let ``E`` be the ``(B, m)`` batch of unit embeddings,
``G = E E^T``, ``a_1 = e_t`` and ``a_2 = u_ind`` the (orthonormal) axes, ``s_k = r_k^2/3``
the variances of the uniform shifts, ``E[i <- v]`` the batch with row ``i`` replaced by
``v``, ``P_i`` the projector onto the orthogonal complement of the rows other than ``i``
and ``H_i = I - 2 e_i e_i^T``.

* **Without renormalisation the claim holds, for every B, with a closed form:**
  ``E det G~ = det G + sum_{i,k} s_k det Gram(E[i <- a_k])
  + 2 s_1 s_2 sum_{i<j} det Gram(E[i <- a_1, j <- a_2])``. Every added term is ``>= 0``,
  and for linearly independent rows (so ``B <= m``) with ``r_dep + r_ind > 0`` one is
  ``> 0`` (the spans of the leave-one-out subsets meet only in 0, so some ``a_k`` is
  outside one of them): ``E det G~ > det G`` strictly.
* **With renormalisation (the paper's default) it is false in general.** For an
  orthonormal batch (``B >= 2``) Hadamard's inequality gives ``det G~ < 1 = det G`` for
  almost every draw, not only on average; near-orthogonal batches decrease on average
  (B=8, m=64, r=0.02: ratio 0.99986 +- 0.000002 by Monte Carlo and by the formula below;
  PAPERS.md's draw: 0.9997), while a tight cluster around ``e_t`` (B=8, m=16, cosines
  about 0.9) increases (1.00533 +- 0.00003; both from
  ``python -m experiments.gass_toy --only-prop41``). For small radii
  ``E det G~ = det G + sum_{i,k} s_k det G_{-i} (|P_i H_i a_k|^2 - |P_i e_i|^2) + O(r^4)``,
  so the expectation increases exactly when that sum is positive: each term is positive
  when the reflected axis ``H_i a_k`` sticks out of the span of the other embeddings
  further than ``e_i`` itself does. Tight clusters (the embeddings of one prompt: small
  ``|P_i e_i|``) with ``u_ind`` outside the batch's span and ``r_ind > 0`` increase; an
  orthonormal batch has terms ``-|proj_{span E_{-i}} a_k|^2 <= 0`` and decreases.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxdiv.guidance.base import GuidanceTerm, window
from jaxdiv.metrics import principal_residual_direction

__all__ = [
    "AXES",
    "GASSInfo",
    "GramExpectation",
    "active_steps",
    "expected_gram_det",
    "gass",
    "gass_targets",
    "spherical_targets",
    "spp_loss",
]

#: Target axes: the paper's (e_t, principal u_ind), the RD ablation (e_t, random u
#: orthogonal to e_t), the IP ablation (two random orthonormal axes, not anchored at e_t).
AXES = ("principal", "random", "isotropic")
_SCHEDULES = ("uniform", "early", "all")


def _unit(x):
    sq = jnp.sum(x * x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.maximum(sq, jnp.finfo(x.dtype).tiny))


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def _check_radius(value, name):
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, (np.ndarray, jax.Array)) and value.shape == ():
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def _check_pos_int(value, name, minimum=1):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a Python int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check_emb(emb, text_emb):
    emb = jnp.asarray(emb)
    text_emb = jnp.asarray(text_emb)
    if emb.ndim != 2:
        raise ValueError(f"emb must have shape (B, m), got shape {tuple(emb.shape)}")
    if text_emb.ndim != 1 or text_emb.shape[0] != emb.shape[1]:
        raise ValueError(
            f"text_emb must have shape (m,)=({emb.shape[1]},) matching emb, got shape "
            f"{tuple(text_emb.shape)}"
        )
    for name, arr in (("emb", emb), ("text_emb", text_emb)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating array, got dtype {arr.dtype}")
    if _is_concrete(emb, text_emb):
        # NumPy, not jnp: under an outer trace jnp would stage even concrete constants
        e_np, t_np = np.asarray(emb), np.asarray(text_emb)
        if not (np.all(np.isfinite(e_np)) and np.all(np.isfinite(t_np))):
            raise ValueError("emb and text_emb must be finite (got NaN or inf)")
        if not np.any(t_np != 0):
            raise ValueError("text_emb has zero norm; it must define a direction")
    dtype = jnp.promote_types(jnp.promote_types(emb.dtype, text_emb.dtype), jnp.float32)
    return emb.astype(dtype), text_emb.astype(dtype)


def spherical_targets(emb, axis_dep, axis_ind, delta_dep, delta_ind, renormalize=True):
    """GASS targets ``e~_i = (e_i.a + d_i) a + (e_i.u + g_i) u + r_i``, optionally renormalised.

    ``r_i`` is ``e_i``'s residual without its components along the orthonormal axes
    ``a`` (``axis_dep``) and ``u`` (``axis_ind``), so ``e~_i = e_i + d_i a + g_i u``.
    Rows of ``emb`` are L2-normalised first. This is the deterministic half of
    :func:`gass_targets` (which draws the axes and the ``d_i``, ``g_i``).

    Implements GASS (ICML 2026) Sec. 4.2, "latent dynamic spherical guidance".

    Args:
        emb: ``(B, m)`` embeddings.
        axis_dep, axis_ind: ``(m,)`` orthonormal axes (``e_t`` and ``u_ind`` in GASS).
        delta_dep, delta_ind: ``(B,)`` shifts along each axis.
        renormalize: project the targets back onto the unit sphere (the paper's default).

    Returns:
        ``(B, m)`` targets.

    >>> e = jnp.array([[1.0, 0.0, 0.0]])
    >>> a, u = jnp.array([0.0, 1.0, 0.0]), jnp.array([0.0, 0.0, 1.0])
    >>> spherical_targets(e, a, u, jnp.array([0.5]), jnp.array([0.0]), False).tolist()
    [[1.0, 0.5, 0.0]]
    """
    e = _unit(jnp.asarray(emb))
    dep = e @ axis_dep + delta_dep
    ind = e @ axis_ind + delta_ind
    residual = e - jnp.outer(e @ axis_dep, axis_dep) - jnp.outer(e @ axis_ind, axis_ind)
    out = dep[:, None] * axis_dep + ind[:, None] * axis_ind + residual
    return _unit(out) if renormalize else out


def _random_axes(key, text_emb, emb, num_directions, axes):
    """The two target axes for ``axes`` in :data:`AXES` (see :func:`gass_targets`)."""
    # normalised copies are computed values, so under an outer trace the metric's eager
    # value checks see tracers and skip (it cannot inspect traced constants)
    e_t, e = _unit(text_emb), _unit(emb)
    if axes == "principal":
        return e_t, principal_residual_direction(key, e, e_t, num_directions)
    if axes == "random":
        # one candidate: the shared search returns a uniformly random unit vector of e_t's
        # orthogonal complement (QR of a Gaussian), i.e. exactly the RD ablation
        return e_t, principal_residual_direction(key, e, e_t, 1)
    g = jax.random.normal(key, (e_t.shape[0], 2), e_t.dtype)
    q, _ = jnp.linalg.qr(g, mode="reduced")
    return q[:, 0], q[:, 1]


def _draw_targets(key, emb, text_emb, r_dep, r_ind, num_directions, renormalize, axes):
    k_dir, k_pert = jax.random.split(key)
    b = emb.shape[0]
    a_dep, a_ind = _random_axes(k_dir, text_emb, emb, num_directions, axes)
    # one draw for both axes (fewer RNG kernels to compile); d and g stay independent
    unif = jax.random.uniform(k_pert, (b, 2), emb.dtype, -1.0, 1.0)
    d, g = unif[:, 0] * r_dep, unif[:, 1] * r_ind
    targets = spherical_targets(emb, a_dep, a_ind, d, g, renormalize)
    return targets, a_dep, a_ind, jnp.stack([d, g], axis=-1)


def _check_axes(axes):
    if axes not in AXES:
        raise ValueError(f"axes must be one of {AXES}, got {axes!r}")


def _check_num_directions(num_directions, m):
    num_directions = _check_pos_int(num_directions, "num_directions")
    if num_directions > m - 1:
        raise ValueError(
            f"num_directions must be <= m - 1 = {m - 1} (orthonormal directions in the "
            f"complement of text_emb), got {num_directions}"
        )
    return num_directions


def gass_targets(
    key,
    emb,
    text_emb,
    r_dep=0.02,
    r_ind=0.02,
    num_directions: int = 10,
    renormalize: bool = True,
    *,
    axes: str = "principal",
):
    """Spherical spread targets of GASS and the principal residual direction ``u_ind``.

    Basis identification (the search shared with the SPP metric,
    :func:`jaxdiv.metrics.principal_residual_direction`), then
    ``e~_i = e_i + d_i e_t + g_i u_ind`` with ``d_i ~ U[-r_dep, r_dep]``,
    ``g_i ~ U[-r_ind, r_ind]`` i.i.d., renormalised onto the sphere. All randomness comes
    from ``key``: different keys give fresh directions and perturbations (the public
    code re-seeded here, so every step drew the same ones), the same key reproduces.

    Implements GASS (ICML 2026) Algorithm 1 and Sec. 4.2.

    Args:
        key: PRNG key.
        emb: ``(B, m)`` image embeddings (rows are L2-normalised).
        text_emb: ``(m,)`` text embedding ``e_t`` (normalised).
        r_dep: radius along ``e_t`` (0 disables the axis: the single-axis ablation).
        r_ind: radius along ``u_ind``.
        num_directions: candidate directions ``N`` of the search (paper: 10).
        renormalize: project targets onto the sphere (False: the "w/o renorm." ablation).
        axes: ``"principal"`` (paper), ``"random"`` (RD ablation: ``u`` a random unit
            vector orthogonal to ``e_t``), ``"isotropic"`` (IP ablation: two random
            orthonormal axes, neither anchored at ``e_t``; the second is returned).

    Returns:
        ``(targets (B, m), u_ind (m,))``.

    >>> import jax, jax.numpy as jnp
    >>> emb = jax.random.normal(jax.random.key(0), (4, 16))
    >>> t, u = gass_targets(jax.random.key(1), emb, jnp.eye(16)[0])
    >>> t.shape, round(float(u[0]), 6), bool(jnp.allclose(jnp.linalg.norm(t, axis=1), 1))
    ((4, 16), 0.0, True)
    """
    emb, text_emb = _check_emb(emb, text_emb)
    _check_radius(r_dep, "r_dep")
    _check_radius(r_ind, "r_ind")
    _check_axes(axes)
    num_directions = _check_num_directions(num_directions, emb.shape[1])
    targets, _, a_ind, _ = _draw_targets(
        key, emb, text_emb, r_dep, r_ind, num_directions, bool(renormalize), axes
    )
    return targets, a_ind


def spp_loss(emb, targets):
    """``L_SPP = sum_i (1 - e_i . e~_i)`` with ``e_i`` L2-normalised (GASS Sec. 4.3).

    >>> spp_loss(jnp.array([[1.0, 0.0], [0.0, 2.0]]), jnp.array([[1.0, 0.0], [1.0, 0.0]]))
    Array(1., dtype=float32)
    """
    return jnp.sum(1.0 - jnp.sum(_unit(emb) * targets, axis=-1))


def active_steps(num_steps: int, schedule: str = "uniform", num_active: int = 20) -> tuple:
    """Sampler step indices where GASS is active.

    ``"uniform"``: ``num_active`` steps spread evenly, ``floor(j N / k)`` for
    ``j = 0..k-1`` (the paper's default, 20 steps); ``"early"``: the first ``num_active``
    consecutive steps (the paper's ablation uses 10); ``"all"``: every step. With
    ``num_active >= N`` every schedule is every step.

    GASS (ICML 2026) Sec. 5, "GASS steps" (uniform vs early consecutive).

    >>> active_steps(10, "uniform", 4)
    (0, 2, 5, 7)
    >>> active_steps(10, "early", 3)
    (0, 1, 2)
    """
    num_steps = _check_pos_int(num_steps, "num_steps")
    num_active = _check_pos_int(num_active, "num_active")
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {_SCHEDULES}, got {schedule!r}")
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


class _AdamCarry(NamedTuple):
    it: jax.Array
    x: jax.Array
    opt_state: object
    loss: jax.Array
    grad: jax.Array
    ref_loss: jax.Array  # best loss by more than tol: the patience reference
    wait: jax.Array
    best_x: jax.Array
    best_loss: jax.Array


def _adam_write_back(loss_fn, x0, lr, max_iters, patience, tol):
    """Adam on ``x0`` inside ``lax.while_loop``; stops after ``max_iters`` iterations or when
    the loss has not improved on its reference by more than ``tol`` for ``patience``
    iterations in a row. Returns the lowest-loss iterate, its loss and the iteration count."""
    opt = optax.adam(lr)
    value_and_grad = jax.value_and_grad(loss_fn)
    loss0, grad0 = value_and_grad(x0)
    init = _AdamCarry(jnp.int32(0), x0, opt.init(x0), loss0, grad0, loss0, jnp.int32(0), x0, loss0)

    def cond(c):
        return (c.it < max_iters) & (c.wait < patience)

    def body(c):
        updates, opt_state = opt.update(c.grad, c.opt_state, c.x)
        x = optax.apply_updates(c.x, updates)
        loss, grad = value_and_grad(x)
        improved = loss < c.ref_loss - tol
        better = loss < c.best_loss
        return _AdamCarry(
            c.it + 1,
            x,
            opt_state,
            loss,
            grad,
            jnp.where(improved, loss, c.ref_loss),
            jnp.where(improved, 0, c.wait + 1),
            jnp.where(better, x, c.best_x),
            jnp.where(better, loss, c.best_loss),
        )

    out = jax.lax.while_loop(cond, body, init)
    return out.best_x, loss0, out.best_loss, out.it


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
    num_active: int = 20,
    *,
    renormalize: bool = True,
    axes: str = "principal",
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
        num_active: number of active steps for ``"uniform"``/``"early"``.
        renormalize: renormalise targets (False: the "w/o renorm." ablation).
        axes: ``"principal"``, ``"random"`` (RD ablation) or ``"isotropic"`` (IP ablation).

    Returns:
        An ``"x0"``-hook :class:`GuidanceTerm`; its per-step info is a
        :class:`~jaxdiv.guidance.WindowInfo` wrapping :class:`GASSInfo`.

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
    >>> info = out.trace.info[0]
    >>> info.active.astype(int).tolist()
    [1, 0, 1, 0, 1, 0, 1, 0]
    >>> bool(jnp.all(info.inner.loss_after <= info.inner.loss_before))
    True
    """
    if not callable(encoder):
        raise TypeError(f"encoder must be callable x0_hat -> (B, m), got {type(encoder).__name__}")
    text_emb = jnp.asarray(text_emb)
    if text_emb.ndim != 1:
        raise ValueError(f"text_emb must have shape (m,), got shape {tuple(text_emb.shape)}")
    if not jnp.issubdtype(text_emb.dtype, jnp.floating):
        raise TypeError(f"text_emb must be a floating array, got dtype {text_emb.dtype}")
    if _is_concrete(text_emb):
        t_np = np.asarray(text_emb)
        if not (np.all(np.isfinite(t_np)) and np.any(t_np != 0)):
            raise ValueError("text_emb must be finite with non-zero norm")
    _check_radius(r_dep, "r_dep")
    _check_radius(r_ind, "r_ind")
    _check_radius(tol, "tol")
    if not callable(lr):  # a callable is an optax schedule, passed through to optax.adam
        _check_radius(lr, "lr")
        if not isinstance(lr, jax.core.Tracer) and not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr!r}")
    max_iters = _check_pos_int(max_iters, "max_iters")
    patience = _check_pos_int(patience, "patience")
    num_active = _check_pos_int(num_active, "num_active")
    num_directions = _check_num_directions(num_directions, text_emb.shape[0])
    _check_axes(axes)
    renormalize = bool(renormalize)
    if isinstance(steps, str):
        if steps not in _SCHEDULES:
            raise ValueError(
                f"steps must be one of {_SCHEDULES} or a sequence of step indices, got {steps!r}"
            )
        explicit = None
    else:
        try:
            explicit = tuple(int(s) for s in steps)
        except TypeError as err:
            raise TypeError(
                f"steps must be one of {_SCHEDULES} or a sequence of ints, got {steps!r}"
            ) from err

    def encode(x):
        emb = encoder(x)
        if emb.ndim != 2 or emb.shape != (x.shape[0], text_emb.shape[0]):
            raise ValueError(
                f"encoder must map the batch {tuple(x.shape)} to embeddings of shape "
                f"(B, m)=({x.shape[0]}, {text_emb.shape[0]}) matching text_emb, got "
                f"{tuple(emb.shape)}"
            )
        return _unit(emb)

    def init(x, cond, key):
        return ()

    def apply_active(state, x0_hat, ctx):
        emb = encode(x0_hat)
        t_emb = text_emb.astype(emb.dtype)
        targets, _, u, delta = _draw_targets(
            ctx.key, emb, t_emb, r_dep, r_ind, num_directions, renormalize, axes
        )
        targets = jax.lax.stop_gradient(targets)
        loss_fn = lambda x: spp_loss(encode(x), targets)
        x_star, loss0, loss1, iters = _adam_write_back(
            loss_fn, x0_hat, lr, max_iters, patience, tol
        )
        x_star = x_star.astype(x0_hat.dtype)
        rms = jnp.sqrt(jnp.mean((x_star - x0_hat) ** 2))
        return x_star, state, GASSInfo(loss0, loss1, iters, rms, u, delta)

    inner = GuidanceTerm(init, apply_active, "x0")

    if explicit is not None:
        return window(inner, steps=explicit)

    def apply(state, x0_hat, ctx):
        # ctx.num_steps is static, so the schedule resolves to fixed indices at trace time;
        # window() validates its indices eagerly, hence the compile-time evaluation scope
        with jax.ensure_compile_time_eval():
            term = window(inner, steps=active_steps(ctx.num_steps, steps, num_active))
        return term.apply(state, x0_hat, ctx)

    return GuidanceTerm(init, apply, "x0")


class GramExpectation(NamedTuple):
    """Result of :func:`expected_gram_det` (float64).

    Attributes:
        det: ``det G`` of the (row-normalised) batch.
        expected: ``E det G~``: exact without renormalisation; ``det + change`` with
            renormalisation, whose error is ``O(r^4)``.
        change: ``expected - det``.
        coefficients: ``(B, 2)`` per-row, per-axis coefficients ``c_ik`` of ``s_k = r_k^2/3``
            in ``change``: ``det Gram(E[i <- a_k])`` without renormalisation,
            ``det Gram(E[i <- H_i a_k]) - |a_k|^2 det G`` with it.
    """

    det: float
    expected: float
    change: float
    coefficients: np.ndarray


def _gram_det(rows):
    return float(np.linalg.det(rows @ rows.T))


def _replaced(rows, idx, vecs):
    out = rows.copy()
    for i, v in zip(idx, vecs, strict=True):
        out[i] = v
    return out


def expected_gram_det(emb, axis_dep, axis_ind, r_dep=0.02, r_ind=0.02, renormalize=False):
    """Expected Gram determinant of a batch's GASS targets (Proposition 4.1, exactly).

    With ``s_k = r_k^2 / 3`` (the variance of ``U[-r_k, r_k]``), ``a_1 = axis_dep``,
    ``a_2 = axis_ind``, ``E[i <- v]`` the batch with row ``i`` replaced by ``v`` and
    ``H_i = I - 2 e_i e_i^T`` the reflection through ``e_i``'s orthogonal hyperplane:

    * ``renormalize=False`` (exact, every ``B``; cross terms vanish by multilinearity):
      ``E det G~ = det G + sum_i sum_k s_k det Gram(E[i <- a_k])
      + 2 s_1 s_2 sum_{i<j} det Gram(E[i <- a_1, j <- a_2])``.
    * ``renormalize=True`` (second order; odd orders vanish because the perturbations are
      symmetric, so the error is ``O(r^4)``): ``E det G~ = det G + sum_i sum_k s_k c_ik``,
      ``c_ik = det Gram(E[i <- H_i a_k]) - |a_k|^2 det G
      = det G_{-i} (|P_i H_i a_k|^2 - |a_k|^2 |P_i e_i|^2)``, ``P_i`` the projector onto
      the orthogonal complement of the other rows. For an orthonormal batch
      ``c_ik = -|proj_{span E_{-i}} a_k|^2 <= 0``.

    Computed in float64 NumPy (an analysis tool, not a hot path). Rows of ``emb`` are
    normalised first; the axes are used as given.

    GASS (ICML 2026) Proposition 4.1; the exact statement is in this module's docstring.

    Args:
        emb: ``(B, m)`` embeddings.
        axis_dep, axis_ind: ``(m,)`` the two axes (``e_t``, ``u_ind``).
        r_dep, r_ind: the radii.
        renormalize: whether the targets are renormalised.

    Returns:
        :class:`GramExpectation`.

    >>> import numpy as np
    >>> e = np.eye(3)[:2]                                    # orthonormal pair
    >>> out = expected_gram_det(e, np.eye(3)[0], np.eye(3)[2], 0.3, 0.3)
    >>> round(out.change, 4)                                 # 3 s + 2 s^2, s = 0.3^2 / 3
    0.0918
    >>> out = expected_gram_det(e, np.eye(3)[0], np.eye(3)[2], 0.3, 0.3, renormalize=True)
    >>> out.coefficients.tolist()                            # -|proj of a_k on the other row|^2
    [[0.0, 0.0], [-1.0, 0.0]]
    """
    e = np.asarray(emb, np.float64)
    if e.ndim != 2:
        raise ValueError(f"emb must have shape (B, m), got shape {e.shape}")
    axes = [np.asarray(a, np.float64) for a in (axis_dep, axis_ind)]
    for name, a in zip(("axis_dep", "axis_ind"), axes, strict=True):
        if a.shape != (e.shape[1],):
            raise ValueError(f"{name} must have shape (m,)=({e.shape[1]},), got {a.shape}")
    _check_radius(r_dep, "r_dep")
    _check_radius(r_ind, "r_ind")
    e = e / np.linalg.norm(e, axis=1, keepdims=True)
    s = np.array([r_dep**2 / 3.0, r_ind**2 / 3.0])
    b = e.shape[0]
    det = _gram_det(e)
    coef = np.zeros((b, 2))
    for i in range(b):
        for k, a in enumerate(axes):
            if renormalize:
                reflected = a - 2.0 * (e[i] @ a) * e[i]
                coef[i, k] = _gram_det(_replaced(e, [i], [reflected])) - (a @ a) * det
            else:
                coef[i, k] = _gram_det(_replaced(e, [i], [a]))
    change = float(np.sum(coef @ s))
    if not renormalize:
        change += (
            2.0
            * s[0]
            * s[1]
            * sum(_gram_det(_replaced(e, [i, j], axes)) for i in range(b) for j in range(i + 1, b))
        )
    return GramExpectation(det, float(det + change), float(change), coef)
