"""The ``sap`` command line: ``sap <command> [options]``; ``sap <command> --help`` for each.

Commands are listed in one table and imported lazily, so ``sap --help`` stays fast and a
command only pays for the libraries it uses. The data commands (``TORCH_FREE_COMMANDS``) import
no torch, Lightning or MONAI at all: they run numpy, SimpleITK and worker processes, so torch's
thread pool is only sized (``core.threads.configure_threads``, which imports torch) for the
other commands: ``sap preprocess`` of an unchanged dataset costs under a second of CPU, less
than importing torch alone (``benchmarks/bench_startup.py``;
``tests/integration/test_startup_imports.py`` keeps these commands free of torch). Each command
lives in ``sap_lightning.commands.<module>`` as a pair ``add_arguments_<name>(parser)`` /
``run_<name>(args) -> int`` (``<name>`` is the command with ``-`` replaced by ``_``).

Every failure ends in one line on stderr: a bad option (exit status 2, before anything is
written), a ``SapError`` (bad data, config or checkpoint; exit status 2) or an operating-system
error such as a full disk or a read-only folder, named with its path (exit status 1).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import NoReturn

from sap_lightning import __version__
from sap_lightning.core.errors import SapError
from sap_lightning.core.logs import configure_logging

# command name -> (module under sap_lightning.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-phantoms": ("phantoms", "Generate the synthetic WB-MRI cohort (healthy + patients)."),
    "import-folder": ("data", "Convert a per-case folder layout into the nnU-Net v2 raw format."),
    "import-dicom": ("scanner", "Scanner DICOM exams to T1 + b1000 images on one grid."),
    "check-data": ("data", "Validate a dataset and report every problem found."),
    "headroom": ("headroom", "How hard a phantom dataset is for a fixed intensity rule."),
    "skeleton-labels": ("labels", "Stage-1 skeleton labels from public MRI segmenters' maps."),
    "preprocess": ("data", "Build the normalised, memory-mappable preprocessing cache."),
    "split": ("data", "Write cross-validation splits (splits.json)."),
    "export": ("weights", "Export a checkpoint's backbone with its metadata."),
    "inspect-checkpoint": ("weights", "Print a checkpoint's metadata and key summary."),
    "pretrain": ("train", "Stage 1: skeleton segmentation pretraining."),
    "ssl": ("train", "Self-supervised pretraining of an arm (pretraining=ssl|mae|...)."),
    "finetune": ("train", "Stage 2: lesion fine-tuning, initialised by an arm (model.init)."),
    "predict": ("predict", "Sliding-window inference with lesion table and burden report."),
    "evaluate": ("evaluate", "Lesion-wise evaluation of predictions against labels."),
    "compare": ("evaluate", "Compare evaluated runs: Table 1, p-values, FROC and box plots."),
    "study": ("study", "Run the whole study (data, pretraining, every arm, report)."),
    "sweep": ("study", "Create a W&B sweep whose runs use this environment's interpreter."),
    "sweep-local": ("study", "Run a W&B sweep file's parameter space locally, without a server."),
}

TORCH_FREE_COMMANDS: frozenset[str] = frozenset(
    {
        "make-phantoms",
        "import-folder",
        "import-dicom",
        "check-data",
        "skeleton-labels",
        "preprocess",
        "split",
    }
)
"""Commands that never run a tensor operation: they must not import torch (importing it costs
more CPU than an unchanged dataset's whole ``sap preprocess``), so torch's thread pool is not
sized for them. A command missing here gets torch's threads sized, which is safe, only slower."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sap",
        description="Supervised Anatomical Pretraining for bone-metastasis segmentation on WB-MRI.",
    )
    parser.add_argument("--version", action="version", version=f"sap_lightning {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, add_help=False)
    return parser


class _OneLineParser(argparse.ArgumentParser):
    """Reports a bad option in one line (naming the option and the valid range), not the usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command_parser(name: str) -> argparse.ArgumentParser:
    module_name, help_text = COMMANDS[name]
    module = importlib.import_module(f"sap_lightning.commands.{module_name}")
    parser = _OneLineParser(prog=f"sap {name}", description=help_text)
    # Accepted after the command as well as before it (``sap predict ... -v``).
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    getattr(module, f"add_arguments_{name.replace('-', '_')}")(parser)
    parser.set_defaults(_run=getattr(module, f"run_{name.replace('-', '_')}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = build_parser()
    top_args, rest = top.parse_known_args(argv)
    if top_args.command is None:
        top.print_help()
        return 0 if not argv else 2
    args = _command_parser(top_args.command).parse_args(rest)
    configure_logging(verbose=top_args.verbose or args.verbose)
    if top_args.command not in TORCH_FREE_COMMANDS:
        from sap_lightning.core.threads import configure_threads  # imports torch

        configure_threads()
    try:
        return int(args._run(args) or 0)
    except SapError as err:
        print(f"sap {top_args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"sap {top_args.command}: {describe_os_error(err)}", file=sys.stderr)
        return 1


def describe_os_error(err: OSError) -> str:
    """``<path>: <reason>`` (``<source> -> <target>: <reason>`` for a rename) in one line."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename is None:
        return f"error: {reason}"
    path = str(err.filename)
    if err.filename2 is not None:
        path = f"{path} -> {err.filename2}"
    return f"{path}: {reason}"


if __name__ == "__main__":
    sys.exit(main())
