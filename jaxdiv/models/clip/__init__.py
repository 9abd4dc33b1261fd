"""CLIP text and vision towers (Radford et al. 2021) as Flax nnx ports of transformers' CLIP.

One concern per module:

* :mod:`~jaxdiv.models.clip.config` -- :class:`CLIPTextConfig`, :class:`CLIPVisionConfig`
  (parsed and checked from transformers ``config.json`` dicts);
* :mod:`~jaxdiv.models.clip.modules` -- the nnx modules: both towers, their
  ``...WithProjection`` wrappers and their outputs;
* :mod:`~jaxdiv.models.clip.preprocess` -- differentiable ``CLIPImageProcessor``;
* :mod:`~jaxdiv.models.clip.tokenizer` -- the BPE tokenizer from a local folder;
* :mod:`~jaxdiv.models.clip.loading` -- :func:`load_clip_text`, :func:`load_clip_vision`.

Checkpoint key mapping lives with every other port's in :mod:`jaxdiv.models.conversion`
(:func:`~jaxdiv.models.conversion.convert_clip_state_dict`, re-exported here).
"""

from jaxdiv.models.clip.config import CLIPTextConfig, CLIPVisionConfig
from jaxdiv.models.clip.loading import load_clip_text, load_clip_vision
from jaxdiv.models.clip.modules import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTextOutput,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    CLIPVisionOutput,
)
from jaxdiv.models.clip.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    channel_stats,
    clip_image_preprocess,
)
from jaxdiv.models.clip.tokenizer import load_clip_tokenizer, tokenize
from jaxdiv.models.conversion import convert_clip_state_dict

__all__ = [
    "CLIPTextConfig",
    "CLIPTextModel",
    "CLIPTextModelWithProjection",
    "CLIPTextOutput",
    "CLIPVisionConfig",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPVisionOutput",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "channel_stats",
    "clip_image_preprocess",
    "convert_clip_state_dict",
    "load_clip_text",
    "load_clip_tokenizer",
    "load_clip_vision",
    "tokenize",
]
