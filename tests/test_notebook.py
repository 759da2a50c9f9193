"""The quickstart notebook runs top to bottom (as in CI): the install cell skipped, small sizes
injected into its tagged parameters cell, nothing else changed."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
SMALL = """
NUM_SAMPLES = 500
HIDDEN = 8
TRAIN_STEPS = 1500
NUM_CHECKPOINTS = 6
CALIBRATION_STEPS = 2200
CALIBRATION_CHAINS = 2
NUM_CHAINS = 2
NUM_DRAWS = 100
NUM_BURNIN = 100
SEED = 0
"""


def _tagged(notebook, tag):
    return [cell for cell in notebook.cells if tag in cell.get("metadata", {}).get("tags", [])]


def test_notebook_has_one_install_and_one_parameters_cell_naming_every_size():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    install, parameters = _tagged(notebook, "install"), _tagged(notebook, "parameters")
    assert len(install) == 1 and "pip install" in install[0].source
    assert len(parameters) == 1
    names = lambda source: {line.split("=")[0].strip() for line in source.splitlines() if "=" in line}
    assert names(parameters[0].source) == names(SMALL)


def test_notebook_runs_top_to_bottom(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    notebook.cells = [cell for cell in notebook.cells if cell not in _tagged(notebook, "install")]
    _tagged(notebook, "parameters")[0].source = SMALL.strip()
    client = NotebookClient(notebook, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "λ̂ =" in outputs and "stage boundaries" in outputs
    assert (tmp_path / "calibration.png").stat().st_size > 0
    assert (tmp_path / "llc_curve.png").stat().st_size > 0


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
