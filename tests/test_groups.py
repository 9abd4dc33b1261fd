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
    out = jaxdiv.sample(s, den, noise, key=jax.random.split(key, G) if per_group_keys else key,
                        cond=cond, guidance=coupled, groups=G, trace=True)  # fmt: skip
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
    with pytest.raises(ValueError, match=r"with groups=6, each group of 2 samples is a batch of "
                                         r"its own: particle guidance with bandwidth='median' "
                                         r"needs a batch of 1 or >= 3"):  # fmt: skip
        jaxdiv.sample(s, den, noise, key=jax.random.key(0), cond=cond, groups=6,
                      guidance=guidance.particle(1.0))  # fmt: skip
