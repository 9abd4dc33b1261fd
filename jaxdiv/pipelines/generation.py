"""One call from prompts to images with any diversity method, composed with CFG.

:func:`generate` is what ``pipe.generate(...)`` runs: tokenise and encode the prompts
(``n`` rows per prompt, adjacent), draw the noise, sample with ``method`` chained with CFG,
decode. ``method`` is any guidance term or chain; the SD-specific pieces a method needs
live here too (:func:`gass_encoder`: ``x0_hat`` latents -> VAE decode -> CLIP image
features, differentiable end to end).

==========  ======================================================================
method      on SD latents (paper defaults)
==========  ======================================================================
SPELL       ``guidance.spell(r, intra_batch=True, overcompensation=1.6)``; ``r`` from
            :func:`jaxdiv.recipes.radius_from_unguided`; a reference set of latents;
            :func:`jaxdiv.recipes.spell_batched` for N images in batches
PG          ``guidance.particle(s)`` (the paper's form: potential on ``x_t``, force on
            the score)
CADS        ``guidance.cads(...)``: noise on the text embeddings (conditional branch)
interval    ``guidance.interval(w, lo, hi)``: replaces CFG (it is windowed CFG)
GASS        ``guidance.gass(gass_encoder(pipe), text_emb, ...)``, Adam on latent
            ``x0_hat`` through the decoder; or the paper's pixel write-back,
            ``guidance.gass(pipe.encode_image, text_emb, write_space=
            gass_pixel_space(pipe))``
TPSO        :func:`jaxdiv.pipelines.tpso.tpso_guidance` (brings its own CFG)
==========  ======================================================================
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import guidance as _guidance
from jaxdiv import validation
from jaxdiv.guidance.cfg import zero_null
from jaxdiv.pipelines.stacklevel import user_stacklevel
from jaxdiv.sampling import SampleOutput, sample

__all__ = ["GASSSetup", "Generated", "cfg_term", "check_keywords", "clip_text_embeddings",
           "gass_encoder",
           "gass_pixel_space", "gass_setup", "generate", "image_noise", "is_sd3",
           "null_condition", "rescale_options", "sampling_key", "to_uint8", "truncated_prompts"]


class Generated(NamedTuple):
    """What :func:`generate` returns.

    Attributes:
        images: (B, 3, H, W) decoded images in float32, nominally in ``[-1, 1]`` (the VAE
            does not clamp; :func:`to_uint8` gives 8-bit pixels); ``None`` with
            ``decode=False``.
        latents: (B, C, h, w) final latents.
        output: the :class:`~jaxdiv.sampling.SampleOutput` (trace when asked for).
        prompts: the prompt of each row (``n`` adjacent rows per prompt).
    """

    images: jax.Array
    latents: jax.Array
    output: SampleOutput
    prompts: tuple


def _embed_images(decode, encode_image, latents):
    return encode_image(decode(latents))


def gass_encoder(pipe) -> Partial:
    """``encoder(x0_hat) -> (B, P)`` CLIP image features of decoded latents, for
    :func:`jaxdiv.guidance.gass` (GASS normalises them): differentiable through the VAE
    decoder, CLIP's resize / normalise and the vision tower (Zhu et al. 2026, Sec. 4 with
    the write-back on latents instead of pixels: no VAE round trip).

    Example:
        >>> from jaxdiv.testing import example_pipeline
        >>> import jax.numpy as jnp
        >>> pipe = example_pipeline(image_encoder=True)
        >>> gass_encoder(pipe)(jnp.zeros(pipe.noise_shape(2))).shape
        (2, 16)
    """
    if pipe.encode_image is None:
        raise ValueError("GASS needs an image encoder: load the pipeline with "
                         "image_encoder=<CLIP vision folder>")  # fmt: skip
    return Partial(_embed_images, pipe.decode, pipe.encode_image)


def gass_pixel_space(pipe) -> tuple:
    """``(pipe.decode, pipe.encode)``: GASS's ``write_space`` for the paper's write-back
    (Adam on decoded pixels, then VAE re-encoding; the encoder is then
    ``pipe.encode_image``). The re-encoding takes the posterior mean; the public code
    samples the posterior (``latent_dist.sample()``), which adds VAE noise at every active
    step.

    Example (``guidance.gass(pipe.encode_image, text_emb, write_space=...)``):
        >>> import jax.numpy as jnp
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline(image_encoder=True)
        >>> to_pixels, to_latents = gass_pixel_space(pipe)
        >>> to_latents(to_pixels(jnp.zeros(pipe.noise_shape(1)))).shape
        (1, 4, 8, 8)
    """
    if pipe.encode_image is None or pipe.encode is None:
        raise ValueError("GASS in pixel space needs the VAE encoder and an image encoder: "
                         "load the pipeline with image_encoder=<CLIP vision folder>")  # fmt: skip
    return (pipe.decode, pipe.encode)


class GASSSetup(NamedTuple):
    """A GASS run as a paper or public code made it: pass ``method``, ``sampler``,
    ``cfg`` and ``negative_prompt`` (and ``height`` / ``width`` where set) to
    :func:`generate`.

    Attributes:
        method: the :func:`jaxdiv.guidance.gass` term.
        sampler: the sampler of the setup.
        cfg: its CFG scale.
        height, width: its image size in pixels, or ``None`` (the pipeline's default).
        notes: where the setup departs from its source, in words.
        negative_prompt: the negative prompt of CFG's unconditional branch (``""``: the
            empty prompt).
    """

    method: Any
    sampler: Any
    cfg: float
    height: int | None
    width: int | None
    notes: str
    negative_prompt: str = ""


#: ``sd3_gass_sampling.py`` line 375: the public GASS code's fixed negative prompt
GASS_PUBLIC_NEGATIVE_PROMPT = "blurry, low quality, bad anatomy, deformed, extra limbs"


GASS_SETUPS = ("paper", "public_code")


def clip_text_embeddings(pipe, prompts: str | Sequence[str], projection=None) -> jax.Array:
    """``(len(prompts), P)`` CLIP text embeddings in the space of ``pipe``'s image encoder:
    GASS's ``e_t`` (:func:`jaxdiv.guidance.gass`, :func:`gass_setup`) and the text side of
    CLIP score and SPP, ``e_t = pooled(prompt) @ W_proj`` (CLIP's text projection of the
    EOS token's state).

    SD 1.x/2.x: the text encoder's pooled output through ``projection``, a ``(D, P)``
    kernel (default: the text encoder's own ``pipe.text_projection``; another CLIP's with
    :func:`jaxdiv.pipelines.tpso.load_text_projection`, e.g. SD 2.x's OpenCLIP text tower
    paired with its image encoder). SD3: CLIP-L's own projected pooled output (no
    ``projection``). The width is checked against the image encoder's features.

    Example:
        >>> import jax
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline(image_encoder=True)  # a text tower without projection
        >>> kernel = jax.random.normal(jax.random.key(0), (pipe.token_embedding.shape[1], 16))
        >>> clip_text_embeddings(pipe, ["a cat", "a dog"], kernel).shape
        (2, 16)
    """
    if pipe.encode_image is None:
        raise ValueError("pipe has no image encoder: load the pipeline with its "
                         "image_encoder folder (the embeddings live in its space)")  # fmt: skip
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if is_sd3(pipe):
        if projection is not None:
            raise ValueError("projection: an SD3 folder's CLIP-L text encoder has its own "
                             "projection; pass none (pair it with the image encoder of the "
                             "same CLIP, ViT-L/14)")  # fmt: skip
        width = pipe.configs["text_encoder"]["projection_dim"]
        emb = pipe.encode_prompt(pipe.tokenize(prompts)).pooled[:, :width]
        source = "this SD3 folder's CLIP-L text encoder (its own projection)"
    else:
        kernel = pipe.text_projection if projection is None else jnp.asarray(projection)
        if kernel is None:
            raise ValueError("the text encoder has no text_projection: pass projection="
                             "tpso.load_text_projection(<CLIP text model folder>)")  # fmt: skip
        width = pipe.token_embedding.shape[1]
        if kernel.ndim != 2 or kernel.shape[0] != width:
            raise ValueError(f"projection must be a (D, P) kernel with D = {width}, the text "
                             f"encoder's hidden size, got shape {tuple(kernel.shape)}")  # fmt: skip
        _, pooled = pipe.text_features(pipe.tokenize(prompts), None)
        emb = pooled @ kernel.astype(pooled.dtype)
        source = "projection" if projection is not None else "the text encoder's projection"
    probe = jax.ShapeDtypeStruct(pipe.noise_shape(1), jnp.float32)
    dim = jax.eval_shape(gass_encoder(pipe), probe).shape[-1]
    if emb.shape[-1] != dim:
        raise ValueError(f"{source}: text embeddings of width {emb.shape[-1]} but the image "
                         f"encoder's features have width {dim} (use the text projection of "
                         "the same CLIP model as the image encoder)")  # fmt: skip
    return emb


def gass_setup(pipe, text_emb, setup: str = "paper", *, batch: int = 10, r=0.02,
               num_directions: int = 10) -> GASSSetup:
    """GASS on ``pipe`` with the settings of the paper or of its public code.

    * ``"paper"`` (Zhu et al. 2026, Sec. 4-5): active on 20 uniformly spread steps of the
      pipeline's default sampler (SD: DDIM 50, CFG 7.5; SD3: flow Euler 28, CFG 7.0), Adam
      lr ``1e-4`` for at most 60 iterations (patience 4, tolerance ``5e-4``) on the latent
      ``x0_hat`` through the VAE decoder and the CLIP image tower (:func:`gass_encoder`),
      ``r_dep = r_ind = r``.
    * ``"public_code"`` (``L-YeZhu/GASS_T2I``, ``sd3_gass_sampling.py``; SD3 only): flow
      Euler 28 steps, CFG 7.0 with its fixed negative prompt (line 375, in
      ``negative_prompt``), 512x512, active at step indices 1-10 (line 283:
      ``t_idx > 0 and t_idx <= 10``), Adam on decoded **pixels** with lr ``8e-3`` on
      ``[0, 1]`` images -- ``1.6e-2`` here, where pixels are in ``[-1, 1]`` -- for at most
      60 iterations, patience 4, tolerance ``5e-5`` on its loss ``-mean_i cos`` (lines
      156-214; ``batch * 5e-5`` on this library's ``sum_i (1 - cos)``), then VAE
      re-encoding (:func:`gass_pixel_space`). Its image tower is CLIP ViT-B/32: load the
      pipeline with that ``image_encoder`` to match it.

    The public code's departures that are *not* reproduced are listed in ``notes``: its
    perturbation weights default to 0 (its targets equal the current embeddings; here
    ``r``), its ``x0_hat`` on the flow is a VP formula (here ``x_t - t v``), it clamps
    pixels to ``[0, 1]`` after each Adam step and samples the VAE posterior when
    re-encoding (here the posterior mean).

    Args:
        pipe: a loaded pipeline with an image encoder (``load(..., image_encoder=...)``).
        text_emb: ``(P,)`` the prompt's CLIP text embedding in the image tower's space
            (:func:`clip_text_embeddings`).
        setup: ``"paper"`` or ``"public_code"``.
        batch: images per batch (the public code's 10); scales the public tolerance.
        r: ``r_dep = r_ind`` (the paper's 0.02).
        num_directions: candidates of the ``u_ind`` search (the paper's 10; at most the
            embedding width minus one).

    Example:
        >>> import jax.numpy as jnp
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline(image_encoder=True)
        >>> s = gass_setup(pipe, jnp.ones(16) / 4.0, "paper")
        >>> s.sampler.num_steps, s.cfg, (s.height, s.width)
        (50, 7.5, (None, None))
    """
    if setup not in GASS_SETUPS:
        raise ValueError(f"setup must be one of {GASS_SETUPS}, got {setup!r}")
    batch = validation.integer("batch", batch, minimum=1)
    if setup == "paper":
        # num_active: the paper's 20 as gass's own default (every step on a shorter sampler)
        term = _guidance.gass(gass_encoder(pipe), text_emb, r_dep=r, r_ind=r, lr=1e-4,
                              max_iters=60, patience=4, tol=5e-4, steps="uniform",
                              num_directions=num_directions)  # fmt: skip
        notes = "latent write-back through the VAE decoder (no VAE round trip)"
        return GASSSetup(term, pipe.default_sampler(), pipe.default_cfg(), None, None, notes)
    if not is_sd3(pipe):
        raise ValueError("the public GASS code is SD3-only (its SD2.1 code was withdrawn): "
                         "use setup='paper' on this pipeline")  # fmt: skip
    write_space = gass_pixel_space(pipe)  # refuses a pipeline without an image encoder
    term = _guidance.gass(pipe.encode_image, text_emb, r_dep=r, r_ind=r, lr=2 * 8e-3,
                          max_iters=60, patience=4, tol=batch * 5e-5, steps=list(range(1, 11)),
                          num_directions=num_directions, write_space=write_space)  # fmt: skip
    notes = ("perturbation radius r (the public code's default weights are 0: no spread); "
             "x0_hat = x_t - t v (the public code's VP formula is wrong on flows); no clamp "
             "to [0, 1] after each Adam step; VAE posterior mean, not a sample; the "
             "pipeline's own dtype (the public code runs fp16: load with dtype=jnp.float16 "
             "to match)")  # fmt: skip
    return GASSSetup(term, pipe.flow_euler(28), 7.0, 512, 512, notes,
                     GASS_PUBLIC_NEGATIVE_PROMPT)  # fmt: skip


def null_condition(pipe, negative_prompt: str = ""):
    """CFG's unconditional condition: ``pipe.null_cond`` (the empty prompt's), or
    ``negative_prompt``'s, encoded as diffusers encodes negative prompts (one row, for
    every image; without ``clip_skip``).

    >>> from jaxdiv.testing import example_pipeline
    >>> pipe = example_pipeline()
    >>> null_condition(pipe) is pipe.null_cond, null_condition(pipe, "a dog").shape
    (True, (1, 16, 32))
    """
    if not negative_prompt:
        return pipe.null_cond
    return pipe.encode_prompt(pipe.tokenize([negative_prompt]), clip_skip=None)


def is_sd3(pipe) -> bool:
    """Whether ``pipe`` is an SD3 / SD3.5 record (:func:`~jaxdiv.pipelines.stable_diffusion_3.
    load`: per-CLIP feature functions) rather than an SD 1.x/2.x one.

    Example:
        >>> from jaxdiv.testing import example_pipeline
        >>> is_sd3(example_pipeline())
        False
    """
    return getattr(pipe, "clip_features", None) is not None


def truncated_prompts(pipe, prompts: str | Sequence[str]) -> list[tuple[int, str, int, int]]:
    """The prompts a text encoder cuts: ``(index, encoder, tokens, kept)`` for each prompt
    whose token count (BOS and EOS included) exceeds an encoder's length (CLIP's 77; SD3's
    T5 ``max_sequence_length``). Tokenization truncates them, as diffusers does (which logs
    a warning): the words past ``kept`` never reach the model.

    Example:
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline()              # a tiny CLIP: 16 tokens
        >>> truncated_prompts(pipe, ["a cat", "a cat and " * 10])
        [(1, 'text_encoder', 52, 16)]
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if is_sd3(pipe):  # CLIP-L, CLIP-G, T5 or None
        clip_l, clip_g, t5 = pipe.tokenizers
        encoders = [("text_encoder", clip_l, pipe.max_length),
                    ("text_encoder_2", clip_g, pipe.max_length)]  # fmt: skip
        if t5 is not None:
            encoders.append(("text_encoder_3", t5, pipe.max_sequence_length))
    else:
        encoders = [("text_encoder", pipe.tokenizer, pipe.max_length)]
    cut = []
    for name, tokenizer, kept in encoders:
        ids = tokenizer(prompts, truncation=False, verbose=False).input_ids
        cut += [(j, name, len(row), int(kept)) for j, row in enumerate(ids) if len(row) > kept]
    return sorted(cut)


def generate(
    pipe,
    prompts: str | Sequence[str],
    n: int = 1,
    *,
    key,
    method: Any = None,
    sampler=None,
    cfg="default",
    negative_prompt: str | None = None,
    noise=None,
    height: int | None = None,
    width: int | None = None,
    trace: bool = False,
    guidance_rescale=None,
    cond=None,
    null_cond=None,
    decode: bool = True,
) -> Generated:
    """Images for each prompt (``n`` per prompt) with ``method`` composed with CFG.

    ``method`` is ``None`` or any guidance term or chain. Unless it already combines the
    model's outputs itself (a ``"denoiser"`` term such as ``interval`` or TPSO's chain),
    it is chained with ``guidance.cfg(cfg, null_cond=pipe.null_cond)`` -- condition terms
    first, then CFG, then ``x0`` terms (:func:`jaxdiv.guidance.chain`). ``cfg=None`` (or
    1) runs the conditional model alone. A method that brings its own combination brings its own
    scale and null: ``guidance.interval(w, lo, hi, null_cond=pipe.null_cond)``; a ``cfg=``
    value beside it would never take effect and is refused, and one built without
    ``null_cond`` is refused (its null would be a zero embedding, as on the toys, not the
    empty prompt's). ``negative_prompt`` replaces the empty prompt in CFG's unconditional
    branch, encoded as diffusers encodes negative prompts (one for every image).

    All rows are sampled in one program. A method that couples the batch
    (:func:`jaxdiv.guidance.couples_batch`: SPELL's intra-batch shields, PG, GASS,
    contextual repulsion) acts among each prompt's ``n`` images only, as the papers couple
    them: the prompts run as groups (``jaxdiv.sample(..., groups=len(prompts))``), each as
    ``generate`` with that prompt alone would run it, and the trace and state gain a
    leading prompt axis. A term holding its prompts' data
    (:func:`jaxdiv.guidance.prompt_bound`: GASS's text embedding, TPSO's variants) cannot
    be split that way and is then refused: build it for each prompt and pass
    ``method=guidance.per_group([...])``, one entry per prompt in order (also for
    per-prompt settings, such as SPELL radii), which runs the prompts as groups too.
    Otherwise per-sample methods (CFG, CADS, interval, TPSO) run all rows as one batch.
    A method that acts only between the images of a batch
    (:func:`jaxdiv.guidance.needs_batch`: PG, contextual repulsion, SPELL without
    reference) is refused with ``n=1``, where it would never act.

    Args:
        pipe: a loaded pipeline (:func:`jaxdiv.pipelines.stable_diffusion.load` or
            :func:`jaxdiv.pipelines.stable_diffusion_3.load`).
        prompts: one prompt or a list.
        n: images per prompt.
        key: PRNG key: image ``i`` of every prompt starts from the noise of
            ``fold_in(key, i)`` (:func:`image_noise`: the same image whatever ``n``,
            and ``experiments.generate --seed S``'s for ``key=jax.random.key(S)``); the
            sampler's randomness comes from :func:`sampling_key`.
        method: the diversity method (see the module table), or
            ``guidance.per_group([...])`` with one entry per prompt.
        sampler: defaults to ``pipe.default_sampler()`` (SD 1.x/2.x: ``pipe.ddim(50)``;
            SD3: ``pipe.flow_euler(28)``).
        cfg: CFG scale (diffusers' convention), or ``None``; by default the pipeline's
            (``pipe.default_cfg()``: SD 7.5, SD3 7.0, diffusers' defaults). ``1`` runs the
            conditional model alone, as ``None`` (and diffusers) do; below 1 CFG
            interpolates towards the unconditional model (diffusers switches CFG off there).
        negative_prompt: the prompt of CFG's unconditional branch, one for every image
            (default: the empty prompt, ``pipe.null_cond``); refused where it cannot take
            effect (``cfg`` ``None`` or 1, or a method with its own combination and null).
        cond: the rows' text condition, already encoded (diffusers' ``prompt_embeds``):
            ``pipe.encode_prompt``'s output for ``len(prompts) * n`` rows (e.g. SD3's
            ``load_prompt_embeds`` without T5); ``prompts`` still name and group the rows.
        null_cond: CFG's unconditional condition, already encoded (diffusers'
            ``negative_prompt_embeds``): one row, as ``pipe.null_cond``; not with
            ``negative_prompt``.
        noise: initial latents ``pipe.noise_shape(len(prompts) * n, height, width)``.
        height, width: image size (defaults to the model's; with ``noise``, they must
            agree with its shape).
        trace: keep the per-step trace.
        decode: decode the final latents (``False``: ``images`` is ``None``, no VAE call;
            diffusers' ``output_type="latent"``).
        guidance_rescale: ``phi`` of the CFG rescale (Lin et al. 2024; diffusers'
            ``guidance_rescale``, 0.7 suggested), applied in the network's prediction
            space (``pipe.denoiser.prediction_type``): ``guidance.cfg(cfg, rescale=phi,
            prediction_type=...)``. Refused where it cannot act (``cfg`` ``None`` or 1, a
            method with its own combination: give that term the rescale,
            ``**rescale_options(pipe, phi)``). diffusers' SD3 pipeline has no such
            setting; here it rescales SD3's velocities the same way.

    Returns:
        :class:`Generated`. Final latents or decoded images holding NaN / inf give a
        ``RuntimeWarning`` at the caller's line naming the rows and the method's terms (the
        output is returned: ``trace=True`` shows the step that turned non-finite; finite
        latents decoding to non-finite images name the VAE decoder).

    ``generate`` runs eagerly (it checks its inputs' values and compiles its own program):
    under ``jax.jit`` / ``vmap`` use ``jaxdiv.sample(pipe.ddim(N), pipe.denoiser, noise,
    cond=pipe.encode_prompt(...), ...)`` and ``pipe.decode``.

    Example:
        >>> import jax
        >>> from jaxdiv import guidance
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline()
        >>> g = pipe.generate(["a cat", "a dog"], 2, key=jax.random.key(0),
        ...                   sampler=pipe.ddim(4), method=guidance.cads())
        >>> g.images.shape, g.prompts
        ((4, 3, 16, 16), ('a cat', 'a cat', 'a dog', 'a dog'))
        >>> pg = [pipe.generate(p, 3, key=jax.random.key(0), sampler=pipe.ddim(4),
        ...                     method=guidance.particle(1.0)) for p in ("a cat", "a dog")]
        >>> pg[0].images.shape  # each prompt's three images repel each other only
        (3, 3, 16, 16)
    """
    traced = [name for name, v in (("key", key), ("noise", noise), ("cfg", cfg),
                                    ("guidance_rescale", guidance_rescale))
              if any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(v))]
    if traced:
        raise TypeError(
            f"generate runs eagerly, but {', '.join(traced)} is traced (inside jax.jit / vmap "
            "/ grad): there, call jaxdiv.sample(pipe.ddim(N), pipe.denoiser, noise, key=..., "
            "cond=pipe.encode_prompt(pipe.tokenize(prompts)), guidance=...) and pipe.decode"
        )
    if isinstance(prompts, str):
        prompts = [prompts]
    elif isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Iterable):
        raise TypeError(f"prompts must be a string or a list of strings, got "
                        f"{type(prompts).__name__}")  # fmt: skip
    prompts = list(prompts)
    validation.prng_key("key", key)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    decode = validation.boolean("decode", decode)
    n = validation.integer("n", n, minimum=1)
    per_prompt = isinstance(method, _guidance.PerGroup)
    if per_prompt and method.size != len(prompts):
        raise ValueError(f"method is per_group with {method.size} entries but there are "
                         f"{len(prompts)} prompts: give one entry per prompt, "
                         "in order")  # fmt: skip
    every = [c.terms for c in method.chains] if per_prompt else [
        () if method is None else _guidance.as_terms(method)]  # fmt: skip
    terms = every[0]  # the groups' terms share one structure, hence these flags
    # the papers couple the images of one prompt: one group per prompt
    coupled = [t.name for t in terms if _guidance.couples_batch(t)]
    groups = len(prompts) if coupled or per_prompt else 1
    bound = [t.name for t in terms if _guidance.prompt_bound(t)]
    if bound and groups > 1 and not per_prompt:
        raise ValueError(
            f"method: its {bound} term(s) hold data of the prompts they were built for "
            "(GASS: one prompt's text embedding; TPSO: variants of every row), so they "
            f"cannot serve one group per prompt, as its {coupled} term(s) need with "
            f"{len(prompts)} prompts; build them for each prompt and pass "
            "method=guidance.per_group([...]) with one entry per prompt"
        )
    idle = [t.name for t in terms if _guidance.needs_batch(t)]
    if idle and n == 1:
        raise ValueError(
            f"method: its {idle} term(s) act only between the images of a batch, and n=1 "
            "gives a batch of one image: they would never act; ask for n >= 2 (PG's median "
            "bandwidth: n >= 3)"
        )
    own = [t.name for t in terms if t.hook == "denoiser"]  # the method's own combination
    for term in (t for group in every for t in group):
        if zero_null(term):
            raise ValueError(
                f"method: its {term.name!r} term was built without null_cond, so its "
                "unconditional branch would be a zero embedding, not the empty prompt's; pass "
                "null_cond=pipe.null_cond (e.g. guidance.interval(w, lo, hi, "
                "null_cond=pipe.null_cond))"
            )
    if isinstance(cfg, str) and cfg == "default":
        cfg = pipe.default_cfg()
    elif cfg is not None and own:
        raise ValueError(
            f"cfg={cfg!r} would never take effect: method's {own} term(s) combine the model's "
            "outputs with their own scale; leave cfg= out (or pass cfg=None)"
        )
    # scale 1 is the conditional model: run alone, as diffusers does, not CFG's doubled
    # batch (the same x0_hat up to rounding, at half the cost)
    no_cfg = cfg is None or (validation.is_concrete(cfg) and np.size(cfg) == 1
                             and np.issubdtype(np.asarray(cfg).dtype, np.number)
                             and float(np.asarray(cfg)) == 1)  # else guidance.cfg reports it
    if guidance_rescale is not None:
        if own:
            raise ValueError(
                f"guidance_rescale would never take effect: method's {own} term(s) combine "
                "the model's outputs with their own scale; give the rescale to that term "
                "(rescale=phi, prediction_type=pipe.denoiser.prediction_type, as "
                "guidance.cfg, guidance.interval and tpso_guidance take)"
            )
        if no_cfg:
            raise ValueError(
                f"guidance_rescale has no effect with cfg={cfg} (the guided prediction is "
                "the conditional one, already at its own scale)"
            )
    null = pipe.null_cond
    if negative_prompt is not None and null_cond is not None:
        raise ValueError("pass negative_prompt or null_cond (its encoding), not both")
    if null_cond is not None:
        if own:
            raise ValueError("null_cond would never take effect: method combines the model's "
                             "outputs with its own null_cond; build it with that one")  # fmt: skip
        if no_cfg:
            raise ValueError(f"null_cond has no effect with cfg={cfg} (no unconditional "
                             "branch)")  # fmt: skip
        null = _encoded("null_cond", null_cond, pipe, 1)
    if negative_prompt is not None:
        if not isinstance(negative_prompt, str):
            raise TypeError(f"negative_prompt must be one string, for every image (per-prompt "
                            f"negatives: one generate call per prompt), got "
                            f"{type(negative_prompt).__name__}")  # fmt: skip
        if own:
            raise ValueError("negative_prompt would never take effect: method combines the "
                             "model's outputs with its own null_cond; build it with "
                             "null_cond=pipe.encode_prompt(pipe.tokenize([negative]))")  # fmt: skip
        if no_cfg:
            raise ValueError(f"negative_prompt has no effect with cfg={cfg} (no "
                             "unconditional branch)")  # fmt: skip
        null = null_condition(pipe, negative_prompt)
    rows = tuple(p for p in prompts for _ in range(n))
    if cond is None:
        cond = pipe.encode_prompt(pipe.tokenize(list(rows)))
    else:
        cond = _encoded("cond", cond, pipe, len(rows))
    if noise is None:
        noise = image_noise(key, n, pipe.noise_shape(1, height, width)[1:],
                            jax.tree.leaves(cond)[0].dtype)  # fmt: skip
        noise = jnp.tile(noise, (len(prompts),) + (1,) * (noise.ndim - 1))
    else:
        noise = validation.finite_array("noise", noise)
        if noise.shape[0] != len(rows):
            raise ValueError(f"noise must have {len(rows)} rows (prompts x n), got shape "
                             f"{tuple(noise.shape)}")  # fmt: skip
        if height is not None or width is not None:  # the noise sets the size: both must agree
            want = pipe.noise_shape(len(rows), height, width)
            if tuple(noise.shape) != want:
                raise ValueError(f"noise has shape {tuple(noise.shape)} but height={height}, "
                                 f"width={width} give latents {want}; pass one or the "
                                 "other")  # fmt: skip
        elif noise.ndim != 4 or noise.shape[1] != pipe.latent_channels:
            raise ValueError(f"noise must be latents (batch, {pipe.latent_channels}, h, w), got "
                             f"shape {tuple(noise.shape)}")  # fmt: skip
        else:  # its latent size must be an image size the model takes
            f = pipe.vae_scale_factor
            try:
                pipe.noise_shape(1, int(noise.shape[2]) * f, int(noise.shape[3]) * f)
            except ValueError as err:
                raise ValueError(f"noise has latents of {noise.shape[2]} x {noise.shape[3]}, "
                                 f"images of {noise.shape[2] * f} x {noise.shape[3] * f} px: "
                                 f"{err}") from None  # fmt: skip
    guided = method
    if not no_cfg and not own:
        scale = cfg_term(pipe, cfg, null, guidance_rescale)
        guided = scale if method is None else _guidance.chain(method, scale)
    out = sample(pipe.default_sampler() if sampler is None else sampler, pipe.denoiser, noise,
                 key=sampling_key(key), cond=cond, guidance=guided, trace=trace,
                 groups=groups)  # fmt: skip
    _warn_non_finite(out.x0, terms)
    if not decode:
        return Generated(None, out.x0, out, rows)
    # float32 whatever the networks' dtype: a bfloat16 array is not an image for PIL
    images = pipe.decode(out.x0).astype(jnp.float32)
    _warn_non_finite(images, terms, out.x0)
    return Generated(images, out.x0, out, rows)


def _encoded(name: str, value, pipe, rows: int):
    """A condition the caller encoded: ``pipe.null_cond``'s structure, shapes and dtypes,
    with ``rows`` rows."""
    want = pipe.null_cond
    structure = jax.tree.structure(want)
    if jax.tree.structure(value) != structure:
        raise TypeError(f"{name} must have the structure of pipe.encode_prompt's output "
                        f"({structure}), got {jax.tree.structure(value)}")  # fmt: skip
    for (path, got), ref in zip(jax.tree_util.tree_flatten_with_path(value)[0],
                                jax.tree.leaves(want)):  # fmt: skip
        where = name + jax.tree_util.keystr(path)
        shape = (rows,) + tuple(ref.shape[1:])
        if tuple(np.shape(got)) != shape:
            raise ValueError(f"{where} must have shape {shape} ({rows} row"
                             f"{'s' * (rows != 1)}), got {tuple(np.shape(got))}")  # fmt: skip
        validation.finite_array(where, got)
    return jax.tree.map(lambda v, r: jnp.asarray(v, r.dtype), value, want)


def cfg_term(pipe, scale, null_cond=None, rescale=None):
    """``guidance.cfg(scale, null_cond)`` for ``pipe`` (``null_cond`` defaults to the empty
    prompt's, ``pipe.null_cond``), with the CFG rescale ``rescale`` (Lin et al. 2024, Sec.
    3.4) applied in the network's own prediction space, ``pipe.denoiser.prediction_type``.

    >>> from jaxdiv.testing import example_pipeline
    >>> pipe = example_pipeline()
    >>> cfg_term(pipe, 7.5).name, cfg_term(pipe, 7.5, rescale=0.7).name
    ('cfg', 'cfg')
    """
    null_cond = pipe.null_cond if null_cond is None else null_cond
    return _guidance.cfg(scale, null_cond=null_cond, **rescale_options(pipe, rescale))


def rescale_options(pipe, rescale=None) -> dict:
    """The keywords that give a CFG term (``guidance.cfg``, ``guidance.interval``,
    ``tpso_guidance``) the rescale ``phi = rescale`` of Lin et al. (2024, Sec. 3.4) in
    ``pipe``'s prediction space; none for ``rescale=None``.

    >>> from jaxdiv.testing import example_pipeline
    >>> pipe = example_pipeline()
    >>> rescale_options(pipe, 0.7), rescale_options(pipe)
    ({'rescale': 0.7, 'prediction_type': 'epsilon'}, {})
    """
    if rescale is None:
        return {}
    return dict(rescale=rescale, prediction_type=pipe.denoiser.prediction_type)


# diffusers' pipeline arguments that generate() names otherwise: what to write instead
DIFFUSERS_ARGUMENTS = {
    "prompt": "the prompts as the first argument: pipe.generate(prompts, n, key=...)",
    "guidance_scale": "cfg=<scale> (diffusers' convention: 1 switches CFG off)",
    "num_inference_steps": "sampler=pipe.<sampler>(N), e.g. pipe.ddim(50) (SD 1.x/2.x) or "
                           "pipe.flow_euler(28) (SD3)",
    "eta": "sampler=pipe.ddim(N, eta=...)",
    "generator": "key=jax.random.key(seed)",
    "num_images_per_prompt": "n=<images per prompt> (the second argument)",
    "latents": "noise=<initial latents>",
    "output_type": "decode=False for latents only (.images is then None); the result holds "
                   ".images (NCHW float32, nominally in [-1, 1]) and .latents",
    "prompt_embeds": "cond=<pipe.encode_prompt(...) of every row>",
    "negative_prompt_embeds": "null_cond=<pipe.encode_prompt(...) of one row>",
}


def check_keywords(kwargs: dict) -> None:
    """Refuse diffusers' pipeline argument names in ``pipe.generate(**kwargs)`` with the
    jaxdiv argument to use instead (:data:`DIFFUSERS_ARGUMENTS`); other names are left to
    :func:`generate`.

    >>> check_keywords({"cfg": 7.5})
    >>> check_keywords({"guidance_scale": 7.5})
    Traceback (most recent call last):
    ...
    TypeError: generate() takes no argument guidance_scale (diffusers' name): use cfg=<scale> (diffusers' convention: 1 switches CFG off)
    """  # noqa: E501
    for name in kwargs:
        if name in DIFFUSERS_ARGUMENTS:
            raise TypeError(f"generate() takes no argument {name} (diffusers' name): use "
                            f"{DIFFUSERS_ARGUMENTS[name]}")  # fmt: skip


def to_uint8(images) -> np.ndarray:
    """NCHW images nominally in ``[-1, 1]`` (:attr:`Generated.images`) -> ``uint8`` NHWC
    pixels, as diffusers' image postprocessor: ``round(255 clip(x / 2 + 0.5, 0, 1))``.

    >>> to_uint8(np.array([[[[-1.0, 0.0, 1.0, 2.0]]]])).ravel().tolist()
    [0, 128, 255, 255]
    """
    x = np.asarray(images, np.float32).transpose(0, 2, 3, 1)
    return (np.clip(x / 2 + 0.5, 0.0, 1.0) * 255).round().astype(np.uint8)


def image_noise(key, images, shape, dtype=None):
    """The initial noise of a prompt's images: image ``i`` draws
    ``normal(fold_in(key, i), shape)`` in float32 (cast to ``dtype``), so it does not
    depend on how many images are asked for, on the other prompts, or on the batch it runs
    in -- the convention of ``experiments.generate``, whose ``--seed S`` images are those
    of ``key=jax.random.key(S)``.

    Args:
        key: the run's PRNG key.
        images: ``n`` (images ``0 .. n - 1``) or an array of image indices.
        shape: one image's latent shape.
        dtype: the result's dtype (the draw is float32).

    >>> import jax
    >>> k = jax.random.key(0)
    >>> a, b = image_noise(k, 2, (4, 8, 8)), image_noise(k, jax.numpy.arange(1, 5), (4, 8, 8))
    >>> bool((a[1] == b[0]).all()), a.shape
    (True, (2, 4, 8, 8))
    """
    idx = jnp.arange(int(images)) if np.ndim(images) == 0 else jnp.asarray(images)
    draw = lambda i: jax.random.normal(jax.random.fold_in(key, i), tuple(shape))  # noqa: E731
    out = jax.vmap(draw)(idx)
    return out if dtype is None else out.astype(dtype)


def sampling_key(key, prompt_index: int = 0, batch_index: int = 0):
    """The sampler's key for one batch of one prompt: ``fold_in(fold_in(key, 1_000_003 +
    prompt), batch)``, disjoint from :func:`image_noise`'s keys for fewer than a million
    images per prompt (``experiments.generate``'s convention; :func:`generate` samples
    all its rows in one batch with ``sampling_key(key)``).

    >>> import jax
    >>> k = jax.random.key(0)
    >>> bool((jax.random.key_data(sampling_key(k)) == jax.random.key_data(
    ...     jax.random.fold_in(jax.random.fold_in(k, 1_000_003), 0))).all())
    True
    """
    return jax.random.fold_in(jax.random.fold_in(key, 1_000_003 + prompt_index), batch_index)


def _warn_non_finite(values, terms, latents=None) -> None:
    """Warn (not raise: the caller keeps the trace to find the step) when the final
    latents, or the images decoded from finite ``latents``, hold NaN / inf."""
    def finite(a):
        return np.isfinite(np.asarray(a)).reshape(a.shape[0], -1).all(1)

    bad = np.flatnonzero(~finite(values))
    if latents is not None:
        bad = bad[finite(latents)[bad]]  # the others were named for their latents already
    if not bad.size:
        return
    rows = f"rows {bad[:8].tolist()}{' ...' if bad.size > 8 else ''}"
    if latents is None:
        names = [t.name for t in terms]
        message = (
            f"generate: the final latents of {bad.size} of {values.shape[0]} images hold "
            f"NaN or inf ({rows}); their images are meaningless. Method terms: "
            f"{names or 'none'}; a strength too large for the model, or float16 overflow, "
            "are common causes (trace=True shows the first step that turned non-finite in "
            "output.trace.x0_hat)"
        )
    else:
        message = (
            f"generate: the VAE decoder turned the finite latents of {bad.size} of "
            f"{values.shape[0]} images into NaN or inf ({rows}): check the decoder's weights "
            "(a float16 VAE overflows; load it in float32 or bfloat16)"
        )
    warnings.warn(message, RuntimeWarning, stacklevel=user_stacklevel())
