"""Where a pipeline warning points: the user's line, not jaxdiv's.

A warning raised deep inside ``pipe.generate`` (or a TPSO helper it calls) is about the
user's call, so ``warnings.warn`` gets the ``stacklevel`` of the first frame outside the
``jaxdiv`` package, however many jaxdiv frames lie between (that depth differs between
entry points). One helper, shared by :mod:`jaxdiv.pipelines.generation` and
:mod:`jaxdiv.pipelines.tpso`; ``tests/test_tpso.py`` and ``tests/test_sd_methods.py``
check that their warnings name the test file.
"""

from __future__ import annotations

import os
import sys

__all__ = ["user_stacklevel"]

# the jaxdiv package folder: frames from files under it are the library's own
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel of the first frame outside jaxdiv (the user's line,
    whether they called ``pipe.generate`` or a module function), as seen from the function
    that calls this one.

    >>> import warnings
    >>> def library_check():  # a jaxdiv function would be skipped; this file is not jaxdiv
    ...     warnings.warn("careful", RuntimeWarning, stacklevel=user_stacklevel())
    >>> with warnings.catch_warnings(record=True) as rec:
    ...     warnings.simplefilter("always")
    ...     library_check()
    >>> rec[0].lineno == library_check.__code__.co_firstlineno + 1  # not in jaxdiv: its own line
    True
    """
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_ROOT):
        frame, level = frame.f_back, level + 1
    return level
