"""Parity of jaxdiv's Flax SD3 MMDiT with diffusers' PyTorch ``SD3Transformer2DModel``.

Tiny random diffusers transformers in the three released layouts -- SD3-Medium (joint
blocks, last one ``context_pre_only``), SD3.5-Medium (MMDiT-X ``attn2`` in some blocks,
RMS q/k norm) and SD3.5-Large (RMS q/k norm) -- with random norm weights and biases, are
saved with ``save_pretrained`` (safetensors), loaded through
:func:`jaxdiv.models.mmdit.load_mmdit`, and both predict the velocity for the same
latents, timesteps, text tokens and pooled vectors. The latent (10 x 6 pixels, 5 x 3
patches) is non-square and smaller than the 8 x 8-patch position table, so the centre
crop is exercised. Both models take NCHW latents.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel as TorchMMDiT
from diffusers.models.embeddings import get_2d_sincos_pos_embed
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.mmdit import MMDiTConfig, load_mmdit, sincos_pos_embed_2d
from jaxdiv.testing import (
    TINY_MMDIT,
    TINY_MMDIT_SD35_LARGE,
    TINY_MMDIT_SD35_MEDIUM,
    randomize_norms_and_biases,
)

LAYOUTS = {
    "sd3_medium": TINY_MMDIT,
    "sd35_medium": TINY_MMDIT_SD35_MEDIUM,
    "sd35_large": TINY_MMDIT_SD35_LARGE,
}
FP32_ATOL = 1e-4
# bf16 keeps 8 significant bits (unit roundoff ~2e-3), rounded at each of the ~40 matmuls
# and modulations; a wrong layer gives an error of order 1, so 5e-2 still discriminates.
BF16_REL_L2 = 5e-2
LATENT_SHAPE = (2, 4, 10, 6)  # NCHW: 5 x 3 patches of the 8 x 8 table


def build_and_save(config: dict, folder, seed: int) -> TorchMMDiT:
    torch.manual_seed(seed)
    model = randomize_norms_and_biases(TorchMMDiT(**config), seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def layout(request, tmp_path_factory):
    """(name, config, torch model, its saved folder, the folder loaded by jaxdiv in fp32)."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"mmdit_{name}")
    torch_model = build_and_save(LAYOUTS[name], folder, seed=sorted(LAYOUTS).index(name))
    return name, LAYOUTS[name], torch_model, folder, load_mmdit(folder)


@pytest.fixture(scope="module")
def sd35_medium(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mmdit_sd35m")
    torch_model = build_and_save(TINY_MMDIT_SD35_MEDIUM, folder, seed=7)
    return torch_model, folder, load_mmdit(folder)


def inputs(config: dict, shape=LATENT_SHAPE, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    t = np.array([3.0, 871.5][: shape[0]], np.float32)  # SD3 timesteps are 1000 * sigma
    ctx = rng.standard_normal((shape[0], 7, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((shape[0], config["pooled_projection_dim"])).astype(np.float32)
    return x, t, ctx, pooled


def torch_velocity(model, x, t, ctx, pooled):
    with torch.no_grad():
        out = model(
            torch.from_numpy(x),
            encoder_hidden_states=torch.from_numpy(ctx),
            pooled_projections=torch.from_numpy(pooled),
            timestep=torch.from_numpy(t),
        )
    return out.sample.numpy()


# one jitted function with the weights as arguments: models of one structure (layout,
# dtype, hook) share a compilation, which keeps this file fast
@functools.partial(jax.jit, static_argnames=("graphdef", "hook"))
def _velocity(graphdef, state, x, t, ctx, pooled, hook=None):
    return nnx.merge(graphdef, state)(x, t, ctx, pooled, context_hook=hook)


def jax_velocity(model, x, t, ctx, pooled, hook=None):
    graphdef, state = nnx.split(model)
    return _velocity(graphdef, state, x, t, ctx, pooled, hook=hook)


def test_layouts_are_the_released_ones(layout):
    name, _, _, _, model = layout
    blocks = model.transformer_blocks
    assert blocks[-1].context_pre_only and not any(b.context_pre_only for b in blocks[:-1])
    assert blocks[-1].attn.to_add_out is None and blocks[-1].ff_context is None
    dual = [i for i, b in enumerate(blocks) if b.attn2 is not None]
    assert dual == ([0, 1] if name == "sd35_medium" else [])
    assert (blocks[0].attn.norm_added_q is not None) == name.startswith("sd35")


def test_matches_diffusers_fp32(layout):
    _, config, torch_model, _, model = layout
    x, t, ctx, pooled = inputs(config)
    ref = torch_velocity(torch_model, x, t, ctx, pooled)
    out = np.asarray(jax_velocity(model, x, t, ctx, pooled))
    assert out.shape == ref.shape == (2, config["out_channels"], 10, 6)
    assert np.abs(ref).max() > 0.5  # a non-trivial output, so the comparison means something
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


def test_position_table_is_diffusers_sincos_and_cropped_from_the_middle(layout):
    _, config, torch_model, _, model = layout
    # the stored table (loaded) and the one a fresh model initialises both equal diffusers'
    buffer = torch_model.pos_embed.pos_embed.numpy()
    m = config["pos_embed_max_size"]
    mine = np.asarray(sincos_pos_embed_2d(16, m, m, base_size=config["sample_size"] // 2))
    np.testing.assert_allclose(mine[None], buffer, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(model.pos_embed.pos_embed[...]), buffer)
    # a non-square grid (row/column coordinates are not interchangeable)
    ref = get_2d_sincos_pos_embed(16, (5, 3), base_size=4).numpy()
    np.testing.assert_allclose(sincos_pos_embed_2d(16, 5, 3, base_size=4), ref, atol=1e-6)


def test_without_a_stored_table_the_sincos_table_of_the_grid_is_used(tmp_path):
    # pos_embed_max_size=None: diffusers recomputes the table for a latent whose grid
    # differs from sample_size (no table in the checkpoint)
    config = dict(TINY_MMDIT, num_layers=1, pos_embed_max_size=None)
    torch_model = build_and_save(config, tmp_path, seed=3)
    model = load_mmdit(tmp_path)
    assert model.pos_embed.pos_embed is None
    x, t, ctx, pooled = inputs(config, seed=3)
    ref = torch_velocity(torch_model, x, t, ctx, pooled)
    out = np.asarray(jax_velocity(model, x, t, ctx, pooled))
    np.testing.assert_allclose(out, ref, rtol=0, atol=FP32_ATOL)


def test_bf16_is_close_to_fp32_reference(sd35_medium):
    torch_model, folder, _ = sd35_medium
    model = load_mmdit(folder, dtype=jnp.bfloat16)
    assert model.context_embedder.kernel[...].dtype == jnp.bfloat16
    x, t, ctx, pooled = inputs(TINY_MMDIT_SD35_MEDIUM, seed=2)
    ref = torch_velocity(torch_model, x, t, ctx, pooled)
    out = jax_velocity(model, x, t, ctx, pooled)
    assert out.dtype == jnp.bfloat16
    err = np.asarray(out.astype(jnp.float32)) - ref
    assert np.linalg.norm(err) / np.linalg.norm(ref) < BF16_REL_L2


def test_context_hook_sees_every_text_stream_and_identity_changes_nothing(sd35_medium):
    _, _, model = sd35_medium
    x, t, ctx, pooled = inputs(TINY_MMDIT_SD35_MEDIUM, seed=4)
    calls = []

    def identity(i, c):
        calls.append((i, c.shape))
        return c

    def zero(i, c):
        return jnp.zeros_like(c)

    plain = np.asarray(jax_velocity(model, x, t, ctx, pooled))
    hooked = np.asarray(jax_velocity(model, x, t, ctx, pooled, identity))
    # once per block that outputs a text stream (3 blocks, the last is context_pre_only);
    # the stream has the model width (16), not the text-encoder width (20)
    assert calls == [(0, (2, 7, 16)), (1, (2, 7, 16))]
    np.testing.assert_array_equal(hooked, plain)
    zeroed = np.asarray(jax_velocity(model, x, t, ctx, pooled, zero))
    assert np.abs(zeroed - plain).max() > 1e-2


def test_context_hook_must_keep_the_shape(sd35_medium):
    _, _, model = sd35_medium
    x, t, ctx, pooled = inputs(TINY_MMDIT_SD35_MEDIUM)
    with pytest.raises(ValueError, match="context_hook must return"):
        jax_velocity(model, x, t, ctx, pooled, lambda i, c: c[:, :3])


def test_missing_and_misshaped_tensors_are_all_named(sd35_medium, tmp_path):
    _, folder, _ = sd35_medium
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del sd["transformer_blocks.1.attn2.norm_k.weight"]
    sd["context_embedder.bias"] = np.zeros(5, np.float32)
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError) as info:
        load_mmdit(tmp_path)
    msg = str(info.value)
    assert "missing tensors (1): transformer_blocks.1.attn2.norm_k.scale" in msg
    assert "context_embedder.bias (expected (16,), got (5,))" in msg


def test_a_missing_position_table_is_named(sd35_medium, tmp_path):
    _, folder, _ = sd35_medium
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    del sd["pos_embed.pos_embed"]
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors \\(1\\): pos_embed.pos_embed"):
        load_mmdit(tmp_path)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("qk_norm", "layer_norm"),
        ("caption_projection_dim", 24),
        ("dual_attention_layers", [0, 3]),
        ("patch_size", 0),
    ],
)
def test_unsupported_config_is_rejected_by_name(key, value):
    config = json.loads(json.dumps(TINY_MMDIT))
    config[key] = value
    with pytest.raises(ValueError, match=key):
        MMDiTConfig.from_dict(config)


def test_bad_inputs_raise_clear_errors(sd35_medium):
    _, _, model = sd35_medium
    x, t, ctx, pooled = inputs(TINY_MMDIT_SD35_MEDIUM)
    with pytest.raises(ValueError, match="hidden_states must be NCHW with 4 channels"):
        model(x.transpose(0, 2, 3, 1), t, ctx, pooled)
    with pytest.raises(ValueError, match="multiples of patch_size=2"):
        model(x[:, :, :9], t, ctx, pooled)
    with pytest.raises(ValueError, match="joint_attention_dim=20"):
        model(x, t, ctx[..., :16], pooled)
    with pytest.raises(ValueError, match="pooled_projection_dim=12"):
        model(x, t, ctx, pooled[:, :5])
    with pytest.raises(ValueError, match="pos_embed_max_size=8"):
        model(np.zeros((2, 4, 18, 6), np.float32), t, ctx, pooled)
