"""The masked-autoencoder recipe (modules/mae.py): masks, loss, module and its transfer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sap_lightning.backbones.checkpoints import load_checkpoint_file
from sap_lightning.config import load_config
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.modules import ContrastivePretraining, MaskedAutoencoderPretraining, build_module
from sap_lightning.modules.mae import block_mask, masked_mse
from tests.tiny import TINY_CONFIG

INFO = {"in_channels": 2, "channel_names": ["T1", "b1000"], "spacing": [1.5, 1.5, 4.0]}
DATA = {
    "ssl": {**INFO, "num_classes": None, "label_names": []},
    "lesion": {**INFO, "num_classes": 2, "label_names": ["background", "lesion"]},
}
MAE = ["pretraining=mae", "mae.block_size=8"]


def make(task: str, *overrides: str, seed: int = 0):
    torch.manual_seed(seed)
    return build_module(load_config(TINY_CONFIG, [f"task={task}", *overrides]), DATA[task])


def test_block_mask_hides_the_ratio_of_whole_blocks() -> None:
    generator = torch.Generator().manual_seed(0)
    mask = block_mask(3, (16, 24, 32), 8, 0.75, generator)
    assert mask.shape == (3, 1, 16, 24, 32)
    blocks = mask.numpy()[:, 0].reshape(3, 2, 8, 3, 8, 4, 8)  # (b, gx, 8, gy, 8, gz, 8)
    per_block = blocks.transpose(0, 1, 3, 5, 2, 4, 6).reshape(3, 24, 512)
    assert np.all(per_block.min(axis=2) == per_block.max(axis=2))  # each block all 0 or all 1
    assert np.all((per_block[:, :, 0] == 0).sum(axis=1) == int(0.75 * 24))  # 18 of 24 blocks
    assert not np.array_equal(per_block[0, :, 0], per_block[1, :, 0])  # per-patch masks
    again = block_mask(3, (16, 24, 32), 8, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(mask, again)


def test_masked_mse_scores_only_masked_voxels() -> None:
    generator = torch.Generator().manual_seed(1)
    target = torch.rand(2, 2, 8, 8, 8, generator=generator)
    output = torch.rand(2, 2, 8, 8, 8, generator=generator)
    mask = block_mask(2, (8, 8, 8), 4, 0.5, generator)
    hidden = np.broadcast_to(mask.numpy() == 0, target.shape)
    expected = ((output.numpy() - target.numpy()) ** 2)[hidden].mean()
    assert masked_mse(output, target, mask).item() == pytest.approx(float(expected), rel=1e-5)
    changed = torch.where(mask.bool().expand_as(output), output + 5.0, output)  # visible only
    assert masked_mse(changed, target, mask).item() == pytest.approx(float(expected), rel=1e-5)


def test_mae_module_reconstructs_the_image_channels_and_trains_the_whole_net() -> None:
    module = make("ssl", *MAE)
    assert isinstance(module, MaskedAutoencoderPretraining)
    assert isinstance(make("ssl"), ContrastivePretraining)  # off by default
    image = torch.rand(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    assert module(image).shape == image.shape
    loss = module.mae_loss(image)
    loss.backward()
    assert all(p.grad is not None for p in module.net.parameters())
    assert module.backbone_meta()["task"] == "ssl"
    assert module.backbone_meta()["recipe"] == "mae"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["mae.block_size=12"], "must divide"),
        (["mae.mask_ratio=1.0"], "mask_ratio"),
        (["mae.block_size=32", "mae.mask_ratio=0.5"], "masks no block"),
    ],
)
def test_bad_mae_settings_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make("ssl", "pretraining=mae", *overrides)


def test_mae_validation_is_deterministic_per_patch() -> None:
    module = make("ssl", *MAE).eval()
    patches = {
        "image": torch.rand(2, 2, 32, 32, 32, generator=torch.Generator().manual_seed(0)),
        "case_id": ["a", "a"],
        "location": torch.tensor([[0, 0, 0, 32, 32, 32], [0, 0, 8, 32, 32, 40]]),
    }
    with torch.no_grad():
        module.validation_step(patches, 0)
        first = module.val_losses.compute()
        module.val_losses.reset()
        module.validation_step(patches, 3)
        second = module.val_losses.compute()
    assert first[1] == 2
    torch.testing.assert_close(first[0], second[0])


def test_mae_init_loads_the_encoder_only_and_sap_refuses_it(tmp_path: Path) -> None:
    make("ssl", *MAE, seed=1).export_backbone(tmp_path / "mae" / "backbone.pt")
    source = load_checkpoint_file(tmp_path / "mae" / "backbone.pt")["state_dict"]
    lesion = make("lesion", "model.init=mae", f"model.pretrained={tmp_path / 'mae'}", seed=2)
    fresh = {k: v.clone() for k, v in lesion.net.state_dict().items()}
    report = lesion.initialise_from_pretrained()
    assert report["init"] == "mae" and report["loaded"]
    encoder = ("conv_0.", "down_1.", "down_2.", "down_3.", "down_4.")  # unet_tiny's spec
    for name, tensor in lesion.net.state_dict().items():
        if name.startswith(encoder):
            assert torch.equal(tensor, source[name]), name
        else:
            assert torch.equal(tensor, fresh[name]), name  # decoder and head stay fresh
    wrong = make("lesion", "model.init=sap", f"model.pretrained={tmp_path / 'mae'}")
    with pytest.raises(CheckpointError, match="'ssl' checkpoint"):
        wrong.initialise_from_pretrained()
