"""Differentiable toy testbed: exact (conditional) Gaussian mixtures, two moons, empirical and
MLP denoisers, and a toy sphere encoder for GASS.

>>> import toy
>>> sorted(n for n in ("GaussianMixture", "EmpiricalDenoiser", "two_moons") if hasattr(toy, n))
['EmpiricalDenoiser', 'GaussianMixture', 'two_moons']
"""

from toy.conditional import ConditionalGaussianMixture, ConditionalGMMDenoiser, ring_of_classes
from toy.empirical import EmpiricalDenoiser
from toy.encoder import SphereEncoder, sphere_encoder
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
    "ConditionalGaussianMixture",
    "ConditionalGMMDenoiser",
    "ring_of_classes",
    "SphereEncoder",
    "sphere_encoder",
]
