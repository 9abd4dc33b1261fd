"""``jaxdiv.sample(..., groups=G)``: G batches that do not act on each other, one program.

The reference is the documented equivalence: group ``g`` equals its own call of ``sample``
(same key, or its own key). The negative controls show the test could fail: the same
chain run ungrouped moves the first group when another group's noise moves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules

G, N, D = 3, 4, 2  # groups, samples per group, dimension


def _setup(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 8, eta=1.0)  # stochastic: per-sample streams
    post = gmm2.denoiser(s.schedule)
    den = lambda x, t, c: post(x, t, None) + 0.3 * c  # noqa: E731
    noise = jax.random.normal(jax.random.key(0), (G * N, D))
    cond = jax.random.normal(jax.random.key(1), (G * N, D))
    coupled = guidance.chain(guidance.cfg(2.0), guidance.spell(0.8, intra_batch=True),
                             guidance.particle(2.0))  # fmt: skip
    return s, den, noise, cond, coupled


def _rows(g):
    return slice(g * N, (g + 1) * N)


def _close(got, want):
    """Two programs (one vmapped over the groups, one not) round differently: measured up
    to 1.3e-6 of the values' scale under XLA's default codegen, 4e-7 under -O0."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("per_group_keys", [False, True])
def test_each_group_is_its_own_call(gmm2, per_group_keys):
    s, den, noise, cond, coupled = _setup(gmm2)
    key = jax.random.key(5)
    keys = jax.random.split(key, G) if per_group_keys else [key] * G
    out = jaxdiv.sample(s, den, noise, key=keys if per_group_keys else key, cond=cond,
                        guidance=coupled, groups=G, trace=True)  # fmt: skip
    assert out.x0.shape == noise.shape
    assert out.trace.x.shape == (G, 8, N, D) and out.trace.t.shape == (G, 8)
    for g in range(G):
        own = jaxdiv.sample(s, den, noise[_rows(g)], key=keys[g], cond=cond[_rows(g)],
                            guidance=coupled, trace=True)  # fmt: skip
        _close(out.x0[_rows(g)], own.x0)
        _close(out.trace.x0_hat[g], own.trace.x0_hat)
        for name in ("spell", "particle"):
            for got, want in zip(jax.tree.leaves(out.trace.info[name]),
                                 jax.tree.leaves(own.trace.info[name]), strict=True):  # fmt: skip
                _close(got[g], want)
    # negative control: run as one batch, the groups act on each other
    whole = jaxdiv.sample(s, den, noise, key=key, cond=cond, guidance=coupled).x0
    alone = jaxdiv.sample(s, den, noise[:N], key=key, cond=cond[:N], guidance=coupled).x0
    assert float(jnp.abs(whole[:N] - alone).max()) > 1e-2


def test_shared_key_repeats_streams_split_keys_do_not(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 8, eta=1.0)
    den = gmm2.denoiser(s.schedule)
    same = jnp.tile(jax.random.normal(jax.random.key(0), (N, D)), (G, 1))  # equal noise
    key = jax.random.key(2)
    shared = jaxdiv.sample(s, den, same, key=key, groups=G).x0
    _close(shared[_rows(1)], shared[_rows(0)])
    split = jaxdiv.sample(s, den, same, key=jax.random.split(key, G), groups=G).x0
    assert float(jnp.abs(split[_rows(1)] - split[_rows(0)]).max(axis=1).min()) > 1e-3


def test_a_group_does_not_see_the_others(gmm2):
    s, den, noise, cond, coupled = _setup(gmm2)
    kw = dict(key=jax.random.key(5), cond=cond, guidance=coupled)
    base = jaxdiv.sample(s, den, noise, groups=G, **kw).x0
    moved = noise.at[N:].set(jax.random.normal(jax.random.key(9), ((G - 1) * N, D)))
    other = jaxdiv.sample(s, den, moved, groups=G, **kw).x0
    np.testing.assert_array_equal(other[:N], base[:N])  # same program, same rows: exact
    assert float(jnp.abs(other[N:] - base[N:]).max()) > 1e-2
    ungrouped = jaxdiv.sample(s, den, noise, **kw).x0, jaxdiv.sample(s, den, moved, **kw).x0
    assert float(jnp.abs(ungrouped[1][:N] - ungrouped[0][:N]).max()) > 1e-3


def test_state_per_group_and_continued(gmm2):
    # SPELL's memory of earlier batches, kept per group and passed back
    s, den, noise, cond, _ = _setup(gmm2)
    g = guidance.spell(0.8, intra_batch=True, memory_size=2 * N)
    first = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, guidance=g,
                          groups=G)  # fmt: skip
    mem = jax.tree.leaves(first.state["spell"])
    assert all(leaf.shape[0] == G for leaf in mem)
    noise2 = jax.random.normal(jax.random.key(7), noise.shape)
    second = jaxdiv.sample(s, den, noise2, key=jax.random.key(2), cond=cond, guidance=g,
                           groups=G, guidance_state=first.state)  # fmt: skip
    for grp in range(G):
        own1 = jaxdiv.sample(s, den, noise[_rows(grp)], key=jax.random.key(1),
                             cond=cond[_rows(grp)], guidance=g)  # fmt: skip
        own2 = jaxdiv.sample(s, den, noise2[_rows(grp)], key=jax.random.key(2),
                             cond=cond[_rows(grp)], guidance=g,
                             guidance_state=own1.state)  # fmt: skip
        _close(second.x0[_rows(grp)], own2.x0)
    # the memory acts: without the first call's state the second batch lands elsewhere
    fresh = jaxdiv.sample(s, den, noise2, key=jax.random.key(2), cond=cond, guidance=g,
                          groups=G)  # fmt: skip
    assert float(jnp.abs(fresh.x0 - second.x0).max()) > 1e-3
    one = jax.tree.map(lambda a: a[0], first.state)  # a group's state, not the groups'
    with pytest.raises(ValueError, match=r"guidance_state\['spell'\].* expects shape \(3, 8"):
        jaxdiv.sample(s, den, noise2, key=jax.random.key(2), cond=cond, guidance=g,
                      groups=G, guidance_state=one)  # fmt: skip


def test_one_compile_for_new_strengths(gmm2):
    s, den, noise, cond, _ = _setup(gmm2)
    before = jaxdiv.compile_count()
    for w in (0.5, 1.0, 2.0):
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond,
                      guidance=guidance.particle(w), groups=G)  # fmt: skip
    assert jaxdiv.compile_count() - before == 1
    jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond,
                  guidance=guidance.particle(1.0), groups=N)  # fmt: skip
    assert jaxdiv.compile_count() - before == 2  # groups is structure


def test_bad_groups_are_named(gmm2):
    s, den, noise, cond, coupled = _setup(gmm2)
    kw = dict(cond=cond, guidance=coupled)
    with pytest.raises(ValueError, match=r"groups=5 must divide the batch: noise has 12 rows"):
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), groups=5, **kw)
    with pytest.raises(ValueError, match="groups must be an integer >= 1, got 0"):
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), groups=0, **kw)
    with pytest.raises(TypeError, match="groups must be an integer"):
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), groups=3.0, **kw)
    with pytest.raises(ValueError, match=r"batch of keys of shape \(4,\), or with groups=3 "
                                         r"one key per group \(jax.random.split\(key, 3\)\)"):
        jaxdiv.sample(s, den, noise, key=jax.random.split(jax.random.key(0), 4), groups=3, **kw)
    with pytest.raises(TypeError, match=r"key: 3 raw uint32 keys \(jax.random.PRNGKey's, shape "
                                        r"\(3, 2\)\); one key per group must be typed"):
        jaxdiv.sample(s, den, noise, key=jax.random.split(jax.random.PRNGKey(0), 3), groups=3,
                      **kw)  # fmt: skip
    with pytest.raises(ValueError, match=r"with groups=6, each group of 2 samples is a batch of "
                                         r"its own: particle guidance with bandwidth='median' "
                                         r"needs a batch of 1 or >= 3"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, groups=6,
                      guidance=guidance.particle(1.0))  # fmt: skip


def test_spell_search_skips_per_group_and_matches_own_calls(gmm2):
    """SPELL's reference search skips blocks and sub-blocks no query comes near
    (``grouping.branch``); under groups a block one group needs runs for all groups, each
    keeping its own result: the grouped run equals each group's own call, with groups that
    met different numbers of shields."""
    s, den, noise, cond, _ = _setup(gmm2)
    ref = jax.random.normal(jax.random.key(8), (96, D)) * 2.0
    # blocks of 8 shields in tiles of 2 (exact_bytes: N x 2 x D float32): three branch sites
    g = guidance.spell(0.6, reference=ref, block_size=8, exact_bytes=4 * N * 2 * D)
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(3), cond=cond, guidance=g, groups=G,
                        trace=True)  # fmt: skip
    met = []
    for grp in range(G):
        own = jaxdiv.sample(s, den, noise[_rows(grp)], key=jax.random.key(3),
                            cond=cond[_rows(grp)], guidance=g, trace=True)  # fmt: skip
        _close(out.x0[_rows(grp)], own.x0)
        np.testing.assert_array_equal(out.trace.info["spell"].num_active_shields[grp],
                                      own.trace.info["spell"].num_active_shields)  # fmt: skip
        met.append(int(own.trace.info["spell"].num_active_shields.sum()))
    assert len(set(met)) > 1 and min(met) >= 0 and max(met) > 0, met


def test_branch_stays_a_branch_under_groups():
    """One predicate for all groups (a ``cond`` in the program, the true branch skipped when
    no group needs it), where a plain ``lax.cond`` under vmap becomes a ``select`` that runs
    both branches."""
    from jaxdiv import grouping

    def f(x, cond):
        return cond(x.sum() > 0, lambda y: 2 * y, lambda y: y, x)

    def prims(cond):
        jaxpr = jax.make_jaxpr(jax.vmap(lambda x: f(x, cond), axis_name=grouping.GROUP_AXIS))
        eqns = jaxpr(jnp.ones((2, 3))).eqns
        return {e.primitive.name: e for e in eqns}

    ours = prims(grouping.branch)
    assert "cond" in ours and ours["cond"].invars[0].aval.shape == ()
    assert "cond" not in prims(jax.lax.cond)  # vmap's select: both branches, every group
    x = jnp.array([[1.0, 2.0], [-3.0, 1.0]])
    got = jax.vmap(lambda x: f(x, grouping.branch), axis_name=grouping.GROUP_AXIS)(x)
    np.testing.assert_array_equal(got, [[2.0, 4.0], [-3.0, 1.0]])


def _first_row_init(x, cond, key):
    # reads a concrete value, as a hand-written init may: it cannot be vmapped
    if float(jnp.abs(x).max()) > 1e6:
        raise ValueError("x is too large")
    return x[0]


def _pull_to_first(first, x0_hat, ctx):
    return 0.9 * x0_hat + 0.1 * first, first, ()


def test_an_init_that_reads_values_runs_group_by_group(gmm2):
    s, den, noise, cond, _ = _setup(gmm2)
    term = guidance.GuidanceTerm(_first_row_init, _pull_to_first, "x0", "first")
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=term,
                        groups=G)  # fmt: skip
    np.testing.assert_array_equal(out.state["first"], noise[::N] * s.schedule.init_noise_scale(
        s.times[0]))  # each group's own first row
    for grp in range(G):
        own = jaxdiv.sample(s, den, noise[_rows(grp)], key=jax.random.key(0),
                            cond=cond[_rows(grp)], guidance=term)  # fmt: skip
        _close(out.x0[_rows(grp)], own.x0)
    with pytest.raises(ValueError, match=r"with groups=3, each group of 4 samples is a batch "
                                         r"of its own: x is too large"):  # fmt: skip
        jaxdiv.sample(s, den, noise.at[5].set(1e7), key=jax.random.key(0), cond=cond,
                      guidance=term, groups=G)  # fmt: skip


@pytest.mark.parametrize("make", [lambda sch: samplers.dpmpp_2m(sch, 6),
                                  lambda sch: samplers.edm(sch, 5, s_churn=10.0)],
                         ids=["dpmpp_2m", "edm_heun_churn"])  # fmt: skip
def test_multistep_state_and_two_evaluations_per_group(gmm2, make):
    """A sampler state (DPM++'s previous x0_hat) and Heun's second evaluation, per group."""
    s = make(schedules.edm())
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (G * N, D))
    g = guidance.particle(2.0)
    keys = jax.random.split(jax.random.key(1), G)
    out = jaxdiv.sample(s, den, noise, key=keys, guidance=g, groups=G)
    for grp in range(G):
        own = jaxdiv.sample(s, den, noise[_rows(grp)], key=keys[grp], guidance=g)
        _close(out.x0[_rows(grp)], own.x0)
        for got, want in zip(jax.tree.leaves(out.sampler_state),
                             jax.tree.leaves(own.sampler_state), strict=True):  # fmt: skip
            _close(got[grp], want)


def test_gradients_through_groups_are_the_groups_own(gmm2):
    """d/dw of a loss over all groups = the sum of each group's own call's derivative."""
    s = samplers.ddim(schedules.edm(), 6)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (G * N, D))

    def loss(w, z, groups):
        x = jaxdiv.sample(s, den, z, key=jax.random.key(1), guidance=guidance.particle(w),
                          groups=groups).x0  # fmt: skip
        return jnp.sum(x**2)

    got = jax.grad(loss)(1.5, noise, G)
    want = sum(jax.grad(loss)(1.5, noise[_rows(grp)], 1) for grp in range(G))
    assert abs(float(want)) > 1e-3  # the strength matters
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_gass_adam_loops_stop_per_group(gmm2):
    """GASS's Adam write-back stops on its own patience in each group (a while loop whose
    condition differs between groups under vmap): each group equals its own call."""
    from toy.encoder import sphere_encoder

    s = samplers.ddim(schedules.edm(), 6)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (G * N, D))
    enc = sphere_encoder(jax.random.key(3), D)
    g = guidance.gass(enc, enc.text_emb, r_dep=0.2, r_ind=0.2, lr=0.05, max_iters=8,
                      patience=1, num_active=3)  # fmt: skip
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(1), guidance=g, groups=G,
                        trace=True)  # fmt: skip
    iters = []
    for grp in range(G):
        own = jaxdiv.sample(s, den, noise[_rows(grp)], key=jax.random.key(1), guidance=g,
                            trace=True)  # fmt: skip
        _close(out.x0[_rows(grp)], own.x0)
        np.testing.assert_array_equal(out.trace.info["gass"].num_iters[grp],
                                      own.trace.info["gass"].num_iters)  # fmt: skip
        iters.append(np.asarray(own.trace.info["gass"].num_iters).tolist())
    assert len({tuple(i) for i in iters}) > 1, iters  # the groups stopped at different counts
