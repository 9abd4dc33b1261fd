"""diffusers scheduler configs -> jaxdiv VP schedules, prediction types and grid options.

Only the model-defining fields of a ``scheduler_config.json`` are read (betas,
``prediction_type``, ``num_train_timesteps``) plus the grid defaults
(``timestep_spacing``, ``steps_offset``), and, for :func:`ddim_grid` (diffusers' own DDIM
endpoint), ``set_alpha_to_one``. ``clip_sample`` / ``thresholding`` are not applied: a
config that turns either on is refused (SD's configs turn both off).
"""

from __future__ import annotations

import numpy as np

from jaxdiv import schedules, validation
from jaxdiv.predictions import PREDICTION_TYPES

__all__ = ["schedule_from_config", "dpm_solver_grid", "ddim_grid", "euler_grid"]

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")
# a VP scheduler predicts eps, v or x0; "flow" belongs to flow-matching schedulers
_PREDICTIONS = tuple(p for p in PREDICTION_TYPES if p != "flow")


def schedule_from_config(config: dict) -> tuple[schedules.VPSchedule, str, dict]:
    """VP schedule, prediction type and grid options from a diffusers scheduler config.

    ``alphas_cumprod = cumprod(1 - betas)`` (Ho et al. 2020, Eq. 4 notation) with the betas
    of ``trained_betas`` if given, else ``beta_schedule``: ``"linear"``
    (:func:`~jaxdiv.schedules.vp_linear`), ``"scaled_linear"``
    (:func:`~jaxdiv.schedules.vp_scaled_linear`), ``"squaredcos_cap_v2"``
    (:func:`~jaxdiv.schedules.vp_cosine`).

    Args:
        config: parsed ``scheduler/scheduler_config.json``.

    Returns:
        ``(schedule, prediction_type, {"spacing": ..., "steps_offset": ...})``; a missing
        ``timestep_spacing`` means ``"leading"`` and a missing ``steps_offset`` 0 (diffusers'
        defaults for DDIM / PNDM).

    Raises:
        TypeError: ``config`` is not a dict, or ``num_train_timesteps`` / ``steps_offset``
            is not an integer.
        ValueError: unknown ``beta_schedule`` / ``prediction_type`` / ``timestep_spacing``,
            ``rescale_betas_zero_snr=True`` (a zero-SNR model needs ``alpha(T-1) = 0``,
            which the VP schedules here do not represent), or ``clip_sample=True`` /
            ``thresholding=True`` (not applied here).

    Example:
        >>> sch, pred, grid = schedule_from_config({"beta_schedule": "scaled_linear",
        ...     "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1,
        ...     "prediction_type": "v_prediction"})
        >>> round(float(sch.alpha(999.0)), 4), pred, grid
        (0.0683, 'v_prediction', {'spacing': 'leading', 'steps_offset': 1})
    """
    if not isinstance(config, dict):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    T = config.get("num_train_timesteps", 1000)
    T = validation.integer("scheduler config: num_train_timesteps", T, minimum=2)
    if config.get("rescale_betas_zero_snr", False):
        raise ValueError(
            "scheduler config: rescale_betas_zero_snr=True is not supported (zero terminal "
            "SNR makes alpha(T-1) = 0)"
        )
    for flag, what in (("clip_sample", "clips x0_hat to [-clip_sample_range, "
                                       "clip_sample_range]"),
                       ("thresholding", "applies dynamic thresholding to x0_hat")):  # fmt: skip
        # diffusers would change every x0_hat; we would not
        if validation.boolean(f"scheduler config: {flag}", config.get(flag, False)):
            raise ValueError(f"scheduler config: {flag}=True is not supported (diffusers "
                             f"{what} at every step, jaxdiv does not); set it to false in "
                             "scheduler_config.json to run the model without it")  # fmt: skip
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    b0, b1 = (validation.number(f"scheduler config: {name}", config.get(name, default), lo=0,
                                hi=1, lo_open=True, hi_open=True)
              for name, default in (("beta_start", 0.0001), ("beta_end", 0.02)))
    if trained is not None:
        betas = np.asarray(trained, np.float32)
        if betas.shape != (T,):
            raise ValueError(
                f"scheduler config: trained_betas must have num_train_timesteps={T} entries, "
                f"got shape {betas.shape}"
            )
        sch = schedules.vp_from_betas(betas, "vp_trained")
    elif kind == "linear":
        sch = schedules.vp_linear(b0, b1, T)
    elif kind == "scaled_linear":
        sch = schedules.vp_scaled_linear(b0, b1, T)
    elif kind == "squaredcos_cap_v2":
        sch = schedules.vp_cosine(T)
    else:
        raise ValueError(
            f"scheduler config: beta_schedule must be one of {_BETA_SCHEDULES} (or "
            f"trained_betas given), got {kind!r}"
        )
    pred = config.get("prediction_type", "epsilon")
    pred = validation.choice("scheduler config: prediction_type", pred, _PREDICTIONS)
    spacing = config.get("timestep_spacing") or "leading"
    spacing = validation.choice("scheduler config: timestep_spacing", spacing, _SPACINGS)
    offset = config.get("steps_offset", 0) or 0
    offset = validation.integer("scheduler config: steps_offset", offset, minimum=0)
    return sch, pred, {"spacing": spacing, "steps_offset": offset}


def dpm_solver_grid(config: dict, num_steps: int, karras: bool = False):
    """diffusers' ``DPMSolverMultistepScheduler`` grid for a scheduler config, as VP times.

    A NumPy transcription of ``DPMSolverMultistepScheduler.from_config(config,
    use_karras_sigmas=karras).set_timesteps(num_steps)`` (diffusers 0.3x, with the
    default ``final_sigmas_type="zero"``). Its spacing rules differ from DDIM's
    (:meth:`~jaxdiv.schedules.VPSchedule.grid`): with ``T`` train steps (less the
    ``lambda_min_clipped`` tail),

    * ``"linspace"``: ``round(linspace(0, T - 1, N + 1))`` reversed, without the final 0;
    * ``"leading"``: ``arange(N + 1) * (T // (N + 1))`` reversed, without the final 0,
      plus ``steps_offset``;
    * ``"trailing"``: ``round(arange(T, 0, -T / N)) - 1`` (as DDIM's).

    With ``karras=True`` the spacing is ignored: the noise levels are Karras et al.'s
    (2022, Eq. 5, ``rho = 7``) from ``noise_level(T - 1)`` to ``noise_level(0)`` and the
    model is evaluated at diffusers' timestep of each level (log-sigma interpolation,
    rounded; truncated, not rounded, for ``squaredcos_cap_v2``), while the solver uses
    the level itself.

    Args:
        config: parsed ``scheduler/scheduler_config.json``.
        num_steps: number of solver steps ``N``.
        karras: diffusers' ``use_karras_sigmas``.

    Returns:
        ``(times, model_times)``: float64 ``(N + 1,)`` decreasing VP times whose
        ``noise_level`` is diffusers' ``sigmas`` (fractional with ``karras``; the last is
        the clean endpoint ``-1``), and int64 ``(N,)`` timesteps diffusers passes to the
        model (``== times[:-1]`` without ``karras``).

    Raises:
        ValueError: the grid has repeated timesteps (too many steps for the spacing) or
            steps past ``T - 1``.

    Example:
        >>> from jaxdiv.testing import TINY_SCHEDULER
        >>> times, model_times = dpm_solver_grid(TINY_SCHEDULER, 4)   # leading, offset 1
        >>> times.tolist(), model_times.tolist()
        ([801.0, 601.0, 401.0, 201.0, -1.0], [801, 601, 401, 201])
        >>> times, model_times = dpm_solver_grid(TINY_SCHEDULER, 4, karras=True)
        >>> [round(float(t), 2) for t in times], model_times.tolist()
        ([999.0, 687.15, 145.94, 0.0, -1.0], [999, 687, 146, 0])
    """
    sch, _, grid = schedule_from_config(config)
    n = validation.integer("num_steps", num_steps, minimum=1)
    abar = np.asarray(sch.alphas_cumprod, np.float32)
    T = abar.shape[0]
    # diffusers computes these in float32 torch
    sigmas = np.sqrt((np.float32(1) - abar) / abar).astype(np.float32)
    lam = (np.log(np.sqrt(abar)) - np.log(np.sqrt(np.float32(1) - abar))).astype(np.float32)
    lmin = validation.number("scheduler config: lambda_min_clipped",
                             config.get("lambda_min_clipped", -np.inf), allow_inf=True)
    last = T - int(np.searchsorted(lam[::-1], lmin))
    if karras:
        levels = _karras_levels(float(sigmas[-1]), float(sigmas[0]), n)
        model_t = _sigma_to_t(levels, np.log(sigmas).astype(np.float64))
        if config.get("beta_schedule") != "squaredcos_cap_v2":  # as diffusers, trained or not
            model_t = model_t.round()
        model_times = model_t.astype(np.int64)
        times = _times_of_levels(abar, levels.astype(np.float32))
    else:
        spacing, offset = grid["spacing"], grid["steps_offset"]
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            ts = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64)
            ts = ts + offset
        else:  # trailing
            ts = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
        if ts.shape[0] != n or np.any(np.diff(ts) >= 0) or ts.max() > T - 1:
            raise ValueError(
                f"num_steps={n} gives no strictly decreasing DPM-Solver grid within "
                f"[0, {T - 1}] for timestep_spacing={spacing!r}, steps_offset={offset}"
            )
        model_times, times = ts, ts.astype(np.float64)
    return np.append(times, float(sch.t_clean)), model_times


def ddim_grid(config: dict, num_steps: int):
    """diffusers' ``DDIMScheduler`` steps for a scheduler config, as VP times.

    A NumPy transcription of ``DDIMScheduler.from_config(config).set_timesteps(N)`` and of
    its ``step``: the model is evaluated at ``timesteps[i]`` (the config's
    ``timestep_spacing`` / ``steps_offset``, as :meth:`~jaxdiv.schedules.VPSchedule.grid`)
    and each step goes to ``prev = timesteps[i] - T // N`` (Song et al. 2021, Eq. 12 with
    ``alpha_prev = alphas_cumprod[prev]``), or, when ``prev < 0``, to
    ``final_alpha_cumprod``: 1 (the clean endpoint, VP time ``-1``) with
    ``set_alpha_to_one=True`` (diffusers' default) and ``alphas_cumprod[0]`` (VP time
    ``0``) with ``set_alpha_to_one=False``, as released SD 1.x/2.x configs say. For
    ``"linspace"`` spacing and for ``"trailing"`` when ``T / N`` is not an integer, ``prev``
    is not the next evaluation time: the next step feeds the model ``x`` at ``prev``
    labelled with the next timestep, as diffusers does.

    Args:
        config: parsed ``scheduler/scheduler_config.json``.
        num_steps: number of DDIM steps ``N``.

    Returns:
        ``(times, targets)``: float64 ``(N + 1,)`` evaluation times followed by the last
        target, and float64 ``(N,)`` targets ``prev`` of each step (``-1`` the clean
        endpoint), for ``samplers.ddim(schedule, times=times, targets=targets)``.

    Raises:
        ValueError: repeated timesteps (too many steps for the spacing) or steps past
            ``T - 1``.

    Example:
        >>> times, targets = ddim_grid(dict(timestep_spacing="trailing",
        ...                                 set_alpha_to_one=False), 3)
        >>> times.tolist(), targets.tolist()
        ([999.0, 666.0, 332.0, 0.0], [666.0, 333.0, 0.0])
    """
    sch, _, grid = schedule_from_config(config)
    n = validation.integer("num_steps", num_steps, minimum=1)
    T = sch.num_train_timesteps
    if n > T:
        raise ValueError(f"num_steps must be <= num_train_timesteps={T}, got {n}")
    spacing, offset = grid["spacing"], grid["steps_offset"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + offset
    else:  # trailing
        ts = np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1
    if ts.shape[0] != n or np.any(np.diff(ts) >= 0) or ts.max() > T - 1:
        raise ValueError(
            f"num_steps={n} gives no strictly decreasing DDIM grid within [0, {T - 1}] for "
            f"timestep_spacing={spacing!r}, steps_offset={offset}"
        )
    final = -1.0 if config.get("set_alpha_to_one", True) else 0.0
    prev = (ts - T // n).astype(np.float64)
    targets = np.where(prev >= 0, prev, final)
    return np.append(ts.astype(np.float64), targets[-1]), targets


def _karras_levels(s_max, s_min, n, rho=7.0):
    """diffusers' ``_convert_to_karras``: Karras et al. (2022) Eq. 5 from ``s_max`` to
    ``s_min`` in ``n`` levels (float64)."""
    ramp = np.linspace(0, 1, n)
    return (s_max ** (1 / rho) + ramp * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho


def _sigma_to_t(levels, log_sigmas):
    """diffusers' ``_sigma_to_t``: the timestep of each level, linear in log sigma between
    neighbouring training timesteps (in ``log_sigmas``' arithmetic, as diffusers)."""
    log_s = np.log(np.maximum(levels, 1e-10))
    dists = log_s[None, :] - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_s) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def _times_of_levels(abar, levels):
    """VP times whose ``noise_level`` is ``levels`` (diffusers' float32 sigmas): jaxdiv's
    interpolation of ``alphas_cumprod`` (linear in t) inverted there, in float64."""
    a = 1.0 / (1.0 + np.asarray(levels).astype(np.float64) ** 2)
    ab = np.asarray(abar, np.float64)
    T = ab.shape[0]
    k = np.clip(np.searchsorted(-ab, -a), 1, T - 1)
    return np.clip(k - 1 + (ab[k - 1] - a) / (ab[k - 1] - ab[k]), 0.0, T - 1.0)


# EulerDiscreteScheduler options (diffusers' defaults) that euler_grid does not transcribe:
# a config asking for another value would give diffusers another grid or step
_EULER_DEFAULTS = {
    "interpolation_type": "linear",
    "final_sigmas_type": "zero",
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "timestep_type": "discrete",
    "sigma_min": None,
    "sigma_max": None,
}


def euler_grid(config: dict, num_steps: int, karras: bool | None = None, *,
               ancestral: bool = False):  # fmt: skip
    """diffusers' ``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler`` grid for
    a scheduler config, as VP times.

    A NumPy transcription of ``EulerDiscreteScheduler.from_config(config,
    use_karras_sigmas=karras).set_timesteps(N)`` (``EulerAncestralDiscreteScheduler``
    builds the same grid, without ``karras``). Its timesteps differ from DDIM's and
    DPM-Solver's: ``"linspace"`` keeps the fractional ``linspace(0, T - 1, N)``,
    ``"leading"`` is ``arange(N) * (T // N) + steps_offset`` and ``"trailing"``
    ``round(arange(T, 0, -T / N)) - 1``; the noise levels ``sigmas`` interpolate
    ``sqrt((1 - abar) / abar)`` linearly in the timestep and end at 0. With ``karras=True``
    they are Karras et al.'s (2022, Eq. 5, ``rho = 7``) between the first and last of
    those levels, and the model runs at each level's timestep by log-sigma interpolation
    (fractional, not rounded).

    Args:
        config: parsed ``scheduler/scheduler_config.json``; Euler options other than
            diffusers' defaults (``interpolation_type``, ``final_sigmas_type``,
            exponential / beta sigmas, continuous timesteps, ``sigma_min`` /
            ``sigma_max``) are refused.
        num_steps: Euler steps ``N``.
        karras: diffusers' ``use_karras_sigmas``; ``None`` takes the config's (off when
            absent, as ``EulerDiscreteScheduler.from_config(config)``).
        ancestral: ``EulerAncestralDiscreteScheduler``'s grid, which has none of those
            options (a config's values for them are ignored, as there) and no ``karras``.

    Returns:
        ``(times, model_times)``: float64 ``(N + 1,)`` decreasing VP times whose
        ``noise_level`` is diffusers' float32 ``sigmas`` (the last is the clean endpoint
        ``-1``), and float32 ``(N,)`` timesteps diffusers passes to the model. Integer
        timesteps are the times themselves (their levels are those of jaxdiv's
        ``alphas_cumprod``, a few float32 ulps from torch's), so the network runs at the
        step's own time; fractional ones differ from the times.

    Raises:
        ValueError: a refused option, or repeated timesteps (too many steps for the
            spacing) or steps past ``T - 1``.

    Example:
        >>> from jaxdiv.testing import TINY_SCHEDULER
        >>> times, model_times = euler_grid(TINY_SCHEDULER, 4)   # leading, offset 1
        >>> times.tolist(), model_times.tolist()
        ([751.0, 501.0, 251.0, 1.0, -1.0], [751.0, 501.0, 251.0, 1.0])
        >>> times, model_times = euler_grid(dict(TINY_SCHEDULER, timestep_spacing="linspace"), 4)
        >>> [round(float(t), 2) for t in times], model_times.tolist()
        ([999.0, 666.0, 333.0, 0.0, -1.0], [999.0, 666.0, 333.0, 0.0])
    """
    sch, _, grid = schedule_from_config(config)
    n = validation.integer("num_steps", num_steps, minimum=1)
    if validation.boolean("ancestral", ancestral):
        if karras:
            raise ValueError("karras=True: the Euler ancestral scheduler has no Karras levels")
        karras = False
    elif karras is None:
        karras = validation.boolean("scheduler config: use_karras_sigmas",
                                    config.get("use_karras_sigmas", False))  # fmt: skip
    validation.boolean("karras", karras)
    for key, default in {} if ancestral else _EULER_DEFAULTS.items():
        if config.get(key, default) != default:
            raise ValueError(
                f"scheduler config: {key}={config[key]!r} is not supported by the Euler "
                f"samplers (diffusers' default {default!r} is transcribed)"
            )
    abar = np.asarray(sch.alphas_cumprod, np.float32)
    T = abar.shape[0]
    spacing, offset = grid["spacing"], grid["steps_offset"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1]
    elif spacing == "leading":
        ts = (np.arange(0, n) * (T // n)).round()[::-1].astype(np.float32) + offset
    else:  # trailing
        ts = np.arange(T, 0, -T / n).round().astype(np.float32) - 1
    if ts.shape[0] != n or np.any(np.diff(ts) >= 0) or ts.max() > T - 1 or ts.min() < 0:
        raise ValueError(
            f"num_steps={n} gives no strictly decreasing Euler grid within [0, {T - 1}] for "
            f"timestep_spacing={spacing!r}, steps_offset={offset}"
        )
    # diffusers computes the training levels in float32 torch, then interpolates in float64
    train = np.sqrt((np.float32(1) - abar) / abar).astype(np.float32)
    levels = np.interp(ts.astype(np.float64), np.arange(T), train)
    if karras:
        levels = _karras_levels(levels[0], levels[-1], n)
        ts = _sigma_to_t(levels, np.log(train))
    if not karras and np.array_equal(ts, np.round(ts)):
        # integer timesteps are VP times of their own: the network runs at the step's time
        times = ts.astype(np.float64)
    else:
        times = _times_of_levels(abar, levels.astype(np.float32))
    return np.append(times, float(sch.t_clean)), ts.astype(np.float32)
