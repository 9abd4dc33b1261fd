"""Several processes on one run (``jax.distributed``): flags, shares, agreement, gathers.

``experiments.generate`` and ``experiments.evaluate`` take

    --coordinator HOST:PORT --num-processes N --process-id I

(or the environment variables ``JAXDIV_COORDINATOR``, ``JAXDIV_NUM_PROCESSES``,
``JAXDIV_PROCESS_ID``; given a coordinator, a Slurm task's ``SLURM_NTASKS`` and
``SLURM_PROCID`` fill in the other two). Every process of a job is started with the same
flags but its ``--process-id``; process 0 hosts JAX's coordination service at
``--coordinator``. With ``N > 1`` the command calls ``jax.distributed.initialize`` (CPU
collectives through gloo) before any computation, takes its own lock of the output
folder, and the processes agree -- through one ``process_allgather`` -- that every one of
them holds its lock and was given the same settings, else all of them stop in one line.
Work is shared deterministically: process ``i`` takes items ``k`` with ``k % N == i``
(:func:`share`).

A process that dies stops the job: JAX's coordination service aborts its siblings once
the dead one misses its heartbeats (100 s by default). Rerunning the whole job with the
same flags resumes: each process redoes only the missing part of its own share.

Importing this module loads no jax (command lines parse their flags first).

Example:
    >>> import argparse
    >>> p = argparse.ArgumentParser()
    >>> add_flags(p)
    >>> args = p.parse_args(["--coordinator", "10.0.0.1:1234", "--num-processes", "4",
    ...                      "--process-id", "2"])
    >>> procs = from_args(args, p.error, environ={})
    >>> procs.num, procs.index, procs.lead, share(list(range(10)), procs)
    (4, 2, False, [2, 6])
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
from collections.abc import Callable, Mapping
from typing import NamedTuple

import numpy as np

__all__ = [
    "SINGLE",
    "Processes",
    "add_flags",
    "agree",
    "all_true",
    "barrier",
    "fingerprint",
    "fail",
    "from_args",
    "gather",
    "initialize",
    "lock_name",
    "lock_output",
    "share",
    "take_over_stale_locks",
]

ENV_COORDINATOR = "JAXDIV_COORDINATOR"
ENV_NUM = "JAXDIV_NUM_PROCESSES"
ENV_ID = "JAXDIV_PROCESS_ID"
# a launcher's variables, read only when a coordinator is given (a Slurm job with several
# tasks that runs one command per task for other reasons must not turn into one job)
LAUNCHER_NUM = ("SLURM_NTASKS",)
LAUNCHER_ID = ("SLURM_PROCID",)


class Processes(NamedTuple):
    """Where this process stands in its job.

    Attributes:
        coordinator: ``host:port`` of process 0's coordination service (None: one process).
        num: the number of processes N.
        index: this process's id in ``[0, N)``.
    """

    coordinator: str | None
    num: int
    index: int

    @property
    def multi(self) -> bool:
        """Whether the job has several processes (``jax.distributed`` is used)."""
        return self.num > 1

    @property
    def lead(self) -> bool:
        """Whether this is process 0 (it writes the run's shared files)."""
        return self.index == 0

    def __str__(self) -> str:
        return f"process {self.index}/{self.num}"


SINGLE = Processes(None, 1, 0)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--coordinator``, ``--num-processes`` and ``--process-id`` to ``parser``."""
    g = parser.add_argument_group(
        "several processes (jax.distributed)",
        "one job over N processes, each started with the same flags but --process-id; "
        f"defaults from ${ENV_COORDINATOR}, ${ENV_NUM}, ${ENV_ID} (with a coordinator "
        "given, also $SLURM_NTASKS and $SLURM_PROCID)",
    )
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="address of process 0, which hosts JAX's coordination service "
                        "(required with --num-processes > 1)")  # fmt: skip
    g.add_argument("--num-processes", default=None, metavar="N",
                   help="processes of the job (default: 1)")
    g.add_argument("--process-id", default=None, metavar="I",
                   help="this process's id in [0, N) (required with --num-processes > 1)")


def _integer(text, name: str, least: int) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ValueError(f"{name} must be an integer >= {least}, got {text!r}") from None
    if value < least:
        raise ValueError(f"{name} must be an integer >= {least}, got {value}")
    return value


def _from_env(environ: Mapping, names: tuple) -> tuple[str | None, str | None]:
    for name in names:
        if environ.get(name, "").strip():
            return environ[name], f"${name}"
    return None, None


def from_args(args: argparse.Namespace, error: Callable[[str], None] | None = None,
              environ: Mapping | None = None) -> Processes:  # fmt: skip
    """The job this process belongs to, from the flags (else the environment), checked.

    Args:
        args: parsed flags of :func:`add_flags`.
        error: called with a one-line message for a bad value (a parser's ``error``,
            which exits); ``None``: raise ValueError.
        environ: the environment (default ``os.environ``).

    Returns:
        The :class:`Processes` (also set as ``args.processes``).
    """
    environ = os.environ if environ is None else environ
    try:
        procs = _resolve(args, environ)
    except ValueError as err:
        if error is None:
            raise
        error(str(err))
        raise
    args.processes = procs
    return procs


def _resolve(args, environ) -> Processes:
    coordinator, c_name = args.coordinator, "--coordinator"
    if coordinator is None:
        coordinator, c_name = _from_env(environ, (ENV_COORDINATOR,))
    num, n_name = args.num_processes, "--num-processes"
    if num is None:
        num, n_name = _from_env(environ, (ENV_NUM,) + (LAUNCHER_NUM if coordinator else ()))
    index, i_name = args.process_id, "--process-id"
    if index is None:
        index, i_name = _from_env(environ, (ENV_ID,) + (LAUNCHER_ID if coordinator else ()))
    num = 1 if num is None else _integer(num, n_name, 1)
    if index is not None:
        index = _integer(index, i_name, 0)
        if index >= num:
            raise ValueError(f"{i_name} must be in [0, {num}) for {num} processes, got {index}")
    if coordinator is not None:
        m = re.fullmatch(r"\s*(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})\s*", coordinator)
        if not m or not 1 <= int(m.group(2)) <= 65535:
            raise ValueError(f"{c_name} must be HOST:PORT (a port in 1..65535), got "
                             f"{coordinator!r}")  # fmt: skip
        coordinator = f"{m.group(1)}:{int(m.group(2))}"
    if num > 1:
        if coordinator is None:
            raise ValueError(f"{n_name} {num} needs --coordinator HOST:PORT (process 0's "
                             f"address; or ${ENV_COORDINATOR})")  # fmt: skip
        if index is None:
            raise ValueError(f"{n_name} {num} needs --process-id (this process's id in "
                             f"[0, {num}); or ${ENV_ID})")  # fmt: skip
    return Processes(coordinator if num > 1 else None, num, index or 0)


def share(items, procs: Processes) -> list:
    """This process's share of ``items``: those at positions ``k`` with ``k % N == i``.

    >>> share("abcdefg", Processes("h:1", 3, 1))
    ['b', 'e']
    """
    return list(items)[procs.index :: procs.num]


def lock_name(procs: Processes) -> str:
    """The lock file of this process: ``.run.lock`` for process 0 (and a one-process run,
    so the two exclude each other), ``.run.lock.<i>`` for process ``i > 0``."""
    from experiments.run_folder import LOCK_NAME

    return LOCK_NAME if procs.lead else f"{LOCK_NAME}.{procs.index}"


def take_over_stale_locks(lock, procs: Processes) -> list[dict]:
    """The lead process (or a one-process run), holding ``lock``, checks the folder's lock
    files of processes outside its own job (:meth:`~experiments.run_folder.FolderLock.
    take_over_others`): a live one refuses the folder, a killed job's are deleted. The
    other processes return ``[]``.

    >>> import tempfile
    >>> from pathlib import Path
    >>> from experiments.run_folder import FolderLock
    >>> d = Path(tempfile.mkdtemp())
    >>> _ = (d / ".run.lock.1").write_text('{"pid": 1, "host": "gone"}')
    >>> with FolderLock(d) as lock:
    ...     len(take_over_stale_locks(lock, Processes("h:1", 2, 0)))  # process 1 is its own
    0
    """
    if not procs.lead:
        return []
    own = {lock_name(procs._replace(index=i)) for i in range(1, procs.num)}
    return lock.take_over_others(keep=own)


def lock_output(folder, procs: Processes):
    """``(lock, None)``: this process's :class:`~experiments.run_folder.FolderLock` of its
    output folder, acquired (the lead also takes over a killed job's process locks,
    :func:`take_over_stale_locks`); ``(lock, message)`` with the lock not held when the
    folder is in use or unusable (``"--out ..."``, for the job to agree on).

    >>> import tempfile
    >>> lock, why = lock_output(tempfile.mkdtemp(), SINGLE)
    >>> why is None, lock.path.name
    (True, '.run.lock')
    >>> lock.release()
    """
    from experiments.run_folder import FolderError, FolderLock

    lock = FolderLock(folder, lock_name(procs))
    try:
        lock.acquire()
        take_over_stale_locks(lock, procs)
    except FolderError as err:
        lock.release()
        return lock, f"--out {err}"
    return lock, None


def initialize(procs: Processes, timeout_s: int | None = None) -> None:
    """``jax.distributed.initialize`` for a job of several processes (nothing for one).

    Must run before this process computes anything with JAX. Sets gloo as the CPU
    collectives (host-device runs and CPU tests gather through it). A second call with the
    same job is a no-op.

    Raises:
        ValueError: one line -- JAX was already initialised otherwise, or the coordinator
            could not be reached / bound.
    """
    if not procs.multi:
        return
    import jax

    if jax.distributed.is_initialized():
        if (jax.process_count(), jax.process_index()) != (procs.num, procs.index):
            raise ValueError(f"this Python process already joined a jax.distributed job as "
                             f"process {jax.process_index()} of {jax.process_count()}, not "
                             f"{procs.index} of {procs.num}")  # fmt: skip
        return
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except (AttributeError, ValueError):  # a JAX without the option
        pass
    if timeout_s is None:
        timeout_s = int(os.environ.get("JAXDIV_INIT_TIMEOUT", "300"))
    try:
        jax.distributed.initialize(procs.coordinator, num_processes=procs.num,
                                   process_id=procs.index,
                                   initialization_timeout=timeout_s)  # fmt: skip
    except Exception as err:  # RuntimeError, XlaRuntimeError, ...: one line for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"--coordinator {procs.coordinator}: cannot join the job as process "
                         f"{procs.index} of {procs.num} ({first})") from None  # fmt: skip


def gather(procs: Processes, array) -> np.ndarray:
    """``array`` of every process, stacked on a new leading axis ``(N, ...)`` (it must
    have the same shape and dtype everywhere; a collective: every process calls it).

    The bytes travel as ``uint8``, so any dtype arrives exactly (JAX without x64 would
    turn float64 / int64 into 32 bits).
    """
    a = np.ascontiguousarray(array)
    if not procs.multi:
        return a[None]
    from jax.experimental import multihost_utils

    raw = a.reshape(-1).view(np.uint8)
    got = np.asarray(multihost_utils.process_allgather(raw, tiled=False))
    return np.stack([row.view(a.dtype).reshape(a.shape) for row in got.reshape(procs.num, -1)])


def all_true(procs: Processes, flag: bool) -> bool:
    """Whether ``flag`` holds on every process (a collective)."""
    return bool(gather(procs, np.asarray([bool(flag)], np.uint8)).all())


def barrier(procs: Processes, name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing for one process)."""
    if procs.multi:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def fingerprint(values: dict) -> bytes:
    """A 32-byte digest of the settings a job's processes must share."""
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).digest()


def agree(procs: Processes, ok: bool, digest: bytes) -> str | None:
    """Check across the job that every process holds its lock (``ok``) and has the same
    settings ``digest`` (:func:`fingerprint`); a collective.

    Returns:
        None when they agree, else a one-line reason (the same on every process, except
        that a process that failed itself gets None for the lock part: it reports its
        own error).
    """
    if not procs.multi:
        return None
    row = np.frombuffer(bytes([1 if ok else 0]) + digest, np.uint8)
    rows = gather(procs, row)
    failed = [k for k in range(procs.num) if not rows[k, 0]]
    if failed:
        if not ok:
            return None
        who = ", ".join(map(str, failed))
        return (f"--out: process {who} of this job could not lock the folder (see its "
                "message); nothing was done")  # fmt: skip
    other = [k for k in range(procs.num) if bytes(rows[k, 1:]) != bytes(rows[0, 1:])]
    if other:
        return (f"--process-id: process {', '.join(map(str, other))} was started with other "
                "settings than process 0; every process of a job needs the same flags (but "
                "--process-id)")  # fmt: skip
    return None


def fail(procs: Processes, parser: argparse.ArgumentParser, message: str, code: int) -> int:
    """Report a command's failure in one line: exit 2 for a refused input
    (``parser.error``), return 1 for a failed run.

    A process of a multi-process job that has joined ``jax.distributed`` leaves at once
    (``os._exit`` after the message): waiting in the shutdown barrier for siblings that
    still work would only delay the job's end; the coordination service stops them when
    this process's heartbeats stop.

    Example:
        >>> import io, contextlib
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err):
        ...     code = fail(SINGLE, argparse.ArgumentParser(prog="cmd"), "disk full", 1)
        >>> code, err.getvalue().strip()
        (1, 'cmd: error: disk full')
    """
    if procs.multi and _joined():
        print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(code)
    if code == 2:
        parser.error(message)
    print(f"{parser.prog}: error: {message}", file=sys.stderr, flush=True)
    return code


def _joined() -> bool:
    """Whether this Python process has joined a jax.distributed job (without loading jax)."""
    if "jax" not in sys.modules:
        return False
    import jax

    return jax.distributed.is_initialized()
