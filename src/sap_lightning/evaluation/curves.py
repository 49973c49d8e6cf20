"""Training curves of a run folder, from whichever logger wrote them: Lightning's CSV logs or a
W&B run (offline or synced; ``<run>/wandb/*run-*/run-<id>.wandb``).

W&B no longer ships a Python reader for its ``.wandb`` files (its writer moved to a Go core), so
this reads the documented container directly: a 7-byte ``:W&B`` header, then LevelDB-log
records (32 KiB blocks, 7-byte record headers ``<crc32 uint32, length uint16, type uint8>``,
records split FIRST/MIDDLE/LAST across blocks), each a ``wandb_internal_pb2.Record`` protobuf;
history records carry the logged ``key -> JSON value`` pairs.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pandas as pd

from sap_lightning.core.errors import SapError

_MAGIC = b":W&B"
_FILE_HEADER = 7
_BLOCK = 32768
_RECORD_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_payloads(path: Path) -> Iterator[bytes]:
    """The raw protobuf payloads of a ``.wandb`` file, reassembled across blocks."""
    data = path.read_bytes()
    if data[:4] != _MAGIC:
        raise SapError(f"{path}: not a W&B run file (no ':W&B' header)")
    pos, pending = _FILE_HEADER, b""
    while pos + _RECORD_HEADER <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < _RECORD_HEADER:  # the writer pads the end of a block with zeros
            pos += room
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos : pos + _RECORD_HEADER])
        if kind == 0 and length == 0:  # zero padding
            pos += room
            continue
        chunk = data[pos + _RECORD_HEADER : pos + _RECORD_HEADER + length]
        pos += _RECORD_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""


def read_wandb_history(path: str | os.PathLike) -> pd.DataFrame:
    """Every logged history row of a ``.wandb`` file: one row per ``log`` call, a column per key
    (``_step`` included)."""
    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for payload in _wandb_payloads(Path(path)):
        record = pb.Record.FromString(payload)
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            try:
                row[key] = json.loads(item.value_json)
            except ValueError:
                continue
        rows.append(row)
    return pd.DataFrame(rows)


def _numeric(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.apply(pd.to_numeric, errors="coerce")


def read_training_curves(run_dir: str | os.PathLike) -> pd.DataFrame:
    """The logged values of a run folder (CSV logs, else W&B runs), a row per logging call with
    ``step`` and ``epoch`` where logged; empty when the run logged nothing readable."""
    run = Path(run_dir)
    csv_logs = sorted(run.glob("csv/version_*/metrics.csv"))
    frames = [pd.read_csv(path) for path in csv_logs]
    if not frames:
        wandb_files = sorted(run.glob("wandb/*run-*/run-*.wandb"))
        frames = [read_wandb_history(path) for path in wandb_files]
        frames = [
            frame.rename(columns={"_step": "step", "trainer/global_step": "step"})
            for frame in frames
            if not frame.empty
        ]
    if not frames:
        return pd.DataFrame()
    frame = _numeric(pd.concat(frames, ignore_index=True))
    return frame.loc[:, ~frame.columns.duplicated()]


def last_value(curves: pd.DataFrame, key: str) -> float:
    """The last logged value of ``key`` (NaN if never logged)."""
    if key not in curves:
        return math.nan
    values = curves[key].dropna()
    return float(values.iloc[-1]) if len(values) else math.nan
