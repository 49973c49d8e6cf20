"""Run the real ``sap`` command line, pausing at a chosen point so a test can ``kill -9`` it there.

Usage::

    python tests/integration/_pausing_cli.py MARKER WHERE -- <sap arguments>

``WHERE`` is

- ``batch:E:B``: after training batch ``B`` of epoch ``E`` (so, for ``E >= 1``, mid-epoch with
  the previous epoch's ``last.ckpt`` on disk);
- ``checkpoint:N``: in the middle of writing the ``N``-th ``last.ckpt``: half of its bytes are
  written and flushed to the file being written, the rest never comes;
- ``run:SUFFIX:E``: at the start of epoch ``E`` of the training run whose folder ends with
  ``SUFFIX`` (epoch ``E - 1``'s ``last.ckpt`` on disk), for ``sap study`` with ``workers: 1``;
- ``predict:N``: after the ``N``-th case ``sap predict`` (or a study's prediction step) wrote.

On reaching the point it writes ``MARKER`` (``"<epoch> <global step>"``) and sleeps; the test kills
it. A run that is not killed exits with status 3, so a missing kill cannot pass as success.
"""

from __future__ import annotations

import io
import os
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from sap_lightning.cli import main
from sap_lightning.pipeline import train

PAUSE_SECONDS = 300


def _pause(marker: Path, epoch: int, step: int) -> None:
    marker.write_text(f"{epoch} {step}\n")
    time.sleep(PAUSE_SECONDS)
    print("pausing run was not killed", file=sys.stderr)
    sys.exit(3)


class PauseAfterBatch(L.Callback):
    def __init__(self, marker: Path, epoch: int, batch: int) -> None:
        self.marker, self.epoch, self.batch = marker, epoch, batch

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        if trainer.current_epoch == self.epoch and index == self.batch:
            _pause(self.marker, trainer.current_epoch, trainer.global_step)


class PauseAtEpochStart(L.Callback):
    def __init__(self, marker: Path, run_suffix: str, epoch: int) -> None:
        self.marker, self.run_suffix, self.epoch = marker, run_suffix, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        run_dir = str(getattr(pl_module.cfg, "run_dir", "")).rstrip("/")
        if trainer.current_epoch == self.epoch and run_dir.endswith(self.run_suffix):
            _pause(self.marker, trainer.current_epoch, trainer.global_step)


def pause_after_predicted_case(marker: Path, occurrence: int) -> None:
    """Make the ``occurrence``-th predicted case stop the process once it is written."""
    from sap_lightning.inference.predict import Predictor

    real = Predictor._predict_case
    seen = 0

    def predict_case(self: Predictor, *args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        written = real(self, *args, **kwargs)
        seen += 1
        if seen == occurrence:
            _pause(marker, -1, seen)
        return written

    Predictor._predict_case = predict_case  # type: ignore[method-assign]


def pause_inside_checkpoint_write(marker: Path, occurrence: int) -> None:
    """Make the ``occurrence``-th ``torch.save`` of ``last.ckpt`` stop half-way through."""
    real_save = torch.save
    seen = 0

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        nonlocal seen
        target = str(getattr(f, "name", f))
        if "last.ckpt" in Path(target).name:
            seen += 1
            if seen == occurrence:
                buffer = io.BytesIO()
                real_save(obj, buffer, *args, **kwargs)
                data = buffer.getvalue()
                out = open(target, "wb") if isinstance(f, (str, os.PathLike)) else f  # noqa: SIM115
                out.write(data[: len(data) // 2])
                out.flush()
                os.fsync(out.fileno())
                _pause(marker, int(obj.get("epoch", -1)), int(obj.get("global_step", -1)))
        real_save(obj, f, *args, **kwargs)

    torch.save = save


def run(marker: Path, where: str, argv: list[str]) -> int:
    kind, _, spec = where.partition(":")
    if kind == "batch":
        epoch, batch = (int(v) for v in spec.split(":"))
        build_callbacks = train.build_callbacks

        def with_pause(*args: Any, **kwargs: Any) -> list[L.Callback]:
            return [*build_callbacks(*args, **kwargs), PauseAfterBatch(marker, epoch, batch)]

        train.build_callbacks = with_pause
    elif kind == "run":
        suffix, _, epoch_text = spec.rpartition(":")
        build_callbacks = train.build_callbacks

        def with_epoch_pause(*args: Any, **kwargs: Any) -> list[L.Callback]:
            pause = PauseAtEpochStart(marker, suffix, int(epoch_text))
            return [*build_callbacks(*args, **kwargs), pause]

        train.build_callbacks = with_epoch_pause
    elif kind == "predict":
        pause_after_predicted_case(marker, int(spec))
    elif kind == "checkpoint":
        pause_inside_checkpoint_write(marker, int(spec))
    else:
        raise SystemExit(f"unknown pause point {where!r}")
    return main(argv)


if __name__ == "__main__":
    marker_arg, where_arg, separator, *sap_args = sys.argv[1:]
    assert separator == "--", "usage: _pausing_cli.py MARKER WHERE -- <sap arguments>"
    sys.exit(run(Path(marker_arg), where_arg, sap_args))
