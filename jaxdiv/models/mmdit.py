"""Stable Diffusion 3 / 3.5 MMDiT (``SD3Transformer2DModel``) in Flax nnx, loaded from diffusers.

Mirrors ``diffusers.models.transformers.transformer_sd3.SD3Transformer2DModel`` (diffusers
0.42) with its ``JointTransformerBlock`` (``attention.py``), ``JointAttnProcessor2_0``
(``attention_processor.py``), ``PatchEmbed`` with the cropped position table and
``CombinedTimestepTextProjEmbeddings`` (``embeddings.py``), ``AdaLayerNormZero`` /
``SD35AdaLayerNormZeroX`` / ``AdaLayerNormContinuous`` (``normalization.py``). It covers
the three released layouts:

* SD3-Medium: joint blocks, the last one ``context_pre_only``, no q/k norm;
* SD3.5-Medium (MMDiT-X): an extra image-only self-attention ``attn2`` in the blocks of
  ``dual_attention_layers``, ``qk_norm="rms_norm"``;
* SD3.5-Large: ``qk_norm="rms_norm"``, no dual attention.

Esser et al. (2024), "Scaling Rectified Flow Transformers", Sec. 4 / Fig. 2: image and
text tokens keep separate weights and are mixed by one attention over their
concatenation ``[image tokens; text tokens]`` (diffusers' order, kept here).

Public layout is **NCHW**, as in diffusers and as jaxdiv's UNet and VAE ports (whose
public methods take and return NCHW); the model works on NHWC / ``(B, T, C)`` tokens
internally. The output is the flow-matching velocity ``v = eps - x0`` (the SD3 scheduler
convention), in the layout of the input.

Weights (``transformer/`` of a diffusers SD3 folder) load with :func:`load_mmdit`; the
key-mapping rules are :func:`jaxdiv.models.conversion.convert_mmdit_state_dict`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.checkpoint import float_dtype
from jaxdiv.models.conversion import convert_mmdit_state_dict
from jaxdiv.models.layers import TimestepEmbedding, attention_core, conv2d, timestep_embedding

__all__ = [
    "JointTransformerBlock",
    "MMDiTConfig",
    "SD3Transformer2DModel",
    "crop_pos_embed",
    "load_mmdit",
    "sincos_pos_embed_2d",
]

Dtype = Any
ContextHook = Callable[[int, jax.Array], jax.Array]

QK_NORMS = (None, "rms_norm")
# diffusers' epsilon of every norm in the SD3 transformer (LayerNorms and q/k RMSNorms)
_EPS = 1e-6
# width of the sinusoidal timestep features (CombinedTimestepTextProjEmbeddings)
_TIME_PROJ_DIM = 256


def _positive_int(value: Any, key: str) -> int:
    return validation.integer(f"config[{key!r}]", value, minimum=1)


@dataclasses.dataclass(frozen=True)
class MMDiTConfig:
    """The fields of a diffusers ``SD3Transformer2DModel`` ``config.json`` (defaults: SD3's).

    ``pos_embed_max_size`` is the side, in patches, of the stored square position table
    that is centre-cropped to the latent's patch grid; ``None`` computes a 2-d sincos
    table for the actual grid instead. ``dual_attention_layers`` lists the blocks with
    the MMDiT-X image self-attention ``attn2`` (SD3.5-Medium).

    Example:
        >>> cfg = MMDiTConfig.from_dict({"num_layers": 4, "num_attention_heads": 2,
        ...     "attention_head_dim": 8, "caption_projection_dim": 16,
        ...     "dual_attention_layers": [0, 1], "qk_norm": "rms_norm"})
        >>> cfg.inner_dim, cfg.dual_attention_layers, cfg.out_channels
        (16, (0, 1), 16)
    """

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int = 16
    pos_embed_max_size: int | None = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    @property
    def inner_dim(self) -> int:
        """Token width ``num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_dict(cls, config: dict) -> MMDiTConfig:
        """Parse and validate a diffusers ``SD3Transformer2DModel`` ``config.json`` dict.

        Missing keys take diffusers' defaults; keys starting with ``_`` and keys this
        model does not read are ignored. ``out_channels: null`` means ``in_channels``.

        Args:
            config: the parsed ``config.json``.

        Returns:
            The validated config.

        Raises:
            TypeError: ``config`` is not a dict, or an integer field holds a non-integer
                (naming the key).
            ValueError: an unsupported or inconsistent value, naming the key.

        Example:
            >>> MMDiTConfig.from_dict({"qk_norm": "rms_norm"}).qk_norm
            'rms_norm'
        """
        if not isinstance(config, dict):
            raise TypeError(f"config must be a dict, got {type(config).__name__}")
        d = cls()
        ints = {
            key: _positive_int(config.get(key, getattr(d, key)), key)
            for key in (
                "sample_size", "patch_size", "in_channels", "num_layers", "attention_head_dim",
                "num_attention_heads", "joint_attention_dim", "caption_projection_dim",
                "pooled_projection_dim",
            )
        }  # fmt: skip
        out_channels = config.get("out_channels", d.out_channels)
        out_channels = ints["in_channels"] if out_channels is None else out_channels
        out_channels = _positive_int(out_channels, "out_channels")
        max_size = config.get("pos_embed_max_size", d.pos_embed_max_size)
        if max_size is not None:
            max_size = _positive_int(max_size, "pos_embed_max_size")
        inner = ints["num_attention_heads"] * ints["attention_head_dim"]
        if ints["caption_projection_dim"] != inner:
            # the text stream enters the joint blocks, whose width is the inner width
            raise ValueError(
                f"config['caption_projection_dim'] = {ints['caption_projection_dim']} must equal "
                f"num_attention_heads * attention_head_dim = {inner}"
            )
        if inner % 4:
            # the 2-d sincos table splits the width in four (sin / cos of rows / columns)
            raise ValueError(
                f"num_attention_heads * attention_head_dim = {inner} must be divisible by 4 "
                "(2-d sincos position embedding)"
            )
        dual = config.get("dual_attention_layers", d.dual_attention_layers)
        if dual is None:
            dual = ()
        if not isinstance(dual, list | tuple):
            raise TypeError(
                f"config['dual_attention_layers'] must be a list of block indices, got {dual!r}"
            )
        n = ints["num_layers"]
        dual = tuple(
            validation.integer("config['dual_attention_layers'] entries", i, minimum=0,
                               maximum=n - 1)
            for i in dual
        )  # fmt: skip
        qk_norm = config.get("qk_norm", d.qk_norm)
        if qk_norm not in QK_NORMS:
            raise ValueError(
                f"config['qk_norm'] must be one of {QK_NORMS} (the released SD3 / SD3.5 "
                f"layouts), got {qk_norm!r}"
            )
        return cls(
            out_channels=out_channels,
            pos_embed_max_size=max_size,
            dual_attention_layers=tuple(sorted(set(dual))),
            qk_norm=qk_norm,
            **ints,
        )


# --------------------------------------------------------------------------- embeddings


def sincos_pos_embed_2d(
    embed_dim: int,
    height: int,
    width: int,
    *,
    base_size: int,
    interpolation_scale: float = 1.0,
) -> jax.Array:
    """2-d sinusoidal position table, as diffusers ``get_2d_sincos_pos_embed``.

    Row ``i * width + j`` (row-major patch order) is ``[f(x_j), f(y_i)]`` with
    ``f(p) = [sin(p * w_k), cos(p * w_k)]``, ``w_k = 10000 ** (-k / (D/4))``,
    ``x_j = j * base_size / width / s`` and ``y_i = i * base_size / height / s``
    (``s``: ``interpolation_scale``); the column coordinate comes first, as in
    diffusers. Vaswani et al. (2017) Sec. 3.5 applied per axis (MAE / DiT tables).

    Computed with ``jax.numpy`` in float32, so building a full-size model under
    ``nnx.eval_shape`` (as :func:`load_mmdit` does) costs nothing; diffusers' float64
    sinusoids differ by about ``|p| * 2**-24`` (~4e-6 at SD3's largest coordinate, 64).

    Args:
        embed_dim: table width ``D`` (divisible by 4).
        height: rows of the patch grid.
        width: columns of the patch grid.
        base_size: the grid side the coordinates are normalised to
            (``sample_size // patch_size``).
        interpolation_scale: divides the coordinates.

    Returns:
        ``(height * width, embed_dim)`` float32.

    Example:
        >>> t = sincos_pos_embed_2d(8, 2, 3, base_size=2)
        >>> t.shape, t[0].tolist()  # position (0, 0): sin 0 = 0, cos 0 = 1
        ((6, 8), [0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4, got {embed_dim}")
    f32 = jnp.float32
    rows = jnp.arange(height, dtype=f32) / f32(height / base_size) / f32(interpolation_scale)
    cols = jnp.arange(width, dtype=f32) / f32(width / base_size) / f32(interpolation_scale)
    quarter = embed_dim // 4
    omega = 1.0 / 10000.0 ** (jnp.arange(quarter, dtype=f32) / quarter)

    def axis(pos: jax.Array) -> jax.Array:
        arg = pos[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(arg), jnp.cos(arg)], axis=1)

    x = jnp.broadcast_to(axis(cols)[None, :, :], (height, width, 2 * quarter))
    y = jnp.broadcast_to(axis(rows)[:, None, :], (height, width, 2 * quarter))
    return jnp.concatenate([x, y], axis=-1).reshape(height * width, embed_dim)


def crop_pos_embed(table: jax.Array, max_size: int, height: int, width: int) -> jax.Array:
    """Centre crop of a square position table to a ``height x width`` patch grid.

    diffusers ``PatchEmbed.cropped_pos_embed``: the ``(max_size, max_size)`` grid is cut
    at ``top = (max_size - height) // 2``, ``left = (max_size - width) // 2``, so every
    aspect ratio uses the middle of the table the model was trained on.

    Args:
        table: ``(1, max_size**2, D)`` or ``(max_size**2, D)``, row-major grid order.
        max_size: side of the table's grid (``pos_embed_max_size``).
        height: patch rows of the latent.
        width: patch columns of the latent.

    Returns:
        ``(height * width, D)``.

    Raises:
        ValueError: the grid is larger than the table.

    Example:
        >>> import jax.numpy as jnp
        >>> crop_pos_embed(jnp.arange(16.0)[:, None], 4, 2, 1)[:, 0].tolist()
        [5.0, 9.0]
    """
    if height > max_size or width > max_size:
        raise ValueError(
            f"latent patch grid {height}x{width} exceeds pos_embed_max_size={max_size}"
        )
    top, left = (max_size - height) // 2, (max_size - width) // 2
    grid = jnp.reshape(table, (max_size, max_size, -1))
    return grid[top : top + height, left : left + width].reshape(height * width, -1)


class PatchEmbed(nnx.Module):
    """Patchify conv plus the (cropped) position table (diffusers ``PatchEmbed``, SD3 form).

    ``tokens = conv_p(x) + pos`` with a ``p x p`` stride-``p`` conv (Dosovitskiy et al.
    2021, Eq. 1). With ``pos_embed_max_size`` the table ``pos_embed`` ``(1, M*M, D)`` is
    a checkpoint tensor (initialised to diffusers' sincos values) cropped by
    :func:`crop_pos_embed`; without it a sincos table is computed for the grid.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = MMDiTConfig(sample_size=8, in_channels=4, num_attention_heads=2,
        ...     attention_head_dim=8, caption_projection_dim=16, pos_embed_max_size=6)
        >>> embed = PatchEmbed(cfg, rngs=nnx.Rngs(0))
        >>> jax.jit(lambda x: embed(x))(jnp.ones((1, 6, 4, 4))).shape  # NHWC in, tokens out
        (1, 6, 16)
    """

    def __init__(
        self,
        cfg: MMDiTConfig,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        p, dim = cfg.patch_size, cfg.inner_dim
        self.proj = conv2d(
            cfg.in_channels, dim, p, stride=p, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.patch_size = p
        self.base_size = cfg.sample_size // p
        self.max_size = cfg.pos_embed_max_size
        if self.max_size is not None:
            m = self.max_size
            table = sincos_pos_embed_2d(dim, m, m, base_size=self.base_size)
            self.pos_embed = nnx.Param(table[None].astype(param_dtype))
        else:
            self.pos_embed = None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.proj(x)
        b, gh, gw, dim = h.shape
        tokens = h.reshape(b, gh * gw, dim)
        if self.pos_embed is not None:
            pos = crop_pos_embed(self.pos_embed[...], self.max_size, gh, gw)
        else:
            pos = sincos_pos_embed_2d(dim, gh, gw, base_size=self.base_size)
        return (tokens + pos[None].astype(tokens.dtype)).astype(tokens.dtype)


class CombinedTimestepTextProjEmbeddings(nnx.Module):
    """Conditioning vector ``c = MLP_t(sincos_256(t)) + MLP_y(pooled)`` (diffusers name).

    Esser et al. (2024) Fig. 2a: the timestep and the pooled CLIP text vector are summed
    into one ``c`` that drives every adaLN modulation. Both MLPs are linear-SiLU-linear
    (diffusers' ``TimestepEmbedding`` and ``PixArtAlphaTextProjection``), so both are a
    :class:`~jaxdiv.models.layers.TimestepEmbedding` here.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> emb = CombinedTimestepTextProjEmbeddings(16, 12, rngs=nnx.Rngs(0))
        >>> emb(jnp.array([1.0, 999.0]), jnp.ones((2, 12))).shape
        (2, 16)
    """

    def __init__(
        self,
        embedding_dim: int,
        pooled_projection_dim: int,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.timestep_embedder = TimestepEmbedding(_TIME_PROJ_DIM, embedding_dim, **kw)
        # PixArtAlphaTextProjection(act_fn="silu"): pooled -> D -> D, the same two layers
        self.text_embedder = _TextProjection(pooled_projection_dim, embedding_dim, **kw)

    def __call__(self, timesteps: jax.Array, pooled: jax.Array) -> jax.Array:
        t = timestep_embedding(timesteps, _TIME_PROJ_DIM, flip_sin_to_cos=True, freq_shift=0)
        return self.timestep_embedder(t.astype(pooled.dtype)) + self.text_embedder(pooled)


class _TextProjection(nnx.Module):
    # linear_1 (in -> D), SiLU, linear_2 (D -> D): diffusers PixArtAlphaTextProjection
    def __init__(self, in_features: int, hidden: int, *, dtype, param_dtype, rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = nnx.Linear(in_features, hidden, **kw)
        self.linear_2 = nnx.Linear(hidden, hidden, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))


# --------------------------------------------------------------------------- norms


def _layer_norm(x: jax.Array, eps: float = _EPS) -> jax.Array:
    """LayerNorm without affine (``elementwise_affine=False``), statistics in float32."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """``LN(x) * (1 + scale) + shift`` per sample (Peebles & Xie 2023, adaLN)."""
    return _layer_norm(x) * (1 + scale[:, None]) + shift[:, None]


class RMSNorm(nnx.Module):
    """``x / sqrt(mean(x^2) + eps) * scale`` over the last axis, in float32 (Zhang &
    Sennrich 2019, Eq. 4); diffusers ``RMSNorm`` with an elementwise weight.

    Example:
        >>> import jax.numpy as jnp
        >>> [round(float(v), 4) for v in RMSNorm(2)(jnp.array([2.0, -2.0]))]
        [1.0, -1.0]
    """

    def __init__(self, dim: int, *, eps: float = _EPS, param_dtype: Dtype = jnp.float32):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class AdaLayerNormZero(nnx.Module):
    """adaLN-Zero modulation (Peebles & Xie 2023, Sec. 3.2): ``linear(silu(c))`` split in 6.

    Returns ``(LN(x)(1+scale_msa)+shift_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp)``
    (diffusers ``AdaLayerNormZero`` chunk order). With ``dual=True`` the projection has 9
    chunks and two more outputs for the MMDiT-X second attention,
    ``LN(x)(1+scale_msa2)+shift_msa2`` and ``gate_msa2`` (``SD35AdaLayerNormZeroX``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> out = AdaLayerNormZero(4, dual=True, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 4)),
        ...                                                       jnp.ones((2, 4)))
        >>> len(out), out[0].shape, out[1].shape
        (7, (2, 3, 4), (2, 4))
    """

    def __init__(
        self,
        dim: int,
        *,
        dual: bool = False,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dual = dual
        self.linear = nnx.Linear(
            dim, (9 if dual else 6) * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: jax.Array, emb: jax.Array) -> tuple[jax.Array, ...]:
        chunks = jnp.split(self.linear(jax.nn.silu(emb)), 9 if self.dual else 6, axis=-1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = chunks[:6]
        normed = _layer_norm(x)  # shared by both attentions' modulations
        out = (normed * (1 + scale_msa[:, None]) + shift_msa[:, None],
               gate_msa, shift_mlp, scale_mlp, gate_mlp)  # fmt: skip
        if self.dual:
            shift_msa2, scale_msa2, gate_msa2 = chunks[6:]
            out += (normed * (1 + scale_msa2[:, None]) + shift_msa2[:, None], gate_msa2)
        return out


class AdaLayerNormContinuous(nnx.Module):
    """``LN(x) * (1 + scale) + shift`` with ``[scale, shift] = linear(silu(c))``.

    diffusers ``AdaLayerNormContinuous`` (``elementwise_affine=False``): note the chunk
    order **scale first**, unlike :class:`AdaLayerNormZero`. Used as the final norm and
    as the text-stream norm of a ``context_pre_only`` block.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> AdaLayerNormContinuous(4, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 4)),
        ...                                              jnp.ones((2, 4))).shape
        (2, 3, 4)
    """

    def __init__(
        self, dim: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        self.linear = nnx.Linear(dim, 2 * dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(jax.nn.silu(emb).astype(x.dtype)), 2, axis=-1)
        return _modulate(x, shift, scale)


# --------------------------------------------------------------------------- blocks


class GELUFeedForward(nnx.Module):
    """``proj_out(gelu_tanh(proj_in(x)))`` with hidden width ``4 * dim``.

    diffusers ``FeedForward(activation_fn="gelu-approximate")``, whose layers are
    ``net.0.proj`` and ``net.2``; here ``proj_in`` and ``proj_out``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> GELUFeedForward(4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 4))).shape
        (1, 3, 4)
    """

    def __init__(
        self, dim: int, *, dtype: Dtype = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = nnx.Linear(dim, 4 * dim, **kw)
        self.proj_out = nnx.Linear(4 * dim, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class JointAttention(nnx.Module):
    """MMDiT joint attention: one softmax over ``[image; text]`` keys (Esser et al. 2024, Fig. 2b).

    diffusers ``Attention`` + ``JointAttnProcessor2_0``: image tokens are projected by
    ``to_q/to_k/to_v``, text tokens by ``add_q_proj/add_k_proj/add_v_proj``; with
    ``qk_norm="rms_norm"`` each head's queries and keys are RMS-normalised (``norm_q``,
    ``norm_k``, ``norm_added_q``, ``norm_added_k``). Queries, keys and values are
    concatenated image first, attended by :func:`~jaxdiv.models.layers.attention_core`
    and split back; image outputs go through ``to_out``, text outputs through
    ``to_add_out``. Without ``joint`` this is plain self-attention (MMDiT-X ``attn2``).
    In a ``context_pre_only`` block the text output is discarded, so only the image rows
    are computed (each query row of a softmax is independent: same result, less work).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = JointAttention(8, heads=2, dim_head=4, qk_norm="rms_norm", rngs=nnx.Rngs(0))
        >>> x, c = jax.jit(lambda x, c: attn(x, c))(jnp.ones((1, 5, 8)), jnp.ones((1, 3, 8)))
        >>> x.shape, c.shape
        ((1, 5, 8), (1, 3, 8))
    """

    def __init__(
        self,
        dim: int,
        *,
        heads: int,
        dim_head: int,
        joint: bool = True,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        rms = qk_norm == "rms_norm"
        self.to_q = nnx.Linear(dim, inner, **kw)
        self.to_k = nnx.Linear(dim, inner, **kw)
        self.to_v = nnx.Linear(dim, inner, **kw)
        self.norm_q = RMSNorm(dim_head, param_dtype=param_dtype) if rms else None
        self.norm_k = RMSNorm(dim_head, param_dtype=param_dtype) if rms else None
        self.to_out = nnx.Linear(inner, dim, **kw)
        if joint:
            # add_q_proj / norm_added_q exist (and are loaded) even in a context_pre_only
            # block, where the text queries they make are never needed
            self.add_q_proj = nnx.Linear(dim, inner, **kw)
            self.add_k_proj = nnx.Linear(dim, inner, **kw)
            self.add_v_proj = nnx.Linear(dim, inner, **kw)
            self.norm_added_q = RMSNorm(dim_head, param_dtype=param_dtype) if rms else None
            self.norm_added_k = RMSNorm(dim_head, param_dtype=param_dtype) if rms else None
            self.to_add_out = None if context_pre_only else nnx.Linear(inner, dim, **kw)
        else:
            self.add_q_proj = self.add_k_proj = self.add_v_proj = None
            self.norm_added_q = self.norm_added_k = self.to_add_out = None
        self.heads = heads
        self.dim_head = dim_head
        self.context_pre_only = context_pre_only
        self.implementation = implementation

    def _split(self, h: jax.Array, norm: RMSNorm | None) -> jax.Array:
        h = h.reshape(h.shape[0], h.shape[1], self.heads, self.dim_head)
        return h if norm is None else norm(h)

    def __call__(
        self, x: jax.Array, context: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None]:
        n = x.shape[1]
        q = self._split(self.to_q(x), self.norm_q)
        k = self._split(self.to_k(x), self.norm_k)
        v = self._split(self.to_v(x), None)
        if context is not None:
            k = jnp.concatenate([k, self._split(self.add_k_proj(context), self.norm_added_k)], 1)
            v = jnp.concatenate([v, self._split(self.add_v_proj(context), None)], 1)
            if not self.context_pre_only:
                cq = self._split(self.add_q_proj(context), self.norm_added_q)
                q = jnp.concatenate([q, cq], 1)
        h = attention_core(q, k, v, scale=self.dim_head**-0.5, implementation=self.implementation)
        h = h.reshape(h.shape[0], h.shape[1], self.heads * self.dim_head)
        out = self.to_out(h[:, :n])
        ctx_out = None
        if context is not None and not self.context_pre_only:
            ctx_out = self.to_add_out(h[:, n:])
        return out, ctx_out


class JointTransformerBlock(nnx.Module):
    """One MMDiT block: adaLN-Zero joint attention and MLP on both streams (diffusers name).

    Image stream ``x``, text stream ``context``, conditioning vector ``temb`` (``c`` in
    Esser et al. 2024, Fig. 2b; adaLN-Zero of Peebles & Xie 2023):
    ``x += g1 * attn_x(mod1(x)) [+ g1' * attn2(mod1'(x))]; x += g2 * ff(mod2(x))`` and the
    same for ``context`` with its own weights. A ``context_pre_only`` block (the last one) only
    contributes text keys/values and returns ``None`` for the text stream.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> blk = JointTransformerBlock(8, 2, 4, use_dual_attention=True, rngs=nnx.Rngs(0))
        >>> run = jax.jit(lambda x, c, t: blk(x, c, t))  # one compile; eager is slow
        >>> c, x = run(jnp.ones((1, 5, 8)), jnp.ones((1, 3, 8)), jnp.ones((1, 8)))
        >>> c.shape, x.shape
        ((1, 3, 8), (1, 5, 8))
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        context_pre_only: bool = False,
        qk_norm: str | None = None,
        use_dual_attention: bool = False,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        akw = dict(heads=num_attention_heads, dim_head=attention_head_dim, qk_norm=qk_norm,
                   implementation=attention_implementation, **kw)  # fmt: skip
        self.context_pre_only = context_pre_only
        self.use_dual_attention = use_dual_attention
        self.norm1 = AdaLayerNormZero(dim, dual=use_dual_attention, **kw)
        self.norm1_context = (
            AdaLayerNormContinuous(dim, **kw) if context_pre_only else AdaLayerNormZero(dim, **kw)
        )
        self.attn = JointAttention(dim, context_pre_only=context_pre_only, **akw)
        self.attn2 = JointAttention(dim, joint=False, **akw) if use_dual_attention else None
        self.ff = GELUFeedForward(dim, **kw)
        self.ff_context = None if context_pre_only else GELUFeedForward(dim, **kw)

    def __call__(
        self, x: jax.Array, context: jax.Array, temb: jax.Array
    ) -> tuple[jax.Array | None, jax.Array]:
        """Returns ``(context, x)``, diffusers' order (``context`` is ``None`` if pre-only)."""
        if self.use_dual_attention:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp, nx2, gate_msa2 = self.norm1(x, temb)
        else:
            nx, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, temb)
        if self.context_pre_only:
            nc = self.norm1_context(context, temb)
        else:
            nc, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = self.norm1_context(context, temb)

        attn, c_attn = self.attn(nx, nc)
        x = x + gate_msa[:, None] * attn
        if self.attn2 is not None:
            x = x + gate_msa2[:, None] * self.attn2(nx2)[0]
        x = x + gate_mlp[:, None] * self.ff(_modulate(x, shift_mlp, scale_mlp))
        if self.context_pre_only:
            return None, x

        context = context + c_gate_msa[:, None] * c_attn
        h = self.ff_context(_modulate(context, c_shift_mlp, c_scale_mlp))
        return context + c_gate_mlp[:, None] * h, x


# --------------------------------------------------------------------------- model


class SD3Transformer2DModel(nnx.Module):
    """The SD3 / SD3.5 MMDiT velocity model (diffusers ``SD3Transformer2DModel``).

    ``x -> patchify + pos -> N joint blocks with [image; text] attention, conditioned on
    c = MLP(t) + MLP(pooled) -> adaLN -> linear -> unpatchify``
    (Esser et al. 2024, Sec. 4 and Fig. 2).

    Args:
        config: an :class:`MMDiTConfig` or a diffusers ``config.json`` dict.
        dtype: compute dtype (``jnp.float32`` or ``jnp.bfloat16``); layer norm and RMS
            statistics, the softmax and the timestep sinusoids stay float32.
        param_dtype: parameter dtype (default: ``dtype``).
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`
            (``None``, ``"xla"`` or ``"cudnn"``).
        rngs: initialisation keys (default ``nnx.Rngs(0)``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> model = SD3Transformer2DModel({"sample_size": 8, "in_channels": 4,
        ...     "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
        ...     "joint_attention_dim": 20, "caption_projection_dim": 16,
        ...     "pooled_projection_dim": 12, "out_channels": 4, "pos_embed_max_size": 8})
        >>> v = jax.jit(lambda x, t, c, p: model(x, t, c, p))  # one compile; eager is slow
        >>> v(jnp.zeros((2, 4, 10, 6)), jnp.array([10.0, 900.0]), jnp.zeros((2, 7, 20)),
        ...   jnp.zeros((2, 12))).shape
        (2, 4, 10, 6)
    """

    def __init__(
        self,
        config: MMDiTConfig | dict,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype | None = None,
        attention_implementation: str | None = None,
        rngs: nnx.Rngs | None = None,
    ):
        cfg = config if isinstance(config, MMDiTConfig) else MMDiTConfig.from_dict(config)
        rngs = nnx.Rngs(0) if rngs is None else rngs
        param_dtype = dtype if param_dtype is None else param_dtype
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dim = cfg.inner_dim
        self.config = cfg
        self.dtype = dtype
        self.pos_embed = PatchEmbed(cfg, **kw)
        self.time_text_embed = CombinedTimestepTextProjEmbeddings(
            dim, cfg.pooled_projection_dim, **kw
        )
        self.context_embedder = nnx.Linear(
            cfg.joint_attention_dim, cfg.caption_projection_dim, **kw
        )
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    dim,
                    cfg.num_attention_heads,
                    cfg.attention_head_dim,
                    context_pre_only=i == cfg.num_layers - 1,
                    qk_norm=cfg.qk_norm,
                    use_dual_attention=i in cfg.dual_attention_layers,
                    attention_implementation=attention_implementation,
                    **kw,
                )
                for i in range(cfg.num_layers)
            ]
        )
        self.norm_out = AdaLayerNormContinuous(dim, **kw)
        self.proj_out = nnx.Linear(dim, cfg.patch_size**2 * cfg.out_channels, **kw)

    def __call__(
        self,
        hidden_states: jax.Array,
        timestep: jax.Array | float,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        *,
        context_hook: ContextHook | None = None,
        context_reports: bool = False,
    ) -> jax.Array | tuple[jax.Array, tuple]:
        """Predict the flow velocity for a batch of latents.

        Args:
            hidden_states: noisy latents, NCHW ``(B, in_channels, H, W)``; ``H`` and ``W``
                multiples of ``patch_size`` and at most ``pos_embed_max_size`` patches.
            timestep: SD3 timesteps (``1000 * sigma``), a scalar or ``(B,)``.
            encoder_hidden_states: text tokens ``(B, S, joint_attention_dim)`` (SD3:
                CLIP-L/G hidden states padded to T5's width, then T5's tokens).
            pooled_projections: pooled text vectors ``(B, pooled_projection_dim)``.
            context_hook: optional ``hook(block_index, encoder_hidden_states) ->
                encoder_hidden_states``, called on the text stream ``(B, S, D)`` right
                after each joint block that outputs one (every block but the last,
                ``context_pre_only`` one), before the next block reads it; the
                contextual-space repulsion method steers these tokens. It runs at trace
                time under ``jax.jit`` (a Python callable; pass one with a stable
                identity so it compiles once) and must return the shape it was given.
                ``None`` (default) leaves the model unchanged.
            context_reports: the hook returns ``(encoder_hidden_states, report)``, a
                pytree of diagnostics (``None`` when it has none), and the call returns
                the reports too; how guidance terms acting inside the model bring their
                diagnostics into the sampler's trace.

        Returns:
            The velocity, NCHW ``(B, out_channels, H, W)``, in the compute dtype; with
            ``context_reports=True``, ``(velocity, reports)``, ``reports`` a tuple holding
            the hook's report after each block it ran after (blocks ``0 .. L - 2``).

        Raises:
            ValueError: inputs of the wrong shape (naming the argument).
        """
        cfg = self.config
        x = jnp.asarray(hidden_states)
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(
                f"hidden_states must be NCHW with {cfg.in_channels} channels, got shape {x.shape}"
            )
        b, _, height, width = x.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(
                f"hidden_states height and width must be multiples of patch_size={p}, "
                f"got {height}x{width}"
            )
        context = jnp.asarray(encoder_hidden_states)
        if (
            context.ndim != 3
            or context.shape[0] != b
            or context.shape[2] != cfg.joint_attention_dim
        ):
            raise ValueError(
                f"encoder_hidden_states must be (B={b}, S, joint_attention_dim="
                f"{cfg.joint_attention_dim}), got shape {context.shape}"
            )
        pooled = jnp.asarray(pooled_projections)
        if pooled.shape != (b, cfg.pooled_projection_dim):
            raise ValueError(
                f"pooled_projections must be (B={b}, pooled_projection_dim="
                f"{cfg.pooled_projection_dim}), got shape {pooled.shape}"
            )
        t = jnp.asarray(timestep, jnp.float32).reshape(-1)
        if t.shape[0] not in (1, b):
            raise ValueError(f"timestep must be a scalar or shape ({b},), got {t.shape}")
        t = jnp.broadcast_to(t, (b,))
        if context_hook is not None:
            validation.function(
                "context_hook", context_hook, "(block_index, (B, S, D)) -> (B, S, D)"
            )

        x = jnp.transpose(x, (0, 2, 3, 1)).astype(self.dtype)
        h = self.pos_embed(x)
        temb = self.time_text_embed(t, pooled.astype(self.dtype))
        context = self.context_embedder(context.astype(self.dtype))
        reports = []
        for i, block in enumerate(self.transformer_blocks):
            context, h = block(h, context, temb)
            if context_hook is not None and context is not None:
                shape = context.shape
                context = context_hook(i, context)
                if context_reports:
                    if not isinstance(context, tuple) or len(context) != 2:
                        raise ValueError(
                            "with context_reports=True, context_hook must return "
                            f"(text_stream, report), got {type(context).__name__} after "
                            f"block {i}"
                        )
                    context, report = context
                    reports.append(report)
                if getattr(context, "shape", None) != shape:
                    raise ValueError(
                        f"context_hook must return the text stream's shape {shape}, got "
                        f"{getattr(context, 'shape', type(context).__name__)} after block {i}"
                    )
        h = self.proj_out(self.norm_out(h, temb))

        # unpatchify: token (i, j) holds a p x p x C patch (diffusers "nhwpqc->nchpwq")
        gh, gw = height // p, width // p
        h = h.reshape(b, gh, gw, p, p, cfg.out_channels)
        h = jnp.transpose(h, (0, 5, 1, 3, 2, 4))
        velocity = h.reshape(b, cfg.out_channels, height, width)
        return (velocity, tuple(reports)) if context_reports else velocity


def load_mmdit(
    folder: str | os.PathLike,
    *,
    dtype: Dtype | None = None,
    allow_pickle: bool = False,
    variant: str | None = None,
    check_finite: bool = True,
    attention_implementation: str | None = None,
) -> SD3Transformer2DModel:
    """Load a diffusers ``SD3Transformer2DModel`` folder (``<sd3>/transformer``).

    Reads ``config.json`` and the safetensors weights (single file or sharded) with
    :func:`jaxdiv.models.checkpoint.load_component` and the rules of
    :func:`jaxdiv.models.conversion.convert_mmdit_state_dict`; never touches the network.

    Args:
        folder: local ``transformer`` folder.
        dtype: compute and parameter dtype: ``jnp.float32`` (``None``), ``jnp.bfloat16``,
            ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled); see
            :func:`~jaxdiv.models.checkpoint.float_dtype`. Checkpoint weights (often fp16 /
            bf16) are cast to it.
        allow_pickle: accept pickled ``.bin`` weights when no safetensors exist.
        variant: weight-file variant such as ``"fp16"``.
        check_finite: refuse NaN/inf weights and weights that overflow ``dtype``, naming
            them (``False`` for a trusted folder).
        attention_implementation: see :class:`SD3Transformer2DModel`.

    Returns:
        The loaded model (``model.config`` is the parsed :class:`MMDiTConfig`).

    Raises:
        CheckpointError: missing folder/config/weights, weights that do not match (every
            missing / unexpected / mis-shaped tensor named), or an unsupported config
            (naming ``config.json`` and the key; a config value of the wrong type raises a
            CheckpointError that is also a TypeError).
        TypeError: ``dtype`` is not a floating dtype, or a flag is not a bool.

    Example:
        >>> import tempfile
        >>> from diffusers import SD3Transformer2DModel as TorchMMDiT
        >>> d = tempfile.mkdtemp()
        >>> TorchMMDiT(sample_size=8, in_channels=4, out_channels=4, num_layers=2,
        ...     num_attention_heads=2, attention_head_dim=8, joint_attention_dim=20,
        ...     caption_projection_dim=16, pooled_projection_dim=12, pos_embed_max_size=8,
        ...     qk_norm="rms_norm").save_pretrained(d)
        >>> load_mmdit(d).config.qk_norm
        'rms_norm'
    """
    from jaxdiv.models.checkpoint import load_component

    dtype = float_dtype("dtype", jnp.float32 if dtype is None else dtype)

    def build(config: dict) -> SD3Transformer2DModel:
        return SD3Transformer2DModel(
            MMDiTConfig.from_dict(config),
            dtype=dtype,
            attention_implementation=attention_implementation,
            rngs=nnx.Rngs(0),
        )

    model, _ = load_component(
        folder,
        build,
        convert_mmdit_state_dict,
        allow_pickle=allow_pickle,
        dtype=dtype,
        variant=variant,
        check_finite=check_finite,
        kinds=("SD3Transformer2DModel",),
    )
    return model
