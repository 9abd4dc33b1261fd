"""Parity of jaxdiv's Flax AutoencoderKL with diffusers' PyTorch implementation.

Tiny random diffusers VAEs (4 latent channels with quant convs, SD 1.x/2.x style; 16
latent channels without them and with a shift factor, SD3 style) are saved with
``save_pretrained`` (safetensors), loaded through :func:`jaxdiv.models.vae.load_vae`,
and compared on the posterior mean / log-variance and on decoding.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchVAE
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.vae import DiagonalGaussian, VAEConfig, load_vae
from jaxdiv.testing import TINY_VAE, randomize_norms_and_biases

VAE4 = TINY_VAE  # 4 latent channels, quant convs, one resnet per block: SD 1.x / 2.x
VAE16 = dict(
    TINY_VAE,
    latent_channels=16,
    layers_per_block=2,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)

FP32_ATOL = 1e-4
# bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3), rounded at each of ~20
# layers: ~1e-2 relative error is expected (measured 1.3-1.7e-2 relative L2). A wrong
# layer gives errors of order 1.
BF16_REL_L2 = 5e-2


def make(config: dict, folder, seed: int):
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(TorchVAE(**config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder, load_vae(folder)


@pytest.fixture(scope="module")
def vae4(tmp_path_factory):
    return make(VAE4, tmp_path_factory.mktemp("vae4"), seed=0)


@pytest.fixture(scope="module")
def vae16(tmp_path_factory):
    return make(VAE16, tmp_path_factory.mktemp("vae16"), seed=1)


def data(latent_channels: int, seed: int):
    rng = np.random.default_rng(seed)
    images = rng.uniform(-1, 1, (2, 3, 16, 16)).astype(np.float32)
    latents = rng.standard_normal((2, latent_channels, 8, 8)).astype(np.float32)
    return images, latents


def torch_run(model, images, latents):
    with torch.no_grad():
        post = model.encode(torch.from_numpy(images)).latent_dist
        dec = model.decode(torch.from_numpy(latents)).sample
    return post.mean.numpy(), post.logvar.numpy(), dec.numpy()


def jax_run(model, images, latents):
    # One compiled program for encode + decode keeps the test to a single compile.
    def both(x, z):
        post = model.encode(x)
        return post.mean, post.logvar, model.decode(z)

    return jax.jit(both)(images, latents)


@pytest.mark.parametrize("which", ["vae4", "vae16"])
def test_vae_matches_diffusers_fp32(which, request):
    torch_model, _, model = request.getfixturevalue(which)
    lat = model.config.latent_channels
    images, latents = data(lat, seed=3)
    refs = torch_run(torch_model, images, latents)
    outs = jax_run(model, images, latents)
    assert outs[0].shape == (2, lat, 8, 8) and outs[2].shape == images.shape
    for name, out, ref in zip(("mean", "logvar", "decode"), outs, refs, strict=True):
        assert np.abs(ref).max() > 0.3, name  # non-trivial values
        np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=FP32_ATOL, err_msg=name)


def test_decode_gradient_matches_torch_autograd(vae4):
    # Guidance terms (GASS, CLIP losses) differentiate a loss of the decoded image with
    # respect to the latents; compare that gradient with PyTorch autograd.
    torch_model, _, model = vae4
    _, latents = data(4, seed=6)
    weights = np.random.default_rng(7).standard_normal((2, 3, 16, 16)).astype(np.float32)
    z = torch.from_numpy(latents).requires_grad_(True)
    (torch_model.decode(z).sample * torch.from_numpy(weights)).sum().backward()
    grad = jax.jit(jax.grad(lambda v: jnp.sum(model.decode(v) * weights)))(latents)
    ref = z.grad.numpy()
    assert np.abs(ref).max() > 0.3
    np.testing.assert_allclose(np.asarray(grad), ref, rtol=0, atol=FP32_ATOL)


def test_vae16_bf16_is_close_to_fp32_reference(vae16):
    torch_model, folder, _ = vae16
    model = load_vae(folder, dtype=jnp.bfloat16)
    images, latents = data(16, seed=4)
    refs = torch_run(torch_model, images, latents)
    outs = jax_run(model, images, latents)
    for name, out, ref in zip(("mean", "logvar", "decode"), outs, refs, strict=True):
        assert out.dtype == jnp.bfloat16, name
        err = np.asarray(out.astype(jnp.float32)) - ref
        assert np.linalg.norm(err) / np.linalg.norm(ref) < BF16_REL_L2, name


def test_config_factors_and_latent_scaling(vae4, vae16):
    assert vae4[2].config.use_quant_conv and vae4[2].quant_conv is not None
    assert vae16[2].quant_conv is None and vae16[2].post_quant_conv is None
    model = vae16[2]
    assert (model.config.scaling_factor, model.config.shift_factor) == (1.5305, 0.0609)
    z = jnp.linspace(-2, 2, 16).reshape(1, 16, 1, 1)
    # SD3 pipeline: latents = (z - shift) * scale; decode(latents / scale + shift).
    np.testing.assert_allclose(model.scale_latents(z), (z - 0.0609) * 1.5305, rtol=1e-6)
    np.testing.assert_allclose(model.unscale_latents(model.scale_latents(z)), z, atol=1e-6)
    assert VAEConfig.from_dict({"shift_factor": None}).shift_factor == 0.0


def test_posterior_sample_has_the_posterior_moments():
    mean = jnp.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    post = DiagonalGaussian(mean, jnp.full_like(mean, -1.0))
    draws = jax.vmap(post.sample)(jax.random.split(jax.random.key(0), 4000))
    # 4000 draws: the sample mean's standard error is std / 63; allow 5 of them.
    assert np.all(np.abs(draws.mean(0) - post.mean) < 5 * post.std / np.sqrt(4000))
    np.testing.assert_allclose(draws.std(0), np.exp(-0.5), rtol=0.1)
    assert post.mode() is post.mean


def test_only_pickled_weights_are_refused(vae4, tmp_path):
    torch_model, folder, ref = vae4
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    torch.save(torch_model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_vae(tmp_path)
    model = load_vae(tmp_path, allow_pickle=True)
    same = jax.tree.map(np.array_equal, nnx.state(model), nnx.state(ref))
    assert all(jax.tree.leaves(same))


def test_pre_014_attention_names_load_identically(vae4, tmp_path):
    # Old VAE checkpoints name the mid-block attention query/key/value/proj_attn (diffusers
    # still renames them on load); they must give the same parameters.
    _, folder, ref = vae4
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    old = {}
    for k, v in sd.items():
        for new, legacy in (
            (".to_q.", ".query."),
            (".to_k.", ".key."),
            (".to_v.", ".value."),
            (".to_out.0.", ".proj_attn."),
        ):
            k = k.replace(new, legacy)
        if ".query.weight" in k:
            v = v[:, :, None, None]  # some of them stored these as 1x1 convs
        old[k] = v
    assert any(".proj_attn." in k for k in old)
    save_file(old, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    model = load_vae(tmp_path)
    same = jax.tree.map(np.array_equal, nnx.state(model), nnx.state(ref))
    assert all(jax.tree.leaves(same))


def test_bad_inputs_and_configs_raise(vae4):
    model = vae4[2]
    with pytest.raises(ValueError, match="images must be NCHW with 3 channels"):
        model.encode(np.zeros((1, 4, 16, 16), np.float32))
    with pytest.raises(ValueError, match="latents must be NCHW with 4 channels"):
        model.decode(np.zeros((1, 16, 8, 8), np.float32))
    with pytest.raises(ValueError, match="down_block_types"):
        VAEConfig.from_dict(dict(TINY_VAE, down_block_types=["AttnDownEncoderBlock2D"] * 2))
    with pytest.raises(ValueError, match="norm_num_groups"):
        VAEConfig.from_dict(dict(TINY_VAE, norm_num_groups=7))
