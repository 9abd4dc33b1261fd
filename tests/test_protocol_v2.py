"""Protocol v2: traced hyperparameters (one compile per structure), named diagnostics,
``stateless`` terms, clear errors for wrong signatures and non-finite hyperparameters."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance.spell.radius_search import build_index, build_ivf
from toy.encoder import sphere_encoder

EDM = schedules.edm()
SMP = samplers.ddim(EDM, 6)
HEUN = samplers.edm(EDM, 5)
NOISE = jax.random.normal(jax.random.key(0), (6, 2))
COND = jnp.linspace(-1.0, 1.0, 12).reshape(6, 2)
ENC = sphere_encoder(jax.random.key(3), 2)
# SPELL's reference searches (exact blockwise and IVF) run as their own jitted programs
# inside the sampler's trace: a new radius must still be a traced leaf there
_SHIELDS = jax.random.normal(jax.random.key(4), (40, 2))
EXACT_INDEX = build_index(_SHIELDS, block_size=16)
IVF_INDEX = build_ivf(_SHIELDS, 4, key=jax.random.key(5))


def gaussian_den(x, t, c):
    """Exact denoiser of N(c, 1) data on the EDM process (c = 0 without a condition)."""
    mean = 0.0 if c is None else c
    return (x + t**2 * mean) / (1 + t**2)


def _sweep(make, values, sampler=SMP, cond=None):
    """Run ``make(v)`` for each value; return (compiles after the first run, outputs)."""
    outs = []

    def run(v):
        return jaxdiv.sample(sampler, gaussian_den, NOISE, key=jax.random.key(1), cond=cond,
                             guidance=make(v)).x0  # fmt: skip

    outs.append(run(values[0]))
    before = jaxdiv.compile_count()
    outs.extend(run(v) for v in values[1:])
    return jaxdiv.compile_count() - before, outs


SWEEPS = {
    "cfg": (lambda w: guidance.cfg(w), [1.0, 2.0, 3.0, 4.5, 7.5], COND),
    "interval_scale": (lambda w: guidance.interval(w, 0.5, 10.0), [1.5, 2.0, 3.0, 4.0, 5.0], COND),
    "interval_bounds": (lambda h: guidance.interval(3.0, 0.1, h), [0.5, 2.0, 10.0, 50.0, 90.0],
                        COND),
    "cads": (lambda s: guidance.chain(guidance.cads(noise_scale=s), guidance.cfg(2.0)),
             [0.05, 0.1, 0.25, 0.5, 1.0], COND),
    "cads_tau": (lambda t: guidance.cads(tau1=t, tau2=0.9, noise_scale=0.5),
                 [0.1, 0.2, 0.3, 0.5, 0.7], COND),
    "particle": (lambda s: guidance.particle(s), [0.01, 0.02, 0.05, 0.1, 0.2], None),
    "particle_eps": (lambda s: guidance.particle(s, time_scaling="eps", min_noise_level=1.0),
                     [0.01, 0.02, 0.05, 0.1, 0.2], None),
    "interval_per_step": (lambda h: guidance.interval(3.0, 0.1, h, per_step=True),
                          [0.5, 2.0, 10.0, 50.0, 90.0], COND),
    "window_of_chain": (lambda lo: guidance.window(
        guidance.chain(guidance.particle(0.05), guidance.spell(radius=1.0)),
        noise_level=(lo, None)), [0.01, 0.5, 2.0, 10.0, 30.0], None),
    "spell": (lambda r: guidance.spell(radius=r), [0.5, 1.0, 1.5, 2.0, 3.0], None),
    "spell_reference": (lambda r: guidance.spell(radius=r, reference=EXACT_INDEX,
                                                 intra_batch=False),
                        [0.5, 1.0, 1.5, 2.0, 3.0], None),
    "spell_ivf": (lambda r: guidance.spell(radius=r, reference=IVF_INDEX, nprobe=2,
                                           intra_batch=False),
                  [0.5, 1.0, 1.5, 2.0, 3.0], None),
    "spell_lambda": (lambda lam: guidance.spell(radius=1.5, overcompensation=lam),
                     [1.0, 1.2, 1.4, 1.6, 2.0], None),
    "gass": (lambda r: guidance.gass(ENC, ENC.text_emb, r_dep=r, r_ind=r, lr=0.05, max_iters=3,
                                     num_active=2), [0.05, 0.1, 0.2, 0.3, 0.4], None),
    # num_active left at None (the paper's 20, every step of this short sampler)
    "gass_default_steps": (lambda lr: guidance.gass(ENC, ENC.text_emb, r_dep=0.1, r_ind=0.1,
                                                    lr=lr, max_iters=3),
                           [0.01, 0.02, 0.05, 0.1, 0.2], None),
    "window": (lambda lo: guidance.window(guidance.particle(0.05), noise_level=(lo, None)),
               [0.01, 0.5, 2.0, 10.0, 30.0], None),
    "chain": (lambda w: guidance.chain(cfg=guidance.cfg(w), spell=guidance.spell(radius=w / 4)),
              [2.0, 3.0, 4.0, 5.0, 6.0], COND),
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_five_value_sweep_compiles_once_and_each_value_acts(name):
    make, values, cond = SWEEPS[name]
    compiles, outs = _sweep(make, values, cond=cond)
    assert compiles == 0, f"{name}: {compiles} recompiles for new values"
    # the values are not ignored: every run gives a different batch
    flat = [np.asarray(o).ravel() for o in outs]
    for i in range(len(flat)):
        for j in range(i):
            assert not np.array_equal(flat[i], flat[j]), f"{name}: values {i} and {j} agree"


def test_sweep_on_a_heun_sampler_compiles_once():
    compiles, _ = _sweep(lambda s: guidance.particle(s), [0.01, 0.02, 0.05, 0.1, 0.2], HEUN)
    assert compiles == 0
    # per_step windows read the step's own time on Heun's second evaluation: still values
    compiles, _ = _sweep(lambda h: guidance.interval(3.0, 0.1, h, per_step=True),
                         [0.5, 2.0, 10.0, 50.0, 90.0], HEUN, cond=COND)  # fmt: skip
    assert compiles == 0


def test_new_structure_compiles_again():
    """The counter counts: a different term structure is a new program."""
    jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), guidance=guidance.particle(0.1))
    before = jaxdiv.compile_count()
    jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1),
                  guidance=guidance.particle(0.1, space="x0_hat"))  # fmt: skip
    assert jaxdiv.compile_count() - before == 1


def test_grad_reaches_a_factory_hyperparameter():
    """jax.grad through a factory call: d/ds |x0|^2 of particle(s) vs central differences
    (the forces sum to zero, so the spread, not the sum, is what the strength moves). A
    fixed bandwidth: the median one is held constant for gradients by design."""

    def f(s):
        x0 = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1),
                           guidance=guidance.particle(s, bandwidth=1.0)).x0  # fmt: skip
        return jnp.sum(x0**2)

    g = float(jax.grad(f)(0.05))
    h = 1e-3
    fd = (float(f(0.05 + h)) - float(f(0.05 - h))) / (2 * h)
    assert g == pytest.approx(fd, rel=2e-2, abs=1e-4)
    assert abs(g) > 1e-3


# ---- named diagnostics -------------------------------------------------------------


def test_chain_names_trace_info_and_state():
    g = guidance.chain(cfg=guidance.cfg(3.0), repel=guidance.spell(radius=0.8))
    out = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), cond=COND, guidance=g,
                        trace=True)  # fmt: skip
    assert set(out.trace.info) == {"cfg", "repel"} == set(out.state)
    assert isinstance(out.trace.info["repel"], guidance.SpellInfo)
    assert isinstance(out.trace.info["cfg"], guidance.CFGInfo)
    assert out.trace.info["repel"].active.shape == (6, 6)
    assert bool(jnp.all(out.trace.active["cfg"]))


def test_windowed_term_has_the_same_path():
    """info["spell"] is a SpellInfo whether or not the term is windowed; active says when."""
    plain = guidance.spell(radius=0.8)
    for g, active in ((plain, [1] * 6), (guidance.window(plain, steps=[1, 3]), [0, 1, 0, 1, 0, 0])):
        out = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), guidance=g,
                            trace=True)  # fmt: skip
        info = out.trace.info["spell"]
        assert isinstance(info, guidance.SpellInfo)
        assert out.trace.active["spell"].astype(int).tolist() == active
        off = ~np.asarray(out.trace.active["spell"])
        assert not np.any(np.asarray(info.delta_norm)[off])   # zeros where inactive


def test_positional_duplicates_are_numbered_and_keywords_kept():
    g = guidance.chain(guidance.particle(0.1), guidance.particle(0.2), mine=guidance.particle(0.3))
    assert g.names == ("particle", "particle_2", "mine")
    out = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), guidance=g, trace=True)
    assert set(out.trace.info) == {"particle", "particle_2", "mine"}
    # chained in order: each term's info sees its own weight (strength * noise_level^2)
    lvl = np.asarray(out.trace.t) ** 2
    for name, s in (("particle", 0.1), ("particle_2", 0.2), ("mine", 0.3)):
        np.testing.assert_allclose(out.trace.info[name].weight, s * lvl, rtol=1e-5)


def test_guidance_state_must_match_the_names():
    g = guidance.spell(radius=0.5, memory_size=12)
    out = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), guidance=g)
    assert int(out.state["spell"].count) == 6
    out2 = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(2), guidance=g,
                         guidance_state=out.state)  # fmt: skip
    assert int(out2.state["spell"].count) == 12
    with pytest.raises(ValueError, match="guidance_state"):
        jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(2), guidance=g,
                      guidance_state=(out.state["spell"],))  # fmt: skip


# ---- stateless terms and signatures -------------------------------------------------


def _away_from_mean(x0_hat, ctx, strength):
    return x0_hat + strength * (x0_hat - x0_hat.mean(axis=0))


def away_from_mean(strength):
    return guidance.stateless("x0", _away_from_mean, strength=strength)


def test_stateless_custom_term_matches_its_formula_and_sweeps_without_recompiling():
    """The README's custom term: with a 1-step grid the output is exactly the formula."""
    s = samplers.ddim(EDM, 1)
    out = jaxdiv.sample(s, gaussian_den, NOISE, key=jax.random.key(0), guidance=away_from_mean(0.5))
    x0 = np.asarray(gaussian_den(80.0 * NOISE, 80.0, None))
    np.testing.assert_allclose(out.x0, x0 + 0.5 * (x0 - x0.mean(0)), rtol=1e-6)
    compiles, _ = _sweep(away_from_mean, [0.1, 0.2, 0.3, 0.4, 0.5])
    assert compiles == 0
    assert away_from_mean(0.1).name == "away_from_mean"


def _scaled_with_info(x0_hat, ctx, k):
    return k * x0_hat, {"k_times_t": k * ctx.t}


def test_stateless_info_lands_in_the_trace():
    g = guidance.stateless("x0", _scaled_with_info, info=True, k=2.0)
    out = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(0), guidance=g, trace=True)
    np.testing.assert_allclose(out.trace.info["scaled_with_info"]["k_times_t"], 2 * out.trace.t)


def test_wrong_apply_signature_is_a_clear_error():
    bad = guidance.GuidanceTerm(lambda x, c, k: (), lambda x0, ctx: (x0, (), ()), "x0")
    with pytest.raises(TypeError, match=r"apply\(state, x0_hat, ctx\)"):
        jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(0), guidance=bad)
    bad_init = guidance.GuidanceTerm(lambda x: (), lambda s, c, ctx: (c, s, ()), "condition")
    with pytest.raises(TypeError, match=r"init\(x, cond, key\)"):
        guidance.chain(bad_init)
    with pytest.raises(TypeError, match=r"cond, ctx, strength"):
        guidance.stateless("condition", lambda c, strength: c, strength=1.0)
    with pytest.raises(ValueError, match="hook must be one of"):
        guidance.stateless("score", _away_from_mean, strength=1.0)
    no_info = guidance.stateless("x0", _away_from_mean, info=True, strength=1.0)
    with pytest.raises(TypeError, match=r"stateless term fn '_away_from_mean' was built with "
                                        r"info=True, so it must return \(out, info\); got "):
        jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(0), guidance=no_info)


def test_wrong_kinds_of_sample_and_sampler_arguments_are_named():
    with pytest.raises(TypeError, match=r"^trace must be a bool, got str 'no'$"):
        jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(0), trace="no")
    with pytest.raises(TypeError, match=r"^schedule must be a process such as schedules.edm\(\) "
                                        r"\(with alpha, sigma, grid\), got the function edm: "
                                        r"call it, e.g. edm\(\)$"):
        samplers.ddim(schedules.edm, 4)
    with pytest.raises(TypeError, match=r"got str 'edm'$"):
        samplers.dpmpp_2m("edm", 4)
    with pytest.raises(TypeError, match=r"^denoiser must be callable as denoiser\(x, t, cond\) "
                                        r"-> x0_hat \(cond is None when unconditional\), got "
                                        r"<lambda>\(x, t\)$"):
        jaxdiv.sample(SMP, lambda x, t: x, NOISE, key=jax.random.key(0))
    # an epsilon network where alpha = 0 (flow's t = 1) would give NaN everywhere
    from jaxdiv import predictions

    flow = schedules.flow(shift=3.0)
    eps_net = predictions.as_denoiser(lambda x, t, c: jnp.zeros_like(x), flow, "epsilon")
    with pytest.raises(ValueError, match=r"^denoiser: an epsilon-prediction network gives "
                                         r"x0_hat = \(x - sigma eps\) / alpha, undefined "
                                         r"where alpha = 0, and the sampler evaluates it at "
                                         r"t = 1 \(flow\)"):
        jaxdiv.sample(samplers.ddim(flow, 4), eps_net, NOISE, key=jax.random.key(0))
    with pytest.raises(TypeError, match=r"^schedule must be a process such as "
                                        r"schedules.edm\(\) \(with alpha, sigma\), got "
                                        r"NoneType None$"):
        predictions.as_denoiser(lambda x, t, c: x, None)
    # a custom sampler's grid (the factories check their own)
    with pytest.raises(TypeError, match=r"^sampler.times must be an array"):
        jaxdiv.sample(SMP._replace(times=[80.0, 1.0, 0.0]), gaussian_den, NOISE,
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(ValueError, match=r"^sampler.times must be a decreasing 1-D grid of at "
                                         r"least 2 times, got \[1.0, 80.0, 0.0\]"):
        jaxdiv.sample(SMP._replace(times=jnp.array([1.0, 80.0, 0.0])), gaussian_den, NOISE,
                      key=jax.random.key(0))  # fmt: skip
    with pytest.raises(TypeError, match=r"^times must be real numbers, got dtype <U2"):
        samplers.ddim(schedules.edm(), times=["80", "1", "0"])
    below = samplers.ddim(flow, 4).times.at[0].set(0.999)
    out = jaxdiv.sample(samplers.ddim(flow, 4, times=below), eps_net, NOISE, key=jax.random.key(0))
    assert bool(jnp.isfinite(out.x0).all())


# ---- non-finite and invalid hyperparameters -----------------------------------------

NAN, INF = float("nan"), float("inf")
BAD = [
    (lambda: guidance.cfg(NAN), "scale"),
    (lambda: guidance.cfg(INF), "scale"),
    (lambda: guidance.cfg(2.0, null_cond=jnp.array([NAN])), "null_cond"),
    (lambda: guidance.particle(NAN), "strength"),
    (lambda: guidance.particle(0.1, bandwidth=INF), "bandwidth"),
    (lambda: guidance.particle(0.1, min_noise_level=NAN), "min_noise_level"),
    (lambda: guidance.spell(radius=1e19), "radius"),
    (lambda: guidance.spell(radius=NAN), "radius"),
    (lambda: guidance.spell(radius=1.0, overcompensation=INF), "overcompensation"),
    (lambda: guidance.spell(radius=1.0, reference=jnp.array([[NAN, 0.0]])), "reference"),
    (lambda: guidance.cads(noise_scale=INF), "noise_scale"),
    (lambda: guidance.cads(psi=NAN), "psi"),
    (lambda: guidance.interval(NAN, 0.1, 1.0), "scale"),
    (lambda: guidance.interval(2.0, NAN, 1.0), "sigma_lo"),
    (lambda: guidance.window(guidance.cfg(2.0), t=(NAN, 1.0)), "t"),
    (lambda: guidance.gass(ENC, ENC.text_emb, lr=INF), "lr"),
    (lambda: guidance.gass(ENC, ENC.text_emb, r_dep=NAN), "r_dep"),
    (lambda: guidance.gass(ENC, jnp.array([NAN, 1.0])), "text_emb"),
    (lambda: guidance.stateless("x0", _away_from_mean, strength=NAN), "strength"),
    (lambda: samplers.ddim(EDM, 4, eta=INF), "eta"),
    (lambda: samplers.ddim(EDM, 4, eta=NAN), "eta"),
    (lambda: samplers.edm(EDM, 4, s_churn=INF), "s_churn"),
    (lambda: samplers.edm(EDM, 4, s_noise=NAN), "s_noise"),
]


@pytest.mark.parametrize("make,arg", BAD, ids=[f"{i}-{a}" for i, (_, a) in enumerate(BAD)])
def test_non_finite_hyperparameters_are_refused_naming_the_argument(make, arg):
    with pytest.raises(ValueError, match=rf"^{arg}\b"):
        make()


def test_documented_infinities_are_accepted():
    samplers.edm(EDM, 4, s_tmax=INF)
    guidance.interval(2.0, 0.5, INF)
    guidance.window(guidance.cfg(2.0), noise_level=(0.5, INF))


def test_traced_hyperparameters_pass_through_jit():
    @jax.jit
    def run(w):
        return jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), cond=COND,
                             guidance=guidance.cfg(w)).x0  # fmt: skip

    eager = jaxdiv.sample(SMP, gaussian_den, NOISE, key=jax.random.key(1), cond=COND,
                          guidance=guidance.cfg(3.0)).x0  # fmt: skip
    np.testing.assert_allclose(run(3.0), eager, rtol=1e-6)


def test_factory_signatures_have_docstring_examples():
    """Every public factory documents itself with a runnable example."""
    for fn in (guidance.cfg, guidance.interval, guidance.cads, guidance.particle, guidance.spell,
               guidance.gass, guidance.window, guidance.chain, guidance.stateless, jaxdiv.sample,
               jaxdiv.compile_count):  # fmt: skip
        assert ">>>" in (inspect.getdoc(fn) or ""), fn.__name__
