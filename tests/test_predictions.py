import re

import jax
import numpy as np
import pytest

from jaxdiv import predictions as P
from jaxdiv import schedules


@pytest.mark.parametrize("alpha, sigma", [(0.6, 0.8), (1.0, 3.0), (0.25, 0.75)])
def test_round_trips(alpha, sigma):
    k1, k2 = jax.random.split(jax.random.key(0))
    x0 = jax.random.normal(k1, (4, 3))
    eps = jax.random.normal(k2, (4, 3))
    x = alpha * x0 + sigma * eps
    np.testing.assert_allclose(P.eps_to_x0(eps, x, alpha, sigma), x0, atol=1e-5)
    np.testing.assert_allclose(P.x0_to_eps(x0, x, alpha, sigma), eps, atol=1e-5)
    v = alpha * eps - sigma * x0
    np.testing.assert_allclose(P.x0_to_v(x0, x, alpha, sigma), v, atol=1e-5)
    np.testing.assert_allclose(P.v_to_x0(v, x, alpha, sigma), x0, atol=1e-5)


def test_flow_velocity():
    t = 0.3
    k1, k2 = jax.random.split(jax.random.key(1))
    x0, eps = jax.random.normal(k1, (5, 2)), jax.random.normal(k2, (5, 2))
    x = (1 - t) * x0 + t * eps
    u = eps - x0
    np.testing.assert_allclose(P.velocity_to_x0(u, x, 1 - t, t), x0, atol=1e-5)
    np.testing.assert_allclose(P.x0_to_velocity(x0, x, 1 - t, t), u, atol=1e-5)


@pytest.mark.parametrize(
    "pred, sch",
    [("epsilon", schedules.vp_linear()), ("v_prediction", schedules.vp_scaled_linear()),
     ("flow", schedules.flow()), ("sample", schedules.edm())],
)  # fmt: skip
def test_as_denoiser_recovers_x0_from_oracle_network(pred, sch):
    k1, k2 = jax.random.split(jax.random.key(2))
    x0, eps = jax.random.normal(k1, (3, 4)), jax.random.normal(k2, (3, 4))
    t = 0.4 if pred == "flow" else 500.0 if pred in ("epsilon", "v_prediction") else 2.0
    a, s = sch.alpha(t), sch.sigma(t)
    x = a * x0 + s * eps
    target = {"epsilon": eps, "v_prediction": a * eps - s * x0, "flow": eps - x0, "sample": x0}
    den = P.as_denoiser(lambda xx, tt, c: target[pred], sch, pred)
    np.testing.assert_allclose(den(x, t), x0, atol=1e-4)


def test_as_denoiser_errors():
    with pytest.raises(ValueError, match="prediction_type"):
        P.as_denoiser(lambda x, t, c: x, schedules.edm(), "score")
    with pytest.raises(TypeError, match="callable"):
        P.as_denoiser(3, schedules.edm())
    # at the clean end (alpha=1, sigma=0) x0_hat = (x - 0 * eps) / 1 is x itself, exactly
    assert float(P.eps_to_x0(0.0, 1.0, 1.0, 0.0)) == 1.0
    assert float(P.eps_to_x0(5.0, -2.5, 1.0, 0.0)) == -2.5


def test_sample_refuses_a_sampler_on_another_process_than_the_wrapped_network():
    """A wrapped network reads t on its own schedule; a sampler on another process would
    move x on one process while the network denoises another. jaxdiv.sample refuses it,
    naming both schedules and where alpha differs; the same process (rebuilt, or a flow
    with another shift, which only moves the grid) runs."""
    import jax.numpy as jnp

    import jaxdiv
    from jaxdiv import samplers

    sd = schedules.vp_scaled_linear()
    den = P.as_denoiser(lambda x, t, c: jnp.zeros_like(x), sd, "epsilon")
    noise, key = jnp.ones((2, 3)), jax.random.key(0)
    with pytest.raises(ValueError, match=r"its schedule 'edm' is not the process the denoiser "
                                         r"reads t on \('vp_scaled_linear'\): at t = 80 alpha "
                                         r"is 1 for the sampler and 0\.958"):  # fmt: skip
        jaxdiv.sample(samplers.edm(schedules.edm(), 4), den, noise, key=key)
    # DDPM's linear betas against SD's scaled-linear ones: same times, other alphas
    with pytest.raises(ValueError) as info:
        jaxdiv.sample(samplers.ddim(schedules.vp_linear(), 4), den, noise, key=key)
    t, got, want = map(float, re.search(r"at t = (\S+) alpha is (\S+) for the sampler and "
                                        r"(\S+) for the denoiser", str(info.value)).groups())
    assert got == pytest.approx(float(schedules.vp_linear().alpha(t)), rel=1e-5)
    assert want == pytest.approx(float(sd.alpha(t)), rel=1e-5) and abs(got - want) > 0.1
    ok = jaxdiv.sample(samplers.ddim(schedules.vp_scaled_linear(), 4), den, noise, key=key).x0
    np.testing.assert_array_equal(ok, jaxdiv.sample(samplers.ddim(sd, 4), den, noise, key=key).x0)
    flow = P.as_denoiser(lambda x, t, c: -x, schedules.flow(shift=3.0), "flow")
    x0 = jaxdiv.sample(samplers.flow_euler(schedules.flow(), 4), flow, noise, key=key).x0
    assert np.isfinite(np.asarray(x0)).all()
    with pytest.raises(ValueError, match=r"its schedule 'vp_scaled_linear' .* \('flow'\)"):
        jaxdiv.sample(samplers.ddim(sd, 4), flow, noise, key=key)
    # the toys' denoisers carry their schedule too (an exact GMM built for EDM, sampled
    # on VP timesteps, ran silently: it read t = 999 as sigma = 999)
    import toy

    gm = toy.GaussianMixture(jnp.array([[1.0, -1.0, 0.5]]), jnp.array([0.3]))
    with pytest.raises(ValueError, match=r"its schedule 'vp_linear' is not the process the "
                                         r"denoiser reads t on \('edm'\)"):  # fmt: skip
        jaxdiv.sample(samplers.ddim(schedules.vp_linear(), 4), gm.denoiser(schedules.edm()),
                      noise, key=key)  # fmt: skip
    jaxdiv.sample(samplers.edm(schedules.edm(), 4), gm.denoiser(schedules.edm()), noise, key=key)
