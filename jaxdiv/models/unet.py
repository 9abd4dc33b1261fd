"""Stable Diffusion 1.x / 2.x ``UNet2DConditionModel`` in Flax nnx, loaded from diffusers.

Mirrors ``diffusers.models.unets.unet_2d_condition.UNet2DConditionModel`` (diffusers
0.42) for the configurations SD 1.x and 2.x use: positional (sinusoidal) time embedding,
``CrossAttnDownBlock2D`` / ``DownBlock2D`` down blocks, ``UNetMidBlock2DCrossAttn``,
``CrossAttnUpBlock2D`` / ``UpBlock2D`` up blocks, cross-attention width per block,
``attention_head_dim`` as an int or per-block list, linear or 1x1-conv transformer
projections, ``upcast_attention``. Other diffusers options (class / addition embeddings,
``scale_shift`` resnets, dual or only-cross attention, GLIGEN, ...) are rejected by
:meth:`UNetConfig.from_dict` with an error naming the config key.

Public layout is **NCHW**, as in diffusers; the model transposes to NHWC internally.

Note the diffusers naming quirk kept for compatibility: in this UNet's config,
``attention_head_dim`` is the **number of heads** per block (head width is
``channels // heads``), see diffusers issue #2011.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import config_field, config_list, float_dtype
from jaxdiv.models.conversion import convert_unet_state_dict
from jaxdiv.models.layers import (
    ACTIVATIONS,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    conv2d,
    get_activation,
    timestep_embedding,
)

__all__ = [
    "UNet2DConditionModel",
    "UNetConfig",
    "load_unet",
]

Dtype = Any

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Config keys whose non-default values select diffusers features this port does not have.
# key -> the only supported value(s).
_UNSUPPORTED = {
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "resnet_time_scale_shift": ("default",),
    "dual_cross_attention": (False,),
    "only_cross_attention": (False,),
    "attention_type": ("default",),
    "num_attention_heads": (None,),
    "cross_attention_norm": (None,),
    "class_embeddings_concat": (False,),
    "reverse_transformer_layers_per_block": (None,),
}


def _per_block(value: Any, n: int, key: str) -> tuple:
    if isinstance(value, list | tuple):
        if len(value) != n:
            raise ValueError(
                f"config[{key!r}] must have one entry per down block ({n}), got {list(value)}"
            )
        return tuple(value)
    return (value,) * n


def _positive_int(value: Any, key: str) -> int:
    return validation.integer(f"config[{key!r}]", value, minimum=1)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The subset of a diffusers ``UNet2DConditionModel`` config this port uses.

    Per-block fields are expanded to tuples (one entry per down block). Build it from a
    diffusers ``config.json`` with :meth:`from_dict`.

    Example:
        >>> cfg = UNetConfig.from_dict({"block_out_channels": [32, 64],
        ...     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        ...     "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 8})
        >>> cfg.num_heads, cfg.time_embed_dim
        ((2, 2), 128)
    """

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int | tuple[int, int] | None = None
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: tuple[int, ...] = (2, 2, 2, 2)
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: tuple[int, ...] = (1280,) * 4
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1, 1)
    num_heads: tuple[int, ...] = (8, 8, 8, 8)
    use_linear_projection: bool = False
    upcast_attention: bool = False
    time_embedding_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3

    @property
    def time_embed_dim(self) -> int:
        """Width of the time embedding MLP (``4 * block_out_channels[0]`` by default)."""
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @classmethod
    def from_dict(cls, config: dict) -> UNetConfig:
        """Parse and validate a diffusers ``UNet2DConditionModel`` ``config.json`` dict.

        Missing keys take diffusers' defaults; keys starting with ``_`` are ignored.

        Args:
            config: the parsed ``config.json``.

        Returns:
            The validated config.

        Raises:
            TypeError: ``config`` is not a dict, or a field holds a value of the wrong type
                (a non-integer, a non-bool flag, a string for a list), naming the key.
            ValueError: an unsupported feature or an out-of-range or inconsistent value
                (``norm_eps`` must be finite and > 0), naming the key.

        Example:
            >>> UNetConfig.from_dict({}).block_out_channels
            (320, 640, 1280, 1280)
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        for key, allowed in _UNSUPPORTED.items():
            value = config.get(key, allowed[0])
            if isinstance(value, list):
                value = tuple(value)
            if key == "only_cross_attention" and isinstance(value, tuple):
                value = any(value)
            if value not in allowed:
                raise ValueError(
                    f"config[{key!r}] = {value!r} is not supported by this UNet port "
                    f"(SD 1.x/2.x need {allowed[0]!r})"
                )
        d = cls()
        down = config_list(config, "down_block_types", d.down_block_types)
        up = config_list(config, "up_block_types", d.up_block_types)
        for key, types in (("down_block_types", down), ("up_block_types", up)):
            if not all(isinstance(t, str) for t in types):
                raise TypeError(f"config[{key!r}] must be a list of block type names, got "
                                f"{list(types)}")  # fmt: skip
        down = tuple(t[7:] if t.startswith("UNetRes") else t for t in down)
        up = tuple(t[7:] if t.startswith("UNetRes") else t for t in up)
        for key, types, known in (
            ("down_block_types", down, DOWN_BLOCK_TYPES),
            ("up_block_types", up, UP_BLOCK_TYPES),
        ):
            bad = [t for t in types if t not in known]
            if bad:
                raise ValueError(f"config[{key!r}] may only hold {known}, got {list(types)}")
        n = len(down)
        if n == 0 or len(up) != n:
            raise ValueError(
                "config['down_block_types'] and config['up_block_types'] must be non-empty and "
                f"of equal length, got {len(down)} and {len(up)}"
            )
        mid = config.get("mid_block_type", d.mid_block_type)
        if mid not in ("UNetMidBlock2DCrossAttn", None):
            raise ValueError(
                f"config['mid_block_type'] must be 'UNetMidBlock2DCrossAttn' or None, got {mid!r}"
            )
        channels = tuple(
            _positive_int(c, "block_out_channels")
            for c in config_list(config, "block_out_channels", d.block_out_channels)
        )
        if len(channels) != n:
            raise ValueError(
                f"config['block_out_channels'] must have {n} entries (one per down block), "
                f"got {list(channels)}"
            )
        groups = config.get("norm_num_groups", d.norm_num_groups)
        if groups is None:
            raise ValueError("config['norm_num_groups'] = None is not supported (SD uses 32)")
        groups = _positive_int(groups, "norm_num_groups")
        act = config.get("act_fn", d.act_fn)
        act = validation.choice("config['act_fn']", act, sorted(ACTIVATIONS))
        tlayers = _per_block(
            config.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
        )
        tlayers = tuple(_positive_int(t, "transformer_layers_per_block") for t in tlayers)
        heads = _per_block(config.get("attention_head_dim", 8), n, "attention_head_dim")
        heads = tuple(_positive_int(h, "attention_head_dim") for h in heads)
        for c, h, t in zip(channels, heads, down, strict=True):
            if t.startswith("CrossAttn") and c % h:
                raise ValueError(
                    f"config['attention_head_dim'] (number of heads) {h} must divide the block "
                    f"width {c}"
                )
        cross = _per_block(config.get("cross_attention_dim", 1280), n, "cross_attention_dim")
        for c in channels:
            if c % groups:
                raise ValueError(
                    f"config['norm_num_groups'] = {groups} must divide every block width, "
                    f"got {list(channels)}"
                )
        sample_size = config.get("sample_size")
        if isinstance(sample_size, list | tuple):
            sample_size = tuple(_positive_int(v, "sample_size") for v in sample_size)
        elif sample_size is not None:
            sample_size = _positive_int(sample_size, "sample_size")
        flag = lambda key, default: config_field(config, key, default, validation.boolean)
        real = lambda key, default, **bounds: config_field(config, key, default,
                                                           validation.number, **bounds)  # fmt: skip
        time_dim = config.get("time_embedding_dim")
        if time_dim is not None:
            time_dim = _positive_int(time_dim, "time_embedding_dim")
        return cls(
            in_channels=_positive_int(config.get("in_channels", 4), "in_channels"),
            out_channels=_positive_int(config.get("out_channels", 4), "out_channels"),
            sample_size=sample_size,
            center_input_sample=flag("center_input_sample", False),
            flip_sin_to_cos=flag("flip_sin_to_cos", True),
            freq_shift=real("freq_shift", 0),
            down_block_types=down,
            mid_block_type=mid,
            up_block_types=up,
            block_out_channels=channels,
            layers_per_block=tuple(
                _positive_int(v, "layers_per_block")
                for v in _per_block(config.get("layers_per_block", 2), n, "layers_per_block")
            ),
            downsample_padding=config_field(config, "downsample_padding", 1, validation.integer,
                                            minimum=0),  # fmt: skip
            mid_block_scale_factor=real("mid_block_scale_factor", 1.0),
            act_fn=act,
            norm_num_groups=groups,
            norm_eps=real("norm_eps", 1e-5, lo=0, lo_open=True),
            cross_attention_dim=tuple(_positive_int(c, "cross_attention_dim") for c in cross),
            transformer_layers_per_block=tlayers,
            num_heads=heads,
            use_linear_projection=flag("use_linear_projection", False),
            upcast_attention=flag("upcast_attention", False),
            time_embedding_dim=time_dim,
            conv_in_kernel=_positive_int(config.get("conv_in_kernel", 3), "conv_in_kernel"),
            conv_out_kernel=_positive_int(config.get("conv_out_kernel", 3), "conv_out_kernel"),
        )


def _transformer(cfg: UNetConfig, i: int, channels: int, kw: dict, impl: str | None):
    return Transformer2DModel(
        cfg.num_heads[i],
        channels // cfg.num_heads[i],
        channels,
        cross_attention_dim=cfg.cross_attention_dim[i],
        num_layers=cfg.transformer_layers_per_block[i],
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=cfg.use_linear_projection,
        upcast_attention=cfg.upcast_attention,
        attention_implementation=impl,
        **kw,
    )


class DownBlock(nnx.Module):
    """``CrossAttnDownBlock2D`` (with ``attentions``) or ``DownBlock2D`` (without).

    Each layer is a :class:`~jaxdiv.models.layers.ResnetBlock2D` optionally followed by a
    :class:`~jaxdiv.models.layers.Transformer2DModel`; every layer output and the
    downsampled output are kept as skip connections.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = UNetConfig.from_dict({"block_out_channels": [8], "norm_num_groups": 4,
        ...     "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]})
        >>> blk = DownBlock(cfg, 0, 8, 8, 32, add_downsample=True, rngs=nnx.Rngs(0))
        >>> h, skips = blk(jnp.ones((1, 4, 4, 8)), jnp.ones((1, 32)), None)
        >>> h.shape, len(skips)
        ((1, 2, 2, 8), 3)
    """

    def __init__(
        self,
        cfg: UNetConfig,
        index: int,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        add_downsample: bool,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        cross = cfg.down_block_types[index] == "CrossAttnDownBlock2D"
        n = cfg.layers_per_block[index]
        self.resnets = nnx.List(
            [
                ResnetBlock2D(
                    in_channels if j == 0 else out_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    act_fn=cfg.act_fn,
                    **kw,
                )
                for j in range(n)
            ]
        )
        self.attentions = (
            nnx.List(
                [
                    _transformer(cfg, index, out_channels, kw, attention_implementation)
                    for _ in range(n)
                ]
            )
            if cross
            else None
        )
        self.downsampler = (
            Downsample2D(out_channels, padding=cfg.downsample_padding, **kw)
            if add_downsample
            else None
        )

    def __call__(
        self, x: jax.Array, temb: jax.Array, context: jax.Array | None
    ) -> tuple[jax.Array, tuple[jax.Array, ...]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsampler is not None:
            x = self.downsampler(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nnx.Module):
    """``UNetMidBlock2DCrossAttn``: resnet, then (transformer, resnet) per layer.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = UNetConfig.from_dict({"block_out_channels": [8], "norm_num_groups": 4,
        ...     "attention_head_dim": 2, "cross_attention_dim": 6,
        ...     "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]})
        >>> mid = MidBlock(cfg, 8, 32, rngs=nnx.Rngs(0))
        >>> mid(jnp.ones((1, 2, 2, 8)), jnp.ones((1, 32)), jnp.ones((1, 3, 6))).shape
        (1, 2, 2, 8)
    """

    def __init__(
        self,
        cfg: UNetConfig,
        channels: int,
        temb_channels: int,
        *,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rkw = dict(
            temb_channels=temb_channels,
            groups=cfg.norm_num_groups,
            eps=cfg.norm_eps,
            act_fn=cfg.act_fn,
            output_scale_factor=cfg.mid_block_scale_factor,
            **kw,
        )
        last = len(cfg.block_out_channels) - 1
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **rkw) for _ in range(2)])
        self.attentions = nnx.List(
            [_transformer(cfg, last, channels, kw, attention_implementation)]
        )

    def __call__(self, x: jax.Array, temb: jax.Array, context: jax.Array) -> jax.Array:
        x = self.resnets[0](x, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:], strict=True):
            x = resnet(attn(x, context), temb)
        return x


class UpBlock(nnx.Module):
    """``CrossAttnUpBlock2D`` (with ``attentions``) or ``UpBlock2D`` (without).

    Each layer concatenates the last unused skip connection on the channel axis, applies
    a resnet (and a transformer); an optional nearest-neighbour upsampler follows.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = UNetConfig.from_dict({"block_out_channels": [8], "norm_num_groups": 4,
        ...     "layers_per_block": 1,
        ...     "down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"]})
        >>> blk = UpBlock(cfg, 0, 8, 8, 8, 32, add_upsample=False, rngs=nnx.Rngs(0))
        >>> skips = (jnp.ones((1, 2, 2, 8)),) * 2
        >>> blk(jnp.ones((1, 2, 2, 8)), skips, jnp.ones((1, 32)), None, None).shape
        (1, 2, 2, 8)
    """

    def __init__(
        self,
        cfg: UNetConfig,
        index: int,
        in_channels: int,
        prev_output_channels: int,
        out_channels: int,
        temb_channels: int,
        *,
        add_upsample: bool,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = len(cfg.block_out_channels) - 1 - index  # the matching down block
        cross = cfg.up_block_types[index] == "CrossAttnUpBlock2D"
        n = cfg.layers_per_block[rev] + 1
        resnets = []
        for j in range(n):
            skip_channels = in_channels if j == n - 1 else out_channels
            res_in = prev_output_channels if j == 0 else out_channels
            resnets.append(
                ResnetBlock2D(
                    res_in + skip_channels,
                    out_channels,
                    temb_channels=temb_channels,
                    groups=cfg.norm_num_groups,
                    eps=cfg.norm_eps,
                    act_fn=cfg.act_fn,
                    **kw,
                )
            )
        self.resnets = nnx.List(resnets)
        self.attentions = (
            nnx.List(
                [
                    _transformer(cfg, rev, out_channels, kw, attention_implementation)
                    for _ in range(n)
                ]
            )
            if cross
            else None
        )
        self.upsampler = Upsample2D(out_channels, **kw) if add_upsample else None

    def __call__(
        self,
        x: jax.Array,
        skips: tuple[jax.Array, ...],
        temb: jax.Array,
        context: jax.Array | None,
        upsample_size: tuple[int, int] | None,
    ) -> jax.Array:
        for j, resnet in enumerate(self.resnets):
            x = jnp.concatenate([x, skips[-1 - j]], axis=-1)
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsampler is not None:
            x = self.upsampler(x, upsample_size)
        return x


class UNet2DConditionModel(nnx.Module):
    """The SD 1.x / 2.x conditional UNet: ``eps_or_v = unet(x_t, t, text_states)``.

    Ronneberger et al. (2015) U-Net with the LDM conditioning of Rombach et al. (2022),
    Sec. 3.3 (cross-attention to the text encoder's hidden states), as diffusers'
    ``UNet2DConditionModel``.

    Args:
        config: a :class:`UNetConfig` (or a diffusers config dict, parsed with
            :meth:`UNetConfig.from_dict`).
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
        param_dtype: parameter dtype (default: ``dtype``).
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`
            (``None``/``"xla"``, or ``"cudnn"`` for the fused GPU kernel in bf16/fp16).
        rngs: initialisation keys (weights are normally overwritten by :func:`load_unet`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> config = {"block_out_channels": [32, 64],
        ...     "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        ...     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "layers_per_block": 1,
        ...     "cross_attention_dim": 16, "attention_head_dim": 2, "norm_num_groups": 8}
        >>> # shapes only (random initialisation op by op takes seconds; load_unet fills
        >>> # the weights of such an abstract model from a checkpoint)
        >>> from jaxdiv.models.layers import pure
        >>> unet = pure(nnx.eval_shape(lambda: UNet2DConditionModel(config, rngs=nnx.Rngs(0))))
        >>> jax.eval_shape(unet.apply, unet.params, jnp.zeros((2, 4, 8, 8)), jnp.array([10, 500]),
        ...                jnp.zeros((2, 7, 16))).shape
        (2, 4, 8, 8)
    """

    def __init__(
        self,
        config: UNetConfig | dict,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype | None = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = config if isinstance(config, UNetConfig) else UNetConfig.from_dict(config)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels
        impl = attention_implementation
        self.config = cfg
        self.dtype = dtype
        self.conv_in = conv2d(
            cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=(cfg.conv_in_kernel - 1) // 2, **kw
        )
        temb = cfg.time_embed_dim
        self.time_embedding = TimestepEmbedding(ch[0], temb, act_fn=cfg.act_fn, **kw)
        n = len(ch)
        self.down_blocks = nnx.List(
            [
                DownBlock(
                    cfg,
                    i,
                    ch[max(i - 1, 0)],
                    ch[i],
                    temb,
                    add_downsample=i < n - 1,
                    attention_implementation=impl,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.mid_block = (
            MidBlock(cfg, ch[-1], temb, attention_implementation=impl, **kw)
            if cfg.mid_block_type is not None
            else None
        )
        rev = ch[::-1]
        self.up_blocks = nnx.List(
            [
                UpBlock(
                    cfg,
                    i,
                    rev[min(i + 1, n - 1)],
                    rev[max(i - 1, 0)],
                    rev[i],
                    temb,
                    add_upsample=i < n - 1,
                    attention_implementation=impl,
                    **kw,
                )
                for i in range(n)
            ]
        )
        self.conv_norm_out = GroupNorm(
            cfg.norm_num_groups, ch[0], eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype
        )
        self.conv_out = conv2d(
            ch[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            padding=(cfg.conv_out_kernel - 1) // 2,
            **kw,
        )

    def __call__(
        self, sample: jax.Array, timesteps: jax.Array | float, encoder_hidden_states: jax.Array
    ) -> jax.Array:
        """Predict the noise (or v) for a batch of latents.

        Args:
            sample: noisy latents, NCHW ``(B, in_channels, H, W)``.
            timesteps: diffusion timesteps (DDPM scale, e.g. 0..999), a scalar or ``(B,)``.
            encoder_hidden_states: text-encoder hidden states ``(B, S, cross_attention_dim)``.

        Returns:
            The prediction, NCHW ``(B, out_channels, H, W)``, in the compute dtype.
        """
        cfg = self.config
        sample = jnp.asarray(sample)
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(
                f"sample must be NCHW with {cfg.in_channels} channels, got shape {sample.shape}"
            )
        b = sample.shape[0]
        context = jnp.asarray(encoder_hidden_states)
        if context.ndim != 3 or context.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states must be (B={b}, S, D), got shape {context.shape}"
            )
        if any(context.shape[-1] != c for c in cfg.cross_attention_dim):
            raise ValueError(
                "encoder_hidden_states last axis must be cross_attention_dim="
                f"{cfg.cross_attention_dim[0]}, got {context.shape[-1]}"
            )
        t = jnp.asarray(timesteps, jnp.float32).reshape(-1)
        if t.shape[0] not in (1, b):
            raise ValueError(f"timesteps must be a scalar or shape ({b},), got {t.shape}")
        t = jnp.broadcast_to(t, (b,))

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(self.dtype)
        context = context.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        t_emb = timestep_embedding(
            t,
            cfg.block_out_channels[0],
            flip_sin_to_cos=cfg.flip_sin_to_cos,
            freq_shift=cfg.freq_shift,
        ).astype(self.dtype)
        emb = self.time_embedding(t_emb)

        x = self.conv_in(x)
        skips: tuple[jax.Array, ...] = (x,)
        for block in self.down_blocks:
            x, res = block(x, emb, context)
            skips = skips + res
        if self.mid_block is not None:
            x = self.mid_block(x, emb, context)
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res, skips = skips[-n_res:], skips[:-n_res]
            # Upsample to the next skip's size: equal to 2x when H, W divide 2**(levels-1),
            # and diffusers' `forward_upsample_size` behaviour otherwise.
            size = tuple(skips[-1].shape[1:3]) if i < len(self.up_blocks) - 1 else None
            x = block(x, res, emb, context, size)
        x = get_activation(cfg.act_fn)(self.conv_norm_out(x))
        x = self.conv_out(x)
        return jnp.transpose(x, (0, 3, 1, 2))


def load_unet(
    folder: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    allow_pickle: bool = False,
    variant: str | None = None,
    check_finite: bool = True,
    attention_implementation: str | None = None,
) -> UNet2DConditionModel:
    """Load a diffusers ``UNet2DConditionModel`` component folder (e.g. ``<sd>/unet``).

    Reads ``config.json`` and the safetensors weights (single file or sharded) with
    :func:`jaxdiv.models.checkpoint.load_component`; never touches the network.

    Args:
        folder: local ``unet`` folder.
        dtype: compute and parameter dtype: ``jnp.float32`` (``None``), ``jnp.bfloat16``,
            ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        allow_pickle: accept pickled ``.bin`` weights when no safetensors exist.
        variant: weight-file variant such as ``"fp16"``.
        check_finite: refuse NaN/inf weights and weights that overflow ``dtype``, naming
            them (``False`` for a trusted folder).
        attention_implementation: see :class:`UNet2DConditionModel`.

    Returns:
        The loaded model (``model.config`` is the parsed :class:`UNetConfig`).

    Raises:
        CheckpointError: missing folder/config/weights, weights that do not match, or an
            unsupported config (naming ``config.json`` and the key; a config value of the
            wrong type raises a CheckpointError that is also a TypeError).
        TypeError: ``dtype`` is not a floating dtype, or a flag is not a bool.

    Example:
        >>> import tempfile
        >>> from diffusers import UNet2DConditionModel as TorchUNet
        >>> d = tempfile.mkdtemp()
        >>> TorchUNet(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
        ...     down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        ...     up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).save_pretrained(d)
        >>> load_unet(d).config.block_out_channels
        (32, 64)
    """
    from jaxdiv.models.checkpoint import load_component

    dtype = float_dtype("dtype", jnp.float32 if dtype is None else dtype)

    def build(config: dict) -> UNet2DConditionModel:
        return UNet2DConditionModel(
            UNetConfig.from_dict(config),
            dtype=dtype,
            attention_implementation=attention_implementation,
            rngs=nnx.Rngs(0),
        )

    model, _ = load_component(
        folder,
        build,
        convert_unet_state_dict,
        allow_pickle=allow_pickle,
        dtype=dtype,
        variant=variant,
        check_finite=check_finite,
        kinds=("UNet2DConditionModel",),
    )
    return model
