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


@pytest.mark.slow
@pytest.mark.parametrize("start", ["repo_root", "notebooks"])
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(
    path: Path,
    start: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    """Each notebook runs in a kernel started at the repository root (``make`` and the tests)
    and in ``notebooks/`` (where Jupyter starts kernels for a notebook opened there)."""
    if path.stem.startswith("03"):  # compares the runs of a (tiny) study
        config, _ = request.getfixturevalue("tiny_study")
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
