"""Building blocks shared by the Stable Diffusion UNet and VAE ports (Flax nnx).

Each block mirrors the diffusers PyTorch module of the same name (diffusers 0.42:
``models/resnet.py``, ``attention.py``, ``attention_processor.py``,
``transformers/transformer_2d.py``, ``embeddings.py``, ``downsampling.py``,
``upsampling.py``) and keeps its attribute names, so a diffusers state-dict key maps to
an nnx path by the few explicit rules in :mod:`jaxdiv.models.conversion`.

Layout: everything in this module is **channels-last** (NHWC images, ``(B, T, C)``
tokens). The public model classes convert from/to diffusers' NCHW at their boundary.

Precision: every layer takes ``dtype`` (compute dtype, e.g. ``jnp.bfloat16``) and
``param_dtype`` (storage dtype). Normalisation statistics, the softmax of attention and
the timestep sinusoids are always computed in float32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxdiv import validation
from jaxdiv.models.convolution import conv_general_dilated
from jaxdiv.models.normalization import group_norm

__all__ = [
    "GEGLU",
    "Attention",
    "BasicTransformerBlock",
    "Downsample2D",
    "FeedForward",
    "GroupNorm",
    "PureModule",
    "ResnetBlock2D",
    "ACTIVATIONS",
    "TimestepEmbedding",
    "Transformer2DModel",
    "Upsample2D",
    "attention_core",
    "conv2d",
    "get_activation",
    "pure",
    "timestep_embedding",
]

Dtype = Any

# diffusers activation names -> functions (diffusers.models.activations.get_activation).
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "mish": lambda x: x * jnp.tanh(jax.nn.softplus(x)),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "relu": jax.nn.relu,
}


def get_activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Activation function by its diffusers name (``diffusers.models.activations``).

    Args:
        name: one of ``"silu"``, ``"swish"``, ``"mish"``, ``"gelu"`` (exact erf form, as
            ``torch.nn.GELU()``), ``"relu"``.

    Returns:
        The elementwise function.

    Raises:
        ValueError: unknown name.

    Example:
        >>> import jax.numpy as jnp
        >>> float(get_activation("silu")(jnp.array(0.0)))
        0.0
    """
    return ACTIVATIONS[validation.choice("activation", name, sorted(ACTIVATIONS))]


def conv2d(
    cin: int,
    cout: int,
    kernel: int,
    *,
    stride: int = 1,
    padding: int | tuple[tuple[int, int], tuple[int, int]] = 0,
    use_bias: bool = True,
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Conv:
    """An NHWC ``nnx.Conv`` padded like PyTorch's ``Conv2d(padding=p)``.

    Args:
        cin: input channels.
        cout: output channels.
        kernel: square kernel size.
        stride: stride on both axes.
        padding: symmetric pixels per side, or explicit ``((top, bottom), (left, right))``.
        use_bias: add a bias.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Returns:
        The convolution module (kernel layout HWIO).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> c = conv2d(3, 8, 3, padding=1, dtype=None, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
        >>> c(jnp.ones((1, 5, 5, 3))).shape
        (1, 5, 5, 8)
    """
    if isinstance(padding, int):
        padding = ((padding, padding), (padding, padding))
    return nnx.Conv(
        cin,
        cout,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        conv_general_dilated=conv_general_dilated,
        rngs=rngs,
    )


def _linear(
    cin: int, cout: int, *, use_bias: bool = True, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs
) -> nnx.Linear:
    return nnx.Linear(cin, cout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


class GroupNorm(nnx.Module):
    """Group normalisation over the last (channel) axis, statistics in float32
    (:func:`jaxdiv.models.normalization.group_norm`).

    Same grouping as ``torch.nn.GroupNorm`` (contiguous channel groups), biased variance,
    per-channel affine ``scale``/``bias`` (PyTorch ``weight``/``bias``). Wu & He (2018),
    Eq. 1-2: ``y = (x - mu_g) / sqrt(var_g + eps) * gamma + beta``.

    Args:
        num_groups: number of channel groups; must divide ``num_channels``.
        num_channels: channel count C of inputs ``(B, ..., C)``.
        eps: variance epsilon.
        dtype: output dtype (``None``: input dtype).
        param_dtype: dtype of ``scale`` and ``bias``.

    Example:
        >>> import jax.numpy as jnp
        >>> gn = GroupNorm(2, 4)
        >>> y = gn(jnp.arange(32.0).reshape(1, 2, 4, 4))
        >>> abs(float(y.mean())) < 1e-6, y.shape
        (True, (1, 2, 4, 4))
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        *,
        eps: float = 1e-5,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
    ):
        if num_groups <= 0 or num_channels % num_groups:
            raise ValueError(
                f"num_groups must be a positive divisor of num_channels={num_channels}, "
                f"got {num_groups}"
            )
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_channels,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((num_channels,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        y = group_norm(x, self.scale[...], self.bias[...], self.num_groups, self.eps)
        return y.astype(self.dtype or x.dtype)


def timestep_embedding(
    timesteps: jax.Array,
    dim: int,
    *,
    flip_sin_to_cos: bool = False,
    freq_shift: float = 1.0,
    scale: float = 1.0,
    max_period: float = 10000.0,
) -> jax.Array:
    """Sinusoidal timestep features, as diffusers ``get_timestep_embedding``.

    ``freqs_j = exp(-log(max_period) * j / (dim/2 - freq_shift))``; features are
    ``[sin(t*freqs), cos(t*freqs)]`` (or ``[cos, sin]`` with ``flip_sin_to_cos``), zero
    padded to odd ``dim``. Ho et al. (2020) App. B / Vaswani et al. (2017) Sec. 3.5.

    Args:
        timesteps: ``(B,)`` (fractional allowed).
        dim: feature dimension.
        flip_sin_to_cos: put the cosines first (SD: ``True``).
        freq_shift: ``downscale_freq_shift`` (SD: 0).
        scale: multiplies ``t * freqs``.
        max_period: the base period.

    Returns:
        ``(B, dim)`` float32.

    Example:
        >>> import jax.numpy as jnp
        >>> e = timestep_embedding(jnp.array([0.0]), 4, flip_sin_to_cos=True, freq_shift=0)
        >>> e.tolist()
        [[1.0, 1.0, 0.0, 0.0]]
    """
    timesteps = jnp.asarray(timesteps)
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-d (B,), got shape {timesteps.shape}")
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = scale * timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nnx.Module):
    """Two-layer MLP on timestep features (``linear_1`` -> act -> ``linear_2``).

    Args:
        in_channels: input feature dimension.
        time_embed_dim: hidden and output dimension.
        act_fn: activation name, see :func:`get_activation`.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> te = TimestepEmbedding(8, 16, rngs=nnx.Rngs(0))
        >>> te(jnp.zeros((2, 8))).shape
        (2, 16)
    """

    def __init__(
        self,
        in_channels: int,
        time_embed_dim: int,
        *,
        act_fn: str = "silu",
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = _linear(in_channels, time_embed_dim, **kw)
        self.linear_2 = _linear(time_embed_dim, time_embed_dim, **kw)
        self.act_fn = act_fn

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(get_activation(self.act_fn)(self.linear_1(x)))


class ResnetBlock2D(nnx.Module):
    """Pre-activation residual block with an additive timestep embedding.

    ``h = conv1(act(norm1(x))) + time_emb_proj(act(temb))``;
    ``out = (shortcut(x) + conv2(act(norm2(h)))) / output_scale_factor``
    (diffusers ``ResnetBlock2D``, ``time_embedding_norm="default"``; Ho et al. 2020 App. B).

    Args:
        in_channels: input channels.
        out_channels: output channels (a 1x1 ``conv_shortcut`` is added when they differ).
        temb_channels: timestep-embedding width, or ``None`` for no embedding (VAE).
        groups: groups of ``norm1``.
        groups_out: groups of ``norm2`` (default ``groups``).
        eps: GroupNorm epsilon.
        act_fn: activation name.
        output_scale_factor: divides the output.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> blk = ResnetBlock2D(8, 16, temb_channels=4, groups=4, rngs=nnx.Rngs(0))
        >>> blk(jnp.ones((1, 5, 5, 8)), jnp.ones((1, 4))).shape
        (1, 5, 5, 16)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        *,
        temb_channels: int | None = 512,
        groups: int = 32,
        groups_out: int | None = None,
        eps: float = 1e-6,
        act_fn: str = "silu",
        output_scale_factor: float = 1.0,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        out_channels = in_channels if out_channels is None else out_channels
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        nkw = dict(eps=eps, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(groups, in_channels, **nkw)
        self.conv1 = conv2d(in_channels, out_channels, 3, padding=1, **kw)
        self.time_emb_proj = (
            _linear(temb_channels, out_channels, **kw) if temb_channels is not None else None
        )
        self.norm2 = GroupNorm(groups_out or groups, out_channels, **nkw)
        self.conv2 = conv2d(out_channels, out_channels, 3, padding=1, **kw)
        self.conv_shortcut = (
            conv2d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )
        self.act_fn = act_fn
        self.output_scale_factor = output_scale_factor

    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        act = get_activation(self.act_fn)
        h = self.conv1(act(self.norm1(x)))
        if self.time_emb_proj is not None and temb is not None:
            h = h + self.time_emb_proj(act(temb))[:, None, None, :]
        h = self.conv2(act(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


class Downsample2D(nnx.Module):
    """Strided 3x3 convolution halving height and width (diffusers ``Downsample2D``).

    ``padding=1`` pads one pixel on every side (UNet); ``padding=0`` pads one pixel on
    the bottom and right only, as diffusers does before its unpadded conv (VAE encoder).

    Args:
        channels: input channels.
        out_channels: output channels (default ``channels``).
        padding: 1 or 0, as the diffusers argument.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Downsample2D(4, padding=0, rngs=nnx.Rngs(0))(jnp.ones((1, 8, 8, 4))).shape
        (1, 4, 4, 4)
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        padding: int = 1,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if padding not in (0, 1):
            raise ValueError(f"padding must be 0 or 1, got {padding!r}")
        pad = ((padding, padding),) * 2 if padding else ((0, 1), (0, 1))
        self.conv = conv2d(
            channels,
            out_channels or channels,
            3,
            stride=2,
            padding=pad,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


def _nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """``torch.nn.functional.interpolate(mode="nearest")``: src = floor(dst * in / out)."""
    h, w = x.shape[1], x.shape[2]
    if size == (2 * h, 2 * w):
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    rows = (jnp.arange(size[0]) * (h / size[0])).astype(jnp.int32)
    cols = (jnp.arange(size[1]) * (w / size[1])).astype(jnp.int32)
    return x[:, rows][:, :, cols]


class Upsample2D(nnx.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv (diffusers ``Upsample2D``).

    Args:
        channels: input channels.
        out_channels: output channels (default ``channels``).
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> Upsample2D(4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 3, 4))).shape
        (1, 6, 6, 4)
    """

    def __init__(
        self,
        channels: int,
        out_channels: int | None = None,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = conv2d(
            channels,
            out_channels or channels,
            3,
            padding=1,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, output_size: tuple[int, int] | None = None) -> jax.Array:
        size = (2 * x.shape[1], 2 * x.shape[2]) if output_size is None else tuple(output_size)
        return self.conv(_nearest_resize(x, size))


ATTENTION_IMPLEMENTATIONS = (None, "xla", "cudnn", "blocked")

# Blocked (online-softmax) attention on CPU, tuned with benchmarks/attention.py --tune
# (attention_core's docstring gives the command and the measurements).
BLOCKED_KV_BLOCK = 512
BLOCKED_MIN_LOGITS = 64 * 64
BLOCKED_LOOP_HEADS = True


def attention_core(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float | None = None,
    implementation: str | None = None,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    kv_block: int | None = None,
) -> jax.Array:
    """Multi-head scaled dot-product attention on projected, head-split arrays.

    ``softmax(Q K^T * scale) V`` per head (Vaswani et al. 2017, Eq. 1), the one attention
    kernel shared by every port (UNet / VAE :class:`Attention`, CLIP, the SD3 MMDiT,
    DINOv2). Two computations:

    * :func:`jax.nn.dot_product_attention` (``"xla"`` / ``"cudnn"``), so GPU backends may
      use a fused kernel. On CPU its XLA path materialises the ``T x S`` logits.
    * ``"blocked"``: online-softmax ("flash", Dao et al. 2022, Alg. 1) attention in plain
      JAX, a :func:`jax.lax.scan` over blocks of ``kv_block`` keys carrying the running
      max, sum and weighted values, so only ``T x kv_block`` logits exist at a time. The
      scan body is rematerialised (:func:`jax.checkpoint`), so the backward pass also
      keeps only per-block carries. Differentiable like any JAX code. On the CPU backend,
      when the keys span more than one block, the ``B x H`` (batch, head) pairs run one
      after another (a :func:`jax.lax.map`, ``BLOCKED_LOOP_HEADS``): XLA:CPU runs each
      pair's 2-D products faster than the same products batched over the pairs. Elsewhere
      the pairs are vmapped.

    With ``"cudnn"`` and an odd number of queries or keys (CLIP's 77 tokens, ViT-L/14's
    257), the forward pass stays cuDNN's and the gradient is XLA's (JAX's cuDNN rule
    refuses odd lengths when differentiated, which TPSO and GASS do).

    ``implementation=None`` picks ``"blocked"`` when the default backend is the CPU and
    each head has at least ``BLOCKED_MIN_LOGITS`` logits (``T * S``), otherwise
    :func:`jax.nn.dot_product_attention`'s own default. Logits, softmax and the running
    statistics are float32 (float64 for float64 inputs, which stay float64 throughout:
    they never go through :func:`jax.nn.dot_product_attention`, whose softmax is float32);
    the output has the dtype of ``q``.

    The defaults come from sweeps on a 2-core Intel Xeon (AVX-512), B=2, 5 heads, D=64,
    float32, median of 5 interleaved rounds under ``--malloc reuse``, one pinned core
    (``OMP_NUM_THREADS=1 taskset -c 0 python -m benchmarks.attention --seq
    4096,1024,4096x77 --rounds 5 --tune --tune-blocks 256,512,1024,2048 --tune-seqs
    32,64,77,128,256,512,1024x77 --malloc reuse --out
    results/benchmarks/xeon/attention_tune_1core.json``, 2026-12-05). At T=S=4096,
    ``kv_block`` 256 / 512 / 1024 / 2048 took 447 / 439 / 449 / 465 ms
    (``BLOCKED_KV_BLOCK = 512``). Looping the pairs took 428 ms against 575 ms vmapped at
    T=S=4096 and 31 against 39 ms at 1024; on two threads (the same command with
    ``--torch-threads 2``, no ``taskset``, ``attention_tune_2threads.json``) 256 against
    321 ms at 4096 and, within the rounds' spread, 22 against 21 ms at 1024. With a single
    key block (T=S <= 512, or 77 keys) looping was slower in 15 of the 16 rows of the two
    runs (1.02-1.58x the vmapped time; faster only at T=S=512 on one core, 0.86x), hence
    the loop only over several blocks. Blocked against
    :func:`jax.nn.dot_product_attention` (xla time / blocked time, one core): 1.16 at
    T=S=32, 1.28 at 64, 1.53 at 77, 1.64 at 256, 2.53 at 1024, 3.12 at 4096, 1.41 at
    4096 x 77; on two threads 0.94 at 32 and 1.29-2.80 from 64 up. So
    ``BLOCKED_MIN_LOGITS = 64 * 64``: every measured shape from 64 x 64 up (below it a
    call takes about 0.1 ms either way).

    Args:
        q: queries ``(B, T, H, D)``.
        k: keys ``(B, S, H, D)``.
        v: values ``(B, S, H, D)``.
        scale: logit scale (``None``: ``D ** -0.5``).
        implementation: ``None`` (automatic, see above), ``"xla"`` or ``"cudnn"`` (see
            :func:`jax.nn.dot_product_attention`), or ``"blocked"`` (force the blocked
            path on any backend).
        mask: optional boolean mask broadcastable to ``(B, H, T, S)``; ``False`` drops the
            key for that query (as :func:`jax.nn.dot_product_attention`). Every query
            must keep at least one key.
        is_causal: query ``i`` attends keys ``j <= i`` only.
        kv_block: keys per block of the blocked path (``None``: ``BLOCKED_KV_BLOCK``,
            capped at ``S``; a ragged ``S`` is padded with masked keys).

    Returns:
        ``(B, T, H, D)`` in the dtype of ``q``.

    Example:
        >>> import jax.numpy as jnp
        >>> q, k = jnp.ones((1, 2, 1, 4)), jnp.zeros((1, 3, 1, 4))  # equal logits
        >>> v = jnp.arange(12.0).reshape(1, 3, 1, 4)
        >>> attention_core(q, k, v)[0, :, 0, 0].tolist()  # the mean of v[:, :, 0, 0]
        [4.0, 4.0]

        The blocked path gives the same result (here 3 keys in blocks of 2, the last one
        padded), also with a causal mask:

        >>> attention_core(q, k, v, implementation="blocked", kv_block=2)[0, :, 0, 0].tolist()
        [4.0, 4.0]
        >>> attention_core(q, k, v, implementation="blocked", is_causal=True)[0, :, 0, 0].tolist()
        [0.0, 2.0]
    """
    if implementation not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(
            f"implementation must be one of {ATTENTION_IMPLEMENTATIONS}, got {implementation!r}"
        )
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(
            f"q, k, v must be (B, T, H, D) arrays, got shapes {q.shape}, {k.shape}, {v.shape}"
        )
    if kv_block is not None and (not isinstance(kv_block, int) or kv_block < 1):
        raise ValueError(f"kv_block must be a positive int, got {kv_block!r}")
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    wide = jnp.promote_types(q.dtype, jnp.float32) == jnp.float64
    t, s = q.shape[1], k.shape[1]
    if implementation is None and (jax.default_backend() == "cpu" and t * s >= BLOCKED_MIN_LOGITS):
        implementation = "blocked"
    if implementation == "blocked":
        return _blocked_attention(
            q, k, v, scale=scale, mask=mask, is_causal=is_causal,
            kv_block=BLOCKED_KV_BLOCK if kv_block is None else kv_block,
        )  # fmt: skip
    if wide:
        return _dense_attention(q, k, v, scale=scale, mask=mask, is_causal=is_causal)
    if implementation == "cudnn" and (t % 2 or s % 2):
        # JAX's cuDNN attention refuses odd lengths in its differentiable rule (jax 0.10-0.11:
        # "Unsupported sequence length Q 77, KV 77"), which attention_core cannot foresee
        return _fused_forward_xla_gradient(q, k, v, mask, scale, is_causal, implementation)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, implementation=implementation
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_forward_xla_gradient(q, k, v, mask, scale, is_causal, implementation):
    """:func:`jax.nn.dot_product_attention` with ``implementation`` forward, XLA's backward.

    The backward pass recomputes the attention with ``implementation="xla"`` and takes its
    VJP, so the gradient is the exact one of the same function (to the fused kernel's
    rounding). Used for cuDNN at odd sequence lengths (CLIP's 77 text tokens, 257 ViT
    tokens, UNet cross-attention over 77 keys).
    """
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, implementation=implementation
    )


def _fused_forward_fwd(q, k, v, mask, scale, is_causal, implementation):
    out = jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, implementation=implementation
    )
    return out, (q, k, v, mask)


def _fused_forward_bwd(scale, is_causal, implementation, res, g):
    q, k, v, mask = res
    _, vjp = jax.vjp(
        lambda q, k, v: jax.nn.dot_product_attention(
            q, k, v, scale=scale, mask=mask, is_causal=is_causal, implementation="xla"
        ),
        q, k, v,
    )  # fmt: skip
    return (*vjp(g), None)


_fused_forward_xla_gradient.defvjp(_fused_forward_fwd, _fused_forward_bwd)


def _allowed(mask, is_causal, shape, q_pos, k_pos):
    """Boolean ``shape``-broadcastable keep-mask, or ``None`` when everything is kept."""
    keep = None
    if is_causal:
        keep = q_pos[:, None] >= k_pos[None, :]
    if mask is not None:
        keep = mask if keep is None else keep & mask
    return keep


def _dense_attention(q, k, v, *, scale, mask, is_causal):
    """``softmax(q k^T scale) v`` materialising the logits, computed in float32 or wider."""
    acc = jnp.promote_types(q.dtype, jnp.float32)
    logits = jnp.einsum("bthd,bshd->bhts", q.astype(acc), k.astype(acc)) * scale
    t, s = logits.shape[-2:]
    keep = _allowed(mask, is_causal, logits.shape, jnp.arange(t), jnp.arange(s))
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)
    return jnp.einsum("bhts,bshd->bthd", probs, v.astype(acc)).astype(q.dtype)


def _blocked_attention(q, k, v, *, scale, mask, is_causal, kv_block, loop_heads=None):
    """Online-softmax attention over key blocks (see :func:`attention_core`).

    ``loop_heads`` runs the (batch, head) pairs one after another in a :func:`jax.lax.map`
    instead of vmapping them; ``None`` loops on the CPU backend when the keys span more
    than one block, where XLA:CPU runs each pair's products faster than the same products
    batched over the pairs (``attention_core`` gives the measurements).
    """
    acc = jnp.promote_types(q.dtype, jnp.float32)
    b, t, h, _ = q.shape
    s = k.shape[1]
    n_blocks = -(-s // min(kv_block, s))
    if loop_heads is None:
        loop_heads = BLOCKED_LOOP_HEADS and jax.default_backend() == "cpu" and n_blocks > 1

    def pairs(x):  # (B, L, H, D) -> (B * H, L, D)
        return x.astype(acc).transpose(0, 2, 1, 3).reshape(b * h, x.shape[1], x.shape[3])

    xs = [pairs(q) * scale, pairs(k), pairs(v)]
    if mask is not None:
        xs.append(jnp.broadcast_to(jnp.asarray(mask, bool), (b, h, t, s)).reshape(b * h, t, s))
    head = functools.partial(_online_softmax_head, is_causal=is_causal, n_blocks=n_blocks)
    if loop_heads:
        out = jax.lax.map(lambda x: head(*x), tuple(xs))
    else:
        out = jax.vmap(head)(*xs)
    return out.reshape(b, h, t, -1).transpose(0, 2, 1, 3).astype(q.dtype)


def _online_softmax_head(q, k, v, mask=None, *, is_causal, n_blocks):
    """One head: ``q`` (T, D) already scaled, ``k`` (S, D), ``v`` (S, Dv), ``mask`` (T, S)."""
    t, s = q.shape[0], k.shape[0]
    block = -(-s // n_blocks)  # the same number of blocks with the least padding
    pad = n_blocks * block - s

    def split(x):  # (S, ...) -> (n_blocks, block, ...), padded with zeros
        x = jnp.pad(x, ((0, pad),) + ((0, 0),) * (x.ndim - 1))
        return x.reshape(n_blocks, block, *x.shape[1:])

    xs = {"k": split(k), "v": split(v), "start": jnp.arange(n_blocks) * block}
    if mask is not None:
        xs["mask"] = split(mask.T).transpose(0, 2, 1)  # (n_blocks, T, block)
    q_pos = jnp.arange(t)

    @jax.checkpoint
    def body(carry, x):
        m_prev, l_prev, o_prev = carry
        logits = q @ x["k"].T
        k_pos = x["start"] + jnp.arange(block)
        keep = _allowed(x.get("mask"), is_causal, logits.shape, q_pos, k_pos)
        if pad:
            valid = k_pos < s
            keep = valid if keep is None else keep & valid
        if keep is not None:
            logits = jnp.where(keep, logits, -jnp.inf)
        m_new = jnp.maximum(m_prev, logits.max(axis=-1))
        m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)  # no key kept yet: no NaN
        p = jnp.exp(logits - m_safe[:, None])
        corr = jnp.exp(m_prev - m_safe)
        l_new = l_prev * corr + p.sum(axis=-1)
        o_new = o_prev * corr[:, None] + p @ x["v"]
        return (m_new, l_new, o_new), None

    init = (
        jnp.full((t,), -jnp.inf, q.dtype),
        jnp.zeros((t,), q.dtype),
        jnp.zeros((t, v.shape[-1]), q.dtype),
    )
    (_, l_sum, out), _ = jax.lax.scan(body, init, xs)
    return out / l_sum[:, None]


class Attention(nnx.Module):
    """Multi-head (self or cross) attention, as diffusers ``Attention`` + ``AttnProcessor2_0``.

    ``softmax(Q K^T / sqrt(d_head)) V`` per head (Vaswani et al. 2017, Eq. 1), computed by
    :func:`attention_core` (:func:`jax.nn.dot_product_attention`, so GPU backends may use
    a fused kernel; on CPU a blocked online softmax from 64 x 64 logits per head; logits
    and softmax are float32 in every implementation).

    With ``norm_num_groups`` this is the VAE's single-head spatial attention block: a
    GroupNorm on the input, a residual connection and ``rescale_output_factor`` (the
    ``_from_deprecated_attn_block`` configuration).

    Args:
        query_dim: channels of the queries (and of the output).
        heads: number of heads.
        dim_head: channels per head.
        cross_attention_dim: channels of the context (``None``: self-attention).
        bias: bias on ``to_q``/``to_k``/``to_v``.
        out_bias: bias on ``to_out``.
        upcast_attention: diffusers' SD2.x flag against fp16 overflow of ``Q K^T``; here
            float16 queries/keys are cast to float32 (bfloat16 has float32's range and the
            logits are accumulated in float32 anyway).
        norm_num_groups: groups of the input GroupNorm (``None``: no norm).
        eps: GroupNorm epsilon.
        residual_connection: add the input to the output.
        rescale_output_factor: divides the output.
        implementation: passed to :func:`attention_core` (``None``, ``"xla"``,
            ``"cudnn"`` or ``"blocked"``).
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = Attention(8, heads=2, dim_head=4, cross_attention_dim=6, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((1, 5, 8)), jnp.ones((1, 3, 6))).shape
        (1, 5, 8)
    """

    def __init__(
        self,
        query_dim: int,
        *,
        heads: int,
        dim_head: int,
        cross_attention_dim: int | None = None,
        bias: bool = False,
        out_bias: bool = True,
        upcast_attention: bool = False,
        norm_num_groups: int | None = None,
        eps: float = 1e-5,
        residual_connection: bool = False,
        rescale_output_factor: float = 1.0,
        implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * dim_head
        kv_dim = query_dim if cross_attention_dim is None else cross_attention_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.group_norm = (
            GroupNorm(norm_num_groups, query_dim, eps=eps, dtype=dtype, param_dtype=param_dtype)
            if norm_num_groups is not None
            else None
        )
        self.to_q = _linear(query_dim, inner, use_bias=bias, **kw)
        self.to_k = _linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_v = _linear(kv_dim, inner, use_bias=bias, **kw)
        self.to_out = _linear(inner, query_dim, use_bias=out_bias, **kw)
        self.heads = heads
        self.dim_head = dim_head
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.implementation = implementation

    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        residual = x
        shape = x.shape
        if x.ndim == 4:
            x = x.reshape(shape[0], shape[1] * shape[2], shape[3])
        if self.group_norm is not None:
            x = self.group_norm(x)
        context = x if context is None else context
        b, t, s = x.shape[0], x.shape[1], context.shape[1]
        q = self.to_q(x).reshape(b, t, self.heads, self.dim_head)
        k = self.to_k(context).reshape(b, s, self.heads, self.dim_head)
        v = self.to_v(context).reshape(b, s, self.heads, self.dim_head)
        out_dtype = q.dtype
        if self.upcast_attention and q.dtype == jnp.float16:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        h = attention_core(q, k, v, scale=self.dim_head**-0.5, implementation=self.implementation)
        h = self.to_out(h.astype(out_dtype).reshape(b, t, self.heads * self.dim_head))
        h = h.reshape(shape[:-1] + (h.shape[-1],))
        if self.residual_connection:
            h = h + residual
        if self.rescale_output_factor != 1.0:
            h = h / self.rescale_output_factor
        return h


class GEGLU(nnx.Module):
    """Gated GELU projection: ``a * gelu(g)`` with ``[a, g] = proj(x)`` (Shazeer 2020, Eq. 5).

    Args:
        dim_in: input channels.
        dim_out: output channels (``proj`` maps to ``2 * dim_out``).
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> GEGLU(4, 6, rngs=nnx.Rngs(0))(jnp.ones((2, 4))).shape
        (2, 6)
    """

    def __init__(
        self,
        dim_in: int,
        dim_out: int,
        *,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.proj = _linear(dim_in, 2 * dim_out, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h, gate = jnp.split(self.proj(x), 2, axis=-1)
        return h * jax.nn.gelu(gate, approximate=False)


class FeedForward(nnx.Module):
    """Transformer MLP ``proj_out(GEGLU(x))`` with hidden width ``mult * dim``.

    diffusers keeps these as ``net.0`` (GEGLU) and ``net.2`` (output linear); here they are
    ``geglu`` and ``proj_out``.

    Args:
        dim: input and output channels.
        mult: hidden-width multiplier.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> FeedForward(4, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 4))).shape
        (1, 3, 4)
    """

    def __init__(
        self,
        dim: int,
        *,
        mult: int = 4,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = int(dim * mult)
        self.geglu = GEGLU(dim, inner, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_out = _linear(inner, dim, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.proj_out(self.geglu(x))


class BasicTransformerBlock(nnx.Module):
    """Pre-LN transformer block: self-attention, cross-attention, GEGLU MLP.

    ``x += attn1(norm1(x)); x += attn2(norm2(x), context); x += ff(norm3(x))``
    (diffusers ``BasicTransformerBlock`` with ``norm_type="layer_norm"``; Rombach et al.
    2022, Sec. 3.3 / App. "conditioning via cross-attention").

    Args:
        dim: token channels.
        num_attention_heads: heads.
        attention_head_dim: channels per head.
        cross_attention_dim: channels of the context tokens.
        upcast_attention: see :class:`Attention`.
        norm_eps: LayerNorm epsilon.
        attention_implementation: see :class:`Attention`.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> blk = BasicTransformerBlock(8, 2, 4, cross_attention_dim=6, rngs=nnx.Rngs(0))
        >>> blk(jnp.ones((1, 5, 8)), jnp.ones((1, 3, 6))).shape
        (1, 5, 8)
    """

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        *,
        cross_attention_dim: int,
        upcast_attention: bool = False,
        norm_eps: float = 1e-5,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        akw = dict(
            heads=num_attention_heads,
            dim_head=attention_head_dim,
            upcast_attention=upcast_attention,
            implementation=attention_implementation,
            **kw,
        )
        ln = dict(epsilon=norm_eps, use_fast_variance=False, **kw)
        self.norm1 = nnx.LayerNorm(dim, **ln)
        self.attn1 = Attention(dim, **akw)
        self.norm2 = nnx.LayerNorm(dim, **ln)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, **akw)
        self.norm3 = nnx.LayerNorm(dim, **ln)
        self.ff = FeedForward(dim, **kw)

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nnx.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks, project out, residual.

    ``use_linear_projection=False`` (SD 1.x) uses 1x1 convolutions for ``proj_in`` /
    ``proj_out``, ``True`` (SD 2.x) linear layers; both act per pixel, so on NHWC data they
    differ only in the kernel's shape (diffusers ``Transformer2DModel``, continuous input).

    Args:
        num_attention_heads: heads.
        attention_head_dim: channels per head (inner width = heads * head dim).
        in_channels: channels of the feature map.
        cross_attention_dim: channels of the context tokens.
        num_layers: number of :class:`BasicTransformerBlock`.
        norm_num_groups: GroupNorm groups (epsilon is 1e-6, as in diffusers).
        use_linear_projection: linear instead of 1x1 conv projections.
        upcast_attention: see :class:`Attention`.
        attention_implementation: see :class:`Attention`.
        dtype: compute dtype.
        param_dtype: parameter dtype.
        rngs: initialisation keys.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> tr = Transformer2DModel(2, 4, 8, cross_attention_dim=6, norm_num_groups=4,
        ...                         rngs=nnx.Rngs(0))
        >>> tr(jnp.ones((1, 3, 3, 8)), jnp.ones((1, 5, 6))).shape
        (1, 3, 3, 8)
    """

    def __init__(
        self,
        num_attention_heads: int,
        attention_head_dim: int,
        in_channels: int,
        *,
        cross_attention_dim: int,
        num_layers: int = 1,
        norm_num_groups: int = 32,
        use_linear_projection: bool = False,
        upcast_attention: bool = False,
        attention_implementation: str | None = None,
        dtype: Dtype = None,
        param_dtype: Dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = num_attention_heads * attention_head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = GroupNorm(
            norm_num_groups, in_channels, eps=1e-6, dtype=dtype, param_dtype=param_dtype
        )
        if use_linear_projection:
            self.proj_in = _linear(in_channels, inner, **kw)
            self.proj_out = _linear(inner, in_channels, **kw)
        else:
            self.proj_in = conv2d(in_channels, inner, 1, **kw)
            self.proj_out = conv2d(inner, in_channels, 1, **kw)
        self.transformer_blocks = nnx.List(
            [
                BasicTransformerBlock(
                    inner,
                    num_attention_heads,
                    attention_head_dim,
                    cross_attention_dim=cross_attention_dim,
                    upcast_attention=upcast_attention,
                    attention_implementation=attention_implementation,
                    **kw,
                )
                for _ in range(num_layers)
            ]
        )

    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        b, h, w, _ = x.shape
        # Both projection kinds act per pixel on NHWC, so one code path serves both.
        hid = self.proj_in(self.norm(x))
        hid = hid.reshape(b, h * w, hid.shape[-1])
        for block in self.transformer_blocks:
            hid = block(hid, context)
        hid = self.proj_out(hid.reshape(b, h, w, hid.shape[-1]))
        return hid + x


class PureModule(NamedTuple):
    """A module split into a pure function and its parameter pytree (see :func:`pure`)."""

    apply: Callable[..., Any]
    params: Any


def pure(module: nnx.Module, method: str = "__call__") -> PureModule:
    """Split an nnx module into ``apply(params, *args, **kwargs)`` and ``params``.

    ``apply`` is a pure function of its arguments, so it can be ``jax.jit``-ed,
    differentiated (w.r.t. inputs or params) and ``vmap``-ped; ``params`` is the module's
    state pytree (swap in bf16/sharded copies freely).

    Args:
        module: an nnx module.
        method: name of the method ``apply`` calls (e.g. ``"decode"`` on the VAE).

    Returns:
        ``PureModule(apply, params)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> lin = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
        >>> f = pure(lin)
        >>> y = jax.jit(f.apply)(f.params, jnp.ones((3, 2)))
        >>> bool(jnp.allclose(y, lin(jnp.ones((3, 2)))))
        True
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    if not callable(getattr(module, method, None)):
        raise ValueError(f"method must name a method of {type(module).__name__}, got {method!r}")
    graphdef, params = nnx.split(module)

    def apply(params: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(nnx.merge(graphdef, params), method)(*args, **kwargs)

    return PureModule(apply, params)
