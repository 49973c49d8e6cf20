"""The command line: every subcommand is listed, imports, and answers ``--help``."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sap_lightning.cli import COMMANDS, main


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: sap {command}")
    description = out.split("\n\n")[1]  # the paragraph after the usage lines
    assert len(description.split()) >= 4 and "-h, --help" in out


def test_top_level_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)


def test_unknown_command_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["pretrian"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'pretrian'" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sap_lightning", "--version"], capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout.startswith("sap_lightning ")


def test_verbose_is_accepted_after_the_command(tmp_path, capsys) -> None:
    missing = tmp_path / "missing"
    # Parsed (no SystemExit from argparse); the command itself then refuses the folder.
    assert main(["check-data", str(missing), "-v"]) != 0
    captured = capsys.readouterr()
    assert str(missing) in captured.out + captured.err
    assert "unrecognized arguments" not in captured.err


def test_lightning_log_lines_are_printed_once() -> None:
    code = (
        "from sap_lightning.cli import configure_logging; configure_logging(); "
        "import logging, lightning.pytorch; "
        "logging.getLogger('lightning.pytorch.utilities.rank_zero').info('only-once'); "
        "logging.getLogger('sap_lightning.x').info('ours-once')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("only-once") == 1
    assert done.stderr.count("ours-once") == 1
