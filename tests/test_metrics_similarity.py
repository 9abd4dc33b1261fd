"""MSS, CLIP score and Gram log-determinant against direct NumPy computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdiv import metrics


def _cos_matrix(x):
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    return z @ z.T


def test_mss_matches_pairwise_mean():
    x = np.random.default_rng(0).normal(size=(9, 6)) + 0.5
    c = _cos_matrix(x)
    ref = c[~np.eye(9, dtype=bool)].mean()
    assert float(metrics.mss(x)) == pytest.approx(ref, abs=1e-6)


def test_mss_extremes():
    assert float(metrics.mss(np.tile([[1.0, 2.0, 3.0]], (5, 1)))) == pytest.approx(1.0, abs=1e-6)
    assert float(metrics.mss(np.eye(5))) == pytest.approx(0.0, abs=1e-7)
    # Antipodal pair: the minimum -1/(n-1).
    assert float(metrics.mss(np.array([[1.0, 0.0], [-2.0, 0.0]]))) == pytest.approx(-1.0)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_property_mss_permutation_and_scale_invariant(seed):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(9, 6)) + 0.5).astype(np.float32)
    v = float(metrics.mss(x))
    scaled = x[rng.permutation(9)] * rng.uniform(0.1, 10, size=(9, 1)).astype(np.float32)
    assert float(metrics.mss(scaled)) == pytest.approx(v, abs=1e-5)


def test_clip_score_values_and_broadcast():
    rng = np.random.default_rng(1)
    img, txt = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    cos = (img * txt).sum(1) / np.linalg.norm(img, axis=1) / np.linalg.norm(txt, axis=1)
    ref = 100 * np.maximum(cos, 0)
    np.testing.assert_allclose(metrics.clip_score(img, txt, reduce=False), ref, atol=1e-4)
    assert float(metrics.clip_score(img, txt)) == pytest.approx(ref.mean(), abs=1e-4)
    shared = np.tile(txt[:1], (7, 1))
    np.testing.assert_allclose(metrics.clip_score(img, txt[0], reduce=False),
                               metrics.clip_score(img, shared, reduce=False), atol=1e-5)


def test_gram_logdet_matches_slogdet_and_detects_rank_deficiency():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 8))
    sign, ref = np.linalg.slogdet(x @ x.T)
    assert sign == 1 and float(metrics.gram_logdet(x)) == pytest.approx(ref, rel=1e-5)
    z = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert float(metrics.gram_logdet(x, normalize=True)) == pytest.approx(
        np.linalg.slogdet(z @ z.T)[1], rel=1e-4, abs=1e-5)
    assert float(metrics.gram_logdet(np.eye(5, 8))) == pytest.approx(0.0, abs=1e-6)  # orthonormal
    dup = np.concatenate([x[:4], x[:1]])  # a repeated row
    assert float(metrics.gram_logdet(dup)) == -np.inf
    combo = np.concatenate([x[:4], x[:1] + 2 * x[1:2]])  # a linear combination
    assert float(metrics.gram_logdet(combo)) == -np.inf
    assert float(metrics.gram_logdet(rng.normal(size=(9, 8)))) == -np.inf  # n > d


def test_gram_logdet_gradient_and_jit():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(5, 8)), jnp.float32)
    g = jax.grad(metrics.gram_logdet)(x)
    # d/dX log det(X X^T) = 2 (X X^T)^-1 X
    np.testing.assert_allclose(g, 2 * np.linalg.solve(x @ x.T, x), rtol=1e-3, atol=1e-4)
    assert float(jax.jit(metrics.mss)(x)) == pytest.approx(float(metrics.mss(x)), abs=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.mss(np.ones((1, 3))), ValueError, "`X` needs at least 2 samples"),
        (lambda: metrics.mss(np.array([[1.0, 0.0], [0.0, 0.0]])), ValueError, "all-zero row"),
        (lambda: metrics.clip_score(np.ones((3, 4)), np.ones((2, 4))), ValueError,
         r"`txt_emb` must have shape \(3, d\) or \(d,\)"),
        (lambda: metrics.clip_score(np.ones((3, 4)), np.ones(5)), ValueError,
         "`img_emb` and `txt_emb` must have the same feature dimension"),
        (lambda: metrics.clip_score(np.ones((3, 4)), np.array([1.0, np.nan, 0, 0])), ValueError,
         "`txt_emb` contains 1 non-finite"),
        (lambda: metrics.gram_logdet(np.ones((2, 2, 2))), ValueError, "`X` must be a 2-D"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
