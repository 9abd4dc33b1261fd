"""TPSO's offset optimisation (arXiv 2511.19811, Algorithm 1), one jitted ``while_loop``.

The encoder is any differentiable ``encode(token_embeds) -> (hidden, projected)``: the
frozen CLIP text transformer run on token embeddings plus offsets, returning the states a
diffusion model attends to and the projected prompt embedding ``v'`` the losses use. The
pipelines build it from our CLIP port; nothing here knows about a model.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.guidance.tpso.losses import diversity_loss, semantic_loss, unit
from jaxdiv.pytrees import combine, partition

__all__ = ["TPSOResult", "optimize_offsets", "tpso_loss", "trainable_mask"]

_OPTIMIZERS = ("rmsprop", "adam")


class TPSOResult(NamedTuple):
    """Outcome of :func:`optimize_offsets` (rows grouped by prompt, variants adjacent).

    Attributes:
        hidden: (B, L, D) encoder states of the optimised variants (the condition).
        projected: (B, P) their projected prompt embeddings ``v'``.
        original_hidden, original_projected: the same for zero offsets (the prompt).
        cosine: (B,) ``cos(v', v)`` of the returned variants.
        converged: (B,) whether each variant is inside the band.
        offsets: (B, L, D) the token-embedding offsets of the returned variants, as
            added (``token_embeds + offsets`` gives them; zero outside the trainable
            positions): the raw parameters divided by the row's trainable count.
        steps: number of optimiser steps taken (a scalar array).
    """

    hidden: jax.Array
    projected: jax.Array
    original_hidden: jax.Array
    original_projected: jax.Array
    cosine: jax.Array
    converged: jax.Array
    offsets: jax.Array
    steps: jax.Array


def trainable_mask(input_ids, eos_token_id, count=None):
    """Positions whose token embeddings TPSO may move: (B, L) float 0/1.

    ``count=None``: the content tokens, strictly between BOS (position 0) and the first
    EOS. ``count=k`` (an int, or one int per row): positions ``1 .. k``, whatever they hold
    -- the public code's setting for the blank unconditional prompt (``k = 20``, which
    moves EOS and padding) and, with ``k`` = the number of whitespace-separated words, for
    its SD 1.5 / 2.1 prompts.

    >>> trainable_mask(np.array([[9, 4, 5, 8, 8, 8]]), eos_token_id=8).tolist()
    [[0.0, 1.0, 1.0, 0.0, 0.0, 0.0]]
    >>> trainable_mask(np.array([[9, 8, 8, 8, 8, 8]]), 8, count=3).tolist()
    [[0.0, 1.0, 1.0, 1.0, 0.0, 0.0]]
    """
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be an integer array (B, L), got {ids.dtype} "
                         f"{ids.shape}")  # fmt: skip
    b, length = ids.shape
    pos = np.arange(length)[None]
    if count is None:
        is_eos = ids == eos_token_id
        if not is_eos.any(axis=1).all():
            raise ValueError(f"input_ids: a row has no EOS token (id {eos_token_id})")
        counts = is_eos.argmax(axis=1) - 1
    else:
        counts = np.broadcast_to(np.asarray(count), (b,))
        if not np.issubdtype(counts.dtype, np.integer):
            raise TypeError(f"count must be None or integers, got {count!r}")
    counts = np.minimum(counts, length - 2)
    if (counts < 1).any():
        raise ValueError(
            "every row needs at least one trainable token (a blank prompt has none between "
            "BOS and EOS: pass count=k to move the first k positions, as the public code does "
            "with k=20)"
        )
    return ((pos >= 1) & (pos <= counts[:, None])).astype(np.float32)


def optimize_offsets(
    encode,
    token_embeds,
    mask,
    num_variants,
    key=None,
    *,
    kappa=0.8,
    tolerance=0.01,
    diversity_weight=1.0,
    learning_rate=0.01,
    max_steps=50,
    init_std=1e-4,
    optimizer="rmsprop",
    freeze_converged=True,
    init_offsets=None,
) -> TPSOResult:
    """Learn token-embedding offsets so each variant's prompt embedding sits in the band.

    TPSO (arXiv 2511.19811, Eq. 5-9): ``v'_k = f(E(e + eps_k))``; minimise
    ``L_sem + lambda L_div`` (:func:`semantic_loss`, :func:`diversity_loss`) over the
    offsets ``eps`` with RMSprop (lr 0.01; optax with PyTorch's defaults, decay 0.99, eps
    1e-8 outside the square root), at most ``max_steps`` steps, stopping once every variant
    is in ``[kappa - tol, kappa + tol]``. As in the public code (``Open-Debin/TPSO``,
    ``src/tpso/optimization.py`` and ``text_encoder.py``):

    * offsets start at ``N(0, init_std^2)`` on the trainable positions (``mask``) and are
      applied scaled by ``1 / (number of trainable positions)`` of their row;
    * ``freeze_converged=True`` (its "active subset" mode, used for prompts): a variant
      found inside the band stops moving and keeps the encoding that was inside; the
      diversity term then uses the frozen variants' embeddings as constants and scales
      each group by ``N / #active``. Which variants are active is decided from the
      encodings of the previous step (as in the public loop), so a variant can take one
      step after entering the band; the returned encoding is the one found inside.
    * ``freeze_converged=False`` (its full-batch mode, used for the blank unconditional
      prompt): all variants move until all are in the band at once; the returned
      encodings are those of the last evaluated offsets.

    The loop is a ``lax.while_loop`` inside one ``jit``; ``kappa``, ``tolerance``,
    ``diversity_weight``, ``learning_rate`` and ``max_steps`` are traced (new values do
    not recompile).

    Args:
        encode: ``encode(token_embeds (B, L, D)) -> (hidden (B, L, D'), projected (B, P))``,
            differentiable. Its array leaves (e.g. the weights of a
            :class:`jax.tree_util.Partial`) are traced: it compiles once per structure.
        token_embeds: (B, L, D) token embeddings of the prompts, each prompt repeated
            ``num_variants`` times consecutively (B = prompts x variants).
        mask: (B, L) 0/1 trainable positions (:func:`trainable_mask`).
        num_variants: variants per prompt ``N``.
        key: PRNG key of the initial offsets (not needed with ``init_offsets``).
        kappa, tolerance: the band ``[kappa - tol, kappa + tol]`` (0.80 +- 0.01).
        diversity_weight: ``lambda`` (1 for SD 1.5 / 2.1, 10 for SD 3.5).
        learning_rate, max_steps: optimiser settings (0.01; 50, 200 for SD 3.5).
        init_std: standard deviation of the initial offsets (1e-4).
        optimizer: ``"rmsprop"`` (the paper's code) or ``"adam"`` (its Algorithm 1 text).
        freeze_converged: see above.
        init_offsets: (B, L, D) explicit initial offsets instead of random ones: the raw
            parameters, which are divided by each row's number of trainable positions
            before they are added (the public code's ``offset_scale``) -- so not
            ``TPSOResult.offsets`` (already divided): pass ``offsets * count`` to resume.

    Returns:
        :class:`TPSOResult`.

    Example (a toy encoder; the three variants reach the band):

    >>> import jax, jax.numpy as jnp
    >>> from jax.tree_util import Partial
    >>> def enc(w, e):                    # hidden, projected
    ...     return e, jnp.tanh(e @ w).reshape(e.shape[0], -1)
    >>> w = jax.random.normal(jax.random.key(1), (4, 2))
    >>> e = jnp.tile(jnp.eye(4)[None], (3, 1, 1))      # 1 prompt x 3 variants, L = D = 4
    >>> mask = jnp.array([[0.0, 1, 1, 0]] * 3)        # BOS and EOS stay put
    >>> r = optimize_offsets(Partial(enc, w), e, mask, 3, jax.random.key(0),
    ...                      learning_rate=0.05, diversity_weight=0.1)
    >>> bool(r.converged.all()), bool(jnp.all(r.offsets[:, [0, 3]] == 0))
    (True, True)
    """
    validation.function("encode", encode, "encode(token_embeds) -> (hidden, projected)")
    token_embeds = validation.finite_array("token_embeds", token_embeds, ndim=3)
    b, length, _ = token_embeds.shape
    mask = validation.finite_array("mask", mask)
    if mask.shape not in ((b, length), (b, length, 1)):
        raise ValueError(f"mask must have shape {(b, length)} like token_embeds' first two "
                         f"axes, got {tuple(mask.shape)}")  # fmt: skip
    mask = mask.reshape(b, length, 1).astype(token_embeds.dtype)
    if validation.is_concrete(mask):
        if not bool(jnp.all((mask == 0) | (mask == 1))):
            raise ValueError("mask must hold only 0 and 1")
        if not bool(jnp.all(mask.sum((1, 2)) >= 1)):
            raise ValueError("mask: every row needs at least one trainable position")
    num_variants = validation.integer("num_variants", num_variants, minimum=1)
    if b % num_variants:
        raise ValueError(f"token_embeds: {b} rows is not a multiple of num_variants="
                         f"{num_variants}")  # fmt: skip
    kappa = validation.real("kappa", kappa, lo=0, lo_open=True, hi=1)
    tolerance = validation.real("tolerance", tolerance, lo=0, lo_open=True, hi=1, hi_open=True)
    diversity_weight = validation.real("diversity_weight", diversity_weight, lo=0)
    learning_rate = validation.real("learning_rate", learning_rate, lo=0, lo_open=True)
    max_steps = validation.integer("max_steps", max_steps, minimum=1)
    init_std = validation.real("init_std", init_std, lo=0)
    validation.choice("optimizer", optimizer, _OPTIMIZERS)
    freeze_converged = validation.boolean("freeze_converged", freeze_converged)
    if init_offsets is None:
        if key is None:
            raise ValueError("optimize_offsets needs key= (or init_offsets=)")
        init = jax.random.normal(key, token_embeds.shape, token_embeds.dtype) * init_std
    else:
        init = validation.finite_array("init_offsets", init_offsets)
        if init.shape != token_embeds.shape:
            raise ValueError(f"init_offsets must have shape {tuple(token_embeds.shape)}, got "
                             f"{tuple(init.shape)}")  # fmt: skip
    hyper = (kappa, tolerance, diversity_weight, learning_rate, jnp.asarray(max_steps))
    dynamic, spec = partition(encode)
    return _optimize(dynamic, spec, token_embeds, mask, init.astype(token_embeds.dtype) * mask,
                     hyper, num_variants, optimizer, freeze_converged)  # fmt: skip


def _applied(offsets, mask):
    """The offsets as added to the token embeddings: masked, and scaled by 1 / (number of
    trainable positions) of their row (``offset_scale`` in the public code)."""
    return offsets * mask / mask.sum(axis=(1, 2), keepdims=True)


def tpso_loss(encode, token_embeds, mask, offsets, target, num_variants, *, kappa=0.8,
              tolerance=0.01, diversity_weight=1.0, frozen=None):  # fmt: skip
    """TPSO's objective ``L_sem + lambda L_div`` (Eq. 9) at ``offsets``, with its encodings.

    ``v'_k`` is the unit projected embedding of ``encode(token_embeds + offsets')`` where
    ``offsets'`` are the masked, scaled offsets; ``target`` holds the unit original
    embeddings ``v`` (B, P). ``frozen=(active, frozen_unit)`` evaluates the public code's
    active-subset loss: inactive rows contribute their ``frozen_unit`` rows as constants
    and no semantic term.

    Returns:
        ``(loss, (hidden, projected, unit_projected, cosine))``.

    Example:
        >>> import jax.numpy as jnp
        >>> enc = lambda e: (e, e.sum(1))
        >>> e = jnp.array([[[1.0, 0.0], [0.0, 1.0]]] * 2)        # 1 prompt x 2 variants
        >>> mask = jnp.array([[0.0, 1.0]] * 2)                  # (B, L) 0/1
        >>> target = jnp.array([[1.0, 0.0]] * 2)                  # cos = 0.707: below the band
        >>> loss, aux = tpso_loss(enc, e, mask, jnp.zeros_like(e), target, 2)
        >>> round(float(loss), 4)              # 2 (0.79 - 0.7071) + 1 x (-distance 0)
        0.1658
    """
    mask = jnp.asarray(mask)
    mask = mask[..., None] if mask.ndim == 2 else mask
    hidden, projected = encode(token_embeds + _applied(offsets, mask))
    u = unit(projected)
    cos = jnp.sum(u * target, axis=-1)
    if frozen is None:
        loss = semantic_loss(cos, kappa, tolerance)
        loss = loss + diversity_weight * diversity_loss(u, num_variants)
    else:
        active, frozen_unit = frozen
        mixed = jnp.where(active[:, None], u, jax.lax.stop_gradient(frozen_unit))
        loss = semantic_loss(jnp.where(active, cos, kappa), kappa, tolerance)
        loss = loss + diversity_weight * diversity_loss(mixed, num_variants, active)
    return loss, (hidden, projected, u, cos)


def _make_optimizer(name, learning_rate):
    import optax  # only when TPSO runs: `import jaxdiv` stays light

    if name == "rmsprop":  # torch.optim.RMSprop defaults: alpha 0.99, eps outside the sqrt
        return optax.rmsprop(learning_rate, decay=0.99, eps=1e-8, eps_in_sqrt=False)
    return optax.adam(learning_rate)


@functools.partial(
    jax.jit, static_argnames=("spec", "num_variants", "optimizer", "freeze_converged")
)
def _optimize(dynamic, spec, token_embeds, mask, init, hyper, num_variants, optimizer,
              freeze_converged):  # fmt: skip
    encode = combine(dynamic, spec)
    kappa, tol, weight, lr, max_steps = hyper
    opt = _make_optimizer(optimizer, lr)
    hidden0, projected0 = encode(token_embeds)
    target = unit(projected0)

    def in_band(cos):
        return (cos >= kappa - tol) & (cos <= kappa + tol)

    def loss_fn(theta, frozen_unit, active):
        frozen = (active, frozen_unit) if freeze_converged else None
        return tpso_loss(encode, token_embeds, mask, theta, target, num_variants, kappa=kappa,
                         tolerance=tol, diversity_weight=weight, frozen=frozen)  # fmt: skip

    grad_fn = jax.grad(loss_fn, has_aux=True)

    def body(carry):
        theta, opt_state, cache, last, k, done = carry
        if freeze_converged:
            active = ~in_band(cache[3])
        else:
            active = jnp.ones(theta.shape[0], bool)
        grads, fresh = grad_fn(theta, cache[2], active)
        if freeze_converged:
            stop = ~active.any()
        else:  # the full-batch loop checks the fresh encodings before stepping
            stop = in_band(fresh[3]).all()
        grads = grads * active[:, None, None]
        updates, new_state = opt.update(grads, opt_state, theta)
        new_theta = theta + updates
        take = lambda new, old: jnp.where(stop, old, new)  # noqa: E731
        if freeze_converged:
            # frozen rows keep the encoding (and offsets) found inside the band
            sel = lambda f, c: jnp.where(active.reshape((-1,) + (1,) * (f.ndim - 1)), f, c)  # noqa: E731
            new_cache = jax.tree.map(sel, fresh, cache)
            new_last = jnp.where(active[:, None, None], theta, last)
        else:
            new_cache, new_last = fresh, theta
        # on stop nothing moves; the cache then holds what was found inside the band (the
        # fresh encodings in full-batch mode, the frozen ones otherwise)
        return (
            take(new_theta, theta),
            jax.tree.map(take, new_state, opt_state),
            new_cache,
            new_last,
            k + jnp.where(stop, 0, 1),
            stop,
        )

    def cond(carry):
        return (~carry[5]) & (carry[4] < max_steps)

    start = loss_fn(init, target, jnp.ones(init.shape[0], bool))[1]
    carry = (init, opt.init(init), start, init, jnp.asarray(0), jnp.asarray(False))
    _, _, cache, last, steps, _ = jax.lax.while_loop(cond, body, carry)
    hidden, projected, _, cos = cache
    return TPSOResult(hidden, projected, hidden0, projected0, cos, in_band(cos),
                      _applied(last, mask), steps)  # fmt: skip
