"""jaxdiv: diversity guidance for diffusion and flow samplers, in pure JAX.

>>> import jaxdiv
>>> sorted(m for m in ("schedules", "samplers", "guidance", "predictions") if hasattr(jaxdiv, m))
['guidance', 'predictions', 'samplers', 'schedules']
"""

from jaxdiv import guidance, predictions, recipes, samplers, schedules, validation
from jaxdiv.sampling import SampleOutput, Trace, compile_count, sample

__version__ = "0.1.0"

__all__ = [
    "sample",
    "compile_count",
    "SampleOutput",
    "Trace",
    "schedules",
    "samplers",
    "guidance",
    "predictions",
    "recipes",
    "validation",
]


def __getattr__(name):
    # metrics, models, pipelines and test fixtures import heavier dependencies: load them
    # on first use (`import jaxdiv` must stay light; tests/test_layers.py checks it)
    if name in ("metrics", "models", "pipelines", "testing"):
        import importlib

        return importlib.import_module(f"jaxdiv.{name}")
    raise AttributeError(f"module 'jaxdiv' has no attribute {name!r}")
