"""Output folders of long, resumable runs: atomic files, one owner at a time, checked PNGs.

A resumable script (``experiments.generate`` and any other that writes many files into
one folder and skips the ones already there) builds on five pieces:

* :func:`atomic_write` -- a file appears whole or not at all (temp file in the same
  folder, ``fsync``, ``os.replace``, ``fsync`` of the folder), with the mode the umask
  gives (``0o666 & ~umask``, not ``tempfile``'s ``0o600``).
* :class:`FolderLock` -- an exclusive lock on the folder: ``.run.lock`` holds the owner's
  pid, host and start time, and an ``flock`` on it that the kernel drops when the owner
  dies, so a lock left by a killed run is taken over while a live owner's lock refuses a
  second run with a message that names the owner.
* :func:`check_png` -- why a finished image is not a complete, decodable PNG of the
  expected size (zero bytes, truncated, ...), so a resume regenerates it.
* :func:`remove_temporaries` -- temp files that a killed run left behind.
* :func:`refuse_foreign` -- a folder that holds files of something else (a model folder,
  another command's output) is not written into.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import socket
import tempfile
import time
from pathlib import Path

__all__ = [
    "LOCK_NAME",
    "FolderError",
    "FolderLock",
    "atomic_write",
    "check_png",
    "current_umask",
    "prepare_folder",
    "refuse_foreign",
    "remove_temporaries",
    "write_json",
]

LOCK_NAME = ".run.lock"
_TMP_SUFFIX = ".tmp"
# the last 12 bytes of every complete PNG: the IEND chunk (length 0, type, CRC)
_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PNG_START = b"\x89PNG\r\n\x1a\n"


class FolderError(ValueError):
    """An output folder that cannot be used: not a folder, not writable, or in use."""


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows.

    Example:
        >>> import os
        >>> old = os.umask(0o027)
        >>> oct(current_umask())
        '0o27'
        >>> _ = os.umask(old)
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: the classic set-and-restore
    os.umask(mask)
    return mask


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never a part.

    The bytes go to a temp file in the same folder (``.<name>.<random>.tmp``), are
    ``fsync``-ed, get mode ``0o666 & ~umask`` (as ``open`` would give a new file), and
    replace ``path`` with ``os.replace``; the folder is ``fsync``-ed so the rename survives
    a power loss. On any error the temp file is removed and the error names ``path``.

    Args:
        path: destination file; its folder must exist.
        data: the complete contents.

    Raises:
        OSError: writing failed (disk full, read-only folder, ...); ``err.filename`` is
            ``path``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write(p, b"hello")
        >>> p.read_bytes(), oct(p.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
        (b'hello', True)
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    except OSError as err:
        raise OSError(err.errno, f"cannot write {str(path)!r}: {err.strerror}") from err
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fchmod(fh.fileno(), 0o666 & ~current_umask())
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(err, OSError):
            raise OSError(err.errno, f"cannot write {str(path)!r}: {err.strerror}") from err
        raise
    _fsync_folder(path.parent)


def write_json(path, obj, default=float) -> None:
    """Write ``obj`` as indented JSON with :func:`atomic_write`, creating the folder
    (``default`` converts what JSON cannot hold, as in :func:`json.dumps`).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> p = Path(tempfile.mkdtemp()) / "sub" / "m.json"
        >>> write_json(p, {"a": 1})
        >>> json.loads(p.read_text())
        {'a': 1}
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=1, default=default).encode("utf-8"))


def remove_temporaries(folder) -> list[Path]:
    """Delete the temp files :func:`atomic_write` left in ``folder`` when its writer died.

    Call it only while holding the folder's :class:`FolderLock` (a live writer's temp file
    would be removed too).

    Returns:
        The removed paths.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / ".x.png.k2j3.tmp").write_bytes(b"half a PNG")
        >>> [p.name for p in remove_temporaries(d)], list(d.iterdir())
        (['.x.png.k2j3.tmp'], [])
    """
    removed = []
    for p in sorted(Path(folder).glob(f".*{_TMP_SUFFIX}")):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_png(path, size: tuple[int, int] | None = None) -> str | None:
    """Why ``path`` is not a complete, decodable PNG of ``size``; None when it is.

    Checks, cheapest first: the file exists and is non-empty, starts with the PNG
    signature and ends with the ``IEND`` chunk (a truncated file does not), decodes, and
    has ``size = (width, height)`` when given.

    Example:
        >>> import tempfile, numpy as np
        >>> from pathlib import Path
        >>> from PIL import Image
        >>> p = Path(tempfile.mkdtemp()) / "a.png"
        >>> Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(p)
        >>> check_png(p, (6, 4)) is None, check_png(p, (4, 4))
        (True, 'size 6x4, expected 4x4')
        >>> _ = p.write_bytes(p.read_bytes()[:30])
        >>> check_png(p)
        'truncated (30 bytes, no IEND chunk)'
    """
    from PIL import Image

    path = Path(path)
    try:
        nbytes = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(len(_PNG_START))
            fh.seek(max(0, nbytes - len(_PNG_END)))
            tail = fh.read()
    except FileNotFoundError:
        return "missing"
    except OSError as err:
        return f"unreadable ({err.strerror})"
    if nbytes == 0:
        return "empty (0 bytes)"
    if head != _PNG_START:
        return "not a PNG file"
    if tail != _PNG_END:
        return f"truncated ({nbytes} bytes, no IEND chunk)"
    try:
        with Image.open(path) as im:
            im.load()
            got = im.size
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError, zlib.error, ...
        return f"not decodable ({type(err).__name__}: {err})"
    if size is not None and tuple(got) != tuple(size):
        return f"size {got[0]}x{got[1]}, expected {size[0]}x{size[1]}"
    return None


def prepare_folder(folder) -> Path:
    """Create ``folder`` if needed and check that files can be written in it.

    Args:
        folder: the output folder.

    Returns:
        ``folder`` as a Path.

    Raises:
        FolderError: ``folder`` (or one of its parents) is a file, cannot be created, or
            is not writable; the message names the folder and the reason.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> f = Path(tempfile.mkdtemp()) / "file"
        >>> _ = f.write_text("x")
        >>> try:
        ...     prepare_folder(f)
        ... except FolderError as err:
        ...     print(str(err).split(": ", 1)[1])
        is a file, not a folder
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FolderError(f"{str(folder)!r}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as err:  # a parent is a file
        raise FolderError(f"{str(folder)!r}: cannot create it ({err.strerror})") from err
    except OSError as err:
        raise FolderError(f"{str(folder)!r}: cannot create it ({err.strerror})") from err
    try:  # os.access is wrong for root, ACLs and read-only mounts: try it
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.", suffix=_TMP_SUFFIX)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise FolderError(f"{str(folder)!r}: not writable ({err.strerror})") from err
    return folder


def refuse_foreign(folder, marker: str, ours: tuple, command: str) -> None:
    """Refuse a non-empty ``folder`` without ``marker`` (the record a run of ``command``
    writes there) that holds anything but ``command``'s own files: a model folder or another
    command's output would get this run's files mixed in.

    Args:
        folder: the output folder (absent or empty: fine).
        marker: the file a run of the command keeps there (``metadata.json``).
        ours: names or glob patterns of the command's files, which an interrupted first
            run may have left before its ``marker``; hidden files (temporaries, the lock)
            are always allowed.
        command: the command's name, for the message.

    Raises:
        FolderError: naming the folder and up to five of the other files.

    Example:
        >>> import tempfile
        >>> d = Path(tempfile.mkdtemp())
        >>> _ = (d / "model_index.json").write_text("{}")
        >>> try:
        ...     refuse_foreign(d, "metadata.json", ("images",), "generate")
        ... except FolderError as err:
        ...     print(str(err).split(": ", 1)[1])
        holds files that generate did not write (model_index.json) and no metadata.json; choose a new or empty folder
    """  # noqa: E501
    folder = Path(folder)
    if not folder.is_dir() or (folder / marker).exists():
        return
    other = sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")
                   and not any(fnmatch.fnmatch(p.name, pat) for pat in ours))  # fmt: skip
    if other:
        shown = ", ".join(other[:5]) + (f" and {len(other) - 5} more" if len(other) > 5 else "")
        raise FolderError(f"{str(folder)!r}: holds files that {command} did not write "
                          f"({shown}) and no {marker}; choose a new or empty folder")  # fmt: skip


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))
        if isinstance(started, int | float)
        else "?"
    )
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')}, started {when}"


class FolderLock:
    """Exclusive ownership of an output folder for one run (a context manager).

    :meth:`acquire` creates the folder (:func:`prepare_folder`), opens ``.run.lock``
    and takes an ``flock`` on it without waiting, then writes the owner (pid, host,
    start time) into it. A second run, in this process or another, finds the ``flock``
    held and fails with :class:`FolderError` naming the owner. The kernel drops the
    ``flock`` of a killed process, so a lock file left by a dead run is *stale*: it is
    taken over and its previous owner reported in :attr:`stale_owner`. On filesystems
    without ``flock`` the file's pid and host decide: a live pid on this host, or any
    other host, holds the folder; a dead pid on this host is stale. :meth:`release`
    deletes the file.

    ``name`` is the lock file's name: the processes of one multi-process job each take
    their own (:func:`experiments.processes.lock_name`; process 0 takes ``.run.lock``).

    Attributes:
        folder: the locked folder.
        path: the lock file.
        stale_owner: the dict a dead previous owner left (``pid``, ``host``,
            ``started``), or None.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> with FolderLock(d):
        ...     try:
        ...         FolderLock(d).acquire()
        ...     except FolderError as err:
        ...         print("in use" in str(err))
        True
        >>> with FolderLock(d) as lock:  # free again once released
        ...     lock.stale_owner is None
        True
    """

    def __init__(self, folder, name: str = LOCK_NAME):
        self.folder = Path(folder)
        self.path = self.folder / name
        self.stale_owner: dict | None = None
        self._fd: int | None = None

    def _read_owner(self, fd: int) -> dict | None:
        try:
            raw = os.pread(fd, 4096, 0)
            if not raw.strip():
                return None  # a new lock file
            owner = json.loads(raw.decode("utf-8"))
        except (OSError, ValueError):
            owner = None
        return owner if isinstance(owner, dict) else {"pid": "?", "host": "?"}

    def _in_use(self, owner: dict | None) -> FolderError:
        who = _describe(owner) if owner else "owner unknown"
        return FolderError(
            f"{str(self.folder)!r} is in use by another run ({who}); wait for it to finish "
            f"or choose another folder (lock file {str(self.path)!r})"
        )

    def acquire(self) -> FolderLock:
        """Take the lock (see the class docstring); returns ``self``.

        Raises:
            FolderError: the folder is unusable (:func:`prepare_folder`) or held by a
                live run.
        """
        import fcntl

        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this FolderLock")
        prepare_folder(self.folder)
        host = socket.gethostname()
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as err:
                raise FolderError(
                    f"{str(self.folder)!r}: cannot create the lock file ({err.strerror})"
                ) from err
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                has_flock = True
            except BlockingIOError:
                # the holder writes its pid right after locking: give it a moment so the
                # error can name it
                owner = self._read_owner(fd)
                deadline = time.monotonic() + 2.0
                while owner is None and time.monotonic() < deadline:
                    time.sleep(0.02)
                    owner = self._read_owner(fd)
                os.close(fd)
                raise self._in_use(owner) from None
            except OSError as err:
                if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    os.close(fd)
                    raise
                has_flock = False  # no flock here: the pid / host in the file decide
            # the owner we raced with may have deleted the file we locked: lock the new one
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            owner = self._read_owner(fd)
            if owner and not has_flock:
                pid = owner.get("pid")
                alive = (
                    owner.get("host") != host
                    or not isinstance(pid, int)
                    or (pid != os.getpid() and _pid_alive(pid))
                )
                if alive:
                    os.close(fd)
                    raise self._in_use(owner)
            self.stale_owner = owner
            me = {"pid": os.getpid(), "host": host, "started": time.time()}
            try:
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(me).encode("utf-8"), 0)
                os.fsync(fd)
            except OSError as err:
                os.close(fd)
                raise FolderError(
                    f"{str(self.folder)!r}: cannot write the lock file ({err.strerror})"
                ) from err
            self._fd = fd
            return self

    def take_over_others(self, keep=()) -> list[dict]:
        """Holding the folder's lead lock, check the folder's other lock files
        (``.run.lock.<i>``, those of a job's processes ``i > 0``) but those named in
        ``keep`` (this job's own): one a live process holds makes the folder in use
        (:class:`FolderError`); a stale one, left by a killed job, is deleted -- this run
        now covers that process's share. Returns the stale owners.

        Example:
            >>> import tempfile
            >>> d = Path(tempfile.mkdtemp())
            >>> _ = (d / ".run.lock.1").write_text('{"pid": 1, "host": "gone"}')
            >>> with FolderLock(d) as lock:
            ...     lock.take_over_others(), (d / ".run.lock.1").exists()
            ([{'pid': 1, 'host': 'gone'}], False)
        """
        if self._fd is None:
            raise RuntimeError("take_over_others needs the lock held (acquire() first)")
        stale = []
        for path in sorted(self.folder.glob(f"{LOCK_NAME}.*")):
            if path.name in keep or not path.name[len(LOCK_NAME) + 1:].isdigit():
                continue
            other = FolderLock(self.folder, path.name)
            other.acquire()  # FolderError while a live process holds it
            if other.stale_owner:
                stale.append(other.stale_owner)
            other.release()
        return stale

    def release(self) -> None:
        """Delete the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # while still holding it: a waiter re-checks the inode
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
