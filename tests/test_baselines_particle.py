"""Particle guidance: the force is -grad of the RBF potential, equivariance, options, samplers."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdiv
import toy
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance import GuidanceTerm, StepContext
from jaxdiv.guidance.particle import median_bandwidth, particle, rbf_potential, rbf_repulsion


def ctx(x, level=2.0, alpha=1.0):
    """A StepContext at noise level ``level`` (``sigma = level * alpha``); alpha = 1 is an
    EDM-like process."""
    return StepContext(x, level, alpha, level * alpha, jnp.int32(0), 10, jax.random.key(0), None)


# jaxdiv's x0 variant (the default before protocol v2), spelled out
X0_VARIANT = dict(space="x0_hat", time_scaling="x0", min_noise_level=1.0)


@jax.jit
def _force_and_grad(z, h):
    return rbf_repulsion(z, h), -jax.grad(rbf_potential)(z, h)


@settings(max_examples=10, deadline=None)
@given(b=st.sampled_from([3, 6]), d=st.sampled_from([1, 3]), seed=st.integers(0, 2**16),
       fixed=st.booleans())  # fmt: skip
def test_force_is_minus_grad_of_rbf_potential(b, d, seed, fixed):
    z = jax.random.normal(jax.random.key(seed), (b, d))
    h = jnp.float32(0.7) if fixed else median_bandwidth(z)
    f, g = _force_and_grad(z, h)
    np.testing.assert_allclose(f, g, rtol=1e-4, atol=1e-5)
    # PAPERS.md: F_i = sum_j 2 w_ij (x_i - x_j) / h
    zn = np.asarray(z, np.float64)
    diff = zn[:, None] - zn[None]
    w = np.exp(-np.sum(diff**2, -1) / float(h))
    np.testing.assert_allclose(f, np.einsum("ij,ijd->id", 2 * w / float(h), diff),
                               rtol=1e-4, atol=1e-5)  # fmt: skip


def test_median_bandwidth_excludes_self_pairs():
    z = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [3.0, 4.0]])
    d2 = [9, 16, 25, 25, 16, 9]  # the 6 pairs i < j
    assert float(median_bandwidth(z)) == pytest.approx(np.median(d2) / math.log(3), rel=1e-6)
    with pytest.raises(ValueError, match=">= 3 particles"):
        median_bandwidth(z[:2])


def test_term_is_permutation_equivariant_and_pushes_apart():
    x0 = jax.random.normal(jax.random.key(1), (6, 2, 3))  # non-flat samples work too
    perm = jnp.array([3, 0, 5, 1, 4, 2])
    g = particle(0.3)
    out, _, info = g.apply((), x0, ctx(x0))
    out_p, _, _ = g.apply((), x0[perm], ctx(x0[perm]))
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-6)
    flat = x0.reshape(6, -1), out.reshape(6, -1)
    mean_dist = lambda x: float(jnp.mean(jnp.linalg.norm(x[:, None] - x[None], axis=-1)))
    assert mean_dist(flat[1]) > mean_dist(flat[0])
    # default (paper): weight strength * (sigma/alpha)^2 = 0.3 * 2^2
    assert float(info.shift_norm) > 0 and float(info.weight) == pytest.approx(1.2)


def test_single_particle_is_unchanged():
    x0 = jnp.ones((1, 4))
    for g in (particle(1.0), particle(1.0, bandwidth=0.5, space="x_t")):
        out, _, info = g.apply((), x0, ctx(x0 + 1.0))
        np.testing.assert_array_equal(out, x0)
        assert float(info.shift_norm) == 0.0


def test_update_formula_for_each_option():
    x0 = jax.random.normal(jax.random.key(2), (5, 3))
    xt = 4.0 * jax.random.normal(jax.random.key(3), (5, 3))
    level = 2.5
    h0, ht = median_bandwidth(x0), median_bandwidth(xt)
    cases = [
        (particle(0.2), 0.2 * level**2 * rbf_repulsion(xt, ht)),  # the paper's default
        (particle(0.2, **X0_VARIANT), 0.2 * rbf_repulsion(x0, h0)),
        (particle(0.2, space="x_t", time_scaling="x0"), 0.2 * rbf_repulsion(xt, ht)),
        (particle(0.2, space="x0_hat"), 0.2 * level**2 * rbf_repulsion(x0, h0)),
        (particle(0.2, bandwidth=1.5, **X0_VARIANT), 0.2 * rbf_repulsion(x0, 1.5)),
        (particle(0.2, bandwidth=1.5), 0.2 * level**2 * rbf_repulsion(xt, 1.5)),
    ]
    for g, shift in cases:
        out, _, _ = g.apply((), x0, ctx(xt, level))
        np.testing.assert_allclose(out - x0, shift, rtol=1e-4, atol=1e-6)


def paper_force(x):
    """The paper's force, written here independently in float64 NumPy: ``F = -grad_x U(x)``,
    ``U = sum_{i<j} exp(-|x_i - x_j|^2 / h)`` on flattened particles, with the median
    bandwidth ``h = median_{i<j} |x_i - x_j|^2 / log(B - 1)`` held fixed (PAPERS.md).
    Returns ``(F, h)``; ``F`` is checked against central differences of ``U``."""
    z = np.asarray(x, np.float64).reshape(len(x), -1)
    b = z.shape[0]
    d2 = lambda u: np.sum((u[:, None] - u[None]) ** 2, -1)
    h = float(np.median(d2(z)[np.triu_indices(b, 1)]) / np.log(b - 1))
    potential = lambda u: float(np.sum(np.triu(np.exp(-d2(u) / h), 1)))
    diff = z[:, None] - z[None]
    f = np.einsum("ij,ijd->id", 2.0 * np.exp(-d2(z) / h) / h, diff)
    eps = 1e-6 * np.sqrt(h)
    fd = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        e = np.zeros_like(z)
        e[idx] = eps
        fd[idx] = -(potential(z + e) - potential(z - e)) / (2 * eps)
    np.testing.assert_allclose(f, fd, rtol=1e-5, atol=1e-7 * np.abs(f).max())
    return f.reshape(np.shape(x)), h


@pytest.mark.parametrize("level", [80.0, 2.5, 1.0, 0.3, 0.01])
def test_default_is_the_papers_formulation(level):
    """Default ``particle(s)``: the force -grad U on the noisy particles x_t (median
    bandwidth) added to the score, i.e. an x0 shift ``s (sigma/alpha)^2 F(x_t)``, at every
    noise level; ``min_noise_level=1.0`` (PG's public code) switches it off below 1."""
    x0 = jax.random.normal(jax.random.key(10), (6, 2, 2))
    xt = x0 + level * jax.random.normal(jax.random.key(11), (6, 2, 2))  # alpha = 1
    f, h = paper_force(xt)
    shift = 0.2 * level**2 * f
    out, _, info = particle(0.2).apply((), x0, ctx(xt, level))
    tol = 1e-5 * np.abs(shift).max() + 1e-6
    np.testing.assert_allclose(out - x0, shift, rtol=1e-4, atol=tol)
    assert float(info.bandwidth) == pytest.approx(h, rel=1e-5)
    assert float(info.weight) == pytest.approx(0.2 * level**2, rel=1e-6)
    out_pg, _, info_pg = particle(0.2, min_noise_level=1.0).apply((), x0, ctx(xt, level))
    if level >= 1.0:
        np.testing.assert_array_equal(out_pg, out)
    else:
        np.testing.assert_array_equal(out_pg, x0)
        assert float(info_pg.weight) == 0.0 and float(info_pg.shift_norm) == 0.0


def _paper_apply(strength, state, x0_hat, ctx):
    """An in-test term with the paper's update, via autodiff of an in-test potential."""
    z = ctx.x.reshape(ctx.x.shape[0], -1)
    b = z.shape[0]
    d2 = lambda u: jnp.sum((u[:, None] - u[None]) ** 2, -1)
    h = jax.lax.stop_gradient(jnp.median(d2(z)[np.triu_indices(b, 1)]) / math.log(b - 1))
    potential = lambda u: jnp.sum(jnp.triu(jnp.exp(-d2(u) / h), 1))
    force = -jax.grad(potential)(z).reshape(ctx.x.shape)
    return x0_hat + strength * ctx.noise_level**2 * force, state, ()


def test_default_matches_an_independent_implementation_along_a_trajectory():
    """Inside sample() (EDM, Heun: two evaluations per step) the default term gives the
    trajectory of an in-test implementation of the paper's update."""
    gm = ring()
    s = samplers.edm(schedules.edm(), 8)
    noise = jax.random.normal(jax.random.key(12), (6, 2))
    paper = GuidanceTerm(lambda x, c, k: (), jax.tree_util.Partial(_paper_apply, 0.3), "x0")
    got = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=jax.random.key(0),
                        guidance=particle(0.3), trace=True)  # fmt: skip
    ref = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=jax.random.key(0),
                        guidance=paper, trace=True)  # fmt: skip
    np.testing.assert_allclose(got.trace.x0_hat, ref.trace.x0_hat, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(got.x0, ref.x0, rtol=1e-4, atol=1e-4)
    iid = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=jax.random.key(0)).x0
    assert float(jnp.abs(got.x0 - iid).max()) > 0.1  # the guidance did act


def test_score_scaling_is_tweedies_map_when_alpha_is_not_one():
    """A score term ``s F(x_t)`` moves ``x0_hat = (x_t + sigma^2 score) / alpha`` by
    ``s sigma^2 / alpha F(x_t)``; with the median bandwidth this equals
    ``s (sigma/alpha)^2 F(x_t / alpha)``, the same update written in ``x_t / alpha``."""
    alpha, level = 0.2, 4.0
    sigma = alpha * level
    x0 = jax.random.normal(jax.random.key(13), (5, 3))
    xt = alpha * x0 + sigma * jax.random.normal(jax.random.key(14), (5, 3))
    f, _ = paper_force(xt)
    np.testing.assert_allclose(0.2 * sigma**2 / alpha * f,
                               0.2 * level**2 * paper_force(xt / alpha)[0], rtol=1e-6)  # fmt: skip
    out, _, _ = particle(0.2).apply((), x0, ctx(xt, level, alpha))
    np.testing.assert_allclose(out - x0, 0.2 * sigma**2 / alpha * f, rtol=1e-4, atol=1e-5)


def _public_sd_code_eps(latents, noise_pred, level, coeff, h):
    """PG's public SD code's update of the noise prediction (non-SVGD branch), transcribed
    in NumPy from gcorso/particle-guidance,
    stable_diffusion/diffusers/pipelines/stable_diffusion/pipeline_stable_diffusion_particle.py
    lines 739-761, with its per-row median bandwidth ``h_t`` replaced by a fixed ``h``:
    the other particles' differences (diagonal removed), ``weights = exp(-d^2 / h)``,
    ``grad_phi = sum_j 2 w (x_i - x_j) / h * sigma * coeff`` (``sigma`` the VE noise
    level ``sqrt((1 - abar) / abar)``, ``coeff`` 0 where it is below 1), and
    ``noise_pred - grad_phi``."""
    lat = np.asarray(latents, np.float64).reshape(len(latents), -1)
    b = lat.shape[0]
    diff = (lat[:, None] - lat[None])[~np.eye(b, dtype=bool)].reshape(b, b - 1, -1)
    distance = np.linalg.norm(diff, axis=-1, keepdims=True)
    weights = np.exp(-(distance**2 / h))
    coeff_ = 0.0 if level < 1 else coeff
    grad_phi = (2 * weights * diff / h * level * coeff_).sum(axis=1).reshape(latents.shape)
    return np.asarray(noise_pred, np.float64) - grad_phi


@pytest.mark.parametrize("alpha", [0.9, 0.5, 0.07])
def test_eps_scaling_is_pg_public_sd_code(alpha):
    """``particle(s, time_scaling="eps", min_noise_level=1.0)`` at a fixed bandwidth is PG's
    public SD code: its noise prediction turned into ``x0_hat = (x_t - sigma eps) / alpha``
    (DDIM's ``pred_original_sample``) on a VP process. The score form moves ``x0_hat``
    ``alpha`` times as far; at ``alpha = 0.9`` (noise level 0.48) both are off."""
    sigma = math.sqrt(1 - alpha**2)
    level, s, h = sigma / alpha, 0.3, 5.0
    xt = np.asarray(jax.random.normal(jax.random.key(15), (6, 4, 2, 2)), np.float64)
    eps = np.asarray(jax.random.normal(jax.random.key(16), (6, 4, 2, 2)), np.float64)
    ref = (xt - sigma * _public_sd_code_eps(xt, eps, level, s, h)) / alpha
    x0 = jnp.asarray((xt - sigma * eps) / alpha, jnp.float32)
    c = ctx(jnp.asarray(xt, jnp.float32), level, alpha)
    out, _, info = particle(s, bandwidth=h, time_scaling="eps", min_noise_level=1.0).apply(
        (), x0, c)
    shift = ref - np.asarray(x0, np.float64)
    np.testing.assert_allclose(out - x0, shift, rtol=1e-4, atol=1e-5 * np.abs(shift).max() + 1e-7)
    score, _, _ = particle(s, bandwidth=h, min_noise_level=1.0).apply((), x0, c)
    np.testing.assert_allclose(score - x0, alpha * shift, rtol=1e-4,
                               atol=1e-5 * np.abs(shift).max() + 1e-7)  # fmt: skip
    if level < 1:  # the reference's shift is float32 rounding of x0 there
        assert float(jnp.abs(out - x0).max()) == 0.0 and float(info.weight) == 0.0
    else:
        assert float(np.abs(shift).max()) > 0.1
        assert float(info.weight) == pytest.approx(s * level**2, rel=1e-6)


def test_min_noise_level_switch():
    x0 = jax.random.normal(jax.random.key(4), (4, 2))
    # PG's public code (min_noise_level=1) and the x0 variant: off below noise level 1,
    # on at and above it
    for g in (particle(1.0, min_noise_level=1.0), particle(1.0, **X0_VARIANT)):
        out, _, info = g.apply((), x0, ctx(x0, level=0.9))
        np.testing.assert_array_equal(out, x0)
        assert float(info.weight) == 0.0
        out, _, _ = g.apply((), x0, ctx(x0, level=1.0))
        assert not np.allclose(out, x0)
    # the paper's default (min_noise_level=None) is on at every noise level
    for g in (particle(100.0), particle(100.0, min_noise_level=None)):
        out, _, info = g.apply((), x0, ctx(x0, level=0.01))
        assert not np.allclose(out, x0) and float(info.weight) == pytest.approx(100.0 * 1e-4)
    # score scaling at a flow process's first point (alpha = 0, infinite level): skipped
    one, zero = jnp.float32(1.0), jnp.float32(0.0)
    flow_start = StepContext(x0, one, zero, one, jnp.int32(0), 10, jax.random.key(0), None)
    out, _, info = particle(1.0, space="x_t", time_scaling="score").apply((), x0, flow_start)
    np.testing.assert_array_equal(out, x0)
    assert float(info.weight) == 0.0


def test_feature_map_backpropagates_the_kernel_force():
    v = jax.random.normal(jax.random.key(5), (5, 3))
    a = jax.random.normal(jax.random.key(6), (3, 4))
    linear = lambda x: x @ a
    out, _, info = particle(1.0, features=linear, **X0_VARIANT).apply((), v, ctx(v))
    z = linear(v)
    h = median_bandwidth(z)
    np.testing.assert_allclose(out - v, rbf_repulsion(z, h) @ a.T, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(info.bandwidth, h, rtol=1e-6)
    # a nonlinear map: the shift is -grad_v U(phi(v)) with h from phi(v) held fixed
    phi = lambda x: jnp.tanh(x @ a)
    out, _, _ = particle(1.0, features=phi, **X0_VARIANT).apply((), v, ctx(v))
    hp = median_bandwidth(phi(v))
    expected = -jax.grad(lambda u: rbf_potential(phi(u), hp))(v)
    np.testing.assert_allclose(out - v, expected, rtol=1e-4, atol=1e-5)


def test_bad_input():
    with pytest.raises(ValueError, match="space must be one of"):
        particle(1.0, space="eps")
    with pytest.raises(ValueError, match="time_scaling must be one of"):
        particle(1.0, time_scaling="sigma")
    with pytest.raises(ValueError, match=r"bandwidth must be one of \('median',\), got 'mean'"):
        particle(1.0, bandwidth="mean")
    with pytest.raises(ValueError, match="bandwidth must be a finite number > 0, got 0.0"):
        particle(1.0, bandwidth=0.0)
    with pytest.raises(TypeError, match="features must be callable"):
        particle(1.0, features=3)
    with pytest.raises(ValueError, match="min_noise_level must be a finite number >= 0"):
        particle(1.0, min_noise_level=-1.0)
    with pytest.raises(ValueError, match="strength must be a finite number, got nan"):
        particle(float("nan"))
    with pytest.raises(ValueError, match="batch of 1 or >= 3"):
        particle(1.0).init(jnp.zeros((2, 3)), None, jax.random.key(0))
    assert particle(1.0, bandwidth=0.5).init(jnp.zeros((2, 3)), None, jax.random.key(0)) == ()


def ring(k=10, var=0.005):
    th = 2 * np.pi * np.arange(k) / k
    return toy.GaussianMixture(np.stack([np.cos(th), np.sin(th)], 1), np.full(k, var))


def make_ring_sampler(name):
    if name == "ddim":
        return samplers.ddim(schedules.vp_linear(), 20)
    if name == "edm":
        return samplers.edm(schedules.edm(), 16)
    return samplers.flow_euler(schedules.flow(), 20)


def modes_hit(x, means):
    nearest = jnp.argmin(jnp.linalg.norm(x[..., None, :] - means, axis=-1), -1)
    return float(jax.nn.one_hot(nearest, len(means)).max(1).sum(-1).mean())


def on_mode(x, means):
    return float((jnp.min(jnp.linalg.norm(x[..., None, :] - means, axis=-1), -1) < 0.25).mean())


@pytest.fixture(scope="module")
def unguided_ring_runs():
    """The i.i.d. (unguided) ring runs, 40 x 10 particles per sampler, computed once and
    shared by both mode tests below (same noise, keys and sampler in each)."""
    cache = {}

    def get(name):
        if name not in cache:
            gm = ring()
            s = make_ring_sampler(name)
            den = gm.denoiser(s.schedule)
            noise = jax.random.normal(jax.random.key(7), (40, 10, 2))
            keys = jax.random.split(jax.random.key(8), 40)
            cache[name] = jax.vmap(lambda z, k: jaxdiv.sample(s, den, z, key=k).x0)(noise, keys)
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["ddim", "edm", "flow_euler"])
def test_particle_guidance_on_every_sampler_finds_more_modes(name, unguided_ring_runs):
    """PG's ring toy (10 modes, variance 0.005), 10 particles x 40 runs, jaxdiv's x0
    variant: repulsion hits more distinct modes than i.i.d. sampling, which hits
    10 (1 - 0.9^10) = 6.5 on average; strength 0 is exactly i.i.d.; a composed
    chain(cfg, particle) runs too, and its particle term sees the B samples (not CFG's
    doubled batch)."""
    gm = ring()
    s = make_ring_sampler(name)
    den = gm.denoiser(s.schedule)
    runs = 40
    noise = jax.random.normal(jax.random.key(7), (runs, 10, 2))
    keys = jax.random.split(jax.random.key(8), runs)
    one = lambda st, z, k: jaxdiv.sample(s, den, z, key=k, guidance=particle(st, **X0_VARIANT)).x0
    run = jax.jit(jax.vmap(one, (None, 0, 0)))

    iid, pg = run(0.0, noise, keys), run(0.1, noise, keys)
    plain = unguided_ring_runs(name)
    np.testing.assert_allclose(iid, plain, atol=1e-5)
    assert 5.8 < modes_hit(iid, gm.means) < 7.2
    assert modes_hit(pg, gm.means) > modes_hit(iid, gm.means) + 0.7
    # switched off below noise level 1: samples stay on modes
    assert on_mode(pg, gm.means) > 0.8
    # chain(cfg, particle): the ring's denoiser ignores the condition, so CFG is the
    # identity and the chain must give the particle run exactly; a particle term that saw
    # CFG's doubled batch (20 particles) would not. CFG at w = 3 is the identity only up to
    # rounding (u + 3 (c - u)), which the repulsion carries through the steps: 3.5e-5 at
    # most on an AMD EPYC host, against the O(0.1) moves of the repulsion itself
    g = guidance.chain(guidance.cfg(3.0), particle(0.1, **X0_VARIANT))
    chained = jax.vmap(lambda z, k: jaxdiv.sample(s, den, z, key=k, cond=jnp.ones((10, 1)),
                                                  guidance=g).x0)(noise[:8], keys[:8])  # fmt: skip
    np.testing.assert_allclose(chained, pg[:8], rtol=1e-4, atol=1e-4)
    assert float(np.abs(pg[:8] - iid[:8]).max()) > 1e-2  # the repulsion moves far more


@pytest.mark.parametrize("name", ["ddim", "edm", "flow_euler"])
def test_papers_default_on_every_sampler_finds_more_modes_and_stays_on_them(
        name, unguided_ring_runs):
    """The default (paper's formulation, strength in squared noisy-space distance): more
    modes than i.i.d. and samples still on the modes, the same on every process."""
    gm = ring()
    s = make_ring_sampler(name)
    den = gm.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(7), (40, 10, 2))
    keys = jax.random.split(jax.random.key(8), 40)
    one = lambda z, k: jaxdiv.sample(s, den, z, key=k, guidance=particle(0.3)).x0
    pg = jax.jit(jax.vmap(one))(noise, keys)
    iid = unguided_ring_runs(name)
    assert modes_hit(pg, gm.means) > modes_hit(iid, gm.means) + 0.7
    assert on_mode(pg, gm.means) > 0.8
