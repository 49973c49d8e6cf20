"""What ``dataset.json`` declares and the naming rules a dataset must follow.

Parsing ``dataset.json`` (every problem collected, none raised), the task a label set implies
(``layout.task_of_labels``; ``--task`` when it does not say) and the rules on case ids: two ids
must not name the same files on a case-insensitive file system, nor the same ``sap predict``
outputs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sap_lightning.dataset import layout


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset; ``case`` is ``None`` for dataset-wide problems."""

    case: str | None
    file: str
    message: str

    def __str__(self) -> str:
        where = f"case {self.case}" if self.case is not None else "dataset"
        return f"{where}: {self.file}: {self.message}"


@dataclass
class DatasetSpec:
    """What ``dataset.json`` declares; fields that failed validation are ``None``."""

    name: str
    channel_names: tuple[str, ...] | None
    labels: dict[str, int] | None
    """The classes, without the ``ignore`` label (``ignore_value`` holds its value)."""
    file_ending: str
    subjects: dict[str, str]
    num_training: int | None
    ignore_value: int | None = None
    """The value of nnU-Net's ``ignore`` label when ``labels`` in dataset.json declares one."""

    @property
    def label_values(self) -> set[int] | None:
        """Every value a label file may hold: the classes and the ``ignore`` value."""
        if self.labels is None:
            return None
        values = set(self.labels.values())
        return values | {self.ignore_value} if self.ignore_value is not None else values


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_spec(root: Path) -> tuple[DatasetSpec | None, list[Problem]]:
    """Parse and validate ``dataset.json``, collecting every problem instead of stopping."""
    path = root / layout.DATASET_JSON
    name = layout.DATASET_JSON

    def problem(message: str) -> Problem:
        return Problem(None, name, message)

    if not path.is_file():
        return None, [problem("missing (every dataset needs a dataset.json)")]
    duplicates: list[str] = []

    def reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # json.load keeps the last of duplicated keys silently; a case declared twice must fail.
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                duplicates.append(key)
            seen[key] = value
        return seen

    try:
        raw = json.loads(path.read_text(), object_pairs_hook=reject_duplicate_keys)
    except (OSError, UnicodeDecodeError) as err:
        return None, [problem(f"unreadable ({err})")]
    except json.JSONDecodeError as err:
        return None, [problem(f"malformed JSON: {err}")]
    if not isinstance(raw, dict):
        return None, [problem(f"must hold a JSON object, found {type(raw).__name__}")]

    problems = [problem(f"key {key!r} declared twice") for key in dict.fromkeys(duplicates)]
    channel_names = parse_channel_names(raw, problems, problem)
    declared = parse_labels(raw, problems, problem)
    labels, ignore_value = layout.split_ignore(declared) if declared else (declared, None)

    file_ending = raw.get("file_ending", layout.FILE_ENDING)
    if file_ending not in layout.FILE_ENDINGS:
        problems.append(
            problem(f"file_ending must be one of {list(layout.FILE_ENDINGS)}, got {file_ending!r}")
        )
        file_ending = layout.FILE_ENDING

    subjects: dict[str, str] = {}
    raw_subjects = raw.get("subjects", {})
    if not isinstance(raw_subjects, dict):
        problems.append(problem("subjects must be an object {case_id: subject_id}"))
    else:
        for case_id, subject in raw_subjects.items():
            if isinstance(subject, str) and subject:
                subjects[case_id] = subject
            else:
                problems.append(
                    problem(f"subjects[{case_id!r}] must be a non-empty string, got {subject!r}")
                )

    num_training = raw.get("numTraining")
    if num_training is not None and not is_int(num_training):
        problems.append(problem(f"numTraining must be an integer, got {num_training!r}"))
        num_training = None

    dataset_name = raw.get("name", root.name)
    if not isinstance(dataset_name, str):
        problems.append(problem(f"name must be a string, got {dataset_name!r}"))
        dataset_name = root.name
    spec = DatasetSpec(
        dataset_name, channel_names, labels, file_ending, subjects, num_training, ignore_value
    )
    return spec, problems


def parse_channel_names(
    raw: dict, problems: list[Problem], problem: Callable[[str], Problem]
) -> tuple[str, ...] | None:
    if "channel_names" not in raw:
        problems.append(problem("missing key 'channel_names' (e.g. {'0': 'T1', '1': 'b1000'})"))
        return None
    value = raw["channel_names"]
    if not isinstance(value, dict) or not value:
        problems.append(problem(f"channel_names must be a non-empty object, got {value!r}"))
        return None
    expected = [str(index) for index in range(len(value))]
    if sorted(value, key=lambda k: (len(k), k)) != expected:
        problems.append(
            problem(f"channel_names keys must be '0'..'{len(value) - 1}', got {sorted(value)}")
        )
        return None
    names = [value[key] for key in expected]
    if not all(isinstance(name, str) and name for name in names):
        problems.append(problem(f"channel_names values must be non-empty strings, got {names}"))
        return None
    return tuple(names)


def parse_labels(
    raw: dict, problems: list[Problem], problem: Callable[[str], Problem]
) -> dict[str, int] | None:
    if "labels" not in raw:
        problems.append(problem("missing key 'labels' (e.g. {'background': 0, 'lesion': 1})"))
        return None
    value = raw["labels"]
    if not isinstance(value, dict) or not value:
        problems.append(problem(f"labels must be a non-empty object, got {value!r}"))
        return None
    bad = {name: v for name, v in value.items() if not is_int(v)}
    if bad:
        problems.append(problem(f"labels values must be integers, got {bad}"))
        return None
    if value.get("background") != 0:
        problems.append(problem("labels must map 'background' to 0"))
        return None
    if sorted(value.values()) != list(range(len(value))):
        problems.append(
            problem(f"labels values must be the integers 0..{len(value) - 1}, got {value}")
        )
        return None
    ignore = value.get(layout.IGNORE_LABEL)
    if ignore is not None and ignore != len(value) - 1:
        problems.append(
            problem(
                f"label {layout.IGNORE_LABEL!r} must have the highest value, {len(value) - 1} "
                f"(nnU-Net's rule), got {ignore}"
            )
        )
        return None
    return dict(value)


# --------------------------------------------------------------------------- the task


def ambiguous_task_message(labels: dict[str, int]) -> str:
    """Why a label set needs ``--task``, and what each choice does (one line)."""
    foreground = [name for name, value in sorted(labels.items(), key=lambda i: i[1]) if value]
    return (
        f"labels {foreground} are neither one lesion class nor the skeleton label set, so the "
        "task is ambiguous: pass --task lesion (every foreground label merged into one lesion "
        "class, e.g. lytic + blastic) or --task skeleton (these classes as they are)"
    )


def task_problem(labels: dict[str, int] | None, task: str | None) -> Problem | None:
    """The dataset-wide problem of an unknown, unusable or undecided task, if any."""
    if task is not None and task not in layout.TASKS:
        return Problem(None, "--task", f"must be one of {list(layout.TASKS)}, got {task!r}")
    if labels is None:
        return None
    if task == "lesion" and not any(labels.values()):
        return Problem(None, layout.DATASET_JSON, "task lesion, but labels declare no foreground")
    if task is None and layout.task_of_labels(labels) is None:
        return Problem(None, layout.DATASET_JSON, ambiguous_task_message(labels))
    return None


# --------------------------------------------------------------------------- case ids


def case_id_problems(case_ids: Sequence[str], file_ending: str) -> list[Problem]:
    """Case ids that would share files: equal up to letter case (one file on macOS and Windows
    file systems), or one id plus a ``sap predict`` output suffix (``p`` and ``p_prob``: the
    second case's mask would overwrite the first one's probability map). One problem each,
    naming both ids, filed under the later id."""
    problems = []
    first_of: dict[str, str] = {}
    for case_id in sorted(case_ids):
        folded = case_id.casefold()
        if folded in first_of:
            other = first_of[folded]
            problems.append(
                Problem(
                    case_id,
                    f"{layout.IMAGES_DIR}/{case_id}_0000{file_ending}",
                    f"duplicate case id: {case_id!r} and {other!r} differ only by letter case",
                )
            )
            continue
        first_of[folded] = case_id
    for case_id in sorted(case_ids):
        folded = case_id.casefold()
        for suffix in layout.PREDICTION_SUFFIXES:
            if not folded.endswith(suffix) or len(folded) == len(suffix):
                continue
            other = first_of.get(folded[: -len(suffix)])
            if other is None:
                continue
            problems.append(
                Problem(
                    case_id,
                    f"{layout.IMAGES_DIR}/{case_id}_0000{file_ending}",
                    f"case id {case_id!r} is case {other!r} plus {suffix!r}: sap predict names "
                    f"the outputs of {other!r} {other}{suffix}.*, so the two cases' outputs "
                    "would overwrite each other; rename one of them",
                )
            )
    return problems
