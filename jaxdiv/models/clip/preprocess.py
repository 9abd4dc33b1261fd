"""Differentiable CLIP image preprocessing (``CLIPImageProcessor`` in JAX)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxdiv import validation

__all__ = ["OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD", "channel_stats", "clip_image_preprocess"]

# Normalisation constants of CLIPImageProcessor for the OpenAI CLIP checkpoints.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def channel_stats(mean, std, *, names: tuple[str, str] = ("mean", "std")) -> tuple:
    """Per-channel RGB normalisation statistics, checked: ``mean`` and ``std`` must each be
    3 finite numbers, ``std`` > 0 (a zero std divides by zero).

    Args:
        mean: per-channel mean.
        std: per-channel standard deviation.
        names: how errors name them (e.g. ``("image_mean", "image_std")``).

    Returns:
        ``(mean, std)`` as tuples of 3 Python floats.

    Example:
        >>> channel_stats([0.5, 0.5, 0.5], (0.25, 0.25, 0.25))
        ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
        >>> channel_stats([0.5], [1.0, 1.0, 1.0])
        Traceback (most recent call last):
        ...
        ValueError: mean must hold 3 numbers (one per RGB channel), got [0.5]
    """
    out = []
    for name, value, bounds in ((names[0], mean, {}), (names[1], std, {"lo": 0, "lo_open": True})):
        if isinstance(value, str | bytes | dict) or not hasattr(value, "__len__"):
            raise TypeError(f"{name} must be a list of 3 numbers (one per RGB channel), got "
                            f"{type(value).__name__} {value!r}")  # fmt: skip
        if len(value) != 3:
            raise ValueError(f"{name} must hold 3 numbers (one per RGB channel), got {value!r}")
        out.append(tuple(validation.number(f"{name}[{i}]", v, **bounds)
                         for i, v in enumerate(value)))  # fmt: skip
    return tuple(out)


def clip_image_preprocess(
    images,
    image_size: int,
    *,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
    input_range: tuple[float, float] = (0.0, 1.0),
):
    """Differentiable CLIP preprocessing: resize shortest side, centre crop, normalise.

    A JAX counterpart of ``CLIPImageProcessor`` (resize the shortest side to
    ``image_size``, centre crop, rescale, ``(x - mean) / std``) that guidance can
    differentiate through. The resize uses :func:`jax.image.resize` (antialiased cubic),
    which is close to but not bit-equal with PIL's bicubic.

    Args:
        images: NHWC float images with values in ``input_range`` (e.g. ``(-1, 1)`` for
            SD VAE decodes).
        image_size: the vision tower's ``config.image_size``.
        mean: per-channel mean (OpenAI CLIP's by default).
        std: per-channel standard deviation.
        input_range: ``(low, high)`` of the input values, mapped to ``[0, 1]`` first.

    Returns:
        (batch, image_size, image_size, C) normalised images.

    Example:
        >>> import jax.numpy as jnp
        >>> clip_image_preprocess(jnp.ones((2, 48, 64, 3)), 32).shape
        (2, 32, 32, 3)
    """
    x = jnp.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC (4-d), got shape {x.shape}")
    validation.integer("image_size", image_size, minimum=1)
    lo, hi = input_range
    if not hi > lo:
        raise ValueError(f"input_range must be (low, high) with high > low, got {input_range!r}")
    x = (x - lo) / (hi - lo)
    b, h, w, c = x.shape
    scale = image_size / min(h, w)
    # int() truncation as transformers' get_resize_output_image_size, so crops line up
    nh, nw = max(image_size, int(h * scale)), max(image_size, int(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method="cubic", antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[:, top : top + image_size, left : left + image_size]
    mean_arr = jnp.asarray(mean, x.dtype)
    std_arr = jnp.asarray(std, x.dtype)
    return (x - mean_arr) / std_arr
