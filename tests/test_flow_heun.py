"""Flow Heun: diffusers parity, NumPy transcription, second order, NFE, SPELL."""

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

EPS32 = float(np.finfo(np.float32).eps)


def _float32_bound(times, scale):
    """Per-step float32 error bound of a Heun step: ``v' = (x' - x0') / t_n`` turns an ulp of
    ``x'`` or ``x0'`` into ``ulp / t_n``, times ``|t_n - t| / 2``. Near the clean end
    (``t_n = 0.001``) that is ~100 ulps; both diffusers and jaxdiv run in float32, so
    agreement cannot be better. Factor 2 for the two roundings (measured: 1/3 to 1/6 of it)."""
    t = np.asarray(times, np.float64)
    amp = 1.0 + np.abs(np.diff(t))[:-1] / t[1:-1]  # Heun steps; the last (Euler) step: 1
    return 2.0 * EPS32 * scale * np.append(amp, 1.0)


# -- 1. parity with diffusers' FlowMatchHeunDiscreteScheduler ------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_matches_diffusers_full_loop(shift, gmm2):
    """diffusers' sigmas are ``[s_0, s_1, s_1, ..., s_{N-1}, s_{N-1}, 0]``: evaluation
    ``2k`` is the Euler (first-order) half of step ``k`` at ``s_k``, evaluation ``2k + 1``
    the correction at ``s_{k+1}``; the last evaluation at ``s_{N-1}`` is a lone Euler step
    to 0 (its stored ``dt`` is never used). NFE 2N - 1, the same as flow_heun."""
    n = 10
    sch = schedules.flow(shift)
    ref = diffusers.FlowMatchHeunDiscreteScheduler(shift=shift)
    ref.set_timesteps(n)
    sig = ref.sigmas.numpy()
    assert len(ref.timesteps) == 2 * n - 1 and sig[0] == 1.0
    times = np.append(sig[:-1:2], 0.0)  # s_0 .. s_{N-1}, 0
    s = samplers.flow_heun(sch, times=jnp.asarray(times, jnp.float32))
    assert s.nfe == len(ref.timesteps)
    # diffusers' grid is jaxdiv's default flow grid (the SD3 shifted grid)
    np.testing.assert_allclose(np.asarray(sch.grid(n)), times, rtol=1e-6, atol=0)

    exact = gmm2.denoiser(sch)
    velocity = jax.jit(lambda x, t: (x - exact(x, t, None)) / t)  # implied by x0_hat
    noise = jax.random.normal(jax.random.key(3), (256, 2))
    ours = np.asarray(jaxdiv.sample(s, exact, noise, key=jax.random.key(0)).x0)
    x = torch.tensor(np.asarray(noise))
    for k, t in enumerate(ref.timesteps):
        xj = jnp.asarray(x.numpy())
        tk = jnp.float32(sig[k])  # the sigma diffusers uses for this evaluation
        x = ref.step(torch.tensor(np.asarray(velocity(xj, tk))), t, x).prev_sample
    theirs = x.numpy()
    scale = np.abs(theirs).max()
    # measured max |diff|: 2.7e-5 (shift 1), 7.6e-6 (shift 3), ~1/3 of the bound below
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=_float32_bound(times, scale).max())
    # non-vacuous: flow Euler on the same grid is far off
    euler = jaxdiv.sample(samplers.flow_euler(sch, times=s.times), exact, noise,
                          key=jax.random.key(0)).x0  # fmt: skip
    assert np.abs(np.asarray(euler) - theirs).max() > 1e-2 * scale


# -- 2. float64 NumPy transcription ----------------------------------------------------------


def _numpy_heun_step(den, x, t, t_next, last):
    """One step of Heun on dx/dt = v, v = (x - D(x, t)) / t, in float64 (Euler if last)."""
    x = np.asarray(x, np.float64)
    v = (x - den(x, t)) / t
    x_pred = x + (t_next - t) * v
    if last:
        return x_pred
    v_next = (x_pred - den(x_pred, t_next)) / t_next
    return x + (t_next - t) * 0.5 * (v + v_next)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_numpy_transcription_every_step(shift, gmm2):
    sch = schedules.flow(shift)
    n = 8
    s = samplers.flow_heun(sch, n)
    assert float(s.times[0]) == 1.0  # starts at alpha = 0
    noise = jax.random.normal(jax.random.key(5), (64, 2))
    out = jaxdiv.sample(s, gmm2.denoiser(sch), noise, key=jax.random.key(1), trace=True)

    def den(x, t):  # the exact GMM posterior mean (float32 evaluation, float64 after)
        xx = jnp.asarray(x, jnp.float32)
        return np.asarray(gmm2.posterior_mean(xx, 1.0 - float(t), float(t)), np.float64)

    times = np.asarray(s.times, np.float64)
    got = list(np.asarray(out.trace.x[1:], np.float64)) + [np.asarray(out.x0, np.float64)]
    bound = _float32_bound(times, max(np.abs(g).max() for g in got))
    x_free = np.asarray(noise, np.float64)  # the transcription run on its own
    for i in range(n):
        # measured: <= 2.5e-7 except the step to t = 0.001 (3.1e-5, shift 1) / 0.0089
        # (5.8e-6, shift 3), float32 rounding amplified by 1 / t_n (see _float32_bound)
        last = i == n - 1
        one = _numpy_heun_step(den, out.trace.x[i], times[i], times[i + 1], last)
        np.testing.assert_allclose(got[i], one, rtol=0, atol=bound[i], err_msg=f"step {i}")
        x_free = _numpy_heun_step(den, x_free, times[i], times[i + 1], last)
        np.testing.assert_allclose(got[i], x_free, rtol=0, atol=bound[: i + 1].sum(),
                                   err_msg=f"run {i}")  # fmt: skip
    np.testing.assert_array_equal(out.x0, out.trace.x0_hat[-1])
    assert bool(jnp.all(jnp.isfinite(out.trace.x0_hat)))


# -- 3. second order, NFE, SPELL ------------------------------------------------------------


def test_second_order(gmm2):
    """Median per-sample error against a 1024-step run quarters when N doubles (measured
    slope 2.07; shift 3: 1.99); flow Euler on the same grids is first order (1.01)."""
    sch = schedules.flow()
    den = gmm2.denoiser(sch)
    noise = jax.random.normal(jax.random.key(3), (512, 2))
    ref = jaxdiv.sample(samplers.flow_heun(sch, 1024), den, noise, key=jax.random.key(0)).x0

    def err(make, n):
        x = jaxdiv.sample(make(sch, n), den, noise, key=jax.random.key(0)).x0
        return float(jnp.median(jnp.linalg.norm(x - ref, axis=-1)))

    ns = [16, 32, 64]
    errs = [err(samplers.flow_heun, n) for n in ns]
    order = -np.polyfit(np.log(ns), np.log(errs), 1)[0]
    assert 1.8 < order < 2.4, (order, errs)
    euler = [err(samplers.flow_euler, n) for n in ns]
    order_euler = -np.polyfit(np.log(ns), np.log(euler), 1)[0]
    assert 0.9 < order_euler < 1.2, (order_euler, euler)
    assert euler[1] > 4 * errs[1]


def test_nfe_counted(gmm2):
    sch = schedules.flow(3.0)
    s = samplers.flow_heun(sch, 7)
    assert s.nfe == 13 == 2 * s.num_steps - 1
    calls = []
    base = gmm2.denoiser(sch)

    def den(x, t, c):
        jax.debug.callback(lambda: calls.append(1))
        return base(x, t, c)

    out = jaxdiv.sample(s, den, jax.random.normal(jax.random.key(5), (16, 2)),
                        key=jax.random.key(1))  # fmt: skip
    out.x0.block_until_ready()
    jax.effects_barrier()
    assert len(calls) == s.nfe


# shift = 1.0 dropped: the shift only changes the time grid fed to the same Heun step
# (both shifts are checked against diffusers and the NumPy transcription above).
@pytest.mark.parametrize("shift", [3.0])
def test_spell_guarantee(shift):
    """The last step is Euler to t = 0, so the output is the last guided x0_hat and
    SPELL's guarantee holds exactly on it."""
    sch = schedules.flow(shift)
    gm = toy.GaussianMixture(1.5 * jax.random.normal(jax.random.key(2), (3, 2)),
                             jnp.full((3,), 0.3**2))  # fmt: skip
    s = samplers.flow_heun(sch, 10)
    noise = jax.random.normal(jax.random.key(12), (48, 2))
    unguided = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22)).x0
    r = 0.15 * np.sqrt(2)
    z = disjoint_shields_near(unguided, 6, 2 * r * (1 + 1e-4), r, jax.random.key(3))
    assert (min_dist(unguided, z) < r).sum() >= 6  # non-vacuous
    term = guidance.spell(radius=r, reference=z, intra_batch=False)
    out = jaxdiv.sample(s, gm.denoiser(sch), noise, key=jax.random.key(22), guidance=term,
                        trace=True)  # fmt: skip
    assert min_dist(out.x0, z).min() >= r * (1 - 1e-5)
    np.testing.assert_array_equal(out.x0, out.trace.x0_hat[-1])


def test_factory():
    s = samplers.flow_heun(schedules.flow(3.0))
    assert s.name == "flow_heun" and s.num_steps == 28 and s.nfe == 55
    assert samplers.flow_heun(schedules.flow(), times=[1.0, 0.5, 0.0]).nfe == 3
    with pytest.raises(TypeError, match="flow schedule"):
        samplers.flow_heun(schedules.edm(), 10)
    with pytest.raises(ValueError, match="num_steps"):
        samplers.flow_heun(schedules.flow(), 0)
    with pytest.raises(ValueError, match="clean endpoint"):
        samplers.flow_heun(schedules.flow(), times=[1.0, 0.5])
