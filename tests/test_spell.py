"""SPELL (Kirchhof et al. 2025): the paper's claims as property tests, and where they fail.

Distances are checked in float64 on the float32 outputs; "at least r" allows a relative
1e-5 for float32 rounding of the corrected point (it lands exactly on the sphere).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import disjoint_shields_near, min_dist
from hypothesis import given, settings
from hypothesis import strategies as st

import jaxdiv
import toy
from jaxdiv import samplers, schedules
from jaxdiv.guidance.base import StepContext
from jaxdiv.guidance.spell import (
    SpellInfo,
    median_pairwise_distance,
    repulsion_field,
    repulsion_potential,
    spell,
    spell_delta,
)

TOL = 1e-5


def _samplers():
    vp, edm, fl = schedules.vp_linear(), schedules.edm(), schedules.flow()
    return {
        "ddim": (vp, samplers.ddim(vp, 25, eta=1.0)),  # DDPM-like ancestral
        "edm": (edm, samplers.edm(edm, 10)),  # Heun, NFE 19
        "flow": (fl, samplers.flow_euler(fl, 16)),
    }


SAMPLERS = _samplers()


def _mixture(d, seed=0):
    means = jax.random.normal(jax.random.key(seed), (3, d)) * 1.5
    return toy.GaussianMixture(means, jnp.full((3,), 0.3**2))


def _ctx(x, alpha=0.8, sigma=0.6, step=0, num_steps=10):
    return StepContext(x, jnp.float32(1.0), jnp.float32(alpha), jnp.float32(sigma), step,
                       num_steps, jax.random.key(0), None)  # fmt: skip


# -- App. B: the guarantee -----------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_guarantee_disjoint_reference_shields(name):
    """Disjoint shields near the data: every guided sample ends >= r from every centre,
    while the unguided run with the same noise lands inside some (non-vacuous)."""
    sch, smp = SAMPLERS[name]
    # d = 5 only on ddim: the shield projection is the same code in every dimension; edm
    # and flow (d = 2 here) differ from ddim only in the step that hands over x0_hat
    for d in (2, 5) if name == "ddim" else (2,):
        gm = _mixture(d, seed=d)
        den = gm.denoiser(sch)
        noise = jax.random.normal(jax.random.key(10 + d), (48, d))
        key = jax.random.key(20 + d)
        unguided = jaxdiv.sample(smp, den, noise, key=key).x0
        r = 0.15 * np.sqrt(d)
        # lambda = 1 needs disjoint shields (2r apart); lambda > 1 needs (1 + lambda) r
        for lam, sep in ((1.0, 2.0 * r), (1.6, 2.6 * r)):
            z = disjoint_shields_near(unguided, 6, sep * (1 + 1e-4), r, jax.random.key(d))
            assert (min_dist(unguided, z) < r).sum() >= 6
            term = spell(r, reference=z, intra_batch=False, overcompensation=lam)
            guided = jaxdiv.sample(smp, den, noise, key=key, guidance=term).x0
            dist = min_dist(guided, z)
            assert dist.min() >= r * (1 - TOL), (name, d, lam, dist.min() / r)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_two_particles_end_at_least_r_apart(name):
    """Intra-batch, B = 2 (Eq. 7): each particle is the other's only shield, so the final
    pair is >= r apart; unguided pairs from a tight blob are far closer."""
    sch, smp = SAMPLERS[name]
    gm = toy.GaussianMixture(jnp.zeros((1, 3)), jnp.array([0.02**2]))
    den = gm.denoiser(sch)
    r = 0.2
    term = spell(r)
    for seed in range(3):
        noise = jax.random.normal(jax.random.key(seed), (2, 3))
        key = jax.random.key(100 + seed)
        u = np.asarray(jaxdiv.sample(smp, den, noise, key=key).x0, np.float64)
        g = np.asarray(jaxdiv.sample(smp, den, noise, key=key, guidance=term).x0, np.float64)
        assert np.linalg.norm(u[0] - u[1]) < 0.5 * r
        assert np.linalg.norm(g[0] - g[1]) >= r * (1 - TOL)


def _nn_violation_rate(x, r):
    x = np.asarray(x, np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1) + np.diag(np.full(len(x), np.inf))
    return float((d.min(axis=1) < r * (1 - TOL)).mean())


@pytest.mark.parametrize("name", ["ddim", "edm"])
def test_many_particles_violation_rate_reported(name, record_property):
    """B = 64 intra-batch on a 2-D GMM: every particle's shields move with the batch and
    can overlap, so pairwise distance >= r is NOT guaranteed. We report the share of
    samples with a neighbour closer than r and only assert that SPELL lowers it."""
    sch, smp = SAMPLERS[name]
    gm = _mixture(2, seed=3)
    den = gm.denoiser(sch)
    noise = jax.random.normal(jax.random.key(7), (64, 2))
    key = jax.random.key(8)
    u = jaxdiv.sample(smp, den, noise, key=key).x0
    r = 0.08
    rates = {"unguided": _nn_violation_rate(u, r)}
    for lam in (1.0, 1.6):
        g = jaxdiv.sample(smp, den, noise, key=key, guidance=spell(r, overcompensation=lam)).x0
        rates[f"spell_lambda{lam}"] = _nn_violation_rate(g, r)
    record_property("nn_violation_rates", rates)
    print(name, "share of samples with a neighbour closer than r:", rates)
    assert rates["unguided"] > 0.3
    assert rates["spell_lambda1.0"] < rates["unguided"]
    assert rates["spell_lambda1.6"] < rates["unguided"]


# -- where the guarantee does not hold (shown exactly) -------------------------------------


def test_overlapping_shields_cancel():
    """Midway between two centres r apart, the two deltas cancel: not moved, still inside."""
    r = 1.0
    z = jnp.array([[-0.5, 0.0], [0.5, 0.0]])
    x0 = jnp.array([[0.0, 0.0]])
    out, _, info = spell(r, reference=z, intra_batch=False).apply(
        _state(spell(r, reference=z, intra_batch=False), x0), x0, _ctx(x0))
    assert info.num_active_shields.tolist() == [2]
    assert out.tolist() == x0.tolist()
    assert min_dist(out, z).min() == pytest.approx(0.5)


def test_overcompensation_can_push_into_a_neighbouring_disjoint_shield():
    """lambda = 1.6, centres exactly 2r apart (disjoint): from 0.5r off z1 the sample lands
    at r + 0.6 * 0.5r = 1.3r from z1, i.e. 0.7r from z2 — inside. Hence the (1 + lambda) r
    separation used in the guarantee test."""
    r = 1.0
    z = jnp.array([[0.0, 0.0], [2.0, 0.0]])
    x0 = jnp.array([[0.5, 0.0]])
    term = spell(r, reference=z, intra_batch=False, overcompensation=1.6)
    out, _, _ = term.apply(_state(term, x0), x0, _ctx(x0))
    np.testing.assert_allclose(np.asarray(out), [[1.3, 0.0]], rtol=1e-6)
    assert min_dist(out, z[1:]).min() == pytest.approx(0.7, rel=1e-5)


def test_three_particles_can_stay_closer_than_r():
    """Intra-batch with B = 3: particles at 0, 0.9, 1.1 (r = 1). The middle one is pushed by
    both neighbours, the outer two move too; afterwards two are 0.3 apart."""
    x0 = jnp.array([[0.0], [0.9], [1.1]])
    term = spell(1.0)
    out, _, info = term.apply(_state(term, x0), x0, _ctx(x0))
    np.testing.assert_allclose(np.asarray(out)[:, 0], [-0.1, 0.2, 1.9], atol=1e-6)
    assert info.num_active_shields.tolist() == [1, 2, 1]
    assert abs(float(out[1, 0] - out[0, 0])) == pytest.approx(0.3, abs=1e-6)


# -- Sec. 5.4: sparsity --------------------------------------------------------------------


def _bits(a):
    return np.asarray(a).view(np.uint32)


@pytest.mark.parametrize("name", ["ddim", "edm"])
def test_sparsity_bitwise(name):
    """Rows whose x0_hat never enters a shield have a bitwise identical trajectory
    (x_t, x0_hat, output) to the unguided run; rows that do enter differ. With all shields
    out of reach, the whole trace is bitwise identical."""
    sch, smp = SAMPLERS[name]
    gm = _mixture(2, seed=5)
    den = gm.denoiser(sch)
    noise = jax.random.normal(jax.random.key(1), (16, 2))
    key = jax.random.key(2)
    base = jaxdiv.sample(smp, den, noise, key=key, trace=True)

    # every shield out of reach (the intra-batch path is checked in test_no_self_repulsion)
    far = spell(0.6, reference=jnp.full((4, 2), 100.0), intra_batch=False)
    far = jaxdiv.sample(smp, den, noise, key=key, guidance=far, trace=True)
    assert not bool(jnp.any(far.trace.info["spell"].active))
    for a, b in ((base.x0, far.x0), (base.trace.x, far.trace.x),
                 (base.trace.x0_hat, far.trace.x0_hat)):  # fmt: skip
        np.testing.assert_array_equal(_bits(a), _bits(b))

    # one reference shield that some trajectories enter (same shapes: no recompilation)
    z = jnp.concatenate([base.x0[:1] + 0.05, jnp.full((3, 2), 100.0)])
    part = jaxdiv.sample(smp, den, noise, key=key, trace=True,
                         guidance=spell(0.6, reference=z, intra_batch=False))  # fmt: skip
    ever = np.asarray(jnp.any(part.trace.info["spell"].active, axis=0))
    assert 0 < ever.sum() < len(ever)
    np.testing.assert_array_equal(_bits(part.trace.x[:, ~ever]), _bits(base.trace.x[:, ~ever]))
    np.testing.assert_array_equal(_bits(part.x0[~ever]), _bits(base.x0[~ever]))
    assert np.all(np.any(np.asarray(part.x0[ever]) != np.asarray(base.x0[ever]), axis=1))


# -- App. C: h is conservative --------------------------------------------------------------


@jax.jit
def _field_jacobian_and_potential_grad(x, radius):
    jac = jax.vmap(jax.jacfwd(repulsion_field), (0, None))(x, radius)
    grad = jax.vmap(jax.grad(repulsion_potential), (0, None))(x, radius)
    return jac, grad, repulsion_field(x, radius)


@pytest.mark.parametrize("d", [1, 3, 6])
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.1, 2.0))
def test_h_is_conservative(d, seed, radius):
    """h(x) = relu(r/|x| - 1) x (App. C): its Jacobian is symmetric and equals the closed
    form, and h = grad H with H of Eq. 8 — at 64 points inside and outside the shield."""
    x = jax.random.normal(jax.random.key(seed), (64, d))
    x = x * jnp.exp(jax.random.uniform(jax.random.key(seed + 1), (64, 1), minval=-3, maxval=1))
    n = np.linalg.norm(np.asarray(x, np.float64), axis=1)
    x = jnp.where(jnp.asarray(np.abs(n - radius) < 1e-3)[:, None], x * 1.01, x)  # kink at r
    jac, grad, field = _field_jacobian_and_potential_grad(x, jnp.float32(radius))
    jac = np.asarray(jac, np.float64)
    scale = max(1.0, np.abs(jac).max())
    np.testing.assert_allclose(jac, np.swapaxes(jac, 1, 2), atol=1e-5 * scale)
    np.testing.assert_allclose(grad, field, rtol=1e-5, atol=1e-5 * radius)
    xv = np.asarray(x, np.float64)
    n = np.linalg.norm(xv, axis=1)[:, None, None]
    inside = (n < radius) & (n > 0)
    # inside: (r/|x| - 1) I - r x x^T / |x|^3 ; outside: 0
    expect = (radius / n - 1) * np.eye(d) - radius * xv[:, :, None] * xv[:, None, :] / n**3
    np.testing.assert_allclose(jac, np.where(inside, expect, 0.0), rtol=1e-4, atol=1e-4 * scale)


def test_potential_is_continuous_at_the_radius():
    r = 0.7
    x = jnp.array([r, 0.0])
    inside = repulsion_potential(x * (1 - 1e-6), r)
    outside = repulsion_potential(x * (1 + 1e-6), r)
    assert float(inside) == pytest.approx(float(outside), rel=1e-5)
    assert float(outside) == pytest.approx(0.5 * r * r)


# -- the term against the paper's Algorithm 2, equivariance, self-exclusion ----------------


def _state(term, x0):
    return term.init(x0, None, jax.random.key(0))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), radius=st.floats(0.2, 1.5), lam=st.floats(0.5, 2.0))
def test_term_equals_dense_algorithm_2(seed, radius, lam):
    """Blockwise search (7 blocks of 8 references, several sub-blocks) == dense Eq. 5 + 7."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    x0 = jax.random.normal(k1, (6, 3))
    ref = jax.random.normal(k2, (50, 3))
    out, _, info = _apply_jit(x0, x0 * 0.8 + 0.1, radius, lam, ref, block_size=8,
                              exact_bytes=4 * 6 * 2 * 3)  # fmt: skip
    delta = spell_delta(x0, radius, reference=ref, intra_batch=True)
    np.testing.assert_allclose(out, x0 + lam * delta, rtol=2e-5, atol=2e-5)
    x = np.asarray(x0, np.float64)
    dense = np.concatenate([x[:, None] - np.asarray(ref)[None], x[:, None] - x[None]], axis=1)
    dist = np.linalg.norm(dense, axis=-1)
    count = ((dist < radius) & (dist > 0)).sum(1)
    assert info.num_active_shields.tolist() == count.tolist()
    assert info.active.tolist() == (count > 0).tolist()


@functools.partial(jax.jit, static_argnames=("block_size", "exact_bytes"))
def _apply_jit(x0, x, radius, lam, ref, block_size=4096, exact_bytes=1 << 26):
    """SPELL's apply at one step, compiled once per shape (hypothesis reuses it)."""
    term = spell(radius, reference=ref, overcompensation=lam, block_size=block_size,
                 exact_bytes=exact_bytes)  # fmt: skip
    return term.apply(_state(term, x0), x0, _ctx(x))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), perm_seed=st.integers(0, 2**31 - 1))
def test_permutation_equivariance(seed, perm_seed):
    """Permuting the batch (x0_hat and x_t) permutes SPELL's output and info."""
    x0 = jax.random.normal(jax.random.key(seed), (7, 2)) * 0.5
    perm = np.asarray(jax.random.permutation(jax.random.key(perm_seed), 7))
    ref = jnp.array([[0.0, 0.0], [0.5, 0.5]])
    x = x0 * 0.8 + 0.1
    out, _, info = _apply_jit(x0, x, 0.6, 1.0, ref)
    out_p, _, info_p = _apply_jit(x0[perm], x[perm], 0.6, 1.0, ref)
    np.testing.assert_allclose(out_p, out[perm], rtol=1e-5, atol=1e-6)
    for a, b in zip(info_p, info):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b)[perm], rtol=1e-5, atol=1e-6)


def test_no_self_repulsion():
    """A sample is never its own shield: alone it is not moved; in a batch only the others
    count; duplicates of one x0_hat are separated along their x_t difference."""
    term = spell(1.0)
    one = jnp.array([[0.3, -0.2]])
    out, _, info = term.apply(_state(term, one), one, _ctx(one))
    assert out.tolist() == one.tolist() and info.num_active_shields.tolist() == [0]

    far = jnp.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    out, _, info = term.apply(_state(term, far), far, _ctx(far))
    assert out.tolist() == far.tolist() and not bool(info.active.any())

    # x0_hat identical (a memorising model), x_t different: minimal move r/2 each side
    dup = jnp.array([[1.0, 1.0], [1.0, 1.0]])
    xt = jnp.array([[0.0, 0.0], [0.0, 2.0]])
    out, _, info = term.apply(_state(term, dup), dup, _ctx(xt))
    assert info.num_active_shields.tolist() == [1, 1]
    np.testing.assert_allclose(np.asarray(out), [[1.0, 0.0], [1.0, 2.0]], atol=1e-6)


def test_sample_exactly_on_a_reference_centre_is_moved_to_the_sphere():
    """x0_hat == z exactly (a memorising denoiser returns training points bit for bit):
    Eq. 5 has no direction; SPELL moves it by r along x_t - alpha z (the noisy state's
    offset from the noised centre)."""
    z = jnp.array([[2.0, 0.0]])
    term = spell(0.5, reference=z, intra_batch=False)
    x0 = z
    xt = jnp.array([[1.6, 0.3]])  # alpha = 0.8: alpha z = (1.6, 0); offset (0, 0.3)
    out, _, _ = term.apply(_state(term, x0), x0, _ctx(xt, alpha=0.8))
    np.testing.assert_allclose(np.asarray(out), [[2.0, 0.5]], atol=1e-6)


def test_info_fields():
    """active / count / |lambda Delta| / score ratio against direct formulas."""
    x0 = jnp.array([[0.0, 0.0], [0.3, 0.0], [3.0, 3.0]])
    xt = jnp.array([[0.1, 0.2], [0.5, -0.1], [2.0, 2.5]])
    alpha, sigma, lam, r = 0.8, 0.6, 1.6, 0.5
    term = spell(r, overcompensation=lam)
    out, _, info = term.apply(_state(term, x0), x0, _ctx(xt, alpha, sigma))
    assert isinstance(info, SpellInfo)
    delta = np.asarray(spell_delta(x0, r), np.float64)
    assert info.active.tolist() == [True, True, False]
    assert info.num_active_shields.tolist() == [1, 1, 0]
    np.testing.assert_allclose(info.delta_norm, lam * np.linalg.norm(delta, axis=1), rtol=1e-5)
    score = (alpha * np.asarray(x0) - np.asarray(xt)) / sigma**2
    ratio = alpha * lam * np.linalg.norm(delta, axis=1) / sigma**2 / np.linalg.norm(score, axis=1)
    np.testing.assert_allclose(info.score_ratio, ratio, rtol=1e-5)
    assert info.pullback_residual.tolist() == [0.0, 0.0, 0.0]


def test_trace_records_info_per_step():
    """The per-step info is that of each step's correction: recomputed independently
    (float64 NumPy, Eq. 5/7) from the pre-correction x0_hat = D(x_t, t) at the traced x_t
    (flow Euler: one evaluation per step)."""
    sch, smp = SAMPLERS["flow"]
    gm = _mixture(2)
    den = gm.denoiser(sch)
    noise = jax.random.normal(jax.random.key(0), (5, 2))
    r = 0.3
    out = jaxdiv.sample(smp, den, noise, key=jax.random.key(1), guidance=spell(r), trace=True)
    info = out.trace.info["spell"]
    assert info.active.shape == (16, 5) and info.num_active_shields.dtype == jnp.int32
    assert info.score_ratio.shape == (16, 5)
    assert bool(jnp.all(jnp.isfinite(info.score_ratio)))  # alpha(t=1) = 0 on flow: ratio 0
    assert bool(jnp.all(out.trace.active["spell"]))
    tr = out.trace
    n_active = 0
    for i in range(smp.num_steps):
        x, t = np.asarray(tr.x[i], np.float64), tr.t[i]
        pre = np.asarray(den(tr.x[i], t), np.float64)  # x0_hat before SPELL's correction
        dist = np.linalg.norm(pre[:, None] - pre[None], axis=-1)
        np.fill_diagonal(dist, np.inf)
        assert np.abs(dist - r).min() > 1e-4  # no pair on the boundary: the mask is exact
        inside = dist < r
        np.testing.assert_array_equal(np.asarray(info.active[i]), inside.any(axis=1))
        np.testing.assert_array_equal(np.asarray(info.num_active_shields[i]), inside.sum(1))
        # Eq. 7: Delta_i = sum_{j != i} relu(r / |x_i - x_j| - 1) (x_i - x_j); a pair that
        # coincides exactly (flow's t = 1, alpha = 0: every x0_hat is the data mean) moves
        # by r along x_t^i - x_t^j (the documented fallback direction)
        same = dist == 0
        coef = np.where(inside & ~same, r / np.where(same, 1.0, dist) - 1.0, 0.0)
        delta = np.einsum("ij,ijd->id", coef, pre[:, None] - pre[None])
        if not same.any():
            np.testing.assert_allclose(spell_delta(pre, r), delta, rtol=1e-5, atol=1e-6)
        off = x[:, None] - x[None]
        off_norm = np.linalg.norm(off, axis=-1)
        fall = np.where(same, r / np.where(same, off_norm, 1.0), 0.0)
        delta = delta + np.einsum("ij,ijd->id", fall, off)
        np.testing.assert_allclose(info.delta_norm[i], np.linalg.norm(delta, axis=1),
                                   rtol=1e-4, atol=1e-6)  # fmt: skip
        # the traced x0_hat is the corrected one
        np.testing.assert_allclose(tr.x0_hat[i], pre + delta, rtol=1e-5, atol=1e-5)
        alpha, sigma = float(sch.alpha(t)), float(sch.sigma(t))
        score = np.linalg.norm(alpha * pre - x, axis=1) / sigma**2
        want = alpha * np.linalg.norm(delta, axis=1) / sigma**2 / score
        np.testing.assert_allclose(info.score_ratio[i], want, rtol=1e-4, atol=1e-7)
        n_active += int(inside.any(axis=1).sum())
    # non-vacuous: some but not all (sample, step) pairs were inside a shield
    assert 0 < n_active < smp.num_steps * 5


def test_differentiable_through_the_sampler():
    """jax.grad of a function of SPELL-guided samples w.r.t. the radius matches a central
    finite difference (the term is piecewise smooth; cond/scan are differentiated)."""
    sch, smp = SAMPLERS["flow"]
    gm = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.01]))
    den = gm.denoiser(sch)
    z = jnp.array([[0.05, 0.0], [3.0, 3.0]])
    noise = jax.random.normal(jax.random.key(1), (4, 2))

    @jax.jit
    def f(r, n):
        out = jaxdiv.sample(smp, den, n, key=jax.random.key(0), guidance=spell(r, reference=z))
        return jnp.sum(out.x0**2)

    g = float(jax.grad(f)(0.3, noise))
    fd = float((f(0.301, noise) - f(0.299, noise)) / 0.002)
    assert np.isfinite(g) and g != 0.0
    assert g == pytest.approx(fd, rel=2e-2)


# -- feature-space shields -----------------------------------------------------------------


def test_feature_space_guarantee_for_a_linear_map():
    """phi(x) = A x with A full row rank: the pull-back hits the feature-space target, so
    disjoint feature shields hold for the final samples (flow Euler, d = 4 -> f = 2)."""
    sch, smp = SAMPLERS["flow"]
    gm = _mixture(4, seed=1)
    den = gm.denoiser(sch)
    a = jax.random.normal(jax.random.key(3), (4, 2))
    phi = lambda x: x @ a
    noise = jax.random.normal(jax.random.key(4), (32, 4))
    key = jax.random.key(5)
    u = jaxdiv.sample(smp, den, noise, key=key).x0
    r = 0.5
    zf = disjoint_shields_near(phi(u), 6, 2 * r * (1 + 1e-4), r, jax.random.key(6))
    assert (min_dist(phi(u), zf) < r).sum() >= 6
    term = spell(r, reference=zf, intra_batch=False, feature_map=phi, pullback_steps=1)
    out = jaxdiv.sample(smp, den, noise, key=key, guidance=term, trace=True)
    assert min_dist(phi(out.x0), zf).min() >= r * (1 - 1e-4)
    assert float(out.trace.info["spell"].pullback_residual.max()) < 1e-4 * r


def test_feature_space_nonlinear_map_bound():
    """Nonlinear phi: only |phi(x_final) - z| >= r - residual holds (triangle inequality);
    the residual of the pull-back at the last step is reported."""
    x0 = jnp.array([[0.2, 0.1, -0.3], [1.5, -1.0, 0.4]])
    w = jax.random.normal(jax.random.key(0), (3, 2))
    phi = lambda x: jnp.tanh(x @ w)
    zf = phi(x0)[:1] + jnp.array([[0.05, -0.02]])
    term = spell(0.3, reference=zf, intra_batch=False, feature_map=phi)
    out, _, info = term.apply(_state(term, x0), x0, _ctx(x0))
    d = min_dist(phi(out), zf)
    assert info.active.tolist() == [True, False]
    assert d[0] >= 0.3 - float(info.pullback_residual[0]) - 1e-6
    assert out[1].tolist() == x0[1].tolist()


# -- radius helper and input validation ---------------------------------------------------


def test_median_pairwise_distance_matches_scipy():
    from scipy.spatial.distance import pdist

    x = np.asarray(jax.random.normal(jax.random.key(0), (31, 2, 3)))
    assert float(median_pairwise_distance(x)) == pytest.approx(
        float(np.median(pdist(x.reshape(31, -1)))), rel=1e-5
    )


def test_median_pairwise_distance_memory_is_not_pairs_times_dim():
    """Every pair's difference at once was O(n^2 d): 66 MB of temporaries for 64 x 4096
    (SD-latent-sized rows); one row at a time needs the n^2 distances and one row's
    difference."""
    x = jax.ShapeDtypeStruct((64, 4096), jnp.float32)
    compiled = jax.jit(median_pairwise_distance).lower(x).compile()
    analysis = compiled.memory_analysis()  # XLA:CPU reports it (the suite runs on CPU)
    assert analysis is not None
    assert analysis.temp_size_in_bytes < 4 * (64 * 64 + 2 * 4096) * 4


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"^radius must be a finite number > 0, got 0.0$"):
        spell(0.0)
    with pytest.raises(ValueError, match=r"^radius must be a finite number > 0, got nan$"):
        spell(float("nan"))
    with pytest.raises(ValueError, match=r"^radius must be <= 1e\+18 \(r\^2 overflows float32 "
                                         r"beyond it\), got 1e\+19$"):
        spell(1e19)
    with pytest.raises(ValueError, match="overcompensation"):
        spell(1.0, overcompensation=-1.0)
    with pytest.raises(TypeError, match="intra_batch"):
        spell(1.0, intra_batch="yes")
    with pytest.raises(ValueError, match="memory_size"):
        spell(1.0, memory_size=-1)
    with pytest.raises(TypeError, match="reference"):
        spell(1.0, reference=[[0.0, 1.0]])
    with pytest.raises(ValueError, match="reference"):
        spell(1.0, reference=jnp.zeros((3,)))
    with pytest.raises(ValueError, match="NaN"):
        spell(1.0, reference=jnp.full((2, 2), jnp.nan))
    with pytest.raises(TypeError, match="feature_map"):
        spell(1.0, feature_map=3)
    with pytest.raises(ValueError, match="no shields and would never act"):
        spell(1.0, intra_batch=False)  # was a no-op term, silently
    spell(1.0, intra_batch=False, memory_size=4)  # earlier batches' shields: fine
    term = spell(1.0, reference=jnp.zeros((4, 3)))
    with pytest.raises(ValueError, match="reference has 3 values per shield"):
        term.init(jnp.zeros((2, 2)), None, jax.random.key(0))
    with pytest.raises(ValueError, match="memory_size"):
        spell(1.0, memory_size=2).init(jnp.zeros((4, 2)), None, jax.random.key(0))
    with pytest.raises(ValueError, match="n >= 2"):
        median_pairwise_distance(jnp.zeros((1, 2)))


def test_radius_from_unguided_is_the_median_distance_of_a_plain_run():
    """App. D's radius: the median pairwise distance of the unguided batch (NumPy over all
    pairs); CFG may sit in guidance (the guided setting's batch), a coupling term may not
    (it would spread the batch the radius is measured on: SPELL at r = 2 gave 24.6 here
    where the plain batch gives 1.2)."""
    from jaxdiv import guidance
    from jaxdiv.recipes import radius_from_unguided

    sch = schedules.edm()
    s = samplers.edm(sch, 8)
    gm = toy.GaussianMixture(jnp.array([[0.0, 0.0], [2.0, 1.0]]), jnp.array([0.3, 0.5]))
    z = jax.random.normal(jax.random.key(0), (40, 2))
    key = jax.random.key(1)
    x = np.asarray(jaxdiv.sample(s, gm.denoiser(sch), z, key=key).x0, np.float64)
    d = np.linalg.norm(x[:, None] - x[None], axis=-1)[np.triu_indices(40, 1)]
    r = radius_from_unguided(s, gm.denoiser(sch), z, key=key)
    np.testing.assert_allclose(r, np.median(d), rtol=1e-5)
    for term in (guidance.spell(2.0), guidance.particle(1.0),
                 guidance.chain(guidance.cfg(2.0), guidance.window(guidance.spell(2.0),
                                                                    steps=[0]))):  # fmt: skip
        with pytest.raises(ValueError, match=r"guidance must hold per-sample terms only .* "
                                             r"batch-coupling term\(s\) \[('spell'|'particle')\]"):
            radius_from_unguided(s, gm.denoiser(sch), z, key=key, guidance=term)
