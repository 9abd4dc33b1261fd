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
