"""Parity of jaxdiv's Flax UNet2DConditionModel with diffusers' PyTorch implementation.

Tiny random diffusers UNets in an SD1-like configuration (1x1-conv transformer
projections, int ``attention_head_dim``) and an SD2-like one (linear projections,
per-block head counts, ``upcast_attention``) are saved with ``save_pretrained``
(safetensors), loaded through :func:`jaxdiv.models.unet.load_unet`, and both models
predict eps for the same random latents, timesteps and text states.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet
from diffusers.models.embeddings import get_timestep_embedding
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.layers import timestep_embedding
from jaxdiv.models.unet import UNetConfig, load_unet
from jaxdiv.testing import TINY_UNET_SD1, TINY_UNET_SD2, randomize_norms_and_biases

# SD1-like: 1x1-conv transformer projections, an int attention_head_dim (diffusers' name
# for the number of heads); SD2-like: linear projections, per-block head counts,
# upcast_attention.
SD1_LIKE = TINY_UNET_SD1
SD2_LIKE = TINY_UNET_SD2

FP32_ATOL = 1e-4
# bf16 keeps 8 significant bits (unit roundoff 2**-9 ~ 2e-3); weights and activations are
# rounded at each of the ~30 layers of these nets, so errors of ~1e-2 relative are
# expected (measured: 1.2-1.3e-2 relative L2). 5e-2 leaves margin while a wrong layer
# (error ~ 1) still fails.
BF16_REL_L2 = 5e-2


def build_and_save(config: dict, folder, seed: int) -> TorchUNet:
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(TorchUNet(**config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    """(torch model, its saved folder, the folder loaded by jaxdiv in fp32)."""
    folder = tmp_path_factory.mktemp("unet_sd1")
    torch_model = build_and_save(SD1_LIKE, folder, seed=0)
    return torch_model, folder, load_unet(folder)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet_sd2")
    torch_model = build_and_save(SD2_LIKE, folder, seed=1)
    return torch_model, folder, load_unet(folder)


def inputs(config: dict, shape=(2, 4, 16, 16), seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    t = np.array([3, 871][: shape[0]], dtype=np.int64)
    ctx = rng.standard_normal((shape[0], 7, config["cross_attention_dim"])).astype(np.float32)
    return x, t, ctx


def torch_eps(model, x, t, ctx):
    with torch.no_grad():
        return model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()


def jax_eps(model, x, t, ctx):
    return jax.jit(lambda a, b, c: model(a, b, c))(x, t, ctx)


def test_sd1_like_unet_matches_diffusers_fp32(sd1):
    torch_model, _, model = sd1
    assert model.config.use_linear_projection is False
    x, t, ctx = inputs(SD1_LIKE)
    ref = torch_eps(torch_model, x, t, ctx)
    out = np.asarray(jax_eps(model, x, t, ctx))
    assert out.shape == ref.shape == x.shape
    assert np.abs(ref).max() > 0.5  # a non-trivial output, so the comparison means something
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


def test_sd2_like_unet_matches_diffusers_fp32_at_odd_latent_size(sd2):
    # 13 x 11 latents are not divisible by the 2x upsampling, so this also checks that
    # upsampling targets the skip connection's size (diffusers' forward_upsample_size).
    torch_model, _, model = sd2
    assert model.config.num_heads == (2, 4) and model.config.upcast_attention
    x, t, ctx = inputs(SD2_LIKE, shape=(2, 4, 13, 11), seed=1)
    ref = torch_eps(torch_model, x, t, ctx)
    out = np.asarray(jax_eps(model, x, t, ctx))
    assert np.abs(ref).max() > 0.5
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


def test_sd2_like_unet_bf16_is_close_to_fp32_reference(sd2):
    torch_model, folder, _ = sd2
    model = load_unet(folder, dtype=jnp.bfloat16)
    assert model.conv_in.kernel[...].dtype == jnp.bfloat16
    x, t, ctx = inputs(SD2_LIKE, seed=2)
    ref = torch_eps(torch_model, x, t, ctx)
    out = jax_eps(model, x, t, ctx)
    assert out.dtype == jnp.bfloat16
    err = np.asarray(out.astype(jnp.float32)) - ref
    assert np.linalg.norm(err) / np.linalg.norm(ref) < BF16_REL_L2


@settings(max_examples=8, deadline=None)
@given(
    dim=st.sampled_from([5, 8, 33, 320]),
    flip=st.booleans(),
    shift=st.sampled_from([0.0, 1.0]),
    t=st.lists(st.floats(0, 999, allow_nan=False), min_size=3, max_size=3),
)
def test_timestep_embedding_matches_diffusers(dim, flip, shift, t):
    ref = get_timestep_embedding(
        torch.tensor(t, dtype=torch.float32), dim, flip_sin_to_cos=flip, downscale_freq_shift=shift
    ).numpy()
    out = timestep_embedding(jnp.array(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    # float32 sin/cos of arguments up to ~1e3 rad: a few ulps of the argument.
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=5e-4)


def test_missing_and_misshaped_tensors_are_all_named(sd1, tmp_path):
    _, folder, _ = sd1
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del sd["conv_in.weight"]
    sd["down_blocks.0.attentions.0.proj_in.bias"] = np.zeros(5, np.float32)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_unet(tmp_path)
    msg = str(info.value)
    assert "missing tensors (1): conv_in.kernel" in msg
    assert "down_blocks.0.attentions.0.proj_in.bias (expected (32,), got (5,))" in msg


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("class_embed_type", "timestep"),
        ("addition_embed_type", "text_time"),
        ("resnet_time_scale_shift", "scale_shift"),
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("attention_head_dim", [2, 4, 8]),
    ],
)
def test_unsupported_config_is_rejected_by_name(key, value):
    config = json.loads(json.dumps(SD1_LIKE))
    config[key] = value
    with pytest.raises(ValueError, match=key):
        UNetConfig.from_dict(config)


def test_bad_inputs_raise_clear_errors(sd1):
    _, _, model = sd1
    x, t, ctx = inputs(SD1_LIKE)
    with pytest.raises(ValueError, match="sample must be NCHW with 4 channels"):
        model(x[:, :3], t, ctx)
    with pytest.raises(ValueError, match="cross_attention_dim=24"):
        model(x, t, ctx[..., :5])
    with pytest.raises(ValueError, match="timesteps"):
        model(x, np.array([1, 2, 3]), ctx)
