"""Fault tolerance and hostile input, through the real command line.

Users run long jobs on shared clusters: jobs are killed, disks fill, files arrive broken. Covered
here:

- ``kill -9`` of ``sap finetune`` mid-epoch, and in the middle of writing ``last.ckpt``, then
  ``resume=true``: the run finishes with exactly the weights, optimiser and schedule of an
  uninterrupted run (subprocesses; ``_pausing_cli.py`` stops the run at a known point);
- a crash while ``sap predict``, ``sap evaluate`` or ``sap compare`` writes leaves no half file and
  no mix of two runs that a later command reads as valid, and re-running repairs it (the
  preprocessing cache is covered by
  ``tests/unit/test_preprocess.py::test_crash_mid_case_leaves_no_valid_half_case_and_rerun_repairs``);
- broken datasets (truncated image, undeclared label value, missing channel) are refused by every
  command that reads a dataset before any work starts, naming case, file and problem, and
  nothing the user already had changes;
- hostile checkpoints (truncated, wrong task, other backbone, a pickle that runs code) and bad
  configuration are refused with exit status 2 and a message naming the file or key;
- a diverging run (NaN loss) stops at once, naming the step;
- an API key in the environment appears in no file the library (or W&B, offline) writes.

2-process DDP with uneven validation case counts: ``tests/distributed/test_finetune_ddp.py``
(lesion metrics, ``val/n_cases == 3``) and ``tests/distributed/test_reliability_ddp.py``
(skeleton Dice averaging).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sap_lightning.backbones import create_backbone
from sap_lightning.backbones.checkpoints import export_backbone, make_backbone_meta
from sap_lightning.cache import open_cache
from sap_lightning.cli import main
from sap_lightning.config import load_config
from sap_lightning.core.arms import get_arm, list_arms
from sap_lightning.core.errors import DatasetError
from sap_lightning.core.io import read_json
from sap_lightning.dataset import layout
from sap_lightning.dataset.layout import PREPROCESSED_ENV, SPLITS_JSON
from sap_lightning.modules import build_module
from tests.datasets import save, truncate
from tests.integration.test_concurrency import assert_same_cache
from tests.killing import run_until_paused
from tests.tiny import TINY_CONFIG, TINY_NETWORK
from tests.training import EXPERIMENTS, TINY_TRAINING, prepare_tiny_datasets

TINY = TINY_NETWORK
SMALL = TINY_TRAINING
CONFIG = {
    "pretrain": "cpu/pretrain.yaml",
    "ssl": "cpu/ssl.yaml",
    "finetune": "cpu/finetune_scratch.yaml",
}
DATA_INFO = {"in_channels": 2, "channel_names": ["T1", "b1000"], "spacing": [1.5, 1.5, 4.0]}
LESION_CASES = [f"case{i:03d}" for i in range(6)]


def sap_train(command: str, *overrides: str) -> list[str]:
    """Arguments of a tiny ``sap pretrain|ssl|finetune`` run."""
    return [command, "--config", str(EXPERIMENTS / CONFIG[command]), *SMALL, *overrides]


def snapshot(*roots: Path) -> dict[str, bytes]:
    """Every file under ``roots`` with its bytes (to prove nothing changed)."""
    return {
        str(path): path.read_bytes()
        for root in roots
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def names_problem(text: str, *parts: str) -> bool:
    """True when one line of ``text`` names every part (case, file, problem)."""
    return any(all(part in line for part in parts) for line in text.splitlines())


def _export(path: Path, task: str, backbone: str = "unet_tiny", seed: int = 0, **kwargs) -> Path:
    """An exported backbone file, as ``sap pretrain``/``ssl`` leave (``backbone.pt``)."""
    torch.manual_seed(seed)
    if backbone == "unet_tiny":
        overrides = [f"task={task}", TINY]
        info = {
            **DATA_INFO,
            "num_classes": {"skeleton": 10, "lesion": 2, "ssl": None}[task],
            "label_names": {
                "skeleton": [f"c{i}" for i in range(10)],
                "lesion": ["background", "lesion"],
                "ssl": [],
            }[task],
        }
        return build_module(load_config(TINY_CONFIG, overrides), info).export_backbone(path)
    net = create_backbone(backbone, 2, 10, **kwargs)
    meta = make_backbone_meta(
        backbone=backbone, backbone_kwargs=kwargs, in_channels=2, out_channels=10, task=task
    )
    return export_backbone(net, path, meta)


class _RunsCode:
    """Unpickling this calls ``os.system(command)``: the classic malicious checkpoint."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def write_malicious_checkpoint(path: Path, marker: Path) -> Path:
    """A checkpoint-looking file whose loading without ``weights_only`` creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"state_dict": {"net.w": torch.zeros(1)}, "hook": _RunsCode(f"touch {marker}")}, path
    )
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny skeleton and lesion datasets with their caches and splits, and exported backbones."""
    root = tmp_path_factory.mktemp("data")
    return {
        **prepare_tiny_datasets(root),
        # A stand-in for a finished pretraining run folder: sap finetune reads its backbone.pt.
        "skeleton_run": _export(root / "skeleton_run" / "backbone.pt", "skeleton").parent,
        "dynunet_skeleton": _export(
            root / "dynunet.pt",
            "skeleton",
            backbone="dynunet",
            kernel_size=[3, 3, 3],
            strides=[1, 2, 2],
            filters=[4, 8, 8],
        ),
        "lesion_model": _export(root / "lesion_a.pt", "lesion", seed=0),
        "lesion_model_b": _export(root / "lesion_b.pt", "lesion", seed=1),
    }


def copy_dataset(data: dict[str, Path], task: str, root: Path) -> Path:
    """A private copy of a dataset with its cache where training looks (``../cache/<name>``)."""
    dataset = shutil.copytree(data[task], root / task)
    shutil.copytree(data["root"] / "cache" / task, root / "cache" / task)
    return Path(dataset)


# ============================================================================ kill -9 and resume

RESUMABLE = [
    "logger=none",
    "seed=7",
    "trainer.deterministic=true",
    "trainer.max_epochs=3",
    "trainer.limit_train_batches=3",
    "validation.every_n_epochs=2",
]
STEPS_PER_EPOCH = 3


@pytest.fixture(scope="module")
def deterministic_mode():
    """``trainer.deterministic=true`` switches torch to deterministic algorithms process-wide;
    switch back afterwards so other tests run as they would alone."""
    previous = torch.are_deterministic_algorithms_enabled()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        yield
    torch.use_deterministic_algorithms(previous)


COMMAND_OF_TASK = {"skeleton": "pretrain", "ssl": "ssl", "lesion": "finetune"}
RUN_KINDS = {
    "fine-tuning": ("finetune", "cpu/finetune_scratch.yaml", "lesion"),
    **{
        f"{name} pretraining": (
            COMMAND_OF_TASK[arm.pretraining.task],
            f"cpu/{arm.pretraining.experiment}.yaml",
            "skeleton",
        )
        for name in list_arms()
        if (arm := get_arm(name)).pretraining is not None
    },
}
"""Every kind of training run: a fine-tune, and each registered arm's pretraining."""


def resumable_run(data: dict[str, Path], kind: str, run_dir: Path) -> list[str]:
    command, config, dataset = RUN_KINDS[kind]
    # Pretraining epochs hold as many patches as asked: enough for STEPS_PER_EPOCH batches.
    epoch = [] if dataset == "lesion" else ["data.patches_per_epoch=16"]
    if command == "ssl":  # the SSL file's 48^3 patches matter for learning, not for resuming
        epoch.append("data.patch_size=[32,32,32]")
    return [
        command,
        "--config",
        str(EXPERIMENTS / config),
        *SMALL,
        *epoch,
        f"data.dataset={data[dataset]}",
        f"run_dir={run_dir}",
        *RESUMABLE,
    ]


@pytest.fixture(scope="module")
def reference_runs(data, tmp_path_factory: pytest.TempPathFactory, deterministic_mode):
    """The uninterrupted run of each kind the interrupted ones must reproduce (made on first
    use)."""
    root = tmp_path_factory.mktemp("reference")
    made: dict[str, Path] = {}

    def reference(kind: str) -> Path:
        if kind not in made:
            run_dir = root / kind.replace(" ", "_") / "run"
            assert main(resumable_run(data, kind, run_dir)) == 0
            made[kind] = run_dir
        return made[kind]

    return reference


SAME_REFERENCES = pytest.mark.xdist_group("reliability_references")
"""The tests that compare with ``reference_runs`` share one pytest-xdist worker, so each
reference run is trained once (a module fixture is built per worker)."""


def assert_same_training_state(path: Path, reference: Path) -> None:
    """Same counters, weights, optimiser state and schedule (tight tolerance)."""
    got = torch.load(path, weights_only=True)
    want = torch.load(reference, weights_only=True)
    assert (got["epoch"], got["global_step"]) == (want["epoch"], want["global_step"])
    assert got["state_dict"].keys() == want["state_dict"].keys()
    for key, tensor in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], tensor, rtol=1e-6, atol=1e-8, msg=key)
    (got_optimizer,), (want_optimizer,) = got["optimizer_states"], want["optimizer_states"]
    assert got_optimizer["state"].keys() == want_optimizer["state"].keys()
    for index, state in want_optimizer["state"].items():
        for name, value in state.items():
            torch.testing.assert_close(
                got_optimizer["state"][index][name], value, rtol=1e-6, atol=1e-8
            )
    assert [g["lr"] for g in got_optimizer["param_groups"]] == [
        g["lr"] for g in want_optimizer["param_groups"]
    ]
    assert got["lr_schedulers"] == want["lr_schedulers"]


@SAME_REFERENCES
@pytest.mark.slow  # runs sap in a subprocess
@pytest.mark.parametrize("kind", list(RUN_KINDS))
def test_kill_mid_epoch_then_resume_equals_an_uninterrupted_run(
    data, tmp_path: Path, reference_runs, kind: str
) -> None:
    """``kill -9`` mid-epoch, ``resume=true``: the same weights, optimiser state and schedule as
    the uninterrupted run, for every kind of run (a fine-tune and every arm's pretraining: the
    SSL views and MAE masks are drawn per batch, not from where the generators stood)."""
    run_dir = tmp_path / "killed"
    args = resumable_run(data, kind, run_dir)
    epoch, step = run_until_paused(args, "batch:1:1", tmp_path)
    assert (epoch, step) == (1, STEPS_PER_EPOCH + 2)  # mid-epoch, two steps past last.ckpt
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)
    reference = reference_runs(kind)
    assert (
        torch.load(reference / "checkpoints" / "last.ckpt", weights_only=True)["global_step"]
        == 3 * STEPS_PER_EPOCH
    )

    assert main([*args, "resume=true"]) == 0
    assert_same_training_state(last, reference / "checkpoints" / "last.ckpt")
    assert_same_training_state(
        run_dir / "checkpoints" / "best.ckpt", reference / "checkpoints" / "best.ckpt"
    )


# The lesion planner and the body-uniform one (MAE; SSL uses it on larger patches, which is
# slower): the queue keeps the position whatever the planner, and loader workers resume alike
# (tests/unit/test_datamodule.py).
@SAME_REFERENCES
@pytest.mark.slow  # runs sap in a subprocess
@pytest.mark.parametrize("kind", ["fine-tuning", "mae pretraining"])
def test_a_run_resumed_from_a_checkpoint_inside_an_epoch_equals_an_uninterrupted_run(
    data, tmp_path: Path, reference_runs, kind: str
) -> None:
    """``trainer.checkpoint_every_minutes`` writes ``last.ckpt`` inside epochs (here after every
    step); killed mid-epoch and resumed from such a checkpoint, the run trains the rest of that
    epoch's patches, not the epoch's first ones again: the uninterrupted run's final state."""
    run_dir = tmp_path / "killed"
    args = [*resumable_run(data, kind, run_dir), "trainer.checkpoint_every_minutes=1e-6"]
    run_until_paused(args, "batch:1:1", tmp_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["epoch"] == 1 and saved["global_step"] % STEPS_PER_EPOCH != 0  # inside epoch 1
    assert main([*args, "resume=true"]) == 0
    assert_same_training_state(last, reference_runs(kind) / "checkpoints" / "last.ckpt")


@SAME_REFERENCES
@pytest.mark.slow  # runs sap in a subprocess
def test_kill_while_writing_last_checkpoint_keeps_the_previous_one(
    data, tmp_path: Path, reference_runs
) -> None:
    run_dir = tmp_path / "killed"
    args = resumable_run(data, "fine-tuning", run_dir)
    # Killed with half of the second last.ckpt (end of epoch 1) written.
    epoch, step = run_until_paused(args, "checkpoint:2", tmp_path)
    assert (epoch, step) == (1, 2 * STEPS_PER_EPOCH)
    folder = run_dir / "checkpoints"
    partial = sorted(p.name for p in folder.iterdir() if p.name.startswith("."))
    assert len(partial) == 1 and partial[0].startswith(".last.ckpt.tmp-"), partial
    saved = torch.load(folder / "last.ckpt", weights_only=True)  # complete, the previous one
    assert (saved["epoch"], saved["global_step"]) == (0, STEPS_PER_EPOCH)

    assert main([*args, "resume=true"]) == 0
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # leftover removed
    reference = reference_runs("fine-tuning") / "checkpoints" / "last.ckpt"
    assert_same_training_state(folder / "last.ckpt", reference)


# ============================================================ crashes while writing outputs


def _predict(data: dict[str, Path], model: Path, out: Path, *extra: str) -> int:
    """``sap predict`` without pictures (they are ``test_pictures_wiring.py``'s)."""
    args = ["predict", "--checkpoint", str(model), "--input", str(data["lesion"])]
    extra = ("--no-pictures", *extra)
    return main([*args, "--out", str(out), "--threshold", "0.5", "--no-progress", *extra])


def _evaluate(data: dict[str, Path], predictions: Path, out: Path, threshold: float) -> int:
    return main(
        [
            "evaluate",
            "--predictions",
            str(predictions),
            "--dataset",
            str(data["lesion"]),
            "--cases",
            ",".join(LESION_CASES),
            "--threshold",
            str(threshold),
            "--thresholds",
            "0.25,0.5,0.75",
            "--out",
            str(out),
        ]
    )


def _compare(evaluations: list[Path], out: Path) -> int:
    return main(["compare", *map(str, evaluations), "--out", str(out), "--n-resamples", "20"])


def crash_on(monkeypatch: pytest.MonkeyPatch, target: object, name: str, when: Callable) -> None:
    """Make ``target.name`` fail like a full disk when ``when(*args)`` holds; for file writers
    the failing call first leaves half a file behind, as a crash inside ``write`` would."""
    real = getattr(target, name)

    def failing(*args, **kwargs):
        if when(*args):
            if name == "save":  # nibabel.save(image, filename)
                real(*args, **kwargs)
                truncate(Path(args[1]))
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(target, name, failing)


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(".*"))


def test_crash_while_writing_predictions_leaves_no_half_or_mixed_case(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "predictions"
    assert _predict(data, data["lesion_model"], out) == 0  # model A: complete
    model_a = snapshot(out)

    capsys.readouterr()  # model B into model A's folder: refused, nothing touched
    assert _predict(data, data["lesion_model_b"], out) == 2
    assert names_problem(capsys.readouterr().err, str(out), "another model", "--overwrite")
    assert snapshot(out) == model_a

    # Model B's run, told to replace A's outputs, dies while writing case003's probability map.
    crash_on(monkeypatch, nib, "save", lambda image, filename: "case003" in Path(filename).name)
    assert _predict(data, data["lesion_model_b"], out, "--overwrite") == 1
    monkeypatch.undo()
    assert names_problem(capsys.readouterr().err, "case003", "No space left")
    after_crash = snapshot(out)
    assert hidden_files(out) == []  # the half-written temporary file is gone
    for path in out.rglob("*.nii.gz"):
        nib.load(path).get_fdata()  # every file there is complete
    for case in ("case003", "case004", "case005"):  # none of model A's left to pose as B's
        assert not list(out.rglob(f"{case}*")), case

    capsys.readouterr()
    assert _evaluate(data, out, tmp_path / "evaluation", 0.5) == 2
    assert names_problem(capsys.readouterr().err, "case003", "no prediction")
    assert not (tmp_path / "evaluation").exists()

    assert _predict(data, data["lesion_model_b"], out) == 0  # re-running B resumes its folder
    repaired = snapshot(out)
    for case in ("case000", "case001", "case002"):  # written before the crash: B's, complete
        for path in out.rglob(f"{case}*"):
            assert after_crash[str(path)] == repaired[str(path)]
    # mask, probability map, lesion table and summary per case, and prediction.json
    assert len(repaired) == 4 * len(LESION_CASES) + 1
    assert _evaluate(data, out, tmp_path / "evaluation", 0.5) == 0


@pytest.fixture(scope="module")
def evaluations(data, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two evaluation folders of one prediction folder (thresholds 0.25 and 0.5)."""
    root = tmp_path_factory.mktemp("evaluations")
    assert _predict(data, data["lesion_model"], root / "predictions") == 0
    folders = [root / "at_0.25", root / "at_0.5"]
    for folder, threshold in zip(folders, (0.25, 0.5)):
        assert _evaluate(data, root / "predictions", folder, threshold) == 0
    return folders


def test_crash_while_writing_an_evaluation_leaves_it_unusable_until_rerun(
    data, evaluations, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    folder = shutil.copytree(evaluations[0], tmp_path / "evaluation")
    predictions = evaluations[0].parent / "predictions"
    from sap_lightning.evaluation import predictions as module

    crash_on(monkeypatch, module, "plot_froc", lambda *args: True)  # after the CSVs
    capsys.readouterr()
    assert _evaluate(data, predictions, folder, 0.75) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sap evaluate: ") and "No space left" in err
    assert not (folder / "summary.json").exists()  # the old summary does not vouch for new CSVs
    assert hidden_files(folder) == []
    capsys.readouterr()
    assert _compare([folder, evaluations[1]], tmp_path / "report") == 2
    assert names_problem(capsys.readouterr().err, str(folder), "summary.json is missing")

    assert _evaluate(data, predictions, folder, 0.75) == 0
    assert _compare([folder, evaluations[1]], tmp_path / "report") == 0


def test_crash_while_writing_a_comparison_leaves_no_stale_report(
    evaluations, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / "report"
    assert _compare(evaluations, out) == 0
    first = snapshot(out)
    from sap_lightning.evaluation import report as module

    crash_on(monkeypatch, module, "plot_boxes", lambda *args: True)  # after froc.png
    capsys.readouterr()
    assert _compare(evaluations, out) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sap compare: ") and "No space left" in err
    assert not (out / "report.md").exists() and not (out / "comparison.json").exists()
    assert hidden_files(out) == []

    assert _compare(evaluations, out) == 0
    assert snapshot(out) == first  # same inputs, same seed: the same complete report


# ================================================================== broken datasets, every command


def _truncated_image(dataset: Path) -> tuple[str, str, str]:
    truncate(dataset / "imagesTr" / "case001_0001.nii.gz")
    return "case001", "imagesTr/case001_0001.nii.gz", "unreadable or corrupt NIfTI"


def _undeclared_label(dataset: Path) -> tuple[str, str, str]:
    path = dataset / "labelsTr" / "case002.nii.gz"
    image = nib.load(path)
    label = np.asanyarray(image.dataobj).copy()
    undeclared = label.max() + 3  # 4 (lesion) or 12 (skeleton): outside the label set
    label[0, 0, 0] = undeclared
    save(path, label, image.affine)
    return "case002", "labelsTr/case002.nii.gz", f"label values [{undeclared}] not declared"


def _missing_channel(dataset: Path) -> tuple[str, str, str]:
    (dataset / "imagesTr" / "case000_0001.nii.gz").unlink()
    return "case000", "imagesTr/case000_0001.nii.gz", "missing channel 1 (b1000)"


BREAKAGES = {
    "truncated_image": _truncated_image,
    "undeclared_label": _undeclared_label,
    "missing_channel": _missing_channel,
}


def _command_setup(
    command: str, data: dict[str, Path], work: Path
) -> tuple[Path, list[str], list[Path]]:
    """(dataset to break, argv, folders of the user's that must not change) for a command."""
    task = "skeleton" if command in ("pretrain", "ssl") else "lesion"
    dataset = copy_dataset(data, task, work)  # with its splits.json and its cache
    cache = work / "cache" / task
    kept = [dataset, cache]
    if command == "check-data":
        return dataset, ["check-data", str(dataset)], kept
    if command == "preprocess":
        return dataset, ["preprocess", str(dataset), "--out", str(cache)], kept
    if command == "split":
        return dataset, ["split", str(dataset), "--folds", "3"], kept
    if command in ("pretrain", "ssl", "finetune"):
        return (
            dataset,
            sap_train(command, f"data.dataset={dataset}", f"run_dir={work / 'run'}"),
            kept,
        )
    if command in ("predict", "evaluate"):
        out = work / "out"
        (out / "earlier").mkdir(parents=True)
        (out / "earlier" / "result.txt").write_text("the user's earlier results\n")
        kept.append(out)
        if command == "predict":
            model = ["--checkpoint", str(data["lesion_model"])]
            return dataset, [command, *model, "--input", str(dataset), "--out", str(out)], kept
        predictions = ["--predictions", str(data["root"])]  # never reached
        splits = ["--splits", str(dataset / "splits.json"), "--fold", "1"]
        return (
            dataset,
            [command, *predictions, "--dataset", str(dataset), *splits, "--out", str(out)],
            kept,
        )
    assert command == "study"
    shutil.copytree(data["skeleton"], work / "skeleton")
    runs, reports = work / "runs", work / "reports"
    for folder in (runs, reports):
        folder.mkdir()
        (folder / "notes.txt").write_text("kept\n")
    kept += [runs, reports]
    settings = [f"dataset_root={work}", f"runs_dir={runs}", f"report_dir={reports}", "n_folds=3"]
    return dataset, ["study", *settings], kept


DATASET_COMMANDS = [
    "check-data",
    "preprocess",
    "split",
    "pretrain",
    "ssl",
    "finetune",
    "predict",
    "evaluate",
    "study",
]


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("command", DATASET_COMMANDS)
def test_broken_dataset_is_refused_before_any_work(
    data, tmp_path: Path, capsys, command: str, breakage: str
) -> None:
    dataset, argv, kept = _command_setup(command, data, tmp_path)
    case, file, problem = BREAKAGES[breakage](dataset)
    before = snapshot(*kept)
    capsys.readouterr()

    status = main(argv)

    output = capsys.readouterr()
    if command == "check-data":  # the reference: reports the problem, exit status 1
        assert status == 1
        assert names_problem(output.out, f"case {case}", file, problem)
        return
    assert status == 2, output.err
    assert output.err.startswith(f"sap {command}: error: ")
    assert names_problem(output.err, f"case {case}", file, problem), output.err
    assert snapshot(*kept) == before
    assert not (tmp_path / "run").exists()


# =============================================================================== checkpoints


def test_a_pickle_that_runs_code_is_detected_by_the_control(tmp_path: Path) -> None:
    """The premise of the tests below: loading this file the unsafe way does run its code."""
    marker = tmp_path / "ran"
    path = write_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    torch.load(path, weights_only=False)
    assert marker.is_file()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)


def _finetune(data: dict[str, Path], run_dir: Path, *overrides: str) -> list[str]:
    return sap_train("finetune", f"data.dataset={data['lesion']}", f"run_dir={run_dir}", *overrides)


@pytest.mark.parametrize(
    ("source", "init", "problem"),
    [
        ("truncated", "sap", "truncated or corrupt"),
        ("skeleton_run", "ssl", "is a 'skeleton' checkpoint, but a 'ssl' one is expected"),
        ("dynunet_skeleton", "sap", "holds a 'dynunet' backbone, the model is unet_tiny"),
        ("malicious", "sap", "refused to load"),
    ],
)
def test_bad_pretrained_checkpoint_is_refused(
    data, tmp_path: Path, capsys, source: str, init: str, problem: str
) -> None:
    marker = tmp_path / "code_ran"
    if source == "truncated":
        path = truncate(Path(shutil.copy(data["skeleton_run"] / "backbone.pt", tmp_path)))
        shown = path
    elif source == "malicious":
        path = shown = write_malicious_checkpoint(tmp_path / "backbone.pt", marker)
    else:
        path = data[source]
        shown = path / "backbone.pt" if path.is_dir() else path
    run_dir = tmp_path / "run"
    capsys.readouterr()
    status = main(_finetune(data, run_dir, f"model.init={init}", f"model.pretrained={path}"))
    err = capsys.readouterr().err
    assert status == 2, err
    assert names_problem(err, str(shown), problem), err
    assert not run_dir.exists()
    assert not marker.exists()


@pytest.mark.parametrize("kind", ["truncated", "malicious"])
def test_bad_checkpoint_is_refused_by_predict_export_and_inspect(
    data, tmp_path: Path, capsys, kind: str
) -> None:
    marker = tmp_path / "code_ran"
    if kind == "truncated":
        path = truncate(Path(shutil.copy(data["lesion_model"], tmp_path / "model.pt")))
        problem = "truncated or corrupt"
    else:
        path = write_malicious_checkpoint(tmp_path / "model.pt", marker)
        problem = "refused to load"
    commands = {
        "predict": [
            *("--checkpoint", str(path), "--input", str(data["lesion"])),
            *("--out", str(tmp_path / "predictions")),
        ],
        "export": [str(path), str(tmp_path / "exported.pt")],
        "inspect-checkpoint": [str(path)],
    }
    for command, args in commands.items():
        capsys.readouterr()
        status = main([command, *args])
        err = capsys.readouterr().err
        assert status == 2, (command, err)
        assert names_problem(err, str(path), problem), (command, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # nothing written
    assert not marker.exists()


RESUME_OVERRIDES = ["logger=none", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1"]


@pytest.fixture(scope="module")
def finished_run(data, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished one-epoch fine-tuning run folder (copy it before changing anything)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    assert main(_finetune(data, run_dir, *RESUME_OVERRIDES, "trainer.max_epochs=1")) == 0
    return run_dir


@pytest.mark.parametrize("kind", ["truncated", "malicious"])
def test_bad_last_checkpoint_is_refused_on_resume_and_the_run_is_kept(
    data, finished_run: Path, tmp_path: Path, capsys, kind: str
) -> None:
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    last = run_dir / "checkpoints" / "last.ckpt"
    marker = tmp_path / "code_ran"
    if kind == "truncated":
        truncate(last)
        problem = "truncated or corrupt"
    else:
        write_malicious_checkpoint(last, marker)
        problem = "refused to load"
    before = snapshot(run_dir)
    capsys.readouterr()
    args = _finetune(data, run_dir, *RESUME_OVERRIDES, "trainer.max_epochs=2", "resume=true")
    assert main(args) == 2
    assert names_problem(capsys.readouterr().err, str(last), problem)
    assert snapshot(run_dir) == before
    assert not marker.exists()


def test_resume_on_a_broken_dataset_is_refused_and_the_run_is_kept(
    data, finished_run: Path, tmp_path: Path, capsys
) -> None:
    run_dir = Path(shutil.copytree(finished_run, tmp_path / "run"))
    dataset = copy_dataset(data, "lesion", tmp_path)
    case, file, problem = _truncated_image(dataset)
    before = snapshot(run_dir, dataset, tmp_path / "cache")
    capsys.readouterr()
    overrides = [*RESUME_OVERRIDES, "trainer.max_epochs=2", "resume=true"]
    assert (
        main(sap_train("finetune", f"data.dataset={dataset}", f"run_dir={run_dir}", *overrides))
        == 2
    )
    assert names_problem(capsys.readouterr().err, f"case {case}", file, problem)
    assert snapshot(run_dir, dataset, tmp_path / "cache") == before


# ==================================================================================== config


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.datset=x"], ["'data.datset'", "Valid keys under 'data'", "Did you mean 'dataset'"]),
        (["trainer.max_epochs=many"], ["'trainer.max_epochs'", "'many'"]),
        (["model.init=imagenet"], ["'model.init'", "valid choices: scratch, sap, ssl"]),
        (["logger=tensorboard"], ["'logger'", "valid choices: wandb, csv, none"]),
        (["optim.optimizer=lbfgs"], ["'optim.optimizer'", "registered: adam, adamw, sgd"]),
        (["model.init=sap"], ["'model.init' is 'sap'", "'model.pretrained' is not set"]),
        (["data.dataset={nowhere}"], ["'data.dataset'", "{nowhere}", "no such dataset folder"]),
        (
            ["model.init=sap", "model.pretrained={nowhere}"],
            ["{nowhere}", "not found", "model.pretrained"],
        ),
    ],
)
def test_bad_configuration_is_refused_naming_the_key(
    data, tmp_path: Path, capsys, overrides: list[str], expected: list[str]
) -> None:
    nowhere = str(tmp_path / "nowhere")
    run_dir = tmp_path / "run"
    overrides = [item.format(nowhere=nowhere) for item in overrides]
    capsys.readouterr()
    assert main(_finetune(data, run_dir, *overrides)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    for part in expected:
        assert part.format(nowhere=nowhere) in err, err
    assert not run_dir.exists()


# ============================================================================ diverging training


def test_non_finite_loss_stops_training_naming_the_step(data, tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    diverging = ["optim.lr=1e30", "optim.warmup_epochs=0", "logger=none"]
    args = _finetune(data, run_dir, *diverging, "trainer.max_epochs=3")
    capsys.readouterr()
    assert main([*args, "trainer.limit_train_batches=3"]) == 2
    err = capsys.readouterr().err
    found = re.search(r"training loss is (nan|inf|-inf) at global step (\d+) \(epoch (\d+)", err)
    assert found, err
    step, epoch = int(found[2]), int(found[3])
    assert step < 3 * 3
    # Nothing was trained past the bad step: no checkpoint from after it.
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.exists():
        saved = torch.load(last, weights_only=True)
        assert saved["global_step"] <= step and saved["epoch"] < epoch


# ============================================== full disks, read-only folders, read-only datasets


@contextlib.contextmanager
def read_only_folder(path: Path, source: Path | None = None) -> Iterator[bool]:
    """``path`` on a read-only file system holding a copy of ``source`` (minus any
    ``splits.json``): a tmpfs remounted read-only, which refuses writes even to root. Yields
    ``False``, with a writable copy, where mounting is not allowed."""
    path.mkdir(parents=True)
    ignore = shutil.ignore_patterns(SPLITS_JSON)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True
    )
    if mounted.returncode != 0:
        if source is not None:
            shutil.copytree(source, path / source.name, ignore=ignore)
        yield False
        return
    try:
        if source is not None:
            shutil.copytree(source, path / source.name, ignore=ignore)
        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield True
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def one_os_error_line(err: str, command: str, path: Path, reason: str) -> bool:
    """True when stderr ends in ``sap <command>: <path...>: <reason>``, with no traceback."""
    last = err.strip().splitlines()[-1]
    return (
        "Traceback" not in err
        and last.startswith(f"sap {command}: {path}")
        and last.endswith(f": {reason}")
    )


def test_disk_full_while_preprocessing_leaves_no_half_cache_and_rerun_repairs(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    cache = tmp_path / "cache"
    crash_on(monkeypatch, os, "replace", lambda src, dst, *rest: Path(dst).name == "case003")
    capsys.readouterr()
    assert main(["preprocess", str(data["lesion"]), "--out", str(cache)]) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert one_os_error_line(
        err, "preprocess", cache / "cases" / "case003", "No space left on device"
    )
    assert hidden_files(cache / "cases") == []  # no temporary case folder left
    assert not (cache / "cache.json").exists()  # cannot be opened half-built
    with pytest.raises(DatasetError, match="preprocessing never finished"):
        open_cache(cache)

    assert main(["preprocess", str(data["lesion"]), "--out", str(cache)]) == 0
    assert_same_cache(cache, data["root"] / "cache" / data["lesion"].name)


def test_disk_full_while_writing_splits_leaves_none_and_rerun_writes_them(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    out = tmp_path / SPLITS_JSON
    argv = ["split", str(data["lesion"]), "--folds", "3", "--out", str(out)]
    crash_on(monkeypatch, os, "replace", lambda src, dst, *rest: Path(dst).name == SPLITS_JSON)
    capsys.readouterr()
    assert main(argv) == 1
    monkeypatch.undo()
    assert one_os_error_line(capsys.readouterr().err, "split", out, "No space left on device")
    assert hidden_files(tmp_path) == [f".{SPLITS_JSON}.lock"]  # the lock, no temporary file
    assert not out.exists()

    assert main(argv) == 0
    assert read_json(out) == read_json(data["lesion"] / SPLITS_JSON)  # as training wrote them


def test_disk_full_before_the_first_checkpoint_leaves_no_run_folder_in_the_way(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    args = _finetune(data, run_dir, *RESUME_OVERRIDES, "trainer.max_epochs=1", "logger=csv")
    crash_on(monkeypatch, os, "replace", lambda src, dst, *rest: str(dst).endswith(".ckpt"))
    capsys.readouterr()
    assert main(args) == 1
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert one_os_error_line(err, "finetune", run_dir / "checkpoints", "No space left on device")
    assert not run_dir.exists()  # nothing to resume, so nothing that blocks the rerun

    assert main(args) == 0
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("command", ["predict", "preprocess", "split", "finetune"])
def test_read_only_output_folder_is_one_line_naming_it(
    data, tmp_path: Path, capsys, command: str
) -> None:
    with read_only_folder(tmp_path / "ro") as read_only:
        if not read_only:
            pytest.skip("mounting a read-only tmpfs needs root")
        out = tmp_path / "ro" / "out"
        argv = {
            "predict": [
                *("predict", "--checkpoint", str(data["lesion_model"])),
                *("--input", str(data["lesion"]), "--out", str(out), "--no-progress"),
            ],
            "preprocess": ["preprocess", str(data["lesion"]), "--out", str(out)],
            "split": ["split", str(data["lesion"]), "--folds", "3", "--out", str(out)],
            "finetune": _finetune(data, out, *RESUME_OVERRIDES, "trainer.max_epochs=1"),
        }[command]
        capsys.readouterr()
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert one_os_error_line(err, command, out, "Read-only file system"), err
        assert not out.exists()


def test_read_only_dataset_trains_with_cache_and_splits_under_sap_preprocessed(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    preprocessed = tmp_path / "preprocessed"
    monkeypatch.setenv(PREPROCESSED_ENV, str(preprocessed))
    with read_only_folder(tmp_path / "ro", data["lesion"]) as read_only:
        dataset = tmp_path / "ro" / data["lesion"].name
        before = snapshot(tmp_path / "ro")
        run_dir = tmp_path / "run"
        overrides = [*RESUME_OVERRIDES, "trainer.max_epochs=1"]
        assert main(_finetune({"lesion": dataset}, run_dir, *overrides)) == 0
        assert snapshot(tmp_path / "ro") == before  # also checked where it is not read-only
        assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == [dataset.name]
    where = preprocessed / dataset.name
    assert open_cache(where / "cache").dataset == dataset.resolve()
    assert read_json(where / SPLITS_JSON) == read_json(data["lesion"] / SPLITS_JSON)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    if not read_only:
        pytest.skip("trained, but the dataset was writable: mounting needs root")


def test_read_only_dataset_without_sap_preprocessed_falls_back_to_the_user_cache(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    monkeypatch.delenv(PREPROCESSED_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with read_only_folder(tmp_path / "ro", data["lesion"]) as read_only:
        dataset = tmp_path / "ro" / data["lesion"].name
        if not read_only:  # as a read-only mount would answer
            real = layout._is_writable
            monkeypatch.setattr(
                layout, "_is_writable", lambda p: real(p) and "ro" not in Path(p).parts
            )
        with caplog.at_level(logging.INFO, logger=layout.__name__):
            assert main(["preprocess", str(dataset)]) == 0
            assert main(["split", str(dataset), "--folds", "3"]) == 0
    where = tmp_path / "xdg" / "sap_lightning" / dataset.name
    assert_same_cache(where / "cache", data["root"] / "cache" / dataset.name, copied_dataset=True)
    assert read_json(where / SPLITS_JSON) == read_json(data["lesion"] / SPLITS_JSON)
    assert any("is not writable: using" in r.getMessage() for r in caplog.records)


# ================================================================================== secrets

SECRET = "local-abcdef0123456789abcdef0123456789abcdef01"


@pytest.mark.slow  # runs sap in a subprocess
def test_api_key_appears_in_no_written_file(
    data, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """W&B offline training in a subprocess whose home and temporary folders are inside
    ``tmp_path``, then prediction, evaluation and comparison with the key in the environment:
    no byte of any file written anywhere under ``tmp_path`` holds the key."""
    home, scratch = tmp_path / "home", tmp_path / "tmp"
    home.mkdir(), scratch.mkdir()
    dataset = Path(shutil.copytree(data["lesion"], tmp_path / "lesion"))  # cache built anew
    run_dir = tmp_path / "run"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "XDG_"))},
        "WANDB_API_KEY": SECRET,
        "HOME": str(home),
        "TMPDIR": str(scratch),
        "PYTHONUNBUFFERED": "1",
    }
    training = subprocess.run(
        [
            sys.executable,
            "-m",
            "sap_lightning",
            *sap_train("finetune", f"data.dataset={dataset}", f"run_dir={run_dir}"),
            "logger=wandb",
            "wandb.mode=offline",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert training.returncode == 0, training.stderr[-3000:].decode()
    assert list((run_dir / "wandb").glob("offline-run-*"))  # W&B really wrote its files
    assert SECRET.encode() not in training.stdout + training.stderr

    monkeypatch.setenv("WANDB_API_KEY", SECRET)
    predictions = tmp_path / "predictions"
    assert main(["predict", "--checkpoint", str(run_dir), "--input", str(dataset),
                 "--out", str(predictions), "--no-progress"]) == 0  # fmt: skip
    cases = ["--cases", ",".join(LESION_CASES), "--thresholds", "0.25,0.5"]
    for name, threshold in (("a", ["--tune"]), ("b", ["--threshold", "0.5"])):
        args = ["--predictions", str(predictions), "--dataset", str(dataset), *cases, *threshold]
        assert main(["evaluate", *args, "--out", str(tmp_path / name)]) == 0
    assert _compare([tmp_path / "a", tmp_path / "b"], tmp_path / "report") == 0

    files = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink()]
    assert len(files) > 50
    leaking = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert leaking == []
