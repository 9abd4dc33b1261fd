"""The entry point: determinism, batch-size independence, compilation, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules


def _stochastic_samplers():
    return [
        samplers.ddim(schedules.vp_linear(), 12, eta=1.0),
        samplers.edm(schedules.edm(), 8, s_churn=20.0),
        # eta < 1: with eta = 1 the first flow step (alpha = 0) forgets the initial noise
        samplers.ddim(schedules.flow(), 8, eta=0.5),
    ]


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_same_key_same_output_different_key_different_output(idx, gmm2):
    s = _stochastic_samplers()[idx]
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (16, 2))
    a = jaxdiv.sample(s, den, noise, key=jax.random.key(1)).x0
    b = jaxdiv.sample(s, den, noise, key=jax.random.key(1)).x0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    c = jaxdiv.sample(s, den, noise, key=jax.random.key(2)).x0
    # every sample moves, not just one of them
    assert float(jnp.abs(a - c).max(axis=1).min()) > 1e-3
    # each sample has its own noise stream: equal seeds, one key, different samples
    twins = jaxdiv.sample(s, den, jnp.tile(noise[:1], (4, 1)), key=jax.random.key(1)).x0
    assert float(jnp.abs(twins[1:] - twins[0]).max(axis=1).min()) > 1e-3


def test_deterministic_sampler_ignores_the_key(gmm2):
    s = samplers.flow_euler(schedules.flow(), 8)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (16, 2))
    a = jaxdiv.sample(s, den, noise, key=jax.random.key(1)).x0
    c = jaxdiv.sample(s, den, noise, key=jax.random.key(2)).x0
    np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("idx", [0, 1, 2])
def test_samples_do_not_depend_on_batch_size(idx, gmm2):
    s = _stochastic_samplers()[idx]
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (12, 2))
    big = jaxdiv.sample(s, den, noise, key=jax.random.key(3)).x0
    small = jaxdiv.sample(s, den, noise[:5], key=jax.random.key(3)).x0
    np.testing.assert_allclose(np.asarray(big[:5]), np.asarray(small), atol=1e-5)
    # nor on the other samples' noise
    other = noise.at[5:].set(jax.random.normal(jax.random.key(4), (7, 2)))
    moved = jaxdiv.sample(s, den, other, key=jax.random.key(3)).x0
    np.testing.assert_allclose(np.asarray(moved[:5]), np.asarray(big[:5]), atol=1e-5)
    assert float(jnp.abs(moved[5:] - big[5:]).max()) > 1e-3


def test_one_trace_per_compiled_call(gmm2):
    sch = schedules.edm()
    calls = []

    def den(x, t, cond):
        calls.append(1)  # runs at trace time only
        return gmm2.posterior_mean(x, 1.0, t)

    s = samplers.edm(sch, 10)
    noise = jax.random.normal(jax.random.key(0), (8, 2))
    jaxdiv.sample(s, den, noise, key=jax.random.key(0))
    first = len(calls)
    assert first <= 2  # Euler and Heun evaluations, each traced once for the whole scan
    for seed in range(3):
        jaxdiv.sample(s, den, noise + seed, key=jax.random.key(seed))
    # an equal sampler built again and a new key hit the same compiled program
    jaxdiv.sample(samplers.edm(sch, 10), den, noise, key=jax.random.key(9))
    assert len(calls) == first
    jaxdiv.sample(s, den, jnp.zeros((9, 2)), key=jax.random.key(0))  # new shape: retrace
    assert len(calls) == 2 * first


def test_works_under_outer_jit_and_vmap(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 10, eta=1.0)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (3, 6, 2))
    keys = jax.random.split(jax.random.key(1), 3)
    run = jax.jit(jax.vmap(lambda n, k: jaxdiv.sample(s, den, n, key=k).x0))
    out = run(noise, keys)
    for i in range(3):
        ref = jaxdiv.sample(s, den, noise[i], key=keys[i]).x0
        np.testing.assert_allclose(np.asarray(out[i]), np.asarray(ref), atol=1e-5)


def test_concrete_arrays_captured_by_an_outer_jit(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 5)
    noise = jax.random.normal(jax.random.key(0), (4, 2))
    cond = jnp.ones((4, 1))
    den = lambda x, t, c: gmm2.posterior_mean(x, s.schedule.alpha(t), s.schedule.sigma(t))
    got = jax.jit(lambda: jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond).x0)()
    ref = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond).x0
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-6)


def test_bad_input_errors(gmm2):
    s = samplers.edm(schedules.edm(), 5)
    den = gmm2.denoiser(s.schedule)
    noise = jnp.zeros((4, 2))
    k = jax.random.key(0)
    with pytest.raises(ValueError, match=r"last dimension d=2, got shape \(4, 3\)"):
        jaxdiv.sample(s, den, jnp.zeros((4, 3)), key=k)  # GMM is 2-D
    with pytest.raises(ValueError, match=r"denoiser must return x0_hat with the shape"):
        jaxdiv.sample(s, lambda x, t, c: x[:, :1], noise, key=k)
    with pytest.raises(ValueError, match="NaN"):
        jaxdiv.sample(s, den, noise.at[0, 0].set(jnp.nan), key=k)
    with pytest.raises(ValueError, match="batch dimension"):
        jaxdiv.sample(s, den, jnp.zeros(()), key=k)
    with pytest.raises(TypeError, match="key is required"):
        jaxdiv.sample(s, den, noise, key=None)
    with pytest.raises(TypeError, match=r"key must be a PRNG key \(jax.random.key\(seed\)\), "
                                        r"got int 0"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=0)
    with pytest.raises(ValueError, match=r"key must be one PRNG key .* batch of keys of shape "
                                         r"\(4,\)"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.split(k, 4))
    raw = jaxdiv.sample(s, den, noise, key=jax.random.PRNGKey(0)).x0  # the legacy key data
    np.testing.assert_array_equal(raw, jaxdiv.sample(s, den, noise, key=k).x0)
    with pytest.raises(TypeError, match="sampler must be"):
        jaxdiv.sample("ddim", den, noise, key=k)
    with pytest.raises(TypeError, match="denoiser must be callable"):
        jaxdiv.sample(s, 3.0, noise, key=k)
    with pytest.raises(TypeError, match="floating"):
        jaxdiv.sample(s, den, jnp.zeros((4, 2), jnp.int32), key=k)
    with pytest.raises(ValueError, match=r"cond\['y'\] must have the batch size of noise \(4\)"):
        jaxdiv.sample(s, lambda x, t, c: x, noise, key=k, cond={"y": jnp.zeros((3, 2))})
    with pytest.raises(ValueError, match="cond contains NaN"):
        jaxdiv.sample(s, lambda x, t, c: x, noise, key=k, cond=jnp.full((4, 1), jnp.nan))
    with pytest.raises(TypeError, match="GuidanceTerm"):
        jaxdiv.sample(s, den, noise, key=k, guidance=lambda x: x)
    with pytest.raises(ValueError, match=r"guidance_state .* dict with keys \['cfg'\], got \(\)"):
        jaxdiv.sample(s, den, noise, key=k, guidance=guidance.cfg(2.0), guidance_state=(),
                      cond=jnp.zeros((4, 1)))  # fmt: skip


def _key_takers():
    import toy
    from jaxdiv import metrics, recipes
    from jaxdiv.pipelines import tpso
    from jaxdiv.testing import example_pipeline
    from toy.mlp import init_mlp

    x = jax.random.normal(jax.random.key(0), (6, 4))
    ring, gmm = toy.ring_of_classes(), toy.GaussianMixture(jnp.eye(2), jnp.ones(2))
    return {
        "GaussianMixture.sample": ("key", lambda k: gmm.sample(k, 3)),
        "ConditionalGaussianMixture.sample": ("key",
                                              lambda k: ring.sample(k, 3, ring.condition(0))),
        "two_moons": ("key", lambda k: toy.two_moons(k, 3)),
        "init_mlp": ("key", lambda k: init_mlp(k, hidden=4, depth=1)),
        "metrics.kid": ("`key`", lambda k: metrics.kid(x, x, subset_size=3, key=k)),
        "metrics.spp": ("`key`", lambda k: metrics.spp(x, x[0], k, num_directions=2)),
        "pipe.generate": ("key", lambda k: example_pipeline().generate("a", key=k)),
        "tpso_conditions": ("key", lambda k: tpso.tpso_conditions(
            example_pipeline(), ["a"], 2, k, projection=False, max_steps=1)),
        "spell_batched": ("key", lambda k: recipes.spell_batched(
            samplers.ddim(schedules.edm(), 2), lambda x, t, c: x, x, key=k, radius=1.0,
            batch_size=3)),
        "tpso_null_pool": ("key", lambda k: tpso.tpso_null_pool(
            example_pipeline(), k, size=2, projection=False, max_steps=1)),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["GaussianMixture.sample", "ConditionalGaussianMixture.sample",
                                  "two_moons", "init_mlp", "metrics.kid", "metrics.spp",
                                  "pipe.generate", "tpso_conditions", "tpso_null_pool",
                                  "spell_batched"])
def test_public_functions_name_a_bad_key(name):
    """A seed or a batch of keys where one key is expected: an error naming the argument,
    before any work (JAX's own says 'invalid PRNG key data' or 'fold_in accepts a single
    key')."""
    arg, call = _key_takers()[name]
    with pytest.raises(TypeError, match=rf"^{arg} must be a PRNG key \(jax.random.key\(seed\)\), "
                                        r"got int 3$"):  # fmt: skip
        call(3)
    with pytest.raises(ValueError, match=rf"^{arg} must be one PRNG key .* shape \(2,\)$"):
        call(jax.random.split(jax.random.key(0), 2))
