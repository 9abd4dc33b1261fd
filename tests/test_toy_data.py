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


@pytest.mark.parametrize("block_size", [7, 10_000])
@pytest.mark.parametrize("schedule", [schedules.edm(), schedules.vp_linear(), schedules.flow()])
def test_empirical_denoiser_at_zero_noise_is_the_nearest_point(schedule, block_size):
    # the limit sigma -> 0 of the softmax weights; 1 / (2 sigma^2) = inf made NaN before
    data = jax.random.normal(jax.random.key(1), (50, 3))
    den = toy.EmpiricalDenoiser(data, schedule, block_size=block_size)
    x = jax.random.normal(jax.random.key(2), (9, 3))
    t0 = float(schedule.grid(4)[-1])
    assert float(schedule.sigma(t0)) == 0.0 and float(schedule.alpha(t0)) == 1.0
    dist = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(data)[None], axis=-1)
    nearest = np.asarray(data)[dist.argmin(1)]
    np.testing.assert_array_equal(np.asarray(den(x, t0)), nearest)
    np.testing.assert_array_equal(np.asarray(den.posterior_mean(x, 1.0, 1e-30)), nearest)
    jac = jax.jacobian(lambda v: den(v[None], t0)[0])(x[0])  # piecewise constant: zero
    np.testing.assert_array_equal(np.asarray(jac), np.zeros((3, 3)))


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


def _exact_two_moons(n_per_arc=512, noise=0.05):
    """The two-moons distribution as a Gaussian mixture: ``n_per_arc`` equal-weight
    components per arc at midpoint-rule angles, variance ``noise^2``. Its exact denoiser is
    the true data distribution's up to the angle discretisation (spacing pi/512 = 0.006, far
    below the 0.05 noise; checked against 4x finer below)."""
    a = (np.arange(n_per_arc) + 0.5) * np.pi / n_per_arc
    upper = np.stack([np.cos(a), np.sin(a)], 1)
    lower = np.stack([1.0 - np.cos(a), 0.5 - np.sin(a)], 1)
    return toy.GaussianMixture(np.concatenate([upper, lower]), np.full(2 * n_per_arc, noise**2))


EXACT_MOONS = _exact_two_moons()


def test_trained_mlp_is_close_to_the_exact_denoiser():
    """At every noise level the shipped MLP's x0_hat is within a small fraction of the
    exact denoiser's own error (measured RMS differences 0.0015 at sigma = 0.02, 0.005 at
    0.05, 0.013-0.018 for 0.1-5, against MMSE 0.03-1.0): a model of the wrong
    distribution or with broken noise conditioning is far off."""
    sch = schedules.edm()
    mlp, exact = toy.load_two_moons_mlp(sch), EXACT_MOONS.denoiser(sch)
    finer = _exact_two_moons(2048).denoiser(sch)
    x0 = toy.two_moons(jax.random.key(10), 4096)
    eps = jax.random.normal(jax.random.key(11), (4096, 2))
    rms = lambda a, b: float(jnp.sqrt(jnp.mean(jnp.sum((a - b) ** 2, -1))))
    for sigma in (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0):
        x = x0 + sigma * eps
        d_exact = exact(x, sigma)
        assert float(jnp.abs(finer(x, sigma) - d_exact).max()) < 1e-3  # reference is exact
        mmse = rms(d_exact, x0)
        err = rms(mlp(x, sigma), d_exact)
        assert err < min(0.035, 0.3 * mmse), (sigma, err, mmse)


@pytest.mark.parametrize(
    "make",
    [lambda: samplers.edm(schedules.edm(), 32), lambda: samplers.ddim(schedules.vp_linear(), 100),
     lambda: samplers.flow_euler(schedules.flow(), 100)],
)  # fmt: skip
def test_trained_mlp_samples_two_moons(make):
    """The shipped MLP is a good two-moons model on every process: from the same noise
    the sampler ends next to where the exact denoiser takes it (measured median 0.009-0.010,
    90% quantile 0.022-0.028; the moons are 0.05 thick), and its samples are about as close
    to fresh data as fresh data is to itself (measured energy distance 0.0010-0.0014,
    fresh-vs-fresh 0.0021)."""
    s = make()
    den = toy.load_two_moons_mlp(s.schedule)
    noise = jax.random.normal(jax.random.key(6), (2048, 2))
    x = jaxdiv.sample(s, den, noise, key=jax.random.key(7)).x0
    exact = jaxdiv.sample(s, EXACT_MOONS.denoiser(s.schedule), noise, key=jax.random.key(7)).x0
    gap = np.asarray(jnp.linalg.norm(x - exact, axis=1))
    # the exact denoiser of moons 0.08 thick instead of 0.05 gives 0.021 and 0.050 here
    assert np.median(gap) < 0.015 and np.quantile(gap, 0.9) < 0.04, np.quantile(gap, [0.5, 0.9])
    ref = toy.two_moons(jax.random.key(8), 2048)
    null = float(energy_distance(toy.two_moons(jax.random.key(9), 2048), ref))
    assert float(energy_distance(exact, ref)) < 2 * null  # the reference samples two moons
    assert float(energy_distance(x, ref)) < 2 * null


def test_missing_mlp_params_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="train_two_moons_mlp"):
        toy.load_two_moons_mlp(schedules.edm(), path=tmp_path / "nope.safetensors")


def _corrupt(params, change):
    p = {k: np.array(v) for k, v in params.items()}  # writable copies
    change(p)
    return p


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p.pop("b1"), r"missing \['b1'\], unexpected none"),
        (lambda p: p.update(w5=p["w0"]), r"missing \['w4', 'b4', 'b5'\], unexpected none"),
        (lambda p: p.update(w999999999=p["w0"]), "reach layer 999999999 but the file holds"),
        (lambda p: p.update(scale=np.ones(2, np.float32)), r"unexpected \['scale'\]"),
        (lambda p: p.update(w1=p["w1"][:, :5]), r"b1 must have shape \(5,\), got \(16,\)"),
        (lambda p: p.update(w2=p["w2"][:7]), r"w2 must have shape \(16, out\), got \(7, 16\)"),
        (lambda p: p.update(b0=p["b0"].astype(np.int32)), "b0 must be a floating tensor"),
        (lambda p: p["w1"].__setitem__((0, 3), np.nan), "w1 has 1 NaN or inf values of 256"),
        (lambda p: p.update(w0=p["w0"][2:]), r"w0 must take the 2 data coordinates and 16 "),
    ],
)
def test_a_corrupt_mlp_file_is_refused_naming_the_tensor(tmp_path, change, message):
    from safetensors.numpy import save_file

    from toy.mlp import init_mlp, load_mlp

    params = init_mlp(jax.random.key(0), hidden=16, depth=3)
    path = tmp_path / "mlp.safetensors"
    save_file(_corrupt(params, change), str(path), metadata={"sigma_data": "0.5"})
    with pytest.raises(ValueError, match=message) as err:
        load_mlp(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match=message):  # nothing of the kind is ever written
        toy.mlp.save_mlp(tmp_path / "again.safetensors", _corrupt(params, change), 0.5)
    assert not (tmp_path / "again.safetensors").exists()


@pytest.mark.parametrize("metadata", [None, {"sigma_data": "nan"}, {"sigma_data": "-1"},
                                      {"sigma_data": "half"}])  # fmt: skip
def test_mlp_file_without_a_positive_sigma_data_is_refused(tmp_path, metadata):
    from safetensors.numpy import save_file

    from toy.mlp import init_mlp, load_mlp

    params = {k: np.asarray(v) for k, v in init_mlp(jax.random.key(0), hidden=8).items()}
    path = tmp_path / "mlp.safetensors"
    save_file(params, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="sigma_data must be a"):
        load_mlp(path)
    with pytest.raises(ValueError, match="sigma_data must be a finite number > 0"):
        toy.mlp.save_mlp(path, params, float("nan"))


@pytest.mark.parametrize("schedule", [schedules.edm(), schedules.vp_linear(), schedules.flow()])
def test_mlp_denoiser_is_the_identity_at_zero_noise(schedule):
    # c_skip = 1, c_out = 0 at sigma = 0; the noise embedding there was log(0) = -inf
    den = toy.load_two_moons_mlp(schedule)
    x = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    t0 = float(schedule.grid(4)[-1])
    assert float(schedule.sigma(t0)) == 0.0
    np.testing.assert_array_equal(np.asarray(den(x, t0)), np.asarray(x))
    jac = jax.jacobian(lambda v: den(v[None], t0)[0])(x[0])
    np.testing.assert_allclose(np.asarray(jac), np.eye(2), atol=1e-6)


def test_save_mlp_leaves_only_the_file(tmp_path):
    from toy.mlp import init_mlp, load_mlp, save_mlp

    params = init_mlp(jax.random.key(0), hidden=8)
    for scale in (1.0, 2.0):  # the second save replaces the first in place
        save_mlp(tmp_path / "mlp.safetensors", {k: scale * v for k, v in params.items()}, 0.5)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.safetensors"]
    loaded, _ = load_mlp(tmp_path / "mlp.safetensors")
    np.testing.assert_array_equal(np.asarray(loaded["w0"]), 2.0 * np.asarray(params["w0"]))
