"""The ports' convolution: ``lax.conv_general_dilated``'s values, computed the way XLA:CPU
runs fastest for each case (Winograd, patch products, a kernel-layout VJP).

:func:`conv_general_dilated` takes ``lax.conv_general_dilated``'s arguments and is what
every convolution layer of the ports (:func:`jaxdiv.models.layers.conv2d`, the CLIP and
DINOv2 patch embeddings) runs.
"""

from __future__ import annotations

from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

__all__ = [
    "SMALL_OUTPUT_TILES",
    "SMALL_STRIDED_OUTPUT_TILES",
    "WINOGRAD_CUSTOM_INPUT_GRAD",
    "WINOGRAD_MIN_TILES",
    "WINOGRAD_UNROLL_MIN_TILES",
    "conv_general_dilated",
]

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         precision=None, preferred_element_type=None, **kwargs):  # fmt: skip
    """``lax.conv_general_dilated`` as the ports' convolution layers run it on XLA:CPU:
    same values, five slow paths avoided.

    * **3 x 3, stride 1 on the CPU backend** (every UNet / VAE resnet convolution): Winograd
      F(2 x 2, 3 x 3) (Lavin & Gray 2016, Eq. 8: ``Y = A^T [(G g G^T) * (B^T d B)] A``) when
      the output has at least :data:`WINOGRAD_MIN_TILES` 2 x 2 tiles (batch included) and
      the dtype is float32 or float64. 16 matrix products over 4 x 4 input tiles replace
      the 36 multiplications per 2 x 2 outputs of the direct form by 16 (2.25x fewer);
      from :data:`WINOGRAD_UNROLL_MIN_TILES` tiles on they run as 16 separate 2-D products,
      below as one batched product.
      The transforms add, subtract and halve only, so the result is as accurate as a
      direct convolution: on SD 2.1's shapes the max abs error to a float64 PyTorch
      convolution was 3.9e-6 to 8.1e-6, XLA's direct one 5.0e-6 to 9.5e-6, PyTorch's
      float32 one 1.3e-5 to 2.0e-5; one core ran it 1.4-1.7x faster than PyTorch and
      1.6-1.9x faster than XLA's direct convolution (2-core AMD EPYC, Zen 2, AVX2;
      ``python -m benchmarks.conv --rounds 3 --flag-sets default``, 2026-12-04). Its input
      gradient is Winograd again: the cotangent convolved with the flipped kernel, input and
      output channels swapped (a custom JVP whose tangent reverse mode transposes into
      that, where no side's padding exceeds 2; JAX's autodiff of the transforms scattered
      into the input instead): the input gradient of SD's VAE decoder at 256 px ran 1.74x
      faster than under autodiff, and 1.27x PyTorch's (one core of a 2-core AMD EPYC, Zen
      5, ``jaxdiv.host_memory``'s malloc setting; ``python -m benchmarks.vae_grad
      --threads 1``, 2026-12-07). Forward and reverse mode both work.
    * **Non-overlapping patches** (NHWC, stride equal to the kernel, no padding: the CLIP,
      DINOv2 and MMDiT patch embeddings, and 1 x 1 convolutions): a reshape and one matrix
      product, whose gradients are matrix products too (XLA:CPU compiles the input
      gradient of such a convolution, a dilated one with a reversed kernel, to a slower
      generic form).
    * **Inputs smaller than the kernel** (an NHWC stride-1 convolution, e.g. a UNet's
      2 x 2 bottom level at 128 px): computed as one matrix product over gathered
      patches. XLA:CPU swaps such a convolution's operands and runs it on a slow generic
      path: a 3 x 3, 256-channel convolution of a ``(4, 2, 2, 256)`` batch took 9.42 ms
      there against 0.55 ms as patches @ kernel, on one core
      (``python -m benchmarks.conv --shapes bottom --flag-sets default --rounds 7``).
    * **Small outputs** (3 x 3 stride-1 convolutions on the CPU backend with fewer than
      :data:`SMALL_OUTPUT_TILES` 2 x 2 output tiles, too few for Winograd: a UNet's 8 x 8
      level at 512 px): the same product over the 9 gathered shifted copies (im2col),
      1.4-3.3x faster than XLA's direct convolution there. Strided 3 x 3 convolutions
      with fewer than :data:`SMALL_STRIDED_OUTPUT_TILES` output tiles (a UNet's last
      downsampler) gather strided copies the same way.
    * **The gradient with respect to the input** of every other convolution (XLA's
      own). JAX's transpose rule convolves the cotangent with the flipped kernel under
      swapped kernel labels (``01oi``); XLA:CPU rewrites that to its library layout only
      in a program's entry computation, so inside a ``lax.scan`` or ``while`` body --
      every guidance term that backpropagates through the VAE or CLIP (GASS) runs there --
      it became a naive loop nest, slow to compile and to run (jax-ml/jax#12868). A custom
      VJP here transposes the kernel explicitly so that the input gradient is a
      convolution in the library layout wherever it runs (``python -m benchmarks.conv
      --pass input_grad`` times both). The weight gradient is JAX's own. Reverse mode
      only: ``jax.jvp`` / ``jax.jacfwd`` through such a convolution raise JAX's
      custom-VJP ``TypeError``; ``jax.grad`` of ``jax.grad`` works.

    ``nnx.Conv(..., conv_general_dilated=...)`` takes it in place of the lax function
    (:func:`jaxdiv.models.layers.conv2d` and the CLIP / DINOv2 patch embeddings do).
    Implements ``y[b, i, j, o] = sum_{u, v, c} x[b, s i + u, s j + v, c] w[u, v, c, o]``
    and its general dilated, grouped form.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.random.normal(jax.random.key(0), (2, 2, 2, 8))
        >>> w = jax.random.normal(jax.random.key(1), (3, 3, 8, 4))
        >>> dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
        >>> args = ((1, 1), ((1, 1), (1, 1)))
        >>> a = conv_general_dilated(x, w, *args, dimension_numbers=dn)
        >>> b = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
        >>> a.shape, bool(jnp.allclose(a, b, atol=1e-5))
        ((2, 2, 2, 4), True)
        >>> x = jax.random.normal(jax.random.key(2), (2, 6, 6, 8))
        >>> loss = lambda conv: lambda x: (conv(x, w, *args, dimension_numbers=dn) ** 2).sum()
        >>> ga = jax.grad(loss(conv_general_dilated))(x)
        >>> gb = jax.grad(loss(jax.lax.conv_general_dilated))(x)
        >>> bool(jnp.allclose(ga, gb, rtol=1e-5, atol=1e-4))
        True
        >>> x = jax.random.normal(jax.random.key(3), (2, 17, 16, 8))  # 2 x 9 x 8 tiles: Winograd
        >>> a = conv_general_dilated(x, w, *args, dimension_numbers=dn)
        >>> b = jax.lax.conv_general_dilated(x, w, *args, dimension_numbers=dn)
        >>> a.shape, bool(jnp.allclose(a, b, atol=1e-4))
        ((2, 17, 16, 4), True)
    """
    static = _settings(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                       dimension_numbers, feature_group_count, precision,
                       preferred_element_type, kwargs)  # fmt: skip
    path = _path(lhs, rhs, static)
    if path == "winograd":
        if (not WINOGRAD_CUSTOM_INPUT_GRAD or _input_grad_padding(static.padding) is None
                or jnp.result_type(lhs) != jnp.result_type(rhs)):  # fmt: skip
            return _winograd_f2x2_3x3(lhs, rhs, static)
        return _winograd_with_winograd_input_grad(lhs, rhs, static)
    if path == "patchify":
        return _patchify(lhs, rhs, static)
    if path == "gathered_patches":
        return _gathered_patches(lhs, rhs, static)
    return _conv_library_layout_grad(lhs, rhs, static)


def conv_path(lhs, rhs, window_strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
              *, products: bool = False, **kwargs) -> str:
    """Which computation :func:`conv_general_dilated` picks for these operands (arrays or
    shape-dtype structs): ``"winograd"``, ``"patchify"`` (a reshape and one product),
    ``"gathered_patches"`` (one product over gathered shifted, or strided, copies) or ``"direct"``
    (XLA's convolution, with the library-layout input gradient). With ``products=True``
    Winograd says how it runs its 16 products: ``"winograd_unrolled"`` (16 2-D products,
    from :data:`WINOGRAD_UNROLL_MIN_TILES` output tiles on) or ``"winograd_batched"``.

    >>> import jax.numpy as jnp
    >>> w = jnp.zeros((3, 3, 8, 8))
    >>> [conv_path(jnp.zeros((2, n, n, 8)), w, (1, 1), ((1, 1), (1, 1))) for n in (2, 8, 16)]
    ['gathered_patches', 'gathered_patches', 'winograd']
    >>> [conv_path(jnp.zeros((b, 32, 32, 8)), w, (1, 1), ((1, 1), (1, 1)), products=True)
    ...  for b in (1, 2)]  # 256 and 512 output tiles
    ['winograd_batched', 'winograd_unrolled']
    >>> [conv_path(jnp.zeros((2, n, n, 8)), w, (2, 2), ((1, 1), (1, 1))) for n in (8, 64)]
    ['gathered_patches', 'direct']
    """
    static = _settings(lhs, rhs, window_strides, padding, kwargs.pop("lhs_dilation", None),
                       kwargs.pop("rhs_dilation", None), dimension_numbers,
                       kwargs.pop("feature_group_count", 1), kwargs.pop("precision", None),
                       kwargs.pop("preferred_element_type", None), kwargs)  # fmt: skip
    path = _path(lhs, rhs, static)
    if products and path == "winograd":
        unrolled = _unrolled_products(_output_tiles(lhs, rhs, static))
        return "winograd_unrolled" if unrolled else "winograd_batched"
    return path


def _settings(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
              feature_group_count, precision, preferred_element_type, kwargs) -> _ConvSettings:
    static = _ConvSettings(
        tuple(window_strides),
        padding if isinstance(padding, str) else tuple(tuple(p) for p in padding),
        None if lhs_dilation is None else tuple(lhs_dilation),
        None if rhs_dilation is None else tuple(rhs_dilation),
        dimension_numbers, feature_group_count, precision, preferred_element_type,
        tuple(sorted(kwargs.items())))  # fmt: skip
    if not isinstance(dimension_numbers, jax.lax.ConvDimensionNumbers):
        static = static._replace(dimension_numbers=jax.lax.conv_dimension_numbers(
            lhs.shape, rhs.shape, dimension_numbers))  # fmt: skip
    return static


def _path(lhs, rhs, static: _ConvSettings) -> str:
    """The computation for these operands (see :func:`conv_path`); thresholds read now."""
    if not _is_plain_nhwc(lhs, rhs, static):
        return "direct"
    kh, kw = rhs.shape[:2]
    if static.window_strides == (kh, kw) and _no_padding(static.padding):
        return "patchify"
    small = lhs.shape[1] < kh or lhs.shape[2] < kw
    if static.window_strides == (1, 1) and small and not isinstance(static.padding, str):
        return "gathered_patches"
    tiles = _output_tiles(lhs, rhs, static)
    if tiles is None:
        return "direct"
    if static.window_strides != (1, 1):
        return "gathered_patches" if tiles < SMALL_STRIDED_OUTPUT_TILES else "direct"
    if tiles >= WINOGRAD_MIN_TILES:
        return "winograd"
    return "gathered_patches" if tiles < SMALL_OUTPUT_TILES else "direct"


class _ConvSettings(NamedTuple):
    window_strides: tuple
    padding: Any
    lhs_dilation: Any
    rhs_dilation: Any
    dimension_numbers: Any
    feature_group_count: int
    precision: Any
    preferred_element_type: Any
    kwargs: tuple


def _lax_conv(lhs, rhs, s: _ConvSettings, dimension_numbers=None):
    return jax.lax.conv_general_dilated(
        lhs, rhs, s.window_strides, s.padding, s.lhs_dilation, s.rhs_dilation,
        s.dimension_numbers if dimension_numbers is None else dimension_numbers,
        s.feature_group_count, precision=s.precision,
        preferred_element_type=s.preferred_element_type, **dict(s.kwargs))  # fmt: skip


def _is_plain_nhwc(lhs, rhs, s: _ConvSettings) -> bool:
    """An NHWC / HWIO convolution without dilation or groups, on one device."""
    if lhs.ndim != 4 or rhs.ndim != 4 or dict(s.kwargs).get("out_sharding"):
        return False
    return (s.feature_group_count == 1
            and all(d is None or d == (1, 1) for d in (s.lhs_dilation, s.rhs_dilation))
            and s.dimension_numbers == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                                                       _NHWC))  # fmt: skip


def _no_padding(padding) -> bool:
    if isinstance(padding, str):
        return padding.upper() == "VALID"
    return all(p == (0, 0) for p in padding)


def _patches_at_kernel(patches, rhs, s: _ConvSettings):
    return jnp.matmul(patches, rhs.reshape(-1, rhs.shape[-1]), precision=s.precision,
                      preferred_element_type=s.preferred_element_type)  # fmt: skip


def _gathered_patches(lhs, rhs, s: _ConvSettings):
    kh, kw = rhs.shape[:2]
    sh, sw = s.window_strides
    (top, bottom), (left, right) = s.padding
    xp = jnp.pad(lhs, ((0, 0), (top, bottom), (left, right), (0, 0)))
    oh, ow = (xp.shape[1] - kh) // sh + 1, (xp.shape[2] - kw) // sw + 1
    patches = jnp.concatenate([xp[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw]
                               for i in range(kh) for j in range(kw)], axis=-1)  # fmt: skip
    return _patches_at_kernel(patches, rhs, s)


def _patchify(lhs, rhs, s: _ConvSettings):
    # non-overlapping patches are a reshape: rows and columns past the last whole patch drop
    b, h, w, c = lhs.shape
    kh, kw = rhs.shape[:2]
    oh, ow = h // kh, w // kw
    patches = (lhs[:, :oh * kh, :ow * kw].reshape(b, oh, kh, ow, kw, c)
               .transpose(0, 1, 3, 2, 4, 5).reshape(b, oh, ow, kh * kw * c))  # fmt: skip
    return _patches_at_kernel(patches, rhs, s)


#: Winograd F(2 x 2, 3 x 3) runs when the output has at least this many 2 x 2 tiles (batch
#: included); below, the 16 small matrix products and the kernel transform cost more than
#: the multiplications saved. Read at trace time (set it to ``float("inf")`` to trace
#: direct convolutions only). Forced onto every shape, on one core of a 2-core AMD EPYC
#: (Zen 2, AVX2), Winograd was 0.96x XLA's direct convolution at 8 x 8 x 1280 channels with
#: a CFG batch of 2 (32 tiles) and 1.56x at 16 x 16 (128 tiles) (2026-12-04, ``python -m
#: benchmarks.conv --rounds 3 --flag-sets default --winograd-min-tiles 0``).
WINOGRAD_MIN_TILES = 64

#: Below this many 2 x 2 output tiles, a 3 x 3 stride-1 convolution that Winograd does not
#: take (same conditions: float32/64, explicit padding, CPU backend) runs as one matrix
#: product over its 9 gathered shifted copies (im2col; the copies are 9x the input, which
#: is small here). XLA's direct convolution is slow at such sizes: on one core of a 2-core
#: AMD EPYC (Zen 2, AVX2) the patch product was 1.38x faster than it at 8 x 8 x 1280
#: channels with a batch of 2, 1.67x with 2560 input channels and 3.26x at 4 x 4, and
#: 1.02x / 1.04x / 1.28x PyTorch's oneDNN convolution (2026-12-04, ``python -m
#: benchmarks.conv --shapes small_output --rounds 5 --flag-sets default``). Read at trace
#: time; ``0`` keeps XLA's convolution.
SMALL_OUTPUT_TILES = 64

#: Below this many 2 x 2 output tiles (batch included), a strided 3 x 3 convolution (same
#: conditions otherwise: float32/64, explicit padding, CPU backend; a UNet's or VAE's
#: downsampler) runs as one matrix product over its 9 gathered strided copies of the input.
#: XLA:CPU's direct strided convolution is slow at such sizes: on SD 2.1's downsamplers on a
#: 2-core Intel Xeon (AVX-512) the patch product was 2.14x / 2.24x faster than it at 16 x 16
#: x 1280 channels (32 / 64 output tiles, CFG batch 2 / 4) and 1.25x at 32 x 32 x 640 (128
#: tiles) on one core (3.07x / 2.42x / 1.39x on two threads), level at 256 tiles (1.02x /
#: 1.08x) and 0.76x / 0.79x at 512 (2026-12-05, ``python -m benchmarks.conv --shapes
#: downsample --flag-sets default --rounds 7 --small-strided-output-tiles inf [--threads
#: 0]``, ``results/benchmarks/xeon/conv_downsample_patches_*.json``). Read at trace time;
#: ``0`` keeps XLA's convolution.
SMALL_STRIDED_OUTPUT_TILES = 256

#: From this many 2 x 2 output tiles (batch included) on, Winograd's 16 products run as 16
#: separate two-dimensional matrix products, each on its transformed tiles in place; below,
#: as one product batched over the 16 (the tiles stacked first). XLA:CPU (YNNPACK) runs a
#: large 2-D product faster than the same products batched, and the unstacked tiles save a
#: copy four times the input's size; few rows per product favour the batched one. Same
#: values either way. On SD 2.1's Winograd shapes (CFG batch 2 and 4), on a 2-core Intel
#: Xeon (AVX-512), the batched products took 1.05-1.23x the unrolled ones' time from 512
#: tiles up (one core; 1.13-1.21x on two threads); at 256 tiles the unrolled took 0.95-1.03x
#: the batched time, at 128 tiles 1.02x (1.10x on two threads) (2026-12-05, ``python -m
#: benchmarks.conv --shapes winograd_tiles --flag-sets default --rounds 5 [--threads 0]``).
#: Read at trace time (``float("inf")``: always batched).
WINOGRAD_UNROLL_MIN_TILES = 512

#: Winograd's input gradient is a Winograd convolution of the cotangent with the flipped,
#: in/out-swapped kernel (a custom JVP, whose transpose reverse mode takes) where every
#: side's padding is at most 2 and both operands have one dtype; ``False`` leaves it to
#: JAX's autodiff of the transforms
#: (what ``python -m benchmarks.conv --pass input_grad`` times as ``jaxdiv_autodiff_winograd``).
#: Read at trace time.
WINOGRAD_CUSTOM_INPUT_GRAD = True

# Lavin & Gray (2016), Sec. 4.1: F(2, 3) input (B^T), kernel (G) and output (A^T) transforms
_WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
_WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
_WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def _output_tiles(lhs, rhs, s: _ConvSettings) -> int | None:
    """The number of 2 x 2 output tiles (batch included) of a 3 x 3 convolution with
    explicit non-negative padding, float32/64, on the CPU backend; ``None`` for any other
    convolution (see :data:`WINOGRAD_MIN_TILES`, :data:`SMALL_OUTPUT_TILES`,
    :data:`SMALL_STRIDED_OUTPUT_TILES`)."""
    if rhs.shape[:2] != (3, 3) or isinstance(s.padding, str):
        return None
    if any(p < 0 for pair in s.padding for p in pair) or s.preferred_element_type is not None:
        return None
    if jnp.result_type(lhs, rhs) not in (jnp.float32, jnp.float64):
        return None
    (top, bottom), (left, right) = s.padding
    (sh, sw), (h, w) = s.window_strides, lhs.shape[1:3]
    oh, ow = (h + top + bottom - 3) // sh + 1, (w + left + right - 3) // sw + 1
    if h + top + bottom < 3 or w + left + right < 3 or jax.default_backend() != "cpu":
        return None
    return lhs.shape[0] * -(-oh // 2) * -(-ow // 2)


def _unrolled_products(tiles: int) -> bool:
    """Whether Winograd over this many output tiles runs 16 2-D products (threshold read now)."""
    return tiles >= WINOGRAD_UNROLL_MIN_TILES


def _transform(matrix, xs):
    """``[sum_a matrix[i][a] xs[a] for i]`` as elementwise operations with constant
    coefficients, which XLA fuses with the slices they read; a dot with a 4 x 4 constant
    compiles to a slow matrix product of inner dimension 4."""
    out = []
    for row in matrix:
        terms = [x if c == 1 else -x if c == -1 else c * x for c, x in zip(row, xs) if c]
        total = terms[0]
        for t in terms[1:]:
            total = total + t
        out.append(total)
    return out


def _winograd_f2x2_3x3(lhs, rhs, s: _ConvSettings):
    """Winograd F(2 x 2, 3 x 3) of an NHWC input with an HWIO 3 x 3 kernel, stride 1."""
    (top, bottom), (left, right) = s.padding
    b, h, w, c = lhs.shape
    oh, ow = h + top + bottom - 2, w + left + right - 2
    th, tw = -(-oh // 2), -(-ow // 2)  # tiles; the last row / column may overhang
    x = jnp.pad(lhs, ((0, 0), (top, bottom + 2 * th - oh), (left, right + 2 * tw - ow), (0, 0)))
    # B^T d B of every 4 x 4 input tile d (tiles at stride 2): rows, then columns
    rows = _transform(_WINOGRAD_BT, [x[:, a:a + 2 * th:2] for a in range(4)])
    tiles = [_transform(_WINOGRAD_BT, [r[:, :, e:e + 2 * tw:2] for e in range(4)]) for r in rows]
    # G g G^T of every (in, out) channel pair as one product with a constant (16, 9)
    # matrix: one memory-bound pass over the kernel, where elementwise sums made several
    gg = np.einsum("iu,jv->ijuv", _WINOGRAD_G, _WINOGRAD_G).reshape(16, 9)
    u = jnp.matmul(jnp.asarray(gg, rhs.dtype), rhs.reshape(9, -1),
                   precision=jax.lax.Precision.HIGHEST).reshape(16, *rhs.shape[2:])  # fmt: skip
    # the scope names the products in the compiled HLO (benchmarks.profile_step groups them)
    with jax.named_scope("winograd_products"):
        if _unrolled_products(b * th * tw):
            # 16 two-dimensional products, each reading its transformed tiles where they lie
            m = [[jnp.matmul(tiles[i][j].reshape(-1, c), u[4 * i + j], precision=s.precision)
                  .reshape(b, th, tw, -1) for j in range(4)] for i in range(4)]  # fmt: skip
        else:
            v = jnp.stack([t for row in tiles for t in row]).reshape(16, b * th * tw, c)
            m = jnp.einsum("kpc,kco->kpo", v, u, precision=s.precision)
            m = m.reshape(4, 4, b, th, tw, -1)
    cols = [_transform(_WINOGRAD_AT, [m[i][j] for i in range(4)]) for j in range(4)]
    y = jnp.stack([jnp.stack(_transform(_WINOGRAD_AT, [cols[j][p] for j in range(4)]), axis=-2)
                   for p in range(2)], axis=2)  # (B, th, 2, tw, 2, O)
    return y.reshape(b, 2 * th, 2 * tw, -1)[:, :oh, :ow]


def _input_grad_padding(padding):
    """The padding under which a 3 x 3 stride-1 convolution of the cotangent with the
    flipped kernel is the input gradient (``2 - p`` per side); ``None`` where a side's
    padding exceeds 2 (negative padding there: Winograd takes none)."""
    flipped = tuple((2 - low, 2 - high) for low, high in padding)
    return None if any(p < 0 for pair in flipped for p in pair) else flipped


@partial(jax.custom_jvp, nondiff_argnums=(2,))
def _winograd_with_winograd_input_grad(lhs, rhs, s: _ConvSettings):
    return _winograd_f2x2_3x3(lhs, rhs, s)


@partial(_winograd_with_winograd_input_grad.defjvp, symbolic_zeros=True)
def _winograd_jvp(s: _ConvSettings, primals, tangents):
    # Reverse mode transposes this rule's tangent. Written as plain Winograd, its input part
    # would transpose into the transforms' adjoints (strided scatters into the input; SD's
    # VAE decoder gradient ran 1.74x slower so, benchmarks.vae_grad). Written instead as
    # the transpose of the input gradient -- a Winograd convolution of the cotangent with
    # the flipped, in/out-swapped kernel -- it transposes back into exactly that. Operands
    # of one dtype only: the transpose needs the input's dtype from the cotangent's.
    lhs, rhs = primals
    d_lhs, d_rhs = tangents
    out = _winograd_f2x2_3x3(lhs, rhs, s)
    parts = []
    if not isinstance(d_lhs, SymbolicZero):
        flipped = jnp.swapaxes(jnp.flip(rhs, (0, 1)), 2, 3)
        s_grad = s._replace(padding=_input_grad_padding(s.padding))
        input_grad = partial(_winograd_f2x2_3x3, rhs=flipped, s=s_grad)
        parts.append(jax.linear_transpose(input_grad, jax.ShapeDtypeStruct(out.shape,
                                                                           out.dtype))(d_lhs)[0])
    if not isinstance(d_rhs, SymbolicZero):
        parts.append(_winograd_f2x2_3x3(lhs, d_rhs, s))
    return out, sum(parts[1:], parts[0])


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_library_layout_grad(lhs, rhs, s: _ConvSettings):
    return _lax_conv(lhs, rhs, s)


def _conv_fwd(lhs, rhs, s: _ConvSettings):
    return _lax_conv(lhs, rhs, s), (lhs, rhs)


def _conv_bwd(s: _ConvSettings, residuals, g):
    lhs, rhs = residuals
    dn = s.dimension_numbers
    out_axis, in_axis = dn.rhs_spec[:2]
    # The same convolution of a kernel stored with its two feature axes swapped (an
    # explicit transpose XLA keeps): JAX transposes it with the labels swapped back, i.e.
    # in the library layout.
    swapped = jnp.swapaxes(rhs, out_axis, in_axis)
    dn_swapped = dn._replace(rhs_spec=(in_axis, out_axis, *dn.rhs_spec[2:]))
    (d_lhs,) = jax.linear_transpose(lambda l: _lax_conv(l, swapped, s, dn_swapped), lhs)(g)
    (d_swapped,) = jax.linear_transpose(lambda r: _lax_conv(lhs, r, s, dn_swapped), swapped)(g)
    return d_lhs, jnp.swapaxes(d_swapped, out_axis, in_axis)


_conv_library_layout_grad.defvjp(_conv_fwd, _conv_bwd)
