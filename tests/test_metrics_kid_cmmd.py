"""KID and CMMD against NumPy transcriptions of their reference implementations.

References (read from the repositories, transcribed below in NumPy, not imported: clean-fid
imports torchvision, which has no CPU build for the torch installed here):

* clean-fid, ``cleanfid/fid.py`` at commit e88c4d6269a4bbf04c04deeb578475b57719acee,
  ``kernel_distance`` (lines 93-110);
* torchmetrics, ``src/torchmetrics/image/kid.py`` at commit
  dab033394560ab3ce05e3d14c13f32e4cde6b351, ``maximum_mean_discrepancy`` (lines 34-51),
  ``poly_kernel`` (54-58), ``poly_mmd`` (61-68), ``KernelInceptionDistance.compute``
  (267-297);
* google-research, ``cmmd/distance.py`` at commit 4c4299485319ed72ef782020c81784be5468924e,
  ``mmd`` (lines 25-90: ``_SIGMA = 10``, ``_SCALE = 1000``, the biased estimator).

The random subset draws (``np.random.choice`` / ``torch.randperm``) are the only lines not
transcribed: both sides get the same index arrays through ``kid(..., subsets=...)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv import metrics
from jaxdiv.metrics import kernel_two_sample as k2s

# ------------------------------------------------------------------ transcriptions


def cleanfid_kernel_distance(feats1, feats2, idx1, idx2):
    """clean-fid cleanfid/fid.py lines 93-110 (kernel_distance), with the per-subset draws
    of lines 104-105 (``np.random.choice(N, m, replace=False)``) replaced by rows of the
    given index arrays. ``m = min(n1, n2, max_subset_size)`` (line 101) is the index
    arrays' width here."""
    n = feats1.shape[1]
    num_subsets, m = idx1.shape
    t = 0
    for _subset_idx in range(num_subsets):
        x = feats2[idx2[_subset_idx]]
        y = feats1[idx1[_subset_idx]]
        a = (x @ x.T / n + 1) ** 3 + (y @ y.T / n + 1) ** 3
        b = (x @ y.T / n + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    kid = t / num_subsets / m
    return float(kid)


def tm_maximum_mean_discrepancy(k_xx, k_xy, k_yy):
    """torchmetrics image/kid.py lines 34-51."""
    m = k_xx.shape[0]
    diag_x = np.diag(k_xx)
    diag_y = np.diag(k_yy)
    kt_xx_sums = k_xx.sum(axis=-1) - diag_x
    kt_yy_sums = k_yy.sum(axis=-1) - diag_y
    k_xy_sums = k_xy.sum(axis=0)
    kt_xx_sum = kt_xx_sums.sum()
    kt_yy_sum = kt_yy_sums.sum()
    k_xy_sum = k_xy_sums.sum()
    value = (kt_xx_sum + kt_yy_sum) / (m * (m - 1))
    value -= 2 * k_xy_sum / (m**2)
    return value


def tm_poly_kernel(f1, f2, degree=3, gamma=None, coef=1.0):
    """torchmetrics image/kid.py lines 54-58."""
    if gamma is None:
        gamma = 1.0 / f1.shape[1]
    return (f1 @ f2.T * gamma + coef) ** degree


def tm_poly_mmd(f_real, f_fake, degree=3, gamma=None, coef=1.0):
    """torchmetrics image/kid.py lines 61-68."""
    k_11 = tm_poly_kernel(f_real, f_real, degree, gamma, coef)
    k_22 = tm_poly_kernel(f_fake, f_fake, degree, gamma, coef)
    k_12 = tm_poly_kernel(f_real, f_fake, degree, gamma, coef)
    return tm_maximum_mean_discrepancy(k_11, k_12, k_22)


def tm_compute(real_features, fake_features, perms_real, perms_fake, subset_size,
               degree=3, gamma=None, coef=1.0):
    """torchmetrics KernelInceptionDistance.compute, lines 287-297; ``torch.randperm`` (lines
    289 and 291) replaced by rows of the given permutations."""
    kid_scores_ = []
    for i in range(len(perms_real)):
        perm = perms_real[i]
        f_real = real_features[perm[:subset_size]]
        perm = perms_fake[i]
        f_fake = fake_features[perm[:subset_size]]
        o = tm_poly_mmd(f_real, f_fake, degree, gamma, coef)
        kid_scores_.append(o)
    kid_scores = np.stack(kid_scores_)
    return kid_scores.mean(), kid_scores.std(ddof=0)  # torch .std(unbiased=False)


def google_cmmd(x, y, sigma=10, scale=1000):
    """google-research cmmd/distance.py lines 25-90 (``mmd``), jnp -> np."""
    x_sqnorms = np.diag(np.matmul(x, x.T))
    y_sqnorms = np.diag(np.matmul(y, y.T))
    gamma = 1 / (2 * sigma**2)
    k_xx = np.mean(np.exp(-gamma * (-2 * np.matmul(x, x.T) + np.expand_dims(x_sqnorms, 1)
                                    + np.expand_dims(x_sqnorms, 0))))
    k_xy = np.mean(np.exp(-gamma * (-2 * np.matmul(x, y.T) + np.expand_dims(x_sqnorms, 1)
                                    + np.expand_dims(y_sqnorms, 0))))
    k_yy = np.mean(np.exp(-gamma * (-2 * np.matmul(y, y.T) + np.expand_dims(y_sqnorms, 1)
                                    + np.expand_dims(y_sqnorms, 0))))
    return scale * (k_xx + k_yy - 2 * k_xy)


def _features(seed, n, m, d, shift=0.0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)), rng.normal(size=(m, d)) + shift


def _unit(a):
    return a / np.linalg.norm(a, axis=1, keepdims=True)


# ---------------------------------------------------------------------------- KID


def test_kid_matches_cleanfid_on_its_own_draws():
    x, y = _features(0, 60, 45, 16, shift=0.3)
    np.random.seed(0)  # clean-fid's draws (fid.py lines 104-105), m = min(60, 45, 1000)
    idx_y = np.stack([np.random.choice(45, 45, replace=False) for _ in range(7)])
    idx_x = np.stack([np.random.choice(60, 45, replace=False) for _ in range(7)])
    ref = cleanfid_kernel_distance(x, y, idx_x, idx_y)
    with jax.enable_x64(True):
        res = metrics.kid(x, y, subsets=(idx_x, idx_y))
        assert res.mean.dtype == jnp.float64
        assert float(res.mean) == pytest.approx(ref, rel=1e-11, abs=1e-12)


@pytest.mark.parametrize("degree,gamma,coef0", [(3, None, 1.0), (2, 0.3, 0.5)])
def test_kid_matches_torchmetrics_mean_and_std(degree, gamma, coef0):
    x, y = _features(1, 50, 70, 8, shift=0.2)
    rng = np.random.default_rng(5)
    s = 30
    perms_x = np.stack([rng.permutation(50) for _ in range(9)])
    perms_y = np.stack([rng.permutation(70) for _ in range(9)])
    ref_mean, ref_std = tm_compute(x, y, perms_x, perms_y, s, degree, gamma, coef0)
    with jax.enable_x64(True):
        res = metrics.kid(x, y, subsets=(perms_x[:, :s], perms_y[:, :s]), degree=degree,
                          gamma=gamma, coef0=coef0)
        assert float(res.mean) == pytest.approx(ref_mean, rel=1e-11, abs=1e-12)
        assert float(res.std) == pytest.approx(ref_std, rel=1e-9, abs=1e-12)


def test_kid_key_draws_distinct_subsets_and_matches_references():
    x, y = _features(2, 40, 35, 6, shift=0.5)
    key = jax.random.key(3)
    with jax.enable_x64(True):
        res = metrics.kid(x, y, num_subsets=12, subset_size=20, key=key)
        ix, iy = (np.asarray(a) for a in k2s._draw_subsets(key, n=40, m=35, num_subsets=12,
                                                            subset_size=20))
        assert ix.shape == iy.shape == (12, 20)
        for idx, rows in ((ix, 40), (iy, 35)):  # without replacement, in range
            assert all(len(set(r)) == 20 for r in idx) and idx.min() >= 0 and idx.max() < rows
            assert len({tuple(sorted(r)) for r in idx}) == 12  # fresh subsets
        assert float(res.mean) == pytest.approx(cleanfid_kernel_distance(x, y, ix, iy),
                                                rel=1e-11)
        full_perm = lambda idx, rows: np.array([np.r_[r, np.setdiff1d(np.arange(rows), r)]
                                                for r in idx])
        tm_mean, tm_std = tm_compute(x, y, full_perm(ix, 40), full_perm(iy, 35), 20)
        assert float(res.mean) == pytest.approx(tm_mean, rel=1e-11)
        assert float(res.std) == pytest.approx(tm_std, rel=1e-9)
        # gamma and coef0 are traced: new values reuse the compiled program
        before = k2s._kid_core._cache_size()
        res2 = metrics.kid(x, y, num_subsets=12, subset_size=20, key=key, gamma=0.3, coef0=2.0)
        assert k2s._kid_core._cache_size() == before
        tm_mean, _ = tm_compute(x, y, full_perm(ix, 40), full_perm(iy, 35), 20, 3, 0.3, 2.0)
        assert float(res2.mean) == pytest.approx(tm_mean, rel=1e-11)
        # same key, same value; another key, other subsets
        assert float(metrics.kid(x, y, num_subsets=12, subset_size=20, key=key).mean) == \
            float(res.mean)
        assert float(metrics.kid(x, y, num_subsets=12, subset_size=20,
                                 key=jax.random.key(4)).mean) != float(res.mean)


def test_kid_same_distribution_near_zero_and_shift_positive():
    x, y = _features(4, 600, 600, 16)
    key, num = jax.random.key(0), 40
    same = metrics.kid(x, y, num_subsets=num, subset_size=100, key=key)
    ident = metrics.kid(x, x, num_subsets=num, subset_size=100, key=key)
    shifted = metrics.kid(x, y + 0.5, num_subsets=num, subset_size=100, key=key)
    # unbiased: per-subset values scatter around 0, the mean well inside one std
    assert abs(float(same.mean)) < float(same.std)
    assert float(shifted.mean) > 5 * float(shifted.std) > 0

    # Given the two pools, the expectation over subsets drawn without replacement is
    # offmean(Kxx) + offmean(Kyy) - 2 mean(Kxy). For Y = X the cross term's pairs include
    # a row with itself (probability 1/N), so KID(X, X) averages 2 (offmean - diagmean) / N
    # < 0 (also in clean-fid / torchmetrics, which draw the same way), not exactly 0.
    def expected(a, b):
        kaa, kbb, kab = (tm_poly_kernel(p, q) for p, q in ((a, a), (b, b), (a, b)))
        off = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
        return off(kaa) + off(kbb) - 2 * kab.mean()

    for res, b in ((same, y), (ident, x), (shifted, y + 0.5)):
        # the subsets are independent draws: 4 standard errors of the mean over subsets
        assert float(res.mean) == pytest.approx(expected(x, b),
                                                abs=4 * float(res.std) / np.sqrt(num))
    n = len(x)
    k = tm_poly_kernel(x, x)
    assert expected(x, x) == pytest.approx(
        2 * ((k.sum() - np.trace(k)) / (n * (n - 1)) - np.trace(k) / n) / n, rel=1e-9)


def test_kid_jit_grad_and_no_recompile_for_new_gamma():
    x, y = _features(5, 30, 30, 4, shift=0.3)
    idx = (np.arange(20)[None].repeat(3, 0), np.arange(20)[None].repeat(3, 0))
    f = jax.jit(lambda a, b, g, c: metrics.kid(a, b, subsets=idx, gamma=g, coef0=c).mean)
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    vals = [float(f(x32, y32, g, 1.0)) for g in (0.1, 0.2, 0.3)]
    assert f._cache_size() == 1
    refs = [float(tm_poly_mmd(x[:20], y[:20], 3, g, 1.0)) for g in (0.1, 0.2, 0.3)]
    np.testing.assert_allclose(vals, refs, rtol=1e-4, atol=1e-5)
    g = jax.grad(lambda a: metrics.kid(a, y32, subsets=idx).mean)(x32)
    assert g.shape == x32.shape and bool(jnp.all(jnp.isfinite(g)))


# --------------------------------------------------------------------------- CMMD


@pytest.mark.parametrize("sigma,scale", [(10.0, 1000.0), (0.8, 1.0)])
def test_cmmd_matches_google_reference(sigma, scale):
    x, y = _features(6, 50, 37, 32, shift=0.05)
    x, y = _unit(x), _unit(y)  # CLIP embeddings are L2-normalised in the reference
    ref = google_cmmd(x, y, sigma, scale)
    with jax.enable_x64(True):
        ours = metrics.cmmd(x, y, sigma=sigma, scale=scale)
        assert ours.dtype == jnp.float64
        assert float(ours) == pytest.approx(ref, rel=1e-9)


def test_cmmd_is_the_biased_estimator_and_zero_on_identical_sets():
    x, y = _features(7, 40, 40, 16)
    x, y = _unit(x), _unit(y)
    assert google_cmmd(x, x) == 0.0  # the reference is exactly 0 too
    for dtype_ctx in (False, True):
        with jax.enable_x64(dtype_ctx):
            assert float(metrics.cmmd(x, x)) == 0.0
            assert float(metrics.cmmd(jnp.asarray(x), jnp.asarray(x.copy()))) == 0.0
    # biased V-statistic: same distribution gives a positive value, not the unbiased one
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / 200)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    unbiased = 1000 * ((kxx.sum() - 40) / (40 * 39) + (kyy.sum() - 40) / (40 * 39)
                       - 2 * kxy.mean())
    with jax.enable_x64(True):
        ours = float(metrics.cmmd(x, y))
        before = k2s._cmmd_core._cache_size()  # sigma and scale are traced
        other = float(metrics.cmmd(x, y, sigma=3.0, scale=7.0))
        assert k2s._cmmd_core._cache_size() == before
    assert other == pytest.approx(google_cmmd(x, y, 3.0, 7.0), rel=1e-9)
    assert ours > 0 and ours == pytest.approx(google_cmmd(x, y), rel=1e-9)
    assert abs(ours - unbiased) > 1e3 * 1e-9 * abs(ours)


def test_cmmd_shift_positive_and_large_norms():
    x, y = _features(8, 120, 80, 8)
    x, y = _unit(x), _unit(y)
    base = float(metrics.cmmd(x, y))  # the float32 path, against the reference in float64
    shifted = float(metrics.cmmd(x, _unit(y + 0.7)))
    assert base == pytest.approx(google_cmmd(x, y), rel=1e-2)
    assert shifted == pytest.approx(google_cmmd(x, _unit(y + 0.7)), rel=2e-3)
    assert shifted > 20 * base > 0
    # centring: a common offset of 1e3 changes nothing (the plain expansion in float32
    # would lose everything: |x|^2 ~ 1e6 * eps ~ 0.1 against |x - y|^2 / 200 ~ 0.01)
    off = np.full(8, 1e3)
    assert float(metrics.cmmd((x + off).astype(np.float32), (y + off).astype(np.float32))) \
        == pytest.approx(base, rel=2e-2)


def test_cmmd_jit_no_recompile_for_new_sigma_row_blocks_and_grad(monkeypatch):
    x, y = _features(9, 20, 20, 4, shift=0.2)
    x32, y32 = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    # rows in blocks of 7 (two full lax.map batches and a remainder of 6): same values
    monkeypatch.setattr(k2s, "_CMMD_BLOCK_ELEMENTS", 7 * 20)
    k2s._cmmd_core.clear_cache()
    f = jax.jit(lambda a, b, s: metrics.cmmd(a, b, sigma=s))
    try:
        vals = [float(f(x32, y32, s)) for s in (1.0, 2.0, 3.0)]
    finally:
        k2s._cmmd_core.clear_cache()
    assert f._cache_size() == 1
    np.testing.assert_allclose(vals, [google_cmmd(x, y, s) for s in (1.0, 2.0, 3.0)],
                               rtol=1e-3)
    # d/dsigma nonzero; d/dX finite also on the diagonal and for X = Y (d2 = 0)
    gx, gs = jax.grad(lambda a, s: metrics.cmmd(a, a, sigma=s), argnums=(0, 1))(x32, 2.0)
    assert bool(jnp.all(jnp.isfinite(gx))) and bool(jnp.isfinite(gs))


def test_memory_is_bounded_by_one_subset_and_one_row_block():
    # compiled only: KID keeps one subset's kernels (3 x 256^2 float32 = 0.75 MiB), not all
    # 50 (38 MiB); CMMD keeps one (block, 8192) tile (16 MiB), not 8192^2 (256 MiB)
    shape = jax.ShapeDtypeStruct((2000, 64), jnp.float32)
    kid = jax.jit(lambda a, b: metrics.kid(a, b, num_subsets=50, subset_size=256,
                                           key=jax.random.key(0)))
    assert kid.lower(shape, shape).compile().memory_analysis().temp_size_in_bytes < 8 * 2**20
    shape = jax.ShapeDtypeStruct((8192, 16), jnp.float32)
    cm = jax.jit(metrics.cmmd).lower(shape, shape).compile()
    assert cm.memory_analysis().temp_size_in_bytes < 64 * 2**20


# ---------------------------------------------------------------------- groupwise


def test_groupwise_with_kid_and_cmmd():
    x, y = _features(10, 24, 18, 5, shift=0.4)
    gx, gy = np.repeat([0, 1, 2], 8), np.tile([0, 1, 2], 6)
    key = jax.random.key(1)
    res = metrics.groupwise(metrics.kid, (gx, gy), x, y, key=key, num_subsets=3,
                            subset_size=5)
    # the same key in every group: the same subset positions within each group's rows
    ix, iy = (np.asarray(a) for a in k2s._draw_subsets(key, n=8, m=6, num_subsets=3,
                                                        subset_size=5))
    for i in range(3):
        xi, yi = x[gx == i], y[gy == i]
        ref = cleanfid_kernel_distance(xi, yi, ix, iy)
        assert float(res.per_group.mean[i]) == pytest.approx(ref, rel=1e-4, abs=1e-5)
        vals = [tm_poly_mmd(xi[ix[j]], yi[iy[j]]) for j in range(3)]
        assert float(res.per_group.std[i]) == pytest.approx(np.std(vals), rel=1e-3, abs=1e-5)
    # cmmd under groupwise (vmapped as kid above); its registered check names the group
    with pytest.raises(ValueError, match=r"group id 0: `subset_size` \(7\) must be <="):
        metrics.groupwise(metrics.kid, (gx, gy), x, y, key=key, subset_size=7)
    with pytest.raises(ValueError, match=r"group id 0: `sigma` must be a finite number > 0"):
        metrics.groupwise(metrics.cmmd, (gx, gy), x, y, sigma=np.nan)


# --------------------------------------------------------------------- bad inputs

_X, _Y = np.ones((6, 3)), np.zeros((5, 3))
_K = jax.random.key(0)


def _nan_at(a):
    a = a.copy()
    a[1, 2] = np.nan
    return a


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.kid(_nan_at(_X), _Y, key=_K, subset_size=3), "`X` contains 1 non-finite"),
        (lambda: metrics.kid(_X, np.full((5, 3), np.inf), key=_K, subset_size=3),
         "`Y` contains 15 non-finite"),
        (lambda: metrics.kid(_X[0], _Y, key=_K, subset_size=3), "`X` must be a 2-D"),
        (lambda: metrics.kid(_X, _Y[None], key=_K, subset_size=3), "`Y` must be a 2-D"),
        (lambda: metrics.kid(_X, np.zeros((5, 4)), key=_K, subset_size=3),
         "`X` and `Y` must have the same feature dimension"),
        (lambda: metrics.kid(_X, _Y, key=_K), r"`subset_size` \(1000\) must be <= .*`Y` \(5\)"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=1), "`subset_size` must be >= 2"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3, num_subsets=0),
         "`num_subsets` must be >= 1"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3, gamma=np.nan),
         "`gamma` must be a finite number > 0"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3, gamma=-1.0),
         "`gamma` must be a finite number > 0"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3, coef0=np.inf),
         "`coef0` must be a finite number >= 0"),
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3, degree=0), "`degree` must be >= 1"),
        (lambda: metrics.kid(_X, _Y, subset_size=3), "`key` is required"),
        (lambda: metrics.kid(_X, _Y, key=_K, subsets=(np.zeros((1, 2), int),) * 2),
         "either `key`"),
        (lambda: metrics.kid(_X, _Y, subsets=([[0, 6]], [[0, 1]])),
         r"`subsets\[0\]` must index rows of `X` in \[0, 6\)"),
        (lambda: metrics.kid(_X, _Y, subsets=([[0, 1]], [[2, 2]])),
         r"`subsets\[1\]` repeats a row within subset 0"),
        (lambda: metrics.kid(_X, _Y, subsets=([[0, 1]], [[0, 1], [1, 2]])),
         "must have the same shape"),
        (lambda: metrics.kid(_X, _Y, subsets=([[0]], [[1]])), "at least 2 indices"),
        (lambda: metrics.kid(_X[:1], _Y, key=_K, subset_size=2), "`X` needs at least 2"),
        (lambda: metrics.cmmd(_nan_at(_X), _Y), "`X` contains 1 non-finite"),
        (lambda: metrics.cmmd(_X, _nan_at(_Y)), "`Y` contains 1 non-finite"),
        (lambda: metrics.cmmd(_X, _Y[:, 0]), "`Y` must be a 2-D"),
        (lambda: metrics.cmmd(_X, np.zeros((5, 2))), "same feature dimension"),
        (lambda: metrics.cmmd(_X, _Y, sigma=np.nan), "`sigma` must be a finite number > 0"),
        (lambda: metrics.cmmd(_X, _Y, sigma=0.0), "`sigma` must be a finite number > 0"),
        (lambda: metrics.cmmd(_X, _Y, scale=np.inf), "`scale` must be a finite number > 0"),
    ],
)
def test_bad_input(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: metrics.kid(_X, _Y, key=_K, subset_size=3.0),
         "`subset_size` must be a Python int"),
        (lambda: metrics.kid(_X, _Y, subsets=np.zeros((2, 1, 2), int)),
         "`subsets` must be a pair"),
        (lambda: metrics.kid(_X, _Y, subsets=([[0.0, 1.0]], [[0, 1]])), "integer row indices"),
    ],
)
def test_bad_input_types(call, match):
    with pytest.raises(TypeError, match=match):
        call()
