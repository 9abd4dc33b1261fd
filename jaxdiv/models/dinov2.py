"""DINOv2 (Oquab et al. 2023) in Flax nnx: the image encoder of FD-DINOv2, Vendi and PRDC.

Mirrors ``transformers.models.dinov2.modeling_dinov2.Dinov2Model`` (transformers 5):

* a patch-embedding conv (with bias), a learned CLS token and learned absolute position
  embeddings for the native ``image_size // patch_size`` grid;
* at any other input size the patch position embeddings are **interpolated** to the
  input's patch grid with PyTorch's bicubic kernel (``align_corners=False``, no
  antialiasing, Keys ``a = -0.75``, border-clamped taps), exactly as transformers'
  ``interpolate_pos_encoding`` (:func:`torch_bicubic_resize`; :func:`jax.image.resize`'s
  cubic kernel is a different one, ``a = -0.5``);
* pre-LN blocks with **layer scale**: ``x + lambda1 * attn(norm1(x))``, then
  ``x + lambda2 * ffn(norm2(x))``, where ``ffn`` is the GELU MLP or, for ViT-g
  (``use_swiglu_ffn``), SwiGLU ``down(silu(gate(x)) * up(x))``; drop path is identity at
  inference;
* a final LayerNorm; ``pooler_output`` is the layernormed CLS token.

Images are **NHWC** (JAX convention, as :class:`~jaxdiv.models.clip.CLIPVisionModel`);
transformers takes NCHW. Attribute names follow transformers 5's modules
(``encoder.layer.<i>.attention.q_proj``, ``mlp.gate_proj``, ``layer_scale1.lambda1``), so
checkpoints, including the released ``facebook/dinov2-*`` ones in the legacy layout
(``attention.attention.query``, fused SwiGLU ``mlp.weights_in``), map by the rules of
:func:`jaxdiv.models.conversion.convert_dinov2_state_dict`. ``Dinov2WithRegisters`` (whose
interpolation is antialiased) is not ported.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import float_dtype
from jaxdiv.models.clip.config import ACTIVATIONS
from jaxdiv.models.clip.preprocess import channel_stats
from jaxdiv.models.conversion import convert_dinov2_state_dict
from jaxdiv.models.convolution import conv_general_dilated
from jaxdiv.models.layers import attention_core

__all__ = [
    "DINOV2_MEAN",
    "DINOV2_STD",
    "Dinov2Config",
    "Dinov2Model",
    "Dinov2Output",
    "bicubic_weights",
    "dinov2_preprocess",
    "load_dinov2",
    "pil_bicubic_weights",
    "torch_bicubic_resize",
]

Dtype = Any

# ImageNet normalisation of BitImageProcessor as configured for facebook/dinov2-*
DINOV2_MEAN = (0.485, 0.456, 0.406)
DINOV2_STD = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- config


def _pair(name: str, value) -> tuple[int, int]:
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != 2:
            raise ValueError(f"DINOv2 config: {name} must be an int or a pair, got {value!r}")
        return (validation.integer(f"DINOv2 config: {name}[0]", value[0], minimum=1),
                validation.integer(f"DINOv2 config: {name}[1]", value[1], minimum=1))  # fmt: skip
    v = validation.integer(f"DINOv2 config: {name}", value, minimum=1)
    return v, v


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """Hyperparameters of ``Dinov2Model`` (defaults are transformers 5's, i.e. dinov2-base).

    Example:
        >>> cfg = Dinov2Config.from_dict({"hidden_size": 48, "use_swiglu_ffn": True})
        >>> cfg.grid_size, cfg.mlp_hidden_size, cfg.swiglu_hidden_size
        (16, 192, 128)
    """

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int | tuple[int, int] = 224
    patch_size: int | tuple[int, int] = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False

    def __post_init__(self):
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_channels"):
            validation.integer(f"DINOv2 config: {name}", getattr(self, name), minimum=1)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"DINOv2 config: hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        validation.number("DINOv2 config: mlp_ratio", self.mlp_ratio, lo=0.0, lo_open=True)
        validation.number("DINOv2 config: layer_norm_eps", self.layer_norm_eps, lo=0,
                          lo_open=True)  # fmt: skip
        validation.choice("DINOv2 config: hidden_act", self.hidden_act, sorted(ACTIVATIONS))
        validation.boolean("DINOv2 config: qkv_bias", self.qkv_bias)
        validation.boolean("DINOv2 config: use_swiglu_ffn", self.use_swiglu_ffn)
        (ih, iw), (ph, pw) = self.image_hw, self.patch_hw
        if ih // ph != iw // pw or ih < ph:
            # transformers reshapes the table to sqrt(num_positions) squared
            raise ValueError(
                f"DINOv2 config: image_size {self.image_size!r} and patch_size "
                f"{self.patch_size!r} must give a square patch grid of at least 1x1"
            )

    @property
    def image_hw(self) -> tuple[int, int]:
        """``image_size`` as ``(height, width)``."""
        return _pair("image_size", self.image_size)

    @property
    def patch_hw(self) -> tuple[int, int]:
        """``patch_size`` as ``(height, width)``."""
        return _pair("patch_size", self.patch_size)

    @property
    def grid_size(self) -> int:
        """Side of the native (square) patch grid the position table covers."""
        return self.image_hw[0] // self.patch_hw[0]

    @property
    def mlp_hidden_size(self) -> int:
        """Width of the GELU MLP, ``int(hidden_size * mlp_ratio)``."""
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def swiglu_hidden_size(self) -> int:
        """Width of the SwiGLU FFN: two thirds of the MLP width, rounded up to 8."""
        return (int(self.mlp_hidden_size * 2 / 3) + 7) // 8 * 8

    @classmethod
    def from_dict(cls, config: dict) -> Dinov2Config:
        """Parse a transformers ``Dinov2Config`` dict (a ``config.json``); other keys ignored.

        Example:
            >>> Dinov2Config.from_dict({"patch_size": [14, 14], "model_type": "dinov2"}).patch_hw
            (14, 14)
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict (parsed config.json), got "
                            f"{type(config).__name__}")  # fmt: skip
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in config.items() if k in names and v is not None}
        for k in ("image_size", "patch_size"):
            if isinstance(kw.get(k), list):
                kw[k] = tuple(kw[k])
        return cls(**kw)


def _as_config(config) -> Dinov2Config:
    if isinstance(config, Dinov2Config):
        return config
    if isinstance(config, dict):
        return Dinov2Config.from_dict(config)
    raise TypeError(f"config must be a Dinov2Config or a dict, got {type(config).__name__}")


# --------------------------------------------------------------------------- bicubic


def _cubic_near(x, a):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1


def _cubic_far(x, a):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a


def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` float32 matrix of PyTorch's 1-d bicubic resize.

    ``torch.nn.functional.interpolate(mode="bicubic", align_corners=False)`` with an
    output ``size``: source coordinate ``s = (in/out) * (i + 0.5) - 0.5`` (not clamped),
    taps ``floor(s) - 1 .. floor(s) + 2`` clamped to the border, weights from Keys' cubic
    convolution kernel with ``a = -0.75`` (Keys 1981, Eq. 15), computed in float32 as
    ATen does. Rows sum to one; equal sizes give the identity.

    Args:
        in_size: input length (>= 1).
        out_size: output length (>= 1).

    Returns:
        The resize matrix ``W``: ``y = W @ x`` along the axis.

    Example:
        >>> bicubic_weights(4, 4).tolist() == np.eye(4).tolist()
        True
        >>> [round(float(w), 4) for w in bicubic_weights(2, 4)[0]]
        [1.1055, -0.1055]
    """
    validation.integer("in_size", in_size, minimum=1)
    validation.integer("out_size", out_size, minimum=1)
    f32 = np.float32
    a = f32(-0.75)
    scale = f32(in_size) / f32(out_size)
    src = scale * (np.arange(out_size, dtype=f32) + f32(0.5)) - f32(0.5)
    base = np.floor(src)
    t = (src - base).astype(f32)
    taps = np.stack([_cubic_far(t + f32(1), a), _cubic_near(t, a),
                     _cubic_near(f32(1) - t, a), _cubic_far(f32(2) - t, a)], -1)  # fmt: skip
    index = np.clip(base.astype(np.int64)[:, None] + np.arange(-1, 3), 0, in_size - 1)
    w = np.zeros((out_size, in_size), f32)
    np.add.at(w, (np.repeat(np.arange(out_size), 4), index.ravel()), taps.astype(f32).ravel())
    return w


def torch_bicubic_resize(x, size: tuple[int, int]) -> jax.Array:
    """Resize NHWC ``x`` to ``size`` as PyTorch's bicubic ``interpolate`` does (in float32).

    Equal to ``F.interpolate(x_nchw, size=size, mode="bicubic", align_corners=False)``
    (no antialiasing) on the transposed layout: one :func:`bicubic_weights` matrix per
    axis (Keys 1981 cubic convolution, ``a = -0.75``), applied at full float32 precision.

    Args:
        x: ``(batch, height, width, channels)`` array.
        size: output ``(height, width)``.

    Returns:
        ``(batch, size[0], size[1], channels)`` float32 array.

    Example:
        >>> import jax.numpy as jnp
        >>> torch_bicubic_resize(jnp.ones((1, 4, 4, 2)), (6, 3)).shape
        (1, 6, 3, 2)
    """
    x = jnp.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"x must be NHWC (4-d), got shape {x.shape}")
    if not (isinstance(size, Sequence) and len(size) == 2):
        raise ValueError(f"size must be (height, width), got {size!r}")
    wh = jnp.asarray(bicubic_weights(x.shape[1], size[0]))
    ww = jnp.asarray(bicubic_weights(x.shape[2], size[1]))
    hi = jax.lax.Precision.HIGHEST
    x = x.astype(jnp.float32)
    x = jnp.einsum("oh,bhwc->bowc", wh, x, precision=hi)
    return jnp.einsum("pw,bowc->bopc", ww, x, precision=hi)


# --------------------------------------------------------------------------- modules


class Dinov2Output(NamedTuple):
    """Outputs of :class:`Dinov2Model` (transformers' ``BaseModelOutputWithPooling`` fields).

    ``hidden_states`` (when requested) has ``num_hidden_layers + 1`` entries: the
    embeddings, then each block's output; the last entry is *before* the final layernorm.
    """

    last_hidden_state: jax.Array
    pooler_output: jax.Array
    hidden_states: tuple[jax.Array, ...] | None = None


def _linear(din, dout, *, use_bias=True, dtype, param_dtype, rngs):
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)  # fmt: skip


def _layer_norm(cfg, *, dtype, param_dtype, rngs):
    return nnx.LayerNorm(cfg.hidden_size, epsilon=cfg.layer_norm_eps, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)  # fmt: skip


class Dinov2PatchEmbeddings(nnx.Module):
    """Non-overlapping ``patch_size`` conv (with bias) to ``hidden_size`` channels."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.projection = nnx.Conv(cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_hw,
                                   strides=cfg.patch_hw, padding="VALID", dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs,
                                   conv_general_dilated=conv_general_dilated)  # fmt: skip

    def __call__(self, x):
        return self.projection(x)


class Dinov2Embeddings(nnx.Module):
    """CLS token + patch embeddings + (interpolated) position embeddings.

    Dosovitskiy et al. 2021, Eq. 1: ``z_0 = [x_cls; x_p E] + E_pos``.
    """

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, g = cfg.hidden_size, cfg.grid_size
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), param_dtype))
        self.position_embeddings = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (1, g * g + 1, d), param_dtype)
        )
        self.patch_embeddings = Dinov2PatchEmbeddings(cfg, dtype=dtype, param_dtype=param_dtype,
                                                      rngs=rngs)  # fmt: skip
        self.grid_size = g
        self.dtype = dtype

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> jax.Array:
        """Position table for a ``grid`` of patches, ``(1, gh * gw + 1, hidden)``.

        The native grid returns the table as stored; any other grid resizes the patch
        part in float32 with :func:`torch_bicubic_resize` (transformers'
        ``interpolate_pos_encoding``); the CLS position is kept.
        """
        table = self.position_embeddings[...]
        g = self.grid_size
        if tuple(grid) == (g, g):
            return table.astype(self.dtype)
        patch = table[:, 1:].reshape(1, g, g, -1)
        patch = torch_bicubic_resize(patch, grid).astype(table.dtype)
        patch = patch.reshape(1, grid[0] * grid[1], -1)
        return jnp.concatenate([table[:, :1], patch], axis=1).astype(self.dtype)

    def __call__(self, pixel_values):
        patches = self.patch_embeddings(pixel_values.astype(self.dtype))
        b, gh, gw, d = patches.shape
        patches = patches.reshape(b, gh * gw, d)  # row-major, as torch's flatten(2)
        cls = jnp.broadcast_to(self.cls_token[...].astype(patches.dtype), (b, 1, d))
        h = jnp.concatenate([cls, patches], axis=1)
        return h + self.interpolate_pos_encoding((gh, gw))


class Dinov2Attention(nnx.Module):
    """Multi-head self-attention, ``softmax(q k^T / sqrt(d)) v`` (Vaswani 2017, Eq. 1)."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs, implementation=None):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = cfg.num_attention_heads
        self.head_dim = d // cfg.num_attention_heads
        self.implementation = implementation
        self.q_proj = _linear(d, d, use_bias=cfg.qkv_bias, **kw)
        self.k_proj = _linear(d, d, use_bias=cfg.qkv_bias, **kw)
        self.v_proj = _linear(d, d, use_bias=cfg.qkv_bias, **kw)
        self.o_proj = _linear(d, d, **kw)

    def __call__(self, x):
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        h = attention_core(q, k, v, scale=self.head_dim**-0.5, implementation=self.implementation)
        return self.o_proj(h.astype(q.dtype).reshape(b, t, -1))


class Dinov2LayerScale(nnx.Module):
    """Per-channel residual-branch scale ``lambda1 * x`` (Touvron et al. 2021, CaiT Eq. 4)."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
        del rngs
        self.lambda1 = nnx.Param(jnp.full((cfg.hidden_size,), cfg.layerscale_value, param_dtype))
        self.dtype = dtype

    def __call__(self, x):
        return x * self.lambda1[...].astype(x.dtype)


class Dinov2MLP(nnx.Module):
    """``fc2(act(fc1(x)))`` with ``int(hidden * mlp_ratio)`` inner channels."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.fc1 = _linear(cfg.hidden_size, cfg.mlp_hidden_size, **kw)
        self.fc2 = _linear(cfg.mlp_hidden_size, cfg.hidden_size, **kw)

    def __call__(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Dinov2SwiGLUFFN(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, Eq. 6 with Swish), ViT-g's FFN."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.swiglu_hidden_size
        self.gate_proj = _linear(d, f, **kw)
        self.up_proj = _linear(d, f, **kw)
        self.down_proj = _linear(f, d, **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Dinov2Layer(nnx.Module):
    """``x + ls1(attn(norm1(x)))`` then ``x + ls2(ffn(norm2(x)))`` (drop path: identity)."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs, implementation=None):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = _layer_norm(cfg, **kw)
        self.attention = Dinov2Attention(cfg, implementation=implementation, **kw)
        self.layer_scale1 = Dinov2LayerScale(cfg, **kw)
        self.norm2 = _layer_norm(cfg, **kw)
        self.mlp = Dinov2SwiGLUFFN(cfg, **kw) if cfg.use_swiglu_ffn else Dinov2MLP(cfg, **kw)
        self.layer_scale2 = Dinov2LayerScale(cfg, **kw)

    def __call__(self, x):
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nnx.Module):
    """Stack of :class:`Dinov2Layer`; optionally returns every intermediate state."""

    def __init__(self, cfg: Dinov2Config, *, dtype, param_dtype, rngs, implementation=None):
        self.layer = nnx.List([
            Dinov2Layer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                        implementation=implementation)
            for _ in range(cfg.num_hidden_layers)
        ])  # fmt: skip

    def __call__(self, x, *, output_hidden_states=False):
        states = [x]
        for layer in self.layer:
            x = layer(x)
            states.append(x)
        return x, (tuple(states) if output_hidden_states else None)


class Dinov2Model(nnx.Module):
    """DINOv2 ViT (transformers' ``Dinov2Model``), Flax nnx, **NHWC** input.

    Oquab et al. 2023 (ViT of Dosovitskiy et al. 2021, Eq. 1-4, with layer scale); the
    features are ``layernorm(z_L)``, pooled at the CLS token.

    Args:
        config: :class:`Dinov2Config` or a transformers config dict.
        dtype: compute dtype (``None``: float32).
        param_dtype: parameter storage dtype (``None``: ``dtype``).
        rngs: initialisation rngs (weights are normally overwritten by a checkpoint).
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`
            (``None``: let JAX choose, ``"xla"``, ``"cudnn"``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = {"hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        ...        "image_size": 8, "patch_size": 4}
        >>> out = Dinov2Model(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 12, 8, 3)))
        >>> out.last_hidden_state.shape, out.pooler_output.shape
        ((2, 7, 8), (2, 8))
    """

    def __init__(
        self,
        config,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = None,
        rngs: nnx.Rngs,
        attention_implementation: str | None = None,
    ):
        self.config = cfg = _as_config(config)
        dtype = jnp.float32 if dtype is None else dtype
        param_dtype = dtype if param_dtype is None else param_dtype
        self.dtype = dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embeddings = Dinov2Embeddings(cfg, **kw)
        self.encoder = Dinov2Encoder(cfg, implementation=attention_implementation, **kw)
        self.layernorm = _layer_norm(cfg, **kw)

    def __call__(self, pixel_values, *, output_hidden_states: bool = False) -> Dinov2Output:
        """Run the encoder on normalised images of any size of at least one patch.

        Args:
            pixel_values: ``(batch, height, width, num_channels)`` (NHWC), already
                normalised (see :func:`dinov2_preprocess`). A size other than
                ``image_size`` interpolates the position embeddings; rows and columns
                beyond the last whole patch are dropped, as by the strided conv.
            output_hidden_states: also return every layer's hidden state.

        Returns:
            :class:`Dinov2Output`; ``last_hidden_state`` is ``(batch, 1 + gh * gw,
            hidden)`` with ``gh = height // patch``, ``gw = width // patch``.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> m = Dinov2Model({"hidden_size": 4, "num_hidden_layers": 2,
            ...     "num_attention_heads": 1, "image_size": 8, "patch_size": 4},
            ...     rngs=nnx.Rngs(0))
            >>> len(m(jnp.zeros((1, 8, 8, 3)), output_hidden_states=True).hidden_states)
            3
        """
        cfg = self.config
        ph, pw = cfg.patch_hw
        shape = tuple(getattr(pixel_values, "shape", ()))
        if len(shape) != 4 or shape[3] != cfg.num_channels or shape[1] < ph or shape[2] < pw:
            raise ValueError(
                f"pixel_values must be NHWC of shape (batch, height >= {ph}, width >= {pw}, "
                f"{cfg.num_channels}), got {shape}"
            )
        validation.boolean("output_hidden_states", output_hidden_states)
        h = self.embeddings(jnp.asarray(pixel_values))
        h, states = self.encoder(h, output_hidden_states=output_hidden_states)
        last = self.layernorm(h)
        return Dinov2Output(last, last[:, 0], states)


# --------------------------------------------------------------------------- loading


def load_dinov2(
    folder: str | os.PathLike,
    *,
    dtype: Dtype = None,
    param_dtype: Dtype = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    attention_implementation: str | None = None,
    check_finite: bool = True,
) -> Dinov2Model:
    """Load a DINOv2 encoder from a local transformers folder (e.g. ``facebook/dinov2-base``).

    Reads ``config.json`` and the weights with
    :func:`jaxdiv.models.checkpoint.load_component`; never touches the network. A
    ``Dinov2ForImageClassification`` folder works too (its ``dinov2.`` prefix is stripped
    and the classifier dropped).

    Args:
        folder: folder with ``config.json`` and ``*.safetensors`` (or sharded).
        dtype: compute dtype (``None``: float32): ``jnp.float32``, ``jnp.bfloat16``,
            ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        param_dtype: weight dtype in memory (``None``: ``dtype``), one of the same.
        allow_pickle: permit pickled ``.bin`` weights (see
            :func:`~jaxdiv.models.checkpoint.load_state_dict`).
        variant: weight-file variant such as ``"fp16"``.
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`.
        check_finite: refuse NaN/inf weights and weights that overflow ``param_dtype``,
            naming them (``False`` for a trusted folder).

    Returns:
        The loaded :class:`Dinov2Model` (``model.config`` is its :class:`Dinov2Config`).

    Raises:
        CheckpointError: folder incomplete, weights that do not match the config, or an
            invalid config (naming ``config.json`` and the field).
        TypeError: ``dtype``/``param_dtype`` not a floating dtype, or a flag not a bool.

    Example:
        >>> import tempfile
        >>> import transformers
        >>> cfg = transformers.Dinov2Config(hidden_size=8, num_hidden_layers=1,
        ...     num_attention_heads=2, image_size=8, patch_size=4)
        >>> d = tempfile.mkdtemp()
        >>> transformers.Dinov2Model(cfg).save_pretrained(d)
        >>> load_dinov2(d).config.grid_size
        2
    """
    from jaxdiv.models.checkpoint import load_component

    dtype = float_dtype("dtype", dtype)
    param_dtype = float_dtype("param_dtype", param_dtype)

    def build(config: dict) -> Dinov2Model:
        return Dinov2Model(
            Dinov2Config.from_dict(config),
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
            attention_implementation=attention_implementation,
        )

    model, _ = load_component(folder, build, convert_dinov2_state_dict, allow_pickle=allow_pickle,
                              variant=variant, check_finite=check_finite,
                              kinds=("dinov2",))  # fmt: skip
    return model


# --------------------------------------------------------------------------- preprocessing


# Pillow's fixed-point resampling (libImaging/Resample.c): 8-bit weights carry 22
# fractional bits; bicubic is Keys' kernel with a = -0.5, stretched when downsampling
_PIL_PRECISION_BITS = 22


def _pil_bicubic(x: np.ndarray) -> np.ndarray:
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def pil_bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """``(out_size, in_size)`` int32 matrix of Pillow's 8-bit bicubic resize along one axis.

    Pillow's ``precompute_coeffs`` (Keys 1981 kernel with ``a = -0.5``, support stretched
    by ``in/out`` when downsampling, i.e. antialiased; weights normalised per output) in
    float64, then ``normalize_coeffs_8bpc``'s rounding to 22 fractional bits.

    Args:
        in_size: input length (>= 1).
        out_size: output length (>= 1).

    Returns:
        The fixed-point weights (each row sums to about ``2**22``).

    Example:
        >>> pil_bicubic_weights(3, 3).tolist() == (np.eye(3, dtype=int) << 22).tolist()
        True
    """
    validation.integer("in_size", in_size, minimum=1)
    validation.integer("out_size", out_size, minimum=1)
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    w = np.zeros((out_size, in_size))
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        xmax = min(int(center + support + 0.5), in_size)
        k = _pil_bicubic((np.arange(xmin, xmax) - center + 0.5) * (1.0 / filterscale))
        total = 0.0
        for v in k:  # Pillow's summation order
            total += v
        w[xx, xmin:xmax] = k / total if total != 0.0 else k
    one = float(1 << _PIL_PRECISION_BITS)
    return np.where(w < 0, np.trunc(-0.5 + w * one), np.trunc(0.5 + w * one)).astype(np.int32)


def _pil_resize_axis(x: jax.Array, weights: np.ndarray, axis: int) -> jax.Array:
    """One 8-bit pass: ``clip((sum_k w_k x_k + 2**21) >> 22, 0, 255)`` along ``axis``."""
    spec = "bhwc,oh->bowc" if axis == 1 else "bhwc,ow->bhoc"
    acc = jnp.einsum(spec, x, jnp.asarray(weights), preferred_element_type=jnp.int32)
    acc = jnp.right_shift(acc + (1 << (_PIL_PRECISION_BITS - 1)), _PIL_PRECISION_BITS)
    return jnp.clip(acc, 0, 255)


def dinov2_preprocess(
    images,
    *,
    size: int = 256,
    crop_size: int = 224,
    mean: Sequence[float] = DINOV2_MEAN,
    std: Sequence[float] = DINOV2_STD,
    rescale_factor: float = 1 / 255,
) -> jax.Array:
    """The ``facebook/dinov2-*`` image processor (``BitImageProcessor``) in JAX, NHWC.

    Resize the shortest edge to ``size`` (long edge ``int(size * long / short)``) with
    Pillow's 8-bit bicubic (:func:`pil_bicubic_weights`: horizontal pass, rounding to
    uint8, vertical pass, as ``PIL.Image.resize``), centre crop ``crop_size`` (offsets
    ``(H - crop) // 2``), rescale by ``rescale_factor`` (in float64, then float32) and
    ``(x - mean) / std`` in float32, all as transformers' PIL backend computes them. Not
    differentiable (uint8 input); for FD-DINOv2 / Vendi / PRDC on saved images.

    Args:
        images: ``(batch, height, width, 3)`` uint8 RGB images of one size.
        size: target of the shortest edge.
        crop_size: side of the square centre crop (<= ``size``).
        mean: per-channel mean (ImageNet's).
        std: per-channel standard deviation (ImageNet's).
        rescale_factor: multiplies the uint8 values.

    Returns:
        ``(batch, crop_size, crop_size, 3)`` float32, ready for :class:`Dinov2Model`.

    Example:
        >>> import numpy as np
        >>> x = np.full((2, 300, 400, 3), 128, np.uint8)
        >>> out = dinov2_preprocess(x)
        >>> out.shape, round(float(out[0, 0, 0, 0]), 4)  # (128/255 - 0.485) / 0.229
        ((2, 224, 224, 3), 0.0741)
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != jnp.uint8:
        raise ValueError(
            f"images must be uint8 NHWC RGB of shape (batch, height, width, 3), got shape "
            f"{x.shape} and dtype {x.dtype}"
        )
    validation.integer("size", size, minimum=1)
    validation.integer("crop_size", crop_size, minimum=1, maximum=size)
    mean, std = channel_stats(mean, std)
    _, h, w, _ = x.shape
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    nh, nw = (new_long, size) if w <= h else (size, new_long)
    x = x.astype(jnp.int32)
    if nw != w:
        x = _pil_resize_axis(x, pil_bicubic_weights(w, nw), axis=2)
    if nh != h:
        x = _pil_resize_axis(x, pil_bicubic_weights(h, nh), axis=1)
    top, left = (nh - crop_size) // 2, (nw - crop_size) // 2
    x = x[:, top : top + crop_size, left : left + crop_size]
    # every uint8 value's output, computed with numpy's float64/float32 steps
    scaled = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean32, std32 = np.asarray(mean, np.float32)[:, None], np.asarray(std, np.float32)[:, None]
    lut = (scaled[None] - mean32) / std32  # (3, 256)
    return jnp.asarray(lut)[jnp.arange(3), x]
