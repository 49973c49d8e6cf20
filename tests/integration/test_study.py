"""``sap study`` end to end on a tiny cohort with every built-in arm: protocol, outputs, report,
restart and two invocations at once (the suite's one study, ``tests/conftest.py``)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import pytest
import torch

from sap_lightning.backbones import get_spec
from sap_lightning.cache.splits import load_splits
from sap_lightning.config import load_config, to_yaml
from sap_lightning.core import mixed_precision
from sap_lightning.core.arms import get_arm
from sap_lightning.core.errors import SapError
from sap_lightning.dataset import layout
from sap_lightning.pipeline.steps import DONE_FILE
from sap_lightning.pipeline.study import run_study
from tests.conftest import STUDY_ENV, TINY_STUDY_ARMS
from tests.integration.test_notebooks import run_notebook
from tests.killing import run_until_paused

pytestmark = pytest.mark.xdist_group("tiny_study")  # one worker builds the suite's study


def _splits(config):
    return load_splits(layout.default_splits_path(Path(config.data_dir) / "phantoms" / "lesion"))


def test_report_has_every_arm_with_statistics(tiny_study) -> None:
    report = tiny_study.report.read_text()
    # The protocol's headline is the report's first line under the title.
    first = [line for line in report.splitlines() if line.strip()][1]
    assert first.startswith("**Primary endpoint ([protocol](docs/protocol.md)): SAP minus scratch")
    assert "This study is one draw of the cohort" in report  # the protocol: a demo says so
    for arm in TINY_STUDY_ARMS:
        assert f" {arm} |" in report.split("## Table 1", 1)[1]
    assert "F2 (detection score)" in report and "p" in report
    for name in ("froc.png", "boxplots.png", "comparison.json", "curves.png"):
        assert (tiny_study.report.parent / name).is_file()
    # The CPU files ask for bf16-mixed training: what ran (per the CPU) is named once for all.
    trained = (
        "bfloat16 autocast" if mixed_precision.cpu_has_fast_kernels("bf16-mixed") else "float32"
    )
    assert f"Training precision: {trained} (every run)." in report


def test_header_and_learning_section_name_every_arm_and_pretraining(tiny_study) -> None:
    """Derived from the arm registry: each listed arm's experiment file in the header, each
    pretraining run (MAE included) with its own learning terms, every fine-tune."""
    report = tiny_study.report.read_text()
    header = next(line for line in report.splitlines() if line.startswith("- Experiments:"))
    learning = report.split("## Did the networks learn?", 1)[1].split("\n## What each", 1)[0]
    for name in TINY_STUDY_ARMS:
        arm = get_arm(name)
        assert f"{name} `experiments/cpu/finetune_{name}.yaml`" in header
        if arm.pretraining is not None:
            assert (
                f"{arm.pretraining.label} `experiments/cpu/{arm.pretraining.experiment}.yaml`"
                in header
            )
            row = next(
                line
                for line in learning.splitlines()
                if line.startswith(f"| {arm.pretraining.title} |")
            )
            assert row.count("|") == 5 + len(arm.pretraining.learning)
        for fold in (1, 2):
            assert f"| {name} fold {fold} |" in learning
    assert "| MAE pretraining |" in learning and "reconstruction" in learning


def test_the_report_shows_every_arm_on_the_baselines_best_median_and_worst_patient(
    tiny_study,
) -> None:
    """The patients follow the stated rule (the scratch arm's best, median and worst patient F2
    among patients with a lesion, ties by case id), and every arm is drawn on them."""
    import pandas as pd

    report = tiny_study.report.read_text()
    section = report.split("## What each arm found", 1)[1].split("\n## ", 1)[0]
    scratch = pd.read_csv(
        Path(tiny_study.config.runs_dir) / "scratch" / "evaluation" / "cases.csv",
        dtype={"case_id": str},
    )
    ranked = scratch[scratch["n_gt"] > 0].sort_values(["f2", "case_id"])["case_id"].tolist()
    expected = {"best": ranked[-1], "median": ranked[len(ranked) // 2], "worst": ranked[0]}
    for role, case in expected.items():
        row = next(line for line in section.splitlines() if line.startswith(f"| {case} |"))
        assert role in row
    assert (tiny_study.report.parent / "patients.png").is_file()
    assert "![Each arm on three patients](patients.png)" in section


def test_threshold_is_tuned_on_the_tuning_fold_only(tiny_study) -> None:
    config = tiny_study.config
    splits = _splits(config)
    for arm in TINY_STUDY_ARMS:
        choice = json.loads((Path(config.runs_dir) / arm / "tuning" / "threshold.json").read_text())
        assert sorted(choice["cases"]) == sorted(splits.tuning_cases())
        for fold in splits.test_folds:
            run = Path(config.runs_dir) / arm / f"fold{fold}"
            # each fold model trains on neither its test fold nor the tuning fold
            cfg = load_config(run / "config.yaml")
            assert cfg.data.fold == fold and cfg.data.tuning_fold == splits.tuning_fold
            assert (
                json.loads((run / "threshold.json").read_text())["threshold"] == choice["threshold"]
            )
            # one prediction folder per fold model, recording the model and threshold
            predictions = Path(config.runs_dir) / arm / "predictions" / f"fold{fold}"
            provenance = json.loads((predictions / "prediction.json").read_text())
            assert provenance["threshold"] == choice["threshold"]
            assert Path(provenance["checkpoint"]["path"]) == run.resolve()
            for case in splits.test_cases(fold):
                summary = json.loads((predictions / f"{case}_summary.json").read_text())
                assert summary["threshold"] == choice["threshold"]
                assert summary["checkpoint_sha256"] == provenance["checkpoint"]["sha256"]


def test_every_test_patient_is_predicted_on_its_own_grid(tiny_study) -> None:
    config = tiny_study.config
    splits = _splits(config)
    lesion = Path(config.data_dir) / "phantoms" / "lesion"
    test_cases = {c for f in splits.test_folds for c in splits.test_cases(f)}
    predictions = Path(config.runs_dir) / "sap" / "predictions"
    maps = {p.name[: -len(".nii.gz")]: p for p in predictions.glob("fold*/probabilities/*.nii.gz")}
    assert sorted(maps) == sorted(test_cases)  # each case once, by the model of its fold
    case = sorted(test_cases)[0]
    label = nib.load(layout.label_path(lesion, case))
    prob = nib.load(maps[case])
    assert prob.shape == label.shape
    assert (prob.affine == label.affine).all()


def test_pretraining_feeds_the_arms(tiny_study) -> None:
    """Each arm starts from its own pretraining run, copying what its registration says: SAP
    everything but the output layer, SSL and MAE the encoder only."""
    runs = Path(tiny_study.config.runs_dir)
    for name in TINY_STUDY_ARMS:
        arm = get_arm(name)
        report = json.loads((runs / name / "fold1" / "transfer_report.json").read_text())
        assert report["init"] == name
        if arm.pretraining is None:
            assert report["pretrained_file"] is None
            continue
        assert Path(report["pretrained_file"]).parent == runs / arm.pretraining.experiment
        assert report["mode"] == arm.transfer
        assert report["loaded"] and not report["missing"] and not report["mismatched"]
        spec = get_spec(load_config(runs / name / "fold1" / "config.yaml").model.backbone)
        encoder_only = all(spec.is_encoder_key(key) for key in report["loaded"])
        assert encoder_only == (arm.transfer == "encoder"), name
        exported = torch.load(runs / arm.pretraining.experiment / "backbone.pt", weights_only=True)[
            "meta"
        ]
        assert (exported["task"], exported["recipe"], exported["arm"]) == (
            arm.pretraining.task,
            arm.pretraining.recipe,
            name,
        )


def test_a_rerun_reuses_completed_steps(tiny_study) -> None:
    """Started twice at once, one invocation generated the cohort; run again in this process,
    the study reuses every step and writes the same report, byte for byte (wall times live
    apart)."""
    config = tiny_study.config
    generated = f"wrote {config.healthy} healthy scans to"
    assert sum(log.count(generated) for log in tiny_study.logs) == 1, tiny_study.logs
    runs = Path(config.runs_dir)
    checkpoints = sorted(runs.glob("*/fold*/checkpoints/last.ckpt")) + sorted(
        runs.glob("*/checkpoints/last.ckpt")
    )
    stamps = {p: os.stat(p).st_mtime_ns for p in checkpoints}
    assert all((p.parents[1] / DONE_FILE).is_file() for p in checkpoints)
    first_report = tiny_study.report.read_text()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the study ran (STUDY_ENV): the report names the threads
    try:
        second = run_study(config)
    finally:
        torch.set_num_threads(threads)
    assert {p: os.stat(p).st_mtime_ns for p in checkpoints} == stamps
    assert second.report.read_text() == first_report
    assert "[timings.md](timings.md)" in first_report and "Wall time" not in first_report.replace(
        "Wall time of every step: [timings.md]", ""
    )
    assert "reused from an earlier invocation" in (second.report.parent / "timings.md").read_text()


def test_a_rerun_with_another_recipe_refuses_the_runs_trained_with_the_old_one(
    tiny_study, tmp_path: Path
) -> None:
    """An edited recipe (here a study override) must not be reported with runs trained under
    the old one: the rerun stops at the first such run, naming it, the changed key and the
    way out, and leaves every run as it was."""
    config = tiny_study.config
    runs = Path(config.runs_dir)
    checkpoints = sorted(runs.glob("**/checkpoints/last.ckpt"))
    stamps = {p: os.stat(p).st_mtime_ns for p in checkpoints}
    edited = replace(
        config,
        overrides=[*config.overrides, "optim.weight_decay=0.5"],
        report_dir=str(tmp_path / "report"),
    )
    with pytest.raises(SapError) as caught:
        run_study(edited)
    message = str(caught.value)
    assert "was completed with other settings" in message
    assert re.search(r"optim\.weight_decay: \S+ -> 0\.5", message)
    assert "remove that folder" in message and str(runs) in message
    assert {p: os.stat(p).st_mtime_ns for p in checkpoints} == stamps


def test_a_study_refuses_a_cohort_generated_for_another_draw(tiny_study, tmp_path: Path) -> None:
    """Another seed on the same data_dir must not silently score the first seed's cohort."""
    config = tiny_study.config
    other = replace(
        config,
        seed=config.seed + 7,
        runs_dir=str(tmp_path / "runs"),
        report_dir=str(tmp_path / "report"),
    )
    with pytest.raises(
        SapError, match=rf"generated with seed {config.seed} \(study: {config.seed + 7}\)"
    ):
        run_study(other)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_study_killed_in_training_and_prediction_ends_with_the_uninterrupted_report(
    tiny_study, tmp_path: Path
) -> None:
    """``kill -9`` of the study's process group during a pretraining, during a fine-tune (each
    mid-run, its first epoch's checkpoint on disk) and during prediction; started again each
    time, the study resumes the runs and writes the uninterrupted study's report byte for byte
    (one torch thread per run in both, so the same sums)."""
    config = replace(
        tiny_study.config,
        data_dir=str(tmp_path / "data"),
        runs_dir=str(tmp_path / "runs"),
        report_dir=str(tmp_path / "report"),
        workers=1,
    )
    study_file = tmp_path / "study.yaml"
    study_file.write_text(to_yaml(config))
    args = ["study", "--config", str(study_file)]
    logs = []
    for where in ("run:pretrain:1", "run:sap/fold1:1", "predict:1"):
        run_until_paused(args, where, tmp_path, STUDY_ENV)
        logs.append((tmp_path / "killed_run.log").read_text())
    assert "resuming interrupted run" in logs[1]  # the killed pretraining, resumed
    assert "resuming interrupted run" in logs[2]  # the killed fine-tune, resumed
    finish = subprocess.run(
        [sys.executable, "-m", "sap_lightning", *args],
        env=STUDY_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert finish.returncode == 0, finish.stderr[-3000:]
    assert "redoing incomplete step" in finish.stderr  # the killed prediction, redone
    expected = tiny_study.report.read_text().replace(tiny_study.config.runs_dir, config.runs_dir)
    assert (tmp_path / "report" / "report.md").read_text() == expected


@pytest.mark.slow
def test_repeats_reuse_the_study_and_pool_a_second_draw(tiny_study, tmp_path: Path) -> None:
    """``sap study --repeats 2``: repeat 0 is the suite's study (every step reused, the same
    report), repeat 1 a new draw (seed + 1) in sibling folders, killed (``kill -9``) in the
    middle of a fine-tune and resumed by the next call; the pooled report has both repeats'
    effects and learning."""
    config = tiny_study.config
    before = tiny_study.report.read_text()
    study_file = tmp_path / "study.yaml"
    study_file.write_text(to_yaml(config))
    args = ["study", "--config", str(study_file), "--repeats", "2"]
    # repeat 0's runs are all reused, so the first sap/fold1 fine-tune to start is repeat 1's
    run_until_paused(args, "run:sap/fold1:1", tmp_path, STUDY_ENV)
    done = subprocess.run(
        [sys.executable, "-m", "sap_lightning", *args],
        env=STUDY_ENV,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming interrupted run" in done.stderr
    pooled = Path(f"{config.report_dir}_repeats") / "report.md"
    text = pooled.read_text()
    assert f"repeat 1 (seed {config.seed + 1})" in text
    second = Path(f"{config.runs_dir}_repeat1")
    assert (second / "pretrain" / DONE_FILE).is_file()
    assert load_config(second / "sap" / "fold1" / "config.yaml").seed == config.seed + 1
    rows = [line for line in text.splitlines() if line.startswith(("| 0 |", "| 1 |", "| pooled |"))]
    assert len(rows) == 2 + 2 + 1  # effects per repeat and pooled; learning per repeat
    networks = len(TINY_STUDY_ARMS) * 2 + sum(
        get_arm(name).pretraining is not None for name in TINY_STUDY_ARMS
    )
    assert len(re.findall(rf"stages at zero in \d+ of {networks} networks", text)) == 2
    # each repeat's primary effect reads as in its own report (the same seed, the same interval)
    for repeat, report in ((0, tiny_study.report), (1, Path(f"{config.report_dir}_repeat1"))):
        own = (report if repeat == 0 else report / "report.md").read_text()
        interval = re.search(r"Hodges-Lehmann (\S+ \[\S+, \S+\])", own).group(1)
        assert interval in rows[repeat]
    assert tiny_study.report.read_text() == before  # repeat 0: every step reused, same report
    assert (
        "reused from an earlier invocation" in (Path(config.report_dir) / "timings.md").read_text()
    )


@pytest.mark.slow
def test_the_comparison_notebook_reads_the_study(tiny_study, tmp_path: Path) -> None:
    """notebooks/03_compare_runs.ipynb on the suite's study (kernel started in notebooks/)."""
    notebook = Path(__file__).parents[2] / "notebooks" / "03_compare_runs.ipynb"
    study = {"SAP_NOTEBOOK_STUDY": tiny_study.config.runs_dir, "SAP_NOTEBOOK_RESAMPLES": "50"}
    run_notebook(notebook, tmp_path, **study)
