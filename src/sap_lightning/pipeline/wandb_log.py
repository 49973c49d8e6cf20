"""What a run sends to W&B besides the Trainer's metrics: what users compare arms with.

- fine-tuning: the transfer report (what was loaded from where) as a table and in the run
  summary, and at the end the validation evaluation (``evaluation/cases.csv``) as a
  ``wandb.Table`` with its FROC plot;
- fine-tuning, every validation: the b1000 MIPs of a fixed set of validation cases with their
  true / false positives and misses (``val/pictures``);
- pretraining: the exported ``backbone.pt`` as a W&B model artifact carrying its metadata
  (backbone, channels, labels, spacing, task), so fine-tuning runs can be traced to it.

Only the process that owns the W&B run calls these; nothing here reads or writes API keys.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pandas as pd
from lightning.pytorch.loggers import WandbLogger
from matplotlib.image import imsave

from sap_lightning.core.io import atomic_path
from sap_lightning.core.run_layout import EVALUATION_DIR
from sap_lightning.evaluation.case_pictures import PICTURES_DIR

log = logging.getLogger(__name__)

CASES_CSV = "cases.csv"
FROC_PNG = "froc.png"


def _artifact_name(text: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)


def log_transfer_report(logger: WandbLogger, report: dict[str, Any]) -> None:
    import wandb

    counts = {
        key: len(value)
        for key, value in report.items()
        if isinstance(value, list) and key in ("loaded", "adapted", "skipped", "missing")
    }
    logger.experiment.summary.update(
        {f"transfer/{key}": count for key, count in counts.items()}
        | {"transfer/init": report.get("init"), "transfer/source": report.get("pretrained_file")}
    )
    rows = [
        [status, key]
        for status in ("loaded", "adapted", "skipped", "missing")
        for key in report.get(status, [])
        if isinstance(key, str)
    ]
    logger.experiment.log({"transfer/report": wandb.Table(columns=["status", "key"], data=rows)})


def log_backbone_artifact(
    logger: WandbLogger, run_name: str, backbone: Path, meta: dict[str, Any]
) -> None:
    import wandb

    artifact = wandb.Artifact(
        _artifact_name(f"{run_name}-backbone"),
        type="model",
        metadata={k: v for k, v in meta.items() if isinstance(v, str | int | float | list)},
    )
    artifact.add_file(str(backbone))
    logger.experiment.log_artifact(artifact)


def log_validation_pictures(logger: WandbLogger, pictures: dict[str, Any], step: int) -> None:
    """A validation's case pictures under one key, the same cases every time (a W&B media
    panel with a step slider shows the network learning)."""
    if pictures:
        names = sorted(pictures)
        logger.log_image(
            key="val/pictures", images=[pictures[n] for n in names], caption=names, step=step
        )


def log_evaluation(logger: WandbLogger, run_dir: Path) -> None:
    """The last validation's per-case table and FROC plot, when the run wrote them."""
    import wandb

    folder = run_dir / EVALUATION_DIR
    payload: dict[str, Any] = {}
    if (folder / CASES_CSV).is_file():
        payload["evaluation/cases"] = wandb.Table(dataframe=pd.read_csv(folder / CASES_CSV))
    if (folder / FROC_PNG).is_file():
        payload["evaluation/froc"] = wandb.Image(str(folder / FROC_PNG))
    if payload:
        logger.experiment.log(payload)


def keep_validation_pictures(module: Any) -> None:
    """This validation's case pictures: to W&B (``val/pictures``) with a W&B logger, else as
    ``<run>/pictures/step<N>/<case>.png``."""
    pictures, step = module.validation_pictures, module.global_step
    if isinstance(module.logger, WandbLogger):
        log_validation_pictures(module.logger, pictures, step)
    elif module.cfg.run_dir is not None:
        folder = Path(module.cfg.run_dir) / PICTURES_DIR / f"step{step:06d}"
        for case_id, rgb in pictures.items():
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / f"{case_id}.png") as tmp:
                imsave(tmp, rgb, format="png")
