"""Config checks of the model loaders: a ``config.json`` value of the wrong type or out of
range is refused with the file, the key, what was expected and what came -- never parsed
with ``bool()`` / ``int()`` / ``float()`` into a silently different model. The tests save
tiny random models with diffusers / transformers and edit their ``config.json``.
"""

import json
import math
import re
import shutil

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel

from jaxdiv.models.checkpoint import CheckpointError
from jaxdiv.models.clip import load_clip_text, load_clip_vision
from jaxdiv.models.dinov2 import load_dinov2
from jaxdiv.models.t5 import load_t5
from jaxdiv.models.unet import load_unet
from jaxdiv.models.vae import load_vae
from jaxdiv.testing import TINY_T5, TINY_TEXT, TINY_UNET, TINY_VAE, TINY_VISION

TINY_DINOV2 = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, patch_size=4,
                   image_size=8)  # fmt: skip


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """One tiny ``save_pretrained`` folder per component."""
    root = tmp_path_factory.mktemp("components")
    torch.manual_seed(0)
    UNet2DConditionModel(**TINY_UNET).save_pretrained(root / "unet")
    AutoencoderKL(**TINY_VAE).save_pretrained(root / "vae")
    text = transformers.CLIPTextConfig(**TINY_TEXT, vocab_size=40, eos_token_id=39)
    transformers.CLIPTextModel(text).save_pretrained(root / "text_encoder")
    vision = transformers.CLIPVisionConfig(**TINY_VISION)
    transformers.CLIPVisionModelWithProjection(vision).save_pretrained(root / "image_encoder")
    transformers.T5EncoderModel(transformers.T5Config(**TINY_T5)).save_pretrained(root / "t5")
    dino = transformers.Dinov2Config(**TINY_DINOV2)
    transformers.Dinov2Model(dino).save_pretrained(root / "dinov2")
    return root


def edited(saved, tmp_path, component, **changes):
    """A copy of a saved component folder with ``changes`` written into its config."""
    folder = tmp_path / component
    shutil.copytree(saved / component, folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))  # NaN is written as NaN
    return folder


def refused(load, folder, message, kind=CheckpointError):
    """``load(folder)`` raises ``kind`` naming the folder's config.json and ``message``."""
    with pytest.raises(kind) as err:
        load(folder)
    text = str(err.value)
    assert "\n" not in text, text
    assert text.startswith(repr(str(folder / "config.json")) + ": "), text
    assert re.search(message, text), text
    return err.value


# ------------------------------------------------------------------ UNet


@pytest.mark.parametrize("key", ["use_linear_projection", "upcast_attention",
                                 "center_input_sample", "flip_sin_to_cos"])  # fmt: skip
@pytest.mark.parametrize("value", ["false", 0, None])
def test_unet_flags_must_be_bools(saved, tmp_path, key, value):
    folder = edited(saved, tmp_path, "unet", **{key: value})
    got = f"{type(value).__name__} {value!r}"
    err = refused(load_unet, folder, rf"config\['{key}'\] must be a bool, got {got}")
    assert isinstance(err, TypeError)  # a wrongly typed value stays a TypeError


@pytest.mark.parametrize("value, message", [
    (math.nan, r"must be a finite number > 0, got nan"),
    (-1.0, r"must be a finite number > 0, got -1\.0"),
    (0.0, r"must be a finite number > 0, got 0\.0"),
    ("1e-5", r"must be a real number, got str '1e-5'"),
])  # fmt: skip
def test_unet_norm_eps_must_be_positive_and_finite(saved, tmp_path, value, message):
    refused(load_unet, edited(saved, tmp_path, "unet", norm_eps=value),
            r"config\['norm_eps'\] " + message)  # fmt: skip


@pytest.mark.parametrize("key, value, message", [
    ("downsample_padding", 1.7, r"must be an integer, got float 1\.7"),
    ("downsample_padding", -1, r"must be an integer >= 0, got -1"),
    ("freq_shift", "abc", r"must be a real number, got str 'abc'"),
    ("mid_block_scale_factor", math.inf, r"must be a finite number, got inf"),
    ("in_channels", 3.9, r"must be an integer, got float 3\.9"),
    ("time_embedding_dim", 12.5, r"must be an integer, got float 12\.5"),
    ("sample_size", "8", r"must be an integer, got str '8'"),
    ("down_block_types", "CrossAttnDownBlock2D",
     r"must be a list, got str 'CrossAttnDownBlock2D'"),
    ("up_block_types", "UpBlock2D", r"must be a list, got str 'UpBlock2D'"),
    ("block_out_channels", "32,64", r"must be a list, got str '32,64'"),
])  # fmt: skip
def test_unet_numbers_and_lists_are_checked(saved, tmp_path, key, value, message):
    refused(load_unet, edited(saved, tmp_path, "unet", **{key: value}),
            rf"config\['{key}'\] " + message)  # fmt: skip


def test_unet_json_values_load_and_their_strings_do_not(saved, tmp_path):
    good = dict(use_linear_projection=True, freq_shift=1, mid_block_scale_factor=1,
                norm_eps=1e-6, downsample_padding=1)  # fmt: skip
    cfg = load_unet(edited(saved, tmp_path / "good", "unet", **good)).config
    assert cfg.use_linear_projection is True and cfg.freq_shift == 1.0 and cfg.norm_eps == 1e-6
    # the same values as strings (bool("false") would be True): refused, none loads
    for key, value in good.items():
        folder = edited(saved, tmp_path / key, "unet", **{key: str(value).lower()})
        refused(load_unet, folder, rf"config\['{key}'\] must be an? .*, got str")


# ------------------------------------------------------------------ VAE


@pytest.mark.parametrize("key, value, message", [
    ("scaling_factor", -1.0, r"must be a finite number > 0, got -1\.0"),
    ("scaling_factor", 0, r"must be a finite number > 0, got 0\.0"),
    ("scaling_factor", math.nan, r"must be a finite number > 0, got nan"),
    ("scaling_factor", "0.18215", r"must be a real number, got str '0\.18215'"),
    ("shift_factor", "0.06", r"must be a real number, got str '0\.06'"),
    ("use_quant_conv", "false", r"must be a bool, got str 'false'"),
    ("use_post_quant_conv", 0, r"must be a bool, got int 0"),
    ("mid_block_add_attention", "no", r"must be a bool, got str 'no'"),
    ("in_channels", 3.9, r"must be an integer, got float 3\.9"),
    ("out_channels", 0, r"must be an integer >= 1, got 0"),
    ("down_block_types", "DownEncoderBlock2D", r"must be a list, got str"),
])  # fmt: skip
def test_vae_config_values_are_checked(saved, tmp_path, key, value, message):
    refused(load_vae, edited(saved, tmp_path, "vae", **{key: value}),
            rf"config\['{key}'\] " + message)  # fmt: skip


# ------------------------------------------------------------------ CLIP, T5, DINOv2


@pytest.mark.parametrize("key, value, message", [
    ("layer_norm_eps", -1.0, r"must be a finite number > 0, got -1\.0"),
    ("layer_norm_eps", "1e-5", r"must be a real number, got str '1e-5'"),
    ("vocab_size", "40", r"must be an integer, got str '40'"),
    ("max_position_embeddings", 16.0, r"must be an integer, got float 16\.0"),
    ("projection_dim", 0, r"must be an integer >= 1, got 0"),
    ("eos_token_id", "39", r"must be an integer, got str '39'"),
    ("eos_token_id", -1, r"must be an integer >= 0, got -1"),
])  # fmt: skip
def test_clip_text_config_values_are_checked(saved, tmp_path, key, value, message):
    refused(load_clip_text, edited(saved, tmp_path, "text_encoder", **{key: value}),
            f"CLIP config: {key} " + message)  # fmt: skip


@pytest.mark.parametrize("key, value, message", [
    ("layer_norm_eps", 0.0, r"must be a finite number > 0, got 0\.0"),
    ("image_size", 16.0, r"must be an integer, got float 16\.0"),
    ("num_channels", "3", r"must be an integer, got str '3'"),
])  # fmt: skip
def test_clip_vision_config_values_are_checked(saved, tmp_path, key, value, message):
    refused(load_clip_vision, edited(saved, tmp_path, "image_encoder", **{key: value}),
            f"CLIP config: {key} " + message)  # fmt: skip


@pytest.mark.parametrize("value", [0.0, -1e-6])
def test_t5_and_dinov2_layer_norm_eps_must_be_positive(saved, tmp_path, value):
    refused(load_t5, edited(saved, tmp_path, "t5", layer_norm_epsilon=value),
            rf"T5 config: layer_norm_epsilon must be a finite number > 0, got {value}")  # fmt: skip
    refused(load_dinov2, edited(saved, tmp_path, "dinov2", layer_norm_eps=value),
            rf"DINOv2 config: layer_norm_eps must be a finite number > 0, got {value}")  # fmt: skip


# ------------------------------------------------------------------ the wrong folder


@pytest.mark.parametrize("load, component, named, field", [
    (load_unet, "vae", "'AutoencoderKL'", "_class_name"),
    (load_vae, "unet", "'UNet2DConditionModel'", "_class_name"),
    (load_clip_text, "t5", "'t5'", "model_type"),
    (load_clip_vision, "text_encoder", "'clip_text_model'", "model_type"),
    (load_t5, "text_encoder", "'clip_text_model'", "model_type"),
    (load_dinov2, "image_encoder", "'clip_vision_model'", "model_type"),
])  # fmt: skip
def test_a_folder_of_another_model_is_named_in_one_line(saved, load, component, named, field):
    """The config names its model: another loader's folder is refused with that name (it
    gave a list of hundreds of missing tensors, kilobytes long)."""
    refused(load, saved / component, rf"^.*: describes a {named} model \(its {field}\), not ")
