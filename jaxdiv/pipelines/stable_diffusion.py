"""Stable Diffusion 1.x / 2.x from a local diffusers folder, as pure JAX functions.

:func:`load` reads a diffusers-format pipeline folder (never the network)::

    <path>/model_index.json
    <path>/unet/            config.json + *.safetensors   (UNet2DConditionModel)
    <path>/vae/             config.json + *.safetensors   (AutoencoderKL)
    <path>/text_encoder/    config.json + *.safetensors   (CLIPTextModel[WithProjection])
    <path>/tokenizer/       vocab.json + merges.txt       (CLIPTokenizer)
    <path>/scheduler/       scheduler_config.json         (any diffusers VP scheduler)
    <path>/image_encoder/   optional: CLIP vision tower   (CLIPVisionModel[WithProjection])
    <path>/feature_extractor/preprocessor_config.json     optional: its image mean / std

and returns a :class:`StableDiffusion` record whose functions plug straight into
:func:`jaxdiv.sample`::

    pipe = stable_diffusion.load("stable-diffusion-2-1-base")
    cond = pipe.encode_prompt(pipe.tokenize(["a photo of a cat"] * 4))
    s = samplers.ddim(pipe.schedule, 50, **pipe.grid_kwargs)
    out = jaxdiv.sample(s, pipe.denoiser, noise, key=key, cond=cond,
                        guidance=guidance.cfg(7.5, null_cond=pipe.null_cond))
    images = pipe.decode(out.x0)                 # NCHW in [-1, 1]

The scheduler config becomes a VP schedule as described in
:mod:`jaxdiv.pipelines.scheduler_config` (its grid defaults are
:attr:`StableDiffusion.grid_kwargs`); the folder is checked up front by
:mod:`jaxdiv.pipelines.folder`. :func:`jaxdiv.testing.save_random_pipeline` writes a tiny
random folder of this layout for tests.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import samplers, schedules, validation
from jaxdiv.models.checkpoint import read_config
from jaxdiv.models.clip import (
    clip_image_preprocess,
    load_clip_text,
    load_clip_tokenizer,
    load_clip_vision,
    tokenize,
)
from jaxdiv.models.clip.tokenizer import check_token_ids
from jaxdiv.models.layers import pure
from jaxdiv.models.unet import UNetConfig, load_unet
from jaxdiv.models.vae import VAEConfig, load_vae
from jaxdiv.pipelines.folder import (
    check_pipeline_folder,
    image_encoder_folder,
    image_preprocess_stats,
    read_scheduler_config,
)
from jaxdiv.pipelines.scheduler_config import (
    ddim_grid,
    dpm_solver_grid,
    euler_grid,
    schedule_from_config,
)
from jaxdiv.predictions import (
    PredictionDenoiser,
    as_denoiser,
    eps_to_x0,
    v_to_x0,
    x0_to_eps,
    x0_to_v,
)

__all__ = ["Bound", "StableDiffusion", "load"]


@functools.lru_cache(maxsize=64)
def _jitted(apply: Callable, static_argnames: tuple[str, ...]):
    return jax.jit(apply, static_argnames=static_argnames)


@functools.lru_cache(maxsize=64)
def _static_defaults(apply: Callable, static_argnames: tuple[str, ...]) -> dict:
    # jit keys its cache on the keywords as passed: f(x) and f(x, k=<default>) would
    # compile twice, so omitted static keywords are always passed with their defaults
    params = inspect.signature(apply).parameters
    return {n: params[n].default for n in static_argnames
            if n in params and params[n].default is not inspect.Parameter.empty}  # fmt: skip


class Bound(NamedTuple):
    """A pure function bound to its parameters: ``f(*args) == apply(params, *args)``.

    Calls go through ``jax.jit(apply)`` (compiled once per input shape; inlined when
    called inside another traced function such as :func:`jaxdiv.sample`), because running
    a UNet or VAE op by op is slow. It is a pytree whose array leaves are the parameters,
    so passing it (or a denoiser holding it) to :func:`jaxdiv.sample` traces the weights
    as arguments instead of baking them into the compiled program.

    Attributes:
        apply: ``apply(params, *args, **kwargs)``, a pure function.
        params: the parameter pytree.
        static_argnames: keyword arguments of ``apply`` that are compile-time constants.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = Bound(lambda p, x: p["w"] * x, {"w": jnp.float32(3.0)})
        >>> float(f(2.0)), float(jax.grad(f)(2.0))
        (6.0, 3.0)
    """

    apply: Callable
    params: Any
    static_argnames: tuple[str, ...] = ()
    check: Callable | None = None  # eager check of the (concrete) arguments, before jit

    def __call__(self, *args, **kwargs):
        if self.check is not None:
            self.check(*args)
        if self.static_argnames:
            kwargs = {**_static_defaults(self.apply, self.static_argnames), **kwargs}
        return _jitted(self.apply, self.static_argnames)(self.params, *args, **kwargs)


class StableDiffusion(NamedTuple):
    """A loaded Stable Diffusion pipeline (see :func:`load`).

    Attributes:
        encode_prompt: ``tokens (B, L) int -> (B, L, D)`` text states the UNet attends to
            (``last_hidden_state``, or the ``clip_skip`` layer through the final
            LayerNorm, as diffusers' ``encode_prompt``). Differentiable in the weights.
        denoiser: ``(x, t, cond) -> x0_hat`` on scaled latents, ``t`` the VP timestep
            (``0 .. T-1``; fractional values interpolate), via
            :func:`jaxdiv.predictions.as_denoiser` for ``prediction_type``.
        decode: diffusion latents NCHW -> images NCHW, nominally in ``[-1, 1]`` (divides by
            the VAE ``scaling_factor``, adds ``shift_factor``, then decodes).
        encode_image: images NCHW in ``[-1, 1]`` -> CLIP image features ``(B, P)`` (the
            projected ``image_embeds``, or ``pooler_output`` for a tower without
            projection); resize / crop / normalise are differentiable. ``None`` when no
            image encoder was loaded.
        tokenizer: the ``transformers.CLIPTokenizer`` (local files).
        schedule: the :class:`~jaxdiv.schedules.VPSchedule` of the scheduler config.
        null_cond: ``(1, L, D)`` embedding of the empty prompt for
            ``guidance.cfg(w, null_cond=...)`` (diffusers: no ``clip_skip`` for it).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"``.
        grid_kwargs: ``{"spacing", "steps_offset"}`` from the scheduler config, for
            ``samplers.ddim(pipe.schedule, N, **pipe.grid_kwargs)``.
        max_length: token sequence length (``tokenizer.model_max_length``, 77 for SD).
        latent_channels: channels of the latents (4 for SD 1.x/2.x).
        vae_scale_factor: image pixels per latent pixel (8 for SD).
        sample_size: default latent height/width (``unet.config.sample_size``).
        configs: the parsed ``config.json`` of each component (plus ``"scheduler"`` and
            ``"model_index"``).
        path: the pipeline folder.
        text_features: ``(tokens (B, L), token_embeds (B, L, D) | None) -> (states,
            pooled)``: ``encode_prompt``'s states and the EOS-pooled output in one pass,
            optionally from given token embeddings (TPSO optimises offsets on them).
        token_embedding: the text encoder's ``(vocab, D)`` token-embedding table.
        text_projection: ``(D, P)`` kernel of the text encoder's ``text_projection``
            (``None`` when the folder's encoder has none, as in SD 1.x/2.x).
        encode: images NCHW in ``[-1, 1]`` -> diffusion latents: the VAE posterior *mean*,
            ``(mean - shift_factor) * scaling_factor`` (diffusers samples the posterior
            in its img2img pipelines; the mean is deterministic), differentiable. Eager
            images that are not floats in ``[-1, 1]`` (uint8 or 0..255 pixels) or hold
            NaN are refused, here and by ``encode_image``.

    Example:
        >>> from jaxdiv.testing import example_pipeline
        >>> pipe = example_pipeline()  # a tiny random folder, loaded with load()
        >>> cond = pipe.encode_prompt(pipe.tokenize(["a cat", "a dog"]))
        >>> cond.shape, pipe.null_cond.shape, pipe.noise_shape(2)
        ((2, 16, 32), (1, 16, 32), (2, 4, 8, 8))
    """

    encode_prompt: Bound
    denoiser: PredictionDenoiser
    decode: Bound
    encode_image: Bound | None
    tokenizer: Any
    schedule: schedules.VPSchedule
    null_cond: jax.Array
    prediction_type: str
    grid_kwargs: dict
    max_length: int
    latent_channels: int
    vae_scale_factor: int
    sample_size: int
    configs: dict
    path: str
    text_features: Bound | None = None
    token_embedding: jax.Array | None = None
    text_projection: jax.Array | None = None
    encode: Bound | None = None

    def generate(self, prompts: str | Sequence[str], n: int = 1, **kwargs):
        """Images for each prompt with a diversity method composed with CFG; see
        :func:`jaxdiv.pipelines.generation.generate` (``key=`` is required; diffusers'
        argument names are refused naming jaxdiv's,
        :func:`~jaxdiv.pipelines.generation.check_keywords`).

        Example:
            >>> import jax
            >>> from jaxdiv.testing import example_pipeline
            >>> pipe = example_pipeline()
            >>> pipe.generate("a cat", 2, key=jax.random.key(0), sampler=pipe.ddim(3)).images.shape
            (2, 3, 16, 16)
        """
        from jaxdiv.pipelines.generation import check_keywords, generate

        check_keywords(kwargs)
        return generate(self, prompts, n, **kwargs)

    def default_sampler(self) -> samplers.Sampler:
        """The sampler :meth:`generate` uses unless told otherwise: ``ddim(50)``."""
        return self.ddim(50)

    def default_cfg(self) -> float:
        """The CFG scale :meth:`generate` uses unless told otherwise: 7.5 (diffusers').

        >>> from jaxdiv.testing import example_pipeline
        >>> example_pipeline().default_cfg()
        7.5
        """
        return 7.5

    def tokenize(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Token ids ``(num_prompts, max_length)`` padded and truncated as diffusers does.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> example_pipeline().tokenize(["a cat", "a dog"]).shape
            (2, 16)
        """
        return tokenize(self.tokenizer, prompts, max_length=self.max_length)

    def noise_shape(self, batch: int, height: int | None = None, width: int | None = None):
        """Latent shape ``(batch, C, height / f, width / f)`` for images of ``height x width``.

        ``height``/``width`` default to ``sample_size * vae_scale_factor`` (512 for SD 1.5
        and SD 2.1-base, 768 for SD 2.1) and must be multiples of
        ``vae_scale_factor * 2 ** (levels - 1)`` for the UNet's down/up path to line up.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> pipe = example_pipeline()
            >>> pipe.noise_shape(3), pipe.noise_shape(1, height=32, width=16)
            ((3, 4, 8, 8), (1, 4, 16, 8))
        """
        f = self.vae_scale_factor
        height = self.sample_size * f if height is None else height
        width = self.sample_size * f if width is None else width
        multiple = size_multiple(self.configs["unet"], self.configs["vae"])
        validation.image_sizes(multiple, height=height, width=width)
        validation.integer("batch", batch, minimum=1)
        return (batch, self.latent_channels, int(height) // f, int(width) // f)

    def ddim(
        self, num_steps: int = 50, eta: float = 0.0, clean_endpoint: bool = False
    ) -> samplers.Sampler:
        """DDIM (Song et al. 2021, Eq. 12) on this schedule with the configured spacing.

        By default it reproduces diffusers' ``DDIMScheduler.from_config(<scheduler
        config>)`` (:func:`~jaxdiv.pipelines.scheduler_config.ddim_grid`): the model runs at
        diffusers' timesteps for the config's ``timestep_spacing`` / ``steps_offset`` and
        each step goes to ``t - T // N``, the last one to ``final_alpha_cumprod``. When that
        is ``alphas_cumprod[0]`` (``set_alpha_to_one=False``, as released SD 1.x/2.x configs
        say, or ``"trailing"`` spacing with ``T / N`` rounding up) the output is the latent
        at VP time 0, ``sqrt(abar_0) x0_hat + sqrt(1 - abar_0) eps_hat``: it keeps
        ``sqrt(1 - abar_0) ~ 0.03`` (SD's betas) of predicted noise and is not the last
        ``x0_hat``.

        ``clean_endpoint=True`` keeps jaxdiv's grid instead
        (:meth:`~jaxdiv.schedules.VPSchedule.grid`: the same evaluation times for
        "leading", each step to the next of them, the last to the clean endpoint
        ``alpha = 1``). Its output is the last guided ``x0_hat`` exactly, with no noise
        left, which SPELL's guarantee needs. Both are the same sampler when the config has
        ``set_alpha_to_one=True`` and ``T // N`` spacing (e.g. "leading").

        Args:
            num_steps: DDIM steps ``N`` (denoiser evaluations per sample).
            eta: 0 deterministic DDIM, 1 DDPM-like ancestral sampling.
            clean_endpoint: jaxdiv's grid ending at ``sigma = 0`` instead of diffusers'.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> pipe = example_pipeline()   # leading, steps_offset 1, set_alpha_to_one
            >>> pipe.ddim(10).times.tolist()[-3:], pipe.ddim(10, clean_endpoint=True).nfe
            ([101.0, 1.0, -1.0], 10)
        """
        validation.boolean("clean_endpoint", clean_endpoint)
        # the grid from the schedule's arrays at build time, also inside a user's jax.jit
        with jax.ensure_compile_time_eval():
            if clean_endpoint:
                return samplers.ddim(self.schedule, num_steps, eta, **self.grid_kwargs)
            times, targets = ddim_grid(self.configs["scheduler"], num_steps)
            if np.array_equal(targets, times[1:]) and np.all(np.diff(times) < 0):  # plain
                return samplers.ddim(self.schedule, eta=eta, times=times.astype(np.float32),
                                     allow_noisy_end=True)  # fmt: skip
            return samplers.ddim(self.schedule, eta=eta, times=times.astype(np.float32),
                                 targets=targets.astype(np.float32))  # fmt: skip

    def edm(self, num_steps: int = 18, rho: float = 7.0, **kwargs) -> samplers.Sampler:
        """Karras et al. (2022) Alg. 2 sampler on the Karras noise levels (Eq. 5) of this model.

        The levels run from ``noise_level(T-1)`` to ``noise_level(0)`` (diffusers'
        ``use_karras_sigmas``), mapped to VP times (fractional timesteps interpolate
        ``alphas_cumprod``), then the clean endpoint. ``kwargs`` go to
        :func:`jaxdiv.samplers.edm` (``s_churn``, ...). NFE is ``2 N - 1``.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> s = example_pipeline().edm(5)
            >>> s.nfe, round(float(s.times[0])), float(s.times[-1])
            (9, 999, -1.0)
        """
        sch = self.schedule
        levels = schedules.karras_sigmas(
            num_steps, sch.noise_level(0.0), sch.noise_level(sch.t_max), rho
        )
        times = jnp.concatenate([sch.t_of_noise_level(levels), jnp.full((1,), sch.t_clean)])
        return samplers.edm(sch, num_steps, times=times, **kwargs)

    def dpmpp_2m(self, num_steps: int = 25, karras: bool = True) -> samplers.Sampler:
        """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) on diffusers' DPM-Solver grid of this model.

        Reproduces diffusers' ``DPMSolverMultistepScheduler.from_config(<scheduler config>,
        algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=karras)`` (with
        ``final_sigmas_type="zero"``) on the same model: the grid is
        :func:`~jaxdiv.pipelines.scheduler_config.dpm_solver_grid` (diffusers' DPM
        timesteps for the config's ``timestep_spacing`` / ``steps_offset``, which differ
        from DDIM's, then the clean endpoint ``t = -1``). NFE is ``N``.

        With ``karras=True`` the solver's noise levels are the exact Karras levels
        (fractional VP times), while diffusers evaluates the UNet at the *rounded*
        timestep of each level. The returned sampler does the same: it calls the (guided)
        denoiser at the rounded timestep and re-expresses the ``x0_hat`` it returns at the
        solver's level through the network's prediction (``eps`` or ``v`` held fixed, as
        diffusers converts the model output with the exact sigma). That is exact for CFG
        (an affine combination of predictions) and any guidance that is one; other
        guidance terms see the rounded timestep and have their ``x0_hat`` re-expressed
        too (at most half a timestep away). ``tests/test_pipeline_sd.py`` holds the final
        latents within 1e-4 (relative to their scale) of diffusers' with CFG, for both
        values of ``karras``.

        Args:
            num_steps: solver steps ``N`` (denoiser evaluations per sample).
            karras: diffusers' ``use_karras_sigmas`` (Karras et al. 2022, Eq. 5, rho 7).

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> pipe = example_pipeline()
            >>> s = pipe.dpmpp_2m(4, karras=False)
            >>> s.name, s.nfe, s.times.tolist()
            ('dpmpp_2m', 4, [801.0, 601.0, 401.0, 201.0, -1.0])
            >>> s = pipe.dpmpp_2m(4)   # Karras levels; the UNet runs at rounded timesteps
            >>> [round(t, 1) for t in s.times.tolist()], [int(t) for t in s.options.model_times]
            ([999.0, 687.2, 145.9, 0.0, -1.0], [999, 687, 146, 0])
        """
        return self._dpm_solver(samplers.dpmpp_2m, num_steps, karras)

    def dpmpp_2m_sde(
        self, num_steps: int = 25, karras: bool = True, eta: float = 1.0
    ) -> samplers.Sampler:
        """DPM-Solver++(2M) SDE (:func:`jaxdiv.samplers.dpmpp_2m_sde`) on the grid of
        :meth:`dpmpp_2m`: diffusers' ``DPMSolverMultistepScheduler.from_config(<scheduler
        config>, algorithm_type="sde-dpmsolver++", solver_order=2,
        use_karras_sigmas=karras)`` given the same noise (per-sample streams of the run's
        key). With ``karras=True`` the UNet runs at the rounded timesteps, as
        :meth:`dpmpp_2m` explains. NFE is ``N``.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> s = example_pipeline().dpmpp_2m_sde(4)
            >>> s.name, s.nfe, float(s.times[-1])
            ('dpmpp_2m_sde', 4, -1.0)
        """
        return self._dpm_solver(samplers.dpmpp_2m_sde, num_steps, karras, eta=eta)

    def dpmpp_3m_sde(
        self, num_steps: int = 25, karras: bool = True, eta: float = 1.0
    ) -> samplers.Sampler:
        """DPM-Solver++(3M) SDE (:func:`jaxdiv.samplers.dpmpp_3m_sde`, k-diffusion's
        formula) on the grid of :meth:`dpmpp_2m`. Equals diffusers'
        ``algorithm_type="sde-dpmsolver++", solver_order=3`` on its first- and
        second-order steps; on third-order steps diffusers 0.42 has the opposite sign on
        one half of the ``D2`` weight (see :mod:`jaxdiv.samplers.dpmpp`). NFE is ``N``.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> s = example_pipeline().dpmpp_3m_sde(4, karras=False)
            >>> s.name, s.nfe, s.times.tolist()
            ('dpmpp_3m_sde', 4, [801.0, 601.0, 401.0, 201.0, -1.0])
        """
        return self._dpm_solver(samplers.dpmpp_3m_sde, num_steps, karras, eta=eta)

    def euler(self, num_steps: int = 50, karras: bool | None = None) -> samplers.Sampler:
        """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 with
        ``s(t) = alpha``) on diffusers' Euler grid of this model.

        Reproduces diffusers' ``EulerDiscreteScheduler.from_config(<scheduler config>)``
        (with ``use_karras_sigmas=karras`` when given) on the same model: the grid is
        :func:`~jaxdiv.pipelines.scheduler_config.euler_grid` (its own timestep spacing,
        noise levels interpolated between training timesteps, ending at ``sigma = 0``), so
        the output is the last guided ``x0_hat``. Where diffusers' timestep is fractional
        (``"linspace"`` spacing, Karras levels) the network runs at it and its prediction is
        re-expressed at the step's exact level, as :meth:`dpmpp_2m` explains (guidance
        terms then see that timestep and have their ``x0_hat`` re-expressed too, so
        SPELL's guarantee holds only up to that); ``"leading"`` and ``"trailing"`` grids
        (integer timesteps) run the network at the step's own time. In the
        rescaled variable ``x / alpha`` an Euler step is DDIM's (``eta = 0``) step, so this
        is :func:`jaxdiv.samplers.ddim` on that grid. NFE is ``N``.

        diffusers starts ``"linspace"`` / ``"trailing"`` configs from ``sigma_max z``
        rather than ``sqrt(sigma_max^2 + 1) z`` in its Euler variable (its
        ``init_noise_sigma``), a VP latent of standard deviation ``sigma_max /
        sqrt(sigma_max^2 + 1)`` (0.9977 for SD's betas); jaxdiv starts every sampler from
        the given noise, so diffusers' images for noise ``z`` are jaxdiv's for ``z`` times
        that factor. ``"leading"`` configs (SD 1.x/2.x's) start alike.

        Args:
            num_steps: Euler steps ``N`` (denoiser evaluations per sample).
            karras: diffusers' ``use_karras_sigmas`` (Karras et al. 2022, Eq. 5, rho 7,
                between the first and last level of the spacing); ``None`` takes the
                folder's scheduler config's (off when absent).

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> s = example_pipeline().euler(4)   # leading, steps_offset 1
            >>> s.name, s.nfe, s.times.tolist()
            ('euler', 4, [751.0, 501.0, 251.0, 1.0, -1.0])
        """
        karras = karras if karras is None else validation.boolean("karras", karras)
        return self._on_diffusers_grid("euler", samplers.ddim, euler_grid, num_steps, karras)

    def euler_ancestral(self, num_steps: int = 50) -> samplers.Sampler:
        """Euler ancestral sampling on diffusers' Euler grid of this model: each step goes
        to ``sigma_down`` and adds ``sigma_up z``, ``sigma_up^2 = sigma_next^2 (sigma^2 -
        sigma_next^2) / sigma^2`` (k-diffusion's ``get_ancestral_step`` at eta 1).

        Reproduces diffusers' ``EulerAncestralDiscreteScheduler.from_config(<scheduler
        config>)`` given the same noise (per-sample streams of the run's key), on the grid
        of :meth:`euler` (without Karras levels, as diffusers'). In the rescaled variable
        this step is DDIM's with ``eta = 1`` (Song et al. 2021, Eq. 16: the same
        ``sigma_up`` and ``sigma_down``), so this is :func:`jaxdiv.samplers.ddim` on that
        grid. The initial noise follows :meth:`euler`'s note. NFE is ``N``.

        Example:
            >>> from jaxdiv.testing import example_pipeline
            >>> s = example_pipeline().euler_ancestral(4)
            >>> s.name, s.nfe, s.options.eta
            ('euler_ancestral', 4, 1.0)
        """
        grid = functools.partial(euler_grid, ancestral=True)
        return self._on_diffusers_grid("euler_ancestral", samplers.ddim, grid, num_steps, False,
                                       eta=1.0)  # fmt: skip

    def _dpm_solver(self, factory, num_steps, karras, **kwargs) -> samplers.Sampler:
        """``factory`` on diffusers' DPM-Solver grid, the model at its rounded timesteps."""
        validation.boolean("karras", karras)
        return self._on_diffusers_grid(None, factory, dpm_solver_grid, num_steps, karras,
                                       **kwargs)  # fmt: skip

    def _on_diffusers_grid(self, name, factory, grid, num_steps, karras, **kwargs):
        """``factory`` on the times of ``grid(config, num_steps, karras)``, the network at
        diffusers' model timesteps where they are not the grid's own."""
        with jax.ensure_compile_time_eval():  # as in ddim: a concrete grid under jax.jit
            times, model_times = grid(self.configs["scheduler"], num_steps, karras)
            base = factory(self.schedule, times=times, **kwargs)
        base = base if name is None else base._replace(name=name)
        if np.array_equal(model_times, times[:-1]):
            return base
        options = _ModelTimeOptions(
            base.options, base.step, model_times.astype(np.float32), self.prediction_type
        )
        return base._replace(step=_model_time_step, options=options)


def size_multiple(unet_config: dict, vae_config: dict) -> int:
    """Image heights and widths must be multiples of this for the UNet's down/up path to
    line up: ``vae_scale_factor * 2 ** (levels - 1)`` (64 for SD 1.x/2.x), from the
    ``config.json`` of the ``unet`` and ``vae`` folders (the models' own defaults fill
    missing fields).

    >>> size_multiple({"block_out_channels": [320, 640, 1280, 1280]},
    ...               {"block_out_channels": [128, 256, 512, 512]})
    64
    """
    vae = VAEConfig.from_dict(vae_config)
    unet = UNetConfig.from_dict(unet_config)
    return 2 ** (len(vae.block_out_channels) - 1) * 2 ** (len(unet.block_out_channels) - 1)


class _ModelTimeOptions(NamedTuple):
    """A sampler whose denoiser runs at ``model_times[i]`` instead of ``times[i]``.

    Attributes:
        solver: the wrapped sampler's options.
        step: the wrapped sampler's step function.
        model_times: ``(N,)`` timesteps the network is evaluated at (diffusers' rounded
            timesteps of Karras levels).
        prediction_type: the network's prediction, held fixed when ``x0_hat`` is moved
            from the model timestep to the solver's level.
    """

    solver: Any
    step: Callable
    model_times: Any
    prediction_type: str


def _relevel(x0_hat, x, schedule, t_from, t_to, prediction_type):
    """``x0_hat`` at ``t_from`` -> at ``t_to`` with the network's prediction unchanged
    (diffusers' ``convert_model_output`` with the solver's sigma)."""
    a, s = schedule.alpha(t_from), schedule.sigma(t_from)
    a_to, s_to = schedule.alpha(t_to), schedule.sigma(t_to)
    if prediction_type == "epsilon":
        out = eps_to_x0(x0_to_eps(x0_hat, x, a, s), x, a_to, s_to)
    elif prediction_type == "v_prediction":
        out = v_to_x0(x0_to_v(x0_hat, x, a, s), x, a_to, s_to)
    else:  # "sample": the network's output is x0_hat itself
        out = x0_hat
    return out.astype(x.dtype)


def _model_time_step(sampler, i, x, state, denoise, carry, keys):
    """The wrapped step, its denoiser evaluated at ``model_times[i]`` (see
    :meth:`StableDiffusion.dpmpp_2m`)."""
    opts = sampler.options
    t_model = jnp.asarray(opts.model_times, sampler.times.dtype)[i]

    def at_model_time(xx, t, c):
        x0_hat, c, info = denoise(xx, t_model, c)
        return _relevel(x0_hat, xx, sampler.schedule, t_model, t, opts.prediction_type), c, info

    return opts.step(sampler._replace(options=opts.solver), i, x, state, at_model_time, carry, keys)


# --------------------------------------------------------------------------- loading


def _encode_prompt_fn(text_model, clip_skip):
    apply_encode = pure(text_model, "encode").apply
    default = clip_skip

    def apply(params, tokens, clip_skip=default):
        return apply_encode(params, jnp.asarray(tokens), clip_skip=clip_skip)

    # token ids outside the vocabulary would embed as NaN (or wrap around): refuse them
    # while they are still concrete, before the jitted call hides their values
    check = functools.partial(check_token_ids, vocab_size=text_model.config.vocab_size,
                              name="tokens")  # fmt: skip
    return Bound(apply, pure(text_model).params, ("clip_skip",), check)


def _text_features_fn(text, clip_skip):
    tower = getattr(text, "text_model", text)
    net = pure(tower, "prompt_features")

    def apply(params, tokens, token_embeds=None):
        return net.apply(params, jnp.asarray(tokens), token_embeds, clip_skip=clip_skip)

    return Bound(apply, net.params)


def _check_pixels(images, *_):
    """Images given to ``encode`` / ``encode_image`` eagerly must be floats in ``[-1, 1]``:
    uint8 pixels or a ``0..255`` float image encoded silently to meaningless latents
    (traced images, e.g. GASS's pixel write-back, are not inspected)."""
    if isinstance(images, jax.core.Tracer) or not hasattr(images, "dtype"):
        return
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"images must be floats in [-1, 1], got dtype {images.dtype} (uint8 "
                        "pixels: pass x / 127.5 - 1)")  # fmt: skip
    validation.finite_array("images", images)
    # decoded images overshoot [-1, 1] a little; 0..255 pixels (unless nearly black) by far
    top = float(jnp.max(jnp.abs(images))) if images.size else 0.0
    if top > 5.0:
        raise ValueError(f"images must be in [-1, 1], got values up to |{top:g}| (0..255 "
                         "pixels: pass x / 127.5 - 1)")  # fmt: skip


def _encode_fn(vae):
    net = pure(vae, "encode")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def apply(params, images):
        return (net.apply(params, jnp.asarray(images)).mean - shift) * scale

    return Bound(apply, net.params, check=_check_pixels)


def _decode_fn(vae):
    apply_decode = pure(vae, "decode")
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor

    def apply(params, latents):
        # diffusers: vae.decode(latents / scaling_factor (+ shift_factor))
        return apply_decode.apply(params, jnp.asarray(latents) / scale + shift)

    return Bound(apply, apply_decode.params)


def _unet_fn(unet):
    net = pure(unet)

    def apply(params, x, t, cond):
        return net.apply(params, x, t, cond)

    return Bound(apply, net.params)


def _encode_image_fn(vision, mean, std):
    net = pure(vision)
    size = vision.config.image_size
    projected = hasattr(vision, "visual_projection")

    def apply(params, images):
        images = jnp.asarray(images)
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be NCHW RGB (B, 3, H, W), got shape {images.shape}")
        x = clip_image_preprocess(
            jnp.transpose(images, (0, 2, 3, 1)), size, mean=mean, std=std, input_range=(-1, 1)
        )
        out = net.apply(params, x)
        return out.image_embeds if projected else out.pooler_output

    return Bound(apply, net.params, check=_check_pixels)


def load_image_encoder(root: Path, image_encoder, **load_kw) -> tuple[Bound | None, dict | None]:
    """The pipeline's ``encode_image`` (images NCHW in ``[-1, 1]`` -> CLIP image features,
    preprocessing included) and its config entry, or ``(None, None)``; shared by the SD and
    SD3 loaders. ``image_encoder`` as :func:`jaxdiv.pipelines.folder.image_encoder_folder`;
    ``load_kw`` go to :func:`jaxdiv.models.clip.load_clip_vision`."""
    enc_folder = image_encoder_folder(root, image_encoder)
    if enc_folder is None:
        return None, None
    vision = load_clip_vision(enc_folder, **load_kw)
    mean, std, stats_file = image_preprocess_stats(enc_folder, root)
    config = dict(read_config(enc_folder), _folder=str(enc_folder), _preprocessor=stats_file)
    return _encode_image_fn(vision, mean, std), config


def load(
    path: str | os.PathLike,
    dtype: Any = jnp.float32,
    allow_pickle: bool = False,
    *,
    image_encoder: str | os.PathLike | bool | None = None,
    variant: str | None = None,
    clip_skip: int | None = None,
    attention_implementation: str | None = None,
    check_finite: bool = True,
) -> StableDiffusion:
    """Load a Stable Diffusion 1.x / 2.x pipeline folder (diffusers format, local only).

    Rombach et al. (2022): a latent diffusion model, ``x0_hat`` from the UNet's
    eps / v prediction on the VP process of the scheduler config (Eq. 1 / Sec. 3.3
    conditioning), decoded by the KL autoencoder (Sec. 3.1).

    Args:
        path: pipeline folder (see the module docstring for the layout).
        dtype: compute and weight dtype of every network (``jnp.float32`` or
            ``jnp.bfloat16``).
        allow_pickle: accept pickled ``.bin`` weights where a component has no
            safetensors (refused by default: unpickling can run code).
        image_encoder: ``None`` loads ``<path>/image_encoder`` when present; a path loads
            that folder (a ``CLIPVisionModel[WithProjection]`` or a full ``CLIPModel``
            folder); ``False`` skips it. Preprocessing mean / std come from
            ``<encoder>/preprocessor_config.json``, else
            ``<path>/feature_extractor/preprocessor_config.json``, else OpenAI CLIP's.
        variant: weight-file variant such as ``"fp16"`` (``*.fp16.safetensors``).
        check_finite: refuse weights holding NaN or inf, naming each tensor and file
            (one cheap pass as the weights are read); ``False`` for a folder you trust.
        clip_skip: use the text encoder layer ``clip_skip`` blocks before the last
            (diffusers' ``clip_skip``); ``None`` uses the last hidden state.
        attention_implementation: passed to :func:`~jaxdiv.models.layers.attention_core`
            (``None``/``"xla"``, ``"cudnn"`` for fused GPU kernels in bf16/fp16).

    Returns:
        A :class:`StableDiffusion` record.

    Raises:
        CheckpointError: (a ``ValueError``) the folder is missing, incomplete (every
            missing component is named), holds unsupported component classes, only
            pickled weights without ``allow_pickle``, or tensors that do not match the
            configs (each missing / unexpected / mis-shaped tensor named).
        ValueError: an unsupported scheduler or model config, or components that do not
            fit together (text width vs UNet cross-attention, VAE vs UNet channels).
        TypeError: an argument, or an integer config field, of the wrong type.

    Example:
        >>> pipe = load("stable-diffusion-2-1-base")  # doctest: +SKIP
        >>> s = pipe.ddim(50)  # doctest: +SKIP

        A tiny random folder (:func:`jaxdiv.testing.save_random_pipeline`) loads the same
        way (:func:`jaxdiv.testing.example_pipeline`); a folder without
        ``model_index.json`` fails with a message naming it:

        >>> import tempfile
        >>> from jaxdiv.models.checkpoint import CheckpointError
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
    root = Path(path)
    index = check_pipeline_folder(root)
    scheduler_config = read_scheduler_config(root)
    schedule, prediction_type, grid_kwargs = schedule_from_config(scheduler_config)

    text_config = read_config(root / "text_encoder")
    if text_config.get("use_attention_mask"):
        raise ValueError(
            "text_encoder config: use_attention_mask=True is not supported (SD 1.x/2.x "
            "encode prompts without a padding mask)"
        )
    kw = dict(allow_pickle=allow_pickle, variant=variant, check_finite=check_finite)
    unet = load_unet(
        root / "unet", dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    vae = load_vae(root / "vae", dtype=dtype, **kw)
    text = load_clip_text(
        root / "text_encoder", dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    tokenizer = load_clip_tokenizer(root / "tokenizer")

    width = text.config.hidden_size
    if any(c != width for c in unet.config.cross_attention_dim):
        raise ValueError(
            f"{str(root)!r}: text_encoder hidden_size {width} does not match the unet's "
            f"cross_attention_dim {list(unet.config.cross_attention_dim)}"
        )
    lat = vae.config.latent_channels
    if unet.config.in_channels != lat or unet.config.out_channels != lat:
        raise ValueError(
            f"{str(root)!r}: unet in/out channels ({unet.config.in_channels}, "
            f"{unet.config.out_channels}) must equal the vae latent_channels {lat} "
            "(inpainting / depth UNets with extra input channels are not supported)"
        )
    if clip_skip is not None and not 0 <= clip_skip < text.config.num_hidden_layers:
        raise ValueError(
            f"clip_skip must be in [0, {text.config.num_hidden_layers}), got {clip_skip}"
        )
    max_length = tokenizer.model_max_length
    if max_length is None or max_length > text.config.max_position_embeddings:
        max_length = text.config.max_position_embeddings

    configs = {
        "model_index": index,
        "scheduler": scheduler_config,
        "unet": read_config(root / "unet"),
        "vae": read_config(root / "vae"),
        "text_encoder": text_config,
    }

    encode_image, enc_config = load_image_encoder(
        root, image_encoder, dtype=dtype, attention_implementation=attention_implementation, **kw
    )
    if enc_config is not None:
        configs["image_encoder"] = enc_config

    encode_prompt = _encode_prompt_fn(text, clip_skip)
    empty = tokenize(tokenizer, [""], max_length=max_length)
    # diffusers encodes the negative / empty prompt without clip_skip
    null_cond = encode_prompt(jnp.asarray(empty), clip_skip=None)
    sample_size = unet.config.sample_size
    if isinstance(sample_size, tuple | list):
        sample_size = int(sample_size[0])
    if sample_size is None:
        sample_size = 64
    return StableDiffusion(
        encode_prompt=encode_prompt,
        denoiser=as_denoiser(_unet_fn(unet), schedule, prediction_type),
        decode=_decode_fn(vae),
        encode_image=encode_image,
        tokenizer=tokenizer,
        schedule=schedule,
        null_cond=null_cond,
        prediction_type=prediction_type,
        grid_kwargs=grid_kwargs,
        max_length=int(max_length),
        latent_channels=lat,
        vae_scale_factor=vae.downsample_factor,
        sample_size=int(sample_size),
        configs=configs,
        path=str(root),
        text_features=_text_features_fn(text, clip_skip),
        encode=_encode_fn(vae),
        token_embedding=getattr(text, "text_model", text).embeddings.token_embedding.embedding[...],
        text_projection=(
            text.text_projection.kernel[...] if hasattr(text, "text_projection") else None
        ),
    )
