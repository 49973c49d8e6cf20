"""Out-of-range options and config values are refused while they are parsed, through the real
command line: exit status 2, one line naming the option (or key) and the valid range, and no
output or run folder written.

``float("nan")`` parses, so NaN and infinities are tried wherever a float is accepted.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sap_lightning.cli import main
from tests.training import EXPERIMENTS

PREDICT = [
    (["--threshold", "nan"], "--threshold", "(0, 1]"),
    (["--threshold", "inf"], "--threshold", "a finite number in (0, 1]"),
    (["--threshold", "0"], "--threshold", "(0, 1]"),
    (["--threshold", "1.5"], "--threshold", "(0, 1]"),
    (["--sw-batch-size", "0"], "--sw-batch-size", ">= 1"),
    (["--overlap", "1"], "--overlap", "[0, 1)"),
    (["--overlap", "-0.1"], "--overlap", "[0, 1)"),
    (["--overlap", "nan"], "--overlap", "a finite number in [0, 1)"),
    (["--roi-size", "32", "0", "32"], "--roi-size", ">= 1"),
    (["--device", "bogus"], "--device", "not a torch device"),
    (["--device", "cuda:x"], "--device", "not a torch device"),
]
if not torch.cuda.is_available():  # the test machines: CPU only (tests/conftest.py)
    PREDICT.append((["--device", "cuda"], "--device", "no cuda device on this machine"))


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Run ``sap argv``; assert exit status 2 and return the one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize(
    ("args", "option", "valid"), PREDICT, ids=[" ".join(args) for args, _, _ in PREDICT]
)
def test_predict_refuses_out_of_range_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], option: str, valid: str
) -> None:
    out = tmp_path / "predictions"
    argv = ["predict", "--checkpoint", str(tmp_path / "model.pt"), "--input", str(tmp_path)]
    err = _refused([*argv, "--out", str(out), *args], capsys)
    assert err.startswith("sap predict: error: argument ")
    assert option in err and valid in err, err
    assert not out.exists()


OTHER_COMMANDS = [
    ("evaluate", ["--threshold", "nan"], "--threshold", "(0, 1]"),
    ("evaluate", ["--tolerance-mm", "0"], "--tolerance-mm", "> 0"),
    ("evaluate", ["--tolerance-mm", "nan"], "--tolerance-mm", "a finite number > 0"),
    ("evaluate", ["--min-volume-ml", "-1"], "--min-volume-ml", ">= 0"),
    ("compare", ["--n-resamples", "0"], "--n-resamples", ">= 1"),
    ("preprocess", ["--workers", "0"], "--workers", ">= 1"),
    ("preprocess", ["--target-spacing", "1", "0", "1"], "--target-spacing", "> 0"),
    ("sweep-local", ["--count", "0"], "--count", ">= 1"),
]


@pytest.mark.parametrize(("command", "args", "option", "valid"), OTHER_COMMANDS)
def test_other_commands_refuse_out_of_range_options(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    args: list[str],
    option: str,
    valid: str,
) -> None:
    out = tmp_path / "out"
    required = {
        "evaluate": ["--predictions", str(tmp_path), "--dataset", str(tmp_path), "--out", str(out)],
        "compare": [str(tmp_path), "--out", str(out)],
        "preprocess": [str(tmp_path), "--out", str(out)],
        "sweep-local": [str(EXPERIMENTS / "sweeps" / "arms_cpu.yaml")],
    }[command]
    err = _refused([command, *required, *args], capsys)
    assert err.startswith(f"sap {command}: error: argument {option}"), err
    assert valid in err, err
    assert not out.exists()


CONFIG_VALUES = [
    ("validation.every_n_epochs=0", ">= 1"),
    ("validation.threshold=nan", "in (0, 1]"),
    ("validation.threshold=0", "in (0, 1]"),
    ("validation.overlap=1", "in [0, 1)"),
    ("validation.sw_batch_size=0", ">= 1"),
    ("validation.tolerance_mm=0", "> 0"),
    ("validation.roi_size=[32,0,32]", "three positive sizes"),
    ("optim.lr=-1", "> 0"),
    ("optim.lr=nan", "> 0"),
    ("optim.lr=inf", "> 0"),
    ("optim.encoder_lr=0", "> 0"),
    ("optim.decoder_lr=-1e-5", "> 0"),
    ("optim.warmup_epochs=-1", ">= 0"),
    ("trainer.max_epochs=0", ">= 1"),
    ("data.batch_size=0", ">= 1"),
    ("data.num_workers=-1", ">= 0"),
    ("data.patch_size=[32,0,32]", "three positive sizes"),
    ("data.augment.flip_p=1.5", "in [0, 1]"),
]


@pytest.mark.parametrize(("override", "valid"), CONFIG_VALUES)
def test_training_refuses_out_of_range_config_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], override: str, valid: str
) -> None:
    run_dir = tmp_path / "run"
    config = str(EXPERIMENTS / "cpu" / "finetune_scratch.yaml")
    capsys.readouterr()
    assert main(["finetune", "--config", config, f"run_dir={run_dir}", override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    key = override.split("=")[0]
    assert f"'{key}'" in err and valid in err, err
    assert not run_dir.exists()


def test_study_refuses_out_of_range_values(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    capsys.readouterr()
    args = [f"data_dir={tmp_path / 'data'}", f"runs_dir={tmp_path / 'runs'}", "predict_overlap=1"]
    assert main(["study", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'predict_overlap'" in err and "[0, 1)" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow  # a subprocess
def test_a_bad_option_is_one_line_from_a_real_process(tmp_path: Path) -> None:
    out = tmp_path / "predictions"
    result = subprocess.run(
        [sys.executable, "-m", "sap_lightning", "predict", "--checkpoint", str(tmp_path),
         "--input", str(tmp_path), "--out", str(out), "--overlap", "1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "sap predict: error: argument --overlap: must be a finite number in [0, 1), got '1' "
        "(see sap predict --help)"
    ]
    assert not out.exists()
