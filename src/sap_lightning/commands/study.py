"""``sap study``: the whole study in one command; ``sap sweep-local``: a sweep without a server."""

from __future__ import annotations

import argparse

from sap_lightning.commands import _args
from sap_lightning.config import load_study_config


def add_arguments_study(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default=None,
        help="study YAML (e.g. experiments/study/demo.yaml); default: built-in",
    )
    parser.add_argument(
        "--repeats",
        type=_args.positive_int,
        default=None,
        help="independent repeats (cohort, splits and networks with seed + r), then a pooled "
        "report in <report_dir>_repeats/ (the study key 'repeats')",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="study keys to override, e.g. patients=21 n_folds=7 stage=training",
    )


def run_study(args: argparse.Namespace) -> int:
    from sap_lightning.pipeline.study import run_study as run

    repeats = [] if args.repeats is None else [f"repeats={args.repeats}"]
    result = run(load_study_config(args.config, [*args.overrides, *repeats]))
    minutes = result.wall_seconds / 60
    print(f"study finished in {minutes:.1f} min; report: {result.report}")
    return 0


def add_arguments_sweep_local(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="W&B sweep file (experiments/sweeps/*.yaml)")
    parser.add_argument(
        "--count",
        type=_args.positive_int,
        default=None,
        help="number of runs (random: required; grid: the first COUNT points)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of a random sweep's draws")
    parser.add_argument("--dry-run", action="store_true", help="print the commands only")
    parser.add_argument(
        "--keep-going", action="store_true", help="run the remaining points after a failed run"
    )


def run_sweep_local(args: argparse.Namespace) -> int:
    import subprocess

    from sap_lightning.config.sweep import command_for, describe, expand, load_sweep

    sweep = load_sweep(args.sweep)
    points = list(expand(sweep, args.count, args.seed))
    failed = ran = 0
    for index, point in enumerate(points, start=1):
        command = command_for(sweep, point)
        print(f"[{index}/{len(points)}] {describe(command)}", flush=True)
        if args.dry_run:
            continue
        ran += 1
        if subprocess.run(command, check=False).returncode != 0:
            failed += 1
            print(f"[{index}/{len(points)}] failed", flush=True)
            if not args.keep_going:
                break
    if not args.dry_run:
        print(
            f"sweep {sweep.name}: {ran - failed} runs succeeded, {failed} failed, "
            f"{len(points) - ran} not run"
        )
    return 1 if failed else 0


def add_arguments_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sweep", help="W&B sweep file (experiments/sweeps/*.yaml, or its name)")
    parser.add_argument("--project", default=None, help="W&B project (default: W&B's own)")
    parser.add_argument("--entity", default=None, help="W&B entity (default: W&B's own)")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the sweep config instead of creating it"
    )


def run_sweep(args: argparse.Namespace) -> int:
    """Create a W&B sweep whose runs use this environment's interpreter (see
    ``config.sweep.wandb_sweep_config``); print the id and the agent command."""
    import yaml

    from sap_lightning.config.sweep import wandb_sweep_config

    config = wandb_sweep_config(args.sweep)
    if args.dry_run:
        print(yaml.safe_dump(config, sort_keys=False), end="")
        return 0
    import wandb

    sweep_id = wandb.sweep(sweep=config, project=args.project, entity=args.entity)
    where = "/".join(part for part in (args.entity, args.project, sweep_id) if part)
    print(f"sweep {sweep_id}; run agents with: make agent SWEEP_ID={where}")
    return 0
