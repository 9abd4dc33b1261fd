"""Karras / exponential / uniform grids on every process, and diffusers' stochastic flow
sampler (``FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)``)."""

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


def test_karras_on_edm_is_edms_own_grid():
    for n in (2, 18, 40):
        np.testing.assert_allclose(samplers.karras_grid(schedules.edm(), n),
                                   schedules.edm().grid(n), rtol=1e-6)  # fmt: skip


@pytest.mark.parametrize("kind", ["karras", "exponential"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_grids_equal_diffusers_flow_match(kind, shift):
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, **{f"use_{kind}_sigmas": True})
    make = {"karras": samplers.karras_grid, "exponential": samplers.exponential_grid}[kind]
    for n in (5, 28):
        ref.set_timesteps(n)
        np.testing.assert_allclose(make(schedules.flow(shift), n), ref.sigmas.numpy(),
                                   rtol=2e-6, atol=1e-7)  # fmt: skip


@pytest.mark.parametrize("kind", ["karras", "exponential"])
def test_vp_grids_are_diffusers_levels_at_jaxdivs_times(kind):
    """diffusers' DPMSolverMultistepScheduler with ``use_{kind}_sigmas`` builds the levels
    between sigma(T-1) and sigma(0); the jaxdiv grid is those levels mapped to fractional
    timesteps by ``t_of_noise_level`` (piecewise linear in the level between integer
    timesteps; diffusers interpolates log-sigma instead, so the times differ from its
    unrounded ones by less than one timestep)."""
    ref = diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085,
                                                beta_end=0.012, **{f"use_{kind}_sigmas": True})
    make = {"karras": samplers.karras_grid, "exponential": samplers.exponential_grid}[kind]
    sch = schedules.vp_scaled_linear()
    ref.set_timesteps(20)
    want_levels = ref.sigmas.numpy()[:-1].astype(np.float64)
    g = np.asarray(make(sch, 20), np.float64)
    assert g[-1] == -1.0 and np.all(np.diff(g) < 0)
    table = np.arange(-1, 1000, dtype=np.float64)
    levels = np.asarray(sch.noise_level(table.astype(np.float32)), np.float64)
    np.testing.assert_allclose(g[:-1], np.interp(want_levels, levels, table), rtol=0, atol=2e-3)
    np.testing.assert_allclose(g[[0, -2]], [999.0, 0.0], atol=2e-3)


def test_uniform_grid_and_arguments():
    np.testing.assert_allclose(samplers.uniform_grid(schedules.edm(), 3),
                               [80.0, 40.001, 0.002, 0.0], rtol=1e-6)  # fmt: skip
    np.testing.assert_allclose(samplers.uniform_grid(schedules.flow(), 2, high=0.8, low=0.2),
                               [0.8, 0.2, 0.0], rtol=1e-6)  # fmt: skip
    g = samplers.karras_grid(schedules.vp_linear(), 6, rho=3.0, high=50.0, low=0.1)
    ends = schedules.vp_linear().noise_level(g[jnp.array([0, -2])])
    np.testing.assert_allclose(ends, [50.0, 0.1], rtol=1e-3)
    with pytest.raises(ValueError, match="need high > low"):
        samplers.karras_grid(schedules.edm(), 5, high=1.0, low=2.0)
    with pytest.raises(ValueError, match="rho must be a finite number > 0"):
        samplers.karras_grid(schedules.edm(), 5, rho=0.0)
    # above the process's end: the times would be clamped there, the spacing lost
    with pytest.raises(ValueError, match=r"^high=1000 lies above the process's largest noise "
                                         r"level, 157\.\d+: the grid would be clamped there"):
        samplers.karras_grid(schedules.vp_linear(), 5, high=1000.0)
    with pytest.raises(ValueError, match=r"^high=2 lies above the process's largest t, 1:"):
        samplers.exponential_grid(schedules.flow(), 5, high=2.0)
    with pytest.raises(TypeError, match="jaxdiv schedule"):
        samplers.exponential_grid(object(), 5)


GRID_CASES = [(m, p) for m in ("karras", "exponential", "uniform") for p in ("vp", "edm", "flow")
              if (m, p) != ("uniform", "edm")]


@pytest.fixture(scope="module")
def exact_sample(gmm2):
    """20 000 exact draws (key 9), shared by the moment checks below."""
    return np.asarray(gmm2.sample(jax.random.key(9), 20_000))


@pytest.mark.parametrize("make,sch_name", GRID_CASES)
def test_grids_drive_every_sampler_to_the_exact_mixture(make, sch_name, gmm2, exact_sample):
    """DPM-Solver++(2M) on each grid reproduces the exact mixture's moments (5 standard
    errors of 2048 exact samples) with 48 steps. Not uniform-in-sigma on EDM: from 80 to
    0.002 in steps of 1.7 the last step alone spans the data scale (measured: variances x3.8
    and x3.4 at N = 48)."""
    sch = {"vp": schedules.vp_linear(), "edm": schedules.edm(),
           "flow": schedules.flow(3.0)}[sch_name]  # fmt: skip
    grid = getattr(samplers, f"{make}_grid")(sch, 48)
    noise = jax.random.normal(jax.random.key(2), (2048, 2))
    x = jaxdiv.sample(samplers.dpmpp_2m(sch, times=grid), gmm2.denoiser(sch), noise,
                      key=jax.random.key(7)).x0  # fmt: skip
    exact = exact_sample
    se = np.sqrt(np.var(np.asarray(exact), 0) / 2048)
    z = np.abs(np.asarray(x).mean(0) - np.asarray(exact).mean(0)) / se
    assert z.max() < 5, z
    cov_ratio = np.diag(np.cov(np.asarray(x).T)) / np.diag(np.cov(np.asarray(exact).T))
    assert np.all(np.abs(cov_ratio - 1) < 0.1), cov_ratio


# -- the stochastic flow sampler ------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_stochastic_flow_equals_diffusers_stochastic_sampling(shift, gmm2, monkeypatch):
    """Full loop on the exact GMM flow model; diffusers is fed the noise jaxdiv draws
    (``per_sample_normal`` of the per-sample keys), step by step."""
    import diffusers.schedulers.scheduling_flow_match_euler_discrete as fm

    n = 10
    sch = schedules.flow(shift)
    s = samplers.flow_euler(sch, n, stochastic=True)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=True)
    ref.set_timesteps(n)
    np.testing.assert_allclose(s.times, ref.sigmas.numpy(), rtol=1e-6)
    exact = gmm2.denoiser(sch)
    noise = jax.random.normal(jax.random.key(3), (128, 2))
    key = jax.random.key(0)
    out = jaxdiv.sample(s, exact, noise, key=key)
    # the noise our sampler draws at step i: per-sample streams of split(key)[0]
    keys = jax.random.split(jax.random.split(key)[0], noise.shape[0])
    zs = iter([np.asarray(samplers.per_sample_normal(keys, i, noise)) for i in range(n)])
    monkeypatch.setattr(fm, "randn_tensor", lambda *a, **k: torch.tensor(next(zs)))
    x = torch.tensor(np.asarray(noise))
    # one compile for the 10 steps instead of eager op dispatch
    exact_jit = jax.jit(lambda x, t, c: exact(x, t, c))
    for k, t in enumerate(ref.timesteps):
        tk = jnp.float32(ref.sigmas[k].item())
        x0 = exact_jit(jnp.asarray(x.numpy()), tk, None)
        v = (jnp.asarray(x.numpy()) - x0) / tk
        x = ref.step(torch.tensor(np.asarray(v)), t, x).prev_sample
    theirs = x.numpy()
    np.testing.assert_allclose(out.x0, theirs, rtol=0, atol=2e-5 * np.abs(theirs).max())
    # not the ODE: the deterministic Euler run differs
    ode = jaxdiv.sample(samplers.flow_euler(sch, n), exact, noise, key=jax.random.key(0)).x0
    assert np.abs(np.asarray(ode) - theirs).max() > 0.1


def _drawn_noise(s, noise, out):
    """The z of each step, recovered from the trace: x_{i+1} = (1 - t') x0_hat_i + t' z_i."""
    t = np.asarray(s.times, np.float64)
    xs = list(np.asarray(out.trace.x[1:], np.float64)) + [np.asarray(out.x0, np.float64)]
    zs = []
    for i in range(len(t) - 1):
        if t[i + 1] == 0:
            zs.append(np.zeros_like(xs[i], np.float32))
            continue
        x0 = np.asarray(out.trace.x0_hat[i], np.float64)
        zs.append(((xs[i] - (1 - t[i + 1]) * x0) / t[i + 1]).astype(np.float32))
    return zs


def test_stochastic_flow_noise_is_per_sample_and_the_sampler_is_biased(gmm2, exact_sample):
    """The re-noising step draws standard normal noise per sample (a sample does not
    depend on its batch). It re-noises the posterior *mean*, so it forgets ``x_t`` and
    under-disperses: on the exact mixture the variances stay at about 0.6 of the true
    ones however many steps (measured 0.63 / 0.63 at N = 64, 0.66 / 0.64 at N = 256);
    diffusers' flow scheduler does the same (the parity test). For an unbiased stochastic
    sampler on flows use ``dpmpp_2m_sde`` or ``ddim(eta=1)``."""
    sch = schedules.flow(3.0)
    noise = jax.random.normal(jax.random.key(2), (2048, 2))
    exact = exact_sample
    for n in (64, 256):
        s = samplers.flow_euler(sch, n, stochastic=True)
        out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(7), trace=True)
        ratio = np.diag(np.cov(np.asarray(out.x0).T)) / np.diag(np.cov(exact.T))
        assert np.all(ratio < 0.75), ratio
    # the injected noise, recovered from the trace, is standard normal
    z = np.concatenate(_drawn_noise(s, noise, out)[:-1])
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    half = jaxdiv.sample(s, gmm2.denoiser(sch), noise[:7], key=jax.random.key(7)).x0
    np.testing.assert_allclose(half, out.x0[:7], rtol=1e-5, atol=1e-6)
    unbiased = jaxdiv.sample(samplers.dpmpp_2m_sde(sch, 128), gmm2.denoiser(sch), noise,
                             key=jax.random.key(7)).x0  # fmt: skip
    ratio = np.diag(np.cov(np.asarray(unbiased).T)) / np.diag(np.cov(exact.T))
    assert np.all(np.abs(ratio - 1) < 0.1), ratio


def test_stochastic_flow_keeps_spells_guarantee():
    sch = schedules.flow(3.0)
    gm = toy.GaussianMixture(1.5 * jax.random.normal(jax.random.key(2), (3, 2)),
                             jnp.full((3,), 0.3**2))  # fmt: skip
    s = samplers.flow_euler(sch, 12, stochastic=True)
    noise = jax.random.normal(jax.random.key(12), (48, 2))
    unguided = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22)).x0
    r = 0.15 * np.sqrt(2)
    z = disjoint_shields_near(unguided, 6, 2 * r * (1 + 1e-4), r, jax.random.key(3))
    assert (min_dist(unguided, z) < r).sum() >= 6
    out = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22),
                        guidance=guidance.spell(radius=r, reference=z, intra_batch=False))
    assert min_dist(out.x0, z).min() >= r * (1 - 1e-5)
    with pytest.raises(TypeError, match="stochastic must be a bool"):
        samplers.flow_euler(sch, 4, stochastic=1)
