"""Stable Diffusion 3 / 3.5 from a local diffusers folder, as pure JAX functions.

:func:`load` reads a diffusers ``StableDiffusion3Pipeline`` folder (never the network)::

    <path>/model_index.json
    <path>/transformer/     config.json + *.safetensors   (SD3Transformer2DModel: SD3-Medium,
                                                           SD3.5-Medium MMDiT-X, SD3.5-Large)
    <path>/vae/             config.json + *.safetensors   (AutoencoderKL, 16 latent channels)
    <path>/text_encoder/    CLIP-L, CLIPTextModelWithProjection
    <path>/text_encoder_2/  CLIP-G, CLIPTextModelWithProjection
    <path>/text_encoder_3/  optional: T5EncoderModel (absent / null: zeros, as diffusers)
    <path>/tokenizer/, tokenizer_2/ (CLIP), tokenizer_3/ (T5, with text_encoder_3)
    <path>/scheduler/       scheduler_config.json         (FlowMatchEulerDiscreteScheduler)

and returns a :class:`StableDiffusion3` record whose functions plug into
:func:`jaxdiv.sample` like the SD 1.x/2.x pipeline's::

    pipe = stable_diffusion_3.load("stable-diffusion-3-medium-diffusers")
    cond = pipe.encode_prompt(pipe.tokenize(["a photo of a cat"] * 4))
    out = jaxdiv.sample(pipe.flow_euler(28), pipe.denoiser, noise, key=key, cond=cond,
                        guidance=guidance.cfg(7.0, null_cond=pipe.null_cond))
    images = pipe.decode(out.x0)                 # NCHW in [-1, 1]

The condition is an :class:`SD3Cond` pytree (sequence states and pooled vector), built
exactly as diffusers' ``StableDiffusion3Pipeline.encode_prompt``: CLIP-L and CLIP-G
penultimate hidden states (``clip_skip`` more layers back) concatenated on features,
zero-padded to T5's width, then T5's tokens appended on the sequence; pooled =
``[text_embeds_L; text_embeds_G]``. The model predicts the rectified-flow velocity ``v``;
the denoiser returns ``x0_hat = x_t - t v`` (Esser et al. 2024, Eq. 2 with
``alpha = 1 - t``, ``sigma = t``) on the flow process with the scheduler's ``shift``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from jaxdiv import samplers, schedules, validation
from jaxdiv.models.checkpoint import CheckpointError, path_problem, read_config
from jaxdiv.models.clip import load_clip_text, load_clip_tokenizer, tokenize
from jaxdiv.models.clip.tokenizer import check_token_ids
from jaxdiv.models.layers import pure
from jaxdiv.models.mmdit import MMDiTConfig, load_mmdit
from jaxdiv.models.t5 import load_t5
from jaxdiv.models.vae import VAEConfig, load_vae
from jaxdiv.pipelines.folder import _entry_class, check_pipeline_folder, read_scheduler_config
from jaxdiv.pipelines.stable_diffusion import Bound, _decode_fn, _encode_fn, load_image_encoder
from jaxdiv.predictions import PredictionDenoiser, as_denoiser

__all__ = [
    "COMPONENTS",
    "SD3Cond",
    "SD3Tokens",
    "StableDiffusion3",
    "assemble_cond",
    "load",
    "load_prompt_embeds",
    "save_prompt_embeds",
]

# Required components -> the classes model_index.json may name for them (text_encoder_3 /
# tokenizer_3 are optional: SD3 runs without T5).
COMPONENTS: dict[str, tuple[str, ...]] = {
    "transformer": ("SD3Transformer2DModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModelWithProjection",),
    "text_encoder_2": ("CLIPTextModelWithProjection",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": ("FlowMatchEulerDiscreteScheduler",),
}
T5_COMPONENTS: dict[str, tuple[str, ...]] = {
    "text_encoder_3": ("T5EncoderModel",),
    "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
}

# FlowMatchEulerDiscreteScheduler options that change the grid in ways this pipeline does
# not reproduce: refused rather than silently ignored
_UNSUPPORTED_SCHEDULER = {
    "use_dynamic_shifting": False,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "time_shift_type": "exponential",
}


class SD3Tokens(NamedTuple):
    """Token ids of a batch of prompts for SD3's three text encoders.

    Attributes:
        clip_l: (B, 77) ids for ``text_encoder`` (CLIP-L).
        clip_g: (B, 77) ids for ``text_encoder_2`` (CLIP-G).
        t5: (B, max_sequence_length) ids for ``text_encoder_3``; ``None`` without T5.
    """

    clip_l: np.ndarray
    clip_g: np.ndarray
    t5: np.ndarray | None


class SD3Cond(NamedTuple):
    """SD3's condition: a pytree, so guidance terms (CFG, CADS, ...) map over both leaves.

    Attributes:
        prompt_embeds: (B, 77 + T, joint_attention_dim) the sequence the MMDiT attends to.
        pooled: (B, pooled_projection_dim) ``[CLIP-L text_embeds; CLIP-G text_embeds]``.
    """

    prompt_embeds: jax.Array
    pooled: jax.Array


class StableDiffusion3(NamedTuple):
    """A loaded SD3 / SD3.5 pipeline (see :func:`load`).

    Attributes:
        encode_prompt: ``SD3Tokens -> SD3Cond`` as diffusers' ``encode_prompt``
            (``clip_skip=`` keyword as diffusers'); differentiable in the weights.
        denoiser: ``(x, t, cond) -> x0_hat`` on latents NCHW, ``t`` the flow time
            (= sigma) in ``[0, 1]``; the MMDiT is called at timestep ``1000 t``.
        decode: latents NCHW -> images NCHW, nominally in ``[-1, 1]``
            (``latents / scaling_factor + shift_factor``, then the VAE decoder).
        encode: images NCHW in ``[-1, 1]`` -> latents (VAE posterior mean,
            ``(mean - shift_factor) * scaling_factor``), differentiable.
        tokenizers: ``(CLIP-L, CLIP-G, T5 or None)`` transformers tokenizers (local files).
        schedule: :func:`jaxdiv.schedules.flow` with the scheduler config's ``shift``.
        null_cond: :class:`SD3Cond` of the empty prompt (batch 1): diffusers' default
            negative prompt for CFG.
        max_length: CLIP token length (``tokenizer.model_max_length``, 77).
        max_sequence_length: T5 token length (diffusers' ``max_sequence_length``, 256).
        latent_channels: 16 for SD3.
        vae_scale_factor: image pixels per latent pixel (8).
        patch_size: the MMDiT's patch size (2): latents must be multiples of it.
        sample_size: default latent height/width (``transformer.config.sample_size``).
        stochastic: the scheduler's ``stochastic_sampling`` flag (:meth:`flow_euler`).
        configs: the parsed config of each component.
        path: the pipeline folder.
        clip_skip: the default ``clip_skip`` of :attr:`encode_prompt`.
        has_t5: whether ``text_encoder_3`` was loaded (else its tokens are zeros).
        encode_image: images NCHW in ``[-1, 1]`` -> CLIP image features ``(B, P)``, when
            an image encoder was loaded (``load(..., image_encoder=...)``), else ``None``.
        clip_features: ``(CLIP-L, CLIP-G)``, each ``(ids (B, L), token_embeds (B, L, D) |
            None) -> (states, pooled)``: the states :attr:`encode_prompt` takes from that
            encoder (``clip_skip=`` keyword) and its EOS-pooled output before the
            projection, optionally from given token embeddings (TPSO optimises offsets on
            them; :func:`assemble_cond` joins the parts).
        token_embeddings: ``(CLIP-L, CLIP-G)`` ``(vocab, D)`` token-embedding tables.
        text_projections: ``(CLIP-L, CLIP-G)`` ``(D, P)`` ``text_projection`` kernels
            (``text_embeds = pooled @ kernel``).

    Example:
        >>> from jaxdiv.testing import example_sd3_pipeline
        >>> pipe = example_sd3_pipeline()  # a tiny random folder, loaded with load()
        >>> cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"]))
        >>> cond.prompt_embeds.shape[0], cond.pooled.shape[0], pipe.noise_shape(2)[1]
        (2, 2, 16)
    """

    encode_prompt: Bound
    denoiser: PredictionDenoiser
    decode: Bound
    encode: Bound
    tokenizers: tuple
    schedule: schedules.FlowSchedule
    null_cond: SD3Cond
    max_length: int
    max_sequence_length: int
    latent_channels: int
    vae_scale_factor: int
    patch_size: int
    sample_size: int
    stochastic: bool
    configs: dict
    path: str
    clip_skip: int | None = None
    has_t5: bool = True
    encode_image: Bound | None = None
    clip_features: tuple | None = None
    token_embeddings: tuple | None = None
    text_projections: tuple | None = None

    def tokenize(self, prompts: str | Sequence[str]) -> SD3Tokens:
        """Token ids for the three encoders, padded and truncated as diffusers does.

        Example:
            >>> from jaxdiv.testing import example_sd3_pipeline
            >>> tok = example_sd3_pipeline().tokenize(["a cat", "a dog"])
            >>> tok.clip_l.shape == tok.clip_g.shape, tok.t5.shape[0]
            (True, 2)
        """
        clip_l, clip_g, t5 = self.tokenizers
        return SD3Tokens(
            tokenize(clip_l, prompts, max_length=self.max_length),
            tokenize(clip_g, prompts, max_length=self.max_length),
            None if t5 is None else tokenize(t5, prompts, max_length=self.max_sequence_length),
        )

    def noise_shape(self, batch: int, height: int | None = None, width: int | None = None):
        """Latent shape ``(batch, 16, height / 8, width / 8)``; sizes must be multiples of
        ``vae_scale_factor * patch_size`` (16), default ``sample_size * 8`` (1024 for SD3).

        Example:
            >>> from jaxdiv.testing import example_sd3_pipeline
            >>> pipe = example_sd3_pipeline()
            >>> pipe.vae_scale_factor, pipe.noise_shape(1, height=32, width=64)  # a tiny VAE
            (2, (1, 16, 16, 32))
        """
        f = self.vae_scale_factor
        height = self.sample_size * f if height is None else height
        width = self.sample_size * f if width is None else width
        multiple = size_multiple(self.configs["transformer"], self.configs["vae"])
        validation.image_sizes(multiple, height=height, width=width)
        validation.integer("batch", batch, minimum=1)
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def flow_euler(self, num_steps: int = 28, stochastic: bool | None = None) -> samplers.Sampler:
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` for this folder's config: the
        shifted grid (:meth:`jaxdiv.schedules.FlowSchedule.grid`) and Euler steps
        ``x + (t_next - t) v`` (:func:`jaxdiv.samplers.flow_euler`); ``stochastic``
        defaults to the config's ``stochastic_sampling``. NFE is ``N``.

        Example:
            >>> from jaxdiv.testing import example_sd3_pipeline
            >>> s = example_sd3_pipeline().flow_euler(10)
            >>> s.nfe, round(float(s.times[0]), 4), float(s.times[-1])
            (10, 1.0, 0.0)
        """
        stochastic = self.stochastic if stochastic is None else stochastic
        return samplers.flow_euler(self.schedule, num_steps, stochastic=stochastic)

    def flow_heun(self, num_steps: int = 28) -> samplers.Sampler:
        """diffusers' ``FlowMatchHeunDiscreteScheduler.from_config(<scheduler config>)``:
        the shifted grid of :meth:`flow_euler` and Heun's second-order steps, the last one
        Euler (:func:`jaxdiv.samplers.flow_heun`). NFE is ``2 N - 1``.

        Example:
            >>> from jaxdiv.testing import example_sd3_pipeline
            >>> pipe = example_sd3_pipeline()
            >>> s = pipe.flow_heun(10)
            >>> s.nfe, bool((s.times == pipe.flow_euler(10).times).all())
            (19, True)
        """
        return samplers.flow_heun(self.schedule, num_steps)

    def default_sampler(self) -> samplers.Sampler:
        """The sampler :meth:`generate` uses unless told otherwise: 28 Euler steps."""
        return self.flow_euler(28)

    def default_cfg(self) -> float:
        """The CFG scale :meth:`generate` uses unless told otherwise: 7.0 (diffusers'
        ``StableDiffusion3Pipeline``).

        >>> from jaxdiv.testing import example_sd3_pipeline
        >>> example_sd3_pipeline().default_cfg()
        7.0
        """
        return 7.0

    def generate(self, prompts: str | Sequence[str], n: int = 1, **kwargs):
        """Images for each prompt with a diversity method composed with CFG; see
        :func:`jaxdiv.pipelines.generation.generate` (``key=`` is required; diffusers'
        argument names are refused naming jaxdiv's,
        :func:`~jaxdiv.pipelines.generation.check_keywords`).

        Example:
            >>> import jax
            >>> from jaxdiv.testing import example_sd3_pipeline
            >>> pipe = example_sd3_pipeline()
            >>> g = pipe.generate("a cat", 2, key=jax.random.key(0), sampler=pipe.flow_euler(3))
            >>> g.images.shape
            (2, 3, 16, 16)
        """
        from jaxdiv.pipelines.generation import check_keywords, generate

        check_keywords(kwargs)
        return generate(self, prompts, n, **kwargs)


# --------------------------------------------------------------------------- embeddings files


def size_multiple(transformer_config: dict, vae_config: dict) -> int:
    """Image heights and widths must be multiples of this: ``vae_scale_factor *
    patch_size`` (16 for SD3 / SD3.5), from the ``config.json`` of the ``transformer`` and
    ``vae`` folders (the models' own defaults fill missing fields).

    >>> size_multiple({"patch_size": 2}, {"block_out_channels": [128, 256, 512, 512]})
    16
    """
    vae = VAEConfig.from_dict(vae_config)
    patch = MMDiTConfig.from_dict(transformer_config).patch_size
    return 2 ** (len(vae.block_out_channels) - 1) * patch


def save_prompt_embeds(path: str | os.PathLike, cond: SD3Cond) -> None:
    """Write an :class:`SD3Cond` to a safetensors file (``prompt_embeds``, ``pooled``), e.g.
    to encode prompts once with T5 on a large machine and sample elsewhere without loading
    it (:func:`load_prompt_embeds`; ``load(..., t5=False)``). The file appears whole or not
    at all (written to a temporary name, then renamed).

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> f = os.path.join(tempfile.mkdtemp(), "cats.safetensors")
        >>> save_prompt_embeds(f, SD3Cond(jnp.ones((2, 5, 8)), jnp.zeros((2, 4))))
        >>> load_prompt_embeds(f).prompt_embeds.shape
        (2, 5, 8)
    """
    from safetensors.numpy import save

    if not isinstance(cond, SD3Cond):
        raise TypeError(f"cond must be an SD3Cond, got {type(cond).__name__}")
    arrays = {name: np.ascontiguousarray(np.asarray(value, np.float32))
              for name, value in cond._asdict().items()}  # fmt: skip
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(save(arrays))
    os.replace(tmp, path)


def load_prompt_embeds(path: str | os.PathLike, pipe: StableDiffusion3 | None = None) -> SD3Cond:
    """Read :func:`save_prompt_embeds`' file back as an :class:`SD3Cond` (float32).

    Checks: both tensors present, ranks ``(B, S, D)`` / ``(B, P)`` with the same ``B``,
    every value finite, and with ``pipe`` the widths its MMDiT expects
    (``joint_attention_dim``, ``pooled_projection_dim``). Safetensors only (no pickle).

    Raises:
        CheckpointError: a missing file, a missing, mis-shaped or non-finite tensor.

    Example:
        >>> import tempfile, os, jax.numpy as jnp
        >>> f = os.path.join(tempfile.mkdtemp(), "e.safetensors")
        >>> save_prompt_embeds(f, SD3Cond(jnp.ones((1, 3, 8)), jnp.ones((1, 4))))
        >>> load_prompt_embeds(f).pooled.shape
        (1, 4)
    """
    from safetensors.numpy import load_file

    path = Path(path)
    problem = path_problem(path)
    if problem or not path.is_file():
        raise CheckpointError(f"prompt embeddings file {str(path)!r} "
                              f"{problem or 'does not exist'}")  # fmt: skip
    try:
        arrays = load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for corrupt files
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({err})") from err
    missing = [k for k in SD3Cond._fields if k not in arrays]
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks tensor(s) {missing}; it holds {sorted(arrays)}")
    emb, pooled = arrays["prompt_embeds"], arrays["pooled"]
    want = {}
    if pipe is not None:
        cfg = pipe.configs["transformer"]
        want = {"prompt_embeds": cfg.get("joint_attention_dim", 4096),
                "pooled": cfg.get("pooled_projection_dim", 2048)}  # fmt: skip
    for name, arr, rank in (("prompt_embeds", emb, 3), ("pooled", pooled, 2)):
        if arr.ndim != rank or arr.shape[0] != emb.shape[0]:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has shape {arr.shape}; "
                                  f"expected rank {rank} with the batch of prompt_embeds "
                                  f"{emb.shape[0]}")  # fmt: skip
        if name in want and arr.shape[-1] != want[name]:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has width {arr.shape[-1]}, "
                                  f"the pipeline's transformer expects {want[name]}")  # fmt: skip
        if not np.issubdtype(arr.dtype, np.floating):
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} has dtype {arr.dtype}, "
                                  "expected a float")  # fmt: skip
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        if bad:
            raise CheckpointError(f"{str(path)!r}: tensor {name!r} holds {bad} non-finite "
                                  "values (NaN or inf)")  # fmt: skip
    return SD3Cond(jnp.asarray(emb, jnp.float32), jnp.asarray(pooled, jnp.float32))


# --------------------------------------------------------------------------- functions


def _clip_out(model, params, ids, clip_skip, token_embeds=None):
    # diffusers' SD3 takes hidden_states[-(clip_skip + 2)] *without* the final LayerNorm
    # (unlike SD 1.x/2.x), and the EOS-pooled output (projected: text_embeds)
    out = model.apply(params, ids, output_hidden_states=True, token_embeds=token_embeds)
    k = 0 if clip_skip is None else clip_skip
    return out.hidden_states[-(k + 2)], out


def _clip_states(model, params, ids, clip_skip):
    hidden, out = _clip_out(model, params, ids, clip_skip)
    return hidden, out.text_embeds


def assemble_cond(clip_l_states, clip_g_states, t5_states, pooled_l, pooled_g) -> SD3Cond:
    """An :class:`SD3Cond` from its parts, as diffusers' ``encode_prompt`` joins them:
    CLIP-L and CLIP-G states concatenated on features, zero-padded to T5's width, T5's
    tokens appended on the sequence; ``pooled = [pooled_l; pooled_g]``.

    Example:
        >>> import jax.numpy as jnp
        >>> c = assemble_cond(jnp.ones((2, 3, 4)), jnp.ones((2, 3, 5)), jnp.zeros((2, 6, 12)),
        ...                   jnp.ones((2, 2)), jnp.ones((2, 3)))
        >>> c.prompt_embeds.shape, c.pooled.shape, float(c.prompt_embeds[0, 0, 9:].sum())
        ((2, 9, 12), (2, 5), 0.0)
    """
    clip = jnp.concatenate([clip_l_states, clip_g_states], axis=-1)
    t5_states = jnp.asarray(t5_states).astype(clip.dtype)
    clip = jnp.pad(clip, ((0, 0), (0, 0), (0, t5_states.shape[-1] - clip.shape[-1])))
    return SD3Cond(jnp.concatenate([clip, t5_states], axis=-2),
                   jnp.concatenate([pooled_l, pooled_g], axis=-1))  # fmt: skip


def _clip_features_fn(model, clip_skip):
    net = pure(model)
    default = clip_skip

    def apply(params, ids, token_embeds=None, clip_skip=default):
        hidden, out = _clip_out(net, params, jnp.asarray(ids), clip_skip, token_embeds)
        return hidden, out.pooler_output

    return Bound(apply, net.params, ("clip_skip",))


def _encode_prompt_fn(clip_l, clip_g, t5, *, joint_dim, t5_length, clip_skip):
    nets = (pure(clip_l), pure(clip_g), None if t5 is None else pure(t5))
    params = tuple(None if n is None else n.params for n in nets)
    default = clip_skip

    def apply(params, tokens, clip_skip=default):
        p_l, p_g, p_t5 = params
        h_l, pooled_l = _clip_states(nets[0], p_l, jnp.asarray(tokens.clip_l), clip_skip)
        h_g, pooled_g = _clip_states(nets[1], p_g, jnp.asarray(tokens.clip_g), clip_skip)
        if nets[2] is None:
            t5_states = jnp.zeros((h_l.shape[0], t5_length, joint_dim), h_l.dtype)
        else:
            t5_states = nets[2].apply(p_t5, jnp.asarray(tokens.t5))
        return assemble_cond(h_l, h_g, t5_states, pooled_l, pooled_g)

    vocab = (clip_l.config.vocab_size, clip_g.config.vocab_size,
             None if t5 is None else t5.config.vocab_size)  # fmt: skip

    def check(tokens, *_, **__):
        if not isinstance(tokens, SD3Tokens):
            raise TypeError(f"tokens must be an SD3Tokens from pipe.tokenize(), got "
                            f"{type(tokens).__name__}")  # fmt: skip
        for name, ids, size in zip(SD3Tokens._fields, tokens, vocab, strict=True):
            if size is None:
                if ids is not None:
                    raise ValueError("tokens.t5 must be None: this pipeline has no T5 encoder")
                continue
            if ids is None:
                raise ValueError(f"tokens.{name} is None; this pipeline needs it")
            check_token_ids(ids, vocab_size=size, name=f"tokens.{name}")
        rows = {np.shape(ids)[0] for ids in tokens if ids is not None}
        if len(rows) != 1:
            raise ValueError(f"tokens hold different batch sizes {sorted(rows)}")

    return Bound(apply, params, ("clip_skip",), check)


def _run_context_hooks(hooks, block_index, stream):
    """The guidance terms' model hooks (``hook="model"``), in chain order, after a block:
    ``(stream, reports)``, one report per hook."""
    reports = []
    for hook in hooks:
        out = hook(block_index, stream)
        if not isinstance(out, tuple) or len(out) != 2:
            raise ValueError(
                "a model hook must return (text_stream, report) (report None when it has "
                f"none), got {type(out).__name__} after block {block_index}"
            )
        stream, report = out
        reports.append(report)
    return stream, tuple(reports)


def _check_hook_blocks(hooks, num_layers: int) -> None:
    """Refuse hooks that name joint blocks the MMDiT never runs a hook after (the last
    block is ``context_pre_only``: its text stream ends there)."""
    for hook in hooks:
        blocks = getattr(getattr(hook, "func", None), "blocks", None)
        if blocks and max(blocks) > num_layers - 2:
            raise ValueError(
                f"a model hook names joint blocks {list(blocks)}, but this MMDiT has "
                f"{num_layers} blocks and runs hooks after blocks 0..{num_layers - 2} only "
                "(the last one is context_pre_only): it would never act there"
            )


def _mmdit_fn(transformer, num_train_timesteps):
    net = pure(transformer)
    num_layers = transformer.config.num_layers

    def apply(params, x, t, cond, model_hooks=()):
        _check_hook_blocks(model_hooks, num_layers)
        # diffusers feeds the scheduler's timesteps, sigma * num_train_timesteps
        timestep = jnp.broadcast_to(jnp.asarray(t, jnp.float32) * num_train_timesteps,
                                    (x.shape[0],))  # fmt: skip
        if not model_hooks:
            return net.apply(params, x, timestep, cond.prompt_embeds, cond.pooled)
        hook = Partial(_run_context_hooks, tuple(model_hooks))
        velocity, by_block = net.apply(params, x, timestep, cond.prompt_embeds, cond.pooled,
                                       context_hook=hook, context_reports=True)  # fmt: skip
        # the protocol's order: one tuple per hook, holding its report after each block
        per_hook = tuple(zip(*by_block, strict=True)) if by_block else ((),) * len(model_hooks)
        return velocity, per_hook

    return Bound(apply, net.params)


def _load_t5_tokenizer(folder: Path, class_name: str | None = None):
    """The T5 tokenizer of ``tokenizer_3/``, built with the class model_index.json names
    (``T5TokenizerFast`` / ``T5Tokenizer``), as diffusers does: never whatever class
    ``tokenizer_config.json`` names (a BERT config there would give other token ids)."""
    problem = path_problem(folder)
    if problem or not folder.is_dir():
        raise CheckpointError(f"tokenizer_3 folder {str(folder)!r} {problem or 'is missing'}")
    class_name = class_name or "T5TokenizerFast"
    if class_name not in T5_COMPONENTS["tokenizer_3"]:
        raise CheckpointError(f"tokenizer_3 is a {class_name}, expected one of "
                              f"{list(T5_COMPONENTS['tokenizer_3'])}")  # fmt: skip
    try:
        import transformers
    except ImportError as err:
        raise CheckpointError(
            "loading the T5 tokenizer needs transformers (pip install 'jaxdiv[sd]')"
        ) from err
    cls = getattr(transformers, class_name)
    # A local path with local_files_only never reaches the hub.
    try:
        tokenizer = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # tokenizers' / transformers' own errors name no file
        raise CheckpointError(
            f"tokenizer folder {str(folder)!r}: transformers could not build a {class_name} "
            f"from it ({type(err).__name__}: {err})"
        ) from err
    if not isinstance(tokenizer, cls):
        raise CheckpointError(f"tokenizer folder {str(folder)!r}: got a "
                              f"{type(tokenizer).__name__}, expected a {class_name}")  # fmt: skip
    return tokenizer


def _flow_schedule(config: dict) -> tuple[schedules.FlowSchedule, bool]:
    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise ValueError(f"scheduler: {name} is not supported for SD3 (expected "
                         "FlowMatchEulerDiscreteScheduler)")  # fmt: skip
    bad = [f"{k}={config[k]!r}" for k, ok in _UNSUPPORTED_SCHEDULER.items()
           if k in config and config[k] != ok]  # fmt: skip
    if bad:
        raise ValueError(f"scheduler config: {', '.join(bad)} is not supported (the SD3 / "
                         "SD3.5 configs use a fixed shift)")  # fmt: skip
    shift = config.get("shift", 1.0)
    shift = validation.number("scheduler config 'shift'", shift, lo=0, lo_open=True)
    steps = validation.integer("scheduler config 'num_train_timesteps'",
                               config.get("num_train_timesteps", 1000), minimum=1)  # fmt: skip
    stochastic = validation.boolean("scheduler config 'stochastic_sampling'",
                                    config.get("stochastic_sampling", False))  # fmt: skip
    return schedules.flow(shift=float(shift), num_train_timesteps=steps), stochastic


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    *,
    variant: str | None = None,
    clip_skip: int | None = None,
    max_sequence_length: int = 256,
    t5: bool = True,
    image_encoder: str | os.PathLike | bool | None = None,
    attention_implementation: str | None = None,
    check_finite: bool = True,
) -> StableDiffusion3:
    """Load an SD3 / SD3.5 pipeline folder (diffusers format, local only).

    Esser et al. (2024): a rectified-flow MMDiT on 16-channel VAE latents, conditioned on
    CLIP-L, CLIP-G and T5 (Sec. 5.2), sampled with the shifted schedule (Eq. 23).

    Args:
        path: pipeline folder (see the module docstring for the layout).
        dtype: compute and weight dtype of every network: ``jnp.float32``,
            ``jnp.bfloat16``, ``jnp.float16`` or ``jnp.float64`` (with 64-bit JAX enabled);
            see :func:`~jaxdiv.models.checkpoint.float_dtype`.
        allow_pickle: accept pickled ``.bin`` weights where a component has none in
            safetensors (refused by default: unpickling can run code).
        variant: weight-file variant such as ``"fp16"``.
        clip_skip: default ``clip_skip`` of :attr:`StableDiffusion3.encode_prompt`
            (diffusers': the CLIP hidden state ``clip_skip + 2`` from the end); the null
            embedding is built without it, as diffusers builds the negative prompt.
        max_sequence_length: T5 tokens (diffusers' default 256; at most 512).
        t5: load ``text_encoder_3`` when the folder has it; ``False`` runs without T5
            (zeros in its place, diffusers' ``text_encoder_3=None``), which saves ~19 GB
            of weights for SD3.
        image_encoder: a CLIP vision tower for :attr:`StableDiffusion3.encode_image`
            (GASS features, image metrics), as in
            :func:`jaxdiv.pipelines.stable_diffusion.load`: ``None`` loads
            ``<path>/image_encoder`` when present (SD3 releases have none), a path loads
            that folder, ``False`` skips it.
        attention_implementation: for :func:`~jaxdiv.models.layers.attention_core` in the MMDiT
            and CLIP (``None``/``"xla"``, ``"cudnn"``).
        check_finite: refuse weights holding NaN or inf, or overflowing ``dtype``.

    Returns:
        A :class:`StableDiffusion3`.

    Raises:
        CheckpointError: a missing or incomplete folder (every missing component named),
            unsupported classes, pickles without ``allow_pickle``, or tensors that do not
            match their configs (each named).
        ValueError: an unsupported scheduler config, or components that do not fit
            together (text widths vs the MMDiT, VAE vs MMDiT channels).

    Example:
        >>> pipe = load("stable-diffusion-3-medium-diffusers")  # doctest: +SKIP

        >>> import tempfile
        >>> try:
        ...     load(tempfile.mkdtemp())
        ... except CheckpointError as err:
        ...     print("no model_index.json" in str(err))
        True
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    if clip_skip is not None and (isinstance(clip_skip, bool) or not isinstance(clip_skip, int)):
        raise TypeError(f"clip_skip must be an int or None, got {clip_skip!r}")
    max_sequence_length = validation.integer("max_sequence_length", max_sequence_length, minimum=1)
    if max_sequence_length > 512:
        raise ValueError(f"max_sequence_length must be <= 512 (diffusers' limit), got "
                         f"{max_sequence_length}")  # fmt: skip
    t5 = validation.boolean("t5", t5)
    root = Path(path).expanduser()
    index = check_pipeline_folder(root, COMPONENTS, what="Stable Diffusion 3")
    listed = [c for c in T5_COMPONENTS if isinstance(index.get(c), list)
              and index[c][1] is not None]  # fmt: skip
    use_t5 = t5 and bool(listed)
    if use_t5:
        check_pipeline_folder(root, T5_COMPONENTS, what="Stable Diffusion 3 (T5)")
    schedule, stochastic = _flow_schedule(read_scheduler_config(root))

    kw = dict(allow_pickle=allow_pickle, variant=variant, check_finite=check_finite)
    transformer = load_mmdit(root / "transformer", dtype=dtype,
                             attention_implementation=attention_implementation, **kw)  # fmt: skip
    vae = load_vae(root / "vae", dtype=dtype, **kw)
    # COMPONENTS require CLIPTextModelWithProjection (pooled text_embeds), whatever the
    # configs' "architectures" say (diffusers loads the class model_index.json names)
    texts = [load_clip_text(root / name, with_projection=True, dtype=dtype,
                            attention_implementation=attention_implementation, **kw)
             for name in ("text_encoder", "text_encoder_2")]  # fmt: skip
    tokenizers = [load_clip_tokenizer(root / name) for name in ("tokenizer", "tokenizer_2")]
    t5_model = load_t5(root / "text_encoder_3", dtype=dtype, **kw) if use_t5 else None
    t5_class = _entry_class(index, "tokenizer_3") if use_t5 else None
    tokenizers.append(_load_t5_tokenizer(root / "tokenizer_3", t5_class) if use_t5 else None)

    cfg = transformer.config
    widths = [t.text_model.config.hidden_size for t in texts]
    pooled = [t.text_projection.out_features for t in texts]
    problems = []
    if sum(widths) > cfg.joint_attention_dim:
        problems.append(f"CLIP hidden sizes {widths} sum to more than the transformer's "
                        f"joint_attention_dim {cfg.joint_attention_dim}")  # fmt: skip
    if sum(pooled) != cfg.pooled_projection_dim:
        problems.append(f"CLIP projection dims {pooled} do not sum to the transformer's "
                        f"pooled_projection_dim {cfg.pooled_projection_dim}")  # fmt: skip
    if t5_model is not None and t5_model.config.d_model != cfg.joint_attention_dim:
        problems.append(f"T5 d_model {t5_model.config.d_model} is not the transformer's "
                        f"joint_attention_dim {cfg.joint_attention_dim}")  # fmt: skip
    lat = vae.config.latent_channels
    if cfg.in_channels != lat or cfg.out_channels != lat:
        problems.append(f"transformer in/out channels ({cfg.in_channels}, {cfg.out_channels}) "
                        f"are not the vae latent_channels {lat}")  # fmt: skip
    if problems:
        raise ValueError(f"{str(root)!r}: components do not fit together: {'; '.join(problems)}")
    layers = min(t.text_model.config.num_hidden_layers for t in texts)
    if clip_skip is not None and not 0 <= clip_skip < layers - 1:
        raise ValueError(f"clip_skip must be in [0, {layers - 1}), got {clip_skip}")

    max_length = tokenizers[0].model_max_length
    if max_length is None or max_length > texts[0].text_model.config.max_position_embeddings:
        max_length = texts[0].text_model.config.max_position_embeddings
    encode_prompt = _encode_prompt_fn(
        *texts, t5_model, joint_dim=cfg.joint_attention_dim, t5_length=max_sequence_length,
        clip_skip=clip_skip,
    )
    configs = {"model_index": index, "scheduler": read_scheduler_config(root)}
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        configs[name] = read_config(root / name)
    if use_t5:
        configs["text_encoder_3"] = read_config(root / "text_encoder_3")
    encode_image, enc_config = load_image_encoder(
        root, image_encoder, dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    if enc_config is not None:
        configs["image_encoder"] = enc_config
    sample_size = cfg.sample_size if cfg.sample_size is not None else 128
    pipe = StableDiffusion3(
        encode_prompt=encode_prompt,
        denoiser=as_denoiser(_mmdit_fn(transformer, schedule.num_train_timesteps), schedule,
                             "flow"),  # fmt: skip
        decode=_decode_fn(vae),
        encode=_encode_fn(vae),
        tokenizers=tuple(tokenizers),
        schedule=schedule,
        null_cond=None,
        max_length=int(max_length),
        max_sequence_length=max_sequence_length,
        latent_channels=lat,
        vae_scale_factor=vae.downsample_factor,
        patch_size=cfg.patch_size,
        sample_size=int(sample_size),
        stochastic=stochastic,
        configs=configs,
        path=str(root),
        clip_skip=clip_skip,
        has_t5=use_t5,
        encode_image=encode_image,
        clip_features=tuple(_clip_features_fn(t, clip_skip) for t in texts),
        token_embeddings=tuple(t.text_model.embeddings.token_embedding.embedding[...]
                               for t in texts),  # fmt: skip
        text_projections=tuple(t.text_projection.kernel[...] for t in texts),
    )
    # diffusers encodes the negative / empty prompt without clip_skip
    null = encode_prompt(pipe.tokenize([""]), clip_skip=None)
    return pipe._replace(null_cond=null)
