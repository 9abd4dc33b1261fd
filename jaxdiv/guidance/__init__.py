"""Guidance terms and their combinators.

Each method lives in its own module; all share the protocol of :mod:`jaxdiv.guidance.base`.
"""

from jaxdiv.guidance.base import (
    HOOKS,
    Chain,
    GuidanceTerm,
    StepContext,
    WindowInfo,
    as_terms,
    chain,
    window,
)
from jaxdiv.guidance.cfg import CFGInfo, cfg

__all__ = [
    "HOOKS",
    "Chain",
    "GuidanceTerm",
    "StepContext",
    "WindowInfo",
    "as_terms",
    "chain",
    "window",
    "cfg",
    "CFGInfo",
]
