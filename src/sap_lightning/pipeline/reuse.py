"""What a rerun of a study may reuse: a completed training run only with the settings it was
trained with, a generated cohort only for the study's own draw.

A study reuses every completed step, so an interrupted one continues where it stopped
(``pipeline/steps.py``). An edited recipe or another seed on the same folders must not be
reported with runs or a cohort made for the old ones: these checks refuse them, naming what
differs and the way out, and leave the folders as they are.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sap_lightning.config import ExperimentConfig, StudyConfig, load_config
from sap_lightning.config.load import to_dict
from sap_lightning.core.errors import SapError
from sap_lightning.core.io import read_json, write_json
from sap_lightning.pipeline.steps import DONE_FILE
from sap_lightning.synthetic.cohort import cohort_differences

_NOT_SETTINGS = ("run_dir", "resume", "logger", "wandb", "trainer.enable_progress_bar")
"""Config keys that do not change what a run learns (where it writes, how it logs): a
completed run is reused whatever their values."""


def run_settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved settings that decide what a training run learns, as dotted keys."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        else:
            flat[prefix[:-1]] = list(value) if isinstance(value, tuple) else value

    walk("", to_dict(cfg))
    kept = {
        key: value
        for key, value in flat.items()
        if not any(key == skip or key.startswith(f"{skip}.") for skip in _NOT_SETTINGS)
    }
    return json.loads(json.dumps(kept))  # as study_step.json holds them: tuples become lists


def _default_settings() -> dict[str, Any]:
    """The schema's own defaults, as :func:`run_settings` writes them."""
    return run_settings(ExperimentConfig())


def check_reuse(
    name: str, config_path: str, bases: Sequence[str], overrides: Sequence[str], run_dir: Path
) -> None:
    """Refuse to reuse a completed run whose recorded settings differ from the ones the study
    would train it with now (an edited experiment file or study override): its results would
    be reported under a recipe they were not trained with. A run completed before settings
    were recorded is reused as it is, and so is one that lacks a key the library added since,
    when the study keeps that key at its default (a new setting's default is the behaviour the
    library had before it)."""
    recorded = read_json(run_dir / DONE_FILE).get("settings")
    if recorded is None:
        return
    cfg = load_config(config_path, [*overrides, f"run_dir={run_dir}"], extra_files=bases)
    wanted = run_settings(cfg)
    defaults = _default_settings()
    added_since = {
        key
        for key in wanted.keys() - recorded.keys()
        if key in defaults and wanted[key] == defaults[key]
    }
    changed = sorted(
        key
        for key in (recorded.keys() | wanted.keys()) - added_since
        if recorded.get(key, "(unset)") != wanted.get(key, "(unset)")
    )
    if changed:
        listed = "; ".join(
            f"{key}: {recorded.get(key, '(unset)')!r} -> {wanted.get(key, '(unset)')!r}"
            for key in changed[:6]
        )
        more = f" and {len(changed) - 6} more" if len(changed) > 6 else ""
        raise SapError(
            f"study: {name}: {run_dir} was completed with other settings ({listed}{more}); "
            "remove that folder to train it again with the current ones (the steps that read "
            "it are redone too), or give the study another runs_dir"
        )


def cohort_settings(study: StudyConfig) -> dict[str, Any]:
    """The study's synthetic cohort as ``make_phantom_cohort``'s keyword arguments."""
    return {
        "n_healthy": study.healthy,
        "n_patients": study.patients,
        "seed": study.seed,
        "shape": study.phantom_shape,
        "spacing": study.phantom_spacing,
        "mimics": study.mimics,
    }


def check_cohort(study: StudyConfig, root: Path) -> None:
    """Refuse a cohort in ``data_dir`` generated with other settings than the study's (another
    seed, size or mimic level) or by another version of the generator: its results would be
    reported as the study's draw."""
    differences = cohort_differences(root, **cohort_settings(study))
    changed = [
        f"{key} {found} (study: {wanted})"
        if found is not None
        else f"no {key} recorded (an older sap_lightning wrote it; study: {wanted})"
        for key, found, wanted in differences or []
    ]
    if changed:
        raise SapError(
            f"study: {root} holds a synthetic cohort generated with {', '.join(changed)}; "
            "give the study another data_dir, or remove that folder to generate the study's own "
            f"(and {study.runs_dir}, if its runs were trained on the removed cohort)"
        )


COHORT_RECORD = "cohort.json"
"""In a study's ``runs_dir``: which synthetic cohort its runs were trained on."""
COHORT_IDENTITY = ("generator_version", "seed", "mimics", "shape", "spacing", "lesion_volumes_ml")
"""The ``phantom`` fields of a lesion ``dataset.json`` that tell one draw from another."""


def check_runs_cohort(study: StudyConfig, lesion: Path) -> None:
    """Refuse a ``runs_dir`` whose runs were trained on another synthetic cohort than the one in
    ``lesion`` (a data_dir regenerated by a newer generator, or pointed elsewhere): their
    models would be tested on patients they may have trained on. The first study on a
    ``runs_dir`` records its cohort there; a user's dataset (no ``phantom`` record) is not
    checked."""
    phantom = read_json(lesion / "dataset.json").get("phantom")
    if phantom is None:
        return
    identity = {key: phantom.get(key) for key in COHORT_IDENTITY}
    record = Path(study.runs_dir) / COHORT_RECORD
    if not record.is_file():
        write_json(record, identity)
        return
    recorded = read_json(record)
    changed = [key for key in COHORT_IDENTITY if recorded.get(key) != identity[key]]
    if changed:
        raise SapError(
            f"study: {study.runs_dir} holds runs trained on another synthetic cohort than "
            f"{lesion} (its {COHORT_RECORD} differs in {', '.join(changed)}); give the study "
            "another runs_dir, or remove that folder to train on this cohort"
        )
