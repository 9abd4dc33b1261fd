"""group_norm against float64 PyTorch: values, reverse and forward mode, second order."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxdiv.models.layers import GroupNorm  # noqa: E402
from jaxdiv.models.normalization import group_norm  # noqa: E402

# (shape, groups): images, tokens, a bare (B, C) and a 3-D volume
CASES = [((2, 5, 6, 8), 4), ((3, 7, 12), 3), ((4, 6), 2), ((1, 3, 4, 5, 8), 8)]
EPS = 1e-5


def _inputs(shape, seed=0, offset=0.0):
    rng = np.random.default_rng(seed)
    c = shape[-1]
    x = rng.standard_normal(shape) * 0.7 + offset
    scale, bias = rng.standard_normal(c) + 1.0, rng.standard_normal(c)
    weight = rng.standard_normal(shape)  # the cotangent of the loss below
    return x, scale, bias, weight


def _torch_gn(x, scale, bias, groups):
    """torch's group_norm on a channels-last float64 tensor (moved to channels-first)."""
    xt = torch.movedim(x, -1, 1).contiguous()
    return torch.movedim(torch.nn.functional.group_norm(xt, groups, scale, bias, EPS), 1, -1)


def _t(a):
    return torch.tensor(np.asarray(a, np.float64))


@pytest.mark.parametrize("shape,groups", CASES)
@pytest.mark.parametrize("offset", [0.0, 300.0])
def test_values_match_torch(shape, groups, offset):
    # Offset 300 at std 0.7: the float32 mean carries ~eps32 * 300 of rounding, which the
    # normalisation divides by the std (the bound below); a one-pass E[x^2] - E[x]^2 would
    # lose ~eps32 * 300^2 / 0.7^2 ~ 2e-2 and fail it.
    x, scale, bias, _ = _inputs(shape, offset=offset)
    x = x.astype(np.float32)  # torch sees the same rounded input
    got = group_norm(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias), groups, EPS)
    want = _torch_gn(_t(x), _t(scale), _t(bias), groups).numpy()
    assert got.dtype == jnp.float32 and got.shape == shape
    eps32 = np.finfo(np.float32).eps
    atol = 8 * eps32 * (np.abs(want).max() + offset / 0.7 * np.abs(scale).max())
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=atol)


@pytest.mark.parametrize("shape,groups", CASES)
def test_gradients_match_torch(shape, groups):
    x, scale, bias, weight = _inputs(shape, seed=1)

    def loss(x, s, b):
        return jnp.sum(jax.nn.silu(group_norm(x, s, b, groups, EPS)) * weight)

    got = jax.grad(loss, argnums=(0, 1, 2))(
        *(jnp.asarray(a, jnp.float32) for a in (x, scale, bias)))
    leaves = [_t(a).requires_grad_(True) for a in (x, scale, bias)]
    (torch.nn.functional.silu(_torch_gn(*leaves, groups)) * _t(weight)).sum().backward()
    for name, g, leaf in zip(("x", "scale", "bias"), got, leaves, strict=True):
        want = leaf.grad.numpy()
        np.testing.assert_allclose(np.asarray(g), want, rtol=1e-4,
                                   atol=1e-5 * np.abs(want).max(), err_msg=name)  # fmt: skip


@pytest.mark.parametrize("shape,groups", CASES[:2])
def test_forward_mode_matches_torch(shape, groups):
    x, scale, bias, _ = _inputs(shape, seed=2)
    dx, dscale, dbias, _ = _inputs(shape, seed=3)
    primals = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias)]
    tangents = [jnp.asarray(a, jnp.float32) for a in (dx, dscale, dbias)]

    def f(x, s, b):
        return group_norm(x, s, b, groups, EPS)

    def ft(x, s, b):
        return _torch_gn(x, s, b, groups)

    _, all_tangent = jax.jvp(f, primals, tangents)
    _, x_only = jax.jvp(lambda x: f(x, *primals[1:]), primals[:1], tangents[:1])
    _, scale_only = jax.jvp(lambda s: f(primals[0], s, primals[2]), primals[1:2], tangents[1:2])
    tp = [_t(a) for a in (x, scale, bias)]
    tt = [_t(a) for a in (dx, dscale, dbias)]
    want_all = torch.func.jvp(ft, tuple(tp), tuple(tt))[1].numpy()
    want_x = torch.func.jvp(lambda x: ft(x, *tp[1:]), (tp[0],), (tt[0],))[1].numpy()
    want_s = torch.func.jvp(lambda s: ft(tp[0], s, tp[2]), (tp[1],), (tt[1],))[1].numpy()
    for got, want in ((all_tangent, want_all), (x_only, want_x), (scale_only, want_s)):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=2e-5)


def test_second_order_matches_torch():
    shape, groups = (2, 4, 5, 6), 3
    x, scale, bias, weight = _inputs(shape, seed=4)
    v = _inputs(shape, seed=5)[0]

    def loss(x):
        y = group_norm(x, jnp.asarray(scale, jnp.float32), jnp.asarray(bias, jnp.float32),
                       groups, EPS)  # fmt: skip
        return jnp.sum(jnp.tanh(y) * weight)

    # Hessian-vector product, forward-over-reverse: the custom rule differentiated again
    hvp = jax.jvp(jax.grad(loss), (jnp.asarray(x, jnp.float32),),
                  (jnp.asarray(v, jnp.float32),))[1]  # fmt: skip
    xt = _t(x).requires_grad_(True)
    (g,) = torch.autograd.grad((torch.tanh(_torch_gn(xt, _t(scale), _t(bias), groups))
                                * _t(weight)).sum(), xt, create_graph=True)  # fmt: skip
    (want,) = torch.autograd.grad((g * _t(v)).sum(), xt)
    np.testing.assert_allclose(np.asarray(hvp), want.numpy(), rtol=1e-3,
                               atol=1e-4 * np.abs(want.numpy()).max())  # fmt: skip


def _reductions(jaxpr):
    """Every reduce_sum of a jaxpr (nested ones included): (operand shape, axes)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "reduce_sum":
            found.append((eqn.invars[0].aval.shape, tuple(eqn.params["axes"])))
        for sub in jax.core.jaxprs_in_params(eqn.params):
            found += _reductions(sub)
    return found


def test_statistics_and_gradient_reduce_per_channel():
    # The speed reason for normalization.py (benchmarks.group_norm): full-size reductions
    # keep the channel axis (the contiguous lanes of a channels-last array) and sum groups
    # only at (B, C) size -- in the module's forward and in its input gradient.
    gn = GroupNorm(4, 8)
    x, _, _, weight = (jnp.asarray(a, jnp.float32) for a in _inputs((2, 6, 6, 8)))

    def loss(x):
        return jnp.sum(gn(x) * weight)

    for fn in (loss, jax.grad(loss)):
        found = _reductions(jax.make_jaxpr(fn)(x).jaxpr)
        full = [(shape, axes) for shape, axes in found  # the loss's own sum excluded
                if np.prod(shape) == x.size and len(axes) < len(shape)]
        assert full and all(axes == (1, 2) for _, axes in full), found


def test_module_keeps_dtype_and_differentiates_in_it():
    gn = GroupNorm(2, 4, dtype=jnp.bfloat16)
    x = jnp.asarray(_inputs((2, 3, 3, 4))[0], jnp.bfloat16)
    y = gn(x)
    assert y.dtype == jnp.bfloat16
    g = jax.grad(lambda x: jnp.sum(gn(x).astype(jnp.float32) ** 2))(x)
    assert g.dtype == jnp.bfloat16 and bool(jnp.isfinite(g).all())
    ref = group_norm(x.astype(jnp.float32), jnp.ones(4), jnp.zeros(4), 2, gn.eps)
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), atol=2e-2)


def test_vmap_and_jit_agree_with_the_plain_call():
    x, scale, bias, _ = (jnp.asarray(a, jnp.float32) for a in _inputs((3, 2, 4, 4, 6)))
    f = jax.jit(jax.vmap(lambda x: group_norm(x, scale, bias, 3, EPS)))
    np.testing.assert_allclose(np.asarray(f(x)),
                               np.stack([group_norm(xi, scale, bias, 3, EPS) for xi in x]),
                               atol=1e-6)  # fmt: skip


def test_an_empty_batch_gives_an_empty_result():
    x = jnp.ones((0, 4, 4, 8))
    assert group_norm(x, jnp.ones(8), jnp.zeros(8), 4, EPS).shape == (0, 4, 4, 8)
    assert jax.grad(lambda x: group_norm(x, jnp.ones(8), jnp.zeros(8), 4, EPS).sum())(x).shape \
        == (0, 4, 4, 8)


@pytest.mark.parametrize(
    "shape,groups,scale_shape,match",
    [((2, 4, 6), 4, (6,), "positive divisor of the channel count 6"),
     ((2, 4, 6), 0, (6,), "positive divisor"),
     ((2, 4, 6), 3, (4,), r"scale must have shape \(6,\), got \(4,\)"),
     ((6,), 3, (6,), "ndim >= 2")])  # fmt: skip
def test_bad_arguments_are_named(shape, groups, scale_shape, match):
    with pytest.raises(ValueError, match=match):
        group_norm(jnp.ones(shape), jnp.ones(scale_shape), jnp.zeros(shape[-1]), groups, EPS)
