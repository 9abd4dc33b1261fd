"""Tiny model configs and random Stable Diffusion folders, shared by tests, benchmarks, doctests.

Everything a parity test needs to build a real (tiny, random) diffusers / transformers
model and hand it to jaxdiv's loaders lives here once:

* tiny configs -- :data:`TINY_UNET`, :data:`TINY_VAE`, :data:`TINY_TEXT`,
  :data:`TINY_VISION`, :data:`TINY_SCHEDULER` (a 16x16-pixel SD 1.x) and the UNet variants
  :data:`TINY_UNET_SD1` / :data:`TINY_UNET_SD2` of the UNet parity tests. They are keyword
  dicts for the PyTorch classes (``UNet2DConditionModel(**TINY_UNET)``,
  ``transformers.CLIPTextConfig(**TINY_TEXT)``, ``DDIMScheduler(**TINY_SCHEDULER)``, ...);
  derive a variant with ``dict(TINY_UNET, layers_per_block=2)``.
* :func:`randomize_norms_and_biases` -- random norm affines and biases on a PyTorch model,
  so a swapped scale / bias cannot hide behind the (1, 0) initialisation.
* :func:`write_tiny_vocab` -- a character-level CLIP BPE vocabulary.
* :func:`save_random_pipeline` -- a random diffusers ``StableDiffusionPipeline`` folder;
  :func:`example_pipeline` -- one such folder loaded with
  :func:`jaxdiv.pipelines.stable_diffusion.load`, cached per process (for doctests).

The functions that build models need the ``parity`` extra (torch, diffusers,
transformers); those imports, and jaxdiv's own models and pipelines, happen inside the
functions, so importing this module is cheap. ``import jaxdiv`` does not import it.

Example:
    >>> from jaxdiv import testing
    >>> testing.TINY_UNET["block_out_channels"], testing.TINY_TEXT["hidden_size"]
    ((32, 64), 32)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from jaxdiv.pipelines.stable_diffusion import StableDiffusion

__all__ = [
    "TINY_SCHEDULER",
    "TINY_TEXT",
    "TINY_UNET",
    "TINY_UNET_SD1",
    "TINY_UNET_SD2",
    "TINY_VAE",
    "TINY_VISION",
    "example_pipeline",
    "randomize_norms_and_biases",
    "save_random_pipeline",
    "write_tiny_vocab",
]

# A tiny configuration of every component (a 16x16-pixel SD): fast enough for tests,
# doctests and benchmarks on one CPU core, with every layer type SD 1.x uses.
TINY_UNET = dict(
    sample_size=8,
    block_out_channels=(32, 64),
    layers_per_block=1,
    norm_num_groups=8,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
)
TINY_VAE = dict(
    block_out_channels=(32, 64),
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=16,
)
# both CLIP towers: the text width matches the UNet's cross_attention_dim; the odd MLP
# width (37) would expose a transposed fc1 / fc2
_TINY_TOWER = dict(
    hidden_size=32,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=16,
)
TINY_TEXT = dict(_TINY_TOWER, max_position_embeddings=16)
TINY_VISION = dict(_TINY_TOWER, image_size=16, patch_size=4)
# diffusers' DDIMScheduler with SD's betas; set_alpha_to_one=True so the last DDIM step
# lands on x0 like jaxdiv's grids.
TINY_SCHEDULER = dict(
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)


# UNet variants of the parity tests (and the ``tiny`` row of benchmarks/sd_step.py).
# SD1-like: 1x1-conv transformer projections, an int head count, two resnets per block,
# and a cross-attention width (24) equal to no other width, so a mixed-up axis fails.
TINY_UNET_SD1 = dict(
    TINY_UNET,
    sample_size=16,
    layers_per_block=2,
    cross_attention_dim=24,
    use_linear_projection=False,
)
# SD2-like: linear projections, per-block head counts, upcast attention, attention in
# every block.
TINY_UNET_SD2 = dict(
    TINY_UNET,
    sample_size=16,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=40,
    attention_head_dim=[2, 4],
    use_linear_projection=True,
    upcast_attention=True,
)


def randomize_norms_and_biases(model: Any, seed: int) -> Any:
    """Random norm scales / shifts and biases on a PyTorch model, in place; set eval mode.

    Every 1-d parameter becomes ``base + 0.2 * N(0, 1)`` with ``base`` 1 for a norm
    ``weight`` and 0 otherwise; conv / linear weights keep torch's random init, whose
    fan-in scaling keeps activations O(1). diffusers and transformers initialise norms to
    (1, 0) and many biases to 0, which would hide a swapped scale / bias in a converter.

    Args:
        model: a ``torch.nn.Module``.
        seed: seed of the ``torch.Generator`` drawing the values.

    Returns:
        ``model`` (in eval mode).

    Example:
        >>> import torch
        >>> model = torch.nn.ModuleDict({"norm": torch.nn.LayerNorm(4)})
        >>> norm = randomize_norms_and_biases(model, seed=0)["norm"]
        >>> bool((norm.weight != 1).all()), bool((norm.bias != 0).all()), norm.training
        (True, True, False)
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                base = 1.0 if ("norm" in name and name.endswith("weight")) else 0.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
    return model.eval()


def write_tiny_vocab(folder: str | os.PathLike) -> tuple[int, int]:
    """Write a lowercase character-level BPE vocabulary with a few merges (CLIP's format).

    Every letter and digit, alone and word-final (``a</w>``), plus merges spelling
    ``cat``, ``dog``, ``of`` and ``photo``; the special tokens get the largest ids, as in
    the released CLIP vocabulary.

    Args:
        folder: an existing folder; ``vocab.json`` and ``merges.txt`` are written there.

    Returns:
        ``(bos_token_id, eos_token_id)``.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> write_tiny_vocab(d), sorted(p.name for p in d.iterdir())
        ((81, 82), ['merges.txt', 'vocab.json'])
    """
    folder = Path(folder)
    letters = "abcdefghijklmnopqrstuvwxyz0123456789"
    vocab: dict[str, int] = {}
    for ch in letters:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    merges = ["c a", "ca t</w>", "d o", "do g</w>", "o f</w>", "p h", "ph o", "pho t", "phot o</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    # special tokens get the largest ids, as in the released CLIP vocabulary
    bos, eos = len(vocab), len(vocab) + 1
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = bos, eos
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return bos, eos


def save_random_pipeline(
    folder: str | os.PathLike,
    *,
    prediction_type: str = "epsilon",
    seed: int = 0,
    unet: dict | None = None,
    vae: dict | None = None,
    text_encoder: dict | None = None,
    scheduler: dict | None = None,
    image_encoder: dict | bool = False,
    max_length: int | None = None,
):
    """Save a random diffusers ``StableDiffusionPipeline`` folder (safetensors) for tests.

    Builds the PyTorch components with diffusers / transformers (the ``parity`` extra) at
    random -- norm scales and all biases randomised too, so a swapped scale / bias cannot
    hide (:func:`randomize_norms_and_biases`) -- and ``save_pretrained``-s them in the
    layout of released SD folders. Defaults are tiny (:data:`TINY_UNET`, ...);
    each dict overrides entries of the corresponding default config.

    Args:
        folder: where to write (created if missing).
        prediction_type: the scheduler's ``prediction_type``.
        seed: torch seed of the random weights.
        unet: overrides for ``UNet2DConditionModel(**TINY_UNET)``.
        vae: overrides for ``AutoencoderKL(**TINY_VAE)``.
        text_encoder: overrides for ``CLIPTextConfig(**TINY_TEXT)``.
        scheduler: overrides for ``DDIMScheduler(**TINY_SCHEDULER)``.
        image_encoder: ``True`` or overrides of :data:`TINY_VISION` to also save a random
            ``CLIPVisionModelWithProjection`` in ``image_encoder/``.
        max_length: tokenizer ``model_max_length`` (default: the text encoder's
            ``max_position_embeddings``).

    Returns:
        The diffusers ``StableDiffusionPipeline`` that was saved (on CPU, fp32).

    Raises:
        ImportError: torch, diffusers or transformers are not installed.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = save_random_pipeline(d, prediction_type="v_prediction")
        >>> sorted(p.name for p in d.iterdir())
        ['model_index.json', 'scheduler', 'text_encoder', 'tokenizer', 'unet', 'vae']
        >>> json.loads((d / "scheduler" / "scheduler_config.json").read_text())["prediction_type"]
        'v_prediction'
    """
    import tempfile

    try:
        import torch
        import transformers
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
        from diffusers import UNet2DConditionModel as TorchUNet
    except ImportError as err:
        raise ImportError(
            "save_random_pipeline needs torch, diffusers and transformers "
            "(pip install 'jaxdiv[parity]')"
        ) from err

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        bos, eos = write_tiny_vocab(Path(tmp))
        text_cfg = dict(TINY_TEXT, **(text_encoder or {}))
        length = max_length or text_cfg["max_position_embeddings"]
        tokenizer = transformers.CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=length
        )
    text_cfg.setdefault("vocab_size", len(tokenizer))
    text_cfg.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    torch.manual_seed(seed)
    text_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**text_cfg))
    text = randomize_norms_and_biases(text_model, seed)
    torch.manual_seed(seed + 1)
    net = randomize_norms_and_biases(TorchUNet(**dict(TINY_UNET, **(unet or {}))), seed + 1)
    torch.manual_seed(seed + 2)
    ae = randomize_norms_and_biases(AutoencoderKL(**dict(TINY_VAE, **(vae or {}))), seed + 2)
    sched = DDIMScheduler(
        **dict(TINY_SCHEDULER, prediction_type=prediction_type, **(scheduler or {}))
    )
    vision = None
    if image_encoder:
        overrides = image_encoder if isinstance(image_encoder, dict) else {}
        torch.manual_seed(seed + 3)
        vcfg = transformers.CLIPVisionConfig(**dict(TINY_VISION, **overrides))
        vision_model = transformers.CLIPVisionModelWithProjection(vcfg)
        vision = randomize_norms_and_biases(vision_model, seed + 3)
    pipe = StableDiffusionPipeline(
        vae=ae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=net,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        image_encoder=vision,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # released SD folders ship the slow-tokenizer files (vocab.json, merges.txt) and no
    # tokenizer.json, which transformers 5 writes instead: keep the released layout
    write_tiny_vocab(out / "tokenizer")
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    return pipe


_EXAMPLE_CACHE: dict = {}


def example_pipeline(image_encoder: bool = False) -> StableDiffusion:
    """A tiny random pipeline (:func:`save_random_pipeline` defaults), loaded once per process.

    Saved to a fresh temporary folder and read with
    :func:`jaxdiv.pipelines.stable_diffusion.load` on the first call; later calls return
    the same record, so doctests and quick experiments share one load.

    Args:
        image_encoder: also save and load a tiny CLIP vision tower (``pipe.encode_image``).

    Returns:
        The :class:`~jaxdiv.pipelines.stable_diffusion.StableDiffusion` record.

    Example:
        >>> pipe = example_pipeline()
        >>> pipe.noise_shape(2), pipe is example_pipeline()
        ((2, 4, 8, 8), True)
    """
    name = "pipe_with_image_encoder" if image_encoder else "pipe"
    if name not in _EXAMPLE_CACHE:
        import tempfile

        from jaxdiv.pipelines.stable_diffusion import load

        folder = tempfile.mkdtemp(prefix="jaxdiv_sd_example_")
        save_random_pipeline(folder, image_encoder=bool(image_encoder))
        _EXAMPLE_CACHE[name] = load(folder)
    return _EXAMPLE_CACHE[name]
