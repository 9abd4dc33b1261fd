"""``convolution.conv_general_dilated``: the ports' convolution, its values and gradients against
PyTorch's, and an input gradient XLA:CPU runs in its library layout inside a loop body."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv.models import convolution
from jaxdiv.models.convolution import conv_general_dilated

torch = pytest.importorskip("torch")

# name: (input NHWC, kernel HWIO, stride, padding per side or "VALID", dilation, groups)
CASES = {
    "3x3": ((2, 8, 8, 6), (3, 3, 6, 5), 1, 1, 1, 1),  # 2 x 4 x 4 tiles: gathered patches
    "downsample_stride_2": ((2, 8, 8, 6), (3, 3, 6, 5), 2, 1, 1, 1),  # 2 x 2 x 2 tiles: patches
    "downsample_stride_2_odd": ((3, 9, 7, 4), (3, 3, 4, 5), 2, 1, 1, 1),  # 5 x 4 output
    "downsample_stride_3": ((2, 10, 10, 4), (3, 3, 4, 3), 3, 2, 1, 1),
    "downsample_stride_2_direct": ((2, 66, 34, 3), (3, 3, 3, 4), 2, 1, 1, 1),  # 2 x 17 x 9 tiles
    "1x1": ((2, 5, 5, 6), (1, 1, 6, 4), 1, 0, 1, 1),
    "patchify_4x4_stride_4": ((2, 8, 8, 3), (4, 4, 3, 5), 4, "VALID", 1, 1),
    "dilated": ((2, 9, 9, 4), (3, 3, 4, 3), 1, 2, 2, 1),
    "groups_2": ((2, 6, 6, 6), (3, 3, 3, 4), 1, 1, 1, 2),
    "input_smaller_than_kernel": ((3, 2, 2, 8), (3, 3, 8, 4), 1, 1, 1, 1),  # patch product
    "3x3_winograd": ((2, 17, 16, 6), (3, 3, 6, 5), 1, 1, 1, 1),  # 2 x 9 x 8 output tiles
}


def _inputs(case):
    xs, ws, *_ = CASES[case]
    rng = np.random.default_rng(0)
    return rng.standard_normal(xs).astype(np.float32), rng.standard_normal(ws).astype(np.float32)


def _ours(case):
    xs, ws, stride, pad, dil, groups = CASES[case]
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    dn = jax.lax.conv_dimension_numbers(xs, ws, ("NHWC", "HWIO", "NHWC"))
    return lambda x, w: conv_general_dilated(
        x, w, (stride, stride), padding, rhs_dilation=(dil, dil), dimension_numbers=dn,
        feature_group_count=groups)  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_and_both_gradients_match_torch(case):
    _assert_value_and_both_gradients_match_torch(case)


@pytest.mark.parametrize("unroll_min_tiles", [0, float("inf")])  # 16 2-D products / batched
def test_winograd_products_unrolled_or_batched_match_torch(unroll_min_tiles, monkeypatch):
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    x, w = _inputs("3x3_winograd")
    # the kernel transform is one product; Winograd's 16 are one batched or 16 separate
    products = str(jax.make_jaxpr(_ours("3x3_winograd"))(x, w)).count("dot_general")
    assert products == (17 if unroll_min_tiles == 0 else 2)
    _assert_value_and_both_gradients_match_torch("3x3_winograd")


@pytest.mark.parametrize("unroll_min_tiles", [0, float("inf")])
def test_winograd_products_are_named_in_the_compiled_program(unroll_min_tiles, monkeypatch):
    # benchmarks.profile_step attributes time to them by this name scope
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    x, w = _inputs("3x3_winograd")
    text = jax.jit(_ours("3x3_winograd")).lower(x, w).compile().as_text()
    named = re.findall(r" dot\(.*op_name=\"[^\"]*winograd_products", text)
    assert len(named) == (16 if unroll_min_tiles == 0 else 1)
    assert len(re.findall(r" dot\(", text)) == len(named) + 1  # and the kernel transform


def test_winograd_unrolls_its_products_from_the_tile_threshold(monkeypatch):
    x, w = _inputs("3x3_winograd")  # 2 x 9 x 8 = 144 output tiles
    count = lambda: str(jax.make_jaxpr(_ours("3x3_winograd"))(x, w)).count("dot_general")  # noqa: E731,E501
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", 145)
    assert count() == 2
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", 144)
    assert count() == 17


@pytest.mark.parametrize("unroll_min_tiles", [144, 145])
def test_conv_path_names_the_form_of_the_products_the_program_has(unroll_min_tiles, monkeypatch):
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    x, w = _inputs("3x3_winograd")  # 144 output tiles
    products = str(jax.make_jaxpr(_ours("3x3_winograd"))(x, w)).count("dot_general") - 1
    form = _path("3x3_winograd", products=True)
    assert form == {16: "winograd_unrolled", 1: "winograd_batched"}[products]
    assert _path("3x3_winograd") == "winograd"


def _assert_value_and_both_gradients_match_torch(case):
    _, _, stride, pad, dil, groups = CASES[case]
    x, w = _inputs(case)
    weights = np.random.default_rng(1).standard_normal(
        jax.eval_shape(_ours(case), x, w).shape).astype(np.float32)  # fmt: skip

    def loss(x, w):  # a cotangent that is not all ones
        return jnp.sum(_ours(case)(x, w) * weights)

    y = _ours(case)(x, w)
    dx, dw = jax.grad(loss, argnums=(0, 1))(x, w)

    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)  # NCHW
    wt = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # OIHW
    yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=0 if pad == "VALID" else pad,
                                    dilation=dil, groups=groups)  # fmt: skip
    (yt * torch.tensor(weights.transpose(0, 3, 1, 2))).sum().backward()
    scale = lambda a: 1e-5 * max(1.0, float(np.abs(a).max()))  # noqa: E731
    want_y = yt.detach().numpy().transpose(0, 2, 3, 1)
    want_dx = xt.grad.numpy().transpose(0, 2, 3, 1)
    want_dw = wt.grad.numpy().transpose(2, 3, 1, 0)
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=scale(want_y))
    np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=scale(want_dx))
    np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=scale(want_dw))


@pytest.mark.parametrize("case", ["3x3", "downsample_stride_2_direct", "dilated", "groups_2"])
def test_input_gradient_in_a_scan_body_keeps_the_library_kernel_layout(case, monkeypatch):
    # XLA:CPU moves a convolution to its library layout (kernel labels 01io) only in the
    # entry computation; JAX's own transpose rule leaves 01oi there, run as a loop nest
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", 0)  # "3x3": XLA's convolution
    x, w = _inputs(case)
    conv = _ours(case)
    energy = lambda x: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731

    def step(x, _):
        return x - 0.01 * jax.grad(energy)(x), None

    hlo = jax.jit(lambda x: jax.lax.scan(step, x, None, length=2)[0]).lower(x).compile()
    labels = re.findall(r"dim_labels=(\w+)_(\w+)->", hlo.as_text())
    assert len(labels) >= 2, labels  # the forward and the input gradient's convolution
    assert {kernel for _, kernel in labels} == {"01io"}, labels


# direct (custom VJP), patches, Winograd (custom JVP)
@pytest.mark.parametrize("case,small_output_tiles", [("3x3", 0), ("3x3", 64),
                                                     ("3x3_winograd", 64)])  # fmt: skip
def test_second_order_gradient_matches_jax_autodiff_of_the_lax_convolution(
    case, small_output_tiles, monkeypatch
):
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", small_output_tiles)
    x, w = _inputs(case)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def grad_norm(conv):
        f = lambda x: jnp.sum(jnp.tanh(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)))  # noqa: E731,E501
        return jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(x)

    got, want = grad_norm(conv_general_dilated), grad_norm(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_forward_mode_is_refused_by_jax(monkeypatch):
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", 0)  # XLA's convolution, custom VJP
    x, w = _inputs("3x3")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: _ours("3x3")(x, w), (x,), (x,))


def _torch_float64(x, w, padding, cotangent=None):
    """The NHWC stride-1 convolution in float64 PyTorch (explicit, possibly uneven padding);
    with a ``cotangent``, also the gradients of ``sum(conv * cotangent)`` (input, kernel)."""
    (top, bottom), (left, right) = padding
    x0 = torch.tensor(x.transpose(0, 3, 1, 2), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w.transpose(3, 2, 0, 1), dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.conv2d(torch.nn.functional.pad(x0, (left, right, top, bottom)), wt)
    y = yt.detach().numpy().transpose(0, 2, 3, 1)
    if cotangent is None:
        return y
    (yt * torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=torch.float64)).sum().backward()
    return y, x0.grad.numpy().transpose(0, 2, 3, 1), wt.grad.numpy().transpose(2, 3, 1, 0)


def _direct_conv_count(fn, *args):
    return str(jax.make_jaxpr(fn)(*args)).count("conv_general_dilated")


def _path(case, x=None, w=None, products=False):
    xs, ws, stride, pad, dil, groups = CASES[case]
    x, w = _inputs(case) if x is None else (x, w)
    padding = pad if isinstance(pad, str) else ((pad, pad), (pad, pad))
    return convolution.conv_path(x, w, (stride, stride), padding, rhs_dilation=(dil, dil),
                                 feature_group_count=groups, products=products)  # fmt: skip


def test_winograd_takes_3x3_stride_1_float_convolutions_with_enough_tiles():
    x, w = _inputs("3x3_winograd")
    assert _direct_conv_count(_ours("3x3_winograd"), x, w) == 0
    assert _path("3x3_winograd") == "winograd"
    # 2 x 4 x 4 tiles: one product over gathered patches, no convolution left
    assert _path("3x3") == "gathered_patches"
    assert _direct_conv_count(_ours("3x3"), *_inputs("3x3")) == 0
    assert _path("input_smaller_than_kernel") == "gathered_patches"
    assert _path("patchify_4x4_stride_4") == _path("1x1") == "patchify"
    for case in ("downsample_stride_2", "downsample_stride_2_odd", "downsample_stride_3"):
        assert _path(case) == "gathered_patches"  # strided, few output tiles
        assert _direct_conv_count(_ours(case), *_inputs(case)) == 0
    for case in ("downsample_stride_2_direct", "dilated", "groups_2"):
        assert _path(case) == "direct"
        assert _direct_conv_count(_ours(case), *_inputs(case)) == 1
    half = x.astype(jnp.float16), w.astype(jnp.float16)
    assert _path("3x3_winograd", *half) == "direct"
    assert _direct_conv_count(_ours("3x3_winograd"), *half) == 1


def test_thresholds_are_read_at_trace_time(monkeypatch):
    x, w = _inputs("3x3_winograd")
    monkeypatch.setattr(convolution, "WINOGRAD_MIN_TILES", float("inf"))
    assert _direct_conv_count(_ours("3x3_winograd"), x, w) == 1
    assert _path("3x3_winograd") == "direct"  # 144 tiles >= SMALL_OUTPUT_TILES
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", 0)
    assert _path("3x3") == "direct"
    assert _direct_conv_count(_ours("3x3"), *_inputs("3x3")) == 1
    monkeypatch.setattr(convolution, "SMALL_OUTPUT_TILES", 1000)
    assert _path("3x3_winograd") == "gathered_patches"
    # strided convolutions have their own threshold (306 tiles here)
    assert _path("downsample_stride_2") == "gathered_patches"
    monkeypatch.setattr(convolution, "SMALL_STRIDED_OUTPUT_TILES", 0)
    assert _path("downsample_stride_2") == "direct"
    assert _direct_conv_count(_ours("downsample_stride_2"), *_inputs("downsample_stride_2")) == 1
    monkeypatch.setattr(convolution, "SMALL_STRIDED_OUTPUT_TILES", 307)
    assert _path("downsample_stride_2_direct") == "gathered_patches"
    monkeypatch.setattr(convolution, "SMALL_STRIDED_OUTPUT_TILES", 306)
    assert _path("downsample_stride_2_direct") == "direct"


@pytest.mark.parametrize("unroll_min_tiles", [0, float("inf")])
@pytest.mark.parametrize("padding", [((0, 2), (1, 0)), ((0, 0), (0, 0)), ((2, 1), (0, 3))])
@pytest.mark.parametrize("shape", [(1, 20, 20, 3), (4, 9, 11, 4)])
def test_winograd_matches_a_float64_direct_convolution_for_any_padding(
    shape, padding, unroll_min_tiles, monkeypatch
):
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    rng = np.random.default_rng(2)
    x = rng.standard_normal(shape).astype(np.float32)
    w = rng.standard_normal((3, 3, shape[-1], 5)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)  # noqa: E731
    assert _direct_conv_count(ours, x, w) == 0
    got = np.asarray(ours(x, w), np.float64)
    want = _torch_float64(x, w, padding)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


# the last padding has a side past 2: there the input gradient is JAX's autodiff of Winograd
@pytest.mark.parametrize("unroll_min_tiles", [0, float("inf")])
@pytest.mark.parametrize("padding", [((1, 1), (1, 1)), ((0, 2), (1, 0)), ((2, 1), (0, 3))])
def test_winograd_gradients_match_float64_torch_for_any_padding(
    padding, unroll_min_tiles, monkeypatch
):
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 13, 11, 4)).astype(np.float32)
    w = rng.standard_normal((3, 3, 4, 5)).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    ours = lambda x, w: conv_general_dilated(x, w, (1, 1), padding, dimension_numbers=dn)  # noqa: E731
    assert convolution.conv_path(x, w, (1, 1), padding) == "winograd"  # 70-84 output tiles
    cotangent = rng.standard_normal(jax.eval_shape(ours, x, w).shape).astype(np.float32)
    dx, dw = jax.grad(lambda x, w: jnp.sum(ours(x, w) * cotangent), argnums=(0, 1))(x, w)
    _, want_dx, want_dw = _torch_float64(x, w, padding, cotangent)
    for got, want in ((dx, want_dx), (dw, want_dw)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def test_winograd_gradient_of_mixed_dtype_operands_matches_the_promoted_convolution():
    # float16 input, float32 kernel: float32 Winograd; the input gradient comes back in the
    # input's dtype (autodiff of the transforms: the custom rule takes one dtype only)
    x, w = _inputs("3x3_winograd")
    x16 = jnp.asarray(x, jnp.float16)
    assert _path("3x3_winograd", x16, w) == "winograd"
    energy = lambda conv, cast: lambda x: jnp.sum(conv(cast(x), w) ** 2)  # noqa: E731
    got = jax.grad(energy(_ours("3x3_winograd"), lambda x: x))(x16)
    want = jax.grad(energy(_ours("3x3_winograd"), lambda x: x.astype(jnp.float32)))(x16)
    assert got.dtype == want.dtype == jnp.float16
    np.testing.assert_allclose(np.float32(got), np.float32(want), rtol=0,
                               atol=2e-3 * float(np.abs(np.float32(want)).max()))  # fmt: skip


def _jaxpr_eqns(jaxpr):
    """Every equation of a jaxpr and of the jaxprs nested in its equations' parameters."""
    for eqn in jaxpr.eqns:
        yield eqn
        for param in eqn.params.values():
            for sub in param if isinstance(param, (tuple, list)) else (param,):
                if hasattr(sub, "jaxpr") or hasattr(sub, "eqns"):
                    yield from _jaxpr_eqns(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("unroll_min_tiles", [0, float("inf")])
def test_winograd_input_gradient_is_a_winograd_convolution_of_the_cotangent(
    unroll_min_tiles, monkeypatch
):
    # JAX's autodiff of the transforms scatters into the input (each strided slice's
    # transpose is a pad with interior padding) and transposes the 16 products; the custom
    # JVP instead reads the cotangent's tiles and transforms the flipped kernel: 16 (or 1
    # batched) products again, after a second kernel transform
    monkeypatch.setattr(convolution, "WINOGRAD_UNROLL_MIN_TILES", unroll_min_tiles)
    x, w = _inputs("3x3_winograd")
    energy = lambda x: jnp.sum(jnp.sin(_ours("3x3_winograd")(x, w)))  # noqa: E731
    forward = list(_jaxpr_eqns(jax.make_jaxpr(energy)(x).jaxpr))
    both = list(_jaxpr_eqns(jax.make_jaxpr(jax.value_and_grad(energy))(x).jaxpr))
    products = lambda eqns: sum(e.primitive.name == "dot_general" for e in eqns)  # noqa: E731
    assert products(forward) == (17 if unroll_min_tiles == 0 else 2)
    assert products(both) == 2 * products(forward)
    interior = [cfg for e in both if e.primitive.name == "pad"
                for cfg in e.params["padding_config"] if cfg[2]]  # fmt: skip
    assert interior == []


def test_winograd_is_as_accurate_as_the_direct_float32_convolution():
    # the transforms only add, subtract and halve (Lavin & Gray 2016, F(2, 3)): the error
    # to a float64 reference stays at the direct convolution's level
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 32, 32, 64)).astype(np.float32)
    w = (rng.standard_normal((3, 3, 64, 64)) / 24).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((1, 1), (1, 1)))
    truth = _torch_float64(x, w, args[1])
    err = lambda conv: np.abs(np.asarray(conv(x, w, *args, dimension_numbers=dn)) - truth).max()  # noqa: E731,E501
    assert err(conv_general_dilated) <= 2 * err(jax.lax.conv_general_dilated)


def test_winograd_supports_forward_mode():
    x, w = _inputs("3x3_winograd")
    t = np.random.default_rng(4).standard_normal(x.shape).astype(np.float32)
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
    args = ((1, 1), ((1, 1), (1, 1)))
    f = lambda conv: lambda x: jnp.tanh(conv(x, w, *args, dimension_numbers=dn))  # noqa: E731
    _, got = jax.jvp(f(conv_general_dilated), (x,), (t,))
    _, want = jax.jvp(f(jax.lax.conv_general_dilated), (x,), (t,))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(np.abs(want).max()))
