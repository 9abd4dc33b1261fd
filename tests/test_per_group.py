"""``guidance.per_group``: each group of ``jaxdiv.sample(..., groups=G)`` with its own terms.

The reference is the documented equivalence: group ``g`` equals its own call of ``sample``
with ``guidances[g]``. The negative controls show the groups' values reach their groups:
a sweep's groups differ from each other where the same noise and key would make them equal.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules

G, N, D = 3, 4, 2  # groups, samples per group, dimension
RADII, WEIGHTS = (0.4, 0.8, 1.6), (0.5, 2.0, 4.0)


def _rows(g):
    return slice(g * N, (g + 1) * N)


def _close(got, want):
    """Two programs (one vmapped over the groups, one not) round differently: the bound of
    tests/test_groups.py (measured up to 1.3e-6 of the values' scale)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())


def _setup(gmm2):
    s = samplers.ddim(schedules.vp_linear(), 8, eta=1.0)
    post = gmm2.denoiser(s.schedule)
    den = lambda x, t, c: post(x, t, None) + 0.3 * c  # noqa: E731
    # the same noise and condition in every group: only the terms tell the groups apart
    noise = jnp.tile(jax.random.normal(jax.random.key(0), (N, D)), (G, 1))
    cond = jnp.tile(jax.random.normal(jax.random.key(1), (N, D)), (G, 1))
    return s, den, noise, cond


def _sweep(radii=RADII, weights=WEIGHTS):
    own = [guidance.chain(guidance.cfg(2.0), guidance.particle(w),
                          guidance.spell(r, intra_batch=True))  # fmt: skip
           for r, w in zip(radii, weights)]
    return own, guidance.per_group(own)


@pytest.mark.parametrize("per_group_keys", [False, True])
def test_each_group_is_its_own_call_with_its_own_terms(gmm2, per_group_keys):
    s, den, noise, cond = _setup(gmm2)
    key = jax.random.key(5)
    keys = jax.random.split(key, G) if per_group_keys else [key] * G
    own, sweep = _sweep()
    out = jaxdiv.sample(s, den, noise, key=keys if per_group_keys else key, cond=cond,
                        guidance=sweep, groups=G, trace=True)  # fmt: skip
    for g in range(G):
        alone = jaxdiv.sample(s, den, noise[_rows(g)], key=keys[g], cond=cond[_rows(g)],
                              guidance=own[g], trace=True)  # fmt: skip
        _close(out.x0[_rows(g)], alone.x0)
        for name in ("particle", "spell"):
            for got, want in zip(jax.tree.leaves(out.trace.info[name]),
                                 jax.tree.leaves(alone.trace.info[name]), strict=True):  # fmt: skip
                _close(got[g], want)
    if not per_group_keys:  # same noise, key and condition: only the terms differ
        gaps = [float(jnp.abs(out.x0[_rows(g)] - out.x0[:N]).max()) for g in (1, 2)]
        assert min(gaps) > 1e-2, gaps
        shared = jaxdiv.sample(s, den, noise, key=key, cond=cond, guidance=own[0],
                               groups=G).x0  # fmt: skip
        _close(shared[_rows(2)], shared[:N])  # negative control: shared terms, equal groups


def test_chain_shares_terms_with_each_groups_own(gmm2):
    s, den, noise, cond = _setup(gmm2)
    radii = [guidance.spell(r, intra_batch=True) for r in RADII]
    g = guidance.chain(guidance.cfg(2.0), guidance.per_group(radii), pg=guidance.particle(1.0))
    assert isinstance(g, guidance.PerGroup) and g.size == G
    assert guidance.per_group(r for r in radii).chains == guidance.per_group(radii).chains
    assert g.names == ("cfg", "spell", "pg")
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(2), cond=cond, guidance=g, groups=G)
    for grp in range(G):
        alone = guidance.chain(guidance.cfg(2.0), radii[grp], pg=guidance.particle(1.0))
        want = jaxdiv.sample(s, den, noise[_rows(grp)], key=jax.random.key(2),
                             cond=cond[_rows(grp)], guidance=alone).x0  # fmt: skip
        _close(out.x0[_rows(grp)], want)


def test_a_new_sweep_reuses_the_program(gmm2):
    s, den, noise, cond = _setup(gmm2)
    before = jaxdiv.compile_count()
    for scale in (1.0, 2.0, 3.0):
        _, sweep = _sweep([scale * r for r in RADII], [scale * w for w in WEIGHTS])
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=sweep,
                      groups=G)  # fmt: skip
    assert jaxdiv.compile_count() - before == 1
    # groups left out: per_group's size (the same program)
    jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=sweep)
    assert jaxdiv.compile_count() - before == 1
    # one object in every group: its leaves enter once, another program (structure)
    same = guidance.per_group(_sweep()[0][:1] * G)
    jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=same, groups=G)
    assert jaxdiv.compile_count() - before == 2


def test_state_per_group_continued(gmm2):
    """Per-group SPELL memories: the second call continues each group's own."""
    s, den, noise, cond = _setup(gmm2)
    own = [guidance.spell(r, intra_batch=True, memory_size=2 * N) for r in RADII]
    sweep = guidance.per_group(own)
    first = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, guidance=sweep,
                          groups=G)  # fmt: skip
    noise2 = jax.random.normal(jax.random.key(7), noise.shape)
    second = jaxdiv.sample(s, den, noise2, key=jax.random.key(2), cond=cond, guidance=sweep,
                           groups=G, guidance_state=first.state)  # fmt: skip
    for g in range(G):
        one = jaxdiv.sample(s, den, noise[_rows(g)], key=jax.random.key(1),
                            cond=cond[_rows(g)], guidance=own[g])  # fmt: skip
        two = jaxdiv.sample(s, den, noise2[_rows(g)], key=jax.random.key(2),
                            cond=cond[_rows(g)], guidance=own[g],
                            guidance_state=one.state)  # fmt: skip
        _close(second.x0[_rows(g)], two.x0)


def test_gradients_reach_each_groups_strength(gmm2):
    """d/dw_g of a loss over all groups = d/dw of group g's own call."""
    s = samplers.ddim(schedules.edm(), 6)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (G * N, D))

    def grouped(ws):
        sweep = guidance.per_group([guidance.particle(ws[g]) for g in range(G)])
        x = jaxdiv.sample(s, den, noise, key=jax.random.key(1), guidance=sweep, groups=G).x0
        return jnp.sum(x**2)

    def alone(w, g):
        x = jaxdiv.sample(s, den, noise[_rows(g)], key=jax.random.key(1),
                          guidance=guidance.particle(w)).x0  # fmt: skip
        return jnp.sum(x**2)

    ws = jnp.array(WEIGHTS)
    got = jax.grad(grouped)(ws)
    want = jnp.stack([jax.grad(alone)(ws[g], g) for g in range(G)])
    assert float(jnp.abs(want).min()) > 1e-4  # each strength matters
    np.testing.assert_allclose(got, want, rtol=1e-4)


def _first_row_init(scale, x, cond, key):
    if float(jnp.abs(x).max()) > 1e6:  # reads a concrete value: cannot be vmapped
        raise ValueError("x is too large")
    return scale * x[0]


def _pull_to_first(first, x0_hat, ctx):
    return 0.9 * x0_hat + 0.1 * first, first, ()


def test_an_init_that_reads_values_gets_its_groups_terms(gmm2):
    from jax.tree_util import Partial

    s, den, noise, cond = _setup(gmm2)
    own = [guidance.GuidanceTerm(Partial(_first_row_init, jnp.float32(w)), _pull_to_first,
                                 "x0", "first") for w in WEIGHTS]  # fmt: skip
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond,
                        guidance=guidance.per_group(own), groups=G)  # fmt: skip
    x_init = noise * s.schedule.init_noise_scale(s.times[0])
    np.testing.assert_allclose(out.state["first"],
                               jnp.array(WEIGHTS)[:, None] * x_init[::N], rtol=1e-6)
    for g in range(G):
        want = jaxdiv.sample(s, den, noise[_rows(g)], key=jax.random.key(0),
                             cond=cond[_rows(g)], guidance=own[g]).x0  # fmt: skip
        _close(out.x0[_rows(g)], want)


def test_interval_sweep_each_group_acts_on_its_own_interval(gmm2):
    """Interval guidance's interval (traced bounds) swept over the groups: each group is
    active exactly where its own call is, and the intervals differ between groups."""
    s, den, noise, cond = _setup(gmm2)
    own = [guidance.interval(3.0, lo, hi) for lo, hi in ((0.2, 1.0), (1.0, 5.0), (2.0, 60.0))]
    out = jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond,
                        guidance=guidance.per_group(own), groups=G, trace=True)  # fmt: skip
    active = []
    for g in range(G):
        alone = jaxdiv.sample(s, den, noise[_rows(g)], key=jax.random.key(0),
                              cond=cond[_rows(g)], guidance=own[g], trace=True)  # fmt: skip
        np.testing.assert_array_equal(out.trace.active["interval"][g],
                                      alone.trace.active["interval"])  # fmt: skip
        _close(out.x0[_rows(g)], alone.x0)
        active.append(tuple(np.asarray(alone.trace.active["interval"]).tolist()))
    assert len(set(active)) == G and all(any(a) for a in active), active


def test_gass_per_group_text_shares_the_encoder(gmm2):
    """GASS with a text embedding per group (per prompt): each group equals its own call,
    and the encoder's weights, one array in every group's term, enter the program once
    (not stacked per group: on SD they are the VAE decoder and CLIP vision tower)."""
    from jaxdiv.sampling import lower
    from toy.encoder import sphere_encoder

    s = samplers.ddim(schedules.edm(), 6)
    den = gmm2.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (G * N, D))
    enc = sphere_encoder(jax.random.key(3), D)
    texts = jax.random.normal(jax.random.key(4), (G,) + enc.text_emb.shape)
    own = [guidance.gass(enc, t, r_dep=0.2, r_ind=0.2, lr=0.05, max_iters=4, num_active=3)
           for t in texts]  # fmt: skip
    kw = dict(key=jax.random.key(1), guidance=guidance.per_group(own), groups=G)
    out = jaxdiv.sample(s, den, noise, **kw)
    for g in range(G):
        want = jaxdiv.sample(s, den, noise[_rows(g)], key=jax.random.key(1), guidance=own[g])
        _close(out.x0[_rows(g)], want.x0)
    shapes = [a.shape for a in jax.tree.leaves(lower(s, den, noise, **kw).args_info)]
    weights = [leaf.shape for leaf in jax.tree.leaves(enc) if leaf.ndim == 2]
    assert weights and all(w in shapes for w in weights), (weights, shapes)
    assert not [x for x in shapes if x[1:] in weights and x[:1] == (G,)], shapes
    assert (G,) + texts.shape[1:] in shapes  # the text embeddings: one per group


def test_windows_are_checked_per_group(gmm2):
    s, den, noise, cond = _setup(gmm2)
    late = guidance.per_group([guidance.window(guidance.cfg(w), steps=[st])
                               for w, st in zip(WEIGHTS, (1, 2, 30))])  # fmt: skip
    with pytest.raises(ValueError, match=r"^per_group entry 2: guidance term 'cfg': window\("
                                         r"steps=\.\.\.\) names step indices \[30\] but the "
                                         r"sampler has 8"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=late,
                      groups=G)  # fmt: skip


def test_bad_per_group_guidance_is_named(gmm2):
    s, den, noise, cond = _setup(gmm2)
    _, sweep = _sweep()
    with pytest.raises(ValueError, match=r"guidance is per_group for 3 groups, but groups=1: "
                                         r"pass groups=3"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=sweep,
                      groups=1)  # fmt: skip
    with pytest.raises(ValueError, match=r"per_group for 3 groups, but groups=4"):
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, guidance=sweep, groups=4)
    cases = [
        ([guidance.cfg(1.0), guidance.particle(1.0)],
         "group 1 has terms ('particle',) but group 0 has ('cfg',); every group needs the "
         "same terms"),
        ([guidance.spell(0.5, intra_batch=True),
          guidance.spell(0.5, intra_batch=True, memory_size=4)],
         "group 1's 'spell' term, setting 'p.memory_size' (leaf .init[<flat index 0>][0]"
         ".memory_size) is 4 where group 0's is 0; settings that fix the program must agree "
         "across groups"),
        ([guidance.window(guidance.particle(1.0), steps=[0]),
          guidance.window(guidance.particle(1.0, space="x0_hat"), steps=[0])],
         "group 1's 'particle' term, setting 'apply.space' (leaf .apply[<flat index 0>][0]"
         "[<flat index 0>][2]) is 'x0_hat' where group 0's is 'x_t'"),
        ([guidance.spell(0.5, reference=jnp.zeros((4, D))),
          guidance.spell(0.5, reference=jnp.zeros((3, D)))],
         "group 1's 'spell' term, setting 'p.reference.points' (leaf .apply[<flat index 0>]"
         "[0].reference.points) has shape (1, 3, 2) float32 where group 0's has (1, 4, 2) "
         "float32"),
        ([guidance.cfg(1.0), guidance.window(guidance.cfg(2.0), steps=[1])],
         "group 1's 'cfg' term is built differently from group 0's (apply _window_apply vs "
         "_cfg_apply"),
    ]
    for items, message in cases:
        with pytest.raises(ValueError, match="^per_group: " + re.escape(message)):
            guidance.per_group(items)
    with pytest.raises(TypeError, match="per_group takes a list with one term or chain per "
                                        "group, got GuidanceTerm"):  # fmt: skip
        guidance.per_group(guidance.cfg(1.0))
    with pytest.raises(TypeError, match=r"^guidance must be a GuidanceTerm \(or a chain of "
                                        r"them\), got list; to compose terms pass guidance\."
                                        r"chain\(\*terms\), to give each of sample's groups "
                                        r"its own pass guidance\.per_group\(terms\)$"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond,
                      guidance=[guidance.cfg(1.0), guidance.cfg(2.0)])  # fmt: skip
    with pytest.raises(ValueError, match="got an empty list"):
        guidance.per_group([])
    with pytest.raises(TypeError, match="group 0 is itself per_group"):
        guidance.per_group([sweep])
    with pytest.raises(ValueError, match=r"different numbers of groups \[2, 3\]"):
        guidance.chain(sweep, guidance.per_group([guidance.cfg(1.0)] * 2))
    with pytest.raises(TypeError, match=r"is per_group guidance \(a chain for each of 3 "
                                        r"group\(s\)\): it runs as jaxdiv.sample\(\.\.\., "
                                        r"guidance=\.\.\., groups=3\)"):  # fmt: skip
        guidance.as_terms(sweep)
    assert guidance.window(sweep, steps=[1]).size == 3  # a window goes on each group's terms


def test_a_term_built_for_the_whole_batch_under_groups_points_to_per_group(gmm2):
    """TPSO's variants are rows of the batch it was built for: under groups each group is
    a batch of its own, and the refusal says how to give each its own rows; per_group
    with each group's rows then runs and equals each group's own call."""
    s, den, _, _ = _setup(gmm2)
    noise = jax.random.normal(jax.random.key(0), (2 * N, D))
    cond = jnp.ones((2 * N, D))
    opt = cond + 0.3 * jax.random.normal(jax.random.key(5), cond.shape)
    with pytest.raises(ValueError, match=re.escape(
            "with groups=2, each group of 4 samples is a batch of its own: tpso's optimized "
            "condition must have the shape of cond (4, 2), got (8, 2); 'tpso' holds data of "
            "the rows it was built for: give each group its own with guidance.per_group([...]) "
            "(one entry of 4 rows per group)")):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond,
                      guidance=guidance.tpso(opt, 0.5), groups=2)  # fmt: skip
    keys = jax.random.split(jax.random.key(1), 2)
    both = jaxdiv.sample(s, den, noise, key=keys, cond=cond, guidance=guidance.per_group(
        [guidance.tpso(opt[:N], 0.5), guidance.tpso(opt[N:], 0.5)])).x0
    for g in range(2):
        rows = slice(g * N, (g + 1) * N)
        own = jaxdiv.sample(s, den, noise[rows], key=keys[g], cond=cond[rows],
                            guidance=guidance.tpso(opt[rows], 0.5)).x0  # fmt: skip
        _close(both[rows], own)
