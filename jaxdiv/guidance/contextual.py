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

This module is the batch operation (:func:`repel_context`) and the MMDiT hook built from it
(:func:`contextual_hook`, for ``SD3Transformer2DModel(..., context_hook=...)``). It imports
only jax and, when first traced, :mod:`jaxdiv.metrics` (so ``import jaxdiv`` stays light);
nothing from the models, the sampler or the pipelines.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxdiv import validation

__all__ = ["repel_context", "contextual_hook", "ContextualHook"]


def _log_vendi_cosine(x: jax.Array) -> jax.Array:
    """``log VS(x)`` with the cosine kernel over the rows of ``x`` (B, N): the von Neumann
    entropy of ``K / B``. Its derivative stays finite for duplicated rows (the custom
    spectral JVP of :mod:`jaxdiv.metrics.vendi_entropy`)."""
    from jaxdiv.metrics.vendi_entropy import log_vendi  # lazy: `import jaxdiv` stays light

    return log_vendi(x, kernel="cosine")


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

    The computation runs in at least float32 (a bf16 stream is upcast, and the result cast
    back). When ``eta == 0`` (a traced test) the inner loop is skipped by ``lax.cond`` and
    ``f`` is returned bitwise unchanged, so a time window can switch the method off by
    zeroing ``eta`` at no cost. A batch of one sample has no diversity to increase: ``B = 1``
    is a no-op (``f`` returned as is, both diagnostics 0). A stream whose flattened row is
    all zeros has no cosine direction; text streams never are.

    Args:
        f: text stream ``(B, ...)`` of one branch, typically ``(B, S, D)``; each sample is
            flattened to ``S * D`` features.
        eta: repulsion scale ``eta >= 0`` (a traced scalar: a new value never recompiles).
            Its useful range grows with the stream's squared norm, since the cosine
            kernel's gradient scales as ``1 / |f_i|`` (the paper: ``5e2 .. 5e6`` on
            SD3.5-Large, ``1e5 .. 1e7`` on SD3.5-Turbo).
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
    work = jnp.promote_types(f.dtype, jnp.float32)
    if b < 2:  # one sample: nothing to repel from
        zero = jnp.zeros((), work)
        return f, zero, zero

    x0 = jax.lax.stop_gradient(f).reshape(b, -1).astype(work)
    step = jax.lax.stop_gradient(eta).astype(work) / m
    before = _log_vendi_cosine(x0)

    def repel(x):
        def body(_, x):
            return x + step * jax.grad(_log_vendi_cosine)(x)

        x = jax.lax.fori_loop(0, m, body, x)
        return x, _log_vendi_cosine(x)

    active = step != 0
    x1, after = jax.lax.cond(active, repel, lambda x: (x, before), x0)
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
    """

    inner_steps: int
    blocks: tuple[int, ...] | None
    cfg_halves: bool

    def __call__(self, eta, block_index, stream):
        if self.blocks is not None and block_index not in self.blocks:
            return stream
        if not self.cfg_halves:
            return repel_context(stream, eta, self.inner_steps)[0]
        b = stream.shape[0]
        if b % 2:
            raise ValueError(f"cfg_halves=True needs an even batch [cond; uncond], got a text "
                             f"stream of batch {b} after block {block_index}")  # fmt: skip
        halves = stream.reshape(2, b // 2, *stream.shape[1:])
        out = jax.vmap(lambda h: repel_context(h, eta, self.inner_steps)[0])(halves)
        return out.reshape(stream.shape)


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
        eta: repulsion scale ``>= 0`` (a traced leaf; ``0`` leaves the model bitwise
            unchanged and skips the inner loop).
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
