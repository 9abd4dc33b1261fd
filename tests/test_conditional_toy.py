"""The conditional GMM toy against fixed-weight GMMs, autodiff, Bayes' rule and samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import central_difference
from scipy import stats

import jaxdiv
import toy
from jaxdiv import samplers, schedules
from toy.conditional import ConditionalGaussianMixture, ring_of_classes

SCHEDULES = {
    "vp": schedules.vp_linear(),
    "edm": schedules.edm(),
    "flow": schedules.flow(),
}
TIMES = {"vp": (10.0, 300.0, 900.0), "edm": (0.05, 1.0, 20.0), "flow": (0.1, 0.5, 0.95)}


def random_toy(key, k=5, d=3, c=3, m=4, diag=True):
    ks = jax.random.split(key, 5)
    means = 2.0 * jax.random.normal(ks[0], (k, d))
    covs = 0.05 + 0.4 * jax.random.uniform(ks[1], (k, d) if diag else (k,))
    labels = np.arange(k) % c
    emb = jax.random.normal(ks[2], (c, m))
    w = jax.random.uniform(ks[3], (k,), minval=0.5, maxval=1.5)
    return ConditionalGaussianMixture(means, covs, labels, emb, w / w.sum(), temperature=0.7)


@pytest.mark.parametrize("diag", [True, False])
@pytest.mark.parametrize("proc", ["vp", "edm", "flow"])
def test_denoiser_equals_fixed_weight_mixture(proc, diag):
    """For any y -- class, null or a noisy embedding -- D(x, t, y) is the exact posterior
    mean of the GaussianMixture with weights w(y)."""
    cm = random_toy(jax.random.key(0), diag=diag)
    sch = SCHEDULES[proc]

    @jax.jit
    def both(x, t, y):
        got = cm.denoiser(sch)(x, t, y)  # y: (B, m), one condition per row
        ref = jax.vmap(
            lambda xi, yi: toy.GaussianMixture(cm.means, cm.covs, cm.weights_given(yi))
            .denoiser(sch)(xi[None], t)[0]
        )(x, y)
        return got, ref

    x = 2.0 * jax.random.normal(jax.random.key(1), (6, cm.dim))
    noisy = 1.5 * jax.random.normal(jax.random.key(3), (6, cm.cond_dim))
    shared = [cm.condition(1), jnp.zeros(cm.cond_dim)]
    for y in [jnp.broadcast_to(v, (6, cm.cond_dim)) for v in shared] + [noisy]:
        for t in TIMES[proc]:
            got, ref = both(x, jnp.float32(t), y)
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_weights_formula_and_null_condition():
    cm = random_toy(jax.random.key(4))
    y = jax.random.normal(jax.random.key(5), (cm.cond_dim,))
    emb = np.asarray(cm.class_embeddings)[np.asarray(cm.labels)]
    logits = np.log(np.asarray(cm.weights)) + emb @ np.asarray(y) / cm.temperature
    np.testing.assert_allclose(cm.weights_given(y), np.exp(logits) / np.exp(logits).sum(),
                               rtol=1e-5)  # fmt: skip
    np.testing.assert_allclose(cm.weights_given(jnp.zeros(cm.cond_dim)), cm.weights, rtol=1e-6)
    den = cm.denoiser(schedules.edm())
    x = jax.random.normal(jax.random.key(6), (3, cm.dim))
    np.testing.assert_allclose(den(x, 0.7, None), den(x, 0.7, cm.null_condition(3)), atol=1e-6)


@pytest.mark.parametrize("alpha,sigma", [(1.0, 0.3), (0.6, 0.8), (1.0, 4.0)])
def test_tweedie_score_equals_grad_log_prob(alpha, sigma):
    """(alpha D - x) / sigma^2 = grad_x log p_t(x | y) for per-sample noisy conditions."""
    cm = random_toy(jax.random.key(7))
    x = 2.0 * jax.random.normal(jax.random.key(8), (6, cm.dim))
    y = jax.random.normal(jax.random.key(9), (6, cm.cond_dim))
    tweedie = jax.jit(lambda x, y: (alpha * cm.posterior_mean(x, y, alpha, sigma) - x) / sigma**2)
    log_p = lambda v, c: cm.log_prob(v[None], c[None], alpha, sigma)[0]
    auto = jax.jit(jax.vmap(jax.grad(log_p)))(x, y)
    tweedie = tweedie(x, y)
    np.testing.assert_allclose(tweedie, auto, rtol=2e-4, atol=2e-4)


def test_class_posterior_is_bayes_rule():
    cm = random_toy(jax.random.key(10), diag=True)
    x = 2.0 * jax.random.normal(jax.random.key(11), (5, cm.dim))
    dens = np.stack([
        stats.multivariate_normal(np.asarray(cm.means[k]), np.diag(np.asarray(cm.covs[k]))).pdf(
            np.asarray(x))
        for k in range(cm.num_components)
    ], 1) * np.asarray(cm.weights)  # fmt: skip
    post_k = dens / dens.sum(1, keepdims=True)
    expected = np.stack([post_k[:, np.asarray(cm.labels) == c].sum(1)
                         for c in range(cm.num_classes)], 1)  # fmt: skip
    got = cm.class_posterior(x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
    classes = jnp.array([0, 1, 2, 0, 1])
    np.testing.assert_allclose(cm.clip_score(x, classes), expected[np.arange(5), classes],
                               rtol=1e-4, atol=1e-6)  # fmt: skip


def test_exact_samples_follow_conditional_weights():
    cm = ring_of_classes()
    y = cm.condition(2)
    n = 20000
    draw = jax.jit(lambda key, y: cm.sample(key, n, y, return_labels=True))
    x, comp = draw(jax.random.key(12), y)
    counts = np.bincount(np.asarray(comp), minlength=cm.num_components)
    w = np.asarray(cm.weights_given(y), np.float64)
    expected = n * w / w.sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3
    gm = cm.mixture(y)
    np.testing.assert_allclose(x.mean(0), gm.mean(), atol=0.06)
    np.testing.assert_allclose(jnp.cov(x.T), gm.covariance(), atol=0.12)
    # one condition per row: rows conditioned on class c land on class c's modes
    classes = jnp.arange(n) % cm.num_classes
    _, comp = draw(jax.random.key(13), cm.condition(classes, scale=3.0))
    assert float(jnp.mean(cm.labels[comp] == classes)) > 0.99


def test_ring_toy_layout():
    cm = ring_of_classes(num_classes=4, modes_per_class=3)
    assert cm.labels.tolist() == [0, 1, 2, 3] * 3
    np.testing.assert_allclose(jnp.linalg.norm(cm.means, axis=1), 3.0, rtol=1e-5)
    w = cm.weights_given(cm.condition(0))
    assert 0.94 < float(w[cm.labels == 0].sum()) < 0.96  # e^4 / (e^4 + 3) ~ 0.948 per class
    np.testing.assert_allclose(cm.clip_score(cm.means, cm.labels), 1.0, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim", "edm", "flow_euler"])
def test_samplers_reach_the_conditional(name):
    """Each sampler with the exact conditional denoiser draws from p(x | y): compare the
    fraction of samples per mode with the exact weights."""
    cm = ring_of_classes()
    if name == "ddim":
        s = samplers.ddim(schedules.vp_linear(), 40)
    elif name == "edm":
        s = samplers.edm(schedules.edm(), 20)
    else:
        s = samplers.flow_euler(schedules.flow(), 40)
    n = 4000
    y = cm.condition(1)
    noise = jax.random.normal(jax.random.key(14), (n, 2))
    out = jaxdiv.sample(s, cm.denoiser(s.schedule), noise, key=jax.random.key(15),
                        cond=jnp.broadcast_to(y, (n, cm.cond_dim)))
    nearest = jnp.argmin(jnp.linalg.norm(out.x0[:, None] - cm.means, axis=-1), axis=1)
    freq = np.bincount(np.asarray(nearest), minlength=cm.num_components) / n
    tv = 0.5 * np.abs(freq - np.asarray(cm.weights_given(y))).sum()
    assert tv < 0.04, (name, tv, freq)
    dist = jnp.linalg.norm(out.x0 - cm.means[nearest], axis=1)
    # |x - mu|^2 / var ~ chi^2_2, mean 2 (nearest-mode assignment barely truncates it)
    assert 1.7 < float(jnp.mean(dist**2) / 0.09) < 2.3


def test_gradient_reaches_means():
    """jax.grad of the exact conditional denoiser w.r.t. the means and the condition
    embedding equals five-point finite differences (float32: the toy is float32)."""
    cm = ring_of_classes()
    x = jnp.array([[1.0, 1.0], [-2.0, 0.5]])
    y = cm.condition(jnp.array([0, 1]))
    proj = jnp.array([[0.3, -0.7], [1.1, 0.4]])  # a generic linear read-out of x0_hat

    @jax.jit
    def den_fn(means):
        den = ConditionalGaussianMixture(
            means, cm.covs, cm.labels, cm.class_embeddings, cm.weights, cm.temperature
        ).denoiser(schedules.edm())
        return jnp.sum(proj * den(x, 0.5, y))

    @jax.jit
    def den_y(cond):
        return jnp.sum(proj * cm.denoiser(schedules.edm())(x, 0.5, cond))

    for f, p in ((den_fn, cm.means), (den_y, y)):
        g = np.asarray(jax.grad(f)(p), np.float64)
        assert np.abs(g).max() > 0.05
        fd = central_difference(f, p, 1e-2)
        np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(g).max() + 2e-4)


def test_bad_input_raises():
    m, c = jnp.zeros((2, 2)), jnp.ones(2)
    with pytest.raises(ValueError, match="means"):
        ConditionalGaussianMixture(jnp.zeros(2), c, [0, 1], jnp.eye(2))
    with pytest.raises(ValueError, match="covs"):
        ConditionalGaussianMixture(m, jnp.ones((3,)), [0, 1], jnp.eye(2))
    with pytest.raises(ValueError, match="labels"):
        ConditionalGaussianMixture(m, c, [0.0, 1.0], jnp.eye(2))
    with pytest.raises(ValueError, match="labels must lie"):
        ConditionalGaussianMixture(m, c, [0, 2], jnp.eye(2))
    with pytest.raises(ValueError, match="classes \\[1\\]"):
        ConditionalGaussianMixture(m, c, [0, 0], jnp.eye(2))
    with pytest.raises(ValueError, match="temperature"):
        ConditionalGaussianMixture(m, c, [0, 1], jnp.eye(2), temperature=0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        ConditionalGaussianMixture(m, c, [0, 1], jnp.eye(2), weights=[0.5, 0.6])
    cm = ConditionalGaussianMixture(m, c, [0, 1], jnp.eye(2))
    with pytest.raises(ValueError, match="last dimension m=2"):
        cm.denoiser(schedules.edm())(jnp.zeros((3, 2)), 1.0, jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="leading shape"):
        cm.posterior_mean(jnp.zeros((3, 2)), jnp.zeros((4, 2)), 1.0, 1.0)
    with pytest.raises(ValueError, match="last dimension d=2"):
        cm.log_prob(jnp.zeros((3, 5)))
    with pytest.raises(ValueError, match="single embedding"):
        cm.mixture(jnp.zeros((2, 2)))
    # class ids outside the mixture: JAX's indexing clipped them to the last class
    # (condition) or read NaN (clip_score), silently
    for bad in (2, -1, jnp.array([0, 5])):
        with pytest.raises(ValueError, match=r"classes must lie in \[0, 1\]"):
            cm.condition(bad)
        with pytest.raises(ValueError, match=r"classes must lie in \[0, 1\]"):
            cm.clip_score(jnp.zeros((2, 2)), bad)
    with pytest.raises(TypeError, match="classes must be integers"):
        cm.condition(1.0)
    assert jax.jit(cm.condition)(jnp.array([1])).shape == (1, 2)  # traced: not inspected
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        cm.sample(jax.random.key(0), -1)
    with pytest.raises(ValueError, match="n must be an integer >= 0, got -1"):
        cm.mixture().sample(jax.random.key(0), -1)
