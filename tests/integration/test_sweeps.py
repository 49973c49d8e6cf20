"""W&B sweep files: every parameter is a valid config key; ``sap sweep-local`` runs a sweep
without a server and ``sap compare`` reads the resulting runs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from sap_lightning.cli import main
from sap_lightning.config import load_config
from sap_lightning.config.sweep import (
    command_for,
    expand,
    experiment_file,
    load_sweep,
    sweep_overrides,
)
from sap_lightning.core.errors import ConfigError
from tests.datasets import write_tiny_dataset
from tests.tiny import TINY_NETWORK

REPO = Path(__file__).resolve().parents[2]
SWEEPS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_every_sweep_point_is_a_valid_config(path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    sweep = load_sweep(path)
    experiment = experiment_file(sweep)
    assert experiment is not None and (REPO / experiment).is_file()
    points = list(expand(sweep))
    assert len(points) > 1
    for point in points:
        overrides = sweep_overrides(point)
        cfg = load_config(REPO / experiment, overrides)
        for key, value in point.items():
            node = cfg
            for part in key.split("."):
                node = getattr(node, part)
            assert node == value, f"{path.name}: {key} did not reach the config"
        # Every arm finds the run it starts from, and runs get distinct folders.
        assert (cfg.model.init == "scratch") == (cfg.model.pretrained is None)
    names = {load_config(REPO / experiment, sweep_overrides(p)).name for p in points}
    assert len(names) == len(points), "two sweep points would write into one run folder"


def test_grid_and_random_expansion(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "parameters": {"a": {"values": [1, 2]}, "b": {"values": ["x", "y", "z"]}},
                "command": [
                    "${env}",
                    "python",
                    "-m",
                    "sap_lightning.cli",
                    "finetune",
                    "${args_no_hyphens}",
                ],
            }
        )
    )
    sweep = load_sweep(path)
    assert len(list(expand(sweep))) == 6
    assert list(expand(sweep, count=2)) == [{"a": 1, "b": "x"}, {"a": 1, "b": "y"}]
    assert command_for(sweep, {"a": 1, "b": "x"}) == [
        sys.executable,
        "-m",
        "sap_lightning.cli",
        "finetune",
        "a=1",
        "b=x",
    ]
    sweep.method = "random"
    sweep.parameters["c"] = {"min": 1e-6, "max": 1e-4, "distribution": "log_uniform_values"}
    draws = list(expand(sweep, count=20, seed=3))
    assert draws == list(expand(sweep, count=20, seed=3))  # seeded
    assert all(1e-6 <= d["c"] <= 1e-4 and d["b"] in "xyz" for d in draws)
    with pytest.raises(ConfigError, match="needs --count"):
        list(expand(sweep))


def test_bad_sweep_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"method": "bayes", "parameters": {"a": {"values": [1]}}}))
    with pytest.raises(ConfigError, match=r"bad\.yaml.*method"):
        load_sweep(path)


@pytest.mark.slow
def test_sweep_local_runs_two_points_and_compare_reads_them(tmp_path: Path, capsys) -> None:
    lesion = write_tiny_dataset(tmp_path / "lesion", n_cases=6, shape=(32, 32, 96), seed=1)
    sweep = tmp_path / "two.yaml"
    sweep.write_text(
        yaml.safe_dump(
            {
                "method": "grid",
                "parameters": {"data.fold": {"values": [1, 2]}},
                "command": [
                    "${env}",
                    "python",
                    "-m",
                    "sap_lightning.cli",
                    "finetune",
                    "--config",
                    str(REPO / "experiments" / "cpu" / "finetune_arms.yaml"),
                    "model.init=scratch",
                    f"data.dataset={lesion}",
                    f"output_dir={tmp_path / 'runs'}",
                    "data.n_folds=3",
                    "trainer.max_epochs=1",
                    "trainer.limit_train_batches=1",
                    "data.samples_per_volume=1",
                    "data.queue_length=2",
                    "logger=none",
                    "trainer.enable_progress_bar=false",
                    TINY_NETWORK,
                    "${args_no_hyphens}",
                ],
            }
        )
    )
    assert main(["sweep-local", str(sweep)]) == 0
    assert "2 runs succeeded, 0 failed" in capsys.readouterr().out
    runs = sorted((tmp_path / "runs").iterdir())
    assert [r.name for r in runs] == [
        "arms_scratch_fold1",
        "arms_scratch_fold2",
    ]
    for run in runs:
        assert (run / "evaluation" / "summary.json").is_file()
    out = tmp_path / "report"
    assert (
        main(
            [
                "compare",
                *map(str, runs),
                "--names",
                "fold1",
                "fold2",
                "--out",
                str(out),
                "--n-resamples",
                "50",
            ]
        )
        == 0
    )
    report = (out / "report.md").read_text()
    assert "fold1" in report and "fold2" in report
