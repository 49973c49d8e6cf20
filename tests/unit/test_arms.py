"""Contract test over every registered arm (as timm's over every model): its pretraining module,
experiment files, learning terms, exported metadata and transfer all agree with its registration.

A newly registered arm is checked without a new test (docs/extending.md).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from sap_lightning.config import load_config, load_study_config
from sap_lightning.config.files import EXPERIMENTS_DIR
from sap_lightning.core import arms
from sap_lightning.core.arms import Arm, get_arm, list_arms, register_arm
from sap_lightning.core.errors import CheckpointError, ConfigError
from sap_lightning.core.registry import Registry
from sap_lightning.modules import MODULES, build_module, module_class
from tests.tiny import TINY_CONFIG

INFO = {"in_channels": 2, "channel_names": ["T1", "b1000"], "spacing": [1.5, 1.5, 4.0]}
DATA = {
    "skeleton": {
        **INFO,
        "num_classes": 10,
        "label_names": ["background", *(f"region{i}" for i in range(1, 10))],
    },
    "lesion": {**INFO, "num_classes": 2, "label_names": ["background", "lesion"]},
    "ssl": {**INFO, "num_classes": None, "label_names": []},
}
PRETRAINED = [name for name in list_arms() if get_arm(name).pretraining is not None]


def _pretraining_module(name: str):
    arm = get_arm(name)
    assert arm.pretraining is not None
    torch.manual_seed(0)
    task = arm.pretraining.task
    cfg = load_config(TINY_CONFIG, [f"task={task}", f"pretraining={name}", "mae.block_size=8"])
    return build_module(cfg, DATA[task])


def _logged_terms(module, task: str) -> set[str]:
    """Names a training step and a validation epoch of ``module`` log."""
    logged: set[str] = set()
    module.log = lambda name, *args, **kwargs: logged.add(name)
    module.log_dict = lambda values, *args, **kwargs: logged.update(values)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(4, 2, 32, 32, 32, generator=generator)
    label = torch.randint(0, 10, (4, 1, 32, 32, 32), generator=generator)
    batch = {"image": image, "label": label, "case_id": [f"c{i}" for i in range(4)]}
    loss = module.training_step(batch, 0)
    assert torch.isfinite(loss)
    loss.backward()
    module.eval()
    validation = {
        **batch,
        "spacing": torch.ones(4, 3),
        "location": torch.zeros(4, 6, dtype=torch.long),
        "body": torch.ones(4, 1, 32, 32, 32, dtype=torch.bool),
    }
    with torch.no_grad():
        module.validation_step(validation, 0)
    module.on_validation_epoch_end()
    return logged


@pytest.mark.parametrize("name", list_arms())
def test_every_arm_has_its_experiment_files_and_a_consistent_registration(name: str) -> None:
    arm = get_arm(name)
    assert arm.description
    assert (EXPERIMENTS_DIR / "cpu" / f"{arm.finetune_experiment}.yaml").is_file()
    finetune = load_config(f"cpu/{arm.finetune_experiment}")
    assert (finetune.task, finetune.model.init) == ("lesion", name)
    if arm.pretraining is None:
        assert finetune.model.pretrained is None
        return
    pretraining = load_config(f"cpu/{arm.pretraining.experiment}")
    assert pretraining.task == arm.pretraining.task
    assert module_class(pretraining) is MODULES.get(arm.pretraining.module)
    assert MODULES.get(arm.pretraining.module).task == arm.pretraining.task
    if arm.pretraining.section is not None:
        assert hasattr(pretraining, arm.pretraining.section)
    assert arm.pretraining.learning, "the report needs a term that shows learning"


@pytest.mark.parametrize("name", PRETRAINED)
def test_every_pretraining_logs_its_learning_terms_and_exports_its_recipe(
    name: str, tmp_path: Path
) -> None:
    arm = get_arm(name)
    assert arm.pretraining is not None
    module = _pretraining_module(name)
    logged = _logged_terms(module, arm.pretraining.task)
    for term in arm.pretraining.learning:
        assert term.key in logged, f"{name}: {term.key} is never logged ({sorted(logged)})"
    exported = torch.load(module.export_backbone(tmp_path / "backbone.pt"), weights_only=True)
    meta = exported["meta"]
    assert (meta["task"], meta["recipe"], meta["arm"]) == (
        arm.pretraining.task,
        arm.pretraining.recipe,
        name,
    )


@pytest.mark.parametrize("name", PRETRAINED)
def test_every_arm_transfers_what_it_says_and_refuses_other_arms_sources(
    name: str, tmp_path: Path
) -> None:
    arm = get_arm(name)
    sources = {
        other: _pretraining_module(other).export_backbone(tmp_path / f"{other}.pt")
        for other in PRETRAINED
    }
    for other, path in sources.items():
        cfg = load_config(
            TINY_CONFIG, ["task=lesion", f"model.init={name}", f"model.pretrained={path}"]
        )
        module = build_module(cfg, DATA["lesion"])
        if other != name:
            with pytest.raises(CheckpointError, match=r"pretraining|checkpoint"):
                module.initialise_from_pretrained()
            continue
        report = module.initialise_from_pretrained()
        assert report["init"] == name and report["mode"] == arm.transfer
        assert report["loaded"] and not report["missing"]
        encoder_only = all(module.spec.is_encoder_key(key) for key in report["loaded"])
        assert encoder_only == (arm.transfer == "encoder")
        assert not any(module.spec.is_head_key(key) for key in report["loaded"])


def test_a_user_arm_plugs_into_configs_studies_and_modules(monkeypatch) -> None:
    """Registering an arm (here: Tang et al.'s module under another name) is all a config, a
    study file and the module lookup need; unknown names are refused naming the arms."""
    monkeypatch.setattr(arms, "ARMS", _copy(arms.ARMS))  # the registration ends with the test
    ssl = get_arm("ssl")
    assert ssl.pretraining is not None
    register_arm(
        Arm(
            "rotation_only",
            "Tang et al.'s module with the rotation term alone",
            replace(ssl.pretraining, recipe="rotation", title="rotation pretraining"),
            transfer="encoder",
        )
    )
    assert "rotation_only" in list_arms()
    cfg = load_config(TINY_CONFIG, ["task=ssl", "pretraining=rotation_only"])
    assert module_class(cfg).__name__ == "ContrastivePretraining"
    assert load_config(TINY_CONFIG, ["model.init=rotation_only", "model.pretrained=x"])
    study = load_study_config(None, ["arms=[scratch,rotation_only]"])
    assert study.arms == ["scratch", "rotation_only"]
    with pytest.raises(ConfigError, match="scratch"):
        load_config(TINY_CONFIG, ["model.init=nope"])
    with pytest.raises(ConfigError, match="whose pretraining runs as task 'ssl'"):
        load_config(TINY_CONFIG, ["task=skeleton", "pretraining=rotation_only"])


def _copy(registry: Registry) -> Registry:
    copy: Registry = Registry(registry.kind, registry.config_key)
    for name in registry.in_order():
        copy.register(name)(registry.get(name))
    return copy


def test_the_documented_pretext_registers_and_learns_its_terms(monkeypatch) -> None:
    """The example of docs/extending.md ("Adding an arm"), run as written: its module and arm
    register, a config picks them, and a training step logs the arm's learning term."""
    import re

    from sap_lightning import modules

    monkeypatch.setattr(arms, "ARMS", _copy(arms.ARMS))
    monkeypatch.setattr(modules, "MODULES", _copy(modules.MODULES))
    guide = (Path(__file__).parents[2] / "docs" / "extending.md").read_text()
    section = guide.split("## Adding an arm", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/extending.md", "exec"), namespace)
    arm = get_arm("rotation")
    assert arm.pretraining is not None and arm.transfer == "encoder"
    cfg = load_config(TINY_CONFIG, ["task=ssl", "pretraining=rotation"])
    module = build_module(cfg, DATA["ssl"])
    assert type(module).__name__ == "RotationPretraining"
    logged = _logged_terms(module, "ssl")
    assert {term.key for term in arm.pretraining.learning} <= logged
