"""Flax nnx ports of Stable Diffusion components and their checkpoint loaders.

* :mod:`~jaxdiv.models.unet`, :mod:`~jaxdiv.models.vae` -- the SD UNet and VAE, built from
  the blocks in :mod:`~jaxdiv.models.layers`;
* :mod:`~jaxdiv.models.convolution` -- the ports' convolution (Winograd, patch products
  and a kernel-layout VJP on XLA:CPU);
* :mod:`~jaxdiv.models.normalization` -- their GroupNorm (per-channel statistics, a
  closed-form tangent);
* :mod:`~jaxdiv.models.clip` -- CLIP text and vision towers, preprocessing, tokenizer;
* :mod:`~jaxdiv.models.mmdit` -- the SD3 / SD3.5 MMDiT (``SD3Transformer2DModel``);
* :mod:`~jaxdiv.models.t5` -- the T5 encoder (SD3's third text encoder);
* :mod:`~jaxdiv.models.dinov2` -- the DINOv2 image encoder (FD-DINOv2, Vendi, PRDC features);
* :mod:`~jaxdiv.models.checkpoint` -- reading local diffusers / transformers folders;
* :mod:`~jaxdiv.models.conversion` -- every PyTorch -> nnx key-mapping rule.
"""

from jaxdiv.models.checkpoint import (
    CheckpointError,
    assign_params,
    load_component,
    load_state_dict,
    read_config,
    read_model_index,
)
from jaxdiv.models.clip import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    CLIPVisionOutput,
    clip_image_preprocess,
    load_clip_text,
    load_clip_tokenizer,
    load_clip_vision,
    tokenize,
)
from jaxdiv.models.conversion import (
    conv_kernel,
    convert_clip_state_dict,
    convert_dinov2_state_dict,
    convert_mmdit_state_dict,
    convert_t5_state_dict,
    convert_unet_state_dict,
    convert_vae_state_dict,
    linear_kernel,
)
from jaxdiv.models.dinov2 import (
    Dinov2Config,
    Dinov2Model,
    Dinov2Output,
    dinov2_preprocess,
    load_dinov2,
)
from jaxdiv.models.layers import PureModule, pure
from jaxdiv.models.mmdit import MMDiTConfig, SD3Transformer2DModel, load_mmdit
from jaxdiv.models.t5 import T5Config, T5EncoderModel, T5EncoderOutput, load_t5
from jaxdiv.models.unet import UNet2DConditionModel, UNetConfig, load_unet
from jaxdiv.models.vae import AutoencoderKL, DiagonalGaussian, VAEConfig, load_vae

__all__ = [
    "AutoencoderKL",
    "DiagonalGaussian",
    "PureModule",
    "UNet2DConditionModel",
    "UNetConfig",
    "VAEConfig",
    "convert_unet_state_dict",
    "convert_vae_state_dict",
    "load_unet",
    "load_vae",
    "pure",
    "MMDiTConfig",
    "SD3Transformer2DModel",
    "convert_mmdit_state_dict",
    "load_mmdit",
    "T5Config",
    "T5EncoderModel",
    "T5EncoderOutput",
    "convert_t5_state_dict",
    "load_t5",
    "Dinov2Config",
    "Dinov2Model",
    "Dinov2Output",
    "convert_dinov2_state_dict",
    "dinov2_preprocess",
    "load_dinov2",
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
    "CheckpointError",
    "assign_params",
    "clip_image_preprocess",
    "conv_kernel",
    "convert_clip_state_dict",
    "linear_kernel",
    "load_clip_text",
    "load_clip_tokenizer",
    "load_clip_vision",
    "load_component",
    "load_state_dict",
    "read_config",
    "read_model_index",
    "tokenize",
]
