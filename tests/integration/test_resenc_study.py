"""``sap study`` with the ResEnc U-Net and four arms (scratch, contrastive SSL, MAE, SAP) on a
tiny cohort with one-step trainings: the MAE pretraining run is made by ``pretrain_runs`` and
feeds the ``mae`` arm through the strict encoder transfer; the report compares four arms."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from sap_lightning.config import StudyConfig, load_study_config
from sap_lightning.pipeline.study import run_study
from tests.conftest import TINY_STUDY_OVERRIDES

pytest.importorskip("dynamic_network_architectures")

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
ARMS = ("scratch", "ssl", "mae", "sap")
RESENC_TINY = [
    "model.kwargs.features_per_stage=[2,4,4,8]",
    "model.kwargs.n_blocks_per_stage=[1,1,1,1]",
]


def test_resenc_study_runs_four_arms(tmp_path: Path) -> None:
    shipped = load_study_config(EXPERIMENTS / "study" / "resenc.yaml")
    assert list(shipped.finetune_configs) == ["scratch", "ssl", "sap", "mae"]
    assert set(shipped.pretrain_runs) == {"mae"}

    def experiment(path: str) -> str:
        return str(EXPERIMENTS.parent / path)

    config = StudyConfig(
        name="tiny_resenc",
        data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        report_dir=str(tmp_path / "report"),
        healthy=3,
        patients=6,
        n_folds=3,
        phantom_shape=[64, 64, 128],
        phantom_spacing=[4.5, 4.5, 9.0],
        n_resamples=50,
        pretrain_config=experiment(shipped.pretrain_config),
        ssl_config=experiment(shipped.ssl_config),
        pretrain_runs={k: experiment(v) for k, v in shipped.pretrain_runs.items()},
        finetune_configs={arm: experiment(shipped.finetune_configs[arm]) for arm in ARMS},
        overrides=[
            *(o for o in TINY_STUDY_OVERRIDES if not o.startswith("model.kwargs")),
            *RESENC_TINY,
        ],
    )
    result = run_study(config)
    runs = Path(config.runs_dir)

    # The MAE run: a ResEnc network exported as an SSL backbone of recipe "mae", whose output
    # layer reconstructs the two image channels.
    mae = torch.load(runs / "pretrain_mae" / "backbone.pt", weights_only=True)
    assert mae["meta"]["task"] == "ssl" and mae["meta"]["ssl_recipe"] == "mae"
    assert mae["meta"]["backbone"] == "resenc_unet" and mae["meta"]["out_channels"] == 2

    # Each arm starts from its own pretraining run; MAE and SSL transfer the encoder only.
    sources = {"sap": "pretrain", "ssl": "ssl", "mae": "pretrain_mae"}
    for arm, source in sources.items():
        report = json.loads((runs / arm / "fold1" / "transfer_report.json").read_text())
        assert report["init"] == arm
        assert Path(report["pretrained_file"]).parent == runs / source
        loaded = report["loaded"]
        assert loaded and not report["missing"] and not report["mismatched"]
        encoder_only = all(key.startswith("encoder.") for key in loaded)
        assert encoder_only == (arm != "sap"), arm
    report = json.loads((runs / "mae" / "fold1" / "transfer_report.json").read_text())
    assert {"encoder.stem.convs.0.conv.weight", "encoder.stages.3.blocks.0.conv1.conv.weight"} <= (
        set(report["loaded"])
    )

    # The comparison covers the four arms with Bonferroni over all six pairs.
    comparison = json.loads((result.report.parent / "comparison.json").read_text())
    text = json.dumps(comparison)
    for a, b in itertools.combinations(ARMS, 2):
        assert f"{a} vs {b}" in text or f"{b} vs {a}" in text
    report = result.report.read_text()
    for arm in ARMS:
        assert f" {arm} " in report
