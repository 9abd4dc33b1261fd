"""jaxdiv: diversity guidance for diffusion and flow samplers, in pure JAX.

>>> import jaxdiv
>>> sorted(m for m in ("schedules", "samplers", "guidance", "predictions") if hasattr(jaxdiv, m))
['guidance', 'predictions', 'samplers', 'schedules']
"""

from jaxdiv import guidance, predictions, samplers, schedules
from jaxdiv.sampling import SampleOutput, Trace, sample

__version__ = "0.1.0"

__all__ = [
    "sample",
    "SampleOutput",
    "Trace",
    "schedules",
    "samplers",
    "guidance",
    "predictions",
]


def __getattr__(name):
    # metrics and models import heavier dependencies; load them on first use
    if name in ("metrics", "models", "pipelines"):
        import importlib

        return importlib.import_module(f"jaxdiv.{name}")
    raise AttributeError(f"module 'jaxdiv' has no attribute {name!r}")
