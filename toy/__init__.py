"""Differentiable toy testbed: exact Gaussian mixtures, two moons, empirical and MLP denoisers.

>>> import toy
>>> sorted(n for n in ("GaussianMixture", "EmpiricalDenoiser", "two_moons") if hasattr(toy, n))
['EmpiricalDenoiser', 'GaussianMixture', 'two_moons']
"""

from toy.empirical import EmpiricalDenoiser
from toy.gmm import GaussianMixture, GMMDenoiser
from toy.mlp import MLPDenoiser, load_two_moons_mlp
from toy.two_moons import two_moons

__all__ = [
    "GaussianMixture",
    "GMMDenoiser",
    "EmpiricalDenoiser",
    "MLPDenoiser",
    "load_two_moons_mlp",
    "two_moons",
]
