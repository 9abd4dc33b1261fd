"""What an outside read of the code against the papers found (issue 10, item 7): each test
failed before its fix."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, predictions, samplers, schedules
from jaxdiv.guidance.spell import radius_search, spell_delta
from jaxdiv.guidance.spell import term as spell_term
from toy.encoder import sphere_encoder


def test_spell_guarantee_needs_all_shields_disjoint():
    """Only the first shield contains x0_hat, yet the push lands inside the second: the
    guarantee needs *all* shields pairwise disjoint (the module docstring says so now)."""
    centres = jnp.array([[0.0, 0.0], [1.6, 0.0]])
    x0 = jnp.array([[0.5, 0.0]])
    # x0_hat is 1.1 from the second centre: only the first shield contains it
    out = jaxdiv.sample(samplers.ddim(schedules.edm(), 1), lambda x, t, c: x * 0 + x0,
                        jnp.zeros((1, 2)), key=jax.random.key(0),
                        guidance=guidance.spell(radius=1.0, reference=centres))  # fmt: skip
    np.testing.assert_allclose(out.x0, [[1.0, 0.0]], atol=1e-6)
    assert float(jnp.linalg.norm(out.x0[0] - centres[1])) == pytest.approx(0.6, abs=1e-6)
    assert "all shields are pairwise disjoint" in spell_term.__doc__


@pytest.mark.parametrize("block_size", [9, 7, 15])
def test_radius_search_odd_blocks_meet_the_memory_bound(block_size):
    b, d = 4, 8
    exact_bytes = 4 * b * 3 * d                      # room for 3 shields per exact tile
    sub = radius_search._sub_block(block_size, b, d, exact_bytes)
    assert block_size % sub == 0 and 4 * b * sub * d <= exact_bytes
    # and the blockwise sum is still Eq. 5 exactly
    key_q, key_z = jax.random.split(jax.random.key(0))
    q = jax.random.normal(key_q, (b, d))
    z = q[jnp.array([0, 1, 1, 2])] + 0.3 * jax.random.normal(key_z, (4, d))
    z = jnp.concatenate([z, 5 + jax.random.normal(key_z, (30, d))])
    idx = radius_search.build_index(z, block_size)
    rep = radius_search.repulsion(q, idx, 1.0, exact_bytes=exact_bytes)
    np.testing.assert_allclose(rep.delta, spell_delta(q, 1.0, z, intra_batch=False),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_flow_predictions_need_a_flow_process():
    model = lambda x, t, c: jnp.zeros_like(x)
    predictions.as_denoiser(model, schedules.flow(shift=3.0), "flow")
    for sched in (schedules.vp_linear(), schedules.edm()):
        with pytest.raises(ValueError, match="alpha\\(t\\) \\+ sigma\\(t\\) = 1"):
            predictions.as_denoiser(model, sched, "flow")


def test_gass_on_heun_runs_at_both_evaluations_with_fresh_targets():
    """Documented behaviour: an active GASS step on a Heun sampler optimises both the
    Euler prediction and Heun's correction (twice the work of an Euler sampler), each with
    its own targets."""
    enc0 = sphere_encoder(jax.random.key(0), 2)
    calls = []

    def enc(x):
        jax.debug.callback(lambda: calls.append(1))
        return enc0(x)

    def run(sampler):
        calls.clear()
        g = guidance.gass(enc, enc0.text_emb, r_dep=0.1, r_ind=0.1, lr=0.05, max_iters=2,
                          patience=5, steps=[0])  # fmt: skip
        out = jaxdiv.sample(sampler, lambda x, t, c: x / (1 + t**2),
                            jax.random.normal(jax.random.key(1), (4, 2)), key=jax.random.key(2),
                            guidance=g, trace=True)  # fmt: skip
        out.x0.block_until_ready()
        jax.effects_barrier()
        return len(calls), out

    sch = schedules.edm()
    n_euler, _ = run(samplers.edm(sch, 4, heun=False))
    n_heun, out = run(samplers.edm(sch, 4))
    assert n_euler > 0 and n_heun == 2 * n_euler
    assert out.trace.active["gass"].astype(int).tolist() == [1, 0, 0, 0]
