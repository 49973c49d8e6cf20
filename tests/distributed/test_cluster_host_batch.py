"""Whole validation cases stay on the CPU under DDP on GPUs.

DDP's forward with ``device_ids`` (every CUDA run) moves the tensors of its inputs to the GPU
with ``torch.distributed.utils._to_kwargs``, whatever ``transfer_batch_to_device`` did; gloo on
the CPU never calls it. Here it is called as DDP's ``_pre_forward`` calls it, towards the
``meta`` device (no GPU needed): a dict batch is moved, the module's whole-case batch is not.
"""

from __future__ import annotations

import lightning as L
import torch
from torch.distributed.utils import _to_kwargs

from sap_lightning.batches.patches import HostBatch
from sap_lightning.config import load_config, to_dict
from sap_lightning.modules import LesionSegmentation
from tests.tiny import TINY_CONFIG

DATA_INFO = {
    "in_channels": 2,
    "num_classes": 2,
    "channel_names": ["t1", "b1000"],
    "label_names": ["background", "lesion"],
    "spacing": [2.0, 2.0, 4.0],
}


def _whole_case() -> dict:
    return {
        "image": torch.rand(1, 2, 40, 36, 48),
        "label": torch.zeros(1, 1, 40, 36, 48, dtype=torch.int64),
        "body": torch.ones(1, 1, 40, 36, 48, dtype=torch.bool),
        "case_id": ["p0"],
        "spacing": torch.tensor([[2.0, 2.0, 4.0]], dtype=torch.float64),
    }


def _ddp_moves(batch: object) -> object:
    """What DDP's forward hands the module for input ``batch`` on device ``meta``."""
    moved, _ = _to_kwargs((batch,), {}, torch.device("meta"), False)
    return moved[0][0]


def test_ddp_moves_a_dict_but_not_a_host_batch() -> None:
    moved = _ddp_moves(_whole_case())
    assert moved["image"].device.type == "meta"  # the check can fail: a dict is moved
    kept = _ddp_moves(HostBatch(_whole_case()))
    assert isinstance(kept, HostBatch)
    assert all(v.device.type == "cpu" for v in kept.values() if isinstance(v, torch.Tensor))
    assert kept["case_id"] == ["p0"] and kept.get("body") is not None and len(kept) == 5


def test_the_module_hands_whole_cases_to_ddp_as_host_batches() -> None:
    module = LesionSegmentation(to_dict(load_config(TINY_CONFIG, ["task=lesion"])), DATA_INFO)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    module.trainer = trainer
    trainer.validating = True
    batch = module.transfer_batch_to_device(_whole_case(), torch.device("meta"), 0)
    assert isinstance(batch, HostBatch)
    assert _ddp_moves(batch)["image"].device.type == "cpu"
    trainer.training = True  # training patches do go to the device
    patches = module.transfer_batch_to_device(_whole_case(), torch.device("meta"), 0)
    assert patches["image"].device.type == "meta"
