"""Classifier-free guidance (Ho & Salimans 2022), diffusers convention."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.guidance.base import GuidanceTerm
from jaxdiv.predictions import check_prediction_type, from_prediction, to_prediction

__all__ = ["cfg", "CFGInfo", "needs_cond", "zero_null"]


class CFGInfo(NamedTuple):
    """Per-step CFG diagnostics.

    Attributes:
        guidance_norm: batch-mean ``|D_c - D_u|`` (RMS over features).
        rescale_factor: batch-mean factor of the guidance rescale (``phi std_c / std_cfg
            + 1 - phi``); 1 without ``rescale``.
    """

    guidance_norm: jax.Array
    rescale_factor: jax.Array


def _concat_batch(a, b):
    return jax.tree.map(lambda u, v: jnp.concatenate([u, v], axis=0), a, b)


def needs_cond(name):
    """An ``init`` that refuses a run without a condition (CFG and CADS need one).

    >>> import jax, jax.numpy as jnp
    >>> init = needs_cond("my_term")
    >>> init(jnp.zeros((2, 3)), jnp.ones((2, 4)), jax.random.key(0))
    ()
    >>> init(jnp.zeros((2, 3)), None, jax.random.key(0))
    Traceback (most recent call last):
    ...
    ValueError: my_term needs a condition: pass cond= to jaxdiv.sample
    """
    return Partial(_require_cond, name)


def _require_cond(name, x, cond, key):
    if cond is None:
        raise ValueError(f"{name} needs a condition: pass cond= to jaxdiv.sample")
    return ()


def _cfg_init(null_cond, x, cond, key):
    """Refuse a run without a condition, or a ``null_cond`` that does not fit ``cond``
    (checked by :func:`jaxdiv.sample` before tracing, with both shapes named)."""
    _require_cond("cfg", x, cond, key)
    if null_cond is None or callable(null_cond):  # a per-step null is checked when traced
        return ()
    c_leaves, c_def = jax.tree.flatten(cond)
    n_leaves, n_def = jax.tree.flatten(null_cond)
    if c_def != n_def:
        raise ValueError(
            f"null_cond must have the structure of cond: expected {c_def}, got {n_def}"
        )
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(cond)]
    for path, n, c in zip(paths, n_leaves, c_leaves):
        ns, cs = tuple(jnp.shape(n)), tuple(jnp.shape(c))
        try:
            fits = jnp.broadcast_shapes(ns, cs) == cs
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(
                f"null_cond{path} has shape {ns}, which does not broadcast to the shape of "
                f"cond{path} {cs}: expected {cs} or {cs[1:]} (one null condition for the "
                "whole batch)"
            )
    return ()


def _std(p):
    """Per-sample standard deviation over every non-batch axis, with Bessel's correction
    (``torch.Tensor.std``'s default, which diffusers' ``rescale_noise_cfg`` uses)."""
    return jnp.std(p.reshape(p.shape[0], -1), axis=1, ddof=1)


def _rescale(x0_cfg, d_c, phi, prediction_type, ctx):
    """Lin et al. (2024) Sec. 3.4 in the network's prediction space: ``p = p_cfg (phi
    std(p_c) / std(p_cfg) + 1 - phi)``, mapped back to ``x0_hat``."""
    to = lambda x0: to_prediction(x0, ctx.x, ctx.alpha, ctx.sigma, prediction_type)  # noqa: E731
    p_c, p_cfg = to(d_c), to(x0_cfg)
    s_c, s_cfg = _std(p_c), _std(p_cfg)
    # a prediction without spread (a constant sample) has no scale to restore
    ratio = jnp.where(s_cfg > 0, s_c / jnp.where(s_cfg > 0, s_cfg, 1.0), 1.0)
    factor = phi * ratio + (1.0 - phi)
    p = p_cfg * factor.reshape((-1,) + (1,) * (p_cfg.ndim - 1)).astype(p_cfg.dtype)
    out = from_prediction(p, ctx.x, ctx.alpha, ctx.sigma, prediction_type)
    return out.astype(x0_cfg.dtype), factor.mean()


def _cfg_apply(scale, null_cond, rescale, prediction_type, state, denoise, ctx):
    cond = ctx.cond
    if null_cond is None:
        null = jax.tree.map(jnp.zeros_like, cond)
    else:
        if callable(null_cond):  # a per-step null (e.g. TPSO's scheduled blank prompt)
            null_cond = null_cond(ctx)
        null = jax.tree.map(
            lambda n, c: jnp.broadcast_to(jnp.asarray(n, c.dtype), c.shape), null_cond, cond
        )
    b = ctx.x.shape[0]
    both = denoise(jnp.concatenate([ctx.x, ctx.x], axis=0), _concat_batch(cond, null))
    d_c, d_u = both[:b], both[b:]
    diff = d_c - d_u
    norm = jnp.sqrt(jnp.mean(diff.reshape(b, -1) ** 2, axis=1)).mean()
    out = d_u + scale * diff
    if rescale is None:
        return out, state, CFGInfo(norm, jnp.ones((), norm.dtype))
    if math.prod(out.shape[1:]) < 2:
        raise ValueError(
            f"cfg(rescale=...) needs samples of >= 2 elements (a standard deviation over one "
            f"is undefined), got x of shape {out.shape}"
        )
    out, factor = _rescale(out, d_c, rescale, prediction_type, ctx)
    return out, state, CFGInfo(norm, factor.astype(norm.dtype))


def cfg(scale, null_cond=None, *, rescale=None, prediction_type: str | None = None) -> GuidanceTerm:
    """Classifier-free guidance: ``x0_hat = D_u + w (D_c - D_u)``.

    Ho & Salimans (2022), Eq. 6 in x0-space with diffusers' convention (``w = 1`` is the
    conditional denoiser, ``w = 0`` the unconditional one; particle guidance's code uses
    ``w + 1``). Both calls are batched into one denoiser call on a doubled batch.

    With ``rescale = phi``, the guidance rescale of Lin et al. (2024, "Common Diffusion
    Noise Schedules and Sample Steps are Flawed", Sec. 3.4; diffusers' ``guidance_rescale``)
    follows, in the network's prediction space ``p`` (``prediction_type``; CFG is the same
    combination there, the rescale is not): ``p = p_cfg (phi std(p_c) / std(p_cfg) + 1 -
    phi)``, the standard deviations per sample over all its elements with Bessel's
    correction, as diffusers' ``rescale_noise_cfg``; the result goes back to ``x0_hat``.

    Args:
        scale: guidance weight ``w``, a finite number (a traced leaf: a sweep over ``w``
            compiles once).
        null_cond: the unconditional condition (finite arrays); broadcast to the
            condition's batch. Each leaf must broadcast to the matching leaf of ``cond``
            (checked by :func:`jaxdiv.sample` before tracing). ``None`` uses zeros shaped
            like the condition (the null embedding of the toys). A callable
            ``null_cond(ctx) -> arrays`` gives a null per step
            (:func:`~jaxdiv.guidance.tpso_null`); make it a
            :class:`jax.tree_util.Partial` so its arrays are traced, not compiled in.
        rescale: ``phi`` in ``[0, 1]`` (the paper and diffusers suggest 0.7), a traced
            leaf; ``None`` (default) leaves the rescale out of the program.
        prediction_type: the space the rescale acts in, the network's prediction, required
            with ``rescale`` (and refused without it, where it would never act):
            ``"epsilon"``, ``"v_prediction"``, ``"sample"`` (``x0_hat`` itself) or
            ``"flow"``; a pipeline's is ``pipe.denoiser.prediction_type``, which
            ``generate(guidance_rescale=...)`` passes.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import samplers, schedules
    >>> den = lambda x, t, c: x * 0 + c            # toy: x0_hat is the condition itself
    >>> s = samplers.ddim(schedules.flow(), num_steps=2)
    >>> c = jnp.ones((3, 2))
    >>> out = jaxdiv.sample(s, den, jnp.zeros((3, 2)), key=jax.random.key(0), cond=c,
    ...                     guidance=cfg(2.0))
    >>> out.x0[0].tolist()                          # 0 + 2 * (1 - 0)
    [2.0, 2.0]
    >>> c = jnp.array([[1.0, -1.0]] * 3)            # std(c) / std(2 c) = 0.5
    >>> g = cfg(2.0, rescale=0.7, prediction_type="sample")
    >>> out = jaxdiv.sample(s, den, jnp.zeros((3, 2)), key=jax.random.key(0), cond=c, guidance=g)
    >>> [round(v, 4) for v in out.x0[0].tolist()]  # 2 c (0.7 * 0.5 + 0.3)
    [1.3, -1.3]
    """
    scale = validation.real("scale", scale)
    rescale = check_rescale(rescale, prediction_type)
    if callable(null_cond):
        pass
    elif null_cond is not None:
        null_cond = jax.tree.map(
            lambda a: validation.finite_array("null_cond", a), null_cond
        )
    apply = Partial(_cfg_apply, scale, null_cond, rescale, prediction_type)
    return GuidanceTerm(Partial(_cfg_init, null_cond), apply, "denoiser", "cfg")


def check_rescale(rescale, prediction_type, caller="cfg"):
    """``rescale`` checked as the CFG rescale's ``phi`` in ``[0, 1]``, with the
    ``prediction_type`` it acts in (and ``prediction_type`` refused without it, where it
    would never take effect); ``caller`` names the function in the messages.

    >>> round(float(check_rescale(0.7, "epsilon")), 6), check_rescale(None, None)
    (0.7, None)
    >>> check_rescale(0.7, None, "interval")
    Traceback (most recent call last):
    ...
    ValueError: interval(rescale=...) needs prediction_type=, the network's prediction the rescale acts on ('epsilon', 'v_prediction', 'sample' or 'flow'; a pipeline's is pipe.denoiser.prediction_type): diffusers rescales the model's own output
    """  # noqa: E501
    if rescale is None:
        if prediction_type is not None:
            raise ValueError(
                f"{caller}: prediction_type={prediction_type!r} would never take effect: it is "
                "the space of the rescale, and rescale is None"
            )
        return None
    rescale = validation.real("rescale", rescale, lo=0, hi=1)
    if prediction_type is None:
        raise ValueError(
            f"{caller}(rescale=...) needs prediction_type=, the network's prediction the "
            "rescale acts on ('epsilon', 'v_prediction', 'sample' or 'flow'; a pipeline's "
            "is pipe.denoiser.prediction_type): diffusers rescales the model's own output"
        )
    check_prediction_type(prediction_type)
    return rescale


def zero_null(term: GuidanceTerm) -> bool:
    """Whether ``term`` is CFG -- alone or windowed, as interval guidance is -- built
    without ``null_cond``, so that its unconditional branch is zeros shaped like the
    condition (right for the toys, wrong for a text encoder's null embedding).

    >>> import jax.numpy as jnp
    >>> from jaxdiv import guidance
    >>> zero_null(cfg(2.0)), zero_null(guidance.interval(2.0, 0.1, 1.0))
    (True, True)
    >>> zero_null(cfg(2.0, null_cond=jnp.ones(3))), zero_null(guidance.cads())
    (False, False)
    """
    init = term.init  # window() wraps only apply
    return isinstance(init, Partial) and init.func is _cfg_init and init.args[0] is None
