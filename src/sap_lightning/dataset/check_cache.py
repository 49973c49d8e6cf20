"""Remembering per-file check results, so an unchanged dataset is not read voxel by voxel again.

``check_dataset`` reads every voxel of every file (seconds per whole-body case). Its per-file
result depends only on the file's content, so it is stored with the file's fingerprint: path,
size, ``mtime_ns`` and a hash of the header bytes (the NIfTI header, uncompressed; the first
bytes of other formats, which hold their header). A file whose fingerprint still matches is not
read again; any change (a rewrite, ``touch``, a copy with another size or header) re-reads it.

Only clean results are stored: a broken file is read again every time, so a problem is never
reported from memory after the file was fixed (or hidden after it broke). Results of files
modified less than ``RACY_MARGIN_NS`` before the check started are not stored either: a file
system with coarse timestamps could give a later change the same ``mtime``.

The results live outside the dataset, which the library never writes into (it may be
read-only or shared): in ``$SAP_CACHE_DIR/checks/`` (default ``~/.cache/sap_lightning/checks/``),
one file per dataset, named by a hash of the dataset's path. Writing is atomic and never fails a
command: when that folder is not writable the results are simply not kept.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sap_lightning.core.io import read_json, write_json

log = logging.getLogger(__name__)

CACHE_DIR_ENV = "SAP_CACHE_DIR"
RACY_MARGIN_NS = 1_000_000_000
"""Results of files modified this shortly before a check are not stored (coarse mtimes)."""
_NIFTI_HEADER_BYTES = 352
"""NIfTI-1 header (348 bytes) and the extension flag."""
_OTHER_HEADER_BYTES = 4096
"""NRRD and MetaImage headers are text at the start of the file, well under 4 KiB."""


def results_location(root: Path) -> Path:
    """Where the check results of the dataset at ``root`` are kept: one file per dataset path."""
    base = os.environ.get(CACHE_DIR_ENV)
    folder = Path(base) if base else Path.home() / ".cache" / "sap_lightning"
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:20]
    return folder / "checks" / f"{digest}.json"


def header_digest(path: Path) -> str:
    """SHA-1 of the file's header bytes (decompressed for ``.gz``)."""
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        with gzip.open(path, "rb") as f:
            head = f.read(_NIFTI_HEADER_BYTES)
    else:
        size = _NIFTI_HEADER_BYTES if name.endswith(".nii") else _OTHER_HEADER_BYTES
        with open(path, "rb") as f:
            head = f.read(size)
    return hashlib.sha1(head).hexdigest()


def fingerprint(path: Path) -> dict[str, Any] | None:
    """``{size, mtime_ns, header}`` of a file; ``None`` when it cannot be read (no caching)."""
    try:
        stat = path.stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "header": header_digest(path)}
    except (OSError, EOFError, ValueError) as err:  # gzip raises on corrupt streams
        log.debug("check cache: no fingerprint for %s (%s)", path, err)
        return None


# --------------------------------------------------------------------------- (de)serialising


def encode(report: Any) -> dict[str, Any]:
    """A dataclass instance as JSON (arrays, sets and tuples tagged so they come back as such)."""
    return {f.name: _encode_value(getattr(report, f.name)) for f in dataclasses.fields(report)}


def decode(cls: type, data: dict[str, Any]) -> Any:
    """The inverse of :func:`encode` for dataclass ``cls``."""
    return cls(**{name: _decode_value(value) for name, value in data.items()})


def _encode_value(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return {"__ndarray__": value.tolist(), "dtype": str(value.dtype)}
    if isinstance(value, (set, frozenset)):
        return {"__set__": sorted(value)}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode_value(v) for v in value]}
    if isinstance(value, list):
        return [_encode_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            return np.asarray(value["__ndarray__"], dtype=value["dtype"])
        if "__set__" in value:
            return set(value["__set__"])
        if "__tuple__" in value:
            return tuple(_decode_value(v) for v in value["__tuple__"])
    if isinstance(value, list):
        return [_decode_value(v) for v in value]
    return value


# --------------------------------------------------------------------------- the store


class CheckCache:
    """Per-file check results of one dataset, looked up by fingerprint.

    ``version`` names what produced the results (the checker's format); results stored under
    another version are ignored.
    """

    def __init__(self, root: Path, version: str) -> None:
        self.root = root
        self.version = version
        self.started_ns = time.time_ns()
        self._stored: dict[str, dict[str, Any]] = {}
        self._stored.update(self._read(results_location(root)))
        self._kept: dict[str, dict[str, Any]] = {}

    def _read(self, location: Path) -> dict[str, dict[str, Any]]:
        try:
            raw = read_json(location)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.debug("check cache: ignoring unreadable %s (%s)", location, err)
            return {}
        if not isinstance(raw, dict) or raw.get("version") != self.version:
            return {}
        files = raw.get("files")
        return files if isinstance(files, dict) else {}

    def _key(self, path: Path, kind: str) -> str:
        try:
            rel = path.relative_to(self.root).as_posix()
        except ValueError:
            rel = str(path.resolve())
        return f"{kind}:{rel}"

    def lookup(self, path: Path, kind: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """``(stored result or None, fingerprint)``; a hit is kept for the next save."""
        key = self._key(path, kind)
        current = fingerprint(path)
        entry = self._stored.get(key)
        if current is None or not isinstance(entry, dict):
            return None, current
        if {name: entry.get(name) for name in current} != current:
            return None, current
        self._kept[key] = entry
        return entry.get("result"), current

    def store(
        self, path: Path, kind: str, print_: dict[str, Any] | None, result: dict[str, Any]
    ) -> None:
        """Remember a clean result read from a file with fingerprint ``print_``."""
        if print_ is None or print_["mtime_ns"] >= self.started_ns - RACY_MARGIN_NS:
            return
        self._kept[self._key(path, kind)] = {**print_, "result": result}

    def save(self) -> None:
        """Write the results of this check (entries of files gone or changed are dropped)."""
        if self._kept == self._stored:
            return
        payload = {"version": self.version, "dataset": str(self.root.resolve()), "files": {}}
        payload["files"] = dict(sorted(self._kept.items()))
        location = results_location(self.root)
        try:
            write_json(location, payload)
        except OSError as err:
            log.debug("check cache: cannot write %s (%s)", location, err)
