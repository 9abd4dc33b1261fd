"""CLIP text and vision towers (Radford et al. 2021) as Flax nnx modules.

Mirrors ``transformers.models.clip.modeling_clip`` (transformers 5): pre-LayerNorm
transformer blocks, ``quick_gelu`` / ``gelu`` MLPs, a causal mask for text, the pooled
text output taken at the EOS token, and a vision tower with a patch-embedding conv, a class
token, ``pre_layrnorm`` (sic, the checkpoint name) and ``post_layernorm`` on the class token.
Attention goes through :func:`jax.nn.dot_product_attention`, so GPU backends can pick fused
kernels. Compute dtype (``dtype``) and storage dtype (``param_dtype``) are separate, so
bf16 compute works with fp32 or bf16 weights.

Images are **NHWC** (JAX convention); transformers takes NCHW.

Checkpoint key mapping (:func:`convert_clip_state_dict`), applied per tensor name:

* ``*_proj.weight``, ``fc1/fc2.weight``, ``text_projection/visual_projection.weight``
  -> ``kernel`` transposed (:func:`~jaxdiv.models.checkpoint.linear_kernel`);
* ``layer_norm1/2``, ``final_layer_norm``, ``pre_layrnorm``, ``post_layernorm``:
  ``weight`` -> ``scale``;
* ``token_embedding/position_embedding.weight`` -> ``embedding``;
* ``patch_embedding.weight`` (O, I, p, p) -> ``kernel`` (p, p, I, O);
* ``*.position_ids`` buffers (saved by older transformers) are dropped;
* a ``text_model.`` prefix is stripped for the bare text model (transformers 4 saved one,
  transformers 5 does not); from a full ``CLIPModel`` folder only the requested tower's
  tensors are kept (``logit_scale`` and the other tower are dropped).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiv.models.checkpoint import (
    CheckpointError,
    conv_kernel,
    linear_kernel,
    load_component,
)

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "clip_image_preprocess",
    "convert_clip_state_dict",
    "load_clip_text",
    "load_clip_tokenizer",
    "load_clip_vision",
    "tokenize",
]

# Normalisation constants of CLIPImageProcessor for the OpenAI CLIP checkpoints.
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


# --------------------------------------------------------------------------- configs


def _pick_sub_config(config: dict, key: str) -> dict:
    """A full ``CLIPModel`` config nests the towers; the shared projection is top level."""
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict (parsed config.json), got {type(config).__name__}")
    if key in config and isinstance(config[key], dict):
        sub = dict(config[key])
        if "projection_dim" in config:
            sub["projection_dim"] = config["projection_dim"]
        return sub
    return config


def _check_common(cfg) -> None:
    for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"CLIP config: {name} must be a positive int, got {value!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(
            f"CLIP config: hidden_size ({cfg.hidden_size}) must be divisible by "
            f"num_attention_heads ({cfg.num_attention_heads})"
        )
    if cfg.hidden_act not in _ACTIVATIONS:
        raise ValueError(
            f"CLIP config: hidden_act must be one of {sorted(_ACTIVATIONS)}, got {cfg.hidden_act!r}"
        )


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """Hyperparameters of the CLIP text tower (defaults are transformers 5's).

    Example:
        >>> CLIPTextConfig.from_dict({"hidden_size": 64, "num_attention_heads": 4}).hidden_size
        64
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    @classmethod
    def from_dict(cls, config: dict) -> CLIPTextConfig:
        """Parse a transformers ``CLIPTextConfig`` (or full ``CLIPConfig``) dict.

        Example:
            >>> CLIPTextConfig.from_dict({"text_config": {"vocab_size": 10}}).vocab_size
            10
        """
        sub = _pick_sub_config(config, "text_config")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in sub.items() if k in names and v is not None})
        _check_common(cfg)
        return cfg


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """Hyperparameters of the CLIP vision tower (defaults are transformers 5's).

    Example:
        >>> CLIPVisionConfig.from_dict({"image_size": 32, "patch_size": 8}).num_patches
        16
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_dict(cls, config: dict) -> CLIPVisionConfig:
        """Parse a transformers ``CLIPVisionConfig`` (or full ``CLIPConfig``) dict.

        Example:
            >>> CLIPVisionConfig.from_dict({"vision_config": {"patch_size": 14}}).patch_size
            14
        """
        sub = _pick_sub_config(config, "vision_config")
        names = {f.name for f in dataclasses.fields(cls)}
        cfg = cls(**{k: v for k, v in sub.items() if k in names and v is not None})
        _check_common(cfg)
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"CLIP vision config: image_size ({cfg.image_size}) must be a multiple of "
                f"patch_size ({cfg.patch_size})"
            )
        return cfg


def _as_config(config, cls):
    if isinstance(config, cls):
        return config
    if isinstance(config, dict):
        return cls.from_dict(config)
    raise TypeError(f"config must be a {cls.__name__} or a dict, got {type(config).__name__}")


# --------------------------------------------------------------------------- outputs


class CLIPTextOutput(NamedTuple):
    """Text tower outputs (transformers' ``BaseModelOutputWithPooling`` fields).

    ``hidden_states`` (when requested) has ``num_hidden_layers + 1`` entries: the embeddings,
    then each block's output; the last entry is *before* ``final_layer_norm``.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    text_embeds: jax.Array | None = None


class CLIPVisionOutput(NamedTuple):
    """Vision tower outputs; ``hidden_states[0]`` is the ``pre_layrnorm`` output."""

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None
    image_embeds: jax.Array | None = None


# --------------------------------------------------------------------------- blocks


class CLIPAttention(nnx.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d) + mask) v`` (Vaswani 2017, Eq. 1)."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        d = cfg.hidden_size
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.implementation = implementation
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.k_proj = nnx.Linear(d, d, **lin)
        self.v_proj = nnx.Linear(d, d, **lin)
        self.q_proj = nnx.Linear(d, d, **lin)
        self.out_proj = nnx.Linear(d, d, **lin)

    def __call__(self, x, *, mask=None, is_causal=False):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        out = jax.nn.dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            is_causal=is_causal,
            scale=self.head_dim**-0.5,
            implementation=self.implementation,
        )
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = _ACTIVATIONS[cfg.hidden_act]
        self.fc1 = nnx.Linear(cfg.hidden_size, cfg.intermediate_size, **lin)
        self.fc2 = nnx.Linear(cfg.intermediate_size, cfg.hidden_size, **lin)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


def _layer_norm(cfg, dtype, param_dtype, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )


class CLIPEncoderLayer(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = CLIPAttention(cfg, implementation=implementation, **kw)
        self.layer_norm1 = _layer_norm(cfg, **kw)
        self.mlp = CLIPMLP(cfg, **kw)
        self.layer_norm2 = _layer_norm(cfg, **kw)

    def __call__(self, x, *, mask=None, is_causal=False):
        x = x + self.self_attn(self.layer_norm1(x), mask=mask, is_causal=is_causal)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """Stack of :class:`CLIPEncoderLayer`; optionally returns every intermediate state."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs, implementation=None):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(
                    cfg,
                    dtype=dtype,
                    param_dtype=param_dtype,
                    rngs=rngs,
                    implementation=implementation,
                )
                for _ in range(cfg.num_hidden_layers)
            ]
        )

    def __call__(self, x, *, mask=None, is_causal=False, output_hidden_states=False):
        states = [x]
        for layer in self.layers:
            x = layer(x, mask=mask, is_causal=is_causal)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


class CLIPTextEmbeddings(nnx.Module):
    """Token embedding plus learned absolute position embedding."""

    def __init__(self, cfg: CLIPTextConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, **kw)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, **kw)

    def __call__(self, input_ids):
        positions = jnp.arange(input_ids.shape[-1])
        return self.token_embedding(input_ids) + self.position_embedding(positions)[None]


def _check_ids(input_ids, cfg: CLIPTextConfig):
    ids = jnp.asarray(input_ids)
    if ids.ndim != 2 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(
            f"input_ids must be an integer array of shape (batch, seq_len), got "
            f"shape {ids.shape} and dtype {ids.dtype}"
        )
    if ids.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"input_ids: sequence length {ids.shape[1]} exceeds max_position_embeddings "
            f"({cfg.max_position_embeddings})"
        )
    return ids


# --------------------------------------------------------------------------- text tower


class CLIPTextModel(nnx.Module):
    """CLIP text transformer (transformers' ``CLIPTextModel``), Flax nnx.

    Radford et al. 2021, Sec. 2.4: causal masked transformer, features at the EOS token.

    Args:
        config: :class:`CLIPTextConfig` or a transformers config dict.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
        param_dtype: parameter storage dtype (defaults to ``dtype``).
        rngs: initialisation rngs (weights are normally overwritten by a checkpoint).
        attention_implementation: passed to :func:`jax.nn.dot_product_attention`
            (``None``: let JAX choose, ``"xla"``, ``"cudnn"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        ...        "num_hidden_layers": 2, "num_attention_heads": 2,
        ...        "max_position_embeddings": 6, "eos_token_id": 9}
        >>> m = CLIPTextModel(cfg, rngs=nnx.Rngs(0))
        >>> out = m(jnp.array([[0, 3, 9, 9, 9, 9]]), output_hidden_states=True)
        >>> out.last_hidden_state.shape, out.pooler_output.shape, len(out.hidden_states)
        ((1, 6, 8), (1, 8), 3)
    """

    def __init__(
        self,
        config,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        cfg = _as_config(config, CLIPTextConfig)
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        self.embeddings = CLIPTextEmbeddings(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, implementation=attention_implementation, **kw)
        self.final_layer_norm = _layer_norm(cfg, **kw)

    def _mask(self, attention_mask, t):
        if attention_mask is None:
            return None, True
        am = jnp.asarray(attention_mask)
        if am.ndim != 2 or am.shape[1] != t:
            raise ValueError(
                f"attention_mask must have shape (batch, {t}) like input_ids, got {am.shape}"
            )
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        # (B, 1, T, S): causal AND key is not padding, as transformers' create_causal_mask
        return causal[None, None] & (am[:, None, None, :] != 0), False

    def pool(self, last_hidden_state, input_ids):
        """Hidden state at the EOS token of each sequence (transformers' ``pooler_output``).

        ``eos_token_id == 2`` marks configs from before transformers PR #24773; for those
        the position of the largest token id is used (the EOS token has the largest id in
        the original vocabulary), as transformers still does. Otherwise the first position
        holding ``eos_token_id``.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModel({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 4,
            ...     "num_hidden_layers": 1, "num_attention_heads": 1, "eos_token_id": 9},
            ...     rngs=nnx.Rngs(0))
            >>> h = jnp.arange(12.0).reshape(1, 3, 4)
            >>> m.pool(h, jnp.array([[0, 9, 9]])).tolist()
            [[4.0, 5.0, 6.0, 7.0]]
        """
        ids = jnp.asarray(input_ids)
        if self.config.eos_token_id == 2:
            index = jnp.argmax(ids.astype(jnp.int32), axis=-1)
        else:
            index = jnp.argmax((ids == self.config.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(last_hidden_state, index[:, None, None], axis=1)[:, 0]

    def __call__(
        self, input_ids, attention_mask=None, *, output_hidden_states: bool = False
    ) -> CLIPTextOutput:
        """Run the text tower.

        Args:
            input_ids: int array (batch, seq_len), seq_len <= max_position_embeddings.
            attention_mask: optional (batch, seq_len) 1/0 padding mask (SD leaves it off).
            output_hidden_states: also return every layer's hidden state.

        Returns:
            :class:`CLIPTextOutput` (``text_embeds`` is None for this class).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModel({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 4,
            ...     "num_hidden_layers": 1, "num_attention_heads": 1}, rngs=nnx.Rngs(0))
            >>> m(jnp.zeros((2, 5), jnp.int32)).last_hidden_state.shape
            (2, 5, 4)
        """
        ids = _check_ids(input_ids, self.config)
        mask, is_causal = self._mask(attention_mask, ids.shape[1])
        h = self.embeddings(ids)
        h, states = self.encoder(
            h, mask=mask, is_causal=is_causal, output_hidden_states=output_hidden_states
        )
        last = self.final_layer_norm(h)
        return CLIPTextOutput(last, self.pool(last, ids), states)

    def encode(self, input_ids, attention_mask=None, *, clip_skip: int | None = None):
        """Prompt embeddings the way diffusers' SD pipelines build them.

        ``clip_skip=None``: ``last_hidden_state``. ``clip_skip=k``: the hidden state ``k``
        blocks before the last, passed through ``final_layer_norm`` (diffusers
        ``StableDiffusionPipeline.encode_prompt``, ``hidden_states[-(clip_skip + 1)]``).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModel({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 4,
            ...     "num_hidden_layers": 2, "num_attention_heads": 1}, rngs=nnx.Rngs(0))
            >>> m.encode(jnp.zeros((1, 5), jnp.int32), clip_skip=1).shape
            (1, 5, 4)
        """
        if clip_skip is None:
            return self(input_ids, attention_mask).last_hidden_state
        n = self.config.num_hidden_layers
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < n:
            raise ValueError(f"clip_skip must be an int in [0, {n}), got {clip_skip!r}")
        out = self(input_ids, attention_mask, output_hidden_states=True)
        return self.final_layer_norm(out.hidden_states[-(clip_skip + 1)])


class CLIPTextModelWithProjection(nnx.Module):
    """CLIP text tower plus ``text_projection`` (transformers' class of the same name).

    Radford et al. 2021, Fig. 3 (``T_f = text_encoder(x) @ W_t``, before L2 normalisation).

    Same arguments as :class:`CLIPTextModel`; the output's ``text_embeds`` is
    ``text_projection(pooler_output)`` (unnormalised, as in transformers).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = CLIPTextModelWithProjection({"vocab_size": 10, "hidden_size": 4,
        ...     "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
        ...     "projection_dim": 3}, rngs=nnx.Rngs(0))
        >>> m(jnp.zeros((2, 5), jnp.int32)).text_embeds.shape
        (2, 3)
    """

    def __init__(
        self,
        config,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        cfg = _as_config(config, CLIPTextConfig)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = cfg
        self.dtype = dtype
        self.text_model = CLIPTextModel(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            attention_implementation=attention_implementation,
        )
        self.text_projection = nnx.Linear(
            cfg.hidden_size,
            cfg.projection_dim,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, input_ids, attention_mask=None, *, output_hidden_states: bool = False):
        """Run the tower and project the pooled output; see :meth:`CLIPTextModel.__call__`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModelWithProjection({"vocab_size": 10, "hidden_size": 4,
            ...     "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
            ...     "projection_dim": 3}, rngs=nnx.Rngs(0))
            >>> m(jnp.zeros((1, 5), jnp.int32)).pooler_output.shape
            (1, 4)
        """
        out = self.text_model(input_ids, attention_mask, output_hidden_states=output_hidden_states)
        return out._replace(text_embeds=self.text_projection(out.pooler_output))

    def encode(self, input_ids, attention_mask=None, *, clip_skip: int | None = None):
        """Prompt embeddings; see :meth:`CLIPTextModel.encode`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModelWithProjection({"vocab_size": 10, "hidden_size": 4,
            ...     "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1},
            ...     rngs=nnx.Rngs(0))
            >>> m.encode(jnp.zeros((1, 5), jnp.int32)).shape
            (1, 5, 4)
        """
        return self.text_model.encode(input_ids, attention_mask, clip_skip=clip_skip)


# --------------------------------------------------------------------------- vision tower


class CLIPVisionEmbeddings(nnx.Module):
    """Non-overlapping patch conv, a learned class token, learned position embeddings."""

    def __init__(self, cfg: CLIPVisionConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        p = cfg.patch_size
        self.class_embedding = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.hidden_size,), param_dtype)
        )
        self.patch_embedding = nnx.Conv(
            cfg.num_channels,
            cfg.hidden_size,
            kernel_size=(p, p),
            strides=(p, p),
            padding="VALID",
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.num_patches + 1, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.dtype = dtype

    def __call__(self, pixel_values):
        b = pixel_values.shape[0]
        patches = self.patch_embedding(pixel_values.astype(self.dtype))
        patches = patches.reshape(b, -1, patches.shape[-1])  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(
            self.class_embedding[...].astype(patches.dtype), (b, 1, patches.shape[-1])
        )
        h = jnp.concatenate([cls, patches], axis=1)
        return h + self.position_embedding(jnp.arange(h.shape[1]))[None]


class CLIPVisionModel(nnx.Module):
    """CLIP vision transformer (transformers' ``CLIPVisionModel``), Flax nnx, NHWC input.

    Dosovitskiy et al. 2021, Eq. 1-4 (patches + class token + positions, pre-LN blocks),
    with CLIP's extra ``pre_layrnorm`` (Radford et al. 2021, Sec. 2.4).

    Args:
        config: :class:`CLIPVisionConfig` or a transformers config dict.
        dtype: compute dtype.
        param_dtype: parameter storage dtype (defaults to ``dtype``).
        rngs: initialisation rngs.
        attention_implementation: see :class:`CLIPTextModel`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
        ...        "num_attention_heads": 2, "image_size": 8, "patch_size": 4}
        >>> out = CLIPVisionModel(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 8, 8, 3)))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        ((2, 5, 8), (2, 8))
    """

    def __init__(
        self,
        config,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        cfg = _as_config(config, CLIPVisionConfig)
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.config = cfg
        self.dtype = dtype
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = _layer_norm(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, implementation=attention_implementation, **kw)
        self.post_layernorm = _layer_norm(cfg, **kw)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Run the vision tower on normalised images.

        Args:
            pixel_values: (batch, image_size, image_size, num_channels), already
                normalised (see :func:`clip_image_preprocess`).
            output_hidden_states: also return every layer's hidden state.

        Returns:
            :class:`CLIPVisionOutput`; ``pooler_output`` is ``post_layernorm`` of the class
            token (``image_embeds`` is None for this class).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPVisionModel({"hidden_size": 4, "intermediate_size": 4, "patch_size": 4,
            ...     "num_hidden_layers": 1, "num_attention_heads": 1, "image_size": 8},
            ...     rngs=nnx.Rngs(0))
            >>> len(m(jnp.zeros((1, 8, 8, 3)), output_hidden_states=True).hidden_states)
            2
        """
        cfg = self.config
        want = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != want:
            raise ValueError(
                f"pixel_values must be NHWC of shape (batch, {want[0]}, {want[1]}, {want[2]}), "
                f"got {tuple(pixel_values.shape)}"
            )
        h = self.pre_layrnorm(self.embeddings(pixel_values))
        h, states = self.encoder(h, output_hidden_states=output_hidden_states)
        return CLIPVisionOutput(h, self.post_layernorm(h[:, 0]), states)


class CLIPVisionModelWithProjection(nnx.Module):
    """CLIP vision tower plus ``visual_projection`` (transformers' class of the same name).

    Radford et al. 2021, Fig. 3 (``I_f = image_encoder(I) @ W_i``, before L2 normalisation).

    ``image_embeds = visual_projection(pooler_output)`` (unnormalised). Same arguments as
    :class:`CLIPVisionModel`.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = CLIPVisionModelWithProjection({"hidden_size": 4, "intermediate_size": 4,
        ...     "num_hidden_layers": 1, "num_attention_heads": 1, "image_size": 8,
        ...     "patch_size": 4, "projection_dim": 3}, rngs=nnx.Rngs(0))
        >>> m(jnp.zeros((2, 8, 8, 3))).image_embeds.shape
        (2, 3)
    """

    def __init__(
        self,
        config,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = None,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        cfg = _as_config(config, CLIPVisionConfig)
        param_dtype = dtype if param_dtype is None else param_dtype
        self.config = cfg
        self.dtype = dtype
        self.vision_model = CLIPVisionModel(
            cfg,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            attention_implementation=attention_implementation,
        )
        self.visual_projection = nnx.Linear(
            cfg.hidden_size,
            cfg.projection_dim,
            use_bias=False,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Run the tower and project the pooled output; see :meth:`CLIPVisionModel.__call__`.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPVisionModelWithProjection({"hidden_size": 4, "intermediate_size": 4,
            ...     "num_hidden_layers": 1, "num_attention_heads": 1, "image_size": 8,
            ...     "patch_size": 4, "projection_dim": 3}, rngs=nnx.Rngs(0))
            >>> m(jnp.zeros((1, 8, 8, 3))).pooler_output.shape
            (1, 4)
        """
        out = self.vision_model(pixel_values, output_hidden_states=output_hidden_states)
        return out._replace(image_embeds=self.visual_projection(out.pooler_output))


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
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
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


# --------------------------------------------------------------------------- conversion

_LINEAR = {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
_LINEAR |= {"text_projection", "visual_projection"}
_NORMS = {"layer_norm1", "layer_norm2", "final_layer_norm", "pre_layrnorm", "post_layernorm"}
_EMBEDS = {"token_embedding", "position_embedding"}


def _convert_tensor(name: str, value: np.ndarray) -> tuple[str, np.ndarray]:
    parts = name.split(".")
    if len(parts) >= 2 and parts[-1] == "weight":
        owner = parts[-2]
        if owner in _LINEAR:
            return ".".join(parts[:-1] + ["kernel"]), linear_kernel(value)
        if owner in _NORMS:
            return ".".join(parts[:-1] + ["scale"]), value
        if owner in _EMBEDS:
            return ".".join(parts[:-1] + ["embedding"]), value
        if owner == "patch_embedding" and np.ndim(value) == 4:
            return ".".join(parts[:-1] + ["kernel"]), conv_kernel(value)
    # biases, class_embedding and anything unknown keep their name; unknown names are then
    # reported as unexpected by assign_params.
    return name, value


def convert_clip_state_dict(
    state_dict: dict[str, np.ndarray], *, tower: str, with_projection: bool
) -> dict[str, np.ndarray]:
    """Map a transformers CLIP state dict onto the nnx parameter paths of this module.

    See the module docstring for the rules.

    Args:
        state_dict: PyTorch names -> arrays (from
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        tower: ``"text"`` or ``"vision"``.
        with_projection: target is the ``...WithProjection`` class.

    Returns:
        ``{nnx_path: array}`` for :func:`~jaxdiv.models.checkpoint.assign_params`.

    Example:
        >>> import numpy as np
        >>> sd = {"text_model.final_layer_norm.weight": np.ones(4),
        ...       "text_projection.weight": np.zeros((3, 4))}
        >>> out = convert_clip_state_dict(sd, tower="text", with_projection=True)
        >>> sorted(out), out["text_projection.kernel"].shape
        (['text_model.final_layer_norm.scale', 'text_projection.kernel'], (4, 3))
    """
    if tower not in ("text", "vision"):
        raise ValueError(f"tower must be 'text' or 'vision', got {tower!r}")
    prefix = "text_model." if tower == "text" else "vision_model."
    projection = "text_projection." if tower == "text" else "visual_projection."
    other = (
        ("vision_model.", "visual_projection.")
        if tower == "text"
        else (
            "text_model.",
            "text_projection.",
        )
    )
    out = {}
    for name, value in state_dict.items():
        if name.endswith("position_ids") or name == "logit_scale" or name.startswith(other):
            continue  # buffers and the other tower of a full CLIPModel checkpoint
        if with_projection:
            if not (name.startswith(prefix) or name.startswith(projection)):
                name = prefix + name  # a bare-tower checkpoint loaded into the wrapper
        else:
            if name.startswith(projection):
                continue  # full CLIPModel folder loaded as a bare tower
            if name.startswith(prefix):
                name = name[len(prefix) :]
        new_name, new_value = _convert_tensor(name, value)
        out[new_name] = new_value
    return out


# --------------------------------------------------------------------------- loading


def _wants_projection(config: dict, name: str) -> bool:
    arch = config.get("architectures") or []
    return any(a == name for a in arch) or config.get("model_type") == "clip"


def load_clip_text(
    folder: str | os.PathLike,
    *,
    with_projection: bool | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    attention_implementation: str | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Load a CLIP text encoder from a local transformers folder (e.g. ``text_encoder/``).

    Args:
        folder: folder with ``config.json`` and ``*.safetensors`` (or sharded).
        with_projection: build :class:`CLIPTextModelWithProjection`; ``None`` decides from
            the config's ``architectures`` (``CLIPTextModelWithProjection``, ``CLIPModel``).
        dtype: compute dtype.
        param_dtype: weight dtype in memory (defaults to ``dtype``).
        allow_pickle: permit pickled ``.bin`` weights (see
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        variant: weight-file variant such as ``"fp16"``.
        attention_implementation: passed to :func:`jax.nn.dot_product_attention`.

    Returns:
        The loaded module.

    Raises:
        CheckpointError: folder incomplete or weights that do not match the config.

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
    from jaxdiv.models.checkpoint import read_config

    config = read_config(folder)
    if with_projection is None:
        with_projection = _wants_projection(config, "CLIPTextModelWithProjection")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel

    def build(c):
        return cls(
            c,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )

    def convert(sd, c):
        return convert_clip_state_dict(sd, tower="text", with_projection=with_projection)

    model, _ = load_component(folder, build, convert, allow_pickle=allow_pickle, variant=variant)
    return model


def load_clip_vision(
    folder: str | os.PathLike,
    *,
    with_projection: bool | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    attention_implementation: str | None = None,
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """Load a CLIP vision encoder from a local folder (``image_encoder/`` or a CLIP model).

    Args:
        folder: folder with ``config.json`` and weights; a full ``CLIPModel`` folder works
            too (only the vision tower and ``visual_projection`` are read).
        with_projection: build :class:`CLIPVisionModelWithProjection`; ``None`` decides from
            the config's ``architectures`` (``CLIPVisionModelWithProjection``, ``CLIPModel``).
        dtype: compute dtype.
        param_dtype: weight dtype in memory (defaults to ``dtype``).
        allow_pickle: permit pickled ``.bin`` weights.
        variant: weight-file variant such as ``"fp16"``.
        attention_implementation: passed to :func:`jax.nn.dot_product_attention`.

    Returns:
        The loaded module.

    Raises:
        CheckpointError: folder incomplete or weights that do not match the config.

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
    from jaxdiv.models.checkpoint import read_config

    config = read_config(folder)
    if with_projection is None:
        with_projection = _wants_projection(config, "CLIPVisionModelWithProjection")
    cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel

    def build(c):
        return cls(
            c,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )

    def convert(sd, c):
        return convert_clip_state_dict(sd, tower="vision", with_projection=with_projection)

    model, _ = load_component(folder, build, convert, allow_pickle=allow_pickle, variant=variant)
    return model


# --------------------------------------------------------------------------- tokenizer


def load_clip_tokenizer(folder: str | os.PathLike):
    """Load a ``transformers.CLIPTokenizer`` from a local folder (never the hub).

    Args:
        folder: a ``tokenizer/`` folder with ``vocab.json`` and ``merges.txt`` (and
            usually ``tokenizer_config.json`` / ``special_tokens_map.json``).

    Returns:
        The tokenizer.

    Raises:
        CheckpointError: folder or vocabulary files missing, or transformers not installed.

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
        >>> _ = (d / "vocab.json").write_text(json.dumps(vocab))
        >>> _ = (d / "merges.txt").write_text("#version: 0.2\\n")
        >>> load_clip_tokenizer(d)("a").input_ids
        [0, 2, 1]
    """
    if not isinstance(folder, str | os.PathLike):
        raise TypeError(f"folder must be a str or os.PathLike path, got {type(folder).__name__}")
    path = Path(folder)
    if not path.is_dir():
        raise CheckpointError(f"tokenizer folder {str(path)!r} does not exist")
    has_fast = (path / "tokenizer.json").is_file()
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing and not has_fast:
        raise CheckpointError(
            f"tokenizer folder {str(path)!r} lacks {', '.join(missing)} (and tokenizer.json)"
        )
    try:
        from transformers import CLIPTokenizer
    except ImportError as err:
        raise CheckpointError(
            "loading the CLIP tokenizer needs transformers (pip install 'jaxdiv[sd]')"
        ) from err
    # A local path with local_files_only never reaches the hub.
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)


def tokenize(tokenizer, prompts: str | Sequence[str], max_length: int | None = None) -> np.ndarray:
    """Token ids as SD pipelines make them: padded to ``max_length``, truncated.

    Args:
        tokenizer: a CLIP tokenizer (:func:`load_clip_tokenizer`).
        prompts: one prompt or a list.
        max_length: defaults to ``tokenizer.model_max_length`` (77 for SD).

    Returns:
        int32 array (num_prompts, max_length).

    Example:
        >>> import json, tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "a": 3}
        >>> _ = (d / "vocab.json").write_text(json.dumps(vocab))
        >>> _ = (d / "merges.txt").write_text("#version: 0.2\\n")
        >>> tokenize(load_clip_tokenizer(d), ["a", "a a"], max_length=5).tolist()
        [[0, 2, 1, 1, 1], [0, 2, 2, 1, 1]]
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a str or a sequence of str")
    if max_length is None:
        max_length = tokenizer.model_max_length
        if max_length is None or max_length > 100_000:
            raise ValueError(
                "max_length: the tokenizer has no model_max_length; pass max_length explicitly"
            )
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, dtype=np.int32)
