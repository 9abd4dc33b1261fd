"""Samplers of the SD pipeline against diffusers' on the tiny random pipeline.

``pipe.dpmpp_2m_sde`` / ``pipe.dpmpp_3m_sde``: diffusers' ``DPMSolverMultistepScheduler``
(``sde-dpmsolver++``) in ``StableDiffusionPipeline`` with CFG, our noise fed to its step.

``pipe.euler`` / ``pipe.euler_ancestral``: diffusers' ``EulerDiscreteScheduler`` (with and
without Karras levels) and ``EulerAncestralDiscreteScheduler``, our noise fed to its step.

``pipe.ddim(N)`` must reproduce ``DDIMScheduler.from_config(<folder's config>)`` for every
``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one`` (steps to ``t - T // N``,
the last to ``final_alpha_cumprod``); ``pipe.ddim(N, clean_endpoint=True)`` keeps jaxdiv's
grid ending at ``sigma = 0``, whose output is the last guided ``x0_hat``.
"""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import reuse_loaded
from diffusers import DDIMScheduler
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_dpmpp_sde import _fix_sde_third_order

import jaxdiv
from jaxdiv import guidance, samplers
from jaxdiv.pipelines import stable_diffusion as sd
from jaxdiv.pipelines.scheduler_config import ddim_grid, schedule_from_config
from jaxdiv.testing import TINY_SCHEDULER, save_random_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]
CFG = 5.0
LATENT_RTOL = 1e-4  # as tests/test_pipeline_sd.py: fp32 networks agree to ~1e-6 end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("sd_tiny_ddim")
    torch_pipe = save_random_pipeline(folder, seed=0)
    return torch_pipe, sd.load(folder)


def _with_config(torch_pipe, pipe, **overrides):
    """Both pipelines with the scheduler config changed (same betas, so the same model)."""
    config = dict(pipe.configs["scheduler"], **overrides)
    sch, pred, grid_kwargs = schedule_from_config(config)
    np.testing.assert_array_equal(sch.alphas_cumprod, pipe.schedule.alphas_cumprod)
    ours = pipe._replace(configs=dict(pipe.configs, scheduler=config), grid_kwargs=grid_kwargs)
    torch_pipe.scheduler = DDIMScheduler.from_config(config)
    return torch_pipe, ours


def torch_latents(torch_pipe, noise, steps, scheduler=None, prompts=PROMPTS, cfg=CFG, **kwargs):
    """diffusers' final latents for ``prompts`` with CFG from the latents ``noise``, with
    ``scheduler`` in place of the pipeline's for this call (when given)."""
    original = torch_pipe.scheduler
    torch_pipe.scheduler = original if scheduler is None else scheduler
    try:
        with torch.no_grad():
            out = torch_pipe(prompts, num_inference_steps=steps, guidance_scale=cfg,
                             latents=torch.from_numpy(noise), output_type="latent",
                             height=noise.shape[2] * torch_pipe.vae_scale_factor,
                             width=noise.shape[3] * torch_pipe.vae_scale_factor,
                             **kwargs).images  # fmt: skip
    finally:
        torch_pipe.scheduler = original
    return out.numpy()


def _latents(torch_pipe, pipe, sampler, noise):
    ref = torch_latents(torch_pipe, noise, sampler.nfe, eta=0.0)
    cond = pipe.encode_prompt(pipe.tokenize(PROMPTS))
    out = jaxdiv.sample(sampler, pipe.denoiser, jnp.asarray(noise), key=jax.random.key(0),
                        cond=cond, guidance=guidance.cfg(CFG, null_cond=pipe.null_cond),
                        trace=True)  # fmt: skip
    return ref, out


CONFIGS = [  # (timestep_spacing, steps_offset, set_alpha_to_one)
    ("leading", 1, True), ("leading", 1, False), ("leading", 0, False),
    ("trailing", 0, True), ("trailing", 0, False),
    ("linspace", 0, True), ("linspace", 0, False),
]  # fmt: skip


@pytest.mark.parametrize("spacing, offset, alpha_one", CONFIGS)
def test_ddim_matches_diffusers_ddim_scheduler(spacing, offset, alpha_one, tiny):
    """Final latents within 1e-4 (relative to their scale) of diffusers' with CFG, N = 6:
    trailing's T / N = 166.7 rounds up, so its last step goes to t = 0 even with
    set_alpha_to_one=True; linspace's steps go to t - 166 while the next evaluation is at
    another timestep; leading with offset 0 and set_alpha_to_one=False ends with a
    zero-length step at t = 0."""
    torch_pipe, pipe = _with_config(*tiny, timestep_spacing=spacing, steps_offset=offset,
                                    set_alpha_to_one=alpha_one)  # fmt: skip
    s = pipe.ddim(6)
    noise = np.random.default_rng(0).standard_normal(pipe.noise_shape(2)).astype(np.float32)
    ref, out = _latents(torch_pipe, pipe, s, noise)
    lat = np.asarray(out.x0)
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(lat - ref).max() <= LATENT_RTOL * scale
    np.testing.assert_array_equal(s.times[:-1], torch_pipe.scheduler.timesteps.numpy())
    clean = pipe.ddim(6, clean_endpoint=True)
    if float(s.times[-1]) == -1.0 and spacing == "leading":  # diffusers' steps are jaxdiv's
        np.testing.assert_array_equal(s.times, clean.times)
    else:  # negative control: jaxdiv's clean grid is far from diffusers here (measured
        # 25x the tolerance for leading / set_alpha_to_one=False, ~100x for trailing)
        _, out_clean = _latents(torch_pipe, pipe, clean, noise)
        assert np.abs(np.asarray(out_clean.x0) - ref).max() > 10 * LATENT_RTOL * scale
        # ... and ends at the last guided x0_hat, which diffusers' noisy end does not
        np.testing.assert_array_equal(out_clean.x0, out_clean.trace.x0_hat[-1])
        if float(s.times[-1]) == 0.0:
            left = lat - np.asarray(out.trace.x0_hat[-1]) * float(pipe.schedule.alpha(0.0))
            assert np.abs(left).max() > 1e-3  # sqrt(1 - abar_0) eps_hat stays in the output


@settings(max_examples=30, deadline=None)
@given(
    num_steps=st.integers(1, 1000),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    offset=st.integers(0, 1),
    alpha_one=st.booleans(),
)
def test_ddim_grid_is_diffusers_steps(num_steps, spacing, offset, alpha_one):
    """Evaluation times are diffusers' timesteps and each step's target has diffusers'
    alpha_prod_t_prev (alphas_cumprod[t - T // N], else final_alpha_cumprod)."""
    config = dict(TINY_SCHEDULER, timestep_spacing=spacing, steps_offset=offset,
                  set_alpha_to_one=alpha_one)  # fmt: skip
    ref = DDIMScheduler(**config)
    ref.set_timesteps(num_steps)
    ts = ref.timesteps.numpy()
    # diffusers' own invalid grids (refused by ddim_grid): past T - 1 (leading, offset 1),
    # repeated timesteps, or N + 1 of them ending at -1 (trailing, e.g. N = 497)
    assume(int(ts.max()) <= 999 and len(np.unique(ts)) == len(ts) == num_steps)
    assume(int(ts.min()) >= 0)
    sch, _, _ = schedule_from_config(config)
    times, targets = ddim_grid(config, num_steps)
    np.testing.assert_array_equal(times[:-1], ts)
    prev = ts - 1000 // num_steps
    want = np.where(prev >= 0, ref.alphas_cumprod.numpy()[np.maximum(prev, 0)],
                    float(ref.final_alpha_cumprod))  # fmt: skip
    # float32 sqrt, then squared: a few ulps. sch.alpha is elementwise: evaluated on the
    # targets padded to a fixed length so every example reuses one compiled program
    padded = np.concatenate([targets, np.full(1001 - len(targets), targets[-1])])
    alpha = np.asarray(sch.alpha(padded))[: len(targets)]
    np.testing.assert_allclose(alpha**2, want, rtol=3e-6)
    assert times[-1] == targets[-1]


def test_ddim_targets_are_validated():
    from jaxdiv import schedules

    vp = schedules.vp_linear()
    with pytest.raises(ValueError, match="targets"):
        samplers.ddim(vp, times=[900.0, 500.0, 0.0], targets=[950.0, 0.0])
    with pytest.raises(ValueError, match="needs times"):
        samplers.ddim(vp, 2, targets=[500.0, 0.0])
    with pytest.raises(ValueError, match="clean endpoint"):
        samplers.ddim(vp, times=[900.0, 0.0])
    assert samplers.ddim(vp, times=[900.0, 0.0], allow_noisy_end=True).nfe == 1
    with pytest.raises(TypeError, match="clean_endpoint"):
        from jaxdiv.testing import example_pipeline

        example_pipeline().ddim(4, clean_endpoint="yes")


def _torch_sde_latents(torch_pipe, noise, order, karras, key, steps):
    """diffusers' final latents with DPMSolverMultistepScheduler(sde-dpmsolver++), its
    step fed the noise our sampler draws at step i (per-sample streams of split(key)[0])."""
    from diffusers import DPMSolverMultistepScheduler

    original = torch_pipe.scheduler
    sched = DPMSolverMultistepScheduler.from_config(
        original.config, algorithm_type="sde-dpmsolver++", solver_order=order,
        use_karras_sigmas=karras,
    )  # fmt: skip
    if order == 3:
        _fix_sde_third_order(sched)
    keys = jax.random.split(jax.random.split(key)[0], noise.shape[0])
    step, calls = sched.step, []

    def fed(model_output, timestep, sample, *args, **kwargs):
        z = samplers.per_sample_normal(keys, len(calls), jnp.asarray(noise))
        calls.append(1)
        kwargs.pop("generator", None)
        return step(model_output, timestep, sample, variance_noise=torch.tensor(np.asarray(z)),
                    **kwargs)  # fmt: skip

    sched.step = fed
    out = torch_latents(torch_pipe, noise, steps, sched)
    assert len(calls) == steps
    return out


@pytest.mark.parametrize("name, karras", [("dpmpp_2m_sde", False), ("dpmpp_2m_sde", True),
                                          ("dpmpp_3m_sde", True)])  # fmt: skip
def test_dpmpp_sde_cfg_parity(name, karras, tiny):
    """Final latents within 1e-4 (relative to their scale) of diffusers' with CFG, N = 10,
    the same noise; 3M SDE with diffusers' third-order D2 sign corrected
    (tests/test_dpmpp_sde.py). Negative control: another key's noise is far off."""
    torch_pipe, pipe = tiny
    torch_pipe.scheduler = DDIMScheduler.from_config(pipe.configs["scheduler"])
    noise = np.random.default_rng(2).standard_normal(pipe.noise_shape(2)).astype(np.float32)
    s = getattr(pipe, name)(10, karras=karras)
    assert s.name == name and s.nfe == 10 and float(s.times[-1]) == -1.0
    key = jax.random.key(0)
    ref = _torch_sde_latents(torch_pipe, noise, 3 if "3m" in name else 2, karras, key, 10)
    _, out = _latents_key(pipe, s, noise, key)
    tol = LATENT_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(np.asarray(out.x0) - ref).max() <= tol
    _, other = _latents_key(pipe, s, noise, jax.random.key(1))
    assert np.abs(np.asarray(other.x0) - ref).max() > 10 * tol


def _latents_key(pipe, sampler, noise, key):
    cond = pipe.encode_prompt(pipe.tokenize(PROMPTS))
    out = jaxdiv.sample(sampler, pipe.denoiser, jnp.asarray(noise), key=key, cond=cond,
                        guidance=guidance.cfg(CFG, null_cond=pipe.null_cond))  # fmt: skip
    return None, out


@pytest.mark.parametrize("name, karras", [("dpmpp_2m_sde", True), ("euler_ancestral", None)])
def test_generate_accepts_the_stochastic_samplers(name, karras, tiny, tmp_path, monkeypatch):
    """``--karras`` defaults on for DPM-Solver++ and does not apply to Euler ancestral
    (``dpmpp_3m_sde`` takes the same path as ``dpmpp_2m_sde``: ``pipe.<name>(N, karras)``)."""
    from experiments import generate

    _, pipe = tiny
    reuse_loaded(monkeypatch, pipe)
    out = tmp_path / name
    argv = ["--model", pipe.path, "--prompt", "a cat", "--sampler", name, "--steps", "4",
            "--n", "1", "--batch-size", "1", "--cfg", "3", "--out", str(out)]  # fmt: skip
    assert generate.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sampler"]["name"] == name and meta["sampler"]["nfe"] == 4
    assert meta["settings"]["karras"] is karras
    if name == "euler_ancestral":  # euler: the config's use_karras_sigmas unless --karras
        args = generate.parse_args(argv[:5] + ["euler"])
        assert args.karras is False
        assert generate.parse_args(argv[:5] + ["euler", "--karras"]).karras is True
        folder = tmp_path / "karras_config"  # what parse_args reads of a model folder
        (folder / "scheduler").mkdir(parents=True)
        (folder / "model_index.json").write_text((Path(pipe.path) / "model_index.json")
                                                 .read_text())  # fmt: skip
        config = dict(pipe.configs["scheduler"], use_karras_sigmas=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
        argv = ["--model", str(folder), "--prompt", "a cat", "--sampler", "euler"]
        assert generate.parse_args(argv).karras is True
        assert generate.parse_args([*argv, "--no-karras"]).karras is False


# -- Euler and Euler ancestral: diffusers' EulerDiscreteScheduler / EulerAncestral... ----


@settings(max_examples=30, deadline=None)
@given(
    num_steps=st.integers(1, 1000),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    offset=st.integers(0, 1),
    karras=st.booleans(),
)
def test_euler_grid_is_diffusers(num_steps, spacing, offset, karras):
    """The model timesteps are diffusers' and the grid's noise levels its float32 sigmas,
    up to the few ulps by which jaxdiv's ``alphas_cumprod`` differ from torch's (they move
    a fractional Karras timestep by up to ~3e-4)."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler

    from jaxdiv.pipelines.scheduler_config import euler_grid

    config = dict(TINY_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    ref = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    ref.set_timesteps(num_steps)
    ts = ref.timesteps.numpy()
    assume(ts.max() <= 999 and len(np.unique(ts)) == len(ts) == num_steps)  # diffusers' own
    assume(ts.min() >= 0)  # invalid grids (past T - 1, repeated steps) are refused by ours
    sch, _, _ = schedule_from_config(config)
    times, model_times = euler_grid(config, num_steps, karras)
    assert model_times.dtype == np.float32 and times[-1] == -1.0
    np.testing.assert_allclose(model_times, ts, rtol=0, atol=5e-4)
    if not karras:  # the spacing's timesteps themselves: exactly diffusers'
        np.testing.assert_array_equal(model_times, ts)
        ancestral = EulerAncestralDiscreteScheduler.from_config(config)
        ancestral.set_timesteps(num_steps)
        np.testing.assert_array_equal(ancestral.sigmas.numpy(), ref.sigmas.numpy())
    # jaxdiv's alphas_cumprod (NumPy float32) differ from torch's by a few ulps, so the
    # training levels sqrt((1 - abar) / abar) differ by up to `train` (8.7e-6 relative,
    # measured): the grid's levels, read back in float64, stay within that
    ours = np.asarray(sch.alphas_cumprod, np.float64)
    theirs = ref.alphas_cumprod.numpy().astype(np.float64)
    train = np.abs(np.sqrt((1 - ours) / ours) / np.sqrt((1 - theirs) / theirs) - 1).max()
    abar = np.interp(times[:-1], np.arange(1000), ours)
    np.testing.assert_allclose(np.sqrt((1 - abar) / abar), ref.sigmas.numpy()[:-1],
                               rtol=train + 1e-7)  # fmt: skip
    # and the schedule itself reads them back in float32, where 1 - abar cancels near t = 0
    # (float32 eps / (1 - abar_0) ~ 1e-4 relative)
    padded = np.concatenate([times[:-1], np.full(1001 - num_steps, times[-2])])  # one program
    levels = np.asarray(sch.noise_level(padded.astype(np.float32)))[:num_steps]
    np.testing.assert_allclose(levels, ref.sigmas.numpy()[:-1], rtol=1e-4)
    assert ref.sigmas.numpy()[-1] == 0.0 and float(sch.noise_level(times[-1])) == 0.0


def test_euler_grid_refuses_options_it_does_not_transcribe():
    from jaxdiv.pipelines.scheduler_config import euler_grid

    for key, value in [("interpolation_type", "log_linear"), ("final_sigmas_type", "sigma_min"),
                       ("use_beta_sigmas", True), ("timestep_type", "continuous"),
                       ("sigma_max", 80.0)]:  # fmt: skip
        with pytest.raises(ValueError, match=f"scheduler config: {key}="):
            euler_grid(dict(TINY_SCHEDULER, **{key: value}), 10)
    assert len(euler_grid(dict(TINY_SCHEDULER, interpolation_type="linear"), 10)[1]) == 10
    # karras=None follows the config's use_karras_sigmas, as from_config(config) does
    karras_config = dict(TINY_SCHEDULER, use_karras_sigmas=True)
    for got, want in [(euler_grid(karras_config, 10), euler_grid(TINY_SCHEDULER, 10, True)),
                      (euler_grid(karras_config, 10, False), euler_grid(TINY_SCHEDULER, 10))]:
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])
    assert not np.array_equal(euler_grid(karras_config, 10)[1], euler_grid(TINY_SCHEDULER, 10)[1])
    with pytest.raises(TypeError, match="scheduler config: use_karras_sigmas must be a bool"):
        euler_grid(dict(TINY_SCHEDULER, use_karras_sigmas="yes"), 10)
    # EulerAncestralDiscreteScheduler has none of those options: ignored there, as diffusers
    others = dict(karras_config, interpolation_type="log_linear", final_sigmas_type="sigma_min")
    for got, want in zip(euler_grid(others, 10, ancestral=True), euler_grid(TINY_SCHEDULER, 10)):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="no Karras levels"):
        euler_grid(TINY_SCHEDULER, 10, True, ancestral=True)
    with pytest.raises(ValueError, match="no strictly decreasing Euler grid"):
        euler_grid(TINY_SCHEDULER, 1000)  # leading with offset 1: past T - 1
    with pytest.raises(TypeError, match="karras"):
        euler_grid(TINY_SCHEDULER, 10, karras="yes")


def _torch_euler_latents(torch_pipe, name, karras, noise, key, steps):
    """diffusers' final latents with its Euler scheduler in StableDiffusionPipeline with
    CFG; the ancestral step is fed the noise our sampler draws at step i."""
    from diffusers import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
    from diffusers.schedulers import scheduling_euler_ancestral_discrete as ea

    config = torch_pipe.scheduler.config
    if name == "euler":
        sched = EulerDiscreteScheduler.from_config(config, use_karras_sigmas=karras)
    else:
        sched = EulerAncestralDiscreteScheduler.from_config(config)
    keys = jax.random.split(jax.random.split(key)[0], noise.shape[0])
    zs = [np.asarray(samplers.per_sample_normal(keys, i, jnp.asarray(noise)))
          for i in range(steps)]  # fmt: skip
    drawn = iter(zs)
    randn, ea.randn_tensor = ea.randn_tensor, lambda *a, **k: torch.tensor(next(drawn))
    try:
        out = torch_latents(torch_pipe, noise, steps, sched)
    finally:
        ea.randn_tensor = randn
    if name == "euler_ancestral":
        assert next(drawn, None) is None  # one draw per step, all used
    return out, float(sched.init_noise_sigma), float(sched.sigmas.max())


@pytest.mark.parametrize("name, spacing, karras, prediction", [
    ("euler", "leading", False, "epsilon"),       # SD 1.x/2.x's spacing: integer timesteps
    ("euler", "linspace", True, "v_prediction"),  # fractional timesteps, Karras levels, v
    ("euler_ancestral", "trailing", False, "epsilon"),
])  # fmt: skip
def test_euler_samplers_match_diffusers(name, spacing, karras, prediction, tiny):
    """Final latents within 1e-4 (relative to their scale) of diffusers' Euler schedulers
    with CFG, N = 6, the same noise. diffusers starts linspace / trailing grids at
    ``sigma_max z`` in its Euler variable: the same images need jaxdiv's noise scaled by
    ``sigma_max / sqrt(sigma_max^2 + 1)``, and without that factor they differ (negative
    control; for the ancestral sampler another key's noise differs too)."""
    torch_pipe, pipe = _with_config(*tiny, timestep_spacing=spacing, steps_offset=1,
                                    prediction_type=prediction)  # fmt: skip
    # the same network read as another prediction on both sides
    pipe = pipe._replace(prediction_type=prediction,
                         denoiser=pipe.denoiser._replace(prediction_type=prediction))
    s = pipe.euler(6, karras=karras) if name == "euler" else pipe.euler_ancestral(6)
    assert s.name == name and s.nfe == 6 and float(s.times[-1]) == -1.0
    # integer timesteps: the network at the step's own time, no re-expressed x0_hat
    assert (s.step is samplers.first_order_step) == (spacing != "linspace")
    noise = np.random.default_rng(3).standard_normal(pipe.noise_shape(2)).astype(np.float32)
    key = jax.random.key(0)
    ref, init, sigma_max = _torch_euler_latents(torch_pipe, name, karras, noise, key, 6)
    factor = 1.0 if spacing == "leading" else sigma_max / np.sqrt(sigma_max**2 + 1)
    assert init == pytest.approx(np.sqrt(sigma_max**2 + 1) * factor, rel=1e-6)
    _, out = _latents_key(pipe, s, noise * np.float32(factor), key)
    tol = LATENT_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(np.asarray(out.x0) - ref).max() <= tol
    if spacing != "leading":
        _, unscaled = _latents_key(pipe, s, noise, key)
        assert np.abs(np.asarray(unscaled.x0) - ref).max() > 10 * tol
    if name == "euler_ancestral":  # the same start, another key's step noise
        _, other = _latents_key(pipe, s, noise * np.float32(factor), jax.random.key(1))
        assert np.abs(np.asarray(other.x0) - ref).max() > 10 * tol
