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


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(
    path: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Each notebook runs in a kernel started where :data:`STARTS` says."""
    start = STARTS.get(path.stem, "notebooks")
    if path.stem.startswith("03"):  # compares the runs of a (tiny) study
        config = request.getfixturevalue("tiny_study").config
        monkeypatch.setenv("SAP_NOTEBOOK_STUDY", config.runs_dir)
        monkeypatch.setenv("SAP_NOTEBOOK_RESAMPLES", "50")
    monkeypatch.setenv("SAP_NOTEBOOK_DATA", str(tmp_path / "phantoms"))
    monkeypatch.setenv("SAP_NOTEBOOK_SIZE", "tiny")
    monkeypatch.setenv("SAP_NOTEBOOK_WORK", str(tmp_path / "work"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        resources={
            "metadata": {"path": str(path.parent if start == "notebooks" else path.parents[1])}
        },
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
