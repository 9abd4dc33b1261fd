"""DESIGN "Scale": a batch sharded over a `data` mesh axis gives the single-device result.

Runs in a subprocess because the number of host devices is fixed when JAX starts.
"""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import jaxdiv, toy
    from jaxdiv import guidance, samplers, schedules
    from jaxdiv.guidance import GuidanceTerm

    assert jax.device_count() == 8, jax.devices()
    gm = toy.GaussianMixture(jnp.array([[-2.0, 0.0], [2.0, 1.0]]), jnp.array([0.2, 0.1]))
    # a batch-coupling x0 term (pull towards the batch mean) exercises cross-device gathers
    pull = GuidanceTerm(lambda x, c, k: (),
                        lambda s, x0, ctx: (x0 + 0.05 * (x0.mean(0) - x0), s, ()), "x0")
    noise = jax.random.normal(jax.random.key(0), (64, 2))
    cond = jax.random.normal(jax.random.key(1), (64, 2))
    den = lambda x, t, c: gm.posterior_mean(x, 1.0, t) + 0.1 * c
    for s in (samplers.edm(schedules.edm(), 8, s_churn=10.0),
              samplers.ddim(schedules.edm(), 8, eta=1.0)):
        kw = dict(key=jax.random.key(2), guidance=guidance.chain(guidance.cfg(2.0), pull))
        single = jaxdiv.sample(s, den, noise, cond=cond, **kw).x0
        mesh = Mesh(np.array(jax.devices()), ("data",))
        shard = NamedSharding(mesh, P("data"))
        out = jaxdiv.sample(s, den, jax.device_put(noise, shard),
                            cond=jax.device_put(cond, shard), **kw).x0
        assert len(out.sharding.device_set) == 8, out.sharding
        np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5)
    print("SHARDED_OK")
    """
)


def test_sharded_sampling_equals_single_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SHARDED_OK" in res.stdout
