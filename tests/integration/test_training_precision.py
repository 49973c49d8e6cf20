"""The CPU files train under bfloat16 autocast where the CPU has fast kernels for it, and in
float32 elsewhere; the run folder records what ran, and the study report names it."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from sap_lightning.config import load_config
from sap_lightning.core import mixed_precision
from sap_lightning.pipeline.train import run_training
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

STEPS = 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    return prepare_tiny_datasets(tmp_path_factory.mktemp("precision"))


class ConvolutionDtypes(L.Callback):
    """The output dtype of every convolution during the first training step, by input depth."""

    def __init__(self) -> None:
        self.seen: set[tuple[int, torch.dtype]] = set()
        self.hooks: list = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == 0:
            for module in pl_module.net.modules():
                if isinstance(module, torch.nn.Conv3d):
                    self.hooks.append(module.register_forward_hook(self._record))

    def _record(self, module, inputs, output) -> None:
        self.seen.add((min(inputs[0].shape[2:]), output.dtype))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()


@pytest.mark.parametrize("fast_kernels", [True, False], ids=["bf16-cpu", "other-cpu"])
def test_the_cpu_files_train_in_bf16_where_the_cpu_has_the_kernels(
    data, tmp_path: Path, monkeypatch, caplog, fast_kernels: bool
) -> None:
    monkeypatch.setattr(mixed_precision, "_cpu_supports", lambda dtype: fast_kernels)
    mixed_precision._warn_float32_training.cache_clear()
    run_dir = tmp_path / "run"
    cfg = load_config(
        EXPERIMENTS / "cpu" / "finetune_scratch.yaml",
        [
            *TINY_TRAINING,
            "logger=none",
            f"data.dataset={data['lesion']}",
            f"run_dir={run_dir}",
            f"trainer.max_steps={STEPS}",
            "optim.warmup_steps=1",
        ],
    )
    assert cfg.trainer.precision == "bf16-mixed"  # what the CPU files ask for
    dtypes = ConvolutionDtypes()
    with caplog.at_level("WARNING"):
        result = run_training(cfg, extra_callbacks=[dtypes])

    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["precision"]
    warned = any("training runs in float32" in r.getMessage() for r in caplog.records)
    checkpoint = torch.load(result.last_checkpoint, weights_only=True)
    assert checkpoint["global_step"] == STEPS
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
    if fast_kernels:
        assert recorded == "bf16-mixed" and not warned
        # Convolutions ran in bfloat16, except those on the 2-voxel-deep bottleneck (guarded).
        assert {dtype for depth, dtype in dtypes.seen if depth >= 3} == {torch.bfloat16}
        assert {dtype for depth, dtype in dtypes.seen if depth < 3} == {torch.float32}
    else:
        assert recorded == "32-true" and warned
        assert {dtype for _, dtype in dtypes.seen} == {torch.float32}
