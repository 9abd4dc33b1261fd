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


def _reference(gm, x, alpha, sigma, means=None):
    """Posterior mean and score by dense per-component solves in float64 NumPy (the module
    docstring's formulas, without eigenbases): independent of the float32 paths. ``means``
    (float64) in place of the mixture's."""
    means = np.asarray(gm.means if means is None else means, np.float64)
    covs = np.asarray(gm.full_covs(), np.float64)
    logw = np.log(np.asarray(gm.weights, np.float64))
    x = np.asarray(x, np.float64)
    d = means.shape[1]
    logits, post, score = [], [], []
    for mu, c, lw in zip(means, covs, logw):
        ct = alpha**2 * c + sigma**2 * np.eye(d)
        r = x - alpha * mu
        sol = np.linalg.solve(ct, r.T).T  # (alpha^2 C + sigma^2 I)^-1 (x - alpha mu)
        logits.append(lw - 0.5 * np.linalg.slogdet(2 * np.pi * ct)[1] - 0.5 * (r * sol).sum(1))
        post.append(mu + alpha * sol @ c)
        score.append(-sol)
    logits = np.stack(logits, 1)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return (np.einsum("bk,kbd->bd", p, np.stack(post)), np.einsum("bk,kbd->bd", p, np.stack(score)),
            logits.max(1))  # fmt: skip


@pytest.mark.parametrize("d", [1, 2, 3, 5])  # 1-3: the elementwise path; 5: the general one
@pytest.mark.parametrize("kind", ["full", "diag"])
def test_posterior_mean_and_score_equal_a_float64_reference(kind, d):
    """Against dense float64 solves, over the noise levels a sampler visits and at points
    far from every component, where float32 ``exp`` of the unshifted logits is 0 for all
    of them (the max over the components must shift them)."""
    gm = random_gmm(jax.random.key(12), k=5, d=d, kind=kind)
    typical = 1.5 * jax.random.normal(jax.random.key(13), (16, d))
    far = jnp.concatenate([jnp.full((2, d), 40.0), jnp.full((2, d), -25.0)])
    x = jnp.concatenate([typical, far])
    evaluate = jax.jit(lambda a, s: (gm.posterior_mean(x, a, s), gm.score(x, a, s)))
    for alpha, sigma in [(1.0, 80.0), (1.0, 2.0), (0.8, 0.6), (1.0, 0.05), (0.999, 1e-3)]:
        want_mean, want_score, top = _reference(gm, x, alpha, sigma)
        if sigma <= 0.05:  # the far points: every logit below float32 exp's range (~ -104)
            assert np.all(top[16:] < -104), top[16:]
        mean, score = evaluate(alpha, sigma)
        np.testing.assert_allclose(mean, want_mean, rtol=2e-5, atol=2e-5 * (1 + np.abs(
            want_mean).max()), err_msg=f"mean at alpha={alpha}, sigma={sigma}")  # fmt: skip
        scale = np.abs(want_score).max(1, keepdims=True)
        np.testing.assert_allclose(score / scale, want_score / scale, rtol=0, atol=5e-5,
                                   err_msg=f"score at alpha={alpha}, sigma={sigma}")  # fmt: skip


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_elementwise_path_derivatives_equal_float64_differences(kind):
    """Reverse mode (in x and in the means), forward mode and a Hessian-vector product
    through the elementwise path's reductions, against central differences of the float64
    reference (step 1e-4: truncation ~1e-8, rounding ~1e-12)."""
    gm = random_gmm(jax.random.key(14), k=4, d=2, kind=kind)
    x = 1.2 * jax.random.normal(jax.random.key(15), (6, 2))
    alpha, sigma = 0.9, 0.5
    w_out = np.asarray(jax.random.normal(jax.random.key(16), (6, 2)), np.float64)

    def loss(gm, x):
        return jnp.sum(jnp.asarray(w_out, jnp.float32) * gm.posterior_mean(x, alpha, sigma))

    def ref(x, means=None):
        return float((w_out * _reference(gm, x, alpha, sigma, means)[0]).sum())

    h = 1e-4
    x64 = np.asarray(x, np.float64)
    fd = np.zeros_like(x64)
    for idx in np.ndindex(*x64.shape):
        e = np.zeros_like(x64)
        e[idx] = h
        fd[idx] = (ref(x64 + e) - ref(x64 - e)) / (2 * h)
    grad_x = jax.jit(jax.grad(loss, argnums=1))(gm, x)
    np.testing.assert_allclose(grad_x, fd, rtol=1e-4, atol=1e-4 * np.abs(fd).max())
    # in the means (through the constructor's projected means)
    m64 = np.asarray(gm.means, np.float64)
    fd_m = np.zeros_like(m64)
    for idx in np.ndindex(*m64.shape):
        e = np.zeros_like(m64)
        e[idx] = h
        fd_m[idx] = (ref(x64, m64 + e) - ref(x64, m64 - e)) / (2 * h)

    def loss_means(means):
        return loss(toy.GaussianMixture(means, gm.covs, gm.weights), x)

    grad_m = jax.jit(jax.grad(loss_means))(gm.means)
    np.testing.assert_allclose(grad_m, fd_m, rtol=1e-4, atol=1e-4 * np.abs(fd_m).max())
    # forward mode along v, and v^T H u by a second-order central difference
    v = np.asarray(jax.random.normal(jax.random.key(17), (6, 2)), np.float64)
    u = np.asarray(jax.random.normal(jax.random.key(18), (6, 2)), np.float64)
    _, jvp = jax.jit(lambda t: jax.jvp(lambda y: loss(gm, y), (x,), (t,)))(jnp.asarray(v))
    np.testing.assert_allclose(float(jvp), float((fd * v).sum()), rtol=1e-4)
    hvp = jax.jit(lambda t: jax.jvp(jax.grad(lambda y: loss(gm, y)), (x,), (t,))[1])(
        jnp.asarray(v, jnp.float32))
    want = sum(s * t * ref(x64 + s * h * v + t * h * u) for s in (1, -1) for t in (1, -1))
    want /= 4 * h * h
    np.testing.assert_allclose(float(jnp.vdot(hvp, jnp.asarray(u, jnp.float32))), want,
                               rtol=2e-3, atol=2e-3 * np.abs(hvp).max())  # fmt: skip


def test_elementwise_path_stays_in_xla_loops():
    """The d = 2 denoiser of benchmarks/toy_sampler.py compiles to XLA's own loops: no
    YNNPACK call (which XLA:CPU made of the softmax over the components and of the
    weighted-mean product, at several times the work's cost at this size), no product, and
    the exps in one fusion (computed once, not again inside each sum that reads them).
    Speed itself is measured by the benchmark, not here."""
    from benchmarks.toy_sampler import make_gmm

    gm = toy.GaussianMixture(*make_gmm())
    x = jnp.zeros((4096, 2))
    hlo = jax.jit(lambda x: gm.posterior_mean(x, 1.0, 0.5)).lower(x).compile().as_text()
    assert "kind=kCustom" not in hlo and "ynn" not in hlo.lower(), "a YNNPACK fusion"
    assert " dot(" not in hlo and "dot_general" not in hlo
    fusions_with_exp = [c for c in hlo.split("\n\n") if "exponential(" in c]
    assert len(fusions_with_exp) == 1, len(fusions_with_exp)


def test_nan_input_rows_stay_nan():
    """A NaN in one sample's x makes that sample's mean NaN (not a finite wrong value)
    and leaves the other samples as they are."""
    gm = random_gmm(jax.random.key(19), k=4, d=2)
    x = jnp.array([[0.3, -0.2], [jnp.nan, 1.0], [1.0, 2.0]])
    out = np.asarray(gm.posterior_mean(x, 1.0, 0.5))
    assert np.all(np.isnan(out[1])) and np.all(np.isfinite(out[[0, 2]]))
    np.testing.assert_array_equal(out[[0, 2]], gm.posterior_mean(x[jnp.array([0, 2])], 1.0, 0.5))
