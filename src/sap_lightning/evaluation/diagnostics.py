"""Training diagnostics a reader can check at a glance: did each run learn?

A loss curve alone cannot tell a learning network from a stuck one (a Dice + CE loss sits near
1 both on the plateau and, per patch, on lesion-free patches), so the study report shows for
every run the metric that shows learning, read back from the run's own logs
(``evaluation.curves``): whole-skeleton and mean region Dice (skeleton), each SSL term against
its chance level (rotation ln 4, contrastive ln(2N - 1) for a global batch of N), the masked
autoencoder's reconstruction error, and lesion sensitivity, precision, F2 and foreground Dice
at the validation threshold (lesion). The pretraining terms are the arm's (``core/arms.py``).
Each run's last checkpoint also names the network's stages whose every weight is zero: Adam
with its weight decay added to the gradient drives a stage whose own gradient is smaller than
the decay to zero at the full learning rate, and such a stage stays dead (docs/method.md,
"Lesion fine-tuning").
"""

from __future__ import annotations

import math
import os
import pickle
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sap_lightning.core.arms import LearningTerm
from sap_lightning.core.io import atomic_path
from sap_lightning.core.run_layout import CONFIG_FILE, last_checkpoint_path
from sap_lightning.evaluation.curves import last_value, read_training_curves

LESION_LEARNING: tuple[LearningTerm, ...] = (
    LearningTerm("val/sensitivity", "sensitivity"),
    LearningTerm("val/precision", "precision"),
    LearningTerm("val/f2", "F2"),
    LearningTerm("val/froc_auc", "FROC AUC"),
    LearningTerm("val/global_dice", "foreground Dice"),
    LearningTerm("val/f2_guarded", "F2 guarded"),
)
"""What shows a lesion fine-tune learned (validation at the run's validation threshold, and the
FROC area, which no threshold decides: 0 when no voxel reaches the grid's lowest threshold, as
on the loss plateau with the CPU files' head prior of 0.01). Pretraining runs show their arm's
terms (``Pretraining.learning``)."""


def _global_batch(config: Mapping) -> int:
    data, trainer = config.get("data", {}), config.get("trainer", {})
    devices = trainer.get("devices", 1)
    devices = devices if isinstance(devices, int) and devices > 0 else 1
    return int(data.get("batch_size", 1)) * devices * int(trainer.get("num_nodes", 1))


CHANCE_LEVELS: dict[str, Callable[[Mapping], float]] = {
    "rotation": lambda config: math.log(4),
    "contrastive": lambda config: math.log(2 * _global_batch(config) - 1),
}
"""Loss of a head that has learned nothing, from the run's config: uniform over 4 rotations;
one positive among 2N - 1 candidates for NT-Xent over a global batch of N patches (each seen
in two views). ``LearningTerm.chance`` names one."""


@dataclass
class RunDiagnostics:
    name: str
    terms: tuple[LearningTerm, ...]
    steps: int
    first_loss: float
    last_loss: float
    values: dict[str, float] = field(default_factory=dict)
    chance: dict[str, float] = field(default_factory=dict)
    precision: str | None = None
    """``trainer.precision`` the run trained at (its ``config.yaml``; a CPU without fast
    bfloat16 kernels records ``32-true`` there), None when not recorded."""
    zero_stages: list[str] | None = None
    """The network's stages (its top-level modules) whose every weight is zero in the last
    checkpoint; None when the run has no checkpoint."""


DEAD_WEIGHT = 1e-6
"""Largest weight magnitude of a stage counted as zero (a stage Adam's decay killed holds values
near 1e-38; a trained one, above 1e-2)."""


def zero_stages(run_dir: str | os.PathLike) -> list[str] | None:
    """The top-level modules of the run's network (``net.<stage>.*`` in its last checkpoint)
    whose every floating-point entry is below :data:`DEAD_WEIGHT` in magnitude, in order; None
    when the checkpoint is missing or unreadable (a diagnostic never stops a report)."""
    path = last_checkpoint_path(Path(run_dir))
    if not path.is_file():
        return None
    try:
        # Memory-mapped: only the network's weights are read, not the optimiser state.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (OSError, RuntimeError, pickle.UnpicklingError):
        return None
    state = checkpoint.get("state_dict", {})
    largest: dict[str, float] = {}
    for key, tensor in state.items():
        parts = key.split(".")
        if parts[0] == "net" and len(parts) > 2 and tensor.is_floating_point() and tensor.numel():
            largest[parts[1]] = max(largest.get(parts[1], 0.0), float(tensor.abs().max()))
    return [stage for stage, value in largest.items() if value < DEAD_WEIGHT]


def _config(run_dir: Path) -> dict:
    try:
        return yaml.safe_load((run_dir / CONFIG_FILE).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def diagnose(
    name: str, terms: tuple[LearningTerm, ...], run_dir: str | os.PathLike
) -> RunDiagnostics:
    """The learning ``terms`` of one run, read back from its logs and config."""
    run = Path(run_dir)
    curves = read_training_curves(run)
    losses = curves["train/loss"].dropna() if "train/loss" in curves else []
    steps = int(curves["step"].max()) + 1 if "step" in curves and len(curves) else 0
    config = _config(run)
    return RunDiagnostics(
        name=name,
        terms=terms,
        steps=steps,
        first_loss=float(losses.iloc[0]) if len(losses) else math.nan,
        last_loss=float(losses.iloc[-1]) if len(losses) else math.nan,
        values={term.key: last_value(curves, term.key) for term in terms},
        chance={term.key: CHANCE_LEVELS[term.chance](config) for term in terms if term.chance},
        precision=config.get("trainer", {}).get("precision"),
        zero_stages=zero_stages(run),
    )


def _number(value: float) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.3f}"


def diagnostics_markdown(runs: list[RunDiagnostics]) -> str:
    """One table per set of learning terms (each pretraining recipe, the fine-tunes): steps,
    first and last training loss, the stages at zero, and the terms, with their chance levels
    where they have one."""
    groups: dict[tuple[LearningTerm, ...], list[RunDiagnostics]] = {}
    for run in runs:
        groups.setdefault(run.terms, []).append(run)
    lines = []
    for terms, mine in groups.items():
        names = [f"{term.label} (chance)" if term.chance else term.label for term in terms]
        lines += [
            "| run | steps | train loss first -> last | stages at zero | "
            + " | ".join(names)
            + " |",
            "|---|---|---|---|" + "---|" * len(names),
        ]
        for run in mine:
            cells = []
            for term in terms:
                cell = _number(run.values[term.key])
                if term.key in run.chance:
                    cell += f" ({run.chance[term.key]:.3f})"
                cells.append(cell)
            loss = f"{_number(run.first_loss)} -> {_number(run.last_loss)}"
            dead = "n/a" if run.zero_stages is None else ", ".join(run.zero_stages) or "none"
            lines.append(
                f"| {run.name} | {run.steps} | {loss} | {dead} | " + " | ".join(cells) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot_curves(
    runs: Mapping[str, tuple[tuple[LearningTerm, ...], Path]], path: str | os.PathLike
) -> Path:
    """Training loss and each run's first learning term against the optimiser step."""
    figure = Figure(figsize=(11, 4))
    loss_axes = figure.add_subplot(1, 2, 1)
    metric_axes = figure.add_subplot(1, 2, 2)
    for name, (terms, run_dir) in runs.items():
        curves = read_training_curves(run_dir)
        if "step" not in curves:
            continue
        if "train/loss" in curves:
            rows = curves.dropna(subset=["train/loss"])
            loss_axes.plot(rows["step"], rows["train/loss"], label=name, lw=1)
        key = terms[0].key
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


__all__ = [
    "CHANCE_LEVELS",
    "DEAD_WEIGHT",
    "LESION_LEARNING",
    "RunDiagnostics",
    "diagnose",
    "diagnostics_markdown",
    "plot_curves",
    "zero_stages",
]
