"""Stable Diffusion 1.x / 2.x from a local diffusers folder, as pure JAX functions.

:func:`load` reads a diffusers-format pipeline folder (never the network)::

    <path>/model_index.json
    <path>/unet/            config.json + *.safetensors   (UNet2DConditionModel)
    <path>/vae/             config.json + *.safetensors   (AutoencoderKL)
    <path>/text_encoder/    config.json + *.safetensors   (CLIPTextModel[WithProjection])
    <path>/tokenizer/       vocab.json + merges.txt       (CLIPTokenizer)
    <path>/scheduler/       scheduler_config.json         (any diffusers VP scheduler)
    <path>/image_encoder/   optional: CLIP vision tower   (CLIPVisionModel[WithProjection])
    <path>/feature_extractor/preprocessor_config.json     optional: its image mean / std

and returns a :class:`StableDiffusion` record whose functions plug straight into
:func:`jaxdiv.sample`::

    pipe = stable_diffusion.load("stable-diffusion-2-1-base")
    cond = pipe.encode_prompt(pipe.tokenize(["a photo of a cat"] * 4))
    s = samplers.ddim(pipe.schedule, 50, **pipe.grid_kwargs)
    out = jaxdiv.sample(s, pipe.denoiser, noise, key=key, cond=cond,
                        guidance=guidance.cfg(7.5, null_cond=pipe.null_cond))
    images = pipe.decode(out.x0)                 # NCHW in [-1, 1]

The model-defining scheduler fields are used (betas, ``prediction_type``,
``num_train_timesteps``) plus the grid defaults (``timestep_spacing``, ``steps_offset``,
exposed as :attr:`StableDiffusion.grid_kwargs`). Sampling-time options of diffusers'
schedulers are not: jaxdiv's samplers always end at the clean endpoint ``alpha = 1``
(diffusers' ``set_alpha_to_one=True``), and ``clip_sample`` / ``thresholding`` are not
applied (SD's configs turn both off).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import samplers, schedules
from jaxdiv.models.checkpoint import CheckpointError, read_config, read_model_index
from jaxdiv.models.clip import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    clip_image_preprocess,
    load_clip_text,
    load_clip_tokenizer,
    load_clip_vision,
    tokenize,
)
from jaxdiv.models.layers import pure
from jaxdiv.models.unet import load_unet
from jaxdiv.models.vae import load_vae
from jaxdiv.predictions import PREDICTION_TYPES, PredictionDenoiser, as_denoiser

__all__ = [
    "Bound",
    "COMPONENTS",
    "StableDiffusion",
    "TINY_SCHEDULER",
    "TINY_TEXT",
    "TINY_UNET",
    "TINY_VAE",
    "TINY_VISION",
    "load",
    "save_random_pipeline",
    "schedule_from_config",
]

# Required components -> the classes model_index.json may name for them.
COMPONENTS: dict[str, tuple[str, ...]] = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel", "CLIPTextModelWithProjection"),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": (),  # any diffusers scheduler class; only its config is read
}

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")


@functools.lru_cache(maxsize=64)
def _jitted(apply: Callable, static_argnames: tuple[str, ...]):
    return jax.jit(apply, static_argnames=static_argnames)


class Bound(NamedTuple):
    """A pure function bound to its parameters: ``f(*args) == apply(params, *args)``.

    Calls go through ``jax.jit(apply)`` (compiled once per input shape; inlined when
    called inside another traced function such as :func:`jaxdiv.sample`), because running
    a UNet or VAE op by op is slow. It is a pytree whose array leaves are the parameters,
    so passing it (or a denoiser holding it) to :func:`jaxdiv.sample` traces the weights
    as arguments instead of baking them into the compiled program.

    Attributes:
        apply: ``apply(params, *args, **kwargs)``, a pure function.
        params: the parameter pytree.
        static_argnames: keyword arguments of ``apply`` that are compile-time constants.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = Bound(lambda p, x: p["w"] * x, {"w": jnp.float32(3.0)})
        >>> float(f(2.0)), float(jax.grad(f)(2.0))
        (6.0, 3.0)
    """

    apply: Callable
    params: Any
    static_argnames: tuple[str, ...] = ()

    def __call__(self, *args, **kwargs):
        return _jitted(self.apply, self.static_argnames)(self.params, *args, **kwargs)


class StableDiffusion(NamedTuple):
    """A loaded Stable Diffusion pipeline (see :func:`load`).

    Attributes:
        encode_prompt: ``tokens (B, L) int -> (B, L, D)`` text states the UNet attends to
            (``last_hidden_state``, or the ``clip_skip`` layer through the final
            LayerNorm, as diffusers' ``encode_prompt``). Differentiable in the weights.
        denoiser: ``(x, t, cond) -> x0_hat`` on scaled latents, ``t`` the VP timestep
            (``0 .. T-1``; fractional values interpolate), via
            :func:`jaxdiv.predictions.as_denoiser` for ``prediction_type``.
        decode: diffusion latents NCHW -> images NCHW, nominally in ``[-1, 1]`` (divides by
            the VAE ``scaling_factor``, adds ``shift_factor``, then decodes).
        encode_image: images NCHW in ``[-1, 1]`` -> CLIP image features ``(B, P)`` (the
            projected ``image_embeds``, or ``pooler_output`` for a tower without
            projection); resize / crop / normalise are differentiable. ``None`` when no
            image encoder was loaded.
        tokenizer: the ``transformers.CLIPTokenizer`` (local files).
        schedule: the :class:`~jaxdiv.schedules.VPSchedule` of the scheduler config.
        null_cond: ``(1, L, D)`` embedding of the empty prompt for
            ``guidance.cfg(w, null_cond=...)`` (diffusers: no ``clip_skip`` for it).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        grid_kwargs: ``{"spacing", "steps_offset"}`` from the scheduler config, for
            ``samplers.ddim(pipe.schedule, N, **pipe.grid_kwargs)``.
        max_length: token sequence length (``tokenizer.model_max_length``, 77 for SD).
        latent_channels: channels of the latents (4 for SD 1.x/2.x).
        vae_scale_factor: image pixels per latent pixel (8 for SD).
        sample_size: default latent height/width (``unet.config.sample_size``).
        configs: the parsed ``config.json`` of each component (plus ``"scheduler"`` and
            ``"model_index"``).
        path: the pipeline folder.

    Example:
        >>> pipe = _example()  # a tiny random folder, loaded with load()
        >>> cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"]))
        >>> cond.shape, pipe.null_cond.shape, pipe.noise_shape(2)
        ((2, 16, 32), (1, 16, 32), (2, 4, 8, 8))
    """

    encode_prompt: Bound
    denoiser: PredictionDenoiser
    decode: Bound
    encode_image: Bound | None
    tokenizer: Any
    schedule: schedules.VPSchedule
    null_cond: jax.Array
    prediction_type: str
    grid_kwargs: dict
    max_length: int
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    configs: dict
    path: str

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids ``(num_prompts, max_length)`` padded and truncated as diffusers does.

        Example:
            >>> _example().tokenize(["a cat", "a dog"]).shape
            (2, 16)
        """
        return tokenize(self.tokenizer, prompts, max_length=self.max_length)

    def noise_shape(self, batch: int, height: int | None = None, width: int | None = None):
        """Latent shape ``(batch, C, height / f, width / f)`` for images of ``height x width``.

        ``height``/``width`` default to ``sample_size * vae_scale_factor`` (512 for SD 1.5
        and SD 2.1-base, 768 for SD 2.1) and must be multiples of
        ``vae_scale_factor * 2 ** (levels - 1)`` for the UNet's down/up path to line up.

        Example:
            >>> _example().noise_shape(3), _example().noise_shape(1, height=32, width=16)
            ((3, 4, 8, 8), (1, 4, 16, 8))
        """
        f = self.vae_scale_factor
        height = self.sample_size * f if height is None else height
        width = self.sample_size * f if width is None else width
        levels = len(self.configs["unet"].get("block_out_channels", (0,) * 4))
        multiple = f * 2 ** (levels - 1)
        for name, v in (("height", height), ("width", width)):
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0 or v % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple}, got {v!r}")
        if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
            raise ValueError(f"batch must be a positive int, got {batch!r}")
        return (batch, self.latent_channels, height // f, width // f)

    def ddim(self, num_steps: int = 50, eta: float = 0.0) -> samplers.Sampler:
        """DDIM (Song et al. 2021, Eq. 12) on this schedule with the configured spacing.

        The grid is diffusers' for the scheduler config's ``timestep_spacing`` /
        ``steps_offset``, ending at the clean endpoint (``set_alpha_to_one=True``).

        Example:
            >>> _example().ddim(10).times.tolist()[-3:]
            [101.0, 1.0, -1.0]
        """
        return samplers.ddim(self.schedule, num_steps, eta, **self.grid_kwargs)

    def edm(self, num_steps: int = 18, rho: float = 7.0, **kwargs) -> samplers.Sampler:
        """Karras et al. (2022) Alg. 2 sampler on the Karras noise levels (Eq. 5) of this model.

        The levels run from ``noise_level(T-1)`` to ``noise_level(0)`` (diffusers'
        ``use_karras_sigmas``), mapped to VP times (fractional timesteps interpolate
        ``alphas_cumprod``), then the clean endpoint. ``kwargs`` go to
        :func:`jaxdiv.samplers.edm` (``s_churn``, ...). NFE is ``2 N - 1``.

        Example:
            >>> s = _example().edm(5)
            >>> s.nfe, round(float(s.times[0])), float(s.times[-1])
            (9, 999, -1.0)
        """
        sch = self.schedule
        levels = schedules.karras_sigmas(
            num_steps, sch.noise_level(0.0), sch.noise_level(sch.t_max), rho
        )
        times = jnp.concatenate([sch.t_of_noise_level(levels), jnp.full((1,), sch.t_clean)])
        return samplers.edm(sch, num_steps, times=times, **kwargs)


def schedule_from_config(config: dict) -> tuple[schedules.VPSchedule, str, dict]:
    """VP schedule, prediction type and grid options from a diffusers scheduler config.

    ``alphas_cumprod = cumprod(1 - betas)`` (Ho et al. 2020, Eq. 4 notation) with the betas
    of ``trained_betas`` if given, else ``beta_schedule``: ``"linear"``
    (:func:`~jaxdiv.schedules.vp_linear`), ``"scaled_linear"``
    (:func:`~jaxdiv.schedules.vp_scaled_linear`), ``"squaredcos_cap_v2"``
    (:func:`~jaxdiv.schedules.vp_cosine`).

    Args:
        config: parsed ``scheduler/scheduler_config.json``.

    Returns:
        ``(schedule, prediction_type, {"spacing": ..., "steps_offset": ...})``; a missing
        ``timestep_spacing`` means ``"leading"`` and a missing ``steps_offset`` 0 (diffusers'
        defaults for DDIM / PNDM).

    Raises:
        ValueError: unknown ``beta_schedule`` / ``prediction_type`` / ``timestep_spacing``,
            or ``rescale_betas_zero_snr=True`` (a zero-SNR model needs ``alpha(T-1) = 0``,
            which the VP schedules here do not represent).

    Example:
        >>> sch, pred, grid = schedule_from_config({"beta_schedule": "scaled_linear",
        ...     "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
        ...     "prediction_type": "v_prediction"})
        >>> round(float(sch.alpha(999.0)), 4), pred, grid
        (0.0683, 'v_prediction', {'spacing': 'leading', 'steps_offset': 1})
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    T = config.get("num_train_timesteps", 1000)
    if isinstance(T, bool) or not isinstance(T, int) or T < 2:
        raise ValueError(f"scheduler config: num_train_timesteps must be an int >= 2, got {T!r}")
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler config: rescale_betas_zero_snr=True is not supported (zero terminal "
            "SNR makes alpha(T-1) = 0)"
        )
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    b0 = float(config.get("beta_start", 0.0001))
    b1 = float(config.get("beta_end", 0.02))
    if trained is not None:
        betas = np.asarray(trained, np.float32)
        if betas.shape != (T,):
            raise ValueError(
                f"scheduler config: trained_betas must have num_train_timesteps={T} entries, "
                f"got shape {betas.shape}"
            )
        sch = schedules.vp_from_betas(betas, "vp_trained")
    elif kind == "linear":
        sch = schedules.vp_linear(b0, b1, T)
    elif kind == "scaled_linear":
        sch = schedules.vp_scaled_linear(b0, b1, T)
    elif kind == "squaredcos_cap_v2":
        sch = schedules.vp_cosine(T)
    else:
        raise ValueError(
            f"scheduler config: beta_schedule must be one of {_BETA_SCHEDULES} (or "
            f"trained_betas given), got {kind!r}"
        )
    pred = config.get("prediction_type", "epsilon")
    if pred not in PREDICTION_TYPES or pred == "flow":
        raise ValueError(
            "scheduler config: prediction_type must be 'epsilon', 'v_prediction' or 'sample', "
            f"got {pred!r}"
        )
    spacing = config.get("timestep_spacing") or "leading"
    if spacing not in _SPACINGS:
        raise ValueError(
            f"scheduler config: timestep_spacing must be one of {_SPACINGS}, got {spacing!r}"
        )
    offset = config.get("steps_offset", 0) or 0
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"scheduler config: steps_offset must be an int >= 0, got {offset!r}")
    return sch, pred, {"spacing": spacing, "steps_offset": offset}


# --------------------------------------------------------------------------- folder checks


def _entry_class(index: dict, name: str) -> str | None:
    """The class model_index.json names for a component, or None when absent / null."""
    entry = index.get(name)
    if isinstance(entry, list | tuple) and len(entry) == 2 and entry[1] is not None:
        return str(entry[1])
    return None


def _check_pipeline_folder(path: Path) -> dict:
    """Read ``model_index.json`` and report every missing / unsupported component at once."""
    if not path.is_dir():
        if path.is_file():
            raise CheckpointError(
                f"pipeline folder {str(path)!r} is a file; expected a diffusers-format folder "
                "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/). "
                "Single-file .ckpt/.safetensors checkpoints are not read: convert them with "
                "diffusers first"
            )
        raise CheckpointError(f"pipeline folder {str(path)!r} does not exist or is not a directory")
    if not (path / "model_index.json").is_file():
        present = sorted(p.name for p in path.iterdir())[:20]
        hint = ""
        if (path / "config.json").is_file():
            hint = " (it has a config.json: is this a single component folder like unet/?)"
        raise CheckpointError(
            f"pipeline folder {str(path)!r} has no model_index.json{hint}; expected a diffusers "
            f"Stable Diffusion folder. Present: {', '.join(present) or 'nothing'}"
        )
    index = read_model_index(path)
    problems = []
    for name, classes in COMPONENTS.items():
        cls = _entry_class(index, name)
        folder = path / name
        if cls is None and not folder.is_dir():
            problems.append(f"{name}/ (not in model_index.json and no folder)")
            continue
        if classes and cls is not None and cls not in classes:
            problems.append(f"{name} is a {cls}, expected one of {list(classes)}")
            continue
        if not folder.is_dir():
            problems.append(f"{name}/ (listed in model_index.json as {cls}, folder missing)")
        elif name == "scheduler":
            if not (folder / "scheduler_config.json").is_file():
                problems.append("scheduler/scheduler_config.json")
        elif name == "tokenizer":
            vocab = [f for f in ("vocab.json", "merges.txt") if not (folder / f).is_file()]
            if vocab and not (folder / "tokenizer.json").is_file():
                problems.append(
                    "tokenizer/" + " and tokenizer/".join(vocab) + " (and no tokenizer.json)"
                )
        elif not (folder / "config.json").is_file():
            problems.append(f"{name}/config.json")
    if problems:
        kind = index.get("_class_name", "unknown pipeline")
        raise CheckpointError(
            f"pipeline folder {str(path)!r} ({kind}) is incomplete or unsupported; missing or "
            f"wrong: {'; '.join(problems)}"
        )
    return index


def _image_preprocess_stats(encoder_folder: Path, pipeline_folder: Path) -> tuple:
    """Mean / std of the CLIPImageProcessor config next to the encoder, else OpenAI's."""
    for candidate in (
        encoder_folder / "preprocessor_config.json",
        pipeline_folder / "feature_extractor" / "preprocessor_config.json",
    ):
        if candidate.is_file():
            try:
                cfg = json.loads(candidate.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{str(candidate)!r} is not valid JSON ({err})") from err
            mean = cfg.get("image_mean", OPENAI_CLIP_MEAN)
            std = cfg.get("image_std", OPENAI_CLIP_STD)
            return tuple(float(m) for m in mean), tuple(float(s) for s in std), str(candidate)
    return OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, None


# --------------------------------------------------------------------------- loading


def _encode_prompt_fn(text_model, clip_skip):
    apply_encode = pure(text_model, "encode").apply
    default = clip_skip

    def apply(params, tokens, clip_skip=default):
        return apply_encode(params, jnp.asarray(tokens), clip_skip=clip_skip)

    return Bound(apply, pure(text_model).params, ("clip_skip",))


def _decode_fn(vae):
    apply_decode = pure(vae, "decode")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def apply(params, latents):
        # diffusers: vae.decode(latents / scaling_factor (+ shift_factor))
        return apply_decode.apply(params, jnp.asarray(latents) / scale + shift)

    return Bound(apply, apply_decode.params)


def _unet_fn(unet):
    net = pure(unet)

    def apply(params, x, t, cond):
        return net.apply(params, x, t, cond)

    return Bound(apply, net.params)


def _encode_image_fn(vision, mean, std):
    net = pure(vision)
    size = vision.config.image_size
    projected = hasattr(vision, "visual_projection")

    def apply(params, images):
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be NCHW RGB (B, 3, H, W), got shape {images.shape}")
        x = clip_image_preprocess(
            jnp.transpose(images, (0, 2, 3, 1)), size, mean=mean, std=std, input_range=(-1, 1)
        )
        out = net.apply(params, x)
        return out.image_embeds if projected else out.pooler_output

    return Bound(apply, net.params)


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    *,
    image_encoder: str | os.PathLike | bool | None = None,
    variant: str | None = None,
    clip_skip: int | None = None,
    attention_implementation: str | None = None,
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x pipeline folder (diffusers format, local only).

    Rombach et al. (2022): a latent diffusion model, ``x0_hat`` from the UNet's
    eps / v prediction on the VP process of the scheduler config (Eq. 1 / Sec. 3.3
    conditioning), decoded by the KL autoencoder (Sec. 3.1).

    Args:
        path: pipeline folder (see the module docstring for the layout).
        dtype: compute and weight dtype of every network (``jnp.float32`` or
            ``jnp.bfloat16``).
        allow_pickle: accept pickled ``.bin`` weights where a component has no
            safetensors (refused by default: unpickling can run code).
        image_encoder: ``None`` loads ``<path>/image_encoder`` when present; a path loads
            that folder (a ``CLIPVisionModel[WithProjection]`` or a full ``CLIPModel``
            folder); ``False`` skips it. Preprocessing mean / std come from
            ``<encoder>/preprocessor_config.json``, else
            ``<path>/feature_extractor/preprocessor_config.json``, else OpenAI CLIP's.
        variant: weight-file variant such as ``"fp16"`` (``*.fp16.safetensors``).
        clip_skip: use the text encoder layer ``clip_skip`` blocks before the last
            (diffusers' ``clip_skip``); ``None`` uses the last hidden state.
        attention_implementation: passed to :func:`jax.nn.dot_product_attention`
            (``None``/``"xla"``, ``"cudnn"`` for fused GPU kernels in bf16/fp16).

    Returns:
        A :class:`StableDiffusion` record.

    Raises:
        CheckpointError: (a ``ValueError``) the folder is missing, incomplete (every
            missing component is named), holds unsupported component classes, only
            pickled weights without ``allow_pickle``, or tensors that do not match the
            configs (each missing / unexpected / mis-shaped tensor named).
        ValueError: an unsupported scheduler or model config, or components that do not
            fit together (text width vs UNet cross-attention, VAE vs UNet channels).

    Example:
        >>> pipe = load("stable-diffusion-2-1-base")  # doctest: +SKIP
        >>> s = pipe.ddim(50)  # doctest: +SKIP

        A runnable example on a tiny random folder is in ``tests/test_pipeline_sd.py``;
        a folder without ``model_index.json`` fails with a message naming it:

        >>> import tempfile
        >>> try:
        ...     load(tempfile.mkdtemp())
        ... except CheckpointError as err:
        ...     print("no model_index.json" in str(err))
        True
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)):
        raise TypeError(f"clip_skip must be an int or None, got {clip_skip!r}")
    root = Path(path)
    index = _check_pipeline_folder(root)
    sched_file = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler_config = json.loads(sched_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{str(sched_file)!r} is not valid JSON ({err})") from err
    if not isinstance(scheduler_config, dict):
        raise CheckpointError(f"{str(sched_file)!r} must hold a JSON object")
    schedule, prediction_type, grid_kwargs = schedule_from_config(scheduler_config)

    text_config = read_config(root / "text_encoder")
    if text_config.get("use_attention_mask"):
        raise ValueError(
            "text_encoder config: use_attention_mask=True is not supported (SD 1.x/2.x "
            "encode prompts without a padding mask)"
        )
    kw = dict(allow_pickle=allow_pickle, variant=variant)
    unet = load_unet(
        root / "unet", dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    vae = load_vae(root / "vae", dtype=dtype, **kw)
    text = load_clip_text(
        root / "text_encoder", dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    tokenizer = load_clip_tokenizer(root / "tokenizer")

    width = text.config.hidden_size
    if any(c != width for c in unet.config.cross_attention_dim):
        raise ValueError(
            f"{str(root)!r}: text_encoder hidden_size {width} does not match the unet's "
            f"cross_attention_dim {list(unet.config.cross_attention_dim)}"
        )
    lat = vae.config.latent_channels
    if unet.config.in_channels != lat or unet.config.out_channels != lat:
        raise ValueError(
            f"{str(root)!r}: unet in/out channels ({unet.config.in_channels}, "
            f"{unet.config.out_channels}) must equal the vae latent_channels {lat} "
            "(inpainting / depth UNets with extra input channels are not supported)"
        )
    if clip_skip is not None and not 0 <= clip_skip < text.config.num_hidden_layers:
        raise ValueError(
            f"clip_skip must be in [0, {text.config.num_hidden_layers}), got {clip_skip}"
        )
    max_length = tokenizer.model_max_length
    if max_length is None or max_length > text.config.max_position_embeddings:
        max_length = text.config.max_position_embeddings

    configs = {
        "model_index": index,
        "scheduler": scheduler_config,
        "unet": read_config(root / "unet"),
        "vae": read_config(root / "vae"),
        "text_encoder": text_config,
    }

    encode_image = None
    enc_folder = None
    if image_encoder is None and (root / "image_encoder").is_dir():
        enc_folder = root / "image_encoder"
    elif image_encoder is not None and image_encoder is not False:
        if image_encoder is True:
            enc_folder = root / "image_encoder"
        elif isinstance(image_encoder, str | os.PathLike):
            enc_folder = Path(image_encoder)
        else:
            raise TypeError(
                f"image_encoder must be None, a bool or a folder path, got {image_encoder!r}"
            )
        if not enc_folder.is_dir():
            raise CheckpointError(f"image_encoder folder {str(enc_folder)!r} does not exist")
    if enc_folder is not None:
        vision = load_clip_vision(
            enc_folder, dtype=dtype, attention_implementation=attention_implementation, **kw
        )
        mean, std, stats_file = _image_preprocess_stats(enc_folder, root)
        encode_image = _encode_image_fn(vision, mean, std)
        configs["image_encoder"] = dict(
            read_config(enc_folder), _folder=str(enc_folder), _preprocessor=stats_file
        )

    encode_prompt = _encode_prompt_fn(text, clip_skip)
    empty = tokenize(tokenizer, [""], max_length=max_length)
    # diffusers encodes the negative / empty prompt without clip_skip
    null_cond = encode_prompt(jnp.asarray(empty), clip_skip=None)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, tuple | list):
        sample_size = int(sample_size[0])
    if sample_size is None:
        sample_size = 64
    return StableDiffusion(
        encode_prompt=encode_prompt,
        denoiser=as_denoiser(_unet_fn(unet), schedule, prediction_type),
        decode=_decode_fn(vae),
        encode_image=encode_image,
        tokenizer=tokenizer,
        schedule=schedule,
        null_cond=null_cond,
        prediction_type=prediction_type,
        grid_kwargs=grid_kwargs,
        max_length=int(max_length),
        latent_channels=lat,
        vae_scale_factor=vae.downsample_factor,
        sample_size=int(sample_size),
        configs=configs,
        path=str(root),
    )


# --------------------------------------------------------------------------- random folders

# A tiny configuration of every component (a 16x16-pixel SD): fast enough for tests,
# doctests and benchmarks on one CPU core, with every layer type SD 1.x uses.
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=16,
    projection_dim=16,
)
TINY_VISION = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=16,
    patch_size=4,
    projection_dim=16,
)
# diffusers' DDIMScheduler with SD's betas; set_alpha_to_one=True so the last DDIM step
# lands on x0 like jaxdiv's grids.
TINY_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


def _write_tiny_vocab(folder: Path) -> tuple[int, int]:
    """A lowercase character-level BPE vocabulary with a few merges (CLIP's file format)."""
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    # special tokens get the largest ids, as in the released CLIP vocabulary
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return bos, eos


def save_random_pipeline(
    folder: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    unet: dict | None = None,
    vae: dict | None = None,
    text_encoder: dict | None = None,
    scheduler: dict | None = None,
    image_encoder: dict | bool = False,
    max_length: int | None = None,
):
    """Save a random diffusers ``StableDiffusionPipeline`` folder (safetensors) for tests.

    Builds the PyTorch components with diffusers / transformers (the ``parity`` extra) at
    random -- norm scales and all biases randomised too, so a swapped scale / bias cannot
    hide -- and ``save_pretrained``-s them. Defaults are tiny (:data:`TINY_UNET`, ...);
    each dict overrides entries of the corresponding default config.

    Args:
        folder: where to write (created if missing).
        prediction_type: the scheduler's ``prediction_type``.
        seed: torch seed of the random weights.
        unet: overrides for ``UNet2DConditionModel(**TINY_UNET)``.
        vae: overrides for ``AutoencoderKL(**TINY_VAE)``.
        text_encoder: overrides for ``CLIPTextConfig(**TINY_TEXT)``.
        scheduler: overrides for ``DDIMScheduler(**TINY_SCHEDULER)``.
        image_encoder: ``True`` or overrides of :data:`TINY_VISION` to also save a random
            ``CLIPVisionModelWithProjection`` in ``image_encoder/``.
        max_length: tokenizer ``model_max_length`` (default: the text encoder's
            ``max_position_embeddings``).

    Returns:
        The diffusers ``StableDiffusionPipeline`` that was saved (on CPU, fp32).

    Raises:
        ImportError: torch, diffusers or transformers are not installed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = save_random_pipeline(d, prediction_type="v_prediction")
        >>> sorted(p.name for p in d.iterdir())
        ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
        >>> json.loads((d / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        'v_prediction'
    """
    import tempfile

    try:
        import torch
        import transformers
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
        from diffusers import UNet2DConditionModel as TorchUNet
    except ImportError as err:
        raise ImportError(
            "save_random_pipeline needs torch, diffusers and transformers "
            "(pip install 'jaxdiv[parity]')"
        ) from err

    def randomize(model, s):
        g = torch.Generator().manual_seed(s)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                    p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
        return model.eval()

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bos, eos = _write_tiny_vocab(Path(tmp))
        text_cfg = dict(TINY_TEXT, **(text_encoder or {}))
        length = max_length or text_cfg["max_position_embeddings"]
        tokenizer = transformers.CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=length
        )
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_cfg.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    text = randomize(transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg)), seed)
    torch.manual_seed(seed + 1)
    net = randomize(TorchUNet(**dict(TINY_UNET, **(unet or {}))), seed + 1)
    torch.manual_seed(seed + 2)
    ae = randomize(AutoencoderKL(**dict(TINY_VAE, **(vae or {}))), seed + 2)
    sched = DDIMScheduler(
        **dict(TINY_SCHEDULER, prediction_type=prediction_type, **(scheduler or {}))
    )
    vision = None
    if image_encoder:
        overrides = image_encoder if isinstance(image_encoder, dict) else {}
        torch.manual_seed(seed + 3)
        vcfg = transformers.CLIPVisionConfig(**dict(TINY_VISION, **overrides))
        vision = randomize(transformers.CLIPVisionModelWithProjection(vcfg), seed + 3)
    pipe = StableDiffusionPipeline(
        vae=ae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=net,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=vision,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # released SD folders ship the slow-tokenizer files (vocab.json, merges.txt) and no
    # tokenizer.json, which transformers 5 writes instead: keep the released layout
    _write_tiny_vocab(out / "tokenizer")
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    return pipe


_EXAMPLE_CACHE: dict = {}


def _example() -> StableDiffusion:
    """A tiny random pipeline shared by this module's doctests (built once per process)."""
    if "pipe" not in _EXAMPLE_CACHE:
        import tempfile

        folder = tempfile.mkdtemp(prefix="jaxdiv_sd_example_")
        save_random_pipeline(folder)
        _EXAMPLE_CACHE["pipe"] = load(folder)
    return _EXAMPLE_CACHE["pipe"]
