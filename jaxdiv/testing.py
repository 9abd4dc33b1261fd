"""Tiny model configs and random Stable Diffusion folders, shared by tests, benchmarks, doctests.

Everything a parity test needs to build a real (tiny, random) diffusers / transformers
model and hand it to jaxdiv's loaders lives here once:

* tiny configs -- :data:`TINY_UNET`, :data:`TINY_VAE`, :data:`TINY_TEXT`,
  :data:`TINY_VISION`, :data:`TINY_SCHEDULER` (a 16x16-pixel SD 1.x) and the UNet variants
  :data:`TINY_UNET_SD1` / :data:`TINY_UNET_SD2` of the UNet parity tests, and the SD3
  MMDiT layouts :data:`TINY_MMDIT` (SD3-Medium), :data:`TINY_MMDIT_SD35_MEDIUM` and
  :data:`TINY_MMDIT_SD35_LARGE` (``SD3Transformer2DModel(**TINY_MMDIT)``), and SD3's T5
  encoder :data:`TINY_T5` (``transformers.T5Config(**TINY_T5)``). They are keyword
  dicts for the PyTorch classes (``UNet2DConditionModel(**TINY_UNET)``,
  ``transformers.CLIPTextConfig(**TINY_TEXT)``, ``DDIMScheduler(**TINY_SCHEDULER)``, ...);
  derive a variant with ``dict(TINY_UNET, layers_per_block=2)``.
* :func:`randomize_norms_and_biases` -- random norm affines and biases on a PyTorch model,
  so a swapped scale / bias cannot hide behind the (1, 0) initialisation.
* :func:`write_tiny_vocab` -- a character-level CLIP BPE vocabulary.
* :func:`save_random_pipeline` -- a random diffusers ``StableDiffusionPipeline`` folder;
  :func:`example_pipeline` -- one such folder loaded with
  :func:`jaxdiv.pipelines.stable_diffusion.load`, cached per process (for doctests).
* :func:`save_random_sd3_pipeline` -- a random diffusers ``StableDiffusion3Pipeline``
  folder (MMDiT, 16-channel VAE, CLIP-L / CLIP-G with projections, optional T5).

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
    "TINY_MMDIT",
    "TINY_MMDIT_SD35_LARGE",
    "TINY_MMDIT_SD35_MEDIUM",
    "TINY_SCHEDULER",
    "TINY_T5",
    "TINY_TEXT",
    "TINY_UNET",
    "TINY_UNET_SD1",
    "TINY_UNET_SD2",
    "TINY_VAE",
    "TINY_VISION",
    "example_pipeline",
    "example_sd3_pipeline",
    "randomize_norms_and_biases",
    "save_random_pipeline",
    "save_random_sd3_pipeline",
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
# T5 v1.1 encoder (SD3's text_encoder_3): d_model equals TINY_MMDIT's joint_attention_dim;
# heads x d_kv (12) and d_ff (28) equal no other width; offsets past 12 share a bucket.
TINY_T5 = dict(
    vocab_size=64,
    d_model=20,
    d_kv=4,
    d_ff=28,
    num_layers=2,
    num_heads=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
    feed_forward_proj="gated-gelu",
)
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


# SD3 MMDiT layouts (diffusers SD3Transformer2DModel kwargs): 2 heads x 8 = 16 wide; text
# width 20 and pooled width 12 equal no other width, so a mixed-up axis fails; a position
# table of 8x8 patches is larger than a test latent, so the centre crop is exercised.
# SD3-Medium: joint blocks, the last one context_pre_only, no q/k norm.
TINY_MMDIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=3,
    num_attention_heads=2,
    attention_head_dim=8,
    joint_attention_dim=20,
    caption_projection_dim=16,
    pooled_projection_dim=12,
    pos_embed_max_size=8,
)
# SD3.5-Medium (MMDiT-X): attn2 in some blocks (not the last), RMS q/k norm.
TINY_MMDIT_SD35_MEDIUM = dict(TINY_MMDIT, dual_attention_layers=(0, 1), qk_norm="rms_norm")
# SD3.5-Large: RMS q/k norm, no dual attention; out_channels != in_channels.
TINY_MMDIT_SD35_LARGE = dict(TINY_MMDIT, num_layers=2, out_channels=6, qk_norm="rms_norm")


def random_mmdit(config: dict[str, Any], seed: int = 0):
    """An ``SD3Transformer2DModel`` with random NumPy weights, built without an eager init.

    Shapes come from ``nnx.eval_shape`` (as ``load_mmdit`` does); kernels are drawn with
    standard deviation ``1 / sqrt(fan_in)``, vectors (biases, norm scales) with 0.1. NumPy
    draws compile nothing, unlike an eager nnx init (one XLA program per initializer shape),
    and need no torch: for tests and benchmarks of what happens *around* the model (hooks,
    overhead), not for parity (that is ``diffusers`` weights through
    :func:`jaxdiv.models.mmdit.load_mmdit`).

    Example:
        >>> m = random_mmdit(TINY_MMDIT)
        >>> type(m).__name__, len(m.transformer_blocks)
        ('SD3Transformer2DModel', 3)
    """
    import math

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxdiv.models.mmdit import SD3Transformer2DModel

    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: SD3Transformer2DModel(config, rngs=nnx.Rngs(0)))
    )
    rng = np.random.default_rng(seed)

    def fill(a):
        scale = 1.0 / math.sqrt(a.shape[-2]) if len(a.shape) >= 2 else 0.1
        return jnp.asarray(rng.normal(0.0, scale, a.shape).astype(np.float32), a.dtype)

    return nnx.merge(graphdef, jax.tree.map(fill, abstract))


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


# SD3's three text encoders, tiny: CLIP-L (quick_gelu, legacy eos_token_id=2 config as in
# the released SD3 folders: pooling at the largest token id) and CLIP-G (gelu, pooling at
# the first eos id) with different widths, depths and projections. Hidden widths sum to
# 18 < joint_attention_dim = 20 (so the zero padding to T5's width is exercised, as
# 768 + 1280 < 4096 in SD3) and projections to pooled_projection_dim = 12 (768 + 1280).
_TINY_CLIP_L = dict(
    hidden_size=8,
    intermediate_size=13,
    num_hidden_layers=3,
    num_attention_heads=2,
    projection_dim=5,
    max_position_embeddings=16,
    hidden_act="quick_gelu",
)
_TINY_CLIP_G = dict(
    hidden_size=10,
    intermediate_size=19,
    num_hidden_layers=4,
    num_attention_heads=2,
    projection_dim=7,
    max_position_embeddings=16,
    hidden_act="gelu",
)
# SD3's VAE: 16 latent channels, no quant convs, latents (z - shift) * scale
_TINY_SD3_VAE = dict(
    TINY_VAE,
    latent_channels=16,
    scaling_factor=1.5305,
    shift_factor=0.0609,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
_SD3_LAYOUTS = {
    "sd3-medium": TINY_MMDIT,
    "sd35-medium": TINY_MMDIT_SD35_MEDIUM,
    "sd35-large": TINY_MMDIT_SD35_LARGE,
}
# a Unigram T5 vocabulary in sentencepiece's layout (<pad>=0, </s>=1, <unk>=2, then pieces):
# every lowercase letter, so any lowercase prompt tokenizes, and a few whole words
_T5_WORDS = ("a", "cat", "dog", "photo", "of", "red", "the", "on", "blue", "house")


def _tiny_t5_tokenizer():
    """A T5 (Unigram, Metaspace) tokenizer built locally: 40 pieces, no extra ids."""
    import transformers

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -4.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    vocab += [("\u2581" + w, -1.0) for w in _T5_WORDS]
    # released T5 tokenizers cap at 512; diffusers passes max_sequence_length itself
    return transformers.T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _write_clip_g_vocab(folder: Path) -> tuple[int, int]:
    """:func:`write_tiny_vocab` with ``!`` as id 0 (the released CLIP vocabulary's id 0),
    the pad token of SD3's / SDXL's CLIP-G tokenizer; returns ``(bos, eos)``."""
    write_tiny_vocab(folder)
    vocab = json.loads((folder / "vocab.json").read_text())
    vocab = {"!": 0, **{k: v + 1 for k, v in vocab.items()}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    return vocab["<|startoftext|>"], vocab["<|endoftext|>"]


def save_random_sd3_pipeline(
    folder: str | os.PathLike,
    *,
    layout: str = "sd3-medium",
    t5: bool = True,
    seed: int = 0,
    shift: float = 3.0,
) -> Path:
    """Save a random diffusers ``StableDiffusion3Pipeline`` folder (safetensors) for tests.

    The components of a released SD3 / SD3.5 folder, tiny and random (norm affines and
    biases too, :func:`randomize_norms_and_biases`): an ``SD3Transformer2DModel`` of the
    chosen layout (:data:`TINY_MMDIT`, :data:`TINY_MMDIT_SD35_MEDIUM`,
    :data:`TINY_MMDIT_SD35_LARGE`, with 16 in / out channels), an ``AutoencoderKL`` with
    16 latent channels, SD3's ``scaling_factor`` 1.5305 / ``shift_factor`` 0.0609 and no
    quant convs (16x16-pixel images, 8x8 latents), two ``CLIPTextModelWithProjection``
    (a CLIP-L-like tower, ``quick_gelu``, and a wider, deeper CLIP-G-like one, ``gelu``;
    their hidden widths sum to less than ``joint_attention_dim`` and their projections to
    ``pooled_projection_dim``, as 768 + 1280 in SD3), a ``T5EncoderModel``
    (:data:`TINY_T5`, ``d_model = joint_attention_dim``), two CLIP BPE tokenizers
    (``model_max_length`` 16; CLIP-L pads with its eos token, CLIP-G with ``!``, id 0, as
    the released tokenizers do) in the released layout (``vocab.json`` + ``merges.txt``),
    a T5 Unigram tokenizer built locally (``tokenizer.json``; ``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2) and ``FlowMatchEulerDiscreteScheduler(shift=shift)``. Nothing touches the
    network; ``StableDiffusion3Pipeline.from_pretrained(folder)`` loads it back (plus
    ``text_encoder_3=None, tokenizer_3=None`` without T5, as diffusers requires).

    Args:
        folder: where to write (created if missing).
        layout: ``"sd3-medium"``, ``"sd35-medium"`` (MMDiT-X dual attention, RMS q/k norm)
            or ``"sd35-large"`` (RMS q/k norm).
        t5: save the T5 encoder and tokenizer; ``False`` saves the pipeline built with
            ``text_encoder_3=None, tokenizer_3=None`` (``model_index.json`` lists them as
            ``null``, no folders; diffusers then uses zeros for the T5 tokens).
        seed: torch seed of the random weights.
        shift: the scheduler's time shift (SD3: 3.0).

    Returns:
        ``folder`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: unknown ``layout``.
        ImportError: torch, diffusers or transformers are not installed.

    Example:
        >>> import tempfile
        >>> d = save_random_sd3_pipeline(tempfile.mkdtemp(), layout="sd35-medium", t5=False)
        >>> sorted(p.name for p in d.iterdir())  # doctest: +NORMALIZE_WHITESPACE
        ['model_index.json', 'scheduler', 'text_encoder', 'text_encoder_2', 'tokenizer',
         'tokenizer_2', 'transformer', 'vae']
        >>> json.loads((d / "transformer" / "config.json").read_text())["qk_norm"]
        'rms_norm'
    """
    import tempfile

    if layout not in _SD3_LAYOUTS:
        raise ValueError(f"layout must be one of {tuple(_SD3_LAYOUTS)}, got {layout!r}")
    try:
        import torch
        import transformers
        from diffusers import (
            AutoencoderKL,
            FlowMatchEulerDiscreteScheduler,
            SD3Transformer2DModel,
            StableDiffusion3Pipeline,
        )
    except ImportError as err:
        raise ImportError(
            "save_random_sd3_pipeline needs torch, diffusers and transformers "
            "(pip install 'jaxdiv[parity]')"
        ) from err

    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    length = _TINY_CLIP_L["max_position_embeddings"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp_l, tmp_g = Path(tmp) / "l", Path(tmp) / "g"
        tmp_l.mkdir()
        tmp_g.mkdir()
        write_tiny_vocab(tmp_l)
        bos_g, eos_g = _write_clip_g_vocab(tmp_g)
        tok_l = transformers.CLIPTokenizer(
            str(tmp_l / "vocab.json"), str(tmp_l / "merges.txt"), model_max_length=length
        )
        tok_g = transformers.CLIPTokenizer(
            str(tmp_g / "vocab.json"), str(tmp_g / "merges.txt"), model_max_length=length,
            pad_token="!",
        )  # fmt: skip

    def clip(cfg, seed_offset, **ids):
        torch.manual_seed(seed + seed_offset)
        config = transformers.CLIPTextConfig(**cfg, **ids)
        model = transformers.CLIPTextModelWithProjection(config)
        return randomize_norms_and_biases(model, seed + seed_offset)

    # CLIP-L: the released SD3 config's legacy ids (eos_token_id 2: pool at the largest id)
    text_l = clip(_TINY_CLIP_L, 0, vocab_size=len(tok_l), bos_token_id=0, eos_token_id=2,
                  pad_token_id=1)  # fmt: skip
    text_g = clip(_TINY_CLIP_G, 1, vocab_size=len(tok_g), bos_token_id=bos_g,
                  eos_token_id=eos_g, pad_token_id=0)  # fmt: skip
    mmdit_cfg = dict(_SD3_LAYOUTS[layout], in_channels=16, out_channels=16)
    hidden = _TINY_CLIP_L["hidden_size"] + _TINY_CLIP_G["hidden_size"]
    assert hidden <= mmdit_cfg["joint_attention_dim"] == TINY_T5["d_model"]
    assert (_TINY_CLIP_L["projection_dim"] + _TINY_CLIP_G["projection_dim"]
            == mmdit_cfg["pooled_projection_dim"])  # fmt: skip
    torch.manual_seed(seed + 2)
    net = randomize_norms_and_biases(SD3Transformer2DModel(**mmdit_cfg), seed + 2)
    torch.manual_seed(seed + 3)
    ae = randomize_norms_and_biases(AutoencoderKL(**_TINY_SD3_VAE), seed + 3)
    text_t5 = tok_t5 = None
    if t5:
        torch.manual_seed(seed + 4)
        t5_model = transformers.T5EncoderModel(transformers.T5Config(**TINY_T5))
        text_t5 = randomize_norms_and_biases(t5_model, seed + 4)
        tok_t5 = _tiny_t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=net,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=ae,
        text_encoder=text_l,
        tokenizer=tok_l,
        text_encoder_2=text_g,
        tokenizer_2=tok_g,
        text_encoder_3=text_t5,
        tokenizer_3=tok_t5,
    )
    # without T5, diffusers lists text_encoder_3 / tokenizer_3 as [null, null] and writes
    # no folders for them (as for a released folder loaded with text_encoder_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    # released SD3 folders ship the slow CLIP tokenizer files (vocab.json, merges.txt) and
    # no tokenizer.json, which transformers 5 writes instead: keep the released layout
    write_tiny_vocab(out / "tokenizer")
    _write_clip_g_vocab(out / "tokenizer_2")
    for name in ("tokenizer", "tokenizer_2"):
        (out / name / "tokenizer.json").unlink(missing_ok=True)
    return out


_EXAMPLE_CACHE: dict = {}


def _temporary_folder(prefix: str) -> str:
    """A fresh temporary folder, removed when the process exits (the loaded weights live
    in memory; the files are only needed while loading)."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


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
        from jaxdiv.pipelines.stable_diffusion import load

        folder = _temporary_folder("jaxdiv_sd_example_")
        save_random_pipeline(folder, image_encoder=bool(image_encoder))
        _EXAMPLE_CACHE[name] = load(folder)
    return _EXAMPLE_CACHE[name]


def example_sd3_pipeline():
    """A tiny random SD3 pipeline (:func:`save_random_sd3_pipeline` defaults: SD3-Medium
    layout, with T5), loaded once per process with
    :func:`jaxdiv.pipelines.stable_diffusion_3.load`.

    Returns:
        The :class:`~jaxdiv.pipelines.stable_diffusion_3.StableDiffusion3` record.

    Example:
        >>> pipe = example_sd3_pipeline()
        >>> pipe.noise_shape(2), pipe is example_sd3_pipeline()
        ((2, 16, 8, 8), True)
    """
    if "sd3" not in _EXAMPLE_CACHE:
        from jaxdiv.pipelines.stable_diffusion_3 import load

        folder = _temporary_folder("jaxdiv_sd3_example_")
        save_random_sd3_pipeline(folder)
        _EXAMPLE_CACHE["sd3"] = load(folder)
    return _EXAMPLE_CACHE["sd3"]
