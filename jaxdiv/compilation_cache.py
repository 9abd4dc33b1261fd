"""A persistent XLA compilation cache: compiled programs kept on disk for the next process.

On CPU most of a Stable Diffusion program's first call is XLA compilation, and every new
process pays it again. JAX can write each compiled program to a folder and load it in a
later process instead of compiling (its persistent compilation cache). :func:`enable`
points JAX at such a folder; the ``jaxdiv`` console command does that by itself for every
command that runs models, in :func:`default_folder` unless ``JAXDIV_COMPILATION_CACHE``
names another folder (``0`` turns it off). Scripts and notebooks call :func:`enable`
themselves. What it saves is measured by ``python -m benchmarks.compile_cache`` (the
"Compile time" section of ``docs/guide/benchmarks.md``).

JAX keys every entry on the program, the jax/jaxlib versions, the backend and the XLA flags,
and XLA:CPU refuses an entry compiled for a CPU with other features (it compiles anew), so
one folder may serve several hosts and versions (on some CPUs that check refuses every
entry and the cache saves nothing: jax-ml/jax#38445). The folder is not pruned (JAX's
``jax_compilation_cache_max_size`` bounds it, with the ``filelock`` package).
"""

from __future__ import annotations

import os
import stat
import warnings
from collections.abc import Mapping
from pathlib import Path

from jaxdiv import validation

__all__ = ["VARIABLE", "default_folder", "disable", "enable", "from_environment"]

#: ``0`` (or ``off``) turns the console command's cache off; any other value is its folder.
VARIABLE = "JAXDIV_COMPILATION_CACHE"


def default_folder(env: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/jaxdiv/xla``, or ``~/.cache/jaxdiv/xla`` without ``XDG_CACHE_HOME``.

    >>> default_folder({"XDG_CACHE_HOME": "/scratch/me/cache"}).as_posix()
    '/scratch/me/cache/jaxdiv/xla'
    """
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "jaxdiv" / "xla"


def _usable_folder(folder: Path, what: str) -> Path:
    """``folder`` created (``0o700``) if missing; a clear error where it cannot serve."""
    folder = folder.expanduser()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{what} {str(folder)!r} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as err:
        raise ValueError(f"{what} {str(folder)!r} cannot be created: {err}") from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{what} {str(folder)!r} is not writable by this user")
    mode = folder.stat().st_mode
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        # a loaded entry is machine code this process runs: whoever may write it may run code
        raise ValueError(
            f"{what} {str(folder)!r} is writable by every user, and a compilation cache is "
            f"code this process runs; use a private folder (or chmod o-w {folder})"
        )
    return folder.resolve()


def enable(folder: str | os.PathLike | None = None, *, min_compile_time_s: float | None = 0.0,
           env: Mapping[str, str] | None = None) -> Path:
    """Keep compiled programs in ``folder`` and load them from there in later processes.

    Calls :func:`jax.experimental.compilation_cache.compilation_cache.set_cache_dir` (and
    ``reset_cache``, so it takes effect after earlier compilations too). Without
    ``folder``: the folder JAX is already configured with (``JAX_COMPILATION_CACHE_DIR``),
    else :func:`default_folder`.

    Args:
        folder: the cache folder, created (private to this user) if missing.
        min_compile_time_s: keep only programs that took at least this long to compile
            (JAX's ``jax_persistent_cache_min_compile_time_secs``; ``None`` leaves JAX's
            setting, 1 s by default). 0 keeps every program: a toy script compiles many
            programs of well under a second, and together they are most of its start-up
            (``jaxdiv demo`` warm: 4.3 s at 0, 7.2 s at 0.2, 13.2 s at 1, against 24.5-24.9 s
            cold; ``python -m benchmarks.compile_cache --workloads demo --min-compile-time
            ...``, medians of 3 rounds on one core of the Intel Xeon host).
        env: the environment :func:`default_folder` reads (default: this process's).

    Returns:
        The folder in use.

    Raises:
        ValueError: the folder cannot be created or written, is a file, or every user may
            write to it (an entry is machine code this process runs).

    Example::

        import jaxdiv.compilation_cache
        from jaxdiv.pipelines import stable_diffusion

        jaxdiv.compilation_cache.enable()  # ~/.cache/jaxdiv/xla
        pipe = stable_diffusion.load("path/to/stable-diffusion-2-1-base")
        # ... its programs compile in the first process and load in the next

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     enable(Path(tmp) / "xla").name
    'xla'
    >>> _ = disable()
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    if folder is None:
        configured = jax.config.jax_compilation_cache_dir
        folder = Path(configured) if configured else default_folder(env)
    if min_compile_time_s is not None:
        min_compile_time_s = validation.number("min_compile_time_s", min_compile_time_s, lo=0)
    path = _usable_folder(Path(folder), "compilation cache folder")
    if min_compile_time_s is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_time_s)
    compilation_cache.set_cache_dir(str(path))
    compilation_cache.reset_cache()
    return path


def disable() -> None:
    """Stop reading and writing the persistent cache in this process (JAX's default).

    >>> disable()
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


def from_environment(env: Mapping[str, str] | None = None) -> Path | None:
    """What the ``jaxdiv`` console command does: :func:`enable` the folder that
    ``JAXDIV_COMPILATION_CACHE`` names (unset: as :func:`enable` without one), or nothing
    for ``0`` / ``off``, keeping every program unless ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
    is set. Returns the folder in use, or ``None``. A named folder that cannot serve raises
    :class:`ValueError` naming the variable; where the default folder cannot serve (a
    read-only home) it warns and returns ``None``.

    >>> from_environment({VARIABLE: "0"}) is None
    True
    """
    env = os.environ if env is None else env
    value = env.get(VARIABLE, "").strip()
    if value.lower() in ("0", "off"):
        return None
    keep = None if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" in env else 0.0
    try:
        return enable(value or None, min_compile_time_s=keep, env=env)
    except ValueError as err:
        if value:  # a folder the user named: say so rather than run without it
            raise ValueError(f"{VARIABLE}: {err} (set {VARIABLE}=0 to run without it)") from err
        warnings.warn(f"{err}; running without a compilation cache (set {VARIABLE} to a "
                      f"folder to keep one, or to 0 to silence this)", stacklevel=2)  # fmt: skip
        return None
