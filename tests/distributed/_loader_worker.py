"""Run by ``test_loader_ddp.py``: a real 2-process DDP fit (CPU, gloo) whose LightningModule
records every training patch it receives, written per rank to ``OUT/rank<r>.json``.

Usage: ``python _loader_worker.py DATASET OUT [key=value ...]`` (Lightning's DDP launcher runs
this script again for rank 1 with the same arguments).
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch

from sap_lightning.batches.datamodule import build_datamodule
from sap_lightning.config import load_config
from sap_lightning.core.io import write_json

MAX_EPOCHS = 3


class PatchRecorder(L.LightningModule):
    """Trains one dummy weight; records epoch, plan task and case of every patch it sees."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[dict] = []
        self.steps: dict[int, int] = {}
        self.plans: dict[int, list] = {}

    def training_step(self, batch, batch_idx):
        datamodule = self.trainer.datamodule
        for row, (index, case_id) in enumerate(zip(batch["task_index"].tolist(), batch["case_id"])):
            task = datamodule.plan.tasks[index]
            assert task.case_id == case_id, (task, case_id)
            self.seen.append(
                {
                    "epoch": self.current_epoch,
                    "plan_epoch": datamodule.plan.epoch,
                    "index": index,
                    "case_id": case_id,
                    "kind": task.kind,
                    "target": task.target,
                    "location": batch["location"][row].tolist(),
                }
            )
        self.steps[self.current_epoch] = self.steps.get(self.current_epoch, 0) + 1
        return (self.weight * batch["image"].mean()).sum()

    def on_train_epoch_end(self) -> None:
        self.plans[self.current_epoch] = [
            [t.case_id, t.kind, t.target] for t in self.trainer.datamodule.plan.tasks
        ]

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main(dataset: str, out: str, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.dataset={dataset}", *overrides])
    L.seed_everything(cfg.seed, verbose=False)
    datamodule = build_datamodule(cfg)
    model = PatchRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        use_distributed_sampler=False,
        max_epochs=MAX_EPOCHS,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=datamodule.callbacks(),
    )
    trainer.fit(model, datamodule=datamodule)
    write_json(
        Path(out) / f"rank{trainer.global_rank}.json",
        {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "steps_per_epoch": datamodule.steps_per_epoch,
            "steps": model.steps,
            "seen": model.seen,
            "plans": model.plans,
        },
    )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
