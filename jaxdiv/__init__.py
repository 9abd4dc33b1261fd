"""jaxdiv: diversity guidance for diffusion and flow samplers, in pure JAX.

>>> import jaxdiv
>>> sorted(m for m in ("schedules", "samplers", "guidance", "predictions") if hasattr(jaxdiv, m))
['guidance', 'predictions', 'samplers', 'schedules']
"""

import importlib

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

_FROM_SAMPLING = ("sample", "compile_count", "SampleOutput", "Trace")
_SUBMODULES = (
    "compilation_cache", "distributed", "guidance", "host_memory", "metrics", "models",
    "pipelines", "predictions", "pytrees", "recipes", "samplers", "sampling", "schedules",
    "sphere", "testing", "validation",
)  # fmt: skip


def __getattr__(name):
    # Every public name loads on first use, so `import jaxdiv` imports no JAX: a process can
    # set itself up before JAX starts (the console command's restart under
    # jaxdiv.host_memory's malloc setting; JAX's import would otherwise run twice), and metrics,
    # models and pipelines (heavier dependencies) load only when used (tests/test_layers.py).
    if name in _FROM_SAMPLING:
        value = getattr(importlib.import_module("jaxdiv.sampling"), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"jaxdiv.{name}")
    else:
        raise AttributeError(f"module 'jaxdiv' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_FROM_SAMPLING) | set(_SUBMODULES))
