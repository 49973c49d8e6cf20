"""``sap pretrain`` / ``sap ssl`` / ``sap finetune``: ``--config experiments/X.yaml key=value ...``.

Each command fixes ``task`` (skeleton, ssl, lesion); everything else comes from the YAML file
and the overrides, checked by the config loader (a mistyped key is refused and named).
"""

from __future__ import annotations

import argparse

from sap_lightning.config import load_config
from sap_lightning.core.arms import get_arm, list_arms


def _add_common(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument(
        "--config",
        help=f"experiment YAML file (e.g. {example}); schema defaults when omitted",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. trainer.max_epochs=2 data.fold=3 logger=csv",
    )


def _run(task: str, args: argparse.Namespace) -> int:
    from sap_lightning.pipeline.train import (
        run_training,  # Lightning is imported only when training
    )

    cfg = load_config(args.config, [*args.overrides, f"task={task}"])
    result = run_training(cfg)
    if not result.is_global_zero:
        return 0  # an extra DDP process: the launching one reports
    if result.interrupted:
        print(f"interrupted; run folder: {result.run_dir} (resume with resume=true)")
        return 1
    print(f"run folder: {result.run_dir}")
    for label, path in (
        ("last checkpoint", result.last_checkpoint),
        ("best checkpoint", result.best_checkpoint),
        ("exported backbone", result.backbone),
        ("transfer report", result.transfer_report),
    ):
        if path is not None:
            print(f"{label}: {path}")
    for name in sorted(result.metrics):
        if name.startswith("val/"):
            print(f"{name} = {result.metrics[name]:.4f}")
    return 0


def add_arguments_pretrain(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "experiments/paper/pretrain.yaml")


def run_pretrain(args: argparse.Namespace) -> int:
    return _run("skeleton", args)


def _arms_epilog(key: str, task: str | None) -> str:
    """The registered arms a key chooses among, from the arm registry."""
    arms = [get_arm(name) for name in list_arms()]
    if task is not None:
        arms = [arm for arm in arms if arm.pretraining is not None and arm.pretraining.task == task]
    return f"{key}: " + "; ".join(f"{arm.name}: {arm.description}" for arm in arms)


def add_arguments_ssl(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "experiments/paper/ssl.yaml")
    parser.epilog = _arms_epilog("pretraining (default ssl)", "ssl")


def run_ssl(args: argparse.Namespace) -> int:
    return _run("ssl", args)


def add_arguments_finetune(parser: argparse.ArgumentParser) -> None:
    _add_common(parser, "experiments/paper/finetune_sap.yaml")
    parser.epilog = _arms_epilog("model.init", None)


def run_finetune(args: argparse.Namespace) -> int:
    return _run("lesion", args)
