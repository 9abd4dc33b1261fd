"""diffusers scheduler configs -> jaxdiv VP schedules, prediction types and grid options.

Only the model-defining fields of a ``scheduler_config.json`` are read (betas,
``prediction_type``, ``num_train_timesteps``) plus the grid defaults
(``timestep_spacing``, ``steps_offset``). Sampling-time options of diffusers' schedulers are
not: jaxdiv's samplers always end at the clean endpoint ``alpha = 1`` (diffusers'
``set_alpha_to_one=True``), and ``clip_sample`` / ``thresholding`` are not applied (SD's
configs turn both off).
"""

from __future__ import annotations

import numpy as np

from jaxdiv import schedules, validation
from jaxdiv.predictions import PREDICTION_TYPES

__all__ = ["schedule_from_config"]

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
            or ``rescale_betas_zero_snr=True`` (a zero-SNR model needs ``alpha(T-1) = 0``,
            which the VP schedules here do not represent).

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
    trained = config.get("trained_betas")
    kind = config.get("beta_schedule", "linear")
    b0 = float(config.get("beta_start", 0.0001))
    b1 = float(config.get("beta_end", 0.02))
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
