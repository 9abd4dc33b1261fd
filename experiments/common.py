"""Small utilities shared by the experiment scripts.

Importing this module loads neither jax nor jaxdiv (``energy_distance`` is imported on
first use), so command lines can use :func:`progress_bar` and :func:`say` before they
parse their arguments.
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import io
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from experiments import run_folder

if TYPE_CHECKING:
    from jaxdiv.metrics import energy_distance

__all__ = [
    "at_least",
    "positive",
    "seed",
    "write_json",
    "save_figure",
    "progress",
    "energy_distance",
    "progress_bar",
    "progress_enabled",
    "quiet",
    "is_quiet",
    "say",
]

# --quiet of the running command (a context variable: run() of one module called inside
# another's keeps its own setting)
_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("jaxdiv_quiet", default=False)


def __getattr__(name):
    if name == "energy_distance":  # re-exported for the experiment scripts, loaded lazily
        from jaxdiv.metrics import energy_distance

        return energy_distance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def write_json(path, obj, default=float):
    """Write JSON atomically (:func:`experiments.run_folder.write_json`: whole or absent,
    mode from the umask)."""
    run_folder.write_json(path, obj, default)


def save_figure(fig, path):
    """Save a matplotlib figure atomically (format from the suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".") or "png", dpi=110, bbox_inches="tight")
    run_folder.atomic_write(path, buf.getvalue())


def progress(msg: str):
    say("jaxdiv", msg)


@contextlib.contextmanager
def quiet(flag: bool = True):
    """Within the block, :func:`say` prints nothing and :func:`progress_bar` draws no bar
    (a command's ``--quiet``).

    Example:
        >>> with quiet():
        ...     say("demo", "not shown")
        >>> say("demo", "shown")
        [demo] shown
    """
    token = _QUIET.set(bool(flag))
    try:
        yield
    finally:
        _QUIET.reset(token)


def is_quiet() -> bool:
    """Whether the current block runs under :func:`quiet`."""
    return _QUIET.get()


def say(prefix: str, msg: str, file=None) -> None:
    """Print ``[prefix] msg`` on stdout (``file``), above any progress bar being drawn (a
    plain line when none is); nothing under :func:`quiet`."""
    if _QUIET.get():
        return
    file = sys.stdout if file is None else file
    line = f"[{prefix}] {msg}"
    from tqdm import tqdm

    if getattr(tqdm, "_instances", None):  # a bar is drawn: clear it, print, redraw it
        tqdm.write(line, file=file)
    else:
        print(line, file=file)
    file.flush()


def progress_enabled(quiet: bool | None = None, file=None) -> bool:
    """Whether a progress bar is drawn: not quiet (``None``: :func:`is_quiet`) and
    ``file`` (default stderr) is a terminal. CI logs and pipes get none.

    Example:
        >>> import io
        >>> progress_enabled(file=io.StringIO()), progress_enabled(quiet=True)
        (False, False)
    """
    if quiet is None:
        quiet = _QUIET.get()
    if quiet:
        return False
    file = sys.stderr if file is None else file
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(iterable=None, total: int | None = None, desc: str | None = None,
                 quiet: bool | None = None, *, unit: str = "it", initial: int = 0,
                 file=None, enabled: bool | None = None):  # fmt: skip
    """A tqdm progress bar (rate and time left) on stderr, or a silent stand-in.

    The bar is drawn when :func:`progress_enabled` says so (not ``quiet``, stderr a
    terminal), or when ``enabled`` forces it. Otherwise the returned object is a
    ``tqdm(disable=True)``: it iterates ``iterable`` unchanged and ``update`` does
    nothing, so callers print their one-line progress messages only when ``bar.disable``
    (and, as everything, under :func:`say`, nothing when quiet).

    Args:
        iterable: what to iterate (or ``None`` and call ``update(n)``).
        total: the number of items (default ``len(iterable)`` where defined).
        desc: the bar's label.
        quiet: ``--quiet``; ``None``: :func:`is_quiet`.
        unit: what one item is (``"img"``, ``"method"``).
        initial: items already done (a resumed run): counted, not timed.
        file: the stream to draw on (default ``sys.stderr``).
        enabled: force the bar on or off (tests); ``None``: decide as above.

    Returns:
        A ``tqdm`` (use it as a context manager, or ``close()`` it).

    Example:
        >>> import io
        >>> bar = progress_bar(range(3), desc="x", file=io.StringIO())   # not a terminal
        >>> list(bar), bar.disable
        ([0, 1, 2], True)
    """
    from tqdm import tqdm

    file = sys.stderr if file is None else file
    if enabled is None:
        enabled = progress_enabled(quiet, file)
    try:  # a terminal that reports no size (a bare pty) would get an empty bar
        sized = os.get_terminal_size(file.fileno()).columns > 0
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        sized = False
    return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, file=file,
                disable=not enabled, dynamic_ncols=sized, ncols=None if sized else 80,
                nrows=None if sized else 20,
                smoothing=0.1, mininterval=0.2)  # fmt: skip


def at_least(minimum: int):
    """An argparse ``type``: an integer ``>= minimum`` (a bad value is the parser's one-line
    error, not a traceback from deep in the run).

    Example:
        >>> p = argparse.ArgumentParser(prog="x", exit_on_error=False)
        >>> _ = p.add_argument("--steps", type=at_least(1))
        >>> p.parse_args(["--steps", "3"]).steps
        3
        >>> p.parse_args(["--steps", "0"])
        Traceback (most recent call last):
        ...
        argparse.ArgumentError: argument --steps: must be an integer >= 1, got '0'
    """

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def positive(text: str) -> float:
    """An argparse ``type``: a finite number ``> 0``.

    Example:
        >>> positive("0.5"), positive("1e-3")
        (0.5, 0.001)
    """
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def seed(text: str) -> int:
    """An argparse ``type``: a seed in ``[0, 2**62)`` (keys fold in offsets on top of it).

    Example:
        >>> seed("7")
        7
    """
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**62:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**62), got {text!r}")
    return value
