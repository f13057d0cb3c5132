"""Execute the analysis notebooks headless, on the hand-made store and on a real sweep's, and check their figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from test_analysis_store import StoreInfo, filled_store  # noqa: F401  (fixture)

REPO_ROOT = Path(__file__).resolve().parent.parent
# Notebook -> the figures (SAFFU_FIGURE_DIR/<name>.png) it must write and display.
NOTEBOOK_FIGURES = {
    "pareto.ipynb": ["pareto_params", "pareto_wall_clock"],
    "factors.ipynb": ["factor_effects", "finetune_curves"],
}


def test_every_notebook_is_covered() -> None:
    assert {path.name for path in (REPO_ROOT / "analysis").glob("*.ipynb")} == set(NOTEBOOK_FIGURES)


@pytest.fixture(params=["hand-made", pytest.param("real sweep", marks=[pytest.mark.corpus, pytest.mark.slow])])
def store(request: pytest.FixtureRequest) -> StoreInfo:
    """The hand-made store (anchors, ties, duplicates) and the store of a real small sweep."""
    return request.getfixturevalue("filled_store" if request.param == "hand-made" else "real_sweep_store")


@pytest.mark.parametrize("name", sorted(NOTEBOOK_FIGURES))
def test_notebook_runs_and_draws(name: str, store: StoreInfo, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFFU_TRACKING_URI", store.tracking_uri)
    monkeypatch.setenv("SAFFU_EXPERIMENT", store.experiment)
    monkeypatch.setenv("SAFFU_SWEEP_ID", store.sweep_id)
    monkeypatch.setenv("SAFFU_FIGURE_DIR", str(tmp_path / "figures"))
    notebook = nbformat.read(REPO_ROOT / "analysis" / name, as_version=4)

    # The kernel inherits this process's environment, and runs in the repository root so
    # that `import analysis` works without installing the project.
    client = NotebookClient(notebook, timeout=180, kernel_name="python3",
                            resources={"metadata": {"path": str(REPO_ROOT)}})
    client.execute()

    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors
    images = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    assert len(images) >= len(NOTEBOOK_FIGURES[name])
    for figure in NOTEBOOK_FIGURES[name]:
        path = tmp_path / "figures" / f"{figure}.png"
        assert path.is_file(), figure
        assert path.stat().st_size > 5_000, figure
