"""The guidance protocol: hook order, state threading, chain, windows, trace, CFG."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance import GuidanceTerm


def cond_den(x, t, c):
    """x0_hat = condition (a denoiser whose output reveals which condition it got)."""
    return jnp.zeros_like(x) + c


def shift_x0(delta):
    """x0 term adding ``delta``; counts its evaluations in its state."""
    return GuidanceTerm(
        lambda x, cond, key: jnp.int32(0),
        lambda s, x0, ctx: (x0 + delta, s + 1, {"count": s, "level": ctx.noise_level}),
        "x0",
    )


def scale_cond(factor):
    return GuidanceTerm(lambda x, c, k: (), lambda s, c, ctx: (c * factor, s, ()), "condition")


def test_hook_order_condition_then_denoiser_then_x0():
    s = samplers.flow_euler(schedules.flow(), 3)
    c = jnp.ones((2, 2))
    # chain order is irrelevant across hooks: condition first, then CFG, then x0 terms
    g = guidance.chain(shift_x0(1.0), guidance.cfg(3.0), scale_cond(2.0))
    out = jaxdiv.sample(s, cond_den, jnp.zeros((2, 2)), key=jax.random.key(0), cond=c, guidance=g)
    # D_c = 2, D_u = 0 -> 0 + 3 * 2 = 6, then + 1
    np.testing.assert_allclose(np.asarray(out.x0), 7.0)


def test_x0_terms_apply_in_chain_order():
    scale = GuidanceTerm(lambda x, c, k: (), lambda s, x0, ctx: (2 * x0, s, ()), "x0")
    s = samplers.flow_euler(schedules.flow(), 2)
    c = jnp.ones((1, 1))
    a = jaxdiv.sample(s, cond_den, jnp.zeros((1, 1)), key=jax.random.key(0), cond=c,
                      guidance=guidance.chain(shift_x0(1.0), scale)).x0  # fmt: skip
    b = jaxdiv.sample(s, cond_den, jnp.zeros((1, 1)), key=jax.random.key(0), cond=c,
                      guidance=guidance.chain(scale, shift_x0(1.0))).x0  # fmt: skip
    assert float(a[0, 0]) == 4.0 and float(b[0, 0]) == 3.0


def test_state_is_threaded_through_every_evaluation_and_returned(gmm2):
    s = samplers.edm(schedules.edm(), 6)
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((3, 2)), key=jax.random.key(0),
                        guidance=shift_x0(0.0), trace=True)  # fmt: skip
    assert int(out.state["term"]) == s.nfe == 11
    # the trace keeps the first evaluation of each step: counts 0, 2, 4, ...
    np.testing.assert_array_equal(np.asarray(out.trace.info["term"]["count"]), [0, 2, 4, 6, 8, 10])
    np.testing.assert_allclose(np.asarray(out.trace.info["term"]["level"]),
                               np.asarray(s.times[:-1]))  # fmt: skip
    # continuing from a returned state
    again = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((3, 2)), key=jax.random.key(0),
                          guidance=shift_x0(0.0), guidance_state=out.state)  # fmt: skip
    assert int(again.state["term"]) == 22


def test_trace_contents(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 7)
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.ones((5, 2)), key=jax.random.key(0),
                        trace=True)  # fmt: skip
    assert out.trace.x.shape == (7, 5, 2) and out.trace.x0_hat.shape == (7, 5, 2)
    np.testing.assert_array_equal(np.asarray(out.trace.t), np.asarray(s.times[:-1]))
    np.testing.assert_array_equal(np.asarray(out.trace.x[0]), np.ones((5, 2)))
    assert out.trace.info == {} and out.trace.active == {}
    assert jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.ones((5, 2)),
                         key=jax.random.key(0)).trace is None  # fmt: skip


@pytest.mark.parametrize(
    "make",
    [lambda: samplers.ddim(schedules.vp_linear(), 20), lambda: samplers.edm(schedules.edm(), 20),
     lambda: samplers.flow_euler(schedules.flow(), 20)],
)  # fmt: skip
def test_window_by_noise_level_means_the_same_on_every_process(make):
    s = make()
    lo, hi = 0.5, 4.0
    out = jaxdiv.sample(s, cond_den, jnp.zeros((2, 1)), key=jax.random.key(0),
                        cond=jnp.ones((2, 1)),
                        guidance=guidance.window(shift_x0(1.0), noise_level=(lo, hi)),
                        trace=True)  # fmt: skip
    level = np.asarray(s.schedule.noise_level(s.times[:-1]))
    active = np.asarray(out.trace.active["term"])
    np.testing.assert_array_equal(active, (level > lo) & (level <= hi))
    assert active.any() and not active.all()
    # inactive steps report zero info
    counts = np.asarray(out.trace.info["term"]["count"])
    assert np.all(counts[~active] == 0)


def test_window_by_steps_and_t(gmm2):
    s = samplers.edm(schedules.edm(), 8)
    g = guidance.window(shift_x0(0.0), steps=[0, 3, 7])
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((2, 2)), key=jax.random.key(0),
                        guidance=g, trace=True)  # fmt: skip
    np.testing.assert_array_equal(np.where(out.trace.active["term"])[0], [0, 3, 7])
    # Heun's second evaluation of steps 0 and 3 runs the term too (same step index)
    assert int(out.state["term"]) == 5
    g = guidance.window(shift_x0(0.0), t=(1.0, 10.0))
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((2, 2)), key=jax.random.key(0),
                        guidance=g, trace=True)  # fmt: skip
    t = np.asarray(s.times[:-1])
    np.testing.assert_array_equal(np.asarray(out.trace.active["term"]), (t > 1) & (t <= 10))


def _count_init(x, cond, key):
    return jnp.int32(0)


def _shift_apply(delta, s, x0, ctx):
    return x0 + delta, s + 1, ()


def test_window_of_a_chain_or_per_group_windows_each_term(gmm2):
    s = samplers.edm(schedules.edm(), 8)
    g = guidance.window(guidance.chain(a=shift_x0(0.0), b=shift_x0(1.0)), steps=[0, 3])
    assert g.names == ("a", "b")
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((2, 2)), key=jax.random.key(0),
                        guidance=g, trace=True)  # fmt: skip
    for name in ("a", "b"):  # two active steps, two Heun evaluations each
        np.testing.assert_array_equal(np.where(out.trace.active[name])[0], [0, 3])
        assert int(out.state[name]) == 4
    shifts = [GuidanceTerm(_count_init, jax.tree_util.Partial(_shift_apply, jnp.float32(d)), "x0")
              for d in (0.0, 1.0)]  # one structure, two values
    per = guidance.window(guidance.per_group(shifts), steps=[1])
    out = jaxdiv.sample(s, gmm2.denoiser(s.schedule), jnp.zeros((4, 2)), key=jax.random.key(0),
                        guidance=per, trace=True)  # fmt: skip
    np.testing.assert_array_equal(np.asarray(out.state["term"]), [2, 2])


def test_window_can_be_built_inside_jit(gmm2):
    s = samplers.edm(schedules.edm(), 4)

    @jax.jit
    def run(noise):
        g = guidance.window(shift_x0(0.0), steps=[1, 2])
        return jaxdiv.sample(s, gmm2.denoiser(s.schedule), noise, key=jax.random.key(0),
                             guidance=g).state["term"]  # fmt: skip

    assert int(run(jnp.zeros((2, 2)))) == 4  # two active steps, two Heun evaluations each


def test_window_and_chain_errors():
    with pytest.raises(ValueError, match="at least one"):
        guidance.window(shift_x0(1.0))
    with pytest.raises(ValueError, match="pair"):
        jaxdiv.sample(samplers.edm(schedules.edm(), 3), cond_den, jnp.zeros((1, 1)),
                      key=jax.random.key(0), cond=jnp.ones((1, 1)),
                      guidance=guidance.window(shift_x0(1.0), t=(1.0,)))  # fmt: skip
    with pytest.raises(ValueError, match="only one can"):
        guidance.chain(guidance.cfg(2.0), guidance.cfg(3.0))
    with pytest.raises(ValueError, match="hook"):
        guidance.chain(GuidanceTerm(None, None, "x_t"))
    with pytest.raises(TypeError, match="GuidanceTerm"):
        guidance.chain(shift_x0(1.0), "spell")


@pytest.mark.parametrize("hook, apply, error, match", [
    ("x0", lambda s, x0, ctx: (x0, s), TypeError, r"apply must return \(value, state, info\), "
                                                 r"got a tuple of 2"),
    ("x0", lambda s, x0, ctx: (x0[:1], s, None), ValueError,
     r"apply's x0_hat must have the shape of its input \(3, 2\), got \(1, 2\)"),
    ("x0", lambda s, x0, ctx: (x0, (s, s), None), ValueError,
     r"apply's state must have the shape of init's \(\), got \(\(\), \(\)\)"),
    ("x0", lambda s, x0, ctx: (x0, jnp.zeros(2), None), ValueError,
     r"apply's state must have the shape of init's \(\), got \(2,\)"),
    ("x0", lambda s, x0, ctx: (x0, s.astype(jnp.int32), None), TypeError,
     r"apply's state must keep init's dtypes float32, got int32 \(cast it"),
    ("condition", lambda s, c, ctx: (c[:, :1], s, None), ValueError,
     r"apply's cond must have the shape of its input \(3, 2\), got \(3, 1\)"),
    ("denoiser", lambda s, den, ctx: (den(ctx.x, ctx.cond)[0], s, None), ValueError,
     r"apply's x0_hat must have the shape of its input \(3, 2\), got \(2,\)"),
])  # fmt: skip
def test_a_user_terms_slips_are_named_at_trace_time(hook, apply, error, match):
    """What a hand-written term returns is checked against what it got (were scan's carry
    message, a broadcasting error or 'not enough values to unpack')."""
    term = GuidanceTerm(lambda x, c, k: jnp.float32(0), apply, hook, "mine")
    with pytest.raises(error, match=rf"^guidance term 'mine' \(hook '{hook}'\): {match}"):
        jaxdiv.sample(samplers.edm(schedules.edm(), 2), cond_den, jnp.zeros((3, 2)),
                      key=jax.random.key(0), cond=jnp.ones((3, 2)), guidance=term)  # fmt: skip


@pytest.mark.parametrize("w, expected", [(1.0, "cond"), (0.0, "uncond"), (4.0, "mix")])
def test_cfg_scale_limits(w, expected, gmm2):
    """scale 1 is the conditional denoiser, scale 0 the unconditional one."""

    def den(x, t, c):  # condition shifts the GMM posterior mean
        return gmm2.posterior_mean(x, 1.0, t) + c

    s = samplers.edm(schedules.edm(), 6)
    noise = jax.random.normal(jax.random.key(0), (4, 2))
    c = jax.random.normal(jax.random.key(1), (4, 2))
    got = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=c, guidance=guidance.cfg(w)).x0
    cond_run = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=c).x0
    uncond_run = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=jnp.zeros_like(c)).x0
    if expected == "cond":
        np.testing.assert_allclose(np.asarray(got), np.asarray(cond_run), rtol=1e-5, atol=1e-5)
    elif expected == "uncond":
        np.testing.assert_allclose(np.asarray(got), np.asarray(uncond_run), rtol=1e-5, atol=1e-5)
    else:  # D_u + w (D_c - D_u), checked at every step on the x_t the sampler saw
        out = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=c,
                            guidance=guidance.cfg(w), trace=True)  # fmt: skip
        np.testing.assert_array_equal(np.asarray(out.x0), np.asarray(got))
        for i in range(s.num_steps):
            x, t = out.trace.x[i], out.trace.t[i]
            d_c, d_u = den(x, t, c), den(x, t, jnp.zeros_like(c))
            want = d_u + w * (d_c - d_u)
            np.testing.assert_allclose(out.trace.x0_hat[i], want, rtol=1e-5, atol=1e-5)
        # for this denoiser the formula is D + w c: the plain sampler with condition w c
        shifted = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=w * c).x0
        np.testing.assert_allclose(np.asarray(got), np.asarray(shifted), rtol=1e-5, atol=1e-4)
        assert float(jnp.abs(got - cond_run).max()) > 1.0


def test_cfg_calls_the_model_once_on_a_doubled_batch():
    seen = []

    def den(x, t, c):
        seen.append(x.shape)
        return jnp.zeros_like(x) + c

    null = jnp.full((1, 2), -1.0)
    out = jaxdiv.sample(samplers.flow_euler(schedules.flow(), 2), den, jnp.zeros((3, 2)),
                        key=jax.random.key(0), cond=jnp.ones((3, 2)),
                        guidance=guidance.cfg(2.0, null_cond=null))  # fmt: skip
    assert set(seen) == {(6, 2)}
    np.testing.assert_allclose(np.asarray(out.x0), -1.0 + 2.0 * 2.0)
    with pytest.raises(ValueError, match="needs a condition"):
        jaxdiv.sample(samplers.flow_euler(schedules.flow(), 2), den, jnp.zeros((3, 2)),
                      key=jax.random.key(0), guidance=guidance.cfg(2.0))  # fmt: skip


def test_couples_batch_names_the_methods_whose_samples_act_on_each_other():
    """couples_batch (used by pipe.generate to refuse mixing prompts in one batch) is True
    exactly where a sample's update reads the other samples: checked against the terms'
    outputs on a batch whose second half is changed."""
    import toy

    enc = toy.sphere_encoder(jax.random.key(0), 2)
    ref = jax.random.normal(jax.random.key(1), (4, 2))
    terms = {
        "particle": guidance.particle(2.0),
        "spell": guidance.spell(1.5),
        "spell_reference_only": guidance.spell(1.5, reference=ref, intra_batch=False),
        "gass": guidance.gass(enc, enc.text_emb, num_directions=2, num_active=2, r_dep=0.5,
                             r_ind=0.5, lr=0.2),
        "cfg": guidance.cfg(3.0),
        "cads": guidance.cads(),
        "interval": guidance.interval(3.0, 0.1, 50.0),
        "windowed_particle": guidance.window(guidance.particle(2.0), noise_level=(0.1, 50.0)),
        "windowed_cfg": guidance.window(guidance.cfg(3.0), steps=[0, 1]),
        "contextual": guidance.contextual(1.0),
    }
    want = {"particle", "spell", "gass", "windowed_particle", "contextual"}
    assert {k for k, t in terms.items() if guidance.couples_batch(t)} == want
    # the truth for the x0 / condition / denoiser terms: does the first half's output move
    # when the second half of the noise changes?
    s = samplers.ddim(schedules.edm(), 3)
    gm = toy.GaussianMixture(jnp.array([[0.0, 0.0], [3.0, 0.0]]), jnp.array([0.5, 0.5]))
    den = lambda x, t, c: gm.denoiser(s.schedule)(x, t, None) + 0.1 * c  # noqa: E731
    z = jax.random.normal(jax.random.key(2), (6, 2))
    z2 = z.at[3:].add(0.7)
    cond = jnp.ones((6, 2))
    for name, term in terms.items():
        if name == "contextual":  # a model hook: tests/test_contextual_repulsion.py
            continue
        a, b = (jaxdiv.sample(s, den, x, key=jax.random.key(3), cond=cond, guidance=term).x0[:3]
                for x in (z, z2))  # fmt: skip
        moved = float(jnp.abs(a - b).max()) > 1e-6
        assert moved == (name in want), name


def test_needs_batch_names_the_methods_idle_on_a_lone_sample():
    """needs_batch (pipe.generate refuses it with n=1) is True exactly where a batch of one
    sample comes out as the unguided run: PG, SPELL without reference, contextual. GASS
    couples the batch yet moves a lone sample; SPELL against a reference does too."""
    import toy

    enc = toy.sphere_encoder(jax.random.key(0), 2)
    ref = jax.random.normal(jax.random.key(1), (4, 2))
    terms = {
        "particle": guidance.particle(2.0),
        "spell": guidance.spell(1.5),
        "spell_with_reference": guidance.spell(1.5, reference=ref),
        "gass": guidance.gass(enc, enc.text_emb, num_directions=1, num_active=2, r_dep=0.5,
                             r_ind=0.5, lr=0.2),
        "cads": guidance.cads(),
        "windowed_particle": guidance.window(guidance.particle(2.0), steps=[0, 1]),
        "contextual": guidance.contextual(1.0),
    }
    want = {"particle", "spell", "windowed_particle", "contextual"}
    assert {k for k, t in terms.items() if guidance.needs_batch(t)} == want
    # a memory of earlier calls' samples (guidance_state=) is something to repel from
    assert not guidance.needs_batch(guidance.spell(1.5, memory_size=4))
    s = samplers.ddim(schedules.edm(), 3)
    gm = toy.GaussianMixture(jnp.array([[0.0, 0.0], [3.0, 0.0]]), jnp.array([0.5, 0.5]))
    den = lambda x, t, c: gm.denoiser(s.schedule)(x, t, None) + 0.1 * c  # noqa: E731
    # a condition that is not constant: CADS's rescaling returns a constant one unchanged
    z, cond = jax.random.normal(jax.random.key(2), (1, 2)), jnp.array([[1.0, -0.5]])
    run = lambda g: jaxdiv.sample(s, den, z, key=jax.random.key(3), cond=cond, guidance=g).x0  # noqa: E731
    plain = run(None)
    for name, term in terms.items():
        if name == "contextual":  # a model hook: tests/test_contextual_repulsion.py
            continue
        idle = bool(jnp.array_equal(run(term), plain))
        assert idle == (name in want), name
