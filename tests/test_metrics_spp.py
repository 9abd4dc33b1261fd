"""GASS spherical projection spread: an independent NumPy Gram-Schmidt search, closed
forms, invariances (permutation exactly, rotations fixing e_t in distribution), bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdiv import metrics

B, D, N = 8, 16, 10


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _batch(seed):
    rng = np.random.default_rng(seed)
    e_t = _unit(rng.normal(size=D))
    emb = _unit(0.6 * e_t + 0.25 * rng.normal(size=(B, D)))  # CLIP-like: cos ~ 0.6-0.9
    return emb.astype(np.float32), e_t.astype(np.float32)


def _numpy_search(key, emb, e_t, n):
    """Algorithm 1 of GASS with classical Gram-Schmidt in float64, from the same draws."""
    g = np.asarray(jax.random.normal(key, (D, n)), np.float64)
    basis = [e_t.astype(np.float64)]
    for j in range(n):
        v = g[:, j].copy()
        for b in basis:
            v -= (v @ b) * b
        basis.append(v / np.linalg.norm(v))
    dirs = np.stack(basis[1:])
    return dirs[np.argmax(np.abs(emb @ dirs.T).mean(0))]


def test_direction_search_matches_numpy_gram_schmidt():
    emb, e_t = _batch(0)
    for seed in range(5):
        key = jax.random.key(seed)
        u = np.asarray(metrics.principal_residual_direction(key, emb, e_t, N))
        ref = _numpy_search(key, emb, e_t, N)
        assert abs(u @ ref) == pytest.approx(1.0, abs=1e-5)  # same direction up to sign
        assert abs(u @ e_t) < 1e-6 and np.linalg.norm(u) == pytest.approx(1.0, abs=1e-6)


def test_spp_components_and_closed_form():
    emb, e_t = _batch(1)
    key = jax.random.key(3)
    res = metrics.spp(emb, e_t, key, num_directions=N)
    u = np.asarray(metrics.principal_residual_direction(key, emb, e_t, N))
    np.testing.assert_allclose(res.u_ind, u, atol=1e-6)  # the same search, same key
    dep, ind = emb @ e_t, emb @ u
    assert float(res.d_dep) == pytest.approx(dep.max() - dep.min(), abs=1e-6)
    assert float(res.d_ind) == pytest.approx(ind.max() - ind.min(), abs=1e-6)
    assert float(res.spp) == pytest.approx(float(res.d_dep + res.d_ind), abs=1e-7)
    # Hand-made case: e_t = e0, samples cos 1 and cos 0 along it -> D_dep = 1.
    one = metrics.spp(np.eye(4, dtype=np.float32)[:2], np.eye(4, dtype=np.float32)[0], key, 3)
    assert float(one.d_dep) == pytest.approx(1.0)


def test_inputs_are_normalised_and_keys_give_fresh_directions():
    emb, e_t = _batch(2)
    key = jax.random.key(0)
    a = metrics.spp(emb, e_t, key, N)
    b = metrics.spp(3.0 * emb, 0.5 * e_t, key, N)
    np.testing.assert_allclose([a.d_dep, a.d_ind], [b.d_dep, b.d_ind], atol=1e-5)
    other = metrics.spp(emb, e_t, jax.random.key(1), N)
    assert abs(float(other.u_ind @ a.u_ind)) < 0.999  # a new key draws new directions


def test_permutation_invariance_exact():
    emb, e_t = _batch(4)
    key = jax.random.key(5)
    perm = np.random.default_rng(0).permutation(B)
    a, b = metrics.spp(emb, e_t, key, N), metrics.spp(emb[perm], e_t, key, N)
    np.testing.assert_allclose(a.u_ind, b.u_ind, atol=1e-6)
    assert float(a.spp) == pytest.approx(float(b.spp), abs=1e-6)


def _rotation_fixing(e_t, rng):
    # R = e_t e_t^T + C O C^T with C an orthonormal basis of e_t's complement.
    q, _ = np.linalg.qr(np.concatenate([e_t[:, None], rng.normal(size=(D, D - 1))], axis=1))
    c = q[:, 1:]
    o, _ = np.linalg.qr(rng.normal(size=(D - 1, D - 1)))
    return np.outer(e_t, e_t) + c @ o @ c.T


_many_keys = jax.jit(jax.vmap(lambda k, e, t: metrics.spp(e, t, k, N), in_axes=(0, None, None)))


@settings(max_examples=5, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_property_rotation_fixing_text_direction(seed):
    # A rotation R with R e_t = e_t preserves every e_i . e_t, so D_dep is exactly
    # invariant. D_ind depends on the random directions, which are isotropic in the
    # complement, so it is invariant in distribution: compare means over 512 keys.
    rng = np.random.default_rng(seed)
    emb, e_t = _batch(seed)
    r = _rotation_fixing(e_t.astype(np.float64), rng)
    assert np.allclose(r @ e_t, e_t, atol=1e-6) and np.allclose(r @ r.T, np.eye(D), atol=1e-6)
    rotated = (emb @ r.T).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), 512)
    a, b = _many_keys(keys, emb, e_t), _many_keys(keys, rotated, e_t)
    np.testing.assert_allclose(a.d_dep, b.d_dep, atol=1e-5)
    se = np.sqrt((np.var(a.d_ind) + np.var(b.d_ind)) / len(keys))
    assert abs(float(jnp.mean(a.d_ind) - jnp.mean(b.d_ind))) < 5 * se


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.spp(np.ones((4, 8)), np.ones((1, 8)), jax.random.key(0)), ValueError,
         "`text_emb` must be a 1-D"),
        (lambda: metrics.spp(np.ones((4, 8)), np.ones(7), jax.random.key(0)), ValueError,
         "`emb` and `text_emb` must have the same feature dimension"),
        (lambda: metrics.spp(np.ones((4, 8)), np.ones(8), jax.random.key(0), 8), ValueError,
         "`num_directions` must be <= d - 1 = 7"),
        (lambda: metrics.spp(np.ones((4, 8)), np.zeros(8), jax.random.key(0)), ValueError,
         "`text_emb` has 1 all-zero"),
        (lambda: metrics.spp(np.full((4, 8), np.nan), np.ones(8), jax.random.key(0)), ValueError,
         "`emb` contains 32 non-finite"),
        (lambda: metrics.principal_residual_direction(jax.random.key(0), np.ones((4, 8)),
                                                      np.ones(8), 0), ValueError,
         "`num_directions` must be >= 1"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
