"""Schedules against PAPERS.md golden values and diffusers' schedulers (independent truth)."""

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv import schedules


def assert_matches_printed(actual, golden_strings):
    """Golden values are printed rounded: allow half a unit of the last printed digit
    (plus float32 rounding)."""
    for a, g in zip(np.asarray(actual, np.float64), golden_strings):
        decimals = len(g.split(".")[1]) if "." in g else 0
        tol = 0.5 * 10.0**-decimals + 2e-6 * abs(float(g))
        assert abs(a - float(g)) <= tol, (a, g)


def test_edm_grid_golden():
    g = np.asarray(schedules.edm(0.002, 80.0, 7.0).grid(18))
    assert g.shape == (19,)
    assert_matches_printed(g[:3], ["80", "57.586", "40.786"])
    assert_matches_printed(g[-4:], ["0.022935", "0.0075280", "0.002", "0"])
    assert g[-1] == 0.0


def test_sd3_flow_grid_golden_and_diffusers():
    g = np.asarray(schedules.flow(shift=3.0).grid(28))
    assert_matches_printed(g[:3], ["1.0", "0.98738", "0.97411"])
    assert_matches_printed(g[-4:], ["0.19983", "0.11091", "0.0089286", "0"])
    sch = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sch.set_timesteps(28)
    np.testing.assert_allclose(g, sch.sigmas.numpy(), atol=2e-6)


@pytest.mark.parametrize(
    "ours, kw",
    [
        (schedules.vp_linear(), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        (schedules.vp_scaled_linear(),
         dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)),
        (schedules.vp_cosine(), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)  # fmt: skip
def test_vp_alphas_cumprod_match_diffusers(ours, kw):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **kw).alphas_cumprod.numpy()
    t = jnp.arange(1000.0)
    np.testing.assert_allclose(np.asarray(ours.alpha(t)) ** 2, ref, rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(
        np.asarray(ours.sigma(t)) ** 2 + np.asarray(ours.alpha(t)) ** 2, 1.0, atol=1e-6
    )


@pytest.mark.parametrize("spacing, offset", [("trailing", 0), ("leading", 1), ("linspace", 0)])
@pytest.mark.parametrize("n", [10, 50, 7])
def test_vp_grid_matches_diffusers_ddim_timesteps(spacing, offset, n):
    sch = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=offset)
    sch.set_timesteps(n)
    ours = schedules.vp_scaled_linear().grid(n, spacing=spacing, steps_offset=offset)
    np.testing.assert_array_equal(np.asarray(ours[:-1]), sch.timesteps.numpy().astype(np.float32))
    assert float(ours[-1]) == -1.0


@pytest.mark.parametrize(
    "sch", [schedules.vp_linear(), schedules.edm(), schedules.flow(3.0)], ids=["vp", "edm", "flow"]
)
def test_clean_endpoint_and_noise_level_inverse(sch):
    g = sch.grid(12)
    assert float(sch.alpha(g[-1])) == 1.0 and float(sch.sigma(g[-1])) == 0.0
    assert np.all(np.diff(np.asarray(g)) < 0)
    mid = g[1:-1]
    back = sch.t_of_noise_level(sch.noise_level(mid))
    np.testing.assert_allclose(np.asarray(back), np.asarray(mid), rtol=1e-4, atol=1e-3)


def test_vectorised_alpha_sigma():
    for sch in (schedules.vp_linear(), schedules.edm(), schedules.flow()):
        t = jnp.linspace(0.1, 0.9, 6).reshape(2, 3)
        assert sch.alpha(t).shape == (2, 3) and sch.sigma(t).shape == (2, 3)
        np.testing.assert_allclose(
            np.asarray(jax.vmap(sch.sigma)(t.ravel())), np.asarray(sch.sigma(t)).ravel()
        )


def test_vp_interpolates_between_integer_timesteps():
    sch = schedules.vp_linear()
    a0, a1 = float(sch.alpha(10.0) ** 2), float(sch.alpha(11.0) ** 2)
    assert abs(float(sch.alpha(10.5) ** 2) - (a0 + a1) / 2) < 1e-7



def test_vp_interpolation_equals_numpy_interp_bitwise_on_jnp_interp():
    """The floor-based lookup behind ``alpha``/``sigma`` (no ``searchsorted`` loop) is
    NumPy's ``interp`` of the table to float32 rounding, and bitwise ``jnp.interp``: random
    times, every grid point, its float32 neighbours, and times outside the table."""
    sch = schedules.vp_scaled_linear()
    table = np.concatenate([[1.0], np.asarray(sch.alphas_cumprod, np.float64)])
    grid = np.arange(-1, 1000)
    rng = np.random.default_rng(0)
    t = np.concatenate([
        rng.uniform(-1, 999, 20000), grid, np.nextafter(grid, -np.inf),
        np.nextafter(grid, np.inf), [-5.0, -1.5, 999.5, 1e6],
    ]).astype(np.float32)  # fmt: skip
    ours = np.asarray(jax.jit(sch.alpha)(jnp.asarray(t)), np.float64) ** 2
    np.testing.assert_allclose(ours, np.interp(t.astype(np.float64), grid, table), rtol=2e-6)
    ext = jnp.asarray(table, jnp.float32)
    ref = jax.jit(lambda t: jnp.sqrt(jnp.interp(t, jnp.asarray(grid, jnp.float32), ext)))
    assert np.array_equal(np.asarray(jax.jit(sch.alpha)(t)), np.asarray(ref(t)))
    # traced times are not checked (concrete ones outside [-1, 999] are refused): NaN stays NaN
    assert np.isnan(float(jax.jit(sch.sigma)(jnp.float32(np.nan))))

def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps"):
        schedules.edm().grid(0)
    with pytest.raises(ValueError, match="sigma_min"):
        schedules.edm(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="rho"):
        schedules.edm(rho=-1.0)
    with pytest.raises(ValueError, match="shift"):
        schedules.flow(shift=0.0)
    with pytest.raises(ValueError, match="spacing"):
        schedules.vp_linear().grid(10, spacing="nope")
    with pytest.raises(ValueError, match="num_steps"):
        schedules.vp_linear().grid(2000)
    with pytest.raises(ValueError, match="betas"):
        schedules.vp_from_betas(np.array([0.5, 1.5]))


def test_karras_grid_is_differentiable_in_rho():
    g = jax.grad(lambda rho: schedules.karras_sigmas(10, 0.002, 80.0, rho)[5])(7.0)
    eps = 1e-2
    fd = (schedules.karras_sigmas(10, 0.002, 80.0, 7.0 + eps)[5]
          - schedules.karras_sigmas(10, 0.002, 80.0, 7.0 - eps)[5]) / (2 * eps)  # fmt: skip
    np.testing.assert_allclose(float(g), float(fd), rtol=1e-2)

