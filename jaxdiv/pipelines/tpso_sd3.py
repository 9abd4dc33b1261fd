"""TPSO on Stable Diffusion 3 / 3.5: offsets on both CLIP encoders, T5 unchanged.

What the public code (``Open-Debin/TPSO``, ``src/tpso/pipelines/stable_diffusion3.py``,
``StableDiffusion3Adapter``) does for SD3.5-Medium, and what this module reproduces:

* **Two independent optimisations**, one per CLIP encoder (CLIP-L ``text_encoder``, CLIP-G
  ``text_encoder_2``), each on its own token-embedding table with its own offsets, its
  own band and diversity losses on its *own* projected ``text_embeds``, its own
  active-subset freezing and its own stopping (``optimize``, lines 133-205: one
  ``prepare_clip_session`` and one ``optimize_session`` per encoder; nothing is summed or
  concatenated across encoders). Offsets start ``N(0, 1e-8)``, CLIP-L's drawn first.
  T5 is never optimised.
* The states each encoder contributes are its penultimate hidden state
  (``hidden_state_index=-2``, no final LayerNorm: diffusers' SD3 ``clip_skip=None``);
  the loss uses the EOS-pooled output after the final LayerNorm and the projection
  (``src/tpso/text_encoder.py``, ``CLIPOffsetSession._encode``, lines 46-92).
* **Assembly** (``_compose_at_step``, lines 207-237): the optimised CLIP-L / CLIP-G
  states are concatenated on features, zero-padded to T5's width and put before the
  *unchanged* T5 states; ``pooled = [proj_L; proj_G]``, so both the sequence and the
  pooled vector carry the variants.
* **Schedule**: at step ``i`` the CLIP states and both pooled vectors are
  ``alpha_i opt + (1 - alpha_i) orig`` (same ``coarse_to_fine_alphas`` as SD 1.5); T5
  and the padding are not mixed (``generate``, ``update_prompt``, ``callback_on_step_end``
  sets step ``i + 1``'s embeddings). Mixing the whole :class:`SD3Cond` is the same,
  since the T5 rows of the optimised and original conditions are equal
  (:func:`jaxdiv.guidance.tpso` keeps such entries bit for bit).
* **Negative branch**: a precomputed pool of optimised blank prompts ``" "`` for both
  encoders (``src/tpso/runner.py``: ``SOURCE_CONTEXT_PROTOCOL["sd35"]`` = 300 rows in
  groups of 30, ``UNCONDITIONAL_TRAINABLE_TOKENS`` = 20, ``unconditional_config``:
  ``diversity_weight = 0`` for SD3.5, 200 steps; ``rebuild_context``: active-subset
  freezing for SD3.5), drawn without replacement with the *same* rows for both encoders
  (``src/tpso/contexts.py``, ``sample_context``), joined with the T5 states of ``""``
  and mixed on the same ``alpha`` schedule.
* Defaults (``configs/sd35.yaml``, ``src/tpso/config.py``): 512 px, 35 sampling steps,
  CFG 7.0, kappa 0.80 +- 0.01, lambda 10, RMSprop lr 0.01, at most 200 steps, ratio 0.4.

Not reproduced:

* after optimising, the public SD3 adapter re-encodes ``result.offsets`` (line 198); in
  its active-subset loop those are the offsets *after* the optimiser step that followed
  a variant's entry into the band (``src/tpso/optimization.py``: ``cached_offsets`` is
  taken before ``optimizer.step()``, and frozen rows are not updated afterwards), so a
  variant frozen before the last iteration is returned one step past the band. Here
  every variant keeps the encoding found inside the band (the paper's constraint), as
  the public SD 1.5 / 2.1 adapter does.
* its T5 sequence is 77 tokens (``T5_MAX_SEQUENCE_LENGTH``, line 25), not diffusers'
  256: load the pipeline with ``max_sequence_length=77`` to match it.
* the public adapter measures the band through projections loaded from
  ``openai/clip-vit-large-patch14`` and LAION ``CLIP-ViT-bigG-14`` (the same towers SD3
  ships, so the same weights as the folder's own ``text_projection`` up to dtype; pass
  ``projection=`` to use other ones), runs the optimisation under fp16/bf16 autocast, and
  samples with a ``FlowMatchEulerDiscreteScheduler`` that adds ``0.03 * N(0, 1)`` after
  every step (``StochasticFlowScheduler``, lines 55-80); it also starts all variants of a
  prompt from one noise (``shared_latents``: ``jnp.repeat(noise, n, axis=0)``).

Use it through :mod:`jaxdiv.pipelines.tpso`, which dispatches on the pipeline::

    pool = tpso.tpso_null_pool(pipe, key_pool)                        # once per model
    c = tpso.tpso_conditions(pipe, prompts, n, key, null_pool=pool)
    g = pipe.generate(prompts, n, key=key, sampler=pipe.flow_euler(35),
                      method=tpso.tpso_guidance(c, scale=7.0))
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from jaxdiv import validation
from jaxdiv.guidance.tpso import TPSOResult, optimize_offsets, trainable_mask

__all__ = ["SD3TPSOResult", "DEFAULTS", "NULL_POOL_DEFAULTS", "tpso_conditions", "tpso_null_pool"]

ENCODERS = ("clip_l", "clip_g")

# the public SD3.5-Medium configuration (configs/sd35.yaml; src/tpso/config.py
# MODEL_SPECS["sd35"], default_config)
DEFAULTS = dict(kappa=0.8, tolerance=0.01, diversity_weight=10.0, learning_rate=0.01,
                max_steps=200, init_std=1e-4, optimizer="rmsprop")  # fmt: skip
# its unconditional context (src/tpso/runner.py SOURCE_CONTEXT_PROTOCOL["sd35"],
# UNCONDITIONAL_TRAINABLE_TOKENS, unconditional_config, rebuild_context)
NULL_POOL_DEFAULTS = dict(size=300, group_size=30, trainable_tokens=20, diversity_weight=0.0,
                          max_steps=200, freeze_converged=True)  # fmt: skip


class SD3TPSOResult(NamedTuple):
    """TPSO's outcome on SD3: one :class:`~jaxdiv.guidance.tpso.TPSOResult` per CLIP
    encoder (rows: prompts x variants, variants adjacent; the same rows in both)."""

    clip_l: TPSOResult
    clip_g: TPSOResult

    @property
    def converged(self) -> jax.Array:
        """(B,) whether each row is inside the band on both encoders."""
        return self.clip_l.converged & self.clip_g.converged


@functools.cache
def _encode_fn(clip_skip):
    # one function per clip_skip (a compile-time constant), with a stable identity
    def encode(features, ids, kernel, token_embeds):
        hidden, pooled = features(ids, token_embeds, clip_skip=clip_skip)
        return hidden, pooled @ kernel.astype(pooled.dtype)

    return encode


def _kernels(pipe, projection):
    """The two ``(D, P)`` kernels the band is measured with (and ``pooled`` is made of)."""
    from jaxdiv.pipelines.tpso import load_text_projection

    own = pipe.text_projections
    if projection is None:
        return own
    if isinstance(projection, str | os.PathLike) or not isinstance(projection, Sequence) \
            or len(projection) != 2:  # fmt: skip
        raise ValueError("projection: on SD3 pass None (each encoder's own text_projection) "
                         "or a pair (CLIP-L, CLIP-G), each None, a CLIP folder or a (D, P) "
                         "kernel")  # fmt: skip
    out = []
    for name, p, mine in zip(ENCODERS, projection, own, strict=True):
        if p is None:
            out.append(mine)
            continue
        if isinstance(p, str | os.PathLike):
            p = load_text_projection(p)
        kernel = validation.finite_array(f"projection[{name}]", p, ndim=2)
        if kernel.shape != mine.shape:
            raise ValueError(f"projection[{name}]: shape {tuple(kernel.shape)} differs from "
                             f"the {name} text_projection {tuple(mine.shape)} (the pooled "
                             "condition is made of its output)")  # fmt: skip
        out.append(kernel)
    return tuple(out)


def _check(pipe):
    if getattr(pipe, "clip_features", None) is None or pipe.token_embeddings is None:
        raise TypeError("pipe must be a StableDiffusion3 record from stable_diffusion_3.load()")


def _optimize(pipe, tokens, masks, kernels, clip_skip, key, num_variants, max_steps,
              freeze_converged, settings) -> SD3TPSOResult:  # fmt: skip
    # one optimisation per encoder, as the public adapter (src/tpso/pipelines/
    # stable_diffusion3.py lines 168-201: a session and an optimize_session per encoder)
    keys = jax.random.split(key, len(ENCODERS))
    results = []
    for i, name in enumerate(ENCODERS):
        ids = jnp.asarray(getattr(tokens, name))
        encode = Partial(_encode_fn(clip_skip), pipe.clip_features[i], ids, kernels[i])
        embeds = jnp.take(pipe.token_embeddings[i], ids, axis=0)
        results.append(optimize_offsets(encode, embeds, masks[i], num_variants, keys[i],
                                        max_steps=max_steps, freeze_converged=freeze_converged,
                                        **settings))  # fmt: skip
    return SD3TPSOResult(*results)


def _assemble(result: SD3TPSOResult, t5_states, optimized: bool):
    from jaxdiv.pipelines.stable_diffusion_3 import assemble_cond

    l, g = result
    if optimized:
        return assemble_cond(l.hidden, g.hidden, t5_states, l.projected, g.projected)
    return assemble_cond(l.original_hidden, g.original_hidden, t5_states,
                         l.original_projected, g.original_projected)  # fmt: skip


def _settings(kw):
    return {k: kw[k] for k in ("kappa", "tolerance", "diversity_weight", "learning_rate",
                               "init_std", "optimizer")}  # fmt: skip


def tpso_null_pool(pipe, key, *, size=None, group_size=None, trainable_tokens=None,
                   projection=None, kappa=0.8, tolerance=0.01, diversity_weight=None,
                   learning_rate=0.01, max_steps=None, init_std=1e-4, optimizer="rmsprop",
                   freeze_converged=None) -> SD3TPSOResult:  # fmt: skip
    """The public SD3.5 unconditional context: ``size`` blank prompts ``" "`` optimised on
    both CLIP encoders (see :data:`NULL_POOL_DEFAULTS`: 300 in groups of 30, positions
    1-20 trainable, lambda 0, at most 200 steps, converged rows frozen), encoded as
    diffusers encodes the negative prompt (no ``clip_skip``).

    Example:
        >>> import jax
        >>> from jaxdiv.testing import example_sd3_pipeline
        >>> pool = tpso_null_pool(example_sd3_pipeline(), jax.random.key(0), size=4,
        ...                       group_size=2, max_steps=3)
        >>> pool.clip_l.hidden.shape[0], pool.clip_g.hidden.shape[0]
        (4, 4)
    """
    _check(pipe)
    d = NULL_POOL_DEFAULTS
    pick = lambda v, k: d[k] if v is None else v  # noqa: E731
    size = validation.integer("size", pick(size, "size"), minimum=1)
    group_size = validation.integer("group_size", pick(group_size, "group_size"), minimum=1)
    trainable_tokens = pick(trainable_tokens, "trainable_tokens")
    trainable_tokens = validation.integer("trainable_tokens", trainable_tokens, minimum=1)
    group_size = min(group_size, size)
    groups = -(-size // group_size)
    tokens = pipe.tokenize([" "] * (groups * group_size))
    masks = [trainable_mask(getattr(tokens, name), tok.eos_token_id, count=trainable_tokens)
             for name, tok in zip(ENCODERS, pipe.tokenizers[:2], strict=True)]  # fmt: skip
    settings = _settings(dict(kappa=kappa, tolerance=tolerance,
                              diversity_weight=pick(diversity_weight, "diversity_weight"),
                              learning_rate=learning_rate, init_std=init_std,
                              optimizer=optimizer))  # fmt: skip
    freeze = validation.boolean("freeze_converged", pick(freeze_converged, "freeze_converged"))
    return _optimize(pipe, tokens, masks, _kernels(pipe, projection), None, key, group_size,
                     pick(max_steps, "max_steps"), freeze, settings)  # fmt: skip


def tpso_conditions(pipe, prompts, num_variants, key, *, projection=None, null_pool=None,
                    count=None, kappa=0.8, tolerance=0.01, diversity_weight=None,
                    learning_rate=0.01, max_steps=None, init_std=1e-4,
                    optimizer="rmsprop"):  # fmt: skip
    """TPSO variants of each prompt on SD3 / SD3.5 (see the module docstring); called by
    :func:`jaxdiv.pipelines.tpso.tpso_conditions` for an SD3 pipeline.

    Defaults: the public SD3.5-Medium configuration (:data:`DEFAULTS`: lambda 10, at most
    200 steps); trainable positions are each encoder's content tokens (``count=None``,
    the public SD3 adapter's ``token_count_mode="tokenizer"``).

    Returns:
        :class:`~jaxdiv.pipelines.tpso.TPSOConditions` whose conditions are
        :class:`~jaxdiv.pipelines.stable_diffusion_3.SD3Cond` and whose results are
        :class:`SD3TPSOResult`.

    Example:
        >>> import jax
        >>> from jaxdiv.testing import example_sd3_pipeline
        >>> c = tpso_conditions(example_sd3_pipeline(), ["a cat"], 2, jax.random.key(0),
        ...                     max_steps=3)
        >>> c.optimized.prompt_embeds.shape == c.cond.prompt_embeds.shape, c.cond.pooled.shape
        (True, (2, 12))
    """
    from jaxdiv.pipelines.tpso import TPSOConditions, variant_rows

    _check(pipe)
    prompts, num_variants, rows, count = variant_rows(prompts, num_variants, count)
    tokens = pipe.tokenize(rows)
    masks = [trainable_mask(getattr(tokens, name), tok.eos_token_id, count=count)
             for name, tok in zip(ENCODERS, pipe.tokenizers[:2], strict=True)]  # fmt: skip
    kernels = _kernels(pipe, projection)
    k_opt, k_null = jax.random.split(key)
    settings = _settings(dict(kappa=kappa, tolerance=tolerance,
                              diversity_weight=DEFAULTS["diversity_weight"]
                              if diversity_weight is None else diversity_weight,
                              learning_rate=learning_rate, init_std=init_std,
                              optimizer=optimizer))  # fmt: skip
    max_steps = DEFAULTS["max_steps"] if max_steps is None else max_steps
    result = _optimize(pipe, tokens, masks, kernels, pipe.clip_skip, k_opt, num_variants,
                       max_steps, True, settings)  # fmt: skip
    # T5 is not optimised: its states are the prompt's own, in every variant
    length = tokens.clip_l.shape[1]
    t5 = pipe.encode_prompt(tokens).prompt_embeds[:, length:]
    null_result = null_optimized = None
    if null_pool is not None:
        if not isinstance(null_pool, SD3TPSOResult):
            raise TypeError(f"null_pool must be an SD3TPSOResult from tpso_null_pool() on an "
                            f"SD3 pipeline, got {type(null_pool).__name__}")  # fmt: skip
        total = null_pool.clip_l.hidden.shape[0]
        if len(rows) > total:
            raise ValueError(f"null_pool holds {total} embeddings, fewer than the {len(rows)} "
                             "images: build a larger pool (tpso_null_pool(size=...))")  # fmt: skip
        for name, pool_r, r in zip(ENCODERS, null_pool, result, strict=True):
            if pool_r.hidden.shape[1:] != r.hidden.shape[1:]:
                raise ValueError(f"null_pool {name} states {pool_r.hidden.shape[1:]} do not "
                                 f"match this pipeline's {r.hidden.shape[1:]}")  # fmt: skip
        # the same rows for both encoders (src/tpso/contexts.py sample_context)
        pick = jax.random.permutation(k_null, total)[: len(rows)]
        null_result = jax.tree.map(lambda a: a[pick] if jnp.ndim(a) else a, null_pool)
        null_t5 = pipe.null_cond.prompt_embeds[:, length:]
        null_t5 = jnp.broadcast_to(null_t5, (len(rows), *null_t5.shape[1:]))
        null_optimized = _assemble(null_result, null_t5, optimized=True)
    return TPSOConditions(
        cond=_assemble(result, t5, optimized=False),
        optimized=_assemble(result, t5, optimized=True),
        null_cond=pipe.null_cond,
        null_optimized=null_optimized,
        result=result,
        null_result=null_result,
    )
