"""notebooks/ablations.ipynb runs top to bottom against the tiny sweep's MLflow store and writes its figures."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbclient import NotebookClient

from tests.experiments.test_sweep import SWEEP_NAME, tiny_sweep

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "ablations.ipynb"


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    return tiny_sweep(tmp_path_factory.getbasetemp() / "tiny_sweep")


def test_ablations_notebook_executes_and_writes_its_figures(swept, tmp_path, monkeypatch):
    figures = tmp_path / "figures"
    monkeypatch.setenv("DLM_TRACKING_URI", swept.tracking_uri)
    monkeypatch.setenv("DLM_SWEEP", SWEEP_NAME)
    monkeypatch.setenv("DLM_FIGURES_DIR", str(figures))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    names = ["accuracy_vs_block_size", "accuracy_vs_tpf", "drift_per_layer"]
    assert sorted(p.name for p in figures.iterdir()) == sorted([f"{SWEEP_NAME}_{n}.png" for n in names]
                                                               + [f"{SWEEP_NAME}_table1.csv"])
    assert all((figures / f"{SWEEP_NAME}_{n}.png").read_bytes().startswith(b"\x89PNG") for n in names)
    table1 = pd.read_csv(figures / f"{SWEEP_NAME}_table1.csv", index_col=0)
    assert list(table1.index) == ["block", "block_clean"]  # the patterns in PATTERNS order
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == len(names)
