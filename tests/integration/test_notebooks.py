"""The notebooks run top to bottom on a tiny synthetic cohort, so they never rot."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[2] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stored_without_outputs(path: Path) -> None:
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{path.name} has outputs"


STARTS = {"01_explore_data": "notebooks", "02_patch_sampling": "repo_root"}
"""Where each notebook's kernel starts: ``notebooks/`` (Jupyter opening it there) or the
repository root (``make``); each notebook runs once, and both starts are covered."""


def run_notebook(path: Path, work: Path, start: str = "notebooks", **env: str) -> None:
    """Execute a notebook in a kernel started in ``notebooks/`` or at the repository root, on a
    tiny synthetic cohort under ``work``; ``env`` adds environment variables; no cell may
    fail."""
    values = {
        "SAP_NOTEBOOK_DATA": str(work / "phantoms"),
        "SAP_NOTEBOOK_SIZE": "tiny",
        "SAP_NOTEBOOK_WORK": str(work / "work"),
        "MPLBACKEND": "Agg",
        **env,
    }
    with pytest.MonkeyPatch.context() as patch:
        for name, value in values.items():
            patch.setenv(name, value)
        notebook = nbformat.read(path, as_version=4)
        folder = path.parent if start == "notebooks" else path.parents[1]
        client = NotebookClient(
            notebook,
            timeout=600,
            kernel_name="python3",
            resources={"metadata": {"path": str(folder)}},
        )
        client.execute()
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors


STANDALONE = [p for p in NOTEBOOKS if not p.stem.startswith("03")]
"""Notebook 03 compares a study's runs: ``test_study.py`` runs it on the suite's study."""


@pytest.mark.slow
@pytest.mark.parametrize("path", STANDALONE, ids=[p.stem for p in STANDALONE])
def test_notebook_runs(path: Path, tmp_path: Path) -> None:
    """Each notebook runs in a kernel started where :data:`STARTS` says."""
    run_notebook(path, tmp_path, STARTS.get(path.stem, "notebooks"))
