"""``sap study`` end to end on a tiny cohort: protocol, outputs, report and restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import nibabel as nib
import torch

from sap_lightning.cache.splits import load_splits
from sap_lightning.config import load_config, to_yaml
from sap_lightning.core import windows
from sap_lightning.dataset import layout
from sap_lightning.pipeline.steps import DONE_FILE
from sap_lightning.pipeline.study import run_study


def _splits(config):
    return load_splits(layout.default_splits_path(Path(config.data_dir) / "phantoms" / "lesion"))


def test_report_has_every_arm_with_statistics(tiny_study) -> None:
    _, result = tiny_study
    report = result.report.read_text()
    assert "Verdict" in report
    for arm in ("scratch", "ssl", "sap"):
        assert f"| {arm}" in report or f" {arm} |" in report
    assert "F2 (detection score)" in report and "p" in report
    for name in ("froc.png", "boxplots.png", "comparison.json"):
        assert (result.report.parent / name).is_file()
    # The CPU files ask for bf16-mixed training: what ran (per the CPU) is named once for all.
    trained = "bfloat16 autocast" if windows.cpu_has_fast_kernels("bf16-mixed") else "float32"
    assert f"Training precision: {trained} (every run)." in report


def test_threshold_is_tuned_on_the_tuning_fold_only(tiny_study) -> None:
    config, _ = tiny_study
    splits = _splits(config)
    for arm in ("scratch", "ssl", "sap"):
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
    config, _ = tiny_study
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
    config, _ = tiny_study
    runs = Path(config.runs_dir)
    for arm, source in (("sap", "pretrain"), ("ssl", "ssl")):
        report = json.loads((runs / arm / "fold1" / "transfer_report.json").read_text())
        assert report["init"] == arm
        assert Path(report["pretrained_file"]).parent == runs / source
    scratch = json.loads((runs / "scratch" / "fold1" / "transfer_report.json").read_text())
    assert scratch["init"] == "scratch"


def test_a_rerun_reuses_completed_steps(tiny_study) -> None:
    config, first = tiny_study
    runs = Path(config.runs_dir)
    checkpoints = sorted(runs.glob("*/fold*/checkpoints/last.ckpt")) + sorted(
        runs.glob("*/checkpoints/last.ckpt")
    )
    stamps = {p: os.stat(p).st_mtime_ns for p in checkpoints}
    assert all((p.parents[1] / DONE_FILE).is_file() for p in checkpoints)
    first_report = first.report.read_text()  # the rerun writes the same path
    second = run_study(config)
    assert {p: os.stat(p).st_mtime_ns for p in checkpoints} == stamps
    # Same runs, same predictions: the same report, byte for byte (wall times live apart).
    assert second.report.read_text() == first_report
    assert "[timings.md](timings.md)" in first_report and "Wall time" not in first_report.replace(
        "Wall time of every step: [timings.md]", ""
    )
    assert "reused from an earlier invocation" in (second.report.parent / "timings.md").read_text()


def test_worker_processes_write_the_same_report(tiny_study, tmp_path: Path) -> None:
    """``sap study`` with two worker processes (independent steps overlapping) writes the
    in-process study's report: each step seeds itself and writes only its own folder, so the
    schedule changes no result when the threads per run are the same. Started twice at once on
    the same fresh folders, the second invocation waits for the first's cohort and steps and
    reuses them."""
    config, first = tiny_study
    runs, reports = tmp_path / "runs", tmp_path / "report"
    study_file = tmp_path / "study.yaml"
    study = replace(
        config,
        data_dir=str(tmp_path / "data"),
        runs_dir=str(runs),
        report_dir=str(reports),
        workers=2,
    )
    study_file.write_text(to_yaml(study))
    env = {**os.environ, "SAP_NUM_THREADS": str(torch.get_num_threads())}
    command = [sys.executable, "-m", "sap_lightning", "study", "--config", str(study_file)]
    processes = [
        subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        for _ in range(2)
    ]
    logs = []
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr.decode()[-3000:]
        logs.append(stderr.decode())
    generated = f"wrote {config.healthy} healthy scans to"
    assert sum(log.count(generated) for log in logs) == 1, logs  # one cohort, generated once
    expected = first.report.read_text().replace(config.runs_dir, str(runs))
    assert (reports / "report.md").read_text() == expected
    timings = (reports / "timings.md").read_text()  # the later invocation's
    assert "2 workers, " in timings
    assert "reused from an earlier invocation: skeleton pretraining" in timings
