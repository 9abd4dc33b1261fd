"""CADS: golden annealing schedule, identities, rescaling, mixing, and all three samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdiv
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance import StepContext
from jaxdiv.guidance.cads import cads, cads_gamma, cads_time
from toy.conditional import ring_of_classes


def ctx_at(t, num_steps=20, key=0, noise_level=1.0):
    """A StepContext whose progress is ``t`` (``step = (1 - t) * num_steps``)."""
    step = round((1.0 - t) * num_steps)
    return StepContext(None, 0.5, 1.0, noise_level, jnp.int32(step), num_steps,
                       jax.random.key(key), None)  # fmt: skip


def test_gamma_golden_values():
    # PAPERS.md: gamma = 1 (t <= tau1), (tau2 - t)/(tau2 - tau1), 0 (t >= tau2)
    ts = jnp.array([0.0, 0.5, 0.6, 0.66, 0.75, 0.84, 0.9, 0.95, 1.0])
    np.testing.assert_allclose(cads_gamma(ts, 0.6, 0.9),
                               [1, 1, 1, 0.8, 0.5, 0.2, 0, 0, 0], atol=1e-6)  # fmt: skip
    np.testing.assert_allclose(cads_gamma(jnp.array([0.3, 0.55, 0.7, 0.8]), 0.3, 0.8),
                               [1, 0.5, 0.2, 0], atol=1e-6)  # fmt: skip


def test_time_maps():
    ctx = StepContext(None, 0.25, 0.75, 0.25, jnp.int32(3), 12, None, None)
    assert float(cads_time(ctx)) == pytest.approx(0.75)  # 1 - 3/12
    # "flow": the rectified-flow time of the noise level; on a flow process it is t itself
    assert float(cads_time(ctx, "flow")) == pytest.approx(0.25)
    assert float(cads_time(ctx, lambda c: c.t * 2)) == pytest.approx(0.5)
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    flow_start = StepContext(None, one, zero, one, jnp.int32(0), 12, None, None)  # alpha = 0
    assert float(cads_time(flow_start, "flow")) == 1.0
    with pytest.raises(ValueError, match="time must be one of"):
        cads_time(ctx, "sigma")


@pytest.mark.parametrize("t", [0.0, 0.5, 0.7, 0.85, 1.0])
def test_noise_scale_zero_is_identity(t):
    y = jax.random.normal(jax.random.key(1), (4, 3, 5)) * 2 + 0.5
    out, _, info = cads(noise_scale=0.0).apply((), y, ctx_at(t))
    np.testing.assert_allclose(out, y, rtol=1e-5, atol=1e-5)
    # before tau1 the condition is untouched whatever the noise or mixing
    if t <= 0.6:
        out, _, _ = cads(noise_scale=3.0, psi=0.3).apply((), y, ctx_at(t))
        np.testing.assert_allclose(out, y, rtol=1e-6, atol=1e-6)


@jax.jit
def _cads_at(y, t, s, seed):
    ctx = StepContext(None, 0.5, 1.0, 1.0, jnp.round((1.0 - t) * 1000).astype(jnp.int32), 1000,
                      jax.random.key(seed), None)  # fmt: skip
    return cads(noise_scale=s, psi=1.0).apply((), y, ctx)


@settings(max_examples=12, deadline=None)
@given(
    shape=st.sampled_from([(3, 4), (2, 5, 3), (5, 16)]),
    t=st.floats(0.65, 1.0),
    s=st.floats(0.05, 2.0),
    seed=st.integers(0, 2**16),
)
def test_rescaled_embeddings_keep_mean_and_std(shape, t, s, seed):
    y = jax.random.normal(jax.random.key(seed), shape) * 1.7 - 0.3
    out, _, info = _cads_at(y, t, s, seed)
    axes = tuple(range(1, len(shape)))
    np.testing.assert_allclose(out.mean(axes), y.mean(axes), atol=1e-4)
    np.testing.assert_allclose(out.std(axes), y.std(axes), rtol=1e-4)
    assert float(info.gamma) < 1.0
    assert not np.allclose(out, y, atol=1e-3)  # and the embedding did change


def test_psi_mixes_rescaled_and_raw():
    y = jax.random.normal(jax.random.key(2), (3, 8)) + 1.0
    ctx = ctx_at(0.8, key=7)  # gamma = 1/3
    raw, _, _ = cads(noise_scale=0.5, rescale=False).apply((), y, ctx)
    res, _, _ = cads(noise_scale=0.5, psi=1.0).apply((), y, ctx)
    mixed, _, _ = cads(noise_scale=0.5, psi=0.25).apply((), y, ctx)
    np.testing.assert_allclose(mixed, 0.25 * res + 0.75 * raw, rtol=1e-5, atol=1e-5)
    # y_hat = sqrt(gamma) y + s sqrt(1 - gamma) n (PAPERS.md), n drawn for sample b of
    # leaf 0 from fold_in(fold_in(ctx.key, 0), b), as the docstring says
    n = np.stack([np.asarray(jax.random.normal(
        jax.random.fold_in(jax.random.fold_in(ctx.key, 0), b), (8,))) for b in range(3)])
    y64 = np.asarray(y, np.float64)
    y_hat = np.sqrt(1 / 3) * y64 + 0.5 * np.sqrt(2 / 3) * n
    np.testing.assert_allclose(raw, y_hat, rtol=1e-5, atol=1e-6)
    # rescaled to each sample's mean and (population) std of y
    m_in, s_in = y64.mean(1, keepdims=True), y64.std(1, keepdims=True)
    m_hat, s_hat = y_hat.mean(1, keepdims=True), y_hat.std(1, keepdims=True)
    np.testing.assert_allclose(res, (y_hat - m_hat) / s_hat * s_in + m_in, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cads(noise_scale=0.5, psi=0.0).apply((), y, ctx)[0], raw,
                               rtol=1e-6)  # fmt: skip


def test_noise_is_per_sample_and_fresh_each_evaluation():
    y = jnp.ones((5, 6)) * jnp.arange(6)
    g = cads(noise_scale=1.0, rescale=False)
    a, _, _ = g.apply((), y, ctx_at(1.0, key=3))
    b, _, _ = g.apply((), y[:2], ctx_at(1.0, key=3))
    np.testing.assert_allclose(a[:2], b, rtol=1e-6)  # independent of the batch size
    assert not np.allclose(a[0], a[1])  # but different for each sample
    c, _, _ = g.apply((), y, ctx_at(1.0, key=4))
    assert not np.allclose(a, c)


def test_pytree_conditions_and_degenerate_rows():
    tokens = jnp.arange(6).reshape(2, 3)
    cond = {"emb": jnp.zeros((2, 4)).at[1].set(jnp.arange(4.0)), "ids": tokens}
    out, _, _ = cads(noise_scale=0.0).apply((), cond, ctx_at(0.95))
    np.testing.assert_array_equal(out["ids"], tokens)  # integer leaves pass through
    # a zero (null) embedding cannot be standardised: it is left as the (zero) y_hat
    np.testing.assert_allclose(out["emb"], cond["emb"], atol=1e-6)
    noisy, _, _ = cads(noise_scale=1.0).apply((), cond, ctx_at(0.95))
    assert bool(jnp.all(jnp.isfinite(noisy["emb"])))
    np.testing.assert_allclose(noisy["emb"][0], 0.0, atol=1e-6)  # the null stays null


def test_bad_input():
    with pytest.raises(ValueError, match=r"need tau1 < tau2, got tau1=0.9, tau2=0.6$"):  # as given
        cads(tau1=0.9, tau2=0.6)
    with pytest.raises(ValueError, match=r"psi must be a finite number >= 0 and <= 1, got 1.5"):
        cads(psi=1.5)
    with pytest.raises(ValueError, match=r"noise_scale must be a finite number >= 0, got -1.0"):
        cads(noise_scale=-1.0)
    with pytest.raises(TypeError, match="rescale must be a bool"):
        cads(rescale=1)
    with pytest.raises(ValueError, match="time must be one of"):
        cads(time="sigma")
    with pytest.raises(TypeError, match="tau1 must be a real number"):
        cads(tau1="a")
    # class labels: nothing to anneal, CADS would never act
    with pytest.raises(TypeError, match=r"cads: the condition has no floating-point leaf to "
                                        r"anneal \(got dtypes \['int32'\]\)"):
        cads(noise_scale=1.0).apply((), jnp.arange(3), ctx_at(0.95))


@pytest.mark.parametrize("name", ["ddim", "edm", "flow_euler"])
def test_cads_with_cfg_on_every_sampler(name):
    """On each sampler: gamma in the trace follows the schedule of ctx.progress; s = 0 gives
    exactly CFG's samples; s > 0 spreads a class-conditional batch over other classes
    early on, which spreads the final samples out."""
    cm = ring_of_classes()
    if name == "ddim":
        s = samplers.ddim(schedules.vp_linear(), 10)
    elif name == "edm":
        s = samplers.edm(schedules.edm(), 10)
    else:
        s = samplers.flow_euler(schedules.flow(), 10)
    den = cm.denoiser(s.schedule)
    n = 256
    noise = jax.random.normal(jax.random.key(5), (n, 2))
    cond = jnp.broadcast_to(cm.condition(0), (n, cm.cond_dim))

    @jax.jit
    def run(scale, z, c):
        g = guidance.chain(cads(tau1=0.2, tau2=0.9, noise_scale=scale), guidance.cfg(2.0))
        return jaxdiv.sample(s, den, z, key=jax.random.key(6), cond=c, guidance=g, trace=True)

    zero, noisy = run(0.0, noise, cond), run(1.0, noise, cond)
    progress = 1.0 - jnp.arange(10) / 10
    np.testing.assert_allclose(zero.trace.info["cads"].gamma, cads_gamma(progress, 0.2, 0.9),
                               atol=1e-6)  # fmt: skip
    plain = jaxdiv.sample(s, den, noise, key=jax.random.key(6), cond=cond,
                          guidance=guidance.cfg(2.0))  # fmt: skip
    np.testing.assert_allclose(zero.x0, plain.x0, atol=1e-4)
    assert bool(jnp.all(jnp.isfinite(noisy.x0)))
    spread = lambda x: float(jnp.mean(jnp.linalg.norm(x[:, None] - x[None], axis=-1)))
    assert spread(noisy.x0) > spread(zero.x0) + 0.2  # measured: +0.35 (VP) to +0.64 (EDM)


def test_gradients_stay_finite_for_conditions_constant_per_sample():
    """``jax.grad`` through CADS where a sample's condition has zero spread (``jnp.std``'s
    gradient is NaN there). A one-dimensional condition is rescaled back to itself (its
    own mean, zero std) with ``psi = 1``, in a neighbourhood too, so the guided run's
    gradient is the CFG-only run's; with a constant 4-D condition and ``psi < 1`` the raw
    noisy embedding enters, and the gradient in ``psi`` matches central differences
    (float64)."""
    from tests.conftest import central_difference, random_gmm

    sch = schedules.edm()
    den0 = random_gmm(jax.random.key(3)).denoiser(sch)
    den = lambda x, t, c: den0(x, t) + 0.3 * jnp.mean(c, -1, keepdims=True)  # noqa: E731
    s = samplers.edm(sch, 6)
    noise = jax.random.normal(jax.random.key(0), (4, 2))
    weights = jnp.arange(1.0, 9.0).reshape(4, 2)

    def total(cond, g):
        out = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, guidance=g)
        return jnp.sum(out.x0 * weights)

    cond = jnp.array([[0.5], [-1.0], [2.0], [0.1]])
    cads_cfg = guidance.chain(cads(noise_scale=0.25), guidance.cfg(2.0))
    g_cads = jax.grad(total)(cond, cads_cfg)
    assert np.isfinite(np.asarray(g_cads)).all()
    np.testing.assert_allclose(g_cads, jax.grad(total)(cond, guidance.cfg(2.0)), rtol=1e-5)

    # in float64: float32 central differences of this ~280-sized sum carry ~1e-2 of noise
    with jax.enable_x64(True):
        noise = noise.astype(jnp.float64)
        flat = jnp.broadcast_to(cond.astype(jnp.float64), (4, 4))
        f = jax.jit(lambda psi: total(flat, guidance.chain(cads(noise_scale=0.25, psi=psi),
                                                           guidance.cfg(2.0))))  # fmt: skip
        grad = float(jax.grad(f)(0.5))
        fd = float(central_difference(f, jnp.float64(0.5), 1e-2))
    assert np.isfinite(grad) and abs(grad) > 1.0
    assert grad == pytest.approx(fd, rel=1e-6)
