"""The cases ``sap predict`` reads: a dataset (``dataset.json``, channels matched to the model's by
name) or a plain folder of ``<case>_XXXX`` files (nnU-Net's ``imagesTs`` style, channels in the
model's order), every file checked before any work."""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from sap_lightning.core.errors import DatasetError
from sap_lightning.dataset import layout
from sap_lightning.dataset.images import image_file_ending
from sap_lightning.dataset.info import CaseFiles, load_dataset
from sap_lightning.dataset.spec import Problem
from sap_lightning.dataset.validate import check_case_files, require_valid_dataset

log = logging.getLogger(__name__)


def iter_input_cases(
    input_path: str | os.PathLike,
    n_channels: int,
    validate: bool = True,
    model_channels: Sequence[str] | None = None,
) -> Iterator[CaseFiles]:
    """Cases of a dataset folder or of a plain folder of ``<case>_XXXX`` files, every case's
    images in the model's channel order. Nothing is yielded before the input is validated.

    A dataset (``dataset.json``; labels optional) is validated unless ``validate=False`` (for a
    caller that has just validated it); its ``channel_names`` are matched to ``model_channels``
    by name: the same names in another order are reordered, another set is refused. A plain
    folder (nnU-Net's ``imagesTs`` style) has no names: channel files are taken in the model's
    order, after the per-file checks of :func:`check_case_files`.
    """
    root = Path(input_path)
    if (root / layout.DATASET_JSON).is_file():
        info = require_valid_dataset(root, require_labels=False) if validate else load_dataset(root)
        where = f"{root / layout.DATASET_JSON}"
        order = _channel_order(info.channel_names, model_channels, n_channels, where)
        for case in info.cases:
            yield dataclasses.replace(case, images=tuple(case.images[i] for i in order))
        return
    if not root.is_dir():
        raise DatasetError(f"{root}: input folder does not exist")
    cases, problems = _plain_folder_cases(root, n_channels)
    if not cases and not problems:
        raise DatasetError(f"{root}: no dataset.json and no <case>_0000{layout.FILE_ENDING} files")
    if validate:
        for case in cases:
            problems += check_case_files(case.case_id, case.images)
    if problems:
        raise DatasetError("\n".join(f"input {root}: {problem}" for problem in problems))
    order = ", ".join(model_channels) if model_channels else f"{n_channels} unnamed channels"
    log.info(
        "%s: plain folder without dataset.json: files _0000.._%04d are taken in the model's "
        "channel order (%s)",
        root,
        n_channels - 1,
        order,
    )
    yield from cases


_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def _plain_folder_cases(root: Path, n_channels: int) -> tuple[list[CaseFiles], list[Problem]]:
    """Group a plain folder's ``<case>_XXXX<ending>`` files by case; naming problems."""
    found: dict[str, dict[int, list[Path]]] = {}
    problems: list[Problem] = []
    for path in sorted(root.iterdir()):
        ending = image_file_ending(path)
        if path.name.startswith(".") or ending is None:
            continue  # not an image: hidden files, notes, outputs of other tools
        match = _CHANNEL_SUFFIX.match(path.name[: -len(ending)])
        if match is None:
            problems.append(
                Problem(None, path.name, f"image not named <case>_XXXX{ending}: no case/channel")
            )
            continue
        channel = int(match["channel"])
        found.setdefault(match["case"], {}).setdefault(channel, []).append(path)
    cases = []
    for case_id in sorted(found):
        channels = found[case_id]
        for channel, paths in sorted(channels.items()):
            names = ", ".join(p.name for p in paths)
            if channel >= n_channels:
                message = f"extra channel {channel}: the model takes {n_channels} channels"
                problems.append(Problem(case_id, names, message))
            elif len(paths) > 1:
                problems.append(Problem(case_id, names, f"several files for channel {channel}"))
        images = tuple(
            channels[channel][0]
            if channel in channels
            else root / f"{case_id}_{channel:04d}{layout.FILE_ENDING}"
            for channel in range(n_channels)
        )
        cases.append(CaseFiles(case_id=case_id, subject_id=case_id, images=images, label=None))
    return cases, problems


def _channel_order(
    given: Sequence[str], wanted: Sequence[str] | None, n_channels: int, where: str
) -> list[int]:
    """Indices into ``given`` that put its channels in ``wanted``'s order (refuses other sets)."""
    given = list(given)
    if not wanted:  # a checkpoint without names: only the count can be checked
        if len(given) != n_channels:
            raise DatasetError(
                f"{where}: channel_names {given} has {len(given)} channels, the model takes "
                f"{n_channels}"
            )
        return list(range(n_channels))
    wanted = list(wanted)
    if sorted(given) != sorted(wanted) or len(set(given)) != len(given):
        missing = [name for name in wanted if name not in given]
        extra = [name for name in given if name not in wanted]
        which = "; ".join(
            f"{what} {', '.join(names)}"
            for what, names in (("missing", missing), ("not a model input", extra))
            if names
        )
        raise DatasetError(
            f"{where}: channel_names {given} differ from the model's input channels {wanted}"
            + (f" ({which})" if which else "")
        )
    order = [given.index(name) for name in wanted]
    if order != list(range(len(order))):
        log.info("%s: channels %s reordered by name to the model's order %s", where, given, wanted)
    return order
