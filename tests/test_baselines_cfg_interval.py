"""CFG and interval guidance on the conditional toy, step by step, on all three samplers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdiv
from jaxdiv import guidance, samplers, schedules
from jaxdiv.guidance.interval import interval
from toy.conditional import ring_of_classes

CM = ring_of_classes()
B = 6


def make_sampler(name):
    if name == "ddim":  # VP process
        return samplers.ddim(schedules.vp_scaled_linear(), 12)
    if name == "edm":  # EDM process, Heun
        return samplers.edm(schedules.edm(), 10)
    return samplers.flow_euler(schedules.flow(shift=3.0), 12)


@pytest.fixture(scope="module", params=["ddim", "edm", "flow_euler"])
def setup(request):
    s = make_sampler(request.param)
    den = CM.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (B, 2))
    cond = CM.condition(jnp.arange(B) % CM.num_classes)
    # one outer program per sampler for every scale and interval (they are arguments)
    run = jax.jit(
        lambda w, lo, hi, noise, cond: jaxdiv.sample(
            s, den, noise, key=jax.random.key(1), cond=cond,
            guidance=interval(w, lo, hi), trace=True,
        )
    )  # fmt: skip
    # the conditional and unconditional denoisers at every traced (x_i, t_i)
    per_step = jax.jit(jax.vmap(lambda x, t, c: den(x, t, c), (0, 0, None)))
    return s, den, noise, cond, run, per_step


def test_interval_is_cfg_inside_and_conditional_outside(setup):
    s, den, noise, cond, run, per_step = setup
    w, lo, hi = 3.0, 0.5, 4.0
    out = run(w, lo, hi, noise, cond)
    tr = out.trace
    d_c = per_step(tr.x, tr.t, cond)
    d_u = per_step(tr.x, tr.t, jnp.zeros_like(cond))
    level = np.asarray(s.schedule.noise_level(tr.t))
    inside = (level > lo) & (level <= hi)
    assert inside.any() and (~inside).any(), level  # the test exercises both branches
    expected = jnp.where(inside[:, None, None], d_u + w * (d_c - d_u), d_c)
    np.testing.assert_allclose(tr.x0_hat, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(tr.active["interval"]), inside)
    # the CFGInfo is the batch-mean RMS of D_c - D_u inside, zeros outside
    rms = jnp.sqrt(jnp.mean((d_c - d_u) ** 2, axis=-1)).mean(axis=-1)
    np.testing.assert_allclose(tr.info["interval"].guidance_norm, jnp.where(inside, rms, 0.0),
                               rtol=1e-4, atol=1e-5)  # fmt: skip
    # the trace's first step is a single direct evaluation at the scaled initial noise
    x_init = s.schedule.init_noise_scale(s.times[0]) * noise
    np.testing.assert_allclose(tr.x[0], x_init, rtol=1e-6)
    d_c0, d_u0 = den(x_init, s.times[0], cond), den(x_init, s.times[0], jnp.zeros_like(cond))
    first = d_u0 + w * (d_c0 - d_u0) if inside[0] else d_c0
    np.testing.assert_allclose(tr.x0_hat[0], first, rtol=1e-4, atol=1e-4)
    # and the output is the last step's x0_hat (every grid ends at sigma = 0)
    np.testing.assert_allclose(out.x0, tr.x0_hat[-1], atol=1e-6)


def _official_edm2_sampler(d_cond, d_uncond, latents, guidance_scale, guidance_interval,
                           num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """``edm_sampler`` of the official interval-guidance code, transcribed in float64 NumPy
    from kynkaat/guidance-interval, sampling/edm_sampler.py (S_churn = 0, so ``t_hat =
    t_cur``; ``round_sigma`` the identity): the Karras grid with a final 0, and Heun steps
    whose two evaluations both use ``uncond.lerp(cond, G)`` when the step index ``i``
    satisfies ``start <= i <= stop``, the conditional denoiser otherwise."""
    start, stop = guidance_interval
    idx = np.arange(num_steps, dtype=np.float64)
    t_steps = (sigma_max ** (1 / rho) + idx / (num_steps - 1)
               * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho  # fmt: skip
    t_steps = np.append(t_steps, 0.0)
    x_next = np.asarray(latents, np.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        guided = start <= i <= stop

        def denoise(x, t, guided=guided):
            c = d_cond(x, t)
            return d_uncond(x, t) + guidance_scale * (c - d_uncond(x, t)) if guided else c

        x_hat, t_hat = x_next, t_cur
        d_cur = (x_hat - denoise(x_hat, t_hat)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


def test_per_step_interval_is_edm2s_official_code():
    """``interval(2.0, 0.19, 1.61, per_step=True)`` on Heun 32 is the official code's
    ``--guidance_interval="[17, 22]" --guidance_scale=2.0`` (its README's FID setting):
    guided steps 17..22, both evaluations of each. The default (per evaluation) guides
    step 16's correction at sigma 1.609 and not step 22's at 0.189: another trajectory."""
    s = samplers.edm(schedules.edm(), 32)
    den = CM.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(2), (B, 2))
    cond = CM.condition(jnp.arange(B) % CM.num_classes)
    null = jnp.zeros_like(cond)
    call = lambda c: lambda x, t: np.asarray(den(jnp.asarray(x, jnp.float32), t, c), np.float64)
    ref = _official_edm2_sampler(call(cond), call(null), noise, 2.0, (17, 22))
    times = np.asarray(s.times)
    assert times[17] <= 1.61 < times[16] and times[23] <= 0.19 < times[22]
    assert round(float(times[17]), 3) == 1.609 and round(float(times[23]), 3) == 0.189

    def run(per_step):
        g = interval(2.0, 0.19, 1.61, null_cond=null, per_step=per_step)
        return jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, guidance=g,
                             trace=True)  # fmt: skip

    got, per_eval = run(True), run(False)
    np.testing.assert_allclose(got.x0, ref, rtol=1e-4, atol=1e-4)
    active = np.flatnonzero(np.asarray(got.trace.active["interval"]))
    assert active.tolist() == list(range(17, 23))
    gap = float(np.abs(np.asarray(per_eval.x0, np.float64) - ref).max())
    assert gap > 1e-2, gap  # the per-evaluation rule is measurably another sampler here
    # on a one-evaluation sampler the two rules agree
    d = samplers.ddim(schedules.edm(), 32)
    one = [jaxdiv.sample(d, den, noise, key=jax.random.key(1), cond=cond,
                         guidance=interval(2.0, 0.19, 1.61, null_cond=null, per_step=p)).x0
           for p in (True, False)]  # fmt: skip
    np.testing.assert_array_equal(one[0], one[1])


def test_interval_rescales_inside_as_lin_et_al_and_keeps_d_c_outside():
    """``interval(rescale=phi, prediction_type="sample")``: inside the interval the guided
    prediction (here ``x0_hat`` itself) is rescaled as Lin et al. (2024) Sec. 3.4, ``p_cfg
    (phi std(p_c) / std(p_cfg) + 1 - phi)`` with Bessel's correction (diffusers'
    ``rescale_noise_cfg``), recomputed in NumPy from the denoisers at the traced points;
    outside it is ``D_c``, untouched. (The other prediction spaces: the cfg test below.)"""
    s = make_sampler("edm")
    den = CM.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(0), (B, 2))
    cond = CM.condition(jnp.arange(B) % CM.num_classes)
    w, lo, hi, phi = 3.0, 0.5, 4.0, 0.7
    g = interval(w, lo, hi, rescale=phi, prediction_type="sample")
    tr = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, guidance=g,
                       trace=True).trace  # fmt: skip
    per_step = jax.vmap(lambda x, t, c: den(x, t, c), (0, 0, None))
    d_c = np.asarray(per_step(tr.x, tr.t, cond), np.float64)
    d_u = np.asarray(per_step(tr.x, tr.t, jnp.zeros_like(cond)), np.float64)
    level = np.asarray(s.schedule.noise_level(tr.t))
    inside = (level > lo) & (level <= hi)
    assert inside.any() and (~inside).any(), level
    p_cfg = d_u + w * (d_c - d_u)
    factor = phi * d_c.std(axis=-1, ddof=1) / p_cfg.std(axis=-1, ddof=1) + 1 - phi
    expected = np.where(inside[:, None, None], p_cfg * factor[..., None], d_c)
    np.testing.assert_allclose(tr.x0_hat, expected, rtol=1e-4, atol=1e-4)
    assert np.abs(expected - p_cfg)[inside].max() > 1e-2  # the rescale acted
    np.testing.assert_allclose(tr.info["interval"].rescale_factor,
                               np.where(inside, factor.mean(axis=-1), 0.0), rtol=1e-4)  # fmt: skip
    # phi, the scale and the ends are traced leaves: new values reuse the program
    before = jaxdiv.compile_count()
    other = jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond, trace=True,
                          guidance=interval(2.0, 0.4, 5.0, rescale=0.3,
                                            prediction_type="sample")).trace  # fmt: skip
    assert jaxdiv.compile_count() == before
    assert np.abs(np.asarray(other.x0_hat) - np.asarray(tr.x0_hat)).max() > 1e-2


def test_interval_means_the_same_noise_levels_on_every_process(setup):
    """An interval covering every noise level is CFG itself; an empty one is D_c."""
    s, den, noise, cond, run, per_step = setup
    full = run(2.0, 0.0, jnp.inf, noise, cond)  # flow starts at level inf
    tr = full.trace
    level = np.asarray(s.schedule.noise_level(tr.t))
    assert np.isinf(level[0]) == (s.name == "flow_euler")
    d_c = per_step(tr.x, tr.t, cond)
    d_u = per_step(tr.x, tr.t, jnp.zeros_like(cond))
    np.testing.assert_allclose(tr.x0_hat, d_u + 2.0 * (d_c - d_u), rtol=1e-4, atol=1e-4)
    assert bool(jnp.all(tr.active["interval"]))
    empty = run(2.0, 1e8, 1e9, noise, cond).trace  # above sigma_max, below inf
    assert not np.any((level > 1e8) & (level <= 1e9))  # no level lies in (1e8, 1e9]
    np.testing.assert_allclose(empty.x0_hat, per_step(empty.x, empty.t, cond), atol=1e-5)
    assert not bool(jnp.any(empty.active["interval"]))
    np.testing.assert_array_equal(empty.info["interval"].guidance_norm, 0.0)


def test_one_program_for_every_scale_and_interval(setup):
    """The scale and the interval's ends are traced leaves: new values never recompile,
    without an outer jit too."""
    s, den, noise, cond, run, per_step = setup
    go = lambda w, lo, hi: jaxdiv.sample(s, den, noise, key=jax.random.key(1), cond=cond,
                                         guidance=interval(w, lo, hi), trace=True)  # fmt: skip
    go(2.0, 0.0, jnp.inf)
    before = jaxdiv.compile_count()
    outs = [go(w, lo, hi) for w, lo, hi in [(3.0, 0.5, 4.0), (1.5, 5.0, 10.0), (0.0, 0.1, 0.2)]]
    assert jaxdiv.compile_count() == before
    # and the values did take effect: the same results as the jitted runs
    ref = run(3.0, 0.5, 4.0, noise, cond)
    np.testing.assert_allclose(outs[0].x0, ref.x0, rtol=1e-5, atol=1e-5)
    assert float(jnp.abs(outs[0].x0 - outs[1].x0).max()) > 1e-3


@pytest.mark.parametrize("name", ["ddim", "edm", "flow_euler"])
def test_cfg_scale_one_is_conditional_and_zero_unconditional(name):
    s = make_sampler(name)
    den = CM.denoiser(s.schedule)
    noise = jax.random.normal(jax.random.key(2), (B, 2))
    cond = CM.condition(jnp.arange(B) % CM.num_classes)
    # noise and cond are arguments: sample() checks concrete inputs eagerly
    run = jax.jit(lambda w, c, z: jaxdiv.sample(s, den, z, key=jax.random.key(3), cond=c,
                                                guidance=guidance.cfg(w), trace=True))  # fmt: skip
    per_step = jax.jit(jax.vmap(lambda x, t, c: den(x, t, c), (0, 0, None)))
    for w, c_expected in [(1.0, cond), (0.0, jnp.zeros_like(cond))]:
        tr = run(w, cond, noise).trace
        np.testing.assert_allclose(tr.x0_hat, per_step(tr.x, tr.t, c_expected), atol=2e-5)
    # and w = 0 with a condition samples the null model: same output as no condition at all
    plain = jaxdiv.sample(s, den, noise, key=jax.random.key(3))
    np.testing.assert_allclose(run(0.0, cond, noise).x0, plain.x0, atol=1e-4)


def test_cfg_sharpens_the_class_and_interval_keeps_more_modes():
    """Qualitative check of the baselines' known effect: higher w raises the toy CLIP
    score of the sampled class; a late-only interval keeps more within-class spread."""
    s = samplers.edm(schedules.edm(), 12)
    den = CM.denoiser(s.schedule)
    n = 512
    noise = jax.random.normal(jax.random.key(4), (n, 2))
    cond = jnp.broadcast_to(CM.condition(0), (n, CM.cond_dim))
    run_ = jax.jit(lambda w, lo, hi, z, c: jaxdiv.sample(
        s, den, z, key=jax.random.key(5), cond=c, guidance=interval(w, lo, hi)).x0)
    run = lambda w, lo, hi: run_(w, lo, hi, noise, cond)
    x1 = run(1.0, 0.0, 1e9)
    x4 = run(4.0, 0.0, 1e9)
    x4_late = run(4.0, 0.0, 0.5)
    clip = lambda x: float(CM.clip_score(x, 0).mean())
    assert clip(x4) > clip(x1) + 0.03
    spread = lambda x: float(jnp.mean(jnp.linalg.norm(x[:, None] - x[None], axis=-1)))
    assert spread(x4_late) > spread(x4)


def test_interval_bad_input():
    with pytest.raises(ValueError, match=r"got sigma_lo=1.1, sigma_hi=0.3$"):  # as given
        interval(2.0, 1.1, 0.3)
    with pytest.raises(ValueError, match=r"sigma_lo must be a finite number >= 0, got -0.1"):
        interval(2.0, -0.1, 1.0)
    with pytest.raises(TypeError, match="sigma_hi must be a real number"):
        interval(2.0, 0.1, "big")
    g = interval(2.0, 0.19, float("inf"))
    assert g.hook == "denoiser"
    # the CFG rescale's checks, naming interval
    with pytest.raises(ValueError, match=r"^interval\(rescale=...\) needs prediction_type="):
        interval(2.0, 0.1, 1.0, rescale=0.7)
    with pytest.raises(ValueError, match=r"^interval: prediction_type='sample' would never"):
        interval(2.0, 0.1, 1.0, prediction_type="sample")
    with pytest.raises(ValueError, match="rescale must be a finite number"):
        interval(2.0, 0.1, 1.0, rescale=float("nan"), prediction_type="sample")
    with pytest.raises(TypeError, match=r"^per_step must be True or False, got 1$"):
        interval(2.0, 0.1, 1.0, per_step=1)
    with pytest.raises(ValueError, match=r"per_step=True needs t= or noise_level="):
        guidance.window(guidance.cfg(2.0), steps=[0], per_step=True)


@pytest.mark.parametrize("prediction_type, alpha, sigma", [
    ("epsilon", 0.6, 0.8), ("v_prediction", 0.6, 0.8), ("sample", 0.6, 0.8), ("flow", 0.3, 0.7),
])  # fmt: skip
def test_cfg_rescale_is_diffusers_rescale_noise_cfg_in_the_prediction_space(
    prediction_type, alpha, sigma
):
    """``cfg(rescale=phi, prediction_type=...)`` on given conditional / unconditional
    ``x0_hat``: the network's predictions combined with CFG and passed through diffusers'
    ``rescale_noise_cfg`` (Lin et al. 2024 Sec. 3.4, computed in float64 by torch), back in
    x0-space. The SD pipeline's end-to-end parity with ``guidance_rescale`` is in
    tests/test_pipeline_sd.py."""
    pytest.importorskip("diffusers")
    import torch
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    from jaxdiv.guidance import StepContext
    from jaxdiv.predictions import from_prediction, to_prediction

    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (3, 4, 5, 5))
    d_c, d_u = jax.random.normal(k[1], x.shape), 0.5 * jax.random.normal(k[2], x.shape)
    ctx = StepContext(x, 0.5, jnp.float32(alpha), jnp.float32(sigma), 0, 4, k[3],
                      jnp.ones((3, 2)))  # fmt: skip
    term = guidance.cfg(7.5, null_cond=jnp.zeros(2), rescale=0.7, prediction_type=prediction_type)
    got, _, info = term.apply((), lambda xx, c: jnp.concatenate([d_c, d_u]), ctx)

    def pred(x0):
        return torch.from_numpy(np.asarray(
            to_prediction(np.asarray(x0, np.float64), np.asarray(x, np.float64), alpha, sigma,
                          prediction_type)))  # fmt: skip

    p_c, p_u = pred(d_c), pred(d_u)
    p = rescale_noise_cfg(p_u + 7.5 * (p_c - p_u), p_c, guidance_rescale=0.7).numpy()
    want = from_prediction(p, np.asarray(x, np.float64), alpha, sigma, prediction_type)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-6 * scale)
    plain, _, _ = guidance.cfg(7.5, null_cond=jnp.zeros(2)).apply(
        (), lambda xx, c: jnp.concatenate([d_c, d_u]), ctx)  # fmt: skip
    assert float(jnp.abs(got - plain).max()) > 0.1 * scale  # the rescale acted
    assert 0 < float(info.rescale_factor) < 1  # CFG 7.5 widened these predictions


def test_cfg_rescale_refuses_what_it_cannot_do():
    for bad, msg in [(dict(rescale=float("nan")), "rescale must be a finite number"),
                     (dict(rescale=1.5), r"rescale must be .*1"),
                     (dict(rescale=0.7, prediction_type="eps"), "prediction_type must be one of"),
                     (dict(rescale=0.7), r"cfg\(rescale=...\) needs prediction_type="),
                     (dict(prediction_type="epsilon"), "would never take effect")]:
        with pytest.raises(ValueError, match=msg):
            guidance.cfg(3.0, **bad)
    s = samplers.ddim(schedules.edm(), 3)
    den = lambda x, t, c: 0.5 * x + c  # noqa: E731
    # a standard deviation over one element is undefined (diffusers would give NaN)
    with pytest.raises(ValueError, match=r"cfg\(rescale=...\) needs samples of >= 2 elements"):
        jaxdiv.sample(s, den, jnp.ones((4, 1)), key=jax.random.key(0), cond=jnp.ones((4, 1)),
                      guidance=guidance.cfg(3.0, rescale=0.7, prediction_type="sample"))
