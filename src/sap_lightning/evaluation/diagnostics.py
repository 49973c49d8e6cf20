"""Training diagnostics a reader can check at a glance: did each run learn?

A loss curve alone cannot tell a learning network from a stuck one (a Dice + CE loss sits near
1 both on the plateau and, per patch, on lesion-free patches), so the study report shows for
every run the metric that shows learning, read back from the run's own logs
(``evaluation.curves``): whole-skeleton and mean region Dice (skeleton), each SSL term against
its chance level (rotation ln 4, contrastive ln(2N - 1) for a global batch of N), and lesion
sensitivity, precision, F2 and foreground Dice at the validation threshold (lesion).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sap_lightning.core.io import atomic_path
from sap_lightning.core.run_layout import CONFIG_FILE
from sap_lightning.evaluation.curves import last_value, read_training_curves

KEYS: dict[str, tuple[tuple[str, str], ...]] = {
    "skeleton": (
        ("val/dice_skeleton", "whole-skeleton Dice"),
        ("val/dice_mean", "mean region Dice"),
    ),
    "ssl": (
        ("train/rotation", "rotation"),
        ("train/contrastive", "contrastive"),
        ("train/reconstruction", "reconstruction"),
    ),
    "lesion": (
        ("val/sensitivity", "sensitivity"),
        ("val/precision", "precision"),
        ("val/f2", "F2"),
        ("val/global_dice", "foreground Dice"),
        ("val/f2_guarded", "F2 guarded"),
    ),
}
"""Per task, the logged values that show learning, with their names in the report."""

SSL_CHANCE_KEYS = ("train/rotation", "train/contrastive")
"""SSL terms with a chance level (reconstruction has none: compare its first and last value)."""

MAIN_CURVE = {"skeleton": "val/dice_skeleton", "ssl": "train/rotation", "lesion": "val/sensitivity"}


@dataclass
class RunDiagnostics:
    name: str
    task: str
    steps: int
    first_loss: float
    last_loss: float
    values: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    precision: str | None = None
    """``trainer.precision`` the run trained at (its ``config.yaml``; a CPU without fast
    bfloat16 kernels records ``32-true`` there), None when not recorded."""


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def ssl_chance_levels(config: Mapping) -> dict[str, float]:
    """Loss of a head that has learned nothing: uniform over 4 rotations; one positive among
    2N - 1 candidates for NT-Xent over a global batch of N patches (each seen in two views)."""
    data, trainer = config.get("data", {}), config.get("trainer", {})
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    global_batch = int(data.get("batch_size", 1)) * devices * int(trainer.get("num_nodes", 1))
    return {"train/rotation": math.log(4), "train/contrastive": math.log(2 * global_batch - 1)}


def diagnose(name: str, task: str, run_dir: str | os.PathLike) -> RunDiagnostics:
    run = Path(run_dir)
    curves = read_training_curves(run)
    losses = curves["train/loss"].dropna() if "train/loss" in curves else []
    steps = int(curves["step"].max()) + 1 if "step" in curves and len(curves) else 0
    config = _config(run)
    return RunDiagnostics(
        name=name,
        task=task,
        steps=steps,
        first_loss=float(losses.iloc[0]) if len(losses) else math.nan,
        last_loss=float(losses.iloc[-1]) if len(losses) else math.nan,
        values={key: last_value(curves, key) for key, _ in KEYS[task]},
        chance=ssl_chance_levels(config) if task == "ssl" else {},
        precision=config.get("trainer", {}).get("precision"),
    )


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def diagnostics_markdown(runs: list[RunDiagnostics]) -> str:
    """One table per task: steps, first and last training loss, and the learning metrics."""
    lines = []
    for task in ("skeleton", "ssl", "lesion"):
        mine = [run for run in runs if run.task == task]
        if not mine:
            continue
        names = [label for _, label in KEYS[task]]
        if task == "ssl":
            names = [
                f"{label} (chance)" if key in SSL_CHANCE_KEYS else label
                for (key, _), label in zip(KEYS[task], names)
            ]
        lines += [
            "| run | steps | train loss first -> last | " + " | ".join(names) + " |",
            "|---|---|---|" + "---|" * len(names),
        ]
        for run in mine:
            cells = []
            for key, _ in KEYS[task]:
                cell = _number(run.values[key])
                if key in run.chance:
                    cell += f" ({run.chance[key]:.3f})"
                cells.append(cell)
            loss = f"{_number(run.first_loss)} -> {_number(run.last_loss)}"
            lines.append(f"| {run.name} | {run.steps} | {loss} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot_curves(runs: Mapping[str, tuple[str, Path]], path: str | os.PathLike) -> Path:
    """Training loss and the task's learning metric against the optimiser step, per run."""
    figure = Figure(figsize=(11, 4))
    loss_axes = figure.add_subplot(1, 2, 1)
    metric_axes = figure.add_subplot(1, 2, 2)
    for name, (task, run_dir) in runs.items():
        curves = read_training_curves(run_dir)
        if "step" not in curves:
            continue
        if "train/loss" in curves:
            rows = curves.dropna(subset=["train/loss"])
            loss_axes.plot(rows["step"], rows["train/loss"], label=name, lw=1)
        key = MAIN_CURVE[task]
        if key in curves:
            rows = curves.dropna(subset=[key])
            metric_axes.plot(rows["step"], rows[key], marker=".", label=f"{name}: {key}", lw=1)
    loss_axes.set_xlabel("optimiser step")
    loss_axes.set_ylabel("training loss")
    loss_axes.set_yscale("log")
    metric_axes.set_xlabel("optimiser step")
    metric_axes.set_ylabel("learning metric (see labels)")
    for axes in (loss_axes, metric_axes):
        axes.grid(alpha=0.3)
        axes.legend(fontsize=6)
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return Path(path)


__all__ = ["RunDiagnostics", "diagnose", "diagnostics_markdown", "plot_curves"]
