"""W&B sweep files: read them, check their parameters, and expand them without a W&B server.

A sweep file is in W&B's own format (``method``, ``metric``, ``parameters``, ``command``), so
``wandb sweep FILE`` uses it unchanged. ``sap sweep-local`` expands the same parameter space
(grid or random) and runs the same command for each point, for machines without W&B access.
"""

from __future__ import annotations

import itertools
import math
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from sap_lightning.config.files import resolve_config_path
from sap_lightning.core.errors import ConfigError

METHODS = ("grid", "random")
ARGS_MACRO = "${args_no_hyphens}"


@dataclass
class Sweep:
    path: Path
    method: str
    parameters: dict[str, dict[str, Any]]
    command: list[str]
    program: str | None
    metric: dict[str, Any]

    @property
    def name(self) -> str:
        return self.path.stem


def load_sweep(path: str | os.PathLike) -> Sweep:
    """Read and check a sweep file; names the file and the offending entry on any problem."""
    path = resolve_config_path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the sweep file ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with 'method' and 'parameters'")
    method = raw.get("method")
    if method not in METHODS:
        raise ConfigError(f"{path}: 'method' is {method!r}; sap sweep-local supports {METHODS}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise ConfigError(f"{path}: 'parameters' must map config keys to value specs")
    for key, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"values", "value"} & set(spec) or "min" in spec):
            raise ConfigError(f"{path}: parameter {key!r} needs 'values', 'value' or 'min'/'max'")
        if method == "grid" and not ({"values", "value"} & set(spec)):
            raise ConfigError(f"{path}: grid parameter {key!r} needs a list of 'values'")
    command = raw.get("command") or ["${env}", "${interpreter}", "${program}", ARGS_MACRO]
    if not isinstance(command, list) or ARGS_MACRO not in command:
        raise ConfigError(f"{path}: 'command' must be a list containing {ARGS_MACRO}")
    return Sweep(
        path,
        method,
        parameters,
        [str(c) for c in command],
        raw.get("program"),
        raw.get("metric") or {},
    )


def _values(spec: dict[str, Any]) -> list[Any]:
    return list(spec["values"]) if "values" in spec else [spec["value"]]


def _draw(spec: dict[str, Any], rng: np.random.Generator) -> Any:
    if "values" in spec or "value" in spec:
        values = _values(spec)
        return values[int(rng.integers(len(values)))]
    low, high = spec["min"], spec["max"]
    distribution = spec.get("distribution", "int_uniform" if isinstance(low, int) else "uniform")
    if distribution == "int_uniform":
        return int(rng.integers(low, high + 1))
    if distribution == "uniform":
        return float(rng.uniform(low, high))
    if distribution == "log_uniform_values":
        return float(math.exp(rng.uniform(math.log(low), math.log(high))))
    raise ConfigError(f"distribution {distribution!r} is not supported by sap sweep-local")


def _grid_values(spec: dict[str, Any]) -> list[Any]:
    """A grid parameter's values; an ``int_uniform`` range becomes its integers, as in W&B."""
    if "values" in spec or "value" in spec:
        return _values(spec)
    return list(range(int(spec["min"]), int(spec["max"]) + 1))


def expand(sweep: Sweep, count: int | None = None, seed: int = 0) -> Iterator[dict[str, Any]]:
    """Parameter points: the grid in W&B's order (first ``count``), or ``count`` random draws.

    W&B's grid engine (the ``sweeps`` package, ``grid_search_next_runs``) orders parameters by
    name and walks ``itertools.product`` over their values; so does this, so ``--count N``
    runs the same first N points a W&B agent would.
    """
    keys = sorted(sweep.parameters)
    if sweep.method == "grid":
        grid = itertools.product(*(_grid_values(sweep.parameters[k]) for k in keys))
        for index, point in enumerate(grid):
            if count is not None and index >= count:
                return
            yield dict(zip(keys, point))
        return
    if count is None:
        raise ConfigError(f"{sweep.path}: a random sweep needs --count")
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {key: _draw(sweep.parameters[key], rng) for key in keys}


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_format(v) for v in value) + "]"
    return "null" if value is None else str(value)


def command_for(sweep: Sweep, point: dict[str, Any]) -> list[str]:
    """The command W&B's agent would run for ``point`` (macros replaced as the agent does)."""
    args = sweep_overrides(point)
    out: list[str] = []
    for part in sweep.command:
        if part == "${env}":
            continue
        if part == "${interpreter}":
            out.append(sys.executable)
        elif part == "${program}":
            if not sweep.program:
                raise ConfigError(f"{sweep.path}: command uses ${{program}} but no 'program'")
            out.append(sweep.program)
        elif part == ARGS_MACRO:
            out.extend(args)
        elif part in ("python", "python3"):
            out.append(sys.executable)  # the interpreter of this environment
        else:
            out.append(part)
    return out


def sweep_overrides(point: dict[str, Any]) -> list[str]:
    """The ``key=value`` overrides a point contributes (what ``${args_no_hyphens}`` expands to)."""
    return [f"{key}={_format(value)}" for key, value in point.items()]


def experiment_file(sweep: Sweep) -> str | None:
    """The ``--config`` experiment file the sweep's command trains with, if it names one."""
    if "--config" in sweep.command:
        index = sweep.command.index("--config")
        if index + 1 < len(sweep.command):
            return sweep.command[index + 1]
    return None


def wandb_sweep_config(path: str | os.PathLike, interpreter: str | None = None) -> dict[str, Any]:
    """The sweep file as ``wandb.sweep`` should receive it, with every run pinned to this
    environment: ``python`` / ``${interpreter}`` become this interpreter's absolute path (W&B's
    agent expands ``${interpreter}`` to whatever ``python`` is on the agent's PATH) and the
    ``--config`` file becomes an absolute path, so a bare ``wandb agent`` from any shell and any
    folder runs this project's code."""
    sweep = load_sweep(path)
    raw = yaml.safe_load(sweep.path.read_text())
    python = interpreter or sys.executable
    command: list[str] = []
    for index, part in enumerate(sweep.command):
        if part in ("python", "python3", "${interpreter}"):
            command.append(python)
        elif index > 0 and sweep.command[index - 1] == "--config":
            command.append(str(resolve_config_path(part).resolve()))
        else:
            command.append(part)
    raw["command"] = command
    raw.setdefault("name", sweep.name)
    return raw


def describe(command: Sequence[str]) -> str:
    return shlex.join(command)
