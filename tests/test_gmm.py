"""Exact Gaussian-mixture quantities against Monte Carlo, autodiff and quadrature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import central_difference, random_gmm

import toy


@pytest.mark.parametrize("kind", ["full", "diag", "iso"])
def test_posterior_mean_equals_monte_carlo(kind):
    """E[x0 | x_t] by self-normalised importance sampling from the prior."""
    gm = random_gmm(jax.random.key(3), k=3, d=3, kind=kind)
    alpha, sigma = 0.8, 0.7
    # typical points of x_t, so the importance weights are not degenerate
    x = alpha * gm.sample(jax.random.key(10), 3) + sigma * jax.random.normal(
        jax.random.key(11), (3, 3)
    )

    @jax.jit
    def importance_sampling(gm, x):
        x0 = gm.sample(jax.random.key(4), 400_000)
        logw = -jnp.sum((x[:, None, :] - alpha * x0[None]) ** 2, -1) / (2 * sigma**2)
        w = jax.nn.softmax(logw, axis=1)
        mc = w @ x0
        return mc, 1.0 / jnp.sum(w**2, axis=1), w @ (x0**2) - mc**2

    mc, ess, post_var = importance_sampling(gm, x)
    assert float(ess.min()) > 1000, ess  # the Monte Carlo estimate is meaningful
    tol = 5 * jnp.sqrt(post_var / ess[:, None])  # 5 Monte Carlo standard errors
    err = jnp.abs(gm.posterior_mean(x, alpha, sigma) - mc)
    assert bool(jnp.all(err < tol)), (err, tol)


@pytest.mark.parametrize("d", [2, 5])  # the elementwise tiny-d path and the general one
@pytest.mark.parametrize("kind", ["full", "diag", "iso"])
def test_score_tweedie_and_autodiff(kind, d):
    gm = random_gmm(jax.random.key(5), k=4, d=d, kind=kind)
    x = 2 * jax.random.normal(jax.random.key(6), (7, d))
    @jax.jit
    def all_three(gm, alpha, sigma):
        score = gm.score(x, alpha, sigma)
        tweedie = (alpha * gm.posterior_mean(x, alpha, sigma) - x) / sigma**2
        auto = jax.vmap(jax.grad(lambda v: gm.log_prob(v[None], alpha, sigma)[0]))(x)
        return score, tweedie, auto

    for alpha, sigma in [(1.0, 0.3), (0.5, 0.9), (1.0, 5.0)]:
        score, tweedie, auto = all_three(gm, alpha, sigma)
        np.testing.assert_allclose(score, tweedie, rtol=2e-4, atol=2e-4)
        np.testing.assert_allclose(score, auto, rtol=2e-4, atol=2e-4)


def test_log_density_normalises_on_a_grid(gmm2):
    for alpha, sigma in [(1.0, 0.0), (0.8, 0.6), (1.0, 2.0)]:
        lim = 8 + 4 * sigma
        g = jnp.linspace(-lim, lim, 801)
        xx, yy = jnp.meshgrid(g, g)
        p = jnp.exp(gmm2.log_prob(jnp.stack([xx, yy], -1), alpha, sigma))
        total = float(p.sum() * (g[1] - g[0]) ** 2)
        assert abs(total - 1.0) < 2e-3, (alpha, sigma, total)


def test_storage_kinds_agree():
    """diag and iso fast paths equal the full-covariance formula on the same mixture."""
    d = 4
    means = jax.random.normal(jax.random.key(7), (3, d))
    var = jnp.array([0.2, 0.5, 1.0])
    diag = var[:, None] * jnp.linspace(0.5, 1.5, d)
    x = jax.random.normal(jax.random.key(8), (6, d))
    w = jnp.array([0.2, 0.3, 0.5])
    evaluate = jax.jit(lambda g: [getattr(g, f)(x, 0.7, 0.4)
                                  for f in ("posterior_mean", "score", "log_prob")])  # fmt: skip
    for compact in (var, diag):
        a = toy.GaussianMixture(means, compact, w)
        full = toy.GaussianMixture(means, a.full_covs(), w)
        for got, want in zip(evaluate(a), evaluate(full)):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("covs", ["iso", "diag", "full"])
def test_half_precision_input_is_computed_in_float32(covs):
    """jaxdiv.dtypes' rule: float16 x far out in EDM's noise (|x|^2 overflows float16 from
    |x| ~ 181) gives the float32 answer, not NaN (the isotropic path gave NaN)."""
    means = jnp.array([[0.0, 0.0], [3.0, 3.0]])
    c = {"iso": jnp.ones(2), "diag": jnp.ones((2, 2)), "full": jnp.stack([jnp.eye(2)] * 2)}
    gm = toy.GaussianMixture(means, c[covs])
    x = jnp.array([[200.0, -150.0]])
    for f in ("posterior_mean", "score", "log_prob"):
        half = getattr(gm, f)(x.astype(jnp.float16), 1.0, 80.0)
        assert half.dtype == jnp.float32, f
        np.testing.assert_array_equal(half, getattr(gm, f)(x, 1.0, 80.0), err_msg=f)


def test_sampling_moments(gmm2):
    x = gmm2.sample(jax.random.key(9), 200_000)
    np.testing.assert_allclose(x.mean(0), gmm2.mean(), atol=0.02)
    np.testing.assert_allclose(jnp.cov(x.T), gmm2.covariance(), atol=0.03)
    _, labels = gmm2.sample(jax.random.key(9), 100_000, return_labels=True)
    np.testing.assert_allclose(jnp.bincount(labels, length=4) / 1e5, gmm2.weights, atol=0.01)


def test_no_batch_by_components_by_dim_squared_arrays(gmm16):
    """The hot path must never build a (B, K, d, d) array."""
    x = jnp.zeros((64, 16))
    jaxpr = jax.make_jaxpr(lambda v: gmm16.posterior_mean(v, 0.5, 0.5))(x)
    shapes = [tuple(v.aval.shape) for eqn in jaxpr.eqns for v in eqn.outvars]
    assert (64, 4, 16, 16) not in shapes
    assert max(int(np.prod(s)) for s in shapes) <= 64 * 4 * 16


@pytest.mark.parametrize("kind", ["full", "diag", "iso"])
def test_is_a_pytree_and_differentiable(kind):
    """jax.grad through the constructor (eigendecompositions, projected means) and the
    noisy log-density equals five-point finite differences (float32: the toy is float32)."""
    gm = random_gmm(jax.random.key(0), k=4, d=2, kind=kind)
    leaves = jax.tree.leaves(gm)
    assert all(isinstance(leaf, jax.Array) for leaf in leaves)
    x = jnp.array([[1.0, 1.0], [-0.5, 0.3]])
    for wrt in ("means", "covs"):

        @jax.jit
        def f(p, wrt=wrt):
            m, c = (p, gm.covs) if wrt == "means" else (gm.means, p)
            return toy.GaussianMixture(m, c, gm.weights).log_prob(x, 0.8, 0.5).sum()

        p = getattr(gm, wrt)
        g = np.asarray(jax.grad(f)(p), np.float64)
        assert g.shape == p.shape and np.abs(g).max() > 0.1
        fd = central_difference(f, p, 1e-2)
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(g).max() + 2e-4)


def test_bad_input_errors():
    m = jnp.zeros((2, 2))
    with pytest.raises(ValueError, match="positive semi-definite"):
        toy.GaussianMixture(m, jnp.stack([jnp.eye(2), jnp.diag(jnp.array([1.0, -0.5]))]))
    with pytest.raises(ValueError, match="symmetric"):
        toy.GaussianMixture(m, jnp.stack([jnp.eye(2), jnp.array([[1.0, 0.5], [0.0, 1.0]])]))
    with pytest.raises(ValueError, match="sum to 1"):
        toy.GaussianMixture(m, jnp.ones(2), jnp.array([0.5, 0.6]))
    with pytest.raises(ValueError, match="non-negative"):
        toy.GaussianMixture(m, jnp.ones(2), jnp.array([1.5, -0.5]))
    with pytest.raises(ValueError, match=r"covs must have shape"):
        toy.GaussianMixture(m, jnp.ones((3, 2)))
    with pytest.raises(ValueError, match="means must have shape"):
        toy.GaussianMixture(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        toy.GaussianMixture(m.at[0, 0].set(jnp.nan), jnp.ones(2))
    with pytest.raises(ValueError, match="non-negative variances"):
        toy.GaussianMixture(m, jnp.array([1.0, -1.0]))
    with pytest.raises(ValueError, match="last dimension"):
        toy.GaussianMixture(m, jnp.ones(2)).posterior_mean(jnp.ones((3, 5)), 1.0, 1.0)


@pytest.mark.parametrize("covs", [
    np.array([0.0, 1.0]),                                   # isotropic, one point mass
    np.array([[0.0, 0.0], [1.0, 0.5]]),                     # diagonal
    np.array([np.zeros((2, 2)), [[1.0, 0.3], [0.3, 0.5]]]),  # full
])  # fmt: skip
def test_point_mass_components_at_zero_noise(covs):
    """A zero-variance component (allowed) made the posterior mean 0 / 0 = NaN at exactly
    ``sigma = 0``. There ``x_t = alpha x0`` determines ``x0``: ``D = x / alpha``, with
    Jacobian ``I / alpha``, and the values just above ``sigma = 0`` approach it."""
    gm = toy.GaussianMixture(np.array([[0.0, 0.0], [2.0, 1.0]]), covs)
    x = jnp.array([[0.0, 0.0], [0.5, 0.3], [2.0, 1.0], [-1.0, 4.0]])  # incl. both means
    for alpha in (1.0, 0.8):
        out = np.asarray(gm.posterior_mean(x, alpha, 0.0))
        np.testing.assert_array_equal(out, np.asarray(x) / alpha)
        jac = jax.jacfwd(lambda v, a=alpha: gm.posterior_mean(v[None], a, 0.0)[0])(x[1])
        np.testing.assert_allclose(jac, np.eye(2) / alpha, rtol=1e-6)
        # continuity: the Gaussian components move D by O(sigma^2 |x / alpha - mu| / lam)
        near = np.asarray(gm.posterior_mean(x, alpha, 1e-4))
        np.testing.assert_allclose(near, out, atol=1e-5)
    grad = jax.grad(lambda s: jnp.sum(gm.posterior_mean(x, 1.0, s)))(0.0)
    assert np.isfinite(float(grad))
    # a flow's noisy end (alpha = 0, sigma = 1) keeps a finite gradient in alpha too
    grad = jax.grad(lambda a: jnp.sum(gm.posterior_mean(x, a, 1.0)))(0.0)
    assert np.isfinite(float(grad))
