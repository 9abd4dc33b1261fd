"""DPM-Solver++(2M): diffusers parity, exact GMM samples, second order, state, NFE, SPELL."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import disjoint_shields_near, min_dist

import jaxdiv
import toy
from jaxdiv import guidance, samplers, schedules

N_SAMPLES = 4096


# -- 1. parity with diffusers' DPMSolverMultistepScheduler ---------------------------------


def _jaxdiv_times_for(sch, ref, karras):
    """jaxdiv VP times of diffusers' grid. Without Karras sigmas diffusers' timesteps are
    integer VP times (then the clean endpoint -1). With them the solver uses the Karras
    sigma itself: invert jaxdiv's linear-in-t interpolation of alphas_cumprod there."""
    if not karras:
        return np.append(ref.timesteps.numpy().astype(np.float64), -1.0)
    abar = np.asarray(sch.alphas_cumprod, np.float64)
    out = []
    for a in 1.0 / (1.0 + ref.sigmas.numpy()[:-1].astype(np.float64) ** 2):
        k = int(np.clip(np.searchsorted(-abar, -a), 1, len(abar) - 1))
        out.append(k - 1 + (abar[k - 1] - a) / (abar[k - 1] - abar[k]))
    # within [0, T - 1]: the schedule refuses times past its last timestep (rounding)
    return np.append(np.clip(out, 0.0, len(abar) - 1.0), -1.0)


@pytest.mark.parametrize(
    "beta, karras, n",  # n on both sides of lower_order_final's N < 15
    [("scaled_linear", k, n) for k in (False, True) for n in (10, 20)]
    + [("linear", False, 10), ("linear", True, 20)],
)
def test_matches_diffusers_full_loop(beta, karras, n, gmm2):
    if beta == "scaled_linear":
        sch, kw = schedules.vp_scaled_linear(), dict(beta_start=0.00085, beta_end=0.012)
    else:
        sch, kw = schedules.vp_linear(), {}
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule=beta, algorithm_type="dpmsolver++", solver_order=2,
        prediction_type="epsilon", use_karras_sigmas=karras, final_sigmas_type="zero", **kw,
    )  # fmt: skip
    ref.set_timesteps(n)
    model_ts = ref.timesteps.numpy()
    times = _jaxdiv_times_for(sch, ref, karras)
    s = samplers.dpmpp_2m(sch, times=jnp.asarray(times, jnp.float32))
    # the solver's noise levels are diffusers' sigmas (float32 rounding)
    np.testing.assert_allclose(sch.noise_level(s.times[:-1]), ref.sigmas.numpy()[:-1], rtol=2e-5)

    # a discrete-time eps model, evaluated where diffusers evaluates it: at the (rounded,
    # with Karras sigmas) integer timestep; the solver converts with its own sigma
    exact = gmm2.denoiser(sch)

    @jax.jit
    def eps_model(x, t_model):
        return (x - sch.alpha(t_model) * exact(x, t_model)) / sch.sigma(t_model)

    grid, table = jnp.asarray(times[:-1], jnp.float32), jnp.asarray(model_ts, jnp.float32)

    def den(x, t, cond=None):  # as_denoiser(eps_model) with diffusers' model timestep
        t_model = table[jnp.argmin(jnp.abs(grid - t))]
        return (x - sch.sigma(t) * eps_model(x, t_model)) / sch.alpha(t)

    noise = jax.random.normal(jax.random.key(3), (256, 2))
    ours = np.asarray(jaxdiv.sample(s, den, noise, key=jax.random.key(0)).x0)
    x = torch.tensor(np.asarray(noise))
    for t in model_ts:
        eps = eps_model(jnp.asarray(x.numpy()), jnp.float32(t))
        x = ref.step(torch.tensor(np.asarray(eps)), t, x).prev_sample
    theirs = x.numpy()
    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=5e-6 * scale)
    if n == 10:  # non-vacuous: the first-order solver (DDIM) on the same grid is far off
        first = jaxdiv.sample(samplers.ddim(sch, times=s.times), den, noise, key=jax.random.key(0))
        assert np.abs(np.asarray(first.x0) - theirs).max() > 1e-3 * scale


# -- 2. exact GMM samples on EDM and flow; second order ----------------------------------


def _standard_errors(gm, key, n):
    ref = gm.sample(key, 16 * n)
    c = ref - ref.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    return jnp.sqrt(jnp.var(ref, 0) / n), jnp.sqrt(jnp.var(prod, 0) / n)


@pytest.mark.parametrize("sch", [schedules.edm(), schedules.flow(3.0)], ids=["edm", "flow3"])
def test_reproduces_gmm(sch, gmm2):
    s = samplers.dpmpp_2m(sch, 32)
    noise = jax.random.normal(jax.random.key(2), (N_SAMPLES, 2))
    x = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(7)).x0
    assert bool(jnp.all(jnp.isfinite(x)))
    se_mean, se_cov = _standard_errors(gmm2, jax.random.key(102), N_SAMPLES)
    z_mean = jnp.abs(x.mean(0) - gmm2.mean()) / se_mean
    z_cov = jnp.abs(jnp.cov(x.T, bias=True) - gmm2.covariance()) / se_cov
    assert float(z_mean.max()) < 5, f"mean z-score {float(z_mean.max()):.2f}"
    assert float(z_cov.max()) < 5, f"covariance z-score {float(z_cov.max()):.2f}"


@pytest.mark.parametrize("sch", [schedules.edm(), schedules.flow()], ids=["edm", "flow"])
def test_second_order(sch, gmm2):
    """Median per-sample error against a 1024-step run quarters when N doubles (measured
    slopes ~2.1 on both; DDIM/Euler on the same grids: ~1.07)."""
    den = gm_den = gmm2.denoiser(sch)
    noise = jax.random.normal(jax.random.key(3), (512, 2))
    ref = jaxdiv.sample(samplers.dpmpp_2m(sch, 1024), den, noise, key=jax.random.key(0)).x0

    def err(make, n):
        x = jaxdiv.sample(make(sch, n), gm_den, noise, key=jax.random.key(0)).x0
        return float(jnp.median(jnp.linalg.norm(x - ref, axis=-1)))

    ns = [32, 64, 128]
    errs = [err(samplers.dpmpp_2m, n) for n in ns]
    order = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert 1.8 < order < 2.6, (order, errs)
    assert err(samplers.ddim, 64) > 4 * errs[1]  # first order is far behind at equal NFE


# -- 3. state, NFE, literal transcription, flow start at alpha = 0, SPELL ----------------


def _numpy_2m(sch, times, xs0, x0_hats):
    """DPM-Solver++(2M) in float64 NumPy from the trace's x0_hat (Lu et al. 2022, Alg. 2;
    first order at the first and last step and after an infinite step)."""
    t = np.asarray(times, np.float64)
    a = np.asarray(sch.alpha(times), np.float64)
    s = np.asarray(sch.sigma(times), np.float64)
    with np.errstate(divide="ignore"):
        lam = np.log(a) - np.log(s)
    x, xs, h_prev = np.asarray(xs0, np.float64), [], None
    for i in range(len(t) - 1):
        x0 = np.asarray(x0_hats[i], np.float64)
        h = lam[i + 1] - lam[i]
        d = x0
        if 0 < i < len(t) - 2 and np.isfinite(h_prev):
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * np.asarray(x0_hats[i - 1], np.float64)
        x = (s[i + 1] / s[i]) * x - a[i + 1] * (np.exp(-h) - 1.0) * d
        xs.append(x)
        h_prev = h
    return xs


SCHEDULES = {"vp": schedules.vp_linear(), "edm": schedules.edm(), "flow": schedules.flow(3.0)}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_literal_transcription_state_and_nfe(name, gmm2):
    sch = SCHEDULES[name]
    s = samplers.dpmpp_2m(sch, 7)
    assert s.nfe == 7
    calls = []
    base = gmm2.denoiser(sch)

    def den(x, t, c):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t, c)

    noise = jax.random.normal(jax.random.key(5), (16, 2))
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(1), trace=True)
    out.x0.block_until_ready()
    jax.effects_barrier()
    assert len(calls) == s.nfe == 7
    # the state holds the last x0_hat, which is the output; h of the last step is inf
    assert isinstance(out.sampler_state, samplers.DPMState)
    np.testing.assert_array_equal(out.sampler_state.x0_hat, out.x0)
    np.testing.assert_array_equal(out.x0, out.trace.x0_hat[-1])
    assert float(out.sampler_state.h) == np.inf
    xs = _numpy_2m(sch, s.times, out.trace.x[0], out.trace.x0_hat)
    got = list(out.trace.x[1:]) + [out.x0]
    for i, (g, w) in enumerate(zip(got, xs)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
    assert bool(jnp.all(jnp.isfinite(out.trace.x0_hat)))


def test_flow_start_at_alpha_zero_is_finite_first_order(gmm2):
    """At t = 1 (alpha = 0, lambda = -inf) the first step is its limit h -> inf:
    x_1 = sigma_1 x_0 + alpha_1 x0_0 (= the flow Euler step); the second is first order."""
    sch = schedules.flow()
    s = samplers.dpmpp_2m(sch, 6)
    assert float(s.times[0]) == 1.0
    noise = jax.random.normal(jax.random.key(6), (32, 2))
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(1), trace=True)
    t1 = float(s.times[1])
    np.testing.assert_allclose(out.trace.x[1], t1 * noise + (1 - t1) * out.trace.x0_hat[0],
                               rtol=1e-6, atol=1e-6)  # fmt: skip
    euler = jaxdiv.sample(samplers.flow_euler(sch, times=s.times[:3].at[2].set(0.0)),
                          gmm2.denoiser(sch), noise, key=jax.random.key(1), trace=True)  # fmt: skip
    np.testing.assert_allclose(out.trace.x[1], euler.trace.x[1], rtol=1e-6, atol=1e-6)
    t2 = float(s.times[2])  # second step: D = x0_1 (1/(2r) = h_1 / (2 inf) = 0)
    want = t2 / t1 * out.trace.x[1] - (1 - t2) * (
        (1 - t1) * t2 / (t1 * (1 - t2)) - 1.0) * out.trace.x0_hat[1]  # fmt: skip
    np.testing.assert_allclose(out.trace.x[2], want, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(out.x0)))


# Only flow(3), the hardest process (lambda = -inf at the start). vp and edm dropped: the
# per-process 2M step is checked against the NumPy transcription on all three processes in
# test_literal_transcription_state_and_nfe, and SPELL's guarantee on DPM++ samplers over vp
# and edm grids in test_dpmpp_sde.py::test_spell_guarantee (same multistep history code).
@pytest.mark.parametrize("name", ["flow"])
def test_spell_guarantee_and_guided_history(name):
    """SPELL's guarantee on the final output (the last step returns the guided x0_hat),
    and the multistep history is the *guided* x0_hat (the NumPy transcription fed the
    trace's guided x0_hat reproduces every step)."""
    sch = SCHEDULES[name]
    gm = toy.GaussianMixture(1.5 * jax.random.normal(jax.random.key(2), (3, 2)),
                             jnp.full((3,), 0.3**2))  # fmt: skip
    s = samplers.dpmpp_2m(sch, 10)
    noise = jax.random.normal(jax.random.key(12), (48, 2))
    unguided = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22)).x0
    r = 0.15 * np.sqrt(2)
    z = disjoint_shields_near(unguided, 6, 2 * r * (1 + 1e-4), r, jax.random.key(3))
    assert (min_dist(unguided, z) < r).sum() >= 6
    term = guidance.spell(radius=r, reference=z, intra_batch=False)
    out = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22), guidance=term,
                        trace=True)  # fmt: skip
    assert min_dist(out.x0, z).min() >= r * (1 - 1e-5)
    np.testing.assert_array_equal(out.x0, out.trace.x0_hat[-1])
    xs = _numpy_2m(sch, s.times, out.trace.x[0], out.trace.x0_hat)
    for i, (g, w) in enumerate(zip(list(out.trace.x[1:]) + [out.x0], xs)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


def test_factory():
    s = samplers.dpmpp_2m(schedules.vp_scaled_linear(), 25, spacing="leading", steps_offset=1)
    assert s.nfe == 25 and s.num_steps == 25 and float(s.times[-1]) == -1.0
    assert samplers.dpmpp_2m(schedules.edm()).nfe == 20
    assert samplers.dpmpp_2m(schedules.edm(), times=[2.0, 1.0, 0.0]).nfe == 2
    with pytest.raises(ValueError, match="num_steps"):
        samplers.dpmpp_2m(schedules.edm(), 0)
    with pytest.raises(ValueError, match="clean endpoint"):
        samplers.dpmpp_2m(schedules.edm(), times=[2.0, 1.0])
    with pytest.raises(ValueError, match="decreasing"):
        samplers.dpmpp_2m(schedules.flow(), times=[0.5, 0.9, 0.0])


def test_gradient_through_the_infinite_log_snr_ends(gmm2):
    """lambda = -inf at a flow's t = 1 and +inf at t = 0 leave no NaN in gradients: the
    derivative in the flow's shift (a traced schedule leaf) matches central differences."""
    noise = jax.random.normal(jax.random.key(1), (8, 2))

    def f(shift):
        sch = schedules.flow(shift=shift)
        s = samplers.dpmpp_2m(sch, 5)
        return jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(0)).x0.sum()

    g = float(jax.grad(f)(jnp.float32(3.0)))
    fd = (float(f(jnp.float32(3.01))) - float(f(jnp.float32(2.99)))) / 0.02
    assert np.isfinite(g) and g == pytest.approx(fd, rel=2e-2, abs=1e-3)
