"""Noise processes ``x_t = alpha(t) * x0 + sigma(t) * eps`` and their sampling grids.

Three families cover every sampler in jaxdiv:

* :func:`vp_linear`, :func:`vp_scaled_linear`, :func:`vp_cosine` — discrete variance
  preserving (DDPM / Stable Diffusion) processes indexed by the training timestep
  ``t in {0, ..., T-1}``; ``alpha^2 = alphas_cumprod[t]``.
* :func:`edm` — the variance exploding process of Karras et al. (2022), ``alpha = 1``,
  ``sigma = t``.
* :func:`flow` — rectified flow, ``alpha = 1 - t``, ``sigma = t`` (SD3 with ``shift=3``).

Every schedule is a NamedTuple, hence a pytree: its numeric fields can be traced, so
``jax.grad`` flows through a schedule parameter (e.g. EDM's ``rho``) into the samples.

Each schedule's ``grid(num_steps)`` returns ``num_steps + 1`` decreasing times whose last
entry is the *clean endpoint* (``alpha = 1``, ``sigma = 0``): ``0`` for EDM and flow, and
``-1`` for the discrete VP processes, where we define ``alphas_cumprod[-1] = 1`` (the
"final alpha" of diffusers' DDIM with ``set_alpha_to_one=True``). Ending every grid there
is what makes a sampler's output equal its last (guided) ``x0_hat``.

The *noise level* ``sigma(t) / alpha(t)`` is the process-independent measure of noise
(the EDM sigma of the rescaled variable ``x_t / alpha``); time windows and interval
guidance are expressed in it so that they mean the same on every process.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdiv import validation
from jaxdiv.dtypes import as_float, working_dtype

__all__ = [
    "VPSchedule",
    "EDMSchedule",
    "FlowSchedule",
    "vp_linear",
    "vp_scaled_linear",
    "vp_cosine",
    "vp_from_betas",
    "edm",
    "flow",
    "karras_sigmas",
]


def _is_abstract(t) -> bool:
    """True for a shape-only stand-in (``jax.eval_shape``) whose values do not exist."""
    return isinstance(t, jax.ShapeDtypeStruct)


class VPSchedule(NamedTuple):
    """Discrete variance-preserving process (DDPM, Stable Diffusion).

    ``alpha(t)^2 = alphas_cumprod[t]``; fractional ``t`` interpolates ``alphas_cumprod``
    linearly (exact at integers); ``t = -1`` is the clean endpoint (``alpha = 1``).

    >>> s = vp_linear()                      # DDPM's; Stable Diffusion's: vp_scaled_linear()
    >>> s.num_train_timesteps, float(s.alpha(-1)), float(s.sigma(-1))
    (1000, 1.0, 0.0)
    >>> bool(abs(s.alpha(10) ** 2 - s.alphas_cumprod[10]) < 1e-7)
    True
    """

    alphas_cumprod: jax.Array
    name: str = "vp"

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]

    @property
    def t_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def t_clean(self) -> float:
        return -1.0

    @property
    def time_range(self) -> tuple[float, float]:
        """``(-1, T - 1)``: the times the process is defined on (``-1`` the clean end)."""
        return -1.0, self.t_max

    def check_times(self, t, name: str = "t"):
        """Refuse concrete times outside ``[-1, T - 1]`` (or NaN) instead of clamping them.

        ``alphas_cumprod`` is only defined on the training timesteps (``-1`` being the
        clean endpoint); :meth:`alpha` and :meth:`sigma` call this on concrete inputs.
        Traced times cannot be inspected and are clamped to the range by interpolation.

        >>> vp_linear().check_times([5000.0, 10.0])
        Traceback (most recent call last):
        ...
        ValueError: t must lie in [-1, 999] (the schedule's timesteps, -1 the clean endpoint), got 5000.0
        """  # noqa: E501
        if not validation.is_concrete(t) or _is_abstract(t):
            return
        arr = np.atleast_1d(np.asarray(t, np.float64))
        bad = arr[~((arr >= -1.0) & (arr <= self.t_max))]  # NaN fails both comparisons
        if bad.size:
            raise ValueError(
                f"{name} must lie in [-1, {self.t_max:g}] (the schedule's timesteps, -1 the "
                f"clean endpoint), got {', '.join(str(float(b)) for b in np.ravel(bad)[:5])}"
            )

    def _abar(self, t):
        self.check_times(t)
        t = as_float(t)
        ext = jnp.concatenate([jnp.ones((1,), self.alphas_cumprod.dtype), self.alphas_cumprod])
        return _interp_unit_grid(t, -1.0, ext)

    def alpha(self, t):
        """``sqrt(alphas_cumprod[t])``, vectorised over ``t``."""
        return jnp.sqrt(self._abar(t))

    def sigma(self, t):
        """``sqrt(1 - alphas_cumprod[t])``, vectorised over ``t``."""
        return jnp.sqrt(jnp.clip(1.0 - self._abar(t), 0.0, None))

    def noise_level(self, t):
        """``sigma(t) / alpha(t)``."""
        return self.sigma(t) / self.alpha(t)

    def t_of_noise_level(self, level):
        """Inverse of :meth:`noise_level` (piecewise linear between integer timesteps)."""
        level = as_float(level)
        grid = jnp.arange(-1, self.num_train_timesteps, dtype=level.dtype)
        return jnp.interp(level, self.noise_level(grid), grid)

    def init_noise_scale(self, t):
        """Scale of the initial noise: 1, as in diffusers (``x_T = noise``)."""
        del t
        return jnp.float32(1.0)

    def grid(self, num_steps: int, spacing: str = "trailing", steps_offset: int = 0):
        """``num_steps + 1`` decreasing timesteps ending at the clean endpoint ``-1``.

        ``spacing`` follows diffusers' ``timestep_spacing``: ``"trailing"`` starts at
        ``T - 1`` (recommended, Lin et al. 2024), ``"leading"`` is SD's original
        ``arange(N) * (T // N) + steps_offset``, ``"linspace"`` rounds ``linspace(0, T-1, N)``.

        >>> s = vp_linear()
        >>> s.grid(4).tolist()
        [999.0, 749.0, 499.0, 249.0, -1.0]
        """
        validation.integer("num_steps", num_steps, minimum=1)
        T = self.num_train_timesteps
        if num_steps > T:
            raise ValueError(f"num_steps must be <= num_train_timesteps={T}, got {num_steps}")
        if spacing == "trailing":
            ts = np.round(np.arange(T, 0, -T / num_steps)).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(num_steps) * (T // num_steps))[::-1] + steps_offset
        elif spacing == "linspace":
            ts = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        else:
            raise ValueError(
                f"spacing must be 'trailing', 'leading' or 'linspace', got {spacing!r}"
            )
        if ts.max() > T - 1:
            raise ValueError(f"steps_offset={steps_offset} pushes timesteps past T-1={T - 1}")
        return as_float(np.append(ts, -1))


def _interp_unit_grid(x, x0: float, fp):
    """``jnp.interp(x, x0 + arange(len(fp)), fp)`` on a unit grid starting at the integer
    ``x0``, with the same floating-point operations but the interval found by ``floor``
    instead of ``searchsorted``: XLA compiles each ``searchsorted`` as a while loop of its
    own (one per ``alpha``/``sigma`` call in a sampler step), which lengthens every compile.

    >>> fp = jnp.array([1.0, 0.5, 0.0])
    >>> _interp_unit_grid(jnp.array([-2.0, -0.5, 0.25, 3.0]), -1.0, fp).tolist()
    [1.0, 0.75, 0.375, 0.0]
    """
    n = fp.shape[0]
    # jnp.interp's i = searchsorted(xp, x, side="right") clipped to [1, n - 1]; floor(x)
    # is exact, floor(x - x0) could round across a grid point
    i = jnp.clip((jnp.floor(x) - x0).astype(jnp.int32) + 1, 1, n - 1)
    delta = x - (x0 + (i - 1).astype(x.dtype))
    f = fp[i - 1] + delta * (fp[i] - fp[i - 1])
    f = jnp.where(x < x0, fp[0], f)
    return jnp.where(x > x0 + (n - 1), fp[-1], f)


def vp_from_betas(betas, name: str = "vp") -> VPSchedule:
    """Discrete VP schedule from a beta sequence: ``alphas_cumprod = cumprod(1 - betas)``.

    >>> round(float(vp_from_betas(np.full(10, 0.1)).alpha(0.0)), 4)
    0.9487
    """
    betas = np.asarray(betas, np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas must be a 1-D array of length >= 2, got shape {betas.shape}")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must lie in (0, 1)")
    # float64 cumprod then float32, as diffusers does (torch.cumprod on float32 betas
    # differs only in the last ulp; we match the float64 value); float64 kept under x64
    return VPSchedule(as_float(np.cumprod(1.0 - betas)), name)


def vp_linear(beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000) -> VPSchedule:
    """DDPM linear betas (Ho et al. 2020, Sec. 4): ``betas = linspace(beta_start, beta_end, T)``.

    >>> round(float(vp_linear().alpha(999.0)), 5)
    0.00635
    """
    validation.integer("num_train_timesteps", num_train_timesteps, minimum=1)
    betas = np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float32)
    return vp_from_betas(betas, "vp_linear")


def vp_scaled_linear(beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000) -> VPSchedule:
    """Stable Diffusion's "scaled_linear" betas: ``linspace(sqrt(b0), sqrt(b1), T)**2``.

    >>> round(float(vp_scaled_linear().alpha(999.0)), 4)
    0.0683
    """
    validation.integer("num_train_timesteps", num_train_timesteps, minimum=1)
    betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float32) ** 2
    return vp_from_betas(betas, "vp_scaled_linear")


def vp_cosine(num_train_timesteps=1000, s=0.008, max_beta=0.999) -> VPSchedule:
    """Cosine schedule (Nichol & Dhariwal 2021, Eq. 17): ``abar(t) = f(t)/f(0)``,
    ``f(t) = cos((t/T + s)/(1 + s) * pi/2)^2``, betas clipped at ``max_beta``
    (diffusers' ``squaredcos_cap_v2``).

    >>> float(vp_cosine().alpha(0.0)) > 0.99
    True
    """
    validation.integer("num_train_timesteps", num_train_timesteps, minimum=1)
    T = num_train_timesteps

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
    return vp_from_betas(np.asarray(betas), "vp_cosine")


def karras_sigmas(num_steps, sigma_min, sigma_max, rho):
    """Karras et al. (2022) Eq. 5: ``(smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``.

    Returns ``num_steps`` decreasing sigmas (without the final 0). Differentiable in
    ``sigma_min``, ``sigma_max`` and ``rho``.

    >>> [round(float(v), 3) for v in karras_sigmas(18, 0.002, 80.0, 7.0)[:2]]
    [80.0, 57.586]
    """
    validation.integer("num_steps", num_steps, minimum=1)
    if num_steps == 1:
        return jnp.reshape(as_float(sigma_max), (1,))
    ramp = jnp.linspace(0.0, 1.0, num_steps, dtype=working_dtype(float))
    inv_rho = 1.0 / as_float(rho)
    lo = as_float(sigma_min) ** inv_rho
    hi = as_float(sigma_max) ** inv_rho
    return (hi + ramp * (lo - hi)) ** as_float(rho)


class EDMSchedule(NamedTuple):
    """Variance-exploding process of Karras et al. (2022): ``alpha = 1``, ``sigma = t``.

    >>> s = edm()
    >>> float(s.alpha(3.0)), float(s.sigma(3.0)), round(float(s.grid(4)[0]), 3)  # sigma_max
    (1.0, 3.0, 80.0)
    """

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    name: str = "edm"

    @property
    def t_clean(self) -> float:
        return 0.0

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0, inf)``: every ``sigma >= 0`` (the sampler's grid starts at ``sigma_max``)."""
        return 0.0, math.inf

    def alpha(self, t):
        """``1``, vectorised over ``t``."""
        return jnp.ones_like(as_float(t))

    def sigma(self, t):
        """``t``, vectorised."""
        return as_float(t)

    def noise_level(self, t):
        """``sigma / alpha = t``."""
        return as_float(t)

    def t_of_noise_level(self, level):
        """Identity: the EDM time is the noise level."""
        return as_float(level)

    def init_noise_scale(self, t):
        """``sigma(t_0)``: Karras Alg. 2 line 1, ``x_0 ~ N(0, sigma_max^2 I)``."""
        return self.sigma(t)

    def grid(self, num_steps: int):
        """Karras grid (Eq. 5) plus the final ``t_N = 0``.

        >>> [round(float(v), 6) for v in edm().grid(18)[-4:]]
        [0.022935, 0.007528, 0.002, 0.0]
        """
        s = karras_sigmas(num_steps, self.sigma_min, self.sigma_max, self.rho)
        return jnp.concatenate([s, jnp.zeros((1,), s.dtype)])


def edm(sigma_min=0.002, sigma_max=80.0, rho=7.0) -> EDMSchedule:
    """EDM / VE process (Karras et al. 2022, Table 1): ``x_t = x0 + t * eps``.

    >>> edm().sigma(3.0)
    Array(3., dtype=float32)
    """
    concrete = {k: validation.is_concrete(v) for k, v in
                (("sigma_min", sigma_min), ("sigma_max", sigma_max), ("rho", rho))}  # fmt: skip
    if concrete["sigma_min"]:
        validation.number("sigma_min", sigma_min, lo=0, lo_open=True)
    if concrete["sigma_max"]:
        validation.number("sigma_max", sigma_max, lo=0, lo_open=True)
    if concrete["sigma_min"] and concrete["sigma_max"]:
        if not (0 < float(sigma_min) < float(sigma_max)):
            raise ValueError(
                f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}"
            )
    if concrete["rho"]:
        validation.number("rho", rho, lo=0, lo_open=True)
    if all(concrete.values()):
        _check_karras_range(float(sigma_min), float(sigma_max), float(rho))
    return EDMSchedule(sigma_min, sigma_max, rho)


def _check_karras_range(sigma_min: float, sigma_max: float, rho: float) -> None:
    """Eq. 5 raises both ends to ``1 / rho`` in float32: name ``rho`` when that overflows
    or underflows (the grid would be NaN, or not strictly decreasing)."""
    with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
        inv = np.float32(1.0) / np.float32(rho)
        hi = np.float32(sigma_max) ** inv
        lo = np.float32(sigma_min) ** inv
        back_hi, back_lo = hi ** np.float32(rho), lo ** np.float32(rho)
    ok = all(np.isfinite(v) and v > 0 for v in (hi, lo, back_hi, back_lo))
    if not ok:
        raise ValueError(
            f"rho={rho} is too small for sigma_min={sigma_min}, sigma_max={sigma_max}: "
            "the Karras grid (Eq. 5) raises them to the power 1/rho, which over- or "
            f"underflows float32 (sigma_max**(1/rho) = {float(hi)}, sigma_min**(1/rho) = "
            f"{float(lo)}); use a larger rho (7 is the EDM default)"
        )


class FlowSchedule(NamedTuple):
    """Rectified flow: ``x_t = (1 - t) x0 + t eps``, velocity ``v = eps - x0``.

    >>> s = flow()
    >>> float(s.alpha(0.25)), float(s.sigma(0.25))
    (0.75, 0.25)
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    name: str = "flow"

    @property
    def t_clean(self) -> float:
        return 0.0

    @property
    def time_range(self) -> tuple[float, float]:
        """``(0, 1)``: from the clean end to pure noise."""
        return 0.0, 1.0

    def check_times(self, t, name: str = "t"):
        """Refuse concrete times outside ``[0, 1]`` (or NaN): past ``t = 1`` (pure noise)
        ``alpha = 1 - t`` turns negative, a process that does not exist. Samplers call this
        on their grids; traced times cannot be inspected.

        >>> flow().check_times([1.5, 0.5, 0.0], "times")
        Traceback (most recent call last):
        ...
        ValueError: times must lie in [0, 1] (t = 1 is pure noise, alpha = 1 - t), got 1.5
        """
        if not validation.is_concrete(t) or _is_abstract(t):
            return
        arr = np.atleast_1d(np.asarray(t, np.float64))
        bad = arr[~((arr >= 0.0) & (arr <= 1.0))]  # NaN fails both comparisons
        if bad.size:
            got = ", ".join(f"{float(b):g}" for b in np.ravel(bad)[:5])
            raise ValueError(f"{name} must lie in [0, 1] (t = 1 is pure noise, alpha = 1 - t), "
                             f"got {got}")  # fmt: skip

    def alpha(self, t):
        """``1 - t``."""
        return 1.0 - as_float(t)

    def sigma(self, t):
        """``t``."""
        return as_float(t)

    def noise_level(self, t):
        """``t / (1 - t)``."""
        t = as_float(t)
        return t / (1.0 - t)

    def t_of_noise_level(self, level):
        """``t = level / (1 + level)``."""
        level = as_float(level)
        return level / (1.0 + level)

    def init_noise_scale(self, t):
        """1: at ``t = 1`` the process is pure noise."""
        del t
        return jnp.float32(1.0)

    def apply_shift(self, s):
        """SD3 time shift ``s' = k s / (1 + (k - 1) s)`` (Esser et al. 2024, Eq. 23)."""
        k = as_float(self.shift)
        return k * s / (1.0 + (k - 1.0) * s)

    def grid(self, num_steps: int):
        """diffusers' ``FlowMatchEulerDiscreteScheduler`` grid, reproduced exactly.

        diffusers builds ``linspace(sigma_max, sigma_min, N)`` from the *already shifted*
        training sigmas (so ``sigma_min = shift(1/T)``) and then shifts again; we do the
        same so SD3's 28-step grid matches it.

        >>> [round(float(v), 5) for v in flow(shift=3.0).grid(28)[-3:]]
        [0.11091, 0.00893, 0.0]
        """
        validation.integer("num_steps", num_steps, minimum=1)
        smin = self.apply_shift(as_float(1.0 / self.num_train_timesteps))
        smax = self.apply_shift(as_float(1.0))
        s = jnp.linspace(smax, smin, num_steps, dtype=working_dtype(float))
        s = self.apply_shift(s)
        return jnp.concatenate([s, jnp.zeros((1,), s.dtype)])


def flow(shift=1.0, num_train_timesteps=1000) -> FlowSchedule:
    """Rectified-flow process (Liu et al. 2023; SD3 uses ``shift=3``).

    >>> fl = flow(); float(fl.alpha(0.25)), float(fl.sigma(0.25))
    (0.75, 0.25)
    """
    if validation.is_concrete(shift):
        validation.number("shift", shift, lo=0, lo_open=True)
    validation.integer("num_train_timesteps", num_train_timesteps, minimum=1)
    return FlowSchedule(shift, num_train_timesteps)
