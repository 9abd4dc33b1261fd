"""CLIP text and vision towers (Radford et al. 2021) as Flax nnx modules.

Mirrors ``transformers.models.clip.modeling_clip`` (transformers 5): pre-LayerNorm
transformer blocks, ``quick_gelu`` / ``gelu`` MLPs, a causal mask for text, the pooled
text output taken at the EOS token, and a vision tower with a patch-embedding conv, a class
token, ``pre_layrnorm`` (sic, the checkpoint name) and ``post_layernorm`` on the class token.
Attention goes through :func:`jaxdiv.models.layers.attention_core` (on GPU
:func:`jax.nn.dot_product_attention`, so backends can pick fused kernels). Compute dtype
(``dtype``) and storage dtype (``param_dtype``) are separate, so bf16 compute works with
fp32 or bf16 weights.

Images are **NHWC** (JAX convention); transformers takes NCHW. Attribute names follow
transformers', so checkpoints map by the rules of
:func:`jaxdiv.models.conversion.convert_clip_state_dict`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiv.models.clip.config import ACTIVATIONS, CLIPTextConfig, CLIPVisionConfig, _as_config
from jaxdiv.models.clip.tokenizer import check_token_ids
from jaxdiv.models.convolution import conv_general_dilated
from jaxdiv.models.layers import attention_core

__all__ = [
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
]


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
        # float64 runs (parity and gradient checks) stay float64 in attention_core
        out = attention_core(
            q, k, v, scale=self.head_dim**-0.5, mask=mask, is_causal=is_causal,
            implementation=self.implementation,
        )  # fmt: skip
        return self.out_proj(out.reshape(b, t, -1))


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
        lin = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]
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


def _configure(module, config, cls, dtype, param_dtype, rngs) -> tuple[Any, dict]:
    """Set a tower's ``config`` and ``dtype``; return the config and its layers' keywords.

    ``param_dtype=None`` stores weights in the compute ``dtype``.
    """
    module.config = _as_config(config, cls)
    module.dtype = dtype
    param_dtype = dtype if param_dtype is None else param_dtype
    return module.config, dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def _projection(cfg, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """``text_projection`` / ``visual_projection``: bias-free, to ``projection_dim``."""
    return nnx.Linear(
        cfg.hidden_size,
        cfg.projection_dim,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


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
    check_token_ids(input_ids, cfg.vocab_size)  # concrete ids only (NaN rows / wrap-around)
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
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`
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
        cfg, kw = _configure(self, config, CLIPTextConfig, dtype, param_dtype, rngs)
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
        self,
        input_ids,
        attention_mask=None,
        *,
        output_hidden_states: bool = False,
        token_embeds=None,
    ) -> CLIPTextOutput:
        """Run the text tower.

        Args:
            input_ids: int array (batch, seq_len), seq_len <= max_position_embeddings.
            attention_mask: optional (batch, seq_len) 1/0 padding mask (SD leaves it off).
            output_hidden_states: also return every layer's hidden state.
            token_embeds: optional (batch, seq_len, hidden) token embeddings used in
                place of ``token_embedding(input_ids)`` (position embeddings are still
                added; ``input_ids`` still locate the EOS token for pooling). TPSO
                optimises offsets on these.

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
        if token_embeds is None:
            h = self.embeddings(ids)
        else:
            token_embeds = jnp.asarray(token_embeds)
            want = (*ids.shape, self.config.hidden_size)
            if token_embeds.shape != want:
                raise ValueError(
                    f"token_embeds must have shape {want} (input_ids plus hidden_size), got "
                    f"{token_embeds.shape}"
                )
            positions = self.embeddings.position_embedding(jnp.arange(ids.shape[-1]))
            h = token_embeds.astype(self.dtype) + positions[None]
        h, states = self.encoder(
            h, mask=mask, is_causal=is_causal, output_hidden_states=output_hidden_states
        )
        last = self.final_layer_norm(h)
        return CLIPTextOutput(last, self.pool(last, ids), states)

    def prompt_features(self, input_ids, token_embeds=None, *, attention_mask=None,
                        clip_skip: int | None = None):  # fmt: skip
        """``(hidden, pooled)``: :meth:`encode`'s states and the EOS-pooled output, in one
        pass, optionally from given token embeddings (what TPSO differentiates through).

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModel({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 4,
            ...     "num_hidden_layers": 2, "num_attention_heads": 1}, rngs=nnx.Rngs(0))
            >>> ids = jnp.array([[0, 3, 9, 9]])
            >>> h, pooled = m.prompt_features(ids, clip_skip=1)
            >>> bool(jnp.allclose(h, m.encode(ids, clip_skip=1))), pooled.shape
            (True, (1, 4))
        """
        out = self(input_ids, attention_mask, output_hidden_states=clip_skip is not None,
                   token_embeds=token_embeds)  # fmt: skip
        if clip_skip is None:
            return out.last_hidden_state, out.pooler_output
        n = self.config.num_hidden_layers
        if not isinstance(clip_skip, int) or not 0 <= clip_skip < n:
            raise ValueError(f"clip_skip must be an int in [0, {n}), got {clip_skip!r}")
        return self.final_layer_norm(out.hidden_states[-(clip_skip + 1)]), out.pooler_output

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
        return self.prompt_features(input_ids, attention_mask=attention_mask,
                                    clip_skip=clip_skip)[0]  # fmt: skip


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
        cfg, kw = _configure(self, config, CLIPTextConfig, dtype, param_dtype, rngs)
        impl = attention_implementation
        self.text_model = CLIPTextModel(cfg, attention_implementation=impl, **kw)
        self.text_projection = _projection(cfg, **kw)

    def __call__(
        self,
        input_ids,
        attention_mask=None,
        *,
        output_hidden_states: bool = False,
        token_embeds=None,
    ):
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
        out = self.text_model(
            input_ids,
            attention_mask,
            output_hidden_states=output_hidden_states,
            token_embeds=token_embeds,
        )
        return out._replace(text_embeds=self.text_projection(out.pooler_output))

    def prompt_features(self, input_ids, token_embeds=None, *, clip_skip: int | None = None):
        """``(hidden, text_embeds)``: see :meth:`CLIPTextModel.prompt_features`; the pooled
        output is projected.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = CLIPTextModelWithProjection({"vocab_size": 10, "hidden_size": 4,
            ...     "intermediate_size": 4, "num_hidden_layers": 1, "num_attention_heads": 1,
            ...     "projection_dim": 3}, rngs=nnx.Rngs(0))
            >>> [a.shape for a in m.prompt_features(jnp.zeros((2, 5), jnp.int32))]
            [(2, 5, 4), (2, 3)]
        """
        hidden, pooled = self.text_model.prompt_features(input_ids, token_embeds,
                                                         clip_skip=clip_skip)  # fmt: skip
        return hidden, self.text_projection(pooled)

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
            conv_general_dilated=conv_general_dilated,
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
        cfg, kw = _configure(self, config, CLIPVisionConfig, dtype, param_dtype, rngs)
        self.embeddings = CLIPVisionEmbeddings(cfg, **kw)
        self.pre_layrnorm = _layer_norm(cfg, **kw)
        self.encoder = CLIPEncoder(cfg, implementation=attention_implementation, **kw)
        self.post_layernorm = _layer_norm(cfg, **kw)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> CLIPVisionOutput:
        """Run the vision tower on normalised images.

        Args:
            pixel_values: (batch, image_size, image_size, num_channels), already
                normalised (see :func:`~jaxdiv.models.clip.clip_image_preprocess`).
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
        cfg, kw = _configure(self, config, CLIPVisionConfig, dtype, param_dtype, rngs)
        impl = attention_implementation
        self.vision_model = CLIPVisionModel(cfg, attention_implementation=impl, **kw)
        self.visual_projection = _projection(cfg, **kw)

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
