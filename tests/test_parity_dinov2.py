"""Parity of the Flax DINOv2 port with transformers' PyTorch ``Dinov2Model``.

Tiny random models (GELU MLP and ViT-g's SwiGLU FFN) are built by transformers with
random layer scales, norms and biases, saved with ``save_pretrained`` (safetensors, in the
legacy key layout of the released checkpoints) into temp folders, loaded with
:func:`jaxdiv.models.dinov2.load_dinov2` and compared at the native resolution and at
non-native, non-square ones (position-embedding interpolation up and down).
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.dinov2 import (
    Dinov2Config,
    Dinov2Model,
    bicubic_weights,
    dinov2_preprocess,
    load_dinov2,
    torch_bicubic_resize,
)
from jaxdiv.testing import randomize_norms_and_biases

FP32_ATOL = 1e-4
TINY = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, patch_size=4,
            image_size=16, mlp_ratio=4, layer_norm_eps=1e-6)  # fmt: skip
CONFIGS = {
    "mlp": dict(TINY),
    "swiglu": dict(TINY, num_hidden_layers=2, num_attention_heads=2, use_swiglu_ffn=True),
}
# (height, width): native; up and non-square (6x5 patches); down (3x2); ragged (5x4 + rest)
SIZES = [(16, 16), (24, 20), (12, 8), (22, 17)]


def torch_dinov2(kind, seed=0):
    torch.manual_seed(seed)
    model = transformers.Dinov2Model(transformers.Dinov2Config(**CONFIGS[kind]))
    # 1-d parameters (norms, biases, layer-scale lambdas) random around (1 | 0); the
    # lambdas then get a spread far from layerscale_value=1 so a missing scale shows
    model = randomize_norms_and_biases(model, seed + 1)
    g = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lambda1"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif name.endswith("position_embeddings"):
                p.copy_(torch.randn(p.shape, generator=g))  # O(1), so interpolation matters
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for kind in CONFIGS:
        model = torch_dinov2(kind)
        folder = tmp_path_factory.mktemp(f"dinov2_{kind}")
        model.save_pretrained(folder)
        assert (folder / "model.safetensors").is_file()
        out[kind] = (model, folder)
    return out


@nnx.jit(static_argnames="hidden")
def encode(model, x, hidden=False):
    """One compile per structure and input shape (eager dispatch is slower on CPU)."""
    return model(x, output_hidden_states=hidden)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def images(size, seed, batch=2):
    return np.random.default_rng(seed).standard_normal((batch, 3, *size)).astype(np.float32)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_parity_fp32_native_and_interpolated(models, kind):
    torch_model, folder = models[kind]
    ours = load_dinov2(folder)
    assert isinstance(ours, Dinov2Model) and ours.config.use_swiglu_ffn == (kind == "swiglu")
    for i, size in enumerate(SIZES):
        x = images(size, seed=10 + i)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(x), output_hidden_states=True)
        got = encode(ours, jnp.asarray(x.transpose(0, 2, 3, 1)), hidden=True)
        assert got.last_hidden_state.shape == tuple(ref.last_hidden_state.shape)
        assert max_diff(got.last_hidden_state, ref.last_hidden_state) <= FP32_ATOL, size
        assert max_diff(got.pooler_output, ref.pooler_output) <= FP32_ATOL, size
        assert len(got.hidden_states) == len(ref.hidden_states)
        for g, r in zip(got.hidden_states, ref.hidden_states, strict=True):
            assert max_diff(g, r) <= FP32_ATOL, size


def test_interpolation_is_exercised(models):
    """Guard: with a bilinear (or jax.image cubic) table the 24x20 output would differ."""
    torch_model, folder = models["mlp"]
    ours = load_dinov2(folder)
    table = np.asarray(ours.embeddings.position_embeddings[...])[:, 1:].reshape(1, 4, 4, -1)
    other = jax.image.resize(table, (1, 6, 5, table.shape[-1]), method="cubic")
    assert max_diff(other, torch_bicubic_resize(table, (6, 5))) > 1e-2


@pytest.mark.parametrize(
    "in_hw, out_hw", [((4, 4), (6, 5)), ((7, 5), (3, 9)), ((16, 16), (37, 11)), ((5, 9), (2, 1)),
                      ((1, 3), (4, 3))]
)  # fmt: skip
def test_bicubic_matches_torch(in_hw, out_hw):
    x = np.random.default_rng(sum(in_hw + out_hw)).standard_normal((2, 3, *in_hw))
    x = x.astype(np.float32)
    want = torch.nn.functional.interpolate(torch.from_numpy(x), size=out_hw, mode="bicubic",
                                           align_corners=False).numpy()  # fmt: skip
    got = np.asarray(torch_bicubic_resize(x.transpose(0, 2, 3, 1), out_hw)).transpose(0, 3, 1, 2)
    assert max_diff(got, want) <= 1e-5
    for n, m in zip(in_hw, out_hw, strict=True):
        np.testing.assert_allclose(bicubic_weights(n, m).sum(1), 1.0, atol=1e-6)


def test_bf16_close(models):
    torch_model, folder = models["swiglu"]
    ours = load_dinov2(folder, dtype=jnp.bfloat16)
    assert ours.embeddings.position_embeddings[...].dtype == jnp.bfloat16
    for i, size in enumerate(SIZES[:2]):
        x = images(size, seed=20 + i)
        with torch.no_grad():
            ref = torch_model(torch.from_numpy(x)).last_hidden_state.numpy()
        got = np.asarray(encode(ours, jnp.asarray(x.transpose(0, 2, 3, 1))).last_hidden_state,
                         np.float32)  # fmt: skip
        assert got.dtype == np.float32 and np.isfinite(got).all()
        rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
        assert rel < 0.03, rel


def test_config_and_input_checks():
    cfg = Dinov2Config.from_dict(dict(CONFIGS["swiglu"], model_type="dinov2", image_size=[16, 16]))
    assert cfg.swiglu_hidden_size == 88 and cfg.grid_size == 4
    with pytest.raises(ValueError, match="hidden_act"):
        Dinov2Config.from_dict(dict(TINY, hidden_act="nope"))
    with pytest.raises(ValueError, match="square patch grid"):
        Dinov2Config.from_dict(dict(TINY, image_size=[16, 8]))
    model = nnx.eval_shape(lambda: Dinov2Model(cfg, rngs=nnx.Rngs(0)))  # checks come first
    with pytest.raises(ValueError, match="pixel_values must be NHWC"):
        model(jnp.zeros((1, 3, 16, 16)))  # NCHW
    with pytest.raises(ValueError, match="pixel_values"):
        model(jnp.zeros((1, 16, 2, 3)))  # narrower than a patch


def test_load_errors_name_the_tensor(models, tmp_path):
    _, folder = models["mlp"]
    sd = load_file(str(folder / "model.safetensors"))
    config = json.loads((folder / "config.json").read_text())

    def write(name, tensors):
        d = tmp_path / name
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        save_file(tensors, str(d / "model.safetensors"))
        return d

    missing = {k: v for k, v in sd.items() if k != "encoder.layer.1.layer_scale2.lambda1"}
    with pytest.raises(CheckpointError, match=r"missing.*encoder\.layer\.1\.layer_scale2"):
        load_dinov2(write("missing", missing))
    bad = dict(sd, **{"embeddings.position_embeddings": np.zeros((1, 10, 32), np.float32)})
    with pytest.raises(CheckpointError, match=r"mis-shaped.*position_embeddings.*\(1, 17, 32\)"):
        load_dinov2(write("shape", bad))
    extra = dict(sd, **{"encoder.layer.0.surprise.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointError, match="unexpected.*surprise"):
        load_dinov2(write("extra", extra))


def test_new_layout_and_classification_folder(models, tmp_path):
    """transformers 5 module names (split SwiGLU) and a ``dinov2.``-prefixed folder load too."""
    torch_model, folder = models["swiglu"]
    config = json.loads((folder / "config.json").read_text())
    new = {f"dinov2.{k}": v.numpy() for k, v in torch_model.state_dict().items()}
    assert any(".mlp.gate_proj." in k for k in new)
    new["classifier.weight"] = np.zeros((3, 64), np.float32)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(new, str(tmp_path / "model.safetensors"))
    ours, ref = load_dinov2(tmp_path), load_dinov2(folder)
    x = jnp.asarray(images((16, 16), seed=3).transpose(0, 2, 3, 1))
    assert max_diff(encode(ours, x).last_hidden_state, encode(ref, x).last_hidden_state) == 0.0


def test_preprocess_equals_transformers_pil_processor():
    """BitImageProcessorPil with facebook/dinov2-*'s preprocessor_config.json settings."""
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    proc = BitImageProcessorPil(size={"shortest_edge": 256}, resample=3,
                                crop_size={"height": 224, "width": 224},
                                image_mean=IMAGENET_DEFAULT_MEAN, image_std=IMAGENET_DEFAULT_STD,
                                rescale_factor=1 / 255)  # fmt: skip
    rng = np.random.default_rng(0)
    # downsample (both orientations, odd crop offsets), upsample, no resize
    for shape in [(300, 403), (517, 300), (180, 250), (256, 256)]:
        x = rng.integers(0, 256, (2, *shape, 3), dtype=np.uint8)
        want = proc(list(x), return_tensors="np")["pixel_values"]
        got = np.asarray(dinov2_preprocess(x)).transpose(0, 3, 1, 2)
        assert got.dtype == want.dtype == np.float32
        np.testing.assert_array_equal(got, want)  # bit-exact
    with pytest.raises(ValueError, match="images must be uint8 NHWC"):
        dinov2_preprocess(np.zeros((1, 3, 32, 32), np.uint8))
    with pytest.raises(ValueError, match="images must be uint8"):
        dinov2_preprocess(np.zeros((1, 32, 32, 3), np.float32))
