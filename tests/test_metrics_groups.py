"""Group-wise evaluation: equals a manual per-group loop, for both the vmapped (equal group
sizes) and the looped (unequal sizes) path, with per-group arrays and keys."""

import jax
import numpy as np
import pytest

from jaxdiv import metrics


def test_equal_groups_vmapped_match_manual_loop():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    groups = np.array([2, 0, 1] * 4)  # interleaved ids: sorting must regroup them
    res = metrics.groupwise(metrics.vendi, groups, x, q=2.0)
    manual = [float(metrics.vendi(x[groups == g], q=2.0)) for g in (0, 1, 2)]
    np.testing.assert_array_equal(res.group_ids, [0, 1, 2])
    np.testing.assert_allclose(res.per_group, manual, rtol=1e-5)
    assert float(res.mean) == pytest.approx(np.mean(manual), rel=1e-5)


def test_unequal_groups_and_namedtuple_outputs():
    rng = np.random.default_rng(1)
    real, fake = rng.normal(size=(20, 3)), rng.normal(size=(17, 3))
    g_real = np.array([0] * 12 + [5] * 8)
    g_fake = np.array([5] * 9 + [0] * 8)
    res = metrics.groupwise(metrics.prdc, (g_real, g_fake), real, fake, k=3)
    for i, g in enumerate((0, 5)):
        ref = metrics.prdc(real[g_real == g], fake[g_fake == g], k=3)
        np.testing.assert_allclose([v[i] for v in res.per_group], [float(v) for v in ref],
                                   atol=1e-6)
    assert float(res.mean.density) == pytest.approx(float(np.mean(res.per_group.density)))


def test_group_arrays_carry_text_embeddings_and_keys():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(12, 8)).astype(np.float32)
    text = rng.normal(size=(3, 8)).astype(np.float32)
    keys = jax.random.split(jax.random.key(0), 3)
    groups = np.repeat([10, 20, 30], 4)
    res = metrics.groupwise(metrics.spp, groups, emb, group_arrays=(text, keys),
                            num_directions=5)
    for i in range(3):
        ref = metrics.spp(emb[4 * i:4 * i + 4], text[i], keys[i], num_directions=5)
        assert float(res.per_group.spp[i]) == pytest.approx(float(ref.spp), abs=1e-6)


@pytest.mark.parametrize(
    "call,exc,match",
    [
        (lambda: metrics.groupwise(metrics.mss, np.array([0, 1]), np.ones((3, 2))), ValueError,
         r"`groups` must have one id per sample \(3\)"),
        (lambda: metrics.groupwise(metrics.mss, np.array([0.5, 1.5]), np.ones((2, 2))),
         ValueError, "integer group ids"),
        (lambda: metrics.groupwise(metrics.prdc, (np.zeros(6, int), np.ones(6, int)),
                                   np.ones((6, 2)), np.ones((6, 2))), ValueError,
         "same set of group ids"),
        (lambda: metrics.groupwise(metrics.spp, np.zeros(4, int), np.ones((4, 3)),
                                   group_arrays=(np.ones((2, 3)),)), ValueError,
         r"`group_arrays\[0\]` must have one row per group \(1\)"),
        (lambda: metrics.groupwise(metrics.mss, np.zeros(4, int), np.full((4, 2), np.nan)),
         ValueError, r"`sample_arrays\[0\]` contains 8 non-finite"),
        (lambda: metrics.groupwise("vendi", np.zeros(4, int), np.ones((4, 2))), TypeError,
         "`metric` must be callable"),
        (lambda: metrics.groupwise(metrics.prdc, np.repeat([0, 1], 3), np.ones((6, 2)),
                                   np.ones((6, 2)), k=5), ValueError,
         "`real` needs at least 6 samples"),
    ],
)
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
