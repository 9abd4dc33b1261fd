"""x64 mode (``jax.enable_x64``): a float64 run stays float64 through every guidance term,
toy and sampler, and computes what the float32 run computes.

Researchers switch x64 on for convergence studies on the toys; before this file SPELL
raised a TypeError there (its tie-break directions were drawn in float64 inside a float32
``lax.cond``), rounded every row of ``x0_hat`` to float32 (untouched rows included), and
the toys stored their parameters in float32.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
import toy
from jaxdiv import guidance as G
from jaxdiv import samplers, schedules
from jaxdiv.guidance.cads import cads_gamma
from toy.encoder import sphere_encoder
from toy.mlp import init_mlp, load_mlp, save_mlp

M = 16  # condition / embedding width
B = 6


def _ring():
    ang = jnp.arange(8) * 2 * jnp.pi / 8
    return np.asarray(3.0 * jnp.stack([jnp.cos(ang), jnp.sin(ang)], 1), np.float64)


def _setup():
    """A float64 ring mixture, its EDM denoiser with a condition and a float64 batch."""
    gm = toy.GaussianMixture(_ring(), np.full(8, 0.05))
    sch = schedules.edm()
    den0 = gm.denoiser(sch)
    den = lambda x, t, c: den0(x, t) + 0.01 * jnp.mean(c, -1, keepdims=True)  # noqa: E731
    noise = np.random.default_rng(0).normal(size=(B, 2))
    cond = np.linspace(0.5, 1.5, B * M).reshape(B, M)
    return gm, sch, den, noise, cond


def _terms(enc):
    offsets = np.random.default_rng(1).normal(size=(B, M))
    return {
        "cfg": G.cfg(2.0),
        "interval": G.interval(2.0, 0.5, 5.0),
        "cads": G.chain(G.cads(), G.cfg(2.0)),
        "particle": G.particle(0.5),
        "spell": G.spell(1.0),
        "spell_reference": G.spell(1.0, reference=_ring()),
        "spell_memory": G.spell(1.0, memory_size=12),
        "gass": G.gass(enc, enc.text_emb, r_dep=0.1, r_ind=0.1, lr=0.05, steps="all",
                       max_iters=3),  # fmt: skip
        "tpso": G.chain(G.tpso(offsets, ratio=0.5), G.cfg(2.0)),
    }


# terms whose run draws no random numbers: the float64 and float32 runs take the same path
DETERMINISTIC = ("cfg", "interval", "particle", "spell", "spell_reference", "spell_memory",
                 "tpso")  # fmt: skip


@pytest.mark.parametrize("name", list(_terms(sphere_encoder(jax.random.key(0), 2, M))))
def test_every_term_runs_in_float64_and_agrees_with_float32(name):
    enc_key = jax.random.key(0)
    with jax.enable_x64(True):
        gm, sch, den, noise, cond = _setup()
        enc = sphere_encoder(enc_key, 2, M, center=np.zeros(2), scale=3.0)
        s = samplers.edm(sch, 8)
        out64 = jaxdiv.sample(s, den, jnp.asarray(noise), key=jax.random.key(1),
                              cond=jnp.asarray(cond), guidance=_terms(enc)[name])  # fmt: skip
        x64 = np.asarray(out64.x0)
        assert x64.dtype == np.float64 and np.isfinite(x64).all()
    if name not in DETERMINISTIC:
        return
    gm, sch, den, noise, cond = _setup()
    enc = sphere_encoder(enc_key, 2, M, center=np.zeros(2), scale=3.0)
    out32 = jaxdiv.sample(samplers.edm(sch, 8), den, jnp.asarray(noise, jnp.float32),
                          key=jax.random.key(1), cond=jnp.asarray(cond, jnp.float32),
                          guidance=_terms(enc)[name])  # fmt: skip
    x32 = np.asarray(out32.x0)
    assert x32.dtype == np.float32
    # the same algorithm at two precisions: they differ by float32 rounding (samples of
    # size ~3, 15 evaluations; measured up to 8.4e-6)
    np.testing.assert_allclose(x64, x32, rtol=0, atol=5e-5)


@pytest.mark.exact_codegen
@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_spell_leaves_rows_outside_every_shield_bit_for_bit_in_float64(sampler):
    """Sparsity (Sec. 5.4) in x64: a sample no shield touches is the unguided float64 run
    itself, not its float32 rounding."""
    with jax.enable_x64(True):
        gm, sch, den, _, _ = _setup()
        s = getattr(samplers, sampler)(sch, 6)
        noise = jnp.array([[1.0, 0.0], [-0.5, 0.866], [-0.5, -0.866]])
        key = jax.random.key(2)
        plain = np.asarray(jaxdiv.sample(s, den, noise, key=key, cond=jnp.zeros((3, M))).x0)
        # a shield on the ring mode the first sample ends in: only that sample meets it
        modes = _ring()
        shield = modes[np.argmin(np.linalg.norm(modes - plain[0], axis=1))]
        term = G.spell(1.0, reference=shield[None], intra_batch=False)
        out = jaxdiv.sample(s, den, noise, key=key, cond=jnp.zeros((3, M)), guidance=term,
                            trace=True)  # fmt: skip
        active = np.asarray(out.trace.info["spell"].active)
        assert active[:, 0].any() and not active[:, 1:].any()
        got = np.asarray(out.x0)
        assert got.dtype == np.float64
        assert got[1:].tobytes() == plain[1:].tobytes()
        assert np.abs(got[0] - plain[0]).max() > 1e-3  # the first sample did move


def test_spell_shift_is_added_in_float64():
    """One evaluation by hand: ``x + (r / d - 1) (x - z)`` in float64, where the float32
    search finds the shield; a float32 round trip would be off by ~1e-8 here."""
    with jax.enable_x64(True):
        x = jnp.array([[0.1234567890123, 0.0]])
        z = jnp.array([[0.0, 0.0]])
        term = G.spell(1.0, reference=z, intra_batch=False)
        state = term.init(x, None, jax.random.key(0))
        ctx = G.StepContext(x, 1.0, 1.0, 1.0, 0, 4, jax.random.key(0), None)
        out, _, info = term.apply(state, x, ctx)
        assert out.dtype == jnp.float64 and info.num_active_shields.tolist() == [1]
        # r / d - 1 times x - z, i.e. the point moves to distance r = 1 from z
        assert float(out[0, 0]) == pytest.approx(1.0, abs=1e-7)
        single = G.spell(1.0)  # a batch of one: nothing to repel, x0_hat exactly
        out1, _, _ = single.apply(single.init(x, None, jax.random.key(0)), x, ctx)
        assert np.asarray(out1).tobytes() == np.asarray(x).tobytes()


def test_toys_keep_float64_parameters():
    with jax.enable_x64(True):
        data = np.random.default_rng(3).normal(size=(50, 2))
        gm = toy.GaussianMixture(_ring(), np.full(8, 0.05))
        assert gm.means.dtype == jnp.float64
        emp = toy.EmpiricalDenoiser(data, schedules.edm())
        x = jnp.asarray(data[:7] + 1e-9)
        # at sigma = 0 the empirical denoiser is the nearest data point: the float64 one
        np.testing.assert_array_equal(np.asarray(emp(x, 0.0)), data[:7])
        cm = toy.ring_of_classes()
        assert cm.null_condition(2).dtype == jnp.float64
    with jax.enable_x64(False):
        assert toy.GaussianMixture(_ring(), np.full(8, 0.05)).means.dtype == jnp.float32


def test_mlp_round_trip_keeps_float64(tmp_path):
    with jax.enable_x64(True):
        params = init_mlp(jax.random.key(0), hidden=8, depth=2)
        assert params["w0"].dtype == jnp.float64
        save_mlp(tmp_path / "m.safetensors", params, sigma_data=0.5)
        loaded, _ = load_mlp(tmp_path / "m.safetensors")
        for k, v in params.items():
            assert loaded[k].dtype == jnp.float64
            np.testing.assert_array_equal(np.asarray(loaded[k]), np.asarray(v))
    params32 = init_mlp(jax.random.key(0), hidden=8, depth=2)
    save_mlp(tmp_path / "m32.safetensors", params32, sigma_data=0.5)
    from safetensors.numpy import load_file

    assert {a.dtype for a in load_file(str(tmp_path / "m32.safetensors")).values()} == {
        np.dtype(np.float32)
    }


def test_cads_schedule_in_float64():
    with jax.enable_x64(True):
        g = cads_gamma(0.75, 0.6, 0.9)
        assert g.dtype == jnp.float64
        assert float(g) == pytest.approx((0.9 - 0.75) / (0.9 - 0.6), abs=1e-15)


def test_vp_schedule_in_float64_and_float32_runs_stay_float32():
    # SD's scaled-linear betas, float32 as in diffusers; their cumulative product in float64
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float32) ** 2
    abar = np.cumprod(1.0 - betas.astype(np.float64))
    with jax.enable_x64(True):
        sch = schedules.vp_scaled_linear()
        assert sch.alphas_cumprod.dtype == jnp.float64 and sch.grid(4).dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(sch.alpha(10.5)),
                                   np.sqrt(0.5 * (abar[10] + abar[11])), rtol=1e-14)  # fmt: skip
        assert float(sch.t_of_noise_level(sch.noise_level(123.0))) == pytest.approx(123.0, 1e-9)
        gm = toy.GaussianMixture(_ring(), np.full(8, 0.05))
        for dtype in (jnp.float32, jnp.float64):
            out = jaxdiv.sample(samplers.dpmpp_2m(sch, 5), gm.denoiser(sch),
                                jnp.ones((3, 2), dtype), key=jax.random.key(0))  # fmt: skip
            assert out.x0.dtype == dtype
    assert schedules.vp_scaled_linear().alphas_cumprod.dtype == jnp.float32


@pytest.mark.parametrize("make, values", [
    # rescale=False: the toy denoiser reads the condition's mean, which rescaling restores
    (lambda s: G.chain(G.cads(noise_scale=s, rescale=False), G.cfg(2.0)), [0.1, 0.25, 0.5]),
    (lambda r: G.spell(r), [0.5, 1.0, 2.0]),
    (lambda a: G.chain(G.tpso(np.ones((B, M)), ratio=a), G.cfg(2.0)), [0.3, 0.5, 0.8]),
])  # fmt: skip
def test_a_float64_sweep_compiles_once(make, values):
    """The terms' numbers stay traced leaves in x64 mode: a new value never recompiles."""
    with jax.enable_x64(True):
        _, sch, den, noise, cond = _setup()
        s = samplers.ddim(sch, 6)

        def run(v):
            out = jaxdiv.sample(s, den, jnp.asarray(noise), key=jax.random.key(1),
                                cond=jnp.asarray(cond), guidance=make(v))  # fmt: skip
            return np.asarray(out.x0)

        first = run(values[0])
        before = jaxdiv.compile_count()
        rest = [run(v) for v in values[1:]]
        assert jaxdiv.compile_count() == before
        assert all(r.dtype == np.float64 for r in rest)
        assert all(np.abs(r - first).max() > 0 for r in rest)  # each value acts
