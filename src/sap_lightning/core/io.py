"""Atomic file writing and inter-process locks: a crash never leaves a half-written file that a
later command reads as valid, and concurrent writers never take each other's files.

Every writer in the library goes through these helpers: the content is written to a temporary
name in the destination folder and renamed over the final name, which is atomic on POSIX file
systems. Temporary names carry the writer's pid and a random token, so several processes (or
hosts sharing a file system) writing the same file never share a temporary name.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"
"""Hidden temporary names are ``.<name>.tmp-<pid>-<token>`` (folders: ``.<name>.old-...`` too)."""


def _writer_tag() -> str:
    """``<pid>-<random>``: unique per writer even across hosts sharing a file system."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}{TMP_MARK}{_writer_tag()}")


def writer_pid(name: str) -> int | None:
    """The pid recorded in a temporary name made here (``None`` when it is not one)."""
    for mark in (TMP_MARK, ".old-"):
        if name.startswith(".") and mark in name:
            pid = name.rsplit(mark, 1)[1].split("-", 1)[0]
            return int(pid) if pid.isdigit() else None
    return None


def _name_destination(err: OSError, path: Path, tmp: Path) -> OSError:
    """The same error, naming the file the user asked for instead of a hidden temporary one."""
    if err.filename not in (None, str(tmp), tmp) or err.errno is None:
        return err
    return OSError(err.errno, err.strerror or os.strerror(err.errno), str(path))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``.

    On an exception the temporary file is removed and ``path`` (if it existed) is untouched;
    an ``OSError`` (disk full, read-only folder) names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        raise _name_destination(err, path, tmp) from err
    finally:
        # A missing file, or a read-only folder (EROFS even for a missing one), must not hide
        # the error that got here.
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    Used for multi-file records (a cache case): readers only ever see a complete folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{TMP_MARK}{os.getpid()}-", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = path.with_name(f".{path.name}.old-{_writer_tag()}")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as err:
        raise _name_destination(err, path, tmp) from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_UNWRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False) -> Iterator[bool]:
    """Hold an ``fcntl.flock`` lock on ``path`` until the block ends; yields whether it is held.

    Writers take it exclusively (creating the file), readers shared, so a reader never sees a
    writer's half-done update and two writers never interleave; a process that dies releases it.
    flock works across hosts on NFSv4 (Linux emulates it with POSIX locks); Lustre needs its
    ``flock`` mount option. A reader finding no lock file reads unlocked: no writer of this
    library has been there (writers create it first). A writer that cannot create it (a
    read-only folder) runs unlocked too: nobody can write there, and its own first write fails
    naming the folder.
    """
    path = Path(path)
    fd = None
    if shared:
        with contextlib.suppress(OSError):
            fd = os.open(path, os.O_RDONLY)
    else:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            if err.errno not in _UNWRITABLE:
                raise
            with contextlib.suppress(OSError):
                fd = os.open(path, os.O_RDONLY)  # an existing lock file still works
    if fd is None:
        log.debug("%s: no lock file (read-only or never written); continuing unlocked", path)
        yield False
        return
    try:
        mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for %s (another process holds it)", path)
            fcntl.flock(fd, mode)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically (numpy scalars and arrays are converted)."""
    return write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    with open(path) as f:
        return json.load(f)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")
