"""The learning diagnostics' reading of a run's checkpoint: the stages whose every weight is zero."""

from __future__ import annotations

from pathlib import Path

import torch

from sap_lightning.backbones import create_backbone
from sap_lightning.core.run_layout import last_checkpoint_path
from sap_lightning.evaluation.diagnostics import RunDiagnostics, diagnostics_markdown, zero_stages
from sap_lightning.modules.losses import masked_cross_entropy


def _save(run_dir: Path, net: torch.nn.Module, extra: dict | None = None) -> None:
    state = {f"net.{key}": value for key, value in net.state_dict().items()}
    path = last_checkpoint_path(run_dir)
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": {**state, **(extra or {})}}, path)


def test_only_the_stages_with_every_weight_at_zero_are_named(tmp_path: Path) -> None:
    net = create_backbone("unet_tiny", 2, 2, features=(4, 4, 8, 8, 8, 4))
    with torch.no_grad():
        for stage in ("down_3", "down_4"):
            for parameter in getattr(net, stage).parameters():
                parameter.zero_()
        net.down_2.convs.conv_0.conv.weight.zero_()  # one tensor of down_2: the stage lives
    _save(tmp_path / "run", net, {"rotation_head.weight": torch.zeros(4, 4)})
    assert zero_stages(tmp_path / "run") == ["down_3", "down_4"]


def test_a_missing_or_broken_checkpoint_reads_as_unknown(tmp_path: Path) -> None:
    assert zero_stages(tmp_path / "never_trained") is None
    broken = last_checkpoint_path(tmp_path / "broken")
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a checkpoint")
    assert zero_stages(tmp_path / "broken") is None


def test_adams_coupled_weight_decay_kills_a_stage_without_gradient_and_adamw_does_not() -> None:
    """The mechanism the column watches for: a stage whose own gradient is far below its
    weight decay (here: its output scaled by 1e-9 before the head) is driven to zero by Adam at
    the learning rate per step; AdamW decays it by lr x decay per step only."""
    torch.manual_seed(0)
    left = {}
    for optimizer in (torch.optim.Adam, torch.optim.AdamW):
        stage, head = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        start = stage.weight.detach().abs().max().item()
        step = optimizer([*stage.parameters(), *head.parameters()], lr=1e-2, weight_decay=1e-5)
        for _ in range(300):
            x = torch.randn(16, 8)
            target = torch.randint(0, 2, (16,))
            logits = head(x + 1e-9 * stage(x))
            step.zero_grad()
            masked_cross_entropy(logits, target).backward()
            step.step()
        left[optimizer.__name__] = stage.weight.detach().abs().max().item() / start
    assert left["Adam"] < 1e-3 < 0.5 < left["AdamW"]


def test_the_learning_table_has_a_column_for_the_stages_at_zero() -> None:
    run = RunDiagnostics("skeleton pretraining", (), 10, 1.0, 0.5, zero_stages=["down_4"])
    unknown = RunDiagnostics("fine-tune", (), 10, 1.0, 0.5, zero_stages=None)
    alive = RunDiagnostics("other", (), 10, 1.0, 0.5, zero_stages=[])
    table = diagnostics_markdown([run, unknown, alive])
    assert "| skeleton pretraining | 10 | 1.000 -> 0.500 | down_4 |" in table
    assert "| fine-tune | 10 | 1.000 -> 0.500 | n/a |" in table
    assert "| other | 10 | 1.000 -> 0.500 | none |" in table
