"""``sap export`` / ``sap inspect-checkpoint`` on a checkpoint written by a real Lightning Trainer."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from torch import nn

from sap_lightning.backbones import create_backbone, get_spec
from sap_lightning.backbones.checkpoints import make_backbone_meta
from sap_lightning.backbones.transfer import transfer_weights
from sap_lightning.cli import main


class SkeletonLike(L.LightningModule):
    """Minimal module with the library's layout: the network as ``net``, metadata in
    ``sap_meta``, plain-dict hyper-parameters, and an extra head beside the network."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters({"model": {"backbone": "unet_tiny", "kwargs": {}}, "lr": 0.1})
        self.net = create_backbone("unet_tiny", 2, 10)
        self.aux_head = nn.Linear(64, 4)

    def training_step(self, batch, batch_idx):
        (image,) = batch
        return self.net(image).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=0.1)

    def on_save_checkpoint(self, checkpoint):
        checkpoint["sap_meta"] = make_backbone_meta(
            backbone="unet_tiny",
            backbone_kwargs={},
            in_channels=2,
            out_channels=10,
            task="skeleton",
            channel_names=["T1", "b1000"],
            label_names=[f"class_{i}" for i in range(10)],
            spacing=[2.0, 2.0, 5.0],
            normalisation={"clip_percentiles": [1, 99]},
        )


def fit_and_save(path) -> SkeletonLike:
    torch.manual_seed(0)
    module = SkeletonLike()
    data = torch.utils.data.TensorDataset(torch.randn(2, 2, 16, 16, 32))
    trainer = L.Trainer(
        max_steps=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    trainer.save_checkpoint(path)
    return module


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run")
    module = fit_and_save(folder / "last.ckpt")
    return folder, module


def test_export_then_finetune_chain(trained, capsys):
    folder, module = trained
    exported = folder / "skeleton_backbone.pt"
    assert main(["export", str(folder / "last.ckpt"), str(exported)]) == 0
    assert "exported unet_tiny (skeleton" in capsys.readouterr().out

    payload = torch.load(exported, weights_only=True)
    trained_state = module.net.state_dict()
    assert set(payload["state_dict"]) == set(trained_state)
    assert all(torch.equal(payload["state_dict"][k], v) for k, v in trained_state.items())
    assert payload["meta"]["task"] == "skeleton"
    assert payload["meta"]["channel_names"] == ["T1", "b1000"]

    # Stage 2: a binary lesion network starts from everything but the head.
    lesion = create_backbone("unet_tiny", 2, 2)
    report = transfer_weights(lesion, exported, spec="unet_tiny", expected_task="skeleton")
    assert report.skipped == list(get_spec("unet_tiny").head_keys)
    assert torch.equal(
        lesion.state_dict()["down_4.convs.conv_1.conv.weight"],
        trained_state["down_4.convs.conv_1.conv.weight"],
    )

    # Nothing already written is replaced without --overwrite.
    before = exported.read_bytes()
    assert main(["export", str(folder / "last.ckpt"), str(exported)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert exported.read_bytes() == before
    assert main(["export", str(folder / "last.ckpt"), str(exported), "--overwrite"]) == 0


def test_inspect_checkpoint(trained, capsys):
    folder, module = trained
    ckpt = folder / "last.ckpt"
    assert main(["inspect-checkpoint", str(ckpt), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    n_net = len(module.net.state_dict())
    assert summary["kind"] == "lightning checkpoint"
    assert summary["tensors"] == n_net + 2
    assert summary["prefixes"] == {"net": n_net, "aux_head": 2}
    assert summary["parameters"] == sum(
        t.numel() for t in module.state_dict().values() if t.is_floating_point()
    )
    assert summary["head_shapes"] == {
        "net.final_conv.weight": [10, 16, 1, 1, 1],
        "net.final_conv.bias": [10],
    }
    assert summary["meta"]["backbone"] == "unet_tiny"

    assert main(["inspect-checkpoint", str(ckpt)]) == 0
    text = capsys.readouterr().out
    assert "lightning checkpoint" in text and "net.final_conv.weight [10, 16, 1, 1, 1]" in text
    assert '"task": "skeleton"' in text


def test_cli_errors_name_the_file(trained, tmp_path, capsys):
    folder, _ = trained
    # A Lightning checkpoint of a module that does not write sap_meta.
    checkpoint = torch.load(folder / "last.ckpt", weights_only=True)
    del checkpoint["sap_meta"]
    no_meta = tmp_path / "foreign.ckpt"
    torch.save(checkpoint, no_meta)
    assert main(["export", str(no_meta), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "foreign.ckpt" in err and "sap_meta" in err
    assert not (tmp_path / "out.pt").exists()

    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(no_meta.read_bytes()[:1000])
    assert main(["inspect-checkpoint", str(broken)]) == 2
    assert (
        "broken.ckpt: cannot read the file, it is truncated or corrupt" in capsys.readouterr().err
    )


def test_inspect_checkpoint_accepts_a_run_folder(trained, tmp_path, capsys):
    """The run folder that ``sap predict`` accepts: its checkpoints/last.ckpt is inspected."""
    folder, _ = trained
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes((folder / "last.ckpt").read_bytes())
    assert main(["inspect-checkpoint", str(run), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["file"].endswith("checkpoints/last.ckpt")
    assert summary["kind"] == "lightning checkpoint"
    assert main(["inspect-checkpoint", str(tmp_path)]) == 2  # a folder that is no run
    assert "run folder without" in capsys.readouterr().err
