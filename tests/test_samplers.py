"""Samplers against exact Gaussian-mixture targets, literal reference algorithms and diffusers."""

import math

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxdiv
import toy
from jaxdiv import samplers, schedules
from jaxdiv.metrics import energy_distance

N_SAMPLES = 4096

CASES = {
    "ddim_vp": lambda: samplers.ddim(schedules.vp_linear(), 100),
    "ddpm_vp_eta1": lambda: samplers.ddim(schedules.vp_linear(), 250, eta=1.0),
    "ddim_cosine": lambda: samplers.ddim(schedules.vp_cosine(), 100),
    "edm_heun": lambda: samplers.edm(schedules.edm(), 40),
    "edm_churn": lambda: samplers.edm(schedules.edm(), 64, s_churn=40, s_tmin=0.05, s_tmax=50),
    "edm_heun_on_vp": lambda: samplers.edm(schedules.vp_linear(), 40),
    "flow_euler": lambda: samplers.flow_euler(schedules.flow(), 100),
    "flow_euler_shift3": lambda: samplers.flow_euler(schedules.flow(3.0), 100),
}


def _standard_errors(gm, key, n):
    """Standard errors of the sample mean and covariance entries for n draws, estimated
    from a large exact sample (no Gaussian assumption: mixtures have heavy 4th moments)."""
    ref = gm.sample(key, 16 * n)
    c = ref - ref.mean(0)
    prod = c[:, :, None] * c[:, None, :]
    return jnp.sqrt(jnp.var(ref, 0) / n), jnp.sqrt(jnp.var(prod, 0) / n)


HIGH_DIM_CASES = ["ddim_vp", "ddpm_vp_eta1", "edm_heun", "edm_churn", "flow_euler"]


@pytest.fixture(scope="module")
def exact_stats(gmm2, gmm16):
    """The sampler-independent reference quantities, computed once per module (they
    depend only on the target mixture and fixed keys): standard errors from a 16 N exact
    sample, and for d = 2 an exact "truth" sample and the null energy distance (max over
    4 independent exact samples)."""
    cache = {}

    def get(dim):
        if dim not in cache:
            gm = gmm2 if dim == 2 else gmm16
            se = _standard_errors(gm, jax.random.key(100 + dim), N_SAMPLES)
            truth = null = None
            if dim == 2:
                truth = gm.sample(jax.random.key(11), N_SAMPLES)
                null = max(float(energy_distance(gm.sample(jax.random.key(20 + i), N_SAMPLES),
                                                 truth)) for i in range(4))  # fmt: skip
            cache[dim] = (se, truth, null)
        return cache[dim]

    return get


@pytest.mark.parametrize("case, dim", [(c, 2) for c in CASES] + [(c, 16) for c in HIGH_DIM_CASES])
def test_sampler_reproduces_gmm(case, dim, gmm2, gmm16, exact_stats):
    gm = gmm2 if dim == 2 else gmm16
    s = CASES[case]()
    noise = jax.random.normal(jax.random.key(dim), (N_SAMPLES, dim))
    x = jaxdiv.sample(s, gm.denoiser(s.schedule), noise, key=jax.random.key(7)).x0
    (se_mean, se_cov), truth, null = exact_stats(dim)
    # |z| < 5 per entry: Bonferroni over d^2 entries keeps false alarms < 1e-3
    z_mean = jnp.abs(x.mean(0) - gm.mean()) / se_mean
    z_cov = jnp.abs(jnp.cov(x.T, bias=True) - gm.covariance()) / se_cov
    assert float(z_mean.max()) < 5, f"mean z-score {float(z_mean.max()):.2f}"
    assert float(z_cov.max()) < 5, f"covariance z-score {float(z_cov.max()):.2f}"
    if dim == 2:
        assert float(energy_distance(x, truth)) < 2.5 * null


def test_sd_schedule_terminal_snr_biases_samples(gmm16, exact_stats):
    """SD's scaled-linear schedule ends at alpha(999) = 0.068, not 0: starting from pure
    noise there forgets the data mean (Lin et al. 2024, "Common diffusion noise schedules
    and sample steps are flawed"). The same check as above detects that bias, which is why
    the exactness tests use vp_linear (alpha(999) = 0.006)."""
    sch = schedules.vp_scaled_linear()
    assert float(sch.alpha(999.0)) > 10 * float(schedules.vp_linear().alpha(999.0))
    s = samplers.edm(sch, 40)
    noise = jax.random.normal(jax.random.key(16), (N_SAMPLES, 16))
    x = jaxdiv.sample(s, gmm16.denoiser(sch), noise, key=jax.random.key(7)).x0
    (se_mean, _), _, _ = exact_stats(16)  # standard errors from key 116, as above
    assert float((jnp.abs(x.mean(0) - gmm16.mean()) / se_mean).max()) > 5


def test_distribution_checks_catch_a_wrong_sampler(gmm2, exact_stats):
    """Negative control: the same checks reject samples from a slightly wrong model."""
    s = samplers.edm(schedules.edm(), 40)
    wrong = toy.GaussianMixture(gmm2.means, 1.3 * gmm2.covs, gmm2.weights)
    noise = jax.random.normal(jax.random.key(2), (N_SAMPLES, 2))
    x = jaxdiv.sample(s, wrong.denoiser(s.schedule), noise, key=jax.random.key(7)).x0
    # the same truth sample (key 11), null (keys 20..23) and standard errors (key 102)
    (_, se_cov), truth, null = exact_stats(2)
    z_cov = jnp.abs(jnp.cov(x.T, bias=True) - gmm2.covariance()) / se_cov
    assert float(z_cov.max()) > 5 or float(energy_distance(x, truth)) > 2.5 * null


def _order(make, sch, gm, ns, n_ref):
    """Slope of log(median per-sample error) vs log N against an n_ref-step reference.

    The median, not the RMS: with a multimodal target a few trajectories near a decision
    boundary switch modes between step counts, an O(1) error that hides the order."""
    den = gm.denoiser(sch)
    noise = jax.random.normal(jax.random.key(3), (512, gm.dim))
    ref = jaxdiv.sample(make(sch, n_ref), den, noise, key=jax.random.key(0)).x0
    errs = []
    for n in ns:
        x = jaxdiv.sample(make(sch, n), den, noise, key=jax.random.key(0)).x0
        errs.append(float(jnp.median(jnp.linalg.norm(x - ref, axis=-1))))
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0], errs


@pytest.mark.parametrize(
    "name, make, sch, lo, hi",
    [
        ("edm_heun", lambda s, n: samplers.edm(s, n), schedules.edm(), 1.8, 2.6),
        ("edm_euler", lambda s, n: samplers.edm(s, n, heun=False), schedules.edm(), 0.85, 1.25),
        ("ddim_edm", lambda s, n: samplers.ddim(s, n), schedules.edm(), 0.85, 1.25),
        ("flow_euler", lambda s, n: samplers.flow_euler(s, n), schedules.flow(), 0.85, 1.25),
    ],
)
def test_convergence_order(name, make, sch, lo, hi, gmm2):
    order, errs = _order(make, sch, gmm2, [16, 32, 64, 128], 1024)
    assert lo < order < hi, (name, order, errs)


def test_ddim_vp_converges_first_order(gmm2):
    # the discrete VP process has 1000 timesteps: the finest grid is the reference
    order, errs = _order(lambda s, n: samplers.ddim(s, n), schedules.vp_linear(), gmm2,
                         [16, 32, 64, 128], 1000)  # fmt: skip
    assert 0.85 < order < 1.25, (order, errs)


def test_ddim_eta0_on_flow_equals_flow_euler_and_the_velocity_formula(gmm2):
    sch = schedules.flow(3.0)
    den = gmm2.denoiser(sch)
    noise = jax.random.normal(jax.random.key(4), (64, 2))
    a = jaxdiv.sample(samplers.ddim(sch, 20), den, noise, key=jax.random.key(0)).x0
    b = jaxdiv.sample(samplers.flow_euler(sch, 20), den, noise, key=jax.random.key(0)).x0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # literal rectified-flow Euler, x <- x + (t_next - t) v, v = (x - x0_hat) / t
    ts = np.asarray(sch.grid(20))
    x = noise
    for t, t_next in zip(ts[:-1], ts[1:]):
        v = (x - den(x, t)) / t
        x = x + (t_next - t) * v
    np.testing.assert_allclose(np.asarray(a), np.asarray(x), atol=2e-5)


def _karras_alg2_numpy(den, noise, sigmas, zs, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al. (2022) Algorithm 2, line by line, in NumPy (float32 like the sampler:
    with churn, trajectories near a mode boundary amplify float64-vs-float32 rounding)."""
    n = len(sigmas) - 1
    sigmas = sigmas.astype(np.float32)
    x = sigmas[0] * noise.astype(np.float32)
    nfe = 0
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(s_churn / n, math.sqrt(2) - 1) if s_tmin <= s <= s_tmax else 0.0
        s_hat = np.float32(s + gamma * s)
        x_hat = x + np.float32(math.sqrt(s_hat**2 - s**2) * s_noise) * zs[i]
        d = (x_hat - den(x_hat, s_hat)) / s_hat
        nfe += 1
        x = x_hat + (s_next - s_hat) * d
        if s_next != 0:
            d2 = (x - den(x, s_next)) / s_next
            nfe += 1
            x = x_hat + (s_next - s_hat) * 0.5 * (d + d2)
    return x, nfe


@pytest.mark.parametrize("churn", [0.0, 30.0])
def test_edm_matches_literal_algorithm_2(churn, gmm2):
    sch = schedules.edm()
    n = 12
    s = samplers.edm(sch, n, s_churn=churn, s_tmin=0.05, s_tmax=10.0)
    noise = jax.random.normal(jax.random.key(5), (32, 2))
    key = jax.random.key(6)
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=key, trace=True)
    # the same per-sample churn noise the sampler draws: fold_in(split(key_noise, B)[b], i)
    keys = jax.random.split(jax.random.split(key)[0], 32)
    zs = [np.asarray(samplers.per_sample_normal(keys, i, noise)) for i in range(n)]
    den = lambda x, t: np.asarray(gmm2.posterior_mean(jnp.asarray(x, jnp.float32), 1.0, t))
    ref, nfe = _karras_alg2_numpy(den, np.asarray(noise), np.asarray(s.times, np.float64), zs,
                                  churn, 0.05, 10.0, 1.0)  # fmt: skip
    assert nfe == 2 * n - 1 == s.nfe
    np.testing.assert_allclose(np.asarray(out.x0), ref, atol=2e-4)


def _k_euler_ancestral(x0_hats, x, sigmas, zs, eta):
    """k-diffusion's ``sample_euler_ancestral`` (``k_diffusion/sampling.py``: with
    ``get_ancestral_step`` and ``to_d``), float64 NumPy, given each step's denoiser output
    and fed the noise ``zs``; the state after every step."""
    out = []
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        up = min(s_next, eta * (s_next**2 * (s**2 - s_next**2) / s**2) ** 0.5) if eta else 0.0
        down = (s_next**2 - up**2) ** 0.5
        x = x + (x - np.asarray(x0_hats[i], np.float64)) / s * (down - s)
        if s_next > 0:
            x = x + np.asarray(zs[i], np.float64) * up
        out.append(x)
    return out


@pytest.mark.parametrize("sch_name, eta", [("edm", 0.0), ("edm", 0.5), ("vp", 1.0)])
def test_ddim_is_k_diffusion_euler_ancestral_on_the_rescaled_variable(sch_name, eta, gmm2):
    """DDIM with ``eta`` is k-diffusion's Euler ancestral sampler with the same ``eta`` on
    ``x / alpha`` with noise level ``sigma / alpha`` (``eta = 0``: its Euler sampler), for
    every step of a traced run with the sampler's own per-sample noise."""
    sch = schedules.edm() if sch_name == "edm" else schedules.vp_linear()
    s = samplers.ddim(sch, 8, eta=eta)
    noise = jax.random.normal(jax.random.key(3), (16, 2))
    key = jax.random.key(4)
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=key, trace=True)
    keys = jax.random.split(jax.random.split(key)[0], 16)
    a = np.asarray(sch.alpha(s.times), np.float64)
    sigmas = np.asarray(sch.sigma(s.times), np.float64) / a
    start = np.asarray(out.trace.x[0], np.float64) / a[0]

    def replay(offset):
        zs = [samplers.per_sample_normal(keys, i + offset, noise) for i in range(8)]
        return [y * a[i + 1] for i, y in enumerate(
            _k_euler_ancestral(out.trace.x0_hat, start, sigmas, zs, eta))]  # fmt: skip

    got = list(out.trace.x[1:]) + [out.x0]
    for i, (g, w) in enumerate(zip(got, replay(0))):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4, err_msg=f"step {i}")
    if eta:  # another step's noise moves the intermediate states: the noise is the sampler's
        moved = max(np.abs(np.asarray(g) - w).max() for g, w in zip(got[:-1], replay(1)))
        assert moved > 1e-2


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_ddim_step_matches_diffusers(eta, gmm2):
    """Each DDIM step (including the sigma_t z term for eta > 0) equals diffusers'
    DDIMScheduler.step given the same model output and variance noise."""
    n = 10
    ours = samplers.ddim(schedules.vp_linear(), n, eta=eta, spacing="leading", steps_offset=1)
    # clip_sample=False: diffusers clips x0_hat to [-1, 1] by default, an image-space prior
    ref = diffusers.DDIMScheduler(beta_schedule="linear", timestep_spacing="leading",
                                  steps_offset=1, set_alpha_to_one=True,
                                  clip_sample=False)  # fmt: skip
    ref.set_timesteps(n)
    np.testing.assert_array_equal(np.asarray(ours.times[:-1]), ref.timesteps.numpy())
    noise = jax.random.normal(jax.random.key(8), (16, 2))
    key = jax.random.key(9)
    out = jaxdiv.sample(ours, gmm2.denoiser(ours.schedule), noise, key=key, trace=True)
    keys = jax.random.split(jax.random.split(key)[0], 16)
    sch = ours.schedule
    for i, t in enumerate(ref.timesteps.numpy()):
        x = out.trace.x[i]
        x0 = out.trace.x0_hat[i]
        eps = (x - sch.alpha(float(t)) * x0) / sch.sigma(float(t))
        z = samplers.per_sample_normal(keys, i, x)
        z_t = torch.tensor(np.asarray(z))
        prev = ref.step(torch.tensor(np.asarray(eps)), int(t), torch.tensor(np.asarray(x)),
                        eta=eta, variance_noise=z_t).prev_sample  # fmt: skip
        nxt = out.trace.x[i + 1] if i + 1 < n else out.x0
        np.testing.assert_allclose(np.asarray(nxt), prev.numpy(), atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "make",
    [lambda: samplers.ddim(schedules.vp_linear(), 8, eta=1.0),
     lambda: samplers.edm(schedules.edm(), 8, s_churn=10.0),
     lambda: samplers.flow_euler(schedules.flow(), 8)],
)  # fmt: skip
def test_final_output_is_last_guided_x0_hat(make, gmm2):
    s = make()
    noise = jax.random.normal(jax.random.key(1), (16, 2))
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), noise, key=jax.random.key(2), trace=True)
    np.testing.assert_array_equal(np.asarray(out.x0), np.asarray(out.trace.x0_hat[-1]))


def _counting_step(sampler, i, x, state, denoise, carry, keys):
    """The shared first-order step with a step counter as the sampler's own state."""
    x_next, _, carry, out = samplers.first_order_step(sampler, i, x, (), denoise, carry, keys)
    return x_next, state + 1, carry, out


def _zero_count(sampler, x):
    return jnp.int32(0)


def test_custom_sampler_with_the_v2_protocol(gmm2):
    """A Sampler assembled by hand from the public pieces (init(sampler, x), step(sampler,
    i, x, state, denoise, carry, keys)) runs like the factory's; its state is returned."""
    from jaxdiv.samplers.base import FirstOrderOptions

    sch = schedules.vp_linear()
    ref = samplers.ddim(sch, 10, eta=1.0)
    noise = jax.random.normal(jax.random.key(5), (8, 2))
    den = gmm2.denoiser(sch)
    want = jaxdiv.sample(ref, den, noise, key=jax.random.key(6))
    assert want.sampler_state == ()
    mine = samplers.Sampler("mine", sch, ref.times, samplers.no_state, samplers.first_order_step,
                            FirstOrderOptions(1.0), 10)  # fmt: skip
    got = jaxdiv.sample(mine, den, noise, key=jax.random.key(6))
    np.testing.assert_array_equal(np.asarray(got.x0), np.asarray(want.x0))
    counted = jaxdiv.sample(mine._replace(init=_zero_count, step=_counting_step), den, noise,
                            key=jax.random.key(6))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(counted.x0), np.asarray(want.x0))
    assert int(counted.sampler_state) == 10


def test_nfe_is_computed_by_the_factory():
    assert samplers.edm(schedules.edm(), 18).nfe == 35
    assert samplers.edm(schedules.edm(), 18, heun=False).nfe == 18
    assert samplers.ddim(schedules.vp_linear(), 25).nfe == 25
    assert samplers.flow_euler(schedules.flow(), 28).nfe == 28
    assert samplers.ddim(schedules.edm(), times=[2.0, 1.0, 0.0]).nfe == 2


def test_sampler_factory_errors():
    with pytest.raises(ValueError, match="eta must be a finite number >= 0, got inf"):
        samplers.ddim(schedules.vp_linear(), 10, eta=float("inf"))
    # samplers/grid.py still has its own message (api_v2.md: "an integer >= 1")
    with pytest.raises(ValueError, match="num_steps must be (a positive integer|an integer >= 1)"):
        samplers.ddim(schedules.edm(), 0)
    with pytest.raises(TypeError, match="heun must be a bool"):
        samplers.edm(schedules.edm(), 10, heun=1)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.ddim(schedules.edm(), 0)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.edm(schedules.edm(), -3)
    with pytest.raises(ValueError, match="eta"):
        samplers.ddim(schedules.vp_linear(), 10, eta=-0.1)
    # above 1 the step's noise std passes sigma_next: the old code clipped the direction
    # term to 0 and still added the whole noise, a silently over-noised marginal
    with pytest.raises(ValueError, match=r"eta must be <= 1 .*got 1\.5"):
        samplers.ddim(schedules.vp_linear(), 10, eta=1.5)
    # a flow time past 1 has alpha = 1 - t < 0 (it ran silently before)
    for make in (samplers.flow_euler, samplers.ddim, samplers.flow_heun):
        with pytest.raises(ValueError, match=r"times must lie in \[0, 1\] .*got 1\.5"):
            make(schedules.flow(), times=[1.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="s_churn"):
        samplers.edm(schedules.edm(), 10, s_churn=-1.0)
    with pytest.raises(TypeError, match="flow schedule"):
        samplers.flow_euler(schedules.edm(), 10)
    with pytest.raises(ValueError, match="alpha"):
        samplers.edm(schedules.flow(), 10)
    with pytest.raises(ValueError, match="decreasing"):
        samplers.ddim(schedules.edm(), times=[1.0, 2.0, 0.0])
    with pytest.raises(ValueError, match="clean endpoint"):
        samplers.ddim(schedules.edm(), times=[2.0, 1.0])
    with pytest.raises(ValueError, match="times has"):
        samplers.ddim(schedules.edm(), 5, times=[2.0, 1.0, 0.0])
    s = samplers.edm(schedules.flow(), times=[0.99, 0.5, 0.0])
    assert s.num_steps == 2
