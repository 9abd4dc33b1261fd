"""End-to-end parity of ``jaxdiv.pipelines.stable_diffusion_3`` with diffusers' PyTorch pipeline.

Tiny random ``StableDiffusion3Pipeline`` folders (``jaxdiv.testing.save_random_sd3_pipeline``:
the SD3-Medium, SD3.5-Medium and SD3.5-Large MMDiT layouts, a 16-channel VAE, CLIP-L, CLIP-G
and T5, or no T5) are saved by diffusers / transformers with ``save_pretrained``
(safetensors) and loaded back by both sides. Checked against diffusers:

* ``encode_prompt``: prompt embeddings, pooled embeddings and the negative ("") ones, with
  and without T5, with ``clip_skip``, at a given ``max_sequence_length``, truncation too;
* sampling: ``FlowMatchEulerDiscreteScheduler`` (shift 3), 10 steps, CFG 4, from the same
  initial latents: final latents for every layout, decoded images for SD3-Medium;
* bfloat16 against float32; the loader's errors for broken folders.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import StableDiffusion3Pipeline
from safetensors.numpy import load_file, save_file

import jaxdiv
from jaxdiv import guidance, samplers
from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.pipelines import stable_diffusion_3 as sd3
from jaxdiv.testing import save_random_sd3_pipeline

# the second prompt is longer than both the CLIP (16) and the T5 (12) token lengths, so
# truncation is compared too
PROMPTS = ["a photo of a cat", "a photo of the red dog on the blue house"]
STEPS, CFG, T5_LEN = 10, 4.0, 12
# Both sides run float32 and every network agrees with its PyTorch twin to ~1e-6 on these
# O(1) activations; the tolerances leave one order of magnitude of float32 accumulation
# headroom over the measured errors (noted at each assert), while a wrong time grid (the
# negative control: shift 1 instead of 3) moves the latents by far more.
EMBED_ATOL = 1e-5
LATENT_RTOL = 1e-5
IMAGE_ATOL = 1e-5
LAYOUTS = {"sd3-medium": True, "sd35-medium": True, "sd35-large": False}  # layout -> T5


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # tiny models: torch's intra-op thread pool only adds overhead on the shared CI cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """layout -> folder, each built once per module (the SD3.5-Large one without T5)."""
    root = tmp_path_factory.mktemp("sd3_tiny")
    return {
        layout: save_random_sd3_pipeline(root / layout, layout=layout, t5=t5, seed=i)
        for i, (layout, t5) in enumerate(LAYOUTS.items())
    }


_TORCH: dict = {}
_JAX: dict = {}


def torch_pipe(folder, t5=True):
    """diffusers' pipeline loaded back from the folder (cached); ``t5=False`` as diffusers
    runs SD3 without T5 (``text_encoder_3=None, tokenizer_3=None``)."""
    key = (str(folder), t5)
    if key not in _TORCH:
        nones = {} if t5 else dict(text_encoder_3=None, tokenizer_3=None)
        _TORCH[key] = StableDiffusion3Pipeline.from_pretrained(folder, local_files_only=True,
                                                               **nones)  # fmt: skip
    return _TORCH[key]


def jax_pipe(folder, dtype=jnp.float32, **kw):
    key = (str(folder), jnp.dtype(dtype).name, tuple(sorted(kw.items())))
    if key not in _JAX:
        _JAX[key] = sd3.load(folder, dtype=dtype, max_sequence_length=T5_LEN, **kw)
    return _JAX[key]


def initial_noise(pipe, seed, batch=2):
    shape = pipe.noise_shape(batch)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch_generate(tpipe, noise, prompts=PROMPTS, *, output_type="np", **kw):
    """diffusers' output (images NHWC in [0, 1], or latents) and its final latents
    (``kw``: more arguments of the pipeline call)."""
    final = {}

    def grab(pipe, i, t, kw):
        final["latents"] = kw["latents"].clone()
        return {}

    f = tpipe.vae_scale_factor
    with torch.no_grad():
        images = tpipe(
            prompts,
            num_inference_steps=STEPS,
            guidance_scale=CFG,
            latents=torch.from_numpy(noise),
            height=noise.shape[2] * f,
            width=noise.shape[3] * f,
            max_sequence_length=T5_LEN,
            output_type=output_type,
            callback_on_step_end=grab,
            **kw,
        ).images
    return np.asarray(images), final["latents"].numpy()


def jax_latents(pipe, noise, prompts=PROMPTS, sampler=None):
    # clip_skip=None spelled out, as load() encodes the null prompt: jit keys on the keywords
    # given, so leaving it out would compile the text encoders a second time
    cond = pipe.encode_prompt(pipe.tokenize(prompts), clip_skip=None)
    out = jaxdiv.sample(
        sampler or pipe.flow_euler(STEPS),
        pipe.denoiser,
        jnp.asarray(noise),
        key=jax.random.key(0),
        cond=cond,
        guidance=guidance.cfg(CFG, null_cond=pipe.null_cond),
    )
    return np.asarray(out.x0, np.float32)


def to_unit(images):
    """jaxdiv's NCHW [-1, 1] images as diffusers' ``output_type="np"`` (NHWC, [0, 1])."""
    return np.clip(np.asarray(images, np.float32).transpose(0, 2, 3, 1) / 2 + 0.5, 0, 1)


def max_rel(a, ref):
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


# --------------------------------------------------------------------------- the folder


def test_folder_is_a_diffusers_sd3_pipeline(folders):
    folder = folders["sd3-medium"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert sorted(p.name for p in (folder / "tokenizer_2").iterdir()) == [
        "merges.txt", "tokenizer_config.json", "vocab.json"]  # fmt: skip
    no_t5 = json.loads((folders["sd35-large"] / "model_index.json").read_text())
    assert no_t5["text_encoder_3"] == no_t5["tokenizer_3"] == [None, None]
    assert not (folders["sd35-large"] / "text_encoder_3").exists()
    vae = json.loads((folder / "vae" / "config.json").read_text())
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (
        16, 1.5305, 0.0609)  # fmt: skip
    assert not vae["use_quant_conv"] and not vae["use_post_quant_conv"]
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3
    large = json.loads((folders["sd35-large"] / "transformer" / "config.json").read_text())
    assert large["qk_norm"] == "rms_norm" and large["out_channels"] == 16

    tp = torch_pipe(folder)
    assert tp.tokenizer_max_length == 16
    # the released tokenizers' padding: CLIP-L with its eos token, CLIP-G with "!" (id 0),
    # T5 appends </s> (1) and pads with <pad> (0)
    ids_l = tp.tokenizer("a cat", padding="max_length", max_length=16).input_ids
    ids_g = tp.tokenizer_2("a cat", padding="max_length", max_length=16).input_ids
    ids_t5 = tp.tokenizer_3("a photo of a cat", padding="max_length", max_length=T5_LEN).input_ids
    assert ids_l[-1] == ids_l[3] == tp.tokenizer.eos_token_id and ids_g[4:] == [0] * 12
    assert ids_t5[5:] == [1] + [0] * 6 and 2 not in ids_t5[:5]  # whole words, no <unk>
    # the text encoders fit the transformer as SD3's do: widths padded to T5's
    hidden = tp.text_encoder.config.hidden_size + tp.text_encoder_2.config.hidden_size
    assert hidden < tp.transformer.config.joint_attention_dim == tp.text_encoder_3.config.d_model
    assert tp.text_encoder.config.hidden_act == "quick_gelu"
    assert tp.text_encoder_2.config.hidden_act == "gelu"


# --------------------------------------------------------------------------- encode_prompt


def assert_tokens_match(pipe, tp, prompts):
    tokens = pipe.tokenize(prompts)
    for ours, tok in ((tokens.clip_l, tp.tokenizer), (tokens.clip_g, tp.tokenizer_2)):
        ref = tok(prompts, padding="max_length", max_length=16, truncation=True).input_ids
        np.testing.assert_array_equal(ours, ref)
    if tp.tokenizer_3 is None:
        assert tokens.t5 is None
    else:
        ref = tp.tokenizer_3(prompts, padding="max_length", max_length=T5_LEN,
                             truncation=True).input_ids  # fmt: skip
        np.testing.assert_array_equal(tokens.t5, ref)
    return tokens


def assert_encode_prompt_matches(pipe, tp, tokens, clip_skip=None):
    with torch.no_grad():
        pos, neg, pooled, neg_pooled = tp.encode_prompt(
            PROMPTS, None, None, device="cpu", do_classifier_free_guidance=True,
            clip_skip=clip_skip, max_sequence_length=T5_LEN)  # fmt: skip
    cond = pipe.encode_prompt(tokens, clip_skip=clip_skip)  # (spelled out: see jax_latents)
    assert isinstance(cond, sd3.SD3Cond) and cond.prompt_embeds.shape == (2, 16 + T5_LEN, 20)
    # measured: <= 1.5e-6 (CLIP and T5 states and projections are O(1), fp32)
    np.testing.assert_allclose(cond.prompt_embeds, pos.numpy(), rtol=0, atol=EMBED_ATOL)
    np.testing.assert_allclose(cond.pooled, pooled.numpy(), rtol=0, atol=EMBED_ATOL)
    # diffusers encodes the default negative prompt "" without clip_skip
    for ours, ref in zip(pipe.null_cond, (neg, neg_pooled), strict=True):
        assert ours.shape[0] == 1
        np.testing.assert_allclose(np.broadcast_to(ours, ref.shape), ref.numpy(), rtol=0,
                                   atol=EMBED_ATOL)  # fmt: skip
    return cond


def test_encode_prompt_matches_diffusers(folders):
    """With T5; the long prompt is truncated to 16 CLIP and 12 T5 tokens on both sides."""
    folder = folders["sd3-medium"]
    tp, pipe = torch_pipe(folder), jax_pipe(folder)
    assert pipe.has_t5 and pipe.max_length == 16 and pipe.max_sequence_length == T5_LEN
    tokens = assert_tokens_match(pipe, tp, PROMPTS)
    cond = assert_encode_prompt_matches(pipe, tp, tokens)
    assert np.abs(np.asarray(cond.prompt_embeds[:, 16:])).min(axis=-1).max() > 0  # T5 rows


@pytest.mark.exact_codegen
def test_encode_prompt_without_t5_and_clip_skip_match_diffusers(folders):
    """A folder without T5: its 12 tokens are zeros, as in diffusers; clip_skip=1 changes
    the CLIP columns (diffusers' hidden_states[-3]), not the pooled vectors."""
    folder = folders["sd35-large"]
    tp, pipe = torch_pipe(folder, t5=False), jax_pipe(folder)
    assert not pipe.has_t5 and pipe.tokenizers[2] is None
    tokens = assert_tokens_match(pipe, tp, PROMPTS)
    base = assert_encode_prompt_matches(pipe, tp, tokens)
    skip = assert_encode_prompt_matches(pipe, tp, tokens, clip_skip=1)
    assert not np.asarray(base.prompt_embeds[:, 16:]).any()
    assert not np.asarray(base.prompt_embeds[:, :, 18:]).any()  # CLIP widths 8 + 10, padded
    assert np.abs(np.asarray(skip.prompt_embeds - base.prompt_embeds)).max() > 0.1
    np.testing.assert_array_equal(skip.pooled, base.pooled)


def test_t5_false_matches_diffusers_without_t5(folders, tmp_path):
    """``t5=False`` on a folder with T5 never reads text_encoder_3/ (here deleted though
    model_index.json lists it) and gives diffusers' ``text_encoder_3=None`` embeddings.
    (A folder listing T5 as null, as diffusers saves it without T5, is the SD3.5-Large one.)"""
    gone = _copy(folders["sd3-medium"], tmp_path, "t5_gone")
    shutil.rmtree(gone / "text_encoder_3")
    shutil.rmtree(gone / "tokenizer_3")
    pipe = sd3.load(gone, t5=False, max_sequence_length=T5_LEN)
    assert not pipe.has_t5
    with torch.no_grad():
        _, neg, _, neg_pooled = torch_pipe(folders["sd3-medium"], t5=False).encode_prompt(
            PROMPTS, None, None, device="cpu", max_sequence_length=T5_LEN)  # fmt: skip
    for ours, ref in zip(pipe.null_cond, (neg, neg_pooled), strict=True):
        np.testing.assert_allclose(ours[0], ref[0].numpy(), rtol=0, atol=EMBED_ATOL)
    assert not np.asarray(pipe.null_cond.prompt_embeds[:, 16:]).any()


# --------------------------------------------------------------------------- sampling


def test_flow_euler_grid_is_diffusers(folders):
    pipe = jax_pipe(folders["sd3-medium"])
    sched = torch_pipe(folders["sd3-medium"]).scheduler
    sched.set_timesteps(STEPS)
    s = pipe.flow_euler(STEPS)
    assert s.nfe == STEPS and pipe.schedule.shift == 3.0
    # sigmas, then diffusers' appended terminal 0
    np.testing.assert_allclose(np.asarray(s.times), sched.sigmas.numpy(), rtol=0, atol=1e-6)


def test_sd3_medium_latents_and_images_match_diffusers(folders):
    folder = folders["sd3-medium"]
    tp, pipe = torch_pipe(folder), jax_pipe(folder)
    noise = initial_noise(pipe, 0)
    assert noise.shape == (2, 16, 8, 8)
    ref_img, ref_lat = torch_generate(tp, noise)
    lat = jax_latents(pipe, noise)
    assert max_rel(lat, ref_lat) <= LATENT_RTOL  # measured: 4.6e-7
    img = to_unit(pipe.decode(jnp.asarray(lat)))
    assert np.abs(img - ref_img).max() <= IMAGE_ATOL  # measured: 8.3e-7
    # the random model's images are not saturated, so the comparison means something
    assert np.mean((ref_img > 0.01) & (ref_img < 0.99)) > 0.5
    # decode() alone, on diffusers' own final latents
    np.testing.assert_allclose(to_unit(pipe.decode(jnp.asarray(ref_lat))), ref_img, rtol=0,
                               atol=IMAGE_ATOL)  # fmt: skip
    # negative control: the tolerance catches the unshifted grid (shift 1 instead of 3;
    # measured 1.8e-2, 1800x the tolerance)
    unshifted = samplers.flow_euler(pipe.schedule, times=np.linspace(1.0, 0.0, STEPS + 1))
    assert max_rel(jax_latents(pipe, noise, sampler=unshifted), ref_lat) > 100 * LATENT_RTOL


def test_flow_heun_latents_match_diffusers(folders):
    """``pipe.flow_heun(N)`` with CFG: diffusers' pipeline with its scheduler swapped for
    ``FlowMatchHeunDiscreteScheduler.from_config`` (2N - 1 model calls), the same latents."""
    from diffusers import FlowMatchHeunDiscreteScheduler

    folder = folders["sd3-medium"]
    tp, pipe = torch_pipe(folder), jax_pipe(folder)
    noise = initial_noise(pipe, 0)
    original = tp.scheduler
    tp.scheduler = FlowMatchHeunDiscreteScheduler.from_config(original.config)
    try:
        ref, _ = torch_generate(tp, noise, output_type="latent")
    finally:
        tp.scheduler = original
    s = pipe.flow_heun(STEPS)
    assert s.nfe == 2 * STEPS - 1
    assert max_rel(jax_latents(pipe, noise, sampler=s), ref) <= LATENT_RTOL  # measured 3.2e-6
    # negative control: Euler on the same grid is far off (measured 3.7e-2)
    assert max_rel(jax_latents(pipe, noise), ref) > 100 * LATENT_RTOL


@pytest.mark.parametrize("layout", ["sd35-medium", "sd35-large"])
def test_sd35_latents_match_diffusers(folders, layout):
    # one prompt: its encoding shares the compiled program of the (batch 1) null condition
    folder = folders[layout]
    tp, pipe = torch_pipe(folder, t5=LAYOUTS[layout]), jax_pipe(folder)
    noise = initial_noise(pipe, 1, batch=1)
    ref, _ = torch_generate(tp, noise, PROMPTS[1:], output_type="latent")
    lat = jax_latents(pipe, noise, PROMPTS[1:])
    assert max_rel(lat, ref) <= LATENT_RTOL  # measured: 3.7e-7 (3.5-Medium), 5.7e-7 (3.5-Large)


def test_bfloat16_is_close_to_float32(folders):
    folder = folders["sd35-large"]
    pipe32, pipe16 = jax_pipe(folder), jax_pipe(folder, dtype=jnp.bfloat16)
    noise = initial_noise(pipe32, 1, batch=1)
    lat32 = jax_latents(pipe32, noise, PROMPTS[1:])
    lat16 = jax_latents(pipe16, noise, PROMPTS[1:])

    def rel_l2(a, b):
        return float(np.linalg.norm(a - b) / np.linalg.norm(b))

    # measured: 5e-3 (bf16 has an 8-bit mantissa; the VAE's bf16 decode is checked in
    # test_parity_vae.py); above 1e-4, so the networks really ran in bfloat16
    assert 1e-4 < rel_l2(lat16, lat32) < 0.05


# --------------------------------------------------------------------------- broken folders


def _copy(folder, tmp_path, name):
    dst = tmp_path / name
    shutil.copytree(folder, dst)
    return dst


def test_missing_components_are_named(folders, tmp_path):
    broken = _copy(folders["sd3-medium"], tmp_path, "missing")
    shutil.rmtree(broken / "transformer")
    shutil.rmtree(broken / "text_encoder_2")
    (broken / "tokenizer" / "merges.txt").unlink()
    with pytest.raises(CheckpointError) as err:
        sd3.load(broken)
    msg = str(err.value)
    assert (
        "transformer/ (listed in model_index.json as SD3Transformer2DModel, folder missing)" in msg
    )
    assert "text_encoder_2/ (listed in model_index.json" in msg
    assert "tokenizer/merges.txt" in msg

    # T5 listed but its folder gone: named (t5=False loads it: see the no-T5 test above)
    no_t5 = _copy(folders["sd3-medium"], tmp_path, "no_t5_folder")
    shutil.rmtree(no_t5 / "text_encoder_3")
    with pytest.raises(CheckpointError, match=r"text_encoder_3/ \(listed in model_index.json"):
        sd3.load(no_t5)


def test_misshaped_transformer_tensor_is_named(folders, tmp_path):
    bad = _copy(folders["sd3-medium"], tmp_path, "misshaped")
    st_file = bad / "transformer" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(st_file))
    assert weights["context_embedder.weight"].shape == (16, 20)
    weights["context_embedder.weight"] = weights["context_embedder.weight"][:, :18]
    save_file(weights, str(st_file))
    with pytest.raises(CheckpointError) as err:
        sd3.load(bad)
    msg = str(err.value)
    assert "context_embedder" in msg and "(expected (20, 16), got (18, 16))" in msg


def test_pickled_weights_refused_unless_allowed(folders, tmp_path):
    folder = folders["sd35-large"]
    pickled = _copy(folder, tmp_path, "pickled")
    st_file = pickled / "text_encoder_2" / "model.safetensors"
    torch.save({k: torch.from_numpy(v) for k, v in load_file(str(st_file)).items()},
               pickled / "text_encoder_2" / "pytorch_model.bin")  # fmt: skip
    st_file.unlink()
    with pytest.raises(CheckpointError, match="only pickled PyTorch weights found"):
        sd3.load(pickled)
    loaded = sd3.load(pickled, allow_pickle=True, max_sequence_length=T5_LEN)
    for ours, ref in zip(loaded.null_cond, jax_pipe(folder).null_cond, strict=True):
        np.testing.assert_array_equal(ours, ref)


def test_generate_defaults_are_diffusers(folders):
    """``pipe.generate``'s defaults are ``StableDiffusion3Pipeline.__call__``'s: 28 steps and
    guidance scale 7.0 (``generate`` used SD's 7.5 on SD3 before ``default_cfg``)."""
    import inspect

    pipe = jax_pipe(folders["sd3-medium"])
    params = inspect.signature(StableDiffusion3Pipeline.__call__).parameters
    assert pipe.default_cfg() == params["guidance_scale"].default == 7.0
    assert pipe.default_sampler().num_steps == params["num_inference_steps"].default == 28


def test_generate_with_a_negative_prompt_is_diffusers(folders):
    """``pipe.generate(negative_prompt=)`` equals ``StableDiffusion3Pipeline``'s (all three
    encoders encode it, T5 included)."""
    folder = folders["sd3-medium"]
    tp, pipe = torch_pipe(folder), jax_pipe(folder)
    noise = initial_noise(pipe, 4)
    negative = "the blue cat"
    _, ref = torch_generate(tp, noise, negative_prompt=[negative] * len(PROMPTS))
    kw = dict(key=jax.random.key(0), sampler=pipe.flow_euler(STEPS), cfg=CFG, noise=noise)
    got = np.asarray(pipe.generate(PROMPTS, 1, negative_prompt=negative, **kw).latents)
    assert max_rel(got, ref) <= LATENT_RTOL
    plain = np.asarray(pipe.generate(PROMPTS, 1, **kw).latents)  # the empty prompt's branch
    assert max_rel(plain, ref) > 100 * LATENT_RTOL


def test_generate_repels_each_prompts_images_within_themselves(folders):
    """Contextual repulsion with two prompts: one group per prompt, each prompt's images as
    ``generate`` with that prompt alone makes them."""
    pipe = jax_pipe(folders["sd3-medium"])
    noise = initial_noise(pipe, 4, batch=4)
    kw = dict(key=jax.random.key(0), sampler=pipe.flow_euler(4), cfg=CFG,
              method=guidance.contextual(500.0, 5, tau=2))  # fmt: skip
    both = pipe.generate(PROMPTS, 2, noise=noise, **kw).latents
    for j, prompt in enumerate(PROMPTS):
        rows = slice(2 * j, 2 * j + 2)
        own = np.asarray(pipe.generate(prompt, 2, noise=noise[rows], **kw).latents)
        np.testing.assert_allclose(both[rows], own, rtol=0, atol=1e-5 * np.abs(own).max())
    plain = pipe.generate(PROMPTS, 2, noise=noise, **{**kw, "method": None}).latents
    assert max_rel(np.asarray(both), np.asarray(plain)) > 3e-3  # acted (measured 1.4e-2)
