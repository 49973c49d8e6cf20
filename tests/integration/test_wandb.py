"""W&B sweeps through W&B's own agent code: the command a real ``wandb agent`` runs for a sweep
created by ``sap sweep``, the order ``sap sweep-local`` walks a grid in, and the logging mode a
run picks from the user's environment."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import wandb.wandb_agent as wandb_agent

from sap_lightning.cli import main
from sap_lightning.config import load_config
from sap_lightning.config.sweep import expand, load_sweep, wandb_sweep_config
from sap_lightning.pipeline.train import wandb_mode

ARMS_CPU = "experiments/sweeps/arms_cpu.yaml"


class _RecordedProcess:
    """Stands in for the agent's subprocess: records the command W&B built."""

    commands: list[list[str]] = []

    def __init__(self, command=None, env=None, **_kwargs) -> None:
        _RecordedProcess.commands.append(list(command))
        self.env = env


def _agent_command(monkeypatch, tmp_path: Path, sweep_config: dict, args: dict) -> list[str]:
    """Expand ``sweep_config['command']`` exactly as ``wandb agent`` does for one run."""
    monkeypatch.chdir(tmp_path)  # the agent writes wandb/sweep-<id>/config-<run>.yaml here
    monkeypatch.setenv("WANDB_SWEEP_ID", "sweep123")
    monkeypatch.setattr(wandb_agent, "AgentProcess", _RecordedProcess)
    _RecordedProcess.commands = []
    agent = wandb_agent.Agent(api=None, queue=None, sweep_id="sweep123")
    agent._sweep_command = list(sweep_config["command"])
    command = {
        "type": "run",
        "run_id": "run42",
        "program": None,
        "args": {key: {"value": value} for key, value in args.items()},
    }
    agent._command_run(command)
    assert len(_RecordedProcess.commands) == 1
    return _RecordedProcess.commands[0]


def test_a_bare_wandb_agent_runs_this_environments_interpreter(monkeypatch, tmp_path) -> None:
    config = wandb_sweep_config(ARMS_CPU)
    # Another shell's PATH has no venv: W&B itself would run "python" from PATH.
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the test suite disables W&B
    command = _agent_command(monkeypatch, tmp_path, config, {"model.init": "sap", "data.fold": 2})
    assert command[0] == "/usr/bin/env"
    assert command[1] == sys.executable  # the interpreter that has sap_lightning installed
    assert command[2:5] == ["-m", "sap_lightning.cli", "finetune"]
    config_file = Path(command[command.index("--config") + 1])
    assert config_file.is_absolute() and config_file.is_file()
    overrides = command[command.index("--config") + 2 :]
    assert {"model.init=sap", "data.fold=2", "logger=wandb"} <= set(overrides)
    cfg = load_config(config_file, overrides)  # what the launched run would train with
    assert (cfg.logger, cfg.model.init, cfg.data.fold) == ("wandb", "sap", 2)
    assert wandb_mode(cfg.wandb.mode) == "online"  # WANDB_SWEEP_ID is set by the agent


def test_sweep_dry_run_prints_the_pinned_config(capsys) -> None:
    assert main(["sweep", ARMS_CPU, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sys.executable in out and "logger=wandb" in out


def test_sweep_local_walks_the_grid_in_wandbs_order() -> None:
    # W&B's grid engine sorts parameter names, then takes itertools.product of their values:
    # data.fold before model.init, so the fold changes slowest.
    points = list(expand(load_sweep(ARMS_CPU)))
    expected = [
        {"data.fold": fold, "model.init": init}
        for fold in (1, 2)
        for init in ("scratch", "ssl", "sap")
    ]
    assert points == expected
    assert list(expand(load_sweep(ARMS_CPU), count=2)) == expected[:2]


@pytest.mark.parametrize(
    ("configured", "env", "expected"),
    [
        (None, {}, "offline"),
        (None, {"WANDB_MODE": "online"}, "online"),
        (None, {"WANDB_SWEEP_ID": "s1"}, "online"),
        (None, {"WANDB_SWEEP_ID": "s1", "WANDB_MODE": "offline"}, "offline"),
        ("disabled", {"WANDB_MODE": "online"}, "disabled"),
    ],
)
def test_wandb_mode_respects_the_users_environment(monkeypatch, configured, env, expected):
    for key in ("WANDB_MODE", "WANDB_SWEEP_ID"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode(configured) == expected
