"""Where experiment, study and sweep files are found: a path, or the name of a packaged file.

The experiment files ship inside the package (``sap_lightning/experiments``; the repository's
``experiments/`` folder points there), so a pip-installed library runs ``sap study`` and
``--config cpu/pretrain`` without a checkout. A path that exists wins; otherwise the name is
looked up among the packaged files, with or without a leading ``experiments/`` and ``.yaml``.
"""

from __future__ import annotations

import os
from pathlib import Path

from sap_lightning.core.errors import ConfigError

EXPERIMENTS_DIR = Path(__file__).resolve().parents[1] / "experiments"
"""The packaged experiment files: base/, cpu/, paper/, study/, sweeps/."""


def list_experiments() -> list[str]:
    """Names of the packaged files, e.g. ``cpu/pretrain``."""
    return sorted(
        str(path.relative_to(EXPERIMENTS_DIR).with_suffix(""))
        for path in EXPERIMENTS_DIR.rglob("*.yaml")
    )


def resolve_config_path(path: str | os.PathLike) -> Path:
    """The file ``path`` names: itself when it exists, else a packaged experiment file."""
    given = Path(path)
    if given.is_file():
        return given
    name = given.as_posix()
    if name.startswith("experiments/"):
        name = name[len("experiments/") :]
    for candidate in (EXPERIMENTS_DIR / name, EXPERIMENTS_DIR / f"{name}.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"config file not found: {path} (neither a file nor a packaged experiment; packaged: "
        f"{', '.join(list_experiments())})"
    )
