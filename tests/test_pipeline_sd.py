"""End-to-end parity of ``jaxdiv.pipelines.stable_diffusion`` with diffusers' PyTorch pipeline.

A tiny random ``StableDiffusionPipeline`` is built by diffusers / transformers and saved
with ``save_pretrained`` (safetensors); diffusers samples it with ``DDIMScheduler`` (eta 0,
10 steps, CFG 5, ``set_alpha_to_one=True``) and jaxdiv with ``ddim`` + ``cfg`` from the same
initial latents. Then: the loader's errors for broken folders, and
``experiments/generate.py`` end to end (resume included).
"""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import reuse_loaded
from diffusers import DDIMScheduler, StableDiffusionPipeline
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import jaxdiv
from experiments import generate
from jaxdiv import guidance, samplers
from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.clip import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, load_clip_tokenizer, tokenize
from jaxdiv.pipelines import stable_diffusion as sd
from jaxdiv.pipelines.scheduler_config import schedule_from_config
from jaxdiv.testing import TINY_SCHEDULER, save_random_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]
STEPS, CFG = 10, 5.0
# Both sides run fp32 and each network agrees to <= 1e-4 (max abs) with its PyTorch twin;
# the measured end-to-end error is ~1e-6 on images in [0, 1] and ~1e-6 relative on the
# final latents. 1e-4 on images is 1/40 of one 8-bit level, while a wrong time grid, CFG
# convention, prediction type or VAE scaling changes images by far more; even a grid shifted
# by one timestep moves them by 2.6e-3 (the negative control in the first test).
IMAGE_ATOL = 1e-4
LATENT_RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny models: torch's intra-op thread pool only adds overhead, and oversubscribes the
    # shared CI cores (10 DDIM steps took 9 s with the default pool, 0.5 s with one thread)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd_tiny")
    torch_pipe = save_random_pipeline(folder, image_encoder=True, seed=0)
    return folder, torch_pipe, sd.load(folder)


def torch_generate(torch_pipe, noise, **kw):
    """diffusers' images (NHWC in [0, 1]) and final latents from the given initial latents
    (``kw``: more arguments of the pipeline call)."""
    final = {}

    def grab(pipe, i, t, kw):
        final["latents"] = kw["latents"].clone()
        return {}

    with torch.no_grad():
        images = torch_pipe(
            PROMPTS,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            eta=0.0,
            latents=torch.from_numpy(noise),
            height=noise.shape[2] * torch_pipe.vae_scale_factor,
            width=noise.shape[3] * torch_pipe.vae_scale_factor,
            output_type="np",
            callback_on_step_end=grab,
            **kw,
        ).images
    return images, final["latents"].numpy()


def jax_generate(pipe, noise, sampler=None):
    cond = pipe.encode_prompt(pipe.tokenize(PROMPTS))
    out = jaxdiv.sample(
        sampler or samplers.ddim(pipe.schedule, STEPS, **pipe.grid_kwargs),
        pipe.denoiser,
        jnp.asarray(noise),
        key=jax.random.key(0),
        cond=cond,
        guidance=guidance.cfg(CFG, null_cond=pipe.null_cond),
    )
    images = pipe.decode(out.x0)
    return np.clip(np.asarray(images).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1), np.asarray(out.x0)


def initial_noise(pipe, seed):
    return np.random.default_rng(seed).standard_normal(pipe.noise_shape(2)).astype(np.float32)


def assert_parity(torch_pipe, pipe, noise):
    ref_img, ref_lat = torch_generate(torch_pipe, noise)
    img, lat = jax_generate(pipe, noise)
    scale = float(np.abs(ref_lat).max())
    assert np.abs(lat - ref_lat).max() <= LATENT_RTOL * max(1.0, scale)
    assert np.abs(img - ref_img).max() <= IMAGE_ATOL
    # the random model's images are not saturated, so the comparison means something
    assert np.mean((ref_img > 0.01) & (ref_img < 0.99)) > 0.5
    return ref_img


def test_ddim_cfg_parity_epsilon_leading(tiny):
    folder, torch_pipe, pipe = tiny
    assert pipe.prediction_type == "epsilon"
    assert pipe.grid_kwargs == {"spacing": "leading", "steps_offset": 1}
    noise = initial_noise(pipe, 0)
    ref_img = assert_parity(torch_pipe, pipe, noise)
    # negative control: the tolerance catches even a grid shifted by one timestep
    # (steps_offset 0 instead of 1: measured 2.6e-3 max difference)
    shifted = samplers.ddim(pipe.schedule, STEPS, spacing="leading", steps_offset=0)
    img, _ = jax_generate(pipe, noise, sampler=shifted)
    assert np.abs(img - ref_img).max() > 10 * IMAGE_ATOL


def test_generate_with_a_negative_prompt_is_diffusers(tiny):
    """``pipe.generate(negative_prompt=)`` on diffusers' DDIM loop equals
    ``StableDiffusionPipeline(negative_prompt=)`` from the same initial latents."""
    folder, torch_pipe, pipe = tiny
    noise = initial_noise(pipe, 3)
    negative = "a red cat"
    _, ref = torch_generate(torch_pipe, noise, negative_prompt=[negative] * len(PROMPTS))
    kw = dict(key=jax.random.key(0), sampler=pipe.ddim(STEPS), cfg=CFG, noise=noise)
    got = np.asarray(pipe.generate(PROMPTS, 1, negative_prompt=negative, **kw).latents)
    tol = LATENT_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() <= tol
    # negative control: the empty prompt's branch is caught by the tolerance; the null
    # condition is a traced leaf, so it compiles nothing new
    before = jaxdiv.compile_count()
    plain = np.asarray(pipe.generate(PROMPTS, 1, **kw).latents)
    assert np.abs(plain - ref).max() > 100 * tol
    assert jaxdiv.compile_count() == before
    for bad, match in ((dict(cfg=1.0), "no effect with cfg=1.0"),
                       (dict(cfg=None), "no effect with cfg=None")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            pipe.generate(PROMPTS, 1, negative_prompt=negative, **{**kw, **bad})
    own = guidance.interval(CFG, 0.5, 5.0, null_cond=pipe.null_cond)
    with pytest.raises(ValueError, match="negative_prompt would never take effect"):
        pipe.generate(PROMPTS, 1, negative_prompt=negative, method=own,
                      **{**kw, "cfg": None})  # fmt: skip


def test_cfg_scale_sweep_compiles_the_unet_once(tiny):
    """Five CFG scales on the SD pipeline: one compiled program (a new scale is a traced
    leaf, not a new UNet compile), and each scale gives a different result that matches
    diffusers at that scale (checked at the two ends)."""
    _, torch_pipe, pipe = tiny
    noise = jnp.asarray(initial_noise(pipe, 1))
    cond = pipe.encode_prompt(pipe.tokenize(PROMPTS))
    smp = samplers.ddim(pipe.schedule, STEPS, **pipe.grid_kwargs)

    def run(w):
        return jaxdiv.sample(smp, pipe.denoiser, noise, key=jax.random.key(0), cond=cond,
                             guidance=guidance.cfg(w, null_cond=pipe.null_cond)).x0  # fmt: skip

    outs = [run(1.5)]
    before = jaxdiv.compile_count()
    outs += [run(w) for w in (3.0, 5.0, 7.5, 12.0)]
    assert jaxdiv.compile_count() - before == 0
    assert len({np.asarray(o).tobytes() for o in outs}) == 5
    for w, lat in ((1.5, outs[0]), (12.0, outs[-1])):
        with torch.no_grad():
            ref = torch_pipe(PROMPTS, num_inference_steps=STEPS, guidance_scale=w, eta=0.0,
                             latents=torch.from_numpy(np.array(noise)), output_type="latent",
                             height=noise.shape[2] * torch_pipe.vae_scale_factor,
                             width=noise.shape[3] * torch_pipe.vae_scale_factor).images
        ref = ref.numpy()
        assert np.abs(np.asarray(lat) - ref).max() <= LATENT_RTOL * max(1.0, np.abs(ref).max())


def test_ddim_cfg_parity_v_prediction_trailing_linear(tiny, tmp_path):
    folder, torch_pipe, _ = tiny
    v_folder = tmp_path / "sd_v"
    shutil.copytree(folder, v_folder)
    cfg_file = v_folder / "scheduler" / "scheduler_config.json"
    config = json.loads(cfg_file.read_text())
    config.update(
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        beta_schedule="linear",
        beta_start=0.0001,
        beta_end=0.02,
    )
    cfg_file.write_text(json.dumps(config))
    pipe = sd.load(v_folder, image_encoder=False)
    assert pipe.prediction_type == "v_prediction" and pipe.encode_image is None
    assert pipe.schedule.name == "vp_linear"
    components = dict(torch_pipe.components)
    components["scheduler"] = DDIMScheduler.from_pretrained(v_folder / "scheduler")
    v_pipe = StableDiffusionPipeline(**components)
    noise = initial_noise(pipe, 1)
    assert_parity(v_pipe, pipe, noise)
    # diffusers' guidance_rescale (Lin et al. 2024 Sec. 3.4), which acts on v here: the same
    # latents; a new phi is a traced leaf
    _, ref = torch_generate(v_pipe, noise, guidance_rescale=0.7)
    kw = dict(key=jax.random.key(0), sampler=pipe.ddim(STEPS), cfg=CFG, noise=noise)
    got = pipe.generate(PROMPTS, 1, guidance_rescale=0.7, trace=True, **kw)
    tol = LATENT_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(np.asarray(got.latents) - ref).max() <= tol
    factor = np.asarray(got.output.trace.info["cfg"].rescale_factor)
    assert np.all(np.abs(factor - 1) > 1e-3), factor  # it acted at every step (on this
    # random model CFG narrows v's spread: factors ~1.02)
    before = jaxdiv.compile_count()
    other = np.asarray(pipe.generate(PROMPTS, 1, guidance_rescale=0.3, trace=True, **kw).latents)
    assert jaxdiv.compile_count() == before
    assert np.abs(other - ref).max() > 100 * tol  # and phi acts: the tolerance catches 0.3


def test_prompt_and_image_encoders_match_pytorch(tiny, tmp_path):
    _, torch_pipe, pipe = tiny
    tokens = pipe.tokenize(PROMPTS)
    assert tokens.shape == (2, 16) and tokens.dtype == np.int32
    # the layout transformers 5 saves (tokenizer.json only) gives the same ids as the
    # released SD layout (vocab.json + merges.txt) the folder has
    torch_pipe.tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    np.testing.assert_array_equal(tokenize(load_clip_tokenizer(tmp_path), PROMPTS, 16), tokens)
    with torch.no_grad():
        pos, neg = torch_pipe.encode_prompt(PROMPTS, "cpu", 1, True)
        # diffusers' own clip_skip path reads text_encoder.text_model, which transformers 5
        # removed; this is its formula: final_layer_norm(hidden_states[-(clip_skip + 1)])
        enc = torch_pipe.text_encoder
        hidden = enc(torch.from_numpy(tokens).long(), output_hidden_states=True).hidden_states
        skip1 = enc.final_layer_norm(hidden[-2])
    np.testing.assert_allclose(pipe.encode_prompt(tokens), pos.numpy(), atol=1e-4)
    np.testing.assert_allclose(pipe.encode_prompt(tokens, clip_skip=1), skip1.numpy(), atol=1e-4)
    np.testing.assert_allclose(pipe.null_cond[0], neg[0].numpy(), atol=1e-4)

    # images at the encoder's resolution need no resize: preprocessing is exactly
    # ((x + 1) / 2 - mean) / std, so the features must match transformers'
    images = np.random.default_rng(3).uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    mean = np.array(OPENAI_CLIP_MEAN, np.float32)[:, None, None]
    std = np.array(OPENAI_CLIP_STD, np.float32)[:, None, None]
    with torch.no_grad():
        ref = torch_pipe.image_encoder(torch.from_numpy(((images + 1) / 2 - mean) / std))
    got = pipe.encode_image(jnp.asarray(images))
    np.testing.assert_allclose(got, ref.image_embeds.numpy(), atol=1e-4)
    assert pipe.configs["image_encoder"]["_preprocessor"] is None  # OpenAI defaults used


@settings(max_examples=25, deadline=None)
@given(
    num_steps=st.integers(1, 1000),
    spacing=st.sampled_from(["leading", "trailing", "linspace"]),
    offset=st.integers(0, 1),
)
def test_grid_is_diffusers_ddim_timesteps(num_steps, spacing, offset):
    config = dict(TINY_SCHEDULER, timestep_spacing=spacing, steps_offset=offset)
    sch, _, grid_kwargs = schedule_from_config(config)
    ref = DDIMScheduler(**config)
    ref.set_timesteps(num_steps)
    assume(int(ref.timesteps.max()) <= 999)  # diffusers allows 1000 (leading, offset 1)
    times = np.asarray(samplers.ddim(sch, num_steps, **grid_kwargs).times)
    np.testing.assert_array_equal(times[:-1], ref.timesteps.numpy())
    assert times[-1] == -1.0  # set_alpha_to_one: the last step lands on alpha = 1


def test_winograd_kernel_transforms_are_computed_once_per_sampling_call(tiny):
    """The UNet's Winograd convolutions transform their kernels (G g G^T) on every call of
    the model, but inside ``jaxdiv.sample``'s loop the kernels are loop-invariant: XLA
    computes the transforms once, before the loop (read off the compiled module)."""
    _, _, pipe = tiny
    noise = jnp.asarray(initial_noise(pipe, 2))  # CFG batch 4 x 4 x 4 tiles: Winograd
    smp = samplers.ddim(pipe.schedule, STEPS, **pipe.grid_kwargs)
    cond = pipe.encode_prompt(pipe.tokenize(PROMPTS))

    def generate(unet, noise):
        den = pipe.denoiser._replace(model=pipe.denoiser.model._replace(params=unet))
        return jaxdiv.sample(smp, den, noise, key=jax.random.key(0), cond=cond,
                             guidance=guidance.cfg(CFG, null_cond=pipe.null_cond)).x0  # fmt: skip

    text = jax.jit(generate).lower(pipe.denoiser.model.params, noise).compile().as_text()
    bodies = set(re.findall(r"body=%([\w.\-]+)", text))
    assert bodies  # the sampling loop is a while loop
    where, computation = [], None
    for line in text.splitlines():
        if line and not line.startswith(" "):  # a computation's header
            computation = line.removeprefix("ENTRY ").lstrip("%").split(" ")[0]
        # the kernel transform: a (16, Cin * Cout) product (jaxdiv.models.convolution)
        if re.search(r"= f32\[16,\d+\]\S* (fusion|dot)\(", line) and "dot_general" in line:
            where.append(computation in bodies)
    assert where and not any(where), where


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="squaredcos_cap_v2"),
        dict(trained_betas=np.linspace(1e-4, 0.03, 1000).tolist()),
    ],
)
def test_schedule_matches_diffusers_alphas_cumprod(overrides):
    config = dict(TINY_SCHEDULER, **overrides)
    sch, pred, _ = schedule_from_config(config)
    ref = DDIMScheduler(**config).alphas_cumprod.numpy()
    # float32 cumprod in torch vs float64 in jaxdiv: ~1e-7 relative over 1000 factors
    np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref, rtol=1e-5, atol=1e-7)
    assert pred == "epsilon"


def test_schedule_config_errors():
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        schedule_from_config({"beta_schedule": "sigmoid"})
    with pytest.raises(ValueError, match="prediction_type must be"):
        schedule_from_config({"prediction_type": "flow"})
    with pytest.raises(ValueError, match="rescale_betas_zero_snr=True is not supported"):
        schedule_from_config({"rescale_betas_zero_snr": True})
    # diffusers would clip / threshold every x0_hat: refused, not silently skipped
    for flag in ("clip_sample", "thresholding"):
        with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
            schedule_from_config({flag: True})
        schedule_from_config({flag: False})
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        schedule_from_config({"timestep_spacing": "karras"})
    with pytest.raises(ValueError, match="trained_betas must have num_train_timesteps=1000"):
        schedule_from_config({"trained_betas": [0.1, 0.2]})
    # mistyped or impossible values are named (float("abc") named nothing; "true" was
    # read as false and the clipping silently skipped)
    for value, error in [("abc", TypeError), (float("nan"), ValueError), (-1e-4, ValueError),
                         (1.5, ValueError)]:  # fmt: skip
        with pytest.raises(error, match=r"^scheduler config: beta_start must be"):
            schedule_from_config({"beta_start": value})
    with pytest.raises(TypeError, match=r"^scheduler config: clip_sample must be a bool, got "
                                        r"str 'true'"):  # fmt: skip
        schedule_from_config({"clip_sample": "true"})


def _copy(folder, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(folder, dst, ignore=shutil.ignore_patterns("image_encoder"))
    index = json.loads((dst / "model_index.json").read_text())
    index.pop("image_encoder", None)
    (dst / "model_index.json").write_text(json.dumps(index))
    return dst


def test_incomplete_or_wrong_folders_fail_clearly(tiny, tmp_path):
    folder, _, _ = tiny
    with pytest.raises(CheckpointError, match="does not exist"):
        sd.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="has no model_index.json.*single component"):
        sd.load(folder / "unet")

    # every missing component is named in one message
    broken = _copy(folder, tmp_path, "missing")
    shutil.rmtree(broken / "unet")
    (broken / "scheduler" / "scheduler_config.json").unlink()
    (broken / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        sd.load(broken)
    msg = str(err.value)
    assert "unet/ (listed in model_index.json as UNet2DConditionModel, folder missing)" in msg
    assert "scheduler/scheduler_config.json" in msg and "tokenizer/merges.txt" in msg

    wrong = _copy(folder, tmp_path, "wrong_class")
    index = json.loads((wrong / "model_index.json").read_text())
    index["unet"] = ["diffusers", "UNet2DModel"]
    (wrong / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="unet is a UNet2DModel, expected one of"):
        sd.load(wrong)


def test_missing_and_misshaped_tensors_are_named(tiny, tmp_path):
    folder, _, _ = tiny
    bad = _copy(folder, tmp_path, "tensors")
    unet_file = bad / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(unet_file))
    del weights["conv_in.bias"]
    save_file(weights, str(unet_file))
    vae_file = bad / "vae" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(vae_file))
    weights["decoder.conv_out.weight"] = weights["decoder.conv_out.weight"][:, :, :2]
    save_file(weights, str(vae_file))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): conv_in\.bias"):
        sd.load(bad)
    shutil.copy(folder / "unet" / "diffusion_pytorch_model.safetensors", unet_file)
    with pytest.raises(CheckpointError) as err:
        sd.load(bad)
    assert "decoder.conv_out.kernel (expected (3, 3, 32, 3), got (2, 3, 32, 3))" in str(err.value)


def test_pickled_weights_refused_unless_allowed(tiny, tmp_path):
    folder, _, pipe = tiny
    pickled = _copy(folder, tmp_path, "pickled")
    st_file = pickled / "text_encoder" / "model.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(st_file)).items()},
               pickled / "text_encoder" / "pytorch_model.bin")  # fmt: skip
    st_file.unlink()
    with pytest.raises(CheckpointError, match="only pickled PyTorch weights found"):
        sd.load(pickled)
    loaded = sd.load(pickled, allow_pickle=True)
    np.testing.assert_array_equal(loaded.null_cond, pipe.null_cond)


def with_option(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = value
    return argv


def test_generate_end_to_end_and_resume(tiny, tmp_path, capsys, monkeypatch):
    folder, _, pipe = tiny
    reuse_loaded(monkeypatch, pipe)
    out = tmp_path / "gen"
    argv = ["--model", str(folder), "--prompt", "a cat", "a dog", "--sampler", "edm"]
    argv += ["--steps", "3", "--n", "3", "--batch-size", "2", "--cfg", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    names = sorted(p.name for p in (out / "images").iterdir())
    assert names == [f"p00{j}_i000{i}.png" for j in range(2) for i in range(3)]
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["images_done"] == 6 and meta["generated_this_run"] == 6
    assert meta["sampler"]["name"] == "edm" and meta["sampler"]["nfe"] == 5
    assert meta["settings"]["height"] == 16
    from PIL import Image

    with Image.open(out / "grid.png") as grid:
        assert grid.size == (3 * 16, 2 * 16)
    assert not list(out.rglob("*.tmp"))

    # unchanged rerun: nothing to do, the model is not even loaded
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    assert generate.main(argv) == 0
    assert "all 6 images already" in capsys.readouterr().out
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}

    # a lost image is regenerated alone, identical to the first run's
    lost = out / "images" / "p001_i0002.png"
    first = lost.read_bytes()
    lost.unlink()
    assert generate.main(argv) == 0
    assert lost.read_bytes() == first
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["generated_this_run"] == 1 and meta["skipped_this_run"] == 5
    assert len(meta["previous_runs"]) == 1

    # a larger --n adds images; the existing ones keep their bytes
    kept = (out / "images" / "p000_i0002.png").read_bytes()
    assert generate.main(with_option(argv, "--n", "4")) == 0
    assert (out / "images" / "p000_i0002.png").read_bytes() == kept
    assert (out / "images" / "p001_i0003.png").is_file()
    assert json.loads((out / "metadata.json").read_text())["generated_this_run"] == 2

    # without --batch-size the folder's batch size is used (the default min(n, 4) = 4 is
    # another setting); one given explicitly must match it
    at = argv.index("--batch-size")
    defaulted = with_option(argv[:at] + argv[at + 2 :], "--n", "5")
    capsys.readouterr()
    assert generate.main(defaulted) == 0
    assert "--batch-size 2: the batch size" in capsys.readouterr().out
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["settings"]["batch_size"] == 2 and meta["generated_this_run"] == 2
    assert (out / "images" / "p000_i0002.png").read_bytes() == kept
    with pytest.raises(SystemExit):
        generate.main(defaulted + ["--batch-size", "4"])
    assert "different settings (batch_size: 2 -> 4)" in capsys.readouterr().err

    # other settings in the same folder, or a broken model folder: a clear usage error
    with pytest.raises(SystemExit) as exit_info:
        generate.main(with_option(argv, "--cfg", "4"))
    assert exit_info.value.code == 2
    assert "different settings (cfg: 3.0 -> 4.0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        generate.main(["--model", str(tmp_path), "--prompt", "a cat", "--out", str(out / "x")])
    assert "has no model_index.json" in capsys.readouterr().err


# -- DPM-Solver++(2M) on the pipeline: diffusers' DPMSolverMultistepScheduler -------------


def torch_dpmpp_latents(torch_pipe, noise, karras, steps=STEPS):
    """diffusers' final latents with its scheduler swapped for DPM-Solver++(2M)."""
    from diffusers import DPMSolverMultistepScheduler
    from test_pipeline_samplers import torch_latents

    sched = DPMSolverMultistepScheduler.from_config(
        torch_pipe.scheduler.config, algorithm_type="dpmsolver++", solver_order=2,
        use_karras_sigmas=karras,
    )  # fmt: skip
    return torch_latents(torch_pipe, noise, steps, sched, PROMPTS, CFG)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_cfg_parity(tiny, karras):
    _, torch_pipe, pipe = tiny
    noise = initial_noise(pipe, 2)
    ref = torch_dpmpp_latents(torch_pipe, noise, karras)
    s = pipe.dpmpp_2m(STEPS, karras=karras)
    assert s.name == "dpmpp_2m" and s.nfe == STEPS and float(s.times[-1]) == -1.0
    _, lat = jax_generate(pipe, noise, sampler=s)
    tol = LATENT_RTOL * max(1.0, float(np.abs(ref).max()))
    assert np.abs(lat - ref).max() <= tol  # measured: 7e-7 (False), 1.3e-6 (True) relative
    # negative controls, both caught by the tolerance: DDIM's grid for this config
    # (leading: 901, ..., 1 instead of DPM's 910, ..., 1; measured 5e-3 relative) and, with
    # Karras levels, the UNet at the fractional timesteps instead of diffusers' rounded
    # ones (measured 4.6e-4 relative, 4.6x the tolerance)
    if karras:
        wrong = samplers.dpmpp_2m(pipe.schedule, times=s.times)
    else:
        wrong = samplers.dpmpp_2m(pipe.schedule, STEPS, **pipe.grid_kwargs)
        assert not np.array_equal(np.asarray(wrong.times), np.asarray(s.times))
    _, lat_wrong = jax_generate(pipe, noise, sampler=wrong)
    assert np.abs(lat_wrong - ref).max() > (2 if karras else 10) * tol


def test_generate_dpmpp_2m(tiny, tmp_path, capsys, monkeypatch):
    folder, _, pipe = tiny
    reuse_loaded(monkeypatch, pipe)
    out = tmp_path / "gen_dpm"
    argv = ["--model", str(folder), "--prompt", "a cat", "--sampler", "dpmpp_2m", "--steps", "3"]
    argv += ["--n", "1", "--batch-size", "1", "--cfg", "3", "--out", str(out)]
    assert generate.main(argv) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sampler"]["name"] == "dpmpp_2m" and meta["sampler"]["nfe"] == 3
    assert meta["settings"]["karras"] is True and len(meta["sampler"]["times"]) == 4
    # --no-karras changes the pixels, so the same folder refuses it
    with pytest.raises(SystemExit):
        generate.main(argv + ["--no-karras"])
    assert "different settings (karras: True -> False)" in capsys.readouterr().err
