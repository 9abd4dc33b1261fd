"""Contextual-space repulsion (Dahary et al., 2026, arXiv 2603.28762) for MMDiT samplers.

In every joint (dual-stream) block of a multimodal diffusion transformer the text tokens,
after attending to the image tokens, form the *contextual space*: structurally informed,
yet not committed to a composition. The method treats the ``B`` samples of a batch as
particles and, during the forward pass, pushes their flattened text streams apart by
gradient **ascent** on a batch diversity loss, the log Vendi score of the cosine kernel:

    ``f_i <- f_i + (eta / M) grad_{f_i} L_div({f_j}_{j=1..B})``, repeated ``M`` times,

with ``L_div = H_1(eig(K / B))``, ``K_ij = cos(f_i, f_j)`` (the von Neumann entropy of
``K / B``, :func:`jaxdiv.metrics.log_vendi`). Nothing is back-propagated through the model:
only ``L_div`` is differentiated, with respect to the stream itself. The repelled stream
lives only inside one forward pass: the next denoiser call starts again from the prompt
encoding (the paper's per-timestep reset).

This module is the batch operation (:func:`repel_context`), the MMDiT hook built from it
(:func:`contextual_hook`, for ``SD3Transformer2DModel(..., context_hook=...)``) and the
guidance term (:func:`contextual`, ``hook="model"``) that hands that hook to the model at
every denoiser call of :func:`jaxdiv.sample`. It imports only jax, the term protocol and,
when first traced, :mod:`jaxdiv.metrics` (so ``import jaxdiv`` stays light); nothing from
the models, the sampler or the pipelines.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.dtypes import working_dtype
from jaxdiv.guidance.base import GuidanceTerm, no_state
from jaxdiv.sphere import pow2_inverse_scale

__all__ = [
    "repel_context",
    "contextual_hook",
    "ContextualHook",
    "contextual",
    "ContextualInfo",
    "ContextualReport",
]


def _gram_log_vendi(g: jax.Array) -> jax.Array:
    """``log VS`` with the cosine kernel of rows whose Gram matrix is ``g`` (B, B): the von
    Neumann entropy of ``K / B``, ``K_ij = g_ij / sqrt(g_ii g_jj)``. Its derivative stays
    finite for duplicated rows (the custom spectral JVP of
    :mod:`jaxdiv.metrics.vendi_entropy`)."""
    # lazy: `import jaxdiv` stays light
    from jaxdiv.metrics.vendi_entropy import _log_vendi_from_kernel_core, _renyi_q

    d = jnp.sqrt(jnp.diagonal(g))
    k = g / (d[:, None] * d[None, :])
    return _log_vendi_from_kernel_core(k, None, _renyi_q(1.0, k), mode="shannon")


_EXACT = jax.lax.Precision.HIGHEST  # no TF32 / bf16 passes in the Gram products on GPU


def _pow2_exponent(m):
    """The integer ``e`` with ``m = f 2^e``, ``f`` in [0.5, 1) (0 where ``m`` is 0 or not
    finite): ``2^-e`` is :func:`jaxdiv.sphere.pow2_inverse_scale`, kept as an exponent so
    that scales beyond the float range can be carried and combined exactly."""
    m = jax.lax.stop_gradient(m)
    ok = (m > 0) & jnp.isfinite(m)
    return jnp.where(ok, jnp.frexp(jnp.where(ok, m, 1.0))[1], 0)


def _ascend_in_gram_space(x0, step, m):
    """``M`` steps ``X <- X + step grad_X L(X)`` from ``x0`` (B, N), done on B x B matrices.

    ``L`` depends on ``X`` only through its Gram matrix ``G = X X^T``, so
    ``grad_X L = 2 S X`` with ``S = sym(dL/dG)``: every step multiplies ``X`` from the left
    by ``I + 2 step S``, and ``X_k = A_k X_0`` stays in the row span of ``X_0`` with
    ``G_k = A_k G_0 A_k^T``. The loop updates only the B x B matrix ``A``; ``X`` is read
    twice (``G_0``, then ``A_M X_0``) instead of several times per step, which is what makes the
    paper's ``M = 100`` cheap on a text stream of ``333 x 1536`` values per sample. Exact
    in exact arithmetic (``tests/test_contextual_repulsion.py`` compares it with the literal
    autodiff loop).

    Scale-safe: ``A`` grows like ``step / |X|^2`` (with a large ``eta``, or a stream of
    tiny norm), which overflows float32 long before the repelled stream ``A X_0`` (of size
    ``~ step / |X|``) does. Since ``L`` is scale-invariant, ``S(c A) = S(A) / c^2``, so the
    loop carries ``A = 2^e U`` with ``U``'s largest entry in [0.5, 1) and the integer ``e``
    apart, and the step in ``U``'s units, ``2 step / (|X_0|^2 4^e)``, as a mantissa and an
    exponent: every rescaling is by a power of two (exact), and the result is finite
    whenever ``A_M X_0`` itself is representable.

    Returns ``(x_M, log_vendi_before, log_vendi_after)``."""
    b = x0.shape[0]
    # X_0 = 2^ex Y_0, Y_0's entries at most 1: G_0 = Y_0 Y_0^T cannot overflow
    ex = _pow2_exponent(jnp.max(jnp.abs(x0)))
    y0 = jnp.ldexp(x0, -ex)
    g0 = jnp.matmul(y0, y0.T, precision=_EXACT)
    # the step on Y_0 is 2 step / 4^ex (dL/dG_X = dL/dG_Y / 4^ex, L scale-invariant in G);
    # as mantissa * 2^exponent, it cannot overflow however large eta is
    mant, es = jnp.frexp(step)
    es = es + 1 - 2 * ex

    def body(_, carry):
        u, e = carry  # A = 2^e U
        g = u @ g0 @ u.T
        dg = jax.grad(_gram_log_vendi)(g)
        su = (0.5 * (dg + dg.T)) @ u
        # A + t S(A) A = 2^e (U + t 4^-e S(U) U); with t 4^-e = mant 2^k, factor out 2^k
        # when k > 0, so neither term overflows (U then only rounds away, as it should)
        k = es - 2 * e
        p = jnp.maximum(k, 0)
        new = jnp.ldexp(u, -p) + jnp.ldexp(mant, k - p) * su
        q = _pow2_exponent(jnp.max(jnp.abs(new)))
        return jnp.ldexp(new, -q), e + p + q

    u, e = jax.lax.fori_loop(0, m, body, (jnp.eye(b, dtype=x0.dtype), jnp.zeros((), jnp.int32)))
    before = _gram_log_vendi(g0)
    after = _gram_log_vendi(u @ g0 @ u.T)
    # X_M = A X_0 = 2^(e + ex) U Y_0: inf only where the repelled stream itself overflows
    return jnp.ldexp(jnp.matmul(u, y0, precision=_EXACT), e + ex), before, after


def repel_context(f, eta, inner_steps: int = 100):
    """Push the samples of a batch of text streams apart in the contextual space.

    Implements Dahary et al. (2026), Sec. 3 update:
    ``f_i <- f_i + (eta / M) grad_{f_i} L_div({f_j})``, ``M`` times, ``L_div`` the log Vendi
    score (von Neumann entropy of ``K / B``) of the cosine kernel ``K`` over the batch's
    flattened streams ``f_i in R^(S D)``.

    Pass one CFG branch at a time: the paper repels the conditional and the unconditional
    branch each within itself (:func:`contextual_hook` splits a ``[cond; uncond]`` batch).

    Gradient contract (no backpropagation through the model): the update is computed from
    ``stop_gradient(f)`` and added as a constant, ``f_new = f + stop_gradient(delta)``; so
    the Jacobian ``d f_new / d f`` is exactly the identity (an outer ``jax.grad`` or
    ``jax.jvp`` sees the repulsion as a fixed offset and never differentiates through the
    ``M`` inner steps, e.g. into the model weights that produced ``f``), ``eta`` receives
    no gradient, and the two log-Vendi diagnostics are constants too.

    The ``M`` steps run on ``B x B`` matrices: ``L`` depends on the stream only through its
    Gram matrix, so each step multiplies the batch from the left by ``I + 2 (eta / M) S``
    (``S`` the symmetrised ``dL/dG``), and the stream itself is read twice per call instead
    of several times per step -- the same iterates as the literal autodiff loop, at a cost
    independent of ``M`` in the stream's size. The computation runs in at least float32
    (a bf16 stream is upcast, and the result cast back). When ``eta == 0`` (a traced
    test) the inner loop is skipped by ``lax.cond`` and ``f`` is returned bitwise
    unchanged, so a time window can switch the method off by zeroing ``eta`` at no cost.
    A batch of one sample has no diversity to increase: ``B = 1``
    is a no-op (``f`` returned as is, both diagnostics 0). A stream whose flattened row is
    all zeros has no cosine direction; text streams never are.

    Args:
        f: text stream ``(B, ...)`` of one branch, typically ``(B, S, D)``; each sample is
            flattened to ``S * D`` features.
        eta: repulsion scale ``eta >= 0`` (a traced scalar: a new value never recompiles).
            Its useful range grows with the stream's squared norm, since the cosine
            kernel's gradient scales as ``1 / |f_i|`` (the paper: ``5e2 .. 5e6`` on
            SD3.5-Large, ``1e5 .. 1e7`` on SD3.5-Turbo). Any finite value is safe: the
            inner steps are carried scale-free, so the result is finite wherever the
            repelled stream itself (of size ``~ eta / |f_i|`` for a large ``eta``) fits
            the working dtype.
        inner_steps: ``M``, the number of inner ascent steps (static, >= 1; the paper: 100
            on SD3.5, 50 on Flux-dev).

    Returns:
        ``(f_new, log_vendi_before, log_vendi_after)``: the repelled stream (shape and
        dtype of ``f``) and the log Vendi score of the batch before and after (scalars in
        the working float dtype; ``log(B)`` is the maximum).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxdiv.guidance import repel_context
        >>> f = jax.random.normal(jax.random.key(0), (4, 3, 8)) + 3.0  # 4 similar streams
        >>> new, before, after = repel_context(f, eta=5.0, inner_steps=20)
        >>> new.shape, bool(after > before)
        ((4, 3, 8), True)
        >>> bool(jnp.array_equal(repel_context(f, eta=0.0)[0], f))  # eta = 0: identity
        True
    """
    m = validation.integer("inner_steps", inner_steps, minimum=1)
    eta = validation.real("eta", eta, lo=0)
    f = jnp.asarray(f)
    if f.ndim < 2:
        raise ValueError(f"f must be a batch of streams (B, S, D) (at least 2-D), got shape "
                         f"{f.shape}")  # fmt: skip
    if not jnp.issubdtype(f.dtype, jnp.floating):
        raise TypeError(f"f must be a floating array, got dtype {f.dtype}")
    b = f.shape[0]
    work = working_dtype(f)
    if b < 2:  # one sample: nothing to repel from
        zero = jnp.zeros((), work)
        return f, zero, zero

    x0 = jax.lax.stop_gradient(f).reshape(b, -1).astype(work)
    # jnp.asarray: a Python float under jax.grad is a weakly typed tracer without .astype
    step = jnp.asarray(jax.lax.stop_gradient(eta), work) / m

    def still(x):
        # rescaled before the product: the Gram of a stream of entries ~1e20 overflows
        y = x * pow2_inverse_scale(jnp.max(jnp.abs(x)))
        before = _gram_log_vendi(jnp.matmul(y, y.T, precision=_EXACT))
        return x, before, before

    active = step != 0
    x1, before, after = jax.lax.cond(active, lambda x: _ascend_in_gram_space(x, step, m),
                                     still, x0)  # fmt: skip
    new = jax.lax.stop_gradient(x1.reshape(f.shape).astype(f.dtype))
    # value: the repelled stream; derivative w.r.t. f: the identity (straight-through)
    f_new = jnp.where(active, new + (f - jax.lax.stop_gradient(f)), f)
    return f_new, jax.lax.stop_gradient(before), jax.lax.stop_gradient(after)


@dataclasses.dataclass(frozen=True)
class ContextualHook:
    """The static part of a :func:`contextual_hook`: compared and hashed by value, so hooks
    that differ only in ``eta`` share one compiled program.

    It is the ``func`` of the returned :class:`jax.tree_util.Partial` rather than a bare
    module-level function with the settings as ``Partial`` arguments, because a
    ``Partial``'s arguments are pytree leaves: a plain ``jax.jit`` would trace
    ``inner_steps`` and ``blocks``, which set the program's structure.

    Attributes:
        inner_steps: ``M`` of :func:`repel_context`.
        blocks: the joint-block indices to act after (sorted tuple), ``None`` for all.
        cfg_halves: the batch is ``[cond; uncond]``: repel each half within itself.
        group: repel within consecutive groups of this many samples (the sampler's batch
            ``B``: a model call on CFG's doubled batch ``[cond; uncond]`` is two groups);
            ``None``: the whole batch is one group (or two halves with ``cfg_halves``).
        report: return ``(stream, report)``, the model-hook protocol of guidance terms
            (:mod:`jaxdiv.guidance.base`): ``report`` is a :class:`ContextualReport` of the
            first group (the conditional branch under CFG) after a selected block, ``None``
            after the others.
    """

    inner_steps: int
    blocks: tuple[int, ...] | None
    cfg_halves: bool
    group: int | None = None
    report: bool = False

    def __call__(self, eta, block_index, stream):
        if self.blocks is not None and block_index not in self.blocks:
            return (stream, None) if self.report else stream
        new, before, after = self._repel(eta, block_index, stream)
        return (new, ContextualReport(before, after)) if self.report else new

    def _repel(self, eta, block_index, stream):
        """``repel_context`` group by group: the new stream and the first group's log
        Vendi before and after."""
        b = stream.shape[0]
        size = b // 2 if self.cfg_halves else (self.group or b)
        if self.cfg_halves and b % 2:
            raise ValueError(f"cfg_halves=True needs an even batch [cond; uncond], got a text "
                             f"stream of batch {b} after block {block_index}")  # fmt: skip
        if b % size:
            raise ValueError(
                f"contextual repulsion was set up for batches of {size} samples (the "
                f"sampler's batch), but the model saw a text stream of batch {b} after block "
                f"{block_index}: only whole copies of the batch (CFG's [cond; uncond]) can "
                "be repelled group by group"
            )
        if size == b:
            return repel_context(stream, eta, self.inner_steps)
        groups = stream.reshape(b // size, size, *stream.shape[1:])
        out, before, after = jax.vmap(lambda g: repel_context(g, eta, self.inner_steps))(groups)
        return out.reshape(stream.shape), before[0], after[0]


def contextual_hook(eta, inner_steps: int = 100, blocks=None, cfg_halves: bool = False):
    """The MMDiT ``context_hook(block_index, text_stream) -> text_stream`` of
    contextual-space repulsion.

    Implements Dahary et al. (2026), Sec. 3: after each selected joint block, the text
    stream is updated by :func:`repel_context`
    (``f_i <- f_i + (eta / M) grad_{f_i} L_div``, ``M`` times). Pass it to
    ``SD3Transformer2DModel.__call__(..., context_hook=hook)``, which calls it after every
    joint block that outputs a text stream.

    With classifier-free guidance the MMDiT sees the doubled batch ``[cond; uncond]``
    (:func:`jaxdiv.guidance.cfg`'s order); ``cfg_halves=True`` splits it in two and repels
    each half within itself, as the paper repels both branches separately (the conditional
    half's result does not depend on the unconditional half). Without CFG leave it
    ``False``: the whole batch is one group.

    The result is a :class:`jax.tree_util.Partial` whose only leaf is ``eta`` and whose
    function, a :class:`ContextualHook`, holds the static settings and compares by value:
    hooks for different ``eta`` have the same tree structure, so passing the hook as a
    (pytree) argument of a jitted function, or inside a denoiser given to
    :func:`jaxdiv.sample`, compiles once for every ``eta``. Its gradient contract is that
    of :func:`repel_context` (identity Jacobian, no gradient into the model through the
    update).

    Args:
        eta: repulsion scale ``>= 0`` (a traced leaf; ``0`` returns the streams bitwise
            unchanged and skips the inner loop, but the model with the hook is another
            compiled program than without: its outputs agree to rounding, visibly so in
            bfloat16 -- compare a bf16 run against ``contextual_hook(0.0)``).
        inner_steps: ``M`` inner ascent steps per block (static, >= 1).
        blocks: joint-block indices to act after (an int or a sequence of ints), or
            ``None`` for every block that outputs a text stream (the paper's choice).
        cfg_halves: the batch is ``[cond; uncond]``; repel each half separately.

    Returns:
        ``hook(block_index, stream) -> stream``, a :class:`jax.tree_util.Partial`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from jaxdiv.guidance import contextual_hook
        >>> hook = contextual_hook(5.0, inner_steps=20, blocks=(0,), cfg_halves=True)
        >>> s = jax.random.normal(jax.random.key(0), (4, 3, 8)) + 3.0  # [cond x2; uncond x2]
        >>> bool(jnp.array_equal(hook(1, s), s)), bool(jnp.array_equal(hook(0, s), s))
        (True, False)
        >>> jax.tree.structure(hook) == jax.tree.structure(contextual_hook(
        ...     7.0, inner_steps=20, blocks=(0,), cfg_halves=True))  # one compile for both
        True
    """
    eta = validation.real("eta", eta, lo=0)
    m = validation.integer("inner_steps", inner_steps, minimum=1)
    if blocks is not None:
        items = (blocks,) if isinstance(blocks, int) and not isinstance(blocks, bool) else blocks
        try:
            items = tuple(items)
        except TypeError:
            raise TypeError(f"blocks must be None, an int or a sequence of ints, got "
                            f"{type(blocks).__name__} {blocks!r}") from None  # fmt: skip
        blocks = tuple(sorted({validation.integer("blocks[i]", i, minimum=0) for i in items}))
        if not blocks:
            raise ValueError("blocks must name at least one block (None: every block), got "
                             "an empty sequence")  # fmt: skip
    cfg_halves = validation.boolean("cfg_halves", cfg_halves)
    return Partial(ContextualHook(m, blocks, cfg_halves), eta)


class ContextualReport(NamedTuple):
    """What the term's model hook reports after one block: the log Vendi score of the
    sampler's batch of text streams (the conditional branch under CFG) before and after
    the repulsion (equal where ``eta`` is 0)."""

    log_vendi_before: Any
    log_vendi_after: Any


class ContextualInfo(NamedTuple):
    """Per-evaluation diagnostics of :func:`contextual`; in the trace every field gains a
    leading step axis.

    Attributes:
        eta: the repulsion scale handed to the model at this evaluation (``0`` from step
            ``tau`` on, where the model runs unchanged).
        blocks: the joint-block indices the hook acted after, ``(n_blocks,)`` int32.
        log_vendi_before: log Vendi score (:func:`jaxdiv.metrics.log_vendi`, cosine
            kernel) of the batch's flattened text streams entering the repulsion after each
            of ``blocks``, ``(n_blocks,)``: the samples of the sampler's batch, which is
            CFG's conditional branch (the unconditional branch is repelled too, within
            itself, but not reported). At most ``log(B)``.
        log_vendi_after: the same after the ``M`` inner steps (equal to ``before`` where
            ``eta`` is 0).
    """

    eta: Any
    blocks: Any = None
    log_vendi_before: Any = None
    log_vendi_after: Any = None

    def with_model_report(self, per_block) -> ContextualInfo:
        """This info with the hook's reports after each block filled in (the model-hook
        protocol of :mod:`jaxdiv.guidance.base`)."""
        acted = [i for i, r in enumerate(per_block) if r is not None]
        if not acted:
            return self
        before, after = (jnp.stack([per_block[i][k] for i in acted]) for k in (0, 1))
        return self._replace(blocks=jnp.asarray(acted, jnp.int32), log_vendi_before=before,
                             log_vendi_after=after)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class _ContextualApply:
    """``apply`` of :func:`contextual`; its static settings compare by value (one program
    for every ``eta`` and ``tau``)."""

    inner_steps: int
    blocks: tuple[int, ...] | None
    # guidance.couples_batch / needs_batch: the batch's text streams repel each other only
    couples_batch = needs_batch = True

    def __call__(self, eta, tau, state, _arg, ctx):
        if tau is not None:  # the paper's window: the first tau timesteps
            eta = jnp.where(ctx.step < tau, eta, jnp.zeros_like(eta))
        # the sampler's batch is one group; CFG's doubled model batch is two
        hook = ContextualHook(self.inner_steps, self.blocks, False, ctx.x.shape[0], True)
        return Partial(hook, eta), state, ContextualInfo(eta)


def contextual(eta, inner_steps: int = 100, blocks=None, tau=4) -> GuidanceTerm:
    """Contextual-space repulsion as a guidance term: the model hook of
    :func:`contextual_hook`, handed to the MMDiT at every denoiser call.

    Implements Dahary et al. (2026), Sec. 3: after each selected joint block,
    ``f_i <- f_i + (eta / M) grad_{f_i} L_div({f_j})`` (``M`` times) on the text stream,
    during the first ``tau`` timesteps, the prompt encoding reset at every call.

    A ``hook="model"`` term (:mod:`jaxdiv.guidance.base`): the denoiser must take
    ``model_hooks=`` (the SD3 pipeline's does; a UNet pipeline is refused with a message).
    The samples of the sampler's batch are repelled from each other; with CFG the model
    sees ``[cond; uncond]`` and each branch is repelled within itself, as in the paper.
    Compose it with :func:`jaxdiv.guidance.chain` (CFG, SPELL, PG, ...) and restrict it with
    :func:`jaxdiv.guidance.window` like any term. ``eta`` and ``tau`` are traced: a sweep
    over either compiles once. A batch of one sample is left unchanged (nothing to repel).

    The trace (:class:`ContextualInfo`) reports, per step, the scale applied and, after
    each hooked block, the log Vendi score of the batch's text streams before and after
    the repulsion (CFG's conditional branch; ``log(B)`` is the maximum).

    Args:
        eta: repulsion scale ``>= 0`` (``0``: the streams pass unchanged; the outputs agree
            with a run without the term to rounding, visibly so in bfloat16, where the
            like-for-like baseline is ``contextual(0.0)``). The paper
            uses ``5e2 .. 5e6`` on SD3.5-Large (see :func:`repel_context` on its scale).
        inner_steps: ``M`` inner ascent steps per block (static; the paper: 100).
        blocks: joint-block indices to act after (int or sequence), ``None`` for all.
        tau: act during sampler steps ``0 .. tau - 1`` only, an int ``>= 1`` (default 4,
            the paper's SD3.5-Large setting with 28 steps; 1 on SD3.5-Turbo's 4 steps and on
            Flux-dev); ``None``: every step (not a setting of the paper).

    Returns:
        A :class:`~jaxdiv.guidance.base.GuidanceTerm` named ``"contextual"``.

    Example:
        >>> import jax
        >>> from jaxdiv import guidance
        >>> from jaxdiv.testing import example_sd3_pipeline
        >>> pipe = example_sd3_pipeline()
        >>> g = pipe.generate("a cat", 2, key=jax.random.key(0), sampler=pipe.flow_euler(3),
        ...                   method=guidance.contextual(50.0, inner_steps=10, tau=2),
        ...                   trace=True)
        >>> info = g.output.trace.info["contextual"]
        >>> info.eta.tolist()  # steps 0, 1 on; step 2 off
        [50.0, 50.0, 0.0]
        >>> info.blocks[0].tolist(), info.log_vendi_before.shape  # (steps, hooked blocks)
        ([0, 1], (3, 2))
        >>> after, before = info.log_vendi_after, info.log_vendi_before
        >>> bool((after[:2, 1] > before[:2, 1]).all()), bool((after[:2] >= before[:2]).all())
        (True, True)

        (After block 0 this tiny random model's two contexts are equal to float precision,
        log-Vendi ~1e-7, where the repulsion's gradient vanishes by symmetry, so there it
        may stay put; after block 1 it rises at both steps.)
        >>> bool((info.log_vendi_after[2] == info.log_vendi_before[2]).all())
        True
    """
    eta = validation.real("eta", eta, lo=0)
    m = validation.integer("inner_steps", inner_steps, minimum=1)
    blocks = contextual_hook(0.0, m, blocks).func.blocks  # one place checks blocks
    if tau is not None:
        tau = jnp.asarray(validation.integer("tau", tau, minimum=1), jnp.int32)
    return GuidanceTerm(no_state, Partial(_ContextualApply(m, blocks), eta, tau), "model",
                        "contextual")  # fmt: skip
