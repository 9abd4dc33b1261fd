"""GASS guidance: targets, the shared direction search, the Adam write-back and its
early stopping, active-step schedules, fresh randomness per step, x0_hat on flows, and
the SPP increase on the toy (GASS, ICML 2026; PAPERS.md)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import jaxdiv
import toy
from jaxdiv import metrics, predictions, samplers, schedules
from jaxdiv.guidance.base import StepContext
from jaxdiv.guidance.gass import (
    active_steps,
    gass,
    gass_targets,
    spherical_targets,
    spp_loss,
)
from jaxdiv.guidance.gass.write_back import adam_write_back
from toy.encoder import sphere_encoder

M = 16


def _unit(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def ring():
    """8-mode ring GMM in 2-D and a toy encoder fitted to its scale."""
    k = 8
    ang = jnp.arange(k) * 2 * jnp.pi / k
    gm = toy.GaussianMixture(3.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1), jnp.full((k,), 0.05))
    data = gm.sample(jax.random.key(9), 2048)
    enc = sphere_encoder(jax.random.key(0), 2, M, center=data.mean(0), scale=data.std())
    return gm, enc


@pytest.fixture(scope="module")
def batch():
    emb = _unit(jax.random.normal(jax.random.key(3), (8, M)))
    return emb, _unit(jax.random.normal(jax.random.key(4), (M,)))


# ----------------------------------------------------------------------------- targets


def test_targets_shapes_unit_and_orthogonal(batch):
    emb, e_t = batch
    t, u = gass_targets(jax.random.key(0), emb, e_t)
    assert t.shape == emb.shape and u.shape == (M,)
    np.testing.assert_allclose(jnp.linalg.norm(t, axis=1), 1.0, atol=1e-6)
    assert abs(float(u @ e_t)) < 1e-6 and abs(float(u @ u) - 1) < 1e-6


def _search_np(key, emb, e_t, n):
    """GASS's u_ind search written independently in float64 NumPy from the same Gaussian
    draw: QR of [e_t, G] (Gram-Schmidt), the candidate with the largest mean |e_i . u|."""
    g = np.asarray(jax.random.normal(key, (e_t.shape[0], n)), np.float64)
    q, _ = np.linalg.qr(np.concatenate([np.asarray(e_t, np.float64)[:, None], g], axis=1))
    dirs = q[:, 1:].T
    score = np.mean(np.abs(np.asarray(emb, np.float64) @ dirs.T), axis=0)
    return dirs[np.argmax(score)], np.sort(score)


def test_direction_is_the_metric_search(batch):
    """u_ind is the paper's search (checked against an independent NumPy search on the
    same Gaussian draw), and the same implementation as metrics.principal_residual_direction
    and metrics.spp use."""
    emb, e_t = batch
    for seed in (7, 8, 9):
        key = jax.random.key(seed)
        _, u = gass_targets(key, emb, e_t, num_directions=5)
        k_dir = jax.random.split(key)[0]
        ref, score = _search_np(k_dir, emb, e_t, 5)
        assert score[-1] - score[-2] > 1e-3  # a clear winner: the argmax is well defined
        np.testing.assert_allclose(abs(float(np.asarray(u, np.float64) @ ref)), 1.0, atol=1e-5)
        np.testing.assert_array_equal(u, metrics.principal_residual_direction(k_dir, emb, e_t, 5))
        np.testing.assert_array_equal(u, metrics.spp(emb, e_t, k_dir, 5).u_ind)


def test_unrenormalised_targets_are_the_paper_formula(batch):
    """e~_i = (e_i.e_t + d_i) e_t + (e_i.u + g_i) u + r_i, |d_i| <= r_dep, |g_i| <= r_ind."""
    emb, e_t = batch
    t, u = gass_targets(jax.random.key(1), emb, e_t, r_dep=0.3, r_ind=0.1, renormalize=False)
    diff = np.asarray(t - emb, np.float64)
    d, g = diff @ np.asarray(e_t), diff @ np.asarray(u)
    # nothing but the two axes moves: the residual r_i is preserved
    np.testing.assert_allclose(diff, np.outer(d, e_t) + np.outer(g, u), atol=1e-6)
    assert np.all(np.abs(d) <= 0.3 + 1e-6) and np.all(np.abs(g) <= 0.1 + 1e-6)
    renorm, _ = gass_targets(jax.random.key(1), emb, e_t, r_dep=0.3, r_ind=0.1)
    np.testing.assert_allclose(renorm, _unit(t), atol=1e-6)


def test_perturbations_are_uniform_and_fresh_per_key(batch):
    """KS test against U[-r, r]; different keys give different draws, the same key the same."""
    emb, e_t = batch
    keys = jax.random.split(jax.random.key(2), 100)
    draw = jax.jit(jax.vmap(lambda k: gass_targets(k, emb, e_t, 0.2, 0.05, renormalize=False)))
    t, u = draw(keys)
    diff = t - emb
    d = jnp.einsum("nbm,m->nb", diff, e_t).ravel()
    g = jnp.einsum("nbm,nm->nb", diff, u).ravel()
    assert scipy.stats.kstest(np.asarray(d), "uniform", args=(-0.2, 0.4)).pvalue > 1e-3
    assert scipy.stats.kstest(np.asarray(g), "uniform", args=(-0.05, 0.1)).pvalue > 1e-3
    # d and g independent of each other (a shared draw would correlate them)
    assert abs(scipy.stats.pearsonr(np.asarray(d), np.asarray(g)).statistic) < 0.15
    # every key draws new perturbations and new directions: no re-seeding
    assert len({round(float(x), 6) for x in np.asarray(d).reshape(100, -1)[:, 0]}) == 100
    assert len({round(float(x), 6) for x in np.asarray(u)[:, 0]}) > 90
    t2, u2 = draw(keys)
    np.testing.assert_array_equal(t, t2)


def test_ablation_axes(batch):
    emb, e_t = batch
    key = jax.random.key(5)
    # single axis: r_dep = 0 leaves the text component exactly alone
    t, _ = gass_targets(key, emb, e_t, r_dep=0.0, r_ind=0.2, renormalize=False)
    np.testing.assert_allclose(t @ e_t, emb @ e_t, atol=1e-6)
    # RD: u is a random unit vector orthogonal to e_t, not the principal one
    _, u_p = gass_targets(key, emb, e_t)
    t_rd, u_rd = gass_targets(key, emb, e_t, axes="random", renormalize=False)
    assert abs(float(u_rd @ e_t)) < 1e-6 and not np.allclose(u_rd, u_p)
    score = lambda u: float(jnp.mean(jnp.abs(emb @ u)))
    # the 20 random-direction draws in one jitted vmap instead of 20 eager calls
    rd_dirs = jax.jit(jax.vmap(lambda k: gass_targets(k, emb, e_t, axes="random")[1]))(
        jax.random.split(key, 20))  # fmt: skip
    rd_scores = np.mean(np.abs(np.asarray(emb) @ np.asarray(rd_dirs).T), axis=0)
    assert score(u_p) > np.median(rd_scores)
    # IP: neither axis is e_t; the shift lies in span of two random orthonormal axes
    t_ip, u_ip = gass_targets(key, emb, e_t, r_dep=0.2, r_ind=0.2, axes="isotropic",
                              renormalize=False)  # fmt: skip
    diff = np.asarray(t_ip - emb)
    assert np.abs(diff @ np.asarray(e_t)).max() < 0.2  # not all moved along e_t
    q, _ = np.linalg.qr(diff.T)
    rank = np.linalg.matrix_rank(diff, tol=1e-5)
    assert rank == 2 and abs(np.linalg.norm(q[:, :2].T @ np.asarray(u_ip)) - 1) < 1e-5
    assert np.linalg.norm(q[:, :2].T @ np.asarray(e_t)) < 0.99  # e_t is not an axis


def test_spherical_targets_and_loss_examples():
    e = jnp.eye(3)[:2]
    t = spherical_targets(e, jnp.eye(3)[0], jnp.eye(3)[2], jnp.array([1.0, 1.0]),
                          jnp.array([0.0, 1.0]))  # fmt: skip
    np.testing.assert_allclose(t, [[1, 0, 0], [1 / 3**0.5] * 3], atol=1e-6)
    assert float(spp_loss(e, e)) == 0.0
    np.testing.assert_allclose(spp_loss(e, t), 1 - 1 / 3**0.5, atol=1e-6)




@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(emb=jnp.ones((M,))), ValueError, "emb must have shape"),
        (dict(text_emb=jnp.ones((M + 1,))), ValueError, "text_emb must have shape"),
        (dict(text_emb=jnp.zeros((M,))), ValueError, "zero norm"),
        (dict(emb=jnp.full((4, M), jnp.nan)), ValueError, "finite"),
        (dict(r_dep=-0.1), ValueError, "r_dep"),
        (dict(r_ind="abc"), TypeError, "r_ind must be a real number"),
        (dict(r_ind="0.1"), TypeError, "r_ind must be a real number"),
        (dict(num_directions=M), ValueError, "num_directions"),
        (dict(num_directions=2.0), TypeError, "num_directions"),
        (dict(axes="pca"), ValueError, "axes"),
        (dict(emb=jnp.ones((4, M), jnp.int32)), TypeError, "emb must be a floating"),
    ],
)
def test_targets_bad_input(kwargs, exc, match):
    args = dict(emb=jnp.ones((4, M)), text_emb=jnp.eye(M)[0])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        gass_targets(jax.random.key(0), **args)


# ------------------------------------------------------------------ schedules and factory


def test_active_steps():
    assert active_steps(50) == tuple((j * 50) // 20 for j in range(20))
    assert len(active_steps(50)) == 20 and active_steps(50)[0] == 0
    assert active_steps(28, "early", 10) == tuple(range(10))
    assert active_steps(8, "uniform", 8) == active_steps(8, "early", 8) == tuple(range(8))
    assert active_steps(5, "all") == active_steps(5, "all", 20) == tuple(range(5))
    # the default, the paper's 20, on a shorter sampler: every step (documented)
    assert active_steps(8) == active_steps(8, "early") == tuple(range(8))
    with pytest.raises(ValueError, match="schedule"):
        active_steps(10, "late")
    with pytest.raises(ValueError, match="num_active"):
        active_steps(10, "uniform", 0)
    # more active steps than the sampler has, asked for: it used to clamp silently to
    # every step, an explicit 20 included
    for schedule in ("uniform", "early"):
        with pytest.raises(ValueError, match=r"num_active=20 exceeds the sampler's 8 steps.*"
                                             r'num_active <= 8, or steps="all"'):  # fmt: skip
            active_steps(8, schedule, 20)


def test_num_active_beyond_the_samplers_steps_is_refused_at_sample_time(ring):
    """The term is built without the number of steps: ``jaxdiv.sample`` is the first place
    that knows it, and refuses a ``num_active`` asked for beyond it (before: 30 or 20 on 6
    steps ran every step, the run of ``num_active=6``, with no word). The default (``None``,
    the paper's 20) still means every step there."""
    gm, enc = ring
    sch = schedules.edm()
    s = samplers.ddim(sch, 6)
    kw = dict(key=jax.random.key(0), trace=True)
    noise = jax.random.normal(jax.random.key(1), (3, 2))
    den = gm.denoiser(sch)
    default = gass(enc, enc.text_emb, lr=0.05, max_iters=2)
    out = jaxdiv.sample(s, den, noise, guidance=default, **kw)
    assert np.asarray(out.trace.active["gass"]).all()
    for num_active in (30, 20, 7):
        g = gass(enc, enc.text_emb, lr=0.05, max_iters=2, num_active=num_active)
        with pytest.raises(ValueError, match=f"num_active={num_active} exceeds the sampler's 6"):
            jaxdiv.sample(s, den, noise, guidance=g, **kw)
    g = gass(enc, enc.text_emb, lr=0.05, max_iters=2, num_active=6)  # the boundary runs
    assert np.asarray(jaxdiv.sample(s, den, noise, guidance=g, **kw).trace.active["gass"]).all()


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(encoder=3), TypeError, "encoder must be callable"),
        (dict(text_emb=jnp.ones((2, M))), ValueError, "text_emb"),
        (dict(lr=0.0), ValueError, "lr"),
        (dict(max_iters=0), ValueError, "max_iters"),
        (dict(patience=1.5), TypeError, "patience"),
        (dict(tol=-1.0), ValueError, "tol"),
        (dict(steps="late"), ValueError, "steps"),
        (dict(steps=3), TypeError, "steps"),
        (dict(steps=[-1]), ValueError, "steps"),
        (dict(axes="both"), ValueError, "axes"),
    ],
)
def test_gass_bad_input(kwargs, exc, match):
    args = dict(encoder=lambda x: x, text_emb=jnp.eye(M)[0])
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        gass(**args)


def test_encoder_shape_mismatch_is_reported(ring):
    gm, enc = ring
    g = gass(lambda x: enc(x)[:, :8], enc.text_emb, steps="all")
    sch = schedules.edm()
    with pytest.raises(ValueError, match="encoder must map the batch"):
        jaxdiv.sample(samplers.ddim(sch, 2), gm.denoiser(sch), jnp.zeros((3, 2)),
                      key=jax.random.key(0), guidance=g)  # fmt: skip


# ------------------------------------------------------------------ Adam write-back


def test_adam_loop_stops_by_patience_and_max_iters():
    """Unit test of the loop on sum (x - c)^2: huge tol stops after exactly `patience`
    iterations; tol = 0 on a decreasing loss runs to max_iters."""
    c = jnp.arange(6.0).reshape(3, 2)
    loss = lambda x: jnp.sum((x - c) ** 2)
    run = jax.jit(adam_write_back, static_argnums=(0, 3, 4))
    x0 = jnp.zeros((3, 2))
    _, l0, l1, it = run(loss, x0, 0.1, 50, 3, 1e9)
    assert int(it) == 3 and float(l1) < float(l0)
    _, _, _, it = run(loss, x0, 0.1, 7, 3, 0.0)
    assert int(it) == 7


def test_write_back_matches_eager_reference_and_decreases_loss(ring):
    """The jitted term equals an eager optax loop with the paper's stopping rule, started
    from the same targets (drawn by gass_targets with the step's key)."""
    gm, enc = ring
    lr, max_iters, patience, tol = 0.05, 60, 4, 5e-4
    g = gass(enc, enc.text_emb, r_dep=0.1, r_ind=0.1, lr=lr, max_iters=max_iters,
             patience=patience, tol=tol, steps="all")  # fmt: skip
    x0 = gm.sample(jax.random.key(11), 12)
    key = jax.random.key(12)
    ctx = StepContext(x0, 1.0, 1.0, 1.0, jnp.int32(0), 4, key, None)
    x_star, _, info = jax.jit(lambda x: g.apply((), x, ctx))(x0)
    assert bool(info.active)
    info = info.inner  # apply() itself returns the scheduled term's WindowInfo

    targets, u = gass_targets(key, enc(x0), enc.text_emb, 0.1, 0.1)
    np.testing.assert_allclose(info.u_ind, u, atol=1e-6)
    loss = jax.jit(lambda x: spp_loss(enc(x), targets))
    vg = jax.jit(jax.value_and_grad(lambda x: spp_loss(enc(x), targets)))
    opt = optax.adam(lr)

    @jax.jit  # one optax step per call: the same update, without eager op dispatch
    def adam_step(grad, state, x):
        upd, state = opt.update(grad, state, x)
        return optax.apply_updates(x, upd), state

    x, state = x0, opt.init(x0)
    cur, grad = vg(x)
    ref, wait, it, best, best_x = float(cur), 0, 0, float(cur), x
    losses = [float(cur)]
    while it < max_iters and wait < patience:
        x, state = adam_step(grad, state, x)
        cur, grad = vg(x)
        it += 1
        losses.append(float(cur))
        if float(cur) < ref - tol:
            ref, wait = float(cur), 0
        else:
            wait += 1
        if float(cur) < best:
            best, best_x = float(cur), x
    assert int(info.num_iters) == it
    assert it < max_iters  # this configuration stops by patience, not by the cap
    assert all(b > losses[-patience - 1] - tol for b in losses[-patience:])
    np.testing.assert_allclose(x_star, best_x, atol=2e-5)
    np.testing.assert_allclose(info.loss_before, losses[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(info.loss_after, float(loss(x_star)), rtol=1e-4)
    assert float(info.loss_after) < float(info.loss_before) - tol


# --------------------------------------------------------- in the sampler, on the toy


@pytest.fixture(scope="module")
def toy_runs(ring):
    """16 batches of 16 on the ring, EDM-DDIM 12 steps, with and without GASS, same noise."""
    gm, enc = ring
    sch = schedules.edm()
    s = samplers.ddim(sch, 12)
    den = gm.denoiser(sch)
    g = gass(enc, enc.text_emb, r_dep=0.2, r_ind=0.2, lr=0.1, num_active=6)
    noise = jax.random.normal(jax.random.key(1), (16, 16, 2))
    keys = jax.random.split(jax.random.key(2), 16)

    @jax.jit
    def run(noise, keys):
        base = jax.vmap(lambda n, k: jaxdiv.sample(s, den, n, key=k).x0)(noise, keys)
        out = jax.vmap(lambda n, k: jaxdiv.sample(s, den, n, key=k, guidance=g, trace=True))(
            noise, keys
        )
        spp = lambda x: metrics.spp(enc(x), enc.text_emb, jax.random.key(5)).spp
        return base, out, jax.vmap(spp)(base), jax.vmap(spp)(out.x0)

    return run(noise, keys)


def test_spp_increases_over_unguided_with_same_noise(toy_runs):
    _, _, spp0, spp1 = toy_runs
    diff = np.asarray(spp1 - spp0)
    assert diff.mean() > 0
    assert diff.mean() / (diff.std(ddof=1) / np.sqrt(diff.size)) > 2.5  # paired t over batches
    assert (diff > 0).mean() >= 0.6


def test_active_steps_and_loss_decrease_in_sampler(toy_runs):
    _, out, _, _ = toy_runs
    inner = out.trace.info["gass"]
    on = np.asarray(out.trace.active["gass"])  # (batches, steps)
    active = on[0]
    assert np.flatnonzero(active).tolist() == list(active_steps(12, "uniform", 6))
    assert np.all(on == active)
    assert np.all(np.asarray(inner.loss_after)[on] <= np.asarray(inner.loss_before)[on])
    assert np.mean(np.asarray(inner.loss_after)[on] < np.asarray(inner.loss_before)[on]) > 0.9
    assert np.all(np.asarray(inner.num_iters)[on] <= 60) and np.all(inner.num_iters[~on] == 0)


def test_fresh_perturbations_every_step(toy_runs):
    """The public code re-seeded its target builder, so every step drew the same shifts;
    here every active step (and every batch) draws new ones."""
    _, out, _, _ = toy_runs
    info = out.trace.info["gass"]
    on = np.asarray(out.trace.active["gass"][0])
    delta = np.asarray(info.delta)[:, on]  # (batches, active steps, B, 2)
    flat = delta.reshape(-1, delta.shape[2] * 2)
    assert len({tuple(np.round(r, 6)) for r in flat}) == flat.shape[0]
    # consecutive active steps are uncorrelated
    a, b = delta[:, :-1].ravel(), delta[:, 1:].ravel()
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1
    u = np.asarray(info.u_ind)[0, on]
    assert np.abs(u[:-1] - u[1:]).max() > 1e-3


def test_flow_sampler_feeds_gass_x_minus_t_v(ring):
    """On rectified flow GASS works on the core's x0_hat = x_t - t v, not on the public
    SD3 code's VP formula (x_t - t v) / sqrt(1 - t^2) (PAPERS.md; sd3_gass_sampling.py
    lines 276-278, as tests/test_gass_sd3.py transcribes it)."""
    gm, enc = ring
    fl = schedules.flow(shift=3.0)
    gmm_den = gm.denoiser(fl)

    def velocity_model(x, t, cond):
        return predictions.x0_to_velocity(gmm_den(x, t), x, fl.alpha(t), fl.sigma(t))

    den = predictions.as_denoiser(velocity_model, fl, "flow")
    step = 3
    g = gass(enc, enc.text_emb, r_dep=0.1, r_ind=0.1, lr=0.05, steps=[step])
    s = samplers.flow_euler(fl, 8)
    noise = jax.random.normal(jax.random.key(4), (12, 2))
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(6), guidance=g, trace=True)
    tr = out.trace
    x_t, t = tr.x[step], tr.t[step]
    v = velocity_model(x_t, t, None)
    x0_flow = x_t - t * v
    x0_diff = (x_t - t * v) / jnp.sqrt(1.0 - t**2)  # the public code's formula
    # explicit steps go through guidance.window: active at exactly those steps
    assert np.flatnonzero(np.asarray(tr.active["gass"])).tolist() == [step]
    inner = jax.tree.map(lambda a: a[step], tr.info["gass"])

    def loss_from(x0):
        targets = spherical_targets(enc(x0), enc.text_emb, inner.u_ind, inner.delta[:, 0],
                                    inner.delta[:, 1])  # fmt: skip
        return float(spp_loss(enc(x0), targets))

    np.testing.assert_allclose(loss_from(x0_flow), inner.loss_before, rtol=1e-4, atol=2e-6)
    # the public formula's x0_hat is 1 / sqrt(1 - t^2) times as far out: GASS's loss there
    # is off by over 10x the tolerance the flow formula meets
    assert not np.isclose(loss_from(x0_diff), float(inner.loss_before), rtol=1e-3, atol=2e-5)
    rms = jnp.sqrt(jnp.mean((tr.x0_hat[step] - x0_flow) ** 2))
    np.testing.assert_allclose(rms, inner.update_rms, rtol=1e-4, atol=1e-7)
    assert float(inner.update_rms) > 0
    # at inactive steps x0_hat is exactly x_t - t v
    other = 5
    np.testing.assert_allclose(
        tr.x0_hat[other],
        tr.x[other] - tr.t[other] * velocity_model(tr.x[other], tr.t[other], 0),
        atol=1e-5,
    )
