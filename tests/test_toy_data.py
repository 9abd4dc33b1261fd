import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
import toy
from jaxdiv import samplers, schedules
from jaxdiv.metrics import energy_distance


def test_two_moons_geometry():
    x = toy.two_moons(jax.random.key(0), 20_000, noise=0.0)
    upper, lower = x[:10_000], x[10_000:]
    np.testing.assert_allclose(jnp.linalg.norm(upper, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(jnp.linalg.norm(lower - jnp.array([1.0, 0.5]), axis=1), 1.0,
                               atol=1e-5)  # fmt: skip
    assert float(upper[:, 1].min()) >= 0 and float(lower[:, 1].max()) <= 0.5
    with pytest.raises(ValueError, match="n must be"):
        toy.two_moons(jax.random.key(0), 0)


@pytest.mark.parametrize("block_size", [7, 64, 10_000])
def test_empirical_denoiser_equals_brute_force(block_size):
    data = jax.random.normal(jax.random.key(1), (500, 3))
    den = toy.EmpiricalDenoiser(data, schedules.vp_linear(), block_size=block_size)
    x = jax.random.normal(jax.random.key(2), (9, 3))
    for t in (5.0, 300.0, 999.0):
        a, s = den.schedule.alpha(t), den.schedule.sigma(t)
        w = jax.nn.softmax(-jnp.sum((x[:, None] - a * data[None]) ** 2, -1) / (2 * s**2), -1)
        np.testing.assert_allclose(den(x, t), w @ data, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(den.data), np.asarray(data))


def test_empirical_denoiser_memorises():
    data = toy.two_moons(jax.random.key(3), 300)
    sch = schedules.edm()
    den = toy.EmpiricalDenoiser(data, sch, block_size=128)
    noise = jax.random.normal(jax.random.key(4), (64, 2))
    x = jaxdiv.sample(samplers.edm(sch, 32), den, noise, key=jax.random.key(5)).x0
    nearest = jnp.min(jnp.linalg.norm(x[:, None] - data[None], axis=-1), axis=1)
    assert float(nearest.max()) < 1e-3


def test_empirical_denoiser_errors():
    with pytest.raises(ValueError, match="data must have shape"):
        toy.EmpiricalDenoiser(jnp.zeros(3), schedules.edm())
    with pytest.raises(ValueError, match="block_size"):
        toy.EmpiricalDenoiser(jnp.zeros((3, 2)), schedules.edm(), block_size=0)
    with pytest.raises(ValueError, match="NaN"):
        toy.EmpiricalDenoiser(jnp.full((3, 2), jnp.nan), schedules.edm())
    with pytest.raises(ValueError, match="features"):
        toy.EmpiricalDenoiser(jnp.zeros((3, 2)), schedules.edm())(jnp.zeros((1, 3)), 1.0)


@pytest.mark.parametrize(
    "make",
    [lambda: samplers.edm(schedules.edm(), 32), lambda: samplers.ddim(schedules.vp_linear(), 100),
     lambda: samplers.flow_euler(schedules.flow(), 100)],
)  # fmt: skip
def test_trained_mlp_samples_two_moons(make):
    """The shipped MLP is a good two-moons model on every process: its samples are about as
    close to fresh data as fresh data is to itself."""
    s = make()
    den = toy.load_two_moons_mlp(s.schedule)
    noise = jax.random.normal(jax.random.key(6), (2048, 2))
    x = jaxdiv.sample(s, den, noise, key=jax.random.key(7)).x0
    ref = toy.two_moons(jax.random.key(8), 2048)
    null = float(energy_distance(toy.two_moons(jax.random.key(9), 2048), ref))
    assert float(energy_distance(x, ref)) < 4 * null + 2e-3


def test_missing_mlp_params_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_two_moons_mlp"):
        toy.load_two_moons_mlp(schedules.edm(), path=tmp_path / "nope.safetensors")
