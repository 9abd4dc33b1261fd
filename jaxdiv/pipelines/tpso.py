"""TPSO on a CLIP-text pipeline: optimise prompt variants, then sample with both CFG branches
scheduled as the public code does.

TPSO (arXiv 2511.19811) learns offsets on the token embeddings of each prompt's content
tokens so that every variant's projected CLIP prompt embedding sits at cosine
``kappa +- tol`` (0.80 +- 0.01) to the original while the variants spread apart; sampling
then starts from the variants and fades back to the prompt (``ratio`` 0.4). The public
code (``Open-Debin/TPSO``) also replaces the negative branch of CFG: it optimises the
blank prompt ``" "`` in groups of 35 (positions 1-20 trainable, full-batch stopping, up to
200 steps, the same ``kappa`` and ``lambda``), keeps a pool of 350 such embeddings and
gives each image one drawn without replacement, on the same schedule
(``src/tpso/runner.py``: ``rebuild_context``, ``resolve_unconditional``;
``src/tpso/pipelines/stable_diffusion.py``: ``generate``). :func:`tpso_null_pool` builds
that pool locally (the public code downloads it).

Three functions, one line each in use::

    pool = tpso_null_pool(pipe, key_pool, projection=proj)          # once per model
    c = tpso_conditions(pipe, prompts, n, key, projection=proj, null_pool=pool)
    out = jaxdiv.sample(pipe.ddim(50), pipe.denoiser, noise, key=key, cond=c.cond,
                        guidance=tpso_guidance(c, scale=7.5))

The projection is the CLIP text projection the paper measures cosines with: SD 1.5's text
encoder has none, so the public code borrows ``openai/clip-vit-large-patch14``'s (and
LAION ``CLIP-ViT-H-14``'s for SD 2.1); pass that folder (or the ``(D, P)`` kernel) as
``projection``. The public code also starts all variants of a prompt from the *same*
initial noise (``shared_latents``): ``jnp.repeat(noise, n, axis=0)`` reproduces that.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import guidance, validation
from jaxdiv.guidance.cfg import check_rescale
from jaxdiv.guidance.tpso import TPSOResult, optimize_offsets, trainable_mask
from jaxdiv.models.clip import load_clip_text
from jaxdiv.pipelines.generation import is_sd3
from jaxdiv.pipelines.stacklevel import user_stacklevel

__all__ = [
    "TPSOConditions",
    "load_text_projection",
    "tpso_conditions",
    "tpso_guidance",
    "tpso_null_pool",
]


class TPSOConditions(NamedTuple):
    """Everything a TPSO run samples with (rows: prompts x variants, variants adjacent).

    Attributes:
        cond: (B, L, D) the prompts' own states, repeated per variant: ``cond=`` of
            :func:`jaxdiv.sample`.
        optimized: (B, L, D) the optimised variants' states.
        null_cond: (1, L, D) the plain null (empty-prompt) states.
        null_optimized: (B, L, D) optimised blank-prompt states for the negative branch,
            or ``None`` (plain null throughout).
        result: the prompts' :class:`~jaxdiv.guidance.tpso.TPSOResult`.
        null_result: the pool rows drawn for the negative branch (or ``None``).

    On SD3 the four conditions are :class:`~jaxdiv.pipelines.stable_diffusion_3.SD3Cond`
    pytrees and the results :class:`~jaxdiv.pipelines.tpso_sd3.SD3TPSOResult` (one
    :class:`~jaxdiv.guidance.tpso.TPSOResult` per CLIP encoder).
    """

    cond: jax.Array
    optimized: jax.Array
    null_cond: jax.Array
    null_optimized: jax.Array | None
    result: TPSOResult
    null_result: TPSOResult | None


def load_text_projection(folder: str | os.PathLike, allow_pickle: bool = False) -> jax.Array:
    """The ``(D, P)`` ``text_projection`` kernel of a local CLIP folder
    (``CLIPTextModelWithProjection`` or a full ``CLIPModel``), e.g. the OpenAI ViT-L/14
    folder the public TPSO code pairs with SD 1.5.

    Example:
        >>> import tempfile, transformers
        >>> from jaxdiv.testing import TINY_TEXT
        >>> d = tempfile.mkdtemp()
        >>> cfg = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=83)
        >>> transformers.CLIPTextModelWithProjection(cfg).save_pretrained(d)
        >>> load_text_projection(d).shape
        (32, 16)
    """
    model = load_clip_text(folder, with_projection=True, allow_pickle=allow_pickle)
    return model.text_projection.kernel[...]


def _projection(pipe, projection):
    if projection is False:
        return None
    if projection is None:
        if pipe.text_projection is None:
            raise ValueError(
                "projection: this pipeline's text encoder has no text_projection, and TPSO "
                "measures cosines after one. Pass projection= the folder of a CLIP text "
                "model with projection of the same width (the public code uses "
                "openai/clip-vit-large-patch14 for SD 1.5 and LAION CLIP-ViT-H-14 for SD "
                "2.1), a (D, P) kernel, or projection=False to use the pooled output itself"
            )
        return pipe.text_projection
    if isinstance(projection, str | os.PathLike):
        projection = load_text_projection(projection)
    kernel = validation.finite_array("projection", projection, ndim=2)
    width = pipe.token_embedding.shape[1]
    if kernel.shape[0] != width:
        raise ValueError(
            f"projection: its input width {kernel.shape[0]} differs from the text encoder's "
            f"hidden size {width} (kernel shape {tuple(kernel.shape)})"
        )
    return kernel


def _encode(text_features, tokens, kernel, token_embeds):
    hidden, pooled = text_features(tokens, token_embeds)
    return hidden, pooled if kernel is None else pooled @ kernel.astype(pooled.dtype)


def _encoder(pipe, tokens, projection):
    if pipe.text_features is None or pipe.token_embedding is None:
        raise TypeError("pipe must be a StableDiffusion record from stable_diffusion.load()")
    tokens = jnp.asarray(tokens)
    embeds = jnp.take(pipe.token_embedding, tokens, axis=0)
    return Partial(_encode, pipe.text_features, tokens, _projection(pipe, projection)), embeds


def variant_rows(prompts, num_variants, count):
    """``(prompts, num_variants, rows, count)``: the prompts as a list, each repeated
    ``num_variants`` times (prompt-major rows), and ``count="words"`` as each row's word
    count (the trainable tokens; an int or ``None`` passes through).

    Example:
        >>> variant_rows("a red car", 2, "words")[2:]
        (['a red car', 'a red car'], array([3, 3]))
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must name at least one prompt, got an empty list")
    num_variants = validation.integer("num_variants", num_variants, minimum=1)
    rows = [p for p in prompts for _ in range(num_variants)]
    if count == "words":
        blank = [p for p in prompts if not p.split()]
        if blank:  # the public code: "every optimized prompt must contain a trainable token"
            raise ValueError(f"count='words': prompt {blank[0]!r} has no words, so no token "
                             "to optimise")  # fmt: skip
        count = np.asarray([len(p.split()) for p in rows])
    elif isinstance(count, str):
        raise ValueError(f"count must be None, 'words' or an int, got {count!r}")
    return prompts, num_variants, rows, count


def _settings(kappa, tolerance, diversity_weight, learning_rate, init_std, optimizer):
    return dict(kappa=kappa, tolerance=tolerance, diversity_weight=diversity_weight,
                learning_rate=learning_rate, init_std=init_std, optimizer=optimizer)  # fmt: skip


def tpso_null_pool(
    pipe,
    key,
    *,
    size: int | None = None,
    group_size: int | None = None,
    trainable_tokens: int = 20,
    projection: Any = None,
    kappa=0.8,
    tolerance=0.01,
    diversity_weight=None,
    learning_rate=0.01,
    max_steps: int = 200,
    init_std=1e-4,
    optimizer: str = "rmsprop",
) -> TPSOResult:
    """A pool of optimised blank-prompt embeddings for TPSO's negative CFG branch.

    The public code's unconditional context for SD 1.5 / 2.1 (``src/tpso/runner.py``,
    ``SOURCE_CONTEXT_PROTOCOL``, ``unconditional_config``, ``rebuild_context``): the prompt
    ``" "`` in ``size / group_size`` groups of ``group_size`` variants, positions
    ``1 .. trainable_tokens`` trainable (EOS and padding: a blank prompt has no content
    token), the conditional ``kappa`` and ``lambda``, up to 200 steps, every variant
    moving until all are in the band (``freeze_converged=False``). Compute it once per
    model and reuse it (its arrays save with ``numpy.savez``).

    ``None`` defaults: ``size`` 350, ``group_size`` 35, ``diversity_weight`` 1 (SD 1.5 /
    2.1). On an SD3 pipeline this runs
    :func:`jaxdiv.pipelines.tpso_sd3.tpso_null_pool` (both CLIP encoders; the public
    SD3.5 protocol: 300 in groups of 30, lambda 0, converged rows frozen) and returns an
    :class:`~jaxdiv.pipelines.tpso_sd3.SD3TPSOResult`.

    Returns:
        A :class:`~jaxdiv.guidance.tpso.TPSOResult` with ``size`` rows (rounded up to
        whole groups).

    Example:
        >>> import jax
        >>> from jaxdiv.testing import example_pipeline
        >>> pool = tpso_null_pool(example_pipeline(), jax.random.key(0), size=4,
        ...                       group_size=2, projection=False, max_steps=5)
        >>> pool.hidden.shape
        (4, 16, 32)
    """
    validation.prng_key("key", key)
    if is_sd3(pipe):
        from jaxdiv.pipelines import tpso_sd3

        return tpso_sd3.tpso_null_pool(
            pipe, key, size=size, group_size=group_size, trainable_tokens=trainable_tokens,
            projection=projection, kappa=kappa, tolerance=tolerance,
            diversity_weight=diversity_weight, learning_rate=learning_rate,
            max_steps=max_steps, init_std=init_std, optimizer=optimizer,
        )  # fmt: skip
    size = validation.integer("size", 350 if size is None else size, minimum=1)
    group_size = validation.integer("group_size", 35 if group_size is None else group_size,
                                    minimum=1)  # fmt: skip
    diversity_weight = 1.0 if diversity_weight is None else diversity_weight
    trainable_tokens = validation.integer("trainable_tokens", trainable_tokens, minimum=1)
    group_size = min(group_size, size)  # a pool smaller than a group is one group
    groups = -(-size // group_size)
    tokens = pipe.tokenize([" "] * (groups * group_size))
    encode, embeds = _encoder(pipe, tokens, projection)
    mask = trainable_mask(tokens, pipe.tokenizer.eos_token_id, count=trainable_tokens)
    return optimize_offsets(
        encode, embeds, mask, group_size, key, max_steps=max_steps, freeze_converged=False,
        **_settings(kappa, tolerance, diversity_weight, learning_rate, init_std, optimizer),
    )  # fmt: skip


def tpso_conditions(
    pipe,
    prompts: str | Sequence[str],
    num_variants: int,
    key,
    *,
    projection: Any = None,
    null_pool: TPSOResult | None = None,
    count: int | str | None = None,
    kappa=0.8,
    tolerance=0.01,
    diversity_weight=None,
    learning_rate=0.01,
    max_steps: int | None = None,
    init_std=1e-4,
    optimizer: str = "rmsprop",
) -> TPSOConditions:
    """Optimise ``num_variants`` TPSO variants of each prompt (arXiv 2511.19811, Alg. 1).

    Defaults are the paper's for SD 1.5 / 2.1 (kappa 0.80 +- 0.01, lambda 1, RMSprop lr
    0.01, at most 50 steps, offsets ``N(0, 1e-8)``), with the public code's per-variant
    freezing (:func:`~jaxdiv.guidance.tpso.optimize_offsets`).

    On an SD3 / SD3.5 pipeline (:func:`jaxdiv.pipelines.stable_diffusion_3.load`) this
    runs :func:`jaxdiv.pipelines.tpso_sd3.tpso_conditions`: one optimisation per CLIP
    encoder, T5 unchanged, conditions as :class:`~jaxdiv.pipelines.stable_diffusion_3.SD3Cond`,
    defaults from the public SD3.5 config (lambda 10, at most 200 steps); ``projection``
    is then ``None`` (each encoder's own) or a ``(CLIP-L, CLIP-G)`` pair.

    Args:
        pipe: a loaded pipeline (:func:`jaxdiv.pipelines.stable_diffusion.load`).
        prompts: one prompt or a list; the result has ``len(prompts) * num_variants`` rows.
        num_variants: variants per prompt (the images per prompt).
        key: PRNG key (initial offsets; the draw from ``null_pool``).
        projection: ``None`` (the encoder's own ``text_projection``), a CLIP folder or a
            ``(D, P)`` kernel, or ``False`` (the pooled output); see the module docstring.
        null_pool: :func:`tpso_null_pool`'s result: each image's negative branch gets one
            of its rows, drawn without replacement, as in the public code. ``None`` keeps
            the plain null embedding for that branch.
        count: trainable positions: ``None`` = the content tokens (between BOS and EOS);
            ``"words"`` = the first ``len(prompt.split())`` positions, what the public
            SD 1.5 / 2.1 adapter does; an int = the first ``count`` positions.
        kappa, tolerance, diversity_weight, learning_rate, max_steps, init_std, optimizer:
            see :func:`~jaxdiv.guidance.tpso.optimize_offsets`.

    Returns:
        :class:`TPSOConditions`. Variants that end outside the band are used as they are
        (as in the public code) and named in a ``RuntimeWarning``.

    Example:
        >>> import jax
        >>> from jaxdiv.testing import example_pipeline
        >>> c = tpso_conditions(example_pipeline(), ["a cat"], 3, jax.random.key(0),
        ...                     projection=False, max_steps=5)
        >>> c.cond.shape, c.optimized.shape, c.null_optimized is None
        ((3, 16, 32), (3, 16, 32), True)
    """
    validation.prng_key("key", key)
    if is_sd3(pipe):
        from jaxdiv.pipelines import tpso_sd3

        out = tpso_sd3.tpso_conditions(
            pipe, prompts, num_variants, key, projection=projection, null_pool=null_pool,
            count=count, kappa=kappa, tolerance=tolerance, diversity_weight=diversity_weight,
            learning_rate=learning_rate, max_steps=max_steps, init_std=init_std,
            optimizer=optimizer,
        )  # fmt: skip
    else:
        out = _tpso_conditions(pipe, prompts, num_variants, key, projection, null_pool, count,
                               kappa, tolerance, diversity_weight, learning_rate, max_steps,
                               init_std, optimizer)  # fmt: skip
    _warn_outside_band(out.result)
    return out


def _warn_outside_band(result) -> None:
    """Warn when variants end outside the cosine band: the public algorithm returns them
    as they are, and at a large diversity weight (SD3.5's lambda 10) most do."""
    parts = result._asdict().items() if hasattr(result, "clip_l") else [("", result)]
    found = []
    for name, r in parts:
        if not validation.is_concrete(r.converged):
            return
        inside, cos = np.asarray(r.converged), np.asarray(r.cosine)
        if not inside.all():
            found.append(f"{name + ': ' if name else ''}{int((~inside).sum())} of {inside.size} "
                         f"(cosines {cos.min():.2f} to {cos.max():.2f})")
    if found:
        warnings.warn(
            f"tpso_conditions: variants outside the cosine band after "
            f"{int(np.max([np.asarray(r.steps) for _, r in parts]))} steps: "
            f"{'; '.join(found)}. They are used as they are (the public code does the same); "
            "a smaller diversity_weight or more max_steps brings them in "
            "(result.converged, result.cosine)",
            RuntimeWarning, stacklevel=user_stacklevel())  # fmt: skip


def _tpso_conditions(pipe, prompts, num_variants, key, projection, null_pool, count, kappa,
                     tolerance, diversity_weight, learning_rate, max_steps, init_std,
                     optimizer) -> TPSOConditions:  # fmt: skip
    """:func:`tpso_conditions` on an SD 1.x / 2.x pipeline."""
    diversity_weight = 1.0 if diversity_weight is None else diversity_weight
    max_steps = 50 if max_steps is None else max_steps
    prompts, num_variants, rows, count = variant_rows(prompts, num_variants, count)
    tokens = pipe.tokenize(rows)
    mask = trainable_mask(tokens, pipe.tokenizer.eos_token_id, count=count)
    encode, embeds = _encoder(pipe, tokens, projection)
    k_opt, k_null = jax.random.split(key)
    result = optimize_offsets(
        encode, embeds, mask, num_variants, k_opt, max_steps=max_steps,
        **_settings(kappa, tolerance, diversity_weight, learning_rate, init_std, optimizer),
    )  # fmt: skip
    null_result = None
    if null_pool is not None:
        if not isinstance(null_pool, TPSOResult):
            raise TypeError(f"null_pool must be a TPSOResult from tpso_null_pool(), got "
                            f"{type(null_pool).__name__}")  # fmt: skip
        total = null_pool.hidden.shape[0]
        if len(rows) > total:
            raise ValueError(f"null_pool holds {total} embeddings, fewer than the {len(rows)} "
                             "images: build a larger pool (tpso_null_pool(size=...))")  # fmt: skip
        if null_pool.hidden.shape[1:] != result.hidden.shape[1:]:
            raise ValueError(f"null_pool states {null_pool.hidden.shape[1:]} do not match this "
                             f"pipeline's {result.hidden.shape[1:]}")  # fmt: skip
        pick = jax.random.permutation(k_null, total)[: len(rows)]
        null_result = jax.tree.map(lambda a: a[pick] if jnp.ndim(a) else a, null_pool)
    return TPSOConditions(
        cond=result.original_hidden,
        optimized=result.hidden,
        null_cond=pipe.null_cond,
        null_optimized=None if null_result is None else null_result.hidden,
        result=result,
        null_result=null_result,
    )


def tpso_guidance(conditions: TPSOConditions, scale, ratio=0.4, *, rescale=None,
                  prediction_type: str | None = None) -> guidance.Chain:
    """TPSO with CFG: the conditional branch and (with a null pool) the negative branch
    follow ``alpha_t``'s schedule (:func:`~jaxdiv.guidance.tpso`,
    :func:`~jaxdiv.guidance.tpso_null`); named ``"tpso"`` and ``"cfg"`` in the trace.
    ``scale`` is required: compare with a baseline at the same CFG (``pipe.default_cfg()``
    is 7.5 on SD 1.x/2.x, 7.0 on SD3).
    ``rescale`` and ``prediction_type`` add the CFG rescale of Lin et al. (2024) to the CFG
    (see :func:`~jaxdiv.guidance.cfg`; a pipeline's space is
    ``pipe.denoiser.prediction_type``).

    Example:
        >>> import jax, jaxdiv
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline()
        >>> c = tpso_conditions(pipe, ["a cat"], 2, jax.random.key(0), projection=False,
        ...                     max_steps=5)
        >>> noise = jax.random.normal(jax.random.key(1), pipe.noise_shape(2))
        >>> out = jaxdiv.sample(pipe.ddim(5), pipe.denoiser, noise, key=jax.random.key(2),
        ...                     cond=c.cond, guidance=tpso_guidance(c, 7.5), trace=True)
        >>> [round(float(a), 2) for a in out.trace.info["tpso"].alpha]
        [1.0, 0.0, 0.0, 0.0, 0.0]
    """
    if not isinstance(conditions, TPSOConditions):
        raise TypeError(f"conditions must be a TPSOConditions from tpso_conditions(), got "
                        f"{type(conditions).__name__}")  # fmt: skip
    rescale = check_rescale(rescale, prediction_type, "tpso_guidance")
    c = conditions
    null = c.null_cond
    if c.null_optimized is not None:
        null = guidance.tpso_null(c.null_optimized, c.null_cond, ratio)
    return guidance.chain(tpso=guidance.tpso(c.optimized, ratio, original=c.cond),
                          cfg=guidance.cfg(scale, null_cond=null, rescale=rescale,
                                           prediction_type=prediction_type))  # fmt: skip
