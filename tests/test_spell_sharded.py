"""Exact SPELL reference search over shields split across devices (issue "Scale out").

The 8-device checks run in a subprocess (the host device count is fixed when JAX starts):
the sharded search equals the single-device exact search (same centre; counts exactly,
corrections up to float32 summation order), each device holds 1/8 of the shields, the
compiled program sums corrections (all-reduce) and never gathers the shields, a folder of
``.npy`` files streams into the same index, and SPELL through ``jaxdiv.sample`` with the
sharded reference equals the single-device run (also in groups) and keeps its guarantee; the row of
``benchmarks.spell_sharded`` on that mesh records both searches.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxdiv.guidance.spell.sharded import ShieldRows, build_sharded_index, nearest, repulsion

SCRIPT = textwrap.dedent(
    """
    import re, sys, tempfile
    from pathlib import Path
    import jax, jax.numpy as jnp, numpy as np
    import jaxdiv
    from jaxdiv import guidance, samplers, schedules
    from jaxdiv.guidance.spell import radius_search as rs
    from jaxdiv.guidance.spell.sharded import build_sharded_index, nearest, repulsion

    assert jax.device_count() == 8, jax.devices()
    rng = np.random.default_rng(0)
    k, d, bs, r = 5003, 16, 64, 5.5  # r: several shields overlap each query
    shields = rng.normal(size=(k, d)).astype(np.float32) * 2 + 3
    mesh = jax.make_mesh((8,), ("shields",))
    sidx = build_sharded_index(shields, mesh, block_size=bs)
    single = rs.build_index(shields, bs, centre=np.asarray(sidx.index.centre))
    # queries: near shields spread over every device's rows, exact hits, and far points
    ids = np.array([0, 700, 1400, 2100, 2800, 3500, 4200, 5002])
    q = np.concatenate([shields[ids] + 0.3 * rng.normal(size=(8, d)).astype(np.float32),
                        shields[ids[:4]], shields[:2] + 50.0]).astype(np.float32)

    def check(a, b, what):
        np.testing.assert_array_equal(np.asarray(a.count), np.asarray(b.count), err_msg=what)
        scale = float(np.abs(np.asarray(b.delta)).max())
        np.testing.assert_allclose(np.asarray(a.delta), np.asarray(b.delta), rtol=1e-5,
                                   atol=1e-6 * scale, err_msg=what)

    ref = rs.repulsion(q, single, r)
    got = repulsion(q, sidx, r)
    counts = np.asarray(ref.count)
    assert counts[:12].min() >= 1 and counts.max() >= 3 and counts[-2:].sum() == 0, counts
    check(got, ref, "plain")
    qids = jnp.asarray(np.concatenate([ids, ids[:4], [-1, -1]]), jnp.int32)
    check(repulsion(q, sidx, r, query_ids=qids), rs.repulsion(q, single, r, query_ids=qids),
          "query_ids")
    qa = jnp.asarray(q + 1.0)
    check(repulsion(q, sidx, r, query_anchors=qa, shield_anchors=0.5),
          rs.repulsion(q, single, r, query_anchors=qa, shield_anchors=0.5), "anchors")

    # memory: every device holds 1/8 of the blocks; nothing else is replicated but (d,)
    shards = sidx.index.points.addressable_shards
    assert len(shards) == 8
    assert {s.data.shape for s in shards} == {(sidx.index.points.shape[0] // 8, bs, d)}
    assert sum(s.data.nbytes for s in shards) == sidx.index.points.nbytes

    # the compiled search sums corrections across devices and never gathers the shields
    hlo = jax.jit(lambda q, r: repulsion(q, sidx, r).delta).lower(q, r).compile().as_text()
    assert "all-reduce" in hlo, "no cross-device sum"
    gathers = re.findall(r"all-gather[^\\n]*", hlo)
    assert not any(str(sidx.index.points.shape[0]) in g for g in gathers), gathers

    # exact nearest shields: each device's k nearest, gathered and merged, are the
    # single-device ones (ids are rows of the source), also with an id excluded per query
    for kk, excl in ((1, None), (3, None), (3, qids)):
        got_nb = nearest(q, sidx, k=kk, exclude_ids=excl)
        ref_nb = rs.nearest(q, single, k=kk, exclude_ids=excl)
        np.testing.assert_array_equal(np.asarray(got_nb.indices), np.asarray(ref_nb.indices))
        np.testing.assert_allclose(np.asarray(got_nb.distances), np.asarray(ref_nb.distances),
                                   rtol=1e-6, atol=1e-6)
    near = np.asarray(nearest(q, sidx, k=1).indices[:, 0])
    assert (near[8:12] == ids[:4]).all() and len(set(near[:8].tolist())) == 8, near
    excl_first = np.asarray(nearest(q[8:12], sidx, k=1, exclude_ids=ids[:4]).distances)
    assert excl_first.min() > 0, excl_first  # the exact hits' own rows were skipped
    hlo = jax.jit(lambda q: nearest(q, sidx, k=3).distances).lower(q).compile().as_text()
    gathered = re.findall(r"(\\w+\\[[0-9,]*\\])\\S* all-gather(?:-start)?\\(", hlo)
    assert gathered and set(gathered) <= {"f32[14,24]", "s32[14,24]"}, gathered  # B x 8 k

    # a folder of .npy files streams into the same index
    with tempfile.TemporaryDirectory() as tmp:
        for i, (a, b) in enumerate([(0, 1000), (1000, 1001), (1001, k)]):
            np.save(Path(tmp) / f"part{i}.npy", shields[a:b].reshape(b - a, 4, 4))
        from_disk = build_sharded_index(tmp, mesh, block_size=bs)
    np.testing.assert_allclose(np.asarray(from_disk.index.centre),
                               np.asarray(sidx.index.centre), rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(from_disk.index.valid),
                                  np.asarray(sidx.index.valid))
    np.testing.assert_allclose(np.asarray(from_disk.index.points),
                               np.asarray(sidx.index.points), rtol=0, atol=1e-5)

    # SPELL through jaxdiv.sample: the same samples, the guarantee, one compile per radius
    r = 1.5
    sched = schedules.edm()
    s = samplers.ddim(sched, 12)
    # a model that memorised 16 points next to shields: unguided, every sample lands there
    target = jnp.asarray(shields[::300][:16] + 0.1)
    den = lambda x, t, c: target + 0.0 * x
    noise = jax.random.normal(jax.random.key(0), (16, d)) * 80.0
    outs = {}
    for name, reference in (("single", single), ("sharded", sidx)):
        outs[name] = jaxdiv.sample(s, den, noise, key=jax.random.key(1),
                                   guidance=guidance.spell(r, reference=reference)).x0
    np.testing.assert_allclose(np.asarray(outs["sharded"]), np.asarray(outs["single"]),
                               rtol=1e-5, atol=1e-5)
    dist = nearest(outs["sharded"], sidx, k=1).distances[:, 0]
    assert float(dist.min()) >= r * (1 - 1e-4), float(dist.min())
    unguided = jaxdiv.sample(s, den, noise, key=jax.random.key(1)).x0
    assert float(rs.nearest(unguided, single, k=1).distances.min()) < r  # guidance acted
    before = jaxdiv.compile_count()
    jaxdiv.sample(s, den, noise, key=jax.random.key(1),
                  guidance=guidance.spell(r * 1.1, reference=sidx))
    assert jaxdiv.compile_count() == before, "a new radius recompiled"
    # four independent groups (jaxdiv.sample(groups=)): the sharded search's branches under
    # the groups' vmap give the single-device index's samples
    grouped = {}
    for name, reference in (("single", single), ("sharded", sidx)):
        g = guidance.spell(r, reference=reference)
        grouped[name] = jaxdiv.sample(s, lambda x, t, c: c + 0.0 * x, noise, cond=target,
                                      key=jax.random.key(1), groups=4, guidance=g).x0
    np.testing.assert_allclose(np.asarray(grouped["sharded"]), np.asarray(grouped["single"]),
                               rtol=1e-5, atol=1e-5)  # fmt: skip

    # benchmarks.spell_sharded's row: both searches timed, the same samples, and each
    # device holding ceil(3000 / (8 * 128)) = 3 blocks of 128 shields (float32, d = 16)
    from benchmarks.spell_sharded import measure
    row = measure("toy", 3000, 4, 2, 1, mesh, 128, budget_s=1.0)
    assert row["devices"] == 8 and row["max_abs_diff_vs_single"] < 1e-4, row
    assert row["shield_bytes_per_device"] == 3 * 128 * 16 * 4, row
    for label in ("single", "sharded"):
        assert row[label]["term_s"] > 0 and np.isfinite(row[label]["overhead"]), row
    print("SHARDED_SPELL_OK")
    """
)


def test_sharded_search_equals_single_device_on_8_devices():
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    res = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert "SHARDED_SPELL_OK" in res.stdout


def _mesh():
    return jax.make_mesh((1,), ("shields",))


def test_rows_stream_from_files_and_bad_sources_are_named(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((2, 3), np.float32))
    np.save(tmp_path / "b.npy", np.full((3, 3), 2.0, np.float32))
    rows = ShieldRows(tmp_path)
    assert rows.shape == (5, 3)
    assert rows.read(1, 4).tolist() == [[1.0] * 3, [2.0] * 3, [2.0] * 3]
    assert np.allclose(rows.mean(chunk=2), 8.0 / 5)

    np.save(tmp_path / "c.npy", np.ones((1, 4), np.float32))
    with pytest.raises(ValueError, match="disagree on the features per row"):
        ShieldRows(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no .npy files"):
        ShieldRows(empty)
    bad = np.ones((4, 2), np.float32)
    bad[2, 1] = np.nan
    np.save(empty / "bad.npy", bad)
    with pytest.raises(ValueError, match="shield row 2 is not finite"):
        ShieldRows(empty).read(0, 4)
    np.save(empty / "bad.npy", np.array([{"a": 1}, {"b": 2}], dtype=object).reshape(2, 1))
    with pytest.raises(ValueError, match="not a readable .npy array"):
        ShieldRows(empty)
    with pytest.raises(TypeError, match="must hold floating values"):
        ShieldRows(np.ones((3, 2), np.int32))
    with pytest.raises(TypeError, match="source must be an array"):
        ShieldRows([[1.0, 2.0]])


def test_build_and_search_refuse_bad_arguments():
    pts = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="axis 'data' is not an axis of the mesh"):
        build_sharded_index(pts, _mesh(), axis="data")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        build_sharded_index(pts, "cpu")
    with pytest.raises(ValueError, match=r"centre must have shape \(4,\)"):
        build_sharded_index(pts, _mesh(), centre=np.zeros(3))
    idx = build_sharded_index(pts, _mesh())
    with pytest.raises(ValueError, match="queries have 3 features per row but the index has 4"):
        repulsion(jnp.ones((2, 3)), idx, 1.0)
    with pytest.raises(TypeError, match="ShardedShieldIndex"):
        repulsion(jnp.ones((2, 4)), pts, 1.0)
    with pytest.raises(ValueError, match="k must be at most the number of shields 4, got 5"):
        nearest(jnp.ones((2, 4)), idx, k=5)
    with pytest.raises(ValueError, match="k must be a positive int"):
        nearest(jnp.ones((2, 4)), idx, k=0)
    with pytest.raises(ValueError, match=r"exclude_ids must be integer ids of shape \(2,\)"):
        nearest(jnp.ones((2, 4)), idx, exclude_ids=jnp.zeros(3, jnp.int32))
    with pytest.raises(TypeError, match="ShardedShieldIndex"):
        nearest(jnp.ones((2, 4)), pts)


def test_one_device_sharded_index_is_the_exact_search():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(300, 8)).astype(np.float32)
    q = (pts[:5] + 0.1).astype(np.float32)
    idx = build_sharded_index(pts, _mesh(), block_size=32)
    from jaxdiv.guidance.spell import radius_search as rs

    ref = rs.repulsion(q, rs.build_index(pts, 32, centre=np.asarray(idx.index.centre)), 1.0)
    got = repulsion(q, idx, 1.0)
    np.testing.assert_array_equal(np.asarray(got.count), np.asarray(ref.count))
    np.testing.assert_allclose(np.asarray(got.delta), np.asarray(ref.delta), rtol=1e-6, atol=1e-6)


def test_repeated_searches_compile_once():
    """Leak counts call the search once per batch, eagerly, and a notebook computes
    repulsion fields the same way: new queries of the same shape (and the same k / radius
    form) must not compile again, sharded or not."""
    from jaxdiv.guidance.spell import radius_search as rs

    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None)
    pts = np.random.default_rng(2).normal(size=(200, 8)).astype(np.float32)
    sidx = build_sharded_index(pts, _mesh(), block_size=32)
    single = rs.build_index(pts, 32)
    ivf = rs.build_ivf(pts, 4, key=jax.random.key(0))
    queries = [jnp.asarray(np.random.default_rng(s).normal(size=(4, 8)), jnp.float32)
               for s in range(3)]  # fmt: skip
    searches = [lambda q, r: nearest(q, sidx, k=2).distances,
                lambda q, r: rs.nearest(q, single, k=2).distances,
                lambda q, r: repulsion(q, sidx, r, query_ids=jnp.arange(4) - 1).delta,
                lambda q, r: rs.repulsion(q, single, r, query_anchors=q,
                                          shield_anchors=0.5).delta,
                lambda q, r: rs.ivf_repulsion(q, ivf, r, 2, query_anchors=q,
                                              anchor_scale=0.5).delta]  # fmt: skip
    for i, search in enumerate(searches):
        search(queries[0], 1.5).block_until_ready()
        before = len(compiles)
        for r, q in zip((1.7, 1.9), queries[1:]):
            search(q, r).block_until_ready()
        assert len(compiles) == before, (i, compiles[before:])
