"""``AutoencoderKL`` (the Stable Diffusion VAE) in Flax nnx, loaded from diffusers.

Mirrors ``diffusers.models.autoencoders.autoencoder_kl.AutoencoderKL`` with its
``Encoder``/``Decoder`` (``autoencoders/vae.py``, diffusers 0.42): ``DownEncoderBlock2D`` /
``UpDecoderBlock2D`` blocks, a mid block with one single-head spatial attention,
optional 1x1 ``quant_conv`` / ``post_quant_conv`` (``use_quant_conv`` /
``use_post_quant_conv``), any ``latent_channels`` (4 for SD 1.x/2.x, 16 for SD3), and the
latent ``scaling_factor`` / ``shift_factor`` from the config.

Public layout is **NCHW**, as in diffusers; the model transposes to NHWC internally.
Images are in ``[-1, 1]``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import config_field, config_list, float_dtype
from jaxdiv.models.conversion import convert_vae_state_dict
from jaxdiv.models.layers import (
    ACTIVATIONS,
    Attention,
    Downsample2D,
    GroupNorm,
    ResnetBlock2D,
    Upsample2D,
    conv2d,
    get_activation,
)

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "VAEConfig",
    "load_vae",
]

Dtype = Any

_EPS = 1e-6  # diffusers' Encoder/Decoder hard-code GroupNorm eps 1e-6


class DiagonalGaussian(NamedTuple):
    """The VAE posterior ``q(z | x) = N(mean, exp(logvar))`` (NCHW arrays).

    Kingma & Welling (2014), Sec. 2.4 (reparameterisation ``z = mean + std * eps``);
    ``logvar`` is clamped to ``[-30, 20]`` as in diffusers ``DiagonalGaussianDistribution``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> post = DiagonalGaussian(jnp.zeros((1, 4, 2, 2)), jnp.zeros((1, 4, 2, 2)))
        >>> post.sample(jax.random.key(0)).shape, float(post.std.mean())
        ((1, 4, 2, 2), 1.0)
    """

    mean: jax.Array
    logvar: jax.Array

    @property
    def std(self) -> jax.Array:
        """``exp(logvar / 2)``."""
        return jnp.exp(0.5 * self.logvar)

    def mode(self) -> jax.Array:
        """The posterior mode (= mean), what SD pipelines use for image-to-latent."""
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """Draw ``mean + std * eps`` with ``eps ~ N(0, I)`` from ``key``."""
        eps = jax.random.normal(key, self.mean.shape, jnp.float32).astype(self.mean.dtype)
        return self.mean + self.std * eps


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """The diffusers ``AutoencoderKL`` config fields this port uses.

    Example:
        >>> cfg = VAEConfig.from_dict({"block_out_channels": [32, 64], "norm_num_groups": 8,
        ...     "down_block_types": ["DownEncoderBlock2D"] * 2,
        ...     "up_block_types": ["UpDecoderBlock2D"] * 2, "latent_channels": 16})
        >>> cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor
        (16, 0.18215, 0.0)
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_dict(cls, config: dict) -> VAEConfig:
        """Parse and validate a diffusers ``AutoencoderKL`` ``config.json`` dict.

        Missing keys take diffusers' defaults; ``shift_factor: null`` means 0.

        Args:
            config: the parsed ``config.json``.

        Returns:
            The validated config.

        Raises:
            TypeError: ``config`` is not a dict, or a field holds a value of the wrong type
                (a non-integer, a non-bool flag, a string for a list), naming the key.
            ValueError: an unsupported block type or an out-of-range or inconsistent value
                (``scaling_factor`` must be finite and > 0), naming the key.

        Example:
            >>> VAEConfig.from_dict({"scaling_factor": 1.5305, "shift_factor": 0.0609}).shift_factor
            0.0609
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        d = cls()
        channels = config_list(config, "block_out_channels", d.block_out_channels)
        n = len(channels)
        if n == 0:
            raise ValueError("config['block_out_channels'] must not be empty")
        channels = tuple(
            validation.integer("config['block_out_channels']", c, minimum=1) for c in channels
        )
        for key, want in (
            ("down_block_types", "DownEncoderBlock2D"),
            ("up_block_types", "UpDecoderBlock2D"),
        ):
            types = list(config_list(config, key, [want] * n))
            if types != [want] * n:
                raise ValueError(
                    f"config[{key!r}] must be {n} x {want!r} (one per block_out_channels entry), "
                    f"got {types}"
                )
        groups = config.get("norm_num_groups", d.norm_num_groups)
        groups = validation.integer("config['norm_num_groups']", groups, minimum=1)
        if any(c % groups for c in channels):
            raise ValueError(
                f"config['norm_num_groups'] must divide every block width {list(channels)}, "
                f"got {groups}"
            )
        act = config.get("act_fn", d.act_fn)
        act = validation.choice("config['act_fn']", act, sorted(ACTIVATIONS))
        layers = config.get("layers_per_block", d.layers_per_block)
        layers = validation.integer("config['layers_per_block']", layers, minimum=1)
        latent = config.get("latent_channels", d.latent_channels)
        latent = validation.integer("config['latent_channels']", latent, minimum=1)
        sample_size = config.get("sample_size", d.sample_size)
        if isinstance(sample_size, list):
            sample_size = tuple(sample_size)
        count = lambda key, default: config_field(config, key, default, validation.integer,
                                                  minimum=1)  # fmt: skip
        flag = lambda key: config_field(config, key, True, validation.boolean)
        shift = config.get("shift_factor")  # null means 0, as in diffusers
        shift = 0.0 if shift is None else validation.number("config['shift_factor']", shift)
        return cls(
            in_channels=count("in_channels", 3),
            out_channels=count("out_channels", 3),
            block_out_channels=channels,
            layers_per_block=layers,
            act_fn=act,
            latent_channels=latent,
            norm_num_groups=groups,
            sample_size=sample_size,
            scaling_factor=config_field(config, "scaling_factor", d.scaling_factor,
                                        validation.number, lo=0, lo_open=True),  # fmt: skip
            shift_factor=shift,
            use_quant_conv=flag("use_quant_conv"),
            use_post_quant_conv=flag("use_post_quant_conv"),
            mid_block_add_attention=flag("mid_block_add_attention"),
        )


class VAEMidBlock(nnx.Module):
    """``UNetMidBlock2D`` of the VAE: resnet, single-head attention, resnet (no time input).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> mid = VAEMidBlock(8, groups=4, act_fn="silu", add_attention=True, rngs=nnx.Rngs(0))
        >>> mid(jnp.ones((1, 3, 3, 8))).shape
        (1, 3, 3, 8)
    """

    def __init__(
        self,
        channels: int,
        *,
        groups: int,
        act_fn: str,
        add_attention: bool,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rkw = dict(temb_channels=None, groups=groups, eps=_EPS, act_fn=act_fn, **kw)
        self.resnets = nnx.List([ResnetBlock2D(channels, channels, **rkw) for _ in range(2)])
        self.attentions = (
            nnx.List(
                [
                    Attention(
                        channels,
                        heads=1,
                        dim_head=channels,
                        bias=True,
                        norm_num_groups=groups,
                        eps=_EPS,
                        residual_connection=True,
                        **kw,
                    )
                ]
            )
            if add_attention
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nnx.Module):
    """``DownEncoderBlock2D``: resnets, then an optional downsampler (bottom/right pad).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> blk = EncoderBlock(4, 8, num_layers=1, groups=4, act_fn="silu", add_downsample=True,
        ...                    rngs=nnx.Rngs(0))
        >>> blk(jnp.ones((1, 6, 6, 4))).shape
        (1, 3, 3, 8)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        act_fn: str,
        add_downsample: bool,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rkw = dict(temb_channels=None, groups=groups, eps=_EPS, act_fn=act_fn, **kw)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, **rkw)
                for j in range(num_layers)
            ]
        )
        self.downsampler = Downsample2D(out_channels, padding=0, **kw) if add_downsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsampler is None else self.downsampler(x)


class DecoderBlock(nnx.Module):
    """``UpDecoderBlock2D``: resnets, then an optional nearest 2x upsampler.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> blk = DecoderBlock(8, 4, num_layers=2, groups=4, act_fn="silu", add_upsample=True,
        ...                    rngs=nnx.Rngs(0))
        >>> blk(jnp.ones((1, 3, 3, 8))).shape
        (1, 6, 6, 4)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        num_layers: int,
        groups: int,
        act_fn: str,
        add_upsample: bool,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rkw = dict(temb_channels=None, groups=groups, eps=_EPS, act_fn=act_fn, **kw)
        self.resnets = nnx.List(
            [
                ResnetBlock2D(in_channels if j == 0 else out_channels, out_channels, **rkw)
                for j in range(num_layers)
            ]
        )
        self.upsampler = Upsample2D(out_channels, **kw) if add_upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
    """VAE encoder: image (NHWC) -> posterior moments ``[mean, logvar]`` (NHWC, 2L channels).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = VAEConfig.from_dict({"block_out_channels": [8, 8], "norm_num_groups": 4,
        ...     "down_block_types": ["DownEncoderBlock2D"] * 2,
        ...     "up_block_types": ["UpDecoderBlock2D"] * 2})
        >>> Encoder(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 3))).shape
        (1, 4, 4, 8)
    """

    def __init__(
        self,
        cfg: VAEConfig,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        ch = cfg.block_out_channels
        g = cfg.norm_num_groups
        self.conv_in = conv2d(cfg.in_channels, ch[0], 3, padding=1, **kw)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(
                    ch[max(i - 1, 0)],
                    ch[i],
                    num_layers=cfg.layers_per_block,
                    groups=g,
                    act_fn=cfg.act_fn,
                    add_downsample=i < len(ch) - 1,
                    **kw,
                )
                for i in range(len(ch))
            ]
        )
        self.mid_block = VAEMidBlock(
            ch[-1], groups=g, act_fn=cfg.act_fn, add_attention=cfg.mid_block_add_attention, **kw
        )
        self.conv_norm_out = GroupNorm(g, ch[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """VAE decoder: latents (NHWC, L channels) -> image (NHWC).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = VAEConfig.from_dict({"block_out_channels": [8, 8], "norm_num_groups": 4,
        ...     "down_block_types": ["DownEncoderBlock2D"] * 2,
        ...     "up_block_types": ["UpDecoderBlock2D"] * 2})
        >>> Decoder(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 4, 4))).shape
        (1, 8, 8, 3)
    """

    def __init__(
        self,
        cfg: VAEConfig,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rev = cfg.block_out_channels[::-1]
        g = cfg.norm_num_groups
        self.conv_in = conv2d(cfg.latent_channels, rev[0], 3, padding=1, **kw)
        self.mid_block = VAEMidBlock(
            rev[0], groups=g, act_fn=cfg.act_fn, add_attention=cfg.mid_block_add_attention, **kw
        )
        self.up_blocks = nnx.List(
            [
                DecoderBlock(
                    rev[max(i - 1, 0)],
                    rev[i],
                    num_layers=cfg.layers_per_block + 1,
                    groups=g,
                    act_fn=cfg.act_fn,
                    add_upsample=i < len(rev) - 1,
                    **kw,
                )
                for i in range(len(rev))
            ]
        )
        self.conv_norm_out = GroupNorm(g, rev[-1], eps=_EPS, dtype=dtype, param_dtype=param_dtype)
        self.conv_out = conv2d(rev[-1], cfg.out_channels, 3, padding=1, **kw)
        self.act_fn = cfg.act_fn

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(get_activation(self.act_fn)(self.conv_norm_out(x)))


def _nchw_to_nhwc(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nhwc_to_nchw(x: jax.Array) -> jax.Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nnx.Module):
    """The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3.1).

    ``encode`` maps images to the posterior :class:`DiagonalGaussian`; ``decode`` maps
    (unscaled) latents back to images. The diffusion model works on
    ``scale_latents(z) = (z - shift_factor) * scaling_factor``; invert with
    :meth:`unscale_latents` before :meth:`decode` (as diffusers pipelines do).

    Args:
        config: a :class:`VAEConfig` or a diffusers config dict.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``).
        param_dtype: parameter dtype (default: ``dtype``).
        rngs: initialisation keys (weights are normally overwritten by :func:`load_vae`).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> vae = AutoencoderKL({"block_out_channels": [8, 16], "norm_num_groups": 4,
        ...     "down_block_types": ["DownEncoderBlock2D"] * 2,
        ...     "up_block_types": ["UpDecoderBlock2D"] * 2}, rngs=nnx.Rngs(0))
        >>> roundtrip = jax.jit(lambda x: vae.decode(vae.encode(x).mode()))
        >>> roundtrip(jnp.zeros((1, 3, 16, 16))).shape
        (1, 3, 16, 16)
    """

    def __init__(
        self,
        config: VAEConfig | dict,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_dict(config)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        lat = cfg.latent_channels
        self.config = cfg
        self.dtype = dtype
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)
        self.quant_conv = conv2d(2 * lat, 2 * lat, 1, **kw) if cfg.use_quant_conv else None
        self.post_quant_conv = conv2d(lat, lat, 1, **kw) if cfg.use_post_quant_conv else None

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent pixel (``2 ** (len(block_out_channels) - 1)``, 8 for SD)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, images: jax.Array) -> DiagonalGaussian:
        """Encode images to the latent posterior.

        Args:
            images: NCHW ``(B, in_channels, H, W)`` in ``[-1, 1]``.

        Returns:
            :class:`DiagonalGaussian` with NCHW ``(B, latent_channels, H/f, W/f)`` arrays.
        """
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1] != self.config.in_channels:
            raise ValueError(
                f"images must be NCHW with {self.config.in_channels} channels, "
                f"got shape {images.shape}"
            )
        h = self.encoder(_nchw_to_nhwc(images).astype(self.dtype))
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(_nhwc_to_nchw(h), 2, axis=1)
        return DiagonalGaussian(mean, jnp.clip(logvar, -30.0, 20.0))

    def decode(self, latents: jax.Array) -> jax.Array:
        """Decode (unscaled) latents to images.

        Args:
            latents: NCHW ``(B, latent_channels, h, w)``.

        Returns:
            NCHW images ``(B, out_channels, h*f, w*f)``, nominally in ``[-1, 1]``.
        """
        latents = jnp.asarray(latents)
        if latents.ndim != 4 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be NCHW with {self.config.latent_channels} channels, "
                f"got shape {latents.shape}"
            )
        z = _nchw_to_nhwc(latents).astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return _nhwc_to_nchw(self.decoder(z))

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """VAE latents -> diffusion latents: ``(z - shift_factor) * scaling_factor``."""
        return (z - self.config.shift_factor) * self.config.scaling_factor

    def unscale_latents(self, latents: jax.Array) -> jax.Array:
        """Diffusion latents -> VAE latents: ``latents / scaling_factor + shift_factor``."""
        return latents / self.config.scaling_factor + self.config.shift_factor


def load_vae(
    folder: str | os.PathLike,
    *,
    dtype: Dtype = jnp.float32,
    allow_pickle: bool = False,
    variant: str | None = None,
    check_finite: bool = True,
) -> AutoencoderKL:
    """Load a diffusers ``AutoencoderKL`` component folder (e.g. ``<sd>/vae``).

    Reads ``config.json`` and the safetensors weights (single file or sharded) with
    :func:`jaxdiv.models.checkpoint.load_component`; never touches the network.

    Args:
        folder: local ``vae`` folder.
        dtype: compute and parameter dtype: ``jnp.float32`` (``None``), ``jnp.bfloat16``,
            ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`.
        allow_pickle: accept pickled ``.bin`` weights when no safetensors exist.
        variant: weight-file variant such as ``"fp16"``.
        check_finite: refuse NaN/inf weights and weights that overflow ``dtype``, naming
            them (``False`` for a trusted folder).

    Returns:
        The loaded model (``model.config`` is the parsed :class:`VAEConfig`).

    Raises:
        CheckpointError: missing folder/config/weights, weights that do not match, or an
            unsupported config (naming ``config.json`` and the key; a config value of the
            wrong type raises a CheckpointError that is also a TypeError).
        TypeError: ``dtype`` is not a floating dtype, or a flag is not a bool.

    Example:
        >>> import tempfile
        >>> from diffusers import AutoencoderKL as TorchVAE
        >>> d = tempfile.mkdtemp()
        >>> TorchVAE(block_out_channels=(8, 16), norm_num_groups=4, latent_channels=16,
        ...     down_block_types=("DownEncoderBlock2D",) * 2,
        ...     up_block_types=("UpDecoderBlock2D",) * 2).save_pretrained(d)
        >>> load_vae(d).config.latent_channels
        16
    """
    from jaxdiv.models.checkpoint import load_component

    dtype = float_dtype("dtype", jnp.float32 if dtype is None else dtype)

    def build(config: dict) -> AutoencoderKL:
        return AutoencoderKL(VAEConfig.from_dict(config), dtype=dtype, rngs=nnx.Rngs(0))

    model, _ = load_component(
        folder,
        build,
        convert_vae_state_dict,
        allow_pickle=allow_pickle,
        dtype=dtype,
        variant=variant,
        check_finite=check_finite,
        kinds=("AutoencoderKL",),
    )
    return model
