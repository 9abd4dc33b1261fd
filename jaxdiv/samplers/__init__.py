"""Samplers: factories returning a :class:`Sampler` run by :func:`jaxdiv.sample`."""

from jaxdiv.samplers.base import (
    Sampler,
    check_times,
    first_order_step,
    first_order_update,
    no_state,
    per_sample_normal,
)
from jaxdiv.samplers.ddim import ddim, ddim_noise_std
from jaxdiv.samplers.dpmpp import (
    DPM3State,
    DPMState,
    dpmpp_2m,
    dpmpp_2m_sde,
    dpmpp_3m,
    dpmpp_3m_sde,
)
from jaxdiv.samplers.edm import edm
from jaxdiv.samplers.flow import flow_euler
from jaxdiv.samplers.flow_heun import flow_heun
from jaxdiv.samplers.grid import exponential_grid, karras_grid, uniform_grid

__all__ = [
    "Sampler",
    "ddim",
    "ddim_noise_std",
    "dpmpp_2m",
    "dpmpp_2m_sde",
    "dpmpp_3m",
    "dpmpp_3m_sde",
    "DPMState",
    "DPM3State",
    "edm",
    "flow_euler",
    "flow_heun",
    "karras_grid",
    "exponential_grid",
    "uniform_grid",
    "first_order_update",
    "check_times",
    "first_order_step",
    "no_state",
    "per_sample_normal",
]
