"""Frechet distance: closed forms, SciPy `sqrtm` reference, float64 scope, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from jaxdiv import metrics


def _scipy_fd(mu1, s1, mu2, s2):
    """The pytorch-fid formula with SciPy's Schur-based matrix square root."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def _random_gaussian(rng, d, rank=None):
    a = rng.normal(size=(d, rank or 2 * d))
    return rng.normal(size=d), a @ a.T / a.shape[1]


def test_identity_covariances_give_squared_mean_distance():
    mu1, mu2 = np.array([1.0, -2.0, 0.5, 3.0]), np.array([0.0, 1.0, 1.5, -1.0])
    fd = metrics.frechet_distance(mu1, np.eye(4), mu2, np.eye(4))
    assert float(fd) == pytest.approx(float(((mu1 - mu2) ** 2).sum()), rel=1e-6)


def test_diagonal_covariances_closed_form():
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3.0, size=6), rng.uniform(0.1, 3.0, size=6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    fd = metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b), dtype=jnp.float64)
    assert float(fd) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("d,rank", [(3, None), (24, None), (24, 10)])
def test_matches_scipy_sqrtm(d, rank):
    rng = np.random.default_rng(d + (rank or 0))
    (mu1, s1), (mu2, s2) = _random_gaussian(rng, d, rank), _random_gaussian(rng, d)
    ref = _scipy_fd(mu1, s1, mu2, s2)
    fd64 = metrics.frechet_distance(mu1, s1, mu2, s2, dtype=jnp.float64)
    assert fd64.dtype == jnp.float64
    assert float(fd64) == pytest.approx(ref, rel=1e-9)
    assert metrics.frechet_distance(mu1, s1, mu2, s2).dtype == jnp.float64  # the default
    fd32 = metrics.frechet_distance(mu1, s1, mu2, s2, dtype=jnp.float32)
    assert fd32.dtype == jnp.float32
    assert float(fd32) == pytest.approx(ref, rel=1e-4)
    # The eigen formula is not symmetric in (S1, S2) as computed; the distance is.
    assert float(metrics.frechet_distance(mu2, s2, mu1, s1, dtype=jnp.float64)) == pytest.approx(
        ref, rel=1e-9)


def test_float64_is_scoped_not_global():
    assert not jax.config.jax_enable_x64
    fd = metrics.frechet_distance(np.zeros(2), np.eye(2), np.ones(2), 2 * np.eye(2),
                                  dtype="float64")
    assert fd.dtype == jnp.float64
    assert not jax.config.jax_enable_x64
    assert jnp.asarray(np.zeros(1)).dtype == jnp.float32  # float64 input still truncated


def test_from_features_matches_numpy_and_scipy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(200, 8)) @ rng.normal(size=(8, 8))
    y = rng.normal(size=(150, 8)) + 0.5
    ref = _scipy_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    ours = metrics.frechet_distance_from_features(x, y, dtype=jnp.float64)
    assert float(ours) == pytest.approx(ref, rel=1e-9)
    mu, sigma = metrics.feature_statistics(x, dtype=jnp.float64)
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10)
    assert float(metrics.frechet_distance_from_features(x.astype(np.float32),
                                                        y.astype(np.float32))) == pytest.approx(
        ref, rel=1e-4)


def test_rank_deficient_features_n_less_than_d():
    # n < d gives singular covariances (as for FID on small sets): still finite, >= 0.
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(10, 30)), rng.normal(size=(12, 30)) + 0.1
    ref = _scipy_fd(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
    ours = float(metrics.frechet_distance_from_features(x, y, dtype=jnp.float64))
    assert ours == pytest.approx(ref, rel=1e-6)


def test_default_precision_gives_zero_for_a_set_against_itself():
    """FD(x, x) = 0: with the old float32 default a 100 x 512 set scored about -2 (the
    square-root trace of a rank-deficient covariance in float32; at FID's 2048 dimensions
    it reached -100); the default is now float64 for concrete inputs, as pytorch-fid's."""
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(100, 512)) * np.linspace(0.1, 3, 512)).astype(np.float32)
    fd = metrics.frechet_distance_from_features(x, x)
    assert fd.dtype == jnp.float64 and abs(float(fd)) < 1e-3, float(fd)
    assert abs(float(metrics.frechet_distance_from_features(x, x, dtype=jnp.float32))) > 0.1


def test_jit_float32():
    fd = jax.jit(metrics.frechet_distance)(jnp.zeros(3), jnp.eye(3), jnp.ones(3), jnp.eye(3))
    assert float(fd) == pytest.approx(3.0, rel=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2)),
         ValueError, "`sigma1` must be positive semi-definite; its smallest eigenvalue is -1"),
        (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2),
                                          np.array([[1.0, 2.0], [2.0, 1.0]])),
         ValueError, "`sigma2` must be positive semi-definite"),
        (lambda: metrics.frechet_distance(np.zeros(2), np.array([[1.0, 0.5], [0.0, 1.0]]),
                                          np.zeros(2), np.eye(2)),
         ValueError, "`sigma1` must be symmetric"),
        (lambda: metrics.frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3)),
         ValueError, r"`sigma1` must be a \(3, 3\) covariance"),
        (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(2)),
         ValueError, r"`mu2` must have shape \(2,\)"),
        (lambda: metrics.frechet_distance(np.zeros((2, 1)), np.eye(2), np.zeros(2), np.eye(2)),
         ValueError, "`mu1` must be a 1-D"),
        (lambda: metrics.frechet_distance(np.array([0.0, np.nan]), np.eye(2), np.zeros(2),
                                          np.eye(2)), ValueError, "`mu1` contains 1 non-finite"),
        (lambda: metrics.frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2),
                                          dtype=jnp.int32), ValueError, "`dtype` must be"),
        (lambda: metrics.frechet_distance_from_features(np.ones((5, 3)), np.ones((5, 4))),
         ValueError, "`X` and `Y` must have the same feature dimension"),
        (lambda: metrics.frechet_distance_from_features(np.ones((1, 3)), np.ones((5, 3))),
         ValueError, "`X` needs at least 2 samples"),
        # features whose covariance overflows float32: named, with the way out (it blamed
        # `sigma1`, an argument of the other function)
        (lambda: metrics.frechet_distance_from_features(
            np.arange(12.0).reshape(4, 3) * 1e20, np.ones((5, 3)), dtype=jnp.float32), ValueError,
         r"`X`'s covariance overflows float32 \(features of magnitude up to 1.1e\+21\); "
         r"rescale the features or pass dtype=jnp.float64"),
        (lambda: jax.jit(lambda m: metrics.frechet_distance(m, jnp.eye(2), m, jnp.eye(2),
                                                            dtype=jnp.float64))(jnp.zeros(2)),
         ValueError, "`dtype=float64` needs concrete inputs"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
