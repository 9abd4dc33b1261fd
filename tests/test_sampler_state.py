"""Samplers carry their own state through the scan; the factory knows its NFE."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import samplers, schedules
from jaxdiv.samplers import Sampler

EDM = schedules.edm()


def gaussian_den(x, t, c):
    """Exact denoiser of N(0, 1) data on the EDM process."""
    return x / (1 + t**2)


class AB2State(NamedTuple):
    d_prev: jax.Array  # previous ODE slope (x - D) / sigma
    h_prev: jax.Array  # previous step size
    count: jax.Array


def _ab2_init(sampler, x):
    return AB2State(jnp.zeros_like(x), jnp.zeros((), x.dtype), jnp.zeros((), jnp.int32))


def _ab2_step(sampler, i, x, state, denoise, carry, keys):
    """Variable-step two-step Adams-Bashforth on dx/dsigma = (x - D) / sigma (EDM process);
    the first step is Euler. A multistep method: it needs the previous slope."""
    t, t_next = sampler.times[i], sampler.times[i + 1]
    x0_hat, carry, info = denoise(x, t, carry)
    d = (x - x0_hat) / t
    h = t_next - t
    r = jnp.where(state.count > 0, h / (2 * jnp.where(state.count > 0, state.h_prev, 1.0)), 0.0)
    x_next = x + h * ((1 + r) * d - r * state.d_prev)
    return x_next, AB2State(d, h, state.count + 1), carry, (x0_hat, info)


def ab2(schedule, num_steps):
    grid = schedule.grid(num_steps)
    return Sampler("ab2", schedule, grid, _ab2_init, _ab2_step, (), num_steps)


def test_a_multistep_sampler_threads_its_state():
    n = 12
    noise = jax.random.normal(jax.random.key(0), (5, 3))
    out = jaxdiv.sample(ab2(EDM, n), gaussian_den, noise, key=jax.random.key(1))
    # independent NumPy loop of the same method (float64)
    ts = np.asarray(EDM.grid(n), np.float64)
    x = ts[0] * np.asarray(noise, np.float64)
    d_prev = h_prev = None
    for i in range(n):
        t, tn = ts[i], ts[i + 1]
        d = (x - x / (1 + t**2)) / t
        h = tn - t
        x = x + h * d if d_prev is None else x + h * ((1 + h / (2 * h_prev)) * d
                                                     - h / (2 * h_prev) * d_prev)  # fmt: skip
        d_prev, h_prev = d, h
    np.testing.assert_allclose(out.x0, x, rtol=2e-4, atol=2e-5)
    assert int(out.sampler_state.count) == n
    # the last slope is (x - D) / t at t = 0.002: float32 cancellation, ~1e-7 |x| / t
    np.testing.assert_allclose(out.sampler_state.d_prev, d_prev, rtol=0, atol=1e-4)
    # AB2 is second order: closer to the exact flow than Euler on the same grid
    # the exact ODE solution from x(80) = 80 z is x(0) = 80 z / sqrt(1 + 80^2)
    exact = np.asarray(noise, np.float64) * ts[0] / np.sqrt(1 + ts[0] ** 2)
    euler = jaxdiv.sample(samplers.ddim(EDM, n), gaussian_den, noise, key=jax.random.key(1)).x0
    assert np.abs(out.x0 - exact).max() < np.abs(euler - exact).max()


def _counting_den(counter):
    def den(x, t, c):
        jax.debug.callback(lambda: counter.append(1))
        return gaussian_den(x, t, c)

    return den


@pytest.mark.parametrize(
    "make,expected",
    [
        (lambda: samplers.ddim(EDM, 7), 7),
        (lambda: samplers.ddim(schedules.vp_linear(), 7, eta=1.0), 7),
        (lambda: samplers.edm(EDM, 7), 13),
        (lambda: samplers.edm(EDM, 7, heun=False), 7),
        (lambda: samplers.flow_euler(schedules.flow(3.0), 7), 7),
    ],
)
def test_nfe_is_the_number_of_denoiser_calls(make, expected):
    s = make()
    calls = []
    out = jaxdiv.sample(s, _counting_den(calls), jnp.ones((1, 1)), key=jax.random.key(0))
    out.x0.block_until_ready()
    jax.effects_barrier()
    assert s.nfe == expected == len(calls)


def test_edm_churn_on_vp_never_exceeds_the_schedule():
    """A churned noise level above the VP schedule's largest is capped: the model is told
    the noise level its input actually has (before, t_hat was clamped while the extra noise
    was still added: std / told level = 1 + gamma = 1.41 at the first step)."""
    vp = schedules.vp_linear()
    s = samplers.edm(vp, 10, s_churn=80.0)          # gamma = sqrt(2) - 1 at every step
    seen = []

    def den(x, t, c):
        jax.debug.callback(lambda x, t: seen.append((np.asarray(x), float(t))), x, t)
        return jnp.zeros_like(x)                     # data: a point mass at 0

    noise = jax.random.normal(jax.random.key(0), (20000, 1))
    jaxdiv.sample(s, den, noise, key=jax.random.key(1)).x0.block_until_ready()
    jax.effects_barrier()
    x, t_hat = seen[0]
    level = float(vp.noise_level(t_hat))
    # y = x / alpha ~ N(0, level^2 + 1/alpha^2 - level^2 ...) : for a point mass, the
    # rescaled input's std is the noise level (plus the O(1) start-noise offset)
    std = float(np.std(x / float(vp.alpha(t_hat))))
    assert std / np.sqrt(level**2 + 1) == pytest.approx(1.0, abs=0.02)
    # at a later step the churn is below the cap and acts in full
    x, t_hat = seen[4]
    assert float(vp.noise_level(t_hat)) > float(vp.noise_level(s.times[2])) * 1.4


@pytest.mark.parametrize("name", ["edm", "flow_euler"])
def test_x64_runs_keep_float64_grids_and_steps(name):
    """Built and run in x64 mode, the grid, the Heun step sizes and the output are float64
    and agree with a float64 NumPy run far below float32 precision."""
    with jax.enable_x64(True):
        if name == "edm":
            sch = schedules.edm()
            s = samplers.edm(sch, 10)
            den = lambda x, t, c: x / (1 + t**2)
        else:
            sch = schedules.flow(shift=3.0)
            s = samplers.flow_euler(sch, 10)
            den = lambda x, t, c: (1 - t) * x / ((1 - t) ** 2 + t**2)   # N(0, 1) data
        noise = jax.random.normal(jax.random.key(0), (4, 2), jnp.float64)
        out = jaxdiv.sample(s, den, noise, key=jax.random.key(1), trace=True)
        assert s.times.dtype == out.trace.t.dtype == out.x0.dtype == jnp.float64
        ts = np.asarray(s.times)
        x = np.asarray(noise) * float(sch.init_noise_scale(ts[0]))
        for i in range(10):
            t, tn = ts[i], ts[i + 1]
            if name == "edm":
                d = (x - x / (1 + t**2)) / t
                x_e = x + (tn - t) * d
                if tn > 0:     # Heun's correction (Karras Alg. 1, line 8-11)
                    d2 = (x_e - x_e / (1 + tn**2)) / tn
                    x_e = x + (tn - t) * 0.5 * (d + d2)
                x = x_e
            else:
                x0 = (1 - t) * x / ((1 - t) ** 2 + t**2)
                x = x + (tn - t) * (x - x0) / t
        np.testing.assert_allclose(out.x0, x, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_runs_keep_the_step_sizes_in_float32(dtype):
    """A half-precision run carries ``x`` (and DPM-Solver++'s ``x0_hat`` history) in the
    noise's dtype, as diffusers' fp16 pipelines do, but the log-SNR increments ``h`` that
    set the multistep ratios stay in the grid's float32: equal to a float32 NumPy
    computation from the grid (in bfloat16 they were rounded by up to 0.4%)."""
    sch = schedules.vp_linear()
    s = samplers.dpmpp_3m(sch, 12)
    noise = jax.random.normal(jax.random.key(0), (4, 2)).astype(dtype)
    out = jaxdiv.sample(s, lambda x, t, c: 0.5 * x, noise, key=jax.random.key(1))
    assert out.x0.dtype == out.sampler_state.x0_hat.dtype == dtype
    assert out.sampler_state.h.dtype == out.sampler_state.h_prev.dtype == jnp.float32
    ts = np.asarray(s.times, np.float32)[:-1]     # the clean end's lambda is inf
    lam = np.log(np.asarray(sch.alpha(ts)) / np.asarray(sch.sigma(ts)))
    np.testing.assert_allclose(out.sampler_state.h_prev, lam[-1] - lam[-2], rtol=1e-6)
