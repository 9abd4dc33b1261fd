"""``layers.conv_general_dilated``: the ports' convolution, its values and gradients against
PyTorch's, and an input gradient XLA:CPU runs in its library layout inside a loop body."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv.models.layers import conv_general_dilated

torch = pytest.importorskip("torch")

# name: (input NHWC, kernel HWIO, stride, padding per side or "VALID", dilation, groups)
CASES = {
    "3x3": ((2, 8, 8, 6), (3, 3, 6, 5), 1, 1, 1, 1),
    "downsample_stride_2": ((2, 8, 8, 6), (3, 3, 6, 5), 2, 1, 1, 1),
    "1x1": ((2, 5, 5, 6), (1, 1, 6, 4), 1, 0, 1, 1),
    "patchify_4x4_stride_4": ((2, 8, 8, 3), (4, 4, 3, 5), 4, "VALID", 1, 1),
    "dilated": ((2, 9, 9, 4), (3, 3, 4, 3), 1, 2, 2, 1),
    "groups_2": ((2, 6, 6, 6), (3, 3, 3, 4), 1, 1, 1, 2),
    "input_smaller_than_kernel": ((3, 2, 2, 8), (3, 3, 8, 4), 1, 1, 1, 1),  # patch product
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


@pytest.mark.parametrize("case", ["3x3", "downsample_stride_2", "dilated", "groups_2"])
def test_input_gradient_in_a_scan_body_keeps_the_library_kernel_layout(case):
    # XLA:CPU moves a convolution to its library layout (kernel labels 01io) only in the
    # entry computation; JAX's own transpose rule leaves 01oi there, run as a loop nest
    x, w = _inputs(case)
    conv = _ours(case)
    energy = lambda x: jnp.sum(jnp.sin(conv(x, w)))  # noqa: E731

    def step(x, _):
        return x - 0.01 * jax.grad(energy)(x), None

    hlo = jax.jit(lambda x: jax.lax.scan(step, x, None, length=2)[0]).lower(x).compile()
    labels = re.findall(r"dim_labels=(\w+)_(\w+)->", hlo.as_text())
    assert len(labels) >= 2, labels  # the forward and the input gradient's convolution
    assert {kernel for _, kernel in labels} == {"01io"}, labels


def test_second_order_gradient_matches_jax_autodiff_of_the_lax_convolution():
    x, w = _inputs("3x3")
    dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))

    def grad_norm(conv):
        f = lambda x: jnp.sum(jnp.tanh(conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)))  # noqa: E731,E501
        return jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2))(x)

    got, want = grad_norm(conv_general_dilated), grad_norm(jax.lax.conv_general_dilated)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(np.abs(want).max()))


def test_forward_mode_is_refused_by_jax():
    x, w = _inputs("3x3")
    with pytest.raises(TypeError, match="custom_vjp"):
        jax.jvp(lambda x: _ours("3x3")(x, w), (x,), (x,))
