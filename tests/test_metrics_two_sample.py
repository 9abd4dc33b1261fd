"""Energy distance and RBF MMD: SciPy, direct NumPy double sums, population closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats
from scipy.spatial.distance import cdist

from jaxdiv import metrics


def test_energy_distance_1d_matches_scipy():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=40), rng.normal(size=55) * 1.5 + 0.3
    ours = float(metrics.energy_distance(x[:, None], y[:, None]))
    # SciPy returns sqrt(2 E|X-Y| - E|X-X'| - E|Y-Y'|).
    assert ours == pytest.approx(scipy.stats.energy_distance(x, y) ** 2, rel=1e-5)


def test_energy_distance_multivariate_matches_numpy():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(30, 5)) + 20.0, rng.normal(size=(25, 5)) + 20.2  # large norms
    ref = 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()
    assert float(metrics.energy_distance(x, y)) == pytest.approx(ref, rel=1e-4, abs=1e-5)
    # Exact differences: no sqrt(eps)|x| ~ 1e-2 error from the Gram expansion at |x| ~ 45.
    assert float(metrics.energy_distance(x, x)) == pytest.approx(0.0, abs=1e-5)
    g = jax.grad(metrics.energy_distance)(jnp.asarray(x, jnp.float32), jnp.asarray(x, jnp.float32))
    assert bool(jnp.all(jnp.isfinite(g)))


def _numpy_mmd(x, y, h, unbiased):
    k = lambda a, b: np.exp(-cdist(a, b, "sqeuclidean") / (2 * h * h))
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    n, m = len(x), len(y)
    if unbiased:
        np.fill_diagonal(kxx, 0.0)
        np.fill_diagonal(kyy, 0.0)
        return kxx.sum() / (n * (n - 1)) + kyy.sum() / (m * (m - 1)) - 2 * kxy.mean()
    return kxx.mean() + kyy.mean() - 2 * kxy.mean()


@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd_matches_numpy(unbiased):
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 3)), rng.normal(size=(20, 3)) * 1.3 + 0.4
    ours = float(metrics.mmd(x, y, bandwidth=1.2, unbiased=unbiased))
    assert ours == pytest.approx(_numpy_mmd(x, y, 1.2, unbiased), rel=1e-4, abs=1e-6)
    z = np.concatenate([x, y])
    h = np.median(cdist(z, z)[np.triu_indices(len(z), 1)])
    assert float(metrics.mmd(x, y, unbiased=unbiased)) == pytest.approx(
        _numpy_mmd(x, y, h, unbiased), rel=1e-4, abs=1e-6)


def test_unbiased_mmd_estimates_population_value():
    # X ~ N(mu1, s1^2 I), Y ~ N(mu2, s2^2 I), k = exp(-|x-y|^2 / (2h^2)):
    # E k(a, b) = (h^2 / (h^2 + v))^(d/2) exp(-|m|^2 / (2 (h^2 + v))) for a - b ~ N(m, v I).
    d, h, s1, s2 = 2, 1.0, 1.0, 1.5
    dmu = np.array([0.5, 0.0])

    def ek(v, m2):
        return (h * h / (h * h + v)) ** (d / 2) * np.exp(-m2 / (2 * (h * h + v)))

    population = ek(2 * s1**2, 0.0) + ek(2 * s2**2, 0.0) - 2 * ek(s1**2 + s2**2, dmu @ dmu)
    kx, ky = jax.random.split(jax.random.key(0))
    n = 1500
    x = s1 * jax.random.normal(kx, (n, d))
    y = s2 * jax.random.normal(ky, (n, d)) + dmu
    # Sampling std of MMD^2_u here is ~0.005 (10 seeds); 3 sigma.
    assert float(metrics.mmd(x, y, bandwidth=h)) == pytest.approx(population, abs=0.015)
    # Same distribution: MMD^2_u is centred at zero.
    assert abs(float(metrics.mmd(x, s1 * jax.random.normal(ky, (n, d)), bandwidth=h))) < 0.005


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.mmd(np.ones((1, 2)), np.ones((5, 2))), ValueError,
         "`X` needs at least 2 samples"),
        (lambda: metrics.mmd(np.ones((4, 2)), np.ones((5, 3))), ValueError,
         "`X` and `Y` must have the same feature dimension"),
        (lambda: metrics.mmd(np.ones((4, 2)), np.ones((5, 2)), bandwidth=-1.0), ValueError,
         "`bandwidth` must be a finite number > 0"),
        (lambda: metrics.energy_distance(np.ones((4, 2)), np.full((5, 2), np.inf)), ValueError,
         "`Y` contains 10 non-finite"),
        (lambda: metrics.energy_distance(np.ones(4), np.ones((5, 1))), ValueError,
         "`X` must be a 2-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
