"""Exact blockwise radius search (SPELL at scale) against brute force; the IVF comparison."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxdiv.guidance.spell.radius_search import (
    build_index,
    build_ivf,
    ivf_repulsion,
    nearest,
    repulsion,
)


def _dense(q, z, r, exclude_self=False):
    """Eq. 5 in float64 numpy: the independent reference."""
    q = np.asarray(q, np.float64)
    z = np.asarray(z, np.float64)
    diff = q[:, None] - z[None]
    dist = np.linalg.norm(diff, axis=-1)
    inside = (dist < r) & (dist > 0)
    if exclude_self:
        np.fill_diagonal(inside, False)
    w = np.where(inside, r / np.where(dist > 0, dist, 1) - 1, 0)
    return (w[..., None] * diff).sum(1), inside.sum(1)


@functools.partial(jax.jit, static_argnames=("block_size", "exact_bytes"))
def _rep(q, z, r, block_size, exact_bytes):
    return repulsion(q, build_index(z, block_size), r, exact_bytes=exact_bytes)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), r=st.floats(0.3, 2.0), offset=st.sampled_from([0.0, 1e3]))
def test_blockwise_repulsion_equals_brute_force(seed, r, offset):
    """37 shields in blocks of 8 (5 blocks, padded), exact tiles of 2 rows; a constant
    offset of 1e3 (large norms) must not lose or invent neighbours."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(k1, (5, 3)) + offset
    z = jax.random.normal(k2, (37, 3)) + offset
    rep = _rep(q, z, r, block_size=8, exact_bytes=4 * 5 * 2 * 3)
    delta, count = _dense(q, z, r)
    assert rep.count.tolist() == count.tolist()
    np.testing.assert_allclose(rep.delta, delta, rtol=1e-4, atol=2e-4 if offset else 1e-5)


def test_neighbours_just_inside_and_outside_the_radius():
    """Shields at 0.999 r and 1.001 r from the query, around a large common offset."""
    r = 0.5
    base = jnp.full((1, 16), 300.0)
    u = jax.random.normal(jax.random.key(0), (4, 16))
    u = u / jnp.linalg.norm(u, axis=1, keepdims=True)
    z = jnp.concatenate([base + 0.999 * r * u[:2], base + 1.001 * r * u[2:]])
    rep = repulsion(base, build_index(z, 2), r)
    assert rep.count.tolist() == [2]


def test_query_ids_exclude_only_self():
    x = jax.random.normal(jax.random.key(1), (9, 2)) * 0.3
    rep = repulsion(x, build_index(x, 4), 0.4, query_ids=jnp.arange(9))
    delta, count = _dense(x, x, 0.4, exclude_self=True)
    assert rep.count.tolist() == count.tolist()
    np.testing.assert_allclose(rep.delta, delta, rtol=1e-5, atol=1e-6)


def test_query_on_a_centre_moves_by_r_along_the_anchor_direction():
    z = jnp.array([[1.0, 2.0, 3.0], [9.0, 9.0, 9.0]])
    q = z[:1]
    rep = repulsion(q, build_index(z), 0.25, query_anchors=jnp.array([[1.0, 2.0, 5.0]]),
                    shield_anchors=1.0)  # fmt: skip
    np.testing.assert_allclose(rep.delta, [[0.0, 0.0, 0.25]], atol=1e-7)
    # without anchors (or with coinciding ones) Eq. 5 is 0/0: the tie is broken by a
    # fixed direction per (query, shield) pair, still the minimal move of length r
    rep = repulsion(q, build_index(z), 0.25)
    assert rep.count.tolist() == [1]
    np.testing.assert_allclose(np.linalg.norm(rep.delta), 0.25, rtol=1e-6)
    again = repulsion(q, build_index(z), 0.25)
    np.testing.assert_array_equal(again.delta, rep.delta)  # deterministic


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_nearest_equals_brute_force(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    q = jax.random.normal(k1, (6, 4))
    z = jax.random.normal(k2, (50, 4))
    nb = _nearest(q, z)
    qd, zd = np.asarray(q, np.float64), np.asarray(z, np.float64)
    d = np.linalg.norm(qd[:, None] - zd[None], axis=-1)
    order = np.argsort(d, axis=1)[:, :3]
    assert nb.indices.tolist() == order.tolist()
    np.testing.assert_allclose(nb.distances, np.take_along_axis(d, order, 1), rtol=1e-6)


@jax.jit
def _nearest(q, z):
    return nearest(q, build_index(z, 16), k=3)


def test_nearest_excludes_self():
    x = jnp.array([[0.0], [1.0], [3.0], [3.5]])
    nb = nearest(x, build_index(x, 3), k=1, exclude_ids=jnp.arange(4))
    assert nb.indices[:, 0].tolist() == [1, 0, 3, 2]
    np.testing.assert_allclose(nb.distances[:, 0], [1.0, 1.0, 0.5, 0.5])


@jax.jit
def _three_searches(q, z, ivf):
    exact = repulsion(q, build_index(z, 64), 0.6)
    return exact, ivf_repulsion(q, ivf, 0.6, 17), ivf_repulsion(q, ivf, 0.6, 1)


def test_ivf_cells_partition_the_set_and_full_probe_is_exact():
    z = jax.random.normal(jax.random.key(0), (300, 3))
    ivf = build_ivf(z, 17, key=jax.random.key(1))
    ids = np.asarray(ivf.cell_ids)[np.asarray(ivf.cell_valid)]
    assert sorted(ids.tolist()) == list(range(300))
    q = jax.random.normal(jax.random.key(2), (20, 3))
    exact, full, one = _three_searches(q, z, ivf)
    assert full.count.tolist() == exact.count.tolist()
    np.testing.assert_allclose(full.delta, exact.delta, rtol=1e-5, atol=1e-6)
    # one probe is an approximation: it can only miss shields
    assert np.all(np.asarray(one.count) <= np.asarray(exact.count))
    assert int(one.count.sum()) < int(exact.count.sum())


def test_bad_inputs():
    with pytest.raises(ValueError, match="block_size"):
        build_index(jnp.zeros((3, 2)), 0)
    with pytest.raises(ValueError, match="points"):
        build_index(jnp.zeros((3,)))
    with pytest.raises(TypeError, match="floating"):
        build_index(jnp.zeros((3, 2), jnp.int32))
    idx = build_index(jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="features per row"):
        repulsion(jnp.zeros((1, 3)), idx, 1.0)
    with pytest.raises(ValueError, match="both"):
        repulsion(jnp.zeros((1, 2)), idx, 1.0, query_anchors=jnp.zeros((1, 2)))
    with pytest.raises(TypeError, match="ShieldIndex"):
        repulsion(jnp.zeros((1, 2)), jnp.zeros((3, 2)), 1.0)
    with pytest.raises(ValueError, match="num_cells"):
        build_ivf(jnp.zeros((3, 2)), 5, key=jax.random.key(0))
    ivf = build_ivf(jnp.arange(6.0).reshape(3, 2), 2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="nprobe"):
        ivf_repulsion(jnp.zeros((1, 2)), ivf, 1.0, 3)
    with pytest.raises(ValueError, match="query_anchors and anchor_scale"):
        ivf_repulsion(jnp.zeros((1, 2)), ivf, 1.0, 1, query_anchors=jnp.zeros((1, 2)))
    with pytest.raises(ValueError, match="query_anchors and anchor_scale"):
        ivf_repulsion(jnp.zeros((1, 2)), ivf, 1.0, 1, anchor_scale=0.5)
    with pytest.raises(ValueError, match=r"query_anchors must have shape \(1, 2\)"):
        ivf_repulsion(jnp.zeros((1, 2)), ivf, 1.0, 1, query_anchors=jnp.zeros((2, 2)),
                      anchor_scale=0.5)  # fmt: skip
    with pytest.raises(ValueError, match="k must"):
        nearest(jnp.zeros((1, 2)), idx, k=0)
