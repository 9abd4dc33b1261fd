"""DPM-Solver++ multistep samplers (Lu et al. 2022): 2M, 3M and their SDE variants.

The solvers integrate the probability-flow ODE (or, with ``eta > 0``, the reverse SDE) in
``lambda = log(alpha / sigma)``, where the data-prediction form is exactly linear apart
from the ``x0_hat`` integral (Lu et al. 2022, "DPM-Solver++", Sec. 4). Each step costs one
(guided) denoiser call; the previous steps' ``x0_hat`` and ``h`` are the sampler state
(:class:`DPMState`, :class:`DPM3State`), so guidance terms acting on ``x0_hat`` act on the
history too.

One step function serves all four samplers, in k-diffusion's parametrisation
(``sample_dpmpp_2m_sde`` / ``sample_dpmpp_3m_sde``) written for any process
``x_t = alpha x0 + sigma eps`` (k-diffusion's is the EDM one, ``alpha = 1``): with
``h = lambda_{i+1} - lambda_i`` and ``h_eta = (1 + eta) h``,

``x_{i+1} = (sigma_{i+1}/sigma_i) e^{-eta h} x_i + alpha_{i+1} [(1 - e^{-h_eta}) D0
+ c_1 D1 - c_2 D2] + sigma_{i+1} sqrt(1 - e^{-2 eta h}) s_noise z``

where ``D0 = x0_i``, ``D1`` / ``D2`` are the backward differences of the ``x0_hat``
history (Lu et al.'s ``D1_0``, ``D1``, ``D2``), ``c_1 = phi_2 = (e^{-h_eta} - 1)/h_eta + 1``
(``0.5 (1 - e^{-h_eta})`` for the "midpoint" second-order step) and ``c_2 = phi_3 =
phi_2 / h_eta - 1/2``. ``eta = 0`` is DPM-Solver++ (``algorithm_type="dpmsolver++"``),
``eta = 1`` is SDE-DPM-Solver++ (``"sde-dpmsolver++"``).

Ends of the grid, as diffusers' ``DPMSolverMultistepScheduler`` does:

* warm-up: step ``i`` has order at most ``i + 1`` (no history before);
* a step to ``sigma = 0`` (``lambda = inf``, diffusers' ``final_sigmas_type="zero"``) is
  first order and returns the guided ``x0_hat`` exactly;
* ``lower_order_final`` (diffusers' default, ``N < 15`` only): the last step is first order
  and, for order 3, the step before it second order. This matters for 3M and for a grid
  ending at a noisy time (``allow_noisy_end=True``, diffusers' ``final_sigmas_type=
  "sigma_min"``), not for 2M ending at 0.

Two findings about the third-order formula (``tests/test_dpmpp_sde.py`` measures both):

* Lu et al.'s multistep third-order coefficient of ``D2`` (used by diffusers' and
  k-diffusion's DPM++ 3M) is half the Taylor-exact one (``D2 ~ h^2 x0''/2``), so the
  local error is ``O(h^3)`` and 3M converges with order 2 (a smaller constant than 2M),
  not 3. jaxdiv implements the published formula, as the references do.
* diffusers 0.42's ``sde-dpmsolver++`` third-order update has ``(1 - e^{-2h} - 2h)/(2h)^2
  - 0.5`` for ``-phi_3``; the exact integral (and k-diffusion) has ``+ 0.5``. jaxdiv
  follows k-diffusion; diffusers' value is off by ``alpha_{i+1} D2`` on each third-order
  step (its local error is ``O(h^2)``: first order).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxdiv import validation
from jaxdiv.samplers.base import Sampler, check_times, per_sample_normal
from jaxdiv.samplers.grid import default_grid

__all__ = [
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "dpmpp_3m_sde",
    "DPMState",
    "DPM3State",
    "DPMOptions",
    "dpmpp_2m_update",
    "log_snr",
]

_SOLVER_TYPES = ("midpoint", "heun")


class DPMState(NamedTuple):
    """State of the second-order DPM-Solver++ samplers (2M, 2M SDE) between steps.

    Attributes:
        x0_hat: the previous step's guided ``x0_hat`` (zeros before the first step; after
            the run, the last step's, which is the output when the grid ends at 0).
        h: the previous step's log-SNR increment ``lambda_i - lambda_{i-1}`` (0 before the
            first step; ``inf`` after a step from ``alpha = 0`` or to ``sigma = 0``).
    """

    x0_hat: jax.Array
    h: jax.Array


class DPM3State(NamedTuple):
    """State of the third-order DPM-Solver++ samplers (3M, 3M SDE) between steps.

    Attributes:
        x0_hat: the previous step's guided ``x0_hat`` (as :class:`DPMState`).
        h: the previous step's log-SNR increment (as :class:`DPMState`).
        x0_hat_prev: the guided ``x0_hat`` of the step before that.
        h_prev: the log-SNR increment of the step before that.
    """

    x0_hat: jax.Array
    h: jax.Array
    x0_hat_prev: jax.Array
    h_prev: jax.Array


class DPMOptions(NamedTuple):
    """Options of the DPM-Solver++ samplers.

    Attributes:
        order: 2 (2M, 2M SDE) or 3 (3M, 3M SDE).
        solver_type: the second-order step, diffusers' ``"midpoint"`` or ``"heun"``.
        eta: noise weight (0: the ODE solver ``dpmsolver++``; 1: ``sde-dpmsolver++``).
        s_noise: scale of the injected noise (k-diffusion's ``s_noise``).
        lower_order_final: diffusers' ``lower_order_final`` (applies when ``N < 15``).
    """

    order: int = 2
    solver_type: str = "midpoint"
    eta: float = 0.0
    s_noise: float = 1.0
    lower_order_final: bool = True


def log_snr(alpha, sigma):
    """``lambda = log(alpha / sigma)`` (Lu et al. 2022, Sec. 2), ``-inf`` at ``alpha = 0``
    and ``inf`` at ``sigma = 0``.

    >>> [float(v) for v in log_snr(jnp.array([0.0, 1.0, 1.0]), jnp.array([1.0, 1.0, 0.0]))]
    [-inf, 0.0, inf]
    """
    alpha, sigma = jnp.asarray(alpha), jnp.asarray(sigma)
    # the infinite ends without log(0): gradients (e.g. in a flow's shift) stay finite
    a_pos, s_pos = alpha > 0, sigma > 0
    lam = jnp.log(jnp.where(a_pos, alpha, 1.0)) - jnp.log(jnp.where(s_pos, sigma, 1.0))
    return jnp.where(a_pos, jnp.where(s_pos, lam, jnp.inf), -jnp.inf)


def dpmpp_2m_update(x, d, alpha_next, sigma, sigma_next, h):
    """``x_next = (sigma_n / sigma) x - alpha_n (exp(-h) - 1) D`` (DPM-Solver++, Alg. 2).

    ``D`` is ``x0_hat`` for the first-order step and the multistep combination
    ``(1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}`` for 2M. At ``sigma_next = 0`` (``h = inf``) it
    returns ``alpha_n D`` exactly; from ``alpha = 0`` (``h = inf``) it is
    ``(sigma_n / sigma) x + alpha_n D``.

    >>> float(dpmpp_2m_update(3.0, 1.0, 1.0, 0.5, 0.0, jnp.inf))   # to sigma = 0: D
    1.0
    """
    return (sigma_next / sigma) * x - alpha_next * (jnp.exp(-h) - 1.0) * d


def _dpmpp2_init(sampler, x):
    # h in the grid's precision (at least float32): a half-precision h would round the
    # step ratio r = h_prev / h of the second-order term (0.4% in bfloat16)
    return DPMState(jnp.zeros_like(x), jnp.zeros((), sampler.times.dtype))


def _dpmpp3_init(sampler, x):
    zero = jnp.zeros((), sampler.times.dtype)
    return DPM3State(jnp.zeros_like(x), zero, jnp.zeros_like(x), zero)


def _ratio(h, h_prev, ok):
    """``h / h_prev`` (``1 / r`` in Lu et al.) where ``ok``, else 0; 0 after an infinite step."""
    return jnp.where(ok, h / jnp.where(ok, h_prev, 1.0), 0.0)


def _dpmpp_step(sampler, i, x, state, denoise, carry, keys):
    """One DPM-Solver++ multistep step (Lu et al. 2022, Alg. 2 and its 3M / SDE forms,
    k-diffusion's parametrisation); the order drops at the ends as diffusers' does."""
    sched, opt = sampler.schedule, sampler.options
    n = sampler.num_steps
    t, t_next = sampler.times[i], sampler.times[i + 1]
    alpha, sigma = sched.alpha(t), sched.sigma(t)
    alpha_n, sigma_n = sched.alpha(t_next), sched.sigma(t_next)
    h = log_snr(alpha_n, sigma_n) - log_snr(alpha, sigma)
    x0_hat, carry, info = denoise(x, t, carry)
    dt = x.dtype

    # the order of this step: warm-up (i + 1), diffusers' lower_order_final for N < 15
    # (last step first order, step before it at most second), first order for an
    # infinite step (to sigma = 0, or from alpha = 0)
    order = jnp.minimum(opt.order, i + 1)
    if opt.lower_order_final and n < 15:
        order = jnp.where(i == n - 1, 1, jnp.where(i == n - 2, jnp.minimum(order, 2), order))
    finite = jnp.isfinite(h)
    order = jnp.where(finite, order, 1)
    h_safe = jnp.where(finite, h, 1.0)
    h_eta = (1.0 + opt.eta) * h_safe
    # after a step from alpha = 0 (h_prev = inf) 1/r = h / h_prev = 0: the finite limit
    q0 = _ratio(h_safe, state.h, (order >= 2) & (state.h > 0))
    d1 = q0 * (x0_hat - state.x0_hat)  # D1_0
    phi_2 = jnp.expm1(-h_eta) / h_eta + 1.0
    if opt.order == 2 and opt.solver_type == "midpoint":
        c1 = 0.5 * (1.0 - jnp.exp(-h_eta))
    else:
        c1 = phi_2
    correction = c1 * d1
    if opt.order == 3:
        if opt.solver_type == "midpoint":  # diffusers' second-order step during warm-up
            c1 = jnp.where(order == 2, 0.5 * (1.0 - jnp.exp(-h_eta)), phi_2)
        q1 = _ratio(h_safe, state.h_prev, (order >= 3) & (state.h_prev > 0))
        d1_1 = q1 * (state.x0_hat - state.x0_hat_prev)
        qs = q0 + q1
        ok = qs > 0
        w = jnp.where(ok, q1 / jnp.where(ok, qs, 1.0), 0.0)  # r0 / (r0 + r1)
        d1_full = d1 + w * (d1 - d1_1)
        d2 = (q0 * w) * (d1 - d1_1)  # (D1_0 - D1_1) / (r0 + r1)
        phi_3 = phi_2 / h_eta - 0.5
        correction = c1 * d1_full - jnp.where(order >= 3, phi_3, 0.0) * d2
    correction = jnp.where(order >= 2, correction, 0.0)

    ratio = sigma_n / sigma
    if opt.eta != 0:
        ratio = ratio * jnp.exp(-opt.eta * h)
    x_next = ratio * x + alpha_n * ((1.0 - jnp.exp(-(1.0 + opt.eta) * h)) * x0_hat + correction)
    if opt.eta != 0 and opt.s_noise != 0:
        z = per_sample_normal(keys, i, x)
        std = sigma_n * jnp.sqrt(-jnp.expm1(-2.0 * opt.eta * h_safe)) * opt.s_noise
        x_next = x_next + jnp.where(finite, std, sigma_n * opt.s_noise) * z
    # a step to sigma = 0 returns the guided x0_hat exactly (alpha_n = 1, sigma_n = 0)
    x_next = jnp.where(sigma_n == 0, alpha_n * x0_hat, x_next).astype(dt)
    h_new = h.astype(state.h.dtype)
    if opt.order == 2:
        new_state = DPMState(x0_hat, h_new)
    else:
        new_state = DPM3State(x0_hat, h_new, state.x0_hat, state.h)
    return x_next, new_state, carry, (x0_hat, info)


def _make(name, schedule, num_steps, times, grid_kwargs, options, allow_noisy_end):
    allow_noisy_end = validation.boolean("allow_noisy_end", allow_noisy_end)
    validation.choice("solver_type", options.solver_type, _SOLVER_TYPES)
    validation.boolean("lower_order_final", options.lower_order_final)
    grid = default_grid(schedule, num_steps, times, grid_kwargs, 20)
    grid = check_times(grid, schedule, clean_end=not allow_noisy_end)
    n = grid.shape[0] - 1
    init = _dpmpp2_init if options.order == 2 else _dpmpp3_init
    return Sampler(name, schedule, grid, init, _dpmpp_step, options, n)


def dpmpp_2m(
    schedule,
    num_steps: int | None = None,
    *,
    times=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    allow_noisy_end: bool = False,
    **grid_kwargs,
) -> Sampler:
    """DPM-Solver++(2M): ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} (e^{-h_i} - 1) D_i``.

    Lu et al. (2022), "DPM-Solver++", Alg. 2 (multistep second order, data prediction):
    ``h_i = lambda_{i+1} - lambda_i``, ``lambda = log(alpha / sigma)``, ``r_i = h_{i-1} /
    h_i``, ``D_i = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}``. The first step (no history)
    and the last step (to ``sigma = 0``) are first order (``D = x0_i``), so the output is
    the last guided ``x0_hat`` exactly. Equals diffusers' ``DPMSolverMultistepScheduler(
    algorithm_type="dpmsolver++", solver_order=2)`` with ``final_sigmas_type="zero"`` on the
    same grid and model (with ``lower_order_final``'s ``N < 15`` rule, which does not change
    order 2 on a grid ending at 0). Works on every process; on a flow grid starting at
    ``t = 1`` (``alpha = 0``, ``lambda = -inf``) the first step is its finite limit
    ``x_1 = sigma_1 x_0 + alpha_1 x0_0`` and the second is first order too
    (``1/(2r) = h_1 / h_0 / 2 = 0``). NFE = ``N``.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules` (VP, EDM or flow).
        num_steps: number of denoiser evaluations ``N`` (default 20, or len(times) - 1).
        times: optional explicit ``(N + 1,)`` decreasing grid ending at the clean endpoint
            (e.g. Karras sigmas on any process, or diffusers' timesteps).
        solver_type: diffusers' ``"midpoint"`` (Alg. 2) or ``"heun"`` second-order step
            (``D1`` weighted by ``phi_2 = (e^{-h} - 1)/h + 1`` instead of ``(1 - e^{-h})/2``).
        lower_order_final: diffusers' rule for ``N < 15`` (last step first order); only
            matters with ``allow_noisy_end``.
        allow_noisy_end: accept a grid whose last time has ``sigma > 0`` (diffusers'
            ``final_sigmas_type="sigma_min"``); the output then keeps ``sigma_N eps``.
        **grid_kwargs: passed to ``schedule.grid`` (VP: ``spacing``, ``steps_offset``).

    Returns:
        A :class:`~jaxdiv.samplers.Sampler` whose state is a :class:`DPMState`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = dpmpp_2m(schedules.edm(), num_steps=10)
    >>> den = lambda x, t, c: 0.5 * x / (1.0 + t**2)   # any denoiser
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0))
    >>> s.nfe, bool(jnp.all(out.x0 == out.sampler_state.x0_hat))
    (10, True)
    """
    opts = DPMOptions(2, solver_type, 0.0, 1.0, lower_order_final)
    return _make("dpmpp_2m", schedule, num_steps, times, grid_kwargs, opts, allow_noisy_end)


def dpmpp_2m_sde(
    schedule,
    num_steps: int | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    *,
    times=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    allow_noisy_end: bool = False,
    **grid_kwargs,
) -> Sampler:
    """DPM-Solver++(2M) SDE: ``x_{i+1} = (s_{i+1}/s_i) e^{-eta h} x_i + a_{i+1} (1 - e^{-(1+eta) h})
    D_i + s_{i+1} sqrt(1 - e^{-2 eta h}) z``.

    Lu et al. (2022), "DPM-Solver++", Sec. 5 / App. (SDE-DPM-Solver++(2M)), in
    k-diffusion's ``sample_dpmpp_2m_sde`` parametrisation with noise weight ``eta`` (``a``,
    ``s`` are ``alpha``, ``sigma``; ``D_i = x0_i + c (x0_i - x0_{i-1}) / r_i`` with ``c =
    (1 - e^{-(1+eta) h})/2`` for "midpoint"). ``eta = 1`` equals diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++", solver_order=2)``
    given the same noise; ``eta = 0`` is :func:`dpmpp_2m`. The noise ``z`` of sample ``b``
    at step ``i`` comes from its own stream (:func:`~jaxdiv.samplers.per_sample_normal`),
    so a sample does not depend on the batch size. First and last step as
    :func:`dpmpp_2m`; the step to ``sigma = 0`` returns the guided ``x0_hat``. NFE = ``N``.

    Args:
        schedule: a process from :mod:`jaxdiv.schedules` (VP, EDM or flow).
        num_steps: ``N`` (default 20, or len(times) - 1).
        eta: noise weight, finite and >= 0 (1: the SDE; 0: the ODE solver).
        s_noise: scale of the injected noise (finite, >= 0; 1 for the SDE).
        times, solver_type, lower_order_final, allow_noisy_end: as :func:`dpmpp_2m`.
        **grid_kwargs: as :func:`dpmpp_2m`.

    Returns:
        A :class:`~jaxdiv.samplers.Sampler` whose state is a :class:`DPMState`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = dpmpp_2m_sde(schedules.vp_linear(), 10)
    >>> den = lambda x, t, c: jnp.zeros_like(x)          # data = a point mass at 0
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0))
    >>> s.nfe, out.x0.tolist()
    (10, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    """
    eta = validation.number("eta", eta, lo=0)
    s_noise = validation.number("s_noise", s_noise, lo=0)
    opts = DPMOptions(2, solver_type, eta, s_noise, lower_order_final)
    return _make("dpmpp_2m_sde", schedule, num_steps, times, grid_kwargs, opts, allow_noisy_end)


def dpmpp_3m(
    schedule,
    num_steps: int | None = None,
    *,
    times=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    allow_noisy_end: bool = False,
    **grid_kwargs,
) -> Sampler:
    """DPM-Solver++(3M): ``x_{i+1} = (s_{i+1}/s_i) x_i + a_{i+1} [(1 - e^{-h}) D0 + phi_2 D1 -
    phi_3 D2]``.

    Lu et al.'s multistep third-order data-prediction solver (the ``dpm-solver`` code and
    diffusers' ``multistep_dpm_solver_third_order_update``): ``r0 = h_{i-1}/h``, ``r1 =
    h_{i-2}/h``, ``D1_0 = (x0_i - x0_{i-1})/r0``, ``D1_1 = (x0_{i-1} - x0_{i-2})/r1``,
    ``D1 = D1_0 + r0/(r0+r1) (D1_0 - D1_1)``, ``D2 = (D1_0 - D1_1)/(r0+r1)``, ``phi_2 =
    (e^{-h} - 1)/h + 1``, ``phi_3 = phi_2/h - 1/2``. Equals diffusers'
    ``DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=3)`` on the
    same grid and model: step 0 first order, step 1 second order (``solver_type``), for
    ``N < 15`` the step before last second order, the step to ``sigma = 0`` first order.
    Measured convergence order is 2, not 3: the published ``D2`` coefficient is half the
    Taylor-exact one (see the module docstring); its error constant is smaller than
    :func:`dpmpp_2m`'s. NFE = ``N``.

    Args:
        schedule, num_steps, times, solver_type, lower_order_final, allow_noisy_end: as
            :func:`dpmpp_2m`.
        **grid_kwargs: as :func:`dpmpp_2m`.

    Returns:
        A :class:`~jaxdiv.samplers.Sampler` whose state is a :class:`DPM3State`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = dpmpp_3m(schedules.flow(3.0), 8)
    >>> den = lambda x, t, c: 0.5 * x                   # any denoiser
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0))
    >>> s.nfe, bool(jnp.all(out.x0 == out.sampler_state.x0_hat))
    (8, True)
    """
    opts = DPMOptions(3, solver_type, 0.0, 1.0, lower_order_final)
    return _make("dpmpp_3m", schedule, num_steps, times, grid_kwargs, opts, allow_noisy_end)


def dpmpp_3m_sde(
    schedule,
    num_steps: int | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    *,
    times=None,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    allow_noisy_end: bool = False,
    **grid_kwargs,
) -> Sampler:
    """DPM-Solver++(3M) SDE: :func:`dpmpp_3m` with ``h_eta = (1+eta) h`` in ``phi_1..3``,
    ``x`` weighted by ``(s_{i+1}/s_i) e^{-eta h}`` and ``s_{i+1} sqrt(1 - e^{-2 eta h}) z`` added.

    k-diffusion's ``sample_dpmpp_3m_sde`` (``x += phi_2 d1 - phi_3 d2`` with ``phi_2 =
    expm1(-h_eta)/h_eta + 1``, ``phi_3 = phi_2/h_eta - 1/2``) written for any process.
    With ``eta = 1`` it equals diffusers' ``DPMSolverMultistepScheduler(algorithm_type=
    "sde-dpmsolver++", solver_order=3)`` given the same noise on every first- and
    second-order step; on third-order steps diffusers (0.42) has ``-phi_3 = ... - 0.5``
    where the exact integral of the SDE's data term has ``+ 0.5``, so its step differs
    from this one by ``alpha_{i+1} D2`` (see the module docstring and
    ``tests/test_dpmpp_sde.py``). Ends as :func:`dpmpp_3m`. NFE = ``N``.

    Args:
        schedule, num_steps, eta, s_noise, times, allow_noisy_end: as :func:`dpmpp_2m_sde`.
        solver_type, lower_order_final: as :func:`dpmpp_2m_sde`. k-diffusion's 3M SDE is
            ``solver_type="heun"`` (``phi_2`` on its second-order warm-up step) with
            ``lower_order_final=False``.
        **grid_kwargs: as :func:`dpmpp_2m_sde`.

    Returns:
        A :class:`~jaxdiv.samplers.Sampler` whose state is a :class:`DPM3State`.

    >>> import jax, jax.numpy as jnp, jaxdiv
    >>> from jaxdiv import schedules
    >>> s = dpmpp_3m_sde(schedules.edm(), 10)
    >>> den = lambda x, t, c: jnp.zeros_like(x)          # data = a point mass at 0
    >>> out = jaxdiv.sample(s, den, jnp.ones((2, 3)), key=jax.random.key(0))
    >>> s.nfe, out.x0.tolist()
    (10, [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    """
    eta = validation.number("eta", eta, lo=0)
    s_noise = validation.number("s_noise", s_noise, lo=0)
    opts = DPMOptions(3, solver_type, eta, s_noise, lower_order_final)
    return _make("dpmpp_3m_sde", schedule, num_steps, times, grid_kwargs, opts, allow_noisy_end)
