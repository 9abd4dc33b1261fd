"""Host memory for XLA:CPU: run a script under glibc malloc settings that reuse freed memory.

XLA:CPU allocates the buffers of every call of a compiled program afresh. Under glibc's
default malloc each large buffer is a new ``mmap`` whose pages fault, and are zeroed by the
kernel, the first time the program writes them: a jitted SD2.1-sized UNet step at latent 64
took 666,243 minor page faults per call on a 2-core Intel Xeon (``python -m benchmarks.sd_step
--configs sd21 --latent 64 --threads 0``, its ``call_usage``). :data:`REUSE_FREED_MEMORY` makes
glibc keep freed memory and hand it out again, and the step took none. glibc reads these settings
once, when the process starts, so :func:`restart_with_reused_memory` starts the script again
under them; the ``jaxdiv`` console command does so by itself.

Measured speed-ups are in ``docs/guide/benchmarks.md`` (section "Host memory"); the cost is
that the process never returns freed memory to the system (its resident size stays at its
peak), which suits a sampling or benchmark process.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

#: ``GLIBC_TUNABLES`` under which glibc keeps freed memory for reuse: one arena for every
#: thread (XLA:CPU's worker threads then allocate from the main heap instead of per-thread
#: heaps that hand large blocks to ``mmap``), no ``mmap`` for large blocks, and no trimming
#: of the heap's top (below 64 GiB).
REUSE_FREED_MEMORY = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"
)

#: Set to ``0`` to keep the ``jaxdiv`` console command from restarting under the setting.
OPT_OUT_VARIABLE = "JAXDIV_REUSE_MEMORY"


def reusing_freed_memory(env: Mapping[str, str] | None = None) -> bool:
    """Whether every tunable of :data:`REUSE_FREED_MEMORY` is in ``GLIBC_TUNABLES`` (of
    ``env``, default this process's environment, i.e. as the process started).

    >>> reusing_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1:" + REUSE_FREED_MEMORY})
    True
    >>> reusing_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.arena_max=1"})
    False
    """
    have = set(((os.environ if env is None else env).get("GLIBC_TUNABLES") or "").split(":"))
    return set(REUSE_FREED_MEMORY.split(":")) <= have


def _has_glibc() -> bool:
    return sys.platform == "linux" and platform.libc_ver()[0] == "glibc"


def _reruns(argv: list[str]) -> bool:
    """Whether an interpreter command line (``sys.orig_argv``) names something to run again:
    a script or ``-m module``, not ``-c``, stdin or a bare interactive interpreter.

    >>> _reruns(["python", "-u", "train.py", "-c", "x"]), _reruns(["python", "-m", "experiments"])
    (True, True)
    >>> _reruns(["python", "-c", "pass"]), _reruns(["python", "-i", "-"]), _reruns(["python"])
    (False, False, False)
    """
    i = 1
    while i < len(argv):
        a = argv[i]
        if a == "-" or not a.startswith("-"):
            return a != "-"  # stdin, or the script
        if a in ("-W", "-X", "--check-hash-based-pycs"):
            i += 2  # an option with its value apart
            continue
        if not a.startswith(("--", "-W", "-X")):
            for flag in a[1:]:  # a cluster of one-letter options: -c / -m end it
                if flag in "cm":
                    return flag == "m"
        i += 1
    return False


def restart_with_reused_memory() -> bool:
    """Start this script again, from the beginning, with :data:`REUSE_FREED_MEMORY` added to
    ``GLIBC_TUNABLES``, unless it already runs under it; call it first thing in a script.

    The restart replaces the process (``os.execve``) with the same interpreter, the same
    command line (``sys.orig_argv``: a script, ``-m module`` or a console command) and the
    same environment plus the tunables; tunables already set are kept. Returns ``True`` when
    the process runs under the setting (after the restart: the second call), ``False`` on a
    system without glibc, where there is nothing to set. Raises ``RuntimeError`` where there
    is no command line to run again (an interactive session, a notebook kernel,
    ``python -c``, a script on stdin): start such a process with
    ``GLIBC_TUNABLES=<REUSE_FREED_MEMORY>`` instead.

    Example (a script; the first run never returns from the call)::

        from jaxdiv.host_memory import restart_with_reused_memory

        restart_with_reused_memory()
        import jax  # ... the rest of the script, now without per-call page faults
    """
    if reusing_freed_memory():
        return True
    if not _has_glibc():
        return False
    argv = list(sys.orig_argv)
    if (
        hasattr(sys, "ps1")
        or sys.flags.interactive
        or "ipykernel" in sys.modules
        or not _reruns(argv)
    ):
        raise RuntimeError(
            "restart_with_reused_memory needs a script or module to run again, but this "
            f"process was started as {argv!r}; start it with "
            f"GLIBC_TUNABLES={REUSE_FREED_MEMORY} in its environment instead"
        )
    tunables = ":".join(t for t in (os.environ.get("GLIBC_TUNABLES"), REUSE_FREED_MEMORY) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]],
              {**os.environ, "GLIBC_TUNABLES": tunables})  # fmt: skip
    raise AssertionError("os.execve returned")  # pragma: no cover
