"""PRDC and improved precision/recall: the `prdc` reference package, an independent NumPy
implementation of Kynkaanniemi et al., exact expectations for identical distributions,
tie conventions, blockwise memory, bad input."""

import contextlib
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prdc import compute_prdc
from scipy.spatial.distance import cdist

from jaxdiv import metrics


def _reference_prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):  # compute_prdc prints sample counts
        ref = compute_prdc(real, fake, nearest_k=k)
    return [ref[name] for name in ("precision", "recall", "density", "coverage")]


def _numpy_improved_pr(real, fake, k):
    """Kynkaanniemi et al. 2019 in float64: squared distances, k-th neighbour radii
    (self excluded via the partition index k, self sits at index 0), membership <=."""
    d_rr, d_ff, d_rf = (cdist(a, b, "sqeuclidean") for a, b in
                        ((real, real), (fake, fake), (real, fake)))
    r_real = np.partition(d_rr, k, axis=1)[:, k]
    r_fake = np.partition(d_ff, k, axis=1)[:, k]
    precision = (d_rf <= r_real[:, None]).any(axis=0).mean()
    recall = (d_rf <= r_fake[None, :]).any(axis=1).mean()
    return precision, recall


@pytest.mark.parametrize(
    "n,m,d,k,block",
    [(60, 45, 6, 5, None), (37, 50, 16, 3, 8), (50, 50, 3, 1, 7)],
)
def test_matches_prdc_package(n, m, d, k, block):
    rng = np.random.default_rng(n + m + d)
    real = rng.normal(size=(n, d)).astype(np.float32)
    fake = (1.2 * rng.normal(size=(m, d)) + 0.3).astype(np.float32)
    ours = metrics.prdc(real, fake, k=k, block_size=block)
    np.testing.assert_allclose([float(v) for v in ours], _reference_prdc(real, fake, k),
                               atol=1e-6)


@pytest.mark.parametrize("n,m,d,k,block", [(60, 45, 6, 3, None), (37, 50, 16, 5, 8)])
def test_improved_precision_recall_matches_numpy(n, m, d, k, block):
    rng = np.random.default_rng(7 * n + d)
    real = rng.normal(size=(n, d))
    fake = 1.1 * rng.normal(size=(m, d)) + 0.2
    ours = metrics.precision_recall(real.astype(np.float32), fake.astype(np.float32), k=k,
                                    block_size=block)
    np.testing.assert_allclose([float(v) for v in ours], _numpy_improved_pr(real, fake, k),
                               atol=1e-6)


def test_tie_conventions_strict_vs_inclusive():
    # Integer points, k = 1: every real radius is exactly 1. Fake 10 sits at distance 1
    # from real 9: inside with `<=` (improved P/R), outside with `<` (PRDC).
    real = np.arange(10, dtype=np.float32)[:, None]
    fake = np.array([[10.0], [11.0], [12.0]], np.float32)
    assert float(metrics.precision_recall(real, fake, k=1).precision) == pytest.approx(1 / 3)
    assert float(metrics.prdc(real, fake, k=1).precision) == 0.0
    assert _reference_prdc(real, fake, 1)[0] == 0.0  # the reference agrees on `<`


def test_ties_and_duplicates_match_references():
    # Small-integer data: many duplicates and exactly tied distances, where `<` vs `<=`
    # and self-exclusion decide the result. 32 real rows keep the real-mean shift dyadic,
    # so every squared distance stays exact in float32 (as in the float64 references).
    rng = np.random.default_rng(11)
    real = rng.integers(0, 4, size=(32, 2)).astype(np.float32)
    fake = rng.integers(0, 5, size=(24, 2)).astype(np.float32)
    for k in (1, 3):
        ours = metrics.prdc(real, fake, k=k)
        np.testing.assert_allclose([float(v) for v in ours], _reference_prdc(real, fake, k),
                                   atol=1e-6)
        ours_pr = metrics.precision_recall(real, fake, k=k)
        np.testing.assert_allclose([float(v) for v in ours_pr],
                                   _numpy_improved_pr(real.astype(float), fake.astype(float), k),
                                   atol=1e-6)


def _float64_truth(real, fake, k):
    """Naeem et al. Eqs. 1-4 (``<``) and Kynkaanniemi et al. (``<=``) from SciPy's float64
    difference-form distances: a copied row meets the same operands in the same order,
    so its ties are exact, and so are those of small-integer or dyadic lattices."""
    rr, ff, rf = (cdist(a.astype(np.float64), b.astype(np.float64), "sqeuclidean")
                  for a, b in ((real, real), (fake, fake), (real, fake)))
    r_real = np.partition(rr, k, axis=1)[:, k][:, None]
    r_fake = np.partition(ff, k, axis=1)[:, k][None, :]
    inside = rf < r_real
    prdc_ = [inside.any(0).mean(), (rf < r_fake).any(1).mean(), inside.sum(0).mean() / k,
             inside.any(1).mean()]
    return prdc_, [(rf <= r_real).any(0).mean(), (rf <= r_fake).any(1).mean()]


def _memorised(seed):
    # every other fake row copies a real one; 200 x 150 in 768-D (CLIP's width): the
    # expansion rounded the copies' distances differently from the radii (before the
    # exact recomputation: density 0.989 / 1.005 against the true 0.980 / 0.995)
    rng = np.random.default_rng(seed)
    real = (3 * rng.normal(size=(200, 768)) + 1).astype(np.float32)
    fake = (3 * rng.normal(size=(150, 768)) + 1).astype(np.float32)
    fake[::2] = real[:75]
    return real, fake


def _lattice(scale, offset):
    grid = np.stack(np.meshgrid(np.arange(12), np.arange(12)), -1).reshape(-1, 2)
    grid = grid.astype(np.float32) * np.float32(scale)
    pick = np.random.default_rng(1).permutation(len(grid))[:100]
    return grid, grid[pick] + np.float32(offset)


def _integer_cube():
    # 16-D points with coordinates in {7, 10, 13}: many exactly tied distances, and a real
    # mean that rounds when subtracted (the old code centred before the tie decision)
    rng = np.random.default_rng(5)
    return tuple((3 * rng.integers(0, 3, (n, 16)) + 7).astype(np.float32) for n in (400, 300))


def _near_duplicates():
    # 30 points, each 5 (real) / 4 (fake) times with 1e-3 jitter, in 512-D: the expansion
    # reads the jittered copies as duplicates (0), so which one is the k-th neighbour was
    # arbitrary and the radius the distance to the wrong one (density 0.81 against 1.02)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(30, 512))
    return tuple((np.repeat(centres, r, 0) + 1e-3 * rng.normal(size=(30 * r, 512)))
                 .astype(np.float32) for r in (5, 4))  # fmt: skip


def _one_hot():
    # 40 classes, most with one or two members: nearly every distance is exactly 2 and ties
    # with nearly every radius, so whole rows are recomputed (_refine_near_ties' heavy path)
    rng = np.random.default_rng(2)
    return tuple(np.eye(40, dtype=np.float32)[rng.integers(0, 40, n)] for n in (60, 50))


_TIE_CASES = {
    "memorised_k3": (*_memorised(0), 3),
    "memorised_k5": (*_memorised(0), 5),
    "lattice_k1": (*_lattice(0.25, 0.25), 1),
    "lattice_k3": (*_lattice(0.25, 0.5), 3),
    "integer_cube_k4": (*_integer_cube(), 4),
    "near_duplicates_k3": (*_near_duplicates(), 3),
    "one_hot_k3": (*_one_hot(), 3),
}


def _check_exact_ties(case):
    real, fake, k = _TIE_CASES[case]
    truth_prdc, truth_pr = _float64_truth(real, fake, k)
    # one sample more or less moves a score by >= 1 / (k m) > 1e-4; 1e-6 is the float32
    # mean's rounding
    ours = [float(v) for v in metrics.prdc(real, fake, k=k)]
    np.testing.assert_allclose(ours, truth_prdc, rtol=0, atol=1e-6)
    np.testing.assert_allclose(ours, _reference_prdc(real, fake, k), rtol=0, atol=1e-6)
    np.testing.assert_allclose([float(v) for v in metrics.precision_recall(real, fake, k=k)],
                               truth_pr, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", list(_TIE_CASES))
def test_exact_ties_of_copies_and_lattices_match_float64_truth(case):
    # every case failed while ties were decided by the expansion's rounding (checked
    # against the code before the difference-form recomputation)
    _check_exact_ties(case)


def test_heavy_ties_under_vmap_match_the_unbatched_calls():
    # the refinement's while loops stay loops under vmap; a batch member that needs no
    # more passes must pass through unchanged
    real = np.stack([_TIE_CASES["one_hot_k3"][0], _TIE_CASES["lattice_k1"][0][:60, :1]
                     .repeat(40, 1)])  # fmt: skip
    fake = np.stack([_TIE_CASES["one_hot_k3"][1], real[1][:50] + 0.25])
    batched = jax.vmap(lambda r, f: jnp.stack(metrics.prdc(r, f, k=3)))(real, fake)
    for i in range(2):
        np.testing.assert_array_equal(batched[i], jnp.stack(metrics.prdc(real[i], fake[i], k=3)))


def test_inf_under_jit_gives_nan():
    # under jit the inputs are unchecked; inf - inf made the old centred distances NaN, the
    # raw rows must not turn an inf into plausible scores of 0
    real = np.random.default_rng(0).normal(size=(30, 4)).astype(np.float32)
    fake = real[::-1] + 0.1
    bad = real.copy()
    bad[3, 2] = np.inf
    for fn in (metrics.prdc, metrics.precision_recall):
        assert bool(jnp.isfinite(jnp.stack(jax.jit(fn)(real, fake))).all())
        assert bool(jnp.isnan(jnp.stack(jax.jit(fn)(bad, fake))).all())
        assert bool(jnp.isnan(jnp.stack(jax.jit(fn)(real, -bad))).all())


@pytest.mark.exact_codegen
@pytest.mark.parametrize("case", ["memorised_k3", "integer_cube_k4", "one_hot_k3"])
def test_exact_ties_under_fma_codegen(case):
    # the same pair of rows must give the same bits under XLA's default codegen too, which
    # contracts multiply-adds (the suite's first pass compiles at -O0); one case of each
    # kind (copies, a lattice, whole-row recomputation) keeps the second pass short
    _check_exact_ties(case)


def test_duplicated_fake_samples_have_zero_radius():
    # Memorised samples: each fake point repeated k+ times -> fake radii 0 -> recall 0
    # with `<` (the reference agrees), although the points lie on the real support.
    rng = np.random.default_rng(12)
    real = (rng.normal(size=(60, 8)) + 5.0).astype(np.float32)
    fake = np.repeat(real[:10] + 0.01, 6, axis=0)
    ref = _reference_prdc(real, fake, 5)
    ours = [float(v) for v in metrics.prdc(real, fake, k=5)]
    assert ours[1] == ref[1] == 0.0
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_identical_sets():
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    res = metrics.prdc(x, x, k=5)
    assert float(res.precision) == 1.0 and float(res.recall) == 1.0
    assert float(res.coverage) == 1.0
    assert [float(v) for v in metrics.precision_recall(x, x)] == [1.0, 1.0]


def _expected_coverage(n, m, k):
    # Exchangeability: a real ball contains no fake sample iff its k nearest among the
    # other n - 1 real and m fake points are all real.
    return 1.0 - np.prod([(n - 1 - i) / (n - 1 + m - i) for i in range(k)])


@settings(max_examples=4, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.sampled_from([3, 5]))
def test_property_identical_distributions(seed, k):
    # Naeem et al. (2020): for identical distributions E[density] = 1 exactly and
    # E[coverage] = 1 - prod_i (n-1-i)/(n-1+m-i) ~ 1 - 2^-k.
    n = m = 1500
    key_r, key_f = jax.random.split(jax.random.key(seed))
    real = jax.random.normal(key_r, (n, 4))
    fake = jax.random.normal(key_f, (m, 4))
    res = metrics.prdc(real, fake, k=k)
    assert float(res.density) == pytest.approx(1.0, abs=0.08)
    assert float(res.coverage) == pytest.approx(_expected_coverage(n, m, k), abs=0.03)
    assert _expected_coverage(n, m, k) == pytest.approx(1 - 2.0**-k, abs=2e-3)


def test_blockwise_memory_for_50k():
    # XLA's buffer plan for 50k x 50k in 64-D: a full distance matrix would be 10 GB.
    shape = jax.ShapeDtypeStruct((50_000, 64), jnp.float32)
    compiled = jax.jit(metrics.prdc).lower(shape, shape).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < 512 * 2**20


def test_jit_vmap_and_block_size_invariance():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(2, 30, 5)).astype(np.float32)
    fake = rng.normal(size=(2, 30, 5)).astype(np.float32)
    batched = jax.vmap(lambda r, f: metrics.prdc(r, f, k=3))(real, fake)
    for i in range(2):
        eager = metrics.prdc(real[i], fake[i], k=3, block_size=30)
        tiny_blocks = metrics.prdc(real[i], fake[i], k=3, block_size=4)
        for a, b, c in zip(eager, tiny_blocks, batched, strict=True):
            assert float(a) == float(b) == float(c[i])


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.prdc(np.ones((10, 3)), np.ones((10, 4))), ValueError,
         "`real` and `fake` must have the same feature dimension"),
        (lambda: metrics.prdc(np.ones((5, 3)), np.ones((10, 3)), k=5), ValueError,
         "`real` needs at least 6 samples"),
        (lambda: metrics.precision_recall(np.ones((10, 3)), np.ones((3, 3)), k=3), ValueError,
         "`fake` needs at least 4 samples"),
        (lambda: metrics.prdc(np.ones((10, 3)), np.full((10, 3), np.nan)), ValueError,
         "`fake` contains 30 non-finite"),
        (lambda: metrics.prdc(np.ones(10), np.ones((10, 3))), ValueError, "`real` must be a 2-D"),
        (lambda: metrics.prdc(np.ones((10, 3)), np.ones((10, 3)), k=0), ValueError,
         "`k` must be >= 1"),
        (lambda: metrics.prdc(np.ones((10, 3)), np.ones((10, 3)), k=2.0), TypeError,
         "`k` must be a Python int"),
        (lambda: metrics.prdc(np.ones((10, 3)), np.ones((10, 3)), block_size=0), ValueError,
         "`block_size` must be >= 1"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
