"""The notebook runs top to bottom: executing it is a test, so a failing cell fails CI."""

from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient", reason="executing the notebook needs nbclient (in the test extras)")
nbformat = pytest.importorskip("nbformat", reason="reading the notebook needs nbformat (in the test extras)")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "backprop_from_scratch.ipynb"


@pytest.mark.slow  # 12 s: a kernel, an epoch and five figures
def test_the_notebook_runs_top_to_bottom(mnist_dir, monkeypatch):
    monkeypatch.setenv("XPNET_DATA_DIR", str(mnist_dir))  # the kernel inherits the environment
    monkeypatch.setenv("XPNET_NOTEBOOK_EPOCHS", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3").execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "every gradient equals its formula" in text and "Test accuracy:" in text
    assert "W1: worst relative error" in text and "test accuracy 0.9" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 5  # digits, curves, weights, matrix, predictions
