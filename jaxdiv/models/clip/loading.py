"""Loading the CLIP towers from local transformers folders (never the hub)."""

from __future__ import annotations

import os
from typing import Any

import jax.numpy as jnp
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import float_dtype, load_component, read_config
from jaxdiv.models.clip.modules import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
)
from jaxdiv.models.conversion import convert_clip_state_dict

__all__ = ["load_clip_text", "load_clip_vision"]

# tower -> (bare class, class with projection)
_CLASSES = {
    "text": (CLIPTextModel, CLIPTextModelWithProjection),
    "vision": (CLIPVisionModel, CLIPVisionModelWithProjection),
}


def _wants_projection(config: dict, name: str) -> bool:
    arch = config.get("architectures") or []
    return any(a == name for a in arch) or config.get("model_type") == "clip"


def _load_tower(
    tower: str,
    folder: str | os.PathLike,
    *,
    with_projection: bool | None,
    dtype: Any,
    param_dtype: Any,
    allow_pickle: bool,
    variant: str | None,
    attention_implementation: str | None,
    check_finite: bool = True,
):
    """What :func:`load_clip_text` and :func:`load_clip_vision` share, for one ``tower``."""
    bare, projected = _CLASSES[tower]
    dtype = float_dtype("dtype", dtype)
    param_dtype = float_dtype("param_dtype", param_dtype)
    if with_projection is not None:
        with_projection = validation.boolean("with_projection", with_projection)
    config = read_config(folder)
    if with_projection is None:
        with_projection = _wants_projection(config, projected.__name__)
    cls = projected if with_projection else bare

    def build(c):
        return cls(
            c,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )

    def convert(sd, c):
        return convert_clip_state_dict(sd, tower=tower, with_projection=with_projection)

    # a CLIPModel folder ("clip") holds both towers
    model, _ = load_component(folder, build, convert, allow_pickle=allow_pickle, variant=variant,
                              check_finite=check_finite,
                              kinds=(f"clip_{tower}_model", "clip"))  # fmt: skip
    return model


def load_clip_text(
    folder: str | os.PathLike,
    *,
    with_projection: bool | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    attention_implementation: str | None = None,
    check_finite: bool = True,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Load a CLIP text encoder from a local transformers folder (e.g. ``text_encoder/``).

    Args:
        folder: folder with ``config.json`` and ``*.safetensors`` (or sharded).
        with_projection: build :class:`CLIPTextModelWithProjection`; ``None`` decides from
            the config's ``architectures`` (``CLIPTextModelWithProjection``, ``CLIPModel``).
        dtype: compute dtype: ``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16`` or
            ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        param_dtype: weight dtype in memory (defaults to ``dtype``), one of the same.
        allow_pickle: permit pickled ``.bin`` weights (see
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        variant: weight-file variant such as ``"fp16"``.
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`.
        check_finite: refuse NaN/inf weights and weights that overflow ``param_dtype``,
            naming them (``False`` for a trusted folder).

    Returns:
        The loaded module.

    Raises:
        CheckpointError: folder incomplete, weights that do not match the config, or an
            invalid config (naming ``config.json`` and the field).
        TypeError: ``dtype``/``param_dtype`` not a floating dtype, or a flag not a bool.

    Example:
        >>> import tempfile
        >>> import transformers
        >>> cfg = transformers.CLIPTextConfig(vocab_size=10, hidden_size=8,
        ...     intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
        ...     max_position_embeddings=6, eos_token_id=9, bos_token_id=8, pad_token_id=0)
        >>> d = tempfile.mkdtemp()
        >>> transformers.CLIPTextModel(cfg).save_pretrained(d)
        >>> type(load_clip_text(d)).__name__
        'CLIPTextModel'
    """
    return _load_tower(
        "text",
        folder,
        with_projection=with_projection,
        dtype=dtype,
        param_dtype=param_dtype,
        allow_pickle=allow_pickle,
        variant=variant,
        attention_implementation=attention_implementation,
        check_finite=check_finite,
    )


def load_clip_vision(
    folder: str | os.PathLike,
    *,
    with_projection: bool | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    attention_implementation: str | None = None,
    check_finite: bool = True,
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """Load a CLIP vision encoder from a local folder (``image_encoder/`` or a CLIP model).

    Args:
        folder: folder with ``config.json`` and weights; a full ``CLIPModel`` folder works
            too (only the vision tower and ``visual_projection`` are read).
        with_projection: build :class:`CLIPVisionModelWithProjection`; ``None`` decides from
            the config's ``architectures`` (``CLIPVisionModelWithProjection``, ``CLIPModel``).
        dtype: compute dtype: ``jnp.float32``, ``jnp.bfloat16``, ``jnp.float16`` or
            ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        param_dtype: weight dtype in memory (defaults to ``dtype``), one of the same.
        allow_pickle: permit pickled ``.bin`` weights.
        variant: weight-file variant such as ``"fp16"``.
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`.
        check_finite: refuse NaN/inf weights and weights that overflow ``param_dtype``,
            naming them (``False`` for a trusted folder).

    Returns:
        The loaded module.

    Raises:
        CheckpointError: folder incomplete, weights that do not match the config, or an
            invalid config (naming ``config.json`` and the field).
        TypeError: ``dtype``/``param_dtype`` not a floating dtype, or a flag not a bool.

    Example:
        >>> import tempfile
        >>> import transformers
        >>> cfg = transformers.CLIPVisionConfig(hidden_size=8, intermediate_size=8,
        ...     num_hidden_layers=1, num_attention_heads=2, image_size=8, patch_size=4,
        ...     projection_dim=4)
        >>> d = tempfile.mkdtemp()
        >>> transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(d)
        >>> type(load_clip_vision(d)).__name__
        'CLIPVisionModelWithProjection'
    """
    return _load_tower(
        "vision",
        folder,
        with_projection=with_projection,
        dtype=dtype,
        param_dtype=param_dtype,
        allow_pickle=allow_pickle,
        variant=variant,
        attention_implementation=attention_implementation,
        check_finite=check_finite,
    )
