"""SPELL's previous-batch shields: the shield memory and ``spell_batched``."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
import toy
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance.spell import SpellState, memory_vectors, spell
from jaxdiv.recipes import spell_batched

SCH = schedules.edm()
SMP = samplers.edm(SCH, 8)
GM = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.05**2]))
DEN = GM.denoiser(SCH)


def _dist(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a[:, None] - b[None], axis=-1)


def test_batches_share_one_compile_and_memory_holds_the_outputs():
    noise = jax.random.normal(jax.random.key(0), (8, 2))
    before = jaxdiv.compile_count()
    out = spell_batched(SMP, DEN, noise, key=jax.random.key(1), radius=0.1, batch_size=2)
    assert jaxdiv.compile_count() - before <= 1
    assert sorted(out.state) == ["spell"]
    state = out.state["spell"]
    assert isinstance(state, SpellState) and int(state.count) == 8
    np.testing.assert_array_equal(np.asarray(memory_vectors(state)), np.asarray(out.x0))
    # a second call with the same configuration reuses the program
    spell_batched(SMP, DEN, noise, key=jax.random.key(2), radius=0.2, batch_size=2)
    assert jaxdiv.compile_count() - before <= 1


def test_one_by_one_second_sample_avoids_the_first():
    """Fig. 6 setting with B = 1: sample 2's only shield is sample 1, so it ends >= r away,
    while the unguided second sample (same noise and key) is much closer. Sample 1 has no
    shield yet: bitwise identical to the unguided first sample."""
    r = 0.15
    den = toy.GaussianMixture(jnp.zeros((1, 2)), jnp.array([0.01**2])).denoiser(SCH)
    noise = jax.random.normal(jax.random.key(3), (2, 2))
    out = spell_batched(SMP, den, noise, key=jax.random.key(4), radius=r, batch_size=1,
                        intra_batch=False)  # fmt: skip
    keys = [jax.random.fold_in(jax.random.key(4), j) for j in range(2)]
    plain = [jaxdiv.sample(SMP, den, noise[j : j + 1], key=keys[j]).x0 for j in range(2)]
    np.testing.assert_array_equal(np.asarray(out.x0[:1]), np.asarray(plain[0]))
    assert _dist(plain[1], plain[0])[0, 0] < 0.5 * r
    assert _dist(out.x0[1:], out.x0[:1])[0, 0] >= r * (1 - 1e-5)


def test_later_batches_are_pushed_away_from_earlier_ones(record_property):
    """24 samples in batches of 4 from a tight blob: the share of samples with an earlier
    output closer than r drops (not to 0: memory shields overlap, see test_spell.py)."""
    r = 0.08
    noise = jax.random.normal(jax.random.key(5), (24, 2))
    key = jax.random.key(6)
    guided = spell_batched(SMP, DEN, noise, key=key, radius=r, batch_size=4).x0
    plain = jnp.concatenate([
        jaxdiv.sample(SMP, DEN, noise[4 * j : 4 * j + 4], key=jax.random.fold_in(key, j)).x0
        for j in range(6)
    ])  # fmt: skip

    def share(x):
        d = _dist(x, x)
        earlier = np.tril(np.ones_like(d, bool), -1)
        close = np.any((d < r * (1 - 1e-5)) & earlier, axis=1)
        return float(close[4:].mean())

    rates = {"unguided": share(plain), "spell": share(guided)}
    record_property("share_close_to_earlier", rates)
    assert rates["unguided"] > 0.5
    assert rates["spell"] < 0.5 * rates["unguided"]


def test_ring_buffer_keeps_the_latest_outputs():
    noise = jax.random.normal(jax.random.key(7), (6, 2))
    out = spell_batched(SMP, DEN, noise, key=jax.random.key(8), radius=0.1, batch_size=2,
                        memory_size=4)  # fmt: skip
    mem = memory_vectors(out.state["spell"])
    np.testing.assert_array_equal(np.asarray(mem), np.asarray(out.x0[2:]))


def test_guidance_state_continues_a_previous_call():
    """spell_batched == the same sample() calls chained through guidance_state by hand."""
    noise = jax.random.normal(jax.random.key(9), (4, 2))
    key = jax.random.key(10)
    out = spell_batched(SMP, DEN, noise, key=key, radius=0.1, batch_size=2, memory_size=4)
    term = spell(0.1, memory_size=4)
    a = jaxdiv.sample(SMP, DEN, noise[:2], key=jax.random.fold_in(key, 0), guidance=term)
    b = jaxdiv.sample(SMP, DEN, noise[2:], key=jax.random.fold_in(key, 1), guidance=term,
                      guidance_state=a.state)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.x0), np.asarray(jnp.concatenate([a.x0, b.x0])))


def _eq5(x0, shields, r):
    """Eq. 5 in float64 NumPy: Delta_i = sum_k relu(r / |x_i - z_k| - 1)(x_i - z_k), and the
    number of shields strictly within r (``shields`` (B, K, d): per-sample shield sets)."""
    diff = x0[:, None] - shields
    dist = np.linalg.norm(diff, axis=-1)
    assert dist.min() > 0 and np.abs(dist - r).min() > 1e-5  # no ties: the mask is exact
    inside = dist < r
    coef = np.where(inside, r / dist - 1.0, 0.0)
    return np.einsum("bk,bkd->bd", coef, diff), inside.sum(axis=1)


def test_chained_with_cfg_and_condition():
    """Other terms (CFG) chain before SPELL; the condition is split per batch. At every
    step of each batch the traced x0_hat is CFG's D_u + w (D_c - D_u) at the traced x_t
    (recomputed here), moved by SPELL's Eq. 5/7 computed on that CFG-combined x0_hat with
    the other batch member and the earlier batches' outputs as shields."""
    r, w = 0.25, 2.0
    den = lambda x, t, c: DEN(x, t) + 0.01 * c
    noise = jax.random.normal(jax.random.key(11), (4, 2))
    cond = 1.0 + 0.3 * jax.random.normal(jax.random.key(15), (4, 2))  # per-sample shifts
    out = spell_batched(SMP, den, noise, key=jax.random.key(12), radius=r, batch_size=2,
                        cond=cond, guidance=guidance.cfg(w), trace=True)  # fmt: skip
    assert sorted(out.state) == ["cfg", "spell"] and int(out.state["spell"].count) == 4
    assert len(out.traces) == 2 and out.traces[0].info["spell"].active.shape == (8, 2)
    x0 = np.asarray(out.x0, np.float64)
    active_steps = 0
    for j, tr in enumerate(out.traces):
        c = cond[2 * j : 2 * j + 2]
        for i in range(SMP.num_steps):
            x, t = tr.x[i], tr.t[i]
            d_c, d_u = den(x, t, c), den(x, t, jnp.zeros_like(c))
            cfg_x0 = np.asarray(d_u + w * (d_c - d_u), np.float64)
            rms = np.sqrt(np.mean(np.asarray(d_c - d_u, np.float64) ** 2, axis=1)).mean()
            np.testing.assert_allclose(tr.info["cfg"].guidance_norm[i], rms, rtol=1e-4)
            # shields: the other member's CFG-combined x0_hat, then the earlier outputs
            shields = np.stack([cfg_x0[::-1]] + [np.broadcast_to(p, (2, 2)) for p in x0[: 2 * j]],
                               axis=1)  # fmt: skip
            delta, count = _eq5(cfg_x0, shields, r)
            info = jax.tree.map(lambda a, i=i: np.asarray(a[i]), tr.info["spell"])
            np.testing.assert_array_equal(info.num_active_shields, count)
            np.testing.assert_array_equal(info.active, count > 0)
            np.testing.assert_allclose(tr.x0_hat[i], cfg_x0 + delta, rtol=1e-5, atol=1e-5)
            np.testing.assert_allclose(info.delta_norm, np.linalg.norm(delta, axis=1),
                                       rtol=1e-4, atol=1e-6)  # fmt: skip
            active_steps += int(info.active.any())
    assert active_steps > 0  # SPELL did act
    # batch 0 (B = 2, no memory yet) ends >= r apart; CFG alone would leave it closer
    plain = jaxdiv.sample(SMP, den, noise[:2], key=jax.random.fold_in(jax.random.key(12), 0),
                          cond=cond[:2], guidance=guidance.cfg(w)).x0  # fmt: skip
    assert _dist(plain[:1], plain[1:])[0, 0] < r
    assert _dist(out.x0[:1], out.x0[1:2])[0, 0] >= r * (1 - 1e-5)


def test_feature_memory_stores_features():
    a = jnp.array([[1.0], [2.0]])
    phi = lambda x: x @ a
    noise = jax.random.normal(jax.random.key(13), (4, 2))
    out = spell_batched(SMP, DEN, noise, key=jax.random.key(14), radius=0.05, batch_size=2,
                        feature_map=phi)  # fmt: skip
    np.testing.assert_allclose(memory_vectors(out.state["spell"]), phi(out.x0), rtol=1e-5,
                               atol=1e-6)  # fmt: skip


def test_bad_inputs():
    noise = jnp.zeros((5, 2))
    with pytest.raises(ValueError, match="multiple of batch_size"):
        spell_batched(SMP, DEN, noise, key=jax.random.key(0), radius=0.1, batch_size=2)
    with pytest.raises(TypeError, match="batch_size"):
        spell_batched(SMP, DEN, noise, key=jax.random.key(0), radius=0.1, batch_size=2.0)
    with pytest.raises(TypeError, match="SpellState"):
        memory_vectors((jnp.zeros((2, 2)), 0))
    # a cond with more rows than noise (e.g. [cond; null] stacked) was sliced silently
    with pytest.raises(ValueError, match=r"cond must have noise's 4 rows .* got \[8\]"):
        spell_batched(SMP, DEN, noise[:4], key=jax.random.key(0), radius=0.1, batch_size=2,
                      cond=jnp.zeros((8, 3)))  # fmt: skip


def test_groups_run_independent_sequences_each_as_its_own_call():
    """``spell_batched(groups=3)``: each group's rows are generated batch by batch with a
    memory of their own, as a call with those rows alone; the groups do not shield each
    other (without groups they do: the negative control)."""
    g, per, bs = 3, 6, 2
    noise = jax.random.normal(jax.random.key(0), (g * per, 2)) * 0.3
    cond = jax.random.normal(jax.random.key(4), (g * per, 2))
    den = lambda x, t, c: DEN(x, t, None) + 0.1 * c  # noqa: E731
    kw = dict(key=jax.random.key(1), radius=0.4, batch_size=bs, trace=True)
    out = spell_batched(SMP, den, noise, cond=cond, groups=g, **kw)
    assert out.state["spell"].count.tolist() == [per] * g
    assert len(out.traces) == per // bs and out.traces[0].x.shape[:3] == (g, 8, bs)
    for k in range(g):
        rows = slice(k * per, (k + 1) * per)
        own = spell_batched(SMP, den, noise[rows], cond=cond[rows], **kw)
        want = np.asarray(own.x0)
        np.testing.assert_allclose(out.x0[rows], want, rtol=0, atol=1e-5 * np.abs(want).max())
        mem = jax.tree.map(lambda a, k=k: a[k], out.state["spell"])
        np.testing.assert_allclose(memory_vectors(mem), memory_vectors(own.state["spell"]),
                                   rtol=0, atol=1e-5 * np.abs(want).max())  # fmt: skip
    whole = spell_batched(SMP, den, noise, cond=cond, **kw)  # one sequence: groups shield
    assert float(jnp.abs(whole.x0[per:] - out.x0[per:]).max()) > 1e-2
    with pytest.raises(ValueError, match=r"noise's leading dimension \(18\) must be a positive "
                                         r"multiple of groups x batch_size \(3 x 4\)"):  # fmt: skip
        spell_batched(SMP, den, noise, cond=cond, key=jax.random.key(1), radius=0.4,
                      batch_size=4, groups=3)  # fmt: skip


def test_groups_with_a_radius_each(monkeypatch):
    """``spell_batched(radius=[r0, r1, r2], groups=3)``: each group's sequence with its own
    radius (and the reference set, indexed once for all groups), as a call with its rows
    and radius alone."""
    g, per, bs, radii = 3, 4, 2, (0.1, 0.4, 0.8)
    noise = jnp.tile(jax.random.normal(jax.random.key(0), (per, 2)) * 0.3, (g, 1))
    ref = jax.random.normal(jax.random.key(5), (16, 2)) * 0.5  # one index for all groups
    kw = dict(key=jax.random.key(1), batch_size=bs, reference=ref)
    from jaxdiv.guidance.spell import term as spell_term

    built = []
    real_build = spell_term.build_index
    monkeypatch.setattr(spell_term, "build_index", lambda *a: built.append(1) or real_build(*a))
    out = spell_batched(SMP, DEN, noise, radius=jnp.array(radii), groups=g, **kw)
    assert len(built) == 1  # one index for the three groups' terms
    monkeypatch.undo()
    for k, r in enumerate(radii):
        want = np.asarray(spell_batched(SMP, DEN, noise[:per], radius=r, **kw).x0)
        np.testing.assert_allclose(out.x0[k * per:(k + 1) * per], want, rtol=0,
                                   atol=1e-5 * np.abs(want).max())  # fmt: skip
    # the same noise in every group: only the radii tell them apart
    assert float(jnp.abs(out.x0[2 * per:] - out.x0[:per]).max()) > 1e-2
    with pytest.raises(ValueError, match=r"radius holds 2 radii but groups=3: give one radius, "
                                         r"or one per group"):  # fmt: skip
        spell_batched(SMP, DEN, noise, radius=[0.1, 0.2], groups=g, **kw)
