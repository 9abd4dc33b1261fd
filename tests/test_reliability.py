"""Reliability (issue 11): no silent wrong answers, errors that name the argument.

One test per class of problem, several inputs each. An error must name the argument,
what was expected and what came; a result is checked against an independent truth
(closed forms, NumPy references). Checkpoint files are in test_checkpoint_reliability.py.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import min_dist

import jaxdiv
import toy
from jaxdiv import guidance, metrics, samplers, schedules
from jaxdiv.guidance.base import _identity_x0
from jaxdiv.guidance.spell.radius_search import build_index, repulsion
from jaxdiv.metrics.vendi_entropy import MAX_KERNEL_SAMPLES, MEDIAN_MAX_ROWS, _median_bandwidth
from jaxdiv.models.clip.tokenizer import check_token_ids

KEY = jax.random.key(0)


def _den(x, t, c):  # exact denoiser of N(0, 1) data on the EDM process
    return x / (1 + t**2)


# ------------------------------------------------------------------ windows never active


@pytest.mark.parametrize("steps, n, bad", [([100], 6, [100]), ([0, 6], 6, [6]),
                                           ([3, 4, 9], 4, [4, 9])])  # fmt: skip
def test_window_steps_beyond_the_sampler_are_refused(steps, n, bad):
    s = samplers.ddim(schedules.edm(), n)
    g = guidance.window(_identity_x0(), steps=steps)
    with pytest.raises(ValueError, match=rf"names step indices \[{', '.join(map(str, bad))}\] "
                                         rf"but the sampler has {n} steps"):  # fmt: skip
        jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY, guidance=g)
    # the steps that exist do act (positive control)
    ok = guidance.window(_identity_x0(), steps=[n - 1])
    out = jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY, guidance=ok, trace=True)
    assert np.asarray(out.trace.active["identity"]).tolist() == [False] * (n - 1) + [True]


@pytest.mark.parametrize("make, kw, match", [
    # SD's timesteps on the flow process of SD3 (t in [0, 1])
    (lambda: samplers.flow_euler(schedules.flow(shift=3.0), 6), dict(t=(200, 800)),
     r"window\(t=\(200, 800\]\) lies outside the times of the sampler's process, \[0, 1\] "
     r"\(flow\)"),
    # EDM's sigma range on SD's VP process, whose noise levels end at 14.61
    (lambda: samplers.ddim(schedules.vp_scaled_linear(), 6), dict(noise_level=(20, 80)),
     r"window\(noise_level=\(20, 80\]\) lies outside the noise levels of the sampler's "
     r"process, \[0, 14.61\] \(vp_scaled_linear\)"),
    # only the clean end, which no sampler evaluates
    (lambda: samplers.ddim(schedules.vp_linear(), 6), dict(t=(-5, -1)),
     r"window\(t=\(-5, -1\]\) lies outside the times .* \[-1, 999\]"),
    (lambda: samplers.edm(schedules.edm(), 5), dict(noise_level=(None, 0)),
     r"window\(noise_level=\(-inf, 0\]\) lies outside the noise levels .* \[0, inf\] \(edm\)"),
    (lambda: samplers.ddim(schedules.edm(), 5), dict(t=(-3, -1)),
     r"window\(t=\(-3, -1\]\) lies outside the times"),
])  # fmt: skip
def test_window_outside_the_process_is_refused(make, kw, match):
    s = make()
    # the SD 14.61 comes from the schedule itself: sqrt((1 - abar) / abar) at t = 999
    abar = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2)[-1]
    assert round(math.sqrt((1 - abar) / abar), 2) == 14.61
    g = guidance.window(_identity_x0(), **kw)
    with pytest.raises(ValueError, match=match):
        jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY, guidance=g)
    # the same term on a wrapped window chain is found too
    with pytest.raises(ValueError, match="lies outside"):
        jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY,
                      guidance=guidance.window(g, steps=[0]))  # fmt: skip


@pytest.mark.parametrize("make, kw, active", [
    # inside the range but between grid points: allowed (a sweep's empty interval)
    (lambda: samplers.flow_euler(schedules.flow(), 4), dict(t=(0.1, 0.2)), [False] * 4),
    (lambda: samplers.flow_euler(schedules.flow(), 4), dict(t=(0.7, 800)),
     [True, False, False, False]),
    # above every grid point of this sampler, but inside EDM's process (sigma_max may grow)
    (lambda: samplers.ddim(schedules.edm(), 4), dict(noise_level=(100, None)), [False] * 4),
    (lambda: samplers.ddim(schedules.vp_linear(), 4), dict(noise_level=(20, 200)),
     [True, False, False, False]),
])  # fmt: skip
def test_window_inside_the_process_runs(make, kw, active):
    s = make()
    g = guidance.window(_identity_x0(), **kw)
    out = jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY, guidance=g, trace=True)
    assert np.asarray(out.trace.active["identity"]).tolist() == active


def test_particle_min_noise_level_above_the_process_is_refused():
    """PG's switch-off level above every noise level of SD's process (14.61) would leave
    the term off at every step; refused, windowed or not. Inside the range it acts from
    its level down (the SD code's min_noise_level=1 acts at the high-noise steps only)."""
    s = samplers.ddim(schedules.vp_scaled_linear(), 6)
    den = lambda x, t, c: 0.5 * x  # noqa: E731
    z = jax.random.normal(KEY, (4, 2))
    high = guidance.particle(1.0, min_noise_level=20.0)
    refused = (r"guidance term 'particle': min_noise_level=20 lies above every noise level "
               r"\(sigma / alpha\) of the sampler's process, at most 14.61: the term "
               r"would never act$")  # fmt: skip
    for g in (high, guidance.window(high, steps=[0])):
        with pytest.raises(ValueError, match=refused):
            jaxdiv.sample(s, den, z, key=KEY, guidance=g)
    out = jaxdiv.sample(s, den, z, key=KEY, guidance=guidance.particle(1.0, min_noise_level=1.0),
                        trace=True)  # fmt: skip
    level = np.asarray(s.schedule.noise_level(s.times[:-1]))
    weight = np.asarray(out.trace.info["particle"].weight)
    assert ((weight != 0) == (level >= 1.0)).all() and (level < 1.0).any()


def test_cads_flow_time_with_tau1_above_the_process_is_refused():
    """With ``time="flow"`` CADS's t is lambda / (1 + lambda); SD's largest noise level
    14.61 is t = 0.936, so tau1 = 0.95 would never anneal; refused. Below it, CADS anneals
    exactly at the steps whose flow time exceeds tau1 (gamma < 1 there only)."""
    s = samplers.ddim(schedules.vp_scaled_linear(), 6)
    den = lambda x, t, c: 0.5 * x + 0.1 * c  # noqa: E731
    z, cond = jax.random.normal(KEY, (4, 2)), jnp.ones((4, 2))
    refused = (r"^guidance term 'cads': tau1=0.95 with time='flow' is at or above the flow "
               r"time of the process's largest noise level \(14.61, t = 0.936\)")  # fmt: skip
    with pytest.raises(ValueError, match=refused):
        jaxdiv.sample(s, den, z, key=KEY, cond=cond,
                      guidance=guidance.cads(0.95, 0.99, time="flow"))  # fmt: skip
    out = jaxdiv.sample(s, den, z, key=KEY, cond=cond, trace=True,
                        guidance=guidance.cads(0.9, 0.99, time="flow"))  # fmt: skip
    level = np.asarray(s.schedule.noise_level(s.times[:-1]))
    gamma = np.asarray(out.trace.info["cads"].gamma)
    assert ((gamma < 1) == (level / (1 + level) > 0.9)).all() and (gamma < 1).any()
    # progress time starts at t = 1 on every sampler: the same tau1 acts there
    jaxdiv.sample(s, den, z, key=KEY, cond=cond, guidance=guidance.cads(0.95, 0.99))


@pytest.mark.parametrize("make", [
    lambda v: guidance.particle(1.0, min_noise_level=v),
    lambda v: guidance.window(guidance.cfg(2.0), noise_level=(v, 10.0)),
    lambda v: guidance.window(guidance.cfg(2.0), t=(100.0 * v, 900.0)),
    lambda v: guidance.tpso(jnp.ones((4, 2)), ratio=v / 4),
    lambda v: guidance.cads(0.5 + v / 10, 0.95, time="flow"),
    lambda v: guidance.cfg(1.0 + v, rescale=v / 4, prediction_type="epsilon"),
])  # fmt: skip
def test_checked_knobs_stay_traced_leaves(make):
    """The never-acts checks read concrete values eagerly; the values themselves stay
    traced leaves: new ones reuse the compiled program (jaxdiv.compile_count). So do
    CFG's scale and rescale factor."""
    s = samplers.ddim(schedules.vp_scaled_linear(), 6)
    z, cond = jax.random.normal(KEY, (4, 2)), jnp.ones((4, 2))
    den = lambda x, t, c: 0.5 * x + 0.1 * c  # noqa: E731
    outs = [jaxdiv.sample(s, den, z, key=KEY, cond=cond, guidance=make(1.0)).x0]
    before = jaxdiv.compile_count()
    outs += [jaxdiv.sample(s, den, z, key=KEY, cond=cond, guidance=make(v)).x0
             for v in (1.5, 2.0, 3.0)]  # fmt: skip
    assert jaxdiv.compile_count() == before
    assert all(bool(jnp.isfinite(o).all()) for o in outs)


def test_window_range_check_leaves_traced_bounds_alone():
    """Inside jit the bounds are tracers: nothing to check, and no error (one program for
    every interval of a sweep)."""
    s = samplers.flow_euler(schedules.flow(), 4)

    @jax.jit
    def run(hi):
        g = guidance.window(_identity_x0(), t=(hi - 1.0, hi))
        return jaxdiv.sample(s, _den, jnp.ones((2, 1)), key=KEY, guidance=g, trace=True)

    assert not np.asarray(run(800.0).trace.active["identity"]).any()
    assert np.asarray(run(1.0).trace.active["identity"]).all()


@pytest.mark.parametrize("make, tmin, tmax, top, bottom", [
    # SD timesteps taken for Alg. 2's S_tmin / S_tmax (noise levels) on SD's process
    (schedules.vp_scaled_linear, 200, 800, "14.61", None),
    (schedules.edm, 100, 200, "80", "0.002"),  # above sigma_max
    (schedules.edm, 0.0001, 0.001, "80", "0.002"),  # below sigma_min
])  # fmt: skip
def test_edm_churn_window_holding_no_grid_level_is_refused(make, tmin, tmax, top, bottom):
    sch = make()
    levels = np.asarray(sch.noise_level(sch.grid(10)[:-1]))
    assert not ((levels >= tmin) & (levels <= tmax)).any()  # the premise, from the grid itself
    with pytest.raises(ValueError, match=rf"s_churn=40 would never act: no noise level of the "
                       rf"grid \(sigma / alpha from {top} down to {bottom or '.*'}\) lies in "
                       rf"\[s_tmin, s_tmax\] = \[{tmin:g}, {tmax:g}\]"):  # fmt: skip
        samplers.edm(sch, 10, s_churn=40, s_tmin=tmin, s_tmax=tmax)
    # without churn the window has nothing to restrict (no error); a window holding one
    # level of the grid churns there and only there
    samplers.edm(sch, 10, s_tmin=tmin, s_tmax=tmax)
    one = float(levels[3])  # the sampler computes it per step: not bitwise the same
    s = samplers.edm(sch, 10, s_churn=40, s_tmin=one * 0.999, s_tmax=one * 1.001)
    out = jaxdiv.sample(s, lambda x, t, c: 0.0 * x, jnp.ones((2, 1)), key=KEY, trace=True)
    plain = jaxdiv.sample(samplers.edm(sch, 10), lambda x, t, c: 0.0 * x, jnp.ones((2, 1)),
                          key=KEY, trace=True)  # fmt: skip
    differs = np.abs(np.asarray(out.trace.x) - np.asarray(plain.trace.x)).reshape(10, -1)
    assert differs[:4].max() == 0 and differs[4].max() > 0  # churn at step 3 shows at step 4


def test_gass_steps_beyond_the_sampler_are_refused():
    enc = toy.sphere_encoder(KEY, 2)
    s = samplers.ddim(schedules.edm(), 6)
    for steps in ([100], [2, 6]):
        g = guidance.gass(enc, enc.text_emb, num_directions=2, steps=steps)
        with pytest.raises(ValueError, match="guidance term 'gass': window.* 6 steps"):
            jaxdiv.sample(s, _den, jnp.ones((3, 2)), key=KEY, guidance=g)


@pytest.mark.parametrize("steps", [[1.7], [2.0], [True], ["1"], np.array([0.5])])
def test_window_steps_must_be_integers(steps):
    with pytest.raises(TypeError, match="steps must be a sequence of integer step indices"):
        guidance.window(_identity_x0(), steps=steps)
    enc = toy.sphere_encoder(KEY, 2)
    with pytest.raises(TypeError, match="steps must be a sequence of integer step indices"):
        guidance.gass(enc, enc.text_emb, num_directions=2, steps=steps)


@pytest.mark.parametrize("kw, match", [
    (dict(noise_level=(5, 1)), r"noise_level must have low < high, got \(5, 1\)"),
    (dict(noise_level=(math.nan, 1)), r"noise_level\[0\] must be a number, got nan"),
    (dict(noise_level=(0.1, math.nan)), r"noise_level\[1\] must be a number, got nan"),
    (dict(t=(3.0, 3.0)), r"t must have low < high"),
    (dict(steps=[-1]), r"steps must be >= 0"),
    (dict(steps=[]), r"steps must name at least one step index"),
])  # fmt: skip
def test_window_bounds_are_checked_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        guidance.window(_identity_x0(), **kw)


# ------------------------------------------------------------------ SPELL's 0/0 tie


@pytest.mark.parametrize("make", [lambda: samplers.ddim(schedules.edm(), 6),
                                  lambda: samplers.edm(schedules.edm(), 5),
                                  lambda: samplers.flow_euler(schedules.flow(), 6)])  # fmt: skip
def test_spell_identical_noise_rows_end_at_least_r_apart(make):
    """Two identical noise rows on a deterministic sampler: Eq. 5 is 0/0 (and so is the
    anchor direction x_t^i - x_t^k); the fixed pair direction breaks the tie, and the
    B = 2 guarantee (distance >= r) holds."""
    s = make()
    gm = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.01]))  # a tight blob
    r = 0.5
    for i, row in enumerate((jnp.ones(2), jnp.array([0.3, -2.0]))):
        noise = jnp.stack([row, row])
        out = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=KEY,
                            guidance=guidance.spell(r), trace=True)  # fmt: skip
        x = np.asarray(out.x0)
        assert min_dist(x[:1], x[1:])[0] >= r * (1 - 1e-5)
        info = out.trace.info["spell"]
        # the first step's shields were active *and* moved both samples by r
        assert bool(info.active[0].all())
        np.testing.assert_allclose(np.asarray(info.delta_norm[0]), r, rtol=1e-5)
        if i == 0:
            again = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=KEY,
                                  guidance=guidance.spell(r), trace=True)  # fmt: skip
            np.testing.assert_array_equal(np.asarray(again.x0), x)  # deterministic


def test_spell_tie_break_is_antisymmetric_and_exact():
    """Direct check of the repulsion sum: coinciding queries with coinciding anchors move
    by exactly r, in opposite directions (distance 2r), for several dimensions."""
    for d, r in ((1, 0.3), (16, 2.5)):
        q = jnp.ones((2, d)) * 0.7
        rep = repulsion(q, build_index(q), r, query_anchors=q, shield_anchors=q[None] * 1.0,
                        query_ids=jnp.arange(2))  # fmt: skip
        delta = np.asarray(rep.delta, np.float64)
        np.testing.assert_allclose(np.linalg.norm(delta, axis=1), r, rtol=1e-5)
        np.testing.assert_allclose(delta[0], -delta[1], atol=1e-6)
        assert rep.count.tolist() == [1, 1]


# ------------------------------------------------------------------ collapsed batches


def _np_vendi_rbf(x, h):
    """Independent NumPy Vendi of the RBF kernel with bandwidth h (float64 eigh)."""
    x = np.asarray(x, np.float64)
    d2 = ((x[:, None] - x[None]) ** 2).sum(-1)
    lam = np.clip(np.linalg.eigvalsh(np.exp(-d2 / (2 * h * h)) / len(x)), 0, None)
    p = lam[lam > 1e-12] / lam.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def _np_median_nonzero(x):
    x = np.asarray(x, np.float64)
    i, j = np.triu_indices(len(x), 1)
    d = np.linalg.norm(x[i] - x[j], axis=1)
    d = d[d > 0]
    return float(np.median(d)) if d.size else 1.0


@pytest.mark.parametrize("n_same, n_other, d", [(9, 1, 3), (20, 2, 5), (4, 0, 3)])
def test_rbf_metrics_of_a_collapsed_batch_are_finite_and_correct(n_same, n_other, d):
    rng = np.random.default_rng(n_same)
    x = np.concatenate([np.tile(rng.normal(size=(1, d)), (n_same, 1)),
                        rng.normal(size=(n_other, d))]).astype(np.float32)  # fmt: skip
    h = _np_median_nonzero(x)
    assert float(_median_bandwidth(jnp.asarray(x))) == pytest.approx(h, rel=1e-5)
    v = float(metrics.vendi(x, kernel="rbf"))
    assert v == pytest.approx(_np_vendi_rbf(x, h), rel=1e-4)
    assert float(metrics.log_vendi(x, kernel="rbf")) == pytest.approx(math.log(v), abs=1e-5)
    if n_other == 0:
        assert v == pytest.approx(1.0, abs=1e-6)  # identical samples: Vendi 1
    # MMD^2_u between the collapsed batch and itself is 0 exactly; with another sample it
    # equals the NumPy U-statistic with the pooled non-zero median bandwidth
    assert float(metrics.mmd(x, x)) == pytest.approx(
        _np_mmd(x, x, _np_median_nonzero(np.concatenate([x, x]))), abs=1e-5)
    y = rng.normal(size=(6, d)).astype(np.float32)
    hp = _np_median_nonzero(np.concatenate([x, y]))
    assert float(metrics.mmd(x, y)) == pytest.approx(_np_mmd(x, y, hp), abs=1e-5)


def _np_mmd(x, y, h):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    k = lambda a, b: np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * h * h))
    n, m = len(x), len(y)
    kxx, kyy = k(x, x), k(y, y)
    return ((kxx.sum() - n) / (n * (n - 1)) + (kyy.sum() - m) / (m * (m - 1))
            - 2 * k(x, y).mean())  # fmt: skip


def test_all_identical_samples_score_one_and_zero():
    for n, d in ((2, 1), (40, 8)):
        x = jnp.full((n, d), 0.25)
        # float32 eigenvalues of the rank-one K / n carry ~n ulps (n = 40 on an AVX-512 Xeon:
        # vendi 1 + 10 ulps); the closed form is exact, the bound is the solver's rounding
        tol = n * float(jnp.finfo(jnp.float32).eps)
        assert float(metrics.vendi(x, kernel="rbf")) == pytest.approx(1.0, abs=tol)
        assert float(metrics.log_vendi(x, kernel="rbf")) == pytest.approx(0.0, abs=tol)
        assert float(metrics.mmd(x, x)) == pytest.approx(0.0, abs=1e-6)
        assert float(metrics.vendi(x, kernel="rbf", q=2.0)) == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------ groupwise checks


@pytest.mark.parametrize("metric, kwargs, group_arrays, name", [
    (metrics.mss, {}, (), "X"),
    (metrics.vendi, {}, (), "X"),
    (metrics.log_vendi, {"q": 2.0}, (), "X"),
    (metrics.gram_logdet, {"normalize": True}, (), "X"),
    (metrics.clip_score, {}, (jnp.ones((3, 4)),), "img_emb"),
])  # fmt: skip
def test_groupwise_runs_the_metrics_checks_before_vmap(metric, kwargs, group_arrays, name):
    x = jax.random.normal(KEY, (9, 4)).at[4].set(0.0)  # a zero row in group 1
    groups = jnp.repeat(jnp.arange(3), 3)
    with pytest.raises(ValueError, match=rf"group id 1: `{name}` has 1 all-zero row"):
        metrics.groupwise(metric, groups, x, group_arrays=group_arrays, **kwargs)
    # unequal groups (the non-vmapped path) name the group too
    with pytest.raises(ValueError, match=rf"group id 1: `{name}` has 1 all-zero row"):
        metrics.groupwise(metric, jnp.array([0, 0, 1, 1, 1, 1, 2, 2, 2]), x,
                          group_arrays=group_arrays, **kwargs)  # fmt: skip
    # positive control: without the zero row the groups agree with direct calls
    good = x.at[4].set(1.0)
    res = metrics.groupwise(metric, groups, good, group_arrays=group_arrays, **kwargs)
    direct = [metric(good[3 * g:3 * g + 3], *[a[g] for a in group_arrays], **kwargs)
              for g in range(3)]  # fmt: skip
    np.testing.assert_allclose(np.asarray(res.per_group), np.asarray(direct), rtol=1e-5)


def test_groupwise_checks_spp_with_per_group_keys():
    emb = jax.random.normal(KEY, (6, 4)).at[1].set(0.0)
    keys = jax.random.split(KEY, 2)
    with pytest.raises(ValueError, match="group id 0: `emb` has 1 all-zero row"):
        metrics.groupwise(metrics.spp, jnp.repeat(jnp.arange(2), 3), emb,
                          group_arrays=[jnp.ones((2, 4)), keys], num_directions=2)  # fmt: skip


# ------------------------------------------------------------------ extreme feature norms


@pytest.mark.parametrize("scale", [1e-25, 1e-12, 1e12, 1e20])
def test_metrics_are_scale_safe(scale):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    y = rng.normal(size=(10, 5)).astype(np.float32) + 0.5
    xs, ys = (x * np.float32(scale)).astype(np.float32), (y * np.float32(scale)).astype(np.float32)
    assert np.isfinite(xs).all() and (np.abs(xs) > 0).all()
    # cosine metrics are scale-invariant: closed forms
    eye = np.eye(4, dtype=np.float32) * np.float32(scale)
    assert float(metrics.vendi(eye)) == pytest.approx(4.0, rel=1e-5)
    same = np.tile(x[:1], (5, 1)) * np.float32(scale)
    assert float(metrics.mss(same)) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics.vendi(same)) == pytest.approx(1.0, abs=1e-5)
    assert float(metrics.mss(xs)) == pytest.approx(float(metrics.mss(x)), abs=1e-5)
    assert float(metrics.clip_score(xs, ys[0])) == pytest.approx(
        float(metrics.clip_score(x, y[0])), abs=1e-3)
    # distance metrics with a scale-free bandwidth or k-NN radii: the unscaled values
    assert float(metrics.vendi(xs, kernel="rbf")) == pytest.approx(
        float(metrics.vendi(x, kernel="rbf")), rel=1e-4)
    assert float(metrics.mmd(xs, ys)) == pytest.approx(float(metrics.mmd(x, y)), abs=1e-5)
    assert float(metrics.mmd(xs, ys, bandwidth=2.0 * scale)) == pytest.approx(
        float(metrics.mmd(x, y, bandwidth=2.0)), abs=1e-5)
    got, want = metrics.prdc(xs, ys, k=3), metrics.prdc(x, y, k=3)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6)
    # the energy distance scales with the features (homogeneous of degree 1): it was NaN
    # at 1e20 (squared distances overflow) and 0 at 1e-25 (they underflow)
    assert float(metrics.energy_distance(xs, ys)) / scale == pytest.approx(
        float(metrics.energy_distance(x, y)), rel=1e-4)


# ------------------------------------------------------------------ VP times, token ids


@pytest.mark.parametrize("times, shown", [([5000.0, 10.0, -1.0], "5000.0"), ([-3.0], "-3.0"),
                                          ([999.5], "999.5"), ([math.nan], "nan")])  # fmt: skip
def test_vp_times_outside_the_schedule_are_refused(times, shown):
    vp = schedules.vp_linear()
    for fn in (vp.alpha, vp.sigma, vp.noise_level):
        with pytest.raises(ValueError, match=rf"t must lie in \[-1, 999\] .*got {shown}"):
            fn(jnp.asarray(times))
    np.testing.assert_allclose(np.asarray(vp.alpha(jnp.array([-1.0, 0.0, 999.0])))[0], 1.0)


def test_vp_user_grid_outside_the_schedule_is_refused():
    with pytest.raises(ValueError, match=r"times must lie in \[-1, 999\].*got 1500.0"):
        samplers.ddim(schedules.vp_linear(), times=[1500.0, 10.0, -1.0])


@pytest.mark.parametrize("ids, shown", [([[0, 12]], "12"), ([[-1, 3]], "-1"),
                                        ([[10, 2], [3, -5]], "10, -5")])  # fmt: skip
def test_token_ids_outside_the_vocabulary_are_refused(ids, shown):
    with pytest.raises(ValueError, match=rf"input_ids must be token ids in \[0, 10\).*got {shown}"):
        check_token_ids(np.asarray(ids), 10)
    from flax import nnx

    from jaxdiv.models.clip import CLIPTextModel

    m = CLIPTextModel({"vocab_size": 10, "hidden_size": 4, "intermediate_size": 4,
                       "num_hidden_layers": 1, "num_attention_heads": 1}, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=rf"token ids in \[0, 10\).*got {shown}"):
        m(jnp.asarray(ids, jnp.int32))
    assert m(jnp.asarray([[0, 9]], jnp.int32)).last_hidden_state.shape == (1, 2, 4)


def test_pipeline_token_ids_and_empty_prompts(tmp_path):
    """The pipeline's jitted ``encode_prompt`` checks concrete ids before tracing; the
    tokenizer refuses an empty prompt list (transformers raised an IndexError)."""
    from flax import nnx

    from jaxdiv.models.clip import CLIPTextModel, load_clip_tokenizer, tokenize
    from jaxdiv.pipelines.stable_diffusion import _encode_prompt_fn
    from jaxdiv.testing import write_tiny_vocab

    vocab = 12
    m = CLIPTextModel({"vocab_size": vocab, "hidden_size": 4, "intermediate_size": 4,
                       "num_hidden_layers": 1, "num_attention_heads": 1}, rngs=nnx.Rngs(0))
    encode_prompt = _encode_prompt_fn(m, None)
    for bad in (np.array([[0, vocab]]), jnp.array([[0, -1]]), np.array([[vocab + 7, 1]])):
        with pytest.raises(ValueError, match=rf"tokens must be token ids in \[0, {vocab}\)"):
            encode_prompt(bad)
    assert encode_prompt(np.array([[0, vocab - 1]])).shape == (1, 2, 4)
    write_tiny_vocab(tmp_path)
    tok = load_clip_tokenizer(tmp_path)
    for empty in ([], ()):
        with pytest.raises(ValueError, match="prompts must hold at least one prompt"):
            tokenize(tok, empty, max_length=6)
    with pytest.raises(TypeError, match="prompts must be a str or a sequence of str"):
        tokenize(tok, [1, 2], max_length=6)


# ------------------------------------------------------------------ cfg / guidance_state


@pytest.mark.parametrize("null, shown", [(jnp.zeros((3,)), r"\(3,\)"),
                                         (jnp.zeros((4, 2)), r"\(4, 2\)"),
                                         (jnp.zeros((2, 3)), r"\(2, 3\)")])  # fmt: skip
def test_cfg_null_cond_shape_is_checked_before_tracing(null, shown):
    den = lambda x, t, c: x * 0 + c
    s = samplers.ddim(schedules.flow(), 2)
    with pytest.raises(ValueError, match=rf"null_cond has shape {shown}, which does not "
                                         r"broadcast to the shape of cond \(3, 2\)"):  # fmt: skip
        jaxdiv.sample(s, den, jnp.zeros((3, 2)), key=KEY, cond=jnp.ones((3, 2)),
                      guidance=guidance.cfg(2.0, null_cond=null))  # fmt: skip
    for ok in (jnp.zeros((2,)), jnp.zeros((1, 2)), jnp.zeros((3, 2))):
        out = jaxdiv.sample(s, den, jnp.zeros((3, 2)), key=KEY, cond=jnp.ones((3, 2)),
                            guidance=guidance.cfg(2.0, null_cond=ok))  # fmt: skip
        np.testing.assert_allclose(np.asarray(out.x0), 2.0)  # 0 + 2 (1 - 0)


def test_cfg_null_cond_structure_is_checked():
    den = lambda x, t, c: x * 0 + c["a"]
    s = samplers.ddim(schedules.flow(), 2)
    with pytest.raises(ValueError, match="null_cond must have the structure of cond"):
        jaxdiv.sample(s, den, jnp.zeros((3, 2)), key=KEY, cond={"a": jnp.ones((3, 2))},
                      guidance=guidance.cfg(2.0, null_cond=jnp.zeros((2,))))  # fmt: skip


def test_guidance_state_from_another_batch_or_term_is_refused():
    s = samplers.ddim(schedules.edm(), 2)
    prev = jaxdiv.sample(s, _den, jnp.ones((2, 2)), key=KEY,
                         guidance=guidance.spell(0.5, memory_size=4)).state  # fmt: skip
    # same term, same per-sample shape: continues fine (positive control)
    jaxdiv.sample(s, _den, jnp.ones((3, 2)), key=KEY,
                  guidance=guidance.spell(0.5, memory_size=4), guidance_state=prev)  # fmt: skip
    cases = [
        (jnp.ones((2, 3)), guidance.spell(0.5, memory_size=4),
         r"guidance_state\['spell'\]\.memory has shape \(4, 2\).*expects shape \(4, 3\)"),
        (jnp.ones((2, 2)), guidance.spell(0.5, memory_size=8),
         r"guidance_state\['spell'\]\.memory has shape \(4, 2\).*expects shape \(8, 2\)"),
        (jnp.ones((3, 2)), guidance.chain(spell=guidance.particle(0.1)),
         r"guidance_state\['spell'\] does not fit guidance term 'spell'"),
    ]  # fmt: skip
    for noise, g, match in cases:
        with pytest.raises(ValueError, match=match):
            jaxdiv.sample(s, _den, noise, key=KEY, guidance=g, guidance_state=prev)


# ------------------------------------------------------------------ schedule arguments


@pytest.mark.parametrize("make, match", [
    (lambda: schedules.edm(sigma_max=math.inf), "sigma_max must be a finite number > 0, got inf"),
    (lambda: schedules.edm(sigma_min=math.nan), "sigma_min must be a finite number"),
    (lambda: schedules.edm(rho=math.inf), "rho must be a finite number > 0, got inf"),
    (lambda: schedules.edm(rho=1e-3), r"rho=0.001 is too small for sigma_min=0.002, sigma_max=80"),
    (lambda: schedules.edm(rho=0.01, sigma_max=1e6), r"rho=0.01 is too small"),
    (lambda: schedules.flow(shift=math.inf), "shift must be a finite number > 0, got inf"),
    (lambda: samplers.edm(schedules.EDMSchedule(0.002, math.inf, 7.0), 4),
     r"the edm schedule \(sigma_min=0.002, sigma_max=inf, rho=7\) gives a non-finite"),
    (lambda: samplers.flow_euler(schedules.FlowSchedule(math.inf), 4),
     r"the flow schedule \(shift=inf.*non-finite time grid for num_steps=4"),
])  # fmt: skip
def test_non_finite_grids_name_the_schedule_argument(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# ------------------------------------------------------------------ GASS text embedding


def test_gass_text_embedding_of_the_wrong_dimension_is_named():
    enc = toy.sphere_encoder(KEY, 2)  # embeddings of dimension 16
    for m in (1, 3):
        with pytest.raises(ValueError, match=rf"text_emb has dimension m={m}"):
            guidance.gass(enc, jnp.ones(m))
    s = samplers.ddim(schedules.edm(), 4)
    for m in (5, 32):
        g = guidance.gass(enc, jnp.ones(m), num_directions=2)
        with pytest.raises(ValueError, match=rf"text_emb has dimension {m} but the encoder's "
                                             r"embeddings have dimension 16"):  # fmt: skip
            jaxdiv.sample(s, _den, jnp.ones((3, 2)), key=KEY, guidance=g)


# ------------------------------------------------------------------ memory of vendi(rbf)


def test_rbf_vendi_beyond_the_kernel_limit_is_refused_with_a_clear_error():
    for n in (MAX_KERNEL_SAMPLES + 1, 50_000):
        x = np.ones((n, 2), np.float32)
        with pytest.raises(ValueError, match=rf"`X` has n={n} samples; kernel='rbf' needs the "
                                             r"\(n, n\) kernel matrix.*MAX_KERNEL_SAMPLES"):
            metrics.vendi(x, kernel="rbf")
        with pytest.raises(ValueError, match=r"kernel='k'.*MAX_KERNEL_SAMPLES"):
            def k(a, b):
                return jnp.dot(a, b)
            metrics.log_vendi(x, kernel=k)
    # the cosine kernel with d < n uses the (d, d) dual form and has no limit
    x = jax.random.normal(KEY, (MAX_KERNEL_SAMPLES + 1, 3))
    assert 1.0 < float(metrics.vendi(x)) <= 3.0


def test_median_bandwidth_is_bounded_and_close_to_the_population_median():
    """n > MEDIAN_MAX_ROWS: pairs of a fixed subset of rows (deterministic). For standard
    normal data in d dims |x - y| / sqrt(2) is chi(d): its median is the truth."""
    from scipy import stats

    for n, d in ((3 * MEDIAN_MAX_ROWS, 4), (MEDIAN_MAX_ROWS + 1, 16)):
        x = jax.random.normal(jax.random.key(n), (n, d))
        h = float(_median_bandwidth(x))
        assert h == float(_median_bandwidth(x))  # fixed key: the same every call
        assert h == pytest.approx(math.sqrt(2) * stats.chi(d).median(), rel=0.03)


@pytest.mark.parametrize("name, score", [
    ("vendi cosine", lambda x, y: metrics.vendi(x)),
    ("vendi rbf", lambda x, y: metrics.vendi(x, kernel="rbf")),
    ("prdc", lambda x, y: jnp.stack(metrics.prdc(x, y))),
    ("mmd", lambda x, y: metrics.mmd(x, y)),
    ("cmmd", lambda x, y: metrics.cmmd(x, y)),
])  # fmt: skip
def test_one_nan_feature_under_jit_gives_nan_not_a_plausible_score(name, score):
    """Under jit the inputs cannot be checked: a NaN feature must come out as NaN. It used
    to read as kernel value 1 (distance 0) or as failed comparisons (PRDC 0)."""
    x = jax.random.normal(jax.random.key(0), (20, 8))
    y = jax.random.normal(jax.random.key(1), (20, 8))
    assert bool(jnp.isfinite(jax.jit(score)(x, y)).all())
    assert bool(jnp.isnan(jax.jit(score)(x.at[0, 0].set(jnp.nan), y)).all()), name


@pytest.mark.parametrize("kernel", [[[1.0, 2.0], [2.0, 1.0]], -np.eye(3), np.zeros((3, 3))])
def test_a_kernel_that_is_not_psd_is_refused_not_clipped(kernel):
    """Vendi needs a PSD similarity matrix: [[1, 2], [2, 1]] (eigenvalues 3 and -1) used to
    give 1.0 from its clipped spectrum; under jit it is NaN."""
    k = jnp.asarray(kernel, jnp.float32)
    with pytest.raises(ValueError, match=r"^`K` is not positive semidefinite with a positive "
                                         r"trace"):
        metrics.vendi_from_kernel(k)
    assert bool(jnp.isnan(jax.jit(metrics.vendi_from_kernel)(k)))
    # round-off negatives of a PSD matrix are not refused (PAPERS.md's test vector)
    psd = jnp.array([[1.0, 0.9, 0.0], [0.9, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert float(metrics.vendi_from_kernel(psd)) == pytest.approx(2.1573, abs=1e-4)
