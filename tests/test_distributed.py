"""``jaxdiv.sample(..., mesh=)`` and FSDP weights on 8 host devices equal one device.

Runs in subprocesses (the host device count is fixed when JAX starts). On the toy:
stochastic, multistep and Heun samplers with a coupled chain (CFG + SPELL intra-batch and
reference + particle guidance), and GASS, batch split over 8 devices, equal the
single-device run, also run as groups with their own terms (``groups=``, ``per_group``),
groups that do not line up with the devices staying split (or refused where none can).
On the tiny SD pipeline: data-parallel CFG + SPELL equals one device, the compiled
program gathers nothing larger than the batch's ``x0_hat`` (the UNet's activations and
weights stay on their devices), and FSDP-split UNet / MMDiT weights give the replicated
model's outputs with each device holding a fraction of them.
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

import jaxdiv
from jaxdiv import distributed

# appended to XLA_FLAGS: the test session's codegen flags (conftest.py) carry over
ENV = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8",
)

TOY = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import jaxdiv, toy
    from jaxdiv import distributed, guidance, samplers, schedules

    assert jax.device_count() == 8
    mesh = distributed.make_mesh()
    d, b = 4, 16
    gm = toy.GaussianMixture(jnp.array([[-2.0] * d, [2.0] * d]), jnp.array([0.2, 0.1]))
    den = lambda x, t, c: gm.posterior_mean(x, 1.0, t) + 0.2 * c
    noise = jax.random.normal(jax.random.key(0), (b, d))
    cond = jax.random.normal(jax.random.key(1), (b, d))
    ref = jax.random.normal(jax.random.key(2), (64, d)) * 2
    enc = toy.sphere_encoder(jax.random.key(3), d)
    edm, flow = schedules.edm(), schedules.flow(3.0)
    coupled = guidance.chain(guidance.cfg(2.0), guidance.spell(0.5, reference=ref,
                             intra_batch=True), guidance.particle(0.5))
    # stochastic samplers (per-sample noise streams), multistep state, Heun's two calls;
    # the chain couples the batch three ways (CFG's doubled batch, SPELL, PG)
    cases = [(s, coupled) for s in (
        samplers.ddim(edm, 6, eta=1.0), samplers.edm(edm, 5, s_churn=10.0),
        samplers.dpmpp_3m_sde(edm, 6), samplers.flow_heun(flow, 4))]
    cases += [(samplers.ddim(edm, 6), g) for g in (
        None, guidance.gass(enc, enc.text_emb, lr=0.05, max_iters=3, num_active=3))]
    for s, g in cases:
        kw = dict(key=jax.random.key(4), cond=cond, guidance=g)
        single = jaxdiv.sample(s, den, noise, **kw).x0
        out = jaxdiv.sample(s, den, noise, mesh=mesh, **kw).x0
        assert len(out.sharding.device_set) == 8, out.sharding
        np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5,
                                   err_msg=f"{s.name} {g}")
    # groups (one vmap over 4 groups of 4) on top of the split: each group spans 2 devices;
    # each group with its own SPELL radius (per_group: the terms' leaves stacked, replicated)
    s = samplers.ddim(edm, 6, eta=1.0)
    sweep = guidance.per_group([guidance.chain(guidance.cfg(2.0), guidance.spell(
        r, reference=ref, intra_batch=True), guidance.particle(0.5)) for r in (.3, .5, .7, .9)])
    kw = dict(key=jax.random.key(4), cond=cond, guidance=sweep, groups=4)
    single = jaxdiv.sample(s, den, noise, **kw).x0
    out = jaxdiv.sample(s, den, noise, mesh=mesh, **kw).x0
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=2e-5, atol=2e-5)
    # 3 groups of 16 do not line up with 8 devices' blocks of 6 rows: XLA replicated the
    # grouped batch (every device ran all 48 rows); the rows now stay split, and the work
    # per device is a fraction of the single-device program's (PG's pairs still gathered)
    from jaxdiv.sampling import lower
    noise3 = jax.random.normal(jax.random.key(5), (48, d))
    kw = dict(key=jax.random.key(4), cond=jnp.ones((48, d)), guidance=guidance.particle(0.5),
              groups=3)
    flops = [lower(s, den, noise3, mesh=m, **kw).compile().cost_analysis()["flops"]
             for m in (None, mesh)]
    assert flops[1] < 0.5 * flops[0], flops   # was 1.02x (38946 vs 38172), now 0.31x
    out = jaxdiv.sample(s, den, noise3, mesh=mesh, **kw).x0
    assert out.sharding.spec == jax.sharding.PartitionSpec("data"), out.sharding
    np.testing.assert_allclose(np.asarray(out), np.asarray(jaxdiv.sample(s, den, noise3, **kw).x0),
                               rtol=2e-5, atol=2e-5)
    try:  # 6 groups of 4 on 8 devices: no split exists
        jaxdiv.sample(s, den, noise3[:24], mesh=mesh, **dict(kw, groups=6, cond=None))
        raise AssertionError("groups=6 of 4 on 8 devices ran")
    except ValueError as err:
        assert "groups=6 of 4 samples cannot be split over the 8 devices" in str(err), err
    # an array committed to one device (jax.device_put(x, device)) beside mesh=: named
    # (jit's own error named only "argument dynamic[1][5] of _run_impl")
    for kw, what in [(dict(den=jax.device_put(gm, jax.devices()[1]).denoiser(edm)), "denoiser"),
                     (dict(guidance=guidance.spell(1.0, reference=jax.device_put(
                         ref, jax.devices()[2]))), "guidance term 'spell'")]:  # fmt: skip
        try:
            jaxdiv.sample(s, kw.pop("den", gm.denoiser(edm)), noise, key=jax.random.key(0),
                          mesh=mesh, **kw)  # fmt: skip
            raise AssertionError(f"a {what} committed to one device ran")
        except ValueError as err:
            assert str(err).startswith(f"{what}: its array ") and "is committed to [" in str(err)
    print("TOY_OK", len(cases))
    """
)

SD = textwrap.dedent(
    """
    import re
    import jax, jax.numpy as jnp, numpy as np
    import jaxdiv
    from jaxdiv import distributed, guidance
    from jaxdiv.models import pure
    from jaxdiv.testing import TINY_MMDIT, example_pipeline, random_mmdit

    pipe = example_pipeline()
    b = 8
    cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"] * (b // 2)))
    noise = jax.random.normal(jax.random.key(0), pipe.noise_shape(b))
    g = guidance.chain(guidance.cfg(5.0, null_cond=pipe.null_cond),
                       guidance.spell(2.0, intra_batch=True))
    s = pipe.ddim(4, clean_endpoint=True)
    kw = dict(key=jax.random.key(1), cond=cond, guidance=g)
    single = jaxdiv.sample(s, pipe.denoiser, noise, **kw).x0

    mesh = distributed.make_mesh()                                   # 8 x 1: data parallel
    out = jaxdiv.sample(s, pipe.denoiser, noise, mesh=mesh, **kw).x0
    # one sample per device is another program than eight on one: rounding scales with the
    # samples' magnitude (up to ~15), not each element's (an element of 0.02 was off by
    # 1.4e-5 under the test suite's codegen flags, conftest.py)
    scale = float(np.abs(np.asarray(single)).max())
    np.testing.assert_allclose(np.asarray(out), np.asarray(single), rtol=1e-5, atol=1e-5 * scale)

    # the compiled data-parallel program: every all-gather is at most the batch's x0_hat
    from jaxdiv.sampling import lower
    hlo = lower(s, pipe.denoiser, noise, key=jax.random.key(1), cond=cond, guidance=g,
                mesh=mesh).compile().as_text()
    x0_size = int(np.prod(noise.shape))
    sizes = []
    for line in hlo.splitlines():
        if re.search(r"= \\S+ all-gather(-start)?\\(", line):
            dims = re.findall(r"\\[([0-9,]*)\\]", line.split("=", 1)[1].split("all-gather")[0])
            sizes += [int(np.prod([int(v) for v in d.split(",") if v])) for d in dims]
    assert sizes, "the coupled SPELL term should gather x0_hat"
    assert max(sizes) <= 2 * x0_size, (max(sizes), x0_size)   # CFG's doubled batch at most

    # FSDP: UNet weights split over 4 devices x data over 2 give the same samples
    mesh2 = distributed.make_mesh(2, 4)
    den = distributed.shard_params(pipe.denoiser, mesh2, min_size=256)
    split = [l for l in jax.tree.leaves(den) if hasattr(l, "sharding")
             and any(a == "fsdp" for a in l.sharding.spec)]
    assert len(split) > 20, len(split)
    held = sum(sh.data.nbytes for l in jax.tree.leaves(den) if hasattr(l, "addressable_shards")
               for sh in l.addressable_shards[:1])
    full = sum(l.nbytes for l in jax.tree.leaves(den) if hasattr(l, "nbytes"))
    assert held < 0.5 * full, (held, full)
    out2 = jaxdiv.sample(s, den, noise, mesh=mesh2, **kw).x0
    # split contractions sum in another order (an element of 0.02 was off by 1.3e-5 on an
    # AMD EPYC): the same magnitude-relative bound
    np.testing.assert_allclose(np.asarray(out2), np.asarray(single), rtol=1e-5, atol=1e-5 * scale)

    # FSDP on the SD3 MMDiT (the three text / image streams), against the replicated model
    m = pure(random_mmdit(TINY_MMDIT))
    args = (jax.random.normal(jax.random.key(3), (2, 4, 8, 8)), jnp.array([500.0, 20.0]),
            jax.random.normal(jax.random.key(4), (2, 7, 20)),
            jax.random.normal(jax.random.key(5), (2, 12)))
    want = jax.jit(m.apply)(m.params, *args)
    params = distributed.shard_params(m.params, distributed.make_mesh(1, 8), min_size=64)
    assert any("fsdp" in tuple(l.sharding.spec) for l in jax.tree.leaves(params))
    got = jax.jit(m.apply)(params, *args)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    print("SD_OK")
    """
)


def _run(script: str, marker: str):
    res = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True,
                         text=True, timeout=900)  # fmt: skip
    assert res.returncode == 0, res.stderr[-4000:]
    assert marker in res.stdout


def test_samplers_and_coupled_terms_on_8_devices_equal_one_device():
    _run(TOY, "TOY_OK")


def test_sd_data_parallel_and_fsdp_equal_one_device_and_gather_only_x0_hat():
    _run(SD, "SD_OK")


def test_mesh_helpers_check_their_arguments():
    with pytest.raises(ValueError, match="needs 16 devices"):
        distributed.make_mesh(4, 4, devices=jax.devices()[:1])
    mesh = distributed.make_mesh(1, 1)
    with pytest.raises(ValueError, match="axis 'model' is not an axis of the mesh"):
        distributed.shard_batch(jnp.ones((2, 2)), mesh, axis="model")
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        distributed.shard_params({"w": jnp.ones(4)}, "cpu")
    placed = distributed.shard_batch({"x": jnp.ones((2, 3)), "s": jnp.float32(1.0), "n": None},
                                     mesh)  # fmt: skip
    assert placed["n"] is None and placed["s"].shape == ()
    assert distributed.param_spec("['w']", (6, 10), 4) == jax.sharding.PartitionSpec()
    assert distributed.param_spec("['w']", (8, 10), 4) == jax.sharding.PartitionSpec("fsdp", None)


def test_a_batch_the_data_axis_cannot_split_is_refused_by_name():
    if jax.device_count() > 1:
        pytest.skip("needs the single-device test process")
    mesh = distributed.make_mesh(1, 1)
    ok = distributed.shard_batch({"noise": np.ones((3, 2), np.float32)}, mesh)
    assert ok["noise"].shape == (3, 2)
    fake = jax.sharding.Mesh(np.array(jax.devices() * 2).reshape(2, 1), ("data", "fsdp"))
    with pytest.raises(ValueError, match=r"\['noise'\] has leading size 3, not divisible by "
                                         r"the 2 devices of mesh axis 'data'"):  # fmt: skip
        distributed.shard_batch({"noise": jnp.ones((3, 2))}, fake)
    # through jaxdiv.sample with a condition: the error names noise (it named cond)
    from jaxdiv import samplers, schedules

    with pytest.raises(ValueError, match=r"^noise has leading size 3, not divisible"):
        jaxdiv.sample(samplers.ddim(schedules.edm(), 2), lambda x, t, c: x, jnp.ones((3, 2)),
                      key=jax.random.key(0), cond=jnp.ones((3, 4)), mesh=fake)  # fmt: skip
