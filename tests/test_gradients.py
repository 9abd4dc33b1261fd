"""jax.grad through jaxdiv.sample matches central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np

import jaxdiv
import toy
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance import GuidanceTerm

NOISE = jax.random.normal(jax.random.key(0), (64, 2))


def _check(f, x, eps, rtol):
    g = float(jax.grad(f)(x))
    fd = (float(f(x + eps)) - float(f(x - eps))) / (2 * eps)
    assert np.isfinite(g)
    np.testing.assert_allclose(g, fd, rtol=rtol, atol=1e-3 * (1 + abs(fd)))


def test_grad_wrt_gmm_mean(gmm2):
    sch = schedules.edm()
    s = samplers.edm(sch, 10, s_churn=5.0)

    def f(m):
        gm = toy.GaussianMixture(gmm2.means.at[1, 0].set(m), gmm2.covs, gmm2.weights)
        x = jaxdiv.sample(s, gm.denoiser(sch), NOISE, key=jax.random.key(1)).x0
        return jnp.mean(x[:, 0] ** 2)

    _check(f, gmm2.means[1, 0], 1e-2, 2e-2)


def test_grad_wrt_guidance_strength(gmm2):
    sch = schedules.vp_linear()
    s = samplers.ddim(sch, 12, eta=1.0)

    def f(strength):
        pull = GuidanceTerm(lambda x, c, k: (),
                            lambda st, x0, ctx: (x0 * (1 - strength), st, ()), "x0")  # fmt: skip
        x = jaxdiv.sample(s, gmm2.denoiser(sch), NOISE, key=jax.random.key(1), guidance=pull).x0
        return jnp.mean(jnp.sum(x, -1))

    _check(f, jnp.float32(0.1), 1e-2, 2e-2)

    # the v2 spelling: the strength is a traced leaf of a stateless term
    def f_leaf(strength):
        pull = guidance.stateless("x0", _shrink, strength=strength)
        x = jaxdiv.sample(s, gmm2.denoiser(sch), NOISE, key=jax.random.key(1), guidance=pull).x0
        return jnp.mean(jnp.sum(x, -1))

    _check(f_leaf, jnp.float32(0.1), 1e-2, 2e-2)
    np.testing.assert_allclose(float(f_leaf(0.1)), float(f(jnp.float32(0.1))), rtol=1e-6)
    before = jaxdiv.compile_count()
    f_leaf(0.3)  # a new value of the leaf: no new program
    assert jaxdiv.compile_count() == before


def test_grad_wrt_particle_strength_follows_the_median_bandwidth():
    """PG's median bandwidth depends on the particles, hence on the strength through the
    trajectory: the gradient of a run follows it (held fixed it had the wrong sign here:
    -2.7 against +1.0). In float64, where central differences resolve it."""
    with jax.enable_x64(True):
        ring, sch = toy.ring_of_classes(), schedules.edm()
        noise = jax.random.normal(jax.random.key(0), (16, 2), jnp.float64)
        cond = ring.condition(jnp.zeros(16, int)).astype(jnp.float64)

        def f(w):
            return jaxdiv.sample(samplers.edm(sch, 10), ring.denoiser(sch), noise,
                                 key=jax.random.key(1), cond=cond,
                                 guidance=guidance.particle(w)).x0.var()  # fmt: skip

        w = jnp.float64(1.0)
        g, eps = float(jax.grad(f)(w)), 1e-4
        fd = (float(f(w + eps)) - float(f(w - eps))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-3)
        assert fd > 0.1  # a real slope, the sign the bandwidth held fixed got wrong


def _shrink(x0_hat, ctx, strength):
    return x0_hat * (1 - strength)


def test_grad_wrt_cfg_scale(gmm2):
    sch = schedules.flow()
    s = samplers.flow_euler(sch, 10)
    c = jnp.ones((64, 2))

    def den(x, t, cond):
        return gmm2.posterior_mean(x, 1 - t, t) + 0.3 * cond

    def f(w):
        x = jaxdiv.sample(s, den, NOISE, key=jax.random.key(1), cond=c, guidance=guidance.cfg(w)).x0
        return jnp.mean(x**2)

    _check(f, jnp.float32(2.0), 1e-2, 2e-2)


def test_grad_wrt_schedule_parameter(gmm2):
    def f(rho):
        sch = schedules.edm(rho=rho)
        x = jaxdiv.sample(samplers.edm(sch, 6), gmm2.denoiser(sch), NOISE,
                          key=jax.random.key(1)).x0  # fmt: skip
        return jnp.mean(x[:, 1])

    _check(f, jnp.float32(7.0), 5e-2, 3e-2)


def test_grad_wrt_noise_matches_vjp_structure(gmm2):
    sch = schedules.edm()
    s = samplers.edm(sch, 8)
    g = jax.grad(lambda n: jaxdiv.sample(s, gmm2.denoiser(sch), n, key=jax.random.key(0)).x0[3, 0])(
        NOISE
    )
    # no coupling: only sample 3's noise matters
    assert float(jnp.abs(g[3]).sum()) > 0
    assert float(jnp.abs(jnp.delete(g, 3, axis=0)).max()) == 0.0
