"""DPM-Solver++ 2M SDE, 3M and 3M SDE: diffusers parity (same noise), the third-order
coefficients, convergence, exact GMM samples, state, NFE, batch independence, SPELL."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import disjoint_shields_near, min_dist, random_gmm
from test_dpmpp import _jaxdiv_times_for

import jaxdiv
import toy
from jaxdiv import guidance, samplers, schedules

N_SAMPLES = 4096
MAKERS = {
    "dpmpp_2m_sde": samplers.dpmpp_2m_sde,
    "dpmpp_3m": samplers.dpmpp_3m,
    "dpmpp_3m_sde": samplers.dpmpp_3m_sde,
}

# -- 1. parity with diffusers' DPMSolverMultistepScheduler, the same noise fed to both ----


def _fix_sde_third_order(ref):
    """diffusers 0.42's ``sde-dpmsolver++`` third-order step weights ``D2`` by
    ``alpha_t ((1 - e^{-2h} - 2h)/(2h)^2 - 0.5)``; the exact SDE integral (and k-diffusion's
    ``sample_dpmpp_3m_sde``) has ``+ 0.5``. Add the missing ``alpha_t D2`` to diffusers' own
    output, D2 recomputed exactly as diffusers does; everything else is diffusers' step."""
    orig = ref.multistep_dpm_solver_third_order_update

    def fixed(model_output_list, *args, sample=None, noise=None, **kwargs):
        out = orig(model_output_list, sample=sample, noise=noise)
        i = ref.step_index
        ab = [ref._sigma_to_alpha_sigma_t(ref.sigmas[j]) for j in (i + 1, i, i - 1, i - 2)]
        lam = [torch.log(a) - torch.log(s) for a, s in ab]
        h, h_0, h_1 = lam[0] - lam[1], lam[1] - lam[2], lam[2] - lam[3]
        r0, r1 = h_0 / h, h_1 / h
        m0, m1, m2 = model_output_list[-1], model_output_list[-2], model_output_list[-3]
        d1_0, d1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
        d2 = (1.0 / (r0 + r1)) * (d1_0 - d1_1)
        return out + ab[0][0] * d2

    ref.multistep_dpm_solver_third_order_update = fixed


def _run_both(sch, ref, make, karras, final, n, fix=False, **kw):
    """Our sampler and diffusers' scheduler on the same grid, eps model and noise."""
    ref.set_timesteps(n)
    model_ts = ref.timesteps.numpy()
    times = _jaxdiv_times_for(sch, ref, karras)
    if final == "sigma_min":  # diffusers' last sigma is noise_level(0): VP time 0
        times[-1] = 0.0
    s = make(sch, times=jnp.asarray(times, jnp.float32), allow_noisy_end=final != "zero", **kw)
    np.testing.assert_allclose(sch.noise_level(s.times), ref.sigmas.numpy(), rtol=2e-5)
    exact = random_gmm(jax.random.key(0), k=4, d=2).denoiser(sch)  # the gmm2 fixture

    @jax.jit
    def eps_model(x, t_model):
        return (x - sch.alpha(t_model) * exact(x, t_model)) / sch.sigma(t_model)

    grid, table = jnp.asarray(times[:-1], jnp.float32), jnp.asarray(model_ts, jnp.float32)

    def den(x, t, cond=None):  # the eps model at diffusers' (rounded) model timestep
        t_model = table[jnp.argmin(jnp.abs(grid - t))]
        return (x - sch.sigma(t) * eps_model(x, t_model)) / sch.alpha(t)

    noise = jax.random.normal(jax.random.key(3), (256, 2))
    key = jax.random.key(0)
    ours = np.asarray(jaxdiv.sample(s, den, noise, key=key).x0)
    # the noise our sampler draws at step i: per-sample streams of split(key)[0]
    keys = jax.random.split(jax.random.split(key)[0], noise.shape[0])
    if fix:
        _fix_sde_third_order(ref)
    x = torch.tensor(np.asarray(noise))
    for i, t in enumerate(model_ts):
        eps = eps_model(jnp.asarray(x.numpy()), jnp.float32(t))
        z = torch.tensor(np.asarray(samplers.per_sample_normal(keys, i, noise)))
        x = ref.step(torch.tensor(np.asarray(eps)), t, x, variance_noise=z).prev_sample
    return s, ours, x.numpy()


# Each sampler on both sides of lower_order_final's N < 15 (10 and 20), on a Karras grid
# and to a noisy ("sigma_min") end. Dropped as redundant: (karras=False, zero, 20) and
# (karras=True, zero, 10) per sampler -- the N >= 15 clean-end path is covered by
# (karras=True, zero, 20), the N < 15 clean-end path by (karras=False, zero, 10), and the
# Karras grid is only a different `times` array fed to the same step code.
CASES = [  # (sampler, diffusers algorithm, order, karras, final_sigmas_type, N)
    ("dpmpp_2m_sde", "sde-dpmsolver++", 2, k, f, n)
    for k, f, n in ((False, "zero", 10), (True, "zero", 20),
                    (False, "sigma_min", 10), (False, "sigma_min", 20))
] + [
    ("dpmpp_3m", "dpmsolver++", 3, k, f, n)
    for k, f, n in ((False, "zero", 10), (True, "zero", 20),
                    (False, "sigma_min", 10), (False, "sigma_min", 20))
] + [
    ("dpmpp_3m_sde", "sde-dpmsolver++", 3, k, "zero", n) for k, n in ((False, 10), (True, 20))
] + [("dpmpp_3m_sde", "sde-dpmsolver++", 3, False, "sigma_min", 10)]  # fmt: skip


@pytest.mark.exact_codegen
@pytest.mark.parametrize("name, algo, order, karras, final, n", CASES)
def test_matches_diffusers_full_loop(name, algo, order, karras, final, n):
    """Full loops equal to float32 precision (8 ulps of the output scale per step, as
    below), n on both sides of lower_order_final's N < 15. (With Karras sigmas diffusers'
    "sigma_min" grid repeats its last sigma, a zero-length step that jaxdiv's strictly
    decreasing grids refuse.)
    For 3M SDE diffusers' third-order D2 coefficient is corrected (see
    test_diffusers_sde_third_order_differs_by_alpha_d2). Not compared: 3M SDE to a noisy
    end with N >= 15, whose last step is third order from t = 50 to t = 0: there
    |alpha D2| is ~2x the output and the two float32 loops differ by ~1e-5 of it (measured
    5.8e-5 on outputs of scale 7; first- and second-order ends agree to 5e-6)."""
    sch = schedules.vp_scaled_linear()
    ref = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        algorithm_type=algo, solver_order=order, prediction_type="epsilon",
        use_karras_sigmas=karras, final_sigmas_type=final,
    )  # fmt: skip
    s, ours, theirs = _run_both(sch, ref, MAKERS[name], karras, final, n,
                                fix=name == "dpmpp_3m_sde")  # fmt: skip
    assert s.name == name and s.nfe == n
    # both loops call the same eps model, but compiled apart (inside jaxdiv's scan, and
    # alone for diffusers' Python loop) its float32 rounding differs, by up to ~3e-6 at
    # small sigma where eps divides by it, and the SDE carries that on: a few ulps of the
    # sample's scale per step (2.1 per step for 2M SDE, Karras, 20 steps, on a Zen 4 host
    # once the GMM denoiser's sums changed order on 2026-12-08; 0.8 before)
    ulp = float(np.finfo(np.float32).eps) * np.abs(theirs).max()
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=8 * n * ulp)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_solver_type_matches_diffusers(solver_type):
    """diffusers' solver_type picks the second-order step (2M SDE; 3M's warm-up step)."""
    sch = schedules.vp_scaled_linear()
    for name, algo, order in (("dpmpp_2m_sde", "sde-dpmsolver++", 2),
                              ("dpmpp_3m", "dpmsolver++", 3)):  # fmt: skip
        ref = diffusers.DPMSolverMultistepScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
            algorithm_type=algo, solver_order=order, solver_type=solver_type,
        )  # fmt: skip
        _, ours, theirs = _run_both(sch, ref, MAKERS[name], False, "zero", 12,
                                    solver_type=solver_type)  # fmt: skip
        # two float32 pipelines with different operation orders: up to a few ulps of the
        # sample's scale per step, 8 per step over the 12 steps here (an AVX-512 Xeon gave
        # 2.7e-5 = 4.8 ulps per step at scale 4.75, above the 5e-6 x scale other hosts met)
        ulp = float(np.finfo(np.float32).eps) * np.abs(theirs).max()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=8 * 12 * ulp)


def test_diffusers_sde_third_order_differs_by_alpha_d2():
    """Unpatched, diffusers' 3M SDE is far from ours (and from the corrected loop): the
    correction is not vacuous. Its coefficient is wrong: see the next test."""
    sch = schedules.vp_scaled_linear()
    kw = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
              algorithm_type="sde-dpmsolver++", solver_order=3)  # fmt: skip
    _, ours, raw = _run_both(sch, diffusers.DPMSolverMultistepScheduler(**kw),
                             samplers.dpmpp_3m_sde, False, "zero", 20)  # fmt: skip
    assert np.abs(ours - raw).max() > 1e-2 * np.abs(raw).max()


def _local_error(eta, h, published=True):
    """One third-order step of our sampler (EDM process, x64, no noise) from exact history
    ``x0(lambda) = exp(c lambda)`` at ``lambda_s - h0``, ``lambda_s - h0 - h1`` against the
    exact solution of the ODE / the SDE's mean: ``x_t = (s_t/s_s) e^{-eta h} x_s + (1+eta)
    alpha_t int_0^h e^{-(1+eta)(h-u)} x0(lambda_s + u) du``. ``published=False`` adds one
    more ``phi_3 D2`` (the Taylor-exact coefficient), computed here in NumPy."""
    c, lam_s, h0, h1 = 0.7, 0.3, 0.9 * h, 1.1 * h
    sig = np.exp(-np.array([lam_s - h0 - h1, lam_s - h0, lam_s, lam_s + h]))  # EDM: sigma = e^-lam
    times = np.concatenate([sig, np.linspace(sig[-1] / 2, 0.0, 17)])  # >= 15 steps, ends at 0
    s = samplers.dpmpp_3m_sde(schedules.edm(), times=jnp.asarray(times), eta=eta, s_noise=0.0)
    m = lambda lam: np.exp(c * lam)
    m0, m1, m2 = m(lam_s), m(lam_s - h0), m(lam_s - h0 - h1)
    state = samplers.DPM3State(jnp.full((1, 1), m1), jnp.asarray(h0), jnp.full((1, 1), m2),
                               jnp.asarray(h1))  # fmt: skip
    x_s = 1.234
    den = lambda x, t, carry: (jnp.full_like(x, m0), carry, None)
    x_t, *_ = s.step(s, 2, jnp.full((1, 1), x_s), state, den, None, jax.random.split(
        jax.random.key(0), 1))  # fmt: skip
    x_t = float(x_t[0, 0])
    k = 1.0 + eta
    exact = (sig[3] / sig[2]) * np.exp(-eta * h) * x_s + k * np.exp(c * lam_s) * (
        np.exp(c * h) - np.exp(-k * h)) / (k + c)  # fmt: skip
    if not published:
        r0, r1 = h0 / h, h1 / h
        d1_0, d1_1 = (m0 - m1) / r0, (m1 - m2) / r1
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = np.expm1(-k * h) / (k * h) + 1
        x_t -= (phi_2 / (k * h) - 0.5) * d2
    return abs(x_t - exact)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_third_order_local_error(eta):
    """The published multistep third-order step (Lu et al.; diffusers' dpmsolver++ and
    k-diffusion's 3M SDE, which this sampler implements) has local error O(h^3), hence
    global order 2: its D2 coefficient phi_3 is half the Taylor-exact one (D2 ~ h^2 x0''/2).
    Doubling it gives O(h^4) (global order 3). Measured slopes (h = .08 .. .01): 3.06 and
    3.98 (eta = 0), 3.05 and 3.97 (eta = 1); diffusers' 3M SDE sign (-0.5) gives ~2 (first
    order; measured with mpmath while writing this test)."""
    with jax.enable_x64(True):
        hs = [0.08, 0.04, 0.02, 0.01]
        pub = [_local_error(eta, h) for h in hs]
        taylor = [_local_error(eta, h, published=False) for h in hs]
    slope = lambda e: float(np.polyfit(np.log(hs), np.log(e), 1)[0])
    assert 2.9 < slope(pub) < 3.5, pub
    assert 3.8 < slope(taylor) < 4.2, taylor


# -- 2. convergence, exact GMM samples ---------------------------------------------------


def test_3m_convergence_order_on_edm(gmm2):
    """Deterministic 3M against a 2048-step 3M run (x64), median per-sample error. Measured
    slope over N = 32..256: 1.69 (order 2, as the local-error test predicts, not 3), with
    errors 4-10x below 2M's at equal N (2M's slope: 2.10). With the Taylor-exact D2 weight
    the slope was ~3.2 (measured while writing this test, not part of it)."""
    with jax.enable_x64(True):
        sch = schedules.edm()
        gm = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64) if jnp.issubdtype(
            jnp.result_type(a), jnp.floating) else a, gmm2)  # fmt: skip
        den = gm.denoiser(sch)
        noise = jax.random.normal(jax.random.key(3), (256, 2), jnp.float64)
        ref = jaxdiv.sample(samplers.dpmpp_3m(sch, 2048), den, noise, key=jax.random.key(0)).x0

        def err(make, n):
            x = jaxdiv.sample(make(sch, n), den, noise, key=jax.random.key(0)).x0
            return float(jnp.median(jnp.linalg.norm(x - ref, axis=-1)))

        ns = [32, 64, 128, 256]
        e3 = [err(samplers.dpmpp_3m, n) for n in ns]
        e2 = [err(samplers.dpmpp_2m, n) for n in ns]
    order3 = -np.polyfit(np.log(ns), np.log(e3), 1)[0]
    order2 = -np.polyfit(np.log(ns), np.log(e2), 1)[0]
    assert 1.5 < order3 < 2.2, (order3, e3)
    assert 1.9 < order2 < 2.4, (order2, e2)
    assert all(a < b / 3 for a, b in zip(e3, e2)), (e3, e2)


def _standard_errors(gm, key, n):
    ref = gm.sample(key, 16 * n)
    c = ref - ref.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    return jnp.sqrt(jnp.var(ref, 0) / n), jnp.sqrt(jnp.var(prod, 0) / n)


SCHEDULES = {"vp": schedules.vp_linear(), "edm": schedules.edm(), "flow": schedules.flow(3.0)}


@pytest.fixture(scope="module")
def gmm2_standard_errors(gmm2):
    """The mixture's standard errors (key 102), the same for every sampler: computed once."""
    return _standard_errors(gmm2, jax.random.key(102), N_SAMPLES)


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("sch_name", list(SCHEDULES))
def test_reproduces_gmm(name, sch_name, gmm2, gmm2_standard_errors):
    """Moments within 5 standard errors of the exact mixture's with N = 32 steps, except
    the SDE samplers on flow(3): there N = 128 (measured at N = 32: covariance +18% for
    2M SDE, -13% for DDIM eta = 1, z ~ 39; at N = 128 within 0.5%)."""
    sch = SCHEDULES[sch_name]
    s = MAKERS[name](sch, 128 if (sch_name == "flow" and name.endswith("sde")) else 32)
    noise = jax.random.normal(jax.random.key(2), (N_SAMPLES, 2))
    x = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(7)).x0
    assert bool(jnp.all(jnp.isfinite(x)))
    se_mean, se_cov = gmm2_standard_errors
    z_mean = jnp.abs(x.mean(0) - gmm2.mean()) / se_mean
    z_cov = jnp.abs(jnp.cov(x.T, bias=True) - gmm2.covariance()) / se_cov
    assert float(z_mean.max()) < 5, f"mean z-score {float(z_mean.max()):.2f}"
    assert float(z_cov.max()) < 5, f"covariance z-score {float(z_cov.max()):.2f}"


# -- 3. eta limits, state, NFE, batch independence, flow start, SPELL ----------------------


@pytest.mark.parametrize("sch_name", list(SCHEDULES))
def test_eta_zero_is_the_ode_solver(sch_name, gmm2):
    """dpmpp_2m_sde(eta=0) is dpmpp_2m and dpmpp_3m_sde(eta=0) is dpmpp_3m (no noise)."""
    sch = SCHEDULES[sch_name]
    den = gmm2.denoiser(sch)
    noise = jax.random.normal(jax.random.key(4), (32, 2))
    for sde, ode in ((samplers.dpmpp_2m_sde, samplers.dpmpp_2m),
                     (samplers.dpmpp_3m_sde, samplers.dpmpp_3m)):  # fmt: skip
        a = jaxdiv.sample(sde(sch, 9, eta=0.0), den, noise, key=jax.random.key(1)).x0
        b = jaxdiv.sample(ode(sch, 9), den, noise, key=jax.random.key(2)).x0
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _numpy_sde_2m(sch, times, x_start, x0_hats, zs, eta):
    """k-diffusion's sample_dpmpp_2m_sde (midpoint) on x / alpha with noise level
    sigma / alpha, float64 NumPy, from the trace's x0_hat and the sampler's noise."""
    a = np.asarray(sch.alpha(times), np.float64)
    lev = np.asarray(sch.sigma(times), np.float64) / a
    y, h_last, old, out = np.asarray(x_start, np.float64) / a[0], None, None, []
    for i in range(len(times) - 1):
        d = np.asarray(x0_hats[i], np.float64)
        if lev[i + 1] == 0:
            y = d
        else:
            h = np.log(lev[i]) - np.log(lev[i + 1])
            y = lev[i + 1] / lev[i] * np.exp(-eta * h) * y - np.expm1(-h - eta * h) * d
            if old is not None:
                r = h_last / h
                y = y - 0.5 * np.expm1(-h - eta * h) * (1 / r) * (d - old)
            y = y + np.asarray(zs[i], np.float64) * lev[i + 1] * np.sqrt(-np.expm1(-2 * eta * h))
            h_last = h
        old = d
        out.append(y * a[i + 1])
    return out


@pytest.mark.parametrize("sch_name", ["vp", "edm"])
def test_2m_sde_is_k_diffusion_on_the_rescaled_variable(sch_name, gmm2):
    """The step equals k-diffusion's DPM++ 2M SDE (eta = 0.5) run on x / alpha, for every
    step of a traced run, with the sampler's own per-sample noise."""
    sch = SCHEDULES[sch_name]
    s = samplers.dpmpp_2m_sde(sch, 8, eta=0.5)
    noise = jax.random.normal(jax.random.key(5), (16, 2))
    key = jax.random.key(1)
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=key, trace=True)
    keys = jax.random.split(jax.random.split(key)[0], 16)
    zs = [samplers.per_sample_normal(keys, i, noise) for i in range(8)]
    want = _numpy_sde_2m(sch, np.asarray(s.times, np.float64), out.trace.x[0],
                         out.trace.x0_hat, zs, 0.5)  # fmt: skip
    for i, (g, w) in enumerate(zip(list(out.trace.x[1:]) + [out.x0], want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


def _numpy_sde_3m(sch, times, x_start, x0_hats, zs, eta):
    """k-diffusion's sample_dpmpp_3m_sde on x / alpha with noise level sigma / alpha,
    float64 NumPy (phi_2 on the second step, third order from the third step on)."""
    a = np.asarray(sch.alpha(times), np.float64)
    lev = np.asarray(sch.sigma(times), np.float64) / a
    y, out = np.asarray(x_start, np.float64) / a[0], []
    d_1 = d_2 = h_1 = h_2 = None
    for i in range(len(times) - 1):
        d = np.asarray(x0_hats[i], np.float64)
        h = None
        if lev[i + 1] == 0:
            y = d
        else:
            h = np.log(lev[i]) - np.log(lev[i + 1])
            h_eta = h * (eta + 1)
            y = np.exp(-h_eta) * y - np.expm1(-h_eta) * d
            phi_2 = np.expm1(-h_eta) / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (d - d_1) / r0, (d_1 - d_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                y = y + phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2
            elif h_1 is not None:
                y = y + phi_2 * (d - d_1) / (h_1 / h)
            y = y + np.asarray(zs[i], np.float64) * lev[i + 1] * np.sqrt(-np.expm1(-2 * h * eta))
        d_1, d_2, h_1, h_2 = d, d_1, h, h_1
        out.append(y * a[i + 1])
    return out


@pytest.mark.parametrize("sch_name", ["vp", "edm"])
def test_3m_sde_is_k_diffusion_on_the_rescaled_variable(sch_name, gmm2):
    """dpmpp_3m_sde(solver_type="heun", lower_order_final=False) equals k-diffusion's DPM++
    3M SDE (eta = 0.7) run on x / alpha, every step, with the sampler's own noise."""
    sch = SCHEDULES[sch_name]
    s = samplers.dpmpp_3m_sde(sch, 8, eta=0.7, solver_type="heun", lower_order_final=False)
    noise = jax.random.normal(jax.random.key(5), (16, 2))
    key = jax.random.key(1)
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=key, trace=True)
    keys = jax.random.split(jax.random.split(key)[0], 16)
    zs = [samplers.per_sample_normal(keys, i, noise) for i in range(8)]
    want = _numpy_sde_3m(sch, np.asarray(s.times, np.float64), out.trace.x[0],
                         out.trace.x0_hat, zs, 0.7)  # fmt: skip
    for i, (g, w) in enumerate(zip(list(out.trace.x[1:]) + [out.x0], want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_nfe_and_output(name, gmm2):
    sch = schedules.edm()
    s = MAKERS[name](sch, 7)
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
    st = out.sampler_state
    assert isinstance(st, samplers.DPMState if "2m" in name else samplers.DPM3State)
    np.testing.assert_array_equal(out.x0, st.x0_hat)
    np.testing.assert_array_equal(out.x0, out.trace.x0_hat[-1])
    assert float(st.h) == np.inf
    if "3m" in name:  # the history shifts: the step before last's x0_hat and h
        np.testing.assert_array_equal(st.x0_hat_prev, out.trace.x0_hat[-2])
        lam = -np.log(np.asarray(s.times, np.float64)[:-1])
        assert float(st.h_prev) == pytest.approx(lam[-1] - lam[-2], rel=1e-5)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_noise_streams_do_not_depend_on_batch_size(name, gmm2):
    s = MAKERS[name](schedules.edm(), 10)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (12, 2))
    big = jaxdiv.sample(s, den, noise, key=jax.random.key(3)).x0
    small = jaxdiv.sample(s, den, noise[:5], key=jax.random.key(3)).x0
    np.testing.assert_allclose(big[:5], small, atol=1e-5)
    twins = jaxdiv.sample(s, den, jnp.tile(noise[:1], (4, 1)), key=jax.random.key(1)).x0
    assert float(jnp.abs(twins[1:] - twins[0]).max(axis=1).min()) > 1e-3  # own streams
    other = jaxdiv.sample(s, den, noise, key=jax.random.key(4)).x0  # the key matters
    assert float(jnp.abs(other - big).max(axis=1).min()) > 1e-3


@pytest.mark.parametrize("name", list(MAKERS))
def test_flow_start_at_alpha_zero_and_gradient(name, gmm2):
    """From t = 1 (alpha = 0, lambda = -inf) every step is finite, and the gradient in the
    flow's shift (through both infinite log-SNR ends) matches central differences."""
    noise = jax.random.normal(jax.random.key(1), (8, 2))

    def f(shift):
        sch = schedules.flow(shift=shift)
        s = MAKERS[name](sch, 6)
        return jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(0)).x0.sum()

    assert np.isfinite(float(f(jnp.float32(3.0))))
    g = float(jax.grad(f)(jnp.float32(3.0)))
    fd = (float(f(jnp.float32(3.01))) - float(f(jnp.float32(2.99)))) / 0.02
    assert np.isfinite(g) and g == pytest.approx(fd, rel=2e-2, abs=1e-3)


def test_noisy_end_keeps_sigma_n_noise_and_is_validated(gmm2):
    """allow_noisy_end: the output is x at the last time (not x0_hat); without it such a
    grid is refused."""
    sch = schedules.edm()
    times = sch.grid(10)[:-1]  # ends at sigma_min = 0.002
    with pytest.raises(ValueError, match="clean endpoint"):
        samplers.dpmpp_3m_sde(sch, times=times)
    s = samplers.dpmpp_3m_sde(sch, times=times, allow_noisy_end=True)
    noise = jax.random.normal(jax.random.key(1), (16, 2))
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(2), trace=True)
    assert s.nfe == 9
    assert 0 < float(jnp.abs(out.x0 - out.trace.x0_hat[-1]).max()) < 0.05


# A covering subset: each sampler and each process once. The other six pairs re-run the
# same SPELL projection on the same final x0_hat step; the process-specific step code is
# covered by test_reproduces_gmm / test_eta_zero_is_the_ode_solver (all 3 processes x
# samplers), and test_dpmpp.py::test_spell_guarantee_and_guided_history runs SPELL with
# the shared DPM++ history on flow(3).
@pytest.mark.parametrize("sch_name, name", [("vp", "dpmpp_2m_sde"), ("edm", "dpmpp_3m"),
                                            ("flow", "dpmpp_3m_sde")])  # fmt: skip
def test_spell_guarantee(name, sch_name):
    """SPELL's guarantee on the final output of each new sampler (the step to sigma = 0
    returns the guided x0_hat), and the history holds the guided x0_hat."""
    sch = SCHEDULES[sch_name]
    gm = toy.GaussianMixture(1.5 * jax.random.normal(jax.random.key(2), (3, 2)),
                             jnp.full((3,), 0.3**2))  # fmt: skip
    s = MAKERS[name](sch, 10)
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
    np.testing.assert_array_equal(out.x0, out.sampler_state.x0_hat)


def test_factories_validate():
    edm = schedules.edm()
    assert samplers.dpmpp_3m(edm).nfe == 20
    assert samplers.dpmpp_2m_sde(schedules.vp_linear(), 5, spacing="leading").nfe == 5
    with pytest.raises(ValueError, match="eta"):
        samplers.dpmpp_2m_sde(edm, 5, eta=-1.0)
    with pytest.raises(ValueError, match="s_noise"):
        samplers.dpmpp_3m_sde(edm, 5, s_noise=float("nan"))
    with pytest.raises(ValueError, match="solver_type"):
        samplers.dpmpp_3m(edm, 5, solver_type="bh2")
    with pytest.raises(TypeError, match="allow_noisy_end"):
        samplers.dpmpp_2m(edm, 5, allow_noisy_end=1)
    with pytest.raises(ValueError, match="decreasing"):
        samplers.dpmpp_3m_sde(edm, times=[1.0, 2.0, 0.0])
